//! Per-object exponential backoff with jitter, shared by the CSR signer and the
//! managed-Secret controller.
//!
//! After the n-th consecutive retryable failure of one object the wait is drawn uniformly
//! from `[d/2, d]`, where `d = min(base * 2^(n-1), cap)` ("equal jitter"): objects that failed
//! together (an API server restart) spread out instead of retrying in lock-step, and the wait
//! never exceeds the cap. A success resets the object's count.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// First wait.
pub const BASE: Duration = Duration::from_millis(500);
/// Longest wait.
pub const CAP: Duration = Duration::from_secs(300);

/// The un-jittered wait after `n` consecutive failures: `BASE` doubling, at most `CAP`.
pub fn ceiling(n: u32) -> Duration {
    let ms = (BASE.as_millis() as u64).saturating_mul(1u64 << n.saturating_sub(1).min(20));
    Duration::from_millis(ms.min(CAP.as_millis() as u64))
}

/// `d` scaled into `[d/2, d]` by `unit` in `[0, 1]`.
pub fn jitter(d: Duration, unit: f64) -> Duration {
    let unit = unit.clamp(0.0, 1.0);
    d.mul_f64(0.5 + 0.5 * unit)
}

/// A uniform value in `[0, 1]` from the system RNG (1.0 if it fails).
pub(crate) fn random_unit() -> f64 {
    let mut b = [0u8; 4];
    if aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut b).is_err() {
        return 1.0;
    }
    f64::from(u32::from_be_bytes(b)) / f64::from(u32::MAX)
}

/// Failure counts per object key.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    /// No failures recorded.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one more failure of `key` and returns how long to wait before retrying it.
    pub fn next(&self, key: &str) -> Duration {
        jitter(ceiling(self.bump(key)), random_unit())
    }

    fn bump(&self, key: &str) -> u32 {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = f.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    /// Consecutive failures of `key` so far.
    pub fn failures(&self, key: &str) -> u32 {
        let f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        f.get(key).copied().unwrap_or(0)
    }

    /// Forgets `key` (after a success).
    pub fn reset(&self, key: &str) {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        f.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_with_jitter_inside_half_to_full() {
        assert_eq!(ceiling(1), Duration::from_millis(500));
        assert_eq!(ceiling(2), Duration::from_secs(1));
        assert_eq!(ceiling(10), Duration::from_millis(256_000));
        assert_eq!(ceiling(11), CAP);
        assert_eq!(ceiling(u32::MAX), CAP);
        assert_eq!(jitter(CAP, 0.0), CAP / 2);
        assert_eq!(jitter(CAP, 1.0), CAP);
        let b = Backoff::new();
        let mut seen = std::collections::BTreeSet::new();
        for n in 1..=40u32 {
            let d = b.next("a");
            assert_eq!(b.failures("a"), n);
            assert!(d >= ceiling(n) / 2 && d <= ceiling(n), "{n}: {d:?}");
            assert!(d <= CAP);
            seen.insert(d);
        }
        assert!(seen.len() > 10, "jitter varies the waits: {seen:?}");
        // Objects are independent, and a success resets.
        assert_eq!(b.failures("b"), 0);
        b.reset("a");
        assert_eq!(b.failures("a"), 0);
        assert!(b.next("a") <= BASE);
    }
}
