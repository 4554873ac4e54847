package sdk_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	plugin "github.com/hashicorp/go-plugin"

	"github.com/gpuaas/gpuaas/sdk"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/examples/diskstore"
	"github.com/gpuaas/gpuaas/sdk/examples/instantpay"
	"github.com/gpuaas/gpuaas/sdk/examples/instantprov"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
	"github.com/gpuaas/gpuaas/sdk/sdktest"
	"github.com/gpuaas/gpuaas/sdk/storage"
)

const instantprovPkg = "./examples/instantprov/cmd/gpuaas-plugin-instantprov"

// start launches a plugin binary the way the core does and returns the
// go-plugin client and the dispensed driver.
func start(t *testing.T, path string, sum []byte) (*plugin.Client, base.BasePlugin, error) {
	t.Helper()
	cfg, err := sdk.ClientConfig(sdk.Launch{Path: path, SHA256: sum, Logger: hclog.NewNullLogger(), StartTimeout: 20 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	c := plugin.NewClient(cfg)
	t.Cleanup(c.Kill)
	d, err := sdk.Dispense(c, base.KindProvisioner)
	return c, d, err
}

func checksum(t *testing.T, path string) []byte {
	t.Helper()
	sum, err := sdk.FileSHA256(path)
	if err != nil {
		t.Fatal(err)
	}
	return sum
}

func configureSlow(t *testing.T, d base.BasePlugin) *provisioner.Client {
	t.Helper()
	p := d.(*provisioner.Client)
	sdktest.Configure(t, p, provisioner.SupportedAPIVersions(), map[string]any{
		"webhook_secret": "serve-test-secret-0123456789", "call_delay": "30s",
	})
	return p
}

func TestServeRefusesToRunByHand(t *testing.T) {
	t.Parallel()
	err := sdk.Serve(context.Background(), func(hclog.Logger) (base.BasePlugin, error) {
		t.Fatal("the factory ran without the handshake cookie")
		return nil, nil
	}, sdk.WithGetenv(func(string) string { return "" }))
	if !errors.Is(err, sdk.ErrNotPlugin) {
		t.Fatalf("got %v, want ErrNotPlugin", err)
	}

	bin := sdktest.BuildBinary(t, instantprovPkg)
	var stderr bytes.Buffer
	cmd := exec.Command(bin)
	cmd.Stderr = &stderr
	err = cmd.Run()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 || !strings.Contains(stderr.String(), "the gpuaas core starts it") {
		t.Fatalf("run by hand: %v, stderr %q; want exit 1 and an explanation", err, stderr.String())
	}
}

func TestPluginSet(t *testing.T) {
	t.Parallel()
	log := hclog.NewNullLogger()
	for _, c := range []struct {
		name   string
		driver base.BasePlugin
		kind   base.Kind
		want   string
	}{
		{"provisioner", instantprov.New(log), base.KindProvisioner, ""},
		{"payments", instantpay.New(log), base.KindPayments, ""},
		{"storage", diskstore.New(log), base.KindStorage, ""},
		{"no kind", baseOnly{}, "", "implements no driver kind"},
		{"two kinds", twoKinds{instantprov.New(log), diskstore.New(log)}, "", "implements several driver kinds"},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			set, kind, err := sdk.PluginSet(c.driver)
			if c.want != "" {
				if err == nil || !strings.Contains(err.Error(), c.want) {
					t.Fatalf("got %v, want %q", err, c.want)
				}
				return
			}
			if err != nil || kind != c.kind || len(set) != 1 || set[string(c.kind)] == nil {
				t.Fatalf("got %v, %q, %v", set, kind, err)
			}
		})
	}
}

type baseOnly struct{ base.BasePlugin }

var _ base.BasePlugin = baseOnly{}

// twoKinds is a (wrong) driver that is both a provisioner and a store.
type twoKinds struct {
	*provDriver
	*storeDriver
}

type (
	provDriver  = instantprov.Driver
	storeDriver = diskstore.Driver
)

var (
	_ provisioner.Driver = twoKinds{}
	_ storage.Driver     = twoKinds{}
)

func (k twoKinds) Info(ctx context.Context) (*base.Info, error) { return k.provDriver.Info(ctx) }

func (k twoKinds) ConfigSchema(ctx context.Context) (*base.ConfigSchema, error) {
	return k.provDriver.ConfigSchema(ctx)
}

func (k twoKinds) Configure(ctx context.Context, cfg *base.Config) error {
	return k.provDriver.Configure(ctx, cfg)
}

func TestLaunchChecksBinary(t *testing.T) {
	t.Parallel()
	bin := sdktest.BuildBinary(t, instantprovPkg)
	if _, err := sdk.ClientConfig(sdk.Launch{Path: bin}); !errors.Is(err, base.ErrInvalidArgument) {
		t.Fatalf("ClientConfig without a checksum: got %v, want ErrInvalidArgument", err)
	}
	wrong := sha256.Sum256([]byte("some other binary"))
	_, _, err := start(t, bin, wrong[:])
	if err == nil || !strings.Contains(err.Error(), "checksum") {
		t.Fatalf("a binary with another checksum: got %v, want a checksum error", err)
	}
	_, d, err := start(t, bin, checksum(t, bin))
	if err != nil {
		t.Fatalf("the binary with its checksum: %v", err)
	}
	info, err := d.Info(context.Background())
	if err != nil || info.Name != "instantprov" {
		t.Fatalf("Info = %+v, %v", info, err)
	}
}

func TestLaunchEnvironment(t *testing.T) {
	t.Setenv("DATABASE_URL", "postgres://core:secret@db/gpuaas")
	t.Setenv("TZ", "Europe/Berlin")
	sum := sha256.Sum256(nil)
	cfg, err := sdk.ClientConfig(sdk.Launch{Path: "/bin/true", SHA256: sum[:], Env: []string{"GOMAXPROCS=1", "TZ=UTC"}})
	if err != nil {
		t.Fatal(err)
	}
	if !cfg.SkipHostEnv {
		t.Error("go-plugin would add the host's whole environment")
	}
	env := strings.Join(cfg.Cmd.Env, "\n")
	for _, want := range []string{"TZ=Europe/Berlin\n", "GOMAXPROCS=1", "TZ=UTC"} {
		if !strings.Contains(env, want) {
			t.Errorf("plugin environment lacks %q:\n%s", want, env)
		}
	}
	if strings.Contains(env, "DATABASE_URL") {
		t.Errorf("the core's DATABASE_URL reaches the plugin:\n%s", env)
	}
	if !strings.HasSuffix(env, "TZ=UTC") {
		t.Errorf("Launch.Env does not come last (last value wins):\n%s", env)
	}
}

func TestPluginKilledMidCall(t *testing.T) {
	t.Parallel()
	bin := sdktest.BuildBinary(t, instantprovPkg)
	c, d, err := start(t, bin, checksum(t, bin))
	if err != nil {
		t.Fatal(err)
	}
	p := configureSlow(t, d)
	done := make(chan error, 1)
	go func() {
		_, err := p.Probe(context.Background(), "")
		done <- err
	}()
	time.Sleep(200 * time.Millisecond)
	if err := syscall.Kill(c.ReattachConfig().Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, base.ErrPluginExited) || !errors.Is(err, base.ErrUnavailable) {
			t.Fatalf("got %v, want ErrPluginExited and ErrUnavailable", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the call did not return after the plugin was killed")
	}
}

func TestPluginStopsOnSIGTERM(t *testing.T) {
	t.Parallel()
	bin := sdktest.BuildBinary(t, instantprovPkg)
	c, d, err := start(t, bin, checksum(t, bin))
	if err != nil {
		t.Fatal(err)
	}
	configureSlow(t, d)
	if err := syscall.Kill(c.ReattachConfig().Pid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !c.Exited() {
		if time.Now().After(deadline) {
			t.Fatal("the plugin still runs 10s after SIGTERM")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestPluginStopsWhenParentDies(t *testing.T) {
	t.Parallel()
	bin := sdktest.BuildBinary(t, instantprovPkg)
	// The shell starts the plugin, prints its pid, waits for the handshake
	// line and dies, as a core killed with SIGKILL would.
	handshake := t.TempDir() + "/handshake"
	cmd := exec.Command("sh", "-c", `"$0" >"$1" 2>/dev/null & echo $!; while [ ! -s "$1" ]; do sleep 0.05; done`, bin, handshake)
	cmd.Env = append(os.Environ(), base.MagicCookieKey+"="+base.MagicCookieValue)
	out, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(out)))
	if err != nil {
		t.Fatalf("pid %q: %v", out, err)
	}
	t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGKILL) })
	deadline := time.Now().Add(10 * time.Second)
	for alive(pid) {
		if time.Now().After(deadline) {
			t.Fatalf("plugin %d still runs 10s after its parent died", pid)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// alive reports whether pid runs (a zombie waiting for its reaper does not).
func alive(pid int) bool {
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	fields := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
	return len(fields) > 0 && fields[0] != "Z"
}
