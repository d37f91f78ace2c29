//! Which keys this server may certify.
//!
//! A key given over the API for a new intermediate (an external-CA cluster's server-held key
//! at registration or in a cluster rotation, an environment's new key in an environment
//! rotation) goes through [`check_new_key`], the one place that decides it. Keys revoked for
//! compromise are in `blocked_keys` and are never certified again, whoever asks
//! ([`refuse_blocked`]).

use std::collections::BTreeSet;
use std::path::PathBuf;

use ca_core::cert::CertInfo;
use ca_store::{BlockedKey, Store, Tx, spki_sha256};

use crate::error::{ErrorCode, ServiceError};
use crate::service::hsm_call::{self, HsmFailure};
use crate::service::state::AppState;

/// What the client is told when a new key is refused for anything but a block. One message
/// for every cause, so that the answer tells nothing about the server's files or tokens; the
/// cause goes to the server log.
const REFUSED: &str = "the key cannot be used for a new intermediate here: it must be a file key or a key in a \
                       PKCS#11 module this server is configured with, open, and be in use nowhere else here \
                       (the server log names the cause)";

fn refused(key: &hsm::KeyRef, cause: &str) -> ServiceError {
    // The reference names the PIN's source, never the PIN; the HSM's errors never carry it.
    tracing::warn!(%key, %cause, "key refused for a new intermediate");
    ServiceError::new(ErrorCode::InvalidKey, REFUSED)
}

/// Refused because the key is blocked.
pub fn blocked(b: &BlockedKey) -> ServiceError {
    ServiceError::new(
        ErrorCode::KeyBlocked,
        format!(
            "this public key was revoked for {} (certificate {}) and is never certified again: make a new key",
            b.reason, b.source_serial
        ),
    )
}

/// Refuses a key revoked for compromise.
pub async fn refuse_blocked(store: &Store, spki_der: &[u8]) -> Result<(), ServiceError> {
    match store.blocked_key(&spki_sha256(spki_der)).await? {
        Some(b) => Err(blocked(&b)),
        None => Ok(()),
    }
}

/// As [`refuse_blocked`], under the write lock that records the certificate: a block that
/// committed while the key was being signed for is seen.
pub async fn refuse_blocked_tx(tx: &mut Tx, spki_der: &[u8]) -> Result<(), ServiceError> {
    match tx.blocked_key(&spki_sha256(spki_der)).await? {
        Some(b) => Err(blocked(&b)),
        None => Ok(()),
    }
}

/// A PKCS#11 module as the loader will find it: `module-path`, else `PKCS11_MODULE`, with
/// the file path canonicalised, so that `//`, `..` or a symlink name the same module.
fn module_of(p: &hsm::Pkcs11Ref) -> Option<PathBuf> {
    std::fs::canonicalize(p.module_path().ok()?).ok()
}

/// A reference reduced to what identifies the key: the canonical file, or the canonical module
/// with token and object. `None` when it does not resolve (then only its public key can tell).
fn identity(r: &hsm::KeyRef) -> Option<String> {
    match r {
        hsm::KeyRef::File(p) => std::fs::canonicalize(p).ok().map(|p| format!("file:{}", p.display())),
        hsm::KeyRef::Pkcs11(p) => module_of(p).map(|m| format!("{}\0{}\0{}", m.display(), p.token, p.object)),
    }
}

/// The keys this server was configured with (environments, as configured and as rotated, the
/// audit key and the TLS key): the only source of modules a new key may use.
fn configured_refs(state: &AppState) -> Vec<hsm::KeyRef> {
    let mut refs: Vec<hsm::KeyRef> = state.issuers.all().iter().map(|i| i.key_ref.clone()).collect();
    refs.extend(state.issuers.configured().iter().map(|i| i.key_ref.clone()));
    let named = state.config.issuers.iter().map(|i| &i.key).chain([&state.config.audit.key, &state.config.tls.key]);
    refs.extend(named.filter_map(|k| k.parse().ok()));
    refs
}

async fn open_public(state: &AppState, key: &hsm::KeyRef) -> Result<hsm::PublicKey, String> {
    hsm_call::open_public(state.hsm_timeout(), key).await.map_err(|e| match e {
        HsmFailure::Failed(e) => format!("opening the key: {e}"),
        HsmFailure::Panicked(e) => format!("opening the key: {e}"),
        HsmFailure::TimedOut => "the key did not answer in time".into(),
    })
}

/// The public keys of every environment certificate this server has signed with or will
/// (the configured ones, the current and still-accepted ones, and both sides of every
/// rotation, finished ones included).
async fn environment_spkis(state: &AppState) -> Result<Vec<Vec<u8>>, ServiceError> {
    let mut out = Vec::new();
    for i in state.issuers.all().iter().chain(state.issuers.configured()) {
        out.extend(i.versions().map(|(c, _)| c.spki_der.clone()));
    }
    for r in state.store.list_rotations(false).await? {
        let spec: crate::service::rotation_record::Spec =
            serde_json::from_str(&r.spec).map_err(ServiceError::internal)?;
        for plan in spec.environments.values() {
            for pem in std::iter::once(&plan.old_certificate).chain(&plan.new_certificate) {
                let certs = ca_core::cert::parse_certs(pem.as_bytes(), "rotation certificate")
                    .map_err(|e| ServiceError::internal(format!("rotation {}: {e}", r.id)))?;
                out.extend(certs.into_iter().map(|c| c.spki_der));
            }
        }
    }
    Ok(out)
}

/// A key given over the API for a new intermediate. Its module must be one the server is
/// configured with (compared after resolving `PKCS11_MODULE` and canonicalising the path: a
/// key must not make the CA process load code), and it must open; its public key must be no
/// environment's (rotated ones included), not the audit or TLS key, no cluster's, and not
/// blocked. Returns the public key.
///
/// Refusals other than a block give the client one message ([`REFUSED`]) and log the cause.
pub async fn check_new_key(state: &AppState, key: &hsm::KeyRef) -> Result<hsm::PublicKey, ServiceError> {
    let configured = configured_refs(state);
    let allowed: BTreeSet<PathBuf> = configured
        .iter()
        .filter_map(|r| match r {
            hsm::KeyRef::Pkcs11(q) => module_of(q),
            hsm::KeyRef::File(_) => None,
        })
        .collect();
    let loadable = |r: &hsm::KeyRef| match r {
        hsm::KeyRef::Pkcs11(p) => module_of(p).is_some_and(|m| allowed.contains(&m)),
        hsm::KeyRef::File(_) => true,
    };
    if let hsm::KeyRef::Pkcs11(p) = key {
        match module_of(p) {
            Some(m) if allowed.contains(&m) => {}
            Some(m) => {
                return Err(refused(key, &format!("module {} is not one this server is configured with", m.display())));
            }
            None => return Err(refused(key, "the module does not resolve (no such file, or no PKCS11_MODULE)")),
        }
    }
    // Cheap first: another spelling of a reference in use, before any key is opened.
    let clusters = state.store.list_clusters().await?;
    let mine = identity(key);
    let cluster_refs = clusters.iter().filter_map(|c| c.key_ref.as_deref()?.parse::<hsm::KeyRef>().ok());
    if mine.is_some() && configured.iter().cloned().chain(cluster_refs).any(|r| identity(&r) == mine) {
        return Err(refused(key, "the reference names a key in use here"));
    }
    let public = open_public(state, key).await.map_err(|cause| refused(key, &cause))?;
    refuse_blocked(&state.store, public.spki_der()).await?;

    let mut in_use = environment_spkis(state).await?;
    if let Some(a) = state.audit_signer.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
        in_use.push(a.public_key().spki_der().to_vec());
    }
    if let Ok(tls) = ca_core::cert::load_cert(&state.config.tls.cert) {
        in_use.push(tls.spki_der);
    }
    // Every cluster intermediate ever issued, whatever its state: one key, one cluster.
    let filter = ca_store::CertFilter { now: ca_store::now_secs(), limit: 1_000_000, ..Default::default() };
    for c in state.store.list_certificates(&filter).await?.into_iter().filter(|c| c.profile == "cluster") {
        let certs =
            ca_core::cert::parse_certs(c.pem.as_bytes(), "stored certificate").map_err(ServiceError::internal)?;
        in_use.extend(certs.into_iter().map(|c: CertInfo| c.spki_der));
    }
    if in_use.iter().any(|k| k.as_slice() == public.spki_der()) {
        return Err(refused(key, "the public key is in use here"));
    }
    // Registered clusters with no intermediate yet have no certificate to compare: their keys.
    for c in clusters.iter().filter(|c| c.current_serial.is_none() && c.status != ca_store::ClusterStatus::Rejected) {
        let Some(Ok(r)) = c.key_ref.as_deref().map(str::parse::<hsm::KeyRef>) else { continue };
        // A registration from before modules were checked must not load its module now.
        if !loadable(&r) {
            continue;
        }
        if open_public(state, &r).await.is_ok_and(|p| p.spki_der() == public.spki_der()) {
            return Err(refused(key, &format!("the public key is cluster {}'s", c.name)));
        }
    }
    Ok(public)
}
