package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/gpuaas/gpuaas/core/internal/daemon/daemontest"
	"github.com/gpuaas/gpuaas/core/internal/httpapi"
	"github.com/gpuaas/gpuaas/core/internal/identity"
	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
)

func serve(t *testing.T, checks ...httpapi.Check) string {
	t.Helper()
	reg := prometheus.NewRegistry()
	app := httpapi.New(testenv.Logger(t), &httpapi.API{Version: "v-test", Checks: checks, Gatherer: reg}, httpapi.Options{Registerer: reg})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = app.Listener(ln) }()
	t.Cleanup(func() { _ = app.Shutdown() })
	return "http://" + ln.Addr().String()
}

func env(url string) func(string) string {
	return func(k string) string {
		if k == "GPUAAS_API_URL" {
			return url
		}
		return ""
	}
}

func TestStatus(t *testing.T) {
	ok := func(context.Context) error { return nil }
	url := serve(t, httpapi.Check{Name: "postgres", Fn: ok}, httpapi.Check{Name: "nats", Fn: ok})
	var out bytes.Buffer
	if err := run(context.Background(), []string{"status"}, env(url), &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"version v-test", "postgres  ok", "nats      ok"} {
		if !strings.Contains(out.String(), want) {
			t.Fatalf("output %q lacks %q", out.String(), want)
		}
	}
}

func TestStatusReportsFailingDependency(t *testing.T) {
	url := serve(t, httpapi.Check{Name: "postgres", Fn: func(context.Context) error { return errors.New("refused") }})
	err := run(context.Background(), []string{"status"}, env(url), io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "not_ready") || !strings.Contains(err.Error(), "postgres") {
		t.Fatalf("err = %v; want not_ready naming postgres", err)
	}
}

func TestPolicyKeys(t *testing.T) {
	var out bytes.Buffer
	if err := run(context.Background(), []string{"policy-keys"}, env(serve(t)), &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "outbox.max_attempts") || !strings.Contains(out.String(), `"24h0m0s"`) {
		t.Fatalf("output:\n%s", out.String())
	}
}

func TestUnreachableAPI(t *testing.T) {
	err := run(context.Background(), []string{"status"}, env("http://127.0.0.1:1"), io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "unreachable") {
		t.Fatalf("err = %v", err)
	}
}

// whoami and orgs talk to a real core with the token from the environment.
func TestWhoAmIAndOrgs(t *testing.T) {
	pool, db := testenv.MigratedPool(t)
	n := testenv.StartNATS(t)
	d := daemontest.Start(t, map[string]string{"DATABASE_URL": db, "NATS_URL": n.URL(), "TEMPORAL_ADDRESS": testenv.Env(t, "TEMPORAL_ADDRESS")})
	ctx := principal.With(context.Background(), principal.SystemPrincipal("test"))
	ids := identity.NewService(pool, "local", testenv.Logger(t), nil)
	u, err := ids.CreateLocalUser(ctx, "cli@example.test", "CLI", "a long enough password", false)
	if err != nil {
		t.Fatal(err)
	}
	_, tok, err := ids.CreateAPIKey(ctx, identity.KeyOwner{User: &u.ID}, "cli", nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ids.CreateOrg(principal.With(ctx, &principal.Principal{Type: principal.User, ID: u.ID}), "acme", "Acme"); err != nil {
		t.Fatal(err)
	}
	getenv := func(k string) string {
		return map[string]string{"GPUAAS_API_URL": d.URL, "GPUAAS_TOKEN": tok}[k]
	}
	var out bytes.Buffer
	if err := run(context.Background(), []string{"whoami"}, getenv, &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "cli@example.test") || !strings.Contains(out.String(), "org acme") {
		t.Fatalf("whoami:\n%s", out.String())
	}
	out.Reset()
	if err := run(context.Background(), []string{"orgs"}, getenv, &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "Acme") {
		t.Fatalf("orgs:\n%s", out.String())
	}
	// Without a token the API refuses with the envelope's message.
	noTok := func(k string) string { return map[string]string{"GPUAAS_API_URL": d.URL}[k] }
	if err := run(context.Background(), []string{"whoami"}, noTok, io.Discard, io.Discard); err == nil || !strings.Contains(err.Error(), "unauthenticated") {
		t.Fatalf("whoami without a token: %v", err)
	}
}

// gpuaas plugin install/configure/list against a real core.
func TestPluginCommands(t *testing.T) {
	pool, db := testenv.MigratedPool(t)
	n := testenv.StartNATS(t)
	d := daemontest.Start(t, map[string]string{"DATABASE_URL": db, "NATS_URL": n.URL(), "TEMPORAL_ADDRESS": testenv.Env(t, "TEMPORAL_ADDRESS")})
	ctx := principal.With(context.Background(), principal.SystemPrincipal("test"))
	ids := identity.NewService(pool, "local", testenv.Logger(t), nil)
	u, err := ids.CreateLocalUser(ctx, "op@example.test", "Operator", "a long enough password", true)
	if err != nil {
		t.Fatal(err)
	}
	_, tok, err := ids.CreateAPIKey(ctx, identity.KeyOwner{User: &u.ID}, "cli", nil)
	if err != nil {
		t.Fatal(err)
	}
	getenv := func(k string) string { return map[string]string{"GPUAAS_API_URL": d.URL, "GPUAAS_TOKEN": tok}[k] }
	dir := t.TempDir()
	bin := filepath.Join(dir, "gpuaas-plugin-instantprov")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/gpuaas/gpuaas/sdk/examples/instantprov/cmd/gpuaas-plugin-instantprov").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	var out bytes.Buffer
	if err := run(context.Background(), []string{"plugin", "install", bin}, getenv, &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "installed instantprov") {
		t.Fatalf("install printed %q", out.String())
	}
	cfg := filepath.Join(dir, "cfg.json")
	if err := os.WriteFile(cfg, []byte(`{"webhook_secret":"hush-hush-123"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	out.Reset()
	if err := run(context.Background(), []string{"plugin", "configure", "prov-a", "instantprov", cfg}, getenv, &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	out.Reset()
	if err := run(context.Background(), []string{"plugin", "list"}, getenv, &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "prov-a") || strings.Contains(out.String(), "hush-hush") {
		t.Fatalf("list:\n%s", out.String())
	}
	// Bad config: the API's error names the field.
	if err := os.WriteFile(cfg, []byte(`{"delay":"1s"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	err = run(context.Background(), []string{"plugin", "configure", "prov-b", "instantprov", cfg}, getenv, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "webhook_secret") {
		t.Fatalf("bad config: %v", err)
	}
}
