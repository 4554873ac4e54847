package oidc_test

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/oidc"
	"github.com/gpuaas/gpuaas/core/internal/oidc/oidctest"
)

// clock is a settable clock shared by the issuer and the verifier of a test.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Date(2031, 3, 14, 15, 9, 26, 0, time.UTC)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// env is what setup returns: an issuer, a verifier of its tokens and their clock.
type env struct {
	iss   *oidctest.Issuer
	v     *oidc.Verifier
	clock *clock
}

// setupOpts tunes setup.
type setupOpts struct {
	issuer   []oidctest.Option
	config   func(*oidc.Config)
	verifier []oidc.Option
}

// setup starts an issuer and builds a verifier for it, both on one fake clock.
func setup(tb testing.TB, o setupOpts) env {
	tb.Helper()
	c := newClock()
	iss := oidctest.New(tb, append([]oidctest.Option{oidctest.WithClock(c.Now)}, o.issuer...)...)
	cfg := iss.Config()
	cfg.RedirectURL = "https://gpuaas.example/callback"
	if o.config != nil {
		o.config(&cfg)
	}
	v, err := oidc.NewVerifier(context.Background(), cfg, o.verifier...)
	if err != nil {
		tb.Fatalf("NewVerifier: %v", err)
	}
	return env{iss: iss, v: v, clock: c}
}

// wantCode fails unless err carries code.
func wantCode(tb testing.TB, err error, want errcode.Code) {
	tb.Helper()
	if err == nil {
		tb.Fatalf("err = nil, want code %s", want)
	}
	if got := errcode.Of(err); got != want {
		tb.Fatalf("code = %s, want %s (err: %v)", got, want, err)
	}
}

// wantNoEcho fails if err's text contains the token or its signature.
func wantNoEcho(tb testing.TB, err error, token string) {
	tb.Helper()
	if err == nil || len(token) < 16 {
		return
	}
	text := err.Error()
	if strings.Contains(text, token) {
		tb.Fatalf("error echoes the token: %v", err)
	}
	if i := strings.LastIndex(token, "."); i >= 0 && len(token)-i > 16 && strings.Contains(text, token[i+1:]) {
		tb.Fatalf("error echoes the token's signature: %v", err)
	}
}
