//! Issued CA certificates (roots, environment and cluster intermediates): the inventory and
//! revocation state that CRLs are made from.

use serde::{Deserialize, Serialize};

use crate::{Conn, Result, Store, StoreError, Tx, is_unique_violation};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct CertRecord {
    pub serial: String,
    pub issuer: CertIssuer,
    pub cluster: Option<String>,
    pub profile: String,
    pub subject: String,
    /// JSON array of SAN strings.
    pub sans: String,
    pub not_before: i64,
    pub not_after: i64,
    pub fingerprint: String,
    pub requester: String,
    pub pem: String,
    pub issued_at: i64,
    pub revoked_at: Option<i64>,
    pub revocation_reason: Option<String>,
}

/// What signed a certificate. Stored as the environment's name, or `cluster:<name>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CertIssuer {
    /// An environment's intermediate: it signs cluster intermediates. Its CRL lists them.
    Environment(String),
    /// An external-CA cluster's intermediate: it signs the server certificates asked of it.
    Cluster(String),
}

const CLUSTER_PREFIX: &str = "cluster:";

impl CertIssuer {
    /// The environment, when an environment signed.
    pub fn environment(&self) -> Option<&str> {
        match self {
            CertIssuer::Environment(e) => Some(e),
            CertIssuer::Cluster(_) => None,
        }
    }
}

impl std::fmt::Display for CertIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertIssuer::Environment(e) => f.write_str(e),
            CertIssuer::Cluster(c) => write!(f, "{CLUSTER_PREFIX}{c}"),
        }
    }
}

impl From<&str> for CertIssuer {
    /// Environment names never hold a `:`, so the prefix tells the two apart.
    fn from(s: &str) -> Self {
        match s.strip_prefix(CLUSTER_PREFIX) {
            Some(c) => CertIssuer::Cluster(c.to_string()),
            None => CertIssuer::Environment(s.to_string()),
        }
    }
}

impl Serialize for CertIssuer {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CertIssuer {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Ok(CertIssuer::from(&*<std::borrow::Cow<'de, str>>::deserialize(d)?))
    }
}

impl<DB: sqlx::Database> sqlx::Type<DB> for CertIssuer
where
    str: sqlx::Type<DB>,
{
    fn type_info() -> DB::TypeInfo {
        <str as sqlx::Type<DB>>::type_info()
    }

    fn compatible(ty: &DB::TypeInfo) -> bool {
        <str as sqlx::Type<DB>>::compatible(ty)
    }
}

impl<'q, DB: sqlx::Database> sqlx::Encode<'q, DB> for CertIssuer
where
    String: sqlx::Encode<'q, DB>,
{
    fn encode_by_ref(
        &self,
        buf: &mut <DB as sqlx::Database>::ArgumentBuffer,
    ) -> std::result::Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        <String as sqlx::Encode<'q, DB>>::encode_by_ref(&self.to_string(), buf)
    }
}

impl<'r, DB: sqlx::Database> sqlx::Decode<'r, DB> for CertIssuer
where
    &'r str: sqlx::Decode<'r, DB>,
{
    fn decode(value: <DB as sqlx::Database>::ValueRef<'r>) -> std::result::Result<Self, sqlx::error::BoxDynError> {
        Ok(CertIssuer::from(<&'r str as sqlx::Decode<'r, DB>>::decode(value)?))
    }
}

/// Filters for the inventory listing. All optional; `now` decides what "expired" means.
#[derive(Clone, Debug, Default)]
pub struct CertFilter {
    pub cluster: Option<String>,
    pub issuer: Option<String>,
    /// `valid`, `revoked` or `expired`.
    pub status: Option<String>,
    pub expiring_within_secs: Option<i64>,
    pub now: i64,
    pub limit: i64,
}

async fn get_certificate(c: Conn<'_>, serial: &str) -> sqlx::Result<Option<CertRecord>> {
    on_conn!(c, c => sqlx::query_as("SELECT * FROM certificates WHERE serial = $1").bind(serial).fetch_optional(c).await)
}

async fn revoked_by_issuer(c: Conn<'_>, issuer: &str) -> sqlx::Result<Vec<CertRecord>> {
    on_conn!(c, c => sqlx::query_as("SELECT * FROM certificates WHERE issuer = $1 AND revoked_at IS NOT NULL ORDER BY revoked_at, serial")
        .bind(issuer).fetch_all(c).await)
}

impl Store {
    pub async fn get_certificate_by_fingerprint(&self, fp: &str) -> Result<Option<CertRecord>> {
        Ok(
            on_pool!(self, p => sqlx::query_as("SELECT * FROM certificates WHERE fingerprint = $1").bind(fp).fetch_optional(p).await)?,
        )
    }

    pub async fn list_certificates(&self, f: &CertFilter) -> Result<Vec<CertRecord>> {
        let expiring_before = f.expiring_within_secs.map(|s| f.now.saturating_add(s));
        Ok(on_pool!(self, p => sqlx::query_as(
            "SELECT * FROM certificates
             WHERE ($1 IS NULL OR cluster = $1)
               AND ($2 IS NULL OR issuer = $2)
               AND ($3 IS NULL
                    OR ($3 = 'revoked' AND revoked_at IS NOT NULL)
                    OR ($3 = 'expired' AND revoked_at IS NULL AND not_after <= $4)
                    OR ($3 = 'valid' AND revoked_at IS NULL AND not_after > $4))
               AND ($5 IS NULL OR (not_after <= $5 AND not_after > $4 AND revoked_at IS NULL))
             ORDER BY issued_at DESC, serial
             LIMIT $6")
            .bind(&f.cluster).bind(&f.issuer).bind(&f.status).bind(f.now).bind(expiring_before).bind(f.limit)
            .fetch_all(p).await)?)
    }

    /// When the issuer last revoked something (Unix seconds), to tell whether its CRL is stale.
    pub async fn last_revocation(&self, issuer: &str) -> Result<Option<i64>> {
        let r: Option<(Option<i64>,)> = on_pool!(self, p => sqlx::query_as("SELECT MAX(revoked_at) FROM certificates WHERE issuer = $1")
            .bind(issuer).fetch_optional(p).await)?;
        Ok(r.and_then(|r| r.0))
    }

    /// For each cluster, when its newest unrevoked, unexpired intermediate expires.
    pub async fn cluster_expiries(&self, now: i64) -> Result<Vec<(String, i64)>> {
        Ok(on_pool!(self, p => sqlx::query_as(
            "SELECT cluster, MAX(not_after) FROM certificates
             WHERE cluster IS NOT NULL AND profile = 'cluster' AND revoked_at IS NULL AND not_after > $1
             GROUP BY cluster ORDER BY cluster")
            .bind(now).fetch_all(p).await)?)
    }

    pub async fn get_certificate(&self, serial: &str) -> Result<Option<CertRecord>> {
        Ok(get_certificate(self.reader().await?.conn(), serial).await?)
    }

    /// Certificates of `issuer` that are revoked and not yet expired long ago: the CRL's content.
    pub async fn revoked_by_issuer(&self, issuer: &str) -> Result<Vec<CertRecord>> {
        Ok(revoked_by_issuer(self.reader().await?.conn(), issuer).await?)
    }
}

impl Tx {
    pub async fn insert_certificate(&mut self, r: &CertRecord) -> Result<()> {
        let res = on_tx!(self, c => sqlx::query(
            "INSERT INTO certificates (serial, issuer, cluster, profile, subject, sans, not_before, not_after, fingerprint, requester, pem, issued_at, revoked_at, revocation_reason)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)")
            .bind(&r.serial).bind(&r.issuer).bind(&r.cluster).bind(&r.profile).bind(&r.subject).bind(&r.sans)
            .bind(r.not_before).bind(r.not_after).bind(&r.fingerprint).bind(&r.requester).bind(&r.pem).bind(r.issued_at)
            .bind(r.revoked_at).bind(&r.revocation_reason)
            .execute(c).await.map(|r| r.rows_affected()));
        match res {
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict(format!("certificate {}", r.serial))),
            other => other.map(|_| ()).map_err(Into::into),
        }
    }

    /// Marks a certificate revoked. Returns false if it was already revoked or is unknown.
    pub async fn revoke_certificate(&mut self, serial: &str, reason: &str, at: i64) -> Result<bool> {
        let r = on_tx!(self, c => sqlx::query("UPDATE certificates SET revoked_at = $1, revocation_reason = $2 WHERE serial = $3 AND revoked_at IS NULL")
            .bind(at).bind(reason).bind(serial).execute(c).await.map(|r| r.rows_affected()))?;
        Ok(r == 1)
    }

    /// Unrevoked, unexpired intermediates of `cluster`.
    pub async fn live_cluster_certificates(&mut self, cluster: &str, now: i64) -> Result<Vec<CertRecord>> {
        Ok(on_tx!(self, c => sqlx::query_as(
            "SELECT * FROM certificates WHERE cluster = $1 AND profile = 'cluster' AND revoked_at IS NULL AND not_after > $2 ORDER BY issued_at, serial")
            .bind(cluster).bind(now).fetch_all(c).await)?)
    }

    pub async fn get_certificate(&mut self, serial: &str) -> Result<Option<CertRecord>> {
        Ok(get_certificate(self.conn(), serial).await?)
    }

    pub async fn revoked_by_issuer(&mut self, issuer: &str) -> Result<Vec<CertRecord>> {
        Ok(revoked_by_issuer(self.conn(), issuer).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::CertIssuer;

    #[test]
    fn issuers_keep_their_stored_spelling() {
        for stored in ["prod", "cluster:east"] {
            assert_eq!(CertIssuer::from(stored).to_string(), stored);
        }
        assert_eq!(CertIssuer::from("cluster:east"), CertIssuer::Cluster("east".into()));
        assert_eq!(CertIssuer::from("prod").environment(), Some("prod"));
        assert_eq!(serde_json::to_string(&CertIssuer::Cluster("east".into())).unwrap(), "\"cluster:east\"");
    }
}
