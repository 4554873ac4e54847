package payments

import (
	"context"
	"errors"
	"fmt"
	"regexp"

	"github.com/gpuaas/gpuaas/sdk/base"
	paymentspb "github.com/gpuaas/gpuaas/sdk/payments/proto"
)

// Server serves a Driver over gRPC. It checks the arguments the contract
// promises the driver before the driver sees them.
type Server struct {
	paymentspb.UnimplementedPaymentsServer

	impl Driver
}

var _ paymentspb.PaymentsServer = (*Server)(nil)

// NewServer wraps impl.
func NewServer(impl Driver) *Server { return &Server{impl: impl} }

var currencyRE = regexp.MustCompile(`^[A-Z]{3}$`)

func required(what, v string) error {
	if v == "" {
		return fmt.Errorf("%s: empty: %w", what, base.ErrInvalidArgument)
	}
	return nil
}

func checkMoney(amount int64, currency string) error {
	var errs []error
	if amount <= 0 {
		errs = append(errs, fmt.Errorf("amount %d: not positive: %w", amount, base.ErrInvalidArgument))
	}
	if !currencyRE.MatchString(currency) {
		errs = append(errs, fmt.Errorf("currency %q: want an upper-case ISO 4217 code: %w", currency, base.ErrInvalidArgument))
	}
	return errors.Join(errs...)
}

func nothing(call string) error {
	return base.StatusFromError(fmt.Errorf("payments: %s: driver returned nothing: %w", call, base.ErrInternal))
}

// CreateCheckout implements paymentspb.PaymentsServer.
func (s *Server) CreateCheckout(ctx context.Context, req *paymentspb.CreateCheckoutRequest) (*paymentspb.CheckoutSession, error) {
	r := checkoutFromProto(req)
	if err := errors.Join(required("operation id", r.OperationID), required("org id", r.OrgID),
		checkMoney(r.AmountMinor, r.Currency)); err != nil {
		return nil, base.StatusFromError(fmt.Errorf("payments: create checkout: %w", err))
	}
	sess, err := s.impl.CreateCheckout(ctx, r)
	if err != nil {
		return nil, base.StatusFromError(err)
	}
	if sess == nil {
		return nil, nothing("create checkout")
	}
	return sessionToProto(sess), nil
}

// CreatePortal implements paymentspb.PaymentsServer.
func (s *Server) CreatePortal(ctx context.Context, req *paymentspb.CreatePortalRequest) (*paymentspb.PortalSession, error) {
	pc, ok := s.impl.(PortalCreator)
	if !ok {
		return nil, base.StatusFromError(fmt.Errorf("payments: create portal: driver has no portal: %w", base.ErrUnimplemented))
	}
	r := portalFromProto(req)
	if err := errors.Join(required("operation id", r.OperationID), required("org id", r.OrgID)); err != nil {
		return nil, base.StatusFromError(fmt.Errorf("payments: create portal: %w", err))
	}
	sess, err := pc.CreatePortal(ctx, r)
	if err != nil {
		return nil, base.StatusFromError(err)
	}
	if sess == nil {
		return nil, nothing("create portal")
	}
	return portalSessionToProto(sess), nil
}

// HandleWebhook implements paymentspb.PaymentsServer.
func (s *Server) HandleWebhook(ctx context.Context, req *paymentspb.WebhookRequest) (*paymentspb.WebhookResponse, error) {
	events, err := s.impl.HandleWebhook(ctx, webhookFromProto(req))
	if err != nil {
		return nil, base.StatusFromError(err)
	}
	return eventsToProto(events), nil
}

// Refund implements paymentspb.PaymentsServer.
func (s *Server) Refund(ctx context.Context, req *paymentspb.RefundRequest) (*paymentspb.RefundResponse, error) {
	rf, ok := s.impl.(Refunder)
	if !ok {
		return nil, base.StatusFromError(fmt.Errorf("payments: refund: driver cannot refund: %w", base.ErrUnimplemented))
	}
	r := refundFromProto(req)
	if err := errors.Join(required("operation id", r.OperationID), required("session id", r.SessionID),
		checkMoney(r.AmountMinor, r.Currency)); err != nil {
		return nil, base.StatusFromError(fmt.Errorf("payments: refund: %w", err))
	}
	res, err := rf.Refund(ctx, r)
	if err != nil {
		return nil, base.StatusFromError(err)
	}
	if res == nil {
		return nil, nothing("refund")
	}
	return refundResultToProto(res), nil
}
