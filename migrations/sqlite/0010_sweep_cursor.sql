-- A sweep walks the expired records in (retain_until, id) order and starts
-- each batch after the last one it took. Restarting from the oldest expiry
-- instead made every batch step over the index entries of the records the
-- batches before it had deleted (on PostgreSQL they stay in the index until
-- vacuum): quadratic in the records a sweep deletes.
DROP INDEX transfers_retain_until;
CREATE INDEX transfers_retain_until ON transfers (retain_until, id);
