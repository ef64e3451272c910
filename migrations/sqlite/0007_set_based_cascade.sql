-- PostgreSQL's migration 0007 replaces the row-by-row ON DELETE CASCADE of
-- transfer_slots and subject_lookup with a statement-level trigger. SQLite
-- keeps its foreign keys: it enforces them inside the deleting statement,
-- and a sweep deletes the children of a batch first, each table in one
-- statement. Nothing changes here; the file keeps the two sets numbered alike.
SELECT 1;
