-- The catalog of node shapes tenants can rent. Prices apply to new allocations;
-- usage records keep the price they started with.
CREATE TABLE skus (
    id                       text PRIMARY KEY CHECK (id ~ '^[a-z0-9][a-z0-9-]{1,62}$'),
    gpu_model                text NOT NULL CHECK (length(gpu_model) BETWEEN 1 AND 100),
    gpus_per_node            integer NOT NULL CHECK (gpus_per_node BETWEEN 1 AND 64),
    cpu_cores                integer NOT NULL CHECK (cpu_cores BETWEEN 1 AND 4096),
    memory_gib               integer NOT NULL CHECK (memory_gib BETWEEN 1 AND 1048576),
    disk_gib                 integer NOT NULL CHECK (disk_gib BETWEEN 1 AND 10485760),
    price_per_gpu_hour_minor bigint NOT NULL CHECK (price_per_gpu_hour_minor BETWEEN 0 AND 100000000),
    currency                 text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    active                   boolean NOT NULL DEFAULT true,
    description              text NOT NULL DEFAULT '',
    created_at               timestamptz NOT NULL DEFAULT now(),
    updated_at               timestamptz NOT NULL DEFAULT now()
);
