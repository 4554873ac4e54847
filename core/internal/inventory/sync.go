package inventory

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/gpuaas/gpuaas/core/internal/audit"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/store"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
)

// HandleWebhook hands a raw webhook for a provisioner instance to its driver,
// which verifies and translates it, and applies the events: facts register or
// update a node (available once it has a SKU), health moves it offline or back.
// It returns how many events it applied.
func (s *Service) HandleWebhook(ctx context.Context, instance string, body []byte, header http.Header) (int, error) {
	drv, err := s.drivers.Provisioner(ctx, instance)
	if err != nil {
		return 0, err
	}
	wh, ok := drv.(provisioner.WebhookHandler)
	if !ok {
		return 0, errcode.New(CodeProvisionerRejected, "provisioner instance %s takes no webhooks", instance)
	}
	evs, err := wh.HandleWebhook(ctx, &provisioner.Webhook{Body: body, Header: header})
	switch {
	case errors.Is(err, base.ErrUnauthenticated), errors.Is(err, base.ErrInvalidArgument), errors.Is(err, base.ErrPermissionDenied):
		if aerr := audit.Record(ctx, s.pool, audit.Entry{Action: "node.webhook", Target: s.ids.Platform("plugin_instance", instance),
			Result: audit.Denied, Details: map[string]any{"error": truncate(err.Error())}}); aerr != nil {
			s.log.Warn("audit of a refused webhook failed", "error", aerr)
		}
		return 0, errcode.New(CodeWebhookInvalid, "webhook refused: %s", err)
	case errors.Is(err, base.ErrUnimplemented):
		return 0, errcode.New(CodeProvisionerRejected, "provisioner instance %s takes no webhooks", instance)
	case err != nil:
		return 0, DriverError("webhook", err)
	}
	applied := 0
	for _, ev := range evs {
		if err := s.apply(ctx, instance, ev); err != nil {
			return applied, err
		}
		applied++
	}
	return applied, nil
}

func (s *Service) apply(ctx context.Context, instance string, ev provisioner.NodeEvent) error {
	return store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		switch ev.Type {
		case provisioner.EventFacts:
			if ev.Facts == nil {
				return nil
			}
			nf := *ev.Facts
			if nf.NodeID == "" {
				nf.NodeID = ev.NodeID
			}
			n, err := s.upsert(ctx, tx, instance, nf, "", false, false)
			if err != nil {
				return err
			}
			return audit.Record(ctx, tx, audit.Entry{Action: "node.facts", Target: s.Target(n.ID),
				Details: map[string]any{"provisioner_instance": instance, "external_id": nf.NodeID, "event": ev.ID, "state": string(n.State), "sku_id": n.SKU}})
		case provisioner.EventHealth:
			if ev.Health == nil {
				return nil
			}
			n, err := scan(tx.QueryRow(ctx, `SELECT `+columns+` FROM nodes WHERE provisioner_instance = $1 AND external_id = $2 FOR UPDATE`, instance, ev.NodeID))
			if errors.Is(err, pgx.ErrNoRows) {
				return nil // a node the platform does not rent
			}
			if err != nil {
				return err
			}
			return s.recordHealth(ctx, tx, n, ev.Health)
		}
		return nil // operation progress is followed by the workflows through Status
	})
}

// ReconcileResult counts what a reconciling poll changed.
type ReconcileResult struct {
	Seen, Added, Offline, Recovered int
}

// Reconcile polls a provisioner backend that can list its nodes
// (provisioner.Discoverer) and brings the inventory in line, covering lost
// webhooks: a Ready node the inventory lacks is enrolled and added, a known
// node the backend no longer lists or reports broken goes offline, an offline
// one the backend reports Ready again comes back. A backend without the
// capability is skipped (zero result, nil error).
func (s *Service) Reconcile(ctx context.Context, instance string) (ReconcileResult, error) {
	var res ReconcileResult
	drv, err := s.drivers.Provisioner(ctx, instance)
	if err != nil {
		return res, err
	}
	disc, ok := drv.(provisioner.Discoverer)
	if !ok {
		return res, nil
	}
	seen := map[string]provisioner.DiscoveredNode{}
	cursor := ""
	for {
		page, err := disc.Discover(ctx, &provisioner.DiscoverRequest{Cursor: cursor, Limit: 500})
		if errors.Is(err, base.ErrUnimplemented) {
			return res, nil
		}
		if err != nil {
			return res, DriverError("discover", err)
		}
		for _, n := range page.Nodes {
			seen[n.NodeID] = n
		}
		if page.NextCursor == "" || len(page.Nodes) == 0 {
			break
		}
		cursor = page.NextCursor
	}
	res.Seen = len(seen)

	rows, err := s.pool.Query(ctx, `SELECT `+columns+` FROM nodes WHERE provisioner_instance = $1 AND state <> 'retired'`, instance)
	if err != nil {
		return res, fmt.Errorf("inventory: reconcile: %w", err)
	}
	known, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (*Node, error) { return scan(r) })
	if err != nil {
		return res, fmt.Errorf("inventory: reconcile: %w", err)
	}
	have := map[string]bool{}
	for _, n := range known {
		have[n.ExternalID] = true
		d, listed := seen[n.ExternalID]
		var health *provisioner.Health
		switch {
		case !listed:
			health = &provisioner.Health{Message: "the backend no longer lists the node"}
		case d.Broken:
			health = &provisioner.Health{Message: "the backend reports the node " + d.State}
		case n.State == Offline && (d.Ready || n.OfflineFrom == Allocated):
			health = &provisioner.Health{Healthy: true, Message: "the backend reports the node " + d.State}
		default:
			continue
		}
		err := store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
			cur, err := Lock(ctx, tx, n.ID)
			if err != nil {
				return err
			}
			was := cur.State
			if err := s.recordHealth(ctx, tx, cur, health); err != nil {
				return err
			}
			switch {
			case was != Offline && cur.State == Offline:
				res.Offline++
			case was == Offline && cur.State != Offline:
				res.Recovered++
			}
			return nil
		})
		if err != nil {
			return res, fmt.Errorf("inventory: reconcile %s: %w", n.ID, err)
		}
	}
	for id, d := range seen {
		if have[id] || !d.Ready {
			continue
		}
		enr, err := drv.Enroll(ctx, &provisioner.EnrollRequest{OperationID: "discover-" + instance + "-" + id, NodeID: id, Address: id})
		if err != nil {
			s.log.Warn("a discovered node did not enroll", "instance", instance, "node", id, "error", err)
			continue
		}
		if enr.Facts.NodeID == "" {
			enr.Facts.NodeID = id
		}
		err = store.Transact(ctx, s.pool, store.TxOptions{}, func(tx pgx.Tx) error {
			n, err := s.upsert(ctx, tx, instance, enr.Facts, "", false, enr.AgentRequired)
			if err != nil {
				return err
			}
			return audit.Record(ctx, tx, audit.Entry{Action: "node.discover", Target: s.Target(n.ID),
				Details: map[string]any{"provisioner_instance": instance, "external_id": id, "state": string(n.State), "sku_id": n.SKU}})
		})
		if err != nil {
			return res, fmt.Errorf("inventory: reconcile add %s: %w", id, err)
		}
		res.Added++
	}
	return res, nil
}

// SyncLoop reconciles every instance that lists returns, every
// inventory.sync_interval, until ctx ends. Errors are logged: one backend
// away does not stop the others.
func (s *Service) SyncLoop(ctx context.Context, every func(context.Context) time.Duration, instances func(context.Context) ([]string, error)) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(every(ctx)):
		}
		names, err := instances(ctx)
		if err != nil {
			s.log.Warn("listing provisioner instances", "error", err)
			continue
		}
		for _, name := range names {
			res, err := s.Reconcile(ctx, name)
			switch {
			case err != nil && ctx.Err() == nil:
				s.log.Warn("reconciling the inventory", "instance", name, "error", err)
			case res.Added+res.Offline+res.Recovered > 0:
				s.log.Info("inventory reconciled", "instance", name, "added", res.Added, "offline", res.Offline, "recovered", res.Recovered)
			}
		}
	}
}
