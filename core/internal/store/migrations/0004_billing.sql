-- Billing: accounts, the append-only ledger with checkpoints, usage records,
-- payment sessions and provider events.

-- One billing account per org: its currency and the warning state machine. It holds
-- no balance; its row is the lock that serialises ledger writes of one org, so
-- ledger ids of an org are assigned in commit order and checkpoints are exact.
CREATE TABLE billing_accounts (
    org_id              uuid PRIMARY KEY REFERENCES orgs (id),
    currency            text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    customer_ref        text NOT NULL DEFAULT '',
    low_balance_warned  boolean NOT NULL DEFAULT false,
    depleted_since      timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ledger_entries (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org_id          uuid NOT NULL REFERENCES billing_accounts (org_id),
    currency        text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    amount_minor    bigint NOT NULL CHECK (amount_minor <> 0),
    entry_type      text NOT NULL CHECK (entry_type IN ('credit_purchase', 'usage_debit', 'admin_adjustment', 'refund', 'promotional_credit', 'reversal')),
    idempotency_key text NOT NULL UNIQUE,
    reference       text NOT NULL DEFAULT '',
    description     text NOT NULL DEFAULT '',
    reverses        bigint REFERENCES ledger_entries (id),
    created_at      timestamptz NOT NULL DEFAULT now(),
    created_by      text NOT NULL,
    correlation_id  text NOT NULL DEFAULT '',
    CHECK (entry_type <> 'usage_debit' OR amount_minor < 0),
    CHECK (entry_type NOT IN ('credit_purchase', 'promotional_credit') OR amount_minor > 0),
    CHECK (entry_type <> 'refund' OR amount_minor < 0)
);
CREATE INDEX ledger_entries_org ON ledger_entries (org_id, id);
CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION gpuaas_forbid_change();
REVOKE UPDATE, DELETE, TRUNCATE ON ledger_entries FROM PUBLIC;

-- Checkpoints summarise an org's ledger up to an entry id, so a balance read sums
-- only the entries after the latest one. Append-only.
CREATE TABLE ledger_checkpoints (
    org_id        uuid NOT NULL REFERENCES billing_accounts (org_id),
    upto_id       bigint NOT NULL,
    balance_minor bigint NOT NULL,
    entries       bigint NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, upto_id)
);
CREATE TRIGGER ledger_checkpoints_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON ledger_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION gpuaas_forbid_change();

-- Usage: one record per allocation's active period, billed per second. billed_until
-- and carry are progress pointers, not money: the money is in the ledger.
CREATE TABLE usage_records (
    id                       uuid PRIMARY KEY,
    org_id                   uuid NOT NULL REFERENCES billing_accounts (org_id),
    project_id               uuid NOT NULL,
    allocation_id            uuid NOT NULL UNIQUE,
    sku                      text NOT NULL,
    gpus                     integer NOT NULL CHECK (gpus > 0),
    price_per_gpu_hour_minor bigint NOT NULL CHECK (price_per_gpu_hour_minor >= 0),
    currency                 text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    started_at               timestamptz NOT NULL,
    ended_at                 timestamptz,
    billed_until             timestamptz NOT NULL,
    -- The remainder, in 1/3600 of a minor unit, not yet debited.
    carry                    bigint NOT NULL DEFAULT 0 CHECK (carry >= 0 AND carry < 3600),
    billed_minor             bigint NOT NULL DEFAULT 0,
    CHECK (ended_at IS NULL OR ended_at >= started_at),
    CHECK (billed_until >= started_at)
);
CREATE INDEX usage_records_unbilled ON usage_records (billed_until) WHERE ended_at IS NULL OR billed_until < ended_at;
CREATE INDEX usage_records_org ON usage_records (org_id, started_at DESC);

-- Payment sessions: initiated → checkout_completed → credited; initiated → expired;
-- mismatch → failed_reconcile.
CREATE TABLE payment_sessions (
    id                 uuid PRIMARY KEY,
    org_id             uuid NOT NULL REFERENCES billing_accounts (org_id),
    provider_instance  text NOT NULL,
    provider_session   text NOT NULL DEFAULT '',
    amount_minor       bigint NOT NULL CHECK (amount_minor > 0),
    currency           text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    status             text NOT NULL CHECK (status IN ('initiated', 'checkout_completed', 'credited', 'expired', 'failed_reconcile')),
    status_reason      text NOT NULL DEFAULT '',
    checkout_url       text NOT NULL DEFAULT '',
    refunded_minor     bigint NOT NULL DEFAULT 0 CHECK (refunded_minor >= 0),
    created_by         text NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    expires_at         timestamptz
);
CREATE UNIQUE INDEX payment_sessions_provider ON payment_sessions (provider_instance, provider_session) WHERE provider_session <> '';
CREATE INDEX payment_sessions_org ON payment_sessions (org_id, created_at DESC);
CREATE INDEX payment_sessions_attention ON payment_sessions (status, created_at) WHERE status IN ('initiated', 'checkout_completed', 'failed_reconcile');

-- Provider events already handled (by provider event id): a redelivery is a no-op.
CREATE TABLE payment_events (
    provider_instance text NOT NULL,
    event_id          text NOT NULL,
    event_type        text NOT NULL,
    session_id        uuid,
    received_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider_instance, event_id)
);

-- Auto-release requests already made for a depletion (org, depleted_since), so a
-- retried grace-period check requests once.
CREATE TABLE billing_auto_releases (
    org_id         uuid NOT NULL REFERENCES billing_accounts (org_id),
    depleted_since timestamptz NOT NULL,
    requested_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, depleted_since)
);
