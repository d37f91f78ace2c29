//! Lifetimes under an issuer and when to renew: the two rules every issuance path shares.
//!
//! Each path picks its own mode: ceremonies and `ca-cli sign` refuse a certificate that would
//! outlive its issuer (an operator chose the validity and should see the conflict); online
//! issuance clamps (the issuer's own rotation is what extends it).

use time::{Duration, OffsetDateTime};

use crate::error::{PolicyError, fmt_time};

/// What to do with a wanted lifetime that would end after the issuer's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fit {
    /// End with the issuer instead.
    Clamp,
    /// Refuse with [`PolicyError::OutlivesIssuer`].
    Refuse,
}

/// A notAfter that fits under the issuer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fitted {
    pub not_after: OffsetDateTime,
    /// The wanted end was past the issuer's and was moved to it.
    pub clamped: bool,
}

/// notAfter for a certificate that starts counting its lifetime `wanted` at `from` (its
/// notBefore, or "now" where notBefore is backdated for clock skew), under an issuer that
/// expires at `issuer_not_after`. An end past year 9999 is past any issuer too.
pub fn fit_validity(
    issuer_not_after: OffsetDateTime,
    from: OffsetDateTime,
    wanted: Duration,
    fit: Fit,
) -> Result<Fitted, PolicyError> {
    match from.checked_add(wanted) {
        Some(end) if end <= issuer_not_after => Ok(Fitted { not_after: end, clamped: false }),
        _ if fit == Fit::Clamp => Ok(Fitted { not_after: issuer_not_after, clamped: true }),
        end => Err(PolicyError::OutlivesIssuer {
            requested: end.map_or_else(|| "a time past year 9999".into(), fmt_time),
            issuer: fmt_time(issuer_not_after),
        }),
    }
}

/// A point in a certificate's life: `num / den` of the way from notBefore to notAfter.
/// Integer, so that every caller rounds the same way (down, to the second).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LifeFraction {
    num: i64,
    den: i64,
}

impl LifeFraction {
    pub const HALF: LifeFraction = LifeFraction { num: 1, den: 2 };
    pub const TWO_THIRDS: LifeFraction = LifeFraction { num: 2, den: 3 };

    /// `num / den`; `den` must be positive.
    pub const fn new(num: i64, den: i64) -> LifeFraction {
        assert!(den > 0, "a life fraction needs a positive denominator");
        LifeFraction { num, den }
    }

    /// The fraction as a float, for schedules that add jitter to it.
    pub fn as_f64(self) -> f64 {
        self.num as f64 / self.den as f64
    }
}

/// When cluster intermediates renew: the server's own renewal of external-CA clusters,
/// `ca-cli cluster renew` (before its jitter) and the `renewal-due` that `ca-cli status`
/// reports all read this one value.
pub const CLUSTER_RENEWAL: LifeFraction = LifeFraction::TWO_THIRDS;

/// When a certificate valid from `not_before` to `not_after` (Unix seconds) reaches
/// `fraction` of its life.
pub fn renew_at(not_before: i64, not_after: i64, fraction: LifeFraction) -> i64 {
    let life = i128::from(not_after) - i128::from(not_before);
    let at = i128::from(not_before) + life * i128::from(fraction.num) / i128::from(fraction.den);
    at.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

/// Whether a certificate valid from `not_before` to `not_after` (Unix seconds) is due for
/// renewal at `now`: `fraction` of its life has passed.
pub fn renewal_due(not_before: i64, not_after: i64, fraction: LifeFraction, now: i64) -> bool {
    now >= renew_at(not_before, not_after, fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(s).unwrap()
    }

    #[test]
    fn a_lifetime_that_fits_is_kept_in_both_modes() {
        for fit in [Fit::Clamp, Fit::Refuse] {
            let f = fit_validity(t(10_000), t(1_000), Duration::seconds(9_000), fit).unwrap();
            assert_eq!(f, Fitted { not_after: t(10_000), clamped: false });
        }
    }

    #[test]
    fn past_the_issuer_clamps_or_refuses() {
        let f = fit_validity(t(10_000), t(1_000), Duration::seconds(9_001), Fit::Clamp).unwrap();
        assert_eq!(f, Fitted { not_after: t(10_000), clamped: true });
        match fit_validity(t(10_000), t(1_000), Duration::seconds(9_001), Fit::Refuse) {
            Err(PolicyError::OutlivesIssuer { requested, issuer }) => {
                assert_eq!(requested, fmt_time(t(10_001)));
                assert_eq!(issuer, fmt_time(t(10_000)));
            }
            other => panic!("expected OutlivesIssuer, got {other:?}"),
        }
    }

    #[test]
    fn past_year_9999_is_past_the_issuer() {
        let issuer = t(1_800_000_000);
        let f = fit_validity(issuer, t(1_700_000_000), Duration::seconds(i64::MAX), Fit::Clamp).unwrap();
        assert_eq!(f, Fitted { not_after: issuer, clamped: true });
        assert!(matches!(
            fit_validity(issuer, t(1_700_000_000), Duration::seconds(i64::MAX), Fit::Refuse),
            Err(PolicyError::OutlivesIssuer { .. })
        ));
    }

    #[test]
    fn renewal_is_due_from_the_fraction_on() {
        // A 90-day certificate renews from day 60 at two thirds, day 45 at half.
        let (nb, na) = (1_000, 1_000 + 90 * 86_400);
        assert_eq!(renew_at(nb, na, LifeFraction::TWO_THIRDS), 1_000 + 60 * 86_400);
        assert!(!renewal_due(nb, na, LifeFraction::TWO_THIRDS, 1_000 + 60 * 86_400 - 1));
        assert!(renewal_due(nb, na, LifeFraction::TWO_THIRDS, 1_000 + 60 * 86_400));
        assert!(renewal_due(nb, na, LifeFraction::HALF, 1_000 + 45 * 86_400));
        assert!(!renewal_due(nb, na, LifeFraction::HALF, 1_000 + 45 * 86_400 - 1));
        // Rounds down, as `life * 2 / 3` on seconds does.
        assert_eq!(renew_at(0, 100, LifeFraction::TWO_THIRDS), 66);
        assert_eq!(renew_at(0, 101, LifeFraction::HALF), 50);
        assert!(renewal_due(0, 100, LifeFraction::new(1, 1), 100));
    }

    #[test]
    fn extreme_times_do_not_overflow() {
        assert_eq!(renew_at(i64::MIN, i64::MAX, LifeFraction::new(1, 1)), i64::MAX);
        assert!(!renewal_due(0, i64::MAX, LifeFraction::TWO_THIRDS, 1_800_000_000));
    }
}
