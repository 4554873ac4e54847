package oidc

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
)

// PKCE is a Proof Key for Code Exchange pair (RFC 7636) with method S256. Keep
// Verifier server side (next to the login state); send Challenge in the
// authorization request.
type PKCE struct {
	Verifier  string
	Challenge string
}

// NewPKCE returns a fresh PKCE pair: a verifier of 32 random bytes (43 characters of
// base64url) and its S256 challenge.
func NewPKCE() PKCE {
	verifier := RandomValue()
	return PKCE{Verifier: verifier, Challenge: S256Challenge(verifier)}
}

// S256Challenge returns BASE64URL(SHA256(verifier)), the S256 code challenge.
func S256Challenge(verifier string) string {
	sum := sha256.Sum256([]byte(verifier))
	return base64.RawURLEncoding.EncodeToString(sum[:])
}

// RandomValue returns 32 random bytes in base64url: a value for state, nonce or a
// PKCE verifier.
func RandomValue() string {
	var b [32]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (it crashes the program instead)
	return base64.RawURLEncoding.EncodeToString(b[:])
}

// TokenSet is the token response of a code exchange or a refresh. The access token is
// passed through as the provider issued it (it may be opaque); verify it with Verify
// before trusting it as a bearer token.
type TokenSet struct {
	AccessToken  string
	TokenType    string
	RefreshToken string
	// IDToken is the raw ID token; IDClaims its verified claims. Both are empty when a
	// refresh response carries no ID token.
	IDToken  string
	IDClaims *Claims
	// Expiry is when the access token expires, zero when the provider did not say.
	Expiry time.Time
	Scope  string
}

// String implements fmt.Stringer without printing any token.
func (t TokenSet) String() string {
	return fmt.Sprintf("TokenSet{type=%s expiry=%s scope=%q tokens=[redacted]}",
		t.TokenType, t.Expiry.UTC().Format(time.RFC3339), t.Scope)
}

// GoString implements fmt.GoStringer without printing any token.
func (t TokenSet) GoString() string { return t.String() }

// LogValue implements slog.LogValuer without logging any token.
func (t TokenSet) LogValue() slog.Value {
	return slog.GroupValue(slog.String("token_type", t.TokenType), slog.Time("expiry", t.Expiry),
		slog.String("scope", t.Scope))
}

var (
	_ fmt.Stringer   = TokenSet{}
	_ fmt.GoStringer = TokenSet{}
	_ slog.LogValuer = TokenSet{}
)

// AuthCodeURL returns the provider's authorization URL for a login with the
// authorization code flow and PKCE (S256): the browser is sent there and comes back
// to the redirect URL with code and state. state and nonce should be RandomValue()s
// kept with the PKCE verifier until the callback.
func (v *Verifier) AuthCodeURL(state, nonce, codeChallenge string) string {
	q := url.Values{
		"response_type":         {"code"},
		"client_id":             {v.clientID},
		"scope":                 {strings.Join(v.scopes, " ")},
		"state":                 {state},
		"code_challenge":        {codeChallenge},
		"code_challenge_method": {"S256"},
	}
	if v.redirectURL != "" {
		q.Set("redirect_uri", v.redirectURL)
	}
	if nonce != "" {
		q.Set("nonce", nonce)
	}
	return appendQuery(v.meta.AuthorizationEndpoint, q)
}

// Exchange redeems an authorization code at the token endpoint, proving possession
// of the PKCE codeVerifier. redirectURI must be the one of the authorization request
// (empty means Config.RedirectURL). The returned ID token is verified like a bearer
// token but with the client id as audience, and its nonce claim must equal nonce
// (an empty nonce means the login sent none and the token must carry none).
func (v *Verifier) Exchange(ctx context.Context, code, codeVerifier, redirectURI, nonce string) (*TokenSet, error) {
	if redirectURI == "" {
		redirectURI = v.redirectURL
	}
	form := url.Values{
		"grant_type":    {"authorization_code"},
		"code":          {code},
		"code_verifier": {codeVerifier},
	}
	if redirectURI != "" {
		form.Set("redirect_uri", redirectURI)
	}
	ts, err := v.tokenRequest(ctx, form)
	if err != nil {
		return nil, fmt.Errorf("exchange authorization code: %w", err)
	}
	if ts.IDToken == "" {
		return nil, errcode.New(CodeTokenMalformed, "token response has no id_token (is the openid scope requested?)")
	}
	if err := v.checkIDToken(ctx, ts); err != nil {
		return nil, fmt.Errorf("exchange authorization code: %w", err)
	}
	got, _ := ts.IDClaims.Raw["nonce"].(string)
	if subtle.ConstantTimeCompare([]byte(got), []byte(nonce)) != 1 {
		return nil, errcode.New(CodeTokenWrongNonce, "ID token nonce does not match the login's nonce")
	}
	return ts, nil
}

// Refresh redeems a refresh token at the token endpoint. A returned ID token is
// verified (with the client id as audience); the caller should check that its subject
// is the session's (OpenID Connect Core 12.2). When the provider does not rotate
// refresh tokens, the returned set carries the one given.
func (v *Verifier) Refresh(ctx context.Context, refreshToken string) (*TokenSet, error) {
	ts, err := v.tokenRequest(ctx, url.Values{
		"grant_type":    {"refresh_token"},
		"refresh_token": {refreshToken},
	})
	if err != nil {
		return nil, fmt.Errorf("refresh tokens: %w", err)
	}
	if ts.RefreshToken == "" {
		ts.RefreshToken = refreshToken
	}
	if ts.IDToken != "" {
		if err := v.checkIDToken(ctx, ts); err != nil {
			return nil, fmt.Errorf("refresh tokens: %w", err)
		}
	}
	return ts, nil
}

// EndSessionURL returns the provider's RP-initiated logout URL, or false when the
// provider advertises no end_session_endpoint. Empty arguments are left out.
func (v *Verifier) EndSessionURL(idTokenHint, postLogoutRedirectURI, state string) (string, bool) {
	if v.meta.EndSessionEndpoint == "" {
		return "", false
	}
	q := url.Values{}
	for k, val := range map[string]string{
		"id_token_hint":            idTokenHint,
		"post_logout_redirect_uri": postLogoutRedirectURI,
		"state":                    state,
		"client_id":                v.clientID,
	} {
		if val != "" {
			q.Set(k, val)
		}
	}
	return appendQuery(v.meta.EndSessionEndpoint, q), true
}

// checkIDToken verifies ts.IDToken as an ID token of this client and sets IDClaims.
func (v *Verifier) checkIDToken(ctx context.Context, ts *TokenSet) error {
	claims, _, err := v.verify(ctx, ts.IDToken, v.clientID)
	if err != nil {
		return fmt.Errorf("verify ID token: %w", err)
	}
	// OpenID Connect Core 3.1.3.7: if azp is present it must be our client id.
	if azp, ok := claims.Raw["azp"].(string); ok && azp != v.clientID {
		return errcode.New(CodeTokenWrongAudience, "ID token was issued to another client")
	}
	ts.IDClaims = claims
	return nil
}

// tokenResponse is a successful token endpoint response (RFC 6749, 5.1).
type tokenResponse struct {
	AccessToken  string          `json:"access_token"`
	TokenType    string          `json:"token_type"`
	RefreshToken string          `json:"refresh_token"`
	ExpiresIn    json.RawMessage `json:"expires_in"`
	IDToken      string          `json:"id_token"`
	Scope        string          `json:"scope"`
}

// oauthError is an error response of the token endpoint (RFC 6749, 5.2).
type oauthError struct {
	Error            string `json:"error"`
	ErrorDescription string `json:"error_description"`
}

// tokenRequest POSTs form to the token endpoint with this client's authentication.
func (v *Verifier) tokenRequest(ctx context.Context, form url.Values) (*TokenSet, error) {
	if v.clientID == "" {
		return nil, errors.New("oidc: no ClientID is configured for the login flow")
	}
	basic := v.clientSecret != "" && v.useBasicAuth()
	if !basic {
		form.Set("client_id", v.clientID)
		if v.clientSecret != "" {
			form.Set("client_secret", string(v.clientSecret))
		}
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, v.meta.TokenEndpoint, strings.NewReader(form.Encode()))
	if err != nil {
		return nil, fmt.Errorf("build token request: %w", err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Accept", "application/json")
	if basic {
		// RFC 6749, 2.3.1: client id and secret are form-encoded before Basic encoding.
		req.SetBasicAuth(url.QueryEscape(v.clientID), url.QueryEscape(string(v.clientSecret)))
	}
	resp, err := v.client.Do(req)
	if err != nil {
		return nil, errcode.Wrap(err, CodeProviderUnavailable, "token endpoint is unreachable")
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxResponseBytes+1))
	if err != nil {
		return nil, errcode.Wrap(err, CodeProviderUnavailable, "cannot read the token response")
	}
	if len(body) > maxResponseBytes {
		return nil, errcode.New(CodeProviderUnavailable, "token response is larger than %d bytes", maxResponseBytes)
	}
	if resp.StatusCode != http.StatusOK {
		var oe oauthError
		if (resp.StatusCode == http.StatusBadRequest || resp.StatusCode == http.StatusUnauthorized) &&
			json.Unmarshal(body, &oe) == nil && validErrorCode(oe.Error) {
			return nil, errcode.Wrap(fmt.Errorf("%s: %s", oe.Error, clip(oe.ErrorDescription)),
				CodeGrantRejected, "the provider refused the grant").WithDetails("error", oe.Error)
		}
		return nil, errcode.New(CodeProviderUnavailable, "token endpoint answered with status %d", resp.StatusCode)
	}
	var tr tokenResponse
	if err := json.Unmarshal(body, &tr); err != nil {
		return nil, errcode.Wrap(err, CodeProviderUnavailable, "token response is not JSON")
	}
	if tr.AccessToken == "" {
		return nil, errcode.New(CodeProviderUnavailable, "token response has no access_token")
	}
	ts := &TokenSet{
		AccessToken:  tr.AccessToken,
		TokenType:    tr.TokenType,
		RefreshToken: tr.RefreshToken,
		IDToken:      tr.IDToken,
		Scope:        tr.Scope,
	}
	if secs, ok := expiresIn(tr.ExpiresIn); ok {
		ts.Expiry = v.now().Add(time.Duration(secs) * time.Second)
	}
	return ts, nil
}

// useBasicAuth reports whether the client secret goes in an Authorization header
// (client_secret_basic, the default of RFC 6749) rather than in the form
// (client_secret_post, when that is all the provider advertises).
func (v *Verifier) useBasicAuth() bool {
	methods := v.meta.TokenEndpointAuthMethodsSupported
	return len(methods) == 0 || slices.Contains(methods, "client_secret_basic") ||
		!slices.Contains(methods, "client_secret_post")
}

// expiresIn reads expires_in as a number or, as some providers send it, a string.
func expiresIn(raw json.RawMessage) (int64, bool) {
	if len(raw) == 0 {
		return 0, false
	}
	var n json.Number
	if err := json.Unmarshal(raw, &n); err != nil {
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return 0, false
		}
		n = json.Number(s)
	}
	secs, err := n.Int64()
	if err != nil || secs <= 0 {
		return 0, false
	}
	return secs, true
}

// validErrorCode accepts the OAuth error codes' alphabet (RFC 6749, 5.2: %x20-21 /
// %x23-5B / %x5D-7E) restricted to the letters and underscores real codes use.
func validErrorCode(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for _, r := range s {
		if (r < 'a' || r > 'z') && r != '_' {
			return false
		}
	}
	return true
}

// appendQuery adds q to endpoint, which may already carry a query.
func appendQuery(endpoint string, q url.Values) string {
	sep := "?"
	if strings.Contains(endpoint, "?") {
		sep = "&"
	}
	return endpoint + sep + q.Encode()
}
