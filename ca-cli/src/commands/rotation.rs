//! `ca-cli rotation ...`: drive a staged rotation on ca-server, with an operator token from
//! `CA_TOKEN` (every stage change is a request a second operator approves with `ca-cli request
//! approve ID`); all-pairs handshake checks; the offline simulation.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::block_on;
use crate::api::{MoveRequested, RotationSummary, RotationView, Started};
use crate::cli::{Output, RotationCmd, ServerArgs, StartCmd};
use crate::client::Api;
use crate::handshake::{self, Stack};
use crate::output::{self, emit, emit_server};
use crate::simulate;

pub fn run(cmd: RotationCmd, output: Output) -> Result<()> {
    match cmd {
        RotationCmd::Start(cmd) => start(cmd, output),
        RotationCmd::Certificate { id, environment, certificate, server } => {
            add_certificate(&id, &environment, &certificate, &server, output)
        }
        RotationCmd::Status { id, server } => status(id, &server, output),
        RotationCmd::Advance { id, to, server } => stage(&id, true, to, &server, output),
        RotationCmd::Rollback { id, to, server } => stage(&id, false, to, &server, output),
        RotationCmd::Handshakes { dir, stack } => handshakes(&dir, stack, output),
        RotationCmd::Simulate { kind, clusters, workloads, retire_early, stack } => {
            simulate(&kind, clusters, workloads, retire_early, stack, output)
        }
    }
}

fn api(s: &ServerArgs) -> Result<Api> {
    Api::new(&s.server, &s.ca_root)
}

fn read_pem(path: &Path) -> Result<String> {
    let pem = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    // Checked here too, so that a wrong file is named before anything is sent.
    ca_core::cert::load_cert(path)?;
    Ok(pem)
}

fn start(cmd: StartCmd, output: Output) -> Result<()> {
    // Key references are checked before anything is read or sent.
    let (server, body) = match cmd {
        StartCmd::Root { new_root, old_root, server } => (server, Body::Root { new_root, old_root }),
        StartCmd::Environment { environment, certificate, key, server } => {
            (server, Body::Environment { environment, certificate, key: key.parse()?.to_string() })
        }
        StartCmd::Cluster { cluster, key, server } => {
            let key = key.as_ref().map(|k| k.parse()).transpose()?.map(|k| k.to_string());
            (server, Body::Cluster { cluster, key })
        }
    };
    let api = api(&server)?;
    let body = match body {
        Body::Root { new_root, old_root } => {
            json!({"kind": "root", "new_root": read_pem(&new_root)?, "old_root": old_root})
        }
        Body::Environment { environment, certificate, key } => {
            json!({"kind": "environment", "environment": environment, "certificate": read_pem(&certificate)?, "key": key})
        }
        Body::Cluster { cluster, key } => json!({"kind": "cluster", "cluster": cluster, "key": key}),
    };
    let v = block_on(api.call("POST", "/v1/rotations", Some(body)))?;
    emit_server(output, v, |v: &Started| output::started_text(v))
}

/// What `POST /v1/rotations` is asked to start, before the files are read.
enum Body {
    Root { new_root: PathBuf, old_root: Option<String> },
    Environment { environment: String, certificate: PathBuf, key: String },
    Cluster { cluster: String, key: Option<String> },
}

fn add_certificate(id: &str, environment: &str, certificate: &Path, server: &ServerArgs, output: Output) -> Result<()> {
    let api = api(server)?;
    let body = json!({"environment": environment, "certificate": read_pem(certificate)?});
    let v = block_on(api.call("POST", &format!("/v1/rotations/{id}/certificates"), Some(body)))?;
    emit_server(output, v, |v: &RotationView| output::rotation_text(v))
}

fn status(id: Option<String>, server: &ServerArgs, output: Output) -> Result<()> {
    let api = api(server)?;
    match id {
        Some(id) => {
            let v = block_on(api.call("GET", &format!("/v1/rotations/{id}"), None))?;
            emit_server(output, v, |v: &RotationView| output::rotation_text(v))
        }
        None => {
            let v = block_on(api.call("GET", "/v1/rotations", None))?;
            emit_server(output, v, |v: &Vec<RotationSummary>| output::rotations_text(v))
        }
    }
}

fn stage(id: &str, forward: bool, to: Option<String>, server: &ServerArgs, output: Output) -> Result<()> {
    let api = api(server)?;
    let verb = if forward { "advance" } else { "rollback" };
    let v: Value = block_on(api.call("POST", &format!("/v1/rotations/{id}/{verb}"), Some(json!({"to": to}))))?;
    emit_server(output, v, |v: &MoveRequested| output::move_text(v))
}

fn tempfile_dir() -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new().prefix("ca-cli-handshakes").tempdir()?)
}

fn handshakes(dir: &Path, stack: Stack, output: Output) -> Result<()> {
    let ws = handshake::load_dir(dir)?;
    let scratch = tempfile_dir()?;
    let outcome = handshake::all_pairs(&ws, stack, scratch.path())?;
    let failed = outcome.failures.len();
    emit(output, &serde_json::to_value(&outcome)?, || output::handshakes_text(&outcome));
    if failed > 0 {
        bail!("{failed} handshakes failed");
    }
    Ok(())
}

fn simulate(
    kind: &str,
    clusters: usize,
    workloads: usize,
    retire_early: bool,
    stack: Stack,
    output: Output,
) -> Result<()> {
    let kind = kind.parse().map_err(anyhow::Error::msg)?;
    if clusters == 0 || workloads == 0 || clusters * workloads < 2 {
        bail!("the simulation needs at least two workloads in all (--clusters and --workloads)");
    }
    let scratch = tempfile_dir()?;
    let opts = simulate::Options { kind, clusters, workloads, retire_early, stack };
    let steps = simulate::run(&opts, scratch.path())?;
    let failed: usize = steps.iter().map(|s| s.outcome.failures.len()).sum();
    emit(output, &serde_json::to_value(&steps)?, || output::simulation_table(&steps));
    if failed > 0 {
        bail!("{failed} handshakes failed during the simulated {kind} rotation");
    }
    Ok(())
}
