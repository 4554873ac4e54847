package storage

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/gpuaas/gpuaas/core/internal/ledger"
	"github.com/gpuaas/gpuaas/core/internal/policy"
	"github.com/gpuaas/gpuaas/core/internal/store"
	sdkstorage "github.com/gpuaas/gpuaas/sdk/storage"
)

// GiBMonth is the byte-seconds of one GiB kept for 30 days: the unit
// storage.price_per_gb_month_minor prices.
const GiBMonth = int64(1<<30) * 30 * 24 * 3600

// runEvery is how often Run looks for expired operations and due bills.
const runEvery = time.Minute

// Run expires operations in flight whose time is up and bills stored bytes
// once per storage.metering_window, until ctx is done. Several cores may
// run it: each row is handled once.
func (s *Service) Run(ctx context.Context) {
	for {
		if n, err := s.Expire(ctx); err != nil && ctx.Err() == nil {
			s.log.Warn("expiring storage operations", "error", err)
		} else if n > 0 {
			s.log.Info("expired storage operations", "count", n)
		}
		window := policy.StorageMeterWindow.Value(ctx, s.pol, policy.Target{})
		if res, err := s.Meter(ctx, s.now().Truncate(window)); err != nil && ctx.Err() == nil {
			s.log.Warn("metering storage", "error", err)
		} else if res.Debits > 0 {
			s.log.Info("storage metered", "debits", res.Debits, "amount_minor", res.AmountMinor)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(runEvery):
		}
	}
}

// Expire ends operations in flight whose time is up: it releases their
// reservations and, for a presigned upload nobody confirmed, removes what
// was uploaded. It returns how many it ended.
func (s *Service) Expire(ctx context.Context) (int, error) {
	type op struct {
		id         uuid.UUID
		p          Project
		path, kind string
	}
	rows, err := s.pool.Query(ctx, `SELECT id, org_id, project_id, path, kind FROM storage_inflight WHERE expires_at < $1 ORDER BY expires_at LIMIT 500`, s.now())
	if err != nil {
		return 0, fmt.Errorf("storage: expired operations: %w", err)
	}
	ops, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (op, error) {
		var o op
		return o, r.Scan(&o.id, &o.p.OrgID, &o.p.ID, &o.path, &o.kind)
	})
	if err != nil {
		return 0, fmt.Errorf("storage: expired operations: %w", err)
	}
	var d sdkstorage.Driver
	n := 0
	for _, o := range ops {
		if o.kind == "presigned_upload" {
			if d == nil {
				if d, err = s.driver(ctx); err != nil {
					return n, err
				}
			}
			// Nothing of the project is at a path a presigned upload holds:
			// whatever is in the bucket there is the unconfirmed upload.
			if err := d.Delete(ctx, &sdkstorage.DeleteRequest{OperationID: "expired-" + o.id.String(), Key: objectKey(o.p, o.path)}); err != nil {
				return n, driverError(ctx, err, "remove an unconfirmed upload")
			}
		}
		err := store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
			var held int64
			err := tx.QueryRow(ctx, `DELETE FROM storage_inflight WHERE id = $1 AND expires_at < $2 RETURNING reserved`, o.id, s.now()).Scan(&held)
			if errors.Is(err, pgx.ErrNoRows) {
				return nil // another core took it
			}
			if err != nil || held == 0 {
				return err
			}
			return s.move(ctx, tx, o.p, 0, 0, -held)
		})
		if err != nil {
			return n, fmt.Errorf("storage: expiring %s: %w", o.id, err)
		}
		switch o.kind {
		case "upload":
			s.metrics.aborted("expired")
		case "presigned_upload":
			s.metrics.aborted("unconfirmed")
		}
		n++
	}
	return n, nil
}

// MeterResult is what one metering pass billed.
type MeterResult struct {
	Projects    int
	Debits      int
	AmountMinor int64
}

// Meter bills every project not yet billed for the window ending at end:
// the byte-seconds it stored since its last bill, at the org's
// storage.price_per_gb_month_minor per GiBMonth, in whole minor units; the
// fraction of a unit left carries to the next bill (exactly: integers
// throughout). Each bill is one usage_debit with the idempotency key
// storage:{project}:{end}. With no price nothing is owed, then or later.
func (s *Service) Meter(ctx context.Context, end time.Time) (MeterResult, error) {
	var res MeterResult
	for after := uuid.Nil; ; {
		rows, err := s.pool.Query(ctx, `SELECT project_id, org_id FROM storage_usage
			WHERE (billed_until IS NULL OR billed_until < $1) AND project_id > $2 ORDER BY project_id LIMIT 500`, end, after)
		if err != nil {
			return res, fmt.Errorf("storage: metering: %w", err)
		}
		due, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Project, error) {
			var p Project
			return p, r.Scan(&p.ID, &p.OrgID)
		})
		if err != nil {
			return res, fmt.Errorf("storage: metering: %w", err)
		}
		if len(due) == 0 {
			return res, nil
		}
		for _, p := range due {
			amount, err := s.bill(ctx, p, end)
			if err != nil {
				return res, err
			}
			res.Projects++
			if amount > 0 {
				res.Debits++
				res.AmountMinor += amount
			}
		}
		after = due[len(due)-1].ID
	}
}

// bill bills one project for the window ending at end and returns the
// amount.
func (s *Service) bill(ctx context.Context, p Project, end time.Time) (int64, error) {
	price := policy.StoragePrice.Value(ctx, s.pol, policy.Target{OrgID: p.OrgID.String()})
	var owed int64
	err := store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		err := tx.QueryRow(ctx, `UPDATE storage_usage SET
				byte_seconds = byte_seconds + bytes_used::numeric * GREATEST(0, extract(epoch FROM ($2::timestamptz - accrued_at))),
				accrued_at = GREATEST(accrued_at, $2)
			WHERE project_id = $1 AND (billed_until IS NULL OR billed_until < $3)
			RETURNING div(byte_seconds * $4 + carry, $5)::bigint`, p.ID, s.now(), end, price, GiBMonth).Scan(&owed)
		if errors.Is(err, pgx.ErrNoRows) {
			owed = 0
			return nil // another core billed it
		}
		if err != nil {
			return fmt.Errorf("storage: metering %s: %w", p.ID, err)
		}
		if owed > 0 {
			currency := policy.DefaultCurrency.Value(ctx, s.pol, policy.Target{})
			if _, err := ledger.EnsureAccount(ctx, tx, p.OrgID, currency); err != nil {
				return err
			}
			_, _, err := ledger.Post(ctx, tx, ledger.Entry{OrgID: p.OrgID, AmountMinor: -owed, Type: ledger.UsageDebit,
				IdempotencyKey: fmt.Sprintf("storage:%s:%d", p.ID, end.Unix()), Reference: s.projectTarget(p).String(),
				Description: fmt.Sprintf("Project storage until %s", end.UTC().Format(time.RFC3339)), CreatedBy: "system"})
			if err != nil {
				return fmt.Errorf("storage: billing %s: %w", p.ID, err)
			}
		}
		_, err = tx.Exec(ctx, `UPDATE storage_usage SET billed_until = $2, byte_seconds = 0,
				carry = mod(byte_seconds * $3 + carry, $4)
			WHERE project_id = $1`, p.ID, end, price, GiBMonth)
		if err != nil {
			return fmt.Errorf("storage: metering %s: %w", p.ID, err)
		}
		return nil
	})
	return owed, err
}
