// Package storage is project storage: files and folders a project keeps in
// the bucket of a storage driver instance (plugins/storage-s3), under
// orgs/{org}/projects/{project}/, mirrored by the storage_objects table.
//
// Uploads stream through the core to the driver and reserve quota in
// Postgres before the bytes they carry go on (storage.quota_bytes per
// project): a body of declared length reserves all of it up front, a
// chunked one a grant at a time as it arrives, so parallel uploads
// never hold more than the quota between them and a project never stores
// more. Presigned URLs let a client move a large file directly to and from
// the store; a presigned upload reserves its signed length and becomes an
// object when the client confirms it. Stored bytes are metered into the
// ledger in GB-months when storage.price_per_gb_month_minor is set.
//
// Every path a caller sends goes through CleanPath.
package storage

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/gpuaas/gpuaas/core/internal/audit"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/policy"
	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/rid"
	"github.com/gpuaas/gpuaas/core/internal/store"
	"github.com/gpuaas/gpuaas/sdk/base"
	sdkstorage "github.com/gpuaas/gpuaas/sdk/storage"
)

// Error codes.
const (
	CodePathTraversal     errcode.Code = "storage_path_traversal"
	CodeInvalidKey        errcode.Code = "invalid_object_key"
	CodeNotFound          errcode.Code = "storage_object_not_found"
	CodeQuotaExceeded     errcode.Code = "storage_quota_exceeded"
	CodeExists            errcode.Code = "storage_object_exists"
	CodePathBusy          errcode.Code = "storage_path_busy"
	CodeFolderNotEmpty    errcode.Code = "storage_folder_not_empty"
	CodeRangeNotSatisfied errcode.Code = "storage_range_not_satisfiable"
	CodeUploadNotFound    errcode.Code = "storage_upload_not_found"
	CodeUploadIncomplete  errcode.Code = "storage_upload_incomplete"
	CodeUnavailable       errcode.Code = "storage_unavailable"
	CodeBackendFailed     errcode.Code = "storage_backend_error"
)

// Codes lists this package's codes for the contract test.
func Codes() []errcode.Code {
	return []errcode.Code{CodePathTraversal, CodeInvalidKey, CodeNotFound, CodeQuotaExceeded, CodeExists, CodePathBusy,
		CodeFolderNotEmpty, CodeRangeNotSatisfied, CodeUploadNotFound, CodeUploadIncomplete, CodeUnavailable, CodeBackendFailed}
}

// Drivers finds the storage driver of a configured instance (the plugin
// host; tests pass a driver in process).
type Drivers interface {
	Storage(ctx context.Context, instance string) (sdkstorage.Driver, error)
}

// Project names the project whose storage a call uses.
type Project struct {
	OrgID, ID uuid.UUID
}

// Object is a file or a folder marker of a project.
type Object struct {
	ID          uuid.UUID
	OrgID       uuid.UUID
	ProjectID   uuid.UUID
	Path        string // a folder's ends in '/'
	Size        int64
	ETag        string
	ContentType string
	CreatedBy   string
	CreatedAt   time.Time
	UpdatedAt   time.Time
}

// Folder reports whether o is a folder marker.
func (o *Object) Folder() bool { return len(o.Path) > 0 && o.Path[len(o.Path)-1] == '/' }

// Service runs project storage.
type Service struct {
	pool     *pgxpool.Pool
	pol      *policy.Service
	drivers  Drivers
	instance string
	ids      rid.Builder
	log      hclog.Logger
	metrics  *Metrics
	now      func() time.Time
	// transfer bounds one streamed upload: its in-flight row expires after it.
	transfer time.Duration
	// directHTTP, when set, moves object bytes over the driver's presigned
	// URLs (direct.go); directOff and directMPOff remember a driver that
	// cannot presign or has no multipart uploads.
	directHTTP  *http.Client
	directOff   atomic.Bool
	directMPOff atomic.Bool
}

// Option configures a Service.
type Option func(*Service)

// WithClock injects the clock (metering, expiry).
func WithClock(now func() time.Time) Option { return func(s *Service) { s.now = now } }

// WithRegisterer registers the storage metrics on reg.
func WithRegisterer(reg prometheus.Registerer) Option {
	return func(s *Service) { s.metrics = newMetrics(reg, s.pool) }
}

// WithDirectTransfers has the core move object bytes to and from the store
// itself over URLs the driver presigns for each transfer, instead of
// through the plugin (direct.go). The store must be reachable from the core.
func WithDirectTransfers(on bool) Option {
	return func(s *Service) {
		s.directHTTP = nil
		if on {
			s.directHTTP = newDirectClient()
		}
	}
}

// WithTransferTimeout sets how long one upload through the core may take
// (default 12h).
func WithTransferTimeout(d time.Duration) Option { return func(s *Service) { s.transfer = d } }

// NewService returns a Service that keeps objects through the driver
// instance named instance.
func NewService(pool *pgxpool.Pool, pol *policy.Service, drivers Drivers, region, instance string, log hclog.Logger, opts ...Option) *Service {
	s := &Service{pool: pool, pol: pol, drivers: drivers, instance: instance, ids: rid.Builder{Region: region}, log: log,
		now: time.Now, transfer: 12 * time.Hour}
	for _, o := range opts {
		o(s)
	}
	if s.metrics == nil {
		s.metrics = newMetrics(nil, pool)
	}
	return s
}

// TransferTimeout is how long one upload or download through the core may
// take.
func (s *Service) TransferTimeout() time.Duration { return s.transfer }

// driver returns the storage driver, or 503 storage_unavailable.
func (s *Service) driver(ctx context.Context) (sdkstorage.Driver, error) {
	if s.drivers == nil {
		return nil, errcode.New(CodeUnavailable, "project storage is not configured")
	}
	d, err := s.drivers.Storage(ctx, s.instance)
	if err != nil {
		return nil, errcode.Wrap(err, CodeUnavailable, "project storage is not available; retry later")
	}
	if ps, ok := d.(sdkstorage.Presigner); ok && s.directHTTP != nil {
		return direct{Driver: d, ps: ps, client: s.directHTTP, dial: directDial, off: &s.directOff, mpOff: &s.directMPOff}, nil
	}
	return d, nil
}

// driverError turns a driver's error into what a client sees. The driver's
// own message may name the bucket or the endpoint: it goes to the log
// (through the cause), never to the client.
func driverError(ctx context.Context, err error, what string) error {
	switch {
	case err == nil:
		return nil
	case errcode.As(err) != nil:
		return err
	case ctx.Err() != nil:
		return fmt.Errorf("storage: %s: %w", what, err)
	case errors.Is(err, base.ErrNotFound):
		return errcode.Wrap(err, CodeNotFound, "no such object")
	case errors.Is(err, base.ErrUnavailable), errors.Is(err, base.ErrDeadlineExceeded), errors.Is(err, base.ErrFailedPrecondition):
		return errcode.Wrap(err, CodeUnavailable, "project storage is not available; retry later")
	}
	return errcode.Wrap(err, CodeBackendFailed, "the storage backend failed to "+what)
}

// actor is who the context's principal is, for created_by columns.
func actor(ctx context.Context) string {
	if p := principal.From(ctx); p != nil {
		return p.Actor()
	}
	return "system"
}

// objectTarget is the canonical id of an object in audit rows.
func (s *Service) objectTarget(p Project, id uuid.UUID) rid.ID {
	return s.ids.InProject(p.OrgID.String(), p.ID.String(), "storage_object", id.String())
}

// projectTarget is the canonical id of the project, for audit rows of
// operations on many objects.
func (s *Service) projectTarget(p Project) rid.ID {
	return s.ids.Project(p.OrgID.String(), p.ID.String())
}

const objectColumns = `id, org_id, project_id, path, size, etag, content_type, created_by, created_at, updated_at`

func scanObject(row pgx.Row) (*Object, error) {
	o := &Object{}
	err := row.Scan(&o.ID, &o.OrgID, &o.ProjectID, &o.Path, &o.Size, &o.ETag, &o.ContentType, &o.CreatedBy, &o.CreatedAt, &o.UpdatedAt)
	return o, err
}

// lookup reads the object at a clean path; a missing one is nil.
func lookup(ctx context.Context, db interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, p Project, path string, lock bool) (*Object, error) {
	q := `SELECT ` + objectColumns + ` FROM storage_objects WHERE project_id = $1 AND path = $2`
	if lock {
		q += ` FOR UPDATE`
	}
	o, err := scanObject(db.QueryRow(ctx, q, p.ID, path))
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("storage: reading %q: %w", path, err)
	}
	return o, nil
}

// Stat returns the file at path.
func (s *Service) Stat(ctx context.Context, p Project, path string) (*Object, error) {
	clean, err := CleanPath(path, File)
	if err != nil {
		return nil, err
	}
	o, err := lookup(ctx, s.pool, p, clean, false)
	if err != nil {
		return nil, err
	}
	if o == nil {
		return nil, errcode.New(CodeNotFound, "no file at this path").WithDetails("path", clean)
	}
	return o, nil
}

// Open opens the content of o: all of it, or r when r is not nil. The
// caller closes the body; ctx must outlive the reading.
func (s *Service) Open(ctx context.Context, p Project, o *Object, r *sdkstorage.Range) (*sdkstorage.Object, error) {
	d, err := s.driver(ctx)
	if err != nil {
		return nil, err
	}
	key := objectKey(p, o.Path)
	var obj *sdkstorage.Object
	if r != nil {
		obj, err = sdkstorage.GetRange(ctx, d, key, *r)
	} else {
		obj, err = d.Get(ctx, key)
	}
	if err != nil {
		return nil, driverError(ctx, err, "read the object")
	}
	if obj.Info.Size != o.Size || (obj.Info.ETag != "" && obj.Info.ETag != o.ETag) {
		s.log.Warn("the bucket and the metadata of an object disagree", "project_id", p.ID, "object_id", o.ID,
			"size", o.Size, "bucket_size", obj.Info.Size, "etag", o.ETag, "bucket_etag", obj.Info.ETag)
	}
	s.metrics.operation("download", nil)
	return &sdkstorage.Object{Info: obj.Info, Body: counted(obj.Body, s.metrics.bytesOut)}, nil
}

// Usage is what a project holds against its quota.
type Usage struct {
	BytesUsed     int64
	Objects       int64
	BytesReserved int64
	QuotaBytes    int64
}

// Usage reports the project's usage.
func (s *Service) Usage(ctx context.Context, p Project) (Usage, error) {
	u := Usage{QuotaBytes: policy.StorageQuota.Value(ctx, s.pol, target(p))}
	err := s.pool.QueryRow(ctx, `SELECT bytes_used, objects, bytes_reserved FROM storage_usage WHERE project_id = $1`, p.ID).
		Scan(&u.BytesUsed, &u.Objects, &u.BytesReserved)
	if err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return u, fmt.Errorf("storage: usage: %w", err)
	}
	return u, nil
}

func target(p Project) policy.Target {
	return policy.Target{OrgID: p.OrgID.String(), ProjectID: p.ID.String()}
}

// Mkdir makes a folder: a zero-byte marker object at the folder's path, so
// the folder lists while empty. Making a folder that exists succeeds.
func (s *Service) Mkdir(ctx context.Context, p Project, path string) (*Object, error) {
	clean, err := CleanPath(path, Folder)
	if err != nil {
		return nil, err
	}
	if file, err := lookup(ctx, s.pool, p, clean[:len(clean)-1], false); err != nil {
		return nil, err
	} else if file != nil {
		return nil, errcode.New(CodeExists, "a file has this name").WithDetails("path", file.Path)
	}
	d, err := s.driver(ctx)
	if err != nil {
		return nil, err
	}
	held, unlock, err := s.lock(ctx, p, "upload", []string{clean})
	if err != nil {
		return nil, err
	}
	defer unlock()
	if !held[clean] {
		return nil, errcode.New(CodePathBusy, "another operation is working on this folder; retry when it is done").WithDetails("path", clean)
	}
	id := uuid.Must(uuid.NewV7())
	info, err := d.Put(ctx, &sdkstorage.PutRequest{OperationID: "mkdir-" + id.String(), Key: objectKey(p, clean), Size: 0,
		ContentType: folderContentType}, strings.NewReader(""))
	if err != nil {
		return nil, driverError(ctx, err, "make the folder")
	}
	var o *Object
	err = store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		o, err = s.record(ctx, tx, p, clean, id, info, folderContentType, 0)
		if err != nil {
			return err
		}
		return audit.Record(ctx, tx, audit.Entry{Action: "storage.folder.create", Target: s.objectTarget(p, o.ID),
			Details: map[string]any{"path": clean}})
	})
	s.metrics.operation("mkdir", err)
	return o, err
}

// folderContentType marks folder objects.
const folderContentType = "application/x-directory"

// record writes the object a driver call stored at path (replacing what
// was there), releases reserved bytes of the project's reservation and
// moves its usage, all inside tx.
func (s *Service) record(ctx context.Context, tx pgx.Tx, p Project, path string, id uuid.UUID, info *sdkstorage.ObjectInfo,
	contentType string, reserved int64) (*Object, error) {
	if err := ensureUsage(ctx, tx, p); err != nil {
		return nil, err
	}
	old, err := lookup(ctx, tx, p, path, true)
	if err != nil {
		return nil, err
	}
	o := &Object{ID: id, OrgID: p.OrgID, ProjectID: p.ID, Path: path, Size: info.Size, ETag: info.ETag, ContentType: contentType, CreatedBy: actor(ctx)}
	err = tx.QueryRow(ctx, `INSERT INTO storage_objects (project_id, path, id, org_id, size, etag, content_type, created_by, created_at, updated_at)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)
		ON CONFLICT (project_id, path) DO UPDATE SET id = excluded.id, size = excluded.size, etag = excluded.etag,
			content_type = excluded.content_type, created_by = excluded.created_by, updated_at = excluded.updated_at
		RETURNING created_at, updated_at`,
		p.ID, path, id, p.OrgID, o.Size, o.ETag, o.ContentType, o.CreatedBy, s.now()).Scan(&o.CreatedAt, &o.UpdatedAt)
	if err != nil {
		return nil, fmt.Errorf("storage: recording %q: %w", path, err)
	}
	delta, count := o.Size, int64(1)
	if old != nil {
		delta, count = o.Size-old.Size, 0
	}
	return o, s.move(ctx, tx, p, delta, count, -reserved)
}

// ensureUsage makes the project's usage row.
func ensureUsage(ctx context.Context, tx pgx.Tx, p Project) error {
	_, err := tx.Exec(ctx, `INSERT INTO storage_usage (project_id, org_id) VALUES ($1, $2) ON CONFLICT (project_id) DO NOTHING`, p.ID, p.OrgID)
	if err != nil {
		return fmt.Errorf("storage: usage row: %w", err)
	}
	return nil
}

// move changes the project's usage by bytes, objects and reserved bytes,
// first accruing the byte-seconds of what it held until now.
func (s *Service) move(ctx context.Context, tx pgx.Tx, p Project, bytes, objects, reserved int64) error {
	_, err := tx.Exec(ctx, `UPDATE storage_usage SET
			byte_seconds = byte_seconds + bytes_used::numeric * GREATEST(0, extract(epoch FROM ($5::timestamptz - accrued_at))),
			accrued_at = GREATEST(accrued_at, $5),
			bytes_used = bytes_used + $2, objects = objects + $3, bytes_reserved = bytes_reserved + $4
		WHERE project_id = $1`, p.ID, bytes, objects, reserved, s.now())
	if err != nil {
		return fmt.Errorf("storage: usage: %w", err)
	}
	return nil
}
