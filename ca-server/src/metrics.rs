//! Prometheus metrics.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuanceLabels {
    pub issuer: String,
    pub profile: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: String,
    pub route: String,
    pub status: String,
}

/// `api` is `rest` or `grpc`, `code` a problem code (a fixed set in the source).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    pub api: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuerLabels {
    pub issuer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionLabels {
    /// A token label from the configuration's key references.
    pub token: String,
    /// `open` or `in_use`.
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RotationLabels {
    pub rotation: String,
    pub kind: String,
    pub target: String,
}

type FGauge = Gauge<f64, AtomicU64>;

pub struct Metrics {
    registry: Mutex<Registry>,
    pub issuances: Family<IssuanceLabels, Counter>,
    pub latency: Family<RouteLabels, Histogram>,
    pub crl_age: Family<IssuerLabels, FGauge>,
    pub issuer_expiry: Family<IssuerLabels, FGauge>,
    pub cluster_expiry: Family<ClusterLabels, FGauge>,
    pub hsm_up: Family<IssuerLabels, Gauge>,
    pub hsm_sessions: Family<SessionLabels, Gauge>,
    pub workload_latency: Family<OutcomeLabels, Histogram>,
    pub workload_batch: Histogram,
    pub anonymous_denials: Family<DenialLabels, Counter>,
    pub workload_commit: Histogram,
    pub rotation_stage: Family<RotationLabels, Gauge>,
    pub rotation_lagging: Family<RotationLabels, Gauge>,
    /// The rotations exported last round, so that finished ones stop being exported.
    pub rotation_exported: Mutex<Vec<RotationLabels>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ca");
        let issuances = Family::<IssuanceLabels, Counter>::default();
        registry.register("issuances", "Certificates issued, by issuer, profile and result", issuances.clone());
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        registry.register("http_request_duration_seconds", "HTTP request latency", latency.clone());
        let crl_age = Family::<IssuerLabels, FGauge>::default();
        registry.register("crl_age_seconds", "Seconds since the issuer's current CRL was made", crl_age.clone());
        let issuer_expiry = Family::<IssuerLabels, FGauge>::default();
        registry.register(
            "issuer_expiry_seconds",
            "Seconds until the issuer certificate expires",
            issuer_expiry.clone(),
        );
        let cluster_expiry = Family::<ClusterLabels, FGauge>::default();
        registry.register(
            "cluster_intermediate_expiry_seconds",
            "Seconds until the cluster's newest valid intermediate expires",
            cluster_expiry.clone(),
        );
        let hsm_up = Family::<IssuerLabels, Gauge>::default();
        registry.register("hsm_up", "1 when the issuer's key answered the last probe", hsm_up.clone());
        let hsm_sessions = Family::<SessionLabels, Gauge>::default();
        registry.register(
            "hsm_sessions",
            "PKCS#11 sessions per token: open (also the most ever in use at once) and in use",
            hsm_sessions.clone(),
        );
        let workload_latency = Family::<OutcomeLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "workload_request_duration_seconds",
            "Istio CreateCertificate latency, by outcome (ok, denied, error)",
            workload_latency.clone(),
        );
        let workload_batch = Histogram::new(exponential_buckets(1.0, 2.0, 13));
        registry.register(
            "workload_batch_size",
            "Workload records (certificates and denials) per group commit",
            workload_batch.clone(),
        );
        let anonymous_denials = Family::<DenialLabels, Counter>::default();
        registry.register(
            "anonymous_denials",
            "Refusals of unauthenticated callers, by API and problem code (audited as periodic summaries)",
            anonymous_denials.clone(),
        );
        // Exported from the start (at 0), so that alerts and dashboards find the metric.
        for api in ["rest", "grpc"] {
            let _ = anonymous_denials.get_or_create(&DenialLabels { api: api.into(), code: "rate-limited".into() });
        }
        let workload_commit = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "workload_commit_seconds",
            "Time to commit one group of workload records (every request in it waits this long)",
            workload_commit.clone(),
        );
        let rotation_stage = Family::<RotationLabels, Gauge>::default();
        registry.register(
            "rotation_stage",
            "Stage of each active rotation: 0 prepared, 1 distribute, 2 reissue, 3 drain, 4 retire",
            rotation_stage.clone(),
        );
        let rotation_lagging = Family::<RotationLabels, Gauge>::default();
        registry.register(
            "rotation_lagging_clusters",
            "Clusters of an active rotation that do not yet hold what its stage hands out",
            rotation_lagging.clone(),
        );
        Metrics {
            rotation_stage,
            rotation_lagging,
            rotation_exported: Mutex::new(Vec::new()),
            workload_commit,
            anonymous_denials,
            registry: Mutex::new(registry),
            issuances,
            latency,
            crl_age,
            issuer_expiry,
            cluster_expiry,
            hsm_up,
            hsm_sessions,
            workload_latency,
            workload_batch,
        }
    }

    pub fn issued(&self, issuer: &str, profile: &str, result: &str) {
        self.issuances
            .get_or_create(&IssuanceLabels { issuer: issuer.into(), profile: profile.into(), result: result.into() })
            .inc();
    }

    pub fn encode(&self) -> String {
        for t in hsm::session_stats() {
            for (state, n) in [("open", t.open), ("in_use", t.in_use)] {
                self.hsm_sessions.get_or_create(&SessionLabels { token: t.token.clone(), state }).set(n as i64);
            }
        }
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("writing to a String");
        out
    }
}

/// The metrics listener's routes: `GET /metrics` and nothing else. It is a listener of its own
/// because the metrics name every cluster and issuer, which API callers need not learn.
pub fn router(metrics: std::sync::Arc<Metrics>) -> axum::Router {
    use axum::http::{StatusCode, header};
    axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let m = metrics.clone();
                async move {
                    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], m.encode())
                }
            }),
        )
        .fallback(|| async { (StatusCode::NOT_FOUND, "only /metrics is served here\n") })
}
