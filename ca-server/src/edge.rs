//! What a caller can cost the server before it has proved who it is.
//!
//! Refusals of unauthenticated callers (REST and gRPC) are not written one by one: anyone can
//! send them, and each write would take the single writer lock that renewals and workload
//! certificates wait on. They are counted (`ca_anonymous_denials_total{api,code}`) and
//! summarised in one `request.denied.summary` audit record per `audit.denial_summary_interval`.
//! Unauthenticated callers are also rate-limited per source address (`rate_limit.*`).
//! Every string that reaches a log, an audit record or a metric label is capped by [`cap`].

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use axum::http::{HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};
use ca_store::AuditEvent;
use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota};
use serde_json::{Value, json};

use crate::config::Config;
use crate::error::{ErrorCode, ServiceError};
use crate::metrics::{DenialLabels, Metrics};

/// Longest method kept (every standard method fits).
pub const MAX_METHOD: usize = 16;
/// Longest path kept.
pub const MAX_PATH: usize = 256;
/// Longest detail, actor or header-derived value kept.
pub const MAX_TEXT: usize = 512;
/// Longest request id kept (a UUID is 36).
pub const MAX_REQUEST_ID: usize = 64;

/// Source addresses counted individually within one summary interval; the rest go to `other`.
const TRACKED_SOURCES: usize = 1024;
/// Source addresses named in a summary record.
const REPORTED_SOURCES: usize = 20;
/// Example refusals kept per summary record.
const SAMPLES: usize = 5;

/// `s` cut to at most `max` bytes on a character boundary, with `…` when something was cut.
pub fn cap(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    format!("{}…", &s[..s.floor_char_boundary(max)])
}

/// A metric label for a method: the standard ones, else `other`, so that a client cannot make
/// new series by inventing methods.
pub fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// The rate limiter and the denial summary of this replica.
pub struct Edge {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    window: Mutex<Window>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Window {
    total: u64,
    by_code: BTreeMap<&'static str, u64>,
    by_api: BTreeMap<&'static str, u64>,
    sources: HashMap<IpAddr, u64>,
    other_sources: u64,
    samples: Vec<Value>,
}

impl Edge {
    pub fn new(cfg: &Config, metrics: Arc<Metrics>) -> Edge {
        let one = NonZeroU32::MIN;
        let quota = Quota::per_minute(NonZeroU32::new(cfg.rate_limit.anonymous_per_minute).unwrap_or(one))
            .allow_burst(NonZeroU32::new(cfg.rate_limit.anonymous_burst).unwrap_or(one));
        Edge { limiter: governor::RateLimiter::keyed(quota), window: Mutex::new(Window::default()), metrics }
    }

    /// Draws one cell from `ip`'s quota; when it is empty, how many seconds until it is not.
    pub fn take(&self, ip: IpAddr) -> Result<(), u64> {
        self.limiter.check_key(&ip).map_err(|n| n.wait_time_from(self.limiter.clock().now()).as_secs().max(1))
    }

    /// Counts one refusal of an unauthenticated caller. `sample` is called only while the
    /// summary still has room for one; its strings must already be capped.
    pub fn denied(&self, api: &'static str, code: ErrorCode, remote: Option<IpAddr>, sample: impl FnOnce() -> Value) {
        self.metrics
            .anonymous_denials
            .get_or_create(&DenialLabels { api: api.into(), code: code.as_str().into() })
            .inc();
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        w.total += 1;
        *w.by_code.entry(code.as_str()).or_default() += 1;
        *w.by_api.entry(api).or_default() += 1;
        match remote {
            Some(ip) if w.sources.contains_key(&ip) || w.sources.len() < TRACKED_SOURCES => {
                *w.sources.entry(ip).or_default() += 1
            }
            _ => w.other_sources += 1,
        }
        if w.samples.len() < SAMPLES {
            w.samples.push(sample());
        }
    }

    /// The summary of the refusals counted since the last call, if there were any.
    pub fn take_summary(&self) -> Option<AuditEvent> {
        let w = std::mem::take(&mut *self.window.lock().unwrap_or_else(|p| p.into_inner()));
        if w.total == 0 {
            return None;
        }
        let mut sources: Vec<(IpAddr, u64)> = w.sources.into_iter().collect();
        sources.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let other = w.other_sources + sources.iter().skip(REPORTED_SOURCES).map(|s| s.1).sum::<u64>();
        let top: serde_json::Map<String, Value> =
            sources.iter().take(REPORTED_SOURCES).map(|(ip, n)| (ip.to_string(), json!(n))).collect();
        Some(AuditEvent::new(
            "anonymous",
            "request.denied.summary",
            format!("{} unauthenticated requests refused", w.total),
            json!({"total": w.total, "by_code": w.by_code, "by_api": w.by_api, "by_source": top,
                   "other_sources": other, "samples": w.samples}),
        ))
    }

    /// Forgets the quota state of addresses that have been quiet long enough to be full again.
    pub fn prune(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

/// The 429 answer for an address whose quota is used up.
pub fn rate_limited(retry_after: u64) -> Response {
    let mut resp = ServiceError::new(
        ErrorCode::RateLimited,
        format!("too many unauthenticated requests from this address; retry in {retry_after} s"),
    )
    .into_response();
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    resp
}

/// Who the request proved to be, filled in by the extractor that checked the credential, so
/// that `audit_denials` can tell an authenticated caller's refusal (or panic) from an
/// anonymous one even when the error itself (a body rejection, a panic) does not name them.
#[derive(Clone, Debug, Default)]
pub struct Authenticated(Arc<std::sync::OnceLock<String>>);

impl Authenticated {
    pub fn set(&self, actor: String) {
        let _ = self.0.set(actor);
    }
    pub fn get(&self) -> Option<String> {
        self.0.get().cloned()
    }
}

/// Marks a response made from a panic, so that `audit_denials` can audit it.
#[derive(Clone, Copy, Debug)]
pub struct Panicked;

/// What a panicking handler or middleware answers (`tower_http::catch_panic`). The log line
/// carries the request span (method, path, request id).
pub fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    tracing::error!(panic = %cap(&what, MAX_TEXT), "a request handler panicked");
    let mut resp = ServiceError::new(ErrorCode::Internal, "internal error; see the server log").into_response();
    resp.extensions_mut().insert(Panicked);
    resp
}

/// The same for gRPC: `INTERNAL`.
pub fn grpc_panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> axum::http::Response<tonic::body::Body> {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    tracing::error!(panic = %cap(&what, MAX_TEXT), "a gRPC handler panicked");
    tonic::Status::internal("internal: internal error; see the server log").into_http()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_cuts_on_a_character_boundary() {
        let s = format!("/{}é", "a".repeat(254));
        assert_eq!(s.len(), 257);
        let c = cap(&s, 256);
        assert_eq!(c, format!("/{}…", "a".repeat(254)));
        assert_eq!(cap("short", 256), "short");
        assert_eq!(cap("ééé", 3), "é…");
    }

    #[test]
    fn unknown_methods_share_one_label() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::from_bytes(b"FROBNICATE").unwrap()), "other");
        assert_eq!(method_label(&Method::CONNECT), "other");
    }
}
