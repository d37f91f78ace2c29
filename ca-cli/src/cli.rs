//! The command line as clap sees it: every subcommand, flag and help text.

use std::path::PathBuf;

use anyhow::Result;
use ca_core::duration::Validity;
use ca_core::names::{SpiffeId, TrustDomain};
use ca_core::profile::ProfileKind;
use clap::{Args, Parser, Subcommand, ValueEnum};
use hsm::{KeyAlgorithm, KeyRef};

use crate::handshake;

#[derive(Parser)]
#[command(name = "ca-cli", version, about = "Hierarchical PKI for service meshes: ceremonies, signing, verification")]
pub struct Cli {
    /// Output format for commands that print data.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Generate or inspect keys.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Create a self-signed root certificate.
    #[command(subcommand)]
    Root(RootCmd),
    /// Create a certificate signing request.
    #[command(subcommand)]
    Csr(CsrCmd),
    /// Sign a CSR with a CA key under a profile.
    Sign(SignArgs),
    /// Istio integration.
    #[command(subcommand)]
    Istio(IstioCmd),
    /// Verify a certificate chain to a root.
    Verify(VerifyArgs),
    /// Certificate revocation lists.
    #[command(subcommand)]
    Crl(CrlCmd),
    /// Check or run a ceremony file.
    #[command(subcommand)]
    Ceremony(CeremonyCmd),
    /// Build a throwaway hierarchy (root, environment, cluster) and an istiod bundle in DIR.
    Quickstart(QuickstartArgs),
    /// Cluster-side enrolment and renewal against ca-server.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Audit trail verification.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// The server's database schema.
    #[command(subcommand)]
    Database(DatabaseCmd),
    /// Every issuer and cluster intermediate a ca-server knows: expiry and renewal state.
    /// The operator or auditor token comes from CA_TOKEN, never the command line.
    Status {
        /// ca-server's base URL (or CA_SERVER_URL).
        #[arg(long, env = "CA_SERVER_URL")]
        server: String,
        /// The root that ca-server's TLS certificate chains to (or CA_ROOT_CERT).
        #[arg(long, env = "CA_ROOT_CERT")]
        ca_root: PathBuf,
    },
    /// Staged root, environment and cluster intermediate rotations on ca-server (operator
    /// token from CA_TOKEN); all-pairs handshake checks; the offline rotation simulation.
    #[command(subcommand)]
    Rotation(RotationCmd),
    /// Requests awaiting a second operator (the two-person rule): list, approve, reject.
    #[command(subcommand)]
    Request(RequestCmd),
}

/// Where ca-server is and how to trust its TLS certificate.
#[derive(Args, Clone)]
pub struct ServerArgs {
    /// ca-server's base URL (or CA_SERVER_URL).
    #[arg(long, env = "CA_SERVER_URL")]
    pub server: String,
    /// The root that ca-server's TLS certificate chains to (or CA_ROOT_CERT).
    #[arg(long, env = "CA_ROOT_CERT")]
    pub ca_root: PathBuf,
}

#[derive(Subcommand)]
pub enum RotationCmd {
    /// Ask to start a rotation; a second operator approves it (`ca-cli request approve`).
    #[command(subcommand)]
    Start(StartCmd),
    /// Root rotation: add an environment's certificate re-signed by the new root (the
    /// cross-sign ceremony's output).
    Certificate {
        id: String,
        #[arg(long)]
        environment: String,
        #[arg(long)]
        certificate: PathBuf,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// A rotation's stage, each cluster's progress and what blocks the next stage; without an
    /// ID, every rotation.
    Status {
        id: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Ask to move to the next stage (refused, with the reasons, while any cluster lags).
    Advance {
        id: String,
        /// The stage you expect next; refused if the rotation is elsewhere.
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Ask to move one stage back (or abort before anything was re-issued).
    Rollback {
        id: String,
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// All-pairs mTLS handshakes between the workloads in DIR (one subdirectory each with
    /// cert-chain.pem, key.pem and root-cert.pem), over loopback; exits 1 on any failure.
    Handshakes {
        dir: PathBuf,
        #[arg(long, value_enum, default_value_t = handshake::Stack::Both)]
        stack: handshake::Stack,
    },
    /// Play a rotation on a throwaway mesh (M clusters x N workloads, real TLS on loopback)
    /// and report failed handshakes per stage; exits 1 on any failure.
    Simulate {
        /// root, environment or cluster.
        #[arg(long, default_value = "root")]
        kind: String,
        #[arg(long, default_value_t = 2)]
        clusters: usize,
        #[arg(long, default_value_t = 3)]
        workloads: usize,
        /// Skip the drain: retire the old root while workloads still present the old chain.
        #[arg(long)]
        retire_early: bool,
        #[arg(long, value_enum, default_value_t = handshake::Stack::Both)]
        stack: handshake::Stack,
    },
}

#[derive(Subcommand)]
pub enum StartCmd {
    /// Replace the root every environment under it chains to.
    Root {
        /// The new root certificate (PEM), from the root ceremony.
        #[arg(long)]
        new_root: PathBuf,
        /// SHA-256 of the root to replace (default: the only root in use).
        #[arg(long)]
        old_root: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Replace an environment intermediate with a new one (new key) under the same root.
    Environment {
        #[arg(long)]
        environment: String,
        /// The new intermediate (PEM), from the intermediate ceremony.
        #[arg(long)]
        certificate: PathBuf,
        /// Its key (pkcs11:... or file:...), which the server opens.
        #[arg(long)]
        key: KeyArg,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Replace a cluster's intermediate with one for a new key.
    Cluster {
        #[arg(long)]
        cluster: String,
        /// External-CA clusters: the new server-held key. Plug-in clusters make their own.
        #[arg(long)]
        key: Option<KeyArg>,
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Subcommand)]
pub enum RequestCmd {
    List {
        /// pending, approved or rejected.
        #[arg(long)]
        status: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Approve a request someone else made.
    Approve {
        id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    Reject {
        id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Enrol (first run, with CA_ENROLMENT_TOKEN) or renew the cluster intermediate and write
    /// istiod's cacerts files into --state-dir atomically. Meant for a CronJob.
    Renew {
        /// ca-server base URL, e.g. https://ca.example.com:8443.
        #[arg(long, env = "CA_SERVER_URL")]
        server: String,
        #[arg(long)]
        cluster: String,
        #[arg(long)]
        state_dir: PathBuf,
        /// Roots that the server's TLS certificate chains to.
        #[arg(long, env = "CA_ROOT_CERT")]
        ca_root: PathBuf,
        /// File holding the one-time enrolment token (or set CA_ENROLMENT_TOKEN).
        #[arg(long)]
        enrolment_token_file: Option<PathBuf>,
        /// Renew now, whatever the current certificate's age.
        #[arg(long)]
        force: bool,
    },
    /// Switch back to the previous set of cacerts files.
    Rollback {
        #[arg(long)]
        state_dir: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum DatabaseCmd {
    /// Apply ca-store's migrations and exit, as the schema owner, so that ca-server itself can
    /// run with `database.migrate = false` under a role that may not change the schema (the
    /// Helm chart's pre-install/pre-upgrade Job). The URL, with its password, comes from
    /// CA_DATABASE_URL, never argv.
    Migrate {
        /// sqlite://PATH or postgres://...
        #[arg(long, env = "CA_DATABASE_URL", hide_env_values = true)]
        database: String,
    },
}

#[derive(Subcommand)]
pub enum AuditCmd {
    /// Check the whole hash chain and the signed checkpoints; name the first bad record.
    Verify {
        /// sqlite://PATH or postgres://...
        #[arg(long, env = "CA_DATABASE_URL")]
        database: String,
        /// The audit public key (PEM) to check checkpoint signatures against.
        #[arg(long, env = "CA_AUDIT_PUBLIC_KEY")]
        audit_key: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum KeyCmd {
    /// Generate a key in a PKCS#11 token or a new file.
    Generate {
        #[arg(long)]
        key: KeyArg,
        #[arg(long)]
        algorithm: KeyAlgorithm,
        /// Also write the public key (PEM) here.
        #[arg(long)]
        public_out: Option<PathBuf>,
    },
    /// Show a key's public key and, for token keys, its custody attributes.
    Info {
        #[arg(long)]
        key: KeyArg,
    },
}

#[derive(Subcommand)]
pub enum RootCmd {
    Create {
        #[arg(long)]
        key: KeyArg,
        #[arg(long)]
        subject: String,
        #[arg(long)]
        validity: Validity,
        #[arg(long, default_value_t = 2)]
        path_len: u32,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum CsrCmd {
    Create {
        #[arg(long)]
        key: KeyArg,
        #[arg(long)]
        subject: String,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
pub struct SignArgs {
    #[arg(long)]
    pub profile: ProfileKind,
    #[arg(long)]
    pub ca_cert: PathBuf,
    #[arg(long)]
    pub ca_key: KeyArg,
    #[arg(long)]
    pub csr: PathBuf,
    /// Trust domain the CA serves (environment and cluster profiles); repeatable.
    #[arg(long = "trust-domain")]
    pub trust_domains: Vec<TrustDomain>,
    #[arg(long)]
    pub validity: Validity,
    /// Add critical URI name constraints permitting only the trust domains. rustls-webpki,
    /// and so ztunnel (Istio ambient mode), rejects such chains: see docs/name-constraints.md.
    #[arg(long)]
    pub name_constraints: bool,
    /// CRL distribution point URL; repeatable.
    #[arg(long = "crl-url")]
    pub crl_urls: Vec<String>,
    /// AIA caIssuers URL; repeatable.
    #[arg(long = "ca-issuer-url")]
    pub ca_issuer_urls: Vec<String>,
    /// SPIFFE ID of a workload certificate (workload profile).
    #[arg(long)]
    pub spiffe_id: Option<SpiffeId>,
    /// The CA server's database (sqlite://PATH or postgres://...): refuse a key it has
    /// blocked (revoked for key or CA compromise). Read only.
    #[arg(long, env = "CA_DATABASE_URL")]
    pub database: Option<String>,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Subcommand)]
pub enum IstioCmd {
    /// Write istiod's plug-in CA files and a `cacerts` Secret manifest.
    Cacerts {
        #[arg(long)]
        cert: PathBuf,
        /// The cluster key; istiod must hold it, so it is a file: key.
        #[arg(long)]
        key: KeyArg,
        /// Intermediate certificates between the cluster and the root; repeatable.
        #[arg(long)]
        chain: Vec<PathBuf>,
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        out_dir: PathBuf,
        #[arg(long, default_value = "istio-system")]
        namespace: String,
    },
}

#[derive(Args)]
pub struct VerifyArgs {
    #[arg(long)]
    pub root: PathBuf,
    /// Intermediate certificates; repeatable.
    #[arg(long)]
    pub chain: Vec<PathBuf>,
    pub leaf: PathBuf,
}

#[derive(Subcommand)]
pub enum CrlCmd {
    Create {
        #[arg(long)]
        ca_cert: PathBuf,
        #[arg(long)]
        ca_key: KeyArg,
        /// SERIAL[:reason], serial in hex; repeatable.
        #[arg(long)]
        revoke: Vec<String>,
        #[arg(long)]
        next_update: Validity,
        /// Defaults to the current Unix time, which keeps CRL numbers increasing without state.
        #[arg(long)]
        crl_number: Option<u64>,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum CeremonyCmd {
    /// Validate a ceremony file, its inputs and outputs without touching the HSM.
    Check { file: PathBuf },
    /// Run a ceremony and append its transcript next to the outputs.
    Run {
        file: PathBuf,
        /// Recorded in the transcript; defaults to $CEREMONY_OPERATOR or $USER.
        #[arg(long)]
        operator: Option<String>,
    },
}

#[derive(Args)]
pub struct QuickstartArgs {
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    #[arg(long, default_value = "dev")]
    pub environment: String,
    #[arg(long, default_value = "dev-1")]
    pub cluster: String,
    /// Use file keys even when SoftHSM2 is installed.
    #[arg(long)]
    pub file_keys: bool,
}

/// A key reference as given on the command line. Parsed by us rather than by clap so that a
/// refused reference (one carrying `pin-value`, say) is never echoed back in an error.
#[derive(Clone)]
pub struct KeyArg(String);

impl std::str::FromStr for KeyArg {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(KeyArg(s.to_string()))
    }
}

impl KeyArg {
    pub fn parse(&self) -> Result<KeyRef> {
        Ok(self.0.parse::<KeyRef>()?)
    }
}
