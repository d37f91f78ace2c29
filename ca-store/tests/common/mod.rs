//! Databases for storage tests: a fresh SQLite file, or a fresh PostgreSQL database on the
//! server named by PKI_TEST_DATABASE_URL (default: the local test server). A missing
//! PostgreSQL is a failure, never a skip.
#![allow(dead_code)]

use ca_store::Store;

pub const DEFAULT_PG: &str = "postgres://postgres@127.0.0.1:5432/test";

pub fn pg_base_url() -> String {
    std::env::var("PKI_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_PG.to_string())
}

/// Creates an empty database on the test server and returns its URL.
pub async fn fresh_pg_url() -> String {
    let base = pg_base_url();
    let admin = sqlx::PgPool::connect(&base).await.unwrap_or_else(|e| {
        panic!("PostgreSQL at {base} is required for the storage tests (set PKI_TEST_DATABASE_URL): {e}")
    });
    let name = format!("pki_test_{}", hex::encode(rand_bytes()));
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&admin).await.unwrap();
    admin.close().await;
    let (prefix, _) = base.rsplit_once('/').unwrap();
    format!("{prefix}/{name}")
}

fn rand_bytes() -> [u8; 6] {
    let mut b = [0u8; 6];
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let pid = std::process::id() as u128;
    let x = t ^ (pid << 64) ^ (&b as *const _ as usize as u128);
    b.copy_from_slice(&x.to_le_bytes()[..6]);
    b
}

pub struct Db {
    pub url: String,
    pub store: Store,
    _dir: Option<tempfile::TempDir>,
}

pub async fn sqlite() -> Db {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ca.db").display());
    let store = Store::connect(&url, true).await.unwrap();
    Db { url, store, _dir: Some(dir) }
}

pub async fn postgres() -> Db {
    let url = fresh_pg_url().await;
    let store = Store::connect(&url, true).await.unwrap();
    Db { url, store, _dir: None }
}
