package billing

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"
	enumspb "go.temporal.io/api/enums/v1"
	"go.temporal.io/api/serviceerror"
	"go.temporal.io/sdk/client"
	"go.temporal.io/sdk/temporal"
	"go.temporal.io/sdk/worker"

	"github.com/gpuaas/gpuaas/core/internal/events"
)

// TaskQueue is the Temporal task queue of billing workflows under prefix.
func TaskQueue(prefix string) string { return prefix + "-billing" }

// ScheduleID is the id of the accrual schedule under prefix.
func ScheduleID(prefix string) string { return prefix + "-billing-accrual" }

// Register adds the billing workflows and activities to a worker.
func Register(w worker.Registry, a *Activities) {
	w.RegisterWorkflow(AccrualWorkflow)
	w.RegisterWorkflow(DepletionWorkflow)
	w.RegisterActivity(a)
}

// EnsureSchedule creates the accrual schedule, or updates its interval when the
// billing.window policy changed.
func EnsureSchedule(ctx context.Context, tc client.Client, prefix string, every time.Duration) error {
	sc := tc.ScheduleClient()
	_, err := sc.Create(ctx, client.ScheduleOptions{
		ID:   ScheduleID(prefix),
		Spec: client.ScheduleSpec{Intervals: []client.ScheduleIntervalSpec{{Every: every}}},
		Action: &client.ScheduleWorkflowAction{
			ID:        ScheduleID(prefix),
			Workflow:  AccrualWorkflow,
			Args:      []any{AccrualInput{}},
			TaskQueue: TaskQueue(prefix),
		},
		Overlap:       enumspb.SCHEDULE_OVERLAP_POLICY_SKIP,
		CatchupWindow: time.Minute,
	})
	if err == nil {
		return nil
	}
	if !errors.Is(err, temporal.ErrScheduleAlreadyRunning) {
		return fmt.Errorf("billing: create accrual schedule: %w", err)
	}
	h := sc.GetHandle(ctx, ScheduleID(prefix))
	err = h.Update(ctx, client.ScheduleUpdateOptions{DoUpdate: func(in client.ScheduleUpdateInput) (*client.ScheduleUpdate, error) {
		s := in.Description.Schedule
		if len(s.Spec.Intervals) == 1 && s.Spec.Intervals[0].Every == every {
			return nil, temporal.ErrSkipScheduleUpdate // unchanged
		}
		s.Spec = &client.ScheduleSpec{Intervals: []client.ScheduleIntervalSpec{{Every: every}}}
		return &client.ScheduleUpdate{Schedule: &s}, nil
	}})
	if err != nil {
		return fmt.Errorf("billing: update accrual schedule: %w", err)
	}
	return nil
}

// FollowDepletions consumes billing.balance_depleted (durable, idempotent through
// the inbox) and starts the grace-period workflow of each depletion.
func FollowDepletions(ctx context.Context, pool *pgxpool.Pool, js jetstream.JetStream, tc client.Client, prefix string, log hclog.Logger) error {
	spec := consumerSpec("billing-depletion")
	return events.Consume(ctx, pool, js, spec, log, func(ctx context.Context, _ pgx.Tx, msg jetstream.Msg) error {
		var ev BalanceEvent
		if err := json.Unmarshal(msg.Data(), &ev); err != nil || ev.DepletedSince == nil {
			return fmt.Errorf("%w: malformed depletion event", events.ErrPermanent)
		}
		in := DepletionInput{OrgID: ev.OrgID.String(), DepletedSince: *ev.DepletedSince, Grace: time.Duration(ev.GraceSeconds) * time.Second}
		_, err := tc.ExecuteWorkflow(ctx, client.StartWorkflowOptions{
			ID:                    fmt.Sprintf("%s-depletion-%s-%d", prefix, ev.OrgID, ev.DepletedSince.UnixMicro()),
			TaskQueue:             TaskQueue(prefix),
			WorkflowIDReusePolicy: enumspb.WORKFLOW_ID_REUSE_POLICY_REJECT_DUPLICATE,
		}, DepletionWorkflow, in)
		var started *serviceerror.WorkflowExecutionAlreadyStarted
		if errors.As(err, &started) {
			return nil
		}
		return err
	})
}

func consumerSpec(durable string) events.ConsumerSpec {
	for _, c := range events.Consumers() {
		if c.Durable == durable {
			return c
		}
	}
	panic("billing: consumer " + durable + " is not declared in api/asyncapi.yaml")
}
