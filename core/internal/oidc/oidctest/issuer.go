// Package oidctest runs an OpenID Connect provider inside a test: discovery, a JSON
// Web Key Set, an authorization endpoint that approves every login for a configured
// test user, a token endpoint (authorization_code with PKCE S256, refresh_token) and
// an end-session endpoint, all with real keys. It also mints tokens, valid and
// hostile, for verifier tests.
//
//	iss := oidctest.New(t)                                   // RS256, client "gpuaas-test"
//	tok := iss.Mint()                                        // a valid access token
//	old := iss.Mint(oidctest.Claims{"exp": time.Now().Add(-time.Hour)})
//	bad := iss.MintHS256WithPublicKey()                      // algorithm confusion attack
//
//	v, _ := oidc.NewVerifier(ctx, iss.Config())              // a verifier of this issuer
//	pkce := oidc.NewPKCE()
//	code, state := iss.Authorize(v.AuthCodeURL(state, nonce, pkce.Challenge)) // the browser part
//	ts, _ := v.Exchange(ctx, code, pkce.Verifier, "", nonce)
//
// Nothing needs a network beyond loopback; the server is closed by t.Cleanup.
package oidctest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/gpuaas/gpuaas/core/internal/oidc"
)

// DefaultClientID is the client id of an Issuer made without WithClient.
const DefaultClientID = "gpuaas-test"

// User is the person the authorization endpoint logs in and tokens are minted for.
type User struct {
	Subject           string
	Email             string
	EmailVerified     bool
	Name              string
	PreferredUsername string
	// Claims are added to every token minted for the user (groups, roles, ...).
	Claims map[string]any
}

// DefaultUser is the user of an Issuer made without WithUser.
func DefaultUser() User {
	return User{
		Subject:           "test-user",
		Email:             "test-user@example.test",
		EmailVerified:     true,
		Name:              "Test User",
		PreferredUsername: "test-user",
	}
}

// Option configures an Issuer.
type Option func(*config)

type config struct {
	algs             []string
	clientID         string
	clientSecret     string
	audience         string
	user             User
	now              func() time.Time
	tokenTTL         time.Duration
	codeTTL          time.Duration
	discoveredIssuer string
	endSession       bool
	keepRotated      bool
}

// WithAlgs sets the signature algorithms the issuer has keys for, one key each (RSA
// 2048 for RS*/PS*, the matching curve for ES*, Ed25519 for EdDSA). The first is the
// algorithm of Mint and of the token endpoint. Default: RS256.
func WithAlgs(algs ...string) Option { return func(c *config) { c.algs = algs } }

// WithClient registers the OAuth client: its id and, for a confidential client, its
// secret (empty: a public client). Default: DefaultClientID, public.
func WithClient(id, secret string) Option {
	return func(c *config) { c.clientID, c.clientSecret = id, secret }
}

// WithAudience sets the aud of access tokens (the API audience). Default: the client id.
func WithAudience(aud string) Option { return func(c *config) { c.audience = aud } }

// WithUser sets the user logged in by the authorization endpoint. Default: DefaultUser().
func WithUser(u User) Option { return func(c *config) { c.user = u } }

// WithClock sets the clock used for iat, exp and code expiry. Default: time.Now.
func WithClock(now func() time.Time) Option { return func(c *config) { c.now = now } }

// WithTokenTTL sets the lifetime of minted and issued tokens. Default: one hour.
func WithTokenTTL(d time.Duration) Option { return func(c *config) { c.tokenTTL = d } }

// WithDiscoveredIssuer makes the discovery document advertise iss instead of the
// issuer's own URL, as a misconfigured or impersonating provider would.
func WithDiscoveredIssuer(iss string) Option { return func(c *config) { c.discoveredIssuer = iss } }

// WithoutEndSession removes end_session_endpoint from the discovery document.
func WithoutEndSession() Option { return func(c *config) { c.endSession = false } }

// WithKeepRotatedKeys makes RotateKeys keep publishing the previous keys (a grace
// period); by default they are removed from the key set.
func WithKeepRotatedKeys() Option { return func(c *config) { c.keepRotated = true } }

// Issuer is an OpenID Connect provider served by an httptest.Server. Its methods are
// safe for concurrent use; those that can fail the test must be called from the
// test's goroutine.
type Issuer struct {
	tb  testing.TB
	cfg config
	srv *httptest.Server

	mu             sync.Mutex
	keys           []*signingKey // published; the last key of an algorithm is its current one
	retired        []*signingKey // removed from the key set by RotateKeys
	user           User
	codes          map[string]*authCode
	refreshTokens  map[string]*grant
	authorizeError string
	jwksStatus     int
	kidSeq         int

	jwksFetches      atomic.Int64
	discoveryFetches atomic.Int64
	tokenRequests    atomic.Int64
}

// signingKey is one private key of the issuer.
type signingKey struct {
	kid  string
	alg  string
	priv crypto.Signer
}

// authCode is an issued, not yet redeemed authorization code.
type authCode struct {
	redirectURI string
	challenge   string
	nonce       string
	scope       string
	user        User
	expires     time.Time
}

// grant is what a refresh token stands for.
type grant struct {
	scope string
	user  User
}

// New starts an Issuer; t.Cleanup closes it.
func New(tb testing.TB, opts ...Option) *Issuer {
	tb.Helper()
	cfg := config{
		algs:       []string{"RS256"},
		clientID:   DefaultClientID,
		user:       DefaultUser(),
		now:        time.Now,
		tokenTTL:   time.Hour,
		codeTTL:    time.Minute,
		endSession: true,
	}
	for _, opt := range opts {
		opt(&cfg)
	}
	if cfg.audience == "" {
		cfg.audience = cfg.clientID
	}
	if len(cfg.algs) == 0 {
		tb.Fatal("oidctest: WithAlgs needs at least one algorithm")
	}
	i := &Issuer{
		tb:            tb,
		cfg:           cfg,
		user:          cfg.user,
		codes:         make(map[string]*authCode),
		refreshTokens: make(map[string]*grant),
		jwksStatus:    http.StatusOK,
	}
	for _, alg := range cfg.algs {
		k, err := i.newKey(alg)
		if err != nil {
			tb.Fatalf("oidctest: %v", err)
		}
		i.keys = append(i.keys, k)
	}

	mux := http.NewServeMux()
	mux.HandleFunc("GET /.well-known/openid-configuration", i.serveDiscovery)
	mux.HandleFunc("GET /jwks", i.serveJWKS)
	mux.HandleFunc("GET /authorize", i.serveAuthorize)
	mux.HandleFunc("POST /token", i.serveToken)
	mux.HandleFunc("GET /logout", i.serveLogout)
	i.srv = httptest.NewServer(mux)
	tb.Cleanup(i.srv.Close)
	return i
}

// URL returns the issuer identifier (the iss of its tokens), which is also the base
// URL of its endpoints.
func (i *Issuer) URL() string { return i.srv.URL }

// Config returns an oidc.Config for this issuer: issuer URL, audience, client id and
// secret, a redirect URL, the server's HTTP client and the issuer's clock.
func (i *Issuer) Config() oidc.Config {
	return oidc.Config{
		IssuerURL:    i.URL(),
		Audience:     i.cfg.audience,
		ClientID:     i.cfg.clientID,
		ClientSecret: oidc.Secret(i.cfg.clientSecret),
		RedirectURL:  "https://gpuaas.test/callback",
		HTTPClient:   i.Client(),
		Now:          i.cfg.now,
	}
}

// Client returns an HTTP client for the issuer's server.
func (i *Issuer) Client() *http.Client { return i.srv.Client() }

// ClientID returns the registered client id.
func (i *Issuer) ClientID() string { return i.cfg.clientID }

// Audience returns the aud of access tokens.
func (i *Issuer) Audience() string { return i.cfg.audience }

// User returns the user logins are approved for.
func (i *Issuer) User() User {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.user
}

// SetUser changes the user later logins are approved for.
func (i *Issuer) SetUser(u User) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.user = u
}

// SetAuthorizeError makes the authorization endpoint redirect back with this OAuth
// error (for example "access_denied") instead of a code; "" restores approvals.
func (i *Issuer) SetAuthorizeError(code string) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.authorizeError = code
}

// SetJWKSStatus makes the key set endpoint answer with status (for example 503, to
// simulate an outage); http.StatusOK restores it.
func (i *Issuer) SetJWKSStatus(status int) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.jwksStatus = status
}

// JWKSFetches returns how many times the key set was requested.
func (i *Issuer) JWKSFetches() int { return int(i.jwksFetches.Load()) }

// DiscoveryFetches returns how many times the discovery document was requested.
func (i *Issuer) DiscoveryFetches() int { return int(i.discoveryFetches.Load()) }

// TokenRequests returns how many requests reached the token endpoint.
func (i *Issuer) TokenRequests() int { return int(i.tokenRequests.Load()) }

// KeyID returns the kid of the current key of alg ("" means the default algorithm).
func (i *Issuer) KeyID(alg string) string {
	i.tb.Helper()
	return i.currentKey(alg).kid
}

// PublishedKeyIDs returns the kids of the key set, in publication order.
func (i *Issuer) PublishedKeyIDs() []string {
	i.mu.Lock()
	defer i.mu.Unlock()
	kids := make([]string, len(i.keys))
	for n, k := range i.keys {
		kids[n] = k.kid
	}
	return kids
}

// RotateKeys creates a new key for every algorithm, which becomes the current one.
// The previous keys leave the key set unless WithKeepRotatedKeys was given; tokens
// can still be minted with them through Token().KeyID(oldKid).
func (i *Issuer) RotateKeys() {
	i.tb.Helper()
	fresh := make([]*signingKey, 0, len(i.cfg.algs))
	for _, alg := range i.cfg.algs {
		k, err := i.newKey(alg)
		if err != nil {
			i.tb.Fatalf("oidctest: rotate keys: %v", err)
		}
		fresh = append(fresh, k)
	}
	i.mu.Lock()
	defer i.mu.Unlock()
	if !i.cfg.keepRotated {
		i.retired = append(i.retired, i.keys...)
		i.keys = nil
	}
	i.keys = append(i.keys, fresh...)
}

// newKey generates a key for alg with the next kid.
func (i *Issuer) newKey(alg string) (*signingKey, error) {
	var (
		priv crypto.Signer
		err  error
	)
	switch alg {
	case "RS256", "RS384", "RS512", "PS256", "PS384", "PS512":
		priv, err = rsa.GenerateKey(rand.Reader, 2048)
	case "ES256":
		priv, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case "ES384":
		priv, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case "ES512":
		priv, err = ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	case "EdDSA":
		_, priv, err = ed25519.GenerateKey(rand.Reader)
	default:
		return nil, fmt.Errorf("unsupported algorithm %q", alg)
	}
	if err != nil {
		return nil, fmt.Errorf("generate %s key: %w", alg, err)
	}
	i.mu.Lock()
	i.kidSeq++
	// The random part keeps kids of different issuers in one test apart.
	kid := fmt.Sprintf("%s-%d-%s", strings.ToLower(alg), i.kidSeq, randomValue()[:6])
	i.mu.Unlock()
	return &signingKey{kid: kid, alg: alg, priv: priv}, nil
}

// currentKey returns the current key of alg ("" means the default algorithm) or
// fails the test.
func (i *Issuer) currentKey(alg string) *signingKey {
	i.tb.Helper()
	k, err := i.lookupKey(alg)
	if err != nil {
		i.tb.Fatalf("oidctest: %v", err)
	}
	return k
}

// keyByID returns the published or retired key with kid, or nil.
func (i *Issuer) keyByID(kid string) *signingKey {
	i.mu.Lock()
	defer i.mu.Unlock()
	for _, k := range slices.Concat(i.keys, i.retired) {
		if k.kid == kid {
			return k
		}
	}
	return nil
}

func (i *Issuer) serveDiscovery(w http.ResponseWriter, _ *http.Request) {
	i.discoveryFetches.Add(1)
	issuer := i.URL()
	if i.cfg.discoveredIssuer != "" {
		issuer = i.cfg.discoveredIssuer
	}
	doc := map[string]any{
		"issuer":                                issuer,
		"authorization_endpoint":                i.URL() + "/authorize",
		"token_endpoint":                        i.URL() + "/token",
		"jwks_uri":                              i.URL() + "/jwks",
		"response_types_supported":              []string{"code"},
		"subject_types_supported":               []string{"public"},
		"id_token_signing_alg_values_supported": i.cfg.algs,
		"scopes_supported":                      []string{"openid", "profile", "email", "offline_access"},
		"grant_types_supported":                 []string{"authorization_code", "refresh_token"},
		"token_endpoint_auth_methods_supported": []string{"client_secret_basic", "client_secret_post", "none"},
		"code_challenge_methods_supported":      []string{"S256"},
	}
	if i.cfg.endSession {
		doc["end_session_endpoint"] = i.URL() + "/logout"
	}
	writeJSON(w, http.StatusOK, doc)
}

func (i *Issuer) serveJWKS(w http.ResponseWriter, _ *http.Request) {
	i.jwksFetches.Add(1)
	i.mu.Lock()
	status := i.jwksStatus
	set := jose.JSONWebKeySet{Keys: make([]jose.JSONWebKey, 0, len(i.keys))}
	for _, k := range i.keys {
		set.Keys = append(set.Keys, jose.JSONWebKey{Key: k.priv.Public(), KeyID: k.kid, Algorithm: k.alg, Use: "sig"})
	}
	i.mu.Unlock()
	if status != http.StatusOK {
		http.Error(w, "key set unavailable", status)
		return
	}
	writeJSON(w, http.StatusOK, set)
}

// serveAuthorize approves every valid authorization request for the current user.
// Errors about the client or redirect URI are shown (400), the others are sent back
// to the redirect URI, as RFC 6749 4.1.2.1 asks.
func (i *Issuer) serveAuthorize(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	if q.Get("client_id") != i.cfg.clientID {
		http.Error(w, "unknown client_id", http.StatusBadRequest)
		return
	}
	redirect, err := url.Parse(q.Get("redirect_uri"))
	if err != nil || !redirect.IsAbs() {
		http.Error(w, "redirect_uri must be an absolute URL", http.StatusBadRequest)
		return
	}
	back := func(params url.Values) {
		if state := q.Get("state"); state != "" {
			params.Set("state", state)
		}
		query := redirect.Query()
		for k, v := range params {
			query[k] = v
		}
		u := *redirect
		u.RawQuery = query.Encode()
		http.Redirect(w, r, u.String(), http.StatusFound)
	}
	fail := func(code, description string) {
		back(url.Values{"error": {code}, "error_description": {description}})
	}

	i.mu.Lock()
	forced, user := i.authorizeError, i.user
	i.mu.Unlock()
	switch {
	case forced != "":
		fail(forced, "refused by the test")
	case q.Get("response_type") != "code":
		fail("unsupported_response_type", "only response_type=code is supported")
	case !slices.Contains(strings.Fields(q.Get("scope")), "openid"):
		fail("invalid_scope", "scope must contain openid")
	case q.Get("code_challenge") == "" || q.Get("code_challenge_method") != "S256":
		fail("invalid_request", "PKCE with code_challenge_method=S256 is required")
	default:
		code := randomValue()
		i.mu.Lock()
		i.codes[code] = &authCode{
			redirectURI: q.Get("redirect_uri"),
			challenge:   q.Get("code_challenge"),
			nonce:       q.Get("nonce"),
			scope:       q.Get("scope"),
			user:        user,
			expires:     i.cfg.now().Add(i.cfg.codeTTL),
		}
		i.mu.Unlock()
		back(url.Values{"code": {code}})
	}
}

// serveToken implements the authorization_code (with PKCE S256) and refresh_token
// grants. Codes are single use; refresh tokens are rotated.
func (i *Issuer) serveToken(w http.ResponseWriter, r *http.Request) {
	i.tokenRequests.Add(1)
	if err := r.ParseForm(); err != nil {
		oauthError(w, http.StatusBadRequest, "invalid_request", "cannot parse the form")
		return
	}
	if !i.authenticateClient(r) {
		oauthError(w, http.StatusUnauthorized, "invalid_client", "client authentication failed")
		return
	}
	form := r.PostForm
	switch form.Get("grant_type") {
	case "authorization_code":
		i.mu.Lock()
		ac := i.codes[form.Get("code")]
		delete(i.codes, form.Get("code"))
		i.mu.Unlock()
		switch {
		case ac == nil || !i.cfg.now().Before(ac.expires):
			oauthError(w, http.StatusBadRequest, "invalid_grant", "unknown, used or expired code")
		case form.Get("redirect_uri") != ac.redirectURI:
			oauthError(w, http.StatusBadRequest, "invalid_grant", "redirect_uri does not match the authorization request")
		case !pkceMatches(form.Get("code_verifier"), ac.challenge):
			oauthError(w, http.StatusBadRequest, "invalid_grant", "PKCE verification failed")
		default:
			i.issue(w, ac.user, ac.scope, ac.nonce)
		}
	case "refresh_token":
		i.mu.Lock()
		g := i.refreshTokens[form.Get("refresh_token")]
		delete(i.refreshTokens, form.Get("refresh_token"))
		i.mu.Unlock()
		if g == nil {
			oauthError(w, http.StatusBadRequest, "invalid_grant", "unknown or used refresh token")
			return
		}
		i.issue(w, g.user, g.scope, "")
	default:
		oauthError(w, http.StatusBadRequest, "unsupported_grant_type", "only authorization_code and refresh_token")
	}
}

// authenticateClient checks client_secret_basic, client_secret_post or, for a
// public client, the client_id alone.
func (i *Issuer) authenticateClient(r *http.Request) bool {
	id, secret, basic := r.BasicAuth()
	if basic {
		var err1, err2 error
		id, err1 = url.QueryUnescape(id)
		secret, err2 = url.QueryUnescape(secret)
		if err1 != nil || err2 != nil {
			return false
		}
	} else {
		id, secret = r.PostForm.Get("client_id"), r.PostForm.Get("client_secret")
	}
	if id != i.cfg.clientID {
		return false
	}
	return subtle.ConstantTimeCompare([]byte(secret), []byte(i.cfg.clientSecret)) == 1
}

// issue writes a token response for user: an access token, an ID token (with nonce
// when the login sent one) and a new refresh token.
func (i *Issuer) issue(w http.ResponseWriter, user User, scope, nonce string) {
	now := i.cfg.now()
	access := i.tokenFor(user, now).Set("azp", i.cfg.clientID).Set("scope", scope)
	id := i.tokenFor(user, now).Audience(i.cfg.clientID).Set("azp", i.cfg.clientID).Set("auth_time", now)
	if nonce != "" {
		id.Set("nonce", nonce)
	}
	accessToken, err := access.sign()
	if err == nil {
		var idToken string
		if idToken, err = id.sign(); err == nil {
			refresh := randomValue()
			i.mu.Lock()
			i.refreshTokens[refresh] = &grant{scope: scope, user: user}
			i.mu.Unlock()
			writeJSON(w, http.StatusOK, map[string]any{
				"access_token":  accessToken,
				"token_type":    "Bearer",
				"expires_in":    int64(i.cfg.tokenTTL / time.Second),
				"refresh_token": refresh,
				"id_token":      idToken,
				"scope":         scope,
			})
			return
		}
	}
	oauthError(w, http.StatusInternalServerError, "server_error", err.Error())
}

// serveLogout ends the (imaginary) session and redirects to post_logout_redirect_uri.
func (i *Issuer) serveLogout(w http.ResponseWriter, r *http.Request) {
	if !i.cfg.endSession {
		http.NotFound(w, r)
		return
	}
	q := r.URL.Query()
	target, err := url.Parse(q.Get("post_logout_redirect_uri"))
	if err != nil || !target.IsAbs() {
		_, _ = fmt.Fprintln(w, "logged out")
		return
	}
	if state := q.Get("state"); state != "" {
		query := target.Query()
		query.Set("state", state)
		target.RawQuery = query.Encode()
	}
	http.Redirect(w, r, target.String(), http.StatusFound)
}

// Authorize follows authURL (from Verifier.AuthCodeURL) as a browser would and
// returns the code and state the issuer redirects back with. It fails the test if
// the issuer redirects with an error.
func (i *Issuer) Authorize(authURL string) (code, state string) {
	i.tb.Helper()
	back := i.AuthorizeRedirect(authURL).Query()
	if e := back.Get("error"); e != "" {
		i.tb.Fatalf("oidctest: authorization refused: %s: %s", e, back.Get("error_description"))
	}
	return back.Get("code"), back.Get("state")
}

// AuthorizeRedirect follows authURL and returns where the issuer redirects the
// browser, error redirects included.
func (i *Issuer) AuthorizeRedirect(authURL string) *url.URL {
	i.tb.Helper()
	client := *i.Client()
	client.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	resp, err := client.Get(authURL)
	if err != nil {
		i.tb.Fatalf("oidctest: authorize: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusFound {
		i.tb.Fatalf("oidctest: authorize: status %d, want a redirect", resp.StatusCode)
	}
	loc, err := resp.Location()
	if err != nil {
		i.tb.Fatalf("oidctest: authorize: %v", err)
	}
	return loc
}

func pkceMatches(verifier, challenge string) bool {
	if len(verifier) < 43 || len(verifier) > 128 {
		return false
	}
	sum := sha256.Sum256([]byte(verifier))
	return subtle.ConstantTimeCompare([]byte(base64.RawURLEncoding.EncodeToString(sum[:])), []byte(challenge)) == 1
}

func oauthError(w http.ResponseWriter, status int, code, description string) {
	writeJSON(w, status, map[string]string{"error": code, "error_description": description})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func randomValue() string {
	var b [32]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails
	return base64.RawURLEncoding.EncodeToString(b[:])
}
