package events_test

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/gpuaas/gpuaas/core/internal/events"
	"github.com/gpuaas/gpuaas/core/internal/store"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
)

type bundle struct {
	pool *pgxpool.Pool
	nats *testenv.NATS
}

func setup(t testing.TB) bundle {
	t.Helper()
	pool, _ := testenv.MigratedPool(t)
	n := testenv.StartNATS(t)
	nc, js := connect(t, n.URL())
	_ = nc
	if err := events.Declare(context.Background(), js, events.Streams(), events.Consumers()); err != nil {
		t.Fatal(err)
	}
	return bundle{pool: pool, nats: n}
}

func connect(t testing.TB, url string) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	nc, err := nats.Connect(url, nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond), nats.RetryOnFailedConnect(true))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return nc, js
}

// startRelay runs a relay on its own NATS connection until the test ends.
func startRelay(t testing.TB, b bundle, opt events.RelayOptions) (*events.Relay, *prometheus.Registry) {
	t.Helper()
	nc, js := connect(t, b.nats.URL())
	reg := prometheus.NewRegistry()
	r := events.NewRelay(b.pool, nc, js, testenv.Logger(t), reg, opt)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = r.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return r, reg
}

func enqueue(t testing.TB, pool *pgxpool.Pool, subject string, from, n int) {
	t.Helper()
	ctx := context.Background()
	err := store.Transact(ctx, pool, store.TxOptions{}, func(tx pgx.Tx) error {
		evs := make([]events.Event, n)
		for i := range evs {
			evs[i] = events.Event{Subject: subject, Payload: map[string]int{"seq": from + i}}
		}
		_, err := events.Enqueue(ctx, tx, evs...)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}

// collect counts the messages on subject by sequence number until want distinct
// ones arrived (or the deadline passed) and returns the count per seq.
func collect(t testing.TB, url, subject string, want int, within time.Duration) map[int]int {
	t.Helper()
	_, js := connect(t, url)
	ctx := context.Background()
	cons, err := js.OrderedConsumer(ctx, "SYSTEM", jetstream.OrderedConsumerConfig{FilterSubjects: []string{subject}})
	if err != nil {
		t.Fatal(err)
	}
	seen := map[int]int{}
	deadline := time.Now().Add(within)
	for len(seen) < want && time.Now().Before(deadline) {
		batch, err := cons.FetchNoWait(1000)
		if err != nil {
			t.Fatal(err)
		}
		got := 0
		for msg := range batch.Messages() {
			var p struct{ Seq int }
			if err := json.Unmarshal(msg.Data(), &p); err != nil {
				t.Fatal(err)
			}
			seen[p.Seq]++
			got++
		}
		if got == 0 {
			time.Sleep(20 * time.Millisecond)
		}
	}
	return seen
}

func streamCount(t testing.TB, url, subject string) uint64 {
	t.Helper()
	_, js := connect(t, url)
	s, err := js.Stream(context.Background(), "SYSTEM")
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(context.Background(), jetstream.WithSubjectFilter(subject))
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Subjects[subject]
}

func pendingRows(t testing.TB, pool *pgxpool.Pool) (pending, published, failed int) {
	t.Helper()
	err := pool.QueryRow(context.Background(), `SELECT
		count(*) FILTER (WHERE status = 'pending'),
		count(*) FILTER (WHERE status = 'published'),
		count(*) FILTER (WHERE status = 'failed') FROM outbox`).Scan(&pending, &published, &failed)
	if err != nil {
		t.Fatal(err)
	}
	return
}

func assertExactlyOnce(t *testing.T, seen map[int]int, n int) {
	t.Helper()
	if len(seen) != n {
		t.Fatalf("received %d distinct events, want %d", len(seen), n)
	}
	for seq, c := range seen {
		if c != 1 {
			t.Fatalf("event %d received %d times", seq, c)
		}
	}
}

func TestOutboxPublishesEveryRowOnce(t *testing.T) {
	b := setup(t)
	startRelay(t, b, events.RelayOptions{})
	const n = 1200
	for i := 0; i < n; i += 100 {
		enqueue(t, b.pool, "system.test.once", i, 100)
	}
	assertExactlyOnce(t, collect(t, b.nats.URL(), "system.test.once", n, 30*time.Second), n)
	waitFor(t, 10*time.Second, func() bool { _, pub, _ := pendingRows(t, b.pool); return pub == n })
}

// The relay must wake on NOTIFY at commit: with the safety-net poll set to an hour,
// an event still arrives at once.
func TestOutboxWakesOnNotify(t *testing.T) {
	b := setup(t)
	startRelay(t, b, events.RelayOptions{PollInterval: time.Hour})
	time.Sleep(200 * time.Millisecond) // let the listener connect; it drains once on connect
	enqueue(t, b.pool, "system.test.notify", 0, 1)
	assertExactlyOnce(t, collect(t, b.nats.URL(), "system.test.notify", 1, 10*time.Second), 1)
}

// Two relays (two core instances) racing over one outbox: every row is published by
// exactly one of them and lands in the stream once.
func TestOutboxTwoRelaysRace(t *testing.T) {
	b := setup(t)
	_, reg1 := startRelay(t, b, events.RelayOptions{BatchSize: 50})
	_, reg2 := startRelay(t, b, events.RelayOptions{BatchSize: 50})
	const writers, per = 8, 250
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := 0; i < per; i += 10 {
				enqueue(t, b.pool, "system.test.race", w*per+i, 10)
			}
		})
	}
	wg.Wait()
	const n = writers * per
	assertExactlyOnce(t, collect(t, b.nats.URL(), "system.test.race", n, 60*time.Second), n)
	waitFor(t, 10*time.Second, func() bool { _, pub, _ := pendingRows(t, b.pool); return pub == n })
	p1 := metricValue(t, reg1, "gpuaas_outbox_published_total")
	p2 := metricValue(t, reg2, "gpuaas_outbox_published_total")
	if p1+p2 != n {
		t.Fatalf("relays published %v + %v = %v rows, want exactly %d", p1, p2, p1+p2, n)
	}
	if p1 == 0 || p2 == 0 {
		t.Logf("one relay did all the work (%v/%v); the race was not exercised evenly", p1, p2)
	}
	if c := streamCount(t, b.nats.URL(), "system.test.race"); c != n {
		t.Fatalf("stream holds %d messages, want %d", c, n)
	}
}

// NATS away: rows accumulate untouched (no attempt is spent); when NATS returns every
// row is published exactly once.
func TestOutboxSurvivesNATSRestart(t *testing.T) {
	b := setup(t)
	startRelay(t, b, events.RelayOptions{RetryBase: 10 * time.Millisecond, MaxAttempts: func(context.Context) int { return 2 }})
	enqueue(t, b.pool, "system.test.restart", 0, 100)
	waitFor(t, 10*time.Second, func() bool { _, pub, _ := pendingRows(t, b.pool); return pub == 100 })

	b.nats.Stop()
	for i := 100; i < 600; i += 100 {
		enqueue(t, b.pool, "system.test.restart", i, 100)
	}
	time.Sleep(500 * time.Millisecond) // the relay retries against the dead server meanwhile
	pending, _, failed := pendingRows(t, b.pool)
	if pending != 500 || failed != 0 {
		t.Fatalf("while NATS is down: %d pending, %d failed; want 500 pending, 0 failed", pending, failed)
	}
	var attempts int
	_ = b.pool.QueryRow(context.Background(), `SELECT coalesce(max(attempts), 0) FROM outbox`).Scan(&attempts)
	if attempts != 0 {
		t.Fatalf("an outage spent %d attempts of a row", attempts)
	}

	b.nats.Start()
	assertExactlyOnce(t, collect(t, b.nats.URL(), "system.test.restart", 600, 60*time.Second), 600)
	if c := streamCount(t, b.nats.URL(), "system.test.restart"); c != 600 {
		t.Fatalf("stream holds %d messages, want 600", c)
	}
}

// A row no stream accepts fails on every attempt and is marked failed after the
// policy's number of attempts; other rows are unaffected.
func TestOutboxMarksFailedAfterMaxAttempts(t *testing.T) {
	b := setup(t)
	startRelay(t, b, events.RelayOptions{RetryBase: 10 * time.Millisecond, PublishTimeout: time.Second, MaxAttempts: func(context.Context) int { return 3 }})
	enqueue(t, b.pool, "nowhere.test.nostream", 0, 1)
	enqueue(t, b.pool, "system.test.ok", 0, 1)
	waitFor(t, 20*time.Second, func() bool { _, pub, failed := pendingRows(t, b.pool); return failed == 1 && pub == 1 })
	var attempts int
	var lastErr string
	if err := b.pool.QueryRow(context.Background(), `SELECT attempts, last_error FROM outbox WHERE status = 'failed'`).Scan(&attempts, &lastErr); err != nil {
		t.Fatal(err)
	}
	if attempts != 3 || lastErr == "" {
		t.Fatalf("failed row has %d attempts and error %q; want 3 and a reason", attempts, lastErr)
	}
}

func TestEnqueueRollsBackWithTransaction(t *testing.T) {
	b := setup(t)
	ctx := context.Background()
	_ = store.Transact(ctx, b.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		if _, err := events.Enqueue(ctx, tx, events.Event{Subject: "system.test.rollback", Payload: 1}); err != nil {
			t.Fatal(err)
		}
		return fmt.Errorf("abort")
	})
	if p, pub, f := pendingRows(t, b.pool); p+pub+f != 0 {
		t.Fatal("an event of a rolled-back transaction was kept")
	}
}

// A message delivered twice with the same Nats-Msg-Id is handled once.
func TestInboxMakesRedeliveryANoop(t *testing.T) {
	b := setup(t)
	ctx := context.Background()
	nc, js := connect(t, b.nats.URL())
	_ = nc
	// A stream with a tiny duplicate window so the second publish of the same id is
	// stored, as a redelivery after the window would be.
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "INBOXTEST", Subjects: []string{"inboxtest.>"}, Duplicates: 100 * time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.pool.Exec(ctx, `CREATE TABLE handled (msg_id text NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		msg := nats.NewMsg("inboxtest.x")
		msg.Data = []byte(`{}`)
		if _, err := js.PublishMsg(ctx, msg, jetstream.WithMsgID("same-id")); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			time.Sleep(300 * time.Millisecond)
		}
	}
	msg := nats.NewMsg("inboxtest.x")
	msg.Data = []byte(`{}`)
	if _, err := js.PublishMsg(ctx, msg, jetstream.WithMsgID("other-id")); err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	spec := events.ConsumerSpec{Durable: "inbox-test", Stream: "INBOXTEST", AckWait: 5 * time.Second, MaxDeliver: 5}
	go func() {
		_ = events.Consume(cctx, b.pool, js, spec, testenv.Logger(t), func(ctx context.Context, tx pgx.Tx, m jetstream.Msg) error {
			_, err := tx.Exec(ctx, `INSERT INTO handled VALUES ($1)`, m.Headers().Get(jetstream.MsgIDHeader))
			return err
		})
		close(done)
	}()
	waitFor(t, 10*time.Second, func() bool {
		var n int
		_ = b.pool.QueryRow(ctx, `SELECT count(*) FROM inbox WHERE consumer = 'inbox-test'`).Scan(&n)
		return n == 2
	})
	// Wait until the consumer has acked all three deliveries.
	waitFor(t, 10*time.Second, func() bool {
		c, err := js.Consumer(ctx, "INBOXTEST", "inbox-test")
		if err != nil {
			return false
		}
		info, err := c.Info(ctx)
		return err == nil && info.AckFloor.Stream == 3
	})
	cancel()
	<-done
	var same, other int
	_ = b.pool.QueryRow(ctx, `SELECT count(*) FILTER (WHERE msg_id = 'same-id'), count(*) FILTER (WHERE msg_id = 'other-id') FROM handled`).Scan(&same, &other)
	if same != 1 || other != 1 {
		t.Fatalf("handled same-id %d times and other-id %d times; want once each", same, other)
	}
}

func metricValue(t testing.TB, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	t.Fatalf("metric %s not registered", name)
	return 0
}

func waitFor(t testing.TB, within time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("condition not met within %s", within)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
