package billing_test

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/worker"

	"github.com/gpuaas/gpuaas/core/internal/billing"
	"github.com/gpuaas/gpuaas/core/internal/events"
	"github.com/gpuaas/gpuaas/core/internal/policy"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
)

func temporalClient(t *testing.T) client.Client {
	t.Helper()
	tc, err := client.Dial(client.Options{HostPort: testenv.Env(t, "TEMPORAL_ADDRESS"), Namespace: testenv.Env(t, "TEMPORAL_NAMESPACE"), Logger: testenv.Logger(t)})
	if err != nil {
		t.Fatalf("temporal: %v", err)
	}
	t.Cleanup(tc.Close)
	return tc
}

// The accrual workflow bills usage on the real Temporal server, and the depletion
// path goes event → durable consumer → grace-period workflow → one auto-release
// request, with the consumer redelivering safely.
func TestWorkflowsOnTemporal(t *testing.T) {
	b := setup(t)
	tc := temporalClient(t)
	prefix := "t" + uuid.NewString()[:8]
	w := worker.New(tc, billing.TaskQueue(prefix), worker.Options{})
	billing.Register(w, &billing.Activities{Pool: b.pool, Policy: b.pol})
	if err := w.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.Stop)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	org := b.org(t)
	b.tx(t, func(tx pgx.Tx) error {
		return b.pol.Set(ctx, tx, policy.ScopeOrg, org.String(), "billing.depletion_grace", json.RawMessage(`"1s"`), "test")
	})
	b.open(t, org, 2, 3600, time.Now().Add(-10*time.Minute)) // 2 per second, so 1200 owed
	run, err := tc.ExecuteWorkflow(ctx, client.StartWorkflowOptions{ID: prefix + "-accrual", TaskQueue: billing.TaskQueue(prefix)}, billing.AccrualWorkflow, billing.AccrualInput{})
	if err != nil {
		t.Fatal(err)
	}
	var out billing.AccrualOutput
	if err := run.Get(ctx, &out); err != nil {
		t.Fatal(err)
	}
	if out.Records != 1 || out.DebitsMinor < 1200 || out.DebitsMinor > 1260 {
		t.Fatalf("accrual %+v; want one record billed about 1200", out)
	}
	// The balance is now negative: a depletion event sits in the outbox. Relay it
	// to a private NATS and let the consumer start the grace timer.
	n := testenv.StartNATS(t)
	nc, err := nats.Connect(n.URL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, _ := jetstream.New(nc)
	if err := events.Declare(ctx, js, events.Streams(), events.Consumers()); err != nil {
		t.Fatal(err)
	}
	relay := events.NewRelay(b.pool, nc, js, testenv.Logger(t), nil, events.RelayOptions{})
	go func() { _ = relay.Run(ctx) }()
	go func() { _ = billing.FollowDepletions(ctx, b.pool, js, tc, prefix, testenv.Logger(t)) }()
	deadline := time.Now().Add(60 * time.Second)
	for b.events(t, "billing.auto_release_requested", org) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no auto-release request after the grace period")
		}
		time.Sleep(200 * time.Millisecond)
	}
	if n := b.events(t, "billing.auto_release_requested", org); n != 1 {
		t.Fatalf("%d auto-release requests, want 1", n)
	}
}
