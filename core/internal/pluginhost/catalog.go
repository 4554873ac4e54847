package pluginhost

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/gpuaas/gpuaas/core/internal/audit"
	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/kms"
	"github.com/gpuaas/gpuaas/core/internal/store"
	"github.com/gpuaas/gpuaas/sdk"
	"github.com/gpuaas/gpuaas/sdk/base"
	"github.com/gpuaas/gpuaas/sdk/payments"
	"github.com/gpuaas/gpuaas/sdk/provisioner"
	"github.com/gpuaas/gpuaas/sdk/storage"
)

// State is where an instance's plugin process stands.
type State string

// Instance states.
const (
	StateStopped  State = "stopped"
	StateStarting State = "starting"
	StateRunning  State = "running"
	StateFailed   State = "failed"
	// StateIncompatible: the plugin and the core share no driver API version.
	StateIncompatible State = "incompatible"
)

// States lists every state.
func States() []State {
	return []State{StateStopped, StateStarting, StateRunning, StateFailed, StateIncompatible}
}

// Plugin is an installed plugin binary.
type Plugin struct {
	Name string
	Kind base.Kind
	// Version is the driver's own release version (Info.DriverVersion).
	Version string
	// APIVersions are the driver API versions the binary implements.
	APIVersions []string
	// SHA256 is the hex checksum recorded at install; every launch checks it.
	SHA256 string
	Path   string
	// Schema is the configuration the plugin accepts.
	Schema      *base.ConfigSchema
	InstalledAt time.Time
	// InstalledBy is the actor who installed (or last upgraded) it.
	InstalledBy string
	Enabled     bool
}

// Instance is a configured instance of a plugin, with its runtime state.
// It never holds a secret value.
type Instance struct {
	ID            uuid.UUID
	Name          string
	Plugin        string
	Kind          base.Kind
	PluginVersion string
	// Config holds the non-secret values as configured (defaults not filled in).
	Config map[string]any
	// SecretFields names the secret fields that hold a value.
	SecretFields  []string
	Enabled       bool
	PluginEnabled bool
	State         State
	StateReason   string
	// APIVersion is the driver API version negotiated at the last start.
	APIVersion string
	// Restarts counts restarts after the plugin process crashed.
	Restarts  int
	UpdatedAt time.Time
	// PID is the plugin process in this core, 0 when there is none.
	PID int
}

// RedactedConfig is the instance's configuration fit for display: the
// non-secret values, and "<redacted>" for every secret field that holds a
// value.
func (i *Instance) RedactedConfig() map[string]any {
	out := make(map[string]any, len(i.Config)+len(i.SecretFields))
	maps.Copy(out, i.Config)
	for _, f := range i.SecretFields {
		out[f] = "<redacted>"
	}
	return out
}

// InstallRequest installs the binary at Path.
type InstallRequest struct {
	Path string
	// Upgrade allows replacing an installed plugin of the same name whose
	// binary has another checksum.
	Upgrade bool
}

var nameRE = regexp.MustCompile(`^[a-z][a-z0-9_-]{0,62}$`)

// hostAPIVersions are the driver API versions this core speaks for kind.
func hostAPIVersions(kind base.Kind) []string {
	switch kind {
	case base.KindProvisioner:
		return provisioner.SupportedAPIVersions()
	case base.KindPayments:
		return payments.SupportedAPIVersions()
	case base.KindStorage:
		return storage.SupportedAPIVersions()
	}
	return nil
}

func validKind(k base.Kind) bool { return slices.Contains(base.Kinds(), k) }

// Install records the plugin binary at req.Path: it computes the binary's
// SHA-256, starts it once (with that checksum as SecureConfig) to read its
// Info and ConfigSchema, and stores them. Installing the same binary again
// is a no-op (the path is updated if it moved). A binary whose Info names
// an installed plugin with another checksum is refused with
// CodeUpgradeRequired unless req.Upgrade is set; an upgrade restarts the
// plugin's running instances on the new binary. Every change writes an
// audit row with the actor in ctx.
func (h *Host) Install(ctx context.Context, req InstallRequest) (*Plugin, error) {
	path, err := filepath.Abs(req.Path)
	if err != nil || req.Path == "" {
		return nil, errcode.New(errcode.ValidationFailed, "path: not a usable file path").WithDetails("field", "path")
	}
	fi, err := os.Stat(path)
	switch {
	case err != nil:
		return nil, errcode.Wrap(err, errcode.ValidationFailed, fmt.Sprintf("path: cannot read %s", path)).WithDetails("field", "path")
	case !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0:
		return nil, errcode.New(errcode.ValidationFailed, "path: %s is not an executable file", path).WithDetails("field", "path")
	}
	sum, err := sdk.FileSHA256(path)
	if err != nil {
		return nil, fmt.Errorf("pluginhost: install: %w", err)
	}
	info, schema, err := h.probe(ctx, path, sum)
	if err != nil {
		return nil, err
	}
	schemaJSON, err := json.Marshal(schema)
	if err != nil {
		return nil, fmt.Errorf("pluginhost: install: schema: %w", err)
	}
	pl := &Plugin{
		Name: info.Name, Kind: info.Kind, Version: info.DriverVersion, APIVersions: info.APIVersions,
		SHA256: hex.EncodeToString(sum), Path: path, Schema: schema, InstalledBy: actor(ctx), Enabled: true,
	}
	upgraded := false
	err = store.Transact(ctx, h.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		upgraded = false
		old, err := scanPlugin(tx.QueryRow(ctx, selectPlugin+` WHERE name = $1 FOR UPDATE`, pl.Name))
		if errors.Is(err, pgx.ErrNoRows) {
			err = tx.QueryRow(ctx, `INSERT INTO plugins
				(name, kind, version, api_versions, config_schema, sha256, path, installed_by)
				VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING installed_at`,
				pl.Name, string(pl.Kind), pl.Version, pl.APIVersions, schemaJSON, pl.SHA256, pl.Path, pl.InstalledBy,
			).Scan(&pl.InstalledAt)
			if store.IsUniqueViolation(err, "") {
				return errcode.Wrap(err, errcode.Conflict, fmt.Sprintf("plugin %q was installed concurrently; retry", pl.Name))
			}
			if err != nil {
				return fmt.Errorf("insert plugin: %w", err)
			}
			return audit.Record(ctx, tx, audit.Entry{Action: ActionInstall, Target: h.ids.Platform("plugin", pl.Name),
				Details: map[string]any{"kind": pl.Kind, "version": pl.Version, "sha256": pl.SHA256, "path": pl.Path}})
		}
		if err != nil {
			return err
		}
		if old.SHA256 == pl.SHA256 {
			if old.Path == pl.Path {
				*pl = *old
				return nil
			}
			if _, err := tx.Exec(ctx, `UPDATE plugins SET path = $2, updated_at = now() WHERE name = $1`, pl.Name, pl.Path); err != nil {
				return fmt.Errorf("update plugin path: %w", err)
			}
			moved := *old
			moved.Path = pl.Path
			*pl = moved
			return audit.Record(ctx, tx, audit.Entry{Action: ActionInstall, Target: h.ids.Platform("plugin", pl.Name),
				Details: map[string]any{"sha256": pl.SHA256, "path": pl.Path, "previous_path": old.Path}})
		}
		if !req.Upgrade {
			return errcode.New(CodeUpgradeRequired,
				"plugin %q is installed from another binary (version %s, sha256 %s); install this one (version %s, sha256 %s) as an upgrade",
				pl.Name, old.Version, old.SHA256, pl.Version, pl.SHA256).
				WithDetails("installed_sha256", old.SHA256).WithDetails("sha256", pl.SHA256)
		}
		if old.Kind != pl.Kind {
			return errcode.New(CodeKindMismatch, "plugin %q is a %s plugin; the new binary is a %s plugin", pl.Name, old.Kind, pl.Kind)
		}
		err = tx.QueryRow(ctx, `UPDATE plugins SET version = $2, api_versions = $3, config_schema = $4, sha256 = $5,
				path = $6, installed_by = $7, installed_at = now(), updated_at = now()
			WHERE name = $1 RETURNING installed_at, enabled`,
			pl.Name, pl.Version, pl.APIVersions, schemaJSON, pl.SHA256, pl.Path, pl.InstalledBy,
		).Scan(&pl.InstalledAt, &pl.Enabled)
		if err != nil {
			return fmt.Errorf("upgrade plugin: %w", err)
		}
		upgraded = true
		return audit.Record(ctx, tx, audit.Entry{Action: ActionUpgrade, Target: h.ids.Platform("plugin", pl.Name),
			Details: map[string]any{"version": pl.Version, "sha256": pl.SHA256, "path": pl.Path,
				"previous_version": old.Version, "previous_sha256": old.SHA256}})
	})
	if err != nil {
		return nil, h.wrap("install", err)
	}
	if upgraded {
		h.log.Info("plugin upgraded", "plugin", pl.Name, "version", pl.Version, "sha256", pl.SHA256)
		if err := h.resetPluginInstances(ctx, pl.Name, "plugin upgraded"); err != nil {
			return nil, err
		}
	} else {
		h.log.Info("plugin installed", "plugin", pl.Name, "kind", pl.Kind, "version", pl.Version, "sha256", pl.SHA256)
	}
	return pl, nil
}

// probe starts the binary once and reads its Info and ConfigSchema.
func (h *Host) probe(ctx context.Context, path string, sum []byte) (*base.Info, *base.ConfigSchema, error) {
	client, err := h.newClient(path, sum, h.log.Named("install"))
	if err != nil {
		return nil, nil, fmt.Errorf("pluginhost: install: %w", err)
	}
	defer client.Kill()
	// Every kind's server registers the base service, so any kind's client
	// can ask a binary of unknown kind for its Info.
	d, err := sdk.Dispense(client, base.KindProvisioner)
	if err != nil {
		return nil, nil, errcode.Wrap(err, CodeInvalidPlugin,
			fmt.Sprintf("%s did not start as a gpuaas plugin: %s", path, startFailure(err, h.startTimeout))).WithDetails("field", "path")
	}
	cctx, cancel := context.WithTimeout(ctx, h.startTimeout)
	defer cancel()
	info, err := d.Info(cctx)
	if err != nil {
		return nil, nil, errcode.Wrap(err, CodeInvalidPlugin, fmt.Sprintf("%s: Info failed: %v", path, err))
	}
	switch {
	case !nameRE.MatchString(info.Name):
		return nil, nil, errcode.New(CodeInvalidPlugin, "%s reports the name %q, which does not match %s", path, info.Name, nameRE)
	case !validKind(info.Kind):
		return nil, nil, errcode.New(CodeInvalidPlugin, "%s reports the unknown kind %q", path, info.Kind)
	case info.DriverVersion == "":
		return nil, nil, errcode.New(CodeInvalidPlugin, "%s reports no driver version", path)
	}
	if _, err := base.NegotiateAPIVersion(hostAPIVersions(info.Kind), info.APIVersions); err != nil {
		return nil, nil, errcode.Wrap(err, CodeIncompatible, fmt.Sprintf("plugin %q: %v", info.Name, err))
	}
	schema, err := d.ConfigSchema(cctx)
	if err != nil {
		return nil, nil, errcode.Wrap(err, CodeInvalidPlugin, fmt.Sprintf("%s: ConfigSchema failed: %v", path, err))
	}
	if err := schema.Validate(); err != nil {
		return nil, nil, errcode.Wrap(err, CodeInvalidPlugin, fmt.Sprintf("plugin %q: %v", info.Name, err))
	}
	return info, schema, nil
}

// Plugins lists the installed plugins by name.
func (h *Host) Plugins(ctx context.Context) ([]Plugin, error) {
	rows, err := h.pool.Query(ctx, selectPlugin+` ORDER BY name`)
	if err != nil {
		return nil, h.wrap("list plugins", err)
	}
	defer rows.Close()
	var out []Plugin
	for rows.Next() {
		p, err := scanPlugin(rows)
		if err != nil {
			return nil, h.wrap("list plugins", err)
		}
		out = append(out, *p)
	}
	if err := rows.Err(); err != nil {
		return nil, h.wrap("list plugins", err)
	}
	return out, nil
}

// Plugin returns the named plugin.
func (h *Host) Plugin(ctx context.Context, name string) (*Plugin, error) {
	p, err := scanPlugin(h.pool.QueryRow(ctx, selectPlugin+` WHERE name = $1`, name))
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, errcode.New(CodePluginNotFound, "no plugin %q is installed", name)
	}
	if err != nil {
		return nil, h.wrap("plugin", err)
	}
	return p, nil
}

// SetPluginEnabled enables or disables a plugin. A disabled plugin's
// instances stop and do not start until it is enabled again.
func (h *Host) SetPluginEnabled(ctx context.Context, name string, enabled bool) (*Plugin, error) {
	var pl *Plugin
	changed := false
	err := store.Transact(ctx, h.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		p, err := scanPlugin(tx.QueryRow(ctx, selectPlugin+` WHERE name = $1 FOR UPDATE`, name))
		if errors.Is(err, pgx.ErrNoRows) {
			return errcode.New(CodePluginNotFound, "no plugin %q is installed", name)
		}
		if err != nil {
			return err
		}
		pl, changed = p, p.Enabled != enabled
		if !changed {
			return nil
		}
		if _, err := tx.Exec(ctx, `UPDATE plugins SET enabled = $2, updated_at = now() WHERE name = $1`, name, enabled); err != nil {
			return fmt.Errorf("update plugin: %w", err)
		}
		pl.Enabled = enabled
		action := ActionDisable
		if enabled {
			action = ActionEnable
		}
		return audit.Record(ctx, tx, audit.Entry{Action: action, Target: h.ids.Platform("plugin", name)})
	})
	if err != nil {
		return nil, h.wrap("set plugin enabled", err)
	}
	if changed {
		reason := "plugin disabled"
		if enabled {
			reason = "plugin enabled"
		}
		if err := h.resetPluginInstances(ctx, name, reason); err != nil {
			return nil, err
		}
	}
	return pl, nil
}

// Configure creates the instance named instance of plugin pluginName, or
// reconfigures it. config is validated against the plugin's schema; a bad
// field is errcode.ValidationFailed with details "field" and "reason".
// Secret fields are encrypted at rest and never returned. On
// reconfiguration a secret field absent from config keeps its stored value
// (clients never see secrets, so they cannot send them back); a secret
// field set to nil is cleared. A running instance restarts with the new
// configuration.
func (h *Host) Configure(ctx context.Context, instance, pluginName string, config map[string]any) (*Instance, error) {
	if !nameRE.MatchString(instance) {
		return nil, errcode.New(errcode.ValidationFailed, "instance name %q does not match %s", instance, nameRE).
			WithDetails("field", "name").WithDetails("reason", "invalid name")
	}
	pl, err := h.Plugin(ctx, pluginName)
	if err != nil {
		return nil, err
	}
	created := false
	err = store.Transact(ctx, h.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		var (
			id       uuid.UUID
			owner    string
			sealed   []byte
			existing = true
		)
		err := tx.QueryRow(ctx, `SELECT id, plugin, secrets FROM plugin_instances WHERE name = $1 FOR UPDATE`, instance).
			Scan(&id, &owner, &sealed)
		switch {
		case errors.Is(err, pgx.ErrNoRows):
			existing = false
			if id, err = uuid.NewV7(); err != nil {
				return fmt.Errorf("instance id: %w", err)
			}
		case err != nil:
			return fmt.Errorf("read instance: %w", err)
		case owner != pl.Name:
			return errcode.New(CodeInstanceConflict, "instance %q belongs to plugin %q, not %q", instance, owner, pl.Name)
		}
		created = !existing

		raw := make(map[string]any, len(config))
		maps.Copy(raw, config)
		secret := map[string]bool{}
		for _, f := range pl.Schema.SecretFields() {
			secret[f] = true
		}
		if len(sealed) > 0 {
			stored, err := h.openSecrets(ctx, id, sealed)
			if err != nil {
				return err
			}
			for k, v := range stored {
				if _, given := raw[k]; !given && secret[k] {
					raw[k] = v
				}
			}
		}
		cfg, err := base.ValidateConfig(pl.Schema, raw)
		if err != nil {
			return validationError(pl.Schema, err)
		}
		public, secrets := map[string]any{}, map[string]any{}
		for k, v := range cfg.Values() {
			switch {
			case secret[k]:
				secrets[k] = v
			case raw[k] != nil:
				public[k] = v
			}
		}
		publicJSON, err := json.Marshal(public)
		if err != nil {
			return fmt.Errorf("config: %w", err)
		}
		secretNames := slices.Sorted(maps.Keys(secrets))
		if secretNames == nil {
			secretNames = []string{}
		}
		sealed = nil
		if len(secrets) > 0 {
			plain, err := json.Marshal(secrets)
			if err != nil {
				return fmt.Errorf("secrets: %w", err)
			}
			sealed, err = kms.Seal(ctx, h.keys, plain, secretsAAD(id))
			clear(plain)
			if err != nil {
				return fmt.Errorf("encrypt secrets: %w", err)
			}
		}
		if existing {
			_, err = tx.Exec(ctx, `UPDATE plugin_instances SET config = $2, secrets = $3, secret_fields = $4,
					state = 'stopped', state_reason = 'reconfigured', updated_at = now()
				WHERE id = $1`, id, publicJSON, sealed, secretNames)
		} else {
			_, err = tx.Exec(ctx, `INSERT INTO plugin_instances (id, name, plugin, config, secrets, secret_fields)
				VALUES ($1, $2, $3, $4, $5, $6)`, id, instance, pl.Name, publicJSON, sealed, secretNames)
			if store.IsUniqueViolation(err, "") {
				return errcode.Wrap(err, errcode.Conflict, fmt.Sprintf("instance %q was created concurrently; retry", instance))
			}
		}
		if err != nil {
			return fmt.Errorf("write instance: %w", err)
		}
		return audit.Record(ctx, tx, audit.Entry{Action: ActionConfigure, Target: h.ids.Platform("plugin_instance", instance),
			Details: map[string]any{"plugin": pl.Name, "created": !existing,
				"fields": slices.Sorted(maps.Keys(public)), "secret_fields": secretNames}})
	})
	if err != nil {
		return nil, h.wrap("configure", err)
	}
	if created {
		h.log.Info("instance configured", "instance", instance, "plugin", pl.Name)
	} else {
		h.log.Info("instance reconfigured", "instance", instance, "plugin", pl.Name)
		if p := h.existingProc(instance); p != nil {
			p.reset(StateStopped, "reconfigured")
		}
	}
	return h.Instance(ctx, instance)
}

// validationError turns a schema validation error into
// errcode.ValidationFailed naming the field. The reason of a secret field
// never quotes its value.
func validationError(schema *base.ConfigSchema, err error) error {
	var ce *base.ConfigError
	if !errors.As(err, &ce) {
		return errcode.Wrap(err, errcode.ValidationFailed, "configuration is invalid")
	}
	reason := ce.Reason
	if f := schema.Field(ce.Field); f != nil && f.Secret() && reason != "required" && !strings.HasPrefix(reason, "want ") {
		reason = "invalid value"
	}
	return errcode.New(errcode.ValidationFailed, "config field %q: %s", ce.Field, reason).
		WithDetails("field", ce.Field).WithDetails("reason", reason)
}

// secretsAAD binds an instance's secrets envelope to the instance.
func secretsAAD(id uuid.UUID) []byte {
	return []byte("gpuaas/plugin_instances/" + id.String() + "/secrets")
}

// openSecrets decrypts an instance's secret values.
func (h *Host) openSecrets(ctx context.Context, id uuid.UUID, sealed []byte) (map[string]any, error) {
	plain, err := kms.Open(ctx, h.keys, sealed, secretsAAD(id))
	if err != nil {
		return nil, fmt.Errorf("decrypt the secrets of instance %s: %w", id, err)
	}
	defer clear(plain)
	out := map[string]any{}
	if err := decodeJSON(plain, &out); err != nil {
		return nil, fmt.Errorf("decode the secrets of instance %s: %w", id, err)
	}
	return out, nil
}

// decodeJSON decodes keeping integers exact.
func decodeJSON(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	return dec.Decode(v)
}

// Instance returns the named instance.
func (h *Host) Instance(ctx context.Context, name string) (*Instance, error) {
	r, err := h.loadInstance(ctx, name)
	if err != nil {
		return nil, err
	}
	inst := r.public()
	h.addRuntime(&inst)
	return &inst, nil
}

// Instances lists every instance by name, with its state.
func (h *Host) Instances(ctx context.Context) ([]Instance, error) {
	rows, err := h.pool.Query(ctx, selectInstance+` ORDER BY i.name`)
	if err != nil {
		return nil, h.wrap("list instances", err)
	}
	defer rows.Close()
	var out []Instance
	for rows.Next() {
		r, err := scanInstance(rows)
		if err != nil {
			return nil, h.wrap("list instances", err)
		}
		inst := r.public()
		h.addRuntime(&inst)
		out = append(out, inst)
	}
	if err := rows.Err(); err != nil {
		return nil, h.wrap("list instances", err)
	}
	return out, nil
}

// addRuntime fills in what only this process knows.
func (h *Host) addRuntime(inst *Instance) {
	if p := h.existingProc(inst.Name); p != nil {
		inst.PID = p.pid()
	}
}

// SetInstanceEnabled enables or disables an instance. Disabling stops its
// process; enabling clears a failure so the next call (or, after Start, the
// host at once) starts it again.
func (h *Host) SetInstanceEnabled(ctx context.Context, name string, enabled bool) (*Instance, error) {
	changed := false
	err := store.Transact(ctx, h.pool, store.TxOptions{}, func(tx pgx.Tx) error {
		var was bool
		err := tx.QueryRow(ctx, `SELECT enabled FROM plugin_instances WHERE name = $1 FOR UPDATE`, name).Scan(&was)
		if errors.Is(err, pgx.ErrNoRows) {
			return errcode.New(CodeInstanceNotFound, "no plugin instance %q", name)
		}
		if err != nil {
			return fmt.Errorf("read instance: %w", err)
		}
		if changed = was != enabled; !changed {
			return nil
		}
		reason, action := "disabled", ActionInstanceDisable
		if enabled {
			reason, action = "enabled", ActionInstanceEnable
		}
		if _, err := tx.Exec(ctx, `UPDATE plugin_instances SET enabled = $2, state = 'stopped', state_reason = $3,
			updated_at = now() WHERE name = $1`, name, enabled, reason); err != nil {
			return fmt.Errorf("update instance: %w", err)
		}
		return audit.Record(ctx, tx, audit.Entry{Action: action, Target: h.ids.Platform("plugin_instance", name)})
	})
	if err != nil {
		return nil, h.wrap("set instance enabled", err)
	}
	if changed {
		reason := "disabled"
		if enabled {
			reason = "enabled"
		}
		h.proc(name).reset(StateStopped, reason)
	}
	return h.Instance(ctx, name)
}

// resetPluginInstances restarts (or stops) every instance of a plugin after
// the plugin changed.
func (h *Host) resetPluginInstances(ctx context.Context, pluginName, reason string) error {
	rows, err := h.pool.Query(ctx, `SELECT name FROM plugin_instances WHERE plugin = $1`, pluginName)
	if err != nil {
		return h.wrap("list instances", err)
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return h.wrap("list instances", err)
	}
	for _, n := range names {
		if p := h.existingProc(n); p != nil {
			p.reset(StateStopped, reason)
		} else if _, err := h.pool.Exec(ctx, `UPDATE plugin_instances SET state = 'stopped', state_reason = $2,
			updated_at = now() WHERE name = $1 AND state <> 'stopped'`, n, reason); err != nil {
			return h.wrap("reset instance", err)
		}
	}
	return nil
}

// wrap keeps coded errors as they are and wraps others with the operation.
func (h *Host) wrap(op string, err error) error {
	if errcode.As(err) != nil {
		return err
	}
	return store.Classify(fmt.Errorf("pluginhost: %s: %w", op, err))
}

const selectPlugin = `SELECT name, kind, version, api_versions, config_schema, sha256, path,
	installed_at, installed_by, enabled FROM plugins`

func scanPlugin(row pgx.Row) (*Plugin, error) {
	var (
		p      Plugin
		kind   string
		schema []byte
	)
	if err := row.Scan(&p.Name, &kind, &p.Version, &p.APIVersions, &schema, &p.SHA256, &p.Path,
		&p.InstalledAt, &p.InstalledBy, &p.Enabled); err != nil {
		return nil, err
	}
	p.Kind = base.Kind(kind)
	p.Schema = &base.ConfigSchema{}
	if err := decodeJSON(schema, p.Schema); err != nil {
		return nil, fmt.Errorf("plugin %q: stored schema: %w", p.Name, err)
	}
	return &p, nil
}

// instanceRow is an instance with what starting it needs: its plugin's
// binary and schema, and the sealed secrets.
type instanceRow struct {
	Instance
	path    string
	sha256  string
	schema  *base.ConfigSchema
	secrets []byte
}

const selectInstance = `SELECT i.id, i.name, i.plugin, p.kind, p.version, i.config, i.secrets, i.secret_fields,
	i.enabled, p.enabled, i.state, i.state_reason, i.api_version, i.restarts, i.updated_at,
	p.path, p.sha256, p.config_schema
	FROM plugin_instances i JOIN plugins p ON p.name = i.plugin`

func scanInstance(row pgx.Row) (*instanceRow, error) {
	var (
		r                    instanceRow
		kind, state          string
		configJSON, schemaJS []byte
	)
	if err := row.Scan(&r.ID, &r.Name, &r.Plugin, &kind, &r.PluginVersion, &configJSON, &r.secrets, &r.SecretFields,
		&r.Enabled, &r.PluginEnabled, &state, &r.StateReason, &r.APIVersion, &r.Restarts, &r.UpdatedAt,
		&r.path, &r.sha256, &schemaJS); err != nil {
		return nil, err
	}
	r.Kind, r.State = base.Kind(kind), State(state)
	r.Config = map[string]any{}
	if err := decodeJSON(configJSON, &r.Config); err != nil {
		return nil, fmt.Errorf("instance %q: stored config: %w", r.Name, err)
	}
	r.schema = &base.ConfigSchema{}
	if err := decodeJSON(schemaJS, r.schema); err != nil {
		return nil, fmt.Errorf("instance %q: stored schema: %w", r.Name, err)
	}
	sort.Strings(r.SecretFields)
	return &r, nil
}

func (r *instanceRow) public() Instance { return r.Instance }

// loadInstance reads the named instance.
func (h *Host) loadInstance(ctx context.Context, name string) (*instanceRow, error) {
	r, err := scanInstance(h.pool.QueryRow(ctx, selectInstance+` WHERE i.name = $1`, name))
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, errcode.New(CodeInstanceNotFound, "no plugin instance %q", name)
	}
	if err != nil {
		return nil, h.wrap("read instance", err)
	}
	return r, nil
}
