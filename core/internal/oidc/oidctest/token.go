package oidctest

import (
	"crypto/hmac"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/go-jose/go-jose/v4"
)

// Claims are token claims. Mint and Token.With merge them over the defaults: a nil
// value removes a claim, a time.Time becomes a NumericDate.
type Claims map[string]any

// Token is a token being built. Token() starts it with the defaults of a valid access
// token for the issuer's user: iss, sub, aud (the issuer's audience), iat now, exp
// now + token TTL, email, email_verified, name, preferred_username, jti, signed with
// the current key of the default algorithm and its kid.
type Token struct {
	iss    *Issuer
	alg    string // "" = the default algorithm, or the algorithm of the key named by kid
	kid    string
	kidSet bool
	claims Claims
}

// Token starts a token for the current user.
func (i *Issuer) Token() *Token { return i.tokenFor(i.User(), i.cfg.now()) }

func (i *Issuer) tokenFor(u User, now time.Time) *Token {
	c := Claims{
		"iss":                i.URL(),
		"sub":                u.Subject,
		"aud":                i.cfg.audience,
		"iat":                now,
		"exp":                now.Add(i.cfg.tokenTTL),
		"jti":                randomValue(),
		"email":              u.Email,
		"email_verified":     u.EmailVerified,
		"name":               u.Name,
		"preferred_username": u.PreferredUsername,
	}
	maps.Copy(c, u.Claims)
	return &Token{iss: i, claims: c}
}

// Alg signs the token with the current key of alg (the issuer must have one, see
// WithAlgs) and sets the alg header accordingly.
func (t *Token) Alg(alg string) *Token { t.alg = alg; return t }

// KeyID sets the kid header. If kid names one of the issuer's keys (published or
// rotated out) whose algorithm fits, the token is signed with that key; otherwise it
// is signed with the current key and only the header lies.
func (t *Token) KeyID(kid string) *Token { t.kid, t.kidSet = kid, true; return t }

// NoKeyID leaves the kid header out.
func (t *Token) NoKeyID() *Token { return t.KeyID("") }

// Issuer sets iss.
func (t *Token) Issuer(iss string) *Token { return t.Set("iss", iss) }

// Subject sets sub.
func (t *Token) Subject(sub string) *Token { return t.Set("sub", sub) }

// Audience sets aud: a string for one value, an array for several.
func (t *Token) Audience(aud ...string) *Token {
	if len(aud) == 1 {
		return t.Set("aud", aud[0])
	}
	return t.Set("aud", aud)
}

// Email sets email and email_verified.
func (t *Token) Email(email string, verified bool) *Token {
	return t.Set("email", email).Set("email_verified", verified)
}

// ExpiresAt sets exp.
func (t *Token) ExpiresAt(at time.Time) *Token { return t.Set("exp", at) }

// NotBefore sets nbf.
func (t *Token) NotBefore(at time.Time) *Token { return t.Set("nbf", at) }

// IssuedAt sets iat.
func (t *Token) IssuedAt(at time.Time) *Token { return t.Set("iat", at) }

// Set sets a claim; a nil value removes it.
func (t *Token) Set(name string, value any) *Token {
	if value == nil {
		delete(t.claims, name)
	} else {
		t.claims[name] = value
	}
	return t
}

// With merges claims over the token's (nil values remove).
func (t *Token) With(claims ...Claims) *Token {
	for _, c := range claims {
		for k, v := range c {
			t.Set(k, v)
		}
	}
	return t
}

// Claims returns a copy of the claims as they will be signed.
func (t *Token) Claims() Claims { return normalize(t.claims) }

// Sign returns the token in compact serialization.
func (t *Token) Sign() string {
	t.iss.tb.Helper()
	s, err := t.sign()
	if err != nil {
		t.iss.tb.Fatalf("oidctest: sign token: %v", err)
	}
	return s
}

// SignNone returns the token with alg "none" and an empty signature.
func (t *Token) SignNone() string {
	t.iss.tb.Helper()
	return t.compact(map[string]any{"alg": "none", "typ": "JWT"}, func([]byte) []byte { return nil })
}

// SignHS256 returns the token MACed with HS256 under secret; the kid header is the
// one of the key Sign would use unless KeyID says otherwise.
func (t *Token) SignHS256(secret []byte) string {
	t.iss.tb.Helper()
	header := map[string]any{"alg": "HS256", "typ": "JWT"}
	if kid := t.headerKID(); kid != "" {
		header["kid"] = kid
	}
	return t.compact(header, func(input []byte) []byte {
		m := hmac.New(sha256.New, secret)
		m.Write(input)
		return m.Sum(nil)
	})
}

// sign signs with go-jose; it never fails the test, so handlers can use it.
func (t *Token) sign() (string, error) {
	key, kid, err := t.key()
	if err != nil {
		return "", err
	}
	payload, err := json.Marshal(normalize(t.claims))
	if err != nil {
		return "", fmt.Errorf("encode claims: %w", err)
	}
	opts := (&jose.SignerOptions{}).WithType("JWT")
	if kid != "" {
		opts = opts.WithHeader("kid", kid)
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.SignatureAlgorithm(key.alg), Key: key.priv}, opts)
	if err != nil {
		return "", fmt.Errorf("new signer: %w", err)
	}
	obj, err := signer.Sign(payload)
	if err != nil {
		return "", fmt.Errorf("sign: %w", err)
	}
	return obj.CompactSerialize()
}

// key picks the signing key and the kid header.
func (t *Token) key() (*signingKey, string, error) {
	var key *signingKey
	if t.kidSet && t.kid != "" {
		if k := t.iss.keyByID(t.kid); k != nil && (t.alg == "" || t.alg == k.alg) {
			key = k
		}
	}
	if key == nil {
		var err error
		if key, err = t.iss.lookupKey(t.alg); err != nil {
			return nil, "", err
		}
	}
	if t.kidSet {
		return key, t.kid, nil
	}
	return key, key.kid, nil
}

// headerKID is the kid header of a token not signed by Sign.
func (t *Token) headerKID() string {
	if t.kidSet {
		return t.kid
	}
	key, _, err := t.key()
	if err != nil {
		return ""
	}
	return key.kid
}

// compact builds header.payload.signature by hand, for algorithms go-jose refuses
// to produce.
func (t *Token) compact(header map[string]any, mac func(signingInput []byte) []byte) string {
	t.iss.tb.Helper()
	h, err := json.Marshal(header)
	if err != nil {
		t.iss.tb.Fatalf("oidctest: encode header: %v", err)
	}
	p, err := json.Marshal(normalize(t.claims))
	if err != nil {
		t.iss.tb.Fatalf("oidctest: encode claims: %v", err)
	}
	input := base64.RawURLEncoding.EncodeToString(h) + "." + base64.RawURLEncoding.EncodeToString(p)
	return input + "." + base64.RawURLEncoding.EncodeToString(mac([]byte(input)))
}

// normalize copies claims, turning time.Time values into NumericDates.
func normalize(claims Claims) Claims {
	out := make(Claims, len(claims))
	for k, v := range claims {
		if at, ok := v.(time.Time); ok {
			v = at.Unix()
		}
		out[k] = v
	}
	return out
}

// lookupKey returns the current key of alg ("" means the default algorithm).
func (i *Issuer) lookupKey(alg string) (*signingKey, error) {
	if alg == "" {
		alg = i.cfg.algs[0]
	}
	i.mu.Lock()
	defer i.mu.Unlock()
	for _, k := range slices.Backward(i.keys) {
		if k.alg == alg {
			return k, nil
		}
	}
	return nil, fmt.Errorf("the issuer has no %s key (see WithAlgs)", alg)
}

// Mint returns a valid access token for the current user, with claims merged over
// the defaults (see Token).
func (i *Issuer) Mint(claims ...Claims) string {
	i.tb.Helper()
	return i.Token().With(claims...).Sign()
}

// MintNone returns an unsigned token (alg "none").
func (i *Issuer) MintNone(claims ...Claims) string {
	i.tb.Helper()
	return i.Token().With(claims...).SignNone()
}

// MintHS256WithPublicKey returns the algorithm confusion attack: a token MACed with
// HS256 whose secret is the PEM encoding of the current public key, and whose kid
// names that key. A verifier that lets the token pick the algorithm accepts it.
func (i *Issuer) MintHS256WithPublicKey(claims ...Claims) string {
	i.tb.Helper()
	return i.Token().With(claims...).SignHS256(i.PublicKeyPEM())
}

// MintWithUnknownKid returns a token signed with the current key but naming a fresh
// random kid that no key set holds; every call names another one.
func (i *Issuer) MintWithUnknownKid(claims ...Claims) string {
	i.tb.Helper()
	return i.Token().With(claims...).KeyID("unknown-" + randomValue()[:16]).Sign()
}

// PublicKeyDER returns the current key of the default algorithm as PKIX DER.
func (i *Issuer) PublicKeyDER() []byte {
	i.tb.Helper()
	der, err := x509.MarshalPKIXPublicKey(i.currentKey("").priv.Public())
	if err != nil {
		i.tb.Fatalf("oidctest: marshal public key: %v", err)
	}
	return der
}

// PublicKeyPEM returns the current key of the default algorithm as a PEM "PUBLIC
// KEY" block.
func (i *Issuer) PublicKeyPEM() []byte {
	i.tb.Helper()
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: i.PublicKeyDER()})
}
