package policy_test

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/events"
	"github.com/gpuaas/gpuaas/core/internal/policy"
	"github.com/gpuaas/gpuaas/core/internal/store"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
)

func set(t *testing.T, pool *pgxpool.Pool, s *policy.Service, scope policy.Scope, id, key, value string) error {
	t.Helper()
	return store.Transact(context.Background(), pool, store.TxOptions{}, func(tx pgx.Tx) error {
		return s.Set(context.Background(), tx, scope, id, key, json.RawMessage(value), "test")
	})
}

func TestDefaultsAndPrecedence(t *testing.T) {
	pool, _ := testenv.MigratedPool(t)
	ctx := context.Background()
	s := policy.NewService(pool, testenv.Logger(t), policy.WithTTL(0))
	k := policy.OutboxMaxAttempts
	if v, err := k.Get(ctx, s, policy.Target{}); err != nil || v != 10 {
		t.Fatalf("default = %v, %v; want 10", v, err)
	}
	// outbox.max_attempts is global-only: an org override is refused.
	if err := set(t, pool, s, policy.ScopeOrg, "org1", k.Def().Key, "3"); errcode.Of(err) != errcode.ValidationFailed {
		t.Fatalf("org override of a global-only key: %v", err)
	}
	if err := set(t, pool, s, policy.ScopeGlobal, "", k.Def().Key, "7"); err != nil {
		t.Fatal(err)
	}
	if v, _ := k.Get(ctx, s, policy.Target{OrgID: "org1", ProjectID: "p1"}); v != 7 {
		t.Fatalf("global override = %v; want 7", v)
	}
}

// Most specific wins: project over org over global over default, for a key that
// allows every scope.
func TestScopedOverrides(t *testing.T) {
	pool, _ := testenv.MigratedPool(t)
	ctx := context.Background()
	k := policy.Int("test.scoped", 1, 0, 100, "test key", policy.ScopeGlobal, policy.ScopeOrg, policy.ScopeProject)
	s := policy.NewService(pool, testenv.Logger(t), policy.WithTTL(0), policy.WithKeys(k.Def()))
	steps := []struct {
		scope policy.Scope
		id    string
		value string
		t     policy.Target
		want  int64
	}{
		{policy.ScopeGlobal, "", "2", policy.Target{OrgID: "o", ProjectID: "p"}, 2},
		{policy.ScopeOrg, "o", "3", policy.Target{OrgID: "o", ProjectID: "p"}, 3},
		{policy.ScopeProject, "p", "4", policy.Target{OrgID: "o", ProjectID: "p"}, 4},
		{policy.ScopeProject, "other", "9", policy.Target{OrgID: "o", ProjectID: "p"}, 4},
		{policy.ScopeOrg, "o2", "8", policy.Target{OrgID: "o", ProjectID: "p2"}, 3},
	}
	for _, st := range steps {
		if err := set(t, pool, s, st.scope, st.id, "test.scoped", st.value); err != nil {
			t.Fatal(err)
		}
		if v, err := k.Get(ctx, s, st.t); err != nil || v != st.want {
			t.Fatalf("after %s/%s=%s: %+v resolves to %v (%v), want %d", st.scope, st.id, st.value, st.t, v, err, st.want)
		}
	}
}

func TestSetValidates(t *testing.T) {
	pool, _ := testenv.MigratedPool(t)
	s := policy.NewService(pool, testenv.Logger(t))
	cases := []struct {
		name, scope, id, key, value string
		code                        errcode.Code
	}{
		{"unknown key", "global", "", "no.such.key", "1", errcode.NotFound},
		{"wrong type", "global", "", "outbox.max_attempts", `"ten"`, errcode.ValidationFailed},
		{"fraction", "global", "", "outbox.max_attempts", `2.5`, errcode.ValidationFailed},
		{"below minimum", "global", "", "outbox.max_attempts", `0`, errcode.ValidationFailed},
		{"above maximum", "global", "", "outbox.max_attempts", `100000`, errcode.ValidationFailed},
		{"bad duration", "global", "", "outbox.retention", `"forever"`, errcode.ValidationFailed},
		{"duration out of range", "global", "", "outbox.retention", `"1s"`, errcode.ValidationFailed},
		{"global with id", "global", "x", "outbox.retention", `"2h"`, errcode.ValidationFailed},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := set(t, pool, s, policy.Scope(tc.scope), tc.id, tc.key, tc.value)
			if errcode.Of(err) != tc.code {
				t.Fatalf("err %v, want code %s", err, tc.code)
			}
		})
	}
	var n int
	_ = pool.QueryRow(context.Background(), `SELECT count(*) FROM policy_overrides`).Scan(&n)
	if n != 0 {
		t.Fatalf("%d invalid overrides were written", n)
	}
}

// A change on one instance reaches another instance's cache through NATS long
// before the cache TTL.
func TestInvalidationAcrossInstances(t *testing.T) {
	pool, _ := testenv.MigratedPool(t)
	n := testenv.StartNATS(t)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)

	instance := func() *policy.Service {
		nc, err := nats.Connect(n.URL())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		js, _ := jetstream.New(nc)
		if err := events.Declare(ctx, js, events.Streams(), nil); err != nil {
			t.Fatal(err)
		}
		s := policy.NewService(pool, testenv.Logger(t), policy.WithTTL(time.Hour))
		go func() { _ = s.Listen(ctx, js) }()
		relay := events.NewRelay(pool, nc, js, testenv.Logger(t), nil, events.RelayOptions{})
		go func() { _ = relay.Run(ctx) }()
		return s
	}
	a, b := instance(), instance()
	k := policy.OutboxMaxAttempts
	if v, _ := k.Get(ctx, b, policy.Target{}); v != 10 {
		t.Fatalf("b starts with %d", v)
	}
	time.Sleep(300 * time.Millisecond) // the listeners subscribe
	if err := set(t, pool, a, policy.ScopeGlobal, "", k.Def().Key, "5"); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		v, err := k.Get(ctx, b, policy.Target{})
		if err != nil {
			t.Fatal(err)
		}
		if v == 5 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("instance b still reads %d ten seconds after the change (cache TTL is an hour)", v)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// And a cleared override falls back to the default on b.
	err := store.Transact(ctx, pool, store.TxOptions{}, func(tx pgx.Tx) error { return a.Clear(ctx, tx, policy.ScopeGlobal, "", k.Def().Key) })
	if err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(10 * time.Second)
	for v, _ := k.Get(ctx, b, policy.Target{}); v != 10; v, _ = k.Get(ctx, b, policy.Target{}) {
		if time.Now().After(deadline) {
			t.Fatalf("instance b reads %d after the override was cleared", v)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestCacheServesWithinTTL(t *testing.T) {
	pool, _ := testenv.MigratedPool(t)
	ctx := context.Background()
	now := time.Unix(1_700_000_000, 0)
	s := policy.NewService(pool, testenv.Logger(t), policy.WithTTL(time.Minute), policy.WithClock(func() time.Time { return now }))
	k := policy.OutboxMaxAttempts
	if v, _ := k.Get(ctx, s, policy.Target{}); v != 10 {
		t.Fatal(v)
	}
	// Written behind the service's back (no event): the cache keeps the old value
	// until the TTL passes.
	if _, err := pool.Exec(ctx, `INSERT INTO policy_overrides (scope, scope_id, key, value, updated_by) VALUES ('global', '', 'outbox.max_attempts', '4', 'sql')`); err != nil {
		t.Fatal(err)
	}
	if v, _ := k.Get(ctx, s, policy.Target{}); v != 10 {
		t.Fatalf("cached value = %d, want 10 within the TTL", v)
	}
	now = now.Add(2 * time.Minute)
	if v, _ := k.Get(ctx, s, policy.Target{}); v != 4 {
		t.Fatalf("after the TTL = %d, want 4", v)
	}
	// Database gone: Value serves the last cached value.
	pool.Close()
	now = now.Add(2 * time.Minute)
	if v := k.Value(ctx, s, policy.Target{}); v != 4 {
		t.Fatalf("Value with the database gone = %d, want the cached 4", v)
	}
}
