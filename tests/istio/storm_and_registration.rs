//! Restart storms lose nothing; registration through the API and an unreachable cluster key.

use super::*;

/// Restart-storm shape on both backends: many concurrent requests, every certificate stored,
/// listed in the audit trail (in fewer records than certificates when they queue), the trail
/// verifies; and the TTL rules that need another configuration.
async fn storm(backend: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let database_url = match backend {
        "sqlite" => None,
        _ => Some(fresh_pg_url().await),
    };
    let opts = Opts { database_url: database_url.clone(), ..Opts::default() };
    let srv = Server::start(&dir, &opts);
    srv.wait_ready().await;
    // Over-long requests are clamped rather than refused, up to 400 days.
    change_settings(
        &srv,
        "dev",
        dev_settings(&srv, |s| {
            s["over_max"] = json!("clamp");
            s["max_ttl"] = json!("400d");
        }),
    )
    .await;
    let ch = channel(&srv).await;
    let n = 300;
    let mut tasks = Vec::new();
    for i in 0..n {
        let ch = ch.clone();
        let t = sa_token(&srv, "storm", &format!("sa-{}", i % 50), |_| {});
        tasks.push(tokio::spawn(async move { create(&ch, Call::new(&t, plain_csr())).await }));
    }
    let mut serials = Vec::new();
    for t in tasks {
        serials.push(parse_leaf(&t.await.unwrap().expect("no request fails in a storm")[0]).serial);
    }
    let records = audit_all(&srv).await;
    let listed = listed_serials(&records);
    for s in &serials {
        assert!(listed.contains(s), "serial {s} is not in the audit trail");
    }
    let batches = records.iter().filter(|r| r["action"] == "workload.issued").count();
    eprintln!("{backend}: {n} certificates in {batches} audit records");
    let url = srv.database_url();
    let o = srv.audit_verify(&url);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    for s in serials.iter().step_by(37) {
        let (st, v) = srv.call("GET", &format!("/v1/certificates/{s}"), Some(&srv.token("auditor")), None).await;
        assert_eq!(st, 200, "{v}");
    }

    // Clamped instead of rejected; and never past the cluster intermediate (30d in --dev).
    let example = srv.env["CA_EXAMPLE_TOKEN"].clone();
    let chain = create(&ch, Call { validity: 300 * 86400, ..Call::new(&example, plain_csr()) }).await.unwrap();
    let leaf = parse_leaf(&chain[0]);
    let inter_der = der(&chain[1]);
    let (_, inter) = x509_parser::parse_x509_certificate(&inter_der).unwrap();
    assert_eq!(leaf.not_after, inter.validity().not_after.timestamp(), "capped at the intermediate's notAfter");
    drop(srv);

    // After a restart everything is still there.
    let srv = Server::start(&dir, &Opts { database_url, ..Opts::default() });
    srv.wait_ready().await;
    let (st, _) = srv.call("GET", &format!("/v1/certificates/{}", serials[0]), Some(&srv.token("auditor")), None).await;
    assert_eq!(st, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_storm_loses_nothing() {
    storm("sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_storm_loses_nothing() {
    storm("postgres").await;
}

/// An external-CA cluster registered through the API (two operators), its intermediate issued
/// by the server for a server-side key; when that key becomes unreachable, requests get
/// UNAVAILABLE and nothing is issued.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registration_two_person_rule_and_unreachable_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let key = tmp.path().join("edge.key");
    let opts = Opts::default();
    let srv = Server::start(&dir, &opts);
    srv.wait_ready().await;
    hsm::generate_key(&hsm::KeyRef::file(&key), hsm::KeyAlgorithm::EcdsaP256).unwrap();
    // The same stand-in API server (issuer and keys) as the dev cluster's.
    let body = json!({"name": "edge", "environment": "dev", "trust_domain": "cluster.local", "mode": "external-ca",
                      "key": format!("file:{}", key.display()), "istio": dev_settings(&srv, |_| {})});
    let (s, r) = srv.call("POST", "/v1/clusters", Some(&srv.token("admin")), Some(body.clone())).await;
    assert_eq!(s, 202, "{r}");
    assert!(r.get("enrolment_token").is_none(), "external-CA clusters have nothing to enrol: {r}");
    let ch = channel(&srv).await;
    let t = sa_token(&srv, "default", "default", |_| {});
    let pending = Call { cluster: Some("edge"), ..Call::new(&t, plain_csr()) };
    expect_code(create(&ch, pending).await, Code::PermissionDenied, "before approval");
    let id = r["request_id"].as_str().unwrap();
    let (s, _) = srv.call("POST", &format!("/v1/requests/{id}/approve"), Some(&srv.token("admin")), None).await;
    assert_eq!(s, 403, "the requester may not approve");
    let (s, a) = srv.call("POST", &format!("/v1/requests/{id}/approve"), Some(&srv.token("approver")), None).await;
    assert_eq!(s, 200, "{a}");
    let chain =
        create(&ch, Call { cluster: Some("edge"), ..Call::new(&t, plain_csr()) }).await.expect("issued under edge");
    let inter_der = der(&chain[1]);
    let (_, inter) = x509_parser::parse_x509_certificate(&inter_der).unwrap();
    assert!(inter.subject().to_string().contains("edge"), "{}", inter.subject());
    let spki = hsm::open_signer(&hsm::KeyRef::file(&key)).unwrap().public_key().spki_der().to_vec();
    assert_eq!(inter.public_key().raw, spki.as_slice(), "the intermediate certifies the server-side key");
    // istiod's serving certificate from the external-CA cluster's intermediate (admin only).
    let (istiod_csr, _) = csr(vec![], &rcgen::PKCS_ECDSA_P256_SHA256);
    let body = json!({"csr": istiod_csr, "dns_names": ["istiod.istio-system.svc"], "validity": "30d"});
    let (s, r) = srv
        .call("POST", "/v1/clusters/edge/server-certificates", Some(&srv.token("approver")), Some(body.clone()))
        .await;
    assert_eq!((s, r["code"].as_str()), (403, Some("forbidden")), "{r}");
    let (s, r) = srv.call("POST", "/v1/clusters/edge/server-certificates", Some(&srv.token("admin")), Some(body)).await;
    assert_eq!(s, 200, "{r}");
    let text = openssl_text(r["certificate"].as_str().unwrap());
    assert!(text.contains("DNS:istiod.istio-system.svc") && text.contains("TLS Web Server Authentication"), "{text}");
    let mut full = vec![r["certificate"].as_str().unwrap().to_string()];
    full.extend(r["chain"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_string()));
    full.push(r["trust_bundle"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect::<String>());
    assert_eq!(der(&full[1]), inter_der, "signed by the edge intermediate");
    let leaf = rustls::pki_types::CertificateDer::from(der(&full[0]));
    let anchors =
        [webpki::anchor_from_trusted_cert(&rustls::pki_types::CertificateDer::from(der(full.last().unwrap())))
            .unwrap()
            .to_owned()];
    let inters: Vec<_> =
        full[1..full.len() - 1].iter().map(|p| rustls::pki_types::CertificateDer::from(der(p))).collect();
    webpki::EndEntityCert::try_from(&leaf)
        .unwrap()
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &inters,
            rustls::pki_types::UnixTime::now(),
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .expect("istiod's certificate verifies to the root");
    for (bad, status) in [
        (json!({"csr": plain_csr(), "dns_names": ["*.istio-system.svc"]}), 400),
        (json!({"csr": plain_csr(), "dns_names": ["istiod.istio-system.svc"], "validity": "400d"}), 400),
        (json!({"csr": plain_csr(), "dns_names": ["bank.example.com"]}), 403),
        (json!({"csr": plain_csr(), "dns_names": ["localhost"]}), 403),
    ] {
        let (s, r) =
            srv.call("POST", "/v1/clusters/edge/server-certificates", Some(&srv.token("admin")), Some(bad)).await;
        assert_eq!(s, status, "{r}");
    }
    // No CRL covers certificates issued by a cluster intermediate: revocation says so.
    let serial = r["serial"].as_str().unwrap();
    let (s, v) = srv
        .call(
            "POST",
            &format!("/v1/certificates/{serial}/revoke"),
            Some(&srv.token("admin")),
            Some(json!({"reason": "key-compromise"})),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (409, Some("no-crl")), "{v}");

    // Revoking the server-held intermediate (two operators) stops it signing: the next
    // certificate comes from its successor, for the same key.
    let old_serial = hex::encode(inter.raw_serial());
    let (s, r) = srv
        .call(
            "POST",
            &format!("/v1/certificates/{old_serial}/revoke"),
            Some(&srv.token("admin")),
            Some(json!({"reason": "superseded"})),
        )
        .await;
    assert_eq!(s, 202, "{r}");
    let id = r["id"].as_str().unwrap();
    let (s, a) = srv.call("POST", &format!("/v1/requests/{id}/approve"), Some(&srv.token("approver")), None).await;
    assert_eq!(s, 200, "{a}");
    let chain = create(&ch, Call { cluster: Some("edge"), ..Call::new(&t, plain_csr()) })
        .await
        .expect("issued by the successor");
    let next_der = der(&chain[1]);
    let (_, next) = x509_parser::parse_x509_certificate(&next_der).unwrap();
    assert_ne!(hex::encode(next.raw_serial()), old_serial, "a new intermediate");
    assert_eq!(next.public_key().raw, spki.as_slice(), "for the same server-side key");

    // Bad registrations.
    for (bad, code) in [
        (
            json!({"name": "x1", "environment": "dev", "trust_domain": "cluster.local", "mode": "external-ca"}),
            "invalid-key",
        ),
        (
            json!({"name": "x2", "environment": "dev", "trust_domain": "cluster.local", "mode": "sideways"}),
            "invalid-mode",
        ),
        (json!({"name": "x3", "environment": "dev", "trust_domain": "cluster.local", "key": "file:/k"}), "invalid-key"),
        (
            json!({"name": "x4", "environment": "dev", "trust_domain": "cluster.local", "mode": "external-ca",
                "key": format!("file:{}", key.display())}),
            "invalid-key",
        ),
    ] {
        let (s, r) = srv.call("POST", "/v1/clusters", Some(&srv.token("admin")), Some(bad)).await;
        assert_eq!((s, r["code"].as_str().unwrap()), (400, code), "{r}");
    }
    drop(srv);

    // The key goes away; after a restart the cluster's CA cannot load: UNAVAILABLE.
    std::fs::remove_file(&key).unwrap();
    let srv = Server::start(&dir, &opts);
    srv.wait_ready().await;
    let ch = channel(&srv).await;
    let msg = expect_code(
        create(&ch, Call { cluster: Some("edge"), ..Call::new(&t, plain_csr()) }).await,
        Code::Unavailable,
        "key unreachable",
    );
    assert!(msg.contains("hsm"), "{msg}");
    // The dev cluster is unaffected.
    create(&ch, Call::new(&srv.env["CA_EXAMPLE_TOKEN"], plain_csr())).await.expect("dev still issues");
}
