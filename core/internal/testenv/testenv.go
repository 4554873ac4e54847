// Package testenv gives tests real dependencies: a fresh Postgres database per test
// from the dev stack's cluster, an embedded NATS JetStream server per test, the dev
// stack's Temporal, and private stacks whose components a test may stop and start.
//
// Run tests through `make test`, which starts the dev stack and exports its
// addresses. A test whose dependency is missing fails; it never skips.
package testenv

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/gpuaas/gpuaas/core/internal/store"
)

// Env returns the environment variable name or fails the test with a hint.
func Env(t testing.TB, name string) string {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		t.Fatalf("%s is not set: run tests with `make test` (it starts the dev stack), or export the dev stack's env file (.gpuaas/dev.env)", name)
	}
	return v
}

// Logger returns a logger that writes through t.Log.
func Logger(t testing.TB) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Name: t.Name(), Level: hclog.Debug, Output: testWriter{t}})
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func randomSuffix() string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// Database creates a fresh, empty database on the dev stack's cluster and returns
// its URL for the application role; it is dropped when the test ends.
func Database(t testing.TB) string {
	t.Helper()
	return DatabaseOn(t, Env(t, "GPUAAS_PG_ADMIN_URL"), Env(t, "DATABASE_URL"))
}

// DatabaseOn creates a fresh database through adminURL (a superuser connection),
// owned by the user of appURL, and returns appURL pointed at it.
func DatabaseOn(t testing.TB, adminURL, appURL string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	app, err := url.Parse(appURL)
	if err != nil {
		t.Fatalf("parse app url: %v", err)
	}
	owner := app.User.Username()
	name := "t_" + randomSuffix()
	admin, err := pgx.Connect(ctx, adminURL)
	if err != nil {
		t.Fatalf("connect to postgres as admin: %v", err)
	}
	defer admin.Close(ctx)
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+name+" OWNER "+pgx.Identifier{owner}.Sanitize()); err != nil {
		t.Fatalf("create database: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c, err := pgx.Connect(ctx, adminURL)
		if err != nil {
			t.Logf("drop database %s: %v", name, err)
			return
		}
		defer c.Close(ctx)
		if _, err := c.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)"); err != nil {
			t.Logf("drop database %s: %v", name, err)
		}
	})
	app.Path = "/" + name
	return app.String()
}

// Pool opens a pool on url, closed when the test ends.
func Pool(t testing.TB, url string) *pgxpool.Pool {
	t.Helper()
	pool, err := store.Open(context.Background(), url, store.Options{MaxConns: 20})
	if err != nil {
		t.Fatalf("open pool: %v", err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// MigratedPool is a fresh database with every migration applied.
func MigratedPool(t testing.TB) (*pgxpool.Pool, string) {
	t.Helper()
	url := Database(t)
	pool := Pool(t, url)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := store.Migrate(ctx, pool); err != nil {
		t.Fatalf("migrate: %v", err)
	}
	return pool, url
}
