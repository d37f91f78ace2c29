//! `ca-cli status`: every issuer and cluster intermediate the server knows, with its expiry and
//! renewal state, for people (a table) and scripts (`--output json`).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ca_core::cert::CertInfo;
use serde_json::{Value, json};
use time::OffsetDateTime;

/// Renewal state of a certificate valid from `nb` to `na`, at `now`: renewal is due at two
/// thirds of the lifetime (when `ca-cli cluster renew` and the server's own renewal act), and
/// the last tenth of the lifetime is `expiring`.
pub fn renewal_state(nb: i64, na: i64, now: i64) -> &'static str {
    let life = (na - nb).max(1);
    if now >= na {
        "expired"
    } else if na - now <= life / 10 {
        "expiring"
    } else if now >= nb + life * 2 / 3 {
        "renewal-due"
    } else {
        "ok"
    }
}

fn left(secs: i64) -> String {
    if secs <= 0 {
        return "-".into();
    }
    let (d, h) = (secs / 86_400, (secs % 86_400) / 3_600);
    if d > 0 { format!("{d}d{h}h") } else { format!("{h}h{}m", (secs % 3_600) / 60) }
}

/// Collects the fleet's status from `server`, trusting `ca_root`, with an operator or auditor
/// token.
pub async fn collect(server: &str, ca_root: &Path, token: &str) -> Result<Value> {
    let tls = crate::cluster::tls_config(ca_root, None)?;
    let client = reqwest::Client::builder().use_preconfigured_tls(tls).timeout(Duration::from_secs(30)).build()?;
    let get = |path: String| {
        let req = client.get(format!("{}{path}", server.trim_end_matches('/'))).bearer_auth(token);
        async move {
            let resp = req.send().await.with_context(|| format!("GET {path}"))?;
            let status = resp.status();
            let body: Value = resp.json().await.with_context(|| format!("GET {path}: not JSON"))?;
            if !status.is_success() {
                bail!("GET {path}: {status}: {}", body["detail"].as_str().unwrap_or("no detail"));
            }
            Ok::<Value, anyhow::Error>(body)
        }
    };
    let now = OffsetDateTime::now_utc().unix_timestamp();
    // What each active rotation is doing to each environment and cluster it covers.
    let mut rotation: std::collections::BTreeMap<(String, String), String> = Default::default();
    for r in get("/v1/rotations".into()).await?.as_array().cloned().unwrap_or_default() {
        if matches!(r["stage"].as_str(), Some("done" | "aborted")) {
            continue;
        }
        let id = r["id"].as_str().unwrap_or_default();
        let detail = get(format!("/v1/rotations/{id}")).await?;
        let what = format!("{} {}", r["kind"].as_str().unwrap_or_default(), r["stage"].as_str().unwrap_or_default());
        for e in detail["environments"].as_array().into_iter().flatten() {
            rotation.insert(("environment".into(), e["name"].as_str().unwrap_or_default().into()), what.clone());
        }
        for c in detail["clusters"].as_array().into_iter().flatten() {
            let state = c["state"].as_str().unwrap_or_default();
            rotation
                .insert(("cluster".into(), c["name"].as_str().unwrap_or_default().into()), format!("{what} ({state})"));
        }
    }
    let mut rows = Vec::new();
    for i in get("/v1/issuers".into()).await?.as_array().cloned().unwrap_or_default() {
        let pem = i["chain"][0].as_str().context("issuer without a certificate")?;
        let cert = CertInfo::from_der(pem::parse(pem)?.into_contents()).map_err(anyhow::Error::msg)?;
        let (nb, na) = (cert.not_before.unix_timestamp(), cert.not_after.unix_timestamp());
        let mut state = renewal_state(nb, na, now).to_string();
        if i["healthy"] == false {
            state.push_str(",hsm-down");
        }
        rows.push(json!({"kind": "environment", "name": i["name"], "environment": i["name"], "mode": "-",
            "serial": cert.serial, "not_after": na, "seconds_left": (na - now).max(0), "state": state}));
    }
    for c in get("/v1/clusters".into()).await?.as_array().cloned().unwrap_or_default() {
        let mut row = json!({"kind": "cluster", "name": c["name"], "environment": c["environment"], "mode": c["mode"],
            "serial": c["current_serial"], "not_after": null, "seconds_left": null});
        row["state"] = match (c["status"].as_str(), c["current_serial"].as_str()) {
            (Some("active"), Some(serial)) => {
                let cert = get(format!("/v1/certificates/{serial}")).await?;
                let (nb, na) = (cert["not_before"].as_i64().unwrap_or(0), cert["not_after"].as_i64().unwrap_or(0));
                row["not_after"] = json!(na);
                row["seconds_left"] = json!((na - now).max(0));
                if c["key_compromised"] == true {
                    json!("key-compromised")
                } else if cert["revoked_at"].is_null() {
                    json!(renewal_state(nb, na, now))
                } else {
                    json!("revoked")
                }
            }
            (Some("active"), None) => json!("no-intermediate"),
            (Some(other), _) => json!(other),
            (None, _) => json!("unknown"),
        };
        rows.push(row);
    }
    for row in &mut rows {
        let key = (
            row["kind"].as_str().unwrap_or_default().to_string(),
            row["name"].as_str().unwrap_or_default().to_string(),
        );
        row["rotation"] = rotation.get(&key).map_or(Value::Null, |r| json!(r));
    }
    Ok(json!({"server": server, "checked_at": now, "items": rows}))
}

pub fn table(v: &Value) -> String {
    let mut out = format!(
        "{:<12} {:<24} {:<12} {:<12} {:<21} {:<9} {:<18} {}\n",
        "KIND", "NAME", "ENVIRONMENT", "MODE", "NOT AFTER", "LEFT", "STATE", "ROTATION"
    );
    for r in v["items"].as_array().into_iter().flatten() {
        let not_after = r["not_after"]
            .as_i64()
            .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
            .map_or("-".to_string(), ca_core::error::fmt_time);
        out.push_str(&format!(
            "{:<12} {:<24} {:<12} {:<12} {:<21} {:<9} {:<18} {}\n",
            r["kind"].as_str().unwrap_or(""),
            r["name"].as_str().unwrap_or(""),
            r["environment"].as_str().unwrap_or(""),
            r["mode"].as_str().unwrap_or(""),
            not_after,
            r["seconds_left"].as_i64().map_or("-".into(), left),
            r["state"].as_str().unwrap_or(""),
            r["rotation"].as_str().unwrap_or("-"),
        ));
    }
    out.trim_end().to_string()
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
        assert_eq!(left(90_061), "1d1h");
        assert_eq!(left(3_660), "1h1m");
        assert_eq!(left(0), "-");
    }
}
