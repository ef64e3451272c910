-- The database keeps the chain: an entry is stored only if it follows the
-- append cursor (its seq one past the cursor's, its prev_hash the cursor's
-- hash), and storing it moves the cursor. An append that guessed the head
-- (a standalone audited read, in one statement) is refused, not forked,
-- when another append got there first; the service then appends again
-- under the cursor's lock.

CREATE TRIGGER audit_log_follows_head BEFORE INSERT ON audit_log
WHEN NOT EXISTS (
    SELECT 1 FROM audit_head WHERE id = 1 AND seq = NEW.seq - 1 AND hash = NEW.prev_hash
)
BEGIN
    SELECT CASE
        WHEN EXISTS (SELECT 1 FROM audit_head WHERE id = 1)
        THEN RAISE(ABORT, 'audit_head moved: the entry does not follow the end of the chain')
        ELSE RAISE(ABORT, 'audit_head is missing: the append cursor row was deleted')
    END;
END;

CREATE TRIGGER audit_log_moves_head AFTER INSERT ON audit_log
BEGIN
    UPDATE audit_head SET seq = NEW.seq, hash = NEW.hash WHERE id = 1;
END;
