package tasks

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/gpuaas/gpuaas/agent/protocol"
	"github.com/gpuaas/gpuaas/internal/sshdtest"
)

func newSigner(t *testing.T) ssh.Signer {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	s, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// certSigner is a client key with a user certificate from ca for principal.
func certSigner(t *testing.T, ca ssh.Signer, principal string, validFor time.Duration) ssh.Signer {
	t.Helper()
	key := newSigner(t)
	now := time.Now()
	cert := &ssh.Certificate{Key: key.PublicKey(), CertType: ssh.UserCert, KeyId: "test", ValidPrincipals: []string{principal},
		ValidAfter: uint64(now.Add(-time.Minute).Unix()), ValidBefore: uint64(now.Add(validFor).Unix()),
		Permissions: ssh.Permissions{Extensions: map[string]string{"permit-pty": ""}}}
	if err := cert.SignCert(rand.Reader, ca); err != nil {
		t.Fatal(err)
	}
	cs, err := ssh.NewCertSigner(cert, key)
	if err != nil {
		t.Fatal(err)
	}
	return cs
}

func TestInstallSSHTrustWritesOnlyChanges(t *testing.T) {
	dir := t.TempDir()
	reloads := 0
	sys := &System{SSHDir: dir, ReloadSSHD: func(context.Context) error { reloads++; return nil }}
	ca1, ca2 := newSigner(t), newSigner(t)
	line := func(s ssh.Signer) string { return strings.TrimSpace(string(ssh.MarshalAuthorizedKey(s.PublicKey()))) }

	if changed, err := sys.InstallSSHTrust(t.Context(), nil); err != nil || changed || reloads != 0 {
		t.Fatalf("no keys: changed %v err %v reloads %d; want nothing done", changed, err, reloads)
	}
	if changed, err := sys.InstallSSHTrust(t.Context(), []string{line(ca1) + " vault-ssh-ca"}); err != nil || !changed || reloads != 1 {
		t.Fatalf("first install: changed %v err %v reloads %d", changed, err, reloads)
	}
	if changed, err := sys.InstallSSHTrust(t.Context(), []string{line(ca1)}); err != nil || changed || reloads != 1 {
		t.Fatalf("same key again: changed %v err %v reloads %d; want no write, no reload", changed, err, reloads)
	}
	got, err := os.ReadFile(filepath.Join(dir, "gpuaas_user_ca.pub"))
	if err != nil || string(got) != line(ca1)+"\n" {
		t.Fatalf("CA file %q (%v); want the key re-encoded without its comment", got, err)
	}
	conf, err := os.ReadFile(filepath.Join(dir, "sshd_config.d", "60-gpuaas.conf"))
	if err != nil || !strings.Contains(string(conf), "TrustedUserCAKeys "+dir+"/gpuaas_user_ca.pub\n") ||
		!strings.Contains(string(conf), "AuthorizedPrincipalsFile "+dir+"/gpuaas_principals/%u\n") {
		t.Fatalf("drop-in: %s (%v)", conf, err)
	}
	// A rotation: both keys during the overlap.
	if changed, err := sys.InstallSSHTrust(t.Context(), []string{line(ca1), line(ca2)}); err != nil || !changed || reloads != 2 {
		t.Fatalf("rotation: changed %v err %v reloads %d", changed, err, reloads)
	}
	for _, bad := range [][]string{
		{"not a key"},
		{`command="/bin/sh" ` + line(ca1)},
		{line(ca1) + "\n" + line(ca2)},
		{strings.TrimSpace(string(ssh.MarshalAuthorizedKey(certSigner(t, ca1, "x", time.Minute).PublicKey())))},
	} {
		if _, err := sys.InstallSSHTrust(t.Context(), bad); err == nil {
			t.Errorf("installed %q; want it refused", bad)
		}
	}
	if reloads != 2 {
		t.Fatalf("refused keys reloaded sshd (%d reloads)", reloads)
	}
	got, _ = os.ReadFile(filepath.Join(dir, "gpuaas_user_ca.pub"))
	if string(got) != line(ca1)+"\n"+line(ca2)+"\n" {
		t.Fatalf("a refused install changed the CA file: %q", got)
	}
}

// The trust the agent installs makes a real sshd accept the CA's short-lived
// certificates for a live tenant account, and nothing else: not for root, not
// from another CA, not expired, not after the tenant is revoked.
func TestSSHTrustWithRealSSHD(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test creates a real account: run it as root")
	}
	root := t.TempDir()
	// sshd reads authorized keys and principals as the user.
	for _, d := range []string{filepath.Dir(root), root} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	sshDir, home := filepath.Join(root, "ssh"), filepath.Join(root, "home")
	if err := os.MkdirAll(home, 0o755); err != nil {
		t.Fatal(err)
	}
	sys := &System{SSHDir: sshDir, HomeBase: home, SudoersDir: filepath.Join(root, "sudoers.d"),
		ReloadSSHD: func(context.Context) error { return nil }}
	ca := newSigner(t)
	if _, err := sys.InstallSSHTrust(t.Context(), []string{string(ssh.MarshalAuthorizedKey(ca.PublicKey()))}); err != nil {
		t.Fatal(err)
	}
	srv := sshdtest.Start(t, "Include "+filepath.Join(sshDir, "sshd_config.d", "*.conf"))

	n, err := rand.Int(rand.Reader, big.NewInt(9000))
	if err != nil {
		t.Fatal(err)
	}
	user, uid := fmt.Sprintf("gt%d", n.Int64()), 50000+int(n.Int64())
	t.Cleanup(func() { _ = exec.Command("userdel", "--force", "--remove", user).Run() })
	own := newSigner(t)
	params := ProvisionUserParams{AllocationID: "a1", Username: user, UID: uid,
		SSHPublicKeys: []string{string(ssh.MarshalAuthorizedKey(own.PublicKey()))}}
	if _, err := runTask(t, sys, protocol.TaskProvisionUser, params); err != nil {
		t.Fatal(err)
	}

	whoami := func(user string, key ssh.Signer) (string, error) {
		c, err := ssh.Dial("tcp", srv.Addr, srv.ClientConfig(user, ssh.PublicKeys(key)))
		if err != nil {
			return "", err
		}
		defer c.Close()
		s, err := c.NewSession()
		if err != nil {
			return "", err
		}
		defer s.Close()
		out, err := s.Output("id -un")
		return strings.TrimSpace(string(out)), err
	}
	if got, err := whoami(user, certSigner(t, ca, user, 2*time.Minute)); err != nil || got != user {
		t.Fatalf("certificate login: %q, %v; want %s", got, err, user)
	}
	if got, err := whoami(user, own); err != nil || got != user {
		t.Fatalf("the tenant's own key: %q, %v", got, err)
	}
	accepted := srv.Count("Accepted")
	for name, try := range map[string]func() (string, error){
		"root with a CA certificate for root":      func() (string, error) { return whoami("root", certSigner(t, ca, "root", time.Minute)) },
		"tenant with another principal":            func() (string, error) { return whoami(user, certSigner(t, ca, "root", time.Minute)) },
		"tenant with another CA's certificate":     func() (string, error) { return whoami(user, certSigner(t, newSigner(t), user, time.Minute)) },
		"tenant with an expired certificate":       func() (string, error) { return whoami(user, certSigner(t, ca, user, -30*time.Second)) },
		"tenant with a key the account never knew": func() (string, error) { return whoami(user, newSigner(t)) },
	} {
		if got, err := try(); err == nil {
			t.Errorf("%s: logged in as %q; want refused", name, got)
		}
	}
	if got := srv.Count("Accepted"); got != accepted {
		t.Fatalf("sshd accepted %d more logins for refused credentials", got-accepted)
	}

	if _, err := runTask(t, sys, protocol.TaskRevokeUser, RevokeUserParams{AllocationID: "a1", Username: user}); err != nil {
		t.Fatal(err)
	}
	if got, err := whoami(user, certSigner(t, ca, user, time.Minute)); err == nil {
		t.Fatalf("after revoke_user a certificate still logs in as %q", got)
	}
	if _, err := os.Stat(sys.principalsFile(user)); !os.IsNotExist(err) {
		t.Fatalf("principals file after revoke: %v", err)
	}
}
