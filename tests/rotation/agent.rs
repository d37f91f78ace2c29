//! An external-CA cluster whose agent reports its namespaces' bundles: a root rotation's
//! stage gate holds while a namespace's `istio-ca-root-cert` lacks the new root.

use super::*;

/// POST `body` to `path` over mTLS with the agent's certificate and key (DER).
async fn agent_post(srv: &Server, cert: &[u8], key: &[u8], path: &str, body: Value) -> (u16, Value) {
    let c = client_der(&srv.root(), Some((cert, key)));
    let resp = c.post(format!("{}{path}", srv.url)).json(&body).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_ca_cluster_with_an_agent_is_gated_on_its_namespaces() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(&tmp.path().join("dev"), &opts());
    srv.wait_ready().await;

    // The dev cluster's agent enrols with a token two operators issued.
    let (s, r) = srv.call("POST", "/v1/clusters/dev/enrolment", Some(&srv.token("admin")), None).await;
    assert_eq!(s, 202, "{r}");
    json_of(&cli(&srv, "approver", &["request", "approve", r["request_id"].as_str().unwrap()]));
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
    let cert = pem::parse(issued["certificate"].as_str().unwrap()).unwrap().into_contents();
    let key = kp.serialize_der();
    let report = |namespaces: Value| {
        agent_post(&srv, &cert, &key, "/v1/clusters/dev/namespace-report", json!({"namespaces": namespaces}))
    };

    // A new root, and the environment certified under it (the offline part).
    let cer = tmp.path().join("ceremonies");
    std::fs::create_dir_all(&cer).unwrap();
    let conf = Some(srv.dir.join("hierarchy/softhsm/softhsm2.conf"));
    let root_key = cer.join("root-b.key");
    ceremony(
        &cer,
        "1-key.yaml",
        &format!(
            "ceremony-type: key\nkey: \"file:{}\"\nalgorithm: ecdsa-p384\noutputs:\n  public-key: root-b.pub.pem\n",
            root_key.display()
        ),
        conf.as_deref(),
    );
    ceremony(
        &cer,
        "2-root.yaml",
        &format!(
            "ceremony-type: root\nkey: \"file:{}\"\nsubject: \"CN=Dev Root B,O=Test\"\nvalidity: 10y\noutputs:\n  certificate: root-b.pem\n",
            root_key.display()
        ),
        conf.as_deref(),
    );
    let env_cert = srv.dir.join("hierarchy/environments/dev/environment.pem");
    ceremony(
        &cer,
        "3-cross.yaml",
        &format!(
            "ceremony-type: cross-sign\nissuer:\n  certificate: root-b.pem\n  key: \"file:{}\"\ncertificate: {}\nvalidity: 4y\noutputs:\n  certificate: env-under-b.pem\n",
            root_key.display(),
            env_cert.display()
        ),
        conf.as_deref(),
    );
    let old = load_cert(&srv.root()).unwrap().fingerprint();
    let new = load_cert(&cer.join("root-b.pem")).unwrap().fingerprint();

    let started = json_of(&cli(
        &srv,
        "admin",
        &["rotation", "start", "root", "--new-root", cer.join("root-b.pem").to_str().unwrap()],
    ));
    let id = started["rotation"].as_str().unwrap().to_string();
    json_of(&cli(&srv, "approver", &["request", "approve", started["request_id"].as_str().unwrap()]));
    advance(&srv, &id, "distribute");
    json_of(&cli(
        &srv,
        "admin",
        &[
            "rotation",
            "certificate",
            &id,
            "--environment",
            "dev",
            "--certificate",
            cer.join("env-under-b.pem").to_str().unwrap(),
        ],
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
    let (s, _) = report(json!({"default": [new, old], "istio-system": [old, new], "apps": [old, new]})).await;
    assert_eq!(s, 200);
    let status = json_of(&cli(&srv, "auditor", &["rotation", "status", &id]));
    assert!(status["blockers"].as_array().unwrap().is_empty(), "{status}");
    let dev = status["clusters"].as_array().unwrap().iter().find(|c| c["name"] == "dev").unwrap().clone();
    assert_eq!(dev["bundle_ok"], true, "{dev}");
    advance(&srv, &id, "reissue");
}
