-- Times are Unix seconds (certificates, clusters, requests, CRLs) or milliseconds (audit).
CREATE TABLE clusters (
    name                 TEXT PRIMARY KEY,
    environment          TEXT NOT NULL,
    trust_domain         TEXT NOT NULL,
    status               TEXT NOT NULL,
    request_id           TEXT NOT NULL,
    enrolment_token_hash TEXT,
    enrolment_expires_at INTEGER,
    enrolled_at          INTEGER,
    created_by           TEXT NOT NULL,
    created_at           INTEGER NOT NULL
);

CREATE TABLE certificates (
    serial            TEXT PRIMARY KEY,
    issuer            TEXT NOT NULL,
    cluster           TEXT,
    profile           TEXT NOT NULL,
    subject           TEXT NOT NULL,
    sans              TEXT NOT NULL,
    not_before        INTEGER NOT NULL,
    not_after         INTEGER NOT NULL,
    fingerprint       TEXT NOT NULL UNIQUE,
    requester         TEXT NOT NULL,
    pem               TEXT NOT NULL,
    issued_at         INTEGER NOT NULL,
    revoked_at        INTEGER,
    revocation_reason TEXT
);
CREATE INDEX certificates_cluster ON certificates (cluster);
CREATE INDEX certificates_issuer ON certificates (issuer);
CREATE INDEX certificates_not_after ON certificates (not_after);

CREATE TABLE approval_requests (
    id           TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,
    subject      TEXT NOT NULL,
    payload      TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    requested_at INTEGER NOT NULL,
    status       TEXT NOT NULL,
    decided_by   TEXT,
    decided_at   INTEGER
);

CREATE TABLE crls (
    issuer      TEXT PRIMARY KEY,
    number      INTEGER NOT NULL,
    this_update INTEGER NOT NULL,
    next_update INTEGER NOT NULL,
    der         TEXT NOT NULL
);

CREATE TABLE audit_log (
    seq       INTEGER PRIMARY KEY,
    time      INTEGER NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    subject   TEXT NOT NULL,
    details   TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);

CREATE TABLE audit_checkpoints (
    seq                 INTEGER PRIMARY KEY,
    hash                TEXT NOT NULL,
    time                INTEGER NOT NULL,
    key_id              TEXT NOT NULL,
    signature           TEXT NOT NULL,
    signature_algorithm TEXT NOT NULL
);

CREATE TABLE audit_keys (
    key_id   TEXT PRIMARY KEY,
    spki_pem TEXT NOT NULL
);

CREATE TABLE leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
