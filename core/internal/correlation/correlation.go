// Package correlation carries the request's correlation id through a context, so
// logs, audit rows and outbox events of one request can be joined.
package correlation

import (
	"context"
	"regexp"

	"github.com/google/uuid"
)

// Header is the HTTP header a client may set and that every response carries.
const Header = "X-Correlation-ID"

type ctxKey struct{}

var valid = regexp.MustCompile(`^[A-Za-z0-9._:-]{1,128}$`)

// Valid reports whether id is acceptable from a client: 1-128 characters of
// letters, digits and ._:- (so it is safe in logs and headers).
func Valid(id string) bool { return valid.MatchString(id) }

// New returns a fresh correlation id.
func New() string { return uuid.NewString() }

// With returns ctx carrying id.
func With(ctx context.Context, id string) context.Context {
	return context.WithValue(ctx, ctxKey{}, id)
}

// From returns the correlation id in ctx, or "".
func From(ctx context.Context) string {
	id, _ := ctx.Value(ctxKey{}).(string)
	return id
}
