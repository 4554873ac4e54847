package identity

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"strings"
)

// Token kinds, recognisable by prefix so a leaked token is easy to identify and a
// bearer is routed to the right verifier without guessing.
const (
	apiKeyPrefix  = "gpk_" // API key of a user or service account
	sessionPrefix = "gps_" // access token of a local session
	refreshPrefix = "gpr_" // refresh token of a local session
	// keyIDLen is the length of the visible, unique part after the prefix.
	keyIDLen = 12
)

const idAlphabet = "abcdefghijkmnpqrstuvwxyz23456789" // no 0/o/1/l

// newToken returns kind + a 12-character visible id + a 256-bit secret, the visible
// part (kind + id) and the SHA-256 of the whole token.
func newToken(kind string) (token, visible string, hash []byte) {
	id := make([]byte, keyIDLen)
	raw := make([]byte, keyIDLen)
	_, _ = rand.Read(raw)
	for i, b := range raw {
		id[i] = idAlphabet[int(b)%len(idAlphabet)]
	}
	secret := make([]byte, 32)
	_, _ = rand.Read(secret)
	visible = kind + string(id)
	token = visible + base64.RawURLEncoding.EncodeToString(secret)
	return token, visible, hashToken(token)
}

func hashToken(token string) []byte {
	h := sha256.Sum256([]byte(token))
	return h[:]
}

// splitToken returns the visible part of a token of kind, or false when token does
// not have that shape.
func splitToken(token, kind string) (visible string, ok bool) {
	if !strings.HasPrefix(token, kind) || len(token) != len(kind)+keyIDLen+43 {
		return "", false
	}
	return token[:len(kind)+keyIDLen], true
}

func hashEqual(a, b []byte) bool { return subtle.ConstantTimeCompare(a, b) == 1 }
