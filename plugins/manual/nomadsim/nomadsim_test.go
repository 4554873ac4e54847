package nomadsim_test

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	nomad "github.com/hashicorp/nomad/api"

	"github.com/gpuaas/gpuaas/plugins/manual/nomadsim"
)

// setup serves a double and returns a Nomad API client on it.
func setup(t *testing.T, token string, opts ...nomadsim.Option) (*nomadsim.Server, *nomad.Client) {
	t.Helper()
	sim := nomadsim.New(opts...)
	srv := httptest.NewServer(sim)
	t.Cleanup(srv.Close)
	cl, err := nomad.NewClient(&nomad.Config{Address: srv.URL, SecretID: token, HttpClient: srv.Client()})
	if err != nil {
		t.Fatal(err)
	}
	return sim, cl
}

func testJob(id, node string) *nomad.Job {
	job := nomad.NewServiceJob(id, id, "", 50)
	job.Datacenters = []string{"dc1"}
	job.Constrain(nomad.NewConstraint("${node.unique.name}", "=", node))
	tg := nomad.NewTaskGroup("agent", 1)
	task := nomad.NewTask("gpuaas-agent", "raw_exec").SetConfig("command", "/usr/local/bin/gpuaas-agent")
	tg.AddTask(task)
	job.AddTaskGroup(tg)
	return job
}

func statusOf(t *testing.T, err error) (int, string) {
	t.Helper()
	var ure nomad.UnexpectedResponseError
	if !errors.As(err, &ure) {
		t.Fatalf("got %v, want an UnexpectedResponseError", err)
	}
	return ure.StatusCode(), ure.Body()
}

func TestJobLifecycle(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	clock := func() time.Time { return now }
	sim, cl := setup(t, "", nomadsim.WithClock(clock), nomadsim.WithStartDelay(time.Second),
		nomadsim.WithNodes(nomadsim.Node{Name: "gpu-1", Datacenter: "dc1"}))

	_, _, err := cl.Jobs().Info("gpuaas-agent-gpu-1", nil)
	if code, body := statusOf(t, err); code != 404 || body != "job not found" {
		t.Fatalf("unknown job: %d %q", code, body)
	}
	allocs, _, err := cl.Jobs().Allocations("gpuaas-agent-gpu-1", false, nil)
	if err != nil || len(allocs) != 0 {
		t.Fatalf("allocations of an unknown job: %v %v", allocs, err)
	}

	resp, _, err := cl.Jobs().Register(testJob("gpuaas-agent-gpu-1", "gpu-1"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.EvalID == "" || resp.JobModifyIndex == 0 {
		t.Fatalf("register response %+v", resp)
	}
	job, _, err := cl.Jobs().Info("gpuaas-agent-gpu-1", nil)
	if err != nil {
		t.Fatal(err)
	}
	if *job.Version != 0 || *job.Status != "running" || *job.Region != "global" || *job.Namespace != "default" {
		t.Fatalf("job %v v%d %s", *job.ID, *job.Version, *job.Status)
	}
	allocs, _, err = cl.Jobs().Allocations("gpuaas-agent-gpu-1", false, nil)
	if err != nil || len(allocs) != 1 || allocs[0].ClientStatus != "pending" || allocs[0].NodeName != "gpu-1" {
		t.Fatalf("new allocation: %+v %v", allocs, err)
	}
	now = now.Add(2 * time.Second)
	allocs, _, _ = cl.Jobs().Allocations("gpuaas-agent-gpu-1", false, nil)
	if allocs[0].ClientStatus != "running" || allocs[0].TaskStates["gpuaas-agent"].State != "running" {
		t.Fatalf("after the start delay: %+v", allocs[0])
	}

	// The same spec again: a new evaluation, nothing else.
	again, _, err := cl.Jobs().Register(testJob("gpuaas-agent-gpu-1", "gpu-1"), nil)
	if err != nil || again.JobModifyIndex != resp.JobModifyIndex || again.EvalID == resp.EvalID {
		t.Fatalf("unchanged register: %+v %v", again, err)
	}
	if got := sim.Allocations("default", "gpuaas-agent-gpu-1"); len(got) != 1 {
		t.Fatalf("%d allocations after an unchanged register", len(got))
	}

	// A changed spec: version 1, the old allocation stopped, a new one.
	changed := testJob("gpuaas-agent-gpu-1", "gpu-1")
	changed.TaskGroups[0].Tasks[0].Env = map[string]string{"X": "1"}
	upd, _, err := cl.Jobs().Register(changed, nil)
	if err != nil || upd.JobModifyIndex <= resp.JobModifyIndex {
		t.Fatalf("update: %+v %v", upd, err)
	}
	all := sim.Allocations("default", "gpuaas-agent-gpu-1")
	if len(all) != 2 || all[0].DesiredStatus != "stop" || all[0].ClientStatus != "complete" || all[1].ClientStatus != "pending" || all[1].JobVersion != 1 {
		t.Fatalf("after an update: %+v", all)
	}

	// A job for a node the cluster does not have is blocked: no allocation.
	if _, _, err := cl.Jobs().Register(testJob("gpuaas-agent-gpu-9", "gpu-9"), nil); err != nil {
		t.Fatal(err)
	}
	if got := sim.Allocations("default", "gpuaas-agent-gpu-9"); len(got) != 0 {
		t.Fatalf("placed on a missing node: %+v", got)
	}
	if j, _ := sim.Job("default", "gpuaas-agent-gpu-9"); *j.Status != "pending" {
		t.Fatalf("blocked job is %s", *j.Status)
	}

	if !sim.FailAllocation("default", "gpuaas-agent-gpu-1", `failed to launch command with executor: fork/exec /usr/local/bin/gpuaas-agent: no such file or directory`) {
		t.Fatal("no allocation to fail")
	}
	allocs, _, _ = cl.Jobs().Allocations("gpuaas-agent-gpu-1", false, nil)
	last := allocs[0] // the client sorts newest first
	if last.ClientStatus != "failed" || !last.TaskStates["gpuaas-agent"].Failed {
		t.Fatalf("failed allocation: %+v", last)
	}

	if _, _, err := cl.Jobs().Deregister("gpuaas-agent-gpu-1", false, nil); err != nil {
		t.Fatal(err)
	}
	job, _, _ = cl.Jobs().Info("gpuaas-agent-gpu-1", nil)
	if !*job.Stop || *job.Status != "dead" {
		t.Fatalf("deregistered job: stop %v status %s", *job.Stop, *job.Status)
	}
	if _, _, err := cl.Jobs().Deregister("gpuaas-agent-gpu-1", true, nil); err != nil {
		t.Fatal(err)
	}
	if _, _, err := cl.Jobs().Info("gpuaas-agent-gpu-1", nil); err == nil {
		t.Fatal("purged job still readable")
	}
}

func TestErrors(t *testing.T) {
	t.Run("acl", func(t *testing.T) {
		_, anon := setup(t, "", nomadsim.WithToken("s3cr3t-token"))
		_, _, err := anon.Jobs().Info("x", nil)
		if code, body := statusOf(t, err); code != 403 || body != "Permission denied" {
			t.Errorf("anonymous: %d %q", code, body)
		}
		_, wrong := setup(t, "other", nomadsim.WithToken("s3cr3t-token"))
		_, _, err = wrong.Jobs().Register(testJob("x", "n"), nil)
		if code, body := statusOf(t, err); code != 403 || body != "ACL token not found" {
			t.Errorf("unknown token: %d %q", code, body)
		}
		_, right := setup(t, "s3cr3t-token", nomadsim.WithToken("s3cr3t-token"))
		if _, _, err := right.Jobs().Register(testJob("x", "n"), nil); err != nil {
			t.Errorf("with the token: %v", err)
		}
	})
	t.Run("validation", func(t *testing.T) {
		_, cl := setup(t, "")
		bad := testJob("x", "n")
		bad.TaskGroups[0].Tasks = nil
		bad.TaskGroups[0].RestartPolicy = &nomad.RestartPolicy{Mode: new("sometimes")}
		_, _, err := cl.Jobs().Register(bad, nil)
		code, body := statusOf(t, err)
		if code != 500 || !strings.HasPrefix(body, "1 error occurred:") || !strings.Contains(body, "Missing tasks for task group") ||
			!strings.Contains(body, `Unsupported restart mode: "sometimes"`) {
			t.Errorf("invalid job: %d %q", code, body)
		}
		spaced := testJob("a b", "n")
		_, _, err = cl.Jobs().Register(spaced, nil)
		if _, body := statusOf(t, err); !strings.Contains(body, "Job ID contains a space") {
			t.Errorf("spaced id: %q", body)
		}
	})
	t.Run("namespace and region", func(t *testing.T) {
		_, cl := setup(t, "")
		_, _, err := cl.Jobs().Register(testJob("x", "n"), &nomad.WriteOptions{Namespace: "nope"})
		if code, body := statusOf(t, err); code != 500 || !strings.Contains(body, `job "x" is in nonexistent namespace "nope"`) {
			t.Errorf("unknown namespace: %d %q", code, body)
		}
		_, _, err = cl.Jobs().Info("x", &nomad.QueryOptions{Region: "mars"})
		if code, body := statusOf(t, err); code != 500 || body != "No path to region" {
			t.Errorf("unknown region: %d %q", code, body)
		}
	})
	t.Run("faults and bad requests", func(t *testing.T) {
		sim, cl := setup(t, "")
		sim.InjectFault(nomadsim.Fault{Method: http.MethodPut, Path: "/v1/jobs", Status: 500, Body: "No cluster leader"})
		_, _, err := cl.Jobs().Register(testJob("x", "n"), nil)
		if code, body := statusOf(t, err); code != 500 || body != "No cluster leader" {
			t.Errorf("fault: %d %q", code, body)
		}
		if _, _, err := cl.Jobs().Register(testJob("x", "n"), nil); err != nil {
			t.Errorf("after the fault: %v", err)
		}
		resp, err := http.Post(sim2URL(t, sim), "application/json", strings.NewReader(`{}`))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 400 {
			t.Errorf("register without a job: %d", resp.StatusCode)
		}
		calls := sim.Calls()
		if len(calls) < 3 || calls[0].Status != 500 || calls[1].Status != 200 {
			t.Errorf("calls %+v", calls)
		}
	})
}

// sim2URL serves sim once more and returns its /v1/jobs URL.
func sim2URL(t *testing.T, sim *nomadsim.Server) string {
	srv := httptest.NewServer(sim)
	t.Cleanup(srv.Close)
	return srv.URL + "/v1/jobs"
}
