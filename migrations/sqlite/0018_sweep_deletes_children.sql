-- PostgreSQL's migration 0018 lets a sweep batch that deleted a record's
-- slots and lookup rows itself skip the trigger of migration 0007. SQLite
-- has no such trigger (its sweep deletes the children first, see 0007).
-- Nothing changes here; the file keeps the two sets numbered alike.
SELECT 1;
