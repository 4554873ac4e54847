package billing_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/gpuaas/gpuaas/core/internal/billing"
	"github.com/gpuaas/gpuaas/core/internal/ledger"
)

// BenchmarkAccrual100k bills 100,000 open usage records (over 1,000 orgs) in one
// window. Target: under 5 s.
func BenchmarkAccrual100k(b *testing.B) {
	bb := setup(b)
	ctx := context.Background()
	start := time.Now().Add(-time.Hour).Truncate(time.Second)
	_, err := bb.pool.Exec(ctx, `
		WITH o AS (
			INSERT INTO orgs (id, slug, name) SELECT gen_random_uuid(), 'bench-' || g, 'Bench ' || g FROM generate_series(1, 1000) g RETURNING id
		), a AS (
			INSERT INTO billing_accounts (org_id, currency) SELECT id, 'USD' FROM o RETURNING org_id
		)
		INSERT INTO usage_records (id, org_id, project_id, allocation_id, sku, gpus, price_per_gpu_hour_minor, currency, started_at, billed_until)
		SELECT gen_random_uuid(), a.org_id, gen_random_uuid(), gen_random_uuid(), 'h100x8', 8, 250 + (g % 7), 'USD', $1, $1
		FROM a, generate_series(1, 100) g`, start)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := bb.pool.Exec(ctx, `ANALYZE usage_records; ANALYZE billing_accounts`); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	t0 := time.Now()
	res, err := billing.Accrue(ctx, bb.pool, bb.pol, time.Now().Truncate(time.Second))
	took := time.Since(t0)
	if err != nil {
		b.Fatal(err)
	}
	if res.Records != 100_000 {
		b.Fatalf("billed %d records, want 100000", res.Records)
	}
	b.ReportMetric(took.Seconds(), "accrual_100k_s")
	b.Logf("accrual: 100,000 open usage records over %d orgs billed in one window in %.2f s (target < 5 s; billing %.2f s, thresholds %.2f s); %d minor units debited",
		len(res.Orgs), took.Seconds(), res.BillTook.Seconds(), res.EvaluateTook.Seconds(), res.DebitsMinor)
}

// BenchmarkBalanceRead compares balance read latency for an org with 1,000,000
// ledger entries and one with 100, in the same run. Target ratio: < 2.
func BenchmarkBalanceRead(b *testing.B) {
	bb := setup(b)
	ctx := context.Background()
	big, small := bb.org(b), bb.org(b)
	fill := func(org uuid.UUID, n int) {
		bb.tx(b, func(tx pgx.Tx) error {
			if _, err := ledger.Lock(ctx, tx, org); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, `INSERT INTO ledger_entries (org_id, currency, amount_minor, entry_type, idempotency_key, created_by)
				SELECT $1::uuid, 'USD', CASE WHEN g % 3 = 0 THEN -7 ELSE 11 END, 'admin_adjustment', $3 || ':' || g, 'bench'
				FROM generate_series(1, $2) g`, org, n, org.String()); err != nil {
				return err
			}
			return ledger.CheckpointDue(ctx, tx, []uuid.UUID{org})
		})
	}
	fill(big, 1_000_000)
	fill(small, 100)
	// A tail after the checkpoint, as between two checkpoints in production.
	for i := range 100 {
		bb.credit(b, big, 1, "tail-"+uuid.NewString()+string(rune('a'+i%26)), t0)
	}
	if _, err := bb.pool.Exec(ctx, `ANALYZE ledger_entries; ANALYZE ledger_checkpoints`); err != nil {
		b.Fatal(err)
	}
	// The two orgs are read alternately, so both see the same machine noise.
	read := func(org uuid.UUID) time.Duration {
		t := time.Now()
		if _, err := ledger.GetBalance(ctx, bb.pool, org); err != nil {
			b.Fatal(err)
		}
		return time.Since(t)
	}
	for range 200 { // warm up
		read(small)
		read(big)
	}
	b.ResetTimer()
	const n = 5000
	ls, lb := make([]time.Duration, 0, n), make([]time.Duration, 0, n)
	for range n {
		ls = append(ls, read(small))
		lb = append(lb, read(big))
	}
	slices.Sort(ls)
	slices.Sort(lb)
	s, l := ls[n*99/100], lb[n*99/100]
	var sum int64
	_ = bb.pool.QueryRow(ctx, `SELECT sum(amount_minor) FROM ledger_entries WHERE org_id = $1`, big).Scan(&sum)
	bal, _ := ledger.GetBalance(ctx, bb.pool, big)
	if bal.AmountMinor != sum {
		b.Fatalf("balance %d differs from the sum %d", bal.AmountMinor, sum)
	}
	b.ReportMetric(float64(s.Microseconds())/1000, "p99_100_entries_ms")
	b.ReportMetric(float64(l.Microseconds())/1000, "p99_1M_entries_ms")
	b.ReportMetric(float64(l)/float64(s), "1M/100_ratio")
	b.Logf("balance read p99: %s with 1,000,000 entries, %s with 100 (ratio %.2f, target < 2)", l, s, float64(l)/float64(s))
}
