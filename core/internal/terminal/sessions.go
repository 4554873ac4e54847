package terminal

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/rid"
	"github.com/gpuaas/gpuaas/core/internal/store"
)

const (
	// heartbeatEvery is how often a process refreshes its sessions' rows.
	heartbeatEvery = 30 * time.Second
	// staleAfter is how long a row may go unrefreshed before it stops
	// counting (its process died).
	staleAfter = 3 * heartbeatEvery
	// tokenRetention is how long used and expired tokens are kept.
	tokenRetention = time.Hour
)

// node is where an allocation's terminal goes.
type node struct {
	allocation, org, project uuid.UUID
	state                    string
	user                     string
	host                     string
	port                     int
}

// querier is a pool or a transaction.
type querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// lookup reads an allocation and its node; suffix may lock the row.
func lookup(ctx context.Context, db querier, allocation uuid.UUID, suffix string) (node, error) {
	n := node{allocation: allocation}
	err := db.QueryRow(ctx, `SELECT a.org_id, a.project_id, a.state, a.username, n.hostname, n.ssh_port
		FROM allocations a JOIN nodes n ON n.id = a.node_id WHERE a.id = $1`+suffix, allocation).
		Scan(&n.org, &n.project, &n.state, &n.user, &n.host, &n.port)
	if errors.Is(err, pgx.ErrNoRows) {
		return node{}, errcode.New(errcode.NotFound, "no allocation %s", allocation)
	}
	if err != nil {
		return node{}, fmt.Errorf("terminal: allocation %s: %w", allocation, err)
	}
	return n, nil
}

func notActive(n node) error {
	return errcode.New(CodeAllocationNotActive, "allocation %s is %s; a terminal needs an active allocation", n.allocation, n.state).
		WithDetails("state", n.state)
}

// target is the allocation's canonical id.
func (s *Service) target(n node) rid.ID {
	return s.ids.InProject(n.org.String(), n.project.String(), "allocation", n.allocation.String())
}

// acquire takes one of actor's max session slots, shared by every process.
func (s *Service) acquire(ctx context.Context, actor string, allocation uuid.UUID, max int) (uuid.UUID, error) {
	id := uuid.Must(uuid.NewV7())
	err := store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		// Two opens by the same principal take turns, so neither overshoots.
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtextextended($1, 0))`, "terminal:"+actor); err != nil {
			return err
		}
		var open int
		if err := tx.QueryRow(ctx, `SELECT count(*) FROM terminal_sessions WHERE actor = $1 AND seen_at > now() - $2::interval`,
			actor, staleAfter).Scan(&open); err != nil {
			return err
		}
		if open >= max {
			return errcode.New(CodeSessionLimit, "%d terminal sessions are open already, the most allowed; close one first", open).
				WithDetails("max_sessions", max)
		}
		_, err := tx.Exec(ctx, `INSERT INTO terminal_sessions (id, allocation_id, actor, instance) VALUES ($1, $2, $3, $4)`,
			id, allocation, actor, s.instance)
		return err
	})
	if err != nil {
		if errcode.As(err) != nil {
			return uuid.Nil, err
		}
		return uuid.Nil, fmt.Errorf("terminal: session slot: %w", err)
	}
	return id, nil
}

// release gives a slot back.
func (s *Service) release(id uuid.UUID) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := s.pool.Exec(ctx, `DELETE FROM terminal_sessions WHERE id = $1`, id); err != nil {
		s.log.Warn("terminal session slot not released; it expires on its own", "session_id", id, "error", err)
	}
}

// heartbeat refreshes this process's sessions and drops stale sessions and
// old tokens.
func (s *Service) heartbeat(ctx context.Context) error {
	if _, err := s.pool.Exec(ctx, `UPDATE terminal_sessions SET seen_at = now() WHERE instance = $1`, s.instance); err != nil {
		return fmt.Errorf("terminal: refresh sessions: %w", err)
	}
	if _, err := s.pool.Exec(ctx, `DELETE FROM terminal_sessions WHERE seen_at < now() - $1::interval`, staleAfter); err != nil {
		return fmt.Errorf("terminal: sweep sessions: %w", err)
	}
	if _, err := s.pool.Exec(ctx, `DELETE FROM terminal_tokens WHERE expires_at < $1`, s.now().Add(-tokenRetention)); err != nil {
		return fmt.Errorf("terminal: sweep tokens: %w", err)
	}
	return nil
}
