-- What a pending erasure (an erasure that a legal hold kept from finishing)
-- still has to erase: the subject's records recorded up to its completion,
-- not those recorded since, which are another matter (a new request). The
-- pending erasures of earlier versions take their request's completion.
ALTER TABLE erasures_pending ADD COLUMN cutoff BIGINT;
UPDATE erasures_pending SET cutoff = (
    SELECT r.completed_at FROM subject_requests r WHERE r.id = erasures_pending.request_id);
