// Package stripemock runs stripe-mock, Stripe's official API mock, as a child process.
package stripemock

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"

	"github.com/gpuaas/gpuaas/devstack/childproc"
	"github.com/gpuaas/gpuaas/devstack/loopback"
)

// SecretKey is the key every request to stripe-mock may use.
const SecretKey = "sk_test_123"

// InstallHint installs the binary.
const InstallHint = "go install github.com/stripe/stripe-mock@latest"

// Launcher starts child processes.
type Launcher interface {
	Start(cmd *exec.Cmd, opts ...childproc.Option) (*childproc.Process, error)
}

// Config describes one stripe-mock.
type Config struct {
	Bin       string
	HTTPPort  int
	HTTPSPort int // stripe-mock always serves HTTPS too; keep it on a private port
	LogFile   string
}

// Mock is a stripe-mock process that can be stopped and started again on the same port.
type Mock struct {
	cfg      Config
	launcher Launcher
	client   *http.Client

	mu   sync.Mutex
	proc *childproc.Process
	log  *os.File
}

// New returns a stopped mock.
func New(cfg Config, launcher Launcher) (*Mock, error) {
	if cfg.Bin == "" || cfg.HTTPPort == 0 || cfg.HTTPSPort == 0 || cfg.LogFile == "" {
		return nil, errors.New("stripemock: Bin, HTTPPort, HTTPSPort and LogFile are required")
	}
	return &Mock{cfg: cfg, launcher: launcher, client: &http.Client{Timeout: 2 * time.Second}}, nil
}

// Addr is host:port of the HTTP API.
func (m *Mock) Addr() string { return loopback.Addr(m.cfg.HTTPPort) }

// BaseURL is the API base (STRIPE_API_BASE).
func (m *Mock) BaseURL() string { return "http://" + m.Addr() }

// Start starts stripe-mock and waits until it answers.
func (m *Mock) Start(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.proc != nil {
		return nil
	}
	logf, err := os.OpenFile(m.cfg.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("open stripe-mock log: %w", err)
	}
	cmd := exec.Command(m.cfg.Bin,
		"-http-addr", m.Addr(),
		"-https-addr", loopback.Addr(m.cfg.HTTPSPort))
	cmd.Stdout, cmd.Stderr = logf, logf
	proc, err := m.launcher.Start(cmd)
	if err != nil {
		_ = logf.Close()
		return fmt.Errorf("start stripe-mock: %w", err)
	}
	m.proc, m.log = proc, logf
	if err := loopback.Poll(ctx, 50*time.Millisecond, proc.Done(), m.CheckHealth); err != nil {
		select {
		case <-proc.Done():
			err = fmt.Errorf("stripe-mock exited (%v): %w", proc.Err(), err)
		default:
		}
		_ = m.stopLocked(ctx)
		return err
	}
	return nil
}

// Stop stops stripe-mock and returns once its port is closed.
func (m *Mock) Stop(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.stopLocked(ctx)
}

func (m *Mock) stopLocked(ctx context.Context) error {
	if m.proc == nil {
		return nil
	}
	m.proc.Stop(syscall.SIGTERM, 5*time.Second)
	m.proc = nil
	_ = m.log.Close()
	return loopback.WaitClosed(ctx, m.Addr())
}

// CheckHealth lists customers with the test key and expects 200.
func (m *Mock) CheckHealth(ctx context.Context) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, m.BaseURL()+"/v1/customers", nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+SecretKey)
	resp, err := m.client.Do(req)
	if err != nil {
		return err
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET /v1/customers: %s", resp.Status)
	}
	return nil
}
