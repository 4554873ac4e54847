package httpapi

import (
	"github.com/gofiber/fiber/v2"
	"github.com/google/uuid"

	"github.com/gpuaas/gpuaas/core/internal/authz"
	"github.com/gpuaas/gpuaas/core/internal/httpapi/apigen"
	"github.com/gpuaas/gpuaas/core/internal/identity"
)

// GetProject returns a project.
func (a *API) GetProject(c *fiber.Ctx, projectID apigen.ProjectID) error {
	p, _, err := a.allowProject(c, projectID, authz.ProjectRead)
	if err != nil {
		return err
	}
	return c.JSON(projectJSON(p))
}

// UpdateProject renames a project.
func (a *API) UpdateProject(c *fiber.Ctx, projectID apigen.ProjectID) error {
	if _, _, err := a.allowProject(c, projectID, authz.ProjectUpdate); err != nil {
		return err
	}
	var req apigen.UpdateNameRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	p, err := a.Identity.UpdateProject(c.UserContext(), projectID, req.Name)
	if err != nil {
		return err
	}
	return c.JSON(projectJSON(p))
}

// ListProjectMembers lists a project's members.
func (a *API) ListProjectMembers(c *fiber.Ctx, projectID apigen.ProjectID, params apigen.ListProjectMembersParams) error {
	if _, _, err := a.allowProject(c, projectID, authz.ProjectMembersRead); err != nil {
		return err
	}
	limit, after, err := pageArgs(params.Limit, params.Cursor)
	if err != nil {
		return err
	}
	ms, err := a.Identity.ListProjectMembers(c.UserContext(), projectID, after, limit)
	if err != nil {
		return err
	}
	items, next := Page(ms, limit, func(m identity.Member) any { return m.UserID }, memberJSON)
	return c.JSON(apigen.MemberPage{Items: items, NextCursor: next})
}

// AddProjectMember adds an org member to a project.
func (a *API) AddProjectMember(c *fiber.Ctx, projectID apigen.ProjectID, _ apigen.AddProjectMemberParams) error {
	p, _, err := a.allowProject(c, projectID, authz.ProjectMembersManage)
	if err != nil {
		return err
	}
	var req apigen.AddProjectMemberRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	m, err := a.Identity.AddProjectMember(c.UserContext(), p, req.UserId, string(req.Role))
	if err != nil {
		return err
	}
	return c.Status(fiber.StatusCreated).JSON(memberJSON(*m))
}

// UpdateProjectMember changes a project member's role.
func (a *API) UpdateProjectMember(c *fiber.Ctx, projectID apigen.ProjectID, userID apigen.UserID) error {
	p, _, err := a.allowProject(c, projectID, authz.ProjectMembersManage)
	if err != nil {
		return err
	}
	var req apigen.RoleRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	m, err := a.Identity.SetProjectMemberRole(c.UserContext(), p, userID, req.Role)
	if err != nil {
		return err
	}
	return c.JSON(memberJSON(*m))
}

// RemoveProjectMember removes a project member.
func (a *API) RemoveProjectMember(c *fiber.Ctx, projectID apigen.ProjectID, userID apigen.UserID) error {
	p, _, err := a.allowProject(c, projectID, authz.ProjectMembersManage)
	if err != nil {
		return err
	}
	if err := a.Identity.RemoveProjectMember(c.UserContext(), p, userID); err != nil {
		return err
	}
	return c.SendStatus(fiber.StatusNoContent)
}

func serviceAccountJSON(s *identity.ServiceAccount) apigen.ServiceAccount {
	return apigen.ServiceAccount{Id: s.ID, OrgId: s.OrgID, ProjectId: s.ProjectID, Name: s.Name, Description: s.Description,
		Role: apigen.ServiceAccountRole(s.Role), CreatedAt: s.CreatedAt.UTC()}
}

// ListServiceAccounts lists a project's service accounts.
func (a *API) ListServiceAccounts(c *fiber.Ctx, projectID apigen.ProjectID, params apigen.ListServiceAccountsParams) error {
	if _, _, err := a.allowProject(c, projectID, authz.ProjectServiceAccountsRead); err != nil {
		return err
	}
	limit, after, err := pageArgs(params.Limit, params.Cursor)
	if err != nil {
		return err
	}
	sas, err := a.Identity.ListServiceAccounts(c.UserContext(), projectID, after, limit)
	if err != nil {
		return err
	}
	items, next := Page(sas, limit, func(s *identity.ServiceAccount) any { return s.ID }, serviceAccountJSON)
	return c.JSON(apigen.ServiceAccountPage{Items: items, NextCursor: next})
}

// CreateServiceAccount creates a service account.
func (a *API) CreateServiceAccount(c *fiber.Ctx, projectID apigen.ProjectID, _ apigen.CreateServiceAccountParams) error {
	p, _, err := a.allowProject(c, projectID, authz.ProjectServiceAccountsManage)
	if err != nil {
		return err
	}
	var req apigen.CreateServiceAccountRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	desc := ""
	if req.Description != nil {
		desc = *req.Description
	}
	sa, err := a.Identity.CreateServiceAccount(c.UserContext(), p, req.Name, desc, string(req.Role))
	if err != nil {
		return err
	}
	return c.Status(fiber.StatusCreated).JSON(serviceAccountJSON(sa))
}

// serviceAccount authorizes action on the project and loads the service account.
func (a *API) serviceAccount(c *fiber.Ctx, projectID, saID uuid.UUID, action authz.Action) (*identity.ServiceAccount, error) {
	if _, _, err := a.allowProject(c, projectID, action); err != nil {
		return nil, err
	}
	return a.Identity.GetServiceAccount(c.UserContext(), projectID, saID)
}

// GetServiceAccount returns a service account.
func (a *API) GetServiceAccount(c *fiber.Ctx, projectID apigen.ProjectID, saID apigen.ServiceAccountID) error {
	sa, err := a.serviceAccount(c, projectID, saID, authz.ProjectServiceAccountsRead)
	if err != nil {
		return err
	}
	return c.JSON(serviceAccountJSON(sa))
}

// DeleteServiceAccount deletes a service account and revokes its keys.
func (a *API) DeleteServiceAccount(c *fiber.Ctx, projectID apigen.ProjectID, saID apigen.ServiceAccountID) error {
	sa, err := a.serviceAccount(c, projectID, saID, authz.ProjectServiceAccountsManage)
	if err != nil {
		return err
	}
	if err := a.Identity.DeleteServiceAccount(c.UserContext(), sa); err != nil {
		return err
	}
	a.Auth.Invalidate("user:" + sa.ID.String())
	return c.SendStatus(fiber.StatusNoContent)
}

// ListServiceAccountKeys lists a service account's keys.
func (a *API) ListServiceAccountKeys(c *fiber.Ctx, projectID apigen.ProjectID, saID apigen.ServiceAccountID, params apigen.ListServiceAccountKeysParams) error {
	sa, err := a.serviceAccount(c, projectID, saID, authz.ProjectServiceAccountsRead)
	if err != nil {
		return err
	}
	return a.listKeys(c, identity.KeyOwner{ServiceAccount: sa}, params.Limit, params.Cursor)
}

// CreateServiceAccountKey creates a key for a service account.
func (a *API) CreateServiceAccountKey(c *fiber.Ctx, projectID apigen.ProjectID, saID apigen.ServiceAccountID, _ apigen.CreateServiceAccountKeyParams) error {
	sa, err := a.serviceAccount(c, projectID, saID, authz.ProjectServiceAccountsManage)
	if err != nil {
		return err
	}
	return a.createKey(c, identity.KeyOwner{ServiceAccount: sa})
}

// RevokeServiceAccountKey revokes a service account's key.
func (a *API) RevokeServiceAccountKey(c *fiber.Ctx, projectID apigen.ProjectID, saID apigen.ServiceAccountID, keyID apigen.KeyID) error {
	sa, err := a.serviceAccount(c, projectID, saID, authz.ProjectServiceAccountsManage)
	if err != nil {
		return err
	}
	return a.revokeKey(c, identity.KeyOwner{ServiceAccount: sa}, keyID)
}
