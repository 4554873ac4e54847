package storage

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/sdk/base"
	sdkstorage "github.com/gpuaas/gpuaas/sdk/storage"
)

// spliceConn is a TCP connection that records whether a ReadFrom was handed
// another socket (what the kernel can splice from) and how many bytes came
// that way.
type spliceConn struct {
	*net.TCPConn
	fromSocket atomic.Int64
}

func (c *spliceConn) ReadFrom(r io.Reader) (int64, error) {
	src := r
	if lr, ok := r.(*io.LimitedReader); ok {
		src = lr.R
	}
	n, err := c.TCPConn.ReadFrom(r)
	if _, ok := src.(*net.TCPConn); ok {
		c.fromSocket.Add(n)
	}
	return n, err
}

// socketPair returns the writing end of a loopback TCP connection and a
// channel that delivers everything read from the other end once the writer
// closes.
func socketPair(t *testing.T) (*spliceConn, <-chan []byte) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	// The listener closes only once the connection is accepted: closing it
	// with the connection still in its backlog resets the connection.
	peer := <-accepted
	if peer == nil {
		t.Fatal("accept failed")
	}
	got := make(chan []byte, 1)
	go func() {
		defer peer.Close()
		b, _ := io.ReadAll(peer)
		got <- b
	}()
	return &spliceConn{TCPConn: c.(*net.TCPConn)}, got
}

func TestRelaySplicesToASocket(t *testing.T) {
	data := make([]byte, 3<<20+17)
	_, _ = rand.Read(data)
	store := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("ETag", `"big"`)
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(data))
	}))
	t.Cleanup(store.Close)
	drv := &streamDriver{store: store}
	d := direct{Driver: drv, ps: drv, client: newDirectClient(), dial: directDial, off: &atomic.Bool{}}

	for _, c := range []struct {
		name     string
		buffered bool // through a bufio.Writer, as fasthttp writes a body
		rng      *[2]int64
	}{{"conn", false, nil}, {"bufio", true, nil}, {"range", true, &[2]int64{1000, 2 << 20}}} {
		t.Run(c.name, func(t *testing.T) {
			var want []byte
			var getErr error
			var body io.ReadCloser
			if c.rng == nil {
				obj, err := d.Get(t.Context(), "big")
				getErr, want = err, data
				if err == nil {
					body = obj.Body
				}
			} else {
				obj, err := d.GetRange(t.Context(), "big", sdkstorage.Range{Offset: c.rng[0], Length: c.rng[1]})
				getErr, want = err, data[c.rng[0]:c.rng[0]+c.rng[1]]
				if err == nil {
					body = obj.Body
				}
			}
			if getErr != nil {
				t.Fatal(getErr)
			}
			defer body.Close()
			wt, ok := body.(*relayBody)
			if !ok {
				t.Fatalf("a download over http has a %T body, not the relay's", body)
			}
			conn, got := socketPair(t)
			var w io.Writer = conn
			bw := bufio.NewWriterSize(conn, 4096)
			if c.buffered {
				w = bw
			}
			n, err := wt.WriteTo(w)
			if err == nil && c.buffered {
				err = bw.Flush()
			}
			if err != nil || n != int64(len(want)) {
				t.Fatalf("WriteTo: %d bytes, %v; want %d", n, err, len(want))
			}
			_ = conn.CloseWrite()
			if b := <-got; !bytes.Equal(b, want) {
				t.Fatalf("the socket received %d bytes that differ from the %d sent", len(b), len(want))
			}
			// All but what came with the headers (at most the read buffer)
			// went socket to socket.
			if s := conn.fromSocket.Load(); s < int64(len(want))-relayReadBuffer-4096 {
				t.Fatalf("%d of %d bytes were handed over as a socket; the rest was copied", s, len(want))
			}
		})
	}
}

// rawStore answers every request with head, then body, then waits for
// hold before closing.
func rawStore(t *testing.T, head string, body []byte, hold <-chan struct{}) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = http.ReadRequest(bufio.NewReader(c))
				_, _ = io.WriteString(c, head)
				_, _ = c.Write(body)
				if hold != nil {
					<-hold
				}
			}()
		}
	}()
	return "http://" + ln.Addr().String() + "/obj?X-Amz-Signature=abc"
}

func TestRelayShortBody(t *testing.T) {
	body := bytes.Repeat([]byte("x"), 50000)
	u := rawStore(t, "HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", body, nil)
	drv := newStreamDriver(t)
	d := direct{Driver: drv, ps: fixedURL{drv, u}, client: newDirectClient(), dial: directDial, off: &atomic.Bool{}}

	obj, err := d.Get(t.Context(), "obj")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadAll(obj.Body); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("Read of a body cut short: %v; want io.ErrUnexpectedEOF", err)
	}
	_ = obj.Body.Close()

	obj, err = d.Get(t.Context(), "obj")
	if err != nil {
		t.Fatal(err)
	}
	defer obj.Body.Close()
	conn, _ := socketPair(t)
	if n, err := obj.Body.(io.WriterTo).WriteTo(conn); !errors.Is(err, io.ErrUnexpectedEOF) || n != int64(len(body)) {
		t.Fatalf("WriteTo of a body cut short: %d bytes, %v; want %d and io.ErrUnexpectedEOF", n, err, len(body))
	}
}

func TestRelayEndsWithItsContext(t *testing.T) {
	hold := make(chan struct{})
	t.Cleanup(func() { close(hold) })
	u := rawStore(t, "HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n", make([]byte, 1000), hold)
	drv := newStreamDriver(t)
	d := direct{Driver: drv, ps: fixedURL{drv, u}, client: newDirectClient(), dial: directDial, off: &atomic.Bool{}}

	ctx, cancel := context.WithCancel(t.Context())
	obj, err := d.Get(ctx, "obj")
	if err != nil {
		t.Fatal(err)
	}
	defer obj.Body.Close()
	conn, _ := socketPair(t)
	done := make(chan error, 1)
	go func() {
		_, err := obj.Body.(io.WriterTo).WriteTo(conn)
		done <- err
	}()
	time.Sleep(50 * time.Millisecond)
	select {
	case err := <-done:
		t.Fatalf("the transfer ended before its context: %v", err)
	default:
	}
	cancel()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("a cancelled transfer reported success")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the transfer went on after its context ended")
	}
}

func TestRelayStoreErrors(t *testing.T) {
	u := rawStore(t, "HTTP/1.1 503 Slow Down\r\nContent-Length: 9\r\n\r\n", []byte("slow down"), nil)
	drv := newStreamDriver(t)
	d := direct{Driver: drv, ps: fixedURL{drv, u}, client: newDirectClient(), dial: directDial, off: &atomic.Bool{}}
	_, err := d.Get(t.Context(), "obj")
	if err == nil || !errors.Is(err, base.ErrUnavailable) {
		t.Fatalf("a 503 from the store: %v; want ErrUnavailable", err)
	}

	// Nothing listens: the dial fails with the key in the message.
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	_ = ln.Close()
	d.ps = fixedURL{drv, fmt.Sprintf("http://%s/obj", addr)}
	if _, err := d.Get(t.Context(), "obj"); err == nil {
		t.Fatal("a store that does not listen: no error")
	}
}
