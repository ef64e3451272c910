-- Reconciliation without decrypting every payload: a keyed hash of the call
-- id (HMAC, carrier-scoped) and the call's duration, kept as metadata of
-- call detail records, call quality records and call durations.

ALTER TABLE transfers ADD COLUMN call_key BLOB;
ALTER TABLE transfers ADD COLUMN duration_seconds BIGINT;
CREATE INDEX transfers_call_key ON transfers (carrier_id, category, call_key, occurred_at, duration_seconds);
