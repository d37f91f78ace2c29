//! Clusters: registration, reads, enrolment tokens, and a plug-in cluster's own intermediate
//! (enrolment, renewal) and installed reports.

use axum::Router;
use axum::routing::{get, post};
use utoipa::OpenApi;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use ca_core::cert::CertInfo;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{Operator, Role};
use crate::error::{Problem, ServiceError};
use crate::http::body::Body;
use crate::http::extract::Path;
use crate::service::clusters::{ClusterInfo, Registration, Requested};
use crate::service::intermediates::Installed;
use crate::service::state::AppState;
use crate::tls::ConnInfo;

// The next two document `ca_store::ClusterStatus` and `ca_store::ClusterMode` (the store does
// not depend on utoipa); they are never built in Rust.

/// A cluster's registration state: `pending` until a second operator decides.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
pub(crate) enum ClusterState {
    Pending,
    Active,
    Rejected,
}

/// `plugin`: the cluster holds its intermediate's key (istiod's cacerts); `external-ca`: this
/// server holds it and answers Istio's certificate API.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
pub(crate) enum ClusterMode {
    Plugin,
    ExternalCa,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegisterCluster {
    /// Lowercase letters, digits and '-', at most 63 characters.
    #[schema(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    name: String,
    /// The environment (issuer) the cluster belongs to.
    environment: String,
    /// Must be one of the environment's trust domains.
    trust_domain: String,
    /// `plugin` (default: the cluster holds its intermediate's key, for istiod's cacerts) or
    /// `external-ca` (this server holds it and answers Istio's certificate API).
    // A string rather than `ClusterMode` so that a wrong mode is `invalid-mode`, not a JSON error.
    #[serde(default)]
    #[schema(value_type = Option<ClusterMode>)]
    mode: Option<String>,
    /// external-ca only: the server-side key of the cluster intermediate (`pkcs11:` or `file:`),
    /// created beforehand with `ca-cli key generate`, and used by nothing else here. The
    /// pattern shows the common forms; any `pkcs11:` reference `ca-cli` accepts is accepted.
    #[serde(default)]
    #[schema(
        pattern = "^(file:.+|pkcs11:token=[A-Za-z0-9._-]+;object=[A-Za-z0-9._-]+[?]pin-source=env:[A-Za-z_][A-Za-z0-9_]*)$"
    )]
    key: Option<String>,
    /// external-ca only, and required there: the cluster's Istio settings (at least
    /// `sa_issuer`), stored when the registration is approved.
    // A JSON value here so that a wrong field is `invalid-settings`, not a JSON error.
    #[serde(default)]
    #[schema(value_type = Option<crate::http::cluster_settings::IstioSettingsDoc>)]
    istio: Option<serde_json::Value>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct RegisterResponse {
    cluster: String,
    status: String,
    request_id: String,
    /// One-time enrolment token: a plug-in cluster's intermediate, or an external-CA
    /// cluster's agent, enrols with it. Usable once the registration is approved, until it
    /// expires. Only its hash is stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    enrolment_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    enrolment_expires_at: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct ClusterView {
    name: String,
    environment: String,
    trust_domain: String,
    #[schema(value_type = ClusterMode)]
    mode: ca_store::ClusterMode,
    #[schema(value_type = ClusterState)]
    status: ca_store::ClusterStatus,
    request_id: String,
    /// Serial of the newest intermediate.
    current_serial: Option<String>,
    enrolment_expires_at: Option<i64>,
    enrolled_at: Option<i64>,
    created_by: String,
    created_at: i64,
    /// external-ca: the key of its newest intermediate was revoked for compromise; it issues
    /// nothing until a cluster rotation brings a new key.
    key_compromised: bool,
}

impl From<ClusterInfo> for ClusterView {
    fn from(ClusterInfo { record: c, key_compromised }: ClusterInfo) -> Self {
        ClusterView {
            name: c.name,
            environment: c.environment,
            trust_domain: c.trust_domain,
            mode: c.mode,
            status: c.status,
            request_id: c.request_id,
            current_serial: c.current_serial,
            enrolment_expires_at: c.enrolment_expires_at,
            enrolled_at: c.enrolled_at,
            created_by: c.created_by,
            created_at: c.created_at,
            key_compromised,
        }
    }
}

impl From<Requested> for RegisterResponse {
    fn from(r: Requested) -> Self {
        RegisterResponse {
            cluster: r.cluster,
            status: "pending-approval".into(),
            request_id: r.request_id,
            enrolment_token: r.enrolment_token,
            enrolment_expires_at: r.enrolment_expires_at,
        }
    }
}

/// Registers a cluster. Takes effect when a different operator approves the request.
#[utoipa::path(tag = "clusters", post, path = "/v1/clusters", request_body = RegisterCluster,
    responses((status = 202, body = RegisterResponse), (status = 400, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = ["operator", "admin"])))]
pub(crate) async fn register_cluster(
    State(state): State<AppState>,
    op: Operator,
    Body(req): Body<RegisterCluster>,
) -> Result<Response, ServiceError> {
    op.require(&[Role::Operator, Role::Admin], "registering a cluster")?;
    let req = Registration {
        name: req.name,
        environment: req.environment,
        trust_domain: req.trust_domain,
        mode: req.mode,
        key: req.key,
        istio: req.istio,
    };
    let requested = crate::service::clusters::register(&state, &op, req).await?;
    Ok((StatusCode::ACCEPTED, Json(RegisterResponse::from(requested))).into_response())
}

#[utoipa::path(tag = "clusters", get, path = "/v1/clusters", responses((status = 200, body = [ClusterView])), security(("bearer" = ["operator", "admin", "auditor"])))]
pub(crate) async fn list_clusters(
    State(state): State<AppState>,
    op: Operator,
) -> Result<Json<Vec<ClusterView>>, ServiceError> {
    op.require(&[Role::Operator, Role::Admin, Role::Auditor], "listing clusters")?;
    Ok(Json(crate::service::clusters::list(&state).await?.into_iter().map(Into::into).collect()))
}

#[utoipa::path(tag = "clusters", get, path = "/v1/clusters/{name}", params(("name" = String, Path, description = "The cluster's name")),
    responses((status = 200, body = ClusterView), (status = 404, body = Problem)), security(("bearer" = ["operator", "admin", "auditor"])))]
pub(crate) async fn get_cluster(
    State(state): State<AppState>,
    op: Operator,
    Path(name): Path<String>,
) -> Result<Json<ClusterView>, ServiceError> {
    op.require(&[Role::Operator, Role::Admin, Role::Auditor], "reading clusters")?;
    Ok(Json(crate::service::clusters::get(&state, &op, &name).await?.into()))
}

/// Asks for a new one-time enrolment token for an existing cluster: after its newest
/// intermediate was revoked, or a failed enrolment left it without one. Takes effect when a
/// different operator approves.
#[utoipa::path(tag = "clusters", post, path = "/v1/clusters/{name}/enrolment", params(("name" = String, Path, description = "The cluster's name")),
    responses((status = 202, body = RegisterResponse), (status = 404, body = Problem), (status = 409, body = Problem)), security(("bearer" = ["operator", "admin"])))]
pub(crate) async fn reissue_enrolment(
    State(state): State<AppState>,
    op: Operator,
    Path(name): Path<String>,
) -> Result<Response, ServiceError> {
    op.require(&[Role::Operator, Role::Admin], "re-issuing an enrolment token")?;
    let requested = crate::service::clusters::reissue_enrolment(&state, &op, &name).await?;
    Ok((StatusCode::ACCEPTED, Json(RegisterResponse::from(requested))).into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct IntermediateRequest {
    /// PEM CSR for the cluster intermediate. Only its public key is used.
    csr: String,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct IntermediateResponse {
    serial: String,
    not_after: String,
    /// The new cluster intermediate (PEM).
    certificate: String,
    /// The intermediate, then each parent up to and including the root (PEM): istiod's
    /// `cert-chain.pem`.
    chain: Vec<String>,
    /// Roots to trust (PEM): istiod's `root-cert.pem`.
    trust_bundle: Vec<String>,
}

/// Enrols (first time, with the enrolment token as `Authorization: Bearer`) or renews (over
/// mTLS with the cluster's current, unexpired, unrevoked intermediate) a cluster intermediate.
#[utoipa::path(tag = "clusters", post, path = "/v1/clusters/{name}/intermediate", request_body = IntermediateRequest, params(("name" = String, Path, description = "The cluster's name")),
    security(("enrolment" = []), ("cluster" = [])),
    responses((status = 200, body = IntermediateResponse), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem), (status = 503, body = Problem)))]
pub(crate) async fn issue_intermediate(
    State(state): State<AppState>,
    Path(name): Path<String>,
    conn: Option<Extension<ConnInfo>>,
    headers: HeaderMap,
    Body(req): Body<IntermediateRequest>,
) -> Result<Json<IntermediateResponse>, ServiceError> {
    let credential = crate::http::extract::enrolment_credential(&headers, conn.as_ref().map(|c| &c.0));
    let issued = crate::service::intermediates::issue(&state, &name, credential, &req.csr).await?;
    Ok(Json(IntermediateResponse {
        serial: issued.cert.serial.clone(),
        not_after: ca_core::error::fmt_time(issued.cert.not_after),
        certificate: issued.cert.pem(),
        chain: issued.chain.iter().map(CertInfo::pem).collect(),
        trust_bundle: issued.roots.iter().map(CertInfo::pem).collect(),
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct InstalledReport {
    /// SHA-256 fingerprints (hex) of the certificates in the installed `root-cert.pem`.
    bundle: Vec<String>,
    /// SHA-256 fingerprints of the installed `ca-cert.pem`, then of `cert-chain.pem`'s.
    chain: Vec<String>,
    /// Serial of the installed `ca-cert.pem`.
    intermediate_serial: String,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct ReportResponse {
    /// The bundle the cluster should have installed now (PEM roots).
    trust_bundle: Vec<String>,
    /// True when the cluster should renew now (a rotation moved its chain), with why.
    renew: bool,
    reason: Option<String>,
}

/// A plug-in cluster reports what it has installed (over mTLS, like a renewal) and learns the
/// bundle it should hold and whether to renew now. Rotation gates read these reports.
#[utoipa::path(tag = "clusters", post, path = "/v1/clusters/{name}/report", request_body = InstalledReport, params(("name" = String, Path, description = "The cluster's name")),
    security(("cluster" = [])),
    responses((status = 409, body = Problem), (status = 503, body = Problem), (status = 200, body = ReportResponse), (status = 400, body = Problem), (status = 401, body = Problem), (status = 404, body = Problem)))]
pub(crate) async fn report_installed(
    State(state): State<AppState>,
    Path(name): Path<String>,
    conn: Option<Extension<ConnInfo>>,
    Body(req): Body<InstalledReport>,
) -> Result<Json<ReportResponse>, ServiceError> {
    let peer = conn.as_ref().and_then(|c| c.peer_cert.as_deref());
    let installed = Installed { bundle: req.bundle, chain: req.chain, intermediate_serial: req.intermediate_serial };
    let advice = crate::service::intermediates::report(&state, &name, peer, installed).await?;
    Ok(Json(ReportResponse {
        trust_bundle: advice.roots.iter().map(CertInfo::pem).collect(),
        renew: advice.renew_because.is_some(),
        reason: advice.renew_because,
    }))
}

/// This module's endpoints, merged into the router by `http::router`.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/clusters", post(register_cluster).get(list_clusters))
        .route("/v1/clusters/{name}", get(get_cluster))
        .route("/v1/clusters/{name}/intermediate", post(issue_intermediate))
        .route("/v1/clusters/{name}/enrolment", post(reissue_enrolment))
        .route("/v1/clusters/{name}/report", post(report_installed))
}

/// This module's operations and schemas, merged into the served document by `http::openapi`.
#[derive(OpenApi)]
#[openapi(
    paths(register_cluster, list_clusters, get_cluster, issue_intermediate, reissue_enrolment, report_installed),
    components(schemas(
        RegisterCluster,
        RegisterResponse,
        ClusterView,
        IntermediateRequest,
        IntermediateResponse,
        InstalledReport,
        ReportResponse,
        ClusterMode,
        ClusterState
    ))
)]
pub(crate) struct Doc;
