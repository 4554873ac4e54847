// Package authz is the one place that decides whether a principal may take an action
// on a resource. Callers name the action and the org or project the resource lives
// in; Decide answers nil (allowed), 404 (the principal has no business knowing the
// resource exists) or 403 (it may see it but not do this).
package authz

import (
	"context"
	"errors"
	"fmt"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/principal"
)

// Action is something a principal does to a resource.
type Action string

// Org-scoped actions.
const (
	OrgRead          Action = "org.read"
	OrgUpdate        Action = "org.update"
	OrgMembersRead   Action = "org.members.read"
	OrgMembersManage Action = "org.members.manage"
	ProjectCreate    Action = "project.create"
	ProjectList      Action = "project.list"
	BillingRead      Action = "billing.read"
	BillingManage    Action = "billing.manage"
)

// Project-scoped actions.
const (
	ProjectRead                  Action = "project.read"
	ProjectUpdate                Action = "project.update"
	ProjectMembersRead           Action = "project.members.read"
	ProjectMembersManage         Action = "project.members.manage"
	ProjectServiceAccountsRead   Action = "project.service_accounts.read"
	ProjectServiceAccountsManage Action = "project.service_accounts.manage"
	ResourceRead                 Action = "project.resources.read"
	ResourceWrite                Action = "project.resources.write"
)

// orgRule lists the org roles allowed an org-scoped action.
var orgRule = map[Action][]string{
	OrgRead:          {"owner", "admin", "billing", "member"},
	OrgUpdate:        {"owner", "admin"},
	OrgMembersRead:   {"owner", "admin", "billing", "member"},
	OrgMembersManage: {"owner", "admin"},
	ProjectCreate:    {"owner", "admin"},
	ProjectList:      {"owner", "admin", "billing", "member"},
	BillingRead:      {"owner", "admin", "billing"},
	BillingManage:    {"owner", "admin", "billing"},
}

// projectRule gives, per project-scoped action, the weakest project role allowed
// and whether any org member may do it (reads of project metadata). Org owners and
// admins may do everything in their org's projects.
var projectRule = map[Action]struct {
	minRole        int
	anyOrgMember   bool
	serviceAccount bool
}{
	ProjectRead:                  {viewer, true, true},
	ProjectUpdate:                {admin, false, true},
	ProjectMembersRead:           {viewer, false, true},
	ProjectMembersManage:         {admin, false, true},
	ProjectServiceAccountsRead:   {member, false, true},
	ProjectServiceAccountsManage: {admin, false, false},
	ResourceRead:                 {viewer, false, true},
	ResourceWrite:                {member, false, true},
}

const (
	none = iota
	viewer
	member
	admin
)

func projectLevel(role string) int {
	switch role {
	case "admin":
		return admin
	case "member":
		return member
	case "viewer":
		return viewer
	}
	return none
}

// Relation is what the principal is to a resource's org and project.
type Relation struct {
	Exists       bool // the org (or project) exists
	OrgID        uuid.UUID
	OrgRole      string // "" when not an org member
	ProjectRole  string // "" when not a project member (or not a project action)
	InOrgProject bool   // the principal is a member of some project of this org
}

// Decide answers whether p may take action given its relation to the resource.
func Decide(p *principal.Principal, action Action, rel Relation) error {
	if p == nil {
		return errcode.New(errcode.Unauthenticated, "authentication required")
	}
	if !rel.Exists {
		return notFound()
	}
	if p.IsPlatformAdmin {
		return nil
	}
	if roles, ok := orgRule[action]; ok {
		return decideOrg(p, action, roles, rel)
	}
	rule, ok := projectRule[action]
	if !ok {
		return fmt.Errorf("authz: unknown action %q", action) // a programming error: 500
	}
	if p.Type == principal.ServiceAccount {
		if p.OrgID != rel.OrgID || rel.ProjectRole == "" {
			return notFound()
		}
		if !rule.serviceAccount || projectLevel(rel.ProjectRole) < rule.minRole {
			return forbidden(action)
		}
		return nil
	}
	if rel.OrgRole == "owner" || rel.OrgRole == "admin" {
		return nil
	}
	if rel.ProjectRole == "" && rel.OrgRole == "" {
		return notFound()
	}
	if projectLevel(rel.ProjectRole) >= rule.minRole || (rule.anyOrgMember && rel.OrgRole != "") {
		return nil
	}
	return forbidden(action)
}

func decideOrg(p *principal.Principal, action Action, roles []string, rel Relation) error {
	if p.Type == principal.ServiceAccount {
		if p.OrgID != rel.OrgID {
			return notFound()
		}
		if action == OrgRead {
			return nil
		}
		return forbidden(action)
	}
	if rel.OrgRole == "" {
		if rel.InOrgProject && action == OrgRead {
			return nil // project members may see the org they work in
		}
		if rel.InOrgProject {
			return forbidden(action)
		}
		return notFound()
	}
	for _, r := range roles {
		if r == rel.OrgRole {
			return nil
		}
	}
	return forbidden(action)
}

func notFound() error { return errcode.New(errcode.NotFound, "not found") }

func forbidden(a Action) error {
	return errcode.New(errcode.Forbidden, "your role does not allow %s", a).WithDetails("action", string(a))
}

// Loader reads relations from the database.
type Loader struct{ pool *pgxpool.Pool }

// NewLoader returns a Loader.
func NewLoader(pool *pgxpool.Pool) *Loader { return &Loader{pool: pool} }

// Org returns p's relation to an org.
func (l *Loader) Org(ctx context.Context, p *principal.Principal, orgID uuid.UUID) (Relation, error) {
	rel := Relation{OrgID: orgID}
	var role *string
	err := l.pool.QueryRow(ctx, `SELECT
			(SELECT role FROM org_memberships WHERE org_id = o.id AND user_id = $2),
			EXISTS (SELECT 1 FROM project_memberships pm JOIN projects pr ON pr.id = pm.project_id WHERE pr.org_id = o.id AND pm.user_id = $2)
		FROM orgs o WHERE o.id = $1`, orgID, p.ID).Scan(&role, &rel.InOrgProject)
	if errors.Is(err, pgx.ErrNoRows) {
		return rel, nil
	}
	if err != nil {
		return rel, fmt.Errorf("authz: org relation: %w", err)
	}
	rel.Exists = true
	if role != nil {
		rel.OrgRole = *role
	}
	return rel, nil
}

// Project returns p's relation to a project.
func (l *Loader) Project(ctx context.Context, p *principal.Principal, projectID uuid.UUID) (Relation, error) {
	rel := Relation{}
	var orgRole, projectRole *string
	err := l.pool.QueryRow(ctx, `SELECT pr.org_id,
			(SELECT role FROM org_memberships WHERE org_id = pr.org_id AND user_id = $2),
			(SELECT role FROM project_memberships WHERE project_id = pr.id AND user_id = $2)
		FROM projects pr WHERE pr.id = $1`, projectID, p.ID).Scan(&rel.OrgID, &orgRole, &projectRole)
	if errors.Is(err, pgx.ErrNoRows) {
		return rel, nil
	}
	if err != nil {
		return rel, fmt.Errorf("authz: project relation: %w", err)
	}
	rel.Exists = true
	if orgRole != nil {
		rel.OrgRole = *orgRole
	}
	if projectRole != nil {
		rel.ProjectRole = *projectRole
	}
	if p.Type == principal.ServiceAccount {
		rel.OrgRole = ""
		rel.ProjectRole = ""
		if p.ProjectID == projectID {
			rel.ProjectRole = p.ProjectRole
		}
	}
	return rel, nil
}
