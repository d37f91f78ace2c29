//! Rotations end to end against the real `ca-server --dev`: a plug-in cluster renewing with
//! the real `ca-cli cluster renew` (istiod's part, signing workloads with the cluster key, is
//! played here), and the external-CA `dev` cluster answered over gRPC. A population of live
//! workloads renews in two halves at every stage, and after each half every workload
//! handshakes with every other (`ca-cli rotation handshakes`: rustls and openssl, real TLS on
//! loopback). Every gate is asked to open too early first and must refuse, naming why.
#![allow(clippy::disallowed_methods)] // clients and workloads of the test bring throwaway keys

#[path = "../server_support/mod.rs"]
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

#[path = "../agent/support.rs"]
mod agent_support;
/// `agent_support` names the server rig by the name the agent tests give it.
mod server_support {
    pub use super::support::*;
}

mod agent;
mod agent_live;
mod intermediate;
mod root;
mod simulation_and_runbooks;

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

/// A new root, and the dev environment certified under it (the offline part of a root
/// rotation): the new root's certificate and the cross-signed environment.
fn new_root_and_cross_signed_environment(srv: &Server, dir: &Path) -> (PathBuf, PathBuf) {
    let cer = dir.join("ceremonies");
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
    (cer.join("root-b.pem"), cer.join("env-under-b.pem"))
}

/// An environment rotation of `dev`, started and approved: a new environment intermediate
/// (a new key) under the same root, made by ceremony in `dir`; the new certificate and the
/// rotation's id.
fn environment_rotation_started(srv: &Server, dir: &Path) -> (CertInfo, String) {
    let cer = dir.join("ceremonies");
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
        srv,
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
    json_of(&cli(srv, "approver", &["request", "approve", started["request_id"].as_str().unwrap()]));
    (env2, id)
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
