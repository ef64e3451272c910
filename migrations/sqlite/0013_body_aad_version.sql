-- Which associated data a record's body is sealed with. Version 1 bound the
-- id, carrier, category, direction, occurrence and retention; version 2
-- (every record written from now on) binds every metadata column as well:
-- purpose, legal basis, jurisdiction, consent reference, recorded_at,
-- recorded_by, call key and duration. Existing records keep version 1 and
-- stay readable; adding a column with a constant default rewrites no row.
ALTER TABLE transfers ADD COLUMN aad_version SMALLINT NOT NULL DEFAULT 1;
