package ratelimit_test

import (
	"context"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/gpuaas/gpuaas/core/internal/ratelimit"
)

// BenchmarkAllowFarFromLimit is the common case: principals far below their limit,
// with the background flusher live. Each run first warms up until the flusher has
// caught up (a key's first request in a window and its first burst claim
// synchronously). Besides ns/op it reports the store round trips Allow made per
// request.
func BenchmarkAllowFarFromLimit(b *testing.B) {
	env := setup(b)
	for _, keys := range []int{1, 1000} {
		b.Run("keys="+strconv.Itoa(keys), func(b *testing.B) {
			reg := prometheus.NewRegistry()
			l := ratelimit.New(env.pool, ratelimit.WithRegisterer(reg), ratelimit.WithFlushInterval(100*time.Millisecond))
			stop := run(b, l)
			defer stop()
			names := make([]string, keys)
			for i := range names {
				names[i] = "user:" + strconv.Itoa(keys) + ":" + strconv.Itoa(i)
			}
			lim := ratelimit.Limit{Requests: 1 << 40, Window: time.Hour}
			ctx := context.Background()
			var next atomic.Int64
			loop := func(pb interface{ Next() bool }) {
				i := int(next.Add(7919))
				for pb.Next() {
					i++
					if _, err := l.Allow(ctx, names[i%keys], lim); err != nil {
						b.Error(err)
						return
					}
				}
			}
			// Warm up until a stretch of traffic needs no synchronous claims (at most 10s).
			before := 0.0
			for range 50 {
				warm := time.Now().Add(200 * time.Millisecond)
				var wg sync.WaitGroup
				for range runtime.GOMAXPROCS(0) {
					wg.Go(func() { loop(until(warm)) })
				}
				wg.Wait()
				claims := metricValue(b, reg, "gpuaas_ratelimit_sync_claims_total", nil)
				if claims == before {
					break
				}
				before = claims
			}
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) { loop(pb) })
			b.StopTimer()
			claims := metricValue(b, reg, "gpuaas_ratelimit_sync_claims_total", nil) - before
			b.ReportMetric(claims/float64(b.N), "roundtrips/op")
		})
	}
}

// until is a loop condition that holds until t.
type until time.Time

func (u until) Next() bool { return time.Now().Before(time.Time(u)) }

// BenchmarkAllowNearLimit is a key past its sync threshold: every request claims
// its token with a synchronous upsert.
func BenchmarkAllowNearLimit(b *testing.B) {
	env := setup(b)
	const limit = 1 << 40
	now := time.Now()
	start := now.Truncate(time.Hour)
	_, err := env.pool.Exec(context.Background(),
		`INSERT INTO rate_limit_windows (key, window_start, window_end, count, limit_requests) VALUES ('user:hot', $1, $2, $3, $4)`,
		start, start.Add(time.Hour), int64(limit)/10*9, int64(limit))
	if err != nil {
		b.Fatal(err)
	}
	l := ratelimit.New(env.pool)
	run(b, l)
	lim := ratelimit.Limit{Requests: limit, Window: time.Hour}
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if d, err := l.Allow(ctx, "user:hot", lim); err != nil || !d.Allowed {
				b.Errorf("Allow: %+v, %v", d, err)
				return
			}
		}
	})
}
