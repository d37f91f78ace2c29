//! Benchmark of Istio's certificate API (external-CA mode). Reproduce with:
//!
//!     cargo build --release -p ca-server --bins --examples
//!     target/release/examples/istio_bench [seconds=60] [concurrency=64]
//!
//! It starts `target/release/ca-server --dev` in a fresh directory (SQLite WAL), registers an
//! external-CA cluster `bench` whose intermediate key is a file, pre-generates P-256 CSRs and
//! service-account tokens for 1,000 identities, and drives concurrent gRPC clients over TLS on
//! loopback (the load generator shares the machine's two cores with the server). Phases:
//! sustained closed-loop load and latency at 2,000 requests/s offered (open loop, measured from
//! the scheduled send time), both cycling through the 1,000 identities as renewing agents do
//! (the same token until the kubelet rotates it); and a burst of 10,000 simultaneous requests
//! from 10,000 identities whose tokens the server has never seen (a restart storm). Afterwards it counts the
//! certificates in the database and in the audit records. In the same run: the raw ECDSA P-256
//! signing rate and the in-process issuance core (CSR verify + lint + sign + verify).
#![allow(clippy::disallowed_methods)] // clients and workloads of the test bring throwaway keys

mod proto {
    tonic::include_proto!("istio.v1.auth");
}

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use proto::IstioCertificateRequest;
use proto::istio_certificate_service_client::IstioCertificateServiceClient;
use serde_json::{Value, json};

mod common;
use common::{context_switches, cpu_seconds, cpu_split, env, rate, sa_token as token};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

const IDENTITIES: usize = 1000;
const CONNECTIONS: usize = 4;

fn csr() -> String {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    rcgen::CertificateParams::default().serialize_request(&kp).unwrap().pem().unwrap()
}

#[derive(Clone)]
struct Load {
    channels: Vec<Channel>,
    work: Arc<Vec<(String, String)>>,
}

impl Load {
    async fn one(&self, i: usize) -> Result<(), tonic::Status> {
        let (csr, token) = &self.work[i % self.work.len()];
        let mut req =
            tonic::Request::new(IstioCertificateRequest { csr: csr.clone(), validity_duration: 0, metadata: None });
        req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        req.metadata_mut().insert("clusterid", "bench".parse().unwrap());
        let ch = self.channels[i % self.channels.len()].clone();
        let r = IstioCertificateServiceClient::new(ch).create_certificate(req).await?;
        assert_eq!(r.into_inner().cert_chain.len(), 4);
        Ok(())
    }
}

struct Stats {
    ok: u64,
    errors: u64,
    latencies: Vec<Duration>,
    elapsed: Duration,
}

impl Stats {
    fn pct(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i].as_secs_f64() * 1000.0
    }
}

async fn closed_loop(load: &Load, seconds: u64, concurrency: usize) -> Stats {
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (load, stop, counter) = (load.clone(), stop.clone(), counter.clone());
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut errors, mut lat) = (0u64, 0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let i = counter.fetch_add(1, Ordering::Relaxed) as usize;
                let t = Instant::now();
                match load.one(i).await {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        errors += 1;
                        if errors < 3 {
                            eprintln!("error: {e}");
                        }
                    }
                }
                lat.push(t.elapsed());
            }
            (ok, errors, lat)
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut s = Stats { ok: 0, errors: 0, latencies: Vec::new(), elapsed: Duration::ZERO };
    for t in tasks {
        let (o, e, l) = t.await.unwrap();
        s.ok += o;
        s.errors += e;
        s.latencies.extend(l);
    }
    s.elapsed = start.elapsed();
    s
}

/// Requests at a fixed rate regardless of responses; latency counts from the scheduled time.
async fn open_loop(load: &Load, seconds: u64, per_second: u64) -> Stats {
    let start = Instant::now();
    let total = seconds * per_second;
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = start + Duration::from_secs_f64(i as f64 / per_second as f64);
        tokio::time::sleep_until(due.into()).await;
        let load = load.clone();
        tasks.push(tokio::spawn(async move {
            let r = load.one(i as usize).await;
            (r.is_ok(), due.elapsed())
        }));
    }
    let mut s = Stats { ok: 0, errors: 0, latencies: Vec::new(), elapsed: Duration::ZERO };
    // The slowest answer of each tenth of a second, to see whether stalls are periodic.
    let mut worst = vec![Duration::ZERO; (seconds * 10) as usize];
    for (i, t) in tasks.into_iter().enumerate() {
        let (ok, l) = t.await.unwrap();
        if ok {
            s.ok += 1
        } else {
            s.errors += 1
        }
        let slot = (i as u64 * 10 / per_second) as usize;
        worst[slot] = worst[slot].max(l);
        s.latencies.push(l);
    }
    let stalls: Vec<String> = worst
        .iter()
        .enumerate()
        .filter(|(_, w)| **w > Duration::from_millis(50))
        .map(|(i, w)| format!("{:.1}s:{}ms", i as f64 / 10.0, w.as_millis()))
        .collect();
    eprintln!("open loop: tenths of a second whose slowest answer exceeded 50 ms: {}", stalls.join(" "));
    s.elapsed = start.elapsed();
    s
}

async fn burst(load: &Load, n: usize) -> Stats {
    let start = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let load = load.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                (load.one(i).await, t.elapsed())
            })
        })
        .collect();
    let mut s = Stats { ok: 0, errors: 0, latencies: Vec::new(), elapsed: Duration::ZERO };
    for t in tasks {
        let (r, l) = t.await.unwrap();
        match r {
            Ok(()) => s.ok += 1,
            Err(e) => {
                s.errors += 1;
                if s.errors < 3 {
                    eprintln!("burst error: {e}");
                }
            }
        }
        s.latencies.push(l);
    }
    s.elapsed = start.elapsed();
    s
}

/// The storage's own limit: 4 KiB appended and fsync'd, `n` times, in `dir`. Returns
/// (p50, p99, max) in milliseconds.
fn fsync_latency(dir: &Path, n: usize) -> (f64, f64, f64) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("fsync-probe")).unwrap();
    let block = [0x5au8; 4096];
    let mut lat: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f.write_all(&block).unwrap();
            f.sync_data().unwrap();
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    lat.sort_by(f64::total_cmp);
    (lat[n / 2], lat[n * 99 / 100], lat[n - 1])
}

/// Runs `n` requests, each index once, `concurrency` at a time; panics on any error (a
/// callgrind phase must count exactly `n` issuances).
async fn fixed(load: &Load, n: usize, concurrency: usize) {
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (load, next) = (load.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= n {
                        break;
                    }
                    load.one(i).await.expect("every request of a callgrind phase succeeds");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// The stages of one issuance, each as the functions whose inclusive cost is the stage's
/// (none nested in another of the list). What none of them covers is the remainder: the
/// runtime's scheduling, tower's layers, channels, allocation and the handler's own glue.
const STAGES: &[(&str, &[&str])] = &[
    ("connection: TLS, HTTP/2 frames, HPACK (h2's accept loop)", &["h2::server::Connection<T,B>::poll_accept"]),
    (
        "gRPC decode (body frames, protobuf)",
        &["<tonic::codec::decode::Streaming<T> as futures_core::stream::Stream>::poll_next"],
    ),
    (
        "token (service-account JWT: cache lookup; signature and header when not cached)",
        &["ca_server::auth::service_account::TokenValidator::cached", "jsonwebtoken::decoding::verify_signature"],
    ),
    ("CSR parse (PEM, DER) + signature verify", &["ca_core::csr::VerifiedCsr::parse"]),
    ("judge (names, lifetime; CSR excluded)", &["ca_server::service::workload::judge"]),
    ("build (serial, parameters, rcgen draft)", &["ca_core::issue::draft_params", "ca_core::issue::build_draft"]),
    ("lint (parse the draft, 36 rules)", &["ca_core::issue::lint_draft"]),
    ("sign (issuer key)", &["hsm::KeySigner::sign_bytes"]),
    ("self-verify (parse the certificate, verify its signature)", &["ca_core::issue::self_verify"]),
    (
        "record: group commit task (audit record, hash chain, binds)",
        &["ca_server::service::recorder::record_loop::{{closure}}"],
    ),
    (
        "commit: SQLite statements (sqlx worker thread)",
        &[
            "<sqlx_sqlite::connection::execute::ExecuteIter as core::iter::traits::iterator::Iterator>::next",
            "sqlx_sqlite::connection::handle::ConnectionHandle::exec",
        ],
    ),
    ("response encode (PEM, protobuf)", &["pem::encode_config", "prost::message::Message::encode"]),
];

/// Shown beside the stages, not added up: parts of a stage above.
const PARTS: &[(&str, &[&str])] = &[(
    "of the connection: TLS records (rustls read, and AES-GCM for the answers)",
    &[
        "tokio_rustls::common::Stream<IO,C>::read_io",
        "<rustls::conn::ConnectionCommon<T> as rustls::conn::connection::PlaintextSink>::write_vectored",
    ],
)];

/// `callgrind_annotate --inclusive=yes` of a dump: (program total, inclusive cost per function).
fn annotate(file: &Path) -> (u64, std::collections::HashMap<String, u64>) {
    let out = Command::new("callgrind_annotate")
        .args(["--inclusive=yes", "--threshold=100"])
        .arg(file)
        .output()
        .expect("callgrind_annotate (valgrind) is installed");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut total = 0;
    let mut by_fn = std::collections::HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        let Some((count, rest)) = line.split_once(' ') else { continue };
        let Ok(n) = count.replace(',', "").parse::<u64>() else { continue };
        if rest.contains("PROGRAM TOTALS") {
            total = n;
            continue;
        }
        // "(12.3%)  file:function [object]"
        let rest = rest.trim_start();
        let rest = rest.strip_prefix('(').and_then(|r| r.split_once(')')).map_or(rest, |(_, r)| r).trim();
        let name = rest.split_once(':').map_or(rest, |(_, f)| f);
        let name = name.rsplit_once(" [").map_or(name, |(f, _)| f).trim();
        *by_fn.entry(name.to_string()).or_insert(0) += n;
    }
    (total, by_fn)
}

/// Starts counting at zero, runs `n` issuances, dumps: the dump's file.
async fn callgrind_phase(pid: u32, dir: &Path, load: &Load, n: usize, concurrency: usize) -> PathBuf {
    let before: std::collections::HashSet<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    let ctl = |arg: &str| {
        let ok =
            Command::new("callgrind_control").arg(arg).arg(pid.to_string()).stdout(Stdio::null()).status().unwrap();
        assert!(ok.success(), "callgrind_control {arg}");
    };
    ctl("-z");
    fixed(load, n, concurrency).await;
    ctl("-d");
    loop {
        let new: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| !before.contains(p) && p.file_name().unwrap().to_string_lossy().starts_with("cg.out"))
            .collect();
        if let Some(p) = new.into_iter().next() {
            // The dump is written by the server's next scheduled thread: wait until it is whole.
            tokio::time::sleep(Duration::from_secs(2)).await;
            return p;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Prints the per-stage instruction table of two dumps (new tokens, then the same tokens
/// again), per certificate.
fn callgrind_table(n: usize, uncached: &Path, cached: &Path) {
    // ISTIO_BENCH_KEEP=<dir>: keep both dumps for callgrind_annotate or kcachegrind.
    if let Some(keep) =
        std::env::var_os("ISTIO_BENCH_KEEP").filter(|_| std::env::var_os("ISTIO_BENCH_REPORT").is_none())
    {
        let keep = PathBuf::from(keep);
        std::fs::create_dir_all(&keep).unwrap();
        std::fs::copy(uncached, keep.join("callgrind.uncached")).unwrap();
        std::fs::copy(cached, keep.join("callgrind.cached")).unwrap();
    }
    let (tu, fu) = annotate(uncached);
    let (tc, fc) = annotate(cached);
    let per = |x: u64| x as f64 / n as f64;
    let stage = |f: &std::collections::HashMap<String, u64>, names: &[&str]| -> u64 {
        names.iter().map(|n| f.get(*n).copied().unwrap_or(0)).sum()
    };
    println!("\n| stage, instructions per certificate | token not seen before | token cached |\n| --- | ---: | ---: |");
    let mut rows: Vec<(u64, u64)> = STAGES.iter().map(|(_, names)| (stage(&fu, names), stage(&fc, names))).collect();
    // The judge's inclusive cost holds the CSR's: shown on its own line.
    let csr = STAGES.iter().position(|(l, _)| l.starts_with("CSR")).unwrap();
    let judge = STAGES.iter().position(|(l, _)| l.starts_with("judge")).unwrap();
    rows[judge] = (rows[judge].0.saturating_sub(rows[csr].0), rows[judge].1.saturating_sub(rows[csr].1));
    let (mut su, mut sc) = (0u64, 0u64);
    for ((label, names), (u, c)) in STAGES.iter().zip(rows) {
        if u == 0 && c == 0 {
            eprintln!("callgrind: no function of stage {label:?} found ({names:?})");
        }
        su += u;
        sc += c;
        println!("| {label} | {:.0} | {:.0} |", per(u), per(c));
    }
    for (label, names) in PARTS {
        println!("| ({label}) | ({:.0}) | ({:.0}) |", per(stage(&fu, names)), per(stage(&fc, names)));
    }
    println!(
        "| everything else (scheduling, tower layers, channels, allocation, glue) | {:.0} | {:.0} |",
        per(tu.saturating_sub(su)),
        per(tc.saturating_sub(sc))
    );
    println!("| **whole server process** | **{:.0}** | **{:.0}** |", per(tu), per(tc));
    if std::env::var_os("ISTIO_BENCH_TOP").is_some() {
        let mut top: Vec<_> = fc.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1));
        for (f, c) in top.into_iter().take(600) {
            eprintln!("{:>10.0}  {f}", per(*c));
        }
    }
}

/// CPU seconds of every process named `postgres` (the server and its backends) by pid;
/// empty when none runs.
fn postgres_cpu() -> std::collections::HashMap<String, f64> {
    let Ok(procs) = std::fs::read_dir("/proc") else { return Default::default() };
    procs
        .filter_map(|p| {
            let pid = p.ok()?.file_name().to_string_lossy().to_string();
            pid.parse::<u32>().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            (comm.trim() == "postgres").then(|| (pid.clone(), cpu_seconds(&pid)))
        })
        .collect()
}

/// Samples `ca_hsm_sessions` every 100 ms until `go` turns false: (open at the end, most in
/// use in one sample, mean in use), summed over tokens; `None` without PKCS#11 tokens.
async fn sample_sessions(port: u16, go: Arc<AtomicBool>) -> Option<(u64, u64, f64)> {
    let http = reqwest::Client::new();
    let read = |state: &'static str, text: &str| -> Option<u64> {
        let v: Vec<u64> = text
            .lines()
            .filter(|l| l.starts_with("ca_hsm_sessions{") && l.contains(&format!("state=\"{state}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        (!v.is_empty()).then(|| v.iter().sum())
    };
    let (mut open, mut busiest, mut total, mut n) = (None, 0u64, 0u64, 0u64);
    while go.load(Ordering::Relaxed) {
        if let Ok(r) = http.get(format!("http://127.0.0.1:{port}/metrics")).send().await
            && let Ok(text) = r.text().await
            && let Some(in_use) = read("in_use", &text)
        {
            busiest = busiest.max(in_use);
            total += in_use;
            n += 1;
            open = read("open", &text);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    open.map(|o| (o, busiest, total as f64 / n.max(1) as f64))
}

fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seconds: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(60);
    let concurrency: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(64);
    // ISTIO_BENCH_SERVER: another build's ca-server (before and after in one run).
    let bin: PathBuf = std::env::var_os("ISTIO_BENCH_SERVER").map(PathBuf::from).unwrap_or_else(|| {
        let exe = std::env::current_exe().unwrap();
        exe.parent().unwrap().parent().unwrap().join("ca-server")
    });
    assert!(bin.exists(), "{} missing: cargo build --release -p ca-server --bins --examples", bin.display());
    // ISTIO_BENCH_KEY=hsm: the cluster's key in the dev SoftHSM2 token, as production holds it.
    let hsm_key = match std::env::var("ISTIO_BENCH_KEY").as_deref() {
        Ok("hsm") => true,
        Ok("file") | Err(_) => false,
        Ok(other) => panic!("ISTIO_BENCH_KEY is hsm or file, not {other}"),
    };
    // ISTIO_BENCH_REPORT=<dir> with ISTIO_BENCH_CALLGRIND=N: the table of dumps an earlier
    // run kept (ISTIO_BENCH_KEEP), without running anything.
    if let (Some(dir), Ok(n)) = (std::env::var_os("ISTIO_BENCH_REPORT"), std::env::var("ISTIO_BENCH_CALLGRIND")) {
        let dir = PathBuf::from(dir);
        let n = n.parse().expect("ISTIO_BENCH_CALLGRIND=<number of issuances>");
        callgrind_table(n, &dir.join("callgrind.uncached"), &dir.join("callgrind.cached"));
        return;
    }
    // ISTIO_BENCH_CALLGRIND=N: the server runs under callgrind; N issuances with tokens it has
    // not seen, then the same N again (tokens cached), each phase dumped on its own.
    let callgrind: Option<usize> = std::env::var("ISTIO_BENCH_CALLGRIND")
        .ok()
        .map(|v| v.parse().expect("ISTIO_BENCH_CALLGRIND=<number of issuances>"));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let cg_dir = tmp.path().join("callgrind");
    std::fs::create_dir_all(&cg_dir).unwrap();
    let mut cmd = match callgrind {
        Some(_) => {
            let mut c = Command::new("valgrind");
            c.args(["--tool=callgrind", "--dump-instr=no"])
                .arg(format!("--callgrind-out-file={}", cg_dir.join("cg.out").display()))
                .arg(&bin)
                // Under callgrind everything runs about fifty times slower.
                .env("CA_SERVER_ISTIO__REQUEST_TIMEOUT", "300s")
                .env("CA_SERVER_POLICY__HSM_TIMEOUT", "300s")
                .env("CA_SERVER_LIMITS__HANDSHAKE_TIMEOUT", "300s");
            c
        }
        None => Command::new(&bin),
    };
    // A known metrics port, to watch the PKCS#11 session pool.
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = cmd
        .args(["--dev", "--dev-dir"])
        .arg(&dir)
        .args(["--listen", "127.0.0.1:0"])
        .env("CA_SERVER_ISTIO__LISTEN", "127.0.0.1:0")
        .env("CA_SERVER_METRICS__LISTEN", format!("127.0.0.1:{metrics_port}"))
        .env("CA_SERVER_LOG__LEVEL", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(tmp.path().join("server.log")).unwrap()))
        .spawn()
        .unwrap();
    let (url, grpc) = common::listeners(&mut child);
    std::thread::sleep(Duration::from_secs(1));
    let e = env(&dir);
    let key: hsm::KeyRef = if hsm_key {
        // Beside the dev cluster's key in the dev token: same module, token and PIN source.
        let dev_ref = std::fs::read_to_string(dir.join("cluster-dev.keyref")).unwrap();
        let (head, tail) = dev_ref.trim().split_once("object=").expect("the dev token is SoftHSM2 (install softhsm2)");
        let rest = tail.find(['?', ';']).map_or("", |i| &tail[i..]);
        hsm::softhsm::use_config(&dir.join("hierarchy/softhsm/softhsm2.conf"));
        format!("{head}object=bench-cluster-key{rest}").parse().unwrap()
    } else {
        hsm::KeyRef::file(tmp.path().join("bench-cluster.key"))
    };
    hsm::generate_key(&key, hsm::KeyAlgorithm::EcdsaP256).unwrap();
    // The dev cluster's service-account keys stand in for the bench cluster's too.
    let sa_jwks: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("sa-jwks.json")).unwrap()).unwrap();
    let root = std::fs::read(dir.join("hierarchy/root/root.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for p in pem::parse_many(&root).unwrap() {
        roots.add(rustls::pki_types::CertificateDer::from(p.into_contents())).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let http = reqwest::Client::builder().use_preconfigured_tls(tls).build().unwrap();
    let call = |method: reqwest::Method, path: String, token: &str, body: Option<Value>| {
        let mut r = http.request(method, format!("{url}{path}")).bearer_auth(token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        r.send()
    };
    let r: Value = call(
        reqwest::Method::POST,
        "/v1/clusters".into(),
        &e["CA_ADMIN_TOKEN"],
        Some(json!({"name": "bench", "environment": "dev", "trust_domain": "cluster.local", "mode": "external-ca",
                    "key": key.to_string(),
                    "istio": {"sa_issuer": e["CA_SA_ISSUER"], "jwks": sa_jwks}})),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let id = r["request_id"].as_str().unwrap_or_else(|| panic!("registration refused: {r}")).to_string();
    let a =
        call(reqwest::Method::POST, format!("/v1/requests/{id}/approve"), &e["CA_APPROVER_TOKEN"], None).await.unwrap();
    assert!(a.status().is_success());

    // Raw limits and the in-process issuance core, in this run.
    let sw =
        aws_lc_rs::signature::EcdsaKeyPair::generate(&aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let raw = rate(3.0, || {
        sw.sign(&rng, b"benchmark message").unwrap();
    });
    let sig = sw.sign(&rng, b"benchmark message").unwrap();
    let pk = aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
        aws_lc_rs::signature::KeyPair::public_key(&sw).as_ref().to_vec(),
    );
    let verify = rate(3.0, || {
        pk.verify(b"benchmark message", sig.as_ref()).unwrap();
    });
    let jwt = token(&dir, &e["CA_SA_ISSUER"], "bench", "jwt");
    let jwks: jsonwebtoken::jwk::JwkSet =
        serde_json::from_str(&std::fs::read_to_string(dir.join("sa-jwks.json")).unwrap()).unwrap();
    let dk = jsonwebtoken::DecodingKey::from_jwk(&jwks.keys[0]).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&["istio-ca"]);
    let jwt_rate = rate(3.0, || {
        jsonwebtoken::decode::<Value>(&jwt, &dk, &v).unwrap();
    });
    let (fs50, fs99, fsmax) = fsync_latency(tmp.path(), 500);
    let cluster: Value = call(reqwest::Method::GET, "/v1/clusters/bench".into(), &e["CA_AUDITOR_TOKEN"], None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let serial = cluster["current_serial"].as_str().expect("intermediate issued on approval");
    let cert: Value = call(reqwest::Method::GET, format!("/v1/certificates/{serial}"), &e["CA_AUDITOR_TOKEN"], None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let inter =
        ca_core::cert::CertInfo::from_der(pem::parse(cert["pem"].as_str().unwrap()).unwrap().into_contents()).unwrap();
    let ca = ca_core::issue::CaIssuer::new(inter, hsm::open_signer(&key).unwrap()).unwrap();
    let sample = csr();
    let id_ = ca_core::names::SpiffeId::istio(&"cluster.local".parse().unwrap(), "bench", "core").unwrap();
    let core = rate(3.0, || {
        let v = ca_core::csr::VerifiedCsr::parse(sample.as_bytes()).unwrap();
        let nb = ca_core::issue::default_not_before();
        let req = ca_core::profile::CertRequest {
            spiffe_id: Some(id_.clone()),
            ..ca_core::profile::CertRequest::new(
                ca_core::profile::ProfileKind::Workload,
                rcgen::DistinguishedName::new(),
                v.public_key().clone(),
                nb,
                nb + time::Duration::hours(24),
            )
        };
        ca_core::issue::issue(&ca, &req).unwrap();
    });

    eprintln!("pre-generating {IDENTITIES} CSRs and tokens");
    let issuer = e["CA_SA_ISSUER"].clone();
    let work: Vec<(String, String)> =
        (0..IDENTITIES).map(|i| (csr(), token(&dir, &issuer, &format!("ns-{}", i % 20), &format!("sa-{i}")))).collect();
    let port = grpc.rsplit_once(':').unwrap().1.to_string();
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(
            Endpoint::from_shared(format!("https://localhost:{port}"))
                .unwrap()
                .tls_config(
                    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&root)).domain_name("localhost"),
                )
                .unwrap()
                .timeout(Duration::from_secs(30))
                .connect()
                .await
                .unwrap(),
        );
    }
    // The burst models a restart storm: 10,000 new pods, each with a token never seen before.
    eprintln!("pre-generating 10,000 more for the burst");
    let fresh: Vec<(String, String)> =
        (0..10_000).map(|i| (csr(), token(&dir, &issuer, "storm", &format!("pod-{i}")))).collect();
    let burst_load = Load { channels: channels.clone(), work: Arc::new(fresh) };
    let load = Load { channels, work: Arc::new(work) };
    load.one(0).await.expect("warm-up request");

    if let Some(n) = callgrind {
        eprintln!("callgrind: pre-generating {n} CSRs and tokens never sent before");
        let cg_work: Vec<(String, String)> =
            (0..n).map(|i| (csr(), token(&dir, &issuer, "callgrind", &format!("w-{i}")))).collect();
        let cg_load = Load { channels: load.channels.clone(), work: Arc::new(cg_work) };
        eprintln!("callgrind: {n} issuances, new tokens");
        let uncached = callgrind_phase(child.id(), &cg_dir, &cg_load, n, concurrency).await;
        eprintln!("callgrind: the same {n} again, tokens cached");
        let cached = callgrind_phase(child.id(), &cg_dir, &cg_load, n, concurrency).await;
        let _ = child.kill();
        callgrind_table(n, &uncached, &cached);
        return;
    }

    eprintln!("sustained: {seconds} s at concurrency {concurrency}");
    let server_pid = child.id().to_string();
    let (srv0, me0) = (cpu_seconds(&server_pid), cpu_seconds("self"));
    let (split0, cs0, pg0) = (cpu_split(&server_pid), context_switches(&server_pid), postgres_cpu());
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = tokio::spawn(sample_sessions(metrics_port, sampling.clone()));
    let mut sustained = closed_loop(&load, seconds, concurrency).await;
    sampling.store(false, Ordering::Relaxed);
    let sessions = sampler.await.unwrap();
    let (srv_cpu, me_cpu) = (cpu_seconds(&server_pid) - srv0, cpu_seconds("self") - me0);
    let (split1, cs1, pg1) = (cpu_split(&server_pid), context_switches(&server_pid), postgres_cpu());
    let (user, sys) = (split1.0 - split0.0, split1.1 - split0.1);
    let pg_cpu: f64 = pg1.iter().map(|(pid, c)| c - pg0.get(pid).copied().unwrap_or(0.0)).sum();
    eprintln!("open loop: 20 s at 2,000/s");
    let mut paced = open_loop(&load, 20, 2000).await;
    eprintln!("burst: 10,000 at once");
    let mut b = burst(&burst_load, 10_000).await;
    let rss = peak_rss_mb(child.id());
    for s in [&mut sustained, &mut paced, &mut b] {
        s.latencies.sort();
    }

    // Every certificate answered is stored and listed in an audit record.
    let answered = sustained.ok + paced.ok + b.ok + 1;
    let store = ca_store::Store::connect(&e["CA_DATABASE_URL"], false).await.unwrap();
    let stored = store.count_workload_certificates().await.unwrap();
    let mut audited = 0usize;
    let mut after = 0;
    loop {
        let page = store.audit_after(after, 1000).await.unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().unwrap().seq;
        for r in page.iter().filter(|r| r.action == "workload.issued") {
            let d: Value = serde_json::from_str(&r.details).unwrap();
            audited += d["issued"].as_array().map_or(0, Vec::len);
        }
    }
    let _ = child.kill();
    let log = std::fs::read_to_string(tmp.path().join("server.log")).unwrap_or_default();
    let slow: Vec<&str> = log.lines().filter(|l| l.contains("slow workload commit")).collect();
    eprintln!("slow group commits (> 100 ms) logged by the server: {}", slow.len());
    for l in slow.iter().take(10) {
        eprintln!("  {l}");
    }

    println!("\n| measurement | result |\n| --- | --- |");
    println!("| raw ECDSA P-256 sign, software (aws-lc-rs), 1 thread | {raw:.0}/s |");
    println!("| storage: 4 KiB write + fsync, 500 times | p50 {fs50:.2} ms, p99 {fs99:.2} ms, max {fsmax:.1} ms |");
    println!("| slow group commits (> 100 ms) logged by the server | {} |", slow.len());
    println!("| raw ECDSA P-256 verify, software (aws-lc-rs), 1 thread | {verify:.0}/s |");
    println!("| service-account token (ES256 JWT) verify, 1 thread | {jwt_rate:.0}/s |");
    println!("| issuance core in process (CSR verify + lint + sign + verify), 1 thread | {core:.0}/s |");
    println!(
        "| sustained, {seconds} s, concurrency {concurrency}, {CONNECTIONS} connections | {:.0} certs/s ({} ok, {} errors); p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms |",
        sustained.ok as f64 / sustained.elapsed.as_secs_f64(),
        sustained.ok,
        sustained.errors,
        sustained.pct(0.5),
        sustained.pct(0.95),
        sustained.pct(0.99)
    );
    println!(
        "| CPU during the sustained phase | server {:.2} cores ({:.0} µs per certificate), load generator {:.2} cores |",
        srv_cpu / sustained.elapsed.as_secs_f64(),
        srv_cpu * 1e6 / sustained.ok.max(1) as f64,
        me_cpu / sustained.elapsed.as_secs_f64()
    );
    let n = sustained.ok.max(1) as f64;
    println!(
        "| server CPU per certificate, split | {:.0} µs user + {:.0} µs system; {:.1} context switches |",
        user * 1e6 / n,
        sys * 1e6 / n,
        cs1.saturating_sub(cs0) as f64 / n
    );
    if std::env::var("CA_SERVER_DATABASE__URL").is_ok_and(|u| u.starts_with("postgres")) {
        println!(
            "| PostgreSQL's processes during the sustained phase | {:.2} cores ({:.0} µs per certificate); server + PostgreSQL {:.0} µs per certificate |",
            pg_cpu / sustained.elapsed.as_secs_f64(),
            pg_cpu * 1e6 / n,
            (srv_cpu + pg_cpu) * 1e6 / n
        );
    }
    println!(
        "| 2,000 requests/s offered, 20 s | {:.0} certs/s ({} ok, {} errors); p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms |",
        paced.ok as f64 / paced.elapsed.as_secs_f64(),
        paced.ok,
        paced.errors,
        paced.pct(0.5),
        paced.pct(0.95),
        paced.pct(0.99)
    );
    println!(
        "| burst of 10,000 simultaneous requests | all answered in {:.2} s ({} ok, {} errors); p50 {:.0} ms, p99 {:.0} ms |",
        b.elapsed.as_secs_f64(),
        b.ok,
        b.errors,
        b.pct(0.5),
        b.pct(0.99)
    );
    if let Some((open, busiest, mean)) = sessions.filter(|_| hsm_key) {
        println!(
            "| PKCS#11 sessions during the sustained phase (sampled every 100 ms) | {open} open; in use: at most {busiest}, {mean:.2} on average |"
        );
    }
    println!("| peak server RSS (VmHWM) | {rss:.0} MB |");
    println!("| answered / stored / listed in audit records | {answered} / {stored} / {audited} |");
}
