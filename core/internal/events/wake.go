package events

import (
	"context"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Waking relays. A transaction that enqueues events wakes the relays once
// it has committed (store.AfterCommit): those of this process at once, those
// of other processes through one NOTIFY that a Notifier sends on its own,
// coalescing what commits meanwhile. The NOTIFY is not sent inside the
// writing transaction: Postgres serializes the commits of every
// transaction that notifies on one database-wide lock, which capped how
// many allocations the core could create. A relay still polls (its
// PollInterval) for a wake-up that was lost.

// notifyEvery is the least time between two NOTIFYs of one Notifier, so a
// busy core sends at most a few hundred a second whatever its commit rate.
const notifyEvery = 2 * time.Millisecond

// processTag is this process's NOTIFY payload: a relay skips the NOTIFYs of
// its own process, which woke it directly already.
var processTag = uuid.NewString()

var wakers struct {
	sync.Mutex
	local  map[*Relay]struct{}
	remote map[*Notifier]struct{}
}

// Kick wakes the relays: the ones running in this process directly, the
// others through the running Notifiers. Enqueue calls it after commit.
func Kick() {
	wakers.Lock()
	defer wakers.Unlock()
	for r := range wakers.local {
		r.Wake()
	}
	for n := range wakers.remote {
		n.kick()
	}
}

func registerRelay(r *Relay) func() { return register(&wakers.local, r) }

// register adds v to the set *m (under wakers' lock) and returns the func
// that takes it out again.
func register[T comparable](m *map[T]struct{}, v T) func() {
	wakers.Lock()
	defer wakers.Unlock()
	if *m == nil {
		*m = map[T]struct{}{}
	}
	(*m)[v] = struct{}{}
	return func() {
		wakers.Lock()
		defer wakers.Unlock()
		delete(*m, v)
	}
}

// Notifier sends the NOTIFY that wakes the relays of other processes (API
// instances run no relay; several cores share one database).
type Notifier struct {
	pool *pgxpool.Pool
	log  hclog.Logger
	ch   chan struct{}
}

// NewNotifier returns a notifier; Run it for as long as the process enqueues
// events.
func NewNotifier(pool *pgxpool.Pool, log hclog.Logger) *Notifier {
	return &Notifier{pool: pool, log: log, ch: make(chan struct{}, 1)}
}

func (n *Notifier) kick() {
	select {
	case n.ch <- struct{}{}:
	default: // one is pending already: it covers this commit too
	}
}

// Run sends one NOTIFY per burst of kicks until ctx is done.
func (n *Notifier) Run(ctx context.Context) {
	defer register(&wakers.remote, n)()
	for {
		select {
		case <-ctx.Done():
			return
		case <-n.ch:
		}
		// A kick that arrives while this one is sent is sent next.
		if _, err := n.pool.Exec(ctx, `SELECT pg_notify($1, $2)`, notifyChannel, processTag); err != nil && ctx.Err() == nil {
			// The relays' poll picks the rows up.
			n.log.Debug("outbox notify failed", "error", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(notifyEvery):
		}
	}
}
