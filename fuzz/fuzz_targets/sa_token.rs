//! Istio service-account tokens (`ca_server::auth::service_account::TokenValidator::verify`): JWT header and
//! algorithm, key lookup by `kid` (with the refresh an unknown `kid` triggers), signature,
//! `iss`/`aud`/`exp`/`nbf`, and the service-account claims. The seeds are real tokens signed
//! by the keys in fixtures/jwks.json, so mutations of their claims reach the claim checks
//! whenever the signature still holds (the fuzzer cannot re-sign; the seeds cover the claim
//! shapes that matter).
#![no_main]

use std::sync::OnceLock;

use ca_server::auth::service_account::TokenValidator;
use ca_server::config::IstioSettings;
use libfuzzer_sys::fuzz_target;

const JWKS: &str = include_str!("../fixtures/jwks.json");

struct World {
    rt: tokio::runtime::Runtime,
    validator: TokenValidator,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        // Through the settings' deserialiser, so that defaults (audiences, leeway) are the
        // server's own.
        let jwks: serde_json::Value = serde_json::from_str(JWKS).expect("fixture JWKS");
        let cfg: IstioSettings = serde_json::from_value(
            serde_json::json!({"sa_issuer": "https://kubernetes.default.svc.cluster.local", "jwks": jwks}),
        )
        .expect("cluster settings");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let validator = rt.block_on(TokenValidator::load("fuzz", cfg)).expect("JWKS loads");
        World { rt, validator }
    })
}

fn k8s_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else { return };
    let w = world();
    if let Ok(caller) = w.rt.block_on(w.validator.verify(token)) {
        // A caller's names become a SPIFFE path: nothing else may come through.
        assert!(k8s_name(&caller.namespace) && k8s_name(&caller.service_account), "{caller:?}");
    }
});
