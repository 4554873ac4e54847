// Command gpuaas is the gpuaas command-line client.
//
//	gpuaas status            health and readiness of the API
//	gpuaas whoami            the caller and their memberships
//	gpuaas orgs              organizations the caller belongs to
//	gpuaas policy-keys       the platform's policy keys with types and defaults
//	gpuaas plugin install PATH [--upgrade]
//	gpuaas plugin list
//	gpuaas plugin configure INSTANCE PLUGIN CONFIG.json
//	gpuaas skus              SKUs on offer with their price and free nodes
//	gpuaas ssh-key add NAME PATH_TO_PUBKEY
//	gpuaas ssh-key list
//	gpuaas ssh-key rm ID
//	gpuaas alloc create --project PROJECT_ID --sku SKU [--count N] [--name NAME] [--wait]
//	gpuaas alloc list --project PROJECT_ID [--state STATE]
//	gpuaas alloc get ID
//	gpuaas alloc release ID [--wait]
//	gpuaas dev seed [--maas-url URL --maas-api-key-file FILE --webhook-secret-file FILE [--plugin-path PATH]]
//	                [--instance maas] [--credit-minor 10000]
//
// It finds the API through GPUAAS_API_URL and GPUAAS_TOKEN, taken from the
// environment, or else (when the environment names no API) from .gpuaas/dev.env in this folder or a parent (written by
// `make run`). Every POST carries a random Idempotency-Key, so the CLI repeats a
// POST whose answer was lost (a network error, 502/503/504, or the API still
// running the first try) without doing the work twice.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
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

	"github.com/google/uuid"

	"github.com/gpuaas/gpuaas/sdk/client"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	var exit exitError
	if errors.As(err, &exit) {
		os.Exit(exit.code) // a remote shell's status, as ssh passes it on
	}
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
  skus                                       SKUs on offer with price and free nodes
  ssh-key add NAME PATH_TO_PUBKEY            register an SSH public key
  ssh-key list                               your SSH keys
  ssh-key rm ID                              remove an SSH key
  alloc create --project PROJECT_ID --sku SKU [--count N] [--name NAME] [--wait]
                                             rent nodes; --wait follows them until active or failed
  alloc list --project PROJECT_ID [--state STATE]
                                             a project's allocations, newest first
  alloc get ID                               one allocation, with its ssh command once active
  alloc release ID [--wait]                  give the node back; --wait follows it until released
  terminal ID [--gateway URL]                a shell on an active allocation's node through the
                                             browser terminal (exits with the shell's status)
  dev seed [--maas-url URL --maas-api-key-file FILE --webhook-secret-file FILE [--plugin-path PATH]]
           [--instance maas] [--credit-minor 10000]
                                             development data for make run (safe to run again):
                                             SKUs h100 and l40s, the MAAS driver (installed from
                                             --plugin-path, configured with --maas-url) and the
                                             instance's nodes, org demo with project ml, and its
                                             promotional credit once
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
	apiURL := strings.TrimRight(settings["GPUAAS_API_URL"], "/")
	tok := settings["GPUAAS_TOKEN"]
	c, err := client.NewClientWithResponses(apiURL,
		client.WithHTTPClient(&retrying{hc: &http.Client{Timeout: requestTimeout}, repeats: 3, pause: 500 * time.Millisecond}),
		client.WithRequestEditorFn(func(_ context.Context, req *http.Request) error {
			if tok != "" {
				req.Header.Set("Authorization", "Bearer "+tok)
			}
			if req.Method == http.MethodPost && req.Header.Get(idempotencyKey) == "" {
				req.Header.Set(idempotencyKey, uuid.NewString())
			}
			return nil
		}))
	if err != nil {
		return err
	}
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
	case "skus":
		return skus(ctx, c, stdout)
	case "ssh-key":
		return sshKey(ctx, c, args[1:], stdout)
	case "alloc":
		return alloc(ctx, c, args[1:], stdout)
	case "terminal":
		return terminalCmd(ctx, c, apiURL, args[1:])
	case "dev":
		if len(args) < 2 || args[1] != "seed" {
			return errors.New("dev: want seed")
		}
		return devSeed(ctx, c, apiURL, args[2:], stdout)
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
	// An API named in the environment takes nothing from a dev.env: its token
	// belongs to another API.
	if dir, err := os.Getwd(); err == nil && getenv("GPUAAS_API_URL") == "" {
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

// errorCode is the code in the error envelope of a failed call ("" if none).
func errorCode(body []byte) client.ErrorCode {
	var env client.ErrorEnvelope
	if json.Unmarshal(body, &env) != nil {
		return ""
	}
	return env.Error.Code
}

const (
	idempotencyKey = "Idempotency-Key"
	requestTimeout = 30 * time.Second
)

// retrying sends the CLI's requests, each bounded by the HTTP client's
// timeout. A request with an Idempotency-Key (every POST) is repeated with the
// same key after a network error, a 502/503/504, or a 409 with Retry-After
// (the API is still running the first try): the API replays the first answer
// instead of doing the work again.
type retrying struct {
	hc      *http.Client
	repeats int           // at most, after the first try
	pause   time.Duration // before the first repeat; doubled for each next one
}

var _ client.HttpRequestDoer = (*retrying)(nil)

func (r *retrying) Do(req *http.Request) (*http.Response, error) {
	try, pause := req, r.pause
	for attempt := 0; ; attempt++ {
		resp, err := r.hc.Do(try)
		if attempt == r.repeats || req.Header.Get(idempotencyKey) == "" || req.Context().Err() != nil || !lost(resp, err) {
			return resp, err
		}
		if resp != nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		select {
		case <-req.Context().Done():
			return nil, req.Context().Err()
		case <-time.After(pause):
		}
		pause *= 2
		try = req.Clone(req.Context())
		if req.GetBody != nil {
			if try.Body, err = req.GetBody(); err != nil {
				return nil, err
			}
		}
	}
}

// lost reports whether a request may not have been answered by the core.
func lost(resp *http.Response, err error) bool {
	if err != nil {
		return true
	}
	switch resp.StatusCode {
	case http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return true
	case http.StatusConflict:
		return resp.Header.Get("Retry-After") != ""
	}
	return false
}

// parseFlags parses fs from args, with flags before, between or after the
// positional arguments, and returns the positional arguments.
func parseFlags(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, fmt.Errorf("%s: %w", fs.Name(), err)
		}
		if fs.NArg() == 0 {
			return pos, nil
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
}

// newFlags is a flag set that reports errors to its caller and prints nothing.
func newFlags(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	return fs
}
