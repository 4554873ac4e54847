package identity

import (
	"context"
	"errors"
	"fmt"
	"net/mail"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/store"
)

// User is a person who signs in (with OIDC or a local account).
type User struct {
	ID              uuid.UUID
	Email           string
	EmailVerified   bool
	DisplayName     string
	IsPlatformAdmin bool
	Status          string
	AuthSource      string // "oidc" or "local"
	CreatedAt       time.Time
	LastLoginAt     *time.Time
}

// OrgMembership is a user's role in an org.
type OrgMembership struct {
	OrgID   uuid.UUID
	OrgSlug string
	OrgName string
	Role    string
}

// ProjectMembership is a user's role in a project.
type ProjectMembership struct {
	ProjectID   uuid.UUID
	OrgID       uuid.UUID
	ProjectSlug string
	ProjectName string
	Role        string
}

const userColumns = `id, email, email_verified, display_name, is_platform_admin, status,
	CASE WHEN oidc_issuer IS NULL THEN 'local' ELSE 'oidc' END, created_at, last_login_at`

func scanUser(row pgx.Row) (*User, error) {
	u := &User{}
	err := row.Scan(&u.ID, &u.Email, &u.EmailVerified, &u.DisplayName, &u.IsPlatformAdmin, &u.Status, &u.AuthSource, &u.CreatedAt, &u.LastLoginAt)
	return u, err
}

// OIDCIdentity is what a verified ID or access token says about a person.
type OIDCIdentity struct {
	Issuer        string
	Subject       string
	Email         string
	EmailVerified bool
	Name          string
}

// UpsertOIDCUser finds the user of (issuer, subject), creating it on first sight and
// refreshing its email and name otherwise. A new user with a verified email
// accepts that email's open invitations.
func (s *Service) UpsertOIDCUser(ctx context.Context, id OIDCIdentity) (*User, error) {
	if id.Issuer == "" || id.Subject == "" {
		return nil, errcode.New(CodeInvalidToken, "token has no issuer or subject")
	}
	var u *User
	err := s.tx(ctx, func(tx pgx.Tx) error {
		var inserted bool
		row := tx.QueryRow(ctx, `
			INSERT INTO users (id, email, email_verified, display_name, oidc_issuer, oidc_subject, last_login_at)
			VALUES ($1, $2, $3, $4, $5, $6, now())
			ON CONFLICT (oidc_issuer, oidc_subject) WHERE oidc_issuer IS NOT NULL DO UPDATE
			SET email = excluded.email, email_verified = excluded.email_verified,
			    display_name = CASE WHEN excluded.display_name <> '' THEN excluded.display_name ELSE users.display_name END,
			    updated_at = now()
			RETURNING (xmax = 0), `+userColumns,
			newID(), id.Email, id.EmailVerified, id.Name, id.Issuer, id.Subject)
		u = &User{}
		if err := row.Scan(&inserted, &u.ID, &u.Email, &u.EmailVerified, &u.DisplayName, &u.IsPlatformAdmin, &u.Status, &u.AuthSource, &u.CreatedAt, &u.LastLoginAt); err != nil {
			return err
		}
		if !inserted {
			return nil
		}
		ctx := principal.With(ctx, &principal.Principal{Type: principal.User, ID: u.ID})
		if err := s.record(ctx, tx, "user.create", s.ids.User(u.ID.String()), map[string]any{"source": "oidc", "issuer": id.Issuer}); err != nil {
			return err
		}
		if u.EmailVerified && u.Email != "" {
			return s.acceptInvitations(ctx, tx, u)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("identity: upsert oidc user: %w", err)
	}
	s.forgetMemberships(u.ID)
	return u, nil
}

// GetUser returns a user by id.
func (s *Service) GetUser(ctx context.Context, id uuid.UUID) (*User, error) {
	u, err := scanUser(s.pool.QueryRow(ctx, `SELECT `+userColumns+` FROM users WHERE id = $1`, id))
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, errcode.New(CodeUserNotFound, "user not found")
	}
	if err != nil {
		return nil, fmt.Errorf("identity: get user: %w", err)
	}
	return u, nil
}

// membershipsTTL bounds how stale another instance's view of a user's memberships
// may be; this instance's own changes drop the cached view at once. Authorization
// never uses this view: it reads memberships from the database every time.
const membershipsTTL = 5 * time.Second

type cachedMemberships struct {
	orgs     []OrgMembership
	projects []ProjectMembership
	fetched  time.Time
}

// Memberships returns a user's org and project memberships (for display), cached
// briefly per instance.
func (s *Service) Memberships(ctx context.Context, userID uuid.UUID) ([]OrgMembership, []ProjectMembership, error) {
	s.mu.Lock()
	c, ok := s.memberships[userID]
	s.mu.Unlock()
	if ok && s.now().Sub(c.fetched) < membershipsTTL {
		return c.orgs, c.projects, nil
	}
	fetched := s.now()
	orgs, projects, err := s.loadMemberships(ctx, userID)
	if err != nil {
		return nil, nil, err
	}
	s.mu.Lock()
	if len(s.memberships) > 50_000 {
		clear(s.memberships)
	}
	s.memberships[userID] = cachedMemberships{orgs: orgs, projects: projects, fetched: fetched}
	s.mu.Unlock()
	return orgs, projects, nil
}

// forgetMemberships drops cached memberships: of the given users, or of everyone
// when none are given (an org or project was renamed).
func (s *Service) forgetMemberships(users ...uuid.UUID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(users) == 0 {
		clear(s.memberships)
	}
	for _, u := range users {
		delete(s.memberships, u)
	}
}

func (s *Service) loadMemberships(ctx context.Context, userID uuid.UUID) ([]OrgMembership, []ProjectMembership, error) {
	rows, err := s.pool.Query(ctx, `
		SELECT false, o.id, o.id, o.slug, o.name, m.role FROM org_memberships m JOIN orgs o ON o.id = m.org_id WHERE m.user_id = $1
		UNION ALL
		SELECT true, p.id, p.org_id, p.slug, p.name, m.role FROM project_memberships m JOIN projects p ON p.id = m.project_id WHERE m.user_id = $1
		ORDER BY 1, 3, 4`, userID)
	if err != nil {
		return nil, nil, fmt.Errorf("identity: memberships: %w", err)
	}
	defer rows.Close()
	orgs, projects := []OrgMembership{}, []ProjectMembership{}
	for rows.Next() {
		var isProject bool
		var id, orgID uuid.UUID
		var slug, name, role string
		if err := rows.Scan(&isProject, &id, &orgID, &slug, &name, &role); err != nil {
			return nil, nil, fmt.Errorf("identity: memberships: %w", err)
		}
		if isProject {
			projects = append(projects, ProjectMembership{ProjectID: id, OrgID: orgID, ProjectSlug: slug, ProjectName: name, Role: role})
		} else {
			orgs = append(orgs, OrgMembership{OrgID: id, OrgSlug: slug, OrgName: name, Role: role})
		}
	}
	if err := rows.Err(); err != nil {
		return nil, nil, fmt.Errorf("identity: memberships: %w", err)
	}
	return orgs, projects, nil
}

// NormalizeEmail validates an email address and returns it lowercased.
func NormalizeEmail(field, v string) (string, error) {
	addr, err := mail.ParseAddress(v)
	if err != nil || addr.Address != v || len(v) > 254 {
		return "", errcode.New(errcode.ValidationFailed, "%s must be a plain email address", field).WithDetails("field", field)
	}
	return strings.ToLower(v), nil
}

// CreateLocalUser creates a user with a local password login.
func (s *Service) CreateLocalUser(ctx context.Context, email, name, password string, platformAdmin bool) (*User, error) {
	email, err := NormalizeEmail("email", email)
	if err != nil {
		return nil, err
	}
	hash, err := HashPassword(password)
	if err != nil {
		return nil, errcode.New(errcode.ValidationFailed, "%s", err.Error()).WithDetails("field", "password")
	}
	var u *User
	err = s.tx(ctx, func(tx pgx.Tx) error {
		var err error
		u, err = scanUser(tx.QueryRow(ctx, `INSERT INTO users (id, email, email_verified, display_name, is_platform_admin)
			VALUES ($1, $2, true, $3, $4) RETURNING `+userColumns, newID(), email, name, platformAdmin))
		if err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `INSERT INTO local_credentials (user_id, login, password_hash) VALUES ($1, $2, $3)`, u.ID, email, hash); err != nil {
			if store.IsUniqueViolation(err, "local_credentials_login") {
				return errcode.New(errcode.Conflict, "a local account with this email exists").WithDetails("field", "email")
			}
			return err
		}
		return s.record(ctx, tx, "user.create", s.ids.User(u.ID.String()), map[string]any{"source": "local", "platform_admin": platformAdmin})
	})
	if err != nil {
		return nil, fmt.Errorf("identity: create local user: %w", err)
	}
	return u, nil
}

// UserFilter selects users for the admin list.
type UserFilter struct {
	Email  string
	After  uuid.UUID
	Limit  int
	Status string
}

// ListUsers lists users by id (admin).
func (s *Service) ListUsers(ctx context.Context, f UserFilter) ([]*User, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+userColumns+` FROM users
		WHERE ($1 = '' OR lower(email) = lower($1)) AND ($2 = '' OR status = $2) AND id > $3
		ORDER BY id LIMIT $4`, f.Email, f.Status, f.After, f.Limit+1)
	if err != nil {
		return nil, fmt.Errorf("identity: list users: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (*User, error) { return scanUser(r) })
}

// UpdateUser changes a user's platform-admin flag and status (admin).
func (s *Service) UpdateUser(ctx context.Context, id uuid.UUID, platformAdmin *bool, status *string) (*User, error) {
	if status != nil && *status != "active" && *status != "disabled" {
		return nil, errcode.New(errcode.ValidationFailed, "status must be active or disabled").WithDetails("field", "status")
	}
	if p := principal.From(ctx); p != nil && p.ID == id && ((platformAdmin != nil && !*platformAdmin) || (status != nil && *status == "disabled")) {
		return nil, errcode.New(errcode.Conflict, "you cannot remove your own platform-admin role or disable yourself")
	}
	var u *User
	err := s.tx(ctx, func(tx pgx.Tx) error {
		var err error
		u, err = scanUser(tx.QueryRow(ctx, `UPDATE users SET
			is_platform_admin = coalesce($2, is_platform_admin), status = coalesce($3, status), updated_at = now()
			WHERE id = $1 RETURNING `+userColumns, id, platformAdmin, status))
		if errors.Is(err, pgx.ErrNoRows) {
			return errcode.New(CodeUserNotFound, "user not found")
		}
		if err != nil {
			return err
		}
		return s.record(ctx, tx, "user.update", s.ids.User(id.String()), map[string]any{"platform_admin": platformAdmin, "status": status})
	})
	if err != nil {
		return nil, fmt.Errorf("identity: update user: %w", err)
	}
	return u, nil
}
