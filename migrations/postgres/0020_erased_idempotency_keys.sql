-- A record erased with its subject leaves its idempotency key behind, so
-- that a carrier's retry of the transfer (same key, same content) returns
-- the first result instead of storing the erased data again. Only a keyed
-- hash of the key is kept (the key is the carrier's own text), with what a
-- retry is answered: the record's id, recording time and retention. Kept
-- until the record's retention would have ended; the sweep deletes them.
CREATE TABLE erased_idempotency_keys (
    carrier_id   TEXT   NOT NULL,
    key_hash     BYTEA  NOT NULL,
    transfer_id  UUID   NOT NULL,
    request_hash BYTEA,
    recorded_at  BIGINT NOT NULL,
    retain_until BIGINT NOT NULL,
    PRIMARY KEY (carrier_id, key_hash)
);
CREATE INDEX erased_idempotency_keys_retain_until ON erased_idempotency_keys (retain_until);
