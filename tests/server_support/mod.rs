//! Spawning the real `ca-server` (and `ca-cli`) for end-to-end tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const DEFAULT_PG: &str = "postgres://postgres@127.0.0.1:5432/test";

pub fn ca_server_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ca-server"))
}

/// `ca-cli` is built next to `ca-server` by `cargo nextest run --workspace`.
pub fn ca_cli_bin() -> PathBuf {
    let p = ca_server_bin().with_file_name("ca-cli");
    assert!(p.exists(), "{} is missing: build the workspace (scripts/test does)", p.display());
    p
}

/// A fresh, empty PostgreSQL database. A missing PostgreSQL is a failure, never a skip.
pub async fn fresh_pg_url() -> String {
    let base = std::env::var("PKI_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_PG.to_string());
    let admin = sqlx::PgPool::connect(&base)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {base} is required (PKI_TEST_DATABASE_URL): {e}"));
    let mut b = [0u8; 6];
    aws_lc_rs::rand::fill(&mut b).unwrap();
    let name = format!("pki_test_{}", hex::encode(b));
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&admin).await.unwrap();
    admin.close().await;
    format!("{}/{name}", base.rsplit_once('/').unwrap().0)
}

pub struct Server {
    pub child: Child,
    pub url: String,
    pub dir: PathBuf,
    pub env: HashMap<String, String>,
    pub client: reqwest::Client,
    pub stderr_log: PathBuf,
    /// The gRPC (Istio external-CA) address, when the server listens for it.
    pub grpc: Option<String>,
    /// The metrics listener's base URL (`http://ADDR`), when the server has one.
    pub metrics: Option<String>,
}

#[derive(Default, Clone)]
pub struct Opts {
    pub database_url: Option<String>,
    /// Extra environment, e.g. CA_SERVER_POLICY__CLUSTER_VALIDITY.
    pub env: Vec<(String, String)>,
    /// Run from an existing dev directory's config instead of --dev (a second replica).
    pub config_of: Option<PathBuf>,
}

impl Server {
    /// Starts `ca-server --dev` in `dir` on a free loopback port and waits until it listens.
    pub fn start(dir: &Path, opts: &Opts) -> Server {
        let stderr_log = dir.with_extension(format!("{}.log", std::process::id()));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&stderr_log).unwrap();
        let mut cmd = Command::new(ca_server_bin());
        match &opts.config_of {
            None => {
                cmd.args(["--dev", "--dev-dir"]).arg(dir);
            }
            Some(dev_dir) => {
                cmd.arg("--config").arg(dev_dir.join("config.toml"));
                // The second replica shares the first one's SoftHSM2 token directory.
                let conf = dev_dir.join("hierarchy/softhsm/softhsm2.conf");
                if conf.exists() {
                    cmd.env("SOFTHSM2_CONF", conf);
                }
            }
        }
        cmd.args(["--listen", "127.0.0.1:0"])
            .env("CA_SERVER_ISTIO__LISTEN", "127.0.0.1:0")
            .env("CA_SERVER_METRICS__LISTEN", "127.0.0.1:0")
            .env("CA_SERVER_JOBS__INTERVAL", "1s")
            // Summaries of unauthenticated refusals show up quickly enough to be checked.
            .env("CA_SERVER_AUDIT__DENIAL_SUMMARY_INTERVAL", "1s")
            .env("CA_SERVER_LOG__FORMAT", "json");
        if let Some(db) = &opts.database_url {
            cmd.env("CA_SERVER_DATABASE__URL", db);
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::from(log)).spawn().expect("ca-server starts");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut grpc = None;
        let mut metrics = None;
        let first = loop {
            let line = lines.next().and_then(|l| l.ok()).unwrap_or_else(|| {
                let _ = child.wait();
                panic!(
                    "ca-server exited before listening; log:\n{}",
                    std::fs::read_to_string(&stderr_log).unwrap_or_default()
                )
            });
            if let Some(g) = line.strip_prefix("ca-server grpc listening on ") {
                grpc = Some(g.to_string());
            } else if let Some(m) = line.strip_prefix("ca-server metrics listening on ") {
                metrics = Some(m.to_string());
            } else {
                break line;
            }
        };
        let url = first
            .strip_prefix("ca-server listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_string();
        // Drain the rest of stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let env_dir = opts.config_of.clone().unwrap_or_else(|| dir.to_path_buf());
        // dev.env is written right after the listening line.
        let deadline = Instant::now() + Duration::from_secs(10);
        let env = loop {
            let env = read_env(&env_dir.join("dev.env"));
            if env.contains_key("CA_AUDITOR_TOKEN") || Instant::now() > deadline {
                break env;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let root = env_dir.join("hierarchy/root/root.pem");
        let client = client(&root, None);
        Server { child, url, dir: env_dir, env, client, stderr_log, grpc, metrics }
    }

    pub fn token(&self, role: &str) -> String {
        self.env.get(&format!("CA_{}_TOKEN", role.to_uppercase())).cloned().unwrap_or_else(|| panic!("no {role} token"))
    }

    /// The Prometheus metrics, from the metrics listener.
    pub async fn metrics_text(&self) -> String {
        let url = self.metrics.as_deref().expect("the dev server has a metrics listener");
        let resp = reqwest::get(format!("{url}/metrics")).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap()
    }

    pub fn root(&self) -> PathBuf {
        self.dir.join("hierarchy/root/root.pem")
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = self.client.get(format!("{}/readyz", self.url)).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(Instant::now() < deadline, "server never became ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
        let mut req = self.client.request(method.parse().unwrap(), format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Registers a cluster as admin and approves it as the approver; returns the enrolment token.
    pub async fn register_approved(&self, name: &str) -> String {
        let (s, r) = self
            .call(
                "POST",
                "/v1/clusters",
                Some(&self.token("admin")),
                Some(json!({"name": name, "environment": "dev", "trust_domain": "cluster.local"})),
            )
            .await;
        assert_eq!(s, 202, "{r}");
        let id = r["request_id"].as_str().unwrap().to_string();
        let (s, a) =
            self.call("POST", &format!("/v1/requests/{id}/approve"), Some(&self.token("approver")), None).await;
        assert_eq!(s, 200, "{a}");
        r["enrolment_token"].as_str().unwrap().to_string()
    }

    /// Runs `ca-cli cluster renew` against this server.
    pub fn renew(&self, cluster: &str, state_dir: &Path, token: Option<&str>, force: bool) -> std::process::Output {
        let mut cmd = Command::new(ca_cli_bin());
        cmd.args(["cluster", "renew", "--server", &self.url, "--cluster", cluster, "--ca-root"])
            .arg(self.root())
            .arg("--state-dir")
            .arg(state_dir)
            .env_remove("CA_ENROLMENT_TOKEN");
        if let Some(t) = token {
            cmd.env("CA_ENROLMENT_TOKEN", t);
        }
        if force {
            cmd.arg("--force");
        }
        cmd.output().unwrap()
    }

    pub fn audit_verify(&self, database_url: &str) -> std::process::Output {
        Command::new(ca_cli_bin())
            .args(["audit", "verify", "--database", database_url, "--audit-key"])
            .arg(self.dir.join("audit.pub.pem"))
            .output()
            .unwrap()
    }

    pub fn database_url(&self) -> String {
        self.env["CA_DATABASE_URL"].clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn read_env(path: &Path) -> HashMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A client that trusts `root` and optionally presents a client certificate and key (PEM files).
pub fn client(root: &Path, identity: Option<(&Path, &Path)>) -> reqwest::Client {
    let identity = identity.map(|(c, k)| {
        (
            pem::parse(std::fs::read(c).unwrap()).unwrap().into_contents(),
            pem::parse(std::fs::read(k).unwrap()).unwrap().into_contents(),
        )
    });
    client_der(root, identity.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())))
}

/// As [`client`], with the certificate and PKCS#8 key as DER.
pub fn client_der(root: &Path, identity: Option<(&[u8], &[u8])>) -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    for p in pem::parse_many(std::fs::read(root).unwrap()).unwrap() {
        roots.add(rustls::pki_types::CertificateDer::from(p.into_contents())).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match identity {
        None => b.with_no_client_auth(),
        Some((cert, key)) => b
            .with_client_auth_cert(
                vec![cert.to_vec().into()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.to_vec().into()),
            )
            .unwrap(),
    };
    reqwest::Client::builder().use_preconfigured_tls(cfg).timeout(Duration::from_secs(30)).build().unwrap()
}

/// A PEM CSR for a fresh P-256 key (the key is thrown away).
pub fn csr_pem() -> String {
    csr_with_key().0
}

/// A PEM CSR and its key.
pub fn csr_with_key() -> (String, rcgen::KeyPair) {
    let kp = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name.push(rcgen::DnType::CommonName, "test");
    (p.serialize_request(&kp).unwrap().pem().unwrap(), kp)
}

/// A cluster renewing over mTLS the way istiod's CronJob would: each renewal authenticates
/// with the newest intermediate and its key.
pub struct Renewer {
    pub root: PathBuf,
    pub cluster: String,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl Renewer {
    pub fn from_state_dir(root: &Path, cluster: &str, state: &Path) -> Renewer {
        Renewer {
            root: root.to_path_buf(),
            cluster: cluster.into(),
            cert: pem::parse(std::fs::read(state.join("ca-cert.pem")).unwrap()).unwrap().into_contents(),
            key: pem::parse(std::fs::read(state.join("ca-key.pem")).unwrap()).unwrap().into_contents(),
        }
    }

    /// One renewal against `server_url`; on success the new certificate and key take over.
    pub async fn renew(&mut self, server_url: &str) -> Result<String, reqwest::Error> {
        let (csr, kp) = csr_with_key();
        let c = client_der(&self.root, Some((&self.cert, &self.key)));
        let r = c
            .post(format!("{server_url}/v1/clusters/{}/intermediate", self.cluster))
            .json(&serde_json::json!({"csr": csr}))
            .send()
            .await?;
        let status = r.status();
        let body: Value = r.json().await?;
        assert!(status.is_success(), "renewal of {} failed: {status} {body}", self.cluster);
        self.cert = pem::parse(body["certificate"].as_str().unwrap()).unwrap().into_contents();
        self.key = kp.serialize_der();
        Ok(body["serial"].as_str().unwrap().to_string())
    }
}

/// The whole audit trail, oldest first, read page by page as the auditor.
pub async fn audit_all(srv: &Server) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let (s, v) =
            srv.call("GET", &format!("/v1/audit?after={after}&limit=1000"), Some(&srv.token("auditor")), None).await;
        assert_eq!(s, 200, "{v}");
        let page = v.as_array().unwrap().clone();
        if page.is_empty() {
            return all;
        }
        after = page.last().unwrap()["seq"].as_i64().unwrap();
        all.extend(page);
    }
}

/// `ca-cli --output json ARGS` against `srv`, with a token of `role` in `CA_TOKEN`.
pub fn cli(srv: &Server, role: &str, args: &[&str]) -> std::process::Output {
    Command::new(ca_cli_bin())
        .args(["--output", "json"])
        .args(args)
        .args(["--server", &srv.url, "--ca-root"])
        .arg(srv.root())
        .env("CA_TOKEN", srv.token(role))
        .output()
        .unwrap()
}

/// The JSON a successful `ca-cli` printed (the output is shown when it failed).
pub fn json_of(o: &std::process::Output) -> Value {
    assert!(o.status.success(), "{}\n{}", stdout(o), stderr(o));
    serde_json::from_str(&stdout(o)).unwrap()
}

pub fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Compiles tests/fault-hsm (a PKCS#11 module that forwards to SoftHSM2 and fails or hangs on
/// demand) into `dir` and returns the library's path.
pub fn build_fault_shim(dir: &Path) -> PathBuf {
    let shim = dir.join("libfault.so");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fault-hsm/fault_pkcs11.c");
    let cc = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&shim)
        .arg(&src)
        .arg("-ldl")
        .output()
        .expect("a C compiler (gcc) is installed");
    assert!(cc.status.success(), "{}", String::from_utf8_lossy(&cc.stderr));
    shim
}

/// A gRPC channel to the dev server's Istio certificate API. The serving certificate names
/// localhost and is verified against the dev root, plus `extra_roots` (PEM).
pub async fn grpc_channel(srv: &Server, extra_roots: &str) -> tonic::transport::Channel {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let root = std::fs::read_to_string(srv.root()).unwrap() + extra_roots;
    let addr = srv.grpc.clone().expect("the dev server listens for gRPC");
    let port = addr.rsplit_once(':').unwrap().1;
    Endpoint::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(root)).domain_name("localhost"))
        .unwrap()
        .timeout(Duration::from_secs(20))
        .connect()
        .await
        .unwrap()
}

/// The kid the dev setup gives a P-256 file key in its JWKS.
pub fn kid_of(key: &Path) -> String {
    let k = hsm::export_file_key(&hsm::KeyRef::file(key)).unwrap();
    hex::encode(&k.public_key().fingerprint()[..8])
}

/// A projected service-account token for `ns/sa`, signed with `key` the way the cluster's API
/// server would; `edit` changes the claims.
pub fn sa_token_with(srv: &Server, key: &Path, ns: &str, sa: &str, edit: impl FnOnce(&mut Value)) -> String {
    let pem_text = std::fs::read_to_string(key).unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut claims = json!({"iss": srv.env["CA_SA_ISSUER"], "aud": ["istio-ca"], "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "u"}}, "iat": now, "nbf": now - 5, "exp": now + 600});
    edit(&mut claims);
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid_of(key));
    jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_ec_pem(pem_text.as_bytes()).unwrap())
        .unwrap()
}

/// A second process on `dev_dir`'s configuration whose PKCS#11 calls go through the
/// fault-injecting `shim` (to `real`), failing or hanging as `<tmp>/fault` says.
pub fn start_behind_fault_shim(tmp: &Path, dev_dir: &Path, real: &Path) -> Server {
    Server::start(
        &tmp.join("replica"),
        &Opts {
            config_of: Some(dev_dir.to_path_buf()),
            env: vec![
                ("PKI_FAULT_TARGET".into(), real.display().to_string()),
                ("PKI_FAULT_FILE".into(), tmp.join("fault").display().to_string()),
                ("CA_SERVER_POLICY__HSM_TIMEOUT".into(), "2s".into()),
            ],
            ..Default::default()
        },
    )
}
