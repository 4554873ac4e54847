package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"

	"github.com/google/uuid"

	"github.com/gpuaas/gpuaas/sdk/client"
)

// The development data of `make run`.
const (
	seedOrgSlug     = "demo"
	seedOrgName     = "Demo"
	seedProjectSlug = "ml"
	seedProjectName = "ML experiments"
	seedCreditNote  = "make run: development credit"
)

// seedSKUs are the shapes of the machines of make run's simulated MAAS.
func seedSKUs() []client.CreateSKURequest {
	desc := func(s string) *string { return &s }
	return []client.CreateSKURequest{
		{Id: "h100", GpuModel: "H100 80GB", GpusPerNode: 8, CpuCores: 192, MemoryGib: 1536, DiskGib: 7680,
			PricePerGpuHourMinor: 249, Currency: "USD", Description: desc("8x NVIDIA H100 SXM5 80GB")},
		{Id: "l40s", GpuModel: "L40S", GpusPerNode: 4, CpuCores: 64, MemoryGib: 512, DiskGib: 3840,
			PricePerGpuHourMinor: 99, Currency: "USD", Description: desc("4x NVIDIA L40S 48GB")},
	}
}

// devSeed makes the development data `make run` starts with, leaving what
// exists alone, so it can run again against the same database:
//
//  1. the SKUs h100 and l40s;
//  2. with --plugin-path, that plugin binary installed (replacing an older
//     build of it); with --maas-url, instance --instance configured against
//     that MAAS;
//  3. the instance's Ready machines added as nodes;
//  4. org demo with project ml;
//  5. --credit-minor of promotional credit for the org, once: the
//     Idempotency-Key is fixed per org, and the ledger posts one entry per key.
//
// A failure of steps 2 and 3 (the driver) does not stop steps 4 and 5; it is
// returned after the summary.
func devSeed(ctx context.Context, c *client.ClientWithResponses, apiURL string, args []string, out io.Writer) error {
	fs := newFlags("dev seed")
	maasURL := fs.String("maas-url", "", "MAAS region URL")
	keyFile := fs.String("maas-api-key-file", "", "file holding the MAAS API key")
	secretFile := fs.String("webhook-secret-file", "", "file holding the commissioning webhook secret")
	pluginPath := fs.String("plugin-path", "", "MAAS driver binary to install")
	instance := fs.String("instance", "maas", "provisioner instance")
	credit := fs.Int64("credit-minor", 10000, "promotional credit in minor units")
	pos, err := parseFlags(fs, args)
	switch {
	case err != nil:
		return err
	case len(pos) > 0:
		return fmt.Errorf("dev seed: unexpected %q", pos[0])
	case *maasURL != "" && (*keyFile == "" || *secretFile == ""):
		return errors.New("dev seed: --maas-url needs --maas-api-key-file and --webhook-secret-file")
	case *maasURL == "" && (*pluginPath != "" || *keyFile != "" || *secretFile != ""):
		return errors.New("dev seed: --plugin-path, --maas-api-key-file and --webhook-secret-file need --maas-url")
	case *credit < 0:
		return errors.New("dev seed: --credit-minor must not be negative")
	}
	var maasCfg map[string]any
	if *maasURL != "" {
		key, err := readSecret(*keyFile)
		if err != nil {
			return fmt.Errorf("dev seed: --maas-api-key-file: %w", err)
		}
		secret, err := readSecret(*secretFile)
		if err != nil {
			return fmt.Errorf("dev seed: --webhook-secret-file: %w", err)
		}
		maasCfg = map[string]any{"maas_url": *maasURL, "api_key": key, "webhook_secret": secret,
			"webhook_url": apiURL + "/api/v1/webhooks/maas/" + *instance}
	}

	fmt.Fprintln(out, "  Development data (gpuaas dev seed; safe to run again):")
	line := func(k, format string, a ...any) { fmt.Fprintf(out, "    %-10s %s\n", k+":", fmt.Sprintf(format, a...)) }

	var made []string
	for _, s := range seedSKUs() {
		state, err := ensureSKU(ctx, c, s)
		if err != nil {
			return fmt.Errorf("dev seed: SKU %s: %w", s.Id, err)
		}
		made = append(made, s.Id+" "+state)
	}
	line("SKUs", "%s", strings.Join(made, ", "))

	nodesErr := seedNodes(ctx, c, *pluginPath, *instance, maasCfg, line)
	if nodesErr != nil {
		line("Nodes", "none added (the error follows the summary)")
	}

	org, state, err := ensureOrg(ctx, c)
	if err != nil {
		return fmt.Errorf("dev seed: org %s: %w", seedOrgSlug, err)
	}
	line("Org", "%s %s (%s)", org.Slug, org.Id, state)
	project, state, err := ensureProject(ctx, c, org.Id)
	if err != nil {
		return fmt.Errorf("dev seed: project %s: %w", seedProjectSlug, err)
	}
	line("Project", "%s %s (%s)", project.Slug, project.Id, state)
	if *credit > 0 {
		msg, err := creditOnce(ctx, c, org.Id, *credit)
		if err != nil {
			return fmt.Errorf("dev seed: credit: %w", err)
		}
		line("Credit", "%s", msg)
	}

	fmt.Fprintln(out)
	if err := skuTable(ctx, c, out, "    "); err != nil {
		return fmt.Errorf("dev seed: SKUs: %w", err)
	}
	fmt.Fprintf(out, "\n  Try:\n    gpuaas ssh-key add laptop ~/.ssh/id_ed25519.pub\n    gpuaas alloc create --project %s --sku h100 --wait\n", project.Id)
	if nodesErr != nil {
		return fmt.Errorf("dev seed: %w", nodesErr)
	}
	return nil
}

// seedNodes installs and configures the driver when asked, and adds the
// instance's machines as nodes.
func seedNodes(ctx context.Context, c *client.ClientWithResponses, pluginPath, instance string, cfg map[string]any,
	line func(k, format string, a ...any)) error {
	plugin := "maas"
	if pluginPath != "" {
		path, err := filepath.Abs(pluginPath)
		if err != nil {
			return err
		}
		// The binary `make build` just made replaces an older build; the
		// same binary again is a no-op.
		upgrade := true
		resp, err := c.AdminInstallPluginWithResponse(ctx, client.AdminInstallPluginJSONRequestBody{Path: path, Upgrade: &upgrade})
		if err != nil {
			return fmt.Errorf("install %s: API unreachable: %w", path, err)
		}
		if resp.JSON201 == nil {
			return fmt.Errorf("install %s: %w", path, apiError(resp.StatusCode(), resp.Body))
		}
		plugin = resp.JSON201.Name
		line("Plugin", "%s %s (%s)", plugin, resp.JSON201.Version, resp.JSON201.Sha256[:12])
	}
	if cfg != nil {
		resp, err := c.AdminConfigurePluginInstanceWithResponse(ctx, instance, client.AdminConfigurePluginInstanceJSONRequestBody{Plugin: plugin, Config: cfg})
		if err != nil {
			return fmt.Errorf("configure instance %s: API unreachable: %w", instance, err)
		}
		if resp.JSON200 == nil {
			return fmt.Errorf("configure instance %s: %w", instance, apiError(resp.StatusCode(), resp.Body))
		}
		inst := resp.JSON200
		if inst.State == client.PluginInstanceStateFailed || inst.State == client.PluginInstanceStateIncompatible {
			return fmt.Errorf("instance %s is %s: %s", instance, inst.State, inst.StateReason)
		}
		line("Instance", "%s of plugin %s, MAAS at %s", instance, plugin, cfg["maas_url"])
	}
	resp, err := c.AdminSyncInstanceNodesWithResponse(ctx, instance)
	if err != nil {
		return fmt.Errorf("add the nodes of instance %s: API unreachable: %w", instance, err)
	}
	if resp.JSON200 == nil {
		err := fmt.Errorf("add the nodes of instance %s: %w", instance, apiError(resp.StatusCode(), resp.Body))
		if errorCode(resp.Body) == client.PluginInstanceNotFound {
			err = fmt.Errorf("%w; install and configure it with --plugin-path and --maas-url", err)
		}
		return err
	}
	r := resp.JSON200
	line("Nodes", "%d added from instance %s (%d machines seen)", r.Added, instance, r.Seen)
	return nil
}

// ensureSKU creates s unless a SKU of that id exists.
func ensureSKU(ctx context.Context, c *client.ClientWithResponses, s client.CreateSKURequest) (string, error) {
	resp, err := c.AdminCreateSKUWithResponse(ctx, nil, s)
	if err != nil {
		return "", fmt.Errorf("API unreachable: %w", err)
	}
	switch {
	case resp.JSON201 != nil:
		return "created", nil
	case resp.StatusCode() == http.StatusConflict && errorCode(resp.Body) == client.SkuExists:
		return "exists", nil
	}
	return "", apiError(resp.StatusCode(), resp.Body)
}

// ensureOrg finds the org with the seed's slug or creates it (the caller
// becomes its owner).
func ensureOrg(ctx context.Context, c *client.ClientWithResponses) (*client.Org, string, error) {
	find := func() (*client.Org, error) {
		var cursor *string
		for {
			limit := 200
			resp, err := c.ListOrgsWithResponse(ctx, &client.ListOrgsParams{Limit: &limit, Cursor: cursor})
			if err != nil {
				return nil, fmt.Errorf("API unreachable: %w", err)
			}
			if resp.JSON200 == nil {
				return nil, apiError(resp.StatusCode(), resp.Body)
			}
			for _, o := range resp.JSON200.Items {
				if o.Slug == seedOrgSlug {
					return &o, nil
				}
			}
			if resp.JSON200.NextCursor == nil {
				return nil, nil
			}
			cursor = resp.JSON200.NextCursor
		}
	}
	if o, err := find(); err != nil || o != nil {
		return o, "exists", err
	}
	resp, err := c.CreateOrgWithResponse(ctx, nil, client.CreateOrgJSONRequestBody{Slug: seedOrgSlug, Name: seedOrgName})
	if err != nil {
		return nil, "", fmt.Errorf("API unreachable: %w", err)
	}
	if resp.JSON201 == nil {
		return nil, "", apiError(resp.StatusCode(), resp.Body)
	}
	return resp.JSON201, "created", nil
}

// ensureProject finds the project with the seed's slug in org or creates it.
func ensureProject(ctx context.Context, c *client.ClientWithResponses, org uuid.UUID) (*client.Project, string, error) {
	var cursor *string
	for {
		limit := 200
		resp, err := c.ListProjectsWithResponse(ctx, org, &client.ListProjectsParams{Limit: &limit, Cursor: cursor})
		if err != nil {
			return nil, "", fmt.Errorf("API unreachable: %w", err)
		}
		if resp.JSON200 == nil {
			return nil, "", apiError(resp.StatusCode(), resp.Body)
		}
		for _, p := range resp.JSON200.Items {
			if p.Slug == seedProjectSlug {
				return &p, "exists", nil
			}
		}
		if resp.JSON200.NextCursor == nil {
			break
		}
		cursor = resp.JSON200.NextCursor
	}
	resp, err := c.CreateProjectWithResponse(ctx, org, nil, client.CreateProjectJSONRequestBody{Slug: seedProjectSlug, Name: seedProjectName})
	if err != nil {
		return nil, "", fmt.Errorf("API unreachable: %w", err)
	}
	if resp.JSON201 == nil {
		return nil, "", apiError(resp.StatusCode(), resp.Body)
	}
	return resp.JSON201, "created", nil
}

// creditOnce gives org its development credit under a key fixed per org: the
// API answers a repeat with the first entry (and the ledger posts one entry
// per key even after the idempotency record expired).
func creditOnce(ctx context.Context, c *client.ClientWithResponses, org uuid.UUID, amount int64) (string, error) {
	key := "dev-seed-credit-" + org.String()
	resp, err := c.AdminAdjustBalanceWithResponse(ctx, &client.AdminAdjustBalanceParams{IdempotencyKey: &key},
		client.AdjustmentRequest{OrgId: org, AmountMinor: amount, Type: client.AdjustmentRequestTypePromotionalCredit, Reason: seedCreditNote})
	if err != nil {
		return "", fmt.Errorf("API unreachable: %w", err)
	}
	switch {
	case resp.JSON201 != nil:
		e := resp.JSON201
		msg := fmt.Sprintf("%s promotional credit (ledger entry %d", money(e.AmountMinor, e.Currency), e.Id)
		if resp.HTTPResponse.Header.Get("Idempotent-Replayed") == "true" {
			msg += ", given before; not again"
		}
		return msg + ")", nil
	case errorCode(resp.Body) == client.IdempotencyKeyReused:
		// The first run asked for another amount.
		return "given before (with another amount); not again", nil
	}
	return "", apiError(resp.StatusCode(), resp.Body)
}

// readSecret reads a one-line secret from path, without surrounding space.
func readSecret(path string) (string, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	s := strings.TrimSpace(string(raw))
	if s == "" {
		return "", fmt.Errorf("%s is empty", path)
	}
	return s, nil
}
