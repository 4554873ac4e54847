package inventory_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/inventory"
	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
)

// plainDriver is a provisioner driver without optional capabilities; only
// the methods Retire may reach are meant to be called.
type plainDriver struct{ provisioner.Driver }

var _ provisioner.Driver = plainDriver{}

// unenroller records its Unenroll calls and answers them with err.
type unenroller struct {
	plainDriver

	mu    sync.Mutex
	calls []provisioner.UnenrollRequest
	err   error
}

var (
	_ provisioner.Driver     = (*unenroller)(nil)
	_ provisioner.Unenroller = (*unenroller)(nil)
)

func (u *unenroller) Unenroll(_ context.Context, req *provisioner.UnenrollRequest) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.calls = append(u.calls, *req)
	return u.err
}

func (u *unenroller) called() []provisioner.UnenrollRequest {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]provisioner.UnenrollRequest(nil), u.calls...)
}

// drivers resolves instances to drivers; an unknown instance fails.
type drivers map[string]provisioner.Driver

func (d drivers) Provisioner(_ context.Context, name string) (provisioner.Driver, error) {
	if drv, ok := d[name]; ok {
		return drv, nil
	}
	return nil, errcode.New("plugin_instance_not_found", "no plugin instance %q", name)
}

type retireEnv struct {
	t    *testing.T
	ctx  context.Context
	pool *pgxpool.Pool
	svc  *inventory.Service
}

// node adds a node of instance in state with the driver's enrollment secret,
// an unused enrollment token, a used one and an expired one, and a live and
// an expired agent certificate.
func (e *retireEnv) node(instance, state string) uuid.UUID {
	e.t.Helper()
	id := uuid.Must(uuid.NewV7())
	e.exec(`INSERT INTO skus (id, gpu_model, gpus_per_node, cpu_cores, memory_gib, disk_gib, price_per_gpu_hour_minor, currency)
		VALUES ('retire-test', 'G', 1, 1, 1, 1, 1, 'USD') ON CONFLICT DO NOTHING`)
	e.exec(`INSERT INTO nodes (id, provisioner_instance, external_id, state, sku_id, enrollment_secret_sha256)
		VALUES ($1, $2, $3, $4, 'retire-test', sha256(convert_to('secret', 'UTF8')))`, id, instance, "host-"+id.String(), state)
	for i, q := range []string{
		`INSERT INTO node_enrollment_tokens (token_sha256, node_id, created_by, expires_at) VALUES ($1, $2, 'test', now() + interval '1 hour')`,
		`INSERT INTO node_enrollment_tokens (token_sha256, node_id, created_by, expires_at, used_at) VALUES ($1, $2, 'test', now() + interval '1 hour', now())`,
		`INSERT INTO node_enrollment_tokens (token_sha256, node_id, created_by, expires_at) VALUES ($1, $2, 'test', now() - interval '1 hour')`,
	} {
		e.exec(q, []byte(fmt.Sprintf("%s-%d", id, i)), id)
	}
	e.exec(`INSERT INTO node_certificates (serial, node_id, not_after) VALUES ($1, $2, now() + interval '1 hour'), ($3, $2, now() - interval '1 hour')`,
		id.String()+"-live", id, id.String()+"-expired")
	// Tasks in each state: a queued and a leased one wait for the agent.
	for _, state := range []string{"queued", "leased", "succeeded", "expired"} {
		e.exec(`INSERT INTO node_tasks (id, node_id, type, params, state, nonce, key_version, signature, expires_at, max_attempts, error)
			VALUES ($1, $2, 'probe', '{}', $3, 'n', 1, '\x00', now() + interval '1 hour', 3, '')`, uuid.New(), id, state)
	}
	return id
}

// tasks counts the node's tasks by state (and, for failed ones, error).
func (e *retireEnv) tasks(id uuid.UUID) map[string]int {
	e.t.Helper()
	rows, err := e.pool.Query(e.ctx, `SELECT state || coalesce(nullif(': ' || error, ': '), ''), count(*) FROM node_tasks WHERE node_id = $1 GROUP BY 1`, id)
	if err != nil {
		e.t.Fatal(err)
	}
	defer rows.Close()
	out := map[string]int{}
	for rows.Next() {
		var k string
		var n int
		if err := rows.Scan(&k, &n); err != nil {
			e.t.Fatal(err)
		}
		out[k] = n
	}
	if err := rows.Err(); err != nil {
		e.t.Fatal(err)
	}
	return out
}

func (e *retireEnv) exec(sql string, args ...any) {
	e.t.Helper()
	if _, err := e.pool.Exec(e.ctx, sql, args...); err != nil {
		e.t.Fatalf("%s: %v", sql, err)
	}
}

// credentials reports whether the node still has the driver's secret, how
// many of its tokens would still enroll, and whether certificates issued
// before now are refused.
func (e *retireEnv) credentials(id uuid.UUID) (secret bool, liveTokens int, certsRefused bool) {
	e.t.Helper()
	err := e.pool.QueryRow(e.ctx, `SELECT enrollment_secret_sha256 IS NOT NULL, agent_revoked_at IS NOT NULL,
		(SELECT count(*) FROM node_enrollment_tokens WHERE node_id = $1 AND used_at IS NULL AND expires_at > now())
		FROM nodes WHERE id = $1`, id).Scan(&secret, &certsRefused, &liveTokens)
	if err != nil {
		e.t.Fatal(err)
	}
	return secret, liveTokens, certsRefused
}

// retireAudit is the details of the node's node.retire audit rows.
func (e *retireEnv) retireAudit(id uuid.UUID) []map[string]any {
	e.t.Helper()
	rows, err := e.pool.Query(e.ctx, `SELECT details FROM audit_log WHERE action = 'node.retire' AND target = $1 ORDER BY id`, e.svc.Target(id).String())
	if err != nil {
		e.t.Fatal(err)
	}
	defer rows.Close()
	var out []map[string]any
	for rows.Next() {
		var b []byte
		if err := rows.Scan(&b); err != nil {
			e.t.Fatal(err)
		}
		var m map[string]any
		if err := json.Unmarshal(b, &m); err != nil {
			e.t.Fatal(err)
		}
		out = append(out, m)
	}
	if err := rows.Err(); err != nil {
		e.t.Fatal(err)
	}
	return out
}

// TestRetireUndoesEnrollment: retiring asks the driver to unenroll the node
// (once it is known to be idle), ends its agent's credentials in the same
// transaction, and audits what happened; a failing or missing driver does
// not stop it.
func TestRetireUndoesEnrollment(t *testing.T) {
	pool, _ := testenv.MigratedPool(t)
	good := &unenroller{}
	failing := &unenroller{err: fmt.Errorf("nomad: no cluster leader: %w", base.ErrUnavailable)}
	unimplemented := &unenroller{err: fmt.Errorf("no capability: %w", base.ErrUnimplemented)}
	svc := inventory.NewService(pool, "local", drivers{"good": good, "failing": failing, "plain": plainDriver{}, "unimpl": unimplemented},
		testenv.Logger(t))
	e := &retireEnv{t: t, ctx: principal.With(t.Context(), principal.SystemPrincipal("test")), pool: pool, svc: svc}

	for _, c := range []struct {
		instance string
		driver   *unenroller
		want     string // the audit's driver_unenroll, or its prefix
	}{
		{"good", good, "done"},
		{"failing", failing, "failed: provisioner_failed: the provisioner failed unenroll: nomad: no cluster leader"},
		{"plain", nil, "unsupported"},
		{"unimpl", unimplemented, "unsupported"},
		{"gone", nil, "failed: plugin_instance_not_found: no plugin instance"},
	} {
		t.Run(c.instance, func(t *testing.T) {
			e.t = t
			id := e.node(c.instance, "available")
			var before int
			if c.driver != nil {
				before = len(c.driver.called())
			}
			n, err := svc.Retire(e.ctx, id, "")
			if err != nil {
				t.Fatalf("Retire: %v", err)
			}
			if n.State != inventory.Retired || n.StateReason != "retired by an admin" {
				t.Fatalf("node after Retire: %s (%s)", n.State, n.StateReason)
			}
			if c.driver != nil {
				calls := c.driver.called()[before:]
				if len(calls) != 1 || calls[0].OperationID != "retire-"+id.String() || calls[0].NodeID != n.ExternalID {
					t.Fatalf("Unenroll calls %+v; want one with operation retire-%s for %s", calls, id, n.ExternalID)
				}
			}
			secret, live, refused := e.credentials(id)
			if secret || live != 0 || !refused {
				t.Fatalf("after Retire: driver secret kept %t, %d tokens still enroll, certificates refused %t", secret, live, refused)
			}
			rows := e.retireAudit(id)
			if len(rows) != 1 {
				t.Fatalf("%d node.retire audit rows; want 1", len(rows))
			}
			got, _ := rows[0]["driver_unenroll"].(string)
			if !strings.HasPrefix(got, c.want) {
				t.Fatalf("audit driver_unenroll %q; want %q...", got, c.want)
			}
			if rows[0]["enrollment_tokens_expired"] != float64(1) || rows[0]["enrollment_secret_cleared"] != true || rows[0]["agent_certificates_revoked"] != float64(1) ||
				rows[0]["tasks_failed"] != float64(2) {
				t.Fatalf("audit details %v; want one token expired, the secret cleared, one certificate revoked and two tasks failed", rows[0])
			}
			want := map[string]int{"failed: the node was retired before the task was done": 2, "succeeded": 1, "expired": 1}
			if got := e.tasks(id); fmt.Sprint(got) != fmt.Sprint(want) {
				t.Fatalf("tasks after Retire: %v; want %v", got, want)
			}
		})
	}
	e.t = t

	t.Run("busy or retired: nothing changes", func(t *testing.T) {
		e.t = t
		busy := e.node("good", "allocated")
		before := len(good.called())
		_, err := svc.Retire(e.ctx, busy, "")
		if errcode.Of(err) != inventory.CodeNodeBusy {
			t.Fatalf("Retire of an allocated node: %v; want node_busy", err)
		}
		if secret, live, refused := e.credentials(busy); !secret || live != 1 || refused {
			t.Fatalf("a refused Retire touched credentials: secret %t, %d live tokens, refused %t", secret, live, refused)
		}
		if len(good.called()) != before {
			t.Fatal("a refused Retire called the driver")
		}
		if got := e.tasks(busy); got["queued"] != 1 || got["leased"] != 1 {
			t.Fatalf("a refused Retire touched tasks: %v", got)
		}
		done := e.node("good", "available")
		if _, err := svc.Retire(e.ctx, done, "decommissioned"); err != nil {
			t.Fatal(err)
		}
		_, err = svc.Retire(e.ctx, done, "")
		if errcode.Of(err) != inventory.CodeInvalidTransition {
			t.Fatalf("Retire of a retired node: %v; want invalid_node_transition", err)
		}
		if n := len(e.retireAudit(done)); n != 1 {
			t.Fatalf("%d node.retire audit rows after a refused second Retire; want 1", n)
		}
	})
}
