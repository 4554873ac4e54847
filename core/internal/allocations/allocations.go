// Package allocations rents nodes to projects: creation in one transaction
// (caps, balance, a free node taken with SKIP LOCKED, the outbox event), the
// allocation state machine of DESIGN.md §5, and the Temporal workflows that
// provision and release through the node's provisioner driver.
package allocations

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/gpuaas/gpuaas/core/internal/audit"
	"github.com/gpuaas/gpuaas/core/internal/catalog"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/events"
	"github.com/gpuaas/gpuaas/core/internal/inventory"
	"github.com/gpuaas/gpuaas/core/internal/ledger"
	"github.com/gpuaas/gpuaas/core/internal/policy"
	"github.com/gpuaas/gpuaas/core/internal/rid"
	"github.com/gpuaas/gpuaas/core/internal/sshkeys"
	"github.com/gpuaas/gpuaas/core/internal/store"
)

// Error codes.
const (
	CodeNotFound          errcode.Code = "allocation_not_found"
	CodeInvalidTransition errcode.Code = "invalid_allocation_transition"
	CodeNoCapacity        errcode.Code = "no_capacity"
	CodeQuotaExceeded     errcode.Code = "allocation_quota_exceeded"
	CodeInsufficientFunds errcode.Code = "insufficient_balance"
	CodeSSHKeyRequired    errcode.Code = "ssh_key_required"
)

// Codes lists this package's codes for the contract test.
func Codes() []errcode.Code {
	return []errcode.Code{CodeNotFound, CodeInvalidTransition, CodeNoCapacity, CodeQuotaExceeded, CodeInsufficientFunds, CodeSSHKeyRequired}
}

// State is where an allocation stands.
type State string

// Allocation states.
const (
	Requested     State = "requested"
	Provisioning  State = "provisioning"
	Active        State = "active"
	Releasing     State = "releasing"
	Released      State = "released"
	Failed        State = "failed"
	ReleaseFailed State = "release_failed"
)

// States lists every state.
func States() []State {
	return []State{Requested, Provisioning, Active, Releasing, Released, Failed, ReleaseFailed}
}

var transitions = map[State][]State{
	Requested:     {Provisioning},
	Provisioning:  {Active, Failed},
	Active:        {Releasing},
	Releasing:     {Released, ReleaseFailed},
	ReleaseFailed: {Releasing},
}

// CanMove reports whether from → to is an edge of the state machine.
func CanMove(from, to State) bool { return slices.Contains(transitions[from], to) }

// Terminal reports whether nothing follows the state.
func (s State) Terminal() bool { return s == Released || s == Failed }

// Allocation is one node rented to a project.
type Allocation struct {
	ID                   uuid.UUID
	OrgID                uuid.UUID
	ProjectID            uuid.UUID
	Name                 string
	SKU                  string
	NodeID               uuid.UUID
	NodeInstance         string
	NodeExternalID       string
	NodeHostname         string
	GPUs                 int
	PricePerGPUHourMinor int64
	Currency             string
	State                State
	StateReason          string
	Username             string
	SSHPublicKeys        []string
	Image                string
	ReleaseAttempt       int
	ReleaseRequestedBy   string
	CreatedBy            string
	CreatedAt, UpdatedAt time.Time
	ActiveAt, EndedAt    *time.Time
}

// Service keeps allocations.
type Service struct {
	pool *pgxpool.Pool
	pol  *policy.Service
	ids  rid.Builder
	log  hclog.Logger
}

// NewService returns a Service.
func NewService(pool *pgxpool.Pool, pol *policy.Service, region string, log hclog.Logger) *Service {
	return &Service{pool: pool, pol: pol, ids: rid.Builder{Region: region}, log: log}
}

// Target is an allocation's canonical id.
func (s *Service) Target(a *Allocation) rid.ID {
	return s.ids.InProject(a.OrgID.String(), a.ProjectID.String(), "allocation", a.ID.String())
}

const columns = `a.id, a.org_id, a.project_id, a.name, a.sku_id, a.node_id, n.provisioner_instance, n.external_id, n.hostname,
	a.gpus, a.price_per_gpu_hour_minor, a.currency, a.state, a.state_reason, a.username, a.ssh_public_keys, a.image,
	a.release_attempt, a.release_requested_by, a.created_by, a.created_at, a.updated_at, a.active_at, a.ended_at`

const from = ` FROM allocations a JOIN nodes n ON n.id = a.node_id`

func scan(row pgx.Row) (*Allocation, error) {
	a := &Allocation{}
	err := row.Scan(&a.ID, &a.OrgID, &a.ProjectID, &a.Name, &a.SKU, &a.NodeID, &a.NodeInstance, &a.NodeExternalID, &a.NodeHostname,
		&a.GPUs, &a.PricePerGPUHourMinor, &a.Currency, &a.State, &a.StateReason, &a.Username, &a.SSHPublicKeys, &a.Image,
		&a.ReleaseAttempt, &a.ReleaseRequestedBy, &a.CreatedBy, &a.CreatedAt, &a.UpdatedAt, &a.ActiveAt, &a.EndedAt)
	return a, err
}

func notFound(id uuid.UUID) error { return errcode.New(CodeNotFound, "no allocation %s", id) }

// Get returns an allocation (no scoping: callers check the caller may see its
// project).
func (s *Service) Get(ctx context.Context, id uuid.UUID) (*Allocation, error) {
	a, err := scan(s.pool.QueryRow(ctx, `SELECT `+columns+from+` WHERE a.id = $1`, id))
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, notFound(id)
	}
	if err != nil {
		return nil, fmt.Errorf("allocations: get: %w", err)
	}
	return a, nil
}

func lock(ctx context.Context, tx pgx.Tx, id uuid.UUID) (*Allocation, error) {
	a, err := scan(tx.QueryRow(ctx, `SELECT `+columns+from+` WHERE a.id = $1 FOR UPDATE OF a`, id))
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, notFound(id)
	}
	return a, err
}

// Filter selects allocations.
type Filter struct {
	OrgID     uuid.UUID
	ProjectID uuid.UUID
	NodeID    uuid.UUID
	SKU       string
	States    []State
	Before    uuid.UUID // keyset cursor: ids are time-ordered
	Limit     int
}

// List returns allocations newest first, up to Limit+1.
func (s *Service) List(ctx context.Context, f Filter) ([]*Allocation, error) {
	before := f.Before
	if before == uuid.Nil {
		before = uuid.Max
	}
	states := make([]string, len(f.States))
	for i, st := range f.States {
		states[i] = string(st)
	}
	rows, err := s.pool.Query(ctx, `SELECT `+columns+from+`
		WHERE ($1 = '00000000-0000-0000-0000-000000000000'::uuid OR a.org_id = $1)
		  AND ($2 = '00000000-0000-0000-0000-000000000000'::uuid OR a.project_id = $2)
		  AND ($3 = '00000000-0000-0000-0000-000000000000'::uuid OR a.node_id = $3)
		  AND ($4 = '' OR a.sku_id = $4)
		  AND (cardinality($5::text[]) = 0 OR a.state = ANY($5))
		  AND a.id < $6
		ORDER BY a.id DESC LIMIT $7`, f.OrgID, f.ProjectID, f.NodeID, f.SKU, states, before, f.Limit+1)
	if err != nil {
		return nil, fmt.Errorf("allocations: list: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (*Allocation, error) { return scan(r) })
}

// Event is the payload of the provisioning.* events.
type Event struct {
	AllocationID   uuid.UUID `json:"allocation_id"`
	OrgID          uuid.UUID `json:"org_id"`
	ProjectID      uuid.UUID `json:"project_id"`
	NodeID         uuid.UUID `json:"node_id"`
	SKU            string    `json:"sku_id,omitempty"`
	State          State     `json:"state"`
	Reason         string    `json:"reason,omitempty"`
	ReleaseAttempt int       `json:"release_attempt,omitempty"`
}

func eventOf(subject string, a *Allocation) events.Event {
	return events.Event{Subject: subject, Payload: Event{AllocationID: a.ID, OrgID: a.OrgID, ProjectID: a.ProjectID, NodeID: a.NodeID,
		SKU: a.SKU, State: a.State, Reason: a.StateReason, ReleaseAttempt: a.ReleaseAttempt}}
}

// move changes a locked allocation's state inside tx and writes the event.
// An illegal transition writes nothing.
func move(ctx context.Context, tx pgx.Tx, a *Allocation, to State, reason, subject string) error {
	if !CanMove(a.State, to) {
		return errcode.New(CodeInvalidTransition, "allocation is %s and cannot become %s", a.State, to).
			WithDetails("state", string(a.State))
	}
	a.State, a.StateReason = to, truncate(reason)
	set := ""
	switch to {
	case Active:
		set = ", active_at = now()"
	case Released, Failed:
		set = ", ended_at = now()"
	case Releasing:
		a.ReleaseAttempt++
		set = ", release_attempt = release_attempt + 1"
	}
	err := tx.QueryRow(ctx, `UPDATE allocations SET state = $2, state_reason = $3, updated_at = now()`+set+`
		WHERE id = $1 RETURNING updated_at, active_at, ended_at`, a.ID, a.State, a.StateReason).Scan(&a.UpdatedAt, &a.ActiveAt, &a.EndedAt)
	if err == nil && to.Terminal() { // every state before a terminal one is live
		_, err = tx.Exec(ctx, adjustHoldingsSQL, a.OrgID, a.ProjectID, -1, -a.GPUs)
	}
	if err != nil {
		return fmt.Errorf("allocations: move %s to %s: %w", a.ID, to, err)
	}
	if subject == "" {
		return nil
	}
	_, err = events.Enqueue(ctx, tx, eventOf(subject, a))
	return err
}

func truncate(s string) string {
	if len(s) > 1000 {
		return s[:1000]
	}
	return s
}

var (
	usernameRE = regexp.MustCompile(`^[a-z_][a-z0-9_-]{0,30}$`)
	imageRE    = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:/-]{0,99}$`)
)

// reservedUsers are account names a tenant may not take.
func reservedUsers() []string {
	return []string{"root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp", "proxy", "www-data",
		"backup", "list", "irc", "gnats", "nobody", "systemd-network", "systemd-resolve", "messagebus", "sshd", "syslog",
		"ubuntu", "admin", "gpuaas", "maas", "nvidia-persistenced", "_apt"}
}

func invalid(field, format string, args ...any) error {
	return errcode.New(errcode.ValidationFailed, format, args...).WithDetails("field", field)
}

// CreateRequest asks for Count nodes of a SKU for a project.
type CreateRequest struct {
	OrgID     uuid.UUID
	ProjectID uuid.UUID
	SKU       string
	Count     int
	Name      string
	// Username is the account made on the node.
	Username string
	// SSHPublicKeys are authorized_keys lines, already resolved from key ids.
	SSHPublicKeys []string
	Image         string
	CreatedBy     string
}

func (r *CreateRequest) validate(maxCount int) error {
	switch {
	case r.SKU == "":
		return invalid("sku_id", "sku_id is required")
	case r.Count < 1 || r.Count > maxCount:
		return invalid("count", "count must be between 1 and %d", maxCount)
	case len(r.Name) > 100 || strings.ContainsFunc(r.Name, func(c rune) bool { return c < 0x20 || c == 0x7f }):
		return invalid("name", "name must be at most 100 printable characters")
	case !usernameRE.MatchString(r.Username) || slices.Contains(reservedUsers(), r.Username):
		return invalid("username", "username must be 1-31 lowercase letters, digits, '_' or '-', starting with a letter or '_', and not a system account")
	case r.Image != "" && !imageRE.MatchString(r.Image):
		return invalid("image", "image must be 1-100 letters, digits or ._:/-")
	case len(r.SSHPublicKeys) == 0:
		return errcode.New(CodeSSHKeyRequired, "an allocation needs at least one SSH public key: add one with POST /api/v1/ssh-keys or pass ssh_public_keys").
			WithDetails("field", "ssh_public_keys")
	case len(r.SSHPublicKeys) > 32:
		return invalid("ssh_public_keys", "at most 32 SSH keys")
	}
	for i, k := range r.SSHPublicKeys {
		norm, _, _, _, err := sshkeys.Parse(k)
		if err != nil {
			return errcode.New(errcode.Of(err), "ssh_public_keys[%d]: %s", i, errcode.As(err).Message).WithDetails("field", "ssh_public_keys")
		}
		r.SSHPublicKeys[i] = norm
	}
	return nil
}

type caps struct{ perProject, gpusPerProject, perOrg, gpusPerOrg int64 }

func (s *Service) caps(ctx context.Context, org, project uuid.UUID) (caps, error) {
	t := policy.Target{OrgID: org.String(), ProjectID: project.String()}
	var c caps
	var err error
	if c.perProject, err = policy.AllocMaxPerProject.Get(ctx, s.pol, t); err != nil {
		return c, err
	}
	if c.gpusPerProject, err = policy.AllocMaxGPUsPerProject.Get(ctx, s.pol, t); err != nil {
		return c, err
	}
	if c.perOrg, err = policy.AllocMaxPerOrg.Get(ctx, s.pol, t); err != nil {
		return c, err
	}
	c.gpusPerOrg, err = policy.AllocMaxGPUsPerOrg.Get(ctx, s.pol, t)
	return c, err
}

func quota(scope, what string, limit, current, asked int64) error {
	return errcode.New(CodeQuotaExceeded, "the %s may hold %d %s at once; it holds %d and this asks for %d more", scope, limit, what, current, asked).
		WithDetails("scope", scope).WithDetails("limit", limit).WithDetails("current", current)
}

// Create takes Count free nodes of the SKU for the project in one transaction:
// the project's and the org's caps (allocations and GPUs) and a positive balance
// are checked under the org's and the project's holdings rows (see
// holdings.go), free nodes are taken with
// FOR UPDATE SKIP LOCKED, and each allocation is inserted as requested with its
// outbox event and audit row. All or nothing.
func (s *Service) Create(ctx context.Context, req CreateRequest) ([]*Allocation, error) {
	maxCount := int(policy.AllocMaxPerRequest.Value(ctx, s.pol, policy.Target{}))
	if err := req.validate(maxCount); err != nil {
		return nil, err
	}
	c, err := s.caps(ctx, req.OrgID, req.ProjectID)
	if err != nil {
		return nil, err
	}
	var out []*Allocation
	// Two round trips: BEGIN, the holdings, the reads and taking the nodes; then
	// the writes and COMMIT. A refusal after the first rolls the nodes back.
	err = store.TransactPipelined(ctx, s.pool, func(tx *store.PipelinedTx) error {
		out = out[:0]
		// The org's and the project's holdings first: counting the new
		// allocations into them takes their row locks, which serialize the
		// creates of one project and of one org until COMMIT, and returns
		// the totals the caps are checked against.
		var projN, projGPUs, orgN, orgGPUs int64
		var bal ledger.Balance
		var hasAccount bool
		sku := &catalog.SKU{}
		batch := &pgx.Batch{}
		batch.Queue(takeHoldingsSQL, req.OrgID, req.ProjectID, req.SKU, int64(req.Count)).Query(func(rows pgx.Rows) error {
			for rows.Next() {
				var owner uuid.UUID
				var n, gpus int64
				if err := rows.Scan(&sku.ID, &sku.GPUsPerNode, &sku.PricePerGPUHourMinor, &sku.Currency, &owner, &n, &gpus); err != nil {
					return err
				}
				if owner == req.OrgID {
					orgN, orgGPUs = n, gpus
				} else {
					projN, projGPUs = n, gpus
				}
			}
			return rows.Err()
		})
		ledger.QueueBalance(batch, req.OrgID, func(b ledger.Balance, found bool) { bal, hasAccount = b, found })
		var nodes []takenNode
		queueTakeNodes(batch, req.SKU, req.Count, func(t []takenNode) { nodes = t })
		if err := tx.Send(ctx, batch); err != nil {
			return err
		}
		if sku.ID == "" { // no such SKU, or not active: the holdings are untouched
			return errcode.New(catalog.CodeSKUNotFound, "no SKU %q", req.SKU).WithDetails("field", "sku_id")
		}
		// The totals count this request in.
		n, gpus := int64(req.Count), int64(req.Count*sku.GPUsPerNode)
		switch {
		case projN > c.perProject:
			return quota("project", "allocations", c.perProject, projN-n, n)
		case projGPUs > c.gpusPerProject:
			return quota("project", "GPUs", c.gpusPerProject, projGPUs-gpus, gpus)
		case orgN > c.perOrg:
			return quota("organization", "allocations", c.perOrg, orgN-n, n)
		case orgGPUs > c.gpusPerOrg:
			return quota("organization", "GPUs", c.gpusPerOrg, orgGPUs-gpus, gpus)
		}
		if !hasAccount || bal.AmountMinor <= 0 {
			return errcode.New(CodeInsufficientFunds, "the organization's balance must be above zero to start an allocation; top up first").
				WithDetails("balance_minor", bal.AmountMinor)
		}
		if bal.Currency != sku.Currency {
			return errcode.New(ledger.CodeCurrencyMismatch, "SKU %s is priced in %s but the organization pays in %s", sku.ID, sku.Currency, bal.Currency)
		}
		if len(nodes) < req.Count {
			return errcode.New(CodeNoCapacity, "no free %s node right now (asked for %d, %d free); try again later or another SKU", sku.ID, req.Count, len(nodes)).
				WithDetails("sku_id", sku.ID)
		}
		// The rows, their events, their audit, and COMMIT.
		writes := &pgx.Batch{}
		deferred := store.Deferred{Batch: writes, Tx: tx}
		evs := make([]events.Event, 0, 2*len(nodes))
		for _, nd := range nodes {
			a := &Allocation{ID: uuid.Must(uuid.NewV7()), OrgID: req.OrgID, ProjectID: req.ProjectID, Name: req.Name, SKU: sku.ID, NodeID: nd.id,
				NodeInstance: nd.instance, NodeExternalID: nd.external, NodeHostname: nd.hostname, GPUs: sku.GPUsPerNode,
				PricePerGPUHourMinor: sku.PricePerGPUHourMinor, Currency: sku.Currency, State: Requested, Username: req.Username,
				SSHPublicKeys: req.SSHPublicKeys, Image: req.Image, CreatedBy: req.CreatedBy}
			writes.Queue(`INSERT INTO allocations (id, org_id, project_id, name, sku_id, node_id, gpus, price_per_gpu_hour_minor, currency,
					state, username, ssh_public_keys, image, created_by)
				VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'requested', $10, $11, $12, $13) RETURNING created_at, updated_at`,
				a.ID, a.OrgID, a.ProjectID, a.Name, a.SKU, a.NodeID, a.GPUs, a.PricePerGPUHourMinor, a.Currency,
				a.Username, a.SSHPublicKeys, a.Image, a.CreatedBy).QueryRow(func(row pgx.Row) error { return row.Scan(&a.CreatedAt, &a.UpdatedAt) })
			evs = append(evs, eventOf(events.SubjectProvisioningAllocationRequested, a),
				events.Event{Subject: events.SubjectNodesStateChanged, Payload: inventory.NodeChanged{NodeID: nd.id, Instance: nd.instance, SKU: sku.ID,
					From: inventory.Available, To: inventory.Allocated, Reason: "allocation " + a.ID.String()}})
			if err := audit.Record(ctx, deferred, audit.Entry{Action: "allocation.create", Target: s.Target(a),
				Details: map[string]any{"sku_id": sku.ID, "node_id": nd.id.String(), "gpus": a.GPUs, "price_per_gpu_hour_minor": a.PricePerGPUHourMinor}}); err != nil {
				return err
			}
			out = append(out, a)
		}
		if _, err := events.Enqueue(ctx, deferred, evs...); err != nil {
			return err
		}
		return tx.Commit(ctx, writes)
	})
	if err != nil {
		return nil, fmt.Errorf("allocations: create: %w", err)
	}
	return out, nil
}

type takenNode struct {
	id                           uuid.UUID
	instance, external, hostname string
}

// queueTakeNodes queues moving up to n free nodes of a SKU to allocated and
// hands them to got. Concurrent creates start their search at random points
// of the free pool (wrapping around), so they rarely meet on the same rows,
// and skip rows another transaction holds; the part below the starting point
// is read only when the part above it holds too few.
func queueTakeNodes(b *pgx.Batch, sku string, n int, got func([]takenNode)) {
	b.Queue(`WITH above AS (
			SELECT id FROM nodes WHERE sku_id = $1 AND state = 'available' AND id >= $3 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED
		), below AS (
			SELECT id FROM nodes WHERE sku_id = $1 AND state = 'available' AND id < $3 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED
		), pick AS (
			(SELECT id FROM above UNION ALL SELECT id FROM below) LIMIT $2
		)
		UPDATE nodes SET state = 'allocated', state_reason = '', updated_at = now() FROM pick WHERE nodes.id = pick.id
		RETURNING nodes.id, nodes.provisioner_instance, nodes.external_id, nodes.hostname`, sku, n, uuid.New()).
		Query(func(rows pgx.Rows) error {
			taken, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (takenNode, error) {
				var t takenNode
				return t, r.Scan(&t.id, &t.instance, &t.external, &t.hostname)
			})
			got(taken)
			return err
		})
}

// Release asks for an active (or release_failed: a retry) allocation to be
// released: it becomes releasing and its release workflow starts. Releasing
// anything else is a conflict and writes nothing.
func (s *Service) Release(ctx context.Context, id uuid.UUID, by, reason string) (*Allocation, error) {
	return s.requestRelease(ctx, id, by, reason, "allocation.release")
}

// ForceRelease is the admin's release: it also takes back an allocation
// whose release failed, whoever owns it.
func (s *Service) ForceRelease(ctx context.Context, id uuid.UUID, by, reason string) (*Allocation, error) {
	if reason == "" {
		reason = "force-released by an admin"
	}
	return s.requestRelease(ctx, id, by, reason, "allocation.force_release")
}

func (s *Service) requestRelease(ctx context.Context, id uuid.UUID, by, reason, action string) (*Allocation, error) {
	var out *Allocation
	err := store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		a, err := lock(ctx, tx, id)
		if err != nil {
			return err
		}
		from := a.State
		if err := move(ctx, tx, a, Releasing, reason, events.SubjectProvisioningReleaseRequested); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `UPDATE allocations SET release_requested_by = $2 WHERE id = $1`, id, by); err != nil {
			return err
		}
		a.ReleaseRequestedBy = by
		out = a
		return audit.Record(ctx, tx, audit.Entry{Action: action, Target: s.Target(a),
			Details: map[string]any{"from": string(from), "attempt": a.ReleaseAttempt, "reason": reason}})
	})
	if err != nil {
		return nil, fmt.Errorf("allocations: release: %w", err)
	}
	return out, nil
}

// ReleaseOrg asks for every active allocation of a depleted org to be
// released (the billing depletion timer). It returns how many it asked for.
func (s *Service) ReleaseOrg(ctx context.Context, tx pgx.Tx, org uuid.UUID, reason string) (int, error) {
	rows, err := tx.Query(ctx, `SELECT a.id FROM allocations a WHERE a.org_id = $1 AND a.state = 'active' ORDER BY a.id FOR UPDATE`, org)
	if err != nil {
		return 0, err
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
	if err != nil {
		return 0, err
	}
	for _, id := range ids {
		a, err := lock(ctx, tx, id)
		if err != nil {
			return 0, err
		}
		if err := move(ctx, tx, a, Releasing, reason, events.SubjectProvisioningReleaseRequested); err != nil {
			return 0, err
		}
		if _, err := tx.Exec(ctx, `UPDATE allocations SET release_requested_by = 'system:billing' WHERE id = $1`, id); err != nil {
			return 0, err
		}
		if err := audit.Record(ctx, tx, audit.Entry{Action: "allocation.auto_release", Target: s.Target(a),
			Details: map[string]any{"reason": reason, "attempt": a.ReleaseAttempt}}); err != nil {
			return 0, err
		}
	}
	return len(ids), nil
}
