//! Load benchmark against a running `ca-server --dev`. Reproduce with:
//!
//!     cargo build --release -p ca-server --examples
//!     target/release/ca-server --dev --dev-dir /tmp/bench-dev --listen 127.0.0.1:18500 &
//!     target/release/examples/load /tmp/bench-dev 10 8
//!
//! (arguments: dev directory, seconds, concurrent clients). It registers and enrols one cluster
//! per client, then each client renews its cluster's intermediate over mTLS back to back (a new
//! TLS connection each time, as a CronJob would) for the given time: every renewal is a full
//! issuance (CSR check, lint, signature in SoftHSM2, inventory row and audit
//! record committed). In the same run it measures the machine's raw limits: ECDSA P-256
//! signatures per second in software and with the environment key in SoftHSM2.
#![allow(clippy::disallowed_methods)] // clients and workloads of the test bring throwaway keys

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
use common::{client, env, rate};

fn csr() -> (String, rcgen::KeyPair) {
    let kp = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name.push(rcgen::DnType::CommonName, "load");
    (p.serialize_request(&kp).unwrap().pem().unwrap(), kp)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(args.get(1).expect("usage: load DEV_DIR [SECONDS] [CONCURRENCY]"));
    let seconds: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10);
    let concurrency: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(8);
    let e = env(&dir);
    assert!(!e.is_empty(), "{}/dev.env: start ca-server --dev first", dir.display());
    let url = e["CA_SERVER_URL"].clone();
    let root = PathBuf::from(&e["CA_ROOT_CERT"]);
    let c = client(&root, None);

    // Raw limits, same machine, same run.
    let sw = rcgen::KeyPair::generate().unwrap();
    let sw_rate = rate(2.0, || drop(rcgen::SigningKey::sign(&sw, b"x")));
    let conf = dir.join("hierarchy/softhsm/softhsm2.conf");
    let hsm_rate = if conf.exists() {
        hsm::softhsm::use_config(&conf);
        let cfg = std::fs::read_to_string(dir.join("config.toml")).unwrap();
        let key = cfg.lines().find(|l| l.starts_with("key = \"pkcs11:")).unwrap();
        let key: hsm::KeyRef = key.trim_start_matches("key = \"").trim_end_matches('"').parse().unwrap();
        let signer = hsm::open_signer(&key).unwrap();
        Some(rate(2.0, || drop(signer.sign_bytes(b"x").unwrap())))
    } else {
        None
    };

    // One cluster per client: only a cluster's newest intermediate may renew it, so each
    // client renews back to back with the certificate it got last.
    let mut tasks = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(seconds) + Duration::from_secs(2);
    for t in 0..concurrency {
        let name = format!("load-{}-{t}", std::process::id());
        let (pem_csr, kp) = csr();
        let mut cert = common::enrol(&c, &url, &e, &name, &pem_csr).await;
        let mut key = kp.serialize_der();
        // Keys and CSRs are made up front so the client's own work is not measured.
        let pairs: Vec<(String, Vec<u8>)> = (0..512)
            .map(|_| {
                let (p, k) = csr();
                (p, k.serialize_der())
            })
            .collect();
        let (url, root, name) = (url.clone(), root.clone(), name.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let start_at = deadline - Duration::from_secs(seconds);
            tokio::time::sleep_until(start_at.into()).await;
            let mut i = 0;
            while Instant::now() < deadline {
                let (pem_csr, next_key) = &pairs[i % pairs.len()];
                let mtls = client(&root, Some((&cert, &key)));
                let start = Instant::now();
                let r = mtls
                    .post(format!("{url}/v1/clusters/{name}/intermediate"))
                    .json(&json!({"csr": pem_csr}))
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success(), "{}", r.status());
                let body: Value = r.json().await.unwrap();
                lat.push(start.elapsed());
                cert = pem::parse(body["certificate"].as_str().unwrap()).unwrap().into_contents();
                key = next_key.clone();
                i += 1;
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let elapsed = seconds as f64;
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1000.0;
    println!("| measurement | value |");
    println!("| --- | --- |");
    println!("| raw ECDSA P-256 sign, software (aws-lc-rs), 1 thread | {sw_rate:.0}/s |");
    if let Some(h) = hsm_rate {
        println!("| raw ECDSA P-256 sign, SoftHSM2 environment key, 1 thread | {h:.0}/s |");
    }
    println!(
        "| cluster intermediate renewals over mTLS, {concurrency} clusters at once, {seconds}s | {:.0}/s ({} total) |",
        lat.len() as f64 / elapsed,
        lat.len()
    );
    println!("| latency p50 / p99 | {:.1} ms / {:.1} ms |", pct(0.5), pct(0.99));
}
