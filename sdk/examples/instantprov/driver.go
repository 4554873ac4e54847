// Package instantprov is an example provisioner driver with no backend:
// nodes enroll with synthetic facts, and operations succeed at once or
// after a configured delay, or fail for configured nodes. Every call can be
// made slow. It exists for the conformance kit's own tests, the plugin
// host's fault tests, the benchmarks and the plugin author guide; it is not
// registered anywhere by default. State lives in memory.
package instantprov

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
)

// Version is the driver's release version.
const Version = "0.1.0"

// SignatureHeader carries a webhook's signature: "t=<unix seconds>,v1=<hex
// HMAC-SHA256 of "<t>.<body>" keyed with webhook_secret>".
const SignatureHeader = "X-Instantprov-Signature"

// WebhookTolerance is how far a webhook's timestamp may be from now.
const WebhookTolerance = 5 * time.Minute

// Driver is the instantprov provisioner driver.
type Driver struct {
	logger hclog.Logger
	now    func() time.Time
	random io.Reader

	mu          sync.Mutex
	cfg         *settings
	enrollments map[string]*enrollRecord // by operation id
	nodes       map[string]*provisioner.NodeFacts
	ops         map[string]*opRecord // by operation id
}

var (
	_ provisioner.Driver         = (*Driver)(nil)
	_ provisioner.WebhookHandler = (*Driver)(nil)
	_ provisioner.Discoverer     = (*Driver)(nil)
	_ provisioner.Unenroller     = (*Driver)(nil)
)

type settings struct {
	webhookSecret []byte
	delay         time.Duration
	callDelay     time.Duration
	failNodes     []string
	gpuModel      string
	gpuCount      int
}

type enrollRecord struct {
	fingerprint string
	result      provisioner.Enrollment
}

type opRecord struct {
	fingerprint string
	nodeID      string
	started     time.Time
	fail        bool
	what        string
}

// Option configures a Driver.
type Option func(*Driver)

// WithClock sets the clock operations are timed by.
func WithClock(now func() time.Time) Option { return func(d *Driver) { d.now = now } }

// WithRandom sets the source of enrollment secrets.
func WithRandom(r io.Reader) Option { return func(d *Driver) { d.random = r } }

// New returns an unconfigured driver.
func New(logger hclog.Logger, opts ...Option) *Driver {
	d := &Driver{
		logger:      logger,
		now:         time.Now,
		random:      rand.Reader,
		enrollments: map[string]*enrollRecord{},
		nodes:       map[string]*provisioner.NodeFacts{},
		ops:         map[string]*opRecord{},
	}
	for _, o := range opts {
		o(d)
	}
	return d
}

// Info implements base.BasePlugin.
func (d *Driver) Info(context.Context) (*base.Info, error) {
	return &base.Info{
		Name:          "instantprov",
		Kind:          base.KindProvisioner,
		DriverVersion: Version,
		APIVersions:   provisioner.SupportedAPIVersions(),
	}, nil
}

// ConfigSchema implements base.BasePlugin.
func (d *Driver) ConfigSchema(context.Context) (*base.ConfigSchema, error) {
	return &base.ConfigSchema{Fields: []base.Field{
		{Name: "webhook_secret", Type: base.TypeSecret, Required: true, Description: "Key of the HMAC-SHA256 webhook signature."},
		{Name: "delay", Type: base.TypeDuration, Default: "0s", Description: "How long Provision and Release take."},
		{Name: "call_delay", Type: base.TypeDuration, Default: "0s", Description: "How long every call waits before answering (honours cancellation)."},
		{Name: "fail_nodes", Type: base.TypeStringList, Default: []string{}, Description: "Node ids whose operations fail and whose probe reports unhealthy."},
		{Name: "gpu_model", Type: base.TypeString, Default: "NVIDIA H100 80GB HBM3", Description: "GPU model reported for every node."},
		{Name: "gpu_count", Type: base.TypeInt, Default: 8, Description: "GPUs reported for every node."},
	}}, nil
}

// Configure implements base.BasePlugin.
func (d *Driver) Configure(_ context.Context, cfg *base.Config) error {
	s := &settings{
		webhookSecret: []byte(cfg.String("webhook_secret")),
		delay:         cfg.Duration("delay"),
		callDelay:     cfg.Duration("call_delay"),
		failNodes:     cfg.Strings("fail_nodes"),
		gpuModel:      cfg.String("gpu_model"),
		gpuCount:      int(cfg.Int("gpu_count")),
	}
	switch {
	case len(s.webhookSecret) < 16:
		return &base.ConfigError{Field: "webhook_secret", Reason: "shorter than 16 bytes"}
	case s.delay < 0:
		return &base.ConfigError{Field: "delay", Reason: "negative"}
	case s.callDelay < 0:
		return &base.ConfigError{Field: "call_delay", Reason: "negative"}
	case s.gpuCount < 0:
		return &base.ConfigError{Field: "gpu_count", Reason: "negative"}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.cfg = s
	d.logger.Info("configured", "instance", cfg.Instance, "api_version", cfg.APIVersion, "delay", s.delay)
	return nil
}

// enter waits call_delay (or until ctx ends) and returns the settings.
func (d *Driver) enter(ctx context.Context) (*settings, error) {
	d.mu.Lock()
	s := d.cfg
	d.mu.Unlock()
	if s == nil {
		return nil, fmt.Errorf("instantprov: not configured: %w", base.ErrFailedPrecondition)
	}
	if s.callDelay > 0 {
		t := time.NewTimer(s.callDelay)
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
			return nil, fmt.Errorf("instantprov: %w", ctx.Err())
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("instantprov: %w", err)
	}
	return s, nil
}

// Capabilities implements provisioner.Driver.
func (d *Driver) Capabilities(ctx context.Context) (*provisioner.Capabilities, error) {
	if _, err := d.enter(ctx); err != nil {
		return nil, err
	}
	return &provisioner.Capabilities{
		ReleaseModes: []provisioner.ReleaseMode{provisioner.ReleaseRevoke, provisioner.ReleaseWipe, provisioner.ReleaseReimage},
		Images:       []string{"ubuntu-22.04-cuda-12", "ubuntu-24.04-cuda-12"},
	}, nil
}

// Enroll implements provisioner.Driver.
func (d *Driver) Enroll(ctx context.Context, req *provisioner.EnrollRequest) (*provisioner.Enrollment, error) {
	s, err := d.enter(ctx)
	if err != nil {
		return nil, err
	}
	fp := strings.Join([]string{req.NodeID, req.Address, req.Pool, strings.Join(req.Tags, ",")}, "\x00")
	d.mu.Lock()
	defer d.mu.Unlock()
	if rec, ok := d.enrollments[req.OperationID]; ok {
		if rec.fingerprint != fp {
			return nil, fmt.Errorf("instantprov: enroll: operation %q was used for another request: %w", req.OperationID, base.ErrConflict)
		}
		out := rec.result
		return &out, nil
	}
	secret := make([]byte, 32)
	if _, err := io.ReadFull(d.random, secret); err != nil {
		return nil, fmt.Errorf("instantprov: enroll: secret: %w", err)
	}
	facts := provisioner.NodeFacts{
		NodeID:      req.NodeID,
		Hostname:    req.NodeID,
		GPUs:        []provisioner.GPU{{Model: s.gpuModel, Count: s.gpuCount, MemoryBytes: 80 << 30}},
		CPU:         provisioner.CPU{Model: "AMD EPYC 9654", Cores: 96},
		MemoryBytes: 1536 << 30,
		DiskBytes:   7680 << 30,
		Tags:        slices.Clone(req.Tags),
		Pool:        req.Pool,
	}
	rec := &enrollRecord{fingerprint: fp, result: provisioner.Enrollment{Facts: facts, Secret: hex.EncodeToString(secret)}}
	d.enrollments[req.OperationID] = rec
	d.nodes[req.NodeID] = &rec.result.Facts
	d.logger.Info("node enrolled", "node_id", req.NodeID, "operation_id", req.OperationID)
	out := rec.result
	return &out, nil
}

func (d *Driver) start(ctx context.Context, what, opID, nodeID, fp string) (*provisioner.Operation, error) {
	s, err := d.enter(ctx)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if rec, ok := d.ops[opID]; ok {
		if rec.fingerprint != fp {
			return nil, fmt.Errorf("instantprov: %s: operation %q was used for another request: %w", what, opID, base.ErrConflict)
		}
		return d.progress(s, opID, rec), nil
	}
	if _, ok := d.nodes[nodeID]; !ok {
		return nil, fmt.Errorf("instantprov: %s: node %q is not enrolled: %w", what, nodeID, base.ErrNotFound)
	}
	rec := &opRecord{fingerprint: fp, nodeID: nodeID, started: d.now(), fail: slices.Contains(s.failNodes, nodeID), what: what}
	d.ops[opID] = rec
	d.logger.Info("operation started", "operation_id", opID, "node_id", nodeID, "what", what)
	return d.progress(s, opID, rec), nil
}

// progress computes an operation's state from the clock.
func (d *Driver) progress(s *settings, opID string, rec *opRecord) *provisioner.Operation {
	now := d.now()
	op := &provisioner.Operation{OperationID: opID, NodeID: rec.nodeID, UpdatedAt: now.UTC()}
	elapsed := now.Sub(rec.started)
	switch {
	case elapsed < s.delay:
		op.State = provisioner.StateRunning
		op.Percent = int(100 * elapsed / s.delay)
		op.Message = rec.what + " in progress"
	case rec.fail:
		op.State = provisioner.StateFailed
		op.Percent = 100
		op.Message = fmt.Sprintf("injected failure for node %q", rec.nodeID)
	default:
		op.State = provisioner.StateSucceeded
		op.Percent = 100
		op.Message = rec.what + " done"
	}
	return op
}

// Provision implements provisioner.Driver.
func (d *Driver) Provision(ctx context.Context, req *provisioner.ProvisionRequest) (*provisioner.Operation, error) {
	fp := strings.Join([]string{"provision", req.NodeID, req.User.Username, strconv.Itoa(req.User.UID), req.Image, strings.Join(req.SSHPublicKeys, "\n")}, "\x00")
	return d.start(ctx, "provision", req.OperationID, req.NodeID, fp)
}

// Release implements provisioner.Driver.
func (d *Driver) Release(ctx context.Context, req *provisioner.ReleaseRequest) (*provisioner.Operation, error) {
	fp := strings.Join([]string{"release", req.NodeID, req.Username, string(req.Mode)}, "\x00")
	return d.start(ctx, "release", req.OperationID, req.NodeID, fp)
}

// Status implements provisioner.Driver.
func (d *Driver) Status(ctx context.Context, operationID string) (*provisioner.Operation, error) {
	s, err := d.enter(ctx)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	rec, ok := d.ops[operationID]
	if !ok {
		return nil, fmt.Errorf("instantprov: status: operation %q: %w", operationID, base.ErrNotFound)
	}
	return d.progress(s, operationID, rec), nil
}

// Probe implements provisioner.Driver.
func (d *Driver) Probe(ctx context.Context, nodeID string) (*provisioner.Health, error) {
	s, err := d.enter(ctx)
	if err != nil {
		return nil, err
	}
	if nodeID == "" {
		return &provisioner.Health{Healthy: true, Message: "no backend to reach"}, nil
	}
	d.mu.Lock()
	_, ok := d.nodes[nodeID]
	d.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("instantprov: probe: node %q: %w", nodeID, base.ErrNotFound)
	}
	if slices.Contains(s.failNodes, nodeID) {
		return &provisioner.Health{Healthy: false, Message: fmt.Sprintf("injected failure for node %q", nodeID)}, nil
	}
	return &provisioner.Health{Healthy: true, Message: "ok"}, nil
}

// DefaultDiscoverLimit is the page size of Discover when the request sets none.
const DefaultDiscoverLimit = 500

// Discover implements provisioner.Discoverer: the enrolled nodes in node id
// order, paged by the last node id returned. A node in fail_nodes is
// broken, every other one ready.
func (d *Driver) Discover(ctx context.Context, req *provisioner.DiscoverRequest) (*provisioner.DiscoverPage, error) {
	s, err := d.enter(ctx)
	if err != nil {
		return nil, err
	}
	limit := req.Limit
	if limit <= 0 {
		limit = DefaultDiscoverLimit
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	ids := make([]string, 0, len(d.nodes))
	for id := range d.nodes {
		if id > req.Cursor {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	page := &provisioner.DiscoverPage{}
	if len(ids) > limit {
		ids = ids[:limit]
		page.NextCursor = ids[limit-1]
	}
	for _, id := range ids {
		facts := *d.nodes[id]
		facts.GPUs, facts.Tags = slices.Clone(facts.GPUs), slices.Clone(facts.Tags)
		n := provisioner.DiscoveredNode{NodeID: id, Ready: true, State: "ready", Facts: &facts}
		if slices.Contains(s.failNodes, id) {
			n.Ready, n.Broken, n.State = false, true, "failed"
		}
		page.Nodes = append(page.Nodes, n)
	}
	return page, nil
}

// Unenroll implements provisioner.Unenroller: the node is forgotten (Probe
// answers base.ErrNotFound, Discover no longer lists it). A node it does not
// know is already unenrolled.
func (d *Driver) Unenroll(ctx context.Context, req *provisioner.UnenrollRequest) error {
	if _, err := d.enter(ctx); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, ok := d.nodes[req.NodeID]; ok {
		delete(d.nodes, req.NodeID)
		d.logger.Info("node unenrolled", "node_id", req.NodeID, "operation_id", req.OperationID)
	}
	return nil
}

// WebhookEvent is the JSON body of an instantprov webhook.
type WebhookEvent struct {
	ID         string                 `json:"id"`
	Type       string                 `json:"type"` // "facts" or "health"
	NodeID     string                 `json:"node_id"`
	OccurredAt time.Time              `json:"occurred_at"`
	Facts      *provisioner.NodeFacts `json:"facts,omitempty"`
	Healthy    bool                   `json:"healthy,omitempty"`
	Message    string                 `json:"message,omitempty"`
}

// Sign returns the SignatureHeader value for body at time t.
func Sign(secret []byte, t time.Time, body []byte) string {
	ts := strconv.FormatInt(t.Unix(), 10)
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte(ts + "."))
	mac.Write(body)
	return "t=" + ts + ",v1=" + hex.EncodeToString(mac.Sum(nil))
}

// SignedWebhook builds a signed webhook for event, as the backend would.
func SignedWebhook(secret []byte, now time.Time, event WebhookEvent) (*provisioner.Webhook, error) {
	body, err := json.Marshal(event)
	if err != nil {
		return nil, fmt.Errorf("instantprov: webhook: %w", err)
	}
	h := http.Header{}
	h.Set("Content-Type", "application/json")
	h.Set(SignatureHeader, Sign(secret, now, body))
	return &provisioner.Webhook{Body: body, Header: h}, nil
}

func verify(secret []byte, now time.Time, hook *provisioner.Webhook) error {
	sig := hook.Header.Get(SignatureHeader)
	if sig == "" {
		return fmt.Errorf("instantprov: webhook: no %s header: %w", SignatureHeader, base.ErrUnauthenticated)
	}
	var ts, v1 string
	for _, part := range strings.Split(sig, ",") {
		k, v, _ := strings.Cut(part, "=")
		switch k {
		case "t":
			ts = v
		case "v1":
			v1 = v
		}
	}
	sec, err := strconv.ParseInt(ts, 10, 64)
	if err != nil {
		return fmt.Errorf("instantprov: webhook: bad signature timestamp: %w", base.ErrUnauthenticated)
	}
	if age := now.Sub(time.Unix(sec, 0)); age > WebhookTolerance || age < -WebhookTolerance {
		return fmt.Errorf("instantprov: webhook: signature timestamp outside tolerance: %w", base.ErrUnauthenticated)
	}
	want := Sign(secret, time.Unix(sec, 0), hook.Body)
	if !hmac.Equal([]byte(want), []byte("t="+ts+",v1="+v1)) {
		return fmt.Errorf("instantprov: webhook: signature mismatch: %w", base.ErrUnauthenticated)
	}
	return nil
}

// HandleWebhook implements provisioner.WebhookHandler.
func (d *Driver) HandleWebhook(ctx context.Context, hook *provisioner.Webhook) ([]provisioner.NodeEvent, error) {
	s, err := d.enter(ctx)
	if err != nil {
		return nil, err
	}
	if err := verify(s.webhookSecret, d.now(), hook); err != nil {
		return nil, err
	}
	var ev WebhookEvent
	if err := json.Unmarshal(hook.Body, &ev); err != nil {
		return nil, fmt.Errorf("instantprov: webhook: %v: %w", err, base.ErrInvalidArgument)
	}
	if ev.ID == "" || ev.NodeID == "" {
		return nil, fmt.Errorf("instantprov: webhook: event without id or node id: %w", base.ErrInvalidArgument)
	}
	out := provisioner.NodeEvent{ID: ev.ID, NodeID: ev.NodeID, OccurredAt: ev.OccurredAt}
	switch ev.Type {
	case "facts":
		if ev.Facts == nil {
			return nil, fmt.Errorf("instantprov: webhook: facts event without facts: %w", base.ErrInvalidArgument)
		}
		facts := *ev.Facts
		facts.NodeID = ev.NodeID
		out.Type, out.Facts = provisioner.EventFacts, &facts
	case "health":
		out.Type, out.Health = provisioner.EventHealth, &provisioner.Health{Healthy: ev.Healthy, Message: ev.Message}
	default:
		return nil, nil // verified, but nothing the core needs
	}
	return []provisioner.NodeEvent{out}, nil
}
