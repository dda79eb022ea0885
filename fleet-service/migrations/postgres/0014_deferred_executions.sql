-- Deferred executions (postgres). Keep in step with ../sqlite/0014_deferred_executions.sql.
--
-- An execution is `deferred` when its wave reached its device while the device could not take
-- part: `offline`, `never_connected`, `no_update_agent` (online, but it never reported a
-- firmware version) or `quarantined`. Set and kept current by the rollout engine; NULL for
-- every other status. Deferred executions are not counted in the wave; the device converges
-- when it becomes reachable. Nothing to backfill: the engine's next pass defers what needs it.
ALTER TABLE deployment_executions ADD COLUMN deferred_reason TEXT NULL;
