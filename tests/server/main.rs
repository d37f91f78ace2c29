//! ca-server end to end: the real binary on loopback with SoftHSM2 (its --dev setup), on
//! SQLite and on PostgreSQL, driven over HTTPS and by the real `ca-cli`.
#![allow(clippy::disallowed_methods)] // clients and workloads of the test bring throwaway keys

#[path = "../server_support/mod.rs"]
mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use support::*;

mod agent;
mod bad_input;
mod lifecycle;
mod replicas_and_audit;
mod resilience;

async fn backend_url(backend: &str) -> Option<String> {
    match backend {
        "sqlite" => None,
        _ => Some(fresh_pg_url().await),
    }
}

fn openssl(args: &[&str]) -> std::process::Output {
    Command::new("openssl").args(args).output().unwrap()
}

async fn audit_actions(srv: &Server) -> Vec<Value> {
    let (s, v) = srv.call("GET", "/v1/audit?after=0&limit=1000", Some(&srv.token("auditor")), None).await;
    assert_eq!(s, 200, "{v}");
    v.as_array().unwrap().clone()
}

/// Certificates in the inventory, leaving out those of the external-CA cluster `dev` that every
/// --dev server sets up for itself (its intermediate and the gRPC serving certificates).
async fn inventory_count(srv: &Server) -> usize {
    let (s, v) = srv.call("GET", "/v1/certificates?limit=1000", Some(&srv.token("auditor")), None).await;
    assert_eq!(s, 200, "{v}");
    v.as_array().unwrap().iter().filter(|c| c["cluster"] != "dev").count()
}

/// `certificate.issued` audit records, leaving out the dev cluster's own (see inventory_count).
fn issued_records(records: &[Value]) -> usize {
    records.iter().filter(|r| r["action"] == "certificate.issued" && r["details"]["cluster"] != "dev").count()
}

fn s_(p: &Path) -> &str {
    p.to_str().unwrap()
}

async fn audit_records(url: &str) -> Vec<ca_core::audit::AuditRecord> {
    let store = ca_store::Store::connect(url, false).await.unwrap();
    let r = store.audit_after(0, 100_000).await.unwrap();
    store.close().await;
    r
}

async fn exec_dyn(url: &str, sql: String) {
    if url.starts_with("sqlite") {
        let pool = sqlx::SqlitePool::connect(url).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await.unwrap();
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await.unwrap();
        pool.close().await;
    }
}

async fn exec(url: &str, sql: &'static str) {
    if url.starts_with("sqlite") {
        let pool = sqlx::SqlitePool::connect(url).await.unwrap();
        sqlx::query(sql).execute(&pool).await.unwrap();
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        sqlx::query(sql).execute(&pool).await.unwrap();
        pool.close().await;
    }
}
