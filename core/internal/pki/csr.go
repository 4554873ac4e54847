package pki

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"fmt"

	"golang.org/x/crypto/ssh"
)

// MinRSABits is the smallest RSA modulus accepted in a CSR or an SSH key
// (the same floor as tenants' SSH keys).
const MinRSABits = 3072

var (
	oidSAN              = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidKeyUsage         = asn1.ObjectIdentifier{2, 5, 29, 15}
	oidExtKeyUsage      = asn1.ObjectIdentifier{2, 5, 29, 37}
	oidBasicConstraints = asn1.ObjectIdentifier{2, 5, 29, 19}
)

// checkCSR parses csrPEM and refuses it unless its signature holds, its key
// is strong, and every identity it claims is nodeID's: common name empty or
// nodeID, no DNS, IP or e-mail SANs, URI SANs none or exactly NodeURI(nodeID),
// and no request to be a CA. The certificate is built from nodeID, never from
// the CSR's subject; the checks refuse CSRs that try anyway.
func checkCSR(csrPEM []byte, nodeID string) (*x509.CertificateRequest, error) {
	if err := validNodeID(nodeID); err != nil {
		return nil, err
	}
	block, rest := pem.Decode(csrPEM)
	if block == nil || block.Type != "CERTIFICATE REQUEST" {
		return nil, fmt.Errorf("%w: CSR is not a PEM CERTIFICATE REQUEST", ErrInvalid)
	}
	if b, _ := pem.Decode(rest); b != nil {
		return nil, fmt.Errorf("%w: CSR has more than one PEM block", ErrInvalid)
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%w: CSR does not parse: %v", ErrInvalid, err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("%w: CSR signature: %v", ErrInvalid, err)
	}
	if err := strongKey(csr.PublicKey); err != nil {
		return nil, err
	}
	if cn := csr.Subject.CommonName; cn != "" && cn != nodeID {
		return nil, fmt.Errorf("%w: CSR common name %q is not node %s", ErrInvalid, cn, nodeID)
	}
	if len(csr.DNSNames) > 0 || len(csr.IPAddresses) > 0 || len(csr.EmailAddresses) > 0 {
		return nil, fmt.Errorf("%w: CSR asks for DNS, IP or e-mail names; a node certificate carries only its node id", ErrInvalid)
	}
	for _, u := range csr.URIs {
		if u.String() != NodeURI(nodeID) {
			return nil, fmt.Errorf("%w: CSR URI SAN %q is not %s", ErrInvalid, u.String(), NodeURI(nodeID))
		}
	}
	for _, ext := range csr.Extensions {
		switch {
		case ext.Id.Equal(oidSAN), ext.Id.Equal(oidKeyUsage), ext.Id.Equal(oidExtKeyUsage):
		case ext.Id.Equal(oidBasicConstraints):
			var bc struct {
				IsCA       bool `asn1:"optional"`
				MaxPathLen int  `asn1:"optional,default:-1"`
			}
			if _, err := asn1.Unmarshal(ext.Value, &bc); err != nil || bc.IsCA {
				return nil, fmt.Errorf("%w: CSR asks to be a CA", ErrInvalid)
			}
		default:
			return nil, fmt.Errorf("%w: CSR asks for extension %s", ErrInvalid, ext.Id)
		}
	}
	return csr, nil
}

// strongKey accepts Ed25519, ECDSA on P-256, P-384 or P-521, and RSA of at
// least MinRSABits.
func strongKey(pub any) error {
	switch k := pub.(type) {
	case ed25519.PublicKey:
		return nil
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256(), elliptic.P384(), elliptic.P521():
			return nil
		}
		return fmt.Errorf("%w: ECDSA curve %s is not accepted (use P-256 or Ed25519)", ErrInvalid, k.Curve.Params().Name)
	case *rsa.PublicKey:
		if k.N.BitLen() < MinRSABits {
			return fmt.Errorf("%w: RSA key of %d bits is too weak (want at least %d; Ed25519 or P-256 recommended)", ErrInvalid, k.N.BitLen(), MinRSABits)
		}
		return nil
	default:
		return fmt.Errorf("%w: key type %T is not accepted", ErrInvalid, pub)
	}
}

// checkSSHKey parses an authorized_keys line and refuses weak keys and
// certificates.
func checkSSHKey(line []byte) (ssh.PublicKey, error) {
	pk, _, _, rest, err := ssh.ParseAuthorizedKey(line)
	if err != nil {
		return nil, fmt.Errorf("%w: SSH public key does not parse: %v", ErrInvalid, err)
	}
	if len(rest) > 0 {
		return nil, fmt.Errorf("%w: more than one SSH public key", ErrInvalid)
	}
	cpk, ok := pk.(ssh.CryptoPublicKey)
	if !ok {
		return nil, fmt.Errorf("%w: SSH key type %s is not accepted", ErrInvalid, pk.Type())
	}
	switch pk.Type() {
	case ssh.KeyAlgoED25519, ssh.KeyAlgoECDSA256, ssh.KeyAlgoECDSA384, ssh.KeyAlgoECDSA521, ssh.KeyAlgoRSA:
	default:
		return nil, fmt.Errorf("%w: SSH key type %s is not accepted", ErrInvalid, pk.Type())
	}
	if err := strongKey(cpk.CryptoPublicKey()); err != nil {
		return nil, err
	}
	return pk, nil
}
