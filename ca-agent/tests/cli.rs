//! The binary's own refusals, before it talks to anything. (The end-to-end runs against
//! ca-server and the Kubernetes API stand-in are in `tests/agent/`.)

use std::process::Command;

fn agent() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ca-agent"));
    for (k, _) in std::env::vars() {
        if k.starts_with("CA_AGENT_") || k == "KUBECONFIG" || k == "KUBERNETES_SERVICE_HOST" {
            c.env_remove(k);
        }
    }
    c
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn required_flags_are_named() {
    let o = agent().arg("run").output().unwrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("--mode") && err.contains("--cluster") && err.contains("--server"), "{err}");
}

#[test]
fn a_bad_cluster_name_or_root_is_refused_before_any_call() {
    let dir = tempfile::tempdir().unwrap();
    let o = agent()
        .args(["run", "--mode", "plugin", "--cluster", "Not_A_Name", "--server", "https://127.0.0.1:1", "--ca-root"])
        .arg(dir.path().join("missing.pem"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--cluster \"Not_A_Name\" is not a cluster name"), "{}", stderr(&o));

    let o = agent()
        .args(["run", "--mode", "plugin", "--cluster", "c1", "--server", "https://127.0.0.1:1", "--ca-root"])
        .arg(dir.path().join("missing.pem"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--ca-root"), "{}", stderr(&o));
}

#[test]
fn without_kubernetes_credentials_it_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.pem");
    let key = hsm::SecretKey::generate(hsm::KeyAlgorithm::EcdsaP256).unwrap();
    let kp = rcgen::KeyPair::from_pem(key.expose_pem()).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["r.test".into()]).unwrap().self_signed(&kp).unwrap();
    std::fs::write(&root, cert.pem()).unwrap();
    let o = agent()
        .args(["run", "--mode", "external-ca", "--cluster", "c1", "--server", "https://127.0.0.1:1", "--ca-root"])
        .arg(&root)
        .env("KUBECONFIG", dir.path().join("no-such-kubeconfig"))
        .env("HOME", dir.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no Kubernetes credentials"), "{}", stderr(&o));
}

#[test]
fn rollback_is_for_plugin_mode_only() {
    let dir = tempfile::tempdir().unwrap();
    let o = agent()
        .args(["rollback", "--mode", "external-ca", "--cluster", "c1", "--server", "https://127.0.0.1:1", "--ca-root"])
        .arg(dir.path().join("r.pem"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("plug-in mode"), "{}", stderr(&o));
}
