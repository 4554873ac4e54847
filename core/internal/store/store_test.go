package store_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/store"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
)

func TestMigrationsAreNumberedAndUnique(t *testing.T) {
	ms, err := store.Migrations()
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) == 0 {
		t.Fatal("no migrations embedded")
	}
	for i, m := range ms {
		if m.Version != i+1 {
			t.Errorf("migration %d has version %d: versions must be 1..n without gaps", i, m.Version)
		}
	}
}

// Several instances starting together must apply each migration exactly once.
func TestMigrateConcurrentStarters(t *testing.T) {
	url := testenv.Database(t)
	const starters = 6
	var wg sync.WaitGroup
	applied := make([][]int, starters)
	errs := make([]error, starters)
	start := make(chan struct{})
	for i := range starters {
		pool := testenv.Pool(t, url)
		wg.Go(func() {
			<-start
			applied[i], errs[i] = store.Migrate(context.Background(), pool)
		})
	}
	close(start)
	wg.Wait()
	ms, _ := store.Migrations()
	total := 0
	for i := range starters {
		if errs[i] != nil {
			t.Fatalf("starter %d: %v", i, errs[i])
		}
		total += len(applied[i])
	}
	if total != len(ms) {
		t.Fatalf("migrations applied %d times in all, want %d (each exactly once)", total, len(ms))
	}
	pool := testenv.Pool(t, url)
	var n int
	if err := pool.QueryRow(context.Background(), `SELECT count(*) FROM schema_migrations`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != len(ms) {
		t.Fatalf("schema_migrations has %d rows, want %d", n, len(ms))
	}
	// A second run is a no-op.
	again, err := store.Migrate(context.Background(), pool)
	if err != nil || len(again) != 0 {
		t.Fatalf("second migrate applied %v, err %v; want nothing", again, err)
	}
}

func TestMigrateRefusesEditedHistory(t *testing.T) {
	pool, _ := testenv.MigratedPool(t)
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `UPDATE schema_migrations SET checksum = 'deadbeefdeadbeef' WHERE version = 1`); err != nil {
		t.Fatal(err)
	}
	if _, err := store.Migrate(ctx, pool); err == nil {
		t.Fatal("migrate accepted a changed migration")
	}
}

func TestMigrateRefusesNewerDatabase(t *testing.T) {
	pool, _ := testenv.MigratedPool(t)
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `INSERT INTO schema_migrations (version, name, checksum) VALUES (9999, 'future', 'x')`); err != nil {
		t.Fatal(err)
	}
	if _, err := store.Migrate(ctx, pool); err == nil {
		t.Fatal("migrate accepted a database ahead of the binary")
	}
}

// Serializable read-modify-write increments that overlap: all but one fail with
// 40001 and Transact must run them again until every increment has landed once.
func TestTransactRetriesSerializationFailures(t *testing.T) {
	pool, _ := testenv.MigratedPool(t)
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `CREATE TABLE counters (k text PRIMARY KEY, v int NOT NULL); INSERT INTO counters VALUES ('a', 0)`); err != nil {
		t.Fatal(err)
	}
	var runs atomic.Int32
	const workers = 8
	var wg sync.WaitGroup
	for i := range workers {
		wg.Go(func() {
			err := store.Transact(ctx, pool, store.TxOptions{IsoLevel: pgx.Serializable, MaxAttempts: 100}, func(tx pgx.Tx) error {
				runs.Add(1)
				var v int
				if err := tx.QueryRow(ctx, `SELECT v FROM counters WHERE k = 'a'`).Scan(&v); err != nil {
					return err
				}
				time.Sleep(5 * time.Millisecond) // widen the window so the transactions overlap
				_, err := tx.Exec(ctx, `UPDATE counters SET v = $1 WHERE k = 'a'`, v+1)
				return err
			})
			if err != nil {
				t.Errorf("worker %d: %v", i, err)
			}
		})
	}
	wg.Wait()
	var v int
	if err := pool.QueryRow(ctx, `SELECT v FROM counters WHERE k = 'a'`).Scan(&v); err != nil {
		t.Fatal(err)
	}
	if v != workers {
		t.Fatalf("counter = %d, want %d: an increment was lost or doubled", v, workers)
	}
	if runs.Load() <= workers {
		t.Fatalf("fn ran %d times for %d workers: no serialization failure was retried", runs.Load(), workers)
	}
}

func TestTransactRetriesDeadlocks(t *testing.T) {
	pool, _ := testenv.MigratedPool(t)
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `CREATE TABLE locks (k int PRIMARY KEY, v int NOT NULL); INSERT INTO locks VALUES (1, 0), (2, 0)`); err != nil {
		t.Fatal(err)
	}
	var runs atomic.Int32
	barrier := make(chan struct{})
	var once sync.Once
	var arrived atomic.Int32
	var wg sync.WaitGroup
	for i := range 2 {
		first, second := 1, 2
		if i == 1 {
			first, second = 2, 1
		}
		wg.Go(func() {
			err := store.Transact(ctx, pool, store.TxOptions{}, func(tx pgx.Tx) error {
				runs.Add(1)
				if _, err := tx.Exec(ctx, `UPDATE locks SET v = v + 1 WHERE k = $1`, first); err != nil {
					return err
				}
				// On the first run both transactions hold one row before asking
				// for the other's: a deadlock Postgres detects and breaks.
				if arrived.Add(1) == 2 {
					once.Do(func() { close(barrier) })
				}
				<-barrier
				_, err := tx.Exec(ctx, `UPDATE locks SET v = v + 1 WHERE k = $1`, second)
				return err
			})
			if err != nil {
				t.Errorf("worker %d: %v", i, err)
			}
		})
	}
	wg.Wait()
	var total int
	if err := pool.QueryRow(ctx, `SELECT sum(v) FROM locks`).Scan(&total); err != nil {
		t.Fatal(err)
	}
	if total != 4 {
		t.Fatalf("sum = %d, want 4: each transaction must commit exactly once", total)
	}
	if runs.Load() < 3 {
		t.Fatalf("fn ran %d times; the deadlock victim was not retried", runs.Load())
	}
}

func TestTransactRollsBackOnError(t *testing.T) {
	pool, _ := testenv.MigratedPool(t)
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `CREATE TABLE things (k int PRIMARY KEY)`); err != nil {
		t.Fatal(err)
	}
	boom := errors.New("boom")
	runs := 0
	err := store.Transact(ctx, pool, store.TxOptions{}, func(tx pgx.Tx) error {
		runs++
		if _, err := tx.Exec(ctx, `INSERT INTO things VALUES (1)`); err != nil {
			return err
		}
		return boom
	})
	if !errors.Is(err, boom) || runs != 1 {
		t.Fatalf("err = %v after %d runs; want boom after 1", err, runs)
	}
	var n int
	_ = pool.QueryRow(ctx, `SELECT count(*) FROM things`).Scan(&n)
	if n != 0 {
		t.Fatalf("a failed transaction left %d rows", n)
	}
}

func TestAuditLogIsAppendOnly(t *testing.T) {
	pool, _ := testenv.MigratedPool(t)
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `INSERT INTO audit_log (id, actor_type, actor_id, action, target, result)
		VALUES (gen_random_uuid(), 'system', 'test', 'test.write', 'gpuaas:local:::test:1', 'success')`); err != nil {
		t.Fatal(err)
	}
	for _, stmt := range []string{`UPDATE audit_log SET action = 'x'`, `DELETE FROM audit_log`, `TRUNCATE audit_log`} {
		if _, err := pool.Exec(ctx, stmt); err == nil {
			t.Errorf("%s succeeded on the append-only audit log", stmt)
		}
	}
}

func TestClassifyUnavailable(t *testing.T) {
	// A port nothing listens on: the dial fails at once.
	pool := testenv.Pool(t, "postgres://gpuaas@127.0.0.1:1/x?sslmode=disable&connect_timeout=1")
	_, err := pool.Exec(context.Background(), `SELECT 1`)
	if err == nil {
		t.Fatal("query on a closed port succeeded")
	}
	if got := errcode.Of(store.Classify(err)); got != errcode.DatabaseUnavailable {
		t.Fatalf("classified as %s, want %s (err %v)", got, errcode.DatabaseUnavailable, err)
	}
	if store.Classify(errors.New("other")).Error() != "other" {
		t.Fatal("Classify changed an unrelated error")
	}
}

// A function registered with AfterCommit runs once, after the commit of the
// attempt that committed: never for a rollback, never for an attempt that
// was retried, and not before the rows are visible to others.
func TestAfterCommit(t *testing.T) {
	pool, _ := testenv.MigratedPool(t)
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `CREATE TABLE marks (k text PRIMARY KEY)`); err != nil {
		t.Fatal(err)
	}
	visible := func(k string) bool {
		var n int
		if err := pool.QueryRow(ctx, `SELECT count(*) FROM marks WHERE k = $1`, k).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n == 1
	}

	// Committed: runs once, after the row is visible.
	var ran []bool
	err := store.Transact(ctx, pool, store.TxOptions{}, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `INSERT INTO marks VALUES ('committed')`); err != nil {
			return err
		}
		store.AfterCommit(tx, func() { ran = append(ran, visible("committed")) })
		return nil
	})
	if err != nil || len(ran) != 1 || !ran[0] {
		t.Fatalf("committed: err %v, ran %v; want one run that sees the row", err, ran)
	}

	// Rolled back: never runs.
	calls := 0
	err = store.Transact(ctx, pool, store.TxOptions{}, func(tx pgx.Tx) error {
		store.AfterCommit(tx, func() { calls++ })
		return errors.New("refused")
	})
	if err == nil || calls != 0 {
		t.Fatalf("rolled back: err %v, %d runs; want an error and none", err, calls)
	}

	// Retried: only the committed attempt's function runs.
	attempt := 0
	var runs []int
	err = store.Transact(ctx, pool, store.TxOptions{}, func(tx pgx.Tx) error {
		attempt++
		a := attempt
		store.AfterCommit(tx, func() { runs = append(runs, a) })
		if a == 1 {
			return &pgconn.PgError{Code: "40001", Message: "could not serialize access"}
		}
		return nil
	})
	if err != nil || len(runs) != 1 || runs[0] != 2 {
		t.Fatalf("retried: err %v, runs of attempts %v; want only attempt 2", err, runs)
	}

	// Pipelined, and through a Deferred batch of it.
	ran = nil
	err = store.TransactPipelined(ctx, pool, func(tx *store.PipelinedTx) error {
		b := &pgx.Batch{}
		d := store.Deferred{Batch: b, Tx: tx}
		if _, err := d.Exec(ctx, `INSERT INTO marks VALUES ('pipelined')`); err != nil {
			return err
		}
		store.AfterCommit(d, func() { ran = append(ran, visible("pipelined")) })
		if len(ran) != 0 {
			t.Error("the function ran before the commit")
		}
		return tx.Commit(ctx, b)
	})
	if err != nil || len(ran) != 1 || !ran[0] {
		t.Fatalf("pipelined: err %v, ran %v; want one run that sees the row", err, ran)
	}
	calls = 0
	err = store.TransactPipelined(ctx, pool, func(tx *store.PipelinedTx) error {
		tx.AfterCommit(func() { calls++ })
		b := &pgx.Batch{}
		b.Queue(`INSERT INTO marks VALUES ('pipelined')`) // a duplicate key: the commit fails
		return tx.Commit(ctx, b)
	})
	if err == nil || calls != 0 {
		t.Fatalf("pipelined, failed commit: err %v, %d runs; want an error and none", err, calls)
	}

	// Something that is no transaction of Transact: at once.
	calls = 0
	store.AfterCommit(pool, func() { calls++ })
	if calls != 1 {
		t.Fatalf("no transaction: %d runs, want 1 at once", calls)
	}
}

// The pool of Open binds uuid.UUID values as uuids in binary, and anything
// else the way pgx always did.
func TestOpenBindsUUIDs(t *testing.T) {
	pool, err := store.Open(context.Background(), testenv.Database(t), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	ctx := context.Background()
	u := uuid.Must(uuid.NewV7())
	var asText, asUUIDText string
	var back uuid.UUID
	var isNull bool
	var list []string
	err = pool.QueryRow(ctx, `SELECT $1::uuid::text, $1::uuid, $2::text, $3::uuid IS NULL, $4::uuid[]::text[]`,
		u, u, (*uuid.UUID)(nil), []uuid.UUID{u, uuid.Nil}).Scan(&asUUIDText, &back, &asText, &isNull, &list)
	if err != nil {
		t.Fatal(err)
	}
	if asUUIDText != u.String() || back != u || asText != u.String() || !isNull || len(list) != 2 || list[0] != u.String() || list[1] != uuid.Nil.String() {
		t.Fatalf("bound %s: as uuid %q, back %s, as text %q, nil pointer NULL %v, array %v", u, asUUIDText, back, asText, isNull, list)
	}
	conn, err := pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()
	plan := conn.Conn().TypeMap().PlanEncode(pgtype.UUIDOID, pgtype.BinaryFormatCode, u)
	if fmt.Sprintf("%T", plan) == "*pgtype.encodePlanDriverValuer" {
		t.Fatal("a uuid.UUID is still bound through its driver.Valuer (as text)")
	}
}
