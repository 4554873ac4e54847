// Package sshdtest runs a real OpenSSH sshd on a loopback port for tests, with
// a private configuration and host key in a temporary folder. It needs root
// (sshd changes to the logged-in user) and /usr/sbin/sshd (Debian
// openssh-server, installed by devstack/scripts/ensure-deps.sh); without
// them the test fails, it does not skip.
package sshdtest

import (
	"bufio"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
)

// Binary is the sshd the tests run.
const Binary = "/usr/sbin/sshd"

// Server is a running sshd.
type Server struct {
	// Addr is host:port on 127.0.0.1.
	Addr string
	// HostKey is the server's host key, for the clients' HostKeyCallback.
	HostKey ssh.PublicKey

	mu  sync.Mutex
	log []string
}

// Start runs sshd until the test ends. extra is appended to the
// configuration (for example an Include of a drop-in folder, or
// TrustedUserCAKeys). Authentication is public key only; PAM is off and
// StrictModes no, so homes in temporary folders work.
func Start(t testing.TB, extra string) *Server {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("sshdtest: a real sshd needs root")
	}
	if _, err := os.Stat(Binary); err != nil {
		t.Fatalf("sshdtest: %v (install openssh-server: devstack/scripts/ensure-deps.sh does)", err)
	}
	// sshd's privilege separation folder.
	if err := os.MkdirAll("/run/sshd", 0o755); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	block, err := ssh.MarshalPrivateKey(priv, "")
	if err != nil {
		t.Fatal(err)
	}
	hostKey := filepath.Join(dir, "ssh_host_ed25519_key")
	if err := os.WriteFile(hostKey, pem.EncodeToMemory(block), 0o600); err != nil {
		t.Fatal(err)
	}
	sshPub, err := ssh.NewPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	_, port, _ := net.SplitHostPort(addr)
	cfg := filepath.Join(dir, "sshd_config")
	conf := fmt.Sprintf(`Port %s
ListenAddress 127.0.0.1
HostKey %s
PidFile %s
UsePAM no
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PermitRootLogin prohibit-password
MaxStartups 200:30:400
LogLevel VERBOSE
%s
`, port, hostKey, filepath.Join(dir, "sshd.pid"), extra)
	if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(Binary, "-t", "-f", cfg).CombinedOutput(); err != nil {
		t.Fatalf("sshdtest: sshd refuses the configuration: %v: %s", err, out)
	}
	cmd := exec.Command(Binary, "-D", "-e", "-f", cfg)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("sshdtest: start sshd: %v", err)
	}
	s := &Server{Addr: addr, HostKey: sshPub}
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.collect(stderr)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		<-done
		if t.Failed() {
			t.Logf("sshd log:\n%s", strings.Join(s.Log(), "\n"))
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			_ = c.Close()
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("sshdtest: sshd does not listen on %s: %v\n%s", addr, err, strings.Join(s.Log(), "\n"))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (s *Server) collect(r io.Reader) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		s.mu.Lock()
		s.log = append(s.log, sc.Text())
		s.mu.Unlock()
	}
}

// Log is what sshd logged so far, a line each.
func (s *Server) Log() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.log...)
}

// Count is how many log lines contain sub (e.g. "Accepted certificate" or
// "session opened"... sshd -e logs authentication and session events).
func (s *Server) Count(sub string) int {
	n := 0
	for _, l := range s.Log() {
		if strings.Contains(l, sub) {
			n++
		}
	}
	return n
}

// ClientConfig is a client configuration for user that verifies the
// server's host key.
func (s *Server) ClientConfig(user string, auth ...ssh.AuthMethod) *ssh.ClientConfig {
	return &ssh.ClientConfig{User: user, Auth: auth, HostKeyCallback: ssh.FixedHostKey(s.HostKey), Timeout: 10 * time.Second}
}
