-- A sweep batch deletes the slots of its records itself (returning the data
-- keys that sealed them, which it must check for shredding) and their
-- lookup rows, and only then the records. The statement-level trigger of
-- migration 0007 would probe both tables again for every deleted record
-- and find nothing. A transaction that has deleted the children of exactly
-- the records it deletes says so for that one statement
-- (`ledger.children_deleted`, set local and reset right after); every other
-- delete of transfers still has its children deleted here.
CREATE OR REPLACE FUNCTION transfers_delete_children() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('ledger.children_deleted', true) = 'on' THEN
        RETURN NULL;
    END IF;
    DELETE FROM transfer_slots WHERE transfer_id IN (SELECT id FROM deleted_transfers);
    DELETE FROM subject_lookup WHERE transfer_id IN (SELECT id FROM deleted_transfers);
    RETURN NULL;
END
$$;
