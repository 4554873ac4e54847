package stripe

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"

	stripeapi "github.com/stripe/stripe-go/v76"

	"github.com/gpuaas/gpuaas/sdk/base"
)

// apiError turns the error of a Stripe API call into one that wraps an SDK
// sentinel. It is the only place Stripe errors are classified:
//
//	the caller's context ended            → context.Canceled / DeadlineExceeded
//	idempotency_error (key reused with other parameters) → ErrConflict
//	idempotency_key_in_use, 409           → ErrUnavailable (the same request is still running; retry)
//	401                                   → ErrUnauthenticated (bad or revoked key)
//	403                                   → ErrPermissionDenied (restricted key lacks a permission)
//	404, resource_missing                 → ErrNotFound
//	429, rate_limit                       → ErrUnavailable
//	5xx, api_error                        → ErrUnavailable
//	402, card_error                       → ErrFailedPrecondition (valid request Stripe declined)
//	400, invalid_request_error            → ErrInvalidArgument
//	no response (connection, TLS)         → ErrUnavailable; a timeout ErrDeadlineExceeded
//
// The message keeps Stripe's own message, type, code and request id, which
// name no secret.
func apiError(ctx context.Context, call string, err error) error {
	if ctxErr := ctx.Err(); ctxErr != nil {
		return fmt.Errorf("stripe: %s: %w", call, ctxErr)
	}
	var se *stripeapi.Error
	if !errors.As(err, &se) {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return fmt.Errorf("stripe: %s: Stripe did not answer in time: %v: %w", call, err, base.ErrDeadlineExceeded)
		}
		return fmt.Errorf("stripe: %s: cannot reach Stripe: %v: %w", call, err, base.ErrUnavailable)
	}
	sentinel := base.ErrInternal
	switch {
	case se.Type == stripeapi.ErrorTypeIdempotency:
		sentinel = base.ErrConflict
	case se.Code == stripeapi.ErrorCodeIdempotencyKeyInUse || se.HTTPStatusCode == http.StatusConflict:
		sentinel = base.ErrUnavailable
	case se.HTTPStatusCode == http.StatusUnauthorized:
		sentinel = base.ErrUnauthenticated
	case se.HTTPStatusCode == http.StatusForbidden:
		sentinel = base.ErrPermissionDenied
	case se.Code == stripeapi.ErrorCodeResourceMissing || se.HTTPStatusCode == http.StatusNotFound:
		sentinel = base.ErrNotFound
	case se.Code == stripeapi.ErrorCodeRateLimit || se.HTTPStatusCode == http.StatusTooManyRequests:
		sentinel = base.ErrUnavailable
	case se.Type == stripeapi.ErrorTypeAPI || se.HTTPStatusCode >= 500:
		sentinel = base.ErrUnavailable
	case se.Type == stripeapi.ErrorTypeCard || se.HTTPStatusCode == http.StatusPaymentRequired:
		sentinel = base.ErrFailedPrecondition
	case se.Type == stripeapi.ErrorTypeInvalidRequest || se.HTTPStatusCode == http.StatusBadRequest:
		sentinel = base.ErrInvalidArgument
	}
	var what string
	switch se.Code {
	case stripeapi.ErrorCodeAmountTooLarge, stripeapi.ErrorCodeChargeAlreadyRefunded:
		what = "the refund exceeds what is left to refund on the payment: "
	}
	return fmt.Errorf("stripe: %s: %s%s: %w", call, what, describe(se), sentinel)
}

// describe is Stripe's message with its type, code, parameter and request id.
func describe(se *stripeapi.Error) string {
	msg := se.Msg
	if msg == "" {
		msg = "Stripe answered " + http.StatusText(se.HTTPStatusCode)
	}
	var details []string
	add := func(k, v string) {
		if v != "" {
			details = append(details, k+" "+v)
		}
	}
	if se.HTTPStatusCode != 0 {
		add("status", fmt.Sprint(se.HTTPStatusCode))
	}
	add("type", string(se.Type))
	add("code", string(se.Code))
	add("param", se.Param)
	add("request", se.RequestID)
	return msg + " (" + strings.Join(details, ", ") + ")"
}
