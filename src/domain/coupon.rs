//! Coupon batches (C1-C15). Three aggregates, each owning only the rules it can decide alone, so
//! that the hot path writes one event per merged group of requests, never one per coupon:
//!
//! - [`CouponIntake`] (`coupon-intake:<shard>`, the shard chosen by the request's seq_no): the
//!   durable acceptance of requests (C1) and their idempotency by seq_no (C8); the verdicts
//!   reached before the stock is touched (risk C12, group exclusion C10, sold out from the local
//!   stock view C4) are recorded here, once.
//! - [`CouponBatch`] (`coupon-batch:<id>`): the stock and the per-user counts (C3, C9, C11),
//!   decided for a merged group of requests at once: one `Deducted` event per group, with each
//!   grant's coupon number and each refusal. It remembers every seq_no it decided, so a repeat
//!   (a retry after an unknown outcome, a re-drive after a crash) gets the recorded answer and
//!   can never take stock twice.
//! - [`CouponGroup`] (`coupon-group:<id>`): mutual exclusion of the group's batches per user
//!   (C10): a request holds the user's place in the group before its batch is asked, and a
//!   batch refusal releases it once.
//!
//! [`next_step`] is the protocol every request follows (the coupon flow executes it; the
//! property tests interleave it with crashes): record the screening verdict on the intake; if
//! the batch has a group, reserve; deduct; if the batch refused a request that holds a group
//! place, release it. Each step is idempotent by seq_no, so a request re-driven from any point
//! ends with the same outcome.

use super::activity::{digest, order_key, Reward};
use super::{Aggregate, Ctx, Decision, Event};
use crate::clock::Millis;
use crate::ids::Id;
use crate::money::Fen;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

/// Largest stock of one batch.
pub const STOCK_MAX: u64 = 1_000_000_000;
/// Largest per-user limit.
pub const PER_USER_LIMIT_MAX: u32 = 1_000;

/// 128-bit key of an id in the idempotency and count maps.
fn key(id: &Id) -> u128 {
    order_key(id)
}

/// Why a request gets no coupon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    SoldOut,
    UserLimit,
    GroupExclusive,
    RiskRejected,
    /// Before `starts_at` or after `ends_at`.
    BatchClosed,
    /// The batch does not exist (a coupon reward naming an unknown batch).
    UnknownBatch,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::SoldOut => "sold_out",
            Refusal::UserLimit => "user_limit",
            Refusal::GroupExclusive => "group_exclusive",
            Refusal::RiskRejected => "risk_rejected",
            Refusal::BatchClosed => "batch_closed",
            Refusal::UnknownBatch => "unknown_batch",
        }
    }
}

/// One issuance request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IssueRequest {
    pub seq_no: Id,
    pub uid: Id,
    pub batch_id: Id,
}

impl IssueRequest {
    /// 64-bit fingerprint of the payload: the same seq_no with another payload is a conflict.
    pub fn fingerprint(&self) -> u64 {
        let d = digest(&[
            self.uid.as_str().as_bytes(),
            self.batch_id.as_str().as_bytes(),
        ]);
        u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
    }
}

/// The request a coupon reward accepted in stream `activity:<id>` becomes: issued under the
/// reserved seq_no `reward:<activity>:<order>` (hashed when that is too long for an id), for the
/// reward's batch (`-`, an unknown batch, when it names none). `None` for another stream.
pub fn reward_request(stream: &str, reward: &Reward) -> Option<(Id, IssueRequest)> {
    let (activity, _shard) = crate::domain::activity::activity_of_stream(stream)?;
    let seq_no =
        Id::parse(&format!("reward:{activity}:{}", reward.order_id)).unwrap_or_else(|_| {
            let k = key(&reward.order_id) ^ key(&activity).rotate_left(1);
            Id::parse(&format!("reward:{k:032x}")).expect("hex is a valid id")
        });
    let request = IssueRequest {
        seq_no,
        uid: reward.uid.clone(),
        batch_id: reward
            .batch_id
            .clone()
            .unwrap_or_else(|| Id::parse("-").expect("valid id")),
    };
    Some((activity, request))
}

// ---------------------------------------------------------------------------------------------
// Intake

/// What is known of a request before its batch decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Accepted, not screened yet.
    Pending,
    /// Screened: the batch decides.
    Passed,
    /// Refused before the batch was asked (risk, group, sold out from the local view), or by
    /// the batch when outcomes are settled on the intake: final.
    Rejected(Refusal),
    /// Issued coupon number `n` of the request's batch, noted on the intake when outcomes are
    /// settled there (a cluster: the intake's partition answers a request's status): final.
    Issued(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntakeMemo {
    pub fingerprint: u64,
    pub verdict: Verdict,
}

/// One intake shard: every request whose seq_no hashes here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CouponIntake {
    pub memos: HashMap<u128, IntakeMemo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum IntakeCommand {
    /// Accepts requests durably (merged: one event for all the new ones).
    Accept { requests: Vec<IssueRequest> },
    /// Records verdicts (merged). A request unknown here (a coupon reward, accepted in its
    /// activity's stream) gets a memo; `Pending -> Passed | Rejected`, `Passed -> Rejected |
    /// Issued`; a rejection and an issue are final.
    Record {
        verdicts: Vec<(IssueRequest, Verdict)>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum IntakeEvent {
    Accepted {
        requests: Vec<IssueRequest>,
        at_ms: Millis,
    },
    Recorded {
        verdicts: Vec<(IssueRequest, Verdict)>,
        at_ms: Millis,
    },
}

impl IntakeEvent {
    pub fn type_name(&self) -> &'static str {
        match self {
            IntakeEvent::Accepted { .. } => "coupon_intake.accepted",
            IntakeEvent::Recorded { .. } => "coupon_intake.recorded",
        }
    }
}

/// The answer to one request of an `Accept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Acceptance {
    /// Accepted now.
    New,
    /// Accepted before with the same payload: the verdict so far.
    Repeat(Verdict),
    /// The seq_no was used with another uid or batch.
    Conflict,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum IntakeReply {
    Accepted(Vec<Acceptance>),
    /// The verdict of each request after the command.
    Verdicts(Vec<Verdict>),
}

/// Intake commands cannot be refused as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum IntakeError {}

impl Aggregate for CouponIntake {
    type Command = IntakeCommand;
    type Event = IntakeEvent;
    type Reply = IntakeReply;
    type Error = IntakeError;

    const STREAM_PREFIX: &'static str = "coupon-intake";

    fn decide(
        &self,
        command: &IntakeCommand,
        ctx: &Ctx,
    ) -> Result<Decision<IntakeEvent, IntakeReply>, IntakeError> {
        match command {
            IntakeCommand::Accept { requests } => {
                // Requests of this command seen so far (a seq_no twice in one command).
                let mut fresh: HashMap<u128, u64> = HashMap::new();
                let mut new = Vec::new();
                let mut answers = Vec::with_capacity(requests.len());
                for request in requests {
                    let (k, fingerprint) = (key(&request.seq_no), request.fingerprint());
                    let known = self
                        .memos
                        .get(&k)
                        .map(|m| (m.fingerprint, m.verdict))
                        .or_else(|| fresh.get(&k).map(|f| (*f, Verdict::Pending)));
                    answers.push(match known {
                        Some((f, verdict)) if f == fingerprint => Acceptance::Repeat(verdict),
                        Some(_) => Acceptance::Conflict,
                        None => {
                            fresh.insert(k, fingerprint);
                            new.push(request.clone());
                            Acceptance::New
                        }
                    });
                }
                let reply = IntakeReply::Accepted(answers);
                if new.is_empty() {
                    return Ok(Decision::Reply(reply));
                }
                let event = IntakeEvent::Accepted {
                    requests: new,
                    at_ms: ctx.now_ms,
                };
                Ok(Decision::Emit(vec![event], reply))
            }
            IntakeCommand::Record { verdicts } => {
                let mut changed: HashMap<u128, Verdict> = HashMap::new();
                let mut recorded = Vec::new();
                let mut answers = Vec::with_capacity(verdicts.len());
                for (request, verdict) in verdicts {
                    let k = key(&request.seq_no);
                    let current = changed
                        .get(&k)
                        .copied()
                        .or_else(|| self.memos.get(&k).map(|m| m.verdict));
                    let next = match (current, *verdict) {
                        (None, v) => Some(v),
                        (Some(Verdict::Pending), v @ (Verdict::Passed | Verdict::Rejected(_))) => {
                            Some(v)
                        }
                        (
                            Some(Verdict::Passed),
                            v @ (Verdict::Rejected(_) | Verdict::Issued(_)),
                        ) => Some(v),
                        _ => None,
                    };
                    match next {
                        Some(v) => {
                            changed.insert(k, v);
                            recorded.push((request.clone(), v));
                            answers.push(v);
                        }
                        None => answers.push(current.expect("known when not recorded")),
                    }
                }
                let reply = IntakeReply::Verdicts(answers);
                if recorded.is_empty() {
                    return Ok(Decision::Reply(reply));
                }
                let event = IntakeEvent::Recorded {
                    verdicts: recorded,
                    at_ms: ctx.now_ms,
                };
                Ok(Decision::Emit(vec![event], reply))
            }
        }
    }

    fn evolve(&mut self, event: &IntakeEvent) {
        match event {
            IntakeEvent::Accepted { requests, .. } => {
                for request in requests {
                    self.memos
                        .entry(key(&request.seq_no))
                        .or_insert(IntakeMemo {
                            fingerprint: request.fingerprint(),
                            verdict: Verdict::Pending,
                        });
                }
            }
            IntakeEvent::Recorded { verdicts, .. } => {
                for (request, verdict) in verdicts {
                    self.memos
                        .entry(key(&request.seq_no))
                        .and_modify(|m| m.verdict = *verdict)
                        .or_insert(IntakeMemo {
                            fingerprint: request.fingerprint(),
                            verdict: *verdict,
                        });
                }
            }
        }
    }

    fn correlation_id(_: &IntakeCommand) -> String {
        String::new()
    }

    fn wrap(event: IntakeEvent) -> Event {
        Event::CouponIntake(event)
    }

    fn unwrap(event: &Event) -> Option<&IntakeEvent> {
        match event {
            Event::CouponIntake(e) => Some(e),
            _ => None,
        }
    }
}

/// The intake shard of a seq_no, out of `shards`.
pub fn intake_shard(seq_no: &Id, shards: u32) -> u32 {
    (key(seq_no) % u128::from(shards.max(1))) as u32
}

// ---------------------------------------------------------------------------------------------
// Batch

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchSpec {
    pub group_id: Option<Id>,
    pub stock: u64,
    pub per_user_limit: u32,
    pub value: Fen,
    pub starts_at_ms: Option<Millis>,
    pub ends_at_ms: Option<Millis>,
}

/// What the batch decided for one seq_no.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Issue {
    /// Coupon number `n` of the batch (1-based): coupon id `<batch>-<n>`.
    Granted(u64),
    Refused(Refusal),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CouponBatch {
    pub spec: Option<BatchSpec>,
    pub issued: u64,
    /// Coupons held per user (by the uid's key).
    pub per_user: HashMap<u128, u32>,
    /// Every seq_no decided (by its key).
    pub decided: HashMap<u128, Issue>,
}

impl CouponBatch {
    pub fn remaining(&self) -> u64 {
        self.spec
            .as_ref()
            .map(|s| s.stock.saturating_sub(self.issued))
            .unwrap_or(0)
    }

    pub fn info(&self) -> Option<BatchInfo> {
        self.spec.as_ref().map(|spec| BatchInfo {
            spec: spec.clone(),
            issued: self.issued,
        })
    }
}

/// A batch's spec and issued count: what the local stock view keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchInfo {
    pub spec: BatchSpec,
    pub issued: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchCommand {
    Create(BatchSpec),
    /// Decides a merged group of requests `(seq_no, uid)` at once.
    Deduct {
        requests: Vec<(Id, Id)>,
    },
    /// The spec and issued count (no event).
    Info,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub seq_no: Id,
    pub uid: Id,
    pub coupon_no: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    pub seq_no: Id,
    pub uid: Id,
    pub reason: Refusal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchEvent {
    Created {
        spec: BatchSpec,
        at_ms: Millis,
    },
    /// One merged deduction: the stock goes down by `grants.len()`.
    Deducted {
        grants: Vec<Grant>,
        refusals: Vec<Refused>,
        at_ms: Millis,
    },
}

impl BatchEvent {
    pub fn type_name(&self) -> &'static str {
        match self {
            BatchEvent::Created { .. } => "coupon_batch.created",
            BatchEvent::Deducted { .. } => "coupon_batch.deducted",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchReply {
    Info(BatchInfo),
    /// One outcome per request, in order, and the batch's issued count after.
    Deducted {
        outcomes: Vec<Issue>,
        issued: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum BatchError {
    #[error("batch id already used with another spec")]
    IdempotencyConflict,
    #[error("no such batch")]
    Unknown,
    #[error("stock must be 1 to {STOCK_MAX}")]
    InvalidStock,
    #[error("per_user_limit must be 1 to {PER_USER_LIMIT_MAX}")]
    InvalidLimit,
    #[error("value must be at least 1 fen")]
    InvalidValue,
    #[error("ends_at must be after starts_at")]
    InvalidWindow,
}

impl Aggregate for CouponBatch {
    type Command = BatchCommand;
    type Event = BatchEvent;
    type Reply = BatchReply;
    type Error = BatchError;

    const STREAM_PREFIX: &'static str = "coupon-batch";

    fn decide(
        &self,
        command: &BatchCommand,
        ctx: &Ctx,
    ) -> Result<Decision<BatchEvent, BatchReply>, BatchError> {
        match command {
            BatchCommand::Create(spec) => {
                if let Some(existing) = &self.spec {
                    return if existing == spec {
                        Ok(Decision::Reply(BatchReply::Info(
                            self.info().expect("created"),
                        )))
                    } else {
                        Err(BatchError::IdempotencyConflict)
                    };
                }
                if spec.stock == 0 || spec.stock > STOCK_MAX {
                    return Err(BatchError::InvalidStock);
                }
                if spec.per_user_limit == 0 || spec.per_user_limit > PER_USER_LIMIT_MAX {
                    return Err(BatchError::InvalidLimit);
                }
                if spec.value.is_zero() {
                    return Err(BatchError::InvalidValue);
                }
                if let (Some(from), Some(to)) = (spec.starts_at_ms, spec.ends_at_ms) {
                    if to <= from {
                        return Err(BatchError::InvalidWindow);
                    }
                }
                let reply = BatchReply::Info(BatchInfo {
                    spec: spec.clone(),
                    issued: 0,
                });
                let event = BatchEvent::Created {
                    spec: spec.clone(),
                    at_ms: ctx.now_ms,
                };
                Ok(Decision::Emit(vec![event], reply))
            }
            BatchCommand::Info => self
                .info()
                .map(|i| Decision::Reply(BatchReply::Info(i)))
                .ok_or(BatchError::Unknown),
            BatchCommand::Deduct { requests } => {
                let spec = self.spec.as_ref().ok_or(BatchError::Unknown)?;
                let open = spec.starts_at_ms.is_none_or(|t| ctx.now_ms >= t)
                    && spec.ends_at_ms.is_none_or(|t| ctx.now_ms < t);
                // This command's own decisions, on top of the state (no clone of the maps).
                let mut issued = self.issued;
                let mut held: HashMap<u128, u32> = HashMap::new();
                let mut decided: HashMap<u128, Issue> = HashMap::new();
                let (mut grants, mut refusals) = (Vec::new(), Vec::new());
                let mut outcomes = Vec::with_capacity(requests.len());
                for (seq_no, uid) in requests {
                    let k = key(seq_no);
                    if let Some(outcome) = self.decided.get(&k).or_else(|| decided.get(&k)) {
                        outcomes.push(*outcome);
                        continue;
                    }
                    let u = key(uid);
                    let has = self.per_user.get(&u).copied().unwrap_or(0)
                        + held.get(&u).copied().unwrap_or(0);
                    let outcome = if !open {
                        Issue::Refused(Refusal::BatchClosed)
                    } else if issued >= spec.stock {
                        Issue::Refused(Refusal::SoldOut)
                    } else if has >= spec.per_user_limit {
                        Issue::Refused(Refusal::UserLimit)
                    } else {
                        issued += 1;
                        *held.entry(u).or_default() += 1;
                        Issue::Granted(issued)
                    };
                    match outcome {
                        Issue::Granted(coupon_no) => grants.push(Grant {
                            seq_no: seq_no.clone(),
                            uid: uid.clone(),
                            coupon_no,
                        }),
                        Issue::Refused(reason) => refusals.push(Refused {
                            seq_no: seq_no.clone(),
                            uid: uid.clone(),
                            reason,
                        }),
                    }
                    decided.insert(k, outcome);
                    outcomes.push(outcome);
                }
                let reply = BatchReply::Deducted { outcomes, issued };
                if grants.is_empty() && refusals.is_empty() {
                    return Ok(Decision::Reply(reply));
                }
                let event = BatchEvent::Deducted {
                    grants,
                    refusals,
                    at_ms: ctx.now_ms,
                };
                Ok(Decision::Emit(vec![event], reply))
            }
        }
    }

    fn evolve(&mut self, event: &BatchEvent) {
        match event {
            BatchEvent::Created { spec, .. } => self.spec = Some(spec.clone()),
            BatchEvent::Deducted {
                grants, refusals, ..
            } => {
                for grant in grants {
                    self.issued = self.issued.max(grant.coupon_no);
                    *self.per_user.entry(key(&grant.uid)).or_default() += 1;
                    self.decided
                        .insert(key(&grant.seq_no), Issue::Granted(grant.coupon_no));
                }
                for refused in refusals {
                    self.decided
                        .insert(key(&refused.seq_no), Issue::Refused(refused.reason));
                }
            }
        }
    }

    fn correlation_id(_: &BatchCommand) -> String {
        String::new()
    }

    fn wrap(event: BatchEvent) -> Event {
        Event::CouponBatch(event)
    }

    fn unwrap(event: &Event) -> Option<&BatchEvent> {
        match event {
            Event::CouponBatch(e) => Some(e),
            _ => None,
        }
    }
}

/// The coupon id of coupon number `n` of a batch.
pub fn coupon_id(batch_id: &Id, coupon_no: u64) -> String {
    format!("{batch_id}-{coupon_no}")
}

// ---------------------------------------------------------------------------------------------
// Group

/// A user's place in a group: the batch it holds and how many requests hold it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holding {
    pub batch_id: Id,
    pub count: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Place {
    /// The request holds its user's place in the group for its batch.
    Held,
    /// The user holds another batch of the group: final.
    Refused,
    /// Held, then given back after the batch refused the request.
    Released,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CouponGroup {
    pub holders: HashMap<u128, Holding>,
    pub places: HashMap<u128, Place>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupCommand {
    Reserve { requests: Vec<IssueRequest> },
    Release { requests: Vec<IssueRequest> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupEvent {
    Reserved {
        held: Vec<IssueRequest>,
        refused: Vec<IssueRequest>,
        at_ms: Millis,
    },
    Released {
        released: Vec<IssueRequest>,
        at_ms: Millis,
    },
}

impl GroupEvent {
    pub fn type_name(&self) -> &'static str {
        match self {
            GroupEvent::Reserved { .. } => "coupon_group.reserved",
            GroupEvent::Released { .. } => "coupon_group.released",
        }
    }
}

/// Group commands cannot be refused as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum GroupError {}

impl Aggregate for CouponGroup {
    type Command = GroupCommand;
    type Event = GroupEvent;
    /// Each request's place after the command, in order.
    type Reply = Vec<Option<Place>>;
    type Error = GroupError;

    const STREAM_PREFIX: &'static str = "coupon-group";

    fn decide(
        &self,
        command: &GroupCommand,
        ctx: &Ctx,
    ) -> Result<Decision<GroupEvent, Vec<Option<Place>>>, GroupError> {
        let mut places: HashMap<u128, Place> = HashMap::new();
        let mut holders: HashMap<u128, Option<Holding>> = HashMap::new();
        let holding = |holders: &HashMap<u128, Option<Holding>>, u: u128| -> Option<Holding> {
            match holders.get(&u) {
                Some(h) => h.clone(),
                None => self.holders.get(&u).cloned(),
            }
        };
        let mut answers = Vec::new();
        let (mut first, mut second) = (Vec::new(), Vec::new());
        for request in match command {
            GroupCommand::Reserve { requests } | GroupCommand::Release { requests } => requests,
        } {
            let (k, u) = (key(&request.seq_no), key(&request.uid));
            let place = places.get(&k).or_else(|| self.places.get(&k)).copied();
            let next = match (command, place) {
                (GroupCommand::Reserve { .. }, None) => match holding(&holders, u) {
                    Some(h) if h.batch_id != request.batch_id => {
                        second.push(request.clone());
                        Some(Place::Refused)
                    }
                    h => {
                        let count = h.map(|h| h.count).unwrap_or(0) + 1;
                        holders.insert(
                            u,
                            Some(Holding {
                                batch_id: request.batch_id.clone(),
                                count,
                            }),
                        );
                        first.push(request.clone());
                        Some(Place::Held)
                    }
                },
                (GroupCommand::Release { .. }, Some(Place::Held)) => {
                    let left = holding(&holders, u)
                        .filter(|h| h.count > 1)
                        .map(|h| Holding {
                            batch_id: h.batch_id,
                            count: h.count - 1,
                        });
                    holders.insert(u, left);
                    first.push(request.clone());
                    Some(Place::Released)
                }
                _ => None,
            };
            if let Some(p) = next {
                places.insert(k, p);
            }
            answers.push(next.or(place));
        }
        if first.is_empty() && second.is_empty() {
            return Ok(Decision::Reply(answers));
        }
        let event = match command {
            GroupCommand::Reserve { .. } => GroupEvent::Reserved {
                held: first,
                refused: second,
                at_ms: ctx.now_ms,
            },
            GroupCommand::Release { .. } => GroupEvent::Released {
                released: first,
                at_ms: ctx.now_ms,
            },
        };
        Ok(Decision::Emit(vec![event], answers))
    }

    fn evolve(&mut self, event: &GroupEvent) {
        match event {
            GroupEvent::Reserved { held, refused, .. } => {
                for request in held {
                    let holding = self.holders.entry(key(&request.uid)).or_insert(Holding {
                        batch_id: request.batch_id.clone(),
                        count: 0,
                    });
                    holding.count += 1;
                    self.places.insert(key(&request.seq_no), Place::Held);
                }
                for request in refused {
                    self.places.insert(key(&request.seq_no), Place::Refused);
                }
            }
            GroupEvent::Released { released, .. } => {
                for request in released {
                    let u = key(&request.uid);
                    if let Some(holding) = self.holders.get_mut(&u) {
                        holding.count = holding.count.saturating_sub(1);
                        if holding.count == 0 {
                            self.holders.remove(&u);
                        }
                    }
                    self.places.insert(key(&request.seq_no), Place::Released);
                }
            }
        }
    }

    fn correlation_id(_: &GroupCommand) -> String {
        String::new()
    }

    fn wrap(event: GroupEvent) -> Event {
        Event::CouponGroup(event)
    }

    fn unwrap(event: &Event) -> Option<&GroupEvent> {
        match event {
            Event::CouponGroup(e) => Some(e),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The protocol

/// What a request's driver knows so far (from the replies it got).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// The verdict recorded on the intake, once asked.
    pub verdict: Option<Verdict>,
    /// The group place, once asked (requests of grouped batches only). After a release it is
    /// `Released` even if the request never held a place.
    pub place: Option<Place>,
    /// The batch's decision, once asked.
    pub issue: Option<Issue>,
    /// The local stock view said sold out and the batch was never asked for this request in
    /// this process: the refusal may be recorded on the intake without asking the batch.
    pub sold_out_locally: bool,
}

/// The next thing to do for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Record this verdict on the intake (the screening's, or a later rejection).
    Record(Verdict),
    Reserve,
    Deduct,
    Release,
    Done(Outcome),
}

/// A request's final outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Issued(u64),
    Rejected(Refusal),
}

/// The protocol: given what is known, the next step. `screen` is the risk verdict (None:
/// passed); `grouped` whether the batch has a group; `settle` whether the batch's decision is
/// noted on the intake too before the request is done (on a cluster the intake and the batch
/// live in different partitions, and the intake's view answers the request's status).
pub fn next_step(
    progress: &Progress,
    screen: Option<Refusal>,
    grouped: bool,
    settle: bool,
) -> Step {
    let verdict = match progress.verdict {
        None | Some(Verdict::Pending) => {
            return Step::Record(screen.map_or(Verdict::Passed, Verdict::Rejected))
        }
        // A request rejected after it took a group place (sold out from the local view) gives
        // the place back first; asking again is harmless (a release is idempotent).
        Some(Verdict::Rejected(Refusal::SoldOut))
            if grouped && !matches!(progress.place, Some(Place::Released | Place::Refused)) =>
        {
            return Step::Release
        }
        Some(Verdict::Rejected(reason)) => return Step::Done(Outcome::Rejected(reason)),
        Some(Verdict::Issued(n)) => return Step::Done(Outcome::Issued(n)),
        Some(Verdict::Passed) => Verdict::Passed,
    };
    debug_assert_eq!(verdict, Verdict::Passed);
    if grouped {
        match progress.place {
            None => return Step::Reserve,
            Some(Place::Refused) => {
                return Step::Record(Verdict::Rejected(Refusal::GroupExclusive))
            }
            Some(Place::Held) | Some(Place::Released) => {}
        }
    }
    match progress.issue {
        None if progress.sold_out_locally => Step::Record(Verdict::Rejected(Refusal::SoldOut)),
        None => Step::Deduct,
        Some(Issue::Granted(n)) if settle => Step::Record(Verdict::Issued(n)),
        Some(Issue::Granted(n)) => Step::Done(Outcome::Issued(n)),
        Some(Issue::Refused(reason)) => {
            if grouped && progress.place == Some(Place::Held) {
                Step::Release
            } else if settle {
                Step::Record(Verdict::Rejected(reason))
            } else {
                Step::Done(Outcome::Rejected(reason))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Risk rules (C12)

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RiskRules {
    /// Users refused outright.
    pub blocklist: HashSet<Id>,
    /// At most this many requests per user per window (0: no velocity rule).
    pub velocity_max: u32,
    pub velocity_window_ms: Millis,
}

/// Risk screening (C12): the configured blocklist and a per-user velocity over fixed windows.
pub struct Risk {
    rules: RiskRules,
    recent: HashMap<u128, (i64, u32)>,
    /// Verdicts by seq_no while the request is outstanding: a request screened twice (its
    /// queued copy and a green drive) counts once towards the velocity and gets one verdict.
    verdicts: HashMap<u128, Option<Refusal>>,
}

impl Risk {
    pub fn new(rules: RiskRules) -> Risk {
        Risk {
            rules,
            recent: HashMap::new(),
            verdicts: HashMap::new(),
        }
    }

    pub fn screen(&mut self, request: &IssueRequest, now_ms: Millis) -> Option<Refusal> {
        let seq = order_key(&request.seq_no);
        if let Some(verdict) = self.verdicts.get(&seq) {
            return *verdict;
        }
        if self.verdicts.len() > 1_000_000 {
            // Green retries of finished requests leave entries behind; the intake memo keeps
            // the verdict that counts, this is only the velocity's bookkeeping.
            self.verdicts.clear();
        }
        let verdict = self.judge(&request.uid, now_ms);
        self.verdicts.insert(seq, verdict);
        verdict
    }

    /// The request's own copy finished: its verdict is in the intake memo.
    pub fn forget(&mut self, seq_no: &Id) {
        self.verdicts.remove(&order_key(seq_no));
    }

    fn judge(&mut self, uid: &Id, now_ms: Millis) -> Option<Refusal> {
        if self.rules.blocklist.contains(uid) {
            return Some(Refusal::RiskRejected);
        }
        if self.rules.velocity_max == 0 {
            return None;
        }
        let window = now_ms / self.rules.velocity_window_ms.max(1);
        if self.recent.len() > 1_000_000 {
            self.recent.retain(|_, (w, _)| *w == window);
        }
        let entry = self.recent.entry(order_key(uid)).or_insert((window, 0));
        if entry.0 != window {
            *entry = (window, 0);
        }
        entry.1 += 1;
        (entry.1 > self.rules.velocity_max).then_some(Refusal::RiskRejected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::replay;
    use proptest::prelude::*;

    fn id(s: &str) -> Id {
        Id::parse(s).unwrap()
    }

    fn issue(seq: &str, uid: &str) -> IssueRequest {
        IssueRequest {
            seq_no: id(seq),
            uid: id(uid),
            batch_id: id("b"),
        }
    }

    #[test]
    fn risk_refuses_the_blocklist_and_a_user_above_the_velocity_within_a_window() {
        let mut risk = Risk::new(RiskRules {
            blocklist: [id("fraud")].into_iter().collect(),
            velocity_max: 2,
            velocity_window_ms: 1_000,
        });
        assert_eq!(
            risk.screen(&issue("s0", "fraud"), 0),
            Some(Refusal::RiskRejected)
        );
        assert_eq!(risk.screen(&issue("s1", "u"), 0), None);
        assert_eq!(risk.screen(&issue("s2", "u"), 10), None);
        assert_eq!(
            risk.screen(&issue("s3", "u"), 20),
            Some(Refusal::RiskRejected)
        );
        // A new window starts the count again.
        assert_eq!(risk.screen(&issue("s4", "u"), 1_000), None);
    }

    #[test]
    fn risk_screens_one_request_once_while_it_is_outstanding() {
        // The queued copy and a green drive of one seq_no count once and get one verdict.
        let mut risk = Risk::new(RiskRules {
            velocity_max: 1,
            velocity_window_ms: 60_000,
            ..RiskRules::default()
        });
        assert_eq!(risk.screen(&issue("s1", "u"), 0), None);
        assert_eq!(risk.screen(&issue("s1", "u"), 1), None);
        assert_eq!(
            risk.screen(&issue("s2", "u"), 2),
            Some(Refusal::RiskRejected)
        );
        risk.forget(&id("s2"));
        assert_eq!(
            risk.screen(&issue("s2", "u"), 3),
            Some(Refusal::RiskRejected)
        );
    }

    fn spec(stock: u64, limit: u32, group: Option<&str>) -> BatchSpec {
        BatchSpec {
            group_id: group.map(id),
            stock,
            per_user_limit: limit,
            value: Fen::new(500),
            starts_at_ms: None,
            ends_at_ms: None,
        }
    }

    fn run<A: Aggregate>(state: &A, command: A::Command) -> Result<(A, A::Reply), A::Error> {
        match state.decide(&command, &Ctx { now_ms: 1_000 })? {
            Decision::Emit(events, reply) => Ok((replay(state.clone(), &events), reply)),
            Decision::Reply(reply) => Ok((state.clone(), reply)),
        }
    }

    fn batch(stock: u64, limit: u32) -> CouponBatch {
        run(
            &CouponBatch::default(),
            BatchCommand::Create(spec(stock, limit, None)),
        )
        .unwrap()
        .0
    }

    fn deduct(b: &CouponBatch, requests: &[(&str, &str)]) -> (CouponBatch, Vec<Issue>) {
        let requests = requests.iter().map(|(s, u)| (id(s), id(u))).collect();
        match run(b, BatchCommand::Deduct { requests }).unwrap() {
            (b, BatchReply::Deducted { outcomes, .. }) => (b, outcomes),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_merged_deduction_grants_in_order_until_the_stock_is_gone() {
        let b = batch(2, 5);
        let (b, outcomes) = deduct(&b, &[("s1", "u1"), ("s2", "u2"), ("s3", "u3")]);
        assert_eq!(
            outcomes,
            vec![
                Issue::Granted(1),
                Issue::Granted(2),
                Issue::Refused(Refusal::SoldOut)
            ]
        );
        assert_eq!((b.issued, b.remaining()), (2, 0));
        // A repeat answers the recorded outcome and emits nothing.
        let events = b
            .decide(
                &BatchCommand::Deduct {
                    requests: vec![(id("s1"), id("u1")), (id("s3"), id("u3"))],
                },
                &Ctx { now_ms: 2 },
            )
            .unwrap();
        assert!(
            matches!(events, Decision::Reply(BatchReply::Deducted { ref outcomes, .. })
            if outcomes == &vec![Issue::Granted(1), Issue::Refused(Refusal::SoldOut)])
        );
    }

    #[test]
    fn the_per_user_limit_counts_grants_within_one_merged_group() {
        let b = batch(10, 2);
        let (b, outcomes) = deduct(&b, &[("a", "u"), ("b", "u"), ("c", "u"), ("a", "u")]);
        assert_eq!(
            outcomes,
            vec![
                Issue::Granted(1),
                Issue::Granted(2),
                Issue::Refused(Refusal::UserLimit),
                Issue::Granted(1)
            ]
        );
        assert_eq!(b.per_user[&key(&id("u"))], 2);
    }

    #[test]
    fn a_closed_window_refuses_and_bad_specs_are_refused() {
        let mut s = spec(5, 1, None);
        s.starts_at_ms = Some(5_000);
        let b = run(&CouponBatch::default(), BatchCommand::Create(s.clone()))
            .unwrap()
            .0;
        assert_eq!(
            deduct(&b, &[("s", "u")]).1,
            vec![Issue::Refused(Refusal::BatchClosed)]
        );
        for (bad, error) in [
            (spec(0, 1, None), BatchError::InvalidStock),
            (spec(1, 0, None), BatchError::InvalidLimit),
        ] {
            assert_eq!(
                run(&CouponBatch::default(), BatchCommand::Create(bad)).unwrap_err(),
                error
            );
        }
        assert_eq!(
            run(&b, BatchCommand::Create(spec(5, 1, None))).unwrap_err(),
            BatchError::IdempotencyConflict
        );
    }

    #[test]
    fn intake_accepts_once_and_spots_conflicts() {
        let r = |s: &str, u: &str| IssueRequest {
            seq_no: id(s),
            uid: id(u),
            batch_id: id("b"),
        };
        let (intake, reply) = run(
            &CouponIntake::default(),
            IntakeCommand::Accept {
                requests: vec![r("1", "u"), r("1", "u"), r("1", "v")],
            },
        )
        .unwrap();
        assert_eq!(
            reply,
            IntakeReply::Accepted(vec![
                Acceptance::New,
                Acceptance::Repeat(Verdict::Pending),
                Acceptance::Conflict
            ])
        );
        let rejected = Verdict::Rejected(Refusal::RiskRejected);
        let (intake, reply) = run(
            &intake,
            IntakeCommand::Record {
                verdicts: vec![(r("1", "u"), rejected), (r("1", "u"), Verdict::Passed)],
            },
        )
        .unwrap();
        assert_eq!(reply, IntakeReply::Verdicts(vec![rejected, rejected]));
        let (_, reply) = run(
            &intake,
            IntakeCommand::Accept {
                requests: vec![r("1", "u")],
            },
        )
        .unwrap();
        assert_eq!(
            reply,
            IntakeReply::Accepted(vec![Acceptance::Repeat(rejected)])
        );
    }

    #[test]
    fn a_group_holds_one_batch_per_user_until_released() {
        let r = |s: &str, b: &str| IssueRequest {
            seq_no: id(s),
            uid: id("u"),
            batch_id: id(b),
        };
        let (g, places) = run(
            &CouponGroup::default(),
            GroupCommand::Reserve {
                requests: vec![r("1", "a"), r("2", "b"), r("3", "a")],
            },
        )
        .unwrap();
        assert_eq!(
            places,
            vec![Some(Place::Held), Some(Place::Refused), Some(Place::Held)]
        );
        let (g, _) = run(
            &g,
            GroupCommand::Release {
                requests: vec![r("1", "a"), r("1", "a")],
            },
        )
        .unwrap();
        assert_eq!(g.holders[&key(&id("u"))].count, 1, "released once");
        let (g, _) = run(
            &g,
            GroupCommand::Release {
                requests: vec![r("3", "a")],
            },
        )
        .unwrap();
        assert!(g.holders.is_empty());
        let (_, places) = run(
            &g,
            GroupCommand::Reserve {
                requests: vec![r("4", "b")],
            },
        )
        .unwrap();
        assert_eq!(places, vec![Some(Place::Held)]);
    }

    /// A request in the protocol model.
    #[derive(Debug, Clone)]
    struct Driven {
        request: IssueRequest,
        screen: Option<Refusal>,
        progress: Progress,
        done: Option<Outcome>,
    }

    /// The system under test: one intake, a group, two batches of that group and one without.
    #[derive(Debug, Clone, Default)]
    struct World {
        intake: CouponIntake,
        group: CouponGroup,
        batches: HashMap<String, CouponBatch>,
        /// Process memory: seq_nos sent to a batch since the (re)start.
        dispatched: std::collections::HashSet<u128>,
        restarted: bool,
        /// Outcomes settled on the intake (a cluster's protocol).
        settle: bool,
    }

    impl World {
        fn new(stock: u64, limit: u32) -> World {
            let mut w = World::default();
            for (name, group) in [("g1", Some("grp")), ("g2", Some("grp")), ("free", None)] {
                let b = run(
                    &CouponBatch::default(),
                    BatchCommand::Create(spec(stock, limit, group)),
                )
                .unwrap()
                .0;
                w.batches.insert(name.into(), b);
            }
            w
        }

        fn grouped(&self, batch: &Id) -> bool {
            self.batches[batch.as_str()]
                .spec
                .as_ref()
                .unwrap()
                .group_id
                .is_some()
        }

        /// Executes one step of one request; `lose_reply` drops the reply (the effect stays:
        /// an unknown outcome, as a timeout or a crash after the write).
        fn step(&mut self, d: &mut Driven, lose_reply: bool) {
            let grouped = self.grouped(&d.request.batch_id);
            // The flow's local sold-out shortcut: only for a request no driver of this process
            // has sent to the batch, and never for requests re-driven after a restart.
            let k = key(&d.request.seq_no);
            if d.progress.issue.is_none()
                && !self.restarted
                && !self.dispatched.contains(&k)
                && self.batches[d.request.batch_id.as_str()].remaining() == 0
            {
                d.progress.sold_out_locally = true;
            }
            match next_step(&d.progress, d.screen, grouped, self.settle) {
                Step::Done(outcome) => d.done = Some(outcome),
                Step::Record(verdict) => {
                    let (next, reply) = run(
                        &self.intake,
                        IntakeCommand::Record {
                            verdicts: vec![(d.request.clone(), verdict)],
                        },
                    )
                    .unwrap();
                    self.intake = next;
                    if let (IntakeReply::Verdicts(v), false) = (reply, lose_reply) {
                        d.progress.verdict = Some(v[0]);
                    }
                }
                Step::Reserve => {
                    let (next, reply) = run(
                        &self.group,
                        GroupCommand::Reserve {
                            requests: vec![d.request.clone()],
                        },
                    )
                    .unwrap();
                    self.group = next;
                    if !lose_reply {
                        d.progress.place = reply[0];
                    }
                }
                Step::Release => {
                    let (next, reply) = run(
                        &self.group,
                        GroupCommand::Release {
                            requests: vec![d.request.clone()],
                        },
                    )
                    .unwrap();
                    self.group = next;
                    if !lose_reply {
                        d.progress.place = Some(reply[0].unwrap_or(Place::Released));
                    }
                }
                Step::Deduct => {
                    self.dispatched.insert(key(&d.request.seq_no));
                    let b = &self.batches[d.request.batch_id.as_str()];
                    let (next, reply) = run(
                        b,
                        BatchCommand::Deduct {
                            requests: vec![(d.request.seq_no.clone(), d.request.uid.clone())],
                        },
                    )
                    .unwrap();
                    self.batches.insert(d.request.batch_id.to_string(), next);
                    if let (BatchReply::Deducted { outcomes, .. }, false) = (reply, lose_reply) {
                        d.progress.issue = Some(outcomes[0]);
                    }
                }
            }
        }
    }

    fn requests() -> impl Strategy<Value = Vec<(u8, u8, u8, bool)>> {
        // (seq, uid, batch, risky)
        prop::collection::vec((0u8..30, 0u8..6, 0u8..3, prop::bool::weighted(0.1)), 1..60)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn interleavings_with_lost_replies_and_crashes_keep_every_invariant(
            reqs in requests(),
            schedule in prop::collection::vec((any::<prop::sample::Index>(), prop::bool::weighted(0.15), prop::bool::weighted(0.05)), 0..400),
            stock in 1u64..12,
            limit in 1u32..3,
            settle in any::<bool>(),
        ) {
            let mut world = World::new(stock, limit);
            world.settle = settle;
            let names = ["g1", "g2", "free"];
            // One payload per seq_no (the intake refuses other payloads for a seq_no), but a
            // seq_no may have two drivers at once (the green channel and the queue).
            let mut first: HashMap<u8, (u8, u8, bool)> = HashMap::new();
            let driven_reqs: Vec<(u8, u8, u8, bool)> = reqs.iter().map(|(s, u, b, r)| {
                let (u, b, r) = *first.entry(*s).or_insert((*u, *b, *r));
                (*s, u, b, r)
            }).collect();
            let mut driven: Vec<Driven> = driven_reqs.iter().map(|(s, u, b, risky)| Driven {
                request: IssueRequest { seq_no: id(&format!("s{s}")), uid: id(&format!("u{u}")), batch_id: id(names[*b as usize]) },
                screen: risky.then_some(Refusal::RiskRejected),
                progress: Progress::default(),
                done: None,
            }).collect();
            for (pick, lose, crash) in schedule {
                let i = pick.index(driven.len());
                if crash {
                    // A crash forgets every driver's progress: re-driven from the start.
                    for d in &mut driven { d.progress = Progress::default(); d.done = None; }
                    world.dispatched.clear();
                    world.restarted = true;
                    continue;
                }
                let mut d = driven[i].clone();
                if d.done.is_none() { world.step(&mut d, lose); }
                driven[i] = d;
            }
            // Drive everything to the end (no more failures).
            for d in &mut driven {
                for _ in 0..10 { if d.done.is_some() { break; } world.step(d, false); }
                prop_assert!(d.done.is_some(), "{:?} never finished", d.request);
            }
            // Invariants. Every driver of a seq_no ends with the same outcome.
            let mut outcome_of: HashMap<u128, Outcome> = HashMap::new();
            for d in &driven {
                let o = *outcome_of.entry(key(&d.request.seq_no)).or_insert(d.done.unwrap());
                prop_assert_eq!(o, d.done.unwrap(), "two outcomes for {}", d.request.seq_no);
            }
            let mut per_user_batch: HashMap<(String, String), u32> = HashMap::new();
            let mut counted = std::collections::HashSet::new();
            for d in driven.iter().filter(|d| counted.insert(key(&d.request.seq_no))) {
                let b = &world.batches[d.request.batch_id.as_str()];
                let k = key(&d.request.seq_no);
                let verdict = world.intake.memos[&k].verdict;
                match d.done.unwrap() {
                    Outcome::Issued(n) => {
                        prop_assert_eq!(b.decided.get(&k), Some(&Issue::Granted(n)));
                        // Settled: the intake says what the batch decided; otherwise it only
                        // knows the request passed.
                        let noted = if settle { Verdict::Issued(n) } else { Verdict::Passed };
                        prop_assert_eq!(verdict, noted, "issued but the intake says otherwise");
                        *per_user_batch.entry((d.request.uid.to_string(), d.request.batch_id.to_string())).or_default() += 1;
                    }
                    Outcome::Rejected(reason) => {
                        prop_assert!(!matches!(b.decided.get(&k), Some(Issue::Granted(_))), "rejected but granted");
                        prop_assert!(verdict == Verdict::Rejected(reason) || b.decided.get(&k) == Some(&Issue::Refused(reason)));
                        if settle {
                            prop_assert_eq!(verdict, Verdict::Rejected(reason), "a final refusal the intake does not hold");
                        }
                    }
                }
            }
            for (name, b) in &world.batches {
                prop_assert!(b.issued <= stock);
                let granted = b.decided.values().filter(|i| matches!(i, Issue::Granted(_))).count() as u64;
                prop_assert_eq!(granted, b.issued, "{} issued count", name);
                prop_assert!(b.per_user.values().all(|c| *c <= limit));
            }
            // C10: nobody holds coupons of both grouped batches.
            for u in 0..6 {
                let uid = format!("u{u}");
                let holds = |b: &str| per_user_batch.get(&(uid.clone(), b.to_string())).copied().unwrap_or(0) > 0;
                prop_assert!(!(holds("g1") && holds("g2")), "{} holds both batches of the group", uid);
            }
            // When all is final, only issued requests hold a group place (nobody is kept out of
            // a group by a request that got nothing).
            for d in &driven {
                if world.group.places.get(&key(&d.request.seq_no)) == Some(&Place::Held) {
                    prop_assert!(matches!(d.done, Some(Outcome::Issued(_))), "{} holds a place without a coupon", d.request.seq_no);
                }
            }
            // Places: a user's holding counts exactly its held, unreleased requests.
            for (u, holding) in &world.group.holders {
                let mut once = std::collections::HashSet::new();
                let held = driven.iter().filter(|d| once.insert(key(&d.request.seq_no)) && key(&d.request.uid) == *u
                    && world.group.places.get(&key(&d.request.seq_no)) == Some(&Place::Held)).count() as u32;
                prop_assert_eq!(holding.count, held);
            }
        }

        #[test]
        fn merged_deduction_equals_one_by_one(
            reqs in prop::collection::vec((0u8..40, 0u8..8), 0..80),
            split in prop::collection::vec(1usize..20, 1..10),
            stock in 1u64..30,
            limit in 1u32..4,
        ) {
            let requests: Vec<(Id, Id)> = reqs.iter().map(|(s, u)| (id(&format!("s{s}")), id(&format!("u{u}")))).collect();
            // One by one.
            let mut single = batch(stock, limit);
            let mut single_outcomes = Vec::new();
            for r in &requests {
                let (b, reply) = run(&single, BatchCommand::Deduct { requests: vec![r.clone()] }).unwrap();
                single = b;
                if let BatchReply::Deducted { outcomes, .. } = reply { single_outcomes.extend(outcomes); }
            }
            // Merged in chunks of varying size.
            let mut merged = batch(stock, limit);
            let mut merged_outcomes = Vec::new();
            let mut rest = &requests[..];
            let mut sizes = split.iter().cycle();
            while !rest.is_empty() {
                let n = (*sizes.next().unwrap()).min(rest.len());
                let (b, reply) = run(&merged, BatchCommand::Deduct { requests: rest[..n].to_vec() }).unwrap();
                merged = b;
                if let BatchReply::Deducted { outcomes, .. } = reply { merged_outcomes.extend(outcomes); }
                rest = &rest[n..];
            }
            prop_assert_eq!(&merged, &single);
            prop_assert_eq!(merged_outcomes, single_outcomes);
            prop_assert!(merged.issued <= stock);
        }

        #[test]
        fn replay_of_the_events_equals_the_live_state(
            reqs in prop::collection::vec(prop::collection::vec((0u8..20, 0u8..5), 1..10), 1..10),
        ) {
            let mut live = batch(15, 2);
            let mut events = vec![BatchEvent::Created { spec: spec(15, 2, None), at_ms: 0 }];
            for group in reqs {
                let requests = group.iter().map(|(s, u)| (id(&format!("s{s}")), id(&format!("u{u}")))).collect();
                if let Decision::Emit(e, _) = live.decide(&BatchCommand::Deduct { requests }, &Ctx { now_ms: 1 }).unwrap() {
                    live = replay(live, &e);
                    events.extend(e);
                }
            }
            prop_assert_eq!(replay(CouponBatch::default(), &events), live);
        }
    }
}
