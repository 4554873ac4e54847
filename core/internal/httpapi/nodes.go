package httpapi

import (
	"encoding/json"
	"strings"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/gpuaas/gpuaas/core/internal/agents"
	"github.com/gpuaas/gpuaas/core/internal/audit"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/httpapi/apigen"
	"github.com/gpuaas/gpuaas/core/internal/inventory"
	"github.com/gpuaas/gpuaas/core/internal/policy"
)

func nodeJSON(n *inventory.Node) apigen.Node {
	out := apigen.Node{Id: n.ID, ProvisionerInstance: n.Instance, ExternalId: n.ExternalID, Hostname: n.Hostname, SshPort: n.SSHPort,
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
	out.HeartbeatAt = utcPtr(n.HeartbeatAt)
	if n.AgentFacts != nil {
		out.AgentFacts = &n.AgentFacts
	}
	return out
}

// AdminMintEnrollmentToken makes a single-use token for a node's agent.
func (a *API) AdminMintEnrollmentToken(c *fiber.Ctx, id apigen.NodeID) error {
	if err := a.requireAdmin(c, "node.enrollment_token"); err != nil {
		return err
	}
	var req apigen.EnrollmentTokenRequest
	if len(c.Body()) > 0 {
		if err := DecodeStrict(c.Body(), &req); err != nil {
			return err
		}
	}
	ttl := policy.EnrollmentTokenTTL.Value(c.UserContext(), a.Policy, policy.Target{})
	if req.TtlSeconds != nil {
		d := time.Duration(*req.TtlSeconds) * time.Second
		if d < time.Minute || d > 7*24*time.Hour {
			return errcode.New(errcode.ValidationFailed, "ttl_seconds must be between 60 and 604800").WithDetails("field", "ttl_seconds")
		}
		ttl = d
	}
	token, expires, err := a.Agents.MintToken(c.UserContext(), id, ttl)
	if err != nil {
		return err
	}
	return c.Status(fiber.StatusCreated).JSON(apigen.EnrollmentToken{Token: token, ExpiresAt: expires.UTC()})
}

// AdminGetInstanceNode returns a node by its provisioner instance's id for it.
func (a *API) AdminGetInstanceNode(c *fiber.Ctx, name apigen.PluginName, externalID apigen.ExternalID) error {
	if err := a.requireAdmin(c, "node.read"); err != nil {
		return err
	}
	id, err := a.Agents.NodeByExternal(c.UserContext(), name, externalID)
	if err != nil {
		return err
	}
	n, err := a.Inventory.Get(c.UserContext(), id)
	if err != nil {
		return err
	}
	return c.JSON(nodeJSON(n))
}

func nodeTaskJSON(t *agents.Task, instance, externalID string) apigen.NodeTask {
	out := apigen.NodeTask{Id: t.ID, NodeId: t.NodeID, ExternalId: externalID, Type: t.Type, State: apigen.NodeTaskState(t.State),
		Attempts: t.Attempts, Error: t.Error, OperationId: strings.TrimPrefix(t.OperationID, instance+"/"),
		ExpiresAt: t.ExpiresAt.UTC(), CreatedAt: t.CreatedAt.UTC(), UpdatedAt: t.UpdatedAt.UTC()}
	if len(t.Output) > 0 {
		var m map[string]any
		if json.Unmarshal(t.Output, &m) == nil {
			out.Output = &m
		}
	}
	return out
}

// AdminEnqueueNodeTask queues a signed task for a driver instance's node.
func (a *API) AdminEnqueueNodeTask(c *fiber.Ctx, name apigen.PluginName) error {
	if err := a.requireAdmin(c, "node.task"); err != nil {
		return err
	}
	var req apigen.EnqueueNodeTaskRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	tr := agents.TaskRequest{Type: string(req.Type), OperationID: req.OperationId, Params: map[string]any{}}
	if req.Params != nil {
		tr.Params = *req.Params
	}
	if req.TtlSeconds != nil {
		tr.TTL = time.Duration(*req.TtlSeconds) * time.Second
	}
	if req.MaxAttempts != nil {
		if *req.MaxAttempts < 1 || *req.MaxAttempts > 100 {
			return errcode.New(errcode.ValidationFailed, "max_attempts must be between 1 and 100").WithDetails("field", "max_attempts")
		}
		tr.MaxAttempts = *req.MaxAttempts
	}
	t, created, err := a.Agents.EnqueueForDriver(c.UserContext(), name, req.ExternalId, tr)
	if err != nil {
		return err
	}
	status := fiber.StatusOK
	if created {
		status = fiber.StatusCreated
	}
	return c.Status(status).JSON(nodeTaskJSON(t, name, req.ExternalId))
}

// AdminGetNodeTask returns a driver's task by its operation id.
func (a *API) AdminGetNodeTask(c *fiber.Ctx, name apigen.PluginName, operationID string) error {
	if err := a.requireAdmin(c, "node.task.read"); err != nil {
		return err
	}
	t, err := a.Agents.DriverTask(c.UserContext(), name, operationID)
	if err != nil {
		return err
	}
	var external string
	if err := a.Pool.QueryRow(c.UserContext(), `SELECT external_id FROM nodes WHERE id = $1`, t.NodeID).Scan(&external); err != nil {
		return err
	}
	return c.JSON(nodeTaskJSON(t, name, external))
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

// AdminUpdateNode changes a node's SKU, the port of its sshd, or both.
func (a *API) AdminUpdateNode(c *fiber.Ctx, id apigen.NodeID) error {
	if err := a.requireAdmin(c, "node.update"); err != nil {
		return err
	}
	var req apigen.UpdateNodeRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	n, err := a.Inventory.Update(c.UserContext(), id, inventory.Update{SKU: req.SkuId, SSHPort: req.SshPort})
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

// AdminRetireNode takes an idle node out for good and undoes its
// enrollment: the driver's Unenroll, and the agent's credentials (see
// inventory.Service.Retire). The retirement already has the agent
// listener refuse the agent's certificates, and its audit row counts them;
// revoking them at the CA too follows it, and a CA that fails then is
// logged and audited as a failure, not returned (the node is retired
// either way).
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
	ctx := c.UserContext()
	n, err := a.Inventory.Retire(ctx, id, reason)
	if err != nil {
		return err
	}
	if _, err := a.Agents.RevokeCertificates(ctx, id); err != nil {
		a.Log.Warn("the node is retired but revoking its agent certificates at the CA failed; the agent listener refuses them anyway",
			"node_id", id, "error", err)
		if aerr := audit.Record(ctx, a.Pool, audit.Entry{Action: "node.certificates_revoke", Target: a.Inventory.Target(id), Result: audit.Failure,
			Details: map[string]any{"error": err.Error()}}); aerr != nil {
			return aerr
		}
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

func taskKeyJSON(v *agents.TaskKeyVersions) apigen.TaskKey {
	out := apigen.TaskKey{Versions: v.Versions, LatestVersion: v.Latest, MinVersion: v.Min}
	if out.Versions == nil {
		out.Versions = []int{}
	}
	return out
}

// AdminGetTaskKey lists the versions of the task signing key.
func (a *API) AdminGetTaskKey(c *fiber.Ctx) error {
	if err := a.requireAdmin(c, "agent.task_key.read"); err != nil {
		return err
	}
	v, err := a.Agents.TaskKeyVersions(c.UserContext())
	if err != nil {
		return err
	}
	return c.JSON(taskKeyJSON(v))
}

// AdminRotateTaskKey adds a version to the task signing key (audited).
func (a *API) AdminRotateTaskKey(c *fiber.Ctx) error {
	if err := a.requireAdmin(c, "agent.task_key.rotate"); err != nil {
		return err
	}
	v, err := a.Agents.RotateTaskKey(c.UserContext())
	if err != nil {
		return err
	}
	return c.JSON(taskKeyJSON(v))
}
