// Package config reads gpuaasd's settings from the environment and flags (flags win)
// and validates them at start, naming the bad or missing setting.
package config

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Config is everything gpuaasd needs to start.
type Config struct {
	ListenAddr string
	// AgentListenAddr serves the node agent protocol (mTLS); "" disables it.
	AgentListenAddr string
	// AgentTLSCert and AgentTLSKey are the agent listener's certificate files;
	// empty makes a self-signed one under StateDir.
	AgentTLSCert, AgentTLSKey string
	DatabaseURL               string
	NATSURL                   string
	TemporalAddress           string
	TemporalNamespace         string
	Region                    string
	LogFormat                 string
	LogLevel                  string
	MaxBodyBytes              int
	RequestTimeout            time.Duration
	ShutdownTimeout           time.Duration
	DBMaxConns                int
	Migrate                   bool
	// Workers runs the background work (workflows, consumers, reconcilers) in
	// this process; false serves the API only.
	Workers          bool
	LocalAccounts    bool
	OIDC             OIDC
	PaymentsInstance string
	// StorageInstance is the storage driver instance of project storage;
	// StorageTransferTimeout bounds one upload or download through the core.
	StorageInstance        string
	StorageTransferTimeout time.Duration
	// StorageDirect moves object bytes over the driver's presigned URLs.
	StorageDirect bool
	// StateDir holds the local KMS master keys (mode 0700).
	StateDir string
	// TaskQueue prefixes the Temporal task queues and schedule ids of this
	// deployment, so deployments (or tests) sharing a namespace stay apart.
	TaskQueue string
	// PKI chooses the PKI/KMS backend: node certificates, task signing, the
	// SSH CA and the keys that seal secrets at rest.
	PKI PKI
	// TerminalOrigins are the browser origins (scheme://host[:port],
	// lowercase) allowed to open browser terminals.
	TerminalOrigins []string
}

// PKI configures the PKI/KMS backend.
type PKI struct {
	// Backend is "local" (Go crypto, keys under StateDir) or "vault".
	Backend string
	// VaultAddr and either VaultToken or VaultRoleID + VaultSecretID
	// (AppRole) reach Vault.
	VaultAddr, VaultToken, VaultRoleID, VaultSecretID string
	// Mounts, roles and the Transit data key in Vault.
	VaultAppRoleMount, VaultPKIMount, VaultPKIRole string
	VaultTransitMount, VaultDataKey                string
	VaultSSHMount, VaultSSHRole                    string
}

// OIDC configures the identity provider. Issuer empty means none: only API keys
// and local accounts authenticate.
type OIDC struct {
	Issuer       string
	Audience     string
	ClientID     string
	ClientSecret string
	RedirectURL  string
}

// Setting describes one setting for the configuration reference.
type Setting struct {
	Env, Flag, Default, Help string
	Required                 bool
}

// Settings lists every setting, in the order of the README's reference.
func Settings() []Setting {
	return []Setting{
		{"DATABASE_URL", "database-url", "", "Postgres connection URL (postgres://user:pass@host:port/db).", true},
		{"NATS_URL", "nats-url", "", "NATS server URL with JetStream enabled (nats://host:4222).", true},
		{"TEMPORAL_ADDRESS", "temporal-address", "", "Temporal frontend host:port.", true},
		{"TEMPORAL_NAMESPACE", "temporal-namespace", "gpuaas", "Temporal namespace for workflows.", false},
		{"GPUAAS_LISTEN_ADDR", "listen-addr", "127.0.0.1:8080", "HTTP listen address host:port.", false},
		{"GPUAAS_AGENT_LISTEN_ADDR", "agent-listen-addr", "", "Listen address of the node agent protocol (HTTPS with client certificates); empty disables it.", false},
		{"GPUAAS_AGENT_TLS_CERT", "agent-tls-cert", "", "PEM certificate of the agent listener (default: self-signed, kept in GPUAAS_STATE_DIR/agents).", false},
		{"GPUAAS_AGENT_TLS_KEY", "agent-tls-key", "", "PEM key of the agent listener's certificate.", false},
		{"GPUAAS_REGION", "region", "local", "Region name used in canonical resource ids (gpuaas:{region}:...).", false},
		{"GPUAAS_LOG_FORMAT", "log-format", "text", "Log format: text or json.", false},
		{"GPUAAS_LOG_LEVEL", "log-level", "info", "Log level: trace, debug, info, warn, error.", false},
		{"GPUAAS_MAX_BODY_BYTES", "max-body-bytes", "1048576", "Largest accepted JSON request body; larger is 413.", false},
		{"GPUAAS_REQUEST_TIMEOUT", "request-timeout", "30s", "Deadline for one API request.", false},
		{"GPUAAS_SHUTDOWN_TIMEOUT", "shutdown-timeout", "10s", "How long SIGTERM waits for in-flight requests.", false},
		{"GPUAAS_DB_MAX_CONNS", "db-max-conns", "20", "Postgres pool size.", false},
		{"GPUAAS_MIGRATE", "migrate", "true", "Apply database migrations at start.", false},
		{"GPUAAS_WORKERS", "workers", "true", "Run the background workers (Temporal workflows, event consumers, reconcilers) here; false serves the API only, so API and workers scale apart.", false},
		{"GPUAAS_LOCAL_ACCOUNTS", "local-accounts", "false", "Allow password sign-in of local accounts (the embedded default).", false},
		{"GPUAAS_STATE_DIR", "state-dir", "/var/lib/gpuaas", "Folder for the local KMS master keys (created 0700).", false},
		{"GPUAAS_TEMPORAL_TASK_QUEUE", "temporal-task-queue", "gpuaas", "Prefix of the Temporal task queues and schedule ids.", false},
		{"GPUAAS_PAYMENTS_INSTANCE", "payments-instance", "stripe", "Payments driver instance used for top-ups.", false},
		{"GPUAAS_STORAGE_INSTANCE", "storage-instance", "storage", "Storage driver instance that holds project storage.", false},
		{"GPUAAS_STORAGE_TRANSFER_TIMEOUT", "storage-transfer-timeout", "12h", "Longest upload or download through the core (a transfer that stalls for GPUAAS_REQUEST_TIMEOUT ends sooner).", false},
		{"GPUAAS_STORAGE_DIRECT", "storage-direct", "true", "Move object bytes between the core and the store over URLs the storage driver presigns for each transfer (downloads; uploads from 16 MiB as multipart uploads) instead of through the plugin (the store must be reachable from the core; the driver still authorizes every transfer).", false},
		{"GPUAAS_OIDC_ISSUER", "oidc-issuer", "", "OIDC issuer URL of the identity provider (Keycloak, Dex, Okta...); empty disables OIDC.", false},
		{"GPUAAS_OIDC_AUDIENCE", "oidc-audience", "", "Audience bearer tokens must carry (default: the client id).", false},
		{"GPUAAS_OIDC_CLIENT_ID", "oidc-client-id", "", "OIDC client id for the browser sign-in.", false},
		{"GPUAAS_OIDC_CLIENT_SECRET", "oidc-client-secret", "", "OIDC client secret (confidential clients only).", false},
		{"GPUAAS_OIDC_REDIRECT_URL", "oidc-redirect-url", "", "Where the identity provider sends the browser back (the web app's callback).", false},
		{"GPUAAS_PKI_BACKEND", "pki-backend", "", "PKI/KMS backend: local (keys under GPUAAS_STATE_DIR) or vault; default vault when VAULT_ADDR is set, else local.", false},
		{"VAULT_ADDR", "vault-addr", "", "Vault address (https://vault:8200); required with the vault backend.", false},
		{"VAULT_TOKEN", "vault-token", "", "Vault token (renewed while renewable); or use VAULT_ROLE_ID and VAULT_SECRET_ID.", false},
		{"VAULT_ROLE_ID", "vault-role-id", "", "Vault AppRole role id (logs in again when the token reaches its max TTL).", false},
		{"VAULT_SECRET_ID", "vault-secret-id", "", "Vault AppRole secret id.", false},
		{"GPUAAS_VAULT_APPROLE_MOUNT", "vault-approle-mount", "approle", "Vault AppRole auth mount.", false},
		{"GPUAAS_VAULT_PKI_MOUNT", "vault-pki-mount", "pki", "Vault PKI mount that signs node certificates.", false},
		{"GPUAAS_VAULT_PKI_ROLE", "vault-pki-role", "gpuaas-node", "Vault PKI role for node certificates.", false},
		{"GPUAAS_VAULT_TRANSIT_MOUNT", "vault-transit-mount", "transit", "Vault Transit mount (task signing keys, data keys).", false},
		{"GPUAAS_VAULT_DATA_KEY", "vault-data-key", "gpuaas-secrets", "Vault Transit aes256-gcm96 key that wraps the data keys of secrets at rest.", false},
		{"GPUAAS_VAULT_SSH_MOUNT", "vault-ssh-mount", "ssh", "Vault SSH mount (user CA for the browser terminal).", false},
		{"GPUAAS_VAULT_SSH_ROLE", "vault-ssh-role", "gpuaas-terminal", "Vault SSH role for terminal certificates.", false},
		{"GPUAAS_TERMINAL_ALLOWED_ORIGINS", "terminal-allowed-origins", "", "Comma-separated browser origins (https://app.example.com) allowed to open browser terminals; default the origin of GPUAAS_OIDC_REDIRECT_URL. Clients that send no Origin (not browsers) are not checked.", false},
	}
}

// Error names the setting that is bad or missing.
type Error struct {
	Env, Flag string
	Problem   string
}

func (e *Error) Error() string {
	return fmt.Sprintf("config: %s (--%s): %s", e.Env, e.Flag, e.Problem)
}

// Load reads settings from getenv, then from args (flags win), and validates them.
// Usage and flag errors go to stderr.
func Load(args []string, getenv func(string) string, stderr io.Writer) (Config, error) {
	return load(args, getenv, stderr, false)
}

// LoadTerminalGateway is Load for `gpuaasd terminal-gateway`, which reaches
// Postgres and the PKI backend only: NATS_URL and TEMPORAL_ADDRESS may be
// empty.
func LoadTerminalGateway(args []string, getenv func(string) string, stderr io.Writer) (Config, error) {
	return load(args, getenv, stderr, true)
}

func load(args []string, getenv func(string) string, stderr io.Writer, gateway bool) (Config, error) {
	fs := flag.NewFlagSet("gpuaasd", flag.ContinueOnError)
	fs.SetOutput(stderr)
	vals := map[string]*string{}
	for _, s := range Settings() {
		v := getenv(s.Env)
		if v == "" {
			v = s.Default
		}
		p := new(string)
		fs.StringVar(p, s.Flag, v, s.Help+" (env "+s.Env+")")
		vals[s.Env] = p
	}
	if err := fs.Parse(args); err != nil {
		return Config{}, err
	}
	if fs.NArg() > 0 {
		return Config{}, fmt.Errorf("config: unexpected argument %q", fs.Arg(0))
	}
	get := func(env string) string { return strings.TrimSpace(*vals[env]) }
	var c Config
	var errs Errors
	check := func(env string, fn func(string) error) {
		if err := fn(get(env)); err != nil {
			errs = append(errs, &Error{Env: env, Flag: flagOf(env), Problem: err.Error()})
		}
	}
	check("DATABASE_URL", func(v string) error { c.DatabaseURL = v; return validURL(v, "postgres", "postgresql") })
	unused := func(v string) bool { return gateway && v == "" }
	check("NATS_URL", func(v string) error {
		if c.NATSURL = v; unused(v) {
			return nil
		}
		return validNATSURL(v)
	})
	check("TEMPORAL_ADDRESS", func(v string) error {
		if c.TemporalAddress = v; unused(v) {
			return nil
		}
		return validHostPort(v, true)
	})
	check("TEMPORAL_NAMESPACE", func(v string) error { c.TemporalNamespace = v; return validName(v) })
	check("GPUAAS_LISTEN_ADDR", func(v string) error { c.ListenAddr = v; return validHostPort(v, false) })
	check("GPUAAS_AGENT_LISTEN_ADDR", func(v string) error {
		if c.AgentListenAddr = v; v == "" {
			return nil
		}
		return validHostPort(v, false)
	})
	check("GPUAAS_AGENT_TLS_CERT", func(v string) error { c.AgentTLSCert = v; return nil })
	check("GPUAAS_AGENT_TLS_KEY", func(v string) error {
		c.AgentTLSKey = v
		if (v == "") != (c.AgentTLSCert == "") {
			return errors.New("GPUAAS_AGENT_TLS_CERT and GPUAAS_AGENT_TLS_KEY go together")
		}
		return nil
	})
	check("GPUAAS_REGION", func(v string) error { c.Region = v; return validName(v) })
	check("GPUAAS_LOG_FORMAT", func(v string) error { c.LogFormat = v; return oneOf(v, "text", "json") })
	check("GPUAAS_LOG_LEVEL", func(v string) error {
		c.LogLevel = v
		return oneOf(v, "trace", "debug", "info", "warn", "error")
	})
	check("GPUAAS_MAX_BODY_BYTES", func(v string) (err error) { c.MaxBodyBytes, err = intIn(v, 1024, 1<<30); return })
	check("GPUAAS_REQUEST_TIMEOUT", func(v string) (err error) {
		c.RequestTimeout, err = durationIn(v, 100*time.Millisecond, 10*time.Minute)
		return
	})
	check("GPUAAS_SHUTDOWN_TIMEOUT", func(v string) (err error) {
		c.ShutdownTimeout, err = durationIn(v, 0, 5*time.Minute)
		return
	})
	check("GPUAAS_DB_MAX_CONNS", func(v string) (err error) { c.DBMaxConns, err = intIn(v, 2, 1000); return })
	check("GPUAAS_MIGRATE", func(v string) (err error) { c.Migrate, err = strconv.ParseBool(v); return })
	check("GPUAAS_WORKERS", func(v string) (err error) { c.Workers, err = strconv.ParseBool(v); return })
	check("GPUAAS_LOCAL_ACCOUNTS", func(v string) (err error) { c.LocalAccounts, err = strconv.ParseBool(v); return })
	check("GPUAAS_OIDC_ISSUER", func(v string) error {
		c.OIDC.Issuer = v
		if v == "" {
			return nil
		}
		return validURL(v, "https", "http")
	})
	check("GPUAAS_OIDC_CLIENT_ID", func(v string) error {
		c.OIDC.ClientID = v
		if c.OIDC.Issuer != "" && v == "" {
			return errors.New("missing (required when GPUAAS_OIDC_ISSUER is set)")
		}
		return nil
	})
	check("GPUAAS_OIDC_AUDIENCE", func(v string) error {
		c.OIDC.Audience = v
		if v == "" {
			c.OIDC.Audience = c.OIDC.ClientID
		}
		return nil
	})
	check("GPUAAS_STATE_DIR", func(v string) error {
		c.StateDir = v
		if v == "" {
			return errors.New("missing")
		}
		return nil
	})
	check("GPUAAS_TEMPORAL_TASK_QUEUE", func(v string) error { c.TaskQueue = v; return validName(v) })
	check("GPUAAS_PAYMENTS_INSTANCE", func(v string) error { c.PaymentsInstance = v; return validName(v) })
	check("GPUAAS_STORAGE_INSTANCE", func(v string) error { c.StorageInstance = v; return validName(v) })
	check("GPUAAS_STORAGE_DIRECT", func(v string) (err error) { c.StorageDirect, err = strconv.ParseBool(v); return })
	check("GPUAAS_STORAGE_TRANSFER_TIMEOUT", func(v string) (err error) {
		c.StorageTransferTimeout, err = durationIn(v, time.Second, 7*24*time.Hour)
		return
	})
	check("GPUAAS_OIDC_CLIENT_SECRET", func(v string) error { c.OIDC.ClientSecret = v; return nil })
	check("GPUAAS_OIDC_REDIRECT_URL", func(v string) error {
		c.OIDC.RedirectURL = v
		if v == "" {
			return nil
		}
		return validURL(v, "https", "http")
	})
	check("GPUAAS_PKI_BACKEND", func(v string) error {
		if v == "" {
			v = "local"
			if get("VAULT_ADDR") != "" {
				v = "vault"
			}
		}
		c.PKI.Backend = v
		return oneOf(v, "local", "vault")
	})
	vault := c.PKI.Backend == "vault"
	check("VAULT_ADDR", func(v string) error {
		c.PKI.VaultAddr = v
		if v == "" && !vault {
			return nil
		}
		if err := validURL(v, "https", "http"); err != nil {
			if v == "" {
				return errors.New("missing (required when GPUAAS_PKI_BACKEND is vault)")
			}
			return err
		}
		return nil
	})
	check("VAULT_ROLE_ID", func(v string) error { c.PKI.VaultRoleID = v; return nil })
	check("VAULT_SECRET_ID", func(v string) error {
		c.PKI.VaultSecretID = v
		if (c.PKI.VaultRoleID == "") != (v == "") {
			return errors.New("VAULT_ROLE_ID and VAULT_SECRET_ID go together")
		}
		return nil
	})
	check("VAULT_TOKEN", func(v string) error {
		c.PKI.VaultToken = v
		if vault && v == "" && c.PKI.VaultRoleID == "" {
			return errors.New("missing (the vault backend needs VAULT_TOKEN, or VAULT_ROLE_ID and VAULT_SECRET_ID)")
		}
		return nil
	})
	for _, m := range []struct {
		env string
		dst *string
	}{
		{"GPUAAS_VAULT_APPROLE_MOUNT", &c.PKI.VaultAppRoleMount},
		{"GPUAAS_VAULT_PKI_MOUNT", &c.PKI.VaultPKIMount},
		{"GPUAAS_VAULT_PKI_ROLE", &c.PKI.VaultPKIRole},
		{"GPUAAS_VAULT_TRANSIT_MOUNT", &c.PKI.VaultTransitMount},
		{"GPUAAS_VAULT_DATA_KEY", &c.PKI.VaultDataKey},
		{"GPUAAS_VAULT_SSH_MOUNT", &c.PKI.VaultSSHMount},
		{"GPUAAS_VAULT_SSH_ROLE", &c.PKI.VaultSSHRole},
	} {
		check(m.env, func(v string) error { *m.dst = v; return validVaultPath(v) })
	}
	check("GPUAAS_TERMINAL_ALLOWED_ORIGINS", func(v string) (err error) {
		if v == "" && c.OIDC.RedirectURL != "" {
			v = c.OIDC.RedirectURL
		}
		c.TerminalOrigins, err = origins(v)
		return err
	})
	if len(errs) > 0 {
		return Config{}, errs
	}
	return c, nil
}

// origins parses a comma-separated list of URLs into lowercase origins
// (scheme://host[:port]); a URL's path is dropped.
func origins(v string) ([]string, error) {
	var out []string
	for _, part := range strings.Split(v, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		if err := validURL(part, "https", "http"); err != nil {
			return nil, fmt.Errorf("%q: %w", part, err)
		}
		u, _ := url.Parse(part)
		out = append(out, strings.ToLower(u.Scheme+"://"+u.Host))
	}
	return out, nil
}

var vaultPathRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)*$`)

// validVaultPath accepts a Vault mount path or a role or key name.
func validVaultPath(v string) error {
	if !vaultPathRE.MatchString(v) || len(v) > 128 {
		return errors.New("want letters, digits, '_', '.', '-' and '/' between parts")
	}
	return nil
}

// Errors is every bad setting, printed on one line.
type Errors []*Error

func (es Errors) Error() string {
	parts := make([]string, len(es))
	for i, e := range es {
		parts[i] = fmt.Sprintf("%s (--%s): %s", e.Env, e.Flag, e.Problem)
	}
	return "config: " + strings.Join(parts, "; ")
}

func flagOf(env string) string {
	for _, s := range Settings() {
		if s.Env == env {
			return s.Flag
		}
	}
	return ""
}

func validURL(v string, schemes ...string) error {
	if v == "" {
		return errors.New("missing")
	}
	u, err := url.Parse(v)
	if err != nil {
		return errors.New("not a URL") // never echo the value: it may hold a password
	}
	ok := false
	for _, s := range schemes {
		ok = ok || u.Scheme == s
	}
	if !ok {
		return fmt.Errorf("scheme must be %s", strings.Join(schemes, " or "))
	}
	if u.Host == "" {
		return errors.New("no host")
	}
	return nil
}

func validNATSURL(v string) error {
	if v == "" {
		return errors.New("missing")
	}
	for _, part := range strings.Split(v, ",") {
		if err := validURL(strings.TrimSpace(part), "nats", "tls", "ws", "wss"); err != nil {
			return err
		}
	}
	return nil
}

func validHostPort(v string, needHost bool) error {
	if v == "" {
		return errors.New("missing")
	}
	host, port, err := net.SplitHostPort(v)
	if err != nil {
		return errors.New("want host:port")
	}
	if needHost && host == "" {
		return errors.New("want host:port with a host")
	}
	n, err := strconv.Atoi(port)
	if err != nil || n < 0 || n > 65535 {
		return errors.New("port must be 0-65535")
	}
	return nil
}

var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

func validName(v string) error {
	if !nameRE.MatchString(v) {
		return errors.New("want 1-63 lowercase letters, digits or '-'")
	}
	return nil
}

func oneOf(v string, allowed ...string) error {
	for _, a := range allowed {
		if v == a {
			return nil
		}
	}
	return fmt.Errorf("want one of %s", strings.Join(allowed, ", "))
}

func intIn(v string, lo, hi int) (int, error) {
	n, err := strconv.Atoi(v)
	if err != nil {
		return 0, errors.New("want an integer")
	}
	if n < lo || n > hi {
		return 0, fmt.Errorf("want an integer between %d and %d", lo, hi)
	}
	return n, nil
}

func durationIn(v string, lo, hi time.Duration) (time.Duration, error) {
	d, err := time.ParseDuration(v)
	if err != nil {
		return 0, errors.New("want a duration such as 30s")
	}
	if d < lo || d > hi {
		return 0, fmt.Errorf("want a duration between %s and %s", lo, hi)
	}
	return d, nil
}
