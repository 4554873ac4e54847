package manual

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/netguard"
)

// The core's REST API the driver uses: its driver task API, authenticated
// with a platform admin's API key. The driver never reaches Postgres or the
// agents; the core signs and queues tasks and the node's agent runs them.

// Task states of the core's node task API.
const (
	taskQueued    = "queued"
	taskLeased    = "leased"
	taskSucceeded = "succeeded"
	taskFailed    = "failed"
	taskExpired   = "expired"
)

// Core error codes the driver tells apart.
const (
	codeNodeNotFound     = "node_not_found"
	codeTaskNotFound     = "node_task_not_found"
	codeTaskConflict     = "node_task_conflict"
	codeValidationFailed = "validation_failed"
)

// maxResponseBytes bounds what the driver reads of one answer.
const maxResponseBytes = 1 << 20

// taskRequest is the body of POST .../node-tasks.
type taskRequest struct {
	ExternalID  string `json:"external_id"`
	Type        string `json:"type"`
	Params      any    `json:"params"`
	OperationID string `json:"operation_id"`
	TTLSeconds  int    `json:"ttl_seconds"`
	MaxAttempts int    `json:"max_attempts"`
}

// nodeTask is the core's NodeTask.
type nodeTask struct {
	ID          string         `json:"id"`
	NodeID      string         `json:"node_id"`
	ExternalID  string         `json:"external_id"`
	Type        string         `json:"type"`
	State       string         `json:"state"`
	Attempts    int            `json:"attempts"`
	Output      map[string]any `json:"output"`
	Error       string         `json:"error"`
	OperationID string         `json:"operation_id"`
	ExpiresAt   time.Time      `json:"expires_at"`
	CreatedAt   time.Time      `json:"created_at"`
	UpdatedAt   time.Time      `json:"updated_at"`
}

// coreNode is what the driver reads of the core's Node.
type coreNode struct {
	ID          string     `json:"id"`
	ExternalID  string     `json:"external_id"`
	Hostname    string     `json:"hostname"`
	State       string     `json:"state"`
	StateReason string     `json:"state_reason"`
	HeartbeatAt *time.Time `json:"heartbeat_at"`
}

// coreClient calls one core for one plugin instance.
type coreClient struct {
	baseURL  string // no trailing slash
	apiKey   string
	instance string
	http     *http.Client
}

// coreError is an answer of the core other than the one expected.
type coreError struct {
	status   int
	code     string
	message  string
	sentinel error
}

func (e *coreError) Error() string {
	return fmt.Sprintf("the core answered %d %s: %s", e.status, e.code, e.message)
}

func (e *coreError) Unwrap() error { return e.sentinel }

// coreCode returns the core's error code of err, or "".
func coreCode(err error) string {
	var ce *coreError
	if errors.As(err, &ce) {
		return ce.code
	}
	return ""
}

// transportError maps a failure to reach peer (the core, Nomad) to an SDK
// sentinel: a refused address, a certificate caOption would fix, the peer
// unreachable, or anything else.
func transportError(what, peer, caOption string, err error) error {
	var refused *netguard.RefusedError
	var certErr *tls.CertificateVerificationError
	var unknownCA x509.UnknownAuthorityError
	var hostErr x509.HostnameError
	var netErr net.Error
	var urlErr *url.Error
	switch {
	case errors.As(err, &refused):
		return fmt.Errorf("manual: %s: %v: %w", what, refused, base.ErrPermissionDenied)
	case errors.As(err, &certErr), errors.As(err, &unknownCA), errors.As(err, &hostErr):
		return fmt.Errorf("manual: %s: TLS: %v (set %s): %w", what, err, caOption, base.ErrFailedPrecondition)
	case errors.As(err, &netErr), errors.As(err, &urlErr), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
		return fmt.Errorf("manual: %s: %s is unreachable: %v: %w", what, peer, err, base.ErrUnavailable)
	}
	return fmt.Errorf("manual: %s: %v: %w", what, strings.TrimSpace(err.Error()), base.ErrInternal)
}

// mapCoreError is the one place where the core's answers and network
// failures become SDK sentinels. status is 0 when no answer came.
func mapCoreError(ctx context.Context, what string, status int, body []byte, err error) error {
	if ctxErr := ctx.Err(); ctxErr != nil {
		return fmt.Errorf("manual: %s: %w", what, ctxErr)
	}
	if err != nil {
		return transportError(what, "the core", "core_ca_pem", err)
	}
	ce := &coreError{status: status, code: "unknown", message: summarize(body)}
	var env struct {
		Error struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"error"`
	}
	if json.Unmarshal(body, &env) == nil && env.Error.Code != "" {
		ce.code, ce.message = env.Error.Code, summarize([]byte(env.Error.Message))
	}
	switch {
	case status == http.StatusBadRequest, status == http.StatusUnprocessableEntity:
		ce.sentinel = base.ErrInvalidArgument
	case status == http.StatusUnauthorized:
		ce.sentinel = base.ErrUnauthenticated
	case status == http.StatusForbidden:
		ce.sentinel = base.ErrPermissionDenied
	case status == http.StatusNotFound:
		ce.sentinel = base.ErrNotFound
	case status == http.StatusConflict && ce.code == codeTaskConflict:
		ce.sentinel = base.ErrConflict
	case status == http.StatusConflict:
		ce.sentinel = base.ErrFailedPrecondition
	case status == http.StatusTooManyRequests, status >= 500:
		ce.sentinel = base.ErrUnavailable
	default:
		ce.sentinel = base.ErrInternal
	}
	return fmt.Errorf("manual: %s: %w", what, ce)
}

// summarize makes an error text one short line.
func summarize(b []byte) string {
	s := strings.Join(strings.Fields(string(b)), " ")
	if len(s) > 300 {
		s = s[:300] + "..."
	}
	if s == "" {
		return "(no message)"
	}
	return s
}

func (c *coreClient) instancePath(parts ...string) string {
	p := "/api/v1/admin/plugin-instances/" + url.PathEscape(c.instance)
	for _, part := range parts {
		p += "/" + url.PathEscape(part)
	}
	return p
}

// do sends one request and decodes a 2xx answer into out. auth adds the
// API key.
func (c *coreClient) do(ctx context.Context, what, method, path string, auth bool, in, out any) (int, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return 0, fmt.Errorf("manual: %s: %w", what, err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.baseURL+path, body)
	if err != nil {
		return 0, fmt.Errorf("manual: %s: %v: %w", what, err, base.ErrInternal)
	}
	req.Header.Set("Accept", "application/json")
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if auth {
		req.Header.Set("Authorization", "Bearer "+c.apiKey)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return 0, mapCoreError(ctx, what, 0, nil, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxResponseBytes))
	if err != nil {
		return resp.StatusCode, mapCoreError(ctx, what, 0, nil, err)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return resp.StatusCode, mapCoreError(ctx, what, resp.StatusCode, data, nil)
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return resp.StatusCode, fmt.Errorf("manual: %s: unexpected answer from the core: %v: %w", what, err, base.ErrInternal)
		}
	}
	return resp.StatusCode, nil
}

// healthz checks that the core answers.
func (c *coreClient) healthz(ctx context.Context) error {
	var h struct {
		Status  string `json:"status"`
		Version string `json:"version"`
	}
	if _, err := c.do(ctx, "core health", http.MethodGet, "/api/v1/healthz", false, nil, &h); err != nil {
		return err
	}
	if h.Status != "ok" {
		return fmt.Errorf("manual: core health: status %q: %w", h.Status, base.ErrUnavailable)
	}
	return nil
}

// checkKey checks that the API key is accepted for this instance's admin
// routes, by reading a node that does not exist: a 404 node_not_found
// means the key passed authentication and authorization.
func (c *coreClient) checkKey(ctx context.Context) error {
	_, err := c.node(ctx, "gpuaas-manual-key-check")
	if err == nil || coreCode(err) == codeNodeNotFound {
		return nil
	}
	return err
}

// enqueue queues a task; created is false when the operation id had
// queued the task already.
func (c *coreClient) enqueue(ctx context.Context, req *taskRequest) (t *nodeTask, created bool, err error) {
	t = &nodeTask{}
	status, err := c.do(ctx, "queue "+req.Type+" task", http.MethodPost, c.instancePath("node-tasks"), true, req, t)
	if err != nil {
		return nil, false, err
	}
	return t, status == http.StatusCreated, nil
}

// task reads a task by operation id.
func (c *coreClient) task(ctx context.Context, operationID string) (*nodeTask, error) {
	t := &nodeTask{}
	if _, err := c.do(ctx, "read task "+operationID, http.MethodGet, c.instancePath("node-tasks", operationID), true, nil, t); err != nil {
		return nil, err
	}
	return t, nil
}

// node reads a node by the id this instance knows it by.
func (c *coreClient) node(ctx context.Context, externalID string) (*coreNode, error) {
	n := &coreNode{}
	if _, err := c.do(ctx, "read node "+externalID, http.MethodGet, c.instancePath("nodes", externalID), true, nil, n); err != nil {
		return nil, err
	}
	return n, nil
}
