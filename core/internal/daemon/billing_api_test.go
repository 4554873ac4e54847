package daemon_test

import (
	"context"
	"encoding/csv"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/gpuaas/gpuaas/core/internal/billing"
	"github.com/gpuaas/gpuaas/core/internal/ledger"
	"github.com/gpuaas/gpuaas/core/internal/store"
)

// Usage, its CSV export and the ledger read through the API, paged.
func TestBillingReadAPI(t *testing.T) {
	e := newEnv(t)
	w := e.newWorld()
	ctx := context.Background()
	start := time.Now().Add(-2 * time.Hour).Truncate(time.Second)
	err := store.Transact(ctx, e.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		if _, err := ledger.EnsureAccount(ctx, tx, w.orgA, "USD"); err != nil {
			return err
		}
		for i := range 3 {
			if _, err := billing.OpenUsage(ctx, tx, billing.Usage{OrgID: w.orgA, ProjectID: w.p1, AllocationID: uuid.New(), SKU: "h100x8",
				GPUs: 8, PricePerGPUHourMinor: 300, Currency: "USD", StartedAt: start.Add(time.Duration(i) * time.Minute)}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	admin := w.tokens[orgAdmin]
	org := w.orgA.String()
	if r := e.send("POST", "/api/v1/admin/billing/adjustments", w.tokens[platAdmin], map[string]any{"org_id": org, "amount_minor": 10000, "type": "promotional_credit", "reason": "trial credit"}); r.status != 201 {
		t.Fatalf("adjust: %d %s", r.status, r.body)
	}
	u := e.call("GET", "/api/v1/billing/usage?org_id="+org+"&limit=2", admin, nil)
	var page struct {
		Items []struct {
			GPUs int `json:"gpus"`
		} `json:"items"`
		NextCursor string `json:"next_cursor"`
	}
	u.json(t, &page)
	if u.status != 200 || len(page.Items) != 2 || page.NextCursor == "" || page.Items[0].GPUs != 8 {
		t.Fatalf("usage page: %d %s", u.status, u.body)
	}
	rest := e.call("GET", "/api/v1/billing/usage?org_id="+org+"&limit=2&cursor="+page.NextCursor, admin, nil)
	if rest.status != 200 || strings.Count(string(rest.body), `"allocation_id"`) != 1 {
		t.Fatalf("second page: %d %s", rest.status, rest.body)
	}
	exp := e.call("GET", "/api/v1/billing/usage.csv?org_id="+org, admin, nil)
	recs, err := csv.NewReader(strings.NewReader(string(exp.body))).ReadAll()
	if exp.status != 200 || err != nil || len(recs) != 4 || recs[0][0] != "id" || recs[1][3] != "h100x8" {
		t.Fatalf("csv: %d, %d rows, %v", exp.status, len(recs), err)
	}
	l := e.call("GET", "/api/v1/billing/ledger?org_id="+org, admin, nil)
	if l.status != 200 || !strings.Contains(string(l.body), `"entry_type":"promotional_credit"`) || !strings.Contains(string(l.body), `"amount_minor":10000`) {
		t.Fatalf("ledger: %d %s", l.status, l.body)
	}
	b := e.call("GET", "/api/v1/billing/balance?org_id="+org, admin, nil)
	if b.status != 200 || !strings.Contains(string(b.body), `"balance_minor":10000`) {
		t.Fatalf("balance: %d %s", b.status, b.body)
	}
}
