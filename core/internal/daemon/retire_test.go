package daemon_test

import (
	"context"
	"encoding/json"
	"errors"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/gpuaas/gpuaas/agent/runtime"
	"github.com/gpuaas/gpuaas/agent/tasks"
	"github.com/gpuaas/gpuaas/core/internal/pki"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
	"github.com/gpuaas/gpuaas/plugins/manual/nomadsim"
)

// Retiring a hand-managed host undoes its enrollment: the manual driver
// purges the agent's Nomad job, the agent's certificate stops working
// within the revocation cache's age, and neither a token minted before the
// retirement nor the driver's enrollment secret enrolls an agent any more.
// A Nomad that fails does not stop the retirement; the audit log says so.
func TestRetireManualNode(t *testing.T) {
	m := newManualEnv(t, nil)
	p, agentAddr, coreCA, nomad := m.provEnv, m.agentAddr, m.coreCA, m.nomad
	ctx := t.Context()

	// register adds a host; its agent job carries the enrollment secret.
	register := func(host string) (uuid.UUID, string) {
		t.Helper()
		r := p.call("POST", "/api/v1/admin/nodes", p.admin, map[string]any{"provisioner_instance": "manual-a", "external_id": host, "tags": []string{"sku:l40s"}})
		if r.status != 201 {
			t.Fatalf("register %s: %d %s", host, r.status, r.body)
		}
		var n struct{ ID uuid.UUID }
		r.json(t, &n)
		job, ok := nomad.Job("default", "gpuaas-agent-"+host)
		if !ok || len(job.TaskGroups) != 1 || len(job.TaskGroups[0].Tasks) != 1 {
			t.Fatalf("agent job of %s: %+v (%v)", host, job, ok)
		}
		return n.ID, job.TaskGroups[0].Tasks[0].Env["GPUAAS_ENROLL_TOKEN"]
	}
	newAgent := func(token string) *runtime.Agent {
		t.Helper()
		a, err := runtime.New(runtime.Config{CoreURL: "https://" + agentAddr, CoreCA: coreCA, StateDir: filepath.Join(t.TempDir(), "agent"),
			Token: token, PollWait: time.Second, System: &tasks.System{}, Log: testenv.Logger(t)})
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	retire := func(id uuid.UUID) response {
		t.Helper()
		return p.call("POST", "/api/v1/admin/nodes/"+id.String()+"/retire", p.admin, map[string]any{"reason": "decommissioned"})
	}
	// retireAudit is the details of the node's node.retire audit row.
	retireAudit := func(id uuid.UUID) map[string]any {
		t.Helper()
		var b []byte
		if err := p.pool.QueryRow(ctx, `SELECT details FROM audit_log WHERE action = 'node.retire' AND target LIKE '%' || $1`, id.String()).Scan(&b); err != nil {
			t.Fatalf("node.retire audit of %s: %v", id, err)
		}
		var d map[string]any
		if err := json.Unmarshal(b, &d); err != nil {
			t.Fatal(err)
		}
		return d
	}
	refused := func(err error) bool {
		var se *runtime.StatusError
		return errors.As(err, &se) && se.Status == 401
	}

	// A node whose agent enrolled and runs.
	node, secret := register("127.0.0.1")
	agent := newAgent(secret)
	agentCtx, stopAgent := context.WithCancel(context.Background())
	agentDone := make(chan struct{})
	go func() { defer close(agentDone); _ = agent.Run(agentCtx) }()
	t.Cleanup(func() { stopAgent(); <-agentDone })
	p.awaitNode(node, "available", 20*time.Second)
	// The node is available once the core signed; the agent installs its
	// certificate right after it read the answer.
	for deadline := time.Now().Add(10 * time.Second); ; {
		err := agent.Heartbeat(ctx)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("heartbeat before the retirement: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	r := p.call("POST", "/api/v1/admin/nodes/"+node.String()+"/enrollment-token", p.admin, map[string]any{"ttl_seconds": 600})
	if r.status != 201 {
		t.Fatalf("mint: %d %s", r.status, r.body)
	}
	var minted struct{ Token string }
	r.json(t, &minted)

	// While an allocation holds it, the node is refused and keeps everything.
	if _, err := p.pool.Exec(ctx, `UPDATE nodes SET state = 'allocated' WHERE id = $1`, node); err != nil {
		t.Fatal(err)
	}
	if r := retire(node); r.status != 409 || r.code() != "node_busy" {
		t.Fatalf("retire of a held node: %d %s; want 409 node_busy", r.status, r.body)
	}
	if _, ok := nomad.Job("default", "gpuaas-agent-127.0.0.1"); !ok {
		t.Fatal("a refused retirement removed the agent job")
	}
	if err := agent.Heartbeat(ctx); err != nil {
		t.Fatalf("heartbeat after a refused retirement: %v", err)
	}
	if _, err := p.pool.Exec(ctx, `UPDATE nodes SET state = 'available' WHERE id = $1`, node); err != nil {
		t.Fatal(err)
	}

	// Retire: the job is purged, the agent is refused, the token is dead.
	r = retire(node)
	if r.status != 200 || !strings.Contains(string(r.body), `"state":"retired"`) {
		t.Fatalf("retire: %d %s", r.status, r.body)
	}
	if _, ok := nomad.Job("default", "gpuaas-agent-127.0.0.1"); ok {
		t.Fatal("the agent job is still registered in Nomad after the retirement")
	}
	for deadline := time.Now().Add(pki.DefaultRevocationMaxAge + 5*time.Second); ; {
		hb, poll := agent.Heartbeat(ctx), agent.Poll(ctx)
		if refused(hb) && refused(poll) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the retired node's agent: heartbeat %v, poll %v; want both refused with 401 within %s", hb, poll, pki.DefaultRevocationMaxAge)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err := newAgent(minted.Token).Enroll(ctx); !refused(err) {
		t.Fatalf("enroll with a token minted before the retirement: %v; want 401", err)
	}
	var revoked, live int
	if err := p.pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM node_certificates WHERE node_id = $1 AND revoked_at IS NOT NULL),
		(SELECT count(*) FROM node_enrollment_tokens WHERE node_id = $1 AND used_at IS NULL AND expires_at > now())`, node).Scan(&revoked, &live); err != nil {
		t.Fatal(err)
	}
	if revoked == 0 || live != 0 {
		t.Fatalf("after the retirement: %d certificates revoked, %d tokens still live; want some and none", revoked, live)
	}
	if d := retireAudit(node); d["driver_unenroll"] != "done" || d["enrollment_tokens_expired"] != float64(1) ||
		d["agent_certificates_revoked"] != float64(revoked) || d["reason"] != "decommissioned" {
		t.Fatalf("node.retire audit: %v; want the driver done, 1 token expired, %d certificates revoked", d, revoked)
	}
	if acts := p.auditActions(node.String()); slices.Contains(acts, "node.certificates_revoke") {
		t.Fatalf("audit of the node: %v; the retirement is one audit row", acts)
	}
	if r := retire(node); r.status != 409 || r.code() != "invalid_node_transition" {
		t.Fatalf("retire again: %d %s; want 409 invalid_node_transition", r.status, r.body)
	}

	// A node whose agent never enrolled: the driver's secret dies with it.
	pending, pendingSecret := register("127.0.0.2")
	if r := retire(pending); r.status != 200 {
		t.Fatalf("retire the pending node: %d %s", r.status, r.body)
	}
	if _, ok := nomad.Job("default", "gpuaas-agent-127.0.0.2"); ok {
		t.Fatal("the pending node's agent job is still registered")
	}
	if err := newAgent(pendingSecret).Enroll(ctx); !refused(err) {
		t.Fatalf("enroll with the driver's secret of a retired node: %v; want 401", err)
	}
	if d := retireAudit(pending); d["enrollment_secret_cleared"] != true || d["agent_certificates_revoked"] != float64(0) {
		t.Fatalf("node.retire audit of the pending node: %v; want the secret cleared, no certificate", d)
	}

	// Nomad fails: the node is retired all the same, and the audit says what
	// is left to undo by hand.
	broken, _ := register("127.0.0.3")
	nomad.InjectFault(nomadsim.Fault{Method: "DELETE", Path: "/v1/job/", Status: 500, Body: "No cluster leader"})
	if r := retire(broken); r.status != 200 || !strings.Contains(string(r.body), `"state":"retired"`) {
		t.Fatalf("retire while Nomad fails: %d %s", r.status, r.body)
	}
	if _, ok := nomad.Job("default", "gpuaas-agent-127.0.0.3"); !ok {
		t.Fatal("the job vanished although Nomad failed")
	}
	if d, _ := retireAudit(broken)["driver_unenroll"].(string); !strings.HasPrefix(d, "failed: ") || !strings.Contains(d, "No cluster leader") {
		t.Fatalf("node.retire audit driver_unenroll %q; want the driver's failure", d)
	}
}
