package s3store_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/hashicorp/go-hclog"

	s3store "github.com/gpuaas/gpuaas/plugins/storage-s3"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/storage"
)

const mib = 1 << 20

// genReader yields n pseudo-random bytes from a fixed seed, hashing them as
// it goes, without holding them.
type genReader struct {
	rng  *rand.ChaCha8
	left int64
	sum  hashWriter
}

type hashWriter interface {
	io.Writer
	Sum([]byte) []byte
}

func newGenReader(seed byte, n int64) *genReader {
	return &genReader{rng: rand.NewChaCha8([32]byte{seed}), left: n, sum: sha256.New()}
}

func (g *genReader) Read(p []byte) (int, error) {
	if g.left == 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > g.left {
		p = p[:g.left]
	}
	n, _ := g.rng.Read(p)
	g.left -= int64(n)
	_, _ = g.sum.Write(p[:n])
	return n, nil
}

// peakHeap samples the heap while it runs; stop returns the highest
// HeapAlloc seen above the level at the start (after a GC).
func peakHeap() (stop func() uint64) {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	baseline := ms.HeapAlloc
	done := make(chan struct{})
	result := make(chan uint64, 1)
	go func() {
		peak := baseline
		tick := time.NewTicker(2 * time.Millisecond)
		defer tick.Stop()
		for {
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			peak = max(peak, ms.HeapAlloc)
			select {
			case <-done:
				result <- peak - baseline
				return
			case <-tick.C:
			}
		}
	}()
	return func() uint64 {
		close(done)
		return <-result
	}
}

// TestMultipartRoundTripBoundedMemory streams 40 MiB through Put in 5 MiB
// parts from a reader that generates it, and back through Get, and checks
// the content by hash and the driver's heap on both ways. Not parallel:
// the heap is the process's.
func TestMultipartRoundTripBoundedMemory(t *testing.T) {
	const partSize = 5 * mib
	setups := map[int]*setup{}
	for _, concurrency := range []int{1, 3} {
		setups[concurrency] = newSetup(t, map[string]any{"part_size_bytes": partSize, "upload_concurrency": concurrency})
	}
	for _, c := range []struct {
		name        string
		size        int64
		declared    bool
		concurrency int
	}{
		{"declared size", 40 * mib, true, 1},
		{"unknown size", 40*mib + 12345, false, 1},
		{"exactly one part", partSize, true, 1},
		{"one part, unknown size", partSize, false, 1},
		{"three parts at once", 40*mib + 1, true, 3},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := setups[c.concurrency]
			key := "big/" + strings.ReplaceAll(c.name, " ", "-")
			size := int64(-1)
			if c.declared {
				size = c.size
			}
			gen := newGenReader(7, c.size)
			stop := peakHeap()
			info, err := s.d.Put(s.ctx, &storage.PutRequest{OperationID: s.op(), Key: key, Size: size, ContentType: "application/x-test"}, gen)
			putPeak := stop()
			if err != nil {
				t.Fatalf("Put: %v", err)
			}
			if info.Size != c.size || info.ETag == "" || info.ContentType != "application/x-test" {
				t.Errorf("Put returned %+v, want size %d, an ETag and the content type", info, c.size)
			}
			// The parts in flight and the one being read, and as much
			// again for everything else.
			if limit := uint64(2 * (c.concurrency + 1) * partSize); putPeak > limit {
				t.Errorf("Put of %d bytes grew the heap by %d bytes at its peak, want under %d (%d parts)", c.size, putPeak, limit, limit/partSize)
			}
			t.Logf("Put: heap peak +%.1f MiB", float64(putPeak)/mib)

			stop = peakHeap()
			obj, err := s.d.Get(s.ctx, key)
			if err != nil {
				t.Fatalf("Get: %v", err)
			}
			got := sha256.New()
			n, err := io.Copy(got, obj.Body)
			_ = obj.Body.Close()
			getPeak := stop()
			if err != nil || n != c.size || obj.Info.Size != c.size {
				t.Fatalf("Get: read %d bytes (%v), info size %d, want %d", n, err, obj.Info.Size, c.size)
			}
			if !bytes.Equal(got.Sum(nil), gen.sum.Sum(nil)) {
				t.Fatal("the content read back differs from the content put (sha256)")
			}
			if limit := uint64(2 * partSize); getPeak > limit {
				t.Errorf("Get of %d bytes grew the heap by %d bytes at its peak, want under %d", c.size, getPeak, limit)
			}
			if ups := server.uploads(t, s.prefix); len(ups) != 0 {
				t.Errorf("%d incomplete multipart uploads left", len(ups))
			}
		})
	}
}

// failingReader yields n bytes, then calls at (once) and fails with what
// then returns.
type failingReader struct {
	n    int64
	at   func() error
	once sync.Once
	err  error
}

func (f *failingReader) Read(p []byte) (int, error) {
	if f.n > 0 {
		if int64(len(p)) > f.n {
			p = p[:f.n]
		}
		clear(p)
		f.n -= int64(len(p))
		return len(p), nil
	}
	f.once.Do(func() { f.err = f.at() })
	return 0, f.err
}

// TestFailedPutLeavesNothing checks that a Put that fails part way, in a
// multipart upload or before, leaves no object and no incomplete upload.
func TestFailedPutLeavesNothing(t *testing.T) {
	t.Parallel()
	for _, concurrency := range []int{1, 3} {
		t.Run(fmt.Sprintf("upload_concurrency=%d", concurrency), func(t *testing.T) {
			t.Parallel()
			testFailedPutLeavesNothing(t, newSetup(t, map[string]any{"part_size_bytes": 5 * mib, "upload_concurrency": concurrency}))
		})
	}
}

func testFailedPutLeavesNothing(t *testing.T, s *setup) {
	errBroken := errors.New("client went away")
	for _, c := range []struct {
		name string
		size int64
		sent int64
		// fail runs when the body has sent its bytes; it returns the
		// body's error. cancel cancels the Put's context.
		fail func(cancel func()) error
		want error
	}{
		{"cancelled mid-upload", -1, 22 * mib, func(cancel func()) error {
			cancel()
			return context.Canceled
		}, context.Canceled},
		{"cancelled while the first part fills", -1, 3 * mib, func(cancel func()) error {
			cancel()
			return context.Canceled
		}, context.Canceled},
		{"body fails mid-upload", -1, 22 * mib, func(func()) error { return errBroken }, errBroken},
		{"body shorter than declared", 20 * mib, 12 * mib, func(func()) error { return io.EOF }, base.ErrInvalidArgument},
		{"body longer than declared", 7 * mib, 12 * mib, func(func()) error { return io.EOF }, base.ErrInvalidArgument},
		{"small body longer than declared", 10, 11, func(func()) error { return io.EOF }, base.ErrInvalidArgument},
	} {
		t.Run(c.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(s.ctx)
			defer cancel()
			key := "failed/" + strings.ReplaceAll(c.name, " ", "-")
			body := &failingReader{n: c.sent, at: func() error { return c.fail(cancel) }}
			_, err := s.d.Put(ctx, &storage.PutRequest{OperationID: s.op(), Key: key, Size: c.size}, body)
			if !errors.Is(err, c.want) {
				t.Fatalf("Put: got %v, want an error matching %v", err, c.want)
			}
			if _, err := s.d.Stat(s.ctx, key); !errors.Is(err, base.ErrNotFound) {
				t.Errorf("Stat after the failed Put: got %v, want base.ErrNotFound", err)
			}
			if ups := server.uploads(t, s.prefix); len(ups) != 0 {
				t.Errorf("%d incomplete multipart uploads left after the failed Put", len(ups))
			}
		})
	}
}

func TestListPagination(t *testing.T) {
	t.Parallel()
	s := newSetup(t, nil)
	var want []string
	for i := range 25 {
		k := fmt.Sprintf("list/obj-%02d", i)
		want = append(want, k)
		s.put(t, k, []byte(k), "text/plain")
	}
	s.put(t, "list-outside", []byte("x"), "")
	s.put(t, "a-before", []byte("x"), "")

	for _, c := range []struct {
		name      string
		prefix    string
		limit     int
		wantPages []int
		wantKeys  []string
	}{
		{"limit 10", "list/", 10, []int{10, 10, 5}, want},
		{"limit 7", "list/", 7, []int{7, 7, 7, 4}, want},
		{"limit equal to the count", "list/", 25, []int{25}, want},
		{"default limit", "list/", 0, []int{25}, want},
		// The whole key prefix: the driver's operation records live there
		// too and must not show.
		// '-' sorts before '/'.
		{"everything", "", 10, []int{10, 10, 7}, slices.Concat([]string{"a-before", "list-outside"}, want)},
	} {
		t.Run(c.name, func(t *testing.T) {
			var got []string
			var pages []int
			token := ""
			for {
				page, err := s.d.List(s.ctx, &storage.ListRequest{Prefix: c.prefix, PageToken: token, Limit: c.limit})
				if err != nil {
					t.Fatalf("List: %v", err)
				}
				pages = append(pages, len(page.Objects))
				for _, o := range page.Objects {
					got = append(got, o.Key)
					if o.Size != int64(len(o.Key)) && o.Size != 1 || o.ETag == "" || o.ModTime.IsZero() {
						t.Errorf("List: %+v lacks its size, ETag or modification time", o)
					}
				}
				if page.NextPageToken == "" {
					break
				}
				if len(pages) > 10 {
					t.Fatal("List does not end")
				}
				token = page.NextPageToken
			}
			if !slices.Equal(pages, c.wantPages) {
				t.Errorf("page sizes %v, want %v", pages, c.wantPages)
			}
			if !slices.Equal(got, c.wantKeys) {
				t.Errorf("keys %q, want %q", got, c.wantKeys)
			}
		})
	}

	for _, c := range []struct {
		name string
		req  storage.ListRequest
	}{
		{"bad page token", storage.ListRequest{Prefix: "list/", PageToken: "!!not base64!!"}},
		{"reserved prefix", storage.ListRequest{Prefix: s3store.ReservedPrefix}},
		{"negative limit", storage.ListRequest{Limit: -1}},
	} {
		t.Run(c.name, func(t *testing.T) {
			if _, err := s.d.List(s.ctx, &c.req); !errors.Is(err, base.ErrInvalidArgument) {
				t.Errorf("List: got %v, want base.ErrInvalidArgument", err)
			}
		})
	}
}

func TestCopy(t *testing.T) {
	t.Parallel()
	s := newSetup(t, map[string]any{"part_size_bytes": 5 * mib})
	// Copies above 6 MiB go in 5 MiB parts, as above 5 GiB in production.
	s3store.SetCopyMultipart(s.d, 6*mib, 5*mib)
	for _, c := range []struct {
		name     string
		src, dst string
		size     int
	}{
		{"small", "copy/src", "copy/dst", 1000},
		{"keys with spaces, unicode and reserved URL characters", "copy/a b+ü%?#&=.bin", "copy/dir/ä c+%.bin", 1000},
		{"in parts", "copy/big-src", "copy/big-dst", 12*mib + 7},
		{"onto itself", "copy/self", "copy/self", 100},
	} {
		t.Run(c.name, func(t *testing.T) {
			data := randomBytes(t, c.size)
			src, err := s.d.Put(s.ctx, &storage.PutRequest{OperationID: s.op(), Key: c.src, Size: int64(len(data)),
				ContentType: "application/x-src", Metadata: map[string]string{"origin": "test"}}, bytes.NewReader(data))
			if err != nil {
				t.Fatalf("Put: %v", err)
			}
			op := s.op()
			info, err := s.d.Copy(s.ctx, &storage.CopyRequest{OperationID: op, SourceKey: c.src, DestKey: c.dst})
			if err != nil {
				t.Fatalf("Copy: %v", err)
			}
			if info.Key != c.dst || info.Size != src.Size || info.ContentType != "application/x-src" || info.Metadata["origin"] != "test" {
				t.Errorf("Copy returned %+v, want key %q, size %d, the source's content type and metadata", info, c.dst, src.Size)
			}
			if got := s.get(t, c.dst); !bytes.Equal(got, data) {
				t.Error("the copy's content differs from the source's")
			}
			if got := s.get(t, c.src); !bytes.Equal(got, data) {
				t.Error("the source changed")
			}
			again, err := s.d.Copy(s.ctx, &storage.CopyRequest{OperationID: op, SourceKey: c.src, DestKey: c.dst})
			if err != nil || again.ETag != info.ETag || !again.ModTime.Equal(info.ModTime) {
				t.Errorf("Copy retried: got %+v, %v, want the first result %+v", again, err, info)
			}
		})
	}
	t.Run("missing source", func(t *testing.T) {
		_, err := s.d.Copy(s.ctx, &storage.CopyRequest{OperationID: s.op(), SourceKey: "copy/missing", DestKey: "copy/x"})
		if !errors.Is(err, base.ErrNotFound) {
			t.Errorf("Copy: got %v, want base.ErrNotFound", err)
		}
	})
	if ups := server.uploads(t, s.prefix); len(ups) != 0 {
		t.Errorf("%d incomplete multipart uploads left", len(ups))
	}
}

func TestDeleteIdempotent(t *testing.T) {
	t.Parallel()
	s := newSetup(t, nil)
	s.put(t, "del/a", []byte("a"), "")
	op := s.op()
	for _, c := range []struct {
		name string
		req  storage.DeleteRequest
		want error
	}{
		{"existing", storage.DeleteRequest{OperationID: op, Key: "del/a"}, nil},
		{"retried", storage.DeleteRequest{OperationID: op, Key: "del/a"}, nil},
		{"missing", storage.DeleteRequest{OperationID: s.op(), Key: "del/never-was"}, nil},
		{"operation id reused for another key", storage.DeleteRequest{OperationID: op, Key: "del/b"}, base.ErrConflict},
		{"no operation id", storage.DeleteRequest{Key: "del/a"}, base.ErrInvalidArgument},
		{"reserved key", storage.DeleteRequest{OperationID: s.op(), Key: s3store.ReservedPrefix + "ops/x"}, base.ErrInvalidArgument},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := s.d.Delete(s.ctx, &c.req)
			if c.want == nil && err != nil || c.want != nil && !errors.Is(err, c.want) {
				t.Fatalf("Delete: got %v, want %v", err, c.want)
			}
		})
	}
	if _, err := s.d.Stat(s.ctx, "del/a"); !errors.Is(err, base.ErrNotFound) {
		t.Errorf("Stat after Delete: got %v, want base.ErrNotFound", err)
	}
}

// TestIdempotencyAcrossRestarts checks that the operation records outlive
// the process: a fresh driver answers a retried Put from the record, and
// finds a Put whose process died between writing the object and
// recording it.
func TestIdempotencyAcrossRestarts(t *testing.T) {
	t.Parallel()
	s := newSetup(t, nil)
	restarted := s3store.New(hclog.NewNullLogger())
	if err := configure(s.ctx, restarted, s.cfg); err != nil {
		t.Fatal(err)
	}
	unread := &failingReader{at: func() error { return errors.New("a retried Put must not read its body") }}
	put := func(d *s3store.Driver, op, key, contentType string, body io.Reader) (*storage.ObjectInfo, error) {
		return d.Put(s.ctx, &storage.PutRequest{OperationID: op, Key: key, Size: 5, ContentType: contentType}, body)
	}

	opA := s.op()
	first, err := put(s.d, opA, "idem/a", "text/plain", strings.NewReader("hello"))
	if err != nil {
		t.Fatal(err)
	}
	opB := s.op()
	crashed, err := put(s.d, opB, "idem/b", "text/plain", strings.NewReader("world"))
	if err != nil {
		t.Fatal(err)
	}
	// As if the process died after writing idem/b but before recording
	// the operation.
	sum := sha256.Sum256([]byte(opB))
	record := s.prefix + s3store.ReservedPrefix + "ops/" + hex.EncodeToString(sum[:])
	if _, err := s.raw.DeleteObject(s.ctx, &s3.DeleteObjectInput{Bucket: &server.Bucket, Key: &record}); err != nil {
		t.Fatal(err)
	}

	for _, c := range []struct {
		name        string
		op, key, ct string
		want        *storage.ObjectInfo
		wantErr     error
	}{
		{"recorded", opA, "idem/a", "text/plain", first, nil},
		{"written but not recorded", opB, "idem/b", "text/plain", crashed, nil},
		{"recorded, then retried", opB, "idem/b", "text/plain", crashed, nil},
		{"reused for another key", opA, "idem/c", "text/plain", nil, base.ErrConflict},
		{"reused with another content type", opA, "idem/a", "text/html", nil, base.ErrConflict},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, err := put(restarted, c.op, c.key, c.ct, unread)
			if c.wantErr != nil {
				if !errors.Is(err, c.wantErr) {
					t.Fatalf("Put: got %v, want %v", err, c.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Put retried: %v", err)
			}
			if got.Key != c.want.Key || got.ETag != c.want.ETag || got.Size != c.want.Size || !got.ModTime.Equal(c.want.ModTime) {
				t.Errorf("Put retried: got %+v, want the first result %+v", got, c.want)
			}
		})
	}
}

func TestMetadata(t *testing.T) {
	t.Parallel()
	s := newSetup(t, nil)
	for _, c := range []struct {
		name string
		meta map[string]string
		want error
	}{
		{"ascii", map[string]string{"owner": "alice", "project-id": "p-1"}, nil},
		{"unicode and spaces round-trip", map[string]string{"filename": " Grüße, 世界.txt ", "note": "=?looks encoded?="}, nil},
		{"upper case key", map[string]string{"Owner": "alice"}, base.ErrInvalidArgument},
		{"key with underscore", map[string]string{"owner_id": "1"}, base.ErrInvalidArgument},
		{"reserved key", map[string]string{"gpuaas-op": "x"}, base.ErrInvalidArgument},
		{"too large", map[string]string{"big": strings.Repeat("x", 2100)}, base.ErrInvalidArgument},
	} {
		t.Run(c.name, func(t *testing.T) {
			key := "meta/" + strings.ReplaceAll(c.name, " ", "-")
			_, err := s.d.Put(s.ctx, &storage.PutRequest{OperationID: s.op(), Key: key, Size: 1, Metadata: c.meta}, strings.NewReader("x"))
			if c.want != nil {
				if !errors.Is(err, c.want) {
					t.Fatalf("Put: got %v, want %v", err, c.want)
				}
				return
			}
			if err != nil {
				t.Fatalf("Put: %v", err)
			}
			st, err := s.d.Stat(s.ctx, key)
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(st.Metadata) != fmt.Sprint(c.meta) {
				t.Errorf("Stat metadata %q, want %q", st.Metadata, c.meta)
			}
			if st.ContentType != "application/octet-stream" {
				t.Errorf("content type %q, want application/octet-stream when the Put names none", st.ContentType)
			}
		})
	}
}

func TestReservedKeys(t *testing.T) {
	t.Parallel()
	s := newSetup(t, nil)
	key := s3store.ReservedPrefix + "ops/0000"
	calls := map[string]func() error{
		"Put": func() error {
			_, err := s.d.Put(s.ctx, &storage.PutRequest{OperationID: s.op(), Key: key, Size: 1}, strings.NewReader("x"))
			return err
		},
		"Get":  func() error { _, err := s.d.Get(s.ctx, key); return err },
		"Stat": func() error { _, err := s.d.Stat(s.ctx, key); return err },
		"Copy": func() error {
			_, err := s.d.Copy(s.ctx, &storage.CopyRequest{OperationID: s.op(), SourceKey: "x", DestKey: key})
			return err
		},
		"PresignPut": func() error {
			_, err := s.d.PresignPut(s.ctx, &storage.PresignRequest{Key: key, Expiry: time.Minute})
			return err
		},
	}
	for name, call := range calls {
		if err := call(); !errors.Is(err, base.ErrInvalidArgument) {
			t.Errorf("%s of %q: got %v, want base.ErrInvalidArgument", name, key, err)
		}
	}
}

func TestPresign(t *testing.T) {
	t.Parallel()
	now := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	s := newSetup(t, nil)
	clocked := s3store.New(hclog.NewNullLogger(), s3store.WithClock(func() time.Time { return now }))
	if err := configure(s.ctx, clocked, s.cfg); err != nil {
		t.Fatal(err)
	}
	data := randomBytes(t, 3000)
	s.put(t, "presign/get", data, "application/x-test")
	client := &http.Client{Timeout: 30 * time.Second}
	do := func(t *testing.T, u *storage.PresignedURL, body []byte) (int, []byte) {
		t.Helper()
		req, err := http.NewRequestWithContext(s.ctx, u.Method, u.URL, bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		if body == nil {
			req.Body = nil
		}
		for k, v := range u.Header {
			req.Header.Set(k, v)
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = resp.Body.Close() }()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return resp.StatusCode, b
	}

	t.Run("get", func(t *testing.T) {
		u, err := s.d.PresignGet(s.ctx, &storage.PresignRequest{Key: "presign/get", Expiry: 10 * time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		if u.Method != http.MethodGet {
			t.Errorf("method %q", u.Method)
		}
		if code, body := do(t, u, nil); code != http.StatusOK || !bytes.Equal(body, data) {
			t.Errorf("GET: %d, %d bytes (want 200 and the object's %d)", code, len(body), len(data))
		}
	})
	t.Run("get with a response content type", func(t *testing.T) {
		u, err := s.d.PresignGet(s.ctx, &storage.PresignRequest{Key: "presign/get", Expiry: time.Minute, ContentType: "text/csv"})
		if err != nil {
			t.Fatal(err)
		}
		resp, err := client.Get(u.URL)
		if err != nil {
			t.Fatal(err)
		}
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/csv" {
			t.Errorf("GET: %d with Content-Type %q, want 200 and text/csv", resp.StatusCode, resp.Header.Get("Content-Type"))
		}
	})
	t.Run("put", func(t *testing.T) {
		u, err := s.d.PresignPut(s.ctx, &storage.PresignRequest{Key: "presign/put", Expiry: 10 * time.Minute, ContentType: "text/plain"})
		if err != nil {
			t.Fatal(err)
		}
		if u.Method != http.MethodPut || u.Header["Content-Type"] != "text/plain" {
			t.Errorf("presigned PUT %+v, want method PUT and the Content-Type header to send", u)
		}
		if code, body := do(t, u, []byte("uploaded directly")); code != http.StatusOK {
			t.Fatalf("PUT: %d %s", code, body)
		}
		if got := s.get(t, "presign/put"); string(got) != "uploaded directly" {
			t.Errorf("the uploaded object holds %q", got)
		}
		if st, err := s.d.Stat(s.ctx, "presign/put"); err != nil || st.ContentType != "text/plain" {
			t.Errorf("Stat: %+v, %v, want content type text/plain", st, err)
		}
	})
	t.Run("put of a signed length", func(t *testing.T) {
		u, err := s.d.PresignPut(s.ctx, &storage.PresignRequest{Key: "presign/sized", Expiry: 10 * time.Minute, ContentLength: 10})
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(strings.ToLower(u.URL), "content-length") {
			t.Errorf("URL %s does not sign content-length", u.URL)
		}
		for _, body := range []string{"too long, far too long", "short"} {
			if code, _ := do(t, u, []byte(body)); code == http.StatusOK {
				t.Errorf("PUT of %d bytes with a URL signed for 10: %d, want a refusal", len(body), code)
			}
		}
		if _, err := s.d.Stat(s.ctx, "presign/sized"); !errors.Is(err, base.ErrNotFound) {
			t.Fatalf("Stat after refused PUTs: %v, want ErrNotFound", err)
		}
		if code, body := do(t, u, []byte("just right")); code != http.StatusOK {
			t.Fatalf("PUT of the signed length: %d %s", code, body)
		}
		if got := s.get(t, "presign/sized"); string(got) != "just right" {
			t.Errorf("the uploaded object holds %q", got)
		}
	})
	t.Run("tampered", func(t *testing.T) {
		u, err := s.d.PresignGet(s.ctx, &storage.PresignRequest{Key: "presign/get", Expiry: time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		u.URL = strings.Replace(u.URL, "presign/get", "presign/put", 1)
		if code, _ := do(t, u, nil); code != http.StatusForbidden {
			t.Errorf("GET of another key with the signature: %d, want 403", code)
		}
	})
	t.Run("expiry is capped", func(t *testing.T) {
		for _, c := range []struct {
			asked, want time.Duration
		}{
			{5 * time.Hour, time.Hour},
			{10 * time.Minute, 10 * time.Minute},
			{1500 * time.Millisecond, time.Second},
		} {
			u, err := clocked.PresignPut(s.ctx, &storage.PresignRequest{Key: "presign/x", Expiry: c.asked})
			if err != nil {
				t.Fatal(err)
			}
			if !u.ExpiresAt.Equal(now.Add(c.want)) {
				t.Errorf("asked %s: expires at %s, want %s", c.asked, u.ExpiresAt, now.Add(c.want))
			}
			if want := fmt.Sprintf("X-Amz-Expires=%d", int(c.want.Seconds())); !strings.Contains(u.URL, want) {
				t.Errorf("asked %s: URL %s lacks %s", c.asked, u.URL, want)
			}
		}
	})
	t.Run("expires", func(t *testing.T) {
		get, err := s.d.PresignGet(s.ctx, &storage.PresignRequest{Key: "presign/get", Expiry: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		put, err := s.d.PresignPut(s.ctx, &storage.PresignRequest{Key: "presign/late", Expiry: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(2100 * time.Millisecond)
		if code, _ := do(t, get, nil); code != http.StatusForbidden {
			t.Errorf("expired GET: %d, want 403", code)
		}
		if code, _ := do(t, put, []byte("late")); code != http.StatusForbidden {
			t.Errorf("expired PUT: %d, want 403", code)
		}
		if _, err := s.d.Stat(s.ctx, "presign/late"); !errors.Is(err, base.ErrNotFound) {
			t.Errorf("Stat after the expired PUT: %v, want base.ErrNotFound", err)
		}
	})
}

// TestConfigure covers the checks Configure makes beyond the schema and
// against the server.
func TestConfigure(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	closed, err := freeAddr()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name      string
		extra     map[string]any
		wantField string // a *base.ConfigError naming it
		want      error
		wantText  string
	}{
		{"ftp endpoint", map[string]any{"endpoint": "ftp://127.0.0.1:21"}, "endpoint", nil, "http or https"},
		{"endpoint with a path", map[string]any{"endpoint": server.Endpoint + "/s3"}, "endpoint", nil, "path"},
		{"endpoint with credentials", map[string]any{"endpoint": "http://user:pw@127.0.0.1:1"}, "endpoint", nil, "credentials"},
		{"not a URL", map[string]any{"endpoint": "127.0.0.1:9000"}, "endpoint", nil, ""},
		{"region with a space", map[string]any{"region": "us east"}, "region", nil, ""},
		{"missing region", map[string]any{"region": nil}, "region", nil, "required"},
		{"bad bucket name", map[string]any{"bucket": "Bad/Bucket"}, "bucket", nil, ""},
		{"part size below 5 MiB", map[string]any{"part_size_bytes": 4 * mib}, "part_size_bytes", nil, ""},
		{"part size above 5 GiB", map[string]any{"part_size_bytes": 6 << 30}, "part_size_bytes", nil, ""},
		{"key prefix without a trailing slash", map[string]any{"key_prefix": "gpuaas"}, "key_prefix", nil, "'/'"},
		{"absolute key prefix", map[string]any{"key_prefix": "/gpuaas/"}, "key_prefix", nil, ""},
		{"key prefix with dot-dot", map[string]any{"key_prefix": "a/../b/"}, "key_prefix", nil, ""},
		{"presign expiry above an hour", map[string]any{"presign_max_expiry": "2h"}, "presign_max_expiry", nil, ""},
		{"missing bucket", map[string]any{"bucket": "no-such-bucket-here"}, "bucket", nil, "does not exist"},
		{"wrong access key id", map[string]any{"access_key_id": "NOSUCHKEY"}, "", base.ErrUnauthenticated, "refused the credentials"},
		{"wrong secret", map[string]any{"secret_access_key": "wrong-secret-0123456789"}, "", base.ErrUnauthenticated, "refused the credentials"},
		{"unreachable endpoint", map[string]any{"endpoint": "http://" + closed}, "", base.ErrUnavailable, "cannot reach"},
	} {
		t.Run(c.name, func(t *testing.T) {
			d := s3store.New(hclog.NewNullLogger())
			err := configure(ctx, d, server.config(t, c.extra))
			if c.wantField != "" {
				var cfgErr *base.ConfigError
				if !errors.As(err, &cfgErr) || cfgErr.Field != c.wantField {
					t.Fatalf("Configure: got %v, want a *base.ConfigError for %q", err, c.wantField)
				}
			} else if !errors.Is(err, c.want) {
				t.Fatalf("Configure: got %v, want %v", err, c.want)
			}
			if !strings.Contains(err.Error(), c.wantText) {
				t.Errorf("Configure: %q does not say %q", err, c.wantText)
			}
			for _, secret := range []string{server.SecretAccessKey, "wrong-secret-0123456789"} {
				if strings.Contains(err.Error(), secret) {
					t.Errorf("Configure: the error shows a secret: %v", err)
				}
			}
		})
	}

	t.Run("a failed reconfiguration keeps the running one", func(t *testing.T) {
		s := newSetup(t, nil)
		s.put(t, "kept", []byte("x"), "")
		bad := maps(s.cfg, map[string]any{"secret_access_key": "wrong-secret-0123456789"})
		if err := configure(ctx, s.d, bad); !errors.Is(err, base.ErrUnauthenticated) {
			t.Fatalf("Configure: got %v, want base.ErrUnauthenticated", err)
		}
		if _, err := s.d.Stat(ctx, "kept"); err != nil {
			t.Errorf("Stat after the failed reconfiguration: %v", err)
		}
	})
	t.Run("unconfigured", func(t *testing.T) {
		d := s3store.New(hclog.NewNullLogger())
		if _, err := d.Stat(ctx, "x"); !errors.Is(err, base.ErrFailedPrecondition) {
			t.Errorf("Stat before Configure: got %v, want base.ErrFailedPrecondition", err)
		}
	})
}

func maps(a, b map[string]any) map[string]any {
	out := map[string]any{}
	for k, v := range a {
		out[k] = v
	}
	for k, v := range b {
		out[k] = v
	}
	return out
}

// GetRange sends a Range header and reports the object's size from the
// Content-Range; a range past the end is an empty body.
func TestGetRange(t *testing.T) {
	t.Parallel()
	s := newSetup(t, nil)
	data := randomBytes(t, 100_000)
	s.put(t, "ranged", data, "application/x-test")
	s.put(t, "ranged-empty", nil, "")
	n := int64(len(data))
	for _, c := range []struct {
		key string
		r   storage.Range
	}{
		{"ranged", storage.Range{Offset: 0, Length: storage.ToEnd}},
		{"ranged", storage.Range{Offset: 10, Length: 20}},
		{"ranged", storage.Range{Offset: n - 1, Length: 5}},
		{"ranged", storage.Range{Offset: n - 500, Length: storage.ToEnd}},
		{"ranged", storage.Range{Offset: n, Length: storage.ToEnd}},
		{"ranged", storage.Range{Offset: n + 100, Length: 1}},
		{"ranged-empty", storage.Range{Offset: 0, Length: storage.ToEnd}},
	} {
		obj, err := s.d.GetRange(s.ctx, c.key, c.r)
		if err != nil {
			t.Fatalf("GetRange(%s, %+v): %v", c.key, c.r, err)
		}
		got, err := io.ReadAll(obj.Body)
		_ = obj.Body.Close()
		full := data
		if c.key == "ranged-empty" {
			full = nil
		}
		size := int64(len(full))
		off := min(c.r.Offset, size)
		want := full[off : off+c.r.Clip(size)]
		if err != nil || !bytes.Equal(got, want) || obj.Info.Size != size || obj.Info.ETag == "" {
			t.Errorf("GetRange(%s, %+v): %d bytes (%v), info %+v; want %d bytes and size %d", c.key, c.r, len(got), err, obj.Info, len(want), size)
		}
	}
	if _, err := s.d.GetRange(s.ctx, "no-such-key", storage.Range{Offset: 0, Length: 1}); !errors.Is(err, base.ErrNotFound) {
		t.Errorf("GetRange of a missing key: %v, want ErrNotFound", err)
	}
	if _, err := s.d.GetRange(s.ctx, "ranged", storage.Range{Offset: -1, Length: 1}); !errors.Is(err, base.ErrInvalidArgument) {
		t.Errorf("GetRange with a negative offset: %v, want ErrInvalidArgument", err)
	}
}
