-- What a pending erasure (an erasure that a legal hold kept from finishing)
-- still has to erase: exactly the held records it found when it completed.
-- Records recorded about the subject since are not its to erase. Pending
-- erasures of earlier versions take the subject's records in their
-- carrier recorded up to a minute after their request's completion (the
-- records' times come from the clocks of the instances that wrote them),
-- and have their subject's key set aside at their next redo.
CREATE TABLE erasures_pending_records (
    request_id  BLOB NOT NULL REFERENCES erasures_pending (request_id) ON DELETE CASCADE,
    transfer_id BLOB NOT NULL,
    PRIMARY KEY (request_id, transfer_id)
) WITHOUT ROWID;
INSERT INTO erasures_pending_records (request_id, transfer_id)
SELECT DISTINCT p.request_id, l.transfer_id
FROM erasures_pending p
JOIN subject_requests r ON r.id = p.request_id
JOIN subject_lookup l ON l.blind_index = p.subject_index
JOIN transfers t ON t.id = l.transfer_id
WHERE t.carrier_id = p.carrier_id AND t.recorded_at <= r.completed_at + 60000000;
-- Whether the subject's key was set aside when the erasure completed (so
-- that later records are sealed under a new one).
ALTER TABLE erasures_pending ADD COLUMN key_set_aside BOOLEAN NOT NULL DEFAULT FALSE;
