package sshkeys_test

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"strings"
	"testing"

	"golang.org/x/crypto/ssh"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/sshkeys"
)

func authorized(t *testing.T, pub any, comment string) string {
	t.Helper()
	pk, err := ssh.NewPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(ssh.MarshalAuthorizedKey(pk))) + " " + comment
}

func TestParse(t *testing.T) {
	edPub, _, _ := ed25519.GenerateKey(rand.Reader)
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	weak, _ := rsa.GenerateKey(rand.Reader, 2048)
	strong, _ := rsa.GenerateKey(rand.Reader, 3072)
	ed := authorized(t, edPub, "ada@laptop")
	cases := []struct {
		name, line string
		typ        string
		bits       int
		code       errcode.Code
	}{
		{"ed25519", ed, "ed25519", 256, ""},
		{"ecdsa p256", authorized(t, &ec.PublicKey, "x"), "ecdsa", 256, ""},
		{"rsa 3072", authorized(t, &strong.PublicKey, "x"), "rsa", 3072, ""},
		{"rsa 2048 is too weak", authorized(t, &weak.PublicKey, "x"), "", 0, sshkeys.CodeTooWeak},
		{"garbage", "ssh-ed25519 not-base64!!", "", 0, sshkeys.CodeInvalid},
		{"empty", "  ", "", 0, sshkeys.CodeInvalid},
		{"options", `command="rm -rf /" ` + ed, "", 0, sshkeys.CodeInvalid},
		{"two keys", ed + "\n" + ed, "", 0, sshkeys.CodeInvalid},
		{"private key", "-----BEGIN OPENSSH PRIVATE KEY-----", "", 0, sshkeys.CodeInvalid},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			norm, fp, typ, bits, err := sshkeys.Parse(tc.line)
			if tc.code != "" {
				if errcode.Of(err) != tc.code {
					t.Fatalf("err %v, want %s", err, tc.code)
				}
				return
			}
			if err != nil || typ != tc.typ || bits != tc.bits || !strings.HasPrefix(fp, "SHA256:") || strings.Contains(norm, "@") {
				t.Fatalf("got %q %q %s %d %v", norm, fp, typ, bits, err)
			}
		})
	}
}
