//! Ceremony files: `ca_core::ceremony::parse` (what `load` does after reading the file) and
//! `Ceremony::check` (every field, input and policy check that needs no HSM). The files the
//! seed ceremonies name (issuer certificates, CSRs) exist in a scratch directory beside the
//! fuzzed file, so `check` gets as far as issuer policy; outputs are only checked, never
//! written.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

const FIXTURES: &[(&str, &str)] = &[
    ("root-2026.pem", include_str!("../fixtures/ceremony/root-2026.pem")),
    ("root-2031.pem", include_str!("../fixtures/ceremony/root-2031.pem")),
    ("prod-env-2026.pem", include_str!("../fixtures/ceremony/prod-env-2026.pem")),
    ("prod-env-2026.csr", include_str!("../fixtures/ceremony/prod-env-2026.csr")),
    ("prod-eu1-2026.csr", include_str!("../fixtures/ceremony/prod-eu1-2026.csr")),
];

fn file() -> &'static PathBuf {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in FIXTURES {
            std::fs::write(dir.path().join(name), text).expect("fixture");
        }
        let file = dir.path().join("ceremony.yaml");
        (dir, file)
    })
    .1
}

fuzz_target!(|data: &[u8]| {
    let Ok(c) = ca_core::ceremony::parse(file(), data) else { return };
    let _ = c.check();
});
