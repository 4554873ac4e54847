// Package billing meters usage and turns it into ledger debits: usage records open
// when an allocation becomes active and close when it is released; accrual bills
// every record per second, set-based, idempotent by (record, window end); balance
// thresholds raise low-balance and depletion events once per transition.
package billing

import (
	"context"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
)

// Error codes.
const (
	CodeUsageNotFound errcode.Code = "usage_record_not_found"
)

// Usage is one metered period of an allocation.
type Usage struct {
	ID                   uuid.UUID  `json:"id"`
	OrgID                uuid.UUID  `json:"org_id"`
	ProjectID            uuid.UUID  `json:"project_id"`
	AllocationID         uuid.UUID  `json:"allocation_id"`
	SKU                  string     `json:"sku"`
	GPUs                 int        `json:"gpus"`
	PricePerGPUHourMinor int64      `json:"price_per_gpu_hour_minor"`
	Currency             string     `json:"currency"`
	StartedAt            time.Time  `json:"started_at"`
	EndedAt              *time.Time `json:"ended_at,omitempty"`
	BilledUntil          time.Time  `json:"billed_until"`
	BilledMinor          int64      `json:"billed_minor"`
}

// OpenUsage starts metering an allocation inside tx (the allocation's transition
// to active). Opening the same allocation twice returns the first record.
func OpenUsage(ctx context.Context, tx pgx.Tx, u Usage) (Usage, error) {
	if u.GPUs <= 0 || u.PricePerGPUHourMinor < 0 {
		return u, errcode.New(errcode.ValidationFailed, "usage needs gpus > 0 and a price >= 0")
	}
	if u.ID == uuid.Nil {
		u.ID = uuid.Must(uuid.NewV7())
	}
	u.BilledUntil = u.StartedAt
	err := tx.QueryRow(ctx, `INSERT INTO usage_records
		(id, org_id, project_id, allocation_id, sku, gpus, price_per_gpu_hour_minor, currency, started_at, billed_until)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)
		ON CONFLICT (allocation_id) DO UPDATE SET allocation_id = excluded.allocation_id
		RETURNING id, started_at, billed_until`,
		u.ID, u.OrgID, u.ProjectID, u.AllocationID, u.SKU, u.GPUs, u.PricePerGPUHourMinor, u.Currency, u.StartedAt).
		Scan(&u.ID, &u.StartedAt, &u.BilledUntil)
	if err != nil {
		return u, fmt.Errorf("billing: open usage: %w", err)
	}
	return u, nil
}

// CloseUsage stops metering an allocation at endedAt inside tx (released or
// release_failed). The time up to endedAt is still billed by the next accrual.
// Closing twice keeps the first end.
func CloseUsage(ctx context.Context, tx pgx.Tx, allocationID uuid.UUID, endedAt time.Time) error {
	tag, err := tx.Exec(ctx, `UPDATE usage_records SET ended_at = coalesce(ended_at, greatest($2, started_at)) WHERE allocation_id = $1`, allocationID, endedAt)
	if err != nil {
		return fmt.Errorf("billing: close usage: %w", err)
	}
	if tag.RowsAffected() == 0 {
		return errcode.New(CodeUsageNotFound, "no usage record for allocation %s", allocationID)
	}
	return nil
}

// UsageFilter selects usage records of an org.
type UsageFilter struct {
	OrgID     uuid.UUID
	ProjectID uuid.UUID // optional
	From, To  time.Time // started_at range, optional
	Before    uuid.UUID // keyset cursor (ids are time-ordered UUIDv7)
	Limit     int
}

const usageColumns = `id, org_id, project_id, allocation_id, sku, gpus, price_per_gpu_hour_minor, currency, started_at, ended_at, billed_until, billed_minor`

func scanUsage(r pgx.CollectableRow) (Usage, error) {
	var u Usage
	err := r.Scan(&u.ID, &u.OrgID, &u.ProjectID, &u.AllocationID, &u.SKU, &u.GPUs, &u.PricePerGPUHourMinor, &u.Currency, &u.StartedAt, &u.EndedAt, &u.BilledUntil, &u.BilledMinor)
	return u, err
}

func (f UsageFilter) args() []any {
	before := f.Before
	if before == uuid.Nil {
		before = uuid.Max
	}
	return []any{f.OrgID, f.ProjectID, f.From, f.To, before}
}

const usageWhere = `org_id = $1 AND ($2 = '00000000-0000-0000-0000-000000000000'::uuid OR project_id = $2)
	AND ($3 = '0001-01-01'::timestamptz OR started_at >= $3) AND ($4 = '0001-01-01'::timestamptz OR started_at < $4) AND id < $5`

// Querier runs queries: a pool, a connection or a transaction.
type Querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// ListUsage returns records newest first, up to Limit+1.
func ListUsage(ctx context.Context, q Querier, f UsageFilter) ([]Usage, error) {
	rows, err := q.Query(ctx, `SELECT `+usageColumns+` FROM usage_records WHERE `+usageWhere+` ORDER BY id DESC LIMIT $6`, append(f.args(), f.Limit+1)...)
	if err != nil {
		return nil, fmt.Errorf("billing: list usage: %w", err)
	}
	return pgx.CollectRows(rows, scanUsage)
}

// EachUsage streams every matching record (no limit) to fn, in id order, without
// holding them in memory.
func EachUsage(ctx context.Context, q Querier, f UsageFilter, fn func(Usage) error) error {
	rows, err := q.Query(ctx, `SELECT `+usageColumns+` FROM usage_records WHERE `+usageWhere+` ORDER BY id DESC`, f.args()...)
	if err != nil {
		return fmt.Errorf("billing: usage export: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		u, err := scanUsage(rows)
		if err != nil {
			return err
		}
		if err := fn(u); err != nil {
			return err
		}
	}
	return rows.Err()
}
