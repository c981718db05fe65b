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
use async_nats::jetstream::kv;
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

/// Locks that make a payment call's read-decide-write atomic per order within one process: the
/// lock of an order is one of this many, chosen by a hash of the channel and order id. Striped,
/// so memory stays bounded whatever the number of orders; two orders sharing a stripe only wait
/// for each other. Between processes (the nodes of a fleet sharing one book) the write itself
/// is a compare-and-set, and a call that lost the race reads again and decides again.
const ORDER_LOCK_STRIPES: usize = 256;

/// Rounds of read-decide-write a payment call tries before it answers "channel busy" (each lost
/// round means another call for the same order wrote first).
const WRITE_ROUNDS: usize = 16;

/// The key of a channel's settings in its shared bucket (statement keys are hex digits).
const SETTINGS_KEY: &str = "_settings";

struct SimChannel {
    settings: RwLock<ChannelSettings>,
    /// The capacity's limiter and the rate it was built for.
    limiter: Mutex<(u32, DefaultDirectRateLimiter)>,
}

fn limiter(rate_per_s: u32) -> DefaultDirectRateLimiter {
    let rate = NonZeroU32::new(rate_per_s.max(1)).expect("positive");
    DefaultDirectRateLimiter::direct(Quota::per_second(rate))
}

fn io(e: sled::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

fn kv_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!("channel book: {e}"))
}

/// Where the simulated channels keep their books.
enum Book {
    /// One node: a sled database in its data directory.
    Local {
        db: sled::Db,
        settings: sled::Tree,
        statements: BTreeMap<Channel, sled::Tree>,
    },
    /// A fleet: one JetStream key-value bucket per channel (`<namespace>_channel_bank`), shared
    /// by every node, so a partition that moves to another node finds every payment its
    /// previous holder made. Lines are keyed by the order id in hex (any id is a valid key,
    /// and hex keeps the ids' order); the settings are the key `_settings`.
    Shared {
        buckets: BTreeMap<Channel, kv::Store>,
        /// The runtime of the node's NATS client, where every bucket call runs.
        runtime: tokio::runtime::Handle,
    },
}

/// What a line was when read: what the compare-and-set of its next write expects.
enum Version {
    Local(Option<sled::IVec>),
    /// The entry's revision; 0 for no entry.
    Shared(u64),
}

/// The simulated bank, Alipay and cashier, with their statements on disk.
pub struct SimulatedChannels {
    book: Book,
    channels: BTreeMap<Channel, SimChannel>,
    clock: Arc<dyn Clock>,
    /// See [`ORDER_LOCK_STRIPES`]; held across a call's read, decision and durable write.
    order_locks: Vec<tokio::sync::Mutex<()>>,
}

impl SimulatedChannels {
    fn with_book(
        book: Book,
        stored: impl Fn(Channel) -> ChannelSettings,
        clock: Arc<dyn Clock>,
    ) -> Arc<SimulatedChannels> {
        let channels = Channel::ALL
            .into_iter()
            .map(|channel| {
                let settings = stored(channel);
                let sim = SimChannel {
                    limiter: Mutex::new((settings.rate_per_s, limiter(settings.rate_per_s))),
                    settings: RwLock::new(settings),
                };
                (channel, sim)
            })
            .collect();
        Arc::new(SimulatedChannels {
            book,
            channels,
            clock,
            order_locks: (0..ORDER_LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        })
    }

    /// The channels of one node, their books in `<dir>/channels`.
    pub fn open(dir: &Path, clock: Arc<dyn Clock>) -> Result<Arc<SimulatedChannels>, StoreError> {
        // Reopened in the same process (a restart in a test, `audit` after `serve` stopped):
        // wait out sled's pool still holding the old database for a moment.
        let db = crate::events::sled_store::open_waiting_for_lock(
            &sled::Config::new()
                .path(dir.join("channels"))
                .flush_every_ms(None),
            dir,
        )?;
        let settings = db.open_tree("settings").map_err(io)?;
        let mut statements = BTreeMap::new();
        let mut stored = BTreeMap::new();
        for channel in Channel::ALL {
            let value: ChannelSettings = match settings.get(channel.as_str()).map_err(io)? {
                Some(bytes) => codec::decode(&bytes)?,
                None => ChannelSettings::default(),
            };
            stored.insert(channel, value);
            statements.insert(
                channel,
                db.open_tree(format!("statement:{channel}")).map_err(io)?,
            );
        }
        let book = Book::Local {
            db,
            settings,
            statements,
        };
        Ok(Self::with_book(book, |c| stored[&c], clock))
    }

    /// The channels of a fleet, their books in the JetStream key-value buckets
    /// `<namespace>_channel_<name>` (created with `replicas` when absent, if `replicas` is
    /// given; a reader gives none and is refused when a bucket is missing), shared by every
    /// node that opens them. Bucket calls run on `runtime` (the NATS client's).
    pub async fn open_shared(
        js: &async_nats::jetstream::Context,
        namespace: &str,
        replicas: Option<usize>,
        clock: Arc<dyn Clock>,
        runtime: tokio::runtime::Handle,
    ) -> Result<Arc<SimulatedChannels>, StoreError> {
        let mut buckets = BTreeMap::new();
        let mut stored = BTreeMap::new();
        for channel in Channel::ALL {
            let name = format!("{namespace}_channel_{}", channel.as_str());
            let (bucket, settings) = Self::bucket(js, &name, channel, replicas).await?;
            let value = match settings {
                Some(bytes) => codec::decode(&bytes)?,
                None => ChannelSettings::default(),
            };
            stored.insert(channel, value);
            buckets.insert(channel, bucket);
        }
        let book = Book::Shared { buckets, runtime };
        Ok(Self::with_book(book, |c| stored[&c], clock))
    }

    /// The bucket `name`, created with `replicas` when absent, and its stored settings. Nodes
    /// starting together race to create it, and on three servers a bucket just created (by
    /// this node or another) answers its first reads with "no responders" until its stream
    /// has a leader: it is read again (for up to about 10 s) rather than failing the node's
    /// start (seen: the third node of `scripts/cluster.sh` exited so on fresh servers).
    async fn bucket(
        js: &async_nats::jetstream::Context,
        name: &str,
        channel: Channel,
        replicas: Option<usize>,
    ) -> Result<(kv::Store, Option<Vec<u8>>), StoreError> {
        let mut last = String::new();
        for _ in 0..40 {
            let found = match (js.get_key_value(name).await, replicas) {
                (Ok(bucket), _) => Some(bucket),
                (Err(e), None) => return Err(kv_error(format!("bucket {name}: {e}"))),
                (Err(_), Some(replicas)) => {
                    let created = js
                        .create_key_value(kv::Config {
                            bucket: name.to_owned(),
                            description: format!(
                                "the simulated {channel} channel's statement and settings"
                            ),
                            history: 1,
                            num_replicas: replicas,
                            storage: async_nats::jetstream::stream::StorageType::File,
                            ..Default::default()
                        })
                        .await;
                    match created {
                        Ok(bucket) => Some(bucket),
                        // Another node is creating it: read it again shortly.
                        Err(e) => {
                            last = e.to_string();
                            None
                        }
                    }
                }
            };
            if let Some(bucket) = found {
                match bucket.get(SETTINGS_KEY).await {
                    Ok(settings) => return Ok((bucket, settings.map(|b| b.to_vec()))),
                    // No leader yet for the bucket's stream: read it again shortly.
                    Err(e) => last = e.to_string(),
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(kv_error(format!("bucket {name}: {last}")))
    }

    /// Whether the books are a fleet's (JetStream) rather than one node's.
    pub fn is_shared(&self) -> bool {
        matches!(self.book, Book::Shared { .. })
    }

    fn channel(&self, channel: Channel) -> &SimChannel {
        self.channels
            .get(&channel)
            .expect("every channel is simulated")
    }

    /// Runs a bucket call on the NATS client's runtime.
    async fn on_client<T, F>(runtime: &tokio::runtime::Handle, call: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        runtime
            .spawn(call)
            .await
            .map_err(|e| StoreError::Io(format!("channel book call: {e}")))?
    }

    /// Writes `key` in a shared bucket whatever it held (no compare-and-set).
    async fn put_shared(
        runtime: &tokio::runtime::Handle,
        bucket: &kv::Store,
        key: String,
        value: Vec<u8>,
    ) -> Result<(), StoreError> {
        let bucket = bucket.clone();
        Self::on_client(runtime, async move {
            bucket
                .put(key, value.into())
                .await
                .map(|_| ())
                .map_err(kv_error)
        })
        .await
    }

    /// The settings as this process last read them.
    pub fn settings(&self, channel: Channel) -> ChannelSettings {
        *self
            .channel(channel)
            .settings
            .read()
            .expect("settings lock")
    }

    /// The settings in force: on a fleet, read from the shared book (another node may have
    /// changed them), and kept as this process's.
    pub async fn current_settings(&self, channel: Channel) -> Result<ChannelSettings, StoreError> {
        let Book::Shared { buckets, runtime } = &self.book else {
            return Ok(self.settings(channel));
        };
        let bucket = buckets[&channel].clone();
        let stored = Self::on_client(runtime, async move {
            bucket.get(SETTINGS_KEY).await.map_err(kv_error)
        })
        .await?;
        let settings = match stored {
            Some(bytes) => codec::decode(&bytes)?,
            None => ChannelSettings::default(),
        };
        self.adopt(channel, settings);
        Ok(settings)
    }

    fn adopt(&self, channel: Channel, settings: ChannelSettings) {
        let sim = self.channel(channel);
        *sim.settings.write().expect("settings lock") = settings;
        let mut limiter_slot = sim.limiter.lock().expect("limiter lock");
        if limiter_slot.0 != settings.rate_per_s {
            *limiter_slot = (settings.rate_per_s, limiter(settings.rate_per_s));
        }
    }

    /// Changes a channel's behaviour (kept across restarts; on a fleet, for every node).
    pub async fn configure(
        &self,
        channel: Channel,
        settings: ChannelSettings,
    ) -> Result<(), StoreError> {
        settings.validate().map_err(StoreError::Corrupt)?;
        let encoded = codec::encode(&settings)?;
        match &self.book {
            Book::Local {
                db, settings: tree, ..
            } => {
                tree.insert(channel.as_str(), encoded).map_err(io)?;
                db.flush().map_err(io)?;
            }
            Book::Shared { buckets, runtime } => {
                Self::put_shared(runtime, &buckets[&channel], SETTINGS_KEY.into(), encoded).await?;
            }
        }
        // A new rate starts a new limiter even when the number is the same: a reconfiguration
        // starts the capacity afresh.
        let sim = self.channel(channel);
        *sim.settings.write().expect("settings lock") = settings;
        *sim.limiter.lock().expect("limiter lock") =
            (settings.rate_per_s, limiter(settings.rate_per_s));
        Ok(())
    }

    /// The channel's own record, by order id (at most `limit` lines).
    pub async fn statement(
        &self,
        channel: Channel,
        limit: usize,
    ) -> Result<Vec<StatementLine>, StoreError> {
        self.statement_after(channel, None, limit).await
    }

    /// At most `limit` lines of the record with order ids after `after` (from the first
    /// without), in order id order. One node's book is range-scanned from the cursor, so a
    /// page costs its own lines whatever its depth; a fleet's book lists its keys for each
    /// page (a key-value bucket has no range reads), then reads the page's lines.
    pub async fn statement_after(
        &self,
        channel: Channel,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StatementLine>, StoreError> {
        match &self.book {
            Book::Local { statements, .. } => {
                use std::ops::Bound;
                let start = match after {
                    Some(order_id) => Bound::Excluded(order_id.as_bytes().to_vec()),
                    None => Bound::Unbounded,
                };
                statements[&channel]
                    .range::<Vec<u8>, _>((start, Bound::Unbounded))
                    .take(limit)
                    .map(|item| Ok(codec::decode(&item.map_err(io)?.1)?))
                    .collect()
            }
            Book::Shared { buckets, runtime } => {
                let bucket = buckets[&channel].clone();
                let after = after.map(|a| hex::encode(a.as_bytes()));
                Self::on_client(runtime, async move {
                    use futures::TryStreamExt;
                    let mut keys: Vec<String> = bucket
                        .keys()
                        .await
                        .map_err(kv_error)?
                        .try_filter(|k| futures::future::ready(k.as_str() != SETTINGS_KEY))
                        .try_collect()
                        .await
                        .map_err(kv_error)?;
                    keys.retain(|k| after.as_ref().is_none_or(|a| k > a));
                    keys.sort_unstable();
                    keys.truncate(limit);
                    let mut lines = Vec::with_capacity(keys.len());
                    for key in keys {
                        if let Some(bytes) = bucket.get(key.as_str()).await.map_err(kv_error)? {
                            lines.push(codec::decode(&bytes)?);
                        }
                    }
                    Ok(lines)
                })
                .await
            }
        }
    }

    /// Every line of a channel's statement, in order id order, read lazily: the audit walks a
    /// statement of any size in constant memory. One node's book only: a fleet's is read
    /// through [`SimulatedChannels::copy_into`] first.
    pub fn lines(
        &self,
        channel: Channel,
    ) -> Box<dyn Iterator<Item = Result<StatementLine, StoreError>> + '_> {
        match &self.book {
            Book::Local { statements, .. } => Box::new(
                statements[&channel]
                    .iter()
                    .map(|item| Ok(codec::decode(&item.map_err(io)?.1)?)),
            ),
            Book::Shared { .. } => Box::new(std::iter::once(Err(StoreError::Corrupt(
                "a fleet's channel book is read through a local copy".into(),
            )))),
        }
    }

    /// Copies every statement line and setting of these channels into one node's book at
    /// `dir` (for the audit of a fleet, which reads statements line by line).
    pub async fn copy_into(
        &self,
        dir: &Path,
        mut progress: impl FnMut(u64),
    ) -> Result<Arc<SimulatedChannels>, StoreError> {
        let copy = SimulatedChannels::open(dir, self.clock.clone())?;
        let mut copied = 0u64;
        for channel in Channel::ALL {
            copy.configure(channel, self.current_settings(channel).await?)
                .await?;
            let mut after: Option<String> = None;
            loop {
                let page = self
                    .statement_after(channel, after.as_deref(), 1_000)
                    .await?;
                let Some(last) = page.last() else { break };
                after = Some(last.order_id.clone());
                for line in &page {
                    copy.record_line(channel, line).await?;
                    copied += 1;
                    progress(copied);
                }
            }
        }
        Ok(copy)
    }

    /// Writes a statement line exactly as given, replacing the order's line, durably; bypasses
    /// every rule of the simulated channel (no idempotency, no amount check, and no exclusion
    /// with a payment call in flight for the same order). For tests that corrupt the channel's
    /// side of the books, and for operators repairing a simulated statement by hand; the
    /// reconciler and `hongbao audit` then judge the line like any other.
    pub async fn record_line(
        &self,
        channel: Channel,
        line: &StatementLine,
    ) -> Result<(), StoreError> {
        let encoded = codec::encode(line)?;
        match &self.book {
            Book::Local { db, statements, .. } => {
                statements[&channel]
                    .insert(line.order_id.as_str(), encoded)
                    .map_err(io)?;
                db.flush().map_err(io)?;
                Ok(())
            }
            Book::Shared { buckets, runtime } => {
                let key = hex::encode(&line.order_id);
                Self::put_shared(runtime, &buckets[&channel], key, encoded).await
            }
        }
    }

    /// An order's line, with what its next write must find in its place.
    async fn record(
        &self,
        channel: Channel,
        order_id: &Id,
    ) -> Result<(Option<StatementLine>, Version), StoreError> {
        match &self.book {
            Book::Local { statements, .. } => {
                let raw = statements[&channel].get(order_id.as_str()).map_err(io)?;
                let line = raw.as_ref().map(|b| codec::decode(b)).transpose()?;
                Ok((line, Version::Local(raw)))
            }
            Book::Shared { buckets, runtime } => {
                let (bucket, key) = (buckets[&channel].clone(), hex::encode(order_id.as_str()));
                let entry =
                    Self::on_client(
                        runtime,
                        async move { bucket.entry(key).await.map_err(kv_error) },
                    )
                    .await?;
                match entry {
                    Some(e) if e.operation == kv::Operation::Put => {
                        Ok((Some(codec::decode(&e.value)?), Version::Shared(e.revision)))
                    }
                    Some(e) => Ok((None, Version::Shared(e.revision))),
                    None => Ok((None, Version::Shared(0))),
                }
            }
        }
    }

    /// Writes an order's line if it is still as read (`read`), durably before it answers, like
    /// a real channel's books; `Ok(false)` when another call wrote first.
    async fn write(
        &self,
        channel: Channel,
        line: &StatementLine,
        read: &Version,
    ) -> Result<bool, StoreError> {
        let encoded = codec::encode(line)?;
        match (&self.book, read) {
            (Book::Local { db, statements, .. }, Version::Local(previous)) => {
                let swapped = statements[&channel]
                    .compare_and_swap(line.order_id.as_str(), previous.clone(), Some(encoded))
                    .map_err(io)?;
                if swapped.is_err() {
                    return Ok(false);
                }
                // A blocking flush on the blocking pool: sled 0.34's `flush_async` can deadlock
                // when several run at once (spacejam/sled#1308, fixed after the last release).
                let db = db.clone();
                tokio::task::spawn_blocking(move || db.flush())
                    .await
                    .map_err(|e| StoreError::Io(e.to_string()))?
                    .map_err(io)?;
                Ok(true)
            }
            (Book::Shared { buckets, runtime }, Version::Shared(revision)) => {
                let (bucket, key, revision) = (
                    buckets[&channel].clone(),
                    hex::encode(&line.order_id),
                    *revision,
                );
                Self::on_client(runtime, async move {
                    let written = if revision == 0 {
                        match bucket.create(key, encoded.into()).await {
                            Ok(_) => true,
                            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => false,
                            Err(e) => return Err(kv_error(e)),
                        }
                    } else {
                        match bucket.update(key, encoded.into(), revision).await {
                            Ok(_) => true,
                            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => false,
                            Err(e) => return Err(kv_error(e)),
                        }
                    };
                    Ok(written)
                })
                .await
            }
            _ => Err(StoreError::Corrupt("a version from another book".into())),
        }
    }

    fn order_lock(&self, channel: Channel, order_id: &Id) -> &tokio::sync::Mutex<()> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        // A fixed hasher: the stripe of an order is the same in every call.
        let hash = BuildHasherDefault::<DefaultHasher>::default()
            .hash_one((channel.as_str(), order_id.as_str()));
        &self.order_locks[(hash % ORDER_LOCK_STRIPES as u64) as usize]
    }

    async fn pay_now(self: Arc<Self>, channel: Channel, order_id: Id, amount: Fen) -> PayOutcome {
        let settings = match self.current_settings(channel).await {
            Ok(settings) => settings,
            Err(e) => return PayOutcome::Failed(format!("channel error: {e}")),
        };
        if settings.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(settings.latency_ms)).await;
        }
        // One call per order at a time in this process, from reading the line to its durable
        // write; between processes, the write is a compare-and-set and a lost round is played
        // again. Two concurrent calls can neither both pay nor write a refusal over a payment,
        // and every call is counted (issue 11).
        let _order = self.order_lock(channel, &order_id).lock().await;
        let roll: f64 = rand::random();
        let paid_on_timeout = rand::random::<bool>();
        let mut admitted = false;
        for _ in 0..WRITE_ROUNDS {
            let (previous, read) = match self.record(channel, &order_id).await {
                Ok(record) => record,
                Err(e) => return PayOutcome::Failed(format!("channel error: {e}")),
            };
            if let Some(line) = previous.as_ref().filter(|l| l.amount != amount) {
                // An order id is one payment of one amount (W10): a repeat for another amount
                // is someone else's mistake, refused without touching the line.
                return PayOutcome::Failed(format!(
                    "order {order_id} was sent for {}, not {amount}",
                    line.amount
                ));
            }
            let calls = previous.as_ref().map(|l| l.calls).unwrap_or(0) + 1;
            if let Some(line) = &previous {
                if line.status == RecordStatus::Succeeded {
                    // Idempotent: paid once, never again. The repeat is counted for the
                    // statement.
                    let line = StatementLine {
                        calls,
                        ..line.clone()
                    };
                    match self.write(channel, &line, &read).await {
                        Ok(false) => continue,
                        _ => return PayOutcome::Succeeded,
                    }
                }
            }
            if !admitted {
                let limiter = self.channel(channel).limiter.lock().expect("limiter lock");
                if limiter.1.check().is_err() {
                    return PayOutcome::Throttled;
                }
                admitted = true;
            }
            let line = |status| StatementLine {
                order_id: order_id.to_string(),
                amount,
                status,
                at_ms: self.clock.now_ms(),
                calls,
            };
            if roll < settings.timeout_rate {
                // The answer is lost; whether the money moved is up to the coin.
                if paid_on_timeout {
                    match self
                        .write(channel, &line(RecordStatus::Succeeded), &read)
                        .await
                    {
                        Ok(false) => continue,
                        Ok(true) => {}
                        Err(e) => tracing::error!(error = %e, "channel simulator cannot record"),
                    }
                }
                return PayOutcome::Timeout;
            }
            let (status, answer) = if roll < settings.timeout_rate + settings.fail_rate {
                (
                    RecordStatus::Failed,
                    PayOutcome::Failed("declined by the channel".into()),
                )
            } else {
                (RecordStatus::Succeeded, PayOutcome::Succeeded)
            };
            return match self.write(channel, &line(status), &read).await {
                Ok(true) => answer,
                Ok(false) => continue,
                // The channel could not record it: it did not pay.
                Err(e) => PayOutcome::Failed(format!("channel error: {e}")),
            };
        }
        PayOutcome::Failed(format!(
            "channel busy: {WRITE_ROUNDS} concurrent calls for order {order_id} wrote first"
        ))
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
        let (sim, order_id) = (self.0.clone(), order_id.clone());
        Box::pin(async move {
            match sim.record(channel, &order_id).await {
                Ok((None, _)) => QueryOutcome::NoRecord,
                Ok((Some(line), _)) if line.status == RecordStatus::Succeeded => {
                    QueryOutcome::Succeeded {
                        amount: line.amount,
                    }
                }
                Ok((Some(_), _)) => QueryOutcome::Failed("declined by the channel".into()),
                Err(e) => QueryOutcome::Failed(format!("channel error: {e}")),
            }
        })
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
            .await
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
            .await
            .unwrap();
        assert_eq!(
            sim.pay(Channel::Bank, &id("o2"), Fen::new(5), "acct").await,
            PayOutcome::Succeeded
        );
        let statement = sim.0.statement(Channel::Bank, 10).await.unwrap();
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
            .await
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
        channels.configure(Channel::Change, settings).await.unwrap();
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
                .await
                .unwrap();
            let order = id("one-order");
            let outcomes = futures::future::join_all((0..20).map(|_| {
                let (sim, order) = (sim.clone(), order.clone());
                tokio::spawn(async move { sim.pay(Channel::Bank, &order, Fen::new(7), "a").await })
            }))
            .await;
            let outcomes: Vec<PayOutcome> = outcomes.into_iter().map(|o| o.unwrap()).collect();
            let statement = sim.0.statement(Channel::Bank, 10).await.unwrap();
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
            .await
            .unwrap();
        assert_eq!(
            sim.pay(Channel::Bank, &id("o9"), Fen::new(5), "a").await,
            PayOutcome::Succeeded
        );
        assert!(matches!(
            sim.pay(Channel::Bank, &id("o9"), Fen::new(6), "a").await,
            PayOutcome::Failed(_)
        ));
        let statement = sim.0.statement(Channel::Bank, 10).await.unwrap();
        assert_eq!(
            (statement[0].amount, statement[0].status),
            (Fen::new(5), RecordStatus::Succeeded)
        );
    }
}
