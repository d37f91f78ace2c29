-- Per-cluster Istio settings of external-CA clusters (they were `[istio.clusters.<name>]`
-- configuration tables): how the cluster's service-account tokens are validated, its workload
-- lifetimes, its server-certificate names, and its service-account keys (JWKS). A row is
-- written when a registration or a settings change is approved, or when the cluster's agent
-- pushes new keys. `version` grows with every write, so that every replica notices a change;
-- the previous JWKS stays accepted until `previous_jwks_until`.
CREATE TABLE cluster_settings (
    cluster                  TEXT PRIMARY KEY REFERENCES clusters (name),
    sa_issuer                TEXT NOT NULL,
    audiences                TEXT NOT NULL,
    trusted_node_accounts    TEXT NOT NULL,
    default_ttl              TEXT NOT NULL,
    max_ttl                  TEXT NOT NULL,
    over_max                 TEXT NOT NULL,
    leeway                   TEXT NOT NULL,
    server_certificate_names TEXT NOT NULL,
    oidc_discovery_url       TEXT,
    jwks                     TEXT,
    jwks_source              TEXT,
    jwks_updated_at          BIGINT,
    previous_jwks            TEXT,
    previous_jwks_until      BIGINT,
    version                  BIGINT NOT NULL,
    updated_at               BIGINT NOT NULL,
    updated_by               TEXT NOT NULL
);
