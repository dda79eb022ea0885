-- At most one active or paused deployment per cohort (sqlite). Keep in step with
-- ../postgres/0012_one_live_deployment.sql.
--
-- The check in the creating transaction alone let concurrent creates on PostgreSQL (READ
-- COMMITTED) each see no live deployment. Any duplicates such a race left are ended first,
-- keeping the newest live deployment of each cohort.
UPDATE deployments
SET state = 'canceled',
    state_reason = 'canceled: another deployment of the cohort was live at the same time',
    revision = revision + 1,
    finished_at = updated_at
WHERE state IN ('active', 'paused')
  AND id NOT IN (
    SELECT MAX(id) FROM deployments WHERE state IN ('active', 'paused') GROUP BY cohort_id
  );

CREATE UNIQUE INDEX deployments_one_live ON deployments (cohort_id)
WHERE state IN ('active', 'paused');
