package maas_test

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/gpuaas/gpuaas/plugins/maas"
	"github.com/gpuaas/gpuaas/plugins/maas/maassim"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
)

// discoverAll pages through Discover with limit and returns the nodes in
// the order listed and the sizes of the pages.
func discoverAll(t *testing.T, d *maas.Driver, limit int) ([]provisioner.DiscoveredNode, []int) {
	t.Helper()
	ctx := testCtx(t)
	var nodes []provisioner.DiscoveredNode
	var sizes []int
	cursor := ""
	for range 100 {
		page, err := d.Discover(ctx, &provisioner.DiscoverRequest{Cursor: cursor, Limit: limit})
		if err != nil {
			t.Fatalf("Discover(cursor %q, limit %d): %v", cursor, limit, err)
		}
		nodes = append(nodes, page.Nodes...)
		sizes = append(sizes, len(page.Nodes))
		if page.NextCursor == "" {
			return nodes, sizes
		}
		cursor = page.NextCursor
	}
	t.Fatalf("Discover with limit %d did not end after 100 pages", limit)
	return nil, nil
}

func TestDiscover(t *testing.T) {
	h := setup(t)
	h.needSim(t)
	ctx := testCtx(t)
	specs := map[string]maassim.MachineSpec{}
	for _, s := range testMachines(t) {
		specs[s.SystemID] = s
	}
	for _, m := range []struct {
		sku    maassim.SKU
		i      int
		status string
	}{{maassim.SKUL40S, 1, "ready"}, {maassim.SKUH100, 2, "new"}} {
		spec, err := maassim.NewMachine(m.sku, m.i, m.status)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := h.sim.AddMachine(spec); err != nil {
			t.Fatal(err)
		}
		specs[spec.SystemID] = spec
	}
	var ids []string
	for id := range specs {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	d := h.driver(t, nil)

	t.Run("pages", func(t *testing.T) {
		nodes, sizes := discoverAll(t, d, 2)
		if !slices.Equal(sizes, []int{2, 2, 1}) {
			t.Fatalf("page sizes %v, want [2 2 1]", sizes)
		}
		var got []string
		for _, n := range nodes {
			got = append(got, n.NodeID)
		}
		if !slices.Equal(got, ids) {
			t.Fatalf("listed %v, want %v (every machine once, in system id order)", got, ids)
		}
		for _, n := range nodes {
			spec := specs[n.NodeID]
			if spec.Status == "new" {
				if n.Ready || n.Broken || n.State != "New" || n.Facts != nil {
					t.Errorf("uncommissioned machine %s: %+v, want New, neither ready nor broken, no facts", n.NodeID, n)
				}
				continue
			}
			if !n.Ready || n.Broken || n.State != "Ready" {
				t.Errorf("machine %s: ready=%v broken=%v state %q, want Ready", n.NodeID, n.Ready, n.Broken, n.State)
			}
			f := n.Facts
			if f == nil {
				t.Errorf("machine %s: no facts", n.NodeID)
				continue
			}
			if f.NodeID != n.NodeID || f.Hostname != spec.Hostname || f.CPU.Cores != spec.CPUCount ||
				f.MemoryBytes != uint64(spec.MemoryMiB)<<20 || f.Pool != spec.Pool || f.DiskBytes == 0 ||
				!slices.Equal(f.Tags, slices.Sorted(slices.Values(spec.Tags))) || len(f.GPUs) != 0 {
				t.Errorf("machine %s: facts %+v, want those of %+v without GPUs", n.NodeID, f, spec)
			}
		}
		all, sizes := discoverAll(t, d, 0)
		if len(all) != len(ids) || !slices.Equal(sizes, []int{len(ids)}) {
			t.Fatalf("the default limit: page sizes %v, want one page of %d", sizes, len(ids))
		}
	})

	t.Run("broken and removed", func(t *testing.T) {
		cl := h.client(t)
		brokenID, goneID := ids[0], ids[1]
		if _, err := cl.Machine.MarkBroken(brokenID, "PSU failure"); err != nil {
			t.Fatal(err)
		}
		if err := cl.Machine.Delete(goneID); err != nil {
			t.Fatal(err)
		}
		nodes, _ := discoverAll(t, d, 2)
		var got []string
		for _, n := range nodes {
			got = append(got, n.NodeID)
			if n.NodeID == brokenID && (!n.Broken || n.Ready || n.State != "Broken") {
				t.Errorf("machine %s marked broken: %+v, want Broken", n.NodeID, n)
			}
		}
		if want := slices.DeleteFunc(slices.Clone(ids), func(id string) bool { return id == goneID }); !slices.Equal(got, want) {
			t.Fatalf("after deleting %s: listed %v, want %v", goneID, got, want)
		}
		// A cursor naming the deleted machine still continues after it.
		page, err := d.Discover(ctx, &provisioner.DiscoverRequest{Cursor: goneID, Limit: 1})
		if err != nil || len(page.Nodes) != 1 || page.Nodes[0].NodeID != ids[2] {
			t.Fatalf("Discover after the deleted machine's id: %+v, %v; want %s", page, err, ids[2])
		}
	})

	t.Run("refusals", func(t *testing.T) {
		_, err := d.Discover(ctx, &provisioner.DiscoverRequest{Limit: -1})
		if !errors.Is(err, base.ErrInvalidArgument) {
			t.Errorf("negative limit: got %v, want ErrInvalidArgument", err)
		}
		_, err = d.Discover(ctx, &provisioner.DiscoverRequest{Cursor: "../machines"})
		if !errors.Is(err, base.ErrInvalidArgument) {
			t.Errorf("cursor that is no system id: got %v, want ErrInvalidArgument", err)
		}
		page, err := d.Discover(ctx, &provisioner.DiscoverRequest{Cursor: strings.Repeat("z", 10)})
		if err != nil || len(page.Nodes) != 0 || page.NextCursor != "" {
			t.Errorf("cursor past the last machine: %+v, %v; want an empty last page", page, err)
		}
	})

	t.Run("unavailable", func(t *testing.T) {
		if err := h.sim.InjectFault(maassim.Fault{Count: 100, Status: 503, Path: "machines/"}); err != nil {
			t.Fatal(err)
		}
		defer h.sim.ClearFaults()
		_, err := d.Discover(ctx, &provisioner.DiscoverRequest{})
		if !errors.Is(err, base.ErrUnavailable) {
			t.Fatalf("MAAS answering 503: got %v, want ErrUnavailable", err)
		}
	})
}
