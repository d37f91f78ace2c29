//! The stand-in, driven through kube-rs as ca-agent drives it: each test fails if the semantics
//! it names break.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, watcher};
use kube_standin::{Kind, Options, StandIn};
use serde_json::json;

async fn start(opts: Options) -> (StandIn, kube::Client, tempfile::TempDir) {
    let standin = StandIn::start(opts).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    standin.write_kubeconfig(&path).unwrap();
    // What `KUBECONFIG=path` makes `Client::try_default()` read.
    let config =
        kube::Config::from_custom_kubeconfig(Kubeconfig::read_from(&path).unwrap(), &KubeConfigOptions::default())
            .await
            .unwrap();
    (standin, kube::Client::try_from(config).unwrap(), dir)
}

fn cm(name: &str, data: &[(&str, &str)]) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name},
        "data": data.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>()}))
    .unwrap()
}

/// The API error's code and reason, or a panic naming what came instead.
fn api_error<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> (u16, String) {
    match r {
        Err(kube::Error::Api(s)) => (s.code, s.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn rv(cm: &ConfigMap) -> u64 {
    cm.metadata.resource_version.as_deref().unwrap().parse().unwrap()
}

#[tokio::test]
async fn create_get_replace_patch_delete_follow_the_api() {
    let (standin, client, _dir) = start(Options::default()).await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let pp = PostParams::default();

    let created = api.create(&pp, &cm("a", &[("k", "1")])).await.unwrap();
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    assert_eq!(rv(&created), standin.revision());
    assert_eq!(api_error(api.create(&pp, &cm("a", &[])).await), (409, "AlreadyExists".into()));
    assert_eq!(api_error(api.get("missing").await), (404, "NotFound".into()));
    let in_missing_ns: Api<ConfigMap> = Api::namespaced(client.clone(), "nowhere");
    assert_eq!(api_error(in_missing_ns.create(&pp, &cm("a", &[])).await).0, 404);

    // Optimistic concurrency: a replace from a stale read is refused, a fresh one succeeds.
    let mut fresh = api.get("a").await.unwrap();
    fresh.data.as_mut().unwrap().insert("k".into(), "2".into());
    let replaced = api.replace("a", &pp, &fresh).await.unwrap();
    assert!(rv(&replaced) > rv(&created));
    assert_eq!(replaced.metadata.uid, created.metadata.uid);
    assert_eq!(api_error(api.replace("a", &pp, &created).await), (409, "Conflict".into()));
    // Without a resourceVersion a replace is unconditional; on a missing object it is a 404.
    let mut blind = cm("a", &[("k", "3")]);
    assert_eq!(api.replace("a", &pp, &blind).await.unwrap().data.unwrap()["k"], "3");
    blind.metadata.name = Some("gone".into());
    assert_eq!(api_error(api.replace("gone", &pp, &blind).await).0, 404);
    // A write that changes nothing makes no new revision.
    let before = standin.revision();
    api.replace("a", &pp, &cm("a", &[("k", "3")])).await.unwrap();
    assert_eq!(standin.revision(), before);

    // Merge patch: keys merge, null removes; a stale resourceVersion in it is a precondition.
    let patched =
        api.patch("a", &PatchParams::default(), &Patch::Merge(json!({"data": {"k": null, "n": "x"}}))).await.unwrap();
    assert_eq!(patched.data.unwrap().into_iter().collect::<Vec<_>>(), vec![("n".to_string(), "x".to_string())]);
    let stale = Patch::Merge(json!({"metadata": {"resourceVersion": "1"}, "data": {"n": "y"}}));
    assert_eq!(api_error(api.patch("a", &PatchParams::default(), &stale).await).0, 409);
    let strategic = Patch::Strategic(json!({"data": {"s": "1"}}));
    assert_eq!(api.patch("a", &PatchParams::default(), &strategic).await.unwrap().data.unwrap().len(), 2);
    assert_eq!(api_error(api.patch("gone", &PatchParams::default(), &Patch::Merge(json!({}))).await).0, 404);
    // Server-side apply creates, then merges.
    let ssa = PatchParams::apply("test").force();
    let applied = api.patch("b", &ssa, &Patch::Apply(cm("b", &[("a", "1")]))).await.unwrap();
    assert_eq!(applied.data.unwrap()["a"], "1");

    // Delete answers a Status for a configmap; then it is gone.
    let deleted = api.delete("a", &DeleteParams::default()).await.unwrap();
    assert!(deleted.is_right(), "a configmap delete answers a Status: {deleted:?}");
    assert!(standin.get(Kind::ConfigMap, Some("default"), "a").is_none());
    assert_eq!(api_error(api.delete("a", &DeleteParams::default()).await).0, 404);
    let pre = DeleteParams {
        preconditions: Some(kube::api::Preconditions { resource_version: Some("1".into()), uid: None }),
        ..Default::default()
    };
    assert_eq!(api_error(api.delete("b", &pre).await).0, 409);
}

#[tokio::test]
async fn secrets_leases_and_namespaces() {
    let (standin, client, _dir) = start(Options::default()).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let s: Secret = serde_json::from_value(json!({"metadata": {"name": "s"}, "stringData": {"token": "abc"}})).unwrap();
    let s = secrets.create(&PostParams::default(), &s).await.unwrap();
    assert_eq!(s.data.unwrap()["token"].0, b"abc");
    assert_eq!(s.type_.as_deref(), Some("Opaque"));

    // Two candidates race for a Lease from the same read: exactly one wins.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let lease: Lease =
        serde_json::from_value(json!({"metadata": {"name": "l"}, "spec": {"holderIdentity": "a"}})).unwrap();
    let read = leases.create(&PostParams::default(), &lease).await.unwrap();
    let (mut one, mut two) = (read.clone(), read);
    one.spec.as_mut().unwrap().holder_identity = Some("b".into());
    two.spec.as_mut().unwrap().holder_identity = Some("c".into());
    leases.replace("l", &PostParams::default(), &one).await.unwrap();
    assert_eq!(api_error(leases.replace("l", &PostParams::default(), &two).await).0, 409);
    // A lease's PUT must name a resourceVersion, and may create.
    two.metadata.resource_version = None;
    assert_eq!(api_error(leases.replace("l", &PostParams::default(), &two).await), (422, "Invalid".into()));
    two.metadata.name = Some("fresh".into());
    assert!(leases.replace("fresh", &PostParams::default(), &two).await.is_ok());
    assert!(standin.get(Kind::Lease, Some("default"), "fresh").is_some());
    assert!(
        standin.requests().iter().any(|r| r.method == "PUT"
            && r.path_and_query.starts_with("/apis/coordination.k8s.io/v1/namespaces/default/leases/l")
            && r.body.as_ref().is_some_and(|b| b["metadata"]["resourceVersion"].is_string())),
        "the log records each PUT with its body"
    );

    // Deleting a namespace returns it and takes its objects with it.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "gone"}})).unwrap();
    namespaces.create(&PostParams::default(), &ns).await.unwrap();
    let in_ns: Api<ConfigMap> = Api::namespaced(client.clone(), "gone");
    in_ns.create(&PostParams::default(), &cm("c", &[])).await.unwrap();
    let deleted = namespaces.delete("gone", &DeleteParams::default()).await.unwrap();
    assert_eq!(deleted.left().and_then(|n| n.metadata.name).as_deref(), Some("gone"));
    assert_eq!(api_error(in_ns.get("c").await).0, 404);
    assert!(namespaces.get("default").await.is_ok(), "a new cluster has its default namespaces");
}

#[tokio::test]
async fn lists_select_by_field_and_label_and_carry_the_revision() {
    let (standin, client, _dir) = start(Options::default()).await;
    for ns in ["default", "kube-system"] {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        let mut labelled = cm("root", &[]);
        labelled.metadata.labels = Some([("app".to_string(), ns.to_string())].into());
        api.create(&PostParams::default(), &labelled).await.unwrap();
        api.create(&PostParams::default(), &cm("other", &[])).await.unwrap();
    }
    let all: Api<ConfigMap> = Api::all(client.clone());
    let named = all.list(&ListParams::default().fields("metadata.name=root")).await.unwrap();
    let where_: Vec<_> = named.items.iter().map(|c| c.metadata.namespace.clone().unwrap()).collect();
    assert_eq!(where_, ["default", "kube-system"]);
    assert_eq!(named.metadata.resource_version, Some(standin.revision().to_string()));
    let labelled = all.list(&ListParams::default().labels("app=default")).await.unwrap();
    assert_eq!(labelled.items.len(), 1);
    let unlabelled = all.list(&ListParams::default().labels("!app")).await.unwrap();
    assert_eq!(unlabelled.items.len(), 2);
    let one_ns: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    assert_eq!(one_ns.list(&ListParams::default()).await.unwrap().items.len(), 2);
    assert_eq!(api_error(all.list(&ListParams::default().fields("data.x=1")).await).0, 400);
}

/// How many times the configmaps of all namespaces were listed (not watched).
fn lists(standin: &StandIn) -> usize {
    let is_list = |p: &str| p.starts_with("/api/v1/configmaps?") && !p.contains("watch=");
    standin.requests().iter().filter(|r| r.method == "GET" && is_list(&r.path_and_query)).count()
}

#[tokio::test]
async fn the_watcher_sees_every_change_relists_after_410_and_resumes_after_an_outage() {
    let (standin, client, _dir) = start(Options::default()).await;
    standin.put(Kind::ConfigMap, Some("default"), "before", json!({"data": {"k": "v"}}));
    let api: Api<ConfigMap> = Api::all(client.clone());
    let mut events = watcher(api.clone(), watcher::Config::default()).default_backoff().boxed();
    let mut next = async || tokio::time::timeout(Duration::from_secs(10), events.next()).await.unwrap().unwrap();
    assert!(matches!(next().await, Ok(watcher::Event::Init)));
    assert!(matches!(next().await, Ok(watcher::Event::InitApply(c)) if c.metadata.name.as_deref() == Some("before")));
    assert!(matches!(next().await, Ok(watcher::Event::InitDone)));

    let nsd: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    nsd.create(&PostParams::default(), &cm("new", &[])).await.unwrap();
    assert!(matches!(next().await, Ok(watcher::Event::Apply(c)) if c.metadata.name.as_deref() == Some("new")));
    standin.put(Kind::ConfigMap, Some("default"), "new", json!({"data": {"edited": "yes"}}));
    assert!(
        matches!(next().await, Ok(watcher::Event::Apply(c)) if c.data.as_ref().is_some_and(|d| d.contains_key("edited")))
    );
    nsd.delete("new", &DeleteParams::default()).await.unwrap();
    assert!(matches!(next().await, Ok(watcher::Event::Delete(c)) if c.metadata.name.as_deref() == Some("new")));

    // A compaction expires the watch: the watcher sees the 410 and lists again.
    standin.compact();
    match next().await {
        Err(watcher::Error::WatchError(s)) => assert_eq!(s.code, 410),
        other => panic!("expected a 410 watch error, got {other:?}"),
    }
    assert!(matches!(next().await, Ok(watcher::Event::Init)));
    assert!(matches!(next().await, Ok(watcher::Event::InitApply(c)) if c.metadata.name.as_deref() == Some("before")));
    assert!(matches!(next().await, Ok(watcher::Event::InitDone)));
    assert_eq!(lists(&standin), 2, "one list at the start and one after the 410");

    // An outage ends the watch; the watcher comes back from its resourceVersion and is told what
    // changed meanwhile from the history, without listing again.
    standin.set_unavailable(true);
    assert!(matches!(next().await, Err(watcher::Error::WatchStartFailed(_))), "the watch ended and cannot restart");
    standin.put(Kind::ConfigMap, Some("default"), "during", json!({}));
    standin.set_unavailable(false);
    loop {
        match next().await {
            Ok(watcher::Event::Apply(c)) if c.metadata.name.as_deref() == Some("during") => break,
            Err(_) => continue,
            other => panic!("expected the change made during the outage, got {other:?}"),
        }
    }
    assert_eq!(lists(&standin), 2, "resumed from history, not re-listed");
}

#[tokio::test]
async fn watches_resume_from_history_expire_beyond_it_and_get_bookmarks() {
    let opts = Options { history: 3, bookmark_interval: Duration::from_millis(200), ..Options::default() };
    let (standin, client, _dir) = start(opts).await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let start = standin.revision();
    for i in 0..2 {
        standin.put(Kind::ConfigMap, Some("default"), &format!("c{i}"), json!({}));
    }
    // Resuming within the history replays what happened since.
    let mut stream = api.watch(&WatchParams::default().disable_bookmarks(), &start.to_string()).await.unwrap().boxed();
    for i in 0..2 {
        let added = stream.next().await.unwrap().unwrap();
        assert!(matches!(added, WatchEvent::Added(c) if c.metadata.name == Some(format!("c{i}"))));
    }
    for i in 2..6 {
        standin.put(Kind::ConfigMap, Some("default"), &format!("c{i}"), json!({}));
    }
    // Too far back: one ERROR event with a 410 Expired Status.
    let mut old = api.watch(&WatchParams::default(), &start.to_string()).await.unwrap().boxed();
    match old.next().await.unwrap().unwrap() {
        WatchEvent::Error(s) => assert_eq!((s.code, s.reason.as_str()), (410, "Expired")),
        other => panic!("expected 410, got {other:?}"),
    }
    // Bookmarks carry the current revision, and come only when asked for.
    let now = standin.revision().to_string();
    let mut marked = api.watch(&WatchParams::default(), &now).await.unwrap().boxed();
    let first = tokio::time::timeout(Duration::from_secs(5), marked.next()).await.unwrap().unwrap().unwrap();
    assert!(matches!(first, WatchEvent::Bookmark(b) if b.metadata.resource_version == now));
    let mut quiet = api.watch(&WatchParams::default().disable_bookmarks().timeout(1), &now).await.unwrap().boxed();
    assert!(quiet.next().await.is_none(), "no bookmark unasked for, and the watch ends at timeoutSeconds");
}

#[tokio::test]
async fn faults_outages_tokens_and_oidc() {
    let (standin, client, dir) = start(Options::default()).await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    standin.fail_next("GET", "/api/v1/namespaces/default/configmaps", 500, 1);
    assert_eq!(api_error(api.get_opt("x").await), (500, "InternalError".into()));
    assert!(api.get_opt("x").await.unwrap().is_none(), "the fault is used up");
    // kube's client retries 503 by itself (up to 15 times): two 503s cost two more requests.
    standin.fail_next("*", "/api/v1/namespaces/default/configmaps/x", 503, 2);
    let before = standin.requests().len();
    assert!(api.get_opt("x").await.unwrap().is_none());
    assert_eq!(standin.requests().len() - before, 3);

    standin.set_unavailable(true);
    assert!(matches!(api.get_opt("x").await, Err(e) if !matches!(e, kube::Error::Api(_))));
    standin.set_unavailable(false);
    assert!(api.get_opt("x").await.is_ok());

    let mut config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(dir.path().join("kubeconfig")).unwrap(),
        &KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    config.auth_info.token = Some("not-the-token".to_string().into());
    let intruder: Api<ConfigMap> = Api::namespaced(kube::Client::try_from(config).unwrap(), "default");
    assert_eq!(api_error(intruder.get_opt("x").await), (401, "Unauthorized".into()));

    standin.set_oidc("https://issuer.example", json!({"keys": [{"kid": "k1"}]}));
    let get = |path: &str| axum::http::Request::get(path).body(Vec::new()).unwrap();
    let discovery: serde_json::Value = client.request(get("/.well-known/openid-configuration")).await.unwrap();
    assert_eq!(discovery["issuer"], "https://issuer.example");
    let jwks: serde_json::Value = client.request(get("/openid/v1/jwks")).await.unwrap();
    assert_eq!(jwks["keys"][0]["kid"], "k1");
}

/// `KUBECONFIG=<written file>` is all `Client::try_default()` needs (as for the real ca-agent
/// binary): checked in a child process, since setting the environment in this one is unsafe.
#[tokio::test]
async fn kubeconfig_env_reaches_the_standin() {
    let (standin, _client, dir) = start(Options::default()).await;
    standin.put(Kind::ConfigMap, Some("default"), "marker", json!({}));
    let status = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "child_reads_marker_through_kubeconfig_env"])
        .env("KUBECONFIG", dir.path().join("kubeconfig"))
        .status()
        .await
        .unwrap();
    assert!(status.success());
    // The child's write is what the test waits for, as a test of an agent would.
    let written = standin
        .wait_for(Kind::ConfigMap, Some("default"), "reply", Duration::from_secs(5), |o| o["data"]["ok"] == "yes")
        .await;
    assert!(written.is_some());
    assert!(standin.requests().iter().any(|r| r.path_and_query == "/api/v1/namespaces/default/configmaps/marker"));
}

#[tokio::test]
#[ignore = "run by kubeconfig_env_reaches_the_standin with KUBECONFIG set"]
async fn child_reads_marker_through_kubeconfig_env() {
    let client = kube::Client::try_default().await.unwrap();
    let api = Api::<ConfigMap>::default_namespaced(client);
    api.get("marker").await.unwrap();
    api.create(&PostParams::default(), &cm("reply", &[("ok", "yes")])).await.unwrap();
}
