package oidc

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-jose/go-jose/v4"
)

// fetchTimeout bounds one fetch of the key set. The fetch runs detached from the
// request that triggered it so that one cancelled request does not fail the others
// waiting for the same fetch.
const fetchTimeout = 15 * time.Second

// minRSABits is the smallest RSA modulus accepted from a key set.
const minRSABits = 2048

// errThrottled reports that no fetch was started because the previous one started less
// than the refresh interval ago.
var errThrottled = errors.New("key set was fetched less than the refresh interval ago")

// verificationKey is one parsed public key of the provider's key set.
type verificationKey struct {
	kid string
	alg string           // "alg" member of the JWK, empty when the provider does not pin one
	pub crypto.PublicKey // *rsa.PublicKey, *ecdsa.PublicKey or ed25519.PublicKey
}

// fits reports whether a token signed with alg may be verified with k: the key type
// (and curve) must be the one alg is defined for, and a key pinned to an algorithm
// only verifies that algorithm.
func (k verificationKey) fits(alg jose.SignatureAlgorithm) bool {
	if k.alg != "" && k.alg != string(alg) {
		return false
	}
	switch pub := k.pub.(type) {
	case *rsa.PublicKey:
		return strings.HasPrefix(string(alg), "RS") || strings.HasPrefix(string(alg), "PS")
	case *ecdsa.PublicKey:
		switch alg {
		case jose.ES256:
			return pub.Curve == elliptic.P256()
		case jose.ES384:
			return pub.Curve == elliptic.P384()
		case jose.ES512:
			return pub.Curve == elliptic.P521()
		}
	case ed25519.PublicKey:
		return alg == jose.EdDSA
	}
	return false
}

// keySet is an immutable snapshot of the provider's keys.
type keySet struct {
	byKID     map[string][]verificationKey
	all       []verificationKey
	fetchedAt time.Time
	verified  *verifiedCache // nil when the cache is disabled
}

// fetchCall is one fetch of the key set, shared by every caller that asks for a
// refresh while it runs.
type fetchCall struct {
	done chan struct{}
	err  error // set before done is closed
}

// keyCache holds the provider's key set. Readers load the current snapshot without
// locking; refreshes are deduplicated and rate limited.
type keyCache struct {
	url       string
	client    *http.Client
	now       func() time.Time
	interval  time.Duration
	maxAge    time.Duration
	cacheSize int // entries of each key set's verifiedCache

	set atomic.Pointer[keySet]

	mu        sync.Mutex
	lastStart time.Time  // when the last fetch started; guarded by mu
	inflight  *fetchCall // the running fetch or nil; guarded by mu
}

func newKeyCache(url string, client *http.Client, now func() time.Time, o options) *keyCache {
	return &keyCache{url: url, client: client, now: now,
		interval: o.refreshInterval, maxAge: o.keySetMaxAge, cacheSize: o.verifiedCacheSize}
}

// current returns the cached key set, or an empty one before the first fetch.
func (c *keyCache) current() *keySet {
	if s := c.set.Load(); s != nil {
		return s
	}
	return &keySet{}
}

// stale reports whether s is older than the maximum age.
func (c *keyCache) stale(s *keySet) bool {
	return c.now().Sub(s.fetchedAt) >= c.maxAge
}

// refresh starts a fetch of the key set and returns it. If a fetch is running it
// returns that one; if the last fetch started less than the refresh interval ago it
// returns nil, unless force is set.
func (c *keyCache) refresh(force bool) *fetchCall {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.inflight != nil {
		return c.inflight
	}
	now := c.now()
	if !force && !c.lastStart.IsZero() && now.Sub(c.lastStart) < c.interval {
		return nil
	}
	c.lastStart = now
	call := &fetchCall{done: make(chan struct{})}
	c.inflight = call
	go c.run(call)
	return call
}

// run performs call and publishes its result. A failed fetch keeps the previous keys.
func (c *keyCache) run(call *fetchCall) {
	ctx, cancel := context.WithTimeout(context.Background(), fetchTimeout)
	defer cancel()
	set, err := c.fetch(ctx)
	if err == nil {
		c.set.Store(set)
	}
	c.mu.Lock()
	c.inflight = nil
	c.mu.Unlock()
	call.err = err
	close(call.done)
}

// wait waits for call to finish or ctx to end. A nil call (refresh was throttled)
// yields errThrottled.
func (c *keyCache) wait(ctx context.Context, call *fetchCall) error {
	if call == nil {
		return errThrottled
	}
	select {
	case <-call.done:
		return call.err
	case <-ctx.Done():
		return fmt.Errorf("wait for the key set: %w", ctx.Err())
	}
}

// fetch downloads and parses the key set.
func (c *keyCache) fetch(ctx context.Context) (*keySet, error) {
	var doc struct {
		Keys []json.RawMessage `json:"keys"`
	}
	if err := getJSON(ctx, c.client, c.url, &doc); err != nil {
		return nil, fmt.Errorf("fetch key set: %w", err)
	}
	set, err := parseKeySet(doc.Keys, c.now())
	if err != nil {
		return nil, fmt.Errorf("parse key set from %s: %w", c.url, err)
	}
	set.verified = newVerifiedCache(c.cacheSize)
	return set, nil
}

// parseKeySet keeps the usable signature keys of a JWKS: RSA of at least 2048 bits,
// ECDSA on P-256/384/521 and Ed25519, with use absent or "sig". Keys it cannot use
// (encryption keys, symmetric keys, unknown types) are skipped, never an error: a
// provider may publish keys for other purposes next to its signing keys.
func parseKeySet(raws []json.RawMessage, fetchedAt time.Time) (*keySet, error) {
	set := &keySet{byKID: make(map[string][]verificationKey, len(raws)), fetchedAt: fetchedAt}
	for _, raw := range raws {
		var jwk jose.JSONWebKey
		if err := jwk.UnmarshalJSON(raw); err != nil {
			continue
		}
		if jwk.Use != "" && jwk.Use != "sig" {
			continue
		}
		pub := publicKey(jwk.Key)
		if pub == nil {
			continue
		}
		k := verificationKey{kid: jwk.KeyID, alg: jwk.Algorithm, pub: pub}
		set.all = append(set.all, k)
		set.byKID[k.kid] = append(set.byKID[k.kid], k)
	}
	if len(set.all) == 0 {
		return nil, errors.New("no usable signature keys")
	}
	return set, nil
}

// publicKey returns the public half of a usable key, or nil. A JWKS should never hold
// private keys; if one does, only its public half is kept.
func publicKey(key any) crypto.PublicKey {
	switch k := key.(type) {
	case *rsa.PublicKey:
		if k.N.BitLen() >= minRSABits {
			return k
		}
	case *rsa.PrivateKey:
		return publicKey(&k.PublicKey)
	case *ecdsa.PublicKey:
		return k
	case *ecdsa.PrivateKey:
		return &k.PublicKey
	case ed25519.PublicKey:
		return k
	case ed25519.PrivateKey:
		return k.Public()
	}
	return nil
}

// verifiedCache remembers the claims of tokens whose signature verified with the keys
// of one keySet, keyed by the SHA-256 of the token (the token itself is not kept). It
// lives inside the keySet, so replacing the set forgets every entry: a key the
// provider removed cannot keep verifying through the cache. It holds at most size
// entries and evicts the oldest first.
type verifiedCache struct {
	mu      sync.Mutex
	entries map[[sha256.Size]byte]*Claims
	ring    [][sha256.Size]byte // insertion order; ring[next] is the oldest once full
	next    int
}

func newVerifiedCache(size int) *verifiedCache {
	if size <= 0 {
		return nil
	}
	return &verifiedCache{
		entries: make(map[[sha256.Size]byte]*Claims, size),
		ring:    make([][sha256.Size]byte, 0, size),
	}
}

// get returns the cached claims of the token with hash h. A nil cache holds nothing.
func (c *verifiedCache) get(h [sha256.Size]byte) (*Claims, bool) {
	if c == nil {
		return nil, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	claims, ok := c.entries[h]
	return claims, ok
}

// put caches claims for the token with hash h.
func (c *verifiedCache) put(h [sha256.Size]byte, claims *Claims) {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.entries[h]; ok {
		c.entries[h] = claims
		return
	}
	if len(c.ring) < cap(c.ring) {
		c.ring = append(c.ring, h)
	} else {
		delete(c.entries, c.ring[c.next])
		c.ring[c.next] = h
		c.next = (c.next + 1) % len(c.ring)
	}
	c.entries[h] = claims
}
