package httpapi

import (
	"context"
	"sort"
	"sync"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/gofiber/fiber/v2/middleware/adaptor"
	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/gpuaas/gpuaas/core/internal/agents"
	"github.com/gpuaas/gpuaas/core/internal/allocations"
	"github.com/gpuaas/gpuaas/core/internal/authz"
	"github.com/gpuaas/gpuaas/core/internal/catalog"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/httpapi/apigen"
	"github.com/gpuaas/gpuaas/core/internal/identity"
	"github.com/gpuaas/gpuaas/core/internal/inventory"
	"github.com/gpuaas/gpuaas/core/internal/payments"
	"github.com/gpuaas/gpuaas/core/internal/policy"
	"github.com/gpuaas/gpuaas/core/internal/sshkeys"
	"github.com/gpuaas/gpuaas/core/internal/storage"
	"github.com/gpuaas/gpuaas/core/internal/terminal"
)

// Check probes one dependency for readyz.
type Check struct {
	Name string
	Fn   func(ctx context.Context) error
}

// checkTimeout bounds each readiness probe so readyz answers within 2 s even when a
// dependency hangs.
const checkTimeout = 1500 * time.Millisecond

// API serves the routes of api/openapi.yaml.
type API struct {
	Version  string
	Checks   []Check
	Gatherer prometheus.Gatherer
	Log      hclog.Logger
	Pool     *pgxpool.Pool
	Policy   *policy.Service
	Identity *identity.Service
	Auth     *identity.Authenticator
	Authz    *authz.Loader
	Payments *payments.Service
	SSHKeys  *sshkeys.Service
	Catalog  *catalog.Service
	// Inventory keeps the nodes; Allocations rents them.
	Inventory   *inventory.Service
	Allocations *allocations.Service
	// Storage is project storage (nil: its routes answer 503).
	Storage *storage.Service
	// Agents is the node agent side (enrollment tokens, the driver task API).
	Agents *agents.Service
	// Terminal mints browser terminal tokens (nil: the route answers 503).
	Terminal *terminal.Service
	// Plugins is the plugin host (nil when it is not running).
	Plugins PluginHost
	// OIDC is nil when no identity provider is configured.
	OIDC OIDCFlow
	// LocalAccounts enables password sign-in of local accounts.
	LocalAccounts bool

	metricsOnce sync.Once
	metrics     fiber.Handler
}

var _ apigen.ServerInterface = (*API)(nil)

// GetHealthz answers while the process is up.
func (a *API) GetHealthz(c *fiber.Ctx) error {
	return c.JSON(apigen.Health{Status: apigen.Ok, Version: a.Version})
}

// GetReadyz probes every dependency concurrently.
func (a *API) GetReadyz(c *fiber.Ctx) error {
	results := make([]apigen.DependencyCheck, len(a.Checks))
	var wg sync.WaitGroup
	for i, chk := range a.Checks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(c.UserContext(), checkTimeout)
			defer cancel()
			start := time.Now()
			err := chk.Fn(ctx)
			r := apigen.DependencyCheck{Name: apigen.DependencyCheckName(chk.Name), Ok: err == nil, DurationMs: float32(time.Since(start).Microseconds()) / 1000}
			if err != nil {
				msg := err.Error()
				r.Error = &msg
			}
			results[i] = r
		}()
	}
	wg.Wait()
	var failing []string
	for _, r := range results {
		if !r.Ok {
			failing = append(failing, string(r.Name))
		}
	}
	if len(failing) > 0 {
		return errcode.New(errcode.NotReady, "not ready: %v unreachable", failing).
			WithDetails("failing", failing).WithDetails("checks", results)
	}
	return c.JSON(apigen.Readiness{Status: apigen.Ready, Checks: results})
}

// GetMetrics serves Prometheus metrics.
func (a *API) GetMetrics(c *fiber.Ctx) error {
	a.metricsOnce.Do(func() {
		a.metrics = adaptor.HTTPHandler(promhttp.HandlerFor(a.Gatherer, promhttp.HandlerOpts{}))
	})
	return a.metrics(c)
}

// ListPolicyKeys lists the policy catalog, sorted by key, paginated.
func (a *API) ListPolicyKeys(c *fiber.Ctx, params apigen.ListPolicyKeysParams) error {
	limit, err := Limit(params.Limit)
	if err != nil {
		return err
	}
	var after string
	if _, err := DecodeCursor(params.Cursor, &after); err != nil {
		return err
	}
	defs := policy.Catalog()
	sort.Slice(defs, func(i, j int) bool { return defs[i].Key < defs[j].Key })
	first := sort.Search(len(defs), func(i int) bool { return defs[i].Key > after })
	defs = defs[first:min(len(defs), first+limit+1)]
	items, next := Page(defs, limit, func(d *policy.Def) any { return d.Key }, policyKeyJSON)
	return c.JSON(apigen.PolicyKeyPage{Items: items, NextCursor: next})
}

func policyKeyJSON(d *policy.Def) apigen.PolicyKey {
	scopes := make([]apigen.PolicyKeyScopes, len(d.Scopes))
	for i, s := range d.Scopes {
		scopes[i] = apigen.PolicyKeyScopes(s)
	}
	return apigen.PolicyKey{Key: d.Key, Type: apigen.PolicyKeyType(d.Type), Default: d.DefaultJSON(), Scopes: scopes, Description: d.Description}
}
