//! Key operations run on a blocking thread under a time limit: a PKCS#11 call may hang on a
//! dead device, and neither a request nor a background round may hang with it. Every key
//! operation of a request or a background job goes through [`run`] (start-up, which may
//! simply fail, opens the audit key directly); what a failure means (the problem code,
//! whether the issuer is marked unhealthy) stays with the caller, which knows what it asked.

use std::time::Duration;

/// Why a key operation gave no result.
#[derive(Debug)]
pub enum HsmFailure<E> {
    /// No answer within the limit. The blocking thread is left to finish on its own.
    TimedOut,
    /// The operation panicked.
    Panicked(tokio::task::JoinError),
    /// The operation returned an error.
    Failed(E),
}

/// Runs `f` on a blocking thread and waits at most `timeout` for it.
pub async fn run<T, E>(timeout: Duration, f: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, HsmFailure<E>>
where
    T: Send + 'static,
    E: Send + 'static,
{
    match tokio::time::timeout(timeout, tokio::task::spawn_blocking(f)).await {
        Err(_) => Err(HsmFailure::TimedOut),
        Ok(Err(join)) => Err(HsmFailure::Panicked(join)),
        Ok(Ok(r)) => r.map_err(HsmFailure::Failed),
    }
}

/// Opens `key` (a fresh session) and returns its public key.
pub async fn open_public(timeout: Duration, key: &hsm::KeyRef) -> Result<hsm::PublicKey, HsmFailure<hsm::HsmError>> {
    let key = key.clone();
    run(timeout, move || hsm::open_signer(&key).map(|s| s.public_key().clone())).await
}
