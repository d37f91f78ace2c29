//! Trust distribution: a cluster's roots as PEM and as the ConfigMap Istio workloads mount.
//! Public, like the CRLs.

use axum::Router;
use axum::routing::get;
use utoipa::OpenApi;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use ca_core::cert::CertInfo;
use serde::Deserialize;
use utoipa::IntoParams;

use crate::error::{ErrorCode, Problem, ServiceError};
use crate::http::extract::{Path, Query};
use crate::service::state::AppState;

/// The cluster's trust bundle (PEM): what `root-cert.pem`, the `istio-ca-root-cert` ConfigMap
/// and the last element of every external-CA response carry. Public, like the CRLs: roots
/// are not secrets, and a new node needs them before it holds any credential.
#[utoipa::path(tag = "trust", get, path = "/v1/clusters/{name}/trust-bundle", params(("name" = String, Path, description = "The cluster's name")),
    responses((status = 503, body = Problem), (status = 200, description = "PEM roots", content_type = "application/x-pem-file"), (status = 404, body = Problem)))]
pub(crate) async fn trust_bundle(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ServiceError> {
    let pem: String = crate::service::trust::cluster_roots(&state, &name).await?.iter().map(CertInfo::pem).collect();
    Ok(([(header::CONTENT_TYPE, "application/x-pem-file")], pem).into_response())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ConfigMapQuery {
    /// Namespace of the rendered ConfigMap (default `istio-system`).
    #[param(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    namespace: Option<String>,
}

/// The trust bundle as the `istio-ca-root-cert` ConfigMap Istio workloads mount. In
/// external-CA mode istiod does not publish it; apply this to every namespace.
#[utoipa::path(tag = "trust", get, path = "/v1/clusters/{name}/trust-bundle/configmap", params(("name" = String, Path, description = "The cluster's name"), ConfigMapQuery),
    responses((status = 503, body = Problem), (status = 200, description = "ConfigMap YAML", content_type = "application/yaml"), (status = 404, body = Problem)))]
pub(crate) async fn trust_bundle_configmap(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<ConfigMapQuery>,
) -> Result<Response, ServiceError> {
    let namespace = q.namespace.unwrap_or_else(|| "istio-system".into());
    if !ca_core::names::is_dns1123_label(&namespace) {
        return Err(ServiceError::new(ErrorCode::InvalidNamespace, "namespace must be a Kubernetes name"));
    }
    let pem: String = crate::service::trust::cluster_roots(&state, &name).await?.iter().map(CertInfo::pem).collect();
    let body: String = pem.lines().map(|l| format!("    {l}\n")).collect();
    let yaml = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: istio-ca-root-cert\n  namespace: {namespace}\n  labels:\n    istio.io/config: \"true\"\n  annotations:\n    pki-mesh/cluster: {name}\ndata:\n  root-cert.pem: |\n{body}"
    );
    Ok(([(header::CONTENT_TYPE, "application/yaml")], yaml).into_response())
}

/// This module's endpoints, merged into the router by `http::router`.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/clusters/{name}/trust-bundle", get(trust_bundle))
        .route("/v1/clusters/{name}/trust-bundle/configmap", get(trust_bundle_configmap))
}

/// This module's operations and schemas, merged into the served document by `http::openapi`.
#[derive(OpenApi)]
#[openapi(paths(trust_bundle, trust_bundle_configmap))]
pub(crate) struct Doc;
