//! Per-address rate limiting: a token bucket for each client address, refilled continuously, so a
//! burst of a shift's sign-ins passes and a flood from one address does not starve the others.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Addresses tracked at most; beyond it, the buckets that have been full longest are dropped.
const MAX_TRACKED: usize = 100_000;

pub struct RateLimiter {
    per_minute: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    pub fn new(per_minute: u32) -> RateLimiter {
        RateLimiter {
            per_minute: f64::from(per_minute.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// `Ok` to go ahead, or `Err(seconds)` to wait before the next request will be taken.
    pub fn check(&self, address: IpAddr, now: Instant) -> Result<(), u64> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&address) {
            let per_minute = self.per_minute;
            buckets.retain(|_, b| refilled(b, per_minute, now) < per_minute);
        }
        let bucket = buckets.entry(address).or_insert(Bucket {
            tokens: self.per_minute,
            at: now,
        });
        bucket.tokens = refilled(bucket, self.per_minute, now);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) * 60.0 / self.per_minute;
            Err(wait.ceil().max(1.0) as u64)
        }
    }
}

fn refilled(bucket: &Bucket, per_minute: f64, now: Instant) -> f64 {
    let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
    (bucket.tokens + elapsed * per_minute / 60.0).min(per_minute)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_up_to_the_limit_passes_then_waits_and_refills() {
        let limiter = RateLimiter::new(60);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let start = Instant::now();
        for _ in 0..60 {
            assert!(limiter.check(a, start).is_ok());
        }
        assert_eq!(limiter.check(a, start), Err(1));
        assert!(
            limiter.check(b, start).is_ok(),
            "another address is not affected"
        );
        assert!(
            limiter
                .check(a, start + Duration::from_millis(1100))
                .is_ok()
        );
        assert!(
            limiter
                .check(a, start + Duration::from_millis(1100))
                .is_err()
        );
    }
}
