package daemon_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/gpuaas/gpuaas/core/internal/daemon"
	"github.com/gpuaas/gpuaas/core/internal/daemon/daemontest"
	"github.com/gpuaas/gpuaas/core/internal/identity"
	"github.com/gpuaas/gpuaas/core/internal/policy"
	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/storage"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
	"github.com/gpuaas/gpuaas/internal/s3test"
	s3store "github.com/gpuaas/gpuaas/plugins/storage-s3"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/sdktest"
	sdkstorage "github.com/gpuaas/gpuaas/sdk/storage"
)

// storageFixture is the project storage of a test core: a storage-s3
// driver on the dev stack's S3 server (S3_* from the environment) with a
// key prefix of its own, the S3 client that checks the bucket behind the
// core's back, and a storage service that makes fixtures.
type storageFixture struct {
	driver sdkstorage.Driver
	prefix string // the driver's key_prefix: this core's corner of the bucket
	bucket string
	s3     *s3.Client
	svc    *storage.Service
}

var _ storage.Drivers = (*storageFixture)(nil)

// Storage implements storage.Drivers: the one instance is "storage".
func (f *storageFixture) Storage(_ context.Context, instance string) (sdkstorage.Driver, error) {
	if instance != "storage" {
		return nil, fmt.Errorf("no storage instance %q", instance)
	}
	return f.driver, nil
}

// s3Config is a storage-s3 configuration on the dev stack's S3 under a
// fresh key prefix, with 5 MiB parts (uploads over 5 MiB go multipart).
func s3Config(t testing.TB, extra map[string]any) map[string]any {
	t.Helper()
	cfg := map[string]any{
		"endpoint": testenv.Env(t, "S3_ENDPOINT"), "region": testenv.Env(t, "S3_REGION"), "bucket": testenv.Env(t, "S3_BUCKET"),
		"path_style": true, "access_key_id": testenv.Env(t, "S3_ACCESS_KEY_ID"), "secret_access_key": testenv.Env(t, "S3_SECRET_ACCESS_KEY"),
		"key_prefix":      "daemon-test-" + strings.ReplaceAll(uuid.NewString(), "-", "")[:16] + "/",
		"part_size_bytes": s3store.MinPartSize,
	}
	maps.Copy(cfg, extra)
	return cfg
}

// newStorageFixture serves storage through target: nil runs the driver in
// this process and calls it directly, else the driver runs as target says
// (over gRPC, in process or as the plugin binary). extra adds to the
// driver's configuration.
func newStorageFixture(t testing.TB, pool *pgxpool.Pool, target *sdktest.Target, extra ...map[string]any) *storageFixture {
	t.Helper()
	var more map[string]any
	if len(extra) > 0 {
		more = extra[0]
	}
	cfg := s3Config(t, more)
	f := &storageFixture{prefix: cfg["key_prefix"].(string), bucket: cfg["bucket"].(string)}
	if target == nil {
		d := s3store.New(hclog.NewNullLogger())
		schema, err := d.ConfigSchema(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		c, err := base.ValidateConfig(schema, cfg)
		if err != nil {
			t.Fatal(err)
		}
		c.APIVersion, c.Instance = sdkstorage.APIVersion1, "storage"
		if err := d.Configure(context.Background(), c); err != nil {
			t.Fatal(err)
		}
		f.driver = d
	} else {
		c := sdktest.ConnectStorage(t, *target)
		sdktest.Configure(t, c, sdkstorage.SupportedAPIVersions(), cfg)
		f.driver = c
	}
	f.s3 = s3.New(s3.Options{
		Region: cfg["region"].(string), UsePathStyle: true, BaseEndpoint: aws.String(cfg["endpoint"].(string)),
		Credentials: aws.CredentialsProviderFunc(func(context.Context) (aws.Credentials, error) {
			return aws.Credentials{AccessKeyID: cfg["access_key_id"].(string), SecretAccessKey: cfg["secret_access_key"].(string)}, nil
		}),
	})
	f.svc = storage.NewService(pool, policy.NewService(pool, hclog.NewNullLogger()), f, "local", "storage", hclog.NewNullLogger())
	// The dev stack's S3 outlives the test: a long-lived stack would fill its disk.
	t.Cleanup(func() { s3test.Empty(t, f.s3, f.bucket, f.prefix) })
	return f
}

// bucketObjects lists the bucket under the fixture's prefix: key (less the
// prefix) to size; the driver's operation records are left out.
func (f *storageFixture) bucketObjects(t testing.TB) map[string]int64 {
	t.Helper()
	out := map[string]int64{}
	p := s3.NewListObjectsV2Paginator(f.s3, &s3.ListObjectsV2Input{Bucket: &f.bucket, Prefix: &f.prefix})
	for p.HasMorePages() {
		page, err := p.NextPage(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		for _, o := range page.Contents {
			k := strings.TrimPrefix(aws.ToString(o.Key), f.prefix)
			if !strings.HasPrefix(k, s3store.ReservedPrefix) {
				out[k] = aws.ToInt64(o.Size)
			}
		}
	}
	return out
}

// multipartUploads counts multipart uploads in progress under the prefix.
func (f *storageFixture) multipartUploads(t testing.TB) int {
	t.Helper()
	out, err := f.s3.ListMultipartUploads(context.Background(), &s3.ListMultipartUploadsInput{Bucket: &f.bucket, Prefix: &f.prefix})
	if err != nil {
		t.Fatal(err)
	}
	return len(out.Uploads)
}

// storable gives a world storage in P1: the file fixture/report.txt and a
// presigned upload of fixture/incoming.bin whose bytes are in the store,
// waiting for confirmation.
func (e *env) storable(w *world) {
	e.t.Helper()
	ctx := principal.With(context.Background(), principal.SystemPrincipal("fixture"))
	p := storage.Project{OrgID: w.orgA, ID: w.p1}
	report := "fixture report\n"
	if _, err := e.storage.svc.Upload(ctx, p, storage.UploadRequest{Path: "fixture/report.txt", Size: int64(len(report)),
		ContentType: "text/plain", Body: strings.NewReader(report)}); err != nil {
		e.t.Fatal(err)
	}
	up, err := e.storage.svc.PresignUpload(ctx, p, "fixture/incoming.bin", 4, "")
	if err != nil {
		e.t.Fatal(err)
	}
	if code := putPresigned(e.t, up.URL, []byte("data")); code != http.StatusOK {
		e.t.Fatalf("presigned PUT: %d", code)
	}
	w.storedPath, w.storageUpload = "fixture/report.txt", up.ID
}

// putPresigned sends body to a presigned PUT URL and returns the status.
func putPresigned(t testing.TB, u *sdkstorage.PresignedURL, body []byte) int {
	t.Helper()
	req, err := http.NewRequest(u.Method, u.URL, bytes.NewReader(body))
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
	_, _ = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	return resp.StatusCode
}

// newStorageEnv is a core whose storage driver runs as target says (nil:
// in process, called directly), with the driver configuration extra adds
// and core settings as name, value pairs.
func newStorageEnv(t testing.TB, target *sdktest.Target, extra map[string]any, settings ...string) *env {
	t.Helper()
	pool, dbURL := testenv.MigratedPool(t)
	n := testenv.StartNATS(t)
	st := newStorageFixture(t, pool, target, extra)
	vars := map[string]string{"DATABASE_URL": dbURL, "NATS_URL": n.URL(), "TEMPORAL_ADDRESS": testenv.Env(t, "TEMPORAL_ADDRESS")}
	for i := 0; i+1 < len(settings); i += 2 {
		vars[settings[i]] = settings[i+1]
	}
	d := daemontest.StartWith(t, vars, daemon.Options{Storage: st})
	return &env{t: t, url: d.URL, pool: pool, ids: identity.NewService(pool, "local", testenv.Logger(t), nil), storage: st}
}

// transfer sends a request with a raw body (nil: none); size -1 sends it
// chunked. A mutation that succeeds must write exactly one success audit
// row, like env.send.
func (e *env) transfer(method, path, token string, body io.Reader, size int64, header ...string) response {
	e.t.Helper()
	before := e.auditCount("success")
	r := e.rawTransfer(method, path, token, body, size, header...)
	want := 0
	if method != http.MethodGet && r.status >= 200 && r.status < 300 {
		want = 1
	}
	if got := e.auditCount("success") - before; got != want {
		e.t.Errorf("%s %s → %d wrote %d success audit rows, want %d", method, path, r.status, got, want)
	}
	return r
}

// rawTransfer is transfer without the audit check (for concurrent calls).
func (e *env) rawTransfer(method, path, token string, body io.Reader, size int64, header ...string) response {
	e.t.Helper()
	req, err := http.NewRequest(method, e.url+path, body)
	if err != nil {
		e.t.Fatal(err)
	}
	if body != nil {
		req.ContentLength = size
		if size < 0 {
			req.TransferEncoding = []string{"chunked"}
		}
	}
	req.Header.Set("Authorization", "Bearer "+token)
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := (&http.Client{Timeout: 5 * time.Minute}).Do(req)
	if err != nil {
		e.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		e.t.Fatalf("%s %s: reading the body: %v", method, path, err)
	}
	return response{status: resp.StatusCode, header: resp.Header, body: raw}
}

func q(project uuid.UUID, path string, extra ...string) string {
	v := url.Values{"project_id": {project.String()}, "path": {path}}
	for i := 0; i+1 < len(extra); i += 2 {
		v.Set(extra[i], extra[i+1])
	}
	return v.Encode()
}

func (e *env) upload(token string, project uuid.UUID, path string, data []byte, header ...string) response {
	e.t.Helper()
	return e.transfer("PUT", "/api/v1/storage/upload?"+q(project, path), token, bytes.NewReader(data), int64(len(data)), header...)
}

func (e *env) download(token string, project uuid.UUID, path string, header ...string) response {
	e.t.Helper()
	return e.transfer("GET", "/api/v1/storage/download?"+q(project, path), token, nil, 0, header...)
}

type storagePage struct {
	Prefix string `json:"prefix"`
	Items  []struct {
		Path   string `json:"path"`
		Name   string `json:"name"`
		Folder bool   `json:"folder"`
		Object *struct {
			Size int64  `json:"size"`
			Etag string `json:"etag"`
		} `json:"object"`
	} `json:"items"`
	NextCursor *string `json:"next_cursor"`
}

// list lists a folder through every page of limit entries.
func (e *env) list(token string, project uuid.UUID, prefix string, recursive bool, limit int) []string {
	e.t.Helper()
	var out []string
	cursor := ""
	for pages := 0; ; pages++ {
		v := url.Values{"project_id": {project.String()}, "prefix": {prefix}, "limit": {fmt.Sprint(limit)}}
		if recursive {
			v.Set("recursive", "true")
		}
		if cursor != "" {
			v.Set("cursor", cursor)
		}
		r := e.call("GET", "/api/v1/storage/list?"+v.Encode(), token, nil)
		if r.status != 200 {
			e.t.Fatalf("list %q: %d %s", prefix, r.status, r.body)
		}
		var page storagePage
		r.json(e.t, &page)
		if len(page.Items) > limit || pages > 100 {
			e.t.Fatalf("list %q: a page of %d with limit %d, page %d", prefix, len(page.Items), limit, pages)
		}
		for _, it := range page.Items {
			out = append(out, it.Path)
		}
		if page.NextCursor == nil {
			return out
		}
		cursor = *page.NextCursor
	}
}

// checkMirror checks that the bucket holds exactly the project objects the
// metadata lists, with their sizes, that usage sums them, and that nothing
// is reserved or in flight.
func (e *env) checkMirror(org, project uuid.UUID) {
	e.t.Helper()
	ctx := context.Background()
	meta := map[string]int64{}
	rows, err := e.pool.Query(ctx, `SELECT path, size FROM storage_objects WHERE project_id = $1`, project)
	if err != nil {
		e.t.Fatal(err)
	}
	var sum int64
	for rows.Next() {
		var p string
		var n int64
		if err := rows.Scan(&p, &n); err != nil {
			e.t.Fatal(err)
		}
		meta[fmt.Sprintf("orgs/%s/projects/%s/%s", org, project, p)] = n
		sum += n
	}
	rows.Close()
	bucket := e.storage.bucketObjects(e.t)
	projectPrefix := fmt.Sprintf("orgs/%s/projects/%s/", org, project)
	for k, n := range bucket {
		if !strings.HasPrefix(k, projectPrefix) {
			continue
		}
		if m, ok := meta[k]; !ok || m != n {
			e.t.Errorf("the bucket holds %s (%d bytes), the metadata %v", k, n, meta[k])
		}
	}
	for k, n := range meta {
		if b, ok := bucket[k]; !ok || b != n {
			e.t.Errorf("the metadata lists %s (%d bytes), the bucket %v", k, n, bucket[k])
		}
	}
	var used, objects, reserved, inflight int64
	_ = e.pool.QueryRow(ctx, `SELECT coalesce(sum(bytes_used), 0), coalesce(sum(objects), 0), coalesce(sum(bytes_reserved), 0) FROM storage_usage WHERE project_id = $1`, project).
		Scan(&used, &objects, &reserved)
	_ = e.pool.QueryRow(ctx, `SELECT count(*) FROM storage_inflight WHERE project_id = $1 AND kind <> 'presigned_upload'`, project).Scan(&inflight)
	if used != sum || objects != int64(len(meta)) || reserved != 0 || inflight != 0 {
		e.t.Errorf("usage: %d bytes in %d objects, %d reserved, %d in flight; the objects hold %d bytes in %d", used, objects, reserved, inflight, sum, len(meta))
	}
}

// pattern is deterministic content of n bytes.
func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*31) ^ seed ^ byte(i>>11)
	}
	return b
}

// Upload → list → download (whole and ranges) → rename (file and folder) →
// delete, and presigned transfers, through the REST API with the driver
// over gRPC; afterwards the bucket and the metadata agree.
func TestStorageRoundTrip(t *testing.T) {
	inproc := sdktest.InProcess(func(testing.TB) base.BasePlugin { return s3store.New(hclog.NewNullLogger()) })
	e := newStorageEnv(t, &inproc, nil)
	w := e.newWorld()
	tok, p1 := w.tokens[member], w.p1

	small := []byte("hello, project storage\n")
	r := e.upload(tok, p1, "docs/a.txt", small, "Content-Type", "text/plain; charset=utf-8")
	if r.status != 201 {
		t.Fatalf("upload: %d %s", r.status, r.body)
	}
	var obj struct {
		Etag string `json:"etag"`
		Size int64  `json:"size"`
	}
	r.json(t, &obj)
	if obj.Size != int64(len(small)) {
		t.Errorf("upload answered %s", r.body)
	}
	big := pattern(3*sdkstorage.ChunkSize+12345, 7)
	if r := e.transfer("PUT", "/api/v1/storage/upload?"+q(p1, "docs/big.bin"), tok, bytes.NewReader(big), -1); r.status != 201 {
		t.Fatalf("chunked upload: %d %s", r.status, r.body)
	}
	for _, path := range []string{"p1/y", "p10/x", "docs/sub/deep.txt", "Ünïcødé dir/re\u0301sume\u0301.txt"} {
		if r := e.upload(tok, p1, path, []byte(path)); r.status != 201 {
			t.Fatalf("upload %q: %d %s", path, r.status, r.body)
		}
	}
	// The NFD name was stored NFC.
	if r := e.download(tok, p1, "Ünïcødé dir/r\u00e9sum\u00e9.txt"); r.status != 200 {
		t.Errorf("download by the NFC name: %d %s", r.status, r.body)
	}

	t.Run("list", func(t *testing.T) {
		e.t = t
		if got, want := e.list(tok, p1, "", false, 2), []string{"docs/", "p1/", "p10/", "Ünïcødé dir/"}; !equal(got, want) {
			t.Errorf("root: %q, want %q", got, want)
		}
		if got, want := e.list(tok, p1, "docs", false, 1), []string{"docs/a.txt", "docs/big.bin", "docs/sub/"}; !equal(got, want) {
			t.Errorf("docs: %q, want %q", got, want)
		}
		if got, want := e.list(tok, p1, "p1", false, 50), []string{"p1/y"}; !equal(got, want) {
			t.Errorf("prefix p1 (never p10): %q, want %q", got, want)
		}
		if got, want := e.list(tok, p1, "docs/", true, 2), []string{"docs/a.txt", "docs/big.bin", "docs/sub/deep.txt"}; !equal(got, want) {
			t.Errorf("docs recursive: %q, want %q", got, want)
		}
	})
	e.t = t

	t.Run("download", func(t *testing.T) {
		e.t = t
		r := e.download(tok, p1, "docs/a.txt")
		if r.status != 200 || !bytes.Equal(r.body, small) {
			t.Fatalf("download: %d %q", r.status, r.body)
		}
		for h, want := range map[string]string{"Content-Type": "text/plain; charset=utf-8", "Content-Length": fmt.Sprint(len(small)),
			"Etag": `"` + obj.Etag + `"`, "Accept-Ranges": "bytes", "X-Content-Type-Options": "nosniff"} {
			if got := r.header.Get(h); got != want {
				t.Errorf("%s: %q, want %q", h, got, want)
			}
		}
		if cd := r.header.Get("Content-Disposition"); !strings.HasPrefix(cd, "attachment") || !strings.Contains(cd, "a.txt") {
			t.Errorf("Content-Disposition %q", cd)
		}
		r = e.download(tok, p1, "docs/big.bin")
		if r.status != 200 || sha256.Sum256(r.body) != sha256.Sum256(big) {
			t.Fatalf("download of the chunked upload: %d, %d bytes", r.status, len(r.body))
		}
		n := int64(len(big))
		for _, c := range []struct {
			header string
			from   int64
			to     int64 // inclusive
		}{
			{"bytes=0-0", 0, 0},
			{"bytes=10-19", 10, 19},
			{fmt.Sprintf("bytes=%d-%d", sdkstorage.ChunkSize-5, sdkstorage.ChunkSize+5), sdkstorage.ChunkSize - 5, sdkstorage.ChunkSize + 5},
			{fmt.Sprintf("bytes=%d-", n-100), n - 100, n - 1},
			{"bytes=-50", n - 50, n - 1},
			{fmt.Sprintf("bytes=%d-%d", n-10, n+1000), n - 10, n - 1},
		} {
			r := e.download(tok, p1, "docs/big.bin", "Range", c.header)
			want := fmt.Sprintf("bytes %d-%d/%d", c.from, c.to, n)
			if r.status != 206 || r.header.Get("Content-Range") != want || !bytes.Equal(r.body, big[c.from:c.to+1]) {
				t.Errorf("Range %s: %d, Content-Range %q, %d bytes; want 206, %q and %d bytes", c.header, r.status, r.header.Get("Content-Range"), len(r.body), want, c.to-c.from+1)
			}
		}
		r = e.download(tok, p1, "docs/big.bin", "Range", fmt.Sprintf("bytes=%d-", n))
		if r.status != 416 || r.code() != "storage_range_not_satisfiable" || r.header.Get("Content-Range") != fmt.Sprintf("bytes */%d", n) {
			t.Errorf("a range past the end: %d %s, Content-Range %q", r.status, r.body, r.header.Get("Content-Range"))
		}
		for _, h := range [][]string{{"Range", "bytes=0-1,5-6"}, {"Range", "bytes=abc"}, {"Range", "bytes=0-1", "If-Range", `"not-the-etag"`}} {
			if r := e.download(tok, p1, "docs/a.txt", h...); r.status != 200 || !bytes.Equal(r.body, small) {
				t.Errorf("%q: %d, %d bytes; want the whole file", h, r.status, len(r.body))
			}
		}
		if r := e.download(tok, p1, "docs/a.txt", "Range", "bytes=1-3", "If-Range", `"`+obj.Etag+`"`); r.status != 206 || string(r.body) != string(small[1:4]) {
			t.Errorf("If-Range with the ETag: %d %q", r.status, r.body)
		}
		if r := e.download(tok, p1, "docs/nope.txt"); r.status != 404 || r.code() != "storage_object_not_found" {
			t.Errorf("a missing file: %d %s", r.status, r.body)
		}
	})
	e.t = t

	t.Run("rename", func(t *testing.T) {
		e.t = t
		rename := func(from, to string) response {
			return e.send("POST", "/api/v1/storage/rename", tok, map[string]any{"project_id": p1, "from": from, "to": to})
		}
		if r := rename("docs/a.txt", "docs/b.txt"); r.status != 200 {
			t.Fatalf("file rename: %d %s", r.status, r.body)
		}
		if r := e.download(tok, p1, "docs/a.txt"); r.status != 404 {
			t.Errorf("the old name: %d", r.status)
		}
		if r := e.download(tok, p1, "docs/b.txt"); r.status != 200 || !bytes.Equal(r.body, small) {
			t.Errorf("the new name: %d %q", r.status, r.body)
		}
		if r := rename("docs/b.txt", "p1/y"); r.status != 409 || r.code() != "storage_object_exists" {
			t.Errorf("rename onto a file: %d %s", r.status, r.body)
		}
		if r := rename("docs/", "docs/inside/"); r.status != 400 {
			t.Errorf("a folder into itself: %d %s", r.status, r.body)
		}
		if r := rename("docs/missing.txt", "x.txt"); r.status != 404 || r.code() != "storage_object_not_found" {
			t.Errorf("rename of a missing file: %d %s", r.status, r.body)
		}
		r := rename("docs/", "archive/docs/")
		var ch struct{ Objects int }
		r.json(t, &ch)
		if r.status != 200 || ch.Objects != 3 {
			t.Fatalf("folder rename: %d %s", r.status, r.body)
		}
		if got, want := e.list(tok, p1, "archive/docs/", true, 50), []string{"archive/docs/b.txt", "archive/docs/big.bin", "archive/docs/sub/deep.txt"}; !equal(got, want) {
			t.Errorf("after the folder rename: %q, want %q", got, want)
		}
		if got := e.list(tok, p1, "docs/", true, 50); len(got) != 0 {
			t.Errorf("the old folder still lists %q", got)
		}
		if r := e.download(tok, p1, "archive/docs/big.bin"); r.status != 200 || sha256.Sum256(r.body) != sha256.Sum256(big) {
			t.Errorf("the moved big file: %d, %d bytes", r.status, len(r.body))
		}
	})
	e.t = t

	t.Run("mkdir and delete", func(t *testing.T) {
		e.t = t
		if r := e.send("POST", "/api/v1/storage/mkdir", tok, map[string]any{"project_id": p1, "path": "empty"}); r.status != 201 {
			t.Fatalf("mkdir: %d %s", r.status, r.body)
		}
		if got := e.list(tok, p1, "", false, 50); !contains(got, "empty/") {
			t.Errorf("the new folder does not list: %q", got)
		}
		if r := e.send("POST", "/api/v1/storage/mkdir", tok, map[string]any{"project_id": p1, "path": "p1/y"}); r.status != 409 {
			t.Errorf("mkdir over a file: %d %s", r.status, r.body)
		}
		del := func(path string, recursive bool) response {
			return e.send("DELETE", "/api/v1/storage/delete?"+q(p1, path, "recursive", fmt.Sprint(recursive)), tok, nil)
		}
		if r := del("archive/", false); r.status != 409 || r.code() != "storage_folder_not_empty" {
			t.Errorf("delete of a full folder without recursive: %d %s", r.status, r.body)
		}
		r := del("archive/", true)
		var ch struct{ Objects int }
		r.json(t, &ch)
		if r.status != 200 || ch.Objects != 3 {
			t.Errorf("recursive delete: %d %s", r.status, r.body)
		}
		if r := del("empty/", false); r.status != 200 {
			t.Errorf("delete of an empty folder: %d %s", r.status, r.body)
		}
		if r := del("p10/x", false); r.status != 200 {
			t.Errorf("file delete: %d %s", r.status, r.body)
		}
		if r := del("p10/x", false); r.status != 404 || r.code() != "storage_object_not_found" {
			t.Errorf("delete again: %d %s", r.status, r.body)
		}
		if got, want := e.list(tok, p1, "", true, 50), []string{"p1/y", "Ünïcødé dir/résumé.txt"}; !equal(got, want) {
			t.Errorf("left: %q, want %q", got, want)
		}
	})
	e.t = t

	t.Run("presigned", func(t *testing.T) {
		e.t = t
		r := e.send("POST", "/api/v1/storage/presign-download", tok, map[string]any{"project_id": p1, "path": "p1/y"})
		var u struct {
			URL     string            `json:"url"`
			Method  string            `json:"method"`
			Headers map[string]string `json:"headers"`
		}
		r.json(t, &u)
		if r.status != 200 || u.Method != "GET" {
			t.Fatalf("presign download: %d %s", r.status, r.body)
		}
		resp, err := http.Get(u.URL)
		if err != nil {
			t.Fatal(err)
		}
		got, _ := io.ReadAll(resp.Body)
		_ = resp.Body.Close()
		if resp.StatusCode != 200 || string(got) != "p1/y" {
			t.Errorf("GET the presigned URL: %d %q", resp.StatusCode, got)
		}

		data := pattern(200_000, 3)
		r = e.send("POST", "/api/v1/storage/presign-upload", tok, map[string]any{"project_id": p1, "path": "direct/data.bin", "size": len(data)})
		var up struct {
			UploadID string            `json:"upload_id"`
			URL      string            `json:"url"`
			Method   string            `json:"method"`
			Headers  map[string]string `json:"headers"`
		}
		r.json(t, &up)
		if r.status != 201 {
			t.Fatalf("presign upload: %d %s", r.status, r.body)
		}
		complete := func() response {
			return e.send("POST", "/api/v1/storage/uploads/"+up.UploadID+"/complete", tok, nil)
		}
		if r := complete(); r.status != 409 || r.code() != "storage_upload_incomplete" {
			t.Errorf("confirm before the PUT: %d %s", r.status, r.body)
		}
		if code := putPresigned(t, &sdkstorage.PresignedURL{URL: up.URL, Method: up.Method, Header: up.Headers}, data[:100]); code == 200 {
			t.Errorf("a presigned PUT of another length than signed: %d", code)
		}
		if code := putPresigned(t, &sdkstorage.PresignedURL{URL: up.URL, Method: up.Method, Header: up.Headers}, data); code != 200 {
			t.Fatalf("presigned PUT: %d", code)
		}
		if r := complete(); r.status != 201 {
			t.Fatalf("confirm: %d %s", r.status, r.body)
		}
		if r := complete(); r.status != 404 || r.code() != "storage_upload_not_found" {
			t.Errorf("confirm twice: %d %s", r.status, r.body)
		}
		if r := e.download(tok, p1, "direct/data.bin"); r.status != 200 || !bytes.Equal(r.body, data) {
			t.Errorf("download of the presigned upload: %d, %d bytes", r.status, len(r.body))
		}
		if r := e.send("POST", "/api/v1/storage/presign-upload", tok, map[string]any{"project_id": p1, "path": "p1/y", "size": 5}); r.status != 409 || r.code() != "storage_object_exists" {
			t.Errorf("presigned upload over a file: %d %s", r.status, r.body)
		}
	})
	e.t = t

	var usage struct{ BytesUsed, Objects, BytesReserved int64 }
	r = e.call("GET", "/api/v1/storage/usage?project_id="+p1.String(), tok, nil)
	if err := json.Unmarshal(r.body, &struct {
		BytesUsed     *int64 `json:"bytes_used"`
		Objects       *int64 `json:"objects"`
		BytesReserved *int64 `json:"bytes_reserved"`
	}{&usage.BytesUsed, &usage.Objects, &usage.BytesReserved}); err != nil || r.status != 200 {
		t.Fatalf("usage: %d %s", r.status, r.body)
	}
	if usage.Objects != 3 || usage.BytesUsed != int64(len("p1/y")+len("Ünïcødé dir/re\u0301sume\u0301.txt")+200_000) || usage.BytesReserved != 0 {
		t.Errorf("usage %+v", usage)
	}
	e.checkMirror(w.orgA, p1)
}

func equal(a, b []string) bool {
	return strings.Join(a, "\x00") == strings.Join(b, "\x00")
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// Every bad path of the issue, through every route, is a 400 with its
// code; nothing reaches the bucket.
func TestStorageBadPaths(t *testing.T) {
	e := newStorageEnv(t, nil, nil)
	w := e.newWorld()
	tok, p1 := w.tokens[member], w.p1
	const traversal, invalid = "storage_path_traversal", "invalid_object_key"
	for _, c := range []struct{ name, path, code string }{
		{"../x", "../x", traversal},
		{"..%2fx", "..%2fx", traversal},
		{"%2e%2e/", "%2e%2e/", traversal},
		{"a/../../b", "a/../../b", traversal},
		{"/abs", "/abs", traversal},
		{`a\..\b`, `a\..\b`, traversal},
		{"a%00b", "a%00b", invalid},
		{"a NUL b", "a\x00b", invalid},
		{"fullwidth dots", "\uFF0E\uFF0E/x", traversal},
		{"RTL override", "report\u202Etxt.exe", invalid},
		{"1025-byte key", strings.Repeat("k", 1025), invalid},
		{"empty key", "", invalid},
	} {
		t.Run(c.name, func(t *testing.T) {
			e.t = t
			check := func(route string, r response) {
				t.Helper()
				if r.status != 400 || r.code() != c.code {
					t.Errorf("%s: %d %s; want 400 %s", route, r.status, r.body, c.code)
				}
			}
			check("upload", e.upload(tok, p1, c.path, []byte("evil")))
			check("chunked upload", e.transfer("PUT", "/api/v1/storage/upload?"+q(p1, c.path), tok, strings.NewReader("evil"), -1))
			check("download", e.download(tok, p1, c.path))
			check("mkdir", e.send("POST", "/api/v1/storage/mkdir", tok, map[string]any{"project_id": p1, "path": c.path}))
			check("rename from", e.send("POST", "/api/v1/storage/rename", tok, map[string]any{"project_id": p1, "from": c.path, "to": "ok.txt"}))
			check("rename to", e.send("POST", "/api/v1/storage/rename", tok, map[string]any{"project_id": p1, "from": "ok.txt", "to": c.path}))
			check("delete", e.send("DELETE", "/api/v1/storage/delete?"+q(p1, c.path, "recursive", "true"), tok, nil))
			check("presign download", e.send("POST", "/api/v1/storage/presign-download", tok, map[string]any{"project_id": p1, "path": c.path}))
			check("presign upload", e.send("POST", "/api/v1/storage/presign-upload", tok, map[string]any{"project_id": p1, "path": c.path, "size": 4}))
			if c.path != "" { // an empty prefix is the root
				check("list", e.call("GET", "/api/v1/storage/list?"+url.Values{"project_id": {p1.String()}, "prefix": {c.path}}.Encode(), tok, nil))
			}
		})
	}
	e.t = t
	if got := e.storage.bucketObjects(t); len(got) != 0 {
		keys := make([]string, 0, len(got))
		for k := range got {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		t.Errorf("bad paths wrote to the bucket: %q", keys)
	}
	var rows int
	_ = e.pool.QueryRow(context.Background(), `SELECT count(*) FROM storage_objects`).Scan(&rows)
	if rows != 0 {
		t.Errorf("bad paths left %d metadata rows", rows)
	}
}

// setQuota sets a project's storage quota through the admin API and waits
// until the core applies it.
func (e *env) setQuota(w *world, project uuid.UUID, quota int64) {
	e.t.Helper()
	if r := e.send("PUT", "/api/v1/admin/policies/"+policy.StorageQuota.Def().Key, w.tokens[platAdmin],
		map[string]any{"scope": "project", "scope_id": project.String(), "value": quota}); r.status >= 300 {
		e.t.Fatalf("setting the quota: %d %s", r.status, r.body)
	}
	for deadline := time.Now().Add(10 * time.Second); ; {
		var u struct {
			QuotaBytes int64 `json:"quota_bytes"`
		}
		e.call("GET", "/api/v1/storage/usage?project_id="+project.String(), w.tokens[platAdmin], nil).json(e.t, &u)
		if u.QuotaBytes == quota {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("the core still sees quota %d, not %d", u.QuotaBytes, quota)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Twenty uploads race for a quota that fits ten: exactly ten succeed, the
// rest answer 413 and leave nothing. A chunked upload is cut where it
// passes the quota, its multipart upload aborted. The bucket and the
// metadata agree throughout.
func TestStorageQuotaRace(t *testing.T) {
	e := newStorageEnv(t, nil, nil)
	w := e.newWorld()
	tok, p1 := w.tokens[member], w.p1
	const size, fits, racers = 1 << 20, 10, 20
	e.setQuota(w, p1, fits*size+size/2)
	var wg sync.WaitGroup
	results := make([]response, racers)
	audited := e.auditCount("success")
	for i := range racers {
		wg.Go(func() {
			data := pattern(size, byte(i))
			results[i] = e.rawTransfer("PUT", "/api/v1/storage/upload?"+q(p1, fmt.Sprintf("race/%02d.bin", i)), tok, bytes.NewReader(data), int64(len(data)))
		})
	}
	wg.Wait()
	if n := e.auditCount("success") - audited; n != fits {
		t.Errorf("the race wrote %d success audit rows, want one per stored upload (%d)", n, fits)
	}
	ok, refused := 0, 0
	for i, r := range results {
		switch {
		case r.status == 201:
			ok++
		case r.status == 413 && r.code() == "storage_quota_exceeded":
			refused++
		default:
			t.Errorf("upload %d: %d %s", i, r.status, r.body)
		}
	}
	if ok != fits || refused != racers-fits {
		t.Errorf("%d uploads stored and %d refused; want %d and %d", ok, refused, fits, racers-fits)
	}
	e.checkMirror(w.orgA, p1)

	// 12.5 MiB more: a chunked upload of 20 MiB sends two 5 MiB parts and
	// is cut in the third; one of a quarter MiB fits.
	e.setQuota(w, p1, fits*size+25*size/2)
	big := pattern(20*size, 9)
	if r := e.transfer("PUT", "/api/v1/storage/upload?"+q(p1, "chunked/over.bin"), tok, bytes.NewReader(big), -1); r.status != 413 || r.code() != "storage_quota_exceeded" {
		t.Errorf("a chunked upload past the quota: %d %s", r.status, r.body)
	}
	if n := e.storage.multipartUploads(t); n != 0 {
		t.Errorf("%d multipart uploads left in progress", n)
	}
	if r := e.upload(tok, p1, "declared/over.bin", big); r.status != 413 || r.code() != "storage_quota_exceeded" {
		t.Errorf("a declared upload past the quota: %d %s", r.status, r.body)
	}
	if r := e.transfer("PUT", "/api/v1/storage/upload?"+q(p1, "chunked/fits.bin"), tok, bytes.NewReader(pattern(size/4, 1)), -1); r.status != 201 {
		t.Errorf("a chunked upload that fits: %d %s", r.status, r.body)
	}
	e.checkMirror(w.orgA, p1)
	m := string(e.call("GET", "/metrics", "", nil).body)
	for _, want := range []string{
		`gpuaas_storage_uploads_aborted_total{reason="quota"} 1`,
		`gpuaas_storage_operations_total{operation="upload",result="storage_quota_exceeded"} 12`,
		`gpuaas_storage_operations_total{operation="upload",result="ok"} 11`,
	} {
		if !strings.Contains(m, want+"\n") {
			t.Errorf("metrics lack %s", want)
		}
	}
}

// A project of another tenant is 404 on every route; a viewer reads but
// does not write (403, audited as denied).
func TestStorageTenancy(t *testing.T) {
	e := newEnv(t)
	w := e.newWorld()
	pb := w.pb
	other := e.newWorld()
	for _, r := range []struct {
		name string
		resp response
	}{
		{"list", e.call("GET", "/api/v1/storage/list?project_id="+pb.String(), w.tokens[orgAdmin], nil)},
		{"download", e.download(w.tokens[orgAdmin], pb, "x")},
		{"upload", e.upload(w.tokens[orgAdmin], pb, "x", []byte("x"))},
		{"delete", e.send("DELETE", "/api/v1/storage/delete?"+q(pb, "x"), w.tokens[orgAdmin], nil)},
		{"complete another world's upload", e.send("POST", "/api/v1/storage/uploads/"+other.storageUpload.String()+"/complete", w.tokens[orgAdmin], nil)},
		{"download another world's file", e.download(w.tokens[orgAdmin], other.p1, other.storedPath)},
	} {
		if r.resp.status != 404 {
			t.Errorf("%s in a foreign project: %d %s; want 404", r.name, r.resp.status, r.resp.body)
		}
	}
	deniedBefore := e.auditCount("denied")
	if r := e.upload(w.tokens[viewer], w.p1, "viewer.txt", []byte("no")); r.status != 403 {
		t.Errorf("viewer upload: %d %s; want 403", r.status, r.body)
	}
	if e.auditCount("denied") != deniedBefore+1 {
		t.Error("the refused upload left no denied audit row")
	}
	if r := e.download(w.tokens[viewer], w.p1, w.storedPath); r.status != 200 || string(r.body) != "fixture report\n" {
		t.Errorf("viewer download: %d %s", r.status, r.body)
	}
	if _, found := e.storage.bucketObjects(t)[fmt.Sprintf("orgs/%s/projects/%s/viewer.txt", w.orgA, w.p1)]; found {
		t.Error("the viewer's upload reached the bucket")
	}
}

// An upload holds its path: a second writer is 409 storage_path_busy until
// it ends. An upload whose client goes away midway stores nothing and
// gives its reservation back.
func TestStoragePathBusyAndAbort(t *testing.T) {
	e := newStorageEnv(t, nil, nil)
	w := e.newWorld()
	tok, p1 := w.tokens[member], w.p1
	ctx := context.Background()
	inflight := func() int {
		var n int
		_ = e.pool.QueryRow(ctx, `SELECT count(*) FROM storage_inflight WHERE project_id = $1`, p1).Scan(&n)
		return n
	}
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); !cond(); {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}

	// The server reads the first 8 KiB of a body before the route runs.
	slow := pattern(64<<10, 1)
	pr, pw := io.Pipe()
	done := make(chan response, 1)
	go func() {
		done <- e.rawTransfer("PUT", "/api/v1/storage/upload?"+q(p1, "slow.bin"), tok, pr, int64(len(slow)))
	}()
	if _, err := pw.Write(slow[:16<<10]); err != nil {
		t.Fatal(err)
	}
	waitFor("the upload to hold its path", func() bool { return inflight() == 1 })
	if r := e.upload(tok, p1, "slow.bin", []byte("other")); r.status != 409 || r.code() != "storage_path_busy" {
		t.Errorf("a second upload to a busy path: %d %s", r.status, r.body)
	}
	if r := e.send("POST", "/api/v1/storage/presign-upload", tok, map[string]any{"project_id": p1, "path": "slow.bin", "size": 3}); r.status != 409 || r.code() != "storage_path_busy" {
		t.Errorf("a presigned upload to a busy path: %d %s", r.status, r.body)
	}
	_, _ = pw.Write(slow[16<<10:])
	_ = pw.Close()
	if r := <-done; r.status != 201 {
		t.Fatalf("the slow upload: %d %s", r.status, r.body)
	}
	if r := e.download(tok, p1, "slow.bin"); !bytes.Equal(r.body, slow) {
		t.Errorf("the slow upload holds %d other bytes", len(r.body))
	}

	// A client that goes away after 6 MiB of a 12 MiB upload (past the
	// first 5 MiB part).
	pr, pw = io.Pipe()
	gone := make(chan error, 1)
	go func() {
		req, _ := http.NewRequest("PUT", e.url+"/api/v1/storage/upload?"+q(p1, "gone.bin"), pr)
		req.ContentLength = 12 * mib
		req.Header.Set("Authorization", "Bearer "+tok)
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			_ = resp.Body.Close()
			err = fmt.Errorf("status %d", resp.StatusCode)
		}
		gone <- err
	}()
	if _, err := pw.Write(pattern(6*mib, 5)); err != nil {
		t.Fatal(err)
	}
	waitFor("the upload to hold its path", func() bool { return inflight() == 1 })
	_ = pw.CloseWithError(errors.New("client gone"))
	if err := <-gone; err == nil || !strings.Contains(err.Error(), "client gone") {
		t.Errorf("the abandoned request: %v", err)
	}
	waitFor("the reservation to go back", func() bool { return inflight() == 0 })
	if n := e.storage.multipartUploads(t); n != 0 {
		t.Errorf("%d multipart uploads left in progress", n)
	}
	e.checkMirror(w.orgA, p1)
	if m := string(e.call("GET", "/metrics", "", nil).body); !strings.Contains(m, `gpuaas_storage_uploads_aborted_total{reason="client"} 1`+"\n") {
		t.Errorf("the abandoned upload is not counted in gpuaas_storage_uploads_aborted_total: %s", grepLines(m, "gpuaas_storage_uploads_aborted_total"))
	}
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// A transfer may take much longer than GPUAAS_REQUEST_TIMEOUT while it
// moves, and ends when it stalls for that long.
func TestStorageTransferDeadlines(t *testing.T) {
	e := newStorageEnv(t, nil, nil, "GPUAAS_REQUEST_TIMEOUT", "1s")
	w := e.newWorld()
	tok, p1 := w.tokens[member], w.p1
	const piece, pieces = 64 << 10, 25
	data := pattern(piece*pieces, 8)
	slowly := func(stall bool) io.Reader {
		pr, pw := io.Pipe()
		go func() {
			for i := range pieces {
				if _, err := pw.Write(data[i*piece : (i+1)*piece]); err != nil {
					return
				}
				pause := 100 * time.Millisecond
				if stall && i == 2 {
					pause = 3 * time.Second
				}
				time.Sleep(pause)
			}
			_ = pw.Close()
		}()
		return pr
	}
	start := time.Now()
	if r := e.transfer("PUT", "/api/v1/storage/upload?"+q(p1, "slow.bin"), tok, slowly(false), int64(len(data))); r.status != 201 {
		t.Fatalf("a slow upload: %d %s", r.status, r.body)
	}
	if took := time.Since(start); took < 2*time.Second {
		t.Fatalf("the slow upload took only %s", took)
	}

	// A slow reader of a download: 64 KiB every 100 ms, well past the
	// request timeout in all.
	big := pattern(16*mib, 4)
	if r := e.upload(tok, p1, "big.bin", big); r.status != 201 {
		t.Fatalf("upload: %d %s", r.status, r.body)
	}
	req, _ := http.NewRequest("GET", e.url+"/api/v1/storage/download?"+q(p1, "big.bin"), nil)
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var got bytes.Buffer
	start = time.Now()
	for {
		n, err := io.CopyN(&got, resp.Body, 1<<20)
		if err == io.EOF || n == 0 {
			break
		}
		if err != nil {
			t.Fatalf("a slow download broke after %d bytes and %s: %v", got.Len(), time.Since(start), err)
		}
		time.Sleep(300 * time.Millisecond)
	}
	_ = resp.Body.Close()
	if !bytes.Equal(got.Bytes(), big) || time.Since(start) < 3*time.Second {
		t.Errorf("the slow download: %d bytes in %s", got.Len(), time.Since(start))
	}

	// An upload that stalls for 3 s is cut, stores nothing and lets its
	// path go.
	req, _ = http.NewRequest("PUT", e.url+"/api/v1/storage/upload?"+q(p1, "stalled.bin"), slowly(true))
	req.ContentLength = int64(len(data))
	req.Header.Set("Authorization", "Bearer "+tok)
	if resp, err := http.DefaultClient.Do(req); err == nil {
		_ = resp.Body.Close()
		if resp.StatusCode < 400 {
			t.Errorf("a stalled upload: %d", resp.StatusCode)
		}
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		var n int
		_ = e.pool.QueryRow(context.Background(), `SELECT count(*) FROM storage_inflight WHERE project_id = $1`, p1).Scan(&n)
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the stalled upload still holds its path")
		}
	}
	e.checkMirror(w.orgA, p1)
}
