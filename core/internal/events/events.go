// Package events is the core's side of NATS JetStream: the stream catalog generated
// from api/asyncapi.yaml, the transactional outbox writer, the relay that publishes
// outbox rows, and the inbox that makes consumers idempotent.
package events

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/gpuaas/gpuaas/core/internal/correlation"
	"github.com/gpuaas/gpuaas/core/internal/store"
)

// HeaderCorrelationID carries the correlation id of the request that caused an event.
const HeaderCorrelationID = "Gpuaas-Correlation-Id"

// StreamSpec describes one JetStream stream (generated from api/asyncapi.yaml).
type StreamSpec struct {
	Name            string
	Description     string
	Subjects        []string
	MaxAge          time.Duration
	DuplicateWindow time.Duration
}

// ConsumerSpec describes one durable consumer (generated from api/asyncapi.yaml).
type ConsumerSpec struct {
	Durable        string
	Stream         string
	Description    string
	FilterSubjects []string
	AckWait        time.Duration
	MaxDeliver     int
}

// Declare creates or updates every stream and durable consumer of the catalog.
// It is safe to call from several instances at once.
func Declare(ctx context.Context, js jetstream.JetStream, streams []StreamSpec, consumers []ConsumerSpec) error {
	for _, s := range streams {
		_, err := js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
			Name:        s.Name,
			Description: s.Description,
			Subjects:    s.Subjects,
			MaxAge:      s.MaxAge,
			Duplicates:  s.DuplicateWindow,
			Storage:     jetstream.FileStorage,
			Retention:   jetstream.LimitsPolicy,
			Discard:     jetstream.DiscardOld,
		})
		if err != nil {
			return fmt.Errorf("events: declare stream %s: %w", s.Name, err)
		}
	}
	for _, c := range consumers {
		_, err := js.CreateOrUpdateConsumer(ctx, c.Stream, consumerConfig(c))
		if err != nil {
			return fmt.Errorf("events: declare consumer %s on %s: %w", c.Durable, c.Stream, err)
		}
	}
	return nil
}

func consumerConfig(c ConsumerSpec) jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:        c.Durable,
		Description:    c.Description,
		FilterSubjects: c.FilterSubjects,
		AckPolicy:      jetstream.AckExplicitPolicy,
		AckWait:        c.AckWait,
		MaxDeliver:     c.MaxDeliver,
		DeliverPolicy:  jetstream.DeliverAllPolicy,
	}
}

// Event is one message to publish after the transaction that wrote it commits.
type Event struct {
	Subject string
	// Payload is marshalled to JSON.
	Payload any
	Headers map[string]string
}

// Execer runs a statement: a transaction, or a store.Deferred that queues it on
// the transaction's next batch.
type Execer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// Enqueue writes events to the outbox inside tx. They are published after tx commits,
// in id order, each exactly once per dedupe window, and the relays are woken then
// (Kick; a tx that is not a store.AfterCommitter wakes them at once, and a relay
// that looked too early finds the rows at its next poll). It returns the row ids.
func Enqueue(ctx context.Context, tx Execer, evs ...Event) ([]uuid.UUID, error) {
	if len(evs) == 0 {
		return nil, nil
	}
	ids := make([]uuid.UUID, len(evs))
	subjects := make([]string, len(evs))
	payloads := make([]string, len(evs))
	headers := make([]string, len(evs))
	for i, ev := range evs {
		if ev.Subject == "" {
			return nil, errors.New("events: enqueue: empty subject")
		}
		id, err := uuid.NewV7()
		if err != nil {
			return nil, fmt.Errorf("events: enqueue: new id: %w", err)
		}
		body, err := json.Marshal(ev.Payload)
		if err != nil {
			return nil, fmt.Errorf("events: enqueue %s: marshal payload: %w", ev.Subject, err)
		}
		h := ev.Headers
		if h == nil {
			h = map[string]string{}
		}
		hb, err := json.Marshal(h)
		if err != nil {
			return nil, fmt.Errorf("events: enqueue %s: marshal headers: %w", ev.Subject, err)
		}
		ids[i], subjects[i], payloads[i], headers[i] = id, ev.Subject, string(body), string(hb)
	}
	_, err := tx.Exec(ctx, `
		INSERT INTO outbox (id, subject, payload, headers, correlation_id)
		SELECT id, subject, payload::jsonb, headers::jsonb, $5
		FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[]) AS t(id, subject, payload, headers)`,
		ids, subjects, payloads, headers, correlation.From(ctx))
	if err != nil {
		return nil, fmt.Errorf("events: enqueue: %w", err)
	}
	store.AfterCommit(tx, Kick)
	return ids, nil
}
