// Package payments turns prepaid top-ups into ledger credits. A payment session
// follows initiated → checkout_completed → credited, or initiated → expired, and a
// paid session whose amount or currency differs from what was asked goes to
// failed_reconcile for an admin. Provider webhooks are verified by the payments
// driver; each provider event is handled once, however often it is delivered.
package payments

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/gpuaas/gpuaas/core/internal/audit"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/ledger"
	"github.com/gpuaas/gpuaas/core/internal/policy"
	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/rid"
	"github.com/gpuaas/gpuaas/core/internal/store"
	"github.com/gpuaas/gpuaas/sdk/base"
	sdkpay "github.com/gpuaas/gpuaas/sdk/payments"
)

// Error codes.
const (
	CodeTopUpOutOfRange     errcode.Code = "topup_out_of_range"
	CodeSessionNotFound     errcode.Code = "payment_session_not_found"
	CodeProviderNotFound    errcode.Code = "payment_provider_not_found"
	CodeWebhookInvalid      errcode.Code = "webhook_invalid"
	CodeRefundInvalidAmount errcode.Code = "refund_invalid_amount"
	CodeRefundNotAllowed    errcode.Code = "refund_not_allowed"
	CodeProviderFailed      errcode.Code = "payment_provider_error"
	CodeNoCustomer          errcode.Code = "payment_customer_missing"
)

// Codes lists this package's codes for the contract test.
func Codes() []errcode.Code {
	return []errcode.Code{CodeTopUpOutOfRange, CodeSessionNotFound, CodeProviderNotFound, CodeWebhookInvalid,
		CodeRefundInvalidAmount, CodeRefundNotAllowed, CodeProviderFailed, CodeNoCustomer}
}

// Session states.
const (
	StatusInitiated         = "initiated"
	StatusCheckoutCompleted = "checkout_completed"
	StatusCredited          = "credited"
	StatusExpired           = "expired"
	StatusFailedReconcile   = "failed_reconcile"
)

// Providers finds the payments driver of a configured instance.
type Providers interface {
	Payments(ctx context.Context, instance string) (sdkpay.Driver, error)
}

// Service runs top-ups, webhooks and refunds.
type Service struct {
	pool      *pgxpool.Pool
	pol       *policy.Service
	providers Providers
	ids       rid.Builder
	log       hclog.Logger
	now       func() time.Time
	// Default is the payments instance used for new top-ups.
	Default string
}

// NewService returns a Service.
func NewService(pool *pgxpool.Pool, pol *policy.Service, providers Providers, region, defaultInstance string, log hclog.Logger) *Service {
	return &Service{pool: pool, pol: pol, providers: providers, ids: rid.Builder{Region: region}, log: log, now: time.Now, Default: defaultInstance}
}

// checkoutTTL is how long a checkout stays open (Stripe allows 30 min to 24 h).
const checkoutTTL = time.Hour

// Session is a payment session.
type Session struct {
	ID               uuid.UUID  `json:"id"`
	OrgID            uuid.UUID  `json:"org_id"`
	ProviderInstance string     `json:"provider_instance"`
	ProviderSession  string     `json:"provider_session"`
	AmountMinor      int64      `json:"amount_minor"`
	Currency         string     `json:"currency"`
	Status           string     `json:"status"`
	StatusReason     string     `json:"status_reason"`
	CheckoutURL      string     `json:"checkout_url"`
	RefundedMinor    int64      `json:"refunded_minor"`
	CreatedAt        time.Time  `json:"created_at"`
	UpdatedAt        time.Time  `json:"updated_at"`
	ExpiresAt        *time.Time `json:"expires_at,omitempty"`
}

const sessionColumns = `id, org_id, provider_instance, provider_session, amount_minor, currency, status, status_reason, checkout_url, refunded_minor, created_at, updated_at, expires_at`

func scanSession(row pgx.Row) (*Session, error) {
	s := &Session{}
	err := row.Scan(&s.ID, &s.OrgID, &s.ProviderInstance, &s.ProviderSession, &s.AmountMinor, &s.Currency, &s.Status, &s.StatusReason,
		&s.CheckoutURL, &s.RefundedMinor, &s.CreatedAt, &s.UpdatedAt, &s.ExpiresAt)
	return s, err
}

func (s *Service) provider(ctx context.Context, instance string) (sdkpay.Driver, error) {
	if s.providers == nil || instance == "" {
		return nil, errcode.New(CodeProviderNotFound, "no payments provider is configured")
	}
	d, err := s.providers.Payments(ctx, instance)
	if err != nil {
		return nil, errcode.Wrap(err, CodeProviderNotFound, fmt.Sprintf("payments provider %q is not available", instance))
	}
	return d, nil
}

// CheckoutRequest asks for a top-up.
type CheckoutRequest struct {
	OrgID       uuid.UUID
	AmountMinor int64
	SuccessURL  string
	CancelURL   string
}

// CreateCheckout opens a payment session for a top-up within the org's policy
// bounds and returns it with the provider's checkout URL.
func (s *Service) CreateCheckout(ctx context.Context, req CheckoutRequest) (*Session, error) {
	t := policy.Target{OrgID: req.OrgID.String()}
	lo, err := policy.TopUpMin.Get(ctx, s.pol, t)
	if err != nil {
		return nil, err
	}
	hi, err := policy.TopUpMax.Get(ctx, s.pol, t)
	if err != nil {
		return nil, err
	}
	if req.AmountMinor < lo || req.AmountMinor > hi {
		return nil, errcode.New(CodeTopUpOutOfRange, "a top-up must be between %d and %d minor units", lo, hi).
			WithDetails("field", "amount_minor").WithDetails("min", lo).WithDetails("max", hi)
	}
	d, err := s.provider(ctx, s.Default)
	if err != nil {
		return nil, err
	}
	currency, err := policy.DefaultCurrency.Get(ctx, s.pol, policy.Target{})
	if err != nil {
		return nil, err
	}
	sess := &Session{ID: uuid.Must(uuid.NewV7()), OrgID: req.OrgID, ProviderInstance: s.Default, AmountMinor: req.AmountMinor, Status: StatusInitiated}
	var customer string
	err = store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		cur, err := ledger.EnsureAccount(ctx, tx, req.OrgID, currency)
		if err != nil {
			return err
		}
		sess.Currency = cur
		if err := tx.QueryRow(ctx, `SELECT customer_ref FROM billing_accounts WHERE org_id = $1`, req.OrgID).Scan(&customer); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `INSERT INTO payment_sessions (id, org_id, provider_instance, amount_minor, currency, status, created_by)
			VALUES ($1, $2, $3, $4, $5, 'initiated', $6)`, sess.ID, req.OrgID, s.Default, req.AmountMinor, cur, actorOf(ctx)); err != nil {
			return err
		}
		return audit.Record(ctx, tx, audit.Entry{Action: "payment.checkout.create", Target: s.target(sess),
			Details: map[string]any{"amount_minor": req.AmountMinor, "currency": cur}})
	})
	if err != nil {
		return nil, fmt.Errorf("payments: checkout: %w", err)
	}
	// The expiry is chosen once per session (the session id's time + 1 h) so a
	// retried call sends identical arguments.
	askExpiry := time.Unix(sess.ID.Time().UnixTime()).Add(checkoutTTL).UTC().Truncate(time.Second)
	cs, err := d.CreateCheckout(ctx, &sdkpay.CheckoutRequest{OperationID: sess.ID.String(), OrgID: req.OrgID.String(), CustomerRef: customer,
		AmountMinor: req.AmountMinor, Currency: sess.Currency, SuccessURL: req.SuccessURL, CancelURL: req.CancelURL,
		ExpiresAt: askExpiry, Metadata: map[string]string{"gpuaas_session": sess.ID.String()}})
	if err != nil {
		// The session stays initiated without a provider session; the admin queue
		// shows it and it expires.
		s.markFailed(ctx, sess.ID, err)
		return nil, providerError(err)
	}
	expires := &askExpiry
	if cs.ExpiresAt.After(s.now()) {
		e := cs.ExpiresAt.UTC()
		expires = &e
	}
	row := s.pool.QueryRow(ctx, `UPDATE payment_sessions SET provider_session = $2, checkout_url = $3, expires_at = $4, updated_at = now()
		WHERE id = $1 RETURNING `+sessionColumns, sess.ID, cs.SessionID, cs.URL, expires)
	out, err := scanSession(row)
	if err != nil {
		return nil, fmt.Errorf("payments: checkout: %w", err)
	}
	if ref := cs.CustomerRef; ref != "" && ref != customer {
		if _, err := s.pool.Exec(ctx, `UPDATE billing_accounts SET customer_ref = $2 WHERE org_id = $1 AND customer_ref = ''`, req.OrgID, ref); err != nil {
			s.log.Warn("remember provider customer", "org_id", req.OrgID, "error", err)
		}
	}
	return out, nil
}

func (s *Service) markFailed(ctx context.Context, id uuid.UUID, cause error) {
	_, err := s.pool.Exec(context.WithoutCancel(ctx), `UPDATE payment_sessions SET status_reason = $2, updated_at = now() WHERE id = $1`, id, truncate("provider refused the checkout: "+cause.Error(), 500))
	if err != nil {
		s.log.Warn("record checkout failure", "session_id", id, "error", err)
	}
}

func providerError(err error) error {
	switch {
	case errors.Is(err, base.ErrInvalidArgument):
		return errcode.Wrap(err, errcode.ValidationFailed, "the payments provider refused the request: "+err.Error())
	case errors.Is(err, base.ErrUnavailable), errors.Is(err, base.ErrPluginExited):
		return errcode.Wrap(err, errcode.ServiceUnavailable, "the payments provider is unavailable; retry shortly")
	}
	return errcode.Wrap(err, CodeProviderFailed, "the payments provider failed")
}

func (s *Service) target(sess *Session) rid.ID {
	return s.ids.InOrg(sess.OrgID.String(), "payment_session", sess.ID.String())
}

func actorOf(ctx context.Context) string {
	if p := principal.From(ctx); p != nil {
		return p.Actor()
	}
	return "system"
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// Get returns a session.
func (s *Service) Get(ctx context.Context, id uuid.UUID) (*Session, error) {
	sess, err := scanSession(s.pool.QueryRow(ctx, `SELECT `+sessionColumns+` FROM payment_sessions WHERE id = $1`, id))
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, errcode.New(CodeSessionNotFound, "payment session not found")
	}
	return sess, err
}

// ListFilter selects sessions for the admin queue.
type ListFilter struct {
	Statuses []string
	OrgID    uuid.UUID
	Before   uuid.UUID
	Limit    int
}

// List returns sessions newest first, up to Limit+1.
func (s *Service) List(ctx context.Context, f ListFilter) ([]*Session, error) {
	before := f.Before
	if before == uuid.Nil {
		before = uuid.Max
	}
	rows, err := s.pool.Query(ctx, `SELECT `+sessionColumns+` FROM payment_sessions
		WHERE (cardinality($1::text[]) = 0 OR status = ANY($1)) AND ($2 = '00000000-0000-0000-0000-000000000000'::uuid OR org_id = $2) AND id < $3
		ORDER BY id DESC LIMIT $4`, f.Statuses, f.OrgID, before, f.Limit+1)
	if err != nil {
		return nil, fmt.Errorf("payments: list: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (*Session, error) { return scanSession(r) })
}

// Portal opens the provider's customer portal for an org that has paid before.
func (s *Service) Portal(ctx context.Context, org uuid.UUID, returnURL string) (string, error) {
	var customer string
	err := s.pool.QueryRow(ctx, `SELECT customer_ref FROM billing_accounts WHERE org_id = $1`, org).Scan(&customer)
	if errors.Is(err, pgx.ErrNoRows) || (err == nil && customer == "") {
		return "", errcode.New(CodeNoCustomer, "the organization has no payment history with the provider yet; top up first")
	}
	if err != nil {
		return "", fmt.Errorf("payments: portal: %w", err)
	}
	d, err := s.provider(ctx, s.Default)
	if err != nil {
		return "", err
	}
	pc, ok := d.(sdkpay.PortalCreator)
	if !ok {
		return "", errcode.New(CodeProviderNotFound, "the payments provider has no customer portal")
	}
	p, err := pc.CreatePortal(ctx, &sdkpay.PortalRequest{OperationID: uuid.NewString(), OrgID: org.String(), CustomerRef: customer, ReturnURL: returnURL})
	if err != nil {
		return "", providerError(err)
	}
	return p.URL, nil
}
