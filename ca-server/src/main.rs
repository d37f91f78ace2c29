//! `ca-server`: online issuance and renewal of cluster intermediates, revocation with CRLs,
//! inventory and a tamper-evident audit trail, on SQLite or PostgreSQL.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use axum::http::HeaderName;
use clap::Parser;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use ca_server::config::Config;

// glibc's allocator spent about a tenth of the server's CPU on the issuance path (many small,
// short-lived buffers handed between threads); mimalloc's thread-local free lists cost less.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use ca_server::service::checkpoint;
use ca_server::service::hsm_call::HsmFailure;
use ca_server::service::issuer::{Issuer, Issuers};
use ca_server::service::state::{AppState, Inner};
use ca_server::service::{cluster_settings, external_ca, istio, jobs, rotation};
use ca_server::{auth, dev, edge, grpc, http, metrics, service, tls};

#[derive(Parser)]
#[command(
    name = "ca-server",
    version,
    about = "Online CA for cluster intermediates: issuance, renewal, revocation, audit"
)]
struct Args {
    /// The TOML configuration (every key can be overridden with CA_SERVER_<SECTION>__<KEY>).
    #[arg(long, required_unless_present = "dev", conflicts_with = "dev")]
    config: Option<PathBuf>,
    /// Start a throwaway setup on loopback in --dev-dir (created on first use).
    #[arg(long)]
    dev: bool,
    #[arg(long, default_value = "pki-dev")]
    dev_dir: PathBuf,
    /// Listen address, overriding the configuration (port 0 picks a free port).
    #[arg(long)]
    listen: Option<String>,
    /// Parse and validate --config (environment overrides included), print OK and exit,
    /// without opening the database, the keys or any listener: the Helm chart's check uses it.
    #[arg(long, requires = "config")]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion) => {
            e.exit()
        }
        Err(e) => {
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
    if args.check_config
        && let Some(path) = &args.config
    {
        return match Config::load(path) {
            Ok(_) => {
                println!("ca-server: {} OK", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                let chain: Vec<String> = e.chain().map(|c| c.to_string().replace('\n', " ")).collect();
                eprintln!("error: {}", chain.join(": "));
                ExitCode::FAILURE
            }
        };
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string().replace('\n', " ")).collect();
            eprintln!("error: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}

fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{},cryptoki=off,sqlx=warn", cfg.log.level)));
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    if cfg.log.format == "json" {
        builder.json().flatten_event(true).with_current_span(true).init();
    } else {
        builder.init();
    }
}

async fn run(args: Args) -> Result<()> {
    let dev = if args.dev { Some(dev::prepare(&args.dev_dir)?) } else { None };
    let config_path = match (&dev, &args.config) {
        (Some(d), _) => d.config.clone(),
        (None, Some(c)) => c.clone(),
        (None, None) => bail!("give --config FILE or --dev"),
    };
    let mut cfg = Config::load(&config_path)?;
    if let Some(l) = args.listen {
        cfg.listen = l;
    }
    init_logging(&cfg);
    if let Some(d) = &dev
        && d.file_keys
    {
        tracing::warn!(
            "SoftHSM2 is not installed: the dev root and environment keys are PLAIN FILES under {}. For trying things out only.",
            d.dir.display()
        );
    }

    let store = ca_store::Store::connect(&cfg.database.url, cfg.database.migrate).await.context("database")?;
    let mut issuers = BTreeMap::new();
    for ic in &cfg.issuers {
        let issuer = Arc::new(Issuer::load(ic)?);
        match issuer.reconnect_within(Duration::from_secs(10)).await {
            Ok(()) => {}
            Err(HsmFailure::Failed(e)) => {
                tracing::error!(issuer = %issuer.name, error = %format!("{e:#}"), "issuer key unavailable at start; will retry")
            }
            _ => tracing::error!(issuer = %issuer.name, "issuer key did not answer at start; will retry"),
        }
        issuers.insert(ic.name.clone(), issuer);
    }
    let auth = auth::Auth::load(cfg.auth.clone()).await?;
    let audit_signer = checkpoint::open_audit_key(&cfg.audit.key)?;
    let tls_config = tls::server_config(&cfg.tls)?;
    let client_roots = tls::client_roots(&cfg.tls)?;
    let metrics = Arc::new(metrics::Metrics::new());
    let istio = istio::Istio::new(cfg.istio.as_ref(), store.clone(), metrics.clone())?;
    let state = AppState::new(Inner {
        edge: edge::Edge::new(&cfg, metrics.clone()),
        auth,
        config: cfg.clone(),
        store,
        issuers: Issuers::new(issuers),
        metrics,
        istio,
        instance: uuid::Uuid::new_v4().to_string(),
        audit_signer: Arc::new(RwLock::new(Some(audit_signer))),
        client_roots,
    });

    // A rotation in progress (or finished while the configuration still names the old
    // certificate) decides what the issuers sign with and hand out.
    rotation::refresh(&state).await.map_err(|e| anyhow::anyhow!("applying rotations: {}", e.detail))?;

    if cfg.auth.jwks_url.is_some() {
        let s = state.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                if let Err(e) = s.auth.refresh_if_due().await {
                    tracing::warn!(error = %format!("{e:#}"), "JWKS refresh failed; keeping the previous keys")
                }
            }
        });
    }

    let request_id = HeaderName::from_static("x-request-id");
    let app = http::router(state.clone())
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &axum::http::Request<_>| {
                    // Client-chosen values: capped before they reach the log.
                    let id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("");
                    tracing::info_span!(
                        "request",
                        method = %edge::cap(req.method().as_str(), edge::MAX_METHOD),
                        path = %edge::cap(req.uri().path(), edge::MAX_PATH),
                        request_id = %edge::cap(id, edge::MAX_REQUEST_ID)
                    )
                })
                .on_request(())
                .on_response(tower_http::trace::DefaultOnResponse::new().level(tracing::Level::INFO)),
        )
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid));

    let limits = tls::ConnLimits::from_config(&cfg.limits);
    let listener =
        tokio::net::TcpListener::bind(&cfg.listen).await.with_context(|| format!("listening on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let url = format!("https://{addr}");
    let (grpc_stop, grpc_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut grpc_addr = None;
    let mut grpc_task = None;
    if let Some(ic) = &cfg.istio {
        if let Some(d) = &dev {
            dev::register_dev_cluster(d, &state).await?;
        }
        // Token validators from the stored settings (deprecated configuration tables seed a
        // registered cluster that has none yet).
        cluster_settings::seed_from_config(&state)
            .await
            .map_err(|e| anyhow::anyhow!("seeding cluster settings: {}", e.detail))?;
        cluster_settings::reload(&state)
            .await
            .map_err(|e| anyhow::anyhow!("loading cluster settings: {}", e.detail))?;
        // Clusters approved while no replica was up get their intermediates now.
        if let Err(e) = external_ca::maintain(&state, true).await {
            tracing::warn!(error = %format!("{e:#}"), "external-CA start-up maintenance failed; will retry");
        }
        let gl = tokio::net::TcpListener::bind(&ic.listen)
            .await
            .with_context(|| format!("listening on {} (istio.listen)", ic.listen))?;
        grpc_addr = Some(gl.local_addr()?);
        let s = state.clone();
        grpc_task = Some(tokio::spawn(async move {
            if let Err(e) = grpc::serve(s, gl, limits, async {
                let _ = grpc_stopped.await;
            })
            .await
            {
                tracing::error!(error = %format!("{e:#}"), "gRPC server stopped");
            }
        }));
    }
    let mut metrics_url = None;
    if let Some(ml) = &cfg.metrics.listen {
        let l =
            tokio::net::TcpListener::bind(ml).await.with_context(|| format!("listening on {ml} (metrics.listen)"))?;
        metrics_url = Some(format!("http://{}", l.local_addr()?));
        let app = metrics::router(state.metrics.clone());
        tokio::spawn(async move {
            if let Err(e) = tls::serve_plain(l, app, limits).await {
                tracing::error!(error = %format!("{e:#}"), "metrics listener stopped");
            }
        });
    }
    // Machine-readable first lines: tests and scripts wait for them.
    if let Some(g) = grpc_addr {
        println!("ca-server grpc listening on {g}");
    }
    if let Some(m) = &metrics_url {
        println!("ca-server metrics listening on {m}");
    }
    println!("ca-server listening on {url}");
    tracing::info!(%url, database = state.store.backend(), issuers = cfg.issuers.len(), "ca-server started");
    if let Some(d) = &dev {
        let vars = dev::write_env(d, &url, &cfg.database.url, grpc_addr, metrics_url.as_deref())?;
        print_dev_help(d, &vars);
    }
    jobs::spawn(state.clone());
    service::denials::spawn(state.clone());

    tokio::select! {
        r = tls::serve(listener, tls_config, app, limits) => r,
        _ = shutdown_signal() => {
            tracing::info!("shutting down");
            // Let in-flight workload requests finish (and their records commit) first.
            let _ = grpc_stop.send(());
            if let Some(t) = grpc_task {
                let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
            }
            if tokio::time::timeout(Duration::from_secs(5), service::denials::flush(&state)).await.is_err() {
                tracing::warn!("the last summary of refused unauthenticated requests timed out");
            }
            // Sign the head on the way out, so that the records since the last checkpoint
            // cannot be cut off unnoticed.
            match tokio::time::timeout(Duration::from_secs(10), checkpoint::maybe_checkpoint(&state, true)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "final audit checkpoint failed"),
                Err(_) => tracing::warn!("final audit checkpoint timed out"),
            }
            state.store.close().await;
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}

fn print_dev_help(d: &dev::DevSetup, vars: &[(String, String)]) {
    let get = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str()).unwrap_or("");
    println!(
        "\ndev setup in {dir}{created}\n  environment: {env} (trust domain cluster.local), key custody: {custody}\n  settings and operator tokens: {dir}/dev.env (the tokens state a second factor: auth.require_mfa is on)\n  dev admin token (12h): {admin}\n\nTry:\n  set -a; . {dir}/dev.env; set +a\n  curl --cacert \"$CA_ROOT_CERT\" \"$CA_SERVER_URL/readyz\"\n  curl --cacert \"$CA_ROOT_CERT\" -H \"Authorization: Bearer $CA_ADMIN_TOKEN\" -H 'content-type: application/json' \\\n       -d '{{\"name\":\"dev-1\",\"environment\":\"dev\",\"trust_domain\":\"cluster.local\"}}' \"$CA_SERVER_URL/v1/clusters\"\n  # approve it as the second operator (two-person rule), using the request_id printed above:\n  curl --cacert \"$CA_ROOT_CERT\" -H \"Authorization: Bearer $CA_APPROVER_TOKEN\" -X POST \"$CA_SERVER_URL/v1/requests/<request_id>/approve\"\n  # enrol from the cluster with the enrolment_token, then renew over mTLS:\n  CA_ENROLMENT_TOKEN=<enrolment_token> ca-cli cluster renew --server \"$CA_SERVER_URL\" --ca-root \"$CA_ROOT_CERT\" --cluster dev-1 --state-dir ./cacerts-dev-1\n  ca-cli audit verify --database \"$CA_DATABASE_URL\" --audit-key \"$CA_AUDIT_PUBLIC_KEY\"\n",
        dir = d.dir.display(),
        created = if d.created { " (created now)" } else { " (reused)" },
        env = get("CA_ENVIRONMENT"),
        admin = get("CA_ADMIN_TOKEN"),
        custody = if d.file_keys { "FILE KEYS (SoftHSM2 not installed)" } else { "SoftHSM2" },
    );
    if !get("CA_METRICS_URL").is_empty() {
        println!("Prometheus metrics: curl \"$CA_METRICS_URL/metrics\"");
    }
    if !get("CA_GRPC_ADDR").is_empty() {
        println!(
            "\nIstio external CA (gRPC istio.v1.auth.IstioCertificateService) on {grpc}, cluster {cluster} (trust domain {td}):\n  a service-account token for default/default is in $CA_EXAMPLE_TOKEN; mint others with the key $CA_SA_SIGNING_KEY\n  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout wl.key -subj / -out wl.csr\n  grpcurl -cacert \"$CA_ROOT_CERT\" -import-path proto -proto istio/v1/auth/ca.proto \\\n    -H \"authorization: Bearer $CA_EXAMPLE_TOKEN\" -H \"ClusterID: $CA_DEV_CLUSTER\" \\\n    -d \"{{\\\"csr\\\": $(jq -Rs . < wl.csr)}}\" \"$CA_GRPC_ADDR\" istio.v1.auth.IstioCertificateService/CreateCertificate\n  curl --cacert \"$CA_ROOT_CERT\" \"$CA_SERVER_URL/v1/clusters/dev/trust-bundle\"\n",
            grpc = get("CA_GRPC_ADDR"),
            cluster = get("CA_DEV_CLUSTER"),
            td = get("CA_TRUST_DOMAIN"),
        );
    }
}
