package stripe

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"strconv"
	"strings"
	"time"

	stripeapi "github.com/stripe/stripe-go/v76"
	"github.com/stripe/stripe-go/v76/webhook"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/payments"
)

// SignatureHeader is the header Stripe signs webhooks in.
const SignatureHeader = "Stripe-Signature"

// WebhookTolerance is how far a webhook's signed timestamp may be from the
// driver's clock, in either direction. stripe-go only refuses old
// timestamps; a future one is refused here too, so a signature cannot be
// made ahead of time to be replayed later.
const WebhookTolerance = 300 * time.Second

// HandleWebhook implements payments.Driver. It verifies the Stripe-Signature
// over the body exactly as received before it parses anything, then
// translates the event:
//
//	checkout.session.completed,
//	checkout.session.async_payment_succeeded → EventCheckoutCompleted (PaymentStatus says whether it is paid)
//	checkout.session.expired                  → EventCheckoutExpired
//	checkout.session.async_payment_failed,
//	payment_intent.payment_failed             → EventPaymentFailed
//	charge.refunded, refund.created,
//	refund.updated                            → EventRefundSucceeded / EventRefundFailed, one per refund in a final state
//
// Other event types, and events about payments gpuaas did not start, yield
// no events. Event ids are Stripe's (for charge.refunded, "<event>/<refund>"
// per refund), stable across redeliveries. A refund event names its refund,
// so the core can also tell the same refund reported by two event types.
func (d *Driver) HandleWebhook(ctx context.Context, hook *payments.Webhook) ([]payments.Event, error) {
	s, err := d.enter(ctx, "webhook")
	if err != nil {
		return nil, err
	}
	if err := verifySignature(hook, s.webhookSecret, d.now()); err != nil {
		return nil, err
	}
	var ev stripeapi.Event
	if err := json.Unmarshal(hook.Body, &ev); err != nil {
		return nil, fmt.Errorf("stripe: webhook: body is not a Stripe event: %v: %w", err, base.ErrInvalidArgument)
	}
	if ev.ID == "" || ev.Type == "" || ev.Data == nil || len(ev.Data.Raw) == 0 {
		return nil, fmt.Errorf("stripe: webhook: event without id, type or data object: %w", base.ErrInvalidArgument)
	}
	events, err := d.translate(ctx, s, &ev)
	if err != nil {
		return nil, err
	}
	d.logger.Debug("webhook verified", "event_id", ev.ID, "event_type", ev.Type, "events", len(events))
	return events, nil
}

// verifySignature checks the Stripe-Signature header of hook against body
// and secret, and that its timestamp is within WebhookTolerance of now.
func verifySignature(hook *payments.Webhook, secret string, now time.Time) error {
	unauthenticated := func(format string, args ...any) error {
		return fmt.Errorf("stripe: webhook: %s: %w", fmt.Sprintf(format, args...), base.ErrUnauthenticated)
	}
	// Header names are matched without regard to case: they crossed the
	// plugin boundary in whatever form the host received them.
	var values []string
	for name, v := range hook.Header {
		if strings.EqualFold(name, SignatureHeader) {
			values = append(values, v...)
		}
	}
	switch {
	case len(values) == 0 || values[0] == "":
		return unauthenticated("no %s header", SignatureHeader)
	case len(values) > 1:
		return unauthenticated("%d %s headers, want one", len(values), SignatureHeader)
	}
	header := values[0]
	signedAt, err := signatureTime(header)
	if err != nil {
		return unauthenticated("%s header: %v", SignatureHeader, err)
	}
	if skew := now.Sub(signedAt); skew > WebhookTolerance || skew < -WebhookTolerance {
		return unauthenticated("signed at %s, %s from now, beyond the %s tolerance",
			signedAt.UTC().Format(time.RFC3339), skew.Round(time.Second), WebhookTolerance)
	}
	if err := webhook.ValidatePayloadIgnoringTolerance(hook.Body, header, secret); err != nil {
		return unauthenticated("%v", err)
	}
	return nil
}

// signatureTime returns the one t= timestamp of a Stripe-Signature header
// ("t=1495999758,v1=…,v0=…"), parsed as stripe-go parses it.
func signatureTime(header string) (time.Time, error) {
	var ts []string
	for _, pair := range strings.Split(header, ",") {
		k, v, ok := strings.Cut(pair, "=")
		if ok && k == "t" {
			ts = append(ts, v)
		}
	}
	if len(ts) != 1 {
		return time.Time{}, fmt.Errorf("%d timestamps, want one", len(ts))
	}
	sec, err := strconv.ParseInt(ts[0], 10, 64)
	if err != nil {
		return time.Time{}, fmt.Errorf("timestamp %q is not a number", ts[0])
	}
	return time.Unix(sec, 0), nil
}

// translate turns a verified Stripe event into payment events.
func (d *Driver) translate(ctx context.Context, s *settings, ev *stripeapi.Event) ([]payments.Event, error) {
	switch ev.Type {
	case stripeapi.EventTypeCheckoutSessionCompleted, stripeapi.EventTypeCheckoutSessionAsyncPaymentSucceeded:
		return sessionEvent(ev, payments.EventCheckoutCompleted)
	case stripeapi.EventTypeCheckoutSessionExpired:
		return sessionEvent(ev, payments.EventCheckoutExpired)
	case stripeapi.EventTypeCheckoutSessionAsyncPaymentFailed:
		return sessionEvent(ev, payments.EventPaymentFailed)
	case stripeapi.EventTypePaymentIntentPaymentFailed:
		return d.paymentFailedEvent(ctx, s, ev)
	case stripeapi.EventTypeChargeRefunded:
		return d.chargeRefundedEvents(ctx, s, ev)
	case stripeapi.EventTypeRefundCreated, stripeapi.EventTypeRefundUpdated:
		return d.refundEvent(ctx, s, ev)
	}
	return nil, nil
}

func decodeObject(ev *stripeapi.Event, into any) error {
	if err := json.Unmarshal(ev.Data.Raw, into); err != nil {
		return fmt.Errorf("stripe: webhook: event %s (%s): data object: %v: %w", ev.ID, ev.Type, err, base.ErrInvalidArgument)
	}
	return nil
}

func occurred(ev *stripeapi.Event) time.Time { return unixTime(ev.Created) }

func customerID(c *stripeapi.Customer) string {
	if c == nil {
		return ""
	}
	return c.ID
}

func paymentStatus(s stripeapi.CheckoutSessionPaymentStatus) payments.PaymentStatus {
	switch s {
	case stripeapi.CheckoutSessionPaymentStatusPaid:
		return payments.StatusPaid
	case stripeapi.CheckoutSessionPaymentStatusUnpaid:
		return payments.StatusUnpaid
	case stripeapi.CheckoutSessionPaymentStatusNoPaymentRequired:
		return payments.StatusNoPaymentRequired
	}
	return payments.PaymentStatus(s)
}

// sessionEvent translates the checkout.session.* events. A session with no
// org (not made by gpuaas) yields nothing.
func sessionEvent(ev *stripeapi.Event, typ payments.EventType) ([]payments.Event, error) {
	var cs stripeapi.CheckoutSession
	if err := decodeObject(ev, &cs); err != nil {
		return nil, err
	}
	if cs.ID == "" {
		return nil, fmt.Errorf("stripe: webhook: event %s: checkout session without id: %w", ev.ID, base.ErrInvalidArgument)
	}
	org := sessionOrg(&cs)
	if org == "" {
		return nil, nil
	}
	return []payments.Event{{
		ID:            ev.ID,
		Type:          typ,
		SessionID:     cs.ID,
		OrgID:         org,
		CustomerRef:   customerID(cs.Customer),
		AmountMinor:   cs.AmountTotal,
		Currency:      strings.ToUpper(string(cs.Currency)),
		PaymentStatus: paymentStatus(cs.PaymentStatus),
		OccurredAt:    occurred(ev),
		Metadata:      maps.Clone(cs.Metadata),
	}}, nil
}

// sessionOfPayment finds the Checkout Session that made the PaymentIntent
// pi, or nil when none did.
func sessionOfPayment(ctx context.Context, s *settings, call, pi string) (*stripeapi.CheckoutSession, error) {
	params := &stripeapi.CheckoutSessionListParams{PaymentIntent: stripeapi.String(pi)}
	params.Context = ctx
	params.Limit = stripeapi.Int64(1)
	params.Single = true
	it := s.checkout.List(params)
	if it.Next() {
		return it.CheckoutSession(), nil
	}
	if err := it.Err(); err != nil {
		return nil, apiError(ctx, call+": find the checkout session of payment "+pi, err)
	}
	return nil, nil
}

// paymentFailedEvent translates payment_intent.payment_failed. Checkout
// lets the tenant try again in the same session, so the event reports an
// attempt, not the end of the session.
func (d *Driver) paymentFailedEvent(ctx context.Context, s *settings, ev *stripeapi.Event) ([]payments.Event, error) {
	var pi stripeapi.PaymentIntent
	if err := decodeObject(ev, &pi); err != nil {
		return nil, err
	}
	if pi.ID == "" {
		return nil, fmt.Errorf("stripe: webhook: event %s: payment intent without id: %w", ev.ID, base.ErrInvalidArgument)
	}
	if pi.Metadata[MetaOrgID] == "" {
		return nil, nil // not a gpuaas checkout's payment
	}
	cs, err := sessionOfPayment(ctx, s, "webhook "+ev.ID, pi.ID)
	if err != nil || cs == nil {
		return nil, err
	}
	meta := maps.Clone(pi.Metadata)
	meta["payment_intent"] = pi.ID
	if pi.LastPaymentError != nil {
		if code := pi.LastPaymentError.Code; code != "" {
			meta["failure_code"] = string(code)
		}
		if dc := pi.LastPaymentError.DeclineCode; dc != "" {
			meta["decline_code"] = string(dc)
		}
	}
	return []payments.Event{{
		ID:            ev.ID,
		Type:          payments.EventPaymentFailed,
		SessionID:     cs.ID,
		OrgID:         pi.Metadata[MetaOrgID],
		CustomerRef:   customerID(pi.Customer),
		AmountMinor:   pi.Amount,
		Currency:      strings.ToUpper(string(pi.Currency)),
		PaymentStatus: payments.StatusUnpaid,
		OccurredAt:    occurred(ev),
		Metadata:      meta,
	}}, nil
}

// refundOrigin is what a refund event says about where the money came from.
type refundOrigin struct {
	sessionID, orgID, customerID string
}

// originOf finds the session and org of a refund of PaymentIntent pi,
// preferring what the driver wrote into the refund's metadata.
func originOf(ctx context.Context, s *settings, call string, meta map[string]string, pi string) (*refundOrigin, error) {
	if meta[MetaSessionID] != "" && meta[MetaOrgID] != "" {
		return &refundOrigin{sessionID: meta[MetaSessionID], orgID: meta[MetaOrgID]}, nil
	}
	if pi == "" {
		return nil, nil
	}
	cs, err := sessionOfPayment(ctx, s, call, pi)
	if err != nil || cs == nil {
		return nil, err
	}
	org := sessionOrg(cs)
	if org == "" {
		return nil, nil
	}
	return &refundOrigin{sessionID: cs.ID, orgID: org, customerID: customerID(cs.Customer)}, nil
}

func refundEventOf(id string, ev *stripeapi.Event, r *stripeapi.Refund, o *refundOrigin) (payments.Event, bool) {
	var typ payments.EventType
	switch refundStatus(r.Status) {
	case payments.RefundSucceeded:
		typ = payments.EventRefundSucceeded
	case payments.RefundFailed:
		typ = payments.EventRefundFailed
	default:
		return payments.Event{}, false // not final yet: a later refund.updated reports it
	}
	meta := maps.Clone(r.Metadata)
	if meta == nil {
		meta = map[string]string{}
	}
	if r.FailureReason != "" {
		meta["failure_reason"] = string(r.FailureReason)
	}
	return payments.Event{
		ID:          id,
		Type:        typ,
		SessionID:   o.sessionID,
		OrgID:       o.orgID,
		CustomerRef: o.customerID,
		AmountMinor: r.Amount,
		Currency:    strings.ToUpper(string(r.Currency)),
		RefundID:    r.ID,
		OccurredAt:  occurred(ev),
		Metadata:    meta,
	}, true
}

func paymentIntentID(pi *stripeapi.PaymentIntent) string {
	if pi == nil {
		return ""
	}
	return pi.ID
}

// refundEvent translates refund.created and refund.updated.
func (d *Driver) refundEvent(ctx context.Context, s *settings, ev *stripeapi.Event) ([]payments.Event, error) {
	var r stripeapi.Refund
	if err := decodeObject(ev, &r); err != nil {
		return nil, err
	}
	if r.ID == "" {
		return nil, fmt.Errorf("stripe: webhook: event %s: refund without id: %w", ev.ID, base.ErrInvalidArgument)
	}
	if refundStatus(r.Status) != payments.RefundSucceeded && refundStatus(r.Status) != payments.RefundFailed {
		return nil, nil
	}
	o, err := originOf(ctx, s, "webhook "+ev.ID, r.Metadata, paymentIntentID(r.PaymentIntent))
	if err != nil || o == nil {
		return nil, err
	}
	e, _ := refundEventOf(ev.ID, ev, &r, o)
	return []payments.Event{e}, nil
}

// chargeRefundedEvents translates charge.refunded: one event per refund of
// the charge in a final state, from the refund list in the event or, when
// the API version leaves it out, from Stripe.
func (d *Driver) chargeRefundedEvents(ctx context.Context, s *settings, ev *stripeapi.Event) ([]payments.Event, error) {
	var ch stripeapi.Charge
	if err := decodeObject(ev, &ch); err != nil {
		return nil, err
	}
	if ch.ID == "" {
		return nil, fmt.Errorf("stripe: webhook: event %s: charge without id: %w", ev.ID, base.ErrInvalidArgument)
	}
	pi := paymentIntentID(ch.PaymentIntent)
	if pi == "" {
		return nil, nil // not a PaymentIntent charge: not from Checkout
	}
	call := "webhook " + ev.ID
	var refunds []*stripeapi.Refund
	if ch.Refunds != nil && len(ch.Refunds.Data) > 0 && !ch.Refunds.HasMore {
		refunds = ch.Refunds.Data
	} else {
		params := &stripeapi.RefundListParams{Charge: stripeapi.String(ch.ID)}
		params.Context = ctx
		it := s.refunds.List(params)
		for it.Next() {
			refunds = append(refunds, it.Refund())
		}
		if err := it.Err(); err != nil {
			return nil, apiError(ctx, call+": list the refunds of charge "+ch.ID, err)
		}
	}
	var o *refundOrigin
	var events []payments.Event
	for _, r := range refunds {
		if r == nil || r.ID == "" {
			continue
		}
		if o == nil {
			var err error
			if o, err = originOf(ctx, s, call, r.Metadata, pi); err != nil {
				return nil, err
			}
			if o == nil {
				return nil, nil // not a gpuaas checkout's charge
			}
		}
		ro := *o
		if r.Metadata[MetaSessionID] != "" {
			ro.sessionID = r.Metadata[MetaSessionID]
		}
		if e, ok := refundEventOf(ev.ID+"/"+r.ID, ev, r, &ro); ok {
			events = append(events, e)
		}
	}
	return events, nil
}
