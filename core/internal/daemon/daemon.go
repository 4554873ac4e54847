// Package daemon wires gpuaasd together: store, events, policy, Temporal and the HTTP
// API, and runs them until the context ends, then shuts down in order.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/worker"

	"github.com/gpuaas/gpuaas/core/internal/agents"
	"github.com/gpuaas/gpuaas/core/internal/allocations"
	"github.com/gpuaas/gpuaas/core/internal/authz"
	"github.com/gpuaas/gpuaas/core/internal/billing"
	"github.com/gpuaas/gpuaas/core/internal/catalog"
	"github.com/gpuaas/gpuaas/core/internal/config"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/events"
	"github.com/gpuaas/gpuaas/core/internal/httpapi"
	"github.com/gpuaas/gpuaas/core/internal/idempotency"
	"github.com/gpuaas/gpuaas/core/internal/identity"
	"github.com/gpuaas/gpuaas/core/internal/inventory"
	"github.com/gpuaas/gpuaas/core/internal/oidc"
	"github.com/gpuaas/gpuaas/core/internal/payments"
	"github.com/gpuaas/gpuaas/core/internal/pki"
	"github.com/gpuaas/gpuaas/core/internal/pluginhost"
	"github.com/gpuaas/gpuaas/core/internal/policy"
	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/ratelimit"
	"github.com/gpuaas/gpuaas/core/internal/sshkeys"
	"github.com/gpuaas/gpuaas/core/internal/storage"
	"github.com/gpuaas/gpuaas/core/internal/store"
	"github.com/gpuaas/gpuaas/core/internal/terminal"
	"github.com/gpuaas/gpuaas/sdk/base"
)

// Options are what Run needs besides the config.
type Options struct {
	Version string
	// Ready, when set, is called with the HTTP listen address once the API serves.
	Ready func(addr string)
	// Payments, when set, resolves payments drivers instead of the plugin host
	// (tests run a driver in-process).
	Payments payments.Providers
	// Provisioners, when set, resolves provisioner drivers instead of the
	// plugin host, and ProvisionerInstances lists the instances the inventory
	// reconciles (tests run drivers in-process).
	Provisioners         inventory.Provisioners
	ProvisionerInstances func(context.Context) ([]string, error)
	// Storage, when set, resolves storage drivers instead of the plugin host
	// (tests run a driver in-process or as a child process of their own).
	Storage storage.Drivers
}

// Run serves until ctx is done, then stops accepting, drains in-flight requests,
// stops background loops and closes every client. It returns nil after a clean stop.
func Run(ctx context.Context, cfg config.Config, log hclog.Logger, opt Options) error {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	pool, err := store.Open(ctx, cfg.DatabaseURL, store.Options{MaxConns: int32(cfg.DBMaxConns)})
	if err != nil {
		return err
	}
	defer pool.Close()
	if cfg.Migrate {
		if err := migrate(ctx, pool, log.Named("store")); err != nil {
			return err
		}
	}

	nc, err := nats.Connect(cfg.NATSURL,
		nats.Name("gpuaasd"),
		nats.RetryOnFailedConnect(true),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(250*time.Millisecond),
		nats.ReconnectJitter(100*time.Millisecond, time.Second),
	)
	if err != nil {
		return fmt.Errorf("nats: connect: %w", err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("nats: jetstream: %w", err)
	}

	tc, err := client.NewLazyClient(client.Options{
		HostPort:  cfg.TemporalAddress,
		Namespace: cfg.TemporalNamespace,
		Logger:    log.Named("temporal"),
	})
	if err != nil {
		return fmt.Errorf("temporal: client: %w", err)
	}
	defer tc.Close()

	pol := policy.NewService(pool, log.Named("policy"))
	relay := events.NewRelay(pool, nc, js, log.Named("outbox"), reg, events.RelayOptions{
		MaxAttempts: func(ctx context.Context) int {
			return int(policy.OutboxMaxAttempts.Value(ctx, pol, policy.Target{}))
		},
		Retention: func(ctx context.Context) time.Duration {
			return policy.OutboxRetention.Value(ctx, pol, policy.Target{})
		},
	})

	trust, err := openTrust(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer func() { _ = trust.Close() }()
	plugins, err := pluginhost.New(pool, trust.Keys, pluginhost.WithLogger(log.Named("plugins")), pluginhost.WithRegisterer(reg), pluginhost.WithRegion(cfg.Region))
	if err != nil {
		return fmt.Errorf("plugin host: %w", err)
	}
	defer func() { _ = plugins.Close() }()
	var providers payments.Providers = plugins
	if opt.Payments != nil {
		providers = opt.Payments
	}
	var stores storage.Drivers = plugins
	if opt.Storage != nil {
		stores = opt.Storage
	}
	objects := storage.NewService(pool, pol, stores, cfg.Region, cfg.StorageInstance, log.Named("storage"),
		storage.WithRegisterer(reg), storage.WithTransferTimeout(cfg.StorageTransferTimeout),
		storage.WithDirectTransfers(cfg.StorageDirect))

	var drivers inventory.Provisioners = plugins
	listInstances := func(ctx context.Context) ([]string, error) {
		insts, err := plugins.Instances(ctx)
		var names []string
		for _, i := range insts {
			if i.Kind == base.KindProvisioner && i.Enabled && i.PluginEnabled {
				names = append(names, i.Name)
			}
		}
		return names, err
	}
	if opt.Provisioners != nil {
		drivers, listInstances = opt.Provisioners, opt.ProvisionerInstances
	}
	nodes := inventory.NewService(pool, cfg.Region, drivers, log.Named("inventory"))
	allocs := allocations.NewService(pool, pol, cfg.Region, log.Named("allocations"))
	allocMetrics := allocations.NewMetrics(reg, pool)

	agentSvc := agents.NewService(pool, trust.CA, trust.Signer, cfg.Region, agents.Settings{SSHCA: trust.SSH,
		MinTaskKeyVersion: func(ctx context.Context) int { return int(policy.TaskKeyMinVersion.Value(ctx, pol, policy.Target{})) }}, log.Named("agents"))
	ids := identity.NewService(pool, cfg.Region, log.Named("identity"), nil)
	var verifier identity.TokenVerifier
	var flow httpapi.OIDCFlow
	if cfg.OIDC.Issuer != "" {
		v, err := oidc.NewVerifier(ctx, oidc.Config{IssuerURL: cfg.OIDC.Issuer, Audience: cfg.OIDC.Audience,
			ClientID: cfg.OIDC.ClientID, ClientSecret: oidc.Secret(cfg.OIDC.ClientSecret), RedirectURL: cfg.OIDC.RedirectURL})
		if err != nil {
			return fmt.Errorf("oidc: %w", err)
		}
		p := oidcProvider{v: v}
		verifier, flow = p, p
	}
	auth := identity.NewAuthenticator(ids, verifier, reg)
	term := newTerminal(pool, trust, pol, cfg, log, reg)
	api := &httpapi.API{
		Version:       opt.Version,
		Gatherer:      reg,
		Log:           log.Named("http"),
		Pool:          pool,
		Policy:        pol,
		Identity:      ids,
		Auth:          auth,
		Authz:         authz.NewLoader(pool),
		Payments:      payments.NewService(pool, pol, providers, cfg.Region, cfg.PaymentsInstance, log.Named("payments")),
		Plugins:       plugins,
		SSHKeys:       sshkeys.NewService(pool, cfg.Region),
		Catalog:       catalog.NewService(pool, cfg.Region),
		Inventory:     nodes,
		Allocations:   allocs,
		Storage:       objects,
		Agents:        agentSvc,
		Terminal:      term,
		LocalAccounts: cfg.LocalAccounts,
		OIDC:          flow,
		Checks: []httpapi.Check{
			{Name: "postgres", Fn: pool.Ping},
			{Name: "nats", Fn: func(ctx context.Context) error {
				if !nc.IsConnected() {
					return fmt.Errorf("not connected (%s)", nc.Status())
				}
				return nc.FlushWithContext(ctx)
			}},
			{Name: "temporal", Fn: func(ctx context.Context) error {
				_, err := tc.CheckHealth(ctx, &client.CheckHealthRequest{})
				return err
			}},
		},
	}
	idem := idempotency.New(pool,
		idempotency.WithTTL(func(ctx context.Context) time.Duration { return policy.IdempotencyTTL.Value(ctx, pol, policy.Target{}) }),
		idempotency.WithLogger(log.Named("idempotency")),
		idempotency.WithRegisterer(reg),
		idempotency.WithErrorWriter(httpapi.ErrorWriter(log.Named("http"))),
		idempotency.WithLease(cfg.RequestTimeout+time.Minute),
	)
	limiter := ratelimit.New(pool, ratelimit.WithRegisterer(reg), ratelimit.WithLogger(log.Named("ratelimit")))
	app := httpapi.New(log.Named("http"), api, httpapi.Options{
		BeforeAuth:   []fiber.Handler{limitRequests(limiter, pol)},
		MaxBodyBytes: cfg.MaxBodyBytes,
		RawBody: func(path string) bool {
			return strings.HasPrefix(path, "/api/v1/payments/webhook/") || strings.HasPrefix(path, "/api/v1/webhooks/")
		},
		StreamBody:     func(path string) bool { return path == httpapi.StorageUploadPath },
		StreamTimeout:  cfg.StorageTransferTimeout,
		RequestTimeout: cfg.RequestTimeout,
		Registerer:     reg,
		AfterAuth:      []fiber.Handler{idem.Middleware(principalActor)},
		Terminal:       term.Handler(),
	})
	var agentSrv *http.Server
	agentCtx, stopAgents := context.WithCancel(context.WithoutCancel(ctx))
	defer stopAgents()
	if cfg.AgentListenAddr != "" {
		host, _, _ := net.SplitHostPort(cfg.AgentListenAddr)
		cert, _, err := agents.ServerCertificate(cfg.AgentTLSCert, cfg.AgentTLSKey, filepath.Join(cfg.StateDir, "agents"), []string{host, "localhost", "127.0.0.1"})
		if err != nil {
			return err
		}
		chain, err := trust.CA.CAChain(ctx)
		if err != nil {
			return fmt.Errorf("agents: CA chain: %w", err)
		}
		tlsCfg, err := agents.TLSConfig(cert, chain)
		if err != nil {
			return err
		}
		aln, err := net.Listen("tcp", cfg.AgentListenAddr)
		if err != nil {
			return fmt.Errorf("agents: listen on %s: %w", cfg.AgentListenAddr, err)
		}
		agentSrv = &http.Server{Handler: agentSvc.Handler(pki.NewRevocationChecker(trust.CA)), TLSConfig: tlsCfg,
			ReadHeaderTimeout: 10 * time.Second, BaseContext: func(net.Listener) context.Context { return agentCtx }, ErrorLog: log.Named("agents").StandardLogger(&hclog.StandardLoggerOptions{InferLevels: true})}
		go func() {
			if err := agentSrv.ServeTLS(aln, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("agent listener stopped", "error", err)
			}
		}()
		log.Info("serving the agent protocol", "addr", aln.Addr().String())
	}

	ln, err := net.Listen("tcp", cfg.ListenAddr)
	if err != nil {
		return fmt.Errorf("http: listen on %s: %w", cfg.ListenAddr, err)
	}

	bg, stopBG := context.WithCancel(context.WithoutCancel(ctx))
	var wg sync.WaitGroup
	wg.Go(func() { declareStreams(bg, js, log.Named("events")) })
	wg.Go(func() { _ = relay.Run(bg) })
	wg.Go(func() { events.NewNotifier(pool, log.Named("outbox")).Run(bg) })
	wg.Go(func() { _ = pol.Listen(bg, js) })
	wg.Go(func() { auth.Run(bg, js, 30*time.Second) })
	wg.Go(func() { _ = idem.Run(bg) })
	wg.Go(func() { _ = limiter.Run(bg) })
	wg.Go(func() { agentSvc.Run(bg) })
	wg.Go(func() { term.Run(bg) })
	if cfg.Workers {
		wg.Go(func() { runWorkers(bg, cfg, tc, pool, pol, js, log.Named("worker")) })
		wg.Go(func() { objects.Run(bg) })
		wg.Go(func() {
			runProvisioning(bg, cfg, tc, pool, pol, js, &allocations.Activities{Pool: pool, Policy: pol, Drivers: drivers, Service: allocs,
				Log: log.Named("provisioning"), Metrics: allocMetrics,
				SSHUserCAKeys: agentSvc.SSHUserCAKeys}, log.Named("provisioning"))
		})
		wg.Go(func() {
			nodes.SyncLoop(bg, func(ctx context.Context) time.Duration {
				return policy.InventorySyncInterval.Value(ctx, pol, policy.Target{})
			},
				listInstances)
		})
	}
	wg.Go(func() {
		if err := plugins.Start(bg); err != nil && bg.Err() == nil {
			log.Error("plugin host did not start", "error", err)
		}
	})

	start, runErr := serve(ctx, app, ln, cfg, log, opt, "serving")
	if agentSrv != nil {
		sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
		stopAgents() // ends the long polls
		_ = agentSrv.Shutdown(sctx)
		cancel()
	}
	stopBG()
	wg.Wait()
	if err := nc.Drain(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
		log.Debug("nats drain", "error", err)
	}
	log.Info("stopped", "took", time.Since(start).Round(time.Millisecond))
	return runErr
}

// serve serves app on ln until ctx ends or serving fails, then drains it
// for at most the shutdown timeout. It returns when the shutdown began and
// why serving ended (nil for ctx).
func serve(ctx context.Context, app *fiber.App, ln net.Listener, cfg config.Config, log hclog.Logger, opt Options, what string) (time.Time, error) {
	serveErr := make(chan error, 1)
	go func() { serveErr <- app.Listener(ln) }()
	log.Info(what, "addr", ln.Addr().String(), "version", opt.Version)
	if opt.Ready != nil {
		opt.Ready(ln.Addr().String())
	}
	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-serveErr:
		runErr = fmt.Errorf("http: serve: %w", runErr)
	}
	log.Info("shutting down", "timeout", cfg.ShutdownTimeout)
	start := time.Now()
	if err := app.ShutdownWithTimeout(cfg.ShutdownTimeout); err != nil {
		log.Warn("http shutdown did not drain in time", "error", err)
	}
	return start, runErr
}

// openTrust opens the configured PKI/KMS backend.
func openTrust(ctx context.Context, cfg config.Config, log hclog.Logger) (*pki.Backend, error) {
	trust, err := pki.Open(ctx, pki.Config{
		Backend:  cfg.PKI.Backend,
		StateDir: cfg.StateDir,
		Vault: pki.VaultConfig{
			Addr: cfg.PKI.VaultAddr, Token: cfg.PKI.VaultToken, RoleID: cfg.PKI.VaultRoleID, SecretID: cfg.PKI.VaultSecretID,
			AppRoleMount: cfg.PKI.VaultAppRoleMount, PKIMount: cfg.PKI.VaultPKIMount, PKIRole: cfg.PKI.VaultPKIRole,
			TransitMount: cfg.PKI.VaultTransitMount, DataKey: cfg.PKI.VaultDataKey,
			SSHMount: cfg.PKI.VaultSSHMount, SSHRole: cfg.PKI.VaultSSHRole,
		},
	}, pki.WithLogger(log.Named("pki")))
	if err != nil {
		return nil, fmt.Errorf("pki/kms backend %s: %w (check GPUAAS_STATE_DIR, or the Vault settings)", cfg.PKI.Backend, err)
	}
	return trust, nil
}

// newTerminal is the browser terminal of this process: tokens and session
// slots in pool, certificates of the backend's SSH CA, limits from policy.
func newTerminal(pool *pgxpool.Pool, trust *pki.Backend, pol *policy.Service, cfg config.Config, log hclog.Logger,
	reg prometheus.Registerer) *terminal.Service {
	return terminal.NewService(pool, trust.SSH, terminal.PolicyLimits(pol), cfg.Region,
		terminal.WithLogger(log.Named("terminal")), terminal.WithRegisterer(reg), terminal.WithAllowedOrigins(cfg.TerminalOrigins))
}

// limitRequests is the rate limiter middleware (see rateKey).
func limitRequests(limiter *ratelimit.Limiter, pol *policy.Service) fiber.Handler {
	return ratelimit.Middleware(limiter, rateKey(pol), func(c *fiber.Ctx, d ratelimit.Decision) error {
		return errcode.New(errcode.RateLimited, "too many requests; retry in %s", d.RetryAfter.Round(time.Second)).
			WithDetails("retry_after_seconds", int(d.RetryAfter.Seconds()+0.999))
	})
}

// probes are not rate limited: load balancers and monitors call them from few
// addresses, often.
var probes = map[string]bool{"/api/v1/healthz": true, "/api/v1/readyz": true, "/metrics": true}

// rateKey limits each principal by ratelimit.requests_per_minute (scoped to a
// service account's org and project), and anonymous or failed callers by address
// with ratelimit.anonymous_requests_per_minute.
func rateKey(pol *policy.Service) func(*fiber.Ctx) (string, ratelimit.Limit, bool) {
	return func(c *fiber.Ctx) (string, ratelimit.Limit, bool) {
		if probes[c.Path()] {
			return "", ratelimit.Limit{}, false
		}
		ctx := c.UserContext()
		if p := httpapi.PrincipalOf(c); p != nil {
			t := policy.Target{}
			if p.Type == principal.ServiceAccount {
				t = policy.Target{OrgID: p.OrgID.String(), ProjectID: p.ProjectID.String()}
			}
			n := policy.RateLimitPerPrincipal.Value(ctx, pol, t)
			return "p:" + p.Actor(), ratelimit.Limit{Requests: int(n), Window: time.Minute}, true
		}
		n := policy.RateLimitPerIP.Value(ctx, pol, policy.Target{})
		return "ip:" + c.IP(), ratelimit.Limit{Requests: int(n), Window: time.Minute}, true
	}
}

// principalActor scopes idempotency keys by principal ("" for anonymous calls,
// which bypass idempotency).
func principalActor(c *fiber.Ctx) string {
	if p := httpapi.PrincipalOf(c); p != nil {
		return p.Actor()
	}
	return ""
}

// runWorkers runs the Temporal worker of this instance's workflows and keeps the
// billing schedule in place, retrying while Temporal is away, until ctx is done.
func runWorkers(ctx context.Context, cfg config.Config, tc client.Client, pool *pgxpool.Pool, pol *policy.Service, js jetstream.JetStream, log hclog.Logger) {
	w := worker.New(tc, billing.TaskQueue(cfg.TaskQueue), worker.Options{})
	billing.Register(w, &billing.Activities{Pool: pool, Policy: pol})
	for {
		err := w.Start()
		if err == nil {
			break
		}
		log.Warn("temporal worker did not start; retrying", "error", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(2 * time.Second):
		}
	}
	defer w.Stop()
	go keep(ctx, log.Named("depletion"), func(ctx context.Context) error {
		return billing.FollowDepletions(ctx, pool, js, tc, cfg.TaskQueue, log.Named("depletion"))
	})
	for {
		every := policy.BillingWindow.Value(ctx, pol, policy.Target{})
		if err := billing.EnsureSchedule(ctx, tc, cfg.TaskQueue, every); err != nil {
			log.Warn("billing schedule", "error", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Minute):
		}
	}
}

// runProvisioning runs the Temporal worker of the provisioning workflows, the
// consumers that start them and release depleted orgs, and the reconciler of
// stranded allocations, until ctx is done.
func runProvisioning(ctx context.Context, cfg config.Config, tc client.Client, pool *pgxpool.Pool, pol *policy.Service,
	js jetstream.JetStream, acts *allocations.Activities, log hclog.Logger) {
	w := worker.New(tc, allocations.TaskQueue(cfg.TaskQueue), worker.Options{})
	allocations.Register(w, acts)
	for {
		err := w.Start()
		if err == nil {
			break
		}
		log.Warn("temporal worker did not start; retrying", "error", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(2 * time.Second):
		}
	}
	defer w.Stop()
	starter := &allocations.Starter{Temporal: tc, Prefix: cfg.TaskQueue}
	var wg sync.WaitGroup
	wg.Go(func() {
		keep(ctx, log.Named("requests"), func(ctx context.Context) error {
			return allocations.FollowRequests(ctx, pool, js, starter, log.Named("requests"))
		})
	})
	wg.Go(func() {
		keep(ctx, log.Named("auto-release"), func(ctx context.Context) error {
			return allocations.FollowAutoReleases(ctx, pool, js, acts.Service, log.Named("auto-release"))
		})
	})
	wg.Go(func() {
		(&allocations.Reconciler{Pool: pool, Policy: pol, Starter: starter, Log: log.Named("reconciler")}).Run(ctx)
	})
	wg.Wait()
}

// keep runs a consumer until ctx is done, starting it again a second after it
// fails (its stream may not be declared yet, or NATS may be away).
func keep(ctx context.Context, log hclog.Logger, run func(context.Context) error) {
	for ctx.Err() == nil {
		if err := run(ctx); err != nil && ctx.Err() == nil {
			log.Warn("consumer stopped; restarting", "error", err)
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

// migrate applies migrations, waiting for the database for up to a minute so the
// core may start before Postgres does.
func migrate(ctx context.Context, pool *pgxpool.Pool, log hclog.Logger) error {
	deadline := time.Now().Add(time.Minute)
	for {
		applied, err := store.Migrate(ctx, pool)
		if err == nil {
			if len(applied) > 0 {
				log.Info("migrations applied", "versions", applied)
			}
			return nil
		}
		if !store.Unavailable(err) || time.Now().After(deadline) {
			return err
		}
		log.Warn("database unavailable; retrying migrations", "error", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

// declareStreams declares the catalog, retrying while NATS is away.
func declareStreams(ctx context.Context, js jetstream.JetStream, log hclog.Logger) {
	for {
		err := events.Declare(ctx, js, events.Streams(), events.Consumers())
		if err == nil {
			log.Debug("streams declared")
			return
		}
		log.Warn("declaring streams failed; retrying", "error", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Second):
		}
	}
}
