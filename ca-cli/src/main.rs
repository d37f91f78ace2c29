//! `ca-cli`: key ceremonies, signing, verification and the istiod bundle.
#![forbid(unsafe_code)]

mod api;
mod cli;
mod client;
mod commands;
mod database;
mod handshake;
mod output;
mod renewal;
mod simulate;

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;

use crate::cli::{Cli, Cmd, Output};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CA_LOG").unwrap_or_else(|_| "warn,cryptoki=off".into()),
        )
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion) => {
            e.exit()
        }
        Err(e) => {
            // One line, like every other error.
            let text = e.render().to_string();
            let parts: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .collect();
            eprintln!("{}", parts.join(" "));
            return ExitCode::from(2);
        }
    };
    match run(cli.cmd, cli.output) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(ToString::to_string).collect();
            eprintln!("error: {}", dedup_chain(chain).join(": "));
            ExitCode::FAILURE
        }
    }
}

/// Joins an error chain into one line without repeating a cause its parent already quoted.
fn dedup_chain(chain: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for msg in chain {
        if out.last().is_some_and(|prev| prev.contains(&msg)) {
            continue;
        }
        out.push(msg.replace('\n', " "));
    }
    out
}

fn run(cmd: Cmd, output: Output) -> Result<()> {
    use commands::*;
    match cmd {
        Cmd::Key(c) => key::run(c, output),
        Cmd::Root(c) => root::run(c, output),
        Cmd::Csr(c) => csr::run(c, output),
        Cmd::Sign(a) => sign::run(a, output),
        Cmd::Istio(c) => istio::run(c, output),
        Cmd::Verify(a) => verify::run(a, output),
        Cmd::Crl(c) => crl::run(c, output),
        Cmd::Ceremony(c) => ceremony::run(c, output),
        Cmd::Quickstart(a) => quickstart::run(a, output),
        Cmd::Cluster(c) => cluster::run(c, output),
        Cmd::Audit(c) => audit::run(c, output),
        Cmd::Database(c) => database::run(c, output),
        Cmd::Status { server, ca_root } => status::run(server, ca_root, output),
        Cmd::Rotation(c) => rotation::run(c, output),
        Cmd::Request(c) => request::run(c, output),
    }
}
