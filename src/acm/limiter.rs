//! A per-CA client-side rate limiter that queues short bursts and sheds long ones.
//!
//! It is a token bucket with reservations: each caller takes a token, possibly driving the
//! bucket negative, and sleeps until its reservation matures. Callers are therefore served in
//! arrival order at no more than `rate_per_sec`, after an initial `burst`. When a caller's
//! wait would exceed `max_wait`, it is refused at once with a retryable error instead of
//! joining the queue, so a renewal storm turns into a bounded queue plus fast failures
//! (which SDS and the signer already retry on their own schedule), never into extra AWS calls.
//!
//! Time comes from `tokio::time`, so tests can pause and advance it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, Result};

/// Default sustained rate, in IssueCertificate calls per second per CA.
///
/// AWS documents an account-and-region-wide IssueCertificate quota (25 requests/s in most
/// regions at the time of writing; check Service Quotas for yours). That quota is shared by
/// every CA and every client in the account and region, so a single meshca process takes
/// well under half of it by default.
pub const DEFAULT_RATE_PER_SEC: f64 = 10.0;
/// Default burst: calls allowed back to back before pacing starts.
pub const DEFAULT_BURST: u32 = 10;
/// Default longest time a call may wait in the queue before it is shed.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(10);

/// Rate limiter settings.
#[derive(Clone, Debug, PartialEq)]
pub struct LimiterConfig {
    /// Sustained calls per second (must be > 0).
    pub rate_per_sec: f64,
    /// Bucket size: calls allowed at once before pacing (>= 1).
    pub burst: u32,
    /// A call that would wait longer than this is shed with a retryable error.
    pub max_wait: Duration,
}

impl Default for LimiterConfig {
    fn default() -> Self {
        LimiterConfig {
            rate_per_sec: DEFAULT_RATE_PER_SEC,
            burst: DEFAULT_BURST,
            max_wait: DEFAULT_MAX_WAIT,
        }
    }
}

impl LimiterConfig {
    /// Checks the values are usable.
    pub fn validate(&self) -> Result<()> {
        if !(self.rate_per_sec.is_finite() && self.rate_per_sec > 0.0) {
            return Err(Error::invalid(
                "rate limit",
                format!("rate {} must be a positive number", self.rate_per_sec),
            ));
        }
        if self.burst == 0 {
            return Err(Error::invalid("rate limit", "burst must be at least 1"));
        }
        Ok(())
    }
}

#[derive(Debug)]
struct State {
    /// Available tokens; negative when calls are queued (reservations).
    tokens: f64,
    last: Instant,
}

/// A token-bucket limiter with bounded queueing. Cheap to share through an `Arc`.
#[derive(Debug)]
pub struct RateLimiter {
    cfg: LimiterConfig,
    state: Mutex<State>,
}

/// Proof of a granted call slot. Dropping it before the wait ended returns the token.
struct Reservation<'a> {
    limiter: &'a RateLimiter,
    done: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut st = self.limiter.state.lock().unwrap_or_else(|p| p.into_inner());
            st.tokens += 1.0;
        }
    }
}

impl RateLimiter {
    /// A limiter with a full bucket.
    pub fn new(cfg: LimiterConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(RateLimiter {
            state: Mutex::new(State {
                tokens: f64::from(cfg.burst),
                last: Instant::now(),
            }),
            cfg,
        })
    }

    /// The settings.
    pub fn config(&self) -> &LimiterConfig {
        &self.cfg
    }

    fn refill(&self, st: &mut State, now: Instant) {
        let dt = now.saturating_duration_since(st.last).as_secs_f64();
        st.tokens = (st.tokens + dt * self.cfg.rate_per_sec).min(f64::from(self.cfg.burst));
        st.last = now;
    }

    /// Waits for a call slot. Returns an error at once (without waiting) when the slot is
    /// more than `max_wait` away; `what` names the limited thing in that message.
    pub async fn acquire(&self, what: &str) -> Result<()> {
        let wait = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            self.refill(&mut st, now);
            let after = st.tokens - 1.0;
            let wait = if after >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-after / self.cfg.rate_per_sec)
            };
            if wait > self.cfg.max_wait {
                return Err(Error::Backend {
                    backend: "acm-pca",
                    message: format!(
                        "throttled locally: {what} is limited to {}/s and the queue is {:.1}s deep (max {}s); request shed, retry later",
                        self.cfg.rate_per_sec,
                        wait.as_secs_f64(),
                        self.cfg.max_wait.as_secs_f64()
                    ),
                    retryable: true,
                });
            }
            st.tokens = after;
            wait
        };
        let mut r = Reservation {
            limiter: self,
            done: false,
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        r.done = true;
        Ok(())
    }
}

/// The process-wide limiter of one CA (keyed by ARN) with settings `cfg`, created on first
/// use. Every issuer of the same CA with the same settings in this process shares it, so
/// several loaded issuers (SDS, signer, CLI) cannot multiply the call rate. (Issuers
/// configured with different settings get their own bucket.)
pub fn limiter_for(key: &str, cfg: &LimiterConfig) -> Result<Arc<RateLimiter>> {
    static ALL: OnceLock<Mutex<HashMap<String, Arc<RateLimiter>>>> = OnceLock::new();
    cfg.validate()?;
    let full_key = format!(
        "{key}|{}|{}|{}",
        cfg.rate_per_sec,
        cfg.burst,
        cfg.max_wait.as_nanos()
    );
    let mut map = ALL
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(l) = map.get(&full_key) {
        return Ok(l.clone());
    }
    let l = Arc::new(RateLimiter::new(cfg.clone())?);
    map.insert(full_key, l.clone());
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(rate: f64, burst: u32, max_wait_ms: u64) -> LimiterConfig {
        LimiterConfig {
            rate_per_sec: rate,
            burst,
            max_wait: Duration::from_millis(max_wait_ms),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_paced_then_shed() {
        let l = Arc::new(RateLimiter::new(cfg(10.0, 5, 1000)).unwrap());
        let start = Instant::now();
        // 30 callers arrive at once.
        let mut tasks = Vec::new();
        for _ in 0..30 {
            let l = l.clone();
            tasks.push(tokio::spawn(async move {
                let r = l.acquire("test CA").await;
                (
                    r.is_ok(),
                    Instant::now() - start,
                    r.err().map(|e| e.to_string()),
                )
            }));
        }
        let mut ok_times = Vec::new();
        let mut shed = Vec::new();
        for t in tasks {
            let (ok, at, err) = t.await.unwrap();
            if ok {
                ok_times.push(at);
            } else {
                shed.push((at, err.unwrap()));
            }
        }
        ok_times.sort();
        // 5 immediately (the burst) + 10 more within the 1 s queue limit at 10/s.
        assert_eq!(ok_times.len(), 15, "{ok_times:?}");
        assert_eq!(ok_times.iter().filter(|d| d.is_zero()).count(), 5);
        // Paced: the k-th queued call starts k*100ms after the start.
        for (k, at) in ok_times[5..].iter().enumerate() {
            let want = Duration::from_millis(100 * (k as u64 + 1));
            assert!(
                at.abs_diff(want) < Duration::from_millis(5),
                "call {k} at {at:?}, want {want:?}"
            );
        }
        // The rest are shed immediately, not after waiting, with a one-line retryable message.
        assert_eq!(shed.len(), 15);
        for (at, msg) in &shed {
            assert!(at.is_zero());
            assert!(
                msg.contains("throttled locally") && !msg.contains('\n'),
                "{msg}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn refills_at_the_configured_rate() {
        let l = RateLimiter::new(cfg(2.0, 2, 0)).unwrap();
        l.acquire("x").await.unwrap();
        l.acquire("x").await.unwrap();
        // Bucket empty and no queueing allowed: shed.
        assert!(l.acquire("x").await.is_err());
        tokio::time::advance(Duration::from_millis(500)).await;
        l.acquire("x").await.unwrap();
        assert!(l.acquire("x").await.is_err());
        // Refill never exceeds the burst.
        tokio::time::advance(Duration::from_secs(60)).await;
        l.acquire("x").await.unwrap();
        l.acquire("x").await.unwrap();
        assert!(l.acquire("x").await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_waiter_returns_its_token() {
        let l = Arc::new(RateLimiter::new(cfg(1.0, 1, 10_000)).unwrap());
        l.acquire("x").await.unwrap();
        // This caller would wait 1 s; cancel it after 10 ms.
        let r = tokio::time::timeout(Duration::from_millis(10), l.acquire("x")).await;
        assert!(r.is_err(), "timed out while queued");
        // Its reservation was given back: the next caller waits ~1 s, not ~2 s.
        let t0 = Instant::now();
        l.acquire("x").await.unwrap();
        let waited = Instant::now() - t0;
        assert!(waited <= Duration::from_millis(1000), "{waited:?}");
    }

    #[test]
    fn bad_config_is_rejected() {
        assert!(RateLimiter::new(cfg(0.0, 1, 0)).is_err());
        assert!(RateLimiter::new(cfg(f64::NAN, 1, 0)).is_err());
        assert!(RateLimiter::new(cfg(1.0, 0, 0)).is_err());
    }

    #[test]
    fn limiter_is_shared_per_key() {
        let a = limiter_for("arn:test:shared-a", &LimiterConfig::default()).unwrap();
        let b = limiter_for("arn:test:shared-a", &LimiterConfig::default()).unwrap();
        let c = limiter_for("arn:test:shared-c", &LimiterConfig::default()).unwrap();
        let d = limiter_for("arn:test:shared-a", &cfg(1.0, 1, 0)).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
        assert!(!Arc::ptr_eq(&a, &d));
        assert_eq!(d.config().burst, 1);
    }
}
