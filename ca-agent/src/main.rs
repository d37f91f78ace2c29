//! `ca-agent`: the in-cluster half of pki-mesh. One replica at a time (a Lease decides) keeps
//! istiod wired to the hierarchy: Secret `cacerts` in plug-in mode; `istiod-tls`, every
//! namespace's `istio-ca-root-cert` and the cluster's service-account keys in external-CA mode.
//! It talks to ca-server only over TLS, authenticated by the one-time enrolment token once and
//! by a credential it renews itself from then on.

#![forbid(unsafe_code)]

mod args;
mod certs;
mod external;
mod k8s;
mod leader;
mod plugin;
mod roots;
mod server;
mod status;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use tokio::sync::{Notify, watch};

use crate::args::{Args, Cli, Command, Mode};
use crate::server::CaServer;
use crate::status::Status;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CA_AGENT_LOG").unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ca-agent: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Rollback(args) => rollback(args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ca-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn kube_client() -> Result<Client> {
    Client::try_default().await.context("no Kubernetes credentials (in-cluster service account or KUBECONFIG)")
}

fn ca_server(args: &Args) -> Result<CaServer> {
    let root = std::fs::read(&args.ca_root).with_context(|| format!("--ca-root {}", args.ca_root.display()))?;
    CaServer::new(&args.server, &args.cluster, &root)
}

async fn rollback(args: Args) -> Result<()> {
    anyhow::ensure!(args.mode == Mode::Plugin, "rollback applies to plug-in mode (Secret cacerts) only");
    let client = kube_client().await?;
    let api: Api<Secret> = Api::namespaced(client, &args.istio_namespace);
    let serial = plugin::rollback(&api, &args.istio_namespace).await?;
    println!("cacerts now holds intermediate {serial}; the set it replaced is in cacerts-previous");
    Ok(())
}

async fn run(args: Args) -> Result<()> {
    anyhow::ensure!(
        ca_core::names::is_cluster_name(&args.cluster),
        "--cluster {:?} is not a cluster name",
        args.cluster
    );
    // Refuse a bad --ca-root before anything starts; each leadership term reads it afresh.
    ca_server(&args)?;
    let client = kube_client().await?;
    let status = Status::new();
    let stale = (args.resync.as_secs() as i64 * 3).max(args.lease_duration.as_secs() as i64 * 2);
    let health = tokio::spawn(status::serve(args.listen, status.clone(), stale));
    let (lead_tx, mut lead_rx) = watch::channel(false);
    let election = leader::Election::new(client.clone(), &args.namespace(), args.identity(), args.lease_duration);
    tokio::spawn(election.run(lead_tx, status.clone()));
    tracing::info!(cluster = %args.cluster, mode = ?args.mode, namespace = %args.namespace(), "ca-agent started");
    loop {
        if health.is_finished() {
            return match health.await {
                Ok(Err(e)) => Err(e).context("the health listener stopped"),
                _ => anyhow::bail!("the health listener stopped"),
            };
        }
        if lead_rx.wait_for(|l| *l).await.is_err() {
            anyhow::bail!("leader election stopped");
        }
        tracing::info!("leading: controllers start");
        let srv = ca_server(&args)?;
        tokio::select! {
            r = controllers(&args, client.clone(), srv, status.clone()) => {
                if let Err(e) = r {
                    tracing::error!(error = %format!("{e:#}"), "controllers stopped");
                }
            }
            _ = lead_rx.wait_for(|l| !*l) => tracing::warn!("lost the Lease: controllers stop"),
        }
    }
}

/// Runs the mode's controllers until cancelled. A failed pass is retried sooner than the
/// resync, backing off; nothing that already works is ever removed because of a failure.
async fn controllers(args: &Args, client: Client, server: CaServer, status: Arc<Status>) -> Result<()> {
    match args.mode {
        Mode::Plugin => {
            let mut p = plugin::Plugin::new(
                server,
                status.clone(),
                args.cluster.clone(),
                Api::namespaced(client.clone(), &args.istio_namespace),
                args.istio_namespace.clone(),
                Api::namespaced(client, &args.namespace()),
                args.enrolment_secret.clone(),
            );
            let mut backoff = Backoff::new(args.resync);
            loop {
                match p.tick().await {
                    Ok(()) => backoff.reset(),
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "plug-in pass failed"),
                }
                tokio::time::sleep(backoff.next_after(status.degraded())).await;
            }
        }
        Mode::ExternalCa => {
            let (bundle_tx, bundle_rx) = watch::channel(None::<String>);
            let held: roots::Held = Arc::new(Mutex::new(Default::default()));
            let changed = Arc::new(Notify::new());
            let publisher = roots::Roots {
                client: client.clone(),
                status: status.clone(),
                exclude: args.exclude_namespaces.clone(),
                bundle: bundle_rx,
                held: held.clone(),
                changed: changed.clone(),
                resync: args.resync,
            };
            let mut ext = external::External::new(
                server,
                status.clone(),
                client,
                args.cluster.clone(),
                args.namespace(),
                args.istio_namespace.clone(),
                args.enrolment_secret.clone(),
                args.istiod_dns_names.clone(),
            );
            let exclude = args.exclude_namespaces.clone();
            let resync = args.resync;
            let main_loop = async move {
                let mut backoff = Backoff::new(resync);
                loop {
                    let ok = external_pass(&mut ext, &bundle_tx, &held, &exclude).await;
                    match ok {
                        Ok(()) => backoff.reset(),
                        Err(e) => tracing::warn!(error = %format!("{e:#}"), "external-CA pass failed"),
                    }
                    let wait = backoff.next_after(status.degraded());
                    // A namespace's ConfigMap changed: report it without waiting for the resync.
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = changed.notified() => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
            };
            tokio::select! {
                r = publisher.run() => r,
                r = main_loop => r,
            }
        }
    }
}

async fn external_pass(
    ext: &mut external::External,
    bundle_tx: &watch::Sender<Option<String>>,
    held: &roots::Held,
    exclude: &[String],
) -> Result<()> {
    let id = ext.credential().await?;
    let bundle = ext.server.trust_bundle().await.inspect_err(|e| ext.status.server_failed(e.cause()))?;
    let roots = ca_core::cert::parse_certs(bundle.as_bytes(), "ca-server's trust bundle")?;
    anyhow::ensure!(!roots.is_empty(), "ca-server's trust bundle is empty");
    bundle_tx.send_if_modified(|b| {
        let differs = b.as_deref().is_none_or(|cur| {
            ca_core::cert::parse_certs(cur.as_bytes(), "bundle")
                .map(|c| !certs::same_bundle(&c, &roots))
                .unwrap_or(true)
        });
        if differs {
            *b = Some(bundle.clone());
        }
        differs
    });
    let mut first_error = None;
    if let Err(e) = ext.istiod_tls(&id, &roots).await {
        tracing::warn!(error = %format!("{e:#}"), "istiod-tls not renewed");
        first_error.get_or_insert(e);
    }
    if let Err(e) = ext.service_account_keys(&id).await {
        tracing::warn!(error = %format!("{e:#}"), "service-account keys not pushed");
        first_error.get_or_insert(e);
    }
    let snapshot: std::collections::BTreeMap<String, Vec<String>> = held
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(ns, _)| !exclude.contains(ns))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !snapshot.is_empty() {
        match ext.server.namespace_report(&id, &snapshot).await {
            Ok(renew) => {
                ext.status.server_ok();
                ext.status.synced("namespace-report");
                ext.renew_asked = renew;
            }
            Err(e) => {
                ext.status.server_failed(e.cause());
                first_error.get_or_insert(e.into());
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Retry delays after failures: 1 s, 2 s, 4 s ... up to the resync interval.
struct Backoff {
    resync: Duration,
    next: Duration,
}

impl Backoff {
    fn new(resync: Duration) -> Backoff {
        Backoff { resync, next: Duration::from_secs(1) }
    }

    fn reset(&mut self) {
        self.next = Duration::from_secs(1);
    }

    fn next_after(&mut self, failing: bool) -> Duration {
        if !failing {
            return self.resync;
        }
        let d = self.next.min(self.resync);
        self.next = (self.next * 2).min(self.resync);
        d
    }
}
