package storage

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/gpuaas/gpuaas/core/internal/audit"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/store"
	sdkstorage "github.com/gpuaas/gpuaas/sdk/storage"
)

// Folder operations work in batches of this many objects.
const batchSize = 100

// lockTTL bounds how long a rename or delete holds a path; a process that
// dies holding one loses it to the janitor after this.
const lockTTL = 10 * time.Minute

// Result is what a rename or delete did.
type Result struct {
	// Object is the renamed file (file renames only).
	Object  *Object
	Objects int
	Bytes   int64
}

// folderHas reports whether anything lies under the folder path.
func (s *Service) folderHas(ctx context.Context, p Project, folder string) (bool, error) {
	var found bool
	err := s.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM storage_objects WHERE project_id = $1 AND path >= $2 AND path < $3)`,
		p.ID, folder, folder[:len(folder)-1]+"0").Scan(&found)
	if err != nil {
		return false, fmt.Errorf("storage: looking into %q: %w", folder, err)
	}
	return found, nil
}

// under reads up to batchSize objects under folder after the path after.
func (s *Service) under(ctx context.Context, p Project, folder, after string) ([]*Object, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+objectColumns+` FROM storage_objects
		WHERE project_id = $1 AND path >= $2 AND path < $3 AND path > $4 ORDER BY path LIMIT $5`,
		p.ID, folder, folder[:len(folder)-1]+"0", after, batchSize)
	if err != nil {
		return nil, fmt.Errorf("storage: reading %q: %w", folder, err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (*Object, error) { return scanObject(r) })
}

// lock holds paths for a rename or delete, each it can: it returns those
// it holds and the func that lets them go.
func (s *Service) lock(ctx context.Context, p Project, kind string, paths []string) (map[string]bool, func(), error) {
	held := map[string]bool{}
	ids := map[string]uuid.UUID{}
	err := store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		clear(held)
		for _, path := range paths {
			id := uuid.Must(uuid.NewV7())
			tag, err := tx.Exec(ctx, `INSERT INTO storage_inflight (id, project_id, org_id, path, kind, created_by, expires_at)
				VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (project_id, path) DO NOTHING`,
				id, p.ID, p.OrgID, path, kind, actor(ctx), s.now().Add(lockTTL))
			if err != nil {
				return fmt.Errorf("storage: holding %q: %w", path, err)
			}
			if tag.RowsAffected() == 1 {
				held[path], ids[path] = true, id
			}
		}
		return nil
	})
	if err != nil {
		return nil, nil, err
	}
	unlock := func() {
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), finishTimeout)
		defer cancel()
		list := make([]uuid.UUID, 0, len(ids))
		for path, id := range ids {
			if held[path] {
				list = append(list, id)
			}
		}
		if _, err := s.pool.Exec(fctx, `DELETE FROM storage_inflight WHERE id = ANY($1)`, list); err != nil {
			s.log.Warn("releasing held paths; the janitor will", "error", err)
		}
	}
	return held, unlock, nil
}

// Rename moves a file to another path, or a folder (paths ending in '/')
// with everything in it. The destination must be free: an existing file
// there, or in a folder's case any object the move would land on, is 409
// storage_object_exists. A folder moves object by object (a server-side
// copy, then the row, then the old object goes); an object another
// operation holds stays behind and the rename answers 409
// storage_path_busy after moving the rest, so it can be run again.
func (s *Service) Rename(ctx context.Context, p Project, from, to string) (*Result, error) {
	src, err := CleanPath(from, FileOrFolder)
	if err != nil {
		return nil, err
	}
	dst, err := CleanPath(to, FileOrFolder)
	if err != nil {
		return nil, err
	}
	folder := strings.HasSuffix(src, "/")
	switch {
	case folder != strings.HasSuffix(dst, "/"):
		return nil, errcode.New(errcode.ValidationFailed, "rename a folder to a folder and a file to a file (a folder's path ends in '/')").WithDetails("field", "to")
	case src == dst:
		return nil, errcode.New(errcode.ValidationFailed, "the source and the destination are the same").WithDetails("field", "to")
	case folder && strings.HasPrefix(dst, src):
		return nil, errcode.New(errcode.ValidationFailed, "a folder cannot move into itself").WithDetails("field", "to")
	}
	d, err := s.driver(ctx)
	if err != nil {
		return nil, err
	}
	var objs []*Object
	if !folder {
		o, err := lookup(ctx, s.pool, p, src, false)
		if err != nil {
			return nil, err
		}
		if o == nil {
			return nil, errcode.New(CodeNotFound, "no file at this path").WithDetails("path", src)
		}
		objs = []*Object{o}
	} else if has, err := s.folderHas(ctx, p, src); err != nil {
		return nil, err
	} else if !has {
		return nil, errcode.New(CodeNotFound, "no folder at this path").WithDetails("path", src)
	}
	if err := s.checkFree(ctx, p, src, dst); err != nil {
		return nil, err
	}
	op := uuid.Must(uuid.NewV7())
	res := &Result{}
	var busy []string
	for after := ""; ; {
		if folder {
			if objs, err = s.under(ctx, p, src, after); err != nil {
				break
			}
			if len(objs) == 0 {
				break
			}
			after = objs[len(objs)-1].Path
		}
		var skipped []string
		if skipped, err = s.moveBatch(ctx, d, p, op, objs, src, dst, res); err != nil {
			break
		}
		busy = append(busy, skipped...)
		if !folder {
			break
		}
	}
	switch {
	case err == nil && len(busy) > 0:
		err = errcode.New(CodePathBusy, "%d objects are held by other operations and stayed; rename again when they are done", len(busy)).
			WithDetails("paths", busy[:min(len(busy), 20)]).WithDetails("moved_objects", res.Objects)
	case err == nil && !folder && res.Objects == 0:
		err = errcode.New(CodeNotFound, "no file at this path").WithDetails("path", src) // deleted meanwhile
	}
	action, tgt := "storage.folder.rename", s.projectTarget(p)
	if !folder && res.Object != nil {
		action, tgt = "storage.object.rename", s.objectTarget(p, res.Object.ID)
	}
	s.metrics.operation("rename", err)
	return res, s.audit(ctx, err, res.Objects > 0, audit.Entry{Action: action, Target: tgt,
		Details: map[string]any{"from": src, "to": dst, "objects": res.Objects, "bytes": res.Bytes}})
}

// audit records the outcome of an operation that may have done part of
// its work: success, or when it failed after changing something, a failure
// row with what it did.
func (s *Service) audit(ctx context.Context, err error, changed bool, e audit.Entry) error {
	if err != nil && !changed {
		return err
	}
	if err != nil {
		e.Result = audit.Failure
	}
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), finishTimeout)
	defer cancel()
	if aerr := audit.Record(fctx, s.pool, e); aerr != nil {
		if err != nil {
			return err
		}
		return aerr
	}
	return err
}

// checkFree refuses a rename whose destination is taken.
func (s *Service) checkFree(ctx context.Context, p Project, src, dst string) error {
	if !strings.HasSuffix(src, "/") {
		return s.fileFree(ctx, p, dst)
	}
	if o, err := lookup(ctx, s.pool, p, dst[:len(dst)-1], false); err != nil {
		return err
	} else if o != nil {
		return errcode.New(CodeExists, "a file has the destination folder's name").WithDetails("path", o.Path)
	}
	var clash string
	err := s.pool.QueryRow(ctx, `SELECT d.path FROM storage_objects s JOIN storage_objects d
			ON d.project_id = s.project_id AND d.path = $3 || substr(s.path, char_length($2::text) + 1)
		WHERE s.project_id = $1 AND s.path >= $2 AND s.path < $4 LIMIT 1`, p.ID, src, dst, src[:len(src)-1]+"0").Scan(&clash)
	if err == nil {
		return errcode.New(CodeExists, "an object exists where the folder's contents would go").WithDetails("path", clash)
	}
	if err != pgx.ErrNoRows {
		return fmt.Errorf("storage: checking %q: %w", dst, err)
	}
	return nil
}

// fileFree refuses a new file's path that a file or a folder takes.
func (s *Service) fileFree(ctx context.Context, p Project, path string) error {
	if o, err := lookup(ctx, s.pool, p, path, false); err != nil {
		return err
	} else if o != nil {
		return errcode.New(CodeExists, "a file exists at this path").WithDetails("path", path)
	}
	return s.notFolder(ctx, p, path)
}

// notFolder refuses a file path that names a folder.
func (s *Service) notFolder(ctx context.Context, p Project, path string) error {
	if has, err := s.folderHas(ctx, p, path+"/"); err != nil {
		return err
	} else if has {
		return errcode.New(CodeExists, "a folder has this name").WithDetails("path", path+"/")
	}
	return nil
}

// moveBatch moves objs from under src to under dst (for a file, src and
// dst are the paths). It returns the paths it left because another
// operation holds them.
func (s *Service) moveBatch(ctx context.Context, d sdkstorage.Driver, p Project, op uuid.UUID, objs []*Object, src, dst string, res *Result) ([]string, error) {
	dest := func(path string) string { return dst + path[len(src):] }
	var paths []string
	for _, o := range objs {
		paths = append(paths, o.Path, dest(o.Path))
	}
	held, unlock, err := s.lock(ctx, p, "rename", paths)
	if err != nil {
		return nil, err
	}
	defer unlock()
	var skipped, mine, dsts []string
	for _, o := range objs {
		if held[o.Path] && held[dest(o.Path)] {
			mine, dsts = append(mine, o.Path), append(dsts, dest(o.Path))
		} else {
			skipped = append(skipped, o.Path)
		}
	}
	// Under the locks nothing changes these paths: read them as they are
	// now, and make sure no file arrived at a destination since the check.
	if taken, err := s.current(ctx, p, dsts); err != nil {
		return nil, err
	} else if len(taken) > 0 {
		return nil, errcode.New(CodeExists, "a file arrived at the destination").WithDetails("path", taken[0].Path)
	}
	if objs, err = s.current(ctx, p, mine); err != nil {
		return nil, err
	}
	var done []copied
	for _, o := range objs {
		info, err := d.Copy(ctx, &sdkstorage.CopyRequest{OperationID: fmt.Sprintf("rename-%s-%s", op, o.ID),
			SourceKey: objectKey(p, o.Path), DestKey: objectKey(p, dest(o.Path))})
		if err != nil {
			err = driverError(ctx, err, "copy the object")
			if errcode.Of(err) == CodeNotFound {
				s.log.Warn("an object of the metadata is missing from the bucket", "project_id", p.ID, "path", o.Path)
			}
			s.dropCopies(ctx, d, p, op, done, dest)
			return nil, err
		}
		done = append(done, copied{o, info})
	}
	if len(done) == 0 {
		return skipped, nil
	}
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), finishTimeout)
	defer cancel()
	var moved []copied
	err = store.Transact(fctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		moved = moved[:0]
		for _, c := range done {
			tag, err := tx.Exec(fctx, `UPDATE storage_objects SET path = $3, etag = $4, updated_at = $5
				WHERE project_id = $1 AND path = $2 AND id = $6`, p.ID, c.o.Path, dest(c.o.Path), c.info.ETag, s.now(), c.o.ID)
			if err != nil {
				return fmt.Errorf("storage: moving %q: %w", c.o.Path, err)
			}
			if tag.RowsAffected() == 1 {
				moved = append(moved, c)
			}
		}
		return nil
	})
	if err != nil {
		s.dropCopies(ctx, d, p, op, done, dest)
		return nil, err
	}
	for _, c := range moved {
		if err := d.Delete(fctx, &sdkstorage.DeleteRequest{OperationID: fmt.Sprintf("rename-src-%s-%s", op, c.o.ID), Key: objectKey(p, c.o.Path)}); err != nil {
			s.log.Error("deleting a renamed object's old copy; it stays in the bucket unaccounted", "project_id", p.ID, "path", c.o.Path, "error", err)
		}
		res.Objects++
		res.Bytes += c.o.Size
		if len(objs) == 1 && !strings.HasSuffix(src, "/") {
			o := *c.o
			o.Path, o.ETag, o.UpdatedAt = dest(c.o.Path), c.info.ETag, s.now()
			res.Object = &o
		}
	}
	return skipped, nil
}

// current reads the objects at paths (those that exist), in path order.
func (s *Service) current(ctx context.Context, p Project, paths []string) ([]*Object, error) {
	if len(paths) == 0 {
		return nil, nil
	}
	rows, err := s.pool.Query(ctx, `SELECT `+objectColumns+` FROM storage_objects WHERE project_id = $1 AND path = ANY($2) ORDER BY path`, p.ID, paths)
	if err != nil {
		return nil, fmt.Errorf("storage: reading objects: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (*Object, error) { return scanObject(r) })
}

// copied is an object of a move and its copy at the destination.
type copied struct {
	o    *Object
	info *sdkstorage.ObjectInfo
}

// dropCopies deletes the copies of a move that will not happen.
func (s *Service) dropCopies(ctx context.Context, d sdkstorage.Driver, p Project, op uuid.UUID, done []copied, dest func(string) string) {
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), finishTimeout)
	defer cancel()
	for _, c := range done {
		if err := d.Delete(fctx, &sdkstorage.DeleteRequest{OperationID: fmt.Sprintf("rename-undo-%s-%s", op, c.o.ID), Key: objectKey(p, dest(c.o.Path))}); err != nil {
			s.log.Error("deleting the copy of a failed rename", "project_id", p.ID, "path", dest(c.o.Path), "error", err)
		}
	}
}

// Delete removes a file, or a folder (a path ending in '/'): an empty one
// (only its marker) at once, one with contents only when recursive is
// set (else 409 storage_folder_not_empty). Objects go from the bucket first,
// then from the metadata, so a delete cut short is finished by running it
// again. Objects another operation holds stay, and the delete answers 409
// storage_path_busy after removing the rest.
func (s *Service) Delete(ctx context.Context, p Project, path string, recursive bool) (*Result, error) {
	clean, err := CleanPath(path, FileOrFolder)
	if err != nil {
		return nil, err
	}
	folder := strings.HasSuffix(clean, "/")
	d, err := s.driver(ctx)
	if err != nil {
		return nil, err
	}
	var objs []*Object
	if !folder {
		o, err := lookup(ctx, s.pool, p, clean, false)
		if err != nil {
			return nil, err
		}
		if o == nil {
			return nil, errcode.New(CodeNotFound, "no file at this path").WithDetails("path", clean)
		}
		objs = []*Object{o}
	} else {
		first, err := s.under(ctx, p, clean, "")
		if err != nil {
			return nil, err
		}
		switch {
		case len(first) == 0:
			return nil, errcode.New(CodeNotFound, "no folder at this path").WithDetails("path", clean)
		case !recursive && (len(first) > 1 || first[0].Path != clean):
			return nil, errcode.New(CodeFolderNotEmpty, "the folder is not empty; pass recursive=true to delete it with its contents").WithDetails("path", clean)
		}
	}
	op := uuid.Must(uuid.NewV7())
	res := &Result{}
	var busy []string
	for after := ""; ; {
		if folder {
			if objs, err = s.under(ctx, p, clean, after); err != nil || len(objs) == 0 {
				break
			}
			after = objs[len(objs)-1].Path
		}
		var skipped []string
		if skipped, err = s.deleteBatch(ctx, d, p, op, objs, res); err != nil {
			break
		}
		busy = append(busy, skipped...)
		if !folder {
			break
		}
	}
	switch {
	case err == nil && len(busy) > 0:
		err = errcode.New(CodePathBusy, "%d objects are held by other operations and stayed; delete again when they are done", len(busy)).
			WithDetails("paths", busy[:min(len(busy), 20)]).WithDetails("deleted_objects", res.Objects)
	case err == nil && !folder && res.Objects == 0:
		err = errcode.New(CodeNotFound, "no file at this path").WithDetails("path", clean) // deleted meanwhile
	}
	action, tgt := "storage.folder.delete", s.projectTarget(p)
	if !folder {
		action, tgt = "storage.object.delete", s.objectTarget(p, objs[0].ID)
	}
	s.metrics.operation("delete", err)
	return res, s.audit(ctx, err, res.Objects > 0, audit.Entry{Action: action, Target: tgt,
		Details: map[string]any{"path": clean, "recursive": recursive, "objects": res.Objects, "bytes": res.Bytes}})
}

// deleteBatch deletes objs from the bucket and the metadata; it returns
// the paths it left because another operation holds them.
func (s *Service) deleteBatch(ctx context.Context, d sdkstorage.Driver, p Project, op uuid.UUID, objs []*Object, res *Result) ([]string, error) {
	var paths []string
	for _, o := range objs {
		paths = append(paths, o.Path)
	}
	held, unlock, err := s.lock(ctx, p, "delete", paths)
	if err != nil {
		return nil, err
	}
	defer unlock()
	var skipped, mine []string
	for _, o := range objs {
		if held[o.Path] {
			mine = append(mine, o.Path)
		} else {
			skipped = append(skipped, o.Path)
		}
	}
	// Under the locks nothing changes these paths: read them as they are now.
	if objs, err = s.current(ctx, p, mine); err != nil {
		return nil, err
	}
	var gone []*Object
	var failed error
	for _, o := range objs {
		if err := d.Delete(ctx, &sdkstorage.DeleteRequest{OperationID: fmt.Sprintf("delete-%s-%s", op, o.ID), Key: objectKey(p, o.Path)}); err != nil {
			failed = driverError(ctx, err, "delete the object")
			break
		}
		gone = append(gone, o)
	}
	if len(gone) > 0 {
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), finishTimeout)
		defer cancel()
		err := store.Transact(fctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
			var bytes, n int64
			for _, o := range gone {
				var size int64
				err := tx.QueryRow(fctx, `DELETE FROM storage_objects WHERE project_id = $1 AND path = $2 AND id = $3 RETURNING size`,
					p.ID, o.Path, o.ID).Scan(&size)
				if err == pgx.ErrNoRows {
					continue
				}
				if err != nil {
					return fmt.Errorf("storage: deleting %q: %w", o.Path, err)
				}
				bytes, n = bytes+size, n+1
			}
			return s.move(fctx, tx, p, -bytes, -n, 0)
		})
		if err != nil {
			return nil, err
		}
		for _, o := range gone {
			res.Objects++
			res.Bytes += o.Size
		}
	}
	return skipped, failed
}
