package daemon_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"maps"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/crypto/ssh"

	"github.com/gpuaas/gpuaas/core/internal/billing"
	"github.com/gpuaas/gpuaas/core/internal/daemon"
	"github.com/gpuaas/gpuaas/core/internal/daemon/daemontest"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/identity"
	"github.com/gpuaas/gpuaas/core/internal/pluginhost"
	"github.com/gpuaas/gpuaas/core/internal/policy"
	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
	"github.com/gpuaas/gpuaas/plugins/maas"
	"github.com/gpuaas/gpuaas/plugins/maas/maassim"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
)

// drivers resolves provisioner instances to in-process drivers, configured
// after the core started (the MAAS driver needs the core's webhook URL).
type drivers struct {
	mu sync.Mutex
	m  map[string]provisioner.Driver
}

func (d *drivers) Provisioner(_ context.Context, name string) (provisioner.Driver, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if drv, ok := d.m[name]; ok {
		return drv, nil
	}
	return nil, errcode.New(pluginhost.CodeInstanceNotFound, "no plugin instance %q", name)
}

func (d *drivers) names(context.Context) ([]string, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []string
	for n := range d.m {
		out = append(out, n)
	}
	return out, nil
}

func (d *drivers) set(name string, drv provisioner.Driver) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.m[name] = drv
}

const maasWebhookSecret = "allocation-test-webhook-secret-0123456789"

// provEnv is a core with a MAAS simulator behind the "maas-a" instance, two
// SKUs, an org with credit and a member with an SSH key.
type provEnv struct {
	t        testing.TB
	url      string
	env      map[string]string
	pool     *pgxpool.Pool
	sim      *maassim.Server
	simURL   string
	drivers  *drivers
	core     *daemontest.Instance
	admin    string // platform admin token
	user     string // member token
	org      uuid.UUID
	project  uuid.UUID
	machines map[string]string // system id → SKU
}

type provOptions struct {
	timing   maassim.Timing
	h100     int
	l40s     int
	policies map[string]string // key → JSON value (global overrides)
	credit   int64
	env      map[string]string // extra core settings
}

func newProvEnv(t testing.TB, o provOptions) *provEnv {
	t.Helper()
	if o.credit == 0 {
		o.credit = 1_000_000
	}
	pool, dbURL := testenv.MigratedPool(t)
	ctx := t.Context()
	for k, v := range o.policies {
		if _, err := pool.Exec(ctx, `INSERT INTO policy_overrides (scope, scope_id, key, value, updated_by) VALUES ('global', '', $1, $2, 'test')`, k, v); err != nil {
			t.Fatal(err)
		}
	}
	p := &provEnv{t: t, pool: pool, drivers: &drivers{m: map[string]provisioner.Driver{}}, machines: map[string]string{}}
	var specs []maassim.MachineSpec
	for _, m := range []struct {
		sku maassim.SKU
		n   int
	}{{maassim.SKUH100, o.h100}, {maassim.SKUL40S, o.l40s}} {
		for i := range m.n {
			spec, err := maassim.NewMachine(m.sku, i, "ready")
			if err != nil {
				t.Fatal(err)
			}
			specs = append(specs, spec)
			p.machines[spec.SystemID] = string(m.sku)
		}
	}
	sim, err := maassim.New(maassim.WithTiming(o.timing), maassim.WithMachines(specs...))
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(sim)
	t.Cleanup(func() { srv.Close(); sim.Close() })
	p.sim, p.simURL = sim, srv.URL+"/MAAS"

	n := testenv.StartNATS(t)
	p.env = map[string]string{"DATABASE_URL": dbURL, "NATS_URL": n.URL(), "TEMPORAL_ADDRESS": testenv.Env(t, "TEMPORAL_ADDRESS")}
	maps.Copy(p.env, o.env)
	p.start()
	p.configureMAAS("maas-a")

	sctx := principal.With(ctx, principal.SystemPrincipal("fixture"))
	exec := func(sql string, args ...any) {
		t.Helper()
		if _, err := pool.Exec(sctx, sql, args...); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	exec(`INSERT INTO skus (id, gpu_model, gpus_per_node, cpu_cores, memory_gib, disk_gib, price_per_gpu_hour_minor, currency)
		VALUES ('h100', 'H100 80GB', 8, 192, 1536, 7680, 360000, 'USD'), ('l40s', 'L40S', 4, 64, 512, 3840, 90000, 'USD')`)
	p.org, p.project = uuid.Must(uuid.NewV7()), uuid.Must(uuid.NewV7())
	exec(`INSERT INTO orgs (id, slug, name) VALUES ($1, $2, 'Acme')`, p.org, "acme-"+uuid.NewString()[:8])
	exec(`INSERT INTO projects (id, org_id, slug, name) VALUES ($1, $2, 'ml', 'ML')`, p.project, p.org)
	exec(`INSERT INTO billing_accounts (org_id, currency) VALUES ($1, 'USD')`, p.org)
	if o.credit > 0 {
		exec(`INSERT INTO ledger_entries (org_id, currency, amount_minor, entry_type, idempotency_key, created_by)
			VALUES ($1, 'USD', $2, 'promotional_credit', $3, 'fixture')`, p.org, o.credit, "credit-"+p.org.String())
	}
	ids := newIdentityFixture(t, pool)
	adminID := ids.user(sctx, "admin-"+uuid.NewString()[:8]+"@example.test", true)
	p.admin = ids.token(sctx, adminID)
	userID := ids.user(sctx, "ada.lovelace-"+uuid.NewString()[:4]+"@example.test", false)
	exec(`INSERT INTO org_memberships (org_id, user_id, role) VALUES ($1, $2, 'member')`, p.org, userID)
	exec(`INSERT INTO project_memberships (project_id, user_id, role) VALUES ($1, $2, 'member')`, p.project, userID)
	p.user = ids.token(sctx, userID)
	if r := p.call("POST", "/api/v1/ssh-keys", p.user, map[string]any{"name": "laptop", "public_key": newSSHKey(t)}); r.status != 201 {
		t.Fatalf("add ssh key: %d %s", r.status, r.body)
	}
	return p
}

func (p *provEnv) start() {
	p.t.Helper()
	p.core = daemontest.StartWith(p.t, p.env, daemon.Options{Provisioners: p.drivers, ProvisionerInstances: p.drivers.names})
	p.url = p.core.URL // StartWith put the task queue into p.env: a restart keeps it
}

// stop stops the core (its worker with it) and waits until it is gone.
func (p *provEnv) stop() {
	p.t.Helper()
	p.core.Stop()
	select {
	case err := <-p.core.Done:
		p.core.Done <- err
	case <-time.After(20 * time.Second):
		p.t.Fatal("core did not stop")
	}
}

func (p *provEnv) configureMAAS(instance string) {
	p.t.Helper()
	d := maas.New(hclog.NewNullLogger())
	schema, err := d.ConfigSchema(p.t.Context())
	if err != nil {
		p.t.Fatal(err)
	}
	cfg, err := base.ValidateConfig(schema, map[string]any{
		"maas_url": p.simURL, "api_key": p.sim.APIKey(), "webhook_secret": maasWebhookSecret,
		"webhook_url": p.url + "/api/v1/webhooks/maas/" + instance, "retry_backoff": "20ms",
	})
	if err != nil {
		p.t.Fatal(err)
	}
	cfg.APIVersion, cfg.Instance = provisioner.APIVersion1, instance
	if err := d.Configure(p.t.Context(), cfg); err != nil {
		p.t.Fatal(err)
	}
	p.drivers.set(instance, d)
}

func (p *provEnv) call(method, path, token string, body any) response {
	p.t.Helper()
	return (&env{t: p.t, url: p.url}).call(method, path, token, body)
}

// registerAll enrolls every simulated machine through the admin API.
func (p *provEnv) registerAll() map[string]uuid.UUID {
	p.t.Helper()
	out := map[string]uuid.UUID{}
	for id, sku := range p.machines {
		r := p.call("POST", "/api/v1/admin/nodes", p.admin, map[string]any{"provisioner_instance": "maas-a", "external_id": id})
		if r.status != 201 {
			p.t.Fatalf("register %s: %d %s", id, r.status, r.body)
		}
		var n struct {
			ID    uuid.UUID `json:"id"`
			State string    `json:"state"`
			SKU   string    `json:"sku_id"`
		}
		r.json(p.t, &n)
		if n.State != "available" || n.SKU != sku {
			p.t.Fatalf("registered %s: state %s sku %s; want available %s: %s", id, n.State, n.SKU, sku, r.body)
		}
		out[id] = n.ID
	}
	return out
}

type allocationView struct {
	ID          uuid.UUID `json:"id"`
	State       string    `json:"state"`
	StateReason string    `json:"state_reason"`
	SSHUser     string    `json:"ssh_user"`
	SSHHost     string    `json:"ssh_host"`
	NodeID      uuid.UUID `json:"node_id"`
	GPUs        int       `json:"gpus"`
}

func (p *provEnv) create(token string, body map[string]any) (response, []allocationView) {
	p.t.Helper()
	if body["project_id"] == nil {
		body["project_id"] = p.project
	}
	r := p.call("POST", "/api/v1/allocations", token, body)
	var list struct{ Items []allocationView }
	if r.status == 201 {
		r.json(p.t, &list)
	}
	return r, list.Items
}

// await polls an allocation until it reaches state (failing on another
// terminal state) and returns it.
func (p *provEnv) await(id uuid.UUID, state string, within time.Duration) allocationView {
	p.t.Helper()
	deadline := time.Now().Add(within)
	var a allocationView
	for {
		r := p.call("GET", "/api/v1/allocations/"+id.String(), p.admin, nil)
		if r.status != 200 {
			p.t.Fatalf("get allocation: %d %s", r.status, r.body)
		}
		r.json(p.t, &a)
		if a.State == state {
			return a
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("allocation %s is %s (%s) after %s; want %s", id, a.State, a.StateReason, within, state)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

func (p *provEnv) nodeState(id uuid.UUID) string {
	p.t.Helper()
	var s string
	if err := p.pool.QueryRow(p.t.Context(), `SELECT state FROM nodes WHERE id = $1`, id).Scan(&s); err != nil {
		p.t.Fatal(err)
	}
	return s
}

func (p *provEnv) awaitNode(id uuid.UUID, state string, within time.Duration) {
	p.t.Helper()
	deadline := time.Now().Add(within)
	for p.nodeState(id) != state {
		if time.Now().After(deadline) {
			p.t.Fatalf("node %s is %s after %s; want %s", id, p.nodeState(id), within, state)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

func newSSHKey(t testing.TB) string {
	t.Helper()
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	spk, err := ssh.NewPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(ssh.MarshalAuthorizedKey(spk)))
}

// identityFixture makes users and API keys straight in the database.
type identityFixture struct {
	e *env
}

func newIdentityFixture(t testing.TB, pool *pgxpool.Pool) *identityFixture {
	return &identityFixture{e: &env{t: t, pool: pool, ids: newIDs(t, pool)}}
}

func (f *identityFixture) user(ctx context.Context, email string, admin bool) uuid.UUID {
	return f.e.insertUser(ctx, email, admin)
}

func (f *identityFixture) token(ctx context.Context, id uuid.UUID) string {
	tok, _ := f.e.userKey(ctx, id)
	return tok
}

func (p *provEnv) usage(alloc uuid.UUID) (started, ended *time.Time, billed int64, until time.Time) {
	p.t.Helper()
	err := p.pool.QueryRow(p.t.Context(), `SELECT started_at, ended_at, billed_minor, billed_until FROM usage_records WHERE allocation_id = $1`, alloc).
		Scan(&started, &ended, &billed, &until)
	if err != nil {
		p.t.Fatalf("usage of %s: %v", alloc, err)
	}
	return started, ended, billed, until
}

// accrue bills usage up to now.
func (p *provEnv) accrue() {
	p.t.Helper()
	if _, err := billing.Accrue(p.t.Context(), p.pool, policy.NewService(p.pool, testenv.Logger(p.t)), time.Now().UTC().Truncate(time.Second)); err != nil {
		p.t.Fatal(err)
	}
}

func debits(t testing.TB, pool *pgxpool.Pool, org uuid.UUID) int64 {
	t.Helper()
	var sum int64
	if err := pool.QueryRow(t.Context(), `SELECT coalesce(sum(amount_minor), 0) FROM ledger_entries WHERE org_id = $1 AND entry_type = 'usage_debit'`, org).Scan(&sum); err != nil {
		t.Fatal(err)
	}
	return sum
}

func newIDs(t testing.TB, pool *pgxpool.Pool) *identity.Service {
	return identity.NewService(pool, "local", testenv.Logger(t), nil)
}
