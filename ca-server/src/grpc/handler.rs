//! Istio's `CreateCertificate`: the request's metadata (cluster, token, impersonated
//! identity) into a call of `service::workload`, refusals counted, audited or summarised, and
//! the result into a response or a gRPC status.

use std::time::Instant;

use serde_json::json;
use tonic::{Request, Response, Status};

use crate::error::{ErrorCode, ServiceError};
use crate::proto::istio_certificate_service_server::IstioCertificateService;
use crate::proto::{IstioCertificateRequest, IstioCertificateResponse};
use crate::service::state::AppState;
use crate::service::workload;

#[derive(Clone)]
pub struct IstioApi {
    state: AppState,
}

impl IstioApi {
    pub fn new(state: AppState) -> IstioApi {
        IstioApi { state }
    }
}

/// A refusal with what is known of who was refused.
struct Refusal {
    error: ServiceError,
    actor: String,
    cluster: Option<String>,
}

impl From<ServiceError> for Refusal {
    fn from(error: ServiceError) -> Self {
        Refusal { error, actor: "anonymous".into(), cluster: None }
    }
}

#[tonic::async_trait]
impl IstioCertificateService for IstioApi {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let started = Instant::now();
        let remote = request.remote_addr().map(|a| a.ip());
        let credential = request.metadata().contains_key("authorization");
        // No credential: the address's quota is drawn on before any work.
        if !credential && let Some(Err(wait)) = remote.map(|ip| self.state.edge.take(ip)) {
            return Err(self.rate_limited(remote, None, wait, started));
        }
        let result = self.handle(request).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(r) if r.error.status().is_client_error() => "denied",
            Err(_) => "error",
        };
        self.state
            .metrics
            .workload_latency
            .get_or_create(&crate::metrics::OutcomeLabels { outcome: outcome.into() })
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(chain) => Ok(Response::new(IstioCertificateResponse { cert_chain: chain })),
            Err(r) => {
                use crate::edge::{MAX_TEXT, cap};
                // The ClusterID header is the caller's say-so: only a served name becomes a
                // metric label or goes into the audit trail as is.
                let claimed = r.cluster.clone().unwrap_or_default();
                let known = self.state.istio.serves(&claimed);
                let cluster = if known { claimed.clone() } else { "unknown".to_string() };
                self.state.metrics.issued(&cluster, "workload", outcome);
                if r.error.status().is_client_error() {
                    let shown = cap(&claimed, 64);
                    let detail = cap(&r.error.detail, MAX_TEXT);
                    if r.actor == "anonymous" {
                        // A credential that failed draws on the address's quota.
                        if credential && let Some(Err(wait)) = remote.map(|ip| self.state.edge.take(ip)) {
                            return Err(self.rate_limited(remote, Some(shown), wait, started));
                        }
                        tracing::debug!(%cluster, code = r.error.code.as_str(), %detail, "unauthenticated workload request refused");
                        self.state.edge.denied("grpc", r.error.code, remote, || {
                            json!({"api": "grpc", "cluster": {"claimed": shown}, "code": r.error.code,
                                   "detail": detail, "remote": remote.map(|r| r.to_string())})
                        });
                    } else {
                        tracing::info!(actor = %r.actor, %cluster, code = r.error.code.as_str(), %detail, "workload certificate refused");
                        let denial = json!({"actor": cap(&r.actor, MAX_TEXT),
                            "cluster": if known { json!(claimed) } else { json!({"claimed": shown}) },
                            "code": r.error.code, "detail": detail, "remote": remote.map(|r| r.to_string())});
                        if workload::record_denial(&self.state, denial).await.is_err() {
                            tracing::error!("a workload denial could not be audited");
                        }
                    }
                }
                Err(r.error.into())
            }
        }
    }
}

impl IstioApi {
    /// `RESOURCE_EXHAUSTED` for an address whose unauthenticated quota is used up (counted, not
    /// written).
    fn rate_limited(
        &self,
        remote: Option<std::net::IpAddr>,
        claimed: Option<String>,
        wait: u64,
        started: Instant,
    ) -> Status {
        self.state
            .metrics
            .workload_latency
            .get_or_create(&crate::metrics::OutcomeLabels { outcome: "denied".into() })
            .observe(started.elapsed().as_secs_f64());
        let detail = format!("too many unauthenticated requests from this address; retry in {wait} s");
        self.state.edge.denied("grpc", ErrorCode::RateLimited, remote, || {
            json!({"api": "grpc", "cluster": {"claimed": claimed}, "code": "rate-limited", "detail": detail,
                   "remote": remote.map(|r| r.to_string())})
        });
        Status::resource_exhausted(format!("rate-limited: {detail}"))
    }
}

fn metadata_str<'a>(md: &'a tonic::metadata::MetadataMap, key: &str) -> Option<&'a str> {
    md.get(key).and_then(|v| v.to_str().ok()).map(str::trim).filter(|s| !s.is_empty())
}

impl IstioApi {
    async fn handle(&self, request: Request<IstioCertificateRequest>) -> Result<Vec<String>, Refusal> {
        let state = &self.state;
        if state.config.istio.is_none() {
            return Err(ServiceError::new(ErrorCode::Disabled, "external-CA mode is off").into());
        }
        let md = request.metadata();
        let cluster = metadata_str(md, "clusterid")
            .ok_or_else(|| ServiceError::new(ErrorCode::NoClusterId, "send the ClusterID metadata header"))?
            .to_string();
        let claimed = |e: ServiceError| Refusal { error: e, actor: "anonymous".into(), cluster: Some(cluster.clone()) };
        let token = metadata_str(md, "authorization").and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
        let caller = workload::authenticate(state, &cluster, token).await.map_err(claimed)?;
        // Named only when refused: most requests are not.
        let refuse = |e: ServiceError| Refusal {
            error: e,
            actor: format!("serviceaccount:{cluster}/{}", caller.account()),
            cluster: Some(cluster.clone()),
        };
        let request = request.into_inner();
        let impersonated = request
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("ImpersonatedIdentity"))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .filter(|s| !s.is_empty());
        workload::issue(state, &cluster, &caller, impersonated.as_deref(), request.csr, request.validity_duration)
            .await
            .map_err(refuse)
    }
}
