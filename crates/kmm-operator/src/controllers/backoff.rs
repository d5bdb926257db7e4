//! Per-object exponential backoff for transient reconcile errors: each failing object waits
//! longer (with jitter), others are not affected, and a success resets it.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::Duration;

const FIRST: Duration = Duration::from_millis(500);
const MAX: Duration = Duration::from_secs(300);

/// Failure counts by object key.
#[derive(Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
    jitter: std::hash::RandomState,
}

impl Backoff {
    /// Records a failure of `key` and returns how long to wait before the next try.
    pub fn failed(&self, key: &str) -> Duration {
        let attempt = {
            let mut failures = self
                .failures
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let count = failures.entry(key.to_owned()).or_default();
            *count = count.saturating_add(1);
            *count
        };
        delay(attempt, self.jitter_fraction(key, attempt))
    }

    /// Forgets the failures of `key`.
    pub fn succeeded(&self, key: &str) {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        failures.remove(key);
    }

    /// A stable pseudo-random fraction in [0, 1) for this key and attempt.
    fn jitter_fraction(&self, key: &str, attempt: u32) -> f64 {
        (self.jitter.hash_one((key, attempt)) % 1000) as f64 / 1000.0
    }
}

/// `FIRST * 2^(attempt-1)`, capped at `MAX`, minus up to a quarter of it as jitter.
fn delay(attempt: u32, jitter: f64) -> Duration {
    let exponent = attempt.saturating_sub(1).min(16);
    let base = FIRST.saturating_mul(1 << exponent).min(MAX);
    base.mul_f64(1.0 - jitter / 4.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_with_a_cap_and_resets() {
        assert_eq!(delay(1, 0.0), FIRST);
        assert_eq!(delay(2, 0.0), FIRST * 2);
        assert_eq!(delay(5, 0.0), FIRST * 16);
        assert_eq!(delay(40, 0.0), MAX);
        assert!(delay(3, 0.999) >= FIRST * 3);
        let backoff = Backoff::default();
        let first = backoff.failed("a");
        let second = backoff.failed("a");
        assert!(second > first);
        assert!(
            backoff.failed("b") <= FIRST,
            "objects back off independently"
        );
        backoff.succeeded("a");
        assert!(backoff.failed("a") <= FIRST);
    }
}
