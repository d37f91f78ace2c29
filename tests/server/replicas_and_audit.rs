//! Tampering with the audit trail is named; two replicas share one PostgreSQL.

use super::*;

/// Editing, reordering or deleting audit rows is detected and the first bad record named; a
/// chain rewritten with fresh hashes is caught by the signed checkpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tampering_with_the_audit_trail_is_named() {
    for backend in ["sqlite", "postgres"] {
        let tmp = tempfile::tempdir().unwrap();
        let db = backend_url(backend).await;
        // A checkpoint at every round, so that the head is signed before the server stops.
        let opts = Opts {
            database_url: db.clone(),
            env: vec![("CA_SERVER_AUDIT__CHECKPOINT_EVERY".into(), "1".into())],
            ..Default::default()
        };
        let mut srv = Server::start(&tmp.path().join("dev"), &opts);
        srv.wait_ready().await;
        srv.register_approved("t1").await;
        srv.register_approved("t2").await;
        let db_url = db.unwrap_or_else(|| srv.database_url());
        tokio::time::sleep(Duration::from_millis(1500)).await;
        srv.kill();
        let v = srv.audit_verify(&db_url);
        assert!(v.status.success(), "{backend}: {}", stderr(&v));
        let records = audit_records(&db_url).await;
        assert!(records.len() >= 6);
        let verify = |label: &str, want: &str| {
            let v = srv.audit_verify(&db_url);
            assert!(!v.status.success(), "{backend}/{label}: tampering went unnoticed");
            assert!(stderr(&v).contains(want), "{backend}/{label}: want {want:?} in {}", stderr(&v));
        };

        // An edited row.
        exec_dyn(&db_url, "UPDATE audit_log SET details = '{\"cluster\":\"forged\"}' WHERE seq = 3".into()).await;
        verify("altered", "audit record 3 was altered");
        exec_dyn(
            &db_url,
            format!("UPDATE audit_log SET details = '{}' WHERE seq = 3", records[2].details.replace('\'', "''")),
        )
        .await;
        assert!(srv.audit_verify(&db_url).status.success(), "{backend}: restored");

        // Two rows swapped.
        for sql in [
            "UPDATE audit_log SET seq = -1 WHERE seq = 4",
            "UPDATE audit_log SET seq = 4 WHERE seq = 5",
            "UPDATE audit_log SET seq = 5 WHERE seq = -1",
        ] {
            exec_dyn(&db_url, sql.into()).await;
        }
        verify("reordered", "audit record 4 was reordered: it was written as record 5");
        for sql in [
            "UPDATE audit_log SET seq = -1 WHERE seq = 4",
            "UPDATE audit_log SET seq = 4 WHERE seq = 5",
            "UPDATE audit_log SET seq = 5 WHERE seq = -1",
        ] {
            exec_dyn(&db_url, sql.into()).await;
        }
        assert!(srv.audit_verify(&db_url).status.success(), "{backend}: swapped back");

        // A row rewritten together with every hash after it: only a checkpoint can tell.
        let mut prev = records[1].hash.clone();
        for r in &records[2..] {
            let details = if r.seq == 3 { "{\"cluster\":\"forged\"}".to_string() } else { r.details.clone() };
            let hash = ca_core::audit::record_hash(r.seq, r.time, &r.actor, &r.action, &r.subject, &details, &prev);
            exec_dyn(
                &db_url,
                format!(
                    "UPDATE audit_log SET details = '{}', prev_hash = '{prev}', hash = '{hash}' WHERE seq = {}",
                    details.replace('\'', "''"),
                    r.seq
                ),
            )
            .await;
            prev = hash;
        }
        verify("rewritten", "audit checkpoint at record");

        // A deleted row.
        exec_dyn(&db_url, "DELETE FROM audit_log WHERE seq = 2".into()).await;
        verify("deleted", "audit record 2 is missing");
    }
}

/// Two servers on one PostgreSQL issue concurrently: no duplicate serials, no fork in the
/// audit chain, no lost record.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_share_postgres() {
    let tmp = tempfile::tempdir().unwrap();
    let db = fresh_pg_url().await;
    let dir = tmp.path().join("dev");
    let a = Server::start(
        &dir,
        &Opts {
            database_url: Some(db.clone()),
            env: vec![("CA_SERVER_CRL__REFRESH_BEFORE".into(), "30d".into())],
            ..Default::default()
        },
    );
    a.wait_ready().await;
    let b = Server::start(
        &tmp.path().join("b"),
        &Opts {
            database_url: Some(db.clone()),
            config_of: Some(dir.clone()),
            // CRLs due at every tick, so that both replicas would publish if both could.
            env: vec![("CA_SERVER_CRL__REFRESH_BEFORE".into(), "30d".into())],
        },
    );
    b.wait_ready().await;
    let mut serials = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..6 {
        let name = format!("r{i}");
        let token = a.register_approved(&name).await;
        let st = tmp.path().join(format!("st{i}"));
        // Enrol through one replica, then renew alternately through both, all clusters at once.
        let first = if i % 2 == 0 { &a } else { &b };
        assert!(first.renew(&name, &st, Some(&token), false).status.success());
        let mut renewer = Renewer::from_state_dir(&a.root(), &name, &st);
        let urls = [a.url.clone(), b.url.clone()];
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for k in 0..12 {
                got.push(renewer.renew(&urls[k % 2]).await.unwrap());
            }
            got
        }));
    }
    for t in tasks {
        serials.extend(t.await.unwrap());
    }
    let unique: std::collections::HashSet<_> = serials.iter().collect();
    assert_eq!(unique.len(), serials.len(), "duplicate serials");
    assert_eq!(inventory_count(&a).await, serials.len() + 6, "every certificate recorded");
    let issued = issued_records(&audit_actions(&b).await);
    assert_eq!(issued, serials.len() + 6);
    let v = a.audit_verify(&db);
    assert!(v.status.success(), "{}{}", stdout(&v), stderr(&v));
    // Background jobs ran throughout, on one replica at a time: the lease holder (the first
    // one up) published every CRL. Give them a few more rounds (one a second here).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let publishers: std::collections::BTreeSet<String> = audit_actions(&a)
        .await
        .iter()
        .filter(|r| r["action"] == "crl.published")
        .map(|r| r["actor"].as_str().unwrap().to_string())
        .collect();
    let published = audit_actions(&a).await.iter().filter(|r| r["action"] == "crl.published").count();
    assert!(published >= 3, "CRLs were refreshed repeatedly: {published}");
    assert_eq!(publishers.len(), 1, "only one replica ran the jobs: {publishers:?}");
}
