package terminal_test

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/google/uuid"

	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/terminal"
	"github.com/gpuaas/gpuaas/core/internal/terminal/terminaltest"
)

// A browser types `echo hello` through the WebSocket and reads hello back
// from a real sshd, logged in as the allocation's user with an in-memory key
// and a certificate of the backend's SSH CA that expires within minutes.
func TestEchoHello(t *testing.T) {
	for _, b := range []string{"local", "vault"} {
		t.Run(b, func(t *testing.T) {
			f := setup(t, b)
			start := time.Now()
			tm := f.open(f.alloc, f.mint(f.alloc), browser)
			tm.resize(120, 40)
			tm.typeIn("echo hello\n")
			tm.expect("hello\r\n")
			tm.typeIn("id -un; stty size\n")
			tm.expect(f.user + "\r\n40 120\r\n")
			tm.resize(100, 30)
			tm.typeIn("stty size\n")
			tm.expect("30 100\r\n")

			cert := f.ca.last(t)
			if len(cert.ValidPrincipals) != 1 || cert.ValidPrincipals[0] != f.user {
				t.Errorf("certificate principals %v; want [%s]", cert.ValidPrincipals, f.user)
			}
			if life := time.Unix(int64(cert.ValidBefore), 0).Sub(start); life <= 0 || life > f.limits.Load().CertTTL+time.Second {
				t.Errorf("certificate valid for %s after the session started; want at most %s", life, f.limits.Load().CertTTL)
			}
			// sshd accepted that very certificate for the user.
			if !strings.Contains(strings.Join(f.sshd.Log(), "\n"), "Accepted publickey for "+f.user) ||
				f.sshd.Count(cert.KeyId) == 0 {
				t.Errorf("sshd did not log a login of %s with certificate %s:\n%s", f.user, cert.KeyId, strings.Join(f.sshd.Log(), "\n"))
			}
			tm.typeIn("exit 3\n")
			if code, reason := tm.closed(10 * time.Second); code != websocket.StatusNormalClosure || reason != "exit status 3" {
				t.Errorf("close %d %q; want 1000 \"exit status 3\"", code, reason)
			}
			if f.auditRows("success") != 1 {
				t.Errorf("%d audited session opens; want 1", f.auditRows("success"))
			}
			if got := f.metric("gpuaas_terminal_sessions_opened_total", ""); got != 1 {
				t.Errorf("sessions opened %v; want 1", got)
			}
			waitFor(t, func() bool { return f.metric("gpuaas_terminal_sessions_active", "") == 0 }, "the session to be counted closed")
			if f.metric("gpuaas_terminal_bytes_total", "in") == 0 || f.metric("gpuaas_terminal_bytes_total", "out") == 0 {
				t.Error("no relayed bytes counted")
			}
			// Where a key would land if the code wrote one (temporary files,
			// the working folder).
			wd, _ := os.Getwd()
			if keys := privateKeysSince(t, start, cert.Key, os.TempDir(), wd); len(keys) > 0 {
				t.Errorf("the ephemeral private key was written to disk: %v", keys)
			}
		})
	}
}

// A client that is not a browser sends the token in Authorization.
func TestAuthorizationHeader(t *testing.T) {
	f := setup(t, "local")
	tm := f.open(f.alloc, f.mint(f.alloc), cli)
	tm.typeIn("echo via-header\n") // a data frame opens an 80x24 shell
	tm.expect("via-header\r\n")
	tm.typeIn("stty size\n")
	tm.expect("24 80\r\n")
}

// Every bad request is refused before the upgrade, with the envelope, and
// no shell is opened: sshd's own log is the witness.
func TestBadRequestsOpenNoShell(t *testing.T) {
	f := setup(t, "local")
	cases := []struct {
		name   string
		try    func() (*term, *refusal)
		status int
		code   string
	}{
		{"evil origin", func() (*term, *refusal) {
			return f.attempt(f.alloc, f.mint(f.alloc), fromOrigin("https://evil.test"))
		}, 403, "terminal_origin_forbidden"},
		{"token reused", func() (*term, *refusal) {
			tok := f.mint(f.alloc)
			tm := f.open(f.alloc, tok, browser)
			_ = tm.c.Close(websocket.StatusNormalClosure, "")
			f.quiet()
			return f.attempt(f.alloc, tok, browser)
		}, 401, "terminal_token_invalid"},
		{"token in query", func() (*term, *refusal) {
			return f.attempt(f.alloc, f.mint(f.alloc), inQuery)
		}, 401, "terminal_token_in_query"},
		{"token for another allocation", func() (*term, *refusal) {
			return f.attempt(f.alloc, f.mint(f.other), browser)
		}, 403, "terminal_token_wrong_allocation"},
		{"expired token", func() (*term, *refusal) {
			tok := f.mint(f.alloc)
			f.clock.advance(terminal.TokenTTL + time.Second)
			defer f.clock.advance(-terminal.TokenTTL - time.Second)
			return f.attempt(f.alloc, tok, browser)
		}, 401, "terminal_token_expired"},
		{"released allocation", func() (*term, *refusal) {
			tok := f.mint(f.other)
			f.exec(`UPDATE allocations SET state = 'released', ended_at = now() WHERE id = $1`, f.other)
			return f.attempt(f.other, tok, browser)
		}, 409, "allocation_not_active"},
		{"unknown token", func() (*term, *refusal) {
			return f.attempt(f.alloc, terminal.TokenPrefix+strings.Repeat("A", 43), cli)
		}, 401, "terminal_token_invalid"},
		{"no token", func() (*term, *refusal) {
			return f.attempt(f.alloc, "", func(o *websocket.DialOptions, url, _ string) string { return url })
		}, 401, "terminal_token_invalid"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f.t = t
			shells, logins := terminaltest.Shells(f.sshd), f.sshd.Count("Accepted publickey")
			refused := f.metric("gpuaas_terminal_sessions_refused_total", strings.TrimPrefix(tc.code, "terminal_"))
			tm, r := tc.try()
			if tm != nil {
				t.Fatalf("the session opened; want %d %s", tc.status, tc.code)
			}
			if r.status != tc.status || r.code != tc.code {
				t.Fatalf("refused %d %s; want %d %s", r.status, r.body, tc.status, tc.code)
			}
			f.quiet()
			if got := terminaltest.Shells(f.sshd); got != shells {
				t.Errorf("sshd started %d shells; want none", got-shells)
			}
			if tc.name != "token reused" && f.sshd.Count("Accepted publickey") != logins {
				t.Errorf("sshd accepted a login")
			}
			if got := f.metric("gpuaas_terminal_sessions_refused_total", strings.TrimPrefix(tc.code, "terminal_")); got != refused+1 {
				t.Errorf("refusals counted %v; want %v", got, refused+1)
			}
		})
	}
	f.t = t
	if n := f.auditRows("denied"); n != len(cases) {
		t.Errorf("%d audited refusals; want %d", n, len(cases))
	}
}

// attempt is dial as a term.
func (f *fixture) attempt(alloc uuid.UUID, token string, how dialer) (*term, *refusal) {
	c, r := f.dial(alloc, token, how)
	if c != nil {
		return &term{t: f.t, c: c}, nil
	}
	return nil, r
}

// A token sent in the query string is refused, never logged, and revoked:
// it opens nothing afterwards either.
func TestTokenInQueryIsRevokedAndNotLogged(t *testing.T) {
	f := setup(t, "local")
	tok := f.mint(f.alloc)
	if _, r := f.dial(f.alloc, tok, inQuery); r == nil || r.status != 401 {
		t.Fatalf("token in query: %+v; want 401", r)
	}
	if _, r := f.dial(f.alloc, tok, browser); r == nil || r.code != "terminal_token_invalid" {
		t.Fatalf("the token is still usable after it was sent in the query: %+v", r)
	}
	secret := strings.TrimPrefix(tok, terminal.TokenPrefix)
	if strings.Contains(f.log.String(), secret) {
		t.Fatalf("the token appears in the log:\n%s", f.log.String())
	}
	if !strings.Contains(f.log.String(), terminal.Path(f.alloc)) {
		t.Fatalf("the request is not in the access log at all:\n%s", f.log.String())
	}
}

// A refused origin does not use the token up.
func TestOriginRefusalKeepsTheToken(t *testing.T) {
	f := setup(t, "local")
	tok := f.mint(f.alloc)
	if _, r := f.dial(f.alloc, tok, fromOrigin("https://evil.test")); r == nil || r.status != 403 {
		t.Fatalf("evil origin: %+v; want 403", r)
	}
	tm := f.open(f.alloc, tok, browser)
	tm.typeIn("echo still-good\n")
	tm.expect("still-good\r\n")
}

// A frame over the policy's limit closes the session with 1009; sent first,
// it never reaches a shell.
func TestOversizedFrameCloses1009(t *testing.T) {
	f := setup(t, "local")
	f.setLimits(func(l *terminal.Limits) { l.MaxFrameBytes = 1 << 10 })
	shells := terminaltest.Shells(f.sshd)
	tm := f.open(f.alloc, f.mint(f.alloc), browser)
	tm.typeIn("touch /tmp/gpuaas-oversized-" + f.user + "; " + strings.Repeat("#", 2<<10) + "\n")
	if code, _ := tm.closed(10 * time.Second); code != websocket.StatusMessageTooBig {
		t.Fatalf("close %d; want 1009", code)
	}
	f.quiet()
	if got := terminaltest.Shells(f.sshd); got != shells {
		t.Errorf("sshd started %d shells; want none", got-shells)
	}
	if _, err := os.Stat("/tmp/gpuaas-oversized-" + f.user); err == nil {
		t.Error("the oversized frame's command ran")
	}
	waitFor(t, func() bool { return f.metric("gpuaas_terminal_sessions_closed_total", "frame_too_large") == 1 }, "the 1009 close to be counted")

	// In a running session too.
	tm = f.open(f.alloc, f.mint(f.alloc), browser)
	tm.resize(80, 24)
	tm.typeIn("echo before\n")
	tm.expect("before\r\n")
	tm.typeIn(strings.Repeat("x", 1<<10+1))
	if code, _ := tm.closed(10 * time.Second); code != websocket.StatusMessageTooBig {
		t.Fatalf("close %d; want 1009", code)
	}
}

// Sessions beyond the principal's limit are refused with 429; closing one
// frees its slot.
func TestSessionLimit(t *testing.T) {
	f := setup(t, "local")
	f.setLimits(func(l *terminal.Limits) { l.MaxSessions = 2 })
	a := f.open(f.alloc, f.mint(f.alloc), browser)
	f.open(f.other, f.mint(f.other), browser)
	shells := terminaltest.Shells(f.sshd)
	if _, r := f.dial(f.alloc, f.mint(f.alloc), browser); r == nil || r.status != 429 || r.code != "terminal_session_limit" {
		t.Fatalf("third session: %+v; want 429 terminal_session_limit", r)
	}
	f.quiet()
	if terminaltest.Shells(f.sshd) != shells {
		t.Error("a refused session opened a shell")
	}
	_ = a.c.Close(websocket.StatusNormalClosure, "")
	waitFor(t, func() bool {
		var n int
		_ = f.pool.QueryRow(context.Background(), `SELECT count(*) FROM terminal_sessions`).Scan(&n)
		return n == 1
	}, "the closed session's slot to be released")
	f.open(f.alloc, f.mint(f.alloc), browser)
}

// A session with no traffic either way closes with 4000 after the idle
// timeout; the server pings the client meanwhile.
func TestIdleTimeout(t *testing.T) {
	f := setup(t, "local")
	lim := f.setLimits(func(l *terminal.Limits) { l.IdleTimeout, l.Keepalive = 2*time.Second, 500*time.Millisecond })
	tm := f.open(f.alloc, f.mint(f.alloc), browser)
	tm.resize(80, 24)
	start := time.Now()
	code, reason := tm.closed(10 * time.Second)
	if code != terminal.CloseIdle || reason != "idle timeout" {
		t.Fatalf("close %d %q; want %d \"idle timeout\"", code, reason, terminal.CloseIdle)
	}
	if d := time.Since(start); d < lim.IdleTimeout {
		t.Fatalf("closed after %s; want at least %s", d, lim.IdleTimeout)
	}
}

// At shutdown the sessions close with 1001, and new ones are refused.
func TestShutdownClosesSessions(t *testing.T) {
	f := setup(t, "local")
	tm := f.open(f.alloc, f.mint(f.alloc), browser)
	tm.resize(80, 24)
	tok := f.mint(f.alloc)
	f.stop()
	if code, _ := tm.closed(10 * time.Second); code != websocket.StatusGoingAway {
		t.Fatalf("close %d; want 1001", code)
	}
	if _, r := f.dial(f.alloc, tok, browser); r == nil || r.status != 503 {
		t.Fatalf("after shutdown: %+v; want 503", r)
	}
}

// The node's host key is pinned at the allocation's first session; a node
// that presents another one is refused.
func TestHostKeyPinned(t *testing.T) {
	f := setup(t, "local")
	tm := f.open(f.alloc, f.mint(f.alloc), cli)
	_ = tm.c.Close(websocket.StatusNormalClosure, "")
	var pinned string
	if err := f.pool.QueryRow(context.Background(), `SELECT public_key FROM terminal_host_keys WHERE allocation_id = $1`, f.alloc).Scan(&pinned); err != nil {
		t.Fatal(err)
	}
	f.exec(`UPDATE terminal_host_keys SET public_key = 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl' WHERE allocation_id = $1`, f.alloc)
	if _, r := f.dial(f.alloc, f.mint(f.alloc), cli); r == nil || r.status != 502 || r.code != "terminal_host_key_mismatch" {
		t.Fatalf("changed host key: %+v; want 502 terminal_host_key_mismatch", r)
	}
}

// Only users and service accounts mint, and only for active allocations.
func TestMint(t *testing.T) {
	f := setup(t, "local")
	ctx := principal.With(context.Background(), f.member)
	tok, err := f.svc.Mint(ctx, f.alloc)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(tok.Value, terminal.TokenPrefix) || len(tok.Value) != len(terminal.TokenPrefix)+43 {
		t.Errorf("token %q: want %s and 43 base64url characters (256 bits)", tok.Value, terminal.TokenPrefix)
	}
	if d := time.Until(tok.ExpiresAt); d < terminal.TokenTTL-5*time.Second || d > terminal.TokenTTL {
		t.Errorf("token expires in %s; want %s", d, terminal.TokenTTL)
	}
	var stored int
	_ = f.pool.QueryRow(ctx, `SELECT count(*) FROM terminal_tokens WHERE token_sha256 = sha256($1::bytea)`, []byte(tok.Value)).Scan(&stored)
	if stored != 1 {
		t.Errorf("the token is not stored as its hash")
	}
	if _, err := f.svc.Mint(ctx, f.released); err == nil || !strings.Contains(err.Error(), "allocation_not_active") {
		t.Errorf("mint for a released allocation: %v; want allocation_not_active", err)
	}
	if _, err := f.svc.Mint(principal.With(context.Background(), principal.SystemPrincipal("x")), f.alloc); err == nil {
		t.Error("the system principal minted a token")
	}
}

func waitFor(t testing.TB, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
