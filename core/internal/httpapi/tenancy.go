package httpapi

import (
	"errors"

	"github.com/gofiber/fiber/v2"
	"github.com/google/uuid"

	"github.com/gpuaas/gpuaas/core/internal/audit"
	"github.com/gpuaas/gpuaas/core/internal/authz"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/httpapi/apigen"
	"github.com/gpuaas/gpuaas/core/internal/identity"
	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/rid"
)

// allowOrg decides action on org for the caller; a refusal of a mutation is audited.
func (a *API) allowOrg(c *fiber.Ctx, orgID uuid.UUID, action authz.Action) (authz.Relation, error) {
	p, err := caller(c)
	if err != nil {
		return authz.Relation{}, err
	}
	rel, err := a.Authz.Org(c.UserContext(), p, orgID)
	if err != nil {
		return rel, err
	}
	if err := authz.Decide(p, action, rel); err != nil {
		return rel, a.denied(c, err, action, a.Identity.IDs().Org(orgID.String()))
	}
	return rel, nil
}

// allowProject decides action on a project for the caller and returns the project.
func (a *API) allowProject(c *fiber.Ctx, projectID uuid.UUID, action authz.Action) (*identity.Project, authz.Relation, error) {
	p, err := caller(c)
	if err != nil {
		return nil, authz.Relation{}, err
	}
	rel, err := a.Authz.Project(c.UserContext(), p, projectID)
	if err != nil {
		return nil, rel, err
	}
	if err := authz.Decide(p, action, rel); err != nil {
		return nil, rel, a.denied(c, err, action, a.Identity.IDs().Project(rel.OrgID.String(), projectID.String()))
	}
	proj, err := a.Identity.GetProject(c.UserContext(), projectID)
	return proj, rel, err
}

// allowInProject decides action on a project for the caller, like
// allowProject, without loading the project (one query on hot paths).
func (a *API) allowInProject(c *fiber.Ctx, projectID uuid.UUID, action authz.Action) (authz.Relation, error) {
	p, err := caller(c)
	if err != nil {
		return authz.Relation{}, err
	}
	rel, err := a.Authz.Project(c.UserContext(), p, projectID)
	if err != nil {
		return rel, err
	}
	if err := authz.Decide(p, action, rel); err != nil {
		return rel, a.denied(c, err, action, a.Identity.IDs().Project(rel.OrgID.String(), projectID.String()))
	}
	return rel, nil
}

// denied audits a 403 on a mutating request and maps 404s to the resource's own code.
func (a *API) denied(c *fiber.Ctx, err error, action authz.Action, target rid.ID) error {
	if errcode.Of(err) == errcode.Forbidden && c.Method() != fiber.MethodGet {
		if aerr := audit.Record(c.UserContext(), a.Pool, audit.Entry{Action: string(action), Target: target, Result: audit.Denied}); aerr != nil {
			return errors.Join(err, aerr)
		}
	}
	if errcode.Of(err) == errcode.NotFound {
		switch target.Type {
		case "org":
			return errcode.New(identity.CodeOrgNotFound, "organization not found")
		case "project":
			return errcode.New(identity.CodeProjectNotFound, "project not found")
		}
	}
	return err
}

func orgJSON(o *identity.Org) apigen.Org {
	return apigen.Org{Id: o.ID, Slug: o.Slug, Name: o.Name, CreatedAt: o.CreatedAt.UTC()}
}

func projectJSON(p *identity.Project) apigen.Project {
	return apigen.Project{Id: p.ID, OrgId: p.OrgID, Slug: p.Slug, Name: p.Name, CreatedAt: p.CreatedAt.UTC()}
}

func memberJSON(m identity.Member) apigen.Member {
	return apigen.Member{UserId: m.UserID, Email: m.Email, DisplayName: m.DisplayName, Role: m.Role, CreatedAt: m.CreatedAt.UTC()}
}

// ListOrgs lists the caller's orgs.
func (a *API) ListOrgs(c *fiber.Ctx, params apigen.ListOrgsParams) error {
	p, err := caller(c)
	if err != nil {
		return err
	}
	limit, after, err := pageArgs(params.Limit, params.Cursor)
	if err != nil {
		return err
	}
	var orgs []*identity.Org
	if p.Type == principal.ServiceAccount {
		o, err := a.Identity.GetOrg(c.UserContext(), p.OrgID)
		if err != nil {
			return err
		}
		if o.ID.String() > after.String() {
			orgs = append(orgs, o)
		}
	} else if orgs, err = a.Identity.ListOrgs(c.UserContext(), p.ID, p.IsPlatformAdmin, after, limit); err != nil {
		return err
	}
	items, next := Page(orgs, limit, func(o *identity.Org) any { return o.ID }, orgJSON)
	return c.JSON(apigen.OrgPage{Items: items, NextCursor: next})
}

// CreateOrg creates an org owned by the caller.
func (a *API) CreateOrg(c *fiber.Ctx, _ apigen.CreateOrgParams) error {
	if _, err := caller(c); err != nil {
		return err
	}
	var req apigen.CreateOrgRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	o, err := a.Identity.CreateOrg(c.UserContext(), req.Slug, req.Name)
	if err != nil {
		return err
	}
	return c.Status(fiber.StatusCreated).JSON(orgJSON(o))
}

// GetOrg returns an org.
func (a *API) GetOrg(c *fiber.Ctx, orgID apigen.OrgID) error {
	if _, err := a.allowOrg(c, orgID, authz.OrgRead); err != nil {
		return err
	}
	o, err := a.Identity.GetOrg(c.UserContext(), orgID)
	if err != nil {
		return err
	}
	return c.JSON(orgJSON(o))
}

// UpdateOrg renames an org.
func (a *API) UpdateOrg(c *fiber.Ctx, orgID apigen.OrgID) error {
	if _, err := a.allowOrg(c, orgID, authz.OrgUpdate); err != nil {
		return err
	}
	var req apigen.UpdateNameRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	o, err := a.Identity.UpdateOrg(c.UserContext(), orgID, req.Name)
	if err != nil {
		return err
	}
	return c.JSON(orgJSON(o))
}

// ListOrgMembers lists an org's members.
func (a *API) ListOrgMembers(c *fiber.Ctx, orgID apigen.OrgID, params apigen.ListOrgMembersParams) error {
	if _, err := a.allowOrg(c, orgID, authz.OrgMembersRead); err != nil {
		return err
	}
	limit, after, err := pageArgs(params.Limit, params.Cursor)
	if err != nil {
		return err
	}
	ms, err := a.Identity.ListOrgMembers(c.UserContext(), orgID, after, limit)
	if err != nil {
		return err
	}
	items, next := Page(ms, limit, func(m identity.Member) any { return m.UserID }, memberJSON)
	return c.JSON(apigen.MemberPage{Items: items, NextCursor: next})
}

// callerOrgRole is the role that decides owner-only changes (platform admins act as owners).
func callerOrgRole(c *fiber.Ctx, rel authz.Relation) string {
	if p := PrincipalOf(c); p != nil && p.IsPlatformAdmin {
		return identity.OrgOwner
	}
	return rel.OrgRole
}

// AddOrgMember adds or invites a member.
func (a *API) AddOrgMember(c *fiber.Ctx, orgID apigen.OrgID, _ apigen.AddOrgMemberParams) error {
	rel, err := a.allowOrg(c, orgID, authz.OrgMembersManage)
	if err != nil {
		return err
	}
	var req apigen.AddOrgMemberRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	m, inv, err := a.Identity.AddOrgMember(c.UserContext(), orgID, req.Email, string(req.Role), callerOrgRole(c, rel))
	if err != nil {
		return err
	}
	var resp apigen.AddOrgMemberResult
	if m != nil {
		j := memberJSON(*m)
		resp.Member = &j
	}
	if inv != nil {
		resp.Invitation = &apigen.Invitation{Id: inv.ID, Email: inv.Email, Role: inv.Role, ExpiresAt: inv.ExpiresAt.UTC()}
	}
	return c.Status(fiber.StatusCreated).JSON(resp)
}

// UpdateOrgMember changes a member's role.
func (a *API) UpdateOrgMember(c *fiber.Ctx, orgID apigen.OrgID, userID apigen.UserID) error {
	rel, err := a.allowOrg(c, orgID, authz.OrgMembersManage)
	if err != nil {
		return err
	}
	var req apigen.RoleRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	m, err := a.Identity.SetOrgMemberRole(c.UserContext(), orgID, userID, req.Role, callerOrgRole(c, rel))
	if err != nil {
		return err
	}
	return c.JSON(memberJSON(*m))
}

// RemoveOrgMember removes a member.
func (a *API) RemoveOrgMember(c *fiber.Ctx, orgID apigen.OrgID, userID apigen.UserID) error {
	rel, err := a.allowOrg(c, orgID, authz.OrgMembersManage)
	if err != nil {
		return err
	}
	if err := a.Identity.RemoveOrgMember(c.UserContext(), orgID, userID, callerOrgRole(c, rel)); err != nil {
		return err
	}
	a.Auth.Invalidate("user:" + userID.String())
	return c.SendStatus(fiber.StatusNoContent)
}

// ListProjects lists an org's projects.
func (a *API) ListProjects(c *fiber.Ctx, orgID apigen.OrgID, params apigen.ListProjectsParams) error {
	if _, err := a.allowOrg(c, orgID, authz.ProjectList); err != nil {
		return err
	}
	limit, after, err := pageArgs(params.Limit, params.Cursor)
	if err != nil {
		return err
	}
	ps, err := a.Identity.ListProjects(c.UserContext(), orgID, after, limit)
	if err != nil {
		return err
	}
	items, next := Page(ps, limit, func(p *identity.Project) any { return p.ID }, projectJSON)
	return c.JSON(apigen.ProjectPage{Items: items, NextCursor: next})
}

// CreateProject creates a project in an org.
func (a *API) CreateProject(c *fiber.Ctx, orgID apigen.OrgID, _ apigen.CreateProjectParams) error {
	if _, err := a.allowOrg(c, orgID, authz.ProjectCreate); err != nil {
		return err
	}
	var req apigen.CreateProjectRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	p, err := a.Identity.CreateProject(c.UserContext(), orgID, req.Slug, req.Name)
	if err != nil {
		return err
	}
	return c.Status(fiber.StatusCreated).JSON(projectJSON(p))
}
