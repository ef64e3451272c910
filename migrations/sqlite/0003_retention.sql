-- Retention sweeps and legal holds.

CREATE TABLE sweeps (
    id            BLOB   PRIMARY KEY,
    dry_run       BOOLEAN NOT NULL,
    status        TEXT   NOT NULL,          -- running | completed | interrupted
    examined      BIGINT NOT NULL DEFAULT 0,
    deleted       BIGINT NOT NULL DEFAULT 0,
    held          BIGINT NOT NULL DEFAULT 0,
    keys_shredded BIGINT NOT NULL DEFAULT 0,
    cutoff        BIGINT NOT NULL,          -- database time the sweep judged expiry by
    started_at    BIGINT NOT NULL,
    finished_at   BIGINT,
    started_by    TEXT   NOT NULL
);
CREATE INDEX sweeps_started ON sweeps (started_at);

CREATE TABLE holds (
    id            BLOB   PRIMARY KEY,
    carrier_id    TEXT,
    subject_index BLOB,
    category      TEXT,
    reason        TEXT   NOT NULL,
    created_at    BIGINT NOT NULL,
    created_by    TEXT   NOT NULL,
    released_at   BIGINT,
    released_by   TEXT
);
CREATE INDEX holds_active ON holds (released_at);

-- Shredding a subject key checks that no consent still uses it.
CREATE INDEX consents_subject_key ON consents (subject_key_id);
