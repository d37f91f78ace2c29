//! A whole throwaway hierarchy in one directory: root and environment keys in a fresh SoftHSM2
//! token (file keys, loudly, when SoftHSM2 is missing), every step run through the ceremony
//! code, and the istiod bundle for the cluster.

use std::path::{Path, PathBuf};

use secrecy::ExposeSecret;

use crate::cacerts::{CacertsInput, write_cacerts};
use crate::ceremony::{self, TRANSCRIPT_FILE};
use crate::error::{CoreError, Result};

pub struct Options {
    pub dir: PathBuf,
    pub trust_domain: String,
    pub environment: String,
    pub cluster: String,
    pub operator: String,
    /// Use file keys even when SoftHSM2 is installed.
    pub file_keys: bool,
    /// Also make the cluster intermediate and its istiod bundle offline. `ca-server --dev`
    /// stops at the environment: clusters enrol online.
    pub with_cluster: bool,
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub dir: PathBuf,
    /// The SoftHSM2 module the root and environment keys live in; `None` means file keys.
    pub hsm_module: Option<PathBuf>,
    pub softhsm_conf: Option<PathBuf>,
    pub root_key: String,
    pub environment_key: String,
    pub cluster_key: Option<String>,
    pub root_cert: PathBuf,
    pub environment_cert: PathBuf,
    pub cluster_cert: Option<PathBuf>,
    pub cacerts_dir: Option<PathBuf>,
    pub ceremonies: Vec<PathBuf>,
    pub transcripts: Vec<PathBuf>,
}

pub const TOKEN_LABEL: &str = "pki-quickstart";

fn mkdir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(|e| CoreError::io(p, e))
}

/// Runs the quickstart into `opts.dir`, which must be absent or empty.
pub fn run(opts: &Options) -> Result<Report> {
    if opts.dir.exists() && std::fs::read_dir(&opts.dir).map_err(|e| CoreError::io(&opts.dir, e))?.next().is_some() {
        return Err(CoreError::OutputExists(opts.dir.clone()));
    }
    let td: crate::names::TrustDomain = opts.trust_domain.parse()?;
    for (what, name) in [("environment", &opts.environment), ("cluster", &opts.cluster)] {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(
                crate::PolicyError::Invalid(format!("{what} name {name:?}: use letters, digits and '-'")).into()
            );
        }
    }
    mkdir(&opts.dir)?;
    let dir = opts.dir.canonicalize().map_err(|e| CoreError::io(&opts.dir, e))?;
    let (env_name, cluster_name) = (&opts.environment, &opts.cluster);
    let root_dir = dir.join("root");
    let env_dir = dir.join("environments").join(env_name);
    let cluster_dir = dir.join("clusters").join(cluster_name);
    let cer_dir = dir.join("ceremonies");
    for d in [&root_dir, &env_dir, &cluster_dir, &cer_dir] {
        mkdir(d)?;
    }

    let module = if opts.file_keys { None } else { hsm::softhsm::find_module() };
    let (root_key, env_key, conf) = match &module {
        Some(module) => {
            let hsm_dir = dir.join("softhsm");
            mkdir(&hsm_dir)?;
            let conf = hsm::softhsm::write_config(&hsm_dir)?;
            hsm::softhsm::use_config(&conf);
            let user_pin = hsm::softhsm::random_pin()?;
            let so_pin = hsm::softhsm::random_pin()?;
            let pin_file = hsm_dir.join("user.pin");
            hsm::write_new_private(&pin_file, user_pin.expose_secret().as_bytes())?;
            hsm::write_new_private(&hsm_dir.join("so.pin"), so_pin.expose_secret().as_bytes())?;
            hsm::softhsm::init_token(module, TOKEN_LABEL, &so_pin, &user_pin)?;
            let r = |object: &str| {
                format!(
                    "pkcs11:token={TOKEN_LABEL};object={object}?module-path={}&pin-source=file:{}",
                    module.display(),
                    pin_file.display()
                )
            };
            (r("root-key"), r(&format!("{env_name}-environment-key")), Some(conf))
        }
        None => {
            let keys = dir.join("keys");
            mkdir(&keys)?;
            (
                format!("file:{}", keys.join("root.key").display()),
                format!("file:{}", keys.join(format!("{env_name}-environment.key")).display()),
                None,
            )
        }
    };
    let cluster_key_path = cluster_dir.join("cluster.key");
    let cluster_key = format!("file:{}", cluster_key_path.display());
    let p = |d: &Path, f: &str| d.join(f).display().to_string();
    let root_cert = root_dir.join("root.pem");
    let env_cert = env_dir.join("environment.pem");
    let cluster_cert = cluster_dir.join("cluster.pem");

    let steps: Vec<(String, String)> = vec![
        (
            "01-root-key.yaml".into(),
            format!(
                "ceremony-type: key\nkey: \"{root_key}\"\nalgorithm: ecdsa-p384\noutputs:\n  public-key: {}\n",
                p(&root_dir, "root-key.pub.pem")
            ),
        ),
        (
            "02-root.yaml".into(),
            format!(
                "ceremony-type: root\nkey: \"{root_key}\"\nsubject: \"CN=Quickstart Root CA,O=PKI Quickstart\"\nvalidity: 10y\npath-len: 2\noutputs:\n  certificate: {}\n",
                root_cert.display()
            ),
        ),
        (
            "03-environment-key.yaml".into(),
            format!(
                "ceremony-type: key\nkey: \"{env_key}\"\nalgorithm: ecdsa-p256\noutputs:\n  public-key: {}\n",
                p(&env_dir, "environment-key.pub.pem")
            ),
        ),
        (
            "04-environment-csr.yaml".into(),
            format!(
                "ceremony-type: csr\nkey: \"{env_key}\"\nsubject: \"CN={env_name} Environment CA,O=PKI Quickstart\"\noutputs:\n  csr: {}\n",
                p(&env_dir, "environment.csr")
            ),
        ),
        (
            "05-environment.yaml".into(),
            format!(
                "ceremony-type: intermediate\nprofile: environment\nissuer:\n  certificate: {}\n  key: \"{root_key}\"\ncsr: {}\ntrust-domains: [{td}]\nvalidity: 5y\noutputs:\n  certificate: {}\n",
                root_cert.display(),
                p(&env_dir, "environment.csr"),
                env_cert.display()
            ),
        ),
        (
            "06-cluster-key.yaml".into(),
            format!(
                "ceremony-type: key\nkey: \"{cluster_key}\"\nalgorithm: ecdsa-p256\noutputs:\n  public-key: {}\n",
                p(&cluster_dir, "cluster-key.pub.pem")
            ),
        ),
        (
            "07-cluster-csr.yaml".into(),
            format!(
                "ceremony-type: csr\nkey: \"{cluster_key}\"\nsubject: \"CN={cluster_name} Cluster CA,O=PKI Quickstart\"\noutputs:\n  csr: {}\n",
                p(&cluster_dir, "cluster.csr")
            ),
        ),
        (
            "08-cluster.yaml".into(),
            format!(
                "ceremony-type: intermediate\nprofile: cluster\nissuer:\n  certificate: {}\n  key: \"{env_key}\"\ncsr: {}\ntrust-domains: [{td}]\nvalidity: 1y\noutputs:\n  certificate: {}\n",
                env_cert.display(),
                p(&cluster_dir, "cluster.csr"),
                cluster_cert.display()
            ),
        ),
    ];
    let mut ceremonies = Vec::new();
    let steps = steps.into_iter().take(if opts.with_cluster { usize::MAX } else { 5 });
    for (name, yaml) in steps {
        let path = cer_dir.join(name);
        std::fs::write(&path, yaml).map_err(|e| CoreError::io(&path, e))?;
        ceremony::load(&path)?.run(&opts.operator)?;
        ceremonies.push(path);
    }

    let mut transcripts: Vec<PathBuf> = [&root_dir, &env_dir].iter().map(|d| d.join(TRANSCRIPT_FILE)).collect();
    if !opts.with_cluster {
        let _ = std::fs::remove_dir_all(dir.join("clusters"));
        return Ok(Report {
            dir: dir.clone(),
            hsm_module: module,
            softhsm_conf: conf,
            root_key,
            environment_key: env_key,
            cluster_key: None,
            root_cert,
            environment_cert: env_cert,
            cluster_cert: None,
            cacerts_dir: None,
            ceremonies,
            transcripts,
        });
    }
    transcripts.push(cluster_dir.join(TRANSCRIPT_FILE));
    let cacerts_dir = cluster_dir.join("cacerts");
    let key_ref: hsm::KeyRef = cluster_key.parse()?;
    write_cacerts(
        &CacertsInput {
            cert: &cluster_cert,
            key: &key_ref,
            chain: std::slice::from_ref(&env_cert),
            root: &root_cert,
            namespace: "istio-system",
        },
        &cacerts_dir,
    )?;
    Ok(Report {
        dir: dir.clone(),
        hsm_module: module,
        softhsm_conf: conf,
        root_key,
        environment_key: env_key,
        cluster_key: Some(cluster_key),
        root_cert,
        environment_cert: env_cert,
        cluster_cert: Some(cluster_cert),
        cacerts_dir: Some(cacerts_dir),
        ceremonies,
        transcripts,
    })
}
