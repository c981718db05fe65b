//! The activity aggregate: a campaign activity's budgets and the rewards accepted against them.
//!
//! The activity is the intake of rewards: `Accept` checks idempotency and the remaining budget
//! and records `RewardAccepted`, one event per reward, in the activity's stream. Budget and
//! acceptance live in one aggregate so that "accepted never exceeds budget" is a local rule
//! checked by one actor, in order, with no cross-actor protocol; the actor's pipelined
//! persistence lets one flush serve every reward of a journal batch, so the budget does not cap
//! intake at one flush per reward.
//!
//! Rules (all in [`Activity::decide`]):
//! - an order id is accepted once per activity; the same payload again replays the original
//!   outcome, another payload is [`ActivityError::IdempotencyConflict`];
//! - cash and subsidy rewards consume the activity's budget of their kind:
//!   `accepted + amount <= budget`, else [`ActivityError::BudgetExhausted`]; an activity without
//!   a budget accepts without limit unless the caller requires budgets (`--require-budgets`);
//! - a budget may be raised, never lowered below what is already accepted;
//! - a reward that is not money (coupon, item) ends once, delivered or failed (a refused coupon
//!   issuance: whatever budget it took is returned); a reward is voided once (its budget is
//!   returned), only while it is neither delivered, failed nor credited elsewhere.
//!
//! **Budget slices** (a cluster's intake shards, docs/ARCHITECTURE.md "Budget slices"): one
//! activity's rewards may be accepted by `shards` intake shards, each an `Activity` of its own
//! (entity `cny@3`, [`shard_entity`]), so that a hot activity's intake is not one actor on one
//! node. The activity grants each shard slices of its budget ([`ActivityCommand::Grant`]); a
//! shard accepts against what it received and has not released ([`ActivityCommand::AcceptInSlice`])
//! and gives its unused slice back when recalled ([`ActivityCommand::Release`],
//! [`ActivityCommand::TakeBack`]). Both directions carry *cumulative* totals, so a message lost
//! or repeated between the two partitions is delivered by the next one and never counted
//! twice: the activity grants again only what the shard has received, and takes back only up
//! to what the shard has released. What a shard accepts is bounded by what it received minus
//! what it released; what the activity granted minus what it took back is bounded by the
//! budget minus what it accepted itself: so accepted never exceeds the budget (the audit checks
//! each bound and the matching of the two sides).
//!
//! Idempotency memory is keyed by a 128-bit digest of the order id (collision odds ~1e-24 at
//! 100 million orders) and holds a 64-bit payload fingerprint: about 40 bytes per order instead
//! of the whole request.

use super::{Aggregate, Ctx, Decision, Event};
use crate::domain::wallet::{Entry, WalletCommand};
use crate::ids::Id;
use crate::money::Fen;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};

/// What a reward gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardKind {
    /// Money into the user's activity balance (withdrawable).
    Cash,
    /// Money into the user's subsidy balance (spendable on B2C packets).
    Subsidy,
    /// A coupon of `batch_id`, issued by the coupon lanes.
    Coupon,
    /// A physical or virtual item, delivered by its own lane.
    Item,
}

impl RewardKind {
    pub const ALL: [RewardKind; 4] = [
        RewardKind::Cash,
        RewardKind::Subsidy,
        RewardKind::Coupon,
        RewardKind::Item,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RewardKind::Cash => "cash",
            RewardKind::Subsidy => "subsidy",
            RewardKind::Coupon => "coupon",
            RewardKind::Item => "item",
        }
    }

    pub fn parse(text: &str) -> Option<RewardKind> {
        RewardKind::ALL.into_iter().find(|k| k.as_str() == text)
    }

    /// The wallet entry a money reward is credited with; `None` for coupons and items.
    pub fn wallet_entry(self) -> Option<Entry> {
        match self {
            RewardKind::Cash => Some(Entry::Reward),
            RewardKind::Subsidy => Some(Entry::SubsidyReward),
            RewardKind::Coupon | RewardKind::Item => None,
        }
    }
}

impl std::fmt::Display for RewardKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Most `ext` fields a reward may carry, and their sizes.
pub const EXT_FIELDS_MAX: usize = 16;
pub const EXT_KEY_CHARS_MAX: usize = 64;
pub const EXT_VALUE_CHARS_MAX: usize = 256;

/// A reward as requested and, once accepted, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reward {
    pub order_id: Id,
    pub uid: Id,
    pub scene: Id,
    pub kind: RewardKind,
    pub amount: Fen,
    pub device_id: Option<Id>,
    pub app_id: Option<Id>,
    /// The coupon batch of a coupon reward.
    pub batch_id: Option<Id>,
    pub ext: BTreeMap<String, String>,
}

pub(crate) fn digest(parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in parts {
        // Length-prefixed, so that field boundaries cannot shift.
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hasher.finalize().into()
}

/// 128-bit key of an order id in the idempotency memory.
pub fn order_key(order_id: &Id) -> u128 {
    let d = digest(&[order_id.as_str().as_bytes()]);
    u128::from_be_bytes(d[..16].try_into().expect("16 bytes"))
}

/// Separates an activity id from its intake shard's number in the shard's entity id (`cny@3`).
/// Not a character ids may hold, so no activity can be mistaken for a shard.
pub const SHARD_SEPARATOR: char = '@';

/// The entity id of intake shard `shard` of `activity` (its stream is `activity:cny@3`).
pub fn shard_entity(activity: &Id, shard: u32) -> String {
    format!("{activity}{SHARD_SEPARATOR}{shard}")
}

/// The intake shard that accepts `order_id` among `shards` (stable: a retry finds the same).
pub fn intake_shard_of(order_id: &Id, shards: u32) -> u32 {
    (order_key(order_id) % u128::from(shards.max(1))) as u32
}

/// The activity of an activity stream (`activity:cny` or its intake shard `activity:cny@3`)
/// and the shard's number. `None` for any other stream.
pub fn activity_of_stream(stream: &str) -> Option<(Id, Option<u32>)> {
    let rest = stream.strip_prefix("activity:")?;
    match rest.split_once(SHARD_SEPARATOR) {
        None => Some((Id::parse(rest).ok()?, None)),
        Some((activity, shard)) => Some((Id::parse(activity).ok()?, Some(shard.parse().ok()?))),
    }
}

impl Reward {
    /// 64-bit fingerprint of everything but the order id: "same payload" means equal
    /// fingerprints.
    pub fn fingerprint(&self) -> u64 {
        let opt = |o: &Option<Id>| {
            o.as_ref()
                .map(|i| i.as_str().to_owned())
                .unwrap_or_default()
        };
        let ext: Vec<u8> = self
            .ext
            .iter()
            .flat_map(|(k, v)| [k.as_bytes(), b"\0", v.as_bytes(), b"\0"].concat())
            .collect();
        let d = digest(&[
            self.uid.as_str().as_bytes(),
            self.scene.as_str().as_bytes(),
            self.kind.as_str().as_bytes(),
            &self.amount.as_u64().to_be_bytes(),
            opt(&self.device_id).as_bytes(),
            opt(&self.app_id).as_bytes(),
            opt(&self.batch_id).as_bytes(),
            &ext,
        ]);
        u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
    }
}

/// What a reward token carries: enough to credit the reward without a lookup, bound together
/// by the token's signature (see `crate::tokens`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RewardClaim {
    pub activity_id: Id,
    pub order_id: Id,
    pub uid: Id,
    pub kind: RewardKind,
    pub amount: Fen,
}

impl RewardClaim {
    pub fn of(activity_id: &Id, reward: &Reward) -> RewardClaim {
        RewardClaim {
            activity_id: activity_id.clone(),
            order_id: reward.order_id.clone(),
            uid: reward.uid.clone(),
            kind: reward.kind,
            amount: reward.amount,
        }
    }

    /// The wallet command that credits this reward. The crediting lanes and force-credit both
    /// use it, so both paths send the identical, idempotent command: whichever comes second is
    /// a replay. `None` for coupons and items (no money).
    pub fn credit_command(&self) -> Option<WalletCommand> {
        Some(WalletCommand::Credit {
            entry: self.kind.wallet_entry()?,
            order_id: self.order_id.clone(),
            amount: self.amount,
            source: Some(self.activity_id.clone()),
        })
    }
}

/// Why a reward that is not money could not be delivered (its budget, if any, returned).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailReason {
    /// The coupon flow refused the reward's issuance request (sold out, user limit, group,
    /// risk, unknown or closed batch): final, the request is never issued.
    CouponRefused(crate::domain::coupon::Refusal),
}

impl FailReason {
    /// The reason as answered by `GET /v1/rewards/{order_id}`.
    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::CouponRefused(refusal) => refusal.as_str(),
        }
    }
}

/// Why an accepted reward was voided (its budget returned).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VoidReason {
    /// The order id had already been credited from another activity: order ids are globally
    /// unique by contract, and a reuse must not consume a second budget.
    DuplicateOrderId,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budgets {
    pub cash: Fen,
    pub subsidy: Fen,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActivityCommand {
    /// Sets the budget totals (raising is allowed, lowering below what is accepted is not).
    SetBudget(Budgets),
    Accept {
        reward: Reward,
        require_budget: bool,
    },
    /// The item lane delivered an item reward, or the coupon flow issued a coupon reward's
    /// coupon (`uid` as in the accepted reward, so that views can settle it without a lookup).
    MarkDelivered { order_id: Id, uid: Id },
    Void {
        order_id: Id,
        uid: Id,
        reason: VoidReason,
    },
    /// Money that left a budget comes back unspent (an expired B2C packet's remainder),
    /// once per `order_id` (the packet id).
    ReturnBudget {
        order_id: Id,
        kind: RewardKind,
        amount: Fen,
    },
    /// A reward that is not money (coupon, item) can never be delivered: it ends failed, once,
    /// and whatever budget it took is returned.
    MarkFailed {
        order_id: Id,
        uid: Id,
        reason: FailReason,
    },
    /// An intake shard accepts a reward against its slice (money kinds), or without one
    /// (coupon, item: they take no budget). Short of slice: [`ActivityError::SliceShort`].
    /// `received`: a granted cumulative total to record first, in the same decision (as
    /// `Receive`; zero: none), so that the reward that asked for a slice is accepted from it
    /// before any other reward can take it.
    AcceptInSlice { reward: Reward, received: Fen },
    /// The activity grants intake shard `shard` (of `shards`) a slice of its `kind` budget. The
    /// shard says what it has `received` so far: while that is less than what was granted, the
    /// answer is the granted total again (a grant in transit), nothing new. Otherwise a new
    /// slice of at least `need`, about `want` (less when the budget runs low), or
    /// [`ActivityReply::Short`] when less than `need` is left unallocated.
    Grant {
        shard: u32,
        shards: u32,
        kind: RewardKind,
        received: Fen,
        need: Fen,
        want: Fen,
        require_budget: bool,
    },
    /// The shard records what the activity granted it, as the granted cumulative `total`
    /// (only the part above what it already received counts). `total` zero reads the holding.
    Receive { kind: RewardKind, total: Fen },
    /// The shard gives back its unused slice; the answer is its cumulative released total.
    Release { kind: RewardKind },
    /// The activity takes back what shard `shard` released, as the cumulative `total`.
    TakeBack {
        shard: u32,
        kind: RewardKind,
        total: Fen,
    },
    /// Budget, accepted money and the number of rewards (no event).
    Books,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActivityEvent {
    BudgetSet(Budgets),
    RewardAccepted(Reward),
    RewardDelivered {
        order_id: Id,
        uid: Id,
    },
    RewardVoided {
        order_id: Id,
        uid: Id,
        kind: RewardKind,
        amount: Fen,
        reason: VoidReason,
    },
    BudgetReturned {
        order_id: Id,
        kind: RewardKind,
        amount: Fen,
    },
    /// Appended in issue 11: a coupon or item reward that can never be delivered. `kind` and
    /// `amount` are those accepted, so that views and the audit return the budget it took
    /// without a lookup.
    RewardFailed {
        order_id: Id,
        uid: Id,
        kind: RewardKind,
        amount: Fen,
        reason: FailReason,
    },
    /// Appended in issue 13 (budget slices), in the activity's stream: `amount` of the `kind`
    /// budget granted to intake shard `shard`.
    SliceGranted {
        shard: u32,
        kind: RewardKind,
        amount: Fen,
    },
    /// In a shard's stream: the part of the activity's grants it had not received yet.
    SliceReceived {
        kind: RewardKind,
        amount: Fen,
    },
    /// In a shard's stream: its unused slice given back.
    SliceReleased {
        kind: RewardKind,
        amount: Fen,
    },
    /// In the activity's stream: what shard `shard` released, back in the budget.
    SliceTakenBack {
        shard: u32,
        kind: RewardKind,
        amount: Fen,
    },
}

impl ActivityEvent {
    pub fn type_name(&self) -> &'static str {
        match self {
            ActivityEvent::BudgetSet(_) => "activity.budget_set",
            ActivityEvent::RewardAccepted(_) => "activity.reward_accepted",
            ActivityEvent::RewardDelivered { .. } => "activity.reward_delivered",
            ActivityEvent::RewardVoided { .. } => "activity.reward_voided",
            ActivityEvent::BudgetReturned { .. } => "activity.budget_returned",
            ActivityEvent::RewardFailed { .. } => "activity.reward_failed",
            ActivityEvent::SliceGranted { .. } => "activity.slice_granted",
            ActivityEvent::SliceReceived { .. } => "activity.slice_received",
            ActivityEvent::SliceReleased { .. } => "activity.slice_released",
            ActivityEvent::SliceTakenBack { .. } => "activity.slice_taken_back",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActivityReply {
    Budget {
        budget: Option<Budgets>,
        accepted: Budgets,
    },
    /// `replayed`: the original outcome of an identical earlier request.
    Accepted {
        replayed: bool,
    },
    Delivered,
    Voided,
    Failed,
    /// The shard's granted cumulative total (new or in transit).
    Granted {
        total: Fen,
    },
    /// Less than `need` is unallocated (`unallocated` of it); nothing is in transit.
    Short {
        total: Fen,
        unallocated: Fen,
    },
    /// The shard's holding after a `Receive`.
    Received {
        received: Fen,
        available: Fen,
    },
    /// The shard's cumulative released total, and what this command released.
    Released {
        total: Fen,
        now: Fen,
    },
    TakenBack,
    Books {
        budget: Option<Budgets>,
        accepted: Budgets,
        rewards: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ActivityError {
    #[error("order {order_id} was already accepted with a different payload")]
    IdempotencyConflict { order_id: Id },
    #[error("the {kind} budget has {remaining} left, {requested} requested")]
    BudgetExhausted {
        kind: RewardKind,
        remaining: Fen,
        requested: Fen,
    },
    #[error("this activity has no budget and budgets are required")]
    BudgetNotSet,
    #[error("the {kind} budget cannot go below the {accepted} already accepted")]
    BudgetBelowAccepted {
        kind: RewardKind,
        accepted: Fen,
        requested: Fen,
    },
    #[error("no accepted reward with order id {order_id}")]
    UnknownOrder { order_id: Id },
    #[error("order {order_id} is not in a state that allows this")]
    WrongState { order_id: Id },
    #[error("the accepted total would overflow")]
    Overflow,
    #[error("amount must be positive")]
    ZeroAmount,
    /// An intake shard has `available` of `kind` left in its slice, less than the reward.
    #[error("the intake shard holds {available} of {kind}, less than the reward")]
    SliceShort {
        kind: RewardKind,
        received: Fen,
        available: Fen,
    },
    /// A slice message that contradicts the books (more received or released than granted):
    /// a defect, never acted on.
    #[error("slice books disagree: {reason}")]
    SliceMismatch { reason: String },
    #[error("{kind} rewards have no budget to slice")]
    NotMoney { kind: RewardKind },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderState {
    Accepted,
    Delivered,
    Voided,
    /// Appended in issue 11 (snapshots encode the variant index).
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderMemo {
    pub fingerprint: u64,
    pub kind: RewardKind,
    pub amount: Fen,
    pub state: OrderState,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activity {
    pub budget: Option<Budgets>,
    /// Accepted money per kind, net of voided rewards and returned budget.
    pub accepted: Budgets,
    pub orders: HashMap<u128, OrderMemo>,
    /// Digests of the order ids whose money came back (`ReturnBudget`).
    pub returned: std::collections::HashSet<u128>,
    /// The activity's side of budget slices: per intake shard and kind, granted and taken back.
    pub slices: BTreeMap<(u32, RewardKind), SliceBooks>,
    /// An intake shard's side: per kind, received from the activity and released back.
    pub holding: BTreeMap<RewardKind, Holding>,
}

/// What the activity granted one intake shard of one kind, and took back (cumulative).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceBooks {
    pub granted: Fen,
    pub taken_back: Fen,
}

/// What an intake shard received of one kind, and released (cumulative).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holding {
    pub received: Fen,
    pub released: Fen,
}

fn saturating_add(a: Fen, b: Fen) -> Fen {
    a.checked_add(b).unwrap_or(Fen::new(u64::MAX))
}

fn saturating_sub(a: Fen, b: Fen) -> Fen {
    a.checked_sub(b).unwrap_or(Fen::ZERO)
}

impl Activity {
    fn accepted_of(&self, kind: RewardKind) -> Fen {
        match kind {
            RewardKind::Cash => self.accepted.cash,
            RewardKind::Subsidy => self.accepted.subsidy,
            RewardKind::Coupon | RewardKind::Item => Fen::ZERO,
        }
    }

    fn accepted_mut(&mut self, kind: RewardKind) -> Option<&mut Fen> {
        match kind {
            RewardKind::Cash => Some(&mut self.accepted.cash),
            RewardKind::Subsidy => Some(&mut self.accepted.subsidy),
            RewardKind::Coupon | RewardKind::Item => None,
        }
    }

    /// Remaining budget of a money kind (`None`: unlimited).
    pub fn remaining(&self, kind: RewardKind) -> Option<Fen> {
        let budget = self.budget?;
        let total = match kind {
            RewardKind::Cash => budget.cash,
            RewardKind::Subsidy => budget.subsidy,
            RewardKind::Coupon | RewardKind::Item => return None,
        };
        Some(saturating_sub(
            saturating_sub(total, self.accepted_of(kind)),
            self.outstanding(kind),
        ))
    }

    /// Granted to intake shards and not taken back, of `kind`.
    pub fn outstanding(&self, kind: RewardKind) -> Fen {
        self.slices
            .iter()
            .filter(|((_, k), _)| *k == kind)
            .fold(Fen::ZERO, |sum, (_, books)| {
                saturating_add(sum, saturating_sub(books.granted, books.taken_back))
            })
    }

    /// What an intake shard may still accept of `kind`: received, minus released, minus
    /// accepted.
    pub fn available(&self, kind: RewardKind) -> Fen {
        let holding = self.holding.get(&kind).copied().unwrap_or_default();
        saturating_sub(
            saturating_sub(holding.received, holding.released),
            self.accepted_of(kind),
        )
    }

    /// A reward answered before any budget is looked at: a zero amount, or an already known
    /// order id (the original outcome again, or a conflict).
    fn answered(
        &self,
        reward: &Reward,
    ) -> Option<Result<Decision<ActivityEvent, ActivityReply>, ActivityError>> {
        if reward.amount.is_zero() {
            return Some(Err(ActivityError::ZeroAmount));
        }
        let memo = self.order(&reward.order_id)?;
        Some(if memo.fingerprint == reward.fingerprint() {
            Ok(Decision::Reply(ActivityReply::Accepted { replayed: true }))
        } else {
            Err(ActivityError::IdempotencyConflict {
                order_id: reward.order_id.clone(),
            })
        })
    }

    fn accept_in_slice(
        &self,
        reward: &Reward,
        received: Fen,
    ) -> Result<Decision<ActivityEvent, ActivityReply>, ActivityError> {
        if let Some(answered) = self.answered(reward) {
            return answered;
        }
        let mut events = Vec::with_capacity(2);
        if reward.kind.wallet_entry().is_some() {
            self.accepted_of(reward.kind)
                .checked_add(reward.amount)
                .map_err(|_| ActivityError::Overflow)?;
            let holding = self.holding.get(&reward.kind).copied().unwrap_or_default();
            let mut available = self.available(reward.kind);
            if received > holding.received {
                let amount = saturating_sub(received, holding.received);
                available = saturating_add(available, amount);
                events.push(ActivityEvent::SliceReceived {
                    kind: reward.kind,
                    amount,
                });
            }
            if reward.amount > available {
                // Nothing recorded, the receipt included: the grant stays in transit and is
                // delivered again by the activity at the next ask.
                return Err(ActivityError::SliceShort {
                    kind: reward.kind,
                    received: holding.received,
                    available: self.available(reward.kind),
                });
            }
        }
        events.push(ActivityEvent::RewardAccepted(reward.clone()));
        Ok(Decision::Emit(
            events,
            ActivityReply::Accepted { replayed: false },
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn grant(
        &self,
        shard: u32,
        shards: u32,
        kind: RewardKind,
        received: Fen,
        need: Fen,
        want: Fen,
        require_budget: bool,
    ) -> Result<Decision<ActivityEvent, ActivityReply>, ActivityError> {
        if kind.wallet_entry().is_none() {
            return Err(ActivityError::NotMoney { kind });
        }
        if need.is_zero() {
            return Err(ActivityError::ZeroAmount);
        }
        let books = self.slices.get(&(shard, kind)).copied().unwrap_or_default();
        if received > books.granted {
            return Err(ActivityError::SliceMismatch {
                reason: format!(
                    "shard {shard} says it received {received} of {kind}, {} was granted",
                    books.granted
                ),
            });
        }
        if received < books.granted {
            // A grant in transit: delivered again, nothing new.
            return Ok(Decision::Reply(ActivityReply::Granted {
                total: books.granted,
            }));
        }
        let amount = match self.remaining(kind) {
            None if require_budget => return Err(ActivityError::BudgetNotSet),
            None => need.max(want),
            Some(free) if free < need => {
                return Ok(Decision::Reply(ActivityReply::Short {
                    total: books.granted,
                    unallocated: free,
                }))
            }
            // A fair part of what is left, so that one shard cannot hold it all at the end.
            Some(free) => {
                let part = Fen::new(free.as_u64() / (2 * u64::from(shards.max(1))));
                free.min(need.max(want.min(part)))
            }
        };
        let total = books
            .granted
            .checked_add(amount)
            .map_err(|_| ActivityError::Overflow)?;
        Ok(Decision::Emit(
            vec![ActivityEvent::SliceGranted {
                shard,
                kind,
                amount,
            }],
            ActivityReply::Granted { total },
        ))
    }

    fn receive(
        &self,
        kind: RewardKind,
        total: Fen,
    ) -> Result<Decision<ActivityEvent, ActivityReply>, ActivityError> {
        let holding = self.holding.get(&kind).copied().unwrap_or_default();
        let available = self.available(kind);
        if total <= holding.received {
            return Ok(Decision::Reply(ActivityReply::Received {
                received: holding.received,
                available,
            }));
        }
        let amount = saturating_sub(total, holding.received);
        Ok(Decision::Emit(
            vec![ActivityEvent::SliceReceived { kind, amount }],
            ActivityReply::Received {
                received: total,
                available: saturating_add(available, amount),
            },
        ))
    }

    fn release(
        &self,
        kind: RewardKind,
    ) -> Result<Decision<ActivityEvent, ActivityReply>, ActivityError> {
        let holding = self.holding.get(&kind).copied().unwrap_or_default();
        let amount = self.available(kind);
        if amount.is_zero() {
            return Ok(Decision::Reply(ActivityReply::Released {
                total: holding.released,
                now: Fen::ZERO,
            }));
        }
        Ok(Decision::Emit(
            vec![ActivityEvent::SliceReleased { kind, amount }],
            ActivityReply::Released {
                total: saturating_add(holding.released, amount),
                now: amount,
            },
        ))
    }

    fn take_back(
        &self,
        shard: u32,
        kind: RewardKind,
        total: Fen,
    ) -> Result<Decision<ActivityEvent, ActivityReply>, ActivityError> {
        let books = self.slices.get(&(shard, kind)).copied().unwrap_or_default();
        if total > books.granted {
            return Err(ActivityError::SliceMismatch {
                reason: format!(
                    "shard {shard} says it released {total} of {kind}, {} was granted",
                    books.granted
                ),
            });
        }
        if total <= books.taken_back {
            return Ok(Decision::Reply(ActivityReply::TakenBack));
        }
        Ok(Decision::Emit(
            vec![ActivityEvent::SliceTakenBack {
                shard,
                kind,
                amount: saturating_sub(total, books.taken_back),
            }],
            ActivityReply::TakenBack,
        ))
    }

    pub fn order(&self, order_id: &Id) -> Option<&OrderMemo> {
        self.orders.get(&order_key(order_id))
    }

    fn accept(
        &self,
        reward: &Reward,
        require_budget: bool,
    ) -> Result<Decision<ActivityEvent, ActivityReply>, ActivityError> {
        if let Some(answered) = self.answered(reward) {
            return answered;
        }
        if reward.kind.wallet_entry().is_some() {
            self.accepted_of(reward.kind)
                .checked_add(reward.amount)
                .map_err(|_| ActivityError::Overflow)?;
            match self.remaining(reward.kind) {
                Some(remaining) if reward.amount > remaining => {
                    return Err(ActivityError::BudgetExhausted {
                        kind: reward.kind,
                        remaining,
                        requested: reward.amount,
                    })
                }
                None if require_budget => return Err(ActivityError::BudgetNotSet),
                _ => {}
            }
        }
        Ok(Decision::Emit(
            vec![ActivityEvent::RewardAccepted(reward.clone())],
            ActivityReply::Accepted { replayed: false },
        ))
    }

    /// Money that left a budget comes back (saturating: `evolve` never judges).
    fn give_back(&mut self, kind: RewardKind, amount: Fen) {
        if let Some(total) = self.accepted_mut(kind) {
            *total = total.checked_sub(amount).unwrap_or(Fen::ZERO);
        }
    }

    /// A reward that ends without its money spent (voided, failed): its budget back, its order
    /// settled as `state`.
    fn settle_unspent(&mut self, order_id: &Id, kind: RewardKind, amount: Fen, state: OrderState) {
        self.give_back(kind, amount);
        if let Some(memo) = self.orders.get_mut(&order_key(order_id)) {
            memo.state = state;
        }
    }

    fn budget_reply(&self) -> ActivityReply {
        ActivityReply::Budget {
            budget: self.budget,
            accepted: self.accepted,
        }
    }
}

impl Aggregate for Activity {
    type Command = ActivityCommand;
    type Event = ActivityEvent;
    type Reply = ActivityReply;
    type Error = ActivityError;

    const STREAM_PREFIX: &'static str = "activity";

    fn decide(
        &self,
        command: &ActivityCommand,
        _ctx: &Ctx,
    ) -> Result<Decision<ActivityEvent, ActivityReply>, ActivityError> {
        match command {
            ActivityCommand::SetBudget(budget) => {
                for (kind, requested) in [
                    (RewardKind::Cash, budget.cash),
                    (RewardKind::Subsidy, budget.subsidy),
                ] {
                    // Slices held by intake shards are spent as far as the budget knows.
                    let accepted = saturating_add(self.accepted_of(kind), self.outstanding(kind));
                    if requested < accepted {
                        return Err(ActivityError::BudgetBelowAccepted {
                            kind,
                            accepted,
                            requested,
                        });
                    }
                }
                if self.budget == Some(*budget) {
                    return Ok(Decision::Reply(self.budget_reply()));
                }
                let reply = ActivityReply::Budget {
                    budget: Some(*budget),
                    accepted: self.accepted,
                };
                Ok(Decision::Emit(
                    vec![ActivityEvent::BudgetSet(*budget)],
                    reply,
                ))
            }
            ActivityCommand::Accept {
                reward,
                require_budget,
            } => self.accept(reward, *require_budget),
            ActivityCommand::MarkDelivered { order_id, uid } => {
                let memo = self
                    .order(order_id)
                    .ok_or_else(|| ActivityError::UnknownOrder {
                        order_id: order_id.clone(),
                    })?;
                // Money rewards are settled by their wallet credit, never here.
                let delivered_here = memo.kind.wallet_entry().is_none();
                match (delivered_here, memo.state) {
                    (true, OrderState::Delivered) => Ok(Decision::Reply(ActivityReply::Delivered)),
                    (true, OrderState::Accepted) => Ok(Decision::Emit(
                        vec![ActivityEvent::RewardDelivered {
                            order_id: order_id.clone(),
                            uid: uid.clone(),
                        }],
                        ActivityReply::Delivered,
                    )),
                    _ => Err(ActivityError::WrongState {
                        order_id: order_id.clone(),
                    }),
                }
            }
            ActivityCommand::Void {
                order_id,
                uid,
                reason,
            } => {
                let memo = self
                    .order(order_id)
                    .ok_or_else(|| ActivityError::UnknownOrder {
                        order_id: order_id.clone(),
                    })?;
                match memo.state {
                    OrderState::Voided => Ok(Decision::Reply(ActivityReply::Voided)),
                    OrderState::Accepted => Ok(Decision::Emit(
                        vec![ActivityEvent::RewardVoided {
                            order_id: order_id.clone(),
                            uid: uid.clone(),
                            kind: memo.kind,
                            amount: memo.amount,
                            reason: *reason,
                        }],
                        ActivityReply::Voided,
                    )),
                    OrderState::Delivered | OrderState::Failed => Err(ActivityError::WrongState {
                        order_id: order_id.clone(),
                    }),
                }
            }
            ActivityCommand::MarkFailed {
                order_id,
                uid,
                reason,
            } => {
                let memo = self
                    .order(order_id)
                    .ok_or_else(|| ActivityError::UnknownOrder {
                        order_id: order_id.clone(),
                    })?;
                // A money reward may be credited at any moment by force-credit: it never fails.
                match (memo.kind.wallet_entry().is_none(), memo.state) {
                    (true, OrderState::Failed) => Ok(Decision::Reply(ActivityReply::Failed)),
                    (true, OrderState::Accepted) => Ok(Decision::Emit(
                        vec![ActivityEvent::RewardFailed {
                            order_id: order_id.clone(),
                            uid: uid.clone(),
                            kind: memo.kind,
                            amount: memo.amount,
                            reason: *reason,
                        }],
                        ActivityReply::Failed,
                    )),
                    _ => Err(ActivityError::WrongState {
                        order_id: order_id.clone(),
                    }),
                }
            }
            ActivityCommand::ReturnBudget {
                order_id,
                kind,
                amount,
            } => {
                if self.returned.contains(&order_key(order_id)) {
                    return Ok(Decision::Reply(self.budget_reply()));
                }
                if kind.wallet_entry().is_none() || amount.is_zero() {
                    return Err(ActivityError::ZeroAmount);
                }
                let event = ActivityEvent::BudgetReturned {
                    order_id: order_id.clone(),
                    kind: *kind,
                    amount: *amount,
                };
                // The reply needs the budgets only: no clone of the order memo.
                let mut after = Activity {
                    budget: self.budget,
                    accepted: self.accepted,
                    ..Activity::default()
                };
                after.evolve(&event);
                Ok(Decision::Emit(vec![event], after.budget_reply()))
            }
            ActivityCommand::AcceptInSlice { reward, received } => {
                self.accept_in_slice(reward, *received)
            }
            ActivityCommand::Grant {
                shard,
                shards,
                kind,
                received,
                need,
                want,
                require_budget,
            } => self.grant(
                *shard,
                *shards,
                *kind,
                *received,
                *need,
                *want,
                *require_budget,
            ),
            ActivityCommand::Receive { kind, total } => self.receive(*kind, *total),
            ActivityCommand::Release { kind } => self.release(*kind),
            ActivityCommand::TakeBack { shard, kind, total } => {
                self.take_back(*shard, *kind, *total)
            }
            ActivityCommand::Books => Ok(Decision::Reply(ActivityReply::Books {
                budget: self.budget,
                accepted: self.accepted,
                rewards: self.orders.len() as u64,
            })),
        }
    }

    fn evolve(&mut self, event: &ActivityEvent) {
        match event {
            ActivityEvent::BudgetSet(budget) => self.budget = Some(*budget),
            ActivityEvent::RewardAccepted(reward) => {
                if let Some(total) = self.accepted_mut(reward.kind) {
                    // Checked in decide; saturating here keeps evolve total (it never judges).
                    *total = total
                        .checked_add(reward.amount)
                        .unwrap_or(Fen::new(u64::MAX));
                }
                self.orders.insert(
                    order_key(&reward.order_id),
                    OrderMemo {
                        fingerprint: reward.fingerprint(),
                        kind: reward.kind,
                        amount: reward.amount,
                        state: OrderState::Accepted,
                    },
                );
            }
            ActivityEvent::RewardDelivered { order_id, .. } => {
                if let Some(memo) = self.orders.get_mut(&order_key(order_id)) {
                    memo.state = OrderState::Delivered;
                }
            }
            ActivityEvent::BudgetReturned {
                order_id,
                kind,
                amount,
            } => {
                self.give_back(*kind, *amount);
                self.returned.insert(order_key(order_id));
            }
            ActivityEvent::RewardVoided {
                order_id,
                kind,
                amount,
                ..
            } => self.settle_unspent(order_id, *kind, *amount, OrderState::Voided),
            ActivityEvent::RewardFailed {
                order_id,
                kind,
                amount,
                ..
            } => self.settle_unspent(order_id, *kind, *amount, OrderState::Failed),
            ActivityEvent::SliceGranted {
                shard,
                kind,
                amount,
            } => {
                let books = self.slices.entry((*shard, *kind)).or_default();
                books.granted = saturating_add(books.granted, *amount);
            }
            ActivityEvent::SliceTakenBack {
                shard,
                kind,
                amount,
            } => {
                let books = self.slices.entry((*shard, *kind)).or_default();
                books.taken_back = saturating_add(books.taken_back, *amount);
            }
            ActivityEvent::SliceReceived { kind, amount } => {
                let holding = self.holding.entry(*kind).or_default();
                holding.received = saturating_add(holding.received, *amount);
            }
            ActivityEvent::SliceReleased { kind, amount } => {
                let holding = self.holding.entry(*kind).or_default();
                holding.released = saturating_add(holding.released, *amount);
            }
        }
    }

    fn correlation_id(command: &ActivityCommand) -> String {
        match command {
            ActivityCommand::SetBudget(_) => "budget".into(),
            ActivityCommand::Accept { reward, .. }
            | ActivityCommand::AcceptInSlice { reward, .. } => reward.order_id.to_string(),
            ActivityCommand::Grant { shard, kind, .. }
            | ActivityCommand::TakeBack { shard, kind, .. } => {
                format!("slice:{shard}:{kind}")
            }
            ActivityCommand::Receive { kind, .. } | ActivityCommand::Release { kind } => {
                format!("slice:{kind}")
            }
            ActivityCommand::Books => "books".into(),
            ActivityCommand::MarkDelivered { order_id, .. }
            | ActivityCommand::MarkFailed { order_id, .. }
            | ActivityCommand::Void { order_id, .. }
            | ActivityCommand::ReturnBudget { order_id, .. } => order_id.to_string(),
        }
    }

    fn wrap(event: ActivityEvent) -> Event {
        Event::Activity(event)
    }

    fn unwrap(event: &Event) -> Option<&ActivityEvent> {
        match event {
            Event::Activity(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::replay;
    use crate::domain::wallet::Wallet;
    use proptest::prelude::*;

    const CTX: Ctx = Ctx { now_ms: 0 };

    fn id(s: &str) -> Id {
        Id::parse(s).unwrap()
    }

    fn reward(order: &str, kind: RewardKind, amount: u64) -> Reward {
        Reward {
            order_id: id(order),
            uid: id("u1"),
            scene: id("rain"),
            kind,
            amount: Fen::new(amount),
            device_id: None,
            app_id: None,
            batch_id: None,
            ext: BTreeMap::new(),
        }
    }

    fn accept(order: &str, amount: u64) -> ActivityCommand {
        ActivityCommand::Accept {
            reward: reward(order, RewardKind::Cash, amount),
            require_budget: false,
        }
    }

    fn budget(cash: u64, subsidy: u64) -> ActivityEvent {
        ActivityEvent::BudgetSet(Budgets {
            cash: Fen::new(cash),
            subsidy: Fen::new(subsidy),
        })
    }

    fn given(events: &[ActivityEvent]) -> Activity {
        replay(Activity::default(), events)
    }

    #[test]
    fn a_reward_within_budget_is_accepted_as_one_event() {
        // Given a cash budget of 100, when 60 is requested, then one RewardAccepted.
        let activity = given(&[budget(100, 0)]);
        let decision = activity.decide(&accept("o1", 60), &CTX).unwrap();
        assert_eq!(
            decision,
            Decision::Emit(
                vec![ActivityEvent::RewardAccepted(reward(
                    "o1",
                    RewardKind::Cash,
                    60
                ))],
                ActivityReply::Accepted { replayed: false }
            )
        );
    }

    #[test]
    fn a_reward_beyond_the_remaining_budget_is_refused_with_what_remains() {
        // Given 100 budget and 60 accepted, when 41 is requested, then budget_exhausted(40).
        let activity = given(&[
            budget(100, 0),
            ActivityEvent::RewardAccepted(reward("o1", RewardKind::Cash, 60)),
        ]);
        assert_eq!(
            activity.decide(&accept("o2", 41), &CTX),
            Err(ActivityError::BudgetExhausted {
                kind: RewardKind::Cash,
                remaining: Fen::new(40),
                requested: Fen::new(41)
            })
        );
        assert!(matches!(
            activity.decide(&accept("o2", 40), &CTX),
            Ok(Decision::Emit(..))
        ));
    }

    #[test]
    fn kinds_have_separate_budgets_and_items_none() {
        // Given a subsidy budget of 0, subsidies are refused while cash and items pass.
        let activity = given(&[budget(10, 0)]);
        let subsidy = ActivityCommand::Accept {
            reward: reward("s", RewardKind::Subsidy, 1),
            require_budget: false,
        };
        assert!(matches!(
            activity.decide(&subsidy, &CTX),
            Err(ActivityError::BudgetExhausted {
                kind: RewardKind::Subsidy,
                ..
            })
        ));
        let item = ActivityCommand::Accept {
            reward: reward("i", RewardKind::Item, 1_000),
            require_budget: true,
        };
        assert!(matches!(
            activity.decide(&item, &CTX),
            Ok(Decision::Emit(..))
        ));
    }

    #[test]
    fn without_a_budget_rewards_pass_unless_budgets_are_required() {
        // Goal: the development default accepts; --require-budgets refuses.
        let activity = Activity::default();
        assert!(matches!(
            activity.decide(&accept("o1", 5), &CTX),
            Ok(Decision::Emit(..))
        ));
        let strict = ActivityCommand::Accept {
            reward: reward("o1", RewardKind::Cash, 5),
            require_budget: true,
        };
        assert_eq!(
            activity.decide(&strict, &CTX),
            Err(ActivityError::BudgetNotSet)
        );
    }

    #[test]
    fn a_retry_replays_and_another_payload_conflicts() {
        // Given o1 accepted, the same request replays; another amount or uid is a conflict.
        let activity = given(&[ActivityEvent::RewardAccepted(reward(
            "o1",
            RewardKind::Cash,
            60,
        ))]);
        assert_eq!(
            activity.decide(&accept("o1", 60), &CTX),
            Ok(Decision::Reply(ActivityReply::Accepted { replayed: true }))
        );
        assert_eq!(
            activity.decide(&accept("o1", 61), &CTX),
            Err(ActivityError::IdempotencyConflict { order_id: id("o1") })
        );
        let mut other_uid = reward("o1", RewardKind::Cash, 60);
        other_uid.uid = id("u2");
        let cmd = ActivityCommand::Accept {
            reward: other_uid,
            require_budget: false,
        };
        assert!(matches!(
            activity.decide(&cmd, &CTX),
            Err(ActivityError::IdempotencyConflict { .. })
        ));
    }

    #[test]
    fn a_budget_can_rise_but_not_fall_below_what_is_accepted() {
        // Given 60 accepted of 100, lowering to 50 is refused, to 60 or raising is fine.
        let activity = given(&[
            budget(100, 0),
            ActivityEvent::RewardAccepted(reward("o1", RewardKind::Cash, 60)),
        ]);
        let set = |cash| {
            ActivityCommand::SetBudget(Budgets {
                cash: Fen::new(cash),
                subsidy: Fen::ZERO,
            })
        };
        assert!(matches!(
            activity.decide(&set(50), &CTX),
            Err(ActivityError::BudgetBelowAccepted { .. })
        ));
        assert!(matches!(
            activity.decide(&set(60), &CTX),
            Ok(Decision::Emit(..))
        ));
        assert!(matches!(
            activity.decide(&set(100), &CTX),
            Ok(Decision::Reply(_))
        ));
    }

    #[test]
    fn voiding_returns_the_budget_once_and_items_are_delivered_once() {
        // Goal: void and delivery are idempotent state transitions.
        let mut activity = given(&[
            budget(100, 0),
            ActivityEvent::RewardAccepted(reward("o1", RewardKind::Cash, 60)),
        ]);
        let void = ActivityCommand::Void {
            order_id: id("o1"),
            uid: id("u1"),
            reason: VoidReason::DuplicateOrderId,
        };
        let Ok(Decision::Emit(events, _)) = activity.decide(&void, &CTX) else {
            panic!()
        };
        activity = replay(activity, &events);
        assert_eq!(activity.accepted.cash, Fen::ZERO);
        assert_eq!(
            activity.decide(&void, &CTX),
            Ok(Decision::Reply(ActivityReply::Voided))
        );

        let mut activity = given(&[ActivityEvent::RewardAccepted(reward(
            "i1",
            RewardKind::Item,
            1,
        ))]);
        let deliver = ActivityCommand::MarkDelivered {
            order_id: id("i1"),
            uid: id("u1"),
        };
        let Ok(Decision::Emit(events, _)) = activity.decide(&deliver, &CTX) else {
            panic!()
        };
        activity = replay(activity, &events);
        assert_eq!(
            activity.decide(&deliver, &CTX),
            Ok(Decision::Reply(ActivityReply::Delivered))
        );
        let late_void = ActivityCommand::Void {
            order_id: id("i1"),
            uid: id("u1"),
            reason: VoidReason::DuplicateOrderId,
        };
        assert!(matches!(
            activity.decide(&late_void, &CTX),
            Err(ActivityError::WrongState { .. })
        ));
        assert!(matches!(
            activity.decide(
                &ActivityCommand::MarkDelivered {
                    order_id: id("nope"),
                    uid: id("u1")
                },
                &CTX
            ),
            Err(ActivityError::UnknownOrder { .. })
        ));
    }

    fn coupon_reward(order: &str) -> Reward {
        Reward {
            batch_id: Some(id("b1")),
            ..reward(order, RewardKind::Coupon, 1)
        }
    }

    #[test]
    fn a_coupon_reward_ends_once_delivered_or_failed_and_money_rewards_never_here() {
        // Given two coupon rewards and a cash one: one coupon is delivered, the other fails
        // (sold out); each end is idempotent, the other end is then refused, and a cash reward
        // can neither be marked delivered nor failed (its wallet credit settles it).
        let mut activity = given(&[
            budget(100, 0),
            ActivityEvent::RewardAccepted(coupon_reward("c1")),
            ActivityEvent::RewardAccepted(coupon_reward("c2")),
            ActivityEvent::RewardAccepted(reward("m1", RewardKind::Cash, 60)),
        ]);
        let deliver = |order: &str| ActivityCommand::MarkDelivered {
            order_id: id(order),
            uid: id("u1"),
        };
        let fail = |order: &str| ActivityCommand::MarkFailed {
            order_id: id(order),
            uid: id("u1"),
            reason: FailReason::CouponRefused(crate::domain::coupon::Refusal::SoldOut),
        };
        let Ok(Decision::Emit(events, ActivityReply::Delivered)) =
            activity.decide(&deliver("c1"), &CTX)
        else {
            panic!("c1 not delivered")
        };
        activity = replay(activity, &events);
        let Ok(Decision::Emit(events, ActivityReply::Failed)) = activity.decide(&fail("c2"), &CTX)
        else {
            panic!("c2 not failed")
        };
        assert_eq!(
            events,
            vec![ActivityEvent::RewardFailed {
                order_id: id("c2"),
                uid: id("u1"),
                kind: RewardKind::Coupon,
                amount: Fen::new(1),
                reason: FailReason::CouponRefused(crate::domain::coupon::Refusal::SoldOut),
            }]
        );
        activity = replay(activity, &events);
        assert_eq!(activity.order(&id("c2")).unwrap().state, OrderState::Failed);
        assert_eq!(
            activity.decide(&deliver("c1"), &CTX),
            Ok(Decision::Reply(ActivityReply::Delivered))
        );
        assert_eq!(
            activity.decide(&fail("c2"), &CTX),
            Ok(Decision::Reply(ActivityReply::Failed))
        );
        for (command, order) in [
            (fail("c1"), "c1"),
            (deliver("c2"), "c2"),
            (deliver("m1"), "m1"),
            (fail("m1"), "m1"),
        ] {
            assert_eq!(
                activity.decide(&command, &CTX),
                Err(ActivityError::WrongState {
                    order_id: id(order)
                }),
                "{command:?}"
            );
        }
        // A failed reward is not voided later, and its retry still replays the acceptance.
        let void = ActivityCommand::Void {
            order_id: id("c2"),
            uid: id("u1"),
            reason: VoidReason::DuplicateOrderId,
        };
        assert!(matches!(
            activity.decide(&void, &CTX),
            Err(ActivityError::WrongState { .. })
        ));
        let retry = ActivityCommand::Accept {
            reward: coupon_reward("c2"),
            require_budget: false,
        };
        assert_eq!(
            activity.decide(&retry, &CTX),
            Ok(Decision::Reply(ActivityReply::Accepted { replayed: true }))
        );
        assert_eq!(activity.accepted.cash, Fen::new(60));
    }

    #[derive(Debug, Clone)]
    enum IntakeOp {
        Accept(u8, u64),
        SetBudget(u64),
        Void(u8),
    }

    fn intake_op() -> impl Strategy<Value = IntakeOp> {
        prop_oneof![
            6 => (0u8..24, 1u64..400).prop_map(|(o, a)| IntakeOp::Accept(o, a)),
            1 => (0u64..3_000).prop_map(IntakeOp::SetBudget),
            1 => (0u8..24).prop_map(IntakeOp::Void),
        ]
    }

    fn run(state: &mut Activity, command: ActivityCommand) -> Result<ActivityReply, ActivityError> {
        match state.decide(&command, &CTX)? {
            Decision::Emit(events, reply) => {
                for e in &events {
                    state.evolve(e);
                }
                Ok(reply)
            }
            Decision::Reply(reply) => Ok(reply),
        }
    }

    fn grant(shard: u32, received: u64, need: u64, want: u64) -> ActivityCommand {
        ActivityCommand::Grant {
            shard,
            shards: 4,
            kind: RewardKind::Cash,
            received: Fen::new(received),
            need: Fen::new(need),
            want: Fen::new(want),
            require_budget: false,
        }
    }

    fn in_slice(order: &str, amount: u64) -> ActivityCommand {
        ActivityCommand::AcceptInSlice {
            reward: reward(order, RewardKind::Cash, amount),
            received: Fen::ZERO,
        }
    }

    #[test]
    fn an_intake_shard_accepts_only_within_the_slice_it_received() {
        let mut shard = Activity::default();
        assert_eq!(
            run(&mut shard, in_slice("o1", 10)),
            Err(ActivityError::SliceShort {
                kind: RewardKind::Cash,
                received: Fen::ZERO,
                available: Fen::ZERO
            })
        );
        let receive = |total| ActivityCommand::Receive {
            kind: RewardKind::Cash,
            total: Fen::new(total),
        };
        assert_eq!(
            run(&mut shard, receive(15)),
            Ok(ActivityReply::Received {
                received: Fen::new(15),
                available: Fen::new(15)
            })
        );
        // The same total again (a repeated answer) adds nothing.
        run(&mut shard, receive(15)).unwrap();
        assert_eq!(
            run(&mut shard, in_slice("o1", 10)),
            Ok(ActivityReply::Accepted { replayed: false })
        );
        assert_eq!(
            run(&mut shard, in_slice("o1", 10)),
            Ok(ActivityReply::Accepted { replayed: true })
        );
        assert!(matches!(
            run(&mut shard, in_slice("o2", 6)),
            Err(ActivityError::SliceShort { available, .. }) if available == Fen::new(5)
        ));
        assert_eq!(
            run(
                &mut shard,
                ActivityCommand::Release {
                    kind: RewardKind::Cash
                }
            ),
            Ok(ActivityReply::Released {
                total: Fen::new(5),
                now: Fen::new(5)
            })
        );
        assert_eq!(shard.available(RewardKind::Cash), Fen::ZERO);
    }

    #[test]
    fn the_reward_that_asked_for_a_slice_is_accepted_from_it_in_the_same_decision() {
        let mut shard = Activity::default();
        let with_receipt = |order: &str, amount, total| ActivityCommand::AcceptInSlice {
            reward: reward(order, RewardKind::Cash, amount),
            received: Fen::new(total),
        };
        assert_eq!(
            shard.decide(&with_receipt("o1", 10, 30), &CTX),
            Ok(Decision::Emit(
                vec![
                    ActivityEvent::SliceReceived {
                        kind: RewardKind::Cash,
                        amount: Fen::new(30)
                    },
                    ActivityEvent::RewardAccepted(reward("o1", RewardKind::Cash, 10)),
                ],
                ActivityReply::Accepted { replayed: false }
            ))
        );
        run(&mut shard, with_receipt("o1", 10, 30)).unwrap();
        // Still short with the receipt: nothing recorded, not even the receipt.
        assert!(matches!(
            run(&mut shard, with_receipt("o2", 40, 35)),
            Err(ActivityError::SliceShort { available, .. }) if available == Fen::new(20)
        ));
        assert_eq!(shard.holding[&RewardKind::Cash].received, Fen::new(30));
    }

    #[test]
    fn the_activity_grants_fair_slices_redelivers_one_in_transit_and_is_short_only_below_the_need()
    {
        let mut main = given(&[budget(1_000, 0)]);
        // Wants 400; 1,000 free over 4 shards: a slice of 1,000 / 8 = 125.
        assert_eq!(
            run(&mut main, grant(0, 0, 10, 400)),
            Ok(ActivityReply::Granted {
                total: Fen::new(125)
            })
        );
        // The shard did not record it and asks again: the same total, nothing new.
        assert_eq!(
            run(&mut main, grant(0, 0, 10, 400)),
            Ok(ActivityReply::Granted {
                total: Fen::new(125)
            })
        );
        assert_eq!(main.remaining(RewardKind::Cash), Some(Fen::new(875)));
        // A need above the fair part is granted whole.
        assert_eq!(
            run(&mut main, grant(1, 0, 800, 10)),
            Ok(ActivityReply::Granted {
                total: Fen::new(800)
            })
        );
        assert_eq!(
            run(&mut main, grant(2, 0, 76, 10)),
            Ok(ActivityReply::Short {
                total: Fen::ZERO,
                unallocated: Fen::new(75)
            })
        );
        // A shard claiming more than was granted is a defect, refused.
        assert!(matches!(
            run(&mut main, grant(0, 500, 1, 1)),
            Err(ActivityError::SliceMismatch { .. })
        ));
        // The budget cannot go below what is accepted plus what the shards hold.
        assert!(matches!(
            run(&mut main, ActivityCommand::SetBudget(Budgets { cash: Fen::new(900), subsidy: Fen::ZERO })),
            Err(ActivityError::BudgetBelowAccepted { accepted, .. }) if accepted == Fen::new(925)
        ));
        // Taken back (cumulative, so a repeat moves nothing), and grantable again.
        let take_back = |total| ActivityCommand::TakeBack {
            shard: 1,
            kind: RewardKind::Cash,
            total: Fen::new(total),
        };
        run(&mut main, take_back(300)).unwrap();
        run(&mut main, take_back(300)).unwrap();
        assert_eq!(main.remaining(RewardKind::Cash), Some(Fen::new(375)));
        assert!(matches!(
            run(&mut main, take_back(801)),
            Err(ActivityError::SliceMismatch { .. })
        ));
    }

    #[test]
    fn an_activity_without_a_budget_grants_what_is_wanted_unless_budgets_are_required() {
        let mut main = Activity::default();
        assert_eq!(
            run(&mut main, grant(0, 0, 10, 400)),
            Ok(ActivityReply::Granted {
                total: Fen::new(400)
            })
        );
        let required = ActivityCommand::Grant {
            shard: 1,
            shards: 4,
            kind: RewardKind::Cash,
            received: Fen::ZERO,
            need: Fen::new(1),
            want: Fen::new(1),
            require_budget: true,
        };
        assert_eq!(run(&mut main, required), Err(ActivityError::BudgetNotSet));
        assert_eq!(
            activity_of_stream("activity:cny@3"),
            Some((id("cny"), Some(3)))
        );
        assert_eq!(activity_of_stream("activity:cny"), Some((id("cny"), None)));
        assert_eq!(activity_of_stream("activity:cny@x"), None);
        assert_eq!(activity_of_stream("wallet:u1"), None);
    }

    proptest! {
        #[test]
        fn no_interleaving_of_rewards_retries_and_budget_changes_accepts_beyond_the_budget(
            ops in proptest::collection::vec(intake_op(), 1..120)
        ) {
            // Goal: accepted <= budget at every step, accepted equals the live (non-voided)
            // rewards, and replaying the log gives the live state.
            let mut live = Activity::default();
            let mut log = Vec::new();
            let mut amounts: HashMap<u8, u64> = HashMap::new();
            for op in ops {
                let cmd = match op {
                    // A retry of an order reuses its first amount; a new amount is a conflict.
                    IntakeOp::Accept(o, a) => accept(&format!("o{o}"), *amounts.entry(o).or_insert(a)),
                    IntakeOp::SetBudget(cash) => ActivityCommand::SetBudget(Budgets { cash: Fen::new(cash), subsidy: Fen::ZERO }),
                    IntakeOp::Void(o) => ActivityCommand::Void { order_id: id(&format!("o{o}")), uid: id("u1"), reason: VoidReason::DuplicateOrderId },
                };
                if let Ok(Decision::Emit(events, _)) = live.decide(&cmd, &CTX) {
                    for e in events {
                        live.evolve(&e);
                        log.push(e);
                    }
                }
                if let Some(b) = live.budget {
                    prop_assert!(live.accepted.cash <= b.cash, "accepted {:?} > budget {:?}", live.accepted.cash, b.cash);
                }
                let live_sum: u64 = live.orders.values().filter(|m| m.state == OrderState::Accepted).map(|m| m.amount.as_u64()).sum();
                prop_assert_eq!(live_sum, live.accepted.cash.as_u64());
            }
            prop_assert_eq!(replay(Activity::default(), &log), live);
        }

        #[test]
        fn lane_credit_force_credit_and_retries_credit_each_order_exactly_once(
            amounts in proptest::collection::vec(1u64..1_000, 1..12),
            schedule in proptest::collection::vec((0usize..12, proptest::bool::ANY), 0..80),
        ) {
            // Goal: whatever the interleaving of the lane (which credits from the accepted
            // event), force-credit (which credits from a presented token) and retries of
            // either, each accepted order moves money into the wallet exactly once.
            let activity_id = id("act1");
            let rewards: Vec<Reward> = amounts
                .iter()
                .enumerate()
                .map(|(i, a)| reward(&format!("r{i}"), if i % 3 == 0 { RewardKind::Subsidy } else { RewardKind::Cash }, *a))
                .collect();
            // What a token for the reward carries, as force-credit decodes it.
            let token = |r: &Reward| RewardClaim {
                activity_id: id("act1"),
                order_id: r.order_id.clone(),
                uid: r.uid.clone(),
                kind: r.kind,
                amount: r.amount,
            };
            let mut wallet = Wallet::default();
            let mut credits = vec![0u32; rewards.len()];
            // The schedule, then the lane's pass over every order again, as after a restart
            // from an old checkpoint.
            let steps = schedule
                .iter()
                .map(|(i, force)| (i % rewards.len(), *force))
                .chain((0..rewards.len()).map(|i| (i, false)));
            for (i, force) in steps {
                let claim = if force { token(&rewards[i]) } else { RewardClaim::of(&activity_id, &rewards[i]) };
                let command = claim.credit_command().expect("money reward");
                match wallet.decide(&command, &CTX).unwrap() {
                    Decision::Emit(events, _) => {
                        credits[i] += 1;
                        for e in events {
                            wallet.evolve(&e);
                        }
                    }
                    Decision::Reply(m) => prop_assert!(m.replayed),
                }
            }
            prop_assert!(credits.iter().all(|&n| n == 1), "credits per order: {:?}", credits);
            let total = |kind| rewards.iter().filter(|r| r.kind == kind).map(|r| r.amount.as_u64()).sum::<u64>();
            prop_assert_eq!(wallet.activity.as_u64(), total(RewardKind::Cash));
            prop_assert_eq!(wallet.subsidy.as_u64(), total(RewardKind::Subsidy));
        }

        #[test]
        fn budget_slices_never_let_the_shards_accept_beyond_the_budget_and_a_full_recall_strands_nothing(
            budget_cash in 0u64..5_000,
            shards in 1u32..5,
            slice in 1u64..2_000,
            steps in proptest::collection::vec((0u32..5, 1u64..400, 0u8..4, proptest::bool::ANY), 0..120),
        ) {
            // Goal: whatever the order of grants, receipts, acceptances and recalls between an
            // activity and its shards, and whichever answers are lost on the way (a lost
            // answer: the caller does not act on it), (1) the shards accept no more money than
            // the budget, at every step; (2) once every shard has fetched what is in transit
            // and released the rest, and the activity took it back, what is unallocated is
            // exactly the budget minus what the shards accepted: nothing stranded.
            let mut main = given(&[budget(budget_cash, 0)]);
            let mut held: Vec<Activity> = (0..shards).map(|_| Activity::default()).collect();
            let run = |state: &mut Activity, command: &ActivityCommand| -> Option<ActivityReply> {
                match state.decide(command, &CTX) {
                    Ok(Decision::Emit(events, reply)) => {
                        for e in &events {
                            state.evolve(e);
                        }
                        Some(reply)
                    }
                    Ok(Decision::Reply(reply)) => Some(reply),
                    Err(_) => None,
                }
            };
            let accepted = |held: &Vec<Activity>| held.iter().map(|h| h.accepted.cash.as_u64()).sum::<u64>();
            for (n, (shard, amount, op, lost)) in steps.into_iter().enumerate() {
                let k = shard % shards;
                match op {
                    // A reward at shard k: accepted within its slice; else a grant is asked.
                    0 | 1 => {
                        let r = reward(&format!("o{n}"), RewardKind::Cash, amount);
                        if run(&mut held[k as usize], &ActivityCommand::AcceptInSlice { reward: r.clone(), received: Fen::ZERO }).is_none() {
                            let received = held[k as usize].holding.get(&RewardKind::Cash).map_or(Fen::ZERO, |h| h.received);
                            let available = held[k as usize].available(RewardKind::Cash);
                            let need = Fen::new(amount.saturating_sub(available.as_u64()).max(1));
                            let grant = ActivityCommand::Grant { shard: k, shards, kind: RewardKind::Cash, received, need, want: Fen::new(slice), require_budget: true };
                            if let Some(ActivityReply::Granted { total }) = run(&mut main, &grant) {
                                // The receipt alone, or with the reward that asked for it.
                                let receipt = if op == 0 {
                                    ActivityCommand::Receive { kind: RewardKind::Cash, total }
                                } else {
                                    ActivityCommand::AcceptInSlice { reward: r, received: total }
                                };
                                if !lost {
                                    run(&mut held[k as usize], &receipt);
                                }
                            }
                        }
                    }
                    // A recall of shard k's unused slice (the take-back may be lost).
                    2 => {
                        if let Some(ActivityReply::Released { total, .. }) = run(&mut held[k as usize], &ActivityCommand::Release { kind: RewardKind::Cash }) {
                            if !lost {
                                run(&mut main, &ActivityCommand::TakeBack { shard: k, kind: RewardKind::Cash, total });
                            }
                        }
                    }
                    // A stale or repeated message: an old receipt total again.
                    _ => {
                        let total = main.slices.get(&(k, RewardKind::Cash)).map_or(Fen::ZERO, |b| b.granted);
                        run(&mut held[k as usize], &ActivityCommand::Receive { kind: RewardKind::Cash, total: Fen::new(total.as_u64() / 2) });
                    }
                }
                prop_assert!(accepted(&held) <= budget_cash, "shards accepted {} of a budget of {}", accepted(&held), budget_cash);
                for h in &held {
                    prop_assert!(h.accepted.cash <= h.holding.get(&RewardKind::Cash).map_or(Fen::ZERO, |x| saturating_sub(x.received, x.released)));
                }
            }
            // The drain: each shard fetches what is in transit, releases, and is taken back.
            for k in 0..shards {
                let received = held[k as usize].holding.get(&RewardKind::Cash).map_or(Fen::ZERO, |h| h.received);
                let grant = ActivityCommand::Grant { shard: k, shards, kind: RewardKind::Cash, received, need: Fen::new(1), want: Fen::new(1), require_budget: true };
                if let Some(ActivityReply::Granted { total }) = main.decide(&grant, &CTX).ok().and_then(|d| match d { Decision::Reply(r) => Some(r), Decision::Emit(..) => None }) {
                    run(&mut held[k as usize], &ActivityCommand::Receive { kind: RewardKind::Cash, total });
                }
                let Some(ActivityReply::Released { total, .. }) = run(&mut held[k as usize], &ActivityCommand::Release { kind: RewardKind::Cash }) else {
                    panic!("a release is always answered");
                };
                prop_assert_eq!(run(&mut main, &ActivityCommand::TakeBack { shard: k, kind: RewardKind::Cash, total }), Some(ActivityReply::TakenBack));
            }
            prop_assert_eq!(main.remaining(RewardKind::Cash), Some(Fen::new(budget_cash - accepted(&held))));
        }
    }
}
