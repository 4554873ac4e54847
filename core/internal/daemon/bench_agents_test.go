package daemon_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/gpuaas/gpuaas/agent/protocol"
	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
	"github.com/gpuaas/gpuaas/sdk/sdktest"
)

// BenchmarkAgentDispatch runs gpuaasd as its own process with 1,000
// simulated agents (enrolled through the API's tokens, each with its own key
// and mTLS connection) waiting in their long poll, queues tasks through the
// driver task API and reports the dispatch latency, from the enqueue call to
// the agent's poll returning the task, p50 and p99 (target p99 < 100 ms),
// and the core's memory per connected agent (heap and stacks from its
// /metrics, and RSS, before and after the agents connected).
func BenchmarkAgentDispatch(b *testing.B) {
	const agentsN, dispatches = 1000, 1000
	pool, dbURL := testenv.MigratedPool(b)
	nats := testenv.StartNATS(b)
	if _, err := pool.Exec(context.Background(), `INSERT INTO policy_overrides (scope, scope_id, key, value, updated_by)
		VALUES ('global', '', 'ratelimit.requests_per_minute', '1000000', 'bench')`); err != nil {
		b.Fatal(err)
	}
	bin := sdktest.BuildBinary(b, "github.com/gpuaas/gpuaas/core/cmd/gpuaasd")
	apiAddr, agentAddr, state := freeAddr(b), freeAddr(b), b.TempDir()
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), "DATABASE_URL="+dbURL, "NATS_URL="+nats.URL(), "TEMPORAL_ADDRESS="+testenv.Env(b, "TEMPORAL_ADDRESS"),
		"GPUAAS_LISTEN_ADDR="+apiAddr, "GPUAAS_AGENT_LISTEN_ADDR="+agentAddr, "GPUAAS_STATE_DIR="+state, "GPUAAS_WORKERS=false",
		"GPUAAS_LOG_LEVEL=warn", "GPUAAS_DB_MAX_CONNS=40", "GPUAAS_TEMPORAL_TASK_QUEUE=b"+strings.ReplaceAll(uuid.NewString()[:13], "-", ""))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
		if b.Failed() {
			b.Logf("gpuaasd stderr:\n%s", stderr.String())
		}
	})
	api := "http://" + apiAddr
	waitHealthy(b, api)

	ctx := principal.With(context.Background(), principal.SystemPrincipal("bench"))
	f := newIdentityFixture(b, pool)
	admin := f.token(ctx, f.user(ctx, "bench-admin-"+uuid.NewString()[:8]+"@example.test", true))
	if _, err := pool.Exec(ctx, `INSERT INTO nodes (id, provisioner_instance, external_id, state)
		SELECT gen_random_uuid(), 'bench', 'host-' || i, 'enrolling' FROM generate_series(0, $1 - 1) i`, agentsN); err != nil {
		b.Fatal(err)
	}
	coreCA, err := os.ReadFile(filepath.Join(state, "agents", "agent-listener.crt"))
	if err != nil {
		b.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(coreCA)
	httpc := &http.Client{Timeout: time.Minute}
	before := coreMemory(b, httpc, api, cmd.Process.Pid)

	// Enroll every agent (20 at a time) and start its long poll.
	received := sync.Map{} // task id → time the poll returned it
	var polls atomic.Int64
	pollCtx, stopPolls := context.WithCancel(context.Background())
	var pollers sync.WaitGroup
	b.Cleanup(func() { stopPolls(); pollers.Wait() })
	sem := make(chan struct{}, 20)
	var enrollErr atomic.Value
	var enrolled sync.WaitGroup
	for i := range agentsN {
		sem <- struct{}{}
		enrolled.Go(func() {
			defer func() { <-sem }()
			var node struct{ ID string }
			r := (&env{t: b, url: api}).call("GET", fmt.Sprintf("/api/v1/admin/plugin-instances/bench/nodes/host-%d", i), admin, nil)
			if r.status != 200 {
				enrollErr.Store(fmt.Errorf("node host-%d: %d %s", i, r.status, r.body))
				return
			}
			r.json(b, &node)
			r = (&env{t: b, url: api}).call("POST", "/api/v1/admin/nodes/"+node.ID+"/enrollment-token", admin, map[string]any{})
			if r.status != 201 {
				enrollErr.Store(fmt.Errorf("token for host-%d: %d %s", i, r.status, r.body))
				return
			}
			var tok struct{ Token string }
			r.json(b, &tok)
			c, err := enrollSim(agentAddr, roots, tok.Token)
			if err != nil {
				enrollErr.Store(err)
				return
			}
			pollers.Go(func() { c.pollLoop(pollCtx, agentAddr, &received, &polls) })
		})
	}
	enrolled.Wait()
	if err, _ := enrollErr.Load().(error); err != nil {
		b.Fatal(err)
	}
	for deadline := time.Now().Add(30 * time.Second); polls.Load() < agentsN; {
		if time.Now().After(deadline) {
			b.Fatalf("%d of %d agents are polling", polls.Load(), agentsN)
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(time.Second) // every poll is parked in its wait
	after := coreMemory(b, httpc, api, cmd.Process.Pid)

	lat := make([]time.Duration, 0, dispatches)
	b.ResetTimer()
	for i := range dispatches {
		body := map[string]any{"external_id": fmt.Sprintf("host-%d", mrand.IntN(agentsN)), "type": "node.inventory",
			"operation_id": fmt.Sprintf("dispatch-%d", i), "params": map[string]any{}}
		start := time.Now()
		r := (&env{t: b, url: api}).call("POST", "/api/v1/admin/plugin-instances/bench/node-tasks", admin, body)
		if r.status != 201 {
			b.Fatalf("enqueue: %d %s", r.status, r.body)
		}
		var task struct{ ID string }
		r.json(b, &task)
		for deadline := time.Now().Add(10 * time.Second); ; {
			if at, ok := received.Load(task.ID); ok {
				lat = append(lat, at.(time.Time).Sub(start))
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("task %s did not reach its agent in 10s", task.ID)
			}
			time.Sleep(200 * time.Microsecond)
		}
	}
	b.StopTimer()
	p50, p99 := percentile(lat, 0.5), percentile(lat, 0.99)
	heapPer := (after.heap - before.heap) / agentsN
	rssPer := (after.rss - before.rss) / agentsN
	b.ReportMetric(float64(p50.Microseconds())/1000, "dispatch_p50_ms")
	b.ReportMetric(float64(p99.Microseconds())/1000, "dispatch_p99_ms")
	b.ReportMetric(heapPer/1024, "core_heap_KiB/agent")
	b.ReportMetric(rssPer/1024, "core_rss_KiB/agent")
	b.Logf("task dispatch with %d agents in their long poll: p50 %s, p99 %s (target p99 < 100ms); core memory per connected agent: heap+stacks %.1f KiB, RSS %.1f KiB",
		agentsN, p50.Round(10*time.Microsecond), p99.Round(10*time.Microsecond), heapPer/1024, rssPer/1024)
}

func freeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func waitHealthy(b *testing.B, api string) {
	b.Helper()
	for deadline := time.Now().Add(60 * time.Second); ; {
		resp, err := http.Get(api + "/api/v1/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return
			}
		}
		if time.Now().After(deadline) {
			b.Fatalf("gpuaasd is not healthy: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

type memory struct{ heap, rss float64 }

// coreMemory reads the core's heap and stacks in use from its /metrics and
// its resident set from /proc.
func coreMemory(b *testing.B, c *http.Client, api string, pid int) memory {
	b.Helper()
	time.Sleep(300 * time.Millisecond) // let in-flight work settle
	resp, err := c.Get(api + "/metrics")
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Body.Close()
	var m memory
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		name, val, ok := strings.Cut(sc.Text(), " ")
		if !ok || (name != "go_memstats_heap_inuse_bytes" && name != "go_memstats_stack_inuse_bytes") {
			continue
		}
		v, err := strconv.ParseFloat(val, 64)
		if err != nil || math.IsNaN(v) {
			b.Fatalf("metric %s: %q", name, val)
		}
		m.heap += v
	}
	if m.heap == 0 {
		b.Fatal("no go_memstats_heap_inuse_bytes in the core's /metrics")
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			m.rss = kb * 1024
		}
	}
	return m
}

// simAgent is the smallest agent: its key, its certificate, one mTLS
// connection that long-polls for tasks.
type simAgent struct{ client *http.Client }

func enrollSim(agentAddr string, roots *x509.CertPool, token string) (*simAgent, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return nil, err
	}
	csr := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
	body, _ := json.Marshal(protocol.Enrollment{Token: token, CSRPEM: string(csr)})
	tlsCfg := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS13}
	enroll := tlsCfg.Clone()
	enroll.NextProtos = []string{protocol.EnrollALPN, "http/1.1"}
	resp, err := (&http.Client{Transport: &http.Transport{TLSClientConfig: enroll}}).Post("https://"+agentAddr+"/agent/v1/enroll", "application/json", bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		return nil, fmt.Errorf("enroll: %d %s", resp.StatusCode, raw)
	}
	var c protocol.Certificate
	if err := json.Unmarshal(raw, &c); err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}
	pair, err := tls.X509KeyPair([]byte(c.CertPEM), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}))
	if err != nil {
		return nil, err
	}
	mtls := tlsCfg.Clone()
	mtls.Certificates = []tls.Certificate{pair}
	return &simAgent{client: &http.Client{Transport: &http.Transport{TLSClientConfig: mtls, MaxConnsPerHost: 1}}}, nil
}

func (a *simAgent) pollLoop(ctx context.Context, agentAddr string, received *sync.Map, polls *atomic.Int64) {
	first := true
	for ctx.Err() == nil {
		req, _ := http.NewRequestWithContext(ctx, "GET", "https://"+agentAddr+"/agent/v1/tasks?wait=30s", nil)
		if first {
			polls.Add(1)
			first = false
		}
		resp, err := a.client.Do(req)
		if err != nil {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		at := time.Now()
		var p protocol.Poll
		err = json.NewDecoder(resp.Body).Decode(&p)
		resp.Body.Close()
		if err != nil {
			continue
		}
		for _, t := range p.Tasks {
			received.Store(t.Task.ID, at)
		}
	}
}
