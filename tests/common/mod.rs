//! Shared test rig: a SoftHSM2 token directory per test process, one token per test, and
//! helpers that run the real `ca-cli` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use secrecy::SecretString;

pub const PIN: &str = "4711-test-pin";
pub const PIN_VAR: &str = "TEST_TOKEN_PIN";

pub struct Hsm {
    pub dir: tempfile::TempDir,
    pub conf: PathBuf,
    pub module: PathBuf,
}

/// The per-process SoftHSM2 setup. A missing SoftHSM2 is a failure, never a skip: the test
/// command in README.md installs it.
pub fn hsm() -> &'static Hsm {
    static H: OnceLock<Hsm> = OnceLock::new();
    H.get_or_init(|| {
        let module = hsm::softhsm::find_module()
            .expect("SoftHSM2 is not installed; run the test command from README.md, which installs softhsm2");
        let dir = tempfile::tempdir().unwrap();
        let conf = hsm::softhsm::write_config(dir.path()).unwrap();
        hsm::softhsm::use_config(&conf);
        Hsm { dir, conf, module }
    })
}

/// A fresh token for one test.
pub fn token(label: &str) -> &'static Hsm {
    let h = hsm();
    hsm::softhsm::init_token(&h.module, label, &SecretString::from("so-4711"), &SecretString::from(PIN)).unwrap();
    h
}

/// `pkcs11:` reference to `object` in `token`, PIN from the environment.
pub fn p11(token: &str, object: &str) -> String {
    format!("pkcs11:token={token};object={object}?module-path={}&pin-source=env:{PIN_VAR}", hsm().module.display())
}

pub fn ca_cli() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ca-cli"));
    c.env("SOFTHSM2_CONF", &hsm().conf).env(PIN_VAR, PIN).env_remove("PKCS11_MODULE");
    c
}

pub fn run(args: &[&str]) -> Output {
    ca_cli().args(args).output().expect("ca-cli runs")
}

/// Runs ca-cli and requires success; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(out.status.success(), "ca-cli {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs ca-cli and requires failure with exactly one `error:` line on stderr; returns it.
pub fn fails(args: &[&str]) -> String {
    fails_with(ca_cli().args(args))
}

pub fn fails_with(cmd: &mut Command) -> String {
    let out = cmd.output().expect("ca-cli runs");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected failure, got success; stdout: {}", String::from_utf8_lossy(&out.stdout));
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "errors are one line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(!stderr.contains(PIN), "the PIN leaked into stderr: {stderr}");
    lines[0].to_string()
}

pub fn openssl(args: &[&str]) -> Output {
    Command::new("openssl").args(args).output().expect("openssl is installed")
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn der_of(path: &Path) -> Vec<u8> {
    let data = std::fs::read(path).unwrap();
    pem::parse(&data).unwrap().into_contents()
}

pub fn ders_of(path: &Path) -> Vec<Vec<u8>> {
    let data = std::fs::read(path).unwrap();
    pem::parse_many(&data).unwrap().into_iter().map(|p| p.into_contents()).collect()
}

/// A small hierarchy built through the CLI: root and environment in the token, cluster and
/// workload as file keys.
pub struct Hierarchy {
    pub dir: PathBuf,
    pub root: PathBuf,
    pub env: PathBuf,
    pub env_key: String,
    pub cluster: PathBuf,
    pub cluster_key: PathBuf,
}

pub fn build_hierarchy(tok: &str, dir: &Path, env_extra: &[&str]) -> Hierarchy {
    token(tok);
    let p = |f: &str| dir.join(f);
    let root_key = p11(tok, "root");
    let env_key = p11(tok, "env");
    ok(&["key", "generate", "--key", &root_key, "--algorithm", "ecdsa-p384", "--public-out", s(&p("root.pub.pem"))]);
    ok(&[
        "root",
        "create",
        "--key",
        &root_key,
        "--subject",
        "CN=Test Root CA,O=Example",
        "--validity",
        "10y",
        "--out",
        s(&p("root.pem")),
    ]);
    ok(&["key", "generate", "--key", &env_key, "--algorithm", "ecdsa-p256"]);
    ok(&[
        "csr",
        "create",
        "--key",
        &env_key,
        "--subject",
        "CN=prod Environment CA,O=Example",
        "--out",
        s(&p("env.csr")),
    ]);
    let (root_pem, env_csr, env_pem) = (p("root.pem"), p("env.csr"), p("env.pem"));
    let mut args = vec![
        "sign",
        "--profile",
        "environment",
        "--ca-cert",
        s(&root_pem),
        "--ca-key",
        &root_key,
        "--csr",
        s(&env_csr),
        "--trust-domain",
        "prod.example.com",
        "--validity",
        "5y",
        "--out",
        s(&env_pem),
    ];
    args.extend_from_slice(env_extra);
    ok(&args);
    let cluster_key = p("cluster.key");
    let cluster_ref = format!("file:{}", cluster_key.display());
    ok(&["key", "generate", "--key", &cluster_ref, "--algorithm", "ecdsa-p256"]);
    ok(&[
        "csr",
        "create",
        "--key",
        &cluster_ref,
        "--subject",
        "CN=prod-1 Cluster CA,O=Example",
        "--out",
        s(&p("cluster.csr")),
    ]);
    ok(&[
        "sign",
        "--profile",
        "cluster",
        "--ca-cert",
        s(&p("env.pem")),
        "--ca-key",
        &env_key,
        "--csr",
        s(&p("cluster.csr")),
        "--trust-domain",
        "prod.example.com",
        "--validity",
        "1y",
        "--out",
        s(&p("cluster.pem")),
    ]);
    Hierarchy {
        dir: dir.to_path_buf(),
        root: p("root.pem"),
        env: p("env.pem"),
        env_key,
        cluster: p("cluster.pem"),
        cluster_key,
    }
}

/// Signs a workload leaf for `spiffe_id` with the cluster's file key.
pub fn workload(h: &Hierarchy, name: &str, spiffe_id: &str) -> PathBuf {
    let key = h.dir.join(format!("{name}.key"));
    let key_ref = format!("file:{}", key.display());
    let csr = h.dir.join(format!("{name}.csr"));
    let out = h.dir.join(format!("{name}.pem"));
    ok(&["key", "generate", "--key", &key_ref, "--algorithm", "ecdsa-p256"]);
    ok(&["csr", "create", "--key", &key_ref, "--subject", &format!("CN={name}"), "--out", s(&csr)]);
    ok(&[
        "sign",
        "--profile",
        "workload",
        "--ca-cert",
        s(&h.cluster),
        "--ca-key",
        &format!("file:{}", h.cluster_key.display()),
        "--csr",
        s(&csr),
        "--spiffe-id",
        spiffe_id,
        "--validity",
        "24h",
        "--out",
        s(&out),
    ]);
    out
}
