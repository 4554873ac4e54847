package httpapi

import (
	"strings"

	"github.com/gofiber/fiber/v2"
	"github.com/google/uuid"

	"github.com/gpuaas/gpuaas/core/internal/allocations"
	"github.com/gpuaas/gpuaas/core/internal/authz"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/httpapi/apigen"
	"github.com/gpuaas/gpuaas/core/internal/principal"
)

func allocationJSON(a *allocations.Allocation, admin bool) apigen.Allocation {
	out := apigen.Allocation{Id: a.ID, OrgId: a.OrgID, ProjectId: a.ProjectID, Name: a.Name, SkuId: a.SKU, Gpus: a.GPUs,
		PricePerGpuHourMinor: a.PricePerGPUHourMinor, Currency: a.Currency, State: apigen.AllocationState(a.State),
		StateReason: a.StateReason, SshUser: a.Username, CreatedBy: a.CreatedBy, CreatedAt: a.CreatedAt.UTC(), UpdatedAt: a.UpdatedAt.UTC(),
		ActiveAt: utcPtr(a.ActiveAt), EndedAt: utcPtr(a.EndedAt)}
	if a.Image != "" {
		out.Image = &a.Image
	}
	if a.ReleaseAttempt > 0 {
		out.ReleaseAttempt = &a.ReleaseAttempt
	}
	if a.State == allocations.Active && a.NodeHostname != "" {
		out.SshHost = &a.NodeHostname
	}
	if admin {
		out.NodeId = &a.NodeID
	}
	return out
}

// allowAllocation loads an allocation and decides action on its project; an
// allocation the caller may not see answers 404 like one that does not exist.
func (a *API) allowAllocation(c *fiber.Ctx, id uuid.UUID, action authz.Action) (*allocations.Allocation, *principal.Principal, error) {
	p, err := caller(c)
	if err != nil {
		return nil, nil, err
	}
	al, err := a.Allocations.Get(c.UserContext(), id)
	if err != nil {
		return nil, p, err
	}
	rel, err := a.Authz.Project(c.UserContext(), p, al.ProjectID)
	if err == nil {
		err = authz.Decide(p, action, rel)
	}
	if err == nil {
		return al, p, nil
	}
	switch errcode.Of(err) {
	case errcode.NotFound:
		return nil, p, errcode.New(allocations.CodeNotFound, "no allocation %s", id)
	case errcode.Forbidden:
		return nil, p, a.denied(c, err, action, a.Allocations.Target(al))
	}
	return nil, p, err
}

// ListAllocations lists a project's allocations.
func (a *API) ListAllocations(c *fiber.Ctx, params apigen.ListAllocationsParams) error {
	if _, err := a.allowInProject(c, params.ProjectId, authz.ResourceRead); err != nil {
		return err
	}
	limit, before, err := pageArgs(params.Limit, params.Cursor)
	if err != nil {
		return err
	}
	f := allocations.Filter{ProjectID: params.ProjectId, Before: before, Limit: limit}
	if params.State != nil {
		f.States = []allocations.State{allocations.State(*params.State)}
	}
	list, err := a.Allocations.List(c.UserContext(), f)
	if err != nil {
		return err
	}
	items, next := Page(list, limit, func(al *allocations.Allocation) any { return al.ID },
		func(al *allocations.Allocation) apigen.Allocation { return allocationJSON(al, false) })
	return c.JSON(apigen.AllocationPage{Items: items, NextCursor: next})
}

// defaultUsername makes an account name from the caller's email.
func defaultUsername(p *principal.Principal) string {
	local, _, _ := strings.Cut(strings.ToLower(p.Email), "@")
	var b strings.Builder
	for _, r := range local {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9' && b.Len() > 0, r == '_':
			b.WriteRune(r)
		case (r == '-' || r == '.') && b.Len() > 0:
			b.WriteRune('-')
		}
		if b.Len() == 31 {
			break
		}
	}
	name := strings.TrimRight(b.String(), "-")
	if name == "" || name == "root" || name == "ubuntu" || name == "admin" {
		return "tenant"
	}
	return name
}

// CreateAllocation rents nodes for a project.
func (a *API) CreateAllocation(c *fiber.Ctx, _ apigen.CreateAllocationParams) error {
	var req apigen.CreateAllocationRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	rel, err := a.allowInProject(c, req.ProjectId, authz.ResourceWrite)
	if err != nil {
		return err
	}
	p := principal.From(c.UserContext())
	cr := allocations.CreateRequest{OrgID: rel.OrgID, ProjectID: req.ProjectId, SKU: req.SkuId, Count: 1, Username: defaultUsername(p), CreatedBy: p.Actor()}
	if req.Count != nil {
		cr.Count = *req.Count
	}
	if req.Name != nil {
		cr.Name = *req.Name
	}
	if req.Username != nil {
		cr.Username = *req.Username
	}
	if req.Image != nil {
		cr.Image = *req.Image
	}
	if req.SshPublicKeys != nil {
		cr.SSHPublicKeys = append(cr.SSHPublicKeys, *req.SshPublicKeys...)
	}
	if p.Type == principal.User && (req.SshKeyIds != nil || req.SshPublicKeys == nil) {
		var ids []uuid.UUID
		if req.SshKeyIds != nil {
			ids = *req.SshKeyIds
		}
		keys, err := a.SSHKeys.PublicKeys(c.UserContext(), p.ID, ids)
		if err != nil {
			return err
		}
		cr.SSHPublicKeys = append(cr.SSHPublicKeys, keys...)
	} else if req.SshKeyIds != nil {
		return errcode.New(errcode.ValidationFailed, "a service account has no registered SSH keys; pass ssh_public_keys").WithDetails("field", "ssh_key_ids")
	}
	list, err := a.Allocations.Create(c.UserContext(), cr)
	if err != nil {
		return err
	}
	items := make([]apigen.Allocation, len(list))
	for i, al := range list {
		items[i] = allocationJSON(al, false)
	}
	return c.Status(fiber.StatusCreated).JSON(apigen.AllocationList{Items: items})
}

// GetAllocation returns an allocation of a project the caller can read.
func (a *API) GetAllocation(c *fiber.Ctx, id apigen.AllocationID) error {
	al, p, err := a.allowAllocation(c, id, authz.ResourceRead)
	if err != nil {
		return err
	}
	return c.JSON(allocationJSON(al, p.IsPlatformAdmin))
}

// ReleaseAllocation gives an allocation's node back.
func (a *API) ReleaseAllocation(c *fiber.Ctx, id apigen.AllocationID, _ apigen.ReleaseAllocationParams) error {
	_, p, err := a.allowAllocation(c, id, authz.ResourceWrite)
	if err != nil {
		return err
	}
	al, err := a.Allocations.Release(c.UserContext(), id, p.Actor(), "released by "+p.Actor())
	if err != nil {
		return err
	}
	return c.Status(fiber.StatusAccepted).JSON(allocationJSON(al, p.IsPlatformAdmin))
}

// AdminListAllocations lists every allocation with filters.
func (a *API) AdminListAllocations(c *fiber.Ctx, params apigen.AdminListAllocationsParams) error {
	if err := a.requireAdmin(c, "allocation.read"); err != nil {
		return err
	}
	limit, before, err := pageArgs(params.Limit, params.Cursor)
	if err != nil {
		return err
	}
	f := allocations.Filter{Before: before, Limit: limit}
	if params.OrgId != nil {
		f.OrgID = *params.OrgId
	}
	if params.ProjectId != nil {
		f.ProjectID = *params.ProjectId
	}
	if params.NodeId != nil {
		f.NodeID = *params.NodeId
	}
	if params.SkuId != nil {
		f.SKU = *params.SkuId
	}
	if params.State != nil {
		f.States = []allocations.State{allocations.State(*params.State)}
	}
	list, err := a.Allocations.List(c.UserContext(), f)
	if err != nil {
		return err
	}
	items, next := Page(list, limit, func(al *allocations.Allocation) any { return al.ID },
		func(al *allocations.Allocation) apigen.Allocation { return allocationJSON(al, true) })
	return c.JSON(apigen.AllocationPage{Items: items, NextCursor: next})
}

// AdminForceReleaseAllocation releases any allocation that is active or whose
// release failed.
func (a *API) AdminForceReleaseAllocation(c *fiber.Ctx, id apigen.AllocationID, _ apigen.AdminForceReleaseAllocationParams) error {
	if err := a.requireAdmin(c, "allocation.force_release"); err != nil {
		return err
	}
	var req apigen.ReasonRequest
	if len(c.Body()) > 0 {
		if err := DecodeStrict(c.Body(), &req); err != nil {
			return err
		}
	}
	reason := ""
	if req.Reason != nil {
		reason = *req.Reason
	}
	p := principal.From(c.UserContext())
	al, err := a.Allocations.ForceRelease(c.UserContext(), id, p.Actor(), reason)
	if err != nil {
		return err
	}
	return c.Status(fiber.StatusAccepted).JSON(allocationJSON(al, true))
}
