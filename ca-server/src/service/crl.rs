//! CRL publication: one CRL per environment key, each signed by that key.

use base64::Engine;
use ca_core::cert::CertInfo;
use ca_core::validity::{Fit, fit_validity};
use ca_store::{AuditEvent, CertFilter, CertRecord, CrlRecord, now_secs};
use serde_json::json;
use time::OffsetDateTime;

use crate::error::{ErrorCode, ServiceError};
use crate::service::issuer::Issuer;
use crate::service::state::AppState;

/// Where an environment's CRL for one of its keys is stored: under the environment's name for
/// the key it signs with now, under `<environment>@<SHA-256 of the SPKI>` for an earlier one.
pub fn crl_name(environment: &str, key: Option<&str>) -> String {
    match key {
        Some(k) => format!("{environment}@{k}"),
        None => environment.to_string(),
    }
}
/// The keys an environment signed with before its current one (environment rotations, both
/// sides, finished and abandoned ones too), each with its certificate, chain and reference.
pub(crate) async fn earlier_keys(
    state: &AppState,
    issuer: &Issuer,
) -> Result<Vec<(String, CertInfo, Vec<CertInfo>, hsm::KeyRef)>, ServiceError> {
    let parse = |pem: &str| -> Result<CertInfo, ServiceError> {
        ca_core::cert::parse_certs(pem.as_bytes(), "rotation certificate")
            .map_err(ServiceError::internal)?
            .into_iter()
            .next()
            .ok_or_else(|| ServiceError::internal("rotation certificate missing"))
    };
    let current = ca_store::spki_sha256(&issuer.cert.spki_der);
    let mut out: Vec<(String, CertInfo, Vec<CertInfo>, hsm::KeyRef)> = Vec::new();
    for r in state.store.list_rotations(false).await? {
        let spec: crate::service::rotation_record::Spec =
            serde_json::from_str(&r.spec).map_err(ServiceError::internal)?;
        let Some(plan) = spec.environments.get(&issuer.name) else { continue };
        let mut sides = vec![(plan.old_certificate.clone(), plan.old_chain.clone(), plan.old_key.clone())];
        if let Some(c) = &plan.new_certificate {
            sides.push((c.clone(), plan.new_chain.clone(), plan.new_key.clone()));
        }
        for (cert, chain, key) in sides {
            let cert = parse(&cert)?;
            let id = ca_store::spki_sha256(&cert.spki_der);
            if id == current || out.iter().any(|(k, ..)| *k == id) {
                continue;
            }
            let chain = chain.iter().map(|c| parse(c)).collect::<Result<Vec<_>, _>>()?;
            out.push((id, cert, chain, key.parse().map_err(ServiceError::internal)?));
        }
    }
    Ok(out)
}
/// Publishes `issuer`'s CRLs: the one its current key signs, then one per earlier key that
/// still has an unexpired certificate under it. A revocation is listed in the CRL of the key
/// that signed the revoked certificate: a relying party checks a certificate against a CRL
/// from its issuer's key, so a CRL signed by the successor would not be accepted for it.
/// Returns the current key's CRL. An earlier key that cannot be opened is logged and retried
/// at the next publication; it does not hold back the current CRL.
pub async fn publish_crl(
    state: &AppState,
    issuer: &std::sync::Arc<Issuer>,
    actor: &str,
) -> Result<CrlRecord, ServiceError> {
    let earlier = earlier_keys(state, issuer).await?;
    let owner = |pem: &str| -> Option<String> {
        let cert = ca_core::cert::parse_certs(pem.as_bytes(), "stored certificate").ok()?.into_iter().next()?;
        earlier
            .iter()
            .find(|(_, c, ..)| c.public_key().is_ok_and(|k| cert.verify_signed_by(&k).is_ok()))
            .map(|(id, ..)| id.clone())
    };
    let now = now_secs();
    let mut live_under: std::collections::BTreeSet<String> = Default::default();
    if !earlier.is_empty() {
        let filter = CertFilter { issuer: Some(issuer.name.clone()), now, limit: 1_000_000, ..Default::default() };
        for c in state.store.list_certificates(&filter).await?.iter().filter(|c| c.not_after > now) {
            if let Some(id) = owner(&c.pem) {
                live_under.insert(id);
            }
        }
    }
    let current = publish_one(state, issuer, &crl_name(&issuer.name, None), actor, |r| owner(&r.pem).is_none()).await?;
    for (id, cert, chain, key) in earlier.iter().cloned() {
        if !live_under.contains(&id) || cert.not_after.unix_timestamp() <= now {
            continue;
        }
        let old = match Issuer::from_certs(&issuer.name, key, cert, chain) {
            Ok(i) => std::sync::Arc::new(i),
            Err(e) => {
                tracing::error!(issuer = %issuer.name, key = %id, error = %format!("{e:#}"), "earlier key's CRL not published");
                continue;
            }
        };
        match old.reconnect_within(state.hsm_timeout()).await {
            Ok(()) => {}
            Err(_) => {
                tracing::error!(issuer = %issuer.name, key = %id, "earlier key did not open; its CRL is retried at the next publication");
                continue;
            }
        }
        let mine = |r: &CertRecord| owner(&r.pem).as_deref() == Some(id.as_str());
        if let Err(e) = publish_one(state, &old, &crl_name(&issuer.name, Some(&id)), actor, mine).await {
            tracing::error!(issuer = %issuer.name, key = %id, error = %e.detail, "earlier key's CRL not published");
        }
    }
    Ok(current)
}
/// Signs and stores a new CRL under `name` with the next CRL number, listing the issuer's
/// revocations that `mine` selects. The HSM signs outside the write lock; the CRL is stored
/// only if no other CRL or revocation landed meanwhile (then it is made again), so numbers
/// stay increasing and every revocation is listed.
async fn publish_one(
    state: &AppState,
    signer: &std::sync::Arc<Issuer>,
    name: &str,
    actor: &str,
    mine: impl Fn(&CertRecord) -> bool,
) -> Result<CrlRecord, ServiceError> {
    for _ in 0..5 {
        let all = state.store.revoked_by_issuer(&signer.name).await?;
        let revoked: Vec<&CertRecord> = all.iter().filter(|r| mine(r)).collect();
        let number = state.store.get_crl(name).await?.map_or(1, |c| c.number + 1);
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).expect("0 is valid");
        let end = signer.cert.not_after;
        let next =
            fit_validity(end, now, state.config.crl.validity.duration(), Fit::Clamp).map_or(end, |f| f.not_after);
        let mut entries = Vec::new();
        for r in &revoked {
            let serial = ca_core::crl::parse_serial(&r.serial)
                .map_err(|e| ServiceError::internal(format!("stored serial {}: {e}", r.serial)))?;
            entries.push(ca_core::crl::Revocation {
                serial,
                reason: r.revocation_reason.as_deref().and_then(|x| x.parse().ok()),
                revoked_at: OffsetDateTime::from_unix_timestamp(r.revoked_at.unwrap_or(0))
                    .map_err(ServiceError::internal)?,
            });
        }
        let req =
            ca_core::crl::CrlRequest { number: number as u64, this_update: now, next_update: next, revoked: entries };
        let der = signer.with_key(state.hsm_timeout(), move |ca| ca_core::crl::create_crl(ca, &req)).await?;
        let rec = CrlRecord {
            issuer: name.to_string(),
            number,
            this_update: now.unix_timestamp(),
            next_update: next.unix_timestamp(),
            der: base64::engine::general_purpose::STANDARD.encode(&der),
        };
        let mut tx = state.store.write().await?;
        let still_next = tx.get_crl(name).await?.map_or(1, |c| c.number + 1) == number;
        let same_revocations = tx.revoked_by_issuer(&signer.name).await?.len() == all.len();
        if !(still_next && same_revocations) {
            continue;
        }
        tx.put_crl(&rec).await?;
        tx.audit(AuditEvent::new(
            actor,
            "crl.published",
            name,
            json!({"number": number, "revoked": revoked.len(), "next_update": rec.next_update,
                   "key": ca_store::spki_sha256(&signer.cert.spki_der)}),
        ))
        .await?;
        tx.commit().await?;
        return Ok(rec);
    }
    Err(ServiceError::new(ErrorCode::Busy, format!("the CRL of {name} kept changing; try again")))
}

/// The CRL (DER) that `environment`'s current key signs, or with `key` (the SHA-256 of an
/// issuing key's SPKI, hex) the one an earlier key signs. Normally the background job made it
/// at start; until then, it is made here.
pub async fn current_crl(state: &AppState, environment: &str, key: Option<&str>) -> Result<Vec<u8>, ServiceError> {
    let name = environment;
    let issuer = state.issuer(name)?.clone();
    let key = key.map(str::to_ascii_lowercase).filter(|k| *k != ca_store::spki_sha256(&issuer.cert.spki_der));
    if key.as_ref().is_some_and(|k| k.len() != 64 || !k.bytes().all(|b| b.is_ascii_hexdigit())) {
        return Err(ServiceError::new(
            ErrorCode::InvalidQuery,
            "key is the SHA-256 (hex) of the issuing key's SubjectPublicKeyInfo",
        ));
    }
    let stored = crl_name(name, key.as_deref());
    let rec = match state.store.get_crl(&stored).await? {
        Some(r) => r,
        None => {
            let no_crl = |k: &str| {
                ServiceError::not_found(format!(
                    "{name} has no CRL for key {k}: none of its earlier keys with an unexpired certificate has that SPKI"
                ))
            };
            // Only a key the environment had makes this sign anything: an unknown one is
            // answered without touching the HSM.
            if let Some(k) = &key
                && !earlier_keys(state, &issuer).await?.iter().any(|(id, ..)| id == k)
            {
                return Err(no_crl(k));
            }
            let current = publish_crl(state, &issuer, &state.job_actor()).await?;
            match &key {
                None => current,
                Some(k) => state.store.get_crl(&stored).await?.ok_or_else(|| no_crl(k))?,
            }
        }
    };
    base64::engine::general_purpose::STANDARD.decode(&rec.der).map_err(ServiceError::internal)
}
