package pki

import (
	"context"
	"fmt"
	"sync"
	"time"
)

// Defaults of a RevocationChecker.
const (
	// DefaultRevocationMaxAge is how old the cached list may be before a
	// check fetches it again; a certificate revoked elsewhere is refused
	// within this time (the core promises 60 s).
	DefaultRevocationMaxAge = 30 * time.Second
	// DefaultRevocationMaxStale is how long a list may still be used when
	// fetching a new one fails; past it, checks fail (closed).
	DefaultRevocationMaxStale = 5 * time.Minute
)

// RevocationChecker answers "is this serial revoked" from a cached copy of
// the CA's revocation list, fetched again when older than MaxAge. A
// certificate revoked through Revoke is refused at once by this checker.
type RevocationChecker struct {
	ca       CA
	now      func() time.Time
	maxAge   time.Duration
	maxStale time.Duration

	mu      sync.Mutex
	fetched time.Time
	list    map[string]time.Time
	local   map[string]time.Time // revoked here since the last fetch
}

// CheckerOption configures a RevocationChecker.
type CheckerOption func(*RevocationChecker)

// WithCheckerNow sets the clock (default time.Now).
func WithCheckerNow(now func() time.Time) CheckerOption {
	return func(c *RevocationChecker) { c.now = now }
}

// WithMaxAge sets how old the cached list may be (default DefaultRevocationMaxAge).
func WithMaxAge(d time.Duration) CheckerOption { return func(c *RevocationChecker) { c.maxAge = d } }

// WithMaxStale sets how long a list is used while refreshing fails (default
// DefaultRevocationMaxStale).
func WithMaxStale(d time.Duration) CheckerOption {
	return func(c *RevocationChecker) { c.maxStale = d }
}

// NewRevocationChecker returns a checker over ca.
func NewRevocationChecker(ca CA, opts ...CheckerOption) *RevocationChecker {
	c := &RevocationChecker{ca: ca, now: time.Now, maxAge: DefaultRevocationMaxAge,
		maxStale: DefaultRevocationMaxStale, local: map[string]time.Time{}}
	for _, o := range opts {
		o(c)
	}
	return c
}

// Revoked reports whether serial is revoked. It fails when the list is
// older than MaxStale and cannot be fetched.
func (c *RevocationChecker) Revoked(ctx context.Context, serial string) (bool, error) {
	s, err := NormalizeSerial(serial)
	if err != nil {
		return false, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.now()
	if c.list == nil || now.Sub(c.fetched) >= c.maxAge {
		r, err := c.ca.Revocations(ctx)
		switch {
		case err == nil:
			c.list, c.fetched = r.Serials, now
			for s, at := range c.local { // until the CA's list shows them
				if _, listed := c.list[s]; listed || now.Sub(at) > DefaultMaxCertTTL {
					delete(c.local, s)
				}
			}
		case c.list == nil || now.Sub(c.fetched) >= c.maxStale:
			return false, fmt.Errorf("pki: revocation list unavailable: %w", err)
		}
	}
	_, revoked := c.list[s]
	_, here := c.local[s]
	return revoked || here, nil
}

// Revoke revokes serial at the CA and refuses it at once here.
func (c *RevocationChecker) Revoke(ctx context.Context, serial string) error {
	s, err := NormalizeSerial(serial)
	if err != nil {
		return err
	}
	if err := c.ca.Revoke(ctx, s); err != nil {
		return err
	}
	c.mu.Lock()
	c.local[s] = c.now()
	c.mu.Unlock()
	return nil
}
