//! `hongbao audit`: replays the whole log, with nothing but the log (and the payment channels'
//! own statements, the other side of the books), and checks every invariant the engine
//! promises. Each check reports what it looked at and its first violations; the audit passes
//! only if every check holds.
//!
//! Checks so far (one pass over the log):
//! - `hash_chain`: every record links to its predecessor, sequences are contiguous from 1,
//!   stream versions continuous (as `hongbao verify`);
//! - `wallet_balances`: every wallet movement's `balance_after` is the previous balance plus or
//!   minus its amount, never below zero, each `(entry, order)` recorded once;
//! - `money_conserved`: after every event (the breaking event named) and at the end, all
//!   balances = deposits + reward credits - withdrawal debits + withdrawal refunds, and
//!   withdrawal debits - refunds = paid out + in transit;
//! - `reward_credits`: rewards keyed by order id alone (R4: one order id, one reward), so an
//!   order id accepted in two activities is named; each reward credited at most once, only if
//!   accepted and not voided, from the activity that accepted it, for the accepted uid, kind
//!   and amount; a coupon reward delivered only if its request was issued, failed only if it
//!   was refused; every accepted reward credited, delivered, failed, voided or still pending
//!   (counted);
//! - `budgets`: per activity, accepted money never above the budget at any point of the log;
//! - `withdrawals`: each order has at most one debit and one refund; succeeded = one debit, no
//!   refund; refunded = one debit, one refund; failed before the debit = neither; a refund only
//!   after a failure; the debit is the order's amount and a refund the debit;
//! - `channel_statements`: an order succeeded exactly when its channel's statement says paid;
//!   every statement line (read as a stream) belongs to an order of that channel and says the
//!   order's amount;
//! - `packets`: claimed + refunded = total, each share paid to its claimer once;
//! - `coupons`: issued never above stock (coupon numbers 1..n, distinct), no user above a
//!   batch's limit, no user in two batches of a group, each accepted request granted at most
//!   once, only as accepted and never after a final refusal; pending requests counted.

mod coupons;
mod live;
mod views;

pub use live::LiveAudit;

pub use views::views_check;

use crate::channels::{RecordStatus, SimulatedChannels};
use crate::domain::activity::{activity_of_stream, ActivityEvent, FailReason, Reward, RewardKind};
use crate::domain::coupon::reward_request;
use crate::domain::packet::PacketState;
use crate::domain::wallet::{Account, BarredDebit, Entry, WalletEvent};
use crate::domain::withdrawal::{Channel, OrderState, WithdrawalOrder};
use crate::domain::{Aggregate, Event};
use crate::events::{check_link, Envelope, RawRecord, StoreError, GENESIS_HASH};
use crate::ids::Id;
use crate::money::Fen;
use serde::Serialize;
// The replay's maps hash millions of ids: foldhash, not SipHash (an offline audit of our own
// log needs no defence against chosen keys).
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// A packet whose deadline passed this long ago (by the log's own clock) and that still holds
/// its remainder is reported (the packets' `stuck_after` default).
const REFUND_OVERDUE_AFTER_MS: i64 = 60_000;

/// Violations listed per check (all are counted).
const VIOLATIONS_LISTED_MAX: usize = 20;

#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub name: &'static str,
    pub description: &'static str,
    /// What the check looked at (events, orders, wallets...).
    pub checked: u64,
    pub violations: u64,
    /// The first violations, with the ids involved.
    pub examples: Vec<String>,
    /// Extra figures worth printing (pending rewards, money in transit...).
    pub notes: Vec<String>,
}

impl CheckResult {
    fn new(name: &'static str, description: &'static str) -> CheckResult {
        CheckResult {
            name,
            description,
            checked: 0,
            violations: 0,
            examples: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn violation(&mut self, what: String) {
        self.violations += 1;
        if self.examples.len() < VIOLATIONS_LISTED_MAX {
            self.examples.push(what);
        }
    }

    pub fn ok(&self) -> bool {
        self.violations == 0
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    pub events: u64,
    pub checks: Vec<CheckResult>,
}

impl AuditReport {
    pub fn ok(&self) -> bool {
        self.checks.iter().all(CheckResult::ok)
    }
}

#[derive(Default)]
struct WalletReplay {
    balances: HashMap<Account, Fen>,
    seen: HashSet<(Entry, Id)>,
    /// Debits called off (`wallet.debit_barred`): none of them may happen later.
    barred: HashSet<BarredDebit>,
}

#[derive(Default)]
struct RewardReplay {
    /// The activity that accepted the order id (first), or, before that, the one the order-id
    /// registry claimed it for: the only one it may belong to.
    activity: String,
    reward: Option<Reward>,
    credits: u32,
    voided: bool,
    delivered: bool,
    failed: Option<FailReason>,
    /// Claimed in the order-id registry, for `activity` (false in logs that predate the
    /// registry). A flag rather than a second activity id keeps the replay's memory per order
    /// id as it was.
    claimed: bool,
}

#[derive(Default)]
struct OrderReplay {
    order: WithdrawalOrder,
    debits: u32,
    refunds: u32,
    debited: Fen,
    /// Every withdrawal debit and refund of the order, summed (fen).
    debited_total: u128,
    refunded_total: u128,
}

#[derive(Default)]
struct PacketReplay {
    packet: crate::domain::packet::Packet,
    /// Money that reached escrow (wallet payment debits naming the packet).
    paid: u128,
    transferred: u128,
    /// Money transferred out of escrow, by uid: (transfers, fen).
    transfers: HashMap<String, (u32, u128)>,
    refunded_to_wallet: u128,
    returned_to_budget: u128,
}

impl PacketReplay {
    /// P11 at any time: escrow never pays out more than came in.
    fn overdrawn(&self) -> bool {
        self.paid < self.transferred + self.refunded_to_wallet + self.returned_to_budget
    }
}

/// One activity entity's budget books: the activity's own (`budget`, and slices granted to
/// its intake shards and not taken back: `sliced_*`), or an intake shard's (what it holds:
/// received minus released, `held_*`). `cash` and `subsidy` are what the entity accepted.
#[derive(Default)]
struct Budget {
    budget: Option<(Fen, Fen)>,
    cash: u128,
    subsidy: u128,
    /// An intake shard's stream (`activity:cny@3`).
    shard: bool,
    sliced_cash: i128,
    sliced_subsidy: i128,
    held_cash: i128,
    held_subsidy: i128,
}

/// Both sides of one intake shard's slices of one kind, matched at the end (cumulative fen).
#[derive(Default)]
struct SliceFlow {
    granted: u128,
    received: u128,
    released: u128,
    taken_back: u128,
}

fn by_kind(kind: RewardKind, cash: &mut i128, subsidy: &mut i128, delta: i128) {
    match kind {
        RewardKind::Cash => *cash += delta,
        RewardKind::Subsidy => *subsidy += delta,
        RewardKind::Coupon | RewardKind::Item => {}
    }
}

/// Everything the audit accumulates while it replays.
struct Auditor {
    chain: CheckResult,
    wallets_check: CheckResult,
    conservation: CheckResult,
    rewards_check: CheckResult,
    budgets_check: CheckResult,
    withdrawals_check: CheckResult,
    channels_check: CheckResult,
    packets_check: CheckResult,
    coupons: coupons::CouponAudit,
    /// Each stream's last version seen.
    versions: HashMap<String, u64>,
    wallets: HashMap<String, WalletReplay>,
    packets: HashMap<String, PacketReplay>,
    /// By order id alone: an order id gives one reward, whatever the activity (R4).
    rewards: HashMap<Id, RewardReplay>,
    /// By activity entity: the activity (`cny`) or one of its intake shards (`cny@3`).
    budgets: HashMap<String, Budget>,
    /// Budget slices by (activity, shard, kind).
    slices: HashMap<(String, u32, RewardKind), SliceFlow>,
    orders: HashMap<Id, OrderReplay>,
    /// Money totals in fen, wide so that no sum can overflow.
    deposits: u128,
    reward_credits: u128,
    withdrawal_debits: u128,
    withdrawal_refunds: u128,
    packet_payments: u128,
    claim_transfers: u128,
    packet_refunds: u128,
    budget_returns: u128,
    /// Sum of every wallet balance as the log records them, and how far it is from the
    /// movements' net inflow (0 while no event created or lost money).
    balances_total: i128,
    deviation: i128,
    /// The latest `recorded_at_ms` of the log: the audit's "now" (it never reads a clock).
    last_at_ms: i64,
    /// Several logs (a cluster's partitions) replayed business events first, wallet movements
    /// after: a packet's escrow is checked at the end, not after every movement.
    merged: bool,
    /// With several logs: every stream in the log the deployment's map gives it.
    placement: Option<CheckResult>,
    /// Rewards noted pending on wallets (a cluster's): (seq, uid, note, whether the wallet
    /// had already credited that reward).
    notes: Vec<(u64, String, crate::domain::wallet::PendingNote, bool)>,
    /// Notes settled on wallets without a credit (a cluster's): (seq, uid, activity, order).
    settled_notes: Vec<(u64, String, Id, Id)>,
}

/// The reward of `order_id` if `activity` is the one that accepted it (or nothing has accepted
/// it yet); `None` for a second activity's copy, already named at its acceptance.
fn reward_of<'a>(
    rewards: &'a mut HashMap<Id, RewardReplay>,
    activity: &str,
    order_id: &Id,
) -> Option<&'a mut RewardReplay> {
    let replay = rewards.entry(order_id.clone()).or_default();
    if replay.reward.is_none() && replay.activity.is_empty() {
        replay.activity = activity.to_owned();
    }
    (replay.activity == activity).then_some(replay)
}

fn stream_id<'a>(envelope: &'a Envelope, prefix: &str) -> Option<&'a str> {
    envelope.stream.strip_prefix(prefix)?.strip_prefix(':')
}

impl Auditor {
    fn new() -> Auditor {
        Auditor {
            chain: CheckResult::new("hash_chain", "records chained by SHA-256, sequence contiguous from 1, stream versions continuous"),
            wallets_check: CheckResult::new("wallet_balances", "each movement's balance_after = previous +/- amount, never negative, each (entry, order) once"),
            conservation: CheckResult::new("money_conserved", "after every event and at the end: balances = deposits + reward credits - withdrawals + refunds; debits - refunds = paid + in transit"),
            rewards_check: CheckResult::new("reward_credits", "one reward per order id across activities; each credited at most once, only if accepted and not voided, as accepted; coupon rewards delivered or failed as their requests ended"),
            budgets_check: CheckResult::new("budgets", "accepted money never above the activity's budget"),
            withdrawals_check: CheckResult::new("withdrawals", "one debit of the order's amount, at most one refund of the debit, a refund exactly when failed after the debit"),
            channels_check: CheckResult::new("channel_statements", "an order succeeded exactly when its channel's statement says paid; every line belongs to an order of that channel and says its amount"),
                        packets_check: CheckResult::new("packets", "paid = total; each claim and each transfer is the drawn share, once; claimed + refunded = total when finished; escrow never overdrawn, empty when done"),
            coupons: coupons::CouponAudit::new(),
            versions: HashMap::default(),
            wallets: HashMap::default(),
            packets: HashMap::default(),
            rewards: HashMap::default(),
            budgets: HashMap::default(),
            slices: HashMap::default(),
            orders: HashMap::default(),
            deposits: 0,
            reward_credits: 0,
                        withdrawal_debits: 0,
            withdrawal_refunds: 0,
            packet_payments: 0,
            claim_transfers: 0,
            packet_refunds: 0,
            budget_returns: 0,
            balances_total: 0,
            deviation: 0,
            last_at_ms: 0,
            merged: false,
            placement: None,
            notes: Vec::new(),
            settled_notes: Vec::new(),
        }
    }

    fn wallet_event(&mut self, envelope: &Envelope, event: &WalletEvent) {
        let uid = stream_id(envelope, "wallet").unwrap_or_default().to_owned();
        self.wallets_check.checked += 1;
        let replay = self.wallets.entry(uid.clone()).or_default();
        let line = match event {
            WalletEvent::Credited(line) | WalletEvent::Debited(line) => line,
            WalletEvent::DebitBarred(bar) => {
                replay.barred.insert(bar.clone());
                return;
            }
            // No money moves; checked against the accepted rewards at the end.
            WalletEvent::PendingNoted(note) => {
                let credited = note
                    .kind
                    .wallet_entry()
                    .is_some_and(|entry| replay.seen.contains(&(entry, note.order_id.clone())));
                self.notes.push((envelope.seq, uid, note.clone(), credited));
                return;
            }
            WalletEvent::NoteSettled {
                activity_id,
                order_id,
            } => {
                let settled = (envelope.seq, uid, activity_id.clone(), order_id.clone());
                self.settled_notes.push(settled);
                return;
            }
        };
        let account = line.entry.account();
        if matches!(event, WalletEvent::Debited(_))
            && replay.barred.contains(&BarredDebit {
                entry: line.entry,
                order_id: line.order_id.clone(),
                source: line.source.clone(),
            })
        {
            self.wallets_check.violation(format!(
                "seq {}: wallet {uid} debits {} {} after that debit was barred",
                envelope.seq,
                line.entry.as_str(),
                line.order_id
            ));
        }
        let before = replay.balances.get(&account).copied().unwrap_or(Fen::ZERO);
        let expected = match event {
            WalletEvent::Debited(_) => before.checked_sub(line.amount),
            _ => before.checked_add(line.amount),
        };
        match expected {
            Ok(after) if after == line.balance_after => {}
            Ok(after) => self.wallets_check.violation(format!(
                "seq {}: wallet {uid} {} {}: balance_after {} but {} expected",
                envelope.seq,
                line.entry.as_str(),
                line.order_id,
                line.balance_after,
                after
            )),
            Err(_) => self.wallets_check.violation(format!(
                "seq {}: wallet {uid} {} {} takes {} from a balance of {}",
                envelope.seq,
                line.entry.as_str(),
                line.order_id,
                line.amount,
                before
            )),
        }
        replay.balances.insert(account, line.balance_after);
        self.balances_total +=
            i128::from(line.balance_after.as_u64()) - i128::from(before.as_u64());
        if !replay.seen.insert((line.entry, line.order_id.clone())) {
            self.wallets_check.violation(format!(
                "seq {}: wallet {uid} records {} {} twice",
                envelope.seq,
                line.entry.as_str(),
                line.order_id
            ));
        }
        let amount = line.amount.as_u64() as u128;
        match line.entry {
            Entry::Deposit => self.deposits += amount,
            Entry::Reward | Entry::SubsidyReward => {
                self.reward_credits += amount;
                self.reward_credit(
                    envelope,
                    &uid,
                    line.entry,
                    &line.order_id,
                    line.amount,
                    line.source.as_ref(),
                );
            }
            Entry::Withdrawal => {
                self.withdrawal_debits += amount;
                let order = self.orders.entry(line.order_id.clone()).or_default();
                order.debits += 1;
                order.debited = line.amount;
                order.debited_total += amount;
            }
            Entry::WithdrawalRefund => {
                self.withdrawal_refunds += amount;
                let order = self.orders.entry(line.order_id.clone()).or_default();
                order.refunds += 1;
                order.refunded_total += amount;
            }
            Entry::PacketPayment | Entry::PacketSubsidy => {
                self.packet_payments += amount;
                let packet = match (line.entry, &line.source) {
                    (Entry::PacketSubsidy, Some(packet)) => packet.to_string(),
                    _ => line.order_id.to_string(),
                };
                self.packets.entry(packet).or_default().paid += amount;
            }
            Entry::ClaimTransfer | Entry::ClaimTransferActivity => {
                self.claim_transfers += amount;
                let packet = self.packets.entry(line.order_id.to_string()).or_default();
                packet.transferred += amount;
                let to_uid = packet.transfers.entry(uid.clone()).or_default();
                to_uid.0 += 1;
                to_uid.1 += amount;
                self.escrow_covers(envelope, line.order_id.as_str());
            }
            Entry::PacketRefund => {
                self.packet_refunds += amount;
                self.packets
                    .entry(line.order_id.to_string())
                    .or_default()
                    .refunded_to_wallet += amount;
                self.escrow_covers(envelope, line.order_id.as_str());
            }
        }
        // Conservation after every event: what the wallets hold moves only by what the event
        // says moved. A change of the deviation names the event that created or lost money.
        let deviation = self.balances_total - self.net_inflow();
        if deviation != self.deviation {
            self.conservation.violation(format!(
                "seq {}: wallet {uid} {} {}: balances change by {} fen more than the movement",
                envelope.seq,
                line.entry.as_str(),
                line.order_id,
                deviation - self.deviation
            ));
            self.deviation = deviation;
        }
    }

    /// P11 after every movement out of a packet's escrow: it never pays out more than it got.
    fn escrow_covers(&mut self, envelope: &Envelope, packet_id: &str) {
        if self.merged {
            return;
        }
        if let Some(packet) = self.packets.get(packet_id).filter(|p| p.overdrawn()) {
            self.packets_check.violation(format!(
                "seq {}: packet {packet_id} pays out {} from an escrow that received {}",
                envelope.seq,
                packet.transferred + packet.refunded_to_wallet + packet.returned_to_budget,
                packet.paid
            ));
        }
    }

    /// Money that entered the wallets minus money that left them, from the movements.
    fn net_inflow(&self) -> i128 {
        let inflow = self.deposits
            + self.reward_credits
            + self.withdrawal_refunds
            + self.claim_transfers
            + self.packet_refunds;
        inflow as i128 - (self.withdrawal_debits + self.packet_payments) as i128
    }

    fn reward_credit(
        &mut self,
        envelope: &Envelope,
        uid: &str,
        entry: Entry,
        order_id: &Id,
        amount: Fen,
        source: Option<&Id>,
    ) {
        self.rewards_check.checked += 1;
        let Some(activity) = source else {
            self.rewards_check.violation(format!(
                "seq {}: reward credit {order_id} to {uid} names no activity",
                envelope.seq
            ));
            return;
        };
        let replay = self.rewards.entry(order_id.clone()).or_default();
        replay.credits += 1;
        let problem = match &replay.reward {
            None => Some("was never accepted".to_owned()),
            Some(_) if replay.activity != activity.as_str() => Some(format!(
                "is credited from activity {activity} but was accepted by activity {}",
                replay.activity
            )),
            Some(_) if replay.voided => Some("was voided".to_owned()),
            Some(_) if replay.failed.is_some() => Some("had failed".to_owned()),
            Some(_) if replay.credits > 1 => Some(format!("is credited {} times", replay.credits)),
            Some(r)
                if r.uid.as_str() != uid
                    || r.amount != amount
                    || r.kind.wallet_entry() != Some(entry) =>
            {
                Some(format!(
                    "was accepted as {} {} for {}, credited as {} {amount} to {uid}",
                    r.kind,
                    r.amount,
                    r.uid,
                    entry.as_str()
                ))
            }
            Some(_) => None,
        };
        if let Some(problem) = problem {
            self.rewards_check.violation(format!(
                "seq {}: reward {activity}/{order_id} {problem}",
                envelope.seq
            ));
        }
    }

    fn activity_event(&mut self, envelope: &Envelope, event: &ActivityEvent) {
        // The budget books are the entity's (an intake shard keeps its own); a reward is its
        // activity's, whichever shard accepted it.
        let entity = stream_id(envelope, "activity")
            .unwrap_or_default()
            .to_owned();
        let (activity, shard) = match activity_of_stream(&envelope.stream) {
            Some((activity, shard)) => (activity.to_string(), shard),
            None => (entity.clone(), None),
        };
        if let Some(books) = self.budgets.get_mut(&entity) {
            books.shard = shard.is_some();
        } else {
            self.budgets.insert(
                entity.clone(),
                Budget {
                    shard: shard.is_some(),
                    ..Budget::default()
                },
            );
        }
        match event {
            ActivityEvent::BudgetSet(b) => {
                self.budgets.entry(entity.clone()).or_default().budget = Some((b.cash, b.subsidy));
            }
            ActivityEvent::RewardAccepted(reward) => {
                if reward.kind == RewardKind::Coupon {
                    if let Some((_, r)) = reward_request(&envelope.stream, reward) {
                        self.coupons.reward(&r);
                    }
                }
                let replay = self.rewards.entry(reward.order_id.clone()).or_default();
                match &replay.reward {
                    Some(_) if replay.activity == activity => {
                        self.rewards_check.violation(format!(
                            "seq {}: reward {activity}/{} accepted twice",
                            envelope.seq, reward.order_id
                        ))
                    }
                    // The first stays the reward of the order id; what follows for this one is
                    // told apart by its activity.
                    Some(_) => self.rewards_check.violation(format!(
                        "seq {}: order id {} accepted by activity {} and again by activity {activity}",
                        envelope.seq, reward.order_id, replay.activity
                    )),
                    None => {
                        if replay.claimed && replay.activity != activity {
                            self.rewards_check.violation(format!(
                                "seq {}: order id {} accepted by activity {activity} but claimed for activity {}",
                                envelope.seq, reward.order_id, replay.activity
                            ));
                        }
                        replay.activity = activity.clone();
                        replay.reward = Some(reward.clone());
                    }
                }
                let budget = self.budgets.entry(entity.clone()).or_default();
                let amount = reward.amount.as_u64() as u128;
                match reward.kind {
                    RewardKind::Cash => budget.cash += amount,
                    RewardKind::Subsidy => budget.subsidy += amount,
                    RewardKind::Coupon | RewardKind::Item => {}
                }
            }
            ActivityEvent::RewardDelivered { order_id, .. } => {
                if let Some(replay) = reward_of(&mut self.rewards, &activity, order_id) {
                    replay.delivered = true;
                }
            }
            ActivityEvent::RewardFailed {
                order_id,
                kind,
                amount,
                reason,
                ..
            } => {
                if let Some(replay) = reward_of(&mut self.rewards, &activity, order_id) {
                    if replay.credits > 0 || replay.delivered {
                        self.rewards_check.violation(format!(
                            "seq {}: reward {activity}/{order_id} failed after it was credited or delivered",
                            envelope.seq
                        ));
                    }
                    replay.failed = Some(*reason);
                }
                let budget = self.budgets.entry(entity.clone()).or_default();
                let amount = amount.as_u64() as u128;
                match kind {
                    RewardKind::Cash => budget.cash = budget.cash.saturating_sub(amount),
                    RewardKind::Subsidy => budget.subsidy = budget.subsidy.saturating_sub(amount),
                    RewardKind::Coupon | RewardKind::Item => {}
                }
            }
            ActivityEvent::BudgetReturned {
                order_id,
                kind,
                amount,
            } => {
                let amount = amount.as_u64() as u128;
                self.budget_returns += amount;
                self.packets
                    .entry(order_id.to_string())
                    .or_default()
                    .returned_to_budget += amount;
                self.escrow_covers(envelope, order_id.as_str());
                let budget = self.budgets.entry(entity.clone()).or_default();
                let accepted = match kind {
                    RewardKind::Cash => Some(&mut budget.cash),
                    RewardKind::Subsidy => Some(&mut budget.subsidy),
                    RewardKind::Coupon | RewardKind::Item => None,
                };
                if let Some(accepted) = accepted {
                    // Money comes back to the books that let it out: a return beyond what
                    // this activity (or intake shard) accepted is lost against nothing.
                    if amount > *accepted {
                        self.budgets_check.violation(format!(
                            "seq {}: {entity} took back {amount} fen of {kind} for packet {order_id}, more than the {accepted} it had accepted",
                            envelope.seq
                        ));
                    }
                    *accepted = accepted.saturating_sub(amount);
                }
            }
            ActivityEvent::RewardVoided {
                order_id,
                kind,
                amount,
                ..
            } => {
                if let Some(replay) = reward_of(&mut self.rewards, &activity, order_id) {
                    if replay.credits > 0 {
                        self.rewards_check.violation(format!(
                            "seq {}: reward {activity}/{order_id} voided after a credit",
                            envelope.seq
                        ));
                    }
                    replay.voided = true;
                }
                let budget = self.budgets.entry(entity.clone()).or_default();
                let amount = amount.as_u64() as u128;
                match kind {
                    RewardKind::Cash => budget.cash = budget.cash.saturating_sub(amount),
                    RewardKind::Subsidy => budget.subsidy = budget.subsidy.saturating_sub(amount),
                    RewardKind::Coupon | RewardKind::Item => {}
                }
            }
            ActivityEvent::SliceGranted {
                shard: other,
                kind,
                amount,
            }
            | ActivityEvent::SliceTakenBack {
                shard: other,
                kind,
                amount,
            } => {
                let granted = matches!(event, ActivityEvent::SliceGranted { .. });
                let amount = amount.as_u64() as u128;
                let delta = if granted {
                    amount as i128
                } else {
                    -(amount as i128)
                };
                let books = self.budgets.entry(entity.clone()).or_default();
                by_kind(
                    *kind,
                    &mut books.sliced_cash,
                    &mut books.sliced_subsidy,
                    delta,
                );
                let flow = self
                    .slices
                    .entry((activity.clone(), *other, *kind))
                    .or_default();
                if granted {
                    flow.granted += amount;
                } else {
                    flow.taken_back += amount;
                }
            }
            ActivityEvent::SliceReceived { kind, amount }
            | ActivityEvent::SliceReleased { kind, amount } => {
                let received = matches!(event, ActivityEvent::SliceReceived { .. });
                let Some(shard) = shard else {
                    self.budgets_check.violation(format!(
                        "seq {}: activity {activity} records a slice of its own ({})",
                        envelope.seq,
                        event.type_name()
                    ));
                    return;
                };
                let amount = amount.as_u64() as u128;
                let delta = if received {
                    amount as i128
                } else {
                    -(amount as i128)
                };
                let books = self.budgets.entry(entity.clone()).or_default();
                by_kind(*kind, &mut books.held_cash, &mut books.held_subsidy, delta);
                let flow = self
                    .slices
                    .entry((activity.clone(), shard, *kind))
                    .or_default();
                if received {
                    flow.received += amount;
                } else {
                    flow.released += amount;
                }
            }
        }
        self.budgets_check.checked += 1;
        let books = self.budgets.entry(entity.clone()).or_default();
        let (cash, subsidy) = (books.cash as i128, books.subsidy as i128);
        if books.shard {
            // A shard accepts money only within what it holds.
            if cash > books.held_cash
                || subsidy > books.held_subsidy
                || books.held_cash < 0
                || books.held_subsidy < 0
            {
                self.budgets_check.violation(format!(
                    "seq {}: intake shard {entity} accepted cash {cash} / subsidy {subsidy} holding slices of {} / {}",
                    envelope.seq, books.held_cash, books.held_subsidy
                ));
            }
        } else if let Some((budget_cash, budget_subsidy)) = books.budget {
            // The activity's own acceptances and the slices its shards hold, within the budget.
            let used_cash = cash + books.sliced_cash;
            let used_subsidy = subsidy + books.sliced_subsidy;
            if used_cash > budget_cash.as_u64() as i128
                || used_subsidy > budget_subsidy.as_u64() as i128
            {
                self.budgets_check.violation(format!(
                    "seq {}: activity {activity} accepted cash {cash} / subsidy {subsidy} and granted slices of {} / {} against a budget of {} / {}",
                    envelope.seq, books.sliced_cash, books.sliced_subsidy, budget_cash.as_u64(), budget_subsidy.as_u64()
                ));
            }
        }
    }

    fn withdrawal_event(
        &mut self,
        envelope: &Envelope,
        event: &crate::domain::withdrawal::WithdrawalEvent,
    ) {
        let Some(order_id) = stream_id(envelope, "withdrawal").and_then(|id| Id::parse(id).ok())
        else {
            return;
        };
        let replay = self.orders.entry(order_id).or_default();
        replay.order.evolve(event);
    }

    /// A stream's versions continue by one from 1.
    fn check_version(&mut self, envelope: &Envelope) {
        match self.versions.get_mut(&envelope.stream) {
            Some(last) => {
                if envelope.version != *last + 1 {
                    self.chain.violation(format!(
                        "seq {}: stream {} jumps from version {last} to {}",
                        envelope.seq, envelope.stream, envelope.version
                    ));
                }
                *last = envelope.version;
            }
            None => {
                if envelope.version != 1 {
                    self.chain.violation(format!(
                        "seq {}: stream {} starts at version {}",
                        envelope.seq, envelope.stream, envelope.version
                    ));
                }
                self.versions
                    .insert(envelope.stream.clone(), envelope.version);
            }
        }
    }

    fn observe(&mut self, envelope: &Envelope) {
        self.last_at_ms = self.last_at_ms.max(envelope.recorded_at_ms);
        match &envelope.event {
            Event::Wallet(event) => self.wallet_event(envelope, event),
            Event::Activity(event) => self.activity_event(envelope, event),
            Event::Withdrawal(event) => self.withdrawal_event(envelope, event),
            Event::Packet(event) => {
                let packet = stream_id(envelope, "packet").unwrap_or_default().to_owned();
                self.packets.entry(packet).or_default().packet.evolve(event);
            }
            Event::CouponIntake(event) => self.coupons.intake(event),
            Event::CouponBatch(event) => {
                let batch = stream_id(envelope, "coupon-batch").unwrap_or_default();
                self.coupons.batch(batch, event);
            }
            Event::CouponGroup(event) => {
                let group = stream_id(envelope, "coupon-group").unwrap_or_default();
                self.coupons.group(group, event);
            }
            Event::OrderIds(crate::domain::order_ids::OrderIdEvent::Claimed { claims }) => {
                for claim in claims {
                    let replay = self.rewards.entry(claim.order_id.clone()).or_default();
                    if replay.claimed {
                        self.rewards_check.violation(format!(
                            "seq {}: order id {} claimed for activity {} and again for activity {}",
                            envelope.seq, claim.order_id, replay.activity, claim.activity_id
                        ));
                        continue;
                    }
                    replay.claimed = true;
                    if replay.reward.is_none() {
                        replay.activity = claim.activity_id.to_string();
                    }
                }
            }
            Event::Switches(_) | Event::Policy(_) | Event::Payee(_) => {}
        }
    }

    /// End-of-log checks.
    /// End-of-log checks, on top of what the replay found; the replay state is only read, so
    /// the continuous audit concludes without copying it.
    /// Budget slices, matched across the streams (in any order, so at the end): a shard
    /// received no more than its activity granted it, the activity took back no more than the
    /// shard released; and over the activity and all its shards, accepted money within the
    /// budget (the sum itself, not a remainder).
    fn check_slices(&self, budgets_check: &mut CheckResult) {
        let mut slices: Vec<_> = self.slices.iter().collect();
        slices.sort_by(|a, b| a.0.cmp(b.0));
        for ((activity, shard, kind), flow) in slices {
            budgets_check.checked += 1;
            if flow.received > flow.granted {
                budgets_check.violation(format!(
                    "intake shard {activity}@{shard} received {} of {kind}, its activity granted {}",
                    flow.received, flow.granted
                ));
            }
            if flow.taken_back > flow.released {
                budgets_check.violation(format!(
                    "activity {activity} took back {} of {kind} from shard {shard}, which released {}",
                    flow.taken_back, flow.released
                ));
            }
        }
        /// An activity over itself and its intake shards.
        #[derive(Default)]
        struct Whole {
            cash: u128,
            subsidy: u128,
            budget: Option<(Fen, Fen)>,
            sharded: bool,
        }
        let mut wholes: std::collections::BTreeMap<&str, Whole> = Default::default();
        for (entity, books) in &self.budgets {
            let activity = entity
                .split_once(crate::domain::activity::SHARD_SEPARATOR)
                .map_or(entity.as_str(), |(a, _)| a);
            let whole = wholes.entry(activity).or_default();
            whole.cash += books.cash;
            whole.subsidy += books.subsidy;
            whole.sharded |= books.shard;
            if !books.shard {
                whole.budget = books.budget;
            }
        }
        for (activity, whole) in wholes {
            let (Some((budget_cash, budget_subsidy)), true) = (whole.budget, whole.sharded) else {
                continue;
            };
            budgets_check.checked += 1;
            let (cash, subsidy) = (whole.cash, whole.subsidy);
            if cash > budget_cash.as_u64() as u128 || subsidy > budget_subsidy.as_u64() as u128 {
                budgets_check.violation(format!(
                    "activity {activity} and its intake shards accepted cash {cash} / subsidy {subsidy} against a budget of {} / {}",
                    budget_cash.as_u64(),
                    budget_subsidy.as_u64()
                ));
            }
        }
    }

    fn finish(&self, channels: Option<&SimulatedChannels>) -> Vec<CheckResult> {
        let (chain, wallets_check, mut conservation) = (
            self.chain.clone(),
            self.wallets_check.clone(),
            self.conservation.clone(),
        );
        let (mut rewards_check, mut budgets_check, mut withdrawals_check) = (
            self.rewards_check.clone(),
            self.budgets_check.clone(),
            self.withdrawals_check.clone(),
        );
        let (mut channels_check, mut packets_check) =
            (self.channels_check.clone(), self.packets_check.clone());
        self.check_slices(&mut budgets_check);
        // Rewards: every accepted one settled or pending.
        let mut pending = 0u64;
        for (order_id, replay) in &self.rewards {
            let Some(reward) = &replay.reward else {
                continue;
            };
            let activity = &replay.activity;
            rewards_check.checked += 1;
            let settled =
                replay.credits > 0 || replay.voided || replay.delivered || replay.failed.is_some();
            let kind = Some(reward.kind);
            if !settled {
                pending += 1;
            }
            if replay.delivered && replay.failed.is_some() {
                rewards_check.violation(format!(
                    "reward {activity}/{order_id} is both delivered and failed"
                ));
            }
            // A coupon reward ends as its issuance request ended (the coupon check's replay).
            if reward.kind == RewardKind::Coupon && (replay.delivered || replay.failed.is_some()) {
                let stream = format!("activity:{activity}");
                if let Some((_, request)) = reward_request(&stream, reward) {
                    let seq = request.seq_no.as_str();
                    let outcome = self.coupons.outcome(seq);
                    let problem = match (replay.delivered, outcome) {
                        (true, Some(Ok(()))) | (false, Some(Err(_))) => None,
                        (true, Some(Err(refusal))) => Some(format!(
                            "is delivered but its request {seq} was refused ({})",
                            refusal.as_str()
                        )),
                        (false, Some(Ok(()))) => {
                            Some(format!("failed but its request {seq} was issued"))
                        }
                        (_, None) => Some(format!(
                            "is {} but its request {seq} is not final",
                            if replay.delivered {
                                "delivered"
                            } else {
                                "failed"
                            }
                        )),
                    };
                    if let Some(problem) = problem {
                        rewards_check.violation(format!("reward {activity}/{order_id} {problem}"));
                    }
                }
            }
            if replay.credits > 0 && kind.and_then(RewardKind::wallet_entry).is_none() {
                rewards_check.violation(format!(
                    "reward {activity}/{order_id} is a {:?} reward credited as money",
                    kind
                ));
            }
        }
        rewards_check.notes.push(format!(
            "{pending} accepted rewards still pending (not yet credited, delivered, failed or voided)"
        ));
        // A reward noted pending on a wallet is one its activity accepted, as noted.
        for (seq, uid, note, credited) in &self.notes {
            rewards_check.checked += 1;
            // A note after the credit would show the user, for good, a reward still coming
            // that was paid (the wallet records no note of a credited reward).
            if *credited {
                rewards_check.violation(format!(
                    "seq {seq}: wallet {uid} notes reward {}/{} ({} {}) pending after crediting it",
                    note.activity_id, note.order_id, note.kind, note.amount
                ));
            }
            let matches = self.rewards.get(&note.order_id).is_some_and(|replay| {
                replay.activity == note.activity_id.as_str()
                    && replay.reward.as_ref().is_some_and(|r| {
                        r.uid.as_str() == uid && r.kind == note.kind && r.amount == note.amount
                    })
            });
            if !matches {
                rewards_check.violation(format!(
                    "seq {seq}: wallet {uid} notes reward {}/{} ({} {}) pending, which its activity did not accept so",
                    note.activity_id, note.order_id, note.kind, note.amount
                ));
            }
        }
        // A note settled without a credit is of a reward of that user that its activity
        // settled so (delivered, failed or voided): never one still pending there.
        for (seq, uid, activity, order_id) in &self.settled_notes {
            rewards_check.checked += 1;
            let settled = self.rewards.get(order_id).is_some_and(|replay| {
                replay.activity == activity.as_str()
                    && replay
                        .reward
                        .as_ref()
                        .is_some_and(|r| r.uid.as_str() == uid)
                    && (replay.delivered || replay.failed.is_some() || replay.voided)
            });
            if !settled {
                rewards_check.violation(format!(
                    "seq {seq}: wallet {uid} settles its note of reward {activity}/{order_id}, which its activity did not deliver, fail or void"
                ));
            }
        }

        // Withdrawals. The channels' statements first, line by line (a statement is read as
        // a stream, never held whole): each line must belong to an order of that channel and
        // say its amount; a line that says paid marks the order paid.
        let mut channel_paid: HashSet<Id> = HashSet::default();
        if let Some(sim) = channels {
            for channel in Channel::ALL {
                for line in sim.lines(channel) {
                    let line = match line {
                        Ok(line) => line,
                        Err(e) => {
                            channels_check
                                .violation(format!("the {channel} statement cannot be read: {e}"));
                            break;
                        }
                    };
                    channels_check.checked += 1;
                    let order = Id::parse(&line.order_id).ok().and_then(|id| {
                        let replay = self.orders.get(&id)?;
                        Some((id, replay.order.request.as_ref()?))
                    });
                    let status = match line.status {
                        RecordStatus::Succeeded => "paid",
                        RecordStatus::Failed => "refused",
                    };
                    let Some((order_id, request)) = order else {
                        channels_check.violation(format!(
                            "order {}: the {channel} statement has a line ({} fen, {status}) but there is no such order",
                            line.order_id, line.amount
                        ));
                        continue;
                    };
                    if request.method.channel != channel {
                        channels_check.violation(format!(
                            "order {order_id}: a {channel} statement line, but the order pays through {}",
                            request.method.channel
                        ));
                        continue;
                    }
                    if line.amount != request.amount {
                        channels_check.violation(format!(
                            "order {order_id} of {} fen: the {channel} statement line says {} fen ({status})",
                            request.amount, line.amount
                        ));
                    }
                    if line.status == RecordStatus::Succeeded {
                        channel_paid.insert(order_id);
                    }
                }
            }
        }
        let (mut paid, mut in_transit, mut open) = (0u128, 0u128, 0u64);
        for (order_id, replay) in &self.orders {
            withdrawals_check.checked += 1;
            let state = replay.order.state;
            let (debits, refunds) = (replay.debits, replay.refunds);
            if debits > 1 || refunds > 1 || refunds > debits {
                withdrawals_check.violation(format!(
                    "order {order_id}: {debits} debits and {refunds} refunds"
                ));
            }
            let expected = match state {
                Some(OrderState::Succeeded) => Some((1, 0)),
                Some(OrderState::Refunded) => Some((1, 1)),
                Some(OrderState::Failed) if !replay.order.debited => Some((0, 0)),
                None => {
                    withdrawals_check.violation(format!(
                        "order {order_id}: wallet movements for an order never requested"
                    ));
                    None
                }
                _ => None,
            };
            if let Some(expected) = expected {
                if (debits, refunds) != expected {
                    let state = state.map(|s| s.as_str()).unwrap_or("?");
                    withdrawals_check.violation(format!(
                        "order {order_id} is {state} with {debits} debits and {refunds} refunds"
                    ));
                }
            }
            // Amounts, not only counts: the debit is the order's amount, a refund the debit.
            if let Some(request) = replay.order.request.as_ref() {
                let amount = request.amount.as_u64() as u128;
                if debits == 1 && replay.debited_total != amount {
                    withdrawals_check.violation(format!(
                        "order {order_id} of {amount} fen: the wallet debited {} fen",
                        replay.debited_total
                    ));
                }
                if refunds == 1 && replay.refunded_total != replay.debited_total {
                    withdrawals_check.violation(format!(
                        "order {order_id}: debited {} fen, refunded {} fen",
                        replay.debited_total, replay.refunded_total
                    ));
                }
            }
            let debited = replay.debited.as_u64() as u128;
            match state {
                Some(OrderState::Succeeded) => paid += debited,
                Some(OrderState::Refunded) => {}
                _ if debits > refunds => {
                    in_transit += debited;
                    open += 1;
                }
                _ => {}
            }
            if let (Some(request), Some(_)) = (replay.order.request.as_ref(), channels) {
                channels_check.checked += 1;
                let channel_paid = channel_paid.contains(order_id);
                let final_state = replay.order.is_final();
                if final_state && channel_paid != (state == Some(OrderState::Succeeded)) {
                    channels_check.violation(format!(
                        "order {order_id} is {} but the {} statement says {}",
                        state.map(|s| s.as_str()).unwrap_or("?"),
                        request.method.channel,
                        if channel_paid { "paid" } else { "not paid" }
                    ));
                }
            }
        }
        withdrawals_check.notes.push(format!(
            "{open} orders in progress, {in_transit} fen in transit, {paid} fen paid out"
        ));
        if channels.is_none() {
            channels_check
                .notes
                .push("no channel statements in this data directory".into());
        }

        // Packets.
        let mut escrow = 0u128;
        let mut untransferred = 0u64;
        let mut overdue: Vec<&str> = Vec::new();
        for (id, replay) in &self.packets {
            packets_check.checked += 1;
            if self.merged && replay.overdrawn() {
                packets_check.violation(format!(
                    "packet {id} paid out {} from an escrow that received {}",
                    replay.transferred + replay.refunded_to_wallet + replay.returned_to_budget,
                    replay.paid
                ));
            }
            let (in_escrow, waiting) = check_packet(id, replay, &mut packets_check);
            escrow += in_escrow;
            untransferred += waiting;
            // Not a violation (the server may have been down at the deadline: the expiry flow
            // refunds within a tick of the next start), but money an auditor should see.
            let p = &replay.packet;
            let past_due = p.spec.as_ref().is_some_and(|spec| {
                spec.expires_at_ms.saturating_add(REFUND_OVERDUE_AFTER_MS) < self.last_at_ms
            });
            if past_due && p.refunded.is_none() && in_escrow > 0 {
                overdue.push(id);
            }
        }
        packets_check.notes.push(format!(
            "{escrow} fen in escrow by the packets' own records, {untransferred} claimed shares not yet transferred"
        ));
        if !overdue.is_empty() {
            overdue.sort_unstable();
            packets_check.notes.push(format!(
                "{} packets past their deadline by over {} s of the log's clock still hold their remainder (refund due): {}",
                overdue.len(),
                REFUND_OVERDUE_AFTER_MS / 1000,
                overdue.iter().take(VIOLATIONS_LISTED_MAX).copied().collect::<Vec<_>>().join(", ")
            ));
        }

        // Conservation.
        conservation.checked = self.wallets.len() as u64;
        let balances: u128 = self
            .wallets
            .values()
            .flat_map(|w| w.balances.values())
            .map(|b| b.as_u64() as u128)
            .sum();
        let inflow = self.deposits
            + self.reward_credits
            + self.withdrawal_refunds
            + self.claim_transfers
            + self.packet_refunds;
        let expected = inflow.checked_sub(self.withdrawal_debits + self.packet_payments);
        if expected != Some(balances) {
            conservation.violation(format!(
                "balances {balances} != deposits {} + reward credits {} - withdrawals {} + withdrawal refunds {} - packet payments {} + claim transfers {} + packet refunds {}",
                self.deposits,
                self.reward_credits,
                self.withdrawal_debits,
                self.withdrawal_refunds,
                self.packet_payments,
                self.claim_transfers,
                self.packet_refunds
            ));
        }
        if self.withdrawal_debits.checked_sub(self.withdrawal_refunds) != Some(paid + in_transit) {
            conservation.violation(format!(
                "withdrawals {} - refunds {} != paid {paid} + in transit {in_transit}",
                self.withdrawal_debits, self.withdrawal_refunds
            ));
        }
        if self.packet_payments
            != self.claim_transfers + self.packet_refunds + self.budget_returns + escrow
        {
            conservation.violation(format!(
                "packet payments {} != claim transfers {} + refunds {} + returned to budgets {} + escrow {escrow}",
                self.packet_payments, self.claim_transfers, self.packet_refunds, self.budget_returns
            ));
        }
        conservation.notes.push(format!(
            "deposits {} + reward credits {} = balances {balances} + paid out {paid} + in transit {in_transit} + packet escrow {escrow} + returned to budgets {} (fen)",
            self.deposits, self.reward_credits, self.budget_returns
        ));
        let mut checks = vec![chain];
        checks.extend(self.placement.clone());
        checks.extend([
            wallets_check,
            conservation,
            rewards_check,
            budgets_check,
            withdrawals_check,
            channels_check,
            packets_check,
            self.coupons.finish(),
        ]);
        checks
    }
}

/// The end-of-log checks of one packet (P11): money in = total once paid; every transfer is
/// its claimer's drawn share, once; what went back is what the packet recorded, and claimed +
/// refunded = total when it is finished; a finished packet whose shares are all transferred
/// holds nothing. Returns what the packet's own records say is still in escrow (claimed shares
/// not transferred yet, and the remainder until it is refunded), computed without the money
/// totals, so that the conservation line `payments = transfers + refunds + returns + escrow`
/// compares two independent accounts; and the number of shares waiting for their transfer.
fn check_packet(id: &str, replay: &PacketReplay, check: &mut CheckResult) -> (u128, u64) {
    let p = &replay.packet;
    let Some(spec) = p.spec.as_ref() else {
        check.violation(format!(
            "packet {id}: money moved for a packet never created"
        ));
        return (0, 0);
    };
    let total = spec.total.as_u64() as u128;
    let given_back = replay.refunded_to_wallet + replay.returned_to_budget;
    // Money in: all of the total once the packet is paid. A pending packet may hold its
    // payment between the pay flow's two steps (debit, then mark paid); an expired packet that
    // was never paid may hold nothing: that money would belong to no one.
    let paid_on_packet = p.payment_id.is_some();
    let landing = p.state == Some(PacketState::PendingPayment) && replay.paid == total;
    if paid_on_packet && replay.paid != total {
        check.violation(format!(
            "packet {id}: total {total} but {} paid into escrow",
            replay.paid
        ));
    } else if !paid_on_packet && !landing && replay.paid > 0 {
        check.violation(format!(
            "packet {id}: {} fen reached escrow but the packet is {} without a payment",
            replay.paid,
            p.state.map(PacketState::as_str).unwrap_or("?")
        ));
    }
    // Claims: the n-th claim takes the n-th drawn share, for exactly its amount.
    for (n, claim) in p.claims.iter().enumerate() {
        let share = p.shares.get(claim.index as usize);
        if claim.index as usize != n || share != Some(&claim.amount) {
            check.violation(format!(
                "packet {id}: claim {n} by {} takes share {} for {} fen, the drawn share is {}",
                claim.uid,
                claim.index,
                claim.amount.as_u64(),
                share.map_or("none".to_owned(), |s| format!("{} fen", s.as_u64()))
            ));
        }
    }
    // Transfers: to a claimer, its drawn share, once.
    let mut transferred_shares = 0u128;
    for (uid, &(count, amount)) in &replay.transfers {
        let share = Id::parse(uid)
            .ok()
            .and_then(|u| p.claimed_by.get(&u).copied())
            .and_then(|index| p.shares.get(index as usize))
            .map(|share| share.as_u64() as u128);
        match share {
            None => check.violation(format!(
                "packet {id}: {amount} fen transferred to {uid}, who claimed no share"
            )),
            Some(share) if count != 1 || amount != share => check.violation(format!(
                "packet {id}: {uid} drew {share} fen but got {count} transfers of {amount} fen in all"
            )),
            Some(share) => transferred_shares += share,
        }
    }
    let claimed: u128 = p.claims.iter().map(|c| c.amount.as_u64() as u128).sum();
    let waiting = p
        .claims
        .iter()
        .filter(|c| !replay.transfers.contains_key(c.uid.as_str()))
        .count() as u64;
    // Refunds: what went back is what the packet recorded; the money may go back a moment
    // before the packet records it (expiry between its two steps), never otherwise.
    let remainder = total.saturating_sub(claimed);
    let refunded = match p.refunded {
        Some(recorded) => {
            let recorded = recorded.as_u64() as u128;
            if given_back != recorded {
                check.violation(format!(
                    "packet {id}: refunded {recorded} on the packet, {given_back} given back"
                ));
            }
            if paid_on_packet && claimed + recorded != total {
                check.violation(format!(
                    "packet {id}: claimed {claimed} + refunded {recorded} != total {total}"
                ));
            }
            recorded
        }
        None if given_back == 0 => 0,
        None if p.state == Some(PacketState::Expired) && given_back == remainder => given_back,
        None => {
            check.violation(format!(
                "packet {id}: {given_back} fen given back, but the packet is {} with {remainder} fen unclaimed and records no refund",
                p.state.map(PacketState::as_str).unwrap_or("?")
            ));
            0
        }
    };
    if claimed + refunded > total {
        check.violation(format!(
            "packet {id}: claimed {claimed} + refunded {refunded} > total {total}"
        ));
    }
    // Finished, every share transferred: escrow is empty (the money side says so).
    let finished = p.state == Some(PacketState::Exhausted) || p.refunded.is_some();
    let left = replay.paid as i128 - (replay.transferred + given_back) as i128;
    if finished && waiting == 0 && left != 0 {
        check.violation(format!(
            "packet {id}: finished with every share transferred, but {left} fen left in escrow"
        ));
    }
    let in_escrow = if paid_on_packet || landing {
        total.saturating_sub(transferred_shares + refunded)
    } else {
        0
    };
    (in_escrow, waiting)
}

/// Audits the log in `store`; `channels` are the payment channels' own statements, when the data
/// directory has them. `progress(done, total)` is called as records are replayed.
pub fn audit(
    store: &dyn crate::events::Log,
    channels: Option<&SimulatedChannels>,
    mut progress: impl FnMut(u64, u64),
) -> Result<AuditReport, StoreError> {
    let head = store.head();
    let mut auditor = Auditor::new();
    let events = replay(
        store,
        "",
        &mut auditor,
        u64::MAX,
        |_| true,
        |_, _| {},
        |done| progress(done, head),
    )?;
    progress(events, head);
    Ok(AuditReport {
        events,
        checks: auditor.finish(channels),
    })
}

/// Audits several logs as one set of books: a cluster's partitions, each `(name, log)`,
/// between which money moves (a packet's escrow in one partition, its sender's and claimers'
/// wallets in others). Each log's chain is checked on its own; the checks across entities run
/// over all of them. The logs carry no common order, so the replay takes the causal one of the
/// flows: every log's business events first (activities, packets, withdrawals, coupons, order
/// ids), then every log's wallet movements, which follow from them (a reward is credited after
/// it is accepted, a share transferred after it is claimed); the checks that compare a
/// movement with a decision therefore see the decision, and a packet's escrow is checked once
/// every movement is in (`escrow never overdrawn` at the end rather than after each one).
/// Each log is read twice, up to the head found on the first read.
///
/// `home(stream)` is the index in `logs` of the log the deployment files `stream` in: a record
/// found in another log is named (`placement`), since the nodes would never read it there.
/// `channels` are the fleet's channel statements (a local copy), judged as on one node.
pub fn audit_logs(
    logs: &[(String, &dyn crate::events::Log)],
    home: impl Fn(&str) -> usize,
    channels: Option<&SimulatedChannels>,
    mut progress: impl FnMut(u64, u64),
) -> Result<AuditReport, StoreError> {
    let total: u64 = logs.iter().map(|(_, log)| log.head()).sum::<u64>() * 2;
    let mut auditor = Auditor::new();
    auditor.merged = true;
    auditor.placement = Some(CheckResult::new(
        "placement",
        "every record in the partition the deployment's map gives its stream",
    ));
    let is_wallet = |e: &Envelope| matches!(e.event, Event::Wallet(_));
    let (mut events, mut done) = (0u64, 0u64);
    let mut heads = Vec::with_capacity(logs.len());
    for (index, (name, log)) in logs.iter().enumerate() {
        let placed = |auditor: &mut Auditor, e: &Envelope| {
            let Some(check) = auditor.placement.as_mut() else {
                return;
            };
            check.checked += 1;
            let expected = home(&e.stream);
            if expected != index {
                let filed = logs
                    .get(expected)
                    .map_or("no partition", |(n, _)| n.as_str());
                check.violation(format!(
                    "{name} seq {}: {} belongs in {filed}",
                    e.seq, e.stream
                ));
            }
        };
        let read = replay(
            *log,
            name,
            &mut auditor,
            u64::MAX,
            |e| !is_wallet(e),
            placed,
            |n| progress(done + n, total),
        )?;
        heads.push(read);
        events += read;
        done += read;
    }
    // The second read checks nothing of the chain (the first did, up to the same head).
    let chain = auditor.chain.clone();
    for ((name, log), head) in logs.iter().zip(heads) {
        done += replay(
            *log,
            name,
            &mut auditor,
            head,
            is_wallet,
            |_, _| {},
            |n| progress(done + n, total),
        )?;
    }
    auditor.chain = chain;
    progress(total, total);
    Ok(AuditReport {
        events,
        checks: auditor.finish(channels),
    })
}

/// Reads `store` from seq 1 to `until` (or its end), checks each record's place in the chain
/// (a break named with `name`), shows every record to `each`, and observes the records
/// `wanted` says; returns how many records were read.
fn replay(
    store: &dyn crate::events::Log,
    name: &str,
    auditor: &mut Auditor,
    until: u64,
    wanted: impl Fn(&Envelope) -> bool,
    mut each: impl FnMut(&mut Auditor, &Envelope),
    mut progress: impl FnMut(u64),
) -> Result<u64, StoreError> {
    let mut events = 0u64;
    // Three stages on three threads: reading records (the store's iteration); checking each
    // one's hash link and decoding it; replaying them. The two first were one thread, the
    // slowest stage; split, the machine's cores share the work.
    let (raw_tx, raw_rx) = std::sync::mpsc::sync_channel::<Read>(READ_AHEAD_BATCHES);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Verified>(READ_AHEAD_BATCHES);
    let read = std::thread::scope(|scope| {
        let reader = scope.spawn(move || read_raw(store, until, raw_tx));
        scope.spawn(move || verify(raw_rx, tx));
        for batch in rx {
            for envelope in batch.records {
                auditor.chain.checked += 1;
                each(auditor, &envelope);
                if wanted(&envelope) {
                    auditor.check_version(&envelope);
                    auditor.observe(&envelope);
                }
                events += 1;
                if events.is_multiple_of(65_536) {
                    progress(events);
                }
            }
            if let Some(why) = batch.broken {
                auditor.chain.checked += 1;
                auditor.chain.violation(if name.is_empty() {
                    why
                } else {
                    format!("{name}: {why}")
                });
            }
        }
        reader.join()
    });
    read.map_err(|_| StoreError::Io("the log reader panicked".into()))??;
    Ok(events)
}

/// Batches of records the reader hands to the replay, at most this many waiting.
const READ_AHEAD_BATCHES: usize = 16;
const READ_BATCH_RECORDS: usize = 1024;

/// Records whose place in the chain is proven, in order; then, if the chain ends there, why
/// (everything after a broken link is unproven: the replay stops).
#[derive(Default)]
struct Verified {
    records: Vec<Envelope>,
    broken: Option<String>,
}

/// Records as read, in order; then, if the sequence breaks there, why.
#[derive(Default)]
struct Read {
    records: Vec<RawRecord>,
    broken: Option<String>,
}

/// Reads the log from seq 1 to `until`, checks that the sequence has no gap, and sends batches;
/// stops after the first gap.
fn read_raw(
    store: &dyn crate::events::Log,
    until: u64,
    tx: std::sync::mpsc::SyncSender<Read>,
) -> Result<(), StoreError> {
    let mut batch = Read::default();
    for (expected_seq, record) in (1u64..=until).zip(store.stored_records(1)) {
        let record = record?;
        if record.seq != expected_seq {
            batch.broken = Some(format!(
                "sequence gap: expected seq {expected_seq}, found {}",
                record.seq
            ));
            let _ = tx.send(batch);
            return Ok(());
        }
        batch.records.push(record);
        if batch.records.len() == READ_BATCH_RECORDS {
            let full = std::mem::replace(
                &mut batch,
                Read {
                    records: Vec::with_capacity(READ_BATCH_RECORDS),
                    broken: None,
                },
            );
            if tx.send(full).is_err() {
                return Ok(());
            }
        }
    }
    let _ = tx.send(batch);
    Ok(())
}

/// Checks each record's hash link to the one before it (from the genesis hash) and decodes it,
/// in order; sends the proven records and stops after the first break (a link, a record that
/// does not decode, or the reader's sequence gap).
fn verify(rx: std::sync::mpsc::Receiver<Read>, tx: std::sync::mpsc::SyncSender<Verified>) {
    let mut prev_hash = GENESIS_HASH;
    for read in rx {
        let mut batch = Verified {
            records: Vec::with_capacity(read.records.len()),
            broken: None,
        };
        for record in &read.records {
            let (seq, stored) = (record.seq, &record.stored);
            let checked = check_link(&prev_hash, stored)
                .map_err(|e| format!("seq {seq}: {e}"))
                .and_then(|hash| {
                    prev_hash = hash;
                    Envelope::decode_stored(stored)
                        .map_err(|e| format!("seq {seq} does not decode: {e}"))
                });
            match checked {
                Ok(envelope) => batch.records.push(envelope),
                Err(why) => {
                    batch.broken = Some(why);
                    let _ = tx.send(batch);
                    return;
                }
            }
        }
        batch.broken = read.broken;
        let stop = batch.broken.is_some();
        if tx.send(batch).is_err() || stop {
            return;
        }
    }
}
