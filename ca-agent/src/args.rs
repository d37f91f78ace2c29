//! The command line. Every flag is also an environment variable, so that a Deployment sets
//! them in `env:` and nothing secret is ever on argv (the enrolment token comes from a Secret).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(name = "ca-agent", version, about = "Keeps a cluster's Istio wired to the pki-mesh hierarchy")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the controllers (what the Deployment runs).
    Run(Args),
    /// Plug-in mode: put the previous `cacerts` back (swapping it with `cacerts-previous`).
    Rollback(Args),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// istiod signs workloads with the cluster intermediate kept in Secret `cacerts`.
    Plugin,
    /// ca-server signs workloads; the agent keeps `istiod-tls` and the root ConfigMaps.
    ExternalCa,
}

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[arg(long, env = "CA_AGENT_MODE", value_enum)]
    pub mode: Mode,
    /// The cluster's registered name.
    #[arg(long, env = "CA_AGENT_CLUSTER")]
    pub cluster: String,
    /// ca-server's REST URL, e.g. `https://ca-server.pki.svc:8443`.
    #[arg(long, env = "CA_AGENT_SERVER")]
    pub server: String,
    /// The root(s) ca-server's REST certificate chains to (PEM).
    #[arg(long, env = "CA_AGENT_CA_ROOT")]
    pub ca_root: PathBuf,
    /// The agent's own namespace: its Lease, enrolment Secret and credential Secret.
    #[arg(long, env = "CA_AGENT_NAMESPACE")]
    pub namespace: Option<String>,
    /// Where istiod runs: `cacerts`, `cacerts-previous` and `istiod-tls` live there.
    #[arg(long, env = "CA_AGENT_ISTIO_NAMESPACE", default_value = "istio-system")]
    pub istio_namespace: String,
    /// Namespaces that get no `istio-ca-root-cert` (external-CA mode), comma-separated.
    #[arg(
        long,
        env = "CA_AGENT_EXCLUDE_NAMESPACES",
        value_delimiter = ',',
        default_value = "kube-system,kube-public,kube-node-lease"
    )]
    pub exclude_namespaces: Vec<String>,
    /// DNS names of istiod's serving certificate (external-CA mode); ca-server issues only
    /// names among the cluster's `server_certificate_names`.
    #[arg(long, env = "CA_AGENT_ISTIOD_DNS_NAMES", value_delimiter = ',', default_value = "istiod.istio-system.svc")]
    pub istiod_dns_names: Vec<String>,
    /// `/healthz`, `/readyz` and `/metrics` (plain HTTP).
    #[arg(long, env = "CA_AGENT_LISTEN", default_value = "0.0.0.0:9090")]
    pub listen: SocketAddr,
    /// This replica's name in the Lease (default: `$POD_NAME`, else the host name).
    #[arg(long, env = "CA_AGENT_IDENTITY")]
    pub identity: Option<String>,
    /// Secret (in `namespace`) whose key `token` holds the one-time enrolment token.
    #[arg(long, env = "CA_AGENT_ENROLMENT_SECRET", default_value = "ca-agent-enrolment")]
    pub enrolment_secret: String,
    /// How often everything is checked even when nothing changed (`30s`, `5m`).
    #[arg(long, env = "CA_AGENT_RESYNC", default_value = "60s", value_parser = parse_duration)]
    pub resync: Duration,
    /// How long a Lease holds without renewal before another replica takes over.
    #[arg(long, env = "CA_AGENT_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
}

impl Args {
    pub fn namespace(&self) -> String {
        self.namespace.clone().or_else(|| std::env::var("POD_NAMESPACE").ok()).unwrap_or_else(|| "ca-agent".into())
    }

    pub fn identity(&self) -> String {
        self.identity
            .clone()
            .or_else(|| std::env::var("POD_NAME").ok())
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_string()))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("ca-agent-{}", std::process::id()))
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let v: ca_core::duration::Validity = s.parse().map_err(|e| format!("{e}"))?;
    let secs = v.duration().whole_seconds();
    if secs <= 0 {
        return Err(format!("{s}: must be at least one second"));
    }
    Ok(Duration::from_secs(secs as u64))
}
