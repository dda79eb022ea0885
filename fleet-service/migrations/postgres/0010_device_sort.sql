-- Device listings sorted by last seen or creation time (postgres). Keep in step with
-- ../sqlite/0010_device_sort.sql.
--
-- Each index serves one order of GET /api/v1/devices?sort=..., forwards or backwards, and the
-- row comparison its cursor resumes from. A device never seen sorts as last_seen -1.
CREATE INDEX devices_org_seen_order ON devices (org_id, (COALESCE(last_seen, -1)), id);
CREATE INDEX devices_org_created ON devices (org_id, created_at, id);
