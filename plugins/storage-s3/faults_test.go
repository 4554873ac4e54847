package s3store_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"syscall"
	"testing"

	"github.com/aws/aws-sdk-go-v2/service/s3"

	s3store "github.com/gpuaas/gpuaas/plugins/storage-s3"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/storage"
)

var _ s3.HTTPClient = (*faultyHTTP)(nil)

// faultyHTTP sends requests to the real server through the driver's
// HTTP client and lets break replace what comes back for the requests it
// picks (operation records excepted).
type faultyHTTP struct {
	next      s3.HTTPClient
	breakResp func(req *http.Request, resp *http.Response) (*http.Response, error)
}

func (f *faultyHTTP) Do(req *http.Request) (*http.Response, error) {
	resp, err := f.next.Do(req)
	if err != nil || !strings.Contains(req.URL.Path, "/faults/") {
		return resp, err
	}
	return f.breakResp(req, resp)
}

// s3Error is an S3 error response.
func s3Error(req *http.Request, resp *http.Response, status int, code string) (*http.Response, error) {
	if resp != nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		_ = resp.Body.Close()
	}
	body := fmt.Sprintf(`<?xml version="1.0" encoding="UTF-8"?><Error><Code>%s</Code><Message>injected</Message></Error>`, code)
	if req.Method == http.MethodHead {
		body = ""
	}
	return &http.Response{
		StatusCode: status, Status: fmt.Sprintf("%d %s", status, http.StatusText(status)), Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: http.Header{"Content-Type": {"application/xml"}}, Body: io.NopCloser(strings.NewReader(body)),
		ContentLength: int64(len(body)), Request: req,
	}, nil
}

// cutBody ends a body after n bytes with a broken connection.
type cutBody struct {
	io.Reader
	rc io.Closer
}

func (c cutBody) Close() error { return c.rc.Close() }

// TestBackendFaults checks what callers see when the server or the
// connection fails: the SDK sentinels, and no incomplete upload left.
func TestBackendFaults(t *testing.T) {
	t.Parallel()
	s := newSetup(t, map[string]any{"part_size_bytes": 5 * mib})
	data := randomBytes(t, 256<<10)
	s.put(t, "faults/object", data, "")
	for _, c := range []struct {
		name      string
		breakResp func(req *http.Request, resp *http.Response) (*http.Response, error)
		call      func(d *s3store.Driver) error
		want      error
		cfg       map[string]any // over s.cfg
	}{
		{"connection drops mid-body", func(req *http.Request, resp *http.Response) (*http.Response, error) {
			if req.Method == http.MethodGet {
				resp.Body = cutBody{Reader: io.MultiReader(io.LimitReader(resp.Body, 1000), iotestErr(syscall.ECONNRESET)), rc: resp.Body}
			}
			return resp, nil
		}, func(d *s3store.Driver) error {
			obj, err := d.Get(s.ctx, "faults/object")
			if err != nil {
				return err
			}
			defer func() { _ = obj.Body.Close() }()
			_, err = io.Copy(io.Discard, obj.Body)
			return err
		}, base.ErrUnavailable, nil},
		{"server slows down", func(req *http.Request, resp *http.Response) (*http.Response, error) {
			return s3Error(req, resp, http.StatusServiceUnavailable, "SlowDown")
		}, func(d *s3store.Driver) error {
			_, err := d.Stat(s.ctx, "faults/object")
			return err
		}, base.ErrUnavailable, nil},
		{"access denied", func(req *http.Request, resp *http.Response) (*http.Response, error) {
			return s3Error(req, resp, http.StatusForbidden, "AccessDenied")
		}, func(d *s3store.Driver) error {
			_, err := d.Get(s.ctx, "faults/object")
			return err
		}, base.ErrPermissionDenied, nil},
		{"source changed during the copy", func(req *http.Request, resp *http.Response) (*http.Response, error) {
			if req.Header.Get("X-Amz-Copy-Source") != "" {
				return s3Error(req, resp, http.StatusPreconditionFailed, "PreconditionFailed")
			}
			return resp, nil
		}, func(d *s3store.Driver) error {
			_, err := d.Copy(s.ctx, &storage.CopyRequest{OperationID: s.op(), SourceKey: "faults/object", DestKey: "faults/copy"})
			return err
		}, base.ErrConflict, nil},
		{"a part upload keeps failing", func(req *http.Request, resp *http.Response) (*http.Response, error) {
			if req.URL.Query().Has("partNumber") {
				return s3Error(req, resp, http.StatusInternalServerError, "InternalError")
			}
			return resp, nil
		}, func(d *s3store.Driver) error {
			_, err := d.Put(s.ctx, &storage.PutRequest{OperationID: s.op(), Key: "faults/multipart", Size: 11 * mib}, bytes.NewReader(make([]byte, 11*mib)))
			return err
		}, base.ErrUnavailable, nil},
		{"one of three parts in flight fails", func(req *http.Request, resp *http.Response) (*http.Response, error) {
			if req.URL.Query().Get("partNumber") == "2" {
				return s3Error(req, resp, http.StatusBadRequest, "InvalidArgument")
			}
			return resp, nil
		}, func(d *s3store.Driver) error {
			_, err := d.Put(s.ctx, &storage.PutRequest{OperationID: s.op(), Key: "faults/multipart", Size: -1}, bytes.NewReader(make([]byte, 31*mib)))
			return err
		}, base.ErrInvalidArgument, map[string]any{"upload_concurrency": 3}},
	} {
		t.Run(c.name, func(t *testing.T) {
			d := s3store.New(nullLogger(), s3store.WithHTTPClient(&faultyHTTP{next: s3store.DefaultHTTPClient(), breakResp: c.breakResp}))
			if err := configure(s.ctx, d, maps(s.cfg, c.cfg)); err != nil {
				t.Fatal(err)
			}
			if err := c.call(d); !errors.Is(err, c.want) {
				t.Fatalf("got %v, want an error matching %v", err, c.want)
			}
			if ups := server.uploads(t, s.prefix); len(ups) != 0 {
				t.Errorf("%d incomplete multipart uploads left", len(ups))
			}
		})
	}
	if _, err := s.d.Stat(s.ctx, "faults/multipart"); !errors.Is(err, base.ErrNotFound) {
		t.Errorf("Stat of the failed multipart Put: %v, want base.ErrNotFound", err)
	}
}

// iotestErr is a reader that fails with err.
func iotestErr(err error) io.Reader { return errReader{err} }

type errReader struct{ err error }

func (e errReader) Read([]byte) (int, error) { return 0, e.err }
