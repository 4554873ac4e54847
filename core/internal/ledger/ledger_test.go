package ledger_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/ledger"
	"github.com/gpuaas/gpuaas/core/internal/store"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
)

func newOrg(t *testing.T, pool *pgxpool.Pool, currency string) uuid.UUID {
	t.Helper()
	org := uuid.Must(uuid.NewV7())
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `INSERT INTO orgs (id, slug, name) VALUES ($1, $2, 'Org')`, org, "o-"+org.String()[:8]+org.String()[28:]); err != nil {
		t.Fatal(err)
	}
	err := store.Transact(ctx, pool, store.TxOptions{}, func(tx pgx.Tx) error {
		_, err := ledger.EnsureAccount(ctx, tx, org, currency)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return org
}

func post(t *testing.T, pool *pgxpool.Pool, e ledger.Entry) (ledger.Entry, bool, error) {
	t.Helper()
	var got ledger.Entry
	var posted bool
	err := store.Transact(context.Background(), pool, store.TxOptions{}, func(tx pgx.Tx) error {
		var err error
		got, posted, err = ledger.Post(context.Background(), tx, e)
		return err
	})
	return got, posted, err
}

// The application's role cannot change or remove entries: the database refuses.
func TestLedgerIsAppendOnly(t *testing.T) {
	pool, _ := testenv.MigratedPool(t)
	org := newOrg(t, pool, "USD")
	if _, _, err := post(t, pool, ledger.Entry{OrgID: org, AmountMinor: 500, Type: ledger.CreditPurchase, IdempotencyKey: "k1"}); err != nil {
		t.Fatal(err)
	}
	for _, stmt := range []string{
		`UPDATE ledger_entries SET amount_minor = 1000000`,
		`DELETE FROM ledger_entries`,
		`TRUNCATE ledger_entries CASCADE`,
		`UPDATE ledger_checkpoints SET balance_minor = 1`,
	} {
		if _, err := pool.Exec(context.Background(), stmt); err == nil {
			t.Errorf("%s succeeded", stmt)
		}
	}
	b, err := ledger.GetBalance(context.Background(), pool, org)
	if err != nil || b.AmountMinor != 500 {
		t.Fatalf("balance %+v, %v", b, err)
	}
}

func TestPostIsIdempotent(t *testing.T) {
	pool, _ := testenv.MigratedPool(t)
	org := newOrg(t, pool, "EUR")
	e := ledger.Entry{OrgID: org, AmountMinor: 1234, Type: ledger.CreditPurchase, IdempotencyKey: "stripe:evt_1"}
	first, posted, err := post(t, pool, e)
	if err != nil || !posted {
		t.Fatalf("first post: %v posted=%v", err, posted)
	}
	again, posted, err := post(t, pool, e)
	if err != nil || posted || again.ID != first.ID {
		t.Fatalf("replay: id %d vs %d, posted=%v, err %v", again.ID, first.ID, posted, err)
	}
	cases := []struct {
		name string
		e    ledger.Entry
		code errcode.Code
	}{
		{"same key, other amount", ledger.Entry{OrgID: org, AmountMinor: 99, Type: ledger.CreditPurchase, IdempotencyKey: "stripe:evt_1"}, ledger.CodeKeyConflict},
		{"other currency", ledger.Entry{OrgID: org, AmountMinor: 99, Currency: "USD", Type: ledger.CreditPurchase, IdempotencyKey: "k2"}, ledger.CodeCurrencyMismatch},
		{"zero", ledger.Entry{OrgID: org, AmountMinor: 0, Type: ledger.AdminAdjustment, IdempotencyKey: "k3"}, errcode.ValidationFailed},
		{"no account", ledger.Entry{OrgID: uuid.New(), AmountMinor: 5, Type: ledger.AdminAdjustment, IdempotencyKey: "k4"}, ledger.CodeAccountNotFound},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if _, _, err := post(t, pool, tc.e); errcode.Of(err) != tc.code {
				t.Fatalf("err %v, want %s", err, tc.code)
			}
		})
	}
	// A debit typed as a purchase is refused by the database itself.
	if _, _, err := post(t, pool, ledger.Entry{OrgID: org, AmountMinor: -5, Type: ledger.CreditPurchase, IdempotencyKey: "k5"}); err == nil {
		t.Fatal("a negative purchase was accepted")
	}
	b, _ := ledger.GetBalance(context.Background(), pool, org)
	if b.AmountMinor != 1234 || b.Currency != "EUR" {
		t.Fatalf("balance %+v; want 1234 EUR", b)
	}
}

// Checkpoints keep the balance exact while summarising old entries.
func TestCheckpointsKeepBalanceExact(t *testing.T) {
	pool, _ := testenv.MigratedPool(t)
	org := newOrg(t, pool, "USD")
	ctx := context.Background()
	var want int64
	const n = 1700
	err := store.Transact(ctx, pool, store.TxOptions{}, func(tx pgx.Tx) error {
		for i := range n {
			amt := int64(i%7 - 3)
			if amt == 0 {
				amt = 11
			}
			typ := ledger.AdminAdjustment
			if _, _, err := ledger.Post(ctx, tx, ledger.Entry{OrgID: org, AmountMinor: amt, Type: typ, IdempotencyKey: fmt.Sprintf("adj:%d", i)}); err != nil {
				return err
			}
			want += amt
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var checkpoints, sum int64
	_ = pool.QueryRow(ctx, `SELECT count(*) FROM ledger_checkpoints WHERE org_id = $1`, org).Scan(&checkpoints)
	_ = pool.QueryRow(ctx, `SELECT sum(amount_minor) FROM ledger_entries WHERE org_id = $1`, org).Scan(&sum)
	if checkpoints != n/ledger.CheckpointEvery {
		t.Fatalf("%d checkpoints for %d entries, want %d", checkpoints, n, n/ledger.CheckpointEvery)
	}
	b, err := ledger.GetBalance(ctx, pool, org)
	if err != nil || b.AmountMinor != want || sum != want {
		t.Fatalf("balance %d, sum %d, want %d (%v)", b.AmountMinor, sum, want, err)
	}
	entries, err := ledger.List(ctx, pool, org, 0, 10)
	if err != nil || len(entries) != 11 || entries[0].ID < entries[1].ID {
		t.Fatalf("list: %d entries, err %v", len(entries), err)
	}
}

// One org's balance is read on every allocation create: its statement must be
// planned once per connection (Postgres's generic plan), not on every run;
// planning it cost five times the read. An org without an account has none.
func TestBalanceReadKeepsItsPlan(t *testing.T) {
	pool, _ := testenv.MigratedPool(t)
	ctx := context.Background()
	org := newOrg(t, pool, "EUR")
	if _, _, err := post(t, pool, ledger.Entry{OrgID: org, AmountMinor: 700, Type: ledger.AdminAdjustment, IdempotencyKey: "plan:1"}); err != nil {
		t.Fatal(err)
	}
	conn, err := pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()
	for range 10 {
		b, err := ledger.GetBalance(ctx, conn, org)
		if err != nil || b.AmountMinor != 700 || b.Currency != "EUR" {
			t.Fatalf("balance %+v, %v", b, err)
		}
		batch := &pgx.Batch{}
		var got ledger.Balance
		ledger.QueueBalance(batch, org, func(b ledger.Balance, found bool) { got = b })
		if err := conn.SendBatch(ctx, batch).Close(); err != nil || got.AmountMinor != 700 {
			t.Fatalf("queued balance %+v, %v", got, err)
		}
	}
	var generic, custom int64
	err = conn.QueryRow(ctx, `SELECT coalesce(sum(generic_plans), 0), coalesce(sum(custom_plans), 0) FROM pg_prepared_statements
		WHERE statement LIKE '%FROM billing_accounts a%'`).Scan(&generic, &custom)
	if err != nil {
		t.Fatal(err)
	}
	if generic < 10 || custom > 5 {
		t.Fatalf("balance reads planned %d times (%d runs on the generic plan), want at most 5 custom plans", custom, generic)
	}
	if _, err := ledger.GetBalance(ctx, conn, uuid.New()); errcode.Of(err) != ledger.CodeAccountNotFound {
		t.Fatalf("org without account: %v", err)
	}
}
