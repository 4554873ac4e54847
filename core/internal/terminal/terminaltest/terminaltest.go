// Package terminaltest gives terminal tests what they log in to: a real
// OpenSSH sshd on a loopback port that trusts a user CA, and local accounts
// made with useradd. Both need root; a test that cannot have them fails.
package terminaltest

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/crypto/ssh"

	"github.com/gpuaas/gpuaas/internal/sshdtest"
)

// StartSSHD runs a real sshd (internal/sshdtest) that trusts caPublicKey
// (authorized_keys format) for user certificates whose principal is the
// account name.
func StartSSHD(t testing.TB, caPublicKey []byte) *sshdtest.Server {
	t.Helper()
	ca := filepath.Join(t.TempDir(), "user_ca.pub")
	if err := os.WriteFile(ca, caPublicKey, 0o644); err != nil {
		t.Fatal(err)
	}
	return sshdtest.Start(t, "TrustedUserCAKeys "+ca+"\nPrintMotd no")
}

// Shells counts the shells sshd started.
func Shells(s *sshdtest.Server) int { return s.Count("Starting session: shell") }

// HostPort splits the server's address for a nodes row.
func HostPort(t testing.TB, s *sshdtest.Server) (string, int) {
	t.Helper()
	host, port, err := net.SplitHostPort(s.Addr)
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.Atoi(port)
	if err != nil {
		t.Fatal(err)
	}
	return host, n
}

// User creates a local account with a home and bash as its shell, usable
// with certificates (not locked) but with no password, and removes it when
// the test ends.
func User(t testing.TB) string {
	t.Helper()
	b := make([]byte, 5)
	_, _ = rand.Read(b)
	name := "gtt" + hex.EncodeToString(b)
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("terminaltest: %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	run("useradd", "--create-home", "--shell", "/bin/bash", name)
	t.Cleanup(func() {
		if out, err := exec.Command("userdel", "--remove", "--force", name).CombinedOutput(); err != nil {
			t.Errorf("terminaltest: userdel %s: %v\n%s", name, err, out)
		}
	})
	// sshd refuses a locked account ("!" in shadow) without PAM; "*" is no
	// password but not locked.
	run("usermod", "--password", "*", name)
	return name
}

// DialCert logs in to srv as user with a fresh in-memory key certified by
// sign (which returns the certificate in authorized_keys format).
func DialCert(ctx context.Context, srv *sshdtest.Server, user string, sign func(ctx context.Context, pub []byte) ([]byte, error)) (*ssh.Client, error) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	key, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		return nil, err
	}
	certLine, err := sign(ctx, ssh.MarshalAuthorizedKey(key.PublicKey()))
	if err != nil {
		return nil, err
	}
	pub, _, _, _, err := ssh.ParseAuthorizedKey(certLine)
	if err != nil {
		return nil, err
	}
	cert, ok := pub.(*ssh.Certificate)
	if !ok {
		return nil, fmt.Errorf("not a certificate: %s", pub.Type())
	}
	signer, err := ssh.NewCertSigner(cert, key)
	if err != nil {
		return nil, err
	}
	return ssh.Dial("tcp", srv.Addr, srv.ClientConfig(user, ssh.PublicKeys(signer)))
}
