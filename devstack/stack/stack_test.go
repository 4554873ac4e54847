package stack_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.temporal.io/api/workflowservice/v1"
	sdkclient "go.temporal.io/sdk/client"
	"go.temporal.io/sdk/worker"
	"go.temporal.io/sdk/workflow"

	"github.com/gpuaas/gpuaas/devstack/loopback"
	"github.com/gpuaas/gpuaas/devstack/stack"
)

type setup struct {
	st  *stack.Stack
	env map[string]string
}

// start runs a stack of the given components (all when none) in a fresh folder and stops
// it when the test ends.
func start(t *testing.T, components ...string) setup {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	st, err := stack.Start(ctx, stack.Config{
		Dir:        filepath.Join(t.TempDir(), "stack"),
		Components: components,
		Logger:     hclog.New(&hclog.LoggerOptions{Name: t.Name(), Output: testWriter{t}, TimeFormat: "15:04:05.000"}),
	})
	if err != nil {
		t.Fatalf("start stack: %v", err)
	}
	t.Cleanup(func() {
		if err := st.Stop(context.Background()); err != nil {
			t.Errorf("stop stack: %v", err)
		}
	})
	env := map[string]string{}
	for _, kv := range st.Env() {
		env[kv.Key] = kv.Value
	}
	return setup{st: st, env: env}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func ctxFor(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func TestAllComponentsHealthy(t *testing.T) {
	t.Parallel()
	s := start(t)

	t.Run("env file", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "stack.env")
		if err := s.st.WriteEnvFile(path); err != nil {
			t.Fatal(err)
		}
		got := readEnvFile(t, path)
		want := []string{
			"DATABASE_URL", "GPUAAS_PG_ADMIN_URL", "GPUAAS_PG_BIN", "NATS_URL",
			"TEMPORAL_ADDRESS", "TEMPORAL_NAMESPACE", "S3_ENDPOINT", "S3_REGION", "S3_BUCKET",
			"S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY", "STRIPE_API_BASE", "STRIPE_SECRET_KEY",
			"GPUAAS_DEVSTACK_CONTROL",
		}
		var keys []string
		for k, v := range got {
			keys = append(keys, k)
			if v == "" {
				t.Errorf("%s is empty", k)
			}
		}
		slices.Sort(keys)
		slices.Sort(want)
		if !slices.Equal(keys, want) {
			t.Fatalf("keys = %v, want %v", keys, want)
		}
		for _, k := range []string{"DATABASE_URL", "GPUAAS_PG_ADMIN_URL", "NATS_URL", "S3_ENDPOINT", "STRIPE_API_BASE", "GPUAAS_DEVSTACK_CONTROL"} {
			if !strings.Contains(got[k], "127.0.0.1:") {
				t.Errorf("%s = %q, want a loopback address", k, got[k])
			}
		}
		if got["TEMPORAL_NAMESPACE"] != "gpuaas" || got["S3_BUCKET"] != "gpuaas" || got["STRIPE_SECRET_KEY"] != "sk_test_123" {
			t.Errorf("fixed values wrong: %v", got)
		}
	})

	t.Run("postgres", func(t *testing.T) {
		ctx := ctxFor(t)
		conn, err := pgx.Connect(ctx, s.env["DATABASE_URL"])
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
		var user, db string
		var super bool
		if err := conn.QueryRow(ctx, "SELECT current_user, current_database(), rolsuper FROM pg_roles WHERE rolname = current_user").Scan(&user, &db, &super); err != nil {
			t.Fatal(err)
		}
		if user != "gpuaas" || db != "gpuaas" || super {
			t.Fatalf("connected as %s to %s (superuser %v), want gpuaas to gpuaas, not superuser", user, db, super)
		}
		if _, err := conn.Exec(ctx, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)"); err != nil {
			t.Fatalf("gpuaas cannot create tables in its database: %v", err)
		}
		if _, err := conn.Exec(ctx, "CREATE DATABASE gpuaas_pkg_test"); err != nil {
			t.Fatalf("gpuaas cannot create databases: %v", err)
		}
		admin, err := pgx.Connect(ctx, s.env["GPUAAS_PG_ADMIN_URL"])
		if err != nil {
			t.Fatal(err)
		}
		defer admin.Close(ctx)
		var one int
		if err := admin.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil || one != 1 {
			t.Fatalf("admin SELECT 1 = %d, %v", one, err)
		}
	})

	t.Run("nats jetstream", func(t *testing.T) {
		ctx := ctxFor(t)
		nc, err := nats.Connect(s.env["NATS_URL"])
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		js, err := jetstream.New(nc)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "HEALTH", Subjects: []string{"health.>"}, Storage: jetstream.FileStorage}); err != nil {
			t.Fatal(err)
		}
		ack, err := js.Publish(ctx, "health.ping", []byte("ping"))
		if err != nil {
			t.Fatal(err)
		}
		if ack.Stream != "HEALTH" || ack.Sequence != 1 {
			t.Fatalf("ack = %+v", ack)
		}
	})

	t.Run("temporal", func(t *testing.T) {
		ctx := ctxFor(t)
		c, err := sdkclient.DialContext(ctx, sdkclient.Options{HostPort: s.env["TEMPORAL_ADDRESS"], Namespace: s.env["TEMPORAL_NAMESPACE"]})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		for _, ns := range []string{"gpuaas", "default"} {
			resp, err := c.WorkflowService().DescribeNamespace(ctx, &workflowservice.DescribeNamespaceRequest{Namespace: ns})
			if err != nil {
				t.Fatalf("describe %s: %v", ns, err)
			}
			if resp.GetNamespaceInfo().GetName() != ns {
				t.Fatalf("described %q, want %q", resp.GetNamespaceInfo().GetName(), ns)
			}
		}
		// A workflow end to end proves history, matching and the SQLite store work.
		w := worker.New(c, "devstack-test", worker.Options{})
		w.RegisterWorkflowWithOptions(func(ctx workflow.Context, name string) (string, error) {
			return "hello " + name, nil
		}, workflow.RegisterOptions{Name: "Hello"})
		if err := w.Start(); err != nil {
			t.Fatal(err)
		}
		defer w.Stop()
		run, err := c.ExecuteWorkflow(ctx, sdkclient.StartWorkflowOptions{TaskQueue: "devstack-test"}, "Hello", "gpuaas")
		if err != nil {
			t.Fatal(err)
		}
		var got string
		if err := run.Get(ctx, &got); err != nil {
			t.Fatal(err)
		}
		if got != "hello gpuaas" {
			t.Fatalf("workflow result %q", got)
		}
	})

	t.Run("s3", func(t *testing.T) {
		ctx := ctxFor(t)
		client := s.st.S3().Client()
		body := []byte("object body")
		if _, err := client.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String(s.env["S3_BUCKET"]), Key: aws.String("dir/obj.txt"), Body: bytes.NewReader(body)}); err != nil {
			t.Fatal(err)
		}
		out, err := client.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(s.env["S3_BUCKET"]), Key: aws.String("dir/obj.txt")})
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(out.Body)
		_ = out.Body.Close()
		if err != nil || !bytes.Equal(got, body) {
			t.Fatalf("got %q, %v", got, err)
		}
	})

	t.Run("stripe-mock", func(t *testing.T) {
		ctx := ctxFor(t)
		form := url.Values{"email": {"dev@example.com"}}
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, s.env["STRIPE_API_BASE"]+"/v1/customers", strings.NewReader(form.Encode()))
		req.Header.Set("Authorization", "Bearer "+s.env["STRIPE_SECRET_KEY"])
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var cus struct{ ID, Object string }
		if err := json.NewDecoder(resp.Body).Decode(&cus); err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != http.StatusOK || cus.Object != "customer" || !strings.HasPrefix(cus.ID, "cus_") {
			t.Fatalf("create customer: %s %+v", resp.Status, cus)
		}
	})

	t.Run("control lists components", func(t *testing.T) {
		got := controlList(t, s.env["GPUAAS_DEVSTACK_CONTROL"])
		if len(got) != len(stack.Names()) {
			t.Fatalf("components = %+v", got)
		}
		for _, c := range got {
			if c.State != "running" || !loopback.Open(c.Address) {
				t.Errorf("%+v: want running and accepting connections", c)
			}
		}
	})

	t.Run("health", func(t *testing.T) {
		if err := s.st.CheckHealth(ctxFor(t)); err != nil {
			t.Fatal(err)
		}
	})
}

func TestTwoStacksSideBySide(t *testing.T) {
	t.Parallel()
	a, b := start(t), start(t)
	for _, k := range []string{"DATABASE_URL", "NATS_URL", "TEMPORAL_ADDRESS", "S3_ENDPOINT", "STRIPE_API_BASE", "GPUAAS_DEVSTACK_CONTROL"} {
		if a.env[k] == b.env[k] {
			t.Errorf("both stacks have %s=%s", k, a.env[k])
		}
	}
	for _, s := range []setup{a, b} {
		if err := s.st.CheckHealth(ctxFor(t)); err != nil {
			t.Fatal(err)
		}
	}
}

func TestRestartPostgresThroughControlAPI(t *testing.T) {
	t.Parallel()
	s := start(t, stack.Postgres)
	ctx := ctxFor(t)
	control := s.env["GPUAAS_DEVSTACK_CONTROL"]
	conn, err := pgx.Connect(ctx, s.env["DATABASE_URL"])
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, "CREATE TABLE kept (v text); INSERT INTO kept VALUES ('before restart')"); err != nil {
		t.Fatal(err)
	}

	st := controlPost(t, control, "postgres", "stop")
	if st.State != "stopped" || loopback.Open(st.Address) {
		t.Fatalf("after stop: %+v, port open %v", st, loopback.Open(st.Address))
	}
	if err := conn.Ping(ctx); err == nil {
		t.Fatal("old connection still works after stop")
	}
	if _, err := pgx.Connect(ctx, s.env["DATABASE_URL"]); err == nil {
		t.Fatal("new connection works after stop")
	}

	st = controlPost(t, control, "postgres", "start")
	if st.State != "running" || !strings.Contains(s.env["DATABASE_URL"], st.Address) {
		t.Fatalf("after start: %+v, want running at the address of %s", st, s.env["DATABASE_URL"])
	}
	conn, err = pgx.Connect(ctx, s.env["DATABASE_URL"])
	if err != nil {
		t.Fatalf("reconnect: %v", err)
	}
	defer conn.Close(ctx)
	var v string
	if err := conn.QueryRow(ctx, "SELECT v FROM kept").Scan(&v); err != nil || v != "before restart" {
		t.Fatalf("data after restart: %q, %v", v, err)
	}
}

func TestRestartNATSKeepsStreams(t *testing.T) {
	t.Parallel()
	s := start(t, stack.NATS)
	ctx := ctxFor(t)
	control := s.env["GPUAAS_DEVSTACK_CONTROL"]
	nc, err := nats.Connect(s.env["NATS_URL"], nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "OUTBOX", Subjects: []string{"outbox.>"}, Storage: jetstream.FileStorage}); err != nil {
		t.Fatal(err)
	}
	if _, err := js.Publish(ctx, "outbox.one", []byte("1")); err != nil {
		t.Fatal(err)
	}

	if st := controlPost(t, control, "nats", "stop"); st.State != "stopped" || loopback.Open(st.Address) {
		t.Fatalf("after stop: %+v", st)
	}
	if st := controlPost(t, control, "nats", "start"); st.State != "running" || "nats://"+st.Address != s.env["NATS_URL"] {
		t.Fatalf("after start: %+v", st)
	}

	// The same client reconnects by itself; the stream and its message are still there.
	str, err := js.Stream(ctx, "OUTBOX")
	if err != nil {
		t.Fatalf("stream after restart: %v", err)
	}
	info, err := str.Info(ctx)
	if err != nil || info.State.Msgs != 1 {
		t.Fatalf("stream state after restart: %+v, %v", info, err)
	}
	ack, err := js.Publish(ctx, "outbox.two", []byte("2"))
	if err != nil || ack.Sequence != 2 {
		t.Fatalf("publish after restart: %+v, %v", ack, err)
	}
}

func TestKeepReusesData(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "stack")
	ctx := ctxFor(t)
	run := func(keep bool, fn func(db *pgx.Conn)) {
		st, err := stack.Start(ctx, stack.Config{Dir: dir, Components: []string{stack.Postgres}, Keep: keep})
		if err != nil {
			t.Fatal(err)
		}
		defer st.Stop(context.Background())
		conn, err := pgx.Connect(ctx, st.Postgres().URL())
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
		fn(conn)
	}
	run(false, func(db *pgx.Conn) {
		if _, err := db.Exec(ctx, "CREATE TABLE kept (v int)"); err != nil {
			t.Fatal(err)
		}
	})
	run(true, func(db *pgx.Conn) {
		if _, err := db.Exec(ctx, "SELECT * FROM kept"); err != nil {
			t.Fatalf("--keep lost the table: %v", err)
		}
	})
	run(false, func(db *pgx.Conn) {
		if _, err := db.Exec(ctx, "SELECT * FROM kept"); err == nil {
			t.Fatal("a fresh stack still has the old table")
		}
	})
}

func TestRefusesForeignFolderAndSecondStack(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	foreign := t.TempDir()
	if err := os.WriteFile(filepath.Join(foreign, "precious.txt"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := stack.Start(ctx, stack.Config{Dir: foreign, Components: []string{stack.NATS}}); err == nil || !strings.Contains(err.Error(), "refusing") {
		t.Fatalf("start in a foreign folder: %v", err)
	}
	if _, err := os.Stat(filepath.Join(foreign, "precious.txt")); err != nil {
		t.Fatal("foreign folder was wiped")
	}

	s := start(t, stack.NATS)
	if _, err := stack.Start(ctx, stack.Config{Dir: s.st.Dir(), Components: []string{stack.NATS}}); err == nil || !strings.Contains(err.Error(), "another dev stack") {
		t.Fatalf("second stack in the same folder: %v", err)
	}
	if err := s.st.CheckHealth(ctx); err != nil {
		t.Fatalf("first stack hurt by the second attempt: %v", err)
	}
}

func TestMissingPostgresSaysHowToInstall(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	dir := filepath.Join(t.TempDir(), "stack")
	_, err := stack.Start(ctx, stack.Config{Dir: dir, Components: []string{stack.Postgres}, PGBinDir: t.TempDir()})
	if err == nil || !strings.Contains(err.Error(), "apt-get install -y postgresql") {
		t.Fatalf("missing binaries: %v", err)
	}
}

type status struct{ Name, State, Address string }

func controlList(t *testing.T, base string) []status {
	t.Helper()
	resp, err := http.Get(base + "/v1/components")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var body struct{ Components []status }
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		t.Fatal(err)
	}
	return body.Components
}

func controlPost(t *testing.T, base, name, op string) status {
	t.Helper()
	resp, err := http.Post(fmt.Sprintf("%s/v1/components/%s/%s", base, name, op), "", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s %s: %s %s", op, name, resp.Status, b)
	}
	var st status
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	return st
}

func readEnvFile(t *testing.T, path string) map[string]string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), "=")
		if !ok {
			t.Fatalf("bad line %q", sc.Text())
		}
		out[k] = v
	}
	return out
}

func TestRestartEveryComponentThroughControlAPI(t *testing.T) {
	t.Parallel()
	s := start(t)
	control := s.env["GPUAAS_DEVSTACK_CONTROL"]
	for _, name := range []string{stack.Temporal, stack.S3, stack.Stripe} {
		t.Run(name, func(t *testing.T) {
			before := controlPost(t, control, name, "stop")
			if before.State != "stopped" || loopback.Open(before.Address) {
				t.Fatalf("after stop: %+v", before)
			}
			after := controlPost(t, control, name, "start")
			if after.State != "running" || after.Address != before.Address {
				t.Fatalf("after start: %+v, before %+v", after, before)
			}
		})
	}
	// The S3 object store and the Temporal namespaces are still there.
	if err := s.st.CheckHealth(ctxFor(t)); err != nil {
		t.Fatal(err)
	}
}

func TestStartFailureNamesComponentAndQuotesItsLog(t *testing.T) {
	t.Parallel()
	binDir := t.TempDir()
	fake := "#!/bin/sh\necho 'fake versitygw: cannot open backend' >&2\nexit 3\n"
	if err := os.WriteFile(filepath.Join(binDir, "versitygw"), []byte(fake), 0o755); err != nil {
		t.Fatal(err)
	}
	getenv := func(k string) string {
		if k == "GPUAAS_BIN_DIR" {
			return binDir
		}
		return os.Getenv(k)
	}
	dir := filepath.Join(t.TempDir(), "stack")
	_, err := stack.Start(ctxFor(t), stack.Config{Dir: dir, Components: []string{stack.S3}, Getenv: getenv})
	if err == nil {
		t.Fatal("start with a failing gateway succeeded")
	}
	for _, want := range []string{"s3 did not become healthy", "versitygw exited", "exit status 3", "s3.log", "fake versitygw: cannot open backend"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
}
