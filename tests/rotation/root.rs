//! A root rotation moves a running mesh without a failed handshake.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotation_moves_a_running_mesh_without_a_failed_handshake() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = Server::start(&tmp.path().join("dev"), &opts());
    srv.wait_ready().await;
    let mut m = mesh(&srv, tmp.path()).await;
    let old_root = load_cert(&srv.root()).unwrap();

    // The offline part: a new root and the environment cross-certified under it.
    let (root_b, env_under_b) = new_root_and_cross_signed_environment(&srv, tmp.path());
    let new_root = load_cert(&root_b).unwrap();
    m.extra_roots = new_root.pem();

    let started = json_of(&cli(&srv, "admin", &["rotation", "start", "root", "--new-root", root_b.to_str().unwrap()]));
    let id = started["rotation"].as_str().unwrap().to_string();
    // Nothing exists until a second operator approves.
    assert!(!cli(&srv, "auditor", &["rotation", "status", &id]).status.success());
    json_of(&cli(&srv, "approver", &["request", "approve", started["request_id"].as_str().unwrap()]));
    // One root rotation at a time.
    let again = cli(&srv, "admin", &["rotation", "start", "root", "--new-root", root_b.to_str().unwrap()]);
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
        &["rotation", "certificate", &id, "--environment", "dev", "--certificate", root_b.to_str().unwrap()],
    );
    assert!(stderr(&wrong).contains("subject and key"), "{}", stderr(&wrong));
    json_of(&cli(
        &srv,
        "admin",
        &["rotation", "certificate", &id, "--environment", "dev", "--certificate", env_under_b.to_str().unwrap()],
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
