// Package idempotency makes mutating requests safe to retry. A client sends an
// Idempotency-Key header; the first request with a key runs and its response is
// stored, a retry with the same key and the same request gets that response back
// byte for byte without running the handler again.
//
// Keys are scoped by principal and kept in the idempotency_keys table, so every core
// instance sees the same keys. A row is claimed in_flight before the handler runs
// (one INSERT ... ON CONFLICT, so exactly one of many concurrent duplicates wins) and
// completed with the response afterwards. Server errors (5xx), cancelled requests and
// panics release the claim instead, so a retry runs again.
//
// The in_flight row expires after a lease (WithLease), so a claim left behind by a
// crashed process does not block the key until its TTL; a completed row expires after
// the TTL (WithTTL, read per request so policy changes apply at once). Expired rows
// are treated as absent and overwritten atomically; Run deletes them periodically.
package idempotency

import (
	"context"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/gpuaas/gpuaas/core/internal/correlation"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
)

// The error codes the middleware returns. The HTTP layer maps them to statuses:
// InvalidKey → 400, KeyReused → 422, InFlight → 409.
const (
	// InvalidKey: the Idempotency-Key header is empty, longer than 255 characters,
	// repeated, or holds a character outside printable ASCII.
	InvalidKey errcode.Code = "invalid_idempotency_key"
	// KeyReused: the key was already used by this principal for a different request
	// (method, path or body).
	KeyReused errcode.Code = "idempotency_key_reused"
	// InFlight: the first request with this key is still running; the response
	// carries Retry-After: 1.
	InFlight errcode.Code = "idempotency_in_flight"
)

// Codes lists the codes of this package, for the HTTP layer's status mapping and the
// API contract.
func Codes() []errcode.Code { return []errcode.Code{InvalidKey, KeyReused, InFlight} }

// Header names.
const (
	// HeaderKey is the request header carrying the client's key.
	HeaderKey = "Idempotency-Key"
	// HeaderReplayed is set to "true" on a replayed response.
	HeaderReplayed = "Idempotent-Replayed"
)

// MaxKeyLength is the longest key accepted.
const MaxKeyLength = 255

// Defaults of the options.
const (
	DefaultTTL             = 24 * time.Hour
	DefaultLease           = 5 * time.Minute
	DefaultJanitorInterval = time.Minute
)

// ErrorWriter renders err into c's response (status, headers, body), as the HTTP
// layer's error envelope writer does.
type ErrorWriter func(c *fiber.Ctx, err error)

// Store keeps idempotency keys in Postgres and serves the middleware.
type Store struct {
	pool        *pgxpool.Pool
	log         hclog.Logger
	ttl         func(context.Context) time.Duration
	lease       time.Duration
	now         func() time.Time
	writeError  ErrorWriter
	methods     map[string]bool
	interval    time.Duration
	batch       int
	correlation string
	m           metrics
}

// Option configures a Store.
type Option func(*Store)

// WithTTL sets how long a completed key is kept, read on every first request so a
// policy change applies at once (default 24h). A non-positive result means the
// default.
func WithTTL(ttl func(context.Context) time.Duration) Option {
	return func(s *Store) { s.ttl = ttl }
}

// WithLease sets how long an in_flight claim is honoured (default 5 minutes). It must
// exceed the longest a handler may run (the request timeout): after it the claim
// counts as abandoned and a retry runs the handler again.
func WithLease(d time.Duration) Option { return func(s *Store) { s.lease = d } }

// WithClock injects the clock used for claims, expiry and the janitor.
func WithClock(now func() time.Time) Option { return func(s *Store) { s.now = now } }

// WithLogger sets the logger (default: none).
func WithLogger(log hclog.Logger) Option { return func(s *Store) { s.log = log } }

// WithRegisterer registers the metrics with reg.
func WithRegisterer(reg prometheus.Registerer) Option {
	return func(s *Store) { s.m.register(reg) }
}

// WithErrorWriter sets the function that renders a handler's error into the response.
// With it, a client error (4xx) returned by a handler is rendered here, stored and
// replayed like any other response, and the middleware returns nil. Without it,
// handler errors are passed up unchanged and the key is released (nothing stored).
func WithErrorWriter(w ErrorWriter) Option { return func(s *Store) { s.writeError = w } }

// WithMethods sets the HTTP methods the middleware applies to (default POST).
func WithMethods(methods ...string) Option {
	return func(s *Store) {
		s.methods = make(map[string]bool, len(methods))
		for _, m := range methods {
			s.methods[m] = true
		}
	}
}

// WithJanitorInterval sets how often Run deletes expired keys (default 1 minute).
func WithJanitorInterval(d time.Duration) Option { return func(s *Store) { s.interval = d } }

// WithCorrelationHeader names the per-request correlation header, which is never
// stored or replayed (default correlation.Header).
func WithCorrelationHeader(name string) Option { return func(s *Store) { s.correlation = name } }

// New returns a Store on pool.
func New(pool *pgxpool.Pool, opts ...Option) *Store {
	s := &Store{
		pool:        pool,
		log:         hclog.NewNullLogger(),
		lease:       DefaultLease,
		now:         time.Now,
		methods:     map[string]bool{fiber.MethodPost: true},
		interval:    DefaultJanitorInterval,
		batch:       1000,
		correlation: correlation.Header,
		m:           newMetrics(),
	}
	for _, o := range opts {
		o(s)
	}
	if s.lease <= 0 {
		s.lease = DefaultLease
	}
	if s.interval <= 0 {
		s.interval = DefaultJanitorInterval
	}
	s.log = s.log.Named("idempotency")
	return s
}

// ttlFor is the TTL of a completed key for a request with ctx.
func (s *Store) ttlFor(ctx context.Context) time.Duration {
	if s.ttl == nil {
		return DefaultTTL
	}
	if d := s.ttl(ctx); d > 0 {
		return d
	}
	return DefaultTTL
}

type metrics struct {
	replays   prometheus.Counter
	conflicts prometheus.Counter
	reused    prometheus.Counter
	released  *prometheus.CounterVec
	errors    *prometheus.CounterVec
	expired   prometheus.Counter
}

func newMetrics() metrics {
	return metrics{
		replays: prometheus.NewCounter(prometheus.CounterOpts{Name: "gpuaas_idempotency_replays_total",
			Help: "Responses replayed from a stored idempotency key."}),
		conflicts: prometheus.NewCounter(prometheus.CounterOpts{Name: "gpuaas_idempotency_in_flight_conflicts_total",
			Help: "Requests rejected because the first request with their key was still in flight."}),
		reused: prometheus.NewCounter(prometheus.CounterOpts{Name: "gpuaas_idempotency_key_reuse_total",
			Help: "Requests rejected because their key was used for a different request."}),
		released: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "gpuaas_idempotency_released_total",
			Help: "Claims released without storing a response, by reason."}, []string{"reason"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "gpuaas_idempotency_store_errors_total",
			Help: "Failed idempotency key operations, by operation."}, []string{"op"}),
		expired: prometheus.NewCounter(prometheus.CounterOpts{Name: "gpuaas_idempotency_expired_deleted_total",
			Help: "Expired idempotency keys deleted by the janitor."}),
	}
}

func (m *metrics) register(reg prometheus.Registerer) {
	if reg != nil {
		reg.MustRegister(m.replays, m.conflicts, m.reused, m.released, m.errors, m.expired)
	}
}
