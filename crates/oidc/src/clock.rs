//! Time as the agent sees it. Injected, so that tests step through expiry and refresh without sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub trait Clock: Send + Sync + 'static {
    /// Seconds since the Unix epoch.
    fn now(&self) -> u64;
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

/// The wall clock plus an offset a test moves forward.
#[derive(Debug, Clone, Default)]
pub struct TestClock {
    offset: Arc<AtomicI64>,
}

impl TestClock {
    pub fn advance(&self, secs: i64) {
        self.offset.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for TestClock {
    fn now(&self) -> u64 {
        SystemClock
            .now()
            .saturating_add_signed(self.offset.load(Ordering::SeqCst))
    }
}

pub type SharedClock = Arc<dyn Clock>;
