package ratelimit_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/gpuaas/gpuaas/core/internal/ratelimit"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
)

// clock is a settable clock shared by a test and the limiters' goroutines.
type clock struct{ ns atomic.Int64 }

func newClock(t time.Time) *clock {
	c := &clock{}
	c.ns.Store(t.UnixNano())
	return c
}

func (c *clock) Now() time.Time      { return time.Unix(0, c.ns.Load()).UTC() }
func (c *clock) Add(d time.Duration) { c.ns.Add(int64(d)) }

// t0 is 30 seconds into a minute.
var t0 = time.Date(2030, 1, 2, 12, 0, 30, 0, time.UTC)

type bundle struct {
	pool  *pgxpool.Pool
	url   string
	reg   *prometheus.Registry
	clock *clock
}

func setup(t testing.TB) bundle {
	t.Helper()
	pool, url := testenv.MigratedPool(t)
	return bundle{pool: pool, url: url, reg: prometheus.NewRegistry(), clock: newClock(t0)}
}

// limiter returns a limiter on db with b's clock and registry (when reg is true).
func (b bundle) limiter(t testing.TB, db ratelimit.DB, reg bool, opts ...ratelimit.Option) *ratelimit.Limiter {
	t.Helper()
	base := []ratelimit.Option{ratelimit.WithClock(b.clock.Now), ratelimit.WithLogger(testenv.Logger(t))}
	if reg {
		base = append(base, ratelimit.WithRegisterer(b.reg))
	}
	return ratelimit.New(db, append(base, opts...)...)
}

// run starts l.Run and returns a function that stops it and waits; it is also
// called when the test ends.
func run(t testing.TB, l *ratelimit.Limiter) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Run: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

func windowCount(t testing.TB, pool *pgxpool.Pool, key string) int64 {
	t.Helper()
	var n int64
	err := pool.QueryRow(context.Background(),
		`SELECT coalesce(sum(count), 0) FROM rate_limit_windows WHERE key = $1`, key).Scan(&n)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func metricValue(t testing.TB, reg *prometheus.Registry, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metrics:
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if v, ok := labels[lp.GetName()]; ok && v != lp.GetValue() {
					continue metrics
				}
			}
			return m.GetCounter().GetValue()
		}
	}
	return 0
}

// same compares decisions, their Reset times by instant.
func same(a, b ratelimit.Decision) bool {
	eq := a.Reset.Equal(b.Reset)
	a.Reset, b.Reset = time.Time{}, time.Time{}
	return eq && a == b
}

func waitFor(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, within)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestAllowExactLimit(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	reset := time.Date(2030, 1, 2, 12, 1, 0, 0, time.UTC)
	tests := []struct {
		name       string
		requests   int
		threshold  float64
		background bool
	}{
		{name: "one request", requests: 1, threshold: 0.8},
		{name: "leases then sync", requests: 50, threshold: 0.8},
		{name: "leases then sync with flusher", requests: 200, threshold: 0.8, background: true},
		{name: "leases up to the limit", requests: 40, threshold: 1, background: true},
		{name: "always sync", requests: 10, threshold: 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			l := b.limiter(t, b.pool, false, ratelimit.WithSyncThreshold(tc.threshold), ratelimit.WithFlushInterval(time.Millisecond))
			if tc.background {
				run(t, l)
			}
			key := "user:" + tc.name
			lim := ratelimit.Limit{Requests: tc.requests, Window: time.Minute}
			for i := 1; i <= tc.requests; i++ {
				d, err := l.Allow(ctx, key, lim)
				if err != nil {
					t.Fatalf("request %d: %v", i, err)
				}
				want := ratelimit.Decision{Allowed: true, Limit: tc.requests, Remaining: tc.requests - i, Reset: reset}
				if !same(d, want) {
					t.Fatalf("request %d: got %+v, want %+v", i, d, want)
				}
			}
			for i := 0; i < 2; i++ {
				d, err := l.Allow(ctx, key, lim)
				if err != nil {
					t.Fatal(err)
				}
				want := ratelimit.Decision{Allowed: false, Limit: tc.requests, Remaining: 0, Reset: reset, RetryAfter: 30 * time.Second}
				if !same(d, want) {
					t.Fatalf("request %d: got %+v, want %+v", tc.requests+1+i, d, want)
				}
			}
			if got := windowCount(t, b.pool, key); got != int64(tc.requests) {
				t.Fatalf("store count = %d, want %d", got, tc.requests)
			}
		})
	}
}

func TestZeroLimitDeniesWithoutStore(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.pool.Close()
	l := b.limiter(t, b.pool, true)
	d, err := l.Allow(context.Background(), "ip:10.0.0.1", ratelimit.Limit{Requests: 0, Window: time.Minute})
	if err != nil || d.Allowed || d.RetryAfter != 30*time.Second {
		t.Fatalf("got %+v, %v; want denied for 30s", d, err)
	}
}

func TestInvalidLimitPasses(t *testing.T) {
	t.Parallel()
	b := setup(t)
	l := b.limiter(t, b.pool, false)
	for _, lim := range []ratelimit.Limit{{Requests: -1, Window: time.Minute}, {Requests: 5, Window: 0}, {Requests: 5, Window: time.Microsecond}} {
		d, err := l.Allow(context.Background(), "k", lim)
		if !errors.Is(err, ratelimit.ErrInvalidLimit) || !d.Allowed {
			t.Errorf("%+v: got %+v, %v; want allowed with ErrInvalidLimit", lim, d, err)
		}
	}
}

// TestTwoInstancesNeverExceedLimit hammers one key through two limiters on two
// pools (two core instances) and checks that the window admits exactly its limit.
func TestTwoInstancesNeverExceedLimit(t *testing.T) {
	t.Parallel()
	b := setup(t)
	pools := []*pgxpool.Pool{b.pool, testenv.Pool(t, b.url)}
	const limit, goroutines, denialsEach = 300, 8, 20
	tests := []struct {
		name      string
		threshold float64
	}{
		{name: "default threshold", threshold: 0.8},
		{name: "leases up to the limit", threshold: 1},
		{name: "always sync", threshold: 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			key := "user:" + tc.name
			lim := ratelimit.Limit{Requests: limit, Window: time.Hour}
			var stops []func()
			var limiters []*ratelimit.Limiter
			for _, p := range pools {
				l := b.limiter(t, p, false, ratelimit.WithSyncThreshold(tc.threshold), ratelimit.WithFlushInterval(2*time.Millisecond))
				limiters = append(limiters, l)
				stops = append(stops, run(t, l))
			}
			var allowed atomic.Int64
			var wg sync.WaitGroup
			for _, l := range limiters {
				for range goroutines {
					wg.Go(func() {
						for denied := 0; denied < denialsEach; {
							d, err := l.Allow(context.Background(), key, lim)
							if err != nil {
								t.Errorf("Allow: %v", err)
								return
							}
							if d.Allowed {
								allowed.Add(1)
							} else {
								denied++
							}
						}
					})
				}
			}
			wg.Wait()
			if got := allowed.Load(); got != limit {
				t.Fatalf("allowed %d requests in the window, want exactly %d", got, limit)
			}
			for _, stop := range stops {
				stop() // gives back unspent leases
			}
			if got := windowCount(t, b.pool, key); got != limit {
				t.Fatalf("store count after shutdown = %d, want %d", got, limit)
			}
		})
	}
}

func TestWindowRollover(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	l := b.limiter(t, b.pool, false)
	lim := ratelimit.Limit{Requests: 3, Window: time.Minute}
	first := time.Date(2030, 1, 2, 12, 1, 0, 0, time.UTC)
	second := first.Add(time.Minute)
	steps := []struct {
		advance time.Duration
		want    ratelimit.Decision
	}{
		{0, ratelimit.Decision{Allowed: true, Limit: 3, Remaining: 2, Reset: first}},
		{10 * time.Second, ratelimit.Decision{Allowed: true, Limit: 3, Remaining: 1, Reset: first}},
		{10 * time.Second, ratelimit.Decision{Allowed: true, Limit: 3, Remaining: 0, Reset: first}},
		{9 * time.Second, ratelimit.Decision{Allowed: false, Limit: 3, Reset: first, RetryAfter: time.Second}},
		{999 * time.Millisecond, ratelimit.Decision{Allowed: false, Limit: 3, Reset: first, RetryAfter: time.Millisecond}},
		{time.Millisecond, ratelimit.Decision{Allowed: true, Limit: 3, Remaining: 2, Reset: second}},
		{59 * time.Second, ratelimit.Decision{Allowed: true, Limit: 3, Remaining: 1, Reset: second}},
		{time.Minute, ratelimit.Decision{Allowed: true, Limit: 3, Remaining: 2, Reset: second.Add(time.Minute)}},
	}
	for i, s := range steps {
		b.clock.Add(s.advance)
		d, err := l.Allow(ctx, "user:roll", lim)
		if err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
		if !same(d, s.want) {
			t.Fatalf("step %d at %s: got %+v, want %+v", i, b.clock.Now().Format(time.RFC3339Nano), d, s.want)
		}
	}
	var windows []string
	rows, err := b.pool.Query(ctx, `SELECT window_start, count FROM rate_limit_windows WHERE key = 'user:roll' ORDER BY window_start`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var start time.Time
		var n int
		if err := rows.Scan(&start, &n); err != nil {
			t.Fatal(err)
		}
		windows = append(windows, fmt.Sprintf("%s=%d", start.UTC().Format("15:04"), n))
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	if got, want := fmt.Sprint(windows), "[12:00=3 12:01=2 12:02=1]"; got != want {
		t.Fatalf("windows %s, want %s", got, want)
	}
}

func TestStoreFailureFailsOpen(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	l := b.limiter(t, b.pool, true, ratelimit.WithFlushInterval(5*time.Millisecond), ratelimit.WithStoreBackoff(time.Hour))
	one := ratelimit.Limit{Requests: 1, Window: time.Minute}
	if d, err := l.Allow(ctx, "user:exhausted", one); err != nil || !d.Allowed {
		t.Fatalf("first request: %+v, %v", d, err)
	}
	if d, err := l.Allow(ctx, "user:exhausted", one); err != nil || d.Allowed {
		t.Fatalf("second request: %+v, %v; want denied", d, err)
	}
	b.pool.Close()

	storeErrors := func(op string) float64 {
		return metricValue(t, b.reg, "gpuaas_ratelimit_store_errors_total", map[string]string{"op": op})
	}
	steps := []struct {
		name        string
		key         string
		wantAllowed bool
		wantErr     error // nil: no error; otherwise errors.Is or any error when errAny
		errAny      bool
		wantErrors  float64
	}{
		{name: "store error passes", key: "user:new", wantAllowed: true, errAny: true, wantErrors: 1},
		{name: "backoff passes without the store", key: "user:new", wantAllowed: true, wantErr: ratelimit.ErrStoreUnavailable, wantErrors: 2},
		{name: "other key during backoff passes", key: "user:other", wantAllowed: true, wantErr: ratelimit.ErrStoreUnavailable, wantErrors: 3},
		{name: "window known exhausted stays denied", key: "user:exhausted", wantAllowed: false, wantErrors: 3},
	}
	for _, s := range steps {
		d, err := l.Allow(ctx, s.key, ratelimit.Limit{Requests: 1, Window: time.Minute})
		switch {
		case s.errAny && err == nil:
			t.Errorf("%s: no error", s.name)
		case !s.errAny && s.wantErr == nil && err != nil:
			t.Errorf("%s: unexpected error %v", s.name, err)
		case s.wantErr != nil && !errors.Is(err, s.wantErr):
			t.Errorf("%s: error %v, want %v", s.name, err, s.wantErr)
		}
		if d.Allowed != s.wantAllowed {
			t.Errorf("%s: allowed = %v, want %v", s.name, d.Allowed, s.wantAllowed)
		}
		if got := storeErrors("allow"); got != s.wantErrors {
			t.Errorf("%s: store errors (allow) = %v, want %v", s.name, got, s.wantErrors)
		}
	}
	if got := metricValue(t, b.reg, "gpuaas_ratelimit_decisions_total", map[string]string{"decision": "failed_open"}); got != 3 {
		t.Errorf("failed_open decisions = %v, want 3", got)
	}
	// The background flush fails too, and says so.
	run(t, l)
	waitFor(t, 5*time.Second, "flush error counted", func() bool { return storeErrors("flush") >= 1 })
}

func TestIdleLeaseGivenBack(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	lim := ratelimit.Limit{Requests: 100, Window: time.Minute}
	a := b.limiter(t, b.pool, false, ratelimit.WithSyncThreshold(1), ratelimit.WithFlushInterval(5*time.Millisecond))
	for i := 0; i < 10; i++ {
		if d, err := a.Allow(ctx, "user:lease", lim); err != nil || !d.Allowed {
			t.Fatalf("request %d on a: %+v, %v", i, d, err)
		}
	}
	if held := windowCount(t, b.pool, "user:lease"); held <= 10 {
		t.Fatalf("store count %d: a claimed no tokens ahead, nothing to give back", held)
	}
	run(t, a) // a stays idle: its lease goes back at the next flush
	waitFor(t, 5*time.Second, "lease given back", func() bool { return windowCount(t, b.pool, "user:lease") == 10 })

	other := b.limiter(t, testenv.Pool(t, b.url), false, ratelimit.WithSyncThreshold(1))
	for i := 0; i < 90; i++ {
		if d, err := other.Allow(ctx, "user:lease", lim); err != nil || !d.Allowed {
			t.Fatalf("request %d on the other instance: %+v, %v", i, d, err)
		}
	}
	if d, err := other.Allow(ctx, "user:lease", lim); err != nil || d.Allowed {
		t.Fatalf("request 101: %+v, %v; want denied", d, err)
	}
}

func TestJanitorDeletesOldWindows(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	l := b.limiter(t, b.pool, true, ratelimit.WithJanitorInterval(5*time.Millisecond), ratelimit.WithRetention(time.Minute))
	allow := func(key string, window time.Duration) {
		t.Helper()
		if d, err := l.Allow(ctx, key, ratelimit.Limit{Requests: 10, Window: window}); err != nil || !d.Allowed {
			t.Fatalf("%s: %+v, %v", key, d, err)
		}
	}
	rows := func(key string) int {
		t.Helper()
		var n int
		if err := b.pool.QueryRow(ctx, `SELECT count(*) FROM rate_limit_windows WHERE key = $1`, key).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	allow("user:old", time.Minute)    // window ends 12:01
	allow("user:hour", time.Hour)     // window ends 13:00
	b.clock.Add(90 * time.Second)     // 12:02:00: the old window ended 60s ago, within retention
	allow("user:recent", time.Minute) // window ends 12:03
	run(t, l)
	time.Sleep(50 * time.Millisecond) // several janitor rounds
	if rows("user:old") != 1 {
		t.Fatal("a window within retention was deleted")
	}
	b.clock.Add(2*time.Minute + time.Second) // 12:04:01
	waitFor(t, 5*time.Second, "old windows deleted", func() bool {
		return rows("user:old") == 0 && rows("user:recent") == 0
	})
	if rows("user:hour") != 1 {
		t.Fatal("the current window was deleted")
	}
	if got := metricValue(t, b.reg, "gpuaas_ratelimit_store_errors_total", map[string]string{"op": "janitor"}); got != 0 {
		t.Fatalf("janitor errors = %v", got)
	}
}
