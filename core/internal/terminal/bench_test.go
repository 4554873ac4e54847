package terminal_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"golang.org/x/crypto/ssh"

	"github.com/gpuaas/gpuaas/core/internal/terminal"
	"github.com/gpuaas/gpuaas/core/internal/terminal/terminaltest"
)

// BenchmarkTerminalRoundTrip measures a keystroke's round trip (one byte
// typed, its echo read back) through the terminal proxy (WebSocket, core,
// SSH) and, in the same run and to the same real sshd and account, through a
// direct SSH session; rounds alternate between the two. The node echoes with
// cat on a raw TTY. Target: the proxy adds < 1 ms at p50.
func BenchmarkTerminalRoundTrip(b *testing.B) {
	const rounds = 2000
	f := setup(b, "local")
	f.setLimits(func(l *terminal.Limits) { l.Keepalive = time.Minute })
	viaProxy := &wsStream{tm: f.open(f.alloc, f.mint(f.alloc), cli)}
	viaProxy.tm.resize(80, 24)
	sign := func(ctx context.Context, pub []byte) ([]byte, error) {
		c, err := f.ca.SignSSHKey(ctx, pub, f.user, 2*time.Minute)
		return c.Certificate, err
	}
	client, err := terminaltest.DialCert(context.Background(), f.sshd, f.user, sign)
	if err != nil {
		b.Fatalf("direct ssh: %v", err)
	}
	defer client.Close()
	direct := directShell(b, client)
	for _, s := range []io.ReadWriter{viaProxy, direct} {
		startCat(b, s)
	}
	var proxyRT, directRT []time.Duration
	for i := range rounds + 100 {
		p, d := roundTrip(b, viaProxy), roundTrip(b, direct)
		if i >= 100 { // the first rounds warm up
			proxyRT, directRT = append(proxyRT, p), append(directRT, d)
		}
	}
	us := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1000 }
	pp50, pp99, dp50, dp99 := percentile(proxyRT, 0.5), percentile(proxyRT, 0.99), percentile(directRT, 0.5), percentile(directRT, 0.99)
	b.ReportMetric(us(pp50), "proxy-p50-µs")
	b.ReportMetric(us(pp99), "proxy-p99-µs")
	b.ReportMetric(us(dp50), "direct-p50-µs")
	b.ReportMetric(us(dp99), "direct-p99-µs")
	b.ReportMetric(us(pp50-dp50), "added-p50-µs")
	b.ReportMetric(float64(pp50)/float64(dp50), "proxy/direct-p50-ratio")
	b.Logf("keystroke round trip over %d rounds: proxy p50 %.0f µs p99 %.0f µs; direct SSH p50 %.0f µs p99 %.0f µs; added p50 %.0f µs (target < 1000 µs), ratio %.2f",
		rounds, us(pp50), us(pp99), us(dp50), us(dp99), us(pp50-dp50), float64(pp50)/float64(dp50))
}

// BenchmarkTerminalIdleSessions measures what 1,000 idle sessions (shell
// open, nothing typed) cost the process that serves them: growth of the live
// heap and of the RSS after a GC. The WebSocket clients and the SSH server (a Go SSH
// server that echoes; 1,000 sshd forks would swamp the machine) run in
// child processes, outside the measurement. Target: < 200 MB.
func BenchmarkTerminalIdleSessions(b *testing.B) {
	const sessions = 1000
	f := setup(b, "local")
	f.setLimits(func(l *terminal.Limits) {
		l.MaxSessions, l.Keepalive, l.IdleTimeout = 2*sessions, time.Minute, time.Hour
	})
	caPub, err := f.ca.SSHCAPublicKey(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	node := child(b, map[string]string{roleEnv: "sshd", caEnv: strings.TrimSpace(string(caPub))})
	host, port, ok := strings.Cut(strings.TrimPrefix(node.line(b), "ADDR "), ":")
	if !ok {
		b.Fatal("the SSH server child did not report its address")
	}
	f.exec(`UPDATE nodes SET hostname = $2, ssh_port = $3 WHERE id = (SELECT node_id FROM allocations WHERE id = $1)`, f.other, host, port)
	tokens := make([]string, sessions)
	for i := range tokens {
		tokens[i] = f.mint(f.other)
	}

	heap0, rss0, g0 := footprint(b)
	clients := child(b, map[string]string{roleEnv: "clients"})
	fmt.Fprintln(clients.stdin, f.url+terminal.Path(f.other))
	for _, t := range tokens {
		fmt.Fprintln(clients.stdin, t)
	}
	fmt.Fprintln(clients.stdin)
	start := time.Now()
	if got := clients.line(b); got != "OPEN "+strconv.Itoa(sessions) {
		b.Fatalf("clients: %s", got)
	}
	opened := time.Since(start)
	waitFor(b, func() bool { return f.metric("gpuaas_terminal_sessions_active", "") == sessions }, "every session to be served")
	time.Sleep(time.Second) // the shells open after the clients' first frame
	heap1, rss1, g1 := footprint(b)
	mb := func(n uint64) float64 { return float64(n) / (1 << 20) }
	heap, rss := mb(heap1-min(heap0, heap1)), mb(rss1-min(rss0, rss1))
	b.ReportMetric(heap, "live-heap-MB/1000_sessions")
	b.ReportMetric(rss, "rss-MB/1000_sessions")
	b.ReportMetric(float64(g1-g0)/sessions, "goroutines/session")
	b.Logf("%d idle sessions (opened in %s): live heap +%.1f MB (%.0f KiB/session), RSS +%.1f MB (target < 200 MB), %.1f goroutines/session",
		sessions, opened.Round(time.Millisecond), heap, heap*1024/sessions, rss, float64(g1-g0)/sessions)

	clients.stdin.Close() // the clients close their sessions and exit
	waitFor(b, func() bool { return f.metric("gpuaas_terminal_sessions_active", "") == 0 }, "every session to close")
}

// footprint is the live heap and the RSS after a GC, and the goroutines.
func footprint(b *testing.B) (heap, rss uint64, goroutines int) {
	b.Helper()
	runtime.GC()
	debug.FreeOSMemory()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		b.Fatal(err)
	}
	m := regexp.MustCompile(`VmRSS:\s+(\d+) kB`).FindSubmatch(status)
	if m == nil {
		b.Fatal("no VmRSS in /proc/self/status")
	}
	kb, _ := strconv.ParseUint(string(m[1]), 10, 64)
	return ms.HeapAlloc, kb << 10, runtime.NumGoroutine()
}

func percentile(ds []time.Duration, p float64) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[min(len(s)-1, int(float64(len(s))*p))]
}

// startCat turns the shell into an echo: cat on a raw TTY without local
// echo writes back each byte it reads.
func startCat(b *testing.B, s io.ReadWriter) {
	b.Helper()
	if _, err := s.Write([]byte("stty raw -echo; echo READY; exec cat\n")); err != nil {
		b.Fatal(err)
	}
	ready := regexp.MustCompile(`READY\r?\n`)
	var out []byte
	buf := make([]byte, 4096)
	for !ready.Match(out) {
		n, err := s.Read(buf)
		if err != nil {
			b.Fatalf("waiting for cat: %v; got %q", err, out)
		}
		out = append(out, buf[:n]...)
	}
}

// roundTrip types one byte and waits for its echo.
func roundTrip(b *testing.B, s io.ReadWriter) time.Duration {
	var buf [1]byte
	start := time.Now()
	if _, err := s.Write([]byte{'x'}); err != nil {
		b.Fatal(err)
	}
	if _, err := io.ReadFull(s, buf[:]); err != nil || buf[0] != 'x' {
		b.Fatalf("echo: %q %v", buf, err)
	}
	return time.Since(start)
}

// wsStream is a session's terminal bytes as a stream.
type wsStream struct {
	tm      *term
	pending []byte
}

func (w *wsStream) Write(p []byte) (int, error) {
	return len(p), w.tm.c.Write(context.Background(), websocket.MessageBinary, p)
}

func (w *wsStream) Read(p []byte) (int, error) {
	if len(w.pending) == 0 {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, msg, err := w.tm.c.Read(ctx)
		if err != nil {
			return 0, err
		}
		w.pending = msg
	}
	n := copy(p, w.pending)
	w.pending = w.pending[n:]
	return n, nil
}

// sshStream is a direct SSH session's terminal.
type sshStream struct {
	io.Reader
	io.Writer
}

func directShell(b *testing.B, c *ssh.Client) io.ReadWriter {
	b.Helper()
	s, err := c.NewSession()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = s.Close() })
	in, err := s.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	out, err := s.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := s.RequestPty("xterm-256color", 24, 80, ssh.TerminalModes{ssh.ECHO: 1}); err != nil {
		b.Fatal(err)
	}
	if err := s.Shell(); err != nil {
		b.Fatal(err)
	}
	return sshStream{Reader: out, Writer: in}
}

// childProc is this test binary run again in a role (see TestMain).
type childProc struct {
	stdin io.WriteCloser
	out   *bufio.Scanner
}

func child(b *testing.B, env map[string]string) *childProc {
	b.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = os.Environ()
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		_ = stdin.Close() // a child ends when its input does
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	return &childProc{stdin: stdin, out: bufio.NewScanner(stdout)}
}

// line is the child's next line of output.
func (c *childProc) line(b *testing.B) string {
	b.Helper()
	if !c.out.Scan() {
		b.Fatalf("the child process ended: %v", c.out.Err())
	}
	return c.out.Text()
}
