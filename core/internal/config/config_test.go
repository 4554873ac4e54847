package config_test

import (
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/core/internal/config"
)

func env(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

func good() map[string]string {
	return map[string]string{
		"DATABASE_URL":     "postgres://gpuaas:secretpw@127.0.0.1:5432/gpuaas",
		"NATS_URL":         "nats://127.0.0.1:4222",
		"TEMPORAL_ADDRESS": "127.0.0.1:7233",
	}
}

func TestLoadDefaults(t *testing.T) {
	c, err := config.Load(nil, env(good()), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.ListenAddr != "127.0.0.1:8080" || c.ShutdownTimeout != 10*time.Second || c.TemporalNamespace != "gpuaas" || !c.Migrate || c.MaxBodyBytes != 1<<20 {
		t.Fatalf("defaults: %+v", c)
	}
}

func TestFlagsOverrideEnv(t *testing.T) {
	m := good()
	m["GPUAAS_LISTEN_ADDR"] = "127.0.0.1:9000"
	c, err := config.Load([]string{"--listen-addr", "0.0.0.0:9100", "--log-format=json"}, env(m), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.ListenAddr != "0.0.0.0:9100" || c.LogFormat != "json" {
		t.Fatalf("flags did not win: %+v", c)
	}
}

func TestBadSettingsAreNamed(t *testing.T) {
	cases := []struct {
		name, key, value, want string
	}{
		{"missing database", "DATABASE_URL", "", "DATABASE_URL (--database-url): missing"},
		{"wrong database scheme", "DATABASE_URL", "mysql://x@h/db", "DATABASE_URL (--database-url): scheme must be"},
		{"database without host", "DATABASE_URL", "postgres:///db", "DATABASE_URL (--database-url): no host"},
		{"missing nats", "NATS_URL", "", "NATS_URL (--nats-url): missing"},
		{"bad nats", "NATS_URL", "http://x:4222", "NATS_URL (--nats-url): scheme must be"},
		{"missing temporal", "TEMPORAL_ADDRESS", "", "TEMPORAL_ADDRESS (--temporal-address): missing"},
		{"temporal without port", "TEMPORAL_ADDRESS", "localhost", "TEMPORAL_ADDRESS (--temporal-address): want host:port"},
		{"listen port out of range", "GPUAAS_LISTEN_ADDR", "127.0.0.1:70000", "GPUAAS_LISTEN_ADDR (--listen-addr): port must be"},
		{"log format", "GPUAAS_LOG_FORMAT", "xml", "GPUAAS_LOG_FORMAT (--log-format): want one of text, json"},
		{"body limit", "GPUAAS_MAX_BODY_BYTES", "12", "GPUAAS_MAX_BODY_BYTES (--max-body-bytes): want an integer between"},
		{"timeout", "GPUAAS_SHUTDOWN_TIMEOUT", "soon", "GPUAAS_SHUTDOWN_TIMEOUT (--shutdown-timeout): want a duration"},
		{"region", "GPUAAS_REGION", "Eu West", "GPUAAS_REGION (--region): want 1-63"},
		{"migrate", "GPUAAS_MIGRATE", "perhaps", "GPUAAS_MIGRATE (--migrate)"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m := good()
			m[tc.key] = tc.value
			_, err := config.Load(nil, env(m), io.Discard)
			if err == nil {
				t.Fatal("accepted")
			}
			msg := err.Error()
			if !strings.Contains(msg, tc.want) || strings.Contains(msg, "\n") {
				t.Fatalf("error %q; want one line containing %q", msg, tc.want)
			}
			var es config.Errors
			if !errors.As(err, &es) || len(es) != 1 || es[0].Env != tc.key {
				t.Fatalf("error names %v, want exactly %s", es, tc.key)
			}
		})
	}
}

func TestErrorsNeverEchoSecrets(t *testing.T) {
	m := good()
	m["DATABASE_URL"] = "mysql://admin:hunter2@db/x"
	_, err := config.Load(nil, env(m), io.Discard)
	if err == nil || strings.Contains(err.Error(), "hunter2") {
		t.Fatalf("error %v", err)
	}
}

func TestTerminalOrigins(t *testing.T) {
	cases := []struct {
		name     string
		set      map[string]string
		want     []string
		wantFail string
	}{
		{"none", nil, nil, ""},
		{"default is the web app's origin", map[string]string{"GPUAAS_OIDC_REDIRECT_URL": "https://App.example.com/callback"},
			[]string{"https://app.example.com"}, ""},
		{"a list wins, paths dropped", map[string]string{"GPUAAS_OIDC_REDIRECT_URL": "https://app.example.com/callback",
			"GPUAAS_TERMINAL_ALLOWED_ORIGINS": "https://console.example.com/, http://localhost:3000"},
			[]string{"https://console.example.com", "http://localhost:3000"}, ""},
		{"not a web origin", map[string]string{"GPUAAS_TERMINAL_ALLOWED_ORIGINS": "ftp://files.example.com"}, nil,
			"GPUAAS_TERMINAL_ALLOWED_ORIGINS (--terminal-allowed-origins)"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m := good()
			for k, v := range tc.set {
				m[k] = v
			}
			c, err := config.Load(nil, env(m), io.Discard)
			if tc.wantFail != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantFail) {
					t.Fatalf("err = %v; want it to name %s", err, tc.wantFail)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if strings.Join(c.TerminalOrigins, " ") != strings.Join(tc.want, " ") {
				t.Fatalf("origins %q; want %q", c.TerminalOrigins, tc.want)
			}
		})
	}
}

// The terminal gateway reaches Postgres and the PKI only.
func TestTerminalGatewayNeedsNoNATSOrTemporal(t *testing.T) {
	m := map[string]string{"DATABASE_URL": "postgres://gpuaas@127.0.0.1:5432/gpuaas"}
	if _, err := config.LoadTerminalGateway(nil, env(m), io.Discard); err != nil {
		t.Fatalf("gateway config: %v", err)
	}
	if _, err := config.Load(nil, env(m), io.Discard); err == nil {
		t.Fatal("serve accepted a config without NATS and Temporal")
	}
	m["NATS_URL"] = "http://x:4222"
	if _, err := config.LoadTerminalGateway(nil, env(m), io.Discard); err == nil || !strings.Contains(err.Error(), "NATS_URL") {
		t.Fatalf("gateway accepted a bad NATS_URL: %v", err)
	}
}
