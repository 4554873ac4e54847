package oidc

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"math"
	"slices"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
)

// maxTokenBytes bounds the size of a token Verify looks at.
const maxTokenBytes = 64 << 10

// maxNumericDate is 9999-12-31T23:59:59Z; larger dates are refused as malformed.
const maxNumericDate = 253402300799

// Claims are the verified claims of a token.
type Claims struct {
	Issuer            string
	Subject           string
	Audience          []string
	Email             string
	EmailVerified     bool
	Name              string
	PreferredUsername string
	ExpiresAt         time.Time
	IssuedAt          time.Time // zero when the token has no iat
	NotBefore         time.Time // zero when the token has no nbf
	// Raw holds every claim as encoding/json decodes it into an any: numbers are
	// float64, arrays []any, objects map[string]any.
	Raw map[string]any
}

// Verify verifies a bearer token (a JWT in JWS compact serialization): structure,
// algorithm allow-list and its match with the key type, signature with a key of the
// provider's key set, iss, aud (must contain the configured audience), exp, nbf and
// iat (with the clock skew) and a non-empty sub.
//
// Verify does no network I/O unless the token names a key id the cached key set does
// not hold; then it waits for at most one refetch of the key set, which is rate
// limited by the refresh interval. A token verified before with the current key set
// is found in a cache (see WithVerifiedCache) and only has its claims re-checked
// against the clock. Errors are *errcode.Error with a CodeToken* code.
//
// The returned Claims, and in particular its Audience and Raw, may be shared with
// other calls for the same token: treat them as read-only.
func (v *Verifier) Verify(ctx context.Context, raw string) (*Claims, error) {
	if len(raw) > maxTokenBytes {
		return nil, errcode.New(CodeTokenMalformed, "token is larger than %d bytes", maxTokenBytes)
	}
	if v.keys.cacheSize <= 0 {
		c, _, err := v.verify(ctx, raw, v.audience)
		return c, err
	}
	h := sha256.Sum256([]byte(raw))
	if set := v.keys.current(); set.verified != nil {
		if c, ok := set.verified.get(h); ok {
			return v.fromCache(set, c)
		}
	}
	c, set, err := v.verify(ctx, raw, v.audience)
	if err != nil {
		return nil, err
	}
	cp := *c
	set.verified.put(h, &cp) // into the set whose key verified it, current or not
	return c, nil
}

// fromCache answers Verify for a token found in the cache of set: the claims are
// checked against the clock again, and a stale set is refreshed as on a cache miss.
func (v *Verifier) fromCache(set *keySet, c *Claims) (*Claims, error) {
	if v.keys.stale(set) {
		v.keys.refresh(false) // in the background
	}
	if err := v.validate(c, v.audience); err != nil {
		return nil, err
	}
	cp := *c
	return &cp, nil
}

// verify is Verify without the cache, with the audience to require: the configured
// audience for bearer tokens, the client id for ID tokens. It also returns the key
// set whose key verified the signature.
func (v *Verifier) verify(ctx context.Context, raw, audience string) (*Claims, *keySet, error) {
	if len(raw) > maxTokenBytes {
		return nil, nil, errcode.New(CodeTokenMalformed, "token is larger than %d bytes", maxTokenBytes)
	}
	jws, err := jose.ParseSignedCompact(raw, v.algs)
	if err != nil {
		var unexpected *jose.ErrUnexpectedSignatureAlgorithm
		if errors.As(err, &unexpected) {
			return nil, nil, errcode.New(CodeTokenAlgNotAllowed,
				"signature algorithm %q is not allowed", clip(string(unexpected.Got)))
		}
		return nil, nil, errcode.Wrap(err, CodeTokenMalformed, "token is not a JWS in compact serialization")
	}
	header := jws.Signatures[0].Header
	if _, ok := header.ExtraHeaders["crit"]; ok {
		return nil, nil, errcode.New(CodeTokenMalformed, "token has critical header parameters, none are supported")
	}
	payload, set, err := v.verifySignature(ctx, jws, jose.SignatureAlgorithm(header.Algorithm), header.KeyID)
	if err != nil {
		return nil, nil, err
	}
	c, err := parseClaims(payload)
	if err != nil {
		return nil, nil, err
	}
	if err := v.validate(c, audience); err != nil {
		return nil, nil, err
	}
	return c, set, nil
}

// verifySignature verifies jws with the provider's key named kid (or, without kid,
// with any key that fits alg) and returns the payload. An unknown kid causes one
// refetch of the key set, unless one happened less than the refresh interval ago.
// It returns the payload and the key set that verified it.
func (v *Verifier) verifySignature(ctx context.Context, jws *jose.JSONWebSignature, alg jose.SignatureAlgorithm, kid string) ([]byte, *keySet, error) {
	set := v.keys.current()
	if v.keys.stale(set) {
		v.keys.refresh(false) // in the background; this request uses the keys it has
	}
	if payload, found, err := verifyWith(set, jws, alg, kid); found {
		return payload, set, err
	}
	fetchErr := v.keys.wait(ctx, v.keys.refresh(false))
	set = v.keys.current()
	if payload, found, err := verifyWith(set, jws, alg, kid); found {
		return payload, set, err
	}
	return nil, nil, errcode.Wrap(fetchErr, CodeTokenUnknownKey, "token is signed with a key the provider does not publish")
}

// verifyWith verifies jws with the keys of set. found is false when set has no key
// for kid (or, when kid is empty, no key that fits alg).
func verifyWith(set *keySet, jws *jose.JSONWebSignature, alg jose.SignatureAlgorithm, kid string) (payload []byte, found bool, err error) {
	candidates := set.all
	if kid != "" {
		candidates = set.byKID[kid]
	}
	tried := 0
	for _, k := range candidates {
		if !k.fits(alg) {
			continue
		}
		tried++
		if payload, err := jws.Verify(k.pub); err == nil {
			return payload, true, nil
		}
	}
	switch {
	case tried > 0:
		return nil, true, errcode.New(CodeTokenBadSignature, "token signature does not verify")
	case kid != "" && len(candidates) > 0:
		return nil, true, errcode.New(CodeTokenAlgNotAllowed,
			"signature algorithm %q does not match the type of key %q", alg, clip(kid))
	}
	return nil, false, nil
}

// validate checks the claims of a token whose signature verified.
func (v *Verifier) validate(c *Claims, audience string) error {
	if c.Issuer != v.issuer {
		return errcode.New(CodeTokenWrongIssuer, "token was issued by another issuer than %q", v.issuer)
	}
	if !slices.Contains(c.Audience, audience) {
		return errcode.New(CodeTokenWrongAudience, "token is not meant for audience %q", audience)
	}
	now := v.now()
	if !now.Before(c.ExpiresAt.Add(v.skew)) {
		return errcode.New(CodeTokenExpired, "token expired at %s", c.ExpiresAt.UTC().Format(time.RFC3339))
	}
	if !c.NotBefore.IsZero() && now.Add(v.skew).Before(c.NotBefore) {
		return errcode.New(CodeTokenNotYetValid, "token is not valid before %s", c.NotBefore.UTC().Format(time.RFC3339))
	}
	if !c.IssuedAt.IsZero() && now.Add(v.skew).Before(c.IssuedAt) {
		return errcode.New(CodeTokenNotYetValid, "token is issued in the future (%s)", c.IssuedAt.UTC().Format(time.RFC3339))
	}
	if c.Subject == "" {
		return errcode.New(CodeTokenMissingSubject, "token has no subject")
	}
	return nil
}

// parseClaims decodes the JSON claims set of a verified token. Registered claims of
// the wrong type and a missing exp make the token malformed; profile claims of the
// wrong type are ignored.
func parseClaims(payload []byte) (*Claims, error) {
	var raw map[string]any
	if err := json.Unmarshal(payload, &raw); err != nil || raw == nil {
		return nil, errcode.Wrap(err, CodeTokenMalformed, "token claims are not a JSON object")
	}
	c := &Claims{Raw: raw}
	var err error
	if c.Issuer, err = stringClaim(raw, "iss"); err != nil {
		return nil, err
	}
	if c.Subject, err = stringClaim(raw, "sub"); err != nil {
		return nil, err
	}
	if c.Audience, err = audienceClaim(raw); err != nil {
		return nil, err
	}
	var present bool
	if c.ExpiresAt, present, err = timeClaim(raw, "exp"); err != nil {
		return nil, err
	} else if !present {
		return nil, errcode.New(CodeTokenMalformed, "token has no exp claim")
	}
	if c.NotBefore, _, err = timeClaim(raw, "nbf"); err != nil {
		return nil, err
	}
	if c.IssuedAt, _, err = timeClaim(raw, "iat"); err != nil {
		return nil, err
	}
	c.Email, _ = raw["email"].(string)
	c.Name, _ = raw["name"].(string)
	c.PreferredUsername, _ = raw["preferred_username"].(string)
	switch ev := raw["email_verified"].(type) {
	case bool:
		c.EmailVerified = ev
	case string: // some providers send "true"
		c.EmailVerified = ev == "true"
	}
	return c, nil
}

func stringClaim(raw map[string]any, name string) (string, error) {
	switch s := raw[name].(type) {
	case nil:
		return "", nil
	case string:
		return s, nil
	}
	return "", errcode.New(CodeTokenMalformed, "token claim %s is not a string", name)
}

// audienceClaim accepts aud as a string or an array of strings (RFC 7519, 4.1.3).
func audienceClaim(raw map[string]any) ([]string, error) {
	switch aud := raw["aud"].(type) {
	case nil:
		return nil, nil
	case string:
		return []string{aud}, nil
	case []any:
		out := make([]string, 0, len(aud))
		for _, a := range aud {
			s, ok := a.(string)
			if !ok {
				return nil, errcode.New(CodeTokenMalformed, "token claim aud holds a value that is not a string")
			}
			out = append(out, s)
		}
		return out, nil
	}
	return nil, errcode.New(CodeTokenMalformed, "token claim aud is neither a string nor an array")
}

// timeClaim reads a NumericDate (seconds since the epoch, possibly fractional).
func timeClaim(raw map[string]any, name string) (t time.Time, present bool, err error) {
	v, ok := raw[name]
	if !ok || v == nil {
		return time.Time{}, false, nil
	}
	f, ok := v.(float64)
	if !ok || math.IsNaN(f) || f < 0 || f > maxNumericDate {
		return time.Time{}, true, errcode.New(CodeTokenMalformed, "token claim %s is not a valid NumericDate", name)
	}
	sec, frac := math.Modf(f)
	return time.Unix(int64(sec), int64(frac*1e9)), true, nil
}

// clip shortens an attacker-supplied header value before it goes into a message.
func clip(s string) string {
	const limit = 32
	if len(s) <= limit {
		return s
	}
	return s[:limit] + "..."
}
