package s3store

import (
	"context"
	"fmt"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/storage"
)

// The multipart capability: the caller (the core) uploads the parts itself
// over presigned UploadPart URLs; the driver starts, completes and aborts
// the S3 multipart upload. Start and Complete share the caller's operation
// id: Start records the upload id under it, and the completed object
// carries the operation's marker, so a retried Complete (a restarted
// plugin) finds the object it made.

var _ storage.MultipartUploader = (*Driver)(nil)

// multipartMarker ties the object a multipart operation completes to the
// operation.
func multipartMarker(opID, key string) string {
	return marker(opID, fingerprint(struct{ Call, Key string }{"multipart", key}))
}

// StartMultipart implements storage.MultipartUploader.
func (d *Driver) StartMultipart(ctx context.Context, req *storage.StartMultipartRequest) (string, error) {
	s, err := d.settings()
	if err != nil {
		return "", err
	}
	if err := s.checkKey("start multipart: key", req.Key); err != nil {
		return "", err
	}
	contentType := req.ContentType
	if contentType == "" {
		contentType = defaultContentType
	}
	fp := fingerprint(struct{ Call, Key, ContentType string }{"start multipart", req.Key, req.ContentType})
	meta := map[string]string{metaMarker: multipartMarker(req.OperationID, req.Key)}
	what := fmt.Sprintf("start multipart %q", req.Key)
	info, err := d.once(ctx, s, "start multipart", req.OperationID+"#start", fp, nil, func(ctx context.Context) (*storage.ObjectInfo, error) {
		mp, err := s.startMultipart(ctx, s.objectKey(req.Key), contentType, meta, what, d.logger)
		if err != nil {
			return nil, err
		}
		return &storage.ObjectInfo{Key: req.Key, Metadata: map[string]string{"upload_id": mp.uploadID}}, nil
	})
	if err != nil {
		return "", err
	}
	id := info.Metadata["upload_id"]
	if id == "" {
		return "", fmt.Errorf("storage-s3: %s: the operation's record holds no upload id: %w", what, base.ErrInternal)
	}
	return id, nil
}

// PresignPart implements storage.MultipartUploader: an UploadPart URL for
// a body of exactly req.Size bytes, valid for req.Expiry capped at
// presign_max_expiry.
func (d *Driver) PresignPart(ctx context.Context, req *storage.PresignPartRequest) (*storage.PresignedURL, error) {
	s, err := d.settings()
	if err != nil {
		return nil, err
	}
	if err := s.checkKey("presign part: key", req.Key); err != nil {
		return nil, err
	}
	expiry, err := s.expiry(&storage.PresignRequest{Key: req.Key, Expiry: req.Expiry})
	if err != nil {
		return nil, err
	}
	key := s.objectKey(req.Key)
	now := d.now()
	out, err := s.presigner.PresignUploadPart(ctx, &s3.UploadPartInput{Bucket: &s.bucket, Key: &key, UploadId: &req.UploadID,
		PartNumber: aws.Int32(int32(req.PartNumber)), ContentLength: aws.Int64(req.Size)}, s3.WithPresignExpires(expiry))
	if err != nil {
		return nil, wrapError(ctx, fmt.Sprintf("presign part %d of %q", req.PartNumber, req.Key), err)
	}
	return &storage.PresignedURL{URL: out.URL, Method: out.Method, ExpiresAt: now.Add(expiry), Header: headers(out.SignedHeader)}, nil
}

// CompleteMultipart implements storage.MultipartUploader. A failed
// completion aborts the upload.
func (d *Driver) CompleteMultipart(ctx context.Context, req *storage.CompleteMultipartRequest) (*storage.ObjectInfo, error) {
	s, err := d.settings()
	if err != nil {
		return nil, err
	}
	if err := s.checkKey("complete multipart: key", req.Key); err != nil {
		return nil, err
	}
	fp := fingerprint(struct {
		Call, Key, UploadID string
		Parts               []storage.CompletedPart
	}{"complete multipart", req.Key, req.UploadID, req.Parts})
	mark := multipartMarker(req.OperationID, req.Key)
	what := fmt.Sprintf("complete multipart %q", req.Key)
	return d.once(ctx, s, "complete multipart", req.OperationID+"#complete", fp,
		func(ctx context.Context) (*storage.ObjectInfo, error) { return s.findMarked(ctx, req.Key, mark) },
		func(ctx context.Context) (*storage.ObjectInfo, error) {
			mp := &multipart{s: s, logger: d.logger, key: s.objectKey(req.Key), uploadID: req.UploadID, what: what}
			for _, p := range req.Parts {
				mp.parts = append(mp.parts, types.CompletedPart{PartNumber: aws.Int32(int32(p.Number)), ETag: aws.String(p.ETag)})
			}
			if err := mp.complete(ctx); err != nil {
				return nil, err
			}
			info, err := s.stat(ctx, req.Key)
			if err != nil {
				return nil, fmt.Errorf("storage-s3: %s: describing the object: %w", what, err)
			}
			return &info.ObjectInfo, nil
		})
}

// AbortMultipart implements storage.MultipartUploader; it checks that the
// upload is gone (a part PUT still in flight could bring it back).
func (d *Driver) AbortMultipart(ctx context.Context, req *storage.AbortMultipartRequest) error {
	s, err := d.settings()
	if err != nil {
		return err
	}
	if err := s.checkKey("abort multipart: key", req.Key); err != nil {
		return err
	}
	mp := &multipart{s: s, logger: d.logger, key: s.objectKey(req.Key), uploadID: req.UploadID, what: fmt.Sprintf("abort multipart %q", req.Key)}
	return mp.abort(ctx, nil)
}
