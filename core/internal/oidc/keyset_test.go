package oidc_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/core/internal/oidc"
	"github.com/gpuaas/gpuaas/core/internal/oidc/oidctest"
)

func TestKeyRotation(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	interval := oidc.DefaultRefreshInterval

	t.Run("new kid verifies after one refetch", func(t *testing.T) {
		t.Parallel()
		e := setup(t, setupOpts{})
		e.clock.Advance(interval)
		e.iss.RotateKeys()
		before := e.iss.JWKSFetches()
		tok := e.iss.Mint()
		if _, err := e.v.Verify(ctx, tok); err != nil {
			t.Fatalf("Verify with the new key: %v", err)
		}
		if _, err := e.v.Verify(ctx, e.iss.Mint()); err != nil {
			t.Fatalf("Verify again: %v", err)
		}
		if got := e.iss.JWKSFetches() - before; got != 1 {
			t.Fatalf("key set fetched %d times, want 1", got)
		}
	})

	t.Run("new kid waits for the refresh interval", func(t *testing.T) {
		t.Parallel()
		e := setup(t, setupOpts{})
		e.iss.RotateKeys() // right after NewVerifier fetched the key set
		before := e.iss.JWKSFetches()
		tok := e.iss.Mint()
		_, err := e.v.Verify(ctx, tok)
		wantCode(t, err, oidc.CodeTokenUnknownKey)
		if got := e.iss.JWKSFetches() - before; got != 0 {
			t.Fatalf("key set fetched %d times inside the interval, want 0", got)
		}
		e.clock.Advance(interval)
		if _, err := e.v.Verify(ctx, tok); err != nil {
			t.Fatalf("Verify after the interval: %v", err)
		}
	})

	t.Run("removed key stops verifying after the refetch", func(t *testing.T) {
		t.Parallel()
		e := setup(t, setupOpts{})
		old := e.iss.Mint()
		if _, err := e.v.Verify(ctx, old); err != nil { // now in the verified-token cache
			t.Fatalf("Verify with the old key: %v", err)
		}
		e.iss.RotateKeys()
		e.clock.Advance(interval)
		if _, err := e.v.Verify(ctx, e.iss.Mint()); err != nil {
			t.Fatalf("Verify with the new key: %v", err)
		}
		_, err := e.v.Verify(ctx, old)
		wantCode(t, err, oidc.CodeTokenUnknownKey)
	})

	t.Run("kept key still verifies after the refetch", func(t *testing.T) {
		t.Parallel()
		e := setup(t, setupOpts{issuer: []oidctest.Option{oidctest.WithKeepRotatedKeys()}})
		old := e.iss.Mint()
		e.iss.RotateKeys()
		e.clock.Advance(interval)
		for name, tok := range map[string]string{"new": e.iss.Mint(), "old": old} {
			if _, err := e.v.Verify(ctx, tok); err != nil {
				t.Fatalf("Verify with the %s key: %v", name, err)
			}
		}
	})

	t.Run("removed key stops verifying once the key set is too old", func(t *testing.T) {
		t.Parallel()
		e := setup(t, setupOpts{verifier: []oidc.Option{oidc.WithKeySetMaxAge(time.Minute)}})
		old := e.iss.Mint(oidctest.Claims{"exp": e.clock.Now().Add(time.Hour)})
		if _, err := e.v.Verify(ctx, old); err != nil { // now in the verified-token cache
			t.Fatalf("Verify with the old key: %v", err)
		}
		e.iss.RotateKeys()
		e.clock.Advance(2 * time.Minute)
		// The stale set still answers this request and is refreshed in the background.
		if _, err := e.v.Verify(ctx, old); err != nil {
			t.Fatalf("Verify while the refresh starts: %v", err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			_, err := e.v.Verify(ctx, old)
			if err != nil {
				wantCode(t, err, oidc.CodeTokenUnknownKey)
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("the removed key still verifies 10s after the key set went stale")
			}
			time.Sleep(5 * time.Millisecond)
		}
	})

	t.Run("provider outage keeps the cached keys", func(t *testing.T) {
		t.Parallel()
		e := setup(t, setupOpts{})
		e.iss.SetJWKSStatus(503)
		e.clock.Advance(interval)
		_, err := e.v.Verify(ctx, e.iss.MintWithUnknownKid())
		wantCode(t, err, oidc.CodeTokenUnknownKey)
		if _, err := e.v.Verify(ctx, e.iss.Mint()); err != nil {
			t.Fatalf("Verify with a cached key during the outage: %v", err)
		}
	})
}

// TestUnknownKidStorm checks that a flood of tokens with forged kids causes at most one
// key set fetch per refresh interval.
func TestUnknownKidStorm(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	e := setup(t, setupOpts{verifier: []oidc.Option{oidc.WithRefreshInterval(30 * time.Second)}})
	const storm = 200
	tokens := make([]string, storm)
	for n := range tokens {
		tokens[n] = e.iss.MintWithUnknownKid()
	}
	flood := func(t *testing.T) {
		t.Helper()
		var wg sync.WaitGroup
		errs := make(chan error, storm)
		for _, tok := range tokens {
			wg.Go(func() {
				_, err := e.v.Verify(ctx, tok)
				errs <- err
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			wantCode(t, err, oidc.CodeTokenUnknownKey)
		}
	}

	steps := []struct {
		name    string
		advance time.Duration
		fetches int
	}{
		{"right after start", 0, 0},
		{"inside the interval", 29 * time.Second, 0},
		{"interval elapsed", time.Second, 1},
		{"again inside the interval", 15 * time.Second, 0},
		{"next interval", 15 * time.Second, 1},
	}
	for _, s := range steps {
		t.Run(s.name, func(t *testing.T) {
			e.clock.Advance(s.advance)
			before := e.iss.JWKSFetches()
			flood(t)
			if got := e.iss.JWKSFetches() - before; got != s.fetches {
				t.Fatalf("key set fetched %d times, want %d", got, s.fetches)
			}
		})
	}
}
