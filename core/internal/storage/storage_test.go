package storage_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/gpuaas/gpuaas/core/internal/ledger"
	"github.com/gpuaas/gpuaas/core/internal/policy"
	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/storage"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
	s3store "github.com/gpuaas/gpuaas/plugins/storage-s3"
	"github.com/gpuaas/gpuaas/sdk/base"
	sdkstorage "github.com/gpuaas/gpuaas/sdk/storage"
)

// clock is a settable clock.
type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

// project makes an org with one project.
func project(t *testing.T, pool *pgxpool.Pool) storage.Project {
	t.Helper()
	p := storage.Project{OrgID: uuid.Must(uuid.NewV7()), ID: uuid.Must(uuid.NewV7())}
	sfx := p.OrgID.String()[24:]
	if _, err := pool.Exec(context.Background(), `INSERT INTO orgs (id, slug, name) VALUES ($1, $2, 'Org')`, p.OrgID, "o-"+sfx); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(context.Background(), `INSERT INTO projects (id, org_id, slug, name) VALUES ($1, $2, 'proj', 'P')`, p.ID, p.OrgID); err != nil {
		t.Fatal(err)
	}
	return p
}

func setPolicy(t *testing.T, pool *pgxpool.Pool, pol *policy.Service, scope policy.Scope, id, key string, value any) {
	t.Helper()
	raw, _ := json.Marshal(value)
	err := pgx.BeginFunc(context.Background(), pool, func(tx pgx.Tx) error {
		return pol.Set(context.Background(), tx, scope, id, key, raw, "test")
	})
	if err != nil {
		t.Fatal(err)
	}
	pol.Invalidate(key)
}

// debits are the org's storage debits, oldest first.
func debits(t *testing.T, pool *pgxpool.Pool, org uuid.UUID) []int64 {
	t.Helper()
	rows, err := pool.Query(context.Background(), `SELECT amount_minor FROM ledger_entries
		WHERE org_id = $1 AND entry_type = 'usage_debit' AND idempotency_key LIKE 'storage:%' ORDER BY id`, org)
	if err != nil {
		t.Fatal(err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Stored bytes are billed per GiB-month at the org's price, once per
// window however often the meter runs, with fractions of a minor unit
// carried to the next bill; with no price nothing is owed, not even later.
func TestMeter(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool, _ := testenv.MigratedPool(t)
	pol := policy.NewService(pool, hclog.NewNullLogger())
	c := &clock{t: time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)}
	svc := storage.NewService(pool, pol, nil, "local", "storage", hclog.NewNullLogger(), storage.WithClock(c.now))
	paid, free := project(t, pool), project(t, pool)
	for _, p := range []storage.Project{paid, free} {
		if _, err := pool.Exec(ctx, `INSERT INTO storage_usage (project_id, org_id, bytes_used, objects, accrued_at) VALUES ($1, $2, $3, 1, $4)`,
			p.ID, p.OrgID, int64(3<<30), c.t); err != nil {
			t.Fatal(err)
		}
	}
	// 7 minor units per GiB-month; 3 GiB stored: 21 per 30 days, 0.7 a day.
	setPolicy(t, pool, pol, policy.ScopeOrg, paid.OrgID.String(), policy.StoragePrice.Def().Key, 7)

	day := 24 * time.Hour
	var want []int64
	for _, step := range []struct {
		advance time.Duration
		debit   int64 // 0: none
	}{
		{day, 0},       // 0.7 owed: carried
		{day, 1},       // 1.4: one billed, 0.4 carried
		{10 * day, 7},  // 0.4 + 7.0
		{18 * day, 13}, // 0.4 + 12.6: exactly 13, nothing lost to rounding
	} {
		c.t = c.t.Add(step.advance)
		for range 2 { // the second pass of a window bills nothing
			if _, err := svc.Meter(ctx, c.t); err != nil {
				t.Fatal(err)
			}
		}
		if step.debit > 0 {
			want = append(want, -step.debit)
		}
	}
	// 30 days of 3 GiB at 7 per GiB-month: 21 in all.
	if got := debits(t, pool, paid.OrgID); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("debits %v, want %v", got, want)
	}
	if d := debits(t, pool, free.OrgID); len(d) != 0 {
		t.Errorf("an org without a price was billed %v", d)
	}
	// A price set later does not bill the free past.
	setPolicy(t, pool, pol, policy.ScopeOrg, free.OrgID.String(), policy.StoragePrice.Def().Key, 7)
	c.t = c.t.Add(10 * day)
	if _, err := svc.Meter(ctx, c.t); err != nil {
		t.Fatal(err)
	}
	if d := debits(t, pool, free.OrgID); len(d) != 1 || d[0] != -7 {
		t.Errorf("after a price was set: %v; want the 10 days since (7)", d)
	}
	b, err := ledger.GetBalance(ctx, pool, paid.OrgID)
	if err != nil || b.AmountMinor != -28 {
		t.Errorf("balance %+v, %v; want -28 (40 days)", b, err)
	}
}

// s3Driver is a storage-s3 driver on the dev stack's S3 under a fresh
// key prefix.
type s3Driver struct{ d *s3store.Driver }

func (s s3Driver) Storage(context.Context, string) (sdkstorage.Driver, error) { return s.d, nil }

func newS3Driver(t *testing.T) s3Driver {
	t.Helper()
	d := s3store.New(hclog.NewNullLogger())
	schema, err := d.ConfigSchema(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := base.ValidateConfig(schema, map[string]any{
		"endpoint": testenv.Env(t, "S3_ENDPOINT"), "region": testenv.Env(t, "S3_REGION"), "bucket": testenv.Env(t, "S3_BUCKET"),
		"path_style": true, "access_key_id": testenv.Env(t, "S3_ACCESS_KEY_ID"), "secret_access_key": testenv.Env(t, "S3_SECRET_ACCESS_KEY"),
		"key_prefix": "storage-test-" + strings.ReplaceAll(uuid.NewString(), "-", "")[:16] + "/",
	})
	if err != nil {
		t.Fatal(err)
	}
	cfg.APIVersion, cfg.Instance = sdkstorage.APIVersion1, "storage"
	if err := d.Configure(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
	return s3Driver{d}
}

// A presigned upload nobody confirms is removed when its time is up, with
// its reservation; so is the reservation of an upload whose core died.
func TestExpire(t *testing.T) {
	t.Parallel()
	pool, _ := testenv.MigratedPool(t)
	d := newS3Driver(t)
	c := &clock{t: time.Now()}
	svc := storage.NewService(pool, policy.NewService(pool, hclog.NewNullLogger()), d, "local", "storage", hclog.NewNullLogger(), storage.WithClock(c.now))
	p := project(t, pool)
	ctx := principal.With(context.Background(), principal.SystemPrincipal("test"))
	up, err := svc.PresignUpload(ctx, p, "late/file.bin", 5, "")
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest(up.URL.Method, up.URL.URL, strings.NewReader("12345"))
	for k, v := range up.URL.Header {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("presigned PUT: %v %v", resp, err)
	}
	_ = resp.Body.Close()
	key := fmt.Sprintf("orgs/%s/projects/%s/late/file.bin", p.OrgID, p.ID)
	if _, err := d.d.Stat(ctx, key); err != nil {
		t.Fatalf("the uploaded object: %v", err)
	}
	// A streamed upload of a core that died.
	if _, err := pool.Exec(ctx, `INSERT INTO storage_inflight (id, project_id, org_id, path, kind, reserved, created_by, expires_at)
		VALUES ($1, $2, $3, 'dead.bin', 'upload', 100, 'test', $4)`, uuid.Must(uuid.NewV7()), p.ID, p.OrgID, c.t.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(ctx, `UPDATE storage_usage SET bytes_reserved = bytes_reserved + 100 WHERE project_id = $1`, p.ID); err != nil {
		t.Fatal(err)
	}
	if n, err := svc.Expire(ctx); err != nil || n != 0 {
		t.Fatalf("Expire before the time: %d, %v", n, err)
	}
	c.t = up.ExpiresAt.Add(time.Second)
	if n, err := svc.Expire(ctx); err != nil || n != 2 {
		t.Fatalf("Expire: %d, %v; want 2", n, err)
	}
	if _, err := d.d.Stat(ctx, key); !errors.Is(err, base.ErrNotFound) {
		t.Errorf("the unconfirmed upload is still in the bucket: %v", err)
	}
	u, err := svc.Usage(ctx, p)
	if err != nil || u.BytesReserved != 0 || u.BytesUsed != 0 {
		t.Errorf("usage %+v, %v; want nothing reserved or used", u, err)
	}
	if _, err := svc.CompleteUpload(ctx, up); err == nil {
		t.Error("an expired upload was confirmed")
	}
}
