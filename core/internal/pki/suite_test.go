package pki_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/gpuaas/gpuaas/core/internal/kms"
	"github.com/gpuaas/gpuaas/core/internal/pki"
)

// The shared suite: every test runs against each backend of backends().

func newCSR(t *testing.T, key crypto.Signer, tmpl x509.CertificateRequest) []byte {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &tmpl, key)
	if err != nil {
		t.Fatalf("create CSR: %v", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

func ed25519Key(t *testing.T) ed25519.PrivateKey {
	t.Helper()
	_, k, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func ecKey(t *testing.T, c elliptic.Curve) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(c, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func mustURL(t *testing.T, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

func parseCert(t *testing.T, p []byte) *x509.Certificate {
	t.Helper()
	b, _ := pem.Decode(p)
	if b == nil || b.Type != "CERTIFICATE" {
		t.Fatalf("not a PEM certificate: %q", p)
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// verifyClientCert checks cert against the backend's chain for client auth.
func verifyClientCert(t *testing.T, ctx context.Context, ca pki.CA, cert *x509.Certificate) {
	t.Helper()
	chain, err := ca.CAChain(ctx)
	if err != nil {
		t.Fatalf("CAChain: %v", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(chain) {
		t.Fatalf("CAChain holds no certificate: %q", chain)
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatalf("certificate does not verify against CAChain: %v", err)
	}
}

func TestSignCSR(t *testing.T) {
	t.Parallel()
	for _, env := range backends(t) {
		t.Run(env.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			b := env.open(t, "")
			nodeID := "0b7f9c1e-6a43-4bd4-9d5e-4f0d2a1c9e77"
			for _, c := range []struct {
				name string
				key  crypto.Signer
				tmpl x509.CertificateRequest
			}{
				{"ed25519 empty subject", ed25519Key(t), x509.CertificateRequest{}},
				{"p256 naming itself", ecKey(t, elliptic.P256()), x509.CertificateRequest{
					Subject: pkix.Name{CommonName: nodeID}, URIs: []*url.URL{mustURL(t, pki.NodeURI(nodeID))}}},
			} {
				t.Run(c.name, func(t *testing.T) {
					before := time.Now()
					got, err := b.CA.SignCSR(ctx, newCSR(t, c.key, c.tmpl), nodeID, 2*time.Hour)
					if err != nil {
						t.Fatalf("SignCSR: %v", err)
					}
					cert := parseCert(t, got.PEM)
					verifyClientCert(t, ctx, b.CA, cert)
					if id, err := pki.NodeIDFromCert(cert); err != nil || id != nodeID {
						t.Fatalf("node id from cert = %q, %v", id, err)
					}
					if cert.Subject.CommonName != nodeID || len(cert.DNSNames)+len(cert.IPAddresses)+len(cert.EmailAddresses) != 0 {
						t.Fatalf("subject %v, DNS %v, IP %v, email %v: want CN=node id and no other names",
							cert.Subject, cert.DNSNames, cert.IPAddresses, cert.EmailAddresses)
					}
					if cert.IsCA || !cert.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(c.key.Public()) {
						t.Fatal("certificate is a CA or not for the CSR's key")
					}
					if got.Serial != pki.SerialOf(cert) || !got.NotAfter.Equal(cert.NotAfter) {
						t.Fatalf("returned serial %s / not-after %v, certificate has %s / %v", got.Serial, got.NotAfter, pki.SerialOf(cert), cert.NotAfter)
					}
					if lo, hi := before.Add(2*time.Hour-5*time.Second), time.Now().Add(2*time.Hour+5*time.Second); cert.NotAfter.Before(lo) || cert.NotAfter.After(hi) {
						t.Fatalf("not-after %v, want about two hours from now", cert.NotAfter)
					}
				})
			}
			t.Run("ttl capped", func(t *testing.T) {
				got, err := b.CA.SignCSR(ctx, newCSR(t, ed25519Key(t), x509.CertificateRequest{}), nodeID, 30*24*time.Hour)
				if err != nil {
					t.Fatal(err)
				}
				if max := time.Now().Add(pki.DefaultMaxCertTTL + time.Minute); got.NotAfter.After(max) {
					t.Fatalf("not-after %v beyond the 24h cap", got.NotAfter)
				}
			})
		})
	}
}

func TestSignCSRRefusesBadRequests(t *testing.T) {
	t.Parallel()
	nodeID := "node-a"
	good := ed25519Key(t)
	rsa2048, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	bcCA, err := asn1.Marshal(struct {
		IsCA bool `asn1:"optional"`
	}{true})
	if err != nil {
		t.Fatal(err)
	}
	tampered := newCSR(t, good, x509.CertificateRequest{Subject: pkix.Name{CommonName: nodeID}})
	{
		b, _ := pem.Decode(tampered)
		i := bytes.Index(b.Bytes, []byte(nodeID))
		b.Bytes[i] = 'x' // the CSR now claims "xode-a" under node-a's signature
		tampered = pem.EncodeToMemory(b)
	}
	cases := []struct {
		name   string
		csr    func(t *testing.T) []byte
		nodeID string
	}{
		{"weak RSA key", func(t *testing.T) []byte { return newCSR(t, rsa2048, x509.CertificateRequest{}) }, nodeID},
		{"P-224 key", func(t *testing.T) []byte { return newCSR(t, ecKey(t, elliptic.P224()), x509.CertificateRequest{}) }, nodeID},
		{"common name of another node", func(t *testing.T) []byte {
			return newCSR(t, good, x509.CertificateRequest{Subject: pkix.Name{CommonName: "node-b"}})
		}, nodeID},
		{"URI SAN of another node", func(t *testing.T) []byte {
			return newCSR(t, good, x509.CertificateRequest{URIs: []*url.URL{mustURL(t, pki.NodeURI("node-b"))}})
		}, nodeID},
		{"two URI SANs", func(t *testing.T) []byte {
			return newCSR(t, good, x509.CertificateRequest{URIs: []*url.URL{mustURL(t, pki.NodeURI(nodeID)), mustURL(t, pki.NodeURI("node-b"))}})
		}, nodeID},
		{"DNS SAN", func(t *testing.T) []byte {
			return newCSR(t, good, x509.CertificateRequest{DNSNames: []string{"core.example.com"}})
		}, nodeID},
		{"IP SAN", func(t *testing.T) []byte {
			return newCSR(t, good, x509.CertificateRequest{IPAddresses: []net.IP{net.ParseIP("10.0.0.1")}})
		}, nodeID},
		{"e-mail SAN", func(t *testing.T) []byte {
			return newCSR(t, good, x509.CertificateRequest{EmailAddresses: []string{"admin@example.com"}})
		}, nodeID},
		{"asks to be a CA", func(t *testing.T) []byte {
			return newCSR(t, good, x509.CertificateRequest{ExtraExtensions: []pkix.Extension{{Id: asn1.ObjectIdentifier{2, 5, 29, 19}, Critical: true, Value: bcCA}}})
		}, nodeID},
		{"tampered signature", func(*testing.T) []byte { return tampered }, nodeID},
		{"not PEM", func(*testing.T) []byte { return []byte("hello") }, nodeID},
		{"a certificate, not a CSR", func(t *testing.T) []byte {
			p, _ := pem.Decode(newCSR(t, good, x509.CertificateRequest{}))
			return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: p.Bytes})
		}, nodeID},
		{"bad node id", func(t *testing.T) []byte { return newCSR(t, good, x509.CertificateRequest{}) }, "../node-a"},
		{"empty node id", func(t *testing.T) []byte { return newCSR(t, good, x509.CertificateRequest{}) }, ""},
	}
	for _, env := range backends(t) {
		t.Run(env.name, func(t *testing.T) {
			t.Parallel()
			b := env.open(t, "")
			for _, c := range cases {
				t.Run(c.name, func(t *testing.T) {
					got, err := b.CA.SignCSR(context.Background(), c.csr(t), c.nodeID, time.Hour)
					if !errors.Is(err, pki.ErrInvalid) {
						t.Fatalf("SignCSR = %v, %v; want ErrInvalid", got.Serial, err)
					}
				})
			}
		})
	}
}

func TestRevoke(t *testing.T) {
	t.Parallel()
	for _, env := range backends(t) {
		t.Run(env.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			b := env.open(t, "")
			sign := func() pki.Certificate {
				c, err := b.CA.SignCSR(ctx, newCSR(t, ed25519Key(t), x509.CertificateRequest{}), "node-r", time.Hour)
				if err != nil {
					t.Fatal(err)
				}
				return c
			}
			keep, drop := sign(), sign()
			r, err := b.CA.Revocations(ctx)
			if err != nil {
				t.Fatalf("Revocations: %v", err)
			}
			if _, ok := r.Serials[drop.Serial]; ok {
				t.Fatal("serial revoked before Revoke")
			}
			// Revoke takes the serial in other spellings too.
			if err := b.CA.Revoke(ctx, strings.ToUpper(strings.ReplaceAll(drop.Serial, ":", "-"))); err != nil {
				t.Fatalf("Revoke: %v", err)
			}
			if err := b.CA.Revoke(ctx, drop.Serial); err != nil {
				t.Fatalf("Revoke twice: %v", err)
			}
			r, err = b.CA.Revocations(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if _, ok := r.Serials[drop.Serial]; !ok {
				t.Fatalf("revoked serial %s not listed in %v", drop.Serial, r.Serials)
			}
			if _, ok := r.Serials[keep.Serial]; ok {
				t.Fatal("a serial that was not revoked is listed")
			}
			checker := pki.NewRevocationChecker(b.CA)
			for serial, want := range map[string]bool{drop.Serial: true, keep.Serial: false, strings.ReplaceAll(drop.Serial, ":", ""): true} {
				if got, err := checker.Revoked(ctx, serial); err != nil || got != want {
					t.Fatalf("Revoked(%s) = %v, %v; want %v", serial, got, err, want)
				}
			}
			if err := b.CA.Revoke(ctx, "7f:00:11:22:33:44:55:66:77:88:99"); !errors.Is(err, pki.ErrNotFound) {
				t.Fatalf("revoke unknown serial: %v", err)
			}
			if err := b.CA.Revoke(ctx, "not-a-serial"); !errors.Is(err, pki.ErrInvalid) {
				t.Fatalf("revoke malformed serial: %v", err)
			}
		})
	}
}

func TestSignerRotation(t *testing.T) {
	t.Parallel()
	for _, env := range backends(t) {
		t.Run(env.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			s := env.open(t, "").Signer
			const key = "gpuaas-tasks"
			if _, _, err := s.Sign(ctx, key, []byte("x")); !errors.Is(err, pki.ErrNotFound) {
				t.Fatalf("Sign before EnsureKey: %v", err)
			}
			for range 2 { // idempotent
				if err := s.EnsureKey(ctx, key); err != nil {
					t.Fatalf("EnsureKey: %v", err)
				}
			}
			oldPayload := []byte(`{"node_id":"n1","task_id":"t1","type":"node.inventory","nonce":"a"}`)
			oldSig, v1, err := s.Sign(ctx, key, oldPayload)
			if err != nil || v1 != 1 || len(oldSig) != ed25519.SignatureSize {
				t.Fatalf("Sign = %d bytes, v%d, %v", len(oldSig), v1, err)
			}
			v2, err := s.Rotate(ctx, key)
			if err != nil || v2 != 2 {
				t.Fatalf("Rotate = %d, %v; want 2", v2, err)
			}
			newPayload := []byte(`{"node_id":"n1","task_id":"t2","type":"node.wipe","nonce":"b"}`)
			newSig, got, err := s.Sign(ctx, key, newPayload)
			if err != nil || got != 2 {
				t.Fatalf("Sign after rotation = v%d, %v; want v2", got, err)
			}
			if err := s.Verify(ctx, key, oldPayload, oldSig, 1); err != nil {
				t.Fatalf("old signature after rotation: %v", err)
			}
			if err := s.Verify(ctx, key, newPayload, newSig, 2); err != nil {
				t.Fatalf("new signature: %v", err)
			}
			flipped := bytes.Clone(newSig)
			flipped[10] ^= 1
			for _, c := range []struct {
				name    string
				payload []byte
				sig     []byte
				version int
			}{
				{"tampered payload", append(bytes.Clone(newPayload), ' '), newSig, 2},
				{"tampered signature", newPayload, flipped, 2},
				{"wrong version", oldPayload, oldSig, 2},
				{"unknown version", newPayload, newSig, 9},
				{"version zero", newPayload, newSig, 0},
				{"short signature", newPayload, newSig[:10], 2},
			} {
				t.Run(c.name, func(t *testing.T) {
					if err := s.Verify(ctx, key, c.payload, c.sig, c.version); !errors.Is(err, pki.ErrBadSignature) {
						t.Fatalf("Verify = %v, want ErrBadSignature", err)
					}
				})
			}
			pubs, err := s.PublicKeys(ctx, key)
			if err != nil || len(pubs) != 2 {
				t.Fatalf("PublicKeys = %d keys, %v", len(pubs), err)
			}
			// Offline verification, as agents do it.
			if !ed25519.Verify(pubs[1], oldPayload, oldSig) || !ed25519.Verify(pubs[2], newPayload, newSig) || ed25519.Verify(pubs[1], newPayload, newSig) {
				t.Fatal("public keys do not verify the signatures of their versions")
			}
			if _, err := s.PublicKeys(ctx, "missing-key"); !errors.Is(err, pki.ErrNotFound) {
				t.Fatalf("PublicKeys of a missing key: %v", err)
			}
			if _, err := s.Rotate(ctx, "missing-key"); !errors.Is(err, pki.ErrNotFound) {
				t.Fatalf("Rotate a missing key: %v", err)
			}
			if err := s.EnsureKey(ctx, "../etc"); !errors.Is(err, pki.ErrInvalid) {
				t.Fatalf("EnsureKey with a bad name: %v", err)
			}
		})
	}
}

func TestEnvelope(t *testing.T) {
	t.Parallel()
	for _, env := range backends(t) {
		t.Run(env.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			keys := env.open(t, "").Keys
			secret := []byte(`{"secret_key":"sk_live_0123456789abcdef"}`)
			aad := []byte("gpuaas/plugin_instances/stripe/secrets")
			sealed, err := kms.Seal(ctx, keys, secret, aad)
			if err != nil {
				t.Fatalf("Seal: %v", err)
			}
			if bytes.Contains(sealed, []byte("sk_live")) {
				t.Fatal("sealed envelope holds the plaintext")
			}
			got, err := kms.Open(ctx, keys, sealed, aad)
			if err != nil || !bytes.Equal(got, secret) {
				t.Fatalf("Open = %q, %v", got, err)
			}
			again, err := kms.Seal(ctx, keys, secret, aad)
			if err != nil || bytes.Equal(again, sealed) {
				t.Fatalf("second Seal equal to the first (%v)", err)
			}
			e, err := kms.ParseEnvelope(sealed)
			if err != nil {
				t.Fatal(err)
			}
			wantID := kms.LocalKeyID
			if env.vault != nil {
				wantID = "vault:" + env.vault.cfg.TransitMount + "/" + env.vault.cfg.DataKey
			}
			if e.KeyID != wantID || e.KeyVersion != 1 {
				t.Fatalf("envelope key %s v%d, want %s v1", e.KeyID, e.KeyVersion, wantID)
			}
			flip := func(b []byte, i int) []byte {
				c := bytes.Clone(b)
				c[i%len(c)] ^= 1
				return c
			}
			for _, c := range []struct {
				name string
				env  kms.Envelope
				aad  []byte
				want error
			}{
				{"wrong aad", e, []byte("gpuaas/plugin_instances/other/secrets"), kms.ErrDecrypt},
				{"no aad", e, nil, kms.ErrDecrypt},
				{"tampered ciphertext", func() kms.Envelope { x := e; x.Ciphertext = flip(x.Ciphertext, 3); return x }(), aad, kms.ErrDecrypt},
				{"tampered wrapped key", func() kms.Envelope { x := e; x.WrappedKey = flip(x.WrappedKey, len(x.WrappedKey)-5); return x }(), aad, kms.ErrDecrypt},
				{"another key", func() kms.Envelope { x := e; x.KeyID = "elsewhere"; return x }(), aad, kms.ErrUnknownKey},
			} {
				t.Run(c.name, func(t *testing.T) {
					if got, err := keys.Decrypt(ctx, c.env, c.aad); !errors.Is(err, c.want) {
						t.Fatalf("Decrypt = %q, %v; want %v", got, err, c.want)
					}
				})
			}
			// A second backend on the same state (a restart, another instance) opens it.
			if env.vault == nil {
				return
			}
			other := env.open(t, "").Keys
			if got, err := kms.Open(ctx, other, sealed, aad); err != nil || !bytes.Equal(got, secret) {
				t.Fatalf("Open through a second backend: %q, %v", got, err)
			}
		})
	}
}

func TestSSHCA(t *testing.T) {
	t.Parallel()
	for _, env := range backends(t) {
		t.Run(env.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			ca := env.open(t, "").SSH
			caLine, err := ca.SSHCAPublicKey(ctx)
			if err != nil {
				t.Fatalf("SSHCAPublicKey: %v", err)
			}
			caKey, _, _, _, err := ssh.ParseAuthorizedKey(caLine)
			if err != nil {
				t.Fatalf("CA key %q: %v", caLine, err)
			}
			user := ed25519Key(t)
			userPub, err := ssh.NewPublicKey(user.Public())
			if err != nil {
				t.Fatal(err)
			}
			got, err := ca.SignSSHKey(ctx, ssh.MarshalAuthorizedKey(userPub), "tenant_ab12", 5*time.Minute)
			if err != nil {
				t.Fatalf("SignSSHKey: %v", err)
			}
			parsed, _, _, _, err := ssh.ParseAuthorizedKey(got.Certificate)
			if err != nil {
				t.Fatal(err)
			}
			cert := parsed.(*ssh.Certificate)
			checker := ssh.CertChecker{IsUserAuthority: func(k ssh.PublicKey) bool { return bytes.Equal(k.Marshal(), caKey.Marshal()) }}
			if _, err := checker.Authenticate(connMeta("tenant_ab12"), cert); err != nil {
				t.Fatalf("sshd would refuse the certificate: %v", err)
			}
			if _, err := checker.Authenticate(connMeta("root"), cert); err == nil {
				t.Fatal("certificate valid for another user")
			}
			if cert.Serial != got.Serial || time.Until(got.ValidBefore) > 5*time.Minute+5*time.Second || time.Until(got.ValidBefore) < 4*time.Minute {
				t.Fatalf("serial %d (returned %d), valid before %v", cert.Serial, got.Serial, got.ValidBefore)
			}
			rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
			if err != nil {
				t.Fatal(err)
			}
			weak, err := ssh.NewPublicKey(&rsaKey.PublicKey)
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range []struct{ name, key, principal string }{
				{"bad principal", string(ssh.MarshalAuthorizedKey(userPub)), "root;rm -rf /"},
				{"principal list", string(ssh.MarshalAuthorizedKey(userPub)), "alice,root"},
				{"weak key", string(ssh.MarshalAuthorizedKey(weak)), "alice"},
				{"garbage key", "ssh-ed25519 AAAAnotakey", "alice"},
				{"a certificate as key", string(got.Certificate), "alice"},
			} {
				t.Run(c.name, func(t *testing.T) {
					if _, err := ca.SignSSHKey(ctx, []byte(c.key), c.principal, time.Minute); !errors.Is(err, pki.ErrInvalid) {
						t.Fatalf("SignSSHKey = %v, want ErrInvalid", err)
					}
				})
			}
		})
	}
}

type connMeta string

func (c connMeta) User() string        { return string(c) }
func (connMeta) SessionID() []byte     { return nil }
func (connMeta) ClientVersion() []byte { return nil }
func (connMeta) ServerVersion() []byte { return nil }
func (connMeta) RemoteAddr() net.Addr  { return &net.TCPAddr{} }
func (connMeta) LocalAddr() net.Addr   { return &net.TCPAddr{} }
