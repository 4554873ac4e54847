package identity

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
)

// LoginState is a browser sign-in in progress.
type LoginState struct {
	State        string
	CodeVerifier string
	Nonce        string
	RedirectURI  string
	ReturnTo     string
}

func randomString(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

// BeginOIDCLogin records a new sign-in (state, nonce and the PKCE verifier) valid
// for ttl.
func (s *Service) BeginOIDCLogin(ctx context.Context, codeVerifier, redirectURI, returnTo string, ttl time.Duration) (*LoginState, error) {
	st := &LoginState{State: randomString(32), CodeVerifier: codeVerifier, Nonce: randomString(24), RedirectURI: redirectURI, ReturnTo: returnTo}
	_, err := s.pool.Exec(ctx, `INSERT INTO oidc_login_states (state, code_verifier, nonce, redirect_uri, return_to, expires_at)
		VALUES ($1, $2, $3, $4, $5, $6)`, st.State, st.CodeVerifier, st.Nonce, redirectURI, returnTo, s.now().Add(ttl))
	if err != nil {
		return nil, fmt.Errorf("identity: begin oidc login: %w", err)
	}
	// Old, abandoned states are removed as new ones are made.
	_, _ = s.pool.Exec(ctx, `DELETE FROM oidc_login_states WHERE expires_at < now() - interval '1 hour'`)
	return st, nil
}

// TakeOIDCLogin consumes a sign-in state: it works once, before it expires.
func (s *Service) TakeOIDCLogin(ctx context.Context, state string) (*LoginState, error) {
	st := &LoginState{State: state}
	var expires time.Time
	err := s.pool.QueryRow(ctx, `DELETE FROM oidc_login_states WHERE state = $1 RETURNING code_verifier, nonce, redirect_uri, return_to, expires_at`, state).
		Scan(&st.CodeVerifier, &st.Nonce, &st.RedirectURI, &st.ReturnTo, &expires)
	if errors.Is(err, pgx.ErrNoRows) || (err == nil && !s.now().Before(expires)) {
		return nil, errcode.New(CodeInvalidToken, "unknown, used or expired sign-in state; start again").WithDetails("field", "state")
	}
	if err != nil {
		return nil, fmt.Errorf("identity: take oidc login: %w", err)
	}
	return st, nil
}

// RecordOIDCLogin audits a completed OIDC sign-in and stamps the user's last login.
func (s *Service) RecordOIDCLogin(ctx context.Context, u *User) error {
	return s.tx(ctx, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `UPDATE users SET last_login_at = now() WHERE id = $1`, u.ID); err != nil {
			return err
		}
		return s.record(ctx, tx, "auth.login", s.ids.User(u.ID.String()), map[string]any{"method": "oidc"})
	})
}
