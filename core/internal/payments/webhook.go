package payments

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/gpuaas/gpuaas/core/internal/audit"
	"github.com/gpuaas/gpuaas/core/internal/billing"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/events"
	"github.com/gpuaas/gpuaas/core/internal/ledger"
	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/store"
	"github.com/gpuaas/gpuaas/sdk/base"
	sdkpay "github.com/gpuaas/gpuaas/sdk/payments"
)

// SessionUpdated is the payload of payments.session_updated.
type SessionUpdated struct {
	SessionID   string `json:"session_id"`
	OrgID       string `json:"org_id"`
	Status      string `json:"status"`
	AmountMinor int64  `json:"amount_minor"`
	Currency    string `json:"currency"`
}

// WebhookResult says what a webhook delivery did.
type WebhookResult struct {
	Events     int
	Duplicates int
	Credited   int
}

// HandleWebhook verifies a provider webhook (raw body and headers exactly as
// received) through the instance's driver and applies its events. Every provider
// event is applied once: a redelivery, even concurrent, changes nothing. A payload
// that fails verification is webhook_invalid and changes nothing.
func (s *Service) HandleWebhook(ctx context.Context, instance string, body []byte, header http.Header) (WebhookResult, error) {
	var res WebhookResult
	d, err := s.provider(ctx, instance)
	if err != nil {
		return res, err
	}
	evs, err := d.HandleWebhook(ctx, &sdkpay.Webhook{Body: body, Header: header})
	if err != nil {
		if errors.Is(err, base.ErrUnauthenticated) || errors.Is(err, base.ErrInvalidArgument) {
			return res, errcode.Wrap(err, CodeWebhookInvalid, "the webhook failed verification")
		}
		return res, providerError(err)
	}
	ctx = principal.With(ctx, principal.SystemPrincipal("payments:"+instance))
	for _, ev := range evs {
		res.Events++
		var dup, credited bool
		err := store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
			dup, credited = false, false
			tag, err := tx.Exec(ctx, `INSERT INTO payment_events (provider_instance, event_id, event_type) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING`,
				instance, ev.ID, string(ev.Type))
			if err != nil {
				return err
			}
			if tag.RowsAffected() == 0 {
				dup = true
				return nil
			}
			credited, err = s.apply(ctx, tx, instance, ev)
			return err
		})
		if err != nil {
			return res, fmt.Errorf("payments: webhook event %s: %w", ev.ID, err)
		}
		if dup {
			res.Duplicates++
		}
		if credited {
			res.Credited++
		}
	}
	return res, nil
}

// apply moves the session of one new provider event, inside tx.
func (s *Service) apply(ctx context.Context, tx pgx.Tx, instance string, ev sdkpay.Event) (bool, error) {
	if ev.SessionID == "" {
		return false, nil
	}
	sess, err := scanSession(tx.QueryRow(ctx, `SELECT `+sessionColumns+` FROM payment_sessions
		WHERE provider_instance = $1 AND provider_session = $2 FOR UPDATE`, instance, ev.SessionID))
	if errors.Is(err, pgx.ErrNoRows) {
		s.log.Warn("webhook for an unknown payment session", "instance", instance, "event_id", ev.ID, "provider_session", ev.SessionID)
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if _, err := tx.Exec(ctx, `UPDATE payment_events SET session_id = $3 WHERE provider_instance = $1 AND event_id = $2`, instance, ev.ID, sess.ID); err != nil {
		return false, err
	}
	switch ev.Type {
	case sdkpay.EventCheckoutCompleted:
		if ev.PaymentStatus != sdkpay.StatusPaid {
			return false, nil // not paid (yet): an async payment may still succeed
		}
		if sess.Status != StatusInitiated && sess.Status != StatusCheckoutCompleted {
			return false, nil
		}
		if ev.AmountMinor != sess.AmountMinor || !strings.EqualFold(ev.Currency, sess.Currency) {
			reason := fmt.Sprintf("paid %d %s for a session of %d %s", ev.AmountMinor, strings.ToUpper(ev.Currency), sess.AmountMinor, sess.Currency)
			return false, s.move(ctx, tx, sess, StatusFailedReconcile, reason)
		}
		if err := s.move(ctx, tx, sess, StatusCheckoutCompleted, ""); err != nil {
			return false, err
		}
		if _, _, err := billing.Post(ctx, tx, s.pol, ledger.Entry{OrgID: sess.OrgID, Currency: sess.Currency, AmountMinor: sess.AmountMinor,
			Type: ledger.CreditPurchase, IdempotencyKey: "payment:" + sess.ID.String(), Reference: sess.ID.String(),
			Description: "Top-up via " + instance}, s.now()); err != nil {
			return false, err
		}
		if ev.CustomerRef != "" {
			if _, err := tx.Exec(ctx, `UPDATE billing_accounts SET customer_ref = $2 WHERE org_id = $1 AND customer_ref = ''`, sess.OrgID, ev.CustomerRef); err != nil {
				return false, err
			}
		}
		return true, s.move(ctx, tx, sess, StatusCredited, "")
	case sdkpay.EventCheckoutExpired:
		if sess.Status == StatusInitiated {
			return false, s.move(ctx, tx, sess, StatusExpired, "the checkout expired unpaid")
		}
	case sdkpay.EventPaymentFailed:
		if sess.Status == StatusInitiated {
			_, err := tx.Exec(ctx, `UPDATE payment_sessions SET status_reason = 'payment failed', updated_at = now() WHERE id = $1`, sess.ID)
			return false, err
		}
	}
	return false, nil
}

// move changes a session's status, audits it and announces it.
func (s *Service) move(ctx context.Context, tx pgx.Tx, sess *Session, to, reason string) error {
	if _, err := tx.Exec(ctx, `UPDATE payment_sessions SET status = $2, status_reason = $3, updated_at = now() WHERE id = $1`, sess.ID, to, reason); err != nil {
		return err
	}
	from := sess.Status
	sess.Status, sess.StatusReason = to, reason
	if err := audit.Record(ctx, tx, audit.Entry{Action: "payment.session." + to, Target: s.target(sess),
		Details: map[string]any{"from": from, "reason": reason}}); err != nil {
		return err
	}
	_, err := events.Enqueue(ctx, tx, events.Event{Subject: events.SubjectPaymentsSessionUpdated,
		Payload: SessionUpdated{SessionID: sess.ID.String(), OrgID: sess.OrgID.String(), Status: to, AmountMinor: sess.AmountMinor, Currency: sess.Currency}})
	return err
}
