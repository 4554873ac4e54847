package pluginhost_test

import (
	"bufio"
	"errors"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/kms"
	"github.com/gpuaas/gpuaas/core/internal/pluginhost"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/examples/instantprov"
	"github.com/gpuaas/gpuaas/sdk/payments"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
	"github.com/gpuaas/gpuaas/sdk/storage"
)

func TestInstallConfigureAndCall(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := b.ctx(t)

	pl, path := b.install(t, binInstantprov)
	if pl.Name != "instantprov" || pl.Kind != base.KindProvisioner || pl.Version != instantprov.Version ||
		len(pl.SHA256) != 64 || pl.Path != path || !pl.Enabled || pl.InstalledBy != "user:"+b.adminID.String() {
		t.Fatalf("installed plugin: %+v", pl)
	}
	if pl.Schema.Field("webhook_secret") == nil {
		t.Fatalf("schema not recorded: %+v", pl.Schema)
	}
	inst := b.configure(t, "prov-a", "instantprov", provConfig(map[string]any{"gpu_count": 4}))
	if inst.State != pluginhost.StateStopped || inst.Kind != base.KindProvisioner || !inst.Enabled {
		t.Fatalf("configured instance: %+v", inst)
	}

	drv, err := b.host.Provisioner(ctx, "prov-a")
	if err != nil {
		t.Fatal(err)
	}
	enr, err := drv.Enroll(ctx, &provisioner.EnrollRequest{OperationID: "op-enroll-1", NodeID: "node-1", Pool: "h100"})
	if err != nil {
		t.Fatal(err)
	}
	if enr.Facts.GPUs[0].Count != 4 || enr.Secret == "" {
		t.Fatalf("enrollment: %+v (the configuration did not reach the plugin)", enr)
	}
	op, err := drv.Provision(ctx, &provisioner.ProvisionRequest{OperationID: "op-prov-1", NodeID: "node-1",
		User: provisioner.TenantUser{Username: "alice", UID: 2001}})
	if err != nil {
		t.Fatal(err)
	}
	st, err := drv.Status(ctx, op.OperationID)
	if err != nil || st.State != provisioner.StateSucceeded {
		t.Fatalf("status: %+v, %v", st, err)
	}
	if _, err := drv.Status(ctx, "no-such-op"); !errors.Is(err, base.ErrNotFound) {
		t.Fatalf("status of an unknown operation: %v", err)
	}
	if err := drv.Configure(ctx, &base.Config{}); !errors.Is(err, base.ErrFailedPrecondition) {
		t.Fatalf("Configure through the host driver: %v", err)
	}

	inst = b.instance(t, "prov-a")
	if inst.State != pluginhost.StateRunning || inst.APIVersion != provisioner.APIVersion1 || inst.PID <= 0 || inst.Restarts != 0 {
		t.Fatalf("running instance: %+v", inst)
	}
	if got := b.metric(t, "gpuaas_plugin_calls_total", map[string]string{"instance": "prov-a", "method": "Status"}); got != 2 {
		t.Fatalf("Status calls metric = %v, want 2", got)
	}
	if got := b.metric(t, "gpuaas_plugin_call_errors_total", map[string]string{"instance": "prov-a", "method": "Status", "code": "not_found"}); got != 1 {
		t.Fatalf("Status not_found errors metric = %v, want 1", got)
	}
	if got := b.metric(t, "gpuaas_plugin_call_duration_seconds", map[string]string{"instance": "prov-a", "method": "Enroll"}); got != 1 {
		t.Fatalf("Enroll latency samples = %v, want 1", got)
	}
	if got := b.metric(t, "gpuaas_plugin_instance_state", map[string]string{"instance": "prov-a", "state": "running"}); got != 1 {
		t.Fatalf("state metric running = %v", got)
	}

	// The plugin's own log comes out under the instance's name.
	if log := b.log.String(); !strings.Contains(log, "host.prov-a.") || !strings.Contains(log, "configured") {
		t.Fatalf("the plugin's log was not re-emitted under host.prov-a:\n%s", log)
	}

	for _, c := range []struct{ action, actorType string }{
		{pluginhost.ActionInstall, "admin"}, {pluginhost.ActionConfigure, "admin"},
	} {
		rows := b.audits(t, c.action)
		if len(rows) != 1 || rows[0].ActorType != c.actorType || rows[0].ActorID != b.adminID.String() || rows[0].Result != "success" {
			t.Fatalf("audit %s: %+v", c.action, rows)
		}
	}
	if got := b.audits(t, pluginhost.ActionInstall)[0].Target; got != "gpuaas:local:::plugin:instantprov" {
		t.Fatalf("install audit target %q", got)
	}

	plugins, err := b.host.Plugins(ctx)
	if err != nil || len(plugins) != 1 {
		t.Fatalf("Plugins: %v, %v", plugins, err)
	}
	list, err := b.host.Instances(ctx)
	if err != nil || len(list) != 1 || list[0].Name != "prov-a" || list[0].State != pluginhost.StateRunning {
		t.Fatalf("Instances: %+v, %v", list, err)
	}
}

func TestInstallRules(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := b.ctx(t)
	pl, path := b.install(t, binInstantprov)

	t.Run("same binary again is a no-op", func(t *testing.T) {
		again, err := b.host.Install(ctx, pluginhost.InstallRequest{Path: path})
		if err != nil || again.SHA256 != pl.SHA256 || len(b.audits(t, pluginhost.ActionInstall)) != 1 {
			t.Fatalf("reinstall: %+v, %v", again, err)
		}
	})
	b.configure(t, "prov-a", "instantprov", provConfig(nil))
	drv, err := b.host.Provisioner(ctx, "prov-a")
	if err != nil {
		t.Fatal(err)
	}
	oldPID := b.instance(t, "prov-a").PID

	// A new build of the same plugin: another checksum.
	newer := bin(t, binInstantprov)
	f, err := os.OpenFile(newer, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write([]byte("\x00rebuilt")); err != nil {
		t.Fatal(err)
	}
	_ = f.Close()
	t.Run("another binary needs the upgrade flag", func(t *testing.T) {
		_, err := b.host.Install(ctx, pluginhost.InstallRequest{Path: newer})
		wantCode(t, err, pluginhost.CodeUpgradeRequired)
	})
	t.Run("upgrade restarts the instances on the new binary", func(t *testing.T) {
		up, err := b.host.Install(ctx, pluginhost.InstallRequest{Path: newer, Upgrade: true})
		if err != nil {
			t.Fatal(err)
		}
		if up.SHA256 == pl.SHA256 || up.Path != newer {
			t.Fatalf("upgraded plugin: %+v", up)
		}
		if rows := b.audits(t, pluginhost.ActionUpgrade); len(rows) != 1 || !strings.Contains(rows[0].Details, pl.SHA256) {
			t.Fatalf("upgrade audit: %+v", rows)
		}
		if alive(oldPID) {
			t.Fatalf("the old plugin process %d still runs after the upgrade", oldPID)
		}
		if _, err := drv.Probe(ctx, ""); err != nil {
			t.Fatalf("call after upgrade: %v", err)
		}
		if pid := b.instance(t, "prov-a").PID; pid == oldPID || pid == 0 {
			t.Fatalf("pid after upgrade %d (was %d)", pid, oldPID)
		}
	})
	t.Run("wrong kind", func(t *testing.T) {
		// A storage plugin is not a provisioner instance.
		b.install(t, binDiskstore)
		b.configure(t, "store", "diskstore", map[string]any{"root": t.TempDir()})
		_, err := b.host.Provisioner(ctx, "store")
		wantCode(t, err, pluginhost.CodeKindMismatch)
	})
	t.Run("not a plugin", func(t *testing.T) {
		_, err := b.host.Install(ctx, pluginhost.InstallRequest{Path: bin(t, binExiter)})
		ce := wantCode(t, err, pluginhost.CodeInvalidPlugin)
		if !strings.Contains(ce.Message, "exited at start") {
			t.Fatalf("message: %s", ce.Message)
		}
		_, err = b.host.Install(ctx, pluginhost.InstallRequest{Path: "/no/such/binary"})
		wantCode(t, err, errcode.ValidationFailed)
	})
	t.Run("incompatible API version", func(t *testing.T) {
		_, err := b.host.Install(ctx, pluginhost.InstallRequest{Path: bin(t, binFutureprov)})
		ce := wantCode(t, err, pluginhost.CodeIncompatible)
		if !strings.Contains(ce.Message, "plugin supports [9.0]") {
			t.Fatalf("message: %s", ce.Message)
		}
	})
	t.Run("unknown names", func(t *testing.T) {
		_, err := b.host.Configure(ctx, "x", "nope", nil)
		wantCode(t, err, pluginhost.CodePluginNotFound)
		_, err = b.host.Provisioner(ctx, "nope")
		wantCode(t, err, pluginhost.CodeInstanceNotFound)
		_, err = b.host.Configure(ctx, "prov-a", "diskstore", map[string]any{"root": "/tmp"})
		wantCode(t, err, pluginhost.CodeInstanceConflict)
	})
}

func TestConfigValidationNamesTheField(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := b.ctx(t)
	b.install(t, binInstantprov)
	for _, c := range []struct {
		name   string
		inst   string
		config map[string]any
		field  string
	}{
		{"missing required field", "prov-a", map[string]any{"delay": "1s"}, "webhook_secret"},
		{"empty required field", "prov-a", map[string]any{"webhook_secret": ""}, "webhook_secret"},
		{"wrong type int", "prov-a", provConfig(map[string]any{"gpu_count": "eight"}), "gpu_count"},
		{"wrong type duration", "prov-a", provConfig(map[string]any{"delay": 5}), "delay"},
		{"bad duration", "prov-a", provConfig(map[string]any{"delay": "soon"}), "delay"},
		{"wrong type list", "prov-a", provConfig(map[string]any{"fail_nodes": "n1"}), "fail_nodes"},
		{"secret of the wrong type", "prov-a", map[string]any{"webhook_secret": 42}, "webhook_secret"},
		{"unknown field", "prov-a", provConfig(map[string]any{"colour": "blue"}), "colour"},
		{"bad instance name", "Prov A", provConfig(nil), "name"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := b.host.Configure(ctx, c.inst, "instantprov", c.config)
			ce := wantCode(t, err, errcode.ValidationFailed)
			if ce.Details["field"] != c.field || !strings.Contains(ce.Message, c.field) {
				t.Fatalf("error names field %v (%s), want %s", ce.Details["field"], ce.Message, c.field)
			}
		})
	}
	if _, err := b.host.Instance(ctx, "prov-a"); errcode.Of(err) != pluginhost.CodeInstanceNotFound {
		t.Fatalf("a refused configuration created the instance: %v", err)
	}
}

func TestSecretsEncryptedAtRestAndNeverReturned(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := b.ctx(t)
	b.install(t, binInstantprov)
	inst := b.configure(t, "prov-a", "instantprov", provConfig(map[string]any{"delay": "2s"}))

	if _, ok := inst.Config["webhook_secret"]; ok {
		t.Fatalf("Instance.Config holds the secret: %v", inst.Config)
	}
	if inst.Config["delay"] != "2s" || len(inst.SecretFields) != 1 || inst.SecretFields[0] != "webhook_secret" {
		t.Fatalf("instance: %+v", inst)
	}
	red := inst.RedactedConfig()
	if red["webhook_secret"] != "<redacted>" || red["delay"] != "2s" {
		t.Fatalf("RedactedConfig: %v", red)
	}

	// The whole row, every column, holds no plaintext secret.
	var rowText string
	var sealed []byte
	var id string
	if err := b.pool.QueryRow(ctx, `SELECT row_to_json(i)::text, secrets, id::text FROM plugin_instances i WHERE name = 'prov-a'`).
		Scan(&rowText, &sealed, &id); err != nil {
		t.Fatal(err)
	}
	for _, where := range []string{rowText, string(sealed)} {
		if strings.Contains(where, webhookSecret) || strings.Contains(where, "TOPSECRET") {
			t.Fatalf("plaintext secret at rest: %s", where)
		}
	}
	env, err := kms.ParseEnvelope(sealed)
	if err != nil || env.KeyID != kms.LocalKeyID {
		t.Fatalf("secrets column is not a KMS envelope: %v", err)
	}
	plain, err := kms.Open(ctx, b.keys, sealed, []byte("gpuaas/plugin_instances/"+id+"/secrets"))
	if err != nil || !strings.Contains(string(plain), webhookSecret) {
		t.Fatalf("envelope does not open to the secrets: %v", err)
	}
	var auditText string
	if err := b.pool.QueryRow(ctx, `SELECT coalesce(string_agg(details::text, ' '), '') FROM audit_log`).Scan(&auditText); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(auditText, "TOPSECRET") {
		t.Fatalf("secret in the audit log: %s", auditText)
	}

	// Reconfiguring without the secret keeps it: the plugin still verifies
	// webhooks signed with it.
	b.configure(t, "prov-a", "instantprov", map[string]any{"delay": "0s"})
	drv, err := b.host.Provisioner(ctx, "prov-a")
	if err != nil {
		t.Fatal(err)
	}
	hook, err := instantprov.SignedWebhook([]byte(webhookSecret), time.Now(), instantprov.WebhookEvent{
		ID: "ev-1", Type: "health", NodeID: "node-1", OccurredAt: time.Now(), Healthy: true})
	if err != nil {
		t.Fatal(err)
	}
	events, err := drv.(provisioner.WebhookHandler).HandleWebhook(ctx, hook)
	if err != nil || len(events) != 1 {
		t.Fatalf("webhook signed with the kept secret: %v, %v", events, err)
	}
	if strings.Contains(b.log.String(), "TOPSECRET") {
		t.Fatal("the secret reached the log")
	}

	// An envelope copied to another instance does not open there.
	b.configure(t, "prov-b", "instantprov", provConfig(nil))
	if _, err := b.pool.Exec(ctx, `UPDATE plugin_instances SET secrets = $1 WHERE name = 'prov-b'`, sealed); err != nil {
		t.Fatal(err)
	}
	_, err = b.host.Provisioner(ctx, "prov-b")
	ce := wantCode(t, err, pluginhost.CodeInstanceFailed)
	if !strings.Contains(ce.Message, "cannot read its secrets") {
		t.Fatalf("message: %s", ce.Message)
	}
}

func TestTamperedBinaryIsRefused(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := b.ctx(t)
	_, path := b.install(t, binInstantprov)
	b.configure(t, "prov-a", "instantprov", provConfig(nil))
	b.install(t, binDiskstore)
	b.configure(t, "store", "diskstore", map[string]any{"root": t.TempDir()})

	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write([]byte{0}); err != nil {
		t.Fatal(err)
	}
	_ = f.Close()

	_, err = b.host.Provisioner(ctx, "prov-a")
	ce := wantCode(t, err, pluginhost.CodeTampered)
	if !strings.Contains(ce.Message, "SHA-256") || !strings.Contains(ce.Message, "refusing to start") {
		t.Fatalf("message: %s", ce.Message)
	}
	inst := b.instance(t, "prov-a")
	if inst.State != pluginhost.StateFailed || !strings.Contains(inst.StateReason, "recorded at install") || inst.PID != 0 {
		t.Fatalf("instance after tampering: %+v", inst)
	}
	rows := b.audits(t, pluginhost.ActionStartRefused)
	if len(rows) != 1 || rows[0].ActorType != "system" || rows[0].Result != "failure" ||
		rows[0].Target != "gpuaas:local:::plugin:instantprov" || !strings.Contains(rows[0].Details, "checksum mismatch") {
		t.Fatalf("audit rows: %+v", rows)
	}
	// Refused again without another start or audit row until the operator acts.
	_, err = b.host.Provisioner(ctx, "prov-a")
	wantCode(t, err, pluginhost.CodeTampered)
	if n := len(b.audits(t, pluginhost.ActionStartRefused)); n != 1 {
		t.Fatalf("%d refusal audit rows, want 1", n)
	}
	// The host keeps serving other instances.
	st, err := b.host.Storage(ctx, "store")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.List(ctx, &storage.ListRequest{}); err != nil {
		t.Fatal(err)
	}
	// Accepting the modified binary is an upgrade.
	if _, err := b.host.Install(ctx, pluginhost.InstallRequest{Path: path, Upgrade: true}); err != nil {
		t.Fatal(err)
	}
	drv, err := b.host.Provisioner(ctx, "prov-a")
	if err != nil {
		t.Fatalf("after upgrade: %v", err)
	}
	if _, err := drv.Probe(ctx, ""); err != nil {
		t.Fatal(err)
	}
}

func TestBrokenPluginsFailWithReason(t *testing.T) {
	t.Parallel()
	b := setup(t, pluginhost.WithStartTimeout(2*time.Second))
	ctx := b.ctx(t)
	b.install(t, binInstantprov)
	b.configure(t, "healthy", "instantprov", provConfig(nil))
	for _, c := range []struct {
		bin    string
		state  pluginhost.State
		code   errcode.Code
		reason string
	}{
		{binExiter, pluginhost.StateFailed, pluginhost.CodeInstanceFailed, "exited at start"},
		{binHanger, pluginhost.StateFailed, pluginhost.CodeInstanceFailed, "hung at start: no handshake within 2s"},
		{binWrongproto, pluginhost.StateFailed, pluginhost.CodeInstanceFailed, "does not speak the gpuaas plugin protocol"},
		{binFutureprov, pluginhost.StateIncompatible, pluginhost.CodeIncompatible, "host supports [1.0], plugin supports [9.0]"},
	} {
		t.Run(c.bin, func(t *testing.T) {
			t.Parallel()
			b.installRaw(t, c.bin, bin(t, c.bin))
			b.configure(t, c.bin+"-1", c.bin, nil)
			_, err := b.host.Provisioner(ctx, c.bin+"-1")
			ce := wantCode(t, err, c.code)
			if !strings.Contains(ce.Message, c.reason) {
				t.Fatalf("message %q does not say %q", ce.Message, c.reason)
			}
			inst := b.instance(t, c.bin+"-1")
			if inst.State != c.state || !strings.Contains(inst.StateReason, c.reason) || inst.PID != 0 {
				t.Fatalf("instance: %+v", inst)
			}
			if c.state == pluginhost.StateIncompatible {
				rows := b.audits(t, pluginhost.ActionInstanceIncompat)
				if len(rows) != 1 || rows[0].ActorType != "system" || !strings.Contains(rows[0].Details, "9.0") {
					t.Fatalf("audit: %+v", rows)
				}
			}
			// The core is unaffected: another instance answers meanwhile.
			drv, err := b.host.Provisioner(ctx, "healthy")
			if err != nil {
				t.Fatal(err)
			}
			if _, err := drv.Probe(ctx, ""); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestPluginKilledMidCallIsRestartedAndRetried(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := b.ctx(t)
	b.install(t, binInstantprov)
	b.configure(t, "prov-a", "instantprov", provConfig(map[string]any{"call_delay": "1500ms"}))
	drv, err := b.host.Provisioner(ctx, "prov-a")
	if err != nil {
		t.Fatal(err)
	}
	pid := b.instance(t, "prov-a").PID
	if pid <= 0 {
		t.Fatal("no plugin process")
	}

	type result struct {
		enr *provisioner.Enrollment
		err error
	}
	done := make(chan result, 1)
	go func() {
		enr, err := drv.Enroll(ctx, &provisioner.EnrollRequest{OperationID: "op-kill-1", NodeID: "node-9", Pool: "a100"})
		done <- result{enr, err}
	}()
	time.Sleep(400 * time.Millisecond) // the call is inside the plugin now
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	var r result
	select {
	case r = <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("the call did not return")
	}
	if r.err != nil {
		t.Fatalf("the caller saw the crash: %v", r.err)
	}
	if r.enr.Facts.NodeID != "node-9" || r.enr.Secret == "" {
		t.Fatalf("enrollment: %+v", r.enr)
	}
	inst := b.instance(t, "prov-a")
	if inst.Restarts != 1 || inst.State != pluginhost.StateRunning || inst.PID == pid || inst.PID == 0 {
		t.Fatalf("instance after the crash: %+v (old pid %d)", inst, pid)
	}
	if alive(pid) {
		t.Fatalf("killed plugin %d still alive", pid)
	}
	// The retry used the same operation id: asking again returns the same result.
	again, err := drv.Enroll(ctx, &provisioner.EnrollRequest{OperationID: "op-kill-1", NodeID: "node-9", Pool: "a100"})
	if err != nil || again.Secret != r.enr.Secret {
		t.Fatalf("enroll again with the same operation id: %v (secret changed: %v)", err, err == nil && again.Secret != r.enr.Secret)
	}
	if got := b.metric(t, "gpuaas_plugin_restarts_total", map[string]string{"instance": "prov-a"}); got != 1 {
		t.Fatalf("restarts metric = %v, want 1", got)
	}
	if got := b.metric(t, "gpuaas_plugin_calls_total", map[string]string{"instance": "prov-a", "method": "Enroll"}); got != 2 {
		t.Fatalf("Enroll calls metric = %v, want 2 (the retry counts once)", got)
	}
	if got := b.metric(t, "gpuaas_plugin_call_errors_total", map[string]string{"instance": "prov-a", "method": "Enroll", "code": "plugin_exited"}); got != 0 {
		t.Fatalf("a retried call was counted as an error: %v", got)
	}
}

func TestCrashedPluginIsRestartedWithBackoff(t *testing.T) {
	t.Parallel()
	b := setup(t, pluginhost.WithRestartBackoff(100*time.Millisecond, 400*time.Millisecond, time.Minute))
	ctx := b.ctx(t)
	b.install(t, binInstantprov)
	b.configure(t, "prov-a", "instantprov", provConfig(nil))
	if err := b.host.Start(ctx); err != nil {
		t.Fatal(err)
	}
	eventually(t, 20*time.Second, "boot start", func() bool {
		return b.instance(t, "prov-a").State == pluginhost.StateRunning
	})
	var pids []int
	for i := 1; i <= 3; i++ {
		pid := b.instance(t, "prov-a").PID
		pids = append(pids, pid)
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		eventually(t, 20*time.Second, "restart after a crash", func() bool {
			inst := b.instance(t, "prov-a")
			return inst.State == pluginhost.StateRunning && inst.PID != pid && inst.PID != 0 && inst.Restarts == i
		})
	}
	if got := b.metric(t, "gpuaas_plugin_restarts_total", map[string]string{"instance": "prov-a"}); got != 3 {
		t.Fatalf("restarts metric = %v, want 3", got)
	}
	if !strings.Contains(b.log.String(), "restart_in=400ms") {
		t.Fatalf("the third crash did not back off to 400ms:\n%s", b.log.String())
	}
	for _, pid := range pids {
		if alive(pid) {
			t.Fatalf("crashed plugin %d alive", pid)
		}
	}
	// Close stops the plugin process.
	pid := b.instance(t, "prov-a").PID
	if err := b.host.Close(); err != nil {
		t.Fatal(err)
	}
	if alive(pid) {
		t.Fatalf("plugin %d outlived Close", pid)
	}
	if inst := b.instance(t, "prov-a"); inst.State != pluginhost.StateStopped {
		t.Fatalf("state after Close: %s", inst.State)
	}
	_, err := b.host.Provisioner(ctx, "prov-a")
	wantCode(t, err, pluginhost.CodeUnavailable)
}

func TestFrozenPluginFailsHealthChecksAndIsReplaced(t *testing.T) {
	t.Parallel()
	b := setup(t, pluginhost.WithHealthCheck(200*time.Millisecond, 200*time.Millisecond))
	ctx := b.ctx(t)
	b.install(t, binInstantprov)
	b.configure(t, "prov-a", "instantprov", provConfig(nil))
	drv, err := b.host.Provisioner(ctx, "prov-a")
	if err != nil {
		t.Fatal(err)
	}
	pid := b.instance(t, "prov-a").PID
	// The process is alive but answers nothing.
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	eventually(t, 20*time.Second, "the frozen plugin to be replaced", func() bool {
		inst := b.instance(t, "prov-a")
		return inst.State == pluginhost.StateRunning && inst.PID != pid && inst.PID != 0 && inst.Restarts == 1
	})
	if alive(pid) {
		t.Fatalf("frozen plugin %d was not killed", pid)
	}
	if !strings.Contains(b.log.String(), "health check failed twice") {
		t.Fatal("no health check failure logged")
	}
	if _, err := drv.Probe(ctx, ""); err != nil {
		t.Fatal(err)
	}
}

func TestEnableDisable(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := b.ctx(t)
	b.install(t, binInstantprov)
	b.configure(t, "prov-a", "instantprov", provConfig(nil))
	drv, err := b.host.Provisioner(ctx, "prov-a")
	if err != nil {
		t.Fatal(err)
	}
	pid := b.instance(t, "prov-a").PID

	inst, err := b.host.SetInstanceEnabled(ctx, "prov-a", false)
	if err != nil {
		t.Fatal(err)
	}
	if inst.Enabled || inst.State != pluginhost.StateStopped || inst.PID != 0 || alive(pid) {
		t.Fatalf("disabled instance: %+v (process alive %v)", inst, alive(pid))
	}
	_, err = drv.Probe(ctx, "")
	wantCode(t, err, pluginhost.CodeInstanceDisabled)

	if _, err := b.host.SetInstanceEnabled(ctx, "prov-a", true); err != nil {
		t.Fatal(err)
	}
	if _, err := drv.Probe(ctx, ""); err != nil {
		t.Fatalf("after enabling: %v", err)
	}

	if _, err := b.host.SetPluginEnabled(ctx, "instantprov", false); err != nil {
		t.Fatal(err)
	}
	_, err = drv.Probe(ctx, "")
	wantCode(t, err, pluginhost.CodeInstanceDisabled)
	if _, err := b.host.SetPluginEnabled(ctx, "instantprov", true); err != nil {
		t.Fatal(err)
	}
	if _, err := drv.Probe(ctx, ""); err != nil {
		t.Fatalf("after enabling the plugin: %v", err)
	}
	for _, action := range []string{pluginhost.ActionInstanceDisable, pluginhost.ActionInstanceEnable, pluginhost.ActionDisable, pluginhost.ActionEnable} {
		if rows := b.audits(t, action); len(rows) != 1 || rows[0].ActorType != "admin" {
			t.Fatalf("audit %s: %+v", action, rows)
		}
	}
}

func TestStorageAndPaymentsThroughTheHost(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := b.ctx(t)
	b.install(t, binDiskstore)
	b.install(t, binInstantpay)
	b.configure(t, "files", "diskstore", map[string]any{"root": t.TempDir()})
	b.configure(t, "pay", "instantpay", map[string]any{"webhook_secret": webhookSecret})

	st, err := b.host.Storage(ctx, "files")
	if err != nil {
		t.Fatal(err)
	}
	body := strings.Repeat("gpu", 1<<20) // 3 MiB: several stream chunks
	if _, err := st.Put(ctx, &storage.PutRequest{OperationID: "put-1", Key: "a/b", Size: int64(len(body))}, strings.NewReader(body)); err != nil {
		t.Fatal(err)
	}
	obj, err := st.Get(ctx, "a/b")
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(obj.Body)
	_ = obj.Body.Close()
	if err != nil || string(got) != body {
		t.Fatalf("Get: %d bytes, %v", len(got), err)
	}
	if _, err := st.(storage.Presigner).PresignGet(ctx, &storage.PresignRequest{Key: "a/b", Expiry: time.Minute}); !errors.Is(err, base.ErrUnimplemented) {
		t.Fatalf("presign on a driver without the capability: %v", err)
	}

	pay, err := b.host.Payments(ctx, "pay")
	if err != nil {
		t.Fatal(err)
	}
	sess, err := pay.CreateCheckout(ctx, &payments.CheckoutRequest{OperationID: "co-1", OrgID: "org-1", AmountMinor: 5000,
		Currency: "USD", SuccessURL: "https://example.test/ok", CancelURL: "https://example.test/cancel"})
	if err != nil || sess.SessionID == "" {
		t.Fatalf("checkout: %+v, %v", sess, err)
	}
	_, err = b.host.Storage(ctx, "pay")
	wantCode(t, err, pluginhost.CodeKindMismatch)
}

// TestCoreKilledLeavesNoPlugin kills a process running a Host with SIGKILL
// and checks that its plugin processes die with it.
func TestCoreKilledLeavesNoPlugin(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.install(t, binInstantprov)
	b.install(t, binDiskstore)
	b.configure(t, "prov-a", "instantprov", provConfig(nil))
	b.configure(t, "files", "diskstore", map[string]any{"root": t.TempDir()})

	cmd := exec.Command(bin(t, binCorehost), b.keyDir, "prov-a", "files")
	cmd.Env = append(os.Environ(), "DATABASE_URL="+b.url)
	cmd.Stderr = b.log
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	ready := make(chan error, 1)
	go func() {
		line, err := bufio.NewReader(stdout).ReadString('\n')
		if err == nil && strings.TrimSpace(line) != "ready" {
			err = errors.New("corehost said " + line)
		}
		ready <- err
	}()
	select {
	case err := <-ready:
		if err != nil {
			t.Fatalf("corehost: %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("corehost did not get ready")
	}
	plugins := children(t, cmd.Process.Pid)
	if len(plugins) != 2 {
		t.Fatalf("corehost has %d plugin children %v, want 2", len(plugins), plugins)
	}
	for _, name := range []string{"prov-a", "files"} {
		if inst := b.instance(t, name); inst.State != pluginhost.StateRunning {
			t.Fatalf("%s: %+v", name, inst)
		}
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	eventually(t, 5*time.Second, "the plugins to die with the core", func() bool {
		for _, pid := range plugins {
			if alive(pid) {
				return false
			}
		}
		return true
	})
}
