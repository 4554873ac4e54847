package store_test

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

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
