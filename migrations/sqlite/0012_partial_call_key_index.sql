-- Reconciliation matches call detail records with call durations, the two
-- categories that carry `duration_seconds`, and both of its queries say
-- `duration_seconds IS NOT NULL`. The call-key index held an entry for every
-- record, call quality records and number assignments included: one b-tree
-- insert at every write and a delete at every sweep that no query read.
-- Rebuilding it holds writes to `transfers` for the build (about 2 seconds
-- per million records on the reference machine).
DROP INDEX transfers_call_key;
CREATE INDEX transfers_call_key ON transfers (carrier_id, category, call_key, occurred_at, duration_seconds)
    WHERE duration_seconds IS NOT NULL;
