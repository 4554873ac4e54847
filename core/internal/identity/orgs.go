package identity

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/store"
)

// Org is a tenant: it owns projects and money.
type Org struct {
	ID        uuid.UUID
	Slug      string
	Name      string
	CreatedAt time.Time
}

// Member is a user's membership as listed in an org or project.
type Member struct {
	UserID      uuid.UUID
	Email       string
	DisplayName string
	Role        string
	CreatedAt   time.Time
}

// Invitation is an open invitation to an org.
type Invitation struct {
	ID        uuid.UUID
	OrgID     uuid.UUID
	Email     string
	Role      string
	ExpiresAt time.Time
}

var orgRoles = []string{OrgOwner, OrgAdmin, OrgBilling, OrgMember}

func validOrgRole(r string) error {
	if !slices.Contains(orgRoles, r) {
		return errcode.New(errcode.ValidationFailed, "role must be one of %v", orgRoles).WithDetails("field", "role")
	}
	return nil
}

// CreateOrg creates an org with the calling user as its owner.
func (s *Service) CreateOrg(ctx context.Context, slug, name string) (*Org, error) {
	p := principal.From(ctx)
	if p == nil || p.Type != principal.User {
		return nil, errcode.New(errcode.Forbidden, "only users can create organizations")
	}
	if err := validSlug("slug", slug); err != nil {
		return nil, err
	}
	if err := validName("name", name, 200); err != nil {
		return nil, err
	}
	o := &Org{ID: newID(), Slug: slug, Name: name}
	err := s.tx(ctx, func(tx pgx.Tx) error {
		if err := tx.QueryRow(ctx, `INSERT INTO orgs (id, slug, name) VALUES ($1, $2, $3) RETURNING created_at`, o.ID, slug, name).Scan(&o.CreatedAt); err != nil {
			if store.IsUniqueViolation(err, "") {
				return errcode.New(CodeSlugTaken, "an organization with slug %q exists", slug).WithDetails("field", "slug")
			}
			return err
		}
		if _, err := tx.Exec(ctx, `INSERT INTO org_memberships (org_id, user_id, role) VALUES ($1, $2, 'owner')`, o.ID, p.ID); err != nil {
			return err
		}
		return s.record(ctx, tx, "org.create", s.ids.Org(o.ID.String()), map[string]any{"slug": slug})
	})
	if err != nil {
		return nil, fmt.Errorf("identity: create org: %w", err)
	}
	s.forgetMemberships(principalID(ctx))
	return o, nil
}

// GetOrg returns an org.
func (s *Service) GetOrg(ctx context.Context, id uuid.UUID) (*Org, error) {
	o := &Org{}
	err := s.pool.QueryRow(ctx, `SELECT id, slug, name, created_at FROM orgs WHERE id = $1`, id).Scan(&o.ID, &o.Slug, &o.Name, &o.CreatedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, errcode.New(CodeOrgNotFound, "organization not found")
	}
	if err != nil {
		return nil, fmt.Errorf("identity: get org: %w", err)
	}
	return o, nil
}

// ListOrgs lists the orgs a user belongs to (every org for a platform admin when
// all is set), by id after the cursor.
func (s *Service) ListOrgs(ctx context.Context, userID uuid.UUID, all bool, after uuid.UUID, limit int) ([]*Org, error) {
	rows, err := s.pool.Query(ctx, `SELECT o.id, o.slug, o.name, o.created_at FROM orgs o
		WHERE o.id > $3 AND ($2 OR EXISTS (SELECT 1 FROM org_memberships m WHERE m.org_id = o.id AND m.user_id = $1)
			OR EXISTS (SELECT 1 FROM project_memberships pm JOIN projects p ON p.id = pm.project_id WHERE p.org_id = o.id AND pm.user_id = $1))
		ORDER BY o.id LIMIT $4`, userID, all, after, limit+1)
	if err != nil {
		return nil, fmt.Errorf("identity: list orgs: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (*Org, error) {
		o := &Org{}
		return o, r.Scan(&o.ID, &o.Slug, &o.Name, &o.CreatedAt)
	})
}

// UpdateOrg renames an org.
func (s *Service) UpdateOrg(ctx context.Context, id uuid.UUID, name string) (*Org, error) {
	if err := validName("name", name, 200); err != nil {
		return nil, err
	}
	o := &Org{}
	err := s.tx(ctx, func(tx pgx.Tx) error {
		err := tx.QueryRow(ctx, `UPDATE orgs SET name = $2, updated_at = now() WHERE id = $1 RETURNING id, slug, name, created_at`, id, name).
			Scan(&o.ID, &o.Slug, &o.Name, &o.CreatedAt)
		if errors.Is(err, pgx.ErrNoRows) {
			return errcode.New(CodeOrgNotFound, "organization not found")
		}
		if err != nil {
			return err
		}
		return s.record(ctx, tx, "org.update", s.ids.Org(id.String()), map[string]any{"name": name})
	})
	if err != nil {
		return nil, fmt.Errorf("identity: update org: %w", err)
	}
	s.forgetMemberships()
	return o, nil
}

// ListOrgMembers lists an org's members by user id after the cursor.
func (s *Service) ListOrgMembers(ctx context.Context, orgID, after uuid.UUID, limit int) ([]Member, error) {
	rows, err := s.pool.Query(ctx, `SELECT u.id, u.email, u.display_name, m.role, m.created_at
		FROM org_memberships m JOIN users u ON u.id = m.user_id
		WHERE m.org_id = $1 AND u.id > $2 ORDER BY u.id LIMIT $3`, orgID, after, limit+1)
	if err != nil {
		return nil, fmt.Errorf("identity: list org members: %w", err)
	}
	return pgx.CollectRows(rows, scanMember)
}

func scanMember(r pgx.CollectableRow) (Member, error) {
	var m Member
	return m, r.Scan(&m.UserID, &m.Email, &m.DisplayName, &m.Role, &m.CreatedAt)
}

// AddOrgMember adds the user with email to the org with role. When no user has that
// verified email yet, it records an invitation accepted at their first sign-in
// and returns it instead. Only owners may grant the owner role.
func (s *Service) AddOrgMember(ctx context.Context, orgID uuid.UUID, email, role string, callerRole string) (*Member, *Invitation, error) {
	email, err := NormalizeEmail("email", email)
	if err != nil {
		return nil, nil, err
	}
	if err := validOrgRole(role); err != nil {
		return nil, nil, err
	}
	if role == OrgOwner && callerRole != OrgOwner {
		return nil, nil, errcode.New(errcode.Forbidden, "only an owner can add an owner")
	}
	var m *Member
	var inv *Invitation
	err = s.tx(ctx, func(tx pgx.Tx) error {
		var userID uuid.UUID
		err := tx.QueryRow(ctx, `SELECT id FROM users WHERE lower(email) = $1 AND email_verified AND status = 'active' ORDER BY created_at LIMIT 1`, email).Scan(&userID)
		if errors.Is(err, pgx.ErrNoRows) {
			inv = &Invitation{ID: newID(), OrgID: orgID, Email: email, Role: role, ExpiresAt: s.now().Add(14 * 24 * time.Hour)}
			_, err := tx.Exec(ctx, `INSERT INTO invitations (id, org_id, email, role, invited_by, expires_at) VALUES ($1, $2, $3, $4, $5, $6)
				ON CONFLICT (org_id, lower(email)) WHERE accepted_at IS NULL DO UPDATE SET role = excluded.role, expires_at = excluded.expires_at, invited_by = excluded.invited_by`,
				inv.ID, orgID, email, role, actorOf(ctx), inv.ExpiresAt)
			if err != nil {
				return err
			}
			return s.record(ctx, tx, "org.invitation.create", s.ids.InOrg(orgID.String(), "invitation", inv.ID.String()), map[string]any{"email": email, "role": role})
		}
		if err != nil {
			return err
		}
		m = &Member{UserID: userID, Role: role}
		err = tx.QueryRow(ctx, `INSERT INTO org_memberships (org_id, user_id, role) VALUES ($1, $2, $3) RETURNING created_at`, orgID, userID, role).Scan(&m.CreatedAt)
		if store.IsUniqueViolation(err, "") {
			return errcode.New(CodeAlreadyMember, "the user is already a member; change their role instead")
		}
		if err != nil {
			return err
		}
		if err := tx.QueryRow(ctx, `SELECT email, display_name FROM users WHERE id = $1`, userID).Scan(&m.Email, &m.DisplayName); err != nil {
			return err
		}
		return s.record(ctx, tx, "org.member.add", s.ids.InOrg(orgID.String(), "member", userID.String()), map[string]any{"role": role})
	})
	if err != nil {
		return nil, nil, fmt.Errorf("identity: add org member: %w", err)
	}
	s.forgetMemberships()
	return m, inv, nil
}

// acceptInvitations turns u's open, unexpired invitations into memberships.
func (s *Service) acceptInvitations(ctx context.Context, tx pgx.Tx, u *User) error {
	rows, err := tx.Query(ctx, `UPDATE invitations SET accepted_at = now(), accepted_by = $1
		WHERE lower(email) = lower($2) AND accepted_at IS NULL AND expires_at > now() RETURNING org_id, role`, u.ID, u.Email)
	if err != nil {
		return err
	}
	type acc struct {
		org  uuid.UUID
		role string
	}
	accepted, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (acc, error) {
		var a acc
		return a, r.Scan(&a.org, &a.role)
	})
	if err != nil {
		return err
	}
	for _, a := range accepted {
		if _, err := tx.Exec(ctx, `INSERT INTO org_memberships (org_id, user_id, role) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING`, a.org, u.ID, a.role); err != nil {
			return err
		}
		if err := s.record(ctx, tx, "org.member.add", s.ids.InOrg(a.org.String(), "member", u.ID.String()), map[string]any{"role": a.role, "via": "invitation"}); err != nil {
			return err
		}
	}
	return nil
}

// SetOrgMemberRole changes a member's role. Only owners may grant or take away the
// owner role, and the last owner cannot be demoted.
func (s *Service) SetOrgMemberRole(ctx context.Context, orgID, userID uuid.UUID, role, callerRole string) (*Member, error) {
	if err := validOrgRole(role); err != nil {
		return nil, err
	}
	var m Member
	err := s.tx(ctx, func(tx pgx.Tx) error {
		current, err := lockOrgMember(ctx, tx, orgID, userID)
		if err != nil {
			return err
		}
		if (role == OrgOwner || current == OrgOwner) && callerRole != OrgOwner {
			return errcode.New(errcode.Forbidden, "only an owner can grant or take away the owner role")
		}
		if current == OrgOwner && role != OrgOwner {
			if err := ensureAnotherOwner(ctx, tx, orgID, userID); err != nil {
				return err
			}
		}
		err = tx.QueryRow(ctx, `UPDATE org_memberships m SET role = $3 FROM users u WHERE u.id = m.user_id AND m.org_id = $1 AND m.user_id = $2
			RETURNING u.id, u.email, u.display_name, m.role, m.created_at`, orgID, userID, role).
			Scan(&m.UserID, &m.Email, &m.DisplayName, &m.Role, &m.CreatedAt)
		if err != nil {
			return err
		}
		return s.record(ctx, tx, "org.member.update", s.ids.InOrg(orgID.String(), "member", userID.String()), map[string]any{"role": role, "previous_role": current})
	})
	if err != nil {
		return nil, fmt.Errorf("identity: set org member role: %w", err)
	}
	s.forgetMemberships(userID)
	return &m, nil
}

// RemoveOrgMember removes a member (and their project memberships in the org). The
// last owner cannot be removed.
func (s *Service) RemoveOrgMember(ctx context.Context, orgID, userID uuid.UUID, callerRole string) error {
	err := s.tx(ctx, func(tx pgx.Tx) error {
		current, err := lockOrgMember(ctx, tx, orgID, userID)
		if err != nil {
			return err
		}
		if current == OrgOwner {
			if callerRole != OrgOwner {
				return errcode.New(errcode.Forbidden, "only an owner can remove an owner")
			}
			if err := ensureAnotherOwner(ctx, tx, orgID, userID); err != nil {
				return err
			}
		}
		if _, err := tx.Exec(ctx, `DELETE FROM org_memberships WHERE org_id = $1 AND user_id = $2`, orgID, userID); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `DELETE FROM project_memberships pm USING projects p WHERE p.id = pm.project_id AND p.org_id = $1 AND pm.user_id = $2`, orgID, userID); err != nil {
			return err
		}
		return s.record(ctx, tx, "org.member.remove", s.ids.InOrg(orgID.String(), "member", userID.String()), map[string]any{"previous_role": current})
	})
	if err != nil {
		return fmt.Errorf("identity: remove org member: %w", err)
	}
	s.forgetMemberships(userID)
	return nil
}

// lockOrgMember locks the org row, so concurrent membership changes of one org
// (two owners demoting each other) serialise, and returns the member's role.
func lockOrgMember(ctx context.Context, tx pgx.Tx, orgID, userID uuid.UUID) (string, error) {
	if _, err := tx.Exec(ctx, `SELECT 1 FROM orgs WHERE id = $1 FOR UPDATE`, orgID); err != nil {
		return "", err
	}
	var role string
	err := tx.QueryRow(ctx, `SELECT role FROM org_memberships WHERE org_id = $1 AND user_id = $2`, orgID, userID).Scan(&role)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", errcode.New(CodeMemberNotFound, "no such member in this organization")
	}
	return role, err
}

func ensureAnotherOwner(ctx context.Context, tx pgx.Tx, orgID, userID uuid.UUID) error {
	var others int
	if err := tx.QueryRow(ctx, `SELECT count(*) FROM org_memberships WHERE org_id = $1 AND role = 'owner' AND user_id <> $2`, orgID, userID).Scan(&others); err != nil {
		return err
	}
	if others == 0 {
		return errcode.New(CodeLastOwner, "an organization needs at least one owner; make someone else owner first")
	}
	return nil
}

func principalID(ctx context.Context) uuid.UUID {
	if p := principal.From(ctx); p != nil {
		return p.ID
	}
	return uuid.Nil
}

func actorOf(ctx context.Context) string {
	if p := principal.From(ctx); p != nil {
		return p.Actor()
	}
	return "anonymous"
}
