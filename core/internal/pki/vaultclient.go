package pki

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	vault "github.com/hashicorp/vault/api"

	"github.com/gpuaas/gpuaas/core/internal/kms"
)

// VaultConfig says where Vault is, how to log in and which mounts to use.
// Empty mount and role names take the defaults in brackets.
type VaultConfig struct {
	// Addr is Vault's address (VAULT_ADDR).
	Addr string
	// Token authenticates directly (VAULT_TOKEN); it is renewed in the
	// background while it is renewable.
	Token string
	// RoleID and SecretID log in with AppRole instead of Token; the token
	// is renewed and, once it reaches its max TTL, replaced by a new login.
	RoleID, SecretID string
	// AppRoleMount is the AppRole auth mount ("approle").
	AppRoleMount string
	// PKIMount and PKIRole sign node certificates ("pki", "gpuaas-node").
	PKIMount, PKIRole string
	// TransitMount holds the signing keys and DataKey, the aes256-gcm96 key
	// that wraps data keys ("transit", "gpuaas-secrets").
	TransitMount, DataKey string
	// SSHMount and SSHRole sign SSH user certificates ("ssh", "gpuaas-terminal").
	SSHMount, SSHRole string
}

func (c VaultConfig) withDefaults() VaultConfig {
	def := func(s *string, v string) {
		*s = strings.Trim(*s, "/")
		if *s == "" {
			*s = v
		}
	}
	def(&c.AppRoleMount, "approle")
	def(&c.PKIMount, "pki")
	def(&c.PKIRole, "gpuaas-node")
	def(&c.TransitMount, "transit")
	def(&c.DataKey, "gpuaas-secrets")
	def(&c.SSHMount, "ssh")
	def(&c.SSHRole, "gpuaas-terminal")
	return c
}

func (c VaultConfig) appRole() bool { return c.RoleID != "" }

// vaultClient is a Vault API client that keeps its token alive: a
// LifetimeWatcher renews it, and with AppRole a token that can no longer be
// renewed (or that Vault refuses) is replaced by a new login.
type vaultClient struct {
	c   *vault.Client
	cfg VaultConfig
	log hclog.Logger

	loginMu sync.Mutex
	relogin chan *vault.Secret
	stop    chan struct{}
	done    chan struct{}
	once    sync.Once
}

var _ kms.VaultWriter = (*vaultClient)(nil)

// dialVault connects and authenticates; renewal runs until close.
func dialVault(ctx context.Context, cfg VaultConfig, o options) (*vaultClient, error) {
	if cfg.Addr == "" {
		return nil, errors.New("pki: vault: no address (set VAULT_ADDR)")
	}
	if !cfg.appRole() && cfg.Token == "" {
		return nil, errors.New("pki: vault: no credentials (set VAULT_TOKEN, or VAULT_ROLE_ID and VAULT_SECRET_ID)")
	}
	if cfg.appRole() && cfg.SecretID == "" {
		return nil, errors.New("pki: vault: VAULT_ROLE_ID needs VAULT_SECRET_ID")
	}
	vc := vault.DefaultConfig()
	if vc.Error != nil {
		return nil, fmt.Errorf("pki: vault: %w", vc.Error)
	}
	vc.Address = cfg.Addr
	vc.Timeout = 30 * time.Second
	if o.httpClient != nil {
		vc.HttpClient = o.httpClient
	}
	c, err := vault.NewClient(vc)
	if err != nil {
		return nil, fmt.Errorf("pki: vault: %w", err)
	}
	c.ClearToken() // the config names the credentials, not the environment
	v := &vaultClient{c: c, cfg: cfg, log: o.log, relogin: make(chan *vault.Secret, 1),
		stop: make(chan struct{}), done: make(chan struct{})}
	var first *vault.Secret
	if cfg.appRole() {
		first, err = v.login(ctx)
	} else {
		c.SetToken(cfg.Token)
		first, err = v.tokenLease(ctx)
	}
	if err != nil {
		return nil, err
	}
	go v.renewLoop(first)
	return v, nil
}

// close stops the renewal.
func (v *vaultClient) close() error {
	v.once.Do(func() { close(v.stop) })
	<-v.done
	return nil
}

// login logs in with AppRole, installs the new token and returns its auth.
func (v *vaultClient) login(ctx context.Context) (*vault.Secret, error) {
	lc, err := v.c.Clone() // without the (maybe expired) current token
	if err != nil {
		return nil, fmt.Errorf("pki: vault: %w", err)
	}
	lc.ClearToken()
	path := "auth/" + v.cfg.AppRoleMount + "/login"
	s, err := lc.Logical().WriteWithContext(ctx, path, map[string]any{"role_id": v.cfg.RoleID, "secret_id": v.cfg.SecretID})
	if err != nil {
		return nil, vaultErr("approle login (check VAULT_ROLE_ID and VAULT_SECRET_ID)", path, err)
	}
	if s == nil || s.Auth == nil || s.Auth.ClientToken == "" {
		return nil, fmt.Errorf("pki: vault: approle login at %s returned no token", path)
	}
	v.c.SetToken(s.Auth.ClientToken)
	v.log.Info("logged in to vault with approle", "ttl_seconds", s.Auth.LeaseDuration, "renewable", s.Auth.Renewable)
	return s, nil
}

// tokenLease checks the configured token and returns its lease when it can
// be renewed (nil for a token without TTL, such as a root token).
func (v *vaultClient) tokenLease(ctx context.Context) (*vault.Secret, error) {
	s, err := v.c.Auth().Token().LookupSelfWithContext(ctx)
	if err != nil {
		return nil, vaultErr("check VAULT_TOKEN", "auth/token/lookup-self", err)
	}
	if s == nil {
		return nil, errors.New("pki: vault: token lookup returned nothing")
	}
	ttl := number(s.Data["ttl"])
	renewable, _ := s.Data["renewable"].(bool)
	v.log.Info("using vault token", "ttl_seconds", ttl, "renewable", renewable)
	if !renewable || ttl <= 0 {
		return nil, nil
	}
	return &vault.Secret{Auth: &vault.SecretAuth{ClientToken: v.c.Token(), LeaseDuration: int(ttl), Renewable: true}}, nil
}

// renewLoop keeps the token alive until close.
func (v *vaultClient) renewLoop(s *vault.Secret) {
	defer close(v.done)
	for {
		if s == nil { // nothing to renew until a new login
			select {
			case <-v.stop:
				return
			case s = <-v.relogin:
				continue
			}
		}
		w, err := v.c.NewLifetimeWatcher(&vault.LifetimeWatcherInput{Secret: s})
		if err != nil {
			v.log.Error("vault token renewal cannot start", "error", err)
			s = nil
			continue
		}
		go w.Start()
		var stopped bool
		s, stopped = v.watch(w)
		w.Stop()
		if stopped {
			return
		}
	}
}

// watch follows one watcher and returns the next lease to watch.
func (v *vaultClient) watch(w *vault.LifetimeWatcher) (next *vault.Secret, stopped bool) {
	for {
		select {
		case <-v.stop:
			return nil, true
		case r := <-w.RenewCh():
			if r != nil && r.Secret != nil && r.Secret.Auth != nil {
				v.log.Debug("vault token renewed", "ttl_seconds", r.Secret.Auth.LeaseDuration)
			}
		case s := <-v.relogin:
			return s, false
		case err := <-w.DoneCh():
			if !v.cfg.appRole() {
				v.log.Warn("vault token can no longer be renewed; calls fail once it expires (use AppRole or a periodic token)", "error", err)
				return nil, false
			}
			v.log.Info("vault token reached the end of its renewals; logging in again", "error", err)
			return v.loginUntilStopped(), false
		}
	}
}

// loginUntilStopped retries the AppRole login with backoff.
func (v *vaultClient) loginUntilStopped() *vault.Secret {
	wait := 500 * time.Millisecond
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		go func() { // close does not wait for a hanging login
			select {
			case <-v.stop:
				cancel()
			case <-ctx.Done():
			}
		}()
		v.loginMu.Lock()
		s, err := v.login(ctx)
		v.loginMu.Unlock()
		cancel()
		if err == nil {
			return s
		}
		v.log.Error("vault approle login failed; retrying", "error", err, "wait", wait)
		select {
		case <-v.stop:
			return nil
		case <-time.After(wait):
		}
		wait = min(2*wait, time.Minute)
	}
}

// reloginAfter replaces a token Vault refused, unless another call did so
// already; only with AppRole.
func (v *vaultClient) reloginAfter(ctx context.Context, refused string) error {
	v.loginMu.Lock()
	defer v.loginMu.Unlock()
	if v.c.Token() != refused {
		return nil
	}
	s, err := v.login(ctx)
	if err != nil {
		return err
	}
	select { // hand the new lease to the renewal loop, replacing an unread one
	case <-v.relogin:
	default:
	}
	v.relogin <- s
	return nil
}

// call runs fn and, with AppRole, logs in again and retries once when Vault
// refuses the token.
func (v *vaultClient) call(ctx context.Context, fn func() (*vault.Secret, error)) (*vault.Secret, error) {
	tok := v.c.Token()
	s, err := fn()
	var re *vault.ResponseError
	if v.cfg.appRole() && errors.As(err, &re) && re.StatusCode == http.StatusForbidden {
		if lerr := v.reloginAfter(ctx, tok); lerr != nil {
			return nil, errors.Join(err, lerr)
		}
		s, err = fn()
	}
	return s, err
}

// write is a logical write; op names the operation in errors.
func (v *vaultClient) write(ctx context.Context, op, path string, data map[string]any) (*vault.Secret, error) {
	s, err := v.call(ctx, func() (*vault.Secret, error) { return v.c.Logical().WriteWithContext(ctx, path, data) })
	if err != nil {
		return nil, vaultErr(op, path, err)
	}
	return s, nil
}

// read is a logical read; a missing path is ErrNotFound.
func (v *vaultClient) read(ctx context.Context, op, path string) (*vault.Secret, error) {
	s, err := v.call(ctx, func() (*vault.Secret, error) { return v.c.Logical().ReadWithContext(ctx, path) })
	if err != nil {
		return nil, vaultErr(op, path, err)
	}
	if s == nil {
		return nil, fmt.Errorf("pki: %s: %w: vault has nothing at %s", op, ErrNotFound, path)
	}
	return s, nil
}

// readRaw reads a path that answers with raw bytes (CRL, SSH CA key).
func (v *vaultClient) readRaw(ctx context.Context, op, path string) ([]byte, error) {
	resp, err := v.c.Logical().ReadRawWithContext(ctx, path)
	if resp != nil {
		defer func() { _ = resp.Body.Close() }()
	}
	if err != nil {
		return nil, vaultErr(op, path, err)
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, fmt.Errorf("pki: %s: read %s: %w", op, path, err)
	}
	return b, nil
}

// Write implements kms.VaultWriter.
func (v *vaultClient) Write(ctx context.Context, path string, data map[string]any) (map[string]any, error) {
	s, err := v.write(ctx, "transit", path, data)
	if err != nil {
		return nil, err
	}
	if s == nil {
		return nil, fmt.Errorf("pki: vault %s returned no data", path)
	}
	return s.Data, nil
}

// VaultError is an error answer from Vault, on one line. It unwraps to the
// matching sentinel (ErrPermissionDenied for 403, ErrNotFound for 404) and
// to the client's *vault.ResponseError.
type VaultError struct {
	Op, Path string
	Status   int
	Errors   []string
	kind     error
	cause    error
}

func (e *VaultError) Error() string {
	msg := strings.Join(e.Errors, "; ")
	if msg == "" {
		msg = http.StatusText(e.Status)
	}
	hint := ""
	if e.Status == http.StatusForbidden {
		hint = " (vault refused the token: it is wrong, expired, revoked, or its policy does not cover " + e.Path + ")"
	}
	return fmt.Sprintf("pki: %s: vault %s: %d %s%s", e.Op, e.Path, e.Status, strings.ReplaceAll(msg, "\n", " "), hint)
}

// Unwrap returns the sentinel and the client's error.
func (e *VaultError) Unwrap() []error {
	if e.kind == nil {
		return []error{e.cause}
	}
	return []error{e.kind, e.cause}
}

// vaultErr wraps err from the Vault client with the operation.
func vaultErr(op, path string, err error) error {
	var re *vault.ResponseError
	if !errors.As(err, &re) {
		return fmt.Errorf("pki: %s: vault %s: %w", op, path, err)
	}
	e := &VaultError{Op: op, Path: path, Status: re.StatusCode, Errors: re.Errors, cause: err}
	switch re.StatusCode {
	case http.StatusForbidden:
		e.kind = ErrPermissionDenied
	case http.StatusNotFound:
		e.kind = ErrNotFound
	}
	return e
}

// badRequest reports whether err is Vault's 400 and returns its messages.
func badRequest(err error) (string, bool) {
	var e *VaultError
	if errors.As(err, &e) && e.Status == http.StatusBadRequest {
		return strings.Join(e.Errors, "; "), true
	}
	return "", false
}

// number reads a JSON number Vault returned (json.Number with UseNumber).
func number(v any) int64 {
	switch n := v.(type) {
	case json.Number:
		i, err := n.Int64()
		if err != nil {
			f, _ := n.Float64()
			return int64(f)
		}
		return i
	case float64:
		return int64(n)
	case int:
		return int64(n)
	case int64:
		return n
	}
	return 0
}
