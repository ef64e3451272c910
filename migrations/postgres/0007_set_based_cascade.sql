-- Deleting records (retention sweeps, erasures) removed their slots and
-- lookup rows through ON DELETE CASCADE foreign keys, which PostgreSQL
-- enforces row by row: one trigger query per deleted record and per table.
-- That was most of a sweep's time. A statement-level trigger now deletes
-- the children of all the records a statement deleted, in one join per
-- table: the same effect, for every statement that deletes transfers.
-- Slots and lookup rows are only ever written with their record, in the
-- record's transaction.

ALTER TABLE transfer_slots DROP CONSTRAINT transfer_slots_transfer_id_fkey;
ALTER TABLE subject_lookup DROP CONSTRAINT subject_lookup_transfer_id_fkey;

CREATE FUNCTION transfers_delete_children() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM transfer_slots WHERE transfer_id IN (SELECT id FROM deleted_transfers);
    DELETE FROM subject_lookup WHERE transfer_id IN (SELECT id FROM deleted_transfers);
    RETURN NULL;
END
$$;

CREATE TRIGGER transfers_delete_children AFTER DELETE ON transfers
    REFERENCING OLD TABLE AS deleted_transfers
    FOR EACH STATEMENT EXECUTE FUNCTION transfers_delete_children();
