//! Unit tests of `cluster_settings`: what a settings object and a JWKS must be, the issuer
//! check, and how a new key set replaces the stored one.

use super::*;
use serde_json::json;

fn ec_key(kid: &str) -> Value {
    // A valid P-256 public key (the generator point).
    json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
           "x": "axfR8uEsQkf4vOblY6RA8ncDfYEt6zOg9KE5RdiYwpY", "y": "T-NC4v4af5uO5-tKfA-eFivOM1drMV7Oy7ZAaDe_UfU"})
}

fn code(r: Result<IstioSettings, ServiceError>) -> (&'static str, String) {
    let e = r.expect_err("refused");
    (e.code.as_str(), e.detail)
}

#[test]
fn settings_take_defaults_and_every_bad_field_is_named() {
    let s = parse(json!({"sa_issuer": "https://kubernetes.default.svc"})).unwrap();
    assert_eq!(s.audiences, vec!["istio-ca"]);
    assert_eq!(s.server_certificate_names, vec!["istiod.istio-system.svc"]);
    let secs = |v: ca_core::duration::Validity| v.duration().whole_seconds();
    assert_eq!((secs(s.default_ttl), secs(s.max_ttl), secs(s.leeway)), (86_400, 7 * 86_400, 30));
    assert!(s.jwks.is_none() && s.oidc_discovery_url.is_none());

    let bad = |extra: Value| {
        let mut v = json!({"sa_issuer": "https://kubernetes.default.svc"});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        code(parse(v))
    };
    assert_eq!(code(parse(json!({}))).0, "invalid-settings", "sa_issuer is required");
    assert_eq!(bad(json!({"sa_issuer": ""})).0, "invalid-settings");
    assert_eq!(bad(json!({"surprise": 1})).0, "invalid-settings");
    assert_eq!(bad(json!({"audiences": []})).0, "invalid-settings");
    let (c, d) = bad(json!({"trusted_node_accounts": ["istio-system"]}));
    assert_eq!(c, "invalid-settings");
    assert!(d.contains("namespace/serviceaccount"), "{d}");
    assert_eq!(bad(json!({"trusted_node_accounts": ["a/B_C"]})).0, "invalid-settings");
    let (c, d) = bad(json!({"default_ttl": "8d"}));
    assert_eq!(c, "invalid-settings");
    assert!(d.contains("at most max_ttl"), "{d}");
    assert_eq!(bad(json!({"max_ttl": "forever"})).0, "invalid-settings");
    assert_eq!(bad(json!({"over_max": "ignore"})).0, "invalid-settings");
    assert_eq!(bad(json!({"leeway": "1h"})).0, "invalid-settings");
    assert_eq!(bad(json!({"server_certificate_names": ["*.istio-system.svc"]})).0, "invalid-settings");
    assert_eq!(bad(json!({"oidc_discovery_url": "ftp://x/y"})).0, "invalid-settings");
    assert_eq!(bad(json!({"oidc_discovery_url": "not a url"})).0, "invalid-settings");
    let both = bad(
        json!({"oidc_discovery_url": "https://x/.well-known/openid-configuration", "jwks": {"keys": [ec_key("a")]}}),
    );
    assert_eq!(both.0, "invalid-settings");
    assert_eq!(bad(json!({"jwks": {"keys": []}})).0, "invalid-jwks");
    let ok = parse(json!({"sa_issuer": "https://k", "jwks": {"keys": [ec_key("a")]}, "over_max": "clamp",
                          "trusted_node_accounts": ["istio-system/ztunnel"]}))
    .unwrap();
    assert_eq!(kids(ok.jwks.as_ref().unwrap()), vec!["a"]);
}

#[test]
fn a_jwks_must_hold_usable_public_signature_keys() {
    let (set, ids) = validate_jwks(&json!({"keys": [ec_key("k1"), ec_key("k2")]})).unwrap();
    assert_eq!((set.keys.len(), ids), (2, vec!["k1".to_string(), "k2".to_string()]));
    let refused = |doc: Value| validate_jwks(&doc).expect_err("refused");
    assert!(refused(json!([ec_key("k1")])).contains("\"keys\" array"));
    assert!(refused(json!({"keys": []})).contains("between 1 and"));
    assert!(refused(json!({"keys": [ec_key("k1"), ec_key("k1")]})).contains("appears twice"));
    let mut no_kid = ec_key("x");
    no_kid.as_object_mut().unwrap().remove("kid");
    assert!(refused(json!({"keys": [no_kid]})).contains("no kid"));
    let mut private = ec_key("k1");
    private["d"] = json!("c2VjcmV0");
    assert!(refused(json!({"keys": [private]})).contains("private"));
    assert!(refused(json!({"keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0"}]})).contains("symmetric"));
    let mut enc = ec_key("k1");
    enc["use"] = json!("enc");
    assert!(refused(json!({"keys": [enc]})).contains("signature key"));
    let mut hs = ec_key("k1");
    hs["alg"] = json!("HS256");
    assert!(refused(json!({"keys": [hs]})).contains("not accepted"));
    let mut broken = ec_key("k1");
    broken["x"] = json!("AAAA");
    assert!(refused(json!({"keys": [broken]})).contains("not usable"));
    let e = refused(json!({"keys": [{"kty": "RSA", "kid": "r"}]}));
    assert!(e.contains("not a JWKS") || e.contains("not usable"), "an RSA key without n and e: {e}");
}

#[test]
fn a_pushed_issuer_must_be_the_registered_one() {
    assert!(check_issuer("https://k", "https://k").is_ok());
    let e = check_issuer("https://k", "https://other").unwrap_err();
    assert_eq!(e.code.as_str(), "issuer-mismatch");
    assert!(e.detail.contains("https://other") && e.detail.contains("https://k"), "{}", e.detail);
    assert_eq!(e.code.kind(), crate::error::ErrorKind::Conflict, "409");
}

#[test]
fn a_new_key_set_keeps_the_old_one_for_the_grace_and_an_identical_one_changes_nothing() {
    let s = parse(json!({"sa_issuer": "https://k", "jwks": {"keys": [ec_key("a")]}})).unwrap();
    let first = record("c", &s, None, SOURCE_REGISTRATION, "operator:x", 100, 60);
    assert_eq!(first.jwks_source.as_deref(), Some("registration"));
    assert_eq!((first.previous_jwks.as_deref(), first.jwks_updated_at), (None, Some(100)));
    assert_eq!(from_record(&first).unwrap(), s, "stored and read back alike");

    let mut r = first.clone();
    assert!(!replace_jwks(&mut r, &json!({"keys": [ec_key("a")]}), SOURCE_AGENT, 200, 60), "identical");
    assert_eq!(r, first);
    assert!(replace_jwks(&mut r, &json!({"keys": [ec_key("b")]}), SOURCE_AGENT, 200, 60));
    assert_eq!(
        (r.jwks_source.as_deref(), r.jwks_updated_at, r.previous_jwks_until),
        (Some("agent"), Some(200), Some(260))
    );
    assert_eq!(r.previous_jwks, first.jwks);

    // Settings without keys keep the stored ones.
    let mut no_keys = s.clone();
    no_keys.jwks = None;
    no_keys.over_max = ca_core::workload::OverMax::Clamp;
    let changed = record("c", &no_keys, Some(&r), SOURCE_REGISTRATION, "operator:y", 300, 60);
    assert_eq!((changed.jwks.clone(), changed.jwks_source.clone()), (r.jwks.clone(), r.jwks_source.clone()));
    assert_eq!(changed.over_max, "clamp");
}
