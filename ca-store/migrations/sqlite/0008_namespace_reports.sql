-- What an external-CA cluster's agent last reported of its namespaces: for each namespace the
-- SHA-256 fingerprints of the roots in its istio-ca-root-cert ConfigMap (an empty list: the
-- ConfigMap is missing). One row per cluster, replaced when the report changes; the rotation
-- gates read it.
CREATE TABLE namespace_reports (
    cluster     TEXT PRIMARY KEY,
    namespaces  TEXT NOT NULL,
    reported_at BIGINT NOT NULL
);
