-- PostgreSQL's migration 0018 turns the delete trigger of its migration
-- 0007 into a row trigger that a sweep or an erasure, having deleted the
-- records' children itself, skips. SQLite keeps its foreign keys (see
-- 0007). Nothing changes here; the file keeps the two sets numbered alike.
SELECT 1;
