-- Failed processing attempts of a subject request: how many, and the last
-- one's time and public description (never personal data; the detail is in
-- the service log). A request whose processing keeps failing (a record that
-- fails its integrity check, say) used to show only `processing` until it
-- was overdue.
ALTER TABLE subject_requests ADD COLUMN failures BIGINT NOT NULL DEFAULT 0;
ALTER TABLE subject_requests ADD COLUMN last_failure TEXT;
ALTER TABLE subject_requests ADD COLUMN last_failure_at BIGINT;
