-- Accrual updates every open usage record once per window. Keep those updates HOT
-- (no index writes): the column that moves every window (billed_until) leaves the
-- indexes, unbilled records are found through a flag that changes once, when the
-- record is fully billed, and pages keep room for the new row versions.
ALTER TABLE usage_records ADD COLUMN settled boolean NOT NULL DEFAULT false;
UPDATE usage_records SET settled = true WHERE ended_at IS NOT NULL AND billed_until >= ended_at;
DROP INDEX usage_records_unbilled;
CREATE INDEX usage_records_unsettled ON usage_records (org_id) WHERE NOT settled;
ALTER TABLE usage_records SET (fillfactor = 70);
