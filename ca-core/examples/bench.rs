//! Issuance benchmark. Run with:
//!
//!     cargo run --release -p ca-core --example bench
//!
//! Prints, for this machine: the raw ECDSA P-256 signing rate in software (aws-lc-rs) and in
//! SoftHSM2 (one session), then the rate of full issuance (policy, lint with a throwaway key,
//! real signature, verification) for workload leaves under a file-key cluster CA and for
//! cluster intermediates under a SoftHSM2 environment CA, on one thread and on every core.
//! Each measurement runs for a fixed time and stops by itself. With `BENCH_FIXED_ISSUES=N`
//! it runs only N workload issuances (for callgrind).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ca_core::issue::{CaIssuer, create_root, default_not_before, issue};
use ca_core::profile::{CertRequest, ProfileKind};
use secrecy::SecretString;

const RUN: Duration = Duration::from_secs(3);

fn rate(threads: usize, f: impl Fn() + Send + Sync + 'static) -> f64 {
    let f = Arc::new(f);
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let f = f.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while start.elapsed() < RUN {
                    f();
                    n += 1;
                }
                n
            })
        })
        .collect();
    let total: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    total as f64 / start.elapsed().as_secs_f64()
}

fn req(profile: ProfileKind, key: &hsm::PublicKey, days: i64) -> CertRequest {
    let nb = default_not_before();
    let mut subject = rcgen::DistinguishedName::new();
    subject.push(rcgen::DnType::CommonName, format!("bench {profile}"));
    CertRequest {
        profile,
        subject,
        subject_key: key.clone(),
        not_before: nb,
        not_after: nb + time::Duration::days(days),
        path_len: (profile == ProfileKind::Root).then_some(2),
        trust_domains: if matches!(profile, ProfileKind::Environment | ProfileKind::Cluster) {
            vec!["prod.example.com".parse().unwrap()]
        } else {
            vec![]
        },
        name_constraints: false,
        crl_urls: vec![],
        ca_issuer_urls: vec![],
        spiffe_id: (profile == ProfileKind::Workload)
            .then(|| "spiffe://prod.example.com/ns/default/sa/web".parse().unwrap()),
        server_names: vec![],
        subject_key_id: None,
        exact_subject: None,
    }
}

fn main() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let dir = tempfile::tempdir().unwrap();
    let module = hsm::softhsm::find_module().expect("install softhsm2 (scripts/test does)");
    let conf = hsm::softhsm::write_config(dir.path()).unwrap();
    hsm::softhsm::use_config(&conf);
    let pin = dir.path().join("pin");
    std::fs::write(&pin, "bench-pin-1").unwrap();
    hsm::softhsm::init_token(&module, "bench", &SecretString::from("bench-so-1"), &SecretString::from("bench-pin-1"))
        .unwrap();
    let p11 = |o: &str| -> hsm::KeyRef {
        format!("pkcs11:token=bench;object={o}?module-path={}&pin-source=file:{}", module.display(), pin.display())
            .parse()
            .unwrap()
    };
    let file = |n: &str| hsm::KeyRef::file(dir.path().join(n));

    // Hierarchy: root and environment in SoftHSM2, cluster as a file key.
    hsm::generate_key(&p11("root"), hsm::KeyAlgorithm::EcdsaP384).unwrap();
    let root_signer = hsm::open_signer(&p11("root")).unwrap();
    let root = create_root(&root_signer, &req(ProfileKind::Root, root_signer.public_key(), 3650)).unwrap();
    let root = CaIssuer::new(root.cert, root_signer).unwrap();
    hsm::generate_key(&p11("env"), hsm::KeyAlgorithm::EcdsaP256).unwrap();
    let env_signer = hsm::open_signer(&p11("env")).unwrap();
    let env = issue(&root, &req(ProfileKind::Environment, env_signer.public_key(), 1825)).unwrap();
    let env = Arc::new(CaIssuer::new(env.cert, env_signer).unwrap());
    hsm::generate_key(&file("cluster.key"), hsm::KeyAlgorithm::EcdsaP256).unwrap();
    let cl_signer = hsm::open_signer(&file("cluster.key")).unwrap();
    let cl = issue(&env, &req(ProfileKind::Cluster, cl_signer.public_key(), 365)).unwrap();
    let cluster = Arc::new(CaIssuer::new(cl.cert, cl_signer).unwrap());
    hsm::generate_key(&file("leaf.key"), hsm::KeyAlgorithm::EcdsaP256).unwrap();
    let leaf_key = hsm::open_signer(&file("leaf.key")).unwrap().public_key().clone();

    // A fixed number of workload issuances on one thread and nothing else, for instruction
    // counts under `valgrind --tool=callgrind`, which do not drift with the machine's load
    // (docs/benchmarks.md); 0 measures the setup alone, to subtract.
    if let Some(n) = std::env::var("BENCH_FIXED_ISSUES").ok().and_then(|v| v.parse::<u32>().ok()) {
        for _ in 0..n {
            drop(issue(&cluster, &req(ProfileKind::Workload, &leaf_key, 1)).unwrap());
        }
        return;
    }

    println!("machine: {cores} cores; each figure is a {}-second run", RUN.as_secs());
    println!("| measurement | threads | per second |");
    println!("| --- | --- | --- |");

    let sw = Arc::new(hsm::open_signer(&file("leaf.key")).unwrap());
    let s = sw.clone();
    println!("| raw ECDSA P-256 sign, software (aws-lc-rs) | 1 | {:.0} |", rate(1, move || drop(s.sign_bytes(b"x"))));
    let s = sw.clone();
    println!(
        "| raw ECDSA P-256 sign, software (aws-lc-rs) | {cores} | {:.0} |",
        rate(cores, move || drop(s.sign_bytes(b"x")))
    );

    let hw = Arc::new(hsm::open_signer(&p11("env")).unwrap());
    let s = hw.clone();
    println!("| raw ECDSA P-256 sign, SoftHSM2 | 1 | {:.0} |", rate(1, move || drop(s.sign_bytes(b"x").unwrap())));
    let s = hw.clone();
    println!(
        "| raw ECDSA P-256 sign, SoftHSM2 (pooled sessions) | {cores} | {:.0} |",
        rate(cores, move || drop(s.sign_bytes(b"x").unwrap()))
    );

    for threads in [1, cores] {
        let (c, k) = (cluster.clone(), leaf_key.clone());
        let r = rate(threads, move || drop(issue(&c, &req(ProfileKind::Workload, &k, 1)).unwrap()));
        println!("| issue workload leaf, file-key cluster CA (lint + sign + verify) | {threads} | {r:.0} |");
    }
    for threads in [1, cores] {
        let (e, k) = (env.clone(), leaf_key.clone());
        let r = rate(threads, move || drop(issue(&e, &req(ProfileKind::Cluster, &k, 30)).unwrap()));
        println!("| issue cluster intermediate, SoftHSM2 environment CA | {threads} | {r:.0} |");
    }
}
