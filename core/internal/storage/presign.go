package storage

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/gpuaas/gpuaas/core/internal/audit"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/policy"
	"github.com/gpuaas/gpuaas/core/internal/store"
	"github.com/gpuaas/gpuaas/sdk/base"
	sdkstorage "github.com/gpuaas/gpuaas/sdk/storage"
)

// confirmGrace is how long after its URL expires a presigned upload may
// still be confirmed (an upload that started in time may end later).
const confirmGrace = 15 * time.Minute

// presigner returns the driver's presign capability.
func (s *Service) presigner(ctx context.Context) (sdkstorage.Presigner, error) {
	d, err := s.driver(ctx)
	if err != nil {
		return nil, err
	}
	ps, ok := d.(sdkstorage.Presigner)
	if !ok {
		return nil, errcode.New(CodeUnavailable, "the storage backend cannot hand out presigned URLs")
	}
	return ps, nil
}

func presignError(ctx context.Context, err error) error {
	if errors.Is(err, base.ErrUnimplemented) {
		return errcode.Wrap(err, CodeUnavailable, "the storage backend cannot hand out presigned URLs")
	}
	return driverError(ctx, err, "presign a URL")
}

// PresignDownload returns a URL that reads the file at path straight from
// the store until it expires (storage.presign_expiry).
func (s *Service) PresignDownload(ctx context.Context, p Project, path string) (*Object, *sdkstorage.PresignedURL, error) {
	o, err := s.Stat(ctx, p, path)
	if err != nil {
		return nil, nil, err
	}
	ps, err := s.presigner(ctx)
	if err != nil {
		return nil, nil, err
	}
	u, err := ps.PresignGet(ctx, &sdkstorage.PresignRequest{Key: objectKey(p, o.Path),
		Expiry: policy.StoragePresignExpiry.Value(ctx, s.pol, target(p)), ContentType: o.ContentType})
	s.metrics.operation("presign", err)
	if err != nil {
		return nil, nil, presignError(ctx, err)
	}
	err = audit.Record(ctx, s.pool, audit.Entry{Action: "storage.object.presign_download", Target: s.objectTarget(p, o.ID),
		Details: map[string]any{"path": o.Path, "expires_at": u.ExpiresAt}})
	return o, u, err
}

// PendingUpload is a presigned upload waiting for its confirmation.
type PendingUpload struct {
	ID          uuid.UUID
	Project     Project
	Path        string
	Size        int64
	ContentType string
	URL         *sdkstorage.PresignedURL
	ExpiresAt   time.Time
}

// PresignUpload reserves size bytes of the quota for a file at path and
// returns a URL that uploads it straight to the store, signed for exactly
// size bytes (and the content type). The file becomes part of the project
// when CompleteUpload confirms it; an upload not confirmed in time is
// removed and its reservation released. The path must be free: a presigned
// upload never replaces a file.
func (s *Service) PresignUpload(ctx context.Context, p Project, path string, size int64, contentType string) (*PendingUpload, error) {
	clean, err := CleanPath(path, File)
	if err != nil {
		return nil, err
	}
	t := target(p)
	if limit := policy.StorageMaxUpload.Value(ctx, s.pol, t); size < 1 || size > limit {
		return nil, errcode.New(errcode.ValidationFailed, "size must be between 1 and %d bytes", limit).WithDetails("field", "size")
	}
	if contentType == "" {
		contentType = "application/octet-stream"
	}
	if err := s.fileFree(ctx, p, clean); err != nil {
		return nil, err
	}
	ps, err := s.presigner(ctx)
	if err != nil {
		return nil, err
	}
	expiry := policy.StoragePresignExpiry.Value(ctx, s.pol, t)
	id := uuid.Must(uuid.NewV7())
	up := &PendingUpload{ID: id, Project: p, Path: clean, Size: size, ContentType: contentType}
	up.ExpiresAt = s.now().Add(expiry + confirmGrace)
	if err := s.hold(ctx, p, id, clean, "presigned_upload", size, policy.StorageQuota.Value(ctx, s.pol, t), up.ExpiresAt, &size, contentType); err != nil {
		s.metrics.operation("presign", err)
		return nil, err
	}
	up.URL, err = ps.PresignPut(ctx, &sdkstorage.PresignRequest{Key: objectKey(p, clean), Expiry: expiry, ContentType: contentType, ContentLength: size})
	if err == nil {
		err = audit.Record(ctx, s.pool, audit.Entry{Action: "storage.upload.presign", Target: s.ids.InProject(p.OrgID.String(), p.ID.String(), "storage_upload", id.String()),
			Details: map[string]any{"path": clean, "size": size}})
	}
	s.metrics.operation("presign", err)
	if err != nil {
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), finishTimeout)
		defer cancel()
		if rerr := s.release(fctx, p, id); rerr != nil {
			s.log.Error("releasing a presigned upload that failed", "upload_id", id, "error", rerr)
		}
		return nil, presignError(ctx, err)
	}
	return up, nil
}

// Pending returns a presigned upload waiting for confirmation, by id.
func (s *Service) Pending(ctx context.Context, id uuid.UUID) (*PendingUpload, error) {
	up := &PendingUpload{ID: id}
	var size *int64
	err := s.pool.QueryRow(ctx, `SELECT org_id, project_id, path, size, content_type, expires_at FROM storage_inflight
		WHERE id = $1 AND kind = 'presigned_upload'`, id).
		Scan(&up.Project.OrgID, &up.Project.ID, &up.Path, &size, &up.ContentType, &up.ExpiresAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, errcode.New(CodeUploadNotFound, "no presigned upload %s waits for confirmation", id)
	}
	if err != nil {
		return nil, fmt.Errorf("storage: reading upload %s: %w", id, err)
	}
	if size != nil {
		up.Size = *size
	}
	if !s.now().Before(up.ExpiresAt) {
		return nil, errcode.New(CodeUploadNotFound, "presigned upload %s expired unconfirmed", id)
	}
	return up, nil
}

// CompleteUpload confirms a presigned upload: the object must be in the
// store with the signed size. It becomes a file of the project and its
// reservation turns into usage. An object of another size is removed and
// the upload ends (409 storage_upload_incomplete); a missing one leaves
// the upload waiting (409 storage_upload_incomplete) until it expires.
func (s *Service) CompleteUpload(ctx context.Context, up *PendingUpload) (*Object, error) {
	d, err := s.driver(ctx)
	if err != nil {
		return nil, err
	}
	p := up.Project
	key := objectKey(p, up.Path)
	info, err := d.Stat(ctx, key)
	switch {
	case errors.Is(err, base.ErrNotFound):
		err = errcode.New(CodeUploadIncomplete, "nothing was uploaded yet; PUT the file to the presigned URL, then confirm").
			WithDetails("upload_id", up.ID)
		s.metrics.operation("complete", err)
		return nil, err
	case err != nil:
		return nil, driverError(ctx, err, "find the upload")
	}
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), finishTimeout)
	defer cancel()
	if info.Size != up.Size {
		s.metrics.aborted("client")
		if derr := d.Delete(fctx, &sdkstorage.DeleteRequest{OperationID: "presigned-bad-" + up.ID.String(), Key: key}); derr != nil {
			return nil, driverError(ctx, derr, "remove the upload")
		}
		if rerr := s.release(fctx, p, up.ID); rerr != nil {
			return nil, rerr
		}
		err := errcode.New(CodeUploadIncomplete, "the uploaded object has %d bytes, not the %d the upload was signed for; it was removed", info.Size, up.Size).
			WithDetails("upload_id", up.ID)
		s.metrics.operation("complete", err)
		return nil, err
	}
	var o *Object
	err = store.Transact(fctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		var held int64
		err := tx.QueryRow(fctx, `DELETE FROM storage_inflight WHERE id = $1 AND kind = 'presigned_upload' RETURNING reserved`, up.ID).Scan(&held)
		if errors.Is(err, pgx.ErrNoRows) {
			return errcode.New(CodeUploadNotFound, "the upload was confirmed already or expired")
		}
		if err != nil {
			return fmt.Errorf("storage: completing upload %s: %w", up.ID, err)
		}
		if o, err = s.record(fctx, tx, p, up.Path, up.ID, info, up.ContentType, held); err != nil {
			return err
		}
		return audit.Record(fctx, tx, audit.Entry{Action: "storage.upload.complete", Target: s.objectTarget(p, o.ID),
			Details: map[string]any{"path": o.Path, "size": o.Size}})
	})
	s.metrics.operation("complete", err)
	return o, err
}
