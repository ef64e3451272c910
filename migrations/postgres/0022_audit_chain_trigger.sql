-- The database keeps the chain: an entry is stored only if it follows the
-- append cursor (its seq one past the cursor's, its prev_hash the cursor's
-- hash), and storing it moves the cursor. The cursor's row is locked
-- (FOR UPDATE) until the transaction ends, so an append that guessed the
-- head (a standalone audited read, in one statement) waits for any append
-- under way and is then refused, not forked, if that one got there first;
-- the service then appends again under the cursor's lock.

CREATE FUNCTION audit_log_follows_head() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    head_seq  BIGINT;
    head_hash BYTEA;
BEGIN
    SELECT seq, hash INTO head_seq, head_hash FROM audit_head WHERE id = 1 FOR UPDATE;
    IF NOT FOUND OR NEW.seq <> head_seq + 1 OR NEW.prev_hash <> head_hash THEN
        RAISE EXCEPTION 'audit_head moved: the entry does not follow the end of the chain';
    END IF;
    UPDATE audit_head SET seq = NEW.seq, hash = NEW.hash WHERE id = 1;
    RETURN NEW;
END;
$$;

CREATE TRIGGER audit_log_follows_head BEFORE INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_follows_head();
