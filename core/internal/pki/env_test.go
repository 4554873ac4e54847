package pki_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"

	"github.com/gpuaas/gpuaas/core/internal/pki"
	"github.com/gpuaas/gpuaas/core/internal/pki/vaultdouble"
)

// backendEnv is one backend the shared suite runs against.
type backendEnv struct {
	name string
	// open returns a backend; StateDir is a fresh folder unless given.
	open func(t *testing.T, stateDir string, opts ...pki.Option) *pki.Backend
	// vault is set for the Vault backends.
	vault *vaultEnv
}

// vaultEnv is a Vault (the double, or a real one) with the mounts the
// backend needs.
type vaultEnv struct {
	addr, root string
	cfg        pki.VaultConfig
	// double is nil for a real Vault.
	double *vaultdouble.Server
	// addAppRole returns credentials whose tokens live ttl, at most maxTTL.
	addAppRole func(t *testing.T, ttl, maxTTL time.Duration) (roleID, secretID string)
}

// backends lists the backends: local, Vault over the double, and a real
// Vault when VAULT_ADDR and VAULT_TOKEN are set.
func backends(t *testing.T) []backendEnv {
	t.Helper()
	envs := []backendEnv{{name: "local", open: openLocal}}
	envs = append(envs, vaultBackend("vault-double", doubleVault(t)))
	if os.Getenv("VAULT_ADDR") != "" && os.Getenv("VAULT_TOKEN") != "" {
		envs = append(envs, vaultBackend("vault-real", realVault(t)))
	}
	return envs
}

func vaultBackends(t *testing.T) []backendEnv {
	t.Helper()
	var out []backendEnv
	for _, e := range backends(t) {
		if e.vault != nil {
			out = append(out, e)
		}
	}
	return out
}

func openLocal(t *testing.T, stateDir string, opts ...pki.Option) *pki.Backend {
	t.Helper()
	if stateDir == "" {
		stateDir = filepath.Join(t.TempDir(), "state")
	}
	b, err := pki.Open(context.Background(), pki.Config{Backend: pki.BackendLocal, StateDir: stateDir}, opts...)
	if err != nil {
		t.Fatalf("open local backend: %v", err)
	}
	t.Cleanup(func() { _ = b.Close() })
	return b
}

func vaultBackend(name string, v *vaultEnv) backendEnv {
	return backendEnv{name: name, vault: v, open: func(t *testing.T, stateDir string, opts ...pki.Option) *pki.Backend {
		t.Helper()
		cfg := v.cfg
		cfg.Token = v.root
		b, err := pki.Open(context.Background(), pki.Config{Backend: pki.BackendVault, StateDir: stateDir, Vault: cfg}, opts...)
		if err != nil {
			t.Fatalf("open vault backend: %v", err)
		}
		t.Cleanup(func() { _ = b.Close() })
		return b
	}}
}

func doubleVault(t *testing.T) *vaultEnv {
	t.Helper()
	d, err := vaultdouble.New()
	if err != nil {
		t.Fatalf("vault double: %v", err)
	}
	t.Cleanup(d.Close)
	m := vaultdouble.DefaultMounts()
	return &vaultEnv{
		addr: d.URL, root: d.RootToken, double: d,
		cfg: pki.VaultConfig{Addr: d.URL, AppRoleMount: m.AppRole, PKIMount: m.PKI, PKIRole: m.PKIRole,
			TransitMount: m.Transit, DataKey: "gpuaas-secrets", SSHMount: m.SSH, SSHRole: m.SSHRole},
		addAppRole: func(t *testing.T, ttl, maxTTL time.Duration) (string, string) {
			roleID, secretID := "role-"+randHex(t, 4), "secret-"+randHex(t, 8)
			d.AddAppRole(roleID, secretID, ttl, maxTTL)
			return roleID, secretID
		},
	}
}

func randHex(t *testing.T, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// apiClient is a plain Vault client with token.
func apiClient(t *testing.T, addr, token string) *vault.Client {
	t.Helper()
	cfg := vault.DefaultConfig()
	cfg.Address = addr
	c, err := vault.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c.SetToken(token)
	return c
}

// newToken creates a child token of root through auth/token/create.
func (v *vaultEnv) newToken(t *testing.T, ttl, maxTTL time.Duration, policies ...string) string {
	t.Helper()
	renewable := true
	req := &vault.TokenCreateRequest{Policies: policies, TTL: ttl.String(), Renewable: &renewable}
	if maxTTL > 0 {
		req.ExplicitMaxTTL = maxTTL.String()
	}
	s, err := apiClient(t, v.addr, v.root).Auth().Token().Create(req)
	if err != nil || s == nil || s.Auth == nil {
		t.Fatalf("create token: %v", err)
	}
	return s.Auth.ClientToken
}

// realVault mounts fresh engines under a random prefix in the Vault at
// VAULT_ADDR (VAULT_TOKEN must be allowed to mount engines and auth
// methods and to write policies, as a root or admin token is) and removes
// them when the test ends.
func realVault(t *testing.T) *vaultEnv {
	t.Helper()
	ctx := context.Background()
	addr, root := os.Getenv("VAULT_ADDR"), os.Getenv("VAULT_TOKEN")
	c := apiClient(t, addr, root)
	prefix := "gpuaas-test-" + randHex(t, 4)
	cfg := pki.VaultConfig{Addr: addr, AppRoleMount: prefix + "-approle", PKIMount: prefix + "-pki", PKIRole: "gpuaas-node",
		TransitMount: prefix + "-transit", DataKey: "gpuaas-secrets", SSHMount: prefix + "-ssh", SSHRole: "gpuaas-terminal"}
	must := func(what string, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("real vault setup: %s: %v", what, err)
		}
	}
	write := func(path string, data map[string]any) {
		t.Helper()
		_, err := c.Logical().WriteWithContext(ctx, path, data)
		must(path, err)
	}
	for _, m := range []struct{ path, typ string }{{cfg.PKIMount, "pki"}, {cfg.TransitMount, "transit"}, {cfg.SSHMount, "ssh"}} {
		must("mount "+m.path, c.Sys().MountWithContext(ctx, m.path, &vault.MountInput{Type: m.typ,
			Config: vault.MountConfigInput{MaxLeaseTTL: "87600h"}}))
		path := m.path
		t.Cleanup(func() { _ = c.Sys().Unmount(path) })
	}
	write(cfg.PKIMount+"/root/generate/internal", map[string]any{"common_name": "gpuaas test CA", "key_type": "ec", "key_bits": 256, "ttl": "87600h"})
	write(cfg.PKIMount+"/roles/"+cfg.PKIRole, map[string]any{
		"allow_any_name": true, "enforce_hostnames": false, "allowed_uri_sans": pki.NodeURIPrefix + "*",
		"allow_ip_sans": false, "client_flag": true, "server_flag": false, "use_csr_common_name": false,
		"use_csr_sans": false, "key_type": "any", "max_ttl": "24h", "no_store": false, "require_cn": true,
		"key_usage": []string{"DigitalSignature"},
	})
	write(cfg.SSHMount+"/config/ca", map[string]any{"generate_signing_key": true, "key_type": "ssh-ed25519"})
	write(cfg.SSHMount+"/roles/"+cfg.SSHRole, map[string]any{
		"key_type": "ca", "allow_user_certificates": true, "allowed_users": "*",
		"default_extensions": map[string]string{"permit-pty": ""}, "ttl": "30m", "max_ttl": "1h",
	})
	must("enable approle", c.Sys().EnableAuthWithOptionsWithContext(ctx, cfg.AppRoleMount, &vault.EnableAuthOptions{Type: "approle"}))
	t.Cleanup(func() { _ = c.Sys().DisableAuth(cfg.AppRoleMount) })
	must("policy", c.Sys().PutPolicyWithContext(ctx, prefix, `path "`+prefix+`-*" { capabilities = ["create", "read", "update", "list"] }`))
	t.Cleanup(func() { _ = c.Sys().DeletePolicy(prefix) })
	return &vaultEnv{addr: addr, root: root, cfg: cfg,
		addAppRole: func(t *testing.T, ttl, maxTTL time.Duration) (string, string) {
			t.Helper()
			role := "r" + randHex(t, 4)
			path := "auth/" + cfg.AppRoleMount + "/role/" + role
			write(path, map[string]any{"token_policies": []string{prefix}, "token_ttl": ttl.String(), "token_max_ttl": maxTTL.String()})
			s, err := c.Logical().ReadWithContext(ctx, path+"/role-id")
			must("role-id", err)
			sid, err := c.Logical().WriteWithContext(ctx, path+"/secret-id", nil)
			must("secret-id", err)
			return s.Data["role_id"].(string), sid.Data["secret_id"].(string)
		},
	}
}
