package pki_test

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"

	"github.com/gpuaas/gpuaas/core/internal/kms"
	"github.com/gpuaas/gpuaas/core/internal/pki"
)

// keepCalling signs every 250 ms for d and fails on the first error.
func keepCalling(t *testing.T, v *pki.Vault, d time.Duration) {
	t.Helper()
	ctx := context.Background()
	if err := v.EnsureKey(ctx, "renewal-test"); err != nil {
		t.Fatal(err)
	}
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(250 * time.Millisecond) {
		if _, _, err := v.Sign(ctx, "renewal-test", []byte("payload")); err != nil {
			t.Fatalf("call failed after %v: %v", d-time.Until(end), err)
		}
	}
}

func TestVaultTokenRenewal(t *testing.T) {
	t.Parallel()
	for _, env := range vaultBackends(t) {
		t.Run(env.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			// A token that dies after 3 s unless renewed: without renewal it
			// is refused (the Vault enforces expiry) ...
			unrenewed := env.vault.newToken(t, 3*time.Second, time.Hour)
			// ... and the backend keeps one alive well past its first TTL.
			cfg := env.vault.cfg
			cfg.Token = env.vault.newToken(t, 3*time.Second, time.Hour)
			v, err := pki.NewVault(ctx, cfg)
			if err != nil {
				t.Fatalf("NewVault: %v", err)
			}
			defer func() { _ = v.Close() }()
			keepCalling(t, v, 7*time.Second)
			_, err = apiClient(t, env.vault.addr, unrenewed).Auth().Token().LookupSelf()
			var re *vault.ResponseError
			if !errors.As(err, &re) || re.StatusCode != http.StatusForbidden {
				t.Fatalf("expired token still accepted: %v", err)
			}
			if d := env.vault.double; d != nil && d.Stats().Renewals < 2 {
				t.Fatalf("%d renewals, want at least 2", d.Stats().Renewals)
			}
		})
	}
}

func TestVaultAppRoleLoginAgain(t *testing.T) {
	t.Parallel()
	for _, env := range vaultBackends(t) {
		t.Run(env.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			cfg := env.vault.cfg
			// Tokens live 3 s and at most 4 s: renewal alone cannot carry
			// the backend through 8 s, logging in again must.
			cfg.RoleID, cfg.SecretID = env.vault.addAppRole(t, 3*time.Second, 4*time.Second)
			before := 0
			if d := env.vault.double; d != nil {
				before = d.Stats().Logins
			}
			v, err := pki.NewVault(ctx, cfg)
			if err != nil {
				t.Fatalf("NewVault with AppRole: %v", err)
			}
			defer func() { _ = v.Close() }()
			keepCalling(t, v, 8*time.Second)
			if d := env.vault.double; d != nil && d.Stats().Logins-before < 2 {
				t.Fatalf("%d logins, want at least 2", d.Stats().Logins-before)
			}
		})
	}
}

func TestVaultRefusesBadCredentials(t *testing.T) {
	t.Parallel()
	for _, env := range vaultBackends(t) {
		t.Run(env.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			t.Run("bad token", func(t *testing.T) {
				cfg := env.vault.cfg
				cfg.Token = "hvs.not-a-token-0123456789"
				_, err := pki.NewVault(ctx, cfg)
				if !errors.Is(err, pki.ErrPermissionDenied) || !strings.Contains(err.Error(), "permission denied") || !strings.Contains(err.Error(), "VAULT_TOKEN") {
					t.Fatalf("NewVault with a bad token: %v", err)
				}
				if strings.Contains(err.Error(), cfg.Token) || strings.Contains(err.Error(), "\n") {
					t.Fatalf("error echoes the token or spans lines: %q", err)
				}
			})
			t.Run("token without the policy", func(t *testing.T) {
				cfg := env.vault.cfg
				cfg.Token = env.vault.newToken(t, time.Hour, 0, "default")
				_, err := pki.NewVault(ctx, cfg)
				if !errors.Is(err, pki.ErrPermissionDenied) {
					t.Fatalf("NewVault with a default-policy token: %v", err)
				}
			})
			t.Run("bad approle secret", func(t *testing.T) {
				cfg := env.vault.cfg
				cfg.RoleID, _ = env.vault.addAppRole(t, time.Minute, time.Hour)
				cfg.SecretID = "wrong"
				_, err := pki.NewVault(ctx, cfg)
				// Vault's words: "invalid role or secret ID" (400).
				if err == nil || !strings.Contains(err.Error(), "VAULT_SECRET_ID") || !strings.Contains(err.Error(), "400 invalid") || strings.Contains(err.Error(), "wrong") {
					t.Fatalf("NewVault with a bad secret id: %v", err)
				}
			})
			t.Run("no credentials", func(t *testing.T) {
				cfg := env.vault.cfg
				if _, err := pki.NewVault(ctx, cfg); err == nil || !strings.Contains(err.Error(), "VAULT_TOKEN") {
					t.Fatalf("NewVault without credentials: %v", err)
				}
			})
		})
	}
}

// TestVaultOpensLocalSecrets: after a move from the local backend to Vault,
// secrets the local keyring sealed still open; new ones are sealed by Vault.
func TestVaultOpensLocalSecrets(t *testing.T) {
	t.Parallel()
	for _, env := range vaultBackends(t) {
		t.Run(env.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			state := filepath.Join(t.TempDir(), "state")
			local := openLocal(t, state)
			aad := []byte("gpuaas/plugin_instances/maas/secrets")
			old, err := kms.Seal(ctx, local.Keys, []byte("api-key-from-before"), aad)
			if err != nil {
				t.Fatal(err)
			}
			b := env.open(t, state)
			if got, err := kms.Open(ctx, b.Keys, old, aad); err != nil || string(got) != "api-key-from-before" {
				t.Fatalf("open a local envelope through the vault backend: %q, %v", got, err)
			}
			fresh, err := kms.Seal(ctx, b.Keys, []byte("new"), aad)
			if err != nil {
				t.Fatal(err)
			}
			if e, _ := kms.ParseEnvelope(fresh); !strings.HasPrefix(e.KeyID, "vault:") {
				t.Fatalf("new envelope sealed by %q, want vault", e.KeyID)
			}
			if _, err := kms.Open(ctx, local.Keys, fresh, aad); !errors.Is(err, kms.ErrUnknownKey) {
				t.Fatalf("the local keyring opened a vault envelope: %v", err)
			}
			if bytes.Equal(old, fresh) {
				t.Fatal("same envelope")
			}
		})
	}
}
