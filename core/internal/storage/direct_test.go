package storage

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/sdk/base"
	sdkstorage "github.com/gpuaas/gpuaas/sdk/storage"
)

// streamDriver serves Get itself and presigns URLs to a store that serves
// one object with http.ServeContent (Range, ETag, Last-Modified).
type streamDriver struct {
	sdkstorage.Driver
	store    *httptest.Server
	noSign   bool
	gets     atomic.Int64
	presigns atomic.Int64
}

func (d *streamDriver) Get(_ context.Context, key string) (*sdkstorage.Object, error) {
	d.gets.Add(1)
	return &sdkstorage.Object{Info: sdkstorage.ObjectInfo{Key: key, Size: int64(len(content))}, Body: io.NopCloser(bytes.NewReader(content))}, nil
}

func (d *streamDriver) PresignGet(_ context.Context, req *sdkstorage.PresignRequest) (*sdkstorage.PresignedURL, error) {
	if d.noSign {
		return nil, base.ErrUnimplemented
	}
	d.presigns.Add(1)
	return &sdkstorage.PresignedURL{URL: d.store.URL + "/" + req.Key + "?X-Amz-Signature=abc", Method: http.MethodGet, ExpiresAt: time.Now().Add(req.Expiry)}, nil
}

func (d *streamDriver) PresignPut(context.Context, *sdkstorage.PresignRequest) (*sdkstorage.PresignedURL, error) {
	return nil, base.ErrUnimplemented
}

var content = bytes.Repeat([]byte("0123456789abcdef"), 4096) // 64 KiB

func newStreamDriver(t *testing.T) *streamDriver {
	t.Helper()
	store := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Query().Get("X-Amz-Signature") != "abc":
			http.Error(w, "<Error><Code>AccessDenied</Code></Error>", http.StatusForbidden)
		case r.URL.Path == "/missing":
			http.Error(w, "<Error><Code>NoSuchKey</Code></Error>", http.StatusNotFound)
		default:
			w.Header().Set("ETag", `"etag-1"`)
			w.Header().Set("Content-Type", "application/x-test")
			http.ServeContent(w, r, "", time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC), bytes.NewReader(content))
		}
	}))
	t.Cleanup(store.Close)
	return &streamDriver{store: store}
}

func read(t *testing.T, obj *sdkstorage.Object) []byte {
	t.Helper()
	defer obj.Body.Close()
	b, err := io.ReadAll(obj.Body)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestDirectDownloads runs through the http client and through the relay
// (a connection of its own per download, whose body can splice itself).
func TestDirectDownloads(t *testing.T) {
	for _, c := range []struct {
		name string
		dial func(context.Context, string, string) (net.Conn, error)
	}{{"client", nil}, {"relay", directDial}} {
		t.Run(c.name, func(t *testing.T) { testDirectDownloads(t, c.dial) })
	}
}

func testDirectDownloads(t *testing.T, dial func(context.Context, string, string) (net.Conn, error)) {
	ctx := t.Context()
	drv := newStreamDriver(t)
	d := direct{Driver: drv, ps: drv, client: newDirectClient(), dial: dial, off: &atomic.Bool{}}

	obj, err := d.Get(ctx, "obj")
	if err != nil {
		t.Fatal(err)
	}
	if got := read(t, obj); !bytes.Equal(got, content) || obj.Info.Size != int64(len(content)) || obj.Info.ETag != `"etag-1"` ||
		obj.Info.ContentType != "application/x-test" || obj.Info.ModTime.IsZero() {
		t.Fatalf("whole object: %d bytes, info %+v", len(got), obj.Info)
	}
	for _, r := range []sdkstorage.Range{{Offset: 100, Length: 50}, {Offset: 65000, Length: sdkstorage.ToEnd}, {Offset: 65530, Length: 100}} {
		obj, err := sdkstorage.GetRange(ctx, d, "obj", r)
		if err != nil {
			t.Fatalf("%+v: %v", r, err)
		}
		want := content[r.Offset : r.Offset+r.Clip(int64(len(content)))]
		if got := read(t, obj); !bytes.Equal(got, want) || obj.Info.Size != int64(len(content)) {
			t.Fatalf("range %+v: %d bytes (want %d), size %d", r, len(got), len(want), obj.Info.Size)
		}
	}
	// Past the end: what the driver says (an empty body).
	obj, err = sdkstorage.GetRange(ctx, d, "obj", sdkstorage.Range{Offset: 1 << 20, Length: 10})
	if err != nil || len(read(t, obj)) != 0 {
		t.Fatalf("range past the end: %v", err)
	}
	if _, err := d.Get(ctx, "missing"); !errors.Is(err, base.ErrNotFound) {
		t.Fatalf("missing object: %v; want ErrNotFound", err)
	}
	if n := drv.gets.Load(); n != 1 {
		t.Fatalf("the driver streamed %d reads; want only the one past the end", n)
	}

	// A refused signature is the store's answer, not a fallback.
	bad := &streamDriver{store: drv.store}
	refusing := direct{Driver: bad, ps: signWith{bad, "wrong"}, client: newDirectClient(), dial: dial, off: &atomic.Bool{}}
	if _, err := refusing.Get(ctx, "obj"); !errors.Is(err, base.ErrPermissionDenied) {
		t.Fatalf("refused URL: %v; want ErrPermissionDenied", err)
	}

	// A driver that cannot presign streams, and is not asked again.
	plain := newStreamDriver(t)
	plain.noSign = true
	off := &atomic.Bool{}
	p := direct{Driver: plain, ps: plain, client: newDirectClient(), dial: dial, off: off}
	for range 2 {
		obj, err := p.Get(ctx, "obj")
		if err != nil || !bytes.Equal(read(t, obj), content) {
			t.Fatalf("fallback: %v", err)
		}
	}
	if plain.gets.Load() != 2 || !off.Load() {
		t.Fatalf("fallback: %d streamed reads, off %v", plain.gets.Load(), off.Load())
	}
}

// signWith presigns URLs with another signature.
type signWith struct {
	*streamDriver
	sig string
}

func (s signWith) PresignGet(_ context.Context, req *sdkstorage.PresignRequest) (*sdkstorage.PresignedURL, error) {
	return &sdkstorage.PresignedURL{URL: s.store.URL + "/" + req.Key + "?X-Amz-Signature=" + s.sig}, nil
}

func TestDirectRefusesOddURLs(t *testing.T) {
	drv := newStreamDriver(t)
	for _, u := range []string{"file:///etc/passwd", "gopher://x/", "::"} {
		d := direct{Driver: drv, ps: fixedURL{drv, u}, client: newDirectClient(), off: &atomic.Bool{}}
		if _, err := d.Get(t.Context(), "obj"); err == nil || !strings.Contains(err.Error(), "not an http(s) URL") {
			t.Errorf("%q: %v", u, err)
		}
	}
}

type fixedURL struct {
	*streamDriver
	u string
}

func (f fixedURL) PresignGet(context.Context, *sdkstorage.PresignRequest) (*sdkstorage.PresignedURL, error) {
	return &sdkstorage.PresignedURL{URL: f.u}, nil
}

// partStore is an S3-like store of multipart uploads: part PUTs land in
// memory, Complete assembles them.
type partStore struct {
	streamDriver
	srv      *httptest.Server
	mu       sync.Mutex
	parts    map[int][]byte
	done     []byte
	aborted  int
	complete int
}

func newPartStore(t *testing.T) *partStore {
	p := &partStore{parts: map[int][]byte{}}
	p.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n, _ := strconv.Atoi(r.URL.Query().Get("partNumber"))
		b, err := io.ReadAll(r.Body)
		if err != nil || r.Method != http.MethodPut || int64(len(b)) != r.ContentLength {
			http.Error(w, "bad part", http.StatusBadRequest)
			return
		}
		p.mu.Lock()
		p.parts[n] = b
		p.mu.Unlock()
		w.Header().Set("ETag", fmt.Sprintf(`"part-%d"`, n))
	}))
	t.Cleanup(p.srv.Close)
	return p
}

func (p *partStore) Put(context.Context, *sdkstorage.PutRequest, io.Reader) (*sdkstorage.ObjectInfo, error) {
	return nil, errors.New("the streamed Put was used")
}

func (p *partStore) StartMultipart(context.Context, *sdkstorage.StartMultipartRequest) (string, error) {
	return "up-1", nil
}

func (p *partStore) PresignPart(_ context.Context, req *sdkstorage.PresignPartRequest) (*sdkstorage.PresignedURL, error) {
	return &sdkstorage.PresignedURL{URL: fmt.Sprintf("%s/%s?uploadId=%s&partNumber=%d", p.srv.URL, req.Key, req.UploadID, req.PartNumber), Method: http.MethodPut}, nil
}

func (p *partStore) CompleteMultipart(_ context.Context, req *sdkstorage.CompleteMultipartRequest) (*sdkstorage.ObjectInfo, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.complete++
	var all []byte
	for i, pt := range req.Parts {
		if pt.Number != i+1 || pt.ETag != fmt.Sprintf(`"part-%d"`, i+1) {
			return nil, fmt.Errorf("part %d: %+v", i, pt)
		}
		all = append(all, p.parts[pt.Number]...)
	}
	p.done = all
	return &sdkstorage.ObjectInfo{Key: req.Key, Size: int64(len(all))}, nil
}

func (p *partStore) AbortMultipart(context.Context, *sdkstorage.AbortMultipartRequest) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.aborted++
	return nil
}

// failAfter fails a body after n bytes (a client that went away).
type failAfter struct {
	r io.Reader
	n int
}

func (f *failAfter) Read(b []byte) (int, error) {
	if f.n <= 0 {
		return 0, errors.New("client went away")
	}
	if len(b) > f.n {
		b = b[:f.n]
	}
	n, err := f.r.Read(b)
	f.n -= n
	return n, err
}

func TestDirectMultipartUploads(t *testing.T) {
	ctx := t.Context()
	p := newPartStore(t)
	d := direct{Driver: p, ps: p, client: newDirectClient(), off: &atomic.Bool{}, mpOff: &atomic.Bool{}}
	data := bytes.Repeat([]byte("gpuaas-direct-"), (3*directPartSize+12345)/14)
	info, err := d.Put(ctx, &sdkstorage.PutRequest{OperationID: "op-1", Key: "big", Size: int64(len(data))}, bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	if info.Size != int64(len(data)) || !bytes.Equal(p.done, data) || len(p.parts) != 4 {
		t.Fatalf("uploaded %d bytes in %d parts; want %d bytes in 4", len(p.done), len(p.parts), len(data))
	}

	// A body that fails half-way aborts the upload and completes nothing.
	p2 := newPartStore(t)
	d2 := direct{Driver: p2, ps: p2, client: newDirectClient(), off: &atomic.Bool{}, mpOff: &atomic.Bool{}}
	_, err = d2.Put(ctx, &sdkstorage.PutRequest{OperationID: "op-2", Key: "broken", Size: int64(len(data))},
		&failAfter{r: bytes.NewReader(data), n: directPartSize + 10})
	if err == nil || !strings.Contains(err.Error(), "client went away") || p2.aborted != 1 || p2.complete != 0 {
		t.Fatalf("broken body: %v, %d aborts, %d completes; want the body's error, 1 abort, 0 completes", err, p2.aborted, p2.complete)
	}

	// Small uploads and uploads of unknown size stream through the driver.
	for _, size := range []int64{directPutMin - 1, -1} {
		if _, err := d.Put(ctx, &sdkstorage.PutRequest{OperationID: "op-3", Key: "small", Size: size}, bytes.NewReader(nil)); err == nil ||
			!strings.Contains(err.Error(), "streamed Put") {
			t.Fatalf("size %d: %v; want the driver's streamed Put", size, err)
		}
	}
}
