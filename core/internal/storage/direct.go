package storage

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/netguard"
	sdkstorage "github.com/gpuaas/gpuaas/sdk/storage"
)

// The direct data path: the core moves an object's bytes to and from the
// store itself over URLs the driver presigns for each transfer, instead of
// through the plugin's gRPC stream. The driver still decides every access
// (it signs or refuses); the bytes skip a process hop.
//
//   - Downloads: one presigned GET (with Range when asked), when the driver
//     can presign (storage.Presigner).
//   - Uploads of a known size of at least directPutMin: a multipart upload
//     the driver starts and completes (storage.MultipartUploader) whose
//     parts the core PUTs over presigned URLs. The object appears only at
//     completion, so a broken upload leaves nothing behind (a single
//     presigned PUT would not: some S3 servers keep what arrived).
//
// Anything else, and drivers without the capability, take the streamed
// path through the driver.

// directExpiry is how long a URL for one transfer stays valid: long enough
// to start it (a started transfer is not cut by the expiry).
const directExpiry = 5 * time.Minute

// direct wraps a driver with the direct data path.
type direct struct {
	sdkstorage.Driver
	ps     sdkstorage.Presigner
	client *http.Client
	// dial, when set, makes downloads over plain http relay their body
	// (relayGet) instead of going through client.
	dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// off is set once the driver answered that it cannot presign; mpOff
	// once it answered that it has no multipart uploads.
	off, mpOff *atomic.Bool
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

// newDirectClient is the client of presigned URLs: no proxy, no redirects,
// and never a link-local or cloud metadata address, whatever a URL's name
// resolves to (netguard).
func newDirectClient() *http.Client {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.Proxy = nil
	t.DialContext = directDial
	t.MaxIdleConnsPerHost = 16
	t.ReadBufferSize = 256 << 10
	return &http.Client{Transport: t,
		// A presigned URL names its object; a redirect would be to something else.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
}

// directDial dials a store for the direct data path: never a link-local or
// cloud metadata address.
var directDial = (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second, Control: netguard.DialControl}).DialContext

// checkPresigned refuses a URL the core must not fetch: not http(s).
func checkPresigned(u *sdkstorage.PresignedURL) error {
	if pu, err := url.Parse(u.URL); err != nil || (pu.Scheme != "http" && pu.Scheme != "https") {
		return fmt.Errorf("storage: the driver presigned %q, not an http(s) URL: %w", u.URL, base.ErrInternal)
	}
	return nil
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
	if err := checkPresigned(u); err != nil {
		return nil, false, err
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
	var resp *http.Response
	if d.dial != nil && hreq.URL.Scheme == "http" {
		resp, err = relayGet(ctx, d.dial, hreq)
	} else {
		resp, err = d.client.Do(hreq)
	}
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
	if _, exact := resp.Body.(*relayBody); exact {
		return &sdkstorage.Object{Info: info, Body: resp.Body}, nil
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

// Direct uploads: parts of directPartSize (larger for objects that would
// need more than MaxParts), directConcurrency in flight while the next one
// is read, so an upload holds at most directConcurrency+1 parts in memory.
const (
	directPartSize    = 8 << 20
	directMaxPartSize = 32 << 20
	directPutMin      = 2 * directPartSize
	directConcurrency = 2
	directPartTries   = 2
)

// directPartSizeFor is the part size of a direct upload of size bytes, or 0
// when it should stream through the driver.
func directPartSizeFor(size int64) int64 {
	if size < directPutMin {
		return 0
	}
	part := max(int64(directPartSize), (size+sdkstorage.MaxParts-1)/sdkstorage.MaxParts)
	if part > directMaxPartSize {
		return 0
	}
	return part
}

// Put uploads a body of known size as a multipart upload whose parts the
// core sends over presigned URLs; other bodies stream through the driver.
func (d direct) Put(ctx context.Context, req *sdkstorage.PutRequest, body io.Reader) (*sdkstorage.ObjectInfo, error) {
	mu, ok := d.Driver.(sdkstorage.MultipartUploader)
	part := directPartSizeFor(req.Size)
	if !ok || part == 0 || d.mpOff.Load() {
		return d.Driver.Put(ctx, req, body)
	}
	id, err := mu.StartMultipart(ctx, &sdkstorage.StartMultipartRequest{OperationID: req.OperationID, Key: req.Key, ContentType: req.ContentType})
	if errors.Is(err, base.ErrUnimplemented) {
		d.mpOff.Store(true)
		return d.Driver.Put(ctx, req, body)
	}
	if err != nil {
		return nil, err
	}
	parts, err := d.putParts(ctx, mu, req, id, part, body)
	if err != nil {
		actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if aerr := mu.AbortMultipart(actx, &sdkstorage.AbortMultipartRequest{Key: req.Key, UploadID: id}); aerr != nil {
			err = fmt.Errorf("%w (and aborting the upload: %v)", err, aerr)
		}
		return nil, err
	}
	info, err := mu.CompleteMultipart(ctx, &sdkstorage.CompleteMultipartRequest{OperationID: req.OperationID, Key: req.Key, UploadID: id, Parts: parts})
	if err != nil {
		return nil, err
	}
	if info.Size != req.Size {
		return nil, fmt.Errorf("storage: direct put %q: the store holds %d bytes, not %d: %w", req.Key, info.Size, req.Size, base.ErrInternal)
	}
	return info, nil
}

// putParts reads the body part by part and PUTs each over its presigned
// URL, directConcurrency at a time. The first failure stops the reading and
// cancels the parts in flight.
func (d direct) putParts(ctx context.Context, mu sdkstorage.MultipartUploader, req *sdkstorage.PutRequest, id string, part int64,
	body io.Reader) ([]sdkstorage.CompletedPart, error) {
	n := int((req.Size + part - 1) / part)
	parts := make([]sdkstorage.CompletedPart, n)
	pctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		mu2      sync.Mutex
		firstErr error
		wg       sync.WaitGroup
	)
	fail := func(err error) {
		mu2.Lock()
		defer mu2.Unlock()
		if firstErr == nil {
			firstErr = err
			cancel()
		}
	}
	sem := make(chan struct{}, directConcurrency)
	bufs := newPartBuffers(part)
	for i := range n {
		size := min(part, req.Size-int64(i)*part)
		buf, release := bufs.get(size)
		if _, err := io.ReadFull(body, buf); err != nil {
			release()
			fail(fmt.Errorf("storage: direct put %q: reading part %d: %w", req.Key, i+1, err))
			break
		}
		select {
		case sem <- struct{}{}:
		case <-pctx.Done():
		}
		if pctx.Err() != nil {
			release()
			break
		}
		wg.Go(func() {
			defer func() { <-sem; release() }()
			etag, err := d.putPart(pctx, mu, req.Key, id, i+1, buf)
			if err != nil {
				fail(err)
				return
			}
			parts[i] = sdkstorage.CompletedPart{Number: i + 1, ETag: etag}
		})
	}
	wg.Wait()
	if firstErr == nil && ctx.Err() != nil {
		firstErr = ctx.Err()
	}
	return parts, firstErr
}

// partBuffers hands out the buffers of one upload: at most
// directConcurrency+1 of them exist (the parts in flight and the one being
// read), each made once and reused.
type partBuffers struct {
	size int64
	free chan []byte
	made int
}

func newPartBuffers(size int64) *partBuffers {
	return &partBuffers{size: size, free: make(chan []byte, directConcurrency+1)}
}

// get is a buffer of n bytes and the func that gives it back. The caller
// holds at most directConcurrency+1 at once (the semaphore in putParts).
func (p *partBuffers) get(n int64) ([]byte, func()) {
	var b []byte
	select {
	case b = <-p.free:
	default:
		if p.made < directConcurrency+1 {
			p.made++
			b = make([]byte, p.size)
		} else {
			b = <-p.free
		}
	}
	return b[:n], func() { p.free <- b[:cap(b)] }
}

// putPart PUTs one part over a URL presigned for it (a new one for a
// retry) and returns the part's ETag.
func (d direct) putPart(ctx context.Context, mu sdkstorage.MultipartUploader, key, id string, number int, data []byte) (string, error) {
	var err error
	for range directPartTries {
		var u *sdkstorage.PresignedURL
		u, err = mu.PresignPart(ctx, &sdkstorage.PresignPartRequest{Key: key, UploadID: id, PartNumber: number, Size: int64(len(data)), Expiry: directExpiry})
		if err != nil {
			return "", err
		}
		var etag string
		if etag, err = d.sendPart(ctx, u, key, number, data); err == nil {
			return etag, nil
		}
		if ctx.Err() != nil || !errors.Is(err, base.ErrUnavailable) {
			return "", err
		}
	}
	return "", err
}

func (d direct) sendPart(ctx context.Context, u *sdkstorage.PresignedURL, key string, number int, data []byte) (string, error) {
	if err := checkPresigned(u); err != nil {
		return "", err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, u.URL, bytes.NewReader(data))
	if err != nil {
		return "", err
	}
	req.ContentLength = int64(len(data))
	for k, v := range u.Header {
		req.Header.Set(k, v)
	}
	resp, err := d.client.Do(req)
	if err != nil {
		return "", fmt.Errorf("storage: direct put %q part %d: %v: %w", key, number, err, base.ErrUnavailable)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return "", storeError(fmt.Sprintf("put part %d of", number), key, resp)
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	etag := resp.Header.Get("ETag")
	if etag == "" {
		return "", fmt.Errorf("storage: direct put %q part %d: the store answered no ETag: %w", key, number, base.ErrInternal)
	}
	return etag, nil
}
