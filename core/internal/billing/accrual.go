package billing

import (
	"context"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/sync/errgroup"

	"github.com/gpuaas/gpuaas/core/internal/ledger"
	"github.com/gpuaas/gpuaas/core/internal/policy"
	"github.com/gpuaas/gpuaas/core/internal/store"
)

// AccrualResult reports one accrual run.
type AccrualResult struct {
	WindowEnd   time.Time
	Records     int
	DebitsMinor int64
	Orgs        []uuid.UUID
	// Phase timings, for metrics and benchmarks.
	BillTook, EvaluateTook time.Duration
}

// Accrue bills every usage record up to windowEnd with set-based statements, one
// transaction per chunk of orgs.
//
// Rounding: a record accrues whole seconds, floor(t) - floor(billed_until), so the
// seconds of consecutive windows add up exactly; cost = seconds × gpus × price per
// GPU-hour / 3600 minor units. The integer part is debited; the remainder (in
// 1/3600 of a minor unit) is carried on the record into the next window, so no
// fraction is ever lost or charged twice: over any run of windows the debits total
// floor(total seconds × gpus × price / 3600).
//
// A window is idempotent: billed_until moves to windowEnd in the same statement
// that debits, and each debit's idempotency key is (record, window end), so running
// the same window again bills nothing.
//
// Orgs whose balance crossed a threshold get their events in the same transaction.
func Accrue(ctx context.Context, pool *pgxpool.Pool, pol *policy.Service, windowEnd time.Time) (AccrualResult, error) {
	res := AccrualResult{WindowEnd: windowEnd}
	rows, err := pool.Query(ctx, `SELECT DISTINCT org_id FROM usage_records WHERE NOT settled AND billed_until < $1 ORDER BY org_id`, windowEnd)
	if err != nil {
		return res, fmt.Errorf("billing: accrue: %w", err)
	}
	orgs, err := pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
	if err != nil || len(orgs) == 0 {
		return res, err
	}
	// Orgs are billed in chunks, each its own transaction holding its orgs' ledger
	// locks, two at a time: a failed chunk leaves the others billed, and running
	// the window again bills exactly what is left.
	chunks := chunk(orgs, max(1, (len(orgs)+accrualChunks-1)/accrualChunks))
	results := make([]AccrualResult, len(chunks))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(accrualParallel)
	for i, c := range chunks {
		g.Go(func() error {
			r, err := accrueChunk(gctx, pool, pol, windowEnd, c)
			results[i] = r
			return err
		})
	}
	err = g.Wait()
	for _, r := range results {
		res.Records += r.Records
		res.DebitsMinor += r.DebitsMinor
		res.Orgs = append(res.Orgs, r.Orgs...)
		res.BillTook = max(res.BillTook, r.BillTook)
		res.EvaluateTook = max(res.EvaluateTook, r.EvaluateTook)
	}
	if err != nil {
		return res, fmt.Errorf("billing: accrue to %s: %w", windowEnd.Format(time.RFC3339), err)
	}
	return res, nil
}

// Accrual runs in accrualChunks transactions, accrualParallel at a time.
const (
	accrualChunks   = 8
	accrualParallel = 2
)

func chunk(orgs []uuid.UUID, size int) [][]uuid.UUID {
	var out [][]uuid.UUID
	for len(orgs) > 0 {
		n := min(size, len(orgs))
		out = append(out, orgs[:n])
		orgs = orgs[n:]
	}
	return out
}

// accrueChunk bills the due records of some orgs in one transaction.
func accrueChunk(ctx context.Context, pool *pgxpool.Pool, pol *policy.Service, windowEnd time.Time, orgs []uuid.UUID) (AccrualResult, error) {
	var res AccrualResult
	err := store.Transact(ctx, pool, store.TxOptions{}, func(tx pgx.Tx) error {
		res = AccrualResult{WindowEnd: windowEnd}
		// Lock the orgs' ledgers in a fixed order.
		rows, err := tx.Query(ctx, `SELECT org_id FROM billing_accounts WHERE org_id = ANY($1) ORDER BY org_id FOR UPDATE`, orgs)
		if err != nil {
			return err
		}
		res.Orgs, err = pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
		if err != nil || len(res.Orgs) == 0 {
			return err
		}
		billStart := time.Now()
		err = tx.QueryRow(ctx, `
			WITH due AS (
				SELECT id, org_id, currency, gpus, price_per_gpu_hour_minor AS price, carry,
					billed_until AS from_t, ended_at, greatest(billed_until, least($1::timestamptz, coalesce(ended_at, 'infinity'))) AS to_t
				FROM usage_records
				WHERE NOT settled AND billed_until < $1 AND org_id = ANY($3)
			), calc AS (
				SELECT id, org_id, currency, to_t, ended_at,
					(floor(extract(epoch FROM to_t)) - floor(extract(epoch FROM from_t)))::numeric * gpus * price + carry AS numer
				FROM due
			), upd AS (
				UPDATE usage_records u
				SET billed_until = c.to_t, carry = mod(c.numer, 3600)::bigint, billed_minor = u.billed_minor + div(c.numer, 3600)::bigint,
					settled = c.ended_at IS NOT NULL AND c.to_t >= c.ended_at
				FROM calc c WHERE u.id = c.id
				RETURNING u.id, u.org_id, u.currency, div(c.numer, 3600)::bigint AS debit
			), ins AS (
				INSERT INTO ledger_entries (org_id, currency, amount_minor, entry_type, idempotency_key, reference, description, created_by)
				SELECT org_id, currency, -debit, 'usage_debit', 'usage:' || id || ':' || $2, id::text, 'GPU time to ' || $2, 'system:billing'
				FROM upd WHERE debit > 0
				ON CONFLICT (idempotency_key) DO NOTHING
				RETURNING amount_minor
			)
			SELECT (SELECT count(*) FROM upd), coalesce((SELECT -sum(amount_minor) FROM ins), 0)`,
			windowEnd, windowEnd.UTC().Format(time.RFC3339Nano), res.Orgs).Scan(&res.Records, &res.DebitsMinor)
		if err != nil {
			return err
		}
		if err := ledger.CheckpointDue(ctx, tx, res.Orgs); err != nil {
			return err
		}
		res.BillTook = time.Since(billStart)
		evalStart := time.Now()
		defer func() { res.EvaluateTook = time.Since(evalStart) }()
		return Evaluate(ctx, tx, pol, res.Orgs, windowEnd)
	})
	return res, err
}
