-- Browser terminal: single-use tokens, the sessions that count against each
-- principal's limit, the port of each node's sshd, and the host key the
-- terminal pinned for an allocation.

-- The port the node's sshd listens on (the host is nodes.hostname).
ALTER TABLE nodes ADD COLUMN ssh_port integer NOT NULL DEFAULT 22 CHECK (ssh_port BETWEEN 1 AND 65535);

-- Single-use tokens, bound to a principal and an allocation; only a hash is
-- kept. Consuming one sets used_at in the same statement that reads it.
CREATE TABLE terminal_tokens (
    token_sha256  bytea PRIMARY KEY,
    allocation_id uuid NOT NULL REFERENCES allocations (id),
    actor_type    text NOT NULL CHECK (actor_type IN ('user', 'service_account')),
    actor_id      uuid NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    used_at       timestamptz
);
CREATE INDEX terminal_tokens_expiry ON terminal_tokens (expires_at);

-- Open sessions of every core and terminal gateway. Each process refreshes
-- seen_at of its own sessions; a row not refreshed for a while belongs to a
-- process that died and no longer counts.
CREATE TABLE terminal_sessions (
    id            uuid PRIMARY KEY,
    allocation_id uuid NOT NULL REFERENCES allocations (id),
    actor         text NOT NULL,
    instance      uuid NOT NULL,
    opened_at     timestamptz NOT NULL DEFAULT now(),
    seen_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX terminal_sessions_actor ON terminal_sessions (actor, seen_at);
CREATE INDEX terminal_sessions_instance ON terminal_sessions (instance);

-- The node's SSH host key, pinned at the allocation's first terminal session
-- (a node is reimaged between tenants, so the pin lives with the allocation).
CREATE TABLE terminal_host_keys (
    allocation_id uuid PRIMARY KEY REFERENCES allocations (id),
    public_key    text NOT NULL,
    pinned_at     timestamptz NOT NULL DEFAULT now()
);
