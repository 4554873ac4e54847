package maassim

import (
	"crypto/subtle"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Credential is one MAAS API key: OAuth 1.0 consumer and token. MAAS API
// keys are "<consumer key>:<token key>:<token secret>"; the consumer
// secret is always empty.
type Credential struct {
	Username    string
	ConsumerKey string
	TokenKey    string
	TokenSecret string
}

// APIKey returns the key in MAAS's format.
func (c Credential) APIKey() string {
	return c.ConsumerKey + ":" + c.TokenKey + ":" + c.TokenSecret
}

// oauthTimestampThreshold is how far a request's oauth_timestamp may be from
// the server's clock (piston3's OAuthServer default).
const oauthTimestampThreshold = 300 * time.Second

// authError is a refused OAuth request, answered like MAAS (piston3)
// answers it: 401 with the message as a plain-text body, or 400 for a
// malformed request.
type authError struct {
	status int
	msg    string
}

func (e *authError) Error() string { return e.msg }

// necessaryOAuthParams are the parameters MAAS requires in the header.
var necessaryOAuthParams = []string{
	"oauth_consumer_key", "oauth_token", "oauth_signature",
	"oauth_signature_method", "oauth_timestamp", "oauth_nonce",
}

// parseAuthParams parses an "OAuth k="v", ..." Authorization header the
// way MAAS does; nil when the header does not start with "OAuth". Values
// are URL-unescaped as OAuth requires.
func parseAuthParams(h string) map[string]string {
	h = strings.TrimSpace(h)
	if !strings.HasPrefix(h, "OAuth") {
		return nil
	}
	out := map[string]string{}
	for _, part := range strings.Split(strings.TrimSpace(strings.TrimPrefix(h, "OAuth")), ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			continue
		}
		v = strings.Trim(strings.TrimSpace(v), `"`)
		if uv, err := url.QueryUnescape(v); err == nil {
			v = uv
		}
		out[strings.TrimSpace(k)] = v
	}
	return out
}

// authenticate checks the request's OAuth 1.0 PLAINTEXT signature and
// returns the user. The caller holds s.mu.
func (s *Server) authenticate(r *http.Request, now time.Time) (string, error) {
	params := parseAuthParams(r.Header.Get("Authorization"))
	if params == nil {
		return "", &authError{http.StatusUnauthorized, "Authorization Required"}
	}
	for _, p := range necessaryOAuthParams {
		if _, ok := params[p]; !ok {
			return "", &authError{http.StatusUnauthorized, "Authorization Required"}
		}
	}
	ts, err := strconv.ParseInt(params["oauth_timestamp"], 10, 64)
	if err != nil {
		return "", &authError{http.StatusBadRequest, "Bad Request: the following problems were found among the auth params: oauth_timestamp has an unexpected type"}
	}
	if v, ok := params["oauth_version"]; ok && v != "1.0" {
		return "", &authError{http.StatusUnauthorized, fmt.Sprintf("Authorization Error: 'OAuth version %s not supported.'", v)}
	}
	var cred *Credential
	consumerKnown := false
	for i := range s.creds {
		c := &s.creds[i]
		if c.ConsumerKey == params["oauth_consumer_key"] {
			consumerKnown = true
			if c.TokenKey == params["oauth_token"] {
				cred = c
			}
		}
	}
	if !consumerKnown {
		return "", &authError{http.StatusUnauthorized, "Authorization Error: Invalid API key."}
	}
	if cred == nil {
		return "", &authError{http.StatusUnauthorized, fmt.Sprintf("Authorization Error: 'Invalid access token: %s'", params["oauth_token"])}
	}
	if d := now.Sub(time.Unix(ts, 0)); d > oauthTimestampThreshold || d < -oauthTimestampThreshold {
		return "", &authError{http.StatusUnauthorized, fmt.Sprintf(
			"Authorization Error: 'Expired timestamp: given %d and now %d has a greater difference than threshold %d'",
			ts, now.Unix(), int(oauthTimestampThreshold.Seconds()))}
	}
	if m := params["oauth_signature_method"]; m != "PLAINTEXT" {
		return "", &authError{http.StatusUnauthorized, fmt.Sprintf("Authorization Error: 'Signature method %s not supported try one of the following: PLAINTEXT'", m)}
	}
	// PLAINTEXT: the signature is "<consumer secret>&<token secret>", and
	// MAAS consumers have no secret.
	want := "&" + cred.TokenSecret
	if subtle.ConstantTimeCompare([]byte(params["oauth_signature"]), []byte(want)) != 1 {
		return "", &authError{http.StatusUnauthorized, "Authorization Error: 'Invalid signature.'"}
	}
	nonceKey := cred.TokenKey + "\x00" + params["oauth_nonce"] + "\x00" + params["oauth_timestamp"]
	if _, used := s.nonces[nonceKey]; used {
		return "", &authError{http.StatusUnauthorized, fmt.Sprintf("Authorization Error: 'Nonce already used: %s'", params["oauth_nonce"])}
	}
	for k, seen := range s.nonces {
		if now.Sub(seen) > 2*oauthTimestampThreshold {
			delete(s.nonces, k)
		}
	}
	s.nonces[nonceKey] = now
	return cred.Username, nil
}
