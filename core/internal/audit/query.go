package audit

import (
	"context"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Row is one audit log row as read back.
type Row struct {
	ID            uuid.UUID      `json:"id"`
	OccurredAt    time.Time      `json:"occurred_at"`
	ActorType     string         `json:"actor_type"`
	ActorID       string         `json:"actor_id"`
	Action        string         `json:"action"`
	Target        string         `json:"target"`
	OrgID         string         `json:"org_id"`
	ProjectID     string         `json:"project_id"`
	Result        string         `json:"result"`
	CorrelationID string         `json:"correlation_id"`
	SourceIP      string         `json:"source_ip"`
	Details       map[string]any `json:"details"`
}

// Filter selects rows. Zero fields match everything. Target matches the canonical id
// exactly, or as a prefix when it ends with ':'. Rows come newest first; After is
// the keyset cursor (the last row of the previous page).
type Filter struct {
	ActorType string
	ActorID   string
	Action    string
	Target    string
	OrgID     string
	From, To  time.Time
	After     *Cursor
	Limit     int
}

// Cursor is the position after a row in newest-first order.
type Cursor struct {
	At time.Time `json:"at"`
	ID uuid.UUID `json:"id"`
}

func (f Filter) where() (string, []any) {
	var conds []string
	var args []any
	add := func(cond string, v any) {
		args = append(args, v)
		conds = append(conds, fmt.Sprintf(cond, len(args)))
	}
	if f.ActorType != "" {
		add("actor_type = $%d", f.ActorType)
	}
	if f.ActorID != "" {
		add("actor_id = $%d", f.ActorID)
	}
	if f.Action != "" {
		add("action = $%d", f.Action)
	}
	if f.Target != "" {
		if strings.HasSuffix(f.Target, ":") {
			add("starts_with(target, $%d)", f.Target)
		} else {
			add("target = $%d", f.Target)
		}
	}
	if f.OrgID != "" {
		add("org_id = $%d", f.OrgID)
	}
	if !f.From.IsZero() {
		add("occurred_at >= $%d", f.From)
	}
	if !f.To.IsZero() {
		add("occurred_at < $%d", f.To)
	}
	if f.After != nil {
		args = append(args, f.After.At, f.After.ID)
		conds = append(conds, fmt.Sprintf("(occurred_at, id) < ($%d, $%d)", len(args)-1, len(args)))
	}
	if len(conds) == 0 {
		return "", args
	}
	return "WHERE " + strings.Join(conds, " AND "), args
}

const columns = `id, occurred_at, actor_type, actor_id, action, target, org_id, project_id, result, correlation_id, coalesce(host(source_ip), ''), details`

func scan(row pgx.CollectableRow) (Row, error) {
	var r Row
	var details []byte
	err := row.Scan(&r.ID, &r.OccurredAt, &r.ActorType, &r.ActorID, &r.Action, &r.Target, &r.OrgID, &r.ProjectID, &r.Result, &r.CorrelationID, &r.SourceIP, &details)
	if err != nil {
		return r, err
	}
	err = json.Unmarshal(details, &r.Details)
	return r, err
}

// List returns one page of rows and the cursor of the next page (nil at the end).
func List(ctx context.Context, pool *pgxpool.Pool, f Filter) ([]Row, *Cursor, error) {
	where, args := f.where()
	args = append(args, f.Limit+1)
	rows, err := pool.Query(ctx, fmt.Sprintf(`SELECT %s FROM audit_log %s ORDER BY occurred_at DESC, id DESC LIMIT $%d`, columns, where, len(args)), args...)
	if err != nil {
		return nil, nil, fmt.Errorf("audit: list: %w", err)
	}
	out, err := pgx.CollectRows(rows, scan)
	if err != nil {
		return nil, nil, fmt.Errorf("audit: list: %w", err)
	}
	var next *Cursor
	if len(out) > f.Limit {
		out = out[:f.Limit]
		last := out[len(out)-1]
		next = &Cursor{At: last.OccurredAt, ID: last.ID}
	}
	return out, next, nil
}

// ExportCSV streams every matching row (ignoring Limit and After) as CSV to w, row by
// row, without holding the result in memory.
func ExportCSV(ctx context.Context, pool *pgxpool.Pool, f Filter, w io.Writer) error {
	f.After = nil
	where, args := f.where()
	rows, err := pool.Query(ctx, fmt.Sprintf(`SELECT %s FROM audit_log %s ORDER BY occurred_at DESC, id DESC`, columns, where), args...)
	if err != nil {
		return fmt.Errorf("audit: export: %w", err)
	}
	defer rows.Close()
	cw := csv.NewWriter(w)
	_ = cw.Write([]string{"id", "occurred_at", "actor_type", "actor_id", "action", "target", "org_id", "project_id", "result", "correlation_id", "source_ip", "details"})
	n := 0
	for rows.Next() {
		r, err := scan(rows)
		if err != nil {
			return fmt.Errorf("audit: export: %w", err)
		}
		d, _ := json.Marshal(r.Details)
		rec := []string{r.ID.String(), r.OccurredAt.UTC().Format(time.RFC3339Nano), r.ActorType, r.ActorID, r.Action,
			r.Target, r.OrgID, r.ProjectID, r.Result, r.CorrelationID, r.SourceIP, string(d)}
		for i := range rec {
			rec[i] = csvSafe(rec[i])
		}
		if err := cw.Write(rec); err != nil {
			return err
		}
		if n++; n%500 == 0 {
			cw.Flush()
			if err := cw.Error(); err != nil {
				return err
			}
		}
	}
	cw.Flush()
	if err := rows.Err(); err != nil {
		return fmt.Errorf("audit: export: %w", err)
	}
	return cw.Error()
}

// csvSafe defuses spreadsheet formulas: a cell starting with = + - @ or a control
// character is prefixed with a quote so a spreadsheet shows it as text.
func csvSafe(s string) string {
	if s != "" && strings.ContainsRune("=+-@\t\r", rune(s[0])) {
		return "'" + s
	}
	return s
}
