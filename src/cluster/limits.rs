//! Fleet-wide rate limits (seed 004's design): a channel's payout rate and a reward kind's
//! crediting rate are capacities of the whole fleet, not of each node.
//!
//! Each limit is one key of the bucket `<namespace>_limits`: the tokens left and the time they
//! were counted at. Tokens accrue at the limit's rate up to a capacity of one batch (`batch`
//! worth of the rate). A node that needs tokens takes up to a batch of them with a
//! compare-and-set on the key's revision (a lost race reads again), and spends them locally;
//! tokens it has not spent within `batch` expire, so no node hoards. The key sees a few
//! updates a second per node, not one per payout.
//!
//! What this guarantees: tokens enter the fleet at `rate` (plus the bucket's capacity at the
//! start), and a token is spent at most `batch` after it was taken, so over any window of
//! length `W` the fleet spends at most `rate * W` plus three batches' worth (the bucket's
//! content, what nodes hold, what accrues while they hold it) whatever the node count.
//! Clocks: accrual is counted from the time stored in the key, by the clock of the node that
//! takes; a node whose clock runs ahead by `s` mints `s * rate` once, no more.

use crate::clock::{Clock, Millis};
use async_nats::jetstream::{self, kv};
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How much of the rate a node takes at once, and how long it may keep it.
pub const BATCH_DEFAULT: Duration = Duration::from_millis(100);
/// Compare-and-set attempts per take before the node waits for its next check.
const TAKE_ATTEMPTS: usize = 8;

/// What a limit's key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tokens {
    /// Tokens in the bucket at `at_ms`.
    pub left: u64,
    /// The time up to which accrual has been counted.
    pub at_ms: Millis,
}

/// The bucket as it stands at `now_ms`, given what the key held (`None`: never used, so
/// full), then a take of up to `want`: the new value and the tokens taken. Pure.
pub fn take(
    stored: Option<Tokens>,
    rate_per_s: u32,
    capacity: u64,
    want: u64,
    now_ms: Millis,
) -> (Tokens, u64) {
    let rate = u64::from(rate_per_s.max(1));
    let mut tokens = stored.unwrap_or(Tokens {
        left: capacity,
        at_ms: now_ms,
    });
    let elapsed = u64::try_from(now_ms.saturating_sub(tokens.at_ms)).unwrap_or(0);
    let minted = elapsed.saturating_mul(rate) / 1000;
    if tokens.left.saturating_add(minted) >= capacity {
        tokens = Tokens {
            left: capacity,
            at_ms: now_ms.max(tokens.at_ms),
        };
    } else if minted > 0 {
        // Only the time the minted tokens stand for is counted (rounded up, never beyond
        // `now`: a token is never minted twice from one millisecond): fractions carry over.
        let counted_ms = minted.saturating_mul(1000).div_ceil(rate);
        tokens = Tokens {
            left: tokens.left + minted,
            at_ms: tokens
                .at_ms
                .saturating_add(i64::try_from(counted_ms).unwrap_or(i64::MAX)),
        };
    }
    let taken = want.min(tokens.left);
    tokens.left -= taken;
    (tokens, taken)
}

/// The fleet's limits as one node uses them: one [`FleetLimiter`] per limit name.
pub struct FleetLimits {
    bucket: kv::Store,
    clock: Arc<dyn Clock>,
    runtime: tokio::runtime::Handle,
    batch: Duration,
    limiters: DashMap<String, Arc<FleetLimiter>>,
    taken: prometheus::IntCounterVec,
}

impl FleetLimits {
    /// Opens (or creates) the bucket `name` with `replicas`; takes run on `runtime`.
    pub async fn open(
        js: &jetstream::Context,
        name: &str,
        replicas: usize,
        clock: Arc<dyn Clock>,
        runtime: tokio::runtime::Handle,
        registry: &prometheus::Registry,
    ) -> Result<FleetLimits, String> {
        let bucket = match js.get_key_value(name).await {
            Ok(bucket) => bucket,
            Err(_) => {
                let created = js
                    .create_key_value(kv::Config {
                        bucket: name.to_owned(),
                        description: "fleet-wide rate limits: tokens left per limit".into(),
                        history: 1,
                        num_replicas: replicas,
                        storage: jetstream::stream::StorageType::File,
                        ..Default::default()
                    })
                    .await;
                match created {
                    Ok(bucket) => bucket,
                    // Another node created it at the same moment.
                    Err(e) => js
                        .get_key_value(name)
                        .await
                        .map_err(|_| format!("bucket {name}: {e}"))?,
                }
            }
        };
        let taken = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "hongbao_fleet_tokens_taken_total",
                "Tokens this node took from the fleet's rate limits, by limit",
            ),
            &["limit"],
        )
        .map_err(|e| e.to_string())?;
        registry
            .register(Box::new(taken.clone()))
            .map_err(|e| e.to_string())?;
        Ok(FleetLimits {
            bucket,
            clock,
            runtime,
            batch: BATCH_DEFAULT,
            limiters: DashMap::new(),
            taken,
        })
    }

    /// The limiter of `name` (`payout.bank`, `credit.cash`) at `rate_per_s`, shared by every
    /// cell of this node.
    pub fn limiter(&self, name: &str, rate_per_s: u32) -> Arc<FleetLimiter> {
        self.limiters
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(FleetLimiter {
                    name: name.to_owned(),
                    rate_per_s: rate_per_s.max(1),
                    batch: self.batch,
                    local: Mutex::new(Local {
                        tokens: 0,
                        until: Instant::now(),
                    }),
                    taking: AtomicBool::new(false),
                    bucket: self.bucket.clone(),
                    clock: self.clock.clone(),
                    runtime: self.runtime.clone(),
                    taken: self.taken.with_label_values(&[name]),
                })
            })
            .clone()
    }
}

struct Local {
    tokens: u64,
    /// Tokens held are spent before this, or never.
    until: Instant,
}

/// One limit as one node spends it.
pub struct FleetLimiter {
    name: String,
    rate_per_s: u32,
    batch: Duration,
    local: Mutex<Local>,
    /// A take from the bucket is under way.
    taking: AtomicBool,
    bucket: kv::Store,
    clock: Arc<dyn Clock>,
    runtime: tokio::runtime::Handle,
    taken: prometheus::IntCounter,
}

impl FleetLimiter {
    /// The tokens one take asks for: a batch's worth of the rate, at least one.
    fn batch_tokens(&self) -> u64 {
        (u64::from(self.rate_per_s) * self.batch.as_millis() as u64 / 1000).max(1)
    }

    /// Spends a token this node holds; without one, starts a take from the fleet's bucket and
    /// says how long to wait before asking again.
    pub fn check(self: &Arc<Self>) -> Result<(), Duration> {
        {
            let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
            if local.tokens > 0 && Instant::now() < local.until {
                local.tokens -= 1;
                return Ok(());
            }
            local.tokens = 0;
        }
        if !self.taking.swap(true, Ordering::AcqRel) {
            let limiter = self.clone();
            self.runtime.spawn(async move {
                limiter.take_batch().await;
                limiter.taking.store(false, Ordering::Release);
            });
        }
        // About the time one token accrues, within reason.
        Err(
            (Duration::from_millis(1000 / u64::from(self.rate_per_s).max(1)))
                .clamp(Duration::from_millis(2), self.batch / 2),
        )
    }

    /// Takes up to a batch from the bucket (compare-and-set on the key's revision).
    async fn take_batch(&self) {
        let want = self.batch_tokens();
        for _ in 0..TAKE_ATTEMPTS {
            let entry = match self.bucket.entry(self.name.as_str()).await {
                Ok(entry) => entry.filter(|e| e.operation == kv::Operation::Put),
                Err(e) => {
                    tracing::warn!(limit = %self.name, error = %e, "fleet limit unreadable");
                    return;
                }
            };
            let stored = entry
                .as_ref()
                .and_then(|e| serde_json::from_slice::<Tokens>(&e.value).ok());
            let (next, got) = take(stored, self.rate_per_s, want, want, self.clock.now_ms());
            let Ok(value) = serde_json::to_vec(&next) else {
                return;
            };
            let written = match &entry {
                Some(e) => self
                    .bucket
                    .update(self.name.as_str(), value.into(), e.revision)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                None => self
                    .bucket
                    .create(self.name.as_str(), value.into())
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
            };
            match written {
                Ok(()) => {
                    if got > 0 {
                        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
                        local.tokens += got;
                        local.until = Instant::now() + self.batch;
                        self.taken.inc_by(got);
                    }
                    return;
                }
                // Another node took meanwhile: read again.
                Err(e) => tracing::trace!(limit = %self.name, error = %e, "fleet limit raced"),
            }
        }
    }
}

impl crate::flows::Pacer for Arc<FleetLimiter> {
    fn check(&self) -> Result<(), Duration> {
        FleetLimiter::check(self)
    }
}

impl crate::flows::FleetPacing for FleetLimits {
    fn pacer(&self, name: &str, rate_per_s: u32) -> Arc<dyn crate::flows::Pacer> {
        Arc::new(self.limiter(name, rate_per_s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_new_limit_starts_full_and_accrues_at_its_rate_up_to_its_capacity() {
        let (t, got) = take(None, 100, 10, 4, 1_000);
        assert_eq!((t.left, got), (6, 4));
        // 50 ms at 100/s: 5 tokens.
        let (t, got) = take(Some(t), 100, 10, 0, 1_050);
        assert_eq!((t.left, got), (10, 0));
        // Capped at the capacity however long it rested.
        let (t, _) = take(Some(Tokens { left: 0, at_ms: 0 }), 100, 10, 0, 60_000);
        assert_eq!(t.left, 10);
    }

    #[test]
    fn fractions_of_a_token_carry_over() {
        // 3 tokens/s: 400 ms mints 1 token and counts the 334 ms it took; the rest stays, so
        // the second token is there at 668 ms, not before.
        let start = Tokens { left: 0, at_ms: 0 };
        let (t, _) = take(Some(start), 3, 10, 0, 400);
        assert_eq!((t.left, t.at_ms), (1, 334));
        let (t, _) = take(Some(t), 3, 10, 0, 667);
        assert_eq!(t.left, 1);
        let (t, _) = take(Some(t), 3, 10, 0, 668);
        assert_eq!(t.left, 2);
    }

    proptest! {
        #[test]
        fn takes_never_exceed_the_capacity_plus_the_rate_over_time(
            rate in 1u32..5_000,
            capacity in 1u64..500,
            steps in proptest::collection::vec((0i64..300, 0u64..1_000), 1..60),
        ) {
            let (mut stored, mut now, mut total) = (None, 0i64, 0u64);
            for (wait, want) in steps {
                now += wait;
                let (next, got) = take(stored, rate, capacity, want, now);
                prop_assert!(got <= want && next.left <= capacity);
                total += got;
                stored = Some(next);
            }
            let bound = capacity + u64::try_from(now).unwrap() * u64::from(rate) / 1000;
            prop_assert!(total <= bound, "took {total} > {bound}");
        }
    }
}
