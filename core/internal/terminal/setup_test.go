package terminal_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/crypto/ssh"

	"github.com/gpuaas/gpuaas/core/internal/httpapi"
	"github.com/gpuaas/gpuaas/core/internal/pki"
	"github.com/gpuaas/gpuaas/core/internal/pki/vaultdouble"
	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/terminal"
	"github.com/gpuaas/gpuaas/core/internal/terminal/terminaltest"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
	"github.com/gpuaas/gpuaas/internal/sshdtest"
)

// Origin is the web app's origin, the one allowed.
const origin = "https://app.test"

// fixture is a terminal gateway (the production app of gpuaasd
// terminal-gateway) on a fresh database, a real sshd that trusts the
// backend's SSH CA, a local account, and allocations of one project: alloc
// and other are active on the sshd's node, released has ended.
type fixture struct {
	t        testing.TB
	pool     *pgxpool.Pool
	ca       *recordingCA
	svc      *terminal.Service
	stop     context.CancelFunc // ends svc.Run
	url      string             // ws://host:port
	sshd     *sshdtest.Server
	user     string
	org      uuid.UUID
	project  uuid.UUID
	alloc    uuid.UUID
	other    uuid.UUID
	released uuid.UUID
	member   *principal.Principal
	clock    *clock
	limits   atomic.Pointer[terminal.Limits]
	log      *syncBuffer
	reg      *prometheus.Registry
}

// backend opens the PKI backend named: "local", or "vault" over the Vault
// double.
func backend(t testing.TB, name string) *pki.Backend {
	t.Helper()
	cfg := pki.Config{Backend: pki.BackendLocal, StateDir: filepath.Join(t.TempDir(), "state")}
	if name == "vault" {
		d, err := vaultdouble.New()
		if err != nil {
			t.Fatalf("vault double: %v", err)
		}
		t.Cleanup(d.Close)
		m := vaultdouble.DefaultMounts()
		cfg = pki.Config{Backend: pki.BackendVault, Vault: pki.VaultConfig{Addr: d.URL, Token: d.RootToken, AppRoleMount: m.AppRole,
			PKIMount: m.PKI, PKIRole: m.PKIRole, TransitMount: m.Transit, DataKey: "gpuaas-secrets", SSHMount: m.SSH, SSHRole: m.SSHRole}}
	}
	b, err := pki.Open(context.Background(), cfg)
	if err != nil {
		t.Fatalf("open %s backend: %v", name, err)
	}
	t.Cleanup(func() { _ = b.Close() })
	return b
}

func setup(t testing.TB, pkiBackend string) *fixture {
	t.Helper()
	ctx := context.Background()
	pool, _ := testenv.MigratedPool(t)
	f := &fixture{t: t, pool: pool, clock: &clock{}, log: &syncBuffer{}, reg: prometheus.NewRegistry()}
	f.ca = &recordingCA{SSHCA: backend(t, pkiBackend).SSH}
	caPub, err := f.ca.SSHCAPublicKey(ctx)
	if err != nil {
		t.Fatal(err)
	}
	f.sshd = terminaltest.StartSSHD(t, caPub)
	f.user = terminaltest.User(t)
	f.limits.Store(&terminal.Limits{IdleTimeout: time.Minute, Keepalive: 5 * time.Second, CertTTL: 2 * time.Minute,
		MaxSessions: 5, MaxFrameBytes: 64 << 10})
	f.insertWorld()

	level := hclog.Trace
	if _, bench := t.(*testing.B); bench {
		level = hclog.Warn // a line per session would drown the results
	}
	log := hclog.New(&hclog.LoggerOptions{Name: "gateway", Level: level, Output: io.MultiWriter(f.log, logWriter{t})})
	f.svc = terminal.NewService(pool, f.ca, func(context.Context, uuid.UUID, uuid.UUID) terminal.Limits { return *f.limits.Load() },
		"local", terminal.WithLogger(log.Named("terminal")), terminal.WithRegisterer(f.reg), terminal.WithAllowedOrigins([]string{origin}),
		terminal.WithClock(f.clock.Now))
	runCtx, stop := context.WithCancel(ctx)
	ran := make(chan struct{})
	go func() { f.svc.Run(runCtx); close(ran) }()
	f.stop = stop
	app := httpapi.NewGateway(log.Named("http"), &httpapi.API{Version: "test", Gatherer: f.reg, Pool: pool},
		httpapi.Options{Registerer: f.reg, Terminal: f.svc.Handler()})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = app.Listener(ln) }()
	f.url = "ws://" + ln.Addr().String()
	t.Cleanup(func() {
		_ = app.ShutdownWithTimeout(5 * time.Second)
		stop()
		select {
		case <-ran:
		case <-time.After(10 * time.Second):
			t.Error("the terminal service did not stop")
		}
	})
	return f
}

// setLimits changes the limits of the sessions opened from now on.
func (f *fixture) setLimits(change func(*terminal.Limits)) terminal.Limits {
	l := *f.limits.Load()
	change(&l)
	f.limits.Store(&l)
	return l
}

func (f *fixture) exec(sql string, args ...any) {
	f.t.Helper()
	if _, err := f.pool.Exec(context.Background(), sql, args...); err != nil {
		f.t.Fatalf("%s: %v", sql, err)
	}
}

func (f *fixture) insertWorld() {
	f.t.Helper()
	host, port := terminaltest.HostPort(f.t, f.sshd)
	sfx := uuid.NewString()[:8]
	f.org, f.project = uuid.Must(uuid.NewV7()), uuid.Must(uuid.NewV7())
	node, otherNode := uuid.Must(uuid.NewV7()), uuid.Must(uuid.NewV7())
	f.alloc, f.other, f.released = uuid.Must(uuid.NewV7()), uuid.Must(uuid.NewV7()), uuid.Must(uuid.NewV7())
	f.member = &principal.Principal{Type: principal.User, ID: uuid.Must(uuid.NewV7())}
	f.exec(`INSERT INTO orgs (id, slug, name) VALUES ($1, $2, 'Org')`, f.org, "o-"+sfx)
	f.exec(`INSERT INTO projects (id, org_id, slug, name) VALUES ($1, $2, 'p1', 'P1')`, f.project, f.org)
	f.exec(`INSERT INTO skus (id, gpu_model, gpus_per_node, cpu_cores, memory_gib, disk_gib, price_per_gpu_hour_minor, currency)
		VALUES ($1, 'Fixture GPU', 1, 8, 64, 100, 100, 'USD')`, "s-"+sfx)
	f.exec(`INSERT INTO nodes (id, provisioner_instance, external_id, hostname, ssh_port, sku_id, state)
		VALUES ($1, 'fixture', $3, $5, $6, $4, 'allocated'), ($2, 'fixture', $7, $5, $6, $4, 'allocated')`,
		node, otherNode, "n1-"+sfx, "s-"+sfx, host, port, "n2-"+sfx)
	insert := func(id, node uuid.UUID, state string) {
		f.exec(`INSERT INTO allocations (id, org_id, project_id, sku_id, node_id, gpus, price_per_gpu_hour_minor, currency, state,
				username, ssh_public_keys, created_by, active_at)
			VALUES ($1, $2, $3, $4, $5, 1, 100, 'USD', $6, $7, ARRAY[]::text[], 'fixture', now())`,
			id, f.org, f.project, "s-"+sfx, node, state, f.user)
	}
	insert(f.alloc, node, "active")
	insert(f.other, otherNode, "active")
	insert(f.released, node, "released")
}

// mint mints a token as the fixture's member.
func (f *fixture) mint(alloc uuid.UUID) string {
	f.t.Helper()
	tok, err := f.svc.Mint(principal.With(context.Background(), f.member), alloc)
	if err != nil {
		f.t.Fatalf("mint: %v", err)
	}
	return tok.Value
}

// dialer says how a client presents its token.
type dialer func(opts *websocket.DialOptions, url, token string) string

// browser sends the token as a subprotocol, from the allowed origin.
func browser(opts *websocket.DialOptions, url, token string) string {
	opts.Subprotocols = []string{terminal.Subprotocol, terminal.TokenProtocol + token}
	opts.HTTPHeader.Set("Origin", origin)
	return url
}

// cli sends the token in Authorization and no Origin.
func cli(opts *websocket.DialOptions, url, token string) string {
	opts.HTTPHeader.Set("Authorization", "Bearer "+token)
	return url
}

// fromOrigin is a browser on another origin.
func fromOrigin(o string) dialer {
	return func(opts *websocket.DialOptions, url, token string) string {
		browser(opts, url, token)
		opts.HTTPHeader.Set("Origin", o)
		return url
	}
}

// inQuery puts the token in the query string.
func inQuery(opts *websocket.DialOptions, url, token string) string {
	return url + "?token=" + token
}

// refusal is a refused handshake.
type refusal struct {
	status int
	code   string
	body   string
}

// dial opens a session on alloc, or returns the refusal.
func (f *fixture) dial(alloc uuid.UUID, token string, how dialer) (*websocket.Conn, *refusal) {
	f.t.Helper()
	opts := &websocket.DialOptions{HTTPHeader: http.Header{}}
	url := how(opts, f.url+terminal.Path(alloc), token)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, resp, err := websocket.Dial(ctx, url, opts)
	if err == nil {
		if got := c.Subprotocol(); how != nil && opts.Subprotocols != nil && got != terminal.Subprotocol {
			f.t.Errorf("selected subprotocol %q; want %q", got, terminal.Subprotocol)
		}
		f.t.Cleanup(func() { _ = c.CloseNow() })
		return c, nil
	}
	if resp == nil {
		f.t.Fatalf("dial %s: %v", url, err)
	}
	body, _ := io.ReadAll(resp.Body)
	var env struct {
		Error struct{ Code string } `json:"error"`
	}
	_ = json.Unmarshal(body, &env)
	return nil, &refusal{status: resp.StatusCode, code: env.Error.Code, body: string(body)}
}

// open is dial that must succeed.
func (f *fixture) open(alloc uuid.UUID, token string, how dialer) *term {
	f.t.Helper()
	c, r := f.dial(alloc, token, how)
	if r != nil {
		f.t.Fatalf("open: refused %d %s", r.status, r.body)
	}
	return &term{t: f.t, c: c}
}

// term is the client side of a session.
type term struct {
	t   testing.TB
	c   *websocket.Conn
	out bytes.Buffer
}

func (tm *term) resize(cols, rows int) {
	tm.t.Helper()
	tm.write(websocket.MessageText, fmt.Sprintf(`{"type":"resize","cols":%d,"rows":%d}`, cols, rows))
}

func (tm *term) write(typ websocket.MessageType, s string) {
	tm.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := tm.c.Write(ctx, typ, []byte(s)); err != nil {
		tm.t.Fatalf("write: %v", err)
	}
}

func (tm *term) typeIn(s string) { tm.t.Helper(); tm.write(websocket.MessageBinary, s) }

// expect reads until the output holds the line want (output of a command:
// the line starts the output or follows a CR or LF, so the echo of the typed
// command, which has it after a space, does not count).
func (tm *term) expect(want string) {
	tm.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	re := regexp.MustCompile(`(^|[\r\n])` + regexp.QuoteMeta(want))
	for !re.MatchString(tm.out.String()) {
		typ, b, err := tm.c.Read(ctx)
		if err != nil {
			tm.t.Fatalf("reading for %q: %v; output so far %q", want, err, tm.out.String())
		}
		if typ != websocket.MessageBinary {
			tm.t.Fatalf("server sent a %v frame %q; want binary", typ, b)
		}
		tm.out.Write(b)
	}
}

// closed reads until the server closes and returns the close frame.
func (tm *term) closed(within time.Duration) (websocket.StatusCode, string) {
	tm.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	for {
		_, b, err := tm.c.Read(ctx)
		if err == nil {
			tm.out.Write(b)
			continue
		}
		var ce websocket.CloseError
		if errors.As(err, &ce) {
			return ce.Code, ce.Reason
		}
		tm.t.Fatalf("no close frame within %s: %v", within, err)
	}
}

// quiet waits until sshd has had time to act on anything in flight.
func (f *fixture) quiet() { time.Sleep(300 * time.Millisecond) }

// metric is the value of the sample of name with a label of value label
// ("" for a metric without labels), 0 when there is none yet.
func (f *fixture) metric(name, label string) float64 {
	f.t.Helper()
	mfs, err := f.reg.Gather()
	if err != nil {
		f.t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			match := label == ""
			for _, l := range m.GetLabel() {
				match = match || l.GetValue() == label
			}
			if !match {
				continue
			}
			if m.GetGauge() != nil {
				return m.GetGauge().GetValue()
			}
			return m.GetCounter().GetValue()
		}
	}
	return 0
}

func (f *fixture) auditRows(result string) int {
	f.t.Helper()
	var n int
	if err := f.pool.QueryRow(context.Background(), `SELECT count(*) FROM audit_log WHERE action = 'allocation.terminal_session' AND result = $1`,
		result).Scan(&n); err != nil {
		f.t.Fatal(err)
	}
	return n
}

// recordingCA keeps every certificate the terminal had signed.
type recordingCA struct {
	pki.SSHCA
	mu    sync.Mutex
	certs []*ssh.Certificate
}

func (r *recordingCA) SignSSHKey(ctx context.Context, pub []byte, principal string, ttl time.Duration) (pki.SSHCertificate, error) {
	c, err := r.SSHCA.SignSSHKey(ctx, pub, principal, ttl)
	if err != nil {
		return c, err
	}
	parsed, _, _, _, err := ssh.ParseAuthorizedKey(c.Certificate)
	if err != nil {
		return c, err
	}
	r.mu.Lock()
	r.certs = append(r.certs, parsed.(*ssh.Certificate))
	r.mu.Unlock()
	return c, nil
}

func (r *recordingCA) last(t testing.TB) *ssh.Certificate {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.certs) == 0 {
		t.Fatal("no certificate was signed")
	}
	return r.certs[len(r.certs)-1]
}

// clock is time.Now moved forward by the test.
type clock struct{ skew atomic.Int64 }

func (c *clock) Now() time.Time          { return time.Now().Add(time.Duration(c.skew.Load())) }
func (c *clock) advance(d time.Duration) { c.skew.Add(int64(d)) }

// syncBuffer is a log the test reads while the server writes it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type logWriter struct{ t testing.TB }

func (w logWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// privateKeysSince lists PEM private keys written under dirs since start
// whose public half is pub.
func privateKeysSince(t testing.TB, start time.Time, pub ssh.PublicKey, dirs ...string) []string {
	t.Helper()
	var found []string
	for _, dir := range dirs {
		_ = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				return fs.SkipDir
			}
			info, ierr := d.Info()
			if d.IsDir() || ierr != nil || info.Size() > 16<<10 || info.ModTime().Before(start) {
				return nil
			}
			b, rerr := os.ReadFile(path)
			if rerr != nil || !bytes.Contains(b, []byte("PRIVATE KEY")) {
				return nil
			}
			if k, perr := ssh.ParsePrivateKey(b); perr == nil && bytes.Equal(k.PublicKey().Marshal(), pub.Marshal()) {
				found = append(found, path)
			}
			return nil
		})
	}
	return found
}
