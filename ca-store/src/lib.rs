//! Storage: SQLite (embedded default, WAL) and PostgreSQL (several replicas).
//!
//! One implementation text serves both backends: each method body is written once and expanded
//! by `on_tx!`/`on_pool!` into a `match` arm per backend, where sqlx type-checks it against
//! that backend's types. SQL uses `$N` placeholders, which both drivers accept.
//!
//! Writes happen in a [`Tx`]. Every transaction is serialised: SQLite has one writer
//! connection and `BEGIN IMMEDIATE`; PostgreSQL takes a transaction-scoped advisory lock. That
//! keeps the audit chain linear across replicas and makes "state change + audit record" one
//! atomic unit.

use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use ca_core::audit::{AuditRecord, Checkpoint, GENESIS, record_hash};

/// Key of the PostgreSQL advisory lock that serialises writers.
const WRITE_LOCK: i64 = 0x706b_692d_6d65_7368; // "pki-mesh"

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database URL {}: use sqlite://PATH or postgres://...", redact_url(.0))]
    Url(String),
    #[error("{0} already exists")]
    Conflict(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct CertRecord {
    pub serial: String,
    pub issuer: String,
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

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct ClusterRecord {
    pub name: String,
    pub environment: String,
    pub trust_domain: String,
    /// `pending` (awaiting approval), `active`, or `rejected`.
    pub status: String,
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
    /// `plugin` (the cluster holds its intermediate's key and signs workloads in istiod) or
    /// `external-ca` (this server holds it, `key_ref`, and answers Istio's certificate API).
    pub mode: String,
    pub key_ref: Option<String>,
}

impl ClusterRecord {
    pub fn is_external_ca(&self) -> bool {
        self.mode == MODE_EXTERNAL_CA
    }
}

pub const MODE_PLUGIN: &str = "plugin";
pub const MODE_EXTERNAL_CA: &str = "external-ca";

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

/// A staged rotation. `spec` is `ca_core::rotation`-shaped JSON owned by the server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct RotationRecord {
    pub id: String,
    /// `root`, `environment` or `cluster`.
    pub kind: String,
    /// The old root's SHA-256, the environment or the cluster.
    pub target: String,
    pub stage: String,
    pub spec: String,
    pub created_by: String,
    pub created_at: i64,
    pub updated_at: i64,
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

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct ApprovalRequest {
    pub id: String,
    /// `register-cluster` or `revoke-certificate`.
    pub kind: String,
    pub subject: String,
    /// JSON document with the request's parameters.
    pub payload: String,
    pub requested_by: String,
    pub requested_at: i64,
    /// `pending`, `approved` or `rejected`.
    pub status: String,
    pub decided_by: Option<String>,
    pub decided_at: Option<i64>,
}

impl ApprovalRequest {
    /// A new request awaiting a second operator.
    pub fn pending(
        id: &str,
        kind: &str,
        subject: &str,
        payload: &serde_json::Value,
        requested_by: &str,
        now: i64,
    ) -> ApprovalRequest {
        ApprovalRequest {
            id: id.into(),
            kind: kind.into(),
            subject: subject.into(),
            payload: payload.to_string(),
            requested_by: requested_by.into(),
            requested_at: now,
            status: "pending".into(),
            decided_by: None,
            decided_at: None,
        }
    }
}

/// A key that must never be certified again: revoked for key or CA compromise.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct BlockedKey {
    /// SHA-256 (lowercase hex) of the SubjectPublicKeyInfo DER: [`spki_sha256`].
    pub spki_sha256: String,
    /// `key-compromise` or `ca-compromise`.
    pub reason: String,
    /// The certificate whose revocation blocked the key.
    pub source_serial: String,
    pub blocked_by: String,
    pub blocked_at: i64,
}

/// Revocation reasons that block the certificate's key for good.
pub const BLOCKING_REASONS: [&str; 2] = ["key-compromise", "ca-compromise"];

/// How `blocked_keys` names a key: SHA-256 of its SubjectPublicKeyInfo DER, lowercase hex.
pub fn spki_sha256(spki_der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(spki_der))
}

#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct CrlRecord {
    pub issuer: String,
    pub number: i64,
    pub this_update: i64,
    pub next_update: i64,
    /// Base64 DER.
    pub der: String,
}

#[derive(sqlx::FromRow)]
struct AuditRow {
    seq: i64,
    time: i64,
    actor: String,
    action: String,
    subject: String,
    details: String,
    prev_hash: String,
    hash: String,
}

impl From<AuditRow> for AuditRecord {
    fn from(r: AuditRow) -> Self {
        AuditRecord {
            seq: r.seq,
            time: r.time,
            actor: r.actor,
            action: r.action,
            subject: r.subject,
            details: r.details,
            prev_hash: r.prev_hash,
            hash: r.hash,
        }
    }
}

#[derive(sqlx::FromRow)]
struct CheckpointRow {
    seq: i64,
    hash: String,
    time: i64,
    key_id: String,
    signature: String,
    signature_algorithm: String,
}

/// Something that happened, to be appended to the audit trail.
#[derive(Clone, Debug)]
pub struct AuditEvent {
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub details: serde_json::Value,
}

impl AuditEvent {
    pub fn new(
        actor: impl Into<String>,
        action: impl Into<String>,
        subject: impl Into<String>,
        details: serde_json::Value,
    ) -> Self {
        AuditEvent { actor: actor.into(), action: action.into(), subject: subject.into(), details }
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

#[derive(Clone, Debug)]
pub enum Store {
    Sqlite { read: SqlitePool, write: SqlitePool },
    Postgres(PgPool),
}

pub enum Tx {
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
}

/// Expands `$body` once per backend, with `$c` bound to that backend's executor.
macro_rules! on_tx {
    ($self:expr, $c:ident => $body:expr) => {
        match $self {
            Tx::Sqlite(tx) => {
                let $c = &mut **tx;
                $body
            }
            Tx::Postgres(tx) => {
                let $c = &mut **tx;
                $body
            }
        }
    };
}

macro_rules! on_pool {
    ($self:expr, $c:ident => $body:expr) => {
        match $self {
            Store::Sqlite { read, .. } => {
                let $c = read;
                $body
            }
            Store::Postgres(pool) => {
                let $c = pool;
                $body
            }
        }
    };
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

impl Store {
    /// Connects to `sqlite://PATH` (created if missing, WAL) or `postgres://...`, and applies
    /// the migrations when `migrate` is set.
    pub async fn connect(url: &str, migrate: bool) -> Result<Store> {
        let store = if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                // The writer never checkpoints on its own (a checkpoint in the commit path
                // stalls every waiting request); `checkpoint_wal` does it from a reader.
                .pragma("wal_autocheckpoint", "0")
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true);
            // One writer: SQLite serialises writes anyway; one connection makes it explicit and
            // keeps BEGIN IMMEDIATE from queueing on the file lock.
            let write = SqlitePoolOptions::new().max_connections(1).connect_with(opts.clone()).await?;
            let read = SqlitePoolOptions::new().max_connections(8).connect_with(opts.read_only(false)).await?;
            if migrate {
                sqlx::migrate!("./migrations/sqlite").run(&write).await?;
            }
            Store::Sqlite { read, write }
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let pool =
                PgPoolOptions::new().max_connections(16).acquire_timeout(Duration::from_secs(10)).connect(url).await?;
            if migrate {
                sqlx::migrate!("./migrations/postgres").run(&pool).await?;
            }
            Store::Postgres(pool)
        } else {
            return Err(StoreError::Url(url.to_string()));
        };
        Ok(store)
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Store::Sqlite { .. } => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }

    /// Starts a serialised write transaction.
    pub async fn write(&self) -> Result<Tx> {
        Ok(match self {
            Store::Sqlite { write, .. } => Tx::Sqlite(write.begin_with("BEGIN IMMEDIATE").await?),
            Store::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(WRITE_LOCK).execute(&mut *tx).await?;
                Tx::Postgres(tx)
            }
        })
    }

    /// Appends one audit record in its own transaction.
    pub async fn audit(&self, event: AuditEvent) -> Result<AuditRecord> {
        let mut tx = self.write().await?;
        let r = tx.audit(event).await?;
        tx.commit().await?;
        Ok(r)
    }

    /// Copies committed WAL frames into the database file without blocking the writer
    /// (SQLite; a no-op on PostgreSQL). Called every second by the server.
    pub async fn checkpoint_wal(&self) -> Result<()> {
        if let Store::Sqlite { read, .. } = self {
            sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(read).await?;
        }
        Ok(())
    }

    pub async fn ping(&self) -> Result<()> {
        on_pool!(self, p => sqlx::query("SELECT 1").execute(p).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    pub async fn get_certificate(&self, serial: &str) -> Result<Option<CertRecord>> {
        Ok(
            on_pool!(self, p => sqlx::query_as("SELECT * FROM certificates WHERE serial = $1").bind(serial).fetch_optional(p).await)?,
        )
    }

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

    /// Certificates of `issuer` that are revoked and not yet expired long ago: the CRL's content.
    pub async fn revoked_by_issuer(&self, issuer: &str) -> Result<Vec<CertRecord>> {
        Ok(
            on_pool!(self, p => sqlx::query_as("SELECT * FROM certificates WHERE issuer = $1 AND revoked_at IS NOT NULL ORDER BY revoked_at, serial")
            .bind(issuer).fetch_all(p).await)?,
        )
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
             WHERE cluster IS NOT NULL AND revoked_at IS NULL AND not_after > $1
             GROUP BY cluster ORDER BY cluster")
            .bind(now).fetch_all(p).await)?)
    }

    /// Sequence number and time of the newest checkpoint.
    pub async fn last_checkpoint(&self) -> Result<Option<(i64, i64)>> {
        Ok(
            on_pool!(self, p => sqlx::query_as("SELECT seq, time FROM audit_checkpoints ORDER BY seq DESC LIMIT 1").fetch_optional(p).await)?,
        )
    }

    pub async fn audit_head(&self) -> Result<Option<(i64, String)>> {
        Ok(
            on_pool!(self, p => sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetch_optional(p).await)?,
        )
    }

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

    /// The block on a key (by [`spki_sha256`]), if it is blocked.
    pub async fn blocked_key(&self, spki_sha256: &str) -> Result<Option<BlockedKey>> {
        Ok(
            on_pool!(self, p => sqlx::query_as("SELECT * FROM blocked_keys WHERE spki_sha256 = $1").bind(spki_sha256).fetch_optional(p).await)?,
        )
    }

    pub async fn list_blocked_keys(&self) -> Result<Vec<BlockedKey>> {
        Ok(
            on_pool!(self, p => sqlx::query_as("SELECT * FROM blocked_keys ORDER BY blocked_at, spki_sha256").fetch_all(p).await)?,
        )
    }

    pub async fn get_rotation(&self, id: &str) -> Result<Option<RotationRecord>> {
        Ok(
            on_pool!(self, c => sqlx::query_as("SELECT * FROM rotations WHERE id = $1").bind(id).fetch_optional(c).await)?,
        )
    }

    /// Rotations, newest first; only those not done or aborted when `active_only`.
    pub async fn list_rotations(&self, active_only: bool) -> Result<Vec<RotationRecord>> {
        Ok(on_pool!(self, c => sqlx::query_as(
            "SELECT * FROM rotations WHERE ($1 = 0 OR stage NOT IN ('done', 'aborted')) ORDER BY created_at DESC, id")
            .bind(i64::from(active_only)).fetch_all(c).await)?)
    }

    pub async fn get_cluster_report(&self, cluster: &str) -> Result<Option<ClusterReport>> {
        Ok(
            on_pool!(self, c => sqlx::query_as("SELECT * FROM cluster_reports WHERE cluster = $1").bind(cluster).fetch_optional(c).await)?,
        )
    }

    pub async fn cluster_reports(&self) -> Result<Vec<ClusterReport>> {
        Ok(on_pool!(self, c => sqlx::query_as("SELECT * FROM cluster_reports ORDER BY cluster").fetch_all(c).await)?)
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

    pub async fn get_cluster(&self, name: &str) -> Result<Option<ClusterRecord>> {
        Ok(
            on_pool!(self, p => sqlx::query_as("SELECT * FROM clusters WHERE name = $1").bind(name).fetch_optional(p).await)?,
        )
    }

    pub async fn list_clusters(&self) -> Result<Vec<ClusterRecord>> {
        Ok(on_pool!(self, p => sqlx::query_as("SELECT * FROM clusters ORDER BY name").fetch_all(p).await)?)
    }

    pub async fn get_request(&self, id: &str) -> Result<Option<ApprovalRequest>> {
        Ok(
            on_pool!(self, p => sqlx::query_as("SELECT * FROM approval_requests WHERE id = $1").bind(id).fetch_optional(p).await)?,
        )
    }

    pub async fn list_requests(&self, status: Option<&str>) -> Result<Vec<ApprovalRequest>> {
        Ok(
            on_pool!(self, p => sqlx::query_as("SELECT * FROM approval_requests WHERE ($1 IS NULL OR status = $1) ORDER BY requested_at, id")
            .bind(status).fetch_all(p).await)?,
        )
    }

    pub async fn get_crl(&self, issuer: &str) -> Result<Option<CrlRecord>> {
        Ok(
            on_pool!(self, p => sqlx::query_as("SELECT * FROM crls WHERE issuer = $1").bind(issuer).fetch_optional(p).await)?,
        )
    }

    /// Audit records with `seq > after`, oldest first.
    pub async fn audit_after(&self, after: i64, limit: i64) -> Result<Vec<AuditRecord>> {
        let rows: Vec<AuditRow> = on_pool!(self, p => sqlx::query_as("SELECT * FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2")
            .bind(after).bind(limit).fetch_all(p).await)?;
        Ok(rows.into_iter().map(AuditRecord::from).collect())
    }

    pub async fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        let rows: Vec<CheckpointRow> =
            on_pool!(self, p => sqlx::query_as("SELECT * FROM audit_checkpoints ORDER BY seq").fetch_all(p).await)?;
        Ok(rows
            .into_iter()
            .map(|r| Checkpoint {
                seq: r.seq,
                hash: r.hash,
                time: r.time,
                key_id: r.key_id,
                signature: r.signature,
                signature_algorithm: r.signature_algorithm,
            })
            .collect())
    }

    pub async fn audit_key_pem(&self, key_id: &str) -> Result<Option<String>> {
        let row: Option<(String,)> = on_pool!(self, p => sqlx::query_as("SELECT spki_pem FROM audit_keys WHERE key_id = $1").bind(key_id).fetch_optional(p).await)?;
        Ok(row.map(|r| r.0))
    }

    pub async fn close(&self) {
        match self {
            Store::Sqlite { read, write } => {
                read.close().await;
                write.close().await;
            }
            Store::Postgres(p) => p.close().await,
        }
    }
}

impl Tx {
    pub async fn commit(self) -> Result<()> {
        match self {
            Tx::Sqlite(tx) => tx.commit().await?,
            Tx::Postgres(tx) => tx.commit().await?,
        }
        Ok(())
    }

    /// Appends an audit record linked to the current head. Runs inside the serialised write
    /// transaction, so no other writer can fork the chain.
    pub async fn audit(&mut self, e: AuditEvent) -> Result<AuditRecord> {
        let head: Option<(i64, String)> = on_tx!(self, c => sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetch_optional(c).await)?;
        let (seq, prev_hash) = match head {
            Some((s, h)) => (s + 1, h),
            None => (1, GENESIS.to_string()),
        };
        let time = now_millis();
        let details = serde_json::to_string(&e.details).map_err(|err| StoreError::Corrupt(err.to_string()))?;
        let hash = record_hash(seq, time, &e.actor, &e.action, &e.subject, &details, &prev_hash);
        on_tx!(self, c => sqlx::query("INSERT INTO audit_log (seq, time, actor, action, subject, details, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
            .bind(seq).bind(time).bind(&e.actor).bind(&e.action).bind(&e.subject).bind(&details).bind(&prev_hash).bind(&hash)
            .execute(c).await.map(|r| r.rows_affected()))?;
        Ok(AuditRecord { seq, time, actor: e.actor, action: e.action, subject: e.subject, details, prev_hash, hash })
    }

    pub async fn last_checkpoint_seq(&mut self) -> Result<i64> {
        let r: Option<(i64,)> = on_tx!(self, c => sqlx::query_as("SELECT seq FROM audit_checkpoints ORDER BY seq DESC LIMIT 1").fetch_optional(c).await)?;
        Ok(r.map_or(0, |r| r.0))
    }

    pub async fn insert_checkpoint(&mut self, cp: &Checkpoint, spki_pem: &str) -> Result<()> {
        on_tx!(self, c => sqlx::query("INSERT INTO audit_keys (key_id, spki_pem) VALUES ($1, $2) ON CONFLICT (key_id) DO NOTHING")
            .bind(&cp.key_id).bind(spki_pem).execute(c).await.map(|r| r.rows_affected()))?;
        on_tx!(self, c => sqlx::query("INSERT INTO audit_checkpoints (seq, hash, time, key_id, signature, signature_algorithm) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(cp.seq).bind(&cp.hash).bind(cp.time).bind(&cp.key_id).bind(&cp.signature).bind(&cp.signature_algorithm)
            .execute(c).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

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

    pub async fn get_certificate(&mut self, serial: &str) -> Result<Option<CertRecord>> {
        Ok(
            on_tx!(self, c => sqlx::query_as("SELECT * FROM certificates WHERE serial = $1").bind(serial).fetch_optional(c).await)?,
        )
    }

    /// Marks a certificate revoked. Returns false if it was already revoked or is unknown.
    pub async fn revoke_certificate(&mut self, serial: &str, reason: &str, at: i64) -> Result<bool> {
        let r = on_tx!(self, c => sqlx::query("UPDATE certificates SET revoked_at = $1, revocation_reason = $2 WHERE serial = $3 AND revoked_at IS NULL")
            .bind(at).bind(reason).bind(serial).execute(c).await.map(|r| r.rows_affected()))?;
        Ok(r == 1)
    }

    /// Blocks a key. Returns false if it was already blocked (the first block is kept).
    pub async fn block_key(&mut self, k: &BlockedKey) -> Result<bool> {
        let r = on_tx!(self, c => sqlx::query(
            "INSERT INTO blocked_keys (spki_sha256, reason, source_serial, blocked_by, blocked_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (spki_sha256) DO NOTHING")
            .bind(&k.spki_sha256).bind(&k.reason).bind(&k.source_serial).bind(&k.blocked_by).bind(k.blocked_at)
            .execute(c).await.map(|r| r.rows_affected()))?;
        Ok(r == 1)
    }

    /// As [`Store::blocked_key`], under the write lock: a block that committed meanwhile is seen.
    pub async fn blocked_key(&mut self, spki_sha256: &str) -> Result<Option<BlockedKey>> {
        Ok(
            on_tx!(self, c => sqlx::query_as("SELECT * FROM blocked_keys WHERE spki_sha256 = $1").bind(spki_sha256).fetch_optional(c).await)?,
        )
    }

    pub async fn insert_cluster(&mut self, r: &ClusterRecord) -> Result<()> {
        let res = on_tx!(self, c => sqlx::query(
            "INSERT INTO clusters (name, environment, trust_domain, status, request_id, enrolment_token_hash, enrolment_expires_at, enrolled_at, created_by, created_at, mode, key_ref)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)")
            .bind(&r.name).bind(&r.environment).bind(&r.trust_domain).bind(&r.status).bind(&r.request_id)
            .bind(&r.enrolment_token_hash).bind(r.enrolment_expires_at).bind(r.enrolled_at).bind(&r.created_by).bind(r.created_at)
            .bind(&r.mode).bind(&r.key_ref)
            .execute(c).await.map(|r| r.rows_affected()));
        match res {
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict(format!("cluster {}", r.name))),
            other => other.map(|_| ()).map_err(Into::into),
        }
    }

    pub async fn get_cluster(&mut self, name: &str) -> Result<Option<ClusterRecord>> {
        Ok(
            on_tx!(self, c => sqlx::query_as("SELECT * FROM clusters WHERE name = $1").bind(name).fetch_optional(c).await)?,
        )
    }

    pub async fn set_cluster_status(&mut self, name: &str, status: &str) -> Result<()> {
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

    pub async fn insert_request(&mut self, r: &ApprovalRequest) -> Result<()> {
        on_tx!(self, c => sqlx::query(
            "INSERT INTO approval_requests (id, kind, subject, payload, requested_by, requested_at, status, decided_by, decided_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)")
            .bind(&r.id).bind(&r.kind).bind(&r.subject).bind(&r.payload).bind(&r.requested_by).bind(r.requested_at)
            .bind(&r.status).bind(&r.decided_by).bind(r.decided_at)
            .execute(c).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    pub async fn get_request(&mut self, id: &str) -> Result<Option<ApprovalRequest>> {
        Ok(
            on_tx!(self, c => sqlx::query_as("SELECT * FROM approval_requests WHERE id = $1").bind(id).fetch_optional(c).await)?,
        )
    }

    /// Decides a pending request. Returns false if it was no longer pending.
    pub async fn decide_request(&mut self, id: &str, status: &str, by: &str, at: i64) -> Result<bool> {
        let r = on_tx!(self, c => sqlx::query("UPDATE approval_requests SET status = $1, decided_by = $2, decided_at = $3 WHERE id = $4 AND status = 'pending'")
            .bind(status).bind(by).bind(at).bind(id).execute(c).await.map(|r| r.rows_affected()))?;
        Ok(r == 1)
    }

    pub async fn get_crl(&mut self, issuer: &str) -> Result<Option<CrlRecord>> {
        Ok(
            on_tx!(self, c => sqlx::query_as("SELECT * FROM crls WHERE issuer = $1").bind(issuer).fetch_optional(c).await)?,
        )
    }

    pub async fn put_crl(&mut self, r: &CrlRecord) -> Result<()> {
        on_tx!(self, c => sqlx::query(
            "INSERT INTO crls (issuer, number, this_update, next_update, der) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (issuer) DO UPDATE SET number = excluded.number, this_update = excluded.this_update,
                 next_update = excluded.next_update, der = excluded.der")
            .bind(&r.issuer).bind(r.number).bind(r.this_update).bind(r.next_update).bind(&r.der)
            .execute(c).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Records a new intermediate: `serial` becomes the newest, `renewed_with` (the one the
    /// cluster presented, `None` on enrolment) the previous.
    pub async fn set_current(&mut self, cluster: &str, serial: &str, renewed_with: Option<&str>) -> Result<()> {
        on_tx!(self, c => sqlx::query("UPDATE clusters SET current_serial = $1, previous_serial = $2 WHERE name = $3")
            .bind(serial).bind(renewed_with).bind(cluster).execute(c).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Arms a new enrolment token for a cluster (after an approved re-enrolment request). The
    /// cluster's intermediates stop renewing it: only the new enrolment can.
    pub async fn rearm_enrolment(&mut self, name: &str, token_hash: &str, expires_at: i64) -> Result<bool> {
        let r = on_tx!(self, c => sqlx::query("UPDATE clusters SET enrolment_token_hash = $1, enrolment_expires_at = $2, enrolled_at = NULL, current_serial = NULL, previous_serial = NULL WHERE name = $3 AND status = 'active'")
            .bind(token_hash).bind(expires_at).bind(name).execute(c).await.map(|r| r.rows_affected()))?;
        Ok(r == 1)
    }

    pub async fn revoked_by_issuer(&mut self, issuer: &str) -> Result<Vec<CertRecord>> {
        Ok(
            on_tx!(self, c => sqlx::query_as("SELECT * FROM certificates WHERE issuer = $1 AND revoked_at IS NOT NULL ORDER BY revoked_at, serial")
            .bind(issuer).fetch_all(c).await)?,
        )
    }

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

    pub async fn insert_rotation(&mut self, r: &RotationRecord) -> Result<()> {
        on_tx!(self, c => sqlx::query("INSERT INTO rotations (id, kind, target, stage, spec, created_by, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
            .bind(&r.id).bind(&r.kind).bind(&r.target).bind(&r.stage).bind(&r.spec).bind(&r.created_by)
            .bind(r.created_at).bind(r.updated_at).execute(c).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    pub async fn get_rotation(&mut self, id: &str) -> Result<Option<RotationRecord>> {
        Ok(on_tx!(self, c => sqlx::query_as("SELECT * FROM rotations WHERE id = $1").bind(id).fetch_optional(c).await)?)
    }

    pub async fn list_active_rotations(&mut self) -> Result<Vec<RotationRecord>> {
        Ok(
            on_tx!(self, c => sqlx::query_as("SELECT * FROM rotations WHERE stage NOT IN ('done', 'aborted') ORDER BY created_at, id")
            .fetch_all(c).await)?,
        )
    }

    /// Moves a rotation from `from` to `stage` with its new spec. False when it is no longer at
    /// `from` (someone else moved it).
    pub async fn update_rotation(&mut self, id: &str, from: &str, stage: &str, spec: &str, now: i64) -> Result<bool> {
        let n = on_tx!(self, c => sqlx::query("UPDATE rotations SET stage = $1, spec = $2, updated_at = $3 WHERE id = $4 AND stage = $5")
            .bind(stage).bind(spec).bind(now).bind(id).bind(from).execute(c).await.map(|r| r.rows_affected()))?;
        Ok(n == 1)
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

    /// Sets the key an external-CA cluster's next intermediate is issued for.
    pub async fn set_cluster_key(&mut self, cluster: &str, key_ref: &str) -> Result<()> {
        on_tx!(self, c => sqlx::query("UPDATE clusters SET key_ref = $1 WHERE name = $2")
            .bind(key_ref).bind(cluster).execute(c).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Unrevoked, unexpired intermediates of `cluster`.
    pub async fn live_cluster_certificates(&mut self, cluster: &str, now: i64) -> Result<Vec<CertRecord>> {
        Ok(on_tx!(self, c => sqlx::query_as(
            "SELECT * FROM certificates WHERE cluster = $1 AND profile = 'cluster' AND revoked_at IS NULL AND not_after > $2 ORDER BY issued_at, serial")
            .bind(cluster).bind(now).fetch_all(c).await)?)
    }

    /// Takes or renews the lease `name` for `holder` until `until`. True when `holder` holds it.
    pub async fn try_lease(&mut self, name: &str, holder: &str, now: i64, until: i64) -> Result<bool> {
        on_tx!(self, c => sqlx::query(
            "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
             WHERE leases.holder = excluded.holder OR leases.expires_at < $4")
            .bind(name).bind(holder).bind(until).bind(now).execute(c).await.map(|r| r.rows_affected()))?;
        let row: Option<(String,)> = on_tx!(self, c => sqlx::query_as("SELECT holder FROM leases WHERE name = $1").bind(name).fetch_optional(c).await)?;
        Ok(row.is_some_and(|r| r.0 == holder))
    }
}

pub fn now_millis() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

pub fn now_secs() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// A database URL without its password, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(_)) if rest.contains('@') => {
            let (userinfo, host) = rest.rsplit_once('@').expect("checked");
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted() {
        assert_eq!(super::redact_url("postgres://ca:s3cret@db:5432/pki"), "postgres://ca:***@db:5432/pki");
        assert_eq!(super::redact_url("postgres://ca@db/pki"), "postgres://ca:***@db/pki");
        assert_eq!(super::redact_url("sqlite:///var/lib/ca.db"), "sqlite:///var/lib/ca.db");
    }
}
