// Package storage is the contract of a storage driver: objects addressed by
// key inside the bucket an instance is configured for. Put and Get stream;
// no layer between the core and the backend holds a whole object.
package storage

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/gpuaas/gpuaas/sdk/base"
)

// Driver is what a storage driver implements. Errors wrap the base
// sentinels (base.ErrNotFound, ...). Calls that change state carry an
// OperationID: a call repeated with the same OperationID has one effect and
// returns the same result; reusing an OperationID with different arguments
// returns base.ErrConflict.
type Driver interface {
	base.BasePlugin

	// Put stores body under req.Key. body yields exactly req.Size bytes
	// when Size >= 0, and fails (never io.EOF) if the caller goes away
	// early: a failed Put must not leave a partial object behind. A Put
	// repeated with the same OperationID returns the first result and need
	// not read body.
	Put(ctx context.Context, req *PutRequest, body io.Reader) (*ObjectInfo, error)
	// Get opens the object. The caller closes Object.Body; Body yields
	// exactly Info.Size bytes. A missing key is base.ErrNotFound.
	Get(ctx context.Context, key string) (*Object, error)
	// Stat describes the object. A missing key is base.ErrNotFound.
	Stat(ctx context.Context, key string) (*ObjectInfo, error)
	// Delete removes the object. Deleting a missing key succeeds.
	Delete(ctx context.Context, req *DeleteRequest) error
	// Copy copies SourceKey to DestKey inside the bucket. A missing source
	// is base.ErrNotFound.
	Copy(ctx context.Context, req *CopyRequest) (*ObjectInfo, error)
	// List returns objects whose key starts with Prefix in lexicographic
	// key order, at most Limit of them (Limit <= 0: the driver's default),
	// after the position PageToken names. NextPageToken is empty on the
	// last page.
	List(ctx context.Context, req *ListRequest) (*ListPage, error)
}

// Presigner is the optional capability to hand out URLs that reach the
// backend directly (base.CapabilityPresign). Without it the calls return
// base.ErrUnimplemented.
type Presigner interface {
	PresignGet(ctx context.Context, req *PresignRequest) (*PresignedURL, error)
	PresignPut(ctx context.Context, req *PresignRequest) (*PresignedURL, error)
}

// MultipartUploader is the optional capability (base.CapabilityMultipart)
// to let the caller move the bytes of a large upload to the store itself,
// part by part, over URLs the driver presigns for each part. The object
// appears only when CompleteMultipart succeeds, so a broken upload leaves
// nothing behind; AbortMultipart discards its parts.
type MultipartUploader interface {
	// StartMultipart begins an upload of Key and returns its id. A retry
	// with the same OperationID returns the same id.
	StartMultipart(ctx context.Context, req *StartMultipartRequest) (string, error)
	// PresignPart signs a PUT of part PartNumber (1 to MaxParts) of
	// exactly Size bytes; the PUT's ETag response header goes into
	// CompleteMultipart.
	PresignPart(ctx context.Context, req *PresignPartRequest) (*PresignedURL, error)
	// CompleteMultipart assembles the parts, in number order, into the
	// object and describes it. A retry with the same OperationID returns
	// the first result.
	CompleteMultipart(ctx context.Context, req *CompleteMultipartRequest) (*ObjectInfo, error)
	// AbortMultipart discards the upload and its parts; aborting an
	// unknown or finished upload succeeds.
	AbortMultipart(ctx context.Context, req *AbortMultipartRequest) error
}

// Limits of a multipart upload (those of S3).
const (
	MaxParts    = 10000
	MinPartSize = 5 << 20 // every part but the last
	MaxPartSize = 5 << 30
)

// StartMultipartRequest begins a multipart upload.
type StartMultipartRequest struct {
	OperationID string
	Key         string
	ContentType string
}

// PresignPartRequest asks for the URL of one part's PUT.
type PresignPartRequest struct {
	Key        string
	UploadID   string
	PartNumber int
	Size       int64
	Expiry     time.Duration
}

// CompletedPart is an uploaded part: its number and the ETag the store
// answered its PUT with.
type CompletedPart struct {
	Number int
	ETag   string
}

// CompleteMultipartRequest assembles an upload's parts into its object.
type CompleteMultipartRequest struct {
	OperationID string
	Key         string
	UploadID    string
	Parts       []CompletedPart
}

// AbortMultipartRequest discards an upload.
type AbortMultipartRequest struct {
	Key      string
	UploadID string
}

// RangeGetter is the optional capability to read part of an object
// (base.CapabilityRange) without reading what comes before it. Without it
// the SDK serves ranged reads by reading the object from its start and
// dropping the bytes before the range, so callers may always ask for a
// range; the capability only makes it cheap.
type RangeGetter interface {
	// GetRange opens the bytes r names. Info describes the whole object
	// (Size is the object's size); Body yields exactly r.Clip(Info.Size)
	// bytes from r.Offset, none when r.Offset is at or past the end. A
	// missing key is base.ErrNotFound.
	GetRange(ctx context.Context, key string, r Range) (*Object, error)
}

// Range selects the bytes of an object from Offset: Length bytes, or all
// that follow when Length is -1 (ToEnd).
type Range struct {
	Offset int64
	Length int64
}

// ToEnd as a Range's Length reads to the end of the object.
const ToEnd = -1

// Check reports a Range no read can serve: a negative offset, or a length
// that is neither positive nor ToEnd.
func (r Range) Check() error {
	if r.Offset < 0 || (r.Length <= 0 && r.Length != ToEnd) {
		return fmt.Errorf("range offset %d length %d: want offset >= 0 and length > 0 or -1: %w", r.Offset, r.Length, base.ErrInvalidArgument)
	}
	return nil
}

// Clip is how many bytes of an object of size bytes the range covers.
func (r Range) Clip(size int64) int64 {
	if r.Offset >= size {
		return 0
	}
	if r.Length == ToEnd || r.Length > size-r.Offset {
		return size - r.Offset
	}
	return r.Length
}

// GetRange reads the range r of key from d: through d's GetRange when d
// is a RangeGetter, else by reading the object from its start and dropping
// what comes before the range.
func GetRange(ctx context.Context, d Driver, key string, r Range) (*Object, error) {
	if err := r.Check(); err != nil {
		return nil, fmt.Errorf("storage: get %q: %w", key, err)
	}
	if rg, ok := d.(RangeGetter); ok {
		return rg.GetRange(ctx, key, r)
	}
	obj, err := d.Get(ctx, key)
	if err != nil {
		return nil, err
	}
	return CutRange(obj, r)
}

// CutRange turns a whole open object into the range r of it: it skips
// the bytes before the range (reading them) and ends the body after it.
func CutRange(obj *Object, r Range) (*Object, error) {
	n := r.Clip(obj.Info.Size)
	skip := min(r.Offset, obj.Info.Size)
	if _, err := io.CopyN(io.Discard, obj.Body, skip); err != nil {
		_ = obj.Body.Close()
		return nil, fmt.Errorf("storage: get %q: skipping to offset %d: %w", obj.Info.Key, r.Offset, err)
	}
	return &Object{Info: obj.Info, Body: &limitedBody{r: io.LimitReader(obj.Body, n), c: obj.Body}}, nil
}

// limitedBody is the front of a body, closed with it.
type limitedBody struct {
	r io.Reader
	c io.Closer
}

func (b *limitedBody) Read(p []byte) (int, error) { return b.r.Read(p) }
func (b *limitedBody) Close() error               { return b.c.Close() }

// PutRequest describes the object Put stores.
type PutRequest struct {
	OperationID string
	Key         string
	// Size is the exact body length, or -1 when unknown.
	Size        int64
	ContentType string
	Metadata    map[string]string
}

// ObjectInfo describes a stored object.
type ObjectInfo struct {
	Key         string
	Size        int64
	ContentType string
	// ETag changes whenever the content changes.
	ETag     string
	ModTime  time.Time
	Metadata map[string]string
}

// Object is an open object: its description and its content.
type Object struct {
	Info ObjectInfo
	Body io.ReadCloser
}

// DeleteRequest names the object to delete.
type DeleteRequest struct {
	OperationID string
	Key         string
}

// CopyRequest names the source and destination of a copy.
type CopyRequest struct {
	OperationID string
	SourceKey   string
	DestKey     string
}

// ListRequest selects a page of objects.
type ListRequest struct {
	Prefix    string
	PageToken string
	Limit     int
}

// ListPage is one page of a listing.
type ListPage struct {
	Objects       []ObjectInfo
	NextPageToken string
}

// PresignRequest asks for a URL valid for Expiry.
type PresignRequest struct {
	Key         string
	Expiry      time.Duration
	ContentType string
	// ContentLength, for PresignPut and when above 0, signs the URL for a
	// body of exactly that many bytes: the store refuses any other length.
	ContentLength int64
}

// PresignedURL is a URL that reaches the backend directly until ExpiresAt.
type PresignedURL struct {
	URL       string
	Method    string
	ExpiresAt time.Time
	// Header must be sent with the request.
	Header map[string]string
}
