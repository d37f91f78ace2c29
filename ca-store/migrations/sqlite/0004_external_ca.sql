-- External-CA mode: the server holds the cluster intermediate's key (key_ref) and answers
-- Istio's certificate API for the cluster's workloads itself.
ALTER TABLE clusters ADD COLUMN mode TEXT NOT NULL DEFAULT 'plugin';
ALTER TABLE clusters ADD COLUMN key_ref TEXT;

-- Workload certificates: many, short-lived, written in batches. Each row names the audit
-- record that covers it (that record lists the serial and the certificate's SHA-256). Rows
-- are pruned once expired for longer than the retention period; the audit records stay.
CREATE TABLE workload_certificates (
    serial        TEXT PRIMARY KEY,
    cluster       TEXT NOT NULL,
    identity      TEXT NOT NULL,
    issuer_serial TEXT NOT NULL,
    not_before    BIGINT NOT NULL,
    not_after     BIGINT NOT NULL,
    issued_at     BIGINT NOT NULL,
    audit_seq     BIGINT NOT NULL,
    der           BLOB NOT NULL
);
CREATE INDEX workload_certificates_not_after ON workload_certificates (not_after);
CREATE INDEX workload_certificates_cluster ON workload_certificates (cluster, identity);
