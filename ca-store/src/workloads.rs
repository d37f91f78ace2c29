//! Workload certificates issued for external-CA clusters, kept until their retention ends.

use serde::{Deserialize, Serialize};

use crate::{Result, Store, Tx};

/// A workload certificate as stored: found by serial until pruned after its retention.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct WorkloadRecord {
    pub serial: String,
    pub cluster: String,
    /// The SPIFFE ID the certificate names.
    pub identity: String,
    /// The cluster intermediate that signed it.
    pub issuer_serial: String,
    pub not_before: i64,
    pub not_after: i64,
    pub issued_at: i64,
    /// The audit record listing this certificate (0 until written).
    pub audit_seq: i64,
    pub der: Vec<u8>,
}

impl Store {
    pub async fn get_workload_certificate(&self, serial: &str) -> Result<Option<WorkloadRecord>> {
        Ok(
            on_pool!(self, p => sqlx::query_as("SELECT * FROM workload_certificates WHERE serial = $1").bind(serial).fetch_optional(p).await)?,
        )
    }

    pub async fn count_workload_certificates(&self) -> Result<i64> {
        let r: (i64,) =
            on_pool!(self, p => sqlx::query_as("SELECT COUNT(*) FROM workload_certificates").fetch_one(p).await)?;
        Ok(r.0)
    }

    /// Live (unexpired at `now`) workload certificates of `cluster` issued before `before`.
    pub async fn count_workloads_issued_before(&self, cluster: &str, now: i64, before: i64) -> Result<i64> {
        let (n,): (i64,) = on_pool!(self, c => sqlx::query_as(
            "SELECT COUNT(*) FROM workload_certificates WHERE cluster = $1 AND not_after > $2 AND issued_at < $3")
            .bind(cluster).bind(now).bind(before).fetch_one(c).await)?;
        Ok(n)
    }

    /// Live workload certificates of `cluster` signed by an intermediate issued before `before`.
    pub async fn count_workloads_under_intermediates_before(
        &self,
        cluster: &str,
        now: i64,
        before: i64,
    ) -> Result<i64> {
        let (n,): (i64,) = on_pool!(self, c => sqlx::query_as(
            "SELECT COUNT(*) FROM workload_certificates w JOIN certificates i ON i.serial = w.issuer_serial
             WHERE w.cluster = $1 AND w.not_after > $2 AND i.issued_at < $3")
            .bind(cluster).bind(now).bind(before).fetch_one(c).await)?;
        Ok(n)
    }
}

impl Tx {
    /// Writes a batch of workload certificates, all covered by audit record `audit_seq`. One
    /// multi-row INSERT per chunk keeps a batch to a few statements.
    pub async fn insert_workload_certificates(&mut self, rows: &[WorkloadRecord], audit_seq: i64) -> Result<()> {
        // 9 columns per row; both backends allow well over 9 * 500 bind parameters.
        for chunk in rows.chunks(500) {
            on_tx!(self, c => {
                let mut qb = sqlx::QueryBuilder::new(
                    "INSERT INTO workload_certificates (serial, cluster, identity, issuer_serial, not_before, not_after, issued_at, audit_seq, der) ",
                );
                qb.push_values(chunk, |mut b, r| {
                    b.push_bind(&r.serial).push_bind(&r.cluster).push_bind(&r.identity).push_bind(&r.issuer_serial)
                        .push_bind(r.not_before).push_bind(r.not_after).push_bind(r.issued_at).push_bind(audit_seq)
                        .push_bind(&r.der);
                });
                qb.build().execute(c).await.map(|r| r.rows_affected())
            })?;
        }
        Ok(())
    }

    /// Deletes workload certificates that expired before `before`. Returns how many.
    pub async fn prune_workload_certificates(&mut self, before: i64) -> Result<u64> {
        Ok(
            on_tx!(self, c => sqlx::query("DELETE FROM workload_certificates WHERE not_after < $1").bind(before).execute(c).await.map(|r| r.rows_affected()))?,
        )
    }
}
