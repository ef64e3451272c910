-- SQLite's migration 0009 stores transfer_slots and subject_lookup as
-- WITHOUT ROWID tables. PostgreSQL tables are heaps with separate indexes
-- either way: nothing changes here; the file keeps the two sets numbered alike.
SELECT 1;
