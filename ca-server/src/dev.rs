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
use ca_core::profile::{CertRequest, ProfileKind};
use serde_json::json;

pub const ISSUER: &str = "https://dev.pki-mesh.local";
pub const AUDIENCE: &str = "ca-server";
pub const ENVIRONMENT: &str = "dev";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8443";

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
    let mut subject = rcgen::DistinguishedName::new();
    subject.push(rcgen::DnType::CommonName, "localhost");
    let req = CertRequest {
        server_names: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
        ..CertRequest::new(
            ProfileKind::Server,
            subject,
            hsm::open_signer(&server_key)?.public_key().clone(),
            nb,
            (nb + time::Duration::days(365)).min(env.cert.not_after),
        )
    };
    let server = issue(&env, &req)?;
    let mut out = OutputSet::new();
    out.add(dir.join("server.pem"), server.pem() + &env.cert.pem());

    // Audit checkpoint key and the local OIDC issuer's signing key.
    let audit_public = hsm::generate_key(&hsm::KeyRef::file(dir.join("audit.key")), hsm::KeyAlgorithm::EcdsaP256)?;
    out.add(dir.join("audit.pub.pem"), audit_public.to_pem());
    let oidc = hsm::KeyRef::file(dir.join("dev-oidc.key"));
    let oidc_public = hsm::generate_key(&oidc, hsm::KeyAlgorithm::EcdsaP256)?;
    out.add(dir.join("jwks.json"), serde_json::to_vec_pretty(&jwks(&oidc_public))?);

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

/// Mints a dev operator token valid for 12 hours.
pub fn mint_token(dir: &Path, subject: &str, roles: &[&str]) -> Result<String> {
    let key = hsm::export_file_key(&hsm::KeyRef::file(dir.join("dev-oidc.key")))?;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid(key.public_key()));
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = json!({"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "roles": roles, "iat": now, "nbf": now - 60, "exp": now + 12 * 3600});
    let enc = jsonwebtoken::EncodingKey::from_ec_pem(key.expose_pem().as_bytes())?;
    Ok(jsonwebtoken::encode(&header, &claims, &enc)?)
}

/// Writes `dev.env` (mode 0600: it holds tokens) for scripts and tutorials to `source`.
pub fn write_env(setup: &DevSetup, url: &str, database_url: &str) -> Result<Vec<(String, String)>> {
    let vars = vec![
        ("CA_SERVER_URL".to_string(), url.to_string()),
        ("CA_ROOT_CERT".to_string(), setup.root_cert.display().to_string()),
        ("CA_DATABASE_URL".to_string(), database_url.to_string()),
        ("CA_ENVIRONMENT".to_string(), ENVIRONMENT.to_string()),
        ("CA_ADMIN_TOKEN".to_string(), mint_token(&setup.dir, "dev-admin", &["admin"])?),
        ("CA_APPROVER_TOKEN".to_string(), mint_token(&setup.dir, "dev-approver", &["operator"])?),
        ("CA_AUDITOR_TOKEN".to_string(), mint_token(&setup.dir, "dev-auditor", &["auditor"])?),
        ("CA_AUDIT_PUBLIC_KEY".to_string(), setup.dir.join("audit.pub.pem").display().to_string()),
    ];
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
