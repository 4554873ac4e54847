package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/core/internal/daemon/daemontest"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
)

func envFunc(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

func TestRunRejectsBadConfig(t *testing.T) {
	var stderr bytes.Buffer
	err := run(context.Background(), nil, envFunc(map[string]string{"NATS_URL": "nats://127.0.0.1:1", "TEMPORAL_ADDRESS": "127.0.0.1:1"}), io.Discard, &stderr)
	if err == nil || !strings.Contains(err.Error(), "DATABASE_URL") {
		t.Fatalf("err = %v; want it to name DATABASE_URL", err)
	}
}

// The built binary exits non-zero with one line naming the bad setting.
func TestBinaryBadConfigExitsWithOneLine(t *testing.T) {
	bin := buildBinary(t)
	cmd := exec.Command(bin)
	cmd.Env = []string{"DATABASE_URL=postgres://u@h/db", "NATS_URL=nats://h:4222", "TEMPORAL_ADDRESS=h"}
	out, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() == 0 {
		t.Fatalf("exit: %v; want a non-zero exit", err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != 1 || !strings.Contains(lines[0], "TEMPORAL_ADDRESS") {
		t.Fatalf("output %q; want one line naming TEMPORAL_ADDRESS", out)
	}
}

func buildBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "gpuaasd")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// startDaemon runs the daemon in-process against real dependencies.
func startDaemon(t *testing.T, dbURL, natsURL, temporalAddr string) *daemontest.Instance {
	t.Helper()
	return daemontest.Start(t, map[string]string{"DATABASE_URL": dbURL, "NATS_URL": natsURL, "TEMPORAL_ADDRESS": temporalAddr})
}

func get(t *testing.T, url string) (int, map[string]any, time.Duration) {
	t.Helper()
	start := time.Now()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	var body map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&body)
	return resp.StatusCode, body, time.Since(start)
}

func waitStatus(t *testing.T, url string, want int, within time.Duration) map[string]any {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		code, body, _ := get(t, url)
		if code == want {
			return body
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET %s = %d (%v) after %s; want %d", url, code, body, within, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Postgres stopped while serving: readyz names it within 2 s and answers fast, and
// readiness comes back by itself when Postgres returns.
func TestReadyzFollowsPostgres(t *testing.T) {
	stack := testenv.StartStack(t, "postgres")
	dbURL := testenv.DatabaseOn(t, stack.Env["GPUAAS_PG_ADMIN_URL"], stack.Env["DATABASE_URL"])
	n := testenv.StartNATS(t)
	d := startDaemon(t, dbURL, n.URL(), testenv.Env(t, "TEMPORAL_ADDRESS"))
	waitStatus(t, d.URL+"/api/v1/readyz", 200, 30*time.Second)

	stack.Stop("postgres")
	stopped := time.Now()
	body := waitStatus(t, d.URL+"/api/v1/readyz", 503, 5*time.Second)
	if took := time.Since(stopped); took > 2*time.Second+500*time.Millisecond {
		t.Errorf("readyz noticed the outage after %s; want within 2 s", took)
	}
	e, _ := body["error"].(map[string]any)
	details, _ := e["details"].(map[string]any)
	if e["code"] != "not_ready" || fmt.Sprint(details["failing"]) != "[postgres]" {
		t.Fatalf("readyz body %v; want not_ready naming only postgres", body)
	}
	for range 3 {
		if code, _, took := get(t, d.URL+"/api/v1/readyz"); code != 503 || took > 2*time.Second {
			t.Fatalf("readyz during the outage: %d after %s; want 503 within 2 s", code, took)
		}
	}
	if code, _, _ := get(t, d.URL+"/api/v1/healthz"); code != 200 {
		t.Fatalf("healthz %d during a database outage; the process is up", code)
	}

	stack.Start("postgres")
	waitStatus(t, d.URL+"/api/v1/readyz", 200, 15*time.Second)
}

// NATS stopped: readyz names nats, and recovers when it returns.
func TestReadyzFollowsNATS(t *testing.T) {
	n := testenv.StartNATS(t)
	d := startDaemon(t, testenv.Database(t), n.URL(), testenv.Env(t, "TEMPORAL_ADDRESS"))
	waitStatus(t, d.URL+"/api/v1/readyz", 200, 30*time.Second)
	n.Stop()
	body := waitStatus(t, d.URL+"/api/v1/readyz", 503, 5*time.Second)
	if !strings.Contains(fmt.Sprint(body), "nats") {
		t.Fatalf("readyz body %v does not name nats", body)
	}
	n.Start()
	waitStatus(t, d.URL+"/api/v1/readyz", 200, 15*time.Second)
}

// Shutdown stops accepting, lets the in-flight request finish and returns within
// 10 s. The in-flight request is a readyz whose Temporal probe hangs on a server
// that accepts connections and never answers.
func TestGracefulShutdownDrainsInFlight(t *testing.T) {
	blackhole, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer blackhole.Close()
	go func() {
		for {
			c, err := blackhole.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	n := testenv.StartNATS(t)
	d := startDaemon(t, testenv.Database(t), n.URL(), blackhole.Addr().String())
	waitStatus(t, d.URL+"/api/v1/healthz", 200, 10*time.Second)

	inflight := make(chan int, 1)
	go func() {
		resp, err := http.Get(d.URL + "/api/v1/readyz")
		if err != nil {
			inflight <- -1
			return
		}
		resp.Body.Close()
		inflight <- resp.StatusCode
	}()
	time.Sleep(300 * time.Millisecond) // the request is now waiting on the probe
	start := time.Now()
	d.Stop()
	if code := <-inflight; code != 503 {
		t.Fatalf("in-flight request got %d; want its real answer (503) despite the shutdown", code)
	}
	select {
	case err := <-d.Done:
		if err != nil {
			t.Fatalf("Run returned %v; want nil after a clean stop", err)
		}
		d.Done <- nil // for the cleanup
	case <-time.After(10 * time.Second):
		t.Fatal("shutdown took longer than 10 s")
	}
	t.Logf("shutdown took %s", time.Since(start))
	if _, err := http.Get(d.URL + "/api/v1/healthz"); err == nil {
		t.Fatal("still accepting connections after shutdown")
	}
}

// The real binary on SIGTERM exits 0 within 10 s.
func TestBinaryExitsCleanlyOnSIGTERM(t *testing.T) {
	bin := buildBinary(t)
	n := testenv.StartNATS(t)
	port := freePort(t)
	cmd := exec.Command(bin, "--listen-addr", fmt.Sprintf("127.0.0.1:%d", port))
	// Trust auth ignores the password; it is there to prove it never reaches a log.
	dbURL := strings.Replace(testenv.Database(t), "://gpuaas@", "://gpuaas:s3cr3t-pw@", 1)
	cmd.Env = []string{"GPUAAS_LOG_LEVEL=trace", "DATABASE_URL=" + dbURL, "NATS_URL=" + n.URL(), "TEMPORAL_ADDRESS=" + testenv.Env(t, "TEMPORAL_ADDRESS"),
		"TEMPORAL_NAMESPACE=" + os.Getenv("TEMPORAL_NAMESPACE")}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	url := fmt.Sprintf("http://127.0.0.1:%d", port)
	deadline := time.Now().Add(60 * time.Second)
	for {
		if resp, err := http.Get(url + "/api/v1/healthz"); err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			t.Fatalf("binary never served:\n%s", out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v\n%s", err, out.String())
		}
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatalf("still running 10 s after SIGTERM:\n%s", out.String())
	}
	if strings.Contains(out.String(), "s3cr3t-pw") {
		t.Fatalf("the database password reached the log:\n%s", out.String())
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// bootstrap-admin creates a platform admin whose printed API key and password work,
// and a second run reuses the account with a new key.
func TestBootstrapAdmin(t *testing.T) {
	db := testenv.Database(t)
	n := testenv.StartNATS(t)
	env := map[string]string{"DATABASE_URL": db, "NATS_URL": n.URL(), "TEMPORAL_ADDRESS": testenv.Env(t, "TEMPORAL_ADDRESS"), "GPUAAS_LOCAL_ACCOUNTS": "true"}
	creds := func() map[string]string {
		var out bytes.Buffer
		if err := run(context.Background(), []string{"bootstrap-admin", "--email", "admin@gpuaas.test"}, envFunc(env), &out, io.Discard); err != nil {
			t.Fatal(err)
		}
		m := map[string]string{}
		for _, line := range strings.Split(strings.TrimSpace(out.String()), "\n") {
			k, v, _ := strings.Cut(line, "=")
			m[k] = v
		}
		return m
	}
	first := creds()
	if first["GPUAAS_TOKEN"] == "" || first["GPUAAS_ADMIN_PASSWORD"] == "" || first["GPUAAS_ADMIN_EMAIL"] != "admin@gpuaas.test" {
		t.Fatalf("first run printed %v", first)
	}
	second := creds()
	if second["GPUAAS_ADMIN_PASSWORD"] != "" || second["GPUAAS_TOKEN"] == "" || second["GPUAAS_TOKEN"] == first["GPUAAS_TOKEN"] {
		t.Fatalf("second run printed %v; want a new key and no password", second)
	}
	d := daemontest.Start(t, env)
	for _, tok := range []string{first["GPUAAS_TOKEN"], second["GPUAAS_TOKEN"]} {
		req, _ := http.NewRequest("GET", d.URL+"/api/v1/admin/users", nil)
		req.Header.Set("Authorization", "Bearer "+tok)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("admin route with the bootstrap key: %d", resp.StatusCode)
		}
	}
	body := strings.NewReader(`{"login":"admin@gpuaas.test","password":"` + first["GPUAAS_ADMIN_PASSWORD"] + `"}`)
	resp, err := http.Post(d.URL+"/api/v1/auth/local/login", "application/json", body)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("login with the printed password: %d", resp.StatusCode)
	}
}

// terminal-gateway needs only Postgres and the PKI state: it serves the
// terminal endpoint and the probes until the context ends.
func TestTerminalGatewayCommand(t *testing.T) {
	db := testenv.Database(t)
	port := freePort(t)
	env := map[string]string{"DATABASE_URL": db, "GPUAAS_STATE_DIR": t.TempDir()}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"terminal-gateway", "--listen-addr", fmt.Sprintf("127.0.0.1:%d", port)}, envFunc(env), io.Discard, io.Discard)
	}()
	url := fmt.Sprintf("http://127.0.0.1:%d", port)
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port)); err == nil {
			_ = c.Close()
			break
		}
		select {
		case err := <-done:
			t.Fatalf("terminal-gateway exited at start: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("terminal-gateway does not listen")
		}
	}
	waitStatus(t, url+"/api/v1/healthz", http.StatusOK, 30*time.Second)
	// Not an upgrade: refused before anything else.
	if status, body, _ := get(t, url+"/ws/terminal/"+"0190a1b2-0000-7000-8000-000000000000"); status != http.StatusBadRequest {
		t.Errorf("plain GET of the terminal: %d %v; want 400", status, body)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("terminal-gateway: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("terminal-gateway did not stop")
	}
}
