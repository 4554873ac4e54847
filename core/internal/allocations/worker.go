package allocations

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"
	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/api/serviceerror"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/worker"

	"github.com/gpuaas/gpuaas/core/internal/billing"
	"github.com/gpuaas/gpuaas/core/internal/events"
	"github.com/gpuaas/gpuaas/core/internal/policy"
	"github.com/gpuaas/gpuaas/core/internal/principal"
)

// TaskQueue is the Temporal task queue of the provisioning workflows under prefix.
func TaskQueue(prefix string) string { return prefix + "-provisioning" }

// Register adds the provisioning workflows and activities to a worker.
func Register(w worker.Registry, a *Activities) {
	w.RegisterWorkflow(ProvisionAllocation)
	w.RegisterWorkflow(ReleaseAllocation)
	w.RegisterWorkflow(CleanNode)
	w.RegisterActivity(a)
}

// Starter starts the workflows of allocations.
type Starter struct {
	Temporal client.Client
	Prefix   string
}

// start starts a workflow once: a running one, or one that already
// completed, makes the start a no-op. again allows a new run after any
// closed run (the reconciler's resume; the activities check state, so a
// rerun of finished work does nothing).
func (s *Starter) start(ctx context.Context, id string, again bool, wf any, in Input) error {
	reuse := enumspb.WORKFLOW_ID_REUSE_POLICY_ALLOW_DUPLICATE_FAILED_ONLY
	if again {
		reuse = enumspb.WORKFLOW_ID_REUSE_POLICY_ALLOW_DUPLICATE
	}
	_, err := s.Temporal.ExecuteWorkflow(ctx, client.StartWorkflowOptions{
		ID:                    id,
		TaskQueue:             TaskQueue(s.Prefix),
		WorkflowIDReusePolicy: reuse,
	}, wf, in)
	var started *serviceerror.WorkflowExecutionAlreadyStarted
	if errors.As(err, &started) {
		return nil
	}
	return err
}

// Provision starts the provisioning workflow of an allocation.
func (s *Starter) Provision(ctx context.Context, id uuid.UUID) error {
	return s.start(ctx, ProvisionWorkflowID(s.Prefix, id.String()), false, ProvisionAllocation, Input{AllocationID: id.String()})
}

// Release starts the workflow of a release attempt.
func (s *Starter) Release(ctx context.Context, id uuid.UUID, attempt int) error {
	return s.start(ctx, ReleaseWorkflowID(s.Prefix, id.String(), attempt), false, ReleaseAllocation,
		Input{AllocationID: id.String(), ReleaseAttempt: attempt})
}

func consumerSpec(durable string) events.ConsumerSpec {
	for _, c := range events.Consumers() {
		if c.Durable == durable {
			return c
		}
	}
	panic("allocations: consumer " + durable + " is not declared in api/asyncapi.yaml")
}

// FollowRequests consumes provisioning.allocation_requested and
// provisioning.release_requested and starts the matching workflow.
func FollowRequests(ctx context.Context, pool *pgxpool.Pool, js jetstream.JetStream, st *Starter, log hclog.Logger) error {
	return events.Consume(ctx, pool, js, consumerSpec("provisioning-workflows"), log, func(ctx context.Context, _ pgx.Tx, msg jetstream.Msg) error {
		var ev Event
		if err := json.Unmarshal(msg.Data(), &ev); err != nil || ev.AllocationID == uuid.Nil {
			return fmt.Errorf("%w: malformed allocation event", events.ErrPermanent)
		}
		switch msg.Subject() {
		case events.SubjectProvisioningAllocationRequested:
			return st.Provision(ctx, ev.AllocationID)
		case events.SubjectProvisioningReleaseRequested:
			return st.Release(ctx, ev.AllocationID, ev.ReleaseAttempt)
		}
		return nil
	})
}

// FollowAutoReleases consumes billing.auto_release_requested and releases
// every active allocation of the depleted org.
func FollowAutoReleases(ctx context.Context, pool *pgxpool.Pool, js jetstream.JetStream, svc *Service, log hclog.Logger) error {
	return events.Consume(ctx, pool, js, consumerSpec("allocations-auto-release"), log, func(ctx context.Context, tx pgx.Tx, msg jetstream.Msg) error {
		var ev billing.BalanceEvent
		if err := json.Unmarshal(msg.Data(), &ev); err != nil || ev.OrgID == uuid.Nil {
			return fmt.Errorf("%w: malformed auto-release event", events.ErrPermanent)
		}
		ctx = principal.With(ctx, principal.SystemPrincipal("billing"))
		n, err := svc.ReleaseOrg(ctx, tx, ev.OrgID, "balance depleted: the grace period ended without a top-up")
		if err == nil && n > 0 {
			log.Info("released the allocations of a depleted organization", "org", ev.OrgID, "count", n)
		}
		return err
	})
}

// Reconciler resumes allocations stranded in requested, provisioning or
// releasing without a running workflow (a lost event, a workflow that ended
// by a bug or an operator's terminate), and nodes left cleaning; and it
// corrects holdings that differ from the live allocations.
type Reconciler struct {
	Pool    *pgxpool.Pool
	Policy  *policy.Service
	Starter *Starter
	Log     hclog.Logger
}

// Run reconciles every reconcile interval until ctx ends.
func (r *Reconciler) Run(ctx context.Context) {
	for {
		every := policy.ReconcileInterval.Value(ctx, r.Policy, policy.Target{})
		select {
		case <-ctx.Done():
			return
		case <-time.After(every):
		}
		if n, err := r.Once(ctx); err != nil {
			r.Log.Warn("reconciling allocations", "error", err)
		} else if n > 0 {
			r.Log.Info("resumed stranded allocations", "count", n)
		}
		if _, err := r.CorrectHoldings(ctx); err != nil {
			r.Log.Warn("correcting allocation holdings", "error", err)
		}
	}
}

// Once looks for stranded work once and resumes it, returning how many
// workflows it started.
func (r *Reconciler) Once(ctx context.Context) (int, error) {
	after := policy.StrandedAfter.Value(ctx, r.Policy, policy.Target{})
	rows, err := r.Pool.Query(ctx, `
		SELECT a.id, a.state, a.release_attempt FROM allocations a
		WHERE a.state IN ('requested', 'provisioning', 'releasing') AND a.updated_at < now() - $1::interval
		UNION ALL
		SELECT a.id, 'cleaning', 0 FROM nodes n
		JOIN LATERAL (SELECT id FROM allocations WHERE node_id = n.id AND state = 'failed' ORDER BY id DESC LIMIT 1) a ON true
		WHERE n.state = 'cleaning' AND n.updated_at < now() - $1::interval
		LIMIT 1000`, after)
	if err != nil {
		return 0, fmt.Errorf("allocations: reconcile: %w", err)
	}
	type stranded struct {
		id      uuid.UUID
		state   string
		attempt int
	}
	list, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (stranded, error) {
		var s stranded
		return s, row.Scan(&s.id, &s.state, &s.attempt)
	})
	if err != nil {
		return 0, fmt.Errorf("allocations: reconcile: %w", err)
	}
	started := 0
	for _, s := range list {
		var id string
		var wf any
		in := Input{AllocationID: s.id.String()}
		switch s.state {
		case "releasing":
			id, wf, in.ReleaseAttempt = ReleaseWorkflowID(r.Starter.Prefix, s.id.String(), s.attempt), ReleaseAllocation, s.attempt
		case "cleaning":
			id, wf = CleanWorkflowID(r.Starter.Prefix, s.id.String()), CleanNode
		default:
			id, wf = ProvisionWorkflowID(r.Starter.Prefix, s.id.String()), ProvisionAllocation
		}
		running, err := r.running(ctx, id)
		if err == nil && !running && s.state == "cleaning" {
			// the provisioning workflow cleans its node itself while it runs
			running, err = r.running(ctx, ProvisionWorkflowID(r.Starter.Prefix, s.id.String()))
		}
		if err != nil {
			return started, err
		}
		if running {
			continue
		}
		r.Log.Warn("resuming a stranded allocation", "allocation", s.id, "state", s.state, "workflow", id)
		if err := r.Starter.start(ctx, id, true, wf, in); err != nil {
			return started, err
		}
		started++
	}
	return started, nil
}

func (r *Reconciler) running(ctx context.Context, workflowID string) (bool, error) {
	d, err := r.Starter.Temporal.DescribeWorkflowExecution(ctx, workflowID, "")
	var nf *serviceerror.NotFound
	if errors.As(err, &nf) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return d.GetWorkflowExecutionInfo().GetStatus() == enumspb.WORKFLOW_EXECUTION_STATUS_RUNNING, nil
}
