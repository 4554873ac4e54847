package maas_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	gomaas "github.com/canonical/gomaasclient/client"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/crypto/ssh"

	"github.com/gpuaas/gpuaas/plugins/maas"
	"github.com/gpuaas/gpuaas/plugins/maas/maassim"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
)

// The tests run against the MAAS simulator started in process on
// loopback. With MAAS_URL and MAAS_API_KEY set they run against that MAAS
// instead, on the Ready machines listed in MAAS_MACHINES (comma
// separated, at least two), and skip what needs the simulator's controls
// (failure injection, commissioning round trips, call counts).
// MAAS_WEBHOOK_URL is written into the installed commissioning script
// (default: an address nothing listens on).

const (
	webhookSecret = "test-webhook-secret-0123456789abcdef-xyz"
	scriptName    = "99-gpuaas-report-test"
	sshKeyAlice   = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@laptop"
)

type harness struct {
	sim      *maassim.Server // nil against a real MAAS
	url      string
	apiKey   string
	machines []string // Ready machines the tests may deploy and release
	webhook  string
	timeout  time.Duration
}

// testMachines are the simulated machines: two H100 and one L40S, Ready.
func testMachines(t testing.TB) []maassim.MachineSpec {
	t.Helper()
	var out []maassim.MachineSpec
	for _, m := range []struct {
		sku maassim.SKU
		i   int
	}{{maassim.SKUH100, 0}, {maassim.SKUH100, 1}, {maassim.SKUL40S, 0}} {
		spec, err := maassim.NewMachine(m.sku, m.i, "ready")
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, spec)
	}
	return out
}

// setup returns the MAAS to test against: a fresh simulator (opts apply),
// or the real MAAS from the environment.
func setup(t testing.TB, opts ...maassim.Option) *harness {
	t.Helper()
	if u := os.Getenv("MAAS_URL"); u != "" {
		h := &harness{url: u, apiKey: os.Getenv("MAAS_API_KEY"), webhook: os.Getenv("MAAS_WEBHOOK_URL"), timeout: 45 * time.Minute}
		for _, id := range strings.Split(os.Getenv("MAAS_MACHINES"), ",") {
			if id = strings.TrimSpace(id); id != "" {
				h.machines = append(h.machines, id)
			}
		}
		if h.apiKey == "" || len(h.machines) < 2 {
			t.Fatal("MAAS_URL is set: MAAS_API_KEY and MAAS_MACHINES (two or more Ready system ids) are required too")
		}
		if h.webhook == "" {
			h.webhook = "http://127.0.0.1:9/gpuaas-test-webhook"
		}
		return h
	}
	specs := testMachines(t)
	sim, err := maassim.New(append([]maassim.Option{
		maassim.WithTiming(maassim.FastTiming().Scaled(0.25)),
		maassim.WithMachines(specs...),
	}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(sim)
	t.Cleanup(func() {
		srv.Close()
		sim.Close()
	})
	h := &harness{sim: sim, url: srv.URL + "/MAAS", apiKey: sim.APIKey(), webhook: "http://127.0.0.1:9/gpuaas-test-webhook", timeout: 30 * time.Second}
	for _, s := range specs {
		h.machines = append(h.machines, s.SystemID)
	}
	return h
}

// needSim skips a test that needs the simulator's controls.
func (h *harness) needSim(t testing.TB) {
	t.Helper()
	if h.sim == nil {
		t.Skip("needs the MAAS simulator's controls; running against a real MAAS")
	}
}

// config is a valid driver configuration for this MAAS.
func (h *harness) config(overrides map[string]any) map[string]any {
	cfg := map[string]any{
		"maas_url":       h.url,
		"api_key":        h.apiKey,
		"webhook_url":    h.webhook,
		"webhook_secret": webhookSecret,
		"script_name":    scriptName,
		"retry_backoff":  "20ms",
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
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// configure validates raw against the driver's schema, as the core does,
// and configures d.
func configure(t testing.TB, d *maas.Driver, raw map[string]any) error {
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
	cfg.Instance = "test"
	return d.Configure(ctx, cfg)
}

// driver returns a driver configured for this MAAS.
func (h *harness) driver(t testing.TB, overrides map[string]any) *maas.Driver {
	t.Helper()
	d := maas.New(hclog.NewNullLogger())
	if err := configure(t, d, h.config(overrides)); err != nil {
		t.Fatalf("Configure: %v", err)
	}
	return d
}

// client is an operator's MAAS client.
func (h *harness) client(t testing.TB) *gomaas.Client {
	t.Helper()
	cl, err := gomaas.GetClient(h.url, h.apiKey, "2.0")
	if err != nil {
		t.Fatal(err)
	}
	return cl
}

// wait polls Status until the operation ends and returns the states seen.
func (h *harness) wait(t testing.TB, d *maas.Driver, opID string) (*provisioner.Operation, []provisioner.Operation) {
	t.Helper()
	ctx := testCtx(t)
	deadline := time.Now().Add(h.timeout)
	var seen []provisioner.Operation
	for {
		op, err := d.Status(ctx, opID)
		if err != nil {
			t.Fatalf("Status(%s): %v", opID, err)
		}
		if len(seen) == 0 || seen[len(seen)-1].Message != op.Message || seen[len(seen)-1].State != op.State {
			seen = append(seen, *op)
		}
		if op.State.Terminal() {
			return op, seen
		}
		if time.Now().After(deadline) {
			t.Fatalf("operation %s still %s (%s) after %s", opID, op.State, op.Message, h.timeout)
		}
		time.Sleep(5 * time.Millisecond)
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

// provisionRequest is a provision of machine id for alice.
func provisionRequest(opID, id string) *provisioner.ProvisionRequest {
	return &provisioner.ProvisionRequest{
		OperationID:   opID,
		NodeID:        id,
		AllocationID:  "alloc-" + opID,
		User:          provisioner.TenantUser{Username: "alice", UID: 2001, OrgID: "org-1", ProjectID: "proj-1"},
		SSHPublicKeys: []string{sshKeyAlice},
		Image:         "ubuntu/jammy",
	}
}

// reportBody is a commissioning report for machine id at ts: what the
// simulated machine's script would send, or a synthetic one.
func (h *harness) reportBody(t testing.TB, id string, ts int64) []byte {
	t.Helper()
	if h.sim != nil {
		env, err := h.sim.Environment(id)
		if err != nil {
			t.Fatal(err)
		}
		return env.WebhookBody(ts)
	}
	body, err := json.Marshal(map[string]any{
		"version": 1, "event": "commissioning", "system_id": id, "hostname": "gpu-node", "timestamp": ts,
		"cpu": map[string]any{"model": "AMD EPYC 9654 96-Core Processor", "count": 192}, "memory_kib": 1610612736,
		"disks": []any{map[string]any{"name": "nvme0n1", "size_bytes": 3840755982336}},
		"gpus":  []any{map[string]any{"model": "NVIDIA H100 80GB HBM3", "memory_mib": 81559}}, "gpu_source": "nvidia-smi",
	})
	if err != nil {
		t.Fatal(err)
	}
	return body
}

// signedWebhook is a webhook as the commissioning script sends it.
func signedWebhook(secret string, ts int64, body []byte) *provisioner.Webhook {
	hdr := http.Header{}
	for k, v := range maas.SignWebhook([]byte(secret), ts, body) {
		hdr.Set(k, v)
	}
	return &provisioner.Webhook{Body: body, Header: hdr}
}

// webhookReceiver is the core's webhook endpoint in miniature: it hands
// the raw request to the driver and records the events.
type webhookReceiver struct {
	srv    *httptest.Server
	events chan []provisioner.NodeEvent
	errs   chan error
}

func newWebhookReceiver(t testing.TB, d func() *maas.Driver) *webhookReceiver {
	t.Helper()
	r := &webhookReceiver{events: make(chan []provisioner.NodeEvent, 16), errs: make(chan error, 16)}
	r.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		body, err := io.ReadAll(io.LimitReader(req.Body, 1<<20))
		if err != nil {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		evs, err := d().HandleWebhook(req.Context(), &provisioner.Webhook{Body: body, Header: req.Header.Clone()})
		if err != nil {
			r.errs <- err
			http.Error(w, err.Error(), http.StatusUnauthorized)
			return
		}
		r.events <- evs
		w.WriteHeader(http.StatusAccepted)
	}))
	t.Cleanup(r.srv.Close)
	return r
}

func (r *webhookReceiver) next(t testing.TB) []provisioner.NodeEvent {
	t.Helper()
	select {
	case evs := <-r.events:
		return evs
	case err := <-r.errs:
		t.Fatalf("webhook refused: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("no webhook arrived")
	}
	return nil
}

func opID(t testing.TB, what string) string {
	return fmt.Sprintf("%s-%s-%d", strings.ReplaceAll(t.Name(), "/", "-"), what, time.Now().UnixNano())
}
