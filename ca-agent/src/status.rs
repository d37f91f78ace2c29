//! What the agent knows about its own health, served on `/healthz`, `/readyz` and
//! `/metrics`: leadership, whether the Kubernetes API and ca-server answer, each object's last
//! successful sync and certificate expiry, and errors by cause.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabel {
    pub object: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabel {
    pub cause: String,
}

pub struct Status {
    registry: Mutex<Registry>,
    leader: Gauge,
    server_up: Gauge,
    expiry: Family<ObjectLabel, Gauge>,
    last_sync: Family<ObjectLabel, Gauge>,
    errors: Family<CauseLabel, Counter>,
    is_leader: AtomicBool,
    /// Unix seconds of the last answer from each side (0: never).
    api_ok_at: AtomicI64,
    server_ok_at: AtomicI64,
    server_failing: AtomicBool,
    /// Why the agent is not ready, when a controller knows better than the timestamps.
    not_ready: Mutex<Option<String>>,
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

impl Status {
    pub fn new() -> Arc<Status> {
        let mut registry = Registry::with_prefix("ca_agent");
        let leader = Gauge::default();
        let server_up = Gauge::default();
        let expiry = Family::<ObjectLabel, Gauge>::default();
        let last_sync = Family::<ObjectLabel, Gauge>::default();
        let errors = Family::<CauseLabel, Counter>::default();
        registry.register("leader", "1 while this replica holds the Lease", leader.clone());
        registry.register("server_up", "1 while ca-server answered the last call", server_up.clone());
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "notAfter of the certificate each managed object holds (unix seconds)",
            expiry.clone(),
        );
        registry.register(
            "last_sync_timestamp_seconds",
            "When each managed object was last confirmed current (unix seconds)",
            last_sync.clone(),
        );
        registry.register("errors", "Failed steps, by cause", errors.clone());
        Arc::new(Status {
            registry: Mutex::new(registry),
            leader,
            server_up,
            expiry,
            last_sync,
            errors,
            is_leader: AtomicBool::new(false),
            api_ok_at: AtomicI64::new(0),
            server_ok_at: AtomicI64::new(0),
            server_failing: AtomicBool::new(false),
            not_ready: Mutex::new(None),
        })
    }

    pub fn set_leader(&self, leading: bool) {
        self.is_leader.store(leading, Ordering::Relaxed);
        self.leader.set(i64::from(leading));
    }

    pub fn api_ok(&self) {
        self.api_ok_at.store(now(), Ordering::Relaxed);
    }

    pub fn server_ok(&self) {
        self.server_ok_at.store(now(), Ordering::Relaxed);
        self.server_failing.store(false, Ordering::Relaxed);
        self.server_up.set(1);
    }

    pub fn server_failed(&self, cause: &str) {
        self.server_failing.store(true, Ordering::Relaxed);
        self.server_up.set(0);
        self.error(cause);
    }

    pub fn error(&self, cause: &str) {
        self.errors.get_or_create(&CauseLabel { cause: cause.to_string() }).inc();
    }

    pub fn synced(&self, object: &str) {
        self.last_sync.get_or_create(&ObjectLabel { object: object.to_string() }).set(now());
    }

    pub fn expires(&self, object: &str, not_after: i64) {
        self.expiry.get_or_create(&ObjectLabel { object: object.to_string() }).set(not_after);
    }

    /// A controller's own reason not to be ready (cleared with `None`).
    pub fn blocked(&self, why: Option<String>) {
        *self.not_ready.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }

    /// Whether the last pass left something wrong that an early retry may fix: ca-server did not
    /// answer, a controller is blocked, or nothing reached ca-server yet.
    pub fn degraded(&self) -> bool {
        self.server_failing.load(Ordering::Relaxed)
            || self.not_ready.lock().unwrap_or_else(|p| p.into_inner()).is_some()
            || self.server_ok_at.load(Ordering::Relaxed) == 0
    }

    /// `Ok` when ready, else why not. `stale` is how old the last answer may be.
    pub fn readiness(&self, stale: i64) -> Result<&'static str, String> {
        let now = now();
        if now - self.api_ok_at.load(Ordering::Relaxed) > stale {
            return Err("the Kubernetes API has not answered recently".into());
        }
        if !self.is_leader.load(Ordering::Relaxed) {
            return Ok("standby: another replica holds the Lease");
        }
        if self.server_failing.load(Ordering::Relaxed) {
            return Err("ca-server is not answering; existing objects are left as they are".into());
        }
        if let Some(why) = self.not_ready.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(why);
        }
        if self.server_ok_at.load(Ordering::Relaxed) == 0 {
            return Err("no successful call to ca-server yet".into());
        }
        Ok("leading")
    }

    fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

#[derive(Clone)]
struct Ctx {
    status: Arc<Status>,
    stale: i64,
}

/// Serves the three endpoints until the process ends.
pub async fn serve(listen: SocketAddr, status: Arc<Status>, stale: i64) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(Ctx { status, stale });
    let listener = tokio::net::TcpListener::bind(listen).await?;
    // Tests and logs learn the port this way when it was 0.
    println!("ca-agent health listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

async fn readyz(State(ctx): State<Ctx>) -> impl IntoResponse {
    match ctx.status.readiness(ctx.stale) {
        Ok(why) => (StatusCode::OK, format!("ready: {why}\n")),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
    }
}

async fn metrics(State(ctx): State<Ctx>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], ctx.status.encode())
}
