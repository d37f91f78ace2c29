//! A flood of unauthenticated bad requests against valid traffic. Reproduce with:
//!
//!     cargo build --release -p ca-server --bins --examples
//!     target/release/examples/flood_bench [requests=100000] [idle_seconds=30]
//!
//! It starts `target/release/ca-server --dev` in a fresh directory (SQLite WAL, default
//! `rate_limit` and a 5 s `audit.denial_summary_interval`), enrols four plug-in clusters, and
//! runs valid traffic open-loop for the whole run: each cluster renews its intermediate over
//! mTLS twice a second, and workloads of the dev external-CA cluster ask for certificates 20
//! times a second (valid service-account tokens). First the valid traffic runs alone (idle),
//! then alongside `requests` anonymous bad requests from 32 concurrent senders on the same
//! loopback address: half `GET /v1/clusters/<30 KB>/trust-bundle`, half gRPC
//! `CreateCertificate` with a bogus token. It reports the p50/p99 of each valid kind in both
//! windows, what the flood was answered, the audit records and bytes its refusals cost, and the
//! database's growth. In the same run: the raw ECDSA P-256 signing rate.
#![allow(clippy::disallowed_methods)] // clients and workloads of the test bring throwaway keys

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ca_server::proto::IstioCertificateRequest;
use ca_server::proto::istio_certificate_service_client::IstioCertificateServiceClient;
use serde_json::{Value, json};

mod common;
use common::{client, cpu_seconds, env, sa_token};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

fn csr() -> (String, rcgen::KeyPair) {
    let kp = rcgen::KeyPair::generate().unwrap();
    (rcgen::CertificateParams::default().serialize_request(&kp).unwrap().pem().unwrap(), kp)
}

fn db_bytes(db: &Path) -> u64 {
    let name = db.file_name().unwrap().to_str().unwrap().to_string();
    std::fs::read_dir(db.parent().unwrap())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(&name)))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

/// (when sent, latency) of each valid request.
type Samples = Arc<std::sync::Mutex<Vec<(Instant, Duration)>>>;

fn pct(samples: &Samples, from: Instant, to: Instant, p: f64) -> (usize, f64) {
    let mut l: Vec<Duration> =
        samples.lock().unwrap().iter().filter(|(t, _)| *t >= from && *t < to).map(|(_, d)| *d).collect();
    l.sort();
    if l.is_empty() {
        return (0, 0.0);
    }
    (l.len(), l[((l.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1000.0)
}

type Answers = std::collections::BTreeMap<String, u64>;

/// 32 senders, half REST with 30 KB paths, half gRPC with a bogus token, until `requests`
/// were sent: (how long, what was answered, how often).
async fn run_flood(url: &str, grpc: &str, root: &Path, requests: u64) -> (Duration, Answers) {
    let long = format!("{url}/v1/clusters/{}/trust-bundle", "a".repeat(30_000));
    let port = grpc.rsplit_once(':').unwrap().1.to_string();
    let root_pem = std::fs::read_to_string(root).unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let answers: Arc<std::sync::Mutex<Answers>> = Default::default();
    let mut senders = Vec::new();
    for _ in 0..16 {
        let ch = Endpoint::from_shared(format!("https://localhost:{port}"))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&root_pem)).domain_name("localhost"),
            )
            .unwrap()
            .timeout(Duration::from_secs(30))
            .connect()
            .await
            .unwrap();
        for grpc in [false, true] {
            let (sent, answers, long, ch) = (sent.clone(), answers.clone(), long.clone(), ch.clone());
            let rest = client(root, None);
            senders.push(tokio::spawn(async move {
                while sent.fetch_add(1, Ordering::Relaxed) < requests {
                    let answer = if grpc {
                        let mut req = tonic::Request::new(IstioCertificateRequest {
                            csr: String::new(),
                            validity_duration: 0,
                            metadata: None,
                        });
                        req.metadata_mut().insert("authorization", "Bearer not.a.jwt".parse().unwrap());
                        req.metadata_mut().insert("clusterid", "dev".parse().unwrap());
                        match IstioCertificateServiceClient::new(ch.clone()).create_certificate(req).await {
                            Ok(_) => "gRPC OK".into(),
                            Err(st) => format!("gRPC {:?}", st.code()),
                        }
                    } else {
                        match rest.get(&long).send().await {
                            Ok(r) => format!("REST {}", r.status().as_u16()),
                            Err(_) => "REST error".into(),
                        }
                    };
                    *answers.lock().unwrap().entry(answer).or_default() += 1;
                }
            }));
        }
    }
    let started = Instant::now();
    for f in senders {
        f.await.unwrap();
    }
    (started.elapsed(), answers.lock().unwrap().clone())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--flood-only") {
        // The attacker process of FLOOD_ATTACKER=idle: flood, then report as JSON.
        let (url, grpc, root, requests) = (&args[2], &args[3], PathBuf::from(&args[4]), args[5].parse().unwrap());
        let (took, answers) = run_flood(url, grpc, &root, requests).await;
        println!("{}", json!({"seconds": took.as_secs_f64(), "answers": answers, "cpu": cpu_seconds("self")}));
        return;
    }
    let requests: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let idle: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(30);
    let exe = std::env::current_exe().unwrap();
    let bin: PathBuf = exe.parent().unwrap().parent().unwrap().join("ca-server");
    assert!(bin.exists(), "{} missing: cargo build --release -p ca-server --bins --examples", bin.display());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let mut child = Command::new(&bin)
        .args(["--dev", "--dev-dir"])
        .arg(&dir)
        .args(["--listen", "127.0.0.1:0"])
        .env("CA_SERVER_ISTIO__LISTEN", "127.0.0.1:0")
        .env("CA_SERVER_LOG__LEVEL", "warn")
        .env("CA_SERVER_AUDIT__DENIAL_SUMMARY_INTERVAL", "5s")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(tmp.path().join("server.log")).unwrap()))
        .spawn()
        .unwrap();
    let (url, grpc) = common::listeners(&mut child);
    std::thread::sleep(Duration::from_secs(1));
    let e = env(&dir);
    let root = dir.join("hierarchy/root/root.pem");
    let db = PathBuf::from(e["CA_DATABASE_URL"].strip_prefix("sqlite://").expect("the dev setup is on SQLite"));
    let c = client(&root, None);
    let channel = || {
        let port = grpc.rsplit_once(':').unwrap().1.to_string();
        let root_pem = std::fs::read_to_string(&root).unwrap();
        async move {
            Endpoint::from_shared(format!("https://localhost:{port}"))
                .unwrap()
                .tls_config(
                    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(root_pem)).domain_name("localhost"),
                )
                .unwrap()
                .timeout(Duration::from_secs(30))
                .connect()
                .await
                .unwrap()
        }
    };

    // Raw limit, this machine, this run.
    let sw = rcgen::KeyPair::generate().unwrap();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(2) {
        drop(rcgen::SigningKey::sign(&sw, b"x"));
        n += 1;
    }
    let sign_rate = n as f64 / start.elapsed().as_secs_f64();

    let stop = Arc::new(AtomicBool::new(false));
    let paused = Arc::new(AtomicBool::new(true));
    let renewals: Samples = Default::default();
    let workloads: Samples = Default::default();
    let failures = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    // Four plug-in clusters, each renewing twice a second over mTLS (a new connection each time).
    for t in 0..4 {
        let name = format!("flood-{t}");
        let (pem_csr, kp) = csr();
        let mut cert = common::enrol(&c, &url, &e, &name, &pem_csr).await;
        let mut key = kp.serialize_der();
        let (url, root, stop, paused, samples, failures) =
            (url.clone(), root.clone(), stop.clone(), paused.clone(), renewals.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            while !stop.load(Ordering::Relaxed) {
                let due = tick.tick().await.into_std();
                if paused.load(Ordering::Relaxed) {
                    continue;
                }
                let (pem_csr, next) = csr();
                let r = client(&root, Some((&cert, &key)))
                    .post(format!("{url}/v1/clusters/{name}/intermediate"))
                    .json(&json!({"csr": pem_csr}))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => {
                        let body: Value = r.json().await.unwrap();
                        samples.lock().unwrap().push((due, due.elapsed()));
                        cert = pem::parse(body["certificate"].as_str().unwrap()).unwrap().into_contents();
                        key = next.serialize_der();
                    }
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    // Workloads of the dev external-CA cluster, 20 a second, each on its own schedule.
    let ch = channel().await;
    let work: Arc<Vec<(String, String)>> =
        Arc::new((0..50).map(|i| (csr().0, sa_token(&dir, &e["CA_SA_ISSUER"], "bench", &format!("sa-{i}")))).collect());
    {
        let (ch, stop, paused, samples, failures, work) =
            (ch.clone(), stop.clone(), paused.clone(), workloads.clone(), failures.clone(), work.clone());
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let due = tick.tick().await.into_std();
                if paused.load(Ordering::Relaxed) {
                    continue;
                }
                let (csr, token) = work[i % work.len()].clone();
                i += 1;
                let (ch, samples, failures) = (ch.clone(), samples.clone(), failures.clone());
                tokio::spawn(async move {
                    let mut req =
                        tonic::Request::new(IstioCertificateRequest { csr, validity_duration: 0, metadata: None });
                    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
                    req.metadata_mut().insert("clusterid", "dev".parse().unwrap());
                    match IstioCertificateServiceClient::new(ch).create_certificate(req).await {
                        Ok(_) => samples.lock().unwrap().push((due, due.elapsed())),
                        Err(_) => {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        }));
    }

    let audit = |after: i64| {
        let c = c.clone();
        let (url, token) = (url.clone(), e["CA_AUDITOR_TOKEN"].clone());
        async move {
            let mut all: Vec<Value> = Vec::new();
            let mut after = after;
            loop {
                let page: Vec<Value> = c
                    .get(format!("{url}/v1/audit?after={after}&limit=1000"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                if page.is_empty() {
                    return all;
                }
                after = page.last().unwrap()["seq"].as_i64().unwrap();
                all.extend(page);
            }
        }
    };
    // FLOOD_ATTACKER=idle: the flood comes from a child process at SCHED_IDLE (`chrt --idle 0`),
    // which runs only on CPU the server and the valid clients leave: an attacker on another
    // machine, whose own CPU is not the server's to share. Unset, it shares this process.
    let attacker_idle = match std::env::var("FLOOD_ATTACKER").as_deref() {
        Ok("idle") => true,
        Ok("shared") | Err(_) => false,
        Ok(other) => panic!("FLOOD_ATTACKER is idle or shared, not {other}"),
    };
    let flood = |requests: u64| {
        let (url, grpc, root) = (url.clone(), grpc.clone(), root.clone());
        async move {
            if !attacker_idle {
                let (took, answers) = run_flood(&url, &grpc, &root, requests).await;
                return (took, answers, None);
            }
            let out = tokio::process::Command::new("chrt")
                .args(["--idle", "0"])
                .arg(std::env::current_exe().unwrap())
                .args(["--flood-only", &url, &grpc])
                .arg(&root)
                .arg(requests.to_string())
                .stderr(Stdio::inherit())
                .output()
                .await
                .expect("chrt (util-linux) runs the attacker");
            assert!(out.status.success(), "the attacker process failed");
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            let answers = serde_json::from_value(v["answers"].clone()).unwrap();
            (Duration::from_secs_f64(v["seconds"].as_f64().unwrap()), answers, v["cpu"].as_f64())
        }
    };

    // Phase 1, storage: the flood alone (valid traffic paused), then one more summary interval.
    let bytes_before = db_bytes(&db);
    let seq_before = audit(0).await.last().map_or(0, |r| r["seq"].as_i64().unwrap());
    let server_pid = child.id().to_string();
    let (cpu_server0, cpu_self0) = (cpu_seconds(&server_pid), cpu_seconds("self"));
    let (alone, answers_alone, attacker_cpu) = flood(requests).await;
    let (cpu_server, cpu_self) = (cpu_seconds(&server_pid) - cpu_server0, cpu_seconds("self") - cpu_self0);
    // The load generator's CPU: this process's, plus the attacker process's when there is one.
    let cpu_self = cpu_self + attacker_cpu.unwrap_or(0.0);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let bytes_after = db_bytes(&db);
    let records = audit(seq_before).await;

    // Phase 2, latency: valid traffic alone, then with the same flood again.
    paused.store(false, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(idle)).await;
    let t1 = Instant::now();
    let (with_traffic, answers, _) = flood(requests).await;
    let t2 = Instant::now();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let refusal_records: Vec<&Value> =
        records.iter().filter(|r| r["action"].as_str().unwrap_or("").contains("denied")).collect();
    let refusal_bytes: usize = refusal_records.iter().map(|r| r.to_string().len()).sum();
    let summarised: u64 = refusal_records
        .iter()
        .filter(|r| r["action"] == "request.denied.summary")
        .filter_map(|r| r["details"]["total"].as_u64())
        .sum();
    let other_records = records.len() - refusal_records.len();
    let _ = child.kill();
    let _ = child.wait();

    println!("| measurement | value |");
    println!("| --- | --- |");
    println!(
        "| the attacker | {} |",
        if attacker_idle {
            "a process of its own at SCHED_IDLE (FLOOD_ATTACKER=idle)"
        } else {
            "this process, at the same priority as the valid clients"
        }
    );
    println!("| raw ECDSA P-256 sign, software (aws-lc-rs), 1 thread | {sign_rate:.0}/s |");
    println!(
        "| flood alone: {requests} anonymous bad requests | {:.1} s ({:.0}/s); CPU: server {cpu_server:.1} s, load generator {cpu_self:.1} s |",
        alone.as_secs_f64(),
        requests as f64 / alone.as_secs_f64()
    );
    for (k, v) in &answers_alone {
        println!("| flood alone: answered {k} | {v} |");
    }
    println!(
        "| flood alone: audit records for the refusals | {} ({refusal_bytes} bytes of JSON), counting {summarised} refusals; {other_records} other records |",
        refusal_records.len()
    );
    println!(
        "| flood alone: database growth (file + WAL) | {:.3} MB |",
        (bytes_after as f64 - bytes_before as f64) / 1e6
    );
    println!(
        "| flood with valid traffic: {requests} requests | {:.1} s ({:.0}/s) |",
        with_traffic.as_secs_f64(),
        requests as f64 / with_traffic.as_secs_f64()
    );
    for (k, v) in &answers {
        println!("| flood with valid traffic: answered {k} | {v} |");
    }
    for (what, s) in
        [("cluster renewal (mTLS, 4 clusters, 8/s)", &renewals), ("workload certificate (gRPC, 20/s)", &workloads)]
    {
        let (n0, p50_0) = pct(s, t0, t1, 0.5);
        let (_, p99_0) = pct(s, t0, t1, 0.99);
        let (n1, p50_1) = pct(s, t1, t2, 0.5);
        let (_, p99_1) = pct(s, t1, t2, 0.99);
        println!(
            "| {what}: idle p50 / p99 (n) | {p50_0:.1} / {p99_0:.1} ms ({n0}) |\n| {what}: during the flood p50 / p99 (n) | {p50_1:.1} / {p99_1:.1} ms ({n1}), p99 {:.2}× idle |",
            if p99_0 > 0.0 { p99_1 / p99_0 } else { 0.0 }
        );
    }
    println!("| valid requests that failed | {} |", failures.load(Ordering::Relaxed));
}
