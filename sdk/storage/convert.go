package storage

import (
	"maps"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	storagepb "github.com/gpuaas/gpuaas/sdk/storage/proto"
)

// This file is the only place storage types meet their protobuf form.

func timeToProto(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

func timeFromProto(t *timestamppb.Timestamp) time.Time {
	if t == nil {
		return time.Time{}
	}
	return t.AsTime()
}

func cloneMap(m map[string]string) map[string]string {
	if len(m) == 0 {
		return nil
	}
	return maps.Clone(m)
}

func putHeaderToProto(r *PutRequest) *storagepb.PutHeader {
	return &storagepb.PutHeader{
		OperationId: r.OperationID,
		Key:         r.Key,
		Size:        r.Size,
		ContentType: r.ContentType,
		Metadata:    cloneMap(r.Metadata),
	}
}

func putHeaderFromProto(p *storagepb.PutHeader) *PutRequest {
	return &PutRequest{
		OperationID: p.GetOperationId(),
		Key:         p.GetKey(),
		Size:        p.GetSize(),
		ContentType: p.GetContentType(),
		Metadata:    cloneMap(p.GetMetadata()),
	}
}

func infoToProto(i *ObjectInfo) *storagepb.ObjectInfo {
	return &storagepb.ObjectInfo{
		Key:         i.Key,
		Size:        i.Size,
		ContentType: i.ContentType,
		Etag:        i.ETag,
		ModTime:     timeToProto(i.ModTime),
		Metadata:    cloneMap(i.Metadata),
	}
}

func infoFromProto(p *storagepb.ObjectInfo) *ObjectInfo {
	return &ObjectInfo{
		Key:         p.GetKey(),
		Size:        p.GetSize(),
		ContentType: p.GetContentType(),
		ETag:        p.GetEtag(),
		ModTime:     timeFromProto(p.GetModTime()),
		Metadata:    cloneMap(p.GetMetadata()),
	}
}

func deleteToProto(r *DeleteRequest) *storagepb.DeleteRequest {
	return &storagepb.DeleteRequest{OperationId: r.OperationID, Key: r.Key}
}

func deleteFromProto(p *storagepb.DeleteRequest) *DeleteRequest {
	return &DeleteRequest{OperationID: p.GetOperationId(), Key: p.GetKey()}
}

func copyToProto(r *CopyRequest) *storagepb.CopyRequest {
	return &storagepb.CopyRequest{OperationId: r.OperationID, SourceKey: r.SourceKey, DestKey: r.DestKey}
}

func copyFromProto(p *storagepb.CopyRequest) *CopyRequest {
	return &CopyRequest{OperationID: p.GetOperationId(), SourceKey: p.GetSourceKey(), DestKey: p.GetDestKey()}
}

func listToProto(r *ListRequest) *storagepb.ListRequest {
	return &storagepb.ListRequest{Prefix: r.Prefix, PageToken: r.PageToken, Limit: int32(min(max(r.Limit, 0), 1<<30))}
}

func listFromProto(p *storagepb.ListRequest) *ListRequest {
	return &ListRequest{Prefix: p.GetPrefix(), PageToken: p.GetPageToken(), Limit: int(p.GetLimit())}
}

func pageToProto(p *ListPage) *storagepb.ListResponse {
	out := &storagepb.ListResponse{NextPageToken: p.NextPageToken, Objects: make([]*storagepb.ObjectInfo, 0, len(p.Objects))}
	for i := range p.Objects {
		out.Objects = append(out.Objects, infoToProto(&p.Objects[i]))
	}
	return out
}

func pageFromProto(p *storagepb.ListResponse) *ListPage {
	out := &ListPage{NextPageToken: p.GetNextPageToken(), Objects: make([]ObjectInfo, 0, len(p.GetObjects()))}
	for _, o := range p.GetObjects() {
		out.Objects = append(out.Objects, *infoFromProto(o))
	}
	return out
}

func presignToProto(r *PresignRequest) *storagepb.PresignRequest {
	return &storagepb.PresignRequest{Key: r.Key, Expiry: durationpb.New(r.Expiry), ContentType: r.ContentType, ContentLength: r.ContentLength}
}

func presignFromProto(p *storagepb.PresignRequest) *PresignRequest {
	return &PresignRequest{Key: p.GetKey(), Expiry: p.GetExpiry().AsDuration(), ContentType: p.GetContentType(), ContentLength: p.GetContentLength()}
}

func rangeToProto(r Range) *storagepb.ByteRange {
	return &storagepb.ByteRange{Offset: r.Offset, Length: r.Length}
}

func rangeFromProto(p *storagepb.ByteRange) Range {
	return Range{Offset: p.GetOffset(), Length: p.GetLength()}
}

func presignedToProto(u *PresignedURL) *storagepb.PresignedURL {
	return &storagepb.PresignedURL{Url: u.URL, Method: u.Method, ExpiresAt: timeToProto(u.ExpiresAt), Headers: cloneMap(u.Header)}
}

func presignedFromProto(p *storagepb.PresignedURL) *PresignedURL {
	return &PresignedURL{URL: p.GetUrl(), Method: p.GetMethod(), ExpiresAt: timeFromProto(p.GetExpiresAt()), Header: cloneMap(p.GetHeaders())}
}

func startMultipartToProto(r *StartMultipartRequest) *storagepb.StartMultipartRequest {
	return &storagepb.StartMultipartRequest{OperationId: r.OperationID, Key: r.Key, ContentType: r.ContentType}
}

func startMultipartFromProto(p *storagepb.StartMultipartRequest) *StartMultipartRequest {
	return &StartMultipartRequest{OperationID: p.GetOperationId(), Key: p.GetKey(), ContentType: p.GetContentType()}
}

func presignPartToProto(r *PresignPartRequest) *storagepb.PresignPartRequest {
	return &storagepb.PresignPartRequest{Key: r.Key, UploadId: r.UploadID, PartNumber: int32(min(max(r.PartNumber, -1), MaxParts+1)),
		Size: r.Size, Expiry: durationpb.New(r.Expiry)}
}

func presignPartFromProto(p *storagepb.PresignPartRequest) *PresignPartRequest {
	return &PresignPartRequest{Key: p.GetKey(), UploadID: p.GetUploadId(), PartNumber: int(p.GetPartNumber()), Size: p.GetSize(),
		Expiry: p.GetExpiry().AsDuration()}
}

func completeMultipartToProto(r *CompleteMultipartRequest) *storagepb.CompleteMultipartRequest {
	out := &storagepb.CompleteMultipartRequest{OperationId: r.OperationID, Key: r.Key, UploadId: r.UploadID,
		Parts: make([]*storagepb.CompletedPart, len(r.Parts))}
	for i, pt := range r.Parts {
		out.Parts[i] = &storagepb.CompletedPart{Number: int32(min(max(pt.Number, -1), MaxParts+1)), Etag: pt.ETag}
	}
	return out
}

func completeMultipartFromProto(p *storagepb.CompleteMultipartRequest) *CompleteMultipartRequest {
	out := &CompleteMultipartRequest{OperationID: p.GetOperationId(), Key: p.GetKey(), UploadID: p.GetUploadId(),
		Parts: make([]CompletedPart, len(p.GetParts()))}
	for i, pt := range p.GetParts() {
		out.Parts[i] = CompletedPart{Number: int(pt.GetNumber()), ETag: pt.GetEtag()}
	}
	return out
}

func abortMultipartToProto(r *AbortMultipartRequest) *storagepb.AbortMultipartRequest {
	return &storagepb.AbortMultipartRequest{Key: r.Key, UploadId: r.UploadID}
}

func abortMultipartFromProto(p *storagepb.AbortMultipartRequest) *AbortMultipartRequest {
	return &AbortMultipartRequest{Key: p.GetKey(), UploadID: p.GetUploadId()}
}
