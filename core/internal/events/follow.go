package events

import (
	"context"
	"errors"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/nats-io/nats.go/jetstream"
)

// Follow delivers every new message on subject (of stream) to fn with an ephemeral
// ordered consumer, until ctx is done, resubscribing after errors. onSubscribed runs
// each time a subscription starts, so callers can drop state that may have missed
// messages in between. It is for per-instance fan-out such as cache invalidation,
// not for work that must happen once (use Consume for that).
func Follow(ctx context.Context, js jetstream.JetStream, stream, subject string, log hclog.Logger, onSubscribed func(), fn func(data []byte)) {
	for {
		err := followOnce(ctx, js, stream, subject, onSubscribed, fn)
		if ctx.Err() != nil {
			return
		}
		log.Debug("follower stopped; restarting", "subject", subject, "error", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Second):
		}
	}
}

func followOnce(ctx context.Context, js jetstream.JetStream, stream, subject string, onSubscribed func(), fn func([]byte)) error {
	cons, err := js.OrderedConsumer(ctx, stream, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{subject},
		DeliverPolicy:  jetstream.DeliverNewPolicy,
	})
	if err != nil {
		return err
	}
	if onSubscribed != nil {
		onSubscribed()
	}
	msgs, err := cons.Messages()
	if err != nil {
		return err
	}
	stop := context.AfterFunc(ctx, msgs.Stop)
	defer stop()
	for {
		msg, err := msgs.Next()
		if err != nil {
			if errors.Is(err, jetstream.ErrMsgIteratorClosed) && ctx.Err() != nil {
				return nil
			}
			return err
		}
		fn(msg.Data())
	}
}
