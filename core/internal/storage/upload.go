package storage

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/gpuaas/gpuaas/core/internal/audit"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/policy"
	"github.com/gpuaas/gpuaas/core/internal/store"
	sdkstorage "github.com/gpuaas/gpuaas/sdk/storage"
)

// A chunked upload reserves quota as its body arrives: as much as it has
// read so far, between minGrant and maxGrant at a time. That is the most it
// holds beyond what it stores (so a small upload does not lock out its
// neighbours), at a few dozen reservations per GiB.
const (
	minGrant = sdkstorage.ChunkSize
	maxGrant = 16 << 20
)

// finishTimeout bounds the bookkeeping after a transfer (recording the
// object, or releasing what a failed one held), which runs even when the
// request is gone.
const finishTimeout = 30 * time.Second

// UploadRequest is an upload streamed through the core.
type UploadRequest struct {
	Path string
	// Size is the body's length, or -1 when unknown (chunked).
	Size        int64
	ContentType string
	Body        io.Reader
}

// Upload stores Body at Path (replacing the file there). It reserves the
// bytes against the project's quota before it passes them on — all of a
// declared Size first, else a grant at a time as they arrive — and
// answers 413 storage_quota_exceeded when they do not fit; the driver then
// aborts what it started and nothing is stored. A replacement reserves its
// whole size; the bytes of the file it replaces free up when it completes.
// An upload to a path another operation holds is 409 storage_path_busy.
func (s *Service) Upload(ctx context.Context, p Project, req UploadRequest) (*Object, error) {
	path, err := CleanPath(req.Path, File)
	if err != nil {
		return nil, err
	}
	if req.Size < -1 {
		return nil, errcode.New(errcode.ValidationFailed, "size %d", req.Size)
	}
	t := target(p)
	quota := policy.StorageQuota.Value(ctx, s.pol, t)
	limit := policy.StorageMaxUpload.Value(ctx, s.pol, t)
	if req.Size > limit {
		return nil, errcode.New(errcode.RequestTooLarge, "an upload may be at most %d bytes", limit).WithDetails("max_upload_bytes", limit)
	}
	if req.Size >= 0 {
		limit = req.Size
	}
	contentType := req.ContentType
	if contentType == "" {
		contentType = "application/octet-stream"
	}
	d, err := s.driver(ctx)
	if err != nil {
		return nil, err
	}
	if err := s.notFolder(ctx, p, path); err != nil {
		return nil, err
	}
	replaces, err := lookup(ctx, s.pool, p, path, false)
	if err != nil {
		return nil, err
	}
	id := uuid.Must(uuid.NewV7())
	reserve := max(req.Size, 0)
	if err := s.hold(ctx, p, id, path, "upload", reserve, quota, s.now().Add(s.transfer+time.Minute), nil, ""); err != nil {
		s.metrics.operation("upload", err)
		return nil, err
	}
	body := &quotaReader{ctx: ctx, s: s, p: p, upload: id, r: req.Body, quota: quota, limit: limit, declared: req.Size >= 0, reserved: reserve}
	info, err := d.Put(ctx, &sdkstorage.PutRequest{OperationID: "upload-" + id.String(), Key: objectKey(p, path), Size: req.Size,
		ContentType: contentType}, body)
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), finishTimeout)
	defer cancel()
	if err != nil {
		if body.err != nil {
			err = body.err // the quota or the client's body, not the driver
		}
		s.metrics.aborted(abortReason(ctx, err))
		s.metrics.operation("upload", err)
		if rerr := s.release(fctx, p, id); rerr != nil {
			s.log.Error("releasing a failed upload", "upload_id", id, "error", rerr)
		}
		return nil, driverError(ctx, err, "store the object")
	}
	var o *Object
	err = store.Transact(fctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		held, err := unhold(fctx, tx, id)
		if err != nil {
			return err
		}
		if o, err = s.record(fctx, tx, p, path, id, info, contentType, held); err != nil {
			return err
		}
		return audit.Record(fctx, tx, audit.Entry{Action: "storage.object.upload", Target: s.objectTarget(p, o.ID),
			Details: map[string]any{"path": path, "size": o.Size}})
	})
	s.metrics.operation("upload", err)
	if err != nil {
		if replaces == nil {
			// A new object in the bucket without its row: take it out again.
			s.log.Error("recording an upload failed; deleting the object", "upload_id", id, "path", path, "error", err)
			if derr := d.Delete(fctx, &sdkstorage.DeleteRequest{OperationID: "unrecorded-" + id.String(), Key: objectKey(p, path)}); derr != nil {
				s.log.Error("deleting an unrecorded upload", "upload_id", id, "error", derr)
			}
		} else {
			// It replaced a file: deleting it would lose both.
			s.log.Error("recording an upload failed; the file's metadata is stale until it is written again",
				"upload_id", id, "path", path, "object_id", replaces.ID, "error", err)
		}
		if rerr := s.release(fctx, p, id); rerr != nil {
			s.log.Error("releasing an unrecorded upload", "upload_id", id, "error", rerr)
		}
		return nil, err
	}
	return o, nil
}

// abortReason labels a failed upload for gpuaas_storage_uploads_aborted_total.
func abortReason(ctx context.Context, err error) string {
	switch {
	case errcode.Of(err) == CodeQuotaExceeded, errcode.Of(err) == errcode.RequestTooLarge:
		return "quota"
	case errcode.Of(err) == errcode.BadRequest:
		return "client"
	case ctx.Err() != nil:
		return "cancelled"
	}
	return "backend"
}

// hold takes path for an operation in flight (an upload, presigned or
// streamed, or a rename or delete) and reserves bytes of the project's
// quota for it, in one transaction. A busy path is 409 storage_path_busy,
// a reservation over the quota 413 storage_quota_exceeded.
func (s *Service) hold(ctx context.Context, p Project, id uuid.UUID, path, kind string, bytes, quota int64, expires time.Time,
	size *int64, contentType string) error {
	return store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		if err := ensureUsage(ctx, tx, p); err != nil {
			return err
		}
		if bytes > 0 {
			if _, err := reserve(ctx, tx, p, bytes, bytes, quota); err != nil {
				return err
			}
		}
		_, err := tx.Exec(ctx, `INSERT INTO storage_inflight (id, project_id, org_id, path, kind, reserved, size, content_type, created_by, expires_at)
			VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)`, id, p.ID, p.OrgID, path, kind, bytes, size, contentType, actor(ctx), expires)
		if store.IsUniqueViolation(err, "") {
			return errcode.New(CodePathBusy, "another upload, rename or delete is working on this path; retry when it is done").WithDetails("path", path)
		}
		if err != nil {
			return fmt.Errorf("storage: holding %q: %w", path, err)
		}
		return nil
	})
}

// reserve adds between atLeast and want bytes to the project's reservation,
// as many as the quota leaves, and returns how many; less than atLeast is
// 413 storage_quota_exceeded. The usage row's lock orders concurrent
// reservations of a project.
func reserve(ctx context.Context, tx pgx.Tx, p Project, want, atLeast, quota int64) (int64, error) {
	var used, reserved int64
	err := tx.QueryRow(ctx, `SELECT bytes_used, bytes_reserved FROM storage_usage WHERE project_id = $1 FOR UPDATE`, p.ID).Scan(&used, &reserved)
	if err != nil {
		return 0, fmt.Errorf("storage: reserving: %w", err)
	}
	n := min(want, quota-used-reserved)
	if n < atLeast {
		return 0, errcode.New(CodeQuotaExceeded, "the project's storage quota of %d bytes is used up", quota).
			WithDetails("quota_bytes", quota).WithDetails("used_bytes", used).WithDetails("reserved_bytes", reserved).
			WithDetails("requested_bytes", atLeast)
	}
	if _, err := tx.Exec(ctx, `UPDATE storage_usage SET bytes_reserved = bytes_reserved + $2 WHERE project_id = $1`, p.ID, n); err != nil {
		return 0, fmt.Errorf("storage: reserving: %w", err)
	}
	return n, nil
}

// grow reserves more for an upload in flight.
func (s *Service) grow(ctx context.Context, p Project, id uuid.UUID, want, atLeast, quota int64) (int64, error) {
	var got int64
	err := store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		var err error
		if got, err = reserve(ctx, tx, p, want, atLeast, quota); err != nil {
			return err
		}
		tag, err := tx.Exec(ctx, `UPDATE storage_inflight SET reserved = reserved + $2 WHERE id = $1`, id, got)
		if err != nil {
			return fmt.Errorf("storage: reserving: %w", err)
		}
		if tag.RowsAffected() == 0 {
			return errcode.New(errcode.Timeout, "the upload ran past its time and was released")
		}
		return nil
	})
	return got, err
}

// unhold ends an operation in flight inside tx and returns the bytes it
// had reserved (0 when the janitor released it already).
func unhold(ctx context.Context, tx pgx.Tx, id uuid.UUID) (int64, error) {
	var held int64
	err := tx.QueryRow(ctx, `DELETE FROM storage_inflight WHERE id = $1 RETURNING reserved`, id).Scan(&held)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("storage: releasing: %w", err)
	}
	return held, nil
}

// release ends an operation in flight and gives its reservation back.
func (s *Service) release(ctx context.Context, p Project, id uuid.UUID) error {
	return store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		held, err := unhold(ctx, tx, id)
		if err != nil || held == 0 {
			return err
		}
		_, err = tx.Exec(ctx, `UPDATE storage_usage SET bytes_reserved = bytes_reserved - $2 WHERE project_id = $1`, p.ID, held)
		return err
	})
}

// quotaReader passes an upload's body on, reserving quota before it hands
// out bytes beyond what is reserved. Its first failure sticks: the upload
// fails with it (the driver then aborts what it started).
type quotaReader struct {
	ctx      context.Context
	s        *Service
	p        Project
	upload   uuid.UUID
	r        io.Reader
	quota    int64
	limit    int64 // the declared size, or the cap of a chunked upload
	declared bool  // limit is the body's declared size
	reserved int64
	read     int64
	err      error
}

var _ io.Reader = (*quotaReader)(nil)

func (q *quotaReader) Read(b []byte) (int, error) {
	if q.err != nil {
		return 0, q.err
	}
	n, err := q.r.Read(b)
	if n > 0 {
		total := q.read + int64(n)
		if total > q.limit {
			q.err = errcode.New(errcode.RequestTooLarge, "the body is longer than %d bytes", q.limit).WithDetails("max_upload_bytes", q.limit)
			return 0, q.err
		}
		if total > q.reserved {
			need := total - q.reserved
			grant := min(max(q.read, minGrant), maxGrant, q.limit-q.reserved)
			got, gerr := q.s.grow(q.ctx, q.p, q.upload, max(need, grant), need, q.quota)
			if gerr != nil {
				q.err = gerr
				return 0, gerr
			}
			q.reserved += got
		}
		q.read = total
		q.s.metrics.bytesIn.Add(float64(n))
	}
	switch {
	case err == io.EOF && q.declared && q.read < q.limit:
		q.err = errcode.New(errcode.BadRequest, "the request body ended after %d of its %d bytes", q.read, q.limit)
		return n, q.err
	case err != nil && err != io.EOF:
		if q.ctx.Err() == nil {
			err = errcode.Wrap(err, errcode.BadRequest, "reading the request body failed")
		}
		q.err = err
		return n, err
	}
	return n, err
}
