package kms_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/core/internal/kms"
)

func newLocal(t *testing.T) (*kms.Local, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "keys")
	l, err := kms.NewLocal(dir)
	if err != nil {
		t.Fatalf("NewLocal: %v", err)
	}
	return l, dir
}

func TestLocalCreatesPrivateKeyFolder(t *testing.T) {
	t.Parallel()
	_, dir := newLocal(t)
	fi, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o700 {
		t.Fatalf("key folder mode %04o, want 0700", fi.Mode().Perm())
	}
	key, err := os.Stat(filepath.Join(dir, "v1.key"))
	if err != nil {
		t.Fatal(err)
	}
	if key.Mode().Perm() != 0o600 || key.Size() != 32 {
		t.Fatalf("key file mode %04o size %d, want 0600 and 32 bytes", key.Mode().Perm(), key.Size())
	}
}

func TestLocalRoundTrip(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	l, dir := newLocal(t)
	secret := []byte(`{"webhook_secret":"s3cr3t-value-0123456789"}`)
	aad := []byte("plugin_instances/alpha/secrets")
	env, err := l.Encrypt(ctx, secret, aad)
	if err != nil {
		t.Fatal(err)
	}
	if env.KeyID != kms.LocalKeyID || env.KeyVersion != 1 {
		t.Fatalf("envelope key %s v%d", env.KeyID, env.KeyVersion)
	}
	sealed, err := env.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(sealed, secret) || bytes.Contains(sealed, []byte("s3cr3t")) {
		t.Fatalf("serialised envelope holds the plaintext: %s", sealed)
	}
	// A second keyring on the same folder (a restarted process) opens it.
	l2, err := kms.NewLocal(dir)
	if err != nil {
		t.Fatal(err)
	}
	got, err := kms.Open(ctx, l2, sealed, aad)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	if !bytes.Equal(got, secret) {
		t.Fatalf("round trip: got %q", got)
	}
	// Two encryptions of the same secret differ (fresh data key and nonce).
	env2, err := l.Encrypt(ctx, secret, aad)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(env.Ciphertext, env2.Ciphertext) || bytes.Equal(env.WrappedKey, env2.WrappedKey) {
		t.Fatal("two encryptions share a ciphertext or a wrapped key")
	}
}

func TestLocalRefusesTamperingAndWrongAAD(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	l, _ := newLocal(t)
	aad := []byte("row-1")
	env, err := l.Encrypt(ctx, []byte("secret"), aad)
	if err != nil {
		t.Fatal(err)
	}
	flip := func(b []byte, i int) []byte {
		c := append([]byte(nil), b...)
		c[i%len(c)] ^= 0x01
		return c
	}
	for _, c := range []struct {
		name string
		env  func() kms.Envelope
		aad  []byte
		want error
	}{
		{"ciphertext", func() kms.Envelope { e := env; e.Ciphertext = flip(e.Ciphertext, 0); return e }, aad, kms.ErrDecrypt},
		{"tag", func() kms.Envelope { e := env; e.Ciphertext = flip(e.Ciphertext, len(e.Ciphertext)-1); return e }, aad, kms.ErrDecrypt},
		{"nonce", func() kms.Envelope { e := env; e.Nonce = flip(e.Nonce, 3); return e }, aad, kms.ErrDecrypt},
		{"wrapped key", func() kms.Envelope { e := env; e.WrappedKey = flip(e.WrappedKey, 20); return e }, aad, kms.ErrDecrypt},
		{"key version", func() kms.Envelope { e := env; e.KeyVersion = 7; return e }, aad, kms.ErrUnknownKey},
		{"key id", func() kms.Envelope { e := env; e.KeyID = "vault"; return e }, aad, kms.ErrUnknownKey},
		{"wrong aad", func() kms.Envelope { return env }, []byte("row-2"), kms.ErrDecrypt},
		{"no aad", func() kms.Envelope { return env }, nil, kms.ErrDecrypt},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, err := l.Decrypt(ctx, c.env(), c.aad)
			if !errors.Is(err, c.want) {
				t.Fatalf("Decrypt = %q, %v; want an error matching %v", got, err, c.want)
			}
		})
	}
	t.Run("serialised bytes", func(t *testing.T) {
		sealed, err := env.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := kms.Open(ctx, l, sealed[:len(sealed)-2], aad); !errors.Is(err, kms.ErrMalformed) {
			t.Fatalf("truncated envelope: %v", err)
		}
		if _, err := kms.ParseEnvelope([]byte(`{"format":2}`)); !errors.Is(err, kms.ErrMalformed) {
			t.Fatalf("unknown format: %v", err)
		}
	})
}

func TestLocalRotation(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	l, dir := newLocal(t)
	old, err := l.Encrypt(ctx, []byte("before"), nil)
	if err != nil {
		t.Fatal(err)
	}
	// Another process sharing the folder, opened before the rotation.
	other, err := kms.NewLocal(dir)
	if err != nil {
		t.Fatal(err)
	}
	v, err := l.Rotate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if v != 2 || l.CurrentVersion() != 2 {
		t.Fatalf("rotated to %d (current %d), want 2", v, l.CurrentVersion())
	}
	fresh, err := l.Encrypt(ctx, []byte("after"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if fresh.KeyVersion != 2 {
		t.Fatalf("new envelope under version %d, want 2", fresh.KeyVersion)
	}
	for _, c := range []struct {
		kr   *kms.Local
		env  kms.Envelope
		want string
	}{{l, old, "before"}, {l, fresh, "after"}, {other, old, "before"}, {other, fresh, "after"}} {
		got, err := c.kr.Decrypt(ctx, c.env, nil)
		if err != nil || string(got) != c.want {
			t.Fatalf("decrypt v%d: %q, %v", c.env.KeyVersion, got, err)
		}
	}
	re, err := l.Rewrap(ctx, old)
	if err != nil {
		t.Fatal(err)
	}
	if re.KeyVersion != 2 || !bytes.Equal(re.Ciphertext, old.Ciphertext) {
		t.Fatalf("rewrap: version %d, ciphertext kept %v", re.KeyVersion, bytes.Equal(re.Ciphertext, old.Ciphertext))
	}
	if got, err := l.Decrypt(ctx, re, nil); err != nil || string(got) != "before" {
		t.Fatalf("decrypt rewrapped: %q, %v", got, err)
	}
	// Retiring version 1 leaves rewrapped envelopes readable.
	if err := os.Remove(filepath.Join(dir, "v1.key")); err != nil {
		t.Fatal(err)
	}
	l3, err := kms.NewLocal(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := l3.Decrypt(ctx, re, nil); err != nil || string(got) != "before" {
		t.Fatalf("decrypt rewrapped after retiring v1: %q, %v", got, err)
	}
	if _, err := l3.Decrypt(ctx, old, nil); !errors.Is(err, kms.ErrUnknownKey) {
		t.Fatalf("decrypt under a retired version: %v", err)
	}
}

func TestLocalRefusesLoosePermissions(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name  string
		path  string // relative to the key folder; "" is the folder
		mode  os.FileMode
		where string
	}{
		{"folder readable by group", "", 0o750, "keys has mode 0750"},
		{"folder open to others", "", 0o705, "keys has mode 0705"},
		{"key readable by others", "v1.key", 0o604, "v1.key has mode 0604"},
		{"key writable by group", "v1.key", 0o620, "v1.key has mode 0620"},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			_, dir := newLocal(t)
			if err := os.Chmod(filepath.Join(dir, c.path), c.mode); err != nil {
				t.Fatal(err)
			}
			_, err := kms.NewLocal(dir)
			if err == nil || !strings.Contains(err.Error(), c.where) || !strings.Contains(err.Error(), "refusing") {
				t.Fatalf("NewLocal with %s: %v", c.name, err)
			}
		})
	}
	t.Run("existing loose folder is not fixed", func(t *testing.T) {
		t.Parallel()
		dir := filepath.Join(t.TempDir(), "keys")
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if _, err := kms.NewLocal(dir); err == nil {
			t.Fatal("NewLocal accepted a 0755 folder")
		}
		if _, err := os.Stat(filepath.Join(dir, "v1.key")); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("a key was written into a loose folder: %v", err)
		}
	})
	t.Run("short key", func(t *testing.T) {
		t.Parallel()
		_, dir := newLocal(t)
		if err := os.WriteFile(filepath.Join(dir, "v2.key"), []byte("short"), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := kms.NewLocal(dir); err == nil || !strings.Contains(err.Error(), "has 5 bytes") {
			t.Fatalf("NewLocal with a short key: %v", err)
		}
	})
}
