// Package storage is the contract of a storage driver: objects addressed by
// key inside the bucket an instance is configured for. Put and Get stream;
// no layer between the core and the backend holds a whole object.
package storage

import (
	"context"
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
}

// PresignedURL is a URL that reaches the backend directly until ExpiresAt.
type PresignedURL struct {
	URL       string
	Method    string
	ExpiresAt time.Time
	// Header must be sent with the request.
	Header map[string]string
}
