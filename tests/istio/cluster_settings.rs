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
        (
            "a bad node account",
            Some(json!({"sa_issuer": "https://x", "trusted_node_accounts": ["ztunnel"]})),
            "external-ca",
            "invalid-settings",
        ),
        (
            "default over max",
            Some(json!({"sa_issuer": "https://x", "default_ttl": "3d", "max_ttl": "2d"})),
            "external-ca",
            "invalid-settings",
        ),
        (
            "a bad discovery URL",
            Some(json!({"sa_issuer": "https://x", "oidc_discovery_url": "file:///etc/passwd"})),
            "external-ca",
            "invalid-settings",
        ),
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
    let (s, r) = srv.call("PUT", "/v1/clusters/east/settings", Some(&srv.token("admin")), Some(istio.clone())).await;
    assert_eq!((s, r["code"].as_str()), (409, Some("cluster-not-active")), "the registration carries them: {r}");
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
    assert_eq!(
        (v["sa_issuer"].as_str(), v["jwks_source"].as_str()),
        (Some(east.issuer.as_str()), Some("registration"))
    );
    assert_eq!((v["default_ttl"].as_str(), v["over_max"].as_str()), (Some("1h"), Some("reject")));
    assert_eq!(v["jwks"], east.jwks());
    assert_eq!(v["audiences"], json!(["istio-ca"]));
    expect_code(east_call(t.clone(), 3 * 86400).await, Code::InvalidArgument, "over max_ttl, rejected");

    // A change: asked by one operator, refused to the same one, applied when another approves.
    let mut changed = istio.clone();
    changed["default_ttl"] = json!("2h");
    changed["over_max"] = json!("clamp");
    changed["server_certificate_names"] = json!(["istiod-east.istio-system.svc"]);
    let (s, r) = srv.call("PUT", "/v1/clusters/east/settings", Some(&srv.token("admin")), Some(changed)).await;
    assert_eq!(s, 202, "{r}");
    let id = r["request_id"].as_str().unwrap().to_string();
    let (s, r) = srv.call("PUT", "/v1/clusters/east/settings", Some(&srv.token("auditor")), Some(istio.clone())).await;
    assert_eq!((s, r["code"].as_str()), (403, Some("forbidden")), "{r}");
    let (s, r) = srv
        .call(
            "PUT",
            "/v1/clusters/east/settings",
            Some(&srv.token("admin")),
            Some(json!({"sa_issuer": "x", "leeway": "2h"})),
        )
        .await;
    assert_eq!((s, r["code"].as_str()), (400, Some("invalid-settings")), "{r}");
    let (s, r) = srv
        .call(
            "PUT",
            "/v1/clusters/dev/settings",
            Some(&srv.token("admin")),
            Some(json!({"sa_issuer": "x", "jwks": {"keys": [{"kty": "oct", "kid": "k", "k": "c2VjcmV0"}]}})),
        )
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
    // istiod's serving certificate: only the names the settings allow now.
    let admin = srv.token("admin");
    let server_cert = |name: &str| {
        let body = json!({"csr": plain_csr(), "dns_names": [name], "validity": "1d"});
        let (srv, admin) = (&srv, admin.clone());
        async move { srv.call("POST", "/v1/clusters/east/server-certificates", Some(&admin), Some(body)).await }
    };
    let (s, r) = server_cert("istiod.istio-system.svc").await;
    assert_eq!((s, r["code"].as_str()), (403, Some("name-not-allowed")), "{r}");
    let (s, r) = server_cert("istiod-east.istio-system.svc").await;
    assert_eq!(s, 200, "{r}");

    // A plug-in cluster has no settings to change; a rejected registration stores none.
    srv.register_approved("plug").await;
    let (s, r) = srv.call("PUT", "/v1/clusters/plug/settings", Some(&srv.token("admin")), Some(istio.clone())).await;
    assert_eq!((s, r["code"].as_str()), (409, Some("plugin-cluster")), "{r}");
    let (s, r) = register(&srv, tmp.path(), "west", Some(istio.clone()), "external-ca").await;
    assert_eq!(s, 202, "{r}");
    let id = r["request_id"].as_str().unwrap();
    let (s, _) = srv.call("POST", &format!("/v1/requests/{id}/reject"), Some(&srv.token("approver")), None).await;
    assert_eq!(s, 200);
    let (s, _) = srv.call("GET", "/v1/clusters/west/settings", Some(&srv.token("auditor")), None).await;
    assert_eq!(s, 404, "a rejected registration leaves no settings");

    let records = audit_all(&srv).await;
    let changes: Vec<&Value> = records.iter().filter(|r| r["action"] == "cluster.settings.changed").collect();
    assert!(
        changes.iter().any(|r| r["subject"] == "east" && r["details"]["settings"]["default_ttl"] == "2h"),
        "{changes:?}"
    );
    // Audit records name the keys, never carry them.
    let registered = records.iter().find(|r| r["action"] == "cluster.registered" && r["subject"] == "east").unwrap();
    assert_eq!(registered["details"]["istio"]["jwks"], json!({"kids": [kid_of(&east.key)]}), "{registered}");
    let o = srv.audit_verify(&srv.database_url());
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
}

/// A PUT of the service-account keys with `client` (a client certificate or none).
async fn push(client: &reqwest::Client, srv: &Server, cluster: &str, body: Value) -> (u16, Value) {
    let r =
        client.put(format!("{}/v1/clusters/{cluster}/service-account-keys", srv.url)).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The agent's key push: only over mTLS with an agent certificate of that cluster; an issuer
/// other than the registered one and keys that are not a usable JWKS are refused and audited;
/// a change is stored and audited by key id, an identical push writes nothing; the replaced
/// keys verify tokens for `istio.jwks_grace` and not after, cached or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_key_push_is_checked_audited_and_old_keys_last_the_grace_only() {
    let tmp = tempfile::tempdir().unwrap();
    let grace = 6;
    let opts = Opts { env: vec![("CA_SERVER_ISTIO__JWKS_GRACE".into(), format!("{grace}s"))], ..Opts::default() };
    let srv = Server::start(&tmp.path().join("dev"), &opts);
    srv.wait_ready().await;
    let east = Apiserver::new(tmp.path(), "east");
    let (s, r_east) =
        register(&srv, tmp.path(), "east", Some(json!({"sa_issuer": east.issuer, "jwks": east.jwks()})), "external-ca")
            .await;
    assert_eq!(s, 202, "{r_east}");
    let id = r_east["request_id"].as_str().unwrap();
    let (s, _) = srv.call("POST", &format!("/v1/requests/{id}/approve"), Some(&srv.token("approver")), None).await;
    assert_eq!(s, 200);

    // A client certificate that chains to tls.client_ca: a plug-in cluster's intermediate.
    let token = srv.register_approved("carrier").await;
    let state = tmp.path().join("carrier");
    let o = srv.renew("carrier", &state, Some(&token), false);
    assert!(o.status.success(), "{}", stderr(&o));
    let intermediate = client(&srv.root(), Some((&state.join("ca-cert.pem"), &state.join("ca-key.pem"))));
    let body = |issuer: &str, jwks: Value| json!({"issuer": issuer, "jwks": jwks});
    let (s, r) = push(&client(&srv.root(), None), &srv, "east", body(&east.issuer, east.jwks())).await;
    assert_eq!((s, r["code"].as_str()), (401, Some("unauthenticated")), "no client certificate: {r}");
    let (s, r) = push(&intermediate, &srv, "east", body(&east.issuer, east.jwks())).await;
    assert_eq!((s, r["code"].as_str()), (401, Some("client-certificate-rejected")), "a cluster intermediate: {r}");

    // east's agent enrols with the token its registration armed.
    let agent_token = r_east["enrolment_token"].as_str().expect("an agent token for east").to_string();
    let (csr, agent_key) = csr_with_key();
    let (s, issued) =
        srv.call("POST", "/v1/clusters/east/agent-certificate", Some(&agent_token), Some(json!({"csr": csr}))).await;
    assert_eq!(s, 200, "{issued}");
    let der = pem::parse(issued["certificate"].as_str().unwrap()).unwrap().into_contents();
    let with_cert = client_der(&srv.root(), Some((&der, &agent_key.serialize_der())));
    let (s, r) = push(&with_cert, &srv, "carrier", body(&east.issuer, east.jwks())).await;
    assert!(s == 401 || s == 409, "another cluster's agent certificate is refused: {s} {r}");

    let (s, r) = push(&with_cert, &srv, "east", body("https://west.k8s.example", east.jwks())).await;
    assert_eq!((s, r["code"].as_str()), (409, Some("issuer-mismatch")), "{r}");
    let private = json!({"keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0"}]});
    let (s, r) = push(&with_cert, &srv, "east", body(&east.issuer, private)).await;
    assert_eq!((s, r["code"].as_str()), (400, Some("invalid-jwks")), "{r}");
    let (s, r) = push(&with_cert, &srv, "east", body(&east.issuer, json!({"keys": "none"}))).await;
    assert_eq!((s, r["code"].as_str()), (400, Some("invalid-jwks")), "{r}");
    let (s, r) = push(&with_cert, &srv, "east", body(&east.issuer, east.jwks())).await;
    assert_eq!((s, r["changed"].as_bool()), (200, Some(false)), "the stored keys: {r}");

    let ch = channel(&srv).await;
    let east_call = |t: String| {
        let ch = ch.clone();
        async move { create(&ch, Call { cluster: Some("east"), ..Call::new(&t, plain_csr()) }).await }
    };
    let cached = east.token(&srv, &east.key, "web", "frontend");
    east_call(cached.clone()).await.expect("the registered key");
    // The cluster rotates its signing key; the agent pushes the new set.
    let rotated = tmp.path().join("east-rotated.key");
    hsm::generate_key(&hsm::KeyRef::file(&rotated), hsm::KeyAlgorithm::EcdsaP256).unwrap();
    let new_jwks = json!({"keys": [jwk_of(&rotated)]});
    let (s, r) = push(&with_cert, &srv, "east", body(&east.issuer, new_jwks.clone())).await;
    assert_eq!((s, r["changed"].as_bool()), (200, Some(true)), "{r}");
    let pushed_at = std::time::Instant::now();
    let (s, r) = push(&with_cert, &srv, "east", body(&east.issuer, new_jwks.clone())).await;
    assert_eq!((s, r["changed"].as_bool()), (200, Some(false)), "the same push again: {r}");
    let (_, v) = srv.call("GET", "/v1/clusters/east/settings", Some(&srv.token("auditor")), None).await;
    assert_eq!((v["jwks_source"].as_str(), v["jwks"].clone()), (Some("agent"), new_jwks.clone()), "{v}");
    assert!(v["previous_jwks_until"].as_i64().is_some(), "{v}");

    east_call(east.token(&srv, &rotated, "web", "frontend")).await.expect("the pushed key");
    east_call(east.token(&srv, &east.key, "web", "frontend")).await.expect("the replaced key, within the grace");
    east_call(cached.clone()).await.expect("a token verified before, within the grace");
    let left = Duration::from_secs(grace + 1).saturating_sub(pushed_at.elapsed());
    tokio::time::sleep(left).await;
    expect_code(
        east_call(east.token(&srv, &east.key, "web", "frontend")).await,
        Code::Unauthenticated,
        "after the grace",
    );
    expect_code(east_call(cached).await, Code::Unauthenticated, "a cached token after the grace");
    east_call(east.token(&srv, &rotated, "web", "frontend")).await.expect("the pushed key still");

    let records = audit_all(&srv).await;
    let updates: Vec<&Value> = records.iter().filter(|r| r["action"] == "cluster.jwks.updated").collect();
    assert_eq!(updates.len(), 1, "one change, one record: {updates:?}");
    let u = updates[0];
    assert_eq!((u["subject"].as_str(), u["actor"].as_str()), (Some("east"), Some("agent:east")), "{u}");
    assert_eq!(u["details"]["kids"], json!([kid_of(&rotated)]), "{u}");
    assert_eq!(u["details"]["previous_kids"], json!([kid_of(&east.key)]), "{u}");
    let x = jwk_of(&rotated)["x"].as_str().unwrap().to_string();
    assert!(!u.to_string().contains(&x), "no key material in the audit trail: {u}");
    let refused: Vec<&str> = records
        .iter()
        .filter(|r| r["action"] == "request.denied" && r["actor"] == "agent:east")
        .filter_map(|r| r["details"]["code"].as_str())
        .collect();
    assert_eq!(refused, vec!["issuer-mismatch", "invalid-jwks", "invalid-jwks"], "refusals are audited");
    let o = srv.audit_verify(&srv.database_url());
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
}

/// A deprecated `[istio.clusters.<name>]` table seeds a registered cluster that has no
/// settings (a database from before they were stored), with a warning; once the database has
/// settings, the table is ignored (with a warning), whatever it says.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn configuration_tables_only_seed_a_cluster_without_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let mut first = Server::start(&dir, &Opts::default());
    first.wait_ready().await;
    let db = first.database_url();
    let issuer = first.env["CA_SA_ISSUER"].clone();
    first.kill();
    let pool = sqlx::SqlitePool::connect(&db).await.unwrap();
    let r = sqlx::query("DELETE FROM cluster_settings WHERE cluster = 'dev'").execute(&pool).await.unwrap();
    assert_eq!(r.rows_affected(), 1, "the dev setup stores the dev cluster's settings");
    pool.close().await;

    let table = |over_max: &str| Opts {
        env: vec![
            ("CA_SERVER_ISTIO__CLUSTERS__DEV__SA_ISSUER".into(), issuer.clone()),
            ("CA_SERVER_ISTIO__CLUSTERS__DEV__JWKS_FILE".into(), "sa-jwks.json".into()),
            ("CA_SERVER_ISTIO__CLUSTERS__DEV__OVER_MAX".into(), over_max.into()),
            ("CA_SERVER_ISTIO__CLUSTERS__DEV__TRUSTED_NODE_ACCOUNTS".into(), r#"["istio-system/ztunnel"]"#.into()),
        ],
        ..Opts::default()
    };
    let srv = Server::start(&dir, &table("clamp"));
    srv.wait_ready().await;
    let log = std::fs::read_to_string(&srv.stderr_log).unwrap();
    assert!(log.contains("deprecated: seeded the cluster's settings"), "{log}");
    let (s, v) = srv.call("GET", "/v1/clusters/dev/settings", Some(&srv.token("auditor")), None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!((v["jwks_source"].as_str(), v["over_max"].as_str()), (Some("config"), Some("clamp")), "{v}");
    let jwks: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("sa-jwks.json")).unwrap()).unwrap();
    assert_eq!(v["jwks"], jwks, "the file's keys, stored");
    let ch = channel(&srv).await;
    let chain = create(&ch, Call { validity: 30 * 86400, ..Call::new(&srv.env["CA_EXAMPLE_TOKEN"], plain_csr()) })
        .await
        .expect("issued with the seeded settings (clamped)");
    assert_eq!(lifetime_hours(&chain), 7 * 24);
    let seeded = audit_all(&srv).await.into_iter().filter(|r| r["action"] == "cluster.settings.seeded").count();
    assert_eq!(seeded, 1);
    drop(srv);

    // The database wins from now on.
    let srv = Server::start(&dir, &table("reject"));
    srv.wait_ready().await;
    let log = std::fs::read_to_string(&srv.stderr_log).unwrap();
    assert!(log.contains("deprecated and ignored: the cluster's settings are in the database"), "{log}");
    let (_, v) = srv.call("GET", "/v1/clusters/dev/settings", Some(&srv.token("auditor")), None).await;
    assert_eq!((v["over_max"].as_str(), v["version"].as_i64()), (Some("clamp"), Some(1)), "{v}");
    let seeded = audit_all(&srv).await.into_iter().filter(|r| r["action"] == "cluster.settings.seeded").count();
    assert_eq!(seeded, 1, "seeded once");
}

/// Two replicas on one PostgreSQL database: a cluster registered and approved on one, and a
/// settings change approved there, are served by the other within `jobs.interval` (1 s here),
/// with no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_replica_follows_the_stored_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let db = fresh_pg_url().await;
    let dir = tmp.path().join("dev");
    let a = Server::start(&dir, &Opts { database_url: Some(db.clone()), ..Opts::default() });
    a.wait_ready().await;
    let b = Server::start(
        &tmp.path().join("b"),
        &Opts { database_url: Some(db.clone()), config_of: Some(dir.clone()), ..Opts::default() },
    );
    b.wait_ready().await;
    let east = Apiserver::new(tmp.path(), "east");
    let (s, r) =
        register(&a, tmp.path(), "east", Some(json!({"sa_issuer": east.issuer, "jwks": east.jwks()})), "external-ca")
            .await;
    assert_eq!(s, 202, "{r}");
    let id = r["request_id"].as_str().unwrap();
    let (s, _) = a.call("POST", &format!("/v1/requests/{id}/approve"), Some(&a.token("approver")), None).await;
    assert_eq!(s, 200);
    let ch = channel(&b).await;
    // Until `b` (which saw neither request) serves `t`: the first answer that is not a refusal
    // of the cluster or the token, within a few rounds.
    let served = |t: String| {
        let ch = ch.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                match create(&ch, Call { cluster: Some("east"), ..Call::new(&t, plain_csr()) }).await {
                    Ok(chain) => return chain,
                    Err(s) if std::time::Instant::now() < deadline => {
                        assert!(
                            matches!(s.code(), Code::PermissionDenied | Code::Unauthenticated | Code::Unavailable),
                            "{s:?}"
                        );
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(s) => panic!("the other replica never served it: {s:?}"),
                }
            }
        }
    };
    served(east.token(&a, &east.key, "web", "frontend")).await;
    let rotated = tmp.path().join("east-rotated.key");
    hsm::generate_key(&hsm::KeyRef::file(&rotated), hsm::KeyAlgorithm::EcdsaP256).unwrap();
    let fresh = json!({"sa_issuer": east.issuer, "jwks": {"keys": [jwk_of(&rotated)]}, "default_ttl": "3h"});
    change_settings(&a, "east", fresh).await;
    let chain = served(east.token(&a, &rotated, "web", "frontend")).await;
    assert_eq!(lifetime_hours(&chain), 3, "the changed default_ttl on the other replica too");
}
