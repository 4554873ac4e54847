// Package agents is the core's side of the node agent protocol (api/agent/v1):
// enrollment tokens, certificates signed from the agent's CSR by the PKI
// backend, heartbeats that keep a node online, and the queue of signed tasks
// agents lease by long poll and answer with results.
package agents

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/gpuaas/gpuaas/agent/protocol"
	"github.com/gpuaas/gpuaas/core/internal/audit"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/inventory"
	"github.com/gpuaas/gpuaas/core/internal/pki"
	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/rid"
	"github.com/gpuaas/gpuaas/core/internal/store"
)

// Error codes.
const (
	CodeTokenInvalid  errcode.Code = "enrollment_token_invalid"
	CodeTaskNotFound  errcode.Code = "node_task_not_found"
	CodeTaskConflict  errcode.Code = "node_task_conflict"
	CodeCSRInvalid    errcode.Code = "csr_invalid"
	CodeNotEnrollable errcode.Code = "node_not_enrollable"
)

// Codes lists this package's codes.
func Codes() []errcode.Code {
	return []errcode.Code{CodeTokenInvalid, CodeTaskNotFound, CodeTaskConflict, CodeCSRInvalid, CodeNotEnrollable}
}

// TaskKey is the name of the signing key tasks are signed with.
const TaskKey = "agent-tasks"

// Settings tune the service; zero values take the defaults.
type Settings struct {
	CertTTL           time.Duration // agent certificate lifetime (default 24h)
	Lease             time.Duration // how long a leased task waits for its result (default 5m)
	HeartbeatInterval time.Duration // what agents are told (default 15s)
	MissedHeartbeats  int           // missed intervals before a node goes offline (default 4)
	// SSHCA is the CA whose user certificates the nodes' sshd trusts (the
	// browser terminal's); nil hands agents no SSH trust.
	SSHCA pki.SSHCA
	// MinTaskKeyVersion is the lowest task key version still in use
	// (policy agents.min_task_key_version); nil is 0.
	MinTaskKeyVersion func(context.Context) int
}

func (s Settings) withDefaults() Settings {
	if s.CertTTL == 0 {
		s.CertTTL = 24 * time.Hour
	}
	if s.Lease == 0 {
		s.Lease = 5 * time.Minute
	}
	if s.HeartbeatInterval == 0 {
		s.HeartbeatInterval = 15 * time.Second
	}
	if s.MissedHeartbeats == 0 {
		s.MissedHeartbeats = 4
	}
	return s
}

// Service runs the agent side of the core.
type Service struct {
	pool   *pgxpool.Pool
	ca     pki.CA
	signer pki.Signer
	ids    rid.Builder
	set    Settings
	log    hclog.Logger
	wake   *waker

	// What every heartbeat hands out, read from the PKI backend (files or
	// Vault) at most once per keyCacheFor.
	sshKeys  cached[[]string]
	taskKeys cached[map[int]ed25519.PublicKey]
}

// keyCacheFor is how long public keys read from the backend are reused: a
// rotation reaches the nodes within this (a task signed with a version the
// cache lacks drops it at once).
const keyCacheFor = time.Minute

// cached is a value loaded at most once per keyCacheFor.
type cached[T any] struct {
	mu sync.Mutex
	v  T
	at time.Time
}

func (c *cached[T]) get(load func() (T, error)) (T, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.at.IsZero() && time.Since(c.at) < keyCacheFor {
		return c.v, nil
	}
	v, err := load()
	if err != nil {
		return v, err
	}
	c.v, c.at = v, time.Now()
	return v, nil
}

func (c *cached[T]) drop() {
	c.mu.Lock()
	c.at = time.Time{}
	c.mu.Unlock()
}

// sawTaskKeyVersion drops the cached task keys when they lack v: the key
// rotated, and the next heartbeat hands out the new version.
func (s *Service) sawTaskKeyVersion(v int) {
	c := &s.taskKeys
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.v[v]; !ok {
		c.at = time.Time{}
	}
}

// SSHUserCAKeys are the CA keys (authorized_keys lines) the nodes' sshd
// trusts for tenant certificates; empty without an SSH CA.
func (s *Service) SSHUserCAKeys(ctx context.Context) ([]string, error) {
	if s.set.SSHCA == nil {
		return nil, nil
	}
	return s.sshKeys.get(func() ([]string, error) {
		k, err := s.set.SSHCA.SSHCAPublicKey(ctx)
		if err != nil {
			return nil, fmt.Errorf("agents: SSH CA key: %w", err)
		}
		return []string{strings.TrimSpace(string(k))}, nil
	})
}

// NewService returns a Service; Run must run for long polls to wake at once.
func NewService(pool *pgxpool.Pool, ca pki.CA, signer pki.Signer, region string, set Settings, log hclog.Logger) *Service {
	return &Service{pool: pool, ca: ca, signer: signer, ids: rid.Builder{Region: region}, set: set.withDefaults(), log: log, wake: newWaker()}
}

func hashToken(t string) []byte {
	h := sha256.Sum256([]byte(t))
	return h[:]
}

// MintToken makes a single-use enrollment token for a node, valid for ttl.
// Only its hash is stored; the token is shown once.
func (s *Service) MintToken(ctx context.Context, nodeID uuid.UUID, ttl time.Duration) (string, time.Time, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", time.Time{}, err
	}
	token := "gpe_" + base64.RawURLEncoding.EncodeToString(b)
	var expires time.Time
	err := store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		n, err := inventory.Lock(ctx, tx, nodeID)
		if err != nil {
			return err
		}
		if n.State == inventory.Retired {
			return errcode.New(CodeNotEnrollable, "node %s is retired", nodeID)
		}
		if err := tx.QueryRow(ctx, `INSERT INTO node_enrollment_tokens (token_sha256, node_id, created_by, expires_at)
			VALUES ($1, $2, $3, now() + $4::interval) RETURNING expires_at`, hashToken(token), nodeID, actor(ctx), ttl).Scan(&expires); err != nil {
			return err
		}
		return audit.Record(ctx, tx, audit.Entry{Action: "node.enrollment_token", Target: s.ids.Platform("node", nodeID.String()),
			Details: map[string]any{"expires_at": expires}})
	})
	return token, expires, err
}

func actor(ctx context.Context) string {
	if p := principal.From(ctx); p != nil {
		return p.Actor()
	}
	return "system"
}

// Enroll consumes a token (atomically: a token works once) and signs the
// agent's CSR for the token's node.
func (s *Service) Enroll(ctx context.Context, token, csrPEM string) (*protocol.Certificate, error) {
	if len(token) < 16 {
		return nil, errcode.New(CodeTokenInvalid, "the enrollment token is unknown, used or expired")
	}
	var nodeID uuid.UUID
	var cert pki.Certificate
	err := store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		err := tx.QueryRow(ctx, `UPDATE node_enrollment_tokens SET used_at = now()
			WHERE token_sha256 = $1 AND used_at IS NULL AND expires_at > now() RETURNING node_id`, hashToken(token)).Scan(&nodeID)
		if errors.Is(err, pgx.ErrNoRows) {
			// The secret a provisioner driver's Enroll returned for the node
			// (the core keeps its hash) works once too.
			err = tx.QueryRow(ctx, `UPDATE nodes SET enrollment_secret_sha256 = NULL
				WHERE enrollment_secret_sha256 = $1 AND state <> 'retired' RETURNING id`, hashToken(token)).Scan(&nodeID)
		}
		if errors.Is(err, pgx.ErrNoRows) {
			return errcode.New(CodeTokenInvalid, "the enrollment token is unknown, used or expired")
		}
		if err != nil {
			return err
		}
		n, err := inventory.Lock(ctx, tx, nodeID)
		if err != nil {
			return err
		}
		if n.State == inventory.Retired {
			// Retiring expires the node's tokens; this also covers a token
			// whose check raced with the retirement.
			return errcode.New(CodeTokenInvalid, "the enrollment token is unknown, used or expired")
		}
		if cert, err = s.sign(ctx, tx, nodeID, csrPEM); err != nil {
			return err
		}
		if err := inventory.AgentEnrolled(ctx, tx, n); err != nil {
			return err
		}
		return audit.Record(ctx, tx, audit.Entry{Action: "node.enroll", Target: s.ids.Platform("node", nodeID.String()),
			Details: map[string]any{"serial": cert.Serial, "not_after": cert.NotAfter}})
	})
	if err != nil {
		if errcode.Of(err) == CodeTokenInvalid {
			if aerr := audit.Record(ctx, s.pool, audit.Entry{Action: "node.enroll", Target: s.ids.Platform("node", "unknown"), Result: audit.Denied}); aerr != nil {
				s.log.Warn("audit of a refused enrollment failed", "error", aerr)
			}
		}
		return nil, err
	}
	return s.certificate(ctx, nodeID, cert)
}

// Renew signs a new CSR for a node that proved itself with its current
// certificate.
func (s *Service) Renew(ctx context.Context, nodeID uuid.UUID, presented, csrPEM string) (*protocol.Certificate, error) {
	var cert pki.Certificate
	err := store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		// The presented certificate again, with the node's row held: a
		// revocation (which updates that row) either waits for this renewal,
		// and then refuses the new certificate too, or came first and
		// refuses this renewal. Without the lock a renewal that passed the
		// check just before a revocation would hand out a valid certificate.
		var nodeRevoked, issued, certRevoked *time.Time
		err := tx.QueryRow(ctx, `SELECT n.agent_revoked_at, c.issued_at, c.revoked_at FROM nodes n
			LEFT JOIN node_certificates c ON c.serial = $2 AND c.node_id = n.id WHERE n.id = $1 FOR SHARE OF n`, nodeID, presented).
			Scan(&nodeRevoked, &issued, &certRevoked)
		if errors.Is(err, pgx.ErrNoRows) {
			return errcode.New(errcode.Forbidden, "the node is unknown or retired")
		}
		if err != nil {
			return err
		}
		if issued == nil || certRevoked != nil || (nodeRevoked != nil && !issued.After(*nodeRevoked)) {
			return errcode.New(errcode.Unauthenticated, "the client certificate is revoked")
		}
		if cert, err = s.sign(ctx, tx, nodeID, csrPEM); err != nil {
			return err
		}
		return audit.Record(ctx, tx, audit.Entry{Action: "node.certificate_renew", Target: s.ids.Platform("node", nodeID.String()),
			Details: map[string]any{"serial": cert.Serial, "not_after": cert.NotAfter}})
	})
	if err != nil {
		return nil, err
	}
	return s.certificate(ctx, nodeID, cert)
}

func (s *Service) sign(ctx context.Context, tx pgx.Tx, nodeID uuid.UUID, csrPEM string) (pki.Certificate, error) {
	cert, err := s.ca.SignCSR(ctx, []byte(csrPEM), nodeID.String(), s.set.CertTTL)
	if errors.Is(err, pki.ErrInvalid) {
		return cert, errcode.New(CodeCSRInvalid, "%s", err)
	}
	if err != nil {
		return cert, err
	}
	_, err = tx.Exec(ctx, `INSERT INTO node_certificates (serial, node_id, not_after, issued_at) VALUES ($1, $2, $3, clock_timestamp())`, cert.Serial, nodeID, cert.NotAfter)
	return cert, err
}

func (s *Service) certificate(ctx context.Context, nodeID uuid.UUID, cert pki.Certificate) (*protocol.Certificate, error) {
	chain, err := s.ca.CAChain(ctx)
	if err != nil {
		return nil, err
	}
	keys, err := s.TaskKeys(ctx)
	if err != nil {
		return nil, err
	}
	ssh, err := s.SSHUserCAKeys(ctx)
	if err != nil {
		return nil, err
	}
	return &protocol.Certificate{NodeID: nodeID.String(), CertPEM: string(cert.PEM), CAChainPEM: string(chain), NotAfter: cert.NotAfter,
		TaskKeys: keys, SSHUserCAKeys: ssh, MinTaskKeyVersion: s.minKeyVersion(ctx)}, nil
}

// TaskKeys are the public keys agents verify tasks with, by version: those
// not retired (MinTaskKeyVersion).
func (s *Service) TaskKeys(ctx context.Context) (map[int]ed25519.PublicKey, error) {
	load := func() (map[int]ed25519.PublicKey, error) { return s.readTaskKeys(ctx) }
	minV := s.minKeyVersion(ctx)
	keys := map[int]ed25519.PublicKey{}
	for range 2 { // a minimum above every cached version: the key rotated since
		all, err := s.taskKeys.get(load)
		if err != nil {
			return nil, err
		}
		for v, k := range all {
			if v >= minV {
				keys[v] = k
			}
		}
		if len(keys) > 0 {
			break
		}
		s.taskKeys.drop()
	}
	return keys, nil
}

// TaskKeyVersions are the task key's versions: every one the backend
// has, the latest (which signs), and the policy's minimum (below it agents
// refuse tasks).
type TaskKeyVersions struct {
	Versions []int
	Latest   int
	Min      int
}

// readTaskKeys reads every version of the task key from the PKI backend
// (creating the key the first time).
func (s *Service) readTaskKeys(ctx context.Context) (map[int]ed25519.PublicKey, error) {
	if err := s.signer.EnsureKey(ctx, TaskKey); err != nil {
		return nil, fmt.Errorf("agents: task key: %w", err)
	}
	all, err := s.signer.PublicKeys(ctx, TaskKey)
	if err != nil {
		return nil, fmt.Errorf("agents: task key: %w", err)
	}
	return all, nil
}

// TaskKeyVersions reads the task key's versions from the PKI backend.
func (s *Service) TaskKeyVersions(ctx context.Context) (*TaskKeyVersions, error) {
	all, err := s.readTaskKeys(ctx)
	if err != nil {
		return nil, err
	}
	out := &TaskKeyVersions{Versions: slices.Sorted(maps.Keys(all)), Min: s.minKeyVersion(ctx)}
	if len(out.Versions) > 0 {
		out.Latest = out.Versions[len(out.Versions)-1]
	}
	return out, nil
}

// RotateTaskKey adds a version to the task key, which signs every task from
// then on; older versions keep verifying until the policy's minimum
// (agents.min_task_key_version) passes them. Heartbeats hand the new public
// key out at once, and an agent given a task of a version it does not know
// yet asks for it before refusing the task.
func (s *Service) RotateTaskKey(ctx context.Context) (*TaskKeyVersions, error) {
	if err := s.signer.EnsureKey(ctx, TaskKey); err != nil {
		return nil, fmt.Errorf("agents: rotate task key: %w", err)
	}
	v, err := s.signer.Rotate(ctx, TaskKey)
	if err != nil {
		return nil, fmt.Errorf("agents: rotate task key: %w", err)
	}
	s.taskKeys.drop()
	out, err := s.TaskKeyVersions(ctx)
	if err != nil {
		return nil, err
	}
	if err := audit.Record(ctx, s.pool, audit.Entry{Action: "agent.task_key.rotate", Target: s.ids.Platform("signing-key", TaskKey),
		Details: map[string]any{"key_version": v, "min_key_version": out.Min}}); err != nil {
		return nil, err
	}
	return out, nil
}

func (s *Service) minKeyVersion(ctx context.Context) int {
	if s.set.MinTaskKeyVersion == nil {
		return 0
	}
	return s.set.MinTaskKeyVersion(ctx)
}

// RevokeNode revokes every certificate issued to a node (for example when
// it is compromised) and audits it.
func (s *Service) RevokeNode(ctx context.Context, nodeID uuid.UUID) (int, error) {
	n, err := s.RevokeCertificates(ctx, nodeID)
	if err != nil {
		return 0, err
	}
	return n, audit.Record(ctx, s.pool, audit.Entry{Action: "node.certificates_revoke", Target: s.ids.Platform("node", nodeID.String()),
		Details: map[string]any{"revoked": n}})
}

// RevokeCertificates revokes every certificate issued to a node, in the
// database and at the CA, and reports how many were live; it writes no
// audit row (RevokeNode does; retiring a node audits it with the
// retirement).
func (s *Service) RevokeCertificates(ctx context.Context, nodeID uuid.UUID) (int, error) {
	// From now on every certificate issued so far is refused, including one
	// a renewal racing with this gets: the node's row is locked first (a
	// renewal holds it while it signs), and the time taken after.
	var serials []string
	err := store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT 1 FROM nodes WHERE id = $1 FOR UPDATE`, nodeID); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `UPDATE nodes SET agent_revoked_at = clock_timestamp() WHERE id = $1`, nodeID); err != nil {
			return err
		}
		rows, err := tx.Query(ctx, `SELECT serial FROM node_certificates WHERE node_id = $1 AND revoked_at IS NULL AND not_after > now()`, nodeID)
		if err != nil {
			return err
		}
		serials, err = pgx.CollectRows(rows, pgx.RowTo[string])
		return err
	})
	if err != nil {
		return 0, err
	}
	for _, serial := range serials {
		if err := s.ca.Revoke(ctx, serial); err != nil && !errors.Is(err, pki.ErrNotFound) {
			return 0, err
		}
		if _, err := s.pool.Exec(ctx, `UPDATE node_certificates SET revoked_at = now() WHERE serial = $1`, serial); err != nil {
			return 0, err
		}
	}
	return len(serials), nil
}

// Heartbeat records a node's facts; a node that went offline for missed
// heartbeats comes back.
func (s *Service) Heartbeat(ctx context.Context, nodeID uuid.UUID, facts protocol.Facts) (*protocol.HeartbeatReply, error) {
	err := store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		n, err := inventory.Lock(ctx, tx, nodeID)
		if err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `UPDATE nodes SET heartbeat_at = now(), agent_facts = $2 WHERE id = $1`, nodeID, facts); err != nil {
			return err
		}
		if n.State == inventory.Offline && n.StateReason == missedReason {
			return inventory.Recover(ctx, tx, n, "the agent's heartbeats are back")
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	keys, err := s.TaskKeys(ctx)
	if err != nil {
		return nil, err
	}
	ssh, err := s.SSHUserCAKeys(ctx)
	if err != nil {
		return nil, err
	}
	return &protocol.HeartbeatReply{Interval: s.set.HeartbeatInterval, TaskKeys: keys, SSHUserCAKeys: ssh, MinTaskKeyVersion: s.minKeyVersion(ctx)}, nil
}

const missedReason = "the agent missed its heartbeats"

// MarkSilent takes online nodes whose agent stopped heartbeating offline.
func (s *Service) MarkSilent(ctx context.Context) (int, error) {
	silence := time.Duration(s.set.MissedHeartbeats) * s.set.HeartbeatInterval
	rows, err := s.pool.Query(ctx, `SELECT id FROM nodes WHERE heartbeat_at IS NOT NULL AND heartbeat_at < now() - $1::interval
		AND state NOT IN ('offline', 'retired')`, silence)
	if err != nil {
		return 0, err
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
	if err != nil {
		return 0, err
	}
	for _, id := range ids {
		err := store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
			n, err := inventory.Lock(ctx, tx, id)
			if err != nil || n.State == inventory.Offline || n.State == inventory.Retired {
				return err
			}
			return inventory.Move(ctx, tx, n, inventory.Offline, missedReason)
		})
		if err != nil {
			return 0, err
		}
	}
	return len(ids), nil
}

// TaskRequest queues a task.
type TaskRequest struct {
	NodeID uuid.UUID
	Type   string
	Params any
	TTL    time.Duration
	// OperationID makes the enqueue idempotent: the same id is the same task.
	OperationID string
	MaxAttempts int
}

// Task is a queued task and how it stands.
type Task struct {
	ID          uuid.UUID
	NodeID      uuid.UUID
	Type        string
	State       string
	Attempts    int
	Output      json.RawMessage
	Error       string
	ExpiresAt   time.Time
	OperationID string
	CreatedAt   time.Time
	UpdatedAt   time.Time
}

// Enqueue signs a task with the KMS key over its canonical payload and queues
// it; the node's waiting long poll wakes at commit.
func (s *Service) Enqueue(ctx context.Context, req TaskRequest) (*Task, error) {
	if req.TTL <= 0 || req.TTL > protocol.MaxTaskTTL {
		req.TTL = protocol.MaxTaskTTL
	}
	if req.MaxAttempts <= 0 {
		req.MaxAttempts = 5
	}
	if req.OperationID != "" {
		if t, err := s.taskByOperation(ctx, req.OperationID); err == nil {
			if t.NodeID != req.NodeID || t.Type != req.Type {
				return nil, errcode.New(CodeTaskConflict, "operation %s is a %s task for node %s", req.OperationID, t.Type, t.NodeID)
			}
			return t, nil
		} else if errcode.Of(err) != CodeTaskNotFound {
			return nil, err
		}
	}
	params, err := json.Marshal(req.Params)
	if err != nil {
		return nil, err
	}
	nonce := make([]byte, 16)
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	if err := s.signer.EnsureKey(ctx, TaskKey); err != nil {
		return nil, err
	}
	t := protocol.Task{ID: uuid.Must(uuid.NewV7()).String(), NodeID: req.NodeID.String(), Type: req.Type, Params: params,
		ExpiresAt: time.Now().Add(req.TTL).UTC().Truncate(time.Microsecond), Nonce: hex.EncodeToString(nonce)}
	// The version is part of the signed bytes: sign, then re-sign if a rotation
	// raced in between so the recorded version is the one that signed.
	var sig []byte
	for range 3 {
		msg, err := protocol.Canonical(t)
		if err != nil {
			return nil, err
		}
		var v int
		if sig, v, err = s.signer.Sign(ctx, TaskKey, msg); err != nil {
			return nil, err
		}
		if v == t.KeyVersion {
			s.sawTaskKeyVersion(v)
			break
		}
		t.KeyVersion, sig = v, nil
	}
	if sig == nil {
		return nil, errors.New("agents: the task key kept rotating while signing")
	}
	if minV := s.minKeyVersion(ctx); t.KeyVersion < minV {
		return nil, fmt.Errorf("agents: the task key's latest version %d is below agents.min_task_key_version %d: rotate the key %q first", t.KeyVersion, minV, TaskKey)
	}
	id := uuid.MustParse(t.ID)
	_, err = s.pool.Exec(ctx, `INSERT INTO node_tasks (id, node_id, type, params, state, nonce, key_version, signature, expires_at, max_attempts, operation_id)
		VALUES ($1, $2, $3, $4, 'queued', $5, $6, $7, $8, $9, $10)`,
		id, req.NodeID, t.Type, params, t.Nonce, t.KeyVersion, sig, t.ExpiresAt, req.MaxAttempts, req.OperationID)
	if store.IsUniqueViolation(err, "") && req.OperationID != "" {
		return s.taskByOperation(ctx, req.OperationID)
	}
	if err != nil {
		return nil, fmt.Errorf("agents: enqueue: %w", err)
	}
	s.wake.notify(req.NodeID.String()) // this instance's polls; others hear NOTIFY
	return s.Task(ctx, id)
}

const taskColumns = `id, node_id, type, state, attempts, output, error, expires_at, operation_id, created_at, updated_at`

func scanTask(row pgx.Row) (*Task, error) {
	t := &Task{}
	var out []byte
	err := row.Scan(&t.ID, &t.NodeID, &t.Type, &t.State, &t.Attempts, &out, &t.Error, &t.ExpiresAt, &t.OperationID, &t.CreatedAt, &t.UpdatedAt)
	t.Output = out
	return t, err
}

// Task returns a task.
func (s *Service) Task(ctx context.Context, id uuid.UUID) (*Task, error) {
	t, err := scanTask(s.pool.QueryRow(ctx, `SELECT `+taskColumns+` FROM node_tasks WHERE id = $1`, id))
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, errcode.New(CodeTaskNotFound, "no task %s", id)
	}
	return t, err
}

func (s *Service) taskByOperation(ctx context.Context, op string) (*Task, error) {
	t, err := scanTask(s.pool.QueryRow(ctx, `SELECT `+taskColumns+` FROM node_tasks WHERE operation_id = $1`, op))
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, errcode.New(CodeTaskNotFound, "no task for operation %s", op)
	}
	return t, err
}

// lease takes the node's queued tasks (and those whose lease ran out) for
// one lease.
func (s *Service) lease(ctx context.Context, nodeID uuid.UUID) ([]protocol.SignedTask, error) {
	rows, err := s.pool.Query(ctx, `UPDATE node_tasks t SET state = 'leased', attempts = attempts + 1,
			lease_expires_at = now() + $2::interval, updated_at = now()
		WHERE id IN (SELECT id FROM node_tasks WHERE node_id = $1 AND expires_at > now() AND attempts < max_attempts
			AND (state = 'queued' OR (state = 'leased' AND lease_expires_at < now()))
			ORDER BY created_at LIMIT 16 FOR UPDATE SKIP LOCKED)
		RETURNING id, node_id, type, params, expires_at, nonce, key_version, signature, lease_expires_at`, nodeID, s.set.Lease)
	if err != nil {
		return nil, fmt.Errorf("agents: lease: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (protocol.SignedTask, error) {
		var st protocol.SignedTask
		var id, node uuid.UUID
		var params []byte
		err := r.Scan(&id, &node, &st.Task.Type, &params, &st.Task.ExpiresAt, &st.Task.Nonce, &st.Task.KeyVersion, &st.Signature, &st.LeaseExpiresAt)
		st.Task.ID, st.Task.NodeID, st.Task.Params = id.String(), node.String(), params
		st.Task.ExpiresAt = st.Task.ExpiresAt.UTC()
		return st, err
	})
}

// Poll leases the node's tasks, waiting up to wait for one to be queued.
func (s *Service) Poll(ctx context.Context, nodeID uuid.UUID, wait time.Duration) ([]protocol.SignedTask, error) {
	ch, done := s.wake.subscribe(nodeID.String())
	defer done()
	deadline := time.NewTimer(wait)
	defer deadline.Stop()
	for {
		tasks, err := s.lease(ctx, nodeID)
		if err != nil || len(tasks) > 0 {
			return tasks, err
		}
		select {
		case <-ctx.Done():
			return nil, nil
		case <-deadline.C:
			return nil, nil
		case <-ch:
		case <-time.After(5 * time.Second): // a lease that ran out, a missed wake-up
		}
	}
}

// Complete records a task's result, reported by the agent of nodeID. A task
// of another node is not found; the same result twice is accepted once; a
// different result for a finished task is a conflict.
func (s *Service) Complete(ctx context.Context, nodeID, taskID uuid.UUID, res protocol.Result) (*Task, error) {
	if res.Outcome != protocol.ResultSucceeded && res.Outcome != protocol.ResultFailed {
		return nil, errcode.New(errcode.ValidationFailed, "outcome must be succeeded or failed").WithDetails("field", "outcome")
	}
	var out *Task
	err := store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		t, err := scanTask(tx.QueryRow(ctx, `SELECT `+taskColumns+` FROM node_tasks WHERE id = $1 AND node_id = $2 FOR UPDATE`, taskID, nodeID))
		if errors.Is(err, pgx.ErrNoRows) {
			return errcode.New(CodeTaskNotFound, "no task %s for this node", taskID)
		}
		if err != nil {
			return err
		}
		switch t.State {
		case res.Outcome:
			out = t
			return nil
		case "succeeded", "failed", "expired":
			return errcode.New(CodeTaskConflict, "task %s is already %s", taskID, t.State)
		}
		output := res.Output
		if len(output) == 0 {
			output = nil
		}
		out, err = scanTask(tx.QueryRow(ctx, `UPDATE node_tasks SET state = $2, output = $3, error = $4, lease_expires_at = NULL, updated_at = now()
			WHERE id = $1 RETURNING `+taskColumns, taskID, res.Outcome, output, truncate(res.Error)))
		return err
	})
	return out, err
}

// Sweep expires tasks past their expiry and fails leased tasks whose
// attempts are spent.
func (s *Service) Sweep(ctx context.Context) error {
	_, err := s.pool.Exec(ctx, `UPDATE node_tasks SET state = CASE WHEN expires_at <= now() THEN 'expired' ELSE 'failed' END,
			error = CASE WHEN expires_at <= now() THEN 'expired before it was done' ELSE 'no result after every attempt' END, updated_at = now()
		WHERE state IN ('queued', 'leased') AND (expires_at <= now() OR (state = 'leased' AND lease_expires_at < now() AND attempts >= max_attempts))`)
	return err
}

func truncate(s string) string {
	if len(s) > 4000 {
		return s[:4000]
	}
	return s
}

// NodeByExternal finds the node a provisioner instance knows as externalID.
func (s *Service) NodeByExternal(ctx context.Context, instance, externalID string) (uuid.UUID, error) {
	var id uuid.UUID
	err := s.pool.QueryRow(ctx, `SELECT id FROM nodes WHERE provisioner_instance = $1 AND external_id = $2`, instance, externalID).Scan(&id)
	if errors.Is(err, pgx.ErrNoRows) {
		return id, errcode.New(inventory.CodeNodeNotFound, "provisioner instance %s has no node %q", instance, externalID)
	}
	return id, err
}

// scopedOperation keeps the operation ids of different driver instances apart.
func scopedOperation(instance, op string) string { return instance + "/" + op }

// EnqueueForDriver queues a task for a driver instance's node, idempotent by
// the driver's operation id (scoped to the instance).
func (s *Service) EnqueueForDriver(ctx context.Context, instance, externalID string, req TaskRequest) (*Task, bool, error) {
	if req.OperationID == "" || len(req.OperationID) > 200 {
		return nil, false, errcode.New(errcode.ValidationFailed, "operation_id must be 1-200 characters").WithDetails("field", "operation_id")
	}
	known := false
	for _, t := range protocol.TaskTypes() {
		known = known || t == req.Type
	}
	if !known {
		return nil, false, errcode.New(errcode.ValidationFailed, "type must be one of %v", protocol.TaskTypes()).WithDetails("field", "type")
	}
	node, err := s.NodeByExternal(ctx, instance, externalID)
	if err != nil {
		return nil, false, err
	}
	req.NodeID = node
	op := scopedOperation(instance, req.OperationID)
	params, err := json.Marshal(req.Params)
	if err != nil {
		return nil, false, err
	}
	driverOp := req.OperationID
	if existing, err := s.taskByOperation(ctx, op); err == nil {
		if err := s.sameTask(ctx, existing, driverOp, node, req.Type, params); err != nil {
			return nil, false, err
		}
		return existing, false, nil
	}
	req.OperationID = op
	t, err := s.Enqueue(ctx, req)
	if err != nil {
		return nil, false, err
	}
	// A concurrent retry may have queued it first (Enqueue returns that one).
	if err := s.sameTask(ctx, t, driverOp, node, req.Type, params); err != nil {
		return nil, false, err
	}
	return t, true, audit.Record(ctx, s.pool, audit.Entry{Action: "node.task", Target: s.ids.Platform("node", node.String()),
		Details: map[string]any{"task_id": t.ID.String(), "type": t.Type, "operation_id": req.OperationID}})
}

// sameTask refuses an operation id reused for another node, task type or
// parameters (a retry must repeat its request).
func (s *Service) sameTask(ctx context.Context, t *Task, op string, node uuid.UUID, typ string, params []byte) error {
	if t.NodeID != node || t.Type != typ {
		return errcode.New(CodeTaskConflict, "operation %s is a %s task for another node", op, t.Type)
	}
	var same bool
	if err := s.pool.QueryRow(ctx, `SELECT params = $2::jsonb FROM node_tasks WHERE id = $1`, t.ID, params).Scan(&same); err != nil {
		return err
	}
	if !same {
		return errcode.New(CodeTaskConflict, "operation %s was queued with other parameters", op)
	}
	return nil
}

// DriverTask returns a driver instance's task by its operation id.
func (s *Service) DriverTask(ctx context.Context, instance, op string) (*Task, error) {
	return s.taskByOperation(ctx, scopedOperation(instance, op))
}
