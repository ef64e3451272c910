-- Core ledger. Times are microseconds since the Unix epoch, UTC; ids are
-- UUIDv7. Personal data lives only in the sealed columns.

CREATE TABLE keyring (
    purpose    TEXT    NOT NULL,            -- 'master' | 'blind_index'
    version    BIGINT  NOT NULL,
    wrapped    BYTEA    NOT NULL,            -- sealed under the root key
    created_at BIGINT  NOT NULL,
    PRIMARY KEY (purpose, version)
);

CREATE TABLE subject_keys (
    id             UUID   PRIMARY KEY,
    carrier_id     TEXT   NOT NULL,
    blind_index    BYTEA   NOT NULL,
    master_version BIGINT NOT NULL,
    wrapped_key    BYTEA   NOT NULL,         -- sealed under master key `master_version`
    created_at     BIGINT NOT NULL,
    CONSTRAINT subject_keys_carrier_blind_index UNIQUE (carrier_id, blind_index)
);
CREATE INDEX subject_keys_master_version ON subject_keys (master_version);

CREATE TABLE transfers (
    id                UUID   PRIMARY KEY,
    carrier_id        TEXT   NOT NULL,
    direction         TEXT   NOT NULL,
    category          TEXT   NOT NULL,
    purpose           TEXT   NOT NULL,
    legal_basis       TEXT   NOT NULL,
    jurisdiction      TEXT   NOT NULL,
    consent_reference TEXT,
    occurred_at       BIGINT NOT NULL,
    recorded_at       BIGINT NOT NULL,
    retain_until      BIGINT NOT NULL,
    recorded_by       TEXT   NOT NULL,
    idempotency_key   TEXT,
    request_hash      BYTEA,
    body              BYTEA   NOT NULL,      -- sealed under the record's content key
    CONSTRAINT transfers_idempotency UNIQUE (carrier_id, idempotency_key)
);
CREATE INDEX transfers_log ON transfers (occurred_at, id);
CREATE INDEX transfers_carrier_log ON transfers (carrier_id, occurred_at, id);
CREATE INDEX transfers_category_log ON transfers (category, occurred_at, id);
CREATE INDEX transfers_retain_until ON transfers (retain_until);

-- One row per data subject of a record: the content key and that subject's
-- identifiers, sealed under the subject's key.
CREATE TABLE transfer_slots (
    transfer_id    UUID NOT NULL REFERENCES transfers (id) ON DELETE CASCADE,
    slot           TEXT NOT NULL,
    subject_key_id UUID NOT NULL REFERENCES subject_keys (id),
    sealed         BYTEA NOT NULL,
    PRIMARY KEY (transfer_id, slot)
);
CREATE INDEX transfer_slots_subject_key ON transfer_slots (subject_key_id);

-- Blind index of every identifier of every record, newest first per subject.
CREATE TABLE subject_lookup (
    blind_index BYTEA   NOT NULL,
    occurred_at BIGINT NOT NULL,
    transfer_id UUID   NOT NULL REFERENCES transfers (id) ON DELETE CASCADE,
    PRIMARY KEY (blind_index, occurred_at, transfer_id)
);
CREATE INDEX subject_lookup_transfer ON subject_lookup (transfer_id);

CREATE TABLE consents (
    carrier_id         TEXT   NOT NULL,
    reference          TEXT   NOT NULL,
    kind               TEXT   NOT NULL,
    customer_tenant_id TEXT,
    subject_index      BYTEA,
    subject_key_id     UUID REFERENCES subject_keys (id) ON DELETE SET NULL,
    subject_sealed     BYTEA,
    countries          TEXT   NOT NULL,     -- comma-separated ISO 3166-1 alpha-2
    status             TEXT   NOT NULL,
    granted_at         BIGINT NOT NULL,
    status_changed_at  BIGINT NOT NULL,
    created_at         BIGINT NOT NULL,
    created_by         TEXT   NOT NULL,
    -- References are per carrier: one carrier cannot learn another's.
    CONSTRAINT consents_pkey PRIMARY KEY (carrier_id, reference)
);
CREATE INDEX consents_subject_index ON consents (subject_index);
