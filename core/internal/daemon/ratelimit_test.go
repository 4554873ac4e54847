package daemon_test

import (
	"context"
	"encoding/json"
	"strconv"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/gpuaas/gpuaas/core/internal/policy"
	"github.com/gpuaas/gpuaas/core/internal/store"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
)

// setPolicy writes a global override straight to the store (it reaches the
// running core through system.policy.changed).
func (e *env) setPolicy(key string, value any) {
	e.t.Helper()
	raw, _ := json.Marshal(value)
	pol := policy.NewService(e.pool, testenv.Logger(e.t))
	err := store.Transact(context.Background(), e.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		return pol.Set(context.Background(), tx, policy.ScopeGlobal, "", key, raw, "test")
	})
	if err != nil {
		e.t.Fatal(err)
	}
}

func TestRateLimits(t *testing.T) {
	e := newEnv(t)
	w := e.newWorld()
	e.setPolicy("ratelimit.requests_per_minute", 5)
	e.setPolicy("ratelimit.anonymous_requests_per_minute", 3)

	t.Run("per principal", func(t *testing.T) {
		e.t = t
		var last response
		for i := range 6 {
			last = e.call("GET", "/api/v1/users/me", w.tokens[member], nil)
			if i < 5 {
				if last.status != 200 {
					t.Fatalf("request %d: %d %s", i+1, last.status, last.body)
				}
				if got := last.header.Get("X-RateLimit-Remaining"); got != strconv.Itoa(4-i) {
					t.Fatalf("request %d: X-RateLimit-Remaining %q, want %d", i+1, got, 4-i)
				}
			}
		}
		if last.status != 429 || last.code() != "rate_limited" {
			t.Fatalf("6th request: %d %s; want 429 rate_limited", last.status, last.body)
		}
		if ra, err := strconv.Atoi(last.header.Get("Retry-After")); err != nil || ra < 1 || ra > 60 {
			t.Fatalf("Retry-After %q", last.header.Get("Retry-After"))
		}
		if last.header.Get("X-RateLimit-Limit") != "5" || last.header.Get("X-RateLimit-Reset") == "" {
			t.Fatalf("headers %v", last.header)
		}
		// Another principal has its own budget.
		if r := e.call("GET", "/api/v1/users/me", w.tokens[viewer], nil); r.status != 200 {
			t.Fatalf("another principal: %d", r.status)
		}
	})
	t.Run("per address before authentication", func(t *testing.T) {
		e.t = t
		statuses := []int{}
		for range 2 {
			statuses = append(statuses, e.call("GET", "/api/v1/policy-keys", "", nil).status)
		}
		// A failed authentication counts against the address too.
		statuses = append(statuses, e.call("GET", "/api/v1/users/me", "gpk_bogusbogusbo"+"x", nil).status)
		r := e.call("GET", "/api/v1/policy-keys", "", nil)
		if statuses[0] != 200 || statuses[1] != 200 || statuses[2] != 401 || r.status != 429 {
			t.Fatalf("statuses %v then %d; want [200 200 401] then 429", statuses, r.status)
		}
		// Probes are never limited.
		if r := e.call("GET", "/api/v1/healthz", "", nil); r.status != 200 {
			t.Fatalf("healthz limited: %d", r.status)
		}
	})
}
