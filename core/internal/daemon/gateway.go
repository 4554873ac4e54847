package daemon

import (
	"context"
	"fmt"
	"net"
	"sync"

	"github.com/gofiber/fiber/v2"
	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/gpuaas/gpuaas/core/internal/config"
	"github.com/gpuaas/gpuaas/core/internal/httpapi"
	"github.com/gpuaas/gpuaas/core/internal/policy"
	"github.com/gpuaas/gpuaas/core/internal/ratelimit"
	"github.com/gpuaas/gpuaas/core/internal/store"
)

// RunTerminalGateway serves the browser terminal alone (gpuaasd
// terminal-gateway): the WebSocket endpoint, /api/v1/healthz, /api/v1/readyz
// and /metrics, with Postgres and the PKI backend. Tokens minted by the API
// and the per-principal session count are shared through Postgres. Of opt,
// only Version and Ready apply. At shutdown the sessions close with 1001.
func RunTerminalGateway(ctx context.Context, cfg config.Config, log hclog.Logger, opt Options) error {
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
	trust, err := openTrust(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer func() { _ = trust.Close() }()
	// Without NATS, policy changes reach this process when its cache
	// expires (a minute).
	pol := policy.NewService(pool, log.Named("policy"))
	term := newTerminal(pool, trust, pol, cfg, log, reg)
	limiter := ratelimit.New(pool, ratelimit.WithRegisterer(reg), ratelimit.WithLogger(log.Named("ratelimit")))
	api := &httpapi.API{Version: opt.Version, Gatherer: reg, Log: log.Named("http"), Pool: pool,
		Checks: []httpapi.Check{{Name: "postgres", Fn: pool.Ping}}}
	app := httpapi.NewGateway(log.Named("http"), api, httpapi.Options{
		BeforeAuth:     []fiber.Handler{limitRequests(limiter, pol)},
		MaxBodyBytes:   cfg.MaxBodyBytes,
		RequestTimeout: cfg.RequestTimeout,
		Registerer:     reg,
		Terminal:       term.Handler(),
	})

	ln, err := net.Listen("tcp", cfg.ListenAddr)
	if err != nil {
		return fmt.Errorf("http: listen on %s: %w", cfg.ListenAddr, err)
	}
	bg, stopBG := context.WithCancel(context.WithoutCancel(ctx))
	var wg sync.WaitGroup
	wg.Go(func() { _ = limiter.Run(bg) })
	wg.Go(func() { term.Run(bg) })
	_, runErr := serve(ctx, app, ln, cfg, log, opt, "serving the terminal gateway")
	stopBG()
	wg.Wait()
	log.Info("stopped")
	return runErr
}
