//! Expiry, crashes, HSM outages, lost responses and bad configuration.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_intermediate_cannot_renew() {
    let tmp = tempfile::tempdir().unwrap();
    // notBefore is backdated a minute, so 65 seconds leaves about five.
    let srv = Server::start(
        &tmp.path().join("dev"),
        &Opts {
            env: vec![
                ("CA_SERVER_POLICY__CLUSTER_VALIDITY".into(), "65s".into()),
                ("CA_SERVER_POLICY__ENROLMENT_TOKEN_TTL".into(), "3s".into()),
            ],
            ..Default::default()
        },
    );
    srv.wait_ready().await;
    let late_token = srv.register_approved("late").await;
    let token = srv.register_approved("short").await;
    let state = tmp.path().join("st");
    assert!(srv.renew("short", &state, Some(&token), false).status.success());
    tokio::time::sleep(Duration::from_secs(7)).await;
    // An enrolment token expires.
    let out = srv.renew("late", &tmp.path().join("late"), Some(&late_token), false);
    assert!(stderr(&out).contains("enrolment-token-invalid"), "{}", stderr(&out));
    // ca-cli itself refuses to use an expired intermediate ...
    let out = srv.renew("short", &state, None, true);
    assert!(stderr(&out).contains("expired"), "{}", stderr(&out));
    // ... and the server refuses it too.
    let c = client(&srv.root(), Some((&state.join("ca-cert.pem"), &state.join("ca-key.pem"))));
    let r = c
        .post(format!("{}/v1/clusters/short/intermediate", srv.url))
        .json(&json!({"csr": csr_pem()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "client-certificate-expired", "{body}");
    // Another cluster's intermediate is not accepted either.
    let token2 = srv.register_approved("other").await;
    let st2 = tmp.path().join("st2");
    assert!(srv.renew("other", &st2, Some(&token2), false).status.success());
    let c = client(&srv.root(), Some((&st2.join("ca-cert.pem"), &st2.join("ca-key.pem"))));
    let r = c
        .post(format!("{}/v1/clusters/short/intermediate", srv.url))
        .json(&json!({"csr": csr_pem()}))
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "client-certificate-rejected", "{body}");
}

/// SIGKILL in the middle of a stream of issuances: every certificate a client received is in
/// the inventory after restart, the audit trail verifies, and every cluster can still renew.
async fn crash(backend: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let opts = Opts { database_url: backend_url(backend).await, ..Default::default() };
    let mut srv = Server::start(&dir, &opts);
    srv.wait_ready().await;
    // Four clusters, each renewing back to back with its newest intermediate.
    let mut tasks = Vec::new();
    for i in 0..4 {
        let name = format!("busy-{i}");
        let token = srv.register_approved(&name).await;
        let state = tmp.path().join(format!("st{i}"));
        assert!(srv.renew(&name, &state, Some(&token), false).status.success());
        let mut renewer = Renewer::from_state_dir(&srv.root(), &name, &state);
        let url = srv.url.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while std::time::Instant::now() < deadline {
                match renewer.renew(&url).await {
                    Ok(serial) => got.push(serial),
                    Err(_) => break, // the server died
                }
            }
            (got, renewer)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    srv.kill();
    let mut received = Vec::new();
    let mut renewers = Vec::new();
    for t in tasks {
        let (got, renewer) = t.await.unwrap();
        received.extend(got);
        renewers.push(renewer);
    }
    assert!(received.len() >= 5, "the stream was running: {}", received.len());
    let srv = Server::start(&dir, &opts);
    srv.wait_ready().await;
    for serial in &received {
        let (s, v) = srv.call("GET", &format!("/v1/certificates/{serial}"), Some(&srv.token("auditor")), None).await;
        assert_eq!(s, 200, "certificate {serial} was handed out but is not in the inventory: {v}");
    }
    let v = srv.audit_verify(&srv.database_url());
    assert!(v.status.success(), "{}{}", stdout(&v), stderr(&v));
    let issued = issued_records(&audit_actions(&srv).await);
    assert_eq!(issued, inventory_count(&srv).await, "one audit record per certificate");
    // Every cluster can go on renewing with the last certificate it holds, even where the
    // server committed a newer one whose response the crash swallowed.
    for mut r in renewers {
        r.renew(&srv.url).await.unwrap();
        r.renew(&srv.url).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_crash_in_the_middle_of_issuance_loses_nothing() {
    crash("sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_crash_in_the_middle_of_issuance_loses_nothing() {
    crash("postgres").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_is_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("c.toml");
    std::fs::write(&cfg, "listen = \"127.0.0.1:0\"\ncolour = \"red\"\n").unwrap();
    let o = Command::new(ca_server_bin()).arg("--config").arg(&cfg).output().unwrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("colour"), "{err}");
    let o = Command::new(ca_server_bin()).output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--config"), "{}", stderr(&o));
}

/// An HSM outage: /readyz goes false and requests fail fast while the module fails or hangs;
/// the server recovers by itself when it returns. The issuer key sits behind a PKCS#11 module
/// (tests/fault-hsm) that forwards to SoftHSM2 and fails or hangs on demand.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_follows_the_hsm_and_no_request_hangs() {
    let tmp = tempfile::tempdir().unwrap();
    let shim = build_fault_shim(tmp.path());

    // A normal dev setup first, then the same config with the issuer behind the shim.
    let dir = tmp.path().join("dev");
    let mut first = Server::start(&dir, &Opts::default());
    first.wait_ready().await;
    first.kill();
    let config = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    let real = hsm::softhsm::find_module().unwrap();
    assert!(config.contains(real.to_str().unwrap()), "the dev issuer key is in SoftHSM2");
    std::fs::write(dir.join("config.toml"), config.replace(real.to_str().unwrap(), shim.to_str().unwrap())).unwrap();
    let fault = tmp.path().join("fault");
    let srv = start_behind_fault_shim(tmp.path(), &dir, &real);
    srv.wait_ready().await;
    let token = srv.register_approved("outage").await;
    let enrol = |srv: &Server| {
        let c = srv.client.clone();
        let (url, token) = (format!("{}/v1/clusters/outage/intermediate", srv.url), token.clone());
        async move {
            let start = std::time::Instant::now();
            let r = c.post(url).bearer_auth(token).json(&json!({"csr": csr_pem()})).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap(), start.elapsed())
        }
    };
    let ready = |srv: &Server| {
        let c = srv.client.clone();
        let url = format!("{}/readyz", srv.url);
        async move { c.get(url).send().await.unwrap().status().as_u16() }
    };
    let wait_for = |want: u16| {
        let c = srv.client.clone();
        let url = format!("{}/readyz", srv.url);
        async move {
            for _ in 0..150 {
                if c.get(&url).send().await.unwrap().status().as_u16() == want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("/readyz never answered {want}");
        }
    };

    // A hanging HSM: the request gives up after the HSM timeout instead of hanging.
    std::fs::write(&fault, "hang").unwrap();
    let (status, body, took) = enrol(&srv).await;
    assert_eq!((status, body["code"].as_str()), (503, Some("hsm-timeout")), "{body}");
    assert!(took < Duration::from_secs(6), "took {took:?}");
    wait_for(503).await;
    let (s, h) = srv.call("GET", "/healthz", None, None).await;
    assert_eq!(s, 200, "the process stays alive: {h}");

    // It comes back: ready again without a restart, and issuance works.
    std::fs::remove_file(&fault).unwrap();
    wait_for(200).await;

    // A failing HSM: not ready, requests refused at once with 503.
    std::fs::write(&fault, "fail").unwrap();
    wait_for(503).await;
    let (status, body, took) = enrol(&srv).await;
    assert_eq!((status, body["code"].as_str()), (503, Some("hsm-unavailable")), "{body}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    std::fs::remove_file(&fault).unwrap();
    wait_for(200).await;
    let (status, body, _) = enrol(&srv).await;
    assert_eq!(status, 200, "recovered: {body}");
    assert_eq!(ready(&srv).await, 200);

    // A revocation approved while the HSM is away stands; the CRL follows when it returns.
    let serial = body["serial"].as_str().unwrap().to_string();
    std::fs::write(&fault, "fail").unwrap();
    wait_for(503).await;
    let (s, rq) = srv
        .call(
            "POST",
            &format!("/v1/certificates/{serial}/revoke"),
            Some(&srv.token("admin")),
            Some(json!({"reason": "superseded"})),
        )
        .await;
    assert_eq!(s, 202, "{rq}");
    let (s, v) = srv
        .call(
            "POST",
            &format!("/v1/requests/{}/approve", rq["id"].as_str().unwrap()),
            Some(&srv.token("approver")),
            None,
        )
        .await;
    assert_eq!(s, 200, "the revocation does not wait for the HSM: {v}");
    let (_, cert) = srv.call("GET", &format!("/v1/certificates/{serial}"), Some(&srv.token("auditor")), None).await;
    assert_eq!(cert["status"], "revoked");
    let crl_lists = |srv: &Server| {
        let c = srv.client.clone();
        let (url, serial) = (format!("{}/v1/crl/dev?format=pem", srv.url), serial.clone());
        async move {
            let pem_text = c.get(url).send().await.unwrap().text().await.unwrap();
            let der = pem::parse(pem_text).unwrap().into_contents();
            let (_, crl) = x509_parser::parse_x509_crl(&der).unwrap();
            crl.iter_revoked_certificates().any(|r| ca_core::cert::serial_hex(r.raw_serial()) == serial)
        }
    };
    assert!(!crl_lists(&srv).await, "no CRL can be signed while the HSM is away");
    std::fs::remove_file(&fault).unwrap();
    wait_for(200).await;
    let mut listed = false;
    for _ in 0..100 {
        if crl_lists(&srv).await {
            listed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(listed, "the background job republished the CRL with the revoked serial");
}

/// A renewal whose response never reaches the cluster does not strand it: the intermediate it
/// still holds renews until the newer one has been used.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_response_does_not_strand_the_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(&tmp.path().join("dev"), &Opts::default());
    srv.wait_ready().await;
    let token = srv.register_approved("lossy").await;
    let state = tmp.path().join("st");
    assert!(srv.renew("lossy", &state, Some(&token), false).status.success());
    let a = Renewer::from_state_dir(&srv.root(), "lossy", &state);
    let raw = |r: &Renewer| {
        let c = client_der(&r.root, Some((&r.cert, &r.key)));
        let url = format!("{}/v1/clusters/lossy/intermediate", srv.url);
        async move {
            let resp = c.post(url).json(&json!({"csr": csr_pem()})).send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    // The server commits B, the answer is lost: the cluster still holds A, and A still works.
    let (s, _lost) = raw(&a).await;
    assert_eq!(s, 200);
    let mut holder =
        Renewer { root: a.root.clone(), cluster: a.cluster.clone(), cert: a.cert.clone(), key: a.key.clone() };
    holder.renew(&srv.url).await.unwrap(); // A -> C
    holder.renew(&srv.url).await.unwrap(); // C -> D: C was used, so A is no longer accepted
    let (s, body) = raw(&a).await;
    assert_eq!((s, body["code"].as_str()), (401, Some("client-certificate-superseded")), "{body}");
}
