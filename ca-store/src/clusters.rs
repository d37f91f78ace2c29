//! Registered clusters (registration, enrolment, current and previous intermediate, mode and
//! key) and what each plug-in cluster last reported having installed.

use serde::{Deserialize, Serialize};

use crate::{Conn, Result, Store, StoreError, Tx, is_unique_violation};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct ClusterRecord {
    pub name: String,
    pub environment: String,
    pub trust_domain: String,
    pub status: ClusterStatus,
    pub request_id: String,
    #[serde(skip)]
    pub enrolment_token_hash: Option<String>,
    pub enrolment_expires_at: Option<i64>,
    pub enrolled_at: Option<i64>,
    pub created_by: String,
    pub created_at: i64,
    /// Serial of the newest intermediate issued to the cluster.
    #[sqlx(default)]
    pub current_serial: Option<String>,
    /// The intermediate the cluster last renewed with: still accepted until the newest one is
    /// presented, so that a lost response does not strand the cluster.
    #[sqlx(default)]
    pub previous_serial: Option<String>,
    pub mode: ClusterMode,
    pub key_ref: Option<String>,
}

impl ClusterRecord {
    pub fn is_external_ca(&self) -> bool {
        self.mode == ClusterMode::ExternalCa
    }

    pub fn is_active(&self) -> bool {
        self.status == ClusterStatus::Active
    }
}

text_enum! {
    /// A cluster's registration state.
    pub enum ClusterStatus {
        /// Awaiting a second operator's approval.
        Pending => "pending",
        Active => "active",
        Rejected => "rejected",
    }
}

text_enum! {
    /// Who holds a cluster intermediate's key.
    pub enum ClusterMode {
        /// The cluster holds it and signs workloads in istiod.
        Plugin => "plugin",
        /// This server holds it (`key_ref`) and answers Istio's certificate API.
        ExternalCa => "external-ca",
    }
}

/// What a plug-in cluster last reported having installed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct ClusterReport {
    pub cluster: String,
    /// JSON array of the SHA-256 fingerprints in `root-cert.pem`.
    pub bundle: String,
    /// JSON array of the SHA-256 fingerprints of `ca-cert.pem`, then `cert-chain.pem`.
    pub chain: String,
    pub intermediate_serial: String,
    pub reported_at: i64,
}

async fn get_cluster(c: Conn<'_>, name: &str) -> sqlx::Result<Option<ClusterRecord>> {
    on_conn!(c, c => sqlx::query_as("SELECT * FROM clusters WHERE name = $1").bind(name).fetch_optional(c).await)
}

impl Store {
    pub async fn list_clusters(&self) -> Result<Vec<ClusterRecord>> {
        Ok(on_pool!(self, p => sqlx::query_as("SELECT * FROM clusters ORDER BY name").fetch_all(p).await)?)
    }

    pub async fn get_cluster_report(&self, cluster: &str) -> Result<Option<ClusterReport>> {
        Ok(
            on_pool!(self, c => sqlx::query_as("SELECT * FROM cluster_reports WHERE cluster = $1").bind(cluster).fetch_optional(c).await)?,
        )
    }

    pub async fn cluster_reports(&self) -> Result<Vec<ClusterReport>> {
        Ok(on_pool!(self, c => sqlx::query_as("SELECT * FROM cluster_reports ORDER BY cluster").fetch_all(c).await)?)
    }

    pub async fn get_cluster(&self, name: &str) -> Result<Option<ClusterRecord>> {
        Ok(get_cluster(self.reader().await?.conn(), name).await?)
    }
}

impl Tx {
    pub async fn insert_cluster(&mut self, r: &ClusterRecord) -> Result<()> {
        let res = on_tx!(self, c => sqlx::query(
            "INSERT INTO clusters (name, environment, trust_domain, status, request_id, enrolment_token_hash, enrolment_expires_at, enrolled_at, created_by, created_at, mode, key_ref)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)")
            .bind(&r.name).bind(&r.environment).bind(&r.trust_domain).bind(r.status).bind(&r.request_id)
            .bind(&r.enrolment_token_hash).bind(r.enrolment_expires_at).bind(r.enrolled_at).bind(&r.created_by).bind(r.created_at)
            .bind(r.mode).bind(&r.key_ref)
            .execute(c).await.map(|r| r.rows_affected()));
        match res {
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict(format!("cluster {}", r.name))),
            other => other.map(|_| ()).map_err(Into::into),
        }
    }

    pub async fn set_cluster_status(&mut self, name: &str, status: ClusterStatus) -> Result<()> {
        on_tx!(self, c => sqlx::query("UPDATE clusters SET status = $1 WHERE name = $2").bind(status).bind(name).execute(c).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Spends the enrolment token: succeeds once, only while unexpired and unused.
    pub async fn consume_enrolment(&mut self, name: &str, token_hash: &str, now: i64) -> Result<bool> {
        let r = on_tx!(self, c => sqlx::query(
            "UPDATE clusters SET enrolled_at = $1, enrolment_token_hash = NULL
             WHERE name = $2 AND status = 'active' AND enrolment_token_hash = $3 AND enrolled_at IS NULL AND enrolment_expires_at > $1")
            .bind(now).bind(name).bind(token_hash).execute(c).await.map(|r| r.rows_affected()))?;
        Ok(r == 1)
    }

    /// Records a new intermediate: `serial` becomes the newest, `renewed_with` (the one the
    /// cluster presented, `None` on enrolment) the previous.
    pub async fn set_current(&mut self, cluster: &str, serial: &str, renewed_with: Option<&str>) -> Result<()> {
        on_tx!(self, c => sqlx::query("UPDATE clusters SET current_serial = $1, previous_serial = $2 WHERE name = $3")
            .bind(serial).bind(renewed_with).bind(cluster).execute(c).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Arms a new enrolment token for a cluster (after an approved re-enrolment request). A
    /// plug-in cluster's intermediates stop renewing it: only the new enrolment can. An
    /// external-CA cluster's token is its agent's, and its intermediate (held here) stays.
    pub async fn rearm_enrolment(&mut self, name: &str, token_hash: &str, expires_at: i64) -> Result<bool> {
        let r = on_tx!(self, c => sqlx::query("UPDATE clusters SET enrolment_token_hash = $1, enrolment_expires_at = $2, enrolled_at = NULL,
                 current_serial = CASE WHEN mode = 'plugin' THEN NULL ELSE current_serial END,
                 previous_serial = CASE WHEN mode = 'plugin' THEN NULL ELSE previous_serial END
             WHERE name = $3 AND status = 'active'")
            .bind(token_hash).bind(expires_at).bind(name).execute(c).await.map(|r| r.rows_affected()))?;
        Ok(r == 1)
    }

    /// Sets the key an external-CA cluster's next intermediate is issued for.
    pub async fn set_cluster_key(&mut self, cluster: &str, key_ref: &str) -> Result<()> {
        on_tx!(self, c => sqlx::query("UPDATE clusters SET key_ref = $1 WHERE name = $2")
            .bind(key_ref).bind(cluster).execute(c).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    pub async fn put_cluster_report(&mut self, r: &ClusterReport) -> Result<()> {
        on_tx!(self, c => sqlx::query(
            "INSERT INTO cluster_reports (cluster, bundle, chain, intermediate_serial, reported_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (cluster) DO UPDATE SET bundle = excluded.bundle, chain = excluded.chain,
                 intermediate_serial = excluded.intermediate_serial, reported_at = excluded.reported_at")
            .bind(&r.cluster).bind(&r.bundle).bind(&r.chain).bind(&r.intermediate_serial).bind(r.reported_at)
            .execute(c).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    pub async fn get_cluster(&mut self, name: &str) -> Result<Option<ClusterRecord>> {
        Ok(get_cluster(self.conn(), name).await?)
    }
}
