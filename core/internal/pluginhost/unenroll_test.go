package pluginhost_test

import (
	"errors"
	"syscall"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/core/internal/pluginhost"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
)

func TestProvisionerUnenroll(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := b.ctx(t)
	b.install(t, binInstantprov)
	b.configure(t, "prov-a", "instantprov", provConfig(nil))
	drv, err := b.host.Provisioner(ctx, "prov-a")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := drv.Enroll(ctx, &provisioner.EnrollRequest{OperationID: "op-enroll-node-1", NodeID: "node-1"}); err != nil {
		t.Fatal(err)
	}
	un, ok := drv.(provisioner.Unenroller)
	if !ok {
		t.Fatalf("the host's provisioner driver %T is no provisioner.Unenroller", drv)
	}
	req := &provisioner.UnenrollRequest{OperationID: "retire-node-1", NodeID: "node-1"}
	for range 2 {
		if err := un.Unenroll(ctx, req); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := drv.Probe(ctx, "node-1"); !errors.Is(err, base.ErrNotFound) {
		t.Fatalf("Probe of the unenrolled node: %v; want base.ErrNotFound", err)
	}
	if err := un.Unenroll(ctx, &provisioner.UnenrollRequest{NodeID: "node-1"}); !errors.Is(err, base.ErrInvalidArgument) {
		t.Fatalf("Unenroll without operation id: %v; want base.ErrInvalidArgument", err)
	}
	if n := b.metric(t, "gpuaas_plugin_calls_total", map[string]string{"instance": "prov-a", "method": "Unenroll"}); n != 3 {
		t.Fatalf("Unenroll calls metric = %v, want 3", n)
	}
	if n := b.metric(t, "gpuaas_plugin_call_errors_total", map[string]string{"instance": "prov-a", "method": "Unenroll"}); n != 1 {
		t.Fatalf("Unenroll errors metric = %v, want 1", n)
	}
}

// A plugin that dies during Unenroll is restarted and the call repeated
// with the same request (Unenroll is idempotent); the caller sees success.
func TestProvisionerUnenrollRetriedAfterPluginCrash(t *testing.T) {
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
	done := make(chan error, 1)
	go func() {
		done <- drv.(provisioner.Unenroller).Unenroll(ctx, &provisioner.UnenrollRequest{OperationID: "retire-node-1", NodeID: "node-1"})
	}()
	time.Sleep(400 * time.Millisecond) // the call is inside the plugin now
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("the caller saw the crash: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the call did not return")
	}
	inst := b.instance(t, "prov-a")
	if inst.Restarts != 1 || inst.State != pluginhost.StateRunning || inst.PID == pid || inst.PID == 0 {
		t.Fatalf("instance after the crash: %+v (old pid %d)", inst, pid)
	}
	if n := b.metric(t, "gpuaas_plugin_calls_total", map[string]string{"instance": "prov-a", "method": "Unenroll"}); n != 1 {
		t.Fatalf("Unenroll calls metric = %v, want 1 (the retry counts once)", n)
	}
	if n := b.metric(t, "gpuaas_plugin_call_errors_total", map[string]string{"instance": "prov-a", "method": "Unenroll"}); n != 0 {
		t.Fatalf("a retried Unenroll was counted as an error: %v", n)
	}
}
