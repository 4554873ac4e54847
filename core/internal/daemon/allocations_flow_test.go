package daemon_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	gomaas "github.com/canonical/gomaasclient/client"
	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"

	"github.com/gpuaas/gpuaas/core/internal/allocations"
	"github.com/gpuaas/gpuaas/core/internal/billing"
	"github.com/gpuaas/gpuaas/core/internal/events"
	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/store"
	"github.com/gpuaas/gpuaas/plugins/maas/maassim"
)

func fastTiming() maassim.Timing { return maassim.FastTiming().Scaled(0.25) }

func (p *provEnv) systemIDOf(node uuid.UUID) string {
	p.t.Helper()
	var id string
	if err := p.pool.QueryRow(p.t.Context(), `SELECT external_id FROM nodes WHERE id = $1`, node).Scan(&id); err != nil {
		p.t.Fatal(err)
	}
	return id
}

func (p *provEnv) auditActions(target string) []string {
	p.t.Helper()
	rows, err := p.pool.Query(p.t.Context(), `SELECT action FROM audit_log WHERE target LIKE '%' || $1 ORDER BY id`, target)
	if err != nil {
		p.t.Fatal(err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		p.t.Fatal(err)
	}
	return out
}

// Create → active → release → released through the REST API against the MAAS
// simulator, with the deploy in MAAS, metering and the ledger checked.
// holdingsDrift lists the owners whose allocation_holdings differ from a
// count of their live allocations (org and project), as "owner: held n/g,
// live n/g".
func (p *provEnv) holdingsDrift(t testing.TB) []string {
	t.Helper()
	rows, err := p.pool.Query(t.Context(), `
		SELECT o.id, coalesce(h.allocations, 0), coalesce(h.gpus, 0),
			(SELECT count(*) FROM allocations a WHERE (a.org_id = o.id OR a.project_id = o.id) AND a.state NOT IN ('released', 'failed')),
			(SELECT coalesce(sum(gpus), 0) FROM allocations a WHERE (a.org_id = o.id OR a.project_id = o.id) AND a.state NOT IN ('released', 'failed'))
		FROM (SELECT id FROM orgs UNION ALL SELECT id FROM projects) o LEFT JOIN allocation_holdings h ON h.owner_id = o.id`)
	if err != nil {
		t.Fatal(err)
	}
	var drift []string
	for rows.Next() {
		var id uuid.UUID
		var hn, hg, ln, lg int64
		if err := rows.Scan(&id, &hn, &hg, &ln, &lg); err != nil {
			t.Fatal(err)
		}
		if hn != ln || hg != lg {
			drift = append(drift, fmt.Sprintf("%s: held %d/%d, live %d/%d", id, hn, hg, ln, lg))
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return drift
}

func (p *provEnv) held(t testing.TB, owner uuid.UUID) (n, gpus int64) {
	t.Helper()
	if err := p.pool.QueryRow(t.Context(), `SELECT allocations, gpus FROM allocation_holdings WHERE owner_id = $1`, owner).Scan(&n, &gpus); err != nil {
		t.Fatalf("holdings of %s: %v", owner, err)
	}
	return n, gpus
}

func TestAllocationLifecycle(t *testing.T) {
	p := newProvEnv(t, provOptions{timing: fastTiming(), h100: 2, l40s: 1})
	nodes := p.registerAll()

	// The public capacity view counts, and names no machine.
	r := p.call("GET", "/api/v1/capacity", "", nil)
	if r.status != 200 || !strings.Contains(string(r.body), `"sku_id":"h100"`) || !strings.Contains(string(r.body), `"available":2`) {
		t.Fatalf("capacity: %d %s", r.status, r.body)
	}
	for id := range p.machines {
		if strings.Contains(string(r.body), id) || strings.Contains(string(r.body), "gpu-h100") {
			t.Fatalf("capacity leaks a machine: %s", r.body)
		}
	}

	r, list := p.create(p.user, map[string]any{"sku_id": "h100", "name": "training run"})
	if r.status != 201 || len(list) != 1 || list[0].State != "requested" || list[0].GPUs != 8 {
		t.Fatalf("create: %d %s", r.status, r.body)
	}
	if n, gpus := p.held(t, p.project); n != 1 || gpus != 8 {
		t.Fatalf("the project holds %d allocations, %d GPUs; want 1, 8", n, gpus)
	}
	a := p.await(list[0].ID, "active", 30*time.Second)
	if !strings.HasPrefix(a.SSHUser, "ada-lovelace") || !strings.HasPrefix(a.SSHHost, "gpu-h100-") {
		t.Fatalf("active allocation: ssh %s@%s", a.SSHUser, a.SSHHost)
	}
	sys := p.systemIDOf(a.NodeID)
	deploys := p.sim.Deploys(sys)
	if len(deploys) != 1 {
		t.Fatalf("deploys of %s: %d; want 1", sys, len(deploys))
	}
	// The user data creates the tenant and has sshd trust the core's SSH CA
	// for that tenant only (the browser terminal).
	for _, want := range []string{"name: " + a.SSHUser, "/etc/ssh/gpuaas_user_ca.pub", "ssh-ed25519 ", "/etc/ssh/gpuaas_principals/" + a.SSHUser} {
		if !strings.Contains(deploys[0].UserData, want) {
			t.Fatalf("the deployed user data lacks %q:\n%s", want, deploys[0].UserData)
		}
	}
	if p.nodeState(a.NodeID) != "allocated" {
		t.Fatalf("node of an active allocation is %s", p.nodeState(a.NodeID))
	}
	started, ended, _, _ := p.usage(a.ID)
	if started == nil || ended != nil {
		t.Fatalf("usage of an active allocation: started %v ended %v", started, ended)
	}

	time.Sleep(1100 * time.Millisecond) // at least one whole second metered
	r = p.call("POST", "/api/v1/allocations/"+a.ID.String()+"/release", p.user, nil)
	if r.status != 202 || !strings.Contains(string(r.body), `"state":"releasing"`) {
		t.Fatalf("release: %d %s", r.status, r.body)
	}
	if r := p.call("POST", "/api/v1/allocations/"+a.ID.String()+"/release", p.user, nil); r.status != 409 || r.code() != "invalid_allocation_transition" {
		t.Fatalf("release twice: %d %s; want 409 invalid_allocation_transition", r.status, r.body)
	}
	p.await(a.ID, "released", 30*time.Second)
	p.awaitNode(a.NodeID, "available", 10*time.Second)
	if r := p.call("POST", "/api/v1/allocations/"+a.ID.String()+"/release", p.user, nil); r.status != 409 {
		t.Fatalf("release of a released allocation: %d %s; want 409", r.status, r.body)
	}
	for _, owner := range []uuid.UUID{p.org, p.project} {
		if n, gpus := p.held(t, owner); n != 0 || gpus != 0 {
			t.Fatalf("%s holds %d allocations, %d GPUs after the release; want none", owner, n, gpus)
		}
	}

	// Metering: billed per whole second from active to released, once. The
	// accrual windows end at whole seconds: wait for one past the end.
	_, ended, _, _ = p.usage(a.ID)
	if ended == nil {
		t.Fatal("usage not closed at the release")
	}
	for !time.Now().Truncate(time.Second).After(*ended) {
		time.Sleep(20 * time.Millisecond)
	}
	p.accrue()
	p.accrue()
	started, ended, billed, until := p.usage(a.ID)
	if ended == nil || !until.Equal(*ended) {
		t.Fatalf("usage not closed and billed to its end: ended %v billed until %v", ended, until)
	}
	secs := ended.Unix() - started.Unix()
	want := secs * 8 * 360000 / 3600
	if secs < 1 || billed != want {
		t.Fatalf("billed %d for %d s of 8 GPUs at 360000/GPU-hour; want %d", billed, secs, want)
	}
	if got := debits(t, p.pool, p.org); got != -billed {
		t.Fatalf("ledger usage debits %d; want %d", got, -billed)
	}
	acts := strings.Join(p.auditActions(a.ID.String()), ",")
	for _, want := range []string{"allocation.create", "allocation.active", "allocation.release", "allocation.released"} {
		if !strings.Contains(acts, want) {
			t.Errorf("audit of the allocation lacks %s: %s", want, acts)
		}
	}
	// The node served one allocation: a second one deploys it again.
	r, list = p.create(p.user, map[string]any{"sku_id": "l40s"})
	if r.status != 201 {
		t.Fatalf("create l40s: %d %s", r.status, r.body)
	}
	p.await(list[0].ID, "active", 30*time.Second)
	m := string(p.call("GET", "/metrics", "", nil).body)
	for _, want := range []string{
		`gpuaas_provisioning_seconds_count{outcome="active",sku="h100"} 1`,
		`gpuaas_releases_total{outcome="released",sku="h100"} 1`,
		`gpuaas_allocations{sku="l40s",state="active"} 1`,
		`gpuaas_nodes{sku="h100",state="available"} 2`,
	} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	if len(nodes) != 3 {
		t.Fatalf("%d nodes registered", len(nodes))
	}
	if d := p.holdingsDrift(t); len(d) > 0 {
		t.Fatalf("holdings differ from the live allocations: %v", d)
	}
}

// Bad input is refused with a stable code and nothing is written.
func TestAllocationBadInput(t *testing.T) {
	p := newProvEnv(t, provOptions{timing: fastTiming(), h100: 1, l40s: 1})
	p.registerAll()
	count := func() int {
		var n int
		if err := p.pool.QueryRow(t.Context(), `SELECT count(*) FROM allocations`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	cases := []struct {
		name   string
		body   map[string]any
		status int
		code   string
	}{
		{"unknown sku", map[string]any{"sku_id": "tpu-v9"}, 404, "sku_not_found"},
		{"zero count", map[string]any{"sku_id": "h100", "count": 0}, 400, "validation_failed"},
		{"negative count", map[string]any{"sku_id": "h100", "count": -3}, 400, "validation_failed"},
		{"huge count", map[string]any{"sku_id": "h100", "count": 1 << 40}, 400, "validation_failed"},
		{"count not a number", map[string]any{"sku_id": "h100", "count": "two"}, 400, "validation_failed"},
		{"unknown field", map[string]any{"sku_id": "h100", "gpus": 8}, 400, "unknown_field"},
		{"reserved user", map[string]any{"sku_id": "h100", "username": "root"}, 400, "validation_failed"},
		{"bad user", map[string]any{"sku_id": "h100", "username": "a;rm -rf /"}, 400, "validation_failed"},
		{"bad key", map[string]any{"sku_id": "h100", "ssh_public_keys": []string{"ssh-rsa AAAA tooshort"}}, 400, "invalid_ssh_key"},
		{"foreign key id", map[string]any{"sku_id": "h100", "ssh_key_ids": []string{uuid.NewString()}}, 400, "validation_failed"},
		{"more than free", map[string]any{"sku_id": "h100", "count": 2}, 409, "no_capacity"},
		{"foreign project", map[string]any{"sku_id": "h100", "project_id": uuid.NewString()}, 404, "project_not_found"},
	}
	for _, c := range cases {
		r, _ := p.create(p.user, c.body)
		if r.status != c.status || r.code() != c.code {
			t.Errorf("%s: %d %s; want %d %s", c.name, r.status, r.body, c.status, c.code)
		}
	}
	if n := count(); n != 0 {
		t.Fatalf("refused requests wrote %d allocations", n)
	}
	if r := p.call("GET", "/api/v1/capacity", "", nil); !strings.Contains(string(r.body), `{"available":1,"gpu_model":"H100 80GB","gpus_per_node":8,"sku_id":"h100"}`) {
		t.Fatalf("a refused request held a node: %s", r.body)
	}

	// No SSH key at all.
	ctx := principal.With(t.Context(), principal.SystemPrincipal("fixture"))
	f := newIdentityFixture(t, p.pool)
	keyless := f.user(ctx, "keyless-"+uuid.NewString()[:8]+"@example.test", false)
	if _, err := p.pool.Exec(ctx, `INSERT INTO project_memberships (project_id, user_id, role) VALUES ($1, $2, 'member')`, p.project, keyless); err != nil {
		t.Fatal(err)
	}
	if r, _ := p.create(f.token(ctx, keyless), map[string]any{"sku_id": "h100"}); r.status != 400 || r.code() != "ssh_key_required" {
		t.Fatalf("keyless: %d %s; want 400 ssh_key_required", r.status, r.body)
	}

	// A viewer may look but not rent.
	viewer := f.user(ctx, "viewer-"+uuid.NewString()[:8]+"@example.test", false)
	if _, err := p.pool.Exec(ctx, `INSERT INTO project_memberships (project_id, user_id, role) VALUES ($1, $2, 'viewer')`, p.project, viewer); err != nil {
		t.Fatal(err)
	}
	if r, _ := p.create(f.token(ctx, viewer), map[string]any{"sku_id": "h100", "ssh_public_keys": []string{newSSHKey(t)}}); r.status != 403 {
		t.Fatalf("viewer create: %d %s; want 403", r.status, r.body)
	}

	// An org without money cannot start anything.
	broke, bp := uuid.Must(uuid.NewV7()), uuid.Must(uuid.NewV7())
	if _, err := p.pool.Exec(ctx, `INSERT INTO orgs (id, slug, name) VALUES ($1, $2, 'Broke')`, broke, "broke-"+uuid.NewString()[:8]); err != nil {
		t.Fatal(err)
	}
	if _, err := p.pool.Exec(ctx, `INSERT INTO billing_accounts (org_id, currency) VALUES ($1, 'USD')`, broke); err != nil {
		t.Fatal(err)
	}
	if _, err := p.pool.Exec(ctx, `INSERT INTO projects (id, org_id, slug, name) VALUES ($1, $2, 'broke-proj', 'P')`, bp, broke); err != nil {
		t.Fatal(err)
	}
	if _, err := p.pool.Exec(ctx, `INSERT INTO project_memberships (project_id, user_id, role) VALUES ($1, $2, 'member')`, bp, viewer); err != nil {
		t.Fatal(err)
	}
	if r, _ := p.create(f.token(ctx, viewer), map[string]any{"sku_id": "h100", "project_id": bp, "ssh_public_keys": []string{newSSHKey(t)}}); r.status != 402 || r.code() != "insufficient_balance" {
		t.Fatalf("broke org: %d %s; want 402 insufficient_balance", r.status, r.body)
	}
	if n := count(); n != 0 {
		t.Fatalf("refused requests wrote %d allocations", n)
	}
	// Nodes are taken in the same round trip as the checks: a refusal gives
	// them back.
	if r := p.call("GET", "/api/v1/capacity", "", nil); !strings.Contains(string(r.body), `{"available":1,"gpu_model":"H100 80GB","gpus_per_node":8,"sku_id":"h100"}`) {
		t.Fatalf("a refused request held a node: %s", r.body)
	}

	// A user of another org sees nothing of ours.
	r, list := p.create(p.user, map[string]any{"sku_id": "h100"})
	if r.status != 201 {
		t.Fatalf("create: %d %s", r.status, r.body)
	}
	stranger := f.user(ctx, "stranger-"+uuid.NewString()[:8]+"@example.test", false)
	st := f.token(ctx, stranger)
	for _, c := range []struct{ method, path string }{
		{"GET", "/api/v1/allocations/" + list[0].ID.String()},
		{"POST", "/api/v1/allocations/" + list[0].ID.String() + "/release"},
		{"GET", "/api/v1/allocations/" + uuid.NewString()},
	} {
		if r := p.call(c.method, c.path, st, nil); r.status != 404 || r.code() != "allocation_not_found" {
			t.Errorf("stranger %s %s: %d %s; want 404 allocation_not_found", c.method, c.path, r.status, r.body)
		}
	}
	if r := p.call("GET", "/api/v1/allocations?project_id="+p.project.String(), st, nil); r.status != 404 {
		t.Errorf("stranger lists our project: %d %s", r.status, r.body)
	}

}

// A failed deploy fails the allocation without a charge and returns the
// node to the pool after cleaning; a failed erase is release_failed, and an
// admin's force-release finishes the job.
func TestAllocationFaults(t *testing.T) {
	p := newProvEnv(t, provOptions{timing: fastTiming(), h100: 1})
	nodes := p.registerAll()
	var sys string
	var node uuid.UUID
	for s, n := range nodes {
		sys, node = s, n
	}
	if err := p.sim.InjectFailure(sys, maassim.Failure{Deploy: "no boot device found"}); err != nil {
		t.Fatal(err)
	}
	_, list := p.create(p.user, map[string]any{"sku_id": "h100"})
	if len(list) != 1 {
		t.Fatal("create failed")
	}
	a := p.await(list[0].ID, "failed", 30*time.Second)
	if !strings.Contains(a.StateReason, "no boot device") {
		t.Fatalf("failed allocation's reason: %q", a.StateReason)
	}
	p.awaitNode(node, "available", 30*time.Second)
	var auditsBefore int
	_ = p.pool.QueryRow(t.Context(), `SELECT count(*) FROM audit_log`).Scan(&auditsBefore)
	if r := p.call("POST", "/api/v1/allocations/"+a.ID.String()+"/release", p.user, nil); r.status != 409 || r.code() != "invalid_allocation_transition" {
		t.Fatalf("release of a failed allocation: %d %s; want 409", r.status, r.body)
	}
	var auditsAfter int
	_ = p.pool.QueryRow(t.Context(), `SELECT count(*) FROM audit_log`).Scan(&auditsAfter)
	if r := p.call("GET", "/api/v1/allocations/"+a.ID.String(), p.user, nil); !strings.Contains(string(r.body), `"state":"failed"`) || auditsAfter != auditsBefore {
		t.Fatalf("an illegal transition wrote something: %s, audit rows %d → %d", r.body, auditsBefore, auditsAfter)
	}
	var usage int
	_ = p.pool.QueryRow(t.Context(), `SELECT count(*) FROM usage_records WHERE allocation_id = $1`, a.ID).Scan(&usage)
	if usage != 0 || debits(t, p.pool, p.org) != 0 {
		t.Fatalf("a failed allocation was metered: %d usage records, debits %d", usage, debits(t, p.pool, p.org))
	}

	// Erase failure.
	if err := p.sim.InjectFailure(sys, maassim.Failure{Erase: "disk /dev/nvme0n1 failed secure erase"}); err != nil {
		t.Fatal(err)
	}
	_, list = p.create(p.user, map[string]any{"sku_id": "h100"})
	if len(list) != 1 {
		t.Fatal("second create failed")
	}
	a = p.await(list[0].ID, "active", 30*time.Second)
	if r := p.call("POST", "/api/v1/allocations/"+a.ID.String()+"/release", p.user, nil); r.status != 202 {
		t.Fatalf("release: %d %s", r.status, r.body)
	}
	a = p.await(a.ID, "release_failed", 30*time.Second)
	if !strings.Contains(a.StateReason, "erase") {
		t.Fatalf("release_failed reason: %q", a.StateReason)
	}
	if _, ended, _, _ := p.usage(a.ID); ended == nil {
		t.Fatal("metering did not stop at release_failed")
	}
	if p.nodeState(node) != "allocated" {
		t.Fatalf("the node of a release_failed allocation is %s; it must stay held", p.nodeState(node))
	}
	if r := p.call("GET", "/api/v1/admin/allocations?state=release_failed", p.admin, nil); !strings.Contains(string(r.body), a.ID.String()) {
		t.Fatalf("admin queue lacks the release_failed allocation: %s", r.body)
	}
	if r := p.call("POST", "/api/v1/admin/allocations/"+a.ID.String()+"/force-release", p.user, map[string]any{}); r.status != 403 {
		t.Fatalf("force-release by a tenant: %d; want 403", r.status)
	}
	if err := p.sim.InjectFailure(sys, maassim.Failure{}); err != nil {
		t.Fatal(err)
	}
	if r := p.call("POST", "/api/v1/admin/allocations/"+a.ID.String()+"/force-release", p.admin, map[string]any{"reason": "disk replaced"}); r.status != 202 {
		t.Fatalf("force-release: %d %s", r.status, r.body)
	}
	p.await(a.ID, "released", 30*time.Second)
	p.awaitNode(node, "available", 10*time.Second)
	// The failed one and the force-released one hold nothing.
	if d := p.holdingsDrift(t); len(d) > 0 {
		t.Fatalf("holdings differ from the live allocations: %v", d)
	}
	if n, _ := p.held(t, p.org); n != 0 {
		t.Fatalf("the org holds %d allocations; want 0", n)
	}
}

// The core (and its worker) stopping in the middle of a deploy does not stop
// the allocation: another core resumes it; it becomes active once, with one
// deploy in MAAS.
func TestAllocationSurvivesCoreRestart(t *testing.T) {
	timing := maassim.FastTiming()
	timing.Deploy = 3 * time.Second
	p := newProvEnv(t, provOptions{timing: timing, h100: 1, policies: map[string]string{
		"provisioning.heartbeat_timeout": `"2s"`, "provisioning.poll_interval": `"100ms"`,
	}})
	nodes := p.registerAll()
	var sys string
	for s := range nodes {
		sys = s
	}
	_, list := p.create(p.user, map[string]any{"sku_id": "h100"})
	if len(list) != 1 {
		t.Fatal("create failed")
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		m, err := p.sim.Machine(sys)
		if err != nil {
			t.Fatal(err)
		}
		if m.Status.String() == "Deploying" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("machine never started deploying (%s)", m.Status)
		}
		time.Sleep(20 * time.Millisecond)
	}
	p.stop()
	p.drivers.set("maas-a", nil) // the old driver process is gone with its memory
	p.start()
	p.configureMAAS("maas-a")
	a := p.await(list[0].ID, "active", 60*time.Second)
	if n := len(p.sim.Deploys(sys)); n != 1 {
		t.Fatalf("%d deploys for one allocation; want 1", n)
	}
	var actives int
	_ = p.pool.QueryRow(t.Context(), `SELECT count(*) FROM audit_log WHERE action = 'allocation.active' AND target LIKE '%' || $1`, a.ID.String()).Scan(&actives)
	if actives != 1 {
		t.Fatalf("allocation became active %d times", actives)
	}
}

// The depletion timer's request releases every active allocation of the
// org; a stranded allocation (no workflow) is resumed by the reconciler.
func TestAllocationAutoReleaseAndReconciler(t *testing.T) {
	p := newProvEnv(t, provOptions{timing: fastTiming(), h100: 2, policies: map[string]string{
		"provisioning.reconcile_interval": `"1s"`, "provisioning.stranded_after": `"1s"`,
	}})
	nodes := p.registerAll()
	_, list := p.create(p.user, map[string]any{"sku_id": "h100"})
	a := p.await(list[0].ID, "active", 30*time.Second)

	ctx := principal.With(t.Context(), principal.SystemPrincipal("billing"))
	err := store.Transact(ctx, p.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		_, err := events.Enqueue(ctx, tx, events.Event{Subject: events.SubjectBillingAutoReleaseRequested,
			Payload: billing.BalanceEvent{OrgID: p.org, Currency: "USD"}})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	got := p.await(a.ID, "released", 30*time.Second)
	_ = got
	var by string
	_ = p.pool.QueryRow(t.Context(), `SELECT release_requested_by FROM allocations WHERE id = $1`, a.ID).Scan(&by)
	if by != "system:billing" {
		t.Fatalf("auto-release requested by %q", by)
	}

	// A stranded allocation: requested, node taken, but its event was lost.
	var free uuid.UUID
	for _, n := range nodes {
		if p.nodeState(n) == "available" {
			free = n
			break
		}
	}
	id := uuid.Must(uuid.NewV7())
	if _, err := p.pool.Exec(ctx, `UPDATE nodes SET state = 'allocated' WHERE id = $1`, free); err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{
		`INSERT INTO allocations (id, org_id, project_id, sku_id, node_id, gpus, price_per_gpu_hour_minor, currency, state, username, ssh_public_keys, created_by, updated_at)
			SELECT $1, $3, $4, 'h100', $2, 8, 360000, 'USD', 'requested', 'tenant', ssh_public_keys, 'test', now() - interval '1 minute' FROM allocations WHERE id = $5`,
	} {
		if _, err := p.pool.Exec(ctx, q, id, free, p.org, p.project, a.ID); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	p.await(id, "active", 30*time.Second)
	// It was written by hand, not counted into the holdings: the reconciler
	// counts it in.
	deadline := time.Now().Add(10 * time.Second)
	for d := p.holdingsDrift(t); len(d) > 0; d = p.holdingsDrift(t) {
		if time.Now().After(deadline) {
			t.Fatalf("the reconciler left the holdings apart from the live allocations: %v", d)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if n, gpus := p.held(t, p.project); n != 1 || gpus != 8 {
		t.Fatalf("the project holds %d allocations, %d GPUs; want 1, 8", n, gpus)
	}
}

// The reconciler's correction of holdings: rows that differ from the live
// allocations, or are missing, are recounted; right rows are left alone.
func TestAllocationHoldingsCorrection(t *testing.T) {
	p := newProvEnv(t, provOptions{timing: fastTiming(), h100: 2})
	p.registerAll()
	var ids []uuid.UUID
	for range 2 {
		_, list := p.create(p.user, map[string]any{"sku_id": "h100"})
		if len(list) != 1 {
			t.Fatal("create failed")
		}
		ids = append(ids, list[0].ID)
	}
	rec := &allocations.Reconciler{Pool: p.pool, Log: hclog.NewNullLogger()}
	if n, err := rec.CorrectHoldings(t.Context()); err != nil || n != 0 {
		t.Fatalf("correcting right holdings: %d, %v; want 0", n, err)
	}
	// The org's row is off, the project's is gone.
	if _, err := p.pool.Exec(t.Context(), `UPDATE allocation_holdings SET allocations = 7, gpus = 3 WHERE owner_id = $1`, p.org); err != nil {
		t.Fatal(err)
	}
	if _, err := p.pool.Exec(t.Context(), `DELETE FROM allocation_holdings WHERE owner_id = $1`, p.project); err != nil {
		t.Fatal(err)
	}
	if n, err := rec.CorrectHoldings(t.Context()); err != nil || n != 2 {
		t.Fatalf("correcting two rows: %d, %v; want 2", n, err)
	}
	for _, owner := range []uuid.UUID{p.org, p.project} {
		if n, gpus := p.held(t, owner); n != 2 || gpus != 16 {
			t.Fatalf("%s holds %d allocations, %d GPUs after the correction; want 2, 16", owner, n, gpus)
		}
	}
	// Then the allocations end, and the holdings follow them down to zero.
	for _, id := range ids {
		p.await(id, "active", 30*time.Second)
		if r := p.call("POST", "/api/v1/allocations/"+id.String()+"/release", p.user, nil); r.status != 202 {
			t.Fatalf("release: %d %s", r.status, r.body)
		}
	}
	for _, id := range ids {
		p.await(id, "released", 30*time.Second)
	}
	if d := p.holdingsDrift(t); len(d) > 0 {
		t.Fatalf("holdings differ from the live allocations: %v", d)
	}
}

// Races: 2,000 concurrent creates for 50 free nodes give exactly 50
// allocations, no node twice; 64 concurrent creates against a cap of 8 give
// exactly 8.
func TestAllocationCreateRaces(t *testing.T) {
	p := newProvEnv(t, provOptions{timing: fastTiming(), policies: map[string]string{
		"ratelimit.requests_per_minute": `1000000`, "allocations.max_per_project": `100000`, "allocations.max_gpus_per_project": `10000000`,
		"allocations.max_per_org": `1000000`, "allocations.max_gpus_per_org": `100000000`,
	}})
	ctx := principal.With(t.Context(), principal.SystemPrincipal("fixture"))
	for _, q := range []string{
		`INSERT INTO skus (id, gpu_model, gpus_per_node, cpu_cores, memory_gib, disk_gib, price_per_gpu_hour_minor, currency) VALUES ('race', 'Race GPU', 1, 8, 64, 100, 100, 'USD'), ('quota', 'Quota GPU', 1, 8, 64, 100, 100, 'USD')`,
		`INSERT INTO nodes (id, provisioner_instance, external_id, sku_id, state) SELECT gen_random_uuid(), 'race', 'r' || i, 'race', 'available' FROM generate_series(1, 50) i`,
		`INSERT INTO nodes (id, provisioner_instance, external_id, sku_id, state) SELECT gen_random_uuid(), 'race', 'q' || i, 'quota', 'available' FROM generate_series(1, 64) i`,
	} {
		if _, err := p.pool.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	key := newSSHKey(t)
	race := func(n int, body map[string]any) map[int]int {
		statuses := map[int]int{}
		var mu sync.Mutex
		var wg sync.WaitGroup
		client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256, MaxConnsPerHost: 256}, Timeout: 2 * time.Minute}
		start := make(chan struct{})
		for range n {
			wg.Go(func() {
				<-start
				req, _ := http.NewRequestWithContext(context.Background(), "POST", p.url+"/api/v1/allocations", strings.NewReader(jsonBody(body)))
				req.Header.Set("Content-Type", "application/json")
				req.Header.Set("Authorization", "Bearer "+p.user)
				resp, err := client.Do(req)
				code := 0
				if err == nil {
					code = resp.StatusCode
					resp.Body.Close()
				}
				mu.Lock()
				statuses[code]++
				mu.Unlock()
			})
		}
		close(start)
		wg.Wait()
		return statuses
	}
	got := race(2000, map[string]any{"project_id": p.project, "sku_id": "race", "ssh_public_keys": []string{key}})
	if got[201] != 50 || got[409] != 1950 {
		t.Fatalf("2000 creates for 50 nodes: %v; want 50×201 and 1950×409", got)
	}
	var allocs, distinct int
	if err := p.pool.QueryRow(t.Context(), `SELECT count(*), count(DISTINCT node_id) FROM allocations WHERE sku_id = 'race'`).Scan(&allocs, &distinct); err != nil {
		t.Fatal(err)
	}
	if allocs != 50 || distinct != 50 {
		t.Fatalf("%d allocations on %d distinct nodes; want 50 on 50", allocs, distinct)
	}

	// The quota race, in a project capped at 8.
	capped := uuid.Must(uuid.NewV7())
	for _, q := range []string{
		`INSERT INTO projects (id, org_id, slug, name) SELECT $1, org_id, 'capped', 'Capped' FROM projects WHERE id = $2`,
		`INSERT INTO project_memberships (project_id, user_id, role) SELECT $1, user_id, role FROM project_memberships WHERE project_id = $2`,
	} {
		if _, err := p.pool.Exec(ctx, q, capped, p.project); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	if r := p.call("PUT", "/api/v1/admin/policies/allocations.max_per_project", p.admin, map[string]any{"scope": "project", "scope_id": capped, "value": 8}); r.status != 200 {
		t.Fatalf("cap the project: %d %s", r.status, r.body)
	}
	got = race(64, map[string]any{"project_id": capped, "sku_id": "quota", "ssh_public_keys": []string{key}})
	if got[201] != 8 || got[429] != 56 {
		t.Fatalf("64 creates against a cap of 8: %v; want 8×201 and 56×429", got)
	}
	if n, gpus := p.held(t, capped); n != 8 || gpus != 8 {
		t.Fatalf("the capped project holds %d allocations, %d GPUs; want 8, 8", n, gpus)
	}
	if d := p.holdingsDrift(t); len(d) > 0 {
		t.Fatalf("holdings differ from the live allocations after the races: %v", d)
	}
}

func jsonBody(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return string(b)
}

// Nodes come in by the commissioning webhook (MAAS runs the driver's script,
// which calls the core) and by the reconciling poll, which also takes away
// machines MAAS lost or broke and brings them back.
func TestNodeDiscovery(t *testing.T) {
	p := newProvEnv(t, provOptions{timing: fastTiming(), h100: 2})
	nodes := p.registerAll()

	// A forged webhook is refused and audited.
	r := p.call("POST", "/api/v1/webhooks/maas/maas-a", "", map[string]any{"system_id": "abc123"})
	if r.status != 401 || r.code() != "node_webhook_invalid" {
		t.Fatalf("forged webhook: %d %s; want 401 node_webhook_invalid", r.status, r.body)
	}
	var denied int
	_ = p.pool.QueryRow(t.Context(), `SELECT count(*) FROM audit_log WHERE action = 'node.webhook' AND result = 'denied'`).Scan(&denied)
	if denied != 1 {
		t.Fatalf("%d denied webhook audit rows; want 1", denied)
	}

	// Commissioning a new machine registers it through the webhook.
	spec, err := maassim.NewMachine(maassim.SKUL40S, 7, "new")
	if err != nil {
		t.Fatal(err)
	}
	newID, err := p.sim.AddMachine(spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.sim.Commission(newID); err != nil {
		t.Fatal(err)
	}
	var node uuid.UUID
	deadline := time.Now().Add(30 * time.Second)
	for {
		var state string
		err := p.pool.QueryRow(t.Context(), `SELECT id, state FROM nodes WHERE external_id = $1`, newID).Scan(&node, &state)
		if err == nil && state == "available" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("commissioned machine %s not available in the inventory (state %q, %v); webhooks: %+v", newID, state, err, p.sim.Webhooks())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if r := p.call("GET", "/api/v1/admin/nodes/"+node.String(), p.admin, nil); !strings.Contains(string(r.body), `"sku_id":"l40s"`) {
		t.Fatalf("webhook node: %s", r.body)
	}

	// A machine MAAS has but the core missed (lost webhook) comes in by the
	// poll; a machine MAAS marks broken, and one it deleted, go offline.
	spec, err = maassim.NewMachine(maassim.SKUH100, 9, "ready")
	if err != nil {
		t.Fatal(err)
	}
	missed, err := p.sim.AddMachine(spec)
	if err != nil {
		t.Fatal(err)
	}
	cl, err := gomaas.GetClient(p.simURL, p.sim.APIKey(), "2.0")
	if err != nil {
		t.Fatal(err)
	}
	var broken, gone string
	for sys := range nodes {
		if broken == "" {
			broken = sys
		} else {
			gone = sys
		}
	}
	if _, err := cl.Machine.MarkBroken(broken, "PSU failure"); err != nil {
		t.Fatal(err)
	}
	if err := cl.Machine.Delete(gone); err != nil {
		t.Fatal(err)
	}
	r = p.call("POST", "/api/v1/admin/plugin-instances/maas-a/sync", p.admin, nil)
	if r.status != 200 || !strings.Contains(string(r.body), `"added":1`) || !strings.Contains(string(r.body), `"offline":2`) {
		t.Fatalf("sync: %d %s; want 1 added, 2 offline", r.status, r.body)
	}
	if s := p.nodeState(nodes[broken]); s != "offline" {
		t.Fatalf("broken machine's node is %s", s)
	}
	if s := p.nodeState(nodes[gone]); s != "offline" {
		t.Fatalf("deleted machine's node is %s", s)
	}
	var missedState string
	_ = p.pool.QueryRow(t.Context(), `SELECT state FROM nodes WHERE external_id = $1`, missed).Scan(&missedState)
	if missedState != "available" {
		t.Fatalf("missed machine's node is %q; want available", missedState)
	}
	// Offline nodes are not rented; the broken one comes back when fixed.
	if r := p.call("GET", "/api/v1/capacity", "", nil); !strings.Contains(string(r.body), `"available":1,"gpu_model":"H100 80GB"`) {
		t.Fatalf("capacity with two H100 offline: %s", r.body)
	}
	if _, err := cl.Machine.MarkFixed(broken, "PSU replaced"); err != nil {
		t.Fatal(err)
	}
	r = p.call("POST", "/api/v1/admin/plugin-instances/maas-a/sync", p.admin, nil)
	if r.status != 200 || !strings.Contains(string(r.body), `"recovered":1`) {
		t.Fatalf("sync after fix: %d %s; want 1 recovered", r.status, r.body)
	}
	if s := p.nodeState(nodes[broken]); s != "available" {
		t.Fatalf("fixed machine's node is %s", s)
	}

	// Retire: refused while allocated, done when idle.
	_, list := p.create(p.user, map[string]any{"sku_id": "h100"})
	if len(list) != 1 {
		t.Fatal("create failed")
	}
	a := p.await(list[0].ID, "active", 30*time.Second)
	if r := p.call("POST", "/api/v1/admin/nodes/"+a.NodeID.String()+"/retire", p.admin, nil); r.status != 409 || r.code() != "node_busy" {
		t.Fatalf("retire an allocated node: %d %s; want 409 node_busy", r.status, r.body)
	}
	if r := p.call("POST", "/api/v1/admin/nodes/"+nodes[gone].String()+"/retire", p.admin, map[string]any{"reason": "gone from MAAS"}); r.status != 200 ||
		!strings.Contains(string(r.body), `"state":"retired"`) {
		t.Fatalf("retire: %d %s", r.status, r.body)
	}
	if r := p.call("POST", "/api/v1/admin/nodes/"+a.NodeID.String()+"/probe", p.admin, nil); r.status != 200 || !strings.Contains(string(r.body), `"healthy":true`) {
		t.Fatalf("probe: %d %s", r.status, r.body)
	}
}
