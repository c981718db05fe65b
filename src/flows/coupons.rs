//! Coupon issuance (C1-C13): the intake batchers, the two layers and the green channel.
//!
//! - **Intake (C1, C8).** [`Coupons::submit`] hands a request to the batcher of its intake
//!   shard (by seq_no). A batcher takes whatever is waiting (up to `intake_merge_max`) and sends
//!   it as one `Accept` to the shard's actor: one event for the lot, durable before any of the
//!   callers is answered `accepted`. A few `Accept`s are in flight per shard, so the next lot
//!   gathers while the previous one is flushed.
//! - **Layers (C2).** One task follows the log from its checkpoint. Every accepted request
//!   (and every coupon reward accepted by an activity) enters layer 1, which runs at most
//!   `layer1_per_s` (a governor token bucket sized to the activity logic's capacity): risk
//!   screening (C12) and the unknown-batch check, recorded on the intake, then the group place
//!   (C10). What passes waits in layer 2, which runs at most `layer2_per_s` (the stock side's
//!   capacity) and takes up to `merge_max` requests at once: one `Deduct` per batch for all of
//!   them (C3), one event. Before that, the local stock view (C4) answers "sold out" for
//!   requests the batch has never seen, without asking it; the refusal is recorded on the
//!   intake. A batch refusal releases the request's group place.
//! - **Green channel (C7).** [`Coupons::issue_now`] accepts the request like any other, then
//!   has the layer task drive it at once, past the queues and the rate limits, and answers its
//!   outcome.
//!
//! Every step is a command that is idempotent by seq_no, following [`next_step`]; an unknown
//! outcome (a timeout) is retried and gets the recorded answer, so nothing is oversold and
//! nothing is lost. The checkpoint is the log position below which every request is final;
//! after a stop (C5: what is queued stays in the log) or a crash (C6) the task re-drives every
//! request from there, and requests already decided get their recorded answers.

use super::reward_lanes::settle_note;
use super::{load_checkpoint, save_checkpoint, FlowGroup, CHECKPOINT_TREE};
use crate::actors::{ExecError, Registry};
use crate::clock::{Clock, Millis};
use crate::domain::activity::{
    order_key, Activity, ActivityCommand, ActivityError, ActivityEvent, FailReason, RewardClaim,
    RewardKind,
};
use crate::domain::coupon::{
    intake_shard, next_step, reward_request, Acceptance, BatchCommand, BatchError, BatchInfo,
    BatchReply, BatchSpec, CouponBatch, CouponGroup, CouponIntake, GroupCommand, IntakeCommand,
    IntakeReply, IssueRequest, Outcome, Place, Progress, Refusal, Risk, RiskRules, Step, Verdict,
};
use crate::domain::wallet::Wallet;
use crate::domain::Event;
use crate::events::{Envelope, EventStore, StoreError, Subscription};
use crate::ids::Id;
use crate::metrics::Metrics;
use dashmap::DashMap;
use futures::future::{join_all, BoxFuture};
use futures::stream::{FuturesUnordered, StreamExt};
use governor::clock::Clock as _;
use governor::{DefaultDirectRateLimiter, Quota};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

const FLOW: &str = "coupon-layers";
/// `Accept` commands in flight per intake shard.
const INTAKE_IN_FLIGHT: usize = 4;
/// Submissions waiting per intake shard before `submit` waits.
const INTAKE_QUEUE: usize = 65_536;
const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(20);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(2);
const STOP_DRAIN_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct CouponConfig {
    pub intake_shards: u32,
    /// Requests one `Accept` carries at most.
    pub intake_merge_max: usize,
    /// Layer 1 (screening, groups) requests per second; 0: unlimited.
    pub layer1_per_s: u32,
    /// Layer 2 (stock) requests per second; 0: unlimited.
    pub layer2_per_s: u32,
    /// N: requests one merged deduction takes at most (C3).
    pub merge_max: usize,
    /// Merged groups in flight per layer.
    pub in_flight_max: usize,
    /// Requests held in memory; reading the log pauses beyond it.
    pub queue_max: usize,
    pub checkpoint_interval: Duration,
    pub risk: RiskRules,
}

impl Default for CouponConfig {
    fn default() -> Self {
        CouponConfig {
            intake_shards: 4,
            intake_merge_max: 1_024,
            // The seed's cluster did 100k/s; the limits sit above what this machine does.
            layer1_per_s: 400_000,
            layer2_per_s: 400_000,
            merge_max: 512,
            in_flight_max: 4,
            queue_max: 200_000,
            checkpoint_interval: Duration::from_millis(200),
            risk: RiskRules::default(),
        }
    }
}

/// Why a request could not be accepted or issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssueError {
    #[error("seq_no already used with another uid or batch")]
    Conflict,
    #[error("no such coupon batch")]
    UnknownBatch,
    #[error("too busy: {0}")]
    Overloaded(String),
    #[error("outcome unknown: {0}")]
    Unavailable(String),
}

impl<E: std::fmt::Debug> From<ExecError<E>> for IssueError {
    fn from(e: ExecError<E>) -> IssueError {
        match e {
            ExecError::Overloaded => IssueError::Overloaded("the journal is full".into()),
            other => IssueError::Unavailable(format!("{other:?}")),
        }
    }
}

/// The local stock view of one batch (C4): its spec and the highest issued count seen.
#[derive(Debug)]
pub struct StockEntry {
    pub spec: BatchSpec,
    issued: AtomicU64,
}

impl StockEntry {
    fn new(info: &BatchInfo) -> StockEntry {
        StockEntry {
            spec: info.spec.clone(),
            issued: AtomicU64::new(info.issued),
        }
    }

    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Acquire)
    }

    /// Never above the batch's true remaining stock: the issued count only grows.
    pub fn remaining(&self) -> u64 {
        self.spec.stock.saturating_sub(self.issued())
    }

    fn observe(&self, issued: u64) {
        self.issued.fetch_max(issued, Ordering::AcqRel);
    }
}

struct Submission {
    request: IssueRequest,
    reply: oneshot::Sender<Result<Acceptance, IssueError>>,
}

struct GreenRequest {
    request: IssueRequest,
    reply: oneshot::Sender<Result<Outcome, IssueError>>,
}

/// The coupon service: batches, intake, the green channel.
pub struct Coupons {
    pub intakes: Arc<Registry<CouponIntake>>,
    pub batches: Arc<Registry<CouponBatch>>,
    pub groups: Arc<Registry<CouponGroup>>,
    activities: Arc<Registry<Activity>>,
    /// Where a coupon reward's note is settled on a cluster.
    wallets: Arc<Registry<Wallet>>,
    stock: DashMap<Id, Arc<StockEntry>>,
    intake: Vec<mpsc::Sender<Submission>>,
    green: mpsc::Sender<GreenRequest>,
    config: CouponConfig,
    metrics: Arc<Metrics>,
    /// Outcomes are noted on the intake too ([`next_step`]'s `settle`): on a cluster node,
    /// where a request's intake and its batch are in different partitions.
    settle: bool,
}

/// The running batchers and layer task.
pub struct CouponFlows {
    flows: FlowGroup,
}

impl CouponFlows {
    /// Stops taking work; merged groups in flight finish (bounded); what is queued stays in
    /// the log and is re-driven after the restart (C5).
    pub async fn stop(&self) {
        self.flows.stop().await;
    }
}

impl Coupons {
    /// Starts the batchers and the layer task. Must be called within an actix system.
    pub fn start(
        intakes: Arc<Registry<CouponIntake>>,
        batches: Arc<Registry<CouponBatch>>,
        groups: Arc<Registry<CouponGroup>>,
        activities: Arc<Registry<Activity>>,
        wallets: Arc<Registry<Wallet>>,
        db: &sled::Db,
        config: CouponConfig,
    ) -> Result<(Arc<Coupons>, CouponFlows), StoreError> {
        let runtime = intakes.runtime().clone();
        let settle = runtime.placement.is_some();
        let (store, clock, metrics) = (
            runtime.store.clone(),
            runtime.clock.clone(),
            runtime.metrics.clone(),
        );
        let tree = db
            .open_tree(CHECKPOINT_TREE)
            .map_err(|e| StoreError::Io(e.to_string()))?;
        let checkpoint = load_checkpoint(&tree, FLOW)?;
        let shards = config.intake_shards.max(1);
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..shards).map(|_| mpsc::channel(INTAKE_QUEUE)).unzip();
        let (green, green_rx) = mpsc::channel(1_024);
        let coupons = Arc::new(Coupons {
            intakes,
            batches,
            groups,
            activities,
            wallets,
            stock: DashMap::new(),
            intake: senders,
            green,
            config: config.clone(),
            metrics: metrics.clone(),
            settle,
        });
        let mut flows = FlowGroup::start();
        for (shard, rx) in receivers.into_iter().enumerate() {
            let coupons = coupons.clone();
            flows.spawn(move |stop| batcher(coupons, shard as u32, rx, stop));
        }
        let limiter = |rate: u32| {
            NonZeroU32::new(rate).map(|r| DefaultDirectRateLimiter::direct(Quota::per_second(r)))
        };
        let layers = Layers {
            coupons: coupons.clone(),
            queue1: VecDeque::new(),
            queue2: VecDeque::new(),
            limiter1: limiter(config.layer1_per_s),
            limiter2: limiter(config.layer2_per_s),
            burst1: config.layer1_per_s,
            burst2: config.layer2_per_s,
            in_flight: [0, 0],
            requests_in_flight: [0, 0],
            outstanding: BTreeMap::new(),
            dispatched: HashSet::new(),
            waiters: HashMap::new(),
            risk: Risk::new(config.risk.clone()),
            read_to: checkpoint,
            saved: checkpoint,
            fresh_after: store.head(),
            tree,
            clock,
            metrics,
        };
        flows.spawn(move |stop| layers.run(store, stop, green_rx));
        Ok((coupons, CouponFlows { flows }))
    }

    /// Creates a batch (idempotent with the same spec).
    pub async fn create_batch(
        &self,
        batch_id: &Id,
        spec: BatchSpec,
    ) -> Result<BatchInfo, ExecError<BatchError>> {
        match self
            .batches
            .execute(batch_id.as_str(), BatchCommand::Create(spec))
            .await?
        {
            BatchReply::Info(info) => {
                self.stock
                    .entry(batch_id.clone())
                    .or_insert_with(|| Arc::new(StockEntry::new(&info)));
                Ok(info)
            }
            other => Err(ExecError::Unavailable(format!(
                "unexpected batch reply {other:?}"
            ))),
        }
    }

    /// The local stock view of a batch, loaded from the batch on first use; `None` if it does
    /// not exist. Must be called within the actix system.
    pub async fn batch(&self, batch_id: &Id) -> Result<Option<Arc<StockEntry>>, IssueError> {
        if let Some(entry) = self.stock.get(batch_id) {
            return Ok(Some(entry.clone()));
        }
        match self
            .batches
            .execute(batch_id.as_str(), BatchCommand::Info)
            .await
        {
            Ok(BatchReply::Info(info)) => Ok(Some(
                self.stock
                    .entry(batch_id.clone())
                    .or_insert_with(|| Arc::new(StockEntry::new(&info)))
                    .clone(),
            )),
            Ok(_) => Ok(None),
            Err(ExecError::Rejected(BatchError::Unknown)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Accepts a request durably (C1): `New`, or `Repeat` with what is known so far. Usable
    /// from any thread (it only talks to the shard's batcher).
    pub async fn submit(&self, request: IssueRequest) -> Result<Acceptance, IssueError> {
        let shard = intake_shard(&request.seq_no, self.intake.len() as u32) as usize;
        let (reply, answer) = oneshot::channel();
        self.intake[shard]
            .send(Submission { request, reply })
            .await
            .map_err(|_| IssueError::Unavailable("coupon intake stopped".into()))?;
        answer
            .await
            .map_err(|_| IssueError::Unavailable("coupon intake stopped".into()))?
    }

    /// The green channel (C7): accepts the request, then issues it at once and answers its
    /// outcome (the same on every repeat of the seq_no).
    pub async fn issue_now(&self, request: IssueRequest) -> Result<Outcome, IssueError> {
        match self.submit(request.clone()).await? {
            Acceptance::Conflict => return Err(IssueError::Conflict),
            Acceptance::Repeat(Verdict::Rejected(reason)) => return Ok(Outcome::Rejected(reason)),
            Acceptance::Repeat(Verdict::Issued(n)) => return Ok(Outcome::Issued(n)),
            Acceptance::New | Acceptance::Repeat(_) => {}
        }
        let (reply, answer) = oneshot::channel();
        self.green
            .send(GreenRequest { request, reply })
            .await
            .map_err(|_| IssueError::Unavailable("coupon layers stopped".into()))?;
        answer
            .await
            .map_err(|_| IssueError::Unavailable("coupon layers stopped".into()))?
    }

    /// One shard's lot: unknown batches answered at once, the rest accepted in one command.
    async fn accept(&self, shard: u32, lot: Vec<Submission>) {
        let mut known = Vec::with_capacity(lot.len());
        for submission in lot {
            match self.batch(&submission.request.batch_id).await {
                Ok(Some(_)) => known.push(submission),
                Ok(None) => {
                    let _ = submission.reply.send(Err(IssueError::UnknownBatch));
                }
                Err(e) => {
                    let _ = submission.reply.send(Err(e));
                }
            }
        }
        if known.is_empty() {
            return;
        }
        let requests = known.iter().map(|s| s.request.clone()).collect();
        let reply = self
            .intakes
            .execute(&shard.to_string(), IntakeCommand::Accept { requests })
            .await;
        match reply {
            Ok(IntakeReply::Accepted(answers)) if answers.len() == known.len() => {
                let fresh = answers
                    .iter()
                    .filter(|a| matches!(a, Acceptance::New))
                    .count();
                self.metrics
                    .coupon_requests_total
                    .with_label_values(&["accepted"])
                    .inc_by(fresh as u64);
                for (submission, answer) in known.into_iter().zip(answers) {
                    let _ = submission.reply.send(Ok(answer));
                }
            }
            Ok(other) => {
                for submission in known {
                    let _ = submission.reply.send(Err(IssueError::Unavailable(format!(
                        "unexpected intake reply {other:?}"
                    ))));
                }
            }
            Err(e) => {
                let e = IssueError::from(e);
                for submission in known {
                    let _ = submission.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Takes what waits for a shard (up to `intake_merge_max`), one `Accept` per lot, a few in
/// flight so the next lot gathers while one is flushed.
async fn batcher(
    coupons: Arc<Coupons>,
    shard: u32,
    mut rx: mpsc::Receiver<Submission>,
    mut stop: watch::Receiver<bool>,
) {
    let in_flight = Arc::new(Semaphore::new(INTAKE_IN_FLIGHT));
    let max = coupons.config.intake_merge_max.max(1);
    loop {
        let first = tokio::select! {
            biased;
            changed = stop.changed() => if changed.is_err() || *stop.borrow() { break } else { continue },
            first = rx.recv() => match first { Some(s) => s, None => break },
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let mut lot = vec![first];
        while lot.len() < max {
            match rx.try_recv() {
                Ok(s) => lot.push(s),
                Err(_) => break,
            }
        }
        let coupons = coupons.clone();
        // On the arbiter's local set: actors activated by the command start there.
        actix_rt::spawn(async move {
            coupons.accept(shard, lot).await;
            drop(permit);
        });
    }
    // Lots in flight finish; anything still queued is answered "unavailable" (its caller may
    // retry with the same seq_no after the restart).
    let _ = in_flight.acquire_many(INTAKE_IN_FLIGHT as u32).await;
    rx.close();
    while let Ok(s) = rx.try_recv() {
        let _ = s.reply.send(Err(IssueError::Unavailable(
            "coupon intake stopping".into(),
        )));
    }
}

/// A request on its way through the layers.
#[derive(Debug, Clone)]
struct Tracked {
    request: IssueRequest,
    /// The log position of its acceptance (None: a green drive).
    log_seq: Option<u64>,
    accepted_at_ms: Millis,
    /// Accepted after this process started: it may take the local sold-out shortcut.
    fresh: bool,
    /// A coupon reward: the activity entity that accepted it (`cny`, or its intake shard
    /// `cny@3` on a cluster), which marks it delivered or failed when final, and the reward.
    reward: Option<(String, RewardClaim)>,
    screen: Option<Refusal>,
    progress: Progress,
    done: Option<Outcome>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Layer {
    One,
    Two,
    Green,
}

struct LayerDone {
    layer: Layer,
    items: Vec<Tracked>,
}

struct Layers {
    coupons: Arc<Coupons>,
    queue1: VecDeque<Tracked>,
    queue2: VecDeque<Tracked>,
    limiter1: Option<DefaultDirectRateLimiter>,
    limiter2: Option<DefaultDirectRateLimiter>,
    burst1: u32,
    burst2: u32,
    /// Merged groups in flight per layer.
    in_flight: [usize; 2],
    requests_in_flight: [usize; 2],
    /// Requests not final, by the log position of their acceptance.
    outstanding: BTreeMap<u64, usize>,
    /// Seq_nos sent to a batch (or driven by the green channel) in this process.
    dispatched: HashSet<u128>,
    waiters: HashMap<u128, Vec<oneshot::Sender<Result<Outcome, IssueError>>>>,
    risk: Risk,
    read_to: u64,
    saved: u64,
    /// Requests accepted at positions above this were accepted by this process.
    fresh_after: u64,
    tree: sled::Tree,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
}

impl Layers {
    fn checkpoint(&self) -> u64 {
        self.outstanding
            .keys()
            .next()
            .map(|s| s - 1)
            .unwrap_or(self.read_to)
    }

    fn held(&self) -> usize {
        self.queue1.len()
            + self.queue2.len()
            + self.requests_in_flight[0]
            + self.requests_in_flight[1]
    }

    fn track(
        &mut self,
        envelope: &Envelope,
        request: IssueRequest,
        reward: Option<(String, RewardClaim)>,
    ) {
        *self.outstanding.entry(envelope.seq).or_default() += 1;
        self.queue1.push_back(Tracked {
            request,
            log_seq: Some(envelope.seq),
            accepted_at_ms: envelope.recorded_at_ms,
            fresh: envelope.seq > self.fresh_after,
            reward,
            screen: None,
            progress: Progress::default(),
            done: None,
        });
    }

    fn enqueue(&mut self, events: &[Arc<Envelope>]) {
        for envelope in events {
            self.read_to = envelope.seq;
            match &envelope.event {
                Event::CouponIntake(crate::domain::coupon::IntakeEvent::Accepted {
                    requests,
                    ..
                }) => {
                    for request in requests {
                        self.track(envelope, request.clone(), None);
                    }
                }
                Event::Activity(ActivityEvent::RewardAccepted(reward))
                    if reward.kind == RewardKind::Coupon =>
                {
                    let Some((activity, request)) = reward_request(&envelope.stream, reward) else {
                        continue;
                    };
                    let Some(entity) = envelope.stream.strip_prefix("activity:") else {
                        continue;
                    };
                    let claim = RewardClaim::of(&activity, reward);
                    self.track(envelope, request, Some((entity.to_owned(), claim)));
                }
                _ => {}
            }
        }
    }

    /// Takes up to `n` requests from a layer's queue if its token bucket allows; otherwise
    /// how long to wait.
    fn take(&mut self, layer: usize, max: usize) -> Result<Vec<Tracked>, Option<Duration>> {
        let (queue, limiter, burst) = if layer == 0 {
            (&mut self.queue1, &self.limiter1, self.burst1)
        } else {
            (&mut self.queue2, &self.limiter2, self.burst2)
        };
        if queue.is_empty() {
            return Err(None);
        }
        let mut n = queue.len().min(max.max(1));
        if let Some(limiter) = limiter {
            n = n.min(burst.max(1) as usize);
            let cells = NonZeroU32::new(n as u32).expect("n >= 1");
            match limiter.check_n(cells) {
                Ok(Ok(())) => {}
                Ok(Err(not_until)) => {
                    return Err(Some(
                        not_until.wait_time_from(governor::clock::DefaultClock::default().now()),
                    ))
                }
                Err(_) => return Err(Some(Duration::from_millis(1))),
            }
        }
        Ok(queue.drain(..n).collect())
    }

    /// Starts merged groups in both layers while the bounds and rate limits allow.
    fn dispatch(
        &mut self,
        running: &mut FuturesUnordered<BoxFuture<'static, LayerDone>>,
    ) -> Option<Duration> {
        let mut wait: Option<Duration> = None;
        let max = self.coupons.config.in_flight_max.max(1);
        let merge = self.coupons.config.merge_max.max(1);
        let now = self.clock.now_ms();
        // Layer 2 first: it finishes requests.
        while self.in_flight[1] < max {
            match self.take(1, merge) {
                Ok(mut items) => {
                    for t in &mut items {
                        let k = order_key(&t.request.seq_no);
                        let sold_out = self
                            .coupons
                            .stock
                            .get(&t.request.batch_id)
                            .is_some_and(|e| e.remaining() == 0);
                        if t.fresh && sold_out && !self.dispatched.contains(&k) {
                            t.progress.sold_out_locally = true;
                        } else {
                            self.dispatched.insert(k);
                        }
                    }
                    self.in_flight[1] += 1;
                    self.requests_in_flight[1] += items.len();
                    running.push(Box::pin(drive(self.coupons.clone(), Layer::Two, items)));
                }
                Err(w) => {
                    wait = min_wait(wait, w);
                    break;
                }
            }
        }
        while self.in_flight[0] < max {
            match self.take(0, merge) {
                Ok(mut items) => {
                    for t in &mut items {
                        t.screen = self.risk.screen(&t.request, now);
                    }
                    self.in_flight[0] += 1;
                    self.requests_in_flight[0] += items.len();
                    running.push(Box::pin(drive(self.coupons.clone(), Layer::One, items)));
                }
                Err(w) => {
                    wait = min_wait(wait, w);
                    break;
                }
            }
        }
        wait
    }

    fn green(
        &mut self,
        green: GreenRequest,
        running: &mut FuturesUnordered<BoxFuture<'static, LayerDone>>,
    ) {
        let k = order_key(&green.request.seq_no);
        self.dispatched.insert(k);
        self.waiters.entry(k).or_default().push(green.reply);
        let tracked = Tracked {
            screen: self.risk.screen(&green.request, self.clock.now_ms()),
            request: green.request,
            log_seq: None,
            accepted_at_ms: self.clock.now_ms(),
            fresh: false,
            reward: None,
            progress: Progress::default(),
            done: None,
        };
        running.push(Box::pin(drive(
            self.coupons.clone(),
            Layer::Green,
            vec![tracked],
        )));
    }

    fn complete(&mut self, done: LayerDone) {
        let layer = match done.layer {
            Layer::One => Some(0),
            Layer::Two => Some(1),
            Layer::Green => None,
        };
        if let Some(l) = layer {
            self.in_flight[l] -= 1;
            self.requests_in_flight[l] -= done.items.len();
            self.metrics
                .coupon_layer_processed_total
                .with_label_values(&[if l == 0 { "1" } else { "2" }])
                .inc_by(done.items.len() as u64);
        }
        let now = self.clock.now_ms();
        for t in done.items {
            let Some(outcome) = t.done else {
                // Passed layer 1: waits for the stock.
                self.queue2.push_back(t);
                continue;
            };
            let k = order_key(&t.request.seq_no);
            if let Some(waiters) = self.waiters.remove(&k) {
                for waiter in waiters {
                    let _ = waiter.send(Ok(outcome));
                }
            }
            // Counted once, by the request's own copy (a green drive is a second copy).
            let Some(seq) = t.log_seq else {
                continue;
            };
            match outcome {
                Outcome::Issued(_) => {
                    self.metrics.coupons_issued_total.inc();
                    self.metrics
                        .coupon_requests_total
                        .with_label_values(&["issued"])
                        .inc();
                    self.metrics
                        .coupon_issue_seconds
                        .observe((now - t.accepted_at_ms).max(0) as f64 / 1000.0);
                }
                Outcome::Rejected(reason) => {
                    self.metrics
                        .coupon_requests_total
                        .with_label_values(&[reason.as_str()])
                        .inc();
                }
            }
            self.dispatched.remove(&k);
            self.risk.forget(&t.request.seq_no);
            if let Some(count) = self.outstanding.get_mut(&seq) {
                *count -= 1;
                if *count == 0 {
                    self.outstanding.remove(&seq);
                }
            }
        }
    }

    fn save(&mut self) {
        let checkpoint = self.checkpoint();
        if checkpoint != self.saved {
            match save_checkpoint(&self.tree, FLOW, checkpoint) {
                Ok(()) => self.saved = checkpoint,
                Err(e) => crate::warn_limited!(error = %e, "coupon layers checkpoint not saved"),
            }
        }
        let backlog = &self.metrics.coupon_layer_backlog;
        backlog
            .with_label_values(&["1"])
            .set((self.queue1.len() + self.requests_in_flight[0]) as i64);
        backlog
            .with_label_values(&["2"])
            .set((self.queue2.len() + self.requests_in_flight[1]) as i64);
    }

    async fn run(
        mut self,
        store: Arc<dyn EventStore>,
        mut stop: watch::Receiver<bool>,
        mut green: mpsc::Receiver<GreenRequest>,
    ) {
        let mut subscription = Subscription::new(store, self.read_to + 1, 4096);
        let mut running: FuturesUnordered<BoxFuture<'static, LayerDone>> = FuturesUnordered::new();
        let mut tick = tokio::time::interval(self.coupons.config.checkpoint_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let throttled = self.dispatch(&mut running);
            let room = self.held() < self.coupons.config.queue_max;
            tokio::select! {
                biased;
                changed = stop.changed() => if changed.is_err() || *stop.borrow() { break },
                Some(request) = green.recv() => self.green(request, &mut running),
                Some(done) = running.next(), if !running.is_empty() => self.complete(done),
                events = subscription.next(), if room => match events {
                    Ok(events) => self.enqueue(&events),
                    Err(e) => {
                        tracing::error!(error = %e, "coupon layers cannot read the log; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                },
                _ = tokio::time::sleep(throttled.unwrap_or(Duration::MAX)), if throttled.is_some() => {}
                _ = tick.tick() => self.save(),
            }
        }
        let drained = tokio::time::timeout(STOP_DRAIN_MAX, async {
            while let Some(done) = running.next().await {
                self.complete(done);
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                "coupon layers stopped with work in flight; it is re-driven after the restart"
            );
        }
        self.save();
        tracing::info!(
            queued = self.queue1.len() + self.queue2.len(),
            checkpoint = self.saved,
            "coupon layers stopped; queued requests resume from the log after a restart"
        );
    }
}

fn min_wait(wait: Option<Duration>, other: Option<Duration>) -> Option<Duration> {
    match (wait, other) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn transient<E>(e: &ExecError<E>) -> bool {
    matches!(
        e,
        ExecError::Unavailable(_) | ExecError::Overloaded | ExecError::Timeout
    )
}

/// Drives a merged group of requests as far as its layer goes: layer 1 stops before the
/// stock, layer 2 and the green channel go to the end. Each round sends one command per
/// target (intake shard, group, batch) for all the requests that need it.
async fn drive(coupons: Arc<Coupons>, layer: Layer, mut items: Vec<Tracked>) -> LayerDone {
    if layer != Layer::Two {
        // Requests for batches that do not exist are refused at screening.
        for t in &mut items {
            if t.screen.is_none() {
                match coupons.batch(&t.request.batch_id).await {
                    Ok(Some(_)) => {}
                    Ok(None) => t.screen = Some(Refusal::UnknownBatch),
                    // Unknown for now: the batch is asked again at the deduction.
                    Err(_) => {}
                }
            }
        }
    }
    let deduct = layer != Layer::One;
    let shards = coupons.intake.len() as u32;
    let mut backoff = RETRY_BACKOFF_MIN;
    loop {
        let mut records: BTreeMap<u32, Vec<(usize, Verdict)>> = BTreeMap::new();
        let mut reserves: BTreeMap<Id, Vec<usize>> = BTreeMap::new();
        let mut releases: BTreeMap<Id, Vec<usize>> = BTreeMap::new();
        let mut deducts: BTreeMap<Id, Vec<usize>> = BTreeMap::new();
        for (i, t) in items.iter_mut().enumerate() {
            if t.done.is_some() {
                continue;
            }
            let group = coupons
                .stock
                .get(&t.request.batch_id)
                .and_then(|e| e.spec.group_id.clone());
            match next_step(&t.progress, t.screen, group.is_some(), coupons.settle) {
                Step::Done(outcome) => t.done = Some(outcome),
                Step::Record(verdict) => records
                    .entry(intake_shard(&t.request.seq_no, shards))
                    .or_default()
                    .push((i, verdict)),
                Step::Reserve => reserves.entry(group.expect("grouped")).or_default().push(i),
                Step::Release => releases.entry(group.expect("grouped")).or_default().push(i),
                Step::Deduct if deduct => deducts
                    .entry(t.request.batch_id.clone())
                    .or_default()
                    .push(i),
                Step::Deduct => {}
            }
        }
        if records.is_empty() && reserves.is_empty() && releases.is_empty() && deducts.is_empty() {
            break;
        }
        let failed =
            execute_round(&coupons, &mut items, records, reserves, releases, deducts).await;
        if failed {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
        } else {
            backoff = RETRY_BACKOFF_MIN;
        }
    }
    // Coupon rewards: the activity settles each one by its request's final outcome.
    let settles = items.iter().filter_map(|t| {
        let (entity, claim) = t.reward.as_ref()?;
        Some(settle_reward(&coupons, entity, claim, t.done?))
    });
    join_all(settles).await;
    LayerDone { layer, items }
}

/// Settles a coupon reward in its activity by its request's final outcome: delivered when the
/// coupon was issued, failed (its budget returned) when the issuance was refused; then, on a
/// cluster, the note on its user's wallet. Both are idempotent; transient errors are retried
/// until the activity answers, so the reward never stays pending (R6) while its request is
/// final. A refusal of the command other than "settled otherwise already" (the reward predates
/// this process's rules) is logged, not retried.
async fn settle_reward(coupons: &Coupons, entity: &str, claim: &RewardClaim, outcome: Outcome) {
    let (order_id, uid) = (claim.order_id.clone(), claim.uid.clone());
    let command = match outcome {
        Outcome::Issued(_) => ActivityCommand::MarkDelivered { order_id, uid },
        Outcome::Rejected(refusal) => ActivityCommand::MarkFailed {
            order_id,
            uid,
            reason: FailReason::CouponRefused(refusal),
        },
    };
    let mut backoff = RETRY_BACKOFF_MIN;
    loop {
        match coupons.activities.execute(entity, command.clone()).await {
            Ok(_) | Err(ExecError::Rejected(ActivityError::WrongState { .. })) => {
                return settle_note(&coupons.wallets, claim).await;
            }
            Err(e) if transient(&e) => {
                crate::warn_limited!(order_id = %claim.order_id, error = ?e, "coupon reward not settled yet; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
            }
            Err(e) => {
                tracing::error!(order_id = %claim.order_id, activity = %entity, error = ?e, "coupon reward cannot be settled");
                return;
            }
        }
    }
}

/// One round of merged commands, all at once. Returns whether any failed (to retry).
async fn execute_round(
    coupons: &Coupons,
    items: &mut [Tracked],
    records: BTreeMap<u32, Vec<(usize, Verdict)>>,
    reserves: BTreeMap<Id, Vec<usize>>,
    releases: BTreeMap<Id, Vec<usize>>,
    deducts: BTreeMap<Id, Vec<usize>>,
) -> bool {
    let mut failed = false;
    let record_calls = records.into_iter().map(|(shard, list)| {
        let verdicts = list
            .iter()
            .map(|(i, v)| (items[*i].request.clone(), *v))
            .collect();
        let intakes = coupons.intakes.clone();
        async move {
            let reply = intakes
                .execute(&shard.to_string(), IntakeCommand::Record { verdicts })
                .await;
            (list, reply)
        }
    });
    let group_call = |group: Id, list: Vec<usize>, release: bool, items: &[Tracked]| {
        let requests: Vec<IssueRequest> = list.iter().map(|i| items[*i].request.clone()).collect();
        let command = if release {
            GroupCommand::Release { requests }
        } else {
            GroupCommand::Reserve { requests }
        };
        let groups = coupons.groups.clone();
        async move {
            let reply = groups.execute(group.as_str(), command).await;
            (list, release, reply)
        }
    };
    let group_calls: Vec<_> = reserves
        .into_iter()
        .map(|(g, l)| group_call(g, l, false, items))
        .chain(
            releases
                .into_iter()
                .map(|(g, l)| group_call(g, l, true, items)),
        )
        .collect();
    let deduct_calls = deducts.into_iter().map(|(batch, list)| {
        let requests = list
            .iter()
            .map(|i| {
                (
                    items[*i].request.seq_no.clone(),
                    items[*i].request.uid.clone(),
                )
            })
            .collect();
        let batches = coupons.batches.clone();
        async move {
            let reply = batches
                .execute(batch.as_str(), BatchCommand::Deduct { requests })
                .await;
            (batch, list, reply)
        }
    });
    let (records, groups, deducts) = futures::join!(
        join_all(record_calls),
        join_all(group_calls),
        join_all(deduct_calls)
    );
    for (list, reply) in records {
        match reply {
            Ok(IntakeReply::Verdicts(verdicts)) => {
                for ((i, _), v) in list.iter().zip(verdicts) {
                    items[*i].progress.verdict = Some(v);
                }
            }
            Ok(_) => failed = true,
            Err(e) => {
                failed = true;
                crate::warn_limited!(error = ?e, "coupon verdicts not recorded; retrying");
            }
        }
    }
    for (list, release, reply) in groups {
        match reply {
            Ok(places) => {
                for (i, place) in list.iter().zip(places) {
                    items[*i].progress.place = if release {
                        Some(place.unwrap_or(Place::Released))
                    } else {
                        place
                    };
                }
            }
            Err(e) => {
                failed = true;
                crate::warn_limited!(error = ?e, "coupon group command failed; retrying");
            }
        }
    }
    for (batch, list, reply) in deducts {
        match reply {
            Ok(BatchReply::Deducted { outcomes, issued }) => {
                coupons.metrics.coupon_merge_size.observe(list.len() as f64);
                if let Some(entry) = coupons.stock.get(&batch) {
                    entry.observe(issued);
                }
                for (i, outcome) in list.iter().zip(outcomes) {
                    items[*i].progress.issue = Some(outcome);
                }
            }
            Err(ExecError::Rejected(BatchError::Unknown)) => {
                // The batch does not exist: record the refusal on the intake.
                for i in list {
                    items[i].screen = Some(Refusal::UnknownBatch);
                    items[i].progress.verdict = None;
                }
            }
            Ok(_) | Err(_) => {
                // Unknown outcome: asked again (the batch answers what it recorded, if it did).
                failed = true;
            }
        }
    }
    failed
}
