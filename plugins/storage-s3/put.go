package s3store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/hashicorp/go-hclog"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/storage"
)

// abortAttempts bounds the rounds abort takes to make an upload go away.
const abortAttempts = 6

// defaultContentType is stored when a Put names none, so that every store
// reports the same.
const defaultContentType = "application/octet-stream"

// putArgs are the arguments of a Put that its operation id stands for.
type putArgs struct {
	Call        string            `json:"call"`
	Key         string            `json:"key"`
	Size        int64             `json:"size"`
	ContentType string            `json:"content_type"`
	Metadata    map[string]string `json:"metadata"`
}

// Put implements storage.Driver. A body of at most one part goes up in one
// PutObject; a longer one as a multipart upload that reads the next part
// while the previous one uploads, so at most two parts are in memory. A
// Put that fails, is cancelled or reads a body of the wrong length leaves
// no object and no incomplete upload behind.
func (d *Driver) Put(ctx context.Context, req *storage.PutRequest, body io.Reader) (*storage.ObjectInfo, error) {
	s, err := d.settings()
	if err != nil {
		return nil, err
	}
	if err := s.checkKey("put: key", req.Key); err != nil {
		return nil, err
	}
	if req.Size < -1 {
		return nil, fmt.Errorf("storage-s3: put %q: size %d: %w", req.Key, req.Size, base.ErrInvalidArgument)
	}
	meta, err := encodeMetadata(req.Metadata)
	if err != nil {
		return nil, fmt.Errorf("storage-s3: put %q: %w", req.Key, err)
	}
	fp := fingerprint(putArgs{Call: "put", Key: req.Key, Size: req.Size, ContentType: req.ContentType, Metadata: req.Metadata})
	mark := marker(req.OperationID, fp)
	meta[metaMarker] = mark
	contentType := req.ContentType
	if contentType == "" {
		contentType = defaultContentType
	}
	return d.once(ctx, s, "put", req.OperationID, fp,
		func(ctx context.Context) (*storage.ObjectInfo, error) { return s.findMarked(ctx, req.Key, mark) },
		func(ctx context.Context) (*storage.ObjectInfo, error) {
			return d.upload(ctx, s, req, contentType, meta, body)
		})
}

// partSizeFor is the part size for an object of size bytes (-1: unknown):
// the configured one, or larger when the object would need more than
// MaxParts parts.
func (s *settings) partSizeFor(size int64) (int64, error) {
	if size <= s.partSize*MaxParts {
		return s.partSize, nil
	}
	const mib = 1 << 20
	part := ((size+MaxParts-1)/MaxParts + mib - 1) / mib * mib
	if part > MaxPartSize {
		return 0, fmt.Errorf("%d bytes exceed %d parts of at most %d bytes: %w", size, MaxParts, int64(MaxPartSize), base.ErrResourceExhausted)
	}
	return part, nil
}

func (d *Driver) upload(ctx context.Context, s *settings, req *storage.PutRequest, contentType string, meta map[string]string, body io.Reader) (*storage.ObjectInfo, error) {
	what := fmt.Sprintf("put %q", req.Key)
	partSize, err := s.partSizeFor(req.Size)
	if err != nil {
		return nil, fmt.Errorf("storage-s3: %s: %w", what, err)
	}
	first := partSize
	if req.Size >= 0 && req.Size < partSize {
		first = req.Size
	}
	buf, release := s.partBuffer(first)
	defer release()
	br := &bodyReader{ctx: ctx, r: body, size: req.Size}
	n, end, err := br.fill(buf)
	if err != nil {
		return nil, fmt.Errorf("storage-s3: %s: %w", what, err)
	}
	key := s.objectKey(req.Key)
	if end {
		_, err := s.client.PutObject(ctx, &s3.PutObjectInput{
			Bucket: &s.bucket, Key: &key, Body: bytes.NewReader(buf[:n]), ContentLength: aws.Int64(int64(n)),
			ContentType: &contentType, Metadata: meta,
		})
		if err != nil {
			return nil, wrapError(ctx, what, err)
		}
	} else {
		mp, err := s.startMultipart(ctx, key, contentType, meta, what, d.logger)
		if err != nil {
			return nil, err
		}
		if err := mp.uploadParts(ctx, s, br, buf, partSize); err != nil {
			return nil, err
		}
	}
	info, err := s.stat(ctx, req.Key)
	if err != nil {
		return nil, fmt.Errorf("storage-s3: %s: describing the object: %w", what, err)
	}
	return &info.ObjectInfo, nil
}

// bodyReader reads a Put body part by part and holds it to its declared
// size.
type bodyReader struct {
	ctx  context.Context
	r    io.Reader
	size int64 // -1: unknown
	read int64
}

// fill reads into buf until it is full or the body ends. end reports that
// nothing follows buf[:n]; with an unknown size a full buffer leaves that
// open (end is false). A body that ends early or runs long is
// base.ErrInvalidArgument.
func (b *bodyReader) fill(buf []byte) (n int, end bool, err error) {
	for n < len(buf) {
		if err := b.ctx.Err(); err != nil {
			return n, false, err
		}
		m, rerr := b.r.Read(buf[n:])
		n += m
		b.read += int64(m)
		switch {
		case b.size >= 0 && b.read > b.size:
			return n, false, fmt.Errorf("body longer than the declared %d bytes: %w", b.size, base.ErrInvalidArgument)
		case rerr == io.EOF && b.size >= 0 && b.read < b.size:
			return n, false, fmt.Errorf("body ended after %d of %d bytes: %w", b.read, b.size, base.ErrInvalidArgument)
		case rerr == io.EOF:
			return n, true, nil
		case rerr != nil:
			return n, false, fmt.Errorf("reading the body: %w", rerr)
		}
	}
	if b.size < 0 || b.read < b.size {
		return n, false, nil
	}
	// The declared size is reached: the body must end here.
	var probe [1]byte
	for {
		if err := b.ctx.Err(); err != nil {
			return n, false, err
		}
		m, rerr := b.r.Read(probe[:])
		switch {
		case m > 0:
			return n, false, fmt.Errorf("body longer than the declared %d bytes: %w", b.size, base.ErrInvalidArgument)
		case rerr == io.EOF:
			return n, true, nil
		case rerr != nil:
			return n, false, fmt.Errorf("reading the body: %w", rerr)
		}
	}
}

// multipart is a multipart upload in progress.
type multipart struct {
	s        *settings
	logger   hclog.Logger
	key      string // bucket key
	uploadID string
	what     string
	parts    []types.CompletedPart
}

func (s *settings) startMultipart(ctx context.Context, key, contentType string, meta map[string]string, what string, logger hclog.Logger) (*multipart, error) {
	out, err := s.client.CreateMultipartUpload(ctx, &s3.CreateMultipartUploadInput{
		Bucket: &s.bucket, Key: &key, ContentType: nonEmpty(contentType), Metadata: meta,
	})
	if err != nil {
		return nil, wrapError(ctx, what+": starting a multipart upload", err)
	}
	if out.UploadId == nil {
		return nil, fmt.Errorf("storage-s3: %s: starting a multipart upload: no upload id in the response: %w", what, base.ErrInternal)
	}
	return &multipart{s: s, logger: logger, key: key, uploadID: *out.UploadId, what: what}, nil
}

// abort aborts the upload, even when ctx is done, and returns cause. It
// checks that the upload is gone and aborts again if not: a part upload
// that ctx cut short on this side may still land on the server after the
// abort and bring the upload back (S3 documents aborting again for this),
// so after a cancellation it checks a few times over a short while.
func (mp *multipart) abort(ctx context.Context, cause error) error {
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), recordTimeout)
	defer cancel()
	checks := 1
	if ctx.Err() != nil {
		checks = 3
	}
	var err error
	for attempt, gone := 1, 0; attempt <= abortAttempts; attempt++ {
		_, err = mp.s.client.AbortMultipartUpload(actx, &s3.AbortMultipartUploadInput{Bucket: &mp.s.bucket, Key: &mp.key, UploadId: &mp.uploadID})
		if err != nil && !errors.Is(Classify(err), base.ErrNotFound) {
			break
		}
		_, err = mp.s.client.ListParts(actx, &s3.ListPartsInput{Bucket: &mp.s.bucket, Key: &mp.key, UploadId: &mp.uploadID, MaxParts: aws.Int32(1)})
		switch {
		case err == nil:
			err = errors.New("the upload is still listed after its abort")
		case errors.Is(Classify(err), base.ErrNotFound):
			if gone++; gone >= checks {
				mp.logger.Debug("multipart upload aborted", "key", mp.key, "upload_id", mp.uploadID, "cause", cause)
				return cause
			}
			err = nil
		}
		select {
		case <-actx.Done():
		case <-time.After(time.Duration(attempt) * 100 * time.Millisecond):
		}
	}
	mp.logger.Warn("aborting a multipart upload failed; it stays until a bucket lifecycle rule removes incomplete uploads",
		"key", mp.key, "upload_id", mp.uploadID, "error", err)
	return cause
}

// complete completes the upload with its parts, or aborts it.
func (mp *multipart) complete(ctx context.Context) error {
	_, err := mp.s.client.CompleteMultipartUpload(ctx, &s3.CompleteMultipartUploadInput{
		Bucket: &mp.s.bucket, Key: &mp.key, UploadId: &mp.uploadID,
		MultipartUpload: &types.CompletedMultipartUpload{Parts: mp.parts},
	})
	if err != nil {
		return mp.abort(ctx, wrapError(ctx, mp.what+": completing the multipart upload", err))
	}
	mp.logger.Debug("multipart upload complete", "key", mp.key, "parts", len(mp.parts))
	return nil
}

// uploadParts uploads first (a full part already read) and the rest of
// the body, then completes the upload. Up to s.concurrency parts upload
// while the next one is read, each from a buffer of its own, so at most
// s.concurrency+1 parts are in memory. On any failure it lets the parts in
// flight finish (so that none lands after the abort) and aborts the
// upload; only ctx cuts them short.
func (mp *multipart) uploadParts(ctx context.Context, s *settings, br *bodyReader, first []byte, partSize int64) error {
	type result struct {
		num  int32
		buf  []byte
		etag *string
		err  error
	}
	results := make(chan result, s.concurrency)
	inflight, allocated := 0, 1
	free := [][]byte{}
	etags := make([]*string, 0, 16)
	var failed error
	fail := func(err error) {
		if failed == nil {
			failed = err
		}
	}
	collect := func() {
		r := <-results
		inflight--
		free = append(free, r.buf[:cap(r.buf)])
		switch {
		case r.err != nil:
			fail(wrapError(ctx, fmt.Sprintf("%s: part %d", mp.what, r.num), r.err))
		case r.etag == nil:
			fail(fmt.Errorf("storage-s3: %s: part %d: no ETag in the response: %w", mp.what, r.num, base.ErrInternal))
		default:
			etags[r.num-1] = r.etag
		}
	}

	cur, ended := first, false
	for num := int32(1); failed == nil; num++ {
		if num > MaxParts {
			fail(fmt.Errorf("storage-s3: %s: body longer than %d parts of %d bytes (raise part_size_bytes or declare the size): %w",
				mp.what, MaxParts, partSize, base.ErrResourceExhausted))
			break
		}
		for inflight >= s.concurrency && failed == nil {
			collect()
		}
		if failed != nil {
			break
		}
		etags = append(etags, nil)
		inflight++
		go func(num int32, part []byte) {
			out, err := s.client.UploadPart(ctx, &s3.UploadPartInput{
				Bucket: &s.bucket, Key: &mp.key, UploadId: &mp.uploadID, PartNumber: &num,
				Body: bytes.NewReader(part), ContentLength: aws.Int64(int64(len(part))),
			})
			r := result{num: num, buf: part, err: err}
			if err == nil {
				r.etag = out.ETag
			}
			results <- r
		}(num, cur)
		if ended {
			break
		}
		var next []byte
		switch {
		case len(free) > 0:
			next, free = free[len(free)-1], free[:len(free)-1]
		case allocated <= s.concurrency:
			buf, release := s.partBuffer(partSize)
			defer release()
			next, allocated = buf, allocated+1
		default:
			collect()
			if failed != nil {
				break
			}
			next, free = free[len(free)-1], free[:len(free)-1]
		}
		if failed != nil {
			break
		}
		n, end, err := br.fill(next[:partSize])
		if err != nil {
			fail(fmt.Errorf("storage-s3: %s: %w", mp.what, err))
			break
		}
		if n == 0 {
			break // the body ended with the last part
		}
		cur, ended = next[:n], end
	}
	for inflight > 0 {
		collect()
	}
	if failed != nil {
		return mp.abort(ctx, failed)
	}
	for i, etag := range etags {
		mp.parts = append(mp.parts, types.CompletedPart{ETag: etag, PartNumber: aws.Int32(int32(i + 1))})
	}
	return mp.complete(ctx)
}
