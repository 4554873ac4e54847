-- Identity and tenancy: users, orgs, projects, memberships, service accounts,
-- API keys, local credentials, sessions, invitations and OIDC login states.

CREATE TABLE users (
    id                uuid PRIMARY KEY,
    email             text NOT NULL DEFAULT '',
    email_verified    boolean NOT NULL DEFAULT false,
    display_name      text NOT NULL DEFAULT '',
    oidc_issuer       text,
    oidc_subject      text,
    is_platform_admin boolean NOT NULL DEFAULT false,
    status            text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    last_login_at     timestamptz,
    CHECK ((oidc_issuer IS NULL) = (oidc_subject IS NULL))
);
CREATE UNIQUE INDEX users_oidc ON users (oidc_issuer, oidc_subject) WHERE oidc_issuer IS NOT NULL;
CREATE INDEX users_email ON users (lower(email)) WHERE email <> '';

-- Local accounts (embedded default): one login per user, argon2id hash.
CREATE TABLE local_credentials (
    user_id       uuid PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    login         text NOT NULL,
    password_hash text NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX local_credentials_login ON local_credentials (lower(login));

CREATE TABLE orgs (
    id         uuid PRIMARY KEY,
    slug       text NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9-]{1,62}$'),
    name       text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE org_memberships (
    org_id     uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role       text NOT NULL CHECK (role IN ('owner', 'admin', 'billing', 'member')),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, user_id)
);
CREATE INDEX org_memberships_user ON org_memberships (user_id);

CREATE TABLE projects (
    id         uuid PRIMARY KEY,
    org_id     uuid NOT NULL REFERENCES orgs (id),
    slug       text NOT NULL CHECK (slug ~ '^[a-z0-9][a-z0-9-]{1,62}$'),
    name       text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, slug),
    UNIQUE (id, org_id)
);

CREATE TABLE project_memberships (
    project_id uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role       text NOT NULL CHECK (role IN ('admin', 'member', 'viewer')),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, user_id)
);
CREATE INDEX project_memberships_user ON project_memberships (user_id);

-- Invitations to an org by email, accepted when a user with that verified email
-- signs in (or is added directly when one already exists).
CREATE TABLE invitations (
    id          uuid PRIMARY KEY,
    org_id      uuid NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    email       text NOT NULL,
    role        text NOT NULL CHECK (role IN ('owner', 'admin', 'billing', 'member')),
    invited_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    accepted_at timestamptz,
    accepted_by uuid REFERENCES users (id)
);
CREATE UNIQUE INDEX invitations_open ON invitations (org_id, lower(email)) WHERE accepted_at IS NULL;

-- Service accounts: machine identities of one project (and so one org).
CREATE TABLE service_accounts (
    id          uuid PRIMARY KEY,
    org_id      uuid NOT NULL,
    project_id  uuid NOT NULL,
    name        text NOT NULL CHECK (name ~ '^[a-z0-9][a-z0-9-]{1,62}$'),
    description text NOT NULL DEFAULT '',
    role        text NOT NULL CHECK (role IN ('admin', 'member', 'viewer')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    disabled_at timestamptz,
    FOREIGN KEY (project_id, org_id) REFERENCES projects (id, org_id) ON DELETE CASCADE,
    UNIQUE (project_id, name)
);

-- API keys of users and service accounts. The secret is shown once; only its
-- SHA-256 is kept. The prefix identifies the key in lists and logs.
CREATE TABLE api_keys (
    id                 uuid PRIMARY KEY,
    prefix             text NOT NULL UNIQUE,
    secret_hash        bytea NOT NULL,
    name               text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    user_id            uuid REFERENCES users (id) ON DELETE CASCADE,
    service_account_id uuid REFERENCES service_accounts (id) ON DELETE CASCADE,
    created_at         timestamptz NOT NULL DEFAULT now(),
    created_by         text NOT NULL,
    expires_at         timestamptz,
    revoked_at         timestamptz,
    last_used_at       timestamptz,
    CHECK ((user_id IS NULL) <> (service_account_id IS NULL))
);
CREATE INDEX api_keys_user ON api_keys (user_id) WHERE user_id IS NOT NULL;
CREATE INDEX api_keys_sa ON api_keys (service_account_id) WHERE service_account_id IS NOT NULL;

-- Sessions of local accounts: opaque access and refresh tokens, hashed.
CREATE TABLE sessions (
    id                 uuid PRIMARY KEY,
    user_id            uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    access_hash        bytea NOT NULL UNIQUE,
    refresh_hash       bytea NOT NULL UNIQUE,
    access_expires_at  timestamptz NOT NULL,
    refresh_expires_at timestamptz NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    revoked_at         timestamptz
);
CREATE INDEX sessions_user ON sessions (user_id);

-- Browser OIDC logins in progress: state → PKCE verifier and nonce.
CREATE TABLE oidc_login_states (
    state         text PRIMARY KEY,
    code_verifier text NOT NULL,
    nonce         text NOT NULL,
    redirect_uri  text NOT NULL,
    return_to     text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL
);
