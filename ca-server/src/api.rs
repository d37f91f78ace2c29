//! The REST API. Handlers translate HTTP to ca-core and storage calls; every state change
//! commits together with its audit record, and every refusal is audited by `audit_denials`.

use std::net::SocketAddr;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{FromRequest, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use base64::Engine;
use ca_core::cert::CertInfo;
use ca_core::crl::Reason;
use ca_core::csr::VerifiedCsr;
use ca_core::profile::{CertRequest, ProfileKind};
use ca_core::store::{ApprovalRequest, AuditEvent, CertFilter, CertRecord, ClusterRecord, CrlRecord, now_secs};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::Digest;
use time::OffsetDateTime;
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::auth::{Operator, Role};
use crate::error::{ApiError, Denied, Problem};
use crate::metrics::RouteLabels;
use crate::state::{AppState, Issuer};

/// What the TLS layer learned about the connection.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    /// DER of the client certificate, when one was presented (and proved possession of).
    pub peer_cert: Option<Vec<u8>>,
}

pub fn router(state: AppState) -> Router {
    let routes = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/issuers", get(list_issuers))
        .route("/v1/clusters", post(register_cluster).get(list_clusters))
        .route("/v1/clusters/{name}", get(get_cluster))
        .route("/v1/clusters/{name}/intermediate", post(issue_intermediate))
        .route("/v1/clusters/{name}/enrolment", post(reissue_enrolment))
        .route("/v1/clusters/{name}/trust-bundle", get(trust_bundle))
        .route("/v1/clusters/{name}/trust-bundle/configmap", get(trust_bundle_configmap))
        .route("/v1/clusters/{name}/server-certificates", post(issue_server_certificate))
        .route("/v1/requests", get(list_requests))
        .route("/v1/requests/{id}/approve", post(approve_request))
        .route("/v1/requests/{id}/reject", post(reject_request))
        .route("/v1/certificates", get(list_certificates))
        .route("/v1/certificates/{serial}", get(get_certificate))
        .route("/v1/certificates/{serial}/revoke", post(revoke_certificate))
        .route("/v1/crl/{issuer}", get(get_crl))
        .route("/v1/audit", get(list_audit))
        .route("/v1/clusters/{name}/report", post(report_installed))
        .route("/v1/rotations", post(crate::rotation::start).get(crate::rotation::list))
        .route("/v1/rotations/{id}", get(crate::rotation::get))
        .route("/v1/rotations/{id}/certificates", post(crate::rotation::upload_certificate))
        .route("/v1/rotations/{id}/advance", post(crate::rotation::advance))
        .route("/v1/rotations/{id}/rollback", post(crate::rotation::rollback))
        .fallback(|| async { ApiError::not_found("no such endpoint") });
    with_layers(routes, state)
}

/// The middleware every route runs behind (public so that a test can put a route of its own,
/// e.g. one that panics, behind exactly the same stack).
pub fn with_layers(routes: Router<AppState>, state: AppState) -> Router {
    routes
        // No request holds a connection longer than this (HSM calls are bounded well below it).
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            std::time::Duration::from_secs(60),
        ))
        // A panicking handler answers 500 and is still seen (and audited) by `audit_denials`.
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(crate::edge::panic_response))
        .layer(axum::middleware::from_fn_with_state(state.clone(), audit_denials))
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        // ... and a panic in the middleware above still gets an answer.
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(crate::edge::panic_response))
        .with_state(state)
}

/// Records latency per route.
async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    // Only known values become labels: a client must not be able to add series.
    let method = crate::edge::method_label(req.method()).to_string();
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched".to_string(), |m| m.as_str().to_string());
    let resp = next.run(req).await;
    let labels = RouteLabels { method, route, status: resp.status().as_u16().to_string() };
    state.metrics.latency.get_or_create(&labels).observe(start.elapsed().as_secs_f64());
    resp
}

/// Audits refusals (any 4xx) and panics. A refusal of an authenticated caller (the error
/// names an actor) is one audit record; a refusal of an unauthenticated one is only counted, into
/// the periodic summary of `edge`, because anyone can send those. Unauthenticated callers draw on
/// a per-address quota: a request with no credential before any work, a credential that fails
/// when it is refused; an address with none left gets 429. Refusals that did not come from an
/// `ApiError` (axum's own rejections of a query string or method, the request timeout) are
/// turned into problem documents here, so that every error has a stable code.
async fn audit_denials(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    use crate::edge::{MAX_METHOD, MAX_PATH, MAX_TEXT, cap};
    let method = cap(req.method().as_str(), MAX_METHOD);
    let path = cap(req.uri().path(), MAX_PATH);
    let conn = req.extensions().get::<ConnInfo>();
    let remote = conn.map(|c| c.remote);
    let has_cert = conn.is_some_and(|c| c.peer_cert.is_some());
    let credential = has_cert || req.headers().contains_key(header::AUTHORIZATION);
    let sample = |status: StatusCode, code: &'static str, detail: &str| {
        let (method, path, detail) = (&method, &path, cap(detail, MAX_TEXT));
        move || {
            json!({"api": "rest", "method": method, "path": path, "status": status.as_u16(), "code": code,
                   "detail": detail, "remote": remote.map(|r| r.to_string())})
        }
    };
    // Probes and scrapes are never refused and write nothing: they do not draw on the quota.
    let probe = matches!(path.as_str(), "/healthz" | "/readyz" | "/metrics");
    if !credential && !probe {
        if let Some(ip) = remote.map(|r| r.ip()) {
            if let Err(wait) = state.edge.take(ip) {
                let resp = crate::edge::rate_limited(wait);
                let detail = resp.extensions().get::<Denied>().map(|d| d.detail.clone()).unwrap_or_default();
                state.edge.denied(
                    "rest",
                    "rate-limited",
                    Some(ip),
                    sample(StatusCode::TOO_MANY_REQUESTS, "rate-limited", &detail),
                );
                return resp;
            }
        }
    }
    let authenticated = crate::edge::Authenticated::default();
    req.extensions_mut().insert(authenticated.clone());
    let mut resp = next.run(req).await;
    if resp.extensions().get::<crate::edge::Panicked>().is_some() {
        match authenticated.get() {
            Some(actor) => {
                let event = AuditEvent::new(
                    cap(&actor, MAX_TEXT),
                    "request.failed",
                    format!("{method} {path}"),
                    json!({"status": 500, "code": "internal", "detail": "the handler panicked",
                           "remote": remote.map(|r| r.to_string())}),
                );
                if let Err(e) = state.store.audit(event).await {
                    tracing::error!(error = %e, "could not audit a failed request");
                }
            }
            None => state.edge.denied(
                "rest",
                "internal",
                remote.map(|r| r.ip()),
                sample(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the handler panicked"),
            ),
        }
        return resp;
    }
    if !resp.status().is_client_error() {
        return resp;
    }
    if resp.extensions().get::<Denied>().is_none() {
        let status = resp.status();
        let body = axum::body::to_bytes(std::mem::take(resp.body_mut()), 4096).await.unwrap_or_default();
        let detail = String::from_utf8_lossy(&body).trim().to_string();
        let code = match status {
            StatusCode::METHOD_NOT_ALLOWED => "method-not-allowed",
            StatusCode::REQUEST_TIMEOUT => "request-timeout",
            StatusCode::PAYLOAD_TOO_LARGE => "payload-too-large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported-media-type",
            StatusCode::BAD_REQUEST if path.contains('?') || !detail.is_empty() => "invalid-query",
            _ => "rejected",
        };
        let detail =
            if detail.is_empty() { status.canonical_reason().unwrap_or("rejected").to_string() } else { detail };
        resp = ApiError::new(status, code, detail).into_response();
    }
    let denied = resp.extensions().get::<Denied>().cloned().expect("set above or by ApiError");
    // A refusal after the credential was checked (e.g. of the body) is the caller's, by name.
    let Some(actor) = denied.actor.clone().or_else(|| authenticated.get()) else {
        let ip = remote.map(|r| r.ip());
        if credential && denied.code != "rate-limited" {
            if let Some(Err(wait)) = ip.map(|ip| state.edge.take(ip)) {
                resp = crate::edge::rate_limited(wait);
                state.edge.denied(
                    "rest",
                    "rate-limited",
                    ip,
                    sample(StatusCode::TOO_MANY_REQUESTS, "rate-limited", &denied.detail),
                );
                return resp;
            }
        }
        state.edge.denied("rest", denied.code, ip, sample(resp.status(), denied.code, &denied.detail));
        return resp;
    };
    let event = AuditEvent::new(
        cap(&actor, MAX_TEXT),
        "request.denied",
        format!("{method} {path}"),
        json!({"status": resp.status().as_u16(), "code": denied.code, "detail": cap(&denied.detail, MAX_TEXT),
               "remote": remote.map(|r| r.to_string())}),
    );
    if let Err(e) = state.store.audit(event).await {
        tracing::error!(error = %e, "could not audit a denied request");
    }
    resp
}

/// A JSON body, read up to the configured limit. Malformed or oversized bodies are refused
/// with a problem document (and so audited).
pub struct Body<T>(pub T);

impl<T: serde::de::DeserializeOwned> FromRequest<AppState> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let limit = state.config.policy.max_body_bytes;
        let bytes = axum::body::to_bytes(req.into_body(), limit).await.map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                format!("request bodies are limited to {limit} bytes"),
            )
        })?;
        serde_json::from_slice(&bytes)
            .map(Body)
            .map_err(|e| ApiError::bad_request("malformed-json", format!("request body: {e}")))
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "ca-server", description = "Online issuance, renewal and revocation of cluster intermediates, with an audit trail."),
    paths(
        healthz, readyz, list_issuers, register_cluster, list_clusters, get_cluster, issue_intermediate, reissue_enrolment, list_requests,
        approve_request, reject_request, list_certificates, get_certificate, revoke_certificate, get_crl, list_audit,
        trust_bundle, trust_bundle_configmap, issue_server_certificate, report_installed,
        crate::rotation::list, crate::rotation::get, crate::rotation::start, crate::rotation::upload_certificate,
        crate::rotation::advance, crate::rotation::rollback
    ),
    components(schemas(
        Problem, RegisterCluster, RegisterResponse, ClusterView, IntermediateRequest, IntermediateResponse, RequestView,
        CertificateView, RevokeRequest, IssuerView, AuditView, Ready, ServerCertRequest, ServerCertResponse,
        InstalledReport, ReportResponse
    )),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
        );
    }
}

async fn openapi() -> impl IntoResponse {
    Json(ApiDoc::openapi())
}

#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "The process is up")))]
async fn healthz() -> &'static str {
    "ok"
}

#[derive(Serialize, ToSchema)]
struct Ready {
    ready: bool,
    database: bool,
    /// Whether each issuer's key answered its last probe.
    issuers: std::collections::BTreeMap<String, bool>,
}

#[utoipa::path(get, path = "/readyz", responses((status = 200, body = Ready), (status = 503, body = Ready)))]
async fn readyz(State(state): State<AppState>) -> Response {
    let database =
        tokio::time::timeout(std::time::Duration::from_secs(2), state.store.ping()).await.is_ok_and(|r| r.is_ok());
    let issuers: std::collections::BTreeMap<String, bool> =
        state.issuers.all().iter().map(|i| (i.name.clone(), i.is_healthy())).collect();
    let ready = database && issuers.values().all(|v| *v);
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(Ready { ready, database, issuers })).into_response()
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.encode())
}

#[derive(Serialize, ToSchema)]
struct IssuerView {
    name: String,
    subject: String,
    not_after: String,
    trust_domains: Vec<String>,
    healthy: bool,
    /// The issuer certificate followed by its chain to the root, PEM.
    chain: Vec<String>,
}

#[utoipa::path(get, path = "/v1/issuers", responses((status = 200, body = [IssuerView])))]
async fn list_issuers(State(state): State<AppState>) -> Json<Vec<IssuerView>> {
    Json(
        state
            .issuers
            .all()
            .iter()
            .map(|i| IssuerView {
                name: i.name.clone(),
                subject: i.cert.subject.clone(),
                not_after: ca_core::error::fmt_time(i.cert.not_after),
                trust_domains: i.trust_domains(),
                healthy: i.is_healthy(),
                chain: std::iter::once(&i.cert).chain(&i.chain).map(CertInfo::pem).collect(),
            })
            .collect(),
    )
}

// ---- clusters -----------------------------------------------------------------------------

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RegisterCluster {
    /// Lowercase letters, digits and '-', at most 63 characters.
    name: String,
    /// The environment (issuer) the cluster belongs to.
    environment: String,
    /// Must be one of the environment's trust domains.
    trust_domain: String,
    /// `plugin` (default: the cluster holds its intermediate's key, for istiod's cacerts) or
    /// `external-ca` (this server holds it and answers Istio's certificate API).
    #[serde(default)]
    mode: Option<String>,
    /// external-ca only: the server-side key of the cluster intermediate (`pkcs11:` or `file:`),
    /// created beforehand with `ca-cli key generate`.
    #[serde(default)]
    key: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct RegisterResponse {
    cluster: String,
    status: String,
    request_id: String,
    /// One-time enrolment token (plug-in mode). Usable once the registration is approved,
    /// until it expires. Only its hash is stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    enrolment_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    enrolment_expires_at: Option<i64>,
}

#[derive(Serialize, ToSchema)]
struct ClusterView {
    name: String,
    environment: String,
    trust_domain: String,
    /// `plugin` or `external-ca`.
    mode: String,
    status: String,
    request_id: String,
    /// Serial of the newest intermediate.
    current_serial: Option<String>,
    enrolment_expires_at: Option<i64>,
    enrolled_at: Option<i64>,
    created_by: String,
    created_at: i64,
}

impl From<ClusterRecord> for ClusterView {
    fn from(c: ClusterRecord) -> Self {
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
        }
    }
}

fn valid_cluster_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !n.starts_with('-')
        && !n.ends_with('-')
}

fn token_hash(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// 256 random bits; the `pet_` prefix makes leaked tokens easy to spot in scanners.
fn new_token() -> String {
    let mut b = [0u8; 32];
    aws_lc_rs::rand::fill(&mut b).expect("system RNG");
    format!("pet_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}

/// Registers a cluster. Takes effect when a different operator approves the request.
#[utoipa::path(post, path = "/v1/clusters", request_body = RegisterCluster,
    responses((status = 202, body = RegisterResponse), (status = 400, body = Problem), (status = 401, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = [])))]
async fn register_cluster(
    State(state): State<AppState>,
    op: Operator,
    Body(req): Body<RegisterCluster>,
) -> Result<Response, ApiError> {
    op.require(&[Role::Operator, Role::Admin], "registering a cluster")?;
    if !valid_cluster_name(&req.name) {
        return Err(ApiError::bad_request(
            "invalid-name",
            "cluster names use lowercase letters, digits and '-' (at most 63)",
        )
        .by(op.actor()));
    }
    let issuer = state.issuers.get(&req.environment).ok_or_else(|| {
        ApiError::bad_request("unknown-environment", format!("no environment {:?} is served here", req.environment))
            .by(op.actor())
    })?;
    let td: ca_core::names::TrustDomain = req
        .trust_domain
        .parse()
        .map_err(|e| ApiError::bad_request("invalid-trust-domain", format!("{e}")).by(op.actor()))?;
    let served = issuer.trust_domains();
    if !served.is_empty() && !served.contains(&td.to_string()) {
        return Err(ApiError::bad_request(
            "invalid-trust-domain",
            format!("environment {} serves {}, not {td}", issuer.name, served.join(", ")),
        )
        .by(op.actor()));
    }
    let mode = req.mode.clone().unwrap_or_else(|| ca_core::store::MODE_PLUGIN.into());
    let external = match mode.as_str() {
        ca_core::store::MODE_PLUGIN => false,
        ca_core::store::MODE_EXTERNAL_CA => true,
        other => {
            return Err(ApiError::bad_request("invalid-mode", format!("mode {other:?} is not plugin or external-ca"))
                .by(op.actor()));
        }
    };
    let key_ref = match (&req.key, external) {
        (Some(k), true) => Some(
            k.parse::<hsm::KeyRef>()
                .map_err(|e| ApiError::bad_request("invalid-key", e.to_string()).by(op.actor()))?
                .to_string(),
        ),
        (None, true) => {
            return Err(
                ApiError::bad_request("invalid-key", "external-ca mode needs the server-side key (key)").by(op.actor())
            );
        }
        (Some(_), false) => {
            return Err(ApiError::bad_request(
                "invalid-key",
                "a plug-in cluster holds its own key; key is for external-ca mode only",
            )
            .by(op.actor()));
        }
        (None, false) => None,
    };
    // One key, one purpose: never another cluster's, an environment's or the audit key.
    if let Some(k) = &key_ref {
        let taken = state.store.list_clusters().await?.iter().any(|c| c.key_ref.as_deref() == Some(k.as_str()))
            || state.config.issuers.iter().any(|i| i.key == *k)
            || state.config.audit.key == *k
            || state.config.tls.key == *k;
        if taken {
            return Err(ApiError::bad_request("invalid-key", "that key is already in use here").by(op.actor()));
        }
    }
    let now = now_secs();
    // A plug-in cluster enrols with a one-time token; an external-CA cluster has nothing to
    // enrol: the server issues its intermediate on approval.
    let token = (!external).then(new_token);
    let expires = (!external).then(|| now + state.config.policy.enrolment_token_ttl.duration().whole_seconds());
    let request_id = uuid::Uuid::new_v4().to_string();
    let payload = json!({"name": req.name, "environment": req.environment, "trust_domain": td.to_string(),
                         "mode": mode, "key": key_ref});
    let mut tx = state.store.write().await?;
    tx.insert_cluster(&ClusterRecord {
        name: req.name.clone(),
        environment: req.environment.clone(),
        trust_domain: td.to_string(),
        status: "pending".into(),
        request_id: request_id.clone(),
        enrolment_token_hash: token.as_deref().map(token_hash),
        enrolment_expires_at: expires,
        enrolled_at: None,
        created_by: op.name.clone(),
        created_at: now,
        current_serial: None,
        previous_serial: None,
        mode,
        key_ref,
    })
    .await
    .map_err(|e| ApiError::from(e).by(op.actor()))?;
    tx.insert_request(&ApprovalRequest::pending(&request_id, "register-cluster", &req.name, &payload, &op.name, now))
        .await?;
    tx.audit(AuditEvent::new(
        op.actor(),
        "cluster.register.requested",
        &req.name,
        json!({"request_id": request_id, "cluster": payload}),
    ))
    .await?;
    tx.commit().await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(RegisterResponse {
            cluster: req.name,
            status: "pending-approval".into(),
            request_id,
            enrolment_token: token,
            enrolment_expires_at: expires,
        }),
    )
        .into_response())
}

#[utoipa::path(get, path = "/v1/clusters", responses((status = 200, body = [ClusterView])), security(("bearer" = [])))]
async fn list_clusters(State(state): State<AppState>, op: Operator) -> Result<Json<Vec<ClusterView>>, ApiError> {
    op.require(&[Role::Operator, Role::Admin, Role::Auditor], "listing clusters")?;
    Ok(Json(state.store.list_clusters().await?.into_iter().map(Into::into).collect()))
}

#[utoipa::path(get, path = "/v1/clusters/{name}", responses((status = 200, body = ClusterView), (status = 404, body = Problem)), security(("bearer" = [])))]
async fn get_cluster(
    State(state): State<AppState>,
    op: Operator,
    Path(name): Path<String>,
) -> Result<Json<ClusterView>, ApiError> {
    op.require(&[Role::Operator, Role::Admin, Role::Auditor], "reading clusters")?;
    let c = state
        .store
        .get_cluster(&name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no cluster {name:?}")).by(op.actor()))?;
    Ok(Json(c.into()))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct IntermediateRequest {
    /// PEM CSR for the cluster intermediate. Only its public key is used.
    csr: String,
}

#[derive(Serialize, ToSchema)]
struct IntermediateResponse {
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

enum Caller {
    Enrolment { token_hash: String },
    Renewal { serial: String },
}

/// Enrols (first time, with the enrolment token as `Authorization: Bearer`) or renews (over
/// mTLS with the cluster's current, unexpired, unrevoked intermediate) a cluster intermediate.
#[utoipa::path(post, path = "/v1/clusters/{name}/intermediate", request_body = IntermediateRequest,
    responses((status = 200, body = IntermediateResponse), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem), (status = 503, body = Problem)))]
async fn issue_intermediate(
    State(state): State<AppState>,
    Path(name): Path<String>,
    conn: Option<Extension<ConnInfo>>,
    headers: HeaderMap,
    Body(req): Body<IntermediateRequest>,
) -> Result<Json<IntermediateResponse>, ApiError> {
    // Until the caller has proved who it is, refusals are recorded as anonymous: the name in
    // the URL is only a claim.
    let claimed = |e: ApiError| ApiError { detail: format!("{} (claimed cluster {name:?})", e.detail), ..e };
    let cluster =
        state.store.get_cluster(&name).await?.ok_or_else(|| claimed(ApiError::not_found("no such cluster")))?;
    let now = now_secs();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let peer = conn.as_ref().and_then(|c| c.peer_cert.clone());
    let token_invalid = || {
        ApiError::unauthenticated("enrolment-token-invalid", "the enrolment token is invalid, expired or already used")
    };
    let caller = if let Some(token) = bearer {
        let h = token_hash(token);
        let usable = cluster.status == "active"
            && cluster.enrolled_at.is_none()
            && cluster.enrolment_token_hash.as_deref() == Some(h.as_str())
            && cluster.enrolment_expires_at.is_some_and(|e| e > now);
        if !usable {
            if cluster.status == "pending" && cluster.enrolment_token_hash.as_deref() == Some(h.as_str()) {
                return Err(ApiError::conflict(
                    "cluster-not-active",
                    "the cluster's registration awaits approval by a second operator",
                )
                .by(format!("cluster:{name}")));
            }
            return Err(claimed(token_invalid()));
        }
        Caller::Enrolment { token_hash: h }
    } else if let Some(der) = peer {
        // Refused before the HSM signs anything; checked again under the write lock below.
        let rec = presented_intermediate(&state, &cluster, &der, now).await?;
        Caller::Renewal { serial: rec.serial }
    } else {
        return Err(claimed(ApiError::unauthenticated(
            "unauthenticated",
            "enrol with the enrolment token (Authorization: Bearer) or renew over mTLS with the current intermediate",
        )));
    };
    let actor = format!("cluster:{name}");
    let deny = |e: ApiError| e.by(actor.clone());

    let csr = VerifiedCsr::parse(req.csr.as_bytes()).map_err(|e| deny(crate::state::map_core(e.into())))?;
    let issuer = state.issuer(&cluster.environment)?.clone();
    let request = cluster_request(&state, &issuer, &cluster, csr.public_key().clone()).map_err(&deny)?;
    let result = issuer.with_key(state.hsm_timeout(), move |ca| ca_core::issue::issue(ca, &request)).await;
    let issued = match result {
        Ok(i) => i,
        Err(e) => {
            state.metrics.issued(&issuer.name, "cluster", "error");
            return Err(deny(e));
        }
    };
    let cert = issued.cert;
    let mut tx = state.store.write().await?;
    // Everything checked before signing is checked again under the write lock: a revocation,
    // another renewal or a replayed token may have landed meanwhile. The loser's certificate is
    // never recorded nor returned.
    let (via, renewed_from) = match &caller {
        Caller::Enrolment { token_hash } => {
            if !tx.consume_enrolment(&name, token_hash, now).await? {
                return Err(deny(token_invalid()));
            }
            ("enrolment", None)
        }
        Caller::Renewal { serial } => {
            let current = tx.get_cluster(&name).await?.ok_or_else(|| deny(ApiError::not_found("no such cluster")))?;
            let presented = tx
                .get_certificate(serial)
                .await?
                .ok_or_else(|| ApiError::internal("presented certificate vanished"))?;
            let successor_revoked = match &current.current_serial {
                Some(c) if c != serial => tx.get_certificate(c).await?.is_some_and(|c| c.revoked_at.is_some()),
                _ => false,
            };
            renewal_allowed(&presented, &current, successor_revoked, now).map_err(&deny)?;
            ("renewal", Some(serial.clone()))
        }
    };
    let record = cert_record(&cert, &issuer.name, Some(&name), "cluster", &actor);
    record_issued(&mut tx, &record, &actor, json!({"issuer": issuer.name, "via": via, "renewed_from": renewed_from}))
        .await?;
    tx.set_current(&name, &cert.serial, renewed_from.as_deref()).await?;
    tx.commit().await?;
    state.metrics.issued(&issuer.name, "cluster", "ok");
    let chain: Vec<String> = std::iter::once(&cert).chain(&issuer_chain(&issuer)).map(CertInfo::pem).collect();
    Ok(Json(IntermediateResponse {
        serial: cert.serial.clone(),
        not_after: ca_core::error::fmt_time(cert.not_after),
        certificate: cert.pem(),
        chain,
        trust_bundle: issuer.roots.iter().map(CertInfo::pem).collect(),
    }))
}

/// The intermediate a cluster presented over mTLS, if it may act for the cluster (renew, or
/// report what it has installed): one of our issuers' intermediates for this cluster (it
/// chains to `tls.client_ca` and the inventory knows it; TLS only proved the client holds its
/// key), unrevoked, unexpired, and the cluster's newest or the one it last renewed with.
async fn presented_intermediate(
    state: &AppState,
    cluster: &ClusterRecord,
    der: &[u8],
    now: i64,
) -> Result<CertRecord, ApiError> {
    let name = &cluster.name;
    let fp = hex::encode(sha2::Sha256::digest(der));
    let rejected = || {
        ApiError::unauthenticated(
            "client-certificate-rejected",
            format!("certificate sha256:{fp} is not an intermediate of this cluster (claimed cluster {name:?})"),
        )
    };
    if !state.client_chain_ok(der) {
        return Err(rejected());
    }
    let rec = match state.store.get_certificate_by_fingerprint(&fp).await? {
        Some(r) if r.cluster.as_deref() == Some(name.as_str()) => r,
        _ => return Err(rejected()),
    };
    let successor_revoked = match &cluster.current_serial {
        Some(c) if *c != rec.serial => state.store.get_certificate(c).await?.is_some_and(|c| c.revoked_at.is_some()),
        _ => false,
    };
    renewal_allowed(&rec, cluster, successor_revoked, now).map_err(|e| e.by(format!("cluster:{name}")))?;
    Ok(rec)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct InstalledReport {
    /// SHA-256 fingerprints (hex) of the certificates in the installed `root-cert.pem`.
    bundle: Vec<String>,
    /// SHA-256 fingerprints of the installed `ca-cert.pem`, then of `cert-chain.pem`'s.
    chain: Vec<String>,
    /// Serial of the installed `ca-cert.pem`.
    intermediate_serial: String,
}

#[derive(Serialize, ToSchema)]
struct ReportResponse {
    /// The bundle the cluster should have installed now (PEM roots).
    trust_bundle: Vec<String>,
    /// True when the cluster should renew now (a rotation moved its chain), with why.
    renew: bool,
    reason: Option<String>,
}

/// A plug-in cluster reports what it has installed (over mTLS, like a renewal) and learns the
/// bundle it should hold and whether to renew now. Rotation gates read these reports.
#[utoipa::path(post, path = "/v1/clusters/{name}/report", request_body = InstalledReport,
    responses((status = 200, body = ReportResponse), (status = 400, body = Problem), (status = 401, body = Problem), (status = 404, body = Problem)))]
async fn report_installed(
    State(state): State<AppState>,
    Path(name): Path<String>,
    conn: Option<Extension<ConnInfo>>,
    Body(req): Body<InstalledReport>,
) -> Result<Json<ReportResponse>, ApiError> {
    let cluster = state
        .store
        .get_cluster(&name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no such cluster (claimed cluster {name:?})")))?;
    let der = conn.as_ref().and_then(|c| c.peer_cert.clone()).ok_or_else(|| {
        ApiError::unauthenticated("unauthenticated", "report over mTLS with the cluster's current intermediate")
    })?;
    let now = now_secs();
    presented_intermediate(&state, &cluster, &der, now).await?;
    let actor = format!("cluster:{name}");
    let valid_fp = |f: &String| f.len() == 64 && f.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if req.bundle.is_empty()
        || req.bundle.len() > 16
        || req.chain.is_empty()
        || req.chain.len() > 16
        || !req.bundle.iter().chain(&req.chain).all(valid_fp)
    {
        return Err(ApiError::bad_request(
            "invalid-report",
            "bundle and chain are 1 to 16 lowercase hex SHA-256 fingerprints each",
        )
        .by(actor));
    }
    let installed = state
        .store
        .get_certificate(&normalise_serial(&req.intermediate_serial))
        .await?
        .filter(|c| c.cluster.as_deref() == Some(name.as_str()))
        .ok_or_else(|| {
            ApiError::bad_request("invalid-report", "intermediate_serial is not an intermediate of this cluster")
                .by(actor.clone())
        })?;
    if req.chain[0] != installed.fingerprint {
        return Err(ApiError::bad_request(
            "invalid-report",
            "chain must start with the installed intermediate named by intermediate_serial",
        )
        .by(actor));
    }
    let issuer = state.issuer(&cluster.environment)?;
    let bundle: std::collections::BTreeSet<&String> = req.bundle.iter().collect();
    let report = ca_core::store::ClusterReport {
        cluster: name.clone(),
        bundle: serde_json::to_string(&bundle).map_err(ApiError::internal)?,
        chain: serde_json::to_string(&req.chain).map_err(ApiError::internal)?,
        intermediate_serial: installed.serial.clone(),
        reported_at: now,
    };
    let (bundle_changed, reissue_after) = crate::rotation::changed_at(&state, &cluster).await?;
    // A report that repeats the stored one, made since the last stage change, tells the gates
    // nothing new: it is not written, so repeated reports cost no write lock.
    let stored = state.store.get_cluster_report(&name).await?;
    let news = stored.is_none_or(|r| {
        r.bundle != report.bundle
            || r.chain != report.chain
            || r.intermediate_serial != report.intermediate_serial
            || r.reported_at < bundle_changed.max(reissue_after)
    });
    if news {
        let mut tx = state.store.write().await?;
        tx.put_cluster_report(&report).await?;
        tx.commit().await?;
    }
    let reason = if !req.chain.contains(&issuer.cert.fingerprint()) {
        Some(format!("the installed chain does not go through {}'s current certificate", issuer.name))
    } else if installed.issued_at < reissue_after {
        Some("a rotation moved this cluster's chain after its intermediate was issued".to_string())
    } else {
        None
    };
    Ok(Json(ReportResponse {
        trust_bundle: issuer.roots.iter().map(CertInfo::pem).collect(),
        renew: reason.is_some(),
        reason,
    }))
}

fn superseded(serial: &str) -> ApiError {
    ApiError::unauthenticated(
        "client-certificate-superseded",
        format!("intermediate {serial} has been superseded; renew with the cluster's newest intermediate"),
    )
}

/// The presented intermediate may renew: unrevoked, unexpired, its cluster active, and it is
/// the cluster's newest intermediate, or the one the cluster last renewed with (whose response
/// may have been lost on the way back).
fn renewal_allowed(
    rec: &CertRecord,
    cluster: &ClusterRecord,
    successor_revoked: bool,
    now: i64,
) -> Result<(), ApiError> {
    if rec.revoked_at.is_some() {
        return Err(ApiError::unauthenticated(
            "client-certificate-revoked",
            format!("intermediate {} is revoked; enrol again", rec.serial),
        ));
    }
    if rec.not_after <= now {
        return Err(ApiError::unauthenticated(
            "client-certificate-expired",
            format!("intermediate {} has expired; enrol again", rec.serial),
        ));
    }
    if cluster.status != "active" {
        return Err(ApiError::conflict(
            "cluster-not-active",
            format!("cluster {} is {}", cluster.name, cluster.status),
        ));
    }
    let serial = Some(rec.serial.as_str());
    if cluster.current_serial.as_deref() == serial {
        return Ok(());
    }
    // The previous intermediate stands in for a newest one that never arrived, but not for
    // one that was revoked: then the cluster enrols again.
    if cluster.previous_serial.as_deref() == serial && !successor_revoked {
        return Ok(());
    }
    Err(superseded(&rec.serial))
}

/// The issuer followed by its parents (the chain a cluster certificate needs above it).
fn issuer_chain(issuer: &Issuer) -> Vec<CertInfo> {
    std::iter::once(issuer.cert.clone()).chain(issuer.chain.iter().cloned()).collect()
}

pub(crate) fn cluster_request(
    state: &AppState,
    issuer: &Issuer,
    cluster: &ClusterRecord,
    key: hsm::PublicKey,
) -> Result<CertRequest, ApiError> {
    let mut subject = rcgen::DistinguishedName::new();
    subject.push(rcgen::DnType::CommonName, format!("{} Cluster CA", cluster.name));
    subject.push(rcgen::DnType::OrganizationalUnitName, cluster.environment.clone());
    let not_before = ca_core::issue::default_not_before();
    // Online issuance clamps to the issuer's lifetime instead of refusing: the environment's
    // own rotation is what extends it.
    let wanted = not_before + state.config.policy.cluster_validity.duration();
    let not_after = wanted.min(issuer.cert.not_after);
    if wanted > issuer.cert.not_after && not_after <= OffsetDateTime::now_utc() + time::Duration::hours(1) {
        return Err(ApiError::unavailable(
            "issuer-expiring",
            format!("issuer {} expires at {}", issuer.name, ca_core::error::fmt_time(issuer.cert.not_after)),
        ));
    }
    Ok(CertRequest {
        trust_domains: vec![
            cluster.trust_domain.parse().map_err(|e| ApiError::internal(format!("stored trust domain: {e}")))?,
        ],
        ..CertRequest::new(ProfileKind::Cluster, subject, key, not_before, not_after)
    })
}

/// Records a new certificate in the inventory together with its `certificate.issued` audit
/// record: the common fields (cluster, profile, notAfter, fingerprint) plus `extra`.
pub(crate) async fn record_issued(
    tx: &mut ca_core::store::Tx,
    record: &CertRecord,
    actor: &str,
    extra: serde_json::Value,
) -> Result<(), ApiError> {
    tx.insert_certificate(record).await?;
    let mut details = json!({"cluster": record.cluster, "profile": record.profile,
                             "not_after": record.not_after, "sha256_fingerprint": record.fingerprint});
    if let (Some(d), serde_json::Value::Object(e)) = (details.as_object_mut(), extra) {
        d.extend(e);
    }
    tx.audit(AuditEvent::new(actor, "certificate.issued", &record.serial, details)).await?;
    Ok(())
}

pub(crate) fn cert_record(
    cert: &CertInfo,
    issuer: &str,
    cluster: Option<&str>,
    profile: &str,
    requester: &str,
) -> CertRecord {
    let sans: Vec<String> = cert.uris.iter().chain(&cert.dns_names).cloned().collect();
    CertRecord {
        serial: cert.serial.clone(),
        issuer: issuer.into(),
        cluster: cluster.map(Into::into),
        profile: profile.into(),
        subject: cert.subject.clone(),
        sans: serde_json::to_string(&sans).expect("strings serialise"),
        not_before: cert.not_before.unix_timestamp(),
        not_after: cert.not_after.unix_timestamp(),
        fingerprint: cert.fingerprint(),
        requester: requester.into(),
        pem: cert.pem(),
        issued_at: now_secs(),
        revoked_at: None,
        revocation_reason: None,
    }
}

/// Asks for a new one-time enrolment token for an existing cluster: after its newest
/// intermediate was revoked, or a failed enrolment left it without one. Takes effect when a
/// different operator approves.
#[utoipa::path(post, path = "/v1/clusters/{name}/enrolment",
    responses((status = 202, body = RegisterResponse), (status = 404, body = Problem), (status = 409, body = Problem)), security(("bearer" = [])))]
async fn reissue_enrolment(
    State(state): State<AppState>,
    op: Operator,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    op.require(&[Role::Operator, Role::Admin], "re-issuing an enrolment token")?;
    let cluster = state
        .store
        .get_cluster(&name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no cluster {name:?}")).by(op.actor()))?;
    if cluster.status != "active" {
        return Err(
            ApiError::conflict("cluster-not-active", format!("cluster {name} is {}", cluster.status)).by(op.actor())
        );
    }
    if cluster.is_external_ca() {
        return Err(ApiError::conflict(
            "external-ca-cluster",
            format!("cluster {name} is in external-ca mode: the server holds its key, nothing enrols"),
        )
        .by(op.actor()));
    }
    let now = now_secs();
    let token = new_token();
    let expires = now + state.config.policy.enrolment_token_ttl.duration().whole_seconds();
    let request_id = uuid::Uuid::new_v4().to_string();
    let mut tx = state.store.write().await?;
    tx.insert_request(&ApprovalRequest::pending(
        &request_id,
        "reissue-enrolment",
        &name,
        &json!({"token_hash": token_hash(&token), "expires_at": expires}),
        &op.name,
        now,
    ))
    .await?;
    tx.audit(AuditEvent::new(op.actor(), "cluster.enrolment.requested", &name, json!({"request_id": request_id})))
        .await?;
    tx.commit().await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(RegisterResponse {
            cluster: name,
            status: "pending-approval".into(),
            request_id,
            enrolment_token: Some(token),
            enrolment_expires_at: Some(expires),
        }),
    )
        .into_response())
}

// ---- trust distribution -------------------------------------------------------------------

/// Every root a cluster trusts: its environment's roots.
async fn cluster_roots(state: &AppState, name: &str) -> Result<Vec<CertInfo>, ApiError> {
    let cluster = state
        .store
        .get_cluster(name)
        .await?
        .filter(|c| c.status == "active")
        .ok_or_else(|| ApiError::not_found(format!("no active cluster {name:?}")))?;
    Ok(state.issuer(&cluster.environment)?.roots.clone())
}

/// The cluster's trust bundle (PEM): what `root-cert.pem`, the `istio-ca-root-cert` ConfigMap
/// and the last element of every external-CA response carry. Public, like the CRLs: roots
/// are not secrets, and a new node needs them before it holds any credential.
#[utoipa::path(get, path = "/v1/clusters/{name}/trust-bundle",
    responses((status = 200, description = "PEM roots", content_type = "application/x-pem-file"), (status = 404, body = Problem)))]
async fn trust_bundle(State(state): State<AppState>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let pem: String = cluster_roots(&state, &name).await?.iter().map(CertInfo::pem).collect();
    Ok(([(header::CONTENT_TYPE, "application/x-pem-file")], pem).into_response())
}

#[derive(Deserialize, IntoParams)]
struct ConfigMapQuery {
    /// Namespace of the rendered ConfigMap (default `istio-system`).
    namespace: Option<String>,
}

/// The trust bundle as the `istio-ca-root-cert` ConfigMap Istio workloads mount. In
/// external-CA mode istiod does not publish it; apply this to every namespace.
#[utoipa::path(get, path = "/v1/clusters/{name}/trust-bundle/configmap", params(ConfigMapQuery),
    responses((status = 200, description = "ConfigMap YAML", content_type = "application/yaml"), (status = 404, body = Problem)))]
async fn trust_bundle_configmap(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<ConfigMapQuery>,
) -> Result<Response, ApiError> {
    let namespace = q.namespace.unwrap_or_else(|| "istio-system".into());
    if !valid_cluster_name(&namespace) {
        return Err(ApiError::bad_request("invalid-namespace", "namespace must be a Kubernetes name"));
    }
    let pem: String = cluster_roots(&state, &name).await?.iter().map(CertInfo::pem).collect();
    let body: String = pem.lines().map(|l| format!("    {l}\n")).collect();
    let yaml = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: istio-ca-root-cert\n  namespace: {namespace}\n  labels:\n    istio.io/config: \"true\"\n  annotations:\n    pki-mesh/cluster: {name}\ndata:\n  root-cert.pem: |\n{body}"
    );
    Ok(([(header::CONTENT_TYPE, "application/yaml")], yaml).into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ServerCertRequest {
    /// PEM CSR. Only its public key is used.
    csr: String,
    /// DNS names (e.g. `istiod.istio-system.svc`).
    dns_names: Vec<String>,
    /// Lifetime, e.g. `30d` (default 30d, at most 90d, never past the intermediate).
    validity: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct ServerCertResponse {
    serial: String,
    not_after: String,
    certificate: String,
    /// The cluster intermediate and its parents below the root (PEM).
    chain: Vec<String>,
    trust_bundle: Vec<String>,
}

/// Issues a TLS server certificate (e.g. istiod's own, which it needs when its CA is off) from
/// an external-CA cluster's intermediate.
#[utoipa::path(post, path = "/v1/clusters/{name}/server-certificates", request_body = ServerCertRequest,
    responses((status = 200, body = ServerCertResponse), (status = 400, body = Problem), (status = 403, body = Problem), (status = 503, body = Problem)),
    security(("bearer" = [])))]
async fn issue_server_certificate(
    State(state): State<AppState>,
    op: Operator,
    Path(name): Path<String>,
    Body(req): Body<ServerCertRequest>,
) -> Result<Json<ServerCertResponse>, ApiError> {
    op.require(&[Role::Admin], "issuing server certificates")?;
    let deny = |e: ApiError| e.by(op.actor());
    let validity: time::Duration = match &req.validity {
        None => time::Duration::days(30),
        Some(v) => v
            .parse::<ca_core::duration::Validity>()
            .map_err(|e| deny(ApiError::bad_request("invalid-validity", e.to_string())))?
            .duration(),
    };
    if validity <= time::Duration::ZERO || validity > time::Duration::days(90) {
        return Err(deny(ApiError::bad_request("invalid-validity", "validity must be positive and at most 90d")));
    }
    if req.dns_names.is_empty()
        || req.dns_names.iter().any(|n| {
            n.is_empty()
                || n.len() > 253
                || !n.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                })
        })
    {
        return Err(deny(ApiError::bad_request(
            "invalid-names",
            "dns_names must be one or more lowercase DNS names without wildcards",
        )));
    }
    // A certificate for any name under the mesh root would let one person intercept istiod's
    // traffic: only the names configured for the cluster, never the CA's own.
    let allowed = state
        .config
        .istio
        .as_ref()
        .and_then(|c| c.clusters.get(&name))
        .map(|c| c.server_certificate_names.clone())
        .unwrap_or_else(crate::config::default_server_certificate_names);
    let own = state.config.istio.as_ref().map(|c| c.server_names.clone()).unwrap_or_default();
    if let Some(n) = req.dns_names.iter().find(|n| !allowed.contains(n) || own.contains(n)) {
        return Err(deny(ApiError::forbidden(
            "name-not-allowed",
            format!("{n} is not among istio.clusters.{name}.server_certificate_names ({})", allowed.join(", ")),
        )));
    }
    let ca = crate::istio::cluster_ca(&state, &name).await.map_err(deny)?;
    let csr = VerifiedCsr::parse(req.csr.as_bytes()).map_err(|e| deny(crate::state::map_core(e.into())))?;
    let not_before = ca_core::issue::default_not_before();
    let not_after = (not_before + validity).min(ca.issuer.cert.not_after);
    let mut subject = rcgen::DistinguishedName::new();
    subject.push(rcgen::DnType::CommonName, req.dns_names[0].clone());
    let request = CertRequest {
        server_names: req.dns_names.clone(),
        ..CertRequest::new(ProfileKind::Server, subject, csr.public_key().clone(), not_before, not_after)
    };
    let cert =
        ca.issuer.with_key(state.hsm_timeout(), move |c| ca_core::issue::issue(c, &request)).await.map_err(deny)?.cert;
    let record = cert_record(&cert, &format!("cluster:{name}"), Some(&name), "server", &op.actor());
    let mut tx = state.store.write().await?;
    record_issued(&mut tx, &record, &op.actor(), json!({"issuer": ca.serial, "names": req.dns_names})).await?;
    tx.commit().await?;
    state.metrics.issued(&name, "server", "ok");
    Ok(Json(ServerCertResponse {
        serial: cert.serial.clone(),
        not_after: ca_core::error::fmt_time(cert.not_after),
        certificate: cert.pem(),
        chain: ca.chain_pem.clone(),
        trust_bundle: ca.issuer.roots.iter().map(CertInfo::pem).collect(),
    }))
}

// ---- two-person rule ----------------------------------------------------------------------

#[derive(Serialize, ToSchema)]
struct RequestView {
    id: String,
    kind: String,
    subject: String,
    payload: serde_json::Value,
    requested_by: String,
    requested_at: i64,
    status: String,
    decided_by: Option<String>,
    decided_at: Option<i64>,
}

impl From<ApprovalRequest> for RequestView {
    fn from(r: ApprovalRequest) -> Self {
        RequestView {
            id: r.id,
            kind: r.kind,
            subject: r.subject,
            payload: {
                let mut p: serde_json::Value = serde_json::from_str(&r.payload).unwrap_or(serde_json::Value::Null);
                // Only a hash, but nobody needs it.
                if let Some(o) = p.as_object_mut() {
                    o.remove("token_hash");
                }
                p
            },
            requested_by: r.requested_by,
            requested_at: r.requested_at,
            status: r.status,
            decided_by: r.decided_by,
            decided_at: r.decided_at,
        }
    }
}

#[derive(Deserialize, IntoParams)]
struct RequestQuery {
    /// `pending`, `approved` or `rejected`.
    status: Option<String>,
}

#[utoipa::path(get, path = "/v1/requests", params(RequestQuery), responses((status = 200, body = [RequestView])), security(("bearer" = [])))]
async fn list_requests(
    State(state): State<AppState>,
    op: Operator,
    Query(q): Query<RequestQuery>,
) -> Result<Json<Vec<RequestView>>, ApiError> {
    op.require(&[Role::Operator, Role::Admin, Role::Auditor], "listing requests")?;
    Ok(Json(state.store.list_requests(q.status.as_deref()).await?.into_iter().map(Into::into).collect()))
}

/// Approves a pending request. The approver must not be the requester.
#[utoipa::path(post, path = "/v1/requests/{id}/approve",
    responses((status = 200, body = RequestView), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = [])))]
async fn approve_request(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<Json<RequestView>, ApiError> {
    decide(state, op, id, true).await
}

#[utoipa::path(post, path = "/v1/requests/{id}/reject",
    responses((status = 200, body = RequestView), (status = 404, body = Problem), (status = 409, body = Problem)), security(("bearer" = [])))]
async fn reject_request(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<Json<RequestView>, ApiError> {
    decide(state, op, id, false).await
}

async fn decide(state: AppState, op: Operator, id: String, approve: bool) -> Result<Json<RequestView>, ApiError> {
    op.require(&[Role::Operator, Role::Admin], "deciding requests")?;
    // Rotation approvals judge against this replica's issuers: bring them up to date before
    // the write transaction, which must not wait on opening a key.
    crate::rotation::refresh_quietly(&state).await;
    let mut tx = state.store.write().await?;
    let req =
        tx.get_request(&id).await?.ok_or_else(|| ApiError::not_found(format!("no request {id:?}")).by(op.actor()))?;
    if req.status != "pending" {
        return Err(
            ApiError::conflict("already-decided", format!("request {id} is already {}", req.status)).by(op.actor())
        );
    }
    if approve && req.requested_by == op.name {
        return Err(
            ApiError::forbidden("two-person-rule", "a different operator must approve this request").by(op.actor())
        );
    }
    let now = now_secs();
    let status = if approve { "approved" } else { "rejected" };
    if !tx.decide_request(&id, status, &op.name, now).await? {
        return Err(
            ApiError::conflict("already-decided", format!("request {id} was decided concurrently")).by(op.actor())
        );
    }
    tx.audit(AuditEvent::new(
        op.actor(),
        format!("request.{status}"),
        &id,
        json!({"kind": req.kind, "subject": req.subject, "requested_by": req.requested_by}),
    ))
    .await?;
    let payload: serde_json::Value = serde_json::from_str(&req.payload).map_err(ApiError::internal)?;
    let mut republish = None;
    let mut external_ca = None;
    let mut revoked_cluster: Option<String> = None;
    let mut rotation = None;
    match (req.kind.as_str(), approve) {
        ("start-rotation", true) => {
            rotation = Some(crate::rotation::approve_start(&state, &mut tx, &req, &op).await?);
        }
        ("rotation-stage", true) => {
            rotation = Some(crate::rotation::approve_stage(&state, &mut tx, &req, &op).await?);
        }
        ("register-cluster", true) => {
            tx.set_cluster_status(&req.subject, "active").await?;
            if payload["mode"].as_str() == Some(ca_core::store::MODE_EXTERNAL_CA) {
                external_ca = Some(req.subject.clone());
            }
            tx.audit(AuditEvent::new(op.actor(), "cluster.registered", &req.subject, payload)).await?;
        }
        ("register-cluster", false) => {
            tx.set_cluster_status(&req.subject, "rejected").await?;
        }
        ("reissue-enrolment", true) => {
            let (Some(hash), Some(expires)) = (payload["token_hash"].as_str(), payload["expires_at"].as_i64()) else {
                return Err(ApiError::internal("reissue request without a token"));
            };
            if !tx.rearm_enrolment(&req.subject, hash, expires).await? {
                return Err(ApiError::conflict("cluster-not-active", format!("cluster {} is not active", req.subject))
                    .by(op.actor()));
            }
            tx.audit(AuditEvent::new(
                op.actor(),
                "cluster.enrolment.reissued",
                &req.subject,
                json!({"expires_at": expires}),
            ))
            .await?;
        }
        ("revoke-certificate", true) => {
            let reason = payload["reason"].as_str().unwrap_or("unspecified").to_string();
            let serial = req.subject.clone();
            let cert = tx
                .get_certificate(&serial)
                .await?
                .ok_or_else(|| ApiError::not_found(format!("no certificate {serial}")))?;
            if tx.revoke_certificate(&serial, &reason, now).await? {
                tx.audit(AuditEvent::new(
                    op.actor(),
                    "certificate.revoked",
                    &serial,
                    json!({"reason": reason, "issuer": cert.issuer, "cluster": cert.cluster}),
                ))
                .await?;
                republish = Some(cert.issuer.clone());
                revoked_cluster = cert.cluster.clone();
            }
        }
        _ => {}
    }
    tx.commit().await?;
    if let Some(a) = rotation {
        crate::rotation::after_commit(&state, a, &op.actor()).await;
    }
    // The revocation stands even if the HSM is away right now: the CRL follows here, or from
    // the background job, which treats a CRL older than the last revocation as due.
    if let Some(issuer_name) = republish {
        // A revoked external-CA intermediate stops signing on this replica now, and gets a
        // successor (other replicas drop theirs at their next maintenance round).
        if let Some(cluster) = revoked_cluster.as_deref() {
            state.istio.forget(cluster);
            if let Err(e) = crate::istio::ensure_intermediate(&state, cluster, &op.actor()).await {
                tracing::warn!(%cluster, error = %e.detail, "successor intermediate not issued yet; the background job will retry");
            }
        }
        let issuer = state.issuer(&issuer_name)?.clone();
        if let Err(e) = publish_crl(&state, &issuer, &op.actor()).await {
            tracing::warn!(issuer = %issuer_name, error = %e.detail, "CRL not regenerated yet; the background job will retry");
        }
    }
    // The approval stands even if the key is away right now; the background job retries.
    if let Some(name) = external_ca {
        if let Err(e) = crate::istio::ensure_intermediate(&state, &name, &op.actor()).await {
            tracing::warn!(cluster = %name, error = %e.detail, "external-CA intermediate not issued yet; the background job will retry");
        }
    }
    let decided = state.store.get_request(&id).await?.ok_or_else(|| ApiError::internal("request vanished"))?;
    Ok(Json(decided.into()))
}

// ---- inventory and revocation -------------------------------------------------------------

#[derive(Serialize, ToSchema)]
struct CertificateView {
    serial: String,
    issuer: String,
    cluster: Option<String>,
    profile: String,
    subject: String,
    sans: Vec<String>,
    not_before: i64,
    not_after: i64,
    /// `valid`, `revoked` or `expired`.
    status: String,
    sha256_fingerprint: String,
    requester: String,
    issued_at: i64,
    revoked_at: Option<i64>,
    revocation_reason: Option<String>,
    pem: String,
}

impl From<CertRecord> for CertificateView {
    fn from(r: CertRecord) -> Self {
        let status = if r.revoked_at.is_some() {
            "revoked"
        } else if r.not_after <= now_secs() {
            "expired"
        } else {
            "valid"
        };
        CertificateView {
            serial: r.serial,
            issuer: r.issuer,
            cluster: r.cluster,
            profile: r.profile,
            subject: r.subject,
            sans: serde_json::from_str(&r.sans).unwrap_or_default(),
            not_before: r.not_before,
            not_after: r.not_after,
            status: status.into(),
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
struct CertQuery {
    cluster: Option<String>,
    issuer: Option<String>,
    /// `valid`, `revoked` or `expired`.
    status: Option<String>,
    /// A duration such as `30d`: valid certificates expiring within it.
    expiring_within: Option<String>,
    /// At most 1000; default 100.
    limit: Option<i64>,
}

#[utoipa::path(get, path = "/v1/certificates", params(CertQuery), responses((status = 200, body = [CertificateView]), (status = 400, body = Problem)), security(("bearer" = [])))]
async fn list_certificates(
    State(state): State<AppState>,
    op: Operator,
    Query(q): Query<CertQuery>,
) -> Result<Json<Vec<CertificateView>>, ApiError> {
    op.require(&[Role::Operator, Role::Admin, Role::Auditor], "listing certificates")?;
    if let Some(s) = &q.status {
        if !matches!(s.as_str(), "valid" | "revoked" | "expired") {
            return Err(ApiError::bad_request("invalid-query", "status is valid, revoked or expired").by(op.actor()));
        }
    }
    let expiring = match &q.expiring_within {
        Some(d) => Some(
            d.parse::<ca_core::duration::Validity>()
                .map_err(|e| ApiError::bad_request("invalid-query", format!("expiring_within: {e}")).by(op.actor()))?
                .duration()
                .whole_seconds(),
        ),
        None => None,
    };
    let filter = CertFilter {
        cluster: q.cluster,
        issuer: q.issuer,
        status: q.status,
        expiring_within_secs: expiring,
        now: now_secs(),
        limit: q.limit.unwrap_or(100).clamp(1, 1000),
    };
    Ok(Json(state.store.list_certificates(&filter).await?.into_iter().map(Into::into).collect()))
}

/// A serial as the inventory stores it (lowercase hex, no colons, no sign pad); input that is
/// not a serial at all simply matches nothing.
fn normalise_serial(s: &str) -> String {
    ca_core::crl::parse_serial(s).map(hex::encode).unwrap_or_else(|_| s.to_ascii_lowercase())
}

#[utoipa::path(get, path = "/v1/certificates/{serial}", responses((status = 200, body = CertificateView), (status = 404, body = Problem)), security(("bearer" = [])))]
async fn get_certificate(
    State(state): State<AppState>,
    op: Operator,
    Path(serial): Path<String>,
) -> Result<Json<CertificateView>, ApiError> {
    op.require(&[Role::Operator, Role::Admin, Role::Auditor], "reading certificates")?;
    let serial = normalise_serial(&serial);
    if let Some(r) = state.store.get_certificate(&serial).await? {
        return Ok(Json(r.into()));
    }
    // Workload certificates live in their own table (batched, pruned after retention).
    let w = state
        .store
        .get_workload_certificate(&serial)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no certificate {serial}")).by(op.actor()))?;
    let cert = CertInfo::from_der(w.der.clone()).map_err(ApiError::internal)?;
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
        status: if w.not_after <= now { "expired".into() } else { "valid".into() },
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
struct RevokeRequest {
    /// RFC 5280 reason: unspecified, key-compromise, ca-compromise, affiliation-changed,
    /// superseded, cessation-of-operation, certificate-hold or privilege-withdrawn.
    reason: String,
}

/// Asks to revoke a certificate. Takes effect when a different operator approves.
#[utoipa::path(post, path = "/v1/certificates/{serial}/revoke", request_body = RevokeRequest,
    responses((status = 202, body = RequestView), (status = 400, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = [])))]
async fn revoke_certificate(
    State(state): State<AppState>,
    op: Operator,
    Path(serial): Path<String>,
    Body(req): Body<RevokeRequest>,
) -> Result<Response, ApiError> {
    op.require(&[Role::Operator, Role::Admin], "revoking certificates")?;
    let reason: Reason =
        req.reason.parse().map_err(|e| ApiError::bad_request("invalid-reason", format!("{e}")).by(op.actor()))?;
    let reason_name = serde_json::to_value(reason).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
    let serial = normalise_serial(&serial);
    let cert = state
        .store
        .get_certificate(&serial)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no certificate {serial}")).by(op.actor()))?;
    if cert.revoked_at.is_some() {
        return Err(
            ApiError::conflict("already-revoked", format!("certificate {serial} is already revoked")).by(op.actor())
        );
    }
    if !state.issuers.contains_key(&cert.issuer) {
        return Err(ApiError::conflict(
            "no-crl",
            format!(
                "certificate {serial} was issued by {}, which publishes no CRL: let it expire (keep server certificates short) or rotate that intermediate",
                cert.issuer
            ),
        )
        .by(op.actor()));
    }
    let now = now_secs();
    let request = ApprovalRequest::pending(
        &uuid::Uuid::new_v4().to_string(),
        "revoke-certificate",
        &serial,
        &json!({"serial": serial, "reason": reason_name, "cluster": cert.cluster, "issuer": cert.issuer}),
        &op.name,
        now,
    );
    let mut tx = state.store.write().await?;
    tx.insert_request(&request).await?;
    tx.audit(AuditEvent::new(
        op.actor(),
        "certificate.revoke.requested",
        &serial,
        json!({"request_id": request.id, "reason": reason_name}),
    ))
    .await?;
    tx.commit().await?;
    Ok((StatusCode::ACCEPTED, Json(RequestView::from(request))).into_response())
}

/// Signs and stores a new CRL for `issuer` with the next CRL number. The HSM signs outside
/// the write lock; the CRL is stored only if no other CRL or revocation landed meanwhile
/// (then it is made again), so numbers stay increasing and every revocation is listed.
pub async fn publish_crl(
    state: &AppState,
    issuer: &std::sync::Arc<Issuer>,
    actor: &str,
) -> Result<CrlRecord, ApiError> {
    for _ in 0..5 {
        let revoked = state.store.revoked_by_issuer(&issuer.name).await?;
        let number = state.store.get_crl(&issuer.name).await?.map_or(1, |c| c.number + 1);
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).expect("0 is valid");
        let next = (now + state.config.crl.validity.duration()).min(issuer.cert.not_after);
        let mut entries = Vec::new();
        for r in &revoked {
            let serial = ca_core::crl::parse_serial(&r.serial)
                .map_err(|e| ApiError::internal(format!("stored serial {}: {e}", r.serial)))?;
            entries.push(ca_core::crl::Revocation {
                serial,
                reason: r.revocation_reason.as_deref().and_then(|x| x.parse().ok()),
                revoked_at: OffsetDateTime::from_unix_timestamp(r.revoked_at.unwrap_or(0))
                    .map_err(ApiError::internal)?,
            });
        }
        let req =
            ca_core::crl::CrlRequest { number: number as u64, this_update: now, next_update: next, revoked: entries };
        let der = issuer.with_key(state.hsm_timeout(), move |ca| ca_core::crl::create_crl(ca, &req)).await?;
        let rec = CrlRecord {
            issuer: issuer.name.clone(),
            number,
            this_update: now.unix_timestamp(),
            next_update: next.unix_timestamp(),
            der: base64::engine::general_purpose::STANDARD.encode(&der),
        };
        let mut tx = state.store.write().await?;
        let still_next = tx.get_crl(&issuer.name).await?.map_or(1, |c| c.number + 1) == number;
        let same_revocations = tx.revoked_by_issuer(&issuer.name).await?.len() == revoked.len();
        if !(still_next && same_revocations) {
            continue;
        }
        tx.put_crl(&rec).await?;
        tx.audit(AuditEvent::new(
            actor,
            "crl.published",
            &issuer.name,
            json!({"number": number, "revoked": revoked.len(), "next_update": rec.next_update}),
        ))
        .await?;
        tx.commit().await?;
        return Ok(rec);
    }
    Err(ApiError::unavailable("busy", format!("the CRL of {} kept changing; try again", issuer.name)))
}

#[derive(Deserialize, IntoParams)]
struct CrlQuery {
    /// `pem` for PEM instead of DER.
    format: Option<String>,
}

/// The issuer's current CRL: DER (`application/pkix-crl`), or PEM with `?format=pem` or
/// `Accept: application/x-pem-file`.
#[utoipa::path(get, path = "/v1/crl/{issuer}", params(CrlQuery),
    responses((status = 200, description = "The CRL", content_type = "application/pkix-crl"), (status = 404, body = Problem), (status = 503, body = Problem)))]
async fn get_crl(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<CrlQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let issuer = state.issuer(&name)?.clone();
    // Normally the background job made it at start; until then, make it now.
    let rec = match state.store.get_crl(&name).await? {
        Some(r) => r,
        None => publish_crl(&state, &issuer, &state.job_actor()).await?,
    };
    let der = base64::engine::general_purpose::STANDARD.decode(&rec.der).map_err(ApiError::internal)?;
    let wants_pem = q.format.as_deref() == Some("pem")
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("application/x-pem-file"));
    if wants_pem {
        Ok(([(header::CONTENT_TYPE, "application/x-pem-file")], ca_core::cert::to_pem("X509 CRL", &der))
            .into_response())
    } else {
        Ok(([(header::CONTENT_TYPE, "application/pkix-crl")], Bytes::from(der)).into_response())
    }
}

// ---- audit --------------------------------------------------------------------------------

#[derive(Serialize, ToSchema)]
struct AuditView {
    seq: i64,
    /// Unix milliseconds.
    time: i64,
    actor: String,
    action: String,
    subject: String,
    details: serde_json::Value,
    prev_hash: String,
    hash: String,
}

#[derive(Deserialize, IntoParams)]
struct AuditQuery {
    /// Return records with a sequence number above this.
    after: Option<i64>,
    /// At most 1000; default 100.
    limit: Option<i64>,
}

#[utoipa::path(get, path = "/v1/audit", params(AuditQuery), responses((status = 200, body = [AuditView])), security(("bearer" = [])))]
async fn list_audit(
    State(state): State<AppState>,
    op: Operator,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Vec<AuditView>>, ApiError> {
    op.require(&[Role::Auditor, Role::Admin], "reading the audit trail")?;
    let records = state.store.audit_after(q.after.unwrap_or(0), q.limit.unwrap_or(100).clamp(1, 1000)).await?;
    Ok(Json(
        records
            .into_iter()
            .map(|r| AuditView {
                seq: r.seq,
                time: r.time,
                actor: r.actor,
                action: r.action,
                subject: r.subject,
                details: serde_json::from_str(&r.details).unwrap_or(serde_json::Value::Null),
                prev_hash: r.prev_hash,
                hash: r.hash,
            })
            .collect(),
    ))
}
