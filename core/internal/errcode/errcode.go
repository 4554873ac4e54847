// Package errcode gives domain errors a stable machine-readable code.
//
// Services return *Error values (or wrap them with %w); the HTTP layer turns the code
// into a status in exactly one place (httpapi.statusFor). A plain error that carries no
// code is an internal error and its text never reaches a client.
package errcode

import (
	"errors"
	"fmt"
)

// Code is a stable error code. The values are part of the API contract and are listed
// in api/openapi.yaml (ErrorCode).
type Code string

// The codes shared by every domain. Domains add their own (for example
// "allocation_not_found") next to the code that returns them.
const (
	BadRequest          Code = "bad_request"
	InvalidJSON         Code = "invalid_json"
	UnknownField        Code = "unknown_field"
	DuplicateKey        Code = "duplicate_key"
	ValidationFailed    Code = "validation_failed"
	InvalidCursor       Code = "invalid_cursor"
	Unauthenticated     Code = "unauthenticated"
	Forbidden           Code = "forbidden"
	NotFound            Code = "not_found"
	RouteNotFound       Code = "route_not_found"
	MethodNotAllowed    Code = "method_not_allowed"
	Conflict            Code = "conflict"
	RequestTooLarge     Code = "request_too_large"
	UnsupportedMedia    Code = "unsupported_media_type"
	RateLimited         Code = "rate_limited"
	NotReady            Code = "not_ready"
	DatabaseUnavailable Code = "database_unavailable"
	ServiceUnavailable  Code = "service_unavailable"
	Timeout             Code = "timeout"
	Internal            Code = "internal"
)

// Error is an error with a stable code, a message fit for the client and optional
// structured details. Cause is kept for logs and errors.Is/As, never shown to clients.
type Error struct {
	Code    Code
	Message string
	Details map[string]any
	Cause   error
}

func (e *Error) Error() string {
	if e.Cause != nil {
		return fmt.Sprintf("%s: %s: %v", e.Code, e.Message, e.Cause)
	}
	return fmt.Sprintf("%s: %s", e.Code, e.Message)
}

func (e *Error) Unwrap() error { return e.Cause }

// New returns an error with code and a formatted message.
func New(code Code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// Wrap returns an error with code and message that keeps cause for logs.
func Wrap(cause error, code Code, message string) *Error {
	return &Error{Code: code, Message: message, Cause: cause}
}

// WithDetails returns a copy of e with key set to value in its details.
func (e *Error) WithDetails(key string, value any) *Error {
	c := *e
	c.Details = make(map[string]any, len(e.Details)+1)
	for k, v := range e.Details {
		c.Details[k] = v
	}
	c.Details[key] = value
	return &c
}

// As returns the first *Error in err's chain, or nil.
func As(err error) *Error {
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	return nil
}

// Of returns the code of err: the code of the first *Error in its chain, or Internal.
func Of(err error) Code {
	if e := As(err); e != nil {
		return e.Code
	}
	return Internal
}
