//! `ca-server --dev`: a throwaway setup on loopback. The root and environment come from the
//! same ceremony code as `ca-cli quickstart` (in SoftHSM2 when installed, file keys with a loud
//! warning otherwise); the server's TLS certificate, audit key and a local OIDC signing key
//! are made alongside; operator tokens are minted at every start and written to `dev.env`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use base64::Engine;
use ca_core::cert::load_cert;
use ca_core::issue::{CaIssuer, default_not_before, issue};
use ca_core::outputs::OutputSet;
use ca_core::profile::CertRequest;
use ca_core::validity::{Fit, fit_validity};
use serde_json::json;

pub const ISSUER: &str = "https://dev.pki-mesh.local";
pub const AUDIENCE: &str = "ca-server";
pub const ENVIRONMENT: &str = "dev";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8443";
pub const DEFAULT_GRPC_LISTEN: &str = "127.0.0.1:9443";
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";
/// What the dev OIDC issuer states for its tokens: a password and a one-time code, as a
/// Keycloak step-up login would.
pub const DEV_ACR: &str = "mfa";
pub const DEV_AMR: &[&str] = &["pwd", "otp"];
/// The external-CA cluster every dev setup has.
pub const DEV_CLUSTER: &str = "dev";
pub const TRUST_DOMAIN: &str = "cluster.local";
/// What a Kubernetes API server calls itself by default.
pub const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

pub struct DevSetup {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub root_cert: PathBuf,
    pub created: bool,
    pub file_keys: bool,
}

/// Creates the dev directory on first use, reuses it afterwards. Returns the config to run.
pub fn prepare(dir: &Path) -> Result<DevSetup> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let config = dir.join("config.toml");
    let root_cert = dir.join("hierarchy/root/root.pem");
    let softhsm_conf = dir.join("hierarchy/softhsm/softhsm2.conf");
    if config.exists() {
        if softhsm_conf.exists() {
            hsm::softhsm::use_config(&softhsm_conf);
        }
        let file_keys = !softhsm_conf.exists();
        return Ok(DevSetup { dir, config, root_cert, created: false, file_keys });
    }
    if std::fs::read_dir(&dir)?.next().is_some() {
        bail!("{} exists but holds no config.toml; remove it or pick another --dev-dir", dir.display());
    }
    let report = ca_core::quickstart::run(&ca_core::quickstart::Options {
        dir: dir.join("hierarchy"),
        trust_domain: "cluster.local".into(),
        environment: ENVIRONMENT.into(),
        cluster: "unused".into(),
        operator: "ca-server --dev".into(),
        file_keys: false,
        with_cluster: false,
    })?;
    let file_keys = report.hsm_module.is_none();

    // The server's TLS certificate, signed by the dev environment CA.
    let server_key = hsm::KeyRef::file(dir.join("server.key"));
    hsm::generate_key(&server_key, hsm::KeyAlgorithm::EcdsaP256)?;
    let env_key: hsm::KeyRef = report.environment_key.parse()?;
    let env = CaIssuer::new(load_cert(&report.environment_cert)?, hsm::open_signer(&env_key)?)?;
    let nb = default_not_before();
    let not_after = fit_validity(env.cert.not_after, nb, time::Duration::days(365), Fit::Clamp)
        .map_or(env.cert.not_after, |f| f.not_after);
    let req = CertRequest::server(
        "localhost",
        vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
        hsm::open_signer(&server_key)?.public_key().clone(),
        nb,
        not_after,
    );
    let server = issue(&env, &req)?;
    let mut out = OutputSet::new();
    out.add(dir.join("server.pem"), server.pem() + &env.cert.pem());

    // Audit checkpoint key and the local OIDC issuer's signing key.
    let audit_public = hsm::generate_key(&hsm::KeyRef::file(dir.join("audit.key")), hsm::KeyAlgorithm::EcdsaP256)?;
    out.add(dir.join("audit.pub.pem"), audit_public.to_pem());
    let oidc = hsm::KeyRef::file(dir.join("dev-oidc.key"));
    let oidc_public = hsm::generate_key(&oidc, hsm::KeyAlgorithm::EcdsaP256)?;
    out.add(dir.join("jwks.json"), serde_json::to_vec_pretty(&jwks(&oidc_public))?);

    // The dev cluster's service-account token signer (standing in for its API server) and the
    // key of its intermediate, which the server holds (external-CA mode): beside the
    // environment key in SoftHSM2, or a file.
    let sa_public = hsm::generate_key(&hsm::KeyRef::file(dir.join("sa-signing.key")), hsm::KeyAlgorithm::EcdsaP256)?;
    out.add(dir.join("sa-jwks.json"), serde_json::to_vec_pretty(&jwks(&sa_public))?);
    let cluster_key = match report.environment_key.split_once("object=") {
        Some((head, tail)) if report.environment_key.starts_with("pkcs11:") => {
            let rest = tail.find(['?', ';']).map_or("", |i| &tail[i..]);
            format!("{head}object={DEV_CLUSTER}-cluster-key{rest}")
        }
        _ => format!("file:{}", dir.join("cluster-dev.key").display()),
    };
    hsm::generate_key(&cluster_key.parse()?, hsm::KeyAlgorithm::EcdsaP256)?;
    out.add(dir.join("cluster-dev.keyref"), cluster_key.clone());

    let env_cert = report.environment_cert.strip_prefix(&dir).unwrap_or(&report.environment_cert).display().to_string();
    let root_rel = report.root_cert.strip_prefix(&dir).unwrap_or(&report.root_cert).display().to_string();
    let toml = format!(
        r#"# ca-server --dev configuration, generated. See README.md for every key.
listen = "{DEFAULT_LISTEN}"

[tls]
cert = "server.pem"
key = "file:server.key"
client_ca = ["{root_rel}"]

[database]
url = "sqlite://ca.db"

[auth]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
jwks_file = "jwks.json"
roles_claim = "roles"
# State-changing calls need a second factor; the dev tokens state one.
require_mfa = {{ acr = ["{DEV_ACR}"], amr = ["otp", "hwk", "mfa"] }}

[[issuers]]
name = "{ENVIRONMENT}"
certificate = "{env_cert}"
chain = ["{root_rel}"]
key = "{env_key}"

[policy]
cluster_validity = "30d"
enrolment_token_ttl = "24h"

[crl]
validity = "1d"
refresh_before = "12h"

[audit]
key = "file:audit.key"
checkpoint_every = 50
checkpoint_interval = "60s"

[jobs]
interval = "10s"

[log]
format = "text"
level = "info"

# Prometheus metrics, on loopback only.
[metrics]
listen = "{DEFAULT_METRICS_LISTEN}"

# Istio's certificate API (external-CA mode) for the dev cluster.
[istio]
listen = "{DEFAULT_GRPC_LISTEN}"
server_names = ["localhost", "127.0.0.1"]
# The dev cluster's settings (issuer, keys, lifetimes) are in the database: see
# GET /v1/clusters/{DEV_CLUSTER}/settings.
"#,
        env_key = report.environment_key
    );
    out.add(&config, toml);
    out.commit()?;
    Ok(DevSetup { dir, config, root_cert, created: true, file_keys })
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn kid(public: &hsm::PublicKey) -> String {
    hex::encode(&public.fingerprint()[..8])
}

fn jwks(public: &hsm::PublicKey) -> serde_json::Value {
    // An uncompressed P-256 point: 0x04 || x || y.
    let raw = public.raw();
    json!({"keys": [{"kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..65]), "kid": kid(public), "alg": "ES256", "use": "sig"}]})
}

/// Mints a dev operator token valid for 12 hours, stating a second factor. The dev setup's
/// token-signing keys play the identity provider's and the cluster's; jsonwebtoken needs them
/// as PEM.
#[allow(clippy::disallowed_methods)]
pub fn mint_token(dir: &Path, subject: &str, roles: &[&str]) -> Result<String> {
    let key = hsm::export_file_key(&hsm::KeyRef::file(dir.join("dev-oidc.key")))?;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid(key.public_key()));
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = json!({"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "roles": roles, "acr": DEV_ACR, "amr": DEV_AMR, "iat": now, "nbf": now - 60, "exp": now + 12 * 3600});
    let enc = jsonwebtoken::EncodingKey::from_ec_pem(key.expose_pem().as_bytes())?;
    Ok(jsonwebtoken::encode(&header, &claims, &enc)?)
}

/// Mints a service-account token for `namespace/service_account` of the dev cluster, as a
/// Kubernetes API server would project it for Istio (audience `istio-ca`), valid 12 hours.
#[allow(clippy::disallowed_methods)]
pub fn mint_sa_token(dir: &Path, namespace: &str, service_account: &str) -> Result<String> {
    let key = hsm::export_file_key(&hsm::KeyRef::file(dir.join("sa-signing.key")))?;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid(key.public_key()));
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = json!({"iss": SA_ISSUER, "aud": ["istio-ca"], "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
        "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": service_account, "uid": uuid::Uuid::new_v4().to_string()}},
        "iat": now, "nbf": now - 60, "exp": now + 12 * 3600});
    let enc = jsonwebtoken::EncodingKey::from_ec_pem(key.expose_pem().as_bytes())?;
    Ok(jsonwebtoken::encode(&header, &claims, &enc)?)
}

/// The dev cluster's Istio settings: its stand-in API server's issuer and keys
/// (`sa-jwks.json`), ztunnel as the trusted node account, the default lifetimes.
fn dev_settings(setup: &DevSetup) -> Result<crate::config::IstioSettings> {
    let jwks: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(setup.dir.join("sa-jwks.json"))?)?;
    Ok(serde_json::from_value(json!({"sa_issuer": SA_ISSUER, "jwks": jwks,
        "trusted_node_accounts": ["istio-system/ztunnel"], "default_ttl": "24h", "max_ttl": "7d", "over_max": "reject"}))?)
}

/// Registers the dev cluster in external-CA mode on first start, with its settings (also when
/// a dev database from before settings were stored has the cluster without them). The
/// two-person rule is skipped here only (there is one person in a dev setup); the audit
/// record says so.
pub async fn register_dev_cluster(setup: &DevSetup, state: &crate::service::state::AppState) -> Result<()> {
    let keyref_path = setup.dir.join("cluster-dev.keyref");
    if !keyref_path.exists() {
        return Ok(());
    }
    if state.store.get_cluster(DEV_CLUSTER).await?.is_some() {
        if state.store.get_cluster_settings(DEV_CLUSTER).await?.is_none()
            && state.config.istio.as_ref().is_none_or(|i| !i.clusters.contains_key(DEV_CLUSTER))
        {
            let mut tx = state.store.write().await?;
            store_dev_settings(setup, &mut tx).await?;
            tx.commit().await?;
        }
        return Ok(());
    }
    let key_ref = std::fs::read_to_string(&keyref_path)?.trim().to_string();
    let now = ca_store::now_secs();
    let mut tx = state.store.write().await?;
    tx.insert_cluster(&ca_store::ClusterRecord {
        name: DEV_CLUSTER.into(),
        environment: ENVIRONMENT.into(),
        trust_domain: TRUST_DOMAIN.into(),
        status: ca_store::ClusterStatus::Active,
        request_id: "dev-setup".into(),
        enrolment_token_hash: None,
        enrolment_expires_at: None,
        enrolled_at: None,
        created_by: "dev-setup".into(),
        created_at: now,
        current_serial: None,
        previous_serial: None,
        mode: ca_store::ClusterMode::ExternalCa,
        key_ref: Some(key_ref.clone()),
    })
    .await?;
    tx.audit(ca_store::AuditEvent::new(
        "dev-setup",
        "cluster.registered",
        DEV_CLUSTER,
        json!({"mode": "external-ca", "trust_domain": TRUST_DOMAIN, "key": key_ref,
               "two_person_rule": "skipped: ca-server --dev"}),
    ))
    .await?;
    store_dev_settings(setup, &mut tx).await?;
    tx.commit().await?;
    Ok(())
}

async fn store_dev_settings(setup: &DevSetup, tx: &mut ca_store::Tx) -> Result<()> {
    let settings = dev_settings(setup)?;
    crate::service::cluster_settings::store_new(
        tx,
        DEV_CLUSTER,
        &settings,
        crate::service::cluster_settings::SOURCE_REGISTRATION,
        "dev-setup",
    )
    .await
    .map_err(|e| anyhow::anyhow!("storing the dev cluster's settings: {}", e.detail))?;
    tx.audit(ca_store::AuditEvent::new(
        "dev-setup",
        "cluster.settings.changed",
        DEV_CLUSTER,
        json!({"settings": crate::service::cluster_settings::audit_view(&settings),
               "two_person_rule": "skipped: ca-server --dev"}),
    ))
    .await?;
    Ok(())
}

/// Writes `dev.env` (mode 0600: it holds tokens) for scripts and tutorials to `source`.
pub fn write_env(
    setup: &DevSetup,
    url: &str,
    database_url: &str,
    grpc: Option<std::net::SocketAddr>,
    metrics: Option<&str>,
) -> Result<Vec<(String, String)>> {
    let mut vars = vec![
        ("CA_SERVER_URL".to_string(), url.to_string()),
        ("CA_ROOT_CERT".to_string(), setup.root_cert.display().to_string()),
        ("CA_DATABASE_URL".to_string(), database_url.to_string()),
        ("CA_ENVIRONMENT".to_string(), ENVIRONMENT.to_string()),
        ("CA_ADMIN_TOKEN".to_string(), mint_token(&setup.dir, "dev-admin", &["admin"])?),
        ("CA_APPROVER_TOKEN".to_string(), mint_token(&setup.dir, "dev-approver", &["operator"])?),
        ("CA_AUDITOR_TOKEN".to_string(), mint_token(&setup.dir, "dev-auditor", &["auditor"])?),
        ("CA_AUDIT_PUBLIC_KEY".to_string(), setup.dir.join("audit.pub.pem").display().to_string()),
    ];
    if let Some(m) = metrics {
        vars.push(("CA_METRICS_URL".to_string(), m.to_string()));
    }
    if let Some(g) = grpc {
        vars.extend([
            ("CA_GRPC_ADDR".to_string(), g.to_string()),
            ("CA_DEV_CLUSTER".to_string(), DEV_CLUSTER.to_string()),
            ("CA_TRUST_DOMAIN".to_string(), TRUST_DOMAIN.to_string()),
            ("CA_SA_ISSUER".to_string(), SA_ISSUER.to_string()),
            ("CA_SA_JWKS".to_string(), setup.dir.join("sa-jwks.json").display().to_string()),
            ("CA_SA_SIGNING_KEY".to_string(), setup.dir.join("sa-signing.key").display().to_string()),
            ("CA_EXAMPLE_TOKEN".to_string(), mint_sa_token(&setup.dir, "default", "default")?),
        ]);
    }
    let mut text = String::from("# Written by ca-server --dev at every start. Tokens expire after 12 hours.\n");
    for (k, v) in &vars {
        text.push_str(&format!("{k}={v}\n"));
    }
    let path = setup.dir.join("dev.env");
    let tmp = setup.dir.join(".dev.env.tmp");
    let _ = std::fs::remove_file(&tmp);
    hsm::write_new_private(&tmp, text.as_bytes())?;
    std::fs::rename(&tmp, &path)?;
    Ok(vars)
}
