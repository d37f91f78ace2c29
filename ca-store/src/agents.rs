//! An external-CA cluster's in-cluster agent: which of its client certificates may act for
//! the cluster, and what it last reported of its namespaces' trust bundles.

use serde::{Deserialize, Serialize};

use crate::{Conn, Result, Store, Tx};

/// An agent's newest certificate and the one it last renewed with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct AgentRecord {
    pub cluster: String,
    pub current_serial: String,
    /// Accepted until the newest one is used (a lost response must not strand the agent),
    /// unless the newest one is revoked.
    pub previous_serial: Option<String>,
}

/// An agent's last namespace report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct NamespaceReport {
    pub cluster: String,
    /// JSON object: namespace → sorted SHA-256 fingerprints (lowercase hex) of the roots in
    /// its `istio-ca-root-cert` (empty: the ConfigMap is missing).
    pub namespaces: String,
    pub reported_at: i64,
}

async fn get_agent(c: Conn<'_>, cluster: &str) -> sqlx::Result<Option<AgentRecord>> {
    on_conn!(c, c => sqlx::query_as("SELECT * FROM agents WHERE cluster = $1").bind(cluster).fetch_optional(c).await)
}

impl Store {
    pub async fn get_agent(&self, cluster: &str) -> Result<Option<AgentRecord>> {
        Ok(get_agent(self.reader().await?.conn(), cluster).await?)
    }

    pub async fn get_namespace_report(&self, cluster: &str) -> Result<Option<NamespaceReport>> {
        Ok(on_pool!(self, c => sqlx::query_as("SELECT * FROM namespace_reports WHERE cluster = $1")
            .bind(cluster).fetch_optional(c).await)?)
    }

    pub async fn namespace_reports(&self) -> Result<Vec<NamespaceReport>> {
        Ok(on_pool!(self, c => sqlx::query_as("SELECT * FROM namespace_reports ORDER BY cluster").fetch_all(c).await)?)
    }
}

impl Tx {
    pub async fn get_agent(&mut self, cluster: &str) -> Result<Option<AgentRecord>> {
        Ok(get_agent(self.conn(), cluster).await?)
    }

    /// Records an agent's new certificate: `serial` becomes the newest, `renewed_with` (the
    /// one the agent presented; `None` on enrolment, which starts over) the previous.
    pub async fn set_agent_current(&mut self, cluster: &str, serial: &str, renewed_with: Option<&str>) -> Result<()> {
        on_tx!(self, c => sqlx::query(
            "INSERT INTO agents (cluster, current_serial, previous_serial) VALUES ($1, $2, $3)
             ON CONFLICT (cluster) DO UPDATE SET current_serial = excluded.current_serial, previous_serial = excluded.previous_serial")
            .bind(cluster).bind(serial).bind(renewed_with)
            .execute(c).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Replaces the cluster's namespace report.
    pub async fn put_namespace_report(&mut self, r: &NamespaceReport) -> Result<()> {
        on_tx!(self, c => sqlx::query(
            "INSERT INTO namespace_reports (cluster, namespaces, reported_at) VALUES ($1, $2, $3)
             ON CONFLICT (cluster) DO UPDATE SET namespaces = excluded.namespaces, reported_at = excluded.reported_at")
            .bind(&r.cluster).bind(&r.namespaces).bind(r.reported_at)
            .execute(c).await.map(|r| r.rows_affected()))?;
        Ok(())
    }
}
