package events_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/gpuaas/gpuaas/core/internal/events"
	"github.com/gpuaas/gpuaas/core/internal/store"
)

// BenchmarkOutboxPipeline measures, in one run against the same NATS server:
//   - raw: JetStream async publish throughput with Nats-Msg-Id (the ceiling);
//   - pipeline: committed outbox rows → published and acknowledged → marked
//     published, events/s, reported as a ratio of raw;
//   - latency: commit of one event → a consumer receiving it, p50/p99.
func BenchmarkOutboxPipeline(b *testing.B) {
	const n = 20000
	bb := setup(b)
	ctx := context.Background()
	_, js := connect(b, bb.nats.URL())

	// Raw JetStream throughput.
	rawStart := time.Now()
	futures := make([]jetstream.PubAckFuture, 0, n)
	for i := range n {
		msg := nats.NewMsg("system.bench.raw")
		msg.Data = []byte(fmt.Sprintf(`{"seq":%d}`, i))
		f, err := js.PublishMsgAsync(msg, jetstream.WithMsgID(fmt.Sprintf("raw-%d", i)))
		if err != nil {
			b.Fatal(err)
		}
		futures = append(futures, f)
	}
	for _, f := range futures {
		select {
		case <-f.Ok():
		case err := <-f.Err():
			b.Fatal(err)
		}
	}
	raw := float64(n) / time.Since(rawStart).Seconds()

	// Pipeline throughput: rows committed first, then the relay drains them.
	for i := 0; i < n; i += 1000 {
		enqueue(b, bb.pool, "system.bench.pipeline", i, 1000)
	}
	relay, _ := startRelay(b, bb, events.RelayOptions{PollInterval: time.Hour})
	pipeStart := time.Now()
	relay.Wake()
	for {
		_, published, _ := pendingRows(b, bb.pool)
		if published == n {
			break
		}
		time.Sleep(2 * time.Millisecond)
	}
	pipe := float64(n) / time.Since(pipeStart).Seconds()

	// End-to-end latency: commit → consumer.
	const samples = 500
	received := make(chan string, samples)
	cons, err := js.OrderedConsumer(ctx, "SYSTEM", jetstream.OrderedConsumerConfig{FilterSubjects: []string{"system.bench.latency"}})
	if err != nil {
		b.Fatal(err)
	}
	cc, err := cons.Consume(func(m jetstream.Msg) { received <- m.Headers().Get(jetstream.MsgIDHeader) })
	if err != nil {
		b.Fatal(err)
	}
	defer cc.Stop()
	lat := make([]time.Duration, 0, samples)
	for i := range samples {
		var id string
		err := store.Transact(ctx, bb.pool, store.TxOptions{}, func(tx pgx.Tx) error {
			ids, err := events.Enqueue(ctx, tx, events.Event{Subject: "system.bench.latency", Payload: map[string]int{"seq": i}})
			if err == nil {
				id = ids[0].String()
			}
			return err
		})
		if err != nil {
			b.Fatal(err)
		}
		committed := time.Now()
		select {
		case got := <-received:
			if got != id {
				b.Fatalf("received %s, want %s", got, id)
			}
		case <-time.After(10 * time.Second):
			b.Fatal("event not received within 10 s")
		}
		lat = append(lat, time.Since(committed))
	}
	slices.Sort(lat)
	p50, p99 := lat[len(lat)/2], lat[len(lat)*99/100]

	b.ReportMetric(raw, "raw_jetstream_events/s")
	b.ReportMetric(pipe, "outbox_events/s")
	b.ReportMetric(pipe/raw, "outbox/raw_ratio")
	b.ReportMetric(float64(p50.Microseconds())/1000, "commit_to_consumer_p50_ms")
	b.ReportMetric(float64(p99.Microseconds())/1000, "commit_to_consumer_p99_ms")
	b.Logf("outbox: raw JetStream %.0f events/s, pipeline %.0f events/s (ratio %.2f), commit→consumer p50 %s p99 %s",
		raw, pipe, pipe/raw, p50, p99)
}
