-- Data-subject access and erasure requests, and prepared access exports.

CREATE TABLE subject_requests (
    id               BLOB   PRIMARY KEY,
    kind             TEXT   NOT NULL,         -- access | erasure
    carrier_id       TEXT   NOT NULL,
    subject_index    BLOB   NOT NULL,
    -- The identifier, sealed under a master key, while the request needs it;
    -- cleared when an erasure completes or an export expires.
    subject_sealed   BLOB,
    subject_master   BIGINT,
    language         TEXT   NOT NULL,
    status           TEXT   NOT NULL,         -- received | processing | completed
    received_at      BIGINT NOT NULL,
    due_at           BIGINT NOT NULL,
    extended_at      BIGINT,
    extension_reason TEXT,
    completed_at     BIGINT,
    requested_by     TEXT   NOT NULL,
    claimed_at       BIGINT,
    progress         TEXT,                    -- erasure counts so far (JSON)
    receipt          TEXT                     -- signed receipt (JSON)
);
CREATE INDEX subject_requests_status ON subject_requests (status, received_at);
CREATE INDEX subject_requests_carrier ON subject_requests (carrier_id, received_at);

-- A prepared export: the JSON document in sealed chunks under its own key.
CREATE TABLE subject_exports (
    request_id   BLOB   PRIMARY KEY REFERENCES subject_requests (id),
    master       BIGINT NOT NULL,
    wrapped_key  BLOB   NOT NULL,
    chunks       BIGINT NOT NULL,
    size         BIGINT NOT NULL,
    records      BIGINT NOT NULL,
    sha256       BLOB   NOT NULL,
    signature    BLOB   NOT NULL,
    key_id       TEXT   NOT NULL,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL
);
CREATE INDEX subject_exports_expires ON subject_exports (expires_at);

CREATE TABLE subject_export_chunks (
    request_id BLOB   NOT NULL,
    seq        BIGINT NOT NULL,
    sealed     BLOB   NOT NULL,
    PRIMARY KEY (request_id, seq)
);

-- Erasures a legal hold kept from finishing: redone when holds are released.
CREATE TABLE erasures_pending (
    request_id    BLOB   PRIMARY KEY REFERENCES subject_requests (id),
    carrier_id    TEXT   NOT NULL,
    subject_index BLOB   NOT NULL
);
