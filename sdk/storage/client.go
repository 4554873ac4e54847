package storage

import (
	"context"
	"errors"
	"fmt"
	"io"

	"google.golang.org/grpc"

	"github.com/gpuaas/gpuaas/sdk/base"
	storagepb "github.com/gpuaas/gpuaas/sdk/storage/proto"
)

// Client is the host's side of a storage plugin. It implements Driver,
// RangeGetter (whatever the plugin's capabilities) and Presigner; without
// the capability the presign calls return base.ErrUnimplemented.
type Client struct {
	*base.Client

	rpc storagepb.StorageClient
}

var (
	_ Driver      = (*Client)(nil)
	_ Presigner   = (*Client)(nil)
	_ RangeGetter = (*Client)(nil)
)

// NewClient returns a client on conn. doneCtx is done when the plugin
// process exits.
func NewClient(conn grpc.ClientConnInterface, doneCtx context.Context) *Client {
	return &Client{Client: base.NewClient(conn, doneCtx), rpc: storagepb.NewStorageClient(conn)}
}

// Put implements Driver. body is read in chunks of ChunkSize on a separate
// goroutine, so a cancelled ctx returns promptly even while body blocks;
// that goroutine ends when body's Read returns.
func (c *Client) Put(ctx context.Context, req *PutRequest, body io.Reader) (*ObjectInfo, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	fail := func(err error) (*ObjectInfo, error) {
		return nil, fmt.Errorf("storage: put %q: %w", req.Key, c.Err(ctx, err))
	}
	stream, err := c.rpc.Put(ctx)
	if err != nil {
		return fail(err)
	}
	if err := stream.Send(&storagepb.PutMessage{Msg: &storagepb.PutMessage_Header{Header: putHeaderToProto(req)}}); err != nil && err != io.EOF {
		return fail(err)
	}
	chunks := make(chan chunkOrErr, 1)
	go readChunks(ctx, body, chunks)
	sendFailed := false
	for !sendFailed {
		var next chunkOrErr
		select {
		case <-ctx.Done():
			return fail(ctx.Err())
		case next = <-chunks:
		}
		if next.err == io.EOF {
			break
		}
		if next.err != nil {
			// Abandon the stream so the driver sees a failed body, never a
			// short one.
			cancel()
			return nil, fmt.Errorf("storage: put %q: reading body: %w", req.Key, next.err)
		}
		if err := stream.Send(&storagepb.PutMessage{Msg: &storagepb.PutMessage_Chunk{Chunk: next.chunk}}); err != nil {
			if err != io.EOF {
				return fail(err)
			}
			// The server has finished (an idempotent replay, or an error):
			// its answer comes from CloseAndRecv.
			sendFailed = true
		}
	}
	resp, err := stream.CloseAndRecv()
	if err != nil {
		return fail(err)
	}
	return infoFromProto(resp), nil
}

type chunkOrErr struct {
	chunk []byte
	err   error
}

// readChunks reads body into fresh ChunkSize buffers until EOF, an error or
// ctx ends. The last value sent is io.EOF or the error.
func readChunks(ctx context.Context, body io.Reader, out chan<- chunkOrErr) {
	for {
		buf := make([]byte, ChunkSize)
		n, err := io.ReadFull(body, buf)
		var msgs []chunkOrErr
		if n > 0 {
			msgs = append(msgs, chunkOrErr{chunk: buf[:n]})
		}
		switch {
		case err == io.EOF || err == io.ErrUnexpectedEOF:
			msgs = append(msgs, chunkOrErr{err: io.EOF})
		case err != nil:
			msgs = append(msgs, chunkOrErr{err: err})
		}
		for _, m := range msgs {
			select {
			case out <- m:
			case <-ctx.Done():
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// Get implements Driver. The returned Body streams from the plugin; close
// it to release the stream. Reading fails if the plugin sends more or
// fewer bytes than Info.Size, or a chunk over MaxChunkSize.
func (c *Client) Get(ctx context.Context, key string) (*Object, error) {
	return c.get(ctx, key, nil)
}

// GetRange implements RangeGetter. Every driver serves it: the SDK's
// server reads past the bytes before the range for a driver without the
// capability, and for a plugin built before ranges existed (which sends
// the whole object) this client does.
func (c *Client) GetRange(ctx context.Context, key string, r Range) (*Object, error) {
	if err := r.Check(); err != nil {
		return nil, fmt.Errorf("storage: get %q: %w", key, err)
	}
	return c.get(ctx, key, &r)
}

func (c *Client) get(ctx context.Context, key string, r *Range) (*Object, error) {
	req := &storagepb.GetRequest{Key: key}
	if r != nil {
		req.Range = rangeToProto(*r)
	}
	sctx, cancel := context.WithCancel(ctx)
	stream, err := c.rpc.Get(sctx, req)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("storage: get %q: %w", key, c.Err(ctx, err))
	}
	first, err := stream.Recv()
	if err != nil {
		cancel()
		if err == io.EOF {
			err = fmt.Errorf("stream ended before the object info: %w", base.ErrInternal)
		}
		return nil, fmt.Errorf("storage: get %q: %w", key, c.Err(ctx, err))
	}
	pinfo := first.GetInfo()
	if pinfo == nil {
		cancel()
		return nil, fmt.Errorf("storage: get %q: first message is not the object info: %w", key, base.ErrInternal)
	}
	info := infoFromProto(pinfo)
	size := info.Size
	if r != nil && first.GetRange() != nil {
		got, want := rangeFromProto(first.GetRange()), Range{Offset: r.Offset, Length: r.Clip(info.Size)}
		if got != want {
			cancel()
			return nil, fmt.Errorf("storage: get %q: asked for %+v of %d bytes, the plugin sends %+v: %w", key, *r, info.Size, got, base.ErrInternal)
		}
		size = want.Length
	}
	obj := &Object{Info: *info, Body: &getBody{ctx: ctx, key: key, client: c, stream: stream, cancel: cancel, size: size}}
	if r != nil && first.GetRange() == nil {
		// A plugin that predates ranges sends the whole object.
		return CutRange(obj, *r)
	}
	return obj, nil
}

var (
	_ io.ReadCloser = (*getBody)(nil)
	_ io.WriterTo   = (*getBody)(nil)
)

// getBody reads the chunks of a Get stream.
type getBody struct {
	ctx      context.Context
	key      string
	client   *Client
	stream   storagepb.Storage_GetClient
	cancel   context.CancelFunc
	size     int64
	received int64
	pending  []byte
	err      error
}

// next receives the next chunk into pending, or sets err (io.EOF at the
// end of a body of the right length).
func (b *getBody) next() {
	if err := b.ctx.Err(); err != nil {
		// gRPC may still hold chunks that arrived before the cancel.
		b.err = fmt.Errorf("storage: get %q: %w", b.key, err)
		b.cancel()
		return
	}
	msg, err := b.stream.Recv()
	switch {
	case err == io.EOF:
		if b.received != b.size {
			b.err = fmt.Errorf("storage: get %q: body ended after %d of %d bytes: %w", b.key, b.received, b.size, io.ErrUnexpectedEOF)
		} else {
			b.err = io.EOF
		}
		b.cancel()
		return
	case err != nil:
		b.err = fmt.Errorf("storage: get %q: %w", b.key, b.client.Err(b.ctx, err))
		b.cancel()
		return
	}
	chunk := msg.GetChunk()
	switch {
	case msg.GetInfo() != nil:
		b.err = fmt.Errorf("storage: get %q: second object info: %w", b.key, base.ErrInternal)
	case len(chunk) > MaxChunkSize:
		b.err = fmt.Errorf("storage: get %q: chunk of %d bytes exceeds %d: %w", b.key, len(chunk), MaxChunkSize, base.ErrInternal)
	case b.received+int64(len(chunk)) > b.size:
		b.err = fmt.Errorf("storage: get %q: body longer than %d bytes: %w", b.key, b.size, base.ErrInternal)
	default:
		b.received += int64(len(chunk))
		b.pending = chunk
		return
	}
	b.cancel()
}

func (b *getBody) Read(p []byte) (int, error) {
	for len(b.pending) == 0 {
		if b.err != nil {
			return 0, b.err
		}
		b.next()
	}
	n := copy(p, b.pending)
	b.pending = b.pending[n:]
	return n, nil
}

// WriteTo writes the rest of the body to w chunk by chunk, without
// copying through an intermediate buffer.
func (b *getBody) WriteTo(w io.Writer) (int64, error) {
	var total int64
	for {
		for len(b.pending) == 0 {
			if b.err == io.EOF {
				return total, nil
			}
			if b.err != nil {
				return total, b.err
			}
			b.next()
		}
		n, err := w.Write(b.pending)
		total += int64(n)
		b.pending = b.pending[n:]
		if err != nil {
			return total, err
		}
	}
}

// Close releases the stream.
func (b *getBody) Close() error {
	b.cancel()
	if b.err == nil {
		b.err = errors.New("storage: get: body closed")
	}
	return nil
}

// Stat implements Driver.
func (c *Client) Stat(ctx context.Context, key string) (*ObjectInfo, error) {
	resp, err := c.rpc.Stat(ctx, &storagepb.StatRequest{Key: key})
	if err != nil {
		return nil, fmt.Errorf("storage: stat %q: %w", key, c.Err(ctx, err))
	}
	return infoFromProto(resp), nil
}

// Delete implements Driver.
func (c *Client) Delete(ctx context.Context, req *DeleteRequest) error {
	if _, err := c.rpc.Delete(ctx, deleteToProto(req)); err != nil {
		return fmt.Errorf("storage: delete %q: %w", req.Key, c.Err(ctx, err))
	}
	return nil
}

// Copy implements Driver.
func (c *Client) Copy(ctx context.Context, req *CopyRequest) (*ObjectInfo, error) {
	resp, err := c.rpc.Copy(ctx, copyToProto(req))
	if err != nil {
		return nil, fmt.Errorf("storage: copy %q to %q: %w", req.SourceKey, req.DestKey, c.Err(ctx, err))
	}
	return infoFromProto(resp), nil
}

// List implements Driver.
func (c *Client) List(ctx context.Context, req *ListRequest) (*ListPage, error) {
	resp, err := c.rpc.List(ctx, listToProto(req))
	if err != nil {
		return nil, fmt.Errorf("storage: list %q: %w", req.Prefix, c.Err(ctx, err))
	}
	return pageFromProto(resp), nil
}

// PresignGet implements Presigner.
func (c *Client) PresignGet(ctx context.Context, req *PresignRequest) (*PresignedURL, error) {
	resp, err := c.rpc.PresignGet(ctx, presignToProto(req))
	if err != nil {
		return nil, fmt.Errorf("storage: presign get %q: %w", req.Key, c.Err(ctx, err))
	}
	return presignedFromProto(resp), nil
}

// PresignPut implements Presigner.
func (c *Client) PresignPut(ctx context.Context, req *PresignRequest) (*PresignedURL, error) {
	resp, err := c.rpc.PresignPut(ctx, presignToProto(req))
	if err != nil {
		return nil, fmt.Errorf("storage: presign put %q: %w", req.Key, c.Err(ctx, err))
	}
	return presignedFromProto(resp), nil
}
