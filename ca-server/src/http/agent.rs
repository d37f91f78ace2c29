//! An external-CA cluster's agent: its client certificate (enrolment, renewal) and its
//! reports of the trust bundle each namespace holds.

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::routing::post;
use axum::{Extension, Json};
use ca_core::cert::CertInfo;
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

use crate::error::{Problem, ServiceError};
use crate::http::body::{Body, read_json};
use crate::http::extract::Path;
use crate::service::agent::{MAX_NAMESPACES, MAX_ROOTS_PER_NAMESPACE};
use crate::service::state::AppState;
use crate::tls::ConnInfo;

/// The largest namespace report read: the most namespaces, each with the longest name and the
/// most roots, fits (about 11 MB); `policy.max_body_bytes` would cut a large cluster's report
/// short. Only an authenticated agent's body is read this far.
const REPORT_MAX_BYTES: usize = 12 * 1024 * 1024;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AgentCertificateRequest {
    /// PEM CSR for the agent's client certificate. Only its public key is used.
    csr: String,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct AgentCertificateResponse {
    serial: String,
    not_after: String,
    /// The agent's client certificate (PEM): `CN=ca-agent <cluster>`, clientAuth only.
    certificate: String,
    /// Its issuer (the cluster's environment intermediate), then each parent up to and
    /// including the root (PEM).
    chain: Vec<String>,
    /// Roots to trust (PEM).
    trust_bundle: Vec<String>,
}

/// Enrols (first time, with the cluster's one-time enrolment token as `Authorization:
/// Bearer`) or renews (over mTLS with its current agent certificate) the client certificate
/// of an external-CA cluster's agent, issued by the cluster's environment intermediate for
/// `policy.agent_certificate_validity`. Revocable like any certificate; revoking one shuts the
/// agent out until it enrols again.
#[utoipa::path(tag = "agent", post, path = "/v1/clusters/{name}/agent-certificate", request_body = AgentCertificateRequest,
    params(("name" = String, Path, description = "The cluster's name")),
    security(("enrolment" = []), ("agent" = [])),
    responses((status = 200, body = AgentCertificateResponse), (status = 400, body = Problem),
        (status = 401, body = Problem, description = "unauthenticated: neither a token nor a client certificate; enrolment-token-invalid; client-certificate-rejected, -revoked, -expired, -superseded"),
        (status = 404, body = Problem),
        (status = 409, body = Problem, description = "plugin-cluster: a plug-in cluster's agent uses the cluster intermediate; cluster-not-active"),
        (status = 503, body = Problem)))]
pub(crate) async fn issue_agent_certificate(
    State(state): State<AppState>,
    Path(name): Path<String>,
    conn: Option<Extension<ConnInfo>>,
    headers: HeaderMap,
    Body(req): Body<AgentCertificateRequest>,
) -> Result<Json<AgentCertificateResponse>, ServiceError> {
    let credential = crate::http::extract::enrolment_credential(&headers, conn.as_ref().map(|c| &c.0));
    let issued = crate::service::agent::issue(&state, &name, credential, &req.csr).await?;
    Ok(Json(AgentCertificateResponse {
        serial: issued.cert.serial.clone(),
        not_after: ca_core::error::fmt_time(issued.cert.not_after),
        certificate: issued.cert.pem(),
        chain: issued.chain.iter().map(CertInfo::pem).collect(),
        trust_bundle: issued.roots.iter().map(CertInfo::pem).collect(),
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NamespaceReportRequest {
    /// Namespace → SHA-256 fingerprints (lowercase hex) of the roots in its
    /// `istio-ca-root-cert` ConfigMap; an empty list means the ConfigMap is missing. At most
    /// 10000 namespaces and 16 fingerprints each.
    namespaces: BTreeMap<String, Vec<String>>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct NamespaceReportResponse {
    /// The bundle every namespace should hold now (PEM roots).
    trust_bundle: Vec<String>,
    /// True when the agent should renew its certificate now (an environment rotation moved
    /// the environment to a new key), with why.
    renew: bool,
    reason: Option<String>,
}

/// An external-CA cluster's agent reports which roots each namespace's `istio-ca-root-cert`
/// holds (at most 10000 namespaces, 16 roots each), and learns the bundle they should hold
/// and whether to renew its certificate now.
/// Stored when it changed; the rotation gates hold a stage back while a namespace lacks the
/// bundle it hands out.
#[utoipa::path(tag = "agent", post, path = "/v1/clusters/{name}/namespace-report", request_body = NamespaceReportRequest,
    params(("name" = String, Path, description = "The cluster's name")),
    security(("agent" = [])),
    responses((status = 200, body = NamespaceReportResponse),
        (status = 400, body = Problem, description = "invalid-report: a namespace name, a fingerprint or a count out of bounds"),
        (status = 401, body = Problem, description = "unauthenticated: no client certificate; client-certificate-rejected, -revoked, -expired, -superseded"),
        (status = 404, body = Problem), (status = 409, body = Problem), (status = 503, body = Problem)))]
pub(crate) async fn report_namespaces(
    State(state): State<AppState>,
    Path(name): Path<String>,
    conn: Option<Extension<ConnInfo>>,
    request: Request,
) -> Result<Json<NamespaceReportResponse>, ServiceError> {
    let peer = conn.as_ref().and_then(|c| c.peer_cert.as_deref());
    // The agent is authenticated before its (possibly large) body is read.
    let cluster = crate::service::agent::claimed_cluster(&state, &name).await?;
    let presented = crate::service::agent::authenticate(&state, &cluster, peer).await?;
    let actor = crate::service::agent::actor(&name);
    if let Some(a) = request.extensions().get::<crate::edge::Authenticated>() {
        a.set(actor.clone());
    }
    let limit = REPORT_MAX_BYTES.max(state.config.policy.max_body_bytes);
    let req: NamespaceReportRequest = read_json(request, limit).await.map_err(|e| e.by(actor))?;
    let advice = crate::service::agent::report_namespaces(&state, &cluster, &presented, &req.namespaces).await?;
    Ok(Json(NamespaceReportResponse {
        trust_bundle: advice.roots.iter().map(CertInfo::pem).collect(),
        renew: advice.renew_because.is_some(),
        reason: advice.renew_because,
    }))
}

// The documented bounds are the enforced ones.
const _: () = assert!(MAX_NAMESPACES == 10_000 && MAX_ROOTS_PER_NAMESPACE == 16);

/// This module's endpoints, merged into the router by `http::router`.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/clusters/{name}/agent-certificate", post(issue_agent_certificate))
        .route("/v1/clusters/{name}/namespace-report", post(report_namespaces))
}

/// This module's operations and schemas, merged into the served document by `http::openapi`.
#[derive(OpenApi)]
#[openapi(
    paths(issue_agent_certificate, report_namespaces),
    components(schemas(
        AgentCertificateRequest,
        AgentCertificateResponse,
        NamespaceReportRequest,
        NamespaceReportResponse
    ))
)]
pub(crate) struct Doc;
