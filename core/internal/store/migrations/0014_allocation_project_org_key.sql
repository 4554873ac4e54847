-- An allocation's project and org are checked with one key, (project, org),
-- instead of one foreign key each: the org must be the project's own (it
-- could differ before), and a create locks one parent row instead of two.
ALTER TABLE projects ADD CONSTRAINT projects_id_org_key UNIQUE (id, org_id);
ALTER TABLE allocations
    DROP CONSTRAINT allocations_org_id_fkey,
    DROP CONSTRAINT allocations_project_id_fkey,
    ADD CONSTRAINT allocations_project_org_fkey FOREIGN KEY (project_id, org_id) REFERENCES projects (id, org_id);
