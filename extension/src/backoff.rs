//! Retry delays for failed jobs: exponential with a cap, spread by jitter so that a burst of failures
//! (a provider answering 451 to everyone) does not come back as a burst.

use std::time::Duration;

/// First retry after about this long.
pub const BASE: Duration = Duration::from_secs(10);
/// No retry waits longer than this (before jitter).
pub const CAP: Duration = Duration::from_secs(3600);

/// Delay before the retry that follows failed attempt number `attempt` (1-based).
/// `jitter` in [0, 1) scales the delay by a factor in [0.5, 1.5); values outside are clamped.
pub fn retry_delay(attempt: i32, jitter: f64) -> Duration {
    let exponent = attempt.clamp(1, 32) as u32 - 1;
    let base = BASE.as_secs_f64() * 2f64.powi(exponent as i32);
    let capped = base.min(CAP.as_secs_f64());
    let jitter = if jitter.is_nan() { 0.0 } else { jitter };
    let factor = 0.5 + jitter.clamp(0.0, 0.999_999);
    Duration::from_secs_f64(capped * factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_then_caps() {
        assert_eq!(retry_delay(1, 0.5), Duration::from_secs(10));
        assert_eq!(retry_delay(2, 0.5), Duration::from_secs(20));
        assert_eq!(retry_delay(3, 0.5), Duration::from_secs(40));
        assert_eq!(retry_delay(20, 0.5), CAP);
        assert_eq!(retry_delay(i32::MAX, 0.5), CAP);
    }

    #[test]
    fn jitter_spreads_between_half_and_one_and_a_half() {
        assert_eq!(retry_delay(1, 0.0), Duration::from_secs(5));
        let high = retry_delay(1, 0.999_999);
        assert!(high > Duration::from_secs_f64(14.99) && high < Duration::from_secs(15));
    }

    #[test]
    fn out_of_range_inputs_are_clamped() {
        assert_eq!(retry_delay(0, 0.5), retry_delay(1, 0.5));
        assert_eq!(retry_delay(-7, 0.5), retry_delay(1, 0.5));
        assert_eq!(retry_delay(1, -3.0), retry_delay(1, 0.0));
        assert_eq!(retry_delay(1, f64::NAN), retry_delay(1, 0.0));
        assert!(retry_delay(1, 9.0) < Duration::from_secs(15));
    }
}
