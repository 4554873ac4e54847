package ratelimit

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// Run flushes every flush interval and deletes old windows every janitor interval
// until ctx is done; then it gives back every unspent lease and returns nil. Store
// errors are logged and counted, never returned. Call Run once per Limiter.
func (l *Limiter) Run(ctx context.Context) error {
	flush := time.NewTicker(l.cfg.flushInterval)
	defer flush.Stop()
	janitor := time.NewTicker(l.cfg.janitorInterval)
	defer janitor.Stop()
	for {
		select {
		case <-ctx.Done():
			stop, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
			l.flush(stop, true)
			cancel()
			return nil
		case <-flush.C:
			l.flush(ctx, false)
		case <-janitor.C:
			l.clean(ctx)
		}
	}
}

// refill is a lease top-up planned by a flush. Allow waits on done meanwhile
// rather than claim alongside: a count that includes tokens not yet in the
// lease would make the window look fuller than it is.
type refill struct {
	b        *bucket
	n, limit int64
	claims   uint64 // b.claims when planned
	done     chan struct{}
}

// read is a count refresh planned by a flush.
type read struct {
	b      *bucket
	claims uint64 // b.claims when planned
}

// giveBack is an unspent lease a flush returns to its window. Allow waits on
// done meanwhile, so no claim runs alongside and the returned count is current.
type giveBack struct {
	b    *bucket
	n    int64
	done chan struct{}
}

// idleFlushes is how many flushes a bucket sits unused before its lease goes
// back and the bucket is forgotten.
const idleFlushes = 5

// flush tops up the leases of buckets used since the last flush, reads the counts
// of the other used buckets, gives back the leases of idle ones (all of them when
// final) and forgets buckets whose window ended or that sit idle with nothing held.
func (l *Limiter) flush(ctx context.Context, final bool) {
	began := time.Now()
	now := l.cfg.now()
	nowUS := now.UnixMicro()
	var refills []refill
	var reads []read
	var gives []giveBack
	for i := range l.shards {
		sh := &l.shards[i]
		sh.mu.Lock()
		for k, b := range sh.m {
			b.mu.Lock()
			switch {
			case k.end <= nowUS:
				// The window is over; its lease is worthless.
				b.dead = true
				delete(sh.m, k)
			case final || !b.touched:
				b.idle++
				busy := b.claiming != nil || b.inflight > 0
				switch {
				case busy || (b.idle < idleFlushes && !final):
				case b.lease > 0:
					g := giveBack{b: b, n: b.lease, done: make(chan struct{})}
					gives = append(gives, g)
					b.lease = 0
					b.claiming = g.done
				default:
					b.dead = true
					delete(sh.m, k)
				}
			default:
				// Hold about two intervals of this instance's traffic, twice the last
				// aim if the lease ran out meanwhile, within half the headroom left
				// below the sync threshold.
				want := max(2*b.used, b.want/2)
				if b.dry {
					want = max(want, 2*b.want)
				}
				b.want = max(want, 1)
				b.idle = 0
				want = min(want, (l.threshold(b.limit)-b.global)/2)
				if want > b.lease && b.claiming == nil && b.inflight == 0 {
					r := refill{b: b, n: want - b.lease, limit: b.limit, claims: b.claims, done: make(chan struct{})}
					refills = append(refills, r)
					b.claiming = r.done
				} else {
					reads = append(reads, read{b: b, claims: b.claims})
				}
			}
			b.touched = false
			b.dry = false
			b.used = 0
			b.mu.Unlock()
		}
		sh.mu.Unlock()
	}
	if len(refills)+len(reads)+len(gives) == 0 {
		return
	}
	refused, refillErr := l.refill(ctx, refills)
	err := errors.Join(refillErr, l.read(ctx, append(reads, refused...)), l.giveBack(ctx, gives))
	l.m.flushSeconds.Observe(time.Since(began).Seconds())
	switch {
	case err == nil:
		l.storeHealthy()
		if l.flushFailing {
			l.flushFailing = false
			l.log.Info("rate limiter flush recovered")
		}
	case ctx.Err() == nil:
		l.m.errFlush.Inc()
		if !l.flushFailing {
			// Logged once per outage; the counter counts every failed flush.
			l.flushFailing = true
			l.log.Warn("rate limiter flush failed", "error", err)
		}
	}
}

// refillSQL is claimSQL for many windows at once. Rows are taken in key order so
// that concurrent flushes of several instances cannot deadlock.
const refillSQL = `
INSERT INTO rate_limit_windows AS w (key, window_start, window_end, count, limit_requests)
SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::bigint[], $5::bigint[])
 ORDER BY 1, 2, 3
ON CONFLICT (key, window_start, window_end) DO UPDATE
   SET count = w.count + excluded.count, limit_requests = excluded.limit_requests
 WHERE w.count + excluded.count <= excluded.limit_requests
RETURNING key, window_start, window_end, count`

// refill claims the planned top-ups; each is granted in full or not at all. It
// returns the refused ones as reads, to learn their counts.
func (l *Limiter) refill(ctx context.Context, rs []refill) ([]read, error) {
	if len(rs) == 0 {
		return nil, nil
	}
	keys, starts, ends := make([]string, len(rs)), make([]time.Time, len(rs)), make([]time.Time, len(rs))
	ns, limits := make([]int64, len(rs)), make([]int64, len(rs))
	byKey := make(map[bucketKey]refill, len(rs))
	for i, r := range rs {
		keys[i], starts[i], ends[i], ns[i], limits[i] = r.b.k.key, r.b.start, r.b.end, r.n, r.limit
		byKey[r.b.k] = r
	}
	counts, err := l.windowCounts(ctx, refillSQL, keys, starts, ends, ns, limits)
	var refused []read
	for k, r := range byKey {
		count, ok := counts[k]
		r.b.mu.Lock()
		switch {
		case ok:
			r.b.lease += r.n
			r.b.global = max(r.b.global, count)
		case err == nil:
			// The window cannot take n more.
			refused = append(refused, read{b: r.b, claims: r.claims})
		}
		r.b.claiming = nil
		close(r.done)
		r.b.mu.Unlock()
	}
	if err != nil {
		return nil, fmt.Errorf("ratelimit: refill %d leases: %w", len(rs), err)
	}
	return refused, nil
}

const readSQL = `
SELECT key, window_start, window_end, w.count
  FROM rate_limit_windows w
  JOIN unnest($1::text[], $2::timestamptz[], $3::timestamptz[]) AS r (key, window_start, window_end)
 USING (key, window_start, window_end)`

// read refreshes the counts of buckets. A count may have dropped (another
// instance gave tokens back), so it replaces the known one, unless this instance
// claimed meanwhile and knows a newer count.
func (l *Limiter) read(ctx context.Context, rs []read) error {
	if len(rs) == 0 {
		return nil
	}
	keys, starts, ends := make([]string, len(rs)), make([]time.Time, len(rs)), make([]time.Time, len(rs))
	for i, r := range rs {
		keys[i], starts[i], ends[i] = r.b.k.key, r.b.start, r.b.end
	}
	counts, err := l.windowCounts(ctx, readSQL, keys, starts, ends)
	if err != nil {
		return fmt.Errorf("ratelimit: read %d windows: %w", len(rs), err)
	}
	for _, r := range rs {
		if count, ok := counts[r.b.k]; ok {
			r.b.mu.Lock()
			if r.b.claims == r.claims {
				r.b.global = count
			} else {
				r.b.global = max(r.b.global, count)
			}
			r.b.mu.Unlock()
		}
	}
	return nil
}

// giveBackSQL returns unspent tokens. The rows are locked in key order first so
// that it cannot deadlock with another instance's refill.
const giveBackSQL = `
WITH r AS (
    SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::bigint[])
        AS r (key, window_start, window_end, n)
), locked AS MATERIALIZED (
    SELECT w.key, w.window_start, w.window_end
      FROM rate_limit_windows w JOIN r USING (key, window_start, window_end)
     ORDER BY 1, 2, 3
       FOR UPDATE OF w
)
UPDATE rate_limit_windows w
   SET count = GREATEST(w.count - r.n, 0)
  FROM locked JOIN r USING (key, window_start, window_end)
 WHERE (w.key, w.window_start, w.window_end) = (locked.key, locked.window_start, locked.window_end)
RETURNING w.key, w.window_start, w.window_end, w.count`

// giveBack returns unspent leases. If it fails the tokens stay claimed: the
// window may admit fewer requests, never more.
func (l *Limiter) giveBack(ctx context.Context, gs []giveBack) error {
	if len(gs) == 0 {
		return nil
	}
	keys, starts, ends := make([]string, len(gs)), make([]time.Time, len(gs)), make([]time.Time, len(gs))
	ns := make([]int64, len(gs))
	for i, g := range gs {
		keys[i], starts[i], ends[i], ns[i] = g.b.k.key, g.b.start, g.b.end, g.n
	}
	counts, err := l.windowCounts(ctx, giveBackSQL, keys, starts, ends, ns)
	for _, g := range gs {
		g.b.mu.Lock()
		if count, ok := counts[g.b.k]; ok {
			g.b.global = count
		}
		g.b.claiming = nil
		close(g.done)
		g.b.mu.Unlock()
	}
	if err != nil {
		return fmt.Errorf("ratelimit: give back %d leases: %w", len(gs), err)
	}
	return nil
}

// windowCounts runs a statement returning (key, window_start, window_end, count)
// rows and indexes the counts by window.
func (l *Limiter) windowCounts(ctx context.Context, sql string, args ...any) (map[bucketKey]int64, error) {
	rows, err := l.db.Query(ctx, sql, args...)
	if err != nil {
		return nil, err
	}
	counts := make(map[bucketKey]int64)
	var key string
	var start, end time.Time
	var count int64
	_, err = pgx.ForEachRow(rows, []any{&key, &start, &end, &count}, func() error {
		counts[bucketKey{key: key, start: start.UnixMicro(), end: end.UnixMicro()}] = count
		return nil
	})
	if err != nil {
		return nil, err
	}
	return counts, nil
}

// cleanSQL deletes one batch of windows that ended before $1.
const cleanSQL = `
DELETE FROM rate_limit_windows
 WHERE ctid = ANY (ARRAY(SELECT ctid FROM rate_limit_windows WHERE window_end < $1 LIMIT $2))`

const cleanBatch = 5000

// clean is the janitor: it deletes windows that ended more than the retention ago.
func (l *Limiter) clean(ctx context.Context) {
	before := l.cfg.now().Add(-l.cfg.retention)
	var total int64
	for ctx.Err() == nil {
		tag, err := l.db.Exec(ctx, cleanSQL, before, cleanBatch)
		if err != nil {
			if ctx.Err() == nil {
				l.m.errJanitor.Inc()
				l.log.Warn("rate limiter janitor failed", "error", err)
			}
			return
		}
		total += tag.RowsAffected()
		if tag.RowsAffected() < cleanBatch {
			break
		}
	}
	if total > 0 {
		l.log.Debug("deleted old rate limit windows", "rows", total)
	}
}
