//! Reading the audit trail.

use ca_core::audit::AuditRecord;

use crate::error::ServiceError;
use crate::service::state::AppState;

/// Records with a sequence number above `after` (default 0), at most `limit` (default 100,
/// at most 1000).
pub async fn list(state: &AppState, after: Option<i64>, limit: Option<i64>) -> Result<Vec<AuditRecord>, ServiceError> {
    Ok(state.store.audit_after(after.unwrap_or(0), limit.unwrap_or(100).clamp(1, 1000)).await?)
}
