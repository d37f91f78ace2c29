//! ca-server end to end: the real binary on loopback with SoftHSM2 (its --dev setup), on
//! SQLite and on PostgreSQL, driven over HTTPS and by the real `ca-cli`.

#[path = "server_support/mod.rs"]
mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use support::*;

async fn backend_url(backend: &str) -> Option<String> {
    match backend {
        "sqlite" => None,
        _ => Some(fresh_pg_url().await),
    }
}

fn openssl(args: &[&str]) -> std::process::Output {
    Command::new("openssl").args(args).output().unwrap()
}

async fn audit_actions(srv: &Server) -> Vec<Value> {
    let (s, v) = srv.call("GET", "/v1/audit?after=0&limit=1000", Some(&srv.token("auditor")), None).await;
    assert_eq!(s, 200, "{v}");
    v.as_array().unwrap().clone()
}

/// Certificates in the inventory, leaving out those of the external-CA cluster `dev` that every
/// --dev server sets up for itself (its intermediate and the gRPC serving certificates).
async fn inventory_count(srv: &Server) -> usize {
    let (s, v) = srv.call("GET", "/v1/certificates?limit=1000", Some(&srv.token("auditor")), None).await;
    assert_eq!(s, 200, "{v}");
    v.as_array().unwrap().iter().filter(|c| c["cluster"] != "dev").count()
}

/// `certificate.issued` audit records, leaving out the dev cluster's own (see inventory_count).
fn issued_records(records: &[Value]) -> usize {
    records.iter().filter(|r| r["action"] == "certificate.issued" && r["details"]["cluster"] != "dev").count()
}

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

fn s_(p: &Path) -> &str {
    p.to_str().unwrap()
}

async fn bad_input(backend: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let db = backend_url(backend).await;
    let srv = Server::start(
        &tmp.path().join("dev"),
        &Opts {
            database_url: db,
            env: vec![("CA_SERVER_POLICY__MAX_BODY_BYTES".into(), "4096".into())],
            ..Default::default()
        },
    );
    srv.wait_ready().await;
    let admin = srv.token("admin");
    let token = srv.register_approved("c1").await;
    let denied_before = audit_actions(&srv).await.iter().filter(|r| r["action"] == "request.denied").count();
    let inventory_before = inventory_count(&srv).await;

    let post_raw = |path: &str, body: Vec<u8>, bearer: Option<String>| {
        let mut r = srv.client.post(format!("{}{path}", srv.url)).header("content-type", "application/json").body(body);
        if let Some(b) = bearer {
            r = r.bearer_auth(b);
        }
        r
    };
    let mut cases: Vec<(u16, &str, reqwest::RequestBuilder)> = vec![];
    cases.push((
        400,
        "malformed-json",
        post_raw("/v1/clusters/c1/intermediate", b"{not json".to_vec(), Some(token.clone())),
    ));
    cases.push((
        413,
        "payload-too-large",
        post_raw("/v1/clusters/c1/intermediate", vec![b' '; 10_000], Some(token.clone())),
    ));
    cases.push((
        400,
        "malformed-json",
        post_raw(
            "/v1/clusters",
            json!({"name": "x", "environment": "dev", "trust_domain": "cluster.local", "extra": 1})
                .to_string()
                .into_bytes(),
            Some(admin.clone()),
        ),
    ));
    cases.push((
        400,
        "malformed-csr",
        post_raw(
            "/v1/clusters/c1/intermediate",
            json!({"csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"})
                .to_string()
                .into_bytes(),
            Some(token.clone()),
        ),
    ));
    // A CSR whose signature was altered.
    let mut der = pem::parse(csr_pem()).unwrap().into_contents();
    let n = der.len() - 1;
    der[n] ^= 1;
    let broken = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
    cases.push((
        400,
        "bad-csr-signature",
        post_raw("/v1/clusters/c1/intermediate", json!({"csr": broken}).to_string().into_bytes(), Some(token.clone())),
    ));
    // An RSA-1024 CSR, made by openssl.
    let weak = tmp.path().join("weak.csr");
    let o = openssl(&[
        "req",
        "-new",
        "-nodes",
        "-newkey",
        "rsa:1024",
        "-subj",
        "/CN=weak",
        "-keyout",
        s_(&tmp.path().join("weak.key")),
        "-out",
        s_(&weak),
    ]);
    assert!(o.status.success());
    cases.push((
        400,
        "weak-key",
        post_raw(
            "/v1/clusters/c1/intermediate",
            json!({"csr": std::fs::read_to_string(&weak).unwrap()}).to_string().into_bytes(),
            Some(token.clone()),
        ),
    ));
    cases.push((
        404,
        "not-found",
        post_raw(
            "/v1/clusters/nope/intermediate",
            json!({"csr": csr_pem()}).to_string().into_bytes(),
            Some(token.clone()),
        ),
    ));
    cases.push((
        401,
        "unauthenticated",
        post_raw("/v1/clusters/c1/intermediate", json!({"csr": csr_pem()}).to_string().into_bytes(), None),
    ));
    // Operator tokens: expired, forged, wrong audience, none.
    let oidc = hsm::export_file_key(&hsm::KeyRef::file(srv.dir.join("dev-oidc.key"))).unwrap();
    let kid = hex::encode(&oidc.public_key().fingerprint()[..8]);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mint = |pem: &str, claims: Value| {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some(kid.clone());
        jsonwebtoken::encode(&h, &claims, &jsonwebtoken::EncodingKey::from_ec_pem(pem.as_bytes()).unwrap()).unwrap()
    };
    let good_claims = |exp: i64, aud: &str| json!({"iss": "https://dev.pki-mesh.local", "aud": aud, "sub": "mallory", "roles": ["admin"], "exp": exp});
    let reg = json!({"name": "c2", "environment": "dev", "trust_domain": "cluster.local"}).to_string().into_bytes();
    cases.push((
        401,
        "invalid-token",
        post_raw("/v1/clusters", reg.clone(), Some(mint(oidc.expose_pem(), good_claims(now - 3600, "ca-server")))),
    ));
    cases.push((
        401,
        "invalid-token",
        post_raw("/v1/clusters", reg.clone(), Some(mint(oidc.expose_pem(), good_claims(now + 3600, "someone-else")))),
    ));
    let other = rcgen::KeyPair::generate().unwrap().serialize_pem();
    cases.push((
        401,
        "invalid-token",
        post_raw("/v1/clusters", reg.clone(), Some(mint(&other, good_claims(now + 3600, "ca-server")))),
    ));
    cases.push((401, "invalid-token", post_raw("/v1/clusters", reg.clone(), Some("not.a.jwt".into()))));
    cases.push((401, "unauthenticated", post_raw("/v1/clusters", reg.clone(), None)));
    // An auditor may read but not register; an unknown environment; a foreign trust domain.
    cases.push((403, "forbidden", post_raw("/v1/clusters", reg.clone(), Some(srv.token("auditor")))));
    cases.push((
        400,
        "unknown-environment",
        post_raw(
            "/v1/clusters",
            json!({"name": "c3", "environment": "prod", "trust_domain": "cluster.local"}).to_string().into_bytes(),
            Some(admin.clone()),
        ),
    ));
    cases.push((
        400,
        "invalid-trust-domain",
        post_raw(
            "/v1/clusters",
            json!({"name": "c3", "environment": "dev", "trust_domain": "evil.example"}).to_string().into_bytes(),
            Some(admin.clone()),
        ),
    ));
    let n_cases = cases.len();
    for (want_status, want_code, req) in cases {
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let ct = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!((status, body["code"].as_str()), (want_status, Some(want_code)), "{body}");
        assert_eq!(ct, "application/problem+json");
    }
    // Every refusal is in the audit trail (an authenticated caller's as its own record, the
    // others counted in the summary written every second); nothing reached the inventory.
    let mut audited = 0;
    for _ in 0..50 {
        let records = audit_actions(&srv).await;
        let denied = records.iter().filter(|r| r["action"] == "request.denied").count();
        let summarised: u64 = records
            .iter()
            .filter(|r| r["action"] == "request.denied.summary")
            .filter_map(|r| r["details"]["total"].as_u64())
            .sum();
        audited = denied - denied_before + summarised as usize;
        if audited >= n_cases {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(audited, n_cases, "every refusal audited once");
    assert_eq!(inventory_count(&srv).await, inventory_before);
    let (_, clusters) = srv.call("GET", "/v1/clusters", Some(&admin), None).await;
    let registered = clusters.as_array().unwrap().iter().filter(|c| c["name"] != "dev").count();
    assert_eq!(registered, 1, "no cluster registered by a refused request: {clusters}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_lifecycle() {
    lifecycle("sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_lifecycle() {
    lifecycle("postgres").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_bad_input() {
    bad_input("sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_bad_input() {
    bad_input("postgres").await;
}

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

/// Editing, reordering or deleting audit rows is detected and the first bad record named; a
/// chain rewritten with fresh hashes is caught by the signed checkpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tampering_with_the_audit_trail_is_named() {
    for backend in ["sqlite", "postgres"] {
        let tmp = tempfile::tempdir().unwrap();
        let db = backend_url(backend).await;
        // A checkpoint at every round, so that the head is signed before the server stops.
        let opts = Opts {
            database_url: db.clone(),
            env: vec![("CA_SERVER_AUDIT__CHECKPOINT_EVERY".into(), "1".into())],
            ..Default::default()
        };
        let mut srv = Server::start(&tmp.path().join("dev"), &opts);
        srv.wait_ready().await;
        srv.register_approved("t1").await;
        srv.register_approved("t2").await;
        let db_url = db.unwrap_or_else(|| srv.database_url());
        tokio::time::sleep(Duration::from_millis(1500)).await;
        srv.kill();
        let v = srv.audit_verify(&db_url);
        assert!(v.status.success(), "{backend}: {}", stderr(&v));
        let records = audit_records(&db_url).await;
        assert!(records.len() >= 6);
        let verify = |label: &str, want: &str| {
            let v = srv.audit_verify(&db_url);
            assert!(!v.status.success(), "{backend}/{label}: tampering went unnoticed");
            assert!(stderr(&v).contains(want), "{backend}/{label}: want {want:?} in {}", stderr(&v));
        };

        // An edited row.
        exec_dyn(&db_url, "UPDATE audit_log SET details = '{\"cluster\":\"forged\"}' WHERE seq = 3".into()).await;
        verify("altered", "audit record 3 was altered");
        exec_dyn(
            &db_url,
            format!("UPDATE audit_log SET details = '{}' WHERE seq = 3", records[2].details.replace('\'', "''")),
        )
        .await;
        assert!(srv.audit_verify(&db_url).status.success(), "{backend}: restored");

        // Two rows swapped.
        for sql in [
            "UPDATE audit_log SET seq = -1 WHERE seq = 4",
            "UPDATE audit_log SET seq = 4 WHERE seq = 5",
            "UPDATE audit_log SET seq = 5 WHERE seq = -1",
        ] {
            exec_dyn(&db_url, sql.into()).await;
        }
        verify("reordered", "audit record 4 was reordered: it was written as record 5");
        for sql in [
            "UPDATE audit_log SET seq = -1 WHERE seq = 4",
            "UPDATE audit_log SET seq = 4 WHERE seq = 5",
            "UPDATE audit_log SET seq = 5 WHERE seq = -1",
        ] {
            exec_dyn(&db_url, sql.into()).await;
        }
        assert!(srv.audit_verify(&db_url).status.success(), "{backend}: swapped back");

        // A row rewritten together with every hash after it: only a checkpoint can tell.
        let mut prev = records[1].hash.clone();
        for r in &records[2..] {
            let details = if r.seq == 3 { "{\"cluster\":\"forged\"}".to_string() } else { r.details.clone() };
            let hash = ca_core::audit::record_hash(r.seq, r.time, &r.actor, &r.action, &r.subject, &details, &prev);
            exec_dyn(
                &db_url,
                format!(
                    "UPDATE audit_log SET details = '{}', prev_hash = '{prev}', hash = '{hash}' WHERE seq = {}",
                    details.replace('\'', "''"),
                    r.seq
                ),
            )
            .await;
            prev = hash;
        }
        verify("rewritten", "audit checkpoint at record");

        // A deleted row.
        exec_dyn(&db_url, "DELETE FROM audit_log WHERE seq = 2".into()).await;
        verify("deleted", "audit record 2 is missing");
    }
}

async fn audit_records(url: &str) -> Vec<ca_core::audit::AuditRecord> {
    let store = ca_store::Store::connect(url, false).await.unwrap();
    let r = store.audit_after(0, 100_000).await.unwrap();
    store.close().await;
    r
}

async fn exec_dyn(url: &str, sql: String) {
    if url.starts_with("sqlite") {
        let pool = sqlx::SqlitePool::connect(url).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await.unwrap();
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await.unwrap();
        pool.close().await;
    }
}

async fn exec(url: &str, sql: &'static str) {
    if url.starts_with("sqlite") {
        let pool = sqlx::SqlitePool::connect(url).await.unwrap();
        sqlx::query(sql).execute(&pool).await.unwrap();
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        sqlx::query(sql).execute(&pool).await.unwrap();
        pool.close().await;
    }
}

/// Two servers on one PostgreSQL issue concurrently: no duplicate serials, no fork in the
/// audit chain, no lost record.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_share_postgres() {
    let tmp = tempfile::tempdir().unwrap();
    let db = fresh_pg_url().await;
    let dir = tmp.path().join("dev");
    let a = Server::start(
        &dir,
        &Opts {
            database_url: Some(db.clone()),
            env: vec![("CA_SERVER_CRL__REFRESH_BEFORE".into(), "30d".into())],
            ..Default::default()
        },
    );
    a.wait_ready().await;
    let b = Server::start(
        &tmp.path().join("b"),
        &Opts {
            database_url: Some(db.clone()),
            config_of: Some(dir.clone()),
            // CRLs due at every tick, so that both replicas would publish if both could.
            env: vec![("CA_SERVER_CRL__REFRESH_BEFORE".into(), "30d".into())],
        },
    );
    b.wait_ready().await;
    let mut serials = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..6 {
        let name = format!("r{i}");
        let token = a.register_approved(&name).await;
        let st = tmp.path().join(format!("st{i}"));
        // Enrol through one replica, then renew alternately through both, all clusters at once.
        let first = if i % 2 == 0 { &a } else { &b };
        assert!(first.renew(&name, &st, Some(&token), false).status.success());
        let mut renewer = Renewer::from_state_dir(&a.root(), &name, &st);
        let urls = [a.url.clone(), b.url.clone()];
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for k in 0..12 {
                got.push(renewer.renew(&urls[k % 2]).await.unwrap());
            }
            got
        }));
    }
    for t in tasks {
        serials.extend(t.await.unwrap());
    }
    let unique: std::collections::HashSet<_> = serials.iter().collect();
    assert_eq!(unique.len(), serials.len(), "duplicate serials");
    assert_eq!(inventory_count(&a).await, serials.len() + 6, "every certificate recorded");
    let issued = issued_records(&audit_actions(&b).await);
    assert_eq!(issued, serials.len() + 6);
    let v = a.audit_verify(&db);
    assert!(v.status.success(), "{}{}", stdout(&v), stderr(&v));
    // Background jobs ran throughout, on one replica at a time: the lease holder (the first
    // one up) published every CRL. Give them a few more rounds (one a second here).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let publishers: std::collections::BTreeSet<String> = audit_actions(&a)
        .await
        .iter()
        .filter(|r| r["action"] == "crl.published")
        .map(|r| r["actor"].as_str().unwrap().to_string())
        .collect();
    let published = audit_actions(&a).await.iter().filter(|r| r["action"] == "crl.published").count();
    assert!(published >= 3, "CRLs were refreshed repeatedly: {published}");
    assert_eq!(publishers.len(), 1, "only one replica ran the jobs: {publishers:?}");
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
