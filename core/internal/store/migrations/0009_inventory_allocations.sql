-- Node inventory and allocations.

-- A node is one machine a provisioner instance manages, known to its driver by
-- external_id (a MAAS system id, a host name). Lifecycle (DESIGN.md §5):
-- enrolling → available ⇄ allocated → cleaning → available; any → offline → back;
-- any → retired. A node without a SKU stays enrolling until an admin assigns one.
CREATE TABLE nodes (
    id                   uuid PRIMARY KEY,
    provisioner_instance text NOT NULL,
    external_id          text NOT NULL CHECK (length(external_id) BETWEEN 1 AND 255),
    hostname             text NOT NULL DEFAULT '',
    sku_id               text REFERENCES skus (id),
    state                text NOT NULL CHECK (state IN ('enrolling', 'available', 'allocated', 'cleaning', 'offline', 'retired')),
    state_reason         text NOT NULL DEFAULT '',
    -- The state an offline node returns to when it recovers.
    offline_from         text CHECK (offline_from IN ('enrolling', 'available', 'allocated', 'cleaning')),
    facts                jsonb NOT NULL DEFAULT '{}',
    pool                 text NOT NULL DEFAULT '',
    tags                 text[] NOT NULL DEFAULT '{}',
    enrollment_secret_sha256 bytea,
    healthy              boolean,
    health_message       text NOT NULL DEFAULT '',
    probed_at            timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    UNIQUE (provisioner_instance, external_id),
    CHECK (state IN ('enrolling', 'offline', 'retired') OR sku_id IS NOT NULL),
    CHECK ((state = 'offline') = (offline_from IS NOT NULL))
);
-- The free pool of a SKU, in the order allocations take it.
CREATE INDEX nodes_free ON nodes (sku_id, id) WHERE state = 'available';

-- Allocations: requested → provisioning → active → releasing → released;
-- provisioning → failed; releasing → release_failed → releasing.
CREATE TABLE allocations (
    id                       uuid PRIMARY KEY,
    org_id                   uuid NOT NULL REFERENCES orgs (id),
    project_id               uuid NOT NULL REFERENCES projects (id),
    name                     text NOT NULL DEFAULT '',
    -- No foreign key to skus: every create would take a share lock on the one
    -- row of a popular SKU (a multixact per insert); SKUs are never deleted.
    sku_id                   text NOT NULL,
    node_id                  uuid NOT NULL REFERENCES nodes (id),
    gpus                     integer NOT NULL CHECK (gpus > 0),
    price_per_gpu_hour_minor bigint NOT NULL CHECK (price_per_gpu_hour_minor >= 0),
    currency                 text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    state                    text NOT NULL CHECK (state IN ('requested', 'provisioning', 'active', 'releasing', 'released', 'failed', 'release_failed')),
    state_reason             text NOT NULL DEFAULT '',
    username                 text NOT NULL,
    ssh_public_keys          text[] NOT NULL,
    image                    text NOT NULL DEFAULT '',
    -- Every release attempt has its own workflow and driver operation.
    release_attempt          integer NOT NULL DEFAULT 0,
    release_requested_by     text NOT NULL DEFAULT '',
    created_by               text NOT NULL,
    created_at               timestamptz NOT NULL DEFAULT now(),
    updated_at               timestamptz NOT NULL DEFAULT now(),
    active_at                timestamptz,
    ended_at                 timestamptz
);
-- One node is held by at most one live allocation.
CREATE UNIQUE INDEX allocations_node_live ON allocations (node_id) WHERE state NOT IN ('released', 'failed');
CREATE INDEX allocations_project ON allocations (project_id, id DESC);
-- Caps count an org's live allocations (and, among them, the project's).
CREATE INDEX allocations_org_live ON allocations (org_id) WHERE state NOT IN ('released', 'failed');
CREATE INDEX allocations_state ON allocations (state, updated_at) WHERE state IN ('requested', 'provisioning', 'releasing');
