//! External-CA clusters' Istio settings: token validation (issuer, audiences, leeway, the
//! JWKS and the one it replaced), workload lifetimes, trusted node accounts and the names of
//! istiod's serving certificate. The server validates and interprets the values; here they
//! are text (lists as JSON arrays, durations as `24h`).

use serde::{Deserialize, Serialize};

use crate::{Conn, Result, Store, Tx};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct ClusterSettingsRecord {
    pub cluster: String,
    pub sa_issuer: String,
    /// JSON array of accepted `aud` values.
    pub audiences: String,
    /// JSON array of `namespace/serviceaccount`.
    pub trusted_node_accounts: String,
    pub default_ttl: String,
    pub max_ttl: String,
    /// `reject` or `clamp`.
    pub over_max: String,
    pub leeway: String,
    /// JSON array of DNS names.
    pub server_certificate_names: String,
    pub oidc_discovery_url: Option<String>,
    /// The current JWKS document, when one was given or pushed.
    pub jwks: Option<String>,
    /// Who gave it: `registration`, `agent` or `config`.
    pub jwks_source: Option<String>,
    pub jwks_updated_at: Option<i64>,
    /// The JWKS the current one replaced, accepted until `previous_jwks_until`.
    pub previous_jwks: Option<String>,
    pub previous_jwks_until: Option<i64>,
    /// Grows with every write (set by [`Tx::put_cluster_settings`]).
    pub version: i64,
    pub updated_at: i64,
    pub updated_by: String,
}

async fn get_settings(c: Conn<'_>, cluster: &str) -> sqlx::Result<Option<ClusterSettingsRecord>> {
    on_conn!(c, c => sqlx::query_as("SELECT * FROM cluster_settings WHERE cluster = $1").bind(cluster).fetch_optional(c).await)
}

impl Store {
    pub async fn get_cluster_settings(&self, cluster: &str) -> Result<Option<ClusterSettingsRecord>> {
        Ok(get_settings(self.reader().await?.conn(), cluster).await?)
    }

    pub async fn list_cluster_settings(&self) -> Result<Vec<ClusterSettingsRecord>> {
        Ok(on_pool!(self, p => sqlx::query_as("SELECT * FROM cluster_settings ORDER BY cluster").fetch_all(p).await)?)
    }
}

impl Tx {
    pub async fn get_cluster_settings(&mut self, cluster: &str) -> Result<Option<ClusterSettingsRecord>> {
        Ok(get_settings(self.conn(), cluster).await?)
    }

    /// Writes a cluster's settings whole (insert or replace). The stored version is one more
    /// than before (1 for a new row), whatever `r.version` says; it is returned.
    pub async fn put_cluster_settings(&mut self, r: &ClusterSettingsRecord) -> Result<i64> {
        on_tx!(self, c => sqlx::query(
            "INSERT INTO cluster_settings (cluster, sa_issuer, audiences, trusted_node_accounts, default_ttl, max_ttl,
                 over_max, leeway, server_certificate_names, oidc_discovery_url, jwks, jwks_source, jwks_updated_at,
                 previous_jwks, previous_jwks_until, version, updated_at, updated_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, 1, $16, $17)
             ON CONFLICT (cluster) DO UPDATE SET sa_issuer = excluded.sa_issuer, audiences = excluded.audiences,
                 trusted_node_accounts = excluded.trusted_node_accounts, default_ttl = excluded.default_ttl,
                 max_ttl = excluded.max_ttl, over_max = excluded.over_max, leeway = excluded.leeway,
                 server_certificate_names = excluded.server_certificate_names,
                 oidc_discovery_url = excluded.oidc_discovery_url, jwks = excluded.jwks,
                 jwks_source = excluded.jwks_source, jwks_updated_at = excluded.jwks_updated_at,
                 previous_jwks = excluded.previous_jwks, previous_jwks_until = excluded.previous_jwks_until,
                 version = cluster_settings.version + 1, updated_at = excluded.updated_at,
                 updated_by = excluded.updated_by")
            .bind(&r.cluster).bind(&r.sa_issuer).bind(&r.audiences).bind(&r.trusted_node_accounts)
            .bind(&r.default_ttl).bind(&r.max_ttl).bind(&r.over_max).bind(&r.leeway)
            .bind(&r.server_certificate_names).bind(&r.oidc_discovery_url).bind(&r.jwks).bind(&r.jwks_source)
            .bind(r.jwks_updated_at).bind(&r.previous_jwks).bind(r.previous_jwks_until).bind(r.updated_at)
            .bind(&r.updated_by)
            .execute(c).await.map(|r| r.rows_affected()))?;
        let (version,): (i64,) = on_tx!(self, c => sqlx::query_as("SELECT version FROM cluster_settings WHERE cluster = $1")
            .bind(&r.cluster).fetch_one(c).await)?;
        Ok(version)
    }
}
