package ratelimit

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/core/internal/testenv"
)

func TestDbgInvariant(t *testing.T) {
	pool, _ := testenv.MigratedPool(t)
	now := time.Date(2030, 1, 2, 12, 0, 30, 0, time.UTC)
	for iter := 0; iter < 30; iter++ {
		ldb := &logDB{DB: pool}
		l := New(ldb, WithClock(func() time.Time { return now }), WithFlushInterval(time.Millisecond), WithLogger(testenv.Logger(t)))
		ctx, cancel := context.WithCancel(context.Background())
		go l.Run(ctx)
		key := "k" + time.Now().String()
		lim := Limit{Requests: 200, Window: time.Minute}
		for i := 1; i <= 200; i++ {
			d, err := l.Allow(context.Background(), key, lim)
			if err != nil {
				t.Fatal(err)
			}
			if d.Remaining != 200-i {
				k := windowOf(key, now, time.Minute)
				b := l.bucket(k)
				b.mu.Lock()
				var c int64
				pool.QueryRow(context.Background(), `SELECT count FROM rate_limit_windows WHERE key=$1`, key).Scan(&c)
				t.Log(strings.Join(b.dbg, "\n")); t.Log(strings.Join(ldb.log, "\n")); t.Fatalf("iter %d req %d: remaining %d; bucket global=%d lease=%d claims=%d dead=%v idle=%d want=%d; db=%d", iter, i, d.Remaining, b.global, b.lease, b.claims, b.dead, b.idle, b.want, c)
			}
		}
		cancel()
	}
}
