package vaultdouble

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/http"
	"net/url"
	"path"
	"regexp"
	"strings"
	"time"
)

// pkiEngine is a PKI mount with a generated root CA and one role shaped as
// gpuaas's operator guide configures it: any common name, URI SANs matching
// spiffe://gpuaas/node/*, subject and SANs from the request (not the CSR),
// client certificates only.
type pkiEngine struct {
	key      *ecdsa.PrivateKey
	ca       *x509.Certificate
	caPEM    string
	issuerID string
	role     pkiRole
	issued   map[string]*x509.Certificate
	revoked  map[string]time.Time
	crl      []byte
	crlNum   int64
}

type pkiRole struct {
	maxTTL          time.Duration
	allowedURISANs  []string
	clientFlag      bool
	serverFlag      bool
	useCSRCommon    bool
	requireCN       bool
	minRSABits      int
	notBeforeOffset time.Duration
}

func newPKI(now time.Time, maxTTL time.Duration) (*pkiEngine, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "vault double root CA"},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.AddDate(10, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	ca, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	p := &pkiEngine{
		key: key, ca: ca, issuerID: uuid(),
		caPEM:   strings.TrimSpace(string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))),
		issued:  map[string]*x509.Certificate{},
		revoked: map[string]time.Time{},
		role: pkiRole{maxTTL: maxTTL, allowedURISANs: []string{"spiffe://gpuaas/node/*"}, clientFlag: true,
			requireCN: true, minRSABits: 2048, notBeforeOffset: 30 * time.Second},
	}
	if err := p.buildCRL(now); err != nil {
		return nil, err
	}
	return p, nil
}

// serial is a positive 159-bit serial, as Vault makes them.
func serial() *big.Int {
	b := make([]byte, 20)
	_, _ = rand.Read(b)
	b[0] &= 0x7f
	return new(big.Int).SetBytes(b)
}

// hexSerial formats a serial as Vault does: "1f:0a:...".
func hexSerial(n *big.Int) string {
	b := n.Bytes()
	parts := make([]string, len(b))
	for i, c := range b {
		parts[i] = fmt.Sprintf("%02x", c)
	}
	return strings.Join(parts, ":")
}

func (p *pkiEngine) buildCRL(now time.Time) error {
	var entries []x509.RevocationListEntry
	for s, at := range p.revoked {
		n, ok := new(big.Int).SetString(strings.ReplaceAll(s, ":", ""), 16)
		if !ok {
			continue
		}
		entries = append(entries, x509.RevocationListEntry{SerialNumber: n, RevocationTime: at})
	}
	p.crlNum++
	der, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{
		Number:                    big.NewInt(p.crlNum),
		ThisUpdate:                now,
		NextUpdate:                now.Add(72 * time.Hour),
		RevokedCertificateEntries: entries,
	}, p.ca, p.key)
	if err != nil {
		return err
	}
	p.crl = der
	return nil
}

func (s *Server) routePKI(w http.ResponseWriter, req *request, rest string) {
	p := s.pki
	switch {
	case strings.HasPrefix(rest, "sign/"):
		if req.op != "update" {
			unsupported(w)
			return
		}
		s.pkiSign(w, req, strings.TrimPrefix(rest, "sign/"))
	case rest == "revoke":
		if req.op != "update" {
			unsupported(w)
			return
		}
		s.pkiRevoke(w, req)
	case rest == "cert/ca_chain":
		writeData(w, map[string]any{
			"certificate":             p.caPEM,
			"ca_chain":                []string{p.caPEM},
			"issuer_id":               p.issuerID,
			"revocation_time":         0,
			"revocation_time_rfc3339": "",
			"authority_key_id":        "",
		}, nil, "pki")
	case rest == "crl":
		w.Header().Set("Content-Type", "application/pkix-crl")
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write(p.crl)
	default:
		noRoute(w, s.mounts.PKI+"/"+rest)
	}
}

var hostnameRE = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$`)

func (s *Server) pkiSign(w http.ResponseWriter, req *request, role string) {
	p, now := s.pki, s.now()
	if role != s.mounts.PKIRole {
		writeErrors(w, http.StatusBadRequest, "unknown role: "+role)
		return
	}
	r := p.role
	csrText := str(req.body, "csr")
	if csrText == "" {
		writeErrors(w, http.StatusBadRequest, "\"csr\" is empty")
		return
	}
	block, _ := pem.Decode([]byte(csrText))
	if block == nil {
		writeErrors(w, http.StatusBadRequest, "csr contains no data")
		return
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		writeErrors(w, http.StatusBadRequest, "certificate request could not be parsed: "+err.Error())
		return
	}
	if err := csr.CheckSignature(); err != nil {
		writeErrors(w, http.StatusBadRequest, "request signature invalid: "+err.Error())
		return
	}
	switch k := csr.PublicKey.(type) {
	case *rsa.PublicKey:
		if k.N.BitLen() < r.minRSABits {
			writeErrors(w, http.StatusBadRequest, fmt.Sprintf("role requires a minimum of a %d-bit key, but CSR's key is %d bits", r.minRSABits, k.N.BitLen()))
			return
		}
	case *ecdsa.PublicKey:
		if k.Curve.Params().BitSize < 256 {
			writeErrors(w, http.StatusBadRequest, fmt.Sprintf("role requires a minimum of a 256-bit key, but CSR's key is %d bits", k.Curve.Params().BitSize))
			return
		}
	case ed25519.PublicKey:
	default:
		writeErrors(w, http.StatusBadRequest, "unsupported key type in CSR")
		return
	}
	cn := str(req.body, "common_name")
	if r.useCSRCommon {
		cn = csr.Subject.CommonName
	}
	if cn == "" && r.requireCN {
		writeErrors(w, http.StatusBadRequest, `the common_name field is required, or must be provided in a CSR with "use_csr_common_name" set to true, unless "require_cn" is set to false`)
		return
	}
	var uris []*url.URL
	for _, raw := range stringList(req.body, "uri_sans") {
		ok := false
		for _, pattern := range r.allowedURISANs {
			if m, _ := path.Match(pattern, raw); m {
				ok = true
			}
		}
		u, err := url.Parse(raw)
		if !ok || err != nil {
			writeErrors(w, http.StatusBadRequest, fmt.Sprintf("URI Subject Alternative Name %s not allowed by this role", raw))
			return
		}
		uris = append(uris, u)
	}
	if len(stringList(req.body, "alt_names")) > 0 || len(stringList(req.body, "ip_sans")) > 0 {
		writeErrors(w, http.StatusBadRequest, "subject alternative names not allowed by this role")
		return
	}
	ttl, err := duration(req.body, "ttl")
	if err != nil {
		writeErrors(w, http.StatusBadRequest, err.Error())
		return
	}
	var warnings []string
	if ttl <= 0 {
		ttl = r.maxTTL
	}
	if ttl > r.maxTTL {
		warnings = append(warnings, fmt.Sprintf("TTL %q is longer than permitted maxTTL %q, so maxTTL is being used", ttl, r.maxTTL))
		ttl = r.maxTTL
	}
	if f := str(req.body, "format"); f != "" && f != "pem" {
		writeErrors(w, http.StatusBadRequest, fmt.Sprintf("the double only serves format=pem, not %q", f))
		return
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: cn},
		URIs:                  uris,
		NotBefore:             now.Add(-r.notBeforeOffset),
		NotAfter:              now.Add(ttl),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyAgreement | x509.KeyUsageKeyEncipherment,
		BasicConstraintsValid: true,
	}
	if cn != "" && !boolean(req.body, "exclude_cn_from_sans", false) && hostnameRE.MatchString(cn) {
		tmpl.DNSNames = []string{cn}
	}
	if r.clientFlag {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageClientAuth)
	}
	if r.serverFlag {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.ca, csr.PublicKey, p.key)
	if err != nil {
		writeErrors(w, http.StatusInternalServerError, "error signing certificate: "+err.Error())
		return
	}
	cert, _ := x509.ParseCertificate(der)
	sn := hexSerial(cert.SerialNumber)
	p.issued[sn] = cert
	writeData(w, map[string]any{
		"certificate":   strings.TrimSpace(string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))),
		"issuing_ca":    p.caPEM,
		"ca_chain":      []string{p.caPEM},
		"serial_number": sn,
		"expiration":    cert.NotAfter.Unix(),
	}, warnings, "pki")
}

func (s *Server) pkiRevoke(w http.ResponseWriter, req *request) {
	p, now := s.pki, s.now()
	sn := strings.ToLower(strings.ReplaceAll(str(req.body, "serial_number"), "-", ":"))
	if sn == "" {
		writeErrors(w, http.StatusBadRequest, "The serial number or certificate to revoke must be provided.")
		return
	}
	if at, ok := p.revoked[sn]; ok {
		writeData(w, map[string]any{"revocation_time": at.Unix(), "revocation_time_rfc3339": at.UTC().Format(time.RFC3339Nano), "state": "revoked"}, nil, "pki")
		return
	}
	cert := p.issued[sn]
	if cert == nil {
		writeErrors(w, http.StatusBadRequest, fmt.Sprintf("certificate with serial %s not found", sn))
		return
	}
	if cert.NotAfter.Before(now) {
		w.WriteHeader(http.StatusNoContent)
		return
	}
	p.revoked[sn] = now
	if err := p.buildCRL(now); err != nil {
		writeErrors(w, http.StatusInternalServerError, "error building CRL: "+err.Error())
		return
	}
	writeData(w, map[string]any{"revocation_time": now.Unix(), "revocation_time_rfc3339": now.UTC().Format(time.RFC3339Nano), "state": "revoked"}, nil, "pki")
}
