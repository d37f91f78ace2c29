//! Intermediate rotations keep the mesh connected and are gated.

use super::*;

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
    let (env2, id) = environment_rotation_started(&srv, tmp.path());
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
