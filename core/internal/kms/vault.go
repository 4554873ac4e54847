package kms

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"

	vault "github.com/hashicorp/vault/api"
)

// VaultWriter is the part of a Vault client the Vault keyring uses: a
// logical write that returns the response's data. Errors from Vault keep
// its *vault.ResponseError in their chain.
type VaultWriter interface {
	Write(ctx context.Context, path string, data map[string]any) (map[string]any, error)
}

// Vault is a Keyring whose data keys come from a Vault Transit key of type
// aes256-gcm96: transit/datakey/plaintext/<key> returns a fresh data key
// and the same key wrapped by the transit key (vault:vN:...); the secret is
// encrypted here with the data key, and only the wrapped key is kept.
// transit/decrypt/<key> unwraps it again. Rotating the transit key in Vault
// makes new envelopes use the new version; old ones keep decrypting until
// Vault's min_decryption_version passes them.
type Vault struct {
	w      VaultWriter
	mount  string
	key    string
	random io.Reader
}

var _ Keyring = (*Vault)(nil)

// VaultOption configures a Vault keyring.
type VaultOption func(*Vault)

// WithVaultRandom sets the source of nonces (default crypto/rand).
func WithVaultRandom(r io.Reader) VaultOption { return func(v *Vault) { v.random = r } }

// NewVault returns a keyring over Transit key key in mount.
func NewVault(w VaultWriter, mount, key string, opts ...VaultOption) *Vault {
	v := &Vault{w: w, mount: strings.Trim(mount, "/"), key: key, random: rand.Reader}
	for _, o := range opts {
		o(v)
	}
	return v
}

// KeyID is the KeyID of the envelopes this keyring makes.
func (v *Vault) KeyID() string { return "vault:" + v.mount + "/" + v.key }

// Encrypt implements Keyring.
func (v *Vault) Encrypt(ctx context.Context, plaintext, aad []byte) (Envelope, error) {
	data, err := v.w.Write(ctx, v.mount+"/datakey/plaintext/"+v.key, map[string]any{"bits": dataKeySize * 8})
	if err != nil {
		return Envelope{}, v.mapErr("encrypt: data key", err)
	}
	b64, _ := data["plaintext"].(string)
	wrapped, _ := data["ciphertext"].(string)
	dk, err := base64.StdEncoding.DecodeString(b64)
	if err != nil || len(dk) != dataKeySize {
		return Envelope{}, fmt.Errorf("kms: encrypt: vault returned no %d-byte data key", dataKeySize)
	}
	defer clear(dk)
	version, err := wrappedVersion(wrapped)
	if err != nil {
		return Envelope{}, fmt.Errorf("kms: encrypt: vault returned %w", err)
	}
	aead, err := newGCM(dk)
	if err != nil {
		return Envelope{}, err
	}
	nonce := make([]byte, aead.NonceSize())
	if _, err := io.ReadFull(v.random, nonce); err != nil {
		return Envelope{}, fmt.Errorf("kms: encrypt: nonce: %w", err)
	}
	return Envelope{
		KeyID:      v.KeyID(),
		KeyVersion: version,
		WrappedKey: []byte(wrapped),
		Nonce:      nonce,
		Ciphertext: aead.Seal(nil, nonce, plaintext, aad),
	}, nil
}

// Decrypt implements Keyring.
func (v *Vault) Decrypt(ctx context.Context, env Envelope, aad []byte) ([]byte, error) {
	if env.KeyID != v.KeyID() {
		return nil, fmt.Errorf("%w: key %q, this keyring holds %q", ErrUnknownKey, env.KeyID, v.KeyID())
	}
	version, err := wrappedVersion(string(env.WrappedKey))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrDecrypt, err)
	}
	if version != env.KeyVersion {
		return nil, fmt.Errorf("%w: wrapped key is version %d, envelope says %d", ErrDecrypt, version, env.KeyVersion)
	}
	data, err := v.w.Write(ctx, v.mount+"/decrypt/"+v.key, map[string]any{"ciphertext": string(env.WrappedKey)})
	if err != nil {
		return nil, v.mapErr("decrypt: unwrap data key", err)
	}
	b64, _ := data["plaintext"].(string)
	dk, err := base64.StdEncoding.DecodeString(b64)
	if err != nil || len(dk) != dataKeySize {
		return nil, fmt.Errorf("%w: wrapped data key altered", ErrDecrypt)
	}
	defer clear(dk)
	aead, err := newGCM(dk)
	if err != nil {
		return nil, err
	}
	if len(env.Nonce) != aead.NonceSize() {
		return nil, fmt.Errorf("%w: nonce of %d bytes", ErrDecrypt, len(env.Nonce))
	}
	plain, err := aead.Open(nil, env.Nonce, env.Ciphertext, aad)
	if err != nil {
		return nil, fmt.Errorf("%w: ciphertext or aad altered", ErrDecrypt)
	}
	return plain, nil
}

// wrappedVersion reads N from a transit ciphertext "vault:vN:...".
func wrappedVersion(s string) (int, error) {
	rest, ok := strings.CutPrefix(s, "vault:v")
	if !ok {
		return 0, errors.New("a wrapped key without the vault:vN: prefix")
	}
	n, _, ok := strings.Cut(rest, ":")
	v, err := strconv.Atoi(n)
	if !ok || err != nil || v <= 0 {
		return 0, errors.New("a wrapped key with a bad version")
	}
	return v, nil
}

// mapErr turns Vault's answers into the keyring's errors: Transit answers
// 400 both for a missing key ("encryption key not found") and for a wrapped
// key that does not open.
func (v *Vault) mapErr(op string, err error) error {
	var re *vault.ResponseError
	if errors.As(err, &re) && re.StatusCode == http.StatusBadRequest {
		msg := strings.Join(re.Errors, "; ")
		if strings.Contains(msg, "not found") {
			return fmt.Errorf("kms: %s: %w: transit key %s/%s: %s", op, ErrUnknownKey, v.mount, v.key, msg)
		}
		return fmt.Errorf("kms: %s: %w: %s", op, ErrDecrypt, msg)
	}
	return fmt.Errorf("kms: %s: %w", op, err)
}

// Chain is a Keyring that encrypts with its first keyring and decrypts with
// whichever of its keyrings holds the envelope's key, so secrets sealed by a
// previous backend (the local keyring before a move to Vault) keep opening
// while new ones are sealed by the current backend. Its keyrings must hold
// distinct key ids (as Local and Vault do): the first one that knows an
// envelope's key id decides.
type Chain struct {
	rings []Keyring
}

var _ Keyring = (*Chain)(nil)

// NewChain returns a Chain that encrypts with current and also decrypts with
// previous.
func NewChain(current Keyring, previous ...Keyring) *Chain {
	return &Chain{rings: append([]Keyring{current}, previous...)}
}

// Encrypt implements Keyring with the current keyring.
func (c *Chain) Encrypt(ctx context.Context, plaintext, aad []byte) (Envelope, error) {
	return c.rings[0].Encrypt(ctx, plaintext, aad)
}

// Decrypt implements Keyring: the first keyring that knows the envelope's
// key decides.
func (c *Chain) Decrypt(ctx context.Context, env Envelope, aad []byte) ([]byte, error) {
	var first error
	for _, r := range c.rings {
		plain, err := r.Decrypt(ctx, env, aad)
		if !errors.Is(err, ErrUnknownKey) {
			return plain, err
		}
		if first == nil {
			first = err
		}
	}
	return nil, first
}
