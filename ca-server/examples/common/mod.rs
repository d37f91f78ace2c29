//! What the benchmark programs share: reading `dev.env`, TLS clients, service-account tokens,
//! CPU accounting and enrolling a plug-in cluster. Each program uses a part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Value, json};

/// The variables `ca-server --dev` wrote into `dir/dev.env` (empty until it has).
pub fn env(dir: &Path) -> HashMap<String, String> {
    std::fs::read_to_string(dir.join("dev.env"))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// An HTTPS client trusting `root`, presenting `identity` (certificate DER, PKCS#8 key DER).
pub fn client(root: &Path, identity: Option<(&[u8], &[u8])>) -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    for p in pem::parse_many(std::fs::read(root).unwrap()).unwrap() {
        roots.add(rustls::pki_types::CertificateDer::from(p.into_contents())).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match identity {
        None => b.with_no_client_auth(),
        Some((cert, key)) => b
            .with_client_auth_cert(
                vec![cert.to_vec().into()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.to_vec().into()),
            )
            .unwrap(),
    };
    reqwest::Client::builder().use_preconfigured_tls(cfg).build().unwrap()
}

/// How many times a second `f` runs on this thread, over `seconds`.
pub fn rate(seconds: f64, f: impl Fn()) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        f();
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// A projected service-account token for `ns/sa`, signed with the dev cluster's stand-in key.
pub fn sa_token(dir: &Path, issuer: &str, ns: &str, sa: &str) -> String {
    let key = hsm::export_file_key(&hsm::KeyRef::file(dir.join("sa-signing.key"))).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(hex::encode(&key.public_key().fingerprint()[..8]));
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = json!({"iss": issuer, "aud": ["istio-ca"], "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa}}, "iat": now, "nbf": now - 60, "exp": now + 7200});
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_ec_pem(key.expose_pem().as_bytes()).unwrap(),
    )
    .unwrap()
}

/// CPU seconds (user + system) of a process so far (`self` for this one).
pub fn cpu_seconds(pid: &str) -> f64 {
    let (user, system) = cpu_split(pid);
    user + system
}

/// CPU seconds of a process so far, split: (user, system).
pub fn cpu_split(pid: &str) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces); utime and
    // stime are fields 14 and 15 of stat, 12 and 13 after the command name.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) / 100.0, ticks(12) / 100.0)
}

/// Context switches (voluntary + involuntary) of all of a process's live threads so far.
pub fn context_switches(pid: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .flat_map(|s| {
            s.lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Registers plug-in cluster `name` in the dev environment, approves it as the second operator
/// and enrols it with `csr`: the intermediate's DER.
pub async fn enrol(c: &reqwest::Client, url: &str, e: &HashMap<String, String>, name: &str, csr: &str) -> Vec<u8> {
    let reg: Value = c
        .post(format!("{url}/v1/clusters"))
        .bearer_auth(&e["CA_ADMIN_TOKEN"])
        .json(&json!({"name": name, "environment": "dev", "trust_domain": "cluster.local"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    c.post(format!("{url}/v1/requests/{}/approve", reg["request_id"].as_str().unwrap()))
        .bearer_auth(&e["CA_APPROVER_TOKEN"])
        .send()
        .await
        .unwrap();
    let enrolled: Value = c
        .post(format!("{url}/v1/clusters/{name}/intermediate"))
        .bearer_auth(reg["enrolment_token"].as_str().unwrap())
        .json(&json!({"csr": csr}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    pem::parse(enrolled["certificate"].as_str().unwrap()).unwrap().into_contents()
}

/// Waits for a `ca-server` child's listening lines on its piped stdout and keeps draining it:
/// (REST URL, gRPC address, empty when there is none).
pub fn listeners(child: &mut std::process::Child) -> (String, String) {
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut grpc = String::new();
    let url = loop {
        let l = lines.next().expect("server output").unwrap();
        if let Some(g) = l.strip_prefix("ca-server grpc listening on ") {
            grpc = g.to_string();
        } else if let Some(u) = l.strip_prefix("ca-server listening on ") {
            break u.to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (url, grpc)
}
