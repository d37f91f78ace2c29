//! The middleware every route runs behind: latency per route, and the audit of refusals and
//! panics (with the anonymous rate limit).

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ca_store::AuditEvent;
use serde_json::json;

use crate::error::{Denied, ErrorCode, ServiceError};
use crate::metrics::RouteLabels;
use crate::service::state::AppState;
use crate::tls::ConnInfo;

/// Records latency per route.
pub(super) async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
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
/// `ServiceError` (axum's own rejections of a query string or method, the request timeout) are
/// turned into problem documents here, so that every error has a stable code.
pub(super) async fn audit_denials(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    use crate::edge::{MAX_METHOD, MAX_PATH, MAX_TEXT, cap};
    let method = cap(req.method().as_str(), MAX_METHOD);
    let path = cap(req.uri().path(), MAX_PATH);
    let conn = req.extensions().get::<ConnInfo>();
    let remote = conn.map(|c| c.remote);
    let has_cert = conn.is_some_and(|c| c.peer_cert.is_some());
    let credential = has_cert || req.headers().contains_key(header::AUTHORIZATION);
    let sample = |status: StatusCode, code: ErrorCode, detail: &str| {
        let (method, path, detail) = (&method, &path, cap(detail, MAX_TEXT));
        move || {
            json!({"api": "rest", "method": method, "path": path, "status": status.as_u16(), "code": code.as_str(),
                   "detail": detail, "remote": remote.map(|r| r.to_string())})
        }
    };
    // Probes are never refused and write nothing: they do not draw on the quota. (Scrapes go to
    // the metrics listener, which has no quota; `/metrics` here is an ordinary 404.)
    let probe = matches!(path.as_str(), "/healthz" | "/readyz");
    if !credential
        && !probe
        && let Some(ip) = remote.map(|r| r.ip())
        && let Err(wait) = state.edge.take(ip)
    {
        let resp = crate::edge::rate_limited(wait);
        let detail = resp.extensions().get::<Denied>().map(|d| d.detail.clone()).unwrap_or_default();
        state.edge.denied(
            "rest",
            ErrorCode::RateLimited,
            Some(ip),
            sample(StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited, &detail),
        );
        return resp;
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
                ErrorCode::Internal,
                remote.map(|r| r.ip()),
                sample(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, "the handler panicked"),
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
            StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
            StatusCode::REQUEST_TIMEOUT => ErrorCode::RequestTimeout,
            StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
            StatusCode::BAD_REQUEST if path.contains('?') || !detail.is_empty() => ErrorCode::InvalidQuery,
            _ => ErrorCode::Rejected,
        };
        let detail =
            if detail.is_empty() { status.canonical_reason().unwrap_or("rejected").to_string() } else { detail };
        // The status stays axum's (a 404 or 405 of the router is not a 400 `rejected`).
        let mut problem = ServiceError::new(code, detail).into_response();
        *problem.status_mut() = status;
        resp = problem;
    }
    let denied = resp.extensions().get::<Denied>().cloned().expect("set above or by ServiceError");
    // A refusal after the credential was checked (e.g. of the body) is the caller's, by name.
    let Some(actor) = denied.actor.clone().or_else(|| authenticated.get()) else {
        let ip = remote.map(|r| r.ip());
        if credential
            && denied.code != ErrorCode::RateLimited
            && let Some(Err(wait)) = ip.map(|ip| state.edge.take(ip))
        {
            resp = crate::edge::rate_limited(wait);
            state.edge.denied(
                "rest",
                ErrorCode::RateLimited,
                ip,
                sample(StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited, &denied.detail),
            );
            return resp;
        }
        state.edge.denied("rest", denied.code, ip, sample(resp.status(), denied.code, &denied.detail));
        return resp;
    };
    let event = AuditEvent::new(
        cap(&actor, MAX_TEXT),
        "request.denied",
        format!("{method} {path}"),
        json!({"status": resp.status().as_u16(), "code": denied.code.as_str(), "detail": cap(&denied.detail, MAX_TEXT),
               "remote": remote.map(|r| r.to_string())}),
    );
    if let Err(e) = state.store.audit(event).await {
        tracing::error!(error = %e, "could not audit a denied request");
    }
    resp
}
