package httpapi

import (
	"github.com/gofiber/fiber/v2"

	"github.com/gpuaas/gpuaas/core/internal/audit"
	"github.com/gpuaas/gpuaas/core/internal/httpapi/apigen"
	"github.com/gpuaas/gpuaas/core/internal/inventory"
)

func nodeJSON(n *inventory.Node) apigen.Node {
	out := apigen.Node{Id: n.ID, ProvisionerInstance: n.Instance, ExternalId: n.ExternalID, Hostname: n.Hostname,
		State: apigen.NodeState(n.State), StateReason: n.StateReason, Gpus: make([]apigen.NodeGPU, 0, len(n.Facts.GPUs)),
		CpuCores: n.Facts.CPUCores, MemoryBytes: int64(n.Facts.MemoryBytes), DiskBytes: int64(n.Facts.DiskBytes),
		Pool: n.Pool, Tags: n.Tags, Healthy: n.Healthy, ProbedAt: utcPtr(n.ProbedAt), CreatedAt: n.CreatedAt.UTC(), UpdatedAt: n.UpdatedAt.UTC()}
	for _, g := range n.Facts.GPUs {
		gpu := apigen.NodeGPU{Model: g.Model, Count: g.Count}
		if g.MemoryBytes > 0 {
			m := int64(g.MemoryBytes)
			gpu.MemoryBytes = &m
		}
		out.Gpus = append(out.Gpus, gpu)
	}
	if out.Tags == nil {
		out.Tags = []string{}
	}
	if n.SKU != "" {
		out.SkuId = &n.SKU
	}
	if n.OfflineFrom != "" {
		s := apigen.NodeState(n.OfflineFrom)
		out.OfflineFrom = &s
	}
	if n.Facts.CPUModel != "" {
		out.CpuModel = &n.Facts.CPUModel
	}
	if n.HealthMsg != "" {
		out.HealthMessage = &n.HealthMsg
	}
	return out
}

// GetCapacity counts the free nodes of every active SKU.
func (a *API) GetCapacity(c *fiber.Ctx) error {
	cs, err := a.Inventory.Capacity(c.UserContext())
	if err != nil {
		return err
	}
	items := make([]apigen.Capacity, len(cs))
	for i, k := range cs {
		items[i] = apigen.Capacity{SkuId: k.SKU, GpuModel: k.GPUModel, GpusPerNode: k.GPUs, Available: k.Available}
	}
	return c.JSON(apigen.CapacityList{Items: items})
}

// AdminListNodes lists the inventory.
func (a *API) AdminListNodes(c *fiber.Ctx, params apigen.AdminListNodesParams) error {
	if err := a.requireAdmin(c, "node.read"); err != nil {
		return err
	}
	limit, after, err := pageArgs(params.Limit, params.Cursor)
	if err != nil {
		return err
	}
	f := inventory.Filter{After: after, Limit: limit}
	if params.State != nil {
		f.State = inventory.State(*params.State)
	}
	if params.SkuId != nil {
		f.SKU = *params.SkuId
	}
	if params.ProvisionerInstance != nil {
		f.Instance = *params.ProvisionerInstance
	}
	ns, err := a.Inventory.List(c.UserContext(), f)
	if err != nil {
		return err
	}
	items, next := Page(ns, limit, func(n *inventory.Node) any { return n.ID }, nodeJSON)
	return c.JSON(apigen.NodePage{Items: items, NextCursor: next})
}

// AdminRegisterNode enrolls a node through its provisioner instance.
func (a *API) AdminRegisterNode(c *fiber.Ctx, _ apigen.AdminRegisterNodeParams) error {
	if err := a.requireAdmin(c, "node.register"); err != nil {
		return err
	}
	var req apigen.RegisterNodeRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	r := inventory.RegisterRequest{Instance: req.ProvisionerInstance, ExternalID: req.ExternalId}
	if req.SkuId != nil {
		r.SKU = *req.SkuId
	}
	if req.Pool != nil {
		r.Pool = *req.Pool
	}
	if req.Tags != nil {
		r.Tags = *req.Tags
	}
	n, err := a.Inventory.Register(c.UserContext(), r)
	if err != nil {
		return err
	}
	return c.Status(fiber.StatusCreated).JSON(nodeJSON(n))
}

// AdminGetNode returns a node.
func (a *API) AdminGetNode(c *fiber.Ctx, id apigen.NodeID) error {
	if err := a.requireAdmin(c, "node.read"); err != nil {
		return err
	}
	n, err := a.Inventory.Get(c.UserContext(), id)
	if err != nil {
		return err
	}
	return c.JSON(nodeJSON(n))
}

// AdminUpdateNode assigns a node's SKU.
func (a *API) AdminUpdateNode(c *fiber.Ctx, id apigen.NodeID) error {
	if err := a.requireAdmin(c, "node.update"); err != nil {
		return err
	}
	var req apigen.UpdateNodeRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	n, err := a.Inventory.AssignSKU(c.UserContext(), id, req.SkuId)
	if err != nil {
		return err
	}
	return c.JSON(nodeJSON(n))
}

// AdminProbeNode asks the node's driver for its health.
func (a *API) AdminProbeNode(c *fiber.Ctx, id apigen.NodeID) error {
	if err := a.requireAdmin(c, "node.probe"); err != nil {
		return err
	}
	n, err := a.Inventory.Probe(c.UserContext(), id)
	if err != nil {
		return err
	}
	return c.JSON(nodeJSON(n))
}

// AdminRetireNode takes an idle node out for good.
func (a *API) AdminRetireNode(c *fiber.Ctx, id apigen.NodeID) error {
	if err := a.requireAdmin(c, "node.retire"); err != nil {
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
	n, err := a.Inventory.Retire(c.UserContext(), id, reason)
	if err != nil {
		return err
	}
	return c.JSON(nodeJSON(n))
}

// AdminSyncInstanceNodes reconciles the inventory with a provisioner backend.
func (a *API) AdminSyncInstanceNodes(c *fiber.Ctx, name apigen.PluginName) error {
	if err := a.requireAdmin(c, "node.sync"); err != nil {
		return err
	}
	res, err := a.Inventory.Reconcile(c.UserContext(), name)
	if err != nil {
		return err
	}
	if err := audit.Record(c.UserContext(), a.Pool, audit.Entry{Action: "node.sync", Target: a.Identity.IDs().Platform("plugin_instance", name),
		Details: map[string]any{"seen": res.Seen, "added": res.Added, "offline": res.Offline, "recovered": res.Recovered}}); err != nil {
		return err
	}
	return c.JSON(apigen.NodeSyncResult{Seen: res.Seen, Added: res.Added, Offline: res.Offline, Recovered: res.Recovered})
}

// MaasWebhook hands a MAAS commissioning report to the instance's driver.
func (a *API) MaasWebhook(c *fiber.Ctx, instance string) error {
	header := map[string][]string{}
	c.Request().Header.VisitAll(func(k, v []byte) { header[string(k)] = append(header[string(k)], string(v)) })
	body := append([]byte(nil), c.Body()...)
	n, err := a.Inventory.HandleWebhook(c.UserContext(), instance, body, header)
	if err != nil {
		return err
	}
	return c.JSON(apigen.NodeWebhookReceipt{Events: n})
}
