package oidc_test

import (
	"context"
	"encoding/base64"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/oidc"
	"github.com/gpuaas/gpuaas/core/internal/oidc/oidctest"
)

func TestVerifyValidTokens(t *testing.T) {
	t.Parallel()
	for _, alg := range []string{"RS256", "ES256", "EdDSA", "PS256", "ES384", "RS512"} {
		t.Run(alg, func(t *testing.T) {
			t.Parallel()
			e := setup(t, setupOpts{
				issuer: []oidctest.Option{oidctest.WithAlgs(alg), oidctest.WithAudience("gpuaas-api")},
				config: func(c *oidc.Config) { c.AllowedAlgs = []string{alg} },
			})
			tok := e.iss.Token().Set("groups", []string{"ops"}).Sign()
			c, err := e.v.Verify(context.Background(), tok)
			if err != nil {
				t.Fatalf("Verify: %v", err)
			}
			u := oidctest.DefaultUser()
			now := e.clock.Now()
			if c.Issuer != e.iss.URL() || c.Subject != u.Subject || c.Email != u.Email || !c.EmailVerified ||
				c.Name != u.Name || c.PreferredUsername != u.PreferredUsername {
				t.Errorf("claims = %+v, want the default user's", c)
			}
			if len(c.Audience) != 1 || c.Audience[0] != "gpuaas-api" {
				t.Errorf("Audience = %v", c.Audience)
			}
			if !c.IssuedAt.Equal(now) || !c.ExpiresAt.Equal(now.Add(time.Hour)) {
				t.Errorf("IssuedAt, ExpiresAt = %v, %v; want %v, %v", c.IssuedAt, c.ExpiresAt, now, now.Add(time.Hour))
			}
			if g, ok := c.Raw["groups"].([]any); !ok || len(g) != 1 || g[0] != "ops" {
				t.Errorf("Raw[groups] = %#v", c.Raw["groups"])
			}
		})
	}
}

func TestVerifyDefaultAllowList(t *testing.T) {
	t.Parallel()
	e := setup(t, setupOpts{issuer: []oidctest.Option{oidctest.WithAlgs("RS256", "ES256", "EdDSA", "PS256")}})
	for _, alg := range []string{"RS256", "ES256", "EdDSA"} {
		t.Run(alg, func(t *testing.T) {
			if _, err := e.v.Verify(context.Background(), e.iss.Token().Alg(alg).Sign()); err != nil {
				t.Fatalf("Verify: %v", err)
			}
		})
	}
	t.Run("PS256 is not in the default list", func(t *testing.T) {
		_, err := e.v.Verify(context.Background(), e.iss.Token().Alg("PS256").Sign())
		wantCode(t, err, oidc.CodeTokenAlgNotAllowed)
	})
}

func TestVerifyRejects(t *testing.T) {
	t.Parallel()
	e := setup(t, setupOpts{issuer: []oidctest.Option{oidctest.WithAlgs("RS256", "ES256")}})
	other := oidctest.New(t)
	rsaKid, ecKid := e.iss.KeyID("RS256"), e.iss.KeyID("ES256")
	skew := oidc.DefaultClockSkew
	b64 := base64.RawURLEncoding.EncodeToString
	tamper := func(tok string) string { // swap in another payload, keep header and signature
		parts := strings.Split(tok, ".")
		parts[1] = strings.Split(e.iss.Mint(oidctest.Claims{"sub": "admin"}), ".")[1]
		return strings.Join(parts, ".")
	}
	flipSig := func(tok string) string {
		sig, _ := base64.RawURLEncoding.DecodeString(tok[strings.LastIndex(tok, ".")+1:])
		sig[len(sig)/2] ^= 0x40
		return tok[:strings.LastIndex(tok, ".")+1] + b64(sig)
	}

	tests := []struct {
		name  string
		token func() string
		want  errcode.Code
	}{
		{"empty", func() string { return "" }, oidc.CodeTokenMalformed},
		{"one part", func() string { return "abc" }, oidc.CodeTokenMalformed},
		{"two parts", func() string { return "abc.def" }, oidc.CodeTokenMalformed},
		{"four parts", func() string { return e.iss.Mint() + ".x" }, oidc.CodeTokenMalformed},
		{"JWE shaped", func() string { return "a.b.c.d.e" }, oidc.CodeTokenMalformed},
		{"header not base64", func() string { return "!!!." + strings.SplitN(e.iss.Mint(), ".", 2)[1] }, oidc.CodeTokenMalformed},
		{"header not JSON", func() string { return b64([]byte("nope")) + ".e30.c2ln" }, oidc.CodeTokenMalformed},
		{"larger than 64 KiB", func() string { return e.iss.Mint(oidctest.Claims{"pad": strings.Repeat("x", 70000)}) }, oidc.CodeTokenMalformed},
		{"exp is a string", func() string { return e.iss.Mint(oidctest.Claims{"exp": "tomorrow"}) }, oidc.CodeTokenMalformed},
		{"no exp", func() string { return e.iss.Mint(oidctest.Claims{"exp": nil}) }, oidc.CodeTokenMalformed},
		{"aud is a number", func() string { return e.iss.Mint(oidctest.Claims{"aud": 7}) }, oidc.CodeTokenMalformed},
		{"iss is an object", func() string { return e.iss.Mint(oidctest.Claims{"iss": map[string]any{}}) }, oidc.CodeTokenMalformed},

		{"alg none", func() string { return e.iss.MintNone() }, oidc.CodeTokenAlgNotAllowed},
		{"alg none without kid", func() string { return e.iss.Token().NoKeyID().SignNone() }, oidc.CodeTokenAlgNotAllowed},
		{"HS256 keyed with the RSA public key PEM", func() string { return e.iss.MintHS256WithPublicKey() }, oidc.CodeTokenAlgNotAllowed},
		{"HS256 keyed with the RSA public key DER", func() string { return e.iss.Token().SignHS256(e.iss.PublicKeyDER()) }, oidc.CodeTokenAlgNotAllowed},
		{"HS256 keyed with the public key, no kid", func() string { return e.iss.Token().NoKeyID().SignHS256(e.iss.PublicKeyPEM()) }, oidc.CodeTokenAlgNotAllowed},
		{"ES256 header naming the RSA key", func() string { return e.iss.Token().Alg("ES256").KeyID(rsaKid).Sign() }, oidc.CodeTokenAlgNotAllowed},
		{"RS256 header naming the EC key", func() string { return e.iss.Token().Alg("RS256").KeyID(ecKid).Sign() }, oidc.CodeTokenAlgNotAllowed},

		{"payload swapped", func() string { return tamper(e.iss.Mint()) }, oidc.CodeTokenBadSignature},
		{"signature bit flipped", func() string { return flipSig(e.iss.Mint()) }, oidc.CodeTokenBadSignature},
		{"signature bit flipped, ES256", func() string { return flipSig(e.iss.Token().Alg("ES256").Sign()) }, oidc.CodeTokenBadSignature},
		{"signed by another issuer's key under our kid", func() string {
			return other.Token().KeyID(rsaKid).Issuer(e.iss.URL()).Audience(e.iss.Audience()).Sign()
		}, oidc.CodeTokenBadSignature},
		{"no kid, signed by another issuer's key", func() string {
			return other.Token().NoKeyID().Issuer(e.iss.URL()).Audience(e.iss.Audience()).Sign()
		}, oidc.CodeTokenBadSignature},

		{"unknown kid", func() string { return e.iss.MintWithUnknownKid() }, oidc.CodeTokenUnknownKey},
		{"another issuer's token", func() string { return other.Mint() }, oidc.CodeTokenUnknownKey},

		{"expired", func() string { return e.iss.Mint(oidctest.Claims{"exp": e.clock.Now().Add(-skew - time.Second)}) }, oidc.CodeTokenExpired},
		{"not yet valid (nbf)", func() string { return e.iss.Mint(oidctest.Claims{"nbf": e.clock.Now().Add(skew + time.Second)}) }, oidc.CodeTokenNotYetValid},
		{"issued in the future (iat)", func() string { return e.iss.Mint(oidctest.Claims{"iat": e.clock.Now().Add(skew + time.Second)}) }, oidc.CodeTokenNotYetValid},

		{"wrong issuer", func() string { return e.iss.Token().Issuer("https://evil.example").Sign() }, oidc.CodeTokenWrongIssuer},
		{"issuer with a trailing slash", func() string { return e.iss.Token().Issuer(e.iss.URL() + "/").Sign() }, oidc.CodeTokenWrongIssuer},
		{"no issuer", func() string { return e.iss.Mint(oidctest.Claims{"iss": nil}) }, oidc.CodeTokenWrongIssuer},

		{"wrong audience", func() string { return e.iss.Token().Audience("billing-api").Sign() }, oidc.CodeTokenWrongAudience},
		{"audience list without ours", func() string { return e.iss.Token().Audience("a", "b").Sign() }, oidc.CodeTokenWrongAudience},
		{"no audience", func() string { return e.iss.Mint(oidctest.Claims{"aud": nil}) }, oidc.CodeTokenWrongAudience},

		{"empty subject", func() string { return e.iss.Token().Subject("").Sign() }, oidc.CodeTokenMissingSubject},
		{"no subject", func() string { return e.iss.Mint(oidctest.Claims{"sub": nil}) }, oidc.CodeTokenMissingSubject},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tok := tt.token()
			c, err := e.v.Verify(context.Background(), tok)
			if c != nil {
				t.Errorf("claims = %+v, want nil", c)
			}
			wantCode(t, err, tt.want)
			wantNoEcho(t, err, tok)
		})
	}
}

func TestVerifyAcceptsVariants(t *testing.T) {
	t.Parallel()
	e := setup(t, setupOpts{issuer: []oidctest.Option{oidctest.WithAlgs("RS256", "ES256")}})
	tests := []struct {
		name  string
		token func() string
	}{
		{"audience list containing ours", func() string { return e.iss.Token().Audience("other", e.iss.Audience()).Sign() }},
		{"no kid", func() string { return e.iss.Token().NoKeyID().Sign() }},
		{"no kid, ES256", func() string { return e.iss.Token().Alg("ES256").NoKeyID().Sign() }},
		{"fractional exp", func() string {
			return e.iss.Mint(oidctest.Claims{"exp": float64(e.clock.Now().Add(time.Minute).UnixMilli()) / 1000})
		}},
		{"no iat", func() string { return e.iss.Mint(oidctest.Claims{"iat": nil}) }},
		{"email_verified as a string", func() string { return e.iss.Mint(oidctest.Claims{"email_verified": "true"}) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := e.v.Verify(context.Background(), tt.token()); err != nil {
				t.Fatalf("Verify: %v", err)
			}
		})
	}
}

func TestVerifyClockSkew(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		skew   time.Duration // Config.ClockSkew
		claims func(now time.Time) oidctest.Claims
		offset time.Duration // how far the verifier's clock is moved after minting
		want   errcode.Code  // "" = valid
	}{
		{"exp just inside default skew", 0, expAt(0), 59 * time.Second, ""},
		{"exp at default skew", 0, expAt(0), 60 * time.Second, oidc.CodeTokenExpired},
		{"exp one second before now, no skew", -1, expAt(0), time.Second, oidc.CodeTokenExpired},
		{"exp exactly now, no skew", -1, expAt(0), 0, oidc.CodeTokenExpired},
		{"exp one second ahead, no skew", -1, expAt(time.Second), 0, ""},
		{"exp inside custom skew", 5 * time.Second, expAt(0), 4 * time.Second, ""},
		{"exp at custom skew", 5 * time.Second, expAt(0), 5 * time.Second, oidc.CodeTokenExpired},
		{"nbf at default skew", 0, nbfAt(60 * time.Second), 0, ""},
		{"nbf beyond default skew", 0, nbfAt(61 * time.Second), 0, oidc.CodeTokenNotYetValid},
		{"nbf one second ahead, no skew", -1, nbfAt(time.Second), 0, oidc.CodeTokenNotYetValid},
		{"nbf now, no skew", -1, nbfAt(0), 0, ""},
		{"iat at default skew", 0, iatAt(60 * time.Second), 0, ""},
		{"iat beyond default skew", 0, iatAt(61 * time.Second), 0, oidc.CodeTokenNotYetValid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := setup(t, setupOpts{config: func(c *oidc.Config) { c.ClockSkew = tt.skew }})
			tok := e.iss.Mint(tt.claims(e.clock.Now()))
			e.clock.Advance(tt.offset)
			_, err := e.v.Verify(context.Background(), tok)
			if tt.want == "" {
				if err != nil {
					t.Fatalf("Verify: %v", err)
				}
				return
			}
			wantCode(t, err, tt.want)
		})
	}
}

func expAt(d time.Duration) func(time.Time) oidctest.Claims {
	return func(now time.Time) oidctest.Claims { return oidctest.Claims{"exp": now.Add(d)} }
}

func nbfAt(d time.Duration) func(time.Time) oidctest.Claims {
	return func(now time.Time) oidctest.Claims { return oidctest.Claims{"nbf": now.Add(d)} }
}

func iatAt(d time.Duration) func(time.Time) oidctest.Claims {
	return func(now time.Time) oidctest.Claims { return oidctest.Claims{"iat": now.Add(d)} }
}

func TestNewVerifierRefuses(t *testing.T) {
	t.Parallel()
	iss := oidctest.New(t)
	mismatched := oidctest.New(t, oidctest.WithDiscoveredIssuer("https://idp.evil.example"))
	down := oidctest.New(t)
	down.SetJWKSStatus(503)
	base := func() oidc.Config {
		return oidc.Config{IssuerURL: iss.URL(), Audience: "api", HTTPClient: iss.Client()}
	}
	tests := []struct {
		name   string
		config func() oidc.Config
		code   errcode.Code // "" = a plain configuration error
	}{
		{"discovered issuer differs", func() oidc.Config {
			c := base()
			c.IssuerURL = mismatched.URL()
			return c
		}, oidc.CodeIssuerMismatch},
		{"configured issuer has a trailing slash", func() oidc.Config {
			c := base()
			c.IssuerURL += "/"
			return c
		}, oidc.CodeIssuerMismatch},
		{"issuer unreachable", func() oidc.Config {
			c := base()
			c.IssuerURL = "http://127.0.0.1:1"
			return c
		}, oidc.CodeDiscoveryFailed},
		{"key set unavailable", func() oidc.Config {
			c := base()
			c.IssuerURL = down.URL()
			return c
		}, oidc.CodeDiscoveryFailed},
		{"alg none", func() oidc.Config { c := base(); c.AllowedAlgs = []string{"none"}; return c }, ""},
		{"alg HS256", func() oidc.Config { c := base(); c.AllowedAlgs = []string{"RS256", "HS256"}; return c }, ""},
		{"alg empty string", func() oidc.Config { c := base(); c.AllowedAlgs = []string{""}; return c }, ""},
		{"no audience and no client id", func() oidc.Config { c := base(); c.Audience = ""; return c }, ""},
		{"no issuer", func() oidc.Config { c := base(); c.IssuerURL = ""; return c }, ""},
		{"relative issuer", func() oidc.Config { c := base(); c.IssuerURL = "/realms/x"; return c }, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v, err := oidc.NewVerifier(context.Background(), tt.config())
			if v != nil || err == nil {
				t.Fatalf("NewVerifier = %v, %v; want an error", v, err)
			}
			if tt.code != "" {
				wantCode(t, err, tt.code)
			}
		})
	}
}

func TestVerifiedCache(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	for _, size := range []int{0, 2, oidc.DefaultVerifiedCacheSize} {
		t.Run(fmt.Sprintf("size %d", size), func(t *testing.T) {
			t.Parallel()
			e := setup(t, setupOpts{verifier: []oidc.Option{oidc.WithVerifiedCache(size)}})
			tokens := make([]string, 3)
			for n := range tokens {
				tokens[n] = e.iss.Mint(oidctest.Claims{"sub": fmt.Sprint("user-", n), "exp": e.clock.Now().Add(time.Duration(n+1) * time.Hour)})
			}
			for round := range 2 { // the second round hits the cache (for the entries not evicted)
				for n, tok := range tokens {
					c, err := e.v.Verify(ctx, tok)
					if err != nil {
						t.Fatalf("round %d, token %d: %v", round, n, err)
					}
					if want := fmt.Sprint("user-", n); c.Subject != want {
						t.Fatalf("round %d: Subject = %q, want %q", round, c.Subject, want)
					}
				}
			}
			// A remembered token still expires.
			e.clock.Advance(time.Hour + oidc.DefaultClockSkew)
			_, err := e.v.Verify(ctx, tokens[0])
			wantCode(t, err, oidc.CodeTokenExpired)
			if _, err := e.v.Verify(ctx, tokens[2]); err != nil {
				t.Fatalf("token 2 after an hour: %v", err)
			}
		})
	}
}
