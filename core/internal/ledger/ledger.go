// Package ledger is the append-only money record of every org: integer minor units,
// one idempotency key per entry, balances derived from entries (and checkpoints
// that summarise old ones), never stored in a mutable column.
//
// Every write to an org's ledger first locks the org's billing_accounts row, so the
// entries of one org get ids in commit order: a checkpoint taken under that lock
// covers exactly the entries below its id, and a balance read is the latest
// checkpoint plus the few entries after it, whatever the ledger's length.
package ledger

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/gpuaas/gpuaas/core/internal/correlation"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/principal"
)

// Entry types.
const (
	CreditPurchase    = "credit_purchase"
	UsageDebit        = "usage_debit"
	AdminAdjustment   = "admin_adjustment"
	Refund            = "refund"
	PromotionalCredit = "promotional_credit"
	Reversal          = "reversal"
)

// Error codes.
const (
	CodeAccountNotFound  errcode.Code = "billing_account_not_found"
	CodeCurrencyMismatch errcode.Code = "currency_mismatch"
	CodeKeyConflict      errcode.Code = "ledger_key_conflict"
)

// Codes lists this package's codes for the contract test.
func Codes() []errcode.Code {
	return []errcode.Code{CodeAccountNotFound, CodeCurrencyMismatch, CodeKeyConflict}
}

// CheckpointEvery is how many entries may follow the latest checkpoint before a
// new one is written.
const CheckpointEvery = 500

// DB is what reads need: a pool, a connection or a transaction.
type DB interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// Entry is one ledger line. AmountMinor is positive for money in, negative for
// money out.
type Entry struct {
	ID             int64     `json:"id"`
	OrgID          uuid.UUID `json:"org_id"`
	Currency       string    `json:"currency"`
	AmountMinor    int64     `json:"amount_minor"`
	Type           string    `json:"entry_type"`
	IdempotencyKey string    `json:"-"`
	Reference      string    `json:"reference"`
	Description    string    `json:"description"`
	Reverses       *int64    `json:"reverses,omitempty"`
	CreatedAt      time.Time `json:"created_at"`
	CreatedBy      string    `json:"created_by"`
	CorrelationID  string    `json:"correlation_id"`
}

var currencyRE = regexp.MustCompile(`^[A-Z]{3}$`)

// EnsureAccount creates the org's billing account in currency when it has none and
// returns the account's currency.
func EnsureAccount(ctx context.Context, tx pgx.Tx, orgID uuid.UUID, currency string) (string, error) {
	if !currencyRE.MatchString(currency) {
		return "", errcode.New(errcode.ValidationFailed, "currency must be an upper-case ISO 4217 code").WithDetails("field", "currency")
	}
	var cur string
	err := tx.QueryRow(ctx, `INSERT INTO billing_accounts (org_id, currency) VALUES ($1, $2)
		ON CONFLICT (org_id) DO UPDATE SET org_id = excluded.org_id RETURNING currency`, orgID, currency).Scan(&cur)
	if err != nil {
		return "", fmt.Errorf("ledger: ensure account: %w", err)
	}
	return cur, nil
}

// Lock takes the org's ledger lock for the rest of tx and returns the account's
// currency.
func Lock(ctx context.Context, tx pgx.Tx, orgID uuid.UUID) (string, error) {
	var cur string
	err := tx.QueryRow(ctx, `SELECT currency FROM billing_accounts WHERE org_id = $1 FOR UPDATE`, orgID).Scan(&cur)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", errcode.New(CodeAccountNotFound, "the organization has no billing account yet")
	}
	if err != nil {
		return "", fmt.Errorf("ledger: lock: %w", err)
	}
	return cur, nil
}

// Post appends e inside tx under the org's lock. When an entry with the same
// idempotency key exists it returns that entry and posted=false; if that entry
// differs (org, amount, type or currency) it is a ledger_key_conflict.
func Post(ctx context.Context, tx pgx.Tx, e Entry) (Entry, bool, error) {
	if e.AmountMinor == 0 {
		return e, false, errcode.New(errcode.ValidationFailed, "amount must not be zero").WithDetails("field", "amount_minor")
	}
	if e.IdempotencyKey == "" {
		return e, false, errors.New("ledger: post: empty idempotency key")
	}
	cur, err := Lock(ctx, tx, e.OrgID)
	if err != nil {
		return e, false, err
	}
	if e.Currency == "" {
		e.Currency = cur
	}
	if e.Currency != cur {
		return e, false, errcode.New(CodeCurrencyMismatch, "the account is in %s, not %s", cur, e.Currency).WithDetails("field", "currency")
	}
	if e.CreatedBy == "" {
		e.CreatedBy = "system"
		if p := principal.From(ctx); p != nil {
			e.CreatedBy = p.Actor()
		}
	}
	e.CorrelationID = correlation.From(ctx)
	err = tx.QueryRow(ctx, `INSERT INTO ledger_entries
		(org_id, currency, amount_minor, entry_type, idempotency_key, reference, description, reverses, created_by, correlation_id)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
		ON CONFLICT (idempotency_key) DO NOTHING
		RETURNING id, created_at`,
		e.OrgID, e.Currency, e.AmountMinor, e.Type, e.IdempotencyKey, e.Reference, e.Description, e.Reverses, e.CreatedBy, e.CorrelationID).
		Scan(&e.ID, &e.CreatedAt)
	if err == nil {
		if err := CheckpointDue(ctx, tx, []uuid.UUID{e.OrgID}); err != nil {
			return e, false, err
		}
		return e, true, nil
	}
	if !errors.Is(err, pgx.ErrNoRows) {
		return e, false, fmt.Errorf("ledger: post: %w", err)
	}
	prev, err := scanEntry(tx.QueryRow(ctx, `SELECT `+entryColumns+` FROM ledger_entries WHERE idempotency_key = $1`, e.IdempotencyKey))
	if err != nil {
		return e, false, fmt.Errorf("ledger: post: read existing: %w", err)
	}
	if prev.OrgID != e.OrgID || prev.AmountMinor != e.AmountMinor || prev.Type != e.Type || prev.Currency != e.Currency {
		return prev, false, errcode.New(CodeKeyConflict, "an entry with this idempotency key exists with other values")
	}
	return prev, false, nil
}

const entryColumns = `id, org_id, currency, amount_minor, entry_type, idempotency_key, reference, description, reverses, created_at, created_by, correlation_id`

func scanEntry(row pgx.Row) (Entry, error) {
	var e Entry
	err := row.Scan(&e.ID, &e.OrgID, &e.Currency, &e.AmountMinor, &e.Type, &e.IdempotencyKey, &e.Reference, &e.Description, &e.Reverses, &e.CreatedAt, &e.CreatedBy, &e.CorrelationID)
	return e, err
}

// Balance is an org's balance.
type Balance struct {
	OrgID       uuid.UUID
	Currency    string
	AmountMinor int64
	// AsOfEntry is the highest entry id the balance includes.
	AsOfEntry int64
}

// balancesFrom reads, for each org, its latest checkpoint and the sum of the entries
// after it, in one statement (one snapshot). The tail's bounds are row comparisons
// on (org_id, id), which only the (org_id, id) index can serve, and which give the
// scan both its start (just after the checkpoint) and its end (the org's last
// entry): every plan, generic or custom, reads the tail and nothing else — not the
// org's older entries, and not other orgs' through the primary key.
const balancesFrom = `
	SELECT a.org_id, a.currency,
		coalesce(cp.balance_minor, 0) + coalesce(t.s, 0),
		coalesce(t.upto, cp.upto_id, 0)
	FROM billing_accounts a
	LEFT JOIN LATERAL (
		SELECT upto_id, balance_minor FROM ledger_checkpoints c WHERE c.org_id = a.org_id ORDER BY upto_id DESC LIMIT 1
	) cp ON true
	LEFT JOIN LATERAL (
		SELECT sum(amount_minor) AS s, max(id) AS upto FROM (
			SELECT id, amount_minor FROM ledger_entries e
			WHERE (e.org_id, e.id) > (a.org_id, coalesce(cp.upto_id, 0))
				AND (e.org_id, e.id) <= (a.org_id, 9223372036854775807)
			ORDER BY e.org_id, e.id
			LIMIT 1000000000
		) tail
	) t ON true
	`

// balancesSQL reads many orgs' balances. balanceSQL reads one org's: it is a
// statement of its own because Postgres keeps planning a statement over an
// array anew on every run (its generic plan, costed for an array of unknown
// length, never looks cheaper than a custom one), and planning cost five times
// the read itself; over one key the generic plan is chosen and kept.
const (
	balancesSQL = balancesFrom + `WHERE a.org_id = ANY($1)`
	balanceSQL  = balancesFrom + `WHERE a.org_id = $1`
)

// Balances returns the balance of each org that has an account, by org id.
func Balances(ctx context.Context, db DB, orgs []uuid.UUID) (map[uuid.UUID]Balance, error) {
	rows, err := db.Query(ctx, balancesSQL, orgs)
	if err != nil {
		return nil, fmt.Errorf("ledger: balances: %w", err)
	}
	bs, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Balance, error) {
		var b Balance
		return b, scanBalance(r, &b)
	})
	if err != nil {
		return nil, fmt.Errorf("ledger: balances: %w", err)
	}
	out := make(map[uuid.UUID]Balance, len(bs))
	for _, b := range bs {
		out[b.OrgID] = b
	}
	return out, nil
}

// QueueBalance adds the org's balance read to a batch; fn gets it, and whether
// the org has an account, when the batch's results are read.
func QueueBalance(b *pgx.Batch, orgID uuid.UUID, fn func(Balance, bool)) {
	b.Queue(balanceSQL, orgID).QueryRow(func(row pgx.Row) error {
		bal := Balance{OrgID: orgID}
		switch err := scanBalance(row, &bal); {
		case errors.Is(err, pgx.ErrNoRows):
			fn(bal, false)
		case err != nil:
			return fmt.Errorf("ledger: balance: %w", err)
		default:
			fn(bal, true)
		}
		return nil
	})
}

// scanBalance reads a row of balancesFrom into b.
func scanBalance(row pgx.Row, b *Balance) error {
	return row.Scan(&b.OrgID, &b.Currency, &b.AmountMinor, &b.AsOfEntry)
}

// GetBalance returns the org's balance; an org without an account has none.
func GetBalance(ctx context.Context, db DB, orgID uuid.UUID) (Balance, error) {
	b := Balance{OrgID: orgID}
	switch err := scanBalance(db.QueryRow(ctx, balanceSQL, orgID), &b); {
	case errors.Is(err, pgx.ErrNoRows):
		return b, errcode.New(CodeAccountNotFound, "the organization has no billing account yet")
	case err != nil:
		return b, fmt.Errorf("ledger: balance: %w", err)
	}
	return b, nil
}

// CheckpointDue writes a checkpoint for each org (whose lock tx must hold) that has
// CheckpointEvery or more entries after its latest checkpoint.
func CheckpointDue(ctx context.Context, tx pgx.Tx, orgs []uuid.UUID) error {
	_, err := tx.Exec(ctx, `
		WITH last AS (
			SELECT DISTINCT ON (org_id) org_id, upto_id, balance_minor, entries
			FROM ledger_checkpoints WHERE org_id = ANY($1) ORDER BY org_id, upto_id DESC
		), agg AS (
			SELECT e.org_id, max(e.id) AS upto, sum(e.amount_minor) AS s, count(*) AS n
			FROM ledger_entries e LEFT JOIN last l ON l.org_id = e.org_id
			WHERE e.org_id = ANY($1) AND e.id > coalesce(l.upto_id, 0)
			GROUP BY e.org_id HAVING count(*) >= $2
		)
		INSERT INTO ledger_checkpoints (org_id, upto_id, balance_minor, entries)
		SELECT a.org_id, a.upto, coalesce(l.balance_minor, 0) + a.s, coalesce(l.entries, 0) + a.n
		FROM agg a LEFT JOIN last l ON l.org_id = a.org_id`, orgs, CheckpointEvery)
	if err != nil {
		return fmt.Errorf("ledger: checkpoint: %w", err)
	}
	return nil
}

// List returns an org's entries newest first, before the entry id before (0 = from
// the newest), up to limit+1 so callers know whether a next page exists.
func List(ctx context.Context, db DB, orgID uuid.UUID, before int64, limit int) ([]Entry, error) {
	if before <= 0 {
		before = 1<<63 - 1
	}
	rows, err := db.Query(ctx, `SELECT `+entryColumns+` FROM ledger_entries WHERE org_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3`, orgID, before, limit+1)
	if err != nil {
		return nil, fmt.Errorf("ledger: list: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (Entry, error) { return scanEntry(r) })
}
