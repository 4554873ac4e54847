package oidctest_test

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/core/internal/oidc/oidctest"
)

// decode returns the header and claims of a compact token, unverified.
func decode(t *testing.T, tok string) (header, claims map[string]any, sig []byte) {
	t.Helper()
	parts := strings.Split(tok, ".")
	if len(parts) != 3 {
		t.Fatalf("token has %d parts", len(parts))
	}
	for n, dst := range []*map[string]any{&header, &claims} {
		raw, err := base64.RawURLEncoding.DecodeString(parts[n])
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(raw, dst); err != nil {
			t.Fatal(err)
		}
	}
	sig, err := base64.RawURLEncoding.DecodeString(parts[2])
	if err != nil {
		t.Fatal(err)
	}
	return header, claims, sig
}

func getJSON(t *testing.T, iss *oidctest.Issuer, path string, dst any) {
	t.Helper()
	resp, err := iss.Client().Get(iss.URL() + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: status %d", path, resp.StatusCode)
	}
	if err := json.NewDecoder(resp.Body).Decode(dst); err != nil {
		t.Fatal(err)
	}
}

func TestDiscoveryAndKeySet(t *testing.T) {
	t.Parallel()
	iss := oidctest.New(t, oidctest.WithAlgs("RS256", "ES256", "EdDSA"))
	var doc map[string]any
	getJSON(t, iss, "/.well-known/openid-configuration", &doc)
	for k, want := range map[string]string{
		"issuer": iss.URL(), "jwks_uri": iss.URL() + "/jwks", "token_endpoint": iss.URL() + "/token",
		"authorization_endpoint": iss.URL() + "/authorize", "end_session_endpoint": iss.URL() + "/logout",
	} {
		if doc[k] != want {
			t.Errorf("%s = %v, want %s", k, doc[k], want)
		}
	}

	kids := func() []string {
		var set struct {
			Keys []struct {
				Kid string `json:"kid"`
				Kty string `json:"kty"`
				D   string `json:"d"`
			} `json:"keys"`
		}
		getJSON(t, iss, "/jwks", &set)
		var out []string
		for _, k := range set.Keys {
			if k.D != "" {
				t.Fatalf("key %s publishes its private part", k.Kid)
			}
			out = append(out, k.Kid)
		}
		return out
	}
	before := kids()
	if want := iss.PublishedKeyIDs(); !slices.Equal(before, want) || len(before) != 3 {
		t.Fatalf("JWKS kids = %v, want %v", before, want)
	}
	iss.RotateKeys()
	after := kids()
	if len(after) != 3 || slices.ContainsFunc(after, func(k string) bool { return slices.Contains(before, k) }) {
		t.Fatalf("after rotation kids = %v (before %v)", after, before)
	}
	if iss.JWKSFetches() != 2 || iss.DiscoveryFetches() != 1 {
		t.Errorf("fetches: jwks %d, discovery %d", iss.JWKSFetches(), iss.DiscoveryFetches())
	}
}

func TestMint(t *testing.T) {
	t.Parallel()
	now := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	iss := oidctest.New(t, oidctest.WithClock(func() time.Time { return now }), oidctest.WithAudience("api"))

	t.Run("defaults and overrides", func(t *testing.T) {
		h, c, _ := decode(t, iss.Mint(oidctest.Claims{"email": nil, "nbf": now, "role": "admin"}))
		if h["alg"] != "RS256" || h["kid"] != iss.KeyID("") || h["typ"] != "JWT" {
			t.Errorf("header = %v", h)
		}
		if c["iss"] != iss.URL() || c["aud"] != "api" || c["sub"] != oidctest.DefaultUser().Subject ||
			c["exp"] != float64(now.Add(time.Hour).Unix()) || c["nbf"] != float64(now.Unix()) || c["role"] != "admin" {
			t.Errorf("claims = %v", c)
		}
		if _, ok := c["email"]; ok {
			t.Errorf("email not removed: %v", c)
		}
	})
	t.Run("none", func(t *testing.T) {
		h, _, sig := decode(t, iss.MintNone())
		if h["alg"] != "none" || len(sig) != 0 {
			t.Errorf("header %v, signature %d bytes", h, len(sig))
		}
	})
	t.Run("HS256 keyed with the public key", func(t *testing.T) {
		tok := iss.MintHS256WithPublicKey()
		h, _, sig := decode(t, tok)
		m := hmac.New(sha256.New, iss.PublicKeyPEM())
		m.Write([]byte(tok[:strings.LastIndex(tok, ".")]))
		if h["alg"] != "HS256" || h["kid"] != iss.KeyID("") || !hmac.Equal(sig, m.Sum(nil)) {
			t.Errorf("header %v; MAC matches: %v", h, hmac.Equal(sig, m.Sum(nil)))
		}
		if !strings.HasPrefix(string(iss.PublicKeyPEM()), "-----BEGIN PUBLIC KEY-----") {
			t.Errorf("PublicKeyPEM = %q", iss.PublicKeyPEM())
		}
	})
	t.Run("unknown kids differ", func(t *testing.T) {
		h1, _, _ := decode(t, iss.MintWithUnknownKid())
		h2, _, _ := decode(t, iss.MintWithUnknownKid())
		if h1["kid"] == h2["kid"] || slices.Contains(iss.PublishedKeyIDs(), h1["kid"].(string)) {
			t.Errorf("kids %v, %v", h1["kid"], h2["kid"])
		}
	})
	t.Run("builder", func(t *testing.T) {
		h, c, _ := decode(t, iss.Token().NoKeyID().Audience("a", "b").Subject("s").Email("e@x", false).Sign())
		if _, ok := h["kid"]; ok {
			t.Errorf("header has a kid: %v", h)
		}
		if aud, _ := c["aud"].([]any); len(aud) != 2 || c["sub"] != "s" || c["email"] != "e@x" || c["email_verified"] != false {
			t.Errorf("claims = %v", c)
		}
	})
}

func TestAuthorizeEndpoint(t *testing.T) {
	t.Parallel()
	iss := oidctest.New(t)
	valid := func() url.Values {
		return url.Values{
			"response_type": {"code"}, "client_id": {oidctest.DefaultClientID}, "redirect_uri": {"https://app.example/cb"},
			"scope": {"openid email"}, "state": {"st"}, "code_challenge": {"E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"},
			"code_challenge_method": {"S256"},
		}
	}
	tests := []struct {
		name      string
		change    func(url.Values)
		wantError string // "" = a code
	}{
		{"approved", func(url.Values) {}, ""},
		{"no PKCE", func(q url.Values) { q.Del("code_challenge") }, "invalid_request"},
		{"plain PKCE", func(q url.Values) { q.Set("code_challenge_method", "plain") }, "invalid_request"},
		{"no openid scope", func(q url.Values) { q.Set("scope", "email") }, "invalid_scope"},
		{"implicit flow", func(q url.Values) { q.Set("response_type", "token") }, "unsupported_response_type"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			q := valid()
			tt.change(q)
			back := iss.AuthorizeRedirect(iss.URL() + "/authorize?" + q.Encode())
			if back.Host != "app.example" || back.Query().Get("state") != "st" {
				t.Fatalf("redirect = %s", back)
			}
			if got := back.Query().Get("error"); got != tt.wantError {
				t.Fatalf("error = %q, want %q", got, tt.wantError)
			}
			if tt.wantError == "" && back.Query().Get("code") == "" {
				t.Fatalf("no code in %s", back)
			}
		})
	}
	t.Run("refused by the test", func(t *testing.T) {
		iss.SetAuthorizeError("access_denied")
		defer iss.SetAuthorizeError("")
		if got := iss.AuthorizeRedirect(iss.URL() + "/authorize?" + valid().Encode()).Query().Get("error"); got != "access_denied" {
			t.Fatalf("error = %q", got)
		}
	})
	t.Run("unknown client", func(t *testing.T) {
		q := valid()
		q.Set("client_id", "other")
		resp, err := iss.Client().Get(iss.URL() + "/authorize?" + q.Encode())
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("status = %d, want 400", resp.StatusCode)
		}
	})
}
