package pluginhost_test

import (
	"syscall"
	"testing"
	"time"

	"github.com/gpuaas/gpuaas/core/internal/pluginhost"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
)

func TestProvisionerDiscover(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := b.ctx(t)
	b.install(t, binInstantprov)
	b.configure(t, "prov-a", "instantprov", provConfig(nil))
	drv, err := b.host.Provisioner(ctx, "prov-a")
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"node-1", "node-2"} {
		if _, err := drv.Enroll(ctx, &provisioner.EnrollRequest{OperationID: "op-enroll-" + id, NodeID: id}); err != nil {
			t.Fatal(err)
		}
	}
	dis, ok := drv.(provisioner.Discoverer)
	if !ok {
		t.Fatalf("the host's provisioner driver %T is no provisioner.Discoverer", drv)
	}
	var got []string
	cursor := ""
	for pages := 1; ; pages++ {
		page, err := dis.Discover(ctx, &provisioner.DiscoverRequest{Cursor: cursor, Limit: 1})
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range page.Nodes {
			if !n.Ready || n.Broken || n.Facts == nil || n.Facts.NodeID != n.NodeID {
				t.Errorf("discovered node %+v: want ready, with its facts", n)
			}
			got = append(got, n.NodeID)
		}
		if page.NextCursor == "" {
			break
		}
		if pages == 10 {
			t.Fatal("Discover did not end after 10 pages")
		}
		cursor = page.NextCursor
	}
	if len(got) != 2 || got[0] != "node-1" || got[1] != "node-2" {
		t.Fatalf("discovered %v, want [node-1 node-2]", got)
	}
	if n := b.metric(t, "gpuaas_plugin_calls_total", map[string]string{"instance": "prov-a", "method": "Discover"}); n != 2 {
		t.Fatalf("Discover calls metric = %v, want 2", n)
	}
}

func TestProvisionerDiscoverRetriedAfterPluginCrash(t *testing.T) {
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
		page *provisioner.DiscoverPage
		err  error
	}
	done := make(chan result, 1)
	go func() {
		page, err := drv.(provisioner.Discoverer).Discover(ctx, &provisioner.DiscoverRequest{})
		done <- result{page, err}
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
	if r.err != nil || r.page == nil {
		t.Fatalf("the caller saw the crash: %v", r.err)
	}
	inst := b.instance(t, "prov-a")
	if inst.Restarts != 1 || inst.State != pluginhost.StateRunning || inst.PID == pid || inst.PID == 0 {
		t.Fatalf("instance after the crash: %+v (old pid %d)", inst, pid)
	}
	if n := b.metric(t, "gpuaas_plugin_calls_total", map[string]string{"instance": "prov-a", "method": "Discover"}); n != 1 {
		t.Fatalf("Discover calls metric = %v, want 1 (the retry counts once)", n)
	}
	if n := b.metric(t, "gpuaas_plugin_call_errors_total", map[string]string{"instance": "prov-a", "method": "Discover"}); n != 0 {
		t.Fatalf("a retried Discover was counted as an error: %v", n)
	}
}
