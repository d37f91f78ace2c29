//! One conformance suite, run against SQLite and PostgreSQL.

mod common;

use ca_core::audit::verify_chain;
use ca_store::{
    ApprovalRequest, AuditEvent, BlockedKey, CertFilter, CertIssuer, CertRecord, ClusterMode, ClusterRecord,
    ClusterReport, ClusterSettingsRecord, ClusterStatus, CrlRecord, RequestStatus, RotationRecord, Store, StoreError,
    WorkloadRecord, now_secs, spki_sha256,
};
use serde_json::json;

fn cert(serial: &str, cluster: &str, not_after: i64) -> CertRecord {
    CertRecord {
        serial: serial.into(),
        issuer: CertIssuer::Environment("prod".into()),
        cluster: Some(cluster.into()),
        profile: "cluster".into(),
        subject: format!("CN={cluster}"),
        sans: "[\"spiffe://prod.example.com\"]".into(),
        not_before: now_secs() - 60,
        not_after,
        fingerprint: format!("fp-{serial}"),
        requester: "cluster:".to_string() + cluster,
        pem: "-----BEGIN CERTIFICATE-----\n...".into(),
        issued_at: now_secs(),
        revoked_at: None,
        revocation_reason: None,
    }
}

async fn inventory_and_revocation(s: &Store) {
    let now = now_secs();
    let mut tx = s.write().await.unwrap();
    tx.insert_certificate(&cert("0a", "c1", now + 86400 * 30)).await.unwrap();
    tx.insert_certificate(&cert("0b", "c1", now + 3600)).await.unwrap();
    tx.insert_certificate(&cert("0c", "c2", now - 10)).await.unwrap();
    tx.audit(AuditEvent::new("test", "certificate.issued", "0a", json!({}))).await.unwrap();
    tx.commit().await.unwrap();

    let mut tx = s.write().await.unwrap();
    let dup = tx.insert_certificate(&cert("0a", "c1", now)).await.unwrap_err();
    assert!(matches!(dup, StoreError::Conflict(_)), "{dup}");
    drop(tx); // rolled back

    let all = CertFilter { now, limit: 100, ..Default::default() };
    assert_eq!(s.list_certificates(&all).await.unwrap().len(), 3);
    let c1 = CertFilter { cluster: Some("c1".into()), ..all.clone() };
    assert_eq!(s.list_certificates(&c1).await.unwrap().len(), 2);
    let expiring = CertFilter { expiring_within_secs: Some(7200), ..all.clone() };
    let e: Vec<_> = s.list_certificates(&expiring).await.unwrap().into_iter().map(|c| c.serial).collect();
    assert_eq!(e, vec!["0b"]);
    let expired = CertFilter { status: Some("expired".into()), ..all.clone() };
    assert_eq!(s.list_certificates(&expired).await.unwrap()[0].serial, "0c");

    let mut tx = s.write().await.unwrap();
    assert!(tx.revoke_certificate("0a", "key-compromise", now).await.unwrap());
    assert!(!tx.revoke_certificate("0a", "superseded", now).await.unwrap(), "revoking twice is a no-op");
    assert!(!tx.revoke_certificate("ff", "superseded", now).await.unwrap());
    tx.commit().await.unwrap();
    let revoked = CertFilter { status: Some("revoked".into()), ..all.clone() };
    assert_eq!(s.list_certificates(&revoked).await.unwrap()[0].revocation_reason.as_deref(), Some("key-compromise"));
    let valid = CertFilter { status: Some("valid".into()), ..all };
    assert_eq!(s.list_certificates(&valid).await.unwrap().len(), 1);
    assert_eq!(s.revoked_by_issuer("prod").await.unwrap().len(), 1);
    assert_eq!(s.get_certificate_by_fingerprint("fp-0b").await.unwrap().unwrap().serial, "0b");
}

async fn clusters_requests_and_enrolment(s: &Store) {
    let now = now_secs();
    let req = ApprovalRequest {
        id: "r1".into(),
        kind: "register-cluster".into(),
        subject: "c9".into(),
        payload: "{}".into(),
        requested_by: "alice".into(),
        requested_at: now,
        status: RequestStatus::Pending,
        decided_by: None,
        decided_at: None,
    };
    let cl = ClusterRecord {
        name: "c9".into(),
        environment: "prod".into(),
        trust_domain: "prod.example.com".into(),
        status: ClusterStatus::Pending,
        request_id: "r1".into(),
        enrolment_token_hash: Some("h".into()),
        enrolment_expires_at: Some(now + 600),
        enrolled_at: None,
        created_by: "alice".into(),
        created_at: now,
        current_serial: None,
        previous_serial: None,
        mode: ClusterMode::Plugin,
        key_ref: None,
    };
    let mut tx = s.write().await.unwrap();
    tx.insert_request(&req).await.unwrap();
    tx.insert_cluster(&cl).await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = s.write().await.unwrap();
    assert!(matches!(tx.insert_cluster(&cl).await, Err(StoreError::Conflict(_))));
    drop(tx);

    let mut tx = s.write().await.unwrap();
    assert!(!tx.consume_enrolment("c9", "h", now).await.unwrap(), "pending clusters cannot enrol");
    assert!(tx.decide_request("r1", RequestStatus::Approved, "bob", now).await.unwrap());
    assert!(!tx.decide_request("r1", RequestStatus::Rejected, "carol", now).await.unwrap(), "decided once");
    tx.set_cluster_status("c9", ClusterStatus::Active).await.unwrap();
    assert!(!tx.consume_enrolment("c9", "wrong", now).await.unwrap());
    assert!(tx.consume_enrolment("c9", "h", now).await.unwrap());
    assert!(!tx.consume_enrolment("c9", "h", now).await.unwrap(), "single use");
    tx.commit().await.unwrap();
    let mut tx = s.write().await.unwrap();
    tx.set_current("c9", "0abc", Some("0aaa")).await.unwrap();
    tx.commit().await.unwrap();
    let got = s.get_cluster("c9").await.unwrap().unwrap();
    assert_eq!(got.current_serial.as_deref(), Some("0abc"));
    assert_eq!(got.previous_serial.as_deref(), Some("0aaa"));
    assert_eq!(got.enrolled_at, Some(now));
    assert_eq!(got.enrolment_token_hash, None);
    assert_eq!(s.list_requests(Some(RequestStatus::Approved)).await.unwrap().len(), 1);
    assert_eq!(s.get_request("r1").await.unwrap().unwrap().decided_by.as_deref(), Some("bob"));

    // An expired token cannot be spent.
    let mut tx = s.write().await.unwrap();
    let old =
        ClusterRecord { name: "c10".into(), status: ClusterStatus::Active, enrolment_expires_at: Some(now - 1), ..cl };
    tx.insert_cluster(&old).await.unwrap();
    assert!(!tx.consume_enrolment("c10", "h", now).await.unwrap());
    tx.commit().await.unwrap();
}

async fn crls_and_leases(s: &Store) {
    let mut tx = s.write().await.unwrap();
    assert!(tx.get_crl("prod").await.unwrap().is_none());
    tx.put_crl(&CrlRecord { issuer: "prod".into(), number: 1, this_update: 1, next_update: 2, der: "AA==".into() })
        .await
        .unwrap();
    tx.put_crl(&CrlRecord { issuer: "prod".into(), number: 2, this_update: 3, next_update: 4, der: "AQ==".into() })
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(s.get_crl("prod").await.unwrap().unwrap().number, 2);

    let now = now_secs();
    let mut tx = s.write().await.unwrap();
    assert!(tx.try_lease("jobs", "a", now, now + 30).await.unwrap());
    assert!(!tx.try_lease("jobs", "b", now, now + 30).await.unwrap(), "held by a");
    assert!(tx.try_lease("jobs", "a", now, now + 60).await.unwrap(), "a renews");
    assert!(tx.try_lease("jobs", "b", now + 61, now + 90).await.unwrap(), "expired lease moves to b");
    tx.commit().await.unwrap();
}

async fn audit_chain_under_concurrent_writers(s: &Store) {
    let mut handles = Vec::new();
    for w in 0..8 {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..15 {
                s.audit(AuditEvent::new(format!("writer-{w}"), "test.event", format!("{i}"), json!({"w": w, "i": i})))
                    .await
                    .unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let records = s.audit_after(0, 10_000).await.unwrap();
    let n = records.len() as i64;
    assert!(n >= 120);
    assert_eq!(records.first().unwrap().seq, 1);
    assert_eq!(records.last().unwrap().seq, n, "no gaps, no forks");
    let report = verify_chain(records, &[], None).unwrap();
    assert_eq!(report.head_seq, n);
    assert_eq!(s.audit_after(n - 2, 10).await.unwrap().len(), 2, "paging");
}

async fn workload_batches_and_pruning(s: &Store) {
    let now = now_secs();
    let row = |i: usize, not_after: i64| WorkloadRecord {
        serial: format!("{i:034x}"),
        cluster: "c1".into(),
        identity: format!("spiffe://td/ns/a/sa/s{i}"),
        issuer_serial: "aa".into(),
        not_before: now - 60,
        not_after,
        issued_at: now,
        audit_seq: 0,
        der: vec![0x30, i as u8],
    };
    // More than one INSERT chunk (500 rows each), half of them long expired.
    let rows: Vec<WorkloadRecord> =
        (0..1203).map(|i| row(i, if i % 2 == 0 { now - 40 * 86400 } else { now + 3600 })).collect();
    let mut tx = s.write().await.unwrap();
    let rec =
        tx.audit(AuditEvent::new("istio-api", "workload.issued", "batch", json!({"n": rows.len()}))).await.unwrap();
    tx.insert_workload_certificates(&rows, rec.seq).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(s.count_workload_certificates().await.unwrap(), 1203);
    let got = s.get_workload_certificate(&rows[7].serial).await.unwrap().unwrap();
    assert_eq!(got, WorkloadRecord { audit_seq: rec.seq, ..rows[7].clone() }, "round trip, with its audit record");
    // A duplicate serial fails the whole batch: nothing of it is kept.
    let mut tx = s.write().await.unwrap();
    assert!(tx.insert_workload_certificates(&[row(5000, now + 60), rows[1].clone()], rec.seq).await.is_err());
    drop(tx);
    assert!(s.get_workload_certificate(&row(5000, 0).serial).await.unwrap().is_none());
    // Pruning removes exactly those expired before the cut-off.
    let mut tx = s.write().await.unwrap();
    let pruned = tx.prune_workload_certificates(now - 30 * 86400).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(pruned, 602);
    assert_eq!(s.count_workload_certificates().await.unwrap(), 601);
    assert!(s.get_workload_certificate(&rows[0].serial).await.unwrap().is_none());
    assert!(s.get_workload_certificate(&rows[1].serial).await.unwrap().is_some());
}

async fn rotations_reports_and_lagging_workloads(s: &Store) {
    let now = now_secs();
    let rot = |id: &str, stage: &str, at: i64| RotationRecord {
        id: id.into(),
        kind: "root".into(),
        target: "ab".into(),
        stage: stage.into(),
        spec: "{}".into(),
        created_by: "alice".into(),
        created_at: at,
        updated_at: at,
    };
    let mut tx = s.write().await.unwrap();
    tx.insert_rotation(&rot("r1", "done", now - 10)).await.unwrap();
    tx.insert_rotation(&rot("r2", "distribute", now)).await.unwrap();
    assert_eq!(tx.list_active_rotations().await.unwrap().len(), 1);
    // Compare-and-set on the stage: a stale move loses.
    assert!(tx.update_rotation("r2", "distribute", "reissue", "{\"x\":1}", now).await.unwrap());
    assert!(!tx.update_rotation("r2", "distribute", "reissue", "{}", now).await.unwrap());
    tx.commit().await.unwrap();
    let all = s.list_rotations(false).await.unwrap();
    assert_eq!(all.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["r2", "r1"], "newest first");
    assert_eq!(s.list_rotations(true).await.unwrap().len(), 1);
    let r2 = s.get_rotation("r2").await.unwrap().unwrap();
    assert_eq!((r2.stage.as_str(), r2.spec.as_str()), ("reissue", "{\"x\":1}"));

    // A report replaces the cluster's previous one.
    let report = |bundle: &str, at: i64| ClusterReport {
        cluster: "c1".into(),
        bundle: bundle.into(),
        chain: "[]".into(),
        intermediate_serial: "0a".into(),
        reported_at: at,
    };
    let mut tx = s.write().await.unwrap();
    tx.put_cluster_report(&report("[\"o\"]", now - 5)).await.unwrap();
    tx.put_cluster_report(&report("[\"o\",\"n\"]", now)).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(s.cluster_reports().await.unwrap(), vec![report("[\"o\",\"n\"]", now)]);
    assert_eq!(s.get_cluster_report("c1").await.unwrap(), Some(report("[\"o\",\"n\"]", now)));
    assert_eq!(s.get_cluster_report("c2").await.unwrap(), None);

    // Live workload certificates by issue time and by the age of their intermediate.
    let mut tx = s.write().await.unwrap();
    tx.insert_certificate(&CertRecord { issued_at: now - 100, ..cert("i-old", "c1", now + 3600) }).await.unwrap();
    tx.insert_certificate(&CertRecord { issued_at: now, ..cert("i-new", "c1", now + 3600) }).await.unwrap();
    let w = |serial: &str, issuer: &str, issued_at: i64, not_after: i64| WorkloadRecord {
        serial: serial.into(),
        cluster: "c1".into(),
        identity: "spiffe://td/ns/a/sa/b".into(),
        issuer_serial: issuer.into(),
        not_before: issued_at,
        not_after,
        issued_at,
        audit_seq: 0,
        der: vec![0x30],
    };
    let rows = [
        w("w1", "i-old", now - 90, now + 60),
        w("w2", "i-old", now - 90, now - 1),
        w("w3", "i-new", now - 5, now + 60),
        w("w4", "i-new", now - 50, now + 60),
    ];
    let rec = tx.audit(AuditEvent::new("t", "workload.issued", "b", json!({}))).await.unwrap();
    tx.insert_workload_certificates(&rows, rec.seq).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(s.count_workloads_issued_before("c1", now, now - 10).await.unwrap(), 2, "w1 and w4; w2 expired");
    assert_eq!(s.count_workloads_under_intermediates_before("c1", now, now - 10).await.unwrap(), 1, "w1 only");
    assert_eq!(s.count_workloads_issued_before("c2", now, now).await.unwrap(), 0);

    let mut tx = s.write().await.unwrap();
    let live = tx.live_cluster_certificates("c1", now).await.unwrap();
    assert_eq!(live.iter().map(|c| c.serial.as_str()).collect::<Vec<_>>(), ["i-old", "i-new"]);
    tx.revoke_certificate("i-old", "superseded", now).await.unwrap();
    assert_eq!(tx.live_cluster_certificates("c1", now).await.unwrap().len(), 1);
    tx.commit().await.unwrap();
}

/// A revocation for compromise blocks the key in the same transaction: a rolled-back one
/// leaves nothing blocked, a block is seen inside and outside the transaction, and the first
/// block of a key is the one kept.
async fn blocked_keys(s: &Store) {
    let now = now_secs();
    let hash = spki_sha256(b"spki of a stolen key");
    assert_eq!(hash.len(), 64);
    let block = |serial: &str| BlockedKey {
        spki_sha256: hash.clone(),
        reason: "key-compromise".into(),
        source_serial: serial.into(),
        blocked_by: "operator:alice".into(),
        blocked_at: now,
    };
    let mut tx = s.write().await.unwrap();
    tx.insert_certificate(&cert("b1", "c1", now + 3600)).await.unwrap();
    tx.commit().await.unwrap();

    let mut tx = s.write().await.unwrap();
    assert!(tx.revoke_certificate("b1", "key-compromise", now).await.unwrap());
    assert!(tx.block_key(&block("b1")).await.unwrap());
    drop(tx); // rolled back: neither the revocation nor the block happened
    assert_eq!(s.blocked_key(&hash).await.unwrap(), None);
    assert!(s.get_certificate("b1").await.unwrap().unwrap().revoked_at.is_none());

    let mut tx = s.write().await.unwrap();
    assert!(tx.revoke_certificate("b1", "key-compromise", now).await.unwrap());
    assert!(tx.block_key(&block("b1")).await.unwrap());
    assert_eq!(tx.blocked_key(&hash).await.unwrap(), Some(block("b1")), "seen under the write lock");
    assert!(!tx.block_key(&block("b2")).await.unwrap(), "a key is blocked once");
    tx.audit(AuditEvent::new("t", "certificate.revoked", "b1", json!({}))).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(s.blocked_key(&hash).await.unwrap(), Some(block("b1")), "the first block is kept");
    assert_eq!(s.blocked_key(&spki_sha256(b"another key")).await.unwrap(), None);
    assert_eq!(s.list_blocked_keys().await.unwrap(), vec![block("b1")]);
}

/// Cluster settings: written whole, the version grows with every write, and a row needs its
/// cluster.
async fn cluster_settings(s: &Store) {
    let now = now_secs();
    let cl = ClusterRecord {
        name: "x1".into(),
        environment: "prod".into(),
        trust_domain: "prod.example.com".into(),
        status: ClusterStatus::Active,
        request_id: "r-x1".into(),
        enrolment_token_hash: None,
        enrolment_expires_at: None,
        enrolled_at: None,
        created_by: "alice".into(),
        created_at: now,
        current_serial: None,
        previous_serial: None,
        mode: ClusterMode::ExternalCa,
        key_ref: Some("file:/k".into()),
    };
    let mut rec = ClusterSettingsRecord {
        cluster: "x1".into(),
        sa_issuer: "https://kubernetes.default.svc".into(),
        audiences: r#"["istio-ca"]"#.into(),
        trusted_node_accounts: "[]".into(),
        default_ttl: "24h".into(),
        max_ttl: "7d".into(),
        over_max: "reject".into(),
        leeway: "30s".into(),
        server_certificate_names: r#"["istiod.istio-system.svc"]"#.into(),
        oidc_discovery_url: None,
        jwks: None,
        jwks_source: None,
        jwks_updated_at: None,
        previous_jwks: None,
        previous_jwks_until: None,
        version: 0,
        updated_at: now,
        updated_by: "operator:bob".into(),
    };
    let mut tx = s.write().await.unwrap();
    assert!(tx.put_cluster_settings(&rec).await.is_err(), "settings need a registered cluster");
    drop(tx);
    let mut tx = s.write().await.unwrap();
    tx.insert_cluster(&cl).await.unwrap();
    assert_eq!(tx.put_cluster_settings(&rec).await.unwrap(), 1);
    tx.commit().await.unwrap();
    assert_eq!(
        s.get_cluster_settings("x1").await.unwrap().unwrap(),
        ClusterSettingsRecord { version: 1, ..rec.clone() }
    );
    rec.jwks = Some(r#"{"keys":[]}"#.into());
    rec.jwks_source = Some("agent".into());
    rec.previous_jwks_until = Some(now + 3600);
    let mut tx = s.write().await.unwrap();
    assert_eq!(tx.put_cluster_settings(&rec).await.unwrap(), 2);
    assert_eq!(tx.get_cluster_settings("x1").await.unwrap().unwrap().jwks_source.as_deref(), Some("agent"));
    tx.commit().await.unwrap();
    let all = s.list_cluster_settings().await.unwrap();
    assert_eq!(all, vec![ClusterSettingsRecord { version: 2, ..rec }]);
    assert_eq!(s.get_cluster_settings("nobody").await.unwrap(), None);
}

macro_rules! conformance {
    ($($backend:ident),*) => { $(
        mod $backend {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn inventory() { inventory_and_revocation(&common::$backend().await.store).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn clusters() { clusters_requests_and_enrolment(&common::$backend().await.store).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn crls() { crls_and_leases(&common::$backend().await.store).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn audit() { audit_chain_under_concurrent_writers(&common::$backend().await.store).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn workloads() { workload_batches_and_pruning(&common::$backend().await.store).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn rotations() { rotations_reports_and_lagging_workloads(&common::$backend().await.store).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn blocked() { blocked_keys(&common::$backend().await.store).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn settings() { cluster_settings(&common::$backend().await.store).await }
        }
    )* };
}

conformance!(sqlite, postgres);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_postgres_pools_share_one_chain() {
    // Two "replicas": separate pools on one database, writing at once.
    let url = common::fresh_pg_url().await;
    let a = Store::connect(&url, true).await.unwrap();
    let b = Store::connect(&url, true).await.unwrap();
    let mut hs = Vec::new();
    for (i, s) in [a.clone(), b.clone()].into_iter().enumerate() {
        hs.push(tokio::spawn(async move {
            for k in 0..40 {
                s.audit(AuditEvent::new(format!("replica-{i}"), "test", format!("{k}"), json!({}))).await.unwrap();
            }
        }));
    }
    for h in hs {
        h.await.unwrap();
    }
    let records = a.audit_after(0, 1000).await.unwrap();
    assert_eq!(records.len(), 80);
    verify_chain(records, &[], None).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_server_role_may_only_insert_and_select_audit_rows() {
    let url = common::fresh_pg_url().await;
    let owner = Store::connect(&url, true).await.unwrap();
    owner.audit(AuditEvent::new("owner", "test", "x", json!({}))).await.unwrap();
    let db = url.rsplit('/').next().unwrap().to_string();
    let role = format!("{db}_srv");
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE ROLE {role} LOGIN"))).execute(&admin).await.unwrap();
    let grants =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres/roles.sql")).unwrap();
    for stmt in grants
        .split(';')
        .map(|s| s.lines().filter(|l| !l.trim_start().starts_with("--")).collect::<Vec<_>>().join("\n"))
        .filter(|s| !s.trim().is_empty())
    {
        sqlx::query(sqlx::AssertSqlSafe(stmt.replace("ca_server", &role))).execute(&admin).await.unwrap();
    }
    let (prefix, rest) = url.split_once("://").unwrap();
    let host = rest.split_once('@').map_or(rest, |(_, h)| h);
    let role_url = format!("{prefix}://{role}@{host}");
    let srv = Store::connect(&role_url, false).await.unwrap();
    srv.audit(AuditEvent::new("server", "test", "y", json!({}))).await.expect("the server role may append");
    assert_eq!(srv.audit_after(0, 10).await.unwrap().len(), 2, "and read");
    let mut tx = srv.write().await.unwrap();
    let block = BlockedKey {
        spki_sha256: spki_sha256(b"k"),
        reason: "key-compromise".into(),
        source_serial: "01".into(),
        blocked_by: "t".into(),
        blocked_at: 0,
    };
    assert!(tx.block_key(&block).await.expect("the server role may block keys"));
    tx.commit().await.unwrap();
    assert!(srv.blocked_key(&block.spki_sha256).await.unwrap().is_some());
    let pool = sqlx::PgPool::connect(&role_url).await.unwrap();
    for stmt in [
        "UPDATE audit_log SET actor = 'mallory' WHERE seq = 1",
        "DELETE FROM audit_log WHERE seq = 1",
        "TRUNCATE audit_log",
        "UPDATE audit_checkpoints SET hash = 'x'",
        // A compromised key stays blocked: the server may add blocks, never lift one.
        "DELETE FROM blocked_keys",
        "UPDATE blocked_keys SET reason = 'superseded'",
    ] {
        let err = sqlx::query(stmt).execute(&pool).await.unwrap_err();
        assert!(err.to_string().contains("permission denied"), "{stmt}: {err}");
    }
    pool.close().await;
    srv.close().await;
    sqlx::query(sqlx::AssertSqlSafe(format!("REASSIGN OWNED BY {role} TO postgres"))).execute(&admin).await.ok();
}
