//! The CSR parser (`VerifiedCsr`) and the Istio workload judge (`ca_server::service::workload::judge`:
//! signature, key policy, requested names, lifetime), as a `CreateCertificate` request
//! reaches them.
//!
//! Input: a 33-byte header, then the CSR. Header, little-endian: requested validity (i64),
//! default TTL and maximum TTL in seconds (i64 each), the issuer's notAfter in Unix seconds
//! (i64), flags (bit 0: clamp over the maximum instead of rejecting).
#![no_main]

use ca_core::workload::{MIN_TTL, OverMax, TtlPolicy};
use libfuzzer_sys::fuzz_target;
use time::{Duration, OffsetDateTime};

const IDENTITY: &str = "spiffe://cluster.local/ns/default/sa/sleep";
/// 9999-12-31T23:59:59Z, the last instant an X.509 time (and `time` without large dates) holds.
const MAX_UNIX: i64 = 253_402_300_799;

fn i64_at(data: &[u8], at: usize) -> i64 {
    i64::from_le_bytes(data[at..at + 8].try_into().expect("8 bytes"))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 33 {
        return;
    }
    let (head, csr) = data.split_at(33);
    let validity = i64_at(head, 0);
    // What `Config::load` lets through: positive durations, default at most max.
    let default = i64_at(head, 8).checked_abs().unwrap_or(i64::MAX).max(1);
    let max = i64_at(head, 16).checked_abs().unwrap_or(i64::MAX).max(1);
    if default > max {
        return;
    }
    let policy = TtlPolicy {
        default: Duration::seconds(default),
        max: Duration::seconds(max),
        over_max: if head[32] & 1 == 1 { OverMax::Clamp } else { OverMax::Reject },
    };
    let issuer_not_after =
        OffsetDateTime::from_unix_timestamp(i64_at(head, 24).rem_euclid(MAX_UNIX + 1)).expect("in range");
    let identity: ca_core::names::SpiffeId = IDENTITY.parse().expect("valid SPIFFE ID");

    // The gRPC field is a string: PEM goes through the judge; other bytes (DER) through the
    // parser alone, as the REST API's CSR uploads do.
    let Ok(text) = std::str::from_utf8(csr) else {
        let _ = ca_core::csr::VerifiedCsr::parse(csr);
        return;
    };
    let before = OffsetDateTime::now_utc();
    let Ok(req) = ca_server::service::workload::judge(text, &identity, validity, &policy, issuer_not_after) else {
        return;
    };

    // What was let through is what the policy promises.
    let parsed = ca_core::csr::VerifiedCsr::parse(csr).expect("judge accepted it");
    for n in parsed.requested_names() {
        assert_eq!(*n, ca_core::csr::RequestedName::Uri(IDENTITY.into()), "a foreign name passed");
    }
    assert_eq!(req.spiffe_id.as_ref().map(ToString::to_string).as_deref(), Some(IDENTITY));
    assert!(req.not_after <= issuer_not_after, "outlives the issuer");
    assert!(req.not_after - before >= MIN_TTL - Duration::seconds(1), "shorter than the minimum");
    assert!(
        req.not_after - req.not_before <= policy.max.saturating_add(Duration::minutes(2)),
        "longer than the maximum"
    );
    assert!(validity >= 0);
});
