-- An erasure clears the subject's earlier access requests and their exports
-- in the carrier's scope (`storage::erasure::forget_subject`). Without this
-- index those statements read every request of the carrier.
CREATE INDEX subject_requests_subject ON subject_requests (carrier_id, subject_index);
