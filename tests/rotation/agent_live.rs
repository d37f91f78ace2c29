//! A root rotation with the real ca-agent publishing the dev cluster's ConfigMaps: the stage
//! gate reads the agent's own reports, holds while one namespace's `istio-ca-root-cert` cannot
//! be written, names it, and opens once the agent got there.

use super::*;
use crate::agent_support::{Agent, eventually, standin};
use kube_standin::Kind;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_root_rotation_waits_for_the_real_agent_to_publish_every_namespace() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(&tmp.path().join("dev"), &opts());
    srv.wait_ready().await;

    // The dev cluster's agent: a token from two operators, in the Secret it reads.
    let (s, r) = srv.call("POST", "/v1/clusters/dev/enrolment", Some(&srv.token("admin")), None).await;
    assert_eq!(s, 202, "{r}");
    json_of(&cli(&srv, "approver", &["request", "approve", r["request_id"].as_str().unwrap()]));
    let k = standin(&["apps", "stuck"]).await;
    let jwks: Value = serde_json::from_str(&std::fs::read_to_string(&srv.env["CA_SA_JWKS"]).unwrap()).unwrap();
    k.set_oidc(&srv.env["CA_SA_ISSUER"], jwks);
    crate::agent_support::put_enrolment_token(&k, r["enrolment_token"].as_str().unwrap());
    // Every write (and read) of a ConfigMap in `stuck` fails until the faults are cleared.
    k.fail_next("*", "/api/v1/namespaces/stuck/", 500, u32::MAX);
    let kubeconfig = tmp.path().join("kubeconfig");
    k.write_kubeconfig(&kubeconfig).unwrap();
    let agent = Agent::start(&srv, &kubeconfig, "external-ca", "dev", "agent-r", &[]);
    let old = load_cert(&srv.root()).unwrap().fingerprint();
    for ns in ["default", "apps", "istio-system"] {
        eventually(30, &format!("istio-ca-root-cert in {ns}"), &[&agent], async || {
            k.get(Kind::ConfigMap, Some(ns), "istio-ca-root-cert")
        })
        .await;
    }

    let (root_b, env_under_b) = new_root_and_cross_signed_environment(&srv, tmp.path());
    let new = load_cert(&root_b).unwrap().fingerprint();
    let started = json_of(&cli(&srv, "admin", &["rotation", "start", "root", "--new-root", root_b.to_str().unwrap()]));
    let id = started["rotation"].as_str().unwrap().to_string();
    json_of(&cli(&srv, "approver", &["request", "approve", started["request_id"].as_str().unwrap()]));
    advance(&srv, &id, "distribute");
    json_of(&cli(
        &srv,
        "admin",
        &["rotation", "certificate", &id, "--environment", "dev", "--certificate", env_under_b.to_str().unwrap()],
    ));

    // The agent follows the bundle into every namespace it can write; `stuck` holds the gate,
    // and is the only one named.
    let blockers = eventually(40, "the gate to name only `stuck`", &[&agent], async || {
        let status = json_of(&cli(&srv, "auditor", &["rotation", "status", &id]));
        let text = status["blockers"].to_string();
        (text.contains("stuck") && !text.contains("apps") && !text.contains("default")).then_some(text)
    })
    .await;
    assert!(blockers.contains("1 of"), "{blockers}");
    refused(&srv, &id, &["stuck"]);
    let cm = k.get(Kind::ConfigMap, Some("apps"), "istio-ca-root-cert").unwrap();
    let held = ca_core::cert::parse_certs(cm["data"]["root-cert.pem"].as_str().unwrap().as_bytes(), "cm").unwrap();
    let mut fps: Vec<String> = held.iter().map(CertInfo::fingerprint).collect();
    fps.sort();
    let mut both = vec![old.clone(), new.clone()];
    both.sort();
    assert_eq!(fps, both, "both roots while distributing");

    // The API server lets the writes through again: the agent catches up, and the gate opens.
    k.clear_faults();
    eventually(40, "the gate to open", &[&agent], async || {
        let status = json_of(&cli(&srv, "auditor", &["rotation", "status", &id]));
        status["blockers"].as_array().is_some_and(Vec::is_empty).then_some(())
    })
    .await;
    advance(&srv, &id, "reissue");
}
