-- A running sweep's lease: when it last renewed it (each batch does, first
-- thing in its transaction), and on PostgreSQL the backend holding its
-- session lock. A sweep whose lease has gone stale (its process frozen,
-- not dead, so the lock outlives it) can then be taken over: the next sweep
-- ends that backend, which releases the lock, and the stale sweep's next
-- batch finds itself interrupted.
ALTER TABLE sweeps ADD COLUMN renewed_at BIGINT;
ALTER TABLE sweeps ADD COLUMN lock_pid INTEGER;
