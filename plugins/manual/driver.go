// Package manual is the gpuaas provisioner driver for hosts an operator
// brings in by hand. It realises the provisioner contract through the node
// agent: Provision and Release queue signed tasks for the node's gpuaas-agent
// through the core's driver task API (allocation.provision_user,
// allocation.revoke_user, node.wipe), Status follows those tasks, and Probe
// reads the agent's last heartbeat. The driver never reaches the database or
// the nodes itself. With Nomad configured, Enroll also registers a Nomad job
// that runs gpuaas-agent on the node with its enrollment secret, and
// Unenroll (when the core retires the node) removes it.
//
// The driver keeps nothing that matters: the core keeps the tasks, keyed by
// the operation ids the driver passes on, so a restarted driver answers
// Status and repeats Provision and Release with one effect. Enrollment
// secrets are derived (HMAC) from the API key and the operation id, so a
// retried Enroll returns the same secret without the driver storing it.
package manual

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	nomad "github.com/hashicorp/nomad/api"

	"github.com/gpuaas/gpuaas/agent/protocol"
	"github.com/gpuaas/gpuaas/agent/tasks"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
)

// Version is the driver's release version.
const Version = "0.1.0"

// Operation kinds the driver remembers.
const (
	kindEnroll    = "enroll"
	kindProvision = "provision"
	kindRelease   = "release"
	kindUnenroll  = "unenroll"
)

// maxTaskAttempts is how often the core hands a task to the agent before it
// counts as failed.
const maxTaskAttempts = 5

// Driver is the manual provisioner driver.
type Driver struct {
	logger hclog.Logger
	now    func() time.Time

	mu     sync.Mutex
	cfg    *settings
	ops    map[string]*opRecord // operation id -> the request it was used for
	pruned time.Time
}

var (
	_ provisioner.Driver     = (*Driver)(nil)
	_ provisioner.Unenroller = (*Driver)(nil)
)

// opRecord is a request this process has seen, so that an operation id
// reused for another request is refused. The core keeps the tasks; this is
// only the request's fingerprint.
type opRecord struct {
	kind   string
	nodeID string
	fp     string
	wipe   bool
	at     time.Time
}

// settings is one validated configuration.
type settings struct {
	instance        string
	core            *coreClient
	apiKey          string
	agentURL        string
	agentCA         string // clean PEM the agents pin; "" for their system roots
	tenantSudo      bool
	heartbeatMaxAge time.Duration
	releaseWipe     bool
	taskTTL         time.Duration
	nomad           *nomadJobs // nil without nomad_addr
	agentCommand    string
	scratchDirs     []string
}

// Option configures a Driver.
type Option func(*Driver)

// WithClock sets the clock heartbeats are aged by.
func WithClock(now func() time.Time) Option { return func(d *Driver) { d.now = now } }

// New returns an unconfigured driver.
func New(logger hclog.Logger, opts ...Option) *Driver {
	d := &Driver{logger: logger, now: time.Now, ops: map[string]*opRecord{}}
	for _, o := range opts {
		o(d)
	}
	return d
}

// Info implements base.BasePlugin.
func (d *Driver) Info(context.Context) (*base.Info, error) {
	return &base.Info{
		Name:          "manual",
		Kind:          base.KindProvisioner,
		DriverVersion: Version,
		APIVersions:   provisioner.SupportedAPIVersions(),
	}, nil
}

// ConfigSchema implements base.BasePlugin.
func (d *Driver) ConfigSchema(context.Context) (*base.ConfigSchema, error) {
	return &base.ConfigSchema{Fields: []base.Field{
		{Name: "core_url", Type: base.TypeURL, Required: true, Description: "The core's REST API, e.g. https://gpuaas.example (http or https; link-local and cloud metadata addresses are refused)."},
		{Name: "api_key", Type: base.TypeSecret, Required: true, Description: "API key of a platform admin the driver calls the core's driver task API with. Enrollment secrets are derived from it."},
		{Name: "agent_url", Type: base.TypeURL, Required: true, Description: "The https URL at which agents reach the core's agent listener, e.g. https://gpuaas.example:8443 (passed to gpuaas-agent as -core)."},
		{Name: "agent_ca_pem", Type: base.TypeString, Default: "", Description: "PEM CA certificates agents pin for the agent listener; empty uses the node's system roots."},
		{Name: "tenant_sudo", Type: base.TypeBool, Default: true, Description: "Give tenant users passwordless sudo on their node."},
		{Name: "heartbeat_max_age", Type: base.TypeDuration, Default: "60s", Description: "A node is healthy while its agent's last heartbeat is at most this old."},
		{Name: "release_wipe", Type: base.TypeBool, Default: true, Description: "Offer the wipe release mode: a release also empties the node's scratch areas (node.wipe)."},
		{Name: "task_ttl", Type: base.TypeDuration, Default: "1h", Description: "How long a queued task stays valid for the agent (at most 1h)."},
		{Name: "nomad_addr", Type: base.TypeURL, Description: "Nomad's HTTP API, e.g. https://nomad.example:4646. When set, Enroll registers a Nomad job that runs gpuaas-agent on the node."},
		{Name: "nomad_token", Type: base.TypeSecret, Description: "Nomad ACL token with submit-job and read-job in nomad_namespace."},
		{Name: "nomad_namespace", Type: base.TypeString, Default: "default", Description: "Nomad namespace of the agent jobs."},
		{Name: "nomad_region", Type: base.TypeString, Default: "", Description: "Nomad region of the agent jobs; empty is the agent's region."},
		{Name: "nomad_datacenters", Type: base.TypeStringList, Default: []string{"dc1"}, Description: "Nomad datacenters the agent jobs may be placed in."},
		{Name: "nomad_ca_pem", Type: base.TypeString, Default: "", Description: "PEM CA certificates that sign an https Nomad; empty uses the system roots."},
		{Name: "agent_command", Type: base.TypeString, Default: "/usr/local/bin/gpuaas-agent", Description: "Absolute path of gpuaas-agent on the nodes (the Nomad job runs it with raw_exec)."},
		{Name: "scratch_dirs", Type: base.TypeStringList, Default: []string{}, Description: "Scratch areas node.wipe empties, passed to gpuaas-agent as -scratch (absolute paths; system folders are refused)."},
		{Name: "core_ca_pem", Type: base.TypeString, Default: "", Description: "PEM CA certificates that sign an https core_url; empty uses the system roots."},
		{Name: "request_timeout", Type: base.TypeDuration, Default: "30s", Description: "Timeout of one request to the core or to Nomad."},
	}}, nil
}

var (
	instanceRE   = regexp.MustCompile(`^[a-z][a-z0-9-]{0,62}$`)
	namespaceRE  = regexp.MustCompile(`^[A-Za-z0-9-]{1,128}$`)
	regionRE     = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)
	datacenterRE = regexp.MustCompile(`^[A-Za-z0-9*][A-Za-z0-9._*-]{0,127}$`)
	absPathRE    = regexp.MustCompile(`^(/[A-Za-z0-9._+-]+)+$`)
)

// systemDirs are folders (and everything under them) node.wipe must never
// empty.
func systemDirs() []string {
	return []string{"/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/root", "/run",
		"/sbin", "/snap", "/sys", "/usr", agentStateDir}
}

// topDirs may hold scratch areas but must not be emptied as a whole.
func topDirs() []string {
	return []string{"/home", "/var", "/var/lib", "/var/log", "/var/tmp", "/tmp", "/opt", "/srv", "/mnt", "/media", "/data"}
}

func checkAbsPath(field, p string) error {
	if !absPathRE.MatchString(p) {
		return &base.ConfigError{Field: field, Reason: fmt.Sprintf("%q: want an absolute path of letters, digits and ._+-", p)}
	}
	for _, part := range strings.Split(p, "/") {
		if part == "." || part == ".." {
			return &base.ConfigError{Field: field, Reason: fmt.Sprintf("%q: no . or .. components", p)}
		}
	}
	return nil
}

func checkScratchDir(p string) error {
	if err := checkAbsPath("scratch_dirs", p); err != nil {
		return err
	}
	for _, sys := range systemDirs() {
		if p == sys || strings.HasPrefix(p, sys+"/") {
			return &base.ConfigError{Field: "scratch_dirs", Reason: fmt.Sprintf("%q is a system folder", p)}
		}
	}
	if slices.Contains(topDirs(), p) {
		return &base.ConfigError{Field: "scratch_dirs", Reason: fmt.Sprintf("%q would be emptied as a whole; name a folder inside it", p)}
	}
	return nil
}

func printableToken(field, v string, minLen, maxLen int) error {
	if len(v) < minLen || len(v) > maxLen {
		return &base.ConfigError{Field: field, Reason: fmt.Sprintf("%d characters; want %d to %d", len(v), minLen, maxLen)}
	}
	if strings.ContainsFunc(v, func(r rune) bool { return r <= ' ' || r > '~' }) {
		return &base.ConfigError{Field: field, Reason: "must be printable ASCII without spaces"}
	}
	return nil
}

// newSettings checks a configuration and builds the clients it names.
func newSettings(cfg *base.Config) (*settings, error) {
	if !instanceRE.MatchString(cfg.Instance) {
		return nil, fmt.Errorf("manual: configure: instance name %q must match %s: %w", cfg.Instance, instanceRE, base.ErrInvalidArgument)
	}
	s := &settings{
		instance:        cfg.Instance,
		apiKey:          cfg.String("api_key"),
		tenantSudo:      cfg.Bool("tenant_sudo"),
		heartbeatMaxAge: cfg.Duration("heartbeat_max_age"),
		releaseWipe:     cfg.Bool("release_wipe"),
		taskTTL:         cfg.Duration("task_ttl"),
		agentCommand:    cfg.String("agent_command"),
		scratchDirs:     cfg.Strings("scratch_dirs"),
	}
	timeout := cfg.Duration("request_timeout")
	coreURL, err := checkServiceURL("core_url", cfg.String("core_url"), httpOrHTTPS)
	if err != nil {
		return nil, err
	}
	if err := printableToken("api_key", s.apiKey, 16, 1024); err != nil {
		return nil, err
	}
	if s.agentURL, err = checkServiceURL("agent_url", cfg.String("agent_url"), httpsOnly); err != nil {
		return nil, err
	}
	_, agentCerts, err := certPool("agent_ca_pem", cfg.String("agent_ca_pem"))
	if err != nil {
		return nil, err
	}
	s.agentCA = encodeCerts(agentCerts)
	coreRoots, _, err := certPool("core_ca_pem", cfg.String("core_ca_pem"))
	if err != nil {
		return nil, err
	}
	switch {
	case s.heartbeatMaxAge <= 0 || s.heartbeatMaxAge > 24*time.Hour:
		return nil, &base.ConfigError{Field: "heartbeat_max_age", Reason: "want more than 0 and at most 24h"}
	case s.taskTTL < time.Minute || s.taskTTL > protocol.MaxTaskTTL:
		return nil, &base.ConfigError{Field: "task_ttl", Reason: fmt.Sprintf("want 1m to %s", protocol.MaxTaskTTL)}
	case timeout < time.Second || timeout > 5*time.Minute:
		return nil, &base.ConfigError{Field: "request_timeout", Reason: "want 1s to 5m"}
	}
	if err := checkAbsPath("agent_command", s.agentCommand); err != nil {
		return nil, err
	}
	for _, d := range s.scratchDirs {
		if err := checkScratchDir(d); err != nil {
			return nil, err
		}
	}
	s.core = &coreClient{baseURL: coreURL, apiKey: s.apiKey, instance: s.instance, http: newHTTPClient(coreRoots, timeout)}
	if cfg.String("nomad_addr") != "" {
		if s.nomad, err = newNomadJobs(cfg, timeout); err != nil {
			return nil, err
		}
	}
	return s, nil
}

func newNomadJobs(cfg *base.Config, timeout time.Duration) (*nomadJobs, error) {
	addr, err := checkServiceURL("nomad_addr", cfg.String("nomad_addr"), httpOrHTTPS)
	if err != nil {
		return nil, err
	}
	token := cfg.String("nomad_token")
	if token != "" {
		if err := printableToken("nomad_token", token, 1, 512); err != nil {
			return nil, err
		}
	}
	n := &nomadJobs{namespace: cfg.String("nomad_namespace"), region: cfg.String("nomad_region"), datacenters: cfg.Strings("nomad_datacenters")}
	if !namespaceRE.MatchString(n.namespace) {
		return nil, &base.ConfigError{Field: "nomad_namespace", Reason: fmt.Sprintf("%q must match %s", n.namespace, namespaceRE)}
	}
	if n.region != "" && !regionRE.MatchString(n.region) {
		return nil, &base.ConfigError{Field: "nomad_region", Reason: fmt.Sprintf("%q must match %s", n.region, regionRE)}
	}
	if len(n.datacenters) == 0 {
		return nil, &base.ConfigError{Field: "nomad_datacenters", Reason: "at least one datacenter"}
	}
	for _, dc := range n.datacenters {
		if !datacenterRE.MatchString(dc) {
			return nil, &base.ConfigError{Field: "nomad_datacenters", Reason: fmt.Sprintf("%q must match %s", dc, datacenterRE)}
		}
	}
	roots, _, err := certPool("nomad_ca_pem", cfg.String("nomad_ca_pem"))
	if err != nil {
		return nil, err
	}
	n.client, err = nomad.NewClient(&nomad.Config{
		Address:    addr,
		SecretID:   token,
		Namespace:  n.namespace,
		Region:     n.region,
		HttpClient: newHTTPClient(roots, timeout),
	})
	if err != nil {
		return nil, &base.ConfigError{Field: "nomad_addr", Reason: err.Error()}
	}
	return n, nil
}

// Configure implements base.BasePlugin: it checks the configuration, that
// the core answers and accepts the API key, and that Nomad (when set)
// accepts the token.
func (d *Driver) Configure(ctx context.Context, cfg *base.Config) error {
	s, err := newSettings(cfg)
	if err != nil {
		return err
	}
	if err := s.core.healthz(ctx); err != nil {
		return fmt.Errorf("manual: configure: %w", err)
	}
	if err := s.core.checkKey(ctx); err != nil {
		if errors.Is(err, base.ErrUnauthenticated) || errors.Is(err, base.ErrPermissionDenied) {
			return &base.ConfigError{Field: "api_key", Reason: "the core refused it: " + err.Error()}
		}
		return fmt.Errorf("manual: configure: %w", err)
	}
	if s.nomad != nil {
		// Only Enroll and Unenroll need Nomad: an unreachable Nomad is a warning, a
		// refused token a configuration error.
		_, err := s.nomad.agentStatus(ctx, "gpuaas-manual-token-check")
		switch {
		case ctx.Err() != nil:
			return fmt.Errorf("manual: configure: %w", ctx.Err())
		case errors.Is(err, base.ErrPermissionDenied), errors.Is(err, base.ErrUnauthenticated):
			return &base.ConfigError{Field: "nomad_token", Reason: "Nomad refused it: " + err.Error()}
		case err != nil:
			d.logger.Warn("Nomad does not answer; Enroll and Unenroll will fail until it does", "error", err)
		}
	}
	d.mu.Lock()
	old := d.cfg
	d.cfg = s
	d.mu.Unlock()
	if old != nil {
		// Calls still using the old clients finish; their idle connections go.
		old.core.http.CloseIdleConnections()
		if old.nomad != nil {
			old.nomad.client.Close()
		}
	}
	d.logger.Info("configured", "instance", s.instance, "api_version", cfg.APIVersion, "core_url", s.core.baseURL,
		"nomad", s.nomad != nil, "release_wipe", s.releaseWipe, "tenant_sudo", s.tenantSudo)
	return nil
}

// enter returns the settings, or an error when the driver is not
// configured or ctx is done.
func (d *Driver) enter(ctx context.Context) (*settings, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("manual: %w", err)
	}
	d.mu.Lock()
	s := d.cfg
	d.mu.Unlock()
	if s == nil {
		return nil, fmt.Errorf("manual: not configured: %w", base.ErrFailedPrecondition)
	}
	return s, nil
}

// Capabilities implements provisioner.Driver: revoke, and wipe when
// release_wipe is on. Images are not the driver's business (the host keeps
// its OS).
func (d *Driver) Capabilities(ctx context.Context) (*provisioner.Capabilities, error) {
	s, err := d.enter(ctx)
	if err != nil {
		return nil, err
	}
	modes := []provisioner.ReleaseMode{provisioner.ReleaseRevoke}
	if s.releaseWipe {
		modes = append(modes, provisioner.ReleaseWipe)
	}
	return &provisioner.Capabilities{ReleaseModes: modes}, nil
}

// reserve records the request an operation id is used for. It fails with
// base.ErrConflict when this process saw the id used for another request,
// and reports whether the id was new to it.
func (d *Driver) reserve(opID string, rec *opRecord) (fresh bool, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if prev, ok := d.ops[opID]; ok {
		if prev.kind != rec.kind || prev.fp != rec.fp {
			return false, fmt.Errorf("manual: %s: operation %q was used for another request (a %s of node %q): %w",
				rec.kind, opID, prev.kind, prev.nodeID, base.ErrConflict)
		}
		return false, nil
	}
	now := d.now()
	rec.at = now
	d.ops[opID] = rec
	if len(d.ops) > 10000 && now.Sub(d.pruned) > time.Minute {
		// Operations are retried within minutes; a day is plenty.
		for id, r := range d.ops {
			if now.Sub(r.at) > 24*time.Hour {
				delete(d.ops, id)
			}
		}
		d.pruned = now
	}
	return true, nil
}

// forget drops a reservation whose request surely had no effect.
func (d *Driver) forget(opID string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.ops, opID)
}

func (d *Driver) record(opID string) *opRecord {
	d.mu.Lock()
	defer d.mu.Unlock()
	if r, ok := d.ops[opID]; ok {
		out := *r
		return &out
	}
	return nil
}

// enrollSecret derives the secret a node's agent enrolls with: the same
// for the same instance, operation and node, never stored.
func (s *settings) enrollSecret(operationID, nodeID string) string {
	mac := hmac.New(sha256.New, []byte(s.apiKey))
	mac.Write([]byte("gpuaas-manual-enroll\x00" + s.instance + "\x00" + operationID + "\x00" + nodeID))
	return "gpe_" + base64.RawURLEncoding.EncodeToString(mac.Sum(nil))
}

// Enroll implements provisioner.Driver: NodeID is the host's name (its
// Nomad node name when Nomad runs the agent). The facts are the node's id,
// host name (Address, else NodeID), pool and tags, and the hardware the
// operator declared in Params (gpu_model, gpu_count, gpu_memory_bytes,
// cpu_model, cpu_cores, memory_bytes, disk_bytes); the agent's heartbeats
// report the real ones. With Nomad configured the agent job is registered
// (or updated) with the secret.
func (d *Driver) Enroll(ctx context.Context, req *provisioner.EnrollRequest) (*provisioner.Enrollment, error) {
	s, err := d.enter(ctx)
	if err != nil {
		return nil, err
	}
	facts, err := enrollFacts(req)
	if err != nil {
		return nil, err
	}
	if _, err := d.reserve(req.OperationID, &opRecord{kind: kindEnroll, nodeID: req.NodeID, fp: fingerprint(kindEnroll, facts)}); err != nil {
		return nil, err
	}
	secret := s.enrollSecret(req.OperationID, req.NodeID)
	if s.nomad != nil {
		resp, err := s.nomad.register(ctx, &agentJob{
			instance: s.instance, nodeID: req.NodeID, secret: secret, agentURL: s.agentURL, agentCA: s.agentCA,
			command: s.agentCommand, scratchDirs: s.scratchDirs,
		})
		if err != nil {
			return nil, fmt.Errorf("manual: enroll: %w", err)
		}
		d.logger.Info("agent job registered", "node_id", req.NodeID, "operation_id", req.OperationID,
			"job", agentJobID(req.NodeID), "eval_id", resp.EvalID, "job_modify_index", resp.JobModifyIndex)
	}
	d.logger.Info("node enrolled", "node_id", req.NodeID, "operation_id", req.OperationID)
	return &provisioner.Enrollment{Facts: *facts, Secret: secret, AgentRequired: true}, nil
}

// Unenroll implements provisioner.Unenroller; the core calls it when it
// retires the node. With Nomad configured the node's agent job is stopped
// and purged (a job Nomad does not have, or one another instance
// registered, is left as it is), so Nomad no longer runs the agent. Without
// Nomad there is nothing to undo: the operator stops the agent on the host.
// The core itself revokes the agent's certificate and enrollment secrets.
func (d *Driver) Unenroll(ctx context.Context, req *provisioner.UnenrollRequest) error {
	s, err := d.enter(ctx)
	if err != nil {
		return err
	}
	if checkNodeID("unenroll", req.NodeID) != nil {
		return nil // not a host name: never a node of this driver
	}
	if _, err := d.reserve(req.OperationID, &opRecord{kind: kindUnenroll, nodeID: req.NodeID, fp: fingerprint(kindUnenroll, req.NodeID)}); err != nil {
		return err
	}
	if s.nomad == nil {
		d.logger.Info("node unenrolled; without Nomad its agent keeps running until the operator stops it", "node_id", req.NodeID, "operation_id", req.OperationID)
		return nil
	}
	removed, err := s.nomad.deregister(ctx, s.instance, req.NodeID)
	if err != nil {
		return fmt.Errorf("manual: unenroll: %w", err)
	}
	d.logger.Info("node unenrolled", "node_id", req.NodeID, "operation_id", req.OperationID, "job", agentJobID(req.NodeID), "job_removed", removed)
	return nil
}

// queue queues one task of an operation. A request the core refused
// before queueing anything releases the operation id's reservation.
func (d *Driver) queue(ctx context.Context, s *settings, what string, req *taskRequest) (*nodeTask, bool, error) {
	req.TTLSeconds = int(s.taskTTL / time.Second)
	req.MaxAttempts = maxTaskAttempts
	t, created, err := s.core.enqueue(ctx, req)
	switch {
	case err == nil:
	case coreCode(err) == codeNodeNotFound:
		return nil, false, fmt.Errorf("manual: %s: node %q is not a node of instance %s: %w", what, req.ExternalID, s.instance, err)
	case coreCode(err) == codeTaskConflict:
		return nil, false, fmt.Errorf("manual: %s: operation %q was used for another request: %w", what, req.OperationID, err)
	default:
		return nil, false, err
	}
	if (t.ExternalID != "" && t.ExternalID != req.ExternalID) || t.Type != req.Type {
		return nil, false, fmt.Errorf("manual: %s: operation %q is a %s task of node %q: %w", what, req.OperationID, t.Type, t.ExternalID, base.ErrConflict)
	}
	if created {
		d.logger.Info("task queued", "node_id", req.ExternalID, "operation_id", req.OperationID, "type", req.Type, "task_id", t.ID)
	}
	return t, created, nil
}

// refusedBeforeQueueing reports whether the core refused a request without
// queueing a task.
func refusedBeforeQueueing(err error) bool {
	return errors.Is(err, base.ErrInvalidArgument) || coreCode(err) == codeNodeNotFound
}

// Provision implements provisioner.Driver: it queues an
// allocation.provision_user task for the node's agent, keyed by the
// operation id (a retry is the same task).
func (d *Driver) Provision(ctx context.Context, req *provisioner.ProvisionRequest) (*provisioner.Operation, error) {
	s, err := d.enter(ctx)
	if err != nil {
		return nil, err
	}
	p, err := provisionParams(req, s.tenantSudo)
	if err != nil {
		return nil, err
	}
	fresh, err := d.reserve(req.OperationID, &opRecord{kind: kindProvision, nodeID: req.NodeID, fp: fingerprint(kindProvision, req.NodeID, p)})
	if err != nil {
		return nil, err
	}
	t, created, err := d.queue(ctx, s, "provision", &taskRequest{ExternalID: req.NodeID, Type: protocol.TaskProvisionUser, Params: p, OperationID: req.OperationID})
	if err != nil {
		if fresh && refusedBeforeQueueing(err) {
			d.forget(req.OperationID)
		}
		return nil, err
	}
	if fresh && !created {
		// Queued before this process started: the core does not show a
		// task's parameters, but a finished task's output names the user.
		if err := sameProvision(t, p); err != nil {
			d.forget(req.OperationID)
			return nil, fmt.Errorf("manual: provision: operation %q was used for another request: %v: %w", req.OperationID, err, base.ErrConflict)
		}
	}
	return operationOf(req.OperationID, []*nodeTask{t}, false), nil
}

// sameProvision compares a finished provision task's output with p.
func sameProvision(t *nodeTask, p *tasks.ProvisionUserParams) error {
	if t.Output == nil {
		return nil
	}
	if u, ok := t.Output["username"].(string); ok && u != p.Username {
		return fmt.Errorf("it provisioned user %q", u)
	}
	if uid, ok := t.Output["uid"].(float64); ok && p.UID != 0 && int(uid) != p.UID {
		return fmt.Errorf("it provisioned uid %d", int(uid))
	}
	if keys, ok := t.Output["keys"].(float64); ok && int(keys) != len(p.SSHPublicKeys) {
		return fmt.Errorf("it installed %d keys", int(keys))
	}
	if sudo, ok := t.Output["sudo"].(bool); ok && sudo != p.Sudo {
		return fmt.Errorf("it set sudo to %t", sudo)
	}
	return nil
}

// Release implements provisioner.Driver: it queues allocation.revoke_user
// (kill the user's processes, remove the account and home) and, for the
// wipe mode, node.wipe (empty the scratch areas) under the operation id
// plus "/wipe". The agent runs them in that order.
func (d *Driver) Release(ctx context.Context, req *provisioner.ReleaseRequest) (*provisioner.Operation, error) {
	s, err := d.enter(ctx)
	if err != nil {
		return nil, err
	}
	p, wipe, err := releaseParams(req, s.releaseWipe)
	if err != nil {
		return nil, err
	}
	fresh, err := d.reserve(req.OperationID, &opRecord{kind: kindRelease, nodeID: req.NodeID, fp: fingerprint(kindRelease, req.NodeID, p, wipe), wipe: wipe})
	if err != nil {
		return nil, err
	}
	t, created, err := d.queue(ctx, s, "release", &taskRequest{ExternalID: req.NodeID, Type: protocol.TaskRevokeUser, Params: p, OperationID: req.OperationID})
	if err != nil {
		if fresh && refusedBeforeQueueing(err) {
			d.forget(req.OperationID)
		}
		return nil, err
	}
	if fresh && !created && t.Output != nil {
		if u, ok := t.Output["username"].(string); ok && u != p.Username {
			d.forget(req.OperationID)
			return nil, fmt.Errorf("manual: release: operation %q was used for another request: it revoked user %q: %w", req.OperationID, u, base.ErrConflict)
		}
	}
	ts := []*nodeTask{t}
	if wipe {
		w, _, err := d.queue(ctx, s, "release", &taskRequest{ExternalID: req.NodeID, Type: protocol.TaskWipe,
			Params: &tasks.WipeParams{AllocationID: req.AllocationID}, OperationID: req.OperationID + wipeSuffix})
		if err != nil {
			return nil, err
		}
		ts = append(ts, w)
	}
	return operationOf(req.OperationID, ts, false), nil
}

// Status implements provisioner.Driver: the operation's task (and a
// release's wipe task), as the core reports them.
func (d *Driver) Status(ctx context.Context, operationID string) (*provisioner.Operation, error) {
	s, err := d.enter(ctx)
	if err != nil {
		return nil, err
	}
	if operationID == "" || len(operationID) > 200 {
		return nil, fmt.Errorf("manual: status: operation id of %d characters: %w", len(operationID), base.ErrInvalidArgument)
	}
	t, err := s.core.task(ctx, operationID)
	if err != nil {
		if errors.Is(err, base.ErrNotFound) {
			return nil, fmt.Errorf("manual: status: operation %q: %w", operationID, err)
		}
		return nil, err
	}
	ts := []*nodeTask{t}
	missingWipe := false
	if rec := d.record(operationID); t.Type == protocol.TaskRevokeUser && (rec == nil || rec.wipe) {
		w, err := s.core.task(ctx, operationID+wipeSuffix)
		switch {
		case err == nil:
			ts = append(ts, w)
		case errors.Is(err, base.ErrNotFound):
			// A release without wipe; or, when this process queued the
			// revoke with a wipe, the wipe is not queued yet (Release
			// failed half-way and will be retried).
			missingWipe = rec != nil && rec.wipe
		default:
			return nil, err
		}
	}
	return operationOf(operationID, ts, missingWipe), nil
}

// operationOf reports an operation made of tasks: failed when one failed
// or expired, succeeded when all did, running when one was leased or done,
// else pending.
func operationOf(opID string, ts []*nodeTask, missingWipe bool) *provisioner.Operation {
	op := &provisioner.Operation{OperationID: opID, NodeID: ts[0].ExternalID}
	total, done, started, percent := len(ts), 0, 0, 0
	var failed *nodeTask
	var waiting []string
	for _, t := range ts {
		if t.UpdatedAt.After(op.UpdatedAt) {
			op.UpdatedAt = t.UpdatedAt.UTC()
		}
		switch t.State {
		case taskSucceeded:
			done++
			percent += 100
		case taskLeased:
			started++
			percent += 50
			waiting = append(waiting, fmt.Sprintf("%s running on the node (attempt %d)", t.Type, t.Attempts))
		case taskFailed, taskExpired:
			if failed == nil {
				failed = t
			}
		default:
			waiting = append(waiting, fmt.Sprintf("%s queued for the node's agent", t.Type))
		}
	}
	if missingWipe {
		total++
		waiting = append(waiting, protocol.TaskWipe+" not queued yet")
	}
	switch {
	case failed != nil:
		reason := failed.Error
		if reason == "" {
			reason = "no reason given"
		}
		op.State, op.Percent, op.Message = provisioner.StateFailed, 100, fmt.Sprintf("%s %s: %s", failed.Type, failed.State, reason)
	case done == total:
		names := make([]string, len(ts))
		for i, t := range ts {
			names[i] = t.Type
		}
		op.State, op.Percent, op.Message = provisioner.StateSucceeded, 100, strings.Join(names, " and ")+" succeeded"
	case started > 0 || done > 0:
		op.State, op.Percent, op.Message = provisioner.StateRunning, percent/total, strings.Join(waiting, "; ")
	default:
		op.State, op.Percent, op.Message = provisioner.StatePending, 0, strings.Join(waiting, "; ")
	}
	return op
}

// Probe implements provisioner.Driver. With no node: the core answers and
// accepts the API key. With a node: its agent's last heartbeat is at most
// heartbeat_max_age old and the node is neither offline nor retired; with
// Nomad configured the message also tells how the agent job stands.
func (d *Driver) Probe(ctx context.Context, nodeID string) (*provisioner.Health, error) {
	s, err := d.enter(ctx)
	if err != nil {
		return nil, err
	}
	if nodeID == "" {
		err := s.core.healthz(ctx)
		if err == nil {
			err = s.core.checkKey(ctx)
		}
		switch {
		case ctx.Err() != nil:
			return nil, fmt.Errorf("manual: probe: %w", ctx.Err())
		case err != nil:
			return &provisioner.Health{Healthy: false, Message: err.Error()}, nil
		}
		return &provisioner.Health{Healthy: true, Message: fmt.Sprintf("the core at %s answers and accepts the API key", s.core.baseURL)}, nil
	}
	if err := checkNodeID("probe", nodeID); err != nil {
		return nil, fmt.Errorf("manual: probe: %q cannot be a node of this driver: %w", nodeID, base.ErrNotFound)
	}
	n, err := s.core.node(ctx, nodeID)
	if err != nil {
		return nil, fmt.Errorf("manual: probe: %w", err)
	}
	h := nodeHealth(n, d.now(), s.heartbeatMaxAge)
	if s.nomad != nil {
		st, err := s.nomad.agentStatus(ctx, nodeID)
		switch {
		case ctx.Err() != nil:
			return nil, fmt.Errorf("manual: probe: %w", ctx.Err())
		case err != nil:
			h.Message += "; Nomad: " + err.Error()
		default:
			h.Message += "; " + st
		}
	}
	return h, nil
}

// nodeHealth judges a node by its agent's heartbeat and its state.
func nodeHealth(n *coreNode, now time.Time, maxAge time.Duration) *provisioner.Health {
	switch {
	case n.State == "offline" || n.State == "retired":
		msg := "node is " + n.State
		if n.StateReason != "" {
			msg += ": " + n.StateReason
		}
		return &provisioner.Health{Healthy: false, Message: msg}
	case n.HeartbeatAt == nil:
		return &provisioner.Health{Healthy: false, Message: fmt.Sprintf("node is %s; its agent has not reported yet", n.State)}
	}
	age := max(now.Sub(*n.HeartbeatAt), 0).Round(time.Second)
	if age > maxAge {
		return &provisioner.Health{Healthy: false, Message: fmt.Sprintf("node is %s; the agent's last heartbeat is %s old (more than %s)", n.State, age, maxAge)}
	}
	return &provisioner.Health{Healthy: true, Message: fmt.Sprintf("node is %s; agent heartbeat %s ago", n.State, age)}
}
