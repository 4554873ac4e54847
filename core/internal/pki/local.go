package pki

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"
)

// Local is the embedded backend: Go crypto with keys in one folder.
//
//	<dir>/ca.pem                 node CA: ECDSA P-256 key (PKCS#8) and self-signed certificate
//	<dir>/issued.log             one line per signed certificate: serial, not-after, node id
//	<dir>/revoked.log            one line per revocation: serial, revoked-at, not-after
//	<dir>/ssh_ca.key             SSH user CA: Ed25519 seed
//	<dir>/signing/<name>/vN.key  signing key <name> version N: Ed25519 seed
//
// The folders are 0700 and the files 0600; NewLocal refuses looser
// permissions rather than fixing them. Keys are made on first use. Several
// processes may share the folder: new files are linked into place (never
// replacing one) and log lines are appended atomically.
type Local struct {
	dir  string
	opts options

	caKey  *ecdsa.PrivateKey
	caCert *x509.Certificate
	caPEM  []byte
	sshCA  ssh.Signer

	mu      sync.Mutex
	signing map[string]map[int]ed25519.PrivateKey
}

var (
	_ CA     = (*Local)(nil)
	_ Signer = (*Local)(nil)
	_ SSHCA  = (*Local)(nil)
)

// NewLocal opens (or creates) the key folder dir.
func NewLocal(dir string, opts ...Option) (*Local, error) {
	l := &Local{dir: dir, opts: buildOptions(opts), signing: map[string]map[int]ed25519.PrivateKey{}}
	if err := ensurePrivateDir(dir); err != nil {
		return nil, err
	}
	if err := l.loadCA(); err != nil {
		return nil, err
	}
	seed, err := loadOrCreate(filepath.Join(dir, "ssh_ca.key"), newSeed)
	if err != nil {
		return nil, err
	}
	if len(seed) != ed25519.SeedSize {
		return nil, fmt.Errorf("pki: ssh_ca.key has %d bytes, want %d", len(seed), ed25519.SeedSize)
	}
	if l.sshCA, err = ssh.NewSignerFromKey(ed25519.NewKeyFromSeed(seed)); err != nil {
		return nil, fmt.Errorf("pki: ssh CA: %w", err)
	}
	for _, f := range []string{"issued.log", "revoked.log"} {
		if err := checkPrivateIfExists(filepath.Join(dir, f)); err != nil {
			return nil, err
		}
	}
	if err := ensurePrivateDir(filepath.Join(dir, "signing")); err != nil {
		return nil, err
	}
	return l, nil
}

func checkPrivateIfExists(path string) error {
	if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return checkPrivate(path, false)
}

func newSeed() ([]byte, error) {
	seed := make([]byte, ed25519.SeedSize)
	if _, err := rand.Read(seed); err != nil {
		return nil, fmt.Errorf("pki: new key: %w", err)
	}
	return seed, nil
}

// randomSerial is a positive 159-bit serial, as Vault makes them.
func randomSerial() (*big.Int, error) {
	b := make([]byte, 20)
	if _, err := rand.Read(b); err != nil {
		return nil, fmt.Errorf("pki: serial: %w", err)
	}
	b[0] &= 0x7f
	b[0] |= 0x01 // never leading zero bytes: 20 bytes on the wire
	return new(big.Int).SetBytes(b), nil
}

// loadCA reads ca.pem, making a CA on first start.
func (l *Local) loadCA() error {
	data, err := loadOrCreate(filepath.Join(l.dir, "ca.pem"), l.newCA)
	if err != nil {
		return err
	}
	var keyDER, certDER []byte
	for rest := data; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		switch b.Type {
		case "PRIVATE KEY":
			keyDER = b.Bytes
		case "CERTIFICATE":
			certDER = b.Bytes
		}
	}
	if keyDER == nil || certDER == nil {
		return fmt.Errorf("pki: %s lacks a PRIVATE KEY or a CERTIFICATE block", filepath.Join(l.dir, "ca.pem"))
	}
	key, err := x509.ParsePKCS8PrivateKey(keyDER)
	if err != nil {
		return fmt.Errorf("pki: CA key: %w", err)
	}
	ec, ok := key.(*ecdsa.PrivateKey)
	if !ok {
		return fmt.Errorf("pki: CA key is %T, want ECDSA", key)
	}
	cert, err := x509.ParseCertificate(certDER)
	if err != nil {
		return fmt.Errorf("pki: CA certificate: %w", err)
	}
	if !ec.PublicKey.Equal(cert.PublicKey) {
		return errors.New("pki: CA key and certificate do not match")
	}
	l.caKey, l.caCert = ec, cert
	l.caPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: certDER})
	return nil
}

func (l *Local) newCA() ([]byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("pki: CA key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	now := l.opts.now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "gpuaas node CA", Organization: []string{"gpuaas"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(10, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("pki: CA certificate: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("pki: CA key: %w", err)
	}
	var b bytes.Buffer
	_ = pem.Encode(&b, &pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	_ = pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: der})
	return b.Bytes(), nil
}

// SignCSR implements CA.
func (l *Local) SignCSR(ctx context.Context, csrPEM []byte, nodeID string, ttl time.Duration) (Certificate, error) {
	if err := ctx.Err(); err != nil {
		return Certificate{}, fmt.Errorf("pki: sign csr: %w", err)
	}
	csr, err := checkCSR(csrPEM, nodeID)
	if err != nil {
		return Certificate{}, err
	}
	serial, err := randomSerial()
	if err != nil {
		return Certificate{}, err
	}
	u, err := url.Parse(NodeURI(nodeID))
	if err != nil {
		return Certificate{}, fmt.Errorf("%w: node URI: %v", ErrInvalid, err)
	}
	now := l.opts.now()
	notAfter := now.Add(clampTTL(ttl, l.opts.maxCertTTL)).Truncate(time.Second)
	if notAfter.After(l.caCert.NotAfter) {
		notAfter = l.caCert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: nodeID},
		URIs:                  []*url.URL{u},
		NotBefore:             now.Add(-30 * time.Second),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, l.caCert, csr.PublicKey, l.caKey)
	if err != nil {
		return Certificate{}, fmt.Errorf("pki: sign csr: %w", err)
	}
	s := formatSerial(serial)
	if err := appendPrivate(filepath.Join(l.dir, "issued.log"),
		fmt.Sprintf("%s %d %s", s, notAfter.Unix(), nodeID)); err != nil {
		return Certificate{}, err
	}
	return Certificate{
		PEM:      pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		Serial:   s,
		NotAfter: notAfter,
	}, nil
}

// readLog returns the lines of a log file split into fields; a missing file
// is empty.
func (l *Local) readLog(name string) ([][]string, error) {
	path := filepath.Join(l.dir, name)
	data, err := readPrivate(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var lines [][]string
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) >= 3 {
			lines = append(lines, f)
		}
	}
	return lines, sc.Err()
}

// Revoke implements CA.
func (l *Local) Revoke(ctx context.Context, serial string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("pki: revoke: %w", err)
	}
	s, err := NormalizeSerial(serial)
	if err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	issued, err := l.readLog("issued.log")
	if err != nil {
		return err
	}
	notAfter := ""
	for _, f := range issued {
		if f[0] == s {
			notAfter = f[1]
		}
	}
	if notAfter == "" {
		return fmt.Errorf("%w: no certificate with serial %s", ErrNotFound, s)
	}
	revoked, err := l.readLog("revoked.log")
	if err != nil {
		return err
	}
	for _, f := range revoked {
		if f[0] == s {
			return nil
		}
	}
	return appendPrivate(filepath.Join(l.dir, "revoked.log"), fmt.Sprintf("%s %d %s", s, l.opts.now().Unix(), notAfter))
}

// Revocations implements CA: revoked certificates not yet expired.
func (l *Local) Revocations(ctx context.Context) (Revocations, error) {
	if err := ctx.Err(); err != nil {
		return Revocations{}, fmt.Errorf("pki: revocations: %w", err)
	}
	lines, err := l.readLog("revoked.log")
	if err != nil {
		return Revocations{}, err
	}
	now := l.opts.now()
	r := Revocations{Serials: map[string]time.Time{}, ThisUpdate: now}
	for _, f := range lines {
		at, err1 := strconv.ParseInt(f[1], 10, 64)
		na, err2 := strconv.ParseInt(f[2], 10, 64)
		if err1 != nil || err2 != nil {
			return Revocations{}, fmt.Errorf("pki: revoked.log: bad line %q", strings.Join(f, " "))
		}
		if time.Unix(na, 0).Before(now) {
			continue
		}
		r.Serials[f[0]] = time.Unix(at, 0)
	}
	return r, nil
}

// CAChain implements CA: the self-signed node CA.
func (l *Local) CAChain(ctx context.Context) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("pki: ca chain: %w", err)
	}
	return append([]byte(nil), l.caPEM...), nil
}

var versionFileRE = regexp.MustCompile(`^v([1-9][0-9]*)\.key$`)

func (l *Local) keyDir(name string) string { return filepath.Join(l.dir, "signing", name) }

// versions lists the versions of signing key name; a missing key is
// ErrNotFound.
func (l *Local) versions(name string) ([]int, error) {
	if err := validKeyName(name); err != nil {
		return nil, err
	}
	dir := l.keyDir(name)
	if err := checkPrivate(dir, true); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%w: signing key %q", ErrNotFound, name)
		}
		return nil, err
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	var vs []int
	for _, e := range entries {
		if m := versionFileRE.FindStringSubmatch(e.Name()); m != nil {
			if v, err := strconv.Atoi(m[1]); err == nil {
				vs = append(vs, v)
			}
		}
	}
	if len(vs) == 0 {
		return nil, fmt.Errorf("%w: signing key %q has no versions", ErrNotFound, name)
	}
	return vs, nil
}

// key returns version v of signing key name.
func (l *Local) key(name string, v int) (ed25519.PrivateKey, error) {
	l.mu.Lock()
	k, ok := l.signing[name][v]
	l.mu.Unlock()
	if ok {
		return k, nil
	}
	seed, err := readPrivate(filepath.Join(l.keyDir(name), "v"+strconv.Itoa(v)+".key"))
	if err != nil {
		return nil, err
	}
	if len(seed) != ed25519.SeedSize {
		return nil, fmt.Errorf("pki: signing key %s v%d has %d bytes, want %d", name, v, len(seed), ed25519.SeedSize)
	}
	k = ed25519.NewKeyFromSeed(seed)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.signing[name] == nil {
		l.signing[name] = map[int]ed25519.PrivateKey{}
	}
	l.signing[name][v] = k
	return k, nil
}

// EnsureKey implements Signer.
func (l *Local) EnsureKey(ctx context.Context, keyName string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("pki: ensure key: %w", err)
	}
	if err := validKeyName(keyName); err != nil {
		return err
	}
	if _, err := l.versions(keyName); err == nil {
		return nil
	}
	if err := ensurePrivateDir(l.keyDir(keyName)); err != nil {
		return err
	}
	seed, err := newSeed()
	if err != nil {
		return err
	}
	if err := createPrivate(filepath.Join(l.keyDir(keyName), "v1.key"), seed); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	return nil
}

// Sign implements Signer with the newest version on disk.
func (l *Local) Sign(ctx context.Context, keyName string, payload []byte) ([]byte, int, error) {
	if err := ctx.Err(); err != nil {
		return nil, 0, fmt.Errorf("pki: sign: %w", err)
	}
	vs, err := l.versions(keyName)
	if err != nil {
		return nil, 0, err
	}
	latest := 0
	for _, v := range vs {
		latest = max(latest, v)
	}
	k, err := l.key(keyName, latest)
	if err != nil {
		return nil, 0, err
	}
	return ed25519.Sign(k, payload), latest, nil
}

// Verify implements Signer.
func (l *Local) Verify(ctx context.Context, keyName string, payload, sig []byte, keyVersion int) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("pki: verify: %w", err)
	}
	if _, err := l.versions(keyName); err != nil {
		return err
	}
	if keyVersion <= 0 {
		return fmt.Errorf("%w: key version %d", ErrBadSignature, keyVersion)
	}
	k, err := l.key(keyName, keyVersion)
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%w: %s has no version %d", ErrBadSignature, keyName, keyVersion)
	}
	if err != nil {
		return err
	}
	if !ed25519.Verify(k.Public().(ed25519.PublicKey), payload, sig) {
		return fmt.Errorf("%w: %s v%d", ErrBadSignature, keyName, keyVersion)
	}
	return nil
}

// Rotate implements Signer.
func (l *Local) Rotate(ctx context.Context, keyName string) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, fmt.Errorf("pki: rotate: %w", err)
	}
	for {
		vs, err := l.versions(keyName)
		if err != nil {
			return 0, err
		}
		next := 0
		for _, v := range vs {
			next = max(next, v)
		}
		next++
		seed, err := newSeed()
		if err != nil {
			return 0, err
		}
		err = createPrivate(filepath.Join(l.keyDir(keyName), "v"+strconv.Itoa(next)+".key"), seed)
		if errors.Is(err, fs.ErrExist) {
			continue // another process took that version; take the next
		}
		if err != nil {
			return 0, err
		}
		return next, nil
	}
}

// PublicKeys implements Signer.
func (l *Local) PublicKeys(ctx context.Context, keyName string) (map[int]ed25519.PublicKey, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("pki: public keys: %w", err)
	}
	vs, err := l.versions(keyName)
	if err != nil {
		return nil, err
	}
	out := make(map[int]ed25519.PublicKey, len(vs))
	for _, v := range vs {
		k, err := l.key(keyName, v)
		if err != nil {
			return nil, err
		}
		out[v] = k.Public().(ed25519.PublicKey)
	}
	return out, nil
}

// SignSSHKey implements SSHCA.
func (l *Local) SignSSHKey(ctx context.Context, publicKey []byte, principal string, ttl time.Duration) (SSHCertificate, error) {
	if err := ctx.Err(); err != nil {
		return SSHCertificate{}, fmt.Errorf("pki: sign ssh key: %w", err)
	}
	pk, err := checkSSHKey(publicKey)
	if err != nil {
		return SSHCertificate{}, err
	}
	if err := validPrincipal(principal); err != nil {
		return SSHCertificate{}, err
	}
	var sb [8]byte
	if _, err := rand.Read(sb[:]); err != nil {
		return SSHCertificate{}, fmt.Errorf("pki: ssh serial: %w", err)
	}
	serial := binary.BigEndian.Uint64(sb[:])
	now := l.opts.now()
	before := now.Add(clampTTL(ttl, l.opts.maxSSHTTL)).Truncate(time.Second)
	cert := &ssh.Certificate{
		Key:             pk,
		Serial:          serial,
		CertType:        ssh.UserCert,
		KeyId:           fmt.Sprintf("gpuaas-%s-%016x", principal, serial),
		ValidPrincipals: []string{principal},
		ValidAfter:      uint64(now.Add(-30 * time.Second).Unix()),
		ValidBefore:     uint64(before.Unix()),
		Permissions:     ssh.Permissions{Extensions: map[string]string{"permit-pty": ""}},
	}
	if err := cert.SignCert(rand.Reader, l.sshCA); err != nil {
		return SSHCertificate{}, fmt.Errorf("pki: sign ssh key: %w", err)
	}
	return SSHCertificate{Certificate: ssh.MarshalAuthorizedKey(cert), Serial: serial, ValidBefore: before}, nil
}

// SSHCAPublicKey implements SSHCA.
func (l *Local) SSHCAPublicKey(ctx context.Context) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("pki: ssh ca key: %w", err)
	}
	return ssh.MarshalAuthorizedKey(l.sshCA.PublicKey()), nil
}
