// Package terminal is the browser terminal. The API mints a single-use token
// bound to a principal and an active allocation (Mint); the WebSocket endpoint
// (Handler) takes the token, logs in to the allocation's node over SSH with an
// ephemeral in-memory key and a short-lived certificate of the platform's SSH
// CA, and relays the shell both ways. The same handler serves in gpuaasd and
// in the separate terminal gateway; tokens and the per-principal session count
// live in Postgres, so both interoperate. doc/terminal.md is the wire protocol.
package terminal

import (
	"context"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/pki"
	"github.com/gpuaas/gpuaas/core/internal/policy"
	"github.com/gpuaas/gpuaas/core/internal/rid"
)

// Error codes.
const (
	CodeTokenInvalid         errcode.Code = "terminal_token_invalid"
	CodeTokenExpired         errcode.Code = "terminal_token_expired"
	CodeTokenInQuery         errcode.Code = "terminal_token_in_query"
	CodeTokenWrongAllocation errcode.Code = "terminal_token_wrong_allocation"
	CodeOriginForbidden      errcode.Code = "terminal_origin_forbidden"
	CodeSessionLimit         errcode.Code = "terminal_session_limit"
	CodeAllocationNotActive  errcode.Code = "allocation_not_active"
	CodeNodeUnreachable      errcode.Code = "terminal_node_unreachable"
	CodeHostKeyMismatch      errcode.Code = "terminal_host_key_mismatch"
)

// Codes lists this package's codes for the contract test.
func Codes() []errcode.Code {
	return []errcode.Code{CodeTokenInvalid, CodeTokenExpired, CodeTokenInQuery, CodeTokenWrongAllocation, CodeOriginForbidden,
		CodeSessionLimit, CodeAllocationNotActive, CodeNodeUnreachable, CodeHostKeyMismatch}
}

// Limits are the policy values one session runs under.
type Limits struct {
	IdleTimeout time.Duration
	Keepalive   time.Duration
	CertTTL     time.Duration
	// MaxSessions is how many sessions one principal may have open at once.
	MaxSessions   int
	MaxFrameBytes int64
}

// LimitsFunc resolves the limits of a session on an allocation of org's
// project.
type LimitsFunc func(ctx context.Context, org, project uuid.UUID) Limits

// PolicyLimits reads the limits from the terminal.* policy keys.
func PolicyLimits(pol *policy.Service) LimitsFunc {
	return func(ctx context.Context, org, project uuid.UUID) Limits {
		t := policy.Target{OrgID: org.String(), ProjectID: project.String()}
		return Limits{
			IdleTimeout:   policy.TerminalIdleTimeout.Value(ctx, pol, t),
			Keepalive:     policy.TerminalKeepalive.Value(ctx, pol, t),
			CertTTL:       policy.TerminalCertTTL.Value(ctx, pol, t),
			MaxSessions:   int(policy.TerminalMaxSessionsPerUser.Value(ctx, pol, t)),
			MaxFrameBytes: policy.TerminalMaxFrameBytes.Value(ctx, pol, t),
		}
	}
}

// Service mints tokens and serves terminal sessions.
type Service struct {
	pool     *pgxpool.Pool
	ca       pki.SSHCA
	limits   LimitsFunc
	ids      rid.Builder
	log      hclog.Logger
	metrics  *metrics
	origins  map[string]bool
	now      func() time.Time
	instance uuid.UUID

	mu       sync.Mutex
	stopping chan struct{} // closed when Run ends: sessions close with 1001
	stopped  bool
	sessions sync.WaitGroup
}

// Option configures a Service.
type Option func(*Service)

// WithLogger sets the logger (default none). Tokens and keys are never logged.
func WithLogger(l hclog.Logger) Option { return func(s *Service) { s.log = l } }

// WithRegisterer registers the terminal metrics with reg.
func WithRegisterer(reg prometheus.Registerer) Option {
	return func(s *Service) { s.metrics = newMetrics(reg) }
}

// WithAllowedOrigins sets the browser origins (scheme://host[:port]) that may
// open sessions; a request without an Origin header (not a browser) is not
// checked. Default: none.
func WithAllowedOrigins(origins []string) Option {
	return func(s *Service) {
		for _, o := range origins {
			s.origins[o] = true
		}
	}
}

// WithClock sets the clock of token expiry (default time.Now).
func WithClock(now func() time.Time) Option { return func(s *Service) { s.now = now } }

// NewService returns a Service whose sessions log in with certificates of ca
// and run under the limits limits resolves. Run must run for sessions to be
// kept alive in the shared count and closed at shutdown.
func NewService(pool *pgxpool.Pool, ca pki.SSHCA, limits LimitsFunc, region string, opts ...Option) *Service {
	s := &Service{pool: pool, ca: ca, limits: limits, ids: rid.Builder{Region: region}, log: hclog.NewNullLogger(),
		origins: map[string]bool{}, now: time.Now, instance: uuid.New(), stopping: make(chan struct{})}
	for _, o := range opts {
		o(s)
	}
	if s.metrics == nil {
		s.metrics = newMetrics(nil)
	}
	return s
}

// begin registers a session about to start; false once Run has ended.
func (s *Service) begin() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return false
	}
	s.sessions.Add(1)
	return true
}

// Run keeps this process's sessions alive in the shared count and sweeps
// stale sessions and old tokens until ctx is done; then it closes every
// session (1001) and returns when they have ended.
func (s *Service) Run(ctx context.Context) {
	t := time.NewTicker(heartbeatEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			s.mu.Lock()
			s.stopped = true
			close(s.stopping)
			s.mu.Unlock()
			s.sessions.Wait()
			return
		case <-t.C:
			if err := s.heartbeat(ctx); err != nil && ctx.Err() == nil {
				s.log.Warn("terminal heartbeat failed", "error", err)
			}
		}
	}
}
