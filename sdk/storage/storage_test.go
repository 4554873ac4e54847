package storage_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	plugin "github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/storage"
	storagepb "github.com/gpuaas/gpuaas/sdk/storage/proto"
)

// lyingStore serves objects whose bodies disagree with their info, and
// presigns URLs.
type lyingStore struct {
	storage.Driver // nil: calls the test does not make panic
	body           []byte
	size           int64
	putSeen        chan []byte
}

var (
	_ storage.Driver    = (*lyingStore)(nil)
	_ storage.Presigner = (*lyingStore)(nil)
)

func (l *lyingStore) Info(context.Context) (*base.Info, error) {
	return &base.Info{Name: "lying", Kind: base.KindStorage, DriverVersion: "0.0.1", APIVersions: storage.SupportedAPIVersions()}, nil
}

func (l *lyingStore) Get(_ context.Context, key string) (*storage.Object, error) {
	return &storage.Object{Info: storage.ObjectInfo{Key: key, Size: l.size}, Body: io.NopCloser(bytes.NewReader(l.body))}, nil
}

func (l *lyingStore) Put(_ context.Context, req *storage.PutRequest, body io.Reader) (*storage.ObjectInfo, error) {
	b, err := io.ReadAll(body)
	if err != nil {
		return nil, err
	}
	l.putSeen <- b
	return &storage.ObjectInfo{Key: req.Key, Size: int64(len(b))}, nil
}

func (l *lyingStore) PresignGet(_ context.Context, req *storage.PresignRequest) (*storage.PresignedURL, error) {
	return &storage.PresignedURL{URL: "https://s3.example/" + req.Key + "?sig=x", Method: "GET", ExpiresAt: time.Unix(2000000000, 0).UTC()}, nil
}

func (l *lyingStore) PresignPut(_ context.Context, req *storage.PresignRequest) (*storage.PresignedURL, error) {
	return &storage.PresignedURL{URL: "https://s3.example/" + req.Key + "?sig=y", Method: "PUT", ExpiresAt: time.Unix(2000000000, 0).UTC(),
		Header: map[string]string{"Content-Type": req.ContentType}}, nil
}

func connect(t *testing.T, d storage.Driver) *storage.Client {
	t.Helper()
	client, server := plugin.TestPluginGRPCConn(t, false, plugin.PluginSet{"storage": &storage.Plugin{Impl: d}})
	t.Cleanup(func() { server.Stop(); _ = client.Close() }) // this order: Close stops the server too
	raw, err := client.Dispense("storage")
	if err != nil {
		t.Fatal(err)
	}
	return raw.(*storage.Client)
}

func readAll(t *testing.T, c *storage.Client) ([]byte, error) {
	t.Helper()
	obj, err := c.Get(context.Background(), "k")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = obj.Body.Close() }()
	return io.ReadAll(obj.Body)
}

func TestGetBodyMustMatchInfo(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name string
		body int
		size int64
		want string
	}{
		{"exact", 3*storage.ChunkSize + 1, 3*storage.ChunkSize + 1, ""},
		{"shorter than info", 100, 200, "ended after 100 of 200 bytes"},
		{"longer than info", 300, 200, "body longer than the 200 bytes of its info"},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			body := bytes.Repeat([]byte("x"), c.body)
			got, err := readAll(t, connect(t, &lyingStore{body: body, size: c.size}))
			if c.want == "" {
				if err != nil || !bytes.Equal(got, body) {
					t.Fatalf("got %d bytes, %v", len(got), err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want %q", err, c.want)
			}
		})
	}
}

func TestPresignOverTheWire(t *testing.T) {
	t.Parallel()
	c := connect(t, &lyingStore{})
	ctx := context.Background()
	info, err := c.Info(ctx)
	if err != nil || !info.HasCapability(base.CapabilityPresign) {
		t.Fatalf("Info = %+v, %v; want the presign capability", info, err)
	}
	u, err := c.PresignPut(ctx, &storage.PresignRequest{Key: "a/b", Expiry: time.Minute, ContentType: "text/plain"})
	if err != nil || u.Method != "PUT" || u.Header["Content-Type"] != "text/plain" || !u.ExpiresAt.Equal(time.Unix(2000000000, 0)) {
		t.Fatalf("PresignPut = %+v, %v", u, err)
	}
	_, err = c.PresignGet(ctx, &storage.PresignRequest{Key: "a/b"})
	if !errors.Is(err, base.ErrInvalidArgument) {
		t.Fatalf("PresignGet without expiry: got %v, want ErrInvalidArgument", err)
	}
}

// rogue is a storage server that breaks the stream framing.
type rogue struct {
	storagepb.UnimplementedStorageServer
}

var _ storagepb.StorageServer = rogue{}

func (rogue) Get(_ *storagepb.GetRequest, s storagepb.Storage_GetServer) error {
	const n = storage.MaxChunkSize + 1
	if err := s.Send(&storagepb.GetMessage{Msg: &storagepb.GetMessage_Info{Info: &storagepb.ObjectInfo{Key: "k", Size: n}}}); err != nil {
		return err
	}
	return s.Send(&storagepb.GetMessage{Msg: &storagepb.GetMessage_Chunk{Chunk: make([]byte, n)}})
}

func TestClientRefusesOversizedChunks(t *testing.T) {
	t.Parallel()
	conn, server := plugin.TestGRPCConn(t, func(s *grpc.Server) { storagepb.RegisterStorageServer(s, rogue{}) })
	t.Cleanup(func() { _ = conn.Close(); server.Stop() })
	got, err := readAll(t, storage.NewClient(conn, context.Background()))
	if err == nil || !strings.Contains(err.Error(), "exceeds") {
		t.Fatalf("read %d bytes, %v; want a refused chunk", len(got), err)
	}
}

func TestServerRefusesBadPutFraming(t *testing.T) {
	t.Parallel()
	l := &lyingStore{putSeen: make(chan []byte, 1)}
	conn, server := plugin.TestGRPCConn(t, func(s *grpc.Server) { storagepb.RegisterStorageServer(s, storage.NewServer(l)) })
	t.Cleanup(func() { _ = conn.Close(); server.Stop() })
	rpc := storagepb.NewStorageClient(conn)
	header := &storagepb.PutMessage{Msg: &storagepb.PutMessage_Header{Header: &storagepb.PutHeader{OperationId: "op", Key: "k", Size: -1}}}
	chunk := func(n int) *storagepb.PutMessage {
		return &storagepb.PutMessage{Msg: &storagepb.PutMessage_Chunk{Chunk: make([]byte, n)}}
	}
	for _, c := range []struct {
		name string
		msgs []*storagepb.PutMessage
		want string
	}{
		{"chunk before header", []*storagepb.PutMessage{chunk(1)}, "first message is not the header"},
		{"two headers", []*storagepb.PutMessage{header, chunk(1), header}, "second header"},
		{"oversized chunk", []*storagepb.PutMessage{header, chunk(storage.MaxChunkSize + 1)}, "exceeds"},
		{"no operation id", []*storagepb.PutMessage{{Msg: &storagepb.PutMessage_Header{Header: &storagepb.PutHeader{Key: "k", Size: -1}}}}, "operation id: empty"},
	} {
		t.Run(c.name, func(t *testing.T) {
			ctx := context.Background()
			stream, err := rpc.Put(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for _, m := range c.msgs {
				if err := stream.Send(m); err != nil {
					break
				}
			}
			_, err = stream.CloseAndRecv()
			err = base.ErrorFromStatus(ctx, context.Background(), err)
			if !errors.Is(err, base.ErrInvalidArgument) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want ErrInvalidArgument with %q", err, c.want)
			}
			select {
			case b := <-l.putSeen:
				t.Fatalf("the driver stored %d bytes of a broken stream", len(b))
			default:
			}
		})
	}
}

// bytesStore serves one object from memory, with or without the range
// capability; ranged counts the GetRange calls it served.
type bytesStore struct {
	storage.Driver // nil: calls the test does not make panic
	body           []byte
}

func (b *bytesStore) Info(context.Context) (*base.Info, error) {
	return &base.Info{Name: "bytes", Kind: base.KindStorage, DriverVersion: "0.0.1", APIVersions: storage.SupportedAPIVersions()}, nil
}

func (b *bytesStore) Get(_ context.Context, key string) (*storage.Object, error) {
	return &storage.Object{Info: storage.ObjectInfo{Key: key, Size: int64(len(b.body))}, Body: io.NopCloser(bytes.NewReader(b.body))}, nil
}

type rangedStore struct {
	bytesStore
	ranged int
}

var _ storage.RangeGetter = (*rangedStore)(nil)

func (r *rangedStore) GetRange(_ context.Context, key string, rg storage.Range) (*storage.Object, error) {
	r.ranged++
	off := min(rg.Offset, int64(len(r.body)))
	return &storage.Object{Info: storage.ObjectInfo{Key: key, Size: int64(len(r.body))},
		Body: io.NopCloser(bytes.NewReader(r.body[off : off+rg.Clip(int64(len(r.body)))]))}, nil
}

// legacyServer is the server of a plugin built before ranges: it ignores
// the range of a Get and sends the whole object.
type legacyServer struct{ *storage.Server }

func (l legacyServer) Get(req *storagepb.GetRequest, s storagepb.Storage_GetServer) error {
	return l.Server.Get(&storagepb.GetRequest{Key: req.GetKey()}, s)
}

// Ranged reads return the same bytes whether the driver reads ranges
// itself, the SDK's server cuts them from the whole object, or the client
// does because the plugin predates ranges.
func TestGetRangeOverTheWire(t *testing.T) {
	t.Parallel()
	body := make([]byte, 3*storage.ChunkSize+123)
	for i := range body {
		body[i] = byte(i * 7)
	}
	size := int64(len(body))
	ranged := &rangedStore{bytesStore: bytesStore{body: body}}
	legacyConn, legacy := plugin.TestGRPCConn(t, func(s *grpc.Server) {
		storagepb.RegisterStorageServer(s, legacyServer{storage.NewServer(&bytesStore{body: body})})
	})
	t.Cleanup(func() { _ = legacyConn.Close(); legacy.Stop() })
	clients := map[string]*storage.Client{
		"driver reads ranges": connect(t, ranged),
		"server cuts ranges":  connect(t, &bytesStore{body: body}),
		"client cuts ranges":  storage.NewClient(legacyConn, context.Background()),
	}
	for name, c := range clients {
		t.Run(name, func(t *testing.T) {
			for _, r := range []storage.Range{
				{Offset: 0, Length: storage.ToEnd},
				{Offset: 0, Length: 1},
				{Offset: storage.ChunkSize - 1, Length: 2},
				{Offset: size - 10, Length: storage.ToEnd},
				{Offset: size - 10, Length: 100},
				{Offset: 12345, Length: 2 * storage.ChunkSize},
				{Offset: size, Length: storage.ToEnd},
				{Offset: size + 5, Length: 3},
			} {
				obj, err := c.GetRange(context.Background(), "k", r)
				if err != nil {
					t.Fatalf("GetRange(%+v): %v", r, err)
				}
				got, err := io.ReadAll(obj.Body)
				_ = obj.Body.Close()
				off := min(r.Offset, size)
				want := body[off : off+r.Clip(size)]
				if err != nil || !bytes.Equal(got, want) || obj.Info.Size != size {
					t.Fatalf("GetRange(%+v): %d bytes (%v), info size %d; want %d bytes of %d", r, len(got), err, obj.Info.Size, len(want), size)
				}
			}
			for _, r := range []storage.Range{{Offset: -1, Length: 1}, {Offset: 0, Length: 0}, {Offset: 0, Length: -2}} {
				if _, err := c.GetRange(context.Background(), "k", r); !errors.Is(err, base.ErrInvalidArgument) {
					t.Errorf("GetRange(%+v): %v; want ErrInvalidArgument", r, err)
				}
			}
		})
	}
	if ranged.ranged == 0 {
		t.Error("the driver's GetRange was never called")
	}
	info, err := clients["driver reads ranges"].Info(context.Background())
	if err != nil || !info.HasCapability(base.CapabilityRange) {
		t.Errorf("Info = %+v, %v; want the range capability", info, err)
	}
}
