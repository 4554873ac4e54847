package storage

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/gpuaas/gpuaas/sdk/base"
	sdkstorage "github.com/gpuaas/gpuaas/sdk/storage"
)

// The direct data path: when the driver can presign, the core reads an
// object's bytes from the store itself over a URL the driver signs for that
// one transfer, instead of through the plugin's gRPC stream. The driver still
// decides every access (it signs or refuses); the bytes skip a process hop.
// Drivers that cannot presign keep the streamed path. Uploads always stream
// through the driver: its Put is atomic on every store (multipart), where a
// broken presigned PUT may leave a truncated object on some S3 servers.

// directExpiry is how long a URL for one transfer stays valid: long enough
// to start it (a started transfer is not cut by the expiry).
const directExpiry = 5 * time.Minute

// direct wraps a driver with the direct data path.
type direct struct {
	sdkstorage.Driver
	ps     sdkstorage.Presigner
	client *http.Client
	// off is set once the driver answered that it cannot presign.
	off *atomic.Bool
}

var (
	_ sdkstorage.RangeGetter = direct{}
	_ sdkstorage.Presigner   = direct{}
)

// PresignGet implements sdkstorage.Presigner (the presign routes).
func (d direct) PresignGet(ctx context.Context, req *sdkstorage.PresignRequest) (*sdkstorage.PresignedURL, error) {
	return d.ps.PresignGet(ctx, req)
}

// PresignPut implements sdkstorage.Presigner.
func (d direct) PresignPut(ctx context.Context, req *sdkstorage.PresignRequest) (*sdkstorage.PresignedURL, error) {
	return d.ps.PresignPut(ctx, req)
}

func newDirectClient() *http.Client {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.Proxy = nil
	t.MaxIdleConnsPerHost = 16
	t.ReadBufferSize = 256 << 10
	return &http.Client{Transport: t,
		// A presigned URL names its object; a redirect would be to something else.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
}

// presign asks the driver for a URL; ok is false when the driver cannot
// presign (then the caller takes the streamed path).
func (d direct) presign(ctx context.Context, req *sdkstorage.PresignRequest) (*sdkstorage.PresignedURL, bool, error) {
	if d.off.Load() {
		return nil, false, nil
	}
	var u *sdkstorage.PresignedURL
	var err error
	u, err = d.ps.PresignGet(ctx, req)
	if errors.Is(err, base.ErrUnimplemented) {
		d.off.Store(true)
		return nil, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	if pu, perr := url.Parse(u.URL); perr != nil || (pu.Scheme != "http" && pu.Scheme != "https") {
		return nil, false, fmt.Errorf("storage: the driver presigned %q, not an http(s) URL: %w", u.URL, base.ErrInternal)
	}
	return u, true, nil
}

func (d direct) request(ctx context.Context, u *sdkstorage.PresignedURL) (*http.Request, error) {
	if u.Method != "" && u.Method != http.MethodGet {
		return nil, fmt.Errorf("storage: the driver presigned a %s, not a GET: %w", u.Method, base.ErrInternal)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.URL, nil)
	if err != nil {
		return nil, err
	}
	for k, v := range u.Header {
		req.Header.Set(k, v)
	}
	return req, nil
}

// storeError turns a refused transfer into the driver contract's errors.
func storeError(op, key string, resp *http.Response) error {
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
	var kind error
	switch resp.StatusCode {
	case http.StatusNotFound:
		kind = base.ErrNotFound
	case http.StatusForbidden, http.StatusUnauthorized:
		kind = base.ErrPermissionDenied
	case http.StatusRequestedRangeNotSatisfiable:
		kind = base.ErrInvalidArgument
	case http.StatusTooManyRequests, http.StatusServiceUnavailable, http.StatusBadGateway, http.StatusGatewayTimeout:
		kind = base.ErrUnavailable
	default:
		kind = base.ErrInternal
	}
	return fmt.Errorf("storage: direct %s %q: the store answered %s: %s: %w", op, key, resp.Status, strings.TrimSpace(string(msg)), kind)
}

// Get reads the whole object with a presigned GET.
func (d direct) Get(ctx context.Context, key string) (*sdkstorage.Object, error) {
	return d.get(ctx, key, nil)
}

// GetRange reads part of the object with a presigned GET and a Range
// header.
func (d direct) GetRange(ctx context.Context, key string, r sdkstorage.Range) (*sdkstorage.Object, error) {
	return d.get(ctx, key, &r)
}

func (d direct) get(ctx context.Context, key string, r *sdkstorage.Range) (*sdkstorage.Object, error) {
	u, ok, err := d.presign(ctx, &sdkstorage.PresignRequest{Key: key, Expiry: directExpiry})
	if err != nil {
		return nil, err
	}
	if !ok {
		if r != nil {
			return sdkstorage.GetRange(ctx, d.Driver, key, *r)
		}
		return d.Driver.Get(ctx, key)
	}
	hreq, err := d.request(ctx, u)
	if err != nil {
		return nil, err
	}
	if r != nil {
		if err := r.Check(); err != nil {
			return nil, fmt.Errorf("storage: get %q: %w", key, err)
		}
		if r.Length == sdkstorage.ToEnd {
			hreq.Header.Set("Range", fmt.Sprintf("bytes=%d-", r.Offset))
		} else {
			hreq.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", r.Offset, r.Offset+r.Length-1))
		}
	}
	resp, err := d.client.Do(hreq)
	if err != nil {
		return nil, fmt.Errorf("storage: direct get %q: %w", key, err)
	}
	info := sdkstorage.ObjectInfo{Key: key, ContentType: resp.Header.Get("Content-Type"), ETag: resp.Header.Get("ETag")}
	if t, err := http.ParseTime(resp.Header.Get("Last-Modified")); err == nil {
		info.ModTime = t
	}
	switch {
	case resp.StatusCode == http.StatusOK:
		info.Size = resp.ContentLength
		if r != nil { // the store ignored the range: cut it here
			obj, err := sdkstorage.CutRange(&sdkstorage.Object{Info: info, Body: resp.Body}, *r)
			if err != nil {
				resp.Body.Close()
			}
			return obj, err
		}
	case resp.StatusCode == http.StatusPartialContent && r != nil:
		total, err := contentRangeTotal(resp.Header.Get("Content-Range"))
		if err != nil {
			resp.Body.Close()
			return nil, fmt.Errorf("storage: direct get %q: %w: %w", key, err, base.ErrInternal)
		}
		info.Size = total
	case resp.StatusCode == http.StatusRequestedRangeNotSatisfiable && r != nil:
		// A range past the end holds no bytes; the driver answers that
		// as the contract says.
		resp.Body.Close()
		return sdkstorage.GetRange(ctx, d.Driver, key, *r)
	default:
		defer resp.Body.Close()
		return nil, storeError("get", key, resp)
	}
	if resp.ContentLength < 0 {
		resp.Body.Close()
		return nil, fmt.Errorf("storage: direct get %q: the store sent no Content-Length: %w", key, base.ErrInternal)
	}
	return &sdkstorage.Object{Info: info, Body: &exactBody{r: resp.Body, left: resp.ContentLength}}, nil
}

// contentRangeTotal reads the object size from "bytes a-b/total".
func contentRangeTotal(h string) (int64, error) {
	_, total, ok := strings.Cut(h, "/")
	if !ok || !strings.HasPrefix(h, "bytes ") {
		return 0, fmt.Errorf("bad Content-Range %q", h)
	}
	n, err := strconv.ParseInt(total, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("bad Content-Range %q", h)
	}
	return n, nil
}

// exactBody fails a body that ends before its announced length.
type exactBody struct {
	r    io.ReadCloser
	left int64
}

func (b *exactBody) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	b.left -= int64(n)
	if err == io.EOF && b.left > 0 {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

func (b *exactBody) Close() error { return b.r.Close() }
