package store

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// PipelinedTx is a transaction on one connection whose BEGIN travels in the
// same round trip as its first batch and whose COMMIT travels with its last:
// a read-then-write transaction costs two round trips instead of four. A
// statement that fails aborts the transaction; the statements queued after it
// in the same batch do not run.
type PipelinedTx struct {
	conn  *pgxpool.Conn
	begun bool
	done  bool
	commitHooks
}

// Send runs b inside the transaction (starting it first when this is the
// first batch) and closes its results.
func (t *PipelinedTx) Send(ctx context.Context, b *pgx.Batch) error {
	return t.send(ctx, b, false)
}

// Commit runs b and then commits, in one round trip.
func (t *PipelinedTx) Commit(ctx context.Context, b *pgx.Batch) error {
	return t.send(ctx, b, true)
}

func (t *PipelinedTx) send(ctx context.Context, b *pgx.Batch, commit bool) error {
	if t.done {
		return fmt.Errorf("store: the pipelined transaction has ended")
	}
	full := &pgx.Batch{}
	if !t.begun {
		full.Queue("BEGIN")
		t.begun = true
	}
	full.QueuedQueries = append(full.QueuedQueries, b.QueuedQueries...)
	if commit {
		full.Queue("COMMIT")
	}
	err := t.conn.SendBatch(ctx, full).Close()
	if err == nil && commit {
		t.done = true
	}
	return err
}

// TransactPipelined runs fn in a PipelinedTx, which fn must end with Commit.
// Like Transact it rolls back on an error and runs fn again after a
// serialization failure or a deadlock (so fn must have no side effects
// outside the transaction).
func TransactPipelined(ctx context.Context, pool *pgxpool.Pool, fn func(*PipelinedTx) error) error {
	return retry(ctx, TxOptions{}, func() error { return pipelinedOnce(ctx, pool, fn) })
}

func pipelinedOnce(ctx context.Context, pool *pgxpool.Pool, fn func(*PipelinedTx) error) (err error) {
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("store: acquire: %w", err)
	}
	defer conn.Release()
	t := &PipelinedTx{conn: conn}
	defer func() {
		if t.begun && !t.done {
			// On a broken connection this fails too; the first error matters.
			_, _ = conn.Exec(context.WithoutCancel(ctx), "ROLLBACK")
		}
	}()
	if err := fn(t); err != nil {
		return err
	}
	if !t.done {
		return fmt.Errorf("store: the pipelined transaction was not committed")
	}
	t.run()
	return nil
}
