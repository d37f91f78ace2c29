//! What each external-CA cluster's agent last reported of its namespaces' trust bundles.

use serde::{Deserialize, Serialize};

use crate::{Result, Store, Tx};

/// An agent's last namespace report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct NamespaceReport {
    pub cluster: String,
    /// JSON object: namespace → sorted SHA-256 fingerprints (lowercase hex) of the roots in
    /// its `istio-ca-root-cert` (empty: the ConfigMap is missing).
    pub namespaces: String,
    pub reported_at: i64,
}

impl Store {
    pub async fn get_namespace_report(&self, cluster: &str) -> Result<Option<NamespaceReport>> {
        Ok(on_pool!(self, c => sqlx::query_as("SELECT * FROM namespace_reports WHERE cluster = $1")
            .bind(cluster).fetch_optional(c).await)?)
    }

    pub async fn namespace_reports(&self) -> Result<Vec<NamespaceReport>> {
        Ok(on_pool!(self, c => sqlx::query_as("SELECT * FROM namespace_reports ORDER BY cluster").fetch_all(c).await)?)
    }
}

impl Tx {
    /// Replaces the cluster's report.
    pub async fn put_namespace_report(&mut self, r: &NamespaceReport) -> Result<()> {
        on_tx!(self, c => sqlx::query(
            "INSERT INTO namespace_reports (cluster, namespaces, reported_at) VALUES ($1, $2, $3)
             ON CONFLICT (cluster) DO UPDATE SET namespaces = excluded.namespaces, reported_at = excluded.reported_at")
            .bind(&r.cluster).bind(&r.namespaces).bind(r.reported_at)
            .execute(c).await.map(|r| r.rows_affected()))?;
        Ok(())
    }
}
