// Package daemontest runs a real gpuaasd in-process for tests, against real
// dependencies, on a free loopback port.
package daemontest

import (
	"context"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"

	"github.com/gpuaas/gpuaas/core/internal/config"
	"github.com/gpuaas/gpuaas/core/internal/daemon"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
)

// Instance is a running daemon.
type Instance struct {
	URL  string
	Done chan error
	Stop context.CancelFunc
}

// Start runs the daemon with settings from env (merged over the defaults below) and
// stops it when the test ends. DATABASE_URL, NATS_URL and TEMPORAL_ADDRESS must be
// in env.
func Start(t testing.TB, env map[string]string, args ...string) *Instance {
	t.Helper()
	return StartWith(t, env, daemon.Options{}, args...)
}

// StartWith is Start with daemon options (for example an in-process payments
// driver).
func StartWith(t testing.TB, env map[string]string, opt daemon.Options, args ...string) *Instance {
	t.Helper()
	if env["GPUAAS_TEMPORAL_TASK_QUEUE"] == "" {
		// Tests share one Temporal namespace: each core gets its own queues.
		env["GPUAAS_TEMPORAL_TASK_QUEUE"] = "t" + strings.ReplaceAll(uuid.NewString()[:13], "-", "")
	}
	if env["GPUAAS_STATE_DIR"] == "" {
		env["GPUAAS_STATE_DIR"] = t.TempDir()
	}
	if env["TEMPORAL_NAMESPACE"] == "" {
		env["TEMPORAL_NAMESPACE"] = os.Getenv("TEMPORAL_NAMESPACE")
	}
	cfg, err := config.Load(append([]string{"--listen-addr", "127.0.0.1:0", "--log-level", "debug"}, args...),
		func(k string) string { return env[k] }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	addr := make(chan string, 1)
	in := &Instance{Done: make(chan error, 1), Stop: cancel}
	go func() {
		opt.Version, opt.Ready = "test", func(a string) { addr <- a }
		log := testenv.Logger(t)
		if lvl := env["GPUAAS_LOG_LEVEL"]; lvl != "" {
			log.SetLevel(hclog.LevelFromString(lvl)) // benchmarks keep the log quiet
		}
		in.Done <- daemon.Run(ctx, cfg, log, opt)
	}()
	select {
	case a := <-addr:
		in.URL = "http://" + a
	case err := <-in.Done:
		t.Fatalf("daemon exited at start: %v", err)
	case <-time.After(90 * time.Second):
		t.Fatal("daemon did not start")
	}
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-in.Done:
			in.Done <- err
		case <-time.After(15 * time.Second):
			t.Error("daemon did not stop")
		}
	})
	return in
}
