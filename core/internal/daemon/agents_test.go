package daemon_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/gpuaas/gpuaas/agent/runtime"
	"github.com/gpuaas/gpuaas/agent/tasks"
	"github.com/gpuaas/gpuaas/core/internal/daemon/daemontest"
	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
)

func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// gpuaasd serves the agent protocol on its own TLS listener: a real agent
// enrolls against it with a token and heartbeats over mTLS.
func TestAgentListener(t *testing.T) {
	pool, dbURL := testenv.MigratedPool(t)
	n := testenv.StartNATS(t)
	state, addr := t.TempDir(), freePort(t)
	core := daemontest.Start(t, map[string]string{"DATABASE_URL": dbURL, "NATS_URL": n.URL(), "TEMPORAL_ADDRESS": testenv.Env(t, "TEMPORAL_ADDRESS"),
		"GPUAAS_STATE_DIR": state, "GPUAAS_AGENT_LISTEN_ADDR": addr})

	// An operator mints a token for a node through the admin API.
	ctx := principal.With(context.Background(), principal.SystemPrincipal("test"))
	node := uuid.Must(uuid.NewV7())
	if _, err := pool.Exec(ctx, `INSERT INTO nodes (id, provisioner_instance, external_id, state) VALUES ($1, 'manual', 'host-1', 'enrolling')`, node); err != nil {
		t.Fatal(err)
	}
	f := newIdentityFixture(t, pool)
	admin := f.token(ctx, f.user(ctx, "admin-"+uuid.NewString()[:8]+"@example.test", true))
	api := &env{t: t, url: core.URL}
	// Only a platform admin mints tokens: an org's own admin cannot enroll
	// machines into the platform's inventory.
	orgAdmin := f.token(ctx, f.user(ctx, "owner-"+uuid.NewString()[:8]+"@example.test", false))
	if r := api.call("POST", "/api/v1/admin/nodes/"+node.String()+"/enrollment-token", orgAdmin, map[string]any{}); r.status != 403 {
		t.Fatalf("mint by a non-admin: %d %s; want 403", r.status, r.body)
	}
	r := api.call("POST", "/api/v1/admin/nodes/"+node.String()+"/enrollment-token", admin, map[string]any{"ttl_seconds": 300})
	var minted struct{ Token string }
	if r.status != 201 {
		t.Fatalf("mint: %d %s", r.status, r.body)
	}
	r.json(t, &minted)
	token := minted.Token
	coreCA, err := os.ReadFile(filepath.Join(state, "agents", "agent-listener.crt"))
	if err != nil {
		t.Fatal(err)
	}
	a, err := runtime.New(runtime.Config{CoreURL: "https://" + addr, CoreCA: coreCA, StateDir: t.TempDir(), Token: token,
		System: &tasks.System{}, Log: testenv.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Enroll(t.Context()); err != nil || a.NodeID() != node.String() {
		t.Fatalf("enroll: %v (node %q)", err, a.NodeID())
	}
	if err := a.Heartbeat(t.Context()); err != nil {
		t.Fatalf("heartbeat over mTLS: %v", err)
	}
	if r := api.call("GET", "/api/v1/admin/plugin-instances/manual/nodes/host-1", admin, nil); r.status != 200 || !strings.Contains(string(r.body), `"heartbeat_at"`) {
		t.Fatalf("node by external id after a heartbeat: %d %s", r.status, r.body)
	}

	// A driver queues a task through the API; the agent runs it; the driver
	// reads the result back by its operation id.
	runCtx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = a.Run(runCtx) }()
	body := map[string]any{"external_id": "host-1", "type": "node.inventory", "operation_id": "inv-1", "params": map[string]any{}}
	if r := api.call("POST", "/api/v1/admin/plugin-instances/manual/node-tasks", admin, body); r.status != 201 {
		t.Fatalf("enqueue: %d %s", r.status, r.body)
	}
	if r := api.call("POST", "/api/v1/admin/plugin-instances/manual/node-tasks", admin, body); r.status != 200 {
		t.Fatalf("enqueue again: %d %s; want 200 (same task)", r.status, r.body)
	}
	reused := map[string]any{"external_id": "host-1", "type": "node.inventory", "operation_id": "inv-1", "params": map[string]any{"allocation_id": "x"}}
	if r := api.call("POST", "/api/v1/admin/plugin-instances/manual/node-tasks", admin, reused); r.status != 409 || r.code() != "node_task_conflict" {
		t.Fatalf("operation id reused with other parameters: %d %s", r.status, r.body)
	}
	body["type"] = "node.wipe"
	if r := api.call("POST", "/api/v1/admin/plugin-instances/manual/node-tasks", admin, body); r.status != 409 || r.code() != "node_task_conflict" {
		t.Fatalf("operation id reused for another task: %d %s", r.status, r.body)
	}
	if r := api.call("POST", "/api/v1/admin/plugin-instances/manual/node-tasks", admin, map[string]any{"external_id": "nope", "type": "node.inventory", "operation_id": "x"}); r.status != 404 {
		t.Fatalf("unknown node: %d %s", r.status, r.body)
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		r := api.call("GET", "/api/v1/admin/plugin-instances/manual/node-tasks/inv-1", admin, nil)
		if r.status == 200 && strings.Contains(string(r.body), `"state":"succeeded"`) {
			if !strings.Contains(string(r.body), `"cpu_cores"`) || !strings.Contains(string(r.body), `"operation_id":"inv-1"`) {
				t.Fatalf("task: %s", r.body)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("task not done: %d %s", r.status, r.body)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
