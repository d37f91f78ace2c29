//! Which keys the server certifies, end to end against the real `ca-server --dev` and
//! `ca-cli`: a key revoked for compromise is never certified again (enrolment, renewal,
//! server certificates, external-CA successors, registrations and rotations, `ca-cli sign`),
//! and an external-CA cluster on such a key stops until a cluster rotation; a registration's
//! key is checked as a rotation's is (configured modules only, by public key, one answer for
//! every refusal); two renewals with the same intermediate cannot both win; revocations under
//! an environment's earlier key are published in a CRL that key signs.
#![allow(clippy::disallowed_methods)] // clients and workloads of the test bring throwaway keys

#[path = "server_support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ca_core::cert::{CertInfo, load_cert};
use ca_server::proto::IstioCertificateRequest;
use ca_server::proto::istio_certificate_service_client::IstioCertificateServiceClient;
use serde_json::{Value, json};
use support::*;

/// Asks (admin) and approves (approver) a rotation's next stage.
fn advance(srv: &Server, id: &str, to: &str) {
    let r = json_of(&cli(srv, "admin", &["rotation", "advance", id, "--to", to]));
    json_of(&cli(srv, "approver", &["request", "approve", r["request_id"].as_str().unwrap()]));
}

/// Asks to revoke (admin) and approves (approver).
async fn revoke(srv: &Server, serial: &str, reason: &str) {
    let (s, r) = srv
        .call(
            "POST",
            &format!("/v1/certificates/{serial}/revoke"),
            Some(&srv.token("admin")),
            Some(json!({"reason": reason})),
        )
        .await;
    assert_eq!(s, 202, "{r}");
    let (s, a) = srv
        .call(
            "POST",
            &format!("/v1/requests/{}/approve", r["id"].as_str().unwrap()),
            Some(&srv.token("approver")),
            None,
        )
        .await;
    assert_eq!(s, 200, "{a}");
}

/// Registers (admin) an external-CA cluster with `key`; the raw answer.
async fn register_external(srv: &Server, name: &str, key: &str) -> (u16, Value) {
    let body = json!({"name": name, "environment": "dev", "trust_domain": "cluster.local", "mode": "external-ca",
                      "key": key, "istio": {"sa_issuer": "https://kubernetes.default.svc.cluster.local"}});
    srv.call("POST", "/v1/clusters", Some(&srv.token("admin")), Some(body)).await
}

/// A PEM CSR signed by the PKCS#8 key in `key_pem`.
fn csr_of(key_pem: &str) -> String {
    let kp = rcgen::KeyPair::from_pem(key_pem).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name.push(rcgen::DnType::CommonName, "test");
    p.serialize_request(&kp).unwrap().pem().unwrap()
}

fn spki_sha256_of_key(key_pem: &str) -> String {
    let kp = rcgen::KeyPair::from_pem(key_pem).unwrap();
    ca_store::spki_sha256(&rcgen::PublicKeyData::subject_public_key_info(&kp))
}

/// One Istio CreateCertificate for the dev cluster.
async fn grpc_issue(srv: &Server) -> Result<Vec<String>, tonic::Status> {
    let mut req = tonic::Request::new(IstioCertificateRequest { csr: csr_pem(), validity_duration: 0, metadata: None });
    req.metadata_mut().insert("authorization", format!("Bearer {}", srv.env["CA_EXAMPLE_TOKEN"]).parse().unwrap());
    req.metadata_mut().insert("clusterid", "dev".parse().unwrap());
    IstioCertificateServiceClient::new(grpc_channel(srv, "").await)
        .create_certificate(req)
        .await
        .map(|r| r.into_inner().cert_chain)
}

async fn cluster(srv: &Server, name: &str) -> Value {
    let (s, c) = srv.call("GET", &format!("/v1/clusters/{name}"), Some(&srv.token("auditor")), None).await;
    assert_eq!(s, 200, "{c}");
    c
}

/// The state `ca-cli status` shows for a cluster.
fn fleet_state(srv: &Server, name: &str) -> String {
    let v = json_of(&cli(srv, "auditor", &["status"]));
    let row = v["items"].as_array().unwrap().iter().find(|r| r["name"] == name && r["kind"] == "cluster").cloned();
    row.unwrap_or_else(|| panic!("no {name} in {v}"))["state"].as_str().unwrap().to_string()
}

/// The key of the dev environment as configured (`[[issuers]] key`).
fn env_key_ref(srv: &Server) -> String {
    let config = std::fs::read_to_string(srv.dir.join("config.toml")).unwrap();
    let issuers = config.split("[[issuers]]").nth(1).unwrap();
    let line = issuers.lines().find(|l| l.starts_with("key = ")).unwrap();
    line.trim_start_matches("key = ").trim_matches('"').to_string()
}

/// A plug-in cluster enrolled with the real `ca-cli cluster renew`; its state directory.
async fn enrolled(srv: &Server, name: &str, tmp: &Path) -> PathBuf {
    let token = srv.register_approved(name).await;
    let state = tmp.join(name);
    let o = srv.renew(name, &state, Some(&token), false);
    assert!(o.status.success(), "{}", stderr(&o));
    state
}

/// A key-compromise revocation blocks the key: nothing certifies it again, wherever it comes
/// from; the external-CA cluster whose key it was stops (UNAVAILABLE, no successor,
/// `key-compromised` in `ca-cli status`) until a cluster rotation brings a new key; other
/// reasons still get a successor.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_compromised_key_is_never_certified_again() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(&tmp.path().join("dev"), &Opts::default());
    srv.wait_ready().await;
    let east = enrolled(&srv, "east", tmp.path()).await;
    let stolen = std::fs::read_to_string(east.join("ca-key.pem")).unwrap();
    let stolen_hash = spki_sha256_of_key(&stolen);
    let serial = cluster(&srv, "east").await["current_serial"].as_str().unwrap().to_string();
    revoke(&srv, &serial, "key-compromise").await;

    // The block is recorded with the revocation, under its audit record.
    let (_, audit) = srv.call("GET", "/v1/audit?limit=1000", Some(&srv.token("auditor")), None).await;
    let rec = audit.as_array().unwrap().iter().find(|r| r["action"] == "certificate.revoked" && r["subject"] == serial);
    assert_eq!(rec.unwrap()["details"]["blocked_key"], stolen_hash, "{audit}");

    // Enrolment: east enrols again (two operators) and may not bring the stolen key back.
    let (s, r) = srv.call("POST", "/v1/clusters/east/enrolment", Some(&srv.token("admin")), None).await;
    assert_eq!(s, 202, "{r}");
    let token = r["enrolment_token"].as_str().unwrap().to_string();
    let (s, a) = srv
        .call(
            "POST",
            &format!("/v1/requests/{}/approve", r["request_id"].as_str().unwrap()),
            Some(&srv.token("approver")),
            None,
        )
        .await;
    assert_eq!(s, 200, "{a}");
    let enrol = |csr: String| {
        let (c, url, token) = (srv.client.clone(), format!("{}/v1/clusters/east/intermediate", srv.url), token.clone());
        async move {
            let r = c.post(url).bearer_auth(token).json(&json!({"csr": csr})).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (s, r) = enrol(csr_of(&stolen)).await;
    assert_eq!((s, r["code"].as_str()), (400, Some("key-blocked")), "{r}");
    assert!(r["detail"].as_str().unwrap().contains(&serial), "names the revoked certificate: {r}");
    let (fresh_csr, fresh) = csr_with_key();
    let (s, r) = enrol(fresh_csr).await;
    assert_eq!(s, 200, "a new key enrols with the same token: {r}");

    // Renewal over mTLS with the new intermediate, asking for the stolen key.
    let cert = pem::parse(r["certificate"].as_str().unwrap()).unwrap().into_contents();
    let c = client_der(&srv.root(), Some((&cert, &fresh.serialize_der())));
    let renew = c
        .post(format!("{}/v1/clusters/east/intermediate", srv.url))
        .json(&json!({"csr": csr_of(&stolen)}))
        .send()
        .await
        .unwrap();
    let (s, r) = (renew.status().as_u16(), renew.json::<Value>().await.unwrap());
    assert_eq!((s, r["code"].as_str()), (400, Some("key-blocked")), "{r}");

    // A server certificate for it.
    let body = json!({"csr": csr_of(&stolen), "dns_names": ["istiod.istio-system.svc"]});
    let (s, r) = srv.call("POST", "/v1/clusters/dev/server-certificates", Some(&srv.token("admin")), Some(body)).await;
    assert_eq!((s, r["code"].as_str()), (400, Some("key-blocked")), "{r}");

    // As an external-CA cluster's server-held key, and as a cluster rotation's new key.
    let stolen_ref = format!("file:{}", east.join("ca-key.pem").display());
    let (s, r) = register_external(&srv, "thief", &stolen_ref).await;
    assert_eq!((s, r["code"].as_str()), (400, Some("key-blocked")), "{r}");
    let o = cli(&srv, "admin", &["rotation", "start", "cluster", "--cluster", "dev", "--key", &stolen_ref]);
    assert!(!o.status.success() && stderr(&o).contains("key-blocked"), "{}", stderr(&o));

    // Offline signing, when given the server's database.
    let env_cert = srv.dir.join("hierarchy/environments/dev/environment.pem");
    let sign = |csr: &str, out: &str| {
        let csr_path = tmp.path().join(format!("{out}.csr"));
        std::fs::write(&csr_path, csr).unwrap();
        Command::new(ca_cli_bin())
            .args(["sign", "--profile", "cluster", "--trust-domain", "cluster.local", "--validity", "1d"])
            .arg("--ca-cert")
            .arg(&env_cert)
            .args(["--ca-key", &env_key_ref(&srv), "--database", &srv.database_url()])
            .arg("--csr")
            .arg(&csr_path)
            .arg("--out")
            .arg(tmp.path().join(out))
            .env("SOFTHSM2_CONF", srv.dir.join("hierarchy/softhsm/softhsm2.conf"))
            .output()
            .unwrap()
    };
    let o = sign(&csr_of(&stolen), "stolen.pem");
    assert!(!o.status.success() && stderr(&o).contains("key-blocked"), "{}", stderr(&o));
    assert!(!tmp.path().join("stolen.pem").exists(), "nothing written");
    let o = sign(&csr_pem(), "fresh.pem");
    assert!(o.status.success(), "a fresh key is signed: {}", stderr(&o));

    // The external-CA dev cluster: its intermediate's key is revoked for compromise.
    grpc_issue(&srv).await.expect("dev issues before");
    let compromised = cluster(&srv, "dev").await["current_serial"].as_str().unwrap().to_string();
    revoke(&srv, &compromised, "key-compromise").await;
    let e = grpc_issue(&srv).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("key-compromised"), "{e:?}");
    // Several background rounds (1 s apart here) later, still no successor for that key.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let dev = cluster(&srv, "dev").await;
    assert_eq!(dev["current_serial"], compromised.as_str(), "no successor: {dev}");
    assert_eq!(dev["key_compromised"], true, "{dev}");
    let (_, valid) =
        srv.call("GET", "/v1/certificates?cluster=dev&status=valid", Some(&srv.token("auditor")), None).await;
    assert!(valid.as_array().unwrap().iter().all(|c| c["profile"] != "cluster"), "{valid}");
    assert_eq!(fleet_state(&srv, "dev"), "key-compromised");
    let e = grpc_issue(&srv).await.unwrap_err();
    assert!(e.message().contains("key-compromised"), "{e:?}");

    // A cluster rotation to a new key brings it back.
    let new_key = format!("file:{}", tmp.path().join("dev-2.key").display());
    hsm::generate_key(&new_key.parse().unwrap(), hsm::KeyAlgorithm::EcdsaP256).unwrap();
    let started =
        json_of(&cli(&srv, "admin", &["rotation", "start", "cluster", "--cluster", "dev", "--key", &new_key]));
    json_of(&cli(&srv, "approver", &["request", "approve", started["request_id"].as_str().unwrap()]));
    advance(&srv, started["rotation"].as_str().unwrap(), "reissue");
    let chain = grpc_issue(&srv).await.expect("dev issues under its new key");
    let inter = CertInfo::from_der(pem::parse(&chain[1]).unwrap().into_contents()).unwrap();
    let new_public = hsm::open_signer(&new_key.parse().unwrap()).unwrap().public_key().spki_der().to_vec();
    assert_eq!(inter.spki_der, new_public);
    assert_eq!(cluster(&srv, "dev").await["key_compromised"], false);
    assert_eq!(fleet_state(&srv, "dev"), "ok");

    // Another reason keeps today's behaviour: a successor for the same key.
    revoke(&srv, &inter.serial, "superseded").await;
    let chain = grpc_issue(&srv).await.expect("a successor after a superseded revocation");
    let next = CertInfo::from_der(pem::parse(&chain[1]).unwrap().into_contents()).unwrap();
    assert_ne!(next.serial, inter.serial);
    assert_eq!(next.spki_der, new_public);

    let v = srv.audit_verify(&srv.database_url());
    assert!(v.status.success(), "{}", stderr(&v));
}

/// Registration checks a key as a rotation does: respellings of keys in use (module path,
/// `PKCS11_MODULE`, file path) are the same key; a module the server is not configured with
/// is refused before it is loaded; every refusal but a block is one message that names no
/// path and does not tell whether a file exists; the cause is logged without the PIN.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registration_checks_keys_as_rotations_do() {
    let tmp = tempfile::tempdir().unwrap();
    let module = hsm::softhsm::find_module().expect("SoftHSM2 is installed");
    let opts = Opts { env: vec![("PKCS11_MODULE".into(), module.display().to_string())], ..Opts::default() };
    let dir = tmp.path().join("dev");
    let srv = Server::start(&dir, &opts);
    srv.wait_ready().await;
    let env_key = env_key_ref(&srv);
    let m = module.display().to_string();
    assert!(env_key.starts_with("pkcs11:") && env_key.contains(&format!("module-path={m}")), "{env_key}");
    let (head, file) = m.rsplit_once('/').unwrap();
    let dev_key = std::fs::read_to_string(srv.dir.join("cluster-dev.keyref")).unwrap();
    let not_a_key = tmp.path().join("not-a-key");
    std::fs::write(&not_a_key, "hello").unwrap();
    let other_module = Path::new("/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so");
    assert!(other_module.exists(), "opensc is installed");
    let refused = [
        ("the environment's key, its module path respelled", env_key.replace(&m, &format!("{head}//{file}"))),
        ("the environment's key through PKCS11_MODULE", env_key.replace(&format!("module-path={m}&"), "")),
        ("the environment's key, exactly", env_key.clone()),
        ("the dev cluster's key, respelled", dev_key.replace(&m, &format!("{head}/./{file}"))),
        ("another module", env_key.replace(&m, &other_module.display().to_string())),
        ("the audit key, respelled", format!("file:{}//audit.key", dir.display())),
        ("the TLS key, respelled", format!("file:{}/./server.key", dir.display())),
        ("a missing file", format!("file:{}", tmp.path().join("missing.key").display())),
        ("a file that is no key", format!("file:{}", not_a_key.display())),
    ];
    let mut details = Vec::new();
    for (i, (what, key)) in refused.iter().enumerate() {
        let (s, r) = register_external(&srv, &format!("x{i}"), key).await;
        assert_eq!((s, r["code"].as_str()), (400, Some("invalid-key")), "{what}: {r}");
        let detail = r["detail"].as_str().unwrap().to_string();
        for leak in [tmp.path().to_str().unwrap(), "softhsm", "opensc", "No such file", "missing", "not-a-key"] {
            assert!(!detail.contains(leak), "{what}: {detail:?} reveals {leak:?}");
        }
        details.push(detail);
    }
    details.dedup();
    assert_eq!(details.len(), 1, "one answer for every cause: {details:?}");
    // Each cause is in the server log; the PIN is not.
    let log = std::fs::read_to_string(&srv.stderr_log).unwrap();
    assert!(log.contains("key refused for a new intermediate"), "{log}");
    let pin_file = env_key.split("pin-source=file:").nth(1).unwrap().split('&').next().unwrap();
    let pin = std::fs::read_to_string(pin_file).unwrap();
    assert!(!log.contains(pin.trim()), "the PIN is in the log");
    // A new key of its own is accepted.
    let good = tmp.path().join("good.key");
    hsm::generate_key(&hsm::KeyRef::file(&good), hsm::KeyAlgorithm::EcdsaP256).unwrap();
    let (s, r) = register_external(&srv, "good", &format!("file:{}", good.display())).await;
    assert_eq!(s, 202, "{r}");
    // And then it is in use: respelled, it is refused (before any intermediate exists).
    let (s, r) = register_external(&srv, "again", &format!("file:{}//good.key", tmp.path().display())).await;
    assert_eq!((s, r["code"].as_str()), (400, Some("invalid-key")), "{r}");
}

/// Two renewals presenting the same intermediate at once: one wins, the other is refused
/// (409 renewal-superseded) and nothing it signed is recorded; the cluster's newest
/// intermediate is the winner's. Renewals that do not overlap (the second arrives after the
/// first committed) both succeed, as a retry after a lost response does, so the pair is sent
/// until one overlaps.
async fn concurrent_renewals(backend: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let opts = match backend {
        "postgres" => Opts { database_url: Some(fresh_pg_url().await), ..Opts::default() },
        _ => Opts::default(),
    };
    let srv = Server::start(&tmp.path().join("dev"), &opts);
    srv.wait_ready().await;
    let state = enrolled(&srv, "east", tmp.path()).await;
    let mut holder = Renewer::from_state_dir(&srv.root(), "east", &state);
    let count = |srv: &Server| {
        let (c, url, t) =
            (srv.client.clone(), format!("{}/v1/certificates?cluster=east&limit=1000", srv.url), srv.token("auditor"));
        async move {
            c.get(url).bearer_auth(t).send().await.unwrap().json::<Value>().await.unwrap().as_array().unwrap().len()
        }
    };
    let mut recorded = count(&srv).await;
    for round in 0..30 {
        let attempt = || {
            let (csr, kp) = csr_with_key();
            let c = client_der(&srv.root(), Some((&holder.cert, &holder.key)));
            let url = format!("{}/v1/clusters/east/intermediate", srv.url);
            async move {
                let r = c.post(url).json(&json!({"csr": csr})).send().await.unwrap();
                (r.status().as_u16(), r.json::<Value>().await.unwrap(), kp)
            }
        };
        let (a, b) = tokio::join!(attempt(), attempt());
        let ok: Vec<&(u16, Value, rcgen::KeyPair)> = [&a, &b].into_iter().filter(|r| r.0 == 200).collect();
        let now = count(&srv).await;
        assert_eq!(now, recorded + ok.len(), "round {round}: only answered certificates are recorded");
        recorded = now;
        let current = cluster(&srv, "east").await["current_serial"].as_str().unwrap().to_string();
        let winner = ok.iter().find(|r| r.1["serial"] == current.as_str()).expect("the newest was answered");
        if ok.len() == 1 {
            let loser = if a.0 == 200 { &b } else { &a };
            assert_eq!((loser.0, loser.1["code"].as_str()), (409, Some("renewal-superseded")), "{}", loser.1);
            return;
        }
        assert_eq!(ok.len(), 2, "round {round}: {} / {}", a.1, b.1);
        holder.cert = pem::parse(winner.1["certificate"].as_str().unwrap()).unwrap().into_contents();
        holder.key = winner.2.serialize_der();
    }
    panic!("30 pairs of concurrent renewals never overlapped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_concurrent_renewals_cannot_both_win() {
    concurrent_renewals("sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_concurrent_renewals_cannot_both_win() {
    concurrent_renewals("postgres").await;
}

fn ceremony(dir: &Path, name: &str, yaml: &str, softhsm_conf: &Path) {
    let f = dir.join(name);
    std::fs::write(&f, yaml).unwrap();
    let mut cmd = Command::new(ca_cli_bin());
    cmd.args(["ceremony", "run"]).arg(&f).env("CEREMONY_OPERATOR", "test");
    if softhsm_conf.exists() {
        cmd.env("SOFTHSM2_CONF", softhsm_conf);
    }
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{name}: {}", stderr(&o));
}

/// `openssl verify -crl_check` of `cert` under `chain` (root first, then intermediates) with
/// `crl`: its combined output.
fn openssl_verify(root: &Path, untrusted: &Path, crl: &Path, cert: &Path) -> String {
    let o = Command::new("openssl")
        .arg("verify")
        .arg("-crl_check")
        .arg("-CAfile")
        .arg(root)
        .arg("-untrusted")
        .arg(untrusted)
        .arg("-CRLfile")
        .arg(crl)
        .arg(cert)
        .output()
        .unwrap();
    format!("{}{}", stdout(&o), stderr(&o))
}

/// After an environment rotation, a certificate issued under the old key is revoked. The
/// suspicion was that its revocation only appears in a CRL signed by the new key, which a
/// relying party does not accept for it. Fetched for the old key, the CRL that lists it is
/// signed by the old key, and `openssl verify -crl_check` reports the certificate revoked;
/// the new key's CRL lists only what the new key issued.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revocations_under_an_old_environment_key_are_in_a_crl_it_signs() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(&tmp.path().join("dev"), &Opts::default());
    srv.wait_ready().await;
    let east = enrolled(&srv, "east", tmp.path()).await;
    let old_serial = cluster(&srv, "east").await["current_serial"].as_str().unwrap().to_string();
    let old_env_path = srv.dir.join("hierarchy/environments/dev/environment.pem");
    let old_env = load_cert(&old_env_path).unwrap();

    // An environment rotation to a new key, moved to reissue: the new key signs from now on.
    let cer = tmp.path().join("ceremonies");
    std::fs::create_dir_all(&cer).unwrap();
    let conf = srv.dir.join("hierarchy/softhsm/softhsm2.conf");
    let root_key = std::fs::read_to_string(srv.dir.join("hierarchy/ceremonies/05-environment.yaml"))
        .unwrap()
        .lines()
        .find_map(|l| l.trim().strip_prefix("key: ").map(|k| k.trim_matches('"').to_string()))
        .unwrap();
    let env_key = cer.join("env-2.key");
    let k = env_key.display();
    ceremony(
        &cer,
        "1-key.yaml",
        &format!(
            "ceremony-type: key\nkey: \"file:{k}\"\nalgorithm: ecdsa-p256\noutputs:\n  public-key: env-2.pub.pem\n"
        ),
        &conf,
    );
    ceremony(
        &cer,
        "2-csr.yaml",
        &format!(
            "ceremony-type: csr\nkey: \"file:{k}\"\nsubject: \"CN=Dev Environment CA 2,O=Test\"\noutputs:\n  csr: env-2.csr\n"
        ),
        &conf,
    );
    ceremony(
        &cer,
        "3-int.yaml",
        &format!(
            "ceremony-type: intermediate\nprofile: environment\nissuer:\n  certificate: {}\n  key: \"{root_key}\"\ncsr: env-2.csr\ntrust-domains: [cluster.local]\nvalidity: 3y\noutputs:\n  certificate: env-2.pem\n",
            srv.root().display()
        ),
        &conf,
    );
    let new_env = load_cert(&cer.join("env-2.pem")).unwrap();
    let started = json_of(&cli(
        &srv,
        "admin",
        &[
            "rotation",
            "start",
            "environment",
            "--environment",
            "dev",
            "--certificate",
            cer.join("env-2.pem").to_str().unwrap(),
            "--key",
            &format!("file:{k}"),
        ],
    ));
    json_of(&cli(&srv, "approver", &["request", "approve", started["request_id"].as_str().unwrap()]));
    advance(&srv, started["rotation"].as_str().unwrap(), "reissue");
    let (_, issuers) = srv.call("GET", "/v1/issuers", None, None).await;
    let now_pem = issuers[0]["chain"][0].as_str().unwrap();
    assert_eq!(CertInfo::from_der(pem::parse(now_pem).unwrap().into_contents()).unwrap().der, new_env.der);

    // East renews under the new key; its old intermediate (the old key's) is revoked.
    let mut renewer = Renewer::from_state_dir(&srv.root(), "east", &east);
    let new_serial = renewer.renew(&srv.url).await.unwrap();
    let new_cert = tmp.path().join("east-new.pem");
    std::fs::write(&new_cert, ca_core::cert::to_pem("CERTIFICATE", &renewer.cert)).unwrap();
    revoke(&srv, &old_serial, "cessation-of-operation").await;
    revoke(&srv, &new_serial, "superseded").await;

    let fetch = |key: Option<String>| {
        let c = srv.client.clone();
        let url = match key {
            Some(k) => format!("{}/v1/crl/dev?format=pem&key={k}", srv.url),
            None => format!("{}/v1/crl/dev?format=pem", srv.url),
        };
        async move {
            let r = c.get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.text().await.unwrap()
        }
    };
    let crl_text = |path: &Path| {
        let o = Command::new("openssl").args(["crl", "-noout", "-text", "-in"]).arg(path).output().unwrap();
        stdout(&o).to_uppercase()
    };
    let old_crl = tmp.path().join("old.crl.pem");
    std::fs::write(&old_crl, fetch(Some(ca_store::spki_sha256(&old_env.spki_der))).await).unwrap();
    let new_crl = tmp.path().join("new.crl.pem");
    std::fs::write(&new_crl, fetch(None).await).unwrap();

    // The old key's CRL: issued by the old certificate's subject, signed by its key, listing
    // the old intermediate; the relying party holding the old chain sees it revoked.
    let o = Command::new("openssl")
        .args(["crl", "-noout", "-in"])
        .arg(&old_crl)
        .arg("-CAfile")
        .arg(&old_env_path)
        .output()
        .unwrap();
    assert!(stderr(&o).contains("verify OK") || stdout(&o).contains("verify OK"), "{}", stderr(&o));
    assert!(crl_text(&old_crl).contains(&old_serial.to_uppercase()), "{}", crl_text(&old_crl));
    assert!(!crl_text(&old_crl).contains(&new_serial.to_uppercase()));
    let out = openssl_verify(&srv.root(), &old_env_path, &old_crl, &east.join("ca-cert.pem"));
    assert!(out.contains("certificate revoked"), "{out}");

    // The new key's CRL lists what the new key issued, and says so for its certificate.
    let new_env_path = cer.join("env-2.pem");
    assert!(crl_text(&new_crl).contains(&new_serial.to_uppercase()));
    assert!(!crl_text(&new_crl).contains(&old_serial.to_uppercase()));
    let out = openssl_verify(&srv.root(), &new_env_path, &new_crl, &new_cert);
    assert!(out.contains("certificate revoked"), "{out}");
    // The new key's CRL cannot speak for the old key's certificates.
    let out = openssl_verify(&srv.root(), &old_env_path, &new_crl, &east.join("ca-cert.pem"));
    assert!(!out.contains(": OK"), "{out}");

    // A key the environment never had: 404; not a SHA-256: 400.
    let (s, r) = srv.call("GET", &format!("/v1/crl/dev?key={}", "ab".repeat(32)), None, None).await;
    assert_eq!(s, 404, "{r}");
    let (s, r) = srv.call("GET", "/v1/crl/dev?key=zz", None, None).await;
    assert_eq!((s, r["code"].as_str()), (400, Some("invalid-query")), "{r}");
}
