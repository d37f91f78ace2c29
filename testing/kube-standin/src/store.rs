//! The objects, the one global resourceVersion (etcd's revision) and the bounded event history
//! that watches resume from. Every write goes through `Store::write` or `Store::remove`, so every
//! write bumps the revision and emits exactly one watch event, as the real API server does.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::Kind;

/// A Kubernetes API error, answered as a `Status` object.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<(String, &'static str)>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self { code, reason, message: message.into(), details: None }
    }
    pub fn not_found(kind: Kind, name: &str) -> Self {
        let e = Self::new(404, "NotFound", format!("{} \"{name}\" not found", kind.qualified()));
        Self { details: Some((name.to_string(), kind.plural())), ..e }
    }
    pub fn conflict(kind: Kind, name: &str) -> Self {
        let msg = format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
            kind.qualified()
        );
        Self { details: Some((name.to_string(), kind.plural())), ..Self::new(409, "Conflict", msg) }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }
    /// The `Status` body the real API answers with (`metav1.Status`).
    pub fn status(&self) -> Value {
        let mut s = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code});
        if let Some((name, kind)) = &self.details {
            s["details"] = json!({"name": name, "kind": kind});
        }
        s
    }
}

/// One watch event as it goes on the wire, with what watchers filter on.
#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub kind: Kind,
    pub namespace: String,
    pub kind_of_event: &'static str,
    pub object: Value,
}

pub type Key = (Kind, String, String);

pub struct Store {
    objects: BTreeMap<Key, Value>,
    rv: u64,
    history: VecDeque<Arc<Event>>,
    capacity: usize,
    /// Events at or below this revision are gone: a watch from an older revision gets 410.
    compacted: u64,
    pub events: broadcast::Sender<Arc<Event>>,
}

impl Store {
    pub fn new(capacity: usize) -> Self {
        Self {
            objects: BTreeMap::new(),
            rv: 0,
            history: VecDeque::new(),
            capacity,
            compacted: 0,
            events: broadcast::channel(4096).0,
        }
    }

    pub fn revision(&self) -> u64 {
        self.rv
    }

    pub fn get(&self, key: &Key) -> Option<&Value> {
        self.objects.get(key)
    }

    /// The objects of one kind, in etcd's key order (namespace, then name).
    pub fn list(&self, kind: Kind, namespace: Option<&str>) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((k, ns, _), _)| *k == kind && namespace.is_none_or(|n| n == ns))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Events after `since`, or `None` when the history no longer reaches back that far.
    pub fn events_after(&self, since: u64) -> Option<Vec<Arc<Event>>> {
        (since >= self.compacted).then(|| self.history.iter().filter(|e| e.rv > since).cloned().collect())
    }

    /// Forgets every event so far, as an etcd compaction does.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    /// Stores `object` (already validated) under `key`, stamping what the server owns. A write
    /// that changes nothing is a no-op, as in the real API: no new revision, no event.
    pub fn write(&mut self, key: Key, mut object: Value) -> Result<Value, ApiError> {
        let (kind, ns, name) = &key;
        if kind.namespaced() && !self.objects.contains_key(&(Kind::Namespace, String::new(), ns.clone())) {
            return Err(ApiError::not_found(Kind::Namespace, ns));
        }
        let old = self.objects.get(&key);
        object["apiVersion"] = json!(kind.api_version());
        object["kind"] = json!(kind.name());
        let meta =
            object["metadata"].as_object_mut().ok_or_else(|| ApiError::bad_request("metadata must be an object"))?;
        meta.insert("name".into(), json!(name));
        if kind.namespaced() {
            meta.insert("namespace".into(), json!(ns));
        }
        match old {
            Some(old) => {
                for field in ["uid", "creationTimestamp"] {
                    meta.insert(field.into(), old["metadata"][field].clone());
                }
                meta.insert("resourceVersion".into(), old["metadata"]["resourceVersion"].clone());
            }
            None => {
                meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
                meta.insert("creationTimestamp".into(), json!(now()));
            }
        }
        if *kind == Kind::Secret {
            fold_string_data(&mut object);
            if object["type"].is_null() {
                object["type"] = json!("Opaque");
            }
        }
        if *kind == Kind::Namespace {
            object["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
            object["spec"]["finalizers"] = json!(["kubernetes"]);
            object["status"] = json!({"phase": "Active"});
        }
        if let Some(old) = old
            && *old == object
        {
            return Ok(object);
        }
        let event = if old.is_some() { "MODIFIED" } else { "ADDED" };
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.objects.insert(key.clone(), object.clone());
        self.emit(kind, ns, event, object.clone());
        Ok(object)
    }

    /// Removes an object; a namespace takes its objects with it (at once: see the crate comment).
    pub fn remove(&mut self, key: &Key) -> Option<Value> {
        if key.0 == Kind::Namespace {
            let inside: Vec<Key> =
                self.objects.keys().filter(|(k, ns, _)| k.namespaced() && *ns == key.2).cloned().collect();
            for k in inside {
                self.remove(&k);
            }
        }
        let mut object = self.objects.remove(key)?;
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.emit(&key.0, &key.1, "DELETED", object.clone());
        Some(object)
    }

    fn emit(&mut self, kind: &Kind, ns: &str, kind_of_event: &'static str, object: Value) {
        let event = Arc::new(Event { rv: self.rv, kind: *kind, namespace: ns.to_string(), kind_of_event, object });
        self.history.push_back(event.clone());
        while self.history.len() > self.capacity {
            if let Some(gone) = self.history.pop_front() {
                self.compacted = gone.rv;
            }
        }
        // No receiver is not an error: nobody is watching.
        let _ = self.events.send(event);
    }
}

/// The API server folds a Secret's write-only `stringData` into `data` (base64) on every write.
fn fold_string_data(object: &mut Value) {
    use base64::Engine as _;
    let Some(Value::Object(strings)) = object.as_object_mut().and_then(|o| o.remove("stringData")) else {
        return;
    };
    for (k, v) in strings {
        let text = v.as_str().unwrap_or_default();
        object["data"][k] = json!(base64::engine::general_purpose::STANDARD.encode(text));
    }
}

fn now() -> String {
    let f = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    time::OffsetDateTime::now_utc().format(&f).unwrap_or_default()
}

/// RFC 7386 JSON merge patch: objects merge, `null` removes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}
