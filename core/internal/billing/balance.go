package billing

import (
	"context"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/gpuaas/gpuaas/core/internal/events"
	"github.com/gpuaas/gpuaas/core/internal/ledger"
	"github.com/gpuaas/gpuaas/core/internal/policy"
)

// BalanceEvent is the payload of billing.low_balance, billing.balance_depleted,
// billing.balance_restored and billing.auto_release_requested.
type BalanceEvent struct {
	OrgID          uuid.UUID  `json:"org_id"`
	BalanceMinor   int64      `json:"balance_minor"`
	Currency       string     `json:"currency"`
	ThresholdMinor int64      `json:"threshold_minor,omitempty"`
	DepletedSince  *time.Time `json:"depleted_since,omitempty"`
	GraceSeconds   int64      `json:"grace_seconds,omitempty"`
}

// Evaluate moves each org's warning state after its balance changed, inside tx,
// which must hold the orgs' ledger locks (ledger.Post and Accrue take them), so
// the balances it reads cannot change under it. It
// raises billing.low_balance once when the balance falls below the threshold (a
// balance back at or above it re-arms the warning), billing.balance_depleted once
// when it reaches zero or below, and billing.balance_restored when a depleted
// balance is positive again.
func Evaluate(ctx context.Context, tx pgx.Tx, pol *policy.Service, orgs []uuid.UUID, now time.Time) error {
	if len(orgs) == 0 {
		return nil
	}
	ids := make([]string, len(orgs))
	for i, o := range orgs {
		ids[i] = o.String()
	}
	thresholds, err := policy.LowBalanceThreshold.ForOrgs(ctx, pol, ids)
	if err != nil {
		return err
	}
	balances, err := ledger.Balances(ctx, tx, orgs)
	if err != nil {
		return err
	}
	rows, err := tx.Query(ctx, `SELECT org_id, low_balance_warned, depleted_since FROM billing_accounts WHERE org_id = ANY($1)`, orgs)
	if err != nil {
		return fmt.Errorf("billing: evaluate: %w", err)
	}
	type state struct {
		org      uuid.UUID
		currency string
		warned   bool
		depleted *time.Time
		balance  int64
	}
	states, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (state, error) {
		var st state
		if err := r.Scan(&st.org, &st.warned, &st.depleted); err != nil {
			return st, err
		}
		b := balances[st.org]
		st.currency, st.balance = b.Currency, b.AmountMinor
		return st, nil
	})
	if err != nil {
		return fmt.Errorf("billing: evaluate: %w", err)
	}
	for _, st := range states {
		threshold := thresholds[st.org.String()]
		ev := BalanceEvent{OrgID: st.org, BalanceMinor: st.balance, Currency: st.currency, ThresholdMinor: threshold}
		var out []events.Event
		newWarned, newDepleted := st.warned, st.depleted
		switch {
		case st.balance < threshold && !st.warned:
			newWarned = true
			out = append(out, events.Event{Subject: events.SubjectBillingLowBalance, Payload: ev})
		case st.balance >= threshold && st.warned:
			newWarned = false
		}
		switch {
		case st.balance <= 0 && st.depleted == nil:
			t := now.UTC()
			newDepleted = &t
			grace, err := policy.DepletionGrace.Get(ctx, pol, policy.Target{OrgID: st.org.String()})
			if err != nil {
				return err
			}
			dev := ev
			dev.DepletedSince, dev.GraceSeconds = &t, int64(grace/time.Second)
			out = append(out, events.Event{Subject: events.SubjectBillingBalanceDepleted, Payload: dev})
		case st.balance > 0 && st.depleted != nil:
			newDepleted = nil
			out = append(out, events.Event{Subject: events.SubjectBillingBalanceRestored, Payload: ev})
		}
		if newWarned == st.warned && sameTime(newDepleted, st.depleted) {
			continue
		}
		if _, err := tx.Exec(ctx, `UPDATE billing_accounts SET low_balance_warned = $2, depleted_since = $3 WHERE org_id = $1`, st.org, newWarned, newDepleted); err != nil {
			return fmt.Errorf("billing: evaluate %s: %w", st.org, err)
		}
		if _, err := events.Enqueue(ctx, tx, out...); err != nil {
			return err
		}
	}
	return nil
}

func sameTime(a, b *time.Time) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.Equal(*b)
}

// RequestAutoRelease asks, once per depletion, for every active allocation of the
// org to be released, if the org is still depleted since the same moment and its
// balance is still at or below zero. It reports whether it asked.
func RequestAutoRelease(ctx context.Context, tx pgx.Tx, org uuid.UUID, depletedSince time.Time) (bool, error) {
	var since *time.Time
	if err := tx.QueryRow(ctx, `SELECT depleted_since FROM billing_accounts WHERE org_id = $1 FOR UPDATE`, org).Scan(&since); err != nil {
		return false, fmt.Errorf("billing: auto-release %s: %w", org, err)
	}
	if since == nil || !since.Equal(depletedSince) {
		return false, nil // topped up (and perhaps depleted again later: a new timer handles that)
	}
	bal, err := ledger.GetBalance(ctx, tx, org)
	if err != nil {
		return false, err
	}
	if bal.AmountMinor > 0 {
		return false, nil
	}
	tag, err := tx.Exec(ctx, `INSERT INTO billing_auto_releases (org_id, depleted_since) VALUES ($1, $2) ON CONFLICT DO NOTHING`, org, depletedSince)
	if err != nil {
		return false, err
	}
	if tag.RowsAffected() == 0 {
		return false, nil
	}
	_, err = events.Enqueue(ctx, tx, events.Event{Subject: events.SubjectBillingAutoReleaseRequested,
		Payload: BalanceEvent{OrgID: org, BalanceMinor: bal.AmountMinor, Currency: bal.Currency, DepletedSince: &depletedSince}})
	return err == nil, err
}

// LedgerPosted is the payload of billing.ledger_posted.
type LedgerPosted struct {
	OrgID       uuid.UUID `json:"org_id"`
	EntryID     int64     `json:"entry_id"`
	EntryType   string    `json:"entry_type"`
	AmountMinor int64     `json:"amount_minor"`
	Currency    string    `json:"currency"`
}

// Post appends a credit, refund or adjustment inside tx, announces it and moves the
// org's warning state (a top-up re-arms the low-balance warning). A replay of the
// same idempotency key returns the first entry and changes nothing.
func Post(ctx context.Context, tx pgx.Tx, pol *policy.Service, e ledger.Entry, now time.Time) (ledger.Entry, bool, error) {
	got, posted, err := ledger.Post(ctx, tx, e)
	if err != nil || !posted {
		return got, posted, err
	}
	if _, err := events.Enqueue(ctx, tx, events.Event{Subject: events.SubjectBillingLedgerPosted,
		Payload: LedgerPosted{OrgID: got.OrgID, EntryID: got.ID, EntryType: got.Type, AmountMinor: got.AmountMinor, Currency: got.Currency}}); err != nil {
		return got, false, err
	}
	return got, true, Evaluate(ctx, tx, pol, []uuid.UUID{got.OrgID}, now)
}
