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
	"github.com/gpuaas/gpuaas/core/internal/store"
)

// Project owns resources inside an org.
type Project struct {
	ID        uuid.UUID
	OrgID     uuid.UUID
	Slug      string
	Name      string
	CreatedAt time.Time
}

var projectRoles = []string{ProjectAdmin, ProjectMember, ProjectViewer}

func validProjectRole(r string) error {
	if !slices.Contains(projectRoles, r) {
		return errcode.New(errcode.ValidationFailed, "role must be one of %v", projectRoles).WithDetails("field", "role")
	}
	return nil
}

// CreateProject creates a project in an org.
func (s *Service) CreateProject(ctx context.Context, orgID uuid.UUID, slug, name string) (*Project, error) {
	if err := validSlug("slug", slug); err != nil {
		return nil, err
	}
	if err := validName("name", name, 200); err != nil {
		return nil, err
	}
	p := &Project{ID: newID(), OrgID: orgID, Slug: slug, Name: name}
	err := s.tx(ctx, func(tx pgx.Tx) error {
		err := tx.QueryRow(ctx, `INSERT INTO projects (id, org_id, slug, name) VALUES ($1, $2, $3, $4) RETURNING created_at`, p.ID, orgID, slug, name).Scan(&p.CreatedAt)
		if store.IsUniqueViolation(err, "") {
			return errcode.New(CodeSlugTaken, "a project with slug %q exists in this organization", slug).WithDetails("field", "slug")
		}
		if err != nil {
			return err
		}
		return s.record(ctx, tx, "project.create", s.ids.Project(orgID.String(), p.ID.String()), map[string]any{"slug": slug})
	})
	if err != nil {
		return nil, fmt.Errorf("identity: create project: %w", err)
	}
	return p, nil
}

// GetProject returns a project.
func (s *Service) GetProject(ctx context.Context, id uuid.UUID) (*Project, error) {
	p := &Project{}
	err := s.pool.QueryRow(ctx, `SELECT id, org_id, slug, name, created_at FROM projects WHERE id = $1`, id).Scan(&p.ID, &p.OrgID, &p.Slug, &p.Name, &p.CreatedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, errcode.New(CodeProjectNotFound, "project not found")
	}
	if err != nil {
		return nil, fmt.Errorf("identity: get project: %w", err)
	}
	return p, nil
}

// ListProjects lists an org's projects by id after the cursor.
func (s *Service) ListProjects(ctx context.Context, orgID, after uuid.UUID, limit int) ([]*Project, error) {
	rows, err := s.pool.Query(ctx, `SELECT id, org_id, slug, name, created_at FROM projects WHERE org_id = $1 AND id > $2 ORDER BY id LIMIT $3`, orgID, after, limit+1)
	if err != nil {
		return nil, fmt.Errorf("identity: list projects: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (*Project, error) {
		p := &Project{}
		return p, r.Scan(&p.ID, &p.OrgID, &p.Slug, &p.Name, &p.CreatedAt)
	})
}

// UpdateProject renames a project.
func (s *Service) UpdateProject(ctx context.Context, id uuid.UUID, name string) (*Project, error) {
	if err := validName("name", name, 200); err != nil {
		return nil, err
	}
	p := &Project{}
	err := s.tx(ctx, func(tx pgx.Tx) error {
		err := tx.QueryRow(ctx, `UPDATE projects SET name = $2, updated_at = now() WHERE id = $1 RETURNING id, org_id, slug, name, created_at`, id, name).
			Scan(&p.ID, &p.OrgID, &p.Slug, &p.Name, &p.CreatedAt)
		if errors.Is(err, pgx.ErrNoRows) {
			return errcode.New(CodeProjectNotFound, "project not found")
		}
		if err != nil {
			return err
		}
		return s.record(ctx, tx, "project.update", s.ids.Project(p.OrgID.String(), id.String()), map[string]any{"name": name})
	})
	if err != nil {
		return nil, fmt.Errorf("identity: update project: %w", err)
	}
	s.forgetMemberships()
	return p, nil
}

// ListProjectMembers lists a project's members by user id after the cursor.
func (s *Service) ListProjectMembers(ctx context.Context, projectID, after uuid.UUID, limit int) ([]Member, error) {
	rows, err := s.pool.Query(ctx, `SELECT u.id, u.email, u.display_name, m.role, m.created_at
		FROM project_memberships m JOIN users u ON u.id = m.user_id
		WHERE m.project_id = $1 AND u.id > $2 ORDER BY u.id LIMIT $3`, projectID, after, limit+1)
	if err != nil {
		return nil, fmt.Errorf("identity: list project members: %w", err)
	}
	return pgx.CollectRows(rows, scanMember)
}

// AddProjectMember adds a member of the project's org to the project. Only people
// who belong to the org can join its projects.
func (s *Service) AddProjectMember(ctx context.Context, p *Project, userID uuid.UUID, role string) (*Member, error) {
	if err := validProjectRole(role); err != nil {
		return nil, err
	}
	m := &Member{UserID: userID, Role: role}
	err := s.tx(ctx, func(tx pgx.Tx) error {
		err := tx.QueryRow(ctx, `SELECT u.email, u.display_name FROM users u JOIN org_memberships om ON om.user_id = u.id AND om.org_id = $2 WHERE u.id = $1`, userID, p.OrgID).
			Scan(&m.Email, &m.DisplayName)
		if errors.Is(err, pgx.ErrNoRows) {
			return errcode.New(CodeUserNotFound, "no member of this organization has that user id; add them to the organization first").WithDetails("field", "user_id")
		}
		if err != nil {
			return err
		}
		err = tx.QueryRow(ctx, `INSERT INTO project_memberships (project_id, user_id, role) VALUES ($1, $2, $3) RETURNING created_at`, p.ID, userID, role).Scan(&m.CreatedAt)
		if store.IsUniqueViolation(err, "") {
			return errcode.New(CodeAlreadyMember, "the user is already a member; change their role instead")
		}
		if err != nil {
			return err
		}
		return s.record(ctx, tx, "project.member.add", s.ids.InProject(p.OrgID.String(), p.ID.String(), "member", userID.String()), map[string]any{"role": role})
	})
	if err != nil {
		return nil, fmt.Errorf("identity: add project member: %w", err)
	}
	s.forgetMemberships(userID)
	return m, nil
}

// SetProjectMemberRole changes a project member's role.
func (s *Service) SetProjectMemberRole(ctx context.Context, p *Project, userID uuid.UUID, role string) (*Member, error) {
	if err := validProjectRole(role); err != nil {
		return nil, err
	}
	var m Member
	err := s.tx(ctx, func(tx pgx.Tx) error {
		var prev string
		err := tx.QueryRow(ctx, `SELECT role FROM project_memberships WHERE project_id = $1 AND user_id = $2 FOR UPDATE`, p.ID, userID).Scan(&prev)
		if errors.Is(err, pgx.ErrNoRows) {
			return errcode.New(CodeMemberNotFound, "no such member in this project")
		}
		if err != nil {
			return err
		}
		err = tx.QueryRow(ctx, `UPDATE project_memberships m SET role = $3 FROM users u WHERE u.id = m.user_id AND m.project_id = $1 AND m.user_id = $2
			RETURNING u.id, u.email, u.display_name, m.role, m.created_at`, p.ID, userID, role).Scan(&m.UserID, &m.Email, &m.DisplayName, &m.Role, &m.CreatedAt)
		if err != nil {
			return err
		}
		return s.record(ctx, tx, "project.member.update", s.ids.InProject(p.OrgID.String(), p.ID.String(), "member", userID.String()), map[string]any{"role": role, "previous_role": prev})
	})
	if err != nil {
		return nil, fmt.Errorf("identity: set project member role: %w", err)
	}
	s.forgetMemberships(userID)
	return &m, nil
}

// RemoveProjectMember removes a member from a project.
func (s *Service) RemoveProjectMember(ctx context.Context, p *Project, userID uuid.UUID) error {
	err := s.tx(ctx, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `DELETE FROM project_memberships WHERE project_id = $1 AND user_id = $2`, p.ID, userID)
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return errcode.New(CodeMemberNotFound, "no such member in this project")
		}
		return s.record(ctx, tx, "project.member.remove", s.ids.InProject(p.OrgID.String(), p.ID.String(), "member", userID.String()), nil)
	})
	if err != nil {
		return fmt.Errorf("identity: remove project member: %w", err)
	}
	s.forgetMemberships(userID)
	return nil
}
