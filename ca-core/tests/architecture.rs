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
        ("ca-store", "ca-store/src/lib.rs"),
        ("ca-cli", "ca-cli/src/main.rs"),
        ("ca-server", "ca-server/src/main.rs"),
        ("ca-server", "ca-server/src/lib.rs"),
        ("ca-agent", "ca-agent/src/main.rs"),
        ("testing/kube-standin", "testing/kube-standin/src/lib.rs"),
    ] {
        if members.contains(&format!("\"{member}\"")) {
            let text = std::fs::read_to_string(root.join(krate)).unwrap();
            assert!(text.contains("#![forbid(unsafe_code)]"), "{krate} must forbid unsafe code");
        }
    }
}

/// The text with `//` comments (docs included) cut off each line, unless the `//` follows a
/// quote (a URL in a string).
fn without_comments(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The module path of a source file under `src` (`service/rotation/gate.rs` →
/// `["service", "rotation", "gate"]`; `lib.rs`, `main.rs` and `mod.rs` name their directory).
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().to_string()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts
}

/// Every module path a file names: `crate::a::b`, `super::c`, `self::d`, and the members of
/// `use crate::{a::x, b}` groups, resolved to absolute paths. Comments are ignored.
fn references(module: &[String], text: &str) -> Vec<Vec<String>> {
    let code = without_comments(text);
    // A file's module path is the same whether it is `x.rs` or `x/mod.rs`; `super` is its
    // parent either way.
    let here: Vec<String> = module.to_vec();
    let parent = |levels: usize| -> Vec<String> { here[..here.len().saturating_sub(levels)].to_vec() };
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while i < bytes.len() {
        if !code.is_char_boundary(i) {
            i += 1;
            continue;
        }
        let rest = &code[i..];
        let start_ok = i == 0 || !ident(bytes[i - 1]) && bytes[i - 1] != b':';
        let (base, skip) = if start_ok && rest.starts_with("crate::") {
            (Vec::new(), "crate::".len())
        } else if start_ok && rest.starts_with("super::") {
            let mut n = 0;
            let mut r = rest;
            while let Some(x) = r.strip_prefix("super::") {
                n += 1;
                r = x;
            }
            (parent(n), rest.len() - r.len())
        } else if start_ok && rest.starts_with("self::") {
            (here.clone(), "self::".len())
        } else {
            i += 1;
            continue;
        };
        i += skip;
        // Either a path `a::b::c` or a group `{a::x, b}` (one level of braces).
        let tail = &code[i..];
        if let Some(group) = tail.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for member in group[..end].split(',') {
                let segs: Vec<String> = member
                    .trim()
                    .split("::")
                    .map(|s| s.trim().to_string())
                    .take_while(|s| !s.is_empty() && s.bytes().all(ident))
                    .collect();
                if !segs.is_empty() {
                    out.push(base.iter().cloned().chain(segs).collect());
                }
            }
            i += end + 1;
        } else {
            let segs: Vec<String> = tail
                .split("::")
                .map(|s| s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>())
                .scan(true, |go, s| {
                    let keep = *go && !s.is_empty();
                    *go = keep;
                    keep.then_some(s)
                })
                .collect();
            i += segs.iter().map(String::len).sum::<usize>();
            if !segs.is_empty() {
                out.push(base.iter().cloned().chain(segs).collect());
            }
        }
    }
    out
}

/// Edges between the children of `package` (a module path, empty for the crate root): child
/// `a` → child `b` when a file inside `a` names something inside `b`.
fn edges(src: &Path, package: &[String]) -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut files = Vec::new();
    rust_sources(src, &mut files);
    let mut graph: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> = Default::default();
    for f in files {
        let module = module_of(src, &f);
        if module.len() <= package.len() || !module.starts_with(package) {
            continue;
        }
        let from = module[package.len()].clone();
        for r in references(&module, &std::fs::read_to_string(&f).unwrap()) {
            if r.len() > package.len() && r.starts_with(package) && r[package.len()] != from {
                graph.entry(from.clone()).or_default().insert(r[package.len()].clone());
            }
        }
    }
    graph
}

/// A cycle in `graph`, if there is one, as the list of its nodes.
fn find_cycle(graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut std::collections::BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|s| s == n) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_string());
        for m in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, graph, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = Default::default();
    graph.keys().find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The packages whose children must not form a cycle: each crate's root, and every directory
/// module below it.
fn packages(src: &Path) -> Vec<Vec<String>> {
    let mut files = Vec::new();
    rust_sources(src, &mut files);
    let mut out: Vec<Vec<String>> = vec![Vec::new()];
    for f in files {
        if f.file_name().is_some_and(|n| n == "mod.rs") {
            out.push(module_of(src, &f));
        }
    }
    out
}

/// Modules form layers: within ca-server, ca-core, ca-store and ca-cli, at every level of nesting, no
/// module reaches (through any chain of `use`s) back into itself.
#[test]
fn modules_form_no_cycle() {
    let mut found = Vec::new();
    for krate in ["ca-server/src", "ca-core/src", "ca-store/src", "ca-cli/src", "ca-agent/src"] {
        let src = workspace().join(krate);
        if !src.exists() {
            continue;
        }
        for package in packages(&src) {
            if let Some(cycle) = find_cycle(&edges(&src, &package)) {
                let prefix = if package.is_empty() { String::new() } else { format!("{}::", package.join("::")) };
                found.push(format!(
                    "{krate}: {}",
                    cycle.iter().map(|c| format!("{prefix}{c}")).collect::<Vec<_>>().join(" → ")
                ));
            }
        }
    }
    assert!(found.is_empty(), "module cycles:\n{}", found.join("\n"));
}

/// The checker itself: a cycle through `super::` and a `use crate::{..}` group is found, and
/// a layered graph is not reported.
#[test]
fn the_cycle_checker_sees_cycles() {
    let a = references(&["service".into(), "a".into()], "use super::b::X;\nuse crate::{http::y, error::E};");
    assert_eq!(a, vec![vec!["service", "b", "X"], vec!["http", "y"], vec!["error", "E"]]);
    let g: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> = [
        ("a".to_string(), ["b".to_string()].into()),
        ("b".to_string(), ["c".to_string()].into()),
        ("c".to_string(), ["a".to_string()].into()),
    ]
    .into();
    assert_eq!(find_cycle(&g), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
    let layered: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        [("a".to_string(), ["b".to_string(), "c".to_string()].into()), ("b".to_string(), ["c".to_string()].into())]
            .into();
    assert_eq!(find_cycle(&layered), None);
}

/// Services are the domain: they never name a protocol module or a protocol crate, so that
/// REST and gRPC (and whatever comes next) call the same code.
#[test]
fn services_import_no_protocol() {
    let src = workspace().join("ca-server/src/service");
    let mut files = Vec::new();
    rust_sources(&src, &mut files);
    let mut offenders = Vec::new();
    for f in files {
        let text = without_comments(&std::fs::read_to_string(&f).unwrap());
        for needle in ["crate::http", "crate::grpc", "axum::", "tonic::", "hyper::", "utoipa::", "crate::proto"] {
            if text.contains(needle) {
                offenders.push(format!("{}: {needle}", f.strip_prefix(workspace()).unwrap().display()));
            }
        }
    }
    assert!(offenders.is_empty(), "protocol names in services: {offenders:?}");
}

/// Private keys are made, read and handed out by `hsm` alone (`hsm::tls` gives rustls a signer,
/// never the key's bytes). Outside `hsm/src/`, non-test code names none of the raw key paths,
/// except where a key leaves custody on purpose, each for the reason given.
#[test]
fn key_material_stays_in_hsm() {
    const RAW_KEY_PATHS: &[&str] = &[
        "KeyPair::generate",
        "generate_for(",
        "generate_rsa_for(",
        "serialize_der()",
        "serialize_pem()",
        "PrivateKeyDer",
        "PrivatePkcs8KeyDer",
        "export_file_key",
    ];
    const ALLOWED: &[(&str, &str)] = &[
        ("ca-core/src/cacerts.rs", "plug-in mode writes istiod's ca-key.pem: istiod signs with it, by design"),
        ("ca-cli/src/handshake.rs", "throwaway workload keys of the simulated mesh, handed to rustls"),
        ("ca-cli/src/simulate.rs", "throwaway workload keys of the simulated mesh, made per run"),
        ("ca-server/src/dev.rs", "the dev setup's token-signing keys, exported for the local OIDC issuer and tokens"),
        (
            "testing/kube-standin/src/tls.rs",
            "test support: the Kubernetes API stand-in's throwaway TLS key, in memory only",
        ),
    ];
    let root = workspace();
    let mut files = Vec::new();
    rust_sources(&root, &mut files);
    let mut hits = std::collections::BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&root).unwrap().to_string_lossy().to_string();
        if rel.starts_with("hsm/src/") {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        // Unit tests may make keys as they like; they sit at the end of a file.
        let code = without_comments(text.split("#[cfg(test)]").next().unwrap_or_default());
        let found: Vec<&str> = RAW_KEY_PATHS.iter().copied().filter(|p| code.contains(p)).collect();
        if !found.is_empty() {
            hits.insert(rel, found);
        }
    }
    let offenders: Vec<String> = hits
        .iter()
        .filter(|(rel, _)| !ALLOWED.iter().any(|(a, _)| a == rel))
        .map(|(rel, found)| format!("{rel}: {found:?}"))
        .collect();
    assert!(offenders.is_empty(), "raw key material outside hsm: {offenders:?}");
    // The scan sees the uses that are allowed, so it would see a new one; an entry that no
    // longer has any is taken out of the list.
    for (allowed, why) in ALLOWED {
        assert!(hits.contains_key(*allowed), "{allowed} ({why}) no longer handles raw keys: drop it from ALLOWED");
    }
}
