-- The caps of a create count an org's live allocations and sum their GPUs,
-- per project: with the project and the GPU count in the index, that count
-- reads the index alone (an index-only scan) instead of fetching every live
-- allocation's row, once vacuum has marked the rows' pages all-visible.
DROP INDEX allocations_org_live;
CREATE INDEX allocations_org_live ON allocations (org_id) INCLUDE (project_id, gpus) WHERE state NOT IN ('released', 'failed');
