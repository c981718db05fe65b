//! Repeated log lines, rate-limited per call site with a count of what was held back.
//!
//! A failure that refuses every request (a stopped journal, a lost JetStream) must not turn
//! into one warning per request: 40 s of load once wrote 449,000 lines (issue 15). A site that
//! can fire per request logs through [`warn_limited!`]: the first [`BURST`] lines pass, then at
//! most one per second, and the next line that passes carries `suppressed = N`, the lines held
//! back since the previous one.

use governor::{DefaultDirectRateLimiter, Quota};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

/// Lines a site may log at once before the limit applies.
pub const BURST: u32 = 10;
/// Lines per second a site may log after its burst.
pub const PER_SECOND: u32 = 1;

/// One call site's limit and its count of lines held back.
pub struct Limited {
    limiter: DefaultDirectRateLimiter,
    suppressed: AtomicU64,
}

impl Limited {
    pub fn new(per_second: u32, burst: u32) -> Limited {
        let quota = Quota::per_second(NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        Limited {
            limiter: DefaultDirectRateLimiter::direct(quota),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)`: log this line, `n` were held back since the last one logged; `None`: hold
    /// it back (counted).
    pub fn admit(&self) -> Option<u64> {
        if self.limiter.check().is_ok() {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl Default for Limited {
    fn default() -> Limited {
        Limited::new(PER_SECOND, BURST)
    }
}

/// `tracing::warn!` limited per call site ([`Limited`]); the line carries `suppressed`.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static SITE: std::sync::LazyLock<$crate::logs::Limited> =
            std::sync::LazyLock::new($crate::logs::Limited::default);
        if let Some(suppressed) = SITE.admit() {
            tracing::warn!(suppressed, $($arg)+);
        }
    }};
}

/// `tracing::error!` limited per call site, as [`warn_limited!`].
#[macro_export]
macro_rules! error_limited {
    ($($arg:tt)+) => {{
        static SITE: std::sync::LazyLock<$crate::logs::Limited> =
            std::sync::LazyLock::new($crate::logs::Limited::default);
        if let Some(suppressed) = SITE.admit() {
            tracing::error!(suppressed, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_lines_are_held_back_and_counted_on_the_next_one_logged() {
        // Goal: after its burst a site logs nothing more within the second, and the line that
        // passes once the limit allows it carries the count of those held back.
        let site = Limited::new(1, 3);
        assert_eq!(
            (0..3).map(|_| site.admit()).collect::<Vec<_>>(),
            vec![Some(0), Some(0), Some(0)]
        );
        for _ in 0..1_000 {
            assert_eq!(site.admit(), None);
        }
        std::thread::sleep(std::time::Duration::from_millis(1_100));
        assert_eq!(site.admit(), Some(1_000));
        assert_eq!(site.admit(), None);
    }
}
