//! An external-CA cluster whose agent reports its namespaces' bundles: a root rotation's
//! stage gate holds while a namespace's `istio-ca-root-cert` lacks the new root; an
//! environment rotation tells the agent to move its certificate to the new key.

use super::*;

/// POST `body` to `path` over mTLS with the agent's certificate and key (DER).
async fn agent_post(srv: &Server, cert: &[u8], key: &[u8], path: &str, body: Value) -> (u16, Value) {
    let c = client_der(&srv.root(), Some((cert, key)));
    let resp = c.post(format!("{}{path}", srv.url)).json(&body).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

/// The dev cluster's agent enrols with a token two operators issued; its certificate and key.
async fn enrol_dev_agent(srv: &Server) -> (Vec<u8>, Vec<u8>) {
    let (s, r) = srv.call("POST", "/v1/clusters/dev/enrolment", Some(&srv.token("admin")), None).await;
    assert_eq!(s, 202, "{r}");
    json_of(&cli(srv, "approver", &["request", "approve", r["request_id"].as_str().unwrap()]));
    let (csr, kp) = csr_with_key();
    let resp = srv
        .client
        .post(format!("{}/v1/clusters/dev/agent-certificate", srv.url))
        .bearer_auth(r["enrolment_token"].as_str().unwrap())
        .json(&json!({"csr": csr}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let issued: Value = resp.json().await.unwrap();
    (pem::parse(issued["certificate"].as_str().unwrap()).unwrap().into_contents(), kp.serialize_der())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_ca_cluster_with_an_agent_is_gated_on_its_namespaces() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(&tmp.path().join("dev"), &opts());
    srv.wait_ready().await;

    let (cert, key) = enrol_dev_agent(&srv).await;
    let report = |namespaces: Value| {
        agent_post(&srv, &cert, &key, "/v1/clusters/dev/namespace-report", json!({"namespaces": namespaces}))
    };

    let (root_b, env_under_b) = new_root_and_cross_signed_environment(&srv, tmp.path());
    let old = load_cert(&srv.root()).unwrap().fingerprint();
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
    // An agent that has not reported yet holds the gate.
    refused(&srv, &id, &["cluster dev: no namespace report from the agent yet"]);

    // The agent reports what each namespace holds and learns the bundle they should.
    let (s, r) = report(json!({"default": [old], "istio-system": [old], "apps": []})).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["trust_bundle"].as_array().unwrap().len(), 2, "both roots while distributing: {r}");
    refused(
        &srv,
        &id,
        &[
            "cluster dev: 3 of 3 namespaces do not hold the current trust bundle in istio-ca-root-cert: apps, default, istio-system",
        ],
    );
    let status = json_of(&cli(&srv, "auditor", &["rotation", "status", &id]));
    let dev = status["clusters"].as_array().unwrap().iter().find(|c| c["name"] == "dev").unwrap().clone();
    assert_eq!((dev["bundle_ok"].as_bool(), dev["state"].as_str()), (Some(false), Some("lagging")), "{dev}");

    // One namespace still lacks the new root: the stage waits for it, by name.
    let (s, _) = report(json!({"default": [new, old], "istio-system": [old], "apps": [old, new]})).await;
    assert_eq!(s, 200);
    refused(
        &srv,
        &id,
        &["cluster dev: 1 of 3 namespaces do not hold the current trust bundle in istio-ca-root-cert: istio-system"],
    );
    // A namespace holding more than the bundle is not holding the bundle either.
    let stray = "ab".repeat(32);
    let (s, _) = report(json!({"default": [new, old], "istio-system": [old, new, stray], "apps": [old, new]})).await;
    assert_eq!(s, 200);
    refused(&srv, &id, &["istio-system"]);

    // Every namespace holds both roots: the gate opens.
    let (s, r) = report(json!({"default": [new, old], "istio-system": [old, new], "apps": [old, new]})).await;
    assert_eq!(s, 200);
    assert_eq!(r["renew"], false, "a root rotation keeps the environment's key: nothing to renew: {r}");
    let status = json_of(&cli(&srv, "auditor", &["rotation", "status", &id]));
    assert!(status["blockers"].as_array().unwrap().is_empty(), "{status}");
    let dev = status["clusters"].as_array().unwrap().iter().find(|c| c["name"] == "dev").unwrap().clone();
    assert_eq!(dev["bundle_ok"], true, "{dev}");
    advance(&srv, &id, "reissue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_rotation_moves_the_agent_certificate_to_the_new_key() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(&tmp.path().join("dev"), &opts());
    srv.wait_ready().await;
    let (cert, key) = enrol_dev_agent(&srv).await;
    let root = load_cert(&srv.root()).unwrap().fingerprint();
    let body = json!({"namespaces": {"default": [root]}});
    let (s, r) = agent_post(&srv, &cert, &key, "/v1/clusters/dev/namespace-report", body.clone()).await;
    assert_eq!((s, r["renew"].as_bool()), (200, Some(false)), "{r}");

    let (env2, id) = environment_rotation_started(&srv, tmp.path());
    advance(&srv, &id, "reissue");

    // The old certificate still acts for the cluster, and is told to move.
    let (s, r) = agent_post(&srv, &cert, &key, "/v1/clusters/dev/namespace-report", body.clone()).await;
    assert_eq!((s, r["renew"].as_bool()), (200, Some(true)), "{r}");
    assert!(r["reason"].as_str().unwrap().contains("not issued by dev's current certificate"), "{r}");
    let (csr, kp) = csr_with_key();
    let (s, renewed) = agent_post(&srv, &cert, &key, "/v1/clusters/dev/agent-certificate", json!({"csr": csr})).await;
    assert_eq!(s, 200, "{renewed}");
    let chain = renewed["chain"].as_array().unwrap();
    assert_eq!(
        CertInfo::from_der(pem::parse(chain[0].as_str().unwrap()).unwrap().into_contents()).unwrap().der,
        env2.der,
        "issued under the new environment key"
    );
    let cert = pem::parse(renewed["certificate"].as_str().unwrap()).unwrap().into_contents();
    let key = kp.serialize_der();
    let (s, r) = agent_post(&srv, &cert, &key, "/v1/clusters/dev/namespace-report", body).await;
    assert_eq!((s, r["renew"].as_bool()), (200, Some(false)), "{r}");
}
