package events

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/gpuaas/gpuaas/core/internal/store"
)

// claimGap is the least time between two claims of one relay worker.
const claimGap = 10 * time.Millisecond

// notifyChannel is the Postgres channel a Notifier notifies after outbox writes commit.
const notifyChannel = "gpuaas_outbox"

// RelayOptions tune the relay. Zero values take the defaults.
type RelayOptions struct {
	// BatchSize is the most rows claimed per transaction (default 1000).
	BatchSize int
	// Workers is how many claim-publish-record loops run at once, so one batch's
	// database work overlaps another's publishing (default 2).
	Workers int
	// PollInterval is the safety-net poll when no notification arrives (default 1s).
	PollInterval time.Duration
	// PublishTimeout bounds the wait for JetStream acks of one batch (default 5s).
	PublishTimeout time.Duration
	// MaxAttempts returns how many message-specific publish failures a row may have
	// before it is marked failed (default 10). It is read for every batch so policy
	// changes apply without a restart.
	MaxAttempts func(context.Context) int
	// Retention returns how long published rows and inbox entries are kept
	// (default 24h).
	Retention func(context.Context) time.Duration
	// RetryBase is the first retry delay after a failed publish; it doubles per
	// attempt up to 5 minutes (default 1s).
	RetryBase time.Duration
	// Now is the clock (default time.Now).
	Now func() time.Time
}

// Relay publishes committed outbox rows to JetStream. Several relays (one per core
// instance) may run against one database: rows are claimed with FOR UPDATE SKIP
// LOCKED, and each is published with Nats-Msg-Id = row id so JetStream drops a
// republish within the stream's duplicate window.
type Relay struct {
	pool *pgxpool.Pool
	nc   *nats.Conn
	js   jetstream.JetStream
	log  hclog.Logger
	opt  RelayOptions
	wake []chan struct{}
	m    relayMetrics
}

type relayMetrics struct {
	published prometheus.Counter
	retried   prometheus.Counter
	failed    prometheus.Counter
	lag       prometheus.Histogram
	batches   prometheus.Counter
}

// NewRelay returns a relay; call Run to start it. reg may be nil.
func NewRelay(pool *pgxpool.Pool, nc *nats.Conn, js jetstream.JetStream, log hclog.Logger, reg prometheus.Registerer, opt RelayOptions) *Relay {
	if opt.BatchSize <= 0 {
		opt.BatchSize = 1000
	}
	if opt.Workers <= 0 {
		opt.Workers = 2
	}
	if opt.PollInterval <= 0 {
		opt.PollInterval = time.Second
	}
	if opt.PublishTimeout <= 0 {
		opt.PublishTimeout = 5 * time.Second
	}
	if opt.MaxAttempts == nil {
		opt.MaxAttempts = func(context.Context) int { return 10 }
	}
	if opt.Retention == nil {
		opt.Retention = func(context.Context) time.Duration { return 24 * time.Hour }
	}
	if opt.Now == nil {
		opt.Now = time.Now
	}
	if opt.RetryBase <= 0 {
		opt.RetryBase = time.Second
	}
	m := relayMetrics{
		published: prometheus.NewCounter(prometheus.CounterOpts{Name: "gpuaas_outbox_published_total", Help: "Outbox rows published to JetStream and acknowledged."}),
		retried:   prometheus.NewCounter(prometheus.CounterOpts{Name: "gpuaas_outbox_publish_errors_total", Help: "Outbox publish attempts that failed and will be retried."}),
		failed:    prometheus.NewCounter(prometheus.CounterOpts{Name: "gpuaas_outbox_failed_total", Help: "Outbox rows marked failed after their attempts were spent."}),
		lag:       prometheus.NewHistogram(prometheus.HistogramOpts{Name: "gpuaas_outbox_publish_lag_seconds", Help: "Time from outbox insert to JetStream ack.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16)}),
		batches:   prometheus.NewCounter(prometheus.CounterOpts{Name: "gpuaas_outbox_batches_total", Help: "Outbox claim transactions that published at least one row."}),
	}
	if reg != nil {
		reg.MustRegister(m.published, m.retried, m.failed, m.lag, m.batches)
	}
	wake := make([]chan struct{}, opt.Workers)
	for i := range wake {
		wake[i] = make(chan struct{}, 1)
	}
	return &Relay{pool: pool, nc: nc, js: js, log: log, opt: opt, wake: wake, m: m}
}

// Wake asks the relay to look for rows now (the LISTEN loop calls it; so may tests).
func (r *Relay) Wake() {
	for _, w := range r.wake {
		select {
		case w <- struct{}{}:
		default:
		}
	}
}

// Run publishes until ctx is done. It returns nil on cancellation.
func (r *Relay) Run(ctx context.Context) error {
	defer registerRelay(r)()
	go r.listen(ctx)
	var wg sync.WaitGroup
	for i, wake := range r.wake {
		wg.Go(func() { r.work(ctx, wake, i == 0) })
	}
	wg.Wait()
	return nil
}

// work is one claim-publish-record loop; the first one also runs the janitor.
func (r *Relay) work(ctx context.Context, wake <-chan struct{}, janitorToo bool) {
	poll := time.NewTicker(r.opt.PollInterval)
	defer poll.Stop()
	janitor := time.NewTicker(time.Minute)
	defer janitor.Stop()
	if !janitorToo {
		janitor.Stop()
	}
	backoff := time.Duration(0)
	var last time.Time // of the last claim that found rows of several transactions
	for {
		// While writers commit concurrently (the last claim found rows of
		// several transactions), claims are spaced claimGap apart, so that
		// one claim takes what many commits wrote instead of a row or two
		// each. A lone writer that waits for its event before writing the
		// next, a quiet spell, or a full batch: at once.
		if wait := claimGap - time.Since(last); wait > 0 {
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
		}
		started := time.Now()
		n, txs, err := r.publishBatch(ctx)
		last = time.Time{}
		if txs > 1 {
			last = started
		}
		switch {
		case ctx.Err() != nil:
			return
		case err != nil:
			backoff = min(max(2*backoff, 50*time.Millisecond), 5*time.Second)
			if !errors.Is(err, errNATSDown) {
				r.log.Warn("outbox batch failed", "error", err, "retry_in", backoff)
			}
		case n == r.opt.BatchSize:
			backoff = 0
			last = time.Time{} // more rows are likely waiting: no gap
			continue
		default:
			backoff = 0
		}
		var retry <-chan time.Time
		if backoff > 0 {
			retry = time.After(backoff)
		}
		select {
		case <-ctx.Done():
			return
		case <-wake:
			if backoff > 0 {
				// A wake-up does not cut a backoff short: the dependency is still away.
				select {
				case <-ctx.Done():
					return
				case <-retry:
				}
			}
		case <-retry:
		case <-poll.C:
		case <-janitor.C:
			r.clean(ctx)
		}
	}
}

// listen holds a dedicated connection that LISTENs for outbox inserts, reconnecting
// with backoff; after every (re)connect it wakes the relay to catch up.
func (r *Relay) listen(ctx context.Context) {
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		err := r.listenOnce(ctx)
		if ctx.Err() != nil {
			return
		}
		r.log.Debug("outbox listener disconnected", "error", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff + time.Duration(rand.Int64N(int64(backoff)))):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

func (r *Relay) listenOnce(ctx context.Context) error {
	conn, err := pgx.ConnectConfig(ctx, r.pool.Config().ConnConfig.Copy())
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, "LISTEN "+notifyChannel); err != nil {
		return err
	}
	r.Wake()
	for {
		n, err := conn.WaitForNotification(ctx)
		if err != nil {
			return err
		}
		if n.Payload == processTag {
			continue // this process's commit: Kick woke the relay already
		}
		r.Wake()
	}
}

var errNATSDown = errors.New("events: nats is not connected")

type claimed struct {
	id        uuid.UUID
	subject   string
	payload   []byte
	headers   map[string]string
	corrID    string
	attempts  int
	createdAt time.Time
	future    jetstream.PubAckFuture
	err       error
}

// PublishBatch claims up to BatchSize due rows, publishes them and records the
// outcome, all in one transaction. It returns how many rows it claimed.
func (r *Relay) PublishBatch(ctx context.Context) (int, error) {
	n, _, err := r.publishBatch(ctx)
	return n, err
}

// publishBatch is PublishBatch, which also reports how many transactions
// wrote the rows it claimed (rows of one transaction share created_at).
func (r *Relay) publishBatch(ctx context.Context) (n, txs int, err error) {
	if !r.nc.IsConnected() {
		// Leave rows untouched: a NATS outage is not the rows' fault and must not
		// spend their attempts.
		return 0, 0, errNATSDown
	}
	maxAttempts := r.opt.MaxAttempts(ctx)
	err = store.Transact(ctx, r.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, `
			SELECT id, subject, payload, headers, correlation_id, attempts, created_at
			FROM outbox
			WHERE status = 'pending' AND next_attempt_at <= now()
			ORDER BY next_attempt_at, id
			LIMIT $1
			FOR UPDATE SKIP LOCKED`, r.opt.BatchSize)
		if err != nil {
			return fmt.Errorf("claim: %w", err)
		}
		batch, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (*claimed, error) {
			c := &claimed{}
			var hdr []byte
			if err := row.Scan(&c.id, &c.subject, &c.payload, &hdr, &c.corrID, &c.attempts, &c.createdAt); err != nil {
				return nil, err
			}
			if err := json.Unmarshal(hdr, &c.headers); err != nil {
				return nil, fmt.Errorf("row %s: headers: %w", c.id, err)
			}
			return c, nil
		})
		if err != nil {
			return fmt.Errorf("claim: %w", err)
		}
		n = len(batch)
		if n == 0 {
			return nil
		}
		txs = 1
		for i := 1; i < n; i++ {
			if !batch[i].createdAt.Equal(batch[i-1].createdAt) {
				txs++
			}
		}
		r.publish(ctx, batch)
		return r.record(ctx, tx, batch, maxAttempts)
	})
	if err != nil {
		return 0, 0, fmt.Errorf("events: relay: %w", err)
	}
	return n, txs, nil
}

// publish sends every row asynchronously and waits for all acks (or the timeout).
func (r *Relay) publish(ctx context.Context, batch []*claimed) {
	for _, c := range batch {
		msg := nats.NewMsg(c.subject)
		msg.Data = c.payload
		for k, v := range c.headers {
			msg.Header.Set(k, v)
		}
		if c.corrID != "" {
			msg.Header.Set(HeaderCorrelationID, c.corrID)
		}
		c.future, c.err = r.js.PublishMsgAsync(msg, jetstream.WithMsgID(c.id.String()))
	}
	deadline := time.NewTimer(r.opt.PublishTimeout)
	defer deadline.Stop()
	for _, c := range batch {
		if c.err != nil {
			continue
		}
		select {
		case <-c.future.Ok():
		case err := <-c.future.Err():
			c.err = err
		case <-deadline.C:
			c.err = fmt.Errorf("no ack within %s", r.opt.PublishTimeout)
			// The channel is consumed; later rows see an already-fired timer.
			deadline.Reset(0)
		case <-ctx.Done():
			c.err = ctx.Err()
		}
	}
}

// record marks acknowledged rows published and schedules retries for the rest.
func (r *Relay) record(ctx context.Context, tx pgx.Tx, batch []*claimed, maxAttempts int) error {
	now := r.opt.Now()
	var ok []uuid.UUID
	connected := r.nc.IsConnected()
	for _, c := range batch {
		if c.err == nil {
			ok = append(ok, c.id)
			r.m.lag.Observe(now.Sub(c.createdAt).Seconds())
			continue
		}
		if !connected || errors.Is(c.err, context.Canceled) {
			// The connection dropped mid-batch: the row stays pending with its
			// attempts intact. A publish that did reach the stream is dropped as a
			// duplicate when it is sent again.
			continue
		}
		attempts := c.attempts + 1
		status := "pending"
		if attempts >= maxAttempts {
			status = "failed"
			r.m.failed.Inc()
			r.log.Error("outbox row failed permanently", "outbox_id", c.id, "subject", c.subject, "attempts", attempts, "error", c.err)
		} else {
			r.m.retried.Inc()
		}
		if _, err := tx.Exec(ctx, `UPDATE outbox SET attempts = $2, status = $3, next_attempt_at = now() + $4::interval, last_error = $5 WHERE id = $1`,
			c.id, attempts, status, retryDelay(r.opt.RetryBase, attempts), truncate(c.err.Error(), 1000)); err != nil {
			return fmt.Errorf("record failure: %w", err)
		}
	}
	if len(ok) > 0 {
		if _, err := tx.Exec(ctx, `UPDATE outbox SET status = 'published', published_at = now(), last_error = '' WHERE id = ANY($1)`, ok); err != nil {
			return fmt.Errorf("record published: %w", err)
		}
		r.m.published.Add(float64(len(ok)))
		r.m.batches.Inc()
	}
	return nil
}

// retryDelay is exponential from base, capped at 5 minutes.
func retryDelay(base time.Duration, attempts int) time.Duration {
	return min(base<<min(attempts-1, 16), 5*time.Minute)
}

// clean deletes published outbox rows and inbox entries older than the retention.
func (r *Relay) clean(ctx context.Context) {
	keep := r.opt.Retention(ctx)
	if _, err := r.pool.Exec(ctx, `DELETE FROM outbox WHERE status = 'published' AND published_at < now() - $1::interval`, keep); err != nil {
		r.log.Debug("outbox cleanup failed", "error", err)
	}
	if _, err := r.pool.Exec(ctx, `DELETE FROM inbox WHERE processed_at < now() - $1::interval`, keep); err != nil {
		r.log.Debug("inbox cleanup failed", "error", err)
	}
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}
