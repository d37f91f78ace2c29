//! External-CA mode: ca-agent keeps every namespace's `istio-ca-root-cert`, istiod's
//! `istiod-tls`, and ca-server's copy of the cluster's service-account keys.

use std::path::Path;

use kube_standin::Kind;
use serde_json::{Value, json};

use crate::server_support::{Server, audit_all, grpc_channel, kid_of, sa_token_with};
use crate::support::*;

mod proto {
    tonic::include_proto!("istio.v1.auth");
}

const CLUSTER: &str = "agent-ext";
const ISSUER: &str = "https://oidc.agent-ext.example";

fn jwk_of(key: &Path) -> Value {
    let k = hsm::export_file_key(&hsm::KeyRef::file(key)).unwrap();
    let raw = k.public_key().raw().to_vec();
    let b64 = |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, b);
    json!({"kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..65]), "kid": kid_of(key), "alg": "ES256", "use": "sig"})
}

fn fingerprints(pem_text: &str) -> Vec<String> {
    let mut f = ca_core::cert::fingerprints(&ca_core::cert::parse_certs(pem_text.as_bytes(), "bundle").unwrap());
    f.sort();
    f
}

fn configmap_roots(k: &kube_standin::StandIn, ns: &str) -> Option<String> {
    k.get(Kind::ConfigMap, Some(ns), "istio-ca-root-cert")?["data"]["root-cert.pem"].as_str().map(str::to_string)
}

async fn workload_certificate(srv: &Server, token: &str) -> Result<Vec<String>, tonic::Status> {
    let ch = grpc_channel(srv, "").await;
    let kp = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default().serialize_request(&kp).unwrap().pem().unwrap();
    let mut req = tonic::Request::new(proto::IstioCertificateRequest { csr, validity_duration: 0, metadata: None });
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    req.metadata_mut().insert("clusterid", CLUSTER.parse().unwrap());
    proto::istio_certificate_service_client::IstioCertificateServiceClient::new(ch)
        .create_certificate(req)
        .await
        .map(|r| r.into_inner().cert_chain)
}

/// Registration with settings and no JWKS; the agent enrols its own client certificate, writes
/// istiod-tls, publishes the root ConfigMap in every namespace but the excluded ones (on
/// creation, and again after an edit or a delete), pushes the cluster's keys so that workload
/// certificates issue without any ca-server configuration, and reports the namespaces.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn external_ca_mode_publishes_roots_istiod_tls_and_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(&tmp.path().join("dev"), &Default::default());
    srv.wait_ready().await;
    let cluster_key = tmp.path().join("agent-ext.key");
    hsm::generate_key(&hsm::KeyRef::file(&cluster_key), hsm::KeyAlgorithm::EcdsaP256).unwrap();
    let body = json!({"name": CLUSTER, "environment": "dev", "trust_domain": "cluster.local", "mode": "external-ca",
        "key": format!("file:{}", cluster_key.display()),
        "istio": {"sa_issuer": ISSUER, "server_certificate_names": ["istiod.istio-system.svc"]}});
    let (s, r) = srv.call("POST", "/v1/clusters", Some(&srv.token("admin")), Some(body)).await;
    assert_eq!(s, 202, "{r}");
    let token = r["enrolment_token"].as_str().expect("an enrolment token for the agent").to_string();
    let id = r["request_id"].as_str().unwrap();
    let (s, a) = srv.call("POST", &format!("/v1/requests/{id}/approve"), Some(&srv.token("approver")), None).await;
    assert_eq!(s, 200, "{a}");

    // The cluster's service-account signing key, known only to its API server (the stand-in).
    let sa_key = tmp.path().join("sa.key");
    hsm::generate_key(&hsm::KeyRef::file(&sa_key), hsm::KeyAlgorithm::EcdsaP256).unwrap();
    let sa_token = sa_token_with(&srv, &sa_key, "app-1", "web", |c| c["iss"] = json!(ISSUER));
    let refused = workload_certificate(&srv, &sa_token).await;
    assert!(refused.is_err(), "no keys yet, so no token verifies: {refused:?}");

    let k = standin(&["app-1"]).await;
    k.set_oidc(ISSUER, json!({"keys": [jwk_of(&sa_key)]}));
    let kubeconfig = tmp.path().join("kubeconfig");
    k.write_kubeconfig(&kubeconfig).unwrap();
    put_enrolment_token(&k, &token);
    let agent = Agent::start(&srv, &kubeconfig, "external-ca", CLUSTER, "agent-x", &[]);

    let credential =
        eventually(30, "the agent credential", &[&agent], async || secret_data(&k, "ca-agent", "ca-agent-credential"))
            .await;
    assert!(credential.contains_key("tls.crt") && credential.contains_key("tls.key"));

    let bundle = match srv.call("GET", &format!("/v1/clusters/{CLUSTER}/trust-bundle"), None, None).await {
        (200, Value::String(pem)) => pem,
        other => panic!("trust bundle: {other:?}"),
    };
    let want = fingerprints(&bundle);
    for ns in ["default", "istio-system", "ca-agent", "app-1"] {
        let got =
            eventually(30, &format!("istio-ca-root-cert in {ns}"), &[&agent], async || configmap_roots(&k, ns)).await;
        assert_eq!(fingerprints(&got), want, "{ns}");
    }
    for ns in ["kube-system", "kube-public", "kube-node-lease"] {
        assert!(configmap_roots(&k, ns).is_none(), "{ns} is excluded");
    }

    let tls = eventually(30, "istiod-tls", &[&agent], async || secret_data(&k, "istio-system", "istiod-tls")).await;
    assert_eq!(fingerprints(&tls["ca.crt"]), want);
    assert!(openssl_verifies(tmp.path(), &tls["tls.crt"], &tls["tls.crt"], &tls["ca.crt"]));
    let leaf = ca_core::cert::parse_certs(tls["tls.crt"].as_bytes(), "tls.crt").unwrap().remove(0);
    let key = hsm::SecretKey::from_pem(&tls["tls.key"], "tls.key").unwrap();
    assert_eq!(leaf.spki_der, key.public_key().spki_der());
    let text = String::from_utf8(
        std::process::Command::new("openssl")
            .args(["x509", "-noout", "-text"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(tls["tls.crt"].as_bytes())?;
                c.wait_with_output()
            })
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(text.contains("DNS:istiod.istio-system.svc"), "{text}");

    // A namespace created later gets the ConfigMap; an edited or deleted one is put back.
    k.put(Kind::Namespace, None, "app-2", json!({"metadata": {"name": "app-2"}}));
    eventually(20, "istio-ca-root-cert in a new namespace", &[&agent], async || configmap_roots(&k, "app-2")).await;
    k.put(
        Kind::ConfigMap,
        Some("app-1"),
        "istio-ca-root-cert",
        json!({"metadata": {"name": "istio-ca-root-cert"}, "data": {"root-cert.pem": "edited by hand"}}),
    );
    eventually(20, "the edited ConfigMap put back", &[&agent], async || {
        configmap_roots(&k, "app-1").filter(|p| p.contains("BEGIN CERTIFICATE"))
    })
    .await;
    k.delete(Kind::ConfigMap, Some("default"), "istio-ca-root-cert");
    eventually(20, "the deleted ConfigMap put back", &[&agent], async || configmap_roots(&k, "default")).await;

    // The keys the agent read from its API server now verify the cluster's tokens.
    let chain = eventually(30, "a workload certificate under the pushed keys", &[&agent], async || {
        workload_certificate(&srv, &sa_token).await.ok()
    })
    .await;
    assert!(chain.len() >= 2);
    let audit = audit_all(&srv).await;
    assert!(
        audit.iter().any(|r| r["action"] == "cluster.jwks.updated" && r["subject"] == CLUSTER),
        "the key change is audited"
    );

    // What the namespaces hold reached the server.
    eventually(20, "a namespace report", &[&agent], async || {
        audit_all(&srv)
            .await
            .iter()
            .any(|r| r["subject"] == CLUSTER && r["action"].as_str().is_some_and(|a| a.contains("namespace")))
            .then_some(())
    })
    .await;
    let (code, body) = agent.get("/readyz").await;
    assert_eq!(code, 200, "{body}");
    let (_, metrics) = agent.get("/metrics").await;
    for object in ["istiod-tls", "ca-agent-credential"] {
        assert!(
            metrics.contains(&format!("ca_agent_certificate_expiry_timestamp_seconds{{object=\"{object}\"}}")),
            "{metrics}"
        );
    }
    assert!(metrics.contains("ca_agent_last_sync_timestamp_seconds{object=\"configmap/app-2\"}"), "{metrics}");
    assert!(k.requests().iter().all(|r| r.method != "DELETE"), "the agent deleted something");
}
