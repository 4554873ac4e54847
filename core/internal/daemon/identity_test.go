package daemon_test

import (
	"context"
	"encoding/csv"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/gpuaas/gpuaas/core/internal/principal"
)

// Every bad bearer answers 401 with its own stable code.
func TestBearerAttacks(t *testing.T) {
	e := newEnv(t)
	w := e.newWorld()
	ctx := context.Background()
	iss := e.issuer
	now := time.Now()

	revokedTok, revokedID := e.userKey(ctx, w.users[member])
	expiredTok, expiredID := e.userKey(ctx, w.users[member])
	e.exec(ctx, `UPDATE api_keys SET revoked_at = now() WHERE id = $1`, revokedID)
	e.exec(ctx, `UPDATE api_keys SET expires_at = now() - interval '1 minute' WHERE id = $1`, expiredID)
	cases := []struct {
		name, token, code string
	}{
		{"alg none", iss.MintNone(), "token_alg_not_allowed"},
		{"HS256 keyed with the RSA public key", iss.MintHS256WithPublicKey(), "token_alg_not_allowed"},
		{"expired", iss.Token().ExpiresAt(now.Add(-10 * time.Minute)).IssuedAt(now.Add(-time.Hour)).Sign(), "token_expired"},
		{"not yet valid", iss.Token().NotBefore(now.Add(10 * time.Minute)).Sign(), "token_not_yet_valid"},
		{"wrong issuer", iss.Token().Issuer("https://evil.example").Sign(), "token_wrong_issuer"},
		{"wrong audience", iss.Token().Audience("someone-else").Sign(), "token_wrong_audience"},
		{"unknown kid", iss.MintWithUnknownKid(), "token_unknown_key"},
		{"tampered payload", tamper(iss.Mint()), "token_bad_signature"},
		{"garbage", "not-a-token", "invalid_token"},
		{"unknown API key", "gpk_aaaaaaaaaaaa" + strings.Repeat("A", 43), "invalid_token"},
		{"API key with a wrong secret", w.tokens[member][:16] + strings.Repeat("B", 43), "invalid_token"},
		{"revoked API key", revokedTok, "api_key_revoked"},
		{"expired API key", expiredTok, "api_key_expired"},
		{"unknown session", "gps_aaaaaaaaaaaa" + strings.Repeat("A", 43), "invalid_token"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e.t = t
			r := e.call("GET", "/api/v1/users/me", tc.token, nil)
			if r.status != 401 || r.code() != tc.code {
				t.Fatalf("%d %s; want 401 %s", r.status, r.body, tc.code)
			}
			if !strings.HasPrefix(r.header.Get("WWW-Authenticate"), "Bearer") {
				t.Fatal("no WWW-Authenticate challenge")
			}
		})
	}
	e.t = t
	// A valid OIDC token works, and its user is created on first sight.
	r := e.call("GET", "/api/v1/users/me", iss.Mint(), nil)
	if r.status != 200 || !strings.Contains(string(r.body), `"auth_method":"oidc"`) {
		t.Fatalf("valid token: %d %s", r.status, r.body)
	}
}

// tamper flips the payload of a JWT without re-signing it.
func tamper(jwt string) string {
	parts := strings.Split(jwt, ".")
	p := []byte(parts[1])
	if p[5] == 'A' {
		p[5] = 'B'
	} else {
		p[5] = 'A'
	}
	return parts[0] + "." + string(p) + "." + parts[2]
}

// Fields a client must not set (role, org, admin flags) are refused, and nothing is
// written.
func TestMassAssignment(t *testing.T) {
	e := newEnv(t)
	w := e.newWorld()
	cases := []struct {
		path, token string
		body        string
		field       string
	}{
		{"/api/v1/orgs", w.tokens[member], `{"slug":"mass-1","name":"M","owner_id":"` + w.users[member].String() + `"}`, "owner_id"},
		{"/api/v1/orgs", w.tokens[member], `{"slug":"mass-2","name":"M","is_admin":true}`, "is_admin"},
		{"/api/v1/users/me/api-keys", w.tokens[member], `{"name":"k","user_id":"` + w.users[platAdmin].String() + `"}`, "user_id"},
		{"/api/v1/users/me/api-keys", w.tokens[member], `{"name":"k","is_platform_admin":true}`, "is_platform_admin"},
		{"/api/v1/orgs/" + w.orgA.String() + "/projects", w.tokens[orgAdmin], `{"slug":"mass-3","name":"M","org_id":"` + w.orgB.String() + `"}`, "org_id"},
		{"/api/v1/projects/" + w.p1.String() + "/service-accounts", w.tokens[orgAdmin], `{"name":"mass-sa","role":"viewer","project_id":"` + w.pb.String() + `"}`, "project_id"},
	}
	before := e.auditCount("success")
	for _, c := range cases {
		r := e.call("POST", c.path, c.token, c.body)
		if r.status != 400 || r.code() != "unknown_field" || !strings.Contains(string(r.body), c.field) {
			t.Errorf("POST %s %s: %d %s; want 400 unknown_field naming %s", c.path, c.body, r.status, r.body, c.field)
		}
	}
	if after := e.auditCount("success"); after != before {
		t.Fatalf("refused requests wrote %d audit rows", after-before)
	}
	var n int
	_ = e.pool.QueryRow(context.Background(), `SELECT count(*) FROM orgs WHERE slug LIKE 'mass-%'`).Scan(&n)
	if n != 0 {
		t.Fatalf("%d orgs were created from refused requests", n)
	}
}

// The last owner can neither leave nor be demoted; with a second owner both work.
func TestLastOwner(t *testing.T) {
	e := newEnv(t)
	w := e.newWorld()
	ctx := context.Background()
	var owner uuid.UUID
	_ = e.pool.QueryRow(ctx, `SELECT user_id FROM org_memberships WHERE org_id = $1 AND role = 'owner'`, w.orgA).Scan(&owner)
	ownerTok, _ := e.userKey(ctx, owner)
	org := "/api/v1/orgs/" + w.orgA.String() + "/members/"
	if r := e.send("DELETE", org+owner.String(), ownerTok, nil); r.status != 409 || r.code() != "last_owner" {
		t.Fatalf("removing the last owner: %d %s", r.status, r.body)
	}
	if r := e.send("PATCH", org+owner.String(), ownerTok, map[string]string{"role": "admin"}); r.status != 409 || r.code() != "last_owner" {
		t.Fatalf("demoting the last owner: %d %s", r.status, r.body)
	}
	// An admin may not make owners.
	if r := e.send("PATCH", org+w.target.String(), w.tokens[orgAdmin], map[string]string{"role": "owner"}); r.status != 403 {
		t.Fatalf("admin granting owner: %d %s", r.status, r.body)
	}
	if r := e.send("PATCH", org+w.target.String(), ownerTok, map[string]string{"role": "owner"}); r.status != 200 {
		t.Fatalf("owner granting owner: %d %s", r.status, r.body)
	}
	if r := e.send("DELETE", org+owner.String(), ownerTok, nil); r.status != 204 {
		t.Fatalf("an owner leaving while another remains: %d %s", r.status, r.body)
	}
	// The departed owner's key no longer reaches the org.
	if r := e.call("GET", "/api/v1/orgs/"+w.orgA.String(), ownerTok, nil); r.status != 404 {
		t.Fatalf("former owner reads the org: %d", r.status)
	}
}

// An invitation to an email becomes a membership when that person first signs in
// through the identity provider with the verified email.
func TestInvitationAcceptedAtFirstSignIn(t *testing.T) {
	e := newEnv(t)
	w := e.newWorld()
	mail := e.issuer.User().Email
	r := e.send("POST", "/api/v1/orgs/"+w.orgA.String()+"/members", w.tokens[orgAdmin], map[string]string{"email": mail, "role": "billing"})
	if r.status != 201 || !strings.Contains(string(r.body), `"invitation"`) {
		t.Fatalf("invite: %d %s", r.status, r.body)
	}
	me := e.call("GET", "/api/v1/users/me", e.issuer.Mint(), nil)
	if me.status != 200 || !strings.Contains(string(me.body), w.orgA.String()) || !strings.Contains(string(me.body), `"role":"billing"`) {
		t.Fatalf("first sign-in: %d %s; want a billing membership of org A", me.status, me.body)
	}
}

// The browser sign-in: authorize → IdP → exchange → tokens that authenticate, and
// refresh through the IdP.
func TestOIDCBrowserSignIn(t *testing.T) {
	e := newEnv(t)
	r := e.call("GET", "/api/v1/auth/oidc/authorize?return_to=/projects", "", nil)
	if r.status != http.StatusFound {
		t.Fatalf("authorize: %d %s", r.status, r.body)
	}
	loc, err := url.Parse(r.header.Get("Location"))
	if err != nil || loc.Query().Get("code_challenge_method") != "S256" || loc.Query().Get("state") == "" {
		t.Fatalf("authorize redirect %q lacks PKCE or state", r.header.Get("Location"))
	}
	code, state := e.issuer.Authorize(loc.String())
	before := e.auditCount("success")
	ex := e.call("POST", "/api/v1/auth/oidc/exchange", "", map[string]string{"code": code, "state": state})
	if ex.status != 200 {
		t.Fatalf("exchange: %d %s", ex.status, ex.body)
	}
	// First sign-in: the user is created (user.create) and signs in (auth.login).
	if n := e.auditCount("success") - before; n != 2 {
		t.Fatalf("first sign-in wrote %d audit rows, want 2", n)
	}
	var tok struct {
		AccessToken  string `json:"access_token"`
		RefreshToken string `json:"refresh_token"`
		ReturnTo     string `json:"return_to"`
	}
	ex.json(t, &tok)
	if tok.ReturnTo != "/projects" {
		t.Fatalf("return_to %q", tok.ReturnTo)
	}
	if me := e.call("GET", "/api/v1/users/me", tok.AccessToken, nil); me.status != 200 {
		t.Fatalf("me with the access token: %d %s", me.status, me.body)
	}
	// The state works once.
	if again := e.call("POST", "/api/v1/auth/oidc/exchange", "", map[string]string{"code": code, "state": state}); again.status != 401 {
		t.Fatalf("replayed state: %d %s", again.status, again.body)
	}
	if ref := e.send("POST", "/api/v1/auth/token/refresh", "", map[string]string{"refresh_token": tok.RefreshToken}); ref.status != 200 {
		t.Fatalf("refresh: %d %s", ref.status, ref.body)
	}
	// Open redirects are refused.
	for _, bad := range []string{"https://evil.example/", "//evil.example", "/\\evil"} {
		if r := e.call("GET", "/api/v1/auth/oidc/authorize?return_to="+url.QueryEscape(bad), "", nil); r.status != 400 {
			t.Errorf("return_to %q: %d", bad, r.status)
		}
	}
}

// Local accounts: sign in, use, refresh (rotating), sign out.
func TestLocalSession(t *testing.T) {
	e := newEnv(t)
	ctx := principal.With(context.Background(), principal.SystemPrincipal("test"))
	if _, err := e.ids.CreateLocalUser(ctx, "ada@example.test", "Ada", "correct horse battery", false); err != nil {
		t.Fatal(err)
	}
	if r := e.send("POST", "/api/v1/auth/local/login", "", map[string]string{"login": "ada@example.test", "password": "wrong password!!"}); r.status != 401 || r.code() != "invalid_credentials" {
		t.Fatalf("wrong password: %d %s", r.status, r.body)
	}
	if e.auditCount("failure") == 0 {
		t.Fatal("a failed login left no audit row")
	}
	r := e.send("POST", "/api/v1/auth/local/login", "", map[string]string{"login": "ADA@example.test", "password": "correct horse battery"})
	if r.status != 200 {
		t.Fatalf("login: %d %s", r.status, r.body)
	}
	var tok struct {
		AccessToken  string `json:"access_token"`
		RefreshToken string `json:"refresh_token"`
	}
	r.json(t, &tok)
	if me := e.call("GET", "/api/v1/users/me", tok.AccessToken, nil); me.status != 200 || !strings.Contains(string(me.body), `"auth_method":"session"`) {
		t.Fatalf("me: %d %s", me.status, me.body)
	}
	ref := e.send("POST", "/api/v1/auth/token/refresh", "", map[string]string{"refresh_token": tok.RefreshToken})
	if ref.status != 200 {
		t.Fatalf("refresh: %d %s", ref.status, ref.body)
	}
	var next struct {
		AccessToken  string `json:"access_token"`
		RefreshToken string `json:"refresh_token"`
	}
	ref.json(t, &next)
	if old := e.call("GET", "/api/v1/users/me", tok.AccessToken, nil); old.status != 401 {
		t.Fatalf("the access token before refresh still works: %d", old.status)
	}
	if reuse := e.call("POST", "/api/v1/auth/token/refresh", "", map[string]string{"refresh_token": tok.RefreshToken}); reuse.status != 401 {
		t.Fatalf("a used refresh token works again: %d", reuse.status)
	}
	if out := e.send("POST", "/api/v1/auth/logout", next.AccessToken, nil); out.status != 200 {
		t.Fatalf("logout: %d %s", out.status, out.body)
	}
	if after := e.call("GET", "/api/v1/users/me", next.AccessToken, nil); after.status != 401 {
		t.Fatalf("the session works after logout: %d", after.status)
	}
}

// A revoked key stops working at once; a disabled user is cut off.
func TestRevocationIsImmediate(t *testing.T) {
	e := newEnv(t)
	w := e.newWorld()
	tok, id := w.tokens[member], w.keyIDs[member]
	if r := e.call("GET", "/api/v1/users/me", tok, nil); r.status != 200 {
		t.Fatal(r.status)
	}
	if r := e.send("DELETE", "/api/v1/users/me/api-keys/"+id.String(), tok, nil); r.status != 204 {
		t.Fatalf("revoke: %d %s", r.status, r.body)
	}
	if r := e.call("GET", "/api/v1/users/me", tok, nil); r.status != 401 || r.code() != "api_key_revoked" {
		t.Fatalf("revoked key: %d %s", r.status, r.body)
	}
	vt := w.tokens[viewer]
	if r := e.call("GET", "/api/v1/users/me", vt, nil); r.status != 200 {
		t.Fatal(r.status)
	}
	if r := e.send("PATCH", "/api/v1/admin/users/"+w.users[viewer].String(), w.tokens[platAdmin], map[string]string{"status": "disabled"}); r.status != 200 {
		t.Fatalf("disable: %d %s", r.status, r.body)
	}
	if r := e.call("GET", "/api/v1/users/me", vt, nil); r.status != 401 || r.code() != "account_disabled" {
		t.Fatalf("disabled user: %d %s", r.status, r.body)
	}
}

// The audit log API filters, pages and exports.
func TestAuditLogAPI(t *testing.T) {
	e := newEnv(t)
	w := e.newWorld()
	admin := w.tokens[platAdmin]
	for i := range 5 {
		if r := e.send("PATCH", "/api/v1/orgs/"+w.orgA.String(), w.tokens[orgAdmin], map[string]string{"name": "Name " + string(rune('A'+i))}); r.status != 200 {
			t.Fatal(r.status)
		}
	}
	target := url.QueryEscape("gpuaas:local:" + w.orgA.String() + "::org:" + w.orgA.String())
	var seen []string
	cursor := ""
	for range 10 {
		q := "/api/v1/admin/audit-logs?action=org.update&limit=2&target=" + target
		if cursor != "" {
			q += "&cursor=" + cursor
		}
		r := e.call("GET", q, admin, nil)
		if r.status != 200 {
			t.Fatalf("%d %s", r.status, r.body)
		}
		var page struct {
			Items []struct {
				ID            string `json:"id"`
				Action        string `json:"action"`
				ActorID       string `json:"actor_id"`
				Result        string `json:"result"`
				CorrelationID string `json:"correlation_id"`
				SourceIP      string `json:"source_ip"`
			}
			NextCursor string `json:"next_cursor"`
		}
		r.json(t, &page)
		for _, it := range page.Items {
			if it.Action != "org.update" || it.ActorID != w.users[orgAdmin].String() || it.Result != "success" || it.CorrelationID == "" || it.SourceIP != "127.0.0.1" {
				t.Fatalf("row %+v", it)
			}
			seen = append(seen, it.ID)
		}
		if page.NextCursor == "" {
			break
		}
		cursor = page.NextCursor
	}
	if len(seen) != 5 {
		t.Fatalf("paged through %d rows, want 5", len(seen))
	}
	exp := e.call("GET", "/api/v1/admin/audit-logs/export?action=org.update&target="+target, admin, nil)
	if exp.status != 200 || !strings.HasPrefix(exp.header.Get("Content-Type"), "text/csv") {
		t.Fatalf("export: %d %s", exp.status, exp.header.Get("Content-Type"))
	}
	recs, err := csv.NewReader(strings.NewReader(string(exp.body))).ReadAll()
	if err != nil || len(recs) != 6 || recs[0][0] != "id" {
		t.Fatalf("csv: %v rows, err %v", len(recs), err)
	}
	if r := e.call("GET", "/api/v1/admin/audit-logs?from=2030-01-01T00:00:00Z&to=2020-01-01T00:00:00Z", admin, nil); r.status != 400 {
		t.Fatalf("inverted range: %d", r.status)
	}
	if r := e.call("GET", "/api/v1/admin/audit-logs?limit=500", admin, nil); r.status != 400 {
		t.Fatalf("limit 500: %d", r.status)
	}
}

// SSH keys: add, refuse a duplicate, list, and never touch another user's key.
func TestSSHKeysAPI(t *testing.T) {
	e := newEnv(t)
	w := e.newWorld()
	tok := w.tokens[member]
	r := e.send("POST", "/api/v1/ssh-keys", tok, map[string]string{"name": "laptop", "public_key": w.sshKey + " me@laptop"})
	if r.status != 201 || !strings.Contains(string(r.body), `"fingerprint":"SHA256:`) {
		t.Fatalf("add: %d %s", r.status, r.body)
	}
	var k struct {
		ID string `json:"id"`
	}
	r.json(t, &k)
	if dup := e.send("POST", "/api/v1/ssh-keys", tok, map[string]string{"name": "again", "public_key": w.sshKey}); dup.status != 409 || dup.code() != "ssh_key_exists" {
		t.Fatalf("duplicate: %d %s", dup.status, dup.body)
	}
	if other := e.send("POST", "/api/v1/ssh-keys", w.tokens[viewer], map[string]string{"name": "same key, other user", "public_key": w.sshKey}); other.status != 201 {
		t.Fatalf("the same key for another user: %d %s", other.status, other.body)
	}
	if bad := e.send("POST", "/api/v1/ssh-keys", tok, map[string]string{"name": "x", "public_key": "ssh-rsa AAAA; rm -rf /"}); bad.status != 400 || bad.code() != "invalid_ssh_key" {
		t.Fatalf("bad key: %d %s", bad.status, bad.body)
	}
	if l := e.call("GET", "/api/v1/ssh-keys", tok, nil); l.status != 200 || strings.Count(string(l.body), `"fingerprint"`) != 1 {
		t.Fatalf("list: %d %s", l.status, l.body)
	}
	if d := e.send("DELETE", "/api/v1/ssh-keys/"+k.ID, w.tokens[viewer], nil); d.status != 404 {
		t.Fatalf("another user deletes the key: %d", d.status)
	}
	if d := e.send("DELETE", "/api/v1/ssh-keys/"+k.ID, tok, nil); d.status != 204 {
		t.Fatalf("delete: %d %s", d.status, d.body)
	}
}

// The catalog: admins create and change SKUs (validated, audited); everyone sees
// the active ones.
func TestCatalogAPI(t *testing.T) {
	e := newEnv(t)
	w := e.newWorld()
	admin := w.tokens[platAdmin]
	sku := map[string]any{"id": "l40s-x4", "gpu_model": "NVIDIA L40S", "gpus_per_node": 4, "cpu_cores": 48, "memory_gib": 384,
		"disk_gib": 3840, "price_per_gpu_hour_minor": 119, "currency": "USD"}
	if r := e.send("POST", "/api/v1/admin/skus", admin, sku); r.status != 201 {
		t.Fatalf("create: %d %s", r.status, r.body)
	}
	if r := e.send("POST", "/api/v1/admin/skus", admin, sku); r.status != 409 || r.code() != "sku_exists" {
		t.Fatalf("duplicate: %d %s", r.status, r.body)
	}
	for field, bad := range map[string]any{"gpus_per_node": 0, "currency": "usd", "price_per_gpu_hour_minor": -1, "id": "Bad Id"} {
		b := map[string]any{}
		for k, v := range sku {
			b[k] = v
		}
		b["id"] = "x-" + strings.ReplaceAll(field, "_", "-")
		b[field] = bad
		if r := e.send("POST", "/api/v1/admin/skus", admin, b); r.status != 400 || !strings.Contains(string(r.body), field) {
			t.Errorf("%s=%v: %d %s", field, bad, r.status, r.body)
		}
	}
	if r := e.call("GET", "/api/v1/skus", "", nil); r.status != 200 || !strings.Contains(string(r.body), `"l40s-x4"`) {
		t.Fatalf("public list: %d %s", r.status, r.body)
	}
	if r := e.send("PATCH", "/api/v1/admin/skus/l40s-x4", admin, map[string]any{"active": false, "price_per_gpu_hour_minor": 99}); r.status != 200 || !strings.Contains(string(r.body), `"price_per_gpu_hour_minor":99`) {
		t.Fatalf("update: %d %s", r.status, r.body)
	}
	if r := e.call("GET", "/api/v1/skus", "", nil); strings.Contains(string(r.body), `"l40s-x4"`) {
		t.Fatalf("an inactive SKU is listed publicly: %s", r.body)
	}
	if r := e.call("GET", "/api/v1/admin/skus", admin, nil); !strings.Contains(string(r.body), `"l40s-x4"`) {
		t.Fatalf("admin list misses the inactive SKU: %s", r.body)
	}
}
