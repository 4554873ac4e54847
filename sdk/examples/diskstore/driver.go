// Package diskstore is an example storage driver that keeps objects in a
// folder on local disk. It exists for the conformance kit's own tests, the
// benchmarks and the plugin author guide; it is not registered anywhere by
// default.
//
// Layout under the configured root:
//
//	objects/<sha256(key)>  the content, then its JSON description and the
//	                       description's length (8 bytes, big endian)
//	ops/<sha256(op id)>    the recorded result of a mutating call
//	tmp/                   uploads in progress
//
// Writes go to tmp/ and are renamed into place, so a failed Put leaves no
// object behind and readers never see half an object.
package diskstore

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/storage"
)

// Version is the driver's release version.
const Version = "0.1.0"

// Driver is the diskstore storage driver.
type Driver struct {
	logger hclog.Logger
	now    func() time.Time

	mu       sync.Mutex
	root     string
	limit    int
	maxBytes int64
	inflight map[string]chan struct{} // operation id -> closed when done
}

var _ storage.Driver = (*Driver)(nil)

// Option configures a Driver.
type Option func(*Driver)

// WithClock sets the clock that stamps modification times.
func WithClock(now func() time.Time) Option { return func(d *Driver) { d.now = now } }

// New returns an unconfigured driver.
func New(logger hclog.Logger, opts ...Option) *Driver {
	d := &Driver{logger: logger, now: time.Now, inflight: map[string]chan struct{}{}}
	for _, o := range opts {
		o(d)
	}
	return d
}

// Info implements base.BasePlugin.
func (d *Driver) Info(context.Context) (*base.Info, error) {
	return &base.Info{
		Name:          "diskstore",
		Kind:          base.KindStorage,
		DriverVersion: Version,
		APIVersions:   storage.SupportedAPIVersions(),
	}, nil
}

// ConfigSchema implements base.BasePlugin.
func (d *Driver) ConfigSchema(context.Context) (*base.ConfigSchema, error) {
	return &base.ConfigSchema{Fields: []base.Field{
		{Name: "root", Type: base.TypeString, Required: true, Description: "Folder that holds the objects; created if missing."},
		{Name: "list_limit", Type: base.TypeInt, Default: 1000, Description: "Objects per List page when the caller sets no limit."},
		{Name: "max_object_bytes", Type: base.TypeInt, Default: 0, Description: "Largest object accepted; 0 means no limit."},
	}}, nil
}

// Configure implements base.BasePlugin.
func (d *Driver) Configure(_ context.Context, cfg *base.Config) error {
	root := cfg.String("root")
	if !filepath.IsAbs(root) {
		return &base.ConfigError{Field: "root", Reason: fmt.Sprintf("not an absolute path: %q", root)}
	}
	if cfg.Int("list_limit") <= 0 {
		return &base.ConfigError{Field: "list_limit", Reason: "must be positive"}
	}
	if cfg.Int("max_object_bytes") < 0 {
		return &base.ConfigError{Field: "max_object_bytes", Reason: "must not be negative"}
	}
	for _, dir := range []string{"objects", "ops", "tmp"} {
		if err := os.MkdirAll(filepath.Join(root, dir), 0o700); err != nil {
			return &base.ConfigError{Field: "root", Reason: err.Error()}
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.root = root
	d.limit = int(cfg.Int("list_limit"))
	d.maxBytes = cfg.Int("max_object_bytes")
	d.logger.Info("configured", "root", root, "instance", cfg.Instance, "api_version", cfg.APIVersion)
	return nil
}

func (d *Driver) settings() (root string, limit int, maxBytes int64, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.root == "" {
		return "", 0, 0, fmt.Errorf("diskstore: not configured: %w", base.ErrFailedPrecondition)
	}
	return d.root, d.limit, d.maxBytes, nil
}

func digest(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

// header is the first line of an object file.
type header struct {
	Key         string            `json:"key"`
	Size        int64             `json:"size"`
	ContentType string            `json:"content_type,omitempty"`
	ETag        string            `json:"etag"`
	ModTime     time.Time         `json:"mod_time"`
	Metadata    map[string]string `json:"metadata,omitempty"`
}

func (h *header) info() *storage.ObjectInfo {
	return &storage.ObjectInfo{Key: h.Key, Size: h.Size, ContentType: h.ContentType, ETag: h.ETag, ModTime: h.ModTime, Metadata: h.Metadata}
}

// opRecord is the remembered result of a mutating call.
type opRecord struct {
	Fingerprint string              `json:"fingerprint"`
	Info        *storage.ObjectInfo `json:"info,omitempty"`
}

// begin claims operation id for the caller. If the operation already
// finished, it returns its record; if another call runs it, begin waits.
// The caller calls the returned done func when it has finished.
func (d *Driver) begin(ctx context.Context, root, id, fingerprint string) (*opRecord, func(), error) {
	for {
		d.mu.Lock()
		wait, busy := d.inflight[id]
		if !busy {
			rec, err := readOp(root, id)
			if err != nil {
				d.mu.Unlock()
				return nil, nil, err
			}
			if rec != nil {
				d.mu.Unlock()
				if rec.Fingerprint != fingerprint {
					return nil, nil, fmt.Errorf("diskstore: operation %q was used for another request: %w", id, base.ErrConflict)
				}
				return rec, func() {}, nil
			}
			ch := make(chan struct{})
			d.inflight[id] = ch
			d.mu.Unlock()
			return nil, func() {
				d.mu.Lock()
				delete(d.inflight, id)
				d.mu.Unlock()
				close(ch)
			}, nil
		}
		d.mu.Unlock()
		select {
		case <-wait:
		case <-ctx.Done():
			return nil, nil, fmt.Errorf("diskstore: waiting for operation %q: %w", id, ctx.Err())
		}
	}
}

func readOp(root, id string) (*opRecord, error) {
	b, err := os.ReadFile(filepath.Join(root, "ops", digest(id)))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("diskstore: operation record: %w", err)
	}
	var rec opRecord
	if err := json.Unmarshal(b, &rec); err != nil {
		return nil, fmt.Errorf("diskstore: operation record %q: %v: %w", id, err, base.ErrInternal)
	}
	return &rec, nil
}

func writeOp(root, id string, rec *opRecord) error {
	b, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("diskstore: operation record: %w", err)
	}
	return writeAtomic(root, filepath.Join(root, "ops", digest(id)), func(w io.Writer) error {
		_, err := w.Write(b)
		return err
	})
}

// writeAtomic writes a file through tmp/ and renames it into place.
func writeAtomic(root, path string, fill func(io.Writer) error) error {
	f, err := os.CreateTemp(filepath.Join(root, "tmp"), "w-*")
	if err != nil {
		return fmt.Errorf("diskstore: %w", err)
	}
	tmp := f.Name()
	defer func() { _ = os.Remove(tmp) }()
	if err := fill(f); err != nil {
		_ = f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("diskstore: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("diskstore: %w", err)
	}
	return nil
}

var (
	_ io.Reader     = ctxReader{}
	_ io.Writer     = (*countingHash)(nil)
	_ io.ReadCloser = objectBody{}
)

// ctxReader fails with the context's error once ctx is done.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

// countingHash hashes and counts what is written through it.
type countingHash struct {
	h hash.Hash
	n int64
}

func (c *countingHash) Write(p []byte) (int, error) {
	c.n += int64(len(p))
	return c.h.Write(p)
}

// Put implements storage.Driver.
func (d *Driver) Put(ctx context.Context, req *storage.PutRequest, body io.Reader) (*storage.ObjectInfo, error) {
	root, _, maxBytes, err := d.settings()
	if err != nil {
		return nil, err
	}
	fp := "put\x00" + req.Key + "\x00" + req.ContentType
	rec, done, err := d.begin(ctx, root, req.OperationID, fp)
	if err != nil {
		return nil, err
	}
	defer done()
	if rec != nil {
		return rec.Info, nil
	}
	if maxBytes > 0 && req.Size > maxBytes {
		return nil, fmt.Errorf("diskstore: put %q: %d bytes exceed the limit of %d: %w", req.Key, req.Size, maxBytes, base.ErrResourceExhausted)
	}

	sum := &countingHash{h: sha256.New()}
	var src io.Reader = ctxReader{ctx: ctx, r: body}
	if maxBytes > 0 {
		src = io.LimitReader(src, maxBytes+1)
	}
	h := &header{Key: req.Key, ContentType: req.ContentType, Metadata: req.Metadata}
	err = writeObject(root, h, io.TeeReader(src, sum), func() error {
		if maxBytes > 0 && sum.n > maxBytes {
			return fmt.Errorf("more than the limit of %d bytes: %w", maxBytes, base.ErrResourceExhausted)
		}
		h.Size = sum.n
		h.ETag = hex.EncodeToString(sum.h.Sum(nil))
		h.ModTime = d.now().UTC()
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("diskstore: put %q: %w", req.Key, err)
	}
	if err := writeOp(root, req.OperationID, &opRecord{Fingerprint: fp, Info: h.info()}); err != nil {
		return nil, err
	}
	return h.info(), nil
}

// writeObject writes content and then h, which finish completes once the
// content has been written, into the object file of h.Key.
func writeObject(root string, h *header, content io.Reader, finish func() error) error {
	return writeAtomic(root, filepath.Join(root, "objects", digest(h.Key)), func(w io.Writer) error {
		bw := bufio.NewWriterSize(w, 256<<10)
		if _, err := io.Copy(bw, content); err != nil {
			return err
		}
		if err := finish(); err != nil {
			return err
		}
		desc, err := json.Marshal(h)
		if err != nil {
			return err
		}
		var n [8]byte
		binary.BigEndian.PutUint64(n[:], uint64(len(desc)))
		if _, err := bw.Write(append(desc, n[:]...)); err != nil {
			return err
		}
		return bw.Flush()
	})
}

// open opens the object file of key and reads its description.
func open(root, key string) (*header, *os.File, error) {
	f, err := os.Open(filepath.Join(root, "objects", digest(key)))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, fmt.Errorf("diskstore: object %q: %w", key, base.ErrNotFound)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("diskstore: object %q: %w", key, err)
	}
	h, err := readHeader(f)
	if err != nil {
		_ = f.Close()
		return nil, nil, fmt.Errorf("diskstore: object %q: %w", key, err)
	}
	return h, f, nil
}

// readHeader reads the description at the end of an object file.
func readHeader(f *os.File) (*header, error) {
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	var n [8]byte
	if st.Size() < 8 {
		return nil, fmt.Errorf("%d bytes, too short: %w", st.Size(), base.ErrInternal)
	}
	if _, err := f.ReadAt(n[:], st.Size()-8); err != nil {
		return nil, err
	}
	descLen := int64(binary.BigEndian.Uint64(n[:]))
	if descLen > st.Size()-8 {
		return nil, fmt.Errorf("description of %d bytes in a file of %d: %w", descLen, st.Size(), base.ErrInternal)
	}
	desc := make([]byte, descLen)
	if _, err := f.ReadAt(desc, st.Size()-8-descLen); err != nil {
		return nil, err
	}
	var h header
	if err := json.Unmarshal(desc, &h); err != nil {
		return nil, fmt.Errorf("description: %v: %w", err, base.ErrInternal)
	}
	if h.Size != st.Size()-8-descLen {
		return nil, fmt.Errorf("description says %d bytes, file holds %d: %w", h.Size, st.Size()-8-descLen, base.ErrInternal)
	}
	return &h, nil
}

type objectBody struct {
	io.Reader
	f *os.File
}

func (b objectBody) Close() error { return b.f.Close() }

// Get implements storage.Driver.
func (d *Driver) Get(_ context.Context, key string) (*storage.Object, error) {
	root, _, _, err := d.settings()
	if err != nil {
		return nil, err
	}
	h, f, err := open(root, key)
	if err != nil {
		return nil, err
	}
	body := bufio.NewReaderSize(io.NewSectionReader(f, 0, h.Size), 256<<10)
	return &storage.Object{Info: *h.info(), Body: objectBody{Reader: body, f: f}}, nil
}

// Stat implements storage.Driver.
func (d *Driver) Stat(_ context.Context, key string) (*storage.ObjectInfo, error) {
	root, _, _, err := d.settings()
	if err != nil {
		return nil, err
	}
	h, f, err := open(root, key)
	if err != nil {
		return nil, err
	}
	_ = f.Close()
	return h.info(), nil
}

// Delete implements storage.Driver.
func (d *Driver) Delete(ctx context.Context, req *storage.DeleteRequest) error {
	root, _, _, err := d.settings()
	if err != nil {
		return err
	}
	fp := "delete\x00" + req.Key
	rec, done, err := d.begin(ctx, root, req.OperationID, fp)
	if err != nil {
		return err
	}
	defer done()
	if rec != nil {
		return nil
	}
	if err := os.Remove(filepath.Join(root, "objects", digest(req.Key))); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("diskstore: delete %q: %w", req.Key, err)
	}
	return writeOp(root, req.OperationID, &opRecord{Fingerprint: fp})
}

// Copy implements storage.Driver.
func (d *Driver) Copy(ctx context.Context, req *storage.CopyRequest) (*storage.ObjectInfo, error) {
	root, _, _, err := d.settings()
	if err != nil {
		return nil, err
	}
	fp := "copy\x00" + req.SourceKey + "\x00" + req.DestKey
	rec, done, err := d.begin(ctx, root, req.OperationID, fp)
	if err != nil {
		return nil, err
	}
	defer done()
	if rec != nil {
		return rec.Info, nil
	}
	src, f, err := open(root, req.SourceKey)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	h := *src
	h.Key = req.DestKey
	content := ctxReader{ctx: ctx, r: io.NewSectionReader(f, 0, src.Size)}
	if err := writeObject(root, &h, content, func() error {
		h.ModTime = d.now().UTC()
		return nil
	}); err != nil {
		return nil, fmt.Errorf("diskstore: copy %q to %q: %w", req.SourceKey, req.DestKey, err)
	}
	if err := writeOp(root, req.OperationID, &opRecord{Fingerprint: fp, Info: h.info()}); err != nil {
		return nil, err
	}
	return h.info(), nil
}

// List implements storage.Driver. Page tokens are the last key returned,
// base64url-encoded.
func (d *Driver) List(ctx context.Context, req *storage.ListRequest) (*storage.ListPage, error) {
	root, defLimit, _, err := d.settings()
	if err != nil {
		return nil, err
	}
	after := ""
	if req.PageToken != "" {
		b, err := base64.RawURLEncoding.DecodeString(req.PageToken)
		if err != nil {
			return nil, fmt.Errorf("diskstore: list: bad page token: %w", base.ErrInvalidArgument)
		}
		after = string(b)
	}
	limit := req.Limit
	if limit <= 0 {
		limit = defLimit
	}
	entries, err := os.ReadDir(filepath.Join(root, "objects"))
	if err != nil {
		return nil, fmt.Errorf("diskstore: list: %w", err)
	}
	var found []storage.ObjectInfo
	for _, e := range entries {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("diskstore: list: %w", err)
		}
		h, err := readHeaderFile(filepath.Join(root, "objects", e.Name()))
		if errors.Is(err, fs.ErrNotExist) {
			continue // deleted meanwhile
		}
		if err != nil {
			return nil, fmt.Errorf("diskstore: list: %s: %w", e.Name(), err)
		}
		if strings.HasPrefix(h.Key, req.Prefix) && h.Key > after {
			found = append(found, *h.info())
		}
	}
	sort.Slice(found, func(i, j int) bool { return found[i].Key < found[j].Key })
	page := &storage.ListPage{Objects: found}
	if len(found) > limit {
		page.Objects = found[:limit]
		page.NextPageToken = base64.RawURLEncoding.EncodeToString([]byte(found[limit-1].Key))
	}
	return page, nil
}

func readHeaderFile(path string) (*header, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	return readHeader(f)
}
