-- Device queries (sqlite). Keep in step with ../postgres/0005_device_queries.sql.
--
-- Every fleet query filters on org_id first, so each filter gets an index leading with it and
-- ending with id, so a page of the list is read in cursor order. The tag filter already has
-- device_tags_key_value (key, value, device_id).

CREATE INDEX devices_org_state ON devices (org_id, state, id);
CREATE INDEX devices_org_online ON devices (org_id, online, id);
CREATE INDEX devices_org_product ON devices (org_id, product_id, id);
CREATE INDEX devices_org_cohort ON devices (org_id, cohort_id, id);
CREATE INDEX devices_org_firmware ON devices (org_id, firmware_version, id);
CREATE INDEX devices_org_last_seen ON devices (org_id, last_seen, id);
CREATE INDEX devices_org_cert_not_after ON devices (org_id, cert_not_after);
