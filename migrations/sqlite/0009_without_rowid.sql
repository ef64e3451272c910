-- A record's slots and its subjects' lookup rows are reached only through
-- their primary keys (and one secondary index each). As WITHOUT ROWID
-- tables their rows live in the primary-key b-tree itself instead of a
-- rowid table plus a separate key index: one b-tree fewer to write per row.
-- The ingest's single writer spends its time in b-tree inserts, two or three
-- of these rows per record. Same columns, keys, indexes and foreign keys.

CREATE TABLE transfer_slots_new (
    transfer_id    BLOB NOT NULL REFERENCES transfers (id) ON DELETE CASCADE,
    slot           TEXT NOT NULL,
    subject_key_id BLOB NOT NULL REFERENCES subject_keys (id),
    sealed         BLOB NOT NULL,
    PRIMARY KEY (transfer_id, slot)
) WITHOUT ROWID;
INSERT INTO transfer_slots_new (transfer_id, slot, subject_key_id, sealed)
    SELECT transfer_id, slot, subject_key_id, sealed FROM transfer_slots;
DROP TABLE transfer_slots;
ALTER TABLE transfer_slots_new RENAME TO transfer_slots;
CREATE INDEX transfer_slots_subject_key ON transfer_slots (subject_key_id);

CREATE TABLE subject_lookup_new (
    blind_index BLOB   NOT NULL,
    occurred_at BIGINT NOT NULL,
    transfer_id BLOB   NOT NULL REFERENCES transfers (id) ON DELETE CASCADE,
    PRIMARY KEY (blind_index, occurred_at, transfer_id)
) WITHOUT ROWID;
INSERT INTO subject_lookup_new (blind_index, occurred_at, transfer_id)
    SELECT blind_index, occurred_at, transfer_id FROM subject_lookup;
DROP TABLE subject_lookup;
ALTER TABLE subject_lookup_new RENAME TO subject_lookup;
CREATE INDEX subject_lookup_transfer ON subject_lookup (transfer_id);
