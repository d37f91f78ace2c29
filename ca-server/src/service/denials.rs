//! The summary of refused unauthenticated requests (counted by `edge`), written to the audit
//! trail once per interval and at shutdown.

use crate::service::state::AppState;

/// Writes the summary of the refusals counted so far, if any.
pub async fn flush(state: &AppState) {
    if let Some(event) = state.edge.take_summary()
        && let Err(e) = state.store.audit(event).await
    {
        tracing::error!(error = %e, "could not audit the summary of refused unauthenticated requests");
    }
}

/// Flushes the summary every `audit.denial_summary_interval` (each replica its own).
pub fn spawn(state: AppState) {
    let every = std::time::Duration::try_from(state.config.audit.denial_summary_interval.duration())
        .unwrap_or(std::time::Duration::from_secs(60));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            flush(&state).await;
            state.edge.prune();
        }
    });
}
