// Package pki is the core's trust backend: a CA that signs short-lived node
// client certificates from CSRs, an Ed25519 signer with versioned keys (task
// signing), an SSH user CA (browser terminal) and the envelope keyring for
// secrets at rest (kms.Keyring). Two backends implement the same interfaces:
//
//   - Local: Go crypto with keys in files under one folder (0700, files 0600;
//     looser permissions are refused). The embedded default.
//   - Vault: a PKI mount and role, Transit keys (ed25519 to sign, aes256-gcm96
//     for data keys) and an SSH mount, reached with a token or an AppRole
//     login that is renewed in the background.
//
// Open picks one from a Config. Both are exercised by one test suite, the
// Vault backend against vaultdouble (or a real Vault when VAULT_ADDR and
// VAULT_TOKEN are set).
//
// Node identity: a node certificate carries exactly one URI SAN,
// spiffe://gpuaas/node/<node id> (NodeURI), and the node id as its common
// name. The core binds a peer to a node through the URI SAN only
// (NodeIDFromCert); the common name is informational.
package pki

import (
	"context"
	"crypto/ed25519"
	"crypto/x509"
	"errors"
	"fmt"
	"math/big"
	"regexp"
	"strings"
	"time"

	"github.com/gpuaas/gpuaas/core/internal/kms"
)

// CA signs node client certificates.
type CA interface {
	// SignCSR checks csrPEM (a PEM "CERTIFICATE REQUEST" whose key is strong
	// and whose subject names no identity but nodeID) and signs a client
	// certificate for nodeID valid for ttl (clamped to the backend's maximum;
	// ttl <= 0 means that maximum). A refused CSR is ErrInvalid.
	SignCSR(ctx context.Context, csrPEM []byte, nodeID string, ttl time.Duration) (Certificate, error)
	// Revoke revokes the certificate with serial (any of the forms
	// NormalizeSerial accepts). Revoking twice is not an error; an unknown
	// serial is ErrNotFound.
	Revoke(ctx context.Context, serial string) error
	// CAChain is the PEM chain that verifies node certificates, the issuing
	// CA first.
	CAChain(ctx context.Context) ([]byte, error)
	// Revocations lists the revoked certificates that have not expired.
	// Callers cache it (RevocationChecker) rather than asking per request.
	Revocations(ctx context.Context) (Revocations, error)
}

// Certificate is a signed node certificate.
type Certificate struct {
	// PEM is the certificate alone (the chain comes from CAChain).
	PEM []byte
	// Serial is in the canonical form (see NormalizeSerial).
	Serial   string
	NotAfter time.Time
}

// Revocations is a revocation list.
type Revocations struct {
	// Serials maps canonical serials to their revocation time.
	Serials map[string]time.Time
	// ThisUpdate is when the list was made.
	ThisUpdate time.Time
}

// Signer signs payloads with named Ed25519 keys that have versions. A
// signature names the version that made it; rotating adds a version that
// signs from then on, and older versions keep verifying.
type Signer interface {
	// EnsureKey creates keyName when it does not exist yet.
	EnsureKey(ctx context.Context, keyName string) error
	// Sign signs payload with the latest version of keyName.
	Sign(ctx context.Context, keyName string, payload []byte) (sig []byte, keyVersion int, err error)
	// Verify checks sig over payload made by keyName at keyVersion; a
	// signature that does not verify is ErrBadSignature.
	Verify(ctx context.Context, keyName string, payload, sig []byte, keyVersion int) error
	// Rotate adds a version to keyName and returns it.
	Rotate(ctx context.Context, keyName string) (keyVersion int, err error)
	// PublicKeys returns every version's public key, for verifiers that work
	// offline (agents).
	PublicKeys(ctx context.Context, keyName string) (map[int]ed25519.PublicKey, error)
}

// SSHCA signs short-lived SSH user certificates.
type SSHCA interface {
	// SignSSHKey signs publicKey (authorized_keys format) as a user
	// certificate for principal, valid for ttl (clamped to the backend's
	// maximum).
	SignSSHKey(ctx context.Context, publicKey []byte, principal string, ttl time.Duration) (SSHCertificate, error)
	// SSHCAPublicKey is the CA key in authorized_keys format, for sshd's
	// TrustedUserCAKeys on the nodes.
	SSHCAPublicKey(ctx context.Context) ([]byte, error)
}

// SSHCertificate is a signed SSH user certificate.
type SSHCertificate struct {
	// Certificate in authorized_keys format (what ssh-keygen writes to
	// id_ed25519-cert.pub).
	Certificate []byte
	Serial      uint64
	ValidBefore time.Time
}

// Backend is one configured trust backend.
type Backend struct {
	// Name is "local" or "vault".
	Name   string
	CA     CA
	Signer Signer
	SSH    SSHCA
	// Keys seals secrets at rest.
	Keys kms.Keyring

	close func() error
}

// Close stops background work (Vault token renewal).
func (b *Backend) Close() error {
	if b == nil || b.close == nil {
		return nil
	}
	return b.close()
}

// Errors the backends return; match them with errors.Is.
var (
	// ErrInvalid means the request was refused: a bad CSR, node id, key
	// name, SSH key or principal.
	ErrInvalid = errors.New("pki: invalid request")
	// ErrNotFound means the serial or key does not exist.
	ErrNotFound = errors.New("pki: not found")
	// ErrBadSignature means a signature does not verify.
	ErrBadSignature = errors.New("pki: signature does not verify")
	// ErrPermissionDenied means Vault refused the token (bad, expired or
	// lacking a policy).
	ErrPermissionDenied = errors.New("pki: permission denied by vault")
)

// NodeURIPrefix starts the URI SAN of every node certificate.
const NodeURIPrefix = "spiffe://gpuaas/node/"

var (
	nodeIDRE  = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)
	keyNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_.-]{0,63}$`)
	// principalRE is a portable Unix user name.
	principalRE = regexp.MustCompile(`^[a-z_][a-z0-9_-]{0,31}$`)
)

// NodeURI is the URI SAN that names nodeID.
func NodeURI(nodeID string) string { return NodeURIPrefix + nodeID }

// NodeIDFromCert returns the node id a node certificate names: its single
// URI SAN must be NodeURI(id). The caller has verified the chain already.
func NodeIDFromCert(cert *x509.Certificate) (string, error) {
	if len(cert.URIs) != 1 {
		return "", fmt.Errorf("%w: certificate has %d URI SANs, want 1", ErrInvalid, len(cert.URIs))
	}
	id, ok := strings.CutPrefix(cert.URIs[0].String(), NodeURIPrefix)
	if !ok || validNodeID(id) != nil {
		return "", fmt.Errorf("%w: certificate URI SAN %q does not name a node", ErrInvalid, cert.URIs[0].String())
	}
	return id, nil
}

func validNodeID(id string) error {
	if !nodeIDRE.MatchString(id) {
		return fmt.Errorf("%w: node id %q: want 1-128 of [A-Za-z0-9._-]", ErrInvalid, id)
	}
	return nil
}

func validKeyName(name string) error {
	if !keyNameRE.MatchString(name) {
		return fmt.Errorf("%w: key name %q: want 1-64 of [a-z0-9_.-]", ErrInvalid, name)
	}
	return nil
}

func validPrincipal(p string) error {
	if !principalRE.MatchString(p) {
		return fmt.Errorf("%w: principal %q is not a user name", ErrInvalid, p)
	}
	return nil
}

// SerialOf is cert's serial in the canonical form.
func SerialOf(cert *x509.Certificate) string { return formatSerial(cert.SerialNumber) }

// formatSerial writes a serial as Vault does: lowercase hex bytes joined by
// colons ("1f:0a:...").
func formatSerial(n *big.Int) string {
	b := n.Bytes()
	if len(b) == 0 {
		b = []byte{0}
	}
	parts := make([]string, len(b))
	for i, c := range b {
		parts[i] = fmt.Sprintf("%02x", c)
	}
	return strings.Join(parts, ":")
}

// NormalizeSerial accepts a serial as hex with or without ':' or '-'
// separators, in any case, and returns the canonical form.
func NormalizeSerial(s string) (string, error) {
	h := strings.NewReplacer(":", "", "-", "").Replace(strings.ToLower(strings.TrimSpace(s)))
	n, ok := new(big.Int).SetString(h, 16)
	if h == "" || !ok || len(h) > 64 || strings.Trim(h, "0123456789abcdef") != "" {
		return "", fmt.Errorf("%w: serial %q is not hex", ErrInvalid, s)
	}
	return formatSerial(n), nil
}

// clampTTL returns ttl within (0, maxTTL], with ttl <= 0 meaning maxTTL.
func clampTTL(ttl, maxTTL time.Duration) time.Duration {
	if ttl <= 0 || ttl > maxTTL {
		return maxTTL
	}
	return ttl
}
