package stripe_test

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	stripedriver "github.com/gpuaas/gpuaas/plugins/stripe"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/payments"
)

func checkoutRequest(op, org string) payments.CheckoutRequest {
	return payments.CheckoutRequest{
		OperationID: op, OrgID: org, AmountMinor: 2500, Currency: "EUR",
		SuccessURL: "https://console.example.test/billing/ok?session={CHECKOUT_SESSION_ID}",
		CancelURL:  "https://console.example.test/billing",
		ExpiresAt:  time.Now().Add(time.Hour).Truncate(time.Second),
		Metadata:   map[string]string{"payment_session": "ps-" + op, "org_id": "spoofed"},
	}
}

func wantIs(t *testing.T, call string, err, target error) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Fatalf("%s: got %v, want an error matching %q", call, err, target)
	}
}

func wantForm(t *testing.T, c apiCall, want map[string]string) {
	t.Helper()
	for k, v := range want {
		if got := c.Form.Get(k); got != v {
			t.Errorf("%s %s: %s = %q, want %q", c.Method, c.Path, k, got, v)
		}
	}
}

func TestCreateCheckout(t *testing.T) {
	t.Parallel()
	ctx := context.Background()

	t.Run("a new org gets one customer, remembered and returned", func(t *testing.T) {
		t.Parallel()
		rec := newRecorder(t, mockURL(t))
		d := newDriver(t, rec.URL)
		req := checkoutRequest("op-new-org-1", "org-new")
		sess, err := d.CreateCheckout(ctx, &req)
		if err != nil {
			t.Fatal(err)
		}
		customers := rec.to(http.MethodPost, "/v1/customers")
		if len(customers) != 1 {
			t.Fatalf("%d customer creates, want 1", len(customers))
		}
		if customers[0].IdempotencyKey != "gpuaas-customer-org-new" {
			t.Errorf("customer Idempotency-Key %q, want one derived from the org id", customers[0].IdempotencyKey)
		}
		wantForm(t, customers[0], map[string]string{"metadata[org_id]": "org-new"})
		if !strings.HasPrefix(sess.CustomerRef, "cus_") {
			t.Fatalf("CustomerRef %q, want the created customer's id", sess.CustomerRef)
		}
		checkouts := rec.to(http.MethodPost, "/v1/checkout/sessions")
		if len(checkouts) != 1 {
			t.Fatalf("%d checkout creates, want 1", len(checkouts))
		}
		c := checkouts[0]
		if c.IdempotencyKey != req.OperationID {
			t.Errorf("checkout Idempotency-Key %q, want the operation id %q", c.IdempotencyKey, req.OperationID)
		}
		wantForm(t, c, map[string]string{
			"mode":                                   "payment",
			"customer":                               sess.CustomerRef,
			"client_reference_id":                    "org-new",
			"line_items[0][price_data][currency]":    "eur",
			"line_items[0][price_data][unit_amount]": "2500",
			"line_items[0][quantity]":                "1",
			"metadata[org_id]":                       "org-new",
			"metadata[operation_id]":                 req.OperationID,
			"metadata[payment_session]":              "ps-op-new-org-1",
			"payment_intent_data[metadata][org_id]":  "org-new",
			"success_url":                            req.SuccessURL,
			"cancel_url":                             req.CancelURL,
			"expires_at":                             strconv.FormatInt(req.ExpiresAt.Unix(), 10),
		})
		if !strings.HasPrefix(sess.SessionID, "cs_") || !strings.HasPrefix(sess.URL, "https://") {
			t.Errorf("session %+v: want a cs_ id and an https URL", sess)
		}
		if !sess.ExpiresAt.Equal(req.ExpiresAt) {
			t.Errorf("ExpiresAt %s, want %s", sess.ExpiresAt, req.ExpiresAt)
		}

		// The org's next top-up reuses the customer.
		next := checkoutRequest("op-new-org-2", "org-new")
		sess2, err := d.CreateCheckout(ctx, &next)
		if err != nil {
			t.Fatal(err)
		}
		if n := len(rec.to(http.MethodPost, "/v1/customers")); n != 1 {
			t.Errorf("%d customer creates after the second checkout, want still 1", n)
		}
		if sess2.CustomerRef != sess.CustomerRef {
			t.Errorf("second checkout charges customer %q, first %q", sess2.CustomerRef, sess.CustomerRef)
		}
	})

	t.Run("a retry has one effect, and sends the same request after a restart", func(t *testing.T) {
		t.Parallel()
		rec := newRecorder(t, mockURL(t))
		d := newDriver(t, rec.URL)
		req := checkoutRequest("op-retry", "org-retry")
		first, err := d.CreateCheckout(ctx, &req)
		if err != nil {
			t.Fatal(err)
		}
		again, err := d.CreateCheckout(ctx, &req)
		if err != nil {
			t.Fatal(err)
		}
		if *again != *first {
			t.Errorf("retry returned %+v, first %+v", again, first)
		}
		if n := len(rec.to(http.MethodPost, "/v1/checkout/sessions")); n != 1 {
			t.Errorf("%d checkout creates for one operation, want 1", n)
		}

		// A restarted driver remembers nothing: Stripe's idempotency
		// layer answers the retry, so it must be the identical request.
		restarted := newDriver(t, rec.URL)
		if _, err := restarted.CreateCheckout(ctx, &req); err != nil {
			t.Fatal(err)
		}
		customers := rec.to(http.MethodPost, "/v1/customers")
		checkouts := rec.to(http.MethodPost, "/v1/checkout/sessions")
		if len(customers) != 2 || len(checkouts) != 2 {
			t.Fatalf("%d customer and %d checkout creates, want 2 of each", len(customers), len(checkouts))
		}
		if customers[1].IdempotencyKey != customers[0].IdempotencyKey || !reflect.DeepEqual(customers[1].Form, customers[0].Form) {
			t.Errorf("customer create after a restart differs: %+v, first %+v", customers[1], customers[0])
		}
		// stripe-mock ignores idempotency keys and invents a new customer
		// id each time; at Stripe the customer create above returns the
		// same customer, so the customer is left out of the comparison.
		for _, c := range checkouts {
			c.Form.Del("customer")
		}
		if checkouts[1].IdempotencyKey != req.OperationID || !reflect.DeepEqual(checkouts[1].Form, checkouts[0].Form) {
			t.Errorf("checkout create after a restart differs: %+v, first %+v", checkouts[1], checkouts[0])
		}

		// The core stored the customer and now passes it: still a retry.
		withCustomer := req
		withCustomer.CustomerRef = first.CustomerRef
		if _, err := d.CreateCheckout(ctx, &withCustomer); err != nil {
			t.Errorf("retry naming the customer the first call created: %v", err)
		}
	})

	t.Run("a reused operation id with other arguments is a conflict", func(t *testing.T) {
		t.Parallel()
		d := newDriver(t, mockURL(t))
		req := checkoutRequest("op-conflict", "org-conflict")
		if _, err := d.CreateCheckout(ctx, &req); err != nil {
			t.Fatal(err)
		}
		for name, patch := range map[string]func(*payments.CheckoutRequest){
			"amount":   func(r *payments.CheckoutRequest) { r.AmountMinor++ },
			"currency": func(r *payments.CheckoutRequest) { r.Currency = "USD" },
			"customer": func(r *payments.CheckoutRequest) { r.CustomerRef = "cus_other" },
			"metadata": func(r *payments.CheckoutRequest) { r.Metadata = map[string]string{"x": "y"} },
			"expiry":   func(r *payments.CheckoutRequest) { r.ExpiresAt = r.ExpiresAt.Add(time.Minute) },
		} {
			other := req
			patch(&other)
			_, err := d.CreateCheckout(ctx, &other)
			wantIs(t, "reusing the operation id for another "+name, err, base.ErrConflict)
		}
	})

	t.Run("a known customer is charged as is", func(t *testing.T) {
		t.Parallel()
		rec := newRecorder(t, mockURL(t))
		d := newDriver(t, rec.URL)
		req := checkoutRequest("op-known", "org-known")
		req.CustomerRef = "cus_known"
		sess, err := d.CreateCheckout(ctx, &req)
		if err != nil {
			t.Fatal(err)
		}
		if n := len(rec.to(http.MethodPost, "/v1/customers")); n != 0 {
			t.Errorf("%d customer creates for an org with a customer", n)
		}
		wantForm(t, rec.to(http.MethodPost, "/v1/checkout/sessions")[0], map[string]string{"customer": "cus_known"})
		if sess.CustomerRef != "cus_known" {
			t.Errorf("CustomerRef %q, want cus_known", sess.CustomerRef)
		}
	})

	t.Run("invalid arguments are refused before calling Stripe", func(t *testing.T) {
		t.Parallel()
		rec := newRecorder(t, mockURL(t))
		d := newDriver(t, rec.URL)
		for _, c := range []struct {
			name  string
			patch func(*payments.CheckoutRequest)
		}{
			{"no operation id", func(r *payments.CheckoutRequest) { r.OperationID = "" }},
			{"operation id too long for an idempotency key", func(r *payments.CheckoutRequest) { r.OperationID = strings.Repeat("x", 256) }},
			{"no org", func(r *payments.CheckoutRequest) { r.OrgID = "" }},
			{"zero amount", func(r *payments.CheckoutRequest) { r.AmountMinor = 0 }},
			{"negative amount", func(r *payments.CheckoutRequest) { r.AmountMinor = -1 }},
			{"lower-case currency", func(r *payments.CheckoutRequest) { r.Currency = "eur" }},
			{"no success url", func(r *payments.CheckoutRequest) { r.SuccessURL = "" }},
			{"relative success url", func(r *payments.CheckoutRequest) { r.SuccessURL = "/billing/ok" }},
			{"cancel url not http", func(r *payments.CheckoutRequest) { r.CancelURL = "javascript:alert(1)" }},
		} {
			t.Run(c.name, func(t *testing.T) {
				req := checkoutRequest("op-invalid", "org-invalid")
				c.patch(&req)
				_, err := d.CreateCheckout(ctx, &req)
				wantIs(t, "CreateCheckout", err, base.ErrInvalidArgument)
			})
		}
		if n := rec.count(); n != 0 {
			t.Errorf("%d requests reached Stripe", n)
		}
	})
}

func TestCreatePortal(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	rec := newRecorder(t, mockURL(t))
	d := newDriver(t, rec.URL)

	req := &payments.PortalRequest{OperationID: "op-portal", OrgID: "org-portal", CustomerRef: "cus_portal", ReturnURL: "https://console.example.test/billing"}
	p, err := d.CreatePortal(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if p.URL == "" {
		t.Error("no portal URL")
	}
	calls := rec.to(http.MethodPost, "/v1/billing_portal/sessions")
	if len(calls) != 1 {
		t.Fatalf("%d portal creates, want 1", len(calls))
	}
	if calls[0].IdempotencyKey != req.OperationID {
		t.Errorf("portal Idempotency-Key %q, want %q", calls[0].IdempotencyKey, req.OperationID)
	}
	wantForm(t, calls[0], map[string]string{"customer": "cus_portal", "return_url": req.ReturnURL})

	for _, c := range []struct {
		name  string
		req   payments.PortalRequest
		want  error
		calls int
	}{
		{"retry", *req, nil, 1},
		{"reused operation id, other return url", payments.PortalRequest{OperationID: "op-portal", OrgID: "org-portal", CustomerRef: "cus_portal", ReturnURL: "https://elsewhere.example.test"}, base.ErrConflict, 1},
		{"org without a customer", payments.PortalRequest{OperationID: "op-portal-2", OrgID: "org-new"}, base.ErrFailedPrecondition, 1},
		{"relative return url", payments.PortalRequest{OperationID: "op-portal-3", OrgID: "org-portal", CustomerRef: "cus_portal", ReturnURL: "/billing"}, base.ErrInvalidArgument, 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, err := d.CreatePortal(ctx, &c.req)
			if c.want == nil {
				if err != nil || got.URL != p.URL {
					t.Fatalf("got %+v, %v; want the first URL", got, err)
				}
			} else {
				wantIs(t, "CreatePortal", err, c.want)
			}
			if n := len(rec.to(http.MethodPost, "/v1/billing_portal/sessions")); n != c.calls {
				t.Errorf("%d portal creates, want %d", n, c.calls)
			}
		})
	}
}

func TestRefund(t *testing.T) {
	t.Parallel()
	ctx := context.Background()

	t.Run("against stripe-mock", func(t *testing.T) {
		t.Parallel()
		rec := newRecorder(t, mockURL(t))
		d := newDriver(t, rec.URL)
		req := &payments.RefundRequest{OperationID: "op-refund", SessionID: "cs_test_refund", AmountMinor: 700, Currency: "USD", Reason: "requested_by_customer"}
		r, err := d.Refund(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(r.RefundID, "re_") || r.AmountMinor != 700 || r.Currency != "USD" || r.Status != payments.RefundSucceeded {
			t.Errorf("refund %+v", r)
		}
		if n := len(rec.to(http.MethodGet, "/v1/checkout/sessions/cs_test_refund")); n != 1 {
			t.Errorf("%d session reads, want 1", n)
		}
		refunds := rec.to(http.MethodPost, "/v1/refunds")
		if len(refunds) != 1 {
			t.Fatalf("%d refund creates, want 1", len(refunds))
		}
		c := refunds[0]
		if c.IdempotencyKey != req.OperationID {
			t.Errorf("refund Idempotency-Key %q, want %q", c.IdempotencyKey, req.OperationID)
		}
		if !strings.HasPrefix(c.Form.Get("payment_intent"), "pi_") {
			t.Errorf("refund of payment_intent %q, want the session's", c.Form.Get("payment_intent"))
		}
		wantForm(t, c, map[string]string{
			"amount": "700", "reason": "requested_by_customer",
			"metadata[operation_id]": req.OperationID, "metadata[checkout_session_id]": req.SessionID,
		})

		again, err := d.Refund(ctx, req)
		if err != nil || *again != *r {
			t.Errorf("retry: %+v, %v; want %+v", again, err, r)
		}
		other := *req
		other.AmountMinor = 800
		_, err = d.Refund(ctx, &other)
		wantIs(t, "reusing the operation id for another amount", err, base.ErrConflict)

		goodwill := &payments.RefundRequest{OperationID: "op-refund-goodwill", SessionID: "cs_test_refund", AmountMinor: 1, Currency: "USD", Reason: "goodwill after an outage"}
		if _, err := d.Refund(ctx, goodwill); err != nil {
			t.Fatal(err)
		}
		last := rec.to(http.MethodPost, "/v1/refunds")[1]
		if last.Form.Has("reason") || last.Form.Get("metadata[reason]") != goodwill.Reason {
			t.Errorf("a free-text reason: form %v, want it in metadata only", last.Form)
		}
		if n := len(rec.to(http.MethodPost, "/v1/refunds")); n != 2 {
			t.Errorf("%d refund creates, want 2", n)
		}
	})

	// stripe-mock's sessions are unpaid and have no amount, so the checks
	// that need a paid session run against a fake that has one.
	paid := map[string]any{
		"id": "cs_test_paid", "object": "checkout.session", "amount_total": 1000, "currency": "usd",
		"payment_intent": "pi_paid", "payment_status": "paid", "metadata": map[string]string{"org_id": "org-paid"},
	}
	fake := fakeStripe(t, func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/v1/checkout/sessions/cs_test_paid":
			writeJSON(w, paid)
		case r.URL.Path == "/v1/checkout/sessions/cs_test_unpaid":
			writeJSON(w, map[string]any{"id": "cs_test_unpaid", "object": "checkout.session", "payment_intent": nil, "payment_status": "unpaid"})
		case strings.HasPrefix(r.URL.Path, "/v1/checkout/sessions/"):
			writeStripeError(w, http.StatusNotFound, "invalid_request_error", "resource_missing", "No such checkout.session: 'cs_test_gone'")
		case r.URL.Path == "/v1/refunds":
			writeStripeError(w, http.StatusBadRequest, "invalid_request_error", "amount_too_large",
				"Refund amount ($9.00) is greater than unrefunded amount on charge ($5.00)")
		default:
			http.NotFound(w, r)
		}
	})
	for _, c := range []struct {
		name    string
		req     payments.RefundRequest
		want    error
		message string
	}{
		{"more than was paid", payments.RefundRequest{SessionID: "cs_test_paid", AmountMinor: 1001, Currency: "USD"}, base.ErrInvalidArgument, "exceeds the 1000 paid"},
		{"more than is left to refund", payments.RefundRequest{SessionID: "cs_test_paid", AmountMinor: 900, Currency: "USD"}, base.ErrInvalidArgument, "exceeds what is left to refund"},
		{"another currency", payments.RefundRequest{SessionID: "cs_test_paid", AmountMinor: 100, Currency: "EUR"}, base.ErrInvalidArgument, "paid in USD"},
		{"unknown session at Stripe", payments.RefundRequest{SessionID: "cs_test_gone", AmountMinor: 100, Currency: "USD"}, base.ErrNotFound, "No such checkout.session"},
		{"not a session id", payments.RefundRequest{SessionID: "sdktest-no-such-session", AmountMinor: 100, Currency: "USD"}, base.ErrNotFound, "no Checkout Session"},
		{"unpaid session", payments.RefundRequest{SessionID: "cs_test_unpaid", AmountMinor: 100, Currency: "USD"}, base.ErrFailedPrecondition, "no payment to refund"},
		{"zero amount", payments.RefundRequest{SessionID: "cs_test_paid", AmountMinor: 0, Currency: "USD"}, base.ErrInvalidArgument, "not positive"},
		{"negative amount", payments.RefundRequest{SessionID: "cs_test_paid", AmountMinor: -5, Currency: "USD"}, base.ErrInvalidArgument, "not positive"},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			d := newDriver(t, fake, stripedriver.WithNetworkRetries(0))
			req := c.req
			req.OperationID = "op-" + strings.ReplaceAll(c.name, " ", "-")
			_, err := d.Refund(ctx, &req)
			wantIs(t, "Refund", err, c.want)
			if !strings.Contains(err.Error(), c.message) {
				t.Errorf("error %q does not say %q", err, c.message)
			}
		})
	}
}

func TestErrorMapping(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name           string
		status         int
		typ, code, msg string
		want           error
		unreachable    bool
	}{
		{"invalid request", 400, "invalid_request_error", "parameter_invalid_integer", "Invalid integer: abc", base.ErrInvalidArgument, false},
		{"bad api key", 401, "invalid_request_error", "", "Invalid API Key provided: sk_test_****Key", base.ErrUnauthenticated, false},
		{"restricted key lacks a permission", 403, "invalid_request_error", "", "The provided key does not have the required permissions", base.ErrPermissionDenied, false},
		{"resource missing", 404, "invalid_request_error", "resource_missing", "No such customer: 'cus_x'", base.ErrNotFound, false},
		{"idempotency key reused with other parameters", 400, "idempotency_error", "", "Keys for idempotent requests can only be used with the same parameters they were first used with.", base.ErrConflict, false},
		{"idempotency key in use", 409, "invalid_request_error", "idempotency_key_in_use", "There is currently another in-progress request using this Idempotent Key", base.ErrUnavailable, false},
		{"rate limited", 429, "invalid_request_error", "rate_limit", "Too many requests", base.ErrUnavailable, false},
		{"stripe is down", 500, "api_error", "", "An unknown error occurred", base.ErrUnavailable, false},
		{"declined", 402, "card_error", "card_declined", "Your card was declined.", base.ErrFailedPrecondition, false},
		{"cannot connect", 0, "", "", "cannot reach Stripe", base.ErrUnavailable, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			api := "http://127.0.0.1:1" // nothing listens on port 1
			if !c.unreachable {
				api = fakeStripe(t, func(w http.ResponseWriter, r *http.Request) {
					writeStripeError(w, c.status, c.typ, c.code, c.msg)
				})
			}
			d := newDriver(t, api, stripedriver.WithNetworkRetries(0))
			req := checkoutRequest("op-errors", "org-errors")
			req.CustomerRef = "cus_errors"
			_, err := d.CreateCheckout(context.Background(), &req)
			wantIs(t, "CreateCheckout", err, c.want)
			for _, s := range base.Sentinels() {
				if s != c.want && errors.Is(err, s) {
					t.Errorf("%v also matches %q", err, s)
				}
			}
			if !strings.Contains(err.Error(), c.msg) {
				t.Errorf("error %q lost Stripe's message %q", err, c.msg)
			}
			if !c.unreachable && !strings.Contains(err.Error(), "req_test123") {
				t.Errorf("error %q has no Stripe request id", err)
			}
			if strings.Contains(err.Error(), testKey) {
				t.Errorf("error %q carries the secret key", err)
			}
		})
	}
}

func TestConfigure(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	with := func(k string, v any) map[string]any {
		raw := config("https://api.stripe.com")
		raw[k] = v
		return raw
	}
	for _, c := range []struct {
		name  string
		raw   map[string]any
		field string // "" when the configuration is valid
	}{
		{"test key", config("http://127.0.0.1:12111"), ""},
		{"live key over https", with("secret_key", "sk_live_abc"), ""},
		{"restricted key", with("secret_key", "rk_live_abc"), ""},
		{"default api base", map[string]any{"secret_key": testKey, "webhook_secret": testWebhookSecret}, ""},
		{"missing secret key", map[string]any{"webhook_secret": testWebhookSecret}, "secret_key"},
		{"publishable key", with("secret_key", "pk_test_abc"), "secret_key"},
		{"bare prefix", with("secret_key", "sk_test_"), "secret_key"},
		{"key with a trailing newline", with("secret_key", testKey+"\n"), "secret_key"},
		{"missing webhook secret", map[string]any{"secret_key": testKey}, "webhook_secret"},
		{"webhook secret without whsec_", with("webhook_secret", "abc123"), "webhook_secret"},
		{"api base not a url", with("api_base", "stripe"), "api_base"},
		{"api base ftp", with("api_base", "ftp://api.stripe.com"), "api_base"},
		{"api base with a query", with("api_base", "https://api.stripe.com?x=1"), "api_base"},
		{"api base with credentials", with("api_base", "https://u:p@api.stripe.com"), "api_base"},
		{"live key over http", map[string]any{"secret_key": "sk_live_abc", "webhook_secret": testWebhookSecret, "api_base": "http://api.stripe.com"}, "api_base"},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			d := stripedriver.New(hclog.NewNullLogger())
			err := configure(ctx, d, c.raw)
			if c.field == "" {
				if err != nil {
					t.Fatalf("Configure: %v", err)
				}
				return
			}
			var cfgErr *base.ConfigError
			if !errors.As(err, &cfgErr) || cfgErr.Field != c.field {
				t.Fatalf("Configure: got %v, want a *base.ConfigError for %q", err, c.field)
			}
			for _, k := range []string{"secret_key", "webhook_secret"} {
				if v, _ := c.raw[k].(string); len(v) > 10 && strings.Contains(err.Error(), strings.TrimSpace(v)) {
					t.Errorf("Configure error %q repeats the %s", err, k)
				}
			}
		})
	}

	t.Run("calls before Configure", func(t *testing.T) {
		t.Parallel()
		d := stripedriver.New(hclog.NewNullLogger())
		req := checkoutRequest("op", "org")
		_, err := d.CreateCheckout(ctx, &req)
		wantIs(t, "CreateCheckout", err, base.ErrFailedPrecondition)
		_, err = d.HandleWebhook(ctx, &payments.Webhook{})
		wantIs(t, "HandleWebhook", err, base.ErrFailedPrecondition)
	})

	t.Run("reconfiguring the same account keeps the memory of operations", func(t *testing.T) {
		t.Parallel()
		rec := newRecorder(t, mockURL(t))
		d := newDriver(t, rec.URL)
		req := checkoutRequest("op-reconfigure", "org-reconfigure")
		req.CustomerRef = "cus_reconfigure"
		first, err := d.CreateCheckout(ctx, &req)
		if err != nil {
			t.Fatal(err)
		}
		if err := configure(ctx, d, config(rec.URL)); err != nil {
			t.Fatal(err)
		}
		again, err := d.CreateCheckout(ctx, &req)
		if err != nil || again.SessionID != first.SessionID {
			t.Errorf("retry after reconfiguring: %+v, %v; want session %s", again, err, first.SessionID)
		}
	})
}

// TestLogsHoldNoSecrets runs every call with a trace-level logger and looks
// for secrets, bearer URLs and webhook bodies in what was logged.
func TestLogsHoldNoSecrets(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	var logs bytes.Buffer
	logger := hclog.New(&hclog.LoggerOptions{Output: &logs, Level: hclog.Trace, JSONFormat: true})
	d := stripedriver.New(logger)
	if err := configure(ctx, d, config(mockURL(t))); err != nil {
		t.Fatal(err)
	}
	req := checkoutRequest("op-logs", "org-logs")
	sess, err := d.CreateCheckout(ctx, &req)
	if err != nil {
		t.Fatal(err)
	}
	portal, err := d.CreatePortal(ctx, &payments.PortalRequest{OperationID: "op-logs-portal", OrgID: "org-logs", CustomerRef: sess.CustomerRef})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.Refund(ctx, &payments.RefundRequest{OperationID: "op-logs-refund", SessionID: sess.SessionID, AmountMinor: 1, Currency: "EUR"}); err != nil {
		t.Fatal(err)
	}
	const marker = "body-marker-4711"
	obj := checkoutObject(sess.SessionID, "org-logs", "op-logs", 2500, "EUR", "paid")
	obj["metadata"] = map[string]string{"org_id": "org-logs", "note": marker}
	body := eventJSON(t, "evt_logs", "checkout.session.completed", time.Now(), obj)
	hook := signed(body, testWebhookSecret, time.Now())
	if _, err := d.HandleWebhook(ctx, &hook); err != nil {
		t.Fatal(err)
	}
	bad := signed(body, "whsec_wrong", time.Now())
	if _, err := d.HandleWebhook(ctx, &bad); err == nil {
		t.Fatal("a webhook signed with another secret was accepted")
	}
	if logs.Len() == 0 {
		t.Fatal("nothing was logged")
	}
	for what, secret := range map[string]string{
		"secret key": testKey, "webhook secret": testWebhookSecret, "checkout URL": sess.URL,
		"portal URL": portal.URL, "webhook body": marker, "signature": hook.Header.Get(stripedriver.SignatureHeader),
	} {
		if strings.Contains(logs.String(), secret) {
			t.Errorf("the log holds the %s", what)
		}
	}
}
