//! Background work. The HSM probe, the expiry gauges and the reload of cluster settings (token
//! validators) run on every replica; CRL refresh and audit checkpoints run on one replica at a
//! time, whichever holds the `jobs` lease.

use std::sync::Arc;
use std::time::Duration;

use ca_store::now_secs;

use crate::metrics::{ClusterLabels, IssuerLabels};
use crate::service::hsm_call::run;
use crate::service::issuer::Issuer;
use crate::service::state::AppState;

const PROBE_EVERY: Duration = Duration::from_secs(2);

pub fn spawn(state: AppState) {
    let s = state.clone();
    tokio::spawn(async move {
        let mut backoff: Vec<Backoff> = s.issuers.all().iter().map(|_| Backoff::default()).collect();
        loop {
            for (issuer, b) in s.issuers.all().iter().zip(backoff.iter_mut()) {
                probe(&s, issuer, b).await;
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
    });
    let s = state.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Err(e) = s.store.checkpoint_wal().await {
                tracing::warn!(error = %e, "WAL checkpoint failed");
            }
        }
    });
    tokio::spawn(async move {
        let interval = state.config.jobs.interval.duration().unsigned_abs();
        loop {
            if let Err(e) = tick(&state).await {
                tracing::warn!(error = %e, "background jobs failed; retrying next round");
            }
            tokio::time::sleep(interval).await;
        }
    });
}

/// Per-issuer probe state: consecutive failures and when to try reconnecting next.
#[derive(Default)]
struct Backoff {
    failures: u32,
    next: Option<std::time::Instant>,
}

/// Checks that the issuer's key answers; reconnects (a fresh login) when it did not, backing
/// off (2 s, 4 s, ... up to 30 s) while it stays away, so that a hanging HSM does not pile up
/// blocked threads.
async fn probe(state: &AppState, issuer: &Arc<Issuer>, backoff: &mut Backoff) {
    let timeout = Duration::from_secs(3);
    let was = issuer.is_healthy();
    if !was && backoff.next.is_some_and(|n| std::time::Instant::now() < n) {
        return;
    }
    let ok = if was && issuer.signer().is_some() {
        let signer = issuer.signer().expect("checked");
        run(timeout, move || signer.signer.random(8)).await.is_ok()
    } else {
        issuer.reconnect_within(timeout).await.is_ok()
    };
    issuer.set_healthy(ok);
    if ok {
        *backoff = Backoff::default();
    } else {
        backoff.failures += 1;
        let delay = Duration::from_secs(2u64.saturating_pow(backoff.failures.min(5)).min(30));
        backoff.next = Some(std::time::Instant::now() + delay);
    }
    state.metrics.hsm_up.get_or_create(&IssuerLabels { issuer: issuer.name.clone() }).set(i64::from(ok));
    if was != ok {
        if ok {
            tracing::info!(issuer = %issuer.name, "issuer key is reachable");
        } else {
            tracing::error!(issuer = %issuer.name, key = %issuer.key_ref, "issuer key is unreachable; not ready");
        }
    }
}

async fn tick(state: &AppState) -> anyhow::Result<()> {
    let expiries = update_gauges(state).await?;
    let now = now_secs();
    let lease_for = 3 * state.config.jobs.interval.duration().whole_seconds().max(1);
    let mut tx = state.store.write().await?;
    let leader = tx.try_lease("jobs", &state.instance, now, now + lease_for).await?;
    tx.commit().await?;
    // Before maintenance: a stage approved on another replica changes the issuers here.
    if let Err(e) = crate::service::rotation::refresh(state).await {
        tracing::warn!(error = %e.detail, "rotation state not applied; retrying next round");
    }
    // Settings changed on another replica (an approval, an agent's key push) apply here now.
    if state.config.istio.is_some() {
        crate::service::cluster_settings::reload_quietly(state).await;
    }
    if let Err(e) = crate::service::external_ca::maintain(state, leader).await {
        tracing::warn!(error = %format!("{e:#}"), "external-CA maintenance failed; retrying next round");
    }
    if !leader {
        return Ok(());
    }
    let refresh_before = state.config.crl.refresh_before.duration().whole_seconds();
    for issuer in &state.issuers.all() {
        if !issuer.is_healthy() {
            continue;
        }
        // Due when missing, close to nextUpdate, or older than the last revocation (a
        // revocation approved while the HSM was away).
        let last_revocation = state.store.last_revocation(&issuer.name).await?;
        let due = match state.store.get_crl(&issuer.name).await? {
            None => true,
            Some(c) => c.next_update - now <= refresh_before || last_revocation.is_some_and(|r| r >= c.this_update),
        };
        if due {
            crate::service::crl::publish_crl(state, issuer, &state.job_actor())
                .await
                .map_err(|e| anyhow::anyhow!("CRL for {}: {}", issuer.name, e.detail))?;
            tracing::info!(issuer = %issuer.name, "CRL refreshed");
        }
    }
    crate::service::checkpoint::maybe_checkpoint(state, false).await?;
    expiry_scan(state, &expiries, now);
    Ok(())
}

/// Warns about clusters whose newest intermediate is close to expiry (a renewal CronJob that
/// stopped working). On the lease holder only, so that the warning is logged once.
fn expiry_scan(state: &AppState, expiries: &[(String, i64)], now: i64) {
    let window = state.config.policy.cluster_validity.duration().whole_seconds() / 4;
    for (cluster, not_after) in expiries {
        if not_after - now < window {
            tracing::warn!(%cluster, expires_in_seconds = not_after - now, "cluster intermediate expires soon; is its renewal job running?");
        }
    }
}

/// Gauges on every replica; returns the cluster expiries for the leader's scan.
async fn update_gauges(state: &AppState) -> anyhow::Result<Vec<(String, i64)>> {
    let now = now_secs();
    for issuer in &state.issuers.all() {
        let labels = IssuerLabels { issuer: issuer.name.clone() };
        state.metrics.issuer_expiry.get_or_create(&labels).set((issuer.cert.not_after.unix_timestamp() - now) as f64);
        if let Some(crl) = state.store.get_crl(&issuer.name).await? {
            state.metrics.crl_age.get_or_create(&labels).set((now - crl.this_update) as f64);
        }
    }
    if let Err(e) = crate::service::rotation::update_gauges(state).await {
        tracing::warn!(error = %e.detail, "rotation gauges not updated");
    }
    let expiries = state.store.cluster_expiries(now).await?;
    for (cluster, not_after) in &expiries {
        state
            .metrics
            .cluster_expiry
            .get_or_create(&ClusterLabels { cluster: cluster.clone() })
            .set((not_after - now) as f64);
    }
    Ok(expiries)
}
