// Package vaultdouble is a Vault API double for tests: an HTTP server that
// implements exactly the endpoints gpuaas uses (token and AppRole auth, PKI
// sign/revoke/CRL/chain, Transit keys/sign/verify/rotate/datakey/decrypt, SSH
// sign/public_key) with real crypto and Vault's response and error shapes:
// {"data": {...}, "lease_duration": ..., "renewable": ..., "auth": ...} on
// success, {"errors": [...]} with 400 for bad input, 403 "permission denied"
// for a missing, wrong or expired token, 404 for a missing key or an unknown
// route. Tokens expire and renew like Vault's (whole seconds, capped by their
// max TTL), so clients' renewal is exercised for real.
//
// It is kept honest by running the same test suite against a real Vault
// when VAULT_ADDR and VAULT_TOKEN are set.
package vaultdouble

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Mounts names the engines and roles the double serves.
type Mounts struct {
	PKI, PKIRole, Transit, SSH, SSHRole, AppRole string
}

// DefaultMounts are gpuaas's default names.
func DefaultMounts() Mounts {
	return Mounts{PKI: "pki", PKIRole: "gpuaas-node", Transit: "transit", SSH: "ssh", SSHRole: "gpuaas-terminal", AppRole: "approle"}
}

// Stats counts what clients did.
type Stats struct {
	// Logins are AppRole logins, Renewals token renew-self calls.
	Logins, Renewals int
	// Denied counts requests answered 403.
	Denied int
}

// Server is a running double.
type Server struct {
	// URL is the address to give the client (VAULT_ADDR).
	URL string
	// RootToken never expires and may do everything.
	RootToken string

	srv    *httptest.Server
	now    func() time.Time
	mounts Mounts

	// PKI role and SSH role limits.
	pkiMaxTTL, sshMaxTTL time.Duration

	mu       sync.Mutex
	tokens   map[string]*token
	approles map[string]*appRole
	pki      *pkiEngine
	transit  map[string]*transitKey
	ssh      *sshEngine
	stats    Stats
}

var _ http.Handler = (*Server)(nil)

// Option configures a Server.
type Option func(*Server)

// WithNow sets the clock (default time.Now) for tokens and certificates.
func WithNow(now func() time.Time) Option { return func(s *Server) { s.now = now } }

// WithMounts sets the mount and role names (default DefaultMounts()).
func WithMounts(m Mounts) Option { return func(s *Server) { s.mounts = m } }

// WithRoleMaxTTL sets the PKI role's and the SSH role's max_ttl (default
// 24h and 1h).
func WithRoleMaxTTL(pki, ssh time.Duration) Option {
	return func(s *Server) { s.pkiMaxTTL, s.sshMaxTTL = pki, ssh }
}

// New starts a double on a loopback port.
func New(opts ...Option) (*Server, error) {
	s := &Server{now: time.Now, mounts: DefaultMounts(), pkiMaxTTL: 24 * time.Hour, sshMaxTTL: time.Hour,
		tokens: map[string]*token{}, approles: map[string]*appRole{}, transit: map[string]*transitKey{}}
	for _, o := range opts {
		o(s)
	}
	var err error
	if s.pki, err = newPKI(s.now(), s.pkiMaxTTL); err != nil {
		return nil, err
	}
	if s.ssh, err = newSSH(s.sshMaxTTL); err != nil {
		return nil, err
	}
	root := &token{id: "hvs." + randomID(24), accessor: randomID(24), policies: []string{"root"}, issued: s.now(),
		displayName: "root", path: "auth/token/root"}
	s.tokens[root.id] = root
	s.RootToken = root.id
	s.srv = httptest.NewServer(s)
	s.URL = s.srv.URL
	return s, nil
}

// Close stops the server.
func (s *Server) Close() { s.srv.Close() }

// Stats returns the counters.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stats
}

// AddAppRole lets role id log in with secret id; its tokens live ttl and at
// most maxTTL (token_ttl, token_max_ttl) and carry policies beyond default.
func (s *Server) AddAppRole(roleID, secretID string, ttl, maxTTL time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.approles[roleID] = &appRole{secretID: secretID, ttl: ttl, maxTTL: maxTTL}
}

type appRole struct {
	secretID    string
	ttl, maxTTL time.Duration
}

// request is one parsed call.
type request struct {
	op    string // read, update
	path  string
	body  map[string]any
	token *token
}

// ServeHTTP routes /v1/<path> as Vault does.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	path, ok := strings.CutPrefix(r.URL.Path, "/v1/")
	if !ok {
		writeErrors(w, http.StatusNotFound)
		return
	}
	req := &request{path: path, body: map[string]any{}}
	switch r.Method {
	case http.MethodGet:
		req.op = "read"
	case http.MethodPut, http.MethodPost:
		req.op = "update"
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
		dec.UseNumber()
		if err := dec.Decode(&req.body); err != nil && !errors.Is(err, io.EOF) {
			writeErrors(w, http.StatusBadRequest, "failed to parse JSON input: "+err.Error())
			return
		}
		if req.body == nil {
			req.body = map[string]any{}
		}
	default:
		writeErrors(w, http.StatusMethodNotAllowed, "1 error occurred:\n\t* unsupported operation\n\n")
		return
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.unauthenticated(path) {
		t := s.tokens[tokenOf(r)]
		if t == nil || t.expired(s.now()) || !t.allowed(path) {
			s.stats.Denied++
			writeErrors(w, http.StatusForbidden, "permission denied")
			return
		}
		req.token = t
	}
	s.route(w, req)
}

func tokenOf(r *http.Request) string {
	if t := r.Header.Get("X-Vault-Token"); t != "" {
		return t
	}
	if t, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer "); ok {
		return t
	}
	return ""
}

// unauthenticated lists the paths Vault serves without a token.
func (s *Server) unauthenticated(path string) bool {
	m := s.mounts
	switch path {
	case "auth/" + m.AppRole + "/login", m.PKI + "/crl", m.PKI + "/cert/ca_chain", m.SSH + "/public_key":
		return true
	}
	return false
}

func (s *Server) route(w http.ResponseWriter, req *request) {
	m := s.mounts
	p := req.path
	switch {
	case p == "auth/token/lookup-self":
		s.lookupSelf(w, req)
	case p == "auth/token/renew-self" && req.op == "update":
		s.renewSelf(w, req)
	case p == "auth/token/create" && req.op == "update":
		s.createToken(w, req)
	case p == "auth/"+m.AppRole+"/login" && req.op == "update":
		s.appRoleLogin(w, req)
	case strings.HasPrefix(p, m.PKI+"/"):
		s.routePKI(w, req, strings.TrimPrefix(p, m.PKI+"/"))
	case strings.HasPrefix(p, m.Transit+"/"):
		s.routeTransit(w, req, strings.TrimPrefix(p, m.Transit+"/"))
	case strings.HasPrefix(p, m.SSH+"/"):
		s.routeSSH(w, req, strings.TrimPrefix(p, m.SSH+"/"))
	default:
		noRoute(w, p)
	}
}

func noRoute(w http.ResponseWriter, path string) {
	writeErrors(w, http.StatusNotFound, fmt.Sprintf("no handler for route %q. route entry not found.", path))
}

func unsupported(w http.ResponseWriter) {
	writeErrors(w, http.StatusMethodNotAllowed, "1 error occurred:\n\t* unsupported operation\n\n")
}

// writeErrors answers Vault's error shape; no messages is "errors": [].
func writeErrors(w http.ResponseWriter, status int, msgs ...string) {
	if msgs == nil {
		msgs = []string{}
	}
	writeJSON(w, status, map[string]any{"errors": msgs})
}

func writeJSON(w http.ResponseWriter, status int, body any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(body)
}

// response is Vault's success envelope.
func response(data map[string]any, auth map[string]any, warnings []string, mountType string) map[string]any {
	var d any
	if data != nil {
		d = data
	}
	var a any
	if auth != nil {
		a = auth
	}
	var warn any
	if len(warnings) > 0 {
		warn = warnings
	}
	return map[string]any{
		"request_id":     uuid(),
		"lease_id":       "",
		"renewable":      false,
		"lease_duration": 0,
		"data":           d,
		"wrap_info":      nil,
		"warnings":       warn,
		"auth":           a,
		"mount_type":     mountType,
	}
}

func writeData(w http.ResponseWriter, data map[string]any, warnings []string, mountType string) {
	writeJSON(w, http.StatusOK, response(data, nil, warnings, mountType))
}

func randomID(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	const alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return string(b)
}

func uuid() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	h := hex.EncodeToString(b)
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// field helpers over a decoded JSON body.

func str(body map[string]any, key string) string {
	switch v := body[key].(type) {
	case string:
		return v
	case json.Number:
		return v.String()
	}
	return ""
}

func boolean(body map[string]any, key string, def bool) bool {
	switch v := body[key].(type) {
	case bool:
		return v
	case string:
		if b, err := strconv.ParseBool(v); err == nil {
			return b
		}
	}
	return def
}

// stringList reads a comma-separated string or a JSON array.
func stringList(body map[string]any, key string) []string {
	var out []string
	switch v := body[key].(type) {
	case string:
		for _, p := range strings.Split(v, ",") {
			if p = strings.TrimSpace(p); p != "" {
				out = append(out, p)
			}
		}
	case []any:
		for _, p := range v {
			if s, ok := p.(string); ok && s != "" {
				out = append(out, s)
			}
		}
	}
	return out
}

// duration reads a Vault duration: seconds as a number or string, or a Go
// duration string ("90s", "1h").
func duration(body map[string]any, key string) (time.Duration, error) {
	switch v := body[key].(type) {
	case nil:
		return 0, nil
	case json.Number:
		n, err := v.Int64()
		if err != nil {
			return 0, fmt.Errorf("invalid duration %q", v)
		}
		return time.Duration(n) * time.Second, nil
	case string:
		if v == "" {
			return 0, nil
		}
		if n, err := strconv.ParseInt(v, 10, 64); err == nil {
			return time.Duration(n) * time.Second, nil
		}
		d, err := time.ParseDuration(v)
		if err != nil {
			return 0, fmt.Errorf("error parsing %s: invalid duration %q", key, v)
		}
		return d.Truncate(time.Second), nil
	}
	return 0, fmt.Errorf("error parsing %s", key)
}
