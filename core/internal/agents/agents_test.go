package agents_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/crypto/ssh"

	"github.com/gpuaas/gpuaas/agent/protocol"
	"github.com/gpuaas/gpuaas/agent/runtime"
	"github.com/gpuaas/gpuaas/agent/tasks"
	"github.com/gpuaas/gpuaas/core/internal/agents"
	"github.com/gpuaas/gpuaas/core/internal/pki"
	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
)

// serverCert is a self-signed certificate for the agent listener.
func serverCert(t *testing.T) (tls.Certificate, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "gpuaas core"}, NotBefore: time.Now().Add(-time.Minute),
		NotAfter: time.Now().Add(time.Hour), IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, BasicConstraintsValid: true, IsCA: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kd, _ := x509.MarshalECPrivateKey(key)
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	pair, err := tls.X509KeyPair(certPEM, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kd}))
	if err != nil {
		t.Fatal(err)
	}
	return pair, certPEM
}

type fixture struct {
	t      *testing.T
	pool   *pgxpool.Pool
	svc    *agents.Service
	ca     *pki.Local
	url    string
	coreCA []byte
	ctx    context.Context
}

func newFixture(t *testing.T, set agents.Settings) *fixture {
	t.Helper()
	pool, _ := testenv.MigratedPool(t)
	local, err := pki.NewLocal(filepath.Join(t.TempDir(), "pki"))
	if err != nil {
		t.Fatal(err)
	}
	ctx := principal.With(t.Context(), principal.SystemPrincipal("test"))
	svc := agents.NewService(pool, local, local, "local", set, testenv.Logger(t))
	runCtx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go svc.Run(runCtx)
	chain, err := local.CAChain(ctx)
	if err != nil {
		t.Fatal(err)
	}
	cert, certPEM := serverCert(t)
	cfg, err := agents.TLSConfig(cert, chain)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(svc.Handler(pki.NewRevocationChecker(local, pki.WithMaxAge(200*time.Millisecond))))
	srv.TLS = cfg
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return &fixture{t: t, pool: pool, svc: svc, ca: local, url: srv.URL, coreCA: certPEM, ctx: ctx}
}

// node adds a node to the inventory and mints its enrollment token.
func (f *fixture) node() (uuid.UUID, string) {
	f.t.Helper()
	id := uuid.Must(uuid.NewV7())
	if _, err := f.pool.Exec(f.ctx, `INSERT INTO nodes (id, provisioner_instance, external_id, state) VALUES ($1, 'manual', $2, 'enrolling')`, id, id.String()); err != nil {
		f.t.Fatal(err)
	}
	tok, _, err := f.svc.MintToken(f.ctx, id, time.Minute)
	if err != nil {
		f.t.Fatal(err)
	}
	return id, tok
}

func (f *fixture) agent(token string, sys *tasks.System) *runtime.Agent {
	f.t.Helper()
	a, err := runtime.New(runtime.Config{CoreURL: f.url, CoreCA: f.coreCA, StateDir: filepath.Join(f.t.TempDir(), "agent"), Token: token,
		PollWait: 2 * time.Second, System: sys, Log: testenv.Logger(f.t)})
	if err != nil {
		f.t.Fatal(err)
	}
	return a
}

func (f *fixture) taskState(id uuid.UUID, want string, within time.Duration) *agents.Task {
	f.t.Helper()
	deadline := time.Now().Add(within)
	for {
		tk, err := f.svc.Task(f.ctx, id)
		if err != nil {
			f.t.Fatal(err)
		}
		if tk.State == want {
			return tk
		}
		if time.Now().After(deadline) {
			f.t.Fatalf("task %s is %s (%s); want %s", id, tk.State, tk.Error, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func prefixSystem(t *testing.T) *tasks.System {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("the agent's tasks manage accounts: run as root")
	}
	p := t.TempDir()
	for _, d := range []string{"etc", "home"} {
		if err := os.MkdirAll(filepath.Join(p, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range []string{"passwd", "group", "shadow", "gshadow", "login.defs"} {
		b, _ := os.ReadFile("/etc/" + name)
		if err := os.WriteFile(filepath.Join(p, "etc", name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return &tasks.System{Prefix: p}
}

func sshKey(t *testing.T) string {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := ssh.NewPublicKey(&k.PublicKey)
	return strings.TrimSpace(string(ssh.MarshalAuthorizedKey(pub)))
}

// Enrollment, heartbeats, a task reaching its waiting agent at once, signed
// task verification, and node binding, against a real agent over mTLS.
func TestAgentEndToEnd(t *testing.T) {
	f := newFixture(t, agents.Settings{CertTTL: time.Hour, HeartbeatInterval: 200 * time.Millisecond})
	nodeA, tokA := f.node()
	sys := prefixSystem(t)
	a := f.agent(tokA, sys)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()

	// The token works once.
	deadline := time.Now().Add(10 * time.Second)
	for a.NodeID() == "" && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if a.NodeID() != nodeA.String() {
		t.Fatalf("agent enrolled as %q; want %s", a.NodeID(), nodeA)
	}
	again := f.agent(tokA, sys)
	if err := again.Enroll(t.Context()); err == nil || !strings.Contains(err.Error(), "401") {
		t.Fatalf("second use of a token: %v; want 401", err)
	}
	// Heartbeats record facts.
	var facts []byte
	for time.Now().Before(deadline) {
		_ = f.pool.QueryRow(f.ctx, `SELECT agent_facts FROM nodes WHERE id = $1`, nodeA).Scan(&facts)
		if facts != nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !strings.Contains(string(facts), `"cpu_cores"`) {
		t.Fatalf("no facts from heartbeats: %s", facts)
	}

	// A task reaches the waiting agent at once and its result comes back.
	time.Sleep(300 * time.Millisecond) // the agent is in its long poll
	start := time.Now()
	tk, err := f.svc.Enqueue(f.ctx, agents.TaskRequest{NodeID: nodeA, Type: protocol.TaskProvisionUser, OperationID: "provision-a1",
		Params: tasks.ProvisionUserParams{AllocationID: "a1", Username: "alice", UID: 2601, SSHPublicKeys: []string{sshKey(t)}}})
	if err != nil {
		t.Fatal(err)
	}
	got := f.taskState(tk.ID, "succeeded", 10*time.Second)
	t.Logf("enqueue → result accepted in %s", time.Since(start))
	if !strings.Contains(string(got.Output), `"uid": 2601`) && !strings.Contains(string(got.Output), `"uid":2601`) {
		t.Fatalf("task output: %s", got.Output)
	}
	if _, err := os.Stat(filepath.Join(sys.Prefix, "home/alice/.ssh/authorized_keys")); err != nil {
		t.Fatalf("the task did not run: %v", err)
	}
	// The same operation id is the same task.
	if dup, err := f.svc.Enqueue(f.ctx, agents.TaskRequest{NodeID: nodeA, Type: protocol.TaskProvisionUser, OperationID: "provision-a1",
		Params: tasks.ProvisionUserParams{AllocationID: "a1", Username: "alice", UID: 2601}}); err != nil || dup.ID != tk.ID {
		t.Fatalf("re-enqueue: %v %v", dup, err)
	}

	// A task whose parameters were changed after signing is refused by the
	// agent, and runs nothing.
	// (an attacker with write access to the database, without the KMS key,
	// copies the signature of a harmless task onto a harmful one)
	var sig []byte
	var version int
	if err := f.pool.QueryRow(f.ctx, `SELECT signature, key_version FROM node_tasks WHERE id = $1`, tk.ID).Scan(&sig, &version); err != nil {
		t.Fatal(err)
	}
	badID := uuid.Must(uuid.NewV7())
	if _, err := f.pool.Exec(f.ctx, `INSERT INTO node_tasks (id, node_id, type, params, state, nonce, key_version, signature, expires_at, max_attempts)
		VALUES ($1, $2, 'allocation.revoke_user', '{"allocation_id":"a1","username":"alice"}', 'queued', 'forged', $3, $4, now() + interval '10 minutes', 1)`,
		badID, nodeA, version, sig); err != nil {
		t.Fatal(err)
	}
	refused := f.taskState(badID, "failed", 10*time.Second)
	if !strings.Contains(refused.Error, "signature") {
		t.Fatalf("tampered task: %q; want a signature refusal", refused.Error)
	}
	if _, err := os.Stat(filepath.Join(sys.Prefix, "home/alice")); err != nil {
		t.Fatal("a tampered task removed the user")
	}

	// Node B's agent cannot see or answer node A's tasks.
	nodeB, tokB := f.node()
	b := f.agent(tokB, prefixSystem(t))
	if err := b.Enroll(t.Context()); err != nil {
		t.Fatal(err)
	}
	if b.NodeID() != nodeB.String() {
		t.Fatalf("agent B enrolled as %s", b.NodeID())
	}
	other, err := f.svc.Enqueue(f.ctx, agents.TaskRequest{NodeID: nodeA, Type: protocol.TaskInventory, Params: map[string]any{}})
	if err != nil {
		t.Fatal(err)
	}
	f.taskState(other.ID, "succeeded", 10*time.Second)
	if _, err := f.svc.Complete(f.ctx, nodeB, other.ID, protocol.Result{Outcome: protocol.ResultFailed}); err == nil {
		t.Fatal("node B completed node A's task")
	}
	cancel()
	<-done
}

// A revoked certificate is refused within the revocation cache's age; a
// short-lived certificate is renewed before it expires with no failed call.
func TestAgentRevocationAndRenewal(t *testing.T) {
	f := newFixture(t, agents.Settings{CertTTL: 3 * time.Second, HeartbeatInterval: 100 * time.Millisecond})
	node, tok := f.node()
	a := f.agent(tok, prefixSystem(t))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = a.Run(ctx) }()
	// Across more than two lifetimes of the certificate, every heartbeat works.
	time.Sleep(7 * time.Second)
	var serials int
	_ = f.pool.QueryRow(f.ctx, `SELECT count(*) FROM node_certificates WHERE node_id = $1`, node).Scan(&serials)
	if serials < 3 {
		t.Fatalf("%d certificates issued in 7 s of 3 s certificates; want renewals", serials)
	}
	var last time.Time
	_ = f.pool.QueryRow(f.ctx, `SELECT heartbeat_at FROM nodes WHERE id = $1`, node).Scan(&last)
	if time.Since(last) > time.Second {
		t.Fatalf("heartbeats stopped (last %s ago)", time.Since(last))
	}
	// Revoke: heartbeats stop being accepted.
	if n, err := f.svc.RevokeNode(f.ctx, node); err != nil || n == 0 {
		t.Fatalf("revoke: %d %v", n, err)
	}
	time.Sleep(time.Second)
	_ = f.pool.QueryRow(f.ctx, `SELECT heartbeat_at FROM nodes WHERE id = $1`, node).Scan(&last)
	time.Sleep(500 * time.Millisecond)
	var after time.Time
	_ = f.pool.QueryRow(f.ctx, `SELECT heartbeat_at FROM nodes WHERE id = $1`, node).Scan(&after)
	if !after.Equal(last) {
		t.Fatalf("a revoked certificate still heartbeats (%s → %s)", last, after)
	}
	cancel()
}

// A node whose agent goes silent goes offline; heartbeats bring it back.
func TestSilentNodeGoesOffline(t *testing.T) {
	f := newFixture(t, agents.Settings{CertTTL: time.Hour, HeartbeatInterval: 100 * time.Millisecond, MissedHeartbeats: 3})
	node, tok := f.node()
	if _, err := f.pool.Exec(f.ctx, `INSERT INTO skus (id, gpu_model, gpus_per_node, cpu_cores, memory_gib, disk_gib, price_per_gpu_hour_minor, currency) VALUES ('sx', 'G', 1, 1, 1, 1, 1, 'USD') ON CONFLICT DO NOTHING`); err != nil {
		t.Fatal(err)
	}
	if _, err := f.pool.Exec(f.ctx, `UPDATE nodes SET sku_id = 'sx', state = 'available' WHERE id = $1`, node); err != nil {
		t.Fatal(err)
	}
	a := f.agent(tok, prefixSystem(t))
	ctx, cancel := context.WithCancel(context.Background())
	go func() { _ = a.Run(ctx) }()
	state := func() string {
		var s string
		_ = f.pool.QueryRow(f.ctx, `SELECT state FROM nodes WHERE id = $1`, node).Scan(&s)
		return s
	}
	time.Sleep(500 * time.Millisecond)
	cancel() // the agent stops
	deadline := time.Now().Add(5 * time.Second)
	for state() != "offline" {
		if time.Now().After(deadline) {
			t.Fatalf("silent node is %s", state())
		}
		time.Sleep(50 * time.Millisecond)
	}
	hb, err := f.svc.Heartbeat(f.ctx, node, protocol.Facts{Hostname: "n"})
	if err != nil || state() != "available" {
		t.Fatalf("heartbeat after silence: %v, state %s", err, state())
	}
	b, _ := json.Marshal(hb)
	if !strings.Contains(string(b), "task_keys") {
		t.Fatalf("heartbeat reply: %s", b)
	}
}

// The secret a provisioner driver's Enroll returned (the inventory keeps its
// hash) enrolls the node's agent once.
func TestEnrollWithDriverSecret(t *testing.T) {
	f := newFixture(t, agents.Settings{})
	id := uuid.Must(uuid.NewV7())
	secret := "driver-secret-" + uuid.NewString()
	if _, err := f.pool.Exec(f.ctx, `INSERT INTO nodes (id, provisioner_instance, external_id, state, enrollment_secret_sha256)
		VALUES ($1, 'manual', 'host-1', 'enrolling', sha256(convert_to($2, 'UTF8')))`, id, secret); err != nil {
		t.Fatal(err)
	}
	a := f.agent(secret, prefixSystem(t))
	if err := a.Enroll(t.Context()); err != nil || a.NodeID() != id.String() {
		t.Fatalf("enroll with the driver's secret: %v (node %q)", err, a.NodeID())
	}
	if err := f.agent(secret, prefixSystem(t)).Enroll(t.Context()); err == nil {
		t.Fatal("the driver's secret enrolled twice")
	}
	if err := f.agent("short", prefixSystem(t)).Enroll(t.Context()); err == nil || !strings.Contains(err.Error(), "401") {
		t.Fatalf("a short token: %v; want 401", err)
	}
}

// A retired node's agent is out: a token minted before the retirement does
// not enroll (even one the retirement did not expire), and its certificate,
// revoked with the retirement, is refused as unauthenticated.
func TestRetiredNodeAgent(t *testing.T) {
	f := newFixture(t, agents.Settings{})
	node, tok := f.node()
	a := f.agent(tok, prefixSystem(t))
	if err := a.Enroll(t.Context()); err != nil {
		t.Fatalf("enroll: %v", err)
	}
	if err := a.Heartbeat(t.Context()); err != nil {
		t.Fatalf("heartbeat: %v", err)
	}
	spare, _, err := f.svc.MintToken(f.ctx, node, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	// What inventory.Service.Retire does to the node's row, minus the
	// tokens: the spare token stays unexpired.
	if _, err := f.pool.Exec(f.ctx, `UPDATE nodes SET state = 'retired', agent_revoked_at = clock_timestamp() WHERE id = $1`, node); err != nil {
		t.Fatal(err)
	}
	var se *runtime.StatusError
	if err := f.agent(spare, prefixSystem(t)).Enroll(t.Context()); !errors.As(err, &se) || se.Status != 401 {
		t.Fatalf("enroll with a token of a retired node: %v; want 401", err)
	}
	var used bool
	if err := f.pool.QueryRow(f.ctx, `SELECT used_at IS NOT NULL FROM node_enrollment_tokens WHERE node_id = $1 AND created_at = (SELECT max(created_at) FROM node_enrollment_tokens WHERE node_id = $1)`, node).Scan(&used); err != nil || used {
		t.Fatalf("the refused token was consumed (%v)", err)
	}
	var certs int
	if err := f.pool.QueryRow(f.ctx, `SELECT count(*) FROM node_certificates WHERE node_id = $1`, node).Scan(&certs); err != nil || certs != 1 {
		t.Fatalf("%d certificates for the node (%v); want only the first agent's", certs, err)
	}
	for name, call := range map[string]func(context.Context) error{"heartbeat": a.Heartbeat, "poll": a.Poll} {
		if err := call(t.Context()); !errors.As(err, &se) || se.Status != 401 {
			t.Fatalf("%s with the revoked certificate of a retired node: %v; want 401", name, err)
		}
	}
	// The running agent stops at the first 401 instead of retrying for
	// ever, and sets its certificate aside: a restart enrolls anew.
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	if err := a.Run(ctx); !errors.Is(err, runtime.ErrRevoked) || ctx.Err() != nil {
		t.Fatalf("Run with a revoked certificate: %v (context: %v); want ErrRevoked at once", err, ctx.Err())
	}
	dir := a.StateDir()
	for name, want := range map[string]bool{"agent.crt": false, "agent.key": false, "agent.crt.revoked": true, "agent.key.revoked": true} {
		if _, err := os.Stat(filepath.Join(dir, name)); (err == nil) != want {
			t.Fatalf("%s exists: %t; want %t", name, err == nil, want)
		}
	}
	// Restarted with the spare token, which the retirement did not expire:
	// it tries to enroll (and is refused, the node being retired) rather
	// than reuse the revoked certificate.
	again, err := runtime.New(runtime.Config{CoreURL: f.url, CoreCA: f.coreCA, StateDir: dir, Token: spare, PollWait: time.Second,
		System: prefixSystem(t), Log: testenv.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := again.Run(ctx); !errors.As(err, &se) || se.Status != 401 || !strings.Contains(err.Error(), "enroll") {
		t.Fatalf("restart after revocation: %v; want a refused enrollment", err)
	}
}
