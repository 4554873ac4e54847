// Package inventory keeps the nodes the platform rents out: each bound to the
// provisioner instance that manages it and to a SKU, moving through the node
// lifecycle of DESIGN.md §5. Nodes come in through an admin (Register, which
// asks the driver to Enroll), a backend webhook (HandleWebhook) or the
// reconciling poll of a backend (Reconcile).
package inventory

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
	"github.com/gpuaas/gpuaas/core/internal/rid"
	"github.com/gpuaas/gpuaas/core/internal/store"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
)

// Error codes.
const (
	CodeNodeNotFound      errcode.Code = "node_not_found"
	CodeNodeExists        errcode.Code = "node_exists"
	CodeNodeBusy          errcode.Code = "node_busy"
	CodeInvalidTransition errcode.Code = "invalid_node_transition"
	// CodeProvisionerRejected: the driver refused the request (bad argument,
	// wrong backend state).
	CodeProvisionerRejected errcode.Code = "provisioner_rejected"
	// CodeProvisionerFailed: the driver or its backend failed or is away.
	CodeProvisionerFailed errcode.Code = "provisioner_failed"
	// CodeWebhookInvalid: a backend webhook failed verification.
	CodeWebhookInvalid errcode.Code = "node_webhook_invalid"
)

// Codes lists this package's codes for the contract test.
func Codes() []errcode.Code {
	return []errcode.Code{CodeNodeNotFound, CodeNodeExists, CodeNodeBusy, CodeInvalidTransition,
		CodeProvisionerRejected, CodeProvisionerFailed, CodeWebhookInvalid}
}

// State is where a node stands.
type State string

// Node states.
const (
	Enrolling State = "enrolling"
	Available State = "available"
	Allocated State = "allocated"
	Cleaning  State = "cleaning"
	Offline   State = "offline"
	Retired   State = "retired"
)

// States lists every state.
func States() []State { return []State{Enrolling, Available, Allocated, Cleaning, Offline, Retired} }

// transitions are the node lifecycle's edges; offline and retired are reachable
// from every other state and handled apart.
var transitions = map[State][]State{
	Enrolling: {Available},
	Available: {Allocated},
	Allocated: {Cleaning, Available},
	Cleaning:  {Available},
}

// CanMove reports whether from → to is a lifecycle edge.
func CanMove(from, to State) bool {
	switch {
	case from == Retired:
		return false
	case to == Retired:
		return true
	case to == Offline:
		return from != Offline
	case from == Offline:
		return to != Offline
	}
	return slices.Contains(transitions[from], to)
}

// GPU is one kind of GPU in a node.
type GPU struct {
	Model       string `json:"model"`
	Count       int    `json:"count"`
	MemoryBytes uint64 `json:"memory_bytes,omitempty"`
}

// Facts is what a node has, as its driver reported it.
type Facts struct {
	GPUs        []GPU  `json:"gpus"`
	CPUModel    string `json:"cpu_model,omitempty"`
	CPUCores    int    `json:"cpu_cores"`
	MemoryBytes uint64 `json:"memory_bytes"`
	DiskBytes   uint64 `json:"disk_bytes"`
}

// GPUCount is the number of GPUs of every kind.
func (f Facts) GPUCount() int {
	n := 0
	for _, g := range f.GPUs {
		n += g.Count
	}
	return n
}

func factsOf(nf provisioner.NodeFacts) Facts {
	f := Facts{GPUs: []GPU{}, CPUModel: nf.CPU.Model, CPUCores: nf.CPU.Cores, MemoryBytes: nf.MemoryBytes, DiskBytes: nf.DiskBytes}
	for _, g := range nf.GPUs {
		f.GPUs = append(f.GPUs, GPU{Model: g.Model, Count: g.Count, MemoryBytes: g.MemoryBytes})
	}
	return f
}

// Node is one machine of the inventory.
type Node struct {
	ID          uuid.UUID
	Instance    string
	ExternalID  string
	Hostname    string
	SSHPort     int    // where the core reaches the node's sshd (the browser terminal)
	SKU         string // "" until assigned
	State       State
	StateReason string
	OfflineFrom State // the state an offline node returns to
	Facts       Facts
	Pool        string
	Tags        []string
	Healthy     *bool
	HealthMsg   string
	ProbedAt    *time.Time
	// HeartbeatAt and AgentFacts come from the node's agent, when it has one.
	HeartbeatAt *time.Time
	AgentFacts  map[string]any
	CreatedAt   time.Time
	UpdatedAt   time.Time
}

// Provisioners resolves provisioner drivers by instance name.
type Provisioners interface {
	Provisioner(ctx context.Context, instance string) (provisioner.Driver, error)
}

// Service keeps the inventory.
type Service struct {
	pool    *pgxpool.Pool
	ids     rid.Builder
	drivers Provisioners
	log     hclog.Logger
	now     func() time.Time
}

// NewService returns a Service.
func NewService(pool *pgxpool.Pool, region string, drivers Provisioners, log hclog.Logger) *Service {
	return &Service{pool: pool, ids: rid.Builder{Region: region}, drivers: drivers, log: log, now: time.Now}
}

// Target is a node's canonical id.
func (s *Service) Target(id uuid.UUID) rid.ID { return s.ids.Platform("node", id.String()) }

const columns = `id, provisioner_instance, external_id, hostname, ssh_port, coalesce(sku_id, ''), state, state_reason, coalesce(offline_from, ''),
	facts, pool, tags, healthy, health_message, probed_at, heartbeat_at, agent_facts, created_at, updated_at`

func scan(row pgx.Row) (*Node, error) {
	n := &Node{}
	var offlineFrom string
	err := row.Scan(&n.ID, &n.Instance, &n.ExternalID, &n.Hostname, &n.SSHPort, &n.SKU, &n.State, &n.StateReason, &offlineFrom,
		&n.Facts, &n.Pool, &n.Tags, &n.Healthy, &n.HealthMsg, &n.ProbedAt, &n.HeartbeatAt, &n.AgentFacts, &n.CreatedAt, &n.UpdatedAt)
	n.OfflineFrom = State(offlineFrom)
	if n.Facts.GPUs == nil {
		n.Facts.GPUs = []GPU{}
	}
	return n, err
}

func notFound(id uuid.UUID) error { return errcode.New(CodeNodeNotFound, "no node %s", id) }

// Get returns a node.
func (s *Service) Get(ctx context.Context, id uuid.UUID) (*Node, error) {
	n, err := scan(s.pool.QueryRow(ctx, `SELECT `+columns+` FROM nodes WHERE id = $1`, id))
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, notFound(id)
	}
	if err != nil {
		return nil, fmt.Errorf("inventory: get: %w", err)
	}
	return n, nil
}

// Lock reads a node inside tx and locks its row.
func Lock(ctx context.Context, tx pgx.Tx, id uuid.UUID) (*Node, error) {
	n, err := scan(tx.QueryRow(ctx, `SELECT `+columns+` FROM nodes WHERE id = $1 FOR UPDATE`, id))
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, notFound(id)
	}
	return n, err
}

// Filter selects nodes for List.
type Filter struct {
	State    State
	SKU      string
	Instance string
	After    uuid.UUID
	Limit    int
}

// List returns nodes by id after the cursor, up to Limit+1.
func (s *Service) List(ctx context.Context, f Filter) ([]*Node, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+columns+` FROM nodes
		WHERE ($1 = '' OR state = $1) AND ($2 = '' OR sku_id = $2) AND ($3 = '' OR provisioner_instance = $3) AND id > $4
		ORDER BY id LIMIT $5`, string(f.State), f.SKU, f.Instance, f.After, f.Limit+1)
	if err != nil {
		return nil, fmt.Errorf("inventory: list: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (*Node, error) { return scan(r) })
}

// Capacity is the free count of one active SKU.
type Capacity struct {
	SKU       string
	GPUModel  string
	GPUs      int
	Available int
	Total     int
}

// Capacity counts the free and the rentable nodes of every active SKU.
func (s *Service) Capacity(ctx context.Context) ([]Capacity, error) {
	rows, err := s.pool.Query(ctx, `SELECT k.id, k.gpu_model, k.gpus_per_node,
			count(n.id) FILTER (WHERE n.state = 'available'),
			count(n.id) FILTER (WHERE n.state IN ('available', 'allocated', 'cleaning'))
		FROM skus k LEFT JOIN nodes n ON n.sku_id = k.id
		WHERE k.active GROUP BY k.id ORDER BY k.id`)
	if err != nil {
		return nil, fmt.Errorf("inventory: capacity: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (Capacity, error) {
		var c Capacity
		return c, r.Scan(&c.SKU, &c.GPUModel, &c.GPUs, &c.Available, &c.Total)
	})
}

// NodeChanged is the payload of nodes.state_changed.
type NodeChanged struct {
	NodeID   uuid.UUID `json:"node_id"`
	Instance string    `json:"provisioner_instance"`
	SKU      string    `json:"sku_id,omitempty"`
	From     State     `json:"from"`
	To       State     `json:"to"`
	Reason   string    `json:"reason,omitempty"`
}

// AwaitingAgent is the reason of a node that waits for its agent's first
// enrollment.
const AwaitingAgent = "waiting for the node agent to enroll"

// AgentEnrolled moves n (locked in tx) from enrolling to available once its
// agent has enrolled, when it has a SKU; other states are left as they are.
func AgentEnrolled(ctx context.Context, tx pgx.Tx, n *Node) error {
	if n.State != Enrolling {
		return nil
	}
	if n.SKU == "" {
		_, err := tx.Exec(ctx, `UPDATE nodes SET state_reason = 'no active SKU matches the node; assign one' WHERE id = $1`, n.ID)
		return err
	}
	return Move(ctx, tx, n, Available, "the node agent enrolled")
}

// Move changes a locked node's state inside tx, announcing it and, for an
// actor's change, auditing it. Moving to offline remembers where the node was;
// leaving offline is done with Recover. An illegal move writes nothing.
func Move(ctx context.Context, tx pgx.Tx, n *Node, to State, reason string) error {
	if n.State == to {
		return nil
	}
	if !CanMove(n.State, to) || (n.State == Offline && to != Retired) {
		return errcode.New(CodeInvalidTransition, "node %s cannot go from %s to %s", n.ID, n.State, to)
	}
	if to != Enrolling && to != Offline && to != Retired && n.SKU == "" {
		return errcode.New(CodeInvalidTransition, "node %s has no SKU", n.ID)
	}
	var offlineFrom *string
	if to == Offline {
		f := string(n.State)
		offlineFrom = &f
	}
	if _, err := tx.Exec(ctx, `UPDATE nodes SET state = $2, state_reason = $3, offline_from = $4, updated_at = now() WHERE id = $1`,
		n.ID, to, truncate(reason), offlineFrom); err != nil {
		return fmt.Errorf("inventory: move %s: %w", n.ID, err)
	}
	from := n.State
	n.State, n.StateReason = to, reason
	if to == Offline {
		n.OfflineFrom = from
	} else {
		n.OfflineFrom = ""
	}
	_, err := events.Enqueue(ctx, tx, events.Event{Subject: events.SubjectNodesStateChanged,
		Payload: NodeChanged{NodeID: n.ID, Instance: n.Instance, SKU: n.SKU, From: from, To: to, Reason: reason}})
	return err
}

// Recover brings a locked offline node back to the state it left.
func Recover(ctx context.Context, tx pgx.Tx, n *Node, reason string) error {
	if n.State != Offline {
		return nil
	}
	to := n.OfflineFrom
	if to == "" || (to != Enrolling && n.SKU == "") {
		to = Enrolling
	}
	if _, err := tx.Exec(ctx, `UPDATE nodes SET state = $2, state_reason = $3, offline_from = NULL, updated_at = now() WHERE id = $1`,
		n.ID, to, truncate(reason)); err != nil {
		return fmt.Errorf("inventory: recover %s: %w", n.ID, err)
	}
	n.State, n.StateReason, n.OfflineFrom = to, reason, ""
	_, err := events.Enqueue(ctx, tx, events.Event{Subject: events.SubjectNodesStateChanged,
		Payload: NodeChanged{NodeID: n.ID, Instance: n.Instance, SKU: n.SKU, From: Offline, To: to, Reason: reason}})
	return err
}

func truncate(s string) string {
	if len(s) > 500 {
		return s[:500]
	}
	return s
}

var (
	instanceRE = regexp.MustCompile(`^[a-z][a-z0-9-]{0,62}$`)
	tagRE      = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:=/-]{0,62}$`)
)

func invalid(field, format string, args ...any) error {
	return errcode.New(errcode.ValidationFailed, format, args...).WithDetails("field", field)
}

// RegisterRequest brings a node in by hand.
type RegisterRequest struct {
	Instance   string
	ExternalID string // the driver's node id or address
	SKU        string // optional: matched from the facts when empty
	Pool       string
	Tags       []string
}

func (r *RegisterRequest) validate() error {
	switch {
	case !instanceRE.MatchString(r.Instance):
		return invalid("provisioner_instance", "provisioner_instance must name a plugin instance")
	case r.ExternalID == "" || len(r.ExternalID) > 255 || strings.ContainsFunc(r.ExternalID, func(c rune) bool { return c < 0x21 || c == 0x7f }):
		return invalid("external_id", "external_id must be 1-255 printable characters without spaces")
	case len(r.Pool) > 100:
		return invalid("pool", "pool must be at most 100 characters")
	case len(r.Tags) > 32:
		return invalid("tags", "at most 32 tags")
	}
	for _, t := range r.Tags {
		if !tagRE.MatchString(t) {
			return invalid("tags", "tag %q must be 1-63 letters, digits or ._:=/-", t)
		}
	}
	return nil
}

// Register enrolls a node through its provisioner instance and adds it: available
// when it has a SKU (given, or matched from its facts), else enrolling. Nothing
// is written when the driver refuses.
func (s *Service) Register(ctx context.Context, req RegisterRequest) (*Node, error) {
	if err := req.validate(); err != nil {
		return nil, err
	}
	if req.SKU != "" {
		if err := s.activeSKU(ctx, req.SKU); err != nil {
			return nil, err
		}
	}
	var exists bool
	if err := s.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM nodes WHERE provisioner_instance = $1 AND external_id = $2)`,
		req.Instance, req.ExternalID).Scan(&exists); err != nil {
		return nil, fmt.Errorf("inventory: register: %w", err)
	}
	if exists {
		return nil, errcode.New(CodeNodeExists, "instance %s already has node %q", req.Instance, req.ExternalID).WithDetails("field", "external_id")
	}
	drv, err := s.drivers.Provisioner(ctx, req.Instance)
	if err != nil {
		return nil, err
	}
	id := uuid.Must(uuid.NewV7())
	enr, err := drv.Enroll(ctx, &provisioner.EnrollRequest{OperationID: "enroll-" + id.String(), NodeID: req.ExternalID,
		Address: req.ExternalID, Pool: req.Pool, Tags: req.Tags})
	if err != nil {
		return nil, DriverError("enroll", err)
	}
	if enr.Facts.NodeID != "" {
		req.ExternalID = enr.Facts.NodeID
	}
	var out *Node
	err = store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		n, err := s.upsert(ctx, tx, req.Instance, enr.Facts, req.SKU, true, enr.AgentRequired)
		if err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `UPDATE nodes SET enrollment_secret_sha256 = CASE WHEN $2 = '' THEN NULL ELSE sha256(convert_to($2, 'UTF8')) END, pool = coalesce(nullif($3, ''), pool),
			tags = CASE WHEN cardinality($4::text[]) > 0 THEN $4 ELSE tags END WHERE id = $1`, n.ID, enr.Secret, req.Pool, req.Tags); err != nil {
			return err
		}
		out = n
		return audit.Record(ctx, tx, audit.Entry{Action: "node.register", Target: s.Target(n.ID),
			Details: map[string]any{"provisioner_instance": req.Instance, "external_id": req.ExternalID, "sku_id": n.SKU, "state": string(n.State)}})
	})
	if err != nil {
		return nil, fmt.Errorf("inventory: register: %w", err)
	}
	return s.Get(ctx, out.ID)
}

func (s *Service) activeSKU(ctx context.Context, sku string) error {
	var active bool
	err := s.pool.QueryRow(ctx, `SELECT active FROM skus WHERE id = $1`, sku).Scan(&active)
	if errors.Is(err, pgx.ErrNoRows) {
		return errcode.New(catalog.CodeSKUNotFound, "no SKU %q", sku).WithDetails("field", "sku_id")
	}
	return err
}

// upsert records facts of a node of instance inside tx: a new node is added
// (exclusive: an existing one is a conflict), a known one updated; a node
// without a SKU gets sku (or one matched from its facts) and becomes available;
// an offline node recovers. A node whose driver serves it through its agent
// (agentRequired) stays enrolling until the agent enrolls (agents.Enroll).
func (s *Service) upsert(ctx context.Context, tx pgx.Tx, instance string, nf provisioner.NodeFacts, sku string, exclusive, agentRequired bool) (*Node, error) {
	facts := factsOf(nf)
	tags := nf.Tags
	if tags == nil {
		tags = []string{}
	}
	n, err := scan(tx.QueryRow(ctx, `SELECT `+columns+` FROM nodes WHERE provisioner_instance = $1 AND external_id = $2 FOR UPDATE`, instance, nf.NodeID))
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		n = &Node{ID: uuid.Must(uuid.NewV7()), Instance: instance, ExternalID: nf.NodeID, State: Enrolling}
		if _, err := tx.Exec(ctx, `INSERT INTO nodes (id, provisioner_instance, external_id, hostname, state, facts, pool, tags)
			VALUES ($1, $2, $3, $4, 'enrolling', $5, $6, $7)`, n.ID, instance, nf.NodeID, nf.Hostname, facts, nf.Pool, tags); err != nil {
			if store.IsUniqueViolation(err, "") {
				return nil, errcode.New(CodeNodeExists, "instance %s already has node %q", instance, nf.NodeID)
			}
			return nil, err
		}
		if _, err := events.Enqueue(ctx, tx, events.Event{Subject: events.SubjectNodesStateChanged,
			Payload: NodeChanged{NodeID: n.ID, Instance: instance, To: Enrolling, Reason: "discovered"}}); err != nil {
			return nil, err
		}
	case err != nil:
		return nil, err
	case exclusive:
		return nil, errcode.New(CodeNodeExists, "instance %s already has node %q", instance, nf.NodeID)
	default:
		if _, err := tx.Exec(ctx, `UPDATE nodes SET hostname = coalesce(nullif($2, ''), hostname), facts = $3, pool = coalesce(nullif($4, ''), pool),
			tags = $5, updated_at = now() WHERE id = $1`, n.ID, nf.Hostname, facts, nf.Pool, tags); err != nil {
			return nil, err
		}
	}
	n.Facts, n.Hostname = facts, nf.Hostname
	if n.State == Retired {
		return n, nil
	}
	if n.SKU == "" {
		if sku == "" {
			sku, err = matchSKU(ctx, tx, facts, tags)
			if err != nil {
				return nil, err
			}
		}
		if sku != "" {
			if _, err := tx.Exec(ctx, `UPDATE nodes SET sku_id = $2 WHERE id = $1`, n.ID, sku); err != nil {
				return nil, err
			}
			n.SKU = sku
		}
	}
	if n.State == Offline {
		if err := Recover(ctx, tx, n, "reported by the backend again"); err != nil {
			return nil, err
		}
	}
	if n.State == Enrolling && agentRequired {
		n.StateReason = AwaitingAgent
		_, err := tx.Exec(ctx, `UPDATE nodes SET state_reason = $2 WHERE id = $1`, n.ID, n.StateReason)
		return n, err
	}
	if n.State == Enrolling && n.SKU != "" {
		return n, Move(ctx, tx, n, Available, "enrolled")
	}
	if n.State == Enrolling && n.SKU == "" {
		_, err := tx.Exec(ctx, `UPDATE nodes SET state_reason = 'no active SKU matches the node; assign one' WHERE id = $1`, n.ID)
		return n, err
	}
	return n, nil
}

// matchSKU finds the SKU of a node: a tag "sku:<id>" or "gpuaas-sku=<id>" names
// it; else the active SKU with the node's GPU count whose GPU model's words all
// occur in the node's GPU model (ignoring case and punctuation). Several matches pick the first
// by id; none returns "".
func matchSKU(ctx context.Context, tx pgx.Tx, f Facts, tags []string) (string, error) {
	for _, t := range tags {
		for _, p := range []string{"sku:", "gpuaas-sku="} {
			if id, ok := strings.CutPrefix(t, p); ok {
				var found string
				err := tx.QueryRow(ctx, `SELECT id FROM skus WHERE id = $1 AND active`, id).Scan(&found)
				if err == nil {
					return found, nil
				}
				if !errors.Is(err, pgx.ErrNoRows) {
					return "", err
				}
			}
		}
	}
	if len(f.GPUs) != 1 {
		return "", nil // no GPUs, or a mix: an admin decides
	}
	rows, err := tx.Query(ctx, `SELECT id, gpu_model FROM skus WHERE active AND gpus_per_node = $1 ORDER BY id`, f.GPUs[0].Count)
	if err != nil {
		return "", err
	}
	type sku struct{ id, model string }
	skus, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (sku, error) {
		var k sku
		return k, r.Scan(&k.id, &k.model)
	})
	if err != nil {
		return "", err
	}
	model := squash(f.GPUs[0].Model)
	for _, k := range skus {
		if modelMatches(model, k.model) {
			return k.id, nil
		}
	}
	return "", nil
}

// modelMatches reports whether every word of a SKU's GPU model ("H100 80GB")
// occurs in a node's squashed GPU model ("nvidiacorporationgh100h100sxm580gb").
func modelMatches(node, sku string) bool {
	words := strings.FieldsFunc(sku, func(r rune) bool { return squash(string(r)) == "" })
	for _, w := range words {
		if !strings.Contains(node, squash(w)) {
			return false
		}
	}
	return len(words) > 0
}

func squash(s string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
			return r
		case r >= 'A' && r <= 'Z':
			return r + 'a' - 'A'
		}
		return -1
	}, s)
}

// Update is a change to a node; nil fields stay as they are.
type Update struct {
	// SKU binds the node to a SKU (only while it holds no allocation); an
	// enrolling node becomes available unless it waits for its agent.
	SKU *string
	// SSHPort is where the core reaches the node's sshd, for the browser
	// terminal; it may change at any time short of retirement.
	SSHPort *int
}

// Update applies u to a node in one transaction, with one node.update audit
// row naming what changed.
func (s *Service) Update(ctx context.Context, id uuid.UUID, u Update) (*Node, error) {
	switch {
	case u.SKU == nil && u.SSHPort == nil:
		return nil, errcode.New(errcode.ValidationFailed, "nothing to change: give sku_id, ssh_port or both")
	case u.SSHPort != nil && (*u.SSHPort < 1 || *u.SSHPort > 65535):
		return nil, invalid("ssh_port", "ssh_port must be between 1 and 65535")
	}
	if u.SKU != nil {
		if err := s.activeSKU(ctx, *u.SKU); err != nil {
			return nil, err
		}
	}
	err := store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		n, err := Lock(ctx, tx, id)
		if err != nil {
			return err
		}
		if n.State == Retired {
			return errcode.New(CodeNodeBusy, "node %s is retired", id)
		}
		details := map[string]any{}
		if u.SKU != nil {
			if n.State == Allocated || n.State == Cleaning || (n.State == Offline && n.OfflineFrom != Available && n.OfflineFrom != Enrolling) {
				return errcode.New(CodeNodeBusy, "node %s is %s; change its SKU when it is idle", id, n.State)
			}
			details["sku_from"], details["sku_to"] = n.SKU, *u.SKU
			n.SKU = *u.SKU
		}
		if u.SSHPort != nil {
			details["ssh_port_from"], details["ssh_port_to"] = n.SSHPort, *u.SSHPort
			n.SSHPort = *u.SSHPort
		}
		if _, err := tx.Exec(ctx, `UPDATE nodes SET sku_id = nullif($2, ''), ssh_port = $3, updated_at = now() WHERE id = $1`, id, n.SKU, n.SSHPort); err != nil {
			return err
		}
		if u.SKU != nil && n.State == Enrolling && n.StateReason != AwaitingAgent {
			if err := Move(ctx, tx, n, Available, "SKU assigned"); err != nil {
				return err
			}
		}
		return audit.Record(ctx, tx, audit.Entry{Action: "node.update", Target: s.Target(id), Details: details})
	})
	if err != nil {
		return nil, fmt.Errorf("inventory: update: %w", err)
	}
	return s.Get(ctx, id)
}

// unenrollTimeout bounds the driver's Unenroll while Retire holds the node.
const unenrollTimeout = time.Minute

// Retire takes a node out for good; refused while an allocation holds it.
// It undoes the node's enrollment: the driver's Unenroll (when the driver
// has the capability) removes what Enroll set up in the backend, and in the
// same transaction as the move to retired the certificates issued to the
// node's agent stop being accepted (nodes.agent_revoked_at; the caller
// revokes them at the CA with agents.Service.RevokeCertificates), its unused
// enrollment tokens expire and the driver's enrollment secret is forgotten.
// A driver that fails does not stop the retirement: it is logged and the
// audit row says "driver_unenroll": "failed: ...".
func (s *Service) Retire(ctx context.Context, id uuid.UUID, reason string) (*Node, error) {
	if reason == "" {
		reason = "retired by an admin"
	}
	err := store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		n, err := Lock(ctx, tx, id)
		if err != nil {
			return err
		}
		if n.State == Retired {
			return errcode.New(CodeInvalidTransition, "node %s is already retired", id)
		}
		var held bool
		if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM allocations WHERE node_id = $1 AND state NOT IN ('released', 'failed'))`, id).Scan(&held); err != nil {
			return err
		}
		if held || n.State == Allocated || n.State == Cleaning || (n.State == Offline && (n.OfflineFrom == Allocated || n.OfflineFrom == Cleaning)) {
			return errcode.New(CodeNodeBusy, "node %s is in use (%s); release its allocation first", id, n.State)
		}
		// The row stays locked while the driver works: placement skips
		// locked nodes, so no allocation takes the node meanwhile.
		unenrolled := s.unenroll(ctx, n)
		if err := Move(ctx, tx, n, Retired, reason); err != nil {
			return err
		}
		var hadSecret bool
		var certs int
		if err := tx.QueryRow(ctx, `UPDATE nodes n SET agent_revoked_at = clock_timestamp(), enrollment_secret_sha256 = NULL
			FROM (SELECT enrollment_secret_sha256 IS NOT NULL AS had FROM nodes WHERE id = $1) old
			WHERE n.id = $1
			RETURNING old.had, (SELECT count(*) FROM node_certificates WHERE node_id = $1 AND revoked_at IS NULL AND not_after > now())`, id).
			Scan(&hadSecret, &certs); err != nil {
			return fmt.Errorf("inventory: retire %s: end the agent's credentials: %w", id, err)
		}
		tokens, err := tx.Exec(ctx, `UPDATE node_enrollment_tokens SET expires_at = now()
			WHERE node_id = $1 AND used_at IS NULL AND expires_at > now()`, id)
		if err != nil {
			return fmt.Errorf("inventory: retire %s: expire enrollment tokens: %w", id, err)
		}
		// Its agent can no longer take work, so the tasks still waiting for
		// it end now, with a reason, instead of when they expire; whoever
		// waits on one (a driver polling its operation) learns at once.
		tasks, err := tx.Exec(ctx, `UPDATE node_tasks SET state = 'failed', error = 'the node was retired before the task was done',
				lease_expires_at = NULL, updated_at = now()
			WHERE node_id = $1 AND state IN ('queued', 'leased')`, id)
		if err != nil {
			return fmt.Errorf("inventory: retire %s: end pending tasks: %w", id, err)
		}
		return audit.Record(ctx, tx, audit.Entry{Action: "node.retire", Target: s.Target(id), Details: map[string]any{
			"reason": reason, "provisioner_instance": n.Instance, "driver_unenroll": unenrolled,
			"enrollment_tokens_expired": tokens.RowsAffected(), "enrollment_secret_cleared": hadSecret, "agent_certificates_revoked": certs,
			"tasks_failed": tasks.RowsAffected(),
		}})
	})
	if err != nil {
		return nil, fmt.Errorf("inventory: retire: %w", err)
	}
	return s.Get(ctx, id)
}

// Outcomes of the driver's Unenroll, as the retire's audit row records them.
const (
	unenrollDone        = "done"
	unenrollUnsupported = "unsupported" // the driver has nothing to undo
	unenrollFailed      = "failed: "
)

// unenroll asks n's driver to undo its enrollment, with operation id
// "retire-<node id>" so a retried retirement repeats the same call, and
// reports the outcome; a failure is logged, not returned.
func (s *Service) unenroll(ctx context.Context, n *Node) string {
	log := s.log.With("node_id", n.ID, "provisioner_instance", n.Instance)
	drv, err := s.drivers.Provisioner(ctx, n.Instance)
	if err != nil {
		log.Warn("retiring the node without its driver's unenroll: no driver", "error", err)
		return unenrollFailed + truncate(err.Error())
	}
	u, ok := drv.(provisioner.Unenroller)
	if !ok {
		return unenrollUnsupported
	}
	uctx, cancel := context.WithTimeout(ctx, unenrollTimeout)
	defer cancel()
	err = u.Unenroll(uctx, &provisioner.UnenrollRequest{OperationID: "retire-" + n.ID.String(), NodeID: n.ExternalID})
	switch {
	case err == nil:
		return unenrollDone
	case errors.Is(err, base.ErrUnimplemented):
		return unenrollUnsupported
	}
	err = DriverError("unenroll", err)
	log.Warn("retiring the node although its driver failed to unenroll it; undo the enrollment in the backend by hand", "error", err)
	return unenrollFailed + truncate(err.Error())
}

// Probe asks the node's driver for its health and records it: an unhealthy node
// goes offline, a healthy offline node comes back.
func (s *Service) Probe(ctx context.Context, id uuid.UUID) (*Node, error) {
	n, err := s.Get(ctx, id)
	if err != nil {
		return nil, err
	}
	drv, err := s.drivers.Provisioner(ctx, n.Instance)
	if err != nil {
		return nil, err
	}
	h, err := drv.Probe(ctx, n.ExternalID)
	switch {
	case errors.Is(err, base.ErrNotFound):
		h = &provisioner.Health{Healthy: false, Message: "the backend does not know the node"}
	case err != nil:
		return nil, DriverError("probe", err)
	}
	err = store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		n, err := Lock(ctx, tx, id)
		if err != nil {
			return err
		}
		if err := s.recordHealth(ctx, tx, n, h); err != nil {
			return err
		}
		return audit.Record(ctx, tx, audit.Entry{Action: "node.probe", Target: s.Target(id),
			Details: map[string]any{"healthy": h.Healthy, "message": truncate(h.Message)}})
	})
	if err != nil {
		return nil, fmt.Errorf("inventory: probe: %w", err)
	}
	return s.Get(ctx, id)
}

func (s *Service) recordHealth(ctx context.Context, tx pgx.Tx, n *Node, h *provisioner.Health) error {
	if _, err := tx.Exec(ctx, `UPDATE nodes SET healthy = $2, health_message = $3, probed_at = now() WHERE id = $1`, n.ID, h.Healthy, truncate(h.Message)); err != nil {
		return err
	}
	switch {
	case n.State == Retired:
		return nil
	case !h.Healthy && n.State != Offline:
		return Move(ctx, tx, n, Offline, "unhealthy: "+h.Message)
	case h.Healthy && n.State == Offline:
		return Recover(ctx, tx, n, "healthy again")
	}
	return nil
}

// DriverError maps a driver error to the API's: a refusal is 409
// provisioner_rejected, anything else 502 provisioner_failed; both carry the
// driver's message.
func DriverError(op string, err error) error {
	if errcode.As(err) != nil {
		return err // already the host's (instance not found, disabled, failed...)
	}
	switch {
	case errors.Is(err, base.ErrInvalidArgument), errors.Is(err, base.ErrFailedPrecondition), errors.Is(err, base.ErrConflict),
		errors.Is(err, base.ErrNotFound), errors.Is(err, base.ErrPermissionDenied):
		return errcode.New(CodeProvisionerRejected, "the provisioner refused %s: %s", op, err)
	}
	return errcode.New(CodeProvisionerFailed, "the provisioner failed %s: %s", op, err)
}
