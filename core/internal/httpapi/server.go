// Package httpapi is the core's REST surface: the Fiber app, its middleware chain,
// the error envelope and the handlers of the routes in api/openapi.yaml.
package httpapi

import (
	"slices"
	"strings"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/gpuaas/gpuaas/core/internal/httpapi/apigen"
	"github.com/gpuaas/gpuaas/core/internal/terminal"
)

// Options configure the app.
type Options struct {
	MaxBodyBytes   int
	RequestTimeout time.Duration
	// RawBody reports routes that take a non-JSON body (exempt from the 415 check).
	RawBody func(path string) bool
	// StreamBody reports routes whose handler reads the request body as a
	// stream (storage uploads): exempt from MaxBodyBytes and the 415 check,
	// with StreamTimeout instead of RequestTimeout as their deadline. Every
	// other body is read whole, up to MaxBodyBytes, before the route runs.
	StreamBody    func(path string) bool
	StreamTimeout time.Duration
	// Registerer receives the HTTP metrics; Gatherer serves /metrics.
	Registerer prometheus.Registerer
	Gatherer   prometheus.Gatherer
	// BeforeAuth run after the bearer is resolved but before unauthenticated
	// requests are refused (the rate limiter: it sees the principal, or the
	// address of a failed or anonymous attempt).
	BeforeAuth []fiber.Handler
	// AfterAuth run on authenticated (or public) requests before the route
	// (idempotency).
	AfterAuth []fiber.Handler
	// Terminal, when set, serves terminal.Route (the browser terminal's
	// WebSocket) ahead of authentication: its single-use token is the
	// credential, not a bearer API token. BeforeAuth runs first.
	Terminal fiber.Handler
}

// New builds the Fiber app with the middleware chain, every route of the
// contract served by h and, with opt.Terminal, the browser terminal.
func New(log hclog.Logger, h *API, opt Options) *fiber.App {
	app := newApp(log, opt)
	if opt.Terminal != nil {
		mountTerminal(app, opt)
	}
	public, err := publicRoutes()
	if err != nil {
		panic(err) // the embedded contract is part of the binary
	}
	app.Use(h.authenticate())
	for _, mw := range opt.BeforeAuth {
		app.Use(mw)
	}
	app.Use(requireAuth(public))
	for _, mw := range opt.AfterAuth {
		app.Use(mw)
	}
	apigen.RegisterHandlers(app, h)
	return app
}

// NewGateway builds the terminal gateway's app: the same middleware chain
// serving only the browser terminal (opt.Terminal), the probes and the
// metrics of h.
func NewGateway(log hclog.Logger, h *API, opt Options) *fiber.App {
	app := newApp(log, opt)
	mountTerminal(app, opt)
	app.Get("/api/v1/healthz", h.GetHealthz)
	app.Get("/api/v1/readyz", h.GetReadyz)
	app.Get("/metrics", h.GetMetrics)
	return app
}

func mountTerminal(app *fiber.App, opt Options) {
	app.Get(terminal.Route, append(slices.Clone(opt.BeforeAuth), opt.Terminal)...)
}

// newApp is the Fiber app with the middleware every request goes through.
func newApp(log hclog.Logger, opt Options) *fiber.App {
	if opt.MaxBodyBytes <= 0 {
		opt.MaxBodyBytes = 1 << 20
	}
	if opt.RequestTimeout <= 0 {
		opt.RequestTimeout = 30 * time.Second
	}
	if opt.StreamBody == nil {
		opt.StreamBody = func(string) bool { return false }
	}
	if opt.StreamTimeout <= 0 {
		opt.StreamTimeout = opt.RequestTimeout
	}
	app := fiber.New(fiber.Config{
		AppName:   "gpuaasd",
		BodyLimit: opt.MaxBodyBytes,
		// Bodies stream: an upload never sits whole in memory. limitBody
		// holds every other route's body to BodyLimit.
		StreamRequestBody:     true,
		DisableStartupMessage: true,
		ReadTimeout:           opt.RequestTimeout,
		WriteTimeout:          opt.RequestTimeout,
		IdleTimeout:           2 * time.Minute,
		// Errors that escape the chain (raised by fasthttp before any middleware,
		// such as an oversized body) still get the envelope.
		ErrorHandler: func(c *fiber.Ctx, err error) error {
			writeError(c, log, err)
			return nil
		},
	})
	m := newHTTPMetrics(opt.Registerer)
	app.Use(requestContext(opt.RequestTimeout, opt.StreamBody, opt.StreamTimeout))
	app.Use(observe(log, m))
	app.Use(limitBody(opt.MaxBodyBytes, opt.StreamBody))
	app.Use(requireJSON(func(path string) bool {
		return opt.StreamBody(path) || (opt.RawBody != nil && opt.RawBody(path))
	}))
	return app
}

// publicRoutes lists "METHOD /fiber/path" of the operations the contract marks
// public (security: []); every other route requires a principal.
func publicRoutes() (map[string]bool, error) {
	spec, err := apigen.GetSpec()
	if err != nil {
		return nil, err
	}
	public := map[string]bool{}
	for path, item := range spec.Paths.Map() {
		for method, op := range item.Operations() {
			if op.Security != nil && len(*op.Security) == 0 {
				public[method+" "+FiberPath(path)] = true
			}
		}
	}
	return public, nil
}

// FiberPath turns an OpenAPI path (/a/{id}) into a Fiber route (/a/:id).
func FiberPath(p string) string {
	parts := strings.Split(p, "/")
	for i, s := range parts {
		if strings.HasPrefix(s, "{") && strings.HasSuffix(s, "}") {
			parts[i] = ":" + s[1:len(s)-1]
		}
	}
	return strings.Join(parts, "/")
}
