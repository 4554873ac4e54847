package main

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/crypto/ssh"

	"github.com/gpuaas/gpuaas/core/internal/daemon/daemontest"
	"github.com/gpuaas/gpuaas/core/internal/httpapi"
	"github.com/gpuaas/gpuaas/core/internal/identity"
	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
	"github.com/gpuaas/gpuaas/plugins/maas/maassim"
	"github.com/gpuaas/gpuaas/sdk/sdktest"
)

func serve(t *testing.T, checks ...httpapi.Check) string {
	t.Helper()
	reg := prometheus.NewRegistry()
	app := httpapi.New(testenv.Logger(t), &httpapi.API{Version: "v-test", Checks: checks, Gatherer: reg}, httpapi.Options{Registerer: reg})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = app.Listener(ln) }()
	t.Cleanup(func() { _ = app.Shutdown() })
	return "http://" + ln.Addr().String()
}

func env(url string) func(string) string {
	return func(k string) string {
		if k == "GPUAAS_API_URL" {
			return url
		}
		return ""
	}
}

func TestStatus(t *testing.T) {
	ok := func(context.Context) error { return nil }
	url := serve(t, httpapi.Check{Name: "postgres", Fn: ok}, httpapi.Check{Name: "nats", Fn: ok})
	var out bytes.Buffer
	if err := run(context.Background(), []string{"status"}, env(url), &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"version v-test", "postgres  ok", "nats      ok"} {
		if !strings.Contains(out.String(), want) {
			t.Fatalf("output %q lacks %q", out.String(), want)
		}
	}
}

func TestStatusReportsFailingDependency(t *testing.T) {
	url := serve(t, httpapi.Check{Name: "postgres", Fn: func(context.Context) error { return errors.New("refused") }})
	err := run(context.Background(), []string{"status"}, env(url), io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "not_ready") || !strings.Contains(err.Error(), "postgres") {
		t.Fatalf("err = %v; want not_ready naming postgres", err)
	}
}

func TestPolicyKeys(t *testing.T) {
	var out bytes.Buffer
	if err := run(context.Background(), []string{"policy-keys"}, env(serve(t)), &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "outbox.max_attempts") || !strings.Contains(out.String(), `"24h0m0s"`) {
		t.Fatalf("output:\n%s", out.String())
	}
}

func TestUnreachableAPI(t *testing.T) {
	err := run(context.Background(), []string{"status"}, env("http://127.0.0.1:1"), io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "unreachable") {
		t.Fatalf("err = %v", err)
	}
}

// whoami and orgs talk to a real core with the token from the environment.
func TestWhoAmIAndOrgs(t *testing.T) {
	pool, db := testenv.MigratedPool(t)
	n := testenv.StartNATS(t)
	d := daemontest.Start(t, map[string]string{"DATABASE_URL": db, "NATS_URL": n.URL(), "TEMPORAL_ADDRESS": testenv.Env(t, "TEMPORAL_ADDRESS")})
	ctx := principal.With(context.Background(), principal.SystemPrincipal("test"))
	ids := identity.NewService(pool, "local", testenv.Logger(t), nil)
	u, err := ids.CreateLocalUser(ctx, "cli@example.test", "CLI", "a long enough password", false)
	if err != nil {
		t.Fatal(err)
	}
	_, tok, err := ids.CreateAPIKey(ctx, identity.KeyOwner{User: &u.ID}, "cli", nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ids.CreateOrg(principal.With(ctx, &principal.Principal{Type: principal.User, ID: u.ID}), "acme", "Acme"); err != nil {
		t.Fatal(err)
	}
	getenv := func(k string) string {
		return map[string]string{"GPUAAS_API_URL": d.URL, "GPUAAS_TOKEN": tok}[k]
	}
	var out bytes.Buffer
	if err := run(context.Background(), []string{"whoami"}, getenv, &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "cli@example.test") || !strings.Contains(out.String(), "org acme") {
		t.Fatalf("whoami:\n%s", out.String())
	}
	out.Reset()
	if err := run(context.Background(), []string{"orgs"}, getenv, &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "Acme") {
		t.Fatalf("orgs:\n%s", out.String())
	}
	// Without a token the API refuses with the envelope's message.
	noTok := func(k string) string { return map[string]string{"GPUAAS_API_URL": d.URL}[k] }
	if err := run(context.Background(), []string{"whoami"}, noTok, io.Discard, io.Discard); err == nil || !strings.Contains(err.Error(), "unauthenticated") {
		t.Fatalf("whoami without a token: %v", err)
	}
}

// gpuaas plugin install/configure/list against a real core.
func TestPluginCommands(t *testing.T) {
	pool, db := testenv.MigratedPool(t)
	n := testenv.StartNATS(t)
	d := daemontest.Start(t, map[string]string{"DATABASE_URL": db, "NATS_URL": n.URL(), "TEMPORAL_ADDRESS": testenv.Env(t, "TEMPORAL_ADDRESS")})
	ctx := principal.With(context.Background(), principal.SystemPrincipal("test"))
	ids := identity.NewService(pool, "local", testenv.Logger(t), nil)
	u, err := ids.CreateLocalUser(ctx, "op@example.test", "Operator", "a long enough password", true)
	if err != nil {
		t.Fatal(err)
	}
	_, tok, err := ids.CreateAPIKey(ctx, identity.KeyOwner{User: &u.ID}, "cli", nil)
	if err != nil {
		t.Fatal(err)
	}
	getenv := func(k string) string { return map[string]string{"GPUAAS_API_URL": d.URL, "GPUAAS_TOKEN": tok}[k] }
	dir := t.TempDir()
	bin := filepath.Join(dir, "gpuaas-plugin-instantprov")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/gpuaas/gpuaas/sdk/examples/instantprov/cmd/gpuaas-plugin-instantprov").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	var out bytes.Buffer
	if err := run(context.Background(), []string{"plugin", "install", bin}, getenv, &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "installed instantprov") {
		t.Fatalf("install printed %q", out.String())
	}
	cfg := filepath.Join(dir, "cfg.json")
	if err := os.WriteFile(cfg, []byte(`{"webhook_secret":"hush-hush-123"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	out.Reset()
	if err := run(context.Background(), []string{"plugin", "configure", "prov-a", "instantprov", cfg}, getenv, &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	out.Reset()
	if err := run(context.Background(), []string{"plugin", "list"}, getenv, &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "prov-a") || strings.Contains(out.String(), "hush-hush") {
		t.Fatalf("list:\n%s", out.String())
	}
	// Bad config: the API's error names the field.
	if err := os.WriteFile(cfg, []byte(`{"delay":"1s"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	err = run(context.Background(), []string{"plugin", "configure", "prov-b", "instantprov", cfg}, getenv, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "webhook_secret") {
		t.Fatalf("bad config: %v", err)
	}
}

func TestMoney(t *testing.T) {
	for _, tc := range []struct {
		minor    int64
		currency string
		want     string
	}{
		{249, "USD", "2.49 USD"},
		{99, "USD", "0.99 USD"},
		{5, "EUR", "0.05 EUR"},
		{0, "GBP", "0.00 GBP"},
		{100000, "USD", "1000.00 USD"},
		{-1250, "CHF", "-12.50 CHF"},
		{300, "JPY", "300 JPY"},
		{-7, "JPY", "-7 JPY"},
	} {
		t.Run(tc.want, func(t *testing.T) {
			if got := money(tc.minor, tc.currency); got != tc.want {
				t.Fatalf("money(%d, %s) = %q; want %q", tc.minor, tc.currency, got, tc.want)
			}
		})
	}
}

func TestParseFlags(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		pos  string
		wait bool
	}{
		{"flag after", []string{"id-1", "--wait"}, "id-1", true},
		{"flag before", []string{"--wait", "id-1"}, "id-1", true},
		{"no flag", []string{"id-1"}, "id-1", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fs := newFlags("alloc release")
			wait := fs.Bool("wait", false, "")
			pos, err := parseFlags(fs, tc.args)
			if err != nil || strings.Join(pos, " ") != tc.pos || *wait != tc.wait {
				t.Fatalf("parseFlags(%q) = %q, wait %v, %v", tc.args, pos, *wait, err)
			}
		})
	}
	if _, err := parseFlags(newFlags("alloc get"), []string{"--bogus"}); err == nil || !strings.Contains(err.Error(), "alloc get") {
		t.Fatalf("unknown flag: %v", err)
	}
}

// A POST whose answer is lost is sent again with the same Idempotency-Key and
// body; a request without a key is sent once.
func TestRetryingRepeatsLostPOST(t *testing.T) {
	var mu sync.Mutex
	var keys, bodies []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		keys, bodies = append(keys, r.Header.Get(idempotencyKey)), append(bodies, string(b))
		n := len(keys)
		mu.Unlock()
		switch {
		case r.Method == http.MethodGet:
			w.WriteHeader(http.StatusServiceUnavailable)
		case n == 1:
			w.WriteHeader(http.StatusBadGateway)
		case n == 2:
			w.Header().Set("Retry-After", "1") // the first try still runs
			w.WriteHeader(http.StatusConflict)
		default:
			w.WriteHeader(http.StatusCreated)
		}
	}))
	defer srv.Close()
	r := &retrying{hc: srv.Client(), repeats: 3, pause: time.Millisecond}
	req, _ := http.NewRequest(http.MethodPost, srv.URL, strings.NewReader(`{"a":1}`))
	req.Header.Set(idempotencyKey, "k-1")
	resp, err := r.Do(req)
	if err != nil || resp.StatusCode != http.StatusCreated {
		t.Fatalf("POST: %v %v", resp, err)
	}
	resp.Body.Close()
	if len(keys) != 3 || keys[2] != "k-1" || bodies[2] != `{"a":1}` {
		t.Fatalf("tries: keys %q bodies %q", keys, bodies)
	}
	req, _ = http.NewRequest(http.MethodGet, srv.URL, nil)
	if resp, err = r.Do(req); err != nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("GET: %v %v", resp, err)
	}
	resp.Body.Close()
	if len(keys) != 4 {
		t.Fatalf("a GET was sent %d times", len(keys)-3)
	}
}

// A private key given by mistake never leaves the machine.
func TestSSHKeyAddRefusesPrivateKey(t *testing.T) {
	path := filepath.Join(t.TempDir(), "id_ed25519")
	if err := os.WriteFile(path, []byte("-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn...\n-----END OPENSSH PRIVATE KEY-----\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	err := run(context.Background(), []string{"ssh-key", "add", "laptop", path}, env("http://127.0.0.1:1"), io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "is a private key") {
		t.Fatalf("err = %v", err)
	}
}

// core is a running gpuaasd with a platform admin (who is a user too) and the
// CLI pointed at it.
type core struct {
	t    *testing.T
	url  string
	pool *pgxpool.Pool
}

func startCore(t *testing.T) (*core, func(args ...string) (string, error)) {
	t.Helper()
	pool, db := testenv.MigratedPool(t)
	n := testenv.StartNATS(t)
	d := daemontest.Start(t, map[string]string{"DATABASE_URL": db, "NATS_URL": n.URL(), "TEMPORAL_ADDRESS": testenv.Env(t, "TEMPORAL_ADDRESS")})
	ctx := principal.With(context.Background(), principal.SystemPrincipal("test"))
	ids := identity.NewService(pool, "local", testenv.Logger(t), nil)
	u, err := ids.CreateLocalUser(ctx, "admin@example.test", "Admin", "a long enough password", true)
	if err != nil {
		t.Fatal(err)
	}
	_, tok, err := ids.CreateAPIKey(ctx, identity.KeyOwner{User: &u.ID}, "cli", nil)
	if err != nil {
		t.Fatal(err)
	}
	getenv := func(k string) string { return map[string]string{"GPUAAS_API_URL": d.URL, "GPUAAS_TOKEN": tok}[k] }
	cli := func(args ...string) (string, error) {
		t.Helper()
		var out bytes.Buffer
		err := run(context.Background(), args, getenv, &out, io.Discard)
		t.Logf("gpuaas %s:\n%s(err %v)", strings.Join(args, " "), out.String(), err)
		return out.String(), err
	}
	return &core{t: t, url: d.URL, pool: pool}, cli
}

func (c *core) exec(sql string, args ...any) {
	c.t.Helper()
	ctx := principal.With(context.Background(), principal.SystemPrincipal("fixture"))
	if _, err := c.pool.Exec(ctx, sql, args...); err != nil {
		c.t.Fatalf("%s: %v", sql, err)
	}
}

// credits is the number and sum of the promotional credits of org demo.
func (c *core) credits() (int, int64) {
	c.t.Helper()
	var n int
	var sum int64
	err := c.pool.QueryRow(context.Background(), `SELECT count(*), coalesce(sum(l.amount_minor), 0)::bigint
		FROM ledger_entries l JOIN orgs o ON o.id = l.org_id WHERE o.slug = 'demo' AND l.entry_type = 'promotional_credit'`).Scan(&n, &sum)
	if err != nil {
		c.t.Fatal(err)
	}
	return n, sum
}

func mustContain(t *testing.T, what, got string, want ...string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(got, w) {
			t.Fatalf("%s lacks %q:\n%s", what, w, got)
		}
	}
}

// dev seed without a driver: the SKUs, org, project and credit are made once
// however often it runs, and the sync of a missing instance fails clearly.
func TestDevSeedIsIdempotent(t *testing.T) {
	c, cli := startCore(t)
	for i, want := range []string{"h100 created, l40s created", "h100 exists, l40s exists"} {
		out, err := cli("dev", "seed", "--instance", "nowhere")
		if err == nil || !strings.Contains(err.Error(), `instance nowhere`) || !strings.Contains(err.Error(), "plugin_instance_not_found") ||
			!strings.Contains(err.Error(), "--plugin-path") {
			t.Fatalf("run %d: err = %v; want the missing instance named", i+1, err)
		}
		mustContain(t, "dev seed output", out, want, "Org:", "Project:", "100.00 USD promotional credit", "2.49 USD/GPU-h",
			"gpuaas alloc create --project ")
		if i == 1 {
			mustContain(t, "second dev seed", out, "demo", "(exists)", "given before; not again")
		}
	}
	// Another amount under the same key is refused by the API; still no second credit.
	out, err := cli("dev", "seed", "--instance", "nowhere", "--credit-minor", "5000")
	if err == nil {
		t.Fatal("sync of a missing instance succeeded")
	}
	mustContain(t, "dev seed with another amount", out, "given before (with another amount)")
	if n, sum := c.credits(); n != 1 || sum != 10000 {
		t.Fatalf("org demo has %d promotional credits summing to %d; want 1 of 10000", n, sum)
	}
	var orgs, projects int
	if err := c.pool.QueryRow(context.Background(), `SELECT (SELECT count(*) FROM orgs WHERE slug = 'demo'),
		(SELECT count(*) FROM projects p JOIN orgs o ON o.id = p.org_id WHERE o.slug = 'demo')`).Scan(&orgs, &projects); err != nil {
		t.Fatal(err)
	}
	if orgs != 1 || projects != 1 {
		t.Fatalf("%d demo orgs with %d projects; want 1 and 1", orgs, projects)
	}
	out, err = cli("skus")
	if err != nil {
		t.Fatal(err)
	}
	mustContain(t, "skus", out, "8x H100 80GB", "2.49 USD/GPU-h", "4x L40S", "0.99 USD/GPU-h", "1536 GiB")
	// Flags that make no sense alone are refused before anything is done.
	if _, err := cli("dev", "seed", "--maas-url", "http://127.0.0.1:1/MAAS"); err == nil || !strings.Contains(err.Error(), "--maas-api-key-file") {
		t.Fatalf("--maas-url alone: %v", err)
	}
}

// make run's path: dev seed installs the MAAS driver (a real plugin process)
// against a simulated MAAS and adds its machines; then SSH keys and an
// allocation from create to released, and one whose provisioning fails.
func TestAllocationsThroughDevSeed(t *testing.T) {
	var specs []maassim.MachineSpec
	for _, m := range []struct {
		sku maassim.SKU
		n   int
	}{{maassim.SKUH100, 2}, {maassim.SKUL40S, 1}} {
		for i := range m.n {
			spec, err := maassim.NewMachine(m.sku, i, "ready")
			if err != nil {
				t.Fatal(err)
			}
			specs = append(specs, spec)
		}
	}
	sim, err := maassim.New(maassim.WithTiming(maassim.FastTiming().Scaled(0.25)), maassim.WithMachines(specs...))
	if err != nil {
		t.Fatal(err)
	}
	simSrv := httptest.NewServer(sim)
	t.Cleanup(func() { simSrv.Close(); sim.Close() })
	bin := sdktest.BuildBinary(t, "github.com/gpuaas/gpuaas/plugins/maas/cmd/gpuaas-plugin-maas")
	dir := t.TempDir()
	keyFile, secretFile, pubFile := filepath.Join(dir, "maas.key"), filepath.Join(dir, "webhook.secret"), filepath.Join(dir, "id_ed25519.pub")
	for f, v := range map[string]string{keyFile: sim.APIKey() + "\n", secretFile: "  dev-seed-test-webhook-secret-0123456789\n", pubFile: newSSHKey(t)} {
		if err := os.WriteFile(f, []byte(v), 0o600); err != nil {
			t.Fatal(err)
		}
	}

	c, cli := startCore(t)
	seed := []string{"dev", "seed", "--maas-url", simSrv.URL + "/MAAS", "--maas-api-key-file", keyFile,
		"--webhook-secret-file", secretFile, "--plugin-path", bin, "--instance", "maas"}
	out, err := cli(seed...)
	if err != nil {
		t.Fatal(err)
	}
	mustContain(t, "dev seed", out, "3 added from instance maas", "Plugin:    maas", "Instance:  maas of plugin maas")
	out, err = cli(seed...)
	if err != nil {
		t.Fatal(err)
	}
	mustContain(t, "dev seed again", out, "0 added from instance maas (3 machines seen)", "given before; not again")
	var project string
	if err := c.pool.QueryRow(context.Background(), `SELECT p.id::text FROM projects p JOIN orgs o ON o.id = p.org_id
		WHERE o.slug = 'demo' AND p.slug = 'ml'`).Scan(&project); err != nil {
		t.Fatal(err)
	}
	out, err = cli("skus")
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`(?m)^h100 .*2\.49 USD/GPU-h +2$`).MatchString(out) || !regexp.MustCompile(`(?m)^l40s .* 1$`).MatchString(out) {
		t.Fatalf("skus: want h100 with 2 free and l40s with 1:\n%s", out)
	}

	// An allocation needs an SSH key.
	if _, err := cli("alloc", "create", "--project", project, "--sku", "h100"); err == nil || !strings.Contains(err.Error(), "ssh_key_required") {
		t.Fatalf("create without a key: %v", err)
	}
	out, err = cli("ssh-key", "add", "laptop", pubFile)
	if err != nil {
		t.Fatal(err)
	}
	mustContain(t, "ssh-key add", out, "added laptop: ed25519", "SHA256:")
	keyID := between(out, "(id ", ")")
	out, err = cli("ssh-key", "list")
	if err != nil {
		t.Fatal(err)
	}
	mustContain(t, "ssh-key list", out, keyID, "laptop", "ed25519 256")

	out, err = cli("alloc", "create", "--project", project, "--sku", "h100", "--name", "training run", "--wait")
	if err != nil {
		t.Fatal(err)
	}
	mustContain(t, "alloc create --wait", out, "(training run): h100, 8 GPUs at 2.49 USD/GPU-h, requested", " active\n")
	if !regexp.MustCompile(`\nssh \S+@gpu-h100-\S+\n$`).MatchString(out) {
		t.Fatalf("alloc create --wait prints no ssh command last:\n%s", out)
	}
	id := strings.TrimSuffix(strings.Fields(out)[1], ":")
	if _, err := uuid.Parse(id); err != nil {
		t.Fatalf("create printed no id first: %s", out)
	}
	out, err = cli("alloc", "get", id)
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`(?m)^state +active$`).MatchString(out) || !regexp.MustCompile(`(?m)^ssh +\S+@gpu-h100-\S+$`).MatchString(out) {
		t.Fatalf("alloc get of an active allocation:\n%s", out)
	}
	out, err = cli("alloc", "list", "--project", project, "--state", "active")
	if err != nil {
		t.Fatal(err)
	}
	mustContain(t, "alloc list --state active", out, id, "training run", "active")
	if _, err := cli("alloc", "list", "--project", project, "--state", "bogus"); err == nil || !strings.Contains(err.Error(), "release_failed") {
		t.Fatalf("alloc list --state bogus: %v", err)
	}

	out, err = cli("alloc", "release", id, "--wait")
	if err != nil {
		t.Fatal(err)
	}
	mustContain(t, "alloc release --wait", out, "releasing "+id, id+" released")
	// Releasing again: the API's refusal, as the API words it.
	_, err = cli("alloc", "release", id)
	if err == nil || !strings.Contains(err.Error(), "HTTP 409, invalid_allocation_transition") {
		t.Fatalf("release of a released allocation: %v", err)
	}

	// A SKU whose only node belongs to an instance without a driver: the
	// provisioning fails and create --wait says so.
	c.exec(`INSERT INTO skus (id, gpu_model, gpus_per_node, cpu_cores, memory_gib, disk_gib, price_per_gpu_hour_minor, currency)
		VALUES ('ghost', 'Ghost GPU', 1, 8, 64, 100, 100, 'USD')`)
	c.exec(`INSERT INTO nodes (id, provisioner_instance, external_id, hostname, sku_id, state)
		VALUES ($1, 'no-such-driver', 'ghost-1', 'ghost-1.test', 'ghost', 'available')`, uuid.Must(uuid.NewV7()))
	out, err = cli("alloc", "create", "--project", project, "--sku", "ghost", "--wait")
	if err == nil || !strings.Contains(err.Error(), "is failed") {
		t.Fatalf("create on a node without a driver: %v", err)
	}
	ghost := strings.TrimSuffix(strings.Fields(out)[1], ":")
	out, err = cli("alloc", "list", "--project", project)
	if err != nil {
		t.Fatal(err)
	}
	mustContain(t, "alloc list", out, ghost, id, "failed", "released")
	out, err = cli("alloc", "get", ghost)
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`(?m)^state +failed$`).MatchString(out) || strings.Contains(out, "\nssh") {
		t.Fatalf("alloc get of a failed allocation:\n%s", out)
	}
	_, err = cli("alloc", "release", ghost, "--wait")
	if err == nil || !strings.Contains(err.Error(), "HTTP 409, invalid_allocation_transition") {
		t.Fatalf("release of a failed allocation: %v", err)
	}

	if out, err = cli("ssh-key", "rm", keyID); err != nil || !strings.Contains(out, "removed "+keyID) {
		t.Fatalf("ssh-key rm: %q %v", out, err)
	}
	if out, err = cli("ssh-key", "list"); err != nil || strings.Contains(out, keyID) {
		t.Fatalf("ssh-key list after rm: %q %v", out, err)
	}
}

// between is the text of s between the first start and the next end.
func between(s, start, end string) string {
	_, after, _ := strings.Cut(s, start)
	v, _, _ := strings.Cut(after, end)
	return v
}

func newSSHKey(t *testing.T) string {
	t.Helper()
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	spk, err := ssh.NewPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return string(ssh.MarshalAuthorizedKey(spk))
}
