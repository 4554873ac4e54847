// Package httpapi is the core's REST surface: the Fiber app, its middleware chain,
// the error envelope and the handlers of the routes in api/openapi.yaml.
package httpapi

import (
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/gpuaas/gpuaas/core/internal/httpapi/apigen"
)

// Options configure the app.
type Options struct {
	MaxBodyBytes   int
	RequestTimeout time.Duration
	// RawBody reports routes that take a non-JSON body (exempt from the 415 check).
	RawBody func(path string) bool
	// Registerer receives the HTTP metrics; Gatherer serves /metrics.
	Registerer prometheus.Registerer
	Gatherer   prometheus.Gatherer
}

// New builds the Fiber app with the middleware chain and every route of the
// contract served by h.
func New(log hclog.Logger, h apigen.ServerInterface, opt Options) *fiber.App {
	if opt.MaxBodyBytes <= 0 {
		opt.MaxBodyBytes = 1 << 20
	}
	if opt.RequestTimeout <= 0 {
		opt.RequestTimeout = 30 * time.Second
	}
	app := fiber.New(fiber.Config{
		AppName:               "gpuaasd",
		BodyLimit:             opt.MaxBodyBytes,
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
	app.Use(requestContext(opt.RequestTimeout))
	app.Use(observe(log, m))
	app.Use(requireJSON(opt.RawBody))
	apigen.RegisterHandlers(app, h)
	return app
}
