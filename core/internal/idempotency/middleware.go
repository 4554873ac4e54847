package idempotency

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
)

// finishTimeout bounds completing or releasing a claim, which runs on a context
// detached from the request's (a cancelled request must still release its key).
const finishTimeout = 5 * time.Second

// claimAttempts bounds the claim-or-read loop; another attempt is needed only when
// the row found by the claim vanished (released or expired) before it was read.
const claimAttempts = 3

// request is what the middleware knows about one keyed request.
type request struct {
	principal string
	key       string
	method    string
	path      string
	hash      string
}

// stored is an existing key's row.
type stored struct {
	hash    string
	state   string
	status  int
	headers map[string][]string
	body    []byte
}

// claim is a row this request owns.
type claim struct {
	createdAt time.Time
	expiresAt time.Time // of the completed row
}

// Middleware returns the Fiber middleware. principal names the caller ("" for an
// anonymous request, which passes through, as does a request without the header or
// with a method the store does not cover). It must run after the middleware that
// renders errors and sets the request context, and before the route handlers.
func (s *Store) Middleware(principal func(*fiber.Ctx) string) fiber.Handler {
	return func(c *fiber.Ctx) error {
		if !s.methods[c.Method()] {
			return c.Next()
		}
		values := c.Request().Header.PeekAll(HeaderKey)
		if len(values) == 0 {
			return c.Next()
		}
		who := principal(c)
		if who == "" {
			return c.Next()
		}
		if len(values) > 1 {
			return errcode.New(InvalidKey, "send one %s header", HeaderKey)
		}
		key := string(values[0])
		if !ValidKey(key) {
			return errcode.New(InvalidKey, "%s must be 1 to %d printable ASCII characters", HeaderKey, MaxKeyLength)
		}
		req := request{
			principal: strings.Clone(who),
			key:       key,
			method:    c.Method(),
			path:      string(c.Request().URI().PathOriginal()),
			hash:      fingerprint(c),
		}
		return s.serve(c, req)
	}
}

// ValidKey reports whether key is 1 to MaxKeyLength printable ASCII characters.
func ValidKey(key string) bool {
	if len(key) == 0 || len(key) > MaxKeyLength {
		return false
	}
	for i := 0; i < len(key); i++ {
		if key[i] < 0x20 || key[i] > 0x7e {
			return false
		}
	}
	return true
}

// fingerprint is the SHA-256 of the method, the route path, the raw path and query,
// and the raw body bytes, each length-prefixed so no two requests share an encoding.
func fingerprint(c *fiber.Ctx) string {
	h := sha256.New()
	field := func(b []byte) {
		var n [8]byte
		binary.BigEndian.PutUint64(n[:], uint64(len(b)))
		h.Write(n[:])
		h.Write(b)
	}
	field([]byte(c.Method()))
	field([]byte(c.Route().Path))
	field(c.Request().URI().PathOriginal())
	field(c.Request().URI().QueryString())
	field(c.Request().Body())
	return hex.EncodeToString(h.Sum(nil))
}

// serve claims the key and runs the handler, or answers from the existing row.
func (s *Store) serve(c *fiber.Ctx, req request) error {
	ctx := c.UserContext()
	for range claimAttempts {
		cl, ok, err := s.claim(ctx, req)
		if err != nil {
			s.m.errors.WithLabelValues("claim").Inc()
			return fmt.Errorf("idempotency: claim key: %w", err)
		}
		if ok {
			return s.run(c, req, cl)
		}
		row, found, err := s.lookup(ctx, req)
		if err != nil {
			s.m.errors.WithLabelValues("lookup").Inc()
			return fmt.Errorf("idempotency: read key: %w", err)
		}
		if !found {
			continue // released or expired since the claim: claim again
		}
		switch {
		case row.hash != req.hash:
			s.m.reused.Inc()
			return errcode.New(KeyReused, "this %s was already used for a different request", HeaderKey)
		case row.state != "completed":
			s.m.conflicts.Inc()
			c.Set(fiber.HeaderRetryAfter, "1")
			return errcode.New(InFlight, "a request with this %s is still in progress; retry shortly", HeaderKey)
		}
		s.m.replays.Inc()
		replay(c, row)
		return nil
	}
	s.m.errors.WithLabelValues("claim").Inc()
	return fmt.Errorf("idempotency: key %q changed hands %d times while being claimed", req.key, claimAttempts)
}

// claim inserts an in_flight row for req, or takes over an expired one, in one
// statement. ok is false when a live row exists: ON CONFLICT locks it, and the WHERE
// sees its latest version, so of concurrent claimants exactly one wins.
func (s *Store) claim(ctx context.Context, req request) (claim, bool, error) {
	now := s.now().UTC().Truncate(time.Microsecond)
	var cl claim
	cl.expiresAt = now.Add(s.ttlFor(ctx))
	err := s.pool.QueryRow(ctx, `
		INSERT INTO idempotency_keys AS k (principal, key, method, path, request_hash, state, created_at, expires_at)
		VALUES ($1, $2, $3, $4, $5, 'in_flight', $6, $7)
		ON CONFLICT (principal, key) DO UPDATE SET
			method = EXCLUDED.method, path = EXCLUDED.path, request_hash = EXCLUDED.request_hash,
			state = 'in_flight', status_code = NULL, response_headers = NULL, response_body = NULL,
			created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at
		WHERE k.expires_at <= $6
		RETURNING created_at`,
		req.principal, req.key, req.method, req.path, req.hash, now, now.Add(s.lease),
	).Scan(&cl.createdAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return claim{}, false, nil
	}
	if err != nil {
		return claim{}, false, err
	}
	return cl, true, nil
}

// lookup reads req's live row.
func (s *Store) lookup(ctx context.Context, req request) (stored, bool, error) {
	var (
		row     stored
		status  *int32
		headers []byte
	)
	err := s.pool.QueryRow(ctx, `
		SELECT request_hash, state, status_code, response_headers, response_body
		FROM idempotency_keys
		WHERE principal = $1 AND key = $2 AND expires_at > $3`,
		req.principal, req.key, s.now(),
	).Scan(&row.hash, &row.state, &status, &headers, &row.body)
	if errors.Is(err, pgx.ErrNoRows) {
		return stored{}, false, nil
	}
	if err != nil {
		return stored{}, false, err
	}
	if status != nil {
		row.status = int(*status)
	}
	if len(headers) > 0 {
		if err := json.Unmarshal(headers, &row.headers); err != nil {
			return stored{}, false, fmt.Errorf("decode stored headers: %w", err)
		}
	}
	return row, true, nil
}

// run runs the handler chain under a claim and then completes or releases it.
func (s *Store) run(c *fiber.Ctx, req request, cl claim) error {
	log := s.log.With("principal", req.principal, "method", req.method, "path", req.path)
	defer func() {
		if r := recover(); r != nil {
			s.release(c.UserContext(), log, req, cl, "panic")
			panic(r)
		}
	}()
	if err := c.Next(); err != nil {
		if s.writeError == nil {
			s.release(c.UserContext(), log, req, cl, "error")
			return err
		}
		s.writeError(c, err)
	}
	resp := c.Response()
	status := resp.StatusCode()
	switch {
	case c.UserContext().Err() != nil:
		s.release(c.UserContext(), log, req, cl, "cancelled")
	case status >= http.StatusInternalServerError:
		s.release(c.UserContext(), log, req, cl, "server_error")
	case resp.IsBodyStream():
		s.release(c.UserContext(), log, req, cl, "streamed")
	default:
		s.complete(c.UserContext(), log, req, cl, status, s.keptHeaders(c), resp.Body())
	}
	return nil
}

// complete stores the response under the claim. A failure is logged and the claim
// released, so a retry runs again rather than waiting for the lease.
func (s *Store) complete(ctx context.Context, log hclog.Logger, req request, cl claim, status int, headers map[string][]string, body []byte) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), finishTimeout)
	defer cancel()
	lost, err := s.store(ctx, req, cl, status, headers, body)
	switch {
	case err != nil:
		s.m.errors.WithLabelValues("complete").Inc()
		log.Error("store idempotent response; releasing the key", "error", err)
		s.release(ctx, log, req, cl, "store_failed")
	case lost:
		// The lease ran out and another request took the key over (or the janitor
		// removed it): this response is not the one kept.
		s.m.errors.WithLabelValues("claim_lost").Inc()
		log.Warn("idempotency claim lost before the response was stored")
	}
}

// store marks the claimed row completed with the response; lost reports that the
// row is no longer this request's claim.
func (s *Store) store(ctx context.Context, req request, cl claim, status int, headers map[string][]string, body []byte) (lost bool, err error) {
	hdr, err := json.Marshal(headers)
	if err != nil {
		return false, fmt.Errorf("encode headers: %w", err)
	}
	if body == nil {
		body = []byte{}
	}
	tag, err := s.pool.Exec(ctx, `
		UPDATE idempotency_keys
		SET state = 'completed', status_code = $4, response_headers = $5, response_body = $6, expires_at = $7
		WHERE principal = $1 AND key = $2 AND created_at = $3 AND state = 'in_flight'`,
		req.principal, req.key, cl.createdAt, status, hdr, body, cl.expiresAt)
	if err != nil {
		return false, fmt.Errorf("complete key: %w", err)
	}
	return tag.RowsAffected() == 0, nil
}

// release deletes the claim so a retry runs the handler again.
func (s *Store) release(ctx context.Context, log hclog.Logger, req request, cl claim, reason string) {
	s.m.released.WithLabelValues(reason).Inc()
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), finishTimeout)
	defer cancel()
	_, err := s.pool.Exec(ctx, `
		DELETE FROM idempotency_keys
		WHERE principal = $1 AND key = $2 AND created_at = $3 AND state = 'in_flight'`,
		req.principal, req.key, cl.createdAt)
	if err != nil {
		s.m.errors.WithLabelValues("release").Inc()
		log.Error("release idempotency key; retries wait for the lease", "reason", reason, "error", err)
	}
}

// keptHeaders are the response headers stored with the response: Content-Type,
// Location and X-* headers except the correlation id and rate-limit headers, which
// describe the request that carries them rather than the response.
func (s *Store) keptHeaders(c *fiber.Ctx) map[string][]string {
	out := map[string][]string{}
	c.Response().Header.VisitAll(func(k, v []byte) {
		name := http.CanonicalHeaderKey(string(k))
		if s.keep(name) {
			out[name] = append(out[name], string(v))
		}
	})
	return out
}

func (s *Store) keep(name string) bool {
	switch {
	case name == fiber.HeaderContentType, name == fiber.HeaderLocation:
		return true
	case strings.EqualFold(name, s.correlation), strings.EqualFold(name, HeaderReplayed):
		return false
	case len(name) > len("X-RateLimit-") && strings.EqualFold(name[:len("X-RateLimit-")], "X-RateLimit-"):
		return false
	}
	return len(name) > 2 && strings.EqualFold(name[:2], "X-")
}

// replay writes a stored response.
func replay(c *fiber.Ctx, row stored) {
	resp := c.Response()
	resp.SetStatusCode(row.status)
	for name, values := range row.headers {
		if name == fiber.HeaderContentType {
			if len(values) > 0 {
				resp.Header.SetContentType(values[0])
			}
			continue
		}
		resp.Header.Del(name)
		for _, v := range values {
			resp.Header.Add(name, v)
		}
	}
	resp.Header.Set(HeaderReplayed, "true")
	resp.SetBody(row.body)
}
