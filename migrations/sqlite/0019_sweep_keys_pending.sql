-- A sweep checks the subject keys of the records it deletes once, after its
-- last batch, instead of in every batch that deleted one of their slots
-- (at 20,000 records a batch, a subscriber's key came up in batch after
-- batch, and each time it was locked and probed again). Until that check
-- has run, the sweep's row says so: a batch that deletes records sets
-- `keys_pending`, and the sweep that checks the keys clears it. A sweep
-- killed in between leaves it set, and the next sweep then walks every
-- subject key for those left with nothing to decrypt.
ALTER TABLE sweeps ADD COLUMN keys_pending BOOLEAN NOT NULL DEFAULT FALSE;
