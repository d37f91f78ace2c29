//! Registration, enrolment, renewal, revocation and CRLs, end to end on both backends.

use super::*;

async fn lifecycle(backend: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let db = backend_url(backend).await;
    let srv = Server::start(&tmp.path().join("dev"), &Opts { database_url: db.clone(), ..Default::default() });
    srv.wait_ready().await;
    let (admin, approver) = (srv.token("admin"), srv.token("approver"));

    // Register: pending until a second operator approves.
    let (s, reg) = srv
        .call(
            "POST",
            "/v1/clusters",
            Some(&admin),
            Some(json!({"name": "prod-1", "environment": "dev", "trust_domain": "cluster.local"})),
        )
        .await;
    assert_eq!(s, 202, "{reg}");
    let token = reg["enrolment_token"].as_str().unwrap().to_string();
    let request_id = reg["request_id"].as_str().unwrap().to_string();
    let state = tmp.path().join("cacerts");
    let early = srv.renew("prod-1", &state, Some(&token), false);
    assert!(!early.status.success());
    assert!(stderr(&early).contains("cluster-not-active"), "{}", stderr(&early));
    let (s, v) = srv.call("POST", &format!("/v1/requests/{request_id}/approve"), Some(&admin), None).await;
    assert_eq!((s, v["code"].as_str()), (403, Some("two-person-rule")), "{v}");
    let (s, v) = srv.call("POST", &format!("/v1/requests/{request_id}/approve"), Some(&approver), None).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("approved")), "{v}");

    // Enrol with the token; istiod's files appear and verify.
    let out = srv.renew("prod-1", &state, Some(&token), false);
    assert!(out.status.success(), "{}", stderr(&out));
    let o = openssl(&[
        "verify",
        "-CAfile",
        s_(&state.join("root-cert.pem")),
        "-untrusted",
        s_(&state.join("cert-chain.pem")),
        s_(&state.join("ca-cert.pem")),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let first = ca_core::cert::load_cert(&state.join("ca-cert.pem")).unwrap();
    assert!(first.is_ca && first.path_len == Some(0) && first.trust_domains() == vec!["cluster.local"]);

    // The token is spent: a replay is refused and records nothing.
    let before = inventory_count(&srv).await;
    let replay = srv.renew("prod-1", &tmp.path().join("other"), Some(&token), false);
    assert!(stderr(&replay).contains("enrolment-token-invalid"), "{}", stderr(&replay));
    assert_eq!(inventory_count(&srv).await, before);

    // Renew over mTLS: not due yet, then forced.
    let out = srv.renew("prod-1", &state, None, false);
    assert!(out.status.success() && stdout(&out).contains("not renewing before"), "{}", stdout(&out));
    let out = srv.renew("prod-1", &state, None, true);
    assert!(out.status.success(), "{}", stderr(&out));
    let second = ca_core::cert::load_cert(&state.join("ca-cert.pem")).unwrap();
    assert_ne!(first.serial, second.serial);
    assert_eq!(
        ca_core::cert::load_cert(&state.join("..previous/ca-cert.pem")).unwrap().serial,
        first.serial,
        "previous set kept"
    );

    // Inventory.
    let (s, list) = srv.call("GET", "/v1/certificates?cluster=prod-1", Some(&srv.token("auditor")), None).await;
    assert_eq!(s, 200);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    let (_, one) = srv.call("GET", &format!("/v1/certificates/{}", second.serial), Some(&admin), None).await;
    assert_eq!(one["status"], "valid");
    assert_eq!(one["sha256_fingerprint"].as_str().unwrap(), second.fingerprint());
    assert_eq!(one["issuer"], "dev");
    let (_, expiring) =
        srv.call("GET", "/v1/certificates?cluster=prod-1&expiring_within=400d&status=valid", Some(&admin), None).await;
    assert_eq!(expiring.as_array().unwrap().len(), 2);
    let (s, _) = srv.call("GET", "/v1/certificates?status=bogus", Some(&admin), None).await;
    assert_eq!(s, 400);

    // Revoke the current intermediate: two-person rule again, then a new CRL lists it.
    let (_, crl_before) = srv.call("GET", "/v1/crl/dev?format=pem", None, None).await;
    let (s, rq) = srv
        .call(
            "POST",
            &format!("/v1/certificates/{}/revoke", second.serial),
            Some(&admin),
            Some(json!({"reason": "key-compromise"})),
        )
        .await;
    assert_eq!(s, 202, "{rq}");
    let (s, _) =
        srv.call("POST", &format!("/v1/requests/{}/approve", rq["id"].as_str().unwrap()), Some(&approver), None).await;
    assert_eq!(s, 200);
    let crl = tmp.path().join("dev.crl");
    let der = srv.client.get(format!("{}/v1/crl/dev", srv.url)).send().await.unwrap();
    assert_eq!(der.headers()["content-type"], "application/pkix-crl");
    std::fs::write(&crl, der.bytes().await.unwrap()).unwrap();
    let env_cert = srv.dir.join("hierarchy/environments/dev/environment.pem");
    let o =
        openssl(&["crl", "-inform", "DER", "-in", s_(&crl), "-CAfile", s_(&env_cert), "-noout", "-verify", "-text"]);
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && text.contains("verify OK"), "{text}");
    assert!(text.to_uppercase().contains(&second.serial.to_uppercase()), "{text}");
    assert!(text.contains("Key Compromise"), "{text}");
    let number = |t: &str| t.lines().skip_while(|l| !l.contains("CRL Number")).nth(1).unwrap().trim().to_string();
    let before_text = String::from_utf8(
        Command::new("openssl")
            .args(["crl", "-noout", "-text"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(crl_before.as_str().unwrap().as_bytes())?;
                c.wait_with_output()
            })
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        number(&text).parse::<u64>().unwrap() > number(&before_text).parse::<u64>().unwrap(),
        "CRL numbers increase"
    );

    // A revoked intermediate can no longer renew, and neither can an older one: only the
    // newest intermediate renews.
    let out = srv.renew("prod-1", &state, None, true);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("client-certificate-revoked"), "{}", stderr(&out));
    let c = client(&srv.root(), Some((&state.join("..previous/ca-cert.pem"), &state.join("..previous/ca-key.pem"))));
    let r = c
        .post(format!("{}/v1/clusters/prod-1/intermediate", srv.url))
        .json(&json!({"csr": csr_pem()}))
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "client-certificate-superseded", "{body}");
    // Rollback switches istiod back to the previous (unrevoked) set at once ...
    let rb = Command::new(ca_cli_bin()).args(["cluster", "rollback", "--state-dir"]).arg(&state).output().unwrap();
    assert!(rb.status.success(), "{}", stderr(&rb));
    assert_eq!(ca_core::cert::load_cert(&state.join("ca-cert.pem")).unwrap().serial, first.serial);
    // ... and a new enrolment token, approved by a second operator, brings renewal back.
    let (s, re) = srv.call("POST", "/v1/clusters/prod-1/enrolment", Some(&admin), None).await;
    assert_eq!(s, 202, "{re}");
    let (s, v) = srv
        .call("POST", &format!("/v1/requests/{}/approve", re["request_id"].as_str().unwrap()), Some(&admin), None)
        .await;
    assert_eq!((s, v["code"].as_str()), (403, Some("two-person-rule")));
    let (s, _) = srv
        .call("POST", &format!("/v1/requests/{}/approve", re["request_id"].as_str().unwrap()), Some(&approver), None)
        .await;
    assert_eq!(s, 200);
    let out = srv.renew("prod-1", &state, Some(re["enrolment_token"].as_str().unwrap()), true);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("(enrolment)"), "falls back to enrolment: {}", stdout(&out));

    // Two-person rule on revocation, and rejection.
    let valid_serial = ca_core::cert::load_cert(&state.join("ca-cert.pem")).unwrap().serial;
    let (s, rq) = srv
        .call(
            "POST",
            &format!("/v1/certificates/{valid_serial}/revoke"),
            Some(&admin),
            Some(json!({"reason": "superseded"})),
        )
        .await;
    assert_eq!(s, 202, "{rq}");
    let rq_id = rq["id"].as_str().unwrap().to_string();
    let (s, v) = srv.call("POST", &format!("/v1/requests/{rq_id}/approve"), Some(&admin), None).await;
    assert_eq!((s, v["code"].as_str()), (403, Some("two-person-rule")), "{v}");
    let (s, v) = srv.call("POST", &format!("/v1/requests/{rq_id}/reject"), Some(&approver), None).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("rejected")), "{v}");
    let (s, v) = srv.call("POST", &format!("/v1/requests/{rq_id}/approve"), Some(&approver), None).await;
    assert_eq!((s, v["code"].as_str()), (409, Some("already-decided")), "{v}");
    let (_, one) = srv.call("GET", &format!("/v1/certificates/{valid_serial}"), Some(&admin), None).await;
    assert_eq!(one["status"], "valid", "a rejected revocation changes nothing");
    let (s, v) = srv
        .call(
            "POST",
            &format!("/v1/certificates/{valid_serial}/revoke"),
            Some(&admin),
            Some(json!({"reason": "bored"})),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (400, Some("invalid-reason")), "{v}");

    // CRL as PEM by content negotiation.
    let pem_resp = srv
        .client
        .get(format!("{}/v1/crl/dev", srv.url))
        .header("accept", "application/x-pem-file")
        .send()
        .await
        .unwrap();
    assert_eq!(pem_resp.headers()["content-type"], "application/x-pem-file");
    assert!(pem_resp.text().await.unwrap().starts_with("-----BEGIN X509 CRL-----"));

    // Inventory filters and paging; query errors are problem documents too.
    let auditor = srv.token("auditor");
    let (_, all) = srv.call("GET", "/v1/certificates?issuer=dev", Some(&auditor), None).await;
    let prod = all.as_array().unwrap().iter().filter(|c| c["cluster"] == "prod-1").count();
    assert_eq!(prod, 3, "enrolment, renewal, re-enrolment: {all}");
    let (_, none) = srv.call("GET", "/v1/certificates?issuer=nope", Some(&auditor), None).await;
    assert_eq!(none.as_array().unwrap().len(), 0);
    let (_, one_page) = srv.call("GET", "/v1/certificates?limit=1", Some(&auditor), None).await;
    assert_eq!(one_page.as_array().unwrap().len(), 1);
    let (_, revoked) = srv.call("GET", "/v1/certificates?status=revoked", Some(&auditor), None).await;
    assert_eq!(revoked.as_array().unwrap().len(), 1, "{revoked}");
    let resp =
        srv.client.get(format!("{}/v1/certificates?limit=abc", srv.url)).bearer_auth(&auditor).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    assert_eq!(resp.json::<Value>().await.unwrap()["code"], "invalid-query");
    let resp = srv.client.delete(format!("{}/v1/clusters", srv.url)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    assert_eq!(resp.json::<Value>().await.unwrap()["code"], "method-not-allowed");
    let (_, first_page) = srv.call("GET", "/v1/audit?after=0&limit=3", Some(&auditor), None).await;
    let seqs: Vec<i64> = first_page.as_array().unwrap().iter().map(|r| r["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    let (_, next_page) = srv.call("GET", "/v1/audit?after=3&limit=2", Some(&auditor), None).await;
    let seqs: Vec<i64> = next_page.as_array().unwrap().iter().map(|r| r["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, vec![4, 5]);
    assert_eq!(next_page[0]["prev_hash"], first_page[2]["hash"], "pages continue the chain");

    // Operations.
    let m = srv.metrics_text().await;
    // Three for prod-1 and one for the external-CA cluster `dev` that --dev sets up.
    assert!(m.contains("ca_issuances_total{issuer=\"dev\",profile=\"cluster\",result=\"ok\"} 4"), "{m}");
    // Expiry gauges come from the background scan (every second in tests).
    let mut gauges = String::new();
    for _ in 0..50 {
        gauges = srv.metrics_text().await;
        if gauges.contains("ca_cluster_intermediate_expiry_seconds{cluster=\"prod-1\"}")
            && gauges.contains("ca_crl_age_seconds{issuer=\"dev\"}")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gauges.contains("ca_cluster_intermediate_expiry_seconds{cluster=\"prod-1\"}"), "{gauges}");
    assert!(gauges.contains("ca_crl_age_seconds{issuer=\"dev\"}"), "{gauges}");
    assert!(gauges.contains("ca_hsm_up{issuer=\"dev\"} 1"), "{gauges}");
    assert!(m.contains("ca_http_request_duration_seconds"));
    assert!(m.contains("ca_issuer_expiry_seconds{issuer=\"dev\"}"));
    let (s, api) = srv.call("GET", "/v1/openapi.json", None, None).await;
    assert_eq!(s, 200);
    assert!(api["paths"]["/v1/clusters/{name}/intermediate"]["post"].is_object(), "{api}");

    // JSON logs carry the request id the client saw.
    let resp = srv.client.get(format!("{}/v1/clusters", srv.url)).send().await.unwrap();
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = std::fs::read_to_string(&srv.stderr_log).unwrap();
    let line = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["span"]["request_id"] == id.as_str());
    assert!(line.is_some_and(|l| l["status"] == 401), "no JSON log line for request {id}");

    // The audit trail has every step and verifies.
    let actions: Vec<String> =
        audit_actions(&srv).await.iter().map(|r| r["action"].as_str().unwrap().to_string()).collect();
    for a in [
        "cluster.register.requested",
        "request.approved",
        "cluster.registered",
        "certificate.issued",
        "certificate.revoke.requested",
        "certificate.revoked",
        "crl.published",
        "request.denied",
    ] {
        assert!(actions.iter().any(|x| x == a), "{a} missing from {actions:?}");
    }
    let db_url = db.unwrap_or_else(|| srv.database_url());
    // Checkpoints are signed by the leader's background job; force one through a quiet period.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let v = srv.audit_verify(&db_url);
    assert!(v.status.success(), "{}{}", stdout(&v), stderr(&v));
    assert!(stdout(&v).contains("audit trail OK"), "{}", stdout(&v));
    let json_report = Command::new(ca_cli_bin())
        .args(["--output", "json", "audit", "verify", "--database", &db_url, "--audit-key"])
        .arg(srv.dir.join("audit.pub.pem"))
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&json_report.stdout).unwrap();
    assert!(report["checkpoints"].as_u64().unwrap() >= 1, "a signed checkpoint exists: {report}");
    // Whoever can write the database could rewrite the chain and drop the checkpoints: with a
    // trusted key, a trail without any is not accepted.
    drop(srv);
    exec(&db_url, "DELETE FROM audit_checkpoints").await;
    let o = Command::new(ca_cli_bin())
        .args(["audit", "verify", "--database", &db_url, "--audit-key"])
        .arg(tmp.path().join("dev/audit.pub.pem"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no signed checkpoint"), "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_lifecycle() {
    lifecycle("sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_lifecycle() {
    lifecycle("postgres").await;
}
