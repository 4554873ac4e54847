package manual_test

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gpuaas/gpuaas/agent/tasks"
	"github.com/gpuaas/gpuaas/plugins/manual"
	"github.com/gpuaas/gpuaas/plugins/manual/nomadsim"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
)

// TestLifecycle provisions a tenant user on a node and releases it with a
// wipe, checking what the agent is asked to do and how Status follows it.
func TestLifecycle(t *testing.T) {
	h := setup(t)
	d := h.driver(t, map[string]any{"tenant_sudo": false})
	ctx := testCtx(t)
	node := h.nodes[0]

	caps, err := d.Capabilities(ctx)
	if err != nil || !slices.Equal(caps.ReleaseModes, []provisioner.ReleaseMode{provisioner.ReleaseRevoke, provisioner.ReleaseWipe}) || len(caps.Images) != 0 {
		t.Fatalf("Capabilities: %+v %v", caps, err)
	}

	prov := provisionReq(opID(t, "provision"), node)
	key2 := newKey(t, "alice@desk")
	prov.SSHPublicKeys = append(prov.SSHPublicKeys, "  "+key2+"  ", sshKey) // padded, and a duplicate
	op, err := d.Provision(ctx, prov)
	if err != nil {
		t.Fatalf("Provision: %v", err)
	}
	if op.OperationID != prov.OperationID || op.NodeID != node || op.State != provisioner.StatePending {
		t.Fatalf("Provision: %+v", op)
	}
	task, ok := h.core.task(instance, prov.OperationID)
	if !ok || task.Type != "allocation.provision_user" || task.MaxAttempts != 5 || task.ExpiresAt.Sub(task.CreatedAt) != time.Hour {
		t.Fatalf("queued task %+v", task)
	}
	var params tasks.ProvisionUserParams
	dec := json.NewDecoder(strings.NewReader(string(task.Params)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&params); err != nil {
		t.Fatalf("params %s: %v", task.Params, err)
	}
	if params.Username != "alice" || params.UID != 2001 || params.Sudo || params.AllocationID != prov.AllocationID ||
		!slices.Equal(params.SSHPublicKeys, []string{sshKey, key2}) {
		t.Fatalf("params %+v", params)
	}
	done, seen := wait(t, d, prov.OperationID)
	if done.State != provisioner.StateSucceeded || done.Percent != 100 || done.UpdatedAt.IsZero() {
		t.Fatalf("provision ended %+v", done)
	}
	order := []provisioner.OperationState{provisioner.StatePending, provisioner.StateRunning, provisioner.StateSucceeded}
	for i := 1; i < len(seen); i++ {
		if slices.Index(order, seen[i]) < slices.Index(order, seen[i-1]) {
			t.Errorf("states went back: %v", seen)
		}
	}

	rel := &provisioner.ReleaseRequest{OperationID: opID(t, "release"), NodeID: node, AllocationID: prov.AllocationID, Username: "alice", Mode: provisioner.ReleaseWipe}
	op, err = d.Release(ctx, rel)
	if err != nil || op.State != provisioner.StatePending {
		t.Fatalf("Release: %+v %v", op, err)
	}
	revoke, ok1 := h.core.task(instance, rel.OperationID)
	wipe, ok2 := h.core.task(instance, rel.OperationID+"/wipe")
	if !ok1 || !ok2 || revoke.Type != "allocation.revoke_user" || wipe.Type != "node.wipe" || !wipe.CreatedAt.After(revoke.CreatedAt.Add(-time.Nanosecond)) {
		t.Fatalf("release tasks %+v %+v", revoke, wipe)
	}
	if string(revoke.Params) != `{"allocation_id":"`+prov.AllocationID+`","username":"alice"}` ||
		string(wipe.Params) != `{"allocation_id":"`+prov.AllocationID+`"}` {
		t.Fatalf("release params %s / %s", revoke.Params, wipe.Params)
	}
	done, _ = wait(t, d, rel.OperationID)
	if done.State != provisioner.StateSucceeded || !strings.Contains(done.Message, "node.wipe") {
		t.Fatalf("release ended %+v", done)
	}

	revokeOnly := &provisioner.ReleaseRequest{OperationID: opID(t, "revoke"), NodeID: node, Username: "alice", Mode: provisioner.ReleaseRevoke}
	if _, err := d.Release(ctx, revokeOnly); err != nil {
		t.Fatal(err)
	}
	if _, ok := h.core.task(instance, revokeOnly.OperationID+"/wipe"); ok {
		t.Fatal("a revoke queued a wipe")
	}
	if done, _ := wait(t, d, revokeOnly.OperationID); done.State != provisioner.StateSucceeded {
		t.Fatalf("revoke ended %+v", done)
	}

	// Without release_wipe the wipe mode is not offered, and refused.
	nowipe := h.driver(t, map[string]any{"release_wipe": false})
	caps, _ = nowipe.Capabilities(ctx)
	if !slices.Equal(caps.ReleaseModes, []provisioner.ReleaseMode{provisioner.ReleaseRevoke}) {
		t.Fatalf("release modes without release_wipe: %v", caps.ReleaseModes)
	}
	_, err = nowipe.Release(ctx, &provisioner.ReleaseRequest{OperationID: opID(t, "w"), NodeID: node, Username: "alice", Mode: provisioner.ReleaseWipe})
	if !errors.Is(err, base.ErrInvalidArgument) {
		t.Fatalf("wipe without release_wipe: %v", err)
	}
	_, err = d.Release(ctx, &provisioner.ReleaseRequest{OperationID: opID(t, "r"), NodeID: node, Username: "alice", Mode: provisioner.ReleaseReimage})
	if !errors.Is(err, base.ErrInvalidArgument) {
		t.Fatalf("reimage: %v", err)
	}
}

// TestIdempotency: a retried call is the same task; an operation id reused
// for another request is a conflict, also after a driver restart when the
// core's task shows it.
func TestIdempotency(t *testing.T) {
	h := setup(t)
	ctx := testCtx(t)
	d := h.driver(t, nil)
	node := h.nodes[0]

	t.Run("concurrent retries queue one task", func(t *testing.T) {
		req := provisionReq(opID(t, "p"), node)
		before := h.core.taskCount(instance, node)
		var wg sync.WaitGroup
		ids := make([]string, 8)
		errs := make([]error, 8)
		for i := range 8 {
			wg.Go(func() {
				op, err := d.Provision(ctx, req)
				errs[i] = err
				if err == nil {
					ids[i] = op.OperationID
				}
			})
		}
		wg.Wait()
		for _, err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		if n := h.core.taskCount(instance, node) - before; n != 1 {
			t.Fatalf("%d tasks queued by 8 identical calls", n)
		}
	})

	t.Run("other arguments", func(t *testing.T) {
		req := provisionReq(opID(t, "p"), node)
		if _, err := d.Provision(ctx, req); err != nil {
			t.Fatal(err)
		}
		for name, mutate := range map[string]func(*provisioner.ProvisionRequest){
			"user":  func(r *provisioner.ProvisionRequest) { r.User.Username = "bob" },
			"uid":   func(r *provisioner.ProvisionRequest) { r.User.UID = 2002 },
			"keys":  func(r *provisioner.ProvisionRequest) { r.SSHPublicKeys = []string{newKey(t, "x")} },
			"node":  func(r *provisioner.ProvisionRequest) { r.NodeID = h.nodes[1] },
			"alloc": func(r *provisioner.ProvisionRequest) { r.AllocationID = "other" },
		} {
			other := *req
			mutate(&other)
			if _, err := d.Provision(ctx, &other); !errors.Is(err, base.ErrConflict) {
				t.Errorf("%s changed: got %v, want ErrConflict", name, err)
			}
		}
		_, err := d.Release(ctx, &provisioner.ReleaseRequest{OperationID: req.OperationID, NodeID: node, Username: "alice", Mode: provisioner.ReleaseRevoke})
		if !errors.Is(err, base.ErrConflict) {
			t.Errorf("release with a provision's id: %v", err)
		}
		_, err = d.Enroll(ctx, &provisioner.EnrollRequest{OperationID: req.OperationID, NodeID: node})
		if !errors.Is(err, base.ErrConflict) {
			t.Errorf("enroll with a provision's id: %v", err)
		}
	})

	t.Run("after a restart", func(t *testing.T) {
		req := provisionReq(opID(t, "p"), node)
		if _, err := d.Provision(ctx, req); err != nil {
			t.Fatal(err)
		}
		wait(t, d, req.OperationID)
		fresh := h.driver(t, nil) // a restarted plugin process knows nothing
		again, err := fresh.Provision(ctx, req)
		if err != nil || again.State != provisioner.StateSucceeded {
			t.Fatalf("retry after a restart: %+v %v", again, err)
		}
		other := *req
		other.User.Username = "mallory"
		if _, err := h.driver(t, nil).Provision(ctx, &other); !errors.Is(err, base.ErrConflict) {
			t.Errorf("other user after a restart: %v", err)
		}
		// The core itself refuses the id for another node or task type.
		_, err = h.driver(t, nil).Release(ctx, &provisioner.ReleaseRequest{OperationID: req.OperationID, NodeID: node, Username: "alice", Mode: provisioner.ReleaseRevoke})
		if !errors.Is(err, base.ErrConflict) {
			t.Errorf("release with a provision's id after a restart: %v", err)
		}
		moved := *req
		moved.NodeID = h.nodes[1]
		if _, err := h.driver(t, nil).Provision(ctx, &moved); !errors.Is(err, base.ErrConflict) {
			t.Errorf("other node after a restart: %v", err)
		}
		// Status works from the core alone, a release's wipe included.
		rel := &provisioner.ReleaseRequest{OperationID: opID(t, "r"), NodeID: node, Username: "alice", Mode: provisioner.ReleaseWipe}
		if _, err := d.Release(ctx, rel); err != nil {
			t.Fatal(err)
		}
		op, _ := wait(t, h.driver(t, nil), rel.OperationID)
		if op.State != provisioner.StateSucceeded || !strings.Contains(op.Message, "node.wipe") {
			t.Errorf("release status after a restart: %+v", op)
		}
	})

	t.Run("refused requests leave the id free", func(t *testing.T) {
		req := provisionReq(opID(t, "p"), "no-such-node")
		if _, err := d.Provision(ctx, req); !errors.Is(err, base.ErrNotFound) {
			t.Fatalf("unknown node: %v", err)
		}
		req.NodeID = node
		if _, err := d.Provision(ctx, req); err != nil {
			t.Fatalf("the id after a refused request: %v", err)
		}
	})
}

// TestFailures: a failed, expired or half-queued task is reported as such.
func TestFailures(t *testing.T) {
	h := setup(t)
	ctx := testCtx(t)
	d := h.driver(t, nil)

	t.Run("agent failure", func(t *testing.T) {
		h.core.update(instance, h.nodes[1], func(n *fakeNode) { n.FailTasks = "useradd: exit status 9: user 'alice' already exists" })
		defer h.core.update(instance, h.nodes[1], func(n *fakeNode) { n.FailTasks = "" })
		req := provisionReq(opID(t, "p"), h.nodes[1])
		if _, err := d.Provision(ctx, req); err != nil {
			t.Fatal(err)
		}
		op, _ := wait(t, d, req.OperationID)
		if op.State != provisioner.StateFailed || !strings.Contains(op.Message, "already exists") || op.Percent != 100 {
			t.Fatalf("failed task: %+v", op)
		}
	})

	t.Run("expired", func(t *testing.T) {
		now := time.Now()
		var mu sync.Mutex
		clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
		h.core.setClock(clock)
		defer h.core.setClock(time.Now)
		h.core.update(instance, h.nodes[1], func(n *fakeNode) { n.Live = false })
		defer h.core.update(instance, h.nodes[1], func(n *fakeNode) { n.Live = true })
		short := h.driver(t, map[string]any{"task_ttl": "2m"})
		req := provisionReq(opID(t, "p"), h.nodes[1])
		if _, err := short.Provision(ctx, req); err != nil {
			t.Fatal(err)
		}
		if op, _ := short.Status(ctx, req.OperationID); op.State != provisioner.StatePending || !strings.Contains(op.Message, "queued") {
			t.Fatalf("queued for a silent node: %+v", op)
		}
		mu.Lock()
		now = now.Add(3 * time.Minute)
		mu.Unlock()
		op, err := short.Status(ctx, req.OperationID)
		if err != nil || op.State != provisioner.StateFailed || !strings.Contains(op.Message, "expired") {
			t.Fatalf("expired task: %+v %v", op, err)
		}
	})

	t.Run("half-queued release", func(t *testing.T) {
		rel := &provisioner.ReleaseRequest{OperationID: opID(t, "r"), NodeID: h.nodes[0], Username: "alice", Mode: provisioner.ReleaseWipe}
		// The revoke is queued; the wipe's request fails.
		h.core.faultAfter("POST", "/api/v1/admin/", 1, 503, "database_unavailable", 1)
		if _, err := d.Release(ctx, rel); !errors.Is(err, base.ErrUnavailable) {
			t.Fatalf("Release with the core failing: %v", err)
		}
		time.Sleep(3 * h.core.tick) // the revoke is done by now
		op, err := d.Status(ctx, rel.OperationID)
		if err != nil || op.State.Terminal() || !strings.Contains(op.Message, "node.wipe not queued yet") {
			t.Fatalf("half-queued release: %+v %v", op, err)
		}
		if _, err := d.Release(ctx, rel); err != nil {
			t.Fatalf("Release retried: %v", err)
		}
		if op, _ := wait(t, d, rel.OperationID); op.State != provisioner.StateSucceeded {
			t.Fatalf("release ended %+v", op)
		}
	})

	t.Run("unknown operation", func(t *testing.T) {
		if _, err := d.Status(ctx, "never-started"); !errors.Is(err, base.ErrNotFound) {
			t.Fatalf("unknown operation: %v", err)
		}
		if _, err := d.Status(ctx, ""); !errors.Is(err, base.ErrInvalidArgument) {
			t.Fatalf("empty operation id: %v", err)
		}
	})
}

// TestProbe: a node is healthy while its agent heartbeats; the core's
// health and the Nomad job's allocation are reported.
func TestProbe(t *testing.T) {
	h := setup(t)
	ctx := testCtx(t)
	d := h.driver(t, map[string]any{"heartbeat_max_age": "30s"})
	node := h.nodes[0]

	hl, err := d.Probe(ctx, "")
	if err != nil || !hl.Healthy {
		t.Fatalf(`Probe(""): %+v %v`, hl, err)
	}
	hl, err = d.Probe(ctx, node)
	if err != nil || !hl.Healthy || !strings.Contains(hl.Message, "heartbeat") {
		t.Fatalf("Probe of a live node: %+v %v", hl, err)
	}
	if h.nomadAddr != "" && !strings.Contains(hl.Message, "is not registered") {
		t.Errorf("Probe without an agent job: %q", hl.Message)
	}
	if _, err := d.Probe(ctx, "unknown-node"); !errors.Is(err, base.ErrNotFound) {
		t.Fatalf("unknown node: %v", err)
	}
	if _, err := d.Probe(ctx, "../etc"); !errors.Is(err, base.ErrNotFound) {
		t.Fatalf("malformed node id: %v", err)
	}

	old := time.Now().Add(-2 * time.Minute)
	for _, c := range []struct {
		name string
		set  func(*fakeNode)
		want string
	}{
		{"stale heartbeat", func(n *fakeNode) { n.Live, n.Heartbeat = false, &old }, "old (more than 30s)"},
		{"never reported", func(n *fakeNode) { n.Live, n.Heartbeat = false, nil }, "has not reported yet"},
		{"offline", func(n *fakeNode) { n.State = "offline" }, "node is offline"},
		{"retired", func(n *fakeNode) { n.State = "retired" }, "node is retired"},
	} {
		t.Run(c.name, func(t *testing.T) {
			h.core.update(instance, node, c.set)
			defer h.core.update(instance, node, func(n *fakeNode) { n.Live, n.Heartbeat, n.State = true, nil, "available" })
			hl, err := d.Probe(ctx, node)
			if err != nil || hl.Healthy || !strings.Contains(hl.Message, c.want) {
				t.Fatalf("%+v %v, want unhealthy with %q", hl, err, c.want)
			}
		})
	}

	t.Run("core down", func(t *testing.T) {
		h.core.setDown(true)
		defer h.core.setDown(false)
		hl, err := d.Probe(ctx, "")
		if err != nil || hl.Healthy || !strings.Contains(hl.Message, "503") {
			t.Fatalf(`Probe("") with the core down: %+v %v`, hl, err)
		}
		if _, err := d.Probe(ctx, node); !errors.Is(err, base.ErrUnavailable) {
			t.Fatalf("Probe(node) with the core down: %v", err)
		}
	})

	t.Run("nomad allocation", func(t *testing.T) {
		h.needSim(t)
		if _, err := d.Enroll(ctx, &provisioner.EnrollRequest{OperationID: opID(t, "e"), NodeID: node}); err != nil {
			t.Fatal(err)
		}
		hl, _ := d.Probe(ctx, node)
		if !strings.Contains(hl.Message, "Nomad allocation") || !strings.Contains(hl.Message, "pending") {
			t.Fatalf("just placed: %q", hl.Message)
		}
		deadline := time.Now().Add(5 * time.Second)
		for !strings.Contains(hl.Message, "is running") && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
			hl, _ = d.Probe(ctx, node)
		}
		if !hl.Healthy || !strings.Contains(hl.Message, "is running") {
			t.Fatalf("running: %+v", hl)
		}
		h.sim.FailAllocation("default", "gpuaas-agent-"+node, "failed to launch command with executor: fork/exec /usr/local/bin/gpuaas-agent: no such file or directory")
		hl, _ = d.Probe(ctx, node)
		if !strings.Contains(hl.Message, "failed") || !strings.Contains(hl.Message, "no such file or directory") {
			t.Fatalf("failed allocation: %q", hl.Message)
		}
		h.sim.SetLatency(5 * time.Second)
		defer h.sim.SetLatency(0)
		short := h.driver(t, map[string]any{"request_timeout": "1s"})
		hl, err := short.Probe(ctx, node)
		if err != nil || !hl.Healthy || !strings.Contains(hl.Message, "Nomad is unreachable") {
			t.Fatalf("Nomad not answering: %+v %v", hl, err)
		}
	})
}

// TestSecretsNeverLogged runs every call with a JSON logger and checks that
// neither the API key, the Nomad token nor an enrollment secret appears.
func TestSecretsNeverLogged(t *testing.T) {
	const nomadToken = "5f4dcc3b-5aa7-65d6-1d83-27deb882cf99"
	h := setup(t, withNomad(nomadsim.WithToken(nomadToken)))
	h.needSim(t)
	h.nomadToken = nomadToken
	var logs syncBuffer
	d := h.driver(t, nil, &logs)
	ctx := testCtx(t)
	enr, err := d.Enroll(ctx, &provisioner.EnrollRequest{OperationID: opID(t, "e"), NodeID: h.nodes[0]})
	if err != nil {
		t.Fatal(err)
	}
	req := provisionReq(opID(t, "p"), h.nodes[0])
	if _, err := d.Provision(ctx, req); err != nil {
		t.Fatal(err)
	}
	wait(t, d, req.OperationID)
	if _, err := d.Release(ctx, &provisioner.ReleaseRequest{OperationID: opID(t, "r"), NodeID: h.nodes[0], Username: "alice", Mode: provisioner.ReleaseWipe}); err != nil {
		t.Fatal(err)
	}
	_, _ = d.Probe(ctx, h.nodes[0])
	_ = configure(t, manual.New(hclog.New(&hclog.LoggerOptions{Output: &logs, JSONFormat: true})), h.config(map[string]any{"nomad_token": "wrong-token"}))
	out := logs.String()
	if !strings.Contains(out, "task queued") || !strings.Contains(out, "agent job registered") {
		t.Fatalf("the log lacks the driver's lines:\n%s", out)
	}
	for name, secret := range map[string]string{"api key": h.core.apiKey, "nomad token": nomadToken, "enrollment secret": enr.Secret, "wrong token": "wrong-token"} {
		if strings.Contains(out, secret) {
			t.Errorf("the log contains the %s", name)
		}
	}
	// Only the core's admin routes get the key.
	for _, a := range h.core.authHeaders() {
		if a != "" && a != "Bearer "+h.core.apiKey {
			t.Errorf("unexpected Authorization header %q", a)
		}
	}
}

// TestEnrollSecret: the secret is HMAC-SHA256 keyed with the API key over
// the instance, operation and node, base64url, "gpe_"-prefixed.
func TestEnrollSecret(t *testing.T) {
	h := setup(t, withoutNomad)
	d := h.driver(t, nil)
	ctx := testCtx(t)
	op := opID(t, "e")
	enr, err := d.Enroll(ctx, &provisioner.EnrollRequest{OperationID: op, NodeID: h.nodes[0]})
	if err != nil {
		t.Fatal(err)
	}
	mac := hmac.New(sha256.New, []byte(h.core.apiKey))
	mac.Write([]byte("gpuaas-manual-enroll\x00" + instance + "\x00" + op + "\x00" + h.nodes[0]))
	if want := "gpe_" + base64.RawURLEncoding.EncodeToString(mac.Sum(nil)); enr.Secret != want {
		t.Fatalf("secret %q, want %q", enr.Secret, want)
	}
	again, _ := h.driver(t, nil).Enroll(ctx, &provisioner.EnrollRequest{OperationID: op, NodeID: h.nodes[0]})
	if again.Secret != enr.Secret {
		t.Fatal("a restarted driver derived another secret")
	}
	other, _ := d.Enroll(ctx, &provisioner.EnrollRequest{OperationID: op + "x", NodeID: h.nodes[0]})
	if other.Secret == enr.Secret {
		t.Fatal("two operations got the same secret")
	}
	if enr.Facts.NodeID != h.nodes[0] || enr.Facts.Hostname != h.nodes[0] || len(enr.Facts.GPUs) != 0 {
		t.Fatalf("facts %+v", enr.Facts)
	}
	withAddr, err := d.Enroll(ctx, &provisioner.EnrollRequest{OperationID: opID(t, "a"), NodeID: h.nodes[1], Address: "10.1.2.3",
		Params: map[string]string{"gpu_model": "NVIDIA L40S", "gpu_count": "4", "cpu_cores": "64", "memory_bytes": "549755813888"}})
	if err != nil {
		t.Fatal(err)
	}
	f := withAddr.Facts
	if f.Hostname != "10.1.2.3" || len(f.GPUs) != 1 || f.GPUs[0].Count != 4 || f.GPUs[0].Model != "NVIDIA L40S" || f.CPU.Cores != 64 || f.MemoryBytes != 512<<30 {
		t.Fatalf("declared facts %+v", f)
	}
}

// TestCoreErrors: the core's error answers reach the caller as SDK
// sentinels, and a core that does not answer in time is unavailable.
func TestCoreErrors(t *testing.T) {
	h := setup(t, withoutNomad)
	d := h.driver(t, map[string]any{"request_timeout": "1s"})
	ctx := testCtx(t)
	for _, c := range []struct {
		status int
		code   string
		want   error
	}{
		{503, "database_unavailable", base.ErrUnavailable},
		{429, "rate_limited", base.ErrUnavailable},
		{500, "internal", base.ErrUnavailable},
		{401, "api_key_revoked", base.ErrUnauthenticated},
		{403, "forbidden", base.ErrPermissionDenied},
		{400, "validation_failed", base.ErrInvalidArgument},
		{409, "conflict", base.ErrFailedPrecondition},
	} {
		t.Run(c.code, func(t *testing.T) {
			h.core.fault("POST", "/api/v1/admin/plugin-instances/"+instance+"/node-tasks", c.status, c.code, 1)
			req := provisionReq(opID(t, "p"), h.nodes[0])
			_, err := d.Provision(ctx, req)
			if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.code) {
				t.Fatalf("got %v, want %v naming %s", err, c.want, c.code)
			}
			if _, err := d.Provision(ctx, req); err != nil {
				t.Fatalf("the retry: %v", err)
			}
			h.core.fault("GET", "/api/v1/admin/plugin-instances/"+instance+"/node-tasks/", c.status, c.code, 1)
			if _, err := d.Status(ctx, req.OperationID); !errors.Is(err, c.want) {
				t.Fatalf("Status: got %v, want %v", err, c.want)
			}
		})
	}
	t.Run("timeout", func(t *testing.T) {
		h.core.slow(0, 3*time.Second)
		defer h.core.slow(0, 0)
		_, err := d.Status(ctx, "anything")
		if !errors.Is(err, base.ErrUnavailable) || errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("got %v, want ErrUnavailable (the driver's timeout, not the caller's)", err)
		}
	})
}
