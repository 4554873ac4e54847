-- Node agents: enrollment tokens, the certificates issued to agents, their
-- heartbeats, and the signed tasks they lease.

-- Single-use enrollment tokens, bound to a node; only a hash is kept.
CREATE TABLE node_enrollment_tokens (
    token_sha256 bytea PRIMARY KEY,
    node_id      uuid NOT NULL REFERENCES nodes (id),
    created_by   text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    used_at      timestamptz
);
CREATE INDEX node_enrollment_tokens_node ON node_enrollment_tokens (node_id);

-- Certificates issued to agents (the private keys never leave the nodes).
CREATE TABLE node_certificates (
    serial     text PRIMARY KEY,
    node_id    uuid NOT NULL REFERENCES nodes (id),
    not_after  timestamptz NOT NULL,
    issued_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
CREATE INDEX node_certificates_node ON node_certificates (node_id, issued_at DESC);

ALTER TABLE nodes ADD COLUMN heartbeat_at timestamptz;
ALTER TABLE nodes ADD COLUMN agent_facts jsonb;
-- Certificates issued before this are refused (RevokeNode); enrolling again
-- with a new token issues a newer one.
ALTER TABLE nodes ADD COLUMN agent_revoked_at timestamptz;

-- Tasks: queued → leased → succeeded | failed | expired; a lease that ends
-- without a result returns the task to queued until its attempts are spent.
CREATE TABLE node_tasks (
    id               uuid PRIMARY KEY,
    node_id          uuid NOT NULL REFERENCES nodes (id),
    type             text NOT NULL,
    params           jsonb NOT NULL,
    state            text NOT NULL CHECK (state IN ('queued', 'leased', 'succeeded', 'failed', 'expired')),
    nonce            text NOT NULL,
    key_version      integer NOT NULL,
    signature        bytea NOT NULL,
    expires_at       timestamptz NOT NULL,
    attempts         integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL CHECK (max_attempts > 0),
    lease_expires_at timestamptz,
    output           jsonb,
    error            text NOT NULL DEFAULT '',
    operation_id     text NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
-- The work of one node, in the order it was queued.
CREATE INDEX node_tasks_pending ON node_tasks (node_id, created_at) WHERE state IN ('queued', 'leased');
-- A driver's operation id names one task (a retried enqueue is the same task).
CREATE UNIQUE INDEX node_tasks_operation ON node_tasks (operation_id) WHERE operation_id <> '';

-- Wake the long polls of a node's agent when a task is queued for it.
CREATE FUNCTION node_tasks_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gpuaas_node_tasks', NEW.node_id::text);
    RETURN NULL;
END;
$$;
CREATE TRIGGER node_tasks_notify AFTER INSERT OR UPDATE OF state ON node_tasks
    FOR EACH ROW WHEN (NEW.state = 'queued') EXECUTE FUNCTION node_tasks_notify();
