package daemon_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/gpuaas/gpuaas/agent/runtime"
	"github.com/gpuaas/gpuaas/agent/tasks"
	"github.com/gpuaas/gpuaas/core/internal/agents"
	"github.com/gpuaas/gpuaas/core/internal/daemon/daemontest"
	"github.com/gpuaas/gpuaas/core/internal/pki"
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
	daemontest.Start(t, map[string]string{"DATABASE_URL": dbURL, "NATS_URL": n.URL(), "TEMPORAL_ADDRESS": testenv.Env(t, "TEMPORAL_ADDRESS"),
		"GPUAAS_STATE_DIR": state, "GPUAAS_AGENT_LISTEN_ADDR": addr})

	// An operator's token for a node, minted against the core's own PKI.
	ctx := principal.With(context.Background(), principal.SystemPrincipal("test"))
	local, err := pki.NewLocal(filepath.Join(state, "pki"))
	if err != nil {
		t.Fatal(err)
	}
	svc := agents.NewService(pool, local, local, "local", agents.Settings{}, testenv.Logger(t))
	node := uuid.Must(uuid.NewV7())
	if _, err := pool.Exec(ctx, `INSERT INTO nodes (id, provisioner_instance, external_id, state) VALUES ($1, 'manual', 'host-1', 'enrolling')`, node); err != nil {
		t.Fatal(err)
	}
	token, _, err := svc.MintToken(ctx, node, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
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
	var beat *time.Time
	if err := pool.QueryRow(ctx, `SELECT heartbeat_at FROM nodes WHERE id = $1`, node).Scan(&beat); err != nil || beat == nil {
		t.Fatalf("heartbeat not recorded: %v", err)
	}
}
