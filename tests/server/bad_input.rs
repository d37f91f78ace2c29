//! Every bad request gets its problem code and changes nothing.

use super::*;

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
async fn sqlite_bad_input() {
    bad_input("sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_bad_input() {
    bad_input("postgres").await;
}
