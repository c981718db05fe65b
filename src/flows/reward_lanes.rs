//! Reward crediting lanes (R3, R5, R8).
//!
//! One task, on its own actix arbiter, follows the log from the lanes' checkpoint. Every
//! `RewardAccepted` of a cash, subsidy or item reward is queued in its kind's lane; coupon
//! rewards are left to the coupon flow. A dispatcher starts credits while fewer than
//! `in_flight_max` are running, taking lanes in priority order (cash, subsidy, item), each only
//! as fast as its token bucket (governor) allows: when capacity is short, cash is served first.
//!
//! A credit is the wallet command `RewardClaim::credit_command` builds, the same one
//! force-credit sends, so whichever path comes second is a replay. An item is "delivered"
//! through its activity. A wallet that already holds the order id from another activity
//! answers `idempotency_conflict`: the reward is then voided and its budget returned. A
//! transient failure is retried with backoff; anything else is logged and left pending (the
//! audit shows it).
//!
//! The checkpoint is the highest sequence below which every lane item is settled; it is saved
//! every `checkpoint_interval`. After a crash the lanes resume from it and may credit some
//! rewards again: each repeat is a replay in the wallet, so every accepted reward is credited
//! exactly once.

use super::{load_checkpoint, save_checkpoint, FlowGroup, CHECKPOINT_TREE};
use crate::actors::{ExecError, Registry};
use crate::clock::Clock;
use crate::domain::activity::{
    activity_of_stream, Activity, ActivityCommand, ActivityError, ActivityEvent, RewardClaim,
    RewardKind, VoidReason,
};
use crate::domain::switches::Switches;
use crate::domain::wallet::{Wallet, WalletCommand, WalletError};
use crate::domain::Event;
use crate::events::{Envelope, EventStore, StoreError, Subscription};
use crate::metrics::Metrics;
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const FLOW: &str = "reward-lanes";
/// The switch that pauses dispatching.
const SWITCH: &str = "reward_lanes";
/// Lanes in dispatch priority order.
const PRIORITY: [RewardKind; 3] = [RewardKind::Cash, RewardKind::Subsidy, RewardKind::Item];
/// Backoff bounds for transient failures.
const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(50);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a stop waits for credits in flight.
const STOP_DRAIN_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct LaneConfig {
    /// Credits per second per kind; 0 or absent means unlimited.
    pub rate_per_s: BTreeMap<RewardKind, u32>,
    pub in_flight_max: usize,
    /// Rewards held in memory; reading the log pauses beyond it.
    pub queue_max: usize,
    pub checkpoint_interval: Duration,
}

impl Default for LaneConfig {
    fn default() -> Self {
        LaneConfig {
            // The seed's downstream capacities: cash 300k/s, coupons 400k/s, small kinds 2k/s.
            rate_per_s: BTreeMap::from([
                (RewardKind::Cash, 300_000),
                (RewardKind::Subsidy, 300_000),
                (RewardKind::Item, 2_000),
            ]),
            in_flight_max: 1024,
            queue_max: 100_000,
            checkpoint_interval: Duration::from_millis(200),
        }
    }
}

/// A reward waiting in a lane.
#[derive(Debug, Clone)]
struct Item {
    seq: u64,
    /// The activity entity that accepted it (the activity, or its intake shard `cny@3`).
    entity: String,
    claim: RewardClaim,
    accepted_at_ms: i64,
}

enum Outcome {
    Credited { replayed: bool },
    Voided,
    Parked(String),
}

struct Lane {
    kind: RewardKind,
    queue: VecDeque<Item>,
    limiter: Option<Arc<dyn super::Pacer>>,
    in_flight: usize,
}

/// Handle to the running lanes.
pub struct RewardLanes {
    flows: FlowGroup,
}

impl RewardLanes {
    /// Starts the lanes on a new arbiter, with the store, clock and metrics of the registries'
    /// runtime. Must be called within an actix system.
    pub fn start(
        db: &sled::Db,
        wallets: Arc<Registry<Wallet>>,
        activities: Arc<Registry<Activity>>,
        config: LaneConfig,
        switches: watch::Receiver<Switches>,
    ) -> Result<RewardLanes, StoreError> {
        let runtime = wallets.runtime().clone();
        let (store, clock, metrics) = (
            runtime.store.clone(),
            runtime.clock.clone(),
            runtime.metrics.clone(),
        );
        let tree = db
            .open_tree(CHECKPOINT_TREE)
            .map_err(|e| StoreError::Io(e.to_string()))?;
        let checkpoint = load_checkpoint(&tree, FLOW)?;
        let lanes = Lanes {
            lanes: PRIORITY
                .iter()
                .map(|&kind| Lane::new(kind, &config, &runtime))
                .collect(),
            outstanding: BTreeSet::new(),
            read_to: checkpoint,
            saved: checkpoint,
            tree,
            wallets,
            activities,
            config,
            clock,
            metrics,
        };
        let mut flows = FlowGroup::start();
        flows.spawn(|stop| async move {
            // Crediting is the peak-shaving side: under saturation, intake keeps the CPU.
            crate::background_priority("reward-lanes");
            lanes.run(store, stop, switches).await;
        });
        Ok(RewardLanes { flows })
    }

    /// Stops reading, lets credits in flight finish (bounded), saves the checkpoint.
    pub async fn stop(&self) {
        self.flows.stop().await;
    }
}

impl Lane {
    fn new(kind: RewardKind, config: &LaneConfig, runtime: &crate::actors::Runtime) -> Lane {
        let rate = config.rate_per_s.get(&kind).copied().unwrap_or(0);
        let limiter = super::pacer(runtime, &format!("credit.{}", kind.as_str()), rate);
        Lane {
            kind,
            queue: VecDeque::new(),
            limiter,
            in_flight: 0,
        }
    }
}

struct Lanes {
    lanes: Vec<Lane>,
    /// Sequences of lane items queued or in flight.
    outstanding: BTreeSet<u64>,
    /// Last sequence read from the log.
    read_to: u64,
    saved: u64,
    tree: sled::Tree,
    wallets: Arc<Registry<Wallet>>,
    activities: Arc<Registry<Activity>>,
    config: LaneConfig,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
}

impl Lanes {
    fn queued(&self) -> usize {
        self.lanes.iter().map(|l| l.queue.len()).sum()
    }

    fn in_flight(&self) -> usize {
        self.lanes.iter().map(|l| l.in_flight).sum()
    }

    fn lane(&mut self, kind: RewardKind) -> Option<&mut Lane> {
        self.lanes.iter_mut().find(|l| l.kind == kind)
    }

    /// Everything at or below the checkpoint is settled.
    fn checkpoint(&self) -> u64 {
        self.outstanding
            .first()
            .map(|s| s - 1)
            .unwrap_or(self.read_to)
    }

    fn enqueue(&mut self, events: &[Arc<Envelope>]) {
        for envelope in events {
            self.read_to = envelope.seq;
            let Event::Activity(ActivityEvent::RewardAccepted(reward)) = &envelope.event else {
                continue;
            };
            // An intake shard's reward is its activity's; its void or delivery is the shard's.
            let Some((activity, _shard)) = activity_of_stream(&envelope.stream) else {
                continue;
            };
            let Some(entity) = envelope.stream.strip_prefix("activity:") else {
                continue;
            };
            let item = Item {
                seq: envelope.seq,
                entity: entity.to_owned(),
                claim: RewardClaim::of(&activity, reward),
                accepted_at_ms: envelope.recorded_at_ms,
            };
            if let Some(lane) = self.lane(reward.kind) {
                lane.queue.push_back(item);
                self.outstanding.insert(envelope.seq);
            }
        }
    }

    /// Starts every credit that the in-flight bound and the rate limits allow. Returns how long
    /// to wait before a throttled lane may go again.
    fn dispatch(
        &mut self,
        running: &mut FuturesUnordered<futures::future::BoxFuture<'static, (Item, Outcome)>>,
    ) -> Option<Duration> {
        let mut wait: Option<Duration> = None;
        let in_flight_max = self.config.in_flight_max;
        let mut total = self.in_flight();
        for i in 0..self.lanes.len() {
            while total < in_flight_max {
                let lane = &mut self.lanes[i];
                if lane.queue.is_empty() {
                    break;
                }
                if let Some(limiter) = &lane.limiter {
                    if let Err(ready_in) = limiter.check() {
                        wait = Some(wait.map_or(ready_in, |w| w.min(ready_in)));
                        self.metrics
                            .reward_lane_throttled_total
                            .with_label_values(&[lane.kind.as_str()])
                            .inc();
                        break;
                    }
                }
                let item = lane.queue.pop_front().expect("checked non-empty");
                lane.in_flight += 1;
                total += 1;
                running.push(Box::pin(settle(
                    item,
                    self.wallets.clone(),
                    self.activities.clone(),
                )));
            }
        }
        wait
    }

    fn complete(&mut self, item: Item, outcome: Outcome) {
        let kind = item.claim.kind;
        if let Some(lane) = self.lane(kind) {
            lane.in_flight -= 1;
        }
        self.outstanding.remove(&item.seq);
        match outcome {
            Outcome::Credited { replayed: false } => {
                self.metrics
                    .rewards_credited_total
                    .with_label_values(&[kind.as_str(), "lane"])
                    .inc();
            }
            Outcome::Credited { replayed: true } => {}
            Outcome::Voided => {
                self.metrics
                    .rewards_voided_total
                    .with_label_values(&["duplicate_order_id"])
                    .inc();
                tracing::warn!(order_id = %item.claim.order_id, activity = %item.claim.activity_id, "reward voided: its order id was already credited from another activity");
            }
            Outcome::Parked(why) => {
                tracing::error!(order_id = %item.claim.order_id, activity = %item.claim.activity_id, why, "reward cannot be credited; left pending");
            }
        }
    }

    fn save(&mut self) {
        let checkpoint = self.checkpoint();
        if checkpoint != self.saved {
            match save_checkpoint(&self.tree, FLOW, checkpoint) {
                Ok(()) => self.saved = checkpoint,
                Err(e) => crate::warn_limited!(error = %e, "reward lanes checkpoint not saved"),
            }
        }
        let now = self.clock.now_ms();
        for lane in &self.lanes {
            let kind = lane.kind.as_str();
            self.metrics
                .reward_lane_backlog
                .with_label_values(&[kind])
                .set((lane.queue.len() + lane.in_flight) as i64);
            let lag_ms = lane
                .queue
                .front()
                .map(|i| (now - i.accepted_at_ms).max(0))
                .unwrap_or(0);
            self.metrics
                .reward_lane_lag_seconds
                .with_label_values(&[kind])
                .set(lag_ms as f64 / 1000.0);
        }
    }

    async fn run(
        mut self,
        store: Arc<dyn EventStore>,
        mut stop: watch::Receiver<bool>,
        mut switches: watch::Receiver<Switches>,
    ) {
        let mut subscription = Subscription::new(store, self.read_to + 1, 4096);
        let mut running = FuturesUnordered::new();
        let mut tick = tokio::time::interval(self.config.checkpoint_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // The `reward_lanes` switch pauses dispatching (rewards keep queueing, pending).
            let enabled = switches.borrow().is_on(SWITCH);
            let throttled = if enabled {
                self.dispatch(&mut running)
            } else {
                None
            };
            let room = self.queued() < self.config.queue_max;
            tokio::select! {
                biased;
                                changed = stop.changed() => if changed.is_err() || *stop.borrow() { break },
                Ok(()) = switches.changed() => {}
                Some((item, outcome)) = running.next(), if !running.is_empty() => self.complete(item, outcome),
                events = subscription.next(), if room => match events {
                    Ok(events) => self.enqueue(&events),
                    Err(e) => {
                        tracing::error!(error = %e, "reward lanes cannot read the log; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                },
                _ = tokio::time::sleep(throttled.unwrap_or(Duration::MAX)), if throttled.is_some() => {}
                _ = tick.tick() => self.save(),
            }
        }
        // Let credits in flight finish (their commands may already be in a wallet's journal
        // batch); what does not finish is credited again after the restart, idempotently.
        let drained = tokio::time::timeout(STOP_DRAIN_MAX, async {
            while let Some((item, outcome)) = running.next().await {
                self.complete(item, outcome);
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("reward lanes stopped with credits still in flight");
        }
        self.save();
    }
}

fn transient<E>(e: &ExecError<E>) -> bool {
    matches!(
        e,
        ExecError::Unavailable(_) | ExecError::Overloaded | ExecError::Timeout
    )
}

/// On a cluster, tells a reward's wallet (in its own partition) that its activity settled it
/// without a credit (delivered, failed or voided: recorded there first), so that its note is
/// no longer pending on the wallet page (R6). Asked again while the wallet's partition cannot
/// answer; a refusal is logged. Nothing on a single node, whose wallet view reads the
/// activity's events itself.
pub(crate) async fn settle_note(wallets: &Arc<Registry<Wallet>>, claim: &RewardClaim) {
    if wallets.runtime().placement.is_none() {
        return;
    }
    let command = WalletCommand::SettleNote {
        activity_id: claim.activity_id.clone(),
        order_id: claim.order_id.clone(),
    };
    let mut backoff = RETRY_BACKOFF_MIN;
    loop {
        match wallets.execute(claim.uid.as_str(), command.clone()).await {
            Ok(_) => return,
            Err(e) if transient(&e) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
            }
            Err(e) => {
                tracing::error!(order_id = %claim.order_id, uid = %claim.uid, error = %e, "the wallet refused to settle a reward's note");
                return;
            }
        }
    }
}

/// Credits (or delivers) one reward, retrying transient failures.
async fn settle(
    item: Item,
    wallets: Arc<Registry<Wallet>>,
    activities: Arc<Registry<Activity>>,
) -> (Item, Outcome) {
    let mut backoff = RETRY_BACKOFF_MIN;
    loop {
        let outcome = match item.claim.credit_command() {
            Some(command) => match wallets.execute(item.claim.uid.as_str(), command).await {
                Ok(movement) => Some(Outcome::Credited {
                    replayed: movement.replayed,
                }),
                Err(ExecError::Rejected(WalletError::IdempotencyConflict { .. })) => {
                    let void = ActivityCommand::Void {
                        order_id: item.claim.order_id.clone(),
                        uid: item.claim.uid.clone(),
                        reason: VoidReason::DuplicateOrderId,
                    };
                    match activities.execute(&item.entity, void).await {
                        Ok(_) => {
                            settle_note(&wallets, &item.claim).await;
                            Some(Outcome::Voided)
                        }
                        Err(e) if transient(&e) => None,
                        Err(e) => Some(Outcome::Parked(format!("void refused: {e}"))),
                    }
                }
                Err(e) if transient(&e) => None,
                Err(e) => Some(Outcome::Parked(e.to_string())),
            },
            None => {
                let deliver = ActivityCommand::MarkDelivered {
                    order_id: item.claim.order_id.clone(),
                    uid: item.claim.uid.clone(),
                };
                match activities.execute(&item.entity, deliver).await {
                    Ok(_) => {
                        settle_note(&wallets, &item.claim).await;
                        Some(Outcome::Credited { replayed: false })
                    }
                    Err(ExecError::Rejected(ActivityError::WrongState { .. })) => {
                        settle_note(&wallets, &item.claim).await;
                        Some(Outcome::Credited { replayed: true })
                    }
                    Err(e) if transient(&e) => None,
                    Err(e) => Some(Outcome::Parked(e.to_string())),
                }
            }
        };
        match outcome {
            Some(outcome) => return (item, outcome),
            None => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
            }
        }
    }
}
