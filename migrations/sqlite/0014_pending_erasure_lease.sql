-- A lease on a pending erasure (one a legal hold kept from finishing): when
-- the instance redoing it last renewed its claim, NULL when none is. Before,
-- every instance redid every pending erasure at once, on every poll, and
-- the audit trail listed the records each of them erased.
ALTER TABLE erasures_pending ADD COLUMN claimed_at BIGINT;
