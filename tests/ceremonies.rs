//! Ceremony files: the examples in deploy/ceremonies run as written; check never touches the
//! HSM; unknown fields are named; outputs are never overwritten; transcripts record each run.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::Digest;

const ROOT_PIN: &str = "root-pin-4711";
const ENV_PIN: &str = "env-pin-4711";

fn sha256_file(p: &Path) -> String {
    hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap()))
}

fn ceremony(dir: &Path, verb: &str, file: &str) -> Command {
    let mut c = ca_cli();
    c.current_dir(dir)
        .env("PKCS11_MODULE", &hsm().module)
        .env("ROOT_PIN", ROOT_PIN)
        .env("ENV_PIN", ENV_PIN)
        .env("CEREMONY_OPERATOR", "alice (witness: bob)")
        .args(["ceremony", verb, file]);
    c
}

fn run_ok(mut c: Command) -> String {
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn copy_examples(to: &Path) -> Vec<String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/ceremonies");
    let mut names: Vec<String> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    names.sort();
    for n in &names {
        std::fs::copy(src.join(n), to.join(n)).unwrap();
    }
    names
}

fn init_example_tokens() {
    let h = hsm();
    use secrecy::SecretString;
    hsm::softhsm::init_token(&h.module, "root-hsm", &SecretString::from("so-pin-4711"), &SecretString::from(ROOT_PIN))
        .unwrap();
    hsm::softhsm::init_token(
        &h.module,
        "prod-env-hsm",
        &SecretString::from("so-pin-4711"),
        &SecretString::from(ENV_PIN),
    )
    .unwrap();
}

#[test]
fn example_ceremonies_build_a_verifiable_hierarchy_with_transcripts() {
    init_example_tokens();
    let dir = tempfile::tempdir().unwrap();
    let names = copy_examples(dir.path());
    assert!(names.len() >= 12, "{names:?}");
    let types: Vec<String> = names
        .iter()
        .map(|n| {
            let y = std::fs::read_to_string(dir.path().join(n)).unwrap();
            y.lines().find_map(|l| l.strip_prefix("ceremony-type: ")).unwrap().to_string()
        })
        .collect();
    for t in ["key", "root", "csr", "intermediate", "cross-sign", "crl"] {
        assert!(types.iter().any(|x| x == t), "examples cover {t}");
    }
    for n in &names {
        run_ok(ceremony(dir.path(), "check", n));
        run_ok(ceremony(dir.path(), "run", n));
    }
    let p = |f: &str| dir.path().join(f);
    let untrusted = p("untrusted.pem");
    std::fs::write(&untrusted, [std::fs::read(p("prod-env-2026.pem")).unwrap()].concat()).unwrap();
    let out = openssl(&[
        "verify",
        "-CAfile",
        s(&p("root-2026.pem")),
        "-untrusted",
        s(&untrusted),
        s(&p("prod-eu1-cluster.pem")),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // After the rotation ceremonies, a cluster (and so every workload under it) chains to the
    // successor root alone through the cross-certified environment CA ...
    let cross = p("prod-env-2026-cross-signed-by-2031.pem");
    let out =
        openssl(&["verify", "-CAfile", s(&p("root-2031.pem")), "-untrusted", s(&cross), s(&p("prod-eu1-cluster.pem"))]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // ... and our verifier agrees, with the full depth root -> environment -> cluster -> leaf
    // allowed by the root's pathLen.
    ok(&["verify", "--root", s(&p("root-2031.pem")), "--chain", s(&cross), s(&p("prod-eu1-cluster.pem"))]);
    let text = String::from_utf8(openssl(&["x509", "-in", s(&cross), "-noout", "-text"]).stdout).unwrap();
    let original =
        String::from_utf8(openssl(&["x509", "-in", s(&p("prod-env-2026.pem")), "-noout", "-text"]).stdout).unwrap();
    assert!(text.contains("pathlen:1") && text.contains("Issuer: CN = Example Root CA 2031"), "{text}");
    let subject = |t: &str| t.lines().find(|l| l.trim_start().starts_with("Subject:")).unwrap().to_string();
    assert_eq!(subject(&text), subject(&original));
    let ski = |t: &str| t.lines().skip_while(|l| !l.contains("Subject Key Identifier")).nth(1).unwrap().to_string();
    assert_eq!(ski(&text), ski(&original), "the key identifier is kept");
    assert!(text.contains("URI:spiffe://prod.example.com"), "trust domains are kept");
    let out =
        openssl(&["crl", "-in", s(&p("root-2026-crl-1.pem")), "-CAfile", s(&p("root-2026.pem")), "-noout", "-verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The transcript: one line per run, hashes of the file, inputs and outputs, no PIN.
    let transcript = std::fs::read_to_string(p("ceremony-transcript.jsonl")).unwrap();
    assert!(!transcript.contains(ROOT_PIN) && !transcript.contains(ENV_PIN));
    let lines: Vec<serde_json::Value> = transcript.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), names.len());
    for (line, name) in lines.iter().zip(&names) {
        assert_eq!(line["result"], "ok");
        assert_eq!(line["operator"], "alice (witness: bob)");
        assert_eq!(line["ceremony_sha256"].as_str().unwrap(), sha256_file(&p(name)), "{name}");
        assert!(line["time"].as_str().unwrap().ends_with('Z'));
        for f in line["outputs"].as_array().unwrap().iter().chain(line["inputs"].as_array().unwrap()) {
            assert_eq!(f["sha256"].as_str().unwrap(), sha256_file(Path::new(f["path"].as_str().unwrap())));
        }
    }
    let env_line = &lines[names.iter().position(|n| n.starts_with("05-")).unwrap()];
    assert_eq!(env_line["inputs"].as_array().unwrap().len(), 2);
    assert!(env_line["keys"][0].as_str().unwrap().contains("pin-source=env:ROOT_PIN"));
    assert_eq!(env_line["details"]["profile"], "environment");
}

#[test]
fn check_does_not_touch_the_hsm() {
    let dir = tempfile::tempdir().unwrap();
    copy_examples(dir.path());
    // No module, no token, no PIN: check still passes for the key and root ceremonies.
    for f in ["01-root-key.yaml", "02-root-cert.yaml", "06-prod-eu1-cluster-key.yaml"] {
        let mut c = ceremony(dir.path(), "check", f);
        c.env("PKCS11_MODULE", "/nonexistent/module.so").env_remove("ROOT_PIN");
        let out = run_ok(c);
        assert!(out.contains("OK"), "{out}");
    }
    assert!(!dir.path().join("root-2026.pub.pem").exists());
    assert!(!dir.path().join("prod-eu1-cluster.key").exists());
    assert!(!dir.path().join("ceremony-transcript.jsonl").exists(), "check writes no transcript");
    // But it does check inputs: the environment ceremony needs the root certificate.
    let err = fails_with(&mut ceremony(dir.path(), "check", "05-prod-env-intermediate.yaml"));
    assert!(err.contains("root-2026.pem"), "{err}");
}

fn write(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, yaml).unwrap();
    p
}

#[test]
fn bad_ceremony_files_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases = [
        (
            "ceremony-type: key\nkey: \"file:k.pem\"\nalgorithm: ecdsa-p256\ncolour: red\noutputs:\n  public-key: k.pub\n",
            "field `colour`",
        ),
        (
            "ceremony-type: intermediate\nprofile: cluster\nissuer:\n  certificate: e.pem\n  key: \"file:e.key\"\n  colour: red\ncsr: c.csr\ntrust-domains: [a.b]\nvalidity: 1y\noutputs:\n  certificate: c.pem\n",
            "field `issuer.colour`",
        ),
        (
            "ceremony-type: key\nkey: \"file:k.pem\"\nalgorithm: ecdsa-p256\noutputs:\n  public-key: k.pub\n  private-key: k.priv\n",
            "field `outputs.private-key`",
        ),
        (
            "ceremony-type: root\nkey: \"file:k.pem\"\nsubject: \"CN=x\"\nvalidity: banana\noutputs:\n  certificate: r.pem\n",
            "field `validity`",
        ),
        (
            "ceremony-type: root\nkey: \"file:k.pem\"\nsubject: \"O=no-cn\"\nvalidity: 1y\noutputs:\n  certificate: r.pem\n",
            "field `subject`",
        ),
        (
            "ceremony-type: key\nkey: \"pkcs11:token=t;object=o\"\nalgorithm: ecdsa-p256\noutputs:\n  public-key: k.pub\n",
            "field `key`",
        ),
        (
            "ceremony-type: key\nkey: \"file:k.pem\"\nalgorithm: dsa-1024\noutputs:\n  public-key: k.pub\n",
            "field `algorithm`",
        ),
        ("ceremony-type: teleport\n", "field `ceremony-type`"),
        ("key: \"file:k.pem\"\n", "missing field `ceremony-type`"),
        (
            "ceremony-type: crl\nissuer:\n  certificate: r.pem\n  key: \"file:r.key\"\ncrl-number: 1\nnext-update: 30d\nrevoked:\n  - serial: \"zz\"\noutputs:\n  crl: r.crl\n",
            "field `revoked[0].serial`",
        ),
        (
            "ceremony-type: crl\nissuer:\n  certificate: r.pem\n  key: \"file:r.key\"\ncrl-number: 1\nnext-update: 30d\nrevoked:\n  - serial: \"0a\"\n    reason: bored\noutputs:\n  crl: r.crl\n",
            "revoked[0].reason",
        ),
        (
            "ceremony-type: intermediate\nprofile: root\nissuer:\n  certificate: e.pem\n  key: \"file:e.key\"\ncsr: c.csr\ntrust-domains: [a.b]\nvalidity: 1y\noutputs:\n  certificate: c.pem\n",
            "field `profile`",
        ),
        ("- not\n- a mapping\n", "YAML mapping"),
    ];
    for (i, (yaml, want)) in cases.iter().enumerate() {
        let f = write(d, &format!("c{i}.yaml"), yaml);
        for verb in ["check", "run"] {
            let err = fails(&["ceremony", verb, s(&f)]);
            assert!(err.contains(want), "case {i} ({verb}): want {want:?} in {err}");
            assert!(err.contains(&format!("c{i}.yaml")), "names the file: {err}");
        }
    }
    assert!(!d.join("k.pem").exists() && !d.join("ceremony-transcript.jsonl").exists());
}

#[test]
fn outputs_are_never_overwritten_and_failures_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let f = write(
        d,
        "key.yaml",
        "ceremony-type: key\nkey: \"file:k.pem\"\nalgorithm: ecdsa-p256\noutputs:\n  public-key: k.pub.pem\n",
    );
    ok(&["ceremony", "run", s(&f)]);
    let before = std::fs::read(d.join("k.pub.pem")).unwrap();
    let err = fails(&["ceremony", "run", s(&f)]);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(d.join("k.pub.pem")).unwrap(), before);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(d.join("ceremony-transcript.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["result"], "ok");
    assert!(lines[1]["result"].as_str().unwrap().starts_with("error: "), "{}", lines[1]);
    assert_eq!(lines[1]["outputs"].as_array().unwrap().len(), 0);
}

#[test]
fn quickstart_builds_a_bundle_istiod_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let qs = dir.path().join("qs");
    let out = ok(&["quickstart", "--dir", s(&qs)]);
    assert!(out.contains("SoftHSM2 token"), "{out}");
    let bundle = qs.join("clusters/dev-1/cacerts");
    let o = openssl(&[
        "verify",
        "-CAfile",
        s(&bundle.join("root-cert.pem")),
        "-untrusted",
        s(&bundle.join("cert-chain.pem")),
        s(&bundle.join("ca-cert.pem")),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Root and environment keys live in the token; the quickstart's ceremonies are on disk.
    let info: serde_json::Value = serde_json::from_str(&ok(&[
        "--output",
        "json",
        "quickstart",
        "--dir",
        s(&dir.path().join("qs2")),
        "--environment",
        "staging",
    ]))
    .unwrap();
    assert!(info["root_key"].as_str().unwrap().starts_with("pkcs11:"));
    assert_eq!(std::fs::read_dir(qs.join("ceremonies")).unwrap().count(), 8);
    assert!(std::fs::read_to_string(qs.join("root/ceremony-transcript.jsonl")).unwrap().lines().count() == 2);
    // A non-empty directory is refused.
    let err = fails(&["quickstart", "--dir", s(&qs)]);
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn quickstart_without_softhsm_warns_and_uses_file_keys() {
    let dir = tempfile::tempdir().unwrap();
    let qs = dir.path().join("qs");
    let out = ca_cli().args(["quickstart", "--file-keys", "--dir", s(&qs)]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("WARNING") && stderr.contains("PLAIN FILES"), "{stderr}");
    assert!(qs.join("keys/root.key").is_file());
    let bundle = qs.join("clusters/dev-1/cacerts");
    let o = openssl(&[
        "verify",
        "-CAfile",
        s(&bundle.join("root-cert.pem")),
        "-untrusted",
        s(&bundle.join("cert-chain.pem")),
        s(&bundle.join("ca-cert.pem")),
    ]);
    assert!(o.status.success());
}

#[test]
fn cross_sign_keeps_name_constraints() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let f = |n: &str| format!("file:{}", d.join(n).display());
    for (key, subject, out) in [("old.key", "CN=Old Root", "old.pem"), ("new.key", "CN=New Root", "new.pem")] {
        ok(&["key", "generate", "--key", &f(key), "--algorithm", "ecdsa-p256"]);
        ok(&["root", "create", "--key", &f(key), "--subject", subject, "--validity", "2y", "--out", s(&d.join(out))]);
    }
    ok(&["key", "generate", "--key", &f("env.key"), "--algorithm", "ecdsa-p256"]);
    ok(&["csr", "create", "--key", &f("env.key"), "--subject", "CN=env", "--out", s(&d.join("env.csr"))]);
    ok(&[
        "sign",
        "--profile",
        "environment",
        "--ca-cert",
        s(&d.join("old.pem")),
        "--ca-key",
        &f("old.key"),
        "--csr",
        s(&d.join("env.csr")),
        "--trust-domain",
        "prod.example.com",
        "--validity",
        "1y",
        "--name-constraints",
        "--out",
        s(&d.join("env.pem")),
    ]);
    let yaml = format!(
        "ceremony-type: cross-sign\nissuer:\n  certificate: new.pem\n  key: \"{}\"\ncertificate: env.pem\nvalidity: 1y\noutputs:\n  certificate: env-cross.pem\n",
        f("new.key")
    );
    let file = d.join("cross.yaml");
    std::fs::write(&file, yaml).unwrap();
    ok(&["ceremony", "run", s(&file)]);
    let text =
        String::from_utf8(openssl(&["x509", "-in", s(&d.join("env-cross.pem")), "-noout", "-text"]).stdout).unwrap();
    assert!(text.contains("X509v3 Name Constraints: critical") && text.contains("URI:prod.example.com"), "{text}");
    assert!(text.contains("Issuer: CN = New Root"), "{text}");
}
