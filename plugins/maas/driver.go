// Package maas is the gpuaas provisioner driver for Canonical MAAS: it
// enrolls commissioned machines, hands a machine to a tenant by allocating
// it and deploying an image whose cloud-init creates the tenant user with
// its SSH keys, takes it back by releasing it with disk erasure, and turns
// the reports of its commissioning script into node facts.
//
// The driver keeps no state that matters: every operation is recorded in
// MAAS (workload annotations on the machine, the operation id in the event
// log comments), so a restarted driver answers Status and repeats
// Provision and Release without a second deploy or release.
package maas

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	gomaas "github.com/canonical/gomaasclient/client"
	"github.com/canonical/gomaasclient/entity"
	"github.com/canonical/gomaasclient/entity/event"
	"github.com/canonical/gomaasclient/entity/node"
	"github.com/hashicorp/go-hclog"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
)

// Version is the driver's release version.
const Version = "0.1.0"

// Workload annotations the driver keeps on machines it provisions.
const (
	annOperation   = "gpuaas_operation"
	annFingerprint = "gpuaas_fingerprint"
	annAllocation  = "gpuaas_allocation"
	annUser        = "gpuaas_user"
	annInstance    = "gpuaas_instance"
	annRelease     = "gpuaas_release_operation"
)

// Operation kinds.
const (
	kindProvision = "provision"
	kindRelease   = "release"
)

// Erase modes.
const (
	eraseSecure = "secure"
	eraseQuick  = "quick"
	eraseNone   = "none"
)

// Driver is the MAAS provisioner driver.
type Driver struct {
	logger hclog.Logger
	now    func() time.Time

	mu      sync.Mutex
	cfg     *settings
	enrolls map[string]string    // operation id -> request fingerprint
	ops     map[string]*opRecord // operation id -> what it is
	locks   map[string]chan struct{}
}

var (
	_ provisioner.Driver         = (*Driver)(nil)
	_ provisioner.WebhookHandler = (*Driver)(nil)
	_ provisioner.Discoverer     = (*Driver)(nil)
)

// settings is one validated configuration.
type settings struct {
	instance         string
	conn             *conn
	username         string // the MAAS user the API key belongs to
	eraseMode        string
	defaultImage     string
	images           []string
	webhookURL       string
	webhookSecret    []byte
	webhookTolerance time.Duration
	scriptName       string
	tenantSudo       bool
}

// opRecord is what the driver knows of an operation.
type opRecord struct {
	kind        string
	systemID    string
	fingerprint string
	heldBy      string // release: the provision operation on the machine when released
	percent     int
	final       *provisioner.Operation
}

// Option configures a Driver.
type Option func(*Driver)

// WithClock sets the clock (webhook freshness, operation times).
func WithClock(now func() time.Time) Option { return func(d *Driver) { d.now = now } }

// New returns an unconfigured driver.
func New(logger hclog.Logger, opts ...Option) *Driver {
	d := &Driver{
		logger:  logger,
		now:     time.Now,
		enrolls: map[string]string{},
		ops:     map[string]*opRecord{},
		locks:   map[string]chan struct{}{},
	}
	for _, o := range opts {
		o(d)
	}
	return d
}

// Info implements base.BasePlugin.
func (d *Driver) Info(context.Context) (*base.Info, error) {
	return &base.Info{
		Name:          "maas",
		Kind:          base.KindProvisioner,
		DriverVersion: Version,
		APIVersions:   provisioner.SupportedAPIVersions(),
	}, nil
}

// ConfigSchema implements base.BasePlugin.
func (d *Driver) ConfigSchema(context.Context) (*base.ConfigSchema, error) {
	return &base.ConfigSchema{Fields: []base.Field{
		{Name: "maas_url", Type: base.TypeURL, Required: true, Description: "MAAS region URL, e.g. http://maas.example:5240/MAAS (http or https; link-local and cloud metadata addresses are refused)."},
		{Name: "api_key", Type: base.TypeSecret, Required: true, Description: "MAAS API key the driver acts with: consumer_key:token_key:token_secret. The user needs admin rights to install the commissioning script."},
		{Name: "ca_cert", Type: base.TypeString, Default: "", Description: "PEM CA certificates that sign an https MAAS; empty uses the system roots."},
		{Name: "erase_mode", Type: base.TypeString, Default: eraseQuick, Description: "Disk erase on release: secure (the drive's secure erase, a quick wipe where unsupported), quick (wipe the start and end of each disk) or none."},
		{Name: "default_image", Type: base.TypeString, Default: "ubuntu/jammy", Description: "Image (MAAS distro series) deployed when a provision request names none."},
		{Name: "images", Type: base.TypeStringList, Default: []string{"ubuntu/jammy", "ubuntu/noble"}, Description: "Images (MAAS distro series) tenants may ask for."},
		{Name: "webhook_url", Type: base.TypeURL, Required: true, Description: "The core's MAAS webhook (POST /api/v1/webhooks/maas/{instance}) that the commissioning script reports machine facts to."},
		{Name: "webhook_secret", Type: base.TypeSecret, Required: true, Description: "HMAC-SHA256 key of commissioning webhooks: 32 to 256 printable ASCII characters. It is written into the commissioning script stored in MAAS."},
		{Name: "webhook_tolerance", Type: base.TypeDuration, Default: "5m", Description: "How far a webhook's signed timestamp may be from now; webhooks outside it are refused as replays."},
		{Name: "script_name", Type: base.TypeString, Default: "", Description: "Name of the commissioning script in MAAS; empty means 99-gpuaas-report-<instance>."},
		{Name: "tenant_sudo", Type: base.TypeBool, Default: true, Description: "Give the tenant user passwordless sudo on its node."},
		{Name: "request_timeout", Type: base.TypeDuration, Default: "30s", Description: "Timeout of one MAAS API request."},
		{Name: "retries", Type: base.TypeInt, Default: 3, Description: "Retries of a MAAS request that failed with a 5xx answer or a network error (0 to 10)."},
		{Name: "retry_backoff", Type: base.TypeDuration, Default: "200ms", Description: "Pause before the first retry; it doubles with each retry."},
	}}, nil
}

var (
	imageRE      = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)?$`)
	scriptNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)
	tagRE        = regexp.MustCompile(`^[A-Za-z0-9_.:-]{1,64}$`)
	unsafeNameRE = regexp.MustCompile(`[^A-Za-z0-9._-]+`)
)

// Configure implements base.BasePlugin: it checks the configuration, that
// the API key works, and installs (or updates) the commissioning script.
func (d *Driver) Configure(ctx context.Context, cfg *base.Config) error {
	s := &settings{
		instance:         cfg.Instance,
		eraseMode:        cfg.String("erase_mode"),
		defaultImage:     cfg.String("default_image"),
		images:           cfg.Strings("images"),
		webhookURL:       cfg.String("webhook_url"),
		webhookSecret:    []byte(cfg.String("webhook_secret")),
		webhookTolerance: cfg.Duration("webhook_tolerance"),
		scriptName:       cfg.String("script_name"),
		tenantSudo:       cfg.Bool("tenant_sudo"),
	}
	if s.instance == "" {
		s.instance = "default"
	}
	if s.scriptName == "" {
		s.scriptName = "99-gpuaas-report-" + strings.Trim(unsafeNameRE.ReplaceAllString(s.instance, "-"), "-")
	}
	timeout, retries, backoff := cfg.Duration("request_timeout"), cfg.Int("retries"), cfg.Duration("retry_backoff")
	switch {
	case s.eraseMode != eraseSecure && s.eraseMode != eraseQuick && s.eraseMode != eraseNone:
		return &base.ConfigError{Field: "erase_mode", Reason: fmt.Sprintf("%q: want secure, quick or none", s.eraseMode)}
	case len(s.images) == 0:
		return &base.ConfigError{Field: "images", Reason: "at least one image"}
	case !slices.Contains(s.images, s.defaultImage):
		return &base.ConfigError{Field: "default_image", Reason: fmt.Sprintf("%q is not one of images %v", s.defaultImage, s.images)}
	case s.webhookTolerance <= 0 || s.webhookTolerance > time.Hour:
		return &base.ConfigError{Field: "webhook_tolerance", Reason: "want more than 0 and at most 1h"}
	case !scriptNameRE.MatchString(s.scriptName):
		return &base.ConfigError{Field: "script_name", Reason: fmt.Sprintf("%q must match %s", s.scriptName, scriptNameRE)}
	case timeout <= 0:
		return &base.ConfigError{Field: "request_timeout", Reason: "must be positive"}
	case retries < 0 || retries > 10:
		return &base.ConfigError{Field: "retries", Reason: "want 0 to 10"}
	case backoff < 0:
		return &base.ConfigError{Field: "retry_backoff", Reason: "negative"}
	}
	for _, img := range s.images {
		if !imageRE.MatchString(img) {
			return &base.ConfigError{Field: "images", Reason: fmt.Sprintf("%q is not a distro series name", img)}
		}
	}
	if n := len(s.webhookSecret); n < 32 || n > 256 {
		return &base.ConfigError{Field: "webhook_secret", Reason: fmt.Sprintf("%d characters; want 32 to 256", n)}
	}
	for _, c := range s.webhookSecret {
		if c <= ' ' || c > '~' {
			return &base.ConfigError{Field: "webhook_secret", Reason: "must be printable ASCII without spaces"}
		}
	}
	if _, err := checkURL("webhook_url", s.webhookURL); err != nil {
		return err
	}
	var err error
	if s.conn, err = newConn(cfg.String("maas_url"), cfg.String("api_key"), cfg.String("ca_cert"), timeout, int(retries), backoff); err != nil {
		return err
	}
	err = s.conn.call(ctx, "check the API key", true, func(cl *gomaas.Client) error {
		who, err := cl.Users.Whoami()
		if err == nil {
			s.username = who.UserName
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("maas: configure: %w", err)
	}
	if err := d.installScript(ctx, s); err != nil {
		return fmt.Errorf("maas: configure: %w", err)
	}
	d.mu.Lock()
	d.cfg = s
	d.mu.Unlock()
	d.logger.Info("configured", "instance", s.instance, "api_version", cfg.APIVersion, "maas_user", s.username,
		"erase_mode", s.eraseMode, "script", s.scriptName)
	return nil
}

// enter returns the settings, or an error when the driver is not
// configured or ctx is done.
func (d *Driver) enter(ctx context.Context) (*settings, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("maas: %w", err)
	}
	d.mu.Lock()
	s := d.cfg
	d.mu.Unlock()
	if s == nil {
		return nil, fmt.Errorf("maas: not configured: %w", base.ErrFailedPrecondition)
	}
	return s, nil
}

// lockNode serializes operations on one machine in this process.
func (d *Driver) lockNode(ctx context.Context, systemID string) (func(), error) {
	d.mu.Lock()
	ch, ok := d.locks[systemID]
	if !ok {
		ch = make(chan struct{}, 1)
		d.locks[systemID] = ch
	}
	d.mu.Unlock()
	select {
	case ch <- struct{}{}:
		return func() { <-ch }, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("maas: waiting for machine %s: %w", systemID, ctx.Err())
	}
}

// Capabilities implements provisioner.Driver. MAAS cannot remove one user
// from a running machine, so every release releases the machine (the next
// tenant gets a fresh deploy), with the configured disk erase.
func (d *Driver) Capabilities(ctx context.Context) (*provisioner.Capabilities, error) {
	s, err := d.enter(ctx)
	if err != nil {
		return nil, err
	}
	modes := []provisioner.ReleaseMode{provisioner.ReleaseReimage}
	if s.eraseMode != eraseNone {
		modes = []provisioner.ReleaseMode{provisioner.ReleaseWipe, provisioner.ReleaseReimage}
	}
	return &provisioner.Capabilities{ReleaseModes: modes, Images: slices.Clone(s.images)}, nil
}

// mergeTags returns the union of tag lists, sorted.
func mergeTags(lists ...[]string) []string {
	var out []string
	for _, l := range lists {
		for _, t := range l {
			if t != "" && !slices.Contains(out, t) {
				out = append(out, t)
			}
		}
	}
	sort.Strings(out)
	return out
}

// enrollmentSecret derives the node's agent enrollment secret from the
// webhook secret, so that a retried Enroll (even after a restart) returns
// the same secret without the driver storing it.
func enrollmentSecret(s *settings, operationID, systemID string) string {
	mac := hmac.New(sha256.New, s.webhookSecret)
	fmt.Fprintf(mac, "gpuaas-maas-enroll-v1\x00%s\x00%s\x00%s", s.instance, operationID, systemID)
	return hex.EncodeToString(mac.Sum(nil))
}

// Enroll implements provisioner.Driver: NodeID is the MAAS system id of a
// commissioned machine; Address, if set, must name the same machine (system
// id, host name or FQDN).
func (d *Driver) Enroll(ctx context.Context, req *provisioner.EnrollRequest) (*provisioner.Enrollment, error) {
	s, err := d.enter(ctx)
	if err != nil {
		return nil, err
	}
	if req.OperationID == "" || !systemIDRE.MatchString(req.NodeID) {
		return nil, fmt.Errorf("maas: enroll: want an operation id and a MAAS system id, got %q: %w", req.NodeID, base.ErrInvalidArgument)
	}
	for _, t := range req.Tags {
		if !tagRE.MatchString(t) {
			return nil, fmt.Errorf("maas: enroll: tag %q must match %s: %w", t, tagRE, base.ErrInvalidArgument)
		}
	}
	fp := strings.Join([]string{req.NodeID, req.Address, req.Pool, strings.Join(mergeTags(req.Tags), ",")}, "\x00")
	checkConflict := func() error {
		if prev, ok := d.enrolls[req.OperationID]; ok && prev != fp {
			return fmt.Errorf("maas: enroll: operation %q was used for another request: %w", req.OperationID, base.ErrConflict)
		}
		return nil
	}
	d.mu.Lock()
	err = checkConflict()
	d.mu.Unlock()
	if err != nil {
		return nil, err
	}
	m, err := s.conn.getMachine(ctx, req.NodeID)
	if err != nil {
		return nil, fmt.Errorf("maas: enroll: %w", err)
	}
	if a := strings.TrimSuffix(req.Address, "."); a != "" && a != m.SystemID && a != m.Hostname && a != m.FQDN {
		return nil, fmt.Errorf("maas: enroll: address %q does not name machine %s (%s): %w", req.Address, m.SystemID, m.FQDN, base.ErrInvalidArgument)
	}
	switch m.Status {
	case node.StatusReady, node.StatusAllocated, node.StatusDeploying, node.StatusDeployed, node.StatusFailedDeployment,
		node.StatusReleasing, node.StatusDiskErasing, node.StatusFailedDiskErasing, node.StatusFailedReleasing:
	case node.StatusCommissioning, node.StatusTesting:
		return nil, fmt.Errorf("maas: enroll: machine %s is still %s; retry when it is Ready: %w", m.SystemID, m.StatusName, base.ErrUnavailable)
	default:
		return nil, fmt.Errorf("maas: enroll: machine %s is %s, not commissioned: %w", m.SystemID, m.StatusName, base.ErrFailedPrecondition)
	}
	if req.Pool != "" && req.Pool != m.Pool.Name {
		return nil, fmt.Errorf("maas: enroll: machine %s is in pool %q, not %q: %w", m.SystemID, m.Pool.Name, req.Pool, base.ErrFailedPrecondition)
	}
	facts, err := d.machineFacts(ctx, s, m)
	if err != nil {
		return nil, fmt.Errorf("maas: enroll: %w", err)
	}
	facts.Tags = mergeTags(m.TagNames, req.Tags)
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := checkConflict(); err != nil {
		return nil, err
	}
	d.enrolls[req.OperationID] = fp
	d.logger.Info("machine enrolled", "node_id", m.SystemID, "operation_id", req.OperationID, "gpus", len(facts.GPUs))
	return &provisioner.Enrollment{Facts: facts, Secret: enrollmentSecret(s, req.OperationID, m.SystemID)}, nil
}

// listedFacts are the facts MAAS shows of a machine itself: host name,
// CPU, memory, disks and pool; no GPUs, no tags.
func listedFacts(m *entity.Machine) provisioner.NodeFacts {
	f := provisioner.NodeFacts{
		NodeID:      m.SystemID,
		Hostname:    m.Hostname,
		CPU:         provisioner.CPU{Model: m.HardwareInfo["cpu_model"], Cores: m.CPUCount},
		MemoryBytes: uint64(max(m.Memory, 0)) << 20,
		Pool:        m.Pool.Name,
	}
	if f.CPU.Model == "Unknown" {
		f.CPU.Model = ""
	}
	for _, b := range m.PhysicalBlockDeviceSet {
		f.DiskBytes += uint64(max(b.Size, 0))
	}
	if f.DiskBytes == 0 && m.Storage > 0 {
		f.DiskBytes = uint64(m.Storage * 1e6)
	}
	return f
}

// machineFacts are a machine's facts: listedFacts, with GPUs from the
// commissioning script's report, else from the PCI devices MAAS found.
func (d *Driver) machineFacts(ctx context.Context, s *settings, m *machine) (provisioner.NodeFacts, error) {
	f := listedFacts(&m.Machine)
	r, err := d.scriptReport(ctx, s, m.SystemID)
	if err != nil {
		return f, err
	}
	if r != nil {
		f.GPUs = r.facts().GPUs
		if f.CPU.Model == "" {
			f.CPU.Model = r.CPU.Model
		}
	}
	if len(f.GPUs) == 0 {
		if f.GPUs, err = d.deviceGPUs(ctx, s, m.SystemID); err != nil {
			return f, err
		}
	}
	return f, nil
}

// marker is the event-log comment that ties a MAAS request to an
// operation.
func marker(kind, operationID string) string {
	return fmt.Sprintf("gpuaas %s op=%s", kind, strconv.Quote(operationID))
}

// agentName is the MAAS agent name of machines this instance allocates.
func (s *settings) agentName() string { return "gpuaas:" + s.instance }

// Provision implements provisioner.Driver: allocate the machine, record the
// operation on it, and deploy the image with user data that creates the
// tenant user. A retry with the same operation id checks the machine
// first and never deploys twice.
func (d *Driver) Provision(ctx context.Context, req *provisioner.ProvisionRequest) (*provisioner.Operation, error) {
	s, err := d.enter(ctx)
	if err != nil {
		return nil, err
	}
	if req.OperationID == "" {
		return nil, fmt.Errorf("maas: provision: no operation id: %w", base.ErrInvalidArgument)
	}
	t, err := validateProvision(s, req)
	if err != nil {
		return nil, err
	}
	fp := t.fingerprint()
	unlock, err := d.lockNode(ctx, req.NodeID)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if rec := d.op(req.OperationID); rec != nil {
		if rec.kind != kindProvision || !d.sameRequest(rec, fp, t.legacyFingerprint()) {
			return nil, fmt.Errorf("maas: provision: operation %q was used for another request: %w", req.OperationID, base.ErrConflict)
		}
		return d.status(ctx, s, req.OperationID, rec)
	}
	userData, err := cloudConfigFor(s, t)
	if err != nil {
		return nil, err
	}
	for attempt := 0; ; attempt++ {
		op, err := d.provisionStep(ctx, s, req, t, fp, userData)
		if err == nil || !errors.Is(err, base.ErrUnavailable) || attempt >= s.conn.retries {
			return op, err
		}
		d.logger.Warn("provision: MAAS unavailable; checking the machine again", "node_id", req.NodeID, "operation_id", req.OperationID, "error", err)
		if err := s.conn.pause(ctx, attempt, err); err != nil {
			return nil, err
		}
	}
}

// provisionStep reads the machine and does what is left to do.
func (d *Driver) provisionStep(ctx context.Context, s *settings, req *provisioner.ProvisionRequest, t *tenant, fp string, userData []byte) (*provisioner.Operation, error) {
	id, opID := req.NodeID, req.OperationID
	m, err := s.conn.getMachine(ctx, id)
	if err != nil {
		return nil, fmt.Errorf("maas: provision: %w", err)
	}
	ann := m.annotations()
	rec := &opRecord{kind: kindProvision, systemID: id, fingerprint: fp}
	switch held := ann[annOperation]; {
	case held == opID:
		if ann[annFingerprint] != fp {
			return nil, fmt.Errorf("maas: provision: operation %q was used for another request: %w", opID, base.ErrConflict)
		}
		if m.Status != node.StatusAllocated {
			// Deployed already (or deploying, or failed): nothing to do.
			d.remember(opID, rec)
			return d.evaluate(opID, rec, m), nil
		}
	case held != "":
		return nil, fmt.Errorf("maas: provision: machine %s is held by operation %q: %w", id, held, base.ErrFailedPrecondition)
	case m.Status == node.StatusReady:
		err := s.conn.call(ctx, "allocate "+id, false, func(cl *gomaas.Client) error {
			_, err := cl.Machines.Allocate(&entity.MachineAllocateParams{SystemID: id, AgentName: s.agentName(), Comment: marker(kindProvision, opID)})
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("maas: provision: %w", err)
		}
		if err := d.annotate(ctx, s, id, opID, fp, t); err != nil {
			return nil, err
		}
	case m.Status == node.StatusAllocated && m.Owner == s.username:
		// Allocated by an attempt that stopped before recording itself.
		if err := d.annotate(ctx, s, id, opID, fp, t); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("maas: provision: machine %s is %s (owner %q), not Ready: %w", id, m.StatusName, m.Owner, base.ErrFailedPrecondition)
	}
	var deployed *entity.Machine
	err = s.conn.call(ctx, "deploy "+id, false, func(cl *gomaas.Client) error {
		var err error
		deployed, err = cl.Machine.Deploy(id, &entity.MachineDeployParams{
			UserData:     base64.StdEncoding.EncodeToString(userData),
			DistroSeries: t.Image,
			AgentName:    s.agentName(),
			Comment:      marker(kindProvision, opID),
		})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("maas: provision: %w", err)
	}
	d.remember(opID, rec)
	d.logger.Info("deploy started", "node_id", id, "operation_id", opID, "allocation_id", req.AllocationID, "image", t.Image)
	return d.evaluate(opID, rec, &machine{Machine: *deployed}), nil
}

// annotate records a provision operation on an allocated machine.
func (d *Driver) annotate(ctx context.Context, s *settings, id, opID, fp string, t *tenant) error {
	err := s.conn.call(ctx, "annotate "+id, false, func(cl *gomaas.Client) error {
		_, err := cl.Machine.SetWorkloadAnnotations(id, map[string]string{
			annOperation: opID, annFingerprint: fp, annAllocation: t.Alloc, annUser: t.Username, annInstance: s.instance,
		})
		return err
	})
	if err != nil {
		return fmt.Errorf("maas: provision: %w", err)
	}
	return nil
}

// sameRequest reports whether fp (or one of the older forms of the same
// request's fingerprint) is the request rec was made by; a record found
// again in the event log after a restart takes the first request's.
func (d *Driver) sameRequest(rec *opRecord, fp string, older ...string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if rec.fingerprint == "" {
		rec.fingerprint = fp
	}
	return rec.fingerprint == fp || slices.Contains(older, rec.fingerprint)
}

func (d *Driver) op(id string) *opRecord {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.ops[id]
}

func (d *Driver) remember(id string, rec *opRecord) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, ok := d.ops[id]; !ok {
		d.ops[id] = rec
	}
}

// Release implements provisioner.Driver: release the machine with the
// configured disk erase. A machine already released counts as done.
func (d *Driver) Release(ctx context.Context, req *provisioner.ReleaseRequest) (*provisioner.Operation, error) {
	s, err := d.enter(ctx)
	if err != nil {
		return nil, err
	}
	switch {
	case req.OperationID == "":
		return nil, fmt.Errorf("maas: release: no operation id: %w", base.ErrInvalidArgument)
	case !systemIDRE.MatchString(req.NodeID):
		return nil, fmt.Errorf("maas: release: node id %q is not a MAAS system id: %w", req.NodeID, base.ErrInvalidArgument)
	case req.Mode == provisioner.ReleaseRevoke:
		return nil, fmt.Errorf("maas: release: MAAS cannot revoke one user from a running machine; use wipe or reimage: %w", base.ErrInvalidArgument)
	case req.Mode == provisioner.ReleaseWipe && s.eraseMode == eraseNone:
		return nil, fmt.Errorf("maas: release: wipe asked for, but erase_mode is none: %w", base.ErrInvalidArgument)
	case req.Mode != provisioner.ReleaseWipe && req.Mode != provisioner.ReleaseReimage:
		return nil, fmt.Errorf("maas: release: unknown mode %q: %w", req.Mode, base.ErrInvalidArgument)
	}
	fp := strings.Join([]string{req.NodeID, req.Username, string(req.Mode)}, "\x00")
	unlock, err := d.lockNode(ctx, req.NodeID)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if rec := d.op(req.OperationID); rec != nil {
		if rec.kind != kindRelease || !d.sameRequest(rec, fp) {
			return nil, fmt.Errorf("maas: release: operation %q was used for another request: %w", req.OperationID, base.ErrConflict)
		}
		return d.status(ctx, s, req.OperationID, rec)
	}
	for attempt := 0; ; attempt++ {
		op, err := d.releaseStep(ctx, s, req, fp)
		if err == nil || !errors.Is(err, base.ErrUnavailable) || attempt >= s.conn.retries {
			return op, err
		}
		d.logger.Warn("release: MAAS unavailable; checking the machine again", "node_id", req.NodeID, "operation_id", req.OperationID, "error", err)
		if err := s.conn.pause(ctx, attempt, err); err != nil {
			return nil, err
		}
	}
}

func (d *Driver) releaseStep(ctx context.Context, s *settings, req *provisioner.ReleaseRequest, fp string) (*provisioner.Operation, error) {
	id, opID := req.NodeID, req.OperationID
	m, err := s.conn.getMachine(ctx, id)
	if err != nil {
		return nil, fmt.Errorf("maas: release: %w", err)
	}
	ann := m.annotations()
	rec := &opRecord{kind: kindRelease, systemID: id, fingerprint: fp, heldBy: ann[annOperation]}
	if u := ann[annUser]; u != "" && req.Username != "" && u != req.Username {
		d.logger.Warn("release: the machine was provisioned for another user", "node_id", id, "operation_id", opID)
	}
	switch {
	case ann[annRelease] == opID && (m.Status == node.StatusReleasing || m.Status == node.StatusDiskErasing):
	case m.Status == node.StatusReady || m.Status == node.StatusNew:
		op := d.evaluate(opID, rec, m)
		op.Message = "released (the machine was not allocated)"
		rec.final = op
	case m.Status == node.StatusReleasing || m.Status == node.StatusDiskErasing:
		// Being released already: follow that.
	case releasable(m.Status):
		if m.Owner == s.username {
			err := s.conn.call(ctx, "annotate "+id, false, func(cl *gomaas.Client) error {
				_, err := cl.Machine.SetWorkloadAnnotations(id, map[string]string{annRelease: opID})
				return err
			})
			if err != nil {
				return nil, fmt.Errorf("maas: release: %w", err)
			}
		}
		params := &entity.MachineReleaseParams{Comment: marker(kindRelease, opID)}
		switch s.eraseMode {
		case eraseSecure:
			// Secure erase where the drive has it, else the quick wipe.
			params.Erase, params.SecureErase, params.QuickErase = true, true, true
		case eraseQuick:
			params.Erase, params.QuickErase = true, true
		}
		var released *entity.Machine
		err := s.conn.call(ctx, "release "+id, false, func(cl *gomaas.Client) error {
			var err error
			released, err = cl.Machine.Release(id, params)
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("maas: release: %w", err)
		}
		m = &machine{Machine: *released}
		d.logger.Info("release started", "node_id", id, "operation_id", opID, "erase", s.eraseMode)
	default:
		return nil, fmt.Errorf("maas: release: machine %s is %s and cannot be released: %w", id, m.StatusName, base.ErrFailedPrecondition)
	}
	d.remember(opID, rec)
	return d.evaluate(opID, rec, m), nil
}

// releasable is MAAS's RELEASABLE_STATUSES.
func releasable(st node.Status) bool {
	switch st {
	case node.StatusAllocated, node.StatusReserved, node.StatusBroken, node.StatusDeploying, node.StatusDeployed,
		node.StatusFailedDeployment, node.StatusFailedDiskErasing, node.StatusFailedReleasing:
		return true
	}
	return false
}

// Status implements provisioner.Driver. An operation this process has not
// seen (it restarted) is found again in MAAS: on the machine that carries
// it, or in the event log.
func (d *Driver) Status(ctx context.Context, operationID string) (*provisioner.Operation, error) {
	s, err := d.enter(ctx)
	if err != nil {
		return nil, err
	}
	rec := d.op(operationID)
	if rec == nil {
		if rec, err = d.recoverOp(ctx, s, operationID); err != nil {
			return nil, err
		}
		d.remember(operationID, rec)
		rec = d.op(operationID)
	}
	return d.status(ctx, s, operationID, rec)
}

// status reports a known operation.
func (d *Driver) status(ctx context.Context, s *settings, opID string, rec *opRecord) (*provisioner.Operation, error) {
	d.mu.Lock()
	final := rec.final
	d.mu.Unlock()
	if final != nil {
		out := *final
		return &out, nil
	}
	m, err := s.conn.getMachine(ctx, rec.systemID)
	switch {
	case errors.Is(err, base.ErrNotFound):
		op := &provisioner.Operation{OperationID: opID, NodeID: rec.systemID, State: provisioner.StateFailed, Percent: 100,
			Message: "the machine no longer exists in MAAS", UpdatedAt: d.now().UTC()}
		d.mu.Lock()
		rec.final = op
		d.mu.Unlock()
		return op, nil
	case err != nil:
		return nil, fmt.Errorf("maas: status: %w", err)
	}
	return d.evaluate(opID, rec, m), nil
}

// Progress per MAAS status message, in the order MAAS shows them.
func deployProgress() []struct {
	msg     string
	percent int
} {
	return []struct {
		msg     string
		percent int
	}{
		{"powering on", 10}, {"pxe", 20}, {"loading ephemeral", 30}, {"configuring storage", 45},
		{"installing os", 60}, {"configuring os", 75}, {"rebooting", 90},
	}
}

func eraseProgress() []struct {
	msg     string
	percent int
} {
	return []struct {
		msg     string
		percent int
	}{
		{"powering on", 15}, {"pxe", 25}, {"loading ephemeral", 35}, {"erasing disk", 50}, {"releasing", 85}, {"powering off", 92},
	}
}

func progressOf(table []struct {
	msg     string
	percent int
}, message string, floor int) int {
	message = strings.ToLower(message)
	p := floor
	for _, e := range table {
		if strings.Contains(message, e.msg) {
			p = max(p, e.percent)
		}
	}
	return p
}

// evaluate turns a machine's state into the operation's progress, and
// remembers a terminal outcome.
func (d *Driver) evaluate(opID string, rec *opRecord, m *machine) *provisioner.Operation {
	op := &provisioner.Operation{OperationID: opID, NodeID: rec.systemID, UpdatedAt: d.now().UTC()}
	reason := m.ErrorDescription
	if reason == "" {
		reason = m.StatusMessage
	}
	ann := m.annotations()
	set := func(state provisioner.OperationState, percent int, msg string) {
		op.State, op.Percent, op.Message = state, percent, msg
	}
	switch rec.kind {
	case kindProvision:
		ours := ann[annOperation] == opID
		switch {
		case ours && m.Status == node.StatusDeployed:
			set(provisioner.StateSucceeded, 100, fmt.Sprintf("deployed %s/%s", m.OSystem, m.DistroSeries))
		case ours && m.Status == node.StatusFailedDeployment:
			set(provisioner.StateFailed, 100, "MAAS: Failed deployment: "+reason)
		case ours && m.Status == node.StatusDeploying:
			set(provisioner.StateRunning, progressOf(deployProgress(), m.StatusMessage, 5), "deploying: "+m.StatusMessage)
		case ours && m.Status == node.StatusAllocated:
			set(provisioner.StatePending, 2, "allocated; deployment not started")
		default:
			set(provisioner.StateFailed, 100, fmt.Sprintf("the machine is %s and no longer deploying this operation", m.StatusName))
		}
	case kindRelease:
		switch m.Status {
		case node.StatusReady, node.StatusNew:
			set(provisioner.StateSucceeded, 100, "released")
		case node.StatusDiskErasing:
			set(provisioner.StateRunning, progressOf(eraseProgress(), m.StatusMessage, 10), "erasing disks: "+m.StatusMessage)
		case node.StatusReleasing:
			set(provisioner.StateRunning, progressOf(eraseProgress(), m.StatusMessage, 80), "releasing: "+m.StatusMessage)
		case node.StatusFailedDiskErasing:
			set(provisioner.StateFailed, 100, "MAAS: Failed disk erasing: "+reason)
		case node.StatusFailedReleasing:
			set(provisioner.StateFailed, 100, "MAAS: Failed releasing: "+reason)
		default:
			if held := ann[annOperation]; ann[annRelease] != opID && held != rec.heldBy {
				set(provisioner.StateSucceeded, 100, "released; the machine has been allocated again since")
			} else {
				set(provisioner.StatePending, 0, fmt.Sprintf("release requested; the machine is %s", m.StatusName))
			}
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if op.State.Terminal() {
		rec.final = op
		out := *op
		return &out
	}
	op.Percent = max(op.Percent, rec.percent)
	rec.percent = op.Percent
	return op
}

// recoverOp finds an operation in MAAS: on a machine this instance holds,
// or in the event log by the marker its requests carried.
func (d *Driver) recoverOp(ctx context.Context, s *settings, opID string) (*opRecord, error) {
	var ms []entity.Machine
	err := s.conn.call(ctx, "list machines", true, func(cl *gomaas.Client) error {
		var err error
		ms, err = cl.Machines.Get(&entity.MachinesParams{AgentName: []string{s.agentName()}})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("maas: status: %w", err)
	}
	for i := range ms {
		m := &machine{Machine: ms[i]}
		ann := m.annotations()
		switch opID {
		case ann[annOperation]:
			return &opRecord{kind: kindProvision, systemID: m.SystemID, fingerprint: ann[annFingerprint]}, nil
		case ann[annRelease]:
			return &opRecord{kind: kindRelease, systemID: m.SystemID, heldBy: ann[annOperation]}, nil
		}
	}
	var resp *entity.EventsResp
	err = s.conn.call(ctx, "query events", true, func(cl *gomaas.Client) error {
		var err error
		resp, err = cl.Events.Get(&entity.EventParams{Level: event.DEBUG, Limit: "1000"})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("maas: status: %w", err)
	}
	for _, kind := range []string{kindProvision, kindRelease} {
		want := marker(kind, opID)
		for _, e := range resp.Events {
			if strings.HasSuffix(e.Description, want) && e.Node != "" {
				rec := &opRecord{kind: kind, systemID: e.Node}
				if err := d.outcomeFromEvents(ctx, s, opID, rec, e.ID); err != nil {
					return nil, err
				}
				return rec, nil
			}
		}
	}
	return nil, fmt.Errorf("maas: status: operation %q: %w", opID, base.ErrNotFound)
}

// outcomeFromEvents sets rec.final from the machine's events after the
// operation's request, when they show how it ended.
func (d *Driver) outcomeFromEvents(ctx context.Context, s *settings, opID string, rec *opRecord, after int) error {
	var resp *entity.EventsResp
	err := s.conn.call(ctx, "query events of "+rec.systemID, true, func(cl *gomaas.Client) error {
		var err error
		resp, err = cl.Events.Get(&entity.EventParams{ID: rec.systemID, Level: event.DEBUG, Limit: "1000", After: strconv.Itoa(after)})
		return err
	})
	if err != nil {
		return fmt.Errorf("maas: status: %w", err)
	}
	evs := slices.Clone(resp.Events)
	sort.Slice(evs, func(i, j int) bool { return evs[i].ID < evs[j].ID })
	final := func(state provisioner.OperationState, msg string) {
		rec.final = &provisioner.Operation{OperationID: opID, NodeID: rec.systemID, State: state, Percent: 100, Message: msg, UpdatedAt: d.now().UTC()}
	}
	for _, e := range evs {
		switch {
		case e.Type == "Marking node failed":
			final(provisioner.StateFailed, "MAAS: "+e.Description)
			return nil
		case rec.kind == kindProvision && e.Type == "Deployed":
			final(provisioner.StateSucceeded, "deployed")
			return nil
		case rec.kind == kindProvision && (e.Type == "User releasing node" || e.Type == "User erasing disk"):
			final(provisioner.StateFailed, "released before the deployment finished")
			return nil
		case rec.kind == kindRelease && e.Type == "Released":
			final(provisioner.StateSucceeded, "released")
			return nil
		}
	}
	return nil
}

// Probe implements provisioner.Driver: with no node, that MAAS answers and
// the API key works; with a node, the machine's MAAS state.
func (d *Driver) Probe(ctx context.Context, nodeID string) (*provisioner.Health, error) {
	s, err := d.enter(ctx)
	if err != nil {
		return nil, err
	}
	if nodeID == "" {
		var version *entity.Version
		err := s.conn.call(ctx, "read version", true, func(cl *gomaas.Client) error {
			var err error
			version, err = cl.Version.Get()
			return err
		})
		if err == nil {
			err = s.conn.call(ctx, "check the API key", true, func(cl *gomaas.Client) error {
				_, err := cl.Users.Whoami()
				return err
			})
		}
		switch {
		case ctx.Err() != nil:
			return nil, fmt.Errorf("maas: probe: %w", ctx.Err())
		case err != nil:
			return &provisioner.Health{Healthy: false, Message: err.Error()}, nil
		}
		return &provisioner.Health{Healthy: true, Message: fmt.Sprintf("MAAS %s reachable as %s", version.Version, s.username)}, nil
	}
	if !systemIDRE.MatchString(nodeID) {
		return nil, fmt.Errorf("maas: probe: %q is not a MAAS system id: %w", nodeID, base.ErrNotFound)
	}
	m, err := s.conn.getMachine(ctx, nodeID)
	if err != nil {
		return nil, fmt.Errorf("maas: probe: %w", err)
	}
	msg := fmt.Sprintf("MAAS status %s, power %s", m.StatusName, m.PowerState)
	switch m.Status {
	case node.StatusReady, node.StatusAllocated, node.StatusDeploying, node.StatusDeployed,
		node.StatusReleasing, node.StatusDiskErasing, node.StatusCommissioning, node.StatusTesting:
		if m.PowerState == "error" {
			return &provisioner.Health{Healthy: false, Message: msg + ": the BMC does not answer"}, nil
		}
		return &provisioner.Health{Healthy: true, Message: msg}, nil
	}
	if m.ErrorDescription != "" {
		msg += ": " + m.ErrorDescription
	}
	return &provisioner.Health{Healthy: false, Message: msg}, nil
}
