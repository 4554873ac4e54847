package agents_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/agent/protocol"
	"github.com/gpuaas/gpuaas/agent/tasks"
	"github.com/gpuaas/gpuaas/core/internal/agents"
)

// An expired token is refused like a used one, and nothing enrolls.
func TestExpiredEnrollmentToken(t *testing.T) {
	f := newFixture(t, agents.Settings{})
	node, tok := f.node()
	if _, err := f.pool.Exec(f.ctx, `UPDATE node_enrollment_tokens SET expires_at = now() - interval '1 second' WHERE node_id = $1`, node); err != nil {
		t.Fatal(err)
	}
	if err := f.agent(tok, prefixSystem(t)).Enroll(t.Context()); err == nil || !strings.Contains(err.Error(), "401") {
		t.Fatalf("expired token: %v; want 401", err)
	}
	var certs int
	if err := f.pool.QueryRow(f.ctx, `SELECT count(*) FROM node_certificates WHERE node_id = $1`, node).Scan(&certs); err != nil || certs != 0 {
		t.Fatalf("an expired token got %d certificates (%v)", certs, err)
	}
}

// Without a client certificate the TLS handshake fails, unless the
// connection asks to enroll; on such a connection every other call is
// refused before it reaches a node's data.
func TestNoClientCertificate(t *testing.T) {
	f := newFixture(t, agents.Settings{})
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(f.coreCA)
	plain := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS13}}}
	resp, err := plain.Get(f.url + "/agent/v1/tasks?wait=0s")
	if err == nil {
		resp.Body.Close()
		t.Fatalf("a connection without a client certificate got %d; want a failed TLS handshake", resp.StatusCode)
	}
	if !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("without a client certificate: %v; want the handshake refusing it", err)
	}
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS13,
		NextProtos: []string{protocol.EnrollALPN, "http/1.1"}}}}
	for _, call := range []struct{ method, path string }{
		{"GET", "/agent/v1/tasks?wait=0s"},
		{"POST", "/agent/v1/heartbeat"},
		{"POST", "/agent/v1/renew"},
		{"POST", "/agent/v1/tasks/01a22186-2ad2-7170-b045-26e4ee800e3e/result"},
	} {
		req, _ := http.NewRequest(call.method, f.url+call.path, strings.NewReader(`{}`))
		resp, err := c.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", call.method, call.path, err)
		}
		resp.Body.Close()
		if resp.StatusCode != 401 {
			t.Errorf("%s %s on an enrollment connection: %d; want 401", call.method, call.path, resp.StatusCode)
		}
	}
}

// Node A's certificate never receives node B's tasks: A's polls come back
// empty while B's task stays queued for B.
func TestPollLeaksNoOtherNodesTasks(t *testing.T) {
	f := newFixture(t, agents.Settings{})
	_, tokA := f.node()
	nodeB, _ := f.node()
	a := f.agent(tokA, prefixSystem(t))
	if err := a.Enroll(t.Context()); err != nil {
		t.Fatal(err)
	}
	tk, err := f.svc.Enqueue(f.ctx, agents.TaskRequest{NodeID: nodeB, Type: protocol.TaskInventory, Params: map[string]any{}})
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if err := a.Poll(t.Context()); err != nil {
			t.Fatal(err)
		}
	}
	if got, _ := f.svc.Task(f.ctx, tk.ID); got.State != "queued" || got.Attempts != 0 {
		t.Fatalf("node B's task after node A polled: %s, %d attempts; want queued, untouched", got.State, got.Attempts)
	}
}

// After a rotation and agents.min_task_key_version raised, a task signed
// with the old version is refused by the agent (and runs nothing), the
// agent no longer holds the old key, and new tasks run.
func TestRetiredTaskKeyVersion(t *testing.T) {
	var minV atomic.Int64
	f := newFixture(t, agents.Settings{HeartbeatInterval: 100 * time.Millisecond,
		MinTaskKeyVersion: func(context.Context) int { return int(minV.Load()) }})
	node, tok := f.node()
	sys := prefixSystem(t)
	a := f.agent(tok, sys)
	if err := a.Enroll(t.Context()); err != nil {
		t.Fatal(err)
	}
	old, err := f.svc.Enqueue(f.ctx, agents.TaskRequest{NodeID: node, Type: protocol.TaskProvisionUser,
		Params: tasks.ProvisionUserParams{AllocationID: "a1", Username: "mallory", UID: 2701, SSHPublicKeys: []string{sshKey(t)}}})
	if err != nil {
		t.Fatal(err)
	}
	v2, err := f.ca.Rotate(f.ctx, agents.TaskKey)
	if err != nil {
		t.Fatal(err)
	}
	minV.Store(int64(v2))
	keys, err := f.svc.TaskKeys(f.ctx)
	if err != nil || len(keys) != 1 || keys[v2] == nil {
		t.Fatalf("task keys after retiring the old version: %v (%v); want only version %d", keys, err, v2)
	}
	if err := a.Heartbeat(t.Context()); err != nil { // the agent learns the minimum
		t.Fatal(err)
	}
	if err := a.Poll(t.Context()); err != nil {
		t.Fatal(err)
	}
	refused := f.taskState(old.ID, "failed", 10*time.Second)
	if !strings.Contains(refused.Error, "retired") {
		t.Fatalf("task of a retired key version: %q; want a refusal naming the retired key", refused.Error)
	}
	if _, err := os.Stat(filepath.Join(sys.Prefix, "home/mallory")); !os.IsNotExist(err) {
		t.Fatalf("the refused task ran: %v", err)
	}
	fresh, err := f.svc.Enqueue(f.ctx, agents.TaskRequest{NodeID: node, Type: protocol.TaskInventory, Params: map[string]any{}})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Poll(t.Context()); err != nil {
		t.Fatal(err)
	}
	f.taskState(fresh.ID, "succeeded", 10*time.Second)

	// Raising the minimum past the latest version stops the queue with a
	// clear error instead of queuing tasks no agent accepts.
	minV.Store(int64(v2 + 1))
	if _, err := f.svc.Enqueue(f.ctx, agents.TaskRequest{NodeID: node, Type: protocol.TaskInventory, Params: map[string]any{}}); err == nil ||
		!strings.Contains(err.Error(), "min_task_key_version") {
		t.Fatalf("enqueue with every version retired: %v", err)
	}
}

// RotateTaskKey adds a version that signs every task from then on, and
// audits it. An agent that has not heartbeated since (it knows only the old
// version) fetches the new key when the first task signed with it arrives,
// instead of refusing the task; old versions keep verifying.
func TestRotateTaskKey(t *testing.T) {
	f := newFixture(t, agents.Settings{HeartbeatInterval: time.Hour})
	node, tok := f.node()
	sys := prefixSystem(t)
	a := f.agent(tok, sys)
	if err := a.Enroll(t.Context()); err != nil {
		t.Fatal(err)
	}
	before, err := f.svc.TaskKeyVersions(f.ctx)
	if err != nil || len(before.Versions) != 1 || before.Latest != before.Versions[0] {
		t.Fatalf("versions before: %+v (%v)", before, err)
	}
	after, err := f.svc.RotateTaskKey(f.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if after.Latest != before.Latest+1 || len(after.Versions) != 2 || after.Min != 0 {
		t.Fatalf("versions after a rotation: %+v; want %d then %d", after, before.Latest, before.Latest+1)
	}
	var details map[string]any
	if err := f.pool.QueryRow(f.ctx, `SELECT details FROM audit_log WHERE action = 'agent.task_key.rotate'`).Scan(&details); err != nil ||
		details["key_version"] != float64(after.Latest) {
		t.Fatalf("rotation audit %v (%v)", details, err)
	}
	tk, err := f.svc.Enqueue(f.ctx, agents.TaskRequest{NodeID: node, Type: protocol.TaskInventory, Params: map[string]any{}})
	if err != nil {
		t.Fatal(err)
	}
	var signedWith int
	if err := f.pool.QueryRow(f.ctx, `SELECT key_version FROM node_tasks WHERE id = $1`, tk.ID).Scan(&signedWith); err != nil || signedWith != after.Latest {
		t.Fatalf("a task after the rotation is signed with version %d (%v); want %d", signedWith, err, after.Latest)
	}
	if err := a.Poll(t.Context()); err != nil {
		t.Fatal(err)
	}
	f.taskState(tk.ID, "succeeded", 10*time.Second)
}
