//! Red packet flows (P1, P2, P4, P6): paying a packet into escrow, moving claimed shares to the
//! claimers, and expiring packets with their remainder refunded once.
//!
//! - [`Packets::pay_c2c`] debits the sender's change into escrow (`PacketPayment`, order = the
//!   packet id) and marks the packet paid; [`Packets::create_b2c`] creates the packet, credits
//!   the presented subsidy (idempotent with the reward lanes), debits it into escrow
//!   (`PacketSubsidy`, order = the subsidy's order id, so one subsidy pays one packet) and
//!   marks it paid. The packet exists before money moves, so no crash leaves escrow without a
//!   packet.
//! - One task follows the log from its checkpoint. Each claim (a `ShareClaimed`, or each of a
//!   merged `SharesClaimed`) becomes a wallet credit to
//!   the claimer (C2C: `change`; B2C: `activity`), idempotent by `(entry, packet id)`. Every
//!   `expiry_check` it reads the packets view's index of live packets by deadline; those past
//!   their deadline are expired, their remainder refunded (C2C: the sender's change; B2C: the
//!   campaign budget the subsidy came from) and marked refunded. A packet left
//!   unpaid by a crash is first checked against the sender's wallet: if the payment did reach
//!   escrow it is marked paid, then expired and refunded in full.
//! - A transfer not done within `stuck_after` raises `hongbao_packets_stuck{work}` and a log
//!   line; so does a refund.

use super::{load_checkpoint, save_checkpoint, FlowGroup, CHECKPOINT_TREE};
use crate::actors::{ExecError, Registry};
use crate::clock::{Clock, Millis};
use crate::domain::activity::{
    intake_shard_of, shard_entity, Activity, ActivityCommand, RewardClaim, RewardKind,
};
use crate::domain::packet::{
    Mode, Packet, PacketCommand, PacketError, PacketEvent, PacketReply, PacketSpec, PacketState,
};
use crate::domain::wallet::{Entry, Wallet, WalletCommand, WalletError};
use crate::domain::Event;
use crate::events::{Envelope, EventStore, StoreError, Subscription};
use crate::ids::Id;
use crate::metrics::Metrics;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The name of the transfer task's checkpoint.
pub const FLOW: &str = "packet-flows";
const TRANSFERS_IN_FLIGHT_MAX: usize = 512;
const STOP_DRAIN_MAX: Duration = Duration::from_secs(10);
const RETRY_DELAY_MS: Millis = 500;
/// How long a transfer waits at most while its packet is hot (then it goes, hot or not).
pub const HOT_DEFERRAL_MAX: Duration = Duration::from_secs(2);
/// Packets one expiry tick handles at most (the rest wait for the next tick).
const EXPIRIES_PER_TICK_MAX: usize = 1_000;

#[derive(Debug, Clone)]
pub struct PacketConfig {
    /// How often deadlines are checked: a packet expires within about this much of its deadline.
    pub expiry_check: Duration,
    /// A transfer or refund not done after this long is reported as stuck.
    pub stuck_after: Duration,
    pub checkpoint_interval: Duration,
    /// The activities' reward intake shards (1: none, the activity accepts its rewards
    /// itself). A B2C packet's unclaimed subsidy goes back to the shard that accepted it.
    pub reward_intake_shards: u32,
}

impl Default for PacketConfig {
    fn default() -> Self {
        PacketConfig {
            expiry_check: Duration::from_millis(250),
            stuck_after: Duration::from_secs(60),
            checkpoint_interval: Duration::from_millis(200),
            reward_intake_shards: 1,
        }
    }
}

/// Why paying or creating a packet did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketFlowError {
    #[error(transparent)]
    Packet(#[from] PacketError),
    #[error("insufficient {0} balance")]
    InsufficientBalance(String),
    #[error("this subsidy already paid another packet")]
    SubsidyUsed,
    #[error("the subsidy's order id was credited from another activity")]
    SubsidyConflict,
    #[error("this packet is not paid this way")]
    WrongMode,
    #[error("outcome unknown: {0}; retry with the same ids")]
    Unavailable(String),
    #[error("overloaded")]
    Overloaded,
}

impl<E: Into<PacketFlowError>> From<ExecError<E>> for PacketFlowError {
    fn from(e: ExecError<E>) -> PacketFlowError {
        match e {
            ExecError::Rejected(e) => e.into(),
            ExecError::Unavailable(why) => PacketFlowError::Unavailable(why),
            ExecError::Timeout => PacketFlowError::Unavailable("timed out".into()),
            ExecError::Overloaded => PacketFlowError::Overloaded,
        }
    }
}

impl From<WalletError> for PacketFlowError {
    fn from(e: WalletError) -> PacketFlowError {
        match e {
            WalletError::InsufficientBalance { account, .. } => {
                PacketFlowError::InsufficientBalance(account.as_str().into())
            }
            other => PacketFlowError::Unavailable(other.to_string()),
        }
    }
}

impl From<crate::domain::activity::ActivityError> for PacketFlowError {
    fn from(e: crate::domain::activity::ActivityError) -> PacketFlowError {
        PacketFlowError::Unavailable(e.to_string())
    }
}

/// The packet flows and what they act through.
pub struct Packets {
    pub packets: Arc<Registry<Packet>>,
    pub wallets: Arc<Registry<Wallet>>,
    pub activities: Arc<Registry<Activity>>,
    pub config: PacketConfig,
    claims: super::packet_claims::PacketClaims,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
}

/// How a paid packet's money reached escrow: the wallet entry and its order id.
fn payment_key(packet_id: &Id, spec: &PacketSpec) -> (Entry, Id) {
    match (&spec.mode, &spec.subsidy) {
        (Mode::B2c, Some(subsidy)) => (Entry::PacketSubsidy, subsidy.order_id.clone()),
        _ => (Entry::PacketPayment, packet_id.clone()),
    }
}

impl Packets {
    pub fn new(
        packets: Arc<Registry<Packet>>,
        wallets: Arc<Registry<Wallet>>,
        activities: Arc<Registry<Activity>>,
        config: PacketConfig,
    ) -> Arc<Packets> {
        let runtime = packets.runtime().clone();
        Arc::new(Packets {
            claims: super::packet_claims::PacketClaims::new(packets.clone()),
            packets,
            wallets,
            activities,
            config,
            clock: runtime.clock.clone(),
            metrics: runtime.metrics.clone(),
        })
    }

    pub async fn packet(&self, packet_id: &Id) -> Result<Option<Packet>, PacketFlowError> {
        let (packet, _) = self.packets.state(packet_id.as_str()).await?;
        Ok(packet.spec.is_some().then_some(packet))
    }

    /// Moves `amount` from the sender's account into escrow and marks the packet paid.
    async fn fund(
        &self,
        packet_id: &Id,
        spec: &PacketSpec,
    ) -> Result<PacketReply, PacketFlowError> {
        let (entry, order_id) = payment_key(packet_id, spec);
        let source = (entry == Entry::PacketSubsidy).then(|| packet_id.clone());
        let debit = WalletCommand::Debit {
            entry,
            order_id: order_id.clone(),
            amount: spec.total,
            source,
        };
        match self.wallets.execute(spec.sender_uid.as_str(), debit).await {
            Ok(_) => {}
            Err(ExecError::Rejected(WalletError::IdempotencyConflict { .. })) => {
                return Err(PacketFlowError::SubsidyUsed)
            }
            // The expiry flow gave up on this payment before the debit arrived: it can never
            // land, and the packet is (or is about to be) expired.
            Err(ExecError::Rejected(WalletError::DebitBarred { .. })) => {
                return Err(PacketError::Expired.into())
            }
            Err(e) => return Err(e.into()),
        }
        Ok(self
            .packets
            .execute(
                packet_id.as_str(),
                PacketCommand::MarkPaid {
                    payment_id: order_id,
                },
            )
            .await?)
    }

    /// Creates a C2C packet, waiting for payment.
    pub async fn create_c2c(
        &self,
        packet_id: &Id,
        spec: PacketSpec,
    ) -> Result<PacketReply, PacketFlowError> {
        Ok(self
            .packets
            .execute(packet_id.as_str(), PacketCommand::Create(spec))
            .await?)
    }

    /// Pays a C2C packet from the sender's change (P2). Nothing is half done: a refused debit
    /// leaves the packet waiting and the balance untouched.
    pub async fn pay_c2c(
        &self,
        packet_id: &Id,
        payment_id: &Id,
    ) -> Result<PacketReply, PacketFlowError> {
        let packet = self.packet(packet_id).await?.ok_or(PacketError::Unknown)?;
        let spec = packet.spec.as_ref().expect("created");
        if spec.mode != Mode::C2c {
            return Err(PacketFlowError::WrongMode);
        }
        // The packet's rule: no payment from the deadline on (refused before any money moves);
        // a packet paid before answers its state again.
        let accepted = self
            .packets
            .execute(packet_id.as_str(), PacketCommand::AcceptPayment)
            .await?;
        if !matches!(
            accepted,
            PacketReply::State {
                state: PacketState::PendingPayment,
                ..
            }
        ) {
            return Ok(accepted);
        }
        let _ = payment_id; // The escrow debit is keyed by the packet: one payment per packet.
        self.fund(packet_id, spec).await
    }

    /// Creates a B2C packet paid by a subsidy (P1): the subsidy is credited (idempotently with
    /// the reward lanes) and consumed exactly once; the packet is active at once.
    pub async fn create_b2c(
        &self,
        packet_id: &Id,
        spec: PacketSpec,
        subsidy: &RewardClaim,
    ) -> Result<PacketReply, PacketFlowError> {
        let created = self
            .packets
            .execute(packet_id.as_str(), PacketCommand::Create(spec.clone()))
            .await?;
        if !matches!(
            created,
            PacketReply::State {
                state: PacketState::PendingPayment,
                ..
            }
        ) {
            return Ok(created);
        }
        let credit = subsidy.credit_command().ok_or(PacketFlowError::WrongMode)?;
        match self.wallets.execute(spec.sender_uid.as_str(), credit).await {
            Ok(_) => {}
            Err(ExecError::Rejected(WalletError::IdempotencyConflict { .. })) => {
                return Err(PacketFlowError::SubsidyConflict)
            }
            Err(e) => return Err(e.into()),
        }
        self.fund(packet_id, &spec).await
    }

    pub async fn claim(
        &self,
        packet_id: &Id,
        uid: &Id,
    ) -> Result<PacketReply, ExecError<PacketError>> {
        self.claims.claim(packet_id, uid).await
    }

    /// Moves one claimed share from escrow to the claimer.
    async fn transfer(
        &self,
        packet_id: &Id,
        mode: Mode,
        uid: &Id,
        amount: crate::money::Fen,
    ) -> Result<(), PacketFlowError> {
        let entry = match mode {
            Mode::C2c => Entry::ClaimTransfer,
            Mode::B2c => Entry::ClaimTransferActivity,
        };
        let credit = WalletCommand::Credit {
            entry,
            order_id: packet_id.clone(),
            amount,
            source: None,
        };
        self.wallets.execute(uid.as_str(), credit).await?;
        Ok(())
    }

    /// Expires a packet past its deadline and refunds its remainder, once. `Ok(true)` when the
    /// packet needs nothing more.
    pub async fn expire(&self, packet_id: &Id) -> Result<bool, PacketFlowError> {
        let Some(mut packet) = self.packet(packet_id).await? else {
            return Ok(true);
        };
        let spec = packet.spec.clone().expect("created");
        if packet.refunded.is_some() || packet.state == Some(PacketState::Exhausted) {
            return Ok(true);
        }
        if packet.state == Some(PacketState::PendingPayment) {
            // The payment may have reached escrow without the packet being marked paid (a
            // crash, or a pay flow between its two steps), or still be on its way. Bar it in
            // the sender's wallet: the wallet answers the debit if it happened, and refuses it
            // forever if not, so no payment can land after this decision.
            let (entry, order_id) = payment_key(packet_id, &spec);
            let bar = WalletCommand::BarDebit {
                entry,
                order_id: order_id.clone(),
                source: (entry == Entry::PacketSubsidy).then(|| packet_id.clone()),
            };
            let answer = self.wallets.execute(spec.sender_uid.as_str(), bar).await?;
            if !answer.barred {
                self.packets
                    .execute(
                        packet_id.as_str(),
                        PacketCommand::MarkPaid {
                            payment_id: order_id,
                        },
                    )
                    .await?;
            }
        }
        let reply = self
            .packets
            .execute(packet_id.as_str(), PacketCommand::Expire)
            .await?;
        let PacketReply::State {
            state,
            remaining_amount,
            ..
        } = reply
        else {
            return Ok(false);
        };
        if state != PacketState::Expired {
            return Ok(state == PacketState::Exhausted);
        }
        packet = self.packet(packet_id).await?.expect("exists");
        let refund = if packet.payment_id.is_some() {
            remaining_amount
        } else {
            crate::money::Fen::ZERO
        };
        if !refund.is_zero() {
            match (&spec.mode, &spec.subsidy) {
                (Mode::B2c, Some(subsidy)) => {
                    let back = ActivityCommand::ReturnBudget {
                        order_id: packet_id.clone(),
                        kind: RewardKind::Subsidy,
                        amount: refund,
                    };
                    // Back where the subsidy was accepted: its intake shard when the
                    // activity's rewards are sharded (the activity itself accepted none of
                    // them, and a return there would be lost against nothing).
                    let shards = self.config.reward_intake_shards;
                    let entity = if shards > 1 {
                        shard_entity(
                            &subsidy.activity_id,
                            intake_shard_of(&subsidy.order_id, shards),
                        )
                    } else {
                        subsidy.activity_id.to_string()
                    };
                    self.activities.execute(&entity, back).await?;
                }
                _ => {
                    let credit = WalletCommand::Credit {
                        entry: Entry::PacketRefund,
                        order_id: packet_id.clone(),
                        amount: refund,
                        source: None,
                    };
                    self.wallets
                        .execute(spec.sender_uid.as_str(), credit)
                        .await?;
                }
            }
        }
        self.packets
            .execute(packet_id.as_str(), PacketCommand::MarkRefunded)
            .await?;
        self.metrics
            .packets_expired_total
            .with_label_values(&[if spec.mode == Mode::C2c { "c2c" } else { "b2c" }])
            .inc();
        Ok(true)
    }
}

/// Whether a transfer waits: only while its packet is hot, and not once it has waited
/// `HOT_DEFERRAL_MAX` since it was first held back (P6: every transfer is made).
fn hold_back(
    hot: bool,
    deferred_since: Option<std::time::Instant>,
    now: std::time::Instant,
) -> bool {
    hot && deferred_since.is_none_or(|since| now.duration_since(since) < HOT_DEFERRAL_MAX)
}

/// A claimed share waiting to be transferred.
#[derive(Debug, Clone)]
struct Transfer {
    /// The claim's place in the log: its event's sequence, and its place in that event (a
    /// merged `SharesClaimed` records several).
    at: (u64, u32),
    packet_id: Id,
    uid: Id,
    amount: crate::money::Fen,
    claimed_at_ms: Millis,
    /// When it was first held back because its packet was hot.
    deferred_since: Option<std::time::Instant>,
    /// Its packet could not be read yet (said once in the log).
    mode_unknown: bool,
}

/// Packets whose mode the task remembers before it forgets them all (re-read on demand).
const MODES_CACHED_MAX: usize = 100_000;

/// The transfer and expiry task.
pub struct PacketFlows {
    flows: FlowGroup,
}

impl PacketFlows {
    /// Starts the task on its own arbiter. Must be called within an actix system.
    pub fn start(
        packets: Arc<Packets>,
        db: &sled::Db,
        view: sled::Tree,
    ) -> Result<PacketFlows, StoreError> {
        let store = packets.packets.runtime().store.clone();
        let tree = db
            .open_tree(CHECKPOINT_TREE)
            .map_err(|e| StoreError::Io(e.to_string()))?;
        let checkpoint = load_checkpoint(&tree, FLOW)?;
        let task = FlowTask {
            packets,
            tree,
            read_to: checkpoint,
            saved: checkpoint,
            view,
            modes: HashMap::new(),
            retry_at: HashMap::new(),
            pending: BTreeMap::new(),
            waiting: std::collections::VecDeque::new(),
            deferred: Vec::new(),
            in_flight: 0,
        };
        let mut flows = FlowGroup::start();
        flows.spawn(|stop| task.run(store, stop));
        Ok(PacketFlows { flows })
    }

    /// Stops the task: transfers in flight finish (bounded), the checkpoint is saved.
    pub async fn stop(&self) {
        self.flows.stop().await;
    }
}

type Running = FuturesUnordered<BoxFuture<'static, (Transfer, Result<(), PacketFlowError>)>>;

struct FlowTask {
    packets: Arc<Packets>,
    tree: sled::Tree,
    read_to: u64,
    saved: u64,
    /// The packets view: live packets by deadline.
    view: sled::Tree,
    modes: HashMap<Id, Mode>,
    /// Packets whose expiry failed, and when to try again.
    retry_at: HashMap<Id, Millis>,
    /// Transfers not done yet, by their claim's place in the log.
    pending: BTreeMap<(u64, u32), Transfer>,
    waiting: std::collections::VecDeque<Transfer>,
    /// Transfers held back while their packet is hot, back in `waiting` at the next tick.
    deferred: Vec<Transfer>,
    in_flight: usize,
}

impl FlowTask {
    /// Everything at or below the checkpoint is handled: no transfer pending. (Expiry needs no
    /// checkpoint: it reads the live packets from the view.)
    fn checkpoint(&self) -> u64 {
        self.pending
            .keys()
            .next()
            .map(|(s, _)| s - 1)
            .unwrap_or(self.read_to)
    }

    /// The packet's mode, read from the packet when it is not remembered (a claim read after a
    /// restart from a checkpoint past the packet's creation). `Ok(None)`: the log has no such
    /// packet.
    async fn mode_of(&mut self, packet_id: &Id) -> Result<Option<Mode>, PacketFlowError> {
        if let Some(mode) = self.modes.get(packet_id) {
            return Ok(Some(*mode));
        }
        let mode = self
            .packets
            .packet(packet_id)
            .await?
            .and_then(|p| p.spec.map(|s| s.mode));
        if let Some(mode) = mode {
            self.remember(packet_id.clone(), mode);
        }
        Ok(mode)
    }

    fn remember(&mut self, packet_id: Id, mode: Mode) {
        if self.modes.len() >= MODES_CACHED_MAX {
            self.modes.clear();
        }
        self.modes.insert(packet_id, mode);
    }

    fn observe(&mut self, envelope: &Envelope) {
        self.read_to = envelope.seq;
        let Event::Packet(event) = &envelope.event else {
            return;
        };
        let Some(packet_id) = envelope
            .stream
            .strip_prefix("packet:")
            .and_then(|id| Id::parse(id).ok())
        else {
            return;
        };
        match event {
            PacketEvent::Created { spec, .. } => self.remember(packet_id, spec.mode),
            PacketEvent::ShareClaimed {
                uid, amount, at_ms, ..
            } => self.claimed(envelope.seq, 0, &packet_id, uid, *amount, *at_ms),
            PacketEvent::SharesClaimed { claims } => {
                for (n, claim) in claims.iter().enumerate() {
                    let (uid, amount, at) = (&claim.uid, claim.amount, claim.at_ms);
                    self.claimed(envelope.seq, n as u32, &packet_id, uid, amount, at);
                }
            }
            PacketEvent::Paid { .. }
            | PacketEvent::Expired { .. }
            | PacketEvent::Refunded { .. } => {}
        }
    }

    /// A claim to transfer: the `n`th of the event at `seq`.
    fn claimed(
        &mut self,
        seq: u64,
        n: u32,
        packet_id: &Id,
        uid: &Id,
        amount: crate::money::Fen,
        claimed_at_ms: Millis,
    ) {
        let transfer = Transfer {
            at: (seq, n),
            packet_id: packet_id.clone(),
            uid: uid.clone(),
            amount,
            claimed_at_ms,
            deferred_since: None,
            mode_unknown: false,
        };
        self.pending.insert(transfer.at, transfer.clone());
        self.waiting.push_back(transfer);
    }

    async fn dispatch(&mut self, running: &mut Running) {
        // Packets that could not be read in this pass: their other transfers wait without
        // another read (each failed read may have waited seconds for a leaderless stream).
        let mut unreadable: HashSet<Id> = HashSet::new();
        while self.in_flight < TRANSFERS_IN_FLIGHT_MAX {
            let Some(mut transfer) = self.waiting.pop_front() else {
                break;
            };
            // A hot packet's transfers wait (P6: asynchronous), at most HOT_DEFERRAL_MAX:
            // each would take a journal flush's share from the packet's claims.
            let hot = self.packets.claims.is_hot(&transfer.packet_id);
            let now = std::time::Instant::now();
            if hold_back(hot, transfer.deferred_since, now) {
                if transfer.deferred_since.is_none() {
                    self.packets.metrics.packet_transfers_deferred_total.inc();
                    transfer.deferred_since = Some(now);
                }
                self.deferred.push(transfer);
                continue;
            }
            // A packet that cannot be read now (a read timing out, its actor overloaded) is
            // read again at the next tick; the transfer stays pending, never dropped: its
            // share would stay in escrow for good.
            let mode = if unreadable.contains(&transfer.packet_id) {
                None
            } else {
                match self.mode_of(&transfer.packet_id).await {
                    Ok(Some(mode)) => Some(mode),
                    unknown => {
                        unreadable.insert(transfer.packet_id.clone());
                        if !transfer.mode_unknown {
                            match unknown {
                                Err(e) => {
                                    crate::warn_limited!(packet = %transfer.packet_id, error = %e, "cannot read the claimed packet; its transfers wait")
                                }
                                _ => {
                                    crate::error_limited!(packet = %transfer.packet_id, "claim of a packet the log does not hold; its transfers wait (counted stuck)")
                                }
                            }
                        }
                        None
                    }
                }
            };
            let Some(mode) = mode else {
                transfer.mode_unknown = true;
                self.deferred.push(transfer);
                continue;
            };
            let packets = self.packets.clone();
            self.in_flight += 1;
            running.push(Box::pin(async move {
                let result = packets
                    .transfer(&transfer.packet_id, mode, &transfer.uid, transfer.amount)
                    .await;
                (transfer, result)
            }));
        }
    }

    fn complete(&mut self, transfer: Transfer, result: Result<(), PacketFlowError>) {
        self.in_flight -= 1;
        match result {
            Ok(()) => {
                self.pending.remove(&transfer.at);
                self.packets.metrics.packet_transfers_total.inc();
            }
            Err(e) => {
                crate::warn_limited!(packet = %transfer.packet_id, uid = %transfer.uid, error = %e, "share transfer failed; retrying");
                self.waiting.push_back(transfer);
            }
        }
    }

    /// Expires what is due, watches for stuck work, saves the checkpoint; deferred transfers
    /// are looked at again.
    async fn tick(&mut self) {
        self.waiting.extend(self.deferred.drain(..));
        let now = self.packets.clock.now_ms();
        let due = match crate::projections::packets::due(&self.view, now, EXPIRIES_PER_TICK_MAX) {
            Ok(due) => due,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the live packets");
                Vec::new()
            }
        };
        let stuck_ms = self.packets.config.stuck_after.as_millis() as i64;
        let mut stuck_refunds = 0;
        for (packet_id, expires_at_ms) in due {
            if now - expires_at_ms > stuck_ms {
                stuck_refunds += 1;
            }
            if self.retry_at.get(&packet_id).is_some_and(|at| *at > now) {
                continue;
            }
            match self.packets.expire(&packet_id).await {
                Ok(_) => {
                    self.retry_at.remove(&packet_id);
                }
                Err(e) => {
                    crate::warn_limited!(packet = %packet_id, error = %e, "packet expiry failed; retrying");
                    self.retry_at.insert(packet_id, now + RETRY_DELAY_MS);
                }
            }
        }
        let stuck_transfers = self
            .pending
            .values()
            .filter(|t| now - t.claimed_at_ms > stuck_ms)
            .count();
        let metrics = &self.packets.metrics;
        metrics
            .packets_stuck
            .with_label_values(&["transfer"])
            .set(stuck_transfers as i64);
        metrics
            .packets_stuck
            .with_label_values(&["refund"])
            .set(stuck_refunds as i64);
        if stuck_transfers + stuck_refunds > 0 {
            tracing::warn!(
                stuck_transfers,
                stuck_refunds,
                "red packet work stuck past its threshold"
            );
        }
        let checkpoint = self.checkpoint();
        if checkpoint != self.saved && save_checkpoint(&self.tree, FLOW, checkpoint).is_ok() {
            self.saved = checkpoint;
        }
    }

    async fn run(mut self, store: Arc<dyn EventStore>, mut stop: watch::Receiver<bool>) {
        let mut subscription = Subscription::new(store, self.read_to + 1, 4096);
        let mut running: Running = FuturesUnordered::new();
        let mut expiry = tokio::time::interval(self.packets.config.expiry_check);
        expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.dispatch(&mut running).await;
            tokio::select! {
                biased;
                changed = stop.changed() => if changed.is_err() || *stop.borrow() { break },
                Some((transfer, result)) = running.next(), if !running.is_empty() => self.complete(transfer, result),
                events = subscription.next(), if self.pending.len() < 100_000 => match events {
                    Ok(events) => {
                        for envelope in &events {
                            self.observe(envelope);
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "packet flows cannot read the log; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                },
                _ = expiry.tick() => self.tick().await,
            }
        }
        let drained = tokio::time::timeout(STOP_DRAIN_MAX, async {
            while let Some((transfer, result)) = running.next().await {
                self.complete(transfer, result);
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                "packet flows stopped with transfers in flight; the next start resumes them"
            );
        }
        let _ = save_checkpoint(&self.tree, FLOW, self.checkpoint());
    }
}

#[cfg(test)]
mod tests {
    use super::{hold_back, HOT_DEFERRAL_MAX};
    use std::time::{Duration, Instant};

    #[test]
    fn a_transfer_waits_only_while_its_packet_is_hot_and_never_past_the_bound() {
        let start = Instant::now();
        let later = |d: Duration| start + d;
        assert!(
            !hold_back(false, None, start),
            "a cold packet's transfer goes at once"
        );
        assert!(
            hold_back(true, None, start),
            "a hot packet's transfer waits"
        );
        assert!(hold_back(true, Some(start), later(HOT_DEFERRAL_MAX / 2)));
        assert!(
            !hold_back(true, Some(start), later(HOT_DEFERRAL_MAX)),
            "held back at most HOT_DEFERRAL_MAX, hot or not"
        );
        assert!(!hold_back(
            false,
            Some(start),
            later(Duration::from_millis(1))
        ));
    }
}
