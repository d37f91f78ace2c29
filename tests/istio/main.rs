//! External-CA mode end to end: the real `ca-server --dev` answering Istio's certificate gRPC
//! API, driven by a client generated from the same proto, with service-account tokens minted
//! the way a Kubernetes API server would. Certificates are checked with rustls-webpki, openssl
//! and a real mTLS handshake between two workloads.
#![allow(clippy::disallowed_methods)] // clients and workloads of the test bring throwaway keys

#[path = "../server_support/mod.rs"]
mod support;

mod proto {
    tonic::include_proto!("istio.v1.auth");
}

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use proto::IstioCertificateRequest;
use proto::istio_certificate_service_client::IstioCertificateServiceClient;
use serde_json::{Value, json};
use support::*;
use tonic::Code;
use tonic::transport::Channel;

mod cluster_settings;
mod keys_and_status;
mod mtls;
mod storm_and_registration;
mod workload_rules;

async fn channel(srv: &Server) -> Channel {
    grpc_channel(srv, "").await
}

/// Mints a token with the dev cluster's service-account key; `edit` changes the claims.
fn sa_token(srv: &Server, ns: &str, sa: &str, edit: impl FnOnce(&mut Value)) -> String {
    sa_token_with(srv, &srv.dir.join("sa-signing.key"), ns, sa, edit)
}

/// The JWK of a P-256 file key, with the kid the dev setup uses.
fn jwk_of(key: &Path) -> Value {
    let k = hsm::export_file_key(&hsm::KeyRef::file(key)).unwrap();
    let raw = k.public_key().raw().to_vec();
    let b64 = |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, b);
    json!({"kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..65]), "kid": kid_of(key), "alg": "ES256", "use": "sig"})
}

/// The dev cluster's settings, as the dev setup stores them, with `edit` applied.
fn dev_settings(srv: &Server, edit: impl FnOnce(&mut Value)) -> Value {
    let jwks: Value = serde_json::from_str(&std::fs::read_to_string(srv.dir.join("sa-jwks.json")).unwrap()).unwrap();
    let mut v = json!({"sa_issuer": srv.env["CA_SA_ISSUER"], "jwks": jwks,
                       "trusted_node_accounts": ["istio-system/ztunnel"]});
    edit(&mut v);
    v
}

/// Changes a cluster's settings: asked for by an admin, approved by a second operator; the
/// approval answer.
async fn change_settings(srv: &Server, cluster: &str, settings: Value) -> Value {
    let (s, r) =
        srv.call("PUT", &format!("/v1/clusters/{cluster}/settings"), Some(&srv.token("admin")), Some(settings)).await;
    assert_eq!(s, 202, "{r}");
    let id = r["request_id"].as_str().unwrap();
    let (s, a) = srv.call("POST", &format!("/v1/requests/{id}/approve"), Some(&srv.token("approver")), None).await;
    assert_eq!(s, 200, "{a}");
    a
}

struct Call<'a> {
    token: Option<&'a str>,
    cluster: Option<&'a str>,
    csr: String,
    validity: i64,
    impersonate: Option<&'a str>,
}

impl<'a> Call<'a> {
    fn new(token: &'a str, csr: String) -> Self {
        Call { token: Some(token), cluster: Some("dev"), csr, validity: 0, impersonate: None }
    }
}

async fn create(ch: &Channel, c: Call<'_>) -> Result<Vec<String>, tonic::Status> {
    let metadata = c.impersonate.map(|id| prost_types::Struct {
        fields: [(
            "ImpersonatedIdentity".to_string(),
            prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(id.to_string())) },
        )]
        .into_iter()
        .collect(),
    });
    let mut req = tonic::Request::new(IstioCertificateRequest { csr: c.csr, validity_duration: c.validity, metadata });
    if let Some(t) = c.token {
        req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    if let Some(cl) = c.cluster {
        req.metadata_mut().insert("clusterid", cl.parse().unwrap());
    }
    IstioCertificateServiceClient::new(ch.clone()).create_certificate(req).await.map(|r| r.into_inner().cert_chain)
}

/// A CSR for a fresh key with the given SANs (and its PKCS#8 key).
fn csr(sans: Vec<rcgen::SanType>, alg: &'static rcgen::SignatureAlgorithm) -> (String, Vec<u8>) {
    let kp = rcgen::KeyPair::generate_for(alg).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = sans;
    (p.serialize_request(&kp).unwrap().pem().unwrap(), kp.serialize_der())
}

fn plain_csr() -> String {
    csr(vec![], &rcgen::PKCS_ECDSA_P256_SHA256).0
}

fn uri(s: &str) -> rcgen::SanType {
    rcgen::SanType::URI(s.to_string().try_into().unwrap())
}

fn openssl_csr(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.csr");
    let key = dir.path().join("r.key");
    let o = Command::new("openssl")
        .args(["req", "-new", "-nodes", "-subj", "/CN=w"])
        .args(args)
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::read_to_string(out).unwrap()
}

fn der(pem_text: &str) -> Vec<u8> {
    pem::parse(pem_text).unwrap().into_contents()
}

fn expect_code(r: Result<Vec<String>, tonic::Status>, code: Code, what: &str) -> String {
    match r {
        Ok(_) => panic!("{what}: expected {code:?}, got a certificate"),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {}", s.message());
            s.message().to_string()
        }
    }
}

struct Leaf {
    sans: Vec<String>,
    not_before: i64,
    not_after: i64,
    serial: String,
}

fn parse_leaf(pem_text: &str) -> Leaf {
    let d = der(pem_text);
    let (_, c) = x509_parser::parse_x509_certificate(&d).unwrap();
    let sans = c
        .subject_alternative_name()
        .unwrap()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => format!("URI:{u}"),
                    other => format!("{other:?}"),
                })
                .collect()
        })
        .unwrap_or_default();
    Leaf {
        sans,
        not_before: c.validity().not_before.timestamp(),
        not_after: c.validity().not_after.timestamp(),
        serial: hex::encode(c.raw_serial()),
    }
}

/// Verifies `chain` (leaf, intermediates..., bundle) with rustls-webpki for client and server
/// use, with the bundle as the only anchors.
fn webpki_verify(chain: &[String]) {
    let bundle = chain.last().unwrap();
    let anchors_der: Vec<Vec<u8>> = pem::parse_many(bundle).unwrap().into_iter().map(|p| p.into_contents()).collect();
    let anchors: Vec<_> = anchors_der
        .iter()
        .map(|d| {
            webpki::anchor_from_trusted_cert(&rustls::pki_types::CertificateDer::from(d.as_slice())).unwrap().to_owned()
        })
        .collect();
    let inter: Vec<rustls::pki_types::CertificateDer> =
        chain[1..chain.len() - 1].iter().map(|p| rustls::pki_types::CertificateDer::from(der(p))).collect();
    let leaf_der = rustls::pki_types::CertificateDer::from(der(&chain[0]));
    let leaf = webpki::EndEntityCert::try_from(&leaf_der).unwrap();
    let now = rustls::pki_types::UnixTime::now();
    for usage in [webpki::KeyUsage::client_auth(), webpki::KeyUsage::server_auth()] {
        leaf.verify_for_usage(webpki::ALL_VERIFICATION_ALGS, &anchors, &inter, now, usage, None, None)
            .expect("webpki accepts the chain");
    }
}

fn openssl_text(pem_text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.pem");
    std::fs::write(&p, pem_text).unwrap();
    stdout(&Command::new("openssl").args(["x509", "-noout", "-text", "-in"]).arg(&p).output().unwrap())
}

fn openssl_verify(chain: &[String]) {
    let dir = tempfile::tempdir().unwrap();
    let w = |n: &str, t: String| {
        let p = dir.path().join(n);
        std::fs::write(&p, t).unwrap();
        p
    };
    let leaf = w("leaf.pem", chain[0].clone());
    let inter = w("inter.pem", chain[1..chain.len() - 1].concat());
    let roots = w("roots.pem", chain.last().unwrap().clone());
    let o = Command::new("openssl")
        .args(["verify", "-x509_strict", "-purpose", "sslclient", "-CAfile"])
        .arg(&roots)
        .arg("-untrusted")
        .arg(&inter)
        .arg(&leaf)
        .output()
        .unwrap();
    assert!(o.status.success(), "openssl verify: {}{}", stdout(&o), stderr(&o));
}

fn listed_serials(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .filter(|r| r["action"] == "workload.issued")
        .flat_map(|r| {
            r["details"]["issued"].as_array().unwrap().iter().map(|i| i["serial"].as_str().unwrap().to_string())
        })
        .collect()
}

/// Authenticated refusals (one entry each) and, from the periodic summaries of unauthenticated
/// ones, one entry per code.
fn denials(records: &[Value]) -> Vec<Value> {
    let summarised = records
        .iter()
        .filter(|r| r["action"] == "request.denied.summary")
        .filter_map(|r| r["details"]["by_code"].as_object())
        .flat_map(|codes| codes.keys().map(|c| json!({"code": c})).collect::<Vec<_>>());
    records.iter().filter_map(|r| r["details"]["denied"].as_array()).flatten().cloned().chain(summarised).collect()
}
