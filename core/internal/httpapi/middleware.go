package httpapi

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"mime"
	"net"
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
	// localsBodyRead marks a streamed request body read to its end.
	localsBodyRead = "gpuaas.body_read"
)

// requestContext picks the correlation id (the client's when valid, else a new one),
// echoes it, and gives the handler a context carrying it with the request deadline
// (streamTimeout on the routes stream reports).
func requestContext(timeout time.Duration, stream func(string) bool, streamTimeout time.Duration) fiber.Handler {
	return func(c *fiber.Ctx) error {
		id := requestCorrelationID(c)
		d := timeout
		if stream(c.Path()) {
			d = streamTimeout
		}
		ctx, cancel := context.WithTimeout(correlation.With(context.Background(), id), d)
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
		// A streamed body is still to be written: Body() would read it all.
		bytesOut := c.Response().Header.ContentLength()
		if !c.Response().IsBodyStream() {
			bytesOut = len(c.Response().Body())
		}
		access.Log(level, "request",
			"method", c.Method(), "path", c.Path(), "route", route, "status", status,
			"duration_ms", float64(elapsed.Microseconds())/1000, "bytes_out", bytesOut,
			"ip", c.IP(), "correlation_id", requestCorrelationID(c))
		return nil
	}
}

// limitBody reads the request body of every route but the streaming ones
// (stream reports them) into memory, refusing one over max bytes with 413
// before any handler sees it. The server streams bodies so that uploads
// need not fit in memory; this keeps the limit on everything else. A
// request answered before its body was read (a refused upload, an
// oversized body) gives up its connection: see linger.
func limitBody(max int, stream func(string) bool) fiber.Handler {
	return func(c *fiber.Ctx) error {
		req := c.Request()
		if stream(c.Path()) {
			err := c.Next()
			if req.IsBodyStream() && req.Header.ContentLength() != 0 && c.Locals(localsBodyRead) == nil {
				// A short body is read and dropped to keep the connection.
				if n := req.Header.ContentLength(); n < 0 || n > drainMax || drain(req.BodyStream()) != nil {
					linger(c)
				}
			}
			return err
		}
		if !req.IsBodyStream() {
			return c.Next()
		}
		tooLarge := func() error {
			linger(c)
			return errcode.New(errcode.RequestTooLarge, "request body is too large").WithDetails("max_bytes", max)
		}
		if req.Header.ContentLength() > max {
			return tooLarge()
		}
		body, err := io.ReadAll(io.LimitReader(req.BodyStream(), int64(max)+1))
		if err != nil {
			c.Context().SetConnectionClose()
			return errcode.Wrap(err, errcode.BadRequest, "reading the request body failed")
		}
		if len(body) > max {
			return tooLarge()
		}
		req.SetBody(body)
		return c.Next()
	}
}

// StreamedBody is the request body of a streaming route (Options.StreamBody)
// as it arrives. Reading it to its end lets the connection serve another
// request; a handler that answers before that gives the connection up.
func StreamedBody(c *fiber.Ctx) io.Reader {
	r := c.Context().RequestBodyStream()
	if r == nil {
		r = bytes.NewReader(c.Body())
	}
	return &streamedBody{r: r, c: c}
}

type streamedBody struct {
	r io.Reader
	c *fiber.Ctx
}

func (b *streamedBody) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	if err == io.EOF {
		b.c.Locals(localsBodyRead, true)
	}
	return n, err
}

const (
	// drainMax is the longest unread body that is read and dropped so the
	// connection can serve another request.
	drainMax = 64 << 10
	// lingerTimeout bounds how long linger reads what a client still sends.
	lingerTimeout = 2 * time.Second
)

func drain(r io.Reader) error {
	_, err := io.Copy(io.Discard, io.LimitReader(r, drainMax+1))
	return err
}

// linger ends the connection of a request answered before its body was
// read, the way that lets the client see the answer: the rest of the body
// is still on the wire, and closing a socket with unread data resets it,
// which can destroy the response before the client reads it. So the
// response goes out with Connection: close, then the server stops sending
// (FIN), reads and drops what the client still sends for up to
// lingerTimeout, and closes.
func linger(c *fiber.Ctx) {
	ctx := c.Context()
	raw := ctx.Conn()
	ctx.HijackSetNoResponse(true)
	ctx.Hijack(func(conn net.Conn) {
		ctx.Response.SetConnectionClose()
		w := bufio.NewWriter(conn)
		if err := ctx.Response.Write(w); err != nil || w.Flush() != nil {
			return
		}
		if cw, ok := raw.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		}
		_ = conn.SetReadDeadline(time.Now().Add(lingerTimeout))
		_, _ = io.Copy(io.Discard, conn)
	})
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
		if rawBody != nil && rawBody(c.Path()) {
			return c.Next()
		}
		hasBody := len(c.Request().Body()) > 0 || c.Request().Header.ContentLength() > 0 || c.Request().Header.ContentLength() == -1
		if !hasBody {
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
