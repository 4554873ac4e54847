// Package principal is who is calling: a user or a service account, how they
// authenticated, and the context plumbing every layer uses to find them.
package principal

import (
	"context"

	"github.com/google/uuid"
)

// Type is the kind of principal. The values are the audit log's actor types.
type Type string

// Principal kinds.
const (
	User           Type = "user"
	ServiceAccount Type = "service_account"
	System         Type = "system"
)

// Method is how a principal authenticated.
type Method string

// Authentication methods.
const (
	MethodOIDC    Method = "oidc"
	MethodAPIKey  Method = "api_key"
	MethodSession Method = "session"
	MethodSystem  Method = "system"
)

// Principal is an authenticated caller.
type Principal struct {
	Type   Type
	ID     uuid.UUID
	Method Method
	// KeyID is the API key or session that authenticated the call, if any.
	KeyID uuid.UUID
	// IsPlatformAdmin grants the admin routes (users only).
	IsPlatformAdmin bool
	// OrgID, ProjectID and ProjectRole bound a service account to its project.
	OrgID       uuid.UUID
	ProjectID   uuid.UUID
	ProjectRole string
	Email       string
	Name        string
}

// Actor is how audit rows and idempotency keys name the principal:
// "user:{id}" or "service_account:{id}".
func (p *Principal) Actor() string { return string(p.Type) + ":" + p.ID.String() }

// AuditActorType is the audit log's actor type: platform admins act as "admin".
func (p *Principal) AuditActorType() string {
	if p.IsPlatformAdmin {
		return "admin"
	}
	return string(p.Type)
}

type ctxKey struct{}

// With returns ctx carrying p.
func With(ctx context.Context, p *Principal) context.Context {
	return context.WithValue(ctx, ctxKey{}, p)
}

// From returns the principal in ctx, or nil for an anonymous call.
func From(ctx context.Context) *Principal {
	p, _ := ctx.Value(ctxKey{}).(*Principal)
	return p
}

// SystemPrincipal acts for the platform itself (workers, reconcilers, bootstrap).
func SystemPrincipal(name string) *Principal {
	return &Principal{Type: System, ID: uuid.NewSHA1(uuid.NameSpaceOID, []byte("gpuaas-system:"+name)), Method: MethodSystem, Name: name}
}
