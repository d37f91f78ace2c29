//! `ca-cli rotation ...` and `ca-cli request ...`: drive a staged rotation on ca-server, with
//! an operator token from `CA_TOKEN`. Every stage change is a request a second operator
//! approves (`ca-cli request approve ID`).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use time::OffsetDateTime;

pub struct Api {
    server: String,
    client: reqwest::Client,
    token: String,
}

impl Api {
    pub fn new(server: &str, ca_root: &Path) -> Result<Api> {
        let token = std::env::var("CA_TOKEN")
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .context("set CA_TOKEN to an operator token (it is never taken from the command line)")?;
        let tls = crate::cluster::tls_config(ca_root, None)?;
        let client = reqwest::Client::builder().use_preconfigured_tls(tls).timeout(Duration::from_secs(60)).build()?;
        Ok(Api { server: server.trim_end_matches('/').to_string(), client, token })
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let url = format!("{}{path}", self.server);
        let mut req = match method {
            "GET" => self.client.get(&url),
            _ => self.client.post(&url),
        }
        .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.with_context(|| format!("{method} {path}"))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if !status.is_success() {
            match (v["code"].as_str(), v["detail"].as_str()) {
                (Some(code), Some(detail)) => bail!("{method} {path}: {status} ({code}): {detail}"),
                _ => bail!("{method} {path}: {status}"),
            }
        }
        Ok(v)
    }
}

fn read_pem(path: &Path) -> Result<String> {
    let pem = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    // Checked here too, so that a wrong file is named before anything is sent.
    ca_core::cert::load_cert(path)?;
    Ok(pem)
}

pub enum Start<'a> {
    Root { new_root: &'a Path, old_root: Option<String> },
    Environment { environment: String, certificate: &'a Path, key: String },
    Cluster { cluster: String, key: Option<String> },
}

pub async fn start(api: &Api, s: Start<'_>) -> Result<Value> {
    let body = match s {
        Start::Root { new_root, old_root } => {
            json!({"kind": "root", "new_root": read_pem(new_root)?, "old_root": old_root})
        }
        Start::Environment { environment, certificate, key } => {
            json!({"kind": "environment", "environment": environment, "certificate": read_pem(certificate)?, "key": key})
        }
        Start::Cluster { cluster, key } => json!({"kind": "cluster", "cluster": cluster, "key": key}),
    };
    api.call("POST", "/v1/rotations", Some(body)).await
}

pub async fn add_certificate(api: &Api, id: &str, environment: &str, certificate: &Path) -> Result<Value> {
    api.call(
        "POST",
        &format!("/v1/rotations/{id}/certificates"),
        Some(json!({"environment": environment, "certificate": read_pem(certificate)?})),
    )
    .await
}

pub async fn stage(api: &Api, id: &str, forward: bool, to: Option<String>) -> Result<Value> {
    let verb = if forward { "advance" } else { "rollback" };
    api.call("POST", &format!("/v1/rotations/{id}/{verb}"), Some(json!({"to": to}))).await
}

fn when(t: Option<i64>) -> String {
    t.and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok()).map_or("-".into(), ca_core::error::fmt_time)
}

/// One rotation: stage, each cluster's progress, and what blocks the next stage.
pub fn status_text(v: &Value) -> String {
    let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
    let mut out = format!(
        "rotation {} ({} {})\n  stage: {}   next: {}   rollback: {}\n  stages: {}\n",
        s(&v["id"]),
        s(&v["kind"]),
        s(&v["target"]),
        s(&v["stage"]),
        s(&v["next"]),
        s(&v["rollback"]),
        v["stages"].as_array().map(|a| a.iter().map(s).collect::<Vec<_>>().join(" -> ")).unwrap_or_default()
    );
    if let (Some(o), Some(n)) = (v["old_root"].as_str(), v["new_root"].as_str()) {
        out.push_str(&format!("  old root sha256: {o}\n  new root sha256: {n}\n"));
    }
    for e in v["environments"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  environment {}: old certificate {}, new certificate {}\n",
            s(&e["name"]),
            s(&e["old_certificate"]),
            e["new_certificate"].as_str().unwrap_or("(not added yet)")
        ));
    }
    if v["drain_until"].is_i64() {
        out.push_str(&format!("  drain until: {}\n", when(v["drain_until"].as_i64())));
    }
    out.push_str(&format!(
        "\n  {:<20} {:<12} {:<12} {:<8} {:<8} {:<21} {}\n",
        "CLUSTER", "MODE", "PROGRESS", "BUNDLE", "CHAIN", "REPORTED", "LAGGING WORKLOADS"
    ));
    for c in v["clusters"].as_array().into_iter().flatten() {
        let yes = |b: &Value| if b == true { "ok" } else { "old" };
        out.push_str(&format!(
            "  {:<20} {:<12} {:<12} {:<8} {:<8} {:<21} {}\n",
            s(&c["name"]),
            s(&c["mode"]),
            s(&c["state"]),
            yes(&c["bundle_ok"]),
            yes(&c["chain_ok"]),
            when(c["reported_at"].as_i64()),
            if c["mode"] == "external-ca" {
                format!(
                    "{} old bundle, {} old chain",
                    c["stale_bundle_workloads"].as_i64().unwrap_or(0),
                    c["stale_chain_workloads"].as_i64().unwrap_or(0)
                )
            } else {
                "-".into()
            }
        ));
    }
    let blockers = v["blockers"].as_array().cloned().unwrap_or_default();
    if v["next"].is_null() {
        out.push_str("\n  finished.");
    } else if blockers.is_empty() {
        out.push_str(&format!(
            "\n  ready: `ca-cli rotation advance {}` may move it to {}.",
            s(&v["id"]),
            s(&v["next"])
        ));
    } else {
        out.push_str(&format!("\n  blocked from {}:\n", s(&v["next"])));
        for b in blockers {
            match b["cluster"].as_str() {
                Some(c) => out.push_str(&format!("    - cluster {c}: {}\n", s(&b["reason"]))),
                None => out.push_str(&format!("    - {}\n", s(&b["reason"]))),
            }
        }
    }
    for h in v["history"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "\n  {} {} -> {} (requested by {}, approved by {})",
            when(h["at"].as_i64()),
            s(&h["from"]),
            s(&h["to"]),
            s(&h["requested_by"]),
            s(&h["approved_by"])
        ));
    }
    out.trim_end().to_string()
}

pub fn list_text(v: &Value) -> String {
    let mut out = format!("{:<38} {:<12} {:<12} {:<21} {}\n", "ID", "KIND", "STAGE", "UPDATED", "TARGET");
    for r in v.as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<38} {:<12} {:<12} {:<21} {}\n",
            r["id"].as_str().unwrap_or(""),
            r["kind"].as_str().unwrap_or(""),
            r["stage"].as_str().unwrap_or(""),
            when(r["updated_at"].as_i64()),
            r["target"].as_str().unwrap_or("")
        ));
    }
    out.trim_end().to_string()
}

pub fn requests_text(v: &Value) -> String {
    let mut out =
        format!("{:<38} {:<20} {:<10} {:<16} {}\n", "ID", "KIND", "STATUS", "REQUESTED BY", "SUBJECT / DETAILS");
    for r in v.as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<38} {:<20} {:<10} {:<16} {} {}\n",
            r["id"].as_str().unwrap_or(""),
            r["kind"].as_str().unwrap_or(""),
            r["status"].as_str().unwrap_or(""),
            r["requested_by"].as_str().unwrap_or(""),
            r["subject"].as_str().unwrap_or(""),
            match r["kind"].as_str() {
                Some("rotation-stage") => format!(
                    "{} -> {}",
                    r["payload"]["from"].as_str().unwrap_or(""),
                    r["payload"]["to"].as_str().unwrap_or("")
                ),
                // What the approver is asked to start: kind and target, and the new root's or
                // certificate's fingerprint (`--output json` shows the whole plan).
                Some("start-rotation") => format!(
                    "{} rotation of {}",
                    r["payload"]["kind"].as_str().unwrap_or(""),
                    r["payload"]["target"].as_str().unwrap_or("")
                ),
                _ => String::new(),
            }
        ));
    }
    out.trim_end().to_string()
}
