package events

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/gpuaas/gpuaas/core/internal/correlation"
	"github.com/gpuaas/gpuaas/core/internal/store"
)

// Handler processes one message inside the transaction that records it in the inbox,
// so its effects and the "processed" mark commit together.
type Handler func(ctx context.Context, tx pgx.Tx, msg jetstream.Msg) error

// ErrPermanent marks a handler error that retrying cannot fix: the message is
// terminated instead of redelivered.
var ErrPermanent = errors.New("events: permanent failure")

// Consume runs a durable consumer until ctx is done. Each message is handled at most
// once per Nats-Msg-Id: a redelivery finds its id in the inbox and is only acked.
// A handler error naks the message with a delay (or terminates it when the error
// wraps ErrPermanent).
func Consume(ctx context.Context, pool *pgxpool.Pool, js jetstream.JetStream, spec ConsumerSpec, log hclog.Logger, h Handler) error {
	cons, err := js.CreateOrUpdateConsumer(ctx, spec.Stream, consumerConfig(spec))
	if err != nil {
		return fmt.Errorf("events: consumer %s: %w", spec.Durable, err)
	}
	log = log.With("consumer", spec.Durable)
	cc, err := cons.Consume(func(msg jetstream.Msg) {
		handleOne(ctx, pool, spec.Durable, log, h, msg)
	})
	if err != nil {
		return fmt.Errorf("events: consume %s: %w", spec.Durable, err)
	}
	<-ctx.Done()
	cc.Drain()
	<-cc.Closed()
	return nil
}

func handleOne(ctx context.Context, pool *pgxpool.Pool, consumer string, log hclog.Logger, h Handler, msg jetstream.Msg) {
	id := msg.Headers().Get(jetstream.MsgIDHeader)
	if id == "" {
		log.Error("message without Nats-Msg-Id terminated", "subject", msg.Subject())
		_ = msg.Term()
		return
	}
	if c := msg.Headers().Get(HeaderCorrelationID); c != "" {
		ctx = correlation.With(ctx, c)
	}
	dup := false
	err := store.Transact(ctx, pool, store.TxOptions{}, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `INSERT INTO inbox (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING`, consumer, id)
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			dup = true
			return nil
		}
		return h(ctx, tx, msg)
	})
	switch {
	case err == nil:
		if dup {
			log.Debug("duplicate message acked", "message_id", id)
		}
		_ = msg.Ack()
	case errors.Is(err, ErrPermanent):
		log.Error("message terminated", "message_id", id, "subject", msg.Subject(), "error", err)
		_ = msg.TermWithReason(err.Error())
	default:
		log.Warn("message handling failed; will be redelivered", "message_id", id, "subject", msg.Subject(), "error", err)
		_ = msg.NakWithDelay(2 * time.Second)
	}
}
