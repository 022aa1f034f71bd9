//! A token bucket for API requests: `qps` tokens a second, up to `burst` at once.
//!
//! kube-rs does not throttle clients (client-go does, at 5 QPS / burst 10 by default, which
//! caps a signer at about 5 certificates a second). meshca throttles its own API calls with
//! this bucket so that a busy controller stays a polite API-server citizen, with defaults
//! (200 QPS, burst 400: one write per CSR, so 200 CSRs/s sustained) well above client-go's.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// Default sustained request rate.
pub const DEFAULT_QPS: f64 = 200.0;
/// Default burst.
pub const DEFAULT_BURST: u32 = 400;

/// The bucket. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct RateLimiter {
    qps: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    /// A bucket that starts full. `qps <= 0` disables throttling.
    pub fn new(qps: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        RateLimiter {
            qps,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Waits until a token is available and takes it.
    pub async fn acquire(&self) {
        if self.qps <= 0.0 {
            return;
        }
        let wait = {
            let mut st = self.state.lock().await;
            let now = Instant::now();
            let elapsed = now.saturating_duration_since(st.1).as_secs_f64();
            st.0 = (st.0 + elapsed * self.qps).min(self.burst);
            st.1 = now;
            // Take the token now (possibly going negative) so that waiters queue up fairly.
            st.0 -= 1.0;
            if st.0 >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-st.0 / self.qps)
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn burst_then_steady_rate() {
        let rl = RateLimiter::new(10.0, 5);
        let start = Instant::now();
        for _ in 0..5 {
            rl.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO, "the burst is free");
        for _ in 0..10 {
            rl.acquire().await;
        }
        let e = start.elapsed();
        assert!(
            e >= Duration::from_millis(990) && e <= Duration::from_millis(1010),
            "{e:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn zero_qps_disables() {
        let rl = RateLimiter::new(0.0, 1);
        let start = Instant::now();
        for _ in 0..1000 {
            rl.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
