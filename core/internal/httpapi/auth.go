package httpapi

import (
	"context"
	"strings"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/google/uuid"

	"github.com/gpuaas/gpuaas/core/internal/audit"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/httpapi/apigen"
	"github.com/gpuaas/gpuaas/core/internal/identity"
	"github.com/gpuaas/gpuaas/core/internal/policy"
	"github.com/gpuaas/gpuaas/core/internal/principal"
)

// OIDCFlow is the browser sign-in with the configured identity provider.
type OIDCFlow interface {
	// NewPKCE returns a fresh code verifier and its S256 challenge.
	NewPKCE() (verifier, challenge string)
	AuthCodeURL(state, nonce, challenge string) string
	// Exchange trades a code for tokens and verifies the ID token and its nonce.
	Exchange(ctx context.Context, code, verifier, nonce string) (identity.OIDCIdentity, *identity.TokenSet, error)
	Refresh(ctx context.Context, refreshToken string) (*identity.TokenSet, error)
	EndSessionURL() string
}

// authenticate resolves the bearer into a principal before routing. It does not
// refuse anything itself: a failure is kept for requireAuth, so the rate limiter
// between them counts failed attempts against the caller's address.
func (a *API) authenticate() fiber.Handler {
	return func(c *fiber.Ctx) error {
		header := c.Get(fiber.HeaderAuthorization)
		if header == "" {
			return c.Next()
		}
		if a.Auth == nil {
			c.Locals(localsAuthErr, errcode.New(errcode.ServiceUnavailable, "authentication is not configured"))
			return c.Next()
		}
		p, err := a.Auth.Authenticate(c.UserContext(), header)
		if err != nil {
			c.Locals(localsAuthErr, err)
			return c.Next()
		}
		SetPrincipal(c, p)
		return c.Next()
	}
}

// SetPrincipal makes p the authenticated principal of the request.
func SetPrincipal(c *fiber.Ctx, p *principal.Principal) {
	c.SetUserContext(principal.With(c.UserContext(), p))
	c.Locals(localsPrincipal, p)
}

// requireAuth refuses a request whose bearer failed, and an anonymous request to any
// route the contract does not mark public (security: []). public holds
// "METHOD /path" of the public routes, in Fiber syntax (/a/:param).
func requireAuth(public map[string]bool) fiber.Handler {
	var patterns [][]string // public routes with parameters, split into segments
	for k := range public {
		if strings.Contains(k, "/:") {
			patterns = append(patterns, strings.Split(k, "/"))
		}
	}
	isPublic := func(method, path string) bool {
		if public[method+" "+path] {
			return true
		}
		segs := strings.Split(method+" "+path, "/")
	next:
		for _, p := range patterns {
			if len(p) != len(segs) {
				continue
			}
			for i := range p {
				if strings.HasPrefix(p[i], ":") {
					if segs[i] == "" {
						continue next
					}
				} else if p[i] != segs[i] {
					continue next
				}
			}
			return true
		}
		return false
	}
	return func(c *fiber.Ctx) error {
		if err, _ := c.Locals(localsAuthErr).(error); err != nil {
			c.Set(fiber.HeaderWWWAuthenticate, `Bearer realm="gpuaas", error="invalid_token"`)
			return err
		}
		if PrincipalOf(c) == nil && !isPublic(c.Method(), c.Path()) {
			c.Set(fiber.HeaderWWWAuthenticate, `Bearer realm="gpuaas"`)
			return errcode.New(errcode.Unauthenticated, "authentication required: send Authorization: Bearer <token>")
		}
		return c.Next()
	}
}

const localsAuthErr = "gpuaas.auth_error"

const localsPrincipal = "gpuaas.principal"

// PrincipalOf returns the authenticated principal of the request, or nil.
func PrincipalOf(c *fiber.Ctx) *principal.Principal {
	p, _ := c.Locals(localsPrincipal).(*principal.Principal)
	return p
}

func caller(c *fiber.Ctx) (*principal.Principal, error) {
	if p := PrincipalOf(c); p != nil {
		return p, nil
	}
	return nil, errcode.New(errcode.Unauthenticated, "authentication required")
}

func (a *API) sessionTTLs(ctx context.Context) identity.SessionTTLs {
	return identity.SessionTTLs{
		Access:  policy.SessionTTL.Value(ctx, a.Policy, policy.Target{}),
		Refresh: policy.RefreshTTL.Value(ctx, a.Policy, policy.Target{}),
	}
}

func tokenResponse(ts *identity.TokenSet, returnTo string) apigen.TokenResponse {
	r := apigen.TokenResponse{AccessToken: ts.AccessToken, TokenType: apigen.Bearer, ExpiresAt: ts.ExpiresAt.UTC()}
	if ts.RefreshToken != "" {
		r.RefreshToken = &ts.RefreshToken
	}
	if !ts.RefreshExpiresAt.IsZero() {
		t := ts.RefreshExpiresAt.UTC()
		r.RefreshExpiresAt = &t
	}
	if ts.IDToken != "" {
		r.IdToken = &ts.IDToken
	}
	if returnTo != "" {
		r.ReturnTo = &returnTo
	}
	return r
}

// OidcAuthorize starts a browser sign-in.
func (a *API) OidcAuthorize(c *fiber.Ctx, params apigen.OidcAuthorizeParams) error {
	if a.OIDC == nil {
		return errcode.New(identity.CodeOIDCNotConfigured, "no OIDC identity provider is configured")
	}
	returnTo := ""
	if params.ReturnTo != nil {
		returnTo = *params.ReturnTo
		// Only local paths: an open redirect would hand tokens to another site.
		if !strings.HasPrefix(returnTo, "/") || strings.HasPrefix(returnTo, "//") || strings.ContainsAny(returnTo, "\\\r\n") {
			return errcode.New(errcode.ValidationFailed, "return_to must be a path starting with /").WithDetails("field", "return_to")
		}
	}
	verifier, challenge := a.OIDC.NewPKCE()
	st, err := a.Identity.BeginOIDCLogin(c.UserContext(), verifier, "", returnTo, policy.OIDCLoginTTL.Value(c.UserContext(), a.Policy, policy.Target{}))
	if err != nil {
		return err
	}
	return c.Redirect(a.OIDC.AuthCodeURL(st.State, st.Nonce, challenge), fiber.StatusFound)
}

// OidcExchange finishes a browser sign-in.
func (a *API) OidcExchange(c *fiber.Ctx) error {
	if a.OIDC == nil {
		return errcode.New(identity.CodeOIDCNotConfigured, "no OIDC identity provider is configured")
	}
	var req apigen.OIDCExchangeRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	ctx := c.UserContext()
	st, err := a.Identity.TakeOIDCLogin(ctx, req.State)
	if err != nil {
		return err
	}
	id, ts, err := a.OIDC.Exchange(ctx, req.Code, st.CodeVerifier, st.Nonce)
	if err != nil {
		return err
	}
	u, err := a.Identity.UpsertOIDCUser(ctx, id)
	if err != nil {
		return err
	}
	if u.Status != "active" {
		return errcode.New(identity.CodeAccountDisabled, "the account is disabled")
	}
	ctx = principal.With(ctx, &principal.Principal{Type: principal.User, ID: u.ID, Method: principal.MethodOIDC})
	if err := a.Identity.RecordOIDCLogin(ctx, u); err != nil {
		return err
	}
	return c.JSON(tokenResponse(ts, st.ReturnTo))
}

// LocalLogin signs in with a local account.
func (a *API) LocalLogin(c *fiber.Ctx) error {
	if !a.LocalAccounts {
		return errcode.New(identity.CodeLocalAccountsDisabled, "local accounts are disabled on this deployment; sign in with the identity provider")
	}
	var req apigen.LocalLoginRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	ts, err := a.Identity.LocalLogin(c.UserContext(), req.Login, req.Password, a.sessionTTLs(c.UserContext()))
	if err != nil {
		return err
	}
	return c.JSON(tokenResponse(ts, ""))
}

// RefreshToken rotates a local session, or refreshes at the identity provider.
func (a *API) RefreshToken(c *fiber.Ctx) error {
	var req apigen.RefreshRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	ctx := c.UserContext()
	if strings.HasPrefix(req.RefreshToken, "gpr_") {
		ts, tag, err := a.Identity.RefreshLocal(ctx, req.RefreshToken, a.sessionTTLs(ctx))
		if err != nil {
			return err
		}
		a.Auth.Invalidate(tag)
		return c.JSON(tokenResponse(ts, ""))
	}
	if a.OIDC == nil {
		return errcode.New(identity.CodeInvalidToken, "unknown refresh token")
	}
	ts, err := a.OIDC.Refresh(ctx, req.RefreshToken)
	if err != nil {
		return err
	}
	if err := audit.Record(ctx, a.Pool, audit.Entry{Action: "auth.refresh", Target: a.Identity.IDs().Platform("login", "oidc")}); err != nil {
		return err
	}
	return c.JSON(tokenResponse(ts, ""))
}

// Logout ends the caller's local session; for OIDC it returns the provider's
// end-session URL.
func (a *API) Logout(c *fiber.Ctx) error {
	p, err := caller(c)
	if err != nil {
		return err
	}
	ctx := c.UserContext()
	var resp apigen.LogoutResult
	switch p.Method {
	case principal.MethodSession:
		if err := a.Identity.Logout(ctx, p.KeyID); err != nil {
			return err
		}
		a.Auth.Invalidate("session:" + p.KeyID.String())
	case principal.MethodOIDC:
		if a.OIDC != nil {
			if u := a.OIDC.EndSessionURL(); u != "" {
				resp.EndSessionUrl = &u
			}
		}
		if err := audit.Record(ctx, a.Pool, audit.Entry{Action: "auth.logout", Target: a.Identity.IDs().User(p.ID.String()), Details: map[string]any{"method": "oidc"}}); err != nil {
			return err
		}
	default:
		return errcode.New(errcode.BadRequest, "API keys have no session; revoke the key instead")
	}
	return c.JSON(resp)
}

// GetMe returns the caller with memberships.
func (a *API) GetMe(c *fiber.Ctx) error {
	p, err := caller(c)
	if err != nil {
		return err
	}
	me := apigen.Me{Id: p.ID, PrincipalType: apigen.MePrincipalType(p.Type), AuthMethod: apigen.MeAuthMethod(p.Method),
		IsPlatformAdmin: p.IsPlatformAdmin, OrgMemberships: []apigen.OrgMembership{}, ProjectMemberships: []apigen.ProjectMembership{}}
	if p.Email != "" {
		me.Email = &p.Email
	}
	if p.Name != "" {
		me.DisplayName = &p.Name
	}
	if p.Type == principal.ServiceAccount {
		proj, err := a.Identity.GetProject(c.UserContext(), p.ProjectID)
		if err != nil {
			return err
		}
		me.ProjectMemberships = append(me.ProjectMemberships, apigen.ProjectMembership{ProjectId: proj.ID, OrgId: proj.OrgID,
			ProjectSlug: proj.Slug, ProjectName: proj.Name, Role: apigen.ProjectMembershipRole(p.ProjectRole)})
		return c.JSON(me)
	}
	orgs, projects, err := a.Identity.Memberships(c.UserContext(), p.ID)
	if err != nil {
		return err
	}
	for _, m := range orgs {
		me.OrgMemberships = append(me.OrgMemberships, apigen.OrgMembership{OrgId: m.OrgID, OrgSlug: m.OrgSlug, OrgName: m.OrgName, Role: apigen.OrgMembershipRole(m.Role)})
	}
	for _, m := range projects {
		me.ProjectMemberships = append(me.ProjectMemberships, apigen.ProjectMembership{ProjectId: m.ProjectID, OrgId: m.OrgID,
			ProjectSlug: m.ProjectSlug, ProjectName: m.ProjectName, Role: apigen.ProjectMembershipRole(m.Role)})
	}
	return c.JSON(me)
}

func userOwner(p *principal.Principal) (identity.KeyOwner, error) {
	if p.Type != principal.User {
		return identity.KeyOwner{}, errcode.New(errcode.Forbidden, "service accounts have no personal API keys")
	}
	id := p.ID
	return identity.KeyOwner{User: &id}, nil
}

// ListMyAPIKeys lists the caller's personal keys.
func (a *API) ListMyAPIKeys(c *fiber.Ctx, params apigen.ListMyAPIKeysParams) error {
	p, err := caller(c)
	if err != nil {
		return err
	}
	owner, err := userOwner(p)
	if err != nil {
		return err
	}
	return a.listKeys(c, owner, params.Limit, params.Cursor)
}

func (a *API) listKeys(c *fiber.Ctx, owner identity.KeyOwner, limitP *int, cursor *string) error {
	limit, after, err := pageArgs(limitP, cursor)
	if err != nil {
		return err
	}
	keys, err := a.Identity.ListAPIKeys(c.UserContext(), owner, after, limit)
	if err != nil {
		return err
	}
	items, next := Page(keys, limit, func(k *identity.APIKey) any { return k.ID }, apiKeyJSON)
	return c.JSON(apigen.APIKeyPage{Items: items, NextCursor: next})
}

func apiKeyJSON(k *identity.APIKey) apigen.APIKey {
	return apigen.APIKey{Id: k.ID, Prefix: k.Prefix, Name: k.Name, CreatedAt: k.CreatedAt.UTC(),
		ExpiresAt: utcPtr(k.ExpiresAt), RevokedAt: utcPtr(k.RevokedAt), LastUsedAt: utcPtr(k.LastUsedAt)}
}

func utcPtr(t *time.Time) *time.Time {
	if t == nil {
		return nil
	}
	u := t.UTC()
	return &u
}

// CreateMyAPIKey creates a personal key.
func (a *API) CreateMyAPIKey(c *fiber.Ctx, _ apigen.CreateMyAPIKeyParams) error {
	p, err := caller(c)
	if err != nil {
		return err
	}
	owner, err := userOwner(p)
	if err != nil {
		return err
	}
	return a.createKey(c, owner)
}

func (a *API) createKey(c *fiber.Ctx, owner identity.KeyOwner) error {
	var req apigen.CreateAPIKeyRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	k, secret, err := a.Identity.CreateAPIKey(c.UserContext(), owner, req.Name, req.ExpiresAt)
	if err != nil {
		return err
	}
	return c.Status(fiber.StatusCreated).JSON(apigen.CreatedAPIKey{Key: apiKeyJSON(k), Secret: secret})
}

// RevokeMyAPIKey revokes a personal key.
func (a *API) RevokeMyAPIKey(c *fiber.Ctx, keyID apigen.KeyID) error {
	p, err := caller(c)
	if err != nil {
		return err
	}
	owner, err := userOwner(p)
	if err != nil {
		return err
	}
	return a.revokeKey(c, owner, keyID)
}

func (a *API) revokeKey(c *fiber.Ctx, owner identity.KeyOwner, keyID uuid.UUID) error {
	if err := a.Identity.RevokeAPIKey(c.UserContext(), owner, keyID); err != nil {
		return err
	}
	a.Auth.InvalidateKeyID(keyID)
	return c.SendStatus(fiber.StatusNoContent)
}

// pageArgs validates limit and decodes a uuid keyset cursor.
func pageArgs(limitP *int, cursor *string) (int, uuid.UUID, error) {
	limit, err := Limit(limitP)
	if err != nil {
		return 0, uuid.Nil, err
	}
	var after uuid.UUID
	if _, err := DecodeCursor(cursor, &after); err != nil {
		return 0, uuid.Nil, err
	}
	return limit, after, nil
}
