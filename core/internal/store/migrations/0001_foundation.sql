-- Foundation: outbox, inbox, audit log, policy overrides, idempotency keys.

-- Append-only guard shared by every table whose rows must never change.
CREATE FUNCTION gpuaas_forbid_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% on % is not allowed: the table is append-only', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

-- Outbox: every state change that others must hear about writes a row here in the
-- same transaction; the relay publishes it to JetStream with Nats-Msg-Id = id.
CREATE TABLE outbox (
    id              uuid PRIMARY KEY,
    subject         text NOT NULL CHECK (subject <> ''),
    payload         jsonb NOT NULL,
    headers         jsonb NOT NULL DEFAULT '{}',
    correlation_id  text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'published', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text NOT NULL DEFAULT '',
    published_at    timestamptz
);
CREATE INDEX outbox_pending ON outbox (next_attempt_at, id) WHERE status = 'pending';
CREATE INDEX outbox_published ON outbox (published_at) WHERE status = 'published';
CREATE INDEX outbox_failed ON outbox (created_at) WHERE status = 'failed';

-- Wake relays at commit: NOTIFY is delivered when the inserting transaction commits,
-- and duplicates within one transaction collapse into one.
CREATE FUNCTION outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gpuaas_outbox', '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

-- Inbox: the message ids a durable consumer has processed, so a redelivery is a no-op.
CREATE TABLE inbox (
    consumer     text NOT NULL,
    message_id   text NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX inbox_processed_at ON inbox (processed_at);

-- Audit log: one row per mutation by any principal. Append-only.
CREATE TABLE audit_log (
    id             uuid PRIMARY KEY,
    occurred_at    timestamptz NOT NULL DEFAULT now(),
    actor_type     text NOT NULL CHECK (actor_type IN ('user', 'service_account', 'admin', 'driver', 'agent', 'system', 'anonymous')),
    actor_id       text NOT NULL,
    action         text NOT NULL CHECK (action <> ''),
    target         text NOT NULL CHECK (target LIKE 'gpuaas:%'),
    org_id         text NOT NULL DEFAULT '',
    project_id     text NOT NULL DEFAULT '',
    result         text NOT NULL CHECK (result IN ('success', 'failure', 'denied')),
    correlation_id text NOT NULL DEFAULT '',
    source_ip      inet,
    details        jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_time ON audit_log (occurred_at DESC, id DESC);
CREATE INDEX audit_log_actor ON audit_log (actor_type, actor_id, occurred_at DESC);
CREATE INDEX audit_log_target ON audit_log (target, occurred_at DESC);
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION gpuaas_forbid_change();

-- Policy overrides: typed keys have defaults in code; rows here override them
-- globally, per org or per project (most specific wins).
CREATE TABLE policy_overrides (
    scope      text NOT NULL CHECK (scope IN ('global', 'org', 'project')),
    scope_id   text NOT NULL DEFAULT '',
    key        text NOT NULL,
    value      jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by text NOT NULL,
    PRIMARY KEY (scope, scope_id, key),
    CHECK ((scope = 'global') = (scope_id = ''))
);

-- Idempotency keys: the first response to a POST with Idempotency-Key, replayed byte
-- for byte on a retry by the same principal.
CREATE TABLE idempotency_keys (
    principal        text NOT NULL,
    key              text NOT NULL,
    method           text NOT NULL,
    path             text NOT NULL,
    request_hash     text NOT NULL,
    state            text NOT NULL CHECK (state IN ('in_flight', 'completed')),
    status_code      integer,
    response_headers jsonb,
    response_body    bytea,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    PRIMARY KEY (principal, key)
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);
