package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/google/uuid"

	"github.com/gpuaas/gpuaas/sdk/client"
)

// sshKey adds, lists and removes the caller's SSH public keys.
func sshKey(ctx context.Context, c *client.ClientWithResponses, args []string, out io.Writer) error {
	if len(args) == 0 {
		return errors.New("ssh-key: want add, list or rm")
	}
	switch args[0] {
	case "add":
		if len(args) != 3 {
			return errors.New("ssh-key add: want NAME PATH_TO_PUBKEY")
		}
		raw, err := os.ReadFile(args[2])
		if err != nil {
			return fmt.Errorf("ssh-key add: %w", err)
		}
		if strings.Contains(string(raw), "PRIVATE KEY") {
			return fmt.Errorf("ssh-key add: %s is a private key; give the public one (%s.pub)", args[2], args[2])
		}
		resp, err := c.AddSSHKeyWithResponse(ctx, nil, client.AddSSHKeyJSONRequestBody{Name: args[1], PublicKey: strings.TrimSpace(string(raw))})
		if err != nil {
			return fmt.Errorf("API unreachable: %w", err)
		}
		if resp.JSON201 == nil {
			return apiError(resp.StatusCode(), resp.Body)
		}
		k := resp.JSON201
		fmt.Fprintf(out, "added %s: %s %d %s (id %s)\n", k.Name, k.Type, k.Bits, k.Fingerprint, k.Id)
		return nil
	case "list":
		if len(args) != 1 {
			return errors.New("ssh-key list: takes no arguments")
		}
		tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tNAME\tTYPE\tFINGERPRINT\tADDED")
		var cursor *string
		for {
			limit := 200
			resp, err := c.ListSSHKeysWithResponse(ctx, &client.ListSSHKeysParams{Limit: &limit, Cursor: cursor})
			if err != nil {
				return fmt.Errorf("API unreachable: %w", err)
			}
			if resp.JSON200 == nil {
				return apiError(resp.StatusCode(), resp.Body)
			}
			for _, k := range resp.JSON200.Items {
				fmt.Fprintf(tw, "%s\t%s\t%s %d\t%s\t%s\n", k.Id, k.Name, k.Type, k.Bits, k.Fingerprint, k.CreatedAt.Local().Format(timeLayout))
			}
			if resp.JSON200.NextCursor == nil {
				break
			}
			cursor = resp.JSON200.NextCursor
		}
		return tw.Flush()
	case "rm":
		if len(args) != 2 {
			return errors.New("ssh-key rm: want ID")
		}
		id, err := uuid.Parse(args[1])
		if err != nil {
			return fmt.Errorf("ssh-key rm: %q is not a key id (see gpuaas ssh-key list)", args[1])
		}
		resp, err := c.DeleteSSHKeyWithResponse(ctx, id)
		if err != nil {
			return fmt.Errorf("API unreachable: %w", err)
		}
		if resp.StatusCode() != http.StatusNoContent {
			return apiError(resp.StatusCode(), resp.Body)
		}
		fmt.Fprintf(out, "removed %s\n", id)
		return nil
	}
	return fmt.Errorf("ssh-key: unknown command %q", args[0])
}

// timeLayout is how the CLI prints times (in the local zone).
const timeLayout = "2006-01-02 15:04:05"
