//! Per-cluster Istio settings in the database: registration with settings (no restart, no
//! configuration edit), changes under the two-person rule, the agent's push of its
//! service-account keys with the previous keys accepted for the grace only, and the deprecated
//! configuration tables seeding a cluster without settings.

use super::*;

/// A stand-in API server of another cluster: its issuer and a signing key.
struct Apiserver {
    issuer: String,
    key: std::path::PathBuf,
}

impl Apiserver {
    fn new(dir: &Path, name: &str) -> Apiserver {
        let key = dir.join(format!("{name}-sa.key"));
        hsm::generate_key(&hsm::KeyRef::file(&key), hsm::KeyAlgorithm::EcdsaP256).unwrap();
        Apiserver { issuer: format!("https://{name}.k8s.example"), key }
    }

    fn jwks(&self) -> Value {
        json!({"keys": [jwk_of(&self.key)]})
    }

    fn token(&self, srv: &Server, key: &Path, ns: &str, sa: &str) -> String {
        let issuer = self.issuer.clone();
        sa_token_with(srv, key, ns, sa, move |c| c["iss"] = json!(issuer))
    }
}

/// Registers an external-CA cluster with `istio` settings as admin; the raw answer.
async fn register(srv: &Server, tmp: &Path, name: &str, istio: Option<Value>, mode: &str) -> (u16, Value) {
    let key = tmp.join(format!("{name}-cluster.key"));
    if !key.exists() {
        hsm::generate_key(&hsm::KeyRef::file(&key), hsm::KeyAlgorithm::EcdsaP256).unwrap();
    }
    let mut body = json!({"name": name, "environment": "dev", "trust_domain": "cluster.local", "mode": mode});
    if mode == "external-ca" {
        body["key"] = json!(format!("file:{}", key.display()));
    }
    if let Some(i) = istio {
        body["istio"] = i;
    }
    srv.call("POST", "/v1/clusters", Some(&srv.token("admin")), Some(body)).await
}

fn lifetime_hours(chain: &[String]) -> i64 {
    let leaf = parse_leaf(&chain[0]);
    (leaf.not_after - leaf.not_before + 1800) / 3600
}

/// An external-CA cluster registered with its settings through the API issues as soon as a
/// second operator approves it, with no restart; bad settings are refused with a clear code;
/// a rejected registration leaves no settings; a settings change needs a second operator and
/// applies at once on approval.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registered_settings_serve_without_a_restart_and_change_under_two_persons() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(&tmp.path().join("dev"), &Opts::default());
    srv.wait_ready().await;
    let east = Apiserver::new(tmp.path(), "east");
    let istio = json!({"sa_issuer": east.issuer, "jwks": east.jwks(), "default_ttl": "1h", "max_ttl": "2d",
                       "trusted_node_accounts": ["istio-system/ztunnel"]});

    for (what, settings, mode, code) in [
        ("external-ca without settings", None, "external-ca", "invalid-settings"),
        ("plug-in with settings", Some(istio.clone()), "plugin", "invalid-settings"),
        ("no sa_issuer", Some(json!({"jwks": east.jwks()})), "external-ca", "invalid-settings"),
        ("a bad node account", Some(json!({"sa_issuer": "https://x", "trusted_node_accounts": ["ztunnel"]})), "external-ca", "invalid-settings"),
        ("default over max", Some(json!({"sa_issuer": "https://x", "default_ttl": "3d", "max_ttl": "2d"})), "external-ca", "invalid-settings"),
        ("a bad discovery URL", Some(json!({"sa_issuer": "https://x", "oidc_discovery_url": "file:///etc/passwd"})), "external-ca", "invalid-settings"),
        ("an empty JWKS", Some(json!({"sa_issuer": "https://x", "jwks": {"keys": []}})), "external-ca", "invalid-jwks"),
    ] {
        let (s, r) = register(&srv, tmp.path(), "refused", settings, mode).await;
        assert_eq!((s, r["code"].as_str()), (400, Some(code)), "{what}: {r}");
    }

    let (s, r) = register(&srv, tmp.path(), "east", Some(istio.clone()), "external-ca").await;
    assert_eq!(s, 202, "{r}");
    let id = r["request_id"].as_str().unwrap().to_string();
    let (s, _) = srv.call("GET", "/v1/clusters/east/settings", Some(&srv.token("auditor")), None).await;
    assert_eq!(s, 404, "nothing is stored before the approval");
    let ch = channel(&srv).await;
    let t = east.token(&srv, &east.key, "web", "frontend");
    let east_call = |t: String, ttl: i64| {
        let ch = ch.clone();
        async move { create(&ch, Call { cluster: Some("east"), validity: ttl, ..Call::new(&t, plain_csr()) }).await }
    };
    expect_code(east_call(t.clone(), 0).await, Code::PermissionDenied, "before approval");
    let (s, a) = srv.call("POST", &format!("/v1/requests/{id}/approve"), Some(&srv.token("approver")), None).await;
    assert_eq!(s, 200, "{a}");
    let chain = east_call(t.clone(), 0).await.expect("served right after the approval, no restart");
    assert_eq!(parse_leaf(&chain[0]).sans, vec!["URI:spiffe://cluster.local/ns/web/sa/frontend"]);
    assert_eq!(lifetime_hours(&chain), 1, "the registered default_ttl");
    // Another cluster's keys mean nothing here.
    expect_code(east_call(sa_token(&srv, "web", "frontend", |_| {}), 0).await, Code::Unauthenticated, "dev's token");

    let (s, v) = srv.call("GET", "/v1/clusters/east/settings", Some(&srv.token("auditor")), None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!((v["sa_issuer"].as_str(), v["jwks_source"].as_str()), (Some(east.issuer.as_str()), Some("registration")));
    assert_eq!((v["default_ttl"].as_str(), v["over_max"].as_str()), (Some("1h"), Some("reject")));
    assert_eq!(v["jwks"], east.jwks());
    assert_eq!(v["audiences"], json!(["istio-ca"]));
    expect_code(east_call(t.clone(), 3 * 86400).await, Code::InvalidArgument, "over max_ttl, rejected");

    // A change: asked by one operator, refused to the same one, applied when another approves.
    let mut changed = istio.clone();
    changed["default_ttl"] = json!("2h");
    changed["over_max"] = json!("clamp");
    let (s, r) = srv.call("PUT", "/v1/clusters/east/settings", Some(&srv.token("admin")), Some(changed)).await;
    assert_eq!(s, 202, "{r}");
    let id = r["request_id"].as_str().unwrap().to_string();
    let (s, r) = srv.call("PUT", "/v1/clusters/east/settings", Some(&srv.token("auditor")), Some(istio.clone())).await;
    assert_eq!((s, r["code"].as_str()), (403, Some("forbidden")), "{r}");
    let (s, r) = srv
        .call("PUT", "/v1/clusters/east/settings", Some(&srv.token("admin")), Some(json!({"sa_issuer": "x", "leeway": "2h"})))
        .await;
    assert_eq!((s, r["code"].as_str()), (400, Some("invalid-settings")), "{r}");
    let (s, r) = srv
        .call("PUT", "/v1/clusters/dev/settings", Some(&srv.token("admin")), Some(json!({"sa_issuer": "x", "jwks": {"keys": [{"kty": "oct", "kid": "k", "k": "c2VjcmV0"}]}})))
        .await;
    assert_eq!((s, r["code"].as_str()), (400, Some("invalid-jwks")), "{r}");
    let (s, r) = srv.call("POST", &format!("/v1/requests/{id}/approve"), Some(&srv.token("admin")), None).await;
    assert_eq!((s, r["code"].as_str()), (403, Some("two-person-rule")), "{r}");
    assert_eq!(lifetime_hours(&east_call(t.clone(), 0).await.unwrap()), 1, "unchanged until approved");
    let (s, a) = srv.call("POST", &format!("/v1/requests/{id}/approve"), Some(&srv.token("approver")), None).await;
    assert_eq!(s, 200, "{a}");
    assert_eq!(lifetime_hours(&east_call(t.clone(), 0).await.unwrap()), 2, "the approved default_ttl, at once");
    assert_eq!(lifetime_hours(&east_call(t.clone(), 3 * 86400).await.unwrap()), 48, "clamped to max_ttl");
    let (_, v) = srv.call("GET", "/v1/clusters/east/settings", Some(&srv.token("auditor")), None).await;
    assert_eq!((v["version"].as_i64(), v["jwks"].clone()), (Some(2), east.jwks()), "{v}");

    // A plug-in cluster has no settings to change; a rejected registration stores none.
    srv.register_approved("plug").await;
    let (s, r) = srv.call("PUT", "/v1/clusters/plug/settings", Some(&srv.token("admin")), Some(istio.clone())).await;
    assert_eq!((s, r["code"].as_str()), (400, Some("invalid-settings")), "{r}");
    let (s, r) = register(&srv, tmp.path(), "west", Some(istio.clone()), "external-ca").await;
    assert_eq!(s, 202, "{r}");
    let id = r["request_id"].as_str().unwrap();
    let (s, _) = srv.call("POST", &format!("/v1/requests/{id}/reject"), Some(&srv.token("approver")), None).await;
    assert_eq!(s, 200);
    let (s, _) = srv.call("GET", "/v1/clusters/west/settings", Some(&srv.token("auditor")), None).await;
    assert_eq!(s, 404, "a rejected registration leaves no settings");

    let records = audit_all(&srv).await;
    let changes: Vec<&Value> = records.iter().filter(|r| r["action"] == "cluster.settings.changed").collect();
    assert!(changes.iter().any(|r| r["subject"] == "east" && r["details"]["settings"]["default_ttl"] == "2h"), "{changes:?}");
    // Audit records name the keys, never carry them.
    let registered = records.iter().find(|r| r["action"] == "cluster.registered" && r["subject"] == "east").unwrap();
    assert_eq!(registered["details"]["istio"]["jwks"], json!({"kids": [kid_of(&east.key)]}), "{registered}");
    let o = srv.audit_verify(&srv.database_url());
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
}
