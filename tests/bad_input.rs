//! Every bad input gets one clear error line, a non-zero exit, and no output file.

mod common;
use common::*;

use std::path::Path;

fn assert_absent(p: &Path) {
    assert!(!p.exists(), "{} must not be written", p.display());
}

#[test]
fn broken_csr_signature_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let h = build_hierarchy("badsig", dir.path(), &[]);
    // Flip one bit in the CSR's signature (its last byte).
    let mut der = der_of(&dir.path().join("cluster.csr"));
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let broken = dir.path().join("broken.csr");
    std::fs::write(&broken, pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der))).unwrap();
    let out = dir.path().join("x.pem");
    let err = fails(&[
        "sign",
        "--profile",
        "cluster",
        "--ca-cert",
        s(&h.env),
        "--ca-key",
        &h.env_key,
        "--csr",
        s(&broken),
        "--trust-domain",
        "prod.example.com",
        "--validity",
        "30d",
        "--out",
        s(&out),
    ]);
    assert!(err.contains("CSR signature does not verify"), "{err}");
    assert_absent(&out);

    // Garbage that is not a CSR at all.
    std::fs::write(&broken, "not a csr").unwrap();
    let err = fails(&[
        "sign",
        "--profile",
        "cluster",
        "--ca-cert",
        s(&h.env),
        "--ca-key",
        &h.env_key,
        "--csr",
        s(&broken),
        "--trust-domain",
        "prod.example.com",
        "--validity",
        "30d",
        "--out",
        s(&out),
    ]);
    assert!(err.contains("CSR"), "{err}");
    assert_absent(&out);
}

#[test]
fn weak_keys_in_csrs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let h = build_hierarchy("weak", dir.path(), &[]);
    let out = dir.path().join("x.pem");
    for (name, newkey) in [("rsa1024", "rsa:1024"), ("p521", "ec:-")] {
        let csr = dir.path().join(format!("{name}.csr"));
        let key = dir.path().join(format!("{name}.key"));
        let mut args = vec!["req", "-new", "-nodes", "-subj", "/CN=weak", "-keyout", s(&key), "-out", s(&csr)];
        let params = dir.path().join("p521.params");
        if name == "p521" {
            assert!(openssl(&["ecparam", "-name", "secp521r1", "-out", s(&params)]).status.success());
            args.extend(["-newkey", &*Box::leak(format!("ec:{}", params.display()).into_boxed_str())]);
        } else {
            args.extend(["-newkey", newkey]);
        }
        let o = openssl(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let err = fails(&[
            "sign",
            "--profile",
            "cluster",
            "--ca-cert",
            s(&h.env),
            "--ca-key",
            &h.env_key,
            "--csr",
            s(&csr),
            "--trust-domain",
            "prod.example.com",
            "--validity",
            "30d",
            "--out",
            s(&out),
        ]);
        assert!(err.contains("CSR key rejected"), "{name}: {err}");
        assert_absent(&out);
    }
}

#[test]
fn a_child_may_not_outlive_its_parent() {
    token("outlive");
    let dir = tempfile::tempdir().unwrap();
    let p = |f: &str| dir.path().join(f);
    let root_key = p11("outlive", "root");
    ok(&["key", "generate", "--key", &root_key, "--algorithm", "ecdsa-p256"]);
    let root_json: serde_json::Value = serde_json::from_str(&ok(&[
        "--output",
        "json",
        "root",
        "create",
        "--key",
        &root_key,
        "--subject",
        "CN=Short Root",
        "--validity",
        "1y",
        "--out",
        s(&p("root.pem")),
    ]))
    .unwrap();
    let root_not_after = root_json["not_after"].as_str().unwrap().to_string();
    let env_key = format!("file:{}", p("env.key").display());
    ok(&["key", "generate", "--key", &env_key, "--algorithm", "ecdsa-p256"]);
    ok(&["csr", "create", "--key", &env_key, "--subject", "CN=env", "--out", s(&p("env.csr"))]);
    let err = fails(&[
        "sign",
        "--profile",
        "environment",
        "--ca-cert",
        s(&p("root.pem")),
        "--ca-key",
        &root_key,
        "--csr",
        s(&p("env.csr")),
        "--trust-domain",
        "prod.example.com",
        "--validity",
        "2y",
        "--out",
        s(&p("env.pem")),
    ]);
    assert!(err.contains("past the issuer's notAfter"), "{err}");
    assert!(err.contains(&root_not_after), "names the issuer's date {root_not_after}: {err}");
    assert!(err.matches("T").count() >= 2, "names both dates: {err}");
    assert_absent(&p("env.pem"));
}

#[test]
fn existing_output_files_are_never_overwritten() {
    token("exists");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("root.pem");
    std::fs::write(&out, "precious").unwrap();
    let key = p11("exists", "root");
    ok(&["key", "generate", "--key", &key, "--algorithm", "ecdsa-p256"]);
    let err = fails(&["root", "create", "--key", &key, "--subject", "CN=R", "--validity", "1y", "--out", s(&out)]);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "precious");

    // A file key is never replaced either.
    let file_key = dir.path().join("k.pem");
    std::fs::write(&file_key, "precious").unwrap();
    let err =
        fails(&["key", "generate", "--key", &format!("file:{}", file_key.display()), "--algorithm", "ecdsa-p256"]);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read_to_string(&file_key).unwrap(), "precious");

    // --public-out that exists: refused before any key is made.
    let pub_out = dir.path().join("pub.pem");
    std::fs::write(&pub_out, "precious").unwrap();
    let err = fails(&[
        "key",
        "generate",
        "--key",
        &p11("exists", "second"),
        "--algorithm",
        "ecdsa-p256",
        "--public-out",
        s(&pub_out),
    ]);
    assert!(err.contains("already exists"), "{err}");
    let err = fails(&["key", "info", "--key", &p11("exists", "second")]);
    assert!(err.contains("no private key labelled"), "no key was generated: {err}");
}

#[test]
fn an_existing_hsm_label_is_refused() {
    token("label");
    let key = p11("label", "root");
    ok(&["key", "generate", "--key", &key, "--algorithm", "ecdsa-p256"]);
    let err = fails(&["key", "generate", "--key", &key, "--algorithm", "ecdsa-p384"]);
    assert!(err.contains("already exists in token \"label\""), "{err}");
}

#[test]
fn wrong_pin_is_named_without_the_pin() {
    token("pin");
    let key = p11("pin", "root");
    ok(&["key", "generate", "--key", &key, "--algorithm", "ecdsa-p256"]);
    let err = fails_with(ca_cli().env(PIN_VAR, "0000-wrong").args(["key", "info", "--key", &key]));
    assert!(err.contains("wrong PIN for token \"pin\""), "{err}");
    assert!(!err.contains("0000-wrong"));
    // A PIN in the reference itself is refused: it would end up in argv and shell history.
    let err = fails(&["key", "info", "--key", "pkcs11:token=pin;object=root?pin-value=1234"]);
    assert!(err.contains("pin-value is refused"), "{err}");
    // Unset PIN variable.
    let err = fails_with(ca_cli().env_remove(PIN_VAR).args(["key", "info", "--key", &key]));
    assert!(err.contains("TEST_TOKEN_PIN is not set"), "{err}");
}

#[test]
fn missing_module_token_and_key_are_named() {
    token("names");
    let err = fails(&[
        "key",
        "info",
        "--key",
        &format!("pkcs11:token=names;object=k?module-path=/nonexistent/libp11.so&pin-source=env:{PIN_VAR}"),
    ]);
    assert!(err.contains("PKCS#11 module not found at /nonexistent/libp11.so"), "{err}");
    let err = fails(&["key", "info", "--key", &format!("pkcs11:token=names;object=k?pin-source=env:{PIN_VAR}")]);
    assert!(err.contains("PKCS11_MODULE"), "{err}");
    let err = fails(&["key", "info", "--key", &p11("no-such-token", "k")]);
    assert!(err.contains("no token labelled \"no-such-token\""), "{err}");
    let err = fails(&["key", "info", "--key", &p11("names", "absent")]);
    assert!(err.contains("no private key labelled \"absent\""), "{err}");
}

#[test]
fn malformed_arguments_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.pem");
    let key = format!("file:{}", dir.path().join("k.pem").display());
    ok(&["key", "generate", "--key", &key, "--algorithm", "ecdsa-p256"]);
    for (args, want) in [
        (
            vec!["root", "create", "--key", &key, "--subject", "O=No CN", "--validity", "1y", "--out", s(&out)],
            "needs a CN",
        ),
        (
            vec!["root", "create", "--key", &key, "--subject", "CN=x", "--validity", "1x", "--out", s(&out)],
            "invalid duration",
        ),
        (vec!["key", "generate", "--key", "file:/tmp/never.pem", "--algorithm", "ecdsa-p521"], "unknown algorithm"),
        (vec!["key", "info", "--key", "/plain/path"], "invalid key reference"),
    ] {
        let o = run(&args);
        assert!(!o.status.success());
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert_absent(&out);
    }
}

#[test]
fn verify_rejects_a_chain_that_does_not_reach_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let h = build_hierarchy("verify", dir.path(), &[]);
    let err = fails(&["verify", "--root", s(&h.root), s(&h.cluster)]);
    assert!(err.contains("no trusted issuer"), "{err}");
    // A root is not its own issuer's substitute: the environment as the trust anchor is fine,
    // but the cluster is not a root for the environment.
    let err = fails(&["verify", "--root", s(&h.cluster), s(&h.env)]);
    assert!(err.contains("no trusted issuer"), "{err}");
}

/// `ca-cli database migrate` (the Helm chart's migration Job): creates the schema, is
/// idempotent, and a URL that does not connect fails in one line without its password.
#[test]
fn database_migrate_applies_the_schema_and_keeps_the_password_out_of_errors() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ca.db");
    let url = format!("sqlite://{}", db.display());
    for _ in 0..2 {
        let out = ca_cli().args(["database", "migrate"]).env("CA_DATABASE_URL", &url).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("migrations applied"));
    }
    // audit verify opens the database without migrating it: it finds the audit tables.
    let out = run(&["audit", "verify", "--database", &url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let err = fails_with(
        ca_cli().args(["database", "migrate"]).env("CA_DATABASE_URL", "postgres://owner:s3cret-pw@127.0.0.1:1/pki"),
    );
    assert!(err.contains("migrating postgres://owner:"), "{err}");
    assert!(!err.contains("s3cret-pw"), "the password leaked: {err}");
}
