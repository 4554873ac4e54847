package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"

	"github.com/gpuaas/gpuaas/core/internal/config"
	"github.com/gpuaas/gpuaas/core/internal/identity"
	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/store"
)

// bootstrapAdmin makes sure a local platform admin with email exists and prints,
// as KEY=VALUE lines, its email, its password when the account was just created,
// and a fresh API key. The secrets appear here once and are stored only hashed.
func bootstrapAdmin(ctx context.Context, cfg config.Config, log hclog.Logger, email string, out io.Writer) error {
	pool, err := store.Open(ctx, cfg.DatabaseURL, store.Options{})
	if err != nil {
		return err
	}
	defer pool.Close()
	if _, err := store.Migrate(ctx, pool); err != nil {
		return err
	}
	email, err = identity.NormalizeEmail("email", email)
	if err != nil {
		return err
	}
	ids := identity.NewService(pool, cfg.Region, log.Named("identity"), nil)
	ctx = principal.With(ctx, principal.SystemPrincipal("bootstrap"))

	var userID uuid.UUID
	var isAdmin bool
	password := ""
	err = pool.QueryRow(ctx, `SELECT u.id, u.is_platform_admin FROM local_credentials c JOIN users u ON u.id = c.user_id WHERE lower(c.login) = $1`, email).Scan(&userID, &isAdmin)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		b := make([]byte, 18)
		_, _ = rand.Read(b)
		password = base64.RawURLEncoding.EncodeToString(b)
		u, err := ids.CreateLocalUser(ctx, email, "Platform admin", password, true)
		if err != nil {
			return err
		}
		userID = u.ID
	case err != nil:
		return fmt.Errorf("bootstrap-admin: %w", err)
	case !isAdmin:
		return fmt.Errorf("bootstrap-admin: %s exists and is not a platform admin; grant it with PATCH /api/v1/admin/users/%s", email, userID)
	}
	_, secret, err := ids.CreateAPIKey(ctx, identity.KeyOwner{User: &userID}, "bootstrap", nil)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "GPUAAS_ADMIN_EMAIL=%s\n", email)
	if password != "" {
		fmt.Fprintf(out, "GPUAAS_ADMIN_PASSWORD=%s\n", password)
	}
	fmt.Fprintf(out, "GPUAAS_TOKEN=%s\n", secret)
	return nil
}
