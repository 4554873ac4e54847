package kms_test

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"testing"

	vault "github.com/hashicorp/vault/api"

	"github.com/gpuaas/gpuaas/core/internal/kms"
	"github.com/gpuaas/gpuaas/core/internal/pki/vaultdouble"
)

// apiWriter is a kms.VaultWriter over a plain Vault client (the core uses
// the pki backend's client, which also renews its token).
type apiWriter struct{ c *vault.Client }

var _ kms.VaultWriter = apiWriter{}

func (w apiWriter) Write(ctx context.Context, path string, data map[string]any) (map[string]any, error) {
	s, err := w.c.Logical().WriteWithContext(ctx, path, data)
	if err != nil {
		return nil, err
	}
	if s == nil {
		return nil, errors.New("no data")
	}
	return s.Data, nil
}

func newVaultKeyring(t *testing.T, key string) (*kms.Vault, apiWriter) {
	t.Helper()
	d, err := vaultdouble.New()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.Close)
	cfg := vault.DefaultConfig()
	cfg.Address = d.URL
	c, err := vault.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c.SetToken(d.RootToken)
	w := apiWriter{c}
	if _, err := w.Write(context.Background(), "transit/keys/"+key, map[string]any{"type": "aes256-gcm96"}); err != nil {
		t.Fatal(err)
	}
	return kms.NewVault(w, "transit", key), w
}

func TestVaultKeyring(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	v, w := newVaultKeyring(t, "secrets")
	aad := []byte("row-1")
	env, err := v.Encrypt(ctx, []byte("secret"), aad)
	if err != nil {
		t.Fatal(err)
	}
	if env.KeyID != "vault:transit/secrets" || env.KeyVersion != 1 || !bytes.HasPrefix(env.WrappedKey, []byte("vault:v1:")) {
		t.Fatalf("envelope %s v%d wrapped %q", env.KeyID, env.KeyVersion, env.WrappedKey)
	}
	if got, err := v.Decrypt(ctx, env, aad); err != nil || string(got) != "secret" {
		t.Fatalf("Decrypt = %q, %v", got, err)
	}
	// Rotating the transit key: new envelopes use v2, old ones still open.
	if _, err := w.Write(ctx, "transit/keys/secrets/rotate", nil); err != nil {
		t.Fatal(err)
	}
	env2, err := v.Encrypt(ctx, []byte("after"), aad)
	if err != nil || env2.KeyVersion != 2 {
		t.Fatalf("after rotation: v%d, %v", env2.KeyVersion, err)
	}
	for _, e := range []kms.Envelope{env, env2} {
		if _, err := v.Decrypt(ctx, e, aad); err != nil {
			t.Fatalf("decrypt v%d after rotation: %v", e.KeyVersion, err)
		}
	}
	for _, c := range []struct {
		name string
		env  kms.Envelope
		want error
	}{
		{"version differs from the wrapped key's", func() kms.Envelope { e := env; e.KeyVersion = 2; return e }(), kms.ErrDecrypt},
		{"wrapped key without prefix", func() kms.Envelope { e := env; e.WrappedKey = []byte("abc"); return e }(), kms.ErrDecrypt},
		{"wrapped key of another envelope", func() kms.Envelope { e := env; e.WrappedKey = env2.WrappedKey; e.KeyVersion = 2; return e }(), kms.ErrDecrypt},
		{"another keyring's envelope", func() kms.Envelope { e := env; e.KeyID = kms.LocalKeyID; return e }(), kms.ErrUnknownKey},
	} {
		t.Run(c.name, func(t *testing.T) {
			if _, err := v.Decrypt(ctx, c.env, aad); !errors.Is(err, c.want) {
				t.Fatalf("Decrypt: %v, want %v", err, c.want)
			}
		})
	}
	t.Run("transit key missing", func(t *testing.T) {
		missing := kms.NewVault(w, "transit", "nope")
		if _, err := missing.Encrypt(ctx, []byte("x"), nil); !errors.Is(err, kms.ErrUnknownKey) {
			t.Fatalf("Encrypt under a missing transit key: %v", err)
		}
	})
}

func TestChainOpensWhatEachKeyringSealed(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	v, _ := newVaultKeyring(t, "secrets")
	local, err := kms.NewLocal(filepath.Join(t.TempDir(), "keys"))
	if err != nil {
		t.Fatal(err)
	}
	old, err := kms.Seal(ctx, local, []byte("before"), nil)
	if err != nil {
		t.Fatal(err)
	}
	chain := kms.NewChain(v, local)
	fresh, err := kms.Seal(ctx, chain, []byte("after"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if e, _ := kms.ParseEnvelope(fresh); e.KeyID != v.KeyID() {
		t.Fatalf("chain sealed with %s, want the current keyring", e.KeyID)
	}
	for sealed, want := range map[string]string{string(old): "before", string(fresh): "after"} {
		if got, err := kms.Open(ctx, chain, []byte(sealed), nil); err != nil || string(got) != want {
			t.Fatalf("Open = %q, %v; want %q", got, err, want)
		}
	}
	other, err := kms.NewLocal(filepath.Join(t.TempDir(), "other"))
	if err != nil {
		t.Fatal(err)
	}
	stranger, err := other.Encrypt(ctx, []byte("x"), nil)
	if err != nil {
		t.Fatal(err)
	}
	stranger.KeyID = "somewhere-else"
	if _, err := chain.Decrypt(ctx, stranger, nil); !errors.Is(err, kms.ErrUnknownKey) {
		t.Fatalf("envelope no keyring holds: %v", err)
	}
}
