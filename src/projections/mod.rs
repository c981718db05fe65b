//! Read models fed by the global log.
//!
//! Each [`Projection`] owns one sled tree (`view:<name>`) that holds its view and, under
//! [`CHECKPOINT_KEY`], the sequence of the last event it applied. Every batch of events is
//! applied through a [`ViewTx`] and written with one atomic `apply_batch` that includes the new
//! checkpoint, so after a crash a view is always exactly "the log up to its checkpoint" and the
//! runner resumes from there. A projection whose code version differs from the stored one is
//! rebuilt from zero on start; `hongbao projections rebuild` does the same on demand.
//!
//! The runner is one thread that follows the log through a [`Subscription`] and publishes each
//! projection's checkpoint on a watch channel, so that a reader can wait until a view has
//! caught up with an event it knows was acknowledged (read-your-writes).

pub mod coupons;
pub mod packets;
pub mod rewards;
pub mod wallet;
pub mod withdrawals;

use crate::events::{codec, Envelope, EventStore, StoreError, Subscription};
use crate::metrics::Metrics;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Key of the checkpoint inside a view tree. Data keys never start with 0x00.
pub const CHECKPOINT_KEY: &[u8] = b"\x00checkpoint";
/// Key of the projection code version inside a view tree.
pub const VERSION_KEY: &[u8] = b"\x00version";
/// Events applied per atomic view write.
const APPLY_BATCH_EVENTS_MAX: usize = 4096;

/// Every projection the server runs, in the order the runner applies them.
pub fn all(metrics: Arc<Metrics>) -> Vec<Arc<dyn Projection>> {
    vec![
        Arc::new(wallet::WalletView),
        Arc::new(rewards::RewardsView { metrics }),
        Arc::new(withdrawals::WithdrawalsView),
        Arc::new(packets::PacketsView),
        Arc::new(coupons::CouponsView),
    ]
}

/// A read model.
pub trait Projection: Send + Sync + 'static {
    /// Stable name; the view lives in the tree `view:<name>`.
    fn name(&self) -> &'static str;
    /// Bumped when the view's layout or meaning changes: the view is then rebuilt.
    fn version(&self) -> u32;
    /// Applies one event. Events of no interest are ignored.
    fn apply(&self, tx: &mut ViewTx<'_>, envelope: &Envelope) -> Result<(), StoreError>;

    /// Called once when the view is opened (its stored state as of its checkpoint), before
    /// any event is applied: publishes what its gauges say, so that they are right from the
    /// start rather than absent until the next event of interest.
    fn opened(&self, _tree: &sled::Tree) -> Result<(), StoreError> {
        Ok(())
    }

    /// Applies a batch (committed atomically with the checkpoint afterwards). Override to
    /// aggregate hot values (totals) once per batch instead of once per event.
    fn apply_batch(&self, tx: &mut ViewTx<'_>, events: &[&Envelope]) -> Result<(), StoreError> {
        for envelope in events {
            self.apply(tx, envelope)?;
        }
        Ok(())
    }
}

/// Writes of one batch, readable before they are committed.
pub struct ViewTx<'a> {
    tree: &'a sled::Tree,
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'a> ViewTx<'a> {
    pub fn new(tree: &'a sled::Tree) -> ViewTx<'a> {
        ViewTx {
            tree,
            writes: BTreeMap::new(),
        }
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(pending) = self.writes.get(key) {
            return Ok(pending.clone());
        }
        Ok(self
            .tree
            .get(key)
            .map_err(|e| StoreError::Io(e.to_string()))?
            .map(|v| v.to_vec()))
    }

    pub fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.writes.insert(key, Some(value));
    }

    pub fn remove(&mut self, key: Vec<u8>) {
        self.writes.insert(key, None);
    }

    /// Writes everything and the checkpoint atomically.
    pub fn commit(self, checkpoint: u64) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (key, value) in self.writes {
            match value {
                Some(value) => batch.insert(key, value),
                None => batch.remove(key),
            }
        }
        batch.insert(CHECKPOINT_KEY, &checkpoint.to_be_bytes());
        crate::faults::injected("view-commit").map_err(|e| StoreError::Io(e.to_string()))?;
        self.tree
            .apply_batch(batch)
            .map_err(|e| StoreError::Io(e.to_string()))
    }
}

/// The tree a projection's view lives in.
pub fn view_tree(db: &sled::Db, name: &str) -> Result<sled::Tree, StoreError> {
    db.open_tree(format!("view:{name}"))
        .map_err(|e| StoreError::Io(e.to_string()))
}

/// The last sequence applied to a view (0: none).
pub fn checkpoint(tree: &sled::Tree) -> Result<u64, StoreError> {
    match tree
        .get(CHECKPOINT_KEY)
        .map_err(|e| StoreError::Io(e.to_string()))?
    {
        None => Ok(0),
        Some(v) => {
            Ok(u64::from_be_bytes(v.as_ref().try_into().map_err(|_| {
                StoreError::Corrupt("bad checkpoint".into())
            })?))
        }
    }
}

/// The layout version a view was built with (None: never built).
pub fn stored_version(tree: &sled::Tree) -> Result<Option<u32>, StoreError> {
    Ok(tree
        .get(VERSION_KEY)
        .map_err(|e| StoreError::Io(e.to_string()))?
        .and_then(|v| v.as_ref().try_into().ok().map(u32::from_be_bytes)))
}

/// Empties a view and stamps it with the projection's version; its checkpoint becomes 0.
pub fn reset(tree: &sled::Tree, version: u32) -> Result<(), StoreError> {
    tree.clear().map_err(|e| StoreError::Io(e.to_string()))?;
    tree.insert(VERSION_KEY, &version.to_be_bytes())
        .map_err(|e| StoreError::Io(e.to_string()))?;
    Ok(())
}

/// Applies a batch of events (those after the view's checkpoint) and commits.
pub fn apply_events(
    projection: &dyn Projection,
    tree: &sled::Tree,
    events: &[Arc<Envelope>],
    after: u64,
) -> Result<u64, StoreError> {
    let fresh: Vec<&Envelope> = events
        .iter()
        .filter(|e| e.seq > after)
        .map(|e| e.as_ref())
        .collect();
    let mut last = after;
    let mut rest = &fresh[..];
    while !rest.is_empty() {
        // Commits of bounded size: sled's `apply_batch` holds a process-wide write lock that
        // every other sled write waits for, the journal's included.
        let mut n = 0;
        let mut writes = 0;
        while n < rest.len() && (n == 0 || writes + writes_hint(rest[n]) <= COMMIT_WRITES_MAX) {
            writes += writes_hint(rest[n]);
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n);
        let mut tx = ViewTx::new(tree);
        projection.apply_batch(&mut tx, chunk)?;
        last = chunk.last().map_or(last, |e| e.seq);
        tx.commit(last)?;
        rest = tail;
    }
    Ok(last)
}

/// View writes one commit aims at, at most (one event may exceed it alone).
const COMMIT_WRITES_MAX: usize = 2_048;

/// Roughly how many view writes an event makes: merged coupon events carry many requests, a
/// packet's lot of claims a row per claim.
fn writes_hint(envelope: &Envelope) -> usize {
    use crate::domain::coupon::{BatchEvent, GroupEvent, IntakeEvent};
    use crate::domain::Event;
    match &envelope.event {
        Event::CouponIntake(IntakeEvent::Accepted { requests, .. }) => requests.len(),
        Event::CouponIntake(IntakeEvent::Recorded { verdicts, .. }) => verdicts.len(),
        Event::CouponBatch(BatchEvent::Deducted {
            grants, refusals, ..
        }) => grants.len() + refusals.len(),
        Event::CouponGroup(GroupEvent::Reserved { held, refused, .. }) => {
            held.len() + refused.len()
        }
        Event::CouponGroup(GroupEvent::Released { released, .. }) => released.len(),
        Event::Packet(crate::domain::packet::PacketEvent::SharesClaimed { claims }) => {
            claims.len() + 1
        }
        _ => 1,
    }
    .max(1)
}

/// Rebuilds a view from zero, reporting progress as (applied seq, head seq).
pub fn rebuild(
    store: &dyn EventStore,
    db: &sled::Db,
    projection: &dyn Projection,
    progress: impl FnMut(u64, u64),
) -> Result<u64, StoreError> {
    rebuild_until(store, db, projection, store.head(), progress)
}

/// Rebuilds a view from zero up to the event `until` (inclusive) into `db`.
pub fn rebuild_until(
    store: &dyn EventStore,
    db: &sled::Db,
    projection: &dyn Projection,
    until: u64,
    mut progress: impl FnMut(u64, u64),
) -> Result<u64, StoreError> {
    let tree = view_tree(db, projection.name())?;
    reset(&tree, projection.version())?;
    let mut at = 0;
    while at < until {
        // Never read past `until`: a record after it (one the view never applied, perhaps
        // damaged) is none of this rebuild's business.
        let limit = APPLY_BATCH_EVENTS_MAX.min((until - at) as usize);
        let mut events = store.read_all(at + 1, limit)?;
        events.retain(|e| e.seq <= until);
        if events.is_empty() {
            break;
        }
        at = apply_events(projection, &tree, &events, at)?;
        progress(at, until);
    }
    Ok(at)
}

/// The running projections and their published checkpoints.
pub struct Projections {
    checkpoints: BTreeMap<&'static str, watch::Receiver<u64>>,
    trees: BTreeMap<&'static str, sled::Tree>,
    stop: watch::Sender<bool>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Projections {
    /// Opens every view (rebuilding those whose version changed) and starts the runner thread.
    pub fn start(
        store: Arc<dyn EventStore>,
        db: &sled::Db,
        projections: Vec<Arc<dyn Projection>>,
        metrics: Arc<Metrics>,
    ) -> Result<Projections, StoreError> {
        let mut running = Vec::new();
        let mut checkpoints = BTreeMap::new();
        let mut trees = BTreeMap::new();
        for projection in projections {
            let tree = view_tree(db, projection.name())?;
            if stored_version(&tree)? != Some(projection.version()) {
                tracing::info!(
                    projection = projection.name(),
                    "view version changed; rebuilding"
                );
                reset(&tree, projection.version())?;
            }
            let at = checkpoint(&tree)?;
            projection.opened(&tree)?;
            let (publish, subscribe) = watch::channel(at);
            checkpoints.insert(projection.name(), subscribe);
            trees.insert(projection.name(), tree.clone());
            running.push(Running {
                projection,
                tree,
                at,
                publish,
                stalled: false,
            });
        }
        let (stop, stop_rx) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("hongbao-projections".into())
            .spawn(move || run(store, running, stop_rx, metrics))
            .map_err(|e| StoreError::Io(e.to_string()))?;
        Ok(Projections {
            checkpoints,
            trees,
            stop,
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// The view tree of a projection, for its query functions.
    pub fn tree(&self, name: &str) -> Option<&sled::Tree> {
        self.trees.get(name)
    }

    /// The checkpoint a projection has published.
    pub fn checkpoint(&self, name: &str) -> u64 {
        self.checkpoints.get(name).map(|c| *c.borrow()).unwrap_or(0)
    }

    /// Waits until the projection has applied `seq`, at most `timeout`. True if it has.
    pub async fn wait_for(&self, name: &str, seq: u64, timeout: Duration) -> bool {
        let Some(rx) = self.checkpoints.get(name) else {
            return false;
        };
        let mut rx = rx.clone();
        if *rx.borrow() >= seq {
            return true;
        }
        let reached = tokio::time::timeout(timeout, rx.wait_for(|c| *c >= seq)).await;
        matches!(reached, Ok(Ok(_)))
    }

    /// Waits until every projection has applied `seq`, at most `timeout` in all. True if
    /// they have.
    pub async fn wait_all(&self, seq: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        for name in self.checkpoints.keys() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !self.wait_for(name, seq, left).await {
                return false;
            }
        }
        true
    }

    /// Asks the runner to catch up with the head and stop; waits for it.
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

struct Running {
    projection: Arc<dyn Projection>,
    tree: sled::Tree,
    at: u64,
    publish: watch::Sender<u64>,
    /// Set when events could not be applied (a failed write, an event it cannot apply): the
    /// view stays at its checkpoint (it must not skip the event) and is retried from the log
    /// every [`STALLED_RETRY`] until it is back with the others.
    stalled: bool,
}

/// How often a stalled view is retried from the log.
const STALLED_RETRY: Duration = Duration::from_secs(1);

fn run(
    store: Arc<dyn EventStore>,
    mut running: Vec<Running>,
    mut stop: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) {
    // Views may lag during a burst; intake keeps the CPU and they catch up from the log.
    let Some(runtime) = crate::background_runtime("projections") else {
        return;
    };
    runtime.block_on(async move {
        let from = running.iter().map(|r| r.at).min().unwrap_or(0) + 1;
        let mut subscription = Subscription::new(store.clone(), from, APPLY_BATCH_EVENTS_MAX);
        // The last sequence the subscription delivered to the views.
        let mut delivered = from - 1;
        let mut retry = tokio::time::interval(STALLED_RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                events = subscription.next() => match events {
                    Ok(events) => {
                        delivered = events.last().map_or(delivered, |e| e.seq.max(delivered));
                        apply_all(&mut running, &events, &metrics);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "projection runner cannot read the log; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                },
                _ = retry.tick(), if running.iter().any(|r| r.stalled) => {
                    retry_stalled(store.as_ref(), &mut running, delivered, &metrics);
                }
                stopped = stop.wait_for(|s| *s) => {
                    // Dropped without being stopped (the engine dropped where it stands, as
                    // the simulation's crashes do): the views stay where they are, as after
                    // a kill -9.
                    if stopped.is_err() {
                        return;
                    }
                    // Catch up with whatever is durable, then stop.
                    while let Ok(events) = subscription.try_next() {
                        if events.is_empty() {
                            break;
                        }
                        apply_all(&mut running, &events, &metrics);
                    }
                    return;
                }
            }
        }
    });
}

fn apply_all(running: &mut [Running], events: &[Arc<Envelope>], metrics: &Metrics) {
    for r in running.iter_mut().filter(|r| !r.stalled) {
        apply_one(r, events, metrics, false);
    }
}

/// Moves a view's checkpoint where its readers and `/metrics` see it.
fn publish(r: &mut Running, at: u64, metrics: &Metrics) {
    r.at = at;
    r.publish.send_replace(at);
    metrics
        .projection_checkpoint_seq
        .with_label_values(&[r.projection.name()])
        .set(at as i64);
}

/// Applies `events` to one view; on a failure the view stalls at the checkpoint its tree holds
/// (a commit of an earlier chunk of `events` may have gone through before it). The first
/// failure of a stall is always logged; a retry's failure through the limited line.
fn apply_one(r: &mut Running, events: &[Arc<Envelope>], metrics: &Metrics, retrying: bool) {
    match apply_events(r.projection.as_ref(), &r.tree, events, r.at) {
        Ok(last) => publish(r, last, metrics),
        Err(e) => {
            r.stalled = true;
            if retrying {
                crate::error_limited!(
                    projection = r.projection.name(),
                    checkpoint = r.at,
                    error = %e,
                    "a stalled view failed again; retried from the log"
                );
            } else {
                tracing::error!(
                    projection = r.projection.name(),
                    checkpoint = r.at,
                    error = %e,
                    "projection cannot apply events; it stays at its checkpoint and is retried from the log"
                );
            }
            // The retry reads the checkpoint again before applying anything.
            if let Ok(at) = checkpoint(&r.tree) {
                if at > r.at {
                    publish(r, at, metrics);
                }
            }
        }
    }
}

/// Chunks of the log a stalled view replays per retry, at most: the healthy views and a
/// stop wait while it does.
const STALLED_RETRY_CHUNKS: usize = 4;

/// Brings stalled views towards `delivered` from the log (the subscription has moved past the
/// events they missed), a few chunks per retry; a view that gets there follows the
/// subscription again.
fn retry_stalled(
    store: &dyn EventStore,
    running: &mut [Running],
    delivered: u64,
    metrics: &Metrics,
) {
    for r in running.iter_mut().filter(|r| r.stalled) {
        // What the tree holds is what was committed: start after it, never from a guess.
        match checkpoint(&r.tree) {
            Ok(at) if at != r.at => publish(r, at, metrics),
            Ok(_) => {}
            Err(e) => {
                crate::error_limited!(projection = r.projection.name(), error = %e, "cannot read a stalled view's checkpoint");
                continue;
            }
        }
        for _ in 0..STALLED_RETRY_CHUNKS {
            if r.at >= delivered {
                break;
            }
            let limit = APPLY_BATCH_EVENTS_MAX.min((delivered - r.at) as usize);
            let events = match store.read_all(r.at + 1, limit) {
                Ok(events) if !events.is_empty() => events,
                // Below what was delivered, the log cannot be empty: try again later.
                Ok(_) => break,
                Err(e) => {
                    crate::error_limited!(projection = r.projection.name(), error = %e, "cannot read the log for a stalled view");
                    break;
                }
            };
            r.stalled = false;
            apply_one(r, &events, metrics, true);
            if r.stalled {
                break;
            }
            r.stalled = true;
        }
        if r.at >= delivered {
            r.stalled = false;
            tracing::info!(
                projection = r.projection.name(),
                checkpoint = r.at,
                "stalled view caught up from the log"
            );
        }
    }
}

/// Decodes a view value written with the codec.
pub fn decode_view<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    Ok(codec::decode(bytes)?)
}
