package allocations

import (
	"errors"
	"fmt"
	"time"

	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/workflow"
)

// Error types of activity failures that retrying cannot fix.
const (
	errRejected = "DriverRejected"
	errGone     = "AllocationGone"
)

// ProvisionWorkflowID is the provisioning workflow of an allocation: one per
// allocation, so a duplicate start has no effect.
func ProvisionWorkflowID(prefix, allocationID string) string {
	return prefix + "-provision-" + allocationID
}

// ReleaseWorkflowID is the workflow of one release attempt of an allocation.
func ReleaseWorkflowID(prefix, allocationID string, attempt int) string {
	return fmt.Sprintf("%s-release-%s-%d", prefix, allocationID, attempt)
}

// CleanWorkflowID is the workflow that cleans the node of an allocation whose
// provisioning failed.
func CleanWorkflowID(prefix, allocationID string) string { return prefix + "-clean-" + allocationID }

// Input names the allocation a workflow works on.
type Input struct {
	AllocationID string
	// ReleaseAttempt is the release attempt a release workflow carries out.
	ReleaseAttempt int
}

// Plan is what an activity that begins a phase found: whether there is work,
// and the policy that governs it, read once so the workflow stays deterministic.
type Plan struct {
	// Skip: the allocation is no longer in the state this workflow handles
	// (someone else finished it); the workflow ends with State.
	Skip  bool
	State State

	AllocationID string
	Instance     string
	OperationID  string
	Timeout      time.Duration
	Heartbeat    time.Duration
	PollInterval time.Duration
	MaxAttempts  int
}

// Outcome is how a driver operation ended.
type Outcome struct {
	Succeeded bool
	Message   string
}

// db runs a short database step as a local activity (in the workflow's
// worker, no round trip through the Temporal server), retried until it
// succeeds (the database may be away for a while), each try bounded.
func db(ctx workflow.Context, fn any, args ...any) workflow.Future {
	ctx = workflow.WithLocalActivityOptions(ctx, workflow.LocalActivityOptions{
		StartToCloseTimeout: 30 * time.Second,
		RetryPolicy: &temporal.RetryPolicy{InitialInterval: 200 * time.Millisecond, BackoffCoefficient: 2, MaximumInterval: 10 * time.Second,
			NonRetryableErrorTypes: []string{errGone}},
	})
	return workflow.ExecuteLocalActivity(ctx, fn, args...)
}

// startOperation runs the driver call that starts an operation, as a local
// activity: transient failures are retried up to the policy's attempts with
// the same operation id, so a retry (or a rerun after a worker died) is the
// same operation.
func startOperation(ctx workflow.Context, p Plan, fn any) workflow.Future {
	ctx = workflow.WithLocalActivityOptions(ctx, workflow.LocalActivityOptions{
		StartToCloseTimeout: 2 * time.Minute,
		RetryPolicy: &temporal.RetryPolicy{InitialInterval: 500 * time.Millisecond, BackoffCoefficient: 2, MaximumInterval: 30 * time.Second,
			MaximumAttempts: int32(p.MaxAttempts), NonRetryableErrorTypes: []string{errRejected}},
	})
	return workflow.ExecuteLocalActivity(ctx, fn, p)
}

// awaitOptions follow an operation until it ends, within the policy's timeout;
// a worker that dies is replaced after the heartbeat timeout.
func awaitOptions(ctx workflow.Context, p Plan) workflow.Context {
	return workflow.WithActivityOptions(ctx, workflow.ActivityOptions{
		ScheduleToCloseTimeout: p.Timeout,
		StartToCloseTimeout:    p.Timeout,
		HeartbeatTimeout:       p.Heartbeat,
		RetryPolicy: &temporal.RetryPolicy{InitialInterval: time.Second, BackoffCoefficient: 2, MaximumInterval: 30 * time.Second,
			NonRetryableErrorTypes: []string{errRejected}},
	})
}

// runOperation starts a driver operation and follows it to its end. A driver
// that refuses, fails or does not finish in time gives a failed Outcome.
func runOperation(ctx workflow.Context, p Plan, start any) Outcome {
	var a *Activities
	if err := startOperation(ctx, p, start).Get(ctx, nil); err != nil {
		return Outcome{Message: failureMessage(err)}
	}
	var out Outcome
	if err := workflow.ExecuteActivity(awaitOptions(ctx, p), a.AwaitOperation, p).Get(ctx, &out); err != nil {
		return Outcome{Message: failureMessage(err)}
	}
	return out
}

// failureMessage is the root cause of an activity failure, for a reason shown
// to the tenant and the admin.
func failureMessage(err error) string {
	var timeout *temporal.TimeoutError
	if errors.As(err, &timeout) {
		return "timed out (" + timeout.TimeoutType().String() + ")"
	}
	var app *temporal.ApplicationError
	if errors.As(err, &app) {
		return app.Message()
	}
	return err.Error()
}

// ProvisionAllocation hands an allocation's node to the tenant: requested →
// provisioning, the driver's Provision (operation id = allocation id) followed
// through Status, then active with metering started. When the driver fails the
// allocation becomes failed, nothing is charged, and the node is cleaned and
// returned to the pool.
func ProvisionAllocation(ctx workflow.Context, in Input) (State, error) {
	var a *Activities
	var p Plan
	if err := db(ctx, a.BeginProvisioning, in).Get(ctx, &p); err != nil {
		return "", err
	}
	if p.Skip {
		return p.State, nil
	}
	out := runOperation(ctx, p, a.StartProvision)
	if out.Succeeded {
		var st State
		err := db(ctx, a.Activate, in).Get(ctx, &st)
		return st, err
	}
	if err := db(ctx, a.FailProvisioning, in, out.Message).Get(ctx, nil); err != nil {
		return "", err
	}
	return Failed, cleanNode(ctx, in)
}

// CleanNode cleans the node of an allocation whose provisioning failed and
// returns it to the pool; a node that cannot be cleaned goes offline with the
// reason. The reconciler runs it again for a node left cleaning.
func CleanNode(ctx workflow.Context, in Input) error { return cleanNode(ctx, in) }

func cleanNode(ctx workflow.Context, in Input) error {
	var a *Activities
	var p Plan
	if err := db(ctx, a.BeginCleaning, in).Get(ctx, &p); err != nil {
		return err
	}
	if p.Skip {
		return nil
	}
	out := runOperation(ctx, p, a.StartRelease)
	return db(ctx, a.NodeCleaned, in, out).Get(ctx, nil)
}

// ReleaseAllocation carries out one release attempt: the driver's Release
// (operation id = allocation id + attempt) followed through Status, then
// released, or release_failed with the driver's reason. Metering stops either
// way; the node returns to the pool only after a release that succeeded.
func ReleaseAllocation(ctx workflow.Context, in Input) (State, error) {
	var a *Activities
	var p Plan
	if err := db(ctx, a.BeginRelease, in).Get(ctx, &p); err != nil {
		return "", err
	}
	if p.Skip {
		return p.State, nil
	}
	out := runOperation(ctx, p, a.StartRelease)
	var st State
	err := db(ctx, a.FinishRelease, in, out).Get(ctx, &st)
	return st, err
}
