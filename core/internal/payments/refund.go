package payments

import (
	"context"
	"errors"
	"fmt"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/gpuaas/gpuaas/core/internal/audit"
	"github.com/gpuaas/gpuaas/core/internal/billing"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/ledger"
	"github.com/gpuaas/gpuaas/core/internal/policy"
	"github.com/gpuaas/gpuaas/core/internal/store"
	sdkpay "github.com/gpuaas/gpuaas/sdk/payments"
)

// RefundRequest refunds part or all of a credited session. OperationID makes a
// retried refund one refund.
type RefundRequest struct {
	SessionID   uuid.UUID
	AmountMinor int64
	Reason      string
	OperationID string
}

// RefundResult is the refund as posted.
type RefundResult struct {
	Session  *Session
	EntryID  int64
	RefundID string
	Status   string
}

// Refund returns money of a credited session to the payer through the provider and
// debits it from the org's ledger. The amount must be positive and at most what is
// left of the charge, within the policy's refund window.
func (s *Service) Refund(ctx context.Context, req RefundRequest) (*RefundResult, error) {
	if req.AmountMinor <= 0 {
		return nil, errcode.New(CodeRefundInvalidAmount, "a refund must be a positive amount").WithDetails("field", "amount_minor")
	}
	if req.OperationID == "" {
		req.OperationID = uuid.NewString()
	}
	sess, err := s.Get(ctx, req.SessionID)
	if err != nil {
		return nil, err
	}
	if sess.Status != StatusCredited {
		return nil, errcode.New(CodeRefundNotAllowed, "only a credited top-up can be refunded (this one is %s)", sess.Status)
	}
	window, err := policy.RefundWindow.Get(ctx, s.pol, policy.Target{OrgID: sess.OrgID.String()})
	if err != nil {
		return nil, err
	}
	if s.now().Sub(sess.CreatedAt) > window {
		return nil, errcode.New(CodeRefundNotAllowed, "the refund window of %s has passed", window)
	}
	if req.AmountMinor > sess.AmountMinor-sess.RefundedMinor {
		return nil, errcode.New(CodeRefundInvalidAmount, "at most %d %s can still be refunded", sess.AmountMinor-sess.RefundedMinor, sess.Currency).WithDetails("field", "amount_minor")
	}
	d, err := s.provider(ctx, sess.ProviderInstance)
	if err != nil {
		return nil, err
	}
	refunder, ok := d.(sdkpay.Refunder)
	if !ok {
		return nil, errcode.New(CodeRefundNotAllowed, "the payments provider cannot refund")
	}
	r, err := refunder.Refund(ctx, &sdkpay.RefundRequest{OperationID: req.OperationID, SessionID: sess.ProviderSession,
		AmountMinor: req.AmountMinor, Currency: sess.Currency, Reason: req.Reason})
	if err != nil {
		return nil, providerError(err)
	}
	if r.Status == sdkpay.RefundFailed {
		return nil, errcode.New(CodeProviderFailed, "the provider refused the refund")
	}
	res := &RefundResult{RefundID: r.RefundID, Status: string(r.Status)}
	err = store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		locked, err := scanSession(tx.QueryRow(ctx, `SELECT `+sessionColumns+` FROM payment_sessions WHERE id = $1 FOR UPDATE`, sess.ID))
		if err != nil {
			return err
		}
		e, posted, err := billing.Post(ctx, tx, s.pol, ledger.Entry{OrgID: sess.OrgID, Currency: sess.Currency, AmountMinor: -req.AmountMinor,
			Type: ledger.Refund, IdempotencyKey: "refund:" + req.OperationID, Reference: sess.ID.String(), Description: req.Reason}, s.now())
		if err != nil {
			return err
		}
		res.EntryID = e.ID
		if posted {
			if req.AmountMinor > locked.AmountMinor-locked.RefundedMinor {
				return errcode.New(CodeRefundInvalidAmount, "a concurrent refund used up the charge")
			}
			locked.RefundedMinor += req.AmountMinor
			if _, err := tx.Exec(ctx, `UPDATE payment_sessions SET refunded_minor = $2, updated_at = now() WHERE id = $1`, sess.ID, locked.RefundedMinor); err != nil {
				return err
			}
			if err := audit.Record(ctx, tx, audit.Entry{Action: "payment.refund", Target: s.target(locked),
				Details: map[string]any{"amount_minor": req.AmountMinor, "reason": req.Reason, "refund_id": r.RefundID}}); err != nil {
				return err
			}
		}
		res.Session = locked
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("payments: refund: %w", err)
	}
	return res, nil
}

// AdjustRequest is an admin credit or debit.
type AdjustRequest struct {
	OrgID       uuid.UUID
	AmountMinor int64
	Type        string // admin_adjustment or promotional_credit
	Reason      string
	OperationID string
}

// Adjust posts an admin adjustment or a promotional credit, audited. The same
// OperationID posts once.
func (s *Service) Adjust(ctx context.Context, req AdjustRequest) (ledger.Entry, error) {
	switch {
	case req.Type != ledger.AdminAdjustment && req.Type != ledger.PromotionalCredit:
		return ledger.Entry{}, errcode.New(errcode.ValidationFailed, "type must be admin_adjustment or promotional_credit").WithDetails("field", "type")
	case req.AmountMinor == 0:
		return ledger.Entry{}, errcode.New(errcode.ValidationFailed, "amount_minor must not be zero").WithDetails("field", "amount_minor")
	case req.Type == ledger.PromotionalCredit && req.AmountMinor < 0:
		return ledger.Entry{}, errcode.New(errcode.ValidationFailed, "a promotional credit must be positive").WithDetails("field", "amount_minor")
	case len(req.Reason) < 3 || len(req.Reason) > 500:
		return ledger.Entry{}, errcode.New(errcode.ValidationFailed, "reason must be 3-500 characters").WithDetails("field", "reason")
	}
	if req.OperationID == "" {
		req.OperationID = uuid.NewString()
	}
	currency, err := policy.DefaultCurrency.Get(ctx, s.pol, policy.Target{})
	if err != nil {
		return ledger.Entry{}, err
	}
	var out ledger.Entry
	err = store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		if _, err := ledger.EnsureAccount(ctx, tx, req.OrgID, currency); err != nil {
			var pgErr interface{ SQLState() string }
			if errors.As(err, &pgErr) && pgErr.SQLState() == "23503" {
				return errcode.New(errcode.NotFound, "organization not found").WithDetails("field", "org_id")
			}
			return err
		}
		e, posted, err := billing.Post(ctx, tx, s.pol, ledger.Entry{OrgID: req.OrgID, AmountMinor: req.AmountMinor, Type: req.Type,
			IdempotencyKey: "adjust:" + req.OperationID, Description: req.Reason}, s.now())
		if err != nil {
			return err
		}
		out = e
		if !posted {
			return nil
		}
		return audit.Record(ctx, tx, audit.Entry{Action: "billing." + req.Type, Target: s.ids.InOrg(req.OrgID.String(), "ledger_entry", fmt.Sprint(e.ID)),
			Details: map[string]any{"amount_minor": req.AmountMinor, "reason": req.Reason}})
	})
	if err != nil {
		return ledger.Entry{}, fmt.Errorf("payments: adjust: %w", err)
	}
	return out, nil
}
