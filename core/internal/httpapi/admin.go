package httpapi

import (
	"bufio"
	"context"
	"encoding/json"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/jackc/pgx/v5"

	"github.com/gpuaas/gpuaas/core/internal/audit"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/httpapi/apigen"
	"github.com/gpuaas/gpuaas/core/internal/identity"
	"github.com/gpuaas/gpuaas/core/internal/policy"
	"github.com/gpuaas/gpuaas/core/internal/store"
)

// requireAdmin refuses callers who are not platform admins (audited for mutations).
func (a *API) requireAdmin(c *fiber.Ctx, action string) error {
	p, err := caller(c)
	if err != nil {
		return err
	}
	if p.IsPlatformAdmin {
		return nil
	}
	if c.Method() != fiber.MethodGet {
		_ = audit.Record(c.UserContext(), a.Pool, audit.Entry{Action: action, Target: a.Identity.IDs().Platform("admin", action), Result: audit.Denied})
	}
	return errcode.New(errcode.Forbidden, "this route requires the platform-admin role")
}

func auditFilter(actorType *apigen.ListAuditLogsParamsActorType, actorID, action, target *string, from, to *time.Time) audit.Filter {
	var f audit.Filter
	if actorType != nil {
		f.ActorType = string(*actorType)
	}
	if actorID != nil {
		f.ActorID = *actorID
	}
	if action != nil {
		f.Action = *action
	}
	if target != nil {
		f.Target = *target
	}
	if from != nil {
		f.From = *from
	}
	if to != nil {
		f.To = *to
	}
	return f
}

func validRange(f audit.Filter) error {
	if !f.From.IsZero() && !f.To.IsZero() && !f.From.Before(f.To) {
		return errcode.New(errcode.ValidationFailed, "from must be before to").WithDetails("field", "from")
	}
	return nil
}

// ListAuditLogs lists audit rows, newest first.
func (a *API) ListAuditLogs(c *fiber.Ctx, params apigen.ListAuditLogsParams) error {
	if err := a.requireAdmin(c, "audit.read"); err != nil {
		return err
	}
	limit, err := Limit(params.Limit)
	if err != nil {
		return err
	}
	f := auditFilter(params.ActorType, params.ActorId, params.Action, params.Target, params.From, params.To)
	if err := validRange(f); err != nil {
		return err
	}
	f.Limit = limit
	var cur audit.Cursor
	if ok, err := DecodeCursor(params.Cursor, &cur); err != nil {
		return err
	} else if ok {
		f.After = &cur
	}
	rows, next, err := audit.List(c.UserContext(), a.Pool, f)
	if err != nil {
		return err
	}
	out := apigen.AuditLogPage{Items: make([]apigen.AuditLog, 0, len(rows))}
	for _, r := range rows {
		d := r.Details
		out.Items = append(out.Items, apigen.AuditLog{Id: r.ID, OccurredAt: r.OccurredAt.UTC(), ActorType: r.ActorType, ActorId: r.ActorID,
			Action: r.Action, Target: r.Target, OrgId: &r.OrgID, ProjectId: &r.ProjectID, Result: apigen.AuditLogResult(r.Result),
			CorrelationId: r.CorrelationID, SourceIp: &r.SourceIP, Details: &d})
	}
	if next != nil {
		s := EncodeCursor(next)
		out.NextCursor = &s
	}
	return c.JSON(out)
}

// ExportAuditLogs streams every matching row as CSV.
func (a *API) ExportAuditLogs(c *fiber.Ctx, params apigen.ExportAuditLogsParams) error {
	if err := a.requireAdmin(c, "audit.export"); err != nil {
		return err
	}
	var at *apigen.ListAuditLogsParamsActorType
	if params.ActorType != nil {
		v := apigen.ListAuditLogsParamsActorType(*params.ActorType)
		at = &v
	}
	f := auditFilter(at, params.ActorId, params.Action, params.Target, params.From, params.To)
	if err := validRange(f); err != nil {
		return err
	}
	// The stream outlives the handler: it gets its own context, bounded by the
	// connection (a write error ends it).
	ctx, cancel := context.WithTimeout(context.WithoutCancel(c.UserContext()), 30*time.Minute)
	c.Set(fiber.HeaderContentType, "text/csv; charset=utf-8")
	c.Set(fiber.HeaderContentDisposition, `attachment; filename="audit-log.csv"`)
	log := a.Log
	c.Context().SetBodyStreamWriter(func(w *bufio.Writer) {
		defer cancel()
		if err := audit.ExportCSV(ctx, a.Pool, f, w); err != nil && log != nil {
			log.Warn("audit export ended early", "error", err)
		}
		_ = w.Flush()
	})
	return nil
}

func userJSON(u *identity.User) apigen.User {
	return apigen.User{Id: u.ID, Email: u.Email, DisplayName: u.DisplayName, IsPlatformAdmin: u.IsPlatformAdmin,
		Status: apigen.UserStatus(u.Status), AuthSource: apigen.UserAuthSource(u.AuthSource), CreatedAt: u.CreatedAt.UTC(), LastLoginAt: utcPtr(u.LastLoginAt)}
}

// AdminListUsers lists users.
func (a *API) AdminListUsers(c *fiber.Ctx, params apigen.AdminListUsersParams) error {
	if err := a.requireAdmin(c, "user.read"); err != nil {
		return err
	}
	limit, after, err := pageArgs(params.Limit, params.Cursor)
	if err != nil {
		return err
	}
	f := identity.UserFilter{After: after, Limit: limit}
	if params.Email != nil {
		f.Email = *params.Email
	}
	if params.Status != nil {
		f.Status = string(*params.Status)
	}
	us, err := a.Identity.ListUsers(c.UserContext(), f)
	if err != nil {
		return err
	}
	items, next := Page(us, limit, func(u *identity.User) any { return u.ID }, userJSON)
	return c.JSON(apigen.UserPage{Items: items, NextCursor: next})
}

// AdminUpdateUser changes a user's platform-admin flag or status.
func (a *API) AdminUpdateUser(c *fiber.Ctx, userID apigen.UserID) error {
	if err := a.requireAdmin(c, "user.update"); err != nil {
		return err
	}
	var req apigen.AdminUpdateUserRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	var status *string
	if req.Status != nil {
		s := string(*req.Status)
		status = &s
	}
	u, err := a.Identity.UpdateUser(c.UserContext(), userID, req.IsPlatformAdmin, status)
	if err != nil {
		return err
	}
	a.Auth.Invalidate("user:" + userID.String())
	return c.JSON(userJSON(u))
}

func overrideJSON(o policy.Override) apigen.PolicyOverride {
	var v any
	_ = json.Unmarshal(o.Value, &v)
	return apigen.PolicyOverride{Key: o.Key, Scope: apigen.PolicyOverrideScope(o.Scope), ScopeId: o.ScopeID, Value: v, UpdatedAt: o.UpdatedAt.UTC(), UpdatedBy: o.UpdatedBy}
}

// ListPolicyOverrides lists stored overrides.
func (a *API) ListPolicyOverrides(c *fiber.Ctx, params apigen.ListPolicyOverridesParams) error {
	if err := a.requireAdmin(c, "policy.read"); err != nil {
		return err
	}
	limit, err := Limit(params.Limit)
	if err != nil {
		return err
	}
	var after policy.OverrideCursor
	if _, err := DecodeCursor(params.Cursor, &after); err != nil {
		return err
	}
	key := ""
	if params.Key != nil {
		key = *params.Key
	}
	os, err := a.Policy.ListOverrides(c.UserContext(), key, after, limit)
	if err != nil {
		return err
	}
	items, next := Page(os, limit, func(o policy.Override) any {
		return policy.OverrideCursor{Key: o.Key, Scope: o.Scope, ScopeID: o.ScopeID}
	}, overrideJSON)
	return c.JSON(apigen.PolicyOverridePage{Items: items, NextCursor: next})
}

// SetPolicyOverride sets an override.
func (a *API) SetPolicyOverride(c *fiber.Ctx, key apigen.PolicyKeyName) error {
	if err := a.requireAdmin(c, "policy.set"); err != nil {
		return err
	}
	var req struct {
		Scope   string          `json:"scope"`
		ScopeID *string         `json:"scope_id"`
		Value   json.RawMessage `json:"value"`
	}
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	if len(req.Value) == 0 {
		return errcode.New(errcode.ValidationFailed, "value is required").WithDetails("field", "value")
	}
	scopeID := ""
	if req.ScopeID != nil {
		scopeID = *req.ScopeID
	}
	ctx := c.UserContext()
	p := PrincipalOf(c)
	err := store.Transact(ctx, a.Pool, store.TxOptions{}, func(tx pgx.Tx) error {
		if err := a.Policy.Set(ctx, tx, policy.Scope(req.Scope), scopeID, key, req.Value, p.Actor()); err != nil {
			return err
		}
		return audit.Record(ctx, tx, audit.Entry{Action: "policy.set", Target: a.Identity.IDs().Platform("policy", key),
			Details: map[string]any{"scope": req.Scope, "scope_id": scopeID, "value": req.Value}})
	})
	if err != nil {
		return err
	}
	a.Policy.Invalidate(key)
	o, err := a.Policy.Get(ctx, policy.Scope(req.Scope), scopeID, key)
	if err != nil {
		return err
	}
	return c.JSON(overrideJSON(o))
}

// ClearPolicyOverride removes an override.
func (a *API) ClearPolicyOverride(c *fiber.Ctx, key apigen.PolicyKeyName, params apigen.ClearPolicyOverrideParams) error {
	if err := a.requireAdmin(c, "policy.clear"); err != nil {
		return err
	}
	scopeID := ""
	if params.ScopeId != nil {
		scopeID = *params.ScopeId
	}
	ctx := c.UserContext()
	err := store.Transact(ctx, a.Pool, store.TxOptions{}, func(tx pgx.Tx) error {
		if err := a.Policy.Clear(ctx, tx, policy.Scope(params.Scope), scopeID, key); err != nil {
			return err
		}
		return audit.Record(ctx, tx, audit.Entry{Action: "policy.clear", Target: a.Identity.IDs().Platform("policy", key),
			Details: map[string]any{"scope": params.Scope, "scope_id": scopeID}})
	})
	if err != nil {
		return err
	}
	a.Policy.Invalidate(key)
	return c.SendStatus(fiber.StatusNoContent)
}
