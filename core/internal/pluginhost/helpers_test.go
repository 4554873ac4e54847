package pluginhost_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/kms"
	"github.com/gpuaas/gpuaas/core/internal/pluginhost"
	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
)

// binDir holds the plugin binaries TestMain builds once for the package.
var binDir string

// The binaries, by the name go build gives them.
const (
	binInstantprov = "gpuaas-plugin-instantprov"
	binDiskstore   = "gpuaas-plugin-diskstore"
	binInstantpay  = "gpuaas-plugin-instantpay"
	binExiter      = "exiter"
	binHanger      = "hanger"
	binWrongproto  = "wrongproto"
	binFutureprov  = "futureprov"
	binCorehost    = "corehost"
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "pluginhost-bins-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binDir = dir
	cmd := exec.Command(goTool(), "build", "-o", dir+string(filepath.Separator),
		"github.com/gpuaas/gpuaas/sdk/examples/instantprov/cmd/"+binInstantprov,
		"github.com/gpuaas/gpuaas/sdk/examples/diskstore/cmd/"+binDiskstore,
		"github.com/gpuaas/gpuaas/sdk/examples/instantpay/cmd/"+binInstantpay,
		"./testdata/"+binExiter, "./testdata/"+binHanger, "./testdata/"+binWrongproto,
		"./testdata/"+binFutureprov, "./testdata/"+binCorehost)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building the test plugins:", err)
		_ = os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return filepath.Join(os.Getenv("GOROOT"), "bin", "go")
}

// bin returns a private copy of a built binary, so a test may tamper with it.
func bin(t testing.TB, name string) string {
	t.Helper()
	src, err := os.ReadFile(filepath.Join(binDir, name))
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(dst, src, 0o755); err != nil {
		t.Fatal(err)
	}
	return dst
}

// testLog sends log lines to the test log until the test is over, and
// keeps them for assertions.
type testLog struct {
	mu      sync.Mutex
	t       testing.TB
	buf     bytes.Buffer
	stopped bool
}

var _ io.Writer = (*testLog)(nil)

func (l *testLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf.Write(p)
	if !l.stopped {
		l.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

func (l *testLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// bundle is what a test works with: a fresh database, a keyring and a host.
type bundle struct {
	pool    *pgxpool.Pool
	url     string
	keyDir  string
	keys    *kms.Local
	host    *pluginhost.Host
	reg     *prometheus.Registry
	log     *testLog
	admin   context.Context
	adminID uuid.UUID
}

func setup(t testing.TB, opts ...pluginhost.Option) *bundle {
	t.Helper()
	pool, url := testenv.MigratedPool(t)
	keyDir := filepath.Join(t.TempDir(), "keys")
	keys, err := kms.NewLocal(keyDir)
	if err != nil {
		t.Fatal(err)
	}
	level := hclog.Info
	if _, bench := t.(*testing.B); bench {
		level = hclog.Error
	}
	tl := &testLog{t: t}
	t.Cleanup(func() {
		tl.mu.Lock()
		tl.stopped = true
		tl.mu.Unlock()
	})
	reg := prometheus.NewRegistry()
	opts = append([]pluginhost.Option{
		pluginhost.WithLogger(hclog.New(&hclog.LoggerOptions{Name: "host", Output: tl, Level: level})),
		pluginhost.WithRegisterer(reg),
		pluginhost.WithStartTimeout(5 * time.Second),
	}, opts...)
	host, err := pluginhost.New(pool, keys, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = host.Close() })
	adminID := uuid.New()
	admin := principal.With(context.Background(), &principal.Principal{
		Type: principal.User, ID: adminID, Method: principal.MethodAPIKey, IsPlatformAdmin: true,
	})
	return &bundle{pool: pool, url: url, keyDir: keyDir, keys: keys, host: host, reg: reg, log: tl, admin: admin, adminID: adminID}
}

func (b *bundle) ctx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(b.admin, time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// install installs a private copy of a built binary and returns its path.
func (b *bundle) install(t testing.TB, name string) (*pluginhost.Plugin, string) {
	t.Helper()
	path := bin(t, name)
	pl, err := b.host.Install(b.ctx(t), pluginhost.InstallRequest{Path: path})
	if err != nil {
		t.Fatalf("install %s: %v", name, err)
	}
	return pl, path
}

// installRaw records a binary in the catalog without starting it, as if it
// had behaved at install: for binaries that misbehave at every start.
func (b *bundle) installRaw(t testing.TB, name, path string) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(data)
	if _, err := b.pool.Exec(context.Background(), `INSERT INTO plugins
		(name, kind, version, api_versions, config_schema, sha256, path, installed_by)
		VALUES ($1, 'provisioner', '0.0.1', '{1.0}', '{"Fields": []}', $2, $3, 'test')`,
		name, hex.EncodeToString(sum[:]), path); err != nil {
		t.Fatal(err)
	}
}

const webhookSecret = "whsec-0123456789abcdef-TOPSECRET"

func provConfig(extra map[string]any) map[string]any {
	cfg := map[string]any{"webhook_secret": webhookSecret}
	for k, v := range extra {
		cfg[k] = v
	}
	return cfg
}

// configure configures an instance or fails the test.
func (b *bundle) configure(t testing.TB, instance, plugin string, cfg map[string]any) *pluginhost.Instance {
	t.Helper()
	inst, err := b.host.Configure(b.ctx(t), instance, plugin, cfg)
	if err != nil {
		t.Fatalf("configure %s: %v", instance, err)
	}
	return inst
}

func (b *bundle) instance(t testing.TB, name string) *pluginhost.Instance {
	t.Helper()
	inst, err := b.host.Instance(context.Background(), name)
	if err != nil {
		t.Fatalf("instance %s: %v", name, err)
	}
	return inst
}

// wantCode fails the test unless err carries code.
func wantCode(t testing.TB, err error, code errcode.Code) *errcode.Error {
	t.Helper()
	ce := errcode.As(err)
	if ce == nil || ce.Code != code {
		t.Fatalf("got error %v, want code %s", err, code)
	}
	return ce
}

type auditRow struct {
	Action, ActorType, ActorID, Target, Result, Details string
}

func (b *bundle) audits(t testing.TB, action string) []auditRow {
	t.Helper()
	rows, err := b.pool.Query(context.Background(), `SELECT action, actor_type, actor_id, target, result, details::text
		FROM audit_log WHERE action = $1 ORDER BY occurred_at, id`, action)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out []auditRow
	for rows.Next() {
		var r auditRow
		if err := rows.Scan(&r.Action, &r.ActorType, &r.ActorID, &r.Target, &r.Result, &r.Details); err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	return out
}

// metric returns the value of a counter or gauge with the given labels.
func (b *bundle) metric(t testing.TB, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := b.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if matches(m, labels) {
				switch {
				case m.Counter != nil:
					return m.Counter.GetValue()
				case m.Gauge != nil:
					return m.Gauge.GetValue()
				case m.Histogram != nil:
					return float64(m.Histogram.GetSampleCount())
				}
			}
		}
	}
	return 0
}

func matches(m *dto.Metric, labels map[string]string) bool {
	n := 0
	for _, lp := range m.GetLabel() {
		if v, ok := labels[lp.GetName()]; ok {
			if v != lp.GetValue() {
				return false
			}
			n++
		}
	}
	return n == len(labels)
}

// alive reports whether pid is a live process (not gone, not a zombie).
func alive(pid int) bool {
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	// pid (comm) STATE ...; comm may hold spaces and parentheses.
	s := string(stat)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] != 'Z'
}

// children lists the live processes whose parent is pid.
func children(t testing.TB, pid int) []int {
	t.Helper()
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var out []int
	for _, e := range entries {
		child, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(stat)
		i := strings.LastIndexByte(s, ')')
		fields := strings.Fields(s[i+1:])
		if len(fields) < 2 || fields[0] == "Z" {
			continue
		}
		if ppid, err := strconv.Atoi(fields[1]); err == nil && ppid == pid {
			out = append(out, child)
		}
	}
	return out
}

// eventually polls cond until it holds or the timeout passes.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
