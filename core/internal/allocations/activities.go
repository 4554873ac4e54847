package allocations

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.temporal.io/sdk/activity"
	"go.temporal.io/sdk/temporal"

	"github.com/gpuaas/gpuaas/core/internal/audit"
	"github.com/gpuaas/gpuaas/core/internal/billing"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/events"
	"github.com/gpuaas/gpuaas/core/internal/inventory"
	"github.com/gpuaas/gpuaas/core/internal/policy"
	"github.com/gpuaas/gpuaas/core/internal/principal"
	"github.com/gpuaas/gpuaas/core/internal/store"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
)

// TenantUID is the uid of the tenant account on a node.
const TenantUID = 2000

// Activities holds what the provisioning activities need.
type Activities struct {
	Pool    *pgxpool.Pool
	Policy  *policy.Service
	Drivers inventory.Provisioners
	Service *Service
	Log     hclog.Logger
	Metrics *Metrics // optional
	// SSHUserCAKeys, when set, are the CA keys the node's sshd is to trust
	// for the tenant (the browser terminal), handed to the driver.
	SSHUserCAKeys func(context.Context) ([]string, error)
}

// sys is the context of an activity's writes: the platform acting.
func sys(ctx context.Context) context.Context {
	return principal.With(ctx, principal.SystemPrincipal("provisioning"))
}

func (a *Activities) plan(ctx context.Context, al *Allocation, opID string, timeout policy.Key[time.Duration]) Plan {
	t := policy.Target{OrgID: al.OrgID.String(), ProjectID: al.ProjectID.String()}
	return Plan{
		AllocationID: al.ID.String(),
		Instance:     al.NodeInstance,
		OperationID:  opID,
		Timeout:      timeout.Value(ctx, a.Policy, policy.Target{}),
		Heartbeat:    policy.ProvisionHeartbeat.Value(ctx, a.Policy, policy.Target{}),
		PollInterval: policy.ProvisionPollInterval.Value(ctx, a.Policy, t),
		MaxAttempts:  int(policy.ProvisionMaxAttempts.Value(ctx, a.Policy, policy.Target{})),
	}
}

func parseID(in Input) (uuid.UUID, error) {
	id, err := uuid.Parse(in.AllocationID)
	if err != nil {
		return id, temporal.NewNonRetryableApplicationError("bad allocation id", errGone, err)
	}
	return id, nil
}

// transact runs fn in a transaction as the platform; an allocation that no
// longer exists ends the workflow instead of being retried.
func (a *Activities) transact(ctx context.Context, fn func(ctx context.Context, tx pgx.Tx) error) error {
	ctx = sys(ctx)
	err := store.Transact(ctx, a.Pool, store.TxOptions{}, func(tx pgx.Tx) error { return fn(ctx, tx) })
	if errcode.Of(err) == CodeNotFound {
		return temporal.NewNonRetryableApplicationError(err.Error(), errGone, err)
	}
	return err
}

// BeginProvisioning moves a requested allocation to provisioning and returns
// the plan; an allocation already past provisioning is skipped.
func (a *Activities) BeginProvisioning(ctx context.Context, in Input) (Plan, error) {
	id, err := parseID(in)
	if err != nil {
		return Plan{}, err
	}
	var p Plan
	err = a.transact(ctx, func(ctx context.Context, tx pgx.Tx) error {
		al, err := lock(ctx, tx, id)
		if err != nil {
			return err
		}
		switch al.State {
		case Requested:
			if err := move(ctx, tx, al, Provisioning, "", ""); err != nil {
				return err
			}
		case Provisioning:
		default:
			p = Plan{Skip: true, State: al.State}
			return nil
		}
		p = a.plan(ctx, al, "provision-"+al.ID.String(), policy.ProvisionTimeout)
		return nil
	})
	return p, err
}

// driverCallError makes a driver refusal final and leaves the rest to retries.
func driverCallError(op string, err error) error {
	if errcode.Of(inventory.DriverError(op, err)) == inventory.CodeProvisionerRejected && !errors.Is(err, base.ErrUnavailable) {
		return temporal.NewNonRetryableApplicationError(fmt.Sprintf("the provisioner refused %s: %v", op, err), errRejected, err)
	}
	return err
}

func (a *Activities) driver(ctx context.Context, instance string) (provisioner.Driver, error) {
	d, err := a.Drivers.Provisioner(ctx, instance)
	if err != nil {
		if c := errcode.Of(err); c == "plugin_instance_not_found" || c == "plugin_kind_mismatch" {
			return nil, temporal.NewNonRetryableApplicationError(err.Error(), errRejected, err)
		}
		return nil, err
	}
	return d, nil
}

// StartProvision asks the driver to hand the node to the tenant user. The
// operation id makes a retried call one operation.
func (a *Activities) StartProvision(ctx context.Context, p Plan) error {
	al, err := a.Service.Get(ctx, uuid.MustParse(p.AllocationID))
	if err != nil {
		return err
	}
	drv, err := a.driver(ctx, p.Instance)
	if err != nil {
		return err
	}
	var caKeys []string
	if a.SSHUserCAKeys != nil {
		if caKeys, err = a.SSHUserCAKeys(ctx); err != nil {
			return err
		}
	}
	_, err = drv.Provision(ctx, &provisioner.ProvisionRequest{
		OperationID:  p.OperationID,
		NodeID:       al.NodeExternalID,
		AllocationID: al.ID.String(),
		User: provisioner.TenantUser{Username: al.Username, UID: TenantUID,
			OrgID: al.OrgID.String(), ProjectID: al.ProjectID.String()},
		SSHPublicKeys: al.SSHPublicKeys,
		Image:         al.Image,
		SSHUserCAKeys: caKeys,
	})
	if err != nil {
		return driverCallError("provision", err)
	}
	return nil
}

// releaseMode picks how a node is cleaned: wipe, else reimage, else revoke.
func releaseMode(caps *provisioner.Capabilities) provisioner.ReleaseMode {
	for _, m := range []provisioner.ReleaseMode{provisioner.ReleaseWipe, provisioner.ReleaseReimage, provisioner.ReleaseRevoke} {
		if slices.Contains(caps.ReleaseModes, m) {
			return m
		}
	}
	if len(caps.ReleaseModes) > 0 {
		return caps.ReleaseModes[0]
	}
	return provisioner.ReleaseWipe
}

// StartRelease asks the driver to take the node back from the tenant user and
// clean it.
func (a *Activities) StartRelease(ctx context.Context, p Plan) error {
	al, err := a.Service.Get(ctx, uuid.MustParse(p.AllocationID))
	if err != nil {
		return err
	}
	drv, err := a.driver(ctx, p.Instance)
	if err != nil {
		return err
	}
	caps, err := drv.Capabilities(ctx)
	if err != nil {
		return driverCallError("capabilities", err)
	}
	_, err = drv.Release(ctx, &provisioner.ReleaseRequest{OperationID: p.OperationID, NodeID: al.NodeExternalID,
		AllocationID: al.ID.String(), Username: al.Username, Mode: releaseMode(caps)})
	if err != nil {
		return driverCallError("release", err)
	}
	return nil
}

// AwaitOperation follows a driver operation until it ends, checking fast at
// first and then every poll interval, heartbeating so a dead worker is
// noticed. Transient errors of Status are waited out (the timeout bounds them).
func (a *Activities) AwaitOperation(ctx context.Context, p Plan) (Outcome, error) {
	drv, err := a.driver(ctx, p.Instance)
	if err != nil {
		return Outcome{}, err
	}
	pause := 25 * time.Millisecond
	for {
		op, err := drv.Status(ctx, p.OperationID)
		switch {
		case err == nil && op.State == provisioner.StateSucceeded:
			return Outcome{Succeeded: true, Message: op.Message}, nil
		case err == nil && op.State == provisioner.StateFailed:
			msg := op.Message
			if msg == "" {
				msg = "the provisioner reported failure"
			}
			return Outcome{Message: msg}, nil
		case errors.Is(err, base.ErrNotFound):
			return Outcome{Message: "the provisioner does not know operation " + p.OperationID}, nil
		case err != nil:
			a.Log.Warn("operation status", "operation", p.OperationID, "error", err)
			activity.RecordHeartbeat(ctx, "status error: "+err.Error())
		default:
			activity.RecordHeartbeat(ctx, strconv.Itoa(op.Percent))
		}
		select {
		case <-ctx.Done():
			return Outcome{}, ctx.Err()
		case <-time.After(pause):
		}
		pause = min(pause*2, p.PollInterval)
	}
}

// Activate makes a provisioning allocation active and starts metering it.
func (a *Activities) Activate(ctx context.Context, in Input) (State, error) {
	id, err := parseID(in)
	if err != nil {
		return "", err
	}
	var st State
	var done *Allocation
	err = a.transact(ctx, func(ctx context.Context, tx pgx.Tx) error {
		done = nil
		al, err := lock(ctx, tx, id)
		if err != nil {
			return err
		}
		if st = al.State; al.State != Provisioning {
			return nil
		}
		if err := move(ctx, tx, al, Active, "", events.SubjectProvisioningAllocationActive); err != nil {
			return err
		}
		st, done = Active, al
		if _, err := billing.OpenUsage(ctx, tx, billing.Usage{OrgID: al.OrgID, ProjectID: al.ProjectID, AllocationID: al.ID, SKU: al.SKU,
			GPUs: al.GPUs, PricePerGPUHourMinor: al.PricePerGPUHourMinor, Currency: al.Currency, StartedAt: *al.ActiveAt}); err != nil {
			return err
		}
		return audit.Record(ctx, tx, audit.Entry{Action: "allocation.active", Target: a.Service.Target(al),
			Details: map[string]any{"node_id": al.NodeID.String()}})
	})
	if err == nil && done != nil {
		a.Metrics.provisioned(done, Active)
	}
	return st, err
}

// FailProvisioning makes a provisioning allocation failed (nothing was
// metered) and sends its node to cleaning.
func (a *Activities) FailProvisioning(ctx context.Context, in Input, reason string) error {
	id, err := parseID(in)
	if err != nil {
		return err
	}
	var done *Allocation
	err = a.transact(ctx, func(ctx context.Context, tx pgx.Tx) error {
		done = nil
		al, err := lock(ctx, tx, id)
		if err != nil {
			return err
		}
		if al.State != Provisioning && al.State != Requested {
			return nil
		}
		done = al
		if al.State == Requested {
			if err := move(ctx, tx, al, Provisioning, "", ""); err != nil {
				return err
			}
		}
		if err := move(ctx, tx, al, Failed, reason, events.SubjectProvisioningAllocationFailed); err != nil {
			return err
		}
		n, err := inventory.Lock(ctx, tx, al.NodeID)
		if err != nil {
			return err
		}
		if n.State == inventory.Allocated {
			if err := inventory.Move(ctx, tx, n, inventory.Cleaning, "provisioning of allocation "+al.ID.String()+" failed"); err != nil {
				return err
			}
		}
		return audit.Record(ctx, tx, audit.Entry{Action: "allocation.failed", Target: a.Service.Target(al),
			Details: map[string]any{"reason": truncate(reason), "node_id": al.NodeID.String()}})
	})
	if err == nil && done != nil {
		a.Metrics.provisioned(done, Failed)
	}
	return err
}

// BeginCleaning plans the cleaning of a failed allocation's node; a node no
// longer cleaning is skipped.
func (a *Activities) BeginCleaning(ctx context.Context, in Input) (Plan, error) {
	id, err := parseID(in)
	if err != nil {
		return Plan{}, err
	}
	al, err := a.Service.Get(ctx, id)
	if errcode.Of(err) == CodeNotFound {
		return Plan{}, temporal.NewNonRetryableApplicationError(err.Error(), errGone, err)
	}
	if err != nil {
		return Plan{}, err
	}
	var state inventory.State
	if err := a.Pool.QueryRow(ctx, `SELECT state FROM nodes WHERE id = $1`, al.NodeID).Scan(&state); err != nil {
		return Plan{}, err
	}
	if al.State != Failed || state != inventory.Cleaning {
		return Plan{Skip: true, State: al.State}, nil
	}
	return a.plan(ctx, al, "clean-"+al.ID.String(), policy.ReleaseTimeout), nil
}

// NodeCleaned returns a cleaned node to the pool, or takes it offline with the
// reason its cleaning failed.
func (a *Activities) NodeCleaned(ctx context.Context, in Input, out Outcome) error {
	id, err := parseID(in)
	if err != nil {
		return err
	}
	al, err := a.Service.Get(ctx, id)
	if err != nil {
		return err
	}
	return a.transact(ctx, func(ctx context.Context, tx pgx.Tx) error {
		n, err := inventory.Lock(ctx, tx, al.NodeID)
		if err != nil || n.State != inventory.Cleaning {
			return err
		}
		if out.Succeeded {
			return inventory.Move(ctx, tx, n, inventory.Available, "cleaned after allocation "+al.ID.String())
		}
		if err := inventory.Move(ctx, tx, n, inventory.Offline, "cleaning failed: "+out.Message); err != nil {
			return err
		}
		return audit.Record(ctx, tx, audit.Entry{Action: "node.clean_failed", Target: a.Service.ids.Platform("node", n.ID.String()),
			Details: map[string]any{"reason": truncate(out.Message), "allocation_id": al.ID.String()}})
	})
}

// BeginRelease plans a release attempt; a stale attempt is skipped.
func (a *Activities) BeginRelease(ctx context.Context, in Input) (Plan, error) {
	id, err := parseID(in)
	if err != nil {
		return Plan{}, err
	}
	al, err := a.Service.Get(ctx, id)
	if errcode.Of(err) == CodeNotFound {
		return Plan{}, temporal.NewNonRetryableApplicationError(err.Error(), errGone, err)
	}
	if err != nil {
		return Plan{}, err
	}
	if al.State != Releasing || al.ReleaseAttempt != in.ReleaseAttempt {
		return Plan{Skip: true, State: al.State}, nil
	}
	return a.plan(ctx, al, fmt.Sprintf("release-%s-%d", al.ID, in.ReleaseAttempt), policy.ReleaseTimeout), nil
}

// FinishRelease ends a release attempt: released (metering stopped, node back
// in the pool) or release_failed with the reason (metering stopped, node held
// until a later attempt succeeds).
func (a *Activities) FinishRelease(ctx context.Context, in Input, out Outcome) (State, error) {
	id, err := parseID(in)
	if err != nil {
		return "", err
	}
	var st State
	var done *Allocation
	err = a.transact(ctx, func(ctx context.Context, tx pgx.Tx) error {
		done = nil
		al, err := lock(ctx, tx, id)
		if err != nil {
			return err
		}
		if st = al.State; al.State != Releasing || al.ReleaseAttempt != in.ReleaseAttempt {
			return nil
		}
		if out.Succeeded {
			if err := move(ctx, tx, al, Released, "", events.SubjectProvisioningAllocationReleased); err != nil {
				return err
			}
			n, err := inventory.Lock(ctx, tx, al.NodeID)
			if err != nil {
				return err
			}
			if n.State == inventory.Allocated {
				if err := inventory.Move(ctx, tx, n, inventory.Available, "released by allocation "+al.ID.String()); err != nil {
					return err
				}
			}
		} else if err := move(ctx, tx, al, ReleaseFailed, out.Message, events.SubjectProvisioningReleaseFailed); err != nil {
			return err
		}
		st, done = al.State, al
		if err := billing.CloseUsage(ctx, tx, al.ID, time.Now()); err != nil && errcode.Of(err) != billing.CodeUsageNotFound {
			return err
		}
		return audit.Record(ctx, tx, audit.Entry{Action: "allocation." + string(al.State), Target: a.Service.Target(al),
			Details: map[string]any{"attempt": al.ReleaseAttempt, "reason": truncate(out.Message)}})
	})
	if err == nil && done != nil {
		a.Metrics.releaseEnded(done)
	}
	return st, err
}
