// Package protocol is the node agent protocol, version 1 (api/agent/v1): the
// wire types the core and gpuaas-agent exchange, and the signature every task
// carries. The core signs a task's canonical payload with an Ed25519 key of
// its KMS; the agent verifies the signature, that the task is for its node,
// that it has not expired and that its nonce is new, before it runs anything.
package protocol

import (
	"bytes"
	"crypto/ed25519"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"
)

// Task types. Each has a compiled handler in the agent; there is no way to
// run anything else.
const (
	TaskProvisionUser = "allocation.provision_user"
	TaskRevokeUser    = "allocation.revoke_user"
	TaskInventory     = "node.inventory"
	TaskWipe          = "node.wipe"
)

// TaskTypes lists every task type.
func TaskTypes() []string {
	return []string{TaskProvisionUser, TaskRevokeUser, TaskInventory, TaskWipe}
}

// MaxTaskTTL is the longest a task may be valid: a task that claims more is
// refused, so a stolen signed task is worthless soon.
const MaxTaskTTL = time.Hour

// EnrollALPN is the TLS application protocol an agent offers (before
// "http/1.1") on the one connection it opens without a client certificate,
// to enroll. The core's listener requires a client certificate on every
// other connection: without one the handshake fails.
const EnrollALPN = "gpuaas-enroll/1"

// Task is one unit of work for one node.
type Task struct {
	ID        string          `json:"id"`
	NodeID    string          `json:"node_id"`
	Type      string          `json:"type"`
	Params    json.RawMessage `json:"params"`
	ExpiresAt time.Time       `json:"expires_at"`
	Nonce     string          `json:"nonce"`
	// KeyVersion names the signing key version that signed it.
	KeyVersion int `json:"key_version"`
}

// SignedTask is a task with the core's signature over Canonical(task).
type SignedTask struct {
	Task      Task   `json:"task"`
	Signature []byte `json:"signature"`
	// LeaseExpiresAt is when the core gives the task to another poll if no
	// result arrived (not signed: the lease is the core's bookkeeping).
	LeaseExpiresAt time.Time `json:"lease_expires_at"`
}

// canonicalJSON re-encodes raw JSON with object keys sorted and no spaces, so
// the same parameters always sign the same bytes.
func canonicalJSON(raw json.RawMessage) ([]byte, error) {
	if len(bytes.TrimSpace(raw)) == 0 {
		return []byte("null"), nil
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, fmt.Errorf("protocol: task params: %w", err)
	}
	if dec.More() {
		return nil, errors.New("protocol: task params: trailing data")
	}
	return json.Marshal(v)
}

// Canonical is the exact byte string a task's signature covers: a domain tag,
// then every field length-prefixed (so no field can bleed into another).
func Canonical(t Task) ([]byte, error) {
	params, err := canonicalJSON(t.Params)
	if err != nil {
		return nil, err
	}
	var b bytes.Buffer
	b.WriteString("gpuaas-agent-task-v1")
	for _, f := range [][]byte{
		[]byte(t.ID), []byte(t.NodeID), []byte(t.Type), params,
		[]byte(t.ExpiresAt.UTC().Format(time.RFC3339Nano)), []byte(t.Nonce), []byte(fmt.Sprint(t.KeyVersion)),
	} {
		var n [4]byte
		binary.BigEndian.PutUint32(n[:], uint32(len(f)))
		b.Write(n[:])
		b.Write(f)
	}
	return b.Bytes(), nil
}

// Sign signs a task with key (the local signer; the core uses its KMS).
func Sign(t Task, key ed25519.PrivateKey) (SignedTask, error) {
	msg, err := Canonical(t)
	if err != nil {
		return SignedTask{}, err
	}
	return SignedTask{Task: t, Signature: ed25519.Sign(key, msg)}, nil
}

// Refusal reasons of Verify; the agent reports them as the task's failure.
var (
	ErrBadSignature = errors.New("task signature does not verify")
	ErrUnknownKey   = errors.New("task signed by an unknown key version")
	ErrKeyRetired   = errors.New("task signed by a retired key version")
	ErrWrongNode    = errors.New("task is for another node")
	ErrExpired      = errors.New("task expired")
	ErrTooLong      = errors.New("task valid for longer than allowed")
	ErrReplay       = errors.New("task nonce already used")
	ErrUnknownType  = errors.New("unknown task type")
)

// Verifier checks tasks for one node.
type Verifier struct {
	NodeID string
	// Keys are the core's task-signing public keys by version.
	Keys map[int]ed25519.PublicKey
	// MinKeyVersion retires older key versions: their tasks are refused.
	MinKeyVersion int
	Now           func() time.Time
	// Nonces remembers used nonces until their task expires.
	Nonces *NonceCache
}

// Verify accepts a signed task only when its signature verifies with a known
// key version not below MinKeyVersion, it names this node and a known type, it has not expired and is
// not valid for longer than MaxTaskTTL, and its nonce is new (the nonce is
// then remembered).
func (v *Verifier) Verify(st SignedTask) error {
	t := st.Task
	if t.KeyVersion < v.MinKeyVersion {
		return fmt.Errorf("%w (%d; the minimum is %d)", ErrKeyRetired, t.KeyVersion, v.MinKeyVersion)
	}
	key, ok := v.Keys[t.KeyVersion]
	if !ok {
		return fmt.Errorf("%w (%d)", ErrUnknownKey, t.KeyVersion)
	}
	msg, err := Canonical(t)
	if err != nil {
		return err
	}
	if !ed25519.Verify(key, msg, st.Signature) {
		return ErrBadSignature
	}
	if t.NodeID != v.NodeID {
		return fmt.Errorf("%w (%s)", ErrWrongNode, t.NodeID)
	}
	known := false
	for _, typ := range TaskTypes() {
		known = known || typ == t.Type
	}
	if !known {
		return fmt.Errorf("%w %q", ErrUnknownType, t.Type)
	}
	now := time.Now()
	if v.Now != nil {
		now = v.Now()
	}
	if !now.Before(t.ExpiresAt) {
		return ErrExpired
	}
	if t.ExpiresAt.Sub(now) > MaxTaskTTL {
		return ErrTooLong
	}
	if t.Nonce == "" || !v.Nonces.Use(t.Nonce, t.ExpiresAt, now) {
		return ErrReplay
	}
	return nil
}

// NonceCache remembers nonces until they expire. The zero value is ready.
type NonceCache struct {
	mu   sync.Mutex
	seen map[string]time.Time
}

// Use records nonce until expires and reports whether it was new.
func (c *NonceCache) Use(nonce string, expires, now time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.seen == nil {
		c.seen = map[string]time.Time{}
	}
	for n, exp := range c.seen {
		if !now.Before(exp) {
			delete(c.seen, n)
		}
	}
	if _, dup := c.seen[nonce]; dup {
		return false
	}
	c.seen[nonce] = expires
	return true
}

// NodeURI is the URI SAN that names a node in its agent certificate; the core
// binds every mTLS call to the node it names.
func NodeURI(nodeID string) string { return "spiffe://gpuaas/node/" + nodeID }

// NodeIDOf returns the node a certificate names (its one gpuaas node URI SAN).
func NodeIDOf(cert *x509.Certificate) (string, error) {
	id := ""
	for _, u := range cert.URIs {
		if u.Scheme == "spiffe" && u.Host == "gpuaas" && strings.HasPrefix(u.Path, "/node/") {
			if id != "" {
				return "", errors.New("protocol: certificate names more than one node")
			}
			id = strings.TrimPrefix(u.Path, "/node/")
		}
	}
	if id == "" || strings.Contains(id, "/") {
		return "", errors.New("protocol: certificate names no node")
	}
	return id, nil
}

// Enrollment is the body of POST /agent/v1/enroll (no client certificate: the
// single-use token authenticates).
type Enrollment struct {
	Token  string `json:"token"`
	CSRPEM string `json:"csr_pem"`
}

// Certificate is what enrollment and renewal return.
type Certificate struct {
	NodeID     string                    `json:"node_id"`
	CertPEM    string                    `json:"cert_pem"`
	CAChainPEM string                    `json:"ca_chain_pem"`
	NotAfter   time.Time                 `json:"not_after"`
	TaskKeys   map[int]ed25519.PublicKey `json:"task_keys"`
	// SSHUserCAKeys are the CA keys (authorized_keys lines) whose user
	// certificates the node's sshd accepts for tenant accounts (the browser
	// terminal); the agent installs them.
	SSHUserCAKeys []string `json:"ssh_user_ca_keys,omitempty"`
	// MinTaskKeyVersion retires task key versions below it (0: none).
	MinTaskKeyVersion int `json:"min_task_key_version,omitempty"`
}

// Renewal is the body of POST /agent/v1/renew (mTLS).
type Renewal struct {
	CSRPEM string `json:"csr_pem"`
}

// GPU is one kind of GPU on a node.
type GPU struct {
	Model         string `json:"model"`
	Count         int    `json:"count"`
	MemoryMiB     int    `json:"memory_mib,omitempty"`
	DriverVersion string `json:"driver_version,omitempty"`
}

// Facts are what a node reports with each heartbeat.
type Facts struct {
	Hostname     string  `json:"hostname"`
	AgentVersion string  `json:"agent_version"`
	Kernel       string  `json:"kernel,omitempty"`
	CPUModel     string  `json:"cpu_model,omitempty"`
	CPUCores     int     `json:"cpu_cores"`
	MemoryBytes  uint64  `json:"memory_bytes"`
	DiskBytes    uint64  `json:"disk_bytes"`
	DiskFree     uint64  `json:"disk_free_bytes"`
	Load1        float64 `json:"load1"`
	GPUs         []GPU   `json:"gpus"`
}

// Heartbeat is the body of POST /agent/v1/heartbeat (mTLS).
type Heartbeat struct {
	Facts Facts `json:"facts"`
}

// HeartbeatReply tells the agent when to beat next and hands it the current
// task keys (a rotation reaches agents without re-enrollment).
type HeartbeatReply struct {
	Interval time.Duration             `json:"interval_ns"`
	TaskKeys map[int]ed25519.PublicKey `json:"task_keys"`
	// SSHUserCAKeys as in Certificate: a rotation reaches the node with a
	// heartbeat.
	SSHUserCAKeys []string `json:"ssh_user_ca_keys,omitempty"`
	// MinTaskKeyVersion as in Certificate.
	MinTaskKeyVersion int `json:"min_task_key_version,omitempty"`
}

// Poll is the reply of GET /agent/v1/tasks?wait=30s (mTLS): the tasks leased
// to this node, empty when none arrived within the wait.
type Poll struct {
	Tasks []SignedTask `json:"tasks"`
}

// Result outcome values.
const (
	ResultSucceeded = "succeeded"
	ResultFailed    = "failed"
)

// Result is the body of POST /agent/v1/tasks/{id}/result (mTLS). Reporting the
// same result twice is accepted once.
type Result struct {
	Outcome string          `json:"outcome"`
	Output  json.RawMessage `json:"output,omitempty"`
	Error   string          `json:"error,omitempty"`
}
