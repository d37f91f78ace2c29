//! What unauthenticated callers can cost: refusals summarised instead of written one by one,
//! a per-address quota, capped strings and metric labels, and no panic without an answer.
//! Against the real `ca-server --dev` (REST and gRPC) where it can show it; in process for a
//! handler that panics, which the real server has none of.
#![allow(clippy::disallowed_methods)] // clients and workloads of the test bring throwaway keys

#[path = "server_support/mod.rs"]
mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ca_server::proto::IstioCertificateRequest;
use ca_server::proto::istio_certificate_service_client::IstioCertificateServiceClient;
use serde_json::{Value, json};
use support::*;
use tonic::Code;

fn summaries(records: &[Value]) -> Vec<&Value> {
    records.iter().filter(|r| r["action"] == "request.denied.summary").collect()
}

fn summarised(records: &[Value], key: &str, name: &str) -> u64 {
    summaries(records).iter().filter_map(|r| r["details"][key][name].as_u64()).sum()
}

fn total_summarised(records: &[Value]) -> u64 {
    summaries(records).iter().filter_map(|r| r["details"]["total"].as_u64()).sum()
}

/// Bytes of the SQLite database with its write-ahead log.
fn db_bytes(srv: &Server) -> u64 {
    let url = srv.database_url();
    let path = Path::new(url.strip_prefix("sqlite://").unwrap());
    let name = path.file_name().unwrap().to_str().unwrap().to_string();
    std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(&name)))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

/// One raw HTTP/1.1 request over TLS, so that the request line can carry bytes a URL library
/// would percent-encode. Returns the status line (empty when the server closed without one).
async fn raw_request(srv: &Server, request_line: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for p in pem::parse_many(std::fs::read(srv.root()).unwrap()).unwrap() {
        roots.add(rustls::pki_types::CertificateDer::from(p.into_contents())).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let addr = srv.url.strip_prefix("https://").unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let mut req = request_line.to_vec();
    req.extend_from_slice(b"\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.write_all(&req).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), tls.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).lines().next().unwrap_or("").to_string()
}

async fn grpc_create(
    ch: &tonic::transport::Channel,
    token: Option<&str>,
    csr: String,
) -> Result<Vec<String>, tonic::Status> {
    let mut req = tonic::Request::new(IstioCertificateRequest { csr, validity_duration: 0, metadata: None });
    if let Some(t) = token {
        req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req.metadata_mut().insert("clusterid", "dev".parse().unwrap());
    IstioCertificateServiceClient::new(ch.clone()).create_certificate(req).await.map(|r| r.into_inner().cert_chain)
}

fn workload_csr() -> String {
    let kp = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::default().serialize_request(&kp).unwrap().pem().unwrap()
}

fn terminate(srv: &mut Server) {
    let ok = std::process::Command::new("kill").args(["-TERM", &srv.child.id().to_string()]).status().unwrap();
    assert!(ok.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while srv.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "ca-server did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Many unauthenticated refusals (30 KB paths, bogus tokens, no token; REST and gRPC) cost a
/// bounded number of audit records and bytes, are all counted in the summaries, and the
/// address is then limited (429 / RESOURCE_EXHAUSTED), while authenticated callers are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn anonymous_refusals_are_summarised_and_rate_limited() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(
        &tmp.path().join("dev"),
        &Opts {
            env: vec![
                ("CA_SERVER_RATE_LIMIT__ANONYMOUS_BURST".into(), "400".into()),
                ("CA_SERVER_RATE_LIMIT__ANONYMOUS_PER_MINUTE".into(), "1".into()),
            ],
            ..Default::default()
        },
    );
    srv.wait_ready().await;
    let started = Instant::now();
    let admin = srv.token("admin");
    let auditor = srv.token("auditor");
    let before = audit_all(&srv).await;
    let denied_before = before.iter().filter(|r| r["action"] == "request.denied").count();
    let bytes_before = db_bytes(&srv);
    let mut anonymous = 0u64;

    // 200 anonymous refusals with 30 KB paths: on the old code, 200 records of 30 KB each.
    let long = format!("/v1/clusters/{}/trust-bundle", "a".repeat(30_000));
    for _ in 0..200 {
        let r = srv.client.get(format!("{}{long}", srv.url)).send().await.unwrap();
        assert_eq!(r.status(), 404);
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        anonymous += 1;
    }
    // Byte 256 of this path falls inside 'é': it used to panic the audit middleware.
    let mut line = b"GET /".to_vec();
    line.extend_from_slice("a".repeat(254).as_bytes());
    line.extend_from_slice("é HTTP/1.1".as_bytes());
    assert_eq!(raw_request(&srv, &line).await, "HTTP/1.1 404 Not Found");
    anonymous += 1;
    let reg = json!({"name": "c9", "environment": "dev", "trust_domain": "cluster.local"});
    for _ in 0..5 {
        let (s, v) = srv.call("POST", "/v1/clusters", Some("not.a.jwt"), Some(reg.clone())).await;
        assert_eq!((s, v["code"].as_str()), (401, Some("invalid-token")), "{v}");
        anonymous += 1;
    }
    let ch = grpc_channel(&srv, "").await;
    for _ in 0..20 {
        let e = grpc_create(&ch, Some("not.a.jwt"), workload_csr()).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        anonymous += 1;
    }
    for _ in 0..3 {
        let e = grpc_create(&ch, None, workload_csr()).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        anonymous += 1;
    }
    // Authenticated refusals stay records of their own: a role refusal, and a body refused
    // after the operator's token was checked.
    let (s, v) = srv.call("POST", "/v1/clusters", Some(&auditor), Some(reg.clone())).await;
    assert_eq!((s, v["code"].as_str()), (403, Some("forbidden")), "{v}");
    let r = srv
        .client
        .post(format!("{}/v1/clusters", srv.url))
        .bearer_auth(&admin)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // Use up the quota: 429 with a stable code and Retry-After.
    let mut limited = None;
    for _ in 0..1000 {
        let r = srv.client.get(format!("{}/v1/clusters/nope/trust-bundle", srv.url)).send().await.unwrap();
        anonymous += 1;
        if r.status() == 429 {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status(), 404);
    }
    let r = limited.expect("the anonymous quota ran out");
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "rate-limited", "{body}");
    // A credential that fails gets 429 too; so do gRPC callers from the address.
    let (s, v) = srv.call("POST", "/v1/clusters", Some("not.a.jwt"), Some(reg.clone())).await;
    assert_eq!((s, v["code"].as_str()), (429, Some("rate-limited")), "{v}");
    anonymous += 1;
    let e = grpc_create(&ch, None, workload_csr()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    anonymous += 1;
    let e = grpc_create(&ch, Some("not.a.jwt"), workload_csr()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    anonymous += 1;
    // Authenticated callers are not limited: operators, and workloads with a valid token.
    let (s, _) = srv.call("GET", "/v1/clusters", Some(&admin), None).await;
    assert_eq!(s, 200);
    let (s, v) = srv.call("POST", "/v1/clusters", Some(&auditor), Some(reg.clone())).await;
    assert_eq!((s, v["code"].as_str()), (403, Some("forbidden")), "{v}");
    let sa = sa_token_with(&srv, &srv.dir.join("sa-signing.key"), "default", "default", |_| {});
    let chain = grpc_create(&ch, Some(&sa), workload_csr()).await.expect("a valid workload is served");
    assert!(chain.len() >= 2);
    let (s, _) = srv.call("GET", "/readyz", None, None).await;
    assert_eq!(s, 200, "probes do not draw on the quota");

    // Every anonymous refusal is counted in the summaries (written every second here).
    let mut records = Vec::new();
    for _ in 0..100 {
        records = audit_all(&srv).await;
        if total_summarised(&records) >= anonymous {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed().as_secs();
    assert_eq!(total_summarised(&records), anonymous);
    assert_eq!(summarised(&records, "by_source", "127.0.0.1"), anonymous);
    assert!(summarised(&records, "by_code", "not-found") >= 201);
    assert_eq!(summarised(&records, "by_code", "invalid-token"), 25);
    assert_eq!(summarised(&records, "by_code", "unauthenticated"), 3);
    assert_eq!(summarised(&records, "by_code", "rate-limited"), 4);
    assert_eq!(summarised(&records, "by_api", "grpc"), 25);
    for s in summaries(&records) {
        let samples = s["details"]["samples"].as_array().unwrap();
        assert!(samples.len() <= 5);
        assert!(s.to_string().len() < 8_000, "a summary carries capped samples only: {s}");
    }
    // Bounded records and bytes: one summary per second at most, and the three authenticated
    // refusals as records of their own.
    let new = &records[before.len()..];
    assert!(summaries(new).len() as u64 <= elapsed + 2, "{} summaries in {elapsed} s", summaries(new).len());
    let denied: Vec<&Value> = new.iter().filter(|r| r["action"] == "request.denied").collect();
    assert_eq!(denied.len(), 3, "{denied:#?}");
    assert_eq!(records.iter().filter(|r| r["action"] == "request.denied").count(), denied_before + 3);
    assert!(denied.iter().all(|r| r["actor"].as_str().unwrap().starts_with("operator:")), "{denied:#?}");
    assert!(new.iter().all(|r| r.to_string().len() < 8_000));
    let grown = db_bytes(&srv).saturating_sub(bytes_before);
    assert!(grown < 2 * 1024 * 1024, "the database grew by {grown} bytes");

    let m = srv.metrics_text().await;
    assert!(m.contains("ca_anonymous_denials_total{api=\"rest\",code=\"not-found\"}"), "{m}");
    assert!(m.contains("ca_anonymous_denials_total{api=\"grpc\",code=\"invalid-token\"} 20"), "{m}");
    let o = srv.audit_verify(&srv.database_url());
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
}

/// Invented methods, huge paths and request ids never become metric series or long log
/// fields, and the summary of refusals still pending is written at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn labels_and_logs_are_bounded_and_shutdown_writes_the_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let mut srv = Server::start(
        &tmp.path().join("dev"),
        &Opts {
            env: vec![
                ("CA_SERVER_AUDIT__DENIAL_SUMMARY_INTERVAL".into(), "1h".into()),
                ("CA_SERVER_RATE_LIMIT__ANONYMOUS_BURST".into(), "10000".into()),
            ],
            ..Default::default()
        },
    );
    srv.wait_ready().await;
    let db = srv.database_url();
    let send = |method: String, path: String| {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        srv.client.request(m, format!("{}{path}", srv.url)).send()
    };
    // One of each kind first, so that the series they belong to exist.
    let mut sent = 0u64;
    for m in ["WARMUP", "GET", "POST"] {
        let _ = send(m.into(), "/nowhere".into()).await.unwrap();
        sent += 1;
    }
    let baseline = srv.metrics_text().await.len();
    for i in 0..300 {
        let method = format!("M{i}{}", "X".repeat(2000));
        let path = format!("/r{i}/{}", "p".repeat(2000 + i));
        let r = send(method, path).await.unwrap();
        assert!(r.status().is_client_error(), "{}", r.status());
        sent += 1;
    }
    let after = srv.metrics_text().await.len();
    // Counts change, background gauges may appear; a new series per method would be 40 KB.
    assert!(after < baseline + 4_000, "/metrics grew from {baseline} to {after} bytes");

    // A huge request id and path stay short in the log.
    let id = format!("rid-{}", "z".repeat(10_000));
    let r = srv
        .client
        .get(format!("{}/v1/clusters/{}/trust-bundle", srv.url, "q".repeat(20_000)))
        .header("x-request-id", &id)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    sent += 1;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = std::fs::read_to_string(&srv.stderr_log).unwrap();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("rid-zzz")).collect();
    assert!(!lines.is_empty(), "no log line for the request");
    for l in &lines {
        assert!(l.len() < 2_000, "log line of {} bytes", l.len());
        let v: Value = serde_json::from_str(l).unwrap();
        assert!(v["span"]["request_id"].as_str().unwrap().len() <= 70, "{l}");
        assert!(v["span"]["path"].as_str().unwrap().len() <= 260, "{l}");
    }

    // Nothing summarised yet (the interval is an hour); SIGTERM writes it.
    let records = audit_all(&srv).await;
    assert_eq!(summaries(&records).len(), 0);
    terminate(&mut srv);
    let store = ca_store::Store::connect(&db, false).await.unwrap();
    let records = store.audit_after(0, 100_000).await.unwrap();
    store.close().await;
    let last = records.iter().rev().find(|r| r.action == "request.denied.summary").expect("written at shutdown");
    let details: Value = serde_json::from_str(&last.details).unwrap();
    assert_eq!(details["total"], sent, "{details}");
    assert!(records.iter().all(|r| r.action != "request.denied"), "anonymous refusals are not single records");
    let o = srv.audit_verify(&db);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
}

/// The server's state in process, on a fresh SQLite database, with operator tokens signed by
/// `oidc` (no issuers: the routes under test need none).
async fn in_process_state(dir: &Path, oidc: &rcgen::KeyPair) -> ca_server::service::state::AppState {
    use ca_server::service::issuer::Issuers;
    use ca_server::service::state::{AppState, Inner};
    let cfg: ca_server::config::Config = toml::from_str(&format!(
        r#"
listen = "127.0.0.1:0"
issuers = []
[tls]
cert = "unused.pem"
key = "file:unused.key"
client_ca = []
[database]
url = "sqlite://{}/ca.db"
[auth]
issuer = "https://test"
audience = "ca-server"
jwks_file = "unused.json"
[audit]
key = "file:unused.key"
"#,
        dir.display()
    ))
    .unwrap();
    let raw = oidc.public_key_raw();
    let b64 = |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, b);
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_value(json!({"keys": [{"kty": "EC", "crv": "P-256",
        "x": b64(&raw[1..33]), "y": b64(&raw[33..65]), "kid": "k1", "alg": "ES256", "use": "sig"}]}))
    .unwrap();
    let store = ca_store::Store::connect(&cfg.database.url, true).await.unwrap();
    let metrics = Arc::new(ca_server::metrics::Metrics::new());
    AppState::new(Inner {
        edge: ca_server::edge::Edge::new(&cfg, metrics.clone()),
        auth: ca_server::auth::Auth::new(cfg.auth.clone(), jwks),
        istio: ca_server::service::istio::Istio::new(None, store.clone(), metrics.clone()).unwrap(),
        config: cfg,
        store,
        issuers: Issuers::new(Default::default()),
        metrics,
        instance: "00000000-test".into(),
        audit_signer: Arc::new(std::sync::RwLock::new(None)),
        client_roots: vec![],
    })
}

/// A handler that panics, behind the server's own middleware stack: 500 problem+json, the
/// panic audited when the caller was an authenticated operator and counted when anonymous.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_answers_500_problem_json() {
    use axum::routing::get;
    use tower::ServiceExt;
    let tmp = tempfile::tempdir().unwrap();
    let oidc = rcgen::KeyPair::generate().unwrap();
    let state = in_process_state(tmp.path(), &oidc).await;
    // Authenticated when a valid token is sent, anonymous otherwise; panics either way.
    async fn boom(_op: Result<ca_server::auth::Operator, ca_server::error::ServiceError>) -> &'static str {
        panic!("deliberately")
    }
    let routes = axum::Router::new().route("/boom", get(boom));
    let app = ca_server::http::with_layers(routes, state.clone());
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = Some("k1".into());
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let token = jsonwebtoken::encode(
        &h,
        &json!({"iss": "https://test", "aud": "ca-server", "sub": "alice", "roles": ["admin"], "exp": now + 600}),
        &jsonwebtoken::EncodingKey::from_ec_pem(oidc.serialize_pem().as_bytes()).unwrap(),
    )
    .unwrap();
    let conn = ca_server::tls::ConnInfo { remote: "192.0.2.7:4242".parse().unwrap(), peer_cert: None };
    for bearer in [Some(token.as_str()), None] {
        let mut req = axum::http::Request::get("/boom");
        if let Some(t) = bearer {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let mut req = req.body(axum::body::Body::empty()).unwrap();
        req.extensions_mut().insert(conn.clone());
        let resp = app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 500);
        assert_eq!(resp.headers()["content-type"], "application/problem+json");
        let body = axum::body::to_bytes(resp.into_body(), 64 * 1024).await.unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["code"], "internal", "{v}");
        assert!(!v.to_string().contains("deliberately"), "the panic message stays in the log: {v}");
    }
    let records = state.store.audit_after(0, 100).await.unwrap();
    let failed: Vec<_> = records.iter().filter(|r| r.action == "request.failed").collect();
    assert_eq!(failed.len(), 1, "{records:#?}");
    assert_eq!(failed[0].actor, "operator:alice");
    let summary = state.edge.take_summary().expect("the anonymous panic is counted");
    assert_eq!(summary.details["by_code"]["internal"], 1, "{:?}", summary.details);
}

/// A gRPC handler that panics, behind the layer `grpc::serve` puts in front of the service:
/// the caller gets INTERNAL, not a reset stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_grpc_handler_answers_internal() {
    use ca_server::proto::istio_certificate_service_server::{IstioCertificateService, IstioCertificateServiceServer};
    struct Panicking;
    #[tonic::async_trait]
    impl IstioCertificateService for Panicking {
        async fn create_certificate(
            &self,
            _: tonic::Request<IstioCertificateRequest>,
        ) -> Result<tonic::Response<ca_server::proto::IstioCertificateResponse>, tonic::Status> {
            panic!("deliberately")
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(tower_http::catch_panic::CatchPanicLayer::custom(ca_server::edge::grpc_panic_response))
            .add_service(IstioCertificateServiceServer::new(Panicking))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let req = tonic::Request::new(IstioCertificateRequest { csr: String::new(), validity_duration: 0, metadata: None });
    let e = IstioCertificateServiceClient::new(ch).create_certificate(req).await.unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    // Our answer, not a stream reset (which tonic would also report as INTERNAL).
    assert_eq!(e.message(), "internal: internal error; see the server log", "{e:?}");
}
