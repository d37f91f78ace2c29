//! An external-CA cluster's Istio settings (read; changed under the two-person rule) and its
//! agent's push of the cluster's service-account keys.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

use crate::auth::{Operator, Role};
use crate::error::{Problem, ServiceError};
use crate::http::body::Body;
use crate::http::extract::Path;
use crate::service::state::AppState;
use crate::tls::ConnInfo;

/// `reject` (istiod's behaviour) or `clamp` (istio-csr's) a requested lifetime over `max_ttl`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
pub(crate) enum OverMax {
    Reject,
    Clamp,
}

/// An external-CA cluster's Istio settings (documents `config::IstioSettings`, which the
/// server reads; never built in Rust).
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct IstioSettingsDoc {
    /// Expected `iss` of the cluster's service-account tokens.
    sa_issuer: String,
    /// Accepted `aud` values (default `["istio-ca"]`).
    audiences: Option<Vec<String>>,
    /// `namespace/serviceaccount` of callers allowed to send `ImpersonatedIdentity` (ztunnel).
    trusted_node_accounts: Option<Vec<String>>,
    /// Workload lifetime when none is asked for (default `24h`), at most `max_ttl`.
    default_ttl: Option<String>,
    /// The longest workload lifetime (default `7d`).
    max_ttl: Option<String>,
    #[schema(value_type = Option<OverMax>)]
    over_max: Option<String>,
    /// Clock skew allowed on `exp` and `nbf` (default `30s`, at most `10m`).
    leeway: Option<String>,
    /// DNS names `POST /v1/clusters/{name}/server-certificates` may issue (default
    /// `["istiod.istio-system.svc"]`).
    server_certificate_names: Option<Vec<String>>,
    /// The cluster's service-account keys (`kubectl get --raw /openid/v1/jwks`), public keys
    /// only. Absent: the agent pushes them, or they come from `oidc_discovery_url`.
    #[schema(value_type = Option<Object>)]
    jwks: Option<serde_json::Value>,
    /// An OIDC discovery document URL whose `issuer` is `sa_issuer`; its `jwks_uri` is fetched
    /// and refreshed. Not together with `jwks`.
    oidc_discovery_url: Option<String>,
}

/// The settings as stored, with where the current keys came from.
#[derive(Serialize, ToSchema)]
pub(crate) struct SettingsView {
    #[serde(flatten)]
    #[schema(inline)]
    settings: IstioSettingsDoc,
    /// `registration` (an operator's, at registration or in a settings change), `agent`,
    /// `discovery` or `config` (seeded from a deprecated configuration table); absent when no
    /// keys are known yet.
    jwks_source: Option<String>,
    /// When the current JWKS was stored (Unix seconds).
    jwks_updated_at: Option<i64>,
    /// Until when the JWKS it replaced is still accepted (Unix seconds), while it is.
    previous_jwks_until: Option<i64>,
    /// Grows with every change.
    version: i64,
    updated_at: i64,
    updated_by: String,
}

#[utoipa::path(tag = "clusters", get, path = "/v1/clusters/{name}/settings", params(("name" = String, Path, description = "The cluster's name")),
    responses((status = 200, body = SettingsView), (status = 404, body = Problem)), security(("bearer" = ["operator", "admin", "auditor"])))]
pub(crate) async fn get_settings(
    State(state): State<AppState>,
    op: Operator,
    Path(name): Path<String>,
) -> Result<Response, ServiceError> {
    op.require(&[Role::Operator, Role::Admin, Role::Auditor], "reading cluster settings")?;
    let v = crate::service::cluster_settings::get(&state, &op, &name).await?;
    // The settings as the server reads them, flattened beside what is known about their keys.
    let mut body = serde_json::to_value(&v.settings).map_err(ServiceError::internal)?;
    body["jwks_source"] = serde_json::json!(v.jwks_source);
    body["jwks_updated_at"] = serde_json::json!(v.jwks_updated_at);
    body["previous_jwks_until"] = serde_json::json!(v.previous_jwks_until);
    body["version"] = serde_json::json!(v.version);
    body["updated_at"] = serde_json::json!(v.updated_at);
    body["updated_by"] = serde_json::json!(v.updated_by);
    Ok(Json(body).into_response())
}

#[derive(Serialize, ToSchema)]
pub(crate) struct SettingsRequested {
    cluster: String,
    status: String,
    request_id: String,
}

/// Asks to replace an external-CA cluster's settings (all of them: absent fields take their
/// defaults; without `jwks`, the stored keys are kept). Takes effect when a different
/// operator approves the request.
#[utoipa::path(tag = "clusters", put, path = "/v1/clusters/{name}/settings", request_body = IstioSettingsDoc, params(("name" = String, Path, description = "The cluster's name")),
    responses((status = 202, body = SettingsRequested), (status = 400, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = ["operator", "admin"])))]
pub(crate) async fn put_settings(
    State(state): State<AppState>,
    op: Operator,
    Path(name): Path<String>,
    Body(req): Body<serde_json::Value>,
) -> Result<Response, ServiceError> {
    op.require(&[Role::Operator, Role::Admin], "changing cluster settings")?;
    let request_id = crate::service::cluster_settings::request_change(&state, &op, &name, req).await?;
    let body = SettingsRequested { cluster: name, status: "pending-approval".into(), request_id };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServiceAccountKeys {
    /// The cluster's service-account issuer (its discovery document's `issuer`): must be the
    /// registered `sa_issuer`.
    issuer: String,
    /// The cluster's JWKS (`/openid/v1/jwks`), public keys only.
    #[schema(value_type = Object)]
    jwks: serde_json::Value,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct KeysPushed {
    /// False when the keys were the stored ones already (nothing was written).
    changed: bool,
}

/// The cluster's agent pushes its service-account issuer and keys (over mTLS with its agent
/// certificate). The keys they replace stay accepted for `istio.jwks_grace`.
#[utoipa::path(tag = "clusters", put, path = "/v1/clusters/{name}/service-account-keys", request_body = ServiceAccountKeys, params(("name" = String, Path, description = "The cluster's name")),
    security(("agent" = [])),
    responses((status = 200, body = KeysPushed), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem)))]
pub(crate) async fn push_keys(
    State(state): State<AppState>,
    Path(name): Path<String>,
    conn: Option<Extension<ConnInfo>>,
    Body(req): Body<ServiceAccountKeys>,
) -> Result<Json<KeysPushed>, ServiceError> {
    let peer = conn.as_ref().and_then(|c| c.peer_cert.as_deref());
    let changed = crate::service::cluster_settings::push_keys(&state, &name, peer, &req.issuer, req.jwks).await?;
    Ok(Json(KeysPushed { changed }))
}

/// This module's endpoints, merged into the router by `http::router`.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/clusters/{name}/settings", get(get_settings).put(put_settings))
        .route("/v1/clusters/{name}/service-account-keys", put(push_keys))
}

/// This module's operations and schemas, merged into the served document by `http::openapi`.
#[derive(OpenApi)]
#[openapi(
    paths(get_settings, put_settings, push_keys),
    components(schemas(IstioSettingsDoc, OverMax, SettingsView, SettingsRequested, ServiceAccountKeys, KeysPushed))
)]
pub(crate) struct Doc;
