//! `ca-cli`: key ceremonies, signing, verification and the istiod bundle.
#![forbid(unsafe_code)]

mod audit;
mod cluster;
mod handshake;
mod rotation;
mod simulate;
mod status;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use ca_core::cert::{load_cert, load_certs, read_file, to_pem};
use ca_core::duration::Validity;
use ca_core::error::fmt_time;
use ca_core::names::{SpiffeId, TrustDomain};
use ca_core::outputs::OutputSet;
use ca_core::profile::{CertRequest, ProfileKind};
use clap::{Args, Parser, Subcommand, ValueEnum};
use hsm::{KeyAlgorithm, KeyRef};
use serde_json::{Value, json};
use time::OffsetDateTime;

#[derive(Parser)]
#[command(name = "ca-cli", version, about = "Hierarchical PKI for service meshes: ceremonies, signing, verification")]
struct Cli {
    /// Output format for commands that print data.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
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
struct ServerArgs {
    /// ca-server's base URL (or CA_SERVER_URL).
    #[arg(long, env = "CA_SERVER_URL")]
    server: String,
    /// The root that ca-server's TLS certificate chains to (or CA_ROOT_CERT).
    #[arg(long, env = "CA_ROOT_CERT")]
    ca_root: PathBuf,
}

#[derive(Subcommand)]
enum RotationCmd {
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
enum StartCmd {
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
enum RequestCmd {
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
enum ClusterCmd {
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
enum AuditCmd {
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

fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f)
}

#[derive(Subcommand)]
enum KeyCmd {
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
enum RootCmd {
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
enum CsrCmd {
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
struct SignArgs {
    #[arg(long)]
    profile: ProfileKind,
    #[arg(long)]
    ca_cert: PathBuf,
    #[arg(long)]
    ca_key: KeyArg,
    #[arg(long)]
    csr: PathBuf,
    /// Trust domain the CA serves (environment and cluster profiles); repeatable.
    #[arg(long = "trust-domain")]
    trust_domains: Vec<TrustDomain>,
    #[arg(long)]
    validity: Validity,
    /// Add critical URI name constraints permitting only the trust domains. rustls-webpki,
    /// and so ztunnel (Istio ambient mode), rejects such chains: see docs/name-constraints.md.
    #[arg(long)]
    name_constraints: bool,
    /// CRL distribution point URL; repeatable.
    #[arg(long = "crl-url")]
    crl_urls: Vec<String>,
    /// AIA caIssuers URL; repeatable.
    #[arg(long = "ca-issuer-url")]
    ca_issuer_urls: Vec<String>,
    /// SPIFFE ID of a workload certificate (workload profile).
    #[arg(long)]
    spiffe_id: Option<SpiffeId>,
    /// The CA server's database (sqlite://PATH or postgres://...): refuse a key it has
    /// blocked (revoked for key or CA compromise). Read only.
    #[arg(long, env = "CA_DATABASE_URL")]
    database: Option<String>,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Subcommand)]
enum IstioCmd {
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
struct VerifyArgs {
    #[arg(long)]
    root: PathBuf,
    /// Intermediate certificates; repeatable.
    #[arg(long)]
    chain: Vec<PathBuf>,
    leaf: PathBuf,
}

#[derive(Subcommand)]
enum CrlCmd {
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
enum CeremonyCmd {
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
struct QuickstartArgs {
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    #[arg(long, default_value = "dev")]
    environment: String,
    #[arg(long, default_value = "dev-1")]
    cluster: String,
    /// Use file keys even when SoftHSM2 is installed.
    #[arg(long)]
    file_keys: bool,
}

/// A key reference as given on the command line. Parsed by us rather than by clap so that a
/// refused reference (one carrying `pin-value`, say) is never echoed back in an error.
#[derive(Clone)]
struct KeyArg(String);

impl std::str::FromStr for KeyArg {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(KeyArg(s.to_string()))
    }
}

impl KeyArg {
    fn parse(&self) -> Result<KeyRef> {
        Ok(self.0.parse::<KeyRef>()?)
    }
}

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

fn emit(output: Output, value: Value, text: impl FnOnce(&Value) -> String) {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&value).expect("serialisable")),
        Output::Text => println!("{}", text(&value)),
    }
}

fn write_one(path: &Path, contents: impl Into<Vec<u8>>) -> Result<()> {
    let mut out = OutputSet::new();
    out.add(path, contents);
    out.commit()?;
    Ok(())
}

fn preflight(paths: &[&Path]) -> Result<()> {
    ca_core::outputs::preflight(paths.iter().copied())?;
    Ok(())
}

fn cert_json(c: &ca_core::cert::CertInfo, path: &Path) -> Value {
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

fn cert_text(v: &Value) -> String {
    format!(
        "wrote {}\n  subject:  {}\n  issuer:   {}\n  serial:   {}\n  validity: {} .. {}\n  sha256:   {}",
        v["path"].as_str().unwrap_or_default(),
        v["subject"].as_str().unwrap_or_default(),
        v["issuer"].as_str().unwrap_or_default(),
        v["serial"].as_str().unwrap_or_default(),
        v["not_before"].as_str().unwrap_or_default(),
        v["not_after"].as_str().unwrap_or_default(),
        v["sha256_fingerprint"].as_str().unwrap_or_default(),
    )
}

fn run(cmd: Cmd, output: Output) -> Result<()> {
    match cmd {
        Cmd::Key(KeyCmd::Generate { key, algorithm, public_out }) => {
            let key = key.parse()?;
            if let Some(p) = &public_out {
                preflight(&[p])?;
            }
            let public =
                hsm::generate_key(&key, algorithm).with_context(|| format!("generating {algorithm} key {key}"))?;
            if let Some(p) = &public_out {
                write_one(p, public.to_pem())?;
            }
            let v = json!({
                "key": key.to_string(),
                "algorithm": algorithm.as_str(),
                "public_key_sha256": hex::encode(&public.fingerprint()),
                "public_out": public_out,
                "public_key_pem": public.to_pem(),
            });
            emit(output, v, |v| {
                format!(
                    "generated {} key {}\n  public key sha256: {}{}",
                    algorithm,
                    key,
                    v["public_key_sha256"].as_str().unwrap_or_default(),
                    public_out
                        .as_ref()
                        .map(|p| format!("\n  public key written to {}", p.display()))
                        .unwrap_or_default()
                )
            });
        }
        Cmd::Key(KeyCmd::Info { key }) => {
            let key = key.parse()?;
            let signer = hsm::open_signer(&key)?;
            let public = signer.public_key();
            let mut v = json!({
                "key": key.to_string(),
                "algorithm": signer.algorithm().as_str(),
                "public_key_sha256": hex::encode(&public.fingerprint()),
                "hardware": signer.is_hardware(),
            });
            if signer.is_hardware() {
                let a = signer.token_attributes()?;
                v["pkcs11"] = json!({
                    "token": a.token, "object": a.object, "id": a.id,
                    "token_object": a.token_object, "private": a.private,
                    "sensitive": a.sensitive, "extractable": a.extractable,
                    "always_sensitive": a.always_sensitive, "never_extractable": a.never_extractable,
                    "sign": a.sign,
                });
            }
            emit(output, v, |v| serde_json::to_string_pretty(v).unwrap_or_default());
        }
        Cmd::Root(RootCmd::Create { key, subject, validity, path_len, out }) => {
            let key = key.parse()?;
            preflight(&[&out])?;
            let subject = ca_core::dn::parse_subject(&subject)?;
            let signer = hsm::open_signer(&key)?;
            let not_before = ca_core::issue::default_not_before();
            let req = CertRequest {
                path_len: Some(path_len),
                ..CertRequest::new(
                    ProfileKind::Root,
                    subject,
                    signer.public_key().clone(),
                    not_before,
                    not_before + validity.duration(),
                )
            };
            let issued = ca_core::issue::create_root(&signer, &req)?;
            write_one(&out, issued.pem())?;
            emit(output, cert_json(&issued.cert, &out), cert_text);
        }
        Cmd::Csr(CsrCmd::Create { key, subject, out }) => {
            let key = key.parse()?;
            preflight(&[&out])?;
            let subject_dn = ca_core::dn::parse_subject(&subject)?;
            let signer = hsm::open_signer(&key)?;
            let pem = ca_core::csr::create_csr(&signer, subject_dn)?;
            write_one(&out, pem)?;
            let v = json!({"path": out, "subject": subject, "public_key_sha256": hex::encode(&signer.public_key().fingerprint())});
            emit(output, v, |v| format!("wrote {} for {}", out.display(), v["subject"].as_str().unwrap_or_default()));
        }
        Cmd::Sign(a) => sign(a, output)?,
        Cmd::Istio(IstioCmd::Cacerts { cert, key, chain, root, out_dir, namespace }) => {
            let key = key.parse()?;
            let report = ca_core::cacerts::write_cacerts(
                &ca_core::cacerts::CacertsInput {
                    cert: &cert,
                    key: &key,
                    chain: &chain,
                    root: &root,
                    namespace: &namespace,
                },
                &out_dir,
            )?;
            let v = serde_json::to_value(&report)?;
            emit(output, v, |_| {
                let mut s = format!("wrote istiod plug-in CA files to {}:\n", report.out_dir.display());
                for f in &report.files {
                    s.push_str(&format!("  {}\n", f.display()));
                }
                s.push_str(&format!(
                    "chain: {}\nsigning certificate expires {}\napply with: kubectl apply -f {}",
                    report.chain.join(" -> "),
                    report.signing_cert_not_after,
                    report.out_dir.join("cacerts.yaml").display()
                ));
                s
            });
        }
        Cmd::Verify(a) => {
            let leaf = load_cert(&a.leaf)?;
            let mut inter = Vec::new();
            for p in &a.chain {
                inter.extend(load_certs(p)?);
            }
            let roots = load_certs(&a.root)?;
            let path = ca_core::chain::verify_chain(&leaf, &inter, &roots, OffsetDateTime::now_utc())?;
            let v = json!({
                "ok": true,
                "path": path.iter().map(|c| json!({
                    "subject": c.subject, "serial": c.serial, "not_after": fmt_time(c.not_after), "uris": c.uris,
                })).collect::<Vec<_>>(),
            });
            emit(output, v, |_| {
                let names: Vec<String> = path
                    .iter()
                    .map(|c| if c.subject.is_empty() { c.uris.join(",") } else { c.subject.clone() })
                    .collect();
                format!("{}: OK\n  {}", a.leaf.display(), names.join("\n  -> "))
            });
        }
        Cmd::Crl(CrlCmd::Create { ca_cert, ca_key, revoke, next_update, crl_number, out }) => {
            let ca_key = ca_key.parse()?;
            preflight(&[&out])?;
            let now = OffsetDateTime::now_utc().replace_nanosecond(0)?;
            let revoked =
                revoke.iter().map(|r| ca_core::crl::parse_revocation(r, now)).collect::<Result<Vec<_>, _>>()?;
            let issuer = ca_core::issue::CaIssuer::new(load_cert(&ca_cert)?, hsm::open_signer(&ca_key)?)?;
            let number = crl_number.unwrap_or(now.unix_timestamp() as u64);
            let req = ca_core::crl::CrlRequest {
                number,
                this_update: now,
                next_update: now + next_update.duration(),
                revoked,
            };
            let der = ca_core::crl::create_crl(&issuer, &req)?;
            write_one(&out, to_pem("X509 CRL", &der))?;
            let v = json!({
                "path": out, "issuer": issuer.cert.subject, "crl_number": number,
                "this_update": fmt_time(req.this_update), "next_update": fmt_time(req.next_update),
                "revoked": req.revoked.iter().map(|r| hex::encode(&r.serial)).collect::<Vec<_>>(),
            });
            emit(output, v, |v| {
                format!(
                    "wrote {} (CRL number {number}, {} revoked, next update {})",
                    out.display(),
                    req.revoked.len(),
                    v["next_update"].as_str().unwrap_or_default()
                )
            });
        }
        Cmd::Ceremony(CeremonyCmd::Check { file }) => {
            let c = ca_core::ceremony::load(&file)?;
            let report = c.check()?;
            let v = serde_json::to_value(&report)?;
            emit(output, v, |_| {
                format!(
                    "{}: {} ceremony OK\n  sha256: {}\n  keys: {}\n  outputs: {}",
                    file.display(),
                    serde_json::to_value(report.ceremony_type)
                        .ok()
                        .and_then(|v| v.as_str().map(String::from))
                        .unwrap_or_default(),
                    report.sha256,
                    report.keys.join(", "),
                    report.outputs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                )
            });
        }
        Cmd::Ceremony(CeremonyCmd::Run { file, operator }) => {
            let c = ca_core::ceremony::load(&file)?;
            let operator = operator.unwrap_or_else(ca_core::ceremony::default_operator);
            let report = c.run(&operator)?;
            let v = serde_json::to_value(&report)?;
            emit(output, v, |_| {
                let mut s = format!("{}: ceremony completed\n", file.display());
                for o in &report.entry.outputs {
                    s.push_str(&format!("  wrote {} (sha256 {})\n", o.path, o.sha256.as_deref().unwrap_or("?")));
                }
                for (k, v) in &report.details {
                    s.push_str(&format!("  {k}: {}\n", v.as_str().map(String::from).unwrap_or_else(|| v.to_string())));
                }
                s.push_str(&format!("  transcript: {}", report.transcript.display()));
                s
            });
        }
        Cmd::Cluster(c) => run_cluster(c, output)?,
        Cmd::Status { server, ca_root } => {
            let token = std::env::var("CA_TOKEN")
                .ok()
                .filter(|t| !t.trim().is_empty())
                .context("set CA_TOKEN to an operator or auditor token (it is never taken from the command line)")?;
            let v = block_on(status::collect(&server, &ca_root, token.trim()))?;
            emit(output, v, status::table);
        }
        Cmd::Rotation(r) => run_rotation(r, output)?,
        Cmd::Request(r) => run_request(r, output)?,
        Cmd::Audit(AuditCmd::Verify { database, audit_key }) => {
            let v = block_on(audit::verify(&database, audit_key.as_deref()))?;
            emit(output, v, |v| {
                format!(
                    "audit trail OK: {} records up to #{}, {} signed checkpoints verified with {}",
                    v["records"],
                    v["head_seq"],
                    v["checkpoints"],
                    v["checkpoint_key"].as_str().unwrap_or_default()
                )
            });
        }
        Cmd::Quickstart(a) => {
            let opts = ca_core::quickstart::Options {
                dir: a.dir,
                trust_domain: a.trust_domain,
                environment: a.environment,
                cluster: a.cluster,
                operator: ca_core::ceremony::default_operator(),
                file_keys: a.file_keys,
                with_cluster: true,
            };
            if opts.file_keys || hsm::softhsm::find_module().is_none() {
                eprintln!(
                    "WARNING: SoftHSM2 is not in use: root and environment keys will be PLAIN FILES under {}.\n\
                     WARNING: this is for trying things out only. Install SoftHSM2 (apt-get install softhsm2) to keep keys in a token.",
                    opts.dir.display()
                );
            }
            let r = ca_core::quickstart::run(&opts)?;
            let v = serde_json::to_value(&r)?;
            emit(output, v, |_| quickstart_text(&r));
        }
    }
    Ok(())
}

fn run_rotation(cmd: RotationCmd, output: Output) -> Result<()> {
    let api = |s: &ServerArgs| rotation::Api::new(&s.server, &s.ca_root);
    match cmd {
        RotationCmd::Start(start) => {
            let (server, s) = match &start {
                StartCmd::Root { new_root, old_root, server } => {
                    (server, rotation::Start::Root { new_root, old_root: old_root.clone() })
                }
                StartCmd::Environment { environment, certificate, key, server } => (
                    server,
                    rotation::Start::Environment {
                        environment: environment.clone(),
                        certificate,
                        key: key.parse()?.to_string(),
                    },
                ),
                StartCmd::Cluster { cluster, key, server } => (
                    server,
                    rotation::Start::Cluster {
                        cluster: cluster.clone(),
                        key: key.as_ref().map(|k| k.parse()).transpose()?.map(|k| k.to_string()),
                    },
                ),
            };
            let api = api(server)?;
            let v = block_on(rotation::start(&api, s))?;
            emit(output, v, |v| {
                format!(
                    "rotation {} requested; a second operator approves it with `ca-cli request approve {}`",
                    v["rotation"].as_str().unwrap_or_default(),
                    v["request_id"].as_str().unwrap_or_default()
                )
            });
        }
        RotationCmd::Certificate { id, environment, certificate, server } => {
            let v = block_on(rotation::add_certificate(&api(&server)?, &id, &environment, &certificate))?;
            emit(output, v, rotation::status_text);
        }
        RotationCmd::Status { id, server } => {
            let api = api(&server)?;
            match id {
                Some(id) => {
                    let v = block_on(api.call("GET", &format!("/v1/rotations/{id}"), None))?;
                    emit(output, v, rotation::status_text);
                }
                None => {
                    let v = block_on(api.call("GET", "/v1/rotations", None))?;
                    emit(output, v, rotation::list_text);
                }
            }
        }
        RotationCmd::Advance { id, to, server } => {
            let v = block_on(rotation::stage(&api(&server)?, &id, true, to))?;
            emit(output, v, move_text);
        }
        RotationCmd::Rollback { id, to, server } => {
            let v = block_on(rotation::stage(&api(&server)?, &id, false, to))?;
            emit(output, v, move_text);
        }
        RotationCmd::Handshakes { dir, stack } => {
            let ws = handshake::load_dir(&dir)?;
            let scratch = tempfile_dir()?;
            let outcome = handshake::all_pairs(&ws, stack, scratch.path())?;
            let failed = outcome.failures.len();
            let v = serde_json::to_value(&outcome)?;
            emit(output, v, |v| {
                let mut s = format!("{} handshakes, {} failed", v["handshakes"], failed);
                for f in v["failures"].as_array().into_iter().flatten() {
                    s.push_str(&format!(
                        "\n  {} {} -> {}: {}",
                        f["stack"].as_str().unwrap_or_default(),
                        f["client"].as_str().unwrap_or_default(),
                        f["server"].as_str().unwrap_or_default(),
                        f["error"].as_str().unwrap_or_default()
                    ));
                }
                s
            });
            if failed > 0 {
                bail!("{failed} handshakes failed");
            }
        }
        RotationCmd::Simulate { kind, clusters, workloads, retire_early, stack } => {
            let kind = kind.parse().map_err(anyhow::Error::msg)?;
            if clusters == 0 || workloads == 0 || clusters * workloads < 2 {
                bail!("the simulation needs at least two workloads in all (--clusters and --workloads)");
            }
            let scratch = tempfile_dir()?;
            let opts = simulate::Options { kind, clusters, workloads, retire_early, stack };
            let steps = simulate::run(&opts, scratch.path())?;
            let failed: usize = steps.iter().map(|s| s.outcome.failures.len()).sum();
            emit(output, serde_json::to_value(&steps)?, |_| simulate::table(&steps));
            if failed > 0 {
                bail!("{failed} handshakes failed during the simulated {kind} rotation");
            }
        }
    }
    Ok(())
}

fn tempfile_dir() -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new().prefix("ca-cli-handshakes").tempdir()?)
}

fn move_text(v: &Value) -> String {
    format!(
        "asked to move rotation {} from {} to {}; a second operator approves with `ca-cli request approve {}`",
        v["rotation"].as_str().unwrap_or_default(),
        v["from"].as_str().unwrap_or_default(),
        v["to"].as_str().unwrap_or_default(),
        v["request_id"].as_str().unwrap_or_default()
    )
}

fn run_request(cmd: RequestCmd, output: Output) -> Result<()> {
    match cmd {
        RequestCmd::List { status, server } => {
            let api = rotation::Api::new(&server.server, &server.ca_root)?;
            let path = match status {
                Some(s) => format!("/v1/requests?status={s}"),
                None => "/v1/requests".into(),
            };
            let v = block_on(api.call("GET", &path, None))?;
            emit(output, v, rotation::requests_text);
        }
        RequestCmd::Approve { id, server } => {
            let api = rotation::Api::new(&server.server, &server.ca_root)?;
            let v = block_on(api.call("POST", &format!("/v1/requests/{id}/approve"), None))?;
            emit(output, v, |v| {
                format!(
                    "request {} ({} {}) approved",
                    id,
                    v["kind"].as_str().unwrap_or_default(),
                    v["subject"].as_str().unwrap_or_default()
                )
            });
        }
        RequestCmd::Reject { id, server } => {
            let api = rotation::Api::new(&server.server, &server.ca_root)?;
            let v = block_on(api.call("POST", &format!("/v1/requests/{id}/reject"), None))?;
            emit(output, v, |v| {
                format!(
                    "request {} ({} {}) rejected",
                    id,
                    v["kind"].as_str().unwrap_or_default(),
                    v["subject"].as_str().unwrap_or_default()
                )
            });
        }
    }
    Ok(())
}

fn run_cluster(cmd: ClusterCmd, output: Output) -> Result<()> {
    match cmd {
        ClusterCmd::Renew { server, cluster, state_dir, ca_root, enrolment_token_file, force } => {
            // The token never goes on a command line: it comes from a file or the environment.
            let enrolment_token = match enrolment_token_file {
                Some(p) => Some(
                    std::fs::read_to_string(&p)
                        .with_context(|| format!("--enrolment-token-file {}", p.display()))?
                        .trim()
                        .to_string(),
                ),
                None => std::env::var("CA_ENROLMENT_TOKEN").ok().filter(|t| !t.trim().is_empty()),
            };
            let args = cluster::RenewArgs {
                server,
                cluster,
                state_dir,
                ca_root,
                force,
                enrolment_token,
                renew_after: 2.0 / 3.0,
            };
            let v = block_on(cluster::renew(&args))?;
            emit(output, v, |v| {
                if v["renewed"] == true {
                    format!(
                        "{} ({}): new intermediate {} valid until {}; istiod files in {}",
                        args.cluster,
                        v["via"].as_str().unwrap_or_default(),
                        v["serial"].as_str().unwrap_or_default(),
                        v["not_after"].as_str().unwrap_or_default(),
                        args.state_dir.display()
                    )
                } else {
                    format!(
                        "{}: intermediate {} is valid until {}; not renewing before {} (use --force to renew now){}",
                        args.cluster,
                        v["serial"].as_str().unwrap_or_default(),
                        v["not_after"].as_str().unwrap_or_default(),
                        v["renew_after"].as_str().unwrap_or_default(),
                        if v["bundle_updated"] == true { "; installed the server's new trust bundle" } else { "" }
                    )
                }
            });
        }
        ClusterCmd::Rollback { state_dir } => {
            let v = cluster::rollback(&state_dir)?;
            emit(output, v, |v| format!("rolled back to intermediate {}", v["serial"].as_str().unwrap_or_default()));
        }
    }
    Ok(())
}

fn quickstart_text(r: &ca_core::quickstart::Report) -> String {
    // The CLI's quickstart always builds the cluster tier.
    let none = PathBuf::new();
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

fn sign(a: SignArgs, output: Output) -> Result<()> {
    preflight(&[&a.out])?;
    if !matches!(a.profile, ProfileKind::Environment | ProfileKind::Cluster | ProfileKind::Workload) {
        bail!(
            "--profile must be environment, cluster or workload (use `root create` or a cross-sign ceremony for the others)"
        );
    }
    if a.profile == ProfileKind::Workload && !a.trust_domains.is_empty() {
        bail!("--trust-domain is for CA profiles; a workload certificate takes --spiffe-id");
    }
    if a.profile != ProfileKind::Workload && a.spiffe_id.is_some() {
        bail!("--spiffe-id is only for the workload profile");
    }
    let csr = ca_core::csr::VerifiedCsr::parse(&read_file(&a.csr)?).with_context(|| a.csr.display().to_string())?;
    if let Some(url) = &a.database {
        let hash = ca_store::spki_sha256(csr.public_key().spki_der());
        if let Some(b) = block_on(audit::blocked_key(url, &hash))? {
            bail!(
                "key-blocked: the CSR's public key was revoked for {} (certificate {}) and is never certified again; make a new key",
                b.reason,
                b.source_serial
            );
        }
    }
    let issuer = ca_core::issue::CaIssuer::new(load_cert(&a.ca_cert)?, hsm::open_signer(&a.ca_key.parse()?)?)?;
    let not_before = ca_core::issue::default_not_before();
    let req = CertRequest {
        trust_domains: a.trust_domains,
        name_constraints: a.name_constraints,
        crl_urls: a.crl_urls,
        ca_issuer_urls: a.ca_issuer_urls,
        spiffe_id: a.spiffe_id,
        ..CertRequest::new(
            a.profile,
            csr.subject().clone(),
            csr.public_key().clone(),
            not_before,
            not_before + a.validity.duration(),
        )
    };
    let issued = ca_core::issue::issue(&issuer, &req)?;
    write_one(&a.out, issued.pem())?;
    emit(output, cert_json(&issued.cert, &a.out), cert_text);
    Ok(())
}
