//! Root (P-384, in the token) -> environment (in the token) -> cluster (file key) -> workload,
//! checked by openssl, rustls-webpki and our own verifier.

mod common;
use common::*;

use rustls_pki_types::{CertificateDer, UnixTime};

fn webpki_verify(root: &[u8], intermediates: &[Vec<u8>], leaf: &[u8]) -> Result<(), webpki::Error> {
    let root = CertificateDer::from(root.to_vec());
    let anchors = [webpki::anchor_from_trusted_cert(&root)?];
    let inter: Vec<CertificateDer> = intermediates.iter().map(|d| CertificateDer::from(d.clone())).collect();
    let leaf = CertificateDer::from(leaf.to_vec());
    let ee = webpki::EndEntityCert::try_from(&leaf)?;
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &inter,
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map(|_| ())
}

#[test]
fn hierarchy_verifies_with_openssl_webpki_and_ca_cli() {
    let dir = tempfile::tempdir().unwrap();
    let h = build_hierarchy("hier", dir.path(), &[]);
    let leaf = workload(&h, "web", "spiffe://prod.example.com/ns/default/sa/web");

    // openssl, as Envoy's BoringSSL and istiod's Go would.
    let chain = dir.path().join("untrusted.pem");
    std::fs::write(&chain, [std::fs::read(&h.env).unwrap(), std::fs::read(&h.cluster).unwrap()].concat()).unwrap();
    let out = openssl(&["verify", "-CAfile", s(&h.root), "-untrusted", s(&chain), s(&leaf)]);
    assert!(out.status.success(), "openssl verify: {}", String::from_utf8_lossy(&out.stderr));

    // rustls-webpki.
    webpki_verify(&der_of(&h.root), &[der_of(&h.env), der_of(&h.cluster)], &der_of(&leaf))
        .expect("webpki accepts the chain");

    // Our own verifier, text and JSON.
    let text = ok(&["verify", "--root", s(&h.root), "--chain", s(&h.env), "--chain", s(&h.cluster), s(&leaf)]);
    assert!(text.contains("OK"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&ok(&[
        "--output",
        "json",
        "verify",
        "--root",
        s(&h.root),
        "--chain",
        s(&h.env),
        "--chain",
        s(&h.cluster),
        s(&leaf),
    ]))
    .unwrap();
    assert_eq!(json["path"].as_array().unwrap().len(), 4);

    // Profiles: what each tier carries.
    let text = String::from_utf8(openssl(&["x509", "-in", s(&h.env), "-noout", "-text"]).stdout).unwrap();
    assert!(text.contains("CA:TRUE, pathlen:1"), "{text}");
    assert!(text.contains("Certificate Sign, CRL Sign"));
    assert!(text.contains("URI:spiffe://prod.example.com"));
    assert!(!text.contains("Extended Key Usage"));
    assert!(text.contains("X509v3 Authority Key Identifier"));
    let text = String::from_utf8(openssl(&["x509", "-in", s(&h.cluster), "-noout", "-text"]).stdout).unwrap();
    assert!(text.contains("CA:TRUE, pathlen:0"), "{text}");
    let text = String::from_utf8(openssl(&["x509", "-in", s(&h.root), "-noout", "-text"]).stdout).unwrap();
    assert!(text.contains("CA:TRUE, pathlen:2"), "{text}");
    assert!(text.contains("ecdsa-with-SHA384"));
    assert!(!text.contains("Authority Key Identifier"));
    let text = String::from_utf8(openssl(&["x509", "-in", s(&leaf), "-noout", "-text"]).stdout).unwrap();
    assert!(text.contains("TLS Web Server Authentication, TLS Web Client Authentication"), "{text}");
    assert!(text.contains("Digital Signature, Key Encipherment"));
    assert!(text.contains("URI:spiffe://prod.example.com/ns/default/sa/web"));
}

#[test]
fn token_keys_are_sensitive_and_not_extractable() {
    token("custody");
    for (object, alg) in [("p384", "ecdsa-p384"), ("p256", "ecdsa-p256"), ("rsa3072", "rsa-3072")] {
        let key = p11("custody", object);
        ok(&["key", "generate", "--key", &key, "--algorithm", alg]);
        let info: serde_json::Value =
            serde_json::from_str(&ok(&["--output", "json", "key", "info", "--key", &key])).unwrap();
        assert_eq!(info["hardware"], true);
        assert_eq!(info["pkcs11"]["sensitive"], true, "{object}");
        assert_eq!(info["pkcs11"]["extractable"], false, "{object}");
        assert_eq!(info["pkcs11"]["never_extractable"], true, "{object}");
        assert_eq!(info["algorithm"], alg);
    }
    // And as an independent tool reads them (OpenSC's pkcs11-tool; the PIN from the environment).
    let out = std::process::Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", &hsm().conf)
        .env(PIN_VAR, PIN)
        .args(["--module", s(&hsm().module), "--token-label", "custody", "--login", "--pin", &format!("env:{PIN_VAR}")])
        .args(["--list-objects", "--type", "privkey"])
        .output()
        .expect("pkcs11-tool (opensc) is installed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.matches("Private Key Object").count(), 3, "{text}");
    assert_eq!(text.matches("Access:     sensitive, always sensitive, never extractable, local").count(), 3, "{text}");
    assert_eq!(text.matches("Usage:      sign\n").count(), 3, "signing keys only: {text}");
}

#[test]
fn rsa_root_in_token_signs_a_verifiable_environment() {
    token("rsa");
    let dir = tempfile::tempdir().unwrap();
    let p = |f: &str| dir.path().join(f);
    let root_key = p11("rsa", "root");
    ok(&["key", "generate", "--key", &root_key, "--algorithm", "rsa-3072"]);
    ok(&[
        "root",
        "create",
        "--key",
        &root_key,
        "--subject",
        "CN=RSA Root,O=Example",
        "--validity",
        "2y",
        "--out",
        s(&p("root.pem")),
    ]);
    let env_key = format!("file:{}", p("env.key").display());
    ok(&["key", "generate", "--key", &env_key, "--algorithm", "ecdsa-p256"]);
    ok(&["csr", "create", "--key", &env_key, "--subject", "CN=env,O=Example", "--out", s(&p("env.csr"))]);
    ok(&[
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
        "rsa.example.com",
        "--validity",
        "1y",
        "--out",
        s(&p("env.pem")),
    ]);
    let out = openssl(&["verify", "-CAfile", s(&p("root.pem")), s(&p("env.pem"))]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(openssl(&["x509", "-in", s(&p("env.pem")), "-noout", "-text"]).stdout).unwrap();
    assert!(text.contains("sha256WithRSAEncryption"), "{text}");
}

#[test]
fn name_constraints_confine_leaves_to_the_trust_domain() {
    let dir = tempfile::tempdir().unwrap();
    let h = build_hierarchy("nc", dir.path(), &["--name-constraints"]);
    let text = String::from_utf8(openssl(&["x509", "-in", s(&h.env), "-noout", "-text"]).stdout).unwrap();
    assert!(text.contains("X509v3 Name Constraints: critical"), "{text}");
    assert!(text.contains("URI:prod.example.com"), "{text}");

    let chain = dir.path().join("untrusted.pem");
    std::fs::write(&chain, [std::fs::read(&h.env).unwrap(), std::fs::read(&h.cluster).unwrap()].concat()).unwrap();
    let good = workload(&h, "good", "spiffe://prod.example.com/ns/default/sa/web");
    let out = openssl(&["verify", "-CAfile", s(&h.root), "-untrusted", s(&chain), s(&good)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Policy refuses a workload outside the cluster's trust domain ...
    let refused = dir.path().join("refused.pem");
    let cluster_key = format!("file:{}", h.cluster_key.display());
    let good_csr = dir.path().join("good.csr");
    let err = fails(&[
        "sign",
        "--profile",
        "workload",
        "--ca-cert",
        s(&h.cluster),
        "--ca-key",
        &cluster_key,
        "--csr",
        s(&good_csr),
        "--spiffe-id",
        "spiffe://staging.example.com/ns/default/sa/web",
        "--validity",
        "1h",
        "--out",
        s(&refused),
    ]);
    assert!(err.contains("not served by the issuer"), "{err}");
    assert!(!refused.exists());
    // ... but the cluster key is a plain file that istiod holds: whoever has it can sign any
    // name with openssl. The constraint in the environment certificate is what stops that leaf.
    let evil = dir.path().join("evil.pem");
    let ext = dir.path().join("evil.ext");
    std::fs::write(&ext, "basicConstraints=critical,CA:FALSE\nsubjectAltName=critical,URI:spiffe://staging.example.com/ns/default/sa/web\n").unwrap();
    let o = openssl(&[
        "x509",
        "-req",
        "-in",
        s(&good_csr),
        "-CA",
        s(&h.cluster),
        "-CAkey",
        s(&h.cluster_key),
        "-extfile",
        s(&ext),
        "-days",
        "1",
        "-out",
        s(&evil),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = openssl(&["verify", "-CAfile", s(&h.root), "-untrusted", s(&chain), s(&evil)]);
    assert!(!out.status.success(), "openssl must reject a leaf outside the permitted trust domain");
    let err = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permitted subtree violation"), "{err}");
    let err = fails(&["verify", "--root", s(&h.root), "--chain", s(&h.env), "--chain", s(&h.cluster), s(&evil)]);
    assert!(err.contains("name constraints"), "{err}");

    // The compatibility table in docs/name-constraints.md: rustls-webpki refuses URI constraints.
    let r = webpki_verify(&der_of(&h.root), &[der_of(&h.env), der_of(&h.cluster)], &der_of(&good));
    assert!(r.is_err(), "rustls-webpki is documented to reject URI name constraints");

    // Policy refuses to issue a cluster CA for a trust domain the environment may not serve.
    let csr = dir.path().join("cluster.csr");
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
        "staging.example.com",
        "--validity",
        "30d",
        "--out",
        s(&dir.path().join("x.pem")),
    ]);
    assert!(err.contains("not served by the issuer"), "{err}");
    assert!(!dir.path().join("x.pem").exists());
}

#[test]
fn istio_cacerts_bundle_passes_istiod_checks() {
    let dir = tempfile::tempdir().unwrap();
    let h = build_hierarchy("istio", dir.path(), &[]);
    let out_dir = dir.path().join("cacerts");
    ok(&[
        "istio",
        "cacerts",
        "--cert",
        s(&h.cluster),
        "--key",
        &format!("file:{}", h.cluster_key.display()),
        "--chain",
        s(&h.env),
        "--root",
        s(&h.root),
        "--out-dir",
        s(&out_dir),
    ]);
    use std::os::unix::fs::PermissionsExt;
    for f in ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem", "cacerts.yaml"] {
        assert!(out_dir.join(f).is_file(), "{f}");
    }
    let mode = std::fs::metadata(out_dir.join("ca-key.pem")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // cert-chain.pem: cluster, environment, root, in that order.
    let chain = ders_of(&out_dir.join("cert-chain.pem"));
    assert_eq!(chain, vec![der_of(&h.cluster), der_of(&h.env), der_of(&h.root)]);
    assert_eq!(der_of(&out_dir.join("root-cert.pem")), der_of(&h.root));
    assert_eq!(std::fs::read(out_dir.join("ca-key.pem")).unwrap(), std::fs::read(&h.cluster_key).unwrap());
    // What istiod does with Go's x509.Verify, openssl does here.
    let out = openssl(&[
        "verify",
        "-CAfile",
        s(&out_dir.join("root-cert.pem")),
        "-untrusted",
        s(&out_dir.join("cert-chain.pem")),
        s(&out_dir.join("ca-cert.pem")),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let yaml = std::fs::read_to_string(out_dir.join("cacerts.yaml")).unwrap();
    assert!(
        yaml.contains("kind: Secret") && yaml.contains("name: cacerts") && yaml.contains("namespace: istio-system"),
        "{yaml}"
    );
    use base64::Engine;
    let line = yaml.lines().find(|l| l.trim_start().starts_with("cert-chain.pem:")).unwrap();
    let decoded = base64::engine::general_purpose::STANDARD.decode(line.split(':').nth(1).unwrap().trim()).unwrap();
    assert_eq!(decoded, std::fs::read(out_dir.join("cert-chain.pem")).unwrap());

    // A second run refuses to overwrite the bundle.
    let err = fails(&[
        "istio",
        "cacerts",
        "--cert",
        s(&h.cluster),
        "--key",
        &format!("file:{}", h.cluster_key.display()),
        "--chain",
        s(&h.env),
        "--root",
        s(&h.root),
        "--out-dir",
        s(&out_dir),
    ]);
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn istio_cacerts_refuses_what_istiod_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let h = build_hierarchy("istio-bad", dir.path(), &[]);
    let other_key = dir.path().join("other.key");
    ok(&["key", "generate", "--key", &format!("file:{}", other_key.display()), "--algorithm", "ecdsa-p256"]);
    let leaf = workload(&h, "leaf", "spiffe://prod.example.com/ns/a/sa/b");
    let leaf_key = format!("file:{}", dir.path().join("leaf.key").display());
    let out_dir = dir.path().join("out");
    let cases: Vec<(Vec<String>, &str)> = vec![
        // Key does not match the certificate.
        (
            vec![
                "--cert".into(),
                s(&h.cluster).into(),
                "--key".into(),
                format!("file:{}", other_key.display()),
                "--chain".into(),
                s(&h.env).into(),
                "--root".into(),
                s(&h.root).into(),
            ],
            "does not match",
        ),
        // Chain does not reach the root (environment missing).
        (
            vec![
                "--cert".into(),
                s(&h.cluster).into(),
                "--key".into(),
                format!("file:{}", h.cluster_key.display()),
                "--root".into(),
                s(&h.root).into(),
            ],
            "no trusted issuer",
        ),
        // Not a CA.
        (
            vec![
                "--cert".into(),
                s(&leaf).into(),
                "--key".into(),
                leaf_key.clone(),
                "--chain".into(),
                s(&h.cluster).into(),
                "--chain".into(),
                s(&h.env).into(),
                "--root".into(),
                s(&h.root).into(),
            ],
            "CA certificate",
        ),
        // A token key cannot be handed to istiod.
        (
            vec![
                "--cert".into(),
                s(&h.env).into(),
                "--key".into(),
                h.env_key.clone(),
                "--root".into(),
                s(&h.root).into(),
            ],
            "cannot be exported",
        ),
        // A file that is missing.
        (
            vec![
                "--cert".into(),
                s(&dir.path().join("absent.pem")).into(),
                "--key".into(),
                leaf_key,
                "--root".into(),
                s(&h.root).into(),
            ],
            "absent.pem",
        ),
    ];
    for (args, want) in cases {
        let mut full: Vec<&str> = vec!["istio", "cacerts"];
        full.extend(args.iter().map(String::as_str));
        full.extend(["--out-dir", s(&out_dir)]);
        let err = fails(&full);
        assert!(err.contains(want), "want {want:?} in {err}");
        assert!(!out_dir.join("ca-cert.pem").exists(), "nothing written on failure");
    }
}

#[test]
fn crl_is_signed_by_the_ca_and_lists_the_serial() {
    let dir = tempfile::tempdir().unwrap();
    let h = build_hierarchy("crl", dir.path(), &[]);
    let info: serde_json::Value = serde_json::from_str(&ok(&[
        "--output",
        "json",
        "verify",
        "--root",
        s(&h.root),
        "--chain",
        s(&h.env),
        s(&h.cluster),
    ]))
    .unwrap();
    let serial = info["path"][0]["serial"].as_str().unwrap().to_string();
    let crl = dir.path().join("env.crl");
    ok(&[
        "crl",
        "create",
        "--ca-cert",
        s(&h.env),
        "--ca-key",
        &h.env_key,
        "--revoke",
        &format!("{serial}:key-compromise"),
        "--next-update",
        "30d",
        "--crl-number",
        "7",
        "--out",
        s(&crl),
    ]);
    let out = openssl(&["crl", "-in", s(&crl), "-CAfile", s(&h.env), "-noout", "-verify", "-text"]);
    let all = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && all.contains("verify OK"), "{all}");
    assert!(all.to_uppercase().contains(&serial.to_uppercase()), "{all}");
    assert!(all.contains("Key Compromise"), "{all}");
    let number = all.lines().skip_while(|l| !l.contains("X509v3 CRL Number")).nth(1).map(str::trim);
    assert_eq!(number, Some("7"), "{all}");
}
