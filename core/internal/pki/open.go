package pki

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/gpuaas/gpuaas/core/internal/kms"
)

// Backend names.
const (
	BackendLocal = "local"
	BackendVault = "vault"
)

// Config chooses and configures a backend.
type Config struct {
	// Backend is BackendLocal or BackendVault.
	Backend string
	// StateDir holds the local backend's keys (StateDir/pki) and the local
	// KMS master keys (StateDir/kms). With Vault, secrets sealed by the local
	// KMS keys before the move keep opening while StateDir/kms exists.
	StateDir string
	Vault    VaultConfig
}

// Open builds the configured backend. The caller closes it.
func Open(ctx context.Context, cfg Config, opts ...Option) (*Backend, error) {
	switch cfg.Backend {
	case BackendLocal:
		l, err := NewLocal(filepath.Join(cfg.StateDir, "pki"), opts...)
		if err != nil {
			return nil, err
		}
		keys, err := kms.NewLocal(filepath.Join(cfg.StateDir, "kms"))
		if err != nil {
			return nil, err
		}
		return &Backend{Name: BackendLocal, CA: l, Signer: l, SSH: l, Keys: keys}, nil
	case BackendVault:
		v, err := NewVault(ctx, cfg.Vault, opts...)
		if err != nil {
			return nil, err
		}
		var keys kms.Keyring = v.Keyring()
		if cfg.StateDir != "" {
			// Secrets sealed by the local keyring before the move to Vault.
			dir := filepath.Join(cfg.StateDir, "kms")
			if _, err := os.Stat(dir); err == nil {
				old, err := kms.NewLocal(dir)
				if err != nil {
					_ = v.Close()
					return nil, err
				}
				keys = kms.NewChain(v.Keyring(), old)
			} else if !errors.Is(err, fs.ErrNotExist) {
				_ = v.Close()
				return nil, fmt.Errorf("pki: %w", err)
			}
		}
		return &Backend{Name: BackendVault, CA: v, Signer: v, SSH: v, Keys: keys, close: v.Close}, nil
	default:
		return nil, fmt.Errorf("pki: unknown backend %q (want %s or %s)", cfg.Backend, BackendLocal, BackendVault)
	}
}
