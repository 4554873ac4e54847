package s3store

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"mime"
	"regexp"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/aws/smithy-go"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/storage"
)

// maxUserMetadata is what remains of S3's 2 KiB of user metadata once the
// driver's marker is in.
const maxUserMetadata = 2048 - len(metaMarker) - 64

var metaKeyRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,127}$`)

// encodeMetadata checks user metadata and turns it into S3 user metadata.
// Keys are lower case letters, digits and '-' (S3 folds the case of keys,
// so upper case would not round-trip); values that are not plain printable
// ASCII travel RFC 2047-encoded and are decoded again on the way out.
func encodeMetadata(m map[string]string) (map[string]string, error) {
	out := make(map[string]string, len(m)+1)
	total := 0
	for k, v := range m {
		switch {
		case !metaKeyRE.MatchString(k):
			return nil, fmt.Errorf("storage-s3: metadata key %q: want lower case letters, digits and '-': %w", k, base.ErrInvalidArgument)
		case k == metaMarker:
			return nil, fmt.Errorf("storage-s3: metadata key %q is reserved: %w", k, base.ErrInvalidArgument)
		case !utf8.ValidString(v):
			return nil, fmt.Errorf("storage-s3: metadata %q: value not UTF-8: %w", k, base.ErrInvalidArgument)
		}
		if needsEncoding(v) {
			v = mime.BEncoding.Encode("utf-8", v)
		}
		out[k] = v
		total += len(k) + len(v)
	}
	if total > maxUserMetadata {
		return nil, fmt.Errorf("storage-s3: metadata: %d bytes encoded, more than %d: %w", total, maxUserMetadata, base.ErrInvalidArgument)
	}
	return out, nil
}

func needsEncoding(v string) bool {
	if strings.HasPrefix(v, "=?") || strings.TrimSpace(v) != v {
		return true
	}
	for i := 0; i < len(v); i++ {
		if v[i] < 0x20 || v[i] > 0x7e {
			return true
		}
	}
	return false
}

// decodeMetadata splits S3 user metadata into the caller's metadata and
// the driver's marker.
func decodeMetadata(raw map[string]string) (user map[string]string, mark string) {
	var dec mime.WordDecoder
	for k, v := range raw {
		k = strings.ToLower(k)
		if k == metaMarker {
			mark = v
			continue
		}
		if strings.HasPrefix(v, "=?") {
			if d, err := dec.DecodeHeader(v); err == nil {
				v = d
			}
		}
		if user == nil {
			user = make(map[string]string, len(raw))
		}
		user[k] = v
	}
	return user, mark
}

// objectMeta is an object's description with what the driver keeps for
// itself.
type objectMeta struct {
	storage.ObjectInfo
	marker  string
	rawETag string            // as S3 sends it, quotes included
	rawMeta map[string]string // S3 user metadata, marker and encoding included
}

func unquote(etag string) string { return strings.Trim(etag, `"`) }

func (s *settings) describe(key string, size *int64, etag, contentType *string, mod *time.Time, meta map[string]string) *objectMeta {
	user, mark := decodeMetadata(meta)
	return &objectMeta{
		ObjectInfo: storage.ObjectInfo{
			Key:         key,
			Size:        aws.ToInt64(size),
			ContentType: aws.ToString(contentType),
			ETag:        unquote(aws.ToString(etag)),
			ModTime:     aws.ToTime(mod).UTC(),
			Metadata:    user,
		},
		marker:  mark,
		rawETag: aws.ToString(etag),
		rawMeta: meta,
	}
}

// stat describes the object at key (a driver key).
func (s *settings) stat(ctx context.Context, key string) (*objectMeta, error) {
	k := s.objectKey(key)
	out, err := s.client.HeadObject(ctx, &s3.HeadObjectInput{Bucket: &s.bucket, Key: &k})
	if err != nil {
		return nil, wrapError(ctx, fmt.Sprintf("object %q", key), err)
	}
	return s.describe(key, out.ContentLength, out.ETag, out.ContentType, out.LastModified, out.Metadata), nil
}

// Stat implements storage.Driver.
func (d *Driver) Stat(ctx context.Context, key string) (*storage.ObjectInfo, error) {
	s, err := d.settings()
	if err != nil {
		return nil, err
	}
	if err := s.checkKey("stat: key", key); err != nil {
		return nil, err
	}
	m, err := s.stat(ctx, key)
	if err != nil {
		return nil, err
	}
	return &m.ObjectInfo, nil
}

// Get implements storage.Driver. The body streams from S3; it ends with
// the context's error when ctx is done.
func (d *Driver) Get(ctx context.Context, key string) (*storage.Object, error) {
	s, err := d.settings()
	if err != nil {
		return nil, err
	}
	if err := s.checkKey("get: key", key); err != nil {
		return nil, err
	}
	k := s.objectKey(key)
	out, err := s.client.GetObject(ctx, &s3.GetObjectInput{Bucket: &s.bucket, Key: &k})
	if err != nil {
		return nil, wrapError(ctx, fmt.Sprintf("get %q", key), err)
	}
	if out.ContentLength == nil || *out.ContentLength < 0 {
		_ = out.Body.Close()
		return nil, fmt.Errorf("storage-s3: get %q: the response has no content length: %w", key, base.ErrInternal)
	}
	m := s.describe(key, out.ContentLength, out.ETag, out.ContentType, out.LastModified, out.Metadata)
	return &storage.Object{Info: m.ObjectInfo, Body: &objectBody{ctx: ctx, key: key, rc: out.Body, remaining: m.Size}}, nil
}

// GetRange implements storage.RangeGetter: a GetObject with a Range
// header. Info.Size is the object's size, from the Content-Range of the
// response. A range that starts at or past the end (S3 answers 416) yields
// an empty body.
func (d *Driver) GetRange(ctx context.Context, key string, r storage.Range) (*storage.Object, error) {
	s, err := d.settings()
	if err != nil {
		return nil, err
	}
	if err := s.checkKey("get: key", key); err != nil {
		return nil, err
	}
	if err := r.Check(); err != nil {
		return nil, fmt.Errorf("storage-s3: get %q: %w", key, err)
	}
	k := s.objectKey(key)
	header := fmt.Sprintf("bytes=%d-", r.Offset)
	if r.Length != storage.ToEnd {
		header += strconv.FormatInt(r.Offset+r.Length-1, 10)
	}
	what := fmt.Sprintf("get %q %s", key, header)
	out, err := s.client.GetObject(ctx, &s3.GetObjectInput{Bucket: &s.bucket, Key: &k, Range: &header})
	if err != nil {
		var apiErr smithy.APIError
		if ctx.Err() == nil && errors.As(err, &apiErr) && apiErr.ErrorCode() == "InvalidRange" {
			// Nothing of the object lies in the range: describe it.
			m, serr := s.stat(ctx, key)
			if serr != nil {
				return nil, serr
			}
			return &storage.Object{Info: m.ObjectInfo, Body: io.NopCloser(strings.NewReader(""))}, nil
		}
		return nil, wrapError(ctx, what, err)
	}
	if out.ContentLength == nil || *out.ContentLength < 0 {
		_ = out.Body.Close()
		return nil, fmt.Errorf("storage-s3: %s: the response has no content length: %w", what, base.ErrInternal)
	}
	size := *out.ContentLength // a store that ignores Range sends the whole object
	start := int64(0)
	if cr := aws.ToString(out.ContentRange); cr != "" {
		var end int64
		if _, err := fmt.Sscanf(cr, "bytes %d-%d/%d", &start, &end, &size); err != nil || end-start+1 != *out.ContentLength {
			_ = out.Body.Close()
			return nil, fmt.Errorf("storage-s3: %s: Content-Range %q does not match %d bytes: %w", what, cr, *out.ContentLength, base.ErrInternal)
		}
	}
	m := s.describe(key, &size, out.ETag, out.ContentType, out.LastModified, out.Metadata)
	obj := &storage.Object{Info: m.ObjectInfo, Body: &objectBody{ctx: ctx, key: key, rc: out.Body, remaining: *out.ContentLength}}
	if start != r.Offset || *out.ContentLength != r.Clip(size) {
		if start != 0 || *out.ContentLength != size {
			_ = obj.Body.Close()
			return nil, fmt.Errorf("storage-s3: %s: the store sent bytes %d+%d of %d: %w", what, start, *out.ContentLength, size, base.ErrInternal)
		}
		// A store that ignores Range: cut the range out of the object.
		return storage.CutRange(obj, r)
	}
	return obj, nil
}

var _ io.ReadCloser = (*objectBody)(nil)

// objectBody is the body of a Get: S3's response body, with errors
// classified and a body that ends early reported as an error.
type objectBody struct {
	ctx       context.Context
	key       string
	rc        io.ReadCloser
	remaining int64
}

func (b *objectBody) Read(p []byte) (int, error) {
	n, err := b.rc.Read(p)
	b.remaining -= int64(n)
	switch {
	case err == nil:
		return n, nil
	case err == io.EOF && b.remaining == 0:
		return n, io.EOF
	case err == io.EOF:
		err = fmt.Errorf("body ended %d bytes short: %w", b.remaining, io.ErrUnexpectedEOF)
	}
	return n, wrapError(b.ctx, fmt.Sprintf("get %q: reading", b.key), err)
}

func (b *objectBody) Close() error { return b.rc.Close() }

// Delete implements storage.Driver. Deleting a missing key succeeds.
func (d *Driver) Delete(ctx context.Context, req *storage.DeleteRequest) error {
	s, err := d.settings()
	if err != nil {
		return err
	}
	if err := s.checkKey("delete: key", req.Key); err != nil {
		return err
	}
	fp := fingerprint(struct{ Call, Key string }{"delete", req.Key})
	_, err = d.once(ctx, s, "delete", req.OperationID, fp, nil, func(ctx context.Context) (*storage.ObjectInfo, error) {
		k := s.objectKey(req.Key)
		_, err := s.client.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: &s.bucket, Key: &k})
		if err != nil && (ctx.Err() != nil || !errors.Is(Classify(err), base.ErrNotFound)) {
			return nil, wrapError(ctx, fmt.Sprintf("delete %q", req.Key), err)
		}
		return nil, nil
	})
	return err
}

// Copy implements storage.Driver: a server-side copy (CopyObject, or
// UploadPartCopy parts above 5 GiB) that keeps the content type and
// metadata. The source must not change during the copy: a copy that sees
// it change fails with base.ErrConflict.
func (d *Driver) Copy(ctx context.Context, req *storage.CopyRequest) (*storage.ObjectInfo, error) {
	s, err := d.settings()
	if err != nil {
		return nil, err
	}
	if err := errors.Join(s.checkKey("copy: source key", req.SourceKey), s.checkKey("copy: dest key", req.DestKey)); err != nil {
		return nil, err
	}
	fp := fingerprint(struct{ Call, Source, Dest string }{"copy", req.SourceKey, req.DestKey})
	mark := marker(req.OperationID, fp)
	return d.once(ctx, s, "copy", req.OperationID, fp,
		func(ctx context.Context) (*storage.ObjectInfo, error) { return s.findMarked(ctx, req.DestKey, mark) },
		func(ctx context.Context) (*storage.ObjectInfo, error) { return d.copyObject(ctx, s, req, mark) })
}

func (d *Driver) copyObject(ctx context.Context, s *settings, req *storage.CopyRequest, mark string) (*storage.ObjectInfo, error) {
	src, err := s.stat(ctx, req.SourceKey)
	if err != nil {
		return nil, fmt.Errorf("storage-s3: copy: source: %w", err)
	}
	meta := make(map[string]string, len(src.rawMeta)+1)
	for k, v := range src.rawMeta {
		meta[strings.ToLower(k)] = v
	}
	meta[metaMarker] = mark
	dst := s.objectKey(req.DestKey)
	source := s.copySource(req.SourceKey)
	what := fmt.Sprintf("copy %q to %q", req.SourceKey, req.DestKey)
	if src.Size > d.copyThreshold {
		if err := d.copyMultipart(ctx, s, src, dst, source, meta, what); err != nil {
			return nil, err
		}
	} else {
		_, err := s.client.CopyObject(ctx, &s3.CopyObjectInput{
			Bucket: &s.bucket, Key: &dst, CopySource: &source, CopySourceIfMatch: &src.rawETag,
			MetadataDirective: types.MetadataDirectiveReplace, ContentType: nonEmpty(src.ContentType), Metadata: meta,
		})
		if err != nil {
			return nil, wrapError(ctx, what, err)
		}
	}
	info, err := s.stat(ctx, req.DestKey)
	if err != nil {
		return nil, fmt.Errorf("storage-s3: %s: describing the copy: %w", what, err)
	}
	return &info.ObjectInfo, nil
}

// copyMultipart copies src in parts of at least d.copyPart bytes.
func (d *Driver) copyMultipart(ctx context.Context, s *settings, src *objectMeta, dst, source string, meta map[string]string, what string) error {
	partSize := max(d.copyPart, (src.Size+MaxParts-1)/MaxParts)
	mp, err := s.startMultipart(ctx, dst, src.ContentType, meta, what, d.logger)
	if err != nil {
		return err
	}
	for off := int64(0); off < src.Size; off += partSize {
		end := min(off+partSize, src.Size) - 1
		out, err := s.client.UploadPartCopy(ctx, &s3.UploadPartCopyInput{
			Bucket: &s.bucket, Key: &dst, UploadId: &mp.uploadID, PartNumber: aws.Int32(int32(len(mp.parts) + 1)),
			CopySource: &source, CopySourceIfMatch: &src.rawETag, CopySourceRange: aws.String(fmt.Sprintf("bytes=%d-%d", off, end)),
		})
		if err != nil {
			return mp.abort(ctx, wrapError(ctx, fmt.Sprintf("%s: part %d", what, len(mp.parts)+1), err))
		}
		if out.CopyPartResult == nil || out.CopyPartResult.ETag == nil {
			return mp.abort(ctx, fmt.Errorf("storage-s3: %s: part %d: no ETag in the response: %w", what, len(mp.parts)+1, base.ErrInternal))
		}
		mp.parts = append(mp.parts, types.CompletedPart{ETag: out.CopyPartResult.ETag, PartNumber: aws.Int32(int32(len(mp.parts) + 1))})
	}
	return mp.complete(ctx)
}

// copySource is the x-amz-copy-source of key: bucket/key, URL-encoded.
func (s *settings) copySource(key string) string {
	const unreserved = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~/"
	full := s.bucket + "/" + s.objectKey(key)
	var b strings.Builder
	for i := 0; i < len(full); i++ {
		if c := full[i]; strings.IndexByte(unreserved, c) >= 0 {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

func nonEmpty(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

// List implements storage.Driver. Objects carry key, size, ETag and
// modification time (S3 listings have no content type or metadata; Stat
// has). The page token is the last key returned, base64url-encoded.
func (d *Driver) List(ctx context.Context, req *storage.ListRequest) (*storage.ListPage, error) {
	s, err := d.settings()
	if err != nil {
		return nil, err
	}
	if strings.HasPrefix(req.Prefix, ReservedPrefix) {
		return nil, fmt.Errorf("storage-s3: list: prefix %q: keys under %q are reserved: %w", req.Prefix, ReservedPrefix, base.ErrInvalidArgument)
	}
	limit := req.Limit
	switch {
	case limit < 0:
		return nil, fmt.Errorf("storage-s3: list: limit %d: %w", limit, base.ErrInvalidArgument)
	case limit == 0:
		limit = DefaultListLimit
	case limit > MaxListLimit:
		limit = MaxListLimit
	}
	startAfter := ""
	if req.PageToken != "" {
		after, err := base64.RawURLEncoding.DecodeString(req.PageToken)
		if err != nil || len(after) == 0 || !utf8.Valid(after) {
			return nil, fmt.Errorf("storage-s3: list: bad page token: %w", base.ErrInvalidArgument)
		}
		startAfter = s.objectKey(string(after))
	}
	prefix := s.objectKey(req.Prefix)
	reserved := s.prefix + ReservedPrefix
	// Every reserved key is an operation record, opsPrefix + hex digest:
	// all sort before this.
	pastReserved := reserved + opsPrefix[len(ReservedPrefix):] + "g"

	var found []storage.ObjectInfo
	for more := true; more && len(found) <= limit; {
		in := &s3.ListObjectsV2Input{Bucket: &s.bucket, Prefix: &prefix, MaxKeys: aws.Int32(int32(min(limit+1-len(found), 1000)))}
		if startAfter != "" {
			in.StartAfter = aws.String(startAfter)
		}
		out, err := s.client.ListObjectsV2(ctx, in)
		if err != nil {
			return nil, wrapError(ctx, fmt.Sprintf("list %q", req.Prefix), err)
		}
		for _, o := range out.Contents {
			k := aws.ToString(o.Key)
			startAfter = max(startAfter, k)
			if strings.HasPrefix(k, reserved) {
				startAfter = max(startAfter, pastReserved)
				continue
			}
			if !strings.HasPrefix(k, s.prefix) || len(found) > limit {
				continue
			}
			found = append(found, storage.ObjectInfo{
				Key: k[len(s.prefix):], Size: aws.ToInt64(o.Size), ETag: unquote(aws.ToString(o.ETag)), ModTime: aws.ToTime(o.LastModified).UTC(),
			})
		}
		more = aws.ToBool(out.IsTruncated) && len(out.Contents) > 0
	}
	page := &storage.ListPage{Objects: found}
	if len(found) > limit {
		page.Objects = found[:limit]
		page.NextPageToken = base64.RawURLEncoding.EncodeToString([]byte(found[limit-1].Key))
	}
	return page, nil
}
