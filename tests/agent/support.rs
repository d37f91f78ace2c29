//! Running ca-agent against a stand-in, and reading what it wrote.
#![allow(dead_code)] // shared by the agent and rotation tests, each using part of it

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use kube_standin::{Kind, Options, StandIn};
use serde_json::{Value, json};

use crate::server_support::{Server, ca_server_bin};

pub fn ca_agent_bin() -> PathBuf {
    let p = ca_server_bin().with_file_name("ca-agent");
    assert!(p.exists(), "{} is missing: build the workspace (scripts/test does)", p.display());
    p
}

/// A stand-in with the namespaces a cluster running Istio and ca-agent has, and `extra`.
pub async fn standin(extra: &[&str]) -> StandIn {
    let mut namespaces: Vec<String> =
        ["default", "kube-system", "kube-public", "kube-node-lease", "istio-system", "ca-agent"]
            .map(String::from)
            .to_vec();
    namespaces.extend(extra.iter().map(|s| s.to_string()));
    StandIn::start(Options { namespaces, ..Default::default() }).await.unwrap()
}

pub fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A Secret's data, decoded.
pub fn secret_data(k: &StandIn, ns: &str, name: &str) -> Option<std::collections::BTreeMap<String, String>> {
    let s = k.get(Kind::Secret, Some(ns), name)?;
    let mut out = std::collections::BTreeMap::new();
    for (key, v) in s["data"].as_object()? {
        let bytes = base64::engine::general_purpose::STANDARD.decode(v.as_str()?).ok()?;
        out.insert(key.clone(), String::from_utf8(bytes).ok()?);
    }
    Some(out)
}

pub fn put_enrolment_token(k: &StandIn, token: &str) {
    k.put(
        Kind::Secret,
        Some("ca-agent"),
        "ca-agent-enrolment",
        json!({"metadata": {"name": "ca-agent-enrolment"}, "data": {"token": b64(token)}}),
    );
}

pub struct Agent {
    pub child: Child,
    pub health: String,
    pub log: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    /// Starts `ca-agent run` for `cluster` against `srv` and the stand-in whose kubeconfig is
    /// `kubeconfig`, and waits for its health listener.
    pub fn start(srv: &Server, kubeconfig: &Path, mode: &str, cluster: &str, identity: &str, extra: &[&str]) -> Agent {
        let log = kubeconfig.with_file_name(format!("agent-{identity}.log"));
        let err = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let mut cmd = Command::new(ca_agent_bin());
        cmd.args(["run", "--mode", mode, "--cluster", cluster, "--server", &srv.url, "--ca-root"])
            .arg(srv.root())
            .args(["--namespace", "ca-agent", "--listen", "127.0.0.1:0", "--resync", "2s", "--lease-duration", "3s"])
            .args(["--identity", identity])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("CA_AGENT_LOG", "info,ca_agent=debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err));
        let mut child = cmd.spawn().expect("ca-agent starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().and_then(|l| l.ok()).unwrap_or_else(|| {
            panic!("ca-agent exited before listening; log:\n{}", std::fs::read_to_string(&log).unwrap_or_default())
        });
        let addr =
            first.strip_prefix("ca-agent health listening on ").unwrap_or_else(|| panic!("unexpected {first:?}"));
        std::thread::spawn(move || for _ in lines {});
        Agent { child, health: format!("http://{addr}"), log }
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        match reqwest::get(format!("{}{path}", self.health)).await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 200 ms until it gives a value, or panics after `secs` with `what` and
/// the agents' logs.
pub async fn eventually<T>(secs: u64, what: &str, agents: &[&Agent], mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = agents.iter().map(|a| a.log_text()).collect();
            panic!("timed out waiting for {what}; agent logs:\n{}", logs.join("\n----\n"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn lease_holder(k: &StandIn) -> Option<String> {
    k.get(Kind::Lease, Some("ca-agent"), "ca-agent")?["spec"]["holderIdentity"].as_str().map(str::to_string)
}

/// `openssl verify` of `leaf` (first certificate of `leaf_chain`) through `chain` to `roots`.
pub fn openssl_verifies(dir: &Path, leaf_chain: &str, chain: &str, roots: &str) -> bool {
    let (l, c, r) = (dir.join("v-leaf.pem"), dir.join("v-chain.pem"), dir.join("v-roots.pem"));
    let first_end = leaf_chain.find("-----END CERTIFICATE-----").unwrap() + "-----END CERTIFICATE-----\n".len();
    std::fs::write(&l, &leaf_chain[..first_end.min(leaf_chain.len())]).unwrap();
    std::fs::write(&c, chain).unwrap();
    std::fs::write(&r, roots).unwrap();
    let o =
        Command::new("openssl").args(["verify", "-CAfile"]).arg(&r).arg("-untrusted").arg(&c).arg(&l).output().unwrap();
    o.status.success()
}

pub fn serial_of(pem: &str) -> String {
    let der = pem::parse(pem).unwrap().into_contents();
    ca_core::cert::CertInfo::from_der(der).unwrap().serial
}

pub fn writes_to(k: &StandIn, method: &str, path: &str) -> Vec<Value> {
    k.requests()
        .into_iter()
        .filter(|r| r.method == method && r.path_and_query.split('?').next() == Some(path))
        .map(|r| r.body.unwrap_or(Value::Null))
        .collect()
}
