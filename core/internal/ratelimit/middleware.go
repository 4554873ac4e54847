package ratelimit

import (
	"errors"
	"strconv"
	"time"

	"github.com/gofiber/fiber/v2"
)

// The response headers the middleware sets. X-RateLimit-Reset is the Unix time,
// in seconds, when the current window ends.
const (
	HeaderLimit     = "X-RateLimit-Limit"
	HeaderRemaining = "X-RateLimit-Remaining"
	HeaderReset     = "X-RateLimit-Reset"
)

// Middleware limits the requests for which keyFn returns ok; others pass untouched.
// keyFn names the key (a principal, or the client IP before authentication) and
// its limit from policy. Every limited response carries the X-RateLimit-* headers;
// a denied request also gets Retry-After (whole seconds, rounded up) and its
// response is whatever onLimited returns, typically the caller's 429 error
// envelope. When the limiter's store fails the request passes (the limiter counts
// the failure); an invalid limit from keyFn lets it pass without headers.
func Middleware(l *Limiter, keyFn func(*fiber.Ctx) (key string, limit Limit, ok bool), onLimited func(*fiber.Ctx, Decision) error) fiber.Handler {
	if onLimited == nil {
		onLimited = func(c *fiber.Ctx, _ Decision) error { return c.SendStatus(fiber.StatusTooManyRequests) }
	}
	return func(c *fiber.Ctx) error {
		key, limit, ok := keyFn(c)
		if !ok {
			return c.Next()
		}
		d, err := l.Allow(c.UserContext(), key, limit)
		if errors.Is(err, ErrInvalidLimit) {
			return c.Next()
		}
		c.Set(HeaderLimit, strconv.Itoa(d.Limit))
		c.Set(HeaderRemaining, strconv.Itoa(d.Remaining))
		c.Set(HeaderReset, strconv.FormatInt(ceilUnix(d.Reset), 10))
		if !d.Allowed {
			c.Set(fiber.HeaderRetryAfter, strconv.FormatInt(max(ceilSeconds(d.RetryAfter), 1), 10))
			return onLimited(c, d)
		}
		return c.Next()
	}
}

// ceilUnix is t in Unix seconds, rounded up.
func ceilUnix(t time.Time) int64 {
	s := t.Unix()
	if t.Nanosecond() > 0 {
		s++
	}
	return s
}

// ceilSeconds rounds d up to whole seconds.
func ceilSeconds(d time.Duration) int64 {
	s := int64(d / time.Second)
	if d%time.Second > 0 {
		s++
	}
	return s
}
