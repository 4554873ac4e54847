package manual_test

import (
	"bytes"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/gpuaas/gpuaas/agent/protocol"
	"github.com/gpuaas/gpuaas/agent/tasks"
)

// fakeCore is the core's driver task API in memory, with the contract of
// the real one (api/openapi.yaml: node-tasks, nodes/{external_id},
// healthz; the error envelope and codes), and an "agent" on every live
// node that leases a queued task after one tick and finishes it after
// another. A task fails when its node is set to fail, or when its
// parameters would not pass the real agent's strict decoding. Tasks of a
// node that is not live stay queued until they expire.
type fakeCore struct {
	t        testing.TB
	srv      *httptest.Server
	apiKey   string
	otherKey string // a valid key without platform admin rights

	mu        sync.Mutex
	now       func() time.Time
	tick      time.Duration
	nodes     map[string]*fakeNode // by instance + "\x00" + external id
	tasks     map[string]*fakeTask // by instance + "/" + operation id
	down      bool
	faults    []*coreFault
	latency   time.Duration
	slowAfter int // requests answered before latency applies
	requests  int
	auths     []string // Authorization headers seen
}

type fakeNode struct {
	ID         string
	Instance   string
	ExternalID string
	State      string
	Live       bool       // its agent heartbeats (heartbeat_at is now) and runs tasks
	Heartbeat  *time.Time // when not live: the last heartbeat, if any
	FailTasks  string     // when set, every task of the node fails with this error
	CreatedAt  time.Time
}

type fakeTask struct {
	ID          string
	NodeID      string
	Instance    string
	ExternalID  string
	Type        string
	OperationID string
	Params      json.RawMessage
	MaxAttempts int
	CreatedAt   time.Time
	ExpiresAt   time.Time
}

type coreFault struct {
	method, path string
	skip         int // matching requests let through first
	status       int
	code         string
	times        int
}

const (
	coreAPIKey   = "gpk_test-platform-admin-key-0123456789"
	coreOtherKey = "gpk_test-tenant-user-key-9876543210"
)

func newFakeCore(t testing.TB) *fakeCore {
	t.Helper()
	c := newFakeCoreHandler(t)
	c.srv = httptest.NewServer(http.HandlerFunc(c.serve))
	t.Cleanup(c.srv.Close)
	return c
}

// newFakeCoreTLS is a fake core on https, with httptest's certificate.
func newFakeCoreTLS(t testing.TB) *fakeCore {
	t.Helper()
	c := newFakeCoreHandler(t)
	c.srv = httptest.NewUnstartedServer(http.HandlerFunc(c.serve))
	c.srv.Config.ErrorLog = log.New(io.Discard, "", 0) // refused handshakes are the point
	c.srv.StartTLS()
	t.Cleanup(c.srv.Close)
	return c
}

func newFakeCoreHandler(t testing.TB) *fakeCore {
	return &fakeCore{
		t: t, apiKey: coreAPIKey, otherKey: coreOtherKey,
		now: time.Now, tick: 20 * time.Millisecond,
		nodes: map[string]*fakeNode{}, tasks: map[string]*fakeTask{},
	}
}

// caPEM is the certificate of a TLS fake core, to trust.
func (c *fakeCore) caPEM() string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.srv.Certificate().Raw}))
}

func (c *fakeCore) URL() string { return c.srv.URL }

// addNode registers a node of instance whose agent is live.
func (c *fakeCore) addNode(instance, externalID string) *fakeNode {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := &fakeNode{ID: uuid.NewString(), Instance: instance, ExternalID: externalID, State: "available", Live: true, CreatedAt: c.now()}
	c.nodes[instance+"\x00"+externalID] = n
	return n
}

// update changes a node under the lock.
func (c *fakeCore) update(instance, externalID string, fn func(*fakeNode)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := c.nodes[instance+"\x00"+externalID]
	if n == nil {
		c.t.Fatalf("fake core: no node %s/%s", instance, externalID)
	}
	fn(n)
}

func (c *fakeCore) setDown(down bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.down = down
}

func (c *fakeCore) setClock(now func() time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = now
}

// slow delays every request after the first n by d (or until abandoned).
func (c *fakeCore) slow(n int, d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.slowAfter, c.latency = n, d
}

// fault makes the next times requests matching method and path prefix
// answer status with the error code.
func (c *fakeCore) fault(method, path string, status int, code string, times int) {
	c.faultAfter(method, path, 0, status, code, times)
}

// faultAfter is fault after skip matching requests went through.
func (c *fakeCore) faultAfter(method, path string, skip, status int, code string, times int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.faults = append(c.faults, &coreFault{method: method, path: path, skip: skip, status: status, code: code, times: times})
}

// task returns a task by instance and operation id, and its parameters.
func (c *fakeCore) task(instance, op string) (*fakeTask, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	t, ok := c.tasks[instance+"/"+op]
	if !ok {
		return nil, false
	}
	out := *t
	return &out, true
}

// taskCount counts the tasks of a node.
func (c *fakeCore) taskCount(instance, externalID string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, t := range c.tasks {
		if t.Instance == instance && t.ExternalID == externalID {
			n++
		}
	}
	return n
}

func (c *fakeCore) authHeaders() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.auths...)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeErr(w http.ResponseWriter, status int, code, format string, args ...any) {
	writeJSON(w, status, map[string]any{"error": map[string]any{
		"code": code, "message": fmt.Sprintf(format, args...), "details": map[string]any{}, "correlation_id": "test-corr",
	}})
}

func (c *fakeCore) serve(w http.ResponseWriter, r *http.Request) {
	c.mu.Lock()
	c.requests++
	delay := time.Duration(0)
	if c.latency > 0 && c.requests > c.slowAfter {
		delay = c.latency
	}
	c.auths = append(c.auths, r.Header.Get("Authorization"))
	var fault *coreFault
	for i, f := range c.faults {
		if (f.method == "" || f.method == r.Method) && strings.HasPrefix(r.URL.Path, f.path) {
			if f.skip > 0 {
				f.skip--
				break
			}
			fault = f
			if f.times--; f.times <= 0 {
				c.faults = append(c.faults[:i], c.faults[i+1:]...)
			}
			break
		}
	}
	down := c.down
	c.mu.Unlock()
	if delay > 0 {
		select {
		case <-time.After(delay):
		case <-r.Context().Done():
			return
		}
	}
	if fault != nil {
		writeErr(w, fault.status, fault.code, "injected %s", fault.code)
		return
	}
	if r.URL.Path == "/api/v1/healthz" && r.Method == http.MethodGet {
		if down {
			writeErr(w, http.StatusServiceUnavailable, "not_ready", "the core is starting")
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"status": "ok", "version": "test"})
		return
	}
	if down {
		writeErr(w, http.StatusServiceUnavailable, "database_unavailable", "the database is unavailable")
		return
	}
	rest, ok := strings.CutPrefix(r.URL.EscapedPath(), "/api/v1/admin/plugin-instances/")
	if !ok {
		writeErr(w, http.StatusNotFound, "route_not_found", "no route %s %s", r.Method, r.URL.Path)
		return
	}
	switch auth := r.Header.Get("Authorization"); auth {
	case "Bearer " + c.apiKey:
	case "Bearer " + c.otherKey:
		writeErr(w, http.StatusForbidden, "forbidden", "platform admins only")
		return
	case "":
		w.Header().Set("WWW-Authenticate", `Bearer realm="gpuaas"`)
		writeErr(w, http.StatusUnauthorized, "unauthenticated", "authentication required: send Authorization: Bearer <token>")
		return
	default:
		writeErr(w, http.StatusUnauthorized, "invalid_credentials", "the credentials are invalid")
		return
	}
	parts := strings.Split(rest, "/")
	for i, p := range parts {
		u, err := url.PathUnescape(p)
		if err != nil {
			writeErr(w, http.StatusBadRequest, "bad_request", "bad path")
			return
		}
		parts[i] = u
	}
	switch {
	case len(parts) == 2 && parts[1] == "node-tasks" && r.Method == http.MethodPost:
		c.enqueue(w, r, parts[0])
	case len(parts) == 3 && parts[1] == "node-tasks" && r.Method == http.MethodGet:
		c.getTask(w, parts[0], parts[2])
	case len(parts) == 3 && parts[1] == "nodes" && r.Method == http.MethodGet:
		c.getNode(w, parts[0], parts[2])
	default:
		writeErr(w, http.StatusNotFound, "route_not_found", "no route %s %s", r.Method, r.URL.Path)
	}
}

type enqueueBody struct {
	ExternalID  string          `json:"external_id"`
	Type        string          `json:"type"`
	Params      json.RawMessage `json:"params"`
	OperationID string          `json:"operation_id"`
	TTLSeconds  *int            `json:"ttl_seconds"`
	MaxAttempts *int            `json:"max_attempts"`
}

func (c *fakeCore) enqueue(w http.ResponseWriter, r *http.Request, instance string) {
	var req enqueueBody
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		writeErr(w, http.StatusBadRequest, "invalid_json", "%v", err)
		return
	}
	known := false
	for _, typ := range protocol.TaskTypes() {
		known = known || typ == req.Type
	}
	switch {
	case req.ExternalID == "":
		writeErr(w, http.StatusBadRequest, "validation_failed", "external_id is required")
		return
	case req.OperationID == "" || len(req.OperationID) > 200:
		writeErr(w, http.StatusBadRequest, "validation_failed", "operation_id must be 1-200 characters")
		return
	case !known:
		writeErr(w, http.StatusBadRequest, "validation_failed", "type must be one of %v", protocol.TaskTypes())
		return
	case req.MaxAttempts != nil && (*req.MaxAttempts < 1 || *req.MaxAttempts > 100):
		writeErr(w, http.StatusBadRequest, "validation_failed", "max_attempts must be between 1 and 100")
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	n := c.nodes[instance+"\x00"+req.ExternalID]
	if n == nil {
		writeErr(w, http.StatusNotFound, "node_not_found", "provisioner instance %s has no node %q", instance, req.ExternalID)
		return
	}
	key := instance + "/" + req.OperationID
	if t, ok := c.tasks[key]; ok {
		if t.NodeID != n.ID || t.Type != req.Type {
			writeErr(w, http.StatusConflict, "node_task_conflict", "operation %s is a %s task for another node", req.OperationID, t.Type)
			return
		}
		writeJSON(w, http.StatusOK, c.view(t))
		return
	}
	ttl := time.Hour
	if req.TTLSeconds != nil && *req.TTLSeconds > 0 && time.Duration(*req.TTLSeconds)*time.Second <= time.Hour {
		ttl = time.Duration(*req.TTLSeconds) * time.Second
	}
	attempts := 5
	if req.MaxAttempts != nil {
		attempts = *req.MaxAttempts
	}
	now := c.now()
	t := &fakeTask{ID: uuid.NewString(), NodeID: n.ID, Instance: instance, ExternalID: n.ExternalID, Type: req.Type,
		OperationID: req.OperationID, Params: req.Params, MaxAttempts: attempts, CreatedAt: now, ExpiresAt: now.Add(ttl)}
	c.tasks[key] = t
	writeJSON(w, http.StatusCreated, c.view(t))
}

func (c *fakeCore) getTask(w http.ResponseWriter, instance, op string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	t, ok := c.tasks[instance+"/"+op]
	if !ok {
		writeErr(w, http.StatusNotFound, "node_task_not_found", "no task for operation %s", instance+"/"+op)
		return
	}
	writeJSON(w, http.StatusOK, c.view(t))
}

func (c *fakeCore) getNode(w http.ResponseWriter, instance, external string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := c.nodes[instance+"\x00"+external]
	if n == nil {
		writeErr(w, http.StatusNotFound, "node_not_found", "provisioner instance %s has no node %q", instance, external)
		return
	}
	out := map[string]any{
		"id": n.ID, "provisioner_instance": n.Instance, "external_id": n.ExternalID, "hostname": n.ExternalID,
		"state": n.State, "state_reason": "", "gpus": []any{}, "cpu_cores": 0, "memory_bytes": 0, "disk_bytes": 0,
		"pool": "", "tags": []string{}, "created_at": n.CreatedAt.UTC(), "updated_at": n.CreatedAt.UTC(),
	}
	switch {
	case n.Live:
		out["heartbeat_at"] = c.now().UTC()
	case n.Heartbeat != nil:
		out["heartbeat_at"] = n.Heartbeat.UTC()
	}
	writeJSON(w, http.StatusOK, out)
}

// view is a task as the core reports it now: the node's agent leases it one
// tick after it was queued and reports the result one tick later.
func (c *fakeCore) view(t *fakeTask) map[string]any {
	now := c.now()
	n := c.nodes[t.Instance+"\x00"+t.ExternalID]
	state, attempts, errText := "queued", 0, ""
	var output any
	elapsed := now.Sub(t.CreatedAt)
	finished := t.CreatedAt.Add(2 * c.tick)
	switch {
	case n == nil || !n.Live || elapsed < c.tick:
		if !now.Before(t.ExpiresAt) {
			state, errText = "expired", "expired before it was done"
		}
	case elapsed < 2*c.tick:
		state, attempts = "leased", 1
	default:
		attempts = 1
		out, err := agentRun(t)
		switch {
		case n.FailTasks != "":
			state, errText = "failed", n.FailTasks
		case err != nil:
			state, errText = "failed", err.Error()
		default:
			state, output = "succeeded", out
		}
	}
	updated := t.CreatedAt
	switch state {
	case "leased":
		updated = t.CreatedAt.Add(c.tick)
	case "succeeded", "failed":
		updated = finished
	case "expired":
		updated = t.ExpiresAt
	}
	return map[string]any{
		"id": t.ID, "node_id": t.NodeID, "external_id": t.ExternalID, "type": t.Type, "state": state, "attempts": attempts,
		"output": output, "error": errText, "operation_id": t.OperationID, "expires_at": t.ExpiresAt.UTC(),
		"created_at": t.CreatedAt.UTC(), "updated_at": updated.UTC(),
	}
}

// agentRun is what the real agent's handlers would answer, after decoding
// the parameters as strictly as they do.
func agentRun(t *fakeTask) (map[string]any, error) {
	decode := func(v any) error {
		dec := json.NewDecoder(bytes.NewReader(t.Params))
		dec.DisallowUnknownFields()
		if err := dec.Decode(v); err != nil {
			return fmt.Errorf("%w: %v", tasks.ErrInvalid, err)
		}
		return nil
	}
	switch t.Type {
	case protocol.TaskProvisionUser:
		var p tasks.ProvisionUserParams
		if err := decode(&p); err != nil {
			return nil, err
		}
		uid := p.UID
		if uid == 0 {
			uid = 2000
		}
		return map[string]any{"username": p.Username, "uid": uid, "home": "/home/" + p.Username, "keys": len(p.SSHPublicKeys), "sudo": p.Sudo}, nil
	case protocol.TaskRevokeUser:
		var p tasks.RevokeUserParams
		if err := decode(&p); err != nil {
			return nil, err
		}
		return map[string]any{"username": p.Username, "removed": true, "kill_rounds": 0}, nil
	case protocol.TaskWipe:
		var p tasks.WipeParams
		if err := decode(&p); err != nil {
			return nil, err
		}
		return map[string]any{"removed_entries": 3, "areas": 1}, nil
	}
	return map[string]any{}, nil
}
