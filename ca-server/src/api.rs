//! The REST API. Handlers translate HTTP to ca-core and storage calls; every state change
//! commits together with its audit record, and every refusal is audited by `audit_denials`.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{MatchedPath, Request, State};
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
use ca_store::{ApprovalRequest, AuditEvent, CertFilter, CertRecord, ClusterRecord, now_secs};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::Digest;
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::auth::{Operator, Role};
use crate::error::{ApiError, Denied, Problem};
use crate::extract::{Path, Query};
use crate::http::body::Body;
use crate::metrics::RouteLabels;
use crate::service::crl::{crl_name, earlier_keys, publish_crl};
use crate::service::issuance::{cert_record, cluster_request, issuer_chain, record_issued};
use crate::service::state::AppState;
use crate::tls::ConnInfo;

pub fn router(state: AppState) -> Router {
    let routes = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
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
        .route("/v1/rotations", post(crate::http::rotations::start).get(crate::http::rotations::list))
        .route("/v1/rotations/{id}", get(crate::http::rotations::get))
        .route("/v1/rotations/{id}/certificates", post(crate::http::rotations::upload_certificate))
        .route("/v1/rotations/{id}/advance", post(crate::http::rotations::advance))
        .route("/v1/rotations/{id}/rollback", post(crate::http::rotations::rollback))
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
    // Probes are never refused and write nothing: they do not draw on the quota. (Scrapes go to
    // the metrics listener, which has no quota; `/metrics` here is an ordinary 404.)
    let probe = matches!(path.as_str(), "/healthz" | "/readyz");
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

#[derive(OpenApi)]
#[openapi(
    info(title = "ca-server", description = "Online issuance, renewal and revocation of cluster intermediates, with an audit trail."),
    paths(
        healthz, readyz, list_issuers, register_cluster, list_clusters, get_cluster, issue_intermediate, reissue_enrolment, list_requests,
        approve_request, reject_request, list_certificates, get_certificate, revoke_certificate, get_crl, list_audit,
        trust_bundle, trust_bundle_configmap, issue_server_certificate, report_installed,
        crate::http::rotations::list, crate::http::rotations::get, crate::http::rotations::start, crate::http::rotations::upload_certificate,
        crate::http::rotations::advance, crate::http::rotations::rollback
    ),
    components(schemas(
        Problem, RegisterCluster, RegisterResponse, ClusterView, IntermediateRequest, IntermediateResponse, RequestView,
        CertificateView, RevokeRequest, IssuerView, AuditView, Ready, ServerCertRequest, ServerCertResponse,
        InstalledReport, ReportResponse, Role, ClusterMode, ClusterState, RequestStatus, CertificateStatus, RevocationReason, CrlFormat
    )),
    modifiers(&BearerAuth, &CommonResponses)
)]
pub struct ApiDoc;

/// A certificate's state in the inventory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum CertificateStatus {
    Valid,
    Revoked,
    Expired,
}

impl CertificateStatus {
    fn as_str(self) -> &'static str {
        match self {
            CertificateStatus::Valid => "valid",
            CertificateStatus::Revoked => "revoked",
            CertificateStatus::Expired => "expired",
        }
    }
}

/// A two-person-rule request's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum RequestStatus {
    Pending,
    Approved,
    Rejected,
}

impl RequestStatus {
    fn as_str(self) -> &'static str {
        match self {
            RequestStatus::Pending => "pending",
            RequestStatus::Approved => "approved",
            RequestStatus::Rejected => "rejected",
        }
    }
}

// The next two document values the store keeps as strings; they are never built in Rust.

/// A cluster's registration state: `pending` until a second operator decides.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
enum ClusterState {
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

/// RFC 5280 revocation reasons, named as ca-core parses them (the list is ca-core's, so the
/// document cannot drift from what the server accepts).
struct RevocationReason;

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

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "An operator's OIDC token. An operation's scopes are the roles (Role) any one of which it needs.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "cluster",
            SecurityScheme::MutualTls {
                description: Some(
                    "The cluster's newest intermediate (or the one it last renewed with) as the TLS client certificate."
                        .into(),
                ),
                extensions: None,
            },
        );
        components.add_security_scheme(
            "enrolment",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A cluster's one-time enrolment token (pet_...). Renewals and reports authenticate with the cluster's intermediate over mTLS instead.",
                    ))
                    .build(),
            ),
        );
    }
}

/// Statuses that come from the layers around the handlers (extractors, authentication, the
/// rate limiter, MFA, the timeout, panics) rather than from a handler, added to every
/// operation they can reach, so that no handler's attribute has to repeat them. Every error
/// response is a problem document: `application/problem+json`, never `application/json`.
struct CommonResponses;

impl utoipa::Modify for CommonResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::ParameterIn;
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
        let problem = || ContentBuilder::new().schema(Some(Ref::from_schema_name("Problem"))).build();
        for (path, item) in openapi.paths.paths.iter_mut() {
            let ops = [(false, &mut item.get), (true, &mut item.post), (true, &mut item.put), (true, &mut item.delete)];
            for (changes_state, op) in ops.into_iter().filter_map(|(c, o)| o.as_mut().map(|o| (c, o))) {
                let has_path = path.contains('{');
                let has_query = op.parameters.iter().flatten().any(|p| p.parameter_in == ParameterIn::Query);
                let has_body = op.request_body.is_some();
                // SecurityRequirement keeps its schemes private; its JSON form names them.
                let operator = op
                    .security
                    .iter()
                    .flatten()
                    .any(|r| serde_json::to_value(r).is_ok_and(|v| v.get("bearer").is_some()));
                let mut add = |status: &str, description: String| {
                    op.responses.responses.entry(status.to_string()).or_insert_with(|| {
                        RefOr::T(
                            ResponseBuilder::new()
                                .description(description)
                                .content("application/problem+json", problem())
                                .build(),
                        )
                    });
                };
                let mut bad = vec![];
                if has_path {
                    bad.push("invalid-path: a path parameter that is not valid UTF-8 once decoded");
                }
                if has_query {
                    bad.push("invalid-query: a query parameter that does not fit its schema");
                }
                if has_body {
                    bad.push("malformed-body: a body whose framing is malformed or cut short; malformed-json: a body that is not the documented JSON");
                }
                if !bad.is_empty() {
                    add("400", bad.join("; "));
                }
                if operator {
                    add("401", "unauthenticated, invalid-token: no operator token, or one that does not verify".into());
                    add("403", "forbidden: the token carries none of the roles this operation needs".into());
                }
                if has_body {
                    add("413", "payload-too-large: the body is over policy.max_body_bytes".into());
                    add("415", "unsupported-media-type: the body is not Content-Type: application/json".into());
                }
                add("408", "request-timeout: the request took longer than 60 s".into());
                add("429", "rate-limited: too many requests from this caller; retry later".into());
                add("500", "internal: a failure on the server's side (details in its log)".into());
                if operator
                    && changes_state
                    && let Some(RefOr::T(r)) = op.responses.responses.get_mut("403")
                {
                    r.description.push_str("; mfa-required: a state change needs a token from a multi-factor login");
                }
                // Handlers' own error responses name the Problem schema; utoipa files them
                // under application/json.
                for (status, resp) in op.responses.responses.iter_mut() {
                    let RefOr::T(resp) = resp else { continue };
                    // OpenAPI requires a description; the reason phrase where a handler gave none.
                    if resp.description.is_empty() {
                        let reason = status.parse::<u16>().ok().and_then(|s| StatusCode::from_u16(s).ok());
                        resp.description = reason.and_then(|s| s.canonical_reason()).unwrap_or("").to_string();
                    }
                    let is_problem = resp.content.get("application/json").is_some_and(
                        |c| matches!(&c.schema, Some(RefOr::Ref(r)) if r.ref_location.ends_with("/Problem")),
                    );
                    if is_problem {
                        let c = resp.content.shift_remove("application/json").expect("checked above");
                        resp.content.insert("application/problem+json".into(), c);
                    }
                }
            }
        }
    }
}

/// The document, with what this server's configuration decides filled in: the environments a
/// cluster can be registered in, and their trust domains.
async fn openapi(State(state): State<AppState>) -> Response {
    let mut doc = match serde_json::to_value(ApiDoc::openapi()) {
        Ok(d) => d,
        Err(e) => return ApiError::internal(format!("OpenAPI document: {e}")).into_response(),
    };
    let issuers = state.issuers.all();
    // utoipa derives no rule across fields: a key goes with external-ca mode, and only with it.
    doc["components"]["schemas"]["RegisterCluster"]["oneOf"] = json!([
        {"properties": {"mode": {"enum": ["plugin", null]}, "key": {"type": "null"}}},
        {"required": ["mode", "key"], "properties": {"mode": {"const": "external-ca"}}},
    ]);
    let register = &mut doc["components"]["schemas"]["RegisterCluster"]["properties"];
    register["environment"]["enum"] = json!(issuers.iter().map(|i| i.name.clone()).collect::<Vec<_>>());
    // An environment that records no trust domain accepts any; then there is no list.
    if issuers.iter().all(|i| !i.trust_domains().is_empty()) {
        let mut domains: Vec<String> = issuers.iter().flat_map(|i| i.trust_domains()).collect();
        domains.sort();
        domains.dedup();
        register["trust_domain"]["enum"] = json!(domains);
    }
    Json(doc).into_response()
}

#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "The process is up", body = String, content_type = "text/plain")))]
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
    #[schema(value_type = ClusterMode)]
    mode: String,
    #[schema(value_type = ClusterState)]
    status: String,
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
            key_compromised: false,
        }
    }
}

/// The view of a cluster, with whether an external-CA cluster stopped on a compromised key.
async fn cluster_view(state: &AppState, c: ClusterRecord) -> Result<ClusterView, ApiError> {
    let mut compromised = false;
    if let (true, Some(serial)) = (c.is_external_ca(), &c.current_serial)
        && let Some(cert) = state.store.get_certificate(serial).await?
    {
        compromised = crate::service::external_ca::current_key_blocked(state, &cert).await?.is_some();
    }
    Ok(ClusterView { key_compromised: compromised, ..c.into() })
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
    responses((status = 202, body = RegisterResponse), (status = 400, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = ["operator", "admin"])))]
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
    let mode = req.mode.clone().unwrap_or_else(|| ca_store::MODE_PLUGIN.into());
    let external = match mode.as_str() {
        ca_store::MODE_PLUGIN => false,
        ca_store::MODE_EXTERNAL_CA => true,
        other => {
            return Err(ApiError::bad_request("invalid-mode", format!("mode {other:?} is not plugin or external-ca"))
                .by(op.actor()));
        }
    };
    let key_ref = match (&req.key, external) {
        (Some(k), true) => {
            let key = k
                .parse::<hsm::KeyRef>()
                .map_err(|e| ApiError::bad_request("invalid-key", e.to_string()).by(op.actor()))?;
            // The same checks as a rotation's new key: a configured module, no key in use
            // here (by public key), not blocked.
            crate::service::keys::check_new_key(&state, &key).await.map_err(|e| e.by(op.actor()))?;
            Some(key.to_string())
        }
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

#[utoipa::path(get, path = "/v1/clusters", responses((status = 200, body = [ClusterView])), security(("bearer" = ["operator", "admin", "auditor"])))]
async fn list_clusters(State(state): State<AppState>, op: Operator) -> Result<Json<Vec<ClusterView>>, ApiError> {
    op.require(&[Role::Operator, Role::Admin, Role::Auditor], "listing clusters")?;
    let mut out = Vec::new();
    for c in state.store.list_clusters().await? {
        out.push(cluster_view(&state, c).await?);
    }
    Ok(Json(out))
}

#[utoipa::path(get, path = "/v1/clusters/{name}", params(("name" = String, Path, description = "The cluster's name")),
    responses((status = 200, body = ClusterView), (status = 404, body = Problem)), security(("bearer" = ["operator", "admin", "auditor"])))]
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
    Ok(Json(cluster_view(&state, c).await?))
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
#[utoipa::path(post, path = "/v1/clusters/{name}/intermediate", request_body = IntermediateRequest, params(("name" = String, Path, description = "The cluster's name")),
    security(("enrolment" = []), ("cluster" = [])),
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

    let csr = VerifiedCsr::parse(req.csr.as_bytes()).map_err(|e| deny(crate::service::state::map_core(e.into())))?;
    let spki = csr.public_key().spki_der().to_vec();
    crate::service::keys::refuse_blocked(&state.store, &spki).await.map_err(&deny)?;
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
            // Two renewals with the same intermediate, signed at once: the first to commit
            // wins and the other is refused, so that no answer is silently superseded (and
            // the second cannot push the first's intermediate out of the two that renew).
            if current.current_serial != cluster.current_serial {
                return Err(deny(ApiError::conflict(
                    "renewal-superseded",
                    format!(
                        "a concurrent renewal with intermediate {serial} completed first (the newest is now {}); this one was not recorded",
                        current.current_serial.as_deref().unwrap_or("none")
                    ),
                )));
            }
            ("renewal", Some(serial.clone()))
        }
    };
    crate::service::keys::refuse_blocked_tx(&mut tx, &spki).await.map_err(&deny)?;
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
#[utoipa::path(post, path = "/v1/clusters/{name}/report", request_body = InstalledReport, params(("name" = String, Path, description = "The cluster's name")),
    security(("cluster" = [])),
    responses((status = 409, body = Problem), (status = 503, body = Problem), (status = 200, body = ReportResponse), (status = 400, body = Problem), (status = 401, body = Problem), (status = 404, body = Problem)))]
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
    let report = ca_store::ClusterReport {
        cluster: name.clone(),
        bundle: serde_json::to_string(&bundle).map_err(ApiError::internal)?,
        chain: serde_json::to_string(&req.chain).map_err(ApiError::internal)?,
        intermediate_serial: installed.serial.clone(),
        reported_at: now,
    };
    let (bundle_changed, reissue_after) = crate::service::rotation::changed_at(&state, &cluster).await?;
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
        // The gates read this row, so changing it is a state change like any other: audited in
        // the same transaction. Repeats are neither written nor recorded.
        let details = json!({"bundle": bundle, "chain": req.chain, "intermediate_serial": report.intermediate_serial});
        let mut tx = state.store.write().await?;
        tx.put_cluster_report(&report).await?;
        tx.audit(AuditEvent::new(actor, "cluster.report", &name, details)).await?;
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

/// Asks for a new one-time enrolment token for an existing cluster: after its newest
/// intermediate was revoked, or a failed enrolment left it without one. Takes effect when a
/// different operator approves.
#[utoipa::path(post, path = "/v1/clusters/{name}/enrolment", params(("name" = String, Path, description = "The cluster's name")),
    responses((status = 202, body = RegisterResponse), (status = 404, body = Problem), (status = 409, body = Problem)), security(("bearer" = ["operator", "admin"])))]
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
#[utoipa::path(get, path = "/v1/clusters/{name}/trust-bundle", params(("name" = String, Path, description = "The cluster's name")),
    responses((status = 503, body = Problem), (status = 200, description = "PEM roots", content_type = "application/x-pem-file"), (status = 404, body = Problem)))]
async fn trust_bundle(State(state): State<AppState>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let pem: String = cluster_roots(&state, &name).await?.iter().map(CertInfo::pem).collect();
    Ok(([(header::CONTENT_TYPE, "application/x-pem-file")], pem).into_response())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ConfigMapQuery {
    /// Namespace of the rendered ConfigMap (default `istio-system`).
    #[param(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    namespace: Option<String>,
}

/// The trust bundle as the `istio-ca-root-cert` ConfigMap Istio workloads mount. In
/// external-CA mode istiod does not publish it; apply this to every namespace.
#[utoipa::path(get, path = "/v1/clusters/{name}/trust-bundle/configmap", params(("name" = String, Path, description = "The cluster's name"), ConfigMapQuery),
    responses((status = 503, body = Problem), (status = 200, description = "ConfigMap YAML", content_type = "application/yaml"), (status = 404, body = Problem)))]
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
    /// DNS names (e.g. `istiod.istio-system.svc`), among the cluster's
    /// `server_certificate_names`.
    #[schema(min_items = 1)]
    dns_names: Vec<String>,
    /// Lifetime, e.g. `30d` (default 30d, at most 90d, never past the intermediate).
    #[schema(pattern = "^([0-9]{1,10}[smhdwy]){0,4}[1-9][0-9]{0,9}[smhdwy]([0-9]{1,10}[smhdwy]){0,4}$")]
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
#[utoipa::path(post, path = "/v1/clusters/{name}/server-certificates", request_body = ServerCertRequest, params(("name" = String, Path, description = "The cluster's name")),
    responses((status = 200, body = ServerCertResponse), (status = 400, body = Problem),
        (status = 403, body = Problem, description = "forbidden: only admins issue server certificates; name-not-allowed: a name outside the cluster's server_certificate_names"),
        (status = 404, body = Problem), (status = 409, body = Problem), (status = 503, body = Problem)),
    security(("bearer" = ["admin"])))]
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
    let ca = crate::service::external_ca::cluster_ca(&state, &name).await.map_err(deny)?;
    let csr = VerifiedCsr::parse(req.csr.as_bytes()).map_err(|e| deny(crate::service::state::map_core(e.into())))?;
    let spki = csr.public_key().spki_der().to_vec();
    crate::service::keys::refuse_blocked(&state.store, &spki).await.map_err(deny)?;
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
    crate::service::keys::refuse_blocked_tx(&mut tx, &spki).await.map_err(deny)?;
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
    #[schema(value_type = RequestStatus)]
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
#[into_params(parameter_in = Query)]
struct RequestQuery {
    status: Option<RequestStatus>,
}

#[utoipa::path(get, path = "/v1/requests", params(RequestQuery), responses((status = 200, body = [RequestView])), security(("bearer" = ["operator", "admin", "auditor"])))]
async fn list_requests(
    State(state): State<AppState>,
    op: Operator,
    Query(q): Query<RequestQuery>,
) -> Result<Json<Vec<RequestView>>, ApiError> {
    op.require(&[Role::Operator, Role::Admin, Role::Auditor], "listing requests")?;
    Ok(Json(
        state.store.list_requests(q.status.map(RequestStatus::as_str)).await?.into_iter().map(Into::into).collect(),
    ))
}

/// Approves a pending request. The approver must not be the requester.
#[utoipa::path(post, path = "/v1/requests/{id}/approve", params(("id" = String, Path, description = "The request's id")),
    responses((status = 200, body = RequestView),
        (status = 403, body = Problem, description = "two-person-rule: the requester cannot approve; forbidden: no operator or admin role"),
        (status = 404, body = Problem), (status = 409, body = Problem),
        (status = 503, body = Problem)),
    security(("bearer" = ["operator", "admin"])))]
async fn approve_request(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<Json<RequestView>, ApiError> {
    decide(state, op, id, true).await
}

#[utoipa::path(post, path = "/v1/requests/{id}/reject", params(("id" = String, Path, description = "The request's id")),
    responses((status = 200, body = RequestView), (status = 404, body = Problem), (status = 409, body = Problem)), security(("bearer" = ["operator", "admin"])))]
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
    crate::service::rotation::refresh_quietly(&state).await;
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
    let mut key_blocked = false;
    let mut rotation = None;
    match (req.kind.as_str(), approve) {
        ("start-rotation", true) => {
            rotation = Some(crate::service::rotation::approve_start(&state, &mut tx, &req, &op).await?);
        }
        ("rotation-stage", true) => {
            rotation = Some(crate::service::rotation::approve_stage(&state, &mut tx, &req, &op).await?);
        }
        ("register-cluster", true) => {
            tx.set_cluster_status(&req.subject, "active").await?;
            if payload["mode"].as_str() == Some(ca_store::MODE_EXTERNAL_CA) {
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
                let mut details = json!({"reason": reason, "issuer": cert.issuer, "cluster": cert.cluster});
                // A compromised key is never certified again: blocked with the revocation, in
                // its transaction and under its audit record.
                if ca_store::BLOCKING_REASONS.contains(&reason.as_str()) {
                    let info = ca_core::cert::parse_certs(cert.pem.as_bytes(), "stored certificate")
                        .map_err(ApiError::internal)?
                        .into_iter()
                        .next()
                        .ok_or_else(|| ApiError::internal(format!("certificate {serial} has no PEM")))?;
                    let hash = ca_store::spki_sha256(&info.spki_der);
                    tx.block_key(&ca_store::BlockedKey {
                        spki_sha256: hash.clone(),
                        reason: reason.clone(),
                        source_serial: serial.clone(),
                        blocked_by: op.actor(),
                        blocked_at: now,
                    })
                    .await?;
                    details["blocked_key"] = json!(hash);
                    key_blocked = true;
                }
                tx.audit(AuditEvent::new(op.actor(), "certificate.revoked", &serial, details)).await?;
                republish = Some(cert.issuer.clone());
                revoked_cluster = cert.cluster.clone();
            }
        }
        _ => {}
    }
    tx.commit().await?;
    if let Some(a) = rotation {
        crate::service::rotation::after_commit(&state, a, &op.actor()).await;
    }
    // The revocation stands even if the HSM is away right now: the CRL follows here, or from
    // the background job, which treats a CRL older than the last revocation as due.
    if let Some(issuer_name) = republish {
        // A revoked external-CA intermediate stops signing on this replica now, and gets a
        // successor (other replicas drop theirs at their next maintenance round), unless its
        // key was compromised: then the cluster waits for a cluster rotation to a new key.
        if let Some(cluster) = revoked_cluster.as_deref() {
            state.istio.forget(cluster);
            if key_blocked {
                tracing::warn!(%cluster, "key revoked for compromise: no successor until a cluster rotation brings a new key");
            } else if let Err(e) = crate::service::external_ca::ensure_intermediate(&state, cluster, &op.actor()).await
            {
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
        if let Err(e) = crate::service::external_ca::ensure_intermediate(&state, &name, &op.actor()).await {
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
            issuer: r.issuer,
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
struct CertQuery {
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

#[utoipa::path(get, path = "/v1/certificates", params(CertQuery), responses((status = 200, body = [CertificateView]), (status = 400, body = Problem)), security(("bearer" = ["operator", "admin", "auditor"])))]
async fn list_certificates(
    State(state): State<AppState>,
    op: Operator,
    Query(q): Query<CertQuery>,
) -> Result<Json<Vec<CertificateView>>, ApiError> {
    op.require(&[Role::Operator, Role::Admin, Role::Auditor], "listing certificates")?;
    let expiring = match &q.expiring_within {
        Some(d) => Some(
            ca_core::duration::Validity::parse_window(d)
                .map_err(|e| ApiError::bad_request("invalid-query", format!("expiring_within: {e}")).by(op.actor()))?
                .duration()
                .whole_seconds(),
        ),
        None => None,
    };
    let filter = CertFilter {
        cluster: q.cluster,
        issuer: q.issuer,
        status: q.status.map(|s| s.as_str().to_string()),
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

#[utoipa::path(get, path = "/v1/certificates/{serial}", params(("serial" = String, Path, description = "Hex, with or without colons")),
    responses((status = 200, body = CertificateView), (status = 404, body = Problem)), security(("bearer" = ["operator", "admin", "auditor"])))]
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
struct RevokeRequest {
    /// RFC 5280 reason: unspecified, key-compromise, ca-compromise, affiliation-changed,
    /// superseded, cessation-of-operation, certificate-hold or privilege-withdrawn.
    // A string rather than `RevocationReason` so that a wrong reason is `invalid-reason`.
    #[schema(value_type = RevocationReason)]
    reason: String,
}

/// Asks to revoke a certificate. Takes effect when a different operator approves.
#[utoipa::path(post, path = "/v1/certificates/{serial}/revoke", request_body = RevokeRequest,
    params(("serial" = String, Path, description = "Hex, with or without colons")),
    responses((status = 202, body = RequestView), (status = 400, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = ["operator", "admin"])))]
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

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct CrlQuery {
    /// `pem` for PEM instead of DER (the default, unless `Accept` asks for
    /// `application/x-pem-file`).
    format: Option<CrlFormat>,
    /// SHA-256 (hex) of the SubjectPublicKeyInfo of the key that issued the certificate being
    /// checked: the CRL that key signs (an environment's earlier key, after a rotation, until
    /// the last certificate it issued has expired). Default: the current key.
    #[param(pattern = "^[0-9a-fA-F]{64}$")]
    key: Option<String>,
}

/// How a CRL is sent: `der` (`application/pkix-crl`) or `pem` (`application/x-pem-file`).
#[derive(Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum CrlFormat {
    Der,
    Pem,
}

/// The issuer's current CRL: DER (`application/pkix-crl`), or PEM with `?format=pem` or
/// `Accept: application/x-pem-file`.
#[utoipa::path(get, path = "/v1/crl/{issuer}", params(("issuer" = String, Path, description = "The environment (issuer) name"), CrlQuery),
    responses((status = 200, description = "The CRL: DER, or PEM when asked for", content(
        (String = "application/pkix-crl"), (String = "application/x-pem-file"))), (status = 404, body = Problem), (status = 503, body = Problem)))]
async fn get_crl(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<CrlQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let issuer = state.issuer(&name)?.clone();
    let key =
        q.key.as_deref().map(str::to_ascii_lowercase).filter(|k| *k != ca_store::spki_sha256(&issuer.cert.spki_der));
    if key.as_ref().is_some_and(|k| k.len() != 64 || !k.bytes().all(|b| b.is_ascii_hexdigit())) {
        return Err(ApiError::bad_request(
            "invalid-query",
            "key is the SHA-256 (hex) of the issuing key's SubjectPublicKeyInfo",
        ));
    }
    let stored = crl_name(&name, key.as_deref());
    // Normally the background job made it at start; until then, make it now.
    let rec = match state.store.get_crl(&stored).await? {
        Some(r) => r,
        None => {
            let no_crl = |k: &str| {
                ApiError::not_found(format!(
                    "{name} has no CRL for key {k}: none of its earlier keys with an unexpired certificate has that SPKI"
                ))
            };
            // Only a key the environment had makes this sign anything: an unknown one is
            // answered without touching the HSM.
            if let Some(k) = &key
                && !earlier_keys(&state, &issuer).await?.iter().any(|(id, ..)| id == k)
            {
                return Err(no_crl(k));
            }
            let current = publish_crl(&state, &issuer, &state.job_actor()).await?;
            match &key {
                None => current,
                Some(k) => state.store.get_crl(&stored).await?.ok_or_else(|| no_crl(k))?,
            }
        }
    };
    let der = base64::engine::general_purpose::STANDARD.decode(&rec.der).map_err(ApiError::internal)?;
    let wants_pem = q.format == Some(CrlFormat::Pem)
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
#[into_params(parameter_in = Query)]
struct AuditQuery {
    /// Return records with a sequence number above this.
    after: Option<i64>,
    /// At most 1000; default 100.
    limit: Option<i64>,
}

#[utoipa::path(get, path = "/v1/audit", params(AuditQuery), responses((status = 200, body = [AuditView])), security(("bearer" = ["auditor", "admin"])))]
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
