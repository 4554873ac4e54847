package pki

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/gpuaas/gpuaas/core/internal/kms"
)

// Vault is the backend over a Vault server:
//
//	<pki>/sign/<role>            node certificates (the role: see doc/operator-guide.md)
//	<pki>/revoke, <pki>/crl      revocation; the CRL is checked against the CA
//	<pki>/cert/ca_chain          the chain
//	<transit>/keys/<name>        signing keys (ed25519): sign, verify, rotate, read
//	<transit>/datakey/plaintext/<data key>, <transit>/decrypt/<data key>   envelope keys
//	<ssh>/sign/<role>, <ssh>/public_key                                    SSH user CA
type Vault struct {
	vc   *vaultClient
	cfg  VaultConfig
	opts options
	keys *kms.Vault

	mu     sync.Mutex
	issuer *x509.Certificate // verifies the CRL; refreshed when it stops doing so
}

var (
	_ CA     = (*Vault)(nil)
	_ Signer = (*Vault)(nil)
	_ SSHCA  = (*Vault)(nil)
)

// NewVault logs in to Vault, starts renewing the token and makes sure the
// data key exists (creating it needs write access to <transit>/keys/<data key>;
// without it the key must exist already).
func NewVault(ctx context.Context, cfg VaultConfig, opts ...Option) (*Vault, error) {
	cfg = cfg.withDefaults()
	o := buildOptions(opts)
	vc, err := dialVault(ctx, cfg, o)
	if err != nil {
		return nil, err
	}
	v := &Vault{vc: vc, cfg: cfg, opts: o, keys: kms.NewVault(vc, cfg.TransitMount, cfg.DataKey)}
	if err := v.ensureTransitKey(ctx, cfg.DataKey, "aes256-gcm96"); err != nil {
		_ = vc.close()
		return nil, err
	}
	return v, nil
}

// Close stops the token renewal.
func (v *Vault) Close() error { return v.vc.close() }

// Keyring is the envelope keyring over the Transit data key.
func (v *Vault) Keyring() *kms.Vault { return v.keys }

// SignCSR implements CA.
func (v *Vault) SignCSR(ctx context.Context, csrPEM []byte, nodeID string, ttl time.Duration) (Certificate, error) {
	csr, err := checkCSR(csrPEM, nodeID)
	if err != nil {
		return Certificate{}, err
	}
	ttl = clampTTL(ttl, v.opts.maxCertTTL)
	path := v.cfg.PKIMount + "/sign/" + v.cfg.PKIRole
	s, err := v.vc.write(ctx, "sign csr", path, map[string]any{
		"csr":                  string(csrPEM),
		"common_name":          nodeID,
		"uri_sans":             NodeURI(nodeID),
		"exclude_cn_from_sans": true,
		"ttl":                  strconv.FormatInt(int64(ttl/time.Second), 10) + "s",
		"format":               "pem",
	})
	if err != nil {
		if msg, ok := badRequest(err); ok {
			return Certificate{}, fmt.Errorf("%w: vault refused the CSR: %s", ErrInvalid, msg)
		}
		return Certificate{}, err
	}
	if s == nil {
		return Certificate{}, fmt.Errorf("pki: sign csr: vault %s returned nothing", path)
	}
	certPEM, _ := s.Data["certificate"].(string)
	block, _ := pem.Decode([]byte(certPEM))
	if block == nil || block.Type != "CERTIFICATE" {
		return Certificate{}, fmt.Errorf("pki: sign csr: vault %s returned no certificate", path)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return Certificate{}, fmt.Errorf("pki: sign csr: vault's certificate: %w", err)
	}
	// The role decides what Vault puts in; refuse a certificate that names
	// more than the node or is for another key (a misconfigured role).
	if id, err := NodeIDFromCert(cert); err != nil || id != nodeID || len(cert.DNSNames) > 0 || len(cert.IPAddresses) > 0 {
		return Certificate{}, fmt.Errorf("pki: sign csr: vault role %s issued a certificate naming %v %v %v; set use_csr_sans=false, use_csr_common_name=false and allowed_uri_sans=%s*",
			v.cfg.PKIRole, cert.URIs, cert.DNSNames, cert.IPAddresses, NodeURIPrefix)
	}
	if pk, ok := cert.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !pk.Equal(csr.PublicKey) {
		return Certificate{}, errors.New("pki: sign csr: vault's certificate is not for the CSR's key")
	}
	if !slices.Contains(cert.ExtKeyUsage, x509.ExtKeyUsageClientAuth) {
		return Certificate{}, fmt.Errorf("pki: sign csr: vault role %s issued a certificate without client auth; set client_flag=true", v.cfg.PKIRole)
	}
	return Certificate{PEM: pem.EncodeToMemory(block), Serial: SerialOf(cert), NotAfter: cert.NotAfter}, nil
}

// Revoke implements CA.
func (v *Vault) Revoke(ctx context.Context, serial string) error {
	s, err := NormalizeSerial(serial)
	if err != nil {
		return err
	}
	_, err = v.vc.write(ctx, "revoke", v.cfg.PKIMount+"/revoke", map[string]any{"serial_number": s})
	if msg, ok := badRequest(err); ok && strings.Contains(msg, "not found") {
		return fmt.Errorf("%w: no certificate with serial %s: %s", ErrNotFound, s, msg)
	}
	return err
}

// CAChain implements CA.
func (v *Vault) CAChain(ctx context.Context) ([]byte, error) {
	certs, err := v.chain(ctx)
	if err != nil {
		return nil, err
	}
	var b bytes.Buffer
	for _, c := range certs {
		_ = pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	return b.Bytes(), nil
}

// chain reads <pki>/cert/ca_chain.
func (v *Vault) chain(ctx context.Context) ([]*x509.Certificate, error) {
	path := v.cfg.PKIMount + "/cert/ca_chain"
	s, err := v.vc.read(ctx, "ca chain", path)
	if err != nil {
		return nil, err
	}
	var pemText string
	if list, ok := s.Data["ca_chain"].([]any); ok && len(list) > 0 {
		for _, c := range list {
			str, _ := c.(string)
			pemText += strings.TrimSpace(str) + "\n"
		}
	} else {
		pemText, _ = s.Data["certificate"].(string)
	}
	var certs []*x509.Certificate
	for rest := []byte(pemText); ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("pki: ca chain: %w", err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("pki: ca chain: vault %s holds no certificate (is the PKI mount configured?)", path)
	}
	return certs, nil
}

// Revocations implements CA from Vault's CRL, whose signature is checked
// against the issuing CA.
func (v *Vault) Revocations(ctx context.Context) (Revocations, error) {
	path := v.cfg.PKIMount + "/crl"
	der, err := v.vc.readRaw(ctx, "revocations", path)
	if err != nil {
		return Revocations{}, err
	}
	if b, _ := pem.Decode(der); b != nil {
		der = b.Bytes
	}
	crl, err := x509.ParseRevocationList(der)
	if err != nil {
		return Revocations{}, fmt.Errorf("pki: revocations: vault %s: %w", path, err)
	}
	if err := v.checkCRL(ctx, crl); err != nil {
		return Revocations{}, err
	}
	r := Revocations{Serials: make(map[string]time.Time, len(crl.RevokedCertificateEntries)), ThisUpdate: crl.ThisUpdate}
	for _, e := range crl.RevokedCertificateEntries {
		r.Serials[formatSerial(e.SerialNumber)] = e.RevocationTime
	}
	return r, nil
}

func (v *Vault) checkCRL(ctx context.Context, crl *x509.RevocationList) error {
	v.mu.Lock()
	issuer := v.issuer
	v.mu.Unlock()
	if issuer != nil && crl.CheckSignatureFrom(issuer) == nil {
		return nil
	}
	certs, err := v.chain(ctx) // first use, or the CA changed
	if err != nil {
		return err
	}
	if err := crl.CheckSignatureFrom(certs[0]); err != nil {
		return fmt.Errorf("pki: revocations: the CRL is not signed by the issuing CA: %w", err)
	}
	v.mu.Lock()
	v.issuer = certs[0]
	v.mu.Unlock()
	return nil
}

// ensureTransitKey creates Transit key name of type typ when missing and
// checks the type of an existing one.
func (v *Vault) ensureTransitKey(ctx context.Context, name, typ string) error {
	path := v.cfg.TransitMount + "/keys/" + name
	s, err := v.vc.read(ctx, "transit key", path)
	if errors.Is(err, ErrNotFound) {
		if _, err := v.vc.write(ctx, "create transit key", path, map[string]any{"type": typ}); err != nil {
			return err
		}
		s, err = v.vc.read(ctx, "transit key", path)
	}
	if err != nil {
		return err
	}
	if got, _ := s.Data["type"].(string); got != typ {
		return fmt.Errorf("pki: transit key %s is of type %q, want %q", path, got, typ)
	}
	return nil
}

// EnsureKey implements Signer.
func (v *Vault) EnsureKey(ctx context.Context, keyName string) error {
	if err := validKeyName(keyName); err != nil {
		return err
	}
	return v.ensureTransitKey(ctx, keyName, "ed25519")
}

// transitErr maps Transit's 400 "... key not found" to ErrNotFound.
func transitErr(err error, notFound error) error {
	if msg, ok := badRequest(err); ok && strings.Contains(msg, "not found") {
		return fmt.Errorf("%w: %w", notFound, err)
	}
	return err
}

// Sign implements Signer.
func (v *Vault) Sign(ctx context.Context, keyName string, payload []byte) ([]byte, int, error) {
	if err := validKeyName(keyName); err != nil {
		return nil, 0, err
	}
	s, err := v.vc.write(ctx, "sign", v.cfg.TransitMount+"/sign/"+keyName,
		map[string]any{"input": base64.StdEncoding.EncodeToString(payload)})
	if err != nil {
		return nil, 0, transitErr(err, ErrNotFound)
	}
	if s == nil {
		return nil, 0, errors.New("pki: sign: vault returned nothing")
	}
	str, _ := s.Data["signature"].(string)
	version, sig, err := parseTransitValue(str)
	if err != nil || len(sig) != ed25519.SignatureSize {
		return nil, 0, fmt.Errorf("pki: sign: vault returned a malformed signature (is %s an ed25519 key?)", keyName)
	}
	return sig, version, nil
}

// parseTransitValue splits "vault:vN:<base64>".
func parseTransitValue(s string) (int, []byte, error) {
	rest, ok := strings.CutPrefix(s, "vault:v")
	if !ok {
		return 0, nil, errors.New("no vault:v prefix")
	}
	n, b64, ok := strings.Cut(rest, ":")
	version, err := strconv.Atoi(n)
	if !ok || err != nil || version <= 0 {
		return 0, nil, errors.New("bad version")
	}
	raw, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return 0, nil, err
	}
	return version, raw, nil
}

// Verify implements Signer.
func (v *Vault) Verify(ctx context.Context, keyName string, payload, sig []byte, keyVersion int) error {
	if err := validKeyName(keyName); err != nil {
		return err
	}
	if keyVersion <= 0 || len(sig) != ed25519.SignatureSize {
		return fmt.Errorf("%w: version %d, %d-byte signature", ErrBadSignature, keyVersion, len(sig))
	}
	s, err := v.vc.write(ctx, "verify", v.cfg.TransitMount+"/verify/"+keyName, map[string]any{
		"input":     base64.StdEncoding.EncodeToString(payload),
		"signature": "vault:v" + strconv.Itoa(keyVersion) + ":" + base64.StdEncoding.EncodeToString(sig),
	})
	if err != nil {
		if msg, ok := badRequest(err); ok {
			if strings.Contains(msg, "not found") {
				return fmt.Errorf("%w: %w", ErrNotFound, err)
			}
			return fmt.Errorf("%w: %s v%d: %s", ErrBadSignature, keyName, keyVersion, msg)
		}
		return err
	}
	if s == nil {
		return errors.New("pki: verify: vault returned nothing")
	}
	if valid, _ := s.Data["valid"].(bool); !valid {
		return fmt.Errorf("%w: %s v%d", ErrBadSignature, keyName, keyVersion)
	}
	return nil
}

// Rotate implements Signer.
func (v *Vault) Rotate(ctx context.Context, keyName string) (int, error) {
	if err := validKeyName(keyName); err != nil {
		return 0, err
	}
	path := v.cfg.TransitMount + "/keys/" + keyName
	if _, err := v.vc.write(ctx, "rotate", path+"/rotate", nil); err != nil {
		return 0, transitErr(err, ErrNotFound)
	}
	s, err := v.vc.read(ctx, "rotate", path)
	if err != nil {
		return 0, err
	}
	latest := int(number(s.Data["latest_version"]))
	if latest <= 0 {
		return 0, fmt.Errorf("pki: rotate: vault %s has no latest_version", path)
	}
	return latest, nil
}

// PublicKeys implements Signer.
func (v *Vault) PublicKeys(ctx context.Context, keyName string) (map[int]ed25519.PublicKey, error) {
	if err := validKeyName(keyName); err != nil {
		return nil, err
	}
	path := v.cfg.TransitMount + "/keys/" + keyName
	s, err := v.vc.read(ctx, "public keys", path)
	if err != nil {
		return nil, err
	}
	if typ, _ := s.Data["type"].(string); typ != "ed25519" {
		return nil, fmt.Errorf("pki: public keys: transit key %s is of type %q, want ed25519", keyName, typ)
	}
	versions, _ := s.Data["keys"].(map[string]any)
	out := make(map[int]ed25519.PublicKey, len(versions))
	for k, raw := range versions {
		n, err := strconv.Atoi(k)
		entry, _ := raw.(map[string]any)
		b64, _ := entry["public_key"].(string)
		pub, derr := base64.StdEncoding.DecodeString(b64)
		if err != nil || derr != nil || len(pub) != ed25519.PublicKeySize {
			return nil, fmt.Errorf("pki: public keys: vault %s: malformed version %q", path, k)
		}
		out[n] = ed25519.PublicKey(pub)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("pki: public keys: vault %s lists no versions", path)
	}
	return out, nil
}

// SignSSHKey implements SSHCA.
func (v *Vault) SignSSHKey(ctx context.Context, publicKey []byte, principal string, ttl time.Duration) (SSHCertificate, error) {
	pk, err := checkSSHKey(publicKey)
	if err != nil {
		return SSHCertificate{}, err
	}
	if err := validPrincipal(principal); err != nil {
		return SSHCertificate{}, err
	}
	ttl = clampTTL(ttl, v.opts.maxSSHTTL)
	path := v.cfg.SSHMount + "/sign/" + v.cfg.SSHRole
	s, err := v.vc.write(ctx, "sign ssh key", path, map[string]any{
		"public_key":       string(ssh.MarshalAuthorizedKey(pk)),
		"valid_principals": principal,
		"cert_type":        "user",
		"ttl":              strconv.FormatInt(int64(ttl/time.Second), 10) + "s",
	})
	if err != nil {
		if msg, ok := badRequest(err); ok {
			return SSHCertificate{}, fmt.Errorf("%w: vault refused to sign: %s", ErrInvalid, msg)
		}
		return SSHCertificate{}, err
	}
	if s == nil {
		return SSHCertificate{}, fmt.Errorf("pki: sign ssh key: vault %s returned nothing", path)
	}
	signed, _ := s.Data["signed_key"].(string)
	parsed, _, _, _, err := ssh.ParseAuthorizedKey([]byte(signed))
	if err != nil {
		return SSHCertificate{}, fmt.Errorf("pki: sign ssh key: vault's certificate: %w", err)
	}
	cert, ok := parsed.(*ssh.Certificate)
	if !ok || cert.CertType != ssh.UserCert || !bytes.Equal(cert.Key.Marshal(), pk.Marshal()) ||
		len(cert.ValidPrincipals) != 1 || cert.ValidPrincipals[0] != principal {
		return SSHCertificate{}, fmt.Errorf("pki: sign ssh key: vault role %s issued a certificate that is not a user certificate of this key for %s alone", v.cfg.SSHRole, principal)
	}
	return SSHCertificate{
		Certificate: ssh.MarshalAuthorizedKey(cert),
		Serial:      cert.Serial,
		ValidBefore: time.Unix(int64(cert.ValidBefore), 0),
	}, nil
}

// SSHCAPublicKey implements SSHCA.
func (v *Vault) SSHCAPublicKey(ctx context.Context) ([]byte, error) {
	b, err := v.vc.readRaw(ctx, "ssh ca key", v.cfg.SSHMount+"/public_key")
	if err != nil {
		return nil, err
	}
	pk, _, _, _, err := ssh.ParseAuthorizedKey(b)
	if err != nil {
		return nil, fmt.Errorf("pki: ssh ca key: vault %s/public_key: %w (is the SSH CA configured?)", v.cfg.SSHMount, err)
	}
	return ssh.MarshalAuthorizedKey(pk), nil
}
