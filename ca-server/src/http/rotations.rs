//! The rotation endpoints (`/v1/rotations…`): each asks `crate::service::rotation` and shapes
//! its answer; `view` is a rotation as the API shows it, with the gate to its next stage.

use axum::Router;
use axum::routing;
use utoipa::OpenApi;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ca_store::now_secs;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{Operator, Role};
use crate::error::ServiceError;
use crate::http::body::Body;
use crate::http::extract::Path;
use crate::service::rotation;
use crate::service::rotation_record::{self, Rotation, pem_cert};
use crate::service::state::AppState;

#[derive(Serialize, ToSchema)]
pub struct ClusterStatus {
    pub name: String,
    pub environment: String,
    #[schema(value_type = crate::http::clusters::ClusterMode)]
    pub mode: ca_store::ClusterMode,
    /// `current` or `lagging`.
    pub state: String,
    pub bundle_ok: bool,
    pub chain_ok: bool,
    pub intermediate_serial: Option<String>,
    pub reported_at: Option<i64>,
    pub stale_bundle_workloads: i64,
    pub stale_chain_workloads: i64,
    pub blockers: Vec<String>,
}

impl From<rotation::ClusterStatus> for ClusterStatus {
    fn from(c: rotation::ClusterStatus) -> Self {
        ClusterStatus {
            name: c.name,
            environment: c.environment,
            mode: c.mode,
            state: c.state,
            bundle_ok: c.bundle_ok,
            chain_ok: c.chain_ok,
            intermediate_serial: c.intermediate_serial,
            reported_at: c.reported_at,
            stale_bundle_workloads: c.stale_bundle_workloads,
            stale_chain_workloads: c.stale_chain_workloads,
            blockers: c.blockers,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct RotationView {
    id: String,
    kind: String,
    target: String,
    stage: String,
    /// The next stage forward, and where a rollback would go.
    next: Option<String>,
    rollback: Option<String>,
    stages: Vec<String>,
    /// Why the rotation may not move to `next` now (empty: it may, with a second operator).
    blockers: Vec<BlockerView>,
    clusters: Vec<ClusterStatus>,
    environments: Vec<EnvView>,
    drain_until: Option<i64>,
    bundle_changed_at: i64,
    chain_changed_at: i64,
    /// SHA-256 of the old and new roots (root rotation).
    old_root: Option<String>,
    new_root: Option<String>,
    history: Vec<Transition>,
    created_by: String,
    created_at: i64,
    updated_at: i64,
}

// The service's `Transition` is what storage holds; this is its API shape (the same fields,
// under the same schema name).
#[derive(Serialize, ToSchema)]
struct Transition {
    from: String,
    to: String,
    at: i64,
    requested_by: String,
    approved_by: String,
}

impl From<&rotation_record::Transition> for Transition {
    fn from(t: &rotation_record::Transition) -> Self {
        Transition {
            from: t.from.clone(),
            to: t.to.clone(),
            at: t.at,
            requested_by: t.requested_by.clone(),
            approved_by: t.approved_by.clone(),
        }
    }
}

#[derive(Serialize, ToSchema)]
struct BlockerView {
    /// The cluster that holds the stage back, if it is about one.
    cluster: Option<String>,
    reason: String,
}

#[derive(Serialize, ToSchema)]
struct EnvView {
    name: String,
    old_certificate: String,
    new_certificate: Option<String>,
}

async fn view(state: &AppState, r: &Rotation, now: i64) -> Result<RotationView, ServiceError> {
    rotation::refresh_quietly(state).await;
    let next = r.kind.next(r.stage);
    let (blockers, clusters) = match next {
        Some(to) => rotation::gate(state, r, to, now).await?,
        None => (vec![], vec![]),
    };
    let fp = |p: &Option<String>| -> Result<Option<String>, ServiceError> {
        p.as_deref().map(|p| pem_cert(p).map(|c| c.fingerprint())).transpose()
    };
    let environments = r
        .spec
        .environments
        .iter()
        .map(|(name, p)| {
            Ok(EnvView {
                name: name.clone(),
                old_certificate: pem_cert(&p.old_certificate)?.serial,
                new_certificate: p.new_certificate.as_deref().map(pem_cert).transpose()?.map(|c| c.serial),
            })
        })
        .collect::<Result<_, ServiceError>>()?;
    Ok(RotationView {
        id: r.rec.id.clone(),
        kind: r.kind.to_string(),
        target: r.rec.target.clone(),
        stage: r.stage.to_string(),
        next: next.map(|s| s.to_string()),
        rollback: r.kind.rollback(r.stage).map(|s| s.to_string()),
        stages: r.kind.stages().iter().map(|s| s.to_string()).collect(),
        blockers: blockers.into_iter().map(|b| BlockerView { cluster: b.cluster, reason: b.reason }).collect(),
        clusters: clusters.into_iter().map(ClusterStatus::from).collect(),
        environments,
        drain_until: r.spec.drain_until,
        bundle_changed_at: r.spec.bundle_changed_at,
        chain_changed_at: r.spec.chain_changed_at,
        old_root: fp(&r.spec.old_root)?,
        new_root: fp(&r.spec.new_root)?,
        history: r.spec.history.iter().map(Transition::from).collect(),
        created_by: r.rec.created_by.clone(),
        created_at: r.rec.created_at,
        updated_at: r.rec.updated_at,
    })
}

#[derive(Serialize, ToSchema)]
pub struct RotationSummary {
    id: String,
    kind: String,
    target: String,
    stage: String,
    created_at: i64,
    updated_at: i64,
}

/// Every rotation, newest first.
#[utoipa::path(tag = "crate::http::rotations", get, path = "/v1/rotations", responses((status = 200, body = [RotationSummary])), security(("bearer" = ["operator", "admin", "auditor"])))]
pub async fn list(State(state): State<AppState>, op: Operator) -> Result<Json<Vec<RotationSummary>>, ServiceError> {
    op.require(&[Role::Operator, Role::Admin, Role::Auditor], "listing rotations")?;
    Ok(Json(
        rotation_record::list(&state)
            .await?
            .into_iter()
            .map(|r| RotationSummary {
                id: r.id,
                kind: r.kind,
                target: r.target,
                stage: r.stage,
                created_at: r.created_at,
                updated_at: r.updated_at,
            })
            .collect(),
    ))
}

/// A rotation's stage, each cluster's progress and what blocks the next stage.
#[utoipa::path(tag = "crate::http::rotations", get, path = "/v1/rotations/{id}", params(("id" = String, Path, description = "The rotation's id")),
    responses((status = 200, body = RotationView), (status = 404, body = crate::error::Problem)), security(("bearer" = ["operator", "admin", "auditor"])))]
pub async fn get(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<Json<RotationView>, ServiceError> {
    op.require(&[Role::Operator, Role::Admin, Role::Auditor], "reading rotations")?;
    let r = rotation_record::load(&state, &id).await.map_err(|e| e.by(op.actor()))?;
    Ok(Json(view(&state, &r, now_secs()).await?))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRotation {
    /// `root`, `environment` or `cluster`.
    // A string so that a wrong kind is `invalid-kind`, not a JSON error.
    #[schema(value_type = RotationKindName)]
    kind: String,
    /// root: the new root certificate (PEM, made in a ceremony).
    new_root: Option<String>,
    /// root: SHA-256 of the root being replaced (default: the only root in use).
    old_root: Option<String>,
    /// environment: which one.
    environment: Option<String>,
    /// environment: the new intermediate (PEM), signed by the same root.
    certificate: Option<String>,
    /// environment: its key. cluster (external-CA): the new server-held key.
    key: Option<String>,
    /// cluster: which one.
    cluster: Option<String>,
}

/// What a rotation replaces (documents `RotationKind`'s names; never built).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = RotationKind)]
#[allow(dead_code)]
enum RotationKindName {
    Root,
    Environment,
    Cluster,
}

#[derive(Serialize, ToSchema)]
pub struct Started {
    rotation: String,
    request_id: String,
    status: String,
}

/// Asks to start a rotation. It exists once a second operator approves.
#[utoipa::path(tag = "crate::http::rotations", post, path = "/v1/rotations", request_body = StartRotation,
    responses((status = 202, body = Started), (status = 400, body = crate::error::Problem), (status = 404, body = crate::error::Problem), (status = 409, body = crate::error::Problem),
        (status = 503, body = crate::error::Problem)),
    security(("bearer" = ["operator", "admin"])))]
pub async fn start(
    State(state): State<AppState>,
    op: Operator,
    Body(req): Body<StartRotation>,
) -> Result<Response, ServiceError> {
    op.require(&[Role::Operator, Role::Admin], "starting a rotation")?;
    let input = rotation::StartInput {
        kind: req.kind,
        new_root: req.new_root,
        old_root: req.old_root,
        environment: req.environment,
        certificate: req.certificate,
        key: req.key,
        cluster: req.cluster,
    };
    let started = rotation::start(&state, &op, input).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Started { rotation: started.rotation, request_id: started.request_id, status: "pending-approval".into() }),
    )
        .into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UploadCertificate {
    environment: String,
    /// The environment's certificate re-signed by the new root (PEM).
    certificate: String,
}

/// Root rotation: records an environment's certificate under the new root (from the
/// cross-sign ceremony). Checked, not trusted: same subject and key, chains to the new root.
#[utoipa::path(tag = "crate::http::rotations", post, path = "/v1/rotations/{id}/certificates", request_body = UploadCertificate, params(("id" = String, Path, description = "The rotation's id")),
    responses((status = 200, body = RotationView), (status = 400, body = crate::error::Problem), (status = 404, body = crate::error::Problem), (status = 409, body = crate::error::Problem)),
    security(("bearer" = ["operator", "admin"])))]
pub async fn upload_certificate(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    Body(req): Body<UploadCertificate>,
) -> Result<Json<RotationView>, ServiceError> {
    op.require(&[Role::Operator, Role::Admin], "adding rotation certificates")?;
    let (r, now) = rotation::add_certificate(&state, &op, &id, &req.environment, &req.certificate).await?;
    Ok(Json(view(&state, &r, now).await?))
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct Move {
    /// The stage expected next (optional): refused if the rotation is elsewhere.
    to: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct MoveRequested {
    rotation: String,
    request_id: String,
    from: String,
    to: String,
    status: String,
}

/// Asks to move a rotation to its next stage. Refused with the list of blockers while any
/// cluster lags; takes effect when a second operator approves (the gate is checked again).
#[utoipa::path(tag = "crate::http::rotations", post, path = "/v1/rotations/{id}/advance", request_body = Move, params(("id" = String, Path, description = "The rotation's id")),
    responses((status = 202, body = MoveRequested), (status = 400, body = crate::error::Problem), (status = 404, body = crate::error::Problem), (status = 409, body = crate::error::Problem)),
    security(("bearer" = ["operator", "admin"])))]
pub async fn advance(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    Body(req): Body<Move>,
) -> Result<Response, ServiceError> {
    request_move(state, op, id, req, true).await
}

/// Asks to move a rotation one stage back, or to abort it from its first stage. Moves that
/// drop a root or abandon a chain wait until nothing on that chain is live.
#[utoipa::path(tag = "crate::http::rotations", post, path = "/v1/rotations/{id}/rollback", request_body = Move, params(("id" = String, Path, description = "The rotation's id")),
    responses((status = 202, body = MoveRequested), (status = 400, body = crate::error::Problem), (status = 404, body = crate::error::Problem), (status = 409, body = crate::error::Problem)),
    security(("bearer" = ["operator", "admin"])))]
pub async fn rollback(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    Body(req): Body<Move>,
) -> Result<Response, ServiceError> {
    request_move(state, op, id, req, false).await
}

async fn request_move(
    state: AppState,
    op: Operator,
    id: String,
    req: Move,
    forward: bool,
) -> Result<Response, ServiceError> {
    op.require(&[Role::Operator, Role::Admin], "changing a rotation's stage")?;
    let r = rotation::request_move(&state, &op, &id, req.to.as_deref(), forward).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(MoveRequested {
            rotation: r.rotation,
            request_id: r.request_id,
            from: r.from.to_string(),
            to: r.to.to_string(),
            status: "pending-approval".into(),
        }),
    )
        .into_response())
}

/// This module's endpoints, merged into the router by `http::router`.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/rotations", routing::post(start).get(list))
        .route("/v1/rotations/{id}", routing::get(get))
        .route("/v1/rotations/{id}/certificates", routing::post(upload_certificate))
        .route("/v1/rotations/{id}/advance", routing::post(advance))
        .route("/v1/rotations/{id}/rollback", routing::post(rollback))
}

/// This module's operations and schemas, merged into the served document by `http::openapi`.
#[derive(OpenApi)]
#[openapi(paths(list, get, start, upload_certificate, advance, rollback))]
pub(crate) struct Doc;
