package identity

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/events"
	"github.com/gpuaas/gpuaas/core/internal/principal"
)

// TokenVerifier verifies an OIDC bearer token (a JWT from the configured IdP).
type TokenVerifier interface {
	VerifyIdentity(ctx context.Context, raw string) (OIDCIdentity, error)
}

// Authenticator turns an Authorization header into a principal. Lookups are cached
// per instance for a short TTL; revocations reach every instance's cache through
// system.credentials.revoked, so a revoked key stops working at once on the
// instance that revoked it and within moments elsewhere.
type Authenticator struct {
	svc      *Service
	oidc     TokenVerifier
	ttl      time.Duration
	now      func() time.Time
	mu       sync.Mutex
	cache    map[string]cachedAuth // by token hash (hex) or "oidc:" + iss + sub
	lastUsed map[uuid.UUID]time.Time
	results  *prometheus.CounterVec
}

type cachedAuth struct {
	p       *principal.Principal
	err     error
	expires time.Time // of the credential
	fetched time.Time
	tags    []string // invalidation tags: an API key prefix, "session:{id}", "user:{id}"
}

// NewAuthenticator returns an Authenticator. verifier may be nil when no IdP is
// configured (bearer JWTs are then refused).
func NewAuthenticator(svc *Service, verifier TokenVerifier, reg prometheus.Registerer) *Authenticator {
	a := &Authenticator{svc: svc, oidc: verifier, ttl: 30 * time.Second, now: svc.now,
		cache: map[string]cachedAuth{}, lastUsed: map[uuid.UUID]time.Time{},
		results: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "gpuaas_auth_attempts_total", Help: "Authentication attempts by method and result code."}, []string{"method", "result"}),
	}
	if reg != nil {
		reg.MustRegister(a.results)
	}
	return a
}

// Authenticate checks the bearer in header ("Bearer <token>"). It returns nil and no
// error when header is empty (an anonymous call); every failure is a coded 401.
func (a *Authenticator) Authenticate(ctx context.Context, header string) (*principal.Principal, error) {
	if header == "" {
		return nil, nil
	}
	scheme, token, ok := strings.Cut(header, " ")
	token = strings.TrimSpace(token)
	if !ok || !strings.EqualFold(scheme, "Bearer") || token == "" {
		a.results.WithLabelValues("unknown", string(CodeInvalidToken)).Inc()
		return nil, errcode.New(CodeInvalidToken, "Authorization must be \"Bearer <token>\"")
	}
	var method string
	var p *principal.Principal
	var err error
	switch {
	case strings.HasPrefix(token, apiKeyPrefix):
		method = "api_key"
		p, err = a.apiKey(ctx, token)
	case strings.HasPrefix(token, sessionPrefix):
		method = "session"
		p, err = a.session(ctx, token)
	case strings.Count(token, ".") == 2:
		method = "oidc"
		p, err = a.jwt(ctx, token)
	default:
		method = "unknown"
		err = errcode.New(CodeInvalidToken, "unrecognised bearer token")
	}
	result := "ok"
	if err != nil {
		result = string(errcode.Of(err))
	}
	a.results.WithLabelValues(method, result).Inc()
	return p, err
}

func (a *Authenticator) cached(key string) (cachedAuth, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	c, ok := a.cache[key]
	if !ok || a.now().Sub(c.fetched) >= a.ttl {
		return cachedAuth{}, false
	}
	return c, true
}

func (a *Authenticator) store(key string, c cachedAuth) {
	c.fetched = a.now()
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.cache) > 100_000 {
		clear(a.cache) // bounded memory; entries are cheap to rebuild
	}
	a.cache[key] = c
}

// InvalidateKeyID drops the cached API key with that id.
func (a *Authenticator) InvalidateKeyID(id uuid.UUID) { a.Invalidate("keyid:" + id.String()) }

// Invalidate drops every cached entry carrying tag.
func (a *Authenticator) Invalidate(tag string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for k, c := range a.cache {
		for _, t := range c.tags {
			if t == tag {
				delete(a.cache, k)
				break
			}
		}
	}
}

func (a *Authenticator) check(c cachedAuth) (*principal.Principal, error) {
	if c.err != nil {
		return nil, c.err
	}
	if !c.expires.IsZero() && !a.now().Before(c.expires) {
		return nil, errcode.New(CodeAPIKeyExpired, "the credential has expired")
	}
	return c.p, nil
}

func (a *Authenticator) apiKey(ctx context.Context, token string) (*principal.Principal, error) {
	prefix, ok := splitToken(token, apiKeyPrefix)
	if !ok {
		return nil, errcode.New(CodeInvalidToken, "malformed API key")
	}
	hash := hashToken(token)
	key := hex.EncodeToString(hash)
	if c, ok := a.cached(key); ok {
		p, err := a.check(c)
		if err == nil {
			a.touch(p.KeyID)
		}
		return p, err
	}
	var (
		id, ownerID               uuid.UUID
		stored                    []byte
		expiresAt, revokedAt      *time.Time
		userID, saID              *uuid.UUID
		isAdmin                   bool
		status, email, name, role string
		orgID, projectID          *uuid.UUID
		saDisabled                *time.Time
	)
	err := a.svc.pool.QueryRow(ctx, `
		SELECT k.id, k.secret_hash, k.expires_at, k.revoked_at, k.user_id, k.service_account_id,
			coalesce(u.is_platform_admin, false), coalesce(u.status, 'active'), coalesce(u.email, ''),
			coalesce(u.display_name, sa.name, ''), coalesce(sa.role, ''), sa.org_id, sa.project_id, sa.disabled_at
		FROM api_keys k
		LEFT JOIN users u ON u.id = k.user_id
		LEFT JOIN service_accounts sa ON sa.id = k.service_account_id
		WHERE k.prefix = $1`, prefix).
		Scan(&id, &stored, &expiresAt, &revokedAt, &userID, &saID, &isAdmin, &status, &email, &name, &role, &orgID, &projectID, &saDisabled)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, errcode.New(CodeInvalidToken, "unknown API key")
	}
	if err != nil {
		return nil, fmt.Errorf("identity: look up api key: %w", err)
	}
	if !hashEqual(stored, hash) {
		return nil, errcode.New(CodeInvalidToken, "unknown API key")
	}
	c := cachedAuth{tags: []string{prefix, "keyid:" + id.String()}}
	switch {
	case revokedAt != nil:
		c.err = errcode.New(CodeAPIKeyRevoked, "the API key was revoked")
	case status != "active" || saDisabled != nil:
		c.err = errcode.New(CodeAccountDisabled, "the account of this API key is disabled")
	}
	if expiresAt != nil {
		c.expires = *expiresAt
	}
	p := &principal.Principal{Method: principal.MethodAPIKey, KeyID: id, Email: email, Name: name}
	if userID != nil {
		ownerID = *userID
		p.Type, p.ID, p.IsPlatformAdmin = principal.User, ownerID, isAdmin
		c.tags = append(c.tags, "user:"+ownerID.String())
	} else {
		p.Type, p.ID, p.OrgID, p.ProjectID, p.ProjectRole = principal.ServiceAccount, *saID, *orgID, *projectID, role
		c.tags = append(c.tags, "user:"+saID.String())
	}
	c.p = p
	a.store(key, c)
	p, err = a.check(c)
	if err == nil {
		a.touch(p.KeyID)
	}
	return p, err
}

func (a *Authenticator) session(ctx context.Context, token string) (*principal.Principal, error) {
	if _, ok := splitToken(token, sessionPrefix); !ok {
		return nil, errcode.New(CodeInvalidToken, "malformed session token")
	}
	hash := hashToken(token)
	key := hex.EncodeToString(hash)
	if c, ok := a.cached(key); ok {
		return a.checkSession(c)
	}
	var (
		sid, uid          uuid.UUID
		expires           time.Time
		revoked           *time.Time
		isAdmin           bool
		status, email, nm string
	)
	err := a.svc.pool.QueryRow(ctx, `SELECT s.id, s.user_id, s.access_expires_at, s.revoked_at, u.is_platform_admin, u.status, u.email, u.display_name
		FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.access_hash = $1`, hash).
		Scan(&sid, &uid, &expires, &revoked, &isAdmin, &status, &email, &nm)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, errcode.New(CodeInvalidToken, "unknown or rotated session token")
	}
	if err != nil {
		return nil, fmt.Errorf("identity: look up session: %w", err)
	}
	c := cachedAuth{expires: expires, tags: []string{"session:" + sid.String(), "user:" + uid.String()},
		p: &principal.Principal{Type: principal.User, ID: uid, Method: principal.MethodSession, KeyID: sid, IsPlatformAdmin: isAdmin, Email: email, Name: nm}}
	switch {
	case revoked != nil:
		c.err = errcode.New(CodeInvalidToken, "the session has ended; sign in again")
	case status != "active":
		c.err = errcode.New(CodeAccountDisabled, "the account is disabled")
	}
	a.store(key, c)
	return a.checkSession(c)
}

func (a *Authenticator) checkSession(c cachedAuth) (*principal.Principal, error) {
	if c.err != nil {
		return nil, c.err
	}
	if !a.now().Before(c.expires) {
		return nil, errcode.New(CodeInvalidToken, "the session token has expired; refresh it")
	}
	return c.p, nil
}

func (a *Authenticator) jwt(ctx context.Context, token string) (*principal.Principal, error) {
	if a.oidc == nil {
		return nil, errcode.New(CodeOIDCNotConfigured, "this deployment accepts no OIDC tokens; use an API key")
	}
	id, err := a.oidc.VerifyIdentity(ctx, token)
	if err != nil {
		return nil, err
	}
	key := "oidc:" + id.Issuer + "\x00" + id.Subject
	if c, ok := a.cached(key); ok {
		return a.check(c)
	}
	u, err := a.svc.userByOIDC(ctx, id)
	if err != nil {
		return nil, err
	}
	c := cachedAuth{tags: []string{"user:" + u.ID.String()},
		p: &principal.Principal{Type: principal.User, ID: u.ID, Method: principal.MethodOIDC, IsPlatformAdmin: u.IsPlatformAdmin, Email: u.Email, Name: u.DisplayName}}
	if u.Status != "active" {
		c.err = errcode.New(CodeAccountDisabled, "the account is disabled")
	}
	a.store(key, c)
	return a.check(c)
}

// userByOIDC finds the user of a verified token, creating it on first sight.
func (s *Service) userByOIDC(ctx context.Context, id OIDCIdentity) (*User, error) {
	u, err := scanUser(s.pool.QueryRow(ctx, `SELECT `+userColumns+` FROM users WHERE oidc_issuer = $1 AND oidc_subject = $2`, id.Issuer, id.Subject))
	if err == nil {
		return u, nil
	}
	if !errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("identity: look up oidc user: %w", err)
	}
	return s.UpsertOIDCUser(ctx, id)
}

func (a *Authenticator) touch(keyID uuid.UUID) {
	a.mu.Lock()
	a.lastUsed[keyID] = a.now()
	a.mu.Unlock()
}

// Run flushes API keys' last-used times every interval and follows revocations
// until ctx is done.
func (a *Authenticator) Run(ctx context.Context, js jetstream.JetStream, interval time.Duration) {
	if js != nil {
		go events.Follow(ctx, js, "SYSTEM", events.SubjectSystemCredentialsRevoked, a.svc.log, a.flushCache, func(data []byte) {
			var ev CredentialRevoked
			if json.Unmarshal(data, &ev) == nil && ev.Credential != "" {
				a.Invalidate(ev.Credential)
			}
		})
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			a.FlushLastUsed(context.WithoutCancel(ctx))
			return
		case <-t.C:
			a.FlushLastUsed(ctx)
		}
	}
}

func (a *Authenticator) flushCache() {
	a.mu.Lock()
	defer a.mu.Unlock()
	clear(a.cache)
}

// FlushLastUsed writes buffered last-used times in one statement.
func (a *Authenticator) FlushLastUsed(ctx context.Context) {
	a.mu.Lock()
	if len(a.lastUsed) == 0 {
		a.mu.Unlock()
		return
	}
	ids := make([]uuid.UUID, 0, len(a.lastUsed))
	ts := make([]time.Time, 0, len(a.lastUsed))
	for id, t := range a.lastUsed {
		ids = append(ids, id)
		ts = append(ts, t)
	}
	clear(a.lastUsed)
	a.mu.Unlock()
	_, err := a.svc.pool.Exec(ctx, `UPDATE api_keys k SET last_used_at = v.t
		FROM unnest($1::uuid[], $2::timestamptz[]) AS v(id, t)
		WHERE k.id = v.id AND (k.last_used_at IS NULL OR k.last_used_at < v.t)`, ids, ts)
	if err != nil {
		a.svc.log.Debug("flush api key last-used times", "error", err)
	}
}
