// Package stack starts the development stack (PostgreSQL, NATS JetStream, Temporal, S3 and
// stripe-mock) on free loopback ports, checks each component's health, lets tests stop and
// restart single components, and stops everything again.
package stack

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gpuaas/gpuaas/devstack/childproc"
	"github.com/gpuaas/gpuaas/devstack/loopback"
	"github.com/gpuaas/gpuaas/devstack/natssrv"
	"github.com/gpuaas/gpuaas/devstack/pgcluster"
	"github.com/gpuaas/gpuaas/devstack/s3gw"
	"github.com/gpuaas/gpuaas/devstack/stripemock"
	"github.com/gpuaas/gpuaas/devstack/temporalsrv"
	"github.com/gpuaas/gpuaas/devstack/toolpath"
)

// Component names.
const (
	Postgres = "postgres"
	NATS     = "nats"
	Temporal = "temporal"
	S3       = "s3"
	Stripe   = "stripe"
)

// Names lists every component.
func Names() []string { return []string{Postgres, NATS, Temporal, S3, Stripe} }

// AppName names the Postgres role and database, the Temporal namespace and the S3 bucket.
const AppName = "gpuaas"

// marker marks a folder as a dev stack's, which makes it safe to wipe.
const marker = ".gpuaas-devstack"

// Config describes a stack.
type Config struct {
	Dir        string   // required; wiped at start unless Keep
	Components []string // all when empty
	Keep       bool     // reuse the data already in Dir
	// StartTimeout bounds each component's start and health check (default 2 minutes).
	StartTimeout time.Duration
	PGBinDir     string              // pgcluster.DefaultBinDir when empty
	Getenv       func(string) string // os.Getenv when nil; used to find binaries
	Logger       hclog.Logger        // silent when nil
	// Launcher starts the child processes; the stack makes (and closes) its own when nil.
	Launcher *childproc.Launcher
}

// component is what the stack needs from each server.
type component interface {
	Start(ctx context.Context) error
	Stop(ctx context.Context) error
	Addr() string
	CheckHealth(ctx context.Context) error
}

var (
	_ component = (*pgcluster.Cluster)(nil)
	_ component = (*natssrv.Server)(nil)
	_ component = (*temporalsrv.Server)(nil)
	_ component = (*s3gw.Gateway)(nil)
	_ component = (*stripemock.Mock)(nil)
)

type member struct {
	name    string
	comp    component
	logFile string
	env     []EnvVar

	mu      sync.Mutex // serialises Start and Stop
	running bool
}

// EnvVar is one line of the env file.
type EnvVar struct{ Key, Value string }

// Stack is a running dev stack.
type Stack struct {
	cfg         Config
	dir         string
	log         hclog.Logger
	launcher    *childproc.Launcher
	ownLauncher bool
	lock        *os.File
	members     []*member

	control     *http.Server
	controlAddr string

	pg       *pgcluster.Cluster
	nats     *natssrv.Server
	temporal *temporalsrv.Server
	s3       *s3gw.Gateway
	stripe   *stripemock.Mock
}

// Start prepares cfg.Dir, starts the chosen components in parallel and returns once every one
// of them is healthy and the control API is up. On failure everything started is stopped
// again and the error names the component, its last error and the tail of its log.
func Start(ctx context.Context, cfg Config) (_ *Stack, err error) {
	if cfg.Dir == "" {
		return nil, errors.New("stack: Dir is required")
	}
	if len(cfg.Components) == 0 {
		cfg.Components = Names()
	}
	for _, c := range cfg.Components {
		if !slices.Contains(Names(), c) {
			return nil, fmt.Errorf("unknown component %q (known: %s)", c, strings.Join(Names(), ", "))
		}
	}
	if cfg.StartTimeout == 0 {
		cfg.StartTimeout = 2 * time.Minute
	}
	if cfg.Getenv == nil {
		cfg.Getenv = os.Getenv
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	dir, err := filepath.Abs(cfg.Dir)
	if err != nil {
		return nil, err
	}
	s := &Stack{cfg: cfg, dir: dir, log: cfg.Logger, launcher: cfg.Launcher}
	if s.launcher == nil {
		s.launcher, s.ownLauncher = childproc.NewLauncher(), true
	}
	defer func() {
		if err != nil {
			if stopErr := s.Stop(context.WithoutCancel(ctx)); stopErr != nil {
				s.log.Warn("stop after failed start", "error", stopErr)
			}
		}
	}()
	if s.lock, err = prepareDir(dir, cfg.Keep); err != nil {
		return nil, err
	}
	ports := &loopback.Ports{}
	err = s.build(ports)
	ports.Release()
	if err != nil {
		return nil, err
	}

	began := time.Now()
	errs := make([]error, len(s.members))
	var wg sync.WaitGroup
	for i, m := range s.members {
		wg.Go(func() {
			errs[i] = s.startMember(ctx, m)
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if err := s.serveControl(); err != nil {
		return nil, err
	}
	s.log.Info("stack ready", "took", time.Since(began).Round(time.Millisecond), "dir", dir)
	return s, nil
}

func (s *Stack) wants(name string) bool { return slices.Contains(s.cfg.Components, name) }

// build makes every chosen component (stopped) on ports reserved from ports.
func (s *Stack) build(ports *loopback.Ports) error {
	take := func(n int) ([]int, error) {
		out := make([]int, n)
		for i := range out {
			p, err := ports.Take()
			if err != nil {
				return nil, err
			}
			out[i] = p
		}
		return out, nil
	}
	logFile := func(name string) string { return filepath.Join(s.dir, name+".log") }
	add := func(name string, c component, env ...EnvVar) {
		s.members = append(s.members, &member{name: name, comp: c, logFile: logFile(name), env: env})
	}

	if s.wants(Postgres) {
		p, err := take(1)
		if err != nil {
			return err
		}
		pg, err := pgcluster.New(pgcluster.Config{
			BinDir:  s.cfg.PGBinDir,
			DataDir: filepath.Join(s.dir, "postgres"),
			LogFile: logFile(Postgres),
			Port:    p[0],
			AppName: AppName,
		}, s.launcher)
		if err != nil {
			return err
		}
		s.pg = pg
		add(Postgres, pg,
			EnvVar{"DATABASE_URL", pg.URL()},
			EnvVar{"GPUAAS_PG_ADMIN_URL", pg.AdminURL()},
			EnvVar{"GPUAAS_PG_BIN", pg.BinDir()})
	}
	if s.wants(NATS) {
		p, err := take(1)
		if err != nil {
			return err
		}
		n, err := natssrv.New(natssrv.Config{Port: p[0], StoreDir: filepath.Join(s.dir, "nats"), LogFile: logFile(NATS)})
		if err != nil {
			return err
		}
		s.nats = n
		add(NATS, n, EnvVar{"NATS_URL", n.URL()})
	}
	if s.wants(Temporal) {
		p, err := take(5)
		if err != nil {
			return err
		}
		t, err := temporalsrv.New(temporalsrv.Config{
			DBFile:     filepath.Join(s.dir, "temporal.db"),
			LogFile:    logFile(Temporal),
			Namespaces: []string{AppName, "default"},
			Ports:      temporalsrv.Ports{Frontend: p[0], FrontendHTTP: p[1], History: p[2], Matching: p[3], Worker: p[4]},
		})
		if err != nil {
			return err
		}
		s.temporal = t
		add(Temporal, t, EnvVar{"TEMPORAL_ADDRESS", t.Addr()}, EnvVar{"TEMPORAL_NAMESPACE", AppName})
	}
	if s.wants(S3) {
		bin, err := toolpath.Find("versitygw", s3gw.InstallHint, s.cfg.Getenv)
		if err != nil {
			return err
		}
		p, err := take(1)
		if err != nil {
			return err
		}
		g, err := s3gw.New(s3gw.Config{
			Bin: bin, Port: p[0], RootDir: filepath.Join(s.dir, "s3"), LogFile: logFile(S3),
			Region: "us-east-1", Bucket: AppName,
		}, s.launcher)
		if err != nil {
			return err
		}
		s.s3 = g
		key, secret := g.Credentials()
		add(S3, g,
			EnvVar{"S3_ENDPOINT", g.Endpoint()},
			EnvVar{"S3_REGION", g.Region()},
			EnvVar{"S3_BUCKET", g.Bucket()},
			EnvVar{"S3_ACCESS_KEY_ID", key},
			EnvVar{"S3_SECRET_ACCESS_KEY", secret})
	}
	if s.wants(Stripe) {
		bin, err := toolpath.Find("stripe-mock", stripemock.InstallHint, s.cfg.Getenv)
		if err != nil {
			return err
		}
		p, err := take(2)
		if err != nil {
			return err
		}
		m, err := stripemock.New(stripemock.Config{Bin: bin, HTTPPort: p[0], HTTPSPort: p[1], LogFile: logFile(Stripe)}, s.launcher)
		if err != nil {
			return err
		}
		s.stripe = m
		add(Stripe, m, EnvVar{"STRIPE_API_BASE", m.BaseURL()}, EnvVar{"STRIPE_SECRET_KEY", stripemock.SecretKey})
	}
	return nil
}

// startMember starts one component and waits for its health check.
func (s *Stack) startMember(ctx context.Context, m *member) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.running {
		return nil
	}
	began := time.Now()
	ctx, cancel := context.WithTimeout(ctx, s.cfg.StartTimeout)
	defer cancel()
	if err := m.comp.Start(ctx); err != nil {
		if cause := context.Cause(ctx); cause != nil && !errors.Is(cause, context.DeadlineExceeded) {
			return fmt.Errorf("%s: start interrupted: %w", m.name, cause)
		}
		return fmt.Errorf("%s did not become healthy within %s: %w%s", m.name, s.cfg.StartTimeout, err, logTail(m.logFile))
	}
	m.running = true
	s.log.Info(m.name+" ready", "addr", m.comp.Addr(), "took", time.Since(began).Round(time.Millisecond))
	return nil
}

func (s *Stack) stopMember(ctx context.Context, m *member) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	// Stop even when not marked running: a failed start may have left something behind.
	err := m.comp.Stop(ctx)
	if m.running {
		s.log.Info(m.name + " stopped")
	}
	m.running = false
	if err != nil {
		return fmt.Errorf("stop %s: %w", m.name, err)
	}
	return nil
}

func (s *Stack) member(name string) (*member, bool) {
	for _, m := range s.members {
		if m.name == name {
			return m, true
		}
	}
	return nil, false
}

// ErrUnknownComponent is returned for a component the stack does not run.
var ErrUnknownComponent = errors.New("unknown component")

// StopComponent stops one component and returns once its port is closed.
func (s *Stack) StopComponent(ctx context.Context, name string) error {
	m, ok := s.member(name)
	if !ok {
		return fmt.Errorf("%w: %q", ErrUnknownComponent, name)
	}
	return s.stopMember(ctx, m)
}

// StartComponent starts a stopped component again, on the same port with the same data, and
// returns once it is healthy.
func (s *Stack) StartComponent(ctx context.Context, name string) error {
	m, ok := s.member(name)
	if !ok {
		return fmt.Errorf("%w: %q", ErrUnknownComponent, name)
	}
	return s.startMember(ctx, m)
}

// Status describes one component.
type Status struct {
	Name    string `json:"name"`
	State   string `json:"state"` // "running" or "stopped"
	Address string `json:"address"`
}

// Components reports every component's state.
func (s *Stack) Components() []Status {
	out := make([]Status, 0, len(s.members))
	for _, m := range s.members {
		out = append(out, m.status())
	}
	return out
}

func (m *member) status() Status {
	m.mu.Lock()
	defer m.mu.Unlock()
	st := Status{Name: m.name, State: "stopped", Address: m.comp.Addr()}
	if m.running {
		st.State = "running"
	}
	return st
}

// CheckHealth runs every running component's health check once.
func (s *Stack) CheckHealth(ctx context.Context) error {
	var errs []error
	for _, m := range s.members {
		if m.status().State != "running" {
			continue
		}
		if err := m.comp.CheckHealth(ctx); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", m.name, err))
		}
	}
	return errors.Join(errs...)
}

// Dir is the stack's folder.
func (s *Stack) Dir() string { return s.dir }

// ControlURL is the control API's base URL.
func (s *Stack) ControlURL() string { return "http://" + s.controlAddr }

// Env returns the variables that reach the stack, in a fixed order.
func (s *Stack) Env() []EnvVar {
	var out []EnvVar
	for _, m := range s.members {
		out = append(out, m.env...)
	}
	if s.controlAddr != "" {
		out = append(out, EnvVar{"GPUAAS_DEVSTACK_CONTROL", s.ControlURL()})
	}
	return out
}

// Environ returns Env as KEY=VALUE strings.
func (s *Stack) Environ() []string {
	var out []string
	for _, e := range s.Env() {
		out = append(out, e.Key+"="+e.Value)
	}
	return out
}

// WriteEnvFile writes Env to path atomically (temporary file and rename), so a reader never
// sees a partial file.
func (s *Stack) WriteEnvFile(path string) error {
	var b strings.Builder
	for _, kv := range s.Environ() {
		b.WriteString(kv + "\n")
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	_, err = f.WriteString(b.String())
	err = errors.Join(err, f.Chmod(0o600), f.Close())
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		_ = os.Remove(f.Name())
		return fmt.Errorf("write env file: %w", err)
	}
	return nil
}

// Postgres, NATS, Temporal, S3 and Stripe return the running components (nil when not chosen).
func (s *Stack) Postgres() *pgcluster.Cluster  { return s.pg }
func (s *Stack) NATS() *natssrv.Server         { return s.nats }
func (s *Stack) Temporal() *temporalsrv.Server { return s.temporal }
func (s *Stack) S3() *s3gw.Gateway             { return s.s3 }
func (s *Stack) Stripe() *stripemock.Mock      { return s.stripe }

// Stop stops the control API and every component (in parallel), and releases the folder.
func (s *Stack) Stop(ctx context.Context) error {
	var errs []error
	if s.control != nil {
		shutCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
		errs = append(errs, s.control.Shutdown(shutCtx))
		cancel()
		s.control = nil
	}
	stopErrs := make([]error, len(s.members))
	var wg sync.WaitGroup
	for i, m := range s.members {
		wg.Go(func() {
			stopCtx, cancel := context.WithTimeout(ctx, time.Minute)
			defer cancel()
			stopErrs[i] = s.stopMember(stopCtx, m)
		})
	}
	wg.Wait()
	errs = append(errs, stopErrs...)
	if s.ownLauncher {
		s.launcher.Close()
	}
	if s.lock != nil {
		errs = append(errs, s.lock.Close()) // closing releases the flock
		s.lock = nil
	}
	return errors.Join(errs...)
}

// prepareDir makes dir ready for a stack and locks it. A fresh stack (keep=false) wipes the
// folder, which is only done to folders that are empty or carry the marker file.
func prepareDir(dir string, keep bool) (*os.File, error) {
	entries, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	if len(entries) > 0 {
		if _, err := os.Stat(filepath.Join(dir, marker)); err != nil {
			return nil, fmt.Errorf("%s is not empty and is not a dev stack folder (no %s); refusing to use it", dir, marker)
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, marker), []byte("gpuaas dev stack folder: wiped at each fresh start\n"), 0o644); err != nil {
		return nil, err
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		_ = lock.Close()
		return nil, fmt.Errorf("another dev stack is running in %s: %w", dir, err)
	}
	if keep {
		return lock, nil
	}
	for _, e := range entries {
		if e.Name() == marker || e.Name() == ".lock" {
			continue
		}
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			_ = lock.Close()
			return nil, fmt.Errorf("wipe %s: %w", dir, err)
		}
	}
	return lock, nil
}

// logTail formats the last lines of a component's log for an error message.
func logTail(path string) string {
	const maxBytes, maxLines = 4096, 20
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || st.Size() == 0 {
		return ""
	}
	off := max(st.Size()-maxBytes, 0)
	buf := make([]byte, st.Size()-off)
	if _, err := f.ReadAt(buf, off); err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(buf), "\n"), "\n")
	if off > 0 && len(lines) > 1 {
		lines = lines[1:] // first line is probably cut
	}
	if len(lines) > maxLines {
		lines = lines[len(lines)-maxLines:]
	}
	return fmt.Sprintf("\n--- last lines of %s ---\n%s\n---", path, strings.Join(lines, "\n"))
}
