//! The HTTP side: authentication, fault injection, the request log, routing by the real API
//! paths, and each verb's semantics on top of the store.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use crate::store::{ApiError, merge_patch};
use crate::{Kind, Request, Shared, lock};

/// An internal event kind that tells open watches their history was compacted.
pub const EXPIRE: &str = "EXPIRE";

pub fn router(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(shared)
}

type Answer = Result<Response, ApiError>;

async fn handle(State(s): State<Arc<Shared>>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
    let path_and_query = uri.path_and_query().map(|p| p.to_string()).unwrap_or_default();
    lock(&s.log).push(Request {
        method: method.to_string(),
        path_and_query,
        content_type: content_type.clone(),
        body: serde_json::from_slice(&body).ok(),
    });
    let bearer =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if bearer != Some(s.token.as_str()) {
        return error(ApiError::new(401, "Unauthorized", "Unauthorized"));
    }
    if let Some(status) = injected_fault(&s, &method, uri.path()) {
        let reason = match status {
            409 => "Conflict",
            429 => "TooManyRequests",
            500 => "InternalError",
            503 => "ServiceUnavailable",
            _ => "Unknown",
        };
        return error(ApiError::new(status, reason, format!("injected fault: {status}")));
    }
    let query = Query::<HashMap<String, String>>::try_from_uri(&uri).map(|q| q.0).unwrap_or_default();
    serve(&s, &method, uri.path(), &query, content_type.as_deref(), &body).await.unwrap_or_else(error)
}

fn injected_fault(s: &Shared, method: &Method, path: &str) -> Option<u16> {
    let mut faults = lock(&s.faults);
    let fault = faults.iter_mut().find(|f| {
        f.remaining > 0 && (f.method == "*" || f.method == method.as_str()) && path.starts_with(&f.path_prefix)
    })?;
    fault.remaining -= 1;
    Some(fault.status)
}

/// What a path names: a collection (all namespaces when `ns` is `None`) or one object.
enum Target {
    Collection { kind: Kind, ns: Option<String> },
    Object { kind: Kind, ns: Option<String>, name: String },
}

fn route(path: &str) -> Option<Target> {
    let (api_version, rest) = if let Some(rest) = path.strip_prefix("/api/v1/") {
        ("v1", rest)
    } else {
        ("coordination.k8s.io/v1", path.strip_prefix("/apis/coordination.k8s.io/v1/")?)
    };
    let seg: Vec<&str> = rest.split('/').collect();
    let kind = |plural| Kind::from_path(api_version, plural);
    let own = |s: &str| Some(s.to_string());
    match seg.as_slice() {
        [plural] => Some(Target::Collection { kind: kind(plural)?, ns: None }),
        [plural, name] if kind(plural) == Some(Kind::Namespace) => {
            Some(Target::Object { kind: Kind::Namespace, ns: None, name: name.to_string() })
        }
        ["namespaces", ns, plural] => {
            kind(plural).filter(|k| k.namespaced()).map(|kind| Target::Collection { kind, ns: own(ns) })
        }
        ["namespaces", ns, plural, name] => kind(plural).filter(|k| k.namespaced()).map(|kind| Target::Object {
            kind,
            ns: own(ns),
            name: name.to_string(),
        }),
        _ => None,
    }
}

async fn serve(
    s: &Arc<Shared>,
    method: &Method,
    path: &str,
    q: &HashMap<String, String>,
    content_type: Option<&str>,
    body: &[u8],
) -> Answer {
    if method == Method::GET {
        let (issuer, jwks) = lock(&s.oidc).clone();
        match path {
            "/.well-known/openid-configuration" => {
                return Ok(json_response(
                    200,
                    &json!({"issuer": issuer, "jwks_uri": format!("{issuer}/openid/v1/jwks"),
                    "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["RS256"]}),
                ));
            }
            "/openid/v1/jwks" => {
                let mut r = json_response(200, &jwks);
                r.headers_mut().insert(header::CONTENT_TYPE, "application/jwk-set+json".parse().expect("static"));
                return Ok(r);
            }
            _ => {}
        }
    }
    let not_found = || ApiError::new(404, "NotFound", "the server could not find the requested resource");
    let not_allowed =
        || ApiError::new(405, "MethodNotAllowed", "the server does not allow this method on the requested resource");
    match route(path).ok_or_else(not_found)? {
        Target::Collection { kind, ns } => match *method {
            Method::GET if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) => watch(s, kind, ns, q),
            Method::GET => list(s, kind, ns.as_deref(), q),
            Method::POST if ns.is_some() || !kind.namespaced() => create(s, kind, ns, parse(body)?),
            _ => Err(not_allowed()),
        },
        Target::Object { kind, ns, name } => {
            let key = (kind, ns.unwrap_or_default(), name);
            match *method {
                Method::GET => {
                    let store = lock(&s.store);
                    let object = store.get(&key).ok_or_else(|| ApiError::not_found(kind, &key.2))?;
                    Ok(json_response(200, object))
                }
                Method::PUT => replace(s, key, parse(body)?),
                Method::PATCH => patch(s, key, q, content_type, body),
                Method::DELETE => delete(s, key, body),
                _ => Err(not_allowed()),
            }
        }
    }
}

fn parse(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice::<Value>(body)
        .ok()
        .filter(Value::is_object)
        .ok_or_else(|| ApiError::bad_request("the body of the request was in an unknown format"))
}

/// Checks that a body's name and namespace agree with the URL's, as the API does.
fn check_identity(object: &Value, key: &(Kind, String, String)) -> Result<(), ApiError> {
    let meta = &object["metadata"];
    if let Some(n) = meta["name"].as_str().filter(|n| *n != key.2) {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({n}) does not match the name on the URL ({})",
            key.2
        )));
    }
    if key.0.namespaced()
        && let Some(n) = meta["namespace"].as_str().filter(|n| !n.is_empty() && *n != key.1)
    {
        return Err(ApiError::bad_request(format!(
            "the namespace of the provided object ({n}) does not match the namespace sent on the request ({})",
            key.1
        )));
    }
    Ok(())
}

fn create(s: &Shared, kind: Kind, ns: Option<String>, object: Value) -> Answer {
    let Some(name) = object["metadata"]["name"].as_str().filter(|n| !n.is_empty()) else {
        let msg =
            format!("{} \"\" is invalid: metadata.name: Required value: name or generateName is required", kind.name());
        return Err(ApiError::new(422, "Invalid", msg));
    };
    let key = (kind, ns.unwrap_or_default(), name.to_string());
    check_identity(&object, &key)?;
    let mut store = lock(&s.store);
    if store.get(&key).is_some() {
        let e = ApiError::new(409, "AlreadyExists", format!("{} \"{name}\" already exists", kind.qualified()));
        return Err(ApiError { details: Some((key.2, kind.plural())), ..e });
    }
    Ok(json_response(201, &store.write(key, without_server_fields(object))?))
}

/// What a client may not set on create or replace: the server stamps these itself.
fn without_server_fields(mut object: Value) -> Value {
    if let Some(meta) = object["metadata"].as_object_mut() {
        for f in ["uid", "resourceVersion", "creationTimestamp", "managedFields"] {
            meta.remove(f);
        }
    }
    object
}

/// A `metadata.resourceVersion` in a body is an optimistic-concurrency precondition.
fn precondition(given: &Value, current: &Value, key: &(Kind, String, String)) -> Result<(), ApiError> {
    match given["metadata"]["resourceVersion"].as_str() {
        Some(rv) if !rv.is_empty() && current["metadata"]["resourceVersion"].as_str() != Some(rv) => {
            Err(ApiError::conflict(key.0, &key.2))
        }
        _ => Ok(()),
    }
}

/// PUT. Leases differ from the other kinds here, as in the API's registry strategies: a PUT may
/// create a Lease (`AllowCreateOnUpdate`) and must name the resourceVersion it replaces
/// (`AllowUnconditionalUpdate` is false); other kinds answer 404 and allow a blind replace.
fn replace(s: &Shared, key: (Kind, String, String), object: Value) -> Answer {
    check_identity(&object, &key)?;
    let lease = key.0 == Kind::Lease;
    let mut store = lock(&s.store);
    let Some(current) = store.get(&key) else {
        if lease && store.get(&(Kind::Namespace, String::new(), key.1.clone())).is_some() {
            return Ok(json_response(201, &store.write(key, without_server_fields(object))?));
        }
        return Err(ApiError::not_found(key.0, &key.2));
    };
    if lease && object["metadata"]["resourceVersion"].as_str().is_none_or(str::is_empty) {
        let msg = format!(
            "Lease.coordination.k8s.io \"{}\" is invalid: metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
            key.2
        );
        return Err(ApiError::new(422, "Invalid", msg));
    }
    precondition(&object, current, &key)?;
    Ok(json_response(200, &store.write(key, without_server_fields(object))?))
}

fn patch(
    s: &Shared,
    key: (Kind, String, String),
    q: &HashMap<String, String>,
    ct: Option<&str>,
    body: &[u8],
) -> Answer {
    let ct = ct.unwrap_or_default().split(';').next().unwrap_or_default().trim();
    let apply = match ct {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => false,
        "application/apply-patch+yaml" => true,
        _ => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/merge-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml (not {ct:?})"
                ),
            ));
        }
    };
    let patch: Value = if apply {
        serde_yaml_ng::from_slice(body)
            .map_err(|_| ApiError::bad_request("the body of the request was not valid YAML"))?
    } else {
        parse(body)?
    };
    if apply && q.get("fieldManager").is_none_or(String::is_empty) {
        return Err(ApiError::bad_request(
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
        ));
    }
    check_identity(&patch, &key)?;
    let mut store = lock(&s.store);
    let (mut object, code) = match store.get(&key) {
        Some(current) => {
            precondition(&patch, current, &key)?;
            (current.clone(), 200)
        }
        // Server-side apply creates; the other patches need an object.
        None if apply => (json!({"metadata": {}}), 201),
        None => return Err(ApiError::not_found(key.0, &key.2)),
    };
    merge_patch(&mut object, &patch);
    if !object["metadata"].is_object() {
        return Err(ApiError::bad_request("metadata must be an object"));
    }
    Ok(json_response(code, &store.write(key, object)?))
}

fn delete(s: &Shared, key: (Kind, String, String), body: &[u8]) -> Answer {
    let options: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let mut store = lock(&s.store);
    let current = store.get(&key).ok_or_else(|| ApiError::not_found(key.0, &key.2))?;
    for (field, name) in [("resourceVersion", "ResourceVersion"), ("uid", "UID")] {
        if let Some(want) = options["preconditions"][field].as_str()
            && current["metadata"][field].as_str() != Some(want)
        {
            let msg = format!(
                "Operation cannot be fulfilled on {} \"{}\": Precondition failed: {name} in precondition: {want}, {name} in object meta: {}",
                key.0.qualified(),
                key.2,
                current["metadata"][field].as_str().unwrap_or_default()
            );
            return Err(ApiError {
                details: Some((key.2.clone(), key.0.plural())),
                ..ApiError::new(409, "Conflict", msg)
            });
        }
    }
    let object = store.remove(&key).ok_or_else(|| ApiError::not_found(key.0, &key.2))?;
    if key.0 == Kind::Namespace {
        return Ok(json_response(200, &object));
    }
    let details = json!({"name": key.2, "kind": key.0.plural(), "uid": object["metadata"]["uid"]});
    Ok(json_response(
        200,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}),
    ))
}

/// One selector term: `key=value`, `key==value`, `key!=value`, `key` (exists), `!key`.
struct Term {
    key: String,
    value: Option<String>,
    equal: bool,
}

fn selector(text: Option<&String>, fields: bool) -> Result<Vec<Term>, ApiError> {
    let mut terms = Vec::new();
    for t in text.map(String::as_str).unwrap_or_default().split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let term = if let Some((k, v)) = t.split_once("!=") {
            Term { key: k.trim().into(), value: Some(v.trim().into()), equal: false }
        } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
            Term { key: k.trim().into(), value: Some(v.trim().into()), equal: true }
        } else if fields || t.contains([' ', '(']) {
            return Err(ApiError::bad_request(format!(
                "unable to parse requirement: {t:?} (set-based selectors are not modelled)"
            )));
        } else if let Some(k) = t.strip_prefix('!') {
            Term { key: k.into(), value: None, equal: false }
        } else {
            Term { key: t.into(), value: None, equal: true }
        };
        if fields && !matches!(term.key.as_str(), "metadata.name" | "metadata.namespace") {
            return Err(ApiError::bad_request(format!("field label not supported: {}", term.key)));
        }
        terms.push(term);
    }
    Ok(terms)
}

fn matches(object: &Value, fields: &[Term], labels: &[Term]) -> bool {
    let meta = &object["metadata"];
    let field_ok = fields.iter().all(|t| {
        let v = meta[t.key.trim_start_matches("metadata.")].as_str().unwrap_or_default();
        (Some(v) == t.value.as_deref()) == t.equal
    });
    let label_ok = labels.iter().all(|t| {
        let v = meta["labels"][t.key.as_str()].as_str();
        match &t.value {
            Some(want) => (v == Some(want.as_str())) == t.equal,
            None => v.is_some() == t.equal,
        }
    });
    field_ok && label_ok
}

fn list(s: &Shared, kind: Kind, ns: Option<&str>, q: &HashMap<String, String>) -> Answer {
    let (fields, labels) = (selector(q.get("fieldSelector"), true)?, selector(q.get("labelSelector"), false)?);
    let store = lock(&s.store);
    // Items of a typed list carry no kind or apiVersion of their own, as in the real API.
    let items: Vec<Value> = store
        .list(kind, ns)
        .into_iter()
        .filter(|o| matches(o, &fields, &labels))
        .map(|mut o| {
            if let Some(m) = o.as_object_mut() {
                m.remove("kind");
                m.remove("apiVersion");
            }
            o
        })
        .collect();
    let list = json!({"kind": format!("{}List", kind.name()), "apiVersion": kind.api_version(),
        "metadata": {"resourceVersion": store.revision().to_string()}, "items": items});
    Ok(json_response(200, &list))
}

fn line(kind_of_event: &str, object: &Value) -> Bytes {
    let mut out = serde_json::to_vec(&json!({"type": kind_of_event, "object": object})).unwrap_or_default();
    out.push(b'\n');
    Bytes::from(out)
}

fn expired(since: &str, oldest: u64) -> Bytes {
    let status = ApiError::new(410, "Expired", format!("too old resource version: {since} ({oldest})")).status();
    line("ERROR", &status)
}

/// A watch: the events after `resourceVersion` (or, without one or with "0", the current objects
/// as ADDED), then live events, bookmarks when asked, until `timeoutSeconds` or the client goes.
fn watch(s: &Arc<Shared>, kind: Kind, ns: Option<String>, q: &HashMap<String, String>) -> Answer {
    let (fields, labels) = (selector(q.get("fieldSelector"), true)?, selector(q.get("labelSelector"), false)?);
    let since = match q.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(rv) => {
            Some(rv.parse::<u64>().map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?)
        }
    };
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = Duration::from_secs(q.get("timeoutSeconds").and_then(|t| t.parse().ok()).unwrap_or(1800));
    let scope = ns.clone();
    let wanted = move |k: Kind, n: &str, o: &Value| {
        k == kind && scope.as_deref().is_none_or(|s| s == n) && matches(o, &fields, &labels)
    };
    let (mut first, mut events, start, gone) = {
        let store = lock(&s.store);
        let events = store.events.subscribe();
        let (first, gone) = match since {
            None => {
                let now = store
                    .list(kind, ns.as_deref())
                    .into_iter()
                    .filter(|o| wanted(kind, ns.as_deref().unwrap_or_default(), o));
                (now.map(|o| line("ADDED", &o)).collect(), false)
            }
            Some(n) => match store.events_after(n) {
                Some(past) => {
                    let past = past.iter().filter(|e| wanted(e.kind, &e.namespace, &e.object));
                    (past.map(|e| line(e.kind_of_event, &e.object)).collect(), false)
                }
                None => (vec![expired(&n.to_string(), store.revision())], true),
            },
        };
        (first, events, store.revision(), gone)
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let interval = s.bookmark_interval;
    tokio::spawn(async move {
        for l in first.drain(..) {
            if tx.send(l).await.is_err() {
                return;
            }
        }
        if gone {
            return;
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        let mut last = start;
        loop {
            let out = tokio::select! {
                _ = &mut deadline => return,
                _ = tx.closed() => return,
                _ = tick.tick(), if bookmarks => {
                    line("BOOKMARK", &json!({"kind": kind.name(), "apiVersion": kind.api_version(), "metadata": {"resourceVersion": last.to_string()}}))
                }
                e = events.recv() => match e {
                    Ok(e) if e.kind_of_event == EXPIRE => {
                        let _ = tx.send(expired(&last.to_string(), e.rv)).await;
                        return;
                    }
                    Ok(e) => {
                        last = e.rv;
                        if !wanted(e.kind, &e.namespace, &e.object) {
                            continue;
                        }
                        line(e.kind_of_event, &e.object)
                    }
                    // This watcher fell too far behind: it must start over, as with the real API.
                    Err(RecvError::Lagged(_)) => {
                        let _ = tx.send(expired(&last.to_string(), last + 1)).await;
                        return;
                    }
                    Err(RecvError::Closed) => return,
                },
            };
            if tx.send(out).await.is_err() {
                return;
            }
        }
    });
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx)) });
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut().insert(header::CONTENT_TYPE, "application/json".parse().expect("static"));
    Ok(r)
}

fn json_response(code: u16, v: &Value) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, [(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

fn error(e: ApiError) -> Response {
    json_response(e.code, &e.status())
}
