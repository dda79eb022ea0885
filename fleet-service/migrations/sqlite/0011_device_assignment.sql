-- When an operator last moved the device to another cohort (sqlite). Keep in step with
-- ../postgres/0011_device_assignment.sql.
--
-- The retained devices/{id}/assignment message lives in the broker's memory; on start the
-- platform publishes it again for every device with this set.
ALTER TABLE devices ADD COLUMN assigned_at BIGINT NULL;
