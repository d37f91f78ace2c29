//! Durations as operators write them: `90s`, `30m`, `24h`, `90d`, `5y`, or sums like `1y30d`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

use crate::error::PolicyError;

/// The longest validity accepted: 1000 years, far past any certificate's life and far enough
/// before year 9999 that adding it to a date cannot overflow.
pub const MAX_SECONDS: i64 = 1000 * 365 * 86_400;

/// A validity period. A year is 365 days: certificate lifetimes are policy numbers, not
/// calendar arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Validity(time::Duration);

impl Validity {
    pub fn duration(self) -> time::Duration {
        self.0
    }

    pub fn from_duration(d: time::Duration) -> Self {
        Validity(d)
    }
}

impl Validity {
    /// A time window rather than a lifetime (a query's "expiring within"): any length the
    /// syntax allows, capped at [`MAX_SECONDS`], since every certificate ends within that.
    pub fn parse_window(s: &str) -> Result<Self, PolicyError> {
        seconds(s).map(|total| Validity(time::Duration::seconds(total.min(MAX_SECONDS))))
    }
}

/// The seconds `s` spells; only syntax and overflow are checked.
fn seconds(s: &str) -> Result<i64, PolicyError> {
    let bad = || PolicyError::Invalid(format!("invalid duration {s:?}: expected e.g. 24h, 90d, 5y or 1y30d"));
    let mut total: i64 = 0;
    let mut num = String::new();
    let mut seen_unit = false;
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: i64 = num.parse().map_err(|_| bad())?;
        num.clear();
        let secs = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            'y' => 365 * 86_400,
            _ => return Err(bad()),
        };
        total = n.checked_mul(secs).and_then(|v| total.checked_add(v)).ok_or_else(bad)?;
        seen_unit = true;
    }
    if !num.is_empty() || !seen_unit || total <= 0 {
        return Err(bad());
    }
    Ok(total)
}

impl FromStr for Validity {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let total = seconds(s)?;
        // Every validity is added to today's date somewhere; past year 9999 that panics.
        if total > MAX_SECONDS {
            return Err(PolicyError::Invalid(format!("duration {s:?} is longer than the maximum 1000y")));
        }
        Ok(Validity(time::Duration::seconds(total)))
    }
}

impl fmt::Display for Validity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.whole_seconds();
        let units = [(365 * 86_400, 'y'), (86_400, 'd'), (3600, 'h'), (60, 'm'), (1, 's')];
        let mut rest = s;
        for (size, unit) in units {
            if rest >= size {
                write!(f, "{}{unit}", rest / size)?;
                rest %= size;
            }
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for Validity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sums() {
        assert_eq!("24h".parse::<Validity>().unwrap().duration(), time::Duration::hours(24));
        assert_eq!("90d".parse::<Validity>().unwrap().duration(), time::Duration::days(90));
        assert_eq!("5y".parse::<Validity>().unwrap().duration(), time::Duration::days(5 * 365));
        assert_eq!("1y30d".parse::<Validity>().unwrap().duration(), time::Duration::days(395));
        assert_eq!("1y30d".parse::<Validity>().unwrap().to_string(), "1y30d");
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "5", "y", "5x", "-5d", "0d", "d5", "99999999999999999999y"] {
            assert!(bad.parse::<Validity>().is_err(), "{bad:?}");
        }
    }

    /// A validity long enough to pass year 9999 when added to today made `now + validity`
    /// panic (ceremony check and run, the server's policy durations, workload TTLs).
    #[test]
    fn a_window_longer_than_any_validity_is_capped() {
        let w = Validity::parse_window("5y2426775489h").unwrap();
        assert_eq!(w.duration().whole_seconds(), MAX_SECONDS);
        assert_eq!(Validity::parse_window("30d").unwrap().duration().whole_seconds(), 30 * 86_400);
        assert!(Validity::parse_window("30x").is_err());
        assert!("5y2426775489h".parse::<Validity>().is_err());
    }

    #[test]
    fn refuses_a_validity_no_date_can_hold() {
        assert!("1000y".parse::<Validity>().is_ok());
        for bad in ["1001y", "9000y", "1000y1s", "292471208677y"] {
            assert!(bad.parse::<Validity>().is_err(), "{bad:?}");
        }
    }
}
