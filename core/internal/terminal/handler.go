package terminal

import (
	"context"
	"strings"
	"sync"
	"time"

	"github.com/fasthttp/websocket"
	"github.com/gofiber/fiber/v2"
	"github.com/google/uuid"
	"github.com/valyala/fasthttp"

	"github.com/gpuaas/gpuaas/core/internal/audit"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/rid"
)

// The WebSocket endpoint and its subprotocols.
const (
	// Route is the Fiber route of the endpoint; Path makes its paths.
	Route = "/ws/terminal/:allocation_id"
	// Subprotocol is the wire protocol of doc/terminal.md; the server
	// selects it when the client offers it.
	Subprotocol = "gpuaas.terminal.v1"
	// TokenProtocol prefixes the token when a browser sends it as a
	// subprotocol; the server never selects it.
	TokenProtocol = "gpuaas.token."
)

// Path is the endpoint's path for an allocation.
func Path(allocation uuid.UUID) string { return "/ws/terminal/" + allocation.String() }

// auditAction names the audit rows of session opens and refusals.
const auditAction = "allocation.terminal_session"

// Handler is the WebSocket endpoint, mounted at Route. It refuses with the
// error envelope (nothing reaches the node) unless the request is a
// WebSocket upgrade from an allowed origin carrying an unused, unexpired
// token of this allocation, the allocation is active and the principal has a
// session slot left; then it logs in to the node and upgrades.
func (s *Service) Handler() fiber.Handler {
	up := &websocket.FastHTTPUpgrader{
		Subprotocols:    []string{Subprotocol},
		CheckOrigin:     func(*fasthttp.RequestCtx) bool { return true }, // checked before, with the envelope
		ReadBufferSize:  4 << 10,
		WriteBufferSize: 4 << 10,
		// Idle sessions hold no write buffer.
		WriteBufferPool:  &sync.Pool{},
		HandshakeTimeout: dialTimeout,
	}
	return func(c *fiber.Ctx) error {
		open, err := s.admit(c)
		if err != nil {
			s.refuse(c, err)
			return err
		}
		err = up.Upgrade(c.Context(), func(ws *websocket.Conn) { open.serve(ws) })
		if err != nil {
			open.abandon()
			err = errcode.Wrap(err, errcode.BadRequest, "the WebSocket handshake failed")
			s.refuse(c, err)
			return err
		}
		// The server does not hand over a connection it failed to answer.
		time.AfterFunc(dialTimeout, open.abandon)
		return nil
	}
}

// admit runs every check, takes a session slot and logs in to the node.
func (s *Service) admit(c *fiber.Ctx) (*session, error) {
	ctx := c.UserContext()
	allocation, err := uuid.Parse(c.Params("allocation_id"))
	if err != nil {
		return nil, errcode.New(errcode.NotFound, "no allocation %q", c.Params("allocation_id"))
	}
	c.Locals(localsTarget, s.ids.Platform("allocation", allocation.String()))
	if tok, found := tokenInQuery(c); found {
		if tok != "" {
			if err := s.burn(ctx, tok); err != nil {
				return nil, err
			}
		}
		return nil, errcode.New(CodeTokenInQuery, "a terminal token is never accepted in the query string (it was revoked); "+
			"send it in Sec-WebSocket-Protocol as %s<token> or in Authorization: Bearer", TokenProtocol)
	}
	if !websocket.FastHTTPIsWebSocketUpgrade(c.Context()) {
		return nil, errcode.New(errcode.BadRequest, "this endpoint takes a WebSocket upgrade")
	}
	if origin := c.Get(fiber.HeaderOrigin); origin != "" && !s.origins[strings.ToLower(origin)] {
		return nil, errcode.New(CodeOriginForbidden, "origin %q may not open terminals", origin)
	}
	tok, err := requestToken(c)
	if err != nil {
		return nil, err
	}
	g, err := s.consume(ctx, tok)
	if g.principal != nil {
		ctx = principal.With(ctx, g.principal)
		c.SetUserContext(ctx)
	}
	if err != nil {
		return nil, err
	}
	if g.allocation != allocation {
		return nil, errcode.New(CodeTokenWrongAllocation, "the terminal token was minted for another allocation")
	}
	n, err := lookup(ctx, s.pool, allocation, "")
	if err != nil {
		return nil, err
	}
	c.Locals(localsTarget, s.target(n))
	if n.state != "active" {
		return nil, notActive(n)
	}
	return s.open(c, n, g.principal)
}

// open takes a slot and logs in; the session is ready to serve.
func (s *Service) open(c *fiber.Ctx, n node, p *principal.Principal) (*session, error) {
	ctx := c.UserContext()
	if !s.begin() {
		return nil, errcode.New(errcode.ServiceUnavailable, "the terminal service is shutting down")
	}
	lim := s.limits(ctx, n.org, n.project)
	slot, err := s.acquire(ctx, p.Actor(), n.allocation, lim.MaxSessions)
	if err != nil {
		s.sessions.Done()
		return nil, err
	}
	fail := func(err error) (*session, error) {
		s.release(slot)
		s.sessions.Done()
		return nil, err
	}
	client, err := s.login(ctx, n, lim.CertTTL)
	if err != nil {
		return fail(err)
	}
	if err := audit.Record(ctx, s.pool, audit.Entry{Action: auditAction, Target: s.target(n),
		Details: map[string]any{"session_id": slot, "ssh_user": n.user}}); err != nil {
		_ = client.Close()
		return fail(err)
	}
	return s.newSession(slot, n, p, client, lim), nil
}

const localsTarget = "gpuaas.terminal_target"

// refuse counts, audits and logs a refused request.
func (s *Service) refuse(c *fiber.Ctx, err error) {
	code := errcode.Of(err)
	s.metrics.refused.WithLabelValues(strings.TrimPrefix(string(code), "terminal_")).Inc()
	target, _ := c.Locals(localsTarget).(rid.ID)
	if target.Type == "" {
		return // no allocation named: nothing to audit
	}
	ctx := context.WithoutCancel(c.UserContext())
	if aerr := audit.Record(ctx, s.pool, audit.Entry{Action: auditAction, Target: target, Result: audit.Denied,
		Details: map[string]any{"reason": string(code)}}); aerr != nil {
		s.log.Warn("audit of a refused terminal session failed", "error", aerr)
	}
	s.log.Debug("terminal session refused", "allocation_id", target.ID, "code", code)
}

// tokenInQuery reports a query string that carries a token (by name, or a
// value that looks like one) and returns the value when it has the prefix.
func tokenInQuery(c *fiber.Ctx) (string, bool) {
	var tok string
	found := false
	c.Context().QueryArgs().VisitAll(func(k, v []byte) {
		key, val := strings.ToLower(string(k)), string(v)
		if strings.HasPrefix(val, TokenPrefix) {
			tok, found = val, true
		} else if strings.Contains(key, "token") || key == "authorization" {
			found = true
		}
	})
	return tok, found
}

// requestToken is the token of Sec-WebSocket-Protocol (browsers, which must
// offer Subprotocol too) or else of Authorization: Bearer.
func requestToken(c *fiber.Ctx) (string, error) {
	var tok string
	offered := false
	for _, p := range strings.Split(c.Get(fiber.HeaderSecWebSocketProtocol), ",") {
		p = strings.TrimSpace(p)
		if t, ok := strings.CutPrefix(p, TokenProtocol); ok {
			tok = t
		}
		offered = offered || p == Subprotocol
	}
	if tok != "" {
		if !offered {
			return "", errcode.New(errcode.BadRequest, "offer the %s subprotocol next to the token", Subprotocol)
		}
		return tok, nil
	}
	if t, ok := strings.CutPrefix(c.Get(fiber.HeaderAuthorization), "Bearer "); ok && strings.TrimSpace(t) != "" {
		return strings.TrimSpace(t), nil
	}
	return "", errcode.New(CodeTokenInvalid, "no terminal token: send it in Sec-WebSocket-Protocol as %s<token> or in Authorization: Bearer",
		TokenProtocol)
}
