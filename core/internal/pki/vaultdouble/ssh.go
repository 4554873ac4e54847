package vaultdouble

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"golang.org/x/crypto/ssh"
)

// sshEngine is an SSH mount with a CA key (config/ca generate_signing_key,
// key_type ed25519) and one role: key_type=ca, allow_user_certificates,
// allowed_users="*", default_extensions permit-pty.
type sshEngine struct {
	signer ssh.Signer
	maxTTL time.Duration
}

func newSSH(maxTTL time.Duration) (*sshEngine, error) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	signer, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		return nil, err
	}
	return &sshEngine{signer: signer, maxTTL: maxTTL}, nil
}

func (s *Server) routeSSH(w http.ResponseWriter, req *request, rest string) {
	switch {
	case rest == "public_key" && req.op == "read":
		w.Header().Set("Content-Type", "text/plain")
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write(ssh.MarshalAuthorizedKey(s.ssh.signer.PublicKey()))
	case len(rest) > len("sign/") && rest[:len("sign/")] == "sign/" && req.op == "update":
		s.sshSign(w, req, rest[len("sign/"):])
	default:
		noRoute(w, s.mounts.SSH+"/"+rest)
	}
}

func (s *Server) sshSign(w http.ResponseWriter, req *request, role string) {
	if role != s.mounts.SSHRole {
		writeErrors(w, http.StatusBadRequest, "Unknown role: "+role)
		return
	}
	raw := str(req.body, "public_key")
	if raw == "" {
		writeErrors(w, http.StatusBadRequest, "missing public_key")
		return
	}
	pk, _, _, _, err := ssh.ParseAuthorizedKey([]byte(raw))
	if err != nil {
		writeErrors(w, http.StatusBadRequest, "failed to parse public_key as SSH key: "+err.Error())
		return
	}
	if t := str(req.body, "cert_type"); t != "" && t != "user" {
		writeErrors(w, http.StatusBadRequest, "host certificate issuance is not allowed by this role")
		return
	}
	principals := stringList(req.body, "valid_principals")
	if len(principals) == 0 {
		writeErrors(w, http.StatusBadRequest, "empty valid principals not allowed by role")
		return
	}
	ttl, err := duration(req.body, "ttl")
	if err != nil {
		writeErrors(w, http.StatusBadRequest, err.Error())
		return
	}
	if ttl <= 0 {
		ttl = s.ssh.maxTTL
	}
	if ttl > s.ssh.maxTTL {
		writeErrors(w, http.StatusBadRequest, fmt.Sprintf("ttl %q cannot be longer than max_ttl %q", ttl, s.ssh.maxTTL))
		return
	}
	var sb [8]byte
	_, _ = rand.Read(sb[:])
	now := s.now()
	cert := &ssh.Certificate{
		Key:             pk,
		Serial:          binary.BigEndian.Uint64(sb[:]),
		CertType:        ssh.UserCert,
		KeyId:           fmt.Sprintf("vault-%s-%x", req.token.displayName, sha256.Sum256(pk.Marshal())),
		ValidPrincipals: principals,
		ValidAfter:      uint64(now.Add(-30 * time.Second).Unix()),
		ValidBefore:     uint64(now.Add(ttl).Unix()),
		Permissions:     ssh.Permissions{Extensions: map[string]string{"permit-pty": ""}},
	}
	if err := cert.SignCert(rand.Reader, s.ssh.signer); err != nil {
		writeErrors(w, http.StatusInternalServerError, err.Error())
		return
	}
	writeData(w, map[string]any{
		"serial_number": strconv.FormatUint(cert.Serial, 16),
		"signed_key":    string(ssh.MarshalAuthorizedKey(cert)),
	}, nil, "ssh")
}
