// Package pluginhost runs the driver plugins of DESIGN.md §6 inside the core.
//
// It keeps a catalog in Postgres of installed plugin binaries (name, kind,
// version, SHA-256, path) and of configured instances (one binary may run as
// several instances, each with its own configuration; secret fields are
// envelope-encrypted with the KMS keyring and never returned). It starts
// instances on demand or at boot as go-plugin child processes, checking the
// recorded checksum (SecureConfig) and talking gRPC over AutoMTLS;
// negotiates the driver API version; watches the processes and restarts a
// crashed one with exponential backoff; and hands out typed drivers
// (Provisioner, Payments, Storage) whose calls are measured and, when the
// plugin process dies mid-call, retried once on a fresh process with the
// same arguments (drivers are idempotent by operation id).
//
// No plugin process outlives the core: a graceful Close stops them all, and
// on Linux each child gets a parent-death signal (SIGKILL) so that a core
// killed with SIGKILL takes its plugins with it; the SDK's Serve also exits
// when its parent is gone.
package pluginhost

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/kms"
	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/rid"
)

// Error codes of the plugin host. Configuration that fails the plugin's
// schema is errcode.ValidationFailed with details "field" and "reason".
const (
	// CodePluginNotFound: no plugin of that name is installed.
	CodePluginNotFound errcode.Code = "plugin_not_found"
	// CodeInstanceNotFound: no instance of that name is configured.
	CodeInstanceNotFound errcode.Code = "plugin_instance_not_found"
	// CodeUpgradeRequired: a plugin of that name is installed from another
	// binary; installing this one needs the explicit upgrade flag.
	CodeUpgradeRequired errcode.Code = "plugin_upgrade_required"
	// CodeInstanceConflict: an instance of that name belongs to another plugin.
	CodeInstanceConflict errcode.Code = "plugin_instance_conflict"
	// CodeKindMismatch: the instance's plugin is of another kind than asked
	// for, or an upgrade would change the plugin's kind.
	CodeKindMismatch errcode.Code = "plugin_kind_mismatch"
	// CodeInvalidPlugin: the binary could not be installed: it does not
	// start, does not speak the plugin protocol, or reports bad metadata.
	CodeInvalidPlugin errcode.Code = "plugin_invalid"
	// CodeIncompatible: the plugin and the core share no driver API version.
	CodeIncompatible errcode.Code = "plugin_incompatible"
	// CodeTampered: the binary on disk no longer has the checksum recorded
	// at install; the host refuses to start it.
	CodeTampered errcode.Code = "plugin_tampered"
	// CodeInstanceDisabled: the instance or its plugin is disabled.
	CodeInstanceDisabled errcode.Code = "plugin_instance_disabled"
	// CodeInstanceFailed: the instance failed to start; details "reason".
	CodeInstanceFailed errcode.Code = "plugin_instance_failed"
	// CodeUnavailable: the instance is restarting after a crash, or the
	// host is shut down; retry later.
	CodeUnavailable errcode.Code = "plugin_unavailable"
)

// Codes lists the error codes the plugin host returns, besides
// errcode.ValidationFailed.
func Codes() []errcode.Code {
	return []errcode.Code{CodePluginNotFound, CodeInstanceNotFound, CodeUpgradeRequired, CodeInstanceConflict,
		CodeKindMismatch, CodeInvalidPlugin, CodeIncompatible, CodeTampered, CodeInstanceDisabled,
		CodeInstanceFailed, CodeUnavailable}
}

// Audit actions the host records.
const (
	ActionInstall          = "plugin.install"
	ActionUpgrade          = "plugin.upgrade"
	ActionEnable           = "plugin.enable"
	ActionDisable          = "plugin.disable"
	ActionStartRefused     = "plugin.start_refused" // tampered binary, by the system
	ActionConfigure        = "plugin_instance.configure"
	ActionInstanceEnable   = "plugin_instance.enable"
	ActionInstanceDisable  = "plugin_instance.disable"
	ActionInstanceIncompat = "plugin_instance.incompatible" // by the system
)

// Host installs, configures, runs and calls driver plugins. Build it with
// New; Start boots the enabled instances; Close stops every plugin process.
type Host struct {
	pool   *pgxpool.Pool
	keys   kms.Keyring
	log    hclog.Logger
	ids    rid.Builder
	now    func() time.Time
	m      *metrics
	system context.Context // carries the system principal, for audit rows the host writes on its own

	startTimeout   time.Duration
	healthInterval time.Duration
	healthTimeout  time.Duration
	exitPoll       time.Duration
	backoffMin     time.Duration
	backoffMax     time.Duration
	stableAfter    time.Duration
	maxCallWait    time.Duration

	ctx    context.Context // ends at Close
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	procs   map[string]*proc
	closed  bool
	started bool
}

type options struct {
	log            hclog.Logger
	reg            prometheus.Registerer
	region         string
	now            func() time.Time
	startTimeout   time.Duration
	healthInterval time.Duration
	healthTimeout  time.Duration
	backoffMin     time.Duration
	backoffMax     time.Duration
	stableAfter    time.Duration
	maxCallWait    time.Duration
}

// Option configures a Host.
type Option func(*options)

// WithLogger sets the logger (default: discard). Each plugin's own log is
// re-emitted under logger.Named(instance name).
func WithLogger(l hclog.Logger) Option { return func(o *options) { o.log = l } }

// WithRegisterer registers the host's metrics (default: not registered).
func WithRegisterer(r prometheus.Registerer) Option { return func(o *options) { o.reg = r } }

// WithRegion sets the region of the canonical ids in audit rows (default "local").
func WithRegion(region string) Option { return func(o *options) { o.region = region } }

// WithClock sets the clock (default time.Now).
func WithClock(now func() time.Time) Option { return func(o *options) { o.now = now } }

// WithStartTimeout bounds a plugin's start: the go-plugin handshake, and
// then Info and Configure each (default 10 s).
func WithStartTimeout(d time.Duration) Option { return func(o *options) { o.startTimeout = d } }

// WithHealthCheck sets how often a running plugin is asked for its Info,
// and how long it may take to answer (default every 10 s, 5 s). Two failed
// checks in a row kill the process, which is then restarted.
func WithHealthCheck(every, timeout time.Duration) Option {
	return func(o *options) { o.healthInterval, o.healthTimeout = every, timeout }
}

// WithRestartBackoff sets the delay before restarting a crashed plugin:
// min after the first crash, doubling per crash up to max (default 250 ms
// to 1 min). A plugin that ran for stableAfter (default 1 min) before
// crashing starts over at min.
func WithRestartBackoff(min, max, stableAfter time.Duration) Option {
	return func(o *options) { o.backoffMin, o.backoffMax, o.stableAfter = min, max, stableAfter }
}

// WithMaxCallWait bounds how long a call waits for a crashed plugin's
// restart backoff before failing with CodeUnavailable (default 5 s).
func WithMaxCallWait(d time.Duration) Option { return func(o *options) { o.maxCallWait = d } }

// New returns a host on the catalog in pool, encrypting instance secrets
// with keys. No plugin starts until Start or a first call.
func New(pool *pgxpool.Pool, keys kms.Keyring, opts ...Option) (*Host, error) {
	if pool == nil || keys == nil {
		return nil, fmt.Errorf("pluginhost: new: a pool and a keyring are required")
	}
	o := options{
		log:            hclog.NewNullLogger(),
		region:         "local",
		now:            time.Now,
		startTimeout:   10 * time.Second,
		healthInterval: 10 * time.Second,
		healthTimeout:  5 * time.Second,
		backoffMin:     250 * time.Millisecond,
		backoffMax:     time.Minute,
		stableAfter:    time.Minute,
		maxCallWait:    5 * time.Second,
	}
	for _, opt := range opts {
		opt(&o)
	}
	if o.backoffMin <= 0 || o.backoffMax < o.backoffMin {
		return nil, fmt.Errorf("pluginhost: new: restart backoff %s..%s is not a range", o.backoffMin, o.backoffMax)
	}
	if o.startTimeout <= 0 || o.healthInterval <= 0 || o.healthTimeout <= 0 {
		return nil, fmt.Errorf("pluginhost: new: timeouts must be positive")
	}
	ctx, cancel := context.WithCancel(context.Background())
	h := &Host{
		pool:           pool,
		keys:           keys,
		log:            o.log,
		ids:            rid.Builder{Region: o.region},
		now:            o.now,
		m:              newMetrics(o.reg),
		system:         principal.With(context.Background(), principal.SystemPrincipal("pluginhost")),
		startTimeout:   o.startTimeout,
		healthInterval: o.healthInterval,
		healthTimeout:  o.healthTimeout,
		exitPoll:       100 * time.Millisecond,
		backoffMin:     o.backoffMin,
		backoffMax:     o.backoffMax,
		stableAfter:    o.stableAfter,
		maxCallWait:    o.maxCallWait,
		ctx:            ctx,
		cancel:         cancel,
		procs:          map[string]*proc{},
	}
	return h, nil
}

// Start boots every enabled instance of an enabled plugin in the
// background and keeps it running (crash → restart with backoff). Rows
// left "running" or "starting" by a previous process are reset first. It
// returns once the launches are under way; follow them with Instances.
func (h *Host) Start(ctx context.Context) error {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return errcode.New(CodeUnavailable, "the plugin host is shut down")
	}
	if h.started {
		h.mu.Unlock()
		return nil
	}
	h.started = true
	h.mu.Unlock()

	if _, err := h.pool.Exec(ctx, `UPDATE plugin_instances
		SET state = 'stopped', state_reason = 'core restarted', updated_at = now()
		WHERE state IN ('running', 'starting')`); err != nil {
		return fmt.Errorf("pluginhost: start: reset stale states: %w", err)
	}
	rows, err := h.pool.Query(ctx, `SELECT i.name FROM plugin_instances i JOIN plugins p ON p.name = i.plugin
		WHERE i.enabled AND p.enabled ORDER BY i.name`)
	if err != nil {
		return fmt.Errorf("pluginhost: start: list instances: %w", err)
	}
	var names []string
	for rows.Next() {
		var n string
		if err := rows.Scan(&n); err != nil {
			rows.Close()
			return fmt.Errorf("pluginhost: start: %w", err)
		}
		names = append(names, n)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return fmt.Errorf("pluginhost: start: list instances: %w", err)
	}
	for _, n := range names {
		p := h.proc(n)
		if p == nil {
			break // closed meanwhile
		}
		p.supervise()
	}
	h.log.Info("plugin host started", "instances", len(names))
	return nil
}

// Close stops every plugin process (gracefully, then by force) and waits
// for the host's goroutines. Calls made afterwards fail with
// CodeUnavailable.
func (h *Host) Close() error {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return nil
	}
	h.closed = true
	procs := make([]*proc, 0, len(h.procs))
	for _, p := range h.procs {
		procs = append(procs, p)
	}
	h.mu.Unlock()
	h.cancel()

	var wg sync.WaitGroup
	for _, p := range procs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p.shutdown()
		}()
	}
	wg.Wait()
	h.wg.Wait()
	return nil
}

// proc returns the runtime of the named instance, or nil once the host is
// closed.
func (h *Host) proc(name string) *proc {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return nil
	}
	p, ok := h.procs[name]
	if !ok {
		p = newProc(h, name)
		h.procs[name] = p
	}
	return p
}

// existingProc returns the runtime of the named instance if it has one.
func (h *Host) existingProc(name string) *proc {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.procs[name]
}

// goBackground runs f on a goroutine Close waits for; false once closed.
func (h *Host) goBackground(f func()) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return false
	}
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		f()
	}()
	return true
}

// isStarted reports whether Start ran (instances are then kept running).
func (h *Host) isStarted() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.started && !h.closed
}

// backoff is the restart delay after n consecutive failures (n >= 1).
func (h *Host) backoff(n int) time.Duration {
	d := h.backoffMin
	for i := 1; i < n && d < h.backoffMax; i++ {
		d *= 2
	}
	return min(d, h.backoffMax)
}

// actor names the principal in ctx for installed_by.
func actor(ctx context.Context) string {
	if p := principal.From(ctx); p != nil {
		return p.Actor()
	}
	return "anonymous"
}
