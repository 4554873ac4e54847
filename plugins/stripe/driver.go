// Package stripe is the gpuaas payments driver for Stripe: prepaid-credit
// top-ups through Stripe Checkout, the Stripe customer portal, refunds, and
// the translation of Stripe webhooks into payment events.
//
// The driver keeps no state that matters: every call that changes something
// at Stripe carries an Idempotency-Key (the core's operation id; for
// customers, one derived from the org id), so a call the core retries after
// a crash or a restart of this process has one effect. Each org gets one
// Stripe customer; the driver returns its id in CheckoutSession.CustomerRef
// and the core passes it back on later calls.
//
// Every configured instance talks to Stripe through its own backend (no
// stripe-go globals), so one process may serve several accounts over time.
package stripe

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"maps"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	stripeapi "github.com/stripe/stripe-go/v76"
	billingportalsession "github.com/stripe/stripe-go/v76/billingportal/session"
	checkoutsession "github.com/stripe/stripe-go/v76/checkout/session"
	"github.com/stripe/stripe-go/v76/customer"
	"github.com/stripe/stripe-go/v76/refund"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/payments"
)

// Version is the driver's release version.
const Version = "0.1.0"

// DefaultAPIBase is Stripe's API.
const DefaultAPIBase = "https://api.stripe.com"

// Metadata keys the driver sets on Checkout Sessions, their PaymentIntents,
// customers and refunds. They override the same keys in
// CheckoutRequest.Metadata.
const (
	MetaOrgID       = "org_id"
	MetaOperationID = "operation_id"
	MetaSessionID   = "checkout_session_id"
	MetaReason      = "reason"
)

const (
	// lineItemName is what the tenant sees on Stripe's checkout page.
	lineItemName = "Prepaid credit"
	// opMemory is how long the driver remembers an operation's result. It
	// matches the time Stripe keeps idempotency keys; Stripe's memory,
	// not this one, is what makes a retry after a restart safe.
	opMemory = 24 * time.Hour
	// memorySize bounds each of the driver's memories.
	memorySize = 10000
	// maxIdempotencyKey is Stripe's limit on an Idempotency-Key.
	maxIdempotencyKey = 255
	// httpTimeout bounds one HTTP request to Stripe (stripe-go's default).
	httpTimeout = 80 * time.Second
)

// Driver is the Stripe payments driver. Build it with New; it serves calls
// once Configure has succeeded.
type Driver struct {
	logger     hclog.Logger
	now        func() time.Time
	httpClient *http.Client
	retries    int64

	mu  sync.Mutex
	cfg *settings
}

var (
	_ payments.Driver        = (*Driver)(nil)
	_ payments.PortalCreator = (*Driver)(nil)
	_ payments.Refunder      = (*Driver)(nil)
)

// settings is one applied configuration with the clients and memories that
// belong to its Stripe account.
type settings struct {
	secretKey     string
	webhookSecret string
	apiBase       string

	checkout  checkoutsession.Client
	customers customer.Client
	portal    billingportalsession.Client
	refunds   refund.Client

	// ops remembers the results of recent calls by operation id, so a
	// retry is answered without a round trip and a reused id with other
	// arguments is refused even by a backend that does not implement
	// idempotency keys (stripe-mock).
	ops *memory
	// orgCustomers remembers the customer made for an org.
	orgCustomers *memory
}

// sameAccount reports whether o talks to the same Stripe account as s.
func (s *settings) sameAccount(o *settings) bool {
	return s.secretKey == o.secretKey && s.apiBase == o.apiBase
}

// Option configures a Driver.
type Option func(*Driver)

// WithClock sets the clock used for webhook timestamps and the driver's
// memory of recent operations.
func WithClock(now func() time.Time) Option { return func(d *Driver) { d.now = now } }

// WithHTTPClient sets the HTTP client used to call Stripe.
func WithHTTPClient(c *http.Client) Option { return func(d *Driver) { d.httpClient = c } }

// WithNetworkRetries sets how often stripe-go retries a request that failed
// on the network or with a retryable status (default 2). Every retried
// request carries its idempotency key.
func WithNetworkRetries(n int64) Option { return func(d *Driver) { d.retries = n } }

// New returns an unconfigured driver that logs to logger.
func New(logger hclog.Logger, opts ...Option) *Driver {
	d := &Driver{
		logger:     logger,
		now:        time.Now,
		httpClient: &http.Client{Timeout: httpTimeout},
		retries:    stripeapi.DefaultMaxNetworkRetries,
	}
	for _, o := range opts {
		o(d)
	}
	return d
}

// Info implements base.BasePlugin.
func (d *Driver) Info(context.Context) (*base.Info, error) {
	return &base.Info{
		Name:          "stripe",
		Kind:          base.KindPayments,
		DriverVersion: Version,
		APIVersions:   payments.SupportedAPIVersions(),
	}, nil
}

// ConfigSchema implements base.BasePlugin.
func (d *Driver) ConfigSchema(context.Context) (*base.ConfigSchema, error) {
	return &base.ConfigSchema{Fields: []base.Field{
		{Name: "secret_key", Type: base.TypeSecret, Required: true,
			Description: "Stripe secret key (sk_test_…, sk_live_…) or restricted key (rk_…) allowed to write Customers, Checkout Sessions, customer portal sessions and Refunds."},
		{Name: "webhook_secret", Type: base.TypeSecret, Required: true,
			Description: "Signing secret (whsec_…) of the Stripe webhook endpoint that delivers to this instance."},
		{Name: "api_base", Type: base.TypeURL, Default: DefaultAPIBase,
			Description: "Base URL of the Stripe API. Change it only to point a test key at stripe-mock."},
	}}, nil
}

// Configure implements base.BasePlugin. Errors name the field and never
// repeat a secret.
func (d *Driver) Configure(_ context.Context, cfg *base.Config) error {
	s := &settings{
		secretKey:     cfg.String("secret_key"),
		webhookSecret: cfg.String("webhook_secret"),
		apiBase:       strings.TrimRight(cfg.String("api_base"), "/"),
	}
	if s.apiBase == "" {
		s.apiBase = DefaultAPIBase
	}
	if err := checkSecret("secret_key", s.secretKey, []string{"sk_test_", "sk_live_", "rk_"},
		"not a Stripe secret key: want one starting with sk_test_, sk_live_ or rk_ (publishable pk_ keys cannot create sessions)"); err != nil {
		return err
	}
	if err := checkSecret("webhook_secret", s.webhookSecret, []string{"whsec_"},
		"not a Stripe webhook signing secret: want one starting with whsec_"); err != nil {
		return err
	}
	u, err := url.Parse(s.apiBase)
	switch {
	case err != nil || u.Host == "":
		return &base.ConfigError{Field: "api_base", Reason: "not an absolute URL"}
	case u.Scheme != "https" && u.Scheme != "http":
		return &base.ConfigError{Field: "api_base", Reason: fmt.Sprintf("scheme %q: want https (or http for a local stripe-mock)", u.Scheme)}
	case u.RawQuery != "" || u.Fragment != "" || u.User != nil:
		return &base.ConfigError{Field: "api_base", Reason: "must not carry credentials, a query or a fragment"}
	case u.Scheme != "https" && !strings.Contains(s.secretKey, "_test_"):
		return &base.ConfigError{Field: "api_base", Reason: "a live key is only ever sent over https"}
	}

	backend := stripeapi.GetBackendWithConfig(stripeapi.APIBackend, &stripeapi.BackendConfig{
		URL:        stripeapi.String(s.apiBase),
		HTTPClient: d.httpClient,
		// stripe-go logs response bodies at debug level; the driver logs
		// what it needs itself.
		LeveledLogger:     &stripeapi.LeveledLogger{Level: stripeapi.LevelNull},
		MaxNetworkRetries: stripeapi.Int64(d.retries),
		EnableTelemetry:   stripeapi.Bool(false),
	})
	s.checkout = checkoutsession.Client{B: backend, Key: s.secretKey}
	s.customers = customer.Client{B: backend, Key: s.secretKey}
	s.portal = billingportalsession.Client{B: backend, Key: s.secretKey}
	s.refunds = refund.Client{B: backend, Key: s.secretKey}

	d.mu.Lock()
	defer d.mu.Unlock()
	if prev := d.cfg; prev != nil && prev.sameAccount(s) {
		s.ops, s.orgCustomers = prev.ops, prev.orgCustomers
	} else {
		s.ops = newMemory(opMemory, memorySize, d.now)
		s.orgCustomers = newMemory(opMemory, memorySize, d.now)
	}
	d.cfg = s
	mode := "live"
	if strings.Contains(s.secretKey, "_test_") {
		mode = "test"
	}
	d.logger.Info("configured", "instance", cfg.Instance, "api_version", cfg.APIVersion,
		"api_host", u.Host, "key_mode", mode)
	return nil
}

func checkSecret(field, value string, prefixes []string, reason string) error {
	if value != strings.TrimSpace(value) {
		return &base.ConfigError{Field: field, Reason: "has leading or trailing white space"}
	}
	for _, p := range prefixes {
		if strings.HasPrefix(value, p) && len(value) > len(p) {
			return nil
		}
	}
	return &base.ConfigError{Field: field, Reason: reason}
}

// enter returns the configuration a call runs with.
func (d *Driver) enter(ctx context.Context, call string) (*settings, error) {
	d.mu.Lock()
	s := d.cfg
	d.mu.Unlock()
	if s == nil {
		return nil, fmt.Errorf("stripe: %s: not configured: %w", call, base.ErrFailedPrecondition)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("stripe: %s: %w", call, err)
	}
	return s, nil
}

var currencyRE = regexp.MustCompile(`^[A-Z]{3}$`)

func invalid(format string, args ...any) error {
	return fmt.Errorf("%s: %w", fmt.Sprintf(format, args...), base.ErrInvalidArgument)
}

func checkOperationID(id string) error {
	switch {
	case id == "":
		return invalid("operation id: empty")
	case len(id) > maxIdempotencyKey:
		return invalid("operation id: longer than Stripe's %d-character idempotency key", maxIdempotencyKey)
	}
	return nil
}

func checkMoney(amount int64, currency string) error {
	if amount <= 0 {
		return invalid("amount %d: not positive", amount)
	}
	if !currencyRE.MatchString(currency) {
		return invalid("currency %q: want an upper-case ISO 4217 code", currency)
	}
	return nil
}

func checkURL(what, raw string, required bool) error {
	if raw == "" {
		if required {
			return invalid("%s: empty", what)
		}
		return nil
	}
	u, err := url.Parse(raw)
	if err != nil || !u.IsAbs() || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") {
		return invalid("%s %q: want an absolute http(s) URL", what, raw)
	}
	return nil
}

func validateCheckout(req *payments.CheckoutRequest) error {
	if err := checkOperationID(req.OperationID); err != nil {
		return err
	}
	if req.OrgID == "" {
		return invalid("org id: empty")
	}
	if err := checkMoney(req.AmountMinor, req.Currency); err != nil {
		return err
	}
	if err := checkURL("success url", req.SuccessURL, true); err != nil {
		return err
	}
	return checkURL("cancel url", req.CancelURL, false)
}

// fingerprint identifies the arguments of a call, to tell a retry from a
// reused operation id.
func fingerprint(parts ...string) string {
	h := sha256.New()
	for _, p := range parts {
		h.Write([]byte(strconv.Itoa(len(p))))
		h.Write([]byte{':'})
		h.Write([]byte(p))
	}
	return hex.EncodeToString(h.Sum(nil))
}

func metadataFingerprint(m map[string]string) string {
	var b strings.Builder
	for _, k := range slices.Sorted(maps.Keys(m)) {
		fmt.Fprintf(&b, "%d:%s=%d:%s;", len(k), k, len(m[k]), m[k])
	}
	return b.String()
}

// replay returns the remembered result of operation id under call, or
// base.ErrConflict when the id was used with other arguments.
func replay[T any](s *settings, call, operationID, fp string) (*T, error) {
	v, ok := s.ops.get(call + "\x00" + operationID)
	if !ok {
		return nil, nil
	}
	rec := v.(opRecord)
	if rec.fingerprint != fp {
		return nil, fmt.Errorf("stripe: %s: operation %q was used with other arguments: %w", call, operationID, base.ErrConflict)
	}
	out := rec.result.(T)
	return &out, nil
}

func remember[T any](s *settings, call, operationID, fp string, result T) {
	s.ops.put(call+"\x00"+operationID, opRecord{fingerprint: fp, result: result})
}

type opRecord struct {
	fingerprint string
	result      any
}

// CreateCheckout implements payments.Driver: a Checkout Session in payment
// mode for one top-up line item. Without a CustomerRef the org's customer
// is created (once: its idempotency key derives from the org id) and
// returned in the session's CustomerRef. The session's Idempotency-Key is
// the operation id.
func (d *Driver) CreateCheckout(ctx context.Context, req *payments.CheckoutRequest) (*payments.CheckoutSession, error) {
	const call = "create checkout"
	s, err := d.enter(ctx, call)
	if err != nil {
		return nil, err
	}
	if err := validateCheckout(req); err != nil {
		return nil, fmt.Errorf("stripe: %s: %w", call, err)
	}
	customerID := req.CustomerRef
	if customerID == "" {
		if customerID, err = d.orgCustomer(ctx, s, req.OrgID); err != nil {
			return nil, err
		}
	}
	var expiresAt string
	if !req.ExpiresAt.IsZero() {
		expiresAt = strconv.FormatInt(req.ExpiresAt.Unix(), 10)
	}
	fp := fingerprint(req.OrgID, customerID, strconv.FormatInt(req.AmountMinor, 10), req.Currency,
		req.SuccessURL, req.CancelURL, expiresAt, metadataFingerprint(req.Metadata))
	if prev, err := replay[payments.CheckoutSession](s, call, req.OperationID, fp); prev != nil || err != nil {
		return prev, err
	}

	meta := maps.Clone(req.Metadata)
	if meta == nil {
		meta = map[string]string{}
	}
	meta[MetaOrgID] = req.OrgID
	meta[MetaOperationID] = req.OperationID
	params := &stripeapi.CheckoutSessionParams{
		Mode:              stripeapi.String(string(stripeapi.CheckoutSessionModePayment)),
		Customer:          stripeapi.String(customerID),
		ClientReferenceID: stripeapi.String(req.OrgID),
		SuccessURL:        stripeapi.String(req.SuccessURL),
		LineItems: []*stripeapi.CheckoutSessionLineItemParams{{
			PriceData: &stripeapi.CheckoutSessionLineItemPriceDataParams{
				Currency:    stripeapi.String(strings.ToLower(req.Currency)),
				UnitAmount:  stripeapi.Int64(req.AmountMinor),
				ProductData: &stripeapi.CheckoutSessionLineItemPriceDataProductDataParams{Name: stripeapi.String(lineItemName)},
			},
			Quantity: stripeapi.Int64(1),
		}},
		Metadata:          meta,
		PaymentIntentData: &stripeapi.CheckoutSessionPaymentIntentDataParams{Metadata: maps.Clone(meta)},
	}
	if req.CancelURL != "" {
		params.CancelURL = stripeapi.String(req.CancelURL)
	}
	if !req.ExpiresAt.IsZero() {
		params.ExpiresAt = stripeapi.Int64(req.ExpiresAt.Unix())
	}
	params.Context = ctx
	params.SetIdempotencyKey(req.OperationID)
	cs, err := s.checkout.New(params)
	if err != nil {
		return nil, apiError(ctx, call, err)
	}
	out := payments.CheckoutSession{
		SessionID:   cs.ID,
		URL:         cs.URL,
		ExpiresAt:   unixTime(cs.ExpiresAt),
		CustomerRef: customerID,
	}
	remember(s, call, req.OperationID, fp, out)
	d.logger.Info("checkout session created", "session_id", cs.ID, "org_id", req.OrgID,
		"operation_id", req.OperationID, "customer_id", customerID)
	return &out, nil
}

// customerIdempotencyKey is the Idempotency-Key of the customer create for
// org: the same for every call, so concurrent or repeated first checkouts
// of an org make one customer.
func customerIdempotencyKey(orgID string) string {
	key := "gpuaas-customer-" + orgID
	if len(key) <= maxIdempotencyKey {
		return key
	}
	sum := sha256.Sum256([]byte(orgID))
	return "gpuaas-customer-sha256-" + hex.EncodeToString(sum[:])
}

// orgCustomer returns the org's customer, creating it at Stripe the first
// time. The core stores the id it gets back and passes it as CustomerRef.
func (d *Driver) orgCustomer(ctx context.Context, s *settings, orgID string) (string, error) {
	if v, ok := s.orgCustomers.get(orgID); ok {
		return v.(string), nil
	}
	params := &stripeapi.CustomerParams{
		Description: stripeapi.String("gpuaas organization " + orgID),
		Metadata:    map[string]string{MetaOrgID: orgID},
	}
	params.Context = ctx
	params.SetIdempotencyKey(customerIdempotencyKey(orgID))
	c, err := s.customers.New(params)
	if err != nil {
		return "", apiError(ctx, "create customer for org "+strconv.Quote(orgID), err)
	}
	s.orgCustomers.put(orgID, c.ID)
	d.logger.Info("customer created", "org_id", orgID, "customer_id", c.ID)
	return c.ID, nil
}

// CreatePortal implements payments.PortalCreator: a Stripe customer portal
// session for the org's customer. An org without a customer (it has never
// checked out) is base.ErrFailedPrecondition.
func (d *Driver) CreatePortal(ctx context.Context, req *payments.PortalRequest) (*payments.PortalSession, error) {
	const call = "create portal"
	s, err := d.enter(ctx, call)
	if err != nil {
		return nil, err
	}
	if err := checkOperationID(req.OperationID); err != nil {
		return nil, fmt.Errorf("stripe: %s: %w", call, err)
	}
	if req.CustomerRef == "" {
		return nil, fmt.Errorf("stripe: %s: org %q has no Stripe customer yet (its first checkout creates one): %w",
			call, req.OrgID, base.ErrFailedPrecondition)
	}
	if err := checkURL("return url", req.ReturnURL, false); err != nil {
		return nil, fmt.Errorf("stripe: %s: %w", call, err)
	}
	fp := fingerprint(req.OrgID, req.CustomerRef, req.ReturnURL)
	if prev, err := replay[payments.PortalSession](s, call, req.OperationID, fp); prev != nil || err != nil {
		return prev, err
	}
	params := &stripeapi.BillingPortalSessionParams{Customer: stripeapi.String(req.CustomerRef)}
	if req.ReturnURL != "" {
		params.ReturnURL = stripeapi.String(req.ReturnURL)
	}
	params.Context = ctx
	params.SetIdempotencyKey(req.OperationID)
	ps, err := s.portal.New(params)
	if err != nil {
		return nil, apiError(ctx, call, err)
	}
	// Stripe publishes no expiry for portal sessions: they are short-lived
	// and the core opens one per visit, so ExpiresAt stays zero.
	out := payments.PortalSession{URL: ps.URL}
	remember(s, call, req.OperationID, fp, out)
	d.logger.Info("portal session created", "org_id", req.OrgID, "operation_id", req.OperationID, "customer_id", req.CustomerRef)
	return &out, nil
}

// Refund implements payments.Refunder: a refund of AmountMinor of the
// session's PaymentIntent with the operation id as Idempotency-Key. An
// unknown session is base.ErrNotFound; a refund larger than what is left
// to refund, or in another currency, base.ErrInvalidArgument.
func (d *Driver) Refund(ctx context.Context, req *payments.RefundRequest) (*payments.Refund, error) {
	const call = "refund"
	s, err := d.enter(ctx, call)
	if err != nil {
		return nil, err
	}
	if err := checkOperationID(req.OperationID); err != nil {
		return nil, fmt.Errorf("stripe: %s: %w", call, err)
	}
	if err := checkMoney(req.AmountMinor, req.Currency); err != nil {
		return nil, fmt.Errorf("stripe: %s: %w", call, err)
	}
	if !strings.HasPrefix(req.SessionID, "cs_") {
		return nil, fmt.Errorf("stripe: %s: no Checkout Session %q (their ids start with cs_): %w", call, req.SessionID, base.ErrNotFound)
	}
	fp := fingerprint(req.SessionID, strconv.FormatInt(req.AmountMinor, 10), req.Currency, req.Reason)
	if prev, err := replay[payments.Refund](s, call, req.OperationID, fp); prev != nil || err != nil {
		return prev, err
	}

	gp := &stripeapi.CheckoutSessionParams{}
	gp.Context = ctx
	cs, err := s.checkout.Get(req.SessionID, gp)
	if err != nil {
		return nil, apiError(ctx, call+" session "+req.SessionID, err)
	}
	if cs.PaymentIntent == nil || cs.PaymentIntent.ID == "" {
		return nil, fmt.Errorf("stripe: %s: session %q has no payment to refund (payment status %q): %w",
			call, req.SessionID, cs.PaymentStatus, base.ErrFailedPrecondition)
	}
	if cs.Currency != "" && !strings.EqualFold(string(cs.Currency), req.Currency) {
		return nil, fmt.Errorf("stripe: %s: refund in %s of session %q paid in %s: %w",
			call, req.Currency, req.SessionID, strings.ToUpper(string(cs.Currency)), base.ErrInvalidArgument)
	}
	if cs.AmountTotal > 0 && req.AmountMinor > cs.AmountTotal {
		return nil, fmt.Errorf("stripe: %s: refund of %d exceeds the %d paid for session %q: %w",
			call, req.AmountMinor, cs.AmountTotal, req.SessionID, base.ErrInvalidArgument)
	}
	meta := map[string]string{MetaOperationID: req.OperationID, MetaSessionID: req.SessionID}
	if org := sessionOrg(cs); org != "" {
		meta[MetaOrgID] = org
	}
	if req.Reason != "" {
		meta[MetaReason] = req.Reason
	}
	params := &stripeapi.RefundParams{
		PaymentIntent: stripeapi.String(cs.PaymentIntent.ID),
		Amount:        stripeapi.Int64(req.AmountMinor),
		Metadata:      meta,
	}
	// Stripe's refund API knows three reasons; any other reason travels in
	// the refund's metadata only.
	switch stripeapi.RefundReason(req.Reason) {
	case stripeapi.RefundReasonDuplicate, stripeapi.RefundReasonFraudulent, stripeapi.RefundReasonRequestedByCustomer:
		params.Reason = stripeapi.String(req.Reason)
	}
	params.Context = ctx
	params.SetIdempotencyKey(req.OperationID)
	r, err := s.refunds.New(params)
	if err != nil {
		return nil, apiError(ctx, call+" session "+req.SessionID, err)
	}
	out := payments.Refund{
		RefundID:    r.ID,
		Status:      refundStatus(r.Status),
		AmountMinor: r.Amount,
		Currency:    strings.ToUpper(string(r.Currency)),
	}
	if out.Status == "" {
		out.Status = payments.RefundPending
	}
	remember(s, call, req.OperationID, fp, out)
	d.logger.Info("refund created", "refund_id", r.ID, "session_id", req.SessionID,
		"operation_id", req.OperationID, "amount_minor", r.Amount, "status", r.Status)
	return &out, nil
}

// refundStatus maps a Stripe refund status; "" means not final yet.
func refundStatus(s stripeapi.RefundStatus) payments.RefundStatus {
	switch s {
	case stripeapi.RefundStatusSucceeded:
		return payments.RefundSucceeded
	case stripeapi.RefundStatusFailed, stripeapi.RefundStatusCanceled:
		return payments.RefundFailed
	case stripeapi.RefundStatusPending, stripeapi.RefundStatusRequiresAction:
		return payments.RefundPending
	}
	return ""
}

// sessionOrg is the gpuaas org a Checkout Session belongs to, or "".
func sessionOrg(cs *stripeapi.CheckoutSession) string {
	if org := cs.Metadata[MetaOrgID]; org != "" {
		return org
	}
	return cs.ClientReferenceID
}

func unixTime(sec int64) time.Time {
	if sec == 0 {
		return time.Time{}
	}
	return time.Unix(sec, 0).UTC()
}
