// Package instantpay is an example payments driver with no provider behind
// it: checkout and portal sessions are URLs on a configured base, webhooks
// are JSON signed with HMAC-SHA256 the way Stripe signs them, and refunds
// succeed at once for sessions a verified webhook reported paid. It exists
// for the conformance kit's own tests and the plugin author guide; it is
// not registered anywhere by default. State lives in memory.
package instantpay

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/payments"
)

// Version is the driver's release version.
const Version = "0.1.0"

// SignatureHeader carries a webhook's signature: "t=<unix seconds>,v1=<hex
// HMAC-SHA256 of "<t>.<body>" keyed with webhook_secret>".
const SignatureHeader = "Instantpay-Signature"

// WebhookTolerance is how far a webhook's timestamp may be from now.
const WebhookTolerance = 5 * time.Minute

// Driver is the instantpay payments driver.
type Driver struct {
	logger hclog.Logger
	now    func() time.Time

	mu       sync.Mutex
	cfg      *settings
	sessions map[string]*session // by session id
	ops      map[string]*opRecord
}

var (
	_ payments.Driver        = (*Driver)(nil)
	_ payments.PortalCreator = (*Driver)(nil)
	_ payments.Refunder      = (*Driver)(nil)
)

type settings struct {
	webhookSecret []byte
	baseURL       *url.URL
	sessionTTL    time.Duration
	callDelay     time.Duration
}

type session struct {
	req      payments.CheckoutRequest
	paid     bool
	refunded int64
}

type opRecord struct {
	fingerprint string
	result      any
}

// Option configures a Driver.
type Option func(*Driver)

// WithClock sets the clock.
func WithClock(now func() time.Time) Option { return func(d *Driver) { d.now = now } }

// New returns an unconfigured driver.
func New(logger hclog.Logger, opts ...Option) *Driver {
	d := &Driver{logger: logger, now: time.Now, sessions: map[string]*session{}, ops: map[string]*opRecord{}}
	for _, o := range opts {
		o(d)
	}
	return d
}

// Info implements base.BasePlugin.
func (d *Driver) Info(context.Context) (*base.Info, error) {
	return &base.Info{
		Name:          "instantpay",
		Kind:          base.KindPayments,
		DriverVersion: Version,
		APIVersions:   payments.SupportedAPIVersions(),
	}, nil
}

// ConfigSchema implements base.BasePlugin.
func (d *Driver) ConfigSchema(context.Context) (*base.ConfigSchema, error) {
	return &base.ConfigSchema{Fields: []base.Field{
		{Name: "webhook_secret", Type: base.TypeSecret, Required: true, Description: "Key of the HMAC-SHA256 webhook signature."},
		{Name: "base_url", Type: base.TypeURL, Default: "https://pay.example.invalid", Description: "Where checkout and portal URLs point."},
		{Name: "session_ttl", Type: base.TypeDuration, Default: "30m", Description: "How long a checkout session stays open."},
		{Name: "call_delay", Type: base.TypeDuration, Default: "0s", Description: "How long every call waits before answering (honours cancellation)."},
	}}, nil
}

// Configure implements base.BasePlugin.
func (d *Driver) Configure(_ context.Context, cfg *base.Config) error {
	s := &settings{
		webhookSecret: []byte(cfg.String("webhook_secret")),
		baseURL:       cfg.URL("base_url"),
		sessionTTL:    cfg.Duration("session_ttl"),
		callDelay:     cfg.Duration("call_delay"),
	}
	switch {
	case len(s.webhookSecret) < 16:
		return &base.ConfigError{Field: "webhook_secret", Reason: "shorter than 16 bytes"}
	case s.sessionTTL <= 0:
		return &base.ConfigError{Field: "session_ttl", Reason: "must be positive"}
	case s.callDelay < 0:
		return &base.ConfigError{Field: "call_delay", Reason: "negative"}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.cfg = s
	d.logger.Info("configured", "instance", cfg.Instance, "api_version", cfg.APIVersion)
	return nil
}

func (d *Driver) enter(ctx context.Context) (*settings, error) {
	d.mu.Lock()
	s := d.cfg
	d.mu.Unlock()
	if s == nil {
		return nil, fmt.Errorf("instantpay: not configured: %w", base.ErrFailedPrecondition)
	}
	if s.callDelay > 0 {
		t := time.NewTimer(s.callDelay)
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
			return nil, fmt.Errorf("instantpay: %w", ctx.Err())
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("instantpay: %w", err)
	}
	return s, nil
}

func idFor(prefix, operationID string) string {
	sum := sha256.Sum256([]byte(prefix + "\x00" + operationID))
	return prefix + "_" + hex.EncodeToString(sum[:12])
}

// replay returns the recorded result of operationID, ErrConflict when it
// was used for another request, or nil when it is new. Call with d.mu held.
func (d *Driver) replay(operationID, fingerprint string) (any, error) {
	rec, ok := d.ops[operationID]
	if !ok {
		return nil, nil
	}
	if rec.fingerprint != fingerprint {
		return nil, fmt.Errorf("instantpay: operation %q was used for another request: %w", operationID, base.ErrConflict)
	}
	return rec.result, nil
}

func fingerprint(parts ...string) string { return strings.Join(parts, "\x00") }

func metadataFingerprint(m map[string]string) string {
	keys := slices.Sorted(maps.Keys(m))
	var b strings.Builder
	for _, k := range keys {
		b.WriteString(k + "=" + m[k] + ";")
	}
	return b.String()
}

// CreateCheckout implements payments.Driver.
func (d *Driver) CreateCheckout(ctx context.Context, req *payments.CheckoutRequest) (*payments.CheckoutSession, error) {
	s, err := d.enter(ctx)
	if err != nil {
		return nil, err
	}
	fp := fingerprint("checkout", req.OrgID, req.CustomerRef, strconv.FormatInt(req.AmountMinor, 10), req.Currency,
		req.SuccessURL, req.CancelURL, metadataFingerprint(req.Metadata))
	d.mu.Lock()
	defer d.mu.Unlock()
	if prev, err := d.replay(req.OperationID, fp); err != nil || prev != nil {
		if err != nil {
			return nil, err
		}
		out := prev.(payments.CheckoutSession)
		return &out, nil
	}
	id := idFor("cs", req.OperationID)
	sess := payments.CheckoutSession{
		SessionID: id,
		URL:       s.baseURL.JoinPath("checkout", id).String(),
		ExpiresAt: d.now().Add(s.sessionTTL).UTC(),
	}
	d.sessions[id] = &session{req: *req}
	d.ops[req.OperationID] = &opRecord{fingerprint: fp, result: sess}
	d.logger.Info("checkout created", "session_id", id, "org_id", req.OrgID, "operation_id", req.OperationID)
	return &sess, nil
}

// CreatePortal implements payments.PortalCreator.
func (d *Driver) CreatePortal(ctx context.Context, req *payments.PortalRequest) (*payments.PortalSession, error) {
	s, err := d.enter(ctx)
	if err != nil {
		return nil, err
	}
	fp := fingerprint("portal", req.OrgID, req.CustomerRef, req.ReturnURL)
	d.mu.Lock()
	defer d.mu.Unlock()
	if prev, err := d.replay(req.OperationID, fp); err != nil || prev != nil {
		if err != nil {
			return nil, err
		}
		out := prev.(payments.PortalSession)
		return &out, nil
	}
	ps := payments.PortalSession{
		URL:       s.baseURL.JoinPath("portal", idFor("ps", req.OperationID)).String(),
		ExpiresAt: d.now().Add(s.sessionTTL).UTC(),
	}
	d.ops[req.OperationID] = &opRecord{fingerprint: fp, result: ps}
	return &ps, nil
}

// Refund implements payments.Refunder.
func (d *Driver) Refund(ctx context.Context, req *payments.RefundRequest) (*payments.Refund, error) {
	if _, err := d.enter(ctx); err != nil {
		return nil, err
	}
	fp := fingerprint("refund", req.SessionID, strconv.FormatInt(req.AmountMinor, 10), req.Currency, req.Reason)
	d.mu.Lock()
	defer d.mu.Unlock()
	if prev, err := d.replay(req.OperationID, fp); err != nil || prev != nil {
		if err != nil {
			return nil, err
		}
		out := prev.(payments.Refund)
		return &out, nil
	}
	sess, ok := d.sessions[req.SessionID]
	switch {
	case !ok:
		return nil, fmt.Errorf("instantpay: refund: session %q: %w", req.SessionID, base.ErrNotFound)
	case !sess.paid:
		return nil, fmt.Errorf("instantpay: refund: session %q is not paid: %w", req.SessionID, base.ErrFailedPrecondition)
	case req.Currency != sess.req.Currency:
		return nil, fmt.Errorf("instantpay: refund: currency %s, session paid in %s: %w", req.Currency, sess.req.Currency, base.ErrInvalidArgument)
	case sess.refunded+req.AmountMinor > sess.req.AmountMinor:
		return nil, fmt.Errorf("instantpay: refund: %d more than the %d left to refund: %w",
			req.AmountMinor, sess.req.AmountMinor-sess.refunded, base.ErrInvalidArgument)
	}
	sess.refunded += req.AmountMinor
	r := payments.Refund{RefundID: idFor("re", req.OperationID), Status: payments.RefundSucceeded, AmountMinor: req.AmountMinor, Currency: req.Currency}
	d.ops[req.OperationID] = &opRecord{fingerprint: fp, result: r}
	return &r, nil
}

// WebhookEvent is the JSON body of an instantpay webhook.
type WebhookEvent struct {
	ID            string            `json:"id"`
	Type          string            `json:"type"` // a payments.EventType, or anything else to be ignored
	SessionID     string            `json:"session_id"`
	OrgID         string            `json:"org_id,omitempty"`
	CustomerRef   string            `json:"customer_ref,omitempty"`
	AmountMinor   int64             `json:"amount_minor"`
	Currency      string            `json:"currency"`
	PaymentStatus string            `json:"payment_status,omitempty"`
	RefundID      string            `json:"refund_id,omitempty"`
	Created       int64             `json:"created"`
	Metadata      map[string]string `json:"metadata,omitempty"`
}

// Sign returns the SignatureHeader value for body at time t.
func Sign(secret []byte, t time.Time, body []byte) string {
	ts := strconv.FormatInt(t.Unix(), 10)
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte(ts + "."))
	mac.Write(body)
	return "t=" + ts + ",v1=" + hex.EncodeToString(mac.Sum(nil))
}

// SignedWebhook builds a signed webhook for event, as the provider would.
func SignedWebhook(secret []byte, now time.Time, event WebhookEvent) (*payments.Webhook, error) {
	body, err := json.Marshal(event)
	if err != nil {
		return nil, fmt.Errorf("instantpay: webhook: %w", err)
	}
	h := http.Header{}
	h.Set("Content-Type", "application/json")
	h.Set(SignatureHeader, Sign(secret, now, body))
	return &payments.Webhook{Body: body, Header: h}, nil
}

func verify(secret []byte, now time.Time, hook *payments.Webhook) error {
	sig := hook.Header.Get(SignatureHeader)
	if sig == "" {
		return fmt.Errorf("instantpay: webhook: no %s header: %w", SignatureHeader, base.ErrUnauthenticated)
	}
	var ts, v1 string
	for _, part := range strings.Split(sig, ",") {
		k, v, _ := strings.Cut(part, "=")
		switch k {
		case "t":
			ts = v
		case "v1":
			v1 = v
		}
	}
	sec, err := strconv.ParseInt(ts, 10, 64)
	if err != nil {
		return fmt.Errorf("instantpay: webhook: bad signature timestamp: %w", base.ErrUnauthenticated)
	}
	if age := now.Sub(time.Unix(sec, 0)); age > WebhookTolerance || age < -WebhookTolerance {
		return fmt.Errorf("instantpay: webhook: signature timestamp outside tolerance: %w", base.ErrUnauthenticated)
	}
	want := Sign(secret, time.Unix(sec, 0), hook.Body)
	if !hmac.Equal([]byte(want), []byte("t="+ts+",v1="+v1)) {
		return fmt.Errorf("instantpay: webhook: signature mismatch: %w", base.ErrUnauthenticated)
	}
	return nil
}

// HandleWebhook implements payments.Driver.
func (d *Driver) HandleWebhook(ctx context.Context, hook *payments.Webhook) ([]payments.Event, error) {
	s, err := d.enter(ctx)
	if err != nil {
		return nil, err
	}
	if err := verify(s.webhookSecret, d.now(), hook); err != nil {
		return nil, err
	}
	var ev WebhookEvent
	if err := json.Unmarshal(hook.Body, &ev); err != nil {
		return nil, fmt.Errorf("instantpay: webhook: %v: %w", err, base.ErrInvalidArgument)
	}
	if ev.ID == "" {
		return nil, fmt.Errorf("instantpay: webhook: event without id: %w", base.ErrInvalidArgument)
	}
	typ := payments.EventType(ev.Type)
	switch typ {
	case payments.EventCheckoutCompleted, payments.EventCheckoutExpired, payments.EventPaymentFailed,
		payments.EventRefundSucceeded, payments.EventRefundFailed:
	default:
		return nil, nil // verified, but nothing the core needs
	}
	if typ == payments.EventCheckoutCompleted && ev.PaymentStatus == string(payments.StatusPaid) {
		d.mu.Lock()
		if sess, ok := d.sessions[ev.SessionID]; ok {
			sess.paid = true
		}
		d.mu.Unlock()
	}
	return []payments.Event{{
		ID:            ev.ID,
		Type:          typ,
		SessionID:     ev.SessionID,
		OrgID:         ev.OrgID,
		CustomerRef:   ev.CustomerRef,
		AmountMinor:   ev.AmountMinor,
		Currency:      ev.Currency,
		PaymentStatus: payments.PaymentStatus(ev.PaymentStatus),
		RefundID:      ev.RefundID,
		OccurredAt:    time.Unix(ev.Created, 0).UTC(),
		Metadata:      ev.Metadata,
	}}, nil
}
