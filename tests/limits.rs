//! Hardening of ca-server end to end, on the real binary (`ca-server --dev`) over real TLS on
//! loopback: a second factor for operators' changes, reports in the audit trail, metrics on a
//! listener of their own, connection timeouts on the REST and gRPC listeners, and the gRPC
//! deadline and concurrency limits.
#![allow(clippy::disallowed_methods)] // clients and workloads of the test bring throwaway keys

#[path = "server_support/mod.rs"]
mod support;

mod proto {
    tonic::include_proto!("istio.v1.auth");
}

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::IstioCertificateRequest;
use proto::istio_certificate_service_client::IstioCertificateServiceClient;
use serde_json::{Value, json};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

async fn audit(srv: &Server) -> Vec<Value> {
    let (s, v) = srv.call("GET", "/v1/audit?after=0&limit=1000", Some(&srv.token("auditor")), None).await;
    assert_eq!(s, 200, "{v}");
    v.as_array().unwrap().clone()
}

/// An operator token from the dev OIDC issuer's key, with `extra` claims (acr, amr) added.
fn operator_token(srv: &Server, subject: &str, roles: &[&str], extra: Value) -> String {
    let key = srv.dir.join("dev-oidc.key");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut claims = json!({"iss": ca_server::dev::ISSUER, "aud": ca_server::dev::AUDIENCE, "sub": subject,
        "roles": roles, "iat": now, "nbf": now - 60, "exp": now + 3600});
    if let (Some(c), Value::Object(e)) = (claims.as_object_mut(), extra) {
        c.extend(e);
    }
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid_of(&key));
    let pem_text = std::fs::read_to_string(&key).unwrap();
    jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_ec_pem(pem_text.as_bytes()).unwrap())
        .unwrap()
}

fn register_body(name: &str) -> Value {
    json!({"name": name, "environment": "dev", "trust_domain": "cluster.local"})
}

/// `--dev` requires a second factor; a token without one may read but not change anything
/// nor decide requests, and each refusal is an audited, authenticated denial.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_and_approvals_need_a_second_factor() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(&tmp.path().join("dev"), &Opts::default());
    srv.wait_ready().await;
    let plain = operator_token(&srv, "one-factor", &["admin"], json!({"acr": "1", "amr": ["pwd"]}));
    let bare = operator_token(&srv, "no-claims", &["operator"], json!({}));
    let by_acr = operator_token(&srv, "acr-holder", &["operator"], json!({"acr": "mfa"}));
    let by_amr = operator_token(&srv, "amr-holder", &["admin"], json!({"amr": ["pwd", "hwk"]}));

    // Reads are not affected.
    let (s, v) = srv.call("GET", "/v1/clusters", Some(&plain), None).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = srv.call("GET", "/v1/requests", Some(&bare), None).await;
    assert_eq!(s, 200, "{v}");

    // A change without a second factor is refused and recorded against the operator.
    let (s, v) = srv.call("POST", "/v1/clusters", Some(&plain), Some(register_body("mfa-1"))).await;
    assert_eq!((s, v["code"].as_str()), (403, Some("mfa-required")), "{v}");
    let (s, _) = srv.call("GET", "/v1/clusters/mfa-1", Some(&srv.token("auditor")), None).await;
    assert_eq!(s, 404, "nothing was registered");
    let (s, v) =
        srv.call("POST", "/v1/certificates/01/revoke", Some(&bare), Some(json!({"reason": "key-compromise"}))).await;
    assert_eq!((s, v["code"].as_str()), (403, Some("mfa-required")), "{v}");

    // An approval (and a rejection) without one likewise; the request stays pending.
    let (s, reg) = srv.call("POST", "/v1/clusters", Some(&srv.token("admin")), Some(register_body("mfa-2"))).await;
    assert_eq!(s, 202, "{reg}");
    let id = reg["request_id"].as_str().unwrap();
    let (s, v) = srv.call("POST", &format!("/v1/requests/{id}/approve"), Some(&bare), None).await;
    assert_eq!((s, v["code"].as_str()), (403, Some("mfa-required")), "{v}");
    let (s, v) = srv.call("POST", &format!("/v1/requests/{id}/reject"), Some(&bare), None).await;
    assert_eq!((s, v["code"].as_str()), (403, Some("mfa-required")), "{v}");
    let (_, pending) = srv.call("GET", "/v1/requests?status=pending", Some(&bare), None).await;
    assert!(pending.as_array().unwrap().iter().any(|r| r["id"] == id), "{pending}");

    let records = audit(&srv).await;
    let refusals: Vec<&Value> =
        records.iter().filter(|r| r["action"] == "request.denied" && r["details"]["code"] == "mfa-required").collect();
    let actors: Vec<&str> = refusals.iter().map(|r| r["actor"].as_str().unwrap()).collect();
    assert_eq!(
        actors,
        ["operator:one-factor", "operator:no-claims", "operator:no-claims", "operator:no-claims"],
        "{records:?}"
    );
    assert_eq!(refusals[0]["subject"], "POST /v1/clusters");
    assert_eq!(refusals[0]["details"]["status"], 403);

    // An accepted acr value passes, and so does an accepted amr method.
    let (s, v) = srv.call("POST", &format!("/v1/requests/{id}/approve"), Some(&by_acr), None).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("approved")), "{v}");
    let (s, v) = srv.call("POST", "/v1/clusters", Some(&by_amr), Some(register_body("mfa-3"))).await;
    assert_eq!(s, 202, "{v}");
}

fn fingerprints(path: &Path) -> Vec<String> {
    ca_core::cert::load_certs(path).unwrap().iter().map(|c| c.fingerprint()).collect()
}

async fn report(srv: &Server, cluster: &str, state: &Path, body: &Value) {
    let cert = pem::parse(std::fs::read(state.join("ca-cert.pem")).unwrap()).unwrap().into_contents();
    let key = pem::parse(std::fs::read(state.join("ca-key.pem")).unwrap()).unwrap().into_contents();
    let c = client_der(&srv.root(), Some((&cert, &key)));
    let r = c.post(format!("{}/v1/clusters/{cluster}/report", srv.url)).json(body).send().await.unwrap();
    let status = r.status();
    assert_eq!(status, 200, "{}", r.text().await.unwrap());
}

fn report_records(records: &[Value]) -> Vec<Value> {
    records.iter().filter(|r| r["action"] == "cluster.report").cloned().collect()
}

/// A report changes what the rotation gates read: the first one and every change are audited
/// (by the cluster, with what it reported); a repeat is neither written nor recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reports_are_audited_when_they_change() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(&tmp.path().join("dev"), &Opts::default());
    srv.wait_ready().await;
    let token = srv.register_approved("rep-1").await;
    let state = tmp.path().join("cacerts");
    let out = srv.renew("rep-1", &state, Some(&token), false);
    assert!(out.status.success(), "{}", stderr(&out));
    let before = report_records(&audit(&srv).await).len();

    let ca = ca_core::cert::load_cert(&state.join("ca-cert.pem")).unwrap();
    let own = ca.fingerprint();
    let mut chain = vec![own.clone()];
    chain.extend(fingerprints(&state.join("cert-chain.pem")).into_iter().filter(|f| *f != own));
    let bundle = fingerprints(&state.join("root-cert.pem"));
    let first = json!({"bundle": bundle, "chain": chain, "intermediate_serial": ca.serial});
    report(&srv, "rep-1", &state, &first).await;
    let records = report_records(&audit(&srv).await);
    assert_eq!(records.len(), before + 1, "{records:?}");
    let last = records.last().unwrap();
    assert_eq!((last["actor"].as_str(), last["subject"].as_str()), (Some("cluster:rep-1"), Some("rep-1")));
    assert_eq!(last["details"]["chain"], json!(chain));
    assert_eq!(last["details"]["intermediate_serial"], json!(ca.serial));

    report(&srv, "rep-1", &state, &first).await;
    report(&srv, "rep-1", &state, &first).await;
    assert_eq!(report_records(&audit(&srv).await).len(), before + 1, "repeats are not recorded");

    let mut changed = first.clone();
    changed["bundle"].as_array_mut().unwrap().push(json!("ab".repeat(32)));
    report(&srv, "rep-1", &state, &changed).await;
    let records = report_records(&audit(&srv).await);
    assert_eq!(records.len(), before + 2, "{records:?}");
    assert_eq!(records.last().unwrap()["details"]["bundle"].as_array().unwrap().len(), bundle.len() + 1);
    let o = srv.audit_verify(&srv.database_url());
    assert!(o.status.success(), "{}", stderr(&o));
}

/// `/metrics` is served only on its own (loopback) listener, which dev.env names; an address
/// beyond loopback must be asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_have_a_listener_of_their_own() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let srv = Server::start(&dir, &Opts::default());
    srv.wait_ready().await;
    let (s, v) = srv.call("GET", "/metrics", None, None).await;
    assert_eq!((s, v["code"].as_str()), (404, Some("not-found")), "{v}");
    let url = srv.metrics.clone().expect("a metrics listener");
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    assert_eq!(srv.env.get("CA_METRICS_URL"), Some(&url));
    let m = srv.metrics_text().await;
    assert!(m.contains("# TYPE ca_issuances counter") && m.contains("ca_hsm_up"), "{m}");
    let other = reqwest::get(format!("{url}/v1/issuers")).await.unwrap();
    assert_eq!(other.status(), 404, "the metrics listener serves nothing else");

    // Beyond loopback only when asked for.
    let o = Command::new(ca_server_bin())
        .args(["--dev", "--dev-dir"])
        .arg(&dir)
        .args(["--listen", "127.0.0.1:0"])
        .env("CA_SERVER_ISTIO__LISTEN", "127.0.0.1:0")
        .env("CA_SERVER_METRICS__LISTEN", "0.0.0.0:0")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("metrics.listen") && err.contains("metrics.allow_remote"), "{err}");
    drop(srv);
    let opts = Opts {
        env: vec![
            ("CA_SERVER_METRICS__LISTEN".into(), "0.0.0.0:0".into()),
            ("CA_SERVER_METRICS__ALLOW_REMOTE".into(), "true".into()),
        ],
        ..Opts::default()
    };
    let srv = Server::start(&dir, &opts);
    let url = srv.metrics.clone().unwrap();
    let port = url.strip_prefix("http://0.0.0.0:").unwrap_or_else(|| panic!("{url}"));
    let r = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.unwrap();
    assert_eq!(r.status(), 200);
}

// ---- connection timeouts ------------------------------------------------------------------

/// A TLS connection to `addr` (verified against the dev root as `localhost`) offering `alpn`.
async fn tls_connect(
    srv: &Server,
    addr: &str,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for p in pem::parse_many(std::fs::read(srv.root()).unwrap()).unwrap() {
        roots.add(rustls::pki_types::CertificateDer::from(p.into_contents())).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.expect("TLS handshake")
}

/// Reads (and discards) until the server closes the connection; fails if it is still open
/// after `limit`.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, limit: Duration, what: &str) -> Vec<u8> {
    let mut seen = Vec::new();
    let read_all = async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    };
    assert!(
        tokio::time::timeout(limit, read_all).await.is_ok(),
        "{what}: the connection is still open after {limit:?}"
    );
    seen
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// `GET /healthz` as an HTTP/2 HEADERS frame (HPACK: static-table names, literal values).
fn h2_get_healthz(stream: u32) -> Vec<u8> {
    let mut block = vec![0x82, 0x87, 0x04, 8];
    block.extend_from_slice(b"/healthz");
    block.extend_from_slice(&[0x01, 9]);
    block.extend_from_slice(b"localhost");
    h2_frame(1, 0x05, stream, &block)
}

/// Reads HTTP/2 frames, acknowledging SETTINGS and PINGs as a live client does, until a frame
/// of `want` type arrives (returns its stream id) or the connection ends (returns None).
async fn h2_until<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S, want: u8) -> Option<u32> {
    loop {
        let mut head = [0u8; 9];
        s.read_exact(&mut head).await.ok()?;
        let len = (head[0] as usize) << 16 | (head[1] as usize) << 8 | head[2] as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5] & 0x7f, head[6], head[7], head[8]]);
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await.ok()?;
        match kind {
            4 if flags & 1 == 0 => s.write_all(&h2_frame(4, 1, 0, &[])).await.ok()?,
            6 if flags & 1 == 0 => s.write_all(&h2_frame(6, 1, 0, &payload)).await.ok()?,
            _ => {}
        }
        if kind == want {
            return Some(stream);
        }
    }
}

fn short_timeouts() -> Opts {
    Opts {
        env: vec![
            ("CA_SERVER_LIMITS__HANDSHAKE_TIMEOUT".into(), "2s".into()),
            ("CA_SERVER_LIMITS__IDLE_TIMEOUT".into(), "3s".into()),
        ],
        ..Opts::default()
    }
}

/// On the REST listener: a client that says nothing after the handshake, sends only the
/// HTTP/2 preface or only an HTTP/1 request line is disconnected; a client that keeps making
/// requests (HTTP/1 keep-alive or HTTP/2) is not, until it stops for the idle timeout, and an
/// idle HTTP/2 client that still answers pings gets a GOAWAY.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rest_connections_time_out_unless_used() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(&tmp.path().join("dev"), &short_timeouts());
    srv.wait_ready().await;
    let addr = srv.url.strip_prefix("https://").unwrap().to_string();
    let limit = Duration::from_secs(20);

    let mut silent = tls_connect(&srv, &addr, &[b"h2", b"http/1.1"]).await;
    closed_within(&mut silent, limit, "silent after the handshake").await;

    let mut preface = tls_connect(&srv, &addr, &[b"h2"]).await;
    preface.write_all(H2_PREFACE).await.unwrap();
    preface.write_all(&h2_frame(4, 0, 0, &[])).await.unwrap();
    closed_within(&mut preface, limit, "HTTP/2 preface only").await;

    let mut line = tls_connect(&srv, &addr, &[b"http/1.1"]).await;
    line.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    closed_within(&mut line, limit, "HTTP/1 request line only").await;

    // HTTP/1 keep-alive: a request a second for three idle timeouts, all on one connection.
    let mut h1 = tls_connect(&srv, &addr, &[b"http/1.1"]).await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(9) {
        h1.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
        let mut text = String::new();
        while !text.ends_with("\r\n\r\nok") {
            let mut buf = vec![0u8; 4096];
            let n = tokio::time::timeout(limit, h1.read(&mut buf)).await.expect("an answer").unwrap();
            assert!(n > 0, "closed while in use after {:?}: {text:?}", start.elapsed());
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    closed_within(&mut h1, limit, "HTTP/1 after its last request").await;

    // HTTP/2 likewise, and an idle client is told to go away (GOAWAY) rather than cut.
    // The API offers no ALPN: HTTP/2 is spoken with prior knowledge, as the auto builder detects.
    let mut h2 = tls_connect(&srv, &addr, &[]).await;
    h2.write_all(H2_PREFACE).await.unwrap();
    h2.write_all(&h2_frame(4, 0, 0, &[])).await.unwrap();
    let start = Instant::now();
    let mut stream = 1;
    while start.elapsed() < Duration::from_secs(9) {
        h2.write_all(&h2_get_healthz(stream)).await.unwrap();
        let answered = tokio::time::timeout(limit, h2_until(&mut h2, 1)).await.expect("an answer");
        assert_eq!(answered, Some(stream), "HEADERS of the response to stream {stream}");
        stream += 2;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let goaway = tokio::time::timeout(limit, h2_until(&mut h2, 7)).await.expect("closed within the limit");
    assert_eq!(goaway, Some(0), "a GOAWAY after the idle timeout");
    closed_within(&mut h2, limit, "HTTP/2 after GOAWAY").await;
}

/// The gRPC listener follows the same rules for a silent client and a bare HTTP/2 preface.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_connections_time_out_unless_used() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(&tmp.path().join("dev"), &short_timeouts());
    srv.wait_ready().await;
    let addr = srv.grpc.clone().unwrap();
    let limit = Duration::from_secs(20);
    let mut silent = tls_connect(&srv, &addr, &[b"h2"]).await;
    closed_within(&mut silent, limit, "gRPC: silent after the handshake").await;
    let mut preface = tls_connect(&srv, &addr, &[b"h2"]).await;
    preface.write_all(H2_PREFACE).await.unwrap();
    preface.write_all(&h2_frame(4, 0, 0, &[])).await.unwrap();
    closed_within(&mut preface, limit, "gRPC: HTTP/2 preface only").await;
    // And a client in use keeps working.
    let ch = grpc_channel(&srv, "").await;
    let t = sa_token_with(&srv, &srv.dir.join("sa-signing.key"), "default", "default", |_| {});
    create(&ch, &t).await.expect("a certificate");
}

// ---- gRPC deadline and concurrency --------------------------------------------------------

async fn create(ch: &tonic::transport::Channel, token: &str) -> Result<(), tonic::Status> {
    let kp = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default().serialize_request(&kp).unwrap().pem().unwrap();
    let mut req = tonic::Request::new(IstioCertificateRequest { csr, validity_duration: 0, metadata: None });
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    req.metadata_mut().insert("clusterid", "dev".parse().unwrap());
    IstioCertificateServiceClient::new(ch.clone()).create_certificate(req).await.map(|_| ())
}

fn code_of(r: Result<(), tonic::Status>, what: &str) -> Code {
    match r {
        Ok(()) => panic!("{what}: succeeded"),
        Err(s) => {
            eprintln!("{what}: {:?} {}", s.code(), s.message());
            s.code()
        }
    }
}

/// With the dev cluster's key hanging (tests/fault-hsm): a request in flight longer than
/// `istio.request_timeout` gets DEADLINE_EXCEEDED; while requests hang, one more on the same
/// connection than `max_concurrent_requests_per_connection`, or in all than
/// `max_concurrent_requests`, is refused with RESOURCE_EXHAUSTED at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_requests_have_a_deadline_and_a_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let shim = build_fault_shim(tmp.path());
    let dir = tmp.path().join("dev");
    let mut first = Server::start(&dir, &Opts::default());
    first.wait_ready().await;
    let db = first.database_url();
    first.kill();
    let real = hsm::softhsm::find_module().expect("SoftHSM2 is installed (scripts/test installs it)");
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
    let srv = Server::start(
        &tmp.path().join("replica"),
        &Opts {
            config_of: Some(dir.clone()),
            env: vec![
                ("PKI_FAULT_TARGET".into(), real.display().to_string()),
                ("PKI_FAULT_FILE".into(), fault.display().to_string()),
                // The HSM's own bound is far away: the request deadline is what answers.
                ("CA_SERVER_POLICY__HSM_TIMEOUT".into(), "120s".into()),
                ("CA_SERVER_ISTIO__REQUEST_TIMEOUT".into(), "5s".into()),
                ("CA_SERVER_ISTIO__MAX_CONCURRENT_REQUESTS".into(), "2".into()),
                ("CA_SERVER_ISTIO__MAX_CONCURRENT_REQUESTS_PER_CONNECTION".into(), "1".into()),
            ],
            ..Default::default()
        },
    );
    srv.wait_ready().await;
    let t = sa_token_with(&srv, &dir.join("sa-signing.key"), "default", "default", |_| {});
    let (c1, c2, c3) = (grpc_channel(&srv, "").await, grpc_channel(&srv, "").await, grpc_channel(&srv, "").await);
    create(&c1, &t).await.expect("issues through the shim");

    std::fs::write(&fault, "hang").unwrap();
    let started = Instant::now();
    let a = tokio::spawn({
        let (c, t) = (c1.clone(), t.clone());
        async move { create(&c, &t).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let refused = Instant::now();
    assert_eq!(code_of(create(&c1, &t).await, "second on one connection"), Code::ResourceExhausted);
    let b = tokio::spawn({
        let (c, t) = (c2.clone(), t.clone());
        async move { create(&c, &t).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(code_of(create(&c3, &t).await, "third in all"), Code::ResourceExhausted);
    assert!(refused.elapsed() < Duration::from_secs(4), "refusals do not wait for the hanging requests");

    assert_eq!(code_of(a.await.unwrap(), "first hanging"), Code::DeadlineExceeded);
    assert!(started.elapsed() >= Duration::from_secs(5), "answered at the deadline, not before");
    assert_eq!(code_of(b.await.unwrap(), "second hanging"), Code::DeadlineExceeded);

    std::fs::remove_file(&fault).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(s) = create(&c3, &t).await {
        assert!(Instant::now() < deadline, "never issued again: {s:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
