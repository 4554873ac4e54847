// Package kms is envelope encryption for secrets at rest. Every secret gets
// its own random AES-256-GCM data key; the data key is wrapped by a versioned
// master key held by a Keyring backend, and the wrapped key travels with the
// ciphertext in an Envelope. Rotating the master key makes a new version
// encrypt; envelopes made under older versions still decrypt.
//
// Local keeps master keys in files on disk; Vault takes its data keys from a
// Vault Transit key (transit/datakey) and has Transit unwrap them. Chain
// seals with one keyring and opens what older keyrings sealed.
package kms

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
)

// Keyring encrypts and decrypts secrets under a master key. aad is
// additional authenticated data: not stored, but it must be the same at
// Decrypt as at Encrypt (callers bind an envelope to the row or field it
// belongs to, so an envelope copied elsewhere does not decrypt).
type Keyring interface {
	Encrypt(ctx context.Context, plaintext, aad []byte) (Envelope, error)
	Decrypt(ctx context.Context, env Envelope, aad []byte) ([]byte, error)
}

// Errors a Keyring returns; match them with errors.Is.
var (
	// ErrDecrypt means the envelope does not open: it was altered, the aad
	// differs, or it was made under another key.
	ErrDecrypt = errors.New("kms: envelope does not decrypt")
	// ErrUnknownKey means the envelope names a key or key version the
	// keyring does not hold.
	ErrUnknownKey = errors.New("kms: unknown key or key version")
	// ErrMalformed means bytes are not an envelope.
	ErrMalformed = errors.New("kms: malformed envelope")
)

// envelopeFormat is the version of the serialised form.
const envelopeFormat = 1

// Envelope is an encrypted secret: the ciphertext, the data key it was
// encrypted with wrapped by master key KeyID at KeyVersion, and the nonce.
// It serialises to JSON (byte fields as base64) with Marshal.
type Envelope struct {
	// KeyID names the master key (for Local, "local"; for Vault,
	// "vault:<transit mount>/<key name>").
	KeyID string `json:"key_id"`
	// KeyVersion is the master key version that wrapped the data key.
	KeyVersion int `json:"key_version"`
	// WrappedKey is the data key encrypted by the master key (for Vault, the
	// Transit ciphertext "vault:vN:...").
	WrappedKey []byte `json:"wrapped_key"`
	// Nonce is the AES-GCM nonce of Ciphertext.
	Nonce []byte `json:"nonce"`
	// Ciphertext is the secret encrypted with the data key, with its tag.
	Ciphertext []byte `json:"ciphertext"`
}

type envelopeJSON struct {
	Format int `json:"format"`
	Envelope
}

// Marshal returns the envelope's serialised form (JSON).
func (e Envelope) Marshal() ([]byte, error) {
	b, err := json.Marshal(envelopeJSON{Format: envelopeFormat, Envelope: e})
	if err != nil {
		return nil, fmt.Errorf("kms: marshal envelope: %w", err)
	}
	return b, nil
}

// ParseEnvelope reads an envelope made by Marshal.
func ParseEnvelope(b []byte) (Envelope, error) {
	var ej envelopeJSON
	if err := json.Unmarshal(b, &ej); err != nil {
		return Envelope{}, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	if ej.Format != envelopeFormat {
		return Envelope{}, fmt.Errorf("%w: format %d, want %d", ErrMalformed, ej.Format, envelopeFormat)
	}
	e := ej.Envelope
	if e.KeyID == "" || e.KeyVersion <= 0 || len(e.WrappedKey) == 0 || len(e.Nonce) == 0 || len(e.Ciphertext) == 0 {
		return Envelope{}, fmt.Errorf("%w: missing fields", ErrMalformed)
	}
	return e, nil
}

// Seal encrypts plaintext with k and returns the serialised envelope.
func Seal(ctx context.Context, k Keyring, plaintext, aad []byte) ([]byte, error) {
	env, err := k.Encrypt(ctx, plaintext, aad)
	if err != nil {
		return nil, err
	}
	return env.Marshal()
}

// Open parses a serialised envelope and decrypts it with k.
func Open(ctx context.Context, k Keyring, sealed, aad []byte) ([]byte, error) {
	env, err := ParseEnvelope(sealed)
	if err != nil {
		return nil, err
	}
	return k.Decrypt(ctx, env, aad)
}
