//! Readiness: the database answers, and every issuer's key answered its last probe.

use std::collections::BTreeMap;

use crate::service::state::AppState;

pub struct Readiness {
    pub database: bool,
    /// Whether each issuer's key answered its last probe.
    pub issuers: BTreeMap<String, bool>,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        self.database && self.issuers.values().all(|v| *v)
    }
}

pub async fn readiness(state: &AppState) -> Readiness {
    let database =
        tokio::time::timeout(std::time::Duration::from_secs(2), state.store.ping()).await.is_ok_and(|r| r.is_ok());
    let issuers = state.issuers.all().iter().map(|i| (i.name.clone(), i.is_healthy())).collect();
    Readiness { database, issuers }
}
