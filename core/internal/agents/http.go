package agents

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/gpuaas/gpuaas/agent/protocol"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/inventory"
	"github.com/gpuaas/gpuaas/core/internal/pki"
	"github.com/gpuaas/gpuaas/core/internal/principal"
)

// Revoked reports whether a certificate serial is revoked (a cached
// pki.RevocationChecker: a revocation is seen within its max age).
type Revoked interface {
	Revoked(ctx context.Context, serial string) (bool, error)
}

// TLSConfig is the agent listener's TLS: the server certificate, and a
// client certificate verified against the PKI's CA chain on every
// connection but those that offer protocol.EnrollALPN (enrollment, the one
// call an agent makes without a certificate; every other route refuses a
// request without one). A client without a certificate that does not ask to
// enroll fails the handshake.
func TLSConfig(server tls.Certificate, caChainPEM []byte) (*tls.Config, error) {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caChainPEM) {
		return nil, errors.New("agents: the CA chain holds no certificate")
	}
	mtls := &tls.Config{Certificates: []tls.Certificate{server}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert,
		MinVersion: tls.VersionTLS13, NextProtos: []string{"http/1.1"}}
	enroll := mtls.Clone()
	enroll.ClientAuth = tls.NoClientCert
	mtls.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		if slices.Contains(hello.SupportedProtos, protocol.EnrollALPN) {
			return enroll, nil
		}
		return nil, nil
	}
	return mtls, nil
}

// Handler serves api/agent/v1.
func (s *Service) Handler(revoked Revoked) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /agent/v1/enroll", func(w http.ResponseWriter, r *http.Request) {
		var req protocol.Enrollment
		if !decode(w, r, &req) {
			return
		}
		c, err := s.Enroll(r.Context(), req.Token, req.CSRPEM)
		reply(w, c, err)
	})
	node := func(h func(w http.ResponseWriter, r *http.Request, node uuid.UUID)) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			id, err := s.nodeOf(r, revoked)
			if err != nil {
				reply(w, nil, err)
				return
			}
			ctx := principal.With(r.Context(), &principal.Principal{Type: principal.System, ID: id, Method: principal.MethodSystem, Name: "agent"})
			h(w, r.WithContext(ctx), id)
		}
	}
	mux.HandleFunc("POST /agent/v1/renew", node(func(w http.ResponseWriter, r *http.Request, id uuid.UUID) {
		var req protocol.Renewal
		if !decode(w, r, &req) {
			return
		}
		serial, _ := pki.NormalizeSerial(r.TLS.VerifiedChains[0][0].SerialNumber.Text(16)) // nodeOf checked it
		c, err := s.Renew(r.Context(), id, serial, req.CSRPEM)
		reply(w, c, err)
	}))
	mux.HandleFunc("POST /agent/v1/heartbeat", node(func(w http.ResponseWriter, r *http.Request, id uuid.UUID) {
		var req protocol.Heartbeat
		if !decode(w, r, &req) {
			return
		}
		hb, err := s.Heartbeat(r.Context(), id, req.Facts)
		reply(w, hb, err)
	}))
	mux.HandleFunc("GET /agent/v1/tasks", node(func(w http.ResponseWriter, r *http.Request, id uuid.UUID) {
		wait := 30 * time.Second
		if v := r.URL.Query().Get("wait"); v != "" {
			d, err := time.ParseDuration(v)
			if err != nil || d < 0 || d > 60*time.Second {
				reply(w, nil, errcode.New(errcode.ValidationFailed, "wait must be a duration up to 60s").WithDetails("field", "wait"))
				return
			}
			wait = d
		}
		tasks, err := s.Poll(r.Context(), id, wait)
		if tasks == nil {
			tasks = []protocol.SignedTask{}
		}
		reply(w, protocol.Poll{Tasks: tasks}, err)
	}))
	mux.HandleFunc("POST /agent/v1/tasks/{id}/result", node(func(w http.ResponseWriter, r *http.Request, id uuid.UUID) {
		taskID, err := uuid.Parse(r.PathValue("id"))
		if err != nil {
			reply(w, nil, errcode.New(CodeTaskNotFound, "no such task"))
			return
		}
		var req protocol.Result
		if !decode(w, r, &req) {
			return
		}
		_, err = s.Complete(r.Context(), id, taskID, req)
		reply(w, map[string]bool{"accepted": err == nil}, err)
	}))
	return mux
}

// nodeOf authenticates an mTLS call: a verified client certificate, not
// revoked, naming a node the inventory has and has not retired.
func (s *Service) nodeOf(r *http.Request, revoked Revoked) (uuid.UUID, error) {
	if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 || len(r.TLS.VerifiedChains[0]) == 0 {
		return uuid.Nil, errcode.New(errcode.Unauthenticated, "this call needs the node's client certificate")
	}
	leaf := r.TLS.VerifiedChains[0][0]
	serial, err := pki.NormalizeSerial(leaf.SerialNumber.Text(16))
	if err != nil {
		return uuid.Nil, errcode.New(errcode.Unauthenticated, "the certificate has no usable serial")
	}
	ok, err := revoked.Revoked(r.Context(), serial)
	if err != nil {
		return uuid.Nil, err
	}
	if ok {
		return uuid.Nil, errcode.New(errcode.Unauthenticated, "the client certificate is revoked")
	}
	raw, err := pki.NodeIDFromCert(leaf)
	if err != nil {
		return uuid.Nil, errcode.New(errcode.Unauthenticated, "%s", err)
	}
	id, err := uuid.Parse(raw)
	if err != nil {
		return uuid.Nil, errcode.New(errcode.Unauthenticated, "the certificate names no node")
	}
	// The certificate must be one this core issued to this node, not revoked,
	// and issued after the node's last revocation (the database is the
	// immediate source; the CA's list covers certificates it revoked itself).
	var state string
	var nodeRevoked, issued, certRevoked *time.Time
	err = s.pool.QueryRow(r.Context(), `SELECT n.state, n.agent_revoked_at, c.issued_at, c.revoked_at
		FROM nodes n LEFT JOIN node_certificates c ON c.serial = $2 AND c.node_id = n.id WHERE n.id = $1`, id, serial).
		Scan(&state, &nodeRevoked, &issued, &certRevoked)
	if errors.Is(err, pgx.ErrNoRows) {
		return uuid.Nil, errcode.New(errcode.Forbidden, "the node is unknown or retired")
	}
	if err != nil { // the database, not the agent: a 500, which agents retry
		return uuid.Nil, fmt.Errorf("agents: check the client certificate: %w", err)
	}
	// A revoked certificate (retiring a node revokes its agent's) is an
	// authentication failure, checked before the node's state.
	if issued == nil || certRevoked != nil || (nodeRevoked != nil && !issued.After(*nodeRevoked)) {
		return uuid.Nil, errcode.New(errcode.Unauthenticated, "the client certificate is revoked")
	}
	if state == string(inventory.Retired) {
		return uuid.Nil, errcode.New(errcode.Forbidden, "the node is unknown or retired")
	}
	return id, nil
}

func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		reply(w, nil, errcode.New(errcode.InvalidJSON, "body: %s", err))
		return false
	}
	return true
}

// reply writes v, or err in the API's error envelope.
func reply(w http.ResponseWriter, v any, err error) {
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		status := http.StatusInternalServerError
		code, msg := errcode.Internal, "internal error"
		if ce := errcode.As(err); ce != nil {
			code, msg = ce.Code, ce.Message
			status = statusOf(code)
		}
		w.WriteHeader(status)
		_ = json.NewEncoder(w).Encode(map[string]any{"error": map[string]any{"code": code, "message": msg}})
		return
	}
	_ = json.NewEncoder(w).Encode(v)
}

func statusOf(c errcode.Code) int {
	switch c {
	case errcode.Unauthenticated, CodeTokenInvalid:
		return http.StatusUnauthorized
	case errcode.Forbidden:
		return http.StatusForbidden
	case CodeTaskNotFound, inventory.CodeNodeNotFound:
		return http.StatusNotFound
	case CodeTaskConflict, CodeNotEnrollable:
		return http.StatusConflict
	case errcode.InvalidJSON, errcode.ValidationFailed, CodeCSRInvalid:
		return http.StatusBadRequest
	}
	if strings.HasSuffix(string(c), "_not_found") {
		return http.StatusNotFound
	}
	return http.StatusInternalServerError
}
