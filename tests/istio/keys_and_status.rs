//! Service-account keys from OIDC discovery, HSM failures, and the fleet view.

use super::*;

/// A cluster whose keys come from OIDC discovery (served here on loopback): the discovery
/// document is fetched, its issuer checked, and a key the cluster adds later is picked up when
/// a token names its `kid`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_from_oidc_discovery_follow_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    // The "API server": discovery document and JWKS, the JWKS swappable at run time.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let issuer = "https://oidc.disc.example".to_string();
    let jwks = Arc::new(std::sync::Mutex::new(json!({"keys": []})));
    let app = {
        let (jwks, base, issuer) = (jwks.clone(), base.clone(), issuer.clone());
        axum::Router::new()
            .route(
                "/.well-known/openid-configuration",
                axum::routing::get(move || {
                    let doc = json!({"issuer": issuer, "jwks_uri": format!("{base}/openid/v1/jwks")});
                    async move { axum::Json(doc) }
                }),
            )
            .route(
                "/openid/v1/jwks",
                axum::routing::get(move || {
                    let j = jwks.lock().unwrap().clone();
                    async move { axum::Json(j) }
                }),
            )
    };
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let first = tmp.path().join("first.key");
    let second = tmp.path().join("second.key");
    for k in [&first, &second] {
        hsm::generate_key(&hsm::KeyRef::file(k), hsm::KeyAlgorithm::EcdsaP256).unwrap();
    }
    *jwks.lock().unwrap() = json!({"keys": [jwk_of(&first)]});

    let srv = Server::start(&dir, &Opts::default());
    srv.wait_ready().await;
    let key = tmp.path().join("disc-cluster.key");
    hsm::generate_key(&hsm::KeyRef::file(&key), hsm::KeyAlgorithm::EcdsaP256).unwrap();
    let (s, r) = srv
        .call(
            "POST",
            "/v1/clusters",
            Some(&srv.token("admin")),
            Some(json!({"name": "disc", "environment": "dev", "trust_domain": "cluster.local", "mode": "external-ca",
                        "key": format!("file:{}", key.display()),
                        "istio": {"sa_issuer": issuer, "oidc_discovery_url": format!("{base}/.well-known/openid-configuration")}})),
        )
        .await;
    assert_eq!(s, 202, "{r}");
    let id = r["request_id"].as_str().unwrap();
    let (s, _) = srv.call("POST", &format!("/v1/requests/{id}/approve"), Some(&srv.token("approver")), None).await;
    assert_eq!(s, 200);
    let ch = channel(&srv).await;
    let token = |key: &Path| {
        sa_token_with(&srv, key, "web", "frontend", |c| {
            c["iss"] = json!(issuer);
        })
    };
    let call = |t: String| {
        let ch = ch.clone();
        async move { create(&ch, Call { cluster: Some("disc"), ..Call::new(&t, plain_csr()) }).await }
    };
    let chain = call(token(&first)).await.expect("token from the discovered key");
    assert_eq!(parse_leaf(&chain[0]).sans, vec!["URI:spiffe://cluster.local/ns/web/sa/frontend"]);
    // The dev cluster's key means nothing to this cluster, nor does its issuer.
    let dev_token = sa_token(&srv, "web", "frontend", |_| {});
    expect_code(call(dev_token).await, Code::Unauthenticated, "another cluster's token");
    // The cluster rotates: a second key appears. The server has not seen it, fetches again
    // (at most every 10 s after the last fetch) and accepts the token.
    *jwks.lock().unwrap() = json!({"keys": [jwk_of(&first), jwk_of(&second)]});
    tokio::time::sleep(Duration::from_secs(11)).await;
    call(token(&second)).await.expect("token from the rotated-in key");
}

/// The dev cluster's server-held key behind a PKCS#11 module that fails on demand
/// (tests/fault-hsm): while it fails, requests get UNAVAILABLE at once; when it is back, the
/// cluster issues again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_hsm_failure_is_unavailable_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let shim = build_fault_shim(tmp.path());
    let dir = tmp.path().join("dev");
    let mut first = Server::start(&dir, &Opts::default());
    first.wait_ready().await;
    let db = first.database_url();
    first.kill();
    let real = hsm::softhsm::find_module().expect("SoftHSM2 is installed (scripts/test installs it)");
    // Put the dev cluster's key (in the DB) behind the shim.
    let pool = sqlx::SqlitePool::connect(&db).await.unwrap();
    let r = sqlx::query("UPDATE clusters SET key_ref = replace(key_ref, ?1, ?2) WHERE name = 'dev'")
        .bind(real.to_str().unwrap())
        .bind(shim.to_str().unwrap())
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(r.rows_affected(), 1);
    pool.close().await;
    let fault = tmp.path().join("fault");
    let srv = start_behind_fault_shim(tmp.path(), &dir, &real);
    srv.wait_ready().await;
    let ch = channel(&srv).await;
    let t = sa_token(&srv, "default", "default", |_| {});
    create(&ch, Call::new(&t, plain_csr())).await.expect("issues through the shim");

    std::fs::write(&fault, "fail").unwrap();
    for _ in 0..3 {
        let start = std::time::Instant::now();
        expect_code(create(&ch, Call::new(&t, plain_csr())).await, Code::Unavailable, "HSM failing");
        assert!(start.elapsed() < Duration::from_secs(3), "refused within the HSM timeout");
    }
    // A malformed CSR is still the caller's error, not the HSM's.
    expect_code(create(&ch, Call::new(&t, "junk".into())).await, Code::InvalidArgument, "bad CSR during the outage");

    std::fs::remove_file(&fault).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        match create(&ch, Call::new(&t, plain_csr())).await {
            Ok(chain) => {
                assert_eq!(chain.len(), 4);
                break;
            }
            Err(s) => {
                assert_eq!(s.code(), Code::Unavailable, "{}", s.message());
                assert!(std::time::Instant::now() < deadline, "the cluster never issued again: {}", s.message());
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// `ca-cli status` lists every issuer and cluster intermediate with its renewal state; the
/// example alert rules in deploy/prometheus name only metrics the server exports.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fleet_status_and_alert_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(&tmp.path().join("dev"), &Opts::default());
    srv.wait_ready().await;
    let ch = channel(&srv).await;
    create(&ch, Call::new(&srv.env["CA_EXAMPLE_TOKEN"], plain_csr())).await.unwrap();
    srv.register_approved("plug-1").await;
    let (s, _) = srv
        .call(
            "POST",
            "/v1/clusters",
            Some(&srv.token("admin")),
            Some(json!({"name": "plug-2", "environment": "dev", "trust_domain": "cluster.local"})),
        )
        .await;
    assert_eq!(s, 202);
    let status = |token: Option<String>, json_out: bool| {
        let mut cmd = Command::new(ca_cli_bin());
        if json_out {
            cmd.args(["--output", "json"]);
        }
        cmd.args(["status", "--server", &srv.url, "--ca-root"]).arg(srv.root()).env_remove("CA_TOKEN");
        if let Some(t) = token {
            cmd.env("CA_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    let o = status(Some(srv.token("auditor")), true);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let item = |name: &str| -> Value {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name && (name != "dev" || i["kind"] == "cluster"))
            .cloned()
            .unwrap_or_else(|| panic!("{name} missing: {v}"))
    };
    let env = v["items"].as_array().unwrap().iter().find(|i| i["kind"] == "environment").unwrap().clone();
    assert_eq!((env["name"].as_str(), env["state"].as_str()), (Some("dev"), Some("ok")), "{env}");
    let dev = item("dev");
    assert_eq!((dev["mode"].as_str(), dev["state"].as_str()), (Some("external-ca"), Some("ok")), "{dev}");
    assert!(dev["seconds_left"].as_i64().unwrap() > 29 * 86_400, "{dev}");
    assert_eq!(item("plug-1")["state"], "no-intermediate", "approved, not enrolled yet");
    assert_eq!(item("plug-2")["state"], "pending");
    let o = status(Some(srv.token("auditor")), false);
    let text = stdout(&o);
    assert!(text.starts_with("KIND") && text.contains("external-ca") && text.contains("plug-2"), "{text}");
    // No token: a clear refusal, and the token never comes from argv.
    let o = status(None, false);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("CA_TOKEN"), "{}", stderr(&o));

    // Every metric the alert rules use is one the server exports.
    let rules = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/alerts.yaml"))
        .unwrap();
    let names: Vec<String> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter_map(|w| w.strip_prefix("ca_"))
        // Exported only while a rotation runs: tests/rotation.rs checks them then.
        .filter(|b| !b.starts_with("rotation_"))
        .map(|b| format!("# TYPE ca_{}", b.trim_end_matches("_bucket").trim_end_matches("_total")))
        .collect();
    // Gauges appear once the background jobs (every second here) have set them.
    let mut missing = names.clone();
    for _ in 0..100 {
        let exported = srv.metrics_text().await;
        missing = names.iter().filter(|n| !exported.contains(n.as_str())).cloned().collect();
        if missing.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(missing.is_empty(), "alerts.yaml uses metrics ca-server does not export: {missing:?}");
    let checked = names.len();
    assert!(checked >= 8, "{checked}");
}
