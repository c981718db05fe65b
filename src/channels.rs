//! Payment channels (W12): the adapter trait the payout lanes call, and a simulator that stands
//! in for the bank, Alipay and the in-app cashier.
//!
//! The simulator behaves like an external system: it keeps its own statement in its own sled
//! database (`<data>/channels`), flushed before it answers, so a crash of hongbao never loses a
//! payment the channel made; it is idempotent by order id (a paid order is never paid again,
//! a failed one may be retried); and it injects latency, throttling (its capacity), failures
//! and timeouts as configured at run time (`PUT /v1/admin/channels/{channel}`). A timeout is an
//! unknown outcome: half of the simulated timeouts did pay. Callers resolve it with `query`,
//! never by paying again blindly.

use crate::clock::{Clock, Millis};
use crate::domain::withdrawal::Channel;
use crate::events::{codec, StoreError};
use crate::ids::Id;
use crate::money::Fen;
use futures::future::BoxFuture;
use governor::{DefaultDirectRateLimiter, Quota};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// What a payment attempt returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayOutcome {
    Succeeded,
    Failed(String),
    /// Over the channel's capacity: nothing happened, retry later.
    Throttled,
    /// No answer: the payment may or may not have happened. Query it.
    Timeout,
}

/// What the channel's record says about an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryOutcome {
    /// Paid, with the amount the channel paid (reconciliation compares it with the order's).
    Succeeded {
        amount: Fen,
    },
    Failed(String),
    NoRecord,
}

/// A payment channel as the payout lanes see it.
pub trait PaymentChannel: Send + Sync + 'static {
    fn pay(
        &self,
        channel: Channel,
        order_id: &Id,
        amount: Fen,
        account: &str,
    ) -> BoxFuture<'static, PayOutcome>;
    fn query(&self, channel: Channel, order_id: &Id) -> BoxFuture<'static, QueryOutcome>;
}

/// Tunables of one simulated channel.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ChannelSettings {
    /// Payments per second before it answers throttled.
    pub rate_per_s: u32,
    pub latency_ms: u64,
    /// Fraction (0..1) of payments refused.
    pub fail_rate: f64,
    /// Fraction (0..1) of payments that time out (half of them did pay).
    pub timeout_rate: f64,
}

impl Default for ChannelSettings {
    /// Healthy and fast: a first run on a laptop sees payouts complete at once.
    fn default() -> Self {
        ChannelSettings {
            rate_per_s: 10_000,
            latency_ms: 2,
            fail_rate: 0.0,
            timeout_rate: 0.0,
        }
    }
}

/// Highest simulated latency: beyond it a test would only be waiting.
pub const LATENCY_MS_MAX: u64 = 60_000;

impl ChannelSettings {
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.fail_rate) || !(0.0..=1.0).contains(&self.timeout_rate) {
            return Err("fail_rate and timeout_rate are fractions from 0 to 1".into());
        }
        if self.fail_rate + self.timeout_rate > 1.0 {
            return Err("fail_rate + timeout_rate cannot exceed 1".into());
        }
        if self.rate_per_s == 0 {
            return Err("rate_per_s must be positive".into());
        }
        if self.latency_ms > LATENCY_MS_MAX {
            return Err(format!("latency_ms is at most {LATENCY_MS_MAX}"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordStatus {
    Succeeded,
    Failed,
}

/// One line of a channel's statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementLine {
    pub order_id: String,
    pub amount: Fen,
    pub status: RecordStatus,
    pub at_ms: Millis,
    /// Payment calls received for this order (idempotent repeats included).
    pub calls: u32,
}

/// Locks that make a payment call's read-decide-write atomic per order: the lock of an order is
/// one of this many, chosen by a hash of the channel and order id. Striped, so memory stays
/// bounded whatever the number of orders; two orders sharing a stripe only wait for each other.
const ORDER_LOCK_STRIPES: usize = 256;

struct SimChannel {
    settings: RwLock<ChannelSettings>,
    limiter: Mutex<DefaultDirectRateLimiter>,
    statement: sled::Tree,
}

fn limiter(rate_per_s: u32) -> DefaultDirectRateLimiter {
    let rate = NonZeroU32::new(rate_per_s.max(1)).expect("positive");
    DefaultDirectRateLimiter::direct(Quota::per_second(rate))
}

fn io(e: sled::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

/// The simulated bank, Alipay and cashier, with their statements on disk.
pub struct SimulatedChannels {
    db: sled::Db,
    settings: sled::Tree,
    channels: BTreeMap<Channel, SimChannel>,
    clock: Arc<dyn Clock>,
    /// See [`ORDER_LOCK_STRIPES`]; held across a call's read, decision and durable write.
    order_locks: Vec<tokio::sync::Mutex<()>>,
}

impl SimulatedChannels {
    pub fn open(dir: &Path, clock: Arc<dyn Clock>) -> Result<Arc<SimulatedChannels>, StoreError> {
        let db = sled::Config::new()
            .path(dir.join("channels"))
            .flush_every_ms(None)
            .open()
            .map_err(io)?;
        let settings = db.open_tree("settings").map_err(io)?;
        let mut channels = BTreeMap::new();
        for channel in Channel::ALL {
            let stored: ChannelSettings = match settings.get(channel.as_str()).map_err(io)? {
                Some(bytes) => codec::decode(&bytes)?,
                None => ChannelSettings::default(),
            };
            channels.insert(
                channel,
                SimChannel {
                    limiter: Mutex::new(limiter(stored.rate_per_s)),
                    settings: RwLock::new(stored),
                    statement: db.open_tree(format!("statement:{channel}")).map_err(io)?,
                },
            );
        }
        Ok(Arc::new(SimulatedChannels {
            db,
            settings,
            channels,
            clock,
            order_locks: (0..ORDER_LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }))
    }

    fn channel(&self, channel: Channel) -> &SimChannel {
        self.channels
            .get(&channel)
            .expect("every channel is simulated")
    }

    pub fn settings(&self, channel: Channel) -> ChannelSettings {
        *self
            .channel(channel)
            .settings
            .read()
            .expect("settings lock")
    }

    /// Changes a channel's behaviour (kept across restarts).
    pub fn configure(&self, channel: Channel, settings: ChannelSettings) -> Result<(), StoreError> {
        settings.validate().map_err(StoreError::Corrupt)?;
        let sim = self.channel(channel);
        self.settings
            .insert(channel.as_str(), codec::encode(&settings)?)
            .map_err(io)?;
        self.db.flush().map_err(io)?;
        *sim.settings.write().expect("settings lock") = settings;
        *sim.limiter.lock().expect("limiter lock") = limiter(settings.rate_per_s);
        Ok(())
    }

    /// The channel's own record, by order id (at most `limit` lines).
    pub fn statement(
        &self,
        channel: Channel,
        limit: usize,
    ) -> Result<Vec<StatementLine>, StoreError> {
        self.statement_after(channel, None, limit)
    }

    /// At most `limit` lines of the record with order ids after `after` (from the first
    /// without), in order id order: a range scan from the cursor, so a page costs its own
    /// lines whatever its depth.
    pub fn statement_after(
        &self,
        channel: Channel,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StatementLine>, StoreError> {
        use std::ops::Bound;
        let start = match after {
            Some(order_id) => Bound::Excluded(order_id.as_bytes().to_vec()),
            None => Bound::Unbounded,
        };
        self.channel(channel)
            .statement
            .range::<Vec<u8>, _>((start, Bound::Unbounded))
            .take(limit)
            .map(|item| Ok(codec::decode(&item.map_err(io)?.1)?))
            .collect()
    }

    /// Every line of a channel's statement, in order id order, read lazily: the audit walks a
    /// statement of any size in constant memory.
    pub fn lines(
        &self,
        channel: Channel,
    ) -> impl Iterator<Item = Result<StatementLine, StoreError>> + '_ {
        self.channel(channel)
            .statement
            .iter()
            .map(|item| Ok(codec::decode(&item.map_err(io)?.1)?))
    }

    /// Writes a statement line exactly as given, replacing the order's line, durably; bypasses
    /// every rule of the simulated channel (no idempotency, no amount check, and no exclusion
    /// with a payment call in flight for the same order). For tests that corrupt the channel's
    /// side of the books, and for operators repairing a simulated statement by hand; the
    /// reconciler and `hongbao audit` then judge the line like any other.
    pub fn record_line(&self, channel: Channel, line: &StatementLine) -> Result<(), StoreError> {
        self.channel(channel)
            .statement
            .insert(line.order_id.as_str(), codec::encode(line)?)
            .map_err(io)?;
        self.db.flush().map_err(io)?;
        Ok(())
    }

    fn record(&self, channel: Channel, order_id: &Id) -> Result<Option<StatementLine>, StoreError> {
        self.channel(channel)
            .statement
            .get(order_id.as_str())
            .map_err(io)?
            .map(|bytes| Ok(codec::decode(&bytes)?))
            .transpose()
    }

    async fn write(&self, channel: Channel, line: &StatementLine) -> Result<(), StoreError> {
        self.channel(channel)
            .statement
            .insert(line.order_id.as_str(), codec::encode(line)?)
            .map_err(io)?;
        // Durable before the channel answers, like a real channel's books. A blocking flush on
        // the blocking pool: sled 0.34's `flush_async` can deadlock when several run at once
        // (spacejam/sled#1308, fixed after the last release).
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| StoreError::Io(e.to_string()))?
            .map_err(io)?;
        Ok(())
    }

    fn order_lock(&self, channel: Channel, order_id: &Id) -> &tokio::sync::Mutex<()> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        // A fixed hasher: the stripe of an order is the same in every call.
        let hash = BuildHasherDefault::<DefaultHasher>::default()
            .hash_one((channel.as_str(), order_id.as_str()));
        &self.order_locks[(hash % ORDER_LOCK_STRIPES as u64) as usize]
    }

    async fn pay_now(self: Arc<Self>, channel: Channel, order_id: Id, amount: Fen) -> PayOutcome {
        let settings = self.settings(channel);
        if settings.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(settings.latency_ms)).await;
        }
        // One call per order at a time, from reading the line to its durable write: two
        // concurrent calls can neither both pay nor write a refusal over a payment, and every
        // call is counted (issue 11).
        let _order = self.order_lock(channel, &order_id).lock().await;
        let previous = match self.record(channel, &order_id) {
            Ok(previous) => previous,
            Err(e) => return PayOutcome::Failed(format!("channel error: {e}")),
        };
        if let Some(line) = previous.as_ref().filter(|l| l.amount != amount) {
            // An order id is one payment of one amount (W10): a repeat for another amount is
            // someone else's mistake, refused without touching the line.
            return PayOutcome::Failed(format!(
                "order {order_id} was sent for {}, not {amount}",
                line.amount
            ));
        }
        let calls = previous.as_ref().map(|l| l.calls).unwrap_or(0) + 1;
        if let Some(line) = &previous {
            if line.status == RecordStatus::Succeeded {
                // Idempotent: paid once, never again. The repeat is counted for the statement.
                let line = StatementLine {
                    calls,
                    ..line.clone()
                };
                let _ = self.write(channel, &line).await;
                return PayOutcome::Succeeded;
            }
        }
        if self
            .channel(channel)
            .limiter
            .lock()
            .expect("limiter lock")
            .check()
            .is_err()
        {
            return PayOutcome::Throttled;
        }
        let roll: f64 = rand::random();
        let line = |status| StatementLine {
            order_id: order_id.to_string(),
            amount,
            status,
            at_ms: self.clock.now_ms(),
            calls,
        };
        if roll < settings.timeout_rate {
            // The answer is lost; whether the money moved is up to the coin.
            if rand::random::<bool>() {
                if let Err(e) = self.write(channel, &line(RecordStatus::Succeeded)).await {
                    tracing::error!(error = %e, "channel simulator cannot record");
                }
            }
            return PayOutcome::Timeout;
        }
        if roll < settings.timeout_rate + settings.fail_rate {
            return match self.write(channel, &line(RecordStatus::Failed)).await {
                Ok(()) => PayOutcome::Failed("declined by the channel".into()),
                Err(e) => PayOutcome::Failed(format!("channel error: {e}")),
            };
        }
        match self.write(channel, &line(RecordStatus::Succeeded)).await {
            Ok(()) => PayOutcome::Succeeded,
            // The channel could not record it: it did not pay.
            Err(e) => PayOutcome::Failed(format!("channel error: {e}")),
        }
    }
}

/// The simulator behind the trait.
#[derive(Clone)]
pub struct Simulator(pub Arc<SimulatedChannels>);

impl PaymentChannel for Simulator {
    fn pay(
        &self,
        channel: Channel,
        order_id: &Id,
        amount: Fen,
        _account: &str,
    ) -> BoxFuture<'static, PayOutcome> {
        Box::pin(self.0.clone().pay_now(channel, order_id.clone(), amount))
    }

    fn query(&self, channel: Channel, order_id: &Id) -> BoxFuture<'static, QueryOutcome> {
        let outcome = match self.0.record(channel, order_id) {
            Ok(None) => QueryOutcome::NoRecord,
            Ok(Some(line)) if line.status == RecordStatus::Succeeded => QueryOutcome::Succeeded {
                amount: line.amount,
            },
            Ok(Some(_)) => QueryOutcome::Failed("declined by the channel".into()),
            Err(e) => QueryOutcome::Failed(format!("channel error: {e}")),
        };
        Box::pin(async move { outcome })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn sim() -> (tempfile::TempDir, Simulator) {
        let dir = tempfile::tempdir().unwrap();
        let channels = SimulatedChannels::open(dir.path(), Arc::new(ManualClock::new(0))).unwrap();
        (dir, Simulator(channels))
    }

    fn id(s: &str) -> Id {
        Id::parse(s).unwrap()
    }

    #[tokio::test]
    async fn a_paid_order_is_never_paid_twice_and_failures_may_be_retried() {
        // Goal: idempotent by order id for success; a refusal does not stick.
        let (_dir, sim) = sim();
        assert_eq!(
            sim.pay(Channel::Bank, &id("o1"), Fen::new(5), "acct").await,
            PayOutcome::Succeeded
        );
        sim.0
            .configure(
                Channel::Bank,
                ChannelSettings {
                    fail_rate: 1.0,
                    latency_ms: 0,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(
            sim.pay(Channel::Bank, &id("o1"), Fen::new(5), "acct").await,
            PayOutcome::Succeeded,
            "paid before"
        );
        assert!(matches!(
            sim.pay(Channel::Bank, &id("o2"), Fen::new(5), "acct").await,
            PayOutcome::Failed(_)
        ));
        assert!(matches!(
            sim.query(Channel::Bank, &id("o2")).await,
            QueryOutcome::Failed(_)
        ));
        sim.0
            .configure(
                Channel::Bank,
                ChannelSettings {
                    latency_ms: 0,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(
            sim.pay(Channel::Bank, &id("o2"), Fen::new(5), "acct").await,
            PayOutcome::Succeeded
        );
        let statement = sim.0.statement(Channel::Bank, 10).unwrap();
        assert_eq!(statement.len(), 2);
        assert!(statement
            .iter()
            .all(|l| l.status == RecordStatus::Succeeded));
        assert_eq!(statement[0].calls, 2);
        assert_eq!(
            sim.query(Channel::Alipay, &id("o1")).await,
            QueryOutcome::NoRecord,
            "channels are separate"
        );
    }

    #[tokio::test]
    async fn timeouts_are_unknown_outcomes_that_a_query_resolves() {
        // Goal: with every call timing out, some orders were paid and some not; the query tells.
        let (_dir, sim) = sim();
        sim.0
            .configure(
                Channel::Alipay,
                ChannelSettings {
                    timeout_rate: 1.0,
                    latency_ms: 0,
                    ..Default::default()
                },
            )
            .unwrap();
        let mut paid = 0;
        for i in 0..40 {
            let order = id(&format!("t{i}"));
            assert_eq!(
                sim.pay(Channel::Alipay, &order, Fen::new(1), "a").await,
                PayOutcome::Timeout
            );
            match sim.query(Channel::Alipay, &order).await {
                QueryOutcome::Succeeded { amount } => {
                    assert_eq!(amount, Fen::new(1));
                    paid += 1
                }
                QueryOutcome::NoRecord => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(paid > 0 && paid < 40, "{paid} of 40 paid");
    }

    #[tokio::test]
    async fn capacity_throttles_and_settings_survive_a_restart() {
        // Goal: beyond rate_per_s the channel answers throttled; configuration is persistent.
        let dir = tempfile::tempdir().unwrap();
        let channels = SimulatedChannels::open(dir.path(), Arc::new(ManualClock::new(0))).unwrap();
        let settings = ChannelSettings {
            rate_per_s: 2,
            latency_ms: 0,
            fail_rate: 0.0,
            timeout_rate: 0.0,
        };
        channels.configure(Channel::Change, settings).unwrap();
        let sim = Simulator(channels.clone());
        let outcomes = futures::future::join_all(
            (0..10).map(|i| sim.pay(Channel::Change, &id(&format!("c{i}")), Fen::new(1), "u")),
        )
        .await;
        assert!(outcomes.contains(&PayOutcome::Throttled));
        assert!(outcomes.contains(&PayOutcome::Succeeded));
        assert!(ChannelSettings {
            fail_rate: 1.5,
            ..settings
        }
        .validate()
        .is_err());
        drop((sim, channels));
        let reopened = SimulatedChannels::open(dir.path(), Arc::new(ManualClock::new(0))).unwrap();
        assert_eq!(reopened.settings(Channel::Change), settings);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_calls_for_one_order_keep_one_line_and_pay_once() {
        // Goal: W10 at the channel: 20 concurrent calls for one order (with refusals mixed in)
        // are handled one at a time: every call is counted on the one line, no refusal is
        // written over a payment, and once paid every later call answers paid.
        for fail_rate in [0.0, 0.5] {
            let (_dir, sim) = sim();
            sim.0
                .configure(
                    Channel::Bank,
                    ChannelSettings {
                        latency_ms: 0,
                        fail_rate,
                        ..Default::default()
                    },
                )
                .unwrap();
            let order = id("one-order");
            let outcomes = futures::future::join_all((0..20).map(|_| {
                let (sim, order) = (sim.clone(), order.clone());
                tokio::spawn(async move { sim.pay(Channel::Bank, &order, Fen::new(7), "a").await })
            }))
            .await;
            let outcomes: Vec<PayOutcome> = outcomes.into_iter().map(|o| o.unwrap()).collect();
            let statement = sim.0.statement(Channel::Bank, 10).unwrap();
            assert_eq!(statement.len(), 1, "one line per order");
            assert_eq!(statement[0].calls, 20, "every call counted: {statement:?}");
            let paid = outcomes.contains(&PayOutcome::Succeeded);
            assert_eq!(
                statement[0].status == RecordStatus::Succeeded,
                paid,
                "fail rate {fail_rate}: the line says paid exactly when a call was answered paid"
            );
            assert_eq!(statement[0].amount, Fen::new(7));
        }
    }

    #[tokio::test]
    async fn a_repeat_with_another_amount_is_refused_and_changes_nothing() {
        // Goal: an order id is one payment of one amount: a repeat asking for another amount
        // is refused, and the line keeps the amount paid.
        let (_dir, sim) = sim();
        sim.0
            .configure(
                Channel::Bank,
                ChannelSettings {
                    latency_ms: 0,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(
            sim.pay(Channel::Bank, &id("o9"), Fen::new(5), "a").await,
            PayOutcome::Succeeded
        );
        assert!(matches!(
            sim.pay(Channel::Bank, &id("o9"), Fen::new(6), "a").await,
            PayOutcome::Failed(_)
        ));
        let statement = sim.0.statement(Channel::Bank, 10).unwrap();
        assert_eq!(
            (statement[0].amount, statement[0].status),
            (Fen::new(5), RecordStatus::Succeeded)
        );
    }
}
