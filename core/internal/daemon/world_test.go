package daemon_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/crypto/ssh"

	"github.com/gpuaas/gpuaas/core/internal/daemon"
	"github.com/gpuaas/gpuaas/core/internal/daemon/daemontest"
	"github.com/gpuaas/gpuaas/core/internal/identity"
	"github.com/gpuaas/gpuaas/core/internal/oidc/oidctest"
	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
)

// env is one running core with its database, an OIDC issuer it trusts and a
// service to build fixtures with.
type env struct {
	t      testing.TB
	url    string
	pool   *pgxpool.Pool
	ids    *identity.Service
	issuer *oidctest.Issuer
	// storage is the core's project storage (nil: none); with storageWorlds
	// every world gets files in it (see storable).
	storage       *storageFixture
	storageWorlds bool
}

func newEnv(t testing.TB) *env {
	t.Helper()
	issuer := oidctest.New(t, oidctest.WithClient("gpuaas-web", "web-secret"))
	pool, dbURL := testenv.MigratedPool(t)
	n := testenv.StartNATS(t)
	st := newStorageFixture(t, pool, nil)
	d := daemontest.StartWith(t, map[string]string{
		"DATABASE_URL": dbURL, "NATS_URL": n.URL(), "TEMPORAL_ADDRESS": testenv.Env(t, "TEMPORAL_ADDRESS"),
		"GPUAAS_LOCAL_ACCOUNTS": "true",
		"GPUAAS_OIDC_ISSUER":    issuer.URL(), "GPUAAS_OIDC_CLIENT_ID": issuer.ClientID(), "GPUAAS_OIDC_CLIENT_SECRET": "web-secret",
		"GPUAAS_OIDC_AUDIENCE": issuer.Config().Audience, "GPUAAS_OIDC_REDIRECT_URL": "https://gpuaas.test/callback",
	}, daemon.Options{Storage: st})
	return &env{t: t, url: d.URL, pool: pool, ids: identity.NewService(pool, "local", testenv.Logger(t), nil), issuer: issuer,
		storage: st, storageWorlds: true}
}

type response struct {
	status int
	header http.Header
	body   []byte
}

func (r response) json(t testing.TB, v any) {
	t.Helper()
	if err := json.Unmarshal(r.body, v); err != nil {
		t.Fatalf("decode %s: %v", r.body, err)
	}
}

func (r response) code() string {
	var e struct {
		Error struct{ Code string } `json:"error"`
	}
	_ = json.Unmarshal(r.body, &e)
	return e.Error.Code
}

// call sends a request with an optional bearer token and JSON body.
func (e *env) call(method, path, token string, body any, header ...string) response {
	e.t.Helper()
	var rd io.Reader
	if body != nil {
		b, ok := body.(string)
		if !ok {
			raw, _ := json.Marshal(body)
			b = string(raw)
		}
		rd = strings.NewReader(b)
	}
	req, err := http.NewRequest(method, e.url+path, rd)
	if err != nil {
		e.t.Fatal(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }, Timeout: 30 * time.Second}
	resp, err := client.Do(req)
	if err != nil {
		e.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	return response{status: resp.StatusCode, header: resp.Header, body: raw}
}

// role names the principals of the authorization matrix.
type role string

const (
	anon      role = "anonymous"
	otherOrg  role = "user_of_other_org"
	viewer    role = "project_viewer"
	member    role = "project_member"
	orgAdmin  role = "org_admin"
	saOther   role = "sa_of_other_project"
	platAdmin role = "platform_admin"
)

var roles = []role{anon, otherOrg, viewer, member, orgAdmin, saOther, platAdmin}

// world is a fresh tenancy fixture: org A with projects P1 and P2, org B with PB,
// one principal per role, and resources in P1 to act on.
type world struct {
	orgA, orgB   uuid.UUID
	p1, p2, pb   uuid.UUID
	tokens       map[role]string
	keyIDs       map[role]uuid.UUID
	users        map[role]uuid.UUID
	target       uuid.UUID // org A member and P1 member, the object of member changes
	spare        uuid.UUID // org A member, not in P1
	sa           uuid.UUID // service account of P1
	saKey        uuid.UUID // key of that service account
	foreignSA    uuid.UUID // service account of PB
	foreignKey   uuid.UUID // personal key of the org B user
	foreignUser  uuid.UUID // org B owner
	strangerMail string
	sshKey       string    // an ed25519 public key line
	sku          string    // a SKU with nodes of a fixture provisioner instance
	nodeFree     uuid.UUID // an available node of sku
	nodeHeld     uuid.UUID // the node of alloc
	alloc        uuid.UUID // an active allocation of P1 (org A has credit)
	// storedPath is a file of P1 and storageUpload a presigned upload of P1
	// waiting for confirmation (envs with storageWorlds).
	storedPath    string
	storageUpload uuid.UUID
}

func (e *env) insertUser(ctx context.Context, email string, admin bool) uuid.UUID {
	e.t.Helper()
	id := uuid.Must(uuid.NewV7())
	if _, err := e.pool.Exec(ctx, `INSERT INTO users (id, email, email_verified, display_name, is_platform_admin) VALUES ($1, $2, true, $2, $3)`, id, email, admin); err != nil {
		e.t.Fatal(err)
	}
	return id
}

func (e *env) exec(ctx context.Context, sql string, args ...any) {
	e.t.Helper()
	if _, err := e.pool.Exec(ctx, sql, args...); err != nil {
		e.t.Fatalf("%s: %v", sql, err)
	}
}

func (e *env) userKey(ctx context.Context, id uuid.UUID) (string, uuid.UUID) {
	e.t.Helper()
	ctx = principal.With(ctx, principal.SystemPrincipal("fixture"))
	k, secret, err := e.ids.CreateAPIKey(ctx, identity.KeyOwner{User: &id}, "fixture", nil)
	if err != nil {
		e.t.Fatal(err)
	}
	return secret, k.ID
}

func (e *env) newWorld() *world {
	e.t.Helper()
	ctx := principal.With(context.Background(), principal.SystemPrincipal("fixture"))
	w := &world{tokens: map[role]string{}, keyIDs: map[role]uuid.UUID{}, users: map[role]uuid.UUID{}}
	sfx := uuid.NewString()[:8]
	w.orgA, w.orgB = uuid.Must(uuid.NewV7()), uuid.Must(uuid.NewV7())
	w.p1, w.p2, w.pb = uuid.Must(uuid.NewV7()), uuid.Must(uuid.NewV7()), uuid.Must(uuid.NewV7())
	e.exec(ctx, `INSERT INTO orgs (id, slug, name) VALUES ($1, $2, 'Org A'), ($3, $4, 'Org B')`, w.orgA, "a-"+sfx, w.orgB, "b-"+sfx)
	e.exec(ctx, `INSERT INTO projects (id, org_id, slug, name) VALUES ($1, $2, 'p1', 'P1'), ($3, $2, 'p2', 'P2'), ($4, $5, 'pb', 'PB')`, w.p1, w.orgA, w.p2, w.pb, w.orgB)
	mk := func(r role, admin bool) uuid.UUID {
		id := e.insertUser(ctx, fmt.Sprintf("%s-%s@example.test", r, sfx), admin)
		w.users[r] = id
		w.tokens[r], w.keyIDs[r] = e.userKey(ctx, id)
		return id
	}
	owner := e.insertUser(ctx, "owner-"+sfx+"@example.test", false)
	e.exec(ctx, `INSERT INTO org_memberships (org_id, user_id, role) VALUES ($1, $2, 'owner')`, w.orgA, owner)
	w.foreignUser = mk(otherOrg, false)
	e.exec(ctx, `INSERT INTO org_memberships (org_id, user_id, role) VALUES ($1, $2, 'owner')`, w.orgB, w.foreignUser)
	_, w.foreignKey = w.tokens[otherOrg], w.keyIDs[otherOrg]
	for r, prole := range map[role]string{viewer: "viewer", member: "member"} {
		id := mk(r, false)
		e.exec(ctx, `INSERT INTO org_memberships (org_id, user_id, role) VALUES ($1, $2, 'member')`, w.orgA, id)
		e.exec(ctx, `INSERT INTO project_memberships (project_id, user_id, role) VALUES ($1, $2, $3)`, w.p1, id, prole)
	}
	e.exec(ctx, `INSERT INTO org_memberships (org_id, user_id, role) VALUES ($1, $2, 'admin')`, w.orgA, mk(orgAdmin, false))
	mk(platAdmin, true)
	w.target = e.insertUser(ctx, "target-"+sfx+"@example.test", false)
	e.exec(ctx, `INSERT INTO org_memberships (org_id, user_id, role) VALUES ($1, $2, 'member')`, w.orgA, w.target)
	e.exec(ctx, `INSERT INTO project_memberships (project_id, user_id, role) VALUES ($1, $2, 'member')`, w.p1, w.target)
	w.spare = e.insertUser(ctx, "spare-"+sfx+"@example.test", false)
	e.exec(ctx, `INSERT INTO org_memberships (org_id, user_id, role) VALUES ($1, $2, 'member')`, w.orgA, w.spare)

	sa := func(project, org uuid.UUID, name string) *identity.ServiceAccount {
		p := &identity.Project{ID: project, OrgID: org}
		a, err := e.ids.CreateServiceAccount(ctx, p, name, "", "admin")
		if err != nil {
			e.t.Fatal(err)
		}
		return a
	}
	s1 := sa(w.p1, w.orgA, "deployer")
	w.sa = s1.ID
	k, _, err := e.ids.CreateAPIKey(ctx, identity.KeyOwner{ServiceAccount: s1}, "ci", nil)
	if err != nil {
		e.t.Fatal(err)
	}
	w.saKey = k.ID
	s2 := sa(w.p2, w.orgA, "other")
	_, tok, err := e.ids.CreateAPIKey(ctx, identity.KeyOwner{ServiceAccount: s2}, "ci", nil)
	if err != nil {
		e.t.Fatal(err)
	}
	w.tokens[saOther], w.users[saOther] = tok, s2.ID
	w.foreignSA = sa(w.pb, w.orgB, "foreign").ID
	w.strangerMail = "stranger-" + sfx + "@example.test"
	pub, _, _ := ed25519.GenerateKey(rand.Reader)
	spk, _ := ssh.NewPublicKey(pub)
	w.sshKey = strings.TrimSpace(string(ssh.MarshalAuthorizedKey(spk)))
	if e.storageWorlds {
		e.storable(w)
	}
	return w
}

// rentable adds to a world what allocations need: a SKU with a free node and
// a held one of a fixture provisioner instance, credit for org A, and an
// active allocation of P1 on the held node.
func (e *env) rentable(w *world) {
	e.t.Helper()
	ctx := principal.With(context.Background(), principal.SystemPrincipal("fixture"))
	sfx := uuid.NewString()[:8]
	w.sku, w.nodeFree, w.nodeHeld, w.alloc = "w-"+sfx, uuid.Must(uuid.NewV7()), uuid.Must(uuid.NewV7()), uuid.Must(uuid.NewV7())
	e.exec(ctx, `INSERT INTO skus (id, gpu_model, gpus_per_node, cpu_cores, memory_gib, disk_gib, price_per_gpu_hour_minor, currency)
		VALUES ($1, 'Fixture GPU', 1, 8, 64, 100, 100, 'USD')`, w.sku)
	e.exec(ctx, `INSERT INTO nodes (id, provisioner_instance, external_id, hostname, sku_id, state)
		VALUES ($1, $3, 'free', 'free.test', $4, 'available'), ($2, $3, 'held', 'held.test', $4, 'allocated')`,
		w.nodeFree, w.nodeHeld, "fixture-"+sfx, w.sku)
	e.exec(ctx, `INSERT INTO billing_accounts (org_id, currency) VALUES ($1, 'USD')`, w.orgA)
	e.exec(ctx, `INSERT INTO ledger_entries (org_id, currency, amount_minor, entry_type, idempotency_key, created_by)
		VALUES ($1, 'USD', 100000, 'promotional_credit', $2, 'fixture')`, w.orgA, "fixture-"+sfx)
	e.exec(ctx, `INSERT INTO allocations (id, org_id, project_id, sku_id, node_id, gpus, price_per_gpu_hour_minor, currency, state,
			username, ssh_public_keys, created_by, active_at)
		VALUES ($1, $2, $3, $4, $5, 1, 100, 'USD', 'active', 'tenant', ARRAY[$6], 'fixture', now())`,
		w.alloc, w.orgA, w.p1, w.sku, w.nodeHeld, w.sshKey)
}

func (e *env) auditCount(result string) int {
	e.t.Helper()
	var n int
	// Rows of the platform's own background work (workflows) are not the caller's.
	if err := e.pool.QueryRow(context.Background(), `SELECT count(*) FROM audit_log WHERE result = $1 AND actor_type <> 'system'`, result).Scan(&n); err != nil {
		e.t.Fatal(err)
	}
	return n
}

// send is call plus the audit invariant: a successful mutation writes exactly one
// success row as the caller; anything else writes none.
func (e *env) send(method, path, token string, body any) response {
	e.t.Helper()
	before := e.auditCount("success")
	r := e.call(method, path, token, body)
	after := e.auditCount("success")
	want := 0
	if method != http.MethodGet && r.status >= 200 && r.status < 300 {
		want = 1
	}
	if after-before != want {
		e.t.Errorf("%s %s → %d wrote %d success audit rows, want %d", method, path, r.status, after-before, want)
	}
	return r
}
