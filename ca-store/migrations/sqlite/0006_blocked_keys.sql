-- Keys revoked for key-compromise or ca-compromise (Boulder's blockedKeys): the SHA-256 of the
-- SubjectPublicKeyInfo DER of the revoked certificate. Nothing is certified for such a key
-- again. Rows are only ever added, in the transaction that records the revocation.
CREATE TABLE blocked_keys (
    spki_sha256  TEXT PRIMARY KEY,
    reason       TEXT NOT NULL,
    source_serial TEXT NOT NULL,
    blocked_by   TEXT NOT NULL,
    blocked_at   BIGINT NOT NULL
);
