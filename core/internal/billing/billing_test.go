package billing_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/gpuaas/gpuaas/core/internal/billing"
	"github.com/gpuaas/gpuaas/core/internal/ledger"
	"github.com/gpuaas/gpuaas/core/internal/policy"
	"github.com/gpuaas/gpuaas/core/internal/store"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
)

type bundle struct {
	pool *pgxpool.Pool
	pol  *policy.Service
}

func setup(t testing.TB) bundle {
	t.Helper()
	pool, _ := testenv.MigratedPool(t)
	return bundle{pool: pool, pol: policy.NewService(pool, testenv.Logger(t))}
}

func (b bundle) org(t testing.TB) uuid.UUID {
	t.Helper()
	org := uuid.Must(uuid.NewV7())
	ctx := context.Background()
	if _, err := b.pool.Exec(ctx, `INSERT INTO orgs (id, slug, name) VALUES ($1, $2, 'Org')`, org, "o"+org.String()[24:]+org.String()[9:13]); err != nil {
		t.Fatal(err)
	}
	b.tx(t, func(tx pgx.Tx) error { _, err := ledger.EnsureAccount(ctx, tx, org, "USD"); return err })
	return org
}

func (b bundle) tx(t testing.TB, fn func(pgx.Tx) error) {
	t.Helper()
	if err := store.Transact(context.Background(), b.pool, store.TxOptions{}, fn); err != nil {
		t.Fatal(err)
	}
}

func (b bundle) open(t testing.TB, org uuid.UUID, gpus int, price int64, start time.Time) uuid.UUID {
	t.Helper()
	alloc := uuid.Must(uuid.NewV7())
	b.tx(t, func(tx pgx.Tx) error {
		_, err := billing.OpenUsage(context.Background(), tx, billing.Usage{OrgID: org, ProjectID: uuid.New(), AllocationID: alloc,
			SKU: "h100x8", GPUs: gpus, PricePerGPUHourMinor: price, Currency: "USD", StartedAt: start})
		return err
	})
	return alloc
}

func (b bundle) credit(t testing.TB, org uuid.UUID, amount int64, key string, now time.Time) {
	t.Helper()
	b.tx(t, func(tx pgx.Tx) error {
		_, _, err := billing.Post(context.Background(), tx, b.pol, ledger.Entry{OrgID: org, AmountMinor: amount, Type: ledger.CreditPurchase, IdempotencyKey: key}, now)
		return err
	})
}

func (b bundle) debits(t testing.TB, org uuid.UUID) int64 {
	t.Helper()
	var d int64
	if err := b.pool.QueryRow(context.Background(), `SELECT coalesce(-sum(amount_minor), 0) FROM ledger_entries WHERE org_id = $1 AND entry_type = 'usage_debit'`, org).Scan(&d); err != nil {
		t.Fatal(err)
	}
	return d
}

func (b bundle) events(t testing.TB, subject string, org uuid.UUID) int {
	t.Helper()
	var n int
	if err := b.pool.QueryRow(context.Background(), `SELECT count(*) FROM outbox WHERE subject = $1 AND payload->>'org_id' = $2`, subject, org.String()).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

var t0 = time.Date(2026, 11, 1, 12, 0, 0, 0, time.UTC)

// Seconds accrue exactly across irregular windows: the remainder is carried, never
// lost or charged twice.
func TestAccrualCarriesRemainders(t *testing.T) {
	b := setup(t)
	org := b.org(t)
	b.credit(t, org, 1_000_000, "seed", t0)
	b.open(t, org, 3, 1001, t0) // 3 GPUs at 10.01 per GPU-hour: 0.834... minor units per second
	ctx := context.Background()
	at := t0
	for _, step := range []time.Duration{1, 1, 7, 59, 3600, 1, 13} {
		at = at.Add(step * time.Second)
		if _, err := billing.Accrue(ctx, b.pool, b.pol, at); err != nil {
			t.Fatal(err)
		}
		secs := int64(at.Sub(t0) / time.Second)
		if got, want := b.debits(t, org), secs*3*1001/3600; got != want {
			t.Fatalf("after %ds: debited %d, want floor(%d×3×1001/3600) = %d", secs, got, secs, want)
		}
	}
}

func TestAccrualWindowIsIdempotent(t *testing.T) {
	b := setup(t)
	org := b.org(t)
	b.open(t, org, 8, 250, t0)
	end := t0.Add(time.Hour)
	first, err := billing.Accrue(context.Background(), b.pool, b.pol, end)
	if err != nil || first.Records != 1 || first.DebitsMinor != 2000 {
		t.Fatalf("first run %+v %v; want 1 record, 2000 debited", first, err)
	}
	again, err := billing.Accrue(context.Background(), b.pool, b.pol, end)
	if err != nil || again.Records != 0 || again.DebitsMinor != 0 {
		t.Fatalf("second run of the same window %+v %v; want nothing", again, err)
	}
	if d := b.debits(t, org); d != 2000 {
		t.Fatalf("debited %d", d)
	}
}

// A closed record is billed to its end and no further.
func TestAccrualStopsAtRelease(t *testing.T) {
	b := setup(t)
	org := b.org(t)
	alloc := b.open(t, org, 1, 3600, t0) // 1 minor unit per second
	b.tx(t, func(tx pgx.Tx) error {
		return billing.CloseUsage(context.Background(), tx, alloc, t0.Add(90*time.Second))
	})
	for _, at := range []time.Duration{10 * time.Minute, time.Hour} {
		if _, err := billing.Accrue(context.Background(), b.pool, b.pol, t0.Add(at)); err != nil {
			t.Fatal(err)
		}
	}
	if d := b.debits(t, org); d != 90 {
		t.Fatalf("debited %d, want 90 (90 s at 1/s)", d)
	}
}

// 72 simulated hours of accrual, with the accrual killed at random points (its
// context cancelled mid-transaction) over and over: the debits total exactly
// seconds × rate.
func TestAccrualSurvivesKills(t *testing.T) {
	b := setup(t)
	org := b.org(t)
	b.credit(t, org, 1<<40, "seed", t0)
	const gpus, price = 4, 2999 // per GPU-hour
	b.open(t, org, gpus, price, t0)
	other := b.org(t)
	b.open(t, other, 1, 17, t0.Add(3*time.Minute+500*time.Millisecond))
	rng := rand.New(rand.NewPCG(1, 2))
	end := t0.Add(72 * time.Hour)
	kills := 0
	for at := t0; at.Before(end); {
		at = at.Add(time.Duration(1+rng.IntN(45*60)) * time.Second)
		if at.After(end) {
			at = end
		}
		for try := 0; ; try++ {
			// Kill early at first, then give each retry more time so the run ends
			// even on a loaded machine.
			ctx, cancel := context.WithTimeout(context.Background(), time.Duration(rng.IntN(4000))*time.Microsecond<<min(try, 12))
			_, err := billing.Accrue(ctx, b.pool, b.pol, at)
			cancel()
			if err == nil {
				break
			}
			kills++
		}
	}
	if kills == 0 {
		t.Fatal("no accrual was killed; the test proves nothing")
	}
	if got, want := b.debits(t, org), int64(72*3600)*gpus*price/3600; got != want {
		t.Fatalf("after %d kills: debited %d, want %d", kills, got, want)
	}
	secs := int64(end.Sub(t0.Add(3*time.Minute+500*time.Millisecond)) / time.Second)
	// The other record started at .5 s: whole seconds are counted from floor(start).
	if got, want := b.debits(t, other), (secs+1)*17/3600; got != want {
		t.Fatalf("other org: debited %d, want %d", got, want)
	}
	t.Logf("%d accruals were killed mid-way", kills)
}

// The low-balance warning fires once per crossing and a top-up re-arms it; reaching
// zero raises depletion once and the auto-release request once.
func TestBalanceTransitions(t *testing.T) {
	b := setup(t)
	org := b.org(t)
	ctx := context.Background()
	b.credit(t, org, 2000, "topup-1", t0) // threshold is 1000 by default
	b.open(t, org, 1, 3600, t0)           // 1 per second
	accrue := func(d time.Duration) {
		t.Helper()
		if _, err := billing.Accrue(ctx, b.pool, b.pol, t0.Add(d)); err != nil {
			t.Fatal(err)
		}
	}
	accrue(500 * time.Second) // 1500: above the threshold
	if n := b.events(t, "billing.low_balance", org); n != 0 {
		t.Fatalf("%d warnings above the threshold", n)
	}
	accrue(1100 * time.Second) // 900: below
	accrue(1200 * time.Second) // 800: still below
	if n := b.events(t, "billing.low_balance", org); n != 1 {
		t.Fatalf("%d warnings after one crossing, want 1", n)
	}
	b.credit(t, org, 1000, "topup-2", t0.Add(1200*time.Second)) // 1800: re-armed
	accrue(2100 * time.Second)                                  // 900: crossed again
	if n := b.events(t, "billing.low_balance", org); n != 2 {
		t.Fatalf("%d warnings after two crossings, want 2", n)
	}
	accrue(3000 * time.Second) // 0: depleted
	accrue(3100 * time.Second) // -100: still depleted
	if n := b.events(t, "billing.balance_depleted", org); n != 1 {
		t.Fatalf("%d depletion events, want 1", n)
	}
	var since time.Time
	_ = b.pool.QueryRow(ctx, `SELECT depleted_since FROM billing_accounts WHERE org_id = $1`, org).Scan(&since)
	for range 2 {
		b.tx(t, func(tx pgx.Tx) error { _, err := billing.RequestAutoRelease(ctx, tx, org, since); return err })
	}
	if n := b.events(t, "billing.auto_release_requested", org); n != 1 {
		t.Fatalf("%d auto-release requests, want 1", n)
	}
	b.credit(t, org, 5000, "topup-3", t0.Add(3200*time.Second))
	if n := b.events(t, "billing.balance_restored", org); n != 1 {
		t.Fatalf("%d restored events, want 1", n)
	}
	// A grace timer of the old depletion finds the org restored and asks nothing.
	var asked bool
	b.tx(t, func(tx pgx.Tx) error {
		var err error
		asked, err = billing.RequestAutoRelease(ctx, tx, org, since)
		return err
	})
	if asked {
		t.Fatal("auto-release requested after a top-up")
	}
}

// Bank-style: top-ups, accruals, refunds and balance reads at once. Every read
// equals the sum of the entries in its snapshot; at the end the sum is exactly
// credits − debits − refunds.
func TestConcurrentMoney(t *testing.T) {
	b := setup(t)
	ctx := context.Background()
	orgs := []uuid.UUID{b.org(t), b.org(t), b.org(t)}
	for _, o := range orgs {
		b.open(t, o, 2, 3600, t0)
	}
	var credits, refunds atomic.Int64
	var mismatches atomic.Int32
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for w := range 4 { // top-ups and refunds
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				o := orgs[(w+i)%len(orgs)]
				amt, typ := int64(100+i%50), ledger.CreditPurchase
				if i%5 == 4 {
					amt, typ = -int64(10+i%7), ledger.Refund
				}
				err := store.Transact(ctx, b.pool, store.TxOptions{}, func(tx pgx.Tx) error {
					_, _, err := billing.Post(ctx, tx, b.pol, ledger.Entry{OrgID: o, AmountMinor: amt, Type: typ, IdempotencyKey: fmt.Sprintf("w%d:%d", w, i)}, t0)
					return err
				})
				if err != nil {
					t.Error(err)
					return
				}
				if typ == ledger.Refund {
					refunds.Add(-amt)
				} else {
					credits.Add(amt)
				}
			}
		})
	}
	wg.Go(func() { // accruals, a second at a time
		for s := 1; ; s++ {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := billing.Accrue(ctx, b.pool, b.pol, t0.Add(time.Duration(s)*time.Second)); err != nil {
				t.Error(err)
				return
			}
		}
	})
	for range 3 { // readers
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				for _, o := range orgs {
					err := store.Transact(ctx, b.pool, store.TxOptions{IsoLevel: pgx.RepeatableRead, ReadOnly: true}, func(tx pgx.Tx) error {
						bal, err := ledger.GetBalance(ctx, tx, o)
						if err != nil {
							return err
						}
						var sum int64
						if err := tx.QueryRow(ctx, `SELECT coalesce(sum(amount_minor), 0) FROM ledger_entries WHERE org_id = $1`, o).Scan(&sum); err != nil {
							return err
						}
						if sum != bal.AmountMinor {
							mismatches.Add(1)
						}
						return nil
					})
					if err != nil {
						t.Error(err)
						return
					}
				}
			}
		})
	}
	time.Sleep(4 * time.Second)
	close(stop)
	wg.Wait()
	if m := mismatches.Load(); m > 0 {
		t.Fatalf("%d balance reads differed from the sum of entries in their snapshot", m)
	}
	var total, debits int64
	for _, o := range orgs {
		bal, err := ledger.GetBalance(ctx, b.pool, o)
		if err != nil {
			t.Fatal(err)
		}
		total += bal.AmountMinor
		debits += b.debits(t, o)
	}
	if want := credits.Load() - refunds.Load() - debits; total != want {
		t.Fatalf("balances total %d, want credits %d − refunds %d − debits %d = %d", total, credits.Load(), refunds.Load(), debits, want)
	}
	if credits.Load() == 0 || debits == 0 || refunds.Load() == 0 {
		t.Fatalf("the workload did not run: credits %d debits %d refunds %d", credits.Load(), debits, refunds.Load())
	}
}
