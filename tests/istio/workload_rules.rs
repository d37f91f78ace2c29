//! Every rule a workload certificate request is judged by.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workload_certificates_follow_every_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let srv = Server::start(&dir, &Opts::default());
    srv.wait_ready().await;
    let ch = channel(&srv).await;
    let example = srv.env["CA_EXAMPLE_TOKEN"].clone();
    for k in ["CA_GRPC_ADDR", "CA_DEV_CLUSTER", "CA_TRUST_DOMAIN", "CA_SA_ISSUER", "CA_SA_JWKS", "CA_SA_SIGNING_KEY"] {
        assert!(srv.env.contains_key(k), "dev.env lacks {k}");
    }

    // The happy path: leaf, cluster intermediate, environment intermediate, bundle.
    let chain = create(&ch, Call::new(&example, plain_csr())).await.expect("issued");
    assert_eq!(chain.len(), 4, "{chain:#?}");
    let root_pem = std::fs::read_to_string(srv.root()).unwrap();
    assert_eq!(der(chain.last().unwrap()), der(&root_pem), "the last element is the trust bundle");
    let (s, cluster) = srv.call("GET", "/v1/clusters/dev", Some(&srv.token("auditor")), None).await;
    assert_eq!(s, 200, "{cluster}");
    assert_eq!(cluster["mode"], "external-ca");
    let (s, inter) = srv
        .call(
            "GET",
            &format!("/v1/certificates/{}", cluster["current_serial"].as_str().unwrap()),
            Some(&srv.token("auditor")),
            None,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(der(&chain[1]), der(inter["pem"].as_str().unwrap()), "second element is the cluster intermediate");
    let (_, issuers) = srv.call("GET", "/v1/issuers", Some(&srv.token("auditor")), None).await;
    assert_eq!(der(&chain[2]), der(issuers[0]["chain"][0].as_str().unwrap()), "third is the environment intermediate");
    webpki_verify(&chain);
    openssl_verify(&chain);
    let leaf = parse_leaf(&chain[0]);
    assert_eq!(leaf.sans, vec!["URI:spiffe://cluster.local/ns/default/sa/default"]);
    assert_eq!(leaf.not_after - leaf.not_before, 24 * 3600 + 60, "default TTL 24h (notBefore backdated a minute)");
    let text = openssl_text(&chain[0]);
    for want in [
        "Digital Signature, Key Encipherment",
        "TLS Web Server Authentication, TLS Web Client Authentication",
        "X509v3 Subject Alternative Name: critical",
        "X509v3 Authority Key Identifier",
        "CA:FALSE",
    ] {
        assert!(text.contains(want), "leaf lacks {want:?}:\n{text}");
    }
    assert!(leaf.serial.len() >= 32, "random serial of at least 128 bits: {}", leaf.serial);

    // Findable by serial, and listed in the audit trail.
    let (s, found) =
        srv.call("GET", &format!("/v1/certificates/{}", leaf.serial), Some(&srv.token("auditor")), None).await;
    assert_eq!(s, 200, "{found}");
    assert_eq!(found["profile"], "workload");
    assert_eq!(found["sans"][0], "spiffe://cluster.local/ns/default/sa/default");
    assert!(listed_serials(&audit_all(&srv).await).contains(&leaf.serial));

    // The CSR may repeat the caller's own identity...
    let me = "spiffe://cluster.local/ns/default/sa/default";
    let chain = create(&ch, Call::new(&example, csr(vec![uri(me)], &rcgen::PKCS_ECDSA_P256_SHA256).0)).await.unwrap();
    assert_eq!(parse_leaf(&chain[0]).sans, vec![format!("URI:{me}")]);
    // ... but not someone else's, nor DNS, IP or email names.
    let other = csr(vec![uri("spiffe://cluster.local/ns/kube-system/sa/admin")], &rcgen::PKCS_ECDSA_P256_SHA256).0;
    expect_code(create(&ch, Call::new(&example, other)).await, Code::PermissionDenied, "foreign URI");
    for (what, san) in [
        ("DNS", rcgen::SanType::DnsName("evil.example.com".to_string().try_into().unwrap())),
        ("IP", rcgen::SanType::IpAddress("10.0.0.1".parse().unwrap())),
        ("email", rcgen::SanType::Rfc822Name("a@b.example".to_string().try_into().unwrap())),
    ] {
        let c = csr(vec![uri(me), san], &rcgen::PKCS_ECDSA_P256_SHA256).0;
        expect_code(create(&ch, Call::new(&example, c)).await, Code::InvalidArgument, what);
    }

    // Keys: P-384 and RSA-2048 are fine; RSA-1024 is not; a bad signature or garbage is refused.
    create(&ch, Call::new(&example, csr(vec![], &rcgen::PKCS_ECDSA_P384_SHA384).0)).await.expect("P-384");
    create(&ch, Call::new(&example, openssl_csr(&["-newkey", "rsa:2048"]))).await.expect("RSA-2048");
    let weak = expect_code(
        create(&ch, Call::new(&example, openssl_csr(&["-newkey", "rsa:1024"]))).await,
        Code::InvalidArgument,
        "RSA-1024",
    );
    assert!(weak.contains("weak") || weak.contains("2048"), "{weak}");
    let good = plain_csr();
    let mut bytes = der(&good);
    let n = bytes.len();
    bytes[n - 3] ^= 0x55;
    let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", bytes));
    expect_code(create(&ch, Call::new(&example, tampered)).await, Code::InvalidArgument, "bad CSR signature");
    expect_code(create(&ch, Call::new(&example, "not a csr".into())).await, Code::InvalidArgument, "garbage");

    // TTL: requested, over the maximum (rejected by default), negative.
    let chain = create(&ch, Call { validity: 3600, ..Call::new(&example, plain_csr()) }).await.unwrap();
    let l = parse_leaf(&chain[0]);
    assert_eq!(l.not_after - l.not_before, 3600 + 60);
    let msg = expect_code(
        create(&ch, Call { validity: 8 * 86400, ..Call::new(&example, plain_csr()) }).await,
        Code::InvalidArgument,
        "over max",
    );
    assert!(msg.contains("maximum"), "{msg}");
    expect_code(
        create(&ch, Call { validity: -5, ..Call::new(&example, plain_csr()) }).await,
        Code::InvalidArgument,
        "negative",
    );

    // Authentication.
    let no_token = Call { token: None, ..Call::new("", plain_csr()) };
    expect_code(create(&ch, no_token).await, Code::Unauthenticated, "no token");
    let no_cluster = Call { cluster: None, ..Call::new(&example, plain_csr()) };
    expect_code(create(&ch, no_cluster).await, Code::Unauthenticated, "no ClusterID");
    let unknown = Call { cluster: Some("elsewhere\"{x=1}"), ..Call::new(&example, plain_csr()) };
    expect_code(create(&ch, unknown).await, Code::PermissionDenied, "unknown cluster");
    // A claimed cluster name never becomes a metric label.
    let m = srv.metrics_text().await;
    assert!(!m.contains("elsewhere") && m.contains("issuer=\"unknown\""), "{m}");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    type Edit = Box<dyn FnOnce(&mut Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("wrong audience", Box::new(|c: &mut Value| c["aud"] = json!(["kubernetes"]))),
        ("wrong issuer", Box::new(|c: &mut Value| c["iss"] = json!("https://other.example"))),
        ("expired", Box::new(move |c: &mut Value| c["exp"] = json!(now - 120))),
        ("not yet valid", Box::new(move |c: &mut Value| c["nbf"] = json!(now + 600))),
        ("sub disagrees", Box::new(|c: &mut Value| c["sub"] = json!("system:serviceaccount:other:x"))),
        (
            "no service account",
            Box::new(|c: &mut Value| {
                c.as_object_mut().unwrap().remove("kubernetes.io");
                c["sub"] = json!("alice");
            }),
        ),
    ];
    for (what, edit) in cases {
        let t = sa_token(&srv, "default", "default", edit);
        expect_code(create(&ch, Call::new(&t, plain_csr())).await, Code::Unauthenticated, what);
    }
    // Within the leeway (30 s) an expired token still passes; sub alone names the account.
    let t = sa_token(&srv, "default", "default", |c| c["exp"] = json!(now - 10));
    create(&ch, Call::new(&t, plain_csr())).await.expect("within leeway");
    let t = sa_token(&srv, "shop", "cart", |c| {
        c.as_object_mut().unwrap().remove("kubernetes.io");
    });
    let chain = create(&ch, Call::new(&t, plain_csr())).await.expect("sub only");
    assert_eq!(parse_leaf(&chain[0]).sans, vec!["URI:spiffe://cluster.local/ns/shop/sa/cart"]);
    // Tokens from a key the cluster never published, and HMAC tokens, are refused.
    let stranger = tmp.path().join("stranger.key");
    hsm::generate_key(&hsm::KeyRef::file(&stranger), hsm::KeyAlgorithm::EcdsaP256).unwrap();
    let t = sa_token_with(&srv, &stranger, "default", "default", |_| {});
    expect_code(create(&ch, Call::new(&t, plain_csr())).await, Code::Unauthenticated, "unknown kid");
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.kid = Some(kid_of(&srv.dir.join("sa-signing.key")));
    let hs = jsonwebtoken::encode(&h, &json!({"iss": srv.env["CA_SA_ISSUER"], "aud": "istio-ca", "sub": "system:serviceaccount:a:b", "exp": now + 60}),
        &jsonwebtoken::EncodingKey::from_secret(b"guess")).unwrap();
    expect_code(create(&ch, Call::new(&hs, plain_csr())).await, Code::Unauthenticated, "HS256");

    // Key rotation: the cluster publishes a second key (an approved settings change here);
    // tokens signed with it are accepted without a restart.
    let rotated = tmp.path().join("rotated.key");
    hsm::generate_key(&hsm::KeyRef::file(&rotated), hsm::KeyAlgorithm::EcdsaP256).unwrap();
    let rotated_settings = dev_settings(&srv, |s| s["jwks"]["keys"].as_array_mut().unwrap().push(jwk_of(&rotated)));
    // A token accepted once (here within the 30 s leeway) is refused once it is past it, even
    // though its verification was cached.
    let nearly = sa_token(&srv, "default", "default", |c| {
        c["exp"] = json!(time::OffsetDateTime::now_utc().unix_timestamp() - 22)
    });
    create(&ch, Call::new(&nearly, plain_csr())).await.expect("within leeway");
    create(&ch, Call::new(&nearly, plain_csr())).await.expect("again, from the cache");
    tokio::time::sleep(Duration::from_secs(11)).await;
    expect_code(
        create(&ch, Call::new(&nearly, plain_csr())).await,
        Code::Unauthenticated,
        "past the leeway, cached or not",
    );
    change_settings(&srv, "dev", rotated_settings).await;
    let t = sa_token_with(&srv, &rotated, "default", "default", |_| {});
    create(&ch, Call::new(&t, plain_csr())).await.expect("token from the rotated key");

    // Impersonation: only the trusted node account, only inside the trust domain.
    let ztunnel = sa_token(&srv, "istio-system", "ztunnel", |_| {});
    let web = "spiffe://cluster.local/ns/app/sa/web";
    for (what, target) in [
        ("a non-workload identity", "spiffe://cluster.local/anything"),
        ("a node account", "spiffe://cluster.local/ns/istio-system/sa/ztunnel"),
    ] {
        expect_code(
            create(&ch, Call { impersonate: Some(target), ..Call::new(&ztunnel, plain_csr()) }).await,
            Code::PermissionDenied,
            what,
        );
    }
    let chain = create(&ch, Call { impersonate: Some(web), ..Call::new(&ztunnel, plain_csr()) }).await.unwrap();
    assert_eq!(parse_leaf(&chain[0]).sans, vec![format!("URI:{web}")]);
    let c = csr(vec![uri(web)], &rcgen::PKCS_ECDSA_P256_SHA256).0;
    create(&ch, Call { impersonate: Some(web), ..Call::new(&ztunnel, c) })
        .await
        .expect("CSR naming the impersonated identity");
    expect_code(
        create(&ch, Call { impersonate: Some(web), ..Call::new(&example, plain_csr()) }).await,
        Code::PermissionDenied,
        "impersonation by an ordinary workload",
    );
    expect_code(
        create(&ch, Call { impersonate: Some("spiffe://other.domain/ns/a/sa/b"), ..Call::new(&ztunnel, plain_csr()) })
            .await,
        Code::PermissionDenied,
        "impersonation outside the trust domain",
    );

    // Every refusal above was audited, with its code (unauthenticated ones in the summary,
    // written every second in tests).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let records = audit_all(&srv).await;
    let denied = denials(&records);
    for code in [
        "identity-mismatch",
        "invalid-request",
        "weak-key",
        "bad-csr-signature",
        "invalid-token",
        "no-cluster-id",
        "cluster-not-served",
        "impersonation-denied",
        "unauthenticated",
    ] {
        assert!(denied.iter().any(|d| d["code"] == code), "no audited denial with code {code}: {denied:#?}");
    }
    let o = srv.audit_verify(&srv.database_url());
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));

    // Trust distribution over REST.
    let r = srv.client.get(format!("{}/v1/clusters/dev/trust-bundle", srv.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(der(&r.text().await.unwrap()), der(&root_pem));
    let r = srv
        .client
        .get(format!("{}/v1/clusters/dev/trust-bundle/configmap?namespace=app", srv.url))
        .send()
        .await
        .unwrap();
    let yaml = r.text().await.unwrap();
    assert!(yaml.contains("name: istio-ca-root-cert") && yaml.contains("namespace: app"), "{yaml}");
    let cm_pem: String = yaml
        .lines()
        .skip_while(|l| !l.contains("root-cert.pem"))
        .skip(1)
        .map(|l| l.trim().to_string() + "\n")
        .collect();
    assert_eq!(der(&cm_pem), der(&root_pem));
    let r = srv.client.get(format!("{}/v1/clusters/nope/trust-bundle", srv.url)).send().await.unwrap();
    assert_eq!(r.status(), 404);
}
