package httpapi

import (
	"context"
	"fmt"
	"mime"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/gpuaas/gpuaas/core/internal/audit"
	"github.com/gpuaas/gpuaas/core/internal/correlation"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
)

const (
	localsCorrelation  = "gpuaas.correlation_id"
	localsAuditTracker = "gpuaas.audit_tracker"
)

// requestContext picks the correlation id (the client's when valid, else a new one),
// echoes it, and gives the handler a context carrying it with the request deadline.
func requestContext(timeout time.Duration) fiber.Handler {
	return func(c *fiber.Ctx) error {
		id := requestCorrelationID(c)
		ctx, cancel := context.WithTimeout(correlation.With(context.Background(), id), timeout)
		defer cancel()
		ctx = audit.WithSourceIP(ctx, c.IP())
		ctx, tracker := audit.WithTracker(ctx)
		c.Locals(localsAuditTracker, tracker)
		c.SetUserContext(ctx)
		return c.Next()
	}
}

type httpMetrics struct {
	requests     *prometheus.CounterVec
	duration     *prometheus.HistogramVec
	inflight     prometheus.Gauge
	auditMissing prometheus.Counter
}

func newHTTPMetrics(reg prometheus.Registerer) *httpMetrics {
	m := &httpMetrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "gpuaas_http_requests_total", Help: "HTTP requests by method, route and status."}, []string{"method", "route", "status"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "gpuaas_http_request_duration_seconds", Help: "HTTP request latency by method and route.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16)}, []string{"method", "route"}),
		inflight: prometheus.NewGauge(prometheus.GaugeOpts{Name: "gpuaas_http_requests_in_flight", Help: "HTTP requests being served."}),
		auditMissing: prometheus.NewCounter(prometheus.CounterOpts{Name: "gpuaas_audit_missing_total",
			Help: "Successful authenticated mutations that wrote no audit row (a defect to investigate)."}),
	}
	if reg != nil {
		reg.MustRegister(m.requests, m.duration, m.inflight, m.auditMissing)
	}
	return m
}

// quietRoutes are logged at debug level: probes would drown the access log.
var quietRoutes = map[string]bool{"/api/v1/healthz": true, "/api/v1/readyz": true, "/metrics": true}

// observe recovers panics, writes every error in the envelope, counts the request
// and writes the access log line. The path is logged without its query string, which
// may carry tokens.
func observe(log hclog.Logger, m *httpMetrics) fiber.Handler {
	access := log.Named("access")
	return func(c *fiber.Ctx) (ret error) {
		start := time.Now()
		m.inflight.Inc()
		defer m.inflight.Dec()
		err := func() (err error) {
			defer func() {
				if r := recover(); r != nil {
					log.Error("panic serving request", "panic", fmt.Sprint(r), "path", c.Path(), "stack", string(debug.Stack()))
					err = errcode.New(errcode.Internal, "internal error")
				}
			}()
			return c.Next()
		}()
		if err != nil {
			writeError(c, log, err)
		}
		status := c.Response().StatusCode()
		// Fiber's strings alias request buffers that are reused after the request:
		// metric labels (kept forever) must be copies.
		method := strings.Clone(c.Method())
		route := strings.Clone(c.Route().Path)
		if route == "" || route == "/" && c.Path() != "/" {
			route = "unmatched"
		}
		elapsed := time.Since(start)
		m.requests.WithLabelValues(method, route, strconv.Itoa(status)).Inc()
		m.duration.WithLabelValues(method, route).Observe(elapsed.Seconds())
		if t, _ := c.Locals(localsAuditTracker).(*audit.Tracker); t != nil && t.Count() == 0 &&
			method != fiber.MethodGet && status >= 200 && status < 300 &&
			PrincipalOf(c) != nil && len(c.Response().Header.Peek("Idempotent-Replayed")) == 0 {
			m.auditMissing.Inc()
			log.Error("successful mutation wrote no audit row", "method", method, "route", route, "correlation_id", requestCorrelationID(c))
		}
		level := hclog.Info
		if quietRoutes[route] {
			level = hclog.Debug
		}
		access.Log(level, "request",
			"method", c.Method(), "path", c.Path(), "route", route, "status", status,
			"duration_ms", float64(elapsed.Microseconds())/1000, "bytes_out", len(c.Response().Body()),
			"ip", c.IP(), "correlation_id", requestCorrelationID(c))
		return nil
	}
}

// requireJSON answers 415 when a request with a body is not JSON, except on routes
// that take raw bodies (rawBody reports those by path).
func requireJSON(rawBody func(path string) bool) fiber.Handler {
	return func(c *fiber.Ctx) error {
		switch c.Method() {
		case fiber.MethodPost, fiber.MethodPut, fiber.MethodPatch:
		default:
			return c.Next()
		}
		hasBody := len(c.Request().Body()) > 0 || c.Request().Header.ContentLength() > 0 || c.Request().Header.ContentLength() == -1
		if !hasBody || (rawBody != nil && rawBody(c.Path())) {
			return c.Next()
		}
		mt, _, err := mime.ParseMediaType(c.Get(fiber.HeaderContentType))
		if err != nil || (mt != fiber.MIMEApplicationJSON && !strings.HasSuffix(mt, "+json")) {
			return errcode.New(errcode.UnsupportedMedia, "content type must be application/json").
				WithDetails("content_type", c.Get(fiber.HeaderContentType))
		}
		return c.Next()
	}
}
