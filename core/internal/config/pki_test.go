package config_test

import (
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/core/internal/config"
)

// Without VAULT_ADDR the backend is local; with it (DESIGN.md §3), vault,
// unless GPUAAS_PKI_BACKEND says otherwise.
func TestPKIDefaultsToLocal(t *testing.T) {
	m := good()
	m["VAULT_ADDR"] = "https://vault.example:8200"
	if _, err := config.Load(nil, env(m), io.Discard); err == nil || !strings.Contains(err.Error(), "VAULT_TOKEN") {
		t.Fatalf("VAULT_ADDR without credentials: %v; want the vault backend asking for VAULT_TOKEN", err)
	}
	m["GPUAAS_PKI_BACKEND"] = "local"
	if c, err := config.Load(nil, env(m), io.Discard); err != nil || c.PKI.Backend != "local" {
		t.Fatalf("explicit local: %v %v", c.PKI.Backend, err)
	}
	delete(m, "VAULT_ADDR")
	delete(m, "GPUAAS_PKI_BACKEND")
	c, err := config.Load(nil, env(m), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.PKI.Backend != "local" || c.PKI.VaultPKIMount != "pki" || c.PKI.VaultPKIRole != "gpuaas-node" ||
		c.PKI.VaultTransitMount != "transit" || c.PKI.VaultDataKey != "gpuaas-secrets" ||
		c.PKI.VaultSSHMount != "ssh" || c.PKI.VaultSSHRole != "gpuaas-terminal" || c.PKI.VaultAppRoleMount != "approle" {
		t.Fatalf("defaults: %+v", c.PKI)
	}
}

func TestPKIVaultSettings(t *testing.T) {
	for _, tc := range []struct {
		name string
		set  map[string]string
		want string // "" accepted, else the env named in the one error
	}{
		{"token", map[string]string{"VAULT_ADDR": "https://vault:8200", "VAULT_TOKEN": "hvs.secret-token"}, ""},
		{"approle", map[string]string{"VAULT_ADDR": "http://127.0.0.1:8200", "VAULT_ROLE_ID": "r", "VAULT_SECRET_ID": "s3cr3t"}, ""},
		{"custom mounts", map[string]string{"VAULT_ADDR": "https://v", "VAULT_TOKEN": "t", "GPUAAS_VAULT_PKI_MOUNT": "pki/nodes", "GPUAAS_VAULT_SSH_ROLE": "term"}, ""},
		{"no address", map[string]string{"VAULT_TOKEN": "hvs.secret-token"}, "VAULT_ADDR"},
		{"bad address", map[string]string{"VAULT_ADDR": "vault:8200", "VAULT_TOKEN": "t"}, "VAULT_ADDR"},
		{"no credentials", map[string]string{"VAULT_ADDR": "https://v"}, "VAULT_TOKEN"},
		{"role id alone", map[string]string{"VAULT_ADDR": "https://v", "VAULT_ROLE_ID": "r"}, "VAULT_SECRET_ID"},
		{"bad mount", map[string]string{"VAULT_ADDR": "https://v", "VAULT_TOKEN": "t", "GPUAAS_VAULT_TRANSIT_MOUNT": "../sys"}, "GPUAAS_VAULT_TRANSIT_MOUNT"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := good()
			m["GPUAAS_PKI_BACKEND"] = "vault"
			for k, v := range tc.set {
				m[k] = v
			}
			c, err := config.Load(nil, env(m), io.Discard)
			if tc.want == "" {
				if err != nil || c.PKI.Backend != "vault" || c.PKI.VaultAddr != tc.set["VAULT_ADDR"] {
					t.Fatalf("Load = %+v, %v", c.PKI, err)
				}
				return
			}
			var es config.Errors
			if !errors.As(err, &es) || len(es) != 1 || es[0].Env != tc.want {
				t.Fatalf("error %v, want one naming %s", err, tc.want)
			}
			for _, secret := range []string{"hvs.secret-token", "s3cr3t"} {
				if strings.Contains(err.Error(), secret) {
					t.Fatalf("error echoes a secret: %v", err)
				}
			}
		})
	}
	m := good()
	m["GPUAAS_PKI_BACKEND"] = "hsm"
	if _, err := config.Load(nil, env(m), io.Discard); err == nil || !strings.Contains(err.Error(), "GPUAAS_PKI_BACKEND") {
		t.Fatalf("unknown backend: %v", err)
	}
}
