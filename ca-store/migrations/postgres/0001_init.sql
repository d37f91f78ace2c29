-- Times are Unix seconds (certificates, clusters, requests, CRLs) or milliseconds (audit).
CREATE TABLE clusters (
    name                 TEXT PRIMARY KEY,
    environment          TEXT NOT NULL,
    trust_domain         TEXT NOT NULL,
    status               TEXT NOT NULL,
    request_id           TEXT NOT NULL,
    enrolment_token_hash TEXT,
    enrolment_expires_at BIGINT,
    enrolled_at          BIGINT,
    created_by           TEXT NOT NULL,
    created_at           BIGINT NOT NULL
);

CREATE TABLE certificates (
    serial            TEXT PRIMARY KEY,
    issuer            TEXT NOT NULL,
    cluster           TEXT,
    profile           TEXT NOT NULL,
    subject           TEXT NOT NULL,
    sans              TEXT NOT NULL,
    not_before        BIGINT NOT NULL,
    not_after         BIGINT NOT NULL,
    fingerprint       TEXT NOT NULL UNIQUE,
    requester         TEXT NOT NULL,
    pem               TEXT NOT NULL,
    issued_at         BIGINT NOT NULL,
    revoked_at        BIGINT,
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
    requested_at BIGINT NOT NULL,
    status       TEXT NOT NULL,
    decided_by   TEXT,
    decided_at   BIGINT
);

CREATE TABLE crls (
    issuer      TEXT PRIMARY KEY,
    number      BIGINT NOT NULL,
    this_update BIGINT NOT NULL,
    next_update BIGINT NOT NULL,
    der         TEXT NOT NULL
);

CREATE TABLE audit_log (
    seq       BIGINT PRIMARY KEY,
    time      BIGINT NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    subject   TEXT NOT NULL,
    details   TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);

CREATE TABLE audit_checkpoints (
    seq                 BIGINT PRIMARY KEY,
    hash                TEXT NOT NULL,
    time                BIGINT NOT NULL,
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
    expires_at BIGINT NOT NULL
);
