//! Approval requests: what one operator asked for and a second one decides (two-person rule).

use serde::{Deserialize, Serialize};

use crate::{Conn, Result, Store, Tx};

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
    pub status: RequestStatus,
    pub decided_by: Option<String>,
    pub decided_at: Option<i64>,
}

text_enum! {
    /// A two-person-rule request's state.
    pub enum RequestStatus {
        Pending => "pending",
        Approved => "approved",
        Rejected => "rejected",
    }
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
            status: RequestStatus::Pending,
            decided_by: None,
            decided_at: None,
        }
    }
}

async fn get_request(c: Conn<'_>, id: &str) -> sqlx::Result<Option<ApprovalRequest>> {
    on_conn!(c, c => sqlx::query_as("SELECT * FROM approval_requests WHERE id = $1").bind(id).fetch_optional(c).await)
}

impl Store {
    pub async fn list_requests(&self, status: Option<RequestStatus>) -> Result<Vec<ApprovalRequest>> {
        Ok(
            on_pool!(self, p => sqlx::query_as("SELECT * FROM approval_requests WHERE ($1 IS NULL OR status = $1) ORDER BY requested_at, id")
            .bind(status).fetch_all(p).await)?,
        )
    }

    pub async fn get_request(&self, id: &str) -> Result<Option<ApprovalRequest>> {
        Ok(get_request(self.reader().await?.conn(), id).await?)
    }
}

impl Tx {
    pub async fn insert_request(&mut self, r: &ApprovalRequest) -> Result<()> {
        on_tx!(self, c => sqlx::query(
            "INSERT INTO approval_requests (id, kind, subject, payload, requested_by, requested_at, status, decided_by, decided_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)")
            .bind(&r.id).bind(&r.kind).bind(&r.subject).bind(&r.payload).bind(&r.requested_by).bind(r.requested_at)
            .bind(r.status).bind(&r.decided_by).bind(r.decided_at)
            .execute(c).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Decides a pending request. Returns false if it was no longer pending.
    pub async fn decide_request(&mut self, id: &str, status: RequestStatus, by: &str, at: i64) -> Result<bool> {
        let r = on_tx!(self, c => sqlx::query("UPDATE approval_requests SET status = $1, decided_by = $2, decided_at = $3 WHERE id = $4 AND status = 'pending'")
            .bind(status).bind(by).bind(at).bind(id).execute(c).await.map(|r| r.rows_affected()))?;
        Ok(r == 1)
    }

    pub async fn get_request(&mut self, id: &str) -> Result<Option<ApprovalRequest>> {
        Ok(get_request(self.conn(), id).await?)
    }
}
