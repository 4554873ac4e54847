// Package oidc verifies bearer tokens issued by a standard OpenID Connect provider
// (Keycloak, Dex, Okta, ...) and drives the browser login: authorization code with
// PKCE, refresh and end session.
//
// A Verifier is built once at startup. NewVerifier reads the provider's discovery
// document, checks that it names the configured issuer, fetches the JSON Web Key Set
// and keeps the parsed public keys in memory. Verify is then local and cheap: no
// network, no re-parsing of keys. A token signed with a key id the cache does not know
// triggers one refetch of the key set (the provider rotated its keys), at most once per
// refresh interval, so that tokens with forged key ids cannot make the verifier hammer
// the provider. Keys the provider removed stop verifying once the set has been
// refetched.
//
// Every rejection of a token is an *errcode.Error carrying one of the CodeToken*
// codes; messages never contain the token.
package oidc

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
)

// Codes of a rejected token. The HTTP layer answers all of them with 401.
const (
	// CodeTokenMalformed: not a compact JWS, undecodable parts, claims that are not a
	// JSON object, registered claims of the wrong type, a missing exp.
	CodeTokenMalformed errcode.Code = "token_malformed"
	// CodeTokenAlgNotAllowed: alg outside the allow-list (none and HS* always are) or
	// an alg that does not match the type of the key named by kid.
	CodeTokenAlgNotAllowed errcode.Code = "token_alg_not_allowed"
	// CodeTokenBadSignature: the signature does not verify with the key.
	CodeTokenBadSignature errcode.Code = "token_bad_signature"
	// CodeTokenUnknownKey: no key of the provider's key set has the token's kid, even
	// after a refetch.
	CodeTokenUnknownKey errcode.Code = "token_unknown_key"
	// CodeTokenExpired: exp is in the past beyond the clock skew.
	CodeTokenExpired errcode.Code = "token_expired"
	// CodeTokenNotYetValid: nbf or iat is in the future beyond the clock skew.
	CodeTokenNotYetValid errcode.Code = "token_not_yet_valid"
	// CodeTokenWrongIssuer: iss is not exactly the configured issuer.
	CodeTokenWrongIssuer errcode.Code = "token_wrong_issuer"
	// CodeTokenWrongAudience: aud does not contain the expected audience (or, for an
	// ID token, azp names another client).
	CodeTokenWrongAudience errcode.Code = "token_wrong_audience"
	// CodeTokenMissingSubject: sub is absent or empty.
	CodeTokenMissingSubject errcode.Code = "token_missing_subject"
	// CodeTokenWrongNonce: the ID token returned by a code exchange does not carry the
	// nonce of the login that started it.
	CodeTokenWrongNonce errcode.Code = "token_wrong_nonce"
)

// Codes of the login flow and of provider set-up.
const (
	// CodeGrantRejected: the provider refused an authorization code or a refresh token
	// (OAuth error in the details under "error": invalid_grant, invalid_client, ...).
	// invalid_grant is the caller's fault (401); invalid_client means our client
	// credentials are wrong.
	CodeGrantRejected errcode.Code = "oidc_grant_rejected"
	// CodeProviderUnavailable: the provider could not be reached or answered with
	// something other than a token response or an OAuth error.
	CodeProviderUnavailable errcode.Code = "oidc_provider_unavailable"
	// CodeDiscoveryFailed: the discovery document or the key set could not be fetched
	// or is unusable (NewVerifier only).
	CodeDiscoveryFailed errcode.Code = "oidc_discovery_failed"
	// CodeIssuerMismatch: the discovery document names another issuer than the one
	// configured (NewVerifier only).
	CodeIssuerMismatch errcode.Code = "oidc_issuer_mismatch"
)

// Defaults applied by NewVerifier.
const (
	DefaultClockSkew       = 60 * time.Second
	DefaultRefreshInterval = 10 * time.Second
	DefaultKeySetMaxAge    = 15 * time.Minute
	// DefaultVerifiedCacheSize is the number of verified tokens Verify remembers.
	DefaultVerifiedCacheSize = 1024
	defaultHTTPTimeout       = 10 * time.Second
)

// supportedAlg reports whether a Verifier can be configured to accept alg. HMAC
// algorithms and "none" are deliberately absent: a verifier of public-key signatures
// must never accept them.
func supportedAlg(alg string) bool {
	switch alg {
	case "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA":
		return true
	}
	return false
}

// Secret is a string that does not print itself: fmt, slog and encoders show
// "[redacted]". Convert with string(s) where the value is really needed.
type Secret string

// String implements fmt.Stringer.
func (Secret) String() string { return "[redacted]" }

// GoString implements fmt.GoStringer.
func (Secret) GoString() string { return `"[redacted]"` }

// LogValue implements slog.LogValuer.
func (Secret) LogValue() slog.Value { return slog.StringValue("[redacted]") }

// MarshalText implements encoding.TextMarshaler, so that JSON logs redact it too.
func (Secret) MarshalText() ([]byte, error) { return []byte("[redacted]"), nil }

var (
	_ fmt.Stringer   = Secret("")
	_ fmt.GoStringer = Secret("")
	_ slog.LogValuer = Secret("")
)

// Config describes the provider and, for the browser login, this client.
type Config struct {
	// IssuerURL is the provider's issuer identifier, exactly as it appears in the iss
	// claim (for Keycloak https://host/realms/name). Discovery is read from
	// IssuerURL + "/.well-known/openid-configuration".
	IssuerURL string
	// Audience is the value the aud claim of a bearer token must contain: the API
	// audience or the client id. Defaults to ClientID.
	Audience string
	// AllowedAlgs is the signature algorithm allow-list; default RS256, ES256, EdDSA.
	// Allowed values: RS256/384/512, PS256/384/512, ES256/384/512, EdDSA. "none" and
	// HS* are refused.
	AllowedAlgs []string
	// ClockSkew is the tolerance applied to exp, nbf and iat. Zero means
	// DefaultClockSkew; a negative value means no tolerance.
	ClockSkew time.Duration
	// HTTPClient talks to the provider. Default: a client with a 10s timeout.
	HTTPClient *http.Client
	// Now is the clock. Default time.Now.
	Now func() time.Time

	// ClientID identifies this client to the provider for the browser login. ID
	// tokens must name it in aud.
	ClientID string
	// ClientSecret authenticates a confidential client at the token endpoint; empty
	// for a public client.
	ClientSecret Secret
	// RedirectURL is the default redirect_uri of the login.
	RedirectURL string
	// Scopes requested at login. "openid" is always included. Default: openid,
	// profile, email.
	Scopes []string
}

// Option tunes a Verifier.
type Option func(*options)

type options struct {
	refreshInterval   time.Duration
	keySetMaxAge      time.Duration
	verifiedCacheSize int
}

// WithRefreshInterval sets the minimum time between two fetches of the key set
// (default DefaultRefreshInterval). A token with an unknown kid triggers a refetch
// only if the previous fetch started at least this long ago.
func WithRefreshInterval(d time.Duration) Option {
	return func(o *options) { o.refreshInterval = d }
}

// WithKeySetMaxAge sets how long a fetched key set is used before it is refetched in
// the background (default DefaultKeySetMaxAge). This bounds how long a key the
// provider removed keeps verifying when no token with a new kid arrives.
func WithKeySetMaxAge(d time.Duration) Option {
	return func(o *options) { o.keySetMaxAge = d }
}

// WithVerifiedCache sets how many verified bearer tokens Verify remembers (default
// DefaultVerifiedCacheSize; 0 disables the cache). A token seen again skips parsing
// and the signature check but still has its exp, nbf and iat checked against the
// clock. Entries are keyed by the token's SHA-256 and are forgotten whenever the key
// set is refetched.
func WithVerifiedCache(entries int) Option {
	return func(o *options) { o.verifiedCacheSize = entries }
}

// Verifier verifies tokens of one provider and runs the login flow against it. It is
// safe for concurrent use.
type Verifier struct {
	issuer       string
	audience     string
	clientID     string
	clientSecret Secret
	redirectURL  string
	scopes       []string
	algs         []jose.SignatureAlgorithm
	skew         time.Duration
	now          func() time.Time
	client       *http.Client
	meta         providerMetadata
	keys         *keyCache
}

// NewVerifier reads the provider's discovery document and key set and returns a
// Verifier for them. It fails with CodeIssuerMismatch when the document names another
// issuer and with CodeDiscoveryFailed when the document or the key set is unusable.
func NewVerifier(ctx context.Context, cfg Config, opts ...Option) (*Verifier, error) {
	o := options{
		refreshInterval:   DefaultRefreshInterval,
		keySetMaxAge:      DefaultKeySetMaxAge,
		verifiedCacheSize: DefaultVerifiedCacheSize,
	}
	for _, opt := range opts {
		opt(&o)
	}
	if cfg.IssuerURL == "" {
		return nil, errors.New("oidc: config: IssuerURL is required")
	}
	if u, err := url.Parse(cfg.IssuerURL); err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return nil, fmt.Errorf("oidc: config: IssuerURL %q is not an absolute http(s) URL", cfg.IssuerURL)
	}
	audience := cfg.Audience
	if audience == "" {
		audience = cfg.ClientID
	}
	if audience == "" {
		return nil, errors.New("oidc: config: Audience or ClientID is required")
	}
	algs, err := allowList(cfg.AllowedAlgs)
	if err != nil {
		return nil, err
	}
	if o.refreshInterval < 0 || o.keySetMaxAge <= 0 {
		return nil, errors.New("oidc: refresh interval must be >= 0 and key set max age > 0")
	}

	v := &Verifier{
		issuer:       cfg.IssuerURL,
		audience:     audience,
		clientID:     cfg.ClientID,
		clientSecret: cfg.ClientSecret,
		redirectURL:  cfg.RedirectURL,
		scopes:       scopesWithOpenID(cfg.Scopes),
		algs:         algs,
		skew:         cfg.ClockSkew,
		now:          cfg.Now,
		client:       cfg.HTTPClient,
	}
	switch {
	case v.skew == 0:
		v.skew = DefaultClockSkew
	case v.skew < 0:
		v.skew = 0
	}
	if v.now == nil {
		v.now = time.Now
	}
	if v.client == nil {
		v.client = &http.Client{Timeout: defaultHTTPTimeout}
	}

	meta, err := discover(ctx, v.client, v.issuer)
	if err != nil {
		return nil, err
	}
	if v.clientID != "" && len(meta.CodeChallengeMethodsSupported) > 0 &&
		!slices.Contains(meta.CodeChallengeMethodsSupported, "S256") {
		return nil, errcode.New(CodeDiscoveryFailed, "provider does not support PKCE with S256")
	}
	v.meta = meta

	v.keys = newKeyCache(meta.JWKSURI, v.client, v.now, o)
	if err := v.keys.wait(ctx, v.keys.refresh(true)); err != nil {
		return nil, errcode.Wrap(err, CodeDiscoveryFailed, "cannot load the provider's key set")
	}
	return v, nil
}

// allowList validates the configured algorithms and returns them in go-jose form.
func allowList(configured []string) ([]jose.SignatureAlgorithm, error) {
	if len(configured) == 0 {
		configured = []string{"RS256", "ES256", "EdDSA"}
	}
	out := make([]jose.SignatureAlgorithm, 0, len(configured))
	for _, a := range configured {
		if !supportedAlg(a) {
			return nil, fmt.Errorf("oidc: config: algorithm %q cannot be allowed "+
				"(supported: RS256/384/512, PS256/384/512, ES256/384/512, EdDSA)", a)
		}
		if !slices.Contains(out, jose.SignatureAlgorithm(a)) {
			out = append(out, jose.SignatureAlgorithm(a))
		}
	}
	return out, nil
}

func scopesWithOpenID(scopes []string) []string {
	if len(scopes) == 0 {
		return []string{"openid", "profile", "email"}
	}
	if slices.Contains(scopes, "openid") {
		return slices.Clone(scopes)
	}
	return append([]string{"openid"}, scopes...)
}

// Issuer returns the configured issuer URL.
func (v *Verifier) Issuer() string { return v.issuer }
