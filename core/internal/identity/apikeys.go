package identity

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/events"
	"github.com/gpuaas/gpuaas/core/internal/rid"
	"github.com/gpuaas/gpuaas/core/internal/store"
)

// ServiceAccount is a machine identity of one project.
type ServiceAccount struct {
	ID          uuid.UUID
	OrgID       uuid.UUID
	ProjectID   uuid.UUID
	Name        string
	Description string
	Role        string
	CreatedAt   time.Time
	DisabledAt  *time.Time
}

// APIKey is an API key as listed (the secret is never stored or shown again).
type APIKey struct {
	ID               uuid.UUID
	Prefix           string
	Name             string
	UserID           *uuid.UUID
	ServiceAccountID *uuid.UUID
	CreatedAt        time.Time
	ExpiresAt        *time.Time
	RevokedAt        *time.Time
	LastUsedAt       *time.Time
}

// CredentialRevoked is the payload of system.credentials.revoked: every instance
// drops the credential from its authentication cache. Credential is an API key's
// prefix (gpk_...), "session:{id}" or "user:{id}" (every credential of a user or
// service account).
type CredentialRevoked struct {
	Credential string `json:"credential"`
}

const saColumns = `id, org_id, project_id, name, description, role, created_at, disabled_at`

func scanSA(row pgx.Row) (*ServiceAccount, error) {
	a := &ServiceAccount{}
	return a, row.Scan(&a.ID, &a.OrgID, &a.ProjectID, &a.Name, &a.Description, &a.Role, &a.CreatedAt, &a.DisabledAt)
}

// CreateServiceAccount creates a service account in a project with a project role.
func (s *Service) CreateServiceAccount(ctx context.Context, p *Project, name, description, role string) (*ServiceAccount, error) {
	if err := validSlug("name", name); err != nil {
		return nil, err
	}
	if len(description) > 500 {
		return nil, errcode.New(errcode.ValidationFailed, "description must be at most 500 characters").WithDetails("field", "description")
	}
	if err := validProjectRole(role); err != nil {
		return nil, err
	}
	var a *ServiceAccount
	err := s.tx(ctx, func(tx pgx.Tx) error {
		var err error
		a, err = scanSA(tx.QueryRow(ctx, `INSERT INTO service_accounts (id, org_id, project_id, name, description, role)
			VALUES ($1, $2, $3, $4, $5, $6) RETURNING `+saColumns, newID(), p.OrgID, p.ID, name, description, role))
		if store.IsUniqueViolation(err, "") {
			return errcode.New(CodeNameTaken, "a service account named %q exists in this project", name).WithDetails("field", "name")
		}
		if err != nil {
			return err
		}
		return s.record(ctx, tx, "service_account.create", s.ids.InProject(p.OrgID.String(), p.ID.String(), "service_account", a.ID.String()), map[string]any{"name": name, "role": role})
	})
	if err != nil {
		return nil, fmt.Errorf("identity: create service account: %w", err)
	}
	return a, nil
}

// GetServiceAccount returns a service account of a project.
func (s *Service) GetServiceAccount(ctx context.Context, projectID, id uuid.UUID) (*ServiceAccount, error) {
	a, err := scanSA(s.pool.QueryRow(ctx, `SELECT `+saColumns+` FROM service_accounts WHERE id = $1 AND project_id = $2`, id, projectID))
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, errcode.New(CodeServiceAccountNotFound, "service account not found")
	}
	if err != nil {
		return nil, fmt.Errorf("identity: get service account: %w", err)
	}
	return a, nil
}

// ListServiceAccounts lists a project's service accounts by id after the cursor.
func (s *Service) ListServiceAccounts(ctx context.Context, projectID, after uuid.UUID, limit int) ([]*ServiceAccount, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+saColumns+` FROM service_accounts WHERE project_id = $1 AND id > $2 ORDER BY id LIMIT $3`, projectID, after, limit+1)
	if err != nil {
		return nil, fmt.Errorf("identity: list service accounts: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (*ServiceAccount, error) { return scanSA(r) })
}

// DeleteServiceAccount deletes a service account and revokes its keys.
func (s *Service) DeleteServiceAccount(ctx context.Context, a *ServiceAccount) error {
	err := s.tx(ctx, func(tx pgx.Tx) error {
		prefixes, err := revokeWhere(ctx, tx, `service_account_id = $1`, a.ID)
		if err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `DELETE FROM service_accounts WHERE id = $1`, a.ID); err != nil {
			return err
		}
		if err := announceRevoked(ctx, tx, prefixes); err != nil {
			return err
		}
		return s.record(ctx, tx, "service_account.delete", s.ids.InProject(a.OrgID.String(), a.ProjectID.String(), "service_account", a.ID.String()), map[string]any{"revoked_keys": len(prefixes)})
	})
	if err != nil {
		return fmt.Errorf("identity: delete service account: %w", err)
	}
	return nil
}

// KeyOwner is whose API key it is: exactly one of User or ServiceAccount.
type KeyOwner struct {
	User           *uuid.UUID
	ServiceAccount *ServiceAccount
}

func (o KeyOwner) where() (string, uuid.UUID) {
	if o.ServiceAccount != nil {
		return "service_account_id = $1", o.ServiceAccount.ID
	}
	return "user_id = $1", *o.User
}

// MaxKeyLifetime bounds an API key's expiry.
const MaxKeyLifetime = 2 * 365 * 24 * time.Hour

// CreateAPIKey makes a key for owner and returns it with its secret, which is not
// stored and cannot be shown again.
func (s *Service) CreateAPIKey(ctx context.Context, owner KeyOwner, name string, expiresAt *time.Time) (*APIKey, string, error) {
	if err := validName("name", name, 100); err != nil {
		return nil, "", err
	}
	if expiresAt != nil && (!expiresAt.After(s.now()) || expiresAt.After(s.now().Add(MaxKeyLifetime))) {
		return nil, "", errcode.New(errcode.ValidationFailed, "expires_at must be in the future and within two years").WithDetails("field", "expires_at")
	}
	token, prefix, hash := newToken(apiKeyPrefix)
	k := &APIKey{ID: newID(), Prefix: prefix, Name: name, ExpiresAt: expiresAt}
	var userID, saID *uuid.UUID
	var target rid.ID
	if owner.ServiceAccount != nil {
		saID = &owner.ServiceAccount.ID
		a := owner.ServiceAccount
		target = s.ids.InProject(a.OrgID.String(), a.ProjectID.String(), "api_key", k.ID.String())
	} else {
		userID = owner.User
		target = s.ids.InOrg("", "api_key", k.ID.String())
	}
	k.UserID, k.ServiceAccountID = userID, saID
	err := s.tx(ctx, func(tx pgx.Tx) error {
		if err := tx.QueryRow(ctx, `INSERT INTO api_keys (id, prefix, secret_hash, name, user_id, service_account_id, created_by, expires_at)
			VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING created_at`, k.ID, prefix, hash, name, userID, saID, actorOf(ctx), expiresAt).Scan(&k.CreatedAt); err != nil {
			return err
		}
		return s.record(ctx, tx, "api_key.create", target, map[string]any{"prefix": prefix, "name": name})
	})
	if err != nil {
		return nil, "", fmt.Errorf("identity: create api key: %w", err)
	}
	return k, token, nil
}

const keyColumns = `id, prefix, name, user_id, service_account_id, created_at, expires_at, revoked_at, last_used_at`

// ListAPIKeys lists owner's keys by id after the cursor.
func (s *Service) ListAPIKeys(ctx context.Context, owner KeyOwner, after uuid.UUID, limit int) ([]*APIKey, error) {
	where, id := owner.where()
	rows, err := s.pool.Query(ctx, `SELECT `+keyColumns+` FROM api_keys WHERE `+where+` AND id > $2 ORDER BY id LIMIT $3`, id, after, limit+1)
	if err != nil {
		return nil, fmt.Errorf("identity: list api keys: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (*APIKey, error) {
		k := &APIKey{}
		return k, r.Scan(&k.ID, &k.Prefix, &k.Name, &k.UserID, &k.ServiceAccountID, &k.CreatedAt, &k.ExpiresAt, &k.RevokedAt, &k.LastUsedAt)
	})
}

// RevokeAPIKey revokes one of owner's keys. Revoking twice is not an error.
func (s *Service) RevokeAPIKey(ctx context.Context, owner KeyOwner, keyID uuid.UUID) error {
	where, id := owner.where()
	err := s.tx(ctx, func(tx pgx.Tx) error {
		var prefix string
		err := tx.QueryRow(ctx, `UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE `+where+` AND id = $2 RETURNING prefix`, id, keyID).Scan(&prefix)
		if errors.Is(err, pgx.ErrNoRows) {
			return errcode.New(CodeAPIKeyNotFound, "API key not found")
		}
		if err != nil {
			return err
		}
		if err := announceRevoked(ctx, tx, []string{prefix}); err != nil {
			return err
		}
		target := s.ids.InOrg("", "api_key", keyID.String())
		if a := owner.ServiceAccount; a != nil {
			target = s.ids.InProject(a.OrgID.String(), a.ProjectID.String(), "api_key", keyID.String())
		}
		return s.record(ctx, tx, "api_key.revoke", target, map[string]any{"prefix": prefix})
	})
	if err != nil {
		return fmt.Errorf("identity: revoke api key: %w", err)
	}
	return nil
}

func revokeWhere(ctx context.Context, tx pgx.Tx, where string, arg any) ([]string, error) {
	rows, err := tx.Query(ctx, `UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE `+where+` RETURNING prefix`, arg)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, pgx.RowTo[string])
}

func announceRevoked(ctx context.Context, tx pgx.Tx, prefixes []string) error {
	if len(prefixes) == 0 {
		return nil
	}
	evs := make([]events.Event, len(prefixes))
	for i, p := range prefixes {
		evs[i] = events.Event{Subject: events.SubjectSystemCredentialsRevoked, Payload: CredentialRevoked{Credential: p}}
	}
	_, err := events.Enqueue(ctx, tx, evs...)
	return err
}
