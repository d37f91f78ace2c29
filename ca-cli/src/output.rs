//! What the commands print: one JSON document with `--output json`, or its text form. The
//! documents a command assembles itself (as opposed to a result type of ca-core or of the
//! renewal, handshake and simulation code, or a server's answer) are defined here, and every
//! text form is, so that how a result reads is in one place and a command's body is the work.

use std::path::Path;

use anyhow::{Context, Result};
use ca_core::cert::CertInfo;
use ca_core::error::fmt_time;
use hsm::{KeyAlgorithm, KeyRef};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::api::{MoveRequested, RequestView, RotationSummary, RotationView, StagePayload, StartPayload, Started};
use crate::cli::Output;
use crate::handshake::Outcome;
use crate::renewal::{Renewal, RolledBack};
use crate::simulate::Step;

/// Prints `json` (pretty) or the text `text` makes.
pub fn emit(output: Output, json: &Value, text: impl FnOnce() -> String) {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(json).expect("serialisable")),
        Output::Text => println!("{}", text()),
    }
}

/// Prints a server's document as the server sent it (`--output json`; fields this CLI does not
/// know included), or read as `T` for its text form.
pub fn emit_server<T: DeserializeOwned>(output: Output, doc: Value, text: impl FnOnce(&T) -> String) -> Result<()> {
    match output {
        Output::Json => emit(output, &doc, String::new),
        Output::Text => {
            let v: T = serde_json::from_value(doc).context("the server's answer is not what this ca-cli expects")?;
            println!("{}", text(&v));
        }
    }
    Ok(())
}

/// Text that is the JSON document itself (`ca-cli key info`).
pub fn json_text(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

// ---- offline commands ----------------------------------------------------------------------

pub fn key_generated_text(algorithm: KeyAlgorithm, key: &KeyRef, sha256: &str, public_out: Option<&Path>) -> String {
    format!(
        "generated {} key {}\n  public key sha256: {}{}",
        algorithm,
        key,
        sha256,
        public_out.map(|p| format!("\n  public key written to {}", p.display())).unwrap_or_default()
    )
}

pub fn cert_json(c: &CertInfo, path: &Path) -> Value {
    json!({
        "path": path,
        "subject": c.subject,
        "issuer": c.issuer,
        "serial": c.serial,
        "not_before": fmt_time(c.not_before),
        "not_after": fmt_time(c.not_after),
        "is_ca": c.is_ca,
        "path_len": c.path_len,
        "trust_domains": c.trust_domains(),
        "uris": c.uris,
        "sha256_fingerprint": c.fingerprint(),
    })
}

pub fn cert_text(c: &CertInfo, path: &Path) -> String {
    format!(
        "wrote {}\n  subject:  {}\n  issuer:   {}\n  serial:   {}\n  validity: {} .. {}\n  sha256:   {}",
        path.display(),
        c.subject,
        c.issuer,
        c.serial,
        fmt_time(c.not_before),
        fmt_time(c.not_after),
        c.fingerprint(),
    )
}

pub fn csr_text(out: &Path, subject: &str) -> String {
    format!("wrote {} for {subject}", out.display())
}

pub fn cacerts_text(r: &ca_core::cacerts::CacertsReport) -> String {
    let mut s = format!("wrote istiod plug-in CA files to {}:\n", r.out_dir.display());
    for f in &r.files {
        s.push_str(&format!("  {}\n", f.display()));
    }
    s.push_str(&format!(
        "chain: {}\nsigning certificate expires {}\napply with: kubectl apply -f {}",
        r.chain.join(" -> "),
        r.signing_cert_not_after,
        r.out_dir.join("cacerts.yaml").display()
    ));
    s
}

pub fn verify_text(leaf: &Path, path: &[CertInfo]) -> String {
    let names: Vec<String> =
        path.iter().map(|c| if c.subject.is_empty() { c.uris.join(",") } else { c.subject.clone() }).collect();
    format!("{}: OK\n  {}", leaf.display(), names.join("\n  -> "))
}

pub fn crl_text(out: &Path, req: &ca_core::crl::CrlRequest) -> String {
    format!(
        "wrote {} (CRL number {}, {} revoked, next update {})",
        out.display(),
        req.number,
        req.revoked.len(),
        fmt_time(req.next_update)
    )
}

pub fn ceremony_check_text(file: &Path, r: &ca_core::ceremony::CheckReport) -> String {
    format!(
        "{}: {} ceremony OK\n  sha256: {}\n  keys: {}\n  outputs: {}",
        file.display(),
        serde_json::to_value(r.ceremony_type).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
        r.sha256,
        r.keys.join(", "),
        r.outputs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )
}

pub fn ceremony_run_text(file: &Path, r: &ca_core::ceremony::RunReport) -> String {
    let mut s = format!("{}: ceremony completed\n", file.display());
    for o in &r.entry.outputs {
        s.push_str(&format!("  wrote {} (sha256 {})\n", o.path, o.sha256.as_deref().unwrap_or("?")));
    }
    for (k, v) in &r.details {
        s.push_str(&format!("  {k}: {}\n", v.as_str().map(String::from).unwrap_or_else(|| v.to_string())));
    }
    s.push_str(&format!("  transcript: {}", r.transcript.display()));
    s
}

pub fn quickstart_text(r: &ca_core::quickstart::Report) -> String {
    // The CLI's quickstart always builds the cluster tier.
    let none = std::path::PathBuf::new();
    let cluster_cert = r.cluster_cert.as_ref().unwrap_or(&none);
    let cacerts_dir = r.cacerts_dir.as_ref().unwrap_or(&none);
    let custody = match &r.hsm_module {
        Some(m) => format!("SoftHSM2 token {:?} ({})", ca_core::quickstart::TOKEN_LABEL, m.display()),
        None => "file keys (no HSM)".into(),
    };
    let mut s = format!("quickstart hierarchy in {}\n  key custody:  {custody}\n", r.dir.display());
    s.push_str(&format!("  root:         {}\n", r.root_cert.display()));
    s.push_str(&format!("  environment:  {}\n", r.environment_cert.display()));
    s.push_str(&format!("  cluster:      {}\n", cluster_cert.display()));
    s.push_str(&format!("  istiod files: {}\n", cacerts_dir.display()));
    s.push_str("  ceremonies:\n");
    for c in &r.ceremonies {
        s.push_str(&format!("    {}\n", c.display()));
    }
    s.push_str("  transcripts:\n");
    for t in &r.transcripts {
        s.push_str(&format!("    {}\n", t.display()));
    }
    if let Some(conf) = &r.softhsm_conf {
        s.push_str(&format!("\nTo use the token yourself: export SOFTHSM2_CONF={}\n", conf.display()));
    }
    s.push_str(&format!(
        "Next: ca-cli verify --root {} --chain {} {}\n      kubectl apply -f {}",
        r.root_cert.display(),
        r.environment_cert.display(),
        cluster_cert.display(),
        cacerts_dir.join("cacerts.yaml").display()
    ));
    s
}

/// `ca-cli audit verify`.
#[derive(Serialize)]
pub struct AuditReport {
    pub ok: bool,
    pub records: u64,
    pub head_seq: i64,
    pub head_hash: String,
    pub checkpoints: u64,
    /// Which key the checkpoints were checked with.
    pub checkpoint_key: &'static str,
    /// Records after the last signed checkpoint.
    pub unsigned_tail: i64,
}

pub fn audit_text(r: &AuditReport) -> String {
    format!(
        "audit trail OK: {} records up to #{}, {} signed checkpoints verified with {}",
        r.records, r.head_seq, r.checkpoints, r.checkpoint_key
    )
}

// ---- the cluster side ----------------------------------------------------------------------

pub fn renewal_text(cluster: &str, state_dir: &Path, r: &Renewal) -> String {
    match r {
        Renewal::Renewed { via, serial, not_after, .. } => format!(
            "{cluster} ({via}): new intermediate {serial} valid until {not_after}; istiod files in {}",
            state_dir.display()
        ),
        Renewal::Kept { bundle_updated, serial, not_after, renew_after, .. } => format!(
            "{cluster}: intermediate {serial} is valid until {not_after}; not renewing before {renew_after} (use --force to renew now){}",
            if *bundle_updated { "; installed the server's new trust bundle" } else { "" }
        ),
    }
}

pub fn rolled_back_text(r: &RolledBack) -> String {
    format!("rolled back to intermediate {}", r.serial)
}

// ---- fleet status, rotations and requests --------------------------------------------------

fn when(t: Option<i64>) -> String {
    t.and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok()).map_or("-".into(), fmt_time)
}

/// Time left, in days and hours (or hours and minutes under a day).
fn left(secs: i64) -> String {
    if secs <= 0 {
        return "-".into();
    }
    let (d, h) = (secs / 86_400, (secs % 86_400) / 3_600);
    if d > 0 { format!("{d}d{h}h") } else { format!("{h}h{}m", (secs % 3_600) / 60) }
}

/// The fleet as `--output json` prints it.
#[derive(Serialize)]
pub struct StatusReport {
    pub server: String,
    pub checked_at: i64,
    pub items: Vec<StatusRow>,
}

/// One environment intermediate or cluster.
#[derive(Serialize)]
pub struct StatusRow {
    /// `environment` or `cluster`.
    pub kind: &'static str,
    pub name: String,
    pub environment: String,
    /// A cluster's mode; `-` for an environment.
    pub mode: String,
    pub serial: Option<String>,
    pub not_after: Option<i64>,
    pub seconds_left: Option<i64>,
    /// A renewal state, or why there is none (`no-intermediate`, `revoked`, a registration's
    /// status...).
    pub state: String,
    /// What an active rotation is doing to it.
    pub rotation: Option<String>,
}

/// `ca-cli status`: one line per issuer and cluster.
pub fn status_table(v: &StatusReport) -> String {
    let mut out = format!(
        "{:<12} {:<24} {:<12} {:<12} {:<21} {:<9} {:<18} {}\n",
        "KIND", "NAME", "ENVIRONMENT", "MODE", "NOT AFTER", "LEFT", "STATE", "ROTATION"
    );
    for r in &v.items {
        out.push_str(&format!(
            "{:<12} {:<24} {:<12} {:<12} {:<21} {:<9} {:<18} {}\n",
            r.kind,
            r.name,
            r.environment,
            r.mode,
            when(r.not_after),
            r.seconds_left.map_or("-".into(), left),
            r.state,
            r.rotation.as_deref().unwrap_or("-"),
        ));
    }
    out.trim_end().to_string()
}

pub fn started_text(v: &Started) -> String {
    format!(
        "rotation {} requested; a second operator approves it with `ca-cli request approve {}`",
        v.rotation, v.request_id
    )
}

pub fn move_text(v: &MoveRequested) -> String {
    format!(
        "asked to move rotation {} from {} to {}; a second operator approves with `ca-cli request approve {}`",
        v.rotation, v.from, v.to, v.request_id
    )
}

/// One rotation: stage, each cluster's progress, and what blocks the next stage.
pub fn rotation_text(v: &RotationView) -> String {
    let or_dash = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".into());
    let mut out = format!(
        "rotation {} ({} {})\n  stage: {}   next: {}   rollback: {}\n  stages: {}\n",
        v.id,
        v.kind,
        v.target,
        v.stage,
        or_dash(&v.next),
        or_dash(&v.rollback),
        v.stages.join(" -> ")
    );
    if let (Some(o), Some(n)) = (&v.old_root, &v.new_root) {
        out.push_str(&format!("  old root sha256: {o}\n  new root sha256: {n}\n"));
    }
    for e in &v.environments {
        out.push_str(&format!(
            "  environment {}: old certificate {}, new certificate {}\n",
            e.name,
            e.old_certificate,
            e.new_certificate.as_deref().unwrap_or("(not added yet)")
        ));
    }
    if v.drain_until.is_some() {
        out.push_str(&format!("  drain until: {}\n", when(v.drain_until)));
    }
    out.push_str(&format!(
        "\n  {:<20} {:<12} {:<12} {:<8} {:<8} {:<21} {}\n",
        "CLUSTER", "MODE", "PROGRESS", "BUNDLE", "CHAIN", "REPORTED", "LAGGING WORKLOADS"
    ));
    for c in &v.clusters {
        let yes = |b: bool| if b { "ok" } else { "old" };
        out.push_str(&format!(
            "  {:<20} {:<12} {:<12} {:<8} {:<8} {:<21} {}\n",
            c.name,
            c.mode,
            c.state,
            yes(c.bundle_ok),
            yes(c.chain_ok),
            when(c.reported_at),
            if c.mode == ca_store::ClusterMode::ExternalCa {
                format!("{} old bundle, {} old chain", c.stale_bundle_workloads, c.stale_chain_workloads)
            } else {
                "-".into()
            }
        ));
    }
    match &v.next {
        None => out.push_str("\n  finished."),
        Some(next) if v.blockers.is_empty() => {
            out.push_str(&format!("\n  ready: `ca-cli rotation advance {}` may move it to {next}.", v.id))
        }
        Some(next) => {
            out.push_str(&format!("\n  blocked from {next}:\n"));
            for b in &v.blockers {
                match &b.cluster {
                    Some(c) => out.push_str(&format!("    - cluster {c}: {}\n", b.reason)),
                    None => out.push_str(&format!("    - {}\n", b.reason)),
                }
            }
        }
    }
    for h in &v.history {
        out.push_str(&format!(
            "\n  {} {} -> {} (requested by {}, approved by {})",
            when(Some(h.at)),
            h.from,
            h.to,
            h.requested_by,
            h.approved_by
        ));
    }
    out.trim_end().to_string()
}

/// Every rotation, newest first.
pub fn rotations_text(v: &[RotationSummary]) -> String {
    let mut out = format!("{:<38} {:<12} {:<12} {:<21} {}\n", "ID", "KIND", "STAGE", "UPDATED", "TARGET");
    for r in v {
        out.push_str(&format!(
            "{:<38} {:<12} {:<12} {:<21} {}\n",
            r.id,
            r.kind,
            r.stage,
            when(Some(r.updated_at)),
            r.target
        ));
    }
    out.trim_end().to_string()
}

pub fn requests_text(v: &[RequestView]) -> String {
    let mut out =
        format!("{:<38} {:<20} {:<10} {:<16} {}\n", "ID", "KIND", "STATUS", "REQUESTED BY", "SUBJECT / DETAILS");
    for r in v {
        out.push_str(&format!(
            "{:<38} {:<20} {:<10} {:<16} {} {}\n",
            r.id,
            r.kind,
            r.status,
            r.requested_by,
            r.subject,
            match r.kind.as_str() {
                "rotation-stage" => {
                    let p: StagePayload = r.payload();
                    format!("{} -> {}", p.from, p.to)
                }
                // What the approver is asked to start: kind and target, and the new root's or
                // certificate's fingerprint (`--output json` shows the whole plan).
                "start-rotation" => {
                    let p: StartPayload = r.payload();
                    format!("{} rotation of {}", p.kind, p.target)
                }
                _ => String::new(),
            }
        ));
    }
    out.trim_end().to_string()
}

/// `approved` or `rejected`.
pub fn decided_text(id: &str, decision: &str, r: &RequestView) -> String {
    format!("request {id} ({} {}) {decision}", r.kind, r.subject)
}

// ---- handshakes and the simulation ---------------------------------------------------------

pub fn handshakes_text(o: &Outcome) -> String {
    let mut s = format!("{} handshakes, {} failed", o.handshakes, o.failures.len());
    for f in &o.failures {
        s.push_str(&format!("\n  {} {} -> {}: {}", f.stack, f.client, f.server, f.error));
    }
    s
}

pub fn simulation_table(steps: &[Step]) -> String {
    let mut out = format!("{:<11} {:<28} {:>9} {:>11} {:>9}\n", "STAGE", "STEP", "WORKLOADS", "HANDSHAKES", "FAILURES");
    for s in steps {
        out.push_str(&format!(
            "{:<11} {:<28} {:>9} {:>11} {:>9}\n",
            s.stage.as_str(),
            s.step,
            s.workloads,
            s.outcome.handshakes,
            s.outcome.failures.len()
        ));
    }
    let failures: Vec<_> = steps.iter().flat_map(|s| s.outcome.failures.iter().map(move |f| (s, f))).collect();
    for (s, f) in failures.iter().take(10) {
        out.push_str(&format!("  {} / {}: {} {} -> {}: {}\n", s.stage, s.step, f.stack, f.client, f.server, f.error));
    }
    if failures.len() > 10 {
        out.push_str(&format!("  ... and {} more\n", failures.len() - 10));
    }
    out.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_left() {
        assert_eq!(left(90_061), "1d1h");
        assert_eq!(left(3_660), "1h1m");
        assert_eq!(left(0), "-");
    }

    /// Requests as `GET /v1/requests` sends them: the details column reads each kind's payload.
    #[test]
    fn requests_read_their_payloads() {
        let v: Vec<RequestView> = serde_json::from_value(json!([
            {"id": "r1", "kind": "rotation-stage", "subject": "rot1", "payload": {"rotation": "rot1", "from": "a", "to": "b"},
             "requested_by": "alice", "requested_at": 1, "status": "pending", "decided_by": null, "decided_at": null},
            {"id": "r2", "kind": "start-rotation", "subject": "rot2",
             "payload": {"rotation": "rot2", "kind": "root", "target": "all", "spec": {}},
             "requested_by": "alice", "requested_at": 1, "status": "approved", "decided_by": "bob", "decided_at": 2},
            {"id": "r3", "kind": "register-cluster", "subject": "east", "payload": {"name": "east"},
             "requested_by": "alice", "requested_at": 1, "status": "rejected", "decided_by": "bob", "decided_at": 2}
        ]))
        .unwrap();
        let text = requests_text(&v);
        let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            ["r1", "rotation-stage", "pending", "alice", "rot1", "a", "->", "b"]
        );
        assert!(lines[2].ends_with("rot2 root rotation of all"), "{text}");
        assert!(lines[3].ends_with("east"), "{text}");
    }

    /// A rotation as `GET /v1/rotations/{id}` sends it, held back by a lagging cluster.
    #[test]
    fn rotation_names_its_blockers() {
        let v: RotationView = serde_json::from_value(json!({
            "id": "rot1", "kind": "root", "target": "all", "stage": "bundle-added", "next": "issuing-new",
            "rollback": "prepared", "stages": ["prepared", "bundle-added", "issuing-new", "done"],
            "blockers": [{"cluster": "east", "reason": "lags"}, {"cluster": null, "reason": "drain"}],
            "clusters": [{"name": "east", "environment": "dev", "mode": "external-ca", "state": "lagging",
                "bundle_ok": true, "chain_ok": false, "intermediate_serial": null, "reported_at": null,
                "stale_bundle_workloads": 3, "stale_chain_workloads": 7, "blockers": ["lags"]}],
            "environments": [{"name": "dev", "old_certificate": "01", "new_certificate": null}],
            "drain_until": null, "bundle_changed_at": 1, "chain_changed_at": 2, "old_root": null, "new_root": null,
            "history": [], "created_by": "alice", "created_at": 1, "updated_at": 2
        }))
        .unwrap();
        let text = rotation_text(&v);
        assert!(text.contains("stage: bundle-added   next: issuing-new   rollback: prepared"), "{text}");
        assert!(text.contains("environment dev: old certificate 01, new certificate (not added yet)"), "{text}");
        assert!(text.contains("3 old bundle, 7 old chain"), "{text}");
        assert!(text.ends_with("blocked from issuing-new:\n    - cluster east: lags\n    - drain"), "{text}");
    }
}
