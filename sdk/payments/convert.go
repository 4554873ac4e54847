package payments

import (
	"maps"
	"net/http"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	paymentspb "github.com/gpuaas/gpuaas/sdk/payments/proto"
)

// This file is the only place payments types meet their protobuf form.

func timeToProto(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

func timeFromProto(t *timestamppb.Timestamp) time.Time {
	if t == nil {
		return time.Time{}
	}
	return t.AsTime()
}

func checkoutToProto(r *CheckoutRequest) *paymentspb.CreateCheckoutRequest {
	return &paymentspb.CreateCheckoutRequest{
		OperationId: r.OperationID,
		OrgId:       r.OrgID,
		CustomerRef: r.CustomerRef,
		AmountMinor: r.AmountMinor,
		Currency:    r.Currency,
		SuccessUrl:  r.SuccessURL,
		CancelUrl:   r.CancelURL,
		Metadata:    maps.Clone(r.Metadata),
		ExpiresAt:   timeToProto(r.ExpiresAt),
	}
}

func checkoutFromProto(p *paymentspb.CreateCheckoutRequest) *CheckoutRequest {
	return &CheckoutRequest{
		OperationID: p.GetOperationId(),
		OrgID:       p.GetOrgId(),
		CustomerRef: p.GetCustomerRef(),
		AmountMinor: p.GetAmountMinor(),
		Currency:    p.GetCurrency(),
		SuccessURL:  p.GetSuccessUrl(),
		CancelURL:   p.GetCancelUrl(),
		Metadata:    maps.Clone(p.GetMetadata()),
		ExpiresAt:   timeFromProto(p.GetExpiresAt()),
	}
}

func sessionToProto(s *CheckoutSession) *paymentspb.CheckoutSession {
	return &paymentspb.CheckoutSession{SessionId: s.SessionID, Url: s.URL, ExpiresAt: timeToProto(s.ExpiresAt), CustomerRef: s.CustomerRef}
}

func sessionFromProto(p *paymentspb.CheckoutSession) *CheckoutSession {
	return &CheckoutSession{SessionID: p.GetSessionId(), URL: p.GetUrl(), ExpiresAt: timeFromProto(p.GetExpiresAt()), CustomerRef: p.GetCustomerRef()}
}

func portalToProto(r *PortalRequest) *paymentspb.CreatePortalRequest {
	return &paymentspb.CreatePortalRequest{OperationId: r.OperationID, OrgId: r.OrgID, CustomerRef: r.CustomerRef, ReturnUrl: r.ReturnURL}
}

func portalFromProto(p *paymentspb.CreatePortalRequest) *PortalRequest {
	return &PortalRequest{OperationID: p.GetOperationId(), OrgID: p.GetOrgId(), CustomerRef: p.GetCustomerRef(), ReturnURL: p.GetReturnUrl()}
}

func portalSessionToProto(s *PortalSession) *paymentspb.PortalSession {
	return &paymentspb.PortalSession{Url: s.URL, ExpiresAt: timeToProto(s.ExpiresAt)}
}

func portalSessionFromProto(p *paymentspb.PortalSession) *PortalSession {
	return &PortalSession{URL: p.GetUrl(), ExpiresAt: timeFromProto(p.GetExpiresAt())}
}

func webhookToProto(w *Webhook) *paymentspb.WebhookRequest {
	out := &paymentspb.WebhookRequest{Body: w.Body, Headers: make(map[string]*paymentspb.Header, len(w.Header))}
	for k, v := range w.Header {
		out.Headers[k] = &paymentspb.Header{Values: append([]string(nil), v...)}
	}
	return out
}

func webhookFromProto(p *paymentspb.WebhookRequest) *Webhook {
	out := &Webhook{Body: p.GetBody(), Header: make(http.Header, len(p.GetHeaders()))}
	for k, v := range p.GetHeaders() {
		out.Header[k] = append([]string(nil), v.GetValues()...)
	}
	return out
}

func eventTypeToProto(t EventType) paymentspb.PaymentEventType {
	switch t {
	case EventCheckoutCompleted:
		return paymentspb.PaymentEventType_PAYMENT_EVENT_TYPE_CHECKOUT_COMPLETED
	case EventCheckoutExpired:
		return paymentspb.PaymentEventType_PAYMENT_EVENT_TYPE_CHECKOUT_EXPIRED
	case EventPaymentFailed:
		return paymentspb.PaymentEventType_PAYMENT_EVENT_TYPE_PAYMENT_FAILED
	case EventRefundSucceeded:
		return paymentspb.PaymentEventType_PAYMENT_EVENT_TYPE_REFUND_SUCCEEDED
	case EventRefundFailed:
		return paymentspb.PaymentEventType_PAYMENT_EVENT_TYPE_REFUND_FAILED
	}
	return paymentspb.PaymentEventType_PAYMENT_EVENT_TYPE_UNSPECIFIED
}

func eventTypeFromProto(t paymentspb.PaymentEventType) EventType {
	switch t {
	case paymentspb.PaymentEventType_PAYMENT_EVENT_TYPE_CHECKOUT_COMPLETED:
		return EventCheckoutCompleted
	case paymentspb.PaymentEventType_PAYMENT_EVENT_TYPE_CHECKOUT_EXPIRED:
		return EventCheckoutExpired
	case paymentspb.PaymentEventType_PAYMENT_EVENT_TYPE_PAYMENT_FAILED:
		return EventPaymentFailed
	case paymentspb.PaymentEventType_PAYMENT_EVENT_TYPE_REFUND_SUCCEEDED:
		return EventRefundSucceeded
	case paymentspb.PaymentEventType_PAYMENT_EVENT_TYPE_REFUND_FAILED:
		return EventRefundFailed
	}
	return ""
}

func paymentStatusToProto(s PaymentStatus) paymentspb.PaymentStatus {
	switch s {
	case StatusPaid:
		return paymentspb.PaymentStatus_PAYMENT_STATUS_PAID
	case StatusUnpaid:
		return paymentspb.PaymentStatus_PAYMENT_STATUS_UNPAID
	case StatusNoPaymentRequired:
		return paymentspb.PaymentStatus_PAYMENT_STATUS_NO_PAYMENT_REQUIRED
	}
	return paymentspb.PaymentStatus_PAYMENT_STATUS_UNSPECIFIED
}

func paymentStatusFromProto(s paymentspb.PaymentStatus) PaymentStatus {
	switch s {
	case paymentspb.PaymentStatus_PAYMENT_STATUS_PAID:
		return StatusPaid
	case paymentspb.PaymentStatus_PAYMENT_STATUS_UNPAID:
		return StatusUnpaid
	case paymentspb.PaymentStatus_PAYMENT_STATUS_NO_PAYMENT_REQUIRED:
		return StatusNoPaymentRequired
	}
	return ""
}

func eventsToProto(events []Event) *paymentspb.WebhookResponse {
	out := &paymentspb.WebhookResponse{Events: make([]*paymentspb.PaymentEvent, 0, len(events))}
	for i := range events {
		e := &events[i]
		out.Events = append(out.Events, &paymentspb.PaymentEvent{
			EventId:       e.ID,
			Type:          eventTypeToProto(e.Type),
			SessionId:     e.SessionID,
			OrgId:         e.OrgID,
			CustomerRef:   e.CustomerRef,
			AmountMinor:   e.AmountMinor,
			Currency:      e.Currency,
			PaymentStatus: paymentStatusToProto(e.PaymentStatus),
			RefundId:      e.RefundID,
			OccurredAt:    timeToProto(e.OccurredAt),
			Metadata:      maps.Clone(e.Metadata),
		})
	}
	return out
}

func eventsFromProto(p *paymentspb.WebhookResponse) []Event {
	out := make([]Event, 0, len(p.GetEvents()))
	for _, pe := range p.GetEvents() {
		out = append(out, Event{
			ID:            pe.GetEventId(),
			Type:          eventTypeFromProto(pe.GetType()),
			SessionID:     pe.GetSessionId(),
			OrgID:         pe.GetOrgId(),
			CustomerRef:   pe.GetCustomerRef(),
			AmountMinor:   pe.GetAmountMinor(),
			Currency:      pe.GetCurrency(),
			PaymentStatus: paymentStatusFromProto(pe.GetPaymentStatus()),
			RefundID:      pe.GetRefundId(),
			OccurredAt:    timeFromProto(pe.GetOccurredAt()),
			Metadata:      maps.Clone(pe.GetMetadata()),
		})
	}
	return out
}

func refundToProto(r *RefundRequest) *paymentspb.RefundRequest {
	return &paymentspb.RefundRequest{OperationId: r.OperationID, SessionId: r.SessionID, AmountMinor: r.AmountMinor, Currency: r.Currency, Reason: r.Reason}
}

func refundFromProto(p *paymentspb.RefundRequest) *RefundRequest {
	return &RefundRequest{OperationID: p.GetOperationId(), SessionID: p.GetSessionId(), AmountMinor: p.GetAmountMinor(), Currency: p.GetCurrency(), Reason: p.GetReason()}
}

func refundStatusToProto(s RefundStatus) paymentspb.RefundStatus {
	switch s {
	case RefundPending:
		return paymentspb.RefundStatus_REFUND_STATUS_PENDING
	case RefundSucceeded:
		return paymentspb.RefundStatus_REFUND_STATUS_SUCCEEDED
	case RefundFailed:
		return paymentspb.RefundStatus_REFUND_STATUS_FAILED
	}
	return paymentspb.RefundStatus_REFUND_STATUS_UNSPECIFIED
}

func refundStatusFromProto(s paymentspb.RefundStatus) RefundStatus {
	switch s {
	case paymentspb.RefundStatus_REFUND_STATUS_PENDING:
		return RefundPending
	case paymentspb.RefundStatus_REFUND_STATUS_SUCCEEDED:
		return RefundSucceeded
	case paymentspb.RefundStatus_REFUND_STATUS_FAILED:
		return RefundFailed
	}
	return ""
}

func refundResultToProto(r *Refund) *paymentspb.RefundResponse {
	return &paymentspb.RefundResponse{RefundId: r.RefundID, Status: refundStatusToProto(r.Status), AmountMinor: r.AmountMinor, Currency: r.Currency}
}

func refundResultFromProto(p *paymentspb.RefundResponse) *Refund {
	return &Refund{RefundID: p.GetRefundId(), Status: refundStatusFromProto(p.GetStatus()), AmountMinor: p.GetAmountMinor(), Currency: p.GetCurrency()}
}
