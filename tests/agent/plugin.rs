//! Plug-in mode: ca-agent keeps `istio-system/cacerts` current.

use std::time::Duration;

use kube_standin::Kind;

use crate::server_support::{Opts, Server, audit_all};
use crate::support::*;

const CLUSTER: &str = "agent-plugin";

/// Enrols from the token in a Secret, writes a set istiod accepts, reports it, renews at two
/// thirds of the lifetime with a fresh key (through injected 500s and a 409, conditionally on
/// the resourceVersion), keeps the replaced set in `cacerts-previous`, and rolls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plugin_mode_enrols_renews_reports_and_rolls_back() {
    let tmp = tempfile::tempdir().unwrap();
    // Two minutes of life, one of them before issuance (not_before is backdated a minute):
    // renewal is due some 20 s after enrolment.
    let srv = Server::start(
        &tmp.path().join("dev"),
        &Opts { env: vec![("CA_SERVER_POLICY__CLUSTER_VALIDITY".into(), "120s".into())], ..Default::default() },
    );
    let token = srv.register_approved(CLUSTER).await;
    let k = standin(&[]).await;
    let kubeconfig = tmp.path().join("kubeconfig");
    k.write_kubeconfig(&kubeconfig).unwrap();

    // No token yet: the agent waits, says why, and writes nothing.
    let agent = Agent::start(&srv, &kubeconfig, "plugin", CLUSTER, "agent-a", &[]);
    eventually(20, "the missing token to be reported", &[&agent], async || {
        agent.log_text().contains("no enrolment token").then_some(())
    })
    .await;
    assert!(k.get(Kind::Secret, Some("istio-system"), "cacerts").is_none());
    let (code, body) = agent.get("/readyz").await;
    assert_eq!(code, 503, "{body}");

    put_enrolment_token(&k, &token);
    let first = eventually(30, "cacerts", &[&agent], async || secret_data(&k, "istio-system", "cacerts")).await;
    for f in ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"] {
        assert!(first.contains_key(f), "cacerts lacks {f}");
    }
    // What istiod checks: the chain verifies to root-cert.pem (openssl as the independent
    // verifier), and the key is the certificate's.
    assert!(openssl_verifies(tmp.path(), &first["ca-cert.pem"], &first["cert-chain.pem"], &first["root-cert.pem"]));
    let key = hsm::SecretKey::from_pem(&first["ca-key.pem"], "ca-key.pem").unwrap();
    let cert = ca_core::cert::CertInfo::from_der(pem::parse(&first["ca-cert.pem"]).unwrap().into_contents()).unwrap();
    assert_eq!(cert.spki_der, key.public_key().spki_der());
    assert!(cert.is_ca);
    assert_eq!(lease_holder(&k).as_deref(), Some("agent-a"));

    // It reports what it installed, for the rotation gates.
    let first_serial = serial_of(&first["ca-cert.pem"]);
    eventually(20, "a cluster.report audit record", &[&agent], async || {
        audit_all(&srv).await.iter().any(|r| r["action"] == "cluster.report" && r["subject"] == CLUSTER).then_some(())
    })
    .await;
    eventually(20, "/readyz ready", &[&agent], async || {
        let (code, _) = agent.get("/readyz").await;
        (code == 200).then_some(())
    })
    .await;
    let (_, metrics) = agent.get("/metrics").await;
    assert!(metrics.contains("ca_agent_certificate_expiry_timestamp_seconds{object=\"cacerts\"}"), "{metrics}");
    assert!(metrics.contains("ca_agent_last_sync_timestamp_seconds{object=\"cacerts\"}"), "{metrics}");

    // The API server answers the next two writes of cacerts with 500, then one with 409: the
    // agent retries the first, re-reads after the second, and gets there.
    k.fail_next("PUT", "/api/v1/namespaces/istio-system/secrets/cacerts", 500, 2);
    k.fail_next("PUT", "/api/v1/namespaces/istio-system/secrets/cacerts", 409, 1);
    let renewed = eventually(60, "a renewal", &[&agent], async || {
        secret_data(&k, "istio-system", "cacerts").filter(|d| serial_of(&d["ca-cert.pem"]) != first_serial)
    })
    .await;
    assert_ne!(renewed["ca-key.pem"], first["ca-key.pem"], "a fresh key at every renewal");
    assert!(openssl_verifies(
        tmp.path(),
        &renewed["ca-cert.pem"],
        &renewed["cert-chain.pem"],
        &renewed["root-cert.pem"]
    ));
    let previous = secret_data(&k, "istio-system", "cacerts-previous").expect("the replaced set is kept");
    assert_eq!(previous["ca-cert.pem"], first["ca-cert.pem"]);
    assert_eq!(previous["ca-key.pem"], first["ca-key.pem"]);
    // Every replace carried the resourceVersion it read; nothing was ever deleted.
    let puts = writes_to(&k, "PUT", "/api/v1/namespaces/istio-system/secrets/cacerts");
    assert!(!puts.is_empty());
    assert!(puts.iter().all(|b| b["metadata"]["resourceVersion"].as_str().is_some_and(|v| !v.is_empty())), "{puts:?}");
    assert!(k.requests().iter().all(|r| r.method != "DELETE"), "the agent deleted something");

    // Rollback swaps the two Secrets (with the agent stopped, so that it does not renew again).
    let mut agent = agent;
    agent.kill();
    let o = tokio::process::Command::new(ca_agent_bin())
        .args(["rollback", "--mode", "plugin", "--cluster", CLUSTER, "--server", &srv.url, "--ca-root"])
        .arg(srv.root())
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .await
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains(&first_serial));
    let now = secret_data(&k, "istio-system", "cacerts").unwrap();
    let prev = secret_data(&k, "istio-system", "cacerts-previous").unwrap();
    assert_eq!(now["ca-cert.pem"], first["ca-cert.pem"]);
    assert_eq!(prev["ca-cert.pem"], renewed["ca-cert.pem"]);
}

/// Two replicas: one holds the Lease and writes; when it dies the other takes over and keeps
/// the set current. A ca-server outage leaves cacerts as it is, and /readyz and the metrics say
/// so.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_elect_one_leader_and_a_server_outage_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut srv = Server::start(&tmp.path().join("dev"), &Opts::default());
    let token = srv.register_approved("agent-ha").await;
    let k = standin(&[]).await;
    let kubeconfig = tmp.path().join("kubeconfig");
    k.write_kubeconfig(&kubeconfig).unwrap();
    put_enrolment_token(&k, &token);

    let a = Agent::start(&srv, &kubeconfig, "plugin", "agent-ha", "replica-a", &[]);
    let b = Agent::start(&srv, &kubeconfig, "plugin", "agent-ha", "replica-b", &[]);
    let set = eventually(30, "cacerts", &[&a, &b], async || secret_data(&k, "istio-system", "cacerts")).await;
    // Exactly one replica enrolled (the token is single-use: a second enrolment would have
    // failed and been logged).
    let enrolled = [a.log_text(), b.log_text()].iter().filter(|l| l.contains("enrolled:")).count();
    assert_eq!(enrolled, 1);
    eventually(20, "both replicas ready (the standby too, while the API answers)", &[&a, &b], async || {
        let ra = a.get("/readyz").await.0;
        let rb = b.get("/readyz").await.0;
        (ra == 200 && rb == 200).then_some(())
    })
    .await;
    let holder = lease_holder(&k).unwrap();
    let mut agents = vec![("replica-a", a), ("replica-b", b)];
    let idx = agents.iter().position(|(n, _)| *n == holder).expect("a replica holds the Lease");
    let (_, mut dead) = agents.remove(idx);
    let (alive_name, alive) = agents.remove(0);
    let (_, standby) = alive.get("/readyz").await;
    assert!(standby.contains("standby"), "{standby}");

    // The holder dies; the other takes the Lease once it expires, and carries on.
    dead.kill();
    eventually(20, "the other replica to take the Lease", &[&alive], async || {
        (lease_holder(&k).as_deref() == Some(alive_name)).then_some(())
    })
    .await;
    let alive = &alive;
    let reports_before = k.requests().len();
    eventually(20, "the new leader to read cacerts", &[alive], async || {
        (k.requests().len() > reports_before + 2).then_some(())
    })
    .await;

    // ca-server goes away: nothing is touched, readiness and metrics say why.
    let rv = k.get(Kind::Secret, Some("istio-system"), "cacerts").unwrap()["metadata"]["resourceVersion"].clone();
    srv.kill();
    let body = eventually(20, "/readyz to report the outage", &[alive], async || {
        let (code, body) = alive.get("/readyz").await;
        (code == 503 && body.contains("ca-server")).then_some(body)
    })
    .await;
    assert!(body.contains("left as they are"), "{body}");
    let (_, metrics) = alive.get("/metrics").await;
    assert!(metrics.contains("ca_agent_server_up 0"), "{metrics}");
    assert!(metrics.contains("ca_agent_errors_total{cause=\"server-unreachable\"}"), "{metrics}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = k.get(Kind::Secret, Some("istio-system"), "cacerts").unwrap();
    assert_eq!(after["metadata"]["resourceVersion"], rv, "cacerts changed during the outage");
    assert_eq!(secret_data(&k, "istio-system", "cacerts").unwrap(), set);
    assert!(k.requests().iter().all(|r| r.method != "DELETE"));
}
