package s3store

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/storage"
)

// expiry is the lifetime of a presigned URL: what the caller asked for,
// at most presign_max_expiry.
func (s *settings) expiry(req *storage.PresignRequest) (time.Duration, error) {
	if req.Expiry <= 0 {
		return 0, fmt.Errorf("storage-s3: presign %q: expiry %s: %w", req.Key, req.Expiry, base.ErrInvalidArgument)
	}
	// SigV4 counts whole seconds and needs at least one.
	return max(min(req.Expiry, s.presignMax).Truncate(time.Second), time.Second), nil
}

// PresignGet implements storage.Presigner: a GET URL of the object, valid
// for req.Expiry capped at presign_max_expiry. A ContentType in the
// request becomes the Content-Type of the response.
func (d *Driver) PresignGet(ctx context.Context, req *storage.PresignRequest) (*storage.PresignedURL, error) {
	s, err := d.settings()
	if err != nil {
		return nil, err
	}
	if err := s.checkKey("presign get: key", req.Key); err != nil {
		return nil, err
	}
	expiry, err := s.expiry(req)
	if err != nil {
		return nil, err
	}
	key := s.objectKey(req.Key)
	now := d.now()
	out, err := s.presigner.PresignGetObject(ctx, &s3.GetObjectInput{Bucket: &s.bucket, Key: &key, ResponseContentType: nonEmpty(req.ContentType)},
		s3.WithPresignExpires(expiry))
	if err != nil {
		return nil, wrapError(ctx, fmt.Sprintf("presign get %q", req.Key), err)
	}
	return &storage.PresignedURL{URL: out.URL, Method: out.Method, ExpiresAt: now.Add(expiry), Header: headers(out.SignedHeader)}, nil
}

// PresignPut implements storage.Presigner: a PUT URL for the object, valid
// for req.Expiry capped at presign_max_expiry. A ContentType in the
// request is signed: the upload must send it (it is in Header). So is a
// ContentLength above 0: the store refuses a body of any other length.
func (d *Driver) PresignPut(ctx context.Context, req *storage.PresignRequest) (*storage.PresignedURL, error) {
	s, err := d.settings()
	if err != nil {
		return nil, err
	}
	if err := s.checkKey("presign put: key", req.Key); err != nil {
		return nil, err
	}
	expiry, err := s.expiry(req)
	if err != nil {
		return nil, err
	}
	key := s.objectKey(req.Key)
	now := d.now()
	in := &s3.PutObjectInput{Bucket: &s.bucket, Key: &key, ContentType: nonEmpty(req.ContentType)}
	if req.ContentLength > 0 {
		in.ContentLength = &req.ContentLength
	}
	out, err := s.presigner.PresignPutObject(ctx, in, s3.WithPresignExpires(expiry))
	if err != nil {
		return nil, wrapError(ctx, fmt.Sprintf("presign put %q", req.Key), err)
	}
	return &storage.PresignedURL{URL: out.URL, Method: out.Method, ExpiresAt: now.Add(expiry), Header: headers(out.SignedHeader)}, nil
}

// headers are the signed headers a client must send, less Host (which
// the URL sets).
func headers(h http.Header) map[string]string {
	out := map[string]string{}
	for k, v := range h {
		if http.CanonicalHeaderKey(k) == "Host" || len(v) == 0 {
			continue
		}
		out[http.CanonicalHeaderKey(k)] = v[0]
	}
	if len(out) == 0 {
		return nil
	}
	return out
}
