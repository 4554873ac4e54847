// Package ratelimit limits requests per key (a principal, or a client IP before
// authentication) in fixed windows whose counts are shared by every core instance
// through Postgres (table rate_limit_windows).
//
// # Accuracy
//
// A window's row counts tokens claimed by any instance. A claim of n tokens is
// all or nothing: it succeeds only while the row's count plus n stays within the
// limit, and a request is allowed only with a claimed token. So, while the store
// answers, a window never admits more than Limit.Requests requests, however many
// instances share the table and whatever the sync threshold. The guarantee is given
// up only where the limiter deliberately fails open (the store erring), when a
// window's row disappears early (a Postgres crash empties the UNLOGGED table; the
// janitor deletes a window still in use by an instance whose clock lags by more
// than the retention), or across instances whose clocks disagree about which
// window is current.
//
// A window may admit fewer requests than its limit when another instance holds
// claimed tokens it does not spend before the window ends. Those leases are small
// (about two flush intervals of that instance's traffic for the key, and never more
// than half of the headroom left below the sync threshold), a lease idle for five
// flush intervals is given back, and Run gives every lease back when it stops.
//
// # Cost
//
// Allow decides from local state when it can. Far from the limit, an instance
// spends tokens from a lease that the background flush (Run) tops up with one
// multi-row upsert per interval, sized from the key's recent traffic. Once the
// window's known count reaches the sync threshold (80% of the limit by default),
// no more leases are handed out: each request claims its one token with a
// synchronous upsert, so the boundary is exact. Denials of a window known to be
// exhausted need no round trip. The first request of a key in each window does one
// round trip.
//
// If the store fails, Allow lets the request pass, returns the error and counts it
// in gpuaas_ratelimit_store_errors_total; for a short backoff afterwards it fails
// open without asking the store, then lets one request probe it.
package ratelimit

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
)

// Limit is how many requests a key may make per window. Windows are fixed and
// aligned to the Unix epoch, so every instance agrees on them. Requests == 0
// denies everything.
type Limit struct {
	Requests int
	Window   time.Duration
}

// Decision is the outcome of Allow and what the X-RateLimit-* headers report.
type Decision struct {
	Allowed bool
	// Limit is the window's limit; Remaining is how many requests the window still
	// admits as far as this instance knows.
	Limit, Remaining int
	// Reset is when the current window ends.
	Reset time.Time
	// RetryAfter is how long a denied caller should wait (zero when allowed).
	RetryAfter time.Duration
}

// ErrInvalidLimit is returned (with Allowed = true) for a negative Requests or a
// Window shorter than a millisecond.
var ErrInvalidLimit = errors.New("ratelimit: invalid limit")

// ErrStoreUnavailable is returned (with Allowed = true) while the limiter fails open
// after a store error, without asking the store.
var ErrStoreUnavailable = errors.New("ratelimit: store unavailable, failing open")

// DB is the part of a pgx pool the limiter uses.
type DB interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

var _ DB = (*pgxpool.Pool)(nil)

// Option configures a Limiter.
type Option func(*config)

type config struct {
	flushInterval   time.Duration
	syncThreshold   float64
	now             func() time.Time
	reg             prometheus.Registerer
	log             hclog.Logger
	janitorInterval time.Duration
	retention       time.Duration
	storeTimeout    time.Duration
	storeBackoff    time.Duration
}

// WithFlushInterval sets how often Run tops up leases, refreshes counts and gives
// back idle leases (default 200ms).
func WithFlushInterval(d time.Duration) Option { return func(c *config) { c.flushInterval = d } }

// WithSyncThreshold sets the fraction of the limit (0..1, default 0.8) from which
// a window stops handing out leases and every request claims its token
// synchronously. 0 makes every decision synchronous.
func WithSyncThreshold(f float64) Option { return func(c *config) { c.syncThreshold = f } }

// WithClock sets the clock (default time.Now).
func WithClock(now func() time.Time) Option { return func(c *config) { c.now = now } }

// WithRegisterer registers the limiter's metrics (default: not registered).
func WithRegisterer(reg prometheus.Registerer) Option { return func(c *config) { c.reg = reg } }

// WithLogger sets the logger (default: discard).
func WithLogger(log hclog.Logger) Option { return func(c *config) { c.log = log } }

// WithJanitorInterval sets how often Run deletes old windows (default 1m).
func WithJanitorInterval(d time.Duration) Option { return func(c *config) { c.janitorInterval = d } }

// WithRetention sets how long a window's row is kept after the window ends
// (default 1m). It must exceed the clock skew between instances.
func WithRetention(d time.Duration) Option { return func(c *config) { c.retention = d } }

// WithStoreTimeout bounds a synchronous claim in Allow (default 500ms).
func WithStoreTimeout(d time.Duration) Option { return func(c *config) { c.storeTimeout = d } }

// WithStoreBackoff sets how long Allow fails open without asking the store after a
// store error (default 1s).
func WithStoreBackoff(d time.Duration) Option { return func(c *config) { c.storeBackoff = d } }

// numShards spreads the bucket map over independent locks.
const numShards = 64

// Limiter decides whether requests are allowed. It is safe for concurrent use.
type Limiter struct {
	db     DB
	cfg    config
	log    hclog.Logger
	m      metrics
	seed   maphash.Seed
	shards [numShards]shard
	// brokenUntil is when Allow may ask the store again after a failure, in Unix
	// nanoseconds of the limiter's clock; 0 while the store is healthy.
	brokenUntil atomic.Int64
	// flushFailing is set while flushes fail (touched by Run's goroutine only).
	flushFailing bool
}

type shard struct {
	mu sync.RWMutex
	m  map[bucketKey]*bucket
}

// bucketKey names one key's window; times are Unix microseconds, the precision
// Postgres keeps.
type bucketKey struct {
	key        string
	start, end int64
}

// bucket is this instance's view of one window of one key.
type bucket struct {
	mu         sync.Mutex
	k          bucketKey
	start, end time.Time
	limit      int64
	// global is the window's count as last read from the store: tokens claimed by
	// every instance, this one's lease included.
	global int64
	// claims counts this instance's claims that changed global; a count read
	// concurrently with one is stale.
	claims uint64
	// lease is tokens this instance has claimed and not yet spent.
	lease int64
	// used counts tokens spent since the last flush; touched reports any Allow;
	// dry reports that the lease ran out and Allow had to claim.
	used    int64
	touched bool
	dry     bool
	// want is the lease size the last flush aimed for; idle counts the flushes
	// since the last Allow.
	want int64
	idle int
	// inflight counts Allow's claims in flight. claiming, when set, is closed
	// when a lease refill by Allow or a give-back by a flush ends; Allow waits
	// for it rather than claim alongside.
	inflight int
	claiming chan struct{}
	// dead buckets have left the map; Allow looks the key up again.
	dead bool
}

type metrics struct {
	errAllow, errFlush, errJanitor prometheus.Counter
	allowed, denied, failedOpen    prometheus.Counter
	claims                         prometheus.Counter
	flushSeconds                   prometheus.Histogram
}

func newMetrics(reg prometheus.Registerer) metrics {
	storeErrors := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "gpuaas_ratelimit_store_errors_total",
		Help: "Rate limiter store failures, by operation; op=allow counts requests let through because the store could not decide.",
	}, []string{"op"})
	decisions := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "gpuaas_ratelimit_decisions_total",
		Help: "Rate limit decisions: allowed, denied, or failed_open (allowed because the store failed).",
	}, []string{"decision"})
	claims := prometheus.NewCounter(prometheus.CounterOpts{
		Name: "gpuaas_ratelimit_sync_claims_total",
		Help: "Synchronous store round trips made by Allow on the request path.",
	})
	flush := prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "gpuaas_ratelimit_flush_seconds",
		Help:    "Duration of one background flush of the rate limiter.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
	})
	if reg != nil {
		reg.MustRegister(storeErrors, decisions, claims, flush)
	}
	return metrics{
		errAllow:     storeErrors.WithLabelValues("allow"),
		errFlush:     storeErrors.WithLabelValues("flush"),
		errJanitor:   storeErrors.WithLabelValues("janitor"),
		allowed:      decisions.WithLabelValues("allowed"),
		denied:       decisions.WithLabelValues("denied"),
		failedOpen:   decisions.WithLabelValues("failed_open"),
		claims:       claims,
		flushSeconds: flush,
	}
}

// New returns a limiter on the rate_limit_windows table of db. Call Run to flush
// in the background; without it every lease refill happens in Allow.
func New(db DB, opts ...Option) *Limiter {
	cfg := config{
		flushInterval:   200 * time.Millisecond,
		syncThreshold:   0.8,
		now:             time.Now,
		log:             hclog.NewNullLogger(),
		janitorInterval: time.Minute,
		retention:       time.Minute,
		storeTimeout:    500 * time.Millisecond,
		storeBackoff:    time.Second,
	}
	for _, o := range opts {
		o(&cfg)
	}
	if cfg.flushInterval <= 0 {
		cfg.flushInterval = 200 * time.Millisecond
	}
	cfg.syncThreshold = min(max(cfg.syncThreshold, 0), 1)
	if cfg.janitorInterval <= 0 {
		cfg.janitorInterval = time.Minute
	}
	if cfg.retention < 0 {
		cfg.retention = 0
	}
	if cfg.storeTimeout <= 0 {
		cfg.storeTimeout = 500 * time.Millisecond
	}
	if cfg.storeBackoff <= 0 {
		cfg.storeBackoff = time.Second
	}
	l := &Limiter{db: db, cfg: cfg, log: cfg.log, m: newMetrics(cfg.reg), seed: maphash.MakeSeed()}
	for i := range l.shards {
		l.shards[i].m = make(map[bucketKey]*bucket)
	}
	return l
}

// Allow spends one request of key's current window under limit lim. When the
// store fails it returns Allowed = true together with the error; the caller lets
// the request pass. ctx bounds only the store round trip, if one is needed.
func (l *Limiter) Allow(ctx context.Context, key string, lim Limit) (Decision, error) {
	if lim.Requests < 0 || lim.Window < time.Millisecond || key == "" {
		return Decision{Allowed: true, Limit: lim.Requests, Remaining: max(lim.Requests, 0)},
			fmt.Errorf("%w: %d requests per %s for key %q", ErrInvalidLimit, lim.Requests, lim.Window, key)
	}
	now := l.cfg.now()
	k := windowOf(key, now, lim.Window)
	if lim.Requests == 0 {
		l.m.denied.Inc()
		reset := time.UnixMicro(k.end)
		return Decision{Reset: reset, RetryAfter: reset.Sub(now)}, nil
	}
	limit := int64(lim.Requests)
	for {
		b := l.bucket(k)
		b.mu.Lock()
		if d, ok, err := l.decide(ctx, b, limit, now); ok {
			return d, err
		}
	}
}

// decide runs with b.mu held and releases it. It reports false when b left the
// map before a decision: look the key up again.
func (l *Limiter) decide(ctx context.Context, b *bucket, limit int64, now time.Time) (Decision, bool, error) {
	for {
		if b.dead {
			b.mu.Unlock()
			return Decision{}, false, nil
		}
		b.limit = limit
		b.touched = true
		if b.lease > 0 {
			b.lease--
			b.used++
			d := b.decision(true, now)
			b.mu.Unlock()
			l.m.allowed.Inc()
			return d, true, nil
		}
		if b.global >= limit {
			d := b.decision(false, now)
			b.mu.Unlock()
			l.m.denied.Inc()
			return d, true, nil
		}
		if !l.storeUsable(now) {
			d := b.decision(true, now)
			b.mu.Unlock()
			l.m.errAllow.Inc()
			l.m.failedOpen.Inc()
			return d, true, ErrStoreUnavailable
		}
		if b.claiming != nil {
			// Another request or a flush is refilling the lease, or a flush is
			// giving it back; wait for the outcome.
			ch := b.claiming
			b.mu.Unlock()
			select {
			case <-ch:
			case <-ctx.Done():
				return Decision{Allowed: true, Limit: int(limit), Remaining: int(limit), Reset: b.end}, true,
					fmt.Errorf("ratelimit: wait for refill: %w", ctx.Err())
			}
			b.mu.Lock()
			continue
		}
		// Far below the threshold, claim a lease; only one lease claim runs at a
		// time and never alongside single-token claims, so no count this
		// instance sees includes tokens on their way into its lease.
		threshold := l.threshold(limit)
		far := b.global < threshold && b.inflight == 0
		n := int64(1)
		var done chan struct{}
		if far {
			// Grow the refill with the burst, within half the headroom left below the threshold.
			n = max(min(b.used+1, (threshold-b.global)/2), 1)
			b.dry = b.dry || b.want > 0
			done = make(chan struct{})
			b.claiming = done
		}
		b.inflight++
		b.mu.Unlock()

		count, granted, err := l.claim(ctx, b.k, b.start, b.end, n, limit)
		if err == nil && !granted && n > 1 {
			n = 1
			count, granted, err = l.claim(ctx, b.k, b.start, b.end, 1, limit)
		}

		b.mu.Lock()
		b.inflight--
		if done != nil {
			b.claiming = nil
			close(done)
		}
		switch {
		case err != nil:
			d := b.decision(true, now)
			b.mu.Unlock()
			return d, true, l.allowFailed(ctx, now, err)
		case granted:
			l.storeHealthy()
			b.global = max(b.global, count)
			b.claims++
			b.lease += n - 1
			b.used++
			d := b.decision(true, now)
			b.mu.Unlock()
			l.m.allowed.Inc()
			return d, true, nil
		default:
			// The window cannot take one more token: its count is at the limit.
			l.storeHealthy()
			b.global = max(b.global, limit)
			b.claims++
		}
	}
}

// decision reports b's state; b.mu is held.
func (b *bucket) decision(allowed bool, now time.Time) Decision {
	d := Decision{Allowed: allowed, Limit: int(b.limit), Reset: b.end}
	if !allowed {
		d.RetryAfter = b.end.Sub(now)
		return d
	}
	// Spent by anyone = claimed by anyone minus what this instance still holds.
	d.Remaining = int(min(max(b.limit-(b.global-b.lease), 0), b.limit))
	return d
}

// threshold is the count from which a window of limit is decided synchronously.
func (l *Limiter) threshold(limit int64) int64 {
	return int64(math.Ceil(l.cfg.syncThreshold * float64(limit)))
}

// windowOf names the epoch-aligned window of length w that holds now.
func windowOf(key string, now time.Time, w time.Duration) bucketKey {
	us := w.Microseconds()
	t := now.UnixMicro()
	start := t - t%us
	if t < 0 && t%us != 0 {
		start -= us
	}
	return bucketKey{key: key, start: start, end: start + us}
}

// bucket returns the live bucket of k, creating it.
func (l *Limiter) bucket(k bucketKey) *bucket {
	sh := &l.shards[maphash.String(l.seed, k.key)%numShards]
	sh.mu.RLock()
	b := sh.m[k]
	sh.mu.RUnlock()
	if b != nil {
		return b
	}
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if b = sh.m[k]; b == nil {
		b = &bucket{k: k, start: time.UnixMicro(k.start), end: time.UnixMicro(k.end)}
		sh.m[k] = b
	}
	return b
}

// claimSQL claims $4 tokens of one window, all or nothing: a row comes back only
// if the count stays within the limit. The insert branch needs $4 <= $5.
const claimSQL = `
INSERT INTO rate_limit_windows AS w (key, window_start, window_end, count, limit_requests)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (key, window_start, window_end) DO UPDATE
   SET count = w.count + excluded.count, limit_requests = excluded.limit_requests
 WHERE w.count + excluded.count <= excluded.limit_requests
RETURNING count`

// claim asks the store for n tokens of window k; granted is false when the window
// cannot take n more. count is the window's count after the claim.
func (l *Limiter) claim(ctx context.Context, k bucketKey, start, end time.Time, n, limit int64) (count int64, granted bool, err error) {
	l.m.claims.Inc()
	ctx, cancel := context.WithTimeout(ctx, l.cfg.storeTimeout)
	defer cancel()
	err = l.db.QueryRow(ctx, claimSQL, k.key, start, end, n, limit).Scan(&count)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return 0, false, nil
	case err != nil:
		return 0, false, fmt.Errorf("ratelimit: claim %d tokens: %w", n, err)
	}
	return count, true, nil
}

// storeUsable reports whether Allow may ask the store now. After a failure it
// answers false until the backoff ends, then true to exactly one caller (the probe).
func (l *Limiter) storeUsable(now time.Time) bool {
	until := l.brokenUntil.Load()
	if until == 0 {
		return true
	}
	if now.UnixNano() < until {
		return false
	}
	return l.brokenUntil.CompareAndSwap(until, now.Add(l.cfg.storeBackoff).UnixNano())
}

// storeHealthy closes the breaker after a successful round trip.
func (l *Limiter) storeHealthy() {
	if l.brokenUntil.Load() != 0 && l.brokenUntil.Swap(0) != 0 {
		l.log.Info("rate limiter store recovered")
	}
}

// allowFailed records a failed claim in Allow and returns the error to report.
func (l *Limiter) allowFailed(ctx context.Context, now time.Time, err error) error {
	l.m.failedOpen.Inc()
	if ctx.Err() != nil {
		// The request went away; that says nothing about the store.
		return err
	}
	l.m.errAllow.Inc()
	if l.brokenUntil.Swap(now.Add(l.cfg.storeBackoff).UnixNano()) == 0 {
		l.log.Warn("rate limiter store failed; letting requests pass", "error", err, "backoff", l.cfg.storeBackoff)
	}
	return err
}
