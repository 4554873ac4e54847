package daemon_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"maps"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"golang.org/x/crypto/ssh"

	"github.com/gpuaas/gpuaas/agent/runtime"
	"github.com/gpuaas/gpuaas/agent/tasks"
	"github.com/gpuaas/gpuaas/core/internal/pki"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
	"github.com/gpuaas/gpuaas/internal/sshdtest"
	"github.com/gpuaas/gpuaas/plugins/manual"
	"github.com/gpuaas/gpuaas/plugins/manual/nomadsim"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
)

// A hand-managed host end to end, with nothing faked but Nomad: the manual
// driver (configured with a platform admin's key, reaching the core's driver
// task API over HTTP) enrolls the node and registers the agent's Nomad job;
// a real gpuaas-agent enrolls with the secret from that job, which makes the
// node available and installs the core's SSH CA for sshd; an allocation
// creates the tenant account with real useradd through a signed task; a real
// sshd lets the tenant in with their own key and with a certificate of the
// core's SSH CA; the release revokes the account, wipes scratch and returns the
// node to the pool.
func TestManualNodeEndToEnd(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test creates a real account on this machine: run it as root")
	}
	m := newManualEnv(t, map[string]any{"scratch_dirs": []string{"/srv/scratch"}})
	p, state, agentAddr, coreCA, nomad := m.provEnv, m.state, m.agentAddr, m.coreCA, m.nomad
	ctx := t.Context()

	// The tenant holds this key's private half.
	_, tenantPriv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tenantKey, err := ssh.NewSignerFromKey(tenantPriv)
	if err != nil {
		t.Fatal(err)
	}
	if r := p.call("POST", "/api/v1/ssh-keys", p.user, map[string]any{"name": "workstation",
		"public_key": strings.TrimSpace(string(ssh.MarshalAuthorizedKey(tenantKey.PublicKey())))}); r.status != 201 {
		t.Fatalf("add ssh key: %d %s", r.status, r.body)
	}

	// Register: the node waits for its agent.
	r := p.call("POST", "/api/v1/admin/nodes", p.admin, map[string]any{"provisioner_instance": "manual-a", "external_id": "127.0.0.1", "tags": []string{"sku:l40s"}})
	if r.status != 201 {
		t.Fatalf("register: %d %s", r.status, r.body)
	}
	var node struct {
		ID          uuid.UUID `json:"id"`
		State       string    `json:"state"`
		StateReason string    `json:"state_reason"`
		SKU         string    `json:"sku_id"`
	}
	r.json(t, &node)
	if node.State != "enrolling" || node.SKU != "l40s" || !strings.Contains(node.StateReason, "agent") {
		t.Fatalf("registered node: %s; want enrolling for its agent, SKU l40s", r.body)
	}
	if r, list := p.create(p.user, map[string]any{"sku_id": "l40s"}); r.status != 409 || r.code() != "no_capacity" {
		t.Fatalf("allocation before the agent enrolled: %d %s (%v); want 409 no_capacity", r.status, r.body, list)
	}

	// The agent job the driver registered carries the enrollment secret.
	job, ok := nomad.Job("default", "gpuaas-agent-127.0.0.1")
	if !ok || len(job.TaskGroups) != 1 || len(job.TaskGroups[0].Tasks) != 1 {
		t.Fatalf("agent job: %+v (%v)", job, ok)
	}
	secret := job.TaskGroups[0].Tasks[0].Env["GPUAAS_ENROLL_TOKEN"]
	if secret == "" {
		t.Fatalf("the agent job has no enrollment secret: %+v", job.TaskGroups[0].Tasks[0].Env)
	}

	// The agent, as Nomad would start it, with this machine as the node.
	root := t.TempDir()
	for _, d := range []string{filepath.Dir(root), root} {
		if err := os.Chmod(d, 0o755); err != nil { // sshd reads keys and principals as the user
			t.Fatal(err)
		}
	}
	sshDir, home, scratch := filepath.Join(root, "ssh"), filepath.Join(root, "home"), filepath.Join(root, "srv", "scratch")
	for _, d := range []string{home, scratch} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(scratch, "checkpoint.bin"), []byte("tenant data"), 0o644); err != nil {
		t.Fatal(err)
	}
	sys := &tasks.System{SSHDir: sshDir, HomeBase: home, SudoersDir: filepath.Join(root, "sudoers.d"), ScratchDirs: []string{scratch},
		ReloadSSHD: func(context.Context) error { return nil }}
	agent, err := runtime.New(runtime.Config{CoreURL: "https://" + agentAddr, CoreCA: coreCA, StateDir: filepath.Join(root, "agent"),
		Token: secret, PollWait: 5 * time.Second, System: sys, Log: testenv.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	agentCtx, stopAgent := context.WithCancel(context.Background())
	agentDone := make(chan struct{})
	go func() { defer close(agentDone); _ = agent.Run(agentCtx) }()
	t.Cleanup(func() { stopAgent(); <-agentDone })
	p.awaitNode(node.ID, "available", 20*time.Second)

	// The agent installed the core's SSH CA.
	ca, err := pki.NewLocal(filepath.Join(state, "pki"))
	if err != nil {
		t.Fatal(err)
	}
	caPub, err := ca.SSHCAPublicKey(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// The node is available once the core signed; the agent installs the
	// trust right after it read the answer.
	for deadline := time.Now().Add(10 * time.Second); ; {
		got, err := os.ReadFile(filepath.Join(sshDir, "gpuaas_user_ca.pub"))
		if err == nil && strings.TrimSpace(string(got)) == strings.TrimSpace(string(caPub)) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("installed SSH CA %q (%v); want the core's %q", got, err, caPub)
		}
		time.Sleep(10 * time.Millisecond)
	}
	srv := sshdtest.Start(t, "Include "+filepath.Join(sshDir, "sshd_config.d", "*.conf"))

	// Allocate: the tenant account appears through a signed task.
	r, list := p.create(p.user, map[string]any{"sku_id": "l40s"})
	if r.status != 201 || len(list) != 1 {
		t.Fatalf("create: %d %s", r.status, r.body)
	}
	alloc := p.await(list[0].ID, "active", 30*time.Second)
	user := alloc.SSHUser
	t.Cleanup(func() { _ = exec.Command("userdel", "--force", "--remove", user).Run() })
	if alloc.SSHHost != "127.0.0.1" || user == "" {
		t.Fatalf("active allocation: host %q user %q", alloc.SSHHost, user)
	}
	whoami := func(key ssh.Signer) (string, error) {
		c, err := ssh.Dial("tcp", srv.Addr, srv.ClientConfig(user, ssh.PublicKeys(key)))
		if err != nil {
			return "", err
		}
		defer c.Close()
		s, err := c.NewSession()
		if err != nil {
			return "", err
		}
		defer s.Close()
		out, err := s.Output("id -un")
		return strings.TrimSpace(string(out)), err
	}
	if got, err := whoami(tenantKey); err != nil || got != user {
		t.Fatalf("tenant's own key: %q, %v; want %s", got, err, user)
	}
	certKey := func() ssh.Signer {
		_, priv, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		k, err := ssh.NewSignerFromKey(priv)
		if err != nil {
			t.Fatal(err)
		}
		c, err := ca.SignSSHKey(ctx, ssh.MarshalAuthorizedKey(k.PublicKey()), user, 2*time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		pub, _, _, _, err := ssh.ParseAuthorizedKey(c.Certificate)
		if err != nil {
			t.Fatal(err)
		}
		cs, err := ssh.NewCertSigner(pub.(*ssh.Certificate), k)
		if err != nil {
			t.Fatal(err)
		}
		return cs
	}
	if got, err := whoami(certKey()); err != nil || got != user {
		t.Fatalf("certificate of the core's SSH CA: %q, %v; want %s", got, err, user)
	}

	// Release: account gone, scratch wiped, node back in the pool.
	if r := p.call("POST", "/api/v1/allocations/"+alloc.ID.String()+"/release", p.user, nil); r.status != 202 && r.status != 200 {
		t.Fatalf("release: %d %s", r.status, r.body)
	}
	p.await(alloc.ID, "released", 30*time.Second)
	p.awaitNode(node.ID, "available", 20*time.Second)
	if err := exec.Command("id", user).Run(); err == nil {
		t.Fatalf("account %s still exists after the release", user)
	}
	if entries, err := os.ReadDir(scratch); err != nil || len(entries) != 0 {
		t.Fatalf("scratch after the release: %v (%v); want empty", entries, err)
	}
	if _, err := whoami(certKey()); err == nil {
		t.Fatal("a certificate still opens the released account")
	}
}

// manualEnv is a core with its agent listener and the manual driver as
// instance manual-a (configured as an operator would, with a platform
// admin's key), whose Nomad is the double.
type manualEnv struct {
	*provEnv
	state, agentAddr string
	coreCA           []byte // the agent listener's certificate
	nomad            *nomadsim.Server
}

func newManualEnv(t *testing.T, extra map[string]any) *manualEnv {
	t.Helper()
	m := &manualEnv{state: t.TempDir(), agentAddr: freePort(t)}
	m.provEnv = newProvEnv(t, provOptions{env: map[string]string{"GPUAAS_STATE_DIR": m.state, "GPUAAS_AGENT_LISTEN_ADDR": m.agentAddr}})
	var err error
	if m.coreCA, err = os.ReadFile(filepath.Join(m.state, "agents", "agent-listener.crt")); err != nil {
		t.Fatal(err)
	}
	m.nomad = nomadsim.New(nomadsim.WithStartDelay(10 * time.Millisecond))
	nomadSrv := httptest.NewServer(m.nomad)
	t.Cleanup(nomadSrv.Close)
	drv := manual.New(testenv.Logger(t))
	schema, err := drv.ConfigSchema(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	raw := map[string]any{"core_url": m.url, "api_key": m.admin, "agent_url": "https://" + m.agentAddr,
		"agent_ca_pem": string(m.coreCA), "nomad_addr": nomadSrv.URL}
	maps.Copy(raw, extra)
	cfg, err := base.ValidateConfig(schema, raw)
	if err != nil {
		t.Fatal(err)
	}
	cfg.APIVersion, cfg.Instance = provisioner.APIVersion1, "manual-a"
	if err := drv.Configure(t.Context(), cfg); err != nil {
		t.Fatal(err)
	}
	m.drivers.set("manual-a", drv)
	return m
}
