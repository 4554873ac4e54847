-- Project storage: objects in the storage driver's bucket under
-- orgs/{org}/projects/{project}/{path}, mirrored here. Paths compare byte by
-- byte (COLLATE "C"), as S3 keys do, so a listing walks them in key order.

-- One row per object: files, and folders (paths ending in '/': the zero-byte
-- markers mkdir writes). id names the object in audit rows and survives
-- renames.
CREATE TABLE storage_objects (
    project_id   uuid NOT NULL REFERENCES projects (id),
    path         text COLLATE "C" NOT NULL CHECK (path <> '' AND octet_length(path) <= 1024),
    id           uuid NOT NULL,
    org_id       uuid NOT NULL REFERENCES orgs (id),
    size         bigint NOT NULL CHECK (size >= 0),
    etag         text NOT NULL,
    content_type text NOT NULL DEFAULT '',
    created_by   text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, path)
);

-- Per project: what its objects hold, what uploads in flight have reserved
-- against the quota, and the GB-month meter. Every change of bytes_used first
-- adds bytes_used × seconds since accrued_at to byte_seconds (not billed yet).
-- Once per window (billed_until) the meter bills byte_seconds × price + carry,
-- in whole minor units, and keeps the rest of a unit in carry (in units of
-- 1/GiB-month of a minor unit, an integer), so no fraction is ever lost.
CREATE TABLE storage_usage (
    project_id     uuid PRIMARY KEY REFERENCES projects (id),
    org_id         uuid NOT NULL REFERENCES orgs (id),
    bytes_used     bigint NOT NULL DEFAULT 0 CHECK (bytes_used >= 0),
    objects        bigint NOT NULL DEFAULT 0 CHECK (objects >= 0),
    bytes_reserved bigint NOT NULL DEFAULT 0 CHECK (bytes_reserved >= 0),
    byte_seconds   numeric NOT NULL DEFAULT 0 CHECK (byte_seconds >= 0),
    accrued_at     timestamptz NOT NULL DEFAULT now(),
    carry          numeric NOT NULL DEFAULT 0 CHECK (carry >= 0),
    billed_until   timestamptz
);
CREATE INDEX storage_usage_unbilled ON storage_usage (billed_until NULLS FIRST);

-- Operations in flight on a path: uploads (streamed through the core, or
-- presigned and not yet confirmed) holding their quota reservation, and the
-- renames and deletes that hold the path while they work. One per path: a
-- second operation on a busy path is refused. A row whose expires_at passed
-- belongs to a process that died (or a presigned upload never confirmed): the
-- janitor releases it.
CREATE TABLE storage_inflight (
    id           uuid PRIMARY KEY,
    project_id   uuid NOT NULL REFERENCES projects (id),
    org_id       uuid NOT NULL REFERENCES orgs (id),
    path         text COLLATE "C" NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('upload', 'presigned_upload', 'rename', 'delete')),
    reserved     bigint NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    -- presigned uploads: the size the URL is signed for, and the type.
    size         bigint,
    content_type text NOT NULL DEFAULT '',
    created_by   text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    UNIQUE (project_id, path)
);
CREATE INDEX storage_inflight_expiry ON storage_inflight (expires_at);
