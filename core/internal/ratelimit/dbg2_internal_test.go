package ratelimit

import (
	"context"
	"fmt"
	"sync"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

type logDB struct {
	DB
	mu  sync.Mutex
	log []string
}

func (d *logDB) add(s string) { d.mu.Lock(); d.log = append(d.log, s); d.mu.Unlock() }

func (d *logDB) Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error) {
	d.add(fmt.Sprintf("Query %.30q %v", sql, args[3:]))
	return d.DB.Query(ctx, sql, args...)
}
func (d *logDB) QueryRow(ctx context.Context, sql string, args ...any) pgx.Row {
	d.add(fmt.Sprintf("QueryRow n=%v", args[3]))
	return d.DB.QueryRow(ctx, sql, args...)
}
func (d *logDB) Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error) {
	return d.DB.Exec(ctx, sql, args...)
}
