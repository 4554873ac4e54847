// Package identity is tenancy and authentication: users, orgs, projects, their
// memberships, service accounts, API keys, local accounts and sessions, and the
// Authenticator that turns a bearer token into a principal.
package identity

import (
	"context"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/gpuaas/gpuaas/core/internal/audit"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/rid"
	"github.com/gpuaas/gpuaas/core/internal/store"
)

// Error codes of this package (statuses in httpapi.statusFor).
const (
	CodeOrgNotFound            errcode.Code = "org_not_found"
	CodeProjectNotFound        errcode.Code = "project_not_found"
	CodeUserNotFound           errcode.Code = "user_not_found"
	CodeMemberNotFound         errcode.Code = "member_not_found"
	CodeServiceAccountNotFound errcode.Code = "service_account_not_found"
	CodeAPIKeyNotFound         errcode.Code = "api_key_not_found"
	CodeSlugTaken              errcode.Code = "slug_taken"
	CodeNameTaken              errcode.Code = "name_taken"
	CodeAlreadyMember          errcode.Code = "already_member"
	CodeLastOwner              errcode.Code = "last_owner"
	CodeInvalidCredentials     errcode.Code = "invalid_credentials"
	CodeInvalidToken           errcode.Code = "invalid_token"
	CodeAPIKeyRevoked          errcode.Code = "api_key_revoked"
	CodeAPIKeyExpired          errcode.Code = "api_key_expired"
	CodeAccountDisabled        errcode.Code = "account_disabled"
	CodeLocalAccountsDisabled  errcode.Code = "local_accounts_disabled"
	CodeOIDCNotConfigured      errcode.Code = "oidc_not_configured"
)

// Codes lists this package's codes for the contract test.
func Codes() []errcode.Code {
	return []errcode.Code{CodeOrgNotFound, CodeProjectNotFound, CodeUserNotFound, CodeMemberNotFound,
		CodeServiceAccountNotFound, CodeAPIKeyNotFound, CodeSlugTaken, CodeNameTaken, CodeAlreadyMember,
		CodeLastOwner, CodeInvalidCredentials, CodeInvalidToken, CodeAPIKeyRevoked, CodeAPIKeyExpired,
		CodeAccountDisabled, CodeLocalAccountsDisabled, CodeOIDCNotConfigured}
}

// Org roles, strongest first.
const (
	OrgOwner   = "owner"
	OrgAdmin   = "admin"
	OrgBilling = "billing"
	OrgMember  = "member"
)

// Project roles, strongest first.
const (
	ProjectAdmin  = "admin"
	ProjectMember = "member"
	ProjectViewer = "viewer"
)

// Service holds the identity domain's operations.
type Service struct {
	pool *pgxpool.Pool
	ids  rid.Builder
	log  hclog.Logger
	now  func() time.Time

	mu          sync.Mutex
	memberships map[uuid.UUID]cachedMemberships
}

// NewService returns a Service for region.
func NewService(pool *pgxpool.Pool, region string, log hclog.Logger, now func() time.Time) *Service {
	if now == nil {
		now = time.Now
	}
	return &Service{pool: pool, ids: rid.Builder{Region: region}, log: log, now: now, memberships: map[uuid.UUID]cachedMemberships{}}
}

// IDs is the canonical id builder of the service's region.
func (s *Service) IDs() rid.Builder { return s.ids }

func (s *Service) tx(ctx context.Context, fn func(pgx.Tx) error) error {
	return store.Transact(ctx, s.pool, store.TxOptions{}, fn)
}

func (s *Service) record(ctx context.Context, tx pgx.Tx, action string, target rid.ID, details map[string]any) error {
	return audit.Record(ctx, tx, audit.Entry{Action: action, Target: target, Details: details})
}

var slugRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{1,62}$`)

func validSlug(field, v string) error {
	if !slugRE.MatchString(v) {
		return errcode.New(errcode.ValidationFailed, "%s must be 2-63 lowercase letters, digits or '-', starting with a letter or digit", field).WithDetails("field", field)
	}
	return nil
}

func validName(field, v string, max int) error {
	if strings.TrimSpace(v) == "" || len(v) > max {
		return errcode.New(errcode.ValidationFailed, "%s must be 1-%d characters", field, max).WithDetails("field", field)
	}
	return nil
}

func newID() uuid.UUID { return uuid.Must(uuid.NewV7()) }
