-- Plugin host: the catalog of installed driver binaries and of their configured
-- instances (one binary may run as several instances, e.g. two MAAS regions).

-- An installed driver binary. sha256 is recorded at install and checked by every
-- launch (go-plugin SecureConfig); a new binary under the same name is an explicit
-- upgrade. api_versions and config_schema are what the binary reported at install,
-- so instances are validated without starting it.
CREATE TABLE plugins (
    name          text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_-]{0,62}$'),
    kind          text NOT NULL CHECK (kind IN ('provisioner', 'payments', 'storage')),
    version       text NOT NULL,
    api_versions  text[] NOT NULL,
    config_schema jsonb NOT NULL,
    sha256        text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    path          text NOT NULL CHECK (path LIKE '/%'),
    installed_at  timestamptz NOT NULL DEFAULT now(),
    installed_by  text NOT NULL,
    enabled       boolean NOT NULL DEFAULT true,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- A configured instance of a plugin. config holds the non-secret values only.
-- secrets is a KMS envelope of a JSON object of the secret fields (NULL when
-- there are none), bound to the instance id; secret_fields names the secret
-- fields that have a value (names only, so listings need no decryption).
-- state is the plugin host's view of the process (stopped, starting, running,
-- failed, or incompatible: no common driver API version), with the reason in
-- state_reason.
CREATE TABLE plugin_instances (
    id            uuid PRIMARY KEY,
    name          text NOT NULL UNIQUE CHECK (name ~ '^[a-z][a-z0-9_-]{0,62}$'),
    plugin        text NOT NULL REFERENCES plugins (name),
    config        jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(config) = 'object'),
    secrets       bytea,
    secret_fields text[] NOT NULL DEFAULT '{}',
    enabled       boolean NOT NULL DEFAULT true,
    state         text NOT NULL DEFAULT 'stopped'
                  CHECK (state IN ('stopped', 'starting', 'running', 'failed', 'incompatible')),
    state_reason  text NOT NULL DEFAULT '',
    api_version   text NOT NULL DEFAULT '',
    restarts      integer NOT NULL DEFAULT 0 CHECK (restarts >= 0),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX plugin_instances_plugin ON plugin_instances (plugin);
