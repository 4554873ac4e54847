package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/google/uuid"

	"github.com/gpuaas/gpuaas/sdk/client"
)

const (
	pollInterval = 500 * time.Millisecond
	waitTimeout  = 15 * time.Minute
)

// alloc creates, lists, shows and releases allocations.
func alloc(ctx context.Context, c *client.ClientWithResponses, args []string, out io.Writer) error {
	if len(args) == 0 {
		return errors.New("alloc: want create, list, get or release")
	}
	switch args[0] {
	case "create":
		return allocCreate(ctx, c, args[1:], out)
	case "list":
		return allocList(ctx, c, args[1:], out)
	case "get":
		if len(args) != 2 {
			return errors.New("alloc get: want ID")
		}
		id, err := allocationID("alloc get", args[1])
		if err != nil {
			return err
		}
		a, err := getAllocation(ctx, c, id)
		if err != nil {
			return err
		}
		printAllocation(out, a)
		return nil
	case "release":
		return allocRelease(ctx, c, args[1:], out)
	}
	return fmt.Errorf("alloc: unknown command %q", args[0])
}

func allocCreate(ctx context.Context, c *client.ClientWithResponses, args []string, out io.Writer) error {
	fs := newFlags("alloc create")
	project := fs.String("project", "", "project id")
	sku := fs.String("sku", "", "SKU id")
	count := fs.Int("count", 1, "nodes")
	name := fs.String("name", "", "name")
	wait := fs.Bool("wait", false, "wait until active or failed")
	pos, err := parseFlags(fs, args)
	switch {
	case err != nil:
		return err
	case len(pos) > 0:
		return fmt.Errorf("alloc create: unexpected %q", pos[0])
	case *project == "" || *sku == "":
		return errors.New("alloc create: want --project PROJECT_ID and --sku SKU (see gpuaas orgs, gpuaas skus)")
	}
	projectID, err := uuid.Parse(*project)
	if err != nil {
		return fmt.Errorf("alloc create: --project %q is not a project id", *project)
	}
	req := client.CreateAllocationJSONRequestBody{ProjectId: projectID, SkuId: *sku, Count: count}
	if *name != "" {
		req.Name = name
	}
	resp, err := c.CreateAllocationWithResponse(ctx, nil, req)
	if err != nil {
		return fmt.Errorf("API unreachable: %w", err)
	}
	if resp.JSON201 == nil {
		return apiError(resp.StatusCode(), resp.Body)
	}
	created := resp.JSON201.Items
	ids := make([]uuid.UUID, 0, len(created))
	for _, a := range created {
		ids = append(ids, a.Id)
		label := ""
		if a.Name != "" {
			label = " (" + a.Name + ")"
		}
		fmt.Fprintf(out, "created %s%s: %s, %s at %s/GPU-h, %s\n", a.Id, label, a.SkuId, gpus(a.Gpus),
			money(a.PricePerGpuHourMinor, a.Currency), a.State)
	}
	if !*wait {
		if len(ids) > 0 {
			fmt.Fprintf(out, "follow it with: gpuaas alloc get %s\n", ids[0])
		}
		return nil
	}
	final, err := await(ctx, c, created, out, func(s client.AllocationState) bool {
		return s != client.AllocationStateRequested && s != client.AllocationStateProvisioning
	})
	if err != nil {
		return err
	}
	var failed []string
	for _, id := range ids {
		a := final[id]
		if a.State != client.AllocationStateActive {
			failed = append(failed, fmt.Sprintf("%s is %s%s", a.Id, a.State, reason(a)))
			continue
		}
		if a.SshHost != nil {
			fmt.Fprintf(out, "ssh %s@%s\n", a.SshUser, *a.SshHost)
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("alloc create: %s", strings.Join(failed, "; "))
	}
	return nil
}

func allocList(ctx context.Context, c *client.ClientWithResponses, args []string, out io.Writer) error {
	fs := newFlags("alloc list")
	project := fs.String("project", "", "project id")
	state := fs.String("state", "", "only allocations in this state")
	pos, err := parseFlags(fs, args)
	switch {
	case err != nil:
		return err
	case len(pos) > 0:
		return fmt.Errorf("alloc list: unexpected %q", pos[0])
	case *project == "":
		return errors.New("alloc list: want --project PROJECT_ID")
	}
	params := client.ListAllocationsParams{}
	if params.ProjectId, err = uuid.Parse(*project); err != nil {
		return fmt.Errorf("alloc list: --project %q is not a project id", *project)
	}
	if *state != "" {
		s := client.AllocationState(*state)
		if !s.Valid() {
			return fmt.Errorf("alloc list: --state %q is not one of requested, provisioning, active, releasing, released, failed, release_failed", *state)
		}
		params.State = &s
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tNAME\tSKU\tGPUS\tSTATE\tCREATED\tSSH")
	limit := 200
	params.Limit = &limit
	for {
		resp, err := c.ListAllocationsWithResponse(ctx, &params)
		if err != nil {
			return fmt.Errorf("API unreachable: %w", err)
		}
		if resp.JSON200 == nil {
			return apiError(resp.StatusCode(), resp.Body)
		}
		for _, a := range resp.JSON200.Items {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\t%s\n", a.Id, a.Name, a.SkuId, a.Gpus, a.State,
				a.CreatedAt.Local().Format(timeLayout), sshTarget(&a))
		}
		if resp.JSON200.NextCursor == nil {
			break
		}
		params.Cursor = resp.JSON200.NextCursor
	}
	return tw.Flush()
}

func allocRelease(ctx context.Context, c *client.ClientWithResponses, args []string, out io.Writer) error {
	fs := newFlags("alloc release")
	wait := fs.Bool("wait", false, "wait until released")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return errors.New("alloc release: want ID [--wait]")
	}
	id, err := allocationID("alloc release", pos[0])
	if err != nil {
		return err
	}
	resp, err := c.ReleaseAllocationWithResponse(ctx, id, nil)
	if err != nil {
		return fmt.Errorf("API unreachable: %w", err)
	}
	if resp.JSON202 == nil {
		return apiError(resp.StatusCode(), resp.Body)
	}
	fmt.Fprintf(out, "releasing %s\n", id)
	if !*wait {
		return nil
	}
	final, err := await(ctx, c, []client.Allocation{*resp.JSON202}, out, func(s client.AllocationState) bool {
		return s != client.AllocationStateReleasing
	})
	if err != nil {
		return err
	}
	if a := final[id]; a.State != client.AllocationStateReleased {
		return fmt.Errorf("alloc release: %s is %s%s", id, a.State, reason(a))
	}
	return nil
}

// await polls the allocations (as they were last seen) every pollInterval,
// printing each change of state, until every one is in a state done accepts;
// it gives up after waitTimeout. A poll that fails on the way to the API is
// tried again at the next tick; an error answer ends the wait.
func await(ctx context.Context, c *client.ClientWithResponses, seen []client.Allocation, out io.Writer,
	done func(client.AllocationState) bool) (map[uuid.UUID]*client.Allocation, error) {
	wctx, cancel := context.WithTimeout(ctx, waitTimeout)
	defer cancel()
	ids := make([]uuid.UUID, len(seen))
	last := map[uuid.UUID]*client.Allocation{}
	for i := range seen {
		ids[i], last[seen[i].Id] = seen[i].Id, &seen[i]
	}
	tick := time.NewTicker(pollInterval)
	defer tick.Stop()
	for {
		pending := 0
		for _, id := range ids {
			if a := last[id]; a != nil && done(a.State) {
				continue
			}
			resp, err := c.GetAllocationWithResponse(wctx, id)
			if err == nil {
				a := resp.JSON200
				if a == nil {
					return nil, apiError(resp.StatusCode(), resp.Body)
				}
				if prev := last[id]; prev == nil || prev.State != a.State {
					fmt.Fprintf(out, "%s %s %s%s\n", time.Now().Format("15:04:05"), id, a.State, reason(a))
				}
				last[id] = a
				if done(a.State) {
					continue
				}
			}
			pending++
		}
		if pending == 0 {
			return last, nil
		}
		select {
		case <-tick.C:
		case <-wctx.Done():
			var still []string
			for _, id := range ids {
				if a := last[id]; a == nil || !done(a.State) {
					still = append(still, id.String())
				}
			}
			why := "interrupted"
			if ctx.Err() == nil {
				why = fmt.Sprintf("gave up after %s", waitTimeout)
			}
			return nil, fmt.Errorf("%s waiting for %s; follow with gpuaas alloc get ID", why, strings.Join(still, ", "))
		}
	}
}

func getAllocation(ctx context.Context, c *client.ClientWithResponses, id uuid.UUID) (*client.Allocation, error) {
	resp, err := c.GetAllocationWithResponse(ctx, id)
	if err != nil {
		return nil, fmt.Errorf("API unreachable: %w", err)
	}
	if resp.JSON200 == nil {
		return nil, apiError(resp.StatusCode(), resp.Body)
	}
	return resp.JSON200, nil
}

func printAllocation(out io.Writer, a *client.Allocation) {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	row := func(k, v string) { fmt.Fprintf(tw, "%s\t%s\n", k, v) }
	row("id", a.Id.String())
	if a.Name != "" {
		row("name", a.Name)
	}
	row("project", a.ProjectId.String())
	row("org", a.OrgId.String())
	row("sku", fmt.Sprintf("%s (%s)", a.SkuId, gpus(a.Gpus)))
	row("price", money(a.PricePerGpuHourMinor, a.Currency)+"/GPU-h")
	row("state", string(a.State))
	if a.StateReason != "" {
		row("reason", a.StateReason)
	}
	if a.Image != nil && *a.Image != "" {
		row("image", *a.Image)
	}
	row("created", a.CreatedAt.Local().Format(timeLayout)+" by "+a.CreatedBy)
	if a.ActiveAt != nil {
		row("active", a.ActiveAt.Local().Format(timeLayout))
	}
	if a.EndedAt != nil {
		row("ended", a.EndedAt.Local().Format(timeLayout))
	}
	if a.NodeId != nil {
		row("node", a.NodeId.String())
	}
	if t := sshTarget(a); t != "" {
		row("ssh", t)
	}
	_ = tw.Flush()
}

// sshTarget is user@host of an active allocation, else "".
func sshTarget(a *client.Allocation) string {
	if a.State != client.AllocationStateActive || a.SshHost == nil || *a.SshHost == "" {
		return ""
	}
	return a.SshUser + "@" + *a.SshHost
}

func gpus(n int) string {
	if n == 1 {
		return "1 GPU"
	}
	return fmt.Sprintf("%d GPUs", n)
}

func reason(a *client.Allocation) string {
	if a.StateReason == "" {
		return ""
	}
	return ": " + a.StateReason
}

func allocationID(cmd, s string) (uuid.UUID, error) {
	id, err := uuid.Parse(s)
	if err != nil {
		return uuid.UUID{}, fmt.Errorf("%s: %q is not an allocation id (see gpuaas alloc list)", cmd, s)
	}
	return id, nil
}
