package stripe_test

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"reflect"
	"strings"
	"testing"
	"time"

	stripedriver "github.com/gpuaas/gpuaas/plugins/stripe"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/payments"
)

// clock is the driver's "now" in the webhook tests.
var clock = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

func TestWebhookVerification(t *testing.T) {
	t.Parallel()
	d := newDriver(t, mockURL(t), stripedriver.WithClock(func() time.Time { return clock }))
	body := eventJSON(t, "evt_verify", "checkout.session.completed", clock,
		checkoutObject("cs_test_verify", "org-verify", "op-verify", 5000, "USD", "paid"))
	valid := signed(body, testWebhookSecret, clock)
	sig := valid.Header.Get(stripedriver.SignatureHeader)

	reserialised := func() []byte {
		var v any
		if err := json.Unmarshal(body, &v); err != nil {
			t.Fatal(err)
		}
		b, err := json.Marshal(v) // the same data, other bytes
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Equal(b, body) {
			t.Fatal("re-serialising did not change the bytes")
		}
		return b
	}()
	tampered := bytes.Replace(body, []byte(`"amount_total": 5000`), []byte(`"amount_total": 9000`), 1)
	if bytes.Equal(tampered, body) {
		t.Fatal("tampering did not change the body")
	}
	header := func(kv ...string) http.Header {
		h := http.Header{}
		for i := 0; i < len(kv); i += 2 {
			h[kv[i]] = append(h[kv[i]], kv[i+1])
		}
		return h
	}
	fresh := func(at time.Time) payments.Webhook { return signed(body, testWebhookSecret, at) }

	for _, c := range []struct {
		name string
		hook payments.Webhook
		want error // nil: verified
	}{
		{"valid", valid, nil},
		{"signed 300 s ago", fresh(clock.Add(-300 * time.Second)), nil},
		{"signed 300 s ahead", fresh(clock.Add(300 * time.Second)), nil},
		{"header name in lower case", payments.Webhook{Body: body, Header: header("stripe-signature", sig)}, nil},
		{"tampered body", payments.Webhook{Body: tampered, Header: valid.Header}, base.ErrUnauthenticated},
		{"re-serialised JSON", payments.Webhook{Body: reserialised, Header: valid.Header}, base.ErrUnauthenticated},
		{"wrong secret", signed(body, "whsec_someoneElsesEndpoint", clock), base.ErrUnauthenticated},
		{"signed 301 s ago", fresh(clock.Add(-301 * time.Second)), base.ErrUnauthenticated},
		{"signed 301 s ahead", fresh(clock.Add(301 * time.Second)), base.ErrUnauthenticated},
		{"missing header", payments.Webhook{Body: body, Header: header("Content-Type", "application/json")}, base.ErrUnauthenticated},
		{"empty header", payments.Webhook{Body: body, Header: header("Stripe-Signature", "")}, base.ErrUnauthenticated},
		{"two signature headers", payments.Webhook{Body: body, Header: header("Stripe-Signature", sig, "Stripe-Signature", sig)}, base.ErrUnauthenticated},
		{"two timestamps", payments.Webhook{Body: body, Header: header("Stripe-Signature", "t=1,"+sig)}, base.ErrUnauthenticated},
		{"no v1 signature", payments.Webhook{Body: body, Header: header("Stripe-Signature", strings.Replace(sig, "v1=", "v0=", 1))}, base.ErrUnauthenticated},
		{"timestamp not a number", payments.Webhook{Body: body, Header: header("Stripe-Signature", strings.Replace(sig, "t=", "t=x", 1))}, base.ErrUnauthenticated},
		{"signed, but not JSON", signed([]byte("not json"), testWebhookSecret, clock), base.ErrInvalidArgument},
		{"signed, but not an event", signed([]byte(`{"hello":"world"}`), testWebhookSecret, clock), base.ErrInvalidArgument},
	} {
		t.Run(c.name, func(t *testing.T) {
			events, err := d.HandleWebhook(context.Background(), &c.hook)
			if c.want == nil {
				if err != nil || len(events) != 1 {
					t.Fatalf("got %v, %v; want one event", events, err)
				}
				return
			}
			wantIs(t, "HandleWebhook", err, c.want)
			if events != nil {
				t.Errorf("a refused webhook returned events %+v", events)
			}
			if strings.Contains(err.Error(), string(c.hook.Body)) {
				t.Errorf("the error %q repeats the body", err)
			}
		})
	}
}

func TestWebhookEvents(t *testing.T) {
	t.Parallel()
	rec := newRecorder(t, mockURL(t))
	d := newDriver(t, rec.URL, stripedriver.WithClock(func() time.Time { return clock }))
	occurred := clock.Add(-time.Minute)

	session := func(status string, mutate func(map[string]any)) map[string]any {
		o := checkoutObject("cs_test_events", "org-events", "op-events", 5000, "EUR", status)
		if mutate != nil {
			mutate(o)
		}
		return o
	}
	completed := payments.Event{
		ID: "evt_1", Type: payments.EventCheckoutCompleted, SessionID: "cs_test_events", OrgID: "org-events",
		CustomerRef: "cus_org-events", AmountMinor: 5000, Currency: "EUR", PaymentStatus: payments.StatusPaid,
		OccurredAt: occurred, Metadata: map[string]string{"org_id": "org-events", "operation_id": "op-events"},
	}
	with := func(e payments.Event, mutate func(*payments.Event)) []payments.Event {
		mutate(&e)
		return []payments.Event{e}
	}
	ourRefund := func(status string) map[string]any {
		return map[string]any{
			"id": "re_ours", "object": "refund", "amount": 700, "currency": "eur", "status": status,
			"payment_intent": "pi_cs_test_events", "failure_reason": map[bool]string{true: "expired_or_canceled_card"}[status == "failed"],
			"metadata": map[string]string{"checkout_session_id": "cs_test_events", "org_id": "org-events", "operation_id": "op-refund"},
		}
	}
	refundEvent := payments.Event{
		ID: "evt_1", Type: payments.EventRefundSucceeded, SessionID: "cs_test_events", OrgID: "org-events",
		AmountMinor: 700, Currency: "EUR", RefundID: "re_ours", OccurredAt: occurred,
		Metadata: map[string]string{"checkout_session_id": "cs_test_events", "org_id": "org-events", "operation_id": "op-refund"},
	}

	for _, c := range []struct {
		name  string
		typ   string
		obj   map[string]any
		want  []payments.Event
		calls []string // API calls the translation needs, "METHOD path?query"
	}{
		{"completed and paid", "checkout.session.completed", session("paid", nil), []payments.Event{completed}, nil},
		{"completed but unpaid: the core must not credit", "checkout.session.completed", session("unpaid", nil),
			with(completed, func(e *payments.Event) { e.PaymentStatus = payments.StatusUnpaid }), nil},
		{"delayed payment succeeded", "checkout.session.async_payment_succeeded", session("paid", nil), []payments.Event{completed}, nil},
		{"expired", "checkout.session.expired", session("unpaid", func(o map[string]any) { o["status"] = "expired" }),
			with(completed, func(e *payments.Event) {
				e.Type, e.PaymentStatus = payments.EventCheckoutExpired, payments.StatusUnpaid
			}), nil},
		{"delayed payment failed", "checkout.session.async_payment_failed", session("unpaid", nil),
			with(completed, func(e *payments.Event) { e.Type, e.PaymentStatus = payments.EventPaymentFailed, payments.StatusUnpaid }), nil},
		{"org from client_reference_id", "checkout.session.completed", session("paid", func(o map[string]any) { o["metadata"] = map[string]string{} }),
			with(completed, func(e *payments.Event) { e.Metadata = map[string]string{} }), nil},
		{"a session gpuaas did not make", "checkout.session.completed",
			session("paid", func(o map[string]any) { o["metadata"], o["client_reference_id"] = map[string]string{}, nil }), nil, nil},
		{"payment attempt failed", "payment_intent.payment_failed", map[string]any{
			"id": "pi_failed", "object": "payment_intent", "amount": 5000, "currency": "eur", "customer": "cus_org-events",
			"metadata":           map[string]string{"org_id": "org-events", "operation_id": "op-events"},
			"last_payment_error": map[string]any{"type": "card_error", "code": "card_declined", "decline_code": "insufficient_funds"},
		}, []payments.Event{{
			ID: "evt_1", Type: payments.EventPaymentFailed, SessionID: "<from stripe-mock>", OrgID: "org-events", CustomerRef: "cus_org-events",
			AmountMinor: 5000, Currency: "EUR", PaymentStatus: payments.StatusUnpaid, OccurredAt: occurred,
			Metadata: map[string]string{"org_id": "org-events", "operation_id": "op-events", "payment_intent": "pi_failed",
				"failure_code": "card_declined", "decline_code": "insufficient_funds"},
		}}, []string{"GET /v1/checkout/sessions?limit=1&payment_intent=pi_failed"}},
		{"payment failed outside gpuaas", "payment_intent.payment_failed", map[string]any{
			"id": "pi_other", "object": "payment_intent", "amount": 100, "currency": "usd", "metadata": map[string]string{},
		}, nil, nil},
		{"refund succeeded", "refund.updated", ourRefund("succeeded"), []payments.Event{refundEvent}, nil},
		{"refund created and done at once", "refund.created", ourRefund("succeeded"), []payments.Event{refundEvent}, nil},
		{"refund failed", "refund.updated", ourRefund("failed"), with(refundEvent, func(e *payments.Event) {
			e.Type = payments.EventRefundFailed
			e.Metadata = map[string]string{"checkout_session_id": "cs_test_events", "org_id": "org-events", "operation_id": "op-refund",
				"failure_reason": "expired_or_canceled_card"}
		}), nil},
		{"refund still pending", "refund.updated", ourRefund("pending"), nil, nil},
		{"charge refunded, refunds in the event", "charge.refunded", map[string]any{
			"id": "ch_1", "object": "charge", "amount": 5000, "amount_refunded": 700, "currency": "eur", "payment_intent": "pi_cs_test_events",
			"refunds": map[string]any{"object": "list", "has_more": false, "data": []any{ourRefund("succeeded")}},
		}, with(refundEvent, func(e *payments.Event) { e.ID = "evt_1/re_ours" }), nil},
		{"charge refunded, refunds listed from Stripe", "charge.refunded", map[string]any{
			"id": "ch_2", "object": "charge", "amount": 5000, "amount_refunded": 700, "currency": "eur", "payment_intent": "pi_2",
		}, nil, []string{"GET /v1/refunds?charge=ch_2", "GET /v1/checkout/sessions?limit=1&payment_intent=pi_2"}}, // stripe-mock's session has no org: not ours
		{"an event the core need not hear about", "customer.created", map[string]any{"id": "cus_1", "object": "customer"}, nil, nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := rec.count()
			hook := signed(eventJSON(t, "evt_1", c.typ, occurred, c.obj), testWebhookSecret, clock)
			events, err := d.HandleWebhook(context.Background(), &hook)
			if err != nil {
				t.Fatal(err)
			}
			if len(c.want) == 1 && c.want[0].SessionID == "<from stripe-mock>" && len(events) == 1 {
				if !strings.HasPrefix(events[0].SessionID, "cs_") {
					t.Errorf("SessionID %q, want the session Stripe found", events[0].SessionID)
				}
				c.want[0].SessionID = events[0].SessionID
			}
			if len(events) != len(c.want) || (len(events) > 0 && !reflect.DeepEqual(events, c.want)) {
				t.Errorf("events\n got %+v\nwant %+v", events, c.want)
			}
			rec.mu.Lock()
			var calls []string
			for _, call := range rec.calls[before:] {
				calls = append(calls, call.Method+" "+call.Path+"?"+call.Form.Encode())
			}
			rec.mu.Unlock()
			if !reflect.DeepEqual(calls, c.calls) {
				t.Errorf("API calls %v, want %v", calls, c.calls)
			}
		})
	}
}
