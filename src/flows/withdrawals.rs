//! Withdrawals (W6-W11): the request flow, the payout lanes, the compensation sweeper and the
//! near-real-time reconciler.
//!
//! - [`Withdrawals::request`] creates the order (`withdrawal:<order id>`), debits the wallet and
//!   records the outcome. It answers as soon as the debit is recorded; the payout is
//!   asynchronous.
//! - The payout lanes follow the log from their checkpoint. An order that was debited, whose
//!   attempt failed, that was parked or abandoned after a debit, or that was left paying by a
//!   crash is queued by channel; each channel has its own token bucket (W7). [`Withdrawals::settle`]
//!   drives one order one step: start an attempt and call the channel, resolve a timeout by
//!   querying (never by paying again blindly; the channel is idempotent by order id), schedule
//!   a retry after the configured backoff, park after the last attempt, refund a failed order
//!   that was debited (once: the wallet's refund is idempotent by order id).
//! - The sweeper, on the injected clock, finds orders not final after `compensation_age` and
//!   applies W9's rule for their state (`domain::withdrawal::compensation`).
//! - One driver per order: the lanes and the sweeper take a lease from [`Drivers`] before any
//!   payout step of an order; the second driver does nothing ([`Step::Busy`]).
//! - The reconciler checks every state change of every order against the wallet's movements
//!   (one debit of exactly the order's amount, a refund of exactly the debit when it failed
//!   after the debit, none otherwise) and, when it succeeds or fails, the channel's record
//!   (paid the order's amount exactly when it succeeded); a mismatch increments
//!   `hongbao_reconciliation_mismatches_total{check}` and is logged with the order id.

use super::{load_checkpoint, save_checkpoint, FlowGroup, CHECKPOINT_TREE};
use crate::actors::{ExecError, Registry};
use crate::channels::{PayOutcome, PaymentChannel, QueryOutcome};
use crate::clock::{Clock, Millis};
use crate::domain::wallet::{Entry, Wallet, WalletCommand, WalletError, WalletEvent};
use crate::domain::withdrawal::{
    compensation, Channel, Compensation, OrderState, PayoutResult, WithdrawalCommand,
    WithdrawalError, WithdrawalEvent, WithdrawalOrder, WithdrawalRequest,
};
use crate::domain::Event;
use crate::events::{Envelope, EventStore, StoreError, Subscription};
use crate::ids::Id;
use crate::metrics::Metrics;
use crate::projections::withdrawals as view;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const LANES_FLOW: &str = "payout-lanes";
const RECONCILER_FLOW: &str = "withdrawal-reconciler";
/// How long a stop waits for payouts in flight.
const STOP_DRAIN_MAX: Duration = Duration::from_secs(10);
/// Delay before retrying a step that failed for a transient reason (an actor restarting).
const TRANSIENT_RETRY: Duration = Duration::from_millis(500);
/// Orders one sweep looks at, at most.
const SWEEP_ORDERS_MAX: usize = 10_000;

#[derive(Debug, Clone)]
pub struct WithdrawalConfig {
    /// Payout attempts per order: the first and the retries (W7: three retries).
    pub max_attempts: u32,
    /// Wait before retry n (1-based), the last value repeating.
    pub retry_backoff: Vec<Duration>,
    /// Payouts per second per channel (the lanes' own limit, W7); 0 = unlimited.
    pub rate_per_s: BTreeMap<Channel, u32>,
    pub in_flight_max: usize,
    pub sweep_interval: Duration,
    /// Orders not final after this age are compensated (W9; the seed's 4 hours).
    pub compensation_age: Duration,
    pub checkpoint_interval: Duration,
    /// Longest wait for one channel call (real time). A payment not answered by then is an
    /// unknown outcome, resolved by a query; a query not answered leaves the order paying, to be
    /// resumed later. It bounds how long a driver holds an order (see [`Drivers`]).
    pub channel_call_timeout: Duration,
}

/// The default [`WithdrawalConfig::channel_call_timeout`]: far above a healthy channel's
/// latency (tens to hundreds of ms), far below the compensation age.
pub const CHANNEL_CALL_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

impl Default for WithdrawalConfig {
    fn default() -> Self {
        WithdrawalConfig {
            max_attempts: 4,
            // All three retries within about ten seconds: a first run sees failures settle fast.
            retry_backoff: vec![
                Duration::from_secs(1),
                Duration::from_secs(3),
                Duration::from_secs(6),
            ],
            rate_per_s: BTreeMap::from([
                (Channel::Bank, 2_000),
                (Channel::Alipay, 5_000),
                (Channel::Change, 10_000),
            ]),
            in_flight_max: 256,
            sweep_interval: Duration::from_secs(60),
            compensation_age: Duration::from_secs(4 * 3600),
            checkpoint_interval: Duration::from_millis(200),
            channel_call_timeout: CHANNEL_CALL_TIMEOUT_DEFAULT,
        }
    }
}

impl WithdrawalConfig {
    fn backoff(&self, attempt: u32) -> Duration {
        let i = (attempt.max(1) - 1) as usize;
        self.retry_backoff
            .get(i)
            .or(self.retry_backoff.last())
            .copied()
            .unwrap_or(Duration::from_secs(1))
    }
}

/// Where an order stands after a settling step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Final: nothing more to do.
    Done,
    /// Waiting for its debit (the request flow or the sweeper moves it).
    Waiting,
    /// Retry the payout at this time (epoch ms, injected clock).
    RetryAt(Millis),
    /// Another driver holds the order: nothing done; look again later.
    Busy,
}

/// Who may run payout work on an order now: at most one driver per order (issue 11, W9/W10).
///
/// Every payout attempt, resumption, query and refund of an order runs under a lease taken
/// here, by the payout lanes ([`Withdrawals::settle`]) and the sweeper
/// ([`Withdrawals::compensate`]) alike; a second driver is answered [`Step::Busy`] and does
/// nothing. The lease ends only when its driver finishes (the guard is dropped, also when the
/// task is cancelled): it never lapses, so no second driver can ever start while a call of the
/// first may still pay. A driver always finishes in bounded time instead: every channel call
/// is bounded by [`WithdrawalConfig::channel_call_timeout`] (an unanswered payment is an unknown
/// outcome, dropped and resolved by a query) and every actor call by the command timeout, so
/// a hung channel cannot keep the sweeper out for ever (W9).
///
/// In-process on purpose: the order's actor persists facts and does no I/O, so a lease in the
/// log would cost two appends (and flushes) per attempt for what one process can guarantee in
/// memory. Across nodes it is not enough: there, one node owns an order's partition (its lanes
/// and sweeper are the only drivers); the channel's idempotency by order id and the order
/// refusing outcomes of other attempts remain as the second line.
#[derive(Default)]
pub struct Drivers {
    leases: dashmap::DashMap<Id, Lease>,
    next_token: std::sync::atomic::AtomicU64,
}

struct Lease {
    driver: &'static str,
    token: u64,
}

/// A driver's hold on one order; dropping it ends the lease.
pub struct DriverLease<'a> {
    drivers: &'a Drivers,
    order_id: Id,
    token: u64,
}

impl Drivers {
    /// Takes the order for `driver` unless another driver holds it.
    pub fn acquire(&self, order_id: &Id, driver: &'static str) -> Option<DriverLease<'_>> {
        use dashmap::mapref::entry::Entry;
        let token = self
            .next_token
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match self.leases.entry(order_id.clone()) {
            Entry::Vacant(free) => {
                free.insert(Lease { driver, token });
            }
            Entry::Occupied(held) => {
                tracing::debug!(order_id = %order_id, holder = held.get().driver, driver, "order busy");
                return None;
            }
        }
        Some(DriverLease {
            drivers: self,
            order_id: order_id.clone(),
            token,
        })
    }
}

impl Drop for DriverLease<'_> {
    fn drop(&mut self) {
        self.drivers
            .leases
            .remove_if(&self.order_id, |_, l| l.token == self.token);
    }
}

/// Why a flow step did not complete; retried later.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Transient(pub String);

fn transient<E: std::fmt::Debug>(e: ExecError<E>) -> Transient {
    Transient(format!("{e:?}"))
}

/// The withdrawal flows and what they act through.
pub struct Withdrawals {
    pub orders: Arc<Registry<WithdrawalOrder>>,
    pub wallets: Arc<Registry<Wallet>>,
    pub channel: Arc<dyn PaymentChannel>,
    pub config: WithdrawalConfig,
    /// One driver per order at a time (see [`Drivers`]).
    pub drivers: Drivers,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
}

impl Withdrawals {
    pub fn new(
        orders: Arc<Registry<WithdrawalOrder>>,
        wallets: Arc<Registry<Wallet>>,
        channel: Arc<dyn PaymentChannel>,
        config: WithdrawalConfig,
    ) -> Arc<Withdrawals> {
        let runtime = orders.runtime().clone();
        Arc::new(Withdrawals {
            orders,
            wallets,
            channel,
            config,
            drivers: Drivers::default(),
            clock: runtime.clock.clone(),
            metrics: runtime.metrics.clone(),
        })
    }

    /// The order as it stands (`None`: no such order).
    pub async fn order(&self, order_id: &Id) -> Result<Option<WithdrawalOrder>, Transient> {
        let (order, _) = self
            .orders
            .state(order_id.as_str())
            .await
            .map_err(transient)?;
        Ok(order.request.is_some().then_some(order))
    }

    /// Creates the order and debits the wallet (W7: the answer comes right after the debit).
    /// Idempotent: a retry resumes where the first attempt stopped.
    ///
    /// Three steps (order requested, wallet debited, debit recorded on the order), each
    /// decided on the state the previous one left, each sent once the previous one is durable
    /// (`Registry::execute_chained`, whose overlap of the flushes is withdrawn: see there), so
    /// a crash leaves a prefix of the three, which a retry or the sweeper resumes. Every answer
    /// waits until all it rests on is durable.
    pub async fn request(
        &self,
        order_id: &Id,
        request: WithdrawalRequest,
    ) -> Result<WithdrawalOrder, ExecError<WithdrawalError>> {
        let uid = request.uid.clone();
        let amount = request.amount;
        let (order, requested) = self
            .orders
            .execute_chained(order_id.as_str(), WithdrawalCommand::Request(request))
            .await?;
        if order.state != Some(OrderState::PendingDebit) {
            requested.await?;
            return Ok(order);
        }
        self.metrics
            .withdrawals_total
            .with_label_values(&["requested"])
            .inc();
        let debit = WalletCommand::Debit {
            entry: Entry::Withdrawal,
            order_id: order_id.clone(),
            amount,
            source: None,
        };
        // A refusal comes once the wallet state it rests on is durable.
        let (outcome, debited) = match self.wallets.execute_chained(uid.as_str(), debit).await {
            Ok((_, debited)) => (WithdrawalCommand::RecordDebit, Some(debited)),
            Err(ExecError::Rejected(WalletError::InsufficientBalance { .. })) => (
                WithdrawalCommand::RecordDebitRefused {
                    reason: "insufficient_balance".into(),
                },
                None,
            ),
            Err(ExecError::Rejected(e)) => (
                WithdrawalCommand::RecordDebitRefused {
                    reason: e.to_string(),
                },
                None,
            ),
            // Unknown: the order stays pending_debit; a retry (or the sweeper) resumes it.
            Err(e) => {
                requested.await?;
                return Err(e.unknown());
            }
        };
        let recorded = self
            .orders
            .execute_chained(order_id.as_str(), outcome)
            .await;
        requested.await?;
        if let Some(debited) = debited {
            debited.await.map_err(ExecError::unknown)?;
        }
        let (order, recorded) = recorded?;
        recorded.await?;
        Ok(order)
    }

    /// Records a payout outcome for the attempt in progress.
    async fn record(
        &self,
        order_id: &Id,
        attempt: u32,
        result: PayoutResult,
    ) -> Result<WithdrawalOrder, Transient> {
        let command = WithdrawalCommand::RecordPayout {
            attempt,
            result,
            max_attempts: self.config.max_attempts,
        };
        let order = self
            .orders
            .execute(order_id.as_str(), command)
            .await
            .map_err(transient)?;
        if order.parked && order.state == Some(OrderState::Failed) && !order.refunded {
            let channel = order
                .request
                .as_ref()
                .map(|r| r.method.channel.as_str())
                .unwrap_or("?");
            self.metrics
                .payouts_parked_total
                .with_label_values(&[channel])
                .inc();
            tracing::warn!(order_id = %order_id, attempts = order.attempts, reason = ?order.failure, "payout parked (dead letter); refunding");
        }
        Ok(order)
    }

    /// Asks the channel about an order, within the call timeout; no answer is transient (the
    /// order stays as it is, and is looked at again).
    async fn query(&self, channel: Channel, order_id: &Id) -> Result<QueryOutcome, Transient> {
        tokio::time::timeout(
            self.config.channel_call_timeout,
            self.channel.query(channel, order_id),
        )
        .await
        .map_err(|_| {
            Transient(format!(
                "the {channel} channel did not answer a query in time"
            ))
        })
    }

    /// Pays the attempt in progress and resolves the answer into a definite result (or a
    /// transient error when even the query that resolves a timeout went unanswered: the order
    /// stays paying and is resumed by query later).
    async fn pay(&self, order_id: &Id, order: &WithdrawalOrder) -> Result<PayoutResult, Transient> {
        let request = order
            .request
            .as_ref()
            .expect("a paying order has a request");
        let channel = request.method.channel;
        // Bounded: an unanswered call is dropped (nothing of it runs on) and is a timeout.
        let outcome = tokio::time::timeout(
            self.config.channel_call_timeout,
            self.channel
                .pay(channel, order_id, request.amount, &request.method.account),
        )
        .await
        .unwrap_or(PayOutcome::Timeout);
        let label = match &outcome {
            PayOutcome::Succeeded => "succeeded",
            PayOutcome::Failed(_) => "failed",
            PayOutcome::Throttled => "throttled",
            PayOutcome::Timeout => "timeout",
        };
        self.metrics
            .payout_attempts_total
            .with_label_values(&[channel.as_str(), label])
            .inc();
        Ok(match outcome {
            PayOutcome::Succeeded => PayoutResult::Succeeded,
            PayOutcome::Failed(reason) => PayoutResult::Failed { reason },
            PayOutcome::Throttled => PayoutResult::Failed {
                reason: "throttled by the channel".into(),
            },
            // Unknown outcome: ask, never guess. No record means the channel did not pay; the
            // next attempt sends the same order id again.
            PayOutcome::Timeout => match self.query(channel, order_id).await? {
                QueryOutcome::Succeeded { .. } => PayoutResult::Succeeded,
                QueryOutcome::Failed(reason) => PayoutResult::Failed {
                    reason: format!("timeout, then {reason}"),
                },
                QueryOutcome::NoRecord => PayoutResult::Failed {
                    reason: "timeout; the channel has no record".into(),
                },
            },
        })
    }

    fn lease(&self, order_id: &Id, driver: &'static str) -> Option<DriverLease<'_>> {
        self.drivers.acquire(order_id, driver)
    }

    /// Drives an order toward a final state as far as it can go now (a payout lane's step);
    /// [`Step::Busy`] if another driver holds it.
    pub async fn settle(&self, order_id: &Id) -> Result<Step, Transient> {
        let Some(lease) = self.lease(order_id, "payout_lane") else {
            return Ok(Step::Busy);
        };
        self.settle_leased(order_id, &lease).await
    }

    async fn settle_leased(
        &self,
        order_id: &Id,
        // Held for the whole step: proof that this driver, and no other, drives the order.
        _lease: &DriverLease<'_>,
    ) -> Result<Step, Transient> {
        loop {
            let Some(order) = self.order(order_id).await? else {
                return Ok(Step::Done);
            };
            match order.state {
                Some(OrderState::PendingDebit) => return Ok(Step::Waiting),
                Some(OrderState::PendingPayout) => {
                    if order.attempts > 0 {
                        let failed_at = order.history.last().map(|(_, at)| *at).unwrap_or(0);
                        let due =
                            failed_at + self.config.backoff(order.attempts).as_millis() as i64;
                        if self.clock.now_ms() < due {
                            return Ok(Step::RetryAt(due));
                        }
                    }
                    let started = self
                        .orders
                        .execute(order_id.as_str(), WithdrawalCommand::StartPayout)
                        .await
                        .map_err(transient)?;
                    let result = self.pay(order_id, &started).await?;
                    self.record(order_id, started.attempts, result).await?;
                }
                Some(OrderState::Paying) => {
                    // An attempt whose outcome was never recorded (a crash, or a stop): ask the
                    // channel; with no record, send it again under the same order id.
                    let request = order.request.as_ref().expect("requested");
                    let result = match self.query(request.method.channel, order_id).await? {
                        QueryOutcome::Succeeded { .. } => PayoutResult::Succeeded,
                        QueryOutcome::Failed(reason) => PayoutResult::Failed { reason },
                        QueryOutcome::NoRecord => self.pay(order_id, &order).await?,
                    };
                    self.record(order_id, order.attempts, result).await?;
                }
                Some(OrderState::Failed) if order.debited && !order.refunded => {
                    let request = order.request.as_ref().expect("requested");
                    let refund = WalletCommand::Refund {
                        entry: Entry::WithdrawalRefund,
                        order_id: order_id.clone(),
                    };
                    match self.wallets.execute(request.uid.as_str(), refund).await {
                        Ok(_) => {}
                        Err(ExecError::Rejected(e)) => {
                            return Err(Transient(format!("refund refused: {e}")))
                        }
                        Err(e) => return Err(transient(e)),
                    }
                    self.orders
                        .execute(order_id.as_str(), WithdrawalCommand::RecordRefund)
                        .await
                        .map_err(transient)?;
                }
                _ => return Ok(Step::Done),
            }
        }
    }

    /// Applies W9's rule to one old order; `None` if none applies, or if another driver (a
    /// payout lane) holds the order now: the next sweep looks again.
    pub async fn compensate(&self, order_id: &Id) -> Result<Option<Compensation>, Transient> {
        let Some(lease) = self.lease(order_id, "sweeper") else {
            tracing::debug!(order_id = %order_id, "a payout lane is driving the order; the next sweep looks again");
            return Ok(None);
        };
        let Some(order) = self.order(order_id).await? else {
            return Ok(None);
        };
        let age = self.config.compensation_age.as_millis() as i64;
        let Some(action) = compensation(&order, self.clock.now_ms(), age) else {
            return Ok(None);
        };
        let label = match action {
            Compensation::AbandonDebit => "abandon_debit",
            Compensation::Pay => "pay",
            Compensation::QueryChannel => "query_channel",
            Compensation::Refund => "refund",
        };
        tracing::warn!(order_id = %order_id, action = label, state = ?order.state, "compensating a stuck withdrawal");
        self.metrics
            .compensations_total
            .with_label_values(&[label])
            .inc();
        if action == Compensation::AbandonDebit {
            // Did the debit happen? The wallet answers, and bars it if not: a debit the request
            // flow still has on its way is refused from now on, so the order can fail without
            // money leaving for it behind its back (the same bar as a red packet's expiry).
            let uid = &order.request.as_ref().expect("requested").uid;
            let bar = WalletCommand::BarDebit {
                entry: Entry::Withdrawal,
                order_id: order_id.clone(),
                source: None,
            };
            let answer = self
                .wallets
                .execute(uid.as_str(), bar)
                .await
                .map_err(transient)?;
            let debited = !answer.barred;
            self.orders
                .execute(order_id.as_str(), WithdrawalCommand::Abandon { debited })
                .await
                .map_err(transient)?;
        }
        self.settle_leased(order_id, &lease).await?;
        Ok(Some(action))
    }
}

/// The payout lanes, the sweeper and the reconciler, on one arbiter.
pub struct WithdrawalFlows {
    flows: FlowGroup,
}

impl WithdrawalFlows {
    /// Starts the flows. `views` is the withdrawals view tree the sweeper scans. Must be called
    /// within an actix system.
    pub fn start(
        withdrawals: Arc<Withdrawals>,
        db: &sled::Db,
        views: sled::Tree,
    ) -> Result<WithdrawalFlows, StoreError> {
        let store = withdrawals.orders.runtime().store.clone();
        let tree = db
            .open_tree(CHECKPOINT_TREE)
            .map_err(|e| StoreError::Io(e.to_string()))?;
        let mut flows = FlowGroup::start();
        let lanes = PayoutLanes::new(withdrawals.clone(), tree.clone())?;
        let lane_store = store.clone();
        flows.spawn(|stop| lanes.run(lane_store, stop));
        let sweeper = withdrawals.clone();
        flows.spawn(|stop| sweep(sweeper, views, stop));
        let reconciler = Reconciler::new(withdrawals, tree)?;
        flows.spawn(|stop| reconciler.run(store, stop));
        Ok(WithdrawalFlows { flows })
    }

    /// Stops every flow (payouts in flight finish, bounded) and saves checkpoints.
    pub async fn stop(&self) {
        self.flows.stop().await;
    }
}

/// The order ids that a log event asks the payout lanes to look at.
fn lane_trigger(envelope: &Envelope) -> Option<Id> {
    let Event::Withdrawal(event) = &envelope.event else {
        return None;
    };
    let wanted = match event {
        WithdrawalEvent::Debited { .. }
        | WithdrawalEvent::PayoutStarted { .. }
        | WithdrawalEvent::PayoutAttemptFailed { .. }
        | WithdrawalEvent::PayoutParked { .. } => true,
        WithdrawalEvent::DebitAbandoned { debited, .. } => *debited,
        _ => false,
    };
    wanted
        .then(|| {
            envelope
                .stream
                .strip_prefix("withdrawal:")
                .and_then(|id| Id::parse(id).ok())
        })
        .flatten()
}

struct PayoutLanes {
    withdrawals: Arc<Withdrawals>,
    tree: sled::Tree,
    limiters: BTreeMap<Channel, Arc<dyn super::Pacer>>,
    /// Orders ready to go, per channel (the channel learnt from the order's request).
    ready: BTreeMap<Channel, std::collections::VecDeque<Id>>,
    /// Orders to look at again later: (due time, order).
    delayed: BinaryHeap<std::cmp::Reverse<(Millis, Id)>>,
    /// Orders queued, delayed or in flight, with the log sequences that asked for them.
    tracked: HashMap<Id, Vec<u64>>,
    in_flight: HashSet<Id>,
    /// Log sequences of trigger events whose order is not settled yet: the checkpoint stays
    /// below the first of them, so a restart sees them again.
    outstanding: BTreeSet<u64>,
    channels: HashMap<Id, Channel>,
    read_to: u64,
    saved: u64,
}

type Running = FuturesUnordered<BoxFuture<'static, (Id, Result<Step, Transient>)>>;

impl PayoutLanes {
    fn new(withdrawals: Arc<Withdrawals>, tree: sled::Tree) -> Result<PayoutLanes, StoreError> {
        let checkpoint = load_checkpoint(&tree, LANES_FLOW)?;
        let runtime = withdrawals.orders.runtime().clone();
        let limiters = withdrawals
            .config
            .rate_per_s
            .iter()
            .filter_map(|(channel, rate)| {
                super::pacer(&runtime, &format!("payout.{}", channel.as_str()), *rate)
                    .map(|pacer| (*channel, pacer))
            })
            .collect();
        Ok(PayoutLanes {
            withdrawals,
            tree,
            limiters,
            ready: BTreeMap::new(),
            delayed: BinaryHeap::new(),
            tracked: HashMap::new(),
            in_flight: HashSet::new(),
            outstanding: BTreeSet::new(),
            channels: HashMap::new(),
            read_to: checkpoint,
            saved: checkpoint,
        })
    }

    fn checkpoint(&self) -> u64 {
        self.outstanding
            .first()
            .map(|s| s - 1)
            .unwrap_or(self.read_to)
    }

    fn enqueue(&mut self, events: &[Arc<Envelope>]) {
        for envelope in events {
            self.read_to = envelope.seq;
            let stream_order = || {
                envelope
                    .stream
                    .strip_prefix("withdrawal:")
                    .and_then(|id| Id::parse(id).ok())
            };
            match &envelope.event {
                Event::Withdrawal(WithdrawalEvent::Requested { request, .. }) => {
                    if let Some(id) = stream_order() {
                        self.channels.insert(id, request.method.channel);
                    }
                }
                Event::Withdrawal(WithdrawalEvent::DebitRefused { .. }) => {
                    if let Some(id) = stream_order() {
                        self.channels.remove(&id);
                    }
                }
                _ => {}
            }
            let Some(order_id) = lane_trigger(envelope) else {
                continue;
            };
            self.outstanding.insert(envelope.seq);
            let seqs = self.tracked.entry(order_id.clone()).or_default();
            seqs.push(envelope.seq);
            if seqs.len() == 1 && !self.in_flight.contains(&order_id) {
                self.make_ready(order_id);
            }
        }
    }

    fn make_ready(&mut self, order_id: Id) {
        // An order whose request came before the checkpoint: the bank lane is as good a guess
        // as any for pacing; the order itself says where the money goes.
        let channel = self
            .channels
            .get(&order_id)
            .copied()
            .unwrap_or(Channel::Bank);
        self.ready.entry(channel).or_default().push_back(order_id);
    }

    fn dispatch(&mut self, running: &mut Running) -> Option<Duration> {
        let now = self.withdrawals.clock.now_ms();
        while let Some(std::cmp::Reverse((due, _))) = self.delayed.peek() {
            if *due > now {
                break;
            }
            let std::cmp::Reverse((_, order_id)) = self.delayed.pop().expect("peeked");
            self.make_ready(order_id);
        }
        let mut wait: Option<Duration> = self
            .delayed
            .peek()
            .map(|std::cmp::Reverse((due, _))| Duration::from_millis((due - now).max(1) as u64));
        let in_flight_max = self.withdrawals.config.in_flight_max;
        for (channel, queue) in self.ready.iter_mut() {
            while self.in_flight.len() < in_flight_max {
                let Some(order_id) = queue.front().cloned() else {
                    break;
                };
                if let Some(limiter) = self.limiters.get(channel) {
                    if let Err(ready_in) = limiter.check() {
                        wait = Some(wait.map_or(ready_in, |w| w.min(ready_in)));
                        break;
                    }
                }
                queue.pop_front();
                self.in_flight.insert(order_id.clone());
                let withdrawals = self.withdrawals.clone();
                running.push(Box::pin(async move {
                    let step = withdrawals.settle(&order_id).await;
                    (order_id, step)
                }));
            }
        }
        for channel in Channel::ALL {
            let backlog = self.ready.get(&channel).map(|q| q.len()).unwrap_or(0);
            self.withdrawals
                .metrics
                .payout_lane_backlog
                .with_label_values(&[channel.as_str()])
                .set(backlog as i64);
        }
        wait
    }

    fn complete(&mut self, order_id: Id, step: Result<Step, Transient>) {
        self.in_flight.remove(&order_id);
        match step {
            Ok(Step::Done) | Ok(Step::Waiting) => {
                for seq in self.tracked.remove(&order_id).unwrap_or_default() {
                    self.outstanding.remove(&seq);
                }
                self.channels.remove(&order_id);
            }
            Ok(Step::RetryAt(due)) => self.delayed.push(std::cmp::Reverse((due, order_id))),
            Ok(Step::Busy) => {
                // The sweeper holds it; look again shortly (it may leave a retry due).
                let due = self.withdrawals.clock.now_ms() + TRANSIENT_RETRY.as_millis() as i64;
                self.delayed.push(std::cmp::Reverse((due, order_id)));
            }
            Err(e) => {
                crate::warn_limited!(order_id = %order_id, error = %e, "payout step failed; retrying");
                let due = self.withdrawals.clock.now_ms() + TRANSIENT_RETRY.as_millis() as i64;
                self.delayed.push(std::cmp::Reverse((due, order_id)));
            }
        }
    }

    fn save(&mut self) {
        let checkpoint = self.checkpoint();
        if checkpoint != self.saved && save_checkpoint(&self.tree, LANES_FLOW, checkpoint).is_ok() {
            self.saved = checkpoint;
        }
    }

    async fn run(mut self, store: Arc<dyn EventStore>, mut stop: watch::Receiver<bool>) {
        let mut subscription = Subscription::new(store, self.read_to + 1, 4096);
        let mut running: Running = FuturesUnordered::new();
        let mut tick = tokio::time::interval(self.withdrawals.config.checkpoint_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wait = self.dispatch(&mut running);
            let room = self.tracked.len() < 100_000;
            tokio::select! {
                biased;
                changed = stop.changed() => if changed.is_err() || *stop.borrow() { break },
                Some((order_id, step)) = running.next(), if !running.is_empty() => self.complete(order_id, step),
                events = subscription.next(), if room => match events {
                    Ok(events) => self.enqueue(&events),
                    Err(e) => {
                        tracing::error!(error = %e, "payout lanes cannot read the log; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                },
                _ = tokio::time::sleep(wait.unwrap_or(Duration::MAX)), if wait.is_some() => {}
                _ = tick.tick() => self.save(),
            }
        }
        let drained = tokio::time::timeout(STOP_DRAIN_MAX, async {
            while let Some((order_id, step)) = running.next().await {
                self.complete(order_id, step);
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                "payout lanes stopped with payouts in flight; the next start resumes them"
            );
        }
        self.save();
    }
}

/// The compensation sweeper: every `sweep_interval`, the open orders older than the age.
async fn sweep(withdrawals: Arc<Withdrawals>, views: sled::Tree, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(withdrawals.config.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = stop.changed() => if changed.is_err() || *stop.borrow() { return },
            _ = tick.tick() => {}
        }
        let cutoff =
            withdrawals.clock.now_ms() - withdrawals.config.compensation_age.as_millis() as i64;
        let stuck = match view::open_before(&views, cutoff, SWEEP_ORDERS_MAX) {
            Ok(stuck) => stuck,
            Err(e) => {
                tracing::error!(error = %e, "sweeper cannot read the open orders");
                continue;
            }
        };
        for order_id in stuck {
            if *stop.borrow() {
                return;
            }
            if let Err(e) = withdrawals.compensate(&order_id).await {
                crate::warn_limited!(order_id = %order_id, error = %e, "compensation step failed; next sweep retries");
            }
        }
    }
}

/// What the reconciler has seen of one order: the order as its events make it, and the
/// wallet's movements for it (counts and sums in fen).
#[derive(Default)]
struct Ledgered {
    first_seq: u64,
    order: WithdrawalOrder,
    debits: u32,
    refunds: u32,
    debited: u128,
    refunded: u128,
}

/// A disagreement: the check (`debit`, `refund`, `channel`) and what was seen.
type Finding = (&'static str, String);

impl Ledgered {
    /// The order against the wallet's movements, right after `event` (pure). The wallet moves
    /// first in every flow (debit, then `Debited`; refund, then `Refunded`), so at each order
    /// event the wallet's side is already in the log.
    fn wallet_findings(&self, event: &WithdrawalEvent) -> Vec<Finding> {
        let mut findings = Vec::new();
        let Some(request) = self.order.request.as_ref() else {
            return findings;
        };
        let amount = request.amount.as_u64() as u128;
        let state = self.order.state.map(|s| s.as_str()).unwrap_or("?");
        let (debits, debited, refunds, refunded) =
            (self.debits, self.debited, self.refunds, self.refunded);
        let one_debit = |findings: &mut Vec<Finding>| {
            if debits != 1 || debited != amount {
                findings.push((
                    "debit",
                    format!("{state} order of {amount} fen with {debits} debits of {debited} fen in all"),
                ));
            }
        };
        let no_debit = |findings: &mut Vec<Finding>| {
            if debits != 0 {
                findings.push((
                    "debit",
                    format!("{state} order not debited, but the wallet shows {debits} debits of {debited} fen"),
                ));
            }
        };
        let no_refund = |findings: &mut Vec<Finding>| {
            if refunds != 0 {
                findings.push((
                    "refund",
                    format!("{state} order not refunded, but the wallet shows {refunds} refunds of {refunded} fen"),
                ));
            }
        };
        match event {
            WithdrawalEvent::Requested { .. }
            | WithdrawalEvent::DebitRefused { .. }
            | WithdrawalEvent::DebitAbandoned { debited: false, .. } => {
                no_debit(&mut findings);
                no_refund(&mut findings);
            }
            WithdrawalEvent::Debited { .. }
            | WithdrawalEvent::DebitAbandoned { debited: true, .. }
            | WithdrawalEvent::PayoutStarted { .. }
            | WithdrawalEvent::PayoutAttemptFailed { .. }
            | WithdrawalEvent::PayoutSucceeded { .. }
            | WithdrawalEvent::PayoutParked { .. } => {
                one_debit(&mut findings);
                no_refund(&mut findings);
            }
            WithdrawalEvent::Refunded { .. } => {
                one_debit(&mut findings);
                if refunds != 1 || refunded != debited {
                    findings.push((
                        "refund",
                        format!("refunded order debited {debited} fen with {refunds} refunds of {refunded} fen in all"),
                    ));
                }
            }
        }
        findings
    }
}

/// Whether the channel's record must be read after this event, and whether it must then show
/// the order paid: at a success (paid, the order's amount) and wherever the order failed (not
/// paid: no line, or a refusal).
fn channel_expectation(event: &WithdrawalEvent) -> Option<bool> {
    match event {
        WithdrawalEvent::PayoutSucceeded { .. } => Some(true),
        WithdrawalEvent::DebitRefused { .. }
        | WithdrawalEvent::DebitAbandoned { .. }
        | WithdrawalEvent::PayoutParked { .. }
        | WithdrawalEvent::Refunded { .. } => Some(false),
        _ => None,
    }
}

/// The near-real-time reconciler (W11): every state change of every order is checked against
/// the wallet's movements for it (amounts, not only counts) and, where the order succeeded or
/// failed, against the channel's own record (paid, and how much). A statement line with no
/// order at all is the daily audit's to find (`hongbao audit`, `channel_statements`): the
/// reconciler follows the log, and such a line has no event.
struct Reconciler {
    withdrawals: Arc<Withdrawals>,
    /// Whether this log holds the wallets' movements for its orders: on one node it does; on
    /// a cluster partition an order's wallet is in another partition's log, so the reconciler
    /// checks the order against the channel only, and the debits and refunds are the cluster
    /// audit's to match (it reads every partition).
    wallets_in_log: bool,
    tree: sled::Tree,
    open: HashMap<Id, Ledgered>,
    /// Orders seen final lately (at most [`RECENT_FINAL_MAX`], oldest forgotten first): a
    /// wallet movement for one of them is an extra one, reported as it arrives.
    recent_final: std::collections::VecDeque<Id>,
    recent_final_set: HashSet<Id>,
    read_to: u64,
}

/// Final orders the reconciler remembers, for catching movements after the end.
const RECENT_FINAL_MAX: usize = 100_000;

impl Reconciler {
    fn new(withdrawals: Arc<Withdrawals>, tree: sled::Tree) -> Result<Reconciler, StoreError> {
        let read_to = load_checkpoint(&tree, RECONCILER_FLOW)?;
        let wallets_in_log = withdrawals.orders.runtime().placement.is_none();
        Ok(Reconciler {
            withdrawals,
            wallets_in_log,
            tree,
            open: HashMap::new(),
            recent_final: Default::default(),
            recent_final_set: HashSet::new(),
            read_to,
        })
    }

    fn remember_final(&mut self, order_id: Id) {
        if self.recent_final.len() == RECENT_FINAL_MAX {
            if let Some(oldest) = self.recent_final.pop_front() {
                self.recent_final_set.remove(&oldest);
            }
        }
        if self.recent_final_set.insert(order_id.clone()) {
            self.recent_final.push_back(order_id);
        }
    }

    /// Every order still open started after this.
    fn checkpoint(&self) -> u64 {
        self.open
            .values()
            .map(|o| o.first_seq - 1)
            .min()
            .unwrap_or(self.read_to)
    }

    fn mismatch(&self, check: &str, order_id: &Id, detail: String) {
        self.withdrawals
            .metrics
            .reconciliation_mismatches_total
            .with_label_values(&[check])
            .inc();
        tracing::error!(check, order_id = %order_id, detail, "reconciliation mismatch");
    }

    async fn observe(&mut self, envelope: &Envelope) {
        match &envelope.event {
            Event::Withdrawal(event) => self.order_event(envelope, event).await,
            // Another partition's orders (if any): tracking them here would hold the
            // checkpoint back for ever, their order events never coming.
            Event::Wallet(_) if !self.wallets_in_log => {}
            Event::Wallet(wallet_event) => {
                let Some(line) = wallet_event.line() else {
                    return;
                };
                let debit = match (wallet_event, line.entry) {
                    (WalletEvent::Debited(_), Entry::Withdrawal) => true,
                    (WalletEvent::Credited(_), Entry::WithdrawalRefund) => false,
                    _ => return,
                };
                let amount = line.amount.as_u64() as u128;
                if self.recent_final_set.contains(&line.order_id) {
                    // The order is over: nothing may move for it any more. Not tracked, so it
                    // does not hold the checkpoint back.
                    let (check, what) = if debit {
                        ("debit", "debit")
                    } else {
                        ("refund", "refund")
                    };
                    self.mismatch(
                        check,
                        &line.order_id,
                        format!("a {what} of {amount} fen after the order was final"),
                    );
                    return;
                }
                let entry = self
                    .open
                    .entry(line.order_id.clone())
                    .or_insert_with(|| Ledgered {
                        first_seq: envelope.seq,
                        ..Default::default()
                    });
                let finding = if debit {
                    entry.debits += 1;
                    entry.debited += amount;
                    (entry.debits > 1).then(|| {
                        let detail = format!("debit number {} ({amount} fen)", entry.debits);
                        ("debit", detail)
                    })
                } else {
                    entry.refunds += 1;
                    entry.refunded += amount;
                    (entry.refunds > 1).then(|| {
                        let detail = format!("refund number {} ({amount} fen)", entry.refunds);
                        ("refund", detail)
                    })
                };
                // A second movement is wrong whatever the order says next: report it now.
                if let Some((check, detail)) = finding {
                    self.mismatch(check, &line.order_id, detail);
                }
            }
            _ => {}
        }
    }

    async fn order_event(&mut self, envelope: &Envelope, event: &WithdrawalEvent) {
        let Some(order_id) = envelope
            .stream
            .strip_prefix("withdrawal:")
            .and_then(|id| Id::parse(id).ok())
        else {
            return;
        };
        let entry = self
            .open
            .entry(order_id.clone())
            .or_insert_with(|| Ledgered {
                first_seq: envelope.seq,
                ..Default::default()
            });
        <WithdrawalOrder as crate::domain::Aggregate>::evolve(&mut entry.order, event);
        let finished = entry.order.is_final();
        // An order first seen after its request (it began before a restart's checkpoint and
        // was already final then) cannot be judged from part of its history.
        let Some(request) = entry.order.request.clone() else {
            if finished {
                self.open.remove(&order_id);
            }
            return;
        };
        let state = entry.order.state.map(|s| s.as_str()).unwrap_or("?");
        let mut findings = if self.wallets_in_log {
            entry.wallet_findings(event)
        } else {
            Vec::new()
        };
        if let Some(paid_expected) = channel_expectation(event) {
            let record = self
                .withdrawals
                .channel
                .query(request.method.channel, &order_id)
                .await;
            let channel = request.method.channel;
            match (record, paid_expected) {
                (QueryOutcome::Succeeded { amount }, true) if amount != request.amount => findings
                    .push((
                        "channel",
                        format!(
                            "{state} order of {} fen, {channel} paid {amount} fen",
                            request.amount
                        ),
                    )),
                (QueryOutcome::Succeeded { .. }, true) => {}
                (other, true) => findings.push((
                    "channel",
                    format!("{state} order, {channel} record: {other:?}"),
                )),
                (QueryOutcome::Succeeded { amount }, false) => findings.push((
                    "channel",
                    format!("{state} order, but {channel} paid {amount} fen"),
                )),
                (_, false) => {}
            }
        }
        self.withdrawals.metrics.reconciliation_checks_total.inc();
        for (check, detail) in findings {
            self.mismatch(check, &order_id, detail);
        }
        if finished {
            self.open.remove(&order_id);
            self.withdrawals
                .metrics
                .withdrawals_total
                .with_label_values(&[state])
                .inc();
            self.remember_final(order_id);
        }
    }

    async fn run(mut self, store: Arc<dyn EventStore>, mut stop: watch::Receiver<bool>) {
        let mut subscription = Subscription::new(store, self.read_to + 1, 4096);
        let mut tick = tokio::time::interval(self.withdrawals.config.checkpoint_interval);
        let mut saved = self.read_to;
        loop {
            tokio::select! {
                biased;
                changed = stop.changed() => if changed.is_err() || *stop.borrow() { break },
                events = subscription.next() => match events {
                    Ok(events) => {
                        for envelope in &events {
                            self.read_to = envelope.seq;
                            self.observe(envelope).await;
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "reconciler cannot read the log; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                },
                _ = tick.tick() => {
                    let checkpoint = self.checkpoint();
                    if checkpoint != saved && save_checkpoint(&self.tree, RECONCILER_FLOW, checkpoint).is_ok() {
                        saved = checkpoint;
                    }
                }
            }
        }
        let _ = save_checkpoint(&self.tree, RECONCILER_FLOW, self.checkpoint());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Id {
        Id::parse(s).unwrap()
    }

    #[test]
    fn one_driver_per_order_until_it_finishes() {
        // Goal: a second driver is refused while the first holds the order, however long it
        // holds it (no lapse: its call could still pay); dropping the lease frees the order,
        // and a stale guard's drop never frees another driver's lease.
        let drivers = Drivers::default();
        let (order, other) = (id("o1"), id("o2"));
        let lane = drivers.acquire(&order, "payout_lane").unwrap();
        assert!(drivers.acquire(&order, "sweeper").is_none());
        assert!(drivers.acquire(&other, "sweeper").is_some());
        drop(lane);
        let sweeper = drivers.acquire(&order, "sweeper").unwrap();
        assert!(drivers.acquire(&order, "payout_lane").is_none());
        drop(sweeper);
        let lane = drivers.acquire(&order, "payout_lane").unwrap();
        assert!(drivers.acquire(&order, "sweeper").is_none());
        drop(lane);
        assert!(drivers.leases.is_empty());
    }
}
