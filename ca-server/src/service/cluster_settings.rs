//! External-CA clusters' Istio settings, kept in the database: given at registration, changed
//! by an approved request (two-person rule), their service-account keys pushed by the
//! cluster's agent. Every replica builds its token validators from the stored settings
//! (`reload`: at start, each background round, and at once after a change made here).
//! `[istio.clusters.<name>]` configuration tables only seed a registered cluster that has no
//! settings yet (`seed_from_config`, at start, with a warning).

use std::collections::HashMap;
use std::sync::Arc;

use ca_core::names::{is_dns_name, is_k8s_object_name};
use ca_store::{ApprovalRequest, AuditEvent, ClusterSettingsRecord, ClusterStatus, Tx, now_secs};
use jsonwebtoken::jwk::JwkSet;
use serde_json::{Value, json};

use crate::auth::Operator;
use crate::auth::service_account::{Keys, TokenValidator};
use crate::config::IstioSettings;
use crate::error::{ErrorCode, ServiceError};
use crate::service::approval_kind::{Approval, ChangeClusterSettings};
use crate::service::state::AppState;

/// Who gave a cluster's stored JWKS (`jwks_source`): an operator (at registration or in an
/// approved settings change), the cluster's agent, or a seeding configuration table.
pub const SOURCE_REGISTRATION: &str = "registration";
pub const SOURCE_AGENT: &str = "agent";
pub const SOURCE_CONFIG: &str = "config";
/// Reported when no document is stored and the keys come from OIDC discovery.
pub const SOURCE_DISCOVERY: &str = "discovery";

/// Most keys a JWKS may hold: a cluster publishes one or two.
const MAX_KEYS: usize = 32;

fn invalid(detail: impl Into<String>) -> ServiceError {
    ServiceError::new(ErrorCode::InvalidSettings, detail)
}

/// Reads and checks an `istio` settings object as an operator sent it.
pub fn parse(value: Value) -> Result<IstioSettings, ServiceError> {
    let settings: IstioSettings = serde_json::from_value(value).map_err(|e| invalid(format!("istio settings: {e}")))?;
    validate(&settings)?;
    Ok(settings)
}

/// The checks serde cannot make: names, URLs, lifetimes and the JWKS.
pub fn validate(s: &IstioSettings) -> Result<(), ServiceError> {
    let issuer = s.sa_issuer.trim();
    if issuer.is_empty() || issuer != s.sa_issuer || issuer.len() > 1024 || issuer.chars().any(char::is_control) {
        return Err(invalid("sa_issuer must be the cluster's service-account issuer (a URL, at most 1024 characters)"));
    }
    if s.audiences.is_empty() || s.audiences.iter().any(|a| a.trim().is_empty() || a.len() > 256) {
        return Err(invalid("audiences must list one or more non-empty values"));
    }
    for a in &s.trusted_node_accounts {
        let ok = a.split_once('/').is_some_and(|(ns, sa)| is_k8s_object_name(ns) && is_k8s_object_name(sa));
        if !ok {
            return Err(invalid(format!("trusted_node_accounts: {a:?} is not namespace/serviceaccount")));
        }
    }
    let (default, max) = (s.default_ttl.duration(), s.max_ttl.duration());
    if default <= time::Duration::ZERO || default > max {
        return Err(invalid("default_ttl must be positive and at most max_ttl"));
    }
    if s.leeway.duration() < time::Duration::ZERO || s.leeway.duration() > time::Duration::minutes(10) {
        return Err(invalid("leeway must be between 0s and 10m"));
    }
    if s.server_certificate_names.iter().any(|n| !is_dns_name(n)) {
        return Err(invalid("server_certificate_names must be lowercase DNS names without wildcards"));
    }
    if let Some(url) = &s.oidc_discovery_url {
        let ok = reqwest::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "https" | "http") && u.has_host());
        if !ok {
            return Err(invalid(format!("oidc_discovery_url {url:?} is not an http(s) URL")));
        }
    }
    if s.jwks.is_some() && s.oidc_discovery_url.is_some() {
        return Err(invalid("give the keys as jwks or as oidc_discovery_url, not both"));
    }
    if let Some(jwks) = &s.jwks {
        validate_jwks(jwks).map_err(|e| ServiceError::new(ErrorCode::InvalidJwks, e))?;
    }
    Ok(())
}

/// A JWKS document usable for verifying tokens: public keys only, each with a unique `kid`,
/// an accepted algorithm and a key jsonwebtoken can use. Returns the set and its key ids.
pub fn validate_jwks(doc: &Value) -> Result<(JwkSet, Vec<String>), String> {
    let raw = doc.get("keys").and_then(Value::as_array).ok_or("a JWKS is an object with a \"keys\" array")?;
    if raw.is_empty() || raw.len() > MAX_KEYS {
        return Err(format!("a JWKS must hold between 1 and {MAX_KEYS} keys"));
    }
    // Private or symmetric key material has no business here; say so rather than store it.
    for (i, k) in raw.iter().enumerate() {
        if ["d", "p", "q", "dp", "dq", "qi", "k"].iter().any(|f| k.get(f).is_some()) {
            return Err(format!("key {i} holds private or symmetric key material; send public keys only"));
        }
        if k.get("use").is_some_and(|u| u != "sig") {
            return Err(format!("key {i} is not a signature key (use must be \"sig\")"));
        }
    }
    let set: JwkSet = serde_json::from_value(doc.clone()).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut kids = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let kid = jwk.common.key_id.clone().filter(|k| !k.is_empty()).ok_or(format!("key {i} has no kid"))?;
        if kids.contains(&kid) {
            return Err(format!("kid {kid:?} appears twice"));
        }
        if let Some(alg) = jwk.common.key_algorithm {
            let accepted =
                alg.to_string().parse::<jsonwebtoken::Algorithm>().is_ok_and(|a| crate::jwt::ALGORITHMS.contains(&a));
            if !accepted {
                return Err(format!("key {kid:?}: algorithm {alg} is not accepted"));
            }
        }
        jsonwebtoken::DecodingKey::from_jwk(jwk).map_err(|e| format!("key {kid:?} is not usable: {e}"))?;
        key_size(&raw[i]).map_err(|e| format!("key {kid:?} is not usable: {e}"))?;
        kids.push(kid);
    }
    Ok((set, kids))
}

/// The sizes jsonwebtoken does not check: EC coordinates of the curve's length, an Ed25519
/// key of 32 bytes, an RSA modulus of at least 2048 bits.
fn key_size(k: &Value) -> Result<(), String> {
    use base64::Engine;
    let len = |f: &str| {
        let text = k[f].as_str().ok_or(format!("no {f}"))?;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text.trim_end_matches('='))
            .map(|b| b.len())
            .map_err(|_| format!("{f} is not base64url"))
    };
    match (k["kty"].as_str(), k["crv"].as_str()) {
        (Some("EC"), Some(crv)) => {
            let want = match crv {
                "P-256" => 32,
                "P-384" => 48,
                other => return Err(format!("curve {other} is not accepted")),
            };
            if len("x")? != want || len("y")? != want {
                return Err(format!("{crv} coordinates must be {want} bytes"));
            }
        }
        (Some("OKP"), Some("Ed25519")) if len("x")? == 32 => {}
        (Some("OKP"), _) => return Err("only Ed25519 keys of 32 bytes are accepted".into()),
        (Some("RSA"), _) if len("n")? < 256 => return Err("RSA keys must have at least 2048 bits".into()),
        _ => {}
    }
    Ok(())
}

/// A pushed issuer must be the registered one: keys of another issuer would let that issuer's
/// tokens speak for this cluster.
pub fn check_issuer(registered: &str, pushed: &str) -> Result<(), ServiceError> {
    if registered == pushed {
        return Ok(());
    }
    Err(ServiceError::new(
        ErrorCode::IssuerMismatch,
        format!(
            "issuer {pushed:?} is not the cluster's registered sa_issuer {registered:?}; change the settings first"
        ),
    ))
}

/// The key ids of a (validated) JWKS, for audit records: never the key material.
pub fn kids(doc: &Value) -> Vec<String> {
    doc["keys"].as_array().into_iter().flatten().filter_map(|k| k["kid"].as_str().map(str::to_string)).collect()
}

/// The settings as audit records show them: the JWKS reduced to its key ids.
pub fn audit_view(s: &IstioSettings) -> Value {
    let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
    if let Some(jwks) = &s.jwks {
        v["jwks"] = json!({"kids": kids(jwks)});
    }
    v
}

fn list(v: &[String]) -> String {
    serde_json::to_string(v).expect("strings serialise")
}

fn unlist(field: &str, s: &str) -> Result<Vec<String>, ServiceError> {
    serde_json::from_str(s).map_err(|e| ServiceError::internal(format!("stored {field}: {e}")))
}

/// The stored settings (with the current JWKS as `jwks`).
pub fn from_record(r: &ClusterSettingsRecord) -> Result<IstioSettings, ServiceError> {
    let parse_v = |f: &str, s: &str| {
        s.parse::<ca_core::duration::Validity>().map_err(|e| ServiceError::internal(format!("stored {f}: {e}")))
    };
    Ok(IstioSettings {
        sa_issuer: r.sa_issuer.clone(),
        audiences: unlist("audiences", &r.audiences)?,
        trusted_node_accounts: unlist("trusted_node_accounts", &r.trusted_node_accounts)?,
        default_ttl: parse_v("default_ttl", &r.default_ttl)?,
        max_ttl: parse_v("max_ttl", &r.max_ttl)?,
        over_max: serde_json::from_value(json!(r.over_max))
            .map_err(|e| ServiceError::internal(format!("stored over_max: {e}")))?,
        leeway: parse_v("leeway", &r.leeway)?,
        server_certificate_names: unlist("server_certificate_names", &r.server_certificate_names)?,
        jwks: r.jwks.as_deref().map(serde_json::from_str).transpose().map_err(ServiceError::internal)?,
        oidc_discovery_url: r.oidc_discovery_url.clone(),
    })
}

/// The record for `settings` replacing `old` (if any): a JWKS in the settings becomes the
/// current one (`source`), the one it replaces stays accepted for `grace_secs`; without one,
/// the stored JWKS is kept.
fn record(
    cluster: &str,
    s: &IstioSettings,
    old: Option<&ClusterSettingsRecord>,
    source: &str,
    actor: &str,
    now: i64,
    grace_secs: i64,
) -> ClusterSettingsRecord {
    let mut r = ClusterSettingsRecord {
        cluster: cluster.to_string(),
        sa_issuer: s.sa_issuer.clone(),
        audiences: list(&s.audiences),
        trusted_node_accounts: list(&s.trusted_node_accounts),
        default_ttl: s.default_ttl.to_string(),
        max_ttl: s.max_ttl.to_string(),
        over_max: json!(s.over_max).as_str().unwrap_or("reject").to_string(),
        leeway: s.leeway.to_string(),
        server_certificate_names: list(&s.server_certificate_names),
        oidc_discovery_url: s.oidc_discovery_url.clone(),
        jwks: old.and_then(|o| o.jwks.clone()),
        jwks_source: old.and_then(|o| o.jwks_source.clone()),
        jwks_updated_at: old.and_then(|o| o.jwks_updated_at),
        previous_jwks: old.and_then(|o| o.previous_jwks.clone()),
        previous_jwks_until: old.and_then(|o| o.previous_jwks_until),
        version: 0,
        updated_at: now,
        updated_by: actor.to_string(),
    };
    if let Some(jwks) = &s.jwks {
        replace_jwks(&mut r, jwks, source, now, grace_secs);
    }
    r
}

/// Makes `jwks` the record's current key set; the one it replaces (if different) is accepted
/// until `now + grace_secs`. False when `jwks` is the current set already.
fn replace_jwks(r: &mut ClusterSettingsRecord, jwks: &Value, source: &str, now: i64, grace_secs: i64) -> bool {
    let current: Option<Value> = r.jwks.as_deref().and_then(|j| serde_json::from_str(j).ok());
    if current.as_ref() == Some(jwks) {
        return false;
    }
    if let Some(old) = r.jwks.take() {
        r.previous_jwks = Some(old);
        r.previous_jwks_until = Some(now + grace_secs);
    }
    r.jwks = Some(jwks.to_string());
    r.jwks_source = Some(source.to_string());
    r.jwks_updated_at = Some(now);
    true
}

fn grace_secs(state: &AppState) -> i64 {
    state.config.istio.as_ref().map_or(3600, |c| c.jwks_grace.duration().whole_seconds())
}

/// Stores a newly registered (or dev, or seeded) cluster's settings in `tx`.
pub async fn store_new(
    tx: &mut Tx,
    cluster: &str,
    settings: &IstioSettings,
    source: &str,
    actor: &str,
) -> Result<(), ServiceError> {
    let old = tx.get_cluster_settings(cluster).await?;
    tx.put_cluster_settings(&record(cluster, settings, old.as_ref(), source, actor, now_secs(), 0)).await?;
    Ok(())
}

/// The DNS names a cluster's server certificates may carry (istiod's): its settings', or the
/// default for a cluster without settings.
pub async fn server_certificate_names(state: &AppState, cluster: &str) -> Result<Vec<String>, ServiceError> {
    match state.store.get_cluster_settings(cluster).await? {
        Some(r) => Ok(from_record(&r)?.server_certificate_names),
        None => Ok(crate::config::default_server_certificate_names()),
    }
}

/// A cluster's settings as an operator reads them.
pub struct SettingsView {
    /// With the current JWKS as `jwks`.
    pub settings: IstioSettings,
    pub jwks_source: Option<String>,
    pub jwks_updated_at: Option<i64>,
    /// Until when the replaced JWKS is still accepted, while it is.
    pub previous_jwks_until: Option<i64>,
    pub version: i64,
    pub updated_at: i64,
    pub updated_by: String,
}

pub async fn get(state: &AppState, op: &Operator, name: &str) -> Result<SettingsView, ServiceError> {
    let r = state.store.get_cluster_settings(name).await?.ok_or_else(|| {
        ServiceError::not_found(format!(
            "cluster {name:?} has no Istio settings (not a registered external-CA cluster)"
        ))
        .by(op.actor())
    })?;
    let settings = from_record(&r)?;
    let jwks_source = r.jwks_source.clone().or_else(|| r.oidc_discovery_url.as_ref().map(|_| SOURCE_DISCOVERY.into()));
    Ok(SettingsView {
        settings,
        jwks_source,
        jwks_updated_at: r.jwks_updated_at,
        previous_jwks_until: r.previous_jwks_until.filter(|u| *u > now_secs()),
        version: r.version,
        updated_at: r.updated_at,
        updated_by: r.updated_by,
    })
}

/// Asks to replace an external-CA cluster's settings. Takes effect when a different operator
/// approves; returns the request's id.
pub async fn request_change(state: &AppState, op: &Operator, name: &str, value: Value) -> Result<String, ServiceError> {
    let cluster = state
        .store
        .get_cluster(name)
        .await?
        .ok_or_else(|| ServiceError::not_found(format!("no cluster {name:?}")).by(op.actor()))?;
    if !cluster.is_external_ca() {
        // The body may be fine: it is the cluster that cannot take it (409, not 400).
        return Err(ServiceError::new(
            ErrorCode::PluginCluster,
            format!(
                "cluster {name} is in plug-in mode: istiod applies its own policy, there are no settings to change"
            ),
        )
        .by(op.actor()));
    }
    // A pending registration carries its own settings: they are what its approval stores.
    if !cluster.is_active() {
        return Err(ServiceError::new(ErrorCode::ClusterNotActive, format!("cluster {name} is {}", cluster.status))
            .by(op.actor()));
    }
    let settings = parse(value).map_err(|e| e.by(op.actor()))?;
    let now = now_secs();
    let request_id = uuid::Uuid::new_v4().to_string();
    let approval = Approval::ChangeClusterSettings(ChangeClusterSettings { settings: settings.clone() });
    let mut tx = state.store.write().await?;
    tx.insert_request(&approval.request(&request_id, name, &op.name, now)).await?;
    tx.audit(AuditEvent::new(
        op.actor(),
        "cluster.settings.requested",
        name,
        json!({"request_id": request_id, "settings": audit_view(&settings)}),
    ))
    .await?;
    tx.commit().await?;
    Ok(request_id)
}

/// An approved settings change, in the approving transaction.
pub async fn approve_change(
    state: &AppState,
    tx: &mut Tx,
    op: &Operator,
    req: &ApprovalRequest,
    ChangeClusterSettings { settings }: ChangeClusterSettings,
) -> Result<(), ServiceError> {
    let name = &req.subject;
    let cluster = tx.get_cluster(name).await?.filter(|c| c.is_external_ca() && c.is_active());
    if cluster.is_none() {
        return Err(ServiceError::new(ErrorCode::ClusterNotActive, format!("cluster {name} takes no settings now"))
            .by(op.actor()));
    }
    let old = tx.get_cluster_settings(name).await?;
    let rec = record(name, &settings, old.as_ref(), SOURCE_REGISTRATION, &op.actor(), now_secs(), grace_secs(state));
    let version = tx.put_cluster_settings(&rec).await?;
    tx.audit(AuditEvent::new(
        op.actor(),
        "cluster.settings.changed",
        name,
        json!({"request_id": req.id, "settings": audit_view(&settings), "version": version}),
    ))
    .await?;
    Ok(())
}

/// The cluster's agent pushes its service-account issuer and keys (authenticated by its
/// client certificate, `peer`). True when they changed; an identical push writes nothing.
pub async fn push_keys(
    state: &AppState,
    name: &str,
    peer: Option<&[u8]>,
    issuer: &str,
    jwks: Value,
) -> Result<bool, ServiceError> {
    let cluster = state
        .store
        .get_cluster(name)
        .await?
        .ok_or_else(|| ServiceError::not_found(format!("no such cluster (claimed cluster {name:?})")))?;
    let der = peer.ok_or_else(|| {
        ServiceError::new(ErrorCode::Unauthenticated, "push keys over mTLS with the cluster's agent certificate")
    })?;
    crate::service::agent::authenticate(state, &cluster, Some(der)).await?;
    let actor = format!("agent:{name}");
    let stored = state.store.get_cluster_settings(name).await?.ok_or_else(|| {
        ServiceError::new(ErrorCode::ClusterNotActive, format!("cluster {name} has no settings yet")).by(actor.clone())
    })?;
    check_issuer(&stored.sa_issuer, issuer).map_err(|e| e.by(actor.clone()))?;
    let (_, new_kids) =
        validate_jwks(&jwks).map_err(|e| ServiceError::new(ErrorCode::InvalidJwks, e).by(actor.clone()))?;
    let now = now_secs();
    let mut tx = state.store.write().await?;
    // Read again under the write lock: another replica may have stored this push already.
    let Some(mut rec) = tx.get_cluster_settings(name).await? else {
        return Err(ServiceError::internal("cluster settings vanished"));
    };
    check_issuer(&rec.sa_issuer, issuer).map_err(|e| e.by(actor.clone()))?;
    let previous_kids = rec.jwks.as_deref().and_then(|j| serde_json::from_str(j).ok()).map(|v| kids(&v));
    if !replace_jwks(&mut rec, &jwks, SOURCE_AGENT, now, grace_secs(state)) {
        return Ok(false);
    }
    rec.updated_at = now;
    rec.updated_by = actor.clone();
    let version = tx.put_cluster_settings(&rec).await?;
    tx.audit(AuditEvent::new(
        actor,
        "cluster.jwks.updated",
        name,
        json!({"source": SOURCE_AGENT, "kids": new_kids, "previous_kids": previous_kids,
               "previous_accepted_until": rec.previous_jwks_until, "version": version}),
    ))
    .await?;
    tx.commit().await?;
    reload_quietly(state).await;
    Ok(true)
}

/// Serialises reloads, so that an older snapshot never replaces a newer one.
static RELOADING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Builds the token validators of every active external-CA cluster with settings from the
/// database; a cluster whose settings did not change keeps its validator (and its cache).
pub async fn reload(state: &AppState) -> Result<(), ServiceError> {
    let fresh = {
        let _one = RELOADING.lock().await;
        let clusters = state.store.list_clusters().await?;
        let mut next = HashMap::new();
        let mut fresh = Vec::new();
        for row in state.store.list_cluster_settings().await? {
            let served = clusters.iter().any(|c| c.name == row.cluster && c.is_active() && c.is_external_ca());
            if !served {
                continue;
            }
            let held = state.istio.validator(&row.cluster);
            if let Some(v) = held.as_ref().filter(|v| v.version() == row.version) {
                next.insert(row.cluster.clone(), v.clone());
                continue;
            }
            match validator(&row) {
                Ok(v) => {
                    let v = Arc::new(v);
                    match &held {
                        Some(old) if old.discovery().is_some() && old.discovery() == v.discovery() => {
                            v.adopt_fetched(old)
                        }
                        _ if v.discovery().is_some() => fresh.push(v.clone()),
                        _ => {}
                    }
                    next.insert(row.cluster.clone(), v);
                }
                Err(e) => {
                    tracing::error!(cluster = %row.cluster, error = %e.detail, "stored cluster settings are unusable; keeping what was served");
                    if let Some(old) = held {
                        next.insert(row.cluster.clone(), old);
                    }
                }
            }
        }
        state.istio.install_validators(next);
        fresh
    };
    // Keys from discovery are fetched outside the lock: a slow endpoint delays nothing else.
    for v in fresh {
        if let Err(e) = v.refresh(true).await {
            tracing::warn!(cluster = %v.cluster, error = %format!("{e:#}"), "service-account keys not loaded yet; will retry on first use");
        }
    }
    Ok(())
}

/// `reload`, logging a failure (the background round retries).
pub async fn reload_quietly(state: &AppState) {
    if let Err(e) = reload(state).await {
        tracing::warn!(error = %e.detail, "cluster settings not reloaded; retrying next round");
    }
}

fn validator(row: &ClusterSettingsRecord) -> Result<TokenValidator, ServiceError> {
    let mut settings = from_record(row)?;
    let doc = |j: &str| serde_json::from_str::<JwkSet>(j).map_err(ServiceError::internal);
    let current =
        settings.jwks.take().map(|j| serde_json::from_value(j).map_err(ServiceError::internal)).transpose()?;
    let previous = match (&row.previous_jwks, row.previous_jwks_until) {
        (Some(j), Some(until)) if until > now_secs() => Some((doc(j)?, until)),
        _ => None,
    };
    let keys = Keys { current, previous, discovery: row.oidc_discovery_url.clone() };
    TokenValidator::new(&row.cluster, settings, row.version, keys).map_err(ServiceError::internal)
}

/// Seeds, from deprecated `[istio.clusters.<name>]` tables, the settings of registered
/// external-CA clusters that have none yet (a database from before settings were stored);
/// every table is reported as deprecated, and ignored once the database has settings.
pub async fn seed_from_config(state: &AppState) -> Result<(), ServiceError> {
    let Some(istio) = &state.config.istio else { return Ok(()) };
    for (name, c) in &istio.clusters {
        let cluster = state.store.get_cluster(name).await?;
        let Some(cluster) = cluster.filter(|c| c.is_external_ca() && c.status != ClusterStatus::Rejected) else {
            tracing::warn!(cluster = %name, "[istio.clusters.{name}] is deprecated and ignored: no external-CA cluster {name} is registered; register it with its settings (POST /v1/clusters)");
            continue;
        };
        if state.store.get_cluster_settings(name).await?.is_some() {
            tracing::warn!(cluster = %name, "[istio.clusters.{name}] is deprecated and ignored: the cluster's settings are in the database (PUT /v1/clusters/{name}/settings); remove the table");
            continue;
        }
        let jwks = match &c.jwks_file {
            Some(path) => match std::fs::read_to_string(path)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_str::<Value>(&t).map_err(|e| format!("not JSON: {e}")))
            {
                Ok(v) => Some(v),
                Err(e) => {
                    tracing::error!(cluster = %name, file = %path.display(), error = %e, "[istio.clusters.{name}] not seeded: its jwks_file cannot be read");
                    continue;
                }
            },
            None => None,
        };
        let settings = IstioSettings {
            sa_issuer: c.sa_issuer.clone(),
            audiences: c.audiences.clone(),
            trusted_node_accounts: c.trusted_node_accounts.clone(),
            default_ttl: c.default_ttl,
            max_ttl: c.max_ttl,
            over_max: c.over_max,
            leeway: c.leeway,
            server_certificate_names: c.server_certificate_names.clone(),
            jwks,
            oidc_discovery_url: c.oidc_discovery_url.clone(),
        };
        if let Err(e) = validate(&settings) {
            tracing::error!(cluster = %name, error = %e.detail, "[istio.clusters.{name}] not seeded");
            continue;
        }
        let actor = state.job_actor();
        let mut tx = state.store.write().await?;
        store_new(&mut tx, &cluster.name, &settings, SOURCE_CONFIG, &actor).await?;
        tx.audit(AuditEvent::new(
            actor,
            "cluster.settings.seeded",
            name,
            json!({"source": "config", "settings": audit_view(&settings)}),
        ))
        .await?;
        tx.commit().await?;
        tracing::warn!(cluster = %name, "[istio.clusters.{name}] is deprecated: seeded the cluster's settings into the database once; change them with PUT /v1/clusters/{name}/settings and remove the table");
    }
    Ok(())
}

#[cfg(test)]
#[path = "cluster_settings_tests.rs"]
mod tests;
