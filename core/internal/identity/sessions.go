package identity

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/gpuaas/gpuaas/core/internal/audit"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/principal"
)

// TokenSet is what a sign-in or refresh returns.
type TokenSet struct {
	AccessToken      string
	RefreshToken     string
	IDToken          string
	ExpiresAt        time.Time
	RefreshExpiresAt time.Time
	UserID           uuid.UUID
}

// SessionTTLs are the lifetimes of a local session's tokens.
type SessionTTLs struct {
	Access, Refresh time.Duration
}

// LocalLogin checks a local account's password and starts a session. Unknown logins
// and wrong passwords answer the same error after the same work.
func (s *Service) LocalLogin(ctx context.Context, login, password string, ttl SessionTTLs) (*TokenSet, error) {
	var (
		userID uuid.UUID
		hash   string
		status string
	)
	err := s.pool.QueryRow(ctx, `SELECT c.user_id, c.password_hash, u.status FROM local_credentials c JOIN users u ON u.id = c.user_id
		WHERE lower(c.login) = lower($1)`, login).Scan(&userID, &hash, &status)
	if errors.Is(err, pgx.ErrNoRows) {
		VerifyPassword(dummyHash, password)
		return nil, s.loginFailed(ctx, login, "unknown login")
	}
	if err != nil {
		return nil, fmt.Errorf("identity: local login: %w", err)
	}
	if !VerifyPassword(hash, password) {
		return nil, s.loginFailed(ctx, login, "wrong password")
	}
	if status != "active" {
		return nil, errcode.New(CodeAccountDisabled, "the account is disabled")
	}
	ctx = principal.With(ctx, &principal.Principal{Type: principal.User, ID: userID, Method: principal.MethodSession})
	var ts *TokenSet
	err = s.tx(ctx, func(tx pgx.Tx) error {
		var err error
		ts, err = s.newSession(ctx, tx, userID, ttl)
		if err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `UPDATE users SET last_login_at = now() WHERE id = $1`, userID); err != nil {
			return err
		}
		return s.record(ctx, tx, "auth.login", s.ids.User(userID.String()), map[string]any{"method": "local"})
	})
	if err != nil {
		return nil, fmt.Errorf("identity: local login: %w", err)
	}
	return ts, nil
}

// loginFailed audits a failed login (outside any transaction) and returns the one
// error both causes share.
func (s *Service) loginFailed(ctx context.Context, login, reason string) error {
	if err := audit.Record(ctx, s.pool, audit.Entry{Action: "auth.login", Target: s.ids.Platform("login", "local"), Result: audit.Failure,
		Details: map[string]any{"login": login, "reason": reason}}); err != nil {
		s.log.Warn("audit failed login", "error", err)
	}
	return errcode.New(CodeInvalidCredentials, "wrong login or password")
}

func (s *Service) newSession(ctx context.Context, tx pgx.Tx, userID uuid.UUID, ttl SessionTTLs) (*TokenSet, error) {
	access, _, accessHash := newToken(sessionPrefix)
	refresh, _, refreshHash := newToken(refreshPrefix)
	now := s.now()
	ts := &TokenSet{AccessToken: access, RefreshToken: refresh, ExpiresAt: now.Add(ttl.Access), RefreshExpiresAt: now.Add(ttl.Refresh), UserID: userID}
	_, err := tx.Exec(ctx, `INSERT INTO sessions (id, user_id, access_hash, refresh_hash, access_expires_at, refresh_expires_at)
		VALUES ($1, $2, $3, $4, $5, $6)`, newID(), userID, accessHash, refreshHash, ts.ExpiresAt, ts.RefreshExpiresAt)
	return ts, err
}

// RefreshLocal rotates a local session's tokens: the old access and refresh tokens
// stop working.
func (s *Service) RefreshLocal(ctx context.Context, refresh string, ttl SessionTTLs) (*TokenSet, string, error) {
	if _, ok := splitToken(refresh, refreshPrefix); !ok {
		return nil, "", errcode.New(CodeInvalidToken, "malformed refresh token")
	}
	var ts *TokenSet
	var sid uuid.UUID
	err := s.tx(ctx, func(tx pgx.Tx) error {
		var userID uuid.UUID
		var expires time.Time
		var revoked *time.Time
		var status string
		err := tx.QueryRow(ctx, `SELECT s.id, s.user_id, s.refresh_expires_at, s.revoked_at, u.status FROM sessions s JOIN users u ON u.id = s.user_id
			WHERE s.refresh_hash = $1 FOR UPDATE OF s`, hashToken(refresh)).Scan(&sid, &userID, &expires, &revoked, &status)
		if errors.Is(err, pgx.ErrNoRows) {
			return errcode.New(CodeInvalidToken, "unknown or already used refresh token")
		}
		if err != nil {
			return err
		}
		if revoked != nil || !s.now().Before(expires) {
			return errcode.New(CodeInvalidToken, "the session has ended; sign in again")
		}
		if status != "active" {
			return errcode.New(CodeAccountDisabled, "the account is disabled")
		}
		access, _, accessHash := newToken(sessionPrefix)
		next, _, nextHash := newToken(refreshPrefix)
		now := s.now()
		ts = &TokenSet{AccessToken: access, RefreshToken: next, ExpiresAt: now.Add(ttl.Access), RefreshExpiresAt: expires, UserID: userID}
		if _, err := tx.Exec(ctx, `UPDATE sessions SET access_hash = $2, refresh_hash = $3, access_expires_at = $4 WHERE id = $1`,
			sid, accessHash, nextHash, ts.ExpiresAt); err != nil {
			return err
		}
		ctx := principal.With(ctx, &principal.Principal{Type: principal.User, ID: userID, Method: principal.MethodSession})
		if err := announceRevoked(ctx, tx, []string{"session:" + sid.String()}); err != nil {
			return err
		}
		return s.record(ctx, tx, "auth.refresh", s.ids.User(userID.String()), map[string]any{"session": sid.String()})
	})
	if err != nil {
		return nil, "", fmt.Errorf("identity: refresh: %w", err)
	}
	return ts, "session:" + sid.String(), nil
}

// Logout ends the local session sid of the caller.
func (s *Service) Logout(ctx context.Context, sid uuid.UUID) error {
	err := s.tx(ctx, func(tx pgx.Tx) error {
		var userID uuid.UUID
		err := tx.QueryRow(ctx, `UPDATE sessions SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 RETURNING user_id`, sid).Scan(&userID)
		if errors.Is(err, pgx.ErrNoRows) {
			return errcode.New(CodeInvalidToken, "no such session")
		}
		if err != nil {
			return err
		}
		if err := announceRevoked(ctx, tx, []string{"session:" + sid.String()}); err != nil {
			return err
		}
		return s.record(ctx, tx, "auth.logout", s.ids.User(userID.String()), map[string]any{"session": sid.String()})
	})
	if err != nil {
		return fmt.Errorf("identity: logout: %w", err)
	}
	return nil
}
