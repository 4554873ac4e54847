package manual_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"fmt"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	nomad "github.com/hashicorp/nomad/api"
	"golang.org/x/crypto/ssh"

	"github.com/gpuaas/gpuaas/plugins/manual"
	"github.com/gpuaas/gpuaas/plugins/manual/nomadsim"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
)

// The tests run the driver against a fake core task API (fakecore_test.go)
// and the Nomad API double (nomadsim), both on loopback. With NOMAD_ADDR set
// (and NOMAD_TOKEN, NOMAD_NAMESPACE, NOMAD_REGION, NOMAD_DATACENTERS as the
// cluster needs) the Nomad side runs against that Nomad instead: jobs are
// pinned to node names the cluster does not have, so they are registered
// and read but never run anything, and are purged when the test ends. Tests
// that need the double's controls (faults, failed allocations, start
// delays, ACL variants) skip there.

const (
	instance = "manual-test"
	agentURL = "https://agents.gpuaas.test:8443"
	sshKey   = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@laptop"
)

type harness struct {
	core *fakeCore
	sim  *nomadsim.Server // nil against a real Nomad
	// Nomad the driver is configured with.
	nomadAddr, nomadToken, nomadNamespace, nomadRegion string
	nomadDatacenters                                   []string
	// nodes are registered in the fake core, live, with a unique prefix.
	nodes []string
}

type setupOpts struct {
	nomadOpts []nomadsim.Option
	noNomad   bool
}

// setup starts a fake core with two live nodes, and the Nomad double (or
// uses the real Nomad from the environment).
func setup(t testing.TB, opts ...func(*setupOpts)) *harness {
	t.Helper()
	var o setupOpts
	for _, f := range opts {
		f(&o)
	}
	h := &harness{core: newFakeCore(t)}
	prefix := fmt.Sprintf("gpu-%x", time.Now().UnixNano()&0xffffffff)
	for i := range 2 {
		id := fmt.Sprintf("%s-%d", prefix, i)
		h.core.addNode(instance, id)
		h.nodes = append(h.nodes, id)
	}
	switch {
	case o.noNomad:
	case os.Getenv("NOMAD_ADDR") != "":
		h.nomadAddr, h.nomadToken = os.Getenv("NOMAD_ADDR"), os.Getenv("NOMAD_TOKEN")
		h.nomadNamespace, h.nomadRegion = os.Getenv("NOMAD_NAMESPACE"), os.Getenv("NOMAD_REGION")
		h.nomadDatacenters = []string{"*"}
		if dcs := os.Getenv("NOMAD_DATACENTERS"); dcs != "" {
			h.nomadDatacenters = strings.Split(dcs, ",")
		}
		if h.nomadNamespace == "" {
			h.nomadNamespace = "default"
		}
		t.Cleanup(func() { h.purgeJobs(t) })
	default:
		h.sim = nomadsim.New(append([]nomadsim.Option{nomadsim.WithStartDelay(30 * time.Millisecond)}, o.nomadOpts...)...)
		srv := httptest.NewServer(h.sim)
		t.Cleanup(srv.Close)
		h.nomadAddr, h.nomadNamespace, h.nomadDatacenters = srv.URL, "default", []string{"dc1"}
	}
	return h
}

func withoutNomad(o *setupOpts) { o.noNomad = true }

func withNomad(opts ...nomadsim.Option) func(*setupOpts) {
	return func(o *setupOpts) { o.nomadOpts = append(o.nomadOpts, opts...) }
}

// needSim skips a test that needs the Nomad double's controls.
func (h *harness) needSim(t testing.TB) {
	t.Helper()
	if h.sim == nil {
		t.Skip("needs the Nomad double's controls; running against a real Nomad")
	}
}

// nomadClient is an operator's client of the Nomad under test.
func (h *harness) nomadClient(t testing.TB) *nomad.Client {
	t.Helper()
	cl, err := nomad.NewClient(&nomad.Config{Address: h.nomadAddr, SecretID: h.nomadToken, Namespace: h.nomadNamespace, Region: h.nomadRegion})
	if err != nil {
		t.Fatal(err)
	}
	return cl
}

// purgeJobs removes the agent jobs of the test's nodes from a real Nomad.
func (h *harness) purgeJobs(t testing.TB) {
	cl := h.nomadClient(t)
	for _, n := range append(h.nodes, h.extraNodes()...) {
		_, _, _ = cl.Jobs().Deregister("gpuaas-agent-"+n, true, nil)
	}
}

func (h *harness) extraNodes() []string {
	var out []string
	for _, n := range h.nodes {
		out = append(out, n+"-x")
	}
	return out
}

// config is a valid configuration; overrides replace fields (nil deletes).
func (h *harness) config(overrides map[string]any) map[string]any {
	cfg := map[string]any{
		"core_url":     h.core.URL(),
		"api_key":      h.core.apiKey,
		"agent_url":    agentURL,
		"scratch_dirs": []any{"/scratch", "/tmp/gpuaas"},
	}
	if h.nomadAddr != "" {
		cfg["nomad_addr"] = h.nomadAddr
		cfg["nomad_namespace"] = h.nomadNamespace
		dcs := make([]any, len(h.nomadDatacenters))
		for i, dc := range h.nomadDatacenters {
			dcs[i] = dc
		}
		cfg["nomad_datacenters"] = dcs
		if h.nomadToken != "" {
			cfg["nomad_token"] = h.nomadToken
		}
		if h.nomadRegion != "" {
			cfg["nomad_region"] = h.nomadRegion
		}
	}
	for k, v := range overrides {
		if v == nil {
			delete(cfg, k)
			continue
		}
		cfg[k] = v
	}
	return cfg
}

func testCtx(t testing.TB) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// configure validates raw against the schema, as the core does, and
// configures d.
func configure(t testing.TB, d *manual.Driver, raw map[string]any) error {
	t.Helper()
	ctx := testCtx(t)
	schema, err := d.ConfigSchema(ctx)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := base.ValidateConfig(schema, raw)
	if err != nil {
		return err
	}
	cfg.APIVersion = provisioner.APIVersion1
	cfg.Instance = instance
	return d.Configure(ctx, cfg)
}

// syncBuffer is a log sink safe for concurrent writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// driver returns a driver configured for h; its JSON log goes to logs when
// given.
func (h *harness) driver(t testing.TB, overrides map[string]any, logs ...*syncBuffer) *manual.Driver {
	t.Helper()
	logger := hclog.NewNullLogger()
	if len(logs) > 0 {
		logger = hclog.New(&hclog.LoggerOptions{Output: logs[0], JSONFormat: true, Level: hclog.Trace})
	}
	d := manual.New(logger)
	if err := configure(t, d, h.config(overrides)); err != nil {
		t.Fatalf("Configure: %v", err)
	}
	return d
}

// wait polls Status until the operation ends and returns it and the states
// seen.
func wait(t testing.TB, d *manual.Driver, opID string) (*provisioner.Operation, []provisioner.OperationState) {
	t.Helper()
	ctx := testCtx(t)
	var seen []provisioner.OperationState
	for deadline := time.Now().Add(20 * time.Second); ; {
		op, err := d.Status(ctx, opID)
		if err != nil {
			t.Fatalf("Status(%s): %v", opID, err)
		}
		if len(seen) == 0 || seen[len(seen)-1] != op.State {
			seen = append(seen, op.State)
		}
		if op.State.Terminal() {
			return op, seen
		}
		if time.Now().After(deadline) {
			t.Fatalf("operation %s still %s (%s)", opID, op.State, op.Message)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// newKey returns a fresh authorized_keys line.
func newKey(t testing.TB, comment string) string {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := ssh.NewPublicKey(&k.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(ssh.MarshalAuthorizedKey(pub))) + " " + comment
}

func provisionReq(opID, node string) *provisioner.ProvisionRequest {
	return &provisioner.ProvisionRequest{
		OperationID:   opID,
		NodeID:        node,
		AllocationID:  "alloc-" + opID,
		User:          provisioner.TenantUser{Username: "alice", UID: 2001, OrgID: "org-1", ProjectID: "proj-1"},
		SSHPublicKeys: []string{sshKey},
	}
}

func opID(t testing.TB, what string) string {
	return fmt.Sprintf("%s-%s-%d", strings.ReplaceAll(t.Name(), "/", "-"), what, time.Now().UnixNano())
}
