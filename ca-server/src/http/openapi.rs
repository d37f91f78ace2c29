//! The OpenAPI document (utoipa): the operations of every resource module, the security
//! schemes, the statuses the layers add around every handler, and what the configuration
//! decides, filled in when the document is served.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use utoipa::{Modify, OpenApi};

use super::{
    audit, certificates, cluster_settings, clusters, crl, health, requests, rotations, server_certificates, trust,
};
use crate::auth::Role;
use crate::error::{Problem, ServiceError};
use crate::service::state::AppState;

/// What the document holds beside the resource modules' operations.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "ca-server",
        description = "Online issuance, renewal and revocation of cluster intermediates, with an audit trail."
    ),
    components(schemas(Problem, Role))
)]
struct ApiDoc;

/// The document: every resource module's `Doc` merged, then the security schemes and the
/// responses the layers add (which must see every operation, so they run after the merge).
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    for part in [
        health::Doc::openapi(),
        clusters::Doc::openapi(),
        cluster_settings::Doc::openapi(),
        trust::Doc::openapi(),
        server_certificates::Doc::openapi(),
        requests::Doc::openapi(),
        certificates::Doc::openapi(),
        crl::Doc::openapi(),
        audit::Doc::openapi(),
        rotations::Doc::openapi(),
    ] {
        doc.merge(part);
    }
    BearerAuth.modify(&mut doc);
    CommonResponses.modify(&mut doc);
    doc
}

pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/v1/openapi.json", get(openapi))
}

struct BearerAuth;

impl Modify for BearerAuth {
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
            "agent",
            SecurityScheme::MutualTls {
                description: Some(
                    "The cluster's agent certificate (profile agent, issued by this server for that cluster) as the TLS client certificate."
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

impl Modify for CommonResponses {
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
    let mut doc = match serde_json::to_value(document()) {
        Ok(d) => d,
        Err(e) => return ServiceError::internal(format!("OpenAPI document: {e}")).into_response(),
    };
    let issuers = state.issuers.all();
    // utoipa derives no rule across fields: a key and Istio settings go with external-ca mode,
    // and only with it.
    doc["components"]["schemas"]["RegisterCluster"]["oneOf"] = json!([
        {"properties": {"mode": {"enum": ["plugin", null]}, "key": {"type": "null"}, "istio": {"type": "null"}}},
        {"required": ["mode", "key", "istio"], "properties": {"mode": {"const": "external-ca"}}},
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
