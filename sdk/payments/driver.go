// Package payments is the contract of a payments driver: hosted checkout
// for prepaid credit, the customer portal, webhook normalisation and
// refunds. Amounts are integer minor units (cents) with an upper-case ISO
// 4217 currency code.
package payments

import (
	"context"
	"net/http"
	"time"

	"github.com/gpuaas/gpuaas/sdk/base"
)

// Driver is what a payments driver implements. Errors wrap the base
// sentinels. Calls that change state carry an OperationID: a call repeated
// with the same OperationID has one effect and returns the same result (the
// same session); reusing an OperationID with different arguments returns
// base.ErrConflict.
type Driver interface {
	base.BasePlugin

	// CreateCheckout opens a hosted checkout session for a top-up.
	CreateCheckout(ctx context.Context, req *CheckoutRequest) (*CheckoutSession, error)
	// HandleWebhook verifies a webhook exactly as received and translates
	// it into payment events. A webhook that fails verification is
	// base.ErrUnauthenticated; one that cannot be parsed
	// base.ErrInvalidArgument; a verified event the core need not hear
	// about yields no events.
	HandleWebhook(ctx context.Context, hook *Webhook) ([]Event, error)
}

// PortalCreator is the optional capability to open the provider's customer
// portal (base.CapabilityPortal).
type PortalCreator interface {
	CreatePortal(ctx context.Context, req *PortalRequest) (*PortalSession, error)
}

// Refunder is the optional capability to refund a paid checkout
// (base.CapabilityRefund). An unknown session is base.ErrNotFound.
type Refunder interface {
	Refund(ctx context.Context, req *RefundRequest) (*Refund, error)
}

// CheckoutRequest asks for a checkout of AmountMinor in Currency.
type CheckoutRequest struct {
	OperationID string
	OrgID       string
	// CustomerRef is the provider's customer id, when the org has one.
	CustomerRef string
	AmountMinor int64
	Currency    string
	SuccessURL  string
	CancelURL   string
	Metadata    map[string]string
	// ExpiresAt, when set, is when the session closes; zero leaves the
	// provider's default. It is an argument like any other: the core picks
	// it once per payment session and sends the same value on every retry,
	// so a retried call stays identical.
	ExpiresAt time.Time
}

// CheckoutSession is where the tenant pays.
type CheckoutSession struct {
	SessionID string
	URL       string
	ExpiresAt time.Time
	// CustomerRef is the provider's customer the session charges: the
	// request's CustomerRef, or the customer the driver created for the org
	// when the request had none. The core stores it for the org and passes
	// it on later calls, so each org has one customer.
	CustomerRef string
}

// PortalRequest asks for a customer portal session.
type PortalRequest struct {
	OperationID string
	OrgID       string
	CustomerRef string
	ReturnURL   string
}

// PortalSession is the portal's URL.
type PortalSession struct {
	URL       string
	ExpiresAt time.Time
}

// Webhook is an inbound webhook exactly as received.
type Webhook struct {
	Body   []byte
	Header http.Header
}

// EventType says what happened.
type EventType string

// Payment event types.
const (
	EventCheckoutCompleted EventType = "checkout.completed"
	EventCheckoutExpired   EventType = "checkout.expired"
	EventPaymentFailed     EventType = "payment.failed"
	EventRefundSucceeded   EventType = "refund.succeeded"
	EventRefundFailed      EventType = "refund.failed"
)

// PaymentStatus is the provider's payment status of a session.
type PaymentStatus string

// Payment statuses.
const (
	StatusPaid              PaymentStatus = "paid"
	StatusUnpaid            PaymentStatus = "unpaid"
	StatusNoPaymentRequired PaymentStatus = "no_payment_required"
)

// Event is one verified, normalised payment event. ID is the provider's
// event id: stable across redeliveries, so the core credits once.
type Event struct {
	ID            string
	Type          EventType
	SessionID     string
	OrgID         string
	CustomerRef   string
	AmountMinor   int64
	Currency      string
	PaymentStatus PaymentStatus
	RefundID      string
	OccurredAt    time.Time
	Metadata      map[string]string
}

// RefundRequest refunds AmountMinor of a paid session.
type RefundRequest struct {
	OperationID string
	SessionID   string
	AmountMinor int64
	Currency    string
	Reason      string
}

// RefundStatus is where a refund stands.
type RefundStatus string

// Refund statuses.
const (
	RefundPending   RefundStatus = "pending"
	RefundSucceeded RefundStatus = "succeeded"
	RefundFailed    RefundStatus = "failed"
)

// Refund is the result of Refund.
type Refund struct {
	RefundID    string
	Status      RefundStatus
	AmountMinor int64
	Currency    string
}
