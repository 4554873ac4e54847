-- What each org and each project holds: its live allocations (not released,
-- not failed) and their GPUs, one row per owner (owner_id is an org's or a
-- project's id). A create adds to the org's and the project's rows, which
-- also serializes the creates of one project and of one org in place of the
-- advisory locks it took before, and reads its caps from them in O(1); a
-- move into a terminal state takes away. The reconciler corrects rows that
-- differ from a count of the live allocations.
CREATE TABLE allocation_holdings (
    owner_id    uuid PRIMARY KEY,
    allocations bigint NOT NULL,
    gpus        bigint NOT NULL
);
INSERT INTO allocation_holdings (owner_id, allocations, gpus)
SELECT org_id, count(*), sum(gpus) FROM allocations WHERE state NOT IN ('released', 'failed') GROUP BY org_id
UNION ALL
SELECT project_id, count(*), sum(gpus) FROM allocations WHERE state NOT IN ('released', 'failed') GROUP BY project_id;
