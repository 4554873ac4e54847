package policy

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/events"
)

// Target names where a value is resolved: the project and its org, either may be
// empty (an org-level read leaves ProjectID empty; a platform read leaves both).
type Target struct {
	OrgID     string
	ProjectID string
}

// Changed is the payload of system.policy.changed.
type Changed struct {
	Scope   Scope  `json:"scope"`
	ScopeID string `json:"scope_id"`
	Key     string `json:"key"`
}

// Service resolves values with a per-instance cache.
type Service struct {
	pool *pgxpool.Pool
	log  hclog.Logger
	ttl  time.Duration
	now  func() time.Time

	mu    sync.Mutex
	cache map[cacheKey]cached
	defs  map[string]*Def
}

type cacheKey struct {
	key       string
	org, proj string
}

type cached struct {
	value   any
	fetched time.Time
}

// Option configures a Service.
type Option func(*Service)

// WithTTL bounds how long a cached value is trusted without an invalidation (default
// 60s): the safety net for a missed change event.
func WithTTL(d time.Duration) Option { return func(s *Service) { s.ttl = d } }

// WithClock injects the clock.
func WithClock(now func() time.Time) Option { return func(s *Service) { s.now = now } }

// WithKeys adds definitions beyond the catalog (tests and plugins' own keys).
func WithKeys(defs ...*Def) Option {
	return func(s *Service) {
		for _, d := range defs {
			s.defs[d.Key] = d
		}
	}
}

// NewService returns a Service over the catalog's keys.
func NewService(pool *pgxpool.Pool, log hclog.Logger, opts ...Option) *Service {
	s := &Service{pool: pool, log: log, ttl: time.Minute, now: time.Now, cache: map[cacheKey]cached{}, defs: map[string]*Def{}}
	for _, d := range Catalog() {
		s.defs[d.Key] = d
	}
	for _, o := range opts {
		o(s)
	}
	return s
}

// Get resolves k for t: project override, else org override, else global override,
// else the default.
func (k Key[T]) Get(ctx context.Context, s *Service, t Target) (T, error) {
	v, err := s.resolve(ctx, k.def, t)
	if err != nil {
		var zero T
		return zero, err
	}
	return v.(T), nil
}

// Value is Get that never fails: when the database cannot be read it logs and
// returns the last cached value, or the default.
func (k Key[T]) Value(ctx context.Context, s *Service, t Target) T {
	v, err := k.Get(ctx, s, t)
	if err == nil {
		return v
	}
	s.mu.Lock()
	c, ok := s.cache[cacheKey{k.def.Key, t.OrgID, t.ProjectID}]
	s.mu.Unlock()
	if ok {
		return c.value.(T)
	}
	s.log.Warn("policy read failed; using default", "key", k.def.Key, "error", err)
	return k.def.Default.(T)
}

func (s *Service) resolve(ctx context.Context, d *Def, t Target) (any, error) {
	ck := cacheKey{d.Key, t.OrgID, t.ProjectID}
	s.mu.Lock()
	c, ok := s.cache[ck]
	s.mu.Unlock()
	if ok && s.now().Sub(c.fetched) < s.ttl {
		return c.value, nil
	}
	fetched := s.now()
	rows, err := s.pool.Query(ctx, `
		SELECT scope, value FROM policy_overrides
		WHERE key = $1 AND (scope = 'global'
			OR (scope = 'org' AND scope_id = $2 AND $2 <> '')
			OR (scope = 'project' AND scope_id = $3 AND $3 <> ''))`, d.Key, t.OrgID, t.ProjectID)
	if err != nil {
		return nil, fmt.Errorf("policy %s: read overrides: %w", d.Key, err)
	}
	found := map[Scope]json.RawMessage{}
	for rows.Next() {
		var sc Scope
		var raw json.RawMessage
		if err := rows.Scan(&sc, &raw); err != nil {
			rows.Close()
			return nil, fmt.Errorf("policy %s: scan: %w", d.Key, err)
		}
		found[sc] = raw
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("policy %s: read overrides: %w", d.Key, err)
	}
	value := d.Default
	for _, sc := range []Scope{ScopeProject, ScopeOrg, ScopeGlobal} {
		raw, ok := found[sc]
		if !ok || !d.Allows(sc) {
			continue
		}
		v, err := d.Decode(raw)
		if err != nil {
			// A stored value that no longer validates (bounds tightened in a newer
			// release) is skipped, not fatal.
			s.log.Warn("stored policy override is invalid; ignoring it", "key", d.Key, "scope", sc, "error", err)
			continue
		}
		value = v
		break
	}
	s.mu.Lock()
	s.cache[ck] = cached{value: value, fetched: fetched}
	s.mu.Unlock()
	return value, nil
}

// Set writes an override inside tx and enqueues the change event, so every instance
// drops its cached value once tx commits. The value is validated against the key's
// type and bounds; errors carry stable codes.
func (s *Service) Set(ctx context.Context, tx pgx.Tx, scope Scope, scopeID, key string, value json.RawMessage, actor string) error {
	d, err := s.checkScope(scope, scopeID, key)
	if err != nil {
		return err
	}
	if _, err := d.Decode(value); err != nil {
		return errcode.Wrap(err, errcode.ValidationFailed, err.Error()).WithDetails("field", "value")
	}
	if _, err := tx.Exec(ctx, `
		INSERT INTO policy_overrides (scope, scope_id, key, value, updated_by, updated_at)
		VALUES ($1, $2, $3, $4, $5, now())
		ON CONFLICT (scope, scope_id, key) DO UPDATE
		SET value = excluded.value, updated_by = excluded.updated_by, updated_at = now()`,
		scope, scopeID, key, []byte(value), actor); err != nil {
		return fmt.Errorf("policy %s: set: %w", key, err)
	}
	return s.announce(ctx, tx, scope, scopeID, key)
}

// Clear removes an override inside tx (a no-op when there is none) and enqueues the
// change event.
func (s *Service) Clear(ctx context.Context, tx pgx.Tx, scope Scope, scopeID, key string) error {
	if _, err := s.checkScope(scope, scopeID, key); err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, `DELETE FROM policy_overrides WHERE scope = $1 AND scope_id = $2 AND key = $3`, scope, scopeID, key); err != nil {
		return fmt.Errorf("policy %s: clear: %w", key, err)
	}
	return s.announce(ctx, tx, scope, scopeID, key)
}

func (s *Service) checkScope(scope Scope, scopeID, key string) (*Def, error) {
	d, ok := s.defs[key]
	if !ok {
		return nil, errcode.New(errcode.NotFound, "policy key %q does not exist", key)
	}
	if !d.Allows(scope) {
		return nil, errcode.New(errcode.ValidationFailed, "policy key %q cannot be overridden at %s scope (allowed: %v)", key, scope, d.Scopes).WithDetails("field", "scope")
	}
	if (scope == ScopeGlobal) != (scopeID == "") {
		return nil, errcode.New(errcode.ValidationFailed, "scope_id must be empty for global scope and set otherwise").WithDetails("field", "scope_id")
	}
	return d, nil
}

func (s *Service) announce(ctx context.Context, tx pgx.Tx, scope Scope, scopeID, key string) error {
	_, err := events.Enqueue(ctx, tx, events.Event{
		Subject: events.SubjectSystemPolicyChanged,
		Payload: Changed{Scope: scope, ScopeID: scopeID, Key: key},
	})
	return err
}

// Invalidate drops every cached value of key (all targets: an org override changes
// the value of each of its projects).
func (s *Service) Invalidate(key string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for ck := range s.cache {
		if ck.key == key {
			delete(s.cache, ck)
		}
	}
}

// Listen follows system.policy.changed and invalidates cached values until ctx is
// done. The cache TTL bounds staleness while NATS is away.
func (s *Service) Listen(ctx context.Context, js jetstream.JetStream) error {
	events.Follow(ctx, js, "SYSTEM", events.SubjectSystemPolicyChanged, s.log, s.flush, func(data []byte) {
		var c Changed
		if err := json.Unmarshal(data, &c); err != nil {
			s.log.Warn("malformed policy change event", "error", err)
			return
		}
		s.Invalidate(c.Key)
	})
	return nil
}

func (s *Service) flush() {
	s.mu.Lock()
	defer s.mu.Unlock()
	clear(s.cache)
}

// Override is one stored override.
type Override struct {
	Key       string          `json:"key"`
	Scope     Scope           `json:"scope"`
	ScopeID   string          `json:"scope_id"`
	Value     json.RawMessage `json:"value"`
	UpdatedAt time.Time       `json:"updated_at"`
	UpdatedBy string          `json:"updated_by"`
}

// OverrideCursor is the position after an override in (key, scope, scope_id) order.
type OverrideCursor struct {
	Key     string `json:"k"`
	Scope   Scope  `json:"s"`
	ScopeID string `json:"i"`
}

// ListOverrides lists stored overrides (of one key when key is set) after the
// cursor, up to limit+1 rows so callers can tell whether a next page exists.
func (s *Service) ListOverrides(ctx context.Context, key string, after OverrideCursor, limit int) ([]Override, error) {
	rows, err := s.pool.Query(ctx, `SELECT key, scope, scope_id, value, updated_at, updated_by FROM policy_overrides
		WHERE ($1 = '' OR key = $1) AND (key, scope, scope_id) > ($2, $3, $4)
		ORDER BY key, scope, scope_id LIMIT $5`, key, after.Key, string(after.Scope), after.ScopeID, limit+1)
	if err != nil {
		return nil, fmt.Errorf("policy: list overrides: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (Override, error) {
		var o Override
		return o, r.Scan(&o.Key, &o.Scope, &o.ScopeID, &o.Value, &o.UpdatedAt, &o.UpdatedBy)
	})
}

// Get returns one stored override.
func (s *Service) Get(ctx context.Context, scope Scope, scopeID, key string) (Override, error) {
	o := Override{Key: key, Scope: scope, ScopeID: scopeID}
	err := s.pool.QueryRow(ctx, `SELECT value, updated_at, updated_by FROM policy_overrides WHERE scope = $1 AND scope_id = $2 AND key = $3`,
		scope, scopeID, key).Scan(&o.Value, &o.UpdatedAt, &o.UpdatedBy)
	if err != nil {
		return o, fmt.Errorf("policy %s: get: %w", key, err)
	}
	return o, nil
}

// ForOrgs resolves k for many orgs at once (org override, else global override,
// else the default) in one query: for batch work such as accrual.
func (k Key[T]) ForOrgs(ctx context.Context, s *Service, orgs []string) (map[string]T, error) {
	global, err := k.Get(ctx, s, Target{})
	if err != nil {
		return nil, err
	}
	out := make(map[string]T, len(orgs))
	for _, o := range orgs {
		out[o] = global
	}
	if !k.def.Allows(ScopeOrg) {
		return out, nil
	}
	rows, err := s.pool.Query(ctx, `SELECT scope_id, value FROM policy_overrides WHERE key = $1 AND scope = 'org' AND scope_id = ANY($2)`, k.def.Key, orgs)
	if err != nil {
		return nil, fmt.Errorf("policy %s: read org overrides: %w", k.def.Key, err)
	}
	defer rows.Close()
	for rows.Next() {
		var org string
		var raw json.RawMessage
		if err := rows.Scan(&org, &raw); err != nil {
			return nil, fmt.Errorf("policy %s: scan: %w", k.def.Key, err)
		}
		if v, err := k.def.Decode(raw); err == nil {
			out[org] = v.(T)
		}
	}
	return out, rows.Err()
}
