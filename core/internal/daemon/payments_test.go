package daemon_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	stripeapi "github.com/stripe/stripe-go/v76"
	"github.com/stripe/stripe-go/v76/webhook"

	"github.com/gpuaas/gpuaas/core/internal/daemon"
	"github.com/gpuaas/gpuaas/core/internal/daemon/daemontest"
	"github.com/gpuaas/gpuaas/core/internal/identity"
	"github.com/gpuaas/gpuaas/core/internal/ledger"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
	stripedriver "github.com/gpuaas/gpuaas/plugins/stripe"
	"github.com/gpuaas/gpuaas/sdk/base"
	sdkpay "github.com/gpuaas/gpuaas/sdk/payments"
)

const whsec = "whsec_gpuaas_test_secret"

// providers serves one in-process Stripe driver as instance "stripe".
type providers struct{ d sdkpay.Driver }

func (p providers) Payments(_ context.Context, instance string) (sdkpay.Driver, error) {
	if instance != "stripe" {
		return nil, fmt.Errorf("no instance %q", instance)
	}
	return p.d, nil
}

func stripeDriver(t *testing.T) sdkpay.Driver {
	t.Helper()
	d := stripedriver.New(hclog.NewNullLogger())
	ctx := context.Background()
	schema, err := d.ConfigSchema(ctx)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := base.ValidateConfig(schema, map[string]any{"secret_key": testenv.Env(t, "STRIPE_SECRET_KEY"), "webhook_secret": whsec, "api_base": testenv.Env(t, "STRIPE_API_BASE")})
	if err != nil {
		t.Fatal(err)
	}
	cfg.APIVersion, cfg.Instance = sdkpay.APIVersion1, "stripe"
	if err := d.Configure(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	return d
}

func newPaymentsEnv(t *testing.T) *env {
	t.Helper()
	pool, dbURL := testenv.MigratedPool(t)
	n := testenv.StartNATS(t)
	d := daemontest.StartWith(t, map[string]string{"DATABASE_URL": dbURL, "NATS_URL": n.URL(), "TEMPORAL_ADDRESS": testenv.Env(t, "TEMPORAL_ADDRESS")},
		daemon.Options{Payments: providers{stripeDriver(t)}})
	return &env{t: t, url: d.URL, pool: pool, ids: identity.NewService(pool, "local", testenv.Logger(t), nil)}
}

// stripeEvent is a signed Stripe event about a checkout session, as delivered.
func stripeEvent(t *testing.T, eventID, sessionID, org string, amount int64, currency, status string, at time.Time) (string, http.Header) {
	t.Helper()
	body, err := json.Marshal(map[string]any{
		"id": eventID, "object": "event", "api_version": stripeapi.APIVersion, "created": at.Unix(), "livemode": false,
		"pending_webhooks": 1, "type": "checkout.session.completed",
		"data": map[string]any{"object": map[string]any{
			"id": sessionID, "object": "checkout.session", "mode": "payment", "amount_total": amount, "currency": strings.ToLower(currency),
			"customer": "cus_test", "client_reference_id": org, "metadata": map[string]string{"org_id": org},
			"payment_intent": "pi_" + sessionID, "payment_status": status, "status": "complete",
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	sp := webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: body, Secret: whsec, Timestamp: at})
	h := http.Header{}
	h.Set(stripedriver.SignatureHeader, sp.Header)
	return string(body), h
}

func (e *env) webhook(body string, h http.Header) response {
	e.t.Helper()
	args := []string{}
	for k := range h {
		args = append(args, k, h.Get(k))
	}
	return e.call("POST", "/api/v1/payments/webhook/stripe", "", body, args...)
}

func (e *env) balance(org uuid.UUID) int64 {
	e.t.Helper()
	b, err := ledger.GetBalance(context.Background(), e.pool, org)
	if err != nil {
		return 0
	}
	return b.AmountMinor
}

// A top-up from checkout to credit, through the real webhook endpoint with events
// signed like Stripe's; every bad webhook changes nothing; fifteen concurrent
// deliveries of one event credit once; a mismatch goes to the admin queue.
func TestTopUpEndToEnd(t *testing.T) {
	e := newPaymentsEnv(t)
	w := e.newWorld()
	admin := w.tokens[orgAdmin]
	org := w.orgA.String()
	checkout := func(amount int64) response {
		return e.send("POST", "/api/v1/payments/checkout-session", admin, map[string]any{"org_id": org, "amount_minor": amount,
			"success_url": "https://app.test/ok", "cancel_url": "https://app.test/cancel"})
	}
	for _, amt := range []int64{499, 1_000_001, 0, -5} {
		if r := checkout(amt); r.status != 400 || r.code() != "topup_out_of_range" {
			t.Fatalf("top-up of %d: %d %s; want 400 topup_out_of_range", amt, r.status, r.body)
		}
	}
	r := checkout(2000)
	if r.status != 201 {
		t.Fatalf("checkout: %d %s", r.status, r.body)
	}
	var sess struct {
		ID          string    `json:"id"`
		CheckoutURL string    `json:"checkout_url"`
		Status      string    `json:"status"`
		ExpiresAt   time.Time `json:"expires_at"`
	}
	r.json(t, &sess)
	if sess.CheckoutURL == "" || sess.Status != "initiated" || !sess.ExpiresAt.After(time.Now()) {
		t.Fatalf("session %+v", sess)
	}
	var providerSession string
	_ = e.pool.QueryRow(t.Context(), `SELECT provider_session FROM payment_sessions WHERE id = $1`, sess.ID).Scan(&providerSession)
	now := time.Now()

	paid, h := stripeEvent(t, "evt_paid", providerSession, org, 2000, "usd", "paid", now)
	bad := []struct {
		name   string
		body   string
		header http.Header
	}{
		{"unsigned", paid, http.Header{}},
		{"tampered", strings.Replace(paid, `"amount_total":2000`, `"amount_total":9000`, 1), h},
		{"re-serialised", reserialise(t, paid), h},
		{"too old", paid, signedAt(t, paid, now.Add(-301*time.Second))},
		{"from the future", paid, signedAt(t, paid, now.Add(301*time.Second))},
	}
	for _, c := range bad {
		if r := e.webhook(c.body, c.header); r.status != 400 || r.code() != "webhook_invalid" {
			t.Fatalf("%s webhook: %d %s; want 400 webhook_invalid", c.name, r.status, r.body)
		}
	}
	if b := e.balance(w.orgA); b != 0 {
		t.Fatalf("bad webhooks changed the balance to %d", b)
	}
	unpaid, uh := stripeEvent(t, "evt_unpaid", providerSession, org, 2000, "usd", "unpaid", now)
	if r := e.webhook(unpaid, uh); r.status != 200 || e.balance(w.orgA) != 0 {
		t.Fatalf("unpaid: %d %s, balance %d", r.status, r.body, e.balance(w.orgA))
	}

	var wg sync.WaitGroup
	statuses := make([]int, 15)
	for i := range statuses {
		wg.Go(func() { statuses[i] = e.webhook(paid, h).status })
	}
	wg.Wait()
	for i, s := range statuses {
		if s != 200 {
			t.Fatalf("delivery %d: %d", i, s)
		}
	}
	if b := e.balance(w.orgA); b != 2000 {
		t.Fatalf("balance %d after 15 deliveries; want exactly one credit of 2000", b)
	}
	// A redelivery after a crash (the credit committed, the 200 was lost).
	if r := e.webhook(paid, h); r.status != 200 || e.balance(w.orgA) != 2000 {
		t.Fatalf("redelivery: %d, balance %d", r.status, e.balance(w.orgA))
	}
	var status string
	_ = e.pool.QueryRow(t.Context(), `SELECT status FROM payment_sessions WHERE id = $1`, sess.ID).Scan(&status)
	if status != "credited" {
		t.Fatalf("session %s", status)
	}
	if r := e.call("GET", "/api/v1/billing/balance?org_id="+org, admin, nil); r.status != 200 || !strings.Contains(string(r.body), `"balance_minor":2000`) {
		t.Fatalf("balance API: %d %s", r.status, r.body)
	}

	// A paid session whose amount differs from what was asked: failed_reconcile.
	mismatch := uuid.New()
	e.exec(t.Context(), `INSERT INTO payment_sessions (id, org_id, provider_instance, provider_session, amount_minor, currency, status, created_by)
		VALUES ($1, $2, 'stripe', 'cs_mismatch', 5000, 'USD', 'initiated', 'test')`, mismatch, w.orgA)
	mm, mh := stripeEvent(t, "evt_mismatch", "cs_mismatch", org, 4000, "usd", "paid", now)
	if r := e.webhook(mm, mh); r.status != 200 {
		t.Fatalf("mismatch webhook: %d %s", r.status, r.body)
	}
	q := e.call("GET", "/api/v1/admin/payments/sessions?status=failed_reconcile", w.tokens[platAdmin], nil)
	if q.status != 200 || !strings.Contains(string(q.body), mismatch.String()) || e.balance(w.orgA) != 2000 {
		t.Fatalf("reconcile queue: %d %s, balance %d", q.status, q.body, e.balance(w.orgA))
	}

	// Refunds: zero, negative and more than the charge are refused, nothing posted.
	for _, amt := range []int64{0, -1, 2001} {
		r := e.send("POST", "/api/v1/admin/payments/sessions/"+sess.ID+"/refund", w.tokens[platAdmin], map[string]any{"amount_minor": amt, "reason": "test"})
		if r.status != 422 {
			t.Fatalf("refund of %d: %d %s; want 422", amt, r.status, r.body)
		}
	}
	if b := e.balance(w.orgA); b != 2000 {
		t.Fatalf("refused refunds changed the balance to %d", b)
	}
}

func reserialise(t *testing.T, body string) string {
	t.Helper()
	var v any
	if err := json.Unmarshal([]byte(body), &v); err != nil {
		t.Fatal(err)
	}
	b, _ := json.MarshalIndent(v, "", "    ")
	return string(b)
}

func signedAt(t *testing.T, body string, at time.Time) http.Header {
	t.Helper()
	sp := webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: []byte(body), Secret: whsec, Timestamp: at})
	h := http.Header{}
	h.Set(stripedriver.SignatureHeader, sp.Header)
	return h
}
