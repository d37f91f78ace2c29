//! Key custody against a real SoftHSM2 token. Each test makes its own token in one
//! per-process token directory, so the tests run under `cargo test` threads and nextest alike.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use hsm::{HsmError, KeyAlgorithm, KeyRef};
use secrecy::SecretString;

struct Env {
    _dir: tempfile::TempDir,
    module: PathBuf,
    pin_file: PathBuf,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let module = hsm::softhsm::find_module()
            .expect("SoftHSM2 is not installed: run the test command from README.md (it installs softhsm2)");
        let dir = tempfile::tempdir().unwrap();
        let conf = hsm::softhsm::write_config(dir.path()).unwrap();
        hsm::softhsm::use_config(&conf);
        let pin_file = dir.path().join("pin");
        std::fs::write(&pin_file, "1234\n").unwrap();
        Env { _dir: dir, module, pin_file }
    })
}

fn token(label: &str) -> &'static Env {
    let e = env();
    hsm::softhsm::init_token(&e.module, label, &SecretString::from("so-pin-1"), &SecretString::from("1234")).unwrap();
    e
}

fn key_ref(e: &Env, token: &str, object: &str) -> KeyRef {
    format!(
        "pkcs11:token={token};object={object}?module-path={}&pin-source=file:{}",
        e.module.display(),
        e.pin_file.display()
    )
    .parse()
    .unwrap()
}

#[test]
fn generates_each_algorithm_non_extractable_and_signs() {
    let e = token("algs");
    for alg in KeyAlgorithm::ALL {
        let r = key_ref(e, "algs", alg.as_str());
        let public = hsm::generate_key(&r, alg).unwrap();
        let signer = hsm::open_signer(&r).unwrap();
        assert_eq!(signer.public_key(), &public);
        assert!(signer.is_hardware());
        let sig = signer.sign_bytes(b"tbs bytes").unwrap();
        public.verify(public.signature_oid(), b"tbs bytes", &sig).unwrap();
        let attrs = signer.token_attributes().unwrap();
        assert!(attrs.sensitive, "{alg}: CKA_SENSITIVE must be true");
        assert!(!attrs.extractable, "{alg}: CKA_EXTRACTABLE must be false");
        assert!(attrs.never_extractable && attrs.always_sensitive && attrs.private && attrs.token_object && attrs.sign);
        assert_eq!(attrs.id.len(), 32, "random 16-byte CKA_ID");
    }
}

#[test]
fn refuses_an_existing_label() {
    let e = token("dup");
    let r = key_ref(e, "dup", "k");
    hsm::generate_key(&r, KeyAlgorithm::EcdsaP256).unwrap();
    let err = hsm::generate_key(&r, KeyAlgorithm::EcdsaP256).unwrap_err();
    assert!(matches!(err, HsmError::LabelExists { .. }), "{err}");
}

#[test]
fn wrong_pin_unknown_token_and_missing_key_are_named() {
    let e = token("errs");
    let bad_pin = e._dir.path().join("bad-pin");
    std::fs::write(&bad_pin, "9999").unwrap();
    let r: KeyRef =
        format!("pkcs11:token=errs;object=k?module-path={}&pin-source=file:{}", e.module.display(), bad_pin.display())
            .parse()
            .unwrap();
    let err = hsm::open_signer(&r).unwrap_err();
    assert!(matches!(err, HsmError::WrongPin { .. }), "{err}");
    assert!(!err.to_string().contains("9999"));

    // Once the token is logged in for one reference, another reference with a wrong PIN is
    // still refused (PKCS#11 itself would accept it: login state is per application).
    let good = key_ref(e, "errs", "k");
    hsm::generate_key(&good, KeyAlgorithm::EcdsaP256).unwrap();
    hsm::open_signer(&good).unwrap();
    let err = hsm::open_signer(&r).unwrap_err();
    assert!(matches!(err, HsmError::WrongPin { .. }), "cached login must not bypass the PIN: {err}");

    let err = hsm::open_signer(&key_ref(e, "no-such-token", "k")).unwrap_err();
    assert!(matches!(err, HsmError::TokenNotFound { .. }), "{err}");

    let err = hsm::open_signer(&key_ref(e, "errs", "absent")).unwrap_err();
    assert!(matches!(err, HsmError::KeyNotFound { .. }), "{err}");
    let err = hsm::generate_key(&key_ref(e, "errs", "k"), KeyAlgorithm::EcdsaP256).unwrap_err();
    assert!(matches!(err, HsmError::LabelExists { .. }), "{err}");
}

#[test]
fn concurrent_signing_is_safe() {
    let e = token("conc");
    let r = key_ref(e, "conc", "k");
    let public = hsm::generate_key(&r, KeyAlgorithm::EcdsaP256).unwrap();
    let signer = Arc::new(hsm::open_signer(&r).unwrap());
    // More threads than the session cap: callers wait for a session rather than fail.
    let handles: Vec<_> = (0..24)
        .map(|t| {
            let s = signer.clone();
            let p = public.clone();
            std::thread::spawn(move || {
                for i in 0..50 {
                    let msg = format!("{t}-{i}");
                    let sig = s.sign_bytes(msg.as_bytes()).unwrap();
                    p.verify(p.signature_oid(), msg.as_bytes(), &sig).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn token_rng_gives_fresh_bytes() {
    let e = token("rng");
    let r = key_ref(e, "rng", "k");
    hsm::generate_key(&r, KeyAlgorithm::EcdsaP256).unwrap();
    let s = hsm::open_signer(&r).unwrap();
    let a = s.random(16).unwrap();
    let b = s.random(16).unwrap();
    assert_eq!(a.len(), 16);
    assert_ne!(a, b);
}

#[test]
fn session_stats_report_each_tokens_pool() {
    let e = token("stats");
    let r = key_ref(e, "stats", "k");
    hsm::generate_key(&r, KeyAlgorithm::EcdsaP256).unwrap();
    let signer = Arc::new(hsm::open_signer(&r).unwrap());
    let stats = |label: &str| hsm::session_stats().into_iter().find(|s| s.token == label);
    signer.sign_bytes(b"one").unwrap();
    let one = stats("stats").expect("a logged-in token is reported");
    assert!(one.open >= 1, "{one:?}");
    assert_eq!(one.in_use, 0, "every session went back to the pool: {one:?}");
    // Many callers at once: the pool grows, never past its cap, and every session comes back.
    let handles: Vec<_> = (0..24)
        .map(|t| {
            let s = signer.clone();
            std::thread::spawn(move || {
                for i in 0..20 {
                    s.sign_bytes(format!("{t}-{i}").as_bytes()).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let busy = stats("stats").unwrap();
    assert!(busy.open >= one.open && busy.open <= 16, "{busy:?}");
    assert_eq!(busy.in_use, 0, "{busy:?}");
    assert!(stats("never-logged-in").is_none());
}
