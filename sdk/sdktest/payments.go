package sdktest

import (
	"context"
	"net/http"
	"net/url"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/payments"
)

// PaymentsSuite is the conformance suite of a payments driver.
type PaymentsSuite struct {
	// Config returns a valid configuration (JSON-shaped values) for one
	// plugin instance.
	Config func(t testing.TB) map[string]any
	// Checkout is the template of a checkout; the kit fills OperationID.
	// OrgID, AmountMinor and Currency are required.
	Checkout payments.CheckoutRequest
	// CompletedWebhook returns a valid, signed webhook saying session (made
	// from req) was paid in full, as the provider would send it.
	CompletedWebhook func(t testing.TB, req payments.CheckoutRequest, session *payments.CheckoutSession) payments.Webhook
	// SlowConfig, if set, returns a configuration under which
	// CreateCheckout blocks for seconds unless its context ends; the kit
	// uses it to check cancellation in the middle of a call. Without it
	// that check runs in process only.
	SlowConfig func(t testing.TB) map[string]any
}

// Run runs the suite against target.
func (s PaymentsSuite) Run(t *testing.T, target Target) {
	t.Helper()
	if s.Config == nil || s.CompletedWebhook == nil {
		t.Fatal("PaymentsSuite.Config and CompletedWebhook are required")
	}
	if s.Checkout.OrgID == "" || s.Checkout.AmountMinor <= 0 || s.Checkout.Currency == "" {
		t.Fatal("PaymentsSuite.Checkout needs OrgID, a positive AmountMinor and Currency")
	}
	d := ConnectPayments(t, target)
	info := runBaseChecks(t, d, base.KindPayments, payments.SupportedAPIVersions(),
		[]string{base.CapabilityPortal, base.CapabilityRefund}, s.Config(t))
	if t.Failed() {
		t.FailNow()
	}
	ids := newOpIDs(t)
	ctx := testContext(t)

	req := s.Checkout
	req.OperationID = ids.next("checkout")
	var session *payments.CheckoutSession
	ok := t.Run("checkout", func(t *testing.T) {
		var err error
		session, err = d.CreateCheckout(ctx, &req)
		wantOK(t, "CreateCheckout", err)
		if session.SessionID == "" {
			t.Error("CreateCheckout: no session id")
		}
		if u, err := url.Parse(session.URL); err != nil || !u.IsAbs() {
			t.Errorf("CreateCheckout: URL %q is not absolute", session.URL)
		}
		if !session.ExpiresAt.After(time.Now()) {
			t.Errorf("CreateCheckout: session expires at %s, in the past", session.ExpiresAt)
		}
		again, err := d.CreateCheckout(ctx, &req)
		wantOK(t, "CreateCheckout retried", err)
		if again.SessionID != session.SessionID || again.URL != session.URL {
			t.Errorf("CreateCheckout retried with the same operation id opened session %q, first %q (a retry must have one effect)",
				again.SessionID, session.SessionID)
		}
		other := req
		other.AmountMinor++
		_, err = d.CreateCheckout(ctx, &other)
		wantErr(t, "CreateCheckout reusing the operation id for another amount", err, base.ErrConflict)
	})
	if !ok {
		t.FailNow()
	}

	t.Run("invalid arguments", func(t *testing.T) {
		for _, c := range []struct {
			name  string
			patch func(r *payments.CheckoutRequest)
		}{
			{"no operation id", func(r *payments.CheckoutRequest) { r.OperationID = "" }},
			{"zero amount", func(r *payments.CheckoutRequest) { r.AmountMinor = 0 }},
			{"negative amount", func(r *payments.CheckoutRequest) { r.AmountMinor = -100 }},
			{"lower-case currency", func(r *payments.CheckoutRequest) { r.Currency = "usd" }},
			{"no org", func(r *payments.CheckoutRequest) { r.OrgID = "" }},
		} {
			t.Run(c.name, func(t *testing.T) {
				r := s.Checkout
				r.OperationID = ids.next("checkout")
				c.patch(&r)
				_, err := d.CreateCheckout(ctx, &r)
				wantErr(t, "CreateCheckout", err, base.ErrInvalidArgument)
			})
		}
	})

	t.Run("webhook", func(t *testing.T) {
		hook := s.CompletedWebhook(t, req, session)
		events, err := d.HandleWebhook(ctx, &hook)
		wantOK(t, "HandleWebhook", err)
		var completed *payments.Event
		for i := range events {
			if events[i].Type == payments.EventCheckoutCompleted {
				completed = &events[i]
			}
		}
		if completed == nil {
			t.Fatalf("HandleWebhook of the completed webhook returned %+v, no %s event", events, payments.EventCheckoutCompleted)
		}
		if completed.ID == "" || completed.SessionID != session.SessionID || completed.AmountMinor != req.AmountMinor ||
			completed.Currency != req.Currency || completed.PaymentStatus != payments.StatusPaid {
			t.Errorf("completed event %+v: want an id, session %q, %d %s, paid", completed, session.SessionID, req.AmountMinor, req.Currency)
		}
		again, err := d.HandleWebhook(ctx, &hook)
		wantOK(t, "HandleWebhook redelivered", err)
		if len(again) != len(events) || again[0].ID != events[0].ID {
			t.Error("a redelivered webhook yields other event ids; the core could not drop the duplicate")
		}
		checkTamperedWebhook(t, hook.Body, hook.Header, func(body []byte, h http.Header) error {
			_, err := d.HandleWebhook(ctx, &payments.Webhook{Body: body, Header: h})
			return err
		})
	})

	t.Run("optional portal", func(t *testing.T) {
		preq := &payments.PortalRequest{OperationID: ids.next("portal"), OrgID: req.OrgID, CustomerRef: req.CustomerRef, ReturnURL: req.SuccessURL}
		p, err := d.CreatePortal(ctx, preq)
		if !info.HasCapability(base.CapabilityPortal) {
			wantErr(t, "CreatePortal without the portal capability", err, base.ErrUnimplemented)
			return
		}
		wantOK(t, "CreatePortal", err)
		if u, err := url.Parse(p.URL); err != nil || !u.IsAbs() {
			t.Errorf("CreatePortal: URL %q is not absolute", p.URL)
		}
		again, err := d.CreatePortal(ctx, preq)
		wantOK(t, "CreatePortal retried", err)
		if again.URL != p.URL {
			t.Error("CreatePortal retried with the same operation id returned another URL")
		}
	})

	t.Run("optional refund", func(t *testing.T) {
		rreq := &payments.RefundRequest{OperationID: ids.next("refund"), SessionID: session.SessionID, AmountMinor: 1, Currency: req.Currency, Reason: "sdktest"}
		r, err := d.Refund(ctx, rreq)
		if !info.HasCapability(base.CapabilityRefund) {
			wantErr(t, "Refund without the refund capability", err, base.ErrUnimplemented)
			return
		}
		wantOK(t, "Refund of the paid session", err)
		if r.RefundID == "" || r.AmountMinor != 1 || r.Currency != req.Currency ||
			(r.Status != payments.RefundPending && r.Status != payments.RefundSucceeded) {
			t.Errorf("Refund returned %+v", r)
		}
		again, err := d.Refund(ctx, rreq)
		wantOK(t, "Refund retried", err)
		if again.RefundID != r.RefundID {
			t.Errorf("Refund retried with the same operation id made refund %q, first %q (a retry must have one effect)", again.RefundID, r.RefundID)
		}
		other := *rreq
		other.AmountMinor = 2
		_, err = d.Refund(ctx, &other)
		wantErr(t, "Refund reusing the operation id for another amount", err, base.ErrConflict)
		_, err = d.Refund(ctx, &payments.RefundRequest{OperationID: ids.next("refund"), SessionID: "sdktest-no-such-session", AmountMinor: 1, Currency: req.Currency})
		wantErr(t, "Refund of an unknown session", err, base.ErrNotFound)
	})

	t.Run("cancellation", func(t *testing.T) {
		preCancelled(t, "CreateCheckout", func(ctx context.Context) error {
			r := s.Checkout
			r.OperationID = ids.next("checkout")
			_, err := d.CreateCheckout(ctx, &r)
			return err
		})
		if s.SlowConfig == nil {
			return
		}
		slow := ConnectPayments(t, target)
		Configure(t, slow, payments.SupportedAPIVersions(), s.SlowConfig(t))
		cancelMidCall(t, "CreateCheckout under SlowConfig", func(ctx context.Context) error {
			r := s.Checkout
			r.OperationID = ids.next("checkout")
			_, err := slow.CreateCheckout(ctx, &r)
			return err
		})
		dctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer cancel()
		r := s.Checkout
		r.OperationID = ids.next("checkout")
		_, err := slow.CreateCheckout(dctx, &r)
		wantErr(t, "CreateCheckout under SlowConfig past its deadline", err, context.DeadlineExceeded)
	})

	if target.InProcessTarget() {
		t.Run("error mapping", func(t *testing.T) {
			inj := newInjector()
			d := must[*payments.Client](t, connectInProcess(t, &injectedPayments{Driver: target.factory(t).(payments.Driver), inj: inj}, base.KindPayments))
			checkErrorMapping(t, inj, func(ctx context.Context) error {
				r := s.Checkout
				r.OperationID = "sdktest-injected"
				_, err := d.CreateCheckout(ctx, &r)
				return err
			})
		})
	}
}

// injectedPayments fails or blocks CreateCheckout as its injector says.
type injectedPayments struct {
	payments.Driver
	inj *injector
}

var _ payments.Driver = (*injectedPayments)(nil)

func (i *injectedPayments) CreateCheckout(ctx context.Context, req *payments.CheckoutRequest) (*payments.CheckoutSession, error) {
	if err := i.inj.hit(ctx); err != nil {
		return nil, err
	}
	return i.Driver.CreateCheckout(ctx, req)
}
