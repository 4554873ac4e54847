package storage

import (
	"context"
	"errors"
	"fmt"
	"io"
	"unicode/utf8"

	"github.com/gpuaas/gpuaas/sdk/base"
	storagepb "github.com/gpuaas/gpuaas/sdk/storage/proto"
)

// MaxKeyLength is the longest key the SDK passes to a driver.
const MaxKeyLength = 1024

// Server serves a Driver over gRPC. It checks the arguments the contract
// promises the driver (keys, operation ids, stream framing) and streams
// object bodies in chunks of at most ChunkSize.
type Server struct {
	storagepb.UnimplementedStorageServer

	impl Driver
}

var _ storagepb.StorageServer = (*Server)(nil)

// NewServer wraps impl.
func NewServer(impl Driver) *Server { return &Server{impl: impl} }

func checkKey(what, key string) error {
	switch {
	case key == "":
		return fmt.Errorf("%s: empty: %w", what, base.ErrInvalidArgument)
	case len(key) > MaxKeyLength:
		return fmt.Errorf("%s: longer than %d bytes: %w", what, MaxKeyLength, base.ErrInvalidArgument)
	case !utf8.ValidString(key):
		return fmt.Errorf("%s: not UTF-8: %w", what, base.ErrInvalidArgument)
	}
	return nil
}

func checkOperationID(id string) error {
	if id == "" {
		return fmt.Errorf("operation id: empty: %w", base.ErrInvalidArgument)
	}
	return nil
}

// Put implements storagepb.StorageServer.
func (s *Server) Put(stream storagepb.Storage_PutServer) error {
	ctx := stream.Context()
	first, err := stream.Recv()
	if err != nil {
		return base.StatusFromError(fmt.Errorf("storage: put: %w", recvErr(ctx, err)))
	}
	hdr := first.GetHeader()
	if hdr == nil {
		return base.StatusFromError(fmt.Errorf("storage: put: first message is not the header: %w", base.ErrInvalidArgument))
	}
	req := putHeaderFromProto(hdr)
	if err := errors.Join(checkOperationID(req.OperationID), checkKey("key", req.Key)); err != nil {
		return base.StatusFromError(fmt.Errorf("storage: put: %w", err))
	}
	if req.Size < -1 {
		return base.StatusFromError(fmt.Errorf("storage: put: size %d: %w", req.Size, base.ErrInvalidArgument))
	}
	info, err := s.impl.Put(ctx, req, &putBody{ctx: ctx, stream: stream, size: req.Size})
	if err != nil {
		return base.StatusFromError(err)
	}
	if info == nil {
		return base.StatusFromError(fmt.Errorf("storage: put: driver returned no object info: %w", base.ErrInternal))
	}
	return stream.SendAndClose(infoToProto(info))
}

// recvErr turns a failed Recv into the error the driver sees: the
// caller's cancellation as context.Canceled, anything else as is.
func recvErr(ctx context.Context, err error) error {
	if ctxErr := ctx.Err(); ctxErr != nil {
		return ctxErr
	}
	return err
}

var _ io.Reader = (*putBody)(nil)

// putBody is the io.Reader a driver's Put reads: the chunks of the stream.
type putBody struct {
	ctx      context.Context
	stream   storagepb.Storage_PutServer
	size     int64
	received int64
	pending  []byte
	err      error
}

func (b *putBody) Read(p []byte) (int, error) {
	for len(b.pending) == 0 {
		if b.err != nil {
			return 0, b.err
		}
		msg, err := b.stream.Recv()
		switch {
		case err == io.EOF:
			if b.size >= 0 && b.received != b.size {
				b.err = fmt.Errorf("storage: put body: ended after %d of %d bytes: %w", b.received, b.size, base.ErrInvalidArgument)
			} else {
				b.err = io.EOF
			}
			continue
		case err != nil:
			b.err = fmt.Errorf("storage: put body: %w", recvErr(b.ctx, err))
			continue
		}
		chunk := msg.GetChunk()
		switch {
		case msg.GetHeader() != nil:
			b.err = fmt.Errorf("storage: put body: second header: %w", base.ErrInvalidArgument)
		case len(chunk) > MaxChunkSize:
			b.err = fmt.Errorf("storage: put body: chunk of %d bytes exceeds %d: %w", len(chunk), MaxChunkSize, base.ErrInvalidArgument)
		case b.size >= 0 && b.received+int64(len(chunk)) > b.size:
			b.err = fmt.Errorf("storage: put body: longer than the declared %d bytes: %w", b.size, base.ErrInvalidArgument)
		default:
			b.received += int64(len(chunk))
			b.pending = chunk
		}
	}
	n := copy(p, b.pending)
	b.pending = b.pending[n:]
	return n, nil
}

// Get implements storagepb.StorageServer. A ranged request is served by
// the driver's GetRange when it has one, else by reading the object from
// its start and dropping the bytes before the range.
func (s *Server) Get(req *storagepb.GetRequest, stream storagepb.Storage_GetServer) error {
	ctx := stream.Context()
	key := req.GetKey()
	if err := checkKey("key", key); err != nil {
		return base.StatusFromError(fmt.Errorf("storage: get: %w", err))
	}
	var (
		obj *Object
		err error
		rng *storagepb.ByteRange
	)
	if req.GetRange() != nil {
		r := rangeFromProto(req.GetRange())
		if err := r.Check(); err != nil {
			return base.StatusFromError(fmt.Errorf("storage: get %q: %w", key, err))
		}
		obj, err = GetRange(ctx, s.impl, key, r)
		if err == nil && obj != nil {
			rng = &storagepb.ByteRange{Offset: r.Offset, Length: r.Clip(obj.Info.Size)}
		}
	} else {
		obj, err = s.impl.Get(ctx, key)
	}
	if err != nil {
		return base.StatusFromError(err)
	}
	if obj == nil || obj.Body == nil {
		return base.StatusFromError(fmt.Errorf("storage: get %q: driver returned no body: %w", key, base.ErrInternal))
	}
	defer func() { _ = obj.Body.Close() }()
	want, of := obj.Info.Size, "its info"
	if rng != nil {
		want, of = rng.GetLength(), "the range"
	}
	if err := stream.Send(&storagepb.GetMessage{Msg: &storagepb.GetMessage_Info{Info: infoToProto(&obj.Info)}, Range: rng}); err != nil {
		return err
	}
	var sent int64
	for {
		// A fresh buffer per chunk: gRPC may still hold the last message.
		buf := make([]byte, min(ChunkSize, max(want-sent, 1)))
		n, rerr := io.ReadFull(obj.Body, buf)
		if n > 0 {
			sent += int64(n)
			if sent > want {
				return base.StatusFromError(fmt.Errorf("storage: get %q: body longer than the %d bytes of %s: %w", key, want, of, base.ErrInternal))
			}
			if err := stream.Send(&storagepb.GetMessage{Msg: &storagepb.GetMessage_Chunk{Chunk: buf[:n]}}); err != nil {
				return err
			}
		}
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			break
		}
		if rerr != nil {
			return base.StatusFromError(fmt.Errorf("storage: get %q: reading body: %w", key, recvErr(ctx, rerr)))
		}
	}
	if sent != want {
		return base.StatusFromError(fmt.Errorf("storage: get %q: body ended after %d of %d bytes: %w", key, sent, want, base.ErrInternal))
	}
	return nil
}

// Stat implements storagepb.StorageServer.
func (s *Server) Stat(ctx context.Context, req *storagepb.StatRequest) (*storagepb.ObjectInfo, error) {
	if err := checkKey("key", req.GetKey()); err != nil {
		return nil, base.StatusFromError(fmt.Errorf("storage: stat: %w", err))
	}
	info, err := s.impl.Stat(ctx, req.GetKey())
	if err != nil {
		return nil, base.StatusFromError(err)
	}
	if info == nil {
		return nil, base.StatusFromError(fmt.Errorf("storage: stat: driver returned nothing: %w", base.ErrInternal))
	}
	return infoToProto(info), nil
}

// Delete implements storagepb.StorageServer.
func (s *Server) Delete(ctx context.Context, req *storagepb.DeleteRequest) (*storagepb.DeleteResponse, error) {
	r := deleteFromProto(req)
	if err := errors.Join(checkOperationID(r.OperationID), checkKey("key", r.Key)); err != nil {
		return nil, base.StatusFromError(fmt.Errorf("storage: delete: %w", err))
	}
	if err := s.impl.Delete(ctx, r); err != nil {
		return nil, base.StatusFromError(err)
	}
	return &storagepb.DeleteResponse{}, nil
}

// Copy implements storagepb.StorageServer.
func (s *Server) Copy(ctx context.Context, req *storagepb.CopyRequest) (*storagepb.ObjectInfo, error) {
	r := copyFromProto(req)
	if err := errors.Join(checkOperationID(r.OperationID), checkKey("source key", r.SourceKey), checkKey("dest key", r.DestKey)); err != nil {
		return nil, base.StatusFromError(fmt.Errorf("storage: copy: %w", err))
	}
	info, err := s.impl.Copy(ctx, r)
	if err != nil {
		return nil, base.StatusFromError(err)
	}
	if info == nil {
		return nil, base.StatusFromError(fmt.Errorf("storage: copy: driver returned nothing: %w", base.ErrInternal))
	}
	return infoToProto(info), nil
}

// List implements storagepb.StorageServer.
func (s *Server) List(ctx context.Context, req *storagepb.ListRequest) (*storagepb.ListResponse, error) {
	r := listFromProto(req)
	if r.Limit < 0 {
		return nil, base.StatusFromError(fmt.Errorf("storage: list: limit %d: %w", r.Limit, base.ErrInvalidArgument))
	}
	page, err := s.impl.List(ctx, r)
	if err != nil {
		return nil, base.StatusFromError(err)
	}
	if page == nil {
		return nil, base.StatusFromError(fmt.Errorf("storage: list: driver returned nothing: %w", base.ErrInternal))
	}
	return pageToProto(page), nil
}

func (s *Server) presign(ctx context.Context, method string, req *storagepb.PresignRequest) (*storagepb.PresignedURL, error) {
	p, ok := s.impl.(Presigner)
	if !ok {
		return nil, base.StatusFromError(fmt.Errorf("storage: presign %s: driver cannot presign: %w", method, base.ErrUnimplemented))
	}
	r := presignFromProto(req)
	if err := checkKey("key", r.Key); err != nil {
		return nil, base.StatusFromError(fmt.Errorf("storage: presign %s: %w", method, err))
	}
	if r.Expiry <= 0 {
		return nil, base.StatusFromError(fmt.Errorf("storage: presign %s: expiry %s: %w", method, r.Expiry, base.ErrInvalidArgument))
	}
	var (
		u   *PresignedURL
		err error
	)
	if method == "GET" {
		u, err = p.PresignGet(ctx, r)
	} else {
		u, err = p.PresignPut(ctx, r)
	}
	if err != nil {
		return nil, base.StatusFromError(err)
	}
	if u == nil {
		return nil, base.StatusFromError(fmt.Errorf("storage: presign %s: driver returned nothing: %w", method, base.ErrInternal))
	}
	return presignedToProto(u), nil
}

// PresignGet implements storagepb.StorageServer.
func (s *Server) PresignGet(ctx context.Context, req *storagepb.PresignRequest) (*storagepb.PresignedURL, error) {
	return s.presign(ctx, "GET", req)
}

// PresignPut implements storagepb.StorageServer.
func (s *Server) PresignPut(ctx context.Context, req *storagepb.PresignRequest) (*storagepb.PresignedURL, error) {
	return s.presign(ctx, "PUT", req)
}
