package pluginhost

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	plugin "github.com/hashicorp/go-plugin"

	"github.com/gpuaas/gpuaas/core/internal/audit"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/sdk"
	"github.com/gpuaas/gpuaas/sdk/base"
)

// maxReason bounds the state reason stored and returned.
const maxReason = 1000

// proc is the runtime of one instance in this core: its plugin process when
// it runs, the start in progress, and the failure and restart bookkeeping.
type proc struct {
	h    *Host
	name string
	log  hclog.Logger

	mu       sync.Mutex
	cur      *live    // the running process, nil when none
	starting *attempt // the start in progress, nil when none
	// epoch changes when the instance's configuration or enablement
	// changes; a start begun under an older epoch is discarded.
	epoch      uint64
	state      State
	reason     string
	apiVersion string
	// failures counts consecutive crashes and failed starts; nextAttempt
	// is when the next start may begin.
	failures    int
	nextAttempt time.Time
	// blocked is a failure that needs the operator (tampered binary, no
	// common API version, configuration the plugin rejects): no start is
	// attempted until the instance is reconfigured, re-enabled or upgraded.
	blocked error
	// pendingRestart marks the next start as a restart after a crash.
	pendingRestart bool
	// supervised instances are kept running: after a crash or a failed
	// start the host retries on its own with backoff.
	supervised bool
	closed     bool

	dbMu  sync.Mutex // orders state writes, so the row ends with the latest state
	calls sync.Map   // method -> *callMetrics
}

// live is one started plugin process.
type live struct {
	client     *plugin.Client
	driver     base.BasePlugin
	kind       base.Kind
	apiVersion string
	pid        int
	startedAt  time.Time
	stop       chan struct{} // closed when the host lets go of the process
	ended      bool          // under proc.mu
}

// attempt is one start; callers waiting for the instance wait on done.
type attempt struct {
	done chan struct{}
	live *live // nil with a nil err: discarded, start again
	err  error
}

// startError is a failed start: the state and reason to record, and the
// error callers get.
type startError struct {
	state   State
	reason  string
	blocked bool
	coded   error
}

func (e *startError) Error() string { return e.coded.Error() }
func (e *startError) Unwrap() error { return e.coded }

func newProc(h *Host, name string) *proc {
	return &proc{h: h, name: name, log: h.log.With("instance", name)}
}

func (p *proc) errClosed() error {
	return errcode.New(CodeUnavailable, "plugin instance %q: the plugin host is shut down", p.name)
}

// pid is the running process's id, 0 when none.
func (p *proc) pid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cur == nil {
		return 0
	}
	return p.cur.pid
}

// acquire returns the running plugin, starting it when there is none: on
// demand, or after a crash once the restart backoff has passed (waiting
// for it when it is short).
func (p *proc) acquire(ctx context.Context) (*live, error) {
	for {
		p.mu.Lock()
		if l := p.cur; l != nil {
			if !l.client.Exited() {
				p.mu.Unlock()
				return l, nil
			}
			p.mu.Unlock()
			p.lost(l, "plugin process exited unexpectedly")
			continue
		}
		if p.closed {
			p.mu.Unlock()
			return nil, p.errClosed()
		}
		a := p.starting
		if a == nil {
			if p.blocked != nil {
				err := p.blocked
				p.mu.Unlock()
				return nil, err
			}
			if wait := p.nextAttempt.Sub(p.h.now()); wait > 0 {
				restarting, reason := p.pendingRestart, p.reason
				p.mu.Unlock()
				if reason == "" {
					reason = "the last start failed"
				}
				if wait > p.h.maxCallWait {
					code := CodeInstanceFailed
					if restarting {
						code = CodeUnavailable
					}
					return nil, errcode.New(code, "plugin instance %q: %s (next start in %s)", p.name, reason, wait.Round(time.Millisecond)).
						WithDetails("reason", reason).WithDetails("retry_after_seconds", int(wait.Seconds())+1)
				}
				if err := p.sleep(ctx, wait); err != nil {
					return nil, err
				}
				continue
			}
			a = p.beginLocked()
		}
		p.mu.Unlock()
		select {
		case <-a.done:
		case <-ctx.Done():
			return nil, fmt.Errorf("pluginhost: instance %q: waiting for the plugin to start: %w", p.name, ctx.Err())
		}
		if a.err != nil {
			return nil, a.err
		}
		if a.live != nil {
			return a.live, nil
		}
	}
}

// sleep waits d, or until ctx or the host ends.
func (p *proc) sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("pluginhost: instance %q: waiting to restart the plugin: %w", p.name, ctx.Err())
	case <-p.h.ctx.Done():
		return p.errClosed()
	}
}

// beginLocked starts a start attempt. p.mu is held.
func (p *proc) beginLocked() *attempt {
	a := &attempt{done: make(chan struct{})}
	p.starting = a
	epoch, restart := p.epoch, p.pendingRestart
	p.pendingRestart = false
	if !p.h.goBackground(func() { p.run(a, epoch, restart) }) {
		p.starting = nil
		a.err = p.errClosed()
		close(a.done)
	}
	return a
}

// run performs a start attempt and records its outcome.
func (p *proc) run(a *attempt, epoch uint64, restart bool) {
	l, err := p.h.launch(p, epoch, restart)
	p.mu.Lock()
	if p.starting == a {
		p.starting = nil
	}
	if p.epoch != epoch || p.closed {
		closed := p.closed
		p.mu.Unlock()
		if l != nil {
			l.client.Kill()
		}
		if closed {
			a.err = p.errClosed()
		}
		close(a.done)
		return
	}
	var (
		se       *startError
		persist  bool
		schedule bool
	)
	switch {
	case err == nil:
		p.cur = l
		p.state, p.reason, p.apiVersion = StateRunning, "", l.apiVersion
		p.supervised = true
		persist = true
	case errors.As(err, &se):
		p.failures++
		p.state, p.reason = se.state, truncate(se.reason)
		if se.blocked {
			p.blocked = se.coded
		} else {
			p.nextAttempt = p.h.now().Add(p.h.backoff(p.failures))
			schedule = p.supervised
		}
		persist = true
	case errcode.Of(err) != CodeInstanceDisabled && errcode.Of(err) != CodeInstanceNotFound:
		// Not the plugin's fault (the database is away, say): back off
		// and, when supervised, try again; the recorded state stays.
		p.failures++
		p.nextAttempt = p.h.now().Add(p.h.backoff(p.failures))
		schedule = p.supervised
	}
	p.mu.Unlock()
	if persist {
		p.persist()
	}
	switch {
	case err == nil:
		p.log.Info("plugin started", "pid", l.pid, "api_version", l.apiVersion)
		if !p.h.goBackground(func() { p.watch(l) }) {
			l.client.Kill()
		}
	case se != nil:
		p.log.Error("plugin failed to start", "state", se.state, "reason", se.reason)
	}
	if schedule {
		p.scheduleRetry(epoch)
	}
	a.live, a.err = l, err
	close(a.done)
}

// launch starts the instance's plugin process: checks the binary's
// checksum (go-plugin SecureConfig), handshakes with AutoMTLS, negotiates
// the driver API version and configures the driver.
func (h *Host) launch(p *proc, epoch uint64, restart bool) (*live, error) {
	ctx, cancel := context.WithTimeout(h.ctx, 3*h.startTimeout)
	defer cancel()
	r, err := h.loadInstance(ctx, p.name)
	if err != nil {
		return nil, err
	}
	if !r.Enabled || !r.PluginEnabled {
		what := "instance"
		if !r.PluginEnabled {
			what = "plugin " + r.Plugin
		}
		return nil, errcode.New(CodeInstanceDisabled, "plugin instance %q is disabled (%s)", p.name, what)
	}
	if !p.setStateIf(epoch, StateStarting, "") {
		return nil, nil // reconfigured meanwhile: run discards this attempt
	}
	p.persist()
	if restart {
		if _, err := h.pool.Exec(ctx, `UPDATE plugin_instances SET restarts = restarts + 1 WHERE name = $1`, p.name); err != nil {
			p.log.Error("count restart", "error", err)
		}
		h.m.restarts.WithLabelValues(p.name).Inc()
	}
	fail := func(blocked bool, format string, args ...any) error {
		reason := fmt.Sprintf(format, args...)
		return &startError{state: StateFailed, reason: reason, blocked: blocked,
			coded: errcode.New(CodeInstanceFailed, "plugin instance %q: %s", p.name, reason).WithDetails("reason", reason)}
	}

	values := maps.Clone(r.Config)
	if len(r.secrets) > 0 {
		secrets, err := h.openSecrets(ctx, r.ID, r.secrets)
		if err != nil {
			return nil, fail(true, "cannot read its secrets: %v", err)
		}
		maps.Copy(values, secrets)
	}
	cfg, err := base.ValidateConfig(r.schema, values)
	if err != nil {
		return nil, fail(true, "its configuration does not fit plugin %s %s: %v; reconfigure it", r.Plugin, r.PluginVersion, err)
	}
	sum, err := hex.DecodeString(r.sha256)
	if err != nil {
		return nil, fail(true, "bad recorded checksum: %v", err)
	}
	client, err := h.newClient(r.path, sum, h.log.Named(p.name))
	if err != nil {
		return nil, fail(true, "%v", err)
	}
	d, err := sdk.Dispense(client, r.Kind)
	if err != nil {
		client.Kill()
		if errors.Is(err, plugin.ErrChecksumsDoNotMatch) {
			return nil, h.refuseTampered(r)
		}
		return nil, fail(false, "%s", startFailure(err, h.startTimeout))
	}
	cctx, ccancel := context.WithTimeout(ctx, h.startTimeout)
	defer ccancel()
	info, err := d.Info(cctx)
	if err != nil {
		client.Kill()
		return nil, fail(false, "Info failed at start: %v", err)
	}
	if info.Name != r.Plugin || info.Kind != r.Kind {
		client.Kill()
		return nil, fail(true, "the binary reports itself as %s plugin %q, but %q was installed as a %s plugin",
			info.Kind, info.Name, r.Plugin, r.Kind)
	}
	version, err := base.NegotiateAPIVersion(hostAPIVersions(r.Kind), info.APIVersions)
	if err != nil {
		client.Kill()
		return nil, h.refuseIncompatible(r, err)
	}
	cfg.APIVersion, cfg.Instance = version, p.name
	if err := d.Configure(cctx, cfg); err != nil {
		client.Kill()
		var ce *base.ConfigError
		if errors.As(err, &ce) {
			return nil, fail(true, "the plugin rejected its configuration: field %q: %s; reconfigure it", ce.Field, ce.Reason)
		}
		return nil, fail(false, "Configure failed: %v", err)
	}
	pid, _ := strconv.Atoi(client.ID())
	return &live{client: client, driver: d, kind: r.Kind, apiVersion: version, pid: pid,
		startedAt: h.now(), stop: make(chan struct{})}, nil
}

// newClient is the go-plugin client that starts the binary at path:
// SecureConfig with sum, AutoMTLS, gRPC, a minimal environment, the
// plugin's log re-emitted through logger, and a parent-death signal.
func (h *Host) newClient(path string, sum []byte, logger hclog.Logger) (*plugin.Client, error) {
	cfg, err := sdk.ClientConfig(sdk.Launch{
		Path:         path,
		SHA256:       sum,
		Logger:       logger,
		StartTimeout: h.startTimeout,
		// Drivers translate calls and wait on I/O: one P spares them the
		// scheduler's cross-CPU wake-ups (unary p50 −18 % measured here).
		Env: []string{"GPUAAS_PLUGIN_LOG_LEVEL=" + pluginLogLevel(h.log), "GOMAXPROCS=1"},
	})
	if err != nil {
		return nil, fmt.Errorf("plugin launch: %w", err)
	}
	setParentDeathSignal(cfg.Cmd)
	return plugin.NewClient(cfg), nil
}

// pluginLogLevel is the level a plugin logs at: the host's, so that lines
// the host would drop are not written at all.
func pluginLogLevel(l hclog.Logger) string {
	switch lvl := l.GetLevel(); lvl {
	case hclog.Trace, hclog.Debug, hclog.Info, hclog.Warn, hclog.Error:
		return lvl.String()
	}
	return "error"
}

// startFailure explains a failed go-plugin start.
func startFailure(err error, timeout time.Duration) string {
	full := err.Error()
	msg, _, _ := strings.Cut(full, "\n")
	msg = strings.TrimSpace(msg)
	switch {
	case strings.Contains(full, "timeout while waiting for plugin to start"):
		return fmt.Sprintf("the plugin hung at start: no handshake within %s (%s)", timeout, msg)
	case strings.Contains(full, "exited before we could connect"),
		strings.Contains(full, "Failed to read any lines from plugin's stdout"):
		// The process ended without a handshake line.
		return "the plugin process exited at start, before the handshake; see its log"
	case strings.Contains(full, "Unrecognized remote plugin message"),
		strings.Contains(full, "unsupported plugin protocol"),
		strings.Contains(full, "ncompatible"),
		strings.Contains(full, "error parsing"):
		return fmt.Sprintf("the binary does not speak the gpuaas plugin protocol (gRPC, protocol version %d): %s",
			base.ProtocolVersion, msg)
	}
	return "start failed: " + msg
}

// refuseTampered records that r's binary no longer matches its checksum.
func (h *Host) refuseTampered(r *instanceRow) error {
	found := "unreadable"
	if sum, err := sdk.FileSHA256(r.path); err == nil {
		found = hex.EncodeToString(sum)
	}
	reason := fmt.Sprintf("refusing to start %s: its SHA-256 is %s, not %s as recorded at install; "+
		"the binary was modified or replaced (install it again as an upgrade to accept it)", r.path, found, r.sha256)
	h.log.Error("plugin binary does not match its recorded checksum; refusing to start it",
		"instance", r.Name, "plugin", r.Plugin, "path", r.path, "recorded_sha256", r.sha256, "found_sha256", found)
	h.auditSystem(audit.Entry{Action: ActionStartRefused, Target: h.ids.Platform("plugin", r.Plugin), Result: audit.Failure,
		Details: map[string]any{"instance": r.Name, "path": r.path, "recorded_sha256": r.sha256, "found_sha256": found,
			"reason": "checksum mismatch"}})
	return &startError{state: StateFailed, reason: reason, blocked: true,
		coded: errcode.New(CodeTampered, "plugin instance %q: %s", r.Name, reason).WithDetails("reason", reason)}
}

// refuseIncompatible records that r's plugin shares no API version with
// the core.
func (h *Host) refuseIncompatible(r *instanceRow, err error) error {
	reason := fmt.Sprintf("plugin %s %s is incompatible with this core: %v", r.Plugin, r.PluginVersion, err)
	details := map[string]any{"instance": r.Name, "reason": reason}
	var ie *base.IncompatibleError
	if errors.As(err, &ie) {
		details["host_api_versions"], details["plugin_api_versions"] = ie.Host, ie.Plugin
	}
	h.auditSystem(audit.Entry{Action: ActionInstanceIncompat, Target: h.ids.Platform("plugin_instance", r.Name),
		Result: audit.Failure, Details: details})
	coded := errcode.New(CodeIncompatible, "plugin instance %q: %s", r.Name, reason).WithDetails("reason", reason)
	return &startError{state: StateIncompatible, reason: reason, blocked: true, coded: coded}
}

// auditSystem records an entry with the system as actor.
func (h *Host) auditSystem(e audit.Entry) {
	ctx, cancel := context.WithTimeout(h.system, 5*time.Second)
	defer cancel()
	if err := audit.Record(ctx, h.pool, e); err != nil {
		h.log.Error("audit", "action", e.Action, "error", err)
	}
}

// watch follows a running plugin: its exit, and a periodic Info as health
// check (two failures in a row kill it). A lost plugin is restarted.
func (p *proc) watch(l *live) {
	exits := time.NewTicker(p.h.exitPoll)
	defer exits.Stop()
	health := time.NewTicker(p.h.healthInterval)
	defer health.Stop()
	failed := 0
	for {
		select {
		case <-p.h.ctx.Done():
			return
		case <-l.stop:
			return
		case <-exits.C:
			if l.client.Exited() {
				p.lost(l, "plugin process exited unexpectedly")
				return
			}
		case <-health.C:
			ctx, cancel := context.WithTimeout(p.h.ctx, p.h.healthTimeout)
			_, err := l.driver.Info(ctx)
			cancel()
			if err == nil {
				failed = 0
				continue
			}
			if p.h.ctx.Err() != nil {
				return
			}
			failed++
			p.log.Warn("plugin health check failed", "pid", l.pid, "failures", failed, "error", err)
			if failed >= 2 {
				// Kill the process itself: a frozen plugin would not answer
				// go-plugin's graceful shutdown either.
				if l.pid > 0 {
					_ = syscall.Kill(l.pid, syscall.SIGKILL)
				}
				p.lost(l, fmt.Sprintf("health check failed twice (%v); killed", err))
				return
			}
		}
	}
}

// lost handles a plugin process that went away without the host asking:
// the failure is recorded and a restart scheduled after the backoff. It is
// safe to call more than once for the same process.
func (p *proc) lost(l *live, reason string) {
	p.mu.Lock()
	if l.ended {
		p.mu.Unlock()
		return
	}
	l.ended = true
	close(l.stop)
	if p.cur == l {
		p.cur = nil
	}
	now := p.h.now()
	if now.Sub(l.startedAt) >= p.h.stableAfter {
		p.failures = 0
	}
	p.failures++
	delay := p.h.backoff(p.failures)
	p.nextAttempt = now.Add(delay)
	p.pendingRestart = true
	p.state = StateFailed
	p.reason = truncate(fmt.Sprintf("%s; restarting in %s", reason, delay))
	epoch, failures := p.epoch, p.failures
	p.mu.Unlock()
	p.log.Warn("plugin process lost; restarting", "pid", l.pid, "reason", reason, "restart_in", delay, "failures", failures)
	if !p.h.goBackground(l.client.Kill) {
		l.client.Kill()
	}
	p.persist()
	p.scheduleRetry(epoch)
}

// scheduleRetry starts the instance again at nextAttempt when it is
// supervised and nothing else started it meanwhile.
func (p *proc) scheduleRetry(epoch uint64) {
	p.mu.Lock()
	at, supervised := p.nextAttempt, p.supervised
	p.mu.Unlock()
	if !supervised {
		return
	}
	p.h.goBackground(func() {
		t := time.NewTimer(max(at.Sub(p.h.now()), 0))
		defer t.Stop()
		select {
		case <-t.C:
		case <-p.h.ctx.Done():
			return
		}
		p.mu.Lock()
		defer p.mu.Unlock()
		if p.epoch != epoch || p.closed || p.cur != nil || p.starting != nil || p.blocked != nil || p.nextAttempt.After(at) {
			return // changed meanwhile; whoever changed it scheduled what follows
		}
		p.beginLocked()
	})
}

// supervise keeps the instance running from now on and starts it if it is
// not running.
func (p *proc) supervise() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.supervised = true
	if p.cur == nil && p.starting == nil && p.blocked == nil && !p.closed {
		p.beginLocked()
	}
}

// reset stops the plugin process, forgets failures and records state: the
// instance's configuration or enablement changed. A supervised instance is
// started again at once.
func (p *proc) reset(state State, reason string) {
	p.mu.Lock()
	p.epoch++
	l := p.cur
	p.cur = nil
	if l != nil && !l.ended {
		l.ended = true
		close(l.stop)
	}
	p.blocked, p.failures, p.nextAttempt, p.pendingRestart = nil, 0, time.Time{}, false
	p.state, p.reason, p.apiVersion = state, reason, ""
	supervised := p.supervised
	p.mu.Unlock()
	if l != nil {
		p.log.Info("stopping plugin", "pid", l.pid, "reason", reason)
		l.client.Kill()
	}
	p.persist()
	if supervised && p.h.isStarted() {
		p.supervise()
	}
}

// shutdown stops the plugin process for good (Close).
func (p *proc) shutdown() {
	p.mu.Lock()
	p.closed = true
	p.epoch++
	l := p.cur
	p.cur = nil
	if l != nil && !l.ended {
		l.ended = true
		close(l.stop)
	}
	if l != nil {
		p.state, p.reason = StateStopped, "core stopped"
	}
	p.mu.Unlock()
	if l != nil {
		l.client.Kill()
		p.persist()
	}
}

// setStateIf records a state unless the epoch moved on; it reports whether
// it did.
func (p *proc) setStateIf(epoch uint64, s State, reason string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.epoch != epoch || p.closed {
		return false
	}
	p.state, p.reason = s, truncate(reason)
	return true
}

// persist writes the current state to the instance's row and the state
// metric.
func (p *proc) persist() {
	p.dbMu.Lock()
	defer p.dbMu.Unlock()
	p.mu.Lock()
	state, reason, apiVersion := p.state, p.reason, p.apiVersion
	p.mu.Unlock()
	if state == "" {
		return
	}
	p.h.m.setState(p.name, state)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := p.h.pool.Exec(ctx, `UPDATE plugin_instances SET state = $2, state_reason = $3,
		api_version = CASE WHEN $4 = '' THEN api_version ELSE $4 END, updated_at = now() WHERE name = $1`,
		p.name, string(state), reason, apiVersion); err != nil {
		p.log.Error("record instance state", "state", state, "error", err)
	}
}

func truncate(s string) string {
	if len(s) <= maxReason {
		return s
	}
	return s[:maxReason-3] + "..."
}
