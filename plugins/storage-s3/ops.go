package s3store

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/storage"
)

// Operation records: the result of every Put, Copy and Delete, stored as a
// small JSON object named by the hash of its operation id, so that a retry
// returns the first result even after the plugin restarted.
const (
	opsPrefix = ReservedPrefix + "ops/"
	// metaMarker is the user metadata key that ties an object to the
	// operation that wrote it.
	metaMarker = "gpuaas-op"
	// recordTimeout bounds writing a record once the effect happened; it
	// runs even when the caller has gone.
	recordTimeout = 30 * time.Second
	// maxRecordSize bounds what readOp accepts.
	maxRecordSize = 64 << 10
)

// opRecord is the recorded result of one operation.
type opRecord struct {
	Version     int         `json:"v"`
	Fingerprint string      `json:"fingerprint"`
	Info        *recordInfo `json:"info,omitempty"`
}

// recordInfo is storage.ObjectInfo as recorded.
type recordInfo struct {
	Key         string            `json:"key"`
	Size        int64             `json:"size"`
	ContentType string            `json:"content_type,omitempty"`
	ETag        string            `json:"etag"`
	ModTime     time.Time         `json:"mod_time"`
	Metadata    map[string]string `json:"metadata,omitempty"`
}

func toRecord(i *storage.ObjectInfo) *recordInfo {
	if i == nil {
		return nil
	}
	return &recordInfo{Key: i.Key, Size: i.Size, ContentType: i.ContentType, ETag: i.ETag, ModTime: i.ModTime, Metadata: i.Metadata}
}

func (r *recordInfo) info() *storage.ObjectInfo {
	if r == nil {
		return nil
	}
	return &storage.ObjectInfo{Key: r.Key, Size: r.Size, ContentType: r.ContentType, ETag: r.ETag, ModTime: r.ModTime, Metadata: r.Metadata}
}

func sha256Hex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// fingerprint identifies the arguments of a call (not its body).
func fingerprint(args any) string {
	b, err := json.Marshal(args)
	if err != nil {
		panic(fmt.Sprintf("storage-s3: fingerprint of %T: %v", args, err)) // plain structs of strings and numbers
	}
	return sha256Hex(b)
}

// marker is the metaMarker value of the object an operation writes: it
// names the operation and its arguments.
func marker(opID, fp string) string { return sha256Hex([]byte(opID + "\x00" + fp)) }

func (s *settings) opKey(opID string) string {
	return s.prefix + opsPrefix + sha256Hex([]byte(opID))
}

// readOp returns the record of opID, or nil when there is none.
func (s *settings) readOp(ctx context.Context, opID string) (*opRecord, error) {
	key := s.opKey(opID)
	out, err := s.client.GetObject(ctx, &s3.GetObjectInput{Bucket: &s.bucket, Key: &key})
	if err != nil {
		if errors.Is(Classify(err), base.ErrNotFound) && ctx.Err() == nil {
			return nil, nil
		}
		return nil, wrapError(ctx, fmt.Sprintf("operation %q: reading its record", opID), err)
	}
	defer func() { _ = out.Body.Close() }()
	b, err := io.ReadAll(io.LimitReader(out.Body, maxRecordSize+1))
	if err != nil {
		return nil, wrapError(ctx, fmt.Sprintf("operation %q: reading its record", opID), err)
	}
	var rec opRecord
	if len(b) > maxRecordSize {
		return nil, fmt.Errorf("storage-s3: operation %q: record %q larger than %d bytes: %w", opID, key, maxRecordSize, base.ErrInternal)
	}
	if err := json.Unmarshal(b, &rec); err != nil {
		return nil, fmt.Errorf("storage-s3: operation %q: record %q: %v: %w", opID, key, err, base.ErrInternal)
	}
	return &rec, nil
}

// writeOp records the result of opID.
func (s *settings) writeOp(ctx context.Context, opID string, rec *opRecord) error {
	b, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("storage-s3: operation %q: encoding its record: %v: %w", opID, err, base.ErrInternal)
	}
	key := s.opKey(opID)
	_, err = s.client.PutObject(ctx, &s3.PutObjectInput{
		Bucket: &s.bucket, Key: &key, Body: bytes.NewReader(b),
		ContentLength: aws.Int64(int64(len(b))), ContentType: aws.String("application/json"),
	})
	if err != nil {
		return wrapError(ctx, fmt.Sprintf("operation %q: writing its record", opID), err)
	}
	return nil
}

// claim makes the caller the only one in this process running opID until
// it calls the returned func; a second caller waits.
func (d *Driver) claim(ctx context.Context, s *settings, opID string) (func(), error) {
	id := s.bucket + "\x00" + s.prefix + "\x00" + opID
	for {
		d.mu.Lock()
		wait, busy := d.inflight[id]
		if !busy {
			done := make(chan struct{})
			d.inflight[id] = done
			d.mu.Unlock()
			return func() {
				d.mu.Lock()
				delete(d.inflight, id)
				d.mu.Unlock()
				close(done)
			}, nil
		}
		d.mu.Unlock()
		select {
		case <-wait:
		case <-ctx.Done():
			return nil, fmt.Errorf("storage-s3: waiting for operation %q: %w", opID, ctx.Err())
		}
	}
}

// once runs a mutating call at most once per operation id. When opID has a
// record, once returns the recorded result, or base.ErrConflict when the
// record is of other arguments (fp). Otherwise find, when set, looks for
// the effect of an earlier attempt that ended before recording it; do runs
// when there is none. The result is recorded before once returns.
func (d *Driver) once(ctx context.Context, s *settings, call, opID, fp string,
	find func(context.Context) (*storage.ObjectInfo, error),
	do func(context.Context) (*storage.ObjectInfo, error),
) (*storage.ObjectInfo, error) {
	if opID == "" {
		return nil, fmt.Errorf("storage-s3: %s: operation id: empty: %w", call, base.ErrInvalidArgument)
	}
	release, err := d.claim(ctx, s, opID)
	if err != nil {
		return nil, err
	}
	defer release()
	rec, err := s.readOp(ctx, opID)
	if err != nil {
		return nil, err
	}
	if rec != nil {
		if rec.Fingerprint != fp {
			return nil, fmt.Errorf("storage-s3: %s: operation %q was used for another request: %w", call, opID, base.ErrConflict)
		}
		return rec.Info.info(), nil
	}
	var info *storage.ObjectInfo
	if find != nil {
		if info, err = find(ctx); err != nil {
			return nil, err
		}
	}
	if info == nil {
		if info, err = do(ctx); err != nil {
			return nil, err
		}
	} else {
		d.logger.Debug("operation already took effect; recording it", "call", call, "key", info.Key)
	}
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), recordTimeout)
	defer cancel()
	if err := s.writeOp(wctx, opID, &opRecord{Version: 1, Fingerprint: fp, Info: toRecord(info)}); err != nil {
		return nil, err
	}
	return info, nil
}

// findMarked returns the object at key when the operation marked m wrote
// it, else nil.
func (s *settings) findMarked(ctx context.Context, key, m string) (*storage.ObjectInfo, error) {
	info, err := s.stat(ctx, key)
	if errors.Is(err, base.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if info.marker != m {
		return nil, nil
	}
	return &info.ObjectInfo, nil
}
