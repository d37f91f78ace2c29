-- An external-CA cluster's in-cluster agent. Its newest client certificate and the one it
-- last renewed with (accepted until the newest is used, so that a lost response does not
-- strand it), as clusters.current_serial and previous_serial are for a plug-in cluster's
-- intermediate. An enrolment with a new token starts over.
CREATE TABLE agents (
    cluster         TEXT PRIMARY KEY,
    current_serial  TEXT NOT NULL,
    previous_serial TEXT
);

-- What the agent last reported of its namespaces: for each namespace the SHA-256
-- fingerprints of the roots in its istio-ca-root-cert ConfigMap (an empty list: the ConfigMap
-- is missing). One row per cluster, replaced when the report changes; the rotation gates read
-- it.
CREATE TABLE namespace_reports (
    cluster     TEXT PRIMARY KEY,
    namespaces  TEXT NOT NULL,
    reported_at BIGINT NOT NULL
);
