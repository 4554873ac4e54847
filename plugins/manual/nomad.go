package manual

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"slices"
	"time"

	nomad "github.com/hashicorp/nomad/api"

	"github.com/gpuaas/gpuaas/sdk/base"
)

// When Nomad is configured, Enroll registers one service job per node that
// runs gpuaas-agent on exactly that node (raw_exec, pinned by the node's
// unique name), so an operator brings a host in by registering it in the
// core alone. The job carries the node's enrollment secret; the agent uses
// it once and then lives on its key and certificate in its state folder.
// Unenroll, when the core retires the node, stops and purges the job.

// Fixed parts of the agent job.
const (
	agentJobPrefix = "gpuaas-agent-"
	agentGroup     = "agent"
	agentTask      = "gpuaas-agent"
	agentStateDir  = "/var/lib/gpuaas-agent"
	agentCAFile    = "local/core-ca.pem"
	enrollTokenEnv = "GPUAAS_ENROLL_TOKEN"
)

// agentJobID is the Nomad job that runs the agent of nodeID.
func agentJobID(nodeID string) string { return agentJobPrefix + nodeID }

// nomadJobs registers and reads agent jobs in one Nomad namespace.
type nomadJobs struct {
	client      *nomad.Client
	namespace   string
	region      string
	datacenters []string
}

// agentJob is what an agent job runs.
type agentJob struct {
	instance    string
	nodeID      string
	secret      string
	agentURL    string
	agentCA     string // clean PEM, "" for the system roots
	command     string
	scratchDirs []string
}

// spec builds the Nomad job of one node's agent.
func (n *nomadJobs) spec(a *agentJob) *nomad.Job {
	id := agentJobID(a.nodeID)
	args := []string{"-core", a.agentURL, "-state", agentStateDir}
	task := &nomad.Task{
		Name:   agentTask,
		Driver: "raw_exec",
		Config: map[string]any{"command": a.command},
		Env:    map[string]string{enrollTokenEnv: a.secret},
		Resources: &nomad.Resources{
			CPU:      new(100),
			MemoryMB: new(128),
		},
		KillTimeout: new(30 * time.Second),
		LogConfig:   &nomad.LogConfig{MaxFiles: new(5), MaxFileSizeMB: new(10)},
	}
	if a.agentCA != "" {
		task.Templates = []*nomad.Template{{
			EmbeddedTmpl: new(a.agentCA),
			DestPath:     new(agentCAFile),
			ChangeMode:   new("restart"),
			Perms:        new("0644"),
		}}
		args = append(args, "-core-ca", "${NOMAD_TASK_DIR}/core-ca.pem")
	}
	for _, d := range a.scratchDirs {
		args = append(args, "-scratch", d)
	}
	task.Config["args"] = args

	job := &nomad.Job{
		ID:          new(id),
		Name:        new(id),
		Type:        new(nomad.JobTypeService),
		Namespace:   new(n.namespace),
		Datacenters: slices.Clone(n.datacenters),
		Priority:    new(70),
		Constraints: []*nomad.Constraint{{LTarget: "${node.unique.name}", Operand: "=", RTarget: a.nodeID}},
		Update: &nomad.UpdateStrategy{
			MaxParallel:      new(1),
			HealthCheck:      new("task_states"),
			MinHealthyTime:   new(10 * time.Second),
			HealthyDeadline:  new(3 * time.Minute),
			ProgressDeadline: new(10 * time.Minute),
			AutoRevert:       new(false),
		},
		Meta: map[string]string{"gpuaas_instance": a.instance, "gpuaas_node_id": a.nodeID},
		TaskGroups: []*nomad.TaskGroup{{
			Name:  new(agentGroup),
			Count: new(1),
			// The agent exits when it cannot enroll yet (the core stores the
			// secret's hash only after Enroll returns): keep restarting it,
			// slowly, rather than failing the allocation.
			RestartPolicy: &nomad.RestartPolicy{
				Attempts: new(10),
				Interval: new(30 * time.Minute),
				Delay:    new(15 * time.Second),
				Mode:     new("delay"),
			},
			// There is one node it may run on: no point rescheduling elsewhere.
			ReschedulePolicy: &nomad.ReschedulePolicy{
				Unlimited:     new(true),
				Delay:         new(30 * time.Second),
				DelayFunction: new("exponential"),
				MaxDelay:      new(10 * time.Minute),
			},
			Tasks: []*nomad.Task{task},
		}},
	}
	if n.region != "" {
		job.Region = new(n.region)
	}
	return job
}

// register registers (or updates) the agent job; Nomad leaves a job whose
// spec did not change as it is.
func (n *nomadJobs) register(ctx context.Context, a *agentJob) (*nomad.JobRegisterResponse, error) {
	what := "register Nomad job " + agentJobID(a.nodeID)
	resp, _, err := n.client.Jobs().Register(n.spec(a), n.write(ctx))
	if err != nil {
		return nil, mapNomadError(ctx, what, err)
	}
	return resp, nil
}

// deregister stops the agent job of nodeID and purges it, so Nomad stops
// the agent and forgets the job (and the enrollment secret it carried). A
// job Nomad does not have is gone already; a job another driver instance
// registered for the same host (Meta gpuaas_instance) is left alone. It
// reports whether it deregistered a job.
func (n *nomadJobs) deregister(ctx context.Context, instance, nodeID string) (bool, error) {
	id := agentJobID(nodeID)
	job, _, err := n.client.Jobs().Info(id, n.query(ctx))
	err = mapNomadError(ctx, "read Nomad job "+id, err)
	switch {
	case errors.Is(err, base.ErrNotFound):
		return false, nil
	case err != nil:
		return false, err
	case job.Meta["gpuaas_instance"] != instance:
		return false, nil
	}
	_, _, err = n.client.Jobs().Deregister(id, true, n.write(ctx))
	err = mapNomadError(ctx, "deregister Nomad job "+id, err)
	if errors.Is(err, base.ErrNotFound) { // purged in between
		return false, nil
	}
	return err == nil, err
}

// agentStatus describes the agent job of nodeID in a few words.
func (n *nomadJobs) agentStatus(ctx context.Context, nodeID string) (string, error) {
	id := agentJobID(nodeID)
	allocs, _, err := n.client.Jobs().Allocations(id, false, n.query(ctx))
	if err != nil {
		return "", mapNomadError(ctx, "read allocations of Nomad job "+id, err)
	}
	var latest *nomad.AllocationListStub
	for _, a := range allocs {
		if latest == nil || a.CreateIndex > latest.CreateIndex {
			latest = a
		}
	}
	if latest == nil {
		job, _, err := n.client.Jobs().Info(id, n.query(ctx))
		switch {
		case errors.Is(mapNomadError(ctx, "", err), base.ErrNotFound):
			return fmt.Sprintf("Nomad job %s is not registered", id), nil
		case err != nil:
			return "", mapNomadError(ctx, "read Nomad job "+id, err)
		}
		return fmt.Sprintf("Nomad job %s is %s with no allocation", id, deref(job.Status)), nil
	}
	msg := fmt.Sprintf("Nomad allocation %s of %s is %s", shortID(latest.ID), id, latest.ClientStatus)
	if latest.DesiredStatus != nomad.AllocDesiredStatusRun {
		msg += " (desired " + latest.DesiredStatus + ")"
	}
	if ts := latest.TaskStates[agentTask]; ts != nil && ts.Failed {
		if ev := lastEvent(ts); ev != "" {
			msg += ": " + ev
		}
	} else if latest.ClientDescription != "" && latest.ClientStatus != nomad.AllocClientStatusRunning {
		msg += ": " + latest.ClientDescription
	}
	return msg, nil
}

// lastEvent is the task's last failure event, else its last event, as
// "<type>: <message>".
func lastEvent(ts *nomad.TaskState) string {
	failures := []string{nomad.TaskDriverFailure, nomad.TaskSetupFailure, nomad.TaskFailedValidation,
		nomad.TaskArtifactDownloadFailed, nomad.TaskTerminated}
	last := ""
	for i := len(ts.Events) - 1; i >= 0; i-- {
		e := ts.Events[i]
		if e == nil || e.DisplayMessage == "" {
			continue
		}
		if slices.Contains(failures, e.Type) {
			return e.Type + ": " + e.DisplayMessage
		}
		if last == "" {
			last = e.Type + ": " + e.DisplayMessage
		}
	}
	return last
}

func deref(s *string) string {
	if s == nil {
		return "unknown"
	}
	return *s
}

func shortID(id string) string {
	if len(id) > 8 {
		return id[:8]
	}
	return id
}

func (n *nomadJobs) write(ctx context.Context) *nomad.WriteOptions {
	return (&nomad.WriteOptions{Namespace: n.namespace, Region: n.region}).WithContext(ctx)
}

func (n *nomadJobs) query(ctx context.Context) *nomad.QueryOptions {
	return (&nomad.QueryOptions{Namespace: n.namespace, Region: n.region}).WithContext(ctx)
}

// validationErrorRE matches the text of Nomad's job validation errors,
// which Nomad answers with 500 (a go-multierror list).
var validationErrorRE = regexp.MustCompile(`^\d+ errors? occurred:`)

// mapNomadError is the one place where Nomad's answers and network failures
// become SDK sentinels.
func mapNomadError(ctx context.Context, what string, err error) error {
	if err == nil {
		return nil
	}
	if ctxErr := ctx.Err(); ctxErr != nil {
		return fmt.Errorf("manual: %s: %w", what, ctxErr)
	}
	var ure nomad.UnexpectedResponseError
	if errors.As(err, &ure) && ure.HasStatusCode() {
		body := summarize([]byte(ure.Body()))
		code := ure.StatusCode()
		var sentinel error
		switch {
		case code == http.StatusBadRequest:
			sentinel = base.ErrInvalidArgument
		case code == http.StatusUnauthorized:
			sentinel = base.ErrUnauthenticated
		case code == http.StatusForbidden:
			sentinel = base.ErrPermissionDenied
		case code == http.StatusNotFound:
			sentinel = base.ErrNotFound
		case code == http.StatusConflict:
			sentinel = base.ErrConflict
		case code == http.StatusInternalServerError && validationErrorRE.MatchString(ure.Body()):
			sentinel = base.ErrInvalidArgument
		case code == http.StatusTooManyRequests, code >= 500:
			sentinel = base.ErrUnavailable
		default:
			sentinel = base.ErrInternal
		}
		return fmt.Errorf("manual: %s: Nomad answered %d: %s: %w", what, code, body, sentinel)
	}
	return transportError(what, "Nomad", "nomad_ca_pem", err)
}
