// Command gpuaas is the gpuaas command-line client.
//
//	gpuaas status            health and readiness of the API
//	gpuaas whoami            the caller and their memberships
//	gpuaas orgs              organizations the caller belongs to
//	gpuaas policy-keys       the platform's policy keys with types and defaults
//	gpuaas plugin install PATH [--upgrade]
//	gpuaas plugin list
//	gpuaas plugin configure INSTANCE PLUGIN CONFIG.json
//
// It finds the API through GPUAAS_API_URL (and, later, GPUAAS_TOKEN), taken from the
// environment or else from .gpuaas/dev.env in this folder or a parent (written by
// `make run`).
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/gpuaas/gpuaas/sdk/client"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "gpuaas:", err)
		os.Exit(1)
	}
}

const usage = `usage: gpuaas COMMAND

commands:
  status        health and readiness of the API and its dependencies
  whoami        the caller and their memberships
  orgs          organizations the caller belongs to
  policy-keys   the platform's policy keys with types and defaults
  plugin install PATH [--upgrade]            install a driver binary (path on the core's host)
  plugin list                                installed plugins and their instances
  plugin configure INSTANCE PLUGIN CFG.json  create or reconfigure an instance
`

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stdout, usage)
		return nil
	}
	settings, err := loadSettings(getenv)
	if err != nil {
		return err
	}
	if settings["GPUAAS_API_URL"] == "" {
		return errors.New("GPUAAS_API_URL is not set and no .gpuaas/dev.env was found; start the platform with `make run` or export GPUAAS_API_URL")
	}
	var opts []client.ClientOption
	if tok := settings["GPUAAS_TOKEN"]; tok != "" {
		opts = append(opts, client.WithRequestEditorFn(func(_ context.Context, req *http.Request) error {
			req.Header.Set("Authorization", "Bearer "+tok)
			return nil
		}))
	}
	c, err := client.NewClientWithResponses(settings["GPUAAS_API_URL"], opts...)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	switch args[0] {
	case "status":
		return status(ctx, c, stdout)
	case "policy-keys":
		return policyKeys(ctx, c, stdout)
	case "whoami":
		return whoami(ctx, c, stdout)
	case "orgs":
		return orgs(ctx, c, stdout)
	case "plugin":
		return plugin(ctx, c, args[1:], stdout)
	default:
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("unknown command %q", args[0])
	}
}

func status(ctx context.Context, c *client.ClientWithResponses, out io.Writer) error {
	h, err := c.GetHealthzWithResponse(ctx)
	if err != nil {
		return fmt.Errorf("API unreachable: %w", err)
	}
	if h.JSON200 == nil {
		return apiError(h.StatusCode(), h.Body)
	}
	fmt.Fprintf(out, "api       up (version %s)\n", h.JSON200.Version)
	r, err := c.GetReadyzWithResponse(ctx)
	if err != nil {
		return fmt.Errorf("API unreachable: %w", err)
	}
	if r.JSON200 != nil {
		for _, chk := range r.JSON200.Checks {
			fmt.Fprintf(out, "%-9s ok (%.1f ms)\n", chk.Name, chk.DurationMs)
		}
		return nil
	}
	return apiError(r.StatusCode(), r.Body)
}

func policyKeys(ctx context.Context, c *client.ClientWithResponses, out io.Writer) error {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "KEY\tTYPE\tDEFAULT\tSCOPES\tDESCRIPTION")
	var cursor *string
	for {
		limit := 200
		resp, err := c.ListPolicyKeysWithResponse(ctx, &client.ListPolicyKeysParams{Limit: &limit, Cursor: cursor})
		if err != nil {
			return fmt.Errorf("API unreachable: %w", err)
		}
		if resp.JSON200 == nil {
			return apiError(resp.StatusCode(), resp.Body)
		}
		for _, k := range resp.JSON200.Items {
			def, _ := json.Marshal(k.Default)
			scopes := make([]string, len(k.Scopes))
			for i, s := range k.Scopes {
				scopes[i] = string(s)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", k.Key, k.Type, def, strings.Join(scopes, ","), k.Description)
		}
		if resp.JSON200.NextCursor == nil {
			break
		}
		cursor = resp.JSON200.NextCursor
	}
	return tw.Flush()
}

func whoami(ctx context.Context, c *client.ClientWithResponses, out io.Writer) error {
	resp, err := c.GetMeWithResponse(ctx)
	if err != nil {
		return fmt.Errorf("API unreachable: %w", err)
	}
	if resp.JSON200 == nil {
		return apiError(resp.StatusCode(), resp.Body)
	}
	me := resp.JSON200
	name := ""
	if me.Email != nil {
		name = *me.Email
	}
	fmt.Fprintf(out, "%s %s (%s via %s)", me.PrincipalType, me.Id, name, me.AuthMethod)
	if me.IsPlatformAdmin {
		fmt.Fprint(out, " platform-admin")
	}
	fmt.Fprintln(out)
	for _, m := range me.OrgMemberships {
		fmt.Fprintf(out, "  org %s (%s): %s\n", m.OrgSlug, m.OrgId, m.Role)
	}
	for _, m := range me.ProjectMemberships {
		fmt.Fprintf(out, "  project %s (%s): %s\n", m.ProjectSlug, m.ProjectId, m.Role)
	}
	return nil
}

func orgs(ctx context.Context, c *client.ClientWithResponses, out io.Writer) error {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSLUG\tNAME")
	var cursor *string
	for {
		limit := 200
		resp, err := c.ListOrgsWithResponse(ctx, &client.ListOrgsParams{Limit: &limit, Cursor: cursor})
		if err != nil {
			return fmt.Errorf("API unreachable: %w", err)
		}
		if resp.JSON200 == nil {
			return apiError(resp.StatusCode(), resp.Body)
		}
		for _, o := range resp.JSON200.Items {
			fmt.Fprintf(tw, "%s\t%s\t%s\n", o.Id, o.Slug, o.Name)
		}
		if resp.JSON200.NextCursor == nil {
			break
		}
		cursor = resp.JSON200.NextCursor
	}
	return tw.Flush()
}

func plugin(ctx context.Context, c *client.ClientWithResponses, args []string, out io.Writer) error {
	if len(args) == 0 {
		return errors.New("plugin: want install, list or configure")
	}
	switch args[0] {
	case "install":
		if len(args) < 2 {
			return errors.New("plugin install: want PATH")
		}
		path, err := filepath.Abs(args[1])
		if err != nil {
			return err
		}
		upgrade := len(args) > 2 && args[2] == "--upgrade"
		resp, err := c.AdminInstallPluginWithResponse(ctx, client.AdminInstallPluginJSONRequestBody{Path: path, Upgrade: &upgrade})
		if err != nil {
			return fmt.Errorf("API unreachable: %w", err)
		}
		if resp.JSON201 == nil {
			return apiError(resp.StatusCode(), resp.Body)
		}
		p := resp.JSON201
		fmt.Fprintf(out, "installed %s (%s %s) sha256 %s\n", p.Name, p.Kind, p.Version, p.Sha256)
		return nil
	case "list":
		resp, err := c.AdminListPluginsWithResponse(ctx)
		if err != nil {
			return fmt.Errorf("API unreachable: %w", err)
		}
		if resp.JSON200 == nil {
			return apiError(resp.StatusCode(), resp.Body)
		}
		tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "PLUGIN\tKIND\tVERSION\tENABLED\tSHA256")
		for _, p := range resp.JSON200.Items {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%v\t%s\n", p.Name, p.Kind, p.Version, p.Enabled, p.Sha256[:12])
		}
		inst, err := c.AdminListPluginInstancesWithResponse(ctx)
		if err != nil {
			return fmt.Errorf("API unreachable: %w", err)
		}
		if inst.JSON200 == nil {
			return apiError(inst.StatusCode(), inst.Body)
		}
		fmt.Fprintln(tw, "\nINSTANCE\tPLUGIN\tSTATE\tRESTARTS\tREASON")
		for _, i := range inst.JSON200.Items {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\n", i.Name, i.Plugin, i.State, i.Restarts, i.StateReason)
		}
		return tw.Flush()
	case "configure":
		if len(args) != 4 {
			return errors.New("plugin configure: want INSTANCE PLUGIN CONFIG.json")
		}
		raw, err := os.ReadFile(args[3])
		if err != nil {
			return err
		}
		var cfg map[string]any
		if err := json.Unmarshal(raw, &cfg); err != nil {
			return fmt.Errorf("plugin configure: %s: %w", args[3], err)
		}
		resp, err := c.AdminConfigurePluginInstanceWithResponse(ctx, args[1], client.AdminConfigurePluginInstanceJSONRequestBody{Plugin: args[2], Config: cfg})
		if err != nil {
			return fmt.Errorf("API unreachable: %w", err)
		}
		if resp.JSON200 == nil {
			return apiError(resp.StatusCode(), resp.Body)
		}
		fmt.Fprintf(out, "instance %s of %s: %s\n", resp.JSON200.Name, resp.JSON200.Plugin, resp.JSON200.State)
		return nil
	}
	return fmt.Errorf("plugin: unknown command %q", args[0])
}

// apiError renders the error envelope of a failed call.
func apiError(status int, body []byte) error {
	var env client.ErrorEnvelope
	if err := json.Unmarshal(body, &env); err != nil || env.Error.Code == "" {
		return fmt.Errorf("HTTP %d", status)
	}
	msg := fmt.Sprintf("%s (HTTP %d, %s; correlation id %s)", env.Error.Message, status, env.Error.Code, env.Error.CorrelationId)
	if len(env.Error.Details) > 0 {
		d, _ := json.Marshal(env.Error.Details)
		msg += " " + string(d)
	}
	return errors.New(msg)
}

// loadSettings reads GPUAAS_* from .gpuaas/dev.env in the working folder or a
// parent; the environment wins over the file.
func loadSettings(getenv func(string) string) (map[string]string, error) {
	s := map[string]string{}
	if dir, err := os.Getwd(); err == nil {
		for {
			f, err := os.Open(filepath.Join(dir, ".gpuaas", "dev.env"))
			if err == nil {
				sc := bufio.NewScanner(f)
				for sc.Scan() {
					if k, v, ok := strings.Cut(strings.TrimSpace(sc.Text()), "="); ok && !strings.HasPrefix(k, "#") {
						s[k] = v
					}
				}
				f.Close()
				break
			}
			parent := filepath.Dir(dir)
			if parent == dir {
				break
			}
			dir = parent
		}
	}
	for _, k := range []string{"GPUAAS_API_URL", "GPUAAS_TOKEN"} {
		if v := getenv(k); v != "" {
			s[k] = v
		}
	}
	return s, nil
}
