package maas

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"

	gomaas "github.com/canonical/gomaasclient/client"
	"github.com/canonical/gomaasclient/entity"
	"github.com/canonical/gomaasclient/entity/node"

	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
)

// DefaultDiscoverLimit is the page size of Discover when the request sets
// none.
const DefaultDiscoverLimit = 500

// Discover implements provisioner.Discoverer: the machines MAAS lists for
// the API user, in system id order. The MAAS 2.0 machine list has no
// paging of its own, so every page reads the list and keeps the machines
// after the cursor, which is the last system id of the previous page. A
// machine is Ready in MAAS's Ready status and Broken when MAAS marks it
// Broken or failed (commissioning, testing, deployment, releasing, disk
// erasing, rescue mode). Facts come from the listing: no GPUs, which need
// the machine's commissioning results.
func (d *Driver) Discover(ctx context.Context, req *provisioner.DiscoverRequest) (*provisioner.DiscoverPage, error) {
	s, err := d.enter(ctx)
	if err != nil {
		return nil, err
	}
	switch {
	case req.Limit < 0:
		return nil, fmt.Errorf("maas: discover: limit %d: %w", req.Limit, base.ErrInvalidArgument)
	case req.Cursor != "" && !systemIDRE.MatchString(req.Cursor):
		return nil, fmt.Errorf("maas: discover: cursor %q is not a MAAS system id: %w", req.Cursor, base.ErrInvalidArgument)
	}
	limit := req.Limit
	if limit == 0 {
		limit = DefaultDiscoverLimit
	}
	var ms []entity.Machine
	err = s.conn.call(ctx, "list machines", true, func(cl *gomaas.Client) error {
		var err error
		ms, err = cl.Machines.Get(&entity.MachinesParams{})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("maas: discover: %w", err)
	}
	slices.SortFunc(ms, func(a, b entity.Machine) int { return strings.Compare(a.SystemID, b.SystemID) })
	ms = ms[sort.Search(len(ms), func(i int) bool { return ms[i].SystemID > req.Cursor }):]
	page := &provisioner.DiscoverPage{Nodes: make([]provisioner.DiscoveredNode, 0, min(len(ms), limit))}
	if len(ms) > limit {
		ms = ms[:limit]
		page.NextCursor = ms[limit-1].SystemID
	}
	for i := range ms {
		page.Nodes = append(page.Nodes, discovered(&ms[i]))
	}
	return page, nil
}

// discovered is a listed machine as Discover reports it.
func discovered(m *entity.Machine) provisioner.DiscoveredNode {
	n := provisioner.DiscoveredNode{
		NodeID: m.SystemID,
		Ready:  m.Status == node.StatusReady,
		Broken: broken(m.Status),
		State:  m.StatusName,
	}
	if n.State == "" {
		n.State = fmt.Sprintf("status %d", m.Status)
	}
	// A machine never commissioned has no hardware to report.
	if m.CPUCount > 0 || m.Memory > 0 {
		f := listedFacts(m)
		f.Tags = mergeTags(m.TagNames)
		n.Facts = &f
	}
	return n
}

// broken reports whether MAAS marks a machine in st broken or failed.
func broken(st node.Status) bool {
	switch st {
	case node.StatusBroken, node.StatusFailedCommissioning, node.StatusFailedTesting, node.StatusFailedDeployment,
		node.StatusFailedReleasing, node.StatusFailedDiskErasing, node.StatusFailedEnteringRescueMode,
		node.StatusFailedExitingRescueMode:
		return true
	}
	return false
}
