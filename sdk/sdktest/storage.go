package sdktest

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/storage"
)

// StorageSuite is the conformance suite of a storage driver.
type StorageSuite struct {
	// Config returns a valid configuration (JSON-shaped values) for one
	// plugin instance. Instances the kit starts must not share objects.
	Config func(t testing.TB) map[string]any
	// ObjectSize is the size of the streaming round trip (default 8 MiB).
	ObjectSize int
}

// Run runs the suite against target.
func (s StorageSuite) Run(t *testing.T, target Target) {
	t.Helper()
	if s.Config == nil {
		t.Fatal("StorageSuite.Config is required")
	}
	size := s.ObjectSize
	if size <= 0 {
		size = 8 << 20
	}
	d := ConnectStorage(t, target)
	info := runBaseChecks(t, d, base.KindStorage, storage.SupportedAPIVersions(),
		[]string{base.CapabilityPresign, base.CapabilityRange, base.CapabilityMultipart}, s.Config(t))
	if t.Failed() {
		t.FailNow()
	}
	ids := newOpIDs(t)
	ctx := testContext(t)
	key := func(name string) string { return ids.prefix + "/" + name }

	t.Run("stream round trip", func(t *testing.T) {
		for _, c := range []struct {
			name     string
			size     int
			declared bool
		}{
			{"large declared size", size, true},
			{"odd size unknown in advance", storage.ChunkSize*3 + 7, false},
			{"one byte", 1, true},
			{"empty", 0, true},
		} {
			t.Run(c.name, func(t *testing.T) {
				data := randomBytes(t, c.size)
				k := key("stream/" + c.name)
				declared := int64(-1)
				if c.declared {
					declared = int64(c.size)
				}
				req := &storage.PutRequest{OperationID: ids.next("put"), Key: k, Size: declared, ContentType: "application/octet-stream",
					Metadata: map[string]string{"sdktest": "yes"}}
				put, err := d.Put(ctx, req, bytes.NewReader(data))
				wantOK(t, "Put", err)
				if put.Key != k || put.Size != int64(c.size) || put.ETag == "" || put.ModTime.IsZero() {
					t.Errorf("Put returned %+v, want key %q, size %d, an ETag and a ModTime", put, k, c.size)
				}
				got := getAll(t, ctx, d, k)
				if !bytes.Equal(got, data) {
					t.Fatalf("Get returned %d bytes that differ from the %d put", len(got), len(data))
				}
				st, err := d.Stat(ctx, k)
				wantOK(t, "Stat", err)
				if st.Size != int64(c.size) || st.ETag != put.ETag || st.ContentType != req.ContentType || st.Metadata["sdktest"] != "yes" {
					t.Errorf("Stat returned %+v, want size %d, ETag %q, content type and metadata as put", st, c.size, put.ETag)
				}
			})
		}
	})

	t.Run("ranged reads", func(t *testing.T) {
		// Every driver serves ranges: natively with the range capability,
		// else through the SDK, which reads past the bytes before them.
		objSize := 3*storage.ChunkSize + 17
		data := randomBytes(t, objSize)
		k := key("ranged")
		_, err := d.Put(ctx, &storage.PutRequest{OperationID: ids.next("put"), Key: k, Size: int64(objSize)}, bytes.NewReader(data))
		wantOK(t, "Put", err)
		n := int64(objSize)
		for _, r := range []storage.Range{
			{Offset: 0, Length: storage.ToEnd},
			{Offset: 0, Length: 1},
			{Offset: n - 1, Length: storage.ToEnd},
			{Offset: storage.ChunkSize - 3, Length: storage.ChunkSize + 6},
			{Offset: n - 100, Length: 1000},
			{Offset: n, Length: storage.ToEnd},
			{Offset: n + 10, Length: 5},
		} {
			obj, err := storage.GetRange(ctx, d, k, r)
			wantOK(t, fmt.Sprintf("GetRange(%+v)", r), err)
			got, err := io.ReadAll(obj.Body)
			_ = obj.Body.Close()
			wantOK(t, fmt.Sprintf("reading GetRange(%+v)", r), err)
			off := min(r.Offset, n)
			if want := data[off : off+r.Clip(n)]; !bytes.Equal(got, want) || obj.Info.Size != n {
				t.Errorf("GetRange(%+v): %d bytes, info size %d; want the %d bytes from %d of the object and size %d", r, len(got), obj.Info.Size, len(want), off, n)
			}
		}
		_, err = storage.GetRange(ctx, d, key("no-such-object"), storage.Range{Offset: 1, Length: 1})
		wantErr(t, "GetRange of a missing key", err, base.ErrNotFound)
		// An empty object has no byte to serve, whatever the range.
		empty := key("ranged-empty")
		_, err = d.Put(ctx, &storage.PutRequest{OperationID: ids.next("put"), Key: empty, Size: 0}, bytes.NewReader(nil))
		wantOK(t, "Put of an empty object", err)
		obj, err := storage.GetRange(ctx, d, empty, storage.Range{Offset: 0, Length: storage.ToEnd})
		wantOK(t, "GetRange of an empty object", err)
		if got, err := io.ReadAll(obj.Body); err != nil || len(got) != 0 || obj.Info.Size != 0 {
			t.Errorf("GetRange of an empty object: %d bytes (%v), size %d; want none", len(got), err, obj.Info.Size)
		}
		_ = obj.Body.Close()
	})

	t.Run("short body leaves no object", func(t *testing.T) {
		k := key("short")
		_, err := d.Put(ctx, &storage.PutRequest{OperationID: ids.next("put"), Key: k, Size: 100}, bytes.NewReader(make([]byte, 50)))
		wantErr(t, "Put of 50 bytes declared as 100", err, base.ErrInvalidArgument)
		_, err = d.Stat(ctx, k)
		wantErr(t, "Stat after the failed Put", err, base.ErrNotFound)
	})

	t.Run("not found", func(t *testing.T) {
		missing := key("no-such-object")
		_, err := d.Stat(ctx, missing)
		wantErr(t, "Stat", err, base.ErrNotFound)
		_, err = d.Get(ctx, missing)
		wantErr(t, "Get", err, base.ErrNotFound)
		_, err = d.Copy(ctx, &storage.CopyRequest{OperationID: ids.next("copy"), SourceKey: missing, DestKey: key("copy-of-missing")})
		wantErr(t, "Copy", err, base.ErrNotFound)
		wantOK(t, "Delete of a missing key", d.Delete(ctx, &storage.DeleteRequest{OperationID: ids.next("delete"), Key: missing}))
	})

	t.Run("invalid arguments", func(t *testing.T) {
		_, err := d.Put(ctx, &storage.PutRequest{Key: key("no-op-id"), Size: 1}, bytes.NewReader([]byte{1}))
		wantErr(t, "Put without operation id", err, base.ErrInvalidArgument)
		err = d.Delete(ctx, &storage.DeleteRequest{Key: key("no-op-id")})
		wantErr(t, "Delete without operation id", err, base.ErrInvalidArgument)
		_, err = d.Copy(ctx, &storage.CopyRequest{SourceKey: key("a"), DestKey: key("b")})
		wantErr(t, "Copy without operation id", err, base.ErrInvalidArgument)
		_, err = d.Stat(ctx, "")
		wantErr(t, "Stat of an empty key", err, base.ErrInvalidArgument)
	})

	t.Run("idempotent retries", func(t *testing.T) {
		data := randomBytes(t, 64<<10)
		k := key("idem")
		op := ids.next("put")
		first, err := d.Put(ctx, &storage.PutRequest{OperationID: op, Key: k, Size: int64(len(data))}, bytes.NewReader(data))
		wantOK(t, "Put", err)
		again, err := d.Put(ctx, &storage.PutRequest{OperationID: op, Key: k, Size: int64(len(data))}, bytes.NewReader(data))
		wantOK(t, "Put retried", err)
		sameInfo(t, "Put retried", first, again)
		_, err = d.Put(ctx, &storage.PutRequest{OperationID: op, Key: key("idem-other"), Size: int64(len(data))}, bytes.NewReader(data))
		wantErr(t, "Put reusing the operation id for another key", err, base.ErrConflict)

		copyOp := ids.next("copy")
		c1, err := d.Copy(ctx, &storage.CopyRequest{OperationID: copyOp, SourceKey: k, DestKey: key("idem-copy")})
		wantOK(t, "Copy", err)
		c2, err := d.Copy(ctx, &storage.CopyRequest{OperationID: copyOp, SourceKey: k, DestKey: key("idem-copy")})
		wantOK(t, "Copy retried", err)
		sameInfo(t, "Copy retried", c1, c2)
		if c1.Key != key("idem-copy") || c1.Size != first.Size {
			t.Errorf("Copy returned %+v, want key %q and size %d", c1, key("idem-copy"), first.Size)
		}
		if got := getAll(t, ctx, d, key("idem-copy")); !bytes.Equal(got, data) {
			t.Error("the copy's content differs from the source")
		}
		_, err = d.Copy(ctx, &storage.CopyRequest{OperationID: copyOp, SourceKey: k, DestKey: key("idem-copy-other")})
		wantErr(t, "Copy reusing the operation id for another destination", err, base.ErrConflict)

		delOp := ids.next("delete")
		wantOK(t, "Delete", d.Delete(ctx, &storage.DeleteRequest{OperationID: delOp, Key: key("idem-copy")}))
		wantOK(t, "Delete retried", d.Delete(ctx, &storage.DeleteRequest{OperationID: delOp, Key: key("idem-copy")}))
		_, err = d.Stat(ctx, key("idem-copy"))
		wantErr(t, "Stat after Delete", err, base.ErrNotFound)
	})

	t.Run("list pages", func(t *testing.T) {
		prefix := key("list/")
		var want []string
		for i := range 5 {
			k := fmt.Sprintf("%sobj-%d", prefix, i)
			want = append(want, k)
			_, err := d.Put(ctx, &storage.PutRequest{OperationID: ids.next("put"), Key: k, Size: 3}, bytes.NewReader([]byte("abc")))
			wantOK(t, "Put", err)
		}
		_, err := d.Put(ctx, &storage.PutRequest{OperationID: ids.next("put"), Key: key("listx"), Size: 1}, bytes.NewReader([]byte("x")))
		wantOK(t, "Put outside the prefix", err)
		var got []string
		token := ""
		for pages := 0; ; pages++ {
			if pages > 5 {
				t.Fatalf("List did not finish after %d pages of 2 for 5 objects (tokens never end)", pages)
			}
			page, err := d.List(ctx, &storage.ListRequest{Prefix: prefix, PageToken: token, Limit: 2})
			wantOK(t, "List", err)
			if len(page.Objects) > 2 {
				t.Fatalf("List with limit 2 returned %d objects", len(page.Objects))
			}
			for _, o := range page.Objects {
				got = append(got, o.Key)
				if o.Size != 3 {
					t.Errorf("List: %q has size %d, want 3", o.Key, o.Size)
				}
			}
			if page.NextPageToken == "" {
				break
			}
			token = page.NextPageToken
		}
		if !slices.Equal(got, want) {
			t.Errorf("List returned %q, want %q in key order", got, want)
		}
	})

	t.Run("cancellation", func(t *testing.T) {
		preCancelled(t, "Stat", func(ctx context.Context) error {
			_, err := d.Stat(ctx, key("anything"))
			return err
		})
		k := key("cancelled-put")
		pr, pw := io.Pipe()
		t.Cleanup(func() { _ = pw.Close() })
		cancelMidCall(t, "Put with a body that never ends", func(ctx context.Context) error {
			_, err := d.Put(ctx, &storage.PutRequest{OperationID: ids.next("put"), Key: k, Size: -1}, pr)
			return err
		})
		_, err := d.Stat(ctx, k)
		wantErr(t, "Stat after the cancelled Put", err, base.ErrNotFound)

		dctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer cancel()
		pr2, pw2 := io.Pipe()
		t.Cleanup(func() { _ = pw2.Close() })
		_, err = d.Put(dctx, &storage.PutRequest{OperationID: ids.next("put"), Key: k, Size: -1}, pr2)
		wantErr(t, "Put past its deadline", err, context.DeadlineExceeded)

		big := key("cancelled-get")
		data := randomBytes(t, 4*storage.ChunkSize)
		_, err = d.Put(ctx, &storage.PutRequest{OperationID: ids.next("put"), Key: big, Size: int64(len(data))}, bytes.NewReader(data))
		wantOK(t, "Put", err)
		gctx, gcancel := context.WithCancel(ctx)
		obj, err := d.Get(gctx, big)
		wantOK(t, "Get", err)
		defer func() { _ = obj.Body.Close() }()
		if _, err := io.ReadFull(obj.Body, make([]byte, 10)); err != nil {
			t.Fatalf("reading the first bytes: %v", err)
		}
		gcancel()
		_, err = io.Copy(io.Discard, obj.Body)
		wantErr(t, "reading a Get body after cancel", err, context.Canceled)

		// The plugin still serves after all that.
		if got := getAll(t, ctx, d, big); !bytes.Equal(got, data) {
			t.Error("Get after the cancellations returned other content")
		}
	})

	t.Run("optional presign", func(t *testing.T) {
		req := &storage.PresignRequest{Key: key("presign"), Expiry: 10 * time.Minute}
		getURL, errGet := d.PresignGet(ctx, req)
		putURL, errPut := d.PresignPut(ctx, req)
		if !info.HasCapability(base.CapabilityPresign) {
			wantErr(t, "PresignGet without the presign capability", errGet, base.ErrUnimplemented)
			wantErr(t, "PresignPut without the presign capability", errPut, base.ErrUnimplemented)
			return
		}
		wantOK(t, "PresignGet", errGet)
		wantOK(t, "PresignPut", errPut)
		sized, err := d.PresignPut(ctx, &storage.PresignRequest{Key: key("presign-sized"), Expiry: 10 * time.Minute, ContentLength: 1234})
		wantOK(t, "PresignPut with a content length", err)
		for _, u := range []*storage.PresignedURL{getURL, putURL, sized} {
			if u.URL == "" || u.Method == "" {
				t.Errorf("presigned %+v lacks a URL or method", u)
			}
			if u.ExpiresAt.Before(time.Now()) || u.ExpiresAt.After(time.Now().Add(req.Expiry+time.Minute)) {
				t.Errorf("presigned URL expires at %s, want within %s from now", u.ExpiresAt, req.Expiry)
			}
		}
	})

	t.Run("optional multipart", func(t *testing.T) { checkMultipart(t, ctx, d, info, key("multipart"), ids.next("multipart")) })

	if target.InProcessTarget() {
		t.Run("error mapping", func(t *testing.T) {
			inj := newInjector()
			d := must[*storage.Client](t, connectInProcess(t, &injectedStorage{Driver: target.factory(t).(storage.Driver), inj: inj}, base.KindStorage))
			checkErrorMapping(t, inj, func(ctx context.Context) error {
				_, err := d.Stat(ctx, "sdktest-injected")
				return err
			})
		})
	}
}

// injectedStorage fails or blocks Stat as its injector says.
type injectedStorage struct {
	storage.Driver
	inj *injector
}

var _ storage.Driver = (*injectedStorage)(nil)

func (i *injectedStorage) Stat(ctx context.Context, key string) (*storage.ObjectInfo, error) {
	if err := i.inj.hit(ctx); err != nil {
		return nil, err
	}
	return i.Driver.Stat(ctx, key)
}

func randomBytes(t testing.TB, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func getAll(t testing.TB, ctx context.Context, d storage.Driver, key string) []byte {
	t.Helper()
	obj, err := d.Get(ctx, key)
	wantOK(t, "Get", err)
	defer func() { _ = obj.Body.Close() }()
	var buf bytes.Buffer
	n, err := io.Copy(&buf, obj.Body)
	wantOK(t, "reading the Get body", err)
	if n != obj.Info.Size {
		t.Fatalf("Get: read %d bytes, info says %d", n, obj.Info.Size)
	}
	return buf.Bytes()
}

func sameInfo(t testing.TB, call string, a, b *storage.ObjectInfo) {
	t.Helper()
	if a.Key != b.Key || a.Size != b.Size || a.ETag != b.ETag || !a.ModTime.Equal(b.ModTime) {
		t.Errorf("%s: got %+v, first call returned %+v (a retry must not write again)", call, b, a)
	}
}

// checkMultipart uploads an object in two parts over the driver's
// presigned part URLs, as the core does for large uploads: Start and
// Complete answer retries with their first result, the object appears only
// at completion, and Abort of an upload succeeds twice.
func checkMultipart(t *testing.T, ctx context.Context, d *storage.Client, info *base.Info, key, op string) {
	start := &storage.StartMultipartRequest{OperationID: op, Key: key, ContentType: "application/x-sdktest"}
	id, err := d.StartMultipart(ctx, start)
	if !info.HasCapability(base.CapabilityMultipart) {
		wantErr(t, "StartMultipart without the multipart capability", err, base.ErrUnimplemented)
		return
	}
	wantOK(t, "StartMultipart", err)
	again, err := d.StartMultipart(ctx, start)
	wantOK(t, "StartMultipart retried", err)
	if again != id {
		t.Fatalf("StartMultipart retried answered upload %q, the first %q", again, id)
	}
	data := make([]byte, storage.MinPartSize+4321)
	_, _ = rand.Read(data)
	var parts []storage.CompletedPart
	for i, chunk := range [][]byte{data[:storage.MinPartSize], data[storage.MinPartSize:]} {
		u, err := d.PresignPart(ctx, &storage.PresignPartRequest{Key: key, UploadID: id, PartNumber: i + 1, Size: int64(len(chunk)), Expiry: 10 * time.Minute})
		wantOK(t, "PresignPart", err)
		req, err := http.NewRequestWithContext(ctx, u.Method, u.URL, bytes.NewReader(chunk))
		wantOK(t, "building the part PUT", err)
		for k, v := range u.Header {
			req.Header.Set(k, v)
		}
		resp, err := http.DefaultClient.Do(req)
		wantOK(t, "PUT of a part", err)
		_, _ = io.Copy(io.Discard, resp.Body)
		_ = resp.Body.Close()
		if resp.StatusCode/100 != 2 || resp.Header.Get("ETag") == "" {
			t.Fatalf("PUT of part %d: %s, ETag %q", i+1, resp.Status, resp.Header.Get("ETag"))
		}
		parts = append(parts, storage.CompletedPart{Number: i + 1, ETag: resp.Header.Get("ETag")})
	}
	if _, err := d.Stat(ctx, key); err == nil {
		t.Fatal("the object exists before CompleteMultipart")
	}
	complete := &storage.CompleteMultipartRequest{OperationID: op, Key: key, UploadID: id, Parts: parts}
	got, err := d.CompleteMultipart(ctx, complete)
	wantOK(t, "CompleteMultipart", err)
	if got.Size != int64(len(data)) {
		t.Fatalf("CompleteMultipart: %d bytes, want %d", got.Size, len(data))
	}
	retried, err := d.CompleteMultipart(ctx, complete)
	wantOK(t, "CompleteMultipart retried", err)
	if retried.ETag != got.ETag || retried.Size != got.Size {
		t.Fatalf("CompleteMultipart retried: %+v, the first %+v", retried, got)
	}
	obj, err := d.Get(ctx, key)
	wantOK(t, "Get of the completed object", err)
	body, err := io.ReadAll(obj.Body)
	_ = obj.Body.Close()
	wantOK(t, "reading the completed object", err)
	if !bytes.Equal(body, data) {
		t.Fatal("the completed object differs from its parts")
	}
	other, err := d.StartMultipart(ctx, &storage.StartMultipartRequest{OperationID: op + "-aborted", Key: key + "-aborted"})
	wantOK(t, "StartMultipart of an upload to abort", err)
	for range 2 {
		wantOK(t, "AbortMultipart", d.AbortMultipart(ctx, &storage.AbortMultipartRequest{Key: key + "-aborted", UploadID: other}))
	}
	if _, err := d.Stat(ctx, key+"-aborted"); err == nil {
		t.Fatal("an aborted upload left an object")
	}
}
