package terminal

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/gpuaas/gpuaas/core/internal/audit"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/store"
)

// TokenTTL is how long a minted token may wait to be used.
const TokenTTL = 300 * time.Second

// TokenPrefix starts every terminal token (256 random bits, base64url).
const TokenPrefix = "gtt_"

// Token is a minted token; Value is shown once and stored only hashed.
type Token struct {
	Value     string
	ExpiresAt time.Time
}

func hashToken(token string) []byte {
	h := sha256.Sum256([]byte(token))
	return h[:]
}

func newToken() (string, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("terminal: token: %w", err)
	}
	return TokenPrefix + base64.RawURLEncoding.EncodeToString(b), nil
}

// Mint returns a single-use token for the calling principal on an active
// allocation and audits it. The caller has checked that the principal may
// use the allocation.
func (s *Service) Mint(ctx context.Context, allocation uuid.UUID) (Token, error) {
	p := principal.From(ctx)
	if p == nil || (p.Type != principal.User && p.Type != principal.ServiceAccount) {
		return Token{}, errcode.New(errcode.Forbidden, "only users and service accounts open terminals")
	}
	value, err := newToken()
	if err != nil {
		return Token{}, err
	}
	tok := Token{Value: value, ExpiresAt: s.now().Add(TokenTTL).UTC().Truncate(time.Microsecond)}
	err = store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		t, err := lookup(ctx, tx, allocation, " FOR SHARE OF a")
		if err != nil {
			return err
		}
		if t.state != "active" {
			return notActive(t)
		}
		if _, err := tx.Exec(ctx, `INSERT INTO terminal_tokens (token_sha256, allocation_id, actor_type, actor_id, expires_at)
			VALUES ($1, $2, $3, $4, $5)`, hashToken(value), allocation, string(p.Type), p.ID, tok.ExpiresAt); err != nil {
			return fmt.Errorf("terminal: mint: %w", err)
		}
		return audit.Record(ctx, tx, audit.Entry{Action: "allocation.terminal_token", Target: s.target(t),
			Details: map[string]any{"expires_at": tok.ExpiresAt}})
	})
	if err != nil {
		return Token{}, err
	}
	return tok, nil
}

// grant is what a consumed token allows.
type grant struct {
	allocation uuid.UUID
	principal  *principal.Principal
}

// consume uses token up: whatever the outcome, it cannot be presented again.
func (s *Service) consume(ctx context.Context, token string) (grant, error) {
	invalid := errcode.New(CodeTokenInvalid, "the terminal token is unknown or was used already; mint a new one")
	if !strings.HasPrefix(token, TokenPrefix) {
		return grant{}, invalid
	}
	var g grant
	var actorType string
	var actorID uuid.UUID
	var expires time.Time
	err := s.pool.QueryRow(ctx, `UPDATE terminal_tokens SET used_at = now() WHERE token_sha256 = $1 AND used_at IS NULL
		RETURNING allocation_id, actor_type, actor_id, expires_at`, hashToken(token)).Scan(&g.allocation, &actorType, &actorID, &expires)
	if errors.Is(err, pgx.ErrNoRows) {
		return grant{}, invalid
	}
	if err != nil {
		return grant{}, fmt.Errorf("terminal: consume token: %w", err)
	}
	g.principal = &principal.Principal{Type: principal.Type(actorType), ID: actorID}
	if !s.now().Before(expires) {
		return g, errcode.New(CodeTokenExpired, "the terminal token expired; mint a new one")
	}
	return g, nil
}

// burn uses token up without opening anything (it was sent where it may
// have been logged).
func (s *Service) burn(ctx context.Context, token string) error {
	if _, err := s.pool.Exec(ctx, `UPDATE terminal_tokens SET used_at = now() WHERE token_sha256 = $1 AND used_at IS NULL`,
		hashToken(token)); err != nil {
		return fmt.Errorf("terminal: burn token: %w", err)
	}
	return nil
}
