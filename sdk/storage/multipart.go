package storage

import (
	"context"
	"fmt"

	"github.com/gpuaas/gpuaas/sdk/base"
	storagepb "github.com/gpuaas/gpuaas/sdk/storage/proto"
)

// The multipart capability on both sides of the plugin boundary: the
// client's calls and the server's checks before the driver sees a request.

var _ MultipartUploader = (*Client)(nil)

// StartMultipart implements MultipartUploader.
func (c *Client) StartMultipart(ctx context.Context, req *StartMultipartRequest) (string, error) {
	resp, err := c.rpc.StartMultipart(ctx, startMultipartToProto(req))
	if err != nil {
		return "", fmt.Errorf("storage: start multipart %q: %w", req.Key, c.Err(ctx, err))
	}
	return resp.GetUploadId(), nil
}

// PresignPart implements MultipartUploader.
func (c *Client) PresignPart(ctx context.Context, req *PresignPartRequest) (*PresignedURL, error) {
	resp, err := c.rpc.PresignPart(ctx, presignPartToProto(req))
	if err != nil {
		return nil, fmt.Errorf("storage: presign part %d of %q: %w", req.PartNumber, req.Key, c.Err(ctx, err))
	}
	return presignedFromProto(resp), nil
}

// CompleteMultipart implements MultipartUploader.
func (c *Client) CompleteMultipart(ctx context.Context, req *CompleteMultipartRequest) (*ObjectInfo, error) {
	resp, err := c.rpc.CompleteMultipart(ctx, completeMultipartToProto(req))
	if err != nil {
		return nil, fmt.Errorf("storage: complete multipart %q: %w", req.Key, c.Err(ctx, err))
	}
	return infoFromProto(resp), nil
}

// AbortMultipart implements MultipartUploader.
func (c *Client) AbortMultipart(ctx context.Context, req *AbortMultipartRequest) error {
	if _, err := c.rpc.AbortMultipart(ctx, abortMultipartToProto(req)); err != nil {
		return fmt.Errorf("storage: abort multipart %q: %w", req.Key, c.Err(ctx, err))
	}
	return nil
}

func (s *Server) multipart(call string) (MultipartUploader, error) {
	m, ok := s.impl.(MultipartUploader)
	if !ok {
		return nil, base.StatusFromError(fmt.Errorf("storage: %s: the driver has no multipart uploads: %w", call, base.ErrUnimplemented))
	}
	return m, nil
}

func invalidf(call, format string, args ...any) error {
	return base.StatusFromError(fmt.Errorf("storage: %s: %s: %w", call, fmt.Sprintf(format, args...), base.ErrInvalidArgument))
}

func checkUploadID(call, id string) error {
	if id == "" || len(id) > 1024 {
		return invalidf(call, "upload id of %d bytes; want 1 to 1024", len(id))
	}
	return nil
}

// StartMultipart implements storagepb.StorageServer.
func (s *Server) StartMultipart(ctx context.Context, req *storagepb.StartMultipartRequest) (*storagepb.StartMultipartResponse, error) {
	m, err := s.multipart("start multipart")
	if err != nil {
		return nil, err
	}
	r := startMultipartFromProto(req)
	if r.OperationID == "" {
		return nil, invalidf("start multipart", "operation id: empty")
	}
	if err := checkKey("key", r.Key); err != nil {
		return nil, base.StatusFromError(fmt.Errorf("storage: start multipart: %w", err))
	}
	id, err := m.StartMultipart(ctx, r)
	if err != nil {
		return nil, base.StatusFromError(err)
	}
	if id == "" {
		return nil, base.StatusFromError(fmt.Errorf("storage: start multipart %q: driver returned no upload id: %w", r.Key, base.ErrInternal))
	}
	return &storagepb.StartMultipartResponse{UploadId: id}, nil
}

// PresignPart implements storagepb.StorageServer.
func (s *Server) PresignPart(ctx context.Context, req *storagepb.PresignPartRequest) (*storagepb.PresignedURL, error) {
	const call = "presign part"
	m, err := s.multipart(call)
	if err != nil {
		return nil, err
	}
	r := presignPartFromProto(req)
	switch {
	case checkKey("key", r.Key) != nil:
		return nil, base.StatusFromError(fmt.Errorf("storage: %s: %w", call, checkKey("key", r.Key)))
	case checkUploadID(call, r.UploadID) != nil:
		return nil, checkUploadID(call, r.UploadID)
	case r.PartNumber < 1 || r.PartNumber > MaxParts:
		return nil, invalidf(call, "part number %d; want 1 to %d", r.PartNumber, MaxParts)
	case r.Size < 1 || r.Size > MaxPartSize:
		return nil, invalidf(call, "part size %d; want 1 to %d", r.Size, MaxPartSize)
	case r.Expiry <= 0:
		return nil, invalidf(call, "expiry %s", r.Expiry)
	}
	u, err := m.PresignPart(ctx, r)
	if err != nil {
		return nil, base.StatusFromError(err)
	}
	if u == nil {
		return nil, base.StatusFromError(fmt.Errorf("storage: %s: driver returned nothing: %w", call, base.ErrInternal))
	}
	return presignedToProto(u), nil
}

// CompleteMultipart implements storagepb.StorageServer.
func (s *Server) CompleteMultipart(ctx context.Context, req *storagepb.CompleteMultipartRequest) (*storagepb.ObjectInfo, error) {
	const call = "complete multipart"
	m, err := s.multipart(call)
	if err != nil {
		return nil, err
	}
	r := completeMultipartFromProto(req)
	switch {
	case r.OperationID == "":
		return nil, invalidf(call, "operation id: empty")
	case checkKey("key", r.Key) != nil:
		return nil, base.StatusFromError(fmt.Errorf("storage: %s: %w", call, checkKey("key", r.Key)))
	case checkUploadID(call, r.UploadID) != nil:
		return nil, checkUploadID(call, r.UploadID)
	case len(r.Parts) == 0 || len(r.Parts) > MaxParts:
		return nil, invalidf(call, "%d parts; want 1 to %d", len(r.Parts), MaxParts)
	}
	for i, p := range r.Parts {
		if p.Number != i+1 || p.ETag == "" || len(p.ETag) > 1024 {
			return nil, invalidf(call, "part %d: number %d with ETag %q; want parts numbered from 1 in order, each with its ETag", i, p.Number, p.ETag)
		}
	}
	info, err := m.CompleteMultipart(ctx, r)
	if err != nil {
		return nil, base.StatusFromError(err)
	}
	if info == nil {
		return nil, base.StatusFromError(fmt.Errorf("storage: %s: driver returned nothing: %w", call, base.ErrInternal))
	}
	return infoToProto(info), nil
}

// AbortMultipart implements storagepb.StorageServer.
func (s *Server) AbortMultipart(ctx context.Context, req *storagepb.AbortMultipartRequest) (*storagepb.AbortMultipartResponse, error) {
	const call = "abort multipart"
	m, err := s.multipart(call)
	if err != nil {
		return nil, err
	}
	r := abortMultipartFromProto(req)
	if err := checkKey("key", r.Key); err != nil {
		return nil, base.StatusFromError(fmt.Errorf("storage: %s: %w", call, err))
	}
	if err := checkUploadID(call, r.UploadID); err != nil {
		return nil, err
	}
	if err := m.AbortMultipart(ctx, r); err != nil {
		return nil, base.StatusFromError(err)
	}
	return &storagepb.AbortMultipartResponse{}, nil
}
