//! Architecture invariants that the type system alone does not hold.

use std::path::{Path, PathBuf};

fn rust_sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if p.is_dir() {
            // Tests and benchmarks may sign whatever they like.
            if !matches!(name.as_str(), "target" | "tests" | "examples" | ".git") {
                rust_sources(&p, out);
            }
        } else if name.ends_with(".rs") {
            out.push(p);
        }
    }
}

/// `KeySigner::sign_bytes` signs arbitrary bytes with a real key. Certificates and CRLs must go
/// through `ca_core::issue::sign_linted`, so raw signing is allowed only where what is signed
/// is not a certificate: the guard itself, CSR self-signatures, audit checkpoints, and hsm's
/// own key self-test.
#[test]
fn raw_signing_happens_only_where_allowed() {
    const ALLOWED: &[&str] =
        &["hsm/src/", "ca-core/src/issue.rs", "ca-core/src/csr.rs", "ca-server/src/service/checkpoint.rs"];
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut files = Vec::new();
    rust_sources(root, &mut files);
    let mut offenders = Vec::new();
    for f in files {
        let rel = f.strip_prefix(root).unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(&f).unwrap();
        if text.contains("sign_bytes(") && !ALLOWED.iter().any(|a| rel.starts_with(a)) {
            offenders.push(rel);
        }
    }
    assert!(offenders.is_empty(), "raw signing outside the allowed places: {offenders:?}");
}

/// Only hsm may use unsafe code.
#[test]
fn unsafe_code_is_forbidden_outside_hsm() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let members = manifest.lines().find(|l| l.trim_start().starts_with("members")).unwrap().to_string();
    for (member, krate) in [
        ("ca-core", "ca-core/src/lib.rs"),
        ("ca-cli", "ca-cli/src/main.rs"),
        ("ca-server", "ca-server/src/main.rs"),
        ("ca-server", "ca-server/src/lib.rs"),
    ] {
        if members.contains(&format!("\"{member}\"")) {
            let text = std::fs::read_to_string(root.join(krate)).unwrap();
            assert!(text.contains("#![forbid(unsafe_code)]"), "{krate} must forbid unsafe code");
        }
    }
}
