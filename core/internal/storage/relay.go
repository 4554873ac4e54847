package storage

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"
)

// The relay: a download from a store reached over plain HTTP (the usual
// on-premises S3: MinIO, Ceph RGW, versitygw on the operator's network)
// runs over a connection of its own, so that once the response's headers
// are read its body can go from the store's socket to the client's with
// splice(2), without passing through the core's memory. Over HTTPS, or to
// a writer that is not a socket, the body is read like any other.

// relayChunk is how much one splice call may move before the writer's
// deadline is pushed out again (the client's idle timeout counts per
// chunk, not per download).
const relayChunk = 1 << 20

// relayReadBuffer holds the response headers, and whatever of the body
// came with them.
const relayReadBuffer = 16 << 10

// aLongTimeAgo is a deadline that has passed: setting it ends a blocked
// read or write at once.
var aLongTimeAgo = time.Unix(1, 0)

// relayGet sends req (a GET over http) on a connection of its own and
// reads the response's headers. The response's body closes the
// connection; a 200 or 206 with a Content-Length gets a body that can
// splice itself (relayBody). Ending ctx ends the transfer.
func relayGet(ctx context.Context, dial func(ctx context.Context, network, addr string) (net.Conn, error), req *http.Request) (*http.Response, error) {
	addr := req.URL.Host
	if req.URL.Port() == "" {
		addr = net.JoinHostPort(req.URL.Hostname(), "80")
	}
	conn, err := dial(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(aLongTimeAgo) })
	fail := func(err error) (*http.Response, error) {
		stop()
		_ = conn.Close()
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, err
	}
	req.Close = true // one request per connection: the body is spliced off it
	if err := req.Write(conn); err != nil {
		return fail(err)
	}
	br := bufio.NewReaderSize(conn, relayReadBuffer)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		return fail(err)
	}
	if (resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusPartialContent) &&
		resp.ContentLength >= 0 && len(resp.TransferEncoding) == 0 {
		resp.Body = &relayBody{conn: conn, br: br, left: resp.ContentLength, stop: stop}
		return resp, nil
	}
	resp.Body = &closeConn{ReadCloser: resp.Body, conn: conn, stop: stop}
	return resp, nil
}

// closeConn is a response body that closes its connection.
type closeConn struct {
	io.ReadCloser
	conn net.Conn
	stop func() bool
}

func (c *closeConn) Close() error {
	c.stop()
	_ = c.ReadCloser.Close()
	return c.conn.Close()
}

// relayBody is the body of a response with a Content-Length, read from the
// connection it came on. It fails with io.ErrUnexpectedEOF if the store
// sends less than it announced.
type relayBody struct {
	conn net.Conn
	br   *bufio.Reader // holds the first bytes of the body
	left int64
	stop func() bool
}

var (
	_ io.ReadCloser = (*relayBody)(nil)
	_ io.WriterTo   = (*relayBody)(nil)
)

func (b *relayBody) Read(p []byte) (int, error) {
	if b.left <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > b.left {
		p = p[:b.left]
	}
	n, err := b.br.Read(p) // a read larger than the buffer goes to the conn directly
	b.left -= int64(n)
	if errors.Is(err, io.EOF) && b.left > 0 {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

// WriteTo writes the rest of the body to w: what was read with the headers
// first, then, when w can read from a reader (a socket's ReadFrom splices
// from another socket), straight from the connection a chunk at a time.
func (b *relayBody) WriteTo(w io.Writer) (int64, error) {
	var n int64
	if k := min(int64(b.br.Buffered()), b.left); k > 0 {
		buf, _ := b.br.Peek(int(k))
		m, err := w.Write(buf)
		_, _ = b.br.Discard(m)
		n += int64(m)
		b.left -= int64(m)
		if err != nil {
			return n, err
		}
	}
	rf, ok := w.(io.ReaderFrom)
	if !ok {
		m, err := io.CopyBuffer(w, struct{ io.Reader }{b}, make([]byte, 256<<10))
		return n + m, err
	}
	for b.left > 0 {
		want := min(b.left, relayChunk)
		m, err := rf.ReadFrom(&io.LimitedReader{R: b.conn, N: want})
		n += m
		b.left -= m
		if err != nil {
			return n, err
		}
		if m < want {
			return n, fmt.Errorf("storage: the store ended the body %d bytes short: %w", b.left, io.ErrUnexpectedEOF)
		}
	}
	return n, nil
}

func (b *relayBody) Close() error {
	b.stop()
	return b.conn.Close()
}
