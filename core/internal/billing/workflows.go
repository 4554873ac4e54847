package billing

import (
	"time"

	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/workflow"
)

// AccrualInput names nothing: the window ends at the workflow's start time, as
// recorded in its history, truncated to the second.
type AccrualInput struct{}

// AccrualOutput reports the accrual run.
type AccrualOutput struct {
	WindowEnd   time.Time
	Records     int
	DebitsMinor int64
}

// AccrualWorkflow bills usage up to the time it runs. A schedule starts it every
// billing window; the schedule lives in Temporal, so it runs once however many
// core instances there are, and survives restarts.
func AccrualWorkflow(ctx workflow.Context, _ AccrualInput) (AccrualOutput, error) {
	ctx = workflow.WithActivityOptions(ctx, workflow.ActivityOptions{
		StartToCloseTimeout: 2 * time.Minute,
		RetryPolicy:         &temporal.RetryPolicy{InitialInterval: time.Second, BackoffCoefficient: 2, MaximumInterval: 30 * time.Second, MaximumAttempts: 10},
	})
	in := AccrueInput{WindowEnd: workflow.Now(ctx).UTC().Truncate(time.Second)}
	var out AccrualOutput
	err := workflow.ExecuteActivity(ctx, (*Activities).Accrue, in).Get(ctx, &out)
	return out, err
}

// DepletionInput names a depletion: the org and when its balance hit zero.
type DepletionInput struct {
	OrgID         string
	DepletedSince time.Time
	Grace         time.Duration
}

// DepletionWorkflow waits out the grace period, then asks for the org's
// allocations to be released if it is still depleted. Its id is derived from the
// depletion, so a redelivered event starts nothing new.
func DepletionWorkflow(ctx workflow.Context, in DepletionInput) (bool, error) {
	if err := workflow.Sleep(ctx, in.Grace); err != nil {
		return false, err
	}
	ctx = workflow.WithActivityOptions(ctx, workflow.ActivityOptions{
		StartToCloseTimeout: time.Minute,
		RetryPolicy:         &temporal.RetryPolicy{InitialInterval: time.Second, BackoffCoefficient: 2, MaximumInterval: time.Minute},
	})
	var asked bool
	err := workflow.ExecuteActivity(ctx, (*Activities).RequestAutoRelease, in).Get(ctx, &asked)
	return asked, err
}
