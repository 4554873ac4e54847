package main

import (
	"context"
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/gpuaas/gpuaas/sdk/client"
)

// skus prints the active SKUs with their price and the nodes free right now.
func skus(ctx context.Context, c *client.ClientWithResponses, out io.Writer) error {
	return skuTable(ctx, c, out, "")
}

// skuTable prints the SKU table, each line after indent.
func skuTable(ctx context.Context, c *client.ClientWithResponses, out io.Writer, indent string) error {
	capResp, err := c.GetCapacityWithResponse(ctx)
	if err != nil {
		return fmt.Errorf("API unreachable: %w", err)
	}
	if capResp.JSON200 == nil {
		return apiError(capResp.StatusCode(), capResp.Body)
	}
	free := map[string]int{}
	for _, cp := range capResp.JSON200.Items {
		free[cp.SkuId] = cp.Available
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, indent+"SKU\tGPUS\tCPUS\tMEMORY\tDISK\tPRICE\tFREE")
	var cursor *string
	for {
		limit := 200
		resp, err := c.ListSKUsWithResponse(ctx, &client.ListSKUsParams{Limit: &limit, Cursor: cursor})
		if err != nil {
			return fmt.Errorf("API unreachable: %w", err)
		}
		if resp.JSON200 == nil {
			return apiError(resp.StatusCode(), resp.Body)
		}
		for _, s := range resp.JSON200.Items {
			fmt.Fprintf(tw, "%s%s\t%dx %s\t%d\t%d GiB\t%d GiB\t%s/GPU-h\t%d\n", indent, s.Id, s.GpusPerNode, s.GpuModel,
				s.CpuCores, s.MemoryGib, s.DiskGib, money(s.PricePerGpuHourMinor, s.Currency), free[s.Id])
		}
		if resp.JSON200.NextCursor == nil {
			break
		}
		cursor = resp.JSON200.NextCursor
	}
	return tw.Flush()
}

// money renders an amount in the currency's minor units: 249 USD is
// "2.49 USD", 300 JPY is "300 JPY". Every currency the platform bills in
// (policy billing.default_currency) has two decimals except JPY.
func money(minor int64, currency string) string {
	sign, abs := "", uint64(minor)
	if minor < 0 {
		sign, abs = "-", -abs
	}
	if currency == "JPY" {
		return fmt.Sprintf("%s%d %s", sign, abs, currency)
	}
	return fmt.Sprintf("%s%d.%02d %s", sign, abs/100, abs%100, currency)
}
