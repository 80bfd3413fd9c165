//! Deadlines that never overflow, and the bounds of the durations a user
//! may configure.
//!
//! Every deadline in the crate is made here: `Instant + Duration` panics on
//! overflow, so a large but accepted duration must saturate instead of
//! taking the process down inside an upgrade.

use std::time::{Duration, Instant};

/// The longest timeout or window the crate accepts: one day. Longer values
/// are almost certainly a unit mistake (seconds for milliseconds) and would
/// let a hung successor hold an upgrade for ever.
pub(crate) const MAX_SETTING: Duration = Duration::from_secs(24 * 3600);

/// Far enough in the future to mean "never" for any wait here, yet safe
/// to add to any `Instant` the process will see.
const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `start + after`, saturating at a point far in the future.
pub(crate) fn after_from(start: Instant, after: Duration) -> Instant {
    start
        .checked_add(after)
        .or_else(|| start.checked_add(FAR))
        .unwrap_or(start)
}

/// `now + after`, saturating; see [`after_from`].
pub(crate) fn after(after: Duration) -> Instant {
    after_from(Instant::now(), after)
}

/// The shortest ready timeout accepted: no successor execs and starts in
/// less, so anything shorter fails every upgrade.
pub(crate) const MIN_TIMEOUT: Duration = Duration::from_millis(1);

/// Checks a configured duration: at most [`MAX_SETTING`]; zero only if
/// `zero_ok`, and otherwise at least [`MIN_TIMEOUT`]. `Err(reason)` says
/// what is wrong, in the operator's units.
pub(crate) fn check_setting(d: Duration, zero_ok: bool) -> Result<(), String> {
    if d.is_zero() && !zero_ok {
        return Err("must be greater than zero".to_owned());
    }
    if !zero_ok && d < MIN_TIMEOUT {
        return Err(format!(
            "{} ns is shorter than the minimum of 1 ms: no successor can start in less",
            d.as_nanos()
        ));
    }
    if d > MAX_SETTING {
        return Err(format!(
            "{:.3} s is longer than the maximum of {} s (one day)",
            d.as_secs_f64(),
            MAX_SETTING.as_secs()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_saturate() {
        let now = Instant::now();
        assert_eq!(
            after_from(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
        let far = after_from(now, Duration::MAX);
        assert!(far > now + Duration::from_secs(365 * 24 * 3600));
        let _ = after(Duration::from_secs_f64(1e19));
    }

    #[test]
    fn settings_are_bounded() {
        assert!(check_setting(Duration::ZERO, false).is_err());
        assert!(check_setting(Duration::ZERO, true).is_ok());
        assert!(check_setting(Duration::from_nanos(1), false).is_err());
        assert!(check_setting(Duration::from_millis(1), false).is_ok());
        assert!(check_setting(MAX_SETTING, false).is_ok());
        let e = check_setting(Duration::from_secs_f64(1e19), false).unwrap_err();
        assert!(e.contains("maximum"), "{e}");
    }
}
