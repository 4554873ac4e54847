package httpapi

import (
	"context"
	"errors"
	"net/http"

	"github.com/gofiber/fiber/v2"
	"github.com/hashicorp/go-hclog"

	"github.com/gpuaas/gpuaas/core/internal/agents"
	"github.com/gpuaas/gpuaas/core/internal/allocations"
	"github.com/gpuaas/gpuaas/core/internal/catalog"
	"github.com/gpuaas/gpuaas/core/internal/correlation"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/httpapi/apigen"
	"github.com/gpuaas/gpuaas/core/internal/idempotency"
	"github.com/gpuaas/gpuaas/core/internal/identity"
	"github.com/gpuaas/gpuaas/core/internal/inventory"
	"github.com/gpuaas/gpuaas/core/internal/ledger"
	"github.com/gpuaas/gpuaas/core/internal/oidc"
	"github.com/gpuaas/gpuaas/core/internal/payments"
	"github.com/gpuaas/gpuaas/core/internal/pluginhost"
	"github.com/gpuaas/gpuaas/core/internal/sshkeys"
	"github.com/gpuaas/gpuaas/core/internal/storage"
	"github.com/gpuaas/gpuaas/core/internal/store"
	"github.com/gpuaas/gpuaas/core/internal/terminal"
)

// statusFor is the one place where an error code becomes an HTTP status.
func statusFor(code errcode.Code) int {
	switch code {
	case errcode.BadRequest, errcode.InvalidJSON, errcode.UnknownField, errcode.DuplicateKey,
		errcode.ValidationFailed, errcode.InvalidCursor:
		return http.StatusBadRequest
	case errcode.Unauthenticated:
		return http.StatusUnauthorized
	case errcode.Forbidden:
		return http.StatusForbidden
	case errcode.NotFound, errcode.RouteNotFound:
		return http.StatusNotFound
	case errcode.MethodNotAllowed:
		return http.StatusMethodNotAllowed
	case errcode.Conflict:
		return http.StatusConflict
	case errcode.RequestTooLarge:
		return http.StatusRequestEntityTooLarge
	case errcode.UnsupportedMedia:
		return http.StatusUnsupportedMediaType
	case errcode.RateLimited:
		return http.StatusTooManyRequests
	case errcode.NotReady, errcode.DatabaseUnavailable, errcode.ServiceUnavailable:
		return http.StatusServiceUnavailable
	case errcode.Timeout:
		return http.StatusGatewayTimeout
	case identity.CodeOrgNotFound, identity.CodeProjectNotFound, identity.CodeUserNotFound, identity.CodeMemberNotFound,
		identity.CodeServiceAccountNotFound, identity.CodeAPIKeyNotFound:
		return http.StatusNotFound
	case identity.CodeSlugTaken, identity.CodeNameTaken, identity.CodeAlreadyMember, identity.CodeLastOwner, idempotency.InFlight:
		return http.StatusConflict
	case idempotency.InvalidKey, payments.CodeTopUpOutOfRange, payments.CodeWebhookInvalid:
		return http.StatusBadRequest
	case ledger.CodeAccountNotFound, payments.CodeSessionNotFound:
		return http.StatusNotFound
	case payments.CodeRefundInvalidAmount, payments.CodeRefundNotAllowed, ledger.CodeCurrencyMismatch:
		return http.StatusUnprocessableEntity
	case ledger.CodeKeyConflict, payments.CodeNoCustomer:
		return http.StatusConflict
	case payments.CodeProviderNotFound:
		return http.StatusServiceUnavailable
	case payments.CodeProviderFailed:
		return http.StatusBadGateway
	case pluginhost.CodeInvalidPlugin, sshkeys.CodeInvalid, sshkeys.CodeTooWeak:
		return http.StatusBadRequest
	case sshkeys.CodeExists, catalog.CodeSKUExists:
		return http.StatusConflict
	case sshkeys.CodeNotFound, catalog.CodeSKUNotFound:
		return http.StatusNotFound
	case pluginhost.CodePluginNotFound, pluginhost.CodeInstanceNotFound:
		return http.StatusNotFound
	case pluginhost.CodeUpgradeRequired, pluginhost.CodeInstanceConflict, pluginhost.CodeKindMismatch, pluginhost.CodeInstanceDisabled:
		return http.StatusConflict
	case pluginhost.CodeIncompatible:
		return http.StatusUnprocessableEntity
	case pluginhost.CodeTampered, pluginhost.CodeInstanceFailed, pluginhost.CodeUnavailable:
		return http.StatusServiceUnavailable
	case idempotency.KeyReused:
		return http.StatusUnprocessableEntity
	case identity.CodeInvalidCredentials, identity.CodeInvalidToken, identity.CodeAPIKeyRevoked, identity.CodeAPIKeyExpired,
		identity.CodeAccountDisabled, identity.CodeOIDCNotConfigured:
		return http.StatusUnauthorized
	case identity.CodeLocalAccountsDisabled:
		return http.StatusForbidden
	case oidc.CodeTokenMalformed, oidc.CodeTokenAlgNotAllowed, oidc.CodeTokenBadSignature, oidc.CodeTokenUnknownKey,
		oidc.CodeTokenExpired, oidc.CodeTokenNotYetValid, oidc.CodeTokenWrongIssuer, oidc.CodeTokenWrongAudience,
		oidc.CodeTokenMissingSubject, oidc.CodeTokenWrongNonce, oidc.CodeGrantRejected:
		return http.StatusUnauthorized
	case oidc.CodeProviderUnavailable:
		return http.StatusBadGateway
	case inventory.CodeNodeNotFound, allocations.CodeNotFound:
		return http.StatusNotFound
	case inventory.CodeNodeExists, inventory.CodeNodeBusy, inventory.CodeInvalidTransition, inventory.CodeProvisionerRejected,
		allocations.CodeInvalidTransition, allocations.CodeNoCapacity:
		return http.StatusConflict
	case inventory.CodeProvisionerFailed:
		return http.StatusBadGateway
	case inventory.CodeWebhookInvalid:
		return http.StatusUnauthorized
	case allocations.CodeQuotaExceeded:
		return http.StatusTooManyRequests
	case allocations.CodeInsufficientFunds:
		return http.StatusPaymentRequired
	case allocations.CodeSSHKeyRequired, agents.CodeCSRInvalid:
		return http.StatusBadRequest
	case agents.CodeTokenInvalid:
		return http.StatusUnauthorized
	case agents.CodeTaskNotFound:
		return http.StatusNotFound
	case agents.CodeTaskConflict, agents.CodeNotEnrollable:
		return http.StatusConflict
	case storage.CodePathTraversal, storage.CodeInvalidKey:
		return http.StatusBadRequest
	case storage.CodeNotFound, storage.CodeUploadNotFound:
		return http.StatusNotFound
	case storage.CodeQuotaExceeded:
		return http.StatusRequestEntityTooLarge
	case storage.CodeExists, storage.CodePathBusy, storage.CodeFolderNotEmpty, storage.CodeUploadIncomplete:
		return http.StatusConflict
	case storage.CodeRangeNotSatisfied:
		return http.StatusRequestedRangeNotSatisfiable
	case storage.CodeUnavailable:
		return http.StatusServiceUnavailable
	case storage.CodeBackendFailed:
		return http.StatusBadGateway
	case terminal.CodeTokenInvalid, terminal.CodeTokenExpired, terminal.CodeTokenInQuery:
		return http.StatusUnauthorized
	case terminal.CodeTokenWrongAllocation, terminal.CodeOriginForbidden:
		return http.StatusForbidden
	case terminal.CodeAllocationNotActive:
		return http.StatusConflict
	case terminal.CodeSessionLimit:
		return http.StatusTooManyRequests
	case terminal.CodeNodeUnreachable, terminal.CodeHostKeyMismatch:
		return http.StatusBadGateway
	}
	return http.StatusInternalServerError
}

// fromFiber gives Fiber's own errors (routing, body limit, ...) a code.
func fromFiber(fe *fiber.Error) *errcode.Error {
	switch fe.Code {
	case fiber.StatusNotFound:
		return errcode.New(errcode.RouteNotFound, "no such route")
	case fiber.StatusMethodNotAllowed:
		return errcode.New(errcode.MethodNotAllowed, "method not allowed on this route")
	case fiber.StatusRequestEntityTooLarge:
		return errcode.New(errcode.RequestTooLarge, "request body is too large")
	case fiber.StatusUnsupportedMediaType:
		return errcode.New(errcode.UnsupportedMedia, "unsupported content type")
	case fiber.StatusRequestTimeout:
		return errcode.New(errcode.Timeout, "request timed out")
	case fiber.StatusBadRequest:
		return errcode.New(errcode.BadRequest, "%s", fe.Message)
	case fiber.StatusServiceUnavailable:
		return errcode.New(errcode.ServiceUnavailable, "%s", fe.Message)
	}
	if fe.Code >= 400 && fe.Code < 500 {
		return errcode.New(errcode.BadRequest, "%s", fe.Message)
	}
	return errcode.Wrap(fe, errcode.Internal, "internal error")
}

// toCoded turns any error into a coded error fit for a client. Errors that carry no
// code are internal; their text is logged, never returned.
func toCoded(ctx context.Context, err error) *errcode.Error {
	var fe *fiber.Error
	switch {
	case errors.As(err, &fe):
		return fromFiber(fe)
	case errcode.As(err) != nil:
		return errcode.As(err)
	}
	if c := errcode.As(store.Classify(err)); c != nil {
		return c
	}
	if errors.Is(err, context.DeadlineExceeded) && ctx.Err() != nil {
		return errcode.Wrap(err, errcode.Timeout, "request timed out")
	}
	return errcode.Wrap(err, errcode.Internal, "internal error")
}

// ErrorWriter returns the function that renders errors in the envelope, for
// middleware that must capture the exact bytes (idempotency).
func ErrorWriter(log hclog.Logger) func(*fiber.Ctx, error) {
	return func(c *fiber.Ctx, err error) { writeError(c, log, err) }
}

// writeError sends err in the error envelope. It is the only writer of error bodies.
func writeError(c *fiber.Ctx, log hclog.Logger, err error) {
	coded := toCoded(c.UserContext(), err)
	status := statusFor(coded.Code)
	corr := requestCorrelationID(c)
	if status >= 500 && coded.Code == errcode.Internal {
		log.Error("request failed", "method", c.Method(), "path", c.Path(), "correlation_id", corr, "error", err)
	}
	details := coded.Details
	if details == nil {
		details = map[string]any{}
	}
	c.Status(status)
	_ = c.JSON(apigen.ErrorEnvelope{Error: apigen.ErrorBody{
		Code:          apigen.ErrorCode(coded.Code),
		Message:       coded.Message,
		Details:       details,
		CorrelationId: corr,
	}})
}

// requestCorrelationID is the id the request middleware chose, or, for errors raised
// before it ran (body too large), the client's valid header or a fresh id.
func requestCorrelationID(c *fiber.Ctx) string {
	if id, ok := c.Locals(localsCorrelation).(string); ok && id != "" {
		return id
	}
	id := c.Get(correlation.Header)
	if !correlation.Valid(id) {
		id = correlation.New()
	}
	c.Locals(localsCorrelation, id)
	c.Set(correlation.Header, id)
	return id
}

// Codes lists every code statusFor knows; the contract test checks each is declared
// in api/openapi.yaml.
func Codes() []errcode.Code {
	codes := []errcode.Code{
		errcode.BadRequest, errcode.InvalidJSON, errcode.UnknownField, errcode.DuplicateKey,
		errcode.ValidationFailed, errcode.InvalidCursor, errcode.Unauthenticated, errcode.Forbidden,
		errcode.NotFound, errcode.RouteNotFound, errcode.MethodNotAllowed, errcode.Conflict,
		errcode.RequestTooLarge, errcode.UnsupportedMedia, errcode.RateLimited, errcode.NotReady,
		errcode.DatabaseUnavailable, errcode.ServiceUnavailable, errcode.Timeout, errcode.Internal,
		oidc.CodeTokenMalformed, oidc.CodeTokenAlgNotAllowed, oidc.CodeTokenBadSignature, oidc.CodeTokenUnknownKey,
		oidc.CodeTokenExpired, oidc.CodeTokenNotYetValid, oidc.CodeTokenWrongIssuer, oidc.CodeTokenWrongAudience,
		oidc.CodeTokenMissingSubject, oidc.CodeTokenWrongNonce, oidc.CodeGrantRejected, oidc.CodeProviderUnavailable,
	}
	for _, pkg := range [][]errcode.Code{identity.Codes(), idempotency.Codes(), ledger.Codes(), payments.Codes(), pluginhost.Codes(),
		sshkeys.Codes(), catalog.Codes(), inventory.Codes(), allocations.Codes(), agents.Codes(), storage.Codes(), terminal.Codes()} {
		codes = append(codes, pkg...)
	}
	return codes
}
