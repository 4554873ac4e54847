package provisioner_test

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"strings"
	"testing"

	"golang.org/x/crypto/ssh"

	"github.com/gpuaas/gpuaas/sdk/provisioner"
)

func authorized(t *testing.T, key any) string {
	t.Helper()
	pub, err := ssh.NewPublicKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(ssh.MarshalAuthorizedKey(pub)))
}

func TestCanonicalSSHKey(t *testing.T) {
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ed := authorized(t, pub)
	small, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := provisioner.CanonicalSSHKey("  " + ed + " ada@laptop \n"); err != nil || got != ed+" ada@laptop" {
		t.Fatalf("a plain key: %q %v", got, err)
	}
	for name, line := range map[string]string{
		"empty":           "",
		"not a key":       "hello",
		"options":         `command="/bin/sh" ` + ed,
		"two lines":       ed + "\n" + ed,
		"control chars":   ed + " a\x1bb",
		"bad comment":     ed + " $(reboot)",
		"short RSA":       authorized(t, &small.PublicKey),
		"too long":        strings.Repeat("a", 17<<10),
		"certificate key": "ssh-ed25519-cert-v01@openssh.com AAAA",
	} {
		if got, err := provisioner.CanonicalSSHKey(line); err == nil {
			t.Errorf("%s: accepted as %q", name, got)
		}
	}
}
