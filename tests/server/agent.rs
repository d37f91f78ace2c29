//! An external-CA cluster's agent: its client certificate (enrolled once with the one-time
//! token, renewed over mTLS, revoked like any certificate), istiod's serving certificate
//! through it, and its namespace reports.

use ca_core::cert::CertInfo;

use super::*;

/// An agent's credential: its certificate and PKCS#8 key (DER).
struct Agent {
    cert: Vec<u8>,
    key: Vec<u8>,
    serial: String,
}

impl Agent {
    fn client(&self, srv: &Server) -> reqwest::Client {
        client_der(&srv.root(), Some((&self.cert, &self.key)))
    }
}

/// POST `path` as `client` (bearer `token` if any) with `body`; status and JSON answer.
async fn post(client: &reqwest::Client, srv: &Server, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
    let mut req = client.post(format!("{}{path}", srv.url)).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Asks (admin) for a new enrolment token for `cluster` and approves it (approver).
async fn reissued_token(srv: &Server, cluster: &str) -> String {
    let (s, r) = srv.call("POST", &format!("/v1/clusters/{cluster}/enrolment"), Some(&srv.token("admin")), None).await;
    assert_eq!(s, 202, "{r}");
    let token = r["enrolment_token"].as_str().unwrap().to_string();
    // Not usable until a second operator approves.
    let (s, e) = enrol_raw(srv, cluster, &token).await;
    assert_eq!((s, e["code"].as_str()), (401, Some("enrolment-token-invalid")), "{e}");
    let id = r["request_id"].as_str().unwrap();
    let (s, a) = srv.call("POST", &format!("/v1/requests/{id}/approve"), Some(&srv.token("approver")), None).await;
    assert_eq!(s, 200, "{a}");
    token
}

async fn enrol_raw(srv: &Server, cluster: &str, token: &str) -> (u16, Value) {
    let path = format!("/v1/clusters/{cluster}/agent-certificate");
    post(&srv.client, srv, &path, Some(token), json!({"csr": csr_pem()})).await
}

/// Sends a fresh CSR to the agent-certificate endpoint as `client` (with `token` if any).
async fn agent_certificate(
    srv: &Server,
    client: &reqwest::Client,
    cluster: &str,
    token: Option<&str>,
) -> Result<Agent, (u16, Value)> {
    let (csr, kp) = csr_with_key();
    let path = format!("/v1/clusters/{cluster}/agent-certificate");
    let (s, r) = post(client, srv, &path, token, json!({"csr": csr})).await;
    if s != 200 {
        return Err((s, r));
    }
    Ok(Agent {
        cert: pem::parse(r["certificate"].as_str().unwrap()).unwrap().into_contents(),
        key: kp.serialize_der(),
        serial: r["serial"].as_str().unwrap().to_string(),
    })
}

/// Enrols the agent of `cluster` with a freshly re-issued token.
async fn enrolled(srv: &Server, cluster: &str) -> Agent {
    let token = reissued_token(srv, cluster).await;
    agent_certificate(srv, &srv.client, cluster, Some(&token)).await.unwrap_or_else(|e| panic!("{e:?}"))
}

fn text_of(pem_text: &str) -> String {
    let mut c = Command::new("openssl")
        .args(["x509", "-noout", "-text"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    c.stdin.take().unwrap().write_all(pem_text.as_bytes()).unwrap();
    String::from_utf8(c.wait_with_output().unwrap().stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_enrols_once_renews_over_mtls_and_revocation_shuts_it_out() {
    let tmp = tempfile::tempdir().unwrap();
    let opts =
        Opts { env: vec![("CA_SERVER_POLICY__AGENT_CERTIFICATE_VALIDITY".into(), "2d".into())], ..Opts::default() };
    let srv = Server::start(&tmp.path().join("dev"), &opts);
    srv.wait_ready().await;
    let token = reissued_token(&srv, "dev").await;
    // The token enrols the agent, never a CA: the external-CA cluster's intermediate is the
    // server's.
    let (s, r) =
        post(&srv.client, &srv, "/v1/clusters/dev/intermediate", Some(&token), json!({"csr": csr_pem()})).await;
    assert_eq!((s, r["code"].as_str()), (409, Some("external-ca-cluster")), "{r}");

    let (csr, kp) = csr_with_key();
    let (s, r) = post(&srv.client, &srv, "/v1/clusters/dev/agent-certificate", Some(&token), json!({"csr": csr})).await;
    assert_eq!(s, 200, "{r}");
    let first = Agent {
        cert: pem::parse(r["certificate"].as_str().unwrap()).unwrap().into_contents(),
        key: kp.serialize_der(),
        serial: r["serial"].as_str().unwrap().to_string(),
    };
    let text = text_of(r["certificate"].as_str().unwrap());
    assert!(text.contains("CN=ca-agent dev") || text.contains("CN = ca-agent dev"), "{text}");
    assert!(text.contains("TLS Web Client Authentication") && !text.contains("TLS Web Server"), "{text}");
    assert!(text.contains("CA:FALSE") && !text.contains("Subject Alternative Name"), "{text}");
    assert!(text.contains("Digital Signature") && !text.contains("Key Encipherment"), "{text}");
    let cert = CertInfo::from_der(first.cert.clone()).unwrap();
    let life = cert.not_after - cert.not_before;
    assert!(life <= time::Duration::days(2) && life > time::Duration::days(2) - time::Duration::hours(1), "{life}");
    // The chain is the environment intermediate up to the root; the bundle the roots.
    let env_cert = ca_core::cert::load_cert(&srv.dir.join("hierarchy/environments/dev/environment.pem")).unwrap();
    let chain: Vec<&str> = r["chain"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert_eq!(chain[0].trim(), env_cert.pem().trim());
    let root = std::fs::read_to_string(srv.root()).unwrap();
    assert_eq!(chain.last().unwrap().trim(), root.trim());
    assert_eq!(r["trust_bundle"], json!([root]), "{r}");
    // The token is spent.
    let (s, e) = enrol_raw(&srv, "dev", &token).await;
    assert_eq!((s, e["code"].as_str()), (401, Some("enrolment-token-invalid")), "{e}");

    // Renewal over mTLS, twice.
    let second = agent_certificate(&srv, &first.client(&srv), "dev", None).await.unwrap();
    let third = agent_certificate(&srv, &second.client(&srv), "dev", None).await.unwrap();
    assert!(first.serial != second.serial && second.serial != third.serial);
    // Only the newest and the one it was renewed from act for the cluster.
    let (s, e) = agent_certificate(&srv, &first.client(&srv), "dev", None).await.err().unwrap();
    assert_eq!((s, e["code"].as_str()), (401, Some("client-certificate-superseded")), "{e}");
    // An answer lost on the way back does not strand the agent: the one it renewed with still
    // renews, and then the lost one is superseded.
    let lost = third;
    let third = agent_certificate(&srv, &second.client(&srv), "dev", None).await.unwrap();
    let (s, e) = agent_certificate(&srv, &lost.client(&srv), "dev", None).await.err().unwrap();
    assert_eq!((s, e["code"].as_str()), (401, Some("client-certificate-superseded")), "{e}");
    // Without any credential: refused.
    let (s, e) = post(&srv.client, &srv, "/v1/clusters/dev/agent-certificate", None, json!({"csr": csr_pem()})).await;
    assert_eq!((s, e["code"].as_str()), (401, Some("unauthenticated")), "{e}");

    // Recorded for the cluster, by the agent, and audited.
    let (s, rec) =
        srv.call("GET", &format!("/v1/certificates/{}", third.serial), Some(&srv.token("auditor")), None).await;
    assert_eq!(s, 200, "{rec}");
    assert_eq!(
        (rec["profile"].as_str(), rec["cluster"].as_str(), rec["issuer"].as_str()),
        (Some("agent"), Some("dev"), Some("dev")),
        "{rec}"
    );
    let issued: Vec<Value> = audit_all(&srv)
        .await
        .into_iter()
        .filter(|r| r["action"] == "certificate.issued" && r["details"]["profile"] == "agent")
        .collect();
    assert_eq!(issued.len(), 4, "{issued:#?}");
    assert!(issued.iter().all(|r| r["actor"] == "agent:dev"), "{issued:#?}");
    assert_eq!(issued[0]["details"]["via"], "enrolment");
    assert_eq!(issued[3]["details"]["renewed_from"], json!(second.serial));

    // Revoked through the ordinary two-person flow: the newest certificate and every one the
    // agent held before stop working, and the environment's CRL lists it.
    let (s, rq) = srv
        .call(
            "POST",
            &format!("/v1/certificates/{}/revoke", third.serial),
            Some(&srv.token("admin")),
            Some(json!({"reason": "key-compromise"})),
        )
        .await;
    assert_eq!(s, 202, "{rq}");
    let (s, a) = srv
        .call(
            "POST",
            &format!("/v1/requests/{}/approve", rq["id"].as_str().unwrap()),
            Some(&srv.token("approver")),
            None,
        )
        .await;
    assert_eq!(s, 200, "{a}");
    for agent in [&third, &second] {
        let (s, e) = agent_certificate(&srv, &agent.client(&srv), "dev", None).await.err().unwrap();
        assert_eq!((s, e["code"].as_str()), (401, Some("client-certificate-revoked")), "{e}");
        let (s, e) =
            post(&agent.client(&srv), &srv, "/v1/clusters/dev/namespace-report", None, json!({"namespaces": {}})).await;
        assert_eq!((s, e["code"].as_str()), (401, Some("client-certificate-revoked")), "{e}");
        let body = json!({"csr": csr_pem(), "dns_names": ["istiod.istio-system.svc"]});
        let (s, e) = post(&agent.client(&srv), &srv, "/v1/clusters/dev/server-certificates", None, body).await;
        assert_eq!((s, e["code"].as_str()), (401, Some("client-certificate-revoked")), "{e}");
    }
    let crl = tmp.path().join("dev.crl");
    let der = srv.client.get(format!("{}/v1/crl/dev", srv.url)).send().await.unwrap();
    std::fs::write(&crl, der.bytes().await.unwrap()).unwrap();
    let env_pem = srv.dir.join("hierarchy/environments/dev/environment.pem");
    let o = openssl(&["crl", "-inform", "DER", "-in", s_(&crl), "-CAfile", s_(&env_pem), "-noout", "-verify", "-text"]);
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && text.contains("verify OK"), "{text}");
    assert!(text.to_uppercase().contains(&third.serial.to_uppercase()), "{text}");
    // The revocation took nothing else with it: the cluster's intermediate still serves.
    let (_, dev) = srv.call("GET", "/v1/clusters/dev", Some(&srv.token("auditor")), None).await;
    assert_eq!(dev["key_compromised"], false, "{dev}");

    // A new token (two-person rule again) enrols the agent afresh, and only what it enrols
    // from then on counts.
    let fresh = enrolled(&srv, "dev").await;
    agent_certificate(&srv, &fresh.client(&srv), "dev", None).await.unwrap();
    let (s, e) = agent_certificate(&srv, &first.client(&srv), "dev", None).await.err().unwrap();
    assert_eq!((s, e["code"].as_str()), (401, Some("client-certificate-superseded")), "{e}");
    let v = srv.audit_verify(&srv.database_url());
    assert!(v.status.success(), "{}", stderr(&v));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_ca_registration_arms_an_agent_token_and_plug_in_clusters_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(&tmp.path().join("dev"), &Opts::default());
    srv.wait_ready().await;
    // A plug-in cluster's agent authenticates with the cluster intermediate instead.
    let token = srv.register_approved("east").await;
    let (s, e) = enrol_raw(&srv, "east", &token).await;
    assert_eq!((s, e["code"].as_str()), (409, Some("plugin-cluster")), "{e}");
    let (s, e) = enrol_raw(&srv, "nowhere", &token).await;
    assert_eq!((s, e["code"].as_str()), (404, Some("not-found")), "{e}");

    let key = tmp.path().join("edge.key");
    hsm::generate_key(&hsm::KeyRef::file(&key), hsm::KeyAlgorithm::EcdsaP256).unwrap();
    let body = json!({"name": "edge", "environment": "dev", "trust_domain": "cluster.local", "mode": "external-ca",
                      "key": format!("file:{}", key.display()),
                      "istio": {"sa_issuer": "https://edge.k8s.example"}});
    let (s, r) = srv.call("POST", "/v1/clusters", Some(&srv.token("admin")), Some(body)).await;
    assert_eq!(s, 202, "{r}");
    let token = r["enrolment_token"].as_str().expect("an external-CA registration arms the agent's token").to_string();
    assert!(r["enrolment_expires_at"].as_i64().is_some(), "{r}");
    let (s, e) = enrol_raw(&srv, "edge", &token).await;
    assert_eq!((s, e["code"].as_str()), (409, Some("cluster-not-active")), "before approval: {e}");
    let id = r["request_id"].as_str().unwrap();
    let (s, a) = srv.call("POST", &format!("/v1/requests/{id}/approve"), Some(&srv.token("approver")), None).await;
    assert_eq!(s, 200, "{a}");
    let agent = agent_certificate(&srv, &srv.client, "edge", Some(&token)).await.unwrap();
    // Its certificate acts for its own cluster only.
    let (s, e) =
        post(&agent.client(&srv), &srv, "/v1/clusters/dev/namespace-report", None, json!({"namespaces": {}})).await;
    assert_eq!((s, e["code"].as_str()), (401, Some("client-certificate-rejected")), "{e}");
    let (s, _) =
        post(&agent.client(&srv), &srv, "/v1/clusters/edge/namespace-report", None, json!({"namespaces": {}})).await;
    assert_eq!(s, 200);
    // A cluster intermediate is not an agent certificate.
    let token = srv.register_approved("west").await;
    let west = tmp.path().join("west");
    let o = srv.renew("west", &west, Some(&token), false);
    assert!(o.status.success(), "{}", stderr(&o));
    let c = client(&srv.root(), Some((&west.join("ca-cert.pem"), &west.join("ca-key.pem"))));
    let (s, e) = post(&c, &srv, "/v1/clusters/west/namespace-report", None, json!({"namespaces": {}})).await;
    assert_eq!((s, e["code"].as_str()), (401, Some("client-certificate-rejected")), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_gets_istiods_certificate_and_reports_namespaces() {
    let tmp = tempfile::tempdir().unwrap();
    // On PostgreSQL (the other tests here run on SQLite).
    let opts = Opts { database_url: backend_url("postgres").await, ..Opts::default() };
    let srv = Server::start(&tmp.path().join("dev"), &opts);
    srv.wait_ready().await;
    let agent = enrolled(&srv, "dev").await;
    let c = agent.client(&srv);

    // istiod's serving certificate over agent mTLS, no token: only the configured names.
    let body = json!({"csr": csr_pem(), "dns_names": ["istiod.istio-system.svc"], "validity": "30d"});
    let (s, r) = post(&c, &srv, "/v1/clusters/dev/server-certificates", None, body.clone()).await;
    assert_eq!(s, 200, "{r}");
    assert!(text_of(r["certificate"].as_str().unwrap()).contains("DNS:istiod.istio-system.svc"));
    let serial = r["serial"].as_str().unwrap().to_string();
    let bad = json!({"csr": csr_pem(), "dns_names": ["istiod.istio-system.svc", "evil.example.com"]});
    let (s, e) = post(&c, &srv, "/v1/clusters/dev/server-certificates", None, bad).await;
    assert_eq!((s, e["code"].as_str()), (403, Some("name-not-allowed")), "{e}");
    // Neither a token nor a certificate; a token without the admin role.
    let (s, e) = post(&srv.client, &srv, "/v1/clusters/dev/server-certificates", None, body.clone()).await;
    assert_eq!((s, e["code"].as_str()), (401, Some("unauthenticated")), "{e}");
    let (s, e) =
        post(&srv.client, &srv, "/v1/clusters/dev/server-certificates", Some(&srv.token("approver")), body).await;
    assert_eq!((s, e["code"].as_str()), (403, Some("forbidden")), "{e}");
    let audit = audit_all(&srv).await;
    let issued = audit.iter().find(|r| r["action"] == "certificate.issued" && r["subject"] == serial.as_str());
    assert_eq!(issued.map(|r| r["actor"].clone()), Some(json!("agent:dev")), "{audit:#?}");
    let denied = audit.iter().filter(|r| r["action"] == "request.denied" && r["actor"] == "agent:dev");
    assert!(denied.clone().any(|r| r["details"]["code"] == "name-not-allowed"), "the refusal is the agent's");

    // Namespace reports.
    let root = CertInfo::from_der(pem::parse(std::fs::read(srv.root()).unwrap()).unwrap().into_contents()).unwrap();
    let report =
        json!({"namespaces": {"default": [root.fingerprint()], "istio-system": [root.fingerprint()], "new": []}});
    let (s, e) = post(&srv.client, &srv, "/v1/clusters/dev/namespace-report", None, report.clone()).await;
    assert_eq!((s, e["code"].as_str()), (401, Some("unauthenticated")), "{e}");
    let reports = |a: &[Value]| a.iter().filter(|r| r["action"] == "cluster.namespace_report").count();
    let before = reports(&audit_all(&srv).await);
    for _ in 0..2 {
        let (s, r) = post(&c, &srv, "/v1/clusters/dev/namespace-report", None, report.clone()).await;
        assert_eq!(s, 200, "{r}");
        assert_eq!(r["trust_bundle"], json!([root.pem()]), "{r}");
    }
    let after = audit_all(&srv).await;
    assert_eq!(reports(&after), before + 1, "a repeated report is neither written nor audited");
    let rec = after.iter().rev().find(|r| r["action"] == "cluster.namespace_report").unwrap();
    assert_eq!((rec["actor"].as_str(), rec["subject"].as_str()), (Some("agent:dev"), Some("dev")), "{rec}");
    assert_eq!(
        (rec["details"]["namespaces"].as_i64(), rec["details"]["lagging"].as_i64()),
        (Some(3), Some(1)),
        "{rec}"
    );
    for (bad, why) in [
        (json!({"namespaces": {"Not_A_Namespace": []}}), "namespace name"),
        (json!({"namespaces": {"default": ["ABCD"]}}), "fingerprint"),
        (json!({"namespaces": {"default": vec![root.fingerprint(); 17]}}), "at most 16"),
    ] {
        let (s, e) = post(&c, &srv, "/v1/clusters/dev/namespace-report", None, bad).await;
        assert_eq!((s, e["code"].as_str()), (400, Some("invalid-report")), "{e}");
        assert!(e["detail"].as_str().unwrap().contains(why), "{e}");
    }
    let (s, e) = post(&c, &srv, "/v1/clusters/dev/namespace-report", None, json!({"namespace": {}})).await;
    assert_eq!((s, e["code"].as_str()), (400, Some("malformed-json")), "{e}");
    // A large cluster's report fits, though it is far over policy.max_body_bytes.
    let many: serde_json::Map<String, Value> =
        (0..10_000).map(|i| (format!("namespace-{i:05}"), json!([root.fingerprint()]))).collect();
    let (s, r) = post(&c, &srv, "/v1/clusters/dev/namespace-report", None, json!({"namespaces": many})).await;
    assert_eq!(s, 200, "{r}");
}
