//! The certificate inventory, and revocation requests.

use axum::Router;
use axum::routing::{get, post};
use utoipa::OpenApi;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ca_core::crl::Reason;
use ca_store::{CertRecord, now_secs};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::{Operator, Role};
use crate::error::{Problem, ServiceError};
use crate::http::body::Body;
use crate::http::extract::{Path, Query};
use crate::http::requests::RequestView;
use crate::service::certificates::{Found, ListQuery};
use crate::service::state::AppState;

/// A certificate's state in the inventory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum CertificateStatus {
    Valid,
    Revoked,
    Expired,
}

impl CertificateStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CertificateStatus::Valid => "valid",
            CertificateStatus::Revoked => "revoked",
            CertificateStatus::Expired => "expired",
        }
    }
}

/// RFC 5280 revocation reasons, named as ca-core parses them (the list is ca-core's, so the
/// document cannot drift from what the server accepts).
pub(crate) struct RevocationReason;

impl utoipa::PartialSchema for RevocationReason {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(Reason::NAMES.iter().map(|(n, _)| *n)))
            .description(Some("RFC 5280 revocation reason"))
            .into()
    }
}

impl ToSchema for RevocationReason {}

#[derive(Serialize, ToSchema)]
pub(crate) struct CertificateView {
    serial: String,
    issuer: String,
    cluster: Option<String>,
    profile: String,
    subject: String,
    sans: Vec<String>,
    not_before: i64,
    not_after: i64,
    status: CertificateStatus,
    sha256_fingerprint: String,
    requester: String,
    issued_at: i64,
    revoked_at: Option<i64>,
    #[schema(value_type = Option<RevocationReason>)]
    revocation_reason: Option<String>,
    pem: String,
}

impl From<CertRecord> for CertificateView {
    fn from(r: CertRecord) -> Self {
        let status = if r.revoked_at.is_some() {
            CertificateStatus::Revoked
        } else if r.not_after <= now_secs() {
            CertificateStatus::Expired
        } else {
            CertificateStatus::Valid
        };
        CertificateView {
            serial: r.serial,
            issuer: r.issuer.to_string(),
            cluster: r.cluster,
            profile: r.profile,
            subject: r.subject,
            sans: serde_json::from_str(&r.sans).unwrap_or_default(),
            not_before: r.not_before,
            not_after: r.not_after,
            status,
            sha256_fingerprint: r.fingerprint,
            requester: r.requester,
            issued_at: r.issued_at,
            revoked_at: r.revoked_at,
            revocation_reason: r.revocation_reason,
            pem: r.pem,
        }
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct CertQuery {
    cluster: Option<String>,
    issuer: Option<String>,
    status: Option<CertificateStatus>,
    /// A duration such as `30d` or `1y30d` (units s, m, h, d, w, y): valid certificates
    /// expiring within it.
    #[param(pattern = "^([0-9]{1,10}[smhdwy]){0,4}[1-9][0-9]{0,9}[smhdwy]([0-9]{1,10}[smhdwy]){0,4}$")]
    expiring_within: Option<String>,
    /// At most 1000; default 100.
    limit: Option<i64>,
}

#[utoipa::path(tag = "certificates", get, path = "/v1/certificates", params(CertQuery), responses((status = 200, body = [CertificateView]), (status = 400, body = Problem)), security(("bearer" = ["operator", "admin", "auditor"])))]
pub(crate) async fn list_certificates(
    State(state): State<AppState>,
    op: Operator,
    Query(q): Query<CertQuery>,
) -> Result<Json<Vec<CertificateView>>, ServiceError> {
    op.require(&[Role::Operator, Role::Admin, Role::Auditor], "listing certificates")?;
    let q = ListQuery {
        cluster: q.cluster,
        issuer: q.issuer,
        status: q.status.map(CertificateStatus::as_str),
        expiring_within: q.expiring_within,
        limit: q.limit,
    };
    Ok(Json(crate::service::certificates::list(&state, &op, q).await?.into_iter().map(Into::into).collect()))
}

#[utoipa::path(tag = "certificates", get, path = "/v1/certificates/{serial}", params(("serial" = String, Path, description = "Hex, with or without colons")),
    responses((status = 200, body = CertificateView), (status = 404, body = Problem)), security(("bearer" = ["operator", "admin", "auditor"])))]
pub(crate) async fn get_certificate(
    State(state): State<AppState>,
    op: Operator,
    Path(serial): Path<String>,
) -> Result<Json<CertificateView>, ServiceError> {
    op.require(&[Role::Operator, Role::Admin, Role::Auditor], "reading certificates")?;
    let (w, cert) = match crate::service::certificates::get(&state, &op, &serial).await? {
        Found::Issued(r) => return Ok(Json(r.into())),
        Found::Workload(w, cert) => (w, cert),
    };
    let now = now_secs();
    Ok(Json(CertificateView {
        serial: w.serial,
        issuer: w.issuer_serial,
        cluster: Some(w.cluster),
        profile: "workload".into(),
        subject: cert.subject.clone(),
        sans: vec![w.identity],
        not_before: w.not_before,
        not_after: w.not_after,
        status: if w.not_after <= now { CertificateStatus::Expired } else { CertificateStatus::Valid },
        sha256_fingerprint: cert.fingerprint(),
        requester: format!("audit record {}", w.audit_seq),
        issued_at: w.issued_at,
        revoked_at: None,
        revocation_reason: None,
        pem: cert.pem(),
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RevokeRequest {
    /// RFC 5280 reason: unspecified, key-compromise, ca-compromise, affiliation-changed,
    /// superseded, cessation-of-operation, certificate-hold or privilege-withdrawn.
    // A string rather than `RevocationReason` so that a wrong reason is `invalid-reason`.
    #[schema(value_type = RevocationReason)]
    reason: String,
}

/// Asks to revoke a certificate. Takes effect when a different operator approves.
#[utoipa::path(tag = "certificates", post, path = "/v1/certificates/{serial}/revoke", request_body = RevokeRequest,
    params(("serial" = String, Path, description = "Hex, with or without colons")),
    responses((status = 202, body = RequestView), (status = 400, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = ["operator", "admin"])))]
pub(crate) async fn revoke_certificate(
    State(state): State<AppState>,
    op: Operator,
    Path(serial): Path<String>,
    Body(req): Body<RevokeRequest>,
) -> Result<Response, ServiceError> {
    op.require(&[Role::Operator, Role::Admin], "revoking certificates")?;
    let request = crate::service::revocation::request(&state, &op, &serial, &req.reason).await?;
    Ok((StatusCode::ACCEPTED, Json(RequestView::from(request))).into_response())
}

/// This module's endpoints, merged into the router by `http::router`.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/certificates", get(list_certificates))
        .route("/v1/certificates/{serial}", get(get_certificate))
        .route("/v1/certificates/{serial}/revoke", post(revoke_certificate))
}

/// This module's operations and schemas, merged into the served document by `http::openapi`.
#[derive(OpenApi)]
#[openapi(
    paths(list_certificates, get_certificate, revoke_certificate),
    components(schemas(CertificateView, RevokeRequest, CertificateStatus, RevocationReason))
)]
pub(crate) struct Doc;
