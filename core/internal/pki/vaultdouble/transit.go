package vaultdouble

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// transitKey is a named Transit key with versions (1-based).
type transitKey struct {
	name     string
	typ      string // aes256-gcm96 or ed25519
	versions []transitVersion
	minDec   int
}

type transitVersion struct {
	created time.Time
	aes     cipher.AEAD
	ed      ed25519.PrivateKey
}

func (k *transitKey) latest() int { return len(k.versions) }

func (k *transitKey) addVersion(now time.Time) error {
	v := transitVersion{created: now}
	switch k.typ {
	case "aes256-gcm96":
		raw := make([]byte, 32)
		if _, err := rand.Read(raw); err != nil {
			return err
		}
		block, err := aes.NewCipher(raw)
		if err != nil {
			return err
		}
		if v.aes, err = cipher.NewGCM(block); err != nil {
			return err
		}
	case "ed25519":
		_, priv, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return err
		}
		v.ed = priv
	}
	k.versions = append(k.versions, v)
	return nil
}

// info is the key's read response, as Vault formats it.
func (k *transitKey) info() map[string]any {
	keys := map[string]any{}
	for i, v := range k.versions {
		n := strconv.Itoa(i + 1)
		if v.ed != nil {
			keys[n] = map[string]any{
				"creation_time":     v.created.UTC().Format(time.RFC3339Nano),
				"name":              "ed25519",
				"public_key":        base64.StdEncoding.EncodeToString(v.ed.Public().(ed25519.PublicKey)),
				"certificate_chain": "",
				"hybrid_public_key": "",
			}
		} else {
			keys[n] = v.created.Unix()
		}
	}
	signing := k.typ == "ed25519"
	return map[string]any{
		"name":                   k.name,
		"type":                   k.typ,
		"derived":                false,
		"deletion_allowed":       false,
		"min_available_version":  0,
		"min_decryption_version": k.minDec,
		"min_encryption_version": 0,
		"latest_version":         k.latest(),
		"exportable":             false,
		"allow_plaintext_backup": false,
		"supports_encryption":    !signing,
		"supports_decryption":    !signing,
		"supports_signing":       signing,
		"supports_derivation":    true,
		"auto_rotate_period":     0,
		"imported_key":           false,
		"keys":                   keys,
	}
}

func (s *Server) routeTransit(w http.ResponseWriter, req *request, rest string) {
	parts := strings.Split(rest, "/")
	switch {
	case len(parts) == 2 && parts[0] == "keys":
		s.transitKeyPath(w, req, parts[1])
	case len(parts) == 3 && parts[0] == "keys" && parts[2] == "rotate" && req.op == "update":
		k := s.transit[parts[1]]
		if k == nil {
			writeErrors(w, http.StatusBadRequest, "key not found")
			return
		}
		if err := k.addVersion(s.now()); err != nil {
			writeErrors(w, http.StatusInternalServerError, err.Error())
			return
		}
		writeData(w, k.info(), nil, "transit")
	case len(parts) == 2 && parts[0] == "sign" && req.op == "update":
		s.transitSign(w, req, parts[1])
	case len(parts) == 2 && parts[0] == "verify" && req.op == "update":
		s.transitVerify(w, req, parts[1])
	case len(parts) == 3 && parts[0] == "datakey" && req.op == "update":
		s.transitDatakey(w, req, parts[1], parts[2])
	case len(parts) == 2 && parts[0] == "decrypt" && req.op == "update":
		s.transitDecrypt(w, req, parts[1])
	default:
		noRoute(w, s.mounts.Transit+"/"+rest)
	}
}

func (s *Server) transitKeyPath(w http.ResponseWriter, req *request, name string) {
	k := s.transit[name]
	if req.op == "read" {
		if k == nil {
			writeErrors(w, http.StatusNotFound)
			return
		}
		writeData(w, k.info(), nil, "transit")
		return
	}
	if k != nil {
		writeData(w, k.info(), []string{fmt.Sprintf("key %s already existed", name)}, "transit")
		return
	}
	typ := str(req.body, "type")
	if typ == "" {
		typ = "aes256-gcm96"
	}
	if typ != "aes256-gcm96" && typ != "ed25519" {
		writeErrors(w, http.StatusBadRequest, fmt.Sprintf("unknown key type %q", typ))
		return
	}
	k = &transitKey{name: name, typ: typ, minDec: 1}
	if err := k.addVersion(s.now()); err != nil {
		writeErrors(w, http.StatusInternalServerError, err.Error())
		return
	}
	s.transit[name] = k
	writeData(w, k.info(), nil, "transit")
}

// parseValue splits "vault:vN:<base64>" into the version and the bytes.
func parseValue(v string, k *transitKey, what string) (int, []byte, string) {
	rest, ok := strings.CutPrefix(v, "vault:")
	if !ok {
		return 0, nil, "invalid " + what + ": no prefix"
	}
	n, b64, ok := strings.Cut(rest, ":")
	version, err := strconv.Atoi(strings.TrimPrefix(n, "v"))
	if !ok || !strings.HasPrefix(n, "v") || err != nil || version <= 0 {
		return 0, nil, "invalid " + what + ": wrong version"
	}
	if version < k.minDec {
		return 0, nil, "ciphertext or signature version is disallowed by policy (too old)"
	}
	if version > k.latest() {
		return 0, nil, "invalid " + what + ": version is too new"
	}
	raw, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return 0, nil, "invalid " + what + ": could not decode base64"
	}
	return version, raw, ""
}

func (s *Server) transitSign(w http.ResponseWriter, req *request, name string) {
	k := s.transit[name]
	if k == nil {
		writeErrors(w, http.StatusBadRequest, "signing key not found")
		return
	}
	if k.typ != "ed25519" {
		writeErrors(w, http.StatusBadRequest, fmt.Sprintf("key type %s does not support signing", k.typ))
		return
	}
	input, err := base64.StdEncoding.DecodeString(str(req.body, "input"))
	if err != nil {
		writeErrors(w, http.StatusBadRequest, "unable to decode input as base64: "+err.Error())
		return
	}
	v := k.latest()
	sig := ed25519.Sign(k.versions[v-1].ed, input)
	writeData(w, map[string]any{
		"signature":   "vault:v" + strconv.Itoa(v) + ":" + base64.StdEncoding.EncodeToString(sig),
		"key_version": v,
	}, nil, "transit")
}

func (s *Server) transitVerify(w http.ResponseWriter, req *request, name string) {
	k := s.transit[name]
	if k == nil {
		writeErrors(w, http.StatusBadRequest, "signature verification key not found")
		return
	}
	if k.typ != "ed25519" {
		writeErrors(w, http.StatusBadRequest, fmt.Sprintf("key type %s does not support verification", k.typ))
		return
	}
	input, err := base64.StdEncoding.DecodeString(str(req.body, "input"))
	if err != nil {
		writeErrors(w, http.StatusBadRequest, "unable to decode input as base64: "+err.Error())
		return
	}
	v, sig, msg := parseValue(str(req.body, "signature"), k, "signature")
	if msg != "" {
		writeErrors(w, http.StatusBadRequest, msg)
		return
	}
	valid := ed25519.Verify(k.versions[v-1].ed.Public().(ed25519.PublicKey), input, sig)
	writeData(w, map[string]any{"valid": valid}, nil, "transit")
}

func (s *Server) transitDatakey(w http.ResponseWriter, req *request, kind, name string) {
	if kind != "plaintext" && kind != "wrapped" {
		writeErrors(w, http.StatusBadRequest, "Invalid path, must be 'plaintext' or 'wrapped'")
		return
	}
	k := s.transit[name]
	if k == nil {
		writeErrors(w, http.StatusBadRequest, "encryption key not found")
		return
	}
	if k.typ != "aes256-gcm96" {
		writeErrors(w, http.StatusBadRequest, fmt.Sprintf("key type %s does not support encryption", k.typ))
		return
	}
	bits := 256
	if b := str(req.body, "bits"); b != "" {
		bits, _ = strconv.Atoi(b)
	}
	if bits != 128 && bits != 256 && bits != 512 {
		writeErrors(w, http.StatusBadRequest, "invalid bit length")
		return
	}
	dk := make([]byte, bits/8)
	nonce := make([]byte, 12)
	if _, err := rand.Read(dk); err != nil {
		writeErrors(w, http.StatusInternalServerError, err.Error())
		return
	}
	if _, err := rand.Read(nonce); err != nil {
		writeErrors(w, http.StatusInternalServerError, err.Error())
		return
	}
	v := k.latest()
	sealed := k.versions[v-1].aes.Seal(nonce, nonce, dk, nil)
	data := map[string]any{
		"ciphertext":  "vault:v" + strconv.Itoa(v) + ":" + base64.StdEncoding.EncodeToString(sealed),
		"key_version": v,
	}
	if kind == "plaintext" {
		data["plaintext"] = base64.StdEncoding.EncodeToString(dk)
	}
	writeData(w, data, nil, "transit")
}

func (s *Server) transitDecrypt(w http.ResponseWriter, req *request, name string) {
	k := s.transit[name]
	if k == nil {
		writeErrors(w, http.StatusBadRequest, "encryption key not found")
		return
	}
	if k.typ != "aes256-gcm96" {
		writeErrors(w, http.StatusBadRequest, fmt.Sprintf("key type %s does not support decryption", k.typ))
		return
	}
	v, raw, msg := parseValue(str(req.body, "ciphertext"), k, "ciphertext")
	if msg != "" {
		writeErrors(w, http.StatusBadRequest, msg)
		return
	}
	a := k.versions[v-1].aes
	if len(raw) < a.NonceSize() {
		writeErrors(w, http.StatusBadRequest, "invalid ciphertext: too short")
		return
	}
	plain, err := a.Open(nil, raw[:a.NonceSize()], raw[a.NonceSize():], nil)
	if err != nil {
		writeErrors(w, http.StatusBadRequest, "cipher: message authentication failed")
		return
	}
	writeData(w, map[string]any{"plaintext": base64.StdEncoding.EncodeToString(plain)}, nil, "transit")
}
