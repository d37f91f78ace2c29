//! The server's database, read straight and never changed: the audit trail for
//! `ca-cli audit verify` and the blocked keys for `ca-cli sign --database`.

use anyhow::{Context, Result, bail};
use ca_store::Store;

/// Opens the server's database without migrating or creating it: reading must not change it.
pub async fn open_existing(database: &str) -> Result<Store> {
    if let Some(path) = database.strip_prefix("sqlite://").or_else(|| database.strip_prefix("sqlite:")) {
        let path = path.split('?').next().unwrap_or(path);
        if !std::path::Path::new(path).is_file() {
            bail!("{path}: no such database file");
        }
    }
    Store::connect(database, false).await.with_context(|| format!("opening {}", ca_store::redact_url(database)))
}

/// The block on a key (`ca-cli sign --database`), straight from the server's database.
pub async fn blocked_key(database: &str, spki_sha256: &str) -> Result<Option<ca_store::BlockedKey>> {
    let store = open_existing(database).await?;
    let b = store.blocked_key(spki_sha256).await.context("reading blocked keys")?;
    store.close().await;
    Ok(b)
}
