package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/gpuaas/gpuaas/core/internal/httpapi"
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
