//! The in-cluster renewal client behind `ca-cli cluster renew` and `rollback`: runs in the
//! cluster (a CronJob), keeps istiod's `cacerts` files fresh. The state directory follows the
//! kubelet's atomic-writer layout, which istiod already handles for mounted Secrets:
//!
//! ```text
//! DIR/ca-cert.pem      -> ..data/ca-cert.pem      (likewise ca-key.pem, cert-chain.pem, root-cert.pem)
//! DIR/..data           -> ..2026_11_26_14_00_00.123_<serial>
//! DIR/..previous       -> the set before it, for `ca-cli cluster rollback`
//! ```
//!
//! A new set is written completely into its own directory, then `..data` is swapped with one
//! rename, so istiod never sees a mix of old and new files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ca_core::cert::{CertInfo, load_cert, load_certs};
use ca_core::validity::LifeFraction;
use serde::Serialize;
use serde_json::json;
use time::OffsetDateTime;

use crate::api::{IntermediateResponse, Problem, ReportResponse};
use crate::client::tls_config;

pub const FILES: [&str; 4] = ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"];
const DATA: &str = "..data";
const PREVIOUS: &str = "..previous";

pub struct RenewArgs {
    pub server: String,
    pub cluster: String,
    pub state_dir: PathBuf,
    pub ca_root: PathBuf,
    pub force: bool,
    pub enrolment_token: Option<String>,
    /// Fraction of the lifetime after which to renew (before jitter).
    pub renew_after: LifeFraction,
}

/// What a run did (printed as is with `--output json`).
#[derive(Serialize)]
#[serde(untagged)]
pub enum Renewal {
    Renewed {
        /// Always true.
        renewed: bool,
        /// `renewal` or `enrolment`.
        via: &'static str,
        reason: Option<String>,
        serial: String,
        not_after: String,
        state_dir: PathBuf,
    },
    /// Not due: what is installed stays, perhaps with the server's new trust bundle.
    Kept {
        /// Always false.
        renewed: bool,
        bundle_updated: bool,
        serial: String,
        not_after: String,
        renew_after: String,
    },
}

/// What `ca-cli cluster rollback` switched between.
#[derive(Debug, Serialize)]
pub struct RolledBack {
    pub rolled_back_to: PathBuf,
    pub from: PathBuf,
    pub serial: String,
    pub not_after: String,
}

/// The server refused, with its problem code.
#[derive(Debug)]
struct Refused {
    code: String,
    message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Refused {}

/// Refusals after which a renewal credential is useless and only enrolment can help.
const CREDENTIAL_REFUSALS: &[&str] = &[
    "client-certificate-revoked",
    "client-certificate-superseded",
    "client-certificate-expired",
    "client-certificate-rejected",
];

/// Renewal time: after `fraction` of the lifetime, moved by up to ±5% of the lifetime so that
/// many clusters issued together do not all renew in the same minute.
fn renew_at(cert: &CertInfo, fraction: LifeFraction) -> OffsetDateTime {
    let life = (cert.not_after - cert.not_before).as_seconds_f64();
    let mut b = [0u8; 4];
    let _ = getrandom(&mut b);
    let jitter = (u32::from_le_bytes(b) as f64 / u32::MAX as f64 - 0.5) * 0.1;
    cert.not_before + time::Duration::seconds_f64(life * (fraction.as_f64() + jitter).clamp(0.05, 0.95))
}

fn getrandom(b: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(b)
}

pub fn current(state_dir: &Path) -> Result<Option<CertInfo>> {
    let p = state_dir.join("ca-cert.pem");
    if !p.exists() {
        return Ok(None);
    }
    Ok(Some(load_cert(&p).with_context(|| format!("current intermediate {}", p.display()))?))
}

/// The set to authenticate a renewal with: the server accepts only the cluster's newest
/// intermediate, which after a rollback sits in `..previous`.
fn credential(state_dir: &Path, now: OffsetDateTime) -> Result<Option<(CertInfo, PathBuf)>> {
    let mut best: Option<(CertInfo, PathBuf)> = None;
    for set in [state_dir.join(DATA), state_dir.join(PREVIOUS)] {
        let cert = set.join("ca-cert.pem");
        if !cert.exists() {
            continue;
        }
        let c = load_cert(&cert)?;
        if c.not_after > now && best.as_ref().is_none_or(|(b, _)| c.not_before > b.not_before) {
            best = Some((c, set));
        }
    }
    Ok(best)
}

pub async fn renew(a: &RenewArgs) -> Result<Renewal> {
    std::fs::create_dir_all(&a.state_dir).with_context(|| format!("creating {}", a.state_dir.display()))?;
    let state_dir = a.state_dir.canonicalize()?;
    // Two runs at once (an overlapping CronJob, a manual run) would race on ..data.
    let lock =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(state_dir.join(".renew.lock"))?;
    if lock.try_lock().is_err() {
        bail!("another renewal is running in {}", state_dir.display());
    }
    let now = OffsetDateTime::now_utc();
    let cur = current(&state_dir)?;
    let usable = cur.as_ref().filter(|c| c.not_after > now);
    // Every run reports what is installed; the server answers with the trust bundle to hold
    // and whether a rotation wants a new intermediate now.
    let refused_credential =
        |e: &anyhow::Error| e.downcast_ref::<Refused>().is_some_and(|r| CREDENTIAL_REFUSALS.contains(&r.code.as_str()));
    let mut credential_refused = false;
    let advice = match usable {
        Some(_) => match report(a, &state_dir, now).await {
            Ok(adv) => Some(adv),
            // The renewal below meets the same refusal and falls back to the enrolment token
            // (or fails, naming it).
            Err(e) if refused_credential(&e) => {
                credential_refused = true;
                None
            }
            // Advisory: a server that cannot take the report still renews on schedule.
            Err(e) => {
                eprintln!("warning: {e:#}; renewing on the usual schedule");
                None
            }
        },
        None => None,
    };
    let mut reason = None;
    if let Some(c) = usable {
        let due = renew_at(c, a.renew_after);
        let bundle_fits = match &advice {
            Some(adv) => chain_verifies_under(&state_dir, &adv.trust_bundle)?,
            None => true,
        };
        reason = if a.force {
            Some("forced".to_string())
        } else if let Some(r) = advice.as_ref().and_then(|adv| adv.reason.as_ref()) {
            Some(format!("rotation: {r}"))
        } else if !bundle_fits {
            Some("the installed chain does not verify under the server's trust bundle".to_string())
        } else if now >= due {
            Some("due".to_string())
        } else if credential_refused {
            Some("the server refused the current intermediate".to_string())
        } else {
            None
        };
        if reason.is_none() {
            let bundle_updated = match &advice {
                Some(adv) => sync_bundle(&state_dir, &adv.trust_bundle, now)?,
                None => false,
            };
            if bundle_updated {
                report(a, &state_dir, now)
                    .await
                    .context("the new trust bundle is installed, but reporting it failed")?;
            }
            return Ok(Renewal::Kept {
                renewed: false,
                bundle_updated,
                serial: c.serial.clone(),
                not_after: ca_core::error::fmt_time(c.not_after),
                renew_after: ca_core::error::fmt_time(due),
            });
        }
    }
    let mode = match (usable, &a.enrolment_token) {
        (Some(_), _) => "renewal",
        (None, Some(_)) => "enrolment",
        (None, None) => match &cur {
            Some(c) => bail!(
                "the current intermediate (serial {}) expired at {}; enrol again with a new enrolment token (CA_ENROLMENT_TOKEN)",
                c.serial,
                ca_core::error::fmt_time(c.not_after)
            ),
            None => bail!(
                "{} holds no intermediate yet: enrol with the token from registration (set CA_ENROLMENT_TOKEN or --enrolment-token-file)",
                state_dir.display()
            ),
        },
    };

    // A fresh key for every intermediate, made straight into the new version's directory.
    let stamp = now.format(time::macros::format_description!(
        "[year]_[month]_[day]_[hour]_[minute]_[second].[subsecond digits:3]"
    ))?;
    let version = state_dir.join(format!("..{stamp}"));
    std::fs::create_dir(&version).with_context(|| format!("creating {}", version.display()))?;
    let mut mode = mode;
    let mut result = fetch_into(a, mode, &state_dir, &version, now).await;
    // A revoked or superseded credential cannot renew; an operator-issued enrolment token can
    // still bring the cluster back.
    if mode == "renewal" && a.enrolment_token.is_some() && result.as_ref().err().is_some_and(refused_credential) {
        let renewal_error = result.err().expect("checked").to_string();
        let _ = std::fs::remove_dir_all(&version);
        std::fs::create_dir(&version)?;
        mode = "enrolment";
        // Both refusals matter to whoever reads the CronJob's log.
        result = fetch_into(a, mode, &state_dir, &version, now)
            .await
            .with_context(|| format!("{renewal_error}; falling back to the enrolment token"));
    }
    let resp = match result {
        Ok(r) => r,
        Err(e) => {
            // Nothing half-written stays behind.
            let _ = std::fs::remove_dir_all(&version);
            return Err(e);
        }
    };
    swap(&state_dir, &version)?;
    prune(&state_dir)?;
    if let Err(e) = report(a, &state_dir, now).await {
        eprintln!("warning: renewed, but reporting the new set failed ({e:#}); the next run reports it");
    }
    Ok(Renewal::Renewed { renewed: true, via: mode, reason, serial: resp.serial, not_after: resp.not_after, state_dir })
}

fn fingerprints(path: &Path) -> Result<Vec<String>> {
    Ok(ca_core::cert::fingerprints(&load_certs(path)?))
}

/// Tells the server what `..data` holds (over mTLS with the newest credential) and returns
/// its advice.
async fn report(a: &RenewArgs, state_dir: &Path, now: OffsetDateTime) -> Result<ReportResponse> {
    let installed = current(state_dir)?.context("nothing installed to report")?;
    let mut chain = vec![installed.fingerprint()];
    chain.extend(fingerprints(&state_dir.join("cert-chain.pem"))?);
    let body = json!({
        "bundle": fingerprints(&state_dir.join("root-cert.pem"))?,
        "chain": chain,
        "intermediate_serial": installed.serial,
    });
    let (_, set) = credential(state_dir, now)?.context("no unexpired intermediate to report with")?;
    let tls = tls_config(&a.ca_root, Some((&set.join("ca-cert.pem"), &set.join("ca-key.pem"))))?;
    let client = reqwest::Client::builder().use_preconfigured_tls(tls).timeout(Duration::from_secs(30)).build()?;
    let url = format!("{}/v1/clusters/{}/report", a.server.trim_end_matches('/'), a.cluster);
    let resp = client.post(&url).json(&body).send().await.with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    if !status.is_success() {
        let (code, message) = match Problem::parse(&resp.text().await.unwrap_or_default()) {
            Some((code, detail)) => {
                let message = format!("report refused by {} ({status}, {code}): {detail}", a.server);
                (code, message)
            }
            None => (String::new(), format!("report refused by {} ({status})", a.server)),
        };
        return Err(Refused { code, message }.into());
    }
    resp.json().await.context("the server's answer to the report is not advice")
}

fn parse_pems(pems: &[String]) -> Result<Vec<CertInfo>> {
    Ok(ca_core::cert::parse_certs(pems.concat().as_bytes(), "the server's answer")?)
}

/// Whether the installed intermediate and chain verify under `bundle` (istiod refuses a set
/// whose chain does not verify to `root-cert.pem`).
fn chain_verifies_under(state_dir: &Path, bundle: &[String]) -> Result<bool> {
    let cert = current(state_dir)?.context("nothing installed")?;
    let chain: Vec<CertInfo> =
        load_certs(&state_dir.join("cert-chain.pem"))?.into_iter().filter(|c| !c.is_self_issued()).collect();
    let roots = parse_pems(bundle)?;
    Ok(ca_core::chain::verify_chain(&cert, &chain, &roots, OffsetDateTime::now_utc()).is_ok())
}

/// Installs `bundle` as `root-cert.pem` beside the current intermediate, key and chain, as a
/// new version swapped in like a renewal. Istiod (with `ISTIO_MULTIROOT_MESH`) takes a new
/// bundle only as a superset or subset of the old one, so anything else is refused.
fn sync_bundle(state_dir: &Path, bundle: &[String], now: OffsetDateTime) -> Result<bool> {
    let installed: std::collections::BTreeSet<String> =
        fingerprints(&state_dir.join("root-cert.pem"))?.into_iter().collect();
    let wanted: std::collections::BTreeSet<String> =
        ca_core::cert::fingerprints(&parse_pems(bundle)?).into_iter().collect();
    if installed == wanted {
        return Ok(false);
    }
    if !installed.is_subset(&wanted) && !installed.is_superset(&wanted) {
        bail!(
            "the server's trust bundle neither contains nor is contained in the installed one; istiod would refuse it (install the intermediate bundle first, or renew with --force)"
        );
    }
    let stamp = now.format(time::macros::format_description!(
        "[year]_[month]_[day]_[hour]_[minute]_[second].[subsecond digits:3]"
    ))?;
    let version = state_dir.join(format!("..{stamp}_bundle"));
    std::fs::create_dir(&version).with_context(|| format!("creating {}", version.display()))?;
    let write = || -> Result<()> {
        let key = std::fs::read(state_dir.join("ca-key.pem")).context("reading the installed key")?;
        hsm::write_new_private(&version.join("ca-key.pem"), &key)?;
        let mut out = ca_core::outputs::OutputSet::new();
        for f in ["ca-cert.pem", "cert-chain.pem"] {
            out.add(version.join(f), std::fs::read(state_dir.join(f))?);
        }
        out.add(version.join("root-cert.pem"), bundle.concat());
        out.commit()?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&version);
        return Err(e);
    }
    swap(state_dir, &version)?;
    prune(state_dir)?;
    Ok(true)
}

async fn fetch_into(
    a: &RenewArgs,
    mode: &str,
    state_dir: &Path,
    version: &Path,
    now: OffsetDateTime,
) -> Result<IntermediateResponse> {
    let key_path = version.join("ca-key.pem");
    let key_ref = hsm::KeyRef::file(&key_path);
    let public = hsm::generate_key(&key_ref, hsm::KeyAlgorithm::EcdsaP256)?;
    let signer = hsm::open_signer(&key_ref)?;
    let mut subject = rcgen::DistinguishedName::new();
    subject.push(rcgen::DnType::CommonName, format!("{} Cluster CA", a.cluster));
    let csr = ca_core::csr::create_csr(&signer, subject)?;

    let tls = if mode == "renewal" {
        let (_, set) = credential(state_dir, now)?.context("no unexpired intermediate to renew with")?;
        tls_config(&a.ca_root, Some((&set.join("ca-cert.pem"), &set.join("ca-key.pem"))))?
    } else {
        tls_config(&a.ca_root, None)?
    };
    let client = reqwest::Client::builder().use_preconfigured_tls(tls).timeout(Duration::from_secs(30)).build()?;
    let url = format!("{}/v1/clusters/{}/intermediate", a.server.trim_end_matches('/'), a.cluster);
    let mut req = client.post(&url).json(&json!({"csr": csr}));
    if mode == "enrolment" {
        req = req.bearer_auth(a.enrolment_token.as_deref().expect("checked"));
    }
    let resp = req.send().await.with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        let (code, detail) = Problem::parse(&body).unwrap_or_default();
        let message = if code.is_empty() {
            format!("{mode} refused by {} ({status})", a.server)
        } else {
            format!("{mode} refused by {} ({status}, {code}): {detail}", a.server)
        };
        return Err(Refused { code, message }.into());
    }
    let r: IntermediateResponse = resp.json().await.context("the server's answer is not an intermediate response")?;

    // Check what istiod will check before anything is switched over.
    let cert = CertInfo::from_der(pem::parse(&r.certificate)?.into_contents()).map_err(anyhow::Error::msg)?;
    if cert.spki_der != public.spki_der() {
        bail!("the server returned a certificate for another key");
    }
    if !cert.is_ca {
        bail!("the server returned a certificate that is not a CA");
    }
    let chain = parse_pems(&r.chain)?;
    let roots = parse_pems(&r.trust_bundle)?;
    // istiod (ISTIO_MULTIROOT_MESH) takes a changed root-cert.pem only as a superset or subset.
    let installed = state_dir.join("root-cert.pem");
    if installed.exists() {
        let have: std::collections::BTreeSet<String> = fingerprints(&installed)?.into_iter().collect();
        let get: std::collections::BTreeSet<String> = ca_core::cert::fingerprints(&roots).into_iter().collect();
        if !have.is_subset(&get) && !have.is_superset(&get) {
            bail!(
                "the server's trust bundle neither contains nor is contained in the installed one; istiod would refuse it"
            );
        }
    }
    ca_core::chain::verify_chain(&cert, &chain, &roots, OffsetDateTime::now_utc())
        .context("the returned chain does not verify")?;
    let mut out = ca_core::outputs::OutputSet::new();
    out.add(version.join("ca-cert.pem"), r.certificate.clone());
    out.add(version.join("cert-chain.pem"), r.chain.concat());
    out.add(version.join("root-cert.pem"), r.trust_bundle.concat());
    out.commit()?;
    Ok(r)
}

fn link_target(dir: &Path, name: &str) -> Option<PathBuf> {
    std::fs::read_link(dir.join(name)).ok()
}

/// Points `..data` at `version` in one rename, keeping the old target as `..previous`.
fn swap(state_dir: &Path, version: &Path) -> Result<()> {
    use std::os::unix::fs::symlink;
    let name = version.file_name().expect("a directory name");
    let old = link_target(state_dir, DATA);
    let tmp = state_dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(name, &tmp)?;
    std::fs::rename(&tmp, state_dir.join(DATA)).context("switching ..data")?;
    if let Some(old) = old {
        let tmp = state_dir.join("..previous_tmp");
        let _ = std::fs::remove_file(&tmp);
        symlink(&old, &tmp)?;
        std::fs::rename(&tmp, state_dir.join(PREVIOUS))?;
    }
    for f in FILES {
        let p = state_dir.join(f);
        if p.symlink_metadata().is_err() {
            symlink(Path::new(DATA).join(f), &p)?;
        }
    }
    Ok(())
}

/// Removes versions that are neither current nor previous.
fn prune(state_dir: &Path) -> Result<()> {
    let keep: Vec<PathBuf> = [DATA, PREVIOUS].iter().filter_map(|l| link_target(state_dir, l)).collect();
    for e in std::fs::read_dir(state_dir)?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let is_version = name.starts_with("..")
            && !matches!(name.as_str(), DATA | PREVIOUS)
            && e.path().is_dir()
            && !e.path().is_symlink();
        if is_version && !keep.iter().any(|k| k.as_os_str() == e.file_name().as_os_str()) {
            std::fs::remove_dir_all(e.path())?;
        }
    }
    Ok(())
}

/// Two runs at once (an overlapping CronJob, a manual run or a rollback) would race on
/// `..data`: hold a lock on the state directory while changing it.
fn lock_state_dir(state_dir: &Path) -> Result<std::fs::File> {
    let path = state_dir.join(".renew.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("{}", path.display()))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => {
            bail!("another renewal or rollback is running in {}", state_dir.display())
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", path.display())),
    }
}

/// Swaps `..data` and `..previous`.
pub fn rollback(state_dir: &Path) -> Result<RolledBack> {
    let _lock = lock_state_dir(state_dir)?;
    let (Some(cur), Some(prev)) = (link_target(state_dir, DATA), link_target(state_dir, PREVIOUS)) else {
        bail!("{} has no previous set to roll back to", state_dir.display());
    };
    if !state_dir.join(&prev).is_dir() {
        bail!("the previous set {} is gone", prev.display());
    }
    swap(state_dir, &state_dir.join(&prev))?;
    let now = current(state_dir)?.context("no certificate after rollback")?;
    Ok(RolledBack {
        rolled_back_to: prev,
        from: cur,
        serial: now.serial,
        not_after: ca_core::error::fmt_time(now.not_after),
    })
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // throwaway keys for test certificates
mod tests {
    use super::*;

    #[test]
    fn renewal_time_is_two_thirds_with_bounded_jitter() {
        let kp = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        let start = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        p.not_before = start;
        p.not_after = start + time::Duration::days(30);
        let cert = CertInfo::from_der(p.self_signed(&kp).unwrap().der().to_vec()).unwrap();
        let life = (cert.not_after - cert.not_before).as_seconds_f64();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let at = (renew_at(&cert, LifeFraction::TWO_THIRDS) - cert.not_before).as_seconds_f64() / life;
            assert!((0.61..=0.72).contains(&at), "{at}");
            seen.insert((at * 1000.0) as i64);
        }
        assert!(seen.len() > 10, "jittered");
    }

    #[test]
    fn one_renewal_or_rollback_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_state_dir(dir.path()).unwrap();
        let err = lock_state_dir(dir.path()).unwrap_err();
        assert!(err.to_string().contains("another renewal or rollback is running"), "{err}");
        let err = rollback(dir.path()).unwrap_err();
        assert!(err.to_string().contains("another renewal or rollback"), "{err}");
        drop(held);
        lock_state_dir(dir.path()).unwrap();
    }
}
