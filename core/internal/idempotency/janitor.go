package idempotency

import (
	"context"
	"fmt"
	"time"
)

// Run deletes expired keys every janitor interval until ctx is done. It returns nil
// on cancellation; a failed sweep is logged and retried at the next tick.
func (s *Store) Run(ctx context.Context) error {
	t := time.NewTicker(s.interval)
	defer t.Stop()
	for {
		if n, err := s.DeleteExpired(ctx); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			s.log.Warn("delete expired idempotency keys", "error", err)
		} else if n > 0 {
			s.log.Debug("deleted expired idempotency keys", "count", n)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// DeleteExpired deletes every key whose expiry has passed, in batches so no single
// statement holds many row locks, and returns how many it deleted.
func (s *Store) DeleteExpired(ctx context.Context) (int64, error) {
	var total int64
	for {
		tag, err := s.pool.Exec(ctx, `
			DELETE FROM idempotency_keys
			WHERE ctid IN (
				SELECT ctid FROM idempotency_keys
				WHERE expires_at <= $1
				LIMIT $2
				FOR UPDATE SKIP LOCKED)
			AND expires_at <= $1`,
			s.now(), s.batch)
		if err != nil {
			return total, fmt.Errorf("idempotency: delete expired keys: %w", err)
		}
		n := tag.RowsAffected()
		total += n
		s.m.expired.Add(float64(n))
		if n < int64(s.batch) {
			return total, nil
		}
	}
}
