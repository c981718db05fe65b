//! Withdrawals from the activity balance (W2-W10): the order state machine, the policy gates
//! and the compensation rules.
//!
//! An order is its own aggregate (`withdrawal:<order id>`):
//!
//! ```text
//! pending_debit --Debited--> pending_payout --PayoutStarted--> paying --PayoutSucceeded--> succeeded
//!      |                          ^                              |
//!      |                          +----PayoutAttemptFailed-------+   (attempts left)
//!      |                                                         |
//!      +--DebitRefused / DebitAbandoned--> failed   failed <--PayoutParked (no attempt left)
//!                                                      |
//!                                   (debited) --Refunded--> refunded
//! ```
//!
//! Rules (all in [`WithdrawalOrder::decide`]): an order is requested once (same payload:
//! replay, other payload: conflict); the debit is recorded once; a payout attempt starts only
//! from `pending_payout` and its outcome is recorded only for the attempt in progress; after
//! `max_attempts` failed attempts the order is parked (dead-letter) and fails; a failed order
//! whose debit happened is refunded exactly once. [`compensation`] says what the sweeper does
//! with an order that is not final after the configured age (W9).

use super::{Aggregate, ChangedBy, Ctx, Decision, Event};
use crate::clock::Millis;
use crate::ids::Id;
use crate::money::Fen;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Where a payout goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Bank,
    Alipay,
    /// The in-app cashier (the user's change purse), an external system here like the others.
    Change,
}

impl Channel {
    pub const ALL: [Channel; 3] = [Channel::Bank, Channel::Alipay, Channel::Change];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Bank => "bank",
            Channel::Alipay => "alipay",
            Channel::Change => "change",
        }
    }

    pub fn parse(text: &str) -> Option<Channel> {
        Channel::ALL.into_iter().find(|c| c.as_str() == text)
    }
}

impl std::fmt::Display for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A bound payout method.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayoutMethod {
    pub method_id: Id,
    pub channel: Channel,
    pub account: String,
}

/// Longest payout account (card number, Alipay login, ...).
pub const ACCOUNT_CHARS_MAX: usize = 64;

/// The id of a method: derived from its channel and account, so binding the same account twice
/// gives the same id (idempotent without a client-supplied id).
pub fn method_id(channel: Channel, account: &str) -> Id {
    let digest: [u8; 32] = Sha256::new()
        .chain_update(channel.as_str().as_bytes())
        .chain_update([0u8])
        .chain_update(account.as_bytes())
        .finalize()
        .into();
    Id::parse(&format!("m-{}", hex::encode(&digest[..8]))).expect("hex ids are valid")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderState {
    PendingDebit,
    PendingPayout,
    Paying,
    Succeeded,
    Failed,
    Refunded,
}

impl OrderState {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderState::PendingDebit => "pending_debit",
            OrderState::PendingPayout => "pending_payout",
            OrderState::Paying => "paying",
            OrderState::Succeeded => "succeeded",
            OrderState::Failed => "failed",
            OrderState::Refunded => "refunded",
        }
    }
}

/// What a withdrawal asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WithdrawalRequest {
    pub uid: Id,
    pub amount: Fen,
    pub method: PayoutMethod,
}

/// A payout attempt's definite outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PayoutResult {
    Succeeded,
    /// Refused, throttled, or an unknown outcome that the channel's record showed as not paid.
    Failed {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WithdrawalCommand {
    Request(WithdrawalRequest),
    /// The wallet debited the amount.
    RecordDebit,
    /// The wallet refused the debit (insufficient balance): the order fails, nothing moved.
    RecordDebitRefused {
        reason: String,
    },
    /// Compensation: the order stayed in `pending_debit`; it fails (a debit that did happen is
    /// refunded next, see [`compensation`]). `debited` says what the wallet's record showed.
    Abandon {
        debited: bool,
    },
    StartPayout,
    RecordPayout {
        attempt: u32,
        result: PayoutResult,
        max_attempts: u32,
    },
    RecordRefund,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WithdrawalEvent {
    Requested {
        request: WithdrawalRequest,
        at_ms: Millis,
    },
    Debited {
        at_ms: Millis,
    },
    DebitRefused {
        reason: String,
        at_ms: Millis,
    },
    DebitAbandoned {
        debited: bool,
        at_ms: Millis,
    },
    PayoutStarted {
        attempt: u32,
        at_ms: Millis,
    },
    PayoutSucceeded {
        attempt: u32,
        at_ms: Millis,
    },
    PayoutAttemptFailed {
        attempt: u32,
        reason: String,
        at_ms: Millis,
    },
    /// The last attempt failed: parked in the dead-letter set, the order fails.
    PayoutParked {
        attempts: u32,
        reason: String,
        at_ms: Millis,
    },
    Refunded {
        at_ms: Millis,
    },
}

impl WithdrawalEvent {
    pub fn type_name(&self) -> &'static str {
        match self {
            WithdrawalEvent::Requested { .. } => "withdrawal.requested",
            WithdrawalEvent::Debited { .. } => "withdrawal.debited",
            WithdrawalEvent::DebitRefused { .. } => "withdrawal.debit_refused",
            WithdrawalEvent::DebitAbandoned { .. } => "withdrawal.debit_abandoned",
            WithdrawalEvent::PayoutStarted { .. } => "withdrawal.payout_started",
            WithdrawalEvent::PayoutSucceeded { .. } => "withdrawal.payout_succeeded",
            WithdrawalEvent::PayoutAttemptFailed { .. } => "withdrawal.payout_attempt_failed",
            WithdrawalEvent::PayoutParked { .. } => "withdrawal.payout_parked",
            WithdrawalEvent::Refunded { .. } => "withdrawal.refunded",
        }
    }

    /// The state the event leads to.
    pub fn state_after(&self) -> OrderState {
        match self {
            WithdrawalEvent::Requested { .. } => OrderState::PendingDebit,
            WithdrawalEvent::Debited { .. } | WithdrawalEvent::PayoutAttemptFailed { .. } => {
                OrderState::PendingPayout
            }
            WithdrawalEvent::DebitRefused { .. } | WithdrawalEvent::PayoutParked { .. } => {
                OrderState::Failed
            }
            WithdrawalEvent::DebitAbandoned { .. } => OrderState::Failed,
            WithdrawalEvent::PayoutStarted { .. } => OrderState::Paying,
            WithdrawalEvent::PayoutSucceeded { .. } => OrderState::Succeeded,
            // `decide` refunds only after a debit; a partial history (the reconciler following
            // the log from its checkpoint meets an order's refund without its debit) is no
            // contradiction, so nothing is asserted on `debited` here.
            WithdrawalEvent::Refunded { .. } => OrderState::Refunded,
        }
    }

    pub fn at_ms(&self) -> Millis {
        match self {
            WithdrawalEvent::Requested { at_ms, .. }
            | WithdrawalEvent::Debited { at_ms }
            | WithdrawalEvent::DebitRefused { at_ms, .. }
            | WithdrawalEvent::DebitAbandoned { at_ms, .. }
            | WithdrawalEvent::PayoutStarted { at_ms, .. }
            | WithdrawalEvent::PayoutSucceeded { at_ms, .. }
            | WithdrawalEvent::PayoutAttemptFailed { at_ms, .. }
            | WithdrawalEvent::PayoutParked { at_ms, .. }
            | WithdrawalEvent::Refunded { at_ms } => *at_ms,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum WithdrawalError {
    #[error("order was already requested with a different payload")]
    IdempotencyConflict,
    #[error("no withdrawal with this order id")]
    Unknown,
    #[error("the order is {} and cannot do this", .0.as_str())]
    WrongState(OrderState),
    #[error("attempt {got} is not the attempt in progress ({expected})")]
    WrongAttempt { expected: u32, got: u32 },
}

/// The order as a state machine, and its history (for `GET /v1/withdrawals/{order_id}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WithdrawalOrder {
    pub request: Option<WithdrawalRequest>,
    pub state: Option<OrderState>,
    /// The wallet debited the amount (set once, never cleared: a refund is separate).
    pub debited: bool,
    pub refunded: bool,
    pub attempts: u32,
    pub parked: bool,
    pub failure: Option<String>,
    pub history: Vec<(OrderState, Millis)>,
    pub created_at_ms: Millis,
}

impl WithdrawalOrder {
    pub fn is_final(&self) -> bool {
        match self.state {
            Some(OrderState::Succeeded | OrderState::Refunded) => true,
            // A failed order is final once nothing is owed back.
            Some(OrderState::Failed) => !self.debited || self.refunded,
            _ => false,
        }
    }

    fn in_state(&self, expected: OrderState) -> Result<(), WithdrawalError> {
        match self.state {
            None => Err(WithdrawalError::Unknown),
            Some(s) if s == expected => Ok(()),
            Some(s) => Err(WithdrawalError::WrongState(s)),
        }
    }

    fn emit(
        &self,
        event: WithdrawalEvent,
    ) -> Result<Decision<WithdrawalEvent, WithdrawalOrder>, WithdrawalError> {
        let mut after = self.clone();
        after.evolve(&event);
        Ok(Decision::Emit(vec![event], after))
    }

    fn same(&self) -> Result<Decision<WithdrawalEvent, WithdrawalOrder>, WithdrawalError> {
        Ok(Decision::Reply(self.clone()))
    }
}

impl Aggregate for WithdrawalOrder {
    type Command = WithdrawalCommand;
    type Event = WithdrawalEvent;
    type Reply = WithdrawalOrder;
    type Error = WithdrawalError;

    const STREAM_PREFIX: &'static str = "withdrawal";

    fn decide(
        &self,
        command: &WithdrawalCommand,
        ctx: &Ctx,
    ) -> Result<Decision<WithdrawalEvent, WithdrawalOrder>, WithdrawalError> {
        let at_ms = ctx.now_ms;
        match command {
            WithdrawalCommand::Request(request) => match &self.request {
                Some(existing) if existing == request => self.same(),
                Some(_) => Err(WithdrawalError::IdempotencyConflict),
                None => self.emit(WithdrawalEvent::Requested {
                    request: request.clone(),
                    at_ms,
                }),
            },
            WithdrawalCommand::RecordDebit => {
                if self.debited {
                    return self.same();
                }
                self.in_state(OrderState::PendingDebit)?;
                self.emit(WithdrawalEvent::Debited { at_ms })
            }
            WithdrawalCommand::RecordDebitRefused { reason } => {
                if self.state == Some(OrderState::Failed) && !self.debited {
                    return self.same();
                }
                self.in_state(OrderState::PendingDebit)?;
                self.emit(WithdrawalEvent::DebitRefused {
                    reason: reason.clone(),
                    at_ms,
                })
            }
            WithdrawalCommand::Abandon { debited } => {
                self.in_state(OrderState::PendingDebit)?;
                self.emit(WithdrawalEvent::DebitAbandoned {
                    debited: *debited,
                    at_ms,
                })
            }
            WithdrawalCommand::StartPayout => {
                if self.state == Some(OrderState::Paying) {
                    return self.same();
                }
                self.in_state(OrderState::PendingPayout)?;
                self.emit(WithdrawalEvent::PayoutStarted {
                    attempt: self.attempts + 1,
                    at_ms,
                })
            }
            WithdrawalCommand::RecordPayout {
                attempt,
                result,
                max_attempts,
            } => {
                match (self.state, result) {
                    (Some(OrderState::Succeeded), PayoutResult::Succeeded) => return self.same(),
                    (
                        Some(OrderState::PendingPayout | OrderState::Failed),
                        PayoutResult::Failed { .. },
                    ) if *attempt <= self.attempts => return self.same(),
                    _ => {}
                }
                self.in_state(OrderState::Paying)?;
                if *attempt != self.attempts {
                    return Err(WithdrawalError::WrongAttempt {
                        expected: self.attempts,
                        got: *attempt,
                    });
                }
                match result {
                    PayoutResult::Succeeded => self.emit(WithdrawalEvent::PayoutSucceeded {
                        attempt: *attempt,
                        at_ms,
                    }),
                    PayoutResult::Failed { reason } if *attempt < *max_attempts => {
                        self.emit(WithdrawalEvent::PayoutAttemptFailed {
                            attempt: *attempt,
                            reason: reason.clone(),
                            at_ms,
                        })
                    }
                    PayoutResult::Failed { reason } => self.emit(WithdrawalEvent::PayoutParked {
                        attempts: *attempt,
                        reason: reason.clone(),
                        at_ms,
                    }),
                }
            }
            WithdrawalCommand::RecordRefund => {
                if self.refunded {
                    return self.same();
                }
                self.in_state(OrderState::Failed)?;
                if !self.debited {
                    return Err(WithdrawalError::WrongState(OrderState::Failed));
                }
                self.emit(WithdrawalEvent::Refunded { at_ms })
            }
        }
    }

    fn evolve(&mut self, event: &WithdrawalEvent) {
        match event {
            WithdrawalEvent::Requested { request, at_ms } => {
                self.request = Some(request.clone());
                self.created_at_ms = *at_ms;
            }
            WithdrawalEvent::Debited { .. } => self.debited = true,
            WithdrawalEvent::DebitRefused { reason, .. } => self.failure = Some(reason.clone()),
            WithdrawalEvent::DebitAbandoned { debited, .. } => {
                self.debited |= *debited;
                self.failure = Some("not debited in time (compensation)".into());
            }
            WithdrawalEvent::PayoutStarted { attempt, .. } => self.attempts = *attempt,
            WithdrawalEvent::PayoutSucceeded { .. } => {}
            WithdrawalEvent::PayoutAttemptFailed { reason, .. } => {
                self.failure = Some(reason.clone())
            }
            WithdrawalEvent::PayoutParked { reason, .. } => {
                self.parked = true;
                self.failure = Some(reason.clone());
            }
            WithdrawalEvent::Refunded { .. } => self.refunded = true,
        }
        let state = event.state_after();
        self.state = Some(state);
        self.history.push((state, event.at_ms()));
    }

    fn correlation_id(_: &WithdrawalCommand) -> String {
        // The order id is the stream id; the runtime sets it (see `Registry::execute`).
        String::new()
    }

    fn wrap(event: WithdrawalEvent) -> Event {
        Event::Withdrawal(event)
    }

    fn unwrap(event: &Event) -> Option<&WithdrawalEvent> {
        match event {
            Event::Withdrawal(e) => Some(e),
            _ => None,
        }
    }
}

/// What the compensation sweeper does with an order that is not final after the configured age
/// (W9), or `None` if it is final or young.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compensation {
    /// `pending_debit`: fail it; refund if the wallet shows the debit did happen.
    AbandonDebit,
    /// `pending_payout`: pay (hand it to the payout lane again).
    Pay,
    /// `paying`: ask the channel; adopt its result, re-send if it has no record.
    QueryChannel,
    /// `failed` after a debit: refund once.
    Refund,
}

pub fn compensation(order: &WithdrawalOrder, now_ms: Millis, age_ms: i64) -> Option<Compensation> {
    if order.is_final() || now_ms - order.created_at_ms < age_ms {
        return None;
    }
    match order.state? {
        OrderState::PendingDebit => Some(Compensation::AbandonDebit),
        OrderState::PendingPayout => Some(Compensation::Pay),
        OrderState::Paying => Some(Compensation::QueryChannel),
        OrderState::Failed => Some(Compensation::Refund),
        OrderState::Succeeded | OrderState::Refunded => None,
    }
}

/// One stage of a staged opening: from `at_ms`, buckets below `open_below` may withdraw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    pub at_ms: Millis,
    pub open_below: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedOpening {
    pub modulo: u64,
    /// Sorted by time, `open_below` not decreasing.
    pub schedule: Vec<Stage>,
}

impl StagedOpening {
    /// The schedule by interval: bucket k (of `modulo`) opens at `starts_at_ms + k x
    /// interval_ms`, so the last bucket opens `(modulo - 1) x interval` after the first.
    pub fn every(
        modulo: u64,
        starts_at_ms: Millis,
        interval_ms: Millis,
    ) -> Result<StagedOpening, PolicyError> {
        if modulo == 0 || modulo > STAGES_MAX as u64 {
            return Err(PolicyError(format!(
                "staged_opening.modulo is 1 to {STAGES_MAX} with an interval"
            )));
        }
        if interval_ms <= 0 {
            return Err(PolicyError(
                "staged_opening.interval_s must be positive".into(),
            ));
        }
        let schedule = (0..modulo)
            .map(|k| {
                (k as Millis)
                    .checked_mul(interval_ms)
                    .and_then(|offset| starts_at_ms.checked_add(offset))
                    .map(|at_ms| Stage {
                        at_ms,
                        open_below: k + 1,
                    })
                    .ok_or_else(|| PolicyError("staged_opening ends too far in the future".into()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(StagedOpening { modulo, schedule })
    }
}

/// A time window `[from, to)` in which withdrawals are closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub from_ms: Millis,
    pub to_ms: Millis,
}

/// Withdrawal policy (W3-W5), changed at run time by an admin (as events).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WithdrawalPolicy {
    pub min_amount: Fen,
    pub closed_windows: Vec<Window>,
    pub staged_opening: Option<StagedOpening>,
}

/// The seed's minimum: 1 yuan.
pub const MIN_AMOUNT_DEFAULT: Fen = Fen::new(100);
/// Limits on a policy's size.
pub const WINDOWS_MAX: usize = 64;
pub const STAGES_MAX: usize = 256;

impl Default for WithdrawalPolicy {
    fn default() -> Self {
        WithdrawalPolicy {
            min_amount: MIN_AMOUNT_DEFAULT,
            closed_windows: Vec::new(),
            staged_opening: None,
        }
    }
}

/// Why a withdrawal is refused before any money moves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Gate {
    #[error("the minimum withdrawal is {min}")]
    BelowMinimum { min: Fen },
    /// `opens_at_ms`: when this user passes every gate (`None`: no stage ever admits them).
    #[error("withdrawals are closed")]
    WindowClosed { opens_at_ms: Option<Millis> },
    #[error("withdrawals are not yet open for this user")]
    NotYetOpenForUser { opens_at_ms: Option<Millis> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("invalid policy: {0}")]
pub struct PolicyError(pub String);

/// The staged-opening bucket of a user: `uid mod N` for a numeric uid, a stable hash otherwise.
pub fn bucket(uid: &Id, modulo: u64) -> u64 {
    let modulo = modulo.max(1);
    match uid.as_str().parse::<u64>() {
        Ok(n) => n % modulo,
        Err(_) => {
            let digest: [u8; 32] = Sha256::digest(uid.as_str().as_bytes()).into();
            u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) % modulo
        }
    }
}

impl WithdrawalPolicy {
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.min_amount.is_zero() {
            return Err(PolicyError("min_amount must be positive".into()));
        }
        if self.closed_windows.len() > WINDOWS_MAX {
            return Err(PolicyError(format!("at most {WINDOWS_MAX} closed windows")));
        }
        if let Some(w) = self.closed_windows.iter().find(|w| w.from_ms >= w.to_ms) {
            return Err(PolicyError(format!(
                "window from {} is not before to {}",
                w.from_ms, w.to_ms
            )));
        }
        if let Some(staged) = &self.staged_opening {
            if staged.modulo == 0 {
                return Err(PolicyError("staged_opening.modulo must be positive".into()));
            }
            if staged.schedule.is_empty() || staged.schedule.len() > STAGES_MAX {
                return Err(PolicyError(format!(
                    "staged_opening.schedule holds 1 to {STAGES_MAX} stages"
                )));
            }
            let ordered = staged
                .schedule
                .windows(2)
                .all(|p| p[0].at_ms < p[1].at_ms && p[0].open_below <= p[1].open_below);
            if !ordered {
                return Err(PolicyError(
                    "stages must be in time order with open_below not decreasing".into(),
                ));
            }
        }
        Ok(())
    }

    /// The gates of W3-W5. Pure: the time is given. The minimum first; then, if this user may
    /// not withdraw now, the refusal says why now (a closed window, or the user's bucket not
    /// yet open) and when the user passes every gate ([`WithdrawalPolicy::opens_at`]).
    pub fn check(&self, uid: &Id, amount: Fen, now_ms: Millis) -> Result<(), Gate> {
        if amount < self.min_amount {
            return Err(Gate::BelowMinimum {
                min: self.min_amount,
            });
        }
        let opens_at_ms = self.opens_at(uid, now_ms);
        if opens_at_ms == Some(now_ms) {
            return Ok(());
        }
        Err(if self.window_at(now_ms).is_some() {
            Gate::WindowClosed { opens_at_ms }
        } else {
            Gate::NotYetOpenForUser { opens_at_ms }
        })
    }

    /// The earliest moment at or after `now_ms` when `uid` passes the window and stage gates
    /// (`None`: never). Follows the gates alternately until both agree: out of a closed window
    /// to its end, then to the user's bucket's stage if it is not open yet, then out of a
    /// window that stage may fall in, and so on. Every step moves to a later window end or
    /// stage time, so there are at most as many steps as windows and stages.
    pub fn opens_at(&self, uid: &Id, now_ms: Millis) -> Option<Millis> {
        let staged = self
            .staged_opening
            .as_ref()
            .map(|s| (s, bucket(uid, s.modulo)));
        let steps_max =
            self.closed_windows.len() + staged.map(|(s, _)| s.schedule.len()).unwrap_or(0) + 1;
        let mut t = now_ms;
        for _ in 0..=steps_max {
            if let Some(window) = self.window_at(t) {
                t = window.to_ms;
                continue;
            }
            match staged {
                Some((s, b)) if !s.admits(b, t) => t = s.next_opening(b, t)?,
                _ => return Some(t),
            }
        }
        debug_assert!(false, "opens_at did not settle in {steps_max} steps");
        None
    }

    /// A closed window covering `t`.
    fn window_at(&self, t: Millis) -> Option<&Window> {
        self.closed_windows
            .iter()
            .find(|w| w.from_ms <= t && t < w.to_ms)
    }
}

impl StagedOpening {
    /// Whether `bucket` may withdraw at `t` as far as the staged opening goes: before its first
    /// stage the staged opening restricts nobody (the day before the night); from then on,
    /// the last stage at or before `t` says which buckets are in.
    pub fn admits(&self, bucket: u64, t: Millis) -> bool {
        match self.schedule.iter().rev().find(|s| s.at_ms <= t) {
            Some(stage) => bucket < stage.open_below,
            None => true,
        }
    }

    /// The first stage after `t` that admits `bucket`.
    fn next_opening(&self, bucket: u64, t: Millis) -> Option<Millis> {
        self.schedule
            .iter()
            .find(|s| s.at_ms > t && bucket < s.open_below)
            .map(|s| s.at_ms)
    }
}

/// The policy as a singleton aggregate (`policy:global`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyState {
    pub policy: WithdrawalPolicy,
    /// Who set the policy in force, and when (`None`: the default, or set by an event recorded
    /// before changes named their key).
    pub changed_by: Option<(ChangedBy, Millis)>,
}

/// Replace the policy; `by` is the key that asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetPolicy {
    pub policy: WithdrawalPolicy,
    pub by: ChangedBy,
}

/// Variants are only appended (the codec stores the index): `PolicySet` is the old shape,
/// still decoded, with no record of who set it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyEvent {
    PolicySet(WithdrawalPolicy),
    /// The policy set by the key `by`.
    PolicyChanged {
        policy: WithdrawalPolicy,
        by: ChangedBy,
        at_ms: Millis,
    },
}

impl PolicyEvent {
    pub fn type_name(&self) -> &'static str {
        match self {
            PolicyEvent::PolicySet(_) => "policy.policy_set",
            PolicyEvent::PolicyChanged { .. } => "policy.policy_changed",
        }
    }
}

impl Aggregate for PolicyState {
    type Command = SetPolicy;
    type Event = PolicyEvent;
    type Reply = WithdrawalPolicy;
    type Error = PolicyError;

    const STREAM_PREFIX: &'static str = "policy";

    fn decide(
        &self,
        command: &SetPolicy,
        ctx: &Ctx,
    ) -> Result<Decision<PolicyEvent, WithdrawalPolicy>, PolicyError> {
        let policy = &command.policy;
        policy.validate()?;
        if &self.policy == policy {
            return Ok(Decision::Reply(policy.clone()));
        }
        Ok(Decision::Emit(
            vec![PolicyEvent::PolicyChanged {
                policy: policy.clone(),
                by: command.by.clone(),
                at_ms: ctx.now_ms,
            }],
            policy.clone(),
        ))
    }

    fn evolve(&mut self, event: &PolicyEvent) {
        match event {
            PolicyEvent::PolicySet(policy) => {
                self.policy = policy.clone();
                self.changed_by = None;
            }
            PolicyEvent::PolicyChanged { policy, by, at_ms } => {
                self.policy = policy.clone();
                self.changed_by = Some((by.clone(), *at_ms));
            }
        }
    }

    fn correlation_id(_: &SetPolicy) -> String {
        "withdrawal-policy".into()
    }

    fn wrap(event: PolicyEvent) -> Event {
        Event::Policy(event)
    }

    fn unwrap(event: &Event) -> Option<&PolicyEvent> {
        match event {
            Event::Policy(e) => Some(e),
            _ => None,
        }
    }
}

/// Most payout methods a user may bind.
pub const METHODS_PER_USER_MAX: usize = 16;

/// A user's bound payout methods (`payee:<uid>`), W2.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payee {
    pub methods: Vec<PayoutMethod>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindMethod {
    pub channel: Channel,
    pub account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PayeeEvent {
    MethodBound(PayoutMethod),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum PayeeError {
    #[error("accounts are 1-{ACCOUNT_CHARS_MAX} printable characters")]
    InvalidAccount,
    #[error("at most {METHODS_PER_USER_MAX} payout methods per user")]
    TooMany,
}

impl Payee {
    pub fn method(&self, method_id: &Id) -> Option<&PayoutMethod> {
        self.methods.iter().find(|m| &m.method_id == method_id)
    }
}

impl Aggregate for Payee {
    type Command = BindMethod;
    type Event = PayeeEvent;
    type Reply = PayoutMethod;
    type Error = PayeeError;

    const STREAM_PREFIX: &'static str = "payee";

    fn decide(
        &self,
        command: &BindMethod,
        _: &Ctx,
    ) -> Result<Decision<PayeeEvent, PayoutMethod>, PayeeError> {
        let account = command.account.trim();
        if account.is_empty()
            || account.chars().count() > ACCOUNT_CHARS_MAX
            || account.chars().any(char::is_control)
        {
            return Err(PayeeError::InvalidAccount);
        }
        let id = method_id(command.channel, account);
        if let Some(existing) = self.method(&id) {
            return Ok(Decision::Reply(existing.clone()));
        }
        if self.methods.len() >= METHODS_PER_USER_MAX {
            return Err(PayeeError::TooMany);
        }
        let method = PayoutMethod {
            method_id: id,
            channel: command.channel,
            account: account.to_owned(),
        };
        Ok(Decision::Emit(
            vec![PayeeEvent::MethodBound(method.clone())],
            method,
        ))
    }

    fn evolve(&mut self, event: &PayeeEvent) {
        let PayeeEvent::MethodBound(method) = event;
        self.methods.push(method.clone());
    }

    fn correlation_id(command: &BindMethod) -> String {
        method_id(command.channel, command.account.trim()).to_string()
    }

    fn wrap(event: PayeeEvent) -> Event {
        Event::Payee(event)
    }

    fn unwrap(event: &Event) -> Option<&PayeeEvent> {
        match event {
            Event::Payee(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::replay;
    use proptest::prelude::*;

    #[test]
    fn a_refund_met_without_its_debit_is_a_refunded_order_not_a_panic() {
        // Goal: the reconciler follows the log from its checkpoint, so after a crash it can
        // meet an order's refund without the debit before it (found by `hongbao simulate`: a
        // debug assertion here killed the reconciliation task in debug builds).
        let mut order = WithdrawalOrder::default();
        order.evolve(&WithdrawalEvent::Refunded { at_ms: 5 });
        assert_eq!(order.state, Some(OrderState::Refunded));
        assert!(order.refunded);
    }

    fn id(s: &str) -> Id {
        Id::parse(s).unwrap()
    }

    fn ctx(now_ms: Millis) -> Ctx {
        Ctx { now_ms }
    }

    fn request(amount: u64) -> WithdrawalRequest {
        WithdrawalRequest {
            uid: id("u1"),
            amount: Fen::new(amount),
            method: PayoutMethod {
                method_id: method_id(Channel::Bank, "6222"),
                channel: Channel::Bank,
                account: "6222".into(),
            },
        }
    }

    /// Applies a command to an order, returning the new order (panics on refusal).
    fn run(order: &WithdrawalOrder, command: WithdrawalCommand) -> WithdrawalOrder {
        match order.decide(&command, &ctx(1_000)).unwrap() {
            Decision::Emit(events, reply) => {
                let after = replay(order.clone(), &events);
                assert_eq!(after, reply, "the reply is the state after the events");
                after
            }
            Decision::Reply(reply) => reply,
        }
    }

    fn failed(reason: &str) -> PayoutResult {
        PayoutResult::Failed {
            reason: reason.into(),
        }
    }

    fn debited() -> WithdrawalOrder {
        let order = run(
            &WithdrawalOrder::default(),
            WithdrawalCommand::Request(request(500)),
        );
        run(&order, WithdrawalCommand::RecordDebit)
    }

    #[test]
    fn the_happy_path_goes_pending_debit_payout_paying_succeeded() {
        // Given a request, when debited, paid and succeeded, then each state in order.
        let order = run(
            &WithdrawalOrder::default(),
            WithdrawalCommand::Request(request(500)),
        );
        assert_eq!(order.state, Some(OrderState::PendingDebit));
        let order = run(&order, WithdrawalCommand::RecordDebit);
        assert_eq!(order.state, Some(OrderState::PendingPayout));
        let order = run(&order, WithdrawalCommand::StartPayout);
        assert_eq!((order.state, order.attempts), (Some(OrderState::Paying), 1));
        let order = run(
            &order,
            WithdrawalCommand::RecordPayout {
                attempt: 1,
                result: PayoutResult::Succeeded,
                max_attempts: 4,
            },
        );
        assert_eq!(order.state, Some(OrderState::Succeeded));
        assert!(order.is_final());
        let states: Vec<_> = order.history.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            states,
            [
                OrderState::PendingDebit,
                OrderState::PendingPayout,
                OrderState::Paying,
                OrderState::Succeeded
            ]
        );
    }

    #[test]
    fn a_request_is_idempotent_and_another_payload_conflicts() {
        // Goal: same payload replays, other payload is a conflict.
        let order = run(
            &WithdrawalOrder::default(),
            WithdrawalCommand::Request(request(500)),
        );
        assert!(matches!(
            order.decide(&WithdrawalCommand::Request(request(500)), &ctx(2)),
            Ok(Decision::Reply(_))
        ));
        assert_eq!(
            order.decide(&WithdrawalCommand::Request(request(501)), &ctx(2)),
            Err(WithdrawalError::IdempotencyConflict)
        );
    }

    #[test]
    fn a_refused_debit_fails_the_order_without_refund() {
        // Given an insufficient balance, the order fails and is final: nothing to refund.
        let order = run(
            &WithdrawalOrder::default(),
            WithdrawalCommand::Request(request(500)),
        );
        let order = run(
            &order,
            WithdrawalCommand::RecordDebitRefused {
                reason: "insufficient_balance".into(),
            },
        );
        assert_eq!(order.state, Some(OrderState::Failed));
        assert!(order.is_final() && !order.debited);
        assert!(order
            .decide(&WithdrawalCommand::RecordRefund, &ctx(3))
            .is_err());
        assert!(order
            .decide(&WithdrawalCommand::StartPayout, &ctx(3))
            .is_err());
    }

    #[test]
    fn failed_attempts_retry_until_the_last_then_park_and_refund_once() {
        // Given max 4 attempts, three failures return to pending_payout, the fourth parks and
        // fails the order; one refund follows, a second is a replay.
        let mut order = debited();
        for attempt in 1..=3 {
            order = run(&order, WithdrawalCommand::StartPayout);
            order = run(
                &order,
                WithdrawalCommand::RecordPayout {
                    attempt,
                    result: failed("declined"),
                    max_attempts: 4,
                },
            );
            assert_eq!(
                order.state,
                Some(OrderState::PendingPayout),
                "attempt {attempt}"
            );
        }
        order = run(&order, WithdrawalCommand::StartPayout);
        order = run(
            &order,
            WithdrawalCommand::RecordPayout {
                attempt: 4,
                result: failed("declined"),
                max_attempts: 4,
            },
        );
        assert_eq!(order.state, Some(OrderState::Failed));
        assert!(order.parked && order.debited && !order.is_final());
        order = run(&order, WithdrawalCommand::RecordRefund);
        assert_eq!(order.state, Some(OrderState::Refunded));
        assert!(order.is_final());
        assert!(matches!(
            order.decide(&WithdrawalCommand::RecordRefund, &ctx(5)),
            Ok(Decision::Reply(_))
        ));
    }

    #[test]
    fn outcomes_of_other_attempts_and_in_wrong_states_are_refused_or_replayed() {
        // Goal: a late answer for an old attempt cannot move the order.
        let order = run(&debited(), WithdrawalCommand::StartPayout);
        let stale = WithdrawalCommand::RecordPayout {
            attempt: 2,
            result: PayoutResult::Succeeded,
            max_attempts: 4,
        };
        assert_eq!(
            order.decide(&stale, &ctx(4)),
            Err(WithdrawalError::WrongAttempt {
                expected: 1,
                got: 2
            })
        );
        let done = run(
            &order,
            WithdrawalCommand::RecordPayout {
                attempt: 1,
                result: PayoutResult::Succeeded,
                max_attempts: 4,
            },
        );
        assert!(matches!(
            done.decide(
                &WithdrawalCommand::RecordPayout {
                    attempt: 1,
                    result: PayoutResult::Succeeded,
                    max_attempts: 4
                },
                &ctx(5)
            ),
            Ok(Decision::Reply(_))
        ));
        assert!(done
            .decide(&WithdrawalCommand::StartPayout, &ctx(5))
            .is_err());
        assert_eq!(
            WithdrawalOrder::default().decide(&WithdrawalCommand::RecordDebit, &ctx(0)),
            Err(WithdrawalError::Unknown)
        );
    }

    #[test]
    fn compensation_follows_the_state_after_the_age() {
        // Goal: W9's rules, applied only to orders older than the age.
        let hour = 3_600_000;
        let requested = run(
            &WithdrawalOrder::default(),
            WithdrawalCommand::Request(request(500)),
        );
        assert_eq!(
            compensation(&requested, 1_000 + hour, 4 * hour),
            None,
            "too young"
        );
        assert_eq!(
            compensation(&requested, 1_000 + 4 * hour, 4 * hour),
            Some(Compensation::AbandonDebit)
        );
        let pending_payout = run(&requested, WithdrawalCommand::RecordDebit);
        assert_eq!(
            compensation(&pending_payout, 5 * hour, 4 * hour),
            Some(Compensation::Pay)
        );
        let paying = run(&pending_payout, WithdrawalCommand::StartPayout);
        assert_eq!(
            compensation(&paying, 5 * hour, 4 * hour),
            Some(Compensation::QueryChannel)
        );
        let abandoned = run(&requested, WithdrawalCommand::Abandon { debited: true });
        assert_eq!(abandoned.state, Some(OrderState::Failed));
        assert_eq!(
            compensation(&abandoned, 5 * hour, 4 * hour),
            Some(Compensation::Refund)
        );
        let abandoned_clean = run(&requested, WithdrawalCommand::Abandon { debited: false });
        assert_eq!(
            compensation(&abandoned_clean, 5 * hour, 4 * hour),
            None,
            "failed without a debit is final"
        );
        let succeeded = run(
            &paying,
            WithdrawalCommand::RecordPayout {
                attempt: 1,
                result: PayoutResult::Succeeded,
                max_attempts: 4,
            },
        );
        assert_eq!(compensation(&succeeded, 5 * hour, 4 * hour), None);
    }

    fn policy() -> WithdrawalPolicy {
        WithdrawalPolicy {
            min_amount: Fen::new(100),
            closed_windows: vec![
                Window {
                    from_ms: 1_000,
                    to_ms: 2_000,
                },
                Window {
                    from_ms: 1_900,
                    to_ms: 3_000,
                },
            ],
            staged_opening: Some(StagedOpening {
                modulo: 10,
                schedule: vec![
                    Stage {
                        at_ms: 3_000,
                        open_below: 3,
                    },
                    Stage {
                        at_ms: 4_000,
                        open_below: 10,
                    },
                ],
            }),
        }
    }

    #[test]
    fn gates_check_minimum_windows_and_staged_opening() {
        // Goal: W3 minimum, W4 closed windows (overlaps followed to the end), W5 uid mod N.
        let p = policy();
        assert_eq!(
            p.check(&id("12"), Fen::new(99), 5_000),
            Err(Gate::BelowMinimum { min: Fen::new(100) })
        );
        assert_eq!(
            p.check(&id("12"), Fen::new(100), 1_500),
            Err(Gate::WindowClosed {
                opens_at_ms: Some(3_000)
            })
        );
        assert_eq!(
            p.check(&id("15"), Fen::new(100), 999),
            Ok(()),
            "before the first stage only the windows decide"
        );
        assert_eq!(
            p.check(&id("15"), Fen::new(100), 1_500),
            Err(Gate::WindowClosed {
                opens_at_ms: Some(4_000)
            }),
            "bucket 5 opens at its own stage, after the window"
        );
        assert_eq!(
            p.check(&id("12"), Fen::new(100), 3_000),
            Ok(()),
            "bucket 2 opens in the first stage"
        );
        assert_eq!(
            p.check(&id("15"), Fen::new(100), 3_500),
            Err(Gate::NotYetOpenForUser {
                opens_at_ms: Some(4_000)
            })
        );
        assert_eq!(p.check(&id("15"), Fen::new(100), 4_000), Ok(()));
        assert_eq!(bucket(&id("1234"), 10), 4);
        assert_eq!(
            bucket(&id("alice"), 10),
            bucket(&id("alice"), 10),
            "stable for non-numeric uids"
        );
        assert!(bucket(&id("alice"), 10) < 10);
        assert_eq!(
            WithdrawalPolicy::default().check(&id("x"), Fen::new(100), 0),
            Ok(())
        );
    }

    const HOUR: Millis = 3_600_000;
    const TEN_MINUTES: Millis = 600_000;

    /// The campaign night in one policy: open by day, closed 19:00-01:00, then bucket k of 4
    /// admitted from 01:00 + k x 10 min (times in ms from a midnight at 0).
    fn night() -> WithdrawalPolicy {
        WithdrawalPolicy {
            min_amount: Fen::new(100),
            closed_windows: vec![Window {
                from_ms: 19 * HOUR,
                to_ms: 25 * HOUR,
            }],
            staged_opening: Some(StagedOpening {
                modulo: 4,
                schedule: (0..4)
                    .map(|k| Stage {
                        at_ms: 25 * HOUR + k as Millis * TEN_MINUTES,
                        open_below: k + 1,
                    })
                    .collect(),
            }),
        }
    }

    #[test]
    fn staged_opening_restricts_only_from_its_first_stage() {
        // Goal: by day, before the staged opening begins, every bucket may withdraw; only the
        // windows decide then.
        let p = night();
        for uid in ["0", "1", "2", "3"] {
            assert_eq!(p.check(&id(uid), Fen::new(100), 12 * HOUR), Ok(()), "{uid}");
        }
    }

    #[test]
    fn a_refusal_in_the_window_says_when_that_user_opens() {
        // Goal: opens_at is the moment this user passes every gate: in the closed window, the
        // window's end for bucket 0 and its own stage for the others; during the staged
        // opening, the user's stage.
        let p = night();
        for k in 0..4 {
            assert_eq!(
                p.check(&id(&k.to_string()), Fen::new(100), 20 * HOUR),
                Err(Gate::WindowClosed {
                    opens_at_ms: Some(25 * HOUR + k * TEN_MINUTES)
                }),
                "bucket {k}"
            );
        }
        let five_past_one = 25 * HOUR + TEN_MINUTES / 2;
        assert_eq!(p.check(&id("4"), Fen::new(100), five_past_one), Ok(()));
        assert_eq!(
            p.check(&id("3"), Fen::new(100), five_past_one),
            Err(Gate::NotYetOpenForUser {
                opens_at_ms: Some(25 * HOUR + 3 * TEN_MINUTES)
            })
        );
        assert_eq!(
            p.check(&id("3"), Fen::new(100), 25 * HOUR + 3 * TEN_MINUTES),
            Ok(())
        );
    }

    #[test]
    fn opens_at_follows_windows_and_stages_alternately() {
        // Goal: a stage that falls in a later closed window opens at that window's end; a
        // bucket that no stage admits has no opens_at.
        let mut p = night();
        p.closed_windows.push(Window {
            from_ms: 25 * HOUR + 25 * 60_000,
            to_ms: 25 * HOUR + 40 * 60_000,
        });
        assert_eq!(
            p.check(&id("3"), Fen::new(100), 20 * HOUR),
            Err(Gate::WindowClosed {
                opens_at_ms: Some(25 * HOUR + 40 * 60_000)
            })
        );
        let staged = p.staged_opening.as_mut().unwrap();
        staged.schedule.truncate(2);
        assert_eq!(
            p.check(&id("3"), Fen::new(100), 20 * HOUR),
            Err(Gate::WindowClosed { opens_at_ms: None })
        );
        assert_eq!(
            p.check(&id("3"), Fen::new(100), 26 * HOUR),
            Err(Gate::NotYetOpenForUser { opens_at_ms: None })
        );
    }

    #[test]
    fn a_schedule_by_interval_expands_to_one_stage_per_bucket() {
        // Goal: the convenience form opens bucket k at starts_at + k x interval.
        let staged = StagedOpening::every(4, 25 * HOUR, TEN_MINUTES).unwrap();
        assert_eq!(staged, night().staged_opening.unwrap());
        assert!(StagedOpening::every(4, 0, 0).is_err(), "an interval of 0");
        assert!(StagedOpening::every(0, 0, 1).is_err(), "a modulo of 0");
        assert!(StagedOpening::every(STAGES_MAX as u64 + 1, 0, 1).is_err());
        assert!(
            StagedOpening::every(3, Millis::MAX - 1, 1).is_err(),
            "overflow"
        );
    }

    fn arbitrary_policy() -> impl Strategy<Value = WithdrawalPolicy> {
        let window = (0i64..200, 1i64..60).prop_map(|(from, len)| Window {
            from_ms: from,
            to_ms: from + len,
        });
        let stages = proptest::collection::vec((1i64..40, 0u64..3), 1..6).prop_map(|steps| {
            let (mut at, mut below) = (0, 0);
            steps
                .into_iter()
                .map(|(gap, more)| {
                    at += gap;
                    below += more;
                    Stage {
                        at_ms: at,
                        open_below: below,
                    }
                })
                .collect::<Vec<_>>()
        });
        (
            proptest::collection::vec(window, 0..4),
            proptest::option::of((1u64..6, stages)),
        )
            .prop_map(|(closed_windows, staged)| WithdrawalPolicy {
                min_amount: Fen::new(1),
                closed_windows,
                staged_opening: staged.map(|(modulo, schedule)| StagedOpening { modulo, schedule }),
            })
    }

    proptest! {
        #[test]
        fn opens_at_is_admitted_and_no_earlier_moment_is(
            policy in arbitrary_policy(),
            uid in 0u64..12,
            now in 0i64..300,
        ) {
            // Goal: a refusal's opens_at passes every gate, and no moment from now to it does
            // (admission changes only at window edges and stage times, so those are the
            // moments to try); without opens_at, no later moment passes.
            let uid = id(&uid.to_string());
            let admitted = |t: Millis| policy.check(&uid, Fen::new(1), t).is_ok();
            let mut edges: Vec<Millis> = policy
                .closed_windows
                .iter()
                .flat_map(|w| [w.from_ms, w.to_ms])
                .chain(policy.staged_opening.iter().flat_map(|s| s.schedule.iter().map(|st| st.at_ms)))
                .filter(|t| *t > now)
                .collect();
            edges.push(now);
            edges.sort_unstable();
            let opens_at = match policy.check(&uid, Fen::new(1), now) {
                Ok(()) => Some(now),
                Err(Gate::WindowClosed { opens_at_ms }) | Err(Gate::NotYetOpenForUser { opens_at_ms }) => opens_at_ms,
                Err(other) => panic!("{other:?}"),
            };
            match opens_at {
                Some(t) => {
                    prop_assert!(t >= now);
                    prop_assert!(admitted(t), "opens_at {} is refused", t);
                    for e in edges.iter().filter(|e| **e < t) {
                        prop_assert!(!admitted(*e), "{} admitted before opens_at {}", e, t);
                    }
                }
                None => {
                    for e in &edges {
                        prop_assert!(!admitted(*e), "{} admitted without an opens_at", e);
                    }
                }
            }
        }
    }

    #[test]
    fn a_policy_change_names_its_key_and_old_policy_events_still_decode() {
        // Goal: a change records who made it (role and key id) and when; a repeat of the
        // policy in force is a no-op; the old variant keeps index 0, decodes and replays
        // with no changer.
        let by = ChangedBy {
            role: "admin".into(),
            key_id: "0123abcd".into(),
        };
        let set = SetPolicy {
            policy: policy(),
            by: by.clone(),
        };
        let Ok(Decision::Emit(events, _)) = PolicyState::default().decide(&set, &ctx(42)) else {
            panic!()
        };
        let state = replay(PolicyState::default(), &events);
        assert_eq!(state.policy, policy());
        assert_eq!(state.changed_by, Some((by, 42)));
        assert!(matches!(
            state.decide(&set, &ctx(43)),
            Ok(Decision::Reply(_))
        ));
        let old = Event::Policy(PolicyEvent::PolicySet(policy()));
        let bytes = crate::events::codec::encode(&old).unwrap();
        assert_eq!(crate::events::codec::decode::<Event>(&bytes).unwrap(), old);
        let Event::Policy(old) = old else { panic!() };
        // Byte 0 is the codec's format byte; byte 1 the variant index.
        let index = |e: &PolicyEvent| crate::events::codec::encode(e).unwrap()[1];
        assert_eq!((index(&old), index(&events[0])), (0, 1));
        let state = replay(state, [&old]);
        assert_eq!(state.changed_by, None);
    }

    #[test]
    fn invalid_policies_are_refused() {
        // Goal: a policy that cannot mean anything is a 422, not a silent default.
        let mut p = policy();
        p.closed_windows.push(Window {
            from_ms: 5,
            to_ms: 5,
        });
        assert!(p.validate().is_err());
        let mut p = policy();
        p.staged_opening.as_mut().unwrap().schedule.reverse();
        assert!(p.validate().is_err());
        let mut p = policy();
        p.min_amount = Fen::ZERO;
        assert!(p.validate().is_err());
        assert!(policy().validate().is_ok());
    }

    #[test]
    fn binding_the_same_account_twice_gives_the_same_method() {
        // Goal: method ids are derived, so binding is idempotent.
        let payee = Payee::default();
        let bind = BindMethod {
            channel: Channel::Alipay,
            account: "a@b.c".into(),
        };
        let Ok(Decision::Emit(events, method)) = payee.decide(&bind, &ctx(0)) else {
            panic!()
        };
        let payee = replay(payee, &events);
        assert_eq!(payee.decide(&bind, &ctx(0)), Ok(Decision::Reply(method)));
        let blank = BindMethod {
            channel: Channel::Bank,
            account: " ".into(),
        };
        assert_eq!(
            payee.decide(&blank, &ctx(0)),
            Err(PayeeError::InvalidAccount)
        );
    }

    /// What the channel answers to one attempt, as the payout lane resolves it.
    #[derive(Debug, Clone)]
    enum ChannelOutcome {
        Success,
        Fail,
        /// Timeout, then the query shows it paid.
        TimeoutPaid,
        /// Timeout, then the query shows a failure.
        TimeoutFailed,
        /// Timeout, then the query has no record: the attempt failed (re-sent as the next one).
        TimeoutNoRecord,
    }

    fn outcome() -> impl Strategy<Value = ChannelOutcome> {
        prop_oneof![
            Just(ChannelOutcome::Success),
            Just(ChannelOutcome::Fail),
            Just(ChannelOutcome::TimeoutPaid),
            Just(ChannelOutcome::TimeoutFailed),
            Just(ChannelOutcome::TimeoutNoRecord),
        ]
    }

    proptest! {
        #[test]
        fn every_order_ends_final_with_debit_minus_refund_equal_to_paid(
            outcomes in proptest::collection::vec(outcome(), 1..8),
            max_attempts in 1u32..5,
        ) {
            // Goal: for any sequence of channel outcomes, the order ends final, the money
            // debited minus refunded equals what the channel paid (at most once), and replaying
            // the order's events rebuilds it.
            let mut log = Vec::new();
            let mut order = WithdrawalOrder::default();
            let mut step = |order: &mut WithdrawalOrder, command: WithdrawalCommand| {
                if let Decision::Emit(events, _) = order.decide(&command, &ctx(7)).unwrap() {
                    for e in events {
                        order.evolve(&e);
                        log.push(e);
                    }
                }
            };
            step(&mut order, WithdrawalCommand::Request(request(500)));
            step(&mut order, WithdrawalCommand::RecordDebit);
            let mut paid = 0u32;
            let mut outcomes = outcomes.into_iter();
            while order.state == Some(OrderState::PendingPayout) {
                step(&mut order, WithdrawalCommand::StartPayout);
                let attempt = order.attempts;
                let result = match outcomes.next().unwrap_or(ChannelOutcome::Success) {
                    ChannelOutcome::Success | ChannelOutcome::TimeoutPaid => {
                        paid += 1;
                        PayoutResult::Succeeded
                    }
                    ChannelOutcome::Fail | ChannelOutcome::TimeoutFailed => failed("declined"),
                    ChannelOutcome::TimeoutNoRecord => failed("no record after timeout"),
                };
                step(&mut order, WithdrawalCommand::RecordPayout { attempt, result, max_attempts });
            }
            if order.state == Some(OrderState::Failed) && order.debited {
                step(&mut order, WithdrawalCommand::RecordRefund);
            }
            prop_assert!(order.is_final(), "not final: {:?}", order.state);
            prop_assert!(paid <= 1);
            prop_assert!(order.attempts <= max_attempts);
            let debited = if order.debited { 500 } else { 0 };
            let refunded = if order.refunded { 500 } else { 0 };
            prop_assert_eq!(debited - refunded, 500 * paid);
            prop_assert_eq!(replay(WithdrawalOrder::default(), &log), order);
        }
    }
}
