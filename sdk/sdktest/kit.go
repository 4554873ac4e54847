// Package sdktest is the gpuaas driver conformance kit: a Go test suite a
// driver author runs from their own _test.go against their driver, once in
// process over real gRPC (go-plugin's test connection) and once as the
// built binary started the way the core starts it (go-plugin client,
// AutoMTLS, SecureConfig checksum).
//
//	func TestConformance(t *testing.T) {
//		suite := sdktest.StorageSuite{Config: func(t testing.TB) map[string]any {
//			return map[string]any{"root": t.TempDir()}
//		}}
//		t.Run("in-process", func(t *testing.T) {
//			suite.Run(t, sdktest.InProcess(func(t testing.TB) base.BasePlugin {
//				return mydriver.New(hclog.NewNullLogger())
//			}))
//		})
//		t.Run("binary", func(t *testing.T) {
//			suite.Run(t, sdktest.Binary(sdktest.BuildBinary(t, "./cmd/gpuaas-plugin-mydriver")))
//		})
//	}
//
// What it checks, for every kind: Info and ConfigSchema are sane and the
// API version negotiates; configuration with a missing required field, a
// wrong type or an unknown field is refused naming the field; mutating
// calls are idempotent by operation id and refuse a reused id with other
// arguments; errors map to the SDK sentinels across the wire (every
// sentinel, in process); a cancelled or expired context ends a call
// promptly with context.Canceled or context.DeadlineExceeded; optional
// capabilities answer base.ErrUnimplemented exactly when Info says they are
// absent. Storage adds streaming (an 8 MiB object round-trips byte for
// byte, a short body leaves no object) and listing; provisioner adds
// operation progress and, with the discover capability, a paged discovery
// that lists the enrolled nodes once each; payments adds webhook
// verification.
package sdktest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	plugin "github.com/hashicorp/go-plugin"

	"github.com/gpuaas/gpuaas/sdk"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/payments"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
	"github.com/gpuaas/gpuaas/sdk/storage"
)

// Target is a driver under test: built in process, or a binary.
type Target struct {
	factory func(t testing.TB) base.BasePlugin
	path    string
	env     []string
}

// InProcess targets the driver factory builds, served over real gRPC on a
// local socket through the SDK's server and client shims. The kit may call
// factory several times; each driver must be independent.
func InProcess(factory func(t testing.TB) base.BasePlugin) Target {
	return Target{factory: factory}
}

// Binary targets a built driver binary, started as a child process the way
// the core starts it: go-plugin client, AutoMTLS and the binary's SHA-256
// as SecureConfig. env is added to the plugin's environment.
func Binary(path string, env ...string) Target {
	return Target{path: path, env: env}
}

// InProcessTarget reports whether the target runs in this process.
func (tg Target) InProcessTarget() bool { return tg.factory != nil }

func (tg Target) String() string {
	if tg.factory != nil {
		return "in-process"
	}
	return "binary " + filepath.Base(tg.path)
}

// BuildBinary builds the main package pkg (as go build understands it,
// relative to the test's working directory) into t.TempDir and returns the
// binary's path.
func BuildBinary(t testing.TB, pkg string) string {
	t.Helper()
	goTool, err := exec.LookPath("go")
	if err != nil {
		goTool = filepath.Join(os.Getenv("GOROOT"), "bin", "go")
	}
	out := filepath.Join(t.TempDir(), filepath.Base(pkg))
	cmd := exec.Command(goTool, "build", "-o", out, pkg)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, stderr.String())
	}
	return out
}

// Connect starts the target and returns the host-side client of kind: a
// *provisioner.Client, *payments.Client or *storage.Client. The plugin is
// stopped when the test ends.
func Connect(t testing.TB, target Target, kind base.Kind) base.BasePlugin {
	t.Helper()
	if target.factory != nil {
		return connectInProcess(t, target.factory(t), kind)
	}
	return connectBinary(t, target, kind)
}

// ConnectStorage is Connect for a storage driver.
func ConnectStorage(t testing.TB, target Target) *storage.Client {
	t.Helper()
	return must[*storage.Client](t, Connect(t, target, base.KindStorage))
}

// ConnectProvisioner is Connect for a provisioner driver.
func ConnectProvisioner(t testing.TB, target Target) *provisioner.Client {
	t.Helper()
	return must[*provisioner.Client](t, Connect(t, target, base.KindProvisioner))
}

// ConnectPayments is Connect for a payments driver.
func ConnectPayments(t testing.TB, target Target) *payments.Client {
	t.Helper()
	return must[*payments.Client](t, Connect(t, target, base.KindPayments))
}

func must[C any](t testing.TB, d base.BasePlugin) C {
	t.Helper()
	c, ok := d.(C)
	if !ok {
		var want C
		t.Fatalf("dispensed %T, want %T", d, want)
	}
	return c
}

func connectInProcess(t testing.TB, driver base.BasePlugin, kind base.Kind) base.BasePlugin {
	t.Helper()
	set, got, err := sdk.PluginSet(driver)
	if err != nil {
		t.Fatalf("driver: %v", err)
	}
	if got != kind {
		t.Fatalf("driver %T is a %s driver, want %s", driver, got, kind)
	}
	client, server := plugin.TestPluginGRPCConn(t, false, set)
	t.Cleanup(func() {
		// Stop the server first: Close asks the server to stop itself, and
		// go-plugin's GRPCServer.Stop must not run twice at once.
		server.Stop()
		_ = client.Close()
	})
	raw, err := client.Dispense(string(kind))
	if err != nil {
		t.Fatalf("dispense %s: %v", kind, err)
	}
	d, ok := raw.(base.BasePlugin)
	if !ok {
		t.Fatalf("dispensed %T", raw)
	}
	return d
}

func connectBinary(t testing.TB, target Target, kind base.Kind) base.BasePlugin {
	t.Helper()
	sum, err := sdk.FileSHA256(target.path)
	if err != nil {
		t.Fatal(err)
	}
	logs := &testLog{t: t}
	level := hclog.Info
	if _, bench := t.(*testing.B); bench {
		level = hclog.Warn // keep benchmark output to results
	}
	cfg, err := sdk.ClientConfig(sdk.Launch{
		Path:   target.path,
		Env:    target.env,
		SHA256: sum,
		Logger: hclog.New(&hclog.LoggerOptions{
			Name:   filepath.Base(target.path),
			Output: logs,
			Level:  level,
		}),
		StartTimeout: 30 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	client := plugin.NewClient(cfg)
	t.Cleanup(logs.stop) // runs after Kill: cleanups run last in, first out
	t.Cleanup(client.Kill)
	d, err := sdk.Dispense(client, kind)
	if err != nil {
		t.Fatalf("start %s: %v", target.path, err)
	}
	return d
}

var _ io.Writer = (*testLog)(nil)

// testLog sends a plugin's re-emitted log lines to the test log until the
// test is over.
type testLog struct {
	mu      sync.Mutex
	t       testing.TB
	stopped bool
}

func (l *testLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.stopped {
		l.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

func (l *testLog) stop() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.stopped = true
}

// configurer is what the kit needs to send configurations unvalidated.
type configurer interface {
	base.BasePlugin
	ConfigureJSON(ctx context.Context, apiVersion, instance string, configJSON []byte) error
}

var _ configurer = (*base.Client)(nil)

// Configure negotiates the API version with the driver and configures it
// with raw, validated against the driver's schema first as the core does.
// It returns the negotiated version.
func Configure(t testing.TB, d base.BasePlugin, hostVersions []string, raw map[string]any) string {
	t.Helper()
	ctx := testContext(t)
	info, err := d.Info(ctx)
	if err != nil {
		t.Fatalf("Info: %v", err)
	}
	version, err := base.NegotiateAPIVersion(hostVersions, info.APIVersions)
	if err != nil {
		t.Fatalf("negotiate: %v", err)
	}
	schema, err := d.ConfigSchema(ctx)
	if err != nil {
		t.Fatalf("ConfigSchema: %v", err)
	}
	cfg, err := base.ValidateConfig(schema, raw)
	if err != nil {
		t.Fatalf("the suite's Config does not validate: %v", err)
	}
	cfg.APIVersion = version
	cfg.Instance = "sdktest"
	if err := d.Configure(ctx, cfg); err != nil {
		t.Fatalf("Configure: %v", err)
	}
	return version
}

// testContext is a context that ends with the test, or after a minute.
func testContext(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// opIDs hands out unique operation ids.
type opIDs struct {
	prefix string
	mu     sync.Mutex
	n      int
}

func newOpIDs(t testing.TB) *opIDs {
	return &opIDs{prefix: fmt.Sprintf("sdktest-%d", time.Now().UnixNano())}
}

func (o *opIDs) next(what string) string {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.n++
	return fmt.Sprintf("%s-%s-%d", o.prefix, what, o.n)
}

// wantErr fails the test unless err matches target.
func wantErr(t testing.TB, call string, err, target error) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Fatalf("%s: got error %v, want one matching %q", call, err, target)
	}
}

// wantOK fails the test on err.
func wantOK(t testing.TB, call string, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", call, err)
	}
}

// promptly is how soon a cancelled call must return.
const promptly = 2 * time.Second

// cancelMidCall starts call with a context, cancels it after a moment, and
// checks that call returns context.Canceled promptly.
func cancelMidCall(t testing.TB, name string, call func(ctx context.Context) error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- call(ctx) }()
	select {
	case err := <-done:
		t.Fatalf("%s returned before it was cancelled (%v); it must block for the check", name, err)
	case <-time.After(200 * time.Millisecond):
	}
	cancel()
	select {
	case err := <-done:
		wantErr(t, name+" cancelled mid-call", err, context.Canceled)
	case <-time.After(promptly):
		t.Fatalf("%s did not return within %s of its context being cancelled", name, promptly)
	}
}

// preCancelled checks that call with an already cancelled context returns
// context.Canceled promptly, and with an expired one
// context.DeadlineExceeded.
func preCancelled(t testing.TB, name string, call func(ctx context.Context) error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	start := time.Now()
	err := call(ctx)
	wantErr(t, name+" with a cancelled context", err, context.Canceled)
	if d := time.Since(start); d > promptly {
		t.Fatalf("%s with a cancelled context took %s", name, d)
	}
	dctx, dcancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer dcancel()
	err = call(dctx)
	wantErr(t, name+" with an expired context", err, context.DeadlineExceeded)
}
