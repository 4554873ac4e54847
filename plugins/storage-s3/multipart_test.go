package s3store_test

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	s3store "github.com/gpuaas/gpuaas/plugins/storage-s3"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/storage"
)

// putPart PUTs data over a presigned part URL and returns the ETag.
func putPart(t *testing.T, s *setup, key, id string, n int, data []byte) (string, int) {
	t.Helper()
	u, err := s.d.PresignPart(s.ctx, &storage.PresignPartRequest{Key: key, UploadID: id, PartNumber: n, Size: int64(len(data)), Expiry: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	req, err := http.NewRequestWithContext(s.ctx, u.Method, u.URL, bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range u.Header {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.Header.Get("ETag"), resp.StatusCode
}

// The caller uploads the parts over presigned URLs; the object appears at
// completion with the content type asked for; Start and Complete answer a
// retry with their first result, even from a restarted driver.
func TestMultipartUploaderRoundTrip(t *testing.T) {
	t.Parallel()
	s := newSetup(t, nil)
	key, op := "mp/obj.bin", s.op()
	data := randomBytes(t, 5<<20+1234)
	id, err := s.d.StartMultipart(s.ctx, &storage.StartMultipartRequest{OperationID: op, Key: key, ContentType: "application/x-mp"})
	if err != nil {
		t.Fatal(err)
	}
	again, err := s.d.StartMultipart(s.ctx, &storage.StartMultipartRequest{OperationID: op, Key: key, ContentType: "application/x-mp"})
	if err != nil || again != id {
		t.Fatalf("start retried: %q %v; want %q", again, err, id)
	}
	if _, err := s.d.StartMultipart(s.ctx, &storage.StartMultipartRequest{OperationID: op, Key: "mp/other", ContentType: "application/x-mp"}); !errors.Is(err, base.ErrConflict) {
		t.Fatalf("operation id reused for another key: %v; want ErrConflict", err)
	}
	var parts []storage.CompletedPart
	for i, chunk := range [][]byte{data[:5<<20], data[5<<20:]} {
		etag, status := putPart(t, s, key, id, i+1, chunk)
		if status != 200 || etag == "" {
			t.Fatalf("part %d: %d, ETag %q", i+1, status, etag)
		}
		parts = append(parts, storage.CompletedPart{Number: i + 1, ETag: etag})
	}
	if _, err := s.d.Stat(s.ctx, key); !errors.Is(err, base.ErrNotFound) {
		t.Fatalf("the object before completion: %v; want not found", err)
	}
	info, err := s.d.CompleteMultipart(s.ctx, &storage.CompleteMultipartRequest{OperationID: op, Key: key, UploadID: id, Parts: parts})
	if err != nil {
		t.Fatal(err)
	}
	if info.Size != int64(len(data)) || info.ContentType != "application/x-mp" {
		t.Fatalf("completed: %+v", info)
	}
	if got := s.get(t, key); !bytes.Equal(got, data) {
		t.Fatal("the object differs from the parts")
	}
	restarted := s3store.New(hclog.NewNullLogger())
	if err := configure(s.ctx, restarted, s.cfg); err != nil {
		t.Fatal(err)
	}
	if again, err := restarted.CompleteMultipart(s.ctx, &storage.CompleteMultipartRequest{OperationID: op, Key: key, UploadID: id, Parts: parts}); err != nil ||
		again.ETag != info.ETag {
		t.Fatalf("complete retried on a restarted driver: %+v %v; want %+v", again, err, info)
	}
	if n := len(server.uploads(t, s.prefix)); n != 0 {
		t.Fatalf("%d multipart uploads left after completion", n)
	}
}

// An aborted upload leaves no object and no upload; aborting again works.
func TestMultipartUploaderAbort(t *testing.T) {
	t.Parallel()
	s := newSetup(t, nil)
	key := "mp/aborted.bin"
	id, err := s.d.StartMultipart(s.ctx, &storage.StartMultipartRequest{OperationID: s.op(), Key: key})
	if err != nil {
		t.Fatal(err)
	}
	if _, status := putPart(t, s, key, id, 1, randomBytes(t, 5<<20)); status != 200 {
		t.Fatalf("part: %d", status)
	}
	for range 2 {
		if err := s.d.AbortMultipart(s.ctx, &storage.AbortMultipartRequest{Key: key, UploadID: id}); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(server.uploads(t, s.prefix)); n != 0 {
		t.Fatalf("%d multipart uploads left after the abort", n)
	}
	if _, err := s.d.Stat(s.ctx, key); !errors.Is(err, base.ErrNotFound) {
		t.Fatalf("object after the abort: %v", err)
	}
	// A URL for a part of a gone upload does not store anything.
	if _, status := putPart(t, s, key, id, 2, []byte("late")); status == 200 {
		t.Fatal("a part of an aborted upload was accepted")
	}
}
