package policy

import (
	"context"
	"encoding/json"
	"errors"
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

// Lookup returns the definition of key.
func (s *Service) Lookup(key string) (*Def, bool) {
	d, ok := s.defs[key]
	return d, ok
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

// Listen follows system.policy.changed with an ephemeral ordered consumer and
// invalidates cached values until ctx is done. It resubscribes after NATS outages;
// the cache TTL bounds staleness in between.
func (s *Service) Listen(ctx context.Context, js jetstream.JetStream) error {
	for {
		err := s.listenOnce(ctx, js)
		if ctx.Err() != nil {
			return nil
		}
		s.log.Debug("policy change listener stopped; restarting", "error", err)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(time.Second):
		}
	}
}

func (s *Service) listenOnce(ctx context.Context, js jetstream.JetStream) error {
	cons, err := js.OrderedConsumer(ctx, "SYSTEM", jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{events.SubjectSystemPolicyChanged},
		DeliverPolicy:  jetstream.DeliverNewPolicy,
	})
	if err != nil {
		return err
	}
	// Anything cached before the subscription existed may have missed a change.
	s.flush()
	msgs, err := cons.Messages()
	if err != nil {
		return err
	}
	go func() {
		<-ctx.Done()
		msgs.Stop()
	}()
	for {
		msg, err := msgs.Next()
		if err != nil {
			if errors.Is(err, jetstream.ErrMsgIteratorClosed) && ctx.Err() != nil {
				return nil
			}
			return err
		}
		var c Changed
		if err := json.Unmarshal(msg.Data(), &c); err != nil {
			s.log.Warn("malformed policy change event", "error", err)
			continue
		}
		s.Invalidate(c.Key)
	}
}

func (s *Service) flush() {
	s.mu.Lock()
	defer s.mu.Unlock()
	clear(s.cache)
}
