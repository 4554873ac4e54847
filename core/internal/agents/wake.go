package agents

import (
	"context"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// waker wakes the long polls of a node: tasks queued by this instance
// directly, tasks queued by any instance through Postgres NOTIFY.
type waker struct {
	mu   sync.Mutex
	subs map[string]map[chan struct{}]struct{}
}

func newWaker() *waker { return &waker{subs: map[string]map[chan struct{}]struct{}{}} }

func (w *waker) subscribe(node string) (<-chan struct{}, func()) {
	ch := make(chan struct{}, 1)
	w.mu.Lock()
	if w.subs[node] == nil {
		w.subs[node] = map[chan struct{}]struct{}{}
	}
	w.subs[node][ch] = struct{}{}
	w.mu.Unlock()
	return ch, func() {
		w.mu.Lock()
		delete(w.subs[node], ch)
		if len(w.subs[node]) == 0 {
			delete(w.subs, node)
		}
		w.mu.Unlock()
	}
}

func (w *waker) notify(node string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for ch := range w.subs[node] {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

// Run listens for queued tasks of every instance and sweeps expired tasks and
// silent nodes, until ctx ends.
func (s *Service) Run(ctx context.Context) {
	go s.listen(ctx, s.pool)
	tick := time.NewTicker(s.set.HeartbeatInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if err := s.Sweep(ctx); err != nil && ctx.Err() == nil {
			s.log.Warn("sweeping node tasks", "error", err)
		}
		if n, err := s.MarkSilent(ctx); err != nil && ctx.Err() == nil {
			s.log.Warn("marking silent nodes offline", "error", err)
		} else if n > 0 {
			s.log.Warn("nodes went offline: their agents stopped heartbeating", "count", n)
		}
	}
}

func (s *Service) listen(ctx context.Context, pool *pgxpool.Pool) {
	for ctx.Err() == nil {
		err := func() error {
			conn, err := pool.Acquire(ctx)
			if err != nil {
				return err
			}
			defer func() {
				_, _ = conn.Exec(context.WithoutCancel(ctx), `UNLISTEN *`)
				conn.Release()
			}()
			if _, err := conn.Exec(ctx, `LISTEN gpuaas_node_tasks`); err != nil {
				return err
			}
			for {
				n, err := conn.Conn().WaitForNotification(ctx)
				if err != nil {
					return err
				}
				s.wake.notify(n.Payload)
			}
		}()
		if ctx.Err() != nil {
			return
		}
		s.log.Debug("node task listener stopped; restarting", "error", err)
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}
