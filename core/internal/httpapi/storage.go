package httpapi

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/google/uuid"

	"github.com/gpuaas/gpuaas/core/internal/authz"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/httpapi/apigen"
	"github.com/gpuaas/gpuaas/core/internal/storage"
	sdkstorage "github.com/gpuaas/gpuaas/sdk/storage"
)

// StorageUploadPath is the route whose request body streams to the store
// (see Options.StreamBody).
const StorageUploadPath = "/api/v1/storage/upload"

// storageProject decides action on the project and names its storage.
func (a *API) storageProject(c *fiber.Ctx, projectID uuid.UUID, action authz.Action) (storage.Project, error) {
	rel, err := a.allowInProject(c, projectID, action)
	if err != nil {
		return storage.Project{}, err
	}
	if a.Storage == nil {
		return storage.Project{}, errcode.New(storage.CodeUnavailable, "project storage is not configured")
	}
	return storage.Project{OrgID: rel.OrgID, ID: projectID}, nil
}

func storageObjectJSON(o *storage.Object) apigen.StorageObject {
	return apigen.StorageObject{Id: o.ID, Path: o.Path, Folder: o.Folder(), Size: o.Size, Etag: o.ETag, ContentType: o.ContentType,
		CreatedBy: o.CreatedBy, CreatedAt: o.CreatedAt.UTC(), UpdatedAt: o.UpdatedAt.UTC()}
}

func storageEntryJSON(e storage.Entry) apigen.StorageEntry {
	name := strings.TrimSuffix(e.Path, "/")
	name = name[strings.LastIndexByte(name, '/')+1:]
	if e.Folder {
		name += "/"
	}
	out := apigen.StorageEntry{Path: e.Path, Name: name, Folder: e.Folder}
	if e.Object != nil {
		o := storageObjectJSON(e.Object)
		out.Object = &o
	}
	return out
}

func storageChangeJSON(r *storage.Result) apigen.StorageChange {
	out := apigen.StorageChange{Objects: r.Objects, Bytes: r.Bytes}
	if r.Object != nil {
		o := storageObjectJSON(r.Object)
		out.Object = &o
	}
	return out
}

// ListStorage lists a folder of a project's storage.
func (a *API) ListStorage(c *fiber.Ctx, params apigen.ListStorageParams) error {
	p, err := a.storageProject(c, params.ProjectId, authz.ResourceRead)
	if err != nil {
		return err
	}
	limit, err := Limit(params.Limit)
	if err != nil {
		return err
	}
	var after string
	if _, err := DecodeCursor(params.Cursor, &after); err != nil {
		return err
	}
	prefix, err := storage.CleanPath(deref(params.Prefix), storage.Prefix)
	if err != nil {
		return err
	}
	entries, err := a.Storage.List(c.UserContext(), p, storage.ListRequest{Prefix: prefix, After: after,
		Recursive: params.Recursive != nil && *params.Recursive, Limit: limit})
	if err != nil {
		return err
	}
	items, next := Page(entries, limit, func(e storage.Entry) any { return e.Path }, storageEntryJSON)
	return c.JSON(apigen.StoragePage{Prefix: prefix, Items: items, NextCursor: next})
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

// GetStorageUsage reports what a project stores against its quota.
func (a *API) GetStorageUsage(c *fiber.Ctx, params apigen.GetStorageUsageParams) error {
	p, err := a.storageProject(c, params.ProjectId, authz.ResourceRead)
	if err != nil {
		return err
	}
	u, err := a.Storage.Usage(c.UserContext(), p)
	if err != nil {
		return err
	}
	return c.JSON(apigen.StorageUsage{ProjectId: p.ID, BytesUsed: u.BytesUsed, Objects: u.Objects, BytesReserved: u.BytesReserved, QuotaBytes: u.QuotaBytes})
}

// DownloadStorageObject streams a file, or one byte range of it.
func (a *API) DownloadStorageObject(c *fiber.Ctx, params apigen.DownloadStorageObjectParams) error {
	p, err := a.storageProject(c, params.ProjectId, authz.ResourceRead)
	if err != nil {
		return err
	}
	o, err := a.Storage.Stat(c.UserContext(), p, params.Path)
	if err != nil {
		return err
	}
	rng, err := byteRange(deref(params.Range), deref(params.IfRange), o)
	if err != nil {
		c.Set(fiber.HeaderContentRange, fmt.Sprintf("bytes */%d", o.Size))
		return err
	}
	// fasthttp writes the body after the handler returns: the read lives on
	// a context of its own, ended when the body is closed.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(c.UserContext()), a.Storage.TransferTimeout())
	obj, err := a.Storage.Open(ctx, p, o, rng)
	if err != nil {
		cancel()
		return err
	}
	size, n := obj.Info.Size, obj.Info.Size
	if rng != nil {
		n = rng.Clip(size)
		c.Status(fiber.StatusPartialContent)
		c.Set(fiber.HeaderContentRange, fmt.Sprintf("bytes %d-%d/%d", rng.Offset, rng.Offset+n-1, size))
	}
	contentType := o.ContentType
	if contentType == "" {
		contentType = fiber.MIMEOctetStream
	}
	// User content never renders in the API's origin.
	c.Set(fiber.HeaderContentType, contentType)
	c.Set(fiber.HeaderXContentTypeOptions, "nosniff")
	c.Set(fiber.HeaderContentDisposition, "attachment; filename*=UTF-8''"+url.PathEscape(o.Path[strings.LastIndexByte(o.Path, '/')+1:]))
	c.Set(fiber.HeaderETag, `"`+o.ETag+`"`)
	c.Set(fiber.HeaderLastModified, o.UpdatedAt.UTC().Format(http.TimeFormat))
	c.Set(fiber.HeaderAcceptRanges, "bytes")
	c.Set(fiber.HeaderCacheControl, "private, no-cache")
	c.Context().SetBodyStream(&transferBody{idleDeadline: idleDeadline{conn: c.Context().Conn(), idle: c.App().Config().WriteTimeout},
		body: obj.Body, cancel: cancel}, int(n))
	return nil
}

// byteRange reads a Range header (RFC 9110 §14) against o: nil for the
// whole object (no Range, several ranges, one this server cannot parse, or
// an If-Range o no longer matches), else the one range; a range that
// starts past the end is 416.
func byteRange(header, ifRange string, o *storage.Object) (*sdkstorage.Range, error) {
	unit, spec, ok := strings.Cut(strings.TrimSpace(header), "=")
	if !ok || !strings.EqualFold(strings.TrimSpace(unit), "bytes") || strings.Contains(spec, ",") {
		return nil, nil
	}
	if ifRange = strings.TrimSpace(ifRange); ifRange != "" {
		if strings.HasPrefix(ifRange, `"`) || strings.HasPrefix(ifRange, "W/") {
			if ifRange != `"`+o.ETag+`"` {
				return nil, nil
			}
		} else if t, err := http.ParseTime(ifRange); err != nil || o.UpdatedAt.Truncate(time.Second).After(t) {
			return nil, nil
		}
	}
	first, last, ok := strings.Cut(strings.TrimSpace(spec), "-")
	if !ok {
		return nil, nil
	}
	unsatisfiable := errcode.New(storage.CodeRangeNotSatisfied, "the range lies outside the file's %d bytes", o.Size).WithDetails("size", o.Size)
	number := func(s string) (int64, bool) {
		n, err := strconv.ParseInt(s, 10, 64)
		return n, err == nil && n >= 0 && s != "" && s[0] != '+'
	}
	if first == "" { // the last n bytes
		n, ok := number(last)
		switch {
		case !ok:
			return nil, nil
		case n == 0 || o.Size == 0:
			return nil, unsatisfiable
		}
		n = min(n, o.Size)
		return &sdkstorage.Range{Offset: o.Size - n, Length: n}, nil
	}
	start, ok := number(first)
	if !ok {
		return nil, nil
	}
	r := &sdkstorage.Range{Offset: start, Length: sdkstorage.ToEnd}
	if last != "" {
		end, ok := number(last)
		if !ok || end < start {
			return nil, nil
		}
		r.Length = end - start + 1
	}
	if start >= o.Size {
		return nil, unsatisfiable
	}
	return r, nil
}

// idleDeadline pushes a connection's deadline out by idle whenever a
// transfer moves, so a transfer ends when it stalls rather than when it is
// long.
type idleDeadline struct {
	conn  net.Conn
	idle  time.Duration
	moved time.Time
}

// progress pushes the deadline out with set (the conn's read or write
// deadline), at most every idle/8.
func (d *idleDeadline) progress(set func(net.Conn, time.Time) error) {
	if d.conn == nil || d.idle <= 0 {
		return
	}
	if now := time.Now(); now.Sub(d.moved) > d.idle/8 {
		d.moved = now
		_ = set(d.conn, now.Add(d.idle))
	}
}

func setRead(c net.Conn, t time.Time) error  { return c.SetReadDeadline(t) }
func setWrite(c net.Conn, t time.Time) error { return c.SetWriteDeadline(t) }

// transferBody is a download's body as fasthttp writes it: every chunk
// moves the write deadline, and closing it ends the read.
type transferBody struct {
	idleDeadline
	body   io.ReadCloser
	cancel context.CancelFunc
}

var (
	_ io.ReadCloser = (*transferBody)(nil)
	_ io.WriterTo   = (*transferBody)(nil)
)

func (t *transferBody) Read(p []byte) (int, error) {
	n, err := t.body.Read(p)
	if n > 0 {
		t.progress(setWrite)
	}
	return n, err
}

// WriteTo hands the driver's chunks to w as they come: without another
// copy when the body can write itself, else through a large buffer (a
// write per 32 KiB would cost a syscall each).
func (t *transferBody) WriteTo(w io.Writer) (int64, error) {
	dw := deadlineWriter{w: w, t: t}
	if wt, ok := t.body.(io.WriterTo); ok {
		return wt.WriteTo(dw)
	}
	return io.CopyBuffer(struct{ io.Writer }{dw}, struct{ io.Reader }{t.body}, make([]byte, 256<<10))
}

func (t *transferBody) Close() error {
	err := t.body.Close()
	t.cancel()
	return err
}

type deadlineWriter struct {
	w io.Writer
	t *transferBody
}

// Write writes p a piece at a time, each piece with the deadline moved:
// a slow reader still gets idle per piece, not per chunk.
func (d deadlineWriter) Write(p []byte) (int, error) {
	const piece = 64 << 10
	n := 0
	for n < len(p) {
		d.t.progress(setWrite)
		m, err := d.w.Write(p[n:min(len(p), n+piece)])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// ReadFrom lets a body that can write itself without a copy (a relayed
// download splices socket to socket) reach the connection's ReadFrom; the
// deadline moves once per call, so such a body calls it a chunk at a time.
func (d deadlineWriter) ReadFrom(r io.Reader) (int64, error) {
	d.t.progress(setWrite)
	if rf, ok := d.w.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.CopyBuffer(struct{ io.Writer }{d}, struct{ io.Reader }{r}, make([]byte, 256<<10))
}

// idleReader is an upload's request body: every read that brings bytes
// moves the read deadline.
type idleReader struct {
	idleDeadline
	r io.Reader
}

func (u *idleReader) Read(p []byte) (int, error) {
	n, err := u.r.Read(p)
	if n > 0 {
		u.progress(setRead)
	}
	return n, err
}

// UploadStorageObject stores the request body as a file, streamed.
func (a *API) UploadStorageObject(c *fiber.Ctx, params apigen.UploadStorageObjectParams) error {
	p, err := a.storageProject(c, params.ProjectId, authz.ResourceWrite)
	if err != nil {
		return err
	}
	size := int64(c.Request().Header.ContentLength())
	if size < -1 {
		size = 0 // no body
	}
	body := &idleReader{idleDeadline: idleDeadline{conn: c.Context().Conn(), idle: c.App().Config().ReadTimeout}, r: StreamedBody(c)}
	o, err := a.Storage.Upload(c.UserContext(), p, storage.UploadRequest{Path: params.Path, Size: size,
		ContentType: c.Get(fiber.HeaderContentType), Body: body})
	if err != nil {
		return err
	}
	return c.Status(fiber.StatusCreated).JSON(storageObjectJSON(o))
}

// MkdirStorage makes a folder.
func (a *API) MkdirStorage(c *fiber.Ctx, _ apigen.MkdirStorageParams) error {
	var req apigen.StoragePathRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	p, err := a.storageProject(c, req.ProjectId, authz.ResourceWrite)
	if err != nil {
		return err
	}
	o, err := a.Storage.Mkdir(c.UserContext(), p, req.Path)
	if err != nil {
		return err
	}
	return c.Status(fiber.StatusCreated).JSON(storageObjectJSON(o))
}

// RenameStorage renames a file or a folder.
func (a *API) RenameStorage(c *fiber.Ctx, _ apigen.RenameStorageParams) error {
	var req apigen.StorageRenameRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	p, err := a.storageProject(c, req.ProjectId, authz.ResourceWrite)
	if err != nil {
		return err
	}
	res, err := a.Storage.Rename(c.UserContext(), p, req.From, req.To)
	if err != nil {
		return err
	}
	return c.JSON(storageChangeJSON(res))
}

// DeleteStorage deletes a file or a folder.
func (a *API) DeleteStorage(c *fiber.Ctx, params apigen.DeleteStorageParams) error {
	p, err := a.storageProject(c, params.ProjectId, authz.ResourceWrite)
	if err != nil {
		return err
	}
	res, err := a.Storage.Delete(c.UserContext(), p, params.Path, params.Recursive != nil && *params.Recursive)
	if err != nil {
		return err
	}
	return c.JSON(storageChangeJSON(res))
}

// PresignStorageDownload hands out a URL that reads a file from the store.
func (a *API) PresignStorageDownload(c *fiber.Ctx) error {
	var req apigen.StoragePathRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	p, err := a.storageProject(c, req.ProjectId, authz.ResourceRead)
	if err != nil {
		return err
	}
	_, u, err := a.Storage.PresignDownload(c.UserContext(), p, req.Path)
	if err != nil {
		return err
	}
	return c.JSON(apigen.PresignedURL{Url: u.URL, Method: u.Method, Headers: headersOrEmpty(u.Header), ExpiresAt: u.ExpiresAt.UTC()})
}

func headersOrEmpty(h map[string]string) map[string]string {
	if h == nil {
		return map[string]string{}
	}
	return h
}

// PresignStorageUpload starts a presigned upload.
func (a *API) PresignStorageUpload(c *fiber.Ctx, _ apigen.PresignStorageUploadParams) error {
	var req apigen.StoragePresignUploadRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	p, err := a.storageProject(c, req.ProjectId, authz.ResourceWrite)
	if err != nil {
		return err
	}
	up, err := a.Storage.PresignUpload(c.UserContext(), p, req.Path, req.Size, deref(req.ContentType))
	if err != nil {
		return err
	}
	return c.Status(fiber.StatusCreated).JSON(apigen.PresignedUpload{UploadId: up.ID, Path: up.Path, Size: up.Size, Url: up.URL.URL,
		Method: up.URL.Method, Headers: headersOrEmpty(up.URL.Header), ExpiresAt: up.URL.ExpiresAt.UTC(), ConfirmBy: up.ExpiresAt.UTC()})
}

// CompleteStorageUpload confirms a presigned upload. An upload of a project
// the caller may not see answers 404 like one that does not exist.
func (a *API) CompleteStorageUpload(c *fiber.Ctx, uploadID uuid.UUID, _ apigen.CompleteStorageUploadParams) error {
	pr, err := caller(c)
	if err != nil {
		return err
	}
	if a.Storage == nil {
		return errcode.New(storage.CodeUnavailable, "project storage is not configured")
	}
	up, err := a.Storage.Pending(c.UserContext(), uploadID)
	if err != nil {
		return err
	}
	rel, err := a.Authz.Project(c.UserContext(), pr, up.Project.ID)
	if err == nil {
		err = authz.Decide(pr, authz.ResourceWrite, rel)
	}
	switch errcode.Of(err) {
	case errcode.NotFound:
		return errcode.New(storage.CodeUploadNotFound, "no presigned upload %s waits for confirmation", uploadID)
	case errcode.Forbidden:
		return a.denied(c, err, authz.ResourceWrite, a.Identity.IDs().InProject(up.Project.OrgID.String(), up.Project.ID.String(), "storage_upload", uploadID.String()))
	}
	if err != nil {
		return err
	}
	o, err := a.Storage.CompleteUpload(c.UserContext(), up)
	if err != nil {
		return err
	}
	return c.Status(fiber.StatusCreated).JSON(storageObjectJSON(o))
}
