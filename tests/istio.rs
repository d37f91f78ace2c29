//! External-CA mode end to end: the real `ca-server --dev` answering Istio's certificate gRPC
//! API, driven by a client generated from the same proto, with service-account tokens minted
//! the way a Kubernetes API server would. Certificates are checked with rustls-webpki, openssl
//! and a real mTLS handshake between two workloads.

#[path = "server_support/mod.rs"]
mod support;

mod proto {
    tonic::include_proto!("istio.v1.auth");
}

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use proto::IstioCertificateRequest;
use proto::istio_certificate_service_client::IstioCertificateServiceClient;
use serde_json::{Value, json};
use support::*;
use tonic::Code;
use tonic::transport::Channel;

async fn channel(srv: &Server) -> Channel {
    grpc_channel(srv, "").await
}

/// Mints a token with the dev cluster's service-account key; `edit` changes the claims.
fn sa_token(srv: &Server, ns: &str, sa: &str, edit: impl FnOnce(&mut Value)) -> String {
    sa_token_with(srv, &srv.dir.join("sa-signing.key"), ns, sa, edit)
}

/// The JWK of a P-256 file key, with the kid the dev setup uses.
fn jwk_of(key: &Path) -> Value {
    let k = hsm::export_file_key(&hsm::KeyRef::file(key)).unwrap();
    let raw = k.public_key().raw().to_vec();
    let b64 = |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, b);
    json!({"kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..65]), "kid": kid_of(key), "alg": "ES256", "use": "sig"})
}

struct Call<'a> {
    token: Option<&'a str>,
    cluster: Option<&'a str>,
    csr: String,
    validity: i64,
    impersonate: Option<&'a str>,
}

impl<'a> Call<'a> {
    fn new(token: &'a str, csr: String) -> Self {
        Call { token: Some(token), cluster: Some("dev"), csr, validity: 0, impersonate: None }
    }
}

async fn create(ch: &Channel, c: Call<'_>) -> Result<Vec<String>, tonic::Status> {
    let metadata = c.impersonate.map(|id| prost_types::Struct {
        fields: [(
            "ImpersonatedIdentity".to_string(),
            prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(id.to_string())) },
        )]
        .into_iter()
        .collect(),
    });
    let mut req = tonic::Request::new(IstioCertificateRequest { csr: c.csr, validity_duration: c.validity, metadata });
    if let Some(t) = c.token {
        req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    if let Some(cl) = c.cluster {
        req.metadata_mut().insert("clusterid", cl.parse().unwrap());
    }
    IstioCertificateServiceClient::new(ch.clone()).create_certificate(req).await.map(|r| r.into_inner().cert_chain)
}

/// A CSR for a fresh key with the given SANs (and its PKCS#8 key).
fn csr(sans: Vec<rcgen::SanType>, alg: &'static rcgen::SignatureAlgorithm) -> (String, Vec<u8>) {
    let kp = rcgen::KeyPair::generate_for(alg).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = sans;
    (p.serialize_request(&kp).unwrap().pem().unwrap(), kp.serialize_der())
}

fn plain_csr() -> String {
    csr(vec![], &rcgen::PKCS_ECDSA_P256_SHA256).0
}

fn uri(s: &str) -> rcgen::SanType {
    rcgen::SanType::URI(s.to_string().try_into().unwrap())
}

fn openssl_csr(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.csr");
    let key = dir.path().join("r.key");
    let o = Command::new("openssl")
        .args(["req", "-new", "-nodes", "-subj", "/CN=w"])
        .args(args)
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::read_to_string(out).unwrap()
}

fn der(pem_text: &str) -> Vec<u8> {
    pem::parse(pem_text).unwrap().into_contents()
}

fn expect_code(r: Result<Vec<String>, tonic::Status>, code: Code, what: &str) -> String {
    match r {
        Ok(_) => panic!("{what}: expected {code:?}, got a certificate"),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {}", s.message());
            s.message().to_string()
        }
    }
}

struct Leaf {
    sans: Vec<String>,
    not_before: i64,
    not_after: i64,
    serial: String,
}

fn parse_leaf(pem_text: &str) -> Leaf {
    let d = der(pem_text);
    let (_, c) = x509_parser::parse_x509_certificate(&d).unwrap();
    let sans = c
        .subject_alternative_name()
        .unwrap()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => format!("URI:{u}"),
                    other => format!("{other:?}"),
                })
                .collect()
        })
        .unwrap_or_default();
    Leaf {
        sans,
        not_before: c.validity().not_before.timestamp(),
        not_after: c.validity().not_after.timestamp(),
        serial: hex::encode(c.raw_serial()),
    }
}

/// Verifies `chain` (leaf, intermediates..., bundle) with rustls-webpki for client and server
/// use, with the bundle as the only anchors.
fn webpki_verify(chain: &[String]) {
    let bundle = chain.last().unwrap();
    let anchors_der: Vec<Vec<u8>> = pem::parse_many(bundle).unwrap().into_iter().map(|p| p.into_contents()).collect();
    let anchors: Vec<_> = anchors_der
        .iter()
        .map(|d| {
            webpki::anchor_from_trusted_cert(&rustls::pki_types::CertificateDer::from(d.as_slice())).unwrap().to_owned()
        })
        .collect();
    let inter: Vec<rustls::pki_types::CertificateDer> =
        chain[1..chain.len() - 1].iter().map(|p| rustls::pki_types::CertificateDer::from(der(p))).collect();
    let leaf_der = rustls::pki_types::CertificateDer::from(der(&chain[0]));
    let leaf = webpki::EndEntityCert::try_from(&leaf_der).unwrap();
    let now = rustls::pki_types::UnixTime::now();
    for usage in [webpki::KeyUsage::client_auth(), webpki::KeyUsage::server_auth()] {
        leaf.verify_for_usage(webpki::ALL_VERIFICATION_ALGS, &anchors, &inter, now, usage, None, None)
            .expect("webpki accepts the chain");
    }
}

fn openssl_text(pem_text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.pem");
    std::fs::write(&p, pem_text).unwrap();
    stdout(&Command::new("openssl").args(["x509", "-noout", "-text", "-in"]).arg(&p).output().unwrap())
}

fn openssl_verify(chain: &[String]) {
    let dir = tempfile::tempdir().unwrap();
    let w = |n: &str, t: String| {
        let p = dir.path().join(n);
        std::fs::write(&p, t).unwrap();
        p
    };
    let leaf = w("leaf.pem", chain[0].clone());
    let inter = w("inter.pem", chain[1..chain.len() - 1].concat());
    let roots = w("roots.pem", chain.last().unwrap().clone());
    let o = Command::new("openssl")
        .args(["verify", "-x509_strict", "-purpose", "sslclient", "-CAfile"])
        .arg(&roots)
        .arg("-untrusted")
        .arg(&inter)
        .arg(&leaf)
        .output()
        .unwrap();
    assert!(o.status.success(), "openssl verify: {}{}", stdout(&o), stderr(&o));
}

fn listed_serials(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .filter(|r| r["action"] == "workload.issued")
        .flat_map(|r| {
            r["details"]["issued"].as_array().unwrap().iter().map(|i| i["serial"].as_str().unwrap().to_string())
        })
        .collect()
}

/// Authenticated refusals (one entry each) and, from the periodic summaries of unauthenticated
/// ones, one entry per code.
fn denials(records: &[Value]) -> Vec<Value> {
    let summarised = records
        .iter()
        .filter(|r| r["action"] == "request.denied.summary")
        .filter_map(|r| r["details"]["by_code"].as_object())
        .flat_map(|codes| codes.keys().map(|c| json!({"code": c})).collect::<Vec<_>>());
    records.iter().filter_map(|r| r["details"]["denied"].as_array()).flatten().cloned().chain(summarised).collect()
}

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
    let cases: Vec<(&str, Box<dyn FnOnce(&mut Value)>)> = vec![
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

    // Key rotation: the cluster publishes a second key; tokens signed with it are accepted
    // without a restart (an unknown kid re-reads the JWKS).
    let rotated = tmp.path().join("rotated.key");
    hsm::generate_key(&hsm::KeyRef::file(&rotated), hsm::KeyAlgorithm::EcdsaP256).unwrap();
    let jwks_path = srv.dir.join("sa-jwks.json");
    let mut jwks: Value = serde_json::from_str(&std::fs::read_to_string(&jwks_path).unwrap()).unwrap();
    jwks["keys"].as_array_mut().unwrap().push(jwk_of(&rotated));
    // A token accepted once (here within the 30 s leeway) is refused once it is past it, even
    // though its verification was cached.
    let nearly = sa_token(&srv, "default", "default", |c| {
        c["exp"] = json!(time::OffsetDateTime::now_utc().unix_timestamp() - 22)
    });
    create(&ch, Call::new(&nearly, plain_csr())).await.expect("within leeway");
    create(&ch, Call::new(&nearly, plain_csr())).await.expect("again, from the cache");
    // The refresh after the earlier unknown kid is rate-limited to one per 10 s.
    tokio::time::sleep(Duration::from_secs(11)).await;
    expect_code(
        create(&ch, Call::new(&nearly, plain_csr())).await,
        Code::Unauthenticated,
        "past the leeway, cached or not",
    );
    std::fs::write(&jwks_path, serde_json::to_vec(&jwks).unwrap()).unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workloads_complete_an_mtls_handshake() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(&tmp.path().join("dev"), &Opts::default());
    srv.wait_ready().await;
    let ch = channel(&srv).await;
    let issue = |ns: &'static str, sa: &'static str| {
        let ch = ch.clone();
        let t = sa_token(&srv, ns, sa, |_| {});
        async move {
            let (c, key) = csr(vec![], &rcgen::PKCS_ECDSA_P256_SHA256);
            (create(&ch, Call::new(&t, c)).await.unwrap(), key)
        }
    };
    let (server_chain, server_key) = issue("shop", "frontend").await;
    let (client_chain, client_key) = issue("shop", "checkout").await;
    let (peer_seen, client_saw) = mtls(&server_chain, server_key, &client_chain, client_key).await;
    assert_eq!(peer_seen, "spiffe://cluster.local/ns/shop/sa/checkout");
    assert_eq!(client_saw, "spiffe://cluster.local/ns/shop/sa/frontend");
}

fn spiffe_of(der: &[u8]) -> String {
    let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
    c.subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .find_map(|n| if let x509_parser::extensions::GeneralName::URI(u) = n { Some(u.to_string()) } else { None })
        .unwrap()
}

/// Checks the chain with webpki against the bundle, and the peer by its SPIFFE ID rather than
/// a host name, as Istio's proxies do.
#[derive(Debug)]
struct SpiffeVerifier(Arc<dyn rustls::client::danger::ServerCertVerifier>);

impl rustls::client::danger::ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, name, ocsp, now) {
            Ok(v) => Ok(v),
            // Workload certificates carry no host names; the chain itself verified.
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName | rustls::CertificateError::NotValidForNameContext { .. },
            )) => {
                assert!(spiffe_of(end_entity).starts_with("spiffe://cluster.local/"));
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            Err(e) => Err(e),
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// One handshake: returns the SPIFFE ID each side saw of the other.
async fn mtls(
    server_chain: &[String],
    server_key: Vec<u8>,
    client_chain: &[String],
    client_key: Vec<u8>,
) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let roots = |chain: &[String]| {
        let mut r = rustls::RootCertStore::empty();
        for p in pem::parse_many(chain.last().unwrap()).unwrap() {
            r.add(p.into_contents().into()).unwrap();
        }
        Arc::new(r)
    };
    let certs = |chain: &[String]| -> Vec<rustls::pki_types::CertificateDer<'static>> {
        chain[..chain.len() - 1].iter().map(|p| der(p).into()).collect()
    };
    let client_verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(server_chain), provider.clone())
            .build()
            .unwrap();
    let server_cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(certs(server_chain), rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.into()))
        .unwrap();
    let webpki_server =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots(client_chain), provider.clone())
            .build()
            .unwrap();
    let client_cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeVerifier(webpki_server)))
        .with_client_auth_cert(certs(client_chain), rustls::pki_types::PrivateKeyDer::Pkcs8(client_key.into()))
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg)).accept(tcp).await.unwrap();
        let peer = spiffe_of(&tls.get_ref().1.peer_certificates().unwrap()[0]);
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.unwrap();
        tls.write_all(b"pong").await.unwrap();
        tls.shutdown().await.unwrap();
        peer
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client_cfg))
        .connect("workload.invalid".try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    let saw = spiffe_of(&tls.get_ref().1.peer_certificates().unwrap()[0]);
    (server.await.unwrap(), saw)
}

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
    let opts = Opts {
        database_url: database_url.clone(),
        env: vec![
            ("CA_SERVER_ISTIO__CLUSTERS__DEV__OVER_MAX".into(), "clamp".into()),
            ("CA_SERVER_ISTIO__CLUSTERS__DEV__MAX_TTL".into(), "400d".into()),
        ],
        ..Opts::default()
    };
    let srv = Server::start(&dir, &opts);
    srv.wait_ready().await;
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
    let opts = Opts {
        env: vec![
            (
                "CA_SERVER_ISTIO__CLUSTERS__EDGE__SA_ISSUER".into(),
                "https://kubernetes.default.svc.cluster.local".into(),
            ),
            ("CA_SERVER_ISTIO__CLUSTERS__EDGE__JWKS_FILE".into(), "sa-jwks.json".into()),
        ],
        ..Opts::default()
    };
    let srv = Server::start(&dir, &opts);
    srv.wait_ready().await;
    hsm::generate_key(&hsm::KeyRef::file(&key), hsm::KeyAlgorithm::EcdsaP256).unwrap();
    let body = json!({"name": "edge", "environment": "dev", "trust_domain": "cluster.local", "mode": "external-ca",
                      "key": format!("file:{}", key.display())});
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

    let opts = Opts {
        env: vec![
            ("CA_SERVER_ISTIO__CLUSTERS__DISC__SA_ISSUER".into(), issuer.clone()),
            (
                "CA_SERVER_ISTIO__CLUSTERS__DISC__OIDC_DISCOVERY_URL".into(),
                format!("{base}/.well-known/openid-configuration"),
            ),
        ],
        ..Opts::default()
    };
    let srv = Server::start(&dir, &opts);
    srv.wait_ready().await;
    let key = tmp.path().join("disc-cluster.key");
    hsm::generate_key(&hsm::KeyRef::file(&key), hsm::KeyAlgorithm::EcdsaP256).unwrap();
    let (s, r) = srv
        .call(
            "POST",
            "/v1/clusters",
            Some(&srv.token("admin")),
            Some(json!({"name": "disc", "environment": "dev", "trust_domain": "cluster.local", "mode": "external-ca",
                        "key": format!("file:{}", key.display())})),
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
