package events_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/gpuaas/gpuaas/core/internal/events"
	"github.com/gpuaas/gpuaas/core/internal/store"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
)

// A relay of this process wakes when a transaction that enqueued events
// commits, without a poll and without a NOTIFY.
func TestRelayWakesAfterCommitInProcess(t *testing.T) {
	b := setup(t)
	startRelay(t, b, events.RelayOptions{PollInterval: time.Hour})
	time.Sleep(100 * time.Millisecond) // the relay's first look (at start) is over
	enqueue(t, b.pool, "system.wake.local", 0, 3)
	if seen := collect(t, b.nats.URL(), "system.wake.local", 3, 10*time.Second); len(seen) != 3 {
		t.Fatalf("%d of 3 events published with no poll and no notifier", len(seen))
	}
}

// Other processes' relays hear one NOTIFY, sent after the commit (never from
// inside the transaction), one for a burst of commits.
func TestNotifierWakesOtherProcessesAfterCommit(t *testing.T) {
	b := setup(t)
	ctx := t.Context()
	listener, err := pgx.ConnectConfig(ctx, b.pool.Config().ConnConfig.Copy())
	if err != nil {
		t.Fatal(err)
	}
	defer listener.Close(context.Background())
	if _, err := listener.Exec(ctx, `LISTEN gpuaas_outbox`); err != nil {
		t.Fatal(err)
	}
	nctx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { events.NewNotifier(b.pool, testenv.Logger(t)).Run(nctx); close(done) }()
	defer func() { stop(); <-done }()
	time.Sleep(50 * time.Millisecond) // the notifier has registered

	heard := func(within time.Duration) bool {
		wctx, cancel := context.WithTimeout(ctx, within)
		defer cancel()
		n, err := listener.WaitForNotification(wctx)
		if err != nil {
			return false
		}
		if n.Payload == "" {
			t.Error("a NOTIFY without the sender's tag")
		}
		return true
	}
	err = store.Transact(ctx, b.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		if _, err := events.Enqueue(ctx, tx, events.Event{Subject: "system.wake.remote", Payload: 1}); err != nil {
			return err
		}
		if heard(300 * time.Millisecond) {
			t.Error("a NOTIFY came before the transaction committed")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if !heard(5 * time.Second) {
		t.Fatal("no NOTIFY after the commit")
	}

	// A burst of commits: a few NOTIFYs, not one each.
	for range 200 {
		events.Kick()
	}
	n := 0
	for heard(300 * time.Millisecond) {
		n++
	}
	if n < 1 || n > 10 {
		t.Fatalf("200 kicks at once sent %d NOTIFYs; want 1 to 10", n)
	}
}
