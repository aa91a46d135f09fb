//! Per-address rate limiting on `governor`'s keyed token buckets (GCRA), so a burst of a shift's
//! sign-ins passes and a flood from one address does not starve the others.
//!
//! Memory is bounded: an IPv6 client is keyed by its /64 (one host can hold a whole /64, so per
//! address would let it make buckets without end), and at most `cap` keys are tracked. When the map
//! is full, addresses whose bucket has refilled are forgotten (governor's `retain_recent`, at most
//! once a second, not per request); if it is still full, a request from an untracked address is
//! counted against one bucket shared by every such address. A flood from many addresses then costs
//! no memory and is still limited, at the price of well-behaved untracked clients sharing that bucket
//! until the flood's buckets refill.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use governor::Quota;
use governor::clock::{Clock, MonotonicClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;

/// Keys tracked at most by [`RateLimiter::new`].
const MAX_TRACKED: usize = 100_000;

/// Who a bucket belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    V4([u8; 4]),
    /// The /64 an IPv6 address is in.
    V6Net([u8; 8]),
    /// Every address that arrives while the map is full.
    Untracked,
}

impl Key {
    fn of(address: IpAddr) -> Key {
        match address {
            IpAddr::V4(v4) => Key::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Key::V4(v4.octets()),
                None => {
                    let mut net = [0; 8];
                    net.copy_from_slice(&v6.octets()[..8]);
                    Key::V6Net(net)
                }
            },
        }
    }
}

type Buckets<C> =
    governor::RateLimiter<Key, DashMapStateStore<Key>, C, NoOpMiddleware<<C as Clock>::Instant>>;

pub struct RateLimiter<C: Clock + Clone = MonotonicClock> {
    buckets: Buckets<C>,
    clock: C,
    cap: usize,
    /// When the full map was last pruned.
    pruned: Mutex<Option<C::Instant>>,
}

impl RateLimiter {
    /// `per_minute` requests a minute per address, in bursts of up to `per_minute`.
    pub fn new(per_minute: u32) -> RateLimiter {
        RateLimiter::with_clock(per_minute, MAX_TRACKED, MonotonicClock)
    }
}

impl<C: Clock + Clone> RateLimiter<C> {
    pub fn with_clock(per_minute: u32, cap: usize, clock: C) -> RateLimiter<C> {
        let quota = Quota::per_minute(NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN));
        RateLimiter {
            buckets: governor::RateLimiter::dashmap_with_clock(quota, clock.clone()),
            clock,
            cap: cap.max(1),
            pruned: Mutex::new(None),
        }
    }

    /// `Ok` to go ahead, or `Err(seconds)` to wait before the next request will be taken.
    pub fn check(&self, address: IpAddr) -> Result<(), u64> {
        let mut key = Key::of(address);
        if self.buckets.len() >= self.cap {
            self.prune();
            if self.buckets.len() >= self.cap {
                key = Key::Untracked;
            }
        }
        self.buckets.check_key(&key).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            wait.as_secs_f64().ceil().max(1.0) as u64
        })
    }

    /// Keys tracked now (the shared bucket of untracked addresses included).
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }

    fn prune(&self) {
        let now = self.clock.now();
        let mut pruned = self.pruned.lock().unwrap_or_else(|e| e.into_inner());
        let due = pruned.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1).into());
        if due {
            *pruned = Some(now);
            self.buckets.retain_recent();
            self.buckets.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn v4(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn a_burst_up_to_the_limit_passes_then_waits_and_refills() {
        let clock = FakeRelativeClock::default();
        let limiter = RateLimiter::with_clock(60, 10, clock.clone());
        let (a, b) = (v4(1), v4(2));
        for _ in 0..60 {
            assert!(limiter.check(a).is_ok());
        }
        assert_eq!(limiter.check(a), Err(1));
        assert!(limiter.check(b).is_ok(), "another address is not affected");
        clock.advance(Duration::from_millis(1100));
        assert!(limiter.check(a).is_ok());
        assert!(limiter.check(a).is_err());
    }

    #[test]
    fn an_ipv6_slash_64_is_one_client() {
        let limiter = RateLimiter::with_clock(2, 10, FakeRelativeClock::default());
        let host = |last: u16| IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, last]);
        assert!(limiter.check(host(1)).is_ok());
        assert!(limiter.check(host(2)).is_ok());
        assert!(limiter.check(host(3)).is_err(), "same /64, same bucket");
        let elsewhere = IpAddr::from([0x2001, 0xdb8, 0, 2, 0, 0, 0, 1]);
        assert!(limiter.check(elsewhere).is_ok());
    }

    #[test]
    fn memory_is_bounded_and_freed_once_buckets_refill() {
        let clock = FakeRelativeClock::default();
        let limiter = RateLimiter::with_clock(60, 3, clock.clone());
        for last in 1..=3 {
            assert!(limiter.check(v4(last)).is_ok());
        }
        // A flood from many new addresses: no bucket of its own each, one shared bucket instead.
        let mut refused = 0;
        for n in 0..1000u32 {
            let [_, _, c, d] = n.to_be_bytes();
            if limiter.check(IpAddr::from([10, 0, c, d])).is_err() {
                refused += 1;
            }
        }
        assert!(limiter.tracked() <= 4, "tracked {}", limiter.tracked());
        assert_eq!(refused, 1000 - 60, "the shared bucket holds one burst");
        // A minute later every bucket has refilled: they are forgotten, and a new address is
        // tracked again.
        clock.advance(Duration::from_secs(61));
        assert!(limiter.check(v4(9)).is_ok());
        assert!(limiter.tracked() <= 2, "tracked {}", limiter.tracked());
        for _ in 0..59 {
            assert!(limiter.check(v4(9)).is_ok());
        }
        assert!(limiter.check(v4(9)).is_err(), "its own bucket again");
    }
}
