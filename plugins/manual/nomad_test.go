package manual_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"slices"
	"strings"
	"testing"
	"time"

	nomad "github.com/hashicorp/nomad/api"

	"github.com/gpuaas/gpuaas/plugins/manual/nomadsim"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
)

// testCA returns a self-signed CA certificate in PEM.
func testCA(t testing.TB) string {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "gpuaas agent CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
}

// TestAgentJob: Enroll registers a Nomad service job that runs the agent
// on exactly the node, with its enrollment secret; a retry leaves it as it
// is, another enrollment updates it.
func TestAgentJob(t *testing.T) {
	h := setup(t)
	ca := testCA(t)
	d := h.driver(t, map[string]any{"agent_ca_pem": "operator's CA\n" + ca, "agent_command": "/opt/gpuaas/bin/gpuaas-agent"})
	ctx := testCtx(t)
	node := h.nodes[0]
	op := opID(t, "enroll")
	enr, err := d.Enroll(ctx, &provisioner.EnrollRequest{OperationID: op, NodeID: node})
	if err != nil {
		t.Fatalf("Enroll: %v", err)
	}
	cl := h.nomadClient(t)
	job, _, err := cl.Jobs().Info("gpuaas-agent-"+node, nil)
	if err != nil {
		t.Fatalf("the agent job: %v", err)
	}
	if *job.Type != "service" || *job.Namespace != h.nomadNamespace || !slices.Equal(job.Datacenters, h.nomadDatacenters) {
		t.Errorf("job %s in %s, datacenters %v", *job.Type, *job.Namespace, job.Datacenters)
	}
	if len(job.Constraints) != 1 || *job.Constraints[0] != (nomad.Constraint{LTarget: "${node.unique.name}", Operand: "=", RTarget: node}) {
		t.Errorf("constraints %+v", job.Constraints)
	}
	u := job.Update
	if u == nil || *u.MaxParallel != 1 || *u.HealthCheck != "task_states" || *u.MinHealthyTime <= 0 || *u.HealthyDeadline <= *u.MinHealthyTime {
		t.Errorf("update strategy %+v", u)
	}
	if len(job.TaskGroups) != 1 || len(job.TaskGroups[0].Tasks) != 1 {
		t.Fatalf("groups %+v", job.TaskGroups)
	}
	tg := job.TaskGroups[0]
	if rp := tg.RestartPolicy; rp == nil || *rp.Mode != "delay" || *rp.Attempts <= 0 || *rp.Delay <= 0 || *rp.Interval <= 0 {
		t.Errorf("restart policy %+v", tg.RestartPolicy)
	}
	task := tg.Tasks[0]
	if task.Driver != "raw_exec" || task.Config["command"] != "/opt/gpuaas/bin/gpuaas-agent" || task.Env["GPUAAS_ENROLL_TOKEN"] != enr.Secret {
		t.Errorf("task %s %v (token set: %t)", task.Driver, task.Config["command"], task.Env["GPUAAS_ENROLL_TOKEN"] == enr.Secret)
	}
	var args []string
	for _, a := range task.Config["args"].([]any) {
		args = append(args, a.(string))
	}
	want := []string{"-core", agentURL, "-state", "/var/lib/gpuaas-agent", "-core-ca", "${NOMAD_TASK_DIR}/core-ca.pem", "-scratch", "/scratch", "-scratch", "/tmp/gpuaas"}
	if !slices.Equal(args, want) {
		t.Errorf("args %q, want %q", args, want)
	}
	if len(task.Templates) != 1 || *task.Templates[0].EmbeddedTmpl != ca || *task.Templates[0].DestPath != "local/core-ca.pem" {
		t.Errorf("CA template %+v (the PEM without the text around it expected)", task.Templates)
	}

	// A retry is the same job: no new version.
	if _, err := d.Enroll(ctx, &provisioner.EnrollRequest{OperationID: op, NodeID: node}); err != nil {
		t.Fatal(err)
	}
	again, _, _ := cl.Jobs().Info("gpuaas-agent-"+node, nil)
	if *again.Version != *job.Version || *again.JobModifyIndex != *job.JobModifyIndex {
		t.Errorf("a retried Enroll changed the job: v%d -> v%d", *job.Version, *again.Version)
	}
	// Enrolling the node again (a new operation) updates the token.
	enr2, err := d.Enroll(ctx, &provisioner.EnrollRequest{OperationID: op + "-again", NodeID: node})
	if err != nil {
		t.Fatal(err)
	}
	updated, _, _ := cl.Jobs().Info("gpuaas-agent-"+node, nil)
	if *updated.Version != *job.Version+1 || updated.TaskGroups[0].Tasks[0].Env["GPUAAS_ENROLL_TOKEN"] != enr2.Secret {
		t.Errorf("re-enrollment: v%d, token updated %t", *updated.Version, updated.TaskGroups[0].Tasks[0].Env["GPUAAS_ENROLL_TOKEN"] == enr2.Secret)
	}
	if h.sim != nil {
		allocs := h.sim.Allocations("default", "gpuaas-agent-"+node)
		if len(allocs) != 2 || allocs[0].DesiredStatus != "stop" || allocs[1].NodeName != node {
			t.Errorf("allocations after the update: %+v", allocs)
		}
	}

	// Without agent_ca_pem the agent uses its system roots.
	plain := h.driver(t, nil)
	if _, err := plain.Enroll(ctx, &provisioner.EnrollRequest{OperationID: opID(t, "plain"), NodeID: h.nodes[1]}); err != nil {
		t.Fatal(err)
	}
	job, _, _ = cl.Jobs().Info("gpuaas-agent-"+h.nodes[1], nil)
	if task := job.TaskGroups[0].Tasks[0]; len(task.Templates) != 0 || slices.Contains(anyStrings(task.Config["args"]), "-core-ca") {
		t.Errorf("a CA without agent_ca_pem: %+v", task)
	}
}

func anyStrings(v any) []string {
	var out []string
	l, _ := v.([]any)
	for _, e := range l {
		s, _ := e.(string)
		out = append(out, s)
	}
	return out
}

// TestNomadErrors: Nomad's answers become SDK sentinels, and a token
// Nomad refuses is a configuration error.
func TestNomadErrors(t *testing.T) {
	h := setup(t)
	h.needSim(t)
	d := h.driver(t, nil)
	ctx := testCtx(t)
	for _, c := range []struct {
		name   string
		status int
		body   string
		want   error
	}{
		{"no leader", 500, "No cluster leader", base.ErrUnavailable},
		{"gateway", 502, "", base.ErrUnavailable},
		{"rate limited", 429, "rate limit exceeded", base.ErrUnavailable},
		{"validation", 500, "1 error occurred:\n\t* Task group agent validation failed: 1 error occurred:\n\t* Missing tasks for task group\n\n\n\n", base.ErrInvalidArgument},
		{"bad request", 400, "Job ID does not match name", base.ErrInvalidArgument},
		{"forbidden", 403, "Permission denied", base.ErrPermissionDenied},
		{"not found", 404, "", base.ErrNotFound},
	} {
		t.Run(c.name, func(t *testing.T) {
			h.sim.InjectFault(nomadsim.Fault{Method: "PUT", Path: "/v1/jobs", Status: c.status, Body: c.body})
			_, err := d.Enroll(ctx, &provisioner.EnrollRequest{OperationID: opID(t, "e"), NodeID: h.nodes[0]})
			if !errors.Is(err, c.want) {
				t.Fatalf("got %v, want %v", err, c.want)
			}
		})
	}
	t.Run("unknown namespace", func(t *testing.T) {
		other := h.driver(t, map[string]any{"nomad_namespace": "tenants"})
		_, err := other.Enroll(ctx, &provisioner.EnrollRequest{OperationID: opID(t, "e"), NodeID: h.nodes[0]})
		if !errors.Is(err, base.ErrInvalidArgument) || !strings.Contains(err.Error(), "nonexistent namespace") {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("unknown region", func(t *testing.T) {
		other := h.driver(t, map[string]any{"nomad_region": "mars"})
		_, err := other.Enroll(ctx, &provisioner.EnrollRequest{OperationID: opID(t, "e"), NodeID: h.nodes[0]})
		if !errors.Is(err, base.ErrUnavailable) || !strings.Contains(err.Error(), "No path to region") {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("unreachable", func(t *testing.T) {
		other := h.driver(t, map[string]any{"nomad_addr": "http://127.0.0.1:1"}) // a warning at Configure
		_, err := other.Enroll(ctx, &provisioner.EnrollRequest{OperationID: opID(t, "e"), NodeID: h.nodes[0]})
		if !errors.Is(err, base.ErrUnavailable) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("acl", func(t *testing.T) {
		acl := setup(t, withNomad(nomadsim.WithToken("9b2c6a8e-0d1f-4e3a-b5c7-d9e1f3a5b7c9")))
		for _, token := range []any{nil, "wrong-token"} {
			err := configure(t, newDriver(), acl.config(map[string]any{"nomad_token": token}))
			var ce *base.ConfigError
			if !errors.As(err, &ce) || ce.Field != "nomad_token" {
				t.Errorf("token %v: got %v, want a config error on nomad_token", token, err)
			}
		}
		acl.nomadToken = "9b2c6a8e-0d1f-4e3a-b5c7-d9e1f3a5b7c9"
		ok := acl.driver(t, nil)
		if _, err := ok.Enroll(ctx, &provisioner.EnrollRequest{OperationID: opID(t, "e"), NodeID: acl.nodes[0]}); err != nil {
			t.Fatalf("with the token: %v", err)
		}
		for _, c := range acl.sim.Calls() {
			if !c.Token && c.Status == 200 {
				t.Errorf("call %+v answered without the token", c)
			}
		}
	})
	t.Run("without nomad", func(t *testing.T) {
		plain := setup(t, withoutNomad)
		d := plain.driver(t, nil)
		if _, err := d.Enroll(ctx, &provisioner.EnrollRequest{OperationID: opID(t, "e"), NodeID: plain.nodes[0]}); err != nil {
			t.Fatal(err)
		}
		if calls := h.sim.Calls(); slices.ContainsFunc(calls, func(c nomadsim.Call) bool { return strings.Contains(c.Path, plain.nodes[0]) }) {
			t.Fatal("a driver without nomad_addr called Nomad")
		}
	})
}

// TestUnenroll: Unenroll stops and purges the agent job Enroll registered;
// a repeated call, and one for a node without a job, succeed; the job
// another driver instance registered for a host is left alone.
func TestUnenroll(t *testing.T) {
	h := setup(t)
	d := h.driver(t, nil)
	ctx := testCtx(t)
	cl := h.nomadClient(t)
	for _, n := range h.nodes {
		if _, err := d.Enroll(ctx, &provisioner.EnrollRequest{OperationID: opID(t, "enroll-"+n), NodeID: n}); err != nil {
			t.Fatalf("Enroll %s: %v", n, err)
		}
	}
	gone := func(node string) bool {
		t.Helper()
		_, _, err := cl.Jobs().Info("gpuaas-agent-"+node, nil)
		if err != nil && !strings.Contains(err.Error(), "404") {
			t.Fatalf("read the agent job of %s: %v", node, err)
		}
		return err != nil
	}
	if gone(h.nodes[0]) || gone(h.nodes[1]) {
		t.Fatal("Enroll registered no agent job")
	}

	req := &provisioner.UnenrollRequest{OperationID: opID(t, "unenroll"), NodeID: h.nodes[0]}
	if err := d.Unenroll(ctx, req); err != nil {
		t.Fatalf("Unenroll: %v", err)
	}
	if !gone(h.nodes[0]) {
		t.Fatal("the agent job is still registered after Unenroll")
	}
	if gone(h.nodes[1]) {
		t.Fatal("Unenroll of one node removed the job of another")
	}
	if h.sim != nil {
		for _, a := range h.sim.Allocations("default", "gpuaas-agent-"+h.nodes[0]) {
			if a.DesiredStatus != "stop" {
				t.Errorf("allocation %s of the purged job: desired %s; want stop", a.ID, a.DesiredStatus)
			}
		}
	}
	if err := d.Unenroll(ctx, req); err != nil {
		t.Fatalf("Unenroll retried: %v", err)
	}
	if err := d.Unenroll(ctx, &provisioner.UnenrollRequest{OperationID: opID(t, "unenroll-again"), NodeID: h.nodes[0]}); err != nil {
		t.Fatalf("Unenroll of a node already unenrolled: %v", err)
	}
	if err := d.Unenroll(ctx, &provisioner.UnenrollRequest{OperationID: opID(t, "unenroll-unknown"), NodeID: h.nodes[0] + "-x"}); err != nil {
		t.Fatalf("Unenroll of a node without a job: %v", err)
	}
	err := d.Unenroll(ctx, &provisioner.UnenrollRequest{OperationID: req.OperationID, NodeID: h.nodes[1]})
	if !errors.Is(err, base.ErrConflict) {
		t.Fatalf("Unenroll reusing an operation id for another node: %v; want base.ErrConflict", err)
	}

	// The host's job now belongs to another instance: this one leaves it.
	job, _, err := cl.Jobs().Info("gpuaas-agent-"+h.nodes[1], nil)
	if err != nil {
		t.Fatal(err)
	}
	job.Meta["gpuaas_instance"] = "manual-other"
	if _, _, err := cl.Jobs().Register(job, nil); err != nil {
		t.Fatal(err)
	}
	if err := d.Unenroll(ctx, &provisioner.UnenrollRequest{OperationID: opID(t, "unenroll-other"), NodeID: h.nodes[1]}); err != nil {
		t.Fatalf("Unenroll of a host whose job another instance registered: %v", err)
	}
	if gone(h.nodes[1]) {
		t.Fatal("Unenroll removed the job of another instance")
	}
}

// TestUnenrollErrors: Nomad's failures reach the core as SDK sentinels;
// without Nomad there is nothing to undo.
func TestUnenrollErrors(t *testing.T) {
	h := setup(t)
	ctx := testCtx(t)
	t.Run("unreachable", func(t *testing.T) {
		down := h.driver(t, map[string]any{"nomad_addr": "http://127.0.0.1:1"})
		err := down.Unenroll(ctx, &provisioner.UnenrollRequest{OperationID: opID(t, "u"), NodeID: h.nodes[0]})
		if !errors.Is(err, base.ErrUnavailable) {
			t.Fatalf("got %v, want base.ErrUnavailable", err)
		}
	})
	t.Run("without nomad", func(t *testing.T) {
		plain := setup(t, withoutNomad)
		d := plain.driver(t, nil)
		if err := d.Unenroll(ctx, &provisioner.UnenrollRequest{OperationID: opID(t, "u"), NodeID: plain.nodes[0]}); err != nil {
			t.Fatal(err)
		}
	})
	h.needSim(t)
	d := h.driver(t, nil)
	if _, err := d.Enroll(ctx, &provisioner.EnrollRequest{OperationID: opID(t, "e"), NodeID: h.nodes[0]}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name, method, path string
		status             int
		body               string
		want               error
	}{
		{"no leader on read", "GET", "/v1/job/", 500, "No cluster leader", base.ErrUnavailable},
		{"no leader on delete", "DELETE", "/v1/job/", 500, "No cluster leader", base.ErrUnavailable},
		{"forbidden", "DELETE", "/v1/job/", 403, "Permission denied", base.ErrPermissionDenied},
	} {
		t.Run(c.name, func(t *testing.T) {
			h.sim.InjectFault(nomadsim.Fault{Method: c.method, Path: c.path, Status: c.status, Body: c.body})
			err := d.Unenroll(ctx, &provisioner.UnenrollRequest{OperationID: opID(t, "u"), NodeID: h.nodes[0]})
			if !errors.Is(err, c.want) {
				t.Fatalf("got %v, want %v", err, c.want)
			}
			if _, ok := h.sim.Job("default", "gpuaas-agent-"+h.nodes[0]); !ok {
				t.Fatal("the job is gone although Nomad failed")
			}
		})
	}
	if err := d.Unenroll(ctx, &provisioner.UnenrollRequest{OperationID: opID(t, "u"), NodeID: h.nodes[0]}); err != nil {
		t.Fatalf("Unenroll once Nomad answers again: %v", err)
	}
	if _, ok := h.sim.Job("default", "gpuaas-agent-"+h.nodes[0]); ok {
		t.Fatal("the job is still registered")
	}
}
