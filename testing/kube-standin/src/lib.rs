//! An in-process stand-in for the Kubernetes API server, for testing ca-agent: no API server can
//! run on the test machines. It serves, over HTTPS on 127.0.0.1 with a bearer token, exactly the
//! calls ca-agent makes, with the semantics the Kubernetes API documents for them:
//!
//! - core/v1 `namespaces` (cluster-scoped), `configmaps` and `secrets`, and coordination.k8s.io/v1
//!   `leases`, at the real paths (also `/api/v1/configmaps` etc. across all namespaces);
//! - GET, LIST (`fieldSelector` on `metadata.name`/`metadata.namespace`, `labelSelector` with
//!   `=`, `==`, `!=`, `key`, `!key`), POST (409 AlreadyExists; 404 in a missing namespace), PUT
//!   (409 Conflict on a stale `metadata.resourceVersion`; none means unconditional, except for
//!   leases, 422; 404 when absent, except that a PUT creates a lease), PATCH (merge patch;
//!   strategic merge patch treated as merge patch; server-side apply creates or merges), DELETE (a `Status` for configmaps, secrets and leases, the object for
//!   namespaces; preconditions on `resourceVersion` and `uid`);
//! - WATCH from a `resourceVersion` with ADDED/MODIFIED/DELETED events, periodic BOOKMARKs when
//!   asked, `timeoutSeconds`, and an ERROR event with a 410 `Expired` Status when the revision
//!   is older than the bounded history kept ([`Options::history`], [`StandIn::compact`]);
//! - one global, monotonically increasing resourceVersion (etcd's revision); a write that
//!   changes nothing is a no-op, as in the real API;
//! - `/.well-known/openid-configuration` and `/openid/v1/jwks` (service-account issuer discovery).
//!
//! What it does not model (so a test passing here says nothing about these):
//! - authorisation (RBAC): one token, allowed everything; no impersonation, no audit;
//! - admission, defaulting and validation beyond names (no size limits, no immutable fields,
//!   no DNS-name checks), `managedFields` and server-side apply's field ownership and conflicts
//!   (an apply is a merge patch that may create), strategic merge's list merging by key,
//!   JSON patch (answered 415), `generation`, `deletionTimestamp`, finalizers and owner
//!   references (no garbage collection);
//! - namespace deletion: real namespaces go through phase `Terminating` while a controller
//!   deletes their contents; here the namespace and everything in it are gone at once;
//! - pagination (`limit` is ignored, no `continue`), `resourceVersionMatch=Exact` (lists are
//!   always the latest state), watches from a revision in the future (the real API waits, then
//!   answers 504), `sendInitialEvents` streaming lists, and label selectors with `in`/`notin`;
//! - a watch whose object stops matching its label selector gets no synthetic DELETED event;
//! - other resources, subresources, API discovery (`/api`, `/apis`), protobuf, HTTP/2.

#![forbid(unsafe_code)]

mod http;
mod store;
mod tls;

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;

pub use store::ApiError;

/// The resources the stand-in serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    ConfigMap,
    Secret,
    Lease,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Namespace, Kind::ConfigMap, Kind::Secret, Kind::Lease];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::ConfigMap => "ConfigMap",
            Kind::Secret => "Secret",
            Kind::Lease => "Lease",
        }
    }
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Namespace => "namespaces",
            Kind::ConfigMap => "configmaps",
            Kind::Secret => "secrets",
            Kind::Lease => "leases",
        }
    }
    /// `plural.group` as the API's messages name it (`leases.coordination.k8s.io`).
    fn qualified(self) -> String {
        match self {
            Kind::Lease => "leases.coordination.k8s.io".into(),
            k => k.plural().into(),
        }
    }
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Lease => "coordination.k8s.io/v1",
            _ => "v1",
        }
    }
    pub fn namespaced(self) -> bool {
        self != Kind::Namespace
    }
    fn from_path(api_version: &str, plural: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.api_version() == api_version && k.plural() == plural)
    }
}

/// How a stand-in starts. Its `Debug` leaves the token out.
#[derive(Clone)]
pub struct Options {
    /// The bearer token every request must carry.
    pub token: String,
    /// How many events the watch history keeps; a watch from an older revision gets 410.
    pub history: usize,
    /// How often a watch that asked for bookmarks gets one (the real API: about a minute).
    pub bookmark_interval: Duration,
    /// Namespaces that exist from the start, as in a new cluster.
    pub namespaces: Vec<String>,
    /// The service-account issuer and its JWKS document.
    pub issuer: String,
    pub jwks: Value,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("token", &"<redacted>")
            .field("history", &self.history)
            .field("bookmark_interval", &self.bookmark_interval)
            .field("namespaces", &self.namespaces)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            token: format!("standin-{}", uuid::Uuid::new_v4()),
            history: 1000,
            bookmark_interval: Duration::from_secs(1),
            namespaces: ["default", "kube-system", "kube-public", "kube-node-lease"].map(String::from).to_vec(),
            issuer: "https://kubernetes.default.svc.cluster.local".into(),
            jwks: serde_json::json!({"keys": []}),
        }
    }
}

/// One request as received (before authentication and fault injection).
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path_and_query: String,
    pub content_type: Option<String>,
    /// The body, when it was JSON.
    pub body: Option<Value>,
}

struct Fault {
    method: String,
    path_prefix: String,
    status: u16,
    remaining: u32,
}

struct Shared {
    store: Mutex<store::Store>,
    token: String,
    bookmark_interval: Duration,
    oidc: Mutex<(String, Value)>,
    faults: Mutex<Vec<Fault>>,
    log: Mutex<Vec<Request>>,
    /// True while the server is "down": new connections are dropped, open ones are closed.
    down: tokio::sync::watch::Sender<bool>,
}

/// Locks, ignoring poisoning: a test that panicked while holding a lock has failed already.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running stand-in; it stops when dropped.
pub struct StandIn {
    shared: Arc<Shared>,
    url: String,
    ca_pem: String,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl StandIn {
    /// Starts serving on 127.0.0.1 on a free port, in tasks on the caller's tokio runtime: a
    /// test must not block that runtime's thread (e.g. `std::process::Command::status` under
    /// `#[tokio::test]`), or the stand-in stops answering.
    pub async fn start(opts: Options) -> std::io::Result<StandIn> {
        let mut store = store::Store::new(opts.history);
        for ns in &opts.namespaces {
            let object = serde_json::json!({"metadata": {"name": ns}});
            store
                .write((Kind::Namespace, String::new(), ns.clone()), object)
                .map_err(|e| std::io::Error::other(e.message))?;
        }
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            token: opts.token,
            bookmark_interval: opts.bookmark_interval,
            oidc: Mutex::new((opts.issuer, opts.jwks)),
            faults: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
            down: tokio::sync::watch::channel(false).0,
        });
        let (addr, ca_pem, server) = tls::serve(http::router(shared.clone()), shared.down.clone()).await?;
        Ok(StandIn { shared, url: format!("https://{addr}"), ca_pem, server })
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The PEM of the self-signed certificate the server presents.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// Writes a kubeconfig (mode 0600: it holds the token) so that `KUBECONFIG=path` makes
    /// `kube::Client::try_default()` talk to this stand-in, in namespace `default`.
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        tls::write_kubeconfig(path, &self.url, &self.ca_pem, &self.shared.token)
    }

    /// The object as the API would return it, without HTTP. `namespace` is ignored for
    /// namespaces and means `default` when `None` for the other kinds (in `put` and `delete` too).
    pub fn get(&self, kind: Kind, namespace: Option<&str>, name: &str) -> Option<Value> {
        lock(&self.shared.store).get(&key(kind, namespace, name)).cloned()
    }

    /// Waits (polling every 20 ms, up to `timeout`) until the object exists and `ready` holds for
    /// it, e.g. until an agent under test has written it; `None` on timeout.
    pub async fn wait_for(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: &str,
        timeout: Duration,
        ready: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(object) = self.get(kind, namespace, name).filter(|o| ready(o)) {
                return Some(object);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Creates or replaces an object as a real write would (new resourceVersion, a watch event;
    /// no precondition). Panics when a namespaced object's namespace does not exist: the test
    /// set up a state the API would refuse.
    pub fn put(&self, kind: Kind, namespace: Option<&str>, name: &str, object: Value) -> Value {
        let mut object = object;
        if !object["metadata"].is_object() {
            object["metadata"] = serde_json::json!({});
        }
        lock(&self.shared.store)
            .write(key(kind, namespace, name), object)
            .unwrap_or_else(|e| panic!("stand-in put {kind:?} {namespace:?}/{name}: {}", e.message))
    }

    /// Deletes an object (a namespace with everything in it) as a real delete would.
    pub fn delete(&self, kind: Kind, namespace: Option<&str>, name: &str) -> Option<Value> {
        lock(&self.shared.store).remove(&key(kind, namespace, name))
    }

    /// The current global resourceVersion.
    pub fn revision(&self) -> u64 {
        lock(&self.shared.store).revision()
    }

    /// Forgets the watch history, as an etcd compaction does: every open watch gets an ERROR
    /// event with a 410 Status and ends, and a watch from any revision before now gets 410, so
    /// a client must re-list.
    pub fn compact(&self) {
        let mut store = lock(&self.shared.store);
        store.compact();
        let _ = store.events.send(Arc::new(store::Event {
            rv: store.revision(),
            kind: Kind::Namespace,
            namespace: String::new(),
            kind_of_event: http::EXPIRE,
            object: Value::Null,
        }));
    }

    /// What `/.well-known/openid-configuration` and `/openid/v1/jwks` serve from now on.
    pub fn set_oidc(&self, issuer: &str, jwks: Value) {
        *lock(&self.shared.oidc) = (issuer.to_string(), jwks);
    }

    /// The next `count` requests with this method (`"*"`: any) whose path (without the query) starts with
    /// `path_prefix` are answered with `status` and a matching `Status` body (409 Conflict,
    /// 500 InternalError, 503 ServiceUnavailable, 429 TooManyRequests) instead of being served.
    /// kube's client retries 429, 503 and 504 by itself (up to 15 times, with backoff), so a
    /// caller sees a 503 only after that many; a 500 or 409 reaches it at once.
    pub fn fail_next(&self, method: &str, path_prefix: &str, status: u16, count: u32) {
        lock(&self.shared.faults).push(Fault {
            method: method.to_ascii_uppercase(),
            path_prefix: path_prefix.to_string(),
            status,
            remaining: count,
        });
    }

    /// Forgets every fault still waiting to be served by `fail_next`.
    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
    }

    /// While true the server is unreachable: open connections (watches too) are closed and new
    /// ones are dropped once accepted. For "every request answers 503" use
    /// `fail_next("*", "/", 503, u32::MAX)`.
    pub fn set_unavailable(&self, down: bool) {
        self.shared.down.send_replace(down);
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        lock(&self.shared.log).clone()
    }
}

fn key(kind: Kind, namespace: Option<&str>, name: &str) -> store::Key {
    let ns = if kind.namespaced() { namespace.unwrap_or("default") } else { "" };
    (kind, ns.to_string(), name.to_string())
}
