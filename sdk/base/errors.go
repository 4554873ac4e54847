package base

import (
	"context"
	"errors"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/protoadapt"
)

// Sentinel errors a driver wraps (fmt.Errorf("maas: machine %s: %w", id,
// base.ErrNotFound)) and the host tests with errors.Is. They cross the
// plugin boundary as gRPC status codes with the message preserved; the
// mapping lives in this file only (StatusFromError, ErrorFromStatus).
var (
	ErrNotFound           = errors.New("not found")
	ErrInvalidArgument    = errors.New("invalid argument")
	ErrConflict           = errors.New("conflict")
	ErrFailedPrecondition = errors.New("failed precondition")
	ErrUnavailable        = errors.New("unavailable")
	ErrUnauthenticated    = errors.New("unauthenticated")
	ErrPermissionDenied   = errors.New("permission denied")
	ErrResourceExhausted  = errors.New("resource exhausted")
	// ErrUnimplemented means the capability is absent: the driver does not
	// implement the optional interface, or is older than the call.
	ErrUnimplemented = errors.New("unimplemented")
	// ErrDeadlineExceeded is a timeout inside the driver or its backend.
	// When the caller's own context expired the error also matches
	// context.DeadlineExceeded.
	ErrDeadlineExceeded = errors.New("deadline exceeded")
	ErrInternal         = errors.New("internal error")
	// ErrPluginExited means the plugin process went away during the call.
	// It also matches ErrUnavailable. The host restarts the plugin and
	// retries with the same operation id.
	ErrPluginExited = errors.New("plugin exited")
)

// Sentinels lists the sentinels a driver returns, each with its own code.
func Sentinels() []error {
	return []error{
		ErrNotFound, ErrInvalidArgument, ErrConflict, ErrFailedPrecondition,
		ErrUnavailable, ErrUnauthenticated, ErrPermissionDenied,
		ErrResourceExhausted, ErrUnimplemented, ErrDeadlineExceeded, ErrInternal,
	}
}

type codeMapping struct {
	err  error
	code codes.Code
}

// mappings is the one table between errors and codes. Earlier rows win
// when an error matches several; for the way back the first row with the
// code that is a sentinel wins.
func mappings() []codeMapping {
	return []codeMapping{
		{context.Canceled, codes.Canceled},
		{context.DeadlineExceeded, codes.DeadlineExceeded},
		{ErrPluginExited, codes.Unavailable},
		{ErrNotFound, codes.NotFound},
		{ErrInvalidArgument, codes.InvalidArgument},
		{ErrConflict, codes.Aborted},
		{ErrFailedPrecondition, codes.FailedPrecondition},
		{ErrUnavailable, codes.Unavailable},
		{ErrUnauthenticated, codes.Unauthenticated},
		{ErrPermissionDenied, codes.PermissionDenied},
		{ErrResourceExhausted, codes.ResourceExhausted},
		{ErrUnimplemented, codes.Unimplemented},
		{ErrDeadlineExceeded, codes.DeadlineExceeded},
		{ErrInternal, codes.Internal},
	}
}

func sentinelForCode(c codes.Code) error {
	if c == codes.AlreadyExists {
		return ErrConflict
	}
	for _, m := range mappings() {
		if m.code == c && m.err != ErrPluginExited && m.err != context.Canceled && m.err != context.DeadlineExceeded {
			return m.err
		}
	}
	return nil
}

// The marker that tells the host a status was made by the driver (through
// StatusFromError), not by gRPC or the transport.
const (
	driverErrorDomain = "gpuaas.sdk"
	driverErrorReason = "DRIVER_ERROR"
)

// StatusFromError turns an error returned by a driver into the gRPC status
// error a server shim returns. The message is err.Error() unchanged; a
// *ConfigError keeps its field name.
func StatusFromError(err error) error {
	if err == nil {
		return nil
	}
	code := codes.Unknown
	for _, m := range mappings() {
		if errors.Is(err, m.err) {
			code = m.code
			break
		}
	}
	st := status.New(code, err.Error())
	details := []protoadapt.MessageV1{&errdetails.ErrorInfo{Domain: driverErrorDomain, Reason: driverErrorReason}}
	var cfgErr *ConfigError
	if errors.As(err, &cfgErr) {
		details = append(details, &errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{
			{Field: cfgErr.Field, Description: cfgErr.Reason},
		}})
	}
	withDetails, derr := st.WithDetails(details...)
	if derr != nil {
		return st.Err()
	}
	return withDetails.Err()
}

// ErrorFromStatus turns an error from a gRPC call to a plugin back into an
// error that matches the SDK sentinels, with the driver's message. reqCtx
// is the caller's context; pluginCtx is done when the plugin process has
// exited (go-plugin passes it to GRPCClient). A call cut off by the
// caller's context returns an error matching context.Canceled or
// context.DeadlineExceeded; a call cut off by the plugin's exit one
// matching ErrPluginExited.
func ErrorFromStatus(reqCtx, pluginCtx context.Context, err error) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		if ctxErr := reqCtx.Err(); ctxErr != nil && !errors.Is(err, ctxErr) {
			return &remoteError{msg: err.Error(), errs: []error{ctxErr, err}}
		}
		return err
	}
	fromDriver := false
	var cfgErr *ConfigError
	for _, d := range st.Details() {
		switch d := d.(type) {
		case *errdetails.ErrorInfo:
			if d.GetDomain() == driverErrorDomain && d.GetReason() == driverErrorReason {
				fromDriver = true
			}
		case *errdetails.BadRequest:
			if v := d.GetFieldViolations(); len(v) > 0 {
				cfgErr = &ConfigError{Field: v[0].GetField(), Reason: v[0].GetDescription()}
			}
		}
	}
	if cfgErr != nil && st.Code() == codes.InvalidArgument {
		return cfgErr
	}
	msg := st.Message()
	// The caller's context ended and the transport reports it its own way (a
	// stream reset arrives as Internal or Unavailable): the caller's reason wins.
	if ctxErr := reqCtx.Err(); ctxErr != nil && st.Code() != codes.Canceled && st.Code() != codes.DeadlineExceeded && !fromDriver {
		if errors.Is(ctxErr, context.DeadlineExceeded) {
			return &remoteError{msg: msg, errs: []error{context.DeadlineExceeded, ErrDeadlineExceeded}}
		}
		return &remoteError{msg: msg, errs: []error{ctxErr}}
	}
	switch st.Code() {
	case codes.Canceled, codes.DeadlineExceeded:
		switch ctxErr := settle(reqCtx); {
		case errors.Is(ctxErr, context.DeadlineExceeded):
			return &remoteError{msg: msg, errs: []error{context.DeadlineExceeded, ErrDeadlineExceeded}}
		case ctxErr != nil:
			return &remoteError{msg: msg, errs: []error{ctxErr}}
		case st.Code() == codes.DeadlineExceeded:
			return &remoteError{msg: msg, errs: []error{ErrDeadlineExceeded}}
		case !fromDriver && pluginCtx.Err() != nil:
			return &remoteError{msg: msg, errs: []error{ErrPluginExited, ErrUnavailable}}
		}
		return &remoteError{msg: msg, errs: []error{context.Canceled}}
	case codes.Unavailable:
		if fromDriver {
			break
		}
		// The transport broke. Tell a dead plugin from a passing fault: the
		// plugin's exit is noticed a moment after the connection drops.
		timer := time.NewTimer(time.Second)
		defer timer.Stop()
		select {
		case <-pluginCtx.Done():
			return &remoteError{msg: msg, errs: []error{ErrPluginExited, ErrUnavailable}}
		case <-reqCtx.Done():
			return &remoteError{msg: msg, errs: []error{reqCtx.Err()}}
		case <-timer.C:
		}
	}
	if s := sentinelForCode(st.Code()); s != nil {
		return &remoteError{msg: msg, errs: []error{s}}
	}
	return &remoteError{msg: msg}
}

// settle returns ctx's error. A call cut short by its deadline can come
// back a moment before the caller's own timer fires (the plugin's copy of
// the deadline, or its reset of the stream, wins the race); a deadline that
// close is waited for so the caller sees context.DeadlineExceeded.
func settle(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	deadline, ok := ctx.Deadline()
	if !ok || time.Until(deadline) > 100*time.Millisecond {
		return nil
	}
	timer := time.NewTimer(time.Until(deadline) + 10*time.Millisecond)
	defer timer.Stop()
	select {
	case <-ctx.Done():
	case <-timer.C:
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	// The deadline has passed but the context has not said so yet: it ends
	// from a goroutine of its own, which a busy machine may not have run.
	if !time.Now().Before(deadline) {
		return context.DeadlineExceeded
	}
	return nil
}

// remoteError is an error that crossed the plugin boundary: its message is
// the driver's, and it matches the sentinels its status code maps to.
var _ error = (*remoteError)(nil)

type remoteError struct {
	msg  string
	errs []error
}

func (e *remoteError) Error() string   { return e.msg }
func (e *remoteError) Unwrap() []error { return e.errs }
