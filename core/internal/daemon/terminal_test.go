package daemon_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/google/uuid"

	"github.com/gpuaas/gpuaas/core/internal/config"
	"github.com/gpuaas/gpuaas/core/internal/daemon"
	"github.com/gpuaas/gpuaas/core/internal/daemon/daemontest"
	"github.com/gpuaas/gpuaas/core/internal/identity"
	"github.com/gpuaas/gpuaas/core/internal/pki"
	"github.com/gpuaas/gpuaas/core/internal/terminal"
	"github.com/gpuaas/gpuaas/core/internal/terminal/terminaltest"
	"github.com/gpuaas/gpuaas/core/internal/testenv"
	"github.com/gpuaas/gpuaas/sdk/sdktest"
)

const webApp = "https://app.test"

// termEnv is a core and a terminal gateway on one database and one PKI
// state folder, and a world whose active allocation is on a real sshd that
// trusts the core's SSH CA, as a local account.
type termEnv struct {
	*env
	w       *world
	gateway string // http://host:port
}

func newTermEnv(t *testing.T) *termEnv {
	t.Helper()
	pool, dbURL := testenv.MigratedPool(t)
	n := testenv.StartNATS(t)
	state := t.TempDir()
	// The local backend keeps its keys under the state folder: made here,
	// the core and the gateway open the same CA.
	ca, err := pki.NewLocal(filepath.Join(state, "pki"))
	if err != nil {
		t.Fatal(err)
	}
	caPub, err := ca.SSHCAPublicKey(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	vars := map[string]string{"DATABASE_URL": dbURL, "NATS_URL": n.URL(), "TEMPORAL_ADDRESS": testenv.Env(t, "TEMPORAL_ADDRESS"),
		"GPUAAS_STATE_DIR": state, "GPUAAS_TERMINAL_ALLOWED_ORIGINS": webApp}
	d := daemontest.Start(t, vars)
	te := &termEnv{env: &env{t: t, url: d.URL, pool: pool, ids: identity.NewService(pool, "local", testenv.Logger(t), nil)}}
	te.gateway = startGateway(t, map[string]string{"DATABASE_URL": dbURL, "GPUAAS_STATE_DIR": state,
		"GPUAAS_TERMINAL_ALLOWED_ORIGINS": webApp})

	te.w = te.newWorld()
	te.rentable(te.w)
	srv := terminaltest.StartSSHD(t, caPub)
	host, port := terminaltest.HostPort(t, srv)
	user := terminaltest.User(t)
	ctx := context.Background()
	te.exec(ctx, `UPDATE nodes SET hostname = $2, ssh_port = $3 WHERE id = $1`, te.w.nodeHeld, host, port)
	te.exec(ctx, `UPDATE allocations SET username = $2 WHERE id = $1`, te.w.alloc, user)
	return te
}

// startGateway runs gpuaasd terminal-gateway in-process until the test ends.
func startGateway(t *testing.T, vars map[string]string) string {
	t.Helper()
	cfg, err := config.LoadTerminalGateway([]string{"--listen-addr", "127.0.0.1:0"}, func(k string) string { return vars[k] }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	addr, done := make(chan string, 1), make(chan error, 1)
	go func() {
		done <- daemon.RunTerminalGateway(ctx, cfg, testenv.Logger(t).Named("gateway"),
			daemon.Options{Version: "test", Ready: func(a string) { addr <- a }})
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("gateway: %v", err)
			}
		case <-time.After(15 * time.Second):
			t.Error("the gateway did not stop")
		}
	})
	select {
	case a := <-addr:
		return "http://" + a
	case err := <-done:
		t.Fatalf("gateway exited at start: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("gateway did not start")
	}
	return ""
}

// mint asks the API for a terminal token.
func (te *termEnv) mint(token string, alloc uuid.UUID) (string, response) {
	te.t.Helper()
	r := te.send("POST", "/api/v1/allocations/"+alloc.String()+"/terminal-token", token, nil)
	var body struct {
		Token         string `json:"token"`
		WebsocketPath string `json:"websocket_path"`
		Subprotocol   string `json:"subprotocol"`
	}
	if r.status == http.StatusCreated {
		r.json(te.t, &body)
		if body.WebsocketPath != terminal.Path(alloc) || body.Subprotocol != terminal.Subprotocol {
			te.t.Errorf("minted %s", r.body)
		}
	}
	return body.Token, r
}

// shell opens a session at base (the core or the gateway) as a browser,
// types echo and reads the output back.
func shell(t *testing.T, base string, alloc uuid.UUID, token, word string) {
	t.Helper()
	c, status := dialTerminal(t, base, alloc, token)
	if c == nil {
		t.Fatalf("open at %s: %d", base, status)
	}
	defer c.CloseNow()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := c.Write(ctx, websocket.MessageText, []byte(`{"type":"resize","cols":80,"rows":24}`)); err != nil {
		t.Fatal(err)
	}
	if err := c.Write(ctx, websocket.MessageBinary, []byte("echo "+word+"\n")); err != nil {
		t.Fatal(err)
	}
	want := regexp.MustCompile(`[\r\n]` + word + `\r\n`)
	var out bytes.Buffer
	for !want.Match(out.Bytes()) {
		_, b, err := c.Read(ctx)
		if err != nil {
			t.Fatalf("reading %q at %s: %v; got %q", word, base, err, out.String())
		}
		out.Write(b)
	}
	_ = c.Close(websocket.StatusNormalClosure, "")
}

// dialTerminal opens a session as a browser, or returns the refusal status.
func dialTerminal(t *testing.T, base string, alloc uuid.UUID, token string) (*websocket.Conn, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	c, resp, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(base, "http")+terminal.Path(alloc), &websocket.DialOptions{
		Subprotocols: []string{terminal.Subprotocol, terminal.TokenProtocol + token},
		HTTPHeader:   http.Header{"Origin": {webApp}},
	})
	if err == nil {
		return c, http.StatusSwitchingProtocols
	}
	if resp == nil {
		t.Fatalf("dial %s: %v", base, err)
	}
	return nil, resp.StatusCode
}

// A token minted by the API opens a shell through the core and, as well,
// through the separate terminal gateway; a token is used once, wherever.
func TestTerminalThroughCoreAndGateway(t *testing.T) {
	te := newTermEnv(t)
	w := te.w
	key := w.tokens[member]

	tok, r := te.mint(key, w.alloc)
	if r.status != http.StatusCreated || r.header.Get("Cache-Control") != "no-store" {
		t.Fatalf("mint: %d %v %s", r.status, r.header, r.body)
	}
	shell(t, te.url, w.alloc, tok, "through-the-core")
	if _, status := dialTerminal(t, te.gateway, w.alloc, tok); status != http.StatusUnauthorized {
		t.Fatalf("replay at the gateway: %d; want 401", status)
	}

	tok, _ = te.mint(key, w.alloc)
	shell(t, te.gateway, w.alloc, tok, "through-the-gateway")
	for _, base := range []string{te.gateway, te.url} {
		if _, status := dialTerminal(t, base, w.alloc, tok); status != http.StatusUnauthorized {
			t.Fatalf("replay at %s: %d; want 401", base, status)
		}
	}

	// The API's bearer authentication leaves the terminal's Authorization
	// alone: a non-browser client sends the terminal token there.
	tok, _ = te.mint(key, w.alloc)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	c, resp, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(te.url, "http")+terminal.Path(w.alloc),
		&websocket.DialOptions{HTTPHeader: http.Header{"Authorization": {"Bearer " + tok}}})
	if err != nil {
		t.Fatalf("Authorization on the core: %v %v", err, resp)
	}
	_ = c.Close(websocket.StatusNormalClosure, "")

	// The gateway serves probes and metrics, and nothing of the API.
	if r := httpStatus(t, te.gateway+"/api/v1/healthz"); r != http.StatusOK {
		t.Errorf("gateway healthz: %d", r)
	}
	if r := httpStatus(t, te.gateway+"/api/v1/users/me"); r != http.StatusNotFound {
		t.Errorf("gateway /api/v1/users/me: %d; want 404", r)
	}
	m := te.call("GET", "/metrics", "", nil)
	for _, want := range []string{"gpuaas_terminal_sessions_opened_total 2", `gpuaas_terminal_sessions_refused_total{reason="token_invalid"} 1`} {
		if !strings.Contains(string(m.body), want) {
			t.Errorf("core metrics lack %q", want)
		}
	}

	var audited []string
	rows, err := te.pool.Query(ctx, `SELECT action || ':' || result FROM audit_log WHERE action LIKE 'allocation.terminal%' ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var s string
		_ = rows.Scan(&s)
		audited = append(audited, s)
	}
	want := "allocation.terminal_token:success allocation.terminal_session:success allocation.terminal_session:denied " +
		"allocation.terminal_token:success allocation.terminal_session:success allocation.terminal_session:denied " +
		"allocation.terminal_session:denied allocation.terminal_token:success allocation.terminal_session:success"
	if got := strings.Join(audited, " "); got != want {
		t.Errorf("audit log:\n%s\nwant\n%s", got, want)
	}
}

// Minting needs write access to an active allocation of the caller's
// project.
func TestTerminalTokenRules(t *testing.T) {
	te := newTermEnv(t)
	w := te.w
	cases := []struct {
		name   string
		token  string
		alloc  uuid.UUID
		status int
		code   string
	}{
		{"viewer", w.tokens[viewer], w.alloc, 403, "forbidden"},
		{"other org", w.tokens[otherOrg], w.alloc, 404, "allocation_not_found"},
		{"unknown allocation", w.tokens[member], uuid.New(), 404, "allocation_not_found"},
	}
	for _, tc := range cases {
		if _, r := te.mint(tc.token, tc.alloc); r.status != tc.status || r.code() != tc.code {
			t.Errorf("%s: %d %s; want %d %s", tc.name, r.status, r.body, tc.status, tc.code)
		}
	}
	te.exec(context.Background(), `UPDATE allocations SET state = 'released', ended_at = now() WHERE id = $1`, w.alloc)
	if _, r := te.mint(w.tokens[member], w.alloc); r.status != http.StatusConflict || r.code() != "allocation_not_active" {
		t.Errorf("released: %d %s; want 409 allocation_not_active", r.status, r.body)
	}
}

func httpStatus(t *testing.T, url string) int {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	_ = resp.Body.Close()
	return resp.StatusCode
}

// The CLI's `gpuaas terminal` opens the same session: a script on its
// standard input runs as the allocation's user on the real sshd, and the
// command exits with the shell's status.
func TestTerminalCLI(t *testing.T) {
	te := newTermEnv(t)
	cli := sdktest.BuildBinary(t, "github.com/gpuaas/gpuaas/core/cmd/gpuaas")
	cmd := exec.Command(cli, "terminal", te.w.alloc.String())
	cmd.Env = []string{"GPUAAS_API_URL=" + te.url, "GPUAAS_TOKEN=" + te.w.tokens[member], "PATH=/usr/bin:/bin"}
	cmd.Stdin = strings.NewReader("echo from-the-cli-$((6*7)); exit 7\n")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 7 {
		t.Fatalf("gpuaas terminal: %v; want exit status 7\nstdout: %s\nstderr: %s", err, stdout.String(), stderr.String())
	}
	if !strings.Contains(stdout.String(), "from-the-cli-42") {
		t.Fatalf("the shell's output did not come back: %q (stderr %q)", stdout.String(), stderr.String())
	}
}
