// Package store owns the Postgres connection pool, the schema migrations and the
// transaction helper every domain uses.
package store

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
)

// Options tune the pool. Zero values take the defaults.
type Options struct {
	MaxConns       int32
	ConnectTimeout time.Duration
	// StatementTimeout bounds every statement on the server side, so a stuck query
	// cannot hold a request beyond it.
	StatementTimeout time.Duration
}

// Open parses url, builds a pool and returns it without waiting for the database:
// the process starts and reports unreadiness while Postgres is away.
func Open(ctx context.Context, url string, opt Options) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("store: parse database url: %w", err)
	}
	if opt.MaxConns > 0 {
		cfg.MaxConns = opt.MaxConns
	}
	if opt.ConnectTimeout <= 0 {
		opt.ConnectTimeout = 2 * time.Second
	}
	if opt.StatementTimeout <= 0 {
		opt.StatementTimeout = 30 * time.Second
	}
	cfg.ConnConfig.ConnectTimeout = opt.ConnectTimeout
	cfg.ConnConfig.RuntimeParams["statement_timeout"] = fmt.Sprint(opt.StatementTimeout.Milliseconds())
	cfg.ConnConfig.RuntimeParams["application_name"] = "gpuaasd"
	cfg.HealthCheckPeriod = 5 * time.Second
	cfg.AfterConnect = registerUUID
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("store: new pool: %w", err)
	}
	return pool, nil
}

// TxOptions select the isolation level and retry budget of Transact.
type TxOptions struct {
	IsoLevel pgx.TxIsoLevel
	// MaxAttempts bounds retries of serialization failures and deadlocks (default 8).
	MaxAttempts int
	ReadOnly    bool
}

// Deferred queues the statements given to its Exec on a batch instead of
// running them, so several writes of a transaction share one round trip; their
// errors come from the batch (tx.SendBatch(ctx, b).Close()). Tx, when set, is
// the transaction the batch belongs to, whose AfterCommit Deferred passes on.
type Deferred struct {
	Batch *pgx.Batch
	Tx    AfterCommitter
}

// AfterCommitter is a transaction that runs functions once it has committed:
// the transactions of Transact and TransactPipelined are. A function
// registered in an attempt that rolls back never runs.
type AfterCommitter interface {
	AfterCommit(f func())
}

// AfterCommit runs f after d's transaction commits, or at once when d has
// no transaction to wait for.
func (d Deferred) AfterCommit(f func()) { AfterCommit(d.Tx, f) }

// AfterCommit registers f to run after the transaction tx commits; when tx
// cannot say (it did not come from Transact), f runs at once.
func AfterCommit(tx any, f func()) {
	if ac, ok := tx.(AfterCommitter); ok {
		ac.AfterCommit(f)
		return
	}
	f()
}

// commitHooks are the functions a transaction runs once it has committed;
// Transact's and TransactPipelined's transactions embed them.
type commitHooks []func()

// AfterCommit implements AfterCommitter.
func (h *commitHooks) AfterCommit(f func()) { *h = append(*h, f) }

func (h commitHooks) run() {
	for _, f := range h {
		f()
	}
}

// hookedTx is the transaction Transact hands its function.
type hookedTx struct {
	pgx.Tx
	commitHooks
}

// Exec queues sql on the batch and reports success for now.
func (d Deferred) Exec(_ context.Context, sql string, args ...any) (pgconn.CommandTag, error) {
	d.Batch.Queue(sql, args...)
	return pgconn.CommandTag{}, nil
}

// Beginner is what Transact needs: a pool or a single connection.
type Beginner interface {
	BeginTx(ctx context.Context, opts pgx.TxOptions) (pgx.Tx, error)
}

// Transact runs fn in a transaction and commits it. A serialization failure or a
// deadlock anywhere in fn or at commit rolls back and runs fn again with jittered
// backoff, so fn must have no side effects outside the transaction. Any other error
// rolls back and is returned.
func Transact(ctx context.Context, db Beginner, opt TxOptions, fn func(pgx.Tx) error) error {
	mode := pgx.ReadWrite
	if opt.ReadOnly {
		mode = pgx.ReadOnly
	}
	return retry(ctx, opt, func() error {
		return transactOnce(ctx, db, pgx.TxOptions{IsoLevel: opt.IsoLevel, AccessMode: mode}, fn)
	})
}

// retry runs once until it succeeds or fails with an error that is not a
// serialization failure or a deadlock, with jittered backoff between tries.
func retry(ctx context.Context, opt TxOptions, once func() error) error {
	attempts := opt.MaxAttempts
	if attempts <= 0 {
		attempts = 8
	}
	var err error
	for i := 0; i < attempts; i++ {
		if i > 0 {
			d := time.Duration(1<<min(i, 6)) * time.Millisecond
			d += time.Duration(rand.Int64N(int64(d)))
			select {
			case <-ctx.Done():
				return fmt.Errorf("store: transact: %w (last error: %w)", ctx.Err(), err)
			case <-time.After(d):
			}
		}
		err = once()
		if err == nil || !Retryable(err) {
			return err
		}
	}
	return fmt.Errorf("store: transact gave up after %d attempts: %w", attempts, err)
}

func transactOnce(ctx context.Context, db Beginner, opts pgx.TxOptions, fn func(pgx.Tx) error) (err error) {
	tx, err := db.BeginTx(ctx, opts)
	if err != nil {
		return fmt.Errorf("store: begin: %w", err)
	}
	defer func() {
		if err != nil {
			// Rollback on a broken connection fails too; the first error is the one that matters.
			_ = tx.Rollback(context.WithoutCancel(ctx))
		}
	}()
	ht := &hookedTx{Tx: tx}
	if err = fn(ht); err != nil {
		return err
	}
	if err = tx.Commit(ctx); err != nil {
		return fmt.Errorf("store: commit: %w", err)
	}
	ht.run()
	return nil
}

// SQLSTATE codes the store treats specially.
const (
	codeSerializationFailure = "40001"
	codeDeadlockDetected     = "40P01"
	codeUniqueViolation      = "23505"
)

// Retryable reports whether err is a serialization failure or a deadlock.
func Retryable(err error) bool {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code == codeSerializationFailure || pgErr.Code == codeDeadlockDetected
	}
	return false
}

// IsUniqueViolation reports whether err is a unique constraint violation, optionally
// on the named constraint.
func IsUniqueViolation(err error, constraint string) bool {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == codeUniqueViolation {
		return constraint == "" || pgErr.ConstraintName == constraint
	}
	return false
}

// Unavailable reports whether err means the database could not be reached (as
// opposed to a query the database rejected): connection refused or reset, a dial
// timeout, the server shutting down (57P01..57P03) or a connection-class SQLSTATE (08xxx).
func Unavailable(err error) bool {
	if err == nil {
		return false
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch {
		case pgErr.Code == "57P01", pgErr.Code == "57P02", pgErr.Code == "57P03":
			return true
		case len(pgErr.Code) == 5 && pgErr.Code[:2] == "08":
			return true
		}
		return false
	}
	var connErr *pgconn.ConnectError
	if errors.As(err, &connErr) {
		return true
	}
	var netErr net.Error
	if errors.As(err, &netErr) {
		return true
	}
	return pgconn.SafeToRetry(err) || pgconn.Timeout(err)
}

// Classify turns a database error into a coded error when it has a meaning a client
// should see (database away → database_unavailable); other errors pass through.
func Classify(err error) error {
	if err == nil {
		return nil
	}
	if errcode.As(err) != nil {
		return err
	}
	if Unavailable(err) {
		return errcode.Wrap(err, errcode.DatabaseUnavailable, "the database is unavailable; retry shortly")
	}
	return err
}
