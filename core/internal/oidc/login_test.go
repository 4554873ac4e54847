package oidc_test

import (
	"context"
	"fmt"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/oidc"
	"github.com/gpuaas/gpuaas/core/internal/oidc/oidctest"
)

// login runs the browser part of a login against e's issuer and returns the code.
func login(t *testing.T, e env, nonce string, pkce oidc.PKCE) string {
	t.Helper()
	state := oidc.RandomValue()
	code, gotState := e.iss.Authorize(e.v.AuthCodeURL(state, nonce, pkce.Challenge))
	if gotState != state {
		t.Fatalf("state = %q, want %q", gotState, state)
	}
	return code
}

func TestPKCE(t *testing.T) {
	t.Parallel()
	p := oidc.NewPKCE()
	if len(p.Verifier) != 43 {
		t.Errorf("verifier length = %d, want 43", len(p.Verifier))
	}
	if p.Challenge != oidc.S256Challenge(p.Verifier) || p.Challenge == p.Verifier {
		t.Errorf("challenge %q is not S256 of the verifier", p.Challenge)
	}
	// RFC 7636, appendix B.
	if got := oidc.S256Challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"); got != "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM" {
		t.Errorf("S256Challenge(RFC 7636 example) = %q", got)
	}
	if oidc.NewPKCE().Verifier == p.Verifier {
		t.Error("two PKCE verifiers are equal")
	}
}

func TestAuthCodeURL(t *testing.T) {
	t.Parallel()
	e := setup(t, setupOpts{config: func(c *oidc.Config) { c.Scopes = []string{"email", "offline_access"} }})
	raw := e.v.AuthCodeURL("st", "nn", "ch")
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	if got := u.Scheme + "://" + u.Host + u.Path; got != e.iss.URL()+"/authorize" {
		t.Errorf("endpoint = %s", got)
	}
	want := map[string]string{
		"response_type": "code", "client_id": e.iss.ClientID(), "redirect_uri": "https://gpuaas.example/callback",
		"scope": "openid email offline_access", "state": "st", "nonce": "nn",
		"code_challenge": "ch", "code_challenge_method": "S256",
	}
	for k, v := range want {
		if got := u.Query().Get(k); got != v {
			t.Errorf("%s = %q, want %q", k, got, v)
		}
	}
}

func TestExchange(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	user := oidctest.User{Subject: "u-42", Email: "ada@example.test", EmailVerified: true, Name: "Ada", PreferredUsername: "ada"}
	confidential := setupOpts{
		issuer: []oidctest.Option{oidctest.WithClient("gpuaas-web", "s3cr3t:/+&"), oidctest.WithAudience("gpuaas-api"), oidctest.WithUser(user)},
	}

	tests := []struct {
		name  string
		setup setupOpts
	}{
		{"confidential client", confidential},
		{"public client", setupOpts{issuer: []oidctest.Option{oidctest.WithUser(user)}}},
		{"ES256 provider", setupOpts{issuer: []oidctest.Option{oidctest.WithUser(user), oidctest.WithAlgs("ES256")}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := setup(t, tt.setup)
			pkce, nonce := oidc.NewPKCE(), oidc.RandomValue()
			ts, err := e.v.Exchange(ctx, login(t, e, nonce, pkce), pkce.Verifier, "", nonce)
			if err != nil {
				t.Fatalf("Exchange: %v", err)
			}
			if ts.IDClaims == nil || ts.IDClaims.Subject != "u-42" || ts.IDClaims.Email != "ada@example.test" {
				t.Fatalf("IDClaims = %+v", ts.IDClaims)
			}
			if ts.TokenType != "Bearer" || ts.RefreshToken == "" || !ts.Expiry.Equal(e.clock.Now().Add(time.Hour)) {
				t.Errorf("token set = %v", ts)
			}
			c, err := e.v.Verify(ctx, ts.AccessToken)
			if err != nil {
				t.Fatalf("Verify(access token): %v", err)
			}
			if c.Subject != "u-42" || c.PreferredUsername != "ada" {
				t.Errorf("access token claims = %+v", c)
			}
		})
	}
}

func TestExchangeRefuses(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	tests := []struct {
		name    string
		setup   setupOpts
		tamper  func(e env, code, verifier, redirect, nonce *string)
		want    errcode.Code
		wantErr string // the OAuth error in the details, for CodeGrantRejected
	}{
		{"wrong PKCE verifier", setupOpts{}, func(_ env, _, verifier, _, _ *string) { *verifier = oidc.NewPKCE().Verifier },
			oidc.CodeGrantRejected, "invalid_grant"},
		{"no PKCE verifier", setupOpts{}, func(_ env, _, verifier, _, _ *string) { *verifier = "" },
			oidc.CodeGrantRejected, "invalid_grant"},
		{"nonce mismatch", setupOpts{}, func(_ env, _, _, _, nonce *string) { *nonce = oidc.RandomValue() },
			oidc.CodeTokenWrongNonce, ""},
		{"nonce expected, none sent", setupOpts{}, func(_ env, _, _, _, nonce *string) { *nonce = "" },
			oidc.CodeTokenWrongNonce, ""},
		{"unknown code", setupOpts{}, func(_ env, code, _, _, _ *string) { *code = "forged" },
			oidc.CodeGrantRejected, "invalid_grant"},
		{"other redirect URI", setupOpts{}, func(_ env, _, _, redirect, _ *string) { *redirect = "https://evil.example/cb" },
			oidc.CodeGrantRejected, "invalid_grant"},
		{"wrong client secret", setupOpts{
			issuer: []oidctest.Option{oidctest.WithClient("web", "right")},
			config: func(c *oidc.Config) { c.ClientSecret = "wrong" },
		}, func(env, *string, *string, *string, *string) {}, oidc.CodeGrantRejected, "invalid_client"},
		{"expired code", setupOpts{}, func(e env, _, _, _, _ *string) { e.clock.Advance(2 * time.Minute) },
			oidc.CodeGrantRejected, "invalid_grant"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := setup(t, tt.setup)
			pkce, nonce := oidc.NewPKCE(), oidc.RandomValue()
			code := login(t, e, nonce, pkce)
			verifier, redirect, sentNonce := pkce.Verifier, "", nonce
			tt.tamper(e, &code, &verifier, &redirect, &sentNonce)
			ts, err := e.v.Exchange(ctx, code, verifier, redirect, sentNonce)
			if ts != nil {
				t.Errorf("token set = %v, want nil", ts)
			}
			wantCode(t, err, tt.want)
			if tt.wantErr != "" {
				if got := errcode.As(err).Details["error"]; got != tt.wantErr {
					t.Errorf("details.error = %v, want %s", got, tt.wantErr)
				}
			}
		})
	}
}

func TestExchangeCodeIsSingleUse(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	e := setup(t, setupOpts{})
	pkce, nonce := oidc.NewPKCE(), oidc.RandomValue()
	code := login(t, e, nonce, pkce)
	if _, err := e.v.Exchange(ctx, code, pkce.Verifier, "", nonce); err != nil {
		t.Fatalf("first Exchange: %v", err)
	}
	_, err := e.v.Exchange(ctx, code, pkce.Verifier, "", nonce)
	wantCode(t, err, oidc.CodeGrantRejected)
}

func TestRefresh(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	e := setup(t, setupOpts{issuer: []oidctest.Option{oidctest.WithClient("web", "pw")}})
	pkce, nonce := oidc.NewPKCE(), oidc.RandomValue()
	first, err := e.v.Exchange(ctx, login(t, e, nonce, pkce), pkce.Verifier, "", nonce)
	if err != nil {
		t.Fatalf("Exchange: %v", err)
	}

	e.clock.Advance(30 * time.Minute)
	second, err := e.v.Refresh(ctx, first.RefreshToken)
	if err != nil {
		t.Fatalf("Refresh: %v", err)
	}
	if second.RefreshToken == "" || second.RefreshToken == first.RefreshToken {
		t.Errorf("refresh token was not rotated")
	}
	if second.IDClaims == nil || second.IDClaims.Subject != first.IDClaims.Subject {
		t.Errorf("refreshed ID claims = %+v", second.IDClaims)
	}
	c, err := e.v.Verify(ctx, second.AccessToken)
	if err != nil {
		t.Fatalf("Verify(refreshed access token): %v", err)
	}
	if !c.ExpiresAt.Equal(e.clock.Now().Add(time.Hour)) {
		t.Errorf("refreshed access token expires at %v", c.ExpiresAt)
	}

	t.Run("used refresh token", func(t *testing.T) {
		_, err := e.v.Refresh(ctx, first.RefreshToken)
		wantCode(t, err, oidc.CodeGrantRejected)
	})
	t.Run("forged refresh token", func(t *testing.T) {
		_, err := e.v.Refresh(ctx, "forged")
		wantCode(t, err, oidc.CodeGrantRejected)
	})
}

func TestEndSessionURL(t *testing.T) {
	t.Parallel()
	t.Run("advertised", func(t *testing.T) {
		t.Parallel()
		e := setup(t, setupOpts{})
		raw, ok := e.v.EndSessionURL("idt", "https://gpuaas.example/bye", "st")
		if !ok {
			t.Fatal("EndSessionURL not available")
		}
		u, _ := url.Parse(raw)
		q := u.Query()
		if !strings.HasPrefix(raw, e.iss.URL()+"/logout?") || q.Get("id_token_hint") != "idt" ||
			q.Get("post_logout_redirect_uri") != "https://gpuaas.example/bye" || q.Get("state") != "st" ||
			q.Get("client_id") != e.iss.ClientID() {
			t.Errorf("EndSessionURL = %s", raw)
		}
	})
	t.Run("not advertised", func(t *testing.T) {
		t.Parallel()
		e := setup(t, setupOpts{issuer: []oidctest.Option{oidctest.WithoutEndSession()}})
		if raw, ok := e.v.EndSessionURL("idt", "", ""); ok || raw != "" {
			t.Errorf("EndSessionURL = %q, %v; want none", raw, ok)
		}
	})
}

func TestSecretsDoNotPrint(t *testing.T) {
	t.Parallel()
	cfg := oidc.Config{IssuerURL: "https://idp", ClientSecret: "hunter2"}
	ts := oidc.TokenSet{AccessToken: "access-abc", RefreshToken: "refresh-def", IDToken: "id-ghi", TokenType: "Bearer"}
	for _, verb := range []string{"%v", "%+v", "%#v", "%s"} {
		out := fmt.Sprintf(verb, cfg) + fmt.Sprintf(verb, ts) + fmt.Sprintf(verb, &ts)
		for _, secret := range []string{"hunter2", "access-abc", "refresh-def", "id-ghi"} {
			if strings.Contains(out, secret) {
				t.Errorf("%s prints %q: %s", verb, secret, out)
			}
		}
	}
}
