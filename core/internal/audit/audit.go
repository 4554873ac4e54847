// Package audit writes and reads the audit log: one append-only row per mutation by
// any principal, with the actor, the action, the canonical id of the target, the
// result, the correlation id, the time and the source address.
package audit

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"sync/atomic"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/gpuaas/gpuaas/core/internal/correlation"
	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/rid"
)

// Results of an audited action.
const (
	Success = "success"
	Failure = "failure"
	Denied  = "denied"
)

// Entry is one audited action. The actor, correlation id and source address come
// from the context.
type Entry struct {
	Action  string
	Target  rid.ID
	Result  string
	Details map[string]any
}

// Execer is what Record needs: a transaction (preferred: the row commits with the
// change it records) or a pool.
type Execer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

type ipKey struct{}
type trackerKey struct{}

// WithSourceIP returns ctx carrying the caller's address.
func WithSourceIP(ctx context.Context, ip string) context.Context {
	return context.WithValue(ctx, ipKey{}, ip)
}

// Tracker counts the rows recorded while serving one request, so the HTTP layer can
// flag a successful mutation that recorded none.
type Tracker struct{ n atomic.Int32 }

// Count is how many rows were recorded.
func (t *Tracker) Count() int { return int(t.n.Load()) }

// WithTracker returns ctx carrying a fresh tracker.
func WithTracker(ctx context.Context) (context.Context, *Tracker) {
	t := &Tracker{}
	return context.WithValue(ctx, trackerKey{}, t), t
}

// Record writes e with the context's principal as actor (the anonymous actor when
// there is none).
func Record(ctx context.Context, db Execer, e Entry) error {
	actorType, actorID := "anonymous", ""
	if p := principal.From(ctx); p != nil {
		actorType, actorID = p.AuditActorType(), p.ID.String()
	}
	if e.Result == "" {
		e.Result = Success
	}
	details := e.Details
	if details == nil {
		details = map[string]any{}
	}
	db2, err := json.Marshal(details)
	if err != nil {
		return fmt.Errorf("audit: details: %w", err)
	}
	var ip *netip.Addr
	if s, _ := ctx.Value(ipKey{}).(string); s != "" {
		if a, err := netip.ParseAddr(s); err == nil {
			ip = &a
		}
	}
	id, err := uuid.NewV7()
	if err != nil {
		return fmt.Errorf("audit: id: %w", err)
	}
	_, err = db.Exec(ctx, `INSERT INTO audit_log
		(id, actor_type, actor_id, action, target, org_id, project_id, result, correlation_id, source_ip, details)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)`,
		id, actorType, actorID, e.Action, e.Target.String(), e.Target.Org, e.Target.Project, e.Result,
		correlation.From(ctx), ip, db2)
	if err != nil {
		return fmt.Errorf("audit: record %s: %w", e.Action, err)
	}
	if t, _ := ctx.Value(trackerKey{}).(*Tracker); t != nil {
		t.n.Add(1)
	}
	return nil
}
