-- Staged rotations (root, environment intermediate, cluster intermediate). `spec` is the JSON
-- plan (old and new roots, certificates and key references, when each stage was entered);
-- `stage` is duplicated out of it so that active rotations can be found by index.
CREATE TABLE rotations (
    id         TEXT PRIMARY KEY,
    kind       TEXT NOT NULL,
    target     TEXT NOT NULL,
    stage      TEXT NOT NULL,
    spec       TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX rotations_stage ON rotations (stage);

-- What each plug-in cluster last reported having installed: the SHA-256 fingerprints of its
-- trust bundle (root-cert.pem) and of its chain (ca-cert.pem, then cert-chain.pem).
CREATE TABLE cluster_reports (
    cluster             TEXT PRIMARY KEY,
    bundle              TEXT NOT NULL,
    chain               TEXT NOT NULL,
    intermediate_serial TEXT NOT NULL,
    reported_at         BIGINT NOT NULL
);
