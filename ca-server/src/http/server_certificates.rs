//! TLS server certificates from an external-CA cluster's intermediate.

use axum::Router;
use axum::routing::post;
use utoipa::OpenApi;

use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::{Extension, Json};
use ca_core::cert::CertInfo;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{Operator, Role};
use crate::error::{Problem, ServiceError};
use crate::http::body::Body;
use crate::http::extract::Path;
use crate::http::operator::bearer;
use crate::service::certificates::ServerCertificate;
use crate::service::state::AppState;
use crate::tls::ConnInfo;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServerCertRequest {
    /// PEM CSR. Only its public key is used.
    csr: String,
    /// DNS names (e.g. `istiod.istio-system.svc`), among the cluster's
    /// `server_certificate_names`.
    #[schema(min_items = 1)]
    dns_names: Vec<String>,
    /// Lifetime, e.g. `30d` (default 30d, at most 90d, never past the intermediate).
    #[schema(pattern = "^([0-9]{1,10}[smhdwy]){0,4}[1-9][0-9]{0,9}[smhdwy]([0-9]{1,10}[smhdwy]){0,4}$")]
    validity: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct ServerCertResponse {
    serial: String,
    not_after: String,
    certificate: String,
    /// The cluster intermediate and its parents below the root (PEM).
    chain: Vec<String>,
    trust_bundle: Vec<String>,
}

/// Issues a TLS server certificate (e.g. istiod's own, which it needs when its CA is off) from
/// an external-CA cluster's intermediate: for an admin (bearer token), or for the cluster's
/// agent (its agent certificate over mTLS, no token).
#[utoipa::path(tag = "server_certificates", post, path = "/v1/clusters/{name}/server-certificates", request_body = ServerCertRequest, params(("name" = String, Path, description = "The cluster's name")),
    responses((status = 200, body = ServerCertResponse), (status = 400, body = Problem),
        (status = 401, body = Problem, description = "unauthenticated: neither a token nor a client certificate; client-certificate-rejected, -revoked, -expired, -superseded: the client certificate is not a current agent certificate of this cluster"),
        (status = 403, body = Problem, description = "forbidden: only admins issue server certificates; name-not-allowed: a name outside the cluster's server_certificate_names"),
        (status = 404, body = Problem), (status = 409, body = Problem), (status = 503, body = Problem)),
    security(("bearer" = ["admin"]), ("agent" = [])))]
pub(crate) async fn issue_server_certificate(
    State(state): State<AppState>,
    Path(name): Path<String>,
    conn: Option<Extension<ConnInfo>>,
    request: Request,
) -> Result<Json<ServerCertResponse>, ServiceError> {
    let peer = conn.as_ref().and_then(|c| c.peer_cert.as_deref());
    // The caller is authenticated before its body is read.
    let (mut parts, body) = request.into_parts();
    // A token is an operator's, and wins over a client certificate sent alongside it.
    let actor = if bearer(&parts).is_some() || peer.is_none() {
        let op = Operator::from_request_parts(&mut parts, &state).await?;
        op.require(&[Role::Admin], "issuing server certificates")?;
        op.actor()
    } else {
        let cluster = crate::service::agent::claimed_cluster(&state, &name).await?;
        crate::service::agent::authenticate(&state, &cluster, peer).await?;
        let actor = crate::service::agent::actor(&name);
        if let Some(a) = parts.extensions.get::<crate::edge::Authenticated>() {
            a.set(actor.clone());
        }
        actor
    };
    let Body(req) = Body::<ServerCertRequest>::from_request(Request::from_parts(parts, body), &state).await?;
    let req = ServerCertificate { csr: req.csr, dns_names: req.dns_names, validity: req.validity };
    let issued = crate::service::certificates::issue_server_certificate(&state, &actor, &name, req).await?;
    Ok(Json(ServerCertResponse {
        serial: issued.cert.serial.clone(),
        not_after: ca_core::error::fmt_time(issued.cert.not_after),
        certificate: issued.cert.pem(),
        chain: issued.chain_pem,
        trust_bundle: issued.roots.iter().map(CertInfo::pem).collect(),
    }))
}

/// This module's endpoints, merged into the router by `http::router`.
pub(crate) fn routes() -> Router<AppState> {
    Router::new().route("/v1/clusters/{name}/server-certificates", post(issue_server_certificate))
}

/// This module's operations and schemas, merged into the served document by `http::openapi`.
#[derive(OpenApi)]
#[openapi(paths(issue_server_certificate), components(schemas(ServerCertRequest, ServerCertResponse)))]
pub(crate) struct Doc;
