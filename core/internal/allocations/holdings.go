package allocations

import (
	"context"
	"fmt"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// Holdings are the live allocations and their GPUs that each org and each
// project holds, one allocation_holdings row per owner, so that the caps of a
// create read two rows instead of counting the org's live allocations (a cost
// that grew with the org). A create adds to both rows in its first statement,
// and every move into a terminal state takes away, in the same transaction as
// the allocation's row. Both lock the org's row before the project's.
//
// The rows are derived data: the reconciler compares them with a count of the
// live allocations and corrects any that differ (an allocation written or
// ended by hand in SQL), see Reconciler.CorrectHoldings.

// takeHoldingsSQL reads an active SKU and counts $4 of its nodes into the
// org's ($1) and then the project's ($2) holdings, returning one row per
// owner with the SKU and the owner's new totals; no row, and nothing taken,
// when the SKU ($3) is unknown or inactive.
const takeHoldingsSQL = `
	WITH sku AS (
		SELECT id, gpus_per_node, price_per_gpu_hour_minor, currency FROM skus WHERE id = $3 AND active
	), held AS (
		INSERT INTO allocation_holdings AS h (owner_id, allocations, gpus)
		SELECT o.id, $4::bigint, $4::bigint * sku.gpus_per_node FROM sku, (VALUES (1, $1::uuid), (2, $2::uuid)) o (i, id) ORDER BY o.i
		` + addToHoldings + `
		RETURNING owner_id, allocations, gpus
	)
	SELECT sku.id, sku.gpus_per_node, sku.price_per_gpu_hour_minor, sku.currency, held.owner_id, held.allocations, held.gpus
	FROM sku, held`

// adjustHoldingsSQL adds $3 allocations and $4 GPUs to the org's ($1) and
// then the project's ($2) holdings.
const adjustHoldingsSQL = `
	INSERT INTO allocation_holdings AS h (owner_id, allocations, gpus)
	VALUES ($1, $3::bigint, $4::bigint), ($2, $3::bigint, $4::bigint)
	` + addToHoldings

// addToHoldings ends an INSERT INTO allocation_holdings AS h: a row that
// exists takes the inserted values as amounts to add.
const addToHoldings = `ON CONFLICT (owner_id) DO UPDATE SET allocations = h.allocations + excluded.allocations, gpus = h.gpus + excluded.gpus`

// CorrectHoldings compares every owner's holdings with its live allocations,
// in one snapshot, and recounts those that differ under the owner's row lock.
// It returns how many rows it corrected.
func (r *Reconciler) CorrectHoldings(ctx context.Context) (int, error) {
	rows, err := r.Pool.Query(ctx, `
		WITH live AS (
			SELECT org_id AS owner_id, count(*) AS n, sum(gpus) AS g FROM allocations WHERE state NOT IN ('released', 'failed') GROUP BY org_id
			UNION ALL
			SELECT project_id, count(*), sum(gpus) FROM allocations WHERE state NOT IN ('released', 'failed') GROUP BY project_id
		)
		SELECT owner_id FROM allocation_holdings h FULL JOIN live USING (owner_id)
		WHERE coalesce(h.allocations, 0) <> coalesce(live.n, 0) OR coalesce(h.gpus, 0) <> coalesce(live.g, 0)
		LIMIT 1000`)
	if err != nil {
		return 0, fmt.Errorf("allocations: compare holdings: %w", err)
	}
	owners, err := pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
	if err != nil {
		return 0, fmt.Errorf("allocations: compare holdings: %w", err)
	}
	corrected := 0
	for _, owner := range owners {
		ok, err := r.recount(ctx, owner)
		if err != nil {
			return corrected, err
		}
		if ok {
			corrected++
		}
	}
	return corrected, nil
}

// recount sets one owner's holdings to its live allocations. The count is a
// statement after the row lock, so it sees every create and release that
// held the lock before.
func (r *Reconciler) recount(ctx context.Context, owner uuid.UUID) (bool, error) {
	tx, err := r.Pool.Begin(ctx)
	if err != nil {
		return false, fmt.Errorf("allocations: recount holdings: %w", err)
	}
	defer func() { _ = tx.Rollback(ctx) }()
	var wasN, wasGPUs, n, gpus int64
	if err := tx.QueryRow(ctx, `
		INSERT INTO allocation_holdings AS h (owner_id, allocations, gpus) VALUES ($1, 0, 0)
		ON CONFLICT (owner_id) DO UPDATE SET allocations = h.allocations
		RETURNING allocations, gpus`, owner).Scan(&wasN, &wasGPUs); err != nil {
		return false, fmt.Errorf("allocations: lock holdings of %s: %w", owner, err)
	}
	if err := tx.QueryRow(ctx, `
		SELECT count(*), coalesce(sum(gpus), 0) FROM allocations
		WHERE (org_id = $1 OR project_id = $1) AND state NOT IN ('released', 'failed')`, owner).Scan(&n, &gpus); err != nil {
		return false, fmt.Errorf("allocations: count holdings of %s: %w", owner, err)
	}
	if n == wasN && gpus == wasGPUs {
		return false, nil // a transaction in flight at the comparison
	}
	if _, err := tx.Exec(ctx, `UPDATE allocation_holdings SET allocations = $2, gpus = $3 WHERE owner_id = $1`, owner, n, gpus); err != nil {
		return false, fmt.Errorf("allocations: correct holdings of %s: %w", owner, err)
	}
	if err := tx.Commit(ctx); err != nil {
		return false, fmt.Errorf("allocations: correct holdings of %s: %w", owner, err)
	}
	r.Log.Warn("corrected the allocations an owner holds (an allocation was written or ended outside the core?)",
		"owner", owner, "allocations_was", wasN, "allocations", n, "gpus_was", wasGPUs, "gpus", gpus)
	return true, nil
}
