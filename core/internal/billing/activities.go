package billing

import (
	"context"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/gpuaas/gpuaas/core/internal/policy"
	"github.com/gpuaas/gpuaas/core/internal/store"
)

// Activities holds the dependencies of the billing activities.
type Activities struct {
	Pool   *pgxpool.Pool
	Policy *policy.Service
}

// AccrueInput is one accrual window.
type AccrueInput struct{ WindowEnd time.Time }

// Accrue bills usage up to the window's end.
func (a *Activities) Accrue(ctx context.Context, in AccrueInput) (AccrualOutput, error) {
	res, err := Accrue(ctx, a.Pool, a.Policy, in.WindowEnd)
	if err != nil {
		return AccrualOutput{}, err
	}
	return AccrualOutput{WindowEnd: res.WindowEnd, Records: res.Records, DebitsMinor: res.DebitsMinor}, nil
}

// RequestAutoRelease asks for a depleted org's allocations to be released.
func (a *Activities) RequestAutoRelease(ctx context.Context, in DepletionInput) (bool, error) {
	org, err := uuid.Parse(in.OrgID)
	if err != nil {
		return false, fmt.Errorf("billing: auto-release: %w", err)
	}
	var asked bool
	err = store.Transact(ctx, a.Pool, store.TxOptions{}, func(tx pgx.Tx) error {
		var err error
		asked, err = RequestAutoRelease(ctx, tx, org, in.DepletedSince)
		return err
	})
	return asked, err
}
