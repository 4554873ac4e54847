package daemon

import (
	"context"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/httpapi"
	"github.com/gpuaas/gpuaas/core/internal/identity"
	"github.com/gpuaas/gpuaas/core/internal/oidc"
)

// oidcProvider adapts the oidc package to what identity and httpapi consume.
type oidcProvider struct{ v *oidc.Verifier }

var (
	_ identity.TokenVerifier = oidcProvider{}
	_ httpapi.OIDCFlow       = oidcProvider{}
)

func identityOf(c *oidc.Claims) identity.OIDCIdentity {
	name := c.Name
	if name == "" {
		name = c.PreferredUsername
	}
	return identity.OIDCIdentity{Issuer: c.Issuer, Subject: c.Subject, Email: c.Email, EmailVerified: c.EmailVerified, Name: name}
}

func (p oidcProvider) VerifyIdentity(ctx context.Context, raw string) (identity.OIDCIdentity, error) {
	c, err := p.v.Verify(ctx, raw)
	if err != nil {
		return identity.OIDCIdentity{}, err
	}
	return identityOf(c), nil
}

func (p oidcProvider) NewPKCE() (string, string) {
	k := oidc.NewPKCE()
	return k.Verifier, k.Challenge
}

func (p oidcProvider) AuthCodeURL(state, nonce, challenge string) string {
	return p.v.AuthCodeURL(state, nonce, challenge)
}

func (p oidcProvider) Exchange(ctx context.Context, code, verifier, nonce string) (identity.OIDCIdentity, *identity.TokenSet, error) {
	ts, err := p.v.Exchange(ctx, code, verifier, "", nonce)
	if err != nil {
		return identity.OIDCIdentity{}, nil, err
	}
	if ts.IDClaims == nil {
		return identity.OIDCIdentity{}, nil, errcode.New(oidc.CodeGrantRejected, "the identity provider returned no ID token")
	}
	return identityOf(ts.IDClaims), tokenSet(ts), nil
}

func (p oidcProvider) Refresh(ctx context.Context, refresh string) (*identity.TokenSet, error) {
	ts, err := p.v.Refresh(ctx, refresh)
	if err != nil {
		return nil, err
	}
	return tokenSet(ts), nil
}

func (p oidcProvider) EndSessionURL() string {
	u, _ := p.v.EndSessionURL("", "", "")
	return u
}

func tokenSet(ts *oidc.TokenSet) *identity.TokenSet {
	return &identity.TokenSet{AccessToken: ts.AccessToken, RefreshToken: ts.RefreshToken, IDToken: ts.IDToken, ExpiresAt: ts.Expiry}
}
