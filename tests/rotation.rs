//! Rotations end to end against the real `ca-server --dev`: a plug-in cluster renewing with
//! the real `ca-cli cluster renew` (istiod's part, signing workloads with the cluster key, is
//! played here), and the external-CA `dev` cluster answered over gRPC. A population of live
//! workloads renews in two halves at every stage, and after each half every workload
//! handshakes with every other (`ca-cli rotation handshakes`: rustls and openssl, real TLS on
//! loopback). Every gate is asked to open too early first and must refuse, naming why.

#[path = "server_support/mod.rs"]
mod support;

mod proto {
    tonic::include_proto!("istio.v1.auth");
}

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ca_core::cert::{CertInfo, load_cert, load_certs};
use proto::IstioCertificateRequest;
use proto::istio_certificate_service_client::IstioCertificateServiceClient;
use serde_json::{Value, json};
use support::*;

/// Workload certificate lifetime in this test, and the drain it implies.
const TTL_SECS: i64 = 60;

fn opts() -> Opts {
    Opts {
        env: vec![
            ("CA_SERVER_ROTATION__WORKLOAD_TTL".into(), format!("{TTL_SECS}s")),
            ("CA_SERVER_ROTATION__DRAIN_MARGIN".into(), "2s".into()),
        ],
        ..Opts::default()
    }
}

fn sa_token(srv: &Server, sa: &str) -> String {
    sa_token_with(srv, &srv.dir.join("sa-signing.key"), "default", sa, |_| {})
}

/// A live workload: what it presents and what it trusts, as of its last renewal.
#[derive(Clone)]
struct Held {
    chain: String,
    key: String,
    bundle: String,
}

/// An external-CA workload renewing through Istio's API.
async fn dev_workload(srv: &Server, sa: &str, extra_roots: &str) -> Held {
    let kp = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names =
        vec![rcgen::SanType::URI(format!("spiffe://cluster.local/ns/default/sa/{sa}").try_into().unwrap())];
    let csr = params.serialize_request(&kp).unwrap().pem().unwrap();
    let mut req = tonic::Request::new(IstioCertificateRequest { csr, validity_duration: TTL_SECS, metadata: None });
    req.metadata_mut().insert("authorization", format!("Bearer {}", sa_token(srv, sa)).parse().unwrap());
    req.metadata_mut().insert("clusterid", "dev".parse().unwrap());
    let chain = IstioCertificateServiceClient::new(grpc_channel(srv, extra_roots).await)
        .create_certificate(req)
        .await
        .expect("the dev cluster issues")
        .into_inner()
        .cert_chain;
    let (bundle, certs) = chain.split_last().unwrap();
    Held { chain: certs.concat(), key: kp.serialize_pem(), bundle: bundle.clone() }
}

/// A plug-in workload: istiod signs it with the cluster key from the cacerts files and hands
/// out `cert-chain.pem` and `root-cert.pem`.
fn plugin_workload(state: &Path, sa: &str) -> Held {
    let ca = ca_core::issue::CaIssuer::new(
        load_cert(&state.join("ca-cert.pem")).unwrap(),
        hsm::open_signer(&hsm::KeyRef::file(state.join("ca-key.pem"))).unwrap(),
    )
    .unwrap();
    let td = ca.cert.trust_domains()[0].parse().unwrap();
    let kp = rcgen::KeyPair::generate().unwrap();
    let public = hsm::PublicKey::from_spki_der(&rcgen::PublicKeyData::subject_public_key_info(&kp)).unwrap();
    let nb = ca_core::issue::default_not_before();
    let req = ca_core::profile::CertRequest {
        spiffe_id: Some(ca_core::names::SpiffeId::istio(&td, "default", sa).unwrap()),
        ..ca_core::profile::CertRequest::new(
            ca_core::profile::ProfileKind::Workload,
            rcgen::DistinguishedName::new(),
            public,
            nb,
            time::OffsetDateTime::now_utc() + time::Duration::seconds(TTL_SECS),
        )
    };
    let leaf = ca_core::issue::issue(&ca, &req).unwrap().cert;
    let chain = leaf.pem() + &std::fs::read_to_string(state.join("cert-chain.pem")).unwrap();
    Held { chain, key: kp.serialize_pem(), bundle: std::fs::read_to_string(state.join("root-cert.pem")).unwrap() }
}

struct Mesh<'a> {
    srv: &'a Server,
    east: PathBuf,
    work: PathBuf,
    live: BTreeMap<String, Held>,
    checks: usize,
    /// Roots the test's gRPC client trusts besides the dev root.
    extra_roots: String,
}

impl<'a> Mesh<'a> {
    async fn renew(&mut self, half: &str) {
        for name in [format!("east-{half}"), format!("dev-{half}")] {
            let held = if name.starts_with("east") {
                plugin_workload(&self.east, &name)
            } else {
                dev_workload(self.srv, &name, &self.extra_roots).await
            };
            self.live.insert(name, held);
        }
    }

    fn write(&mut self, live: &BTreeMap<String, Held>) -> PathBuf {
        self.checks += 1;
        let dir = self.work.join(format!("mesh-{}", self.checks));
        for (name, h) in live {
            let d = dir.join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("cert-chain.pem"), &h.chain).unwrap();
            std::fs::write(d.join("key.pem"), &h.key).unwrap();
            std::fs::write(d.join("root-cert.pem"), &h.bundle).unwrap();
        }
        dir
    }

    /// All-pairs handshakes over the live population; returns the failures.
    fn handshakes_of(&mut self, live: &BTreeMap<String, Held>) -> Vec<Value> {
        let dir = self.write(live);
        let out =
            Command::new(ca_cli_bin()).args(["--output", "json", "rotation", "handshakes"]).arg(&dir).output().unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", stderr(&out)));
        assert_eq!(v["handshakes"], json!(live.len() * (live.len() - 1) * 2), "{v}");
        assert_eq!(out.status.success(), v["failures"].as_array().unwrap().is_empty(), "exit status follows failures");
        v["failures"].as_array().unwrap().clone()
    }

    fn assert_all_connect(&mut self, when: &str) {
        let live = self.live.clone();
        let failures = self.handshakes_of(&live);
        assert!(failures.is_empty(), "{when}: {} failed handshakes: {failures:#?}", failures.len());
    }

    /// Both halves renew in turn, with every workload checked after each.
    async fn renew_all(&mut self, when: &str) {
        self.renew("a").await;
        self.assert_all_connect(&format!("{when}, half renewed"));
        self.renew("b").await;
        self.assert_all_connect(&format!("{when}, all renewed"));
    }
}

/// Asks (as admin) to move the rotation on and approves it (as the approver).
fn advance(srv: &Server, id: &str, to: &str) {
    let r = json_of(&cli(srv, "admin", &["rotation", "advance", id, "--to", to]));
    // The one who asked may not approve.
    let own = cli(srv, "admin", &["request", "approve", r["request_id"].as_str().unwrap()]);
    assert!(!own.status.success() && stderr(&own).contains("two-person-rule"), "{}", stderr(&own));
    json_of(&cli(srv, "approver", &["request", "approve", r["request_id"].as_str().unwrap()]));
    let s = json_of(&cli(srv, "auditor", &["rotation", "status", id]));
    assert_eq!(s["stage"], to, "{s}");
}

/// The gate is shut: advancing is refused, naming every reason given.
fn refused(srv: &Server, id: &str, reasons: &[&str]) {
    let o = cli(srv, "admin", &["rotation", "advance", id]);
    let err = stderr(&o);
    assert!(!o.status.success() && err.contains("rotation-blocked"), "{err}");
    for r in reasons {
        assert!(err.contains(r), "missing {r:?} in: {err}");
    }
}

/// Waits until the gate opens (a drain, or old certificates expiring), while the workloads
/// go on renewing at half their lifetime as Istio's agents do, and stay connected.
async fn until_open(m: &mut Mesh<'_>, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(3 * TTL_SECS as u64);
    let mut renewed = Instant::now();
    loop {
        let s = json_of(&cli(m.srv, "auditor", &["rotation", "status", id]));
        if s["blockers"].as_array().unwrap().is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "the gate never opened: {s}");
        if renewed.elapsed() > Duration::from_secs(TTL_SECS as u64 / 3) {
            m.renew_all(&format!("waiting at {}", s["stage"])).await;
            renewed = Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn ceremony(dir: &Path, name: &str, yaml: &str, softhsm_conf: Option<&Path>) {
    let f = dir.join(name);
    std::fs::write(&f, yaml).unwrap();
    let mut cmd = Command::new(ca_cli_bin());
    cmd.args(["ceremony", "run"]).arg(&f).env("CEREMONY_OPERATOR", "test");
    // The dev root's key may be in the dev SoftHSM2 token.
    if let Some(conf) = softhsm_conf.filter(|c| c.exists()) {
        cmd.env("SOFTHSM2_CONF", conf);
    }
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{name}: {}", stderr(&o));
}

fn renew_east(srv: &Server, east: &Path) -> Value {
    let o = Command::new(ca_cli_bin())
        .args(["--output", "json", "cluster", "renew", "--server", &srv.url, "--cluster", "east", "--ca-root"])
        .arg(srv.root())
        .arg("--state-dir")
        .arg(east)
        .output()
        .unwrap();
    json_of(&o)
}

async fn bundle_of(srv: &Server, cluster: &str) -> Vec<String> {
    let pem = srv
        .client
        .get(format!("{}/v1/clusters/{cluster}/trust-bundle", srv.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let certs: Vec<CertInfo> =
        pem::parse_many(&pem).unwrap().into_iter().map(|p| CertInfo::from_der(p.into_contents()).unwrap()).collect();
    certs.iter().map(CertInfo::fingerprint).collect()
}

/// Starts the dev server with a plug-in cluster `east` enrolled and four live workloads.
async fn mesh<'a>(srv: &'a Server, tmp: &Path) -> Mesh<'a> {
    let token = srv.register_approved("east").await;
    let east = tmp.join("east");
    let o = srv.renew("east", &east, Some(&token), false);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut m =
        Mesh { srv, east, work: tmp.join("work"), live: BTreeMap::new(), checks: 0, extra_roots: String::new() };
    m.renew("a").await;
    m.renew("b").await;
    m.assert_all_connect("before any rotation");
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotation_moves_a_running_mesh_without_a_failed_handshake() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(&tmp.path().join("dev"), &opts());
    srv.wait_ready().await;
    let mut m = mesh(&srv, tmp.path()).await;
    let old_root = load_cert(&srv.root()).unwrap();

    // The offline part: a new root and the environment cross-certified under it.
    let cer = tmp.path().join("ceremonies");
    std::fs::create_dir_all(&cer).unwrap();
    let conf = Some(srv.dir.join("hierarchy/softhsm/softhsm2.conf"));
    let key = cer.join("root-b.key");
    ceremony(
        &cer,
        "1-key.yaml",
        &format!(
            "ceremony-type: key\nkey: \"file:{}\"\nalgorithm: ecdsa-p384\noutputs:\n  public-key: root-b.pub.pem\n",
            key.display()
        ),
        conf.as_deref(),
    );
    ceremony(
        &cer,
        "2-root.yaml",
        &format!(
            "ceremony-type: root\nkey: \"file:{}\"\nsubject: \"CN=Dev Root B,O=Test\"\nvalidity: 10y\noutputs:\n  certificate: root-b.pem\n",
            key.display()
        ),
        conf.as_deref(),
    );
    let env_cert = srv.dir.join("hierarchy/environments/dev/environment.pem");
    ceremony(
        &cer,
        "3-cross.yaml",
        &format!(
            "ceremony-type: cross-sign\nissuer:\n  certificate: root-b.pem\n  key: \"file:{}\"\ncertificate: {}\nvalidity: 4y\noutputs:\n  certificate: env-under-b.pem\n",
            key.display(),
            env_cert.display()
        ),
        conf.as_deref(),
    );
    let new_root = load_cert(&cer.join("root-b.pem")).unwrap();
    m.extra_roots = new_root.pem();

    let started = json_of(&cli(
        &srv,
        "admin",
        &["rotation", "start", "root", "--new-root", cer.join("root-b.pem").to_str().unwrap()],
    ));
    let id = started["rotation"].as_str().unwrap().to_string();
    // Nothing exists until a second operator approves.
    assert!(!cli(&srv, "auditor", &["rotation", "status", &id]).status.success());
    json_of(&cli(&srv, "approver", &["request", "approve", started["request_id"].as_str().unwrap()]));
    // One root rotation at a time.
    let again =
        cli(&srv, "admin", &["rotation", "start", "root", "--new-root", cer.join("root-b.pem").to_str().unwrap()]);
    assert!(stderr(&again).contains("rotation-in-progress"), "{}", stderr(&again));

    // distribute: every bundle carries both roots.
    advance(&srv, &id, "distribute");
    assert_eq!(bundle_of(&srv, "east").await, vec![old_root.fingerprint(), new_root.fingerprint()]);
    refused(
        &srv,
        &id,
        &[
            "environment dev has no certificate under the new root",
            "cluster east: has not reported since the stage changed",
            "cluster dev: ",
            "issued before the bundle changed",
        ],
    );
    // A certificate that is not the environment's own key and subject is refused.
    let wrong = cli(
        &srv,
        "admin",
        &[
            "rotation",
            "certificate",
            &id,
            "--environment",
            "dev",
            "--certificate",
            cer.join("root-b.pem").to_str().unwrap(),
        ],
    );
    assert!(stderr(&wrong).contains("subject and key"), "{}", stderr(&wrong));
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
    // The plug-in cluster picks the bundle up on its next run without renewing.
    let r = renew_east(&srv, &m.east);
    assert_eq!((r["renewed"].clone(), r["bundle_updated"].clone()), (json!(false), json!(true)), "{r}");
    assert_eq!(load_certs(&m.east.join("root-cert.pem")).unwrap().len(), 2);
    m.renew_all("distribute").await;
    // The dev cluster's certificates from before the bundle grew must expire first (refused
    // above); the workloads go on renewing meanwhile.
    until_open(&mut m, &id).await;

    // reissue: chains move to the new root.
    advance(&srv, &id, "reissue");
    refused(&srv, &id, &["cluster east: has not"]);
    // No stage can be skipped: retiring now would be the outage shown below.
    let skip = cli(&srv, "admin", &["rotation", "advance", &id, "--to", "retire"]);
    assert!(stderr(&skip).contains("its next stage is drain, not retire"), "{}", stderr(&skip));
    let r = renew_east(&srv, &m.east);
    assert_eq!(r["renewed"], true, "{r}");
    assert!(r["reason"].as_str().unwrap().starts_with("rotation:"), "{r}");
    let chain = load_certs(&m.east.join("cert-chain.pem")).unwrap();
    assert!(chain.iter().any(|c| c.issuer_raw == new_root.subject_raw), "east's chain goes through the new root");
    m.renew("a").await;
    m.assert_all_connect("reissue, half renewed");
    // An agent that still has only the old root (its ConfigMap not yet updated) reaches the
    // CA: the serving certificate keeps a chain to the old root until retire.
    dev_workload(&srv, "old-root-agent", "").await;
    // The outage a premature retire would cause, seen by the same check: the renewed half
    // trusting only the new root while the other half still presents the old chain.
    let mut retired = m.live.clone();
    let only_new = new_root.pem();
    for (name, h) in retired.iter_mut() {
        if name.ends_with("-a") {
            h.bundle = only_new.clone();
        }
    }
    let failures = m.handshakes_of(&retired);
    assert!(!failures.is_empty(), "retiring before the drain must break handshakes");
    assert!(
        failures
            .iter()
            .all(|f| f["client"].as_str().unwrap().ends_with("-b") || f["server"].as_str().unwrap().ends_with("-b")),
        "{failures:#?}"
    );
    m.renew("b").await;
    m.assert_all_connect("reissue, all renewed");

    // drain: waits out the longest workload TTL.
    advance(&srv, &id, "drain");
    refused(&srv, &id, &["draining until"]);
    // The fleet view shows where each environment and cluster stands.
    let fleet = json_of(&cli(&srv, "auditor", &["status"]));
    let items = fleet["items"].as_array().unwrap();
    assert!(items.iter().any(|r| r["kind"] == "environment" && r["rotation"] == "root drain"), "{fleet}");
    assert!(items.iter().any(|r| r["name"] == "east" && r["rotation"] == "root drain (current)"), "{fleet}");
    // And the metrics the example alert rules use (exported while a rotation runs).
    let labels = format!("{{rotation=\"{id}\",kind=\"root\",target=\"{}\"}}", old_root.fingerprint());
    let wanted = [format!("ca_rotation_stage{labels} 3"), format!("ca_rotation_lagging_clusters{labels} 0")];
    let mut metrics = String::new();
    for _ in 0..50 {
        metrics = srv.metrics_text().await;
        if wanted.iter().all(|w| metrics.contains(w.as_str())) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(wanted.iter().all(|w| metrics.contains(w.as_str())), "{wanted:?} in {metrics}");
    let rules = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/alerts.yaml"))
        .unwrap();
    assert!(rules.contains("ca_rotation_lagging_clusters > 0"));
    until_open(&mut m, &id).await;

    // retire: bundles shrink to the new root.
    advance(&srv, &id, "retire");
    assert_eq!(bundle_of(&srv, "east").await, vec![new_root.fingerprint()]);
    refused(&srv, &id, &["cluster east: has not reported since the stage changed"]);
    let r = renew_east(&srv, &m.east);
    assert_eq!(r["bundle_updated"], true, "{r}");
    m.renew_all("retire").await;
    for h in m.live.values() {
        assert_eq!(pem::parse_many(&h.bundle).unwrap().len(), 1, "only the new root is trusted");
    }
    // Rolling a retire back is always safe: the old root comes back into every bundle.
    let back = json_of(&cli(&srv, "admin", &["rotation", "rollback", &id, "--to", "drain"]));
    json_of(&cli(&srv, "approver", &["request", "approve", back["request_id"].as_str().unwrap()]));
    assert_eq!(bundle_of(&srv, "east").await.len(), 2);
    assert_eq!(renew_east(&srv, &m.east)["bundle_updated"], true);
    m.renew_all("rolled back to drain").await;
    advance(&srv, &id, "retire");
    assert_eq!(renew_east(&srv, &m.east)["bundle_updated"], true);
    m.renew_all("retire again").await;
    advance(&srv, &id, "done");
    let status = Command::new(ca_cli_bin())
        .args(["rotation", "status", &id, "--server", &srv.url, "--ca-root"])
        .arg(srv.root())
        .env("CA_TOKEN", srv.token("auditor"))
        .output()
        .unwrap();
    let text = stdout(&status);
    assert!(text.contains("stage: done") && text.contains("finished."), "{text}\n{}", stderr(&status));
    let s = json_of(&cli(&srv, "auditor", &["rotation", "status", &id]));
    assert_eq!(s["history"].as_array().unwrap().len(), 7, "{s}");
    assert!(s["history"].as_array().unwrap().iter().all(|h| h["requested_by"] != h["approved_by"]));

    // Every stage change is in the audit trail, which still verifies.
    let (_, audit) = srv.call("GET", "/v1/audit?limit=1000", Some(&srv.token("auditor")), None).await;
    let stages: Vec<&Value> = audit.as_array().unwrap().iter().filter(|r| r["action"] == "rotation.stage").collect();
    assert_eq!(stages.len(), 7, "{audit}");
    let v = srv.audit_verify(&srv.database_url());
    assert!(v.status.success(), "{}", stderr(&v));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intermediate_rotations_keep_the_mesh_connected_and_are_gated() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(&tmp.path().join("dev"), &opts());
    srv.wait_ready().await;
    let mut m = mesh(&srv, tmp.path()).await;

    // A cluster rotation, external-CA: the server moves the dev cluster to a new key.
    let (_, before) = srv.call("GET", "/v1/clusters/dev", Some(&srv.token("admin")), None).await;
    let old_serial = before["current_serial"].as_str().unwrap().to_string();
    let new_key = format!("file:{}", tmp.path().join("dev-cluster-2.key").display());
    hsm::generate_key(&new_key.parse().unwrap(), hsm::KeyAlgorithm::EcdsaP256).unwrap();
    let plugin_key = cli(&srv, "admin", &["rotation", "start", "cluster", "--cluster", "east", "--key", &new_key]);
    assert!(stderr(&plugin_key).contains("makes its own new key"), "{}", stderr(&plugin_key));
    let started =
        json_of(&cli(&srv, "admin", &["rotation", "start", "cluster", "--cluster", "dev", "--key", &new_key]));
    let id = started["rotation"].as_str().unwrap().to_string();
    json_of(&cli(&srv, "approver", &["request", "approve", started["request_id"].as_str().unwrap()]));
    advance(&srv, &id, "reissue");
    let (_, after) = srv.call("GET", "/v1/clusters/dev", Some(&srv.token("admin")), None).await;
    assert_ne!(after["current_serial"], before["current_serial"], "a new intermediate for the new key");
    m.renew_all("cluster reissue").await;
    advance(&srv, &id, "drain");
    refused(&srv, &id, &["draining until", "still present the old chain"]);
    until_open(&mut m, &id).await;
    advance(&srv, &id, "retire");
    let (_, old) = srv.call("GET", &format!("/v1/certificates/{old_serial}"), Some(&srv.token("admin")), None).await;
    assert_eq!(old["revocation_reason"], "superseded", "{old}");
    // Revoked means retired: it cannot be rolled back.
    let back = cli(&srv, "admin", &["rotation", "rollback", &id]);
    assert!(stderr(&back).contains("cannot roll back"), "{}", stderr(&back));
    advance(&srv, &id, "done");
    m.renew_all("cluster done").await;

    // An environment rotation: a new environment intermediate (new key) under the same root.
    let cer = tmp.path().join("ceremonies");
    std::fs::create_dir_all(&cer).unwrap();
    let conf = Some(srv.dir.join("hierarchy/softhsm/softhsm2.conf"));
    let root_key = std::fs::read_to_string(srv.dir.join("hierarchy/ceremonies/05-environment.yaml"))
        .unwrap()
        .lines()
        .find_map(|l| l.trim().strip_prefix("key: ").map(|k| k.trim_matches('"').to_string()))
        .unwrap();
    let env_key = cer.join("env-2.key");
    ceremony(
        &cer,
        "1-key.yaml",
        &format!(
            "ceremony-type: key\nkey: \"file:{}\"\nalgorithm: ecdsa-p256\noutputs:\n  public-key: env-2.pub.pem\n",
            env_key.display()
        ),
        conf.as_deref(),
    );
    ceremony(
        &cer,
        "2-csr.yaml",
        &format!(
            "ceremony-type: csr\nkey: \"file:{}\"\nsubject: \"CN=Dev Environment CA 2,O=Test\"\noutputs:\n  csr: env-2.csr\n",
            env_key.display()
        ),
        conf.as_deref(),
    );
    ceremony(
        &cer,
        "3-int.yaml",
        &format!(
            "ceremony-type: intermediate\nprofile: environment\nissuer:\n  certificate: {}\n  key: \"{root_key}\"\ncsr: env-2.csr\ntrust-domains: [cluster.local]\nvalidity: 3y\noutputs:\n  certificate: env-2.pem\n",
            srv.root().display()
        ),
        conf.as_deref(),
    );
    let env2 = load_cert(&cer.join("env-2.pem")).unwrap();
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
            &format!("file:{}", env_key.display()),
        ],
    ));
    let id = started["rotation"].as_str().unwrap().to_string();
    json_of(&cli(&srv, "approver", &["request", "approve", started["request_id"].as_str().unwrap()]));
    advance(&srv, &id, "reissue");
    // The plug-in cluster has not moved yet: the next stage waits for it.
    refused(&srv, &id, &["cluster east: has not"]);
    let r = renew_east(&srv, &m.east);
    assert_eq!(r["renewed"], true, "{r}");
    let chain = load_certs(&m.east.join("cert-chain.pem")).unwrap();
    assert!(chain.iter().any(|c| c.der == env2.der), "east's chain goes through the new environment CA");
    m.renew_all("environment reissue").await;
    // Going back: the old intermediate signs again, clusters that moved can still renew (under
    // the new one) and move back; aborting waits until nothing on the new chain is live.
    let back = json_of(&cli(&srv, "admin", &["rotation", "rollback", &id, "--to", "prepared"]));
    json_of(&cli(&srv, "approver", &["request", "approve", back["request_id"].as_str().unwrap()]));
    let r = renew_east(&srv, &m.east);
    assert_eq!(r["renewed"], true, "{r}");
    let chain = load_certs(&m.east.join("cert-chain.pem")).unwrap();
    assert!(!chain.iter().any(|c| c.der == env2.der), "east is back under the old environment CA");
    m.renew_all("environment rolled back").await;
    let abort = cli(&srv, "admin", &["rotation", "rollback", &id, "--to", "aborted"]);
    assert!(stderr(&abort).contains("issued on the abandoned chain may be live"), "{}", stderr(&abort));
    // And forward again.
    advance(&srv, &id, "reissue");
    assert_eq!(renew_east(&srv, &m.east)["renewed"], true);
    m.renew_all("environment reissue again").await;
    advance(&srv, &id, "drain");
    refused(&srv, &id, &["draining until"]);
    until_open(&mut m, &id).await;
    advance(&srv, &id, "retire");
    advance(&srv, &id, "done");
    m.renew_all("environment done").await;
    let (_, issuers) = srv.call("GET", "/v1/issuers", None, None).await;
    let now_pem = issuers[0]["chain"][0].as_str().unwrap();
    assert_eq!(CertInfo::from_der(pem::parse(now_pem).unwrap().into_contents()).unwrap().der, env2.der);

    // Cluster reports are checked: mTLS only, well-formed.
    let (s, p) = srv
        .call(
            "POST",
            "/v1/clusters/east/report",
            None,
            Some(json!({"bundle": ["x"], "chain": ["y"], "intermediate_serial": "1"})),
        )
        .await;
    assert_eq!(s, 401, "{p}");
}

#[test]
fn the_simulation_sees_no_failure_in_a_correct_rotation_and_the_outage_of_an_early_retire() {
    for kind in ["root", "environment", "cluster"] {
        let o = Command::new(ca_cli_bin())
            .args(["--output", "json", "rotation", "simulate", "--kind", kind, "--clusters", "2", "--workloads", "2"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{kind}: {}", stderr(&o));
        let steps: Vec<Value> = serde_json::from_str(&stdout(&o)).unwrap();
        assert!(steps.len() >= 6, "{kind}: {steps:?}");
        for s in &steps {
            assert_eq!(s["handshakes"], json!(4 * 3 * 2), "{kind}: {s}");
            assert!(s["failures"].as_array().unwrap().is_empty(), "{kind}: {s}");
        }
    }
    let o = Command::new(ca_cli_bin())
        .args([
            "--output",
            "json",
            "rotation",
            "simulate",
            "--kind",
            "root",
            "--clusters",
            "2",
            "--workloads",
            "2",
            "--retire-early",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("handshakes failed during the simulated root rotation"), "{}", stderr(&o));
    let steps: Vec<Value> = serde_json::from_str(&stdout(&o)).unwrap();
    for s in &steps {
        let failed = !s["failures"].as_array().unwrap().is_empty();
        // Only once the old root is gone, and on both stacks.
        assert_eq!(failed, s["stage"] == "retire" && s["step"] != "all workloads renewed", "{s}");
        if failed {
            let stacks: std::collections::BTreeSet<&str> =
                s["failures"].as_array().unwrap().iter().map(|f| f["stack"].as_str().unwrap()).collect();
            assert_eq!(stacks.len(), 2, "{s}");
        }
    }
}

/// Every `ca-cli` command in the runbooks exists with the flags it is given, and every stage
/// named with `--to` is a stage.
#[test]
fn the_runbooks_use_commands_that_exist() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/runbooks");
    let stages = ["prepared", "distribute", "reissue", "drain", "retire", "done", "aborted"];
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut in_code = false;
        for line in text.lines() {
            if line.trim_start().starts_with("```") {
                in_code = !in_code;
                continue;
            }
            if !in_code {
                continue;
            }
            for cmd in line.split("&&") {
                let cmd = cmd.split(" #").next().unwrap().trim();
                let Some(rest) = cmd.strip_prefix("ca-cli ") else { continue };
                let tokens: Vec<&str> = rest.split_whitespace().collect();
                let sub: Vec<&str> = tokens
                    .iter()
                    .take_while(|t| {
                        t.chars().next().is_some_and(|c| c.is_ascii_lowercase())
                            && t.chars().all(|c| c.is_ascii_lowercase() || c == '-')
                    })
                    .copied()
                    .collect();
                let o = Command::new(ca_cli_bin()).args(&sub).arg("--help").output().unwrap();
                assert!(o.status.success(), "{}: `{cmd}`: {}", path.display(), stderr(&o));
                let help = stdout(&o);
                for (i, flag) in tokens.iter().enumerate().filter(|(_, t)| t.starts_with("--")) {
                    assert!(
                        help.contains(&format!("{flag} "))
                            || help.contains(&format!("{flag}\n"))
                            || help.contains(&format!("{flag} <")),
                        "{}: `{cmd}`: {flag} is not a flag of `ca-cli {}`",
                        path.display(),
                        sub.join(" ")
                    );
                    if *flag == "--to" {
                        assert!(
                            stages.contains(&tokens[i + 1]),
                            "{}: `{cmd}`: no stage {}",
                            path.display(),
                            tokens[i + 1]
                        );
                    }
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 25, "only {checked} commands found");
}
