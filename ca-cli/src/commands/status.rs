//! `ca-cli status`: every issuer and cluster intermediate the server knows, with its expiry and
//! renewal state, for people (a table) and scripts (`--output json`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ca_core::cert::CertInfo;
use ca_core::validity::{CLUSTER_RENEWAL, renewal_due};
use serde::de::DeserializeOwned;
use serde_json::Value;
use time::OffsetDateTime;

use super::block_on;
use crate::api::{CertificateView, ClusterView, IssuerView, Problem, RotationSummary, RotationView};
use crate::cli::Output;
use crate::client;
use crate::output::{self, StatusReport, StatusRow, emit};

pub fn run(server: String, ca_root: PathBuf, output: Output) -> Result<()> {
    let token = client::token("an operator or auditor")?;
    let report = block_on(collect(&server, &ca_root, &token))?;
    emit(output, &serde_json::to_value(&report)?, || output::status_table(&report));
    Ok(())
}

/// Renewal state of a certificate valid from `nb` to `na`, at `now`: renewal is due at
/// `CLUSTER_RENEWAL` of the lifetime (when `ca-cli cluster renew` and the server's own renewal
/// act), and the last tenth of the lifetime is `expiring`.
pub fn renewal_state(nb: i64, na: i64, now: i64) -> &'static str {
    let life = (na - nb).max(1);
    if now >= na {
        "expired"
    } else if na - now <= life / 10 {
        "expiring"
    } else if renewal_due(nb, nb + life, CLUSTER_RENEWAL, now) {
        "renewal-due"
    } else {
        "ok"
    }
}

/// Collects the fleet's status from `server`, trusting `ca_root`, with an operator or auditor
/// token.
async fn collect(server: &str, ca_root: &Path, token: &str) -> Result<StatusReport> {
    let tls = client::tls_config(ca_root, None)?;
    let client = reqwest::Client::builder().use_preconfigured_tls(tls).timeout(Duration::from_secs(30)).build()?;
    let fleet = Fleet { client, server, token };
    let now = OffsetDateTime::now_utc().unix_timestamp();
    // What each active rotation is doing to each environment and cluster it covers.
    let mut rotation: BTreeMap<(&str, String), String> = BTreeMap::new();
    for r in fleet.get::<Vec<RotationSummary>>("/v1/rotations").await? {
        if matches!(r.stage.as_str(), "done" | "aborted") {
            continue;
        }
        let detail: RotationView = fleet.get(&format!("/v1/rotations/{}", r.id)).await?;
        let what = format!("{} {}", r.kind, r.stage);
        for e in detail.environments {
            rotation.insert(("environment", e.name), what.clone());
        }
        for c in detail.clusters {
            rotation.insert(("cluster", c.name), format!("{what} ({})", c.state));
        }
    }
    let mut rows = Vec::new();
    for i in fleet.get::<Vec<IssuerView>>("/v1/issuers").await? {
        let pem = i.chain.first().context("issuer without a certificate")?;
        let cert = CertInfo::from_der(pem::parse(pem)?.into_contents()).map_err(anyhow::Error::msg)?;
        let (nb, na) = (cert.not_before.unix_timestamp(), cert.not_after.unix_timestamp());
        let mut state = renewal_state(nb, na, now).to_string();
        if !i.healthy {
            state.push_str(",hsm-down");
        }
        rows.push(StatusRow {
            kind: "environment",
            name: i.name.clone(),
            environment: i.name,
            mode: "-".into(),
            serial: Some(cert.serial),
            not_after: Some(na),
            seconds_left: Some((na - now).max(0)),
            state,
            rotation: None,
        });
    }
    for c in fleet.get::<Vec<ClusterView>>("/v1/clusters").await? {
        let mut row = StatusRow {
            kind: "cluster",
            name: c.name,
            environment: c.environment,
            mode: c.mode.to_string(),
            serial: c.current_serial.clone(),
            not_after: None,
            seconds_left: None,
            state: String::new(),
            rotation: None,
        };
        row.state = match (c.status, c.current_serial) {
            (ca_store::ClusterStatus::Active, Some(serial)) => {
                let cert: CertificateView = fleet.get(&format!("/v1/certificates/{serial}")).await?;
                row.not_after = Some(cert.not_after);
                row.seconds_left = Some((cert.not_after - now).max(0));
                if c.key_compromised {
                    "key-compromised".into()
                } else if cert.revoked_at.is_none() {
                    renewal_state(cert.not_before, cert.not_after, now).into()
                } else {
                    "revoked".into()
                }
            }
            (ca_store::ClusterStatus::Active, None) => "no-intermediate".into(),
            (other, _) => other.to_string(),
        };
        rows.push(row);
    }
    for row in &mut rows {
        row.rotation = rotation.get(&(row.kind, row.name.clone())).cloned();
    }
    Ok(StatusReport { server: server.to_string(), checked_at: now, items: rows })
}

struct Fleet<'a> {
    client: reqwest::Client,
    server: &'a str,
    token: &'a str,
}

impl Fleet<'_> {
    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let req = self.client.get(format!("{}{path}", self.server.trim_end_matches('/'))).bearer_auth(self.token);
        let resp = req.send().await.with_context(|| format!("GET {path}"))?;
        let status = resp.status();
        let body: Value = resp.json().await.with_context(|| format!("GET {path}: not JSON"))?;
        if !status.is_success() {
            let detail = serde_json::from_value::<Problem>(body).ok().and_then(|p| p.detail);
            bail!("GET {path}: {status}: {}", detail.as_deref().unwrap_or("no detail"));
        }
        serde_json::from_value(body).with_context(|| format!("GET {path}: not the answer this ca-cli expects"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_states() {
        // A 90-day certificate.
        let nb = 0;
        let na = 90 * 86_400;
        assert_eq!(renewal_state(nb, na, 86_400), "ok");
        assert_eq!(renewal_state(nb, na, 61 * 86_400), "renewal-due");
        assert_eq!(renewal_state(nb, na, 82 * 86_400), "expiring");
        assert_eq!(renewal_state(nb, na, na), "expired");
    }
}
