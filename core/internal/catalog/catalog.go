// Package catalog is the list of node shapes (SKUs) tenants can rent and their
// prices per GPU-hour in integer minor units.
package catalog

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/gpuaas/gpuaas/core/internal/audit"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/rid"
	"github.com/gpuaas/gpuaas/core/internal/store"
)

// Error codes.
const (
	CodeSKUNotFound errcode.Code = "sku_not_found"
	CodeSKUExists   errcode.Code = "sku_exists"
)

// Codes lists this package's codes for the contract test.
func Codes() []errcode.Code { return []errcode.Code{CodeSKUNotFound, CodeSKUExists} }

// SKU is a node shape.
type SKU struct {
	ID                   string
	GPUModel             string
	GPUsPerNode          int
	CPUCores             int
	MemoryGiB            int
	DiskGiB              int
	PricePerGPUHourMinor int64
	Currency             string
	Active               bool
	Description          string
	CreatedAt, UpdatedAt time.Time
}

var (
	idRE       = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{1,62}$`)
	currencyRE = regexp.MustCompile(`^[A-Z]{3}$`)
)

func invalid(field, format string, args ...any) error {
	return errcode.New(errcode.ValidationFailed, format, args...).WithDetails("field", field)
}

// Validate checks a SKU's fields, naming the first bad one.
func (s *SKU) Validate() error {
	switch {
	case !idRE.MatchString(s.ID):
		return invalid("id", "id must be 2-63 lowercase letters, digits or '-'")
	case s.GPUModel == "" || len(s.GPUModel) > 100:
		return invalid("gpu_model", "gpu_model must be 1-100 characters")
	case s.GPUsPerNode < 1 || s.GPUsPerNode > 64:
		return invalid("gpus_per_node", "gpus_per_node must be between 1 and 64")
	case s.CPUCores < 1 || s.CPUCores > 4096:
		return invalid("cpu_cores", "cpu_cores must be between 1 and 4096")
	case s.MemoryGiB < 1 || s.MemoryGiB > 1<<20:
		return invalid("memory_gib", "memory_gib must be between 1 and 1048576")
	case s.DiskGiB < 1 || s.DiskGiB > 10<<20:
		return invalid("disk_gib", "disk_gib must be between 1 and 10485760")
	case s.PricePerGPUHourMinor < 0 || s.PricePerGPUHourMinor > 100_000_000:
		return invalid("price_per_gpu_hour_minor", "price_per_gpu_hour_minor must be between 0 and 100000000")
	case !currencyRE.MatchString(s.Currency):
		return invalid("currency", "currency must be an upper-case ISO 4217 code")
	case len(s.Description) > 1000:
		return invalid("description", "description must be at most 1000 characters")
	}
	return nil
}

// Service keeps the catalog.
type Service struct {
	pool *pgxpool.Pool
	ids  rid.Builder
}

// NewService returns a Service.
func NewService(pool *pgxpool.Pool, region string) *Service {
	return &Service{pool: pool, ids: rid.Builder{Region: region}}
}

const columns = `id, gpu_model, gpus_per_node, cpu_cores, memory_gib, disk_gib, price_per_gpu_hour_minor, currency, active, description, created_at, updated_at`

func scan(row pgx.Row) (*SKU, error) {
	s := &SKU{}
	err := row.Scan(&s.ID, &s.GPUModel, &s.GPUsPerNode, &s.CPUCores, &s.MemoryGiB, &s.DiskGiB, &s.PricePerGPUHourMinor, &s.Currency, &s.Active, &s.Description, &s.CreatedAt, &s.UpdatedAt)
	return s, err
}

// Create adds a SKU.
func (c *Service) Create(ctx context.Context, s SKU) (*SKU, error) {
	if err := s.Validate(); err != nil {
		return nil, err
	}
	var out *SKU
	err := store.Transact(ctx, c.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		var err error
		out, err = scan(tx.QueryRow(ctx, `INSERT INTO skus (id, gpu_model, gpus_per_node, cpu_cores, memory_gib, disk_gib, price_per_gpu_hour_minor, currency, active, description)
			VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING `+columns,
			s.ID, s.GPUModel, s.GPUsPerNode, s.CPUCores, s.MemoryGiB, s.DiskGiB, s.PricePerGPUHourMinor, s.Currency, s.Active, s.Description))
		if store.IsUniqueViolation(err, "") {
			return errcode.New(CodeSKUExists, "a SKU %q exists", s.ID).WithDetails("field", "id")
		}
		if err != nil {
			return err
		}
		return audit.Record(ctx, tx, audit.Entry{Action: "sku.create", Target: c.ids.Platform("sku", s.ID),
			Details: map[string]any{"price_per_gpu_hour_minor": s.PricePerGPUHourMinor, "currency": s.Currency}})
	})
	if err != nil {
		return nil, fmt.Errorf("catalog: create: %w", err)
	}
	return out, nil
}

// Update changes a SKU's price, active flag and description (nil leaves a field).
func (c *Service) Update(ctx context.Context, id string, price *int64, active *bool, description *string) (*SKU, error) {
	var out *SKU
	err := store.Transact(ctx, c.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		cur, err := scan(tx.QueryRow(ctx, `SELECT `+columns+` FROM skus WHERE id = $1 FOR UPDATE`, id))
		if errors.Is(err, pgx.ErrNoRows) {
			return errcode.New(CodeSKUNotFound, "no SKU %q", id)
		}
		if err != nil {
			return err
		}
		next := *cur
		if price != nil {
			next.PricePerGPUHourMinor = *price
		}
		if active != nil {
			next.Active = *active
		}
		if description != nil {
			next.Description = *description
		}
		if err := next.Validate(); err != nil {
			return err
		}
		out, err = scan(tx.QueryRow(ctx, `UPDATE skus SET price_per_gpu_hour_minor = $2, active = $3, description = $4, updated_at = now()
			WHERE id = $1 RETURNING `+columns, id, next.PricePerGPUHourMinor, next.Active, next.Description))
		if err != nil {
			return err
		}
		return audit.Record(ctx, tx, audit.Entry{Action: "sku.update", Target: c.ids.Platform("sku", id),
			Details: map[string]any{"price_from": cur.PricePerGPUHourMinor, "price_to": next.PricePerGPUHourMinor, "active": next.Active}})
	})
	if err != nil {
		return nil, fmt.Errorf("catalog: update: %w", err)
	}
	return out, nil
}

// List returns SKUs by id after the cursor (active ones only unless all), up to
// limit+1.
func (c *Service) List(ctx context.Context, all bool, after string, limit int) ([]*SKU, error) {
	rows, err := c.pool.Query(ctx, `SELECT `+columns+` FROM skus WHERE ($1 OR active) AND id > $2 ORDER BY id LIMIT $3`, all, after, limit+1)
	if err != nil {
		return nil, fmt.Errorf("catalog: list: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (*SKU, error) { return scan(r) })
}
