//! Red packets (P1-P6, P10): a packet is its own aggregate (`packet:<packet id>`) and its
//! actor is the per-packet queue that serialises claims.
//!
//! ```text
//! pending_payment --Paid--> active --(last share claimed)--> exhausted
//!        |                    |
//!        +------ Expired -----+--> expired (the remainder refunded: Refunded)
//! ```
//!
//! Shares are drawn once, at creation, from a ChaCha8 generator seeded per packet; the seed and
//! the shares are in the creation event, so replay never draws again. The lucky split is the
//! double-mean method (as in WeChat's red packets): with `k` shares left and `r` fen left, a
//! share is uniform in `[1, min(2r/k, r - (k - 1))]`, the last one takes what is left. Every
//! share is at least 1 fen and the shares sum to the total. The even split gives `total /
//! count` to everyone and one more fen to the first `total % count`.
//!
//! Rules (all in [`Packet::decide`]): one share per uid (a repeated claim answers the same
//! share); only an active, unexpired packet gives shares; an audience, if set, is the only one
//! allowed; a payment is taken only before the deadline; expiry happens once, at or after the
//! deadline; the remainder is refunded once.
//!
//! Payment racing expiry: the packet and the sender's wallet are two actors, so the flows make
//! the wallet the point where they meet. Expiry of an unpaid packet first bars its escrow debit
//! in the wallet (`WalletCommand::BarDebit`), which answers the debit if it already happened
//! (the packet is then marked paid and refunded in full) or makes every later one refused; a
//! payment still on its way therefore either is seen by the expiry or never lands.

use super::{Aggregate, Ctx, Decision, Event};
use crate::clock::Millis;
use crate::ids::Id;
use crate::money::Fen;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};

/// Most shares a packet may have.
pub const SHARES_MAX: u32 = 10_000;
/// Most uids an audience may list.
pub const AUDIENCE_MAX: usize = 10_000;
/// The seed's default lifetime: 24 hours.
pub const LIFETIME_DEFAULT_MS: Millis = 24 * 3_600_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Paid by the platform through a subsidy token; shares land in `activity` (withdrawable).
    B2c,
    /// Paid by the sender from `change`; shares land in the claimers' `change`.
    C2c,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Lucky,
    Even,
}

/// What pays a B2C packet: a subsidy reward (its activity and order id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subsidy {
    pub activity_id: Id,
    pub order_id: Id,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PacketSpec {
    pub sender_uid: Id,
    pub mode: Mode,
    pub total: Fen,
    pub count: u32,
    pub split: Split,
    pub audience: Option<BTreeSet<Id>>,
    pub expires_at_ms: Millis,
    /// Seeds the lucky split; chosen by the caller, recorded in the creation event.
    pub seed: u64,
    /// B2C only.
    pub subsidy: Option<Subsidy>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PacketState {
    PendingPayment,
    Active,
    Exhausted,
    Expired,
}

impl PacketState {
    pub fn as_str(self) -> &'static str {
        match self {
            PacketState::PendingPayment => "pending_payment",
            PacketState::Active => "active",
            PacketState::Exhausted => "exhausted",
            PacketState::Expired => "expired",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PacketCommand {
    Create(PacketSpec),
    /// May a payment be taken now? Answers the packet's state if it may (or if it was paid
    /// already: the original outcome); `Expired` from the deadline on, before any money moves.
    /// Records nothing.
    AcceptPayment,
    /// The payment (C2C: from change; B2C: the subsidy) reached escrow. Accepted after the
    /// deadline too: money that reached escrow must belong to the packet, to be refunded.
    MarkPaid {
        payment_id: Id,
    },
    Claim {
        uid: Id,
    },
    /// Several claims decided together, in order, exactly as the same `Claim` commands one
    /// after the other would be; new shares are recorded as one `SharesClaimed` event (one
    /// `ShareClaimed` when only one is new). Answers `Many`, one outcome per uid, in order.
    ClaimMany {
        uids: Vec<Id>,
    },
    /// At or after the deadline.
    Expire,
    /// The remainder went back (C2C: to the sender's change; B2C: to the campaign budget).
    MarkRefunded,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PacketEvent {
    Created {
        spec: PacketSpec,
        shares: Vec<Fen>,
        at_ms: Millis,
    },
    Paid {
        payment_id: Id,
        at_ms: Millis,
    },
    ShareClaimed {
        uid: Id,
        index: u32,
        amount: Fen,
        at_ms: Millis,
    },
    Expired {
        remaining_count: u32,
        remaining_amount: Fen,
        at_ms: Millis,
    },
    Refunded {
        amount: Fen,
        at_ms: Millis,
    },
    /// Shares claimed together (a merged `ClaimMany`), in index order: the same as one
    /// `ShareClaimed` per record. Last in the enum: older logs decode unchanged.
    SharesClaimed {
        claims: Vec<ClaimRecord>,
    },
}

impl PacketEvent {
    pub fn type_name(&self) -> &'static str {
        match self {
            PacketEvent::Created { .. } => "packet.created",
            PacketEvent::Paid { .. } => "packet.paid",
            PacketEvent::ShareClaimed { .. } => "packet.share_claimed",
            PacketEvent::Expired { .. } => "packet.expired",
            PacketEvent::Refunded { .. } => "packet.refunded",
            PacketEvent::SharesClaimed { .. } => "packet.shares_claimed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum PacketError {
    #[error("packet id already used with another payload")]
    IdempotencyConflict,
    #[error("no such packet")]
    Unknown,
    #[error("a packet needs 1 to {SHARES_MAX} shares and at least 1 fen per share")]
    InvalidShares,
    #[error("an audience lists 1 to {AUDIENCE_MAX} uids")]
    InvalidAudience,
    #[error("the packet is not paid yet")]
    NotPaid,
    #[error("every share has been claimed")]
    Empty,
    #[error("the packet has expired")]
    Expired,
    #[error("this user is not in the packet's audience")]
    NotInAudience,
    #[error("the packet is {}", .0.as_str())]
    WrongState(PacketState),
}

/// One claim as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRecord {
    pub uid: Id,
    pub index: u32,
    pub amount: Fen,
    pub at_ms: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PacketReply {
    /// The packet after the command.
    State {
        state: PacketState,
        remaining_count: u32,
        remaining_amount: Fen,
    },
    /// A claim's share (the same on every repeat).
    Claimed {
        amount: Fen,
        remaining_count: u32,
        replayed: bool,
    },
    /// `ClaimMany`'s outcomes, one per uid in the order given.
    Many(Vec<Result<PacketReply, PacketError>>),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Packet {
    pub spec: Option<PacketSpec>,
    pub shares: Vec<Fen>,
    pub state: Option<PacketState>,
    pub payment_id: Option<Id>,
    pub claims: Vec<ClaimRecord>,
    pub claimed_by: HashMap<Id, u32>,
    pub refunded: Option<Fen>,
}

/// One share by the double-mean method: uniform in `1..=2 * left / k`, keeping 1 fen for each
/// of the `k - 1` shares after this one; the last share (`k == 1`) takes what is left.
/// Callers guarantee `left >= k >= 1`.
pub fn double_mean_share(left: u64, k: u64, rng: &mut impl rand::Rng) -> u64 {
    if k <= 1 {
        return left;
    }
    let upper = (2 * (left / k)).min(left - (k - 1)).max(1);
    rng.random_range(1..=upper)
}

/// Draws the shares of a packet. Pure: the same seed gives the same shares.
pub fn draw_shares(
    total: Fen,
    count: u32,
    split: Split,
    seed: u64,
) -> Result<Vec<Fen>, PacketError> {
    let total = total.as_u64();
    if count == 0 || count > SHARES_MAX || total < count as u64 {
        return Err(PacketError::InvalidShares);
    }
    let n = count as u64;
    let shares = match split {
        Split::Even => {
            let (base, extra) = (total / n, total % n);
            (0..n).map(|i| base + u64::from(i < extra)).collect()
        }
        Split::Lucky => {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut left = total;
            let mut shares = Vec::with_capacity(count as usize);
            for k in (1..=n).rev() {
                let share = double_mean_share(left, k, &mut rng);
                shares.push(share);
                left -= share;
            }
            shares
        }
    };
    debug_assert_eq!(shares.iter().sum::<u64>(), total);
    debug_assert!(shares.iter().all(|s| *s >= 1));
    Ok(shares.into_iter().map(Fen::new).collect())
}

impl Packet {
    pub fn remaining_count(&self) -> u32 {
        self.shares.len() as u32 - self.claims.len() as u32
    }

    pub fn remaining_amount(&self) -> Fen {
        Fen::sum(self.shares[self.claims.len()..].iter().copied()).unwrap_or(Fen::ZERO)
    }

    fn state_reply(&self) -> PacketReply {
        self.reply_as(self.state.unwrap_or(PacketState::PendingPayment))
    }

    /// The packet's figures with the state an earlier answer gave (a repeated request).
    fn reply_as(&self, state: PacketState) -> PacketReply {
        PacketReply::State {
            state,
            remaining_count: self.remaining_count(),
            remaining_amount: self.remaining_amount(),
        }
    }

    /// Emits one event, replying from the state after it. Clones the packet: for the rare
    /// commands only (create, pay, expire, refund), never for claims.
    fn emit(
        &self,
        event: PacketEvent,
        reply: impl FnOnce(&Packet) -> PacketReply,
    ) -> Result<Decision<PacketEvent, PacketReply>, PacketError> {
        let mut after = self.clone();
        after.evolve(&event);
        let reply = reply(&after);
        Ok(Decision::Emit(vec![event], reply))
    }
}

/// Claims decided in one command and not yet recorded: the packet as it would be after them
/// is the packet plus these.
#[derive(Default)]
struct ClaimBatch {
    claims: Vec<ClaimRecord>,
    by_uid: HashMap<Id, u32>,
}

impl ClaimBatch {
    /// The one event recording the batch's claims, if any.
    fn event(self) -> Option<PacketEvent> {
        let mut claims = self.claims;
        match claims.len() {
            0 => None,
            1 => {
                let ClaimRecord {
                    uid,
                    index,
                    amount,
                    at_ms,
                } = claims.remove(0);
                Some(PacketEvent::ShareClaimed {
                    uid,
                    index,
                    amount,
                    at_ms,
                })
            }
            _ => Some(PacketEvent::SharesClaimed { claims }),
        }
    }
}

impl Packet {
    /// Decides one claim (P3, P5) on the packet as it is after `batch`, adding the new claim to
    /// `batch`. The hot path: nothing is cloned but the uid.
    fn claim_into(
        &self,
        batch: &mut ClaimBatch,
        uid: &Id,
        at_ms: Millis,
    ) -> Result<PacketReply, PacketError> {
        let spec = self.spec.as_ref().ok_or(PacketError::Unknown)?;
        let claimed = self.claims.len() + batch.claims.len();
        let remaining_count = (self.shares.len() - claimed) as u32;
        if let Some(&index) = self.claimed_by.get(uid).or_else(|| batch.by_uid.get(uid)) {
            // The first answer again: the count its claim left (the claim at `index` was the
            // `index + 1`-th), not what is left now.
            return Ok(PacketReply::Claimed {
                amount: self.shares[index as usize],
                remaining_count: (self.shares.len() as u32).saturating_sub(index + 1),
                replayed: true,
            });
        }
        match self.state {
            Some(PacketState::PendingPayment) => return Err(PacketError::NotPaid),
            Some(PacketState::Expired) => return Err(PacketError::Expired),
            Some(PacketState::Exhausted) => return Err(PacketError::Empty),
            _ if remaining_count == 0 => return Err(PacketError::Empty),
            _ => {}
        }
        if at_ms >= spec.expires_at_ms {
            return Err(PacketError::Expired);
        }
        if spec.audience.as_ref().is_some_and(|a| !a.contains(uid)) {
            return Err(PacketError::NotInAudience);
        }
        let index = claimed as u32;
        let amount = self.shares[claimed];
        batch.by_uid.insert(uid.clone(), index);
        batch.claims.push(ClaimRecord {
            uid: uid.clone(),
            index,
            amount,
            at_ms,
        });
        Ok(PacketReply::Claimed {
            amount,
            remaining_count: remaining_count - 1,
            replayed: false,
        })
    }

    /// Records one claim (`ShareClaimed`, or one of a `SharesClaimed`).
    fn record_claim(&mut self, claim: &ClaimRecord) {
        self.claimed_by.insert(claim.uid.clone(), claim.index);
        self.claims.push(claim.clone());
        if self.claims.len() == self.shares.len() {
            self.state = Some(PacketState::Exhausted);
        }
    }
}

impl Aggregate for Packet {
    type Command = PacketCommand;
    type Event = PacketEvent;
    type Reply = PacketReply;
    type Error = PacketError;

    const STREAM_PREFIX: &'static str = "packet";

    fn decide(
        &self,
        command: &PacketCommand,
        ctx: &Ctx,
    ) -> Result<Decision<PacketEvent, PacketReply>, PacketError> {
        let at_ms = ctx.now_ms;
        let state = self.state;
        match command {
            PacketCommand::Create(spec) => {
                if let Some(existing) = &self.spec {
                    // The seed is the caller's choice per attempt; the rest is the payload.
                    let same = PacketSpec {
                        seed: existing.seed,
                        ..spec.clone()
                    } == *existing;
                    return if same {
                        // A repeated creation answers what the creation answered (the
                        // original outcome), not what became of the packet since (its details
                        // tell that): a C2C packet waits for payment; a B2C packet is active
                        // once its subsidy paid it (until then its flow resumes the funding).
                        let answered = match (existing.mode, &self.payment_id) {
                            (Mode::C2c, _) => PacketState::PendingPayment,
                            (Mode::B2c, Some(_)) => PacketState::Active,
                            (Mode::B2c, None) => state.unwrap_or(PacketState::PendingPayment),
                        };
                        Ok(Decision::Reply(self.reply_as(answered)))
                    } else {
                        Err(PacketError::IdempotencyConflict)
                    };
                }
                if spec
                    .audience
                    .as_ref()
                    .is_some_and(|a| a.is_empty() || a.len() > AUDIENCE_MAX)
                {
                    return Err(PacketError::InvalidAudience);
                }
                let shares = draw_shares(spec.total, spec.count, spec.split, spec.seed)?;
                self.emit(
                    PacketEvent::Created {
                        spec: spec.clone(),
                        shares,
                        at_ms,
                    },
                    Packet::state_reply,
                )
            }
            PacketCommand::AcceptPayment => {
                let spec = self.spec.as_ref().ok_or(PacketError::Unknown)?;
                match state {
                    Some(PacketState::PendingPayment) if at_ms >= spec.expires_at_ms => {
                        Err(PacketError::Expired)
                    }
                    Some(PacketState::Expired) if self.payment_id.is_none() => {
                        Err(PacketError::Expired)
                    }
                    // Paid before: the payment's answer again (the packet was active), not
                    // what became of it since.
                    _ if self.payment_id.is_some() => {
                        Ok(Decision::Reply(self.reply_as(PacketState::Active)))
                    }
                    _ => Ok(Decision::Reply(self.state_reply())),
                }
            }
            PacketCommand::MarkPaid { payment_id } => match state {
                None => Err(PacketError::Unknown),
                Some(PacketState::PendingPayment) => self.emit(
                    PacketEvent::Paid {
                        payment_id: payment_id.clone(),
                        at_ms,
                    },
                    Packet::state_reply,
                ),
                Some(_) if self.payment_id.as_ref() == Some(payment_id) => {
                    Ok(Decision::Reply(self.state_reply()))
                }
                Some(other) => Err(PacketError::WrongState(other)),
            },
            PacketCommand::Claim { uid } => {
                let mut batch = ClaimBatch::default();
                let reply = self.claim_into(&mut batch, uid, at_ms)?;
                Ok(match batch.event() {
                    Some(event) => Decision::Emit(vec![event], reply),
                    None => Decision::Reply(reply),
                })
            }
            PacketCommand::ClaimMany { uids } => {
                let mut batch = ClaimBatch::default();
                let replies = uids
                    .iter()
                    .map(|uid| self.claim_into(&mut batch, uid, at_ms))
                    .collect();
                let reply = PacketReply::Many(replies);
                Ok(match batch.event() {
                    Some(event) => Decision::Emit(vec![event], reply),
                    None => Decision::Reply(reply),
                })
            }
            PacketCommand::Expire => {
                let spec = self.spec.as_ref().ok_or(PacketError::Unknown)?;
                match state {
                    Some(PacketState::Expired) | Some(PacketState::Exhausted) => {
                        Ok(Decision::Reply(self.state_reply()))
                    }
                    _ if at_ms < spec.expires_at_ms => Err(PacketError::WrongState(
                        state.unwrap_or(PacketState::Active),
                    )),
                    _ => {
                        // An unpaid packet expires with nothing to give back.
                        let (remaining_count, remaining_amount) =
                            if state == Some(PacketState::PendingPayment) {
                                (0, Fen::ZERO)
                            } else {
                                (self.remaining_count(), self.remaining_amount())
                            };
                        self.emit(
                            PacketEvent::Expired {
                                remaining_count,
                                remaining_amount,
                                at_ms,
                            },
                            Packet::state_reply,
                        )
                    }
                }
            }
            PacketCommand::MarkRefunded => {
                if self.refunded.is_some() {
                    return Ok(Decision::Reply(self.state_reply()));
                }
                if state != Some(PacketState::Expired) {
                    return Err(PacketError::WrongState(
                        state.unwrap_or(PacketState::PendingPayment),
                    ));
                }
                let amount = if self.payment_id.is_some() {
                    self.remaining_amount()
                } else {
                    Fen::ZERO
                };
                self.emit(PacketEvent::Refunded { amount, at_ms }, Packet::state_reply)
            }
        }
    }

    fn evolve(&mut self, event: &PacketEvent) {
        match event {
            PacketEvent::Created { spec, shares, .. } => {
                self.spec = Some(spec.clone());
                self.shares = shares.clone();
                self.state = Some(PacketState::PendingPayment);
            }
            PacketEvent::Paid { payment_id, .. } => {
                self.payment_id = Some(payment_id.clone());
                self.state = Some(PacketState::Active);
            }
            PacketEvent::ShareClaimed {
                uid,
                index,
                amount,
                at_ms,
            } => self.record_claim(&ClaimRecord {
                uid: uid.clone(),
                index: *index,
                amount: *amount,
                at_ms: *at_ms,
            }),
            PacketEvent::SharesClaimed { claims } => {
                for claim in claims {
                    self.record_claim(claim);
                }
            }
            PacketEvent::Expired { .. } => self.state = Some(PacketState::Expired),
            PacketEvent::Refunded { amount, .. } => self.refunded = Some(*amount),
        }
    }

    fn correlation_id(_: &PacketCommand) -> String {
        String::new()
    }

    fn wrap(event: PacketEvent) -> Event {
        Event::Packet(event)
    }

    fn unwrap(event: &Event) -> Option<&PacketEvent> {
        match event {
            Event::Packet(e) => Some(e),
            _ => None,
        }
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

    fn spec(total: u64, count: u32, split: Split) -> PacketSpec {
        PacketSpec {
            sender_uid: id("sender"),
            mode: Mode::C2c,
            total: Fen::new(total),
            count,
            split,
            audience: None,
            expires_at_ms: 10_000,
            seed: 42,
            subsidy: None,
        }
    }

    fn run(
        packet: &Packet,
        command: PacketCommand,
        now_ms: Millis,
    ) -> Result<(Packet, PacketReply), PacketError> {
        match packet.decide(&command, &Ctx { now_ms })? {
            Decision::Emit(events, reply) => Ok((replay(packet.clone(), &events), reply)),
            Decision::Reply(reply) => Ok((packet.clone(), reply)),
        }
    }

    #[test]
    fn splits_give_at_least_one_fen_and_sum_to_the_total() {
        // Goal: lucky and even splits are fair-shaped, complete and deterministic by seed.
        let lucky = draw_shares(Fen::new(10_000), 50, Split::Lucky, 7).unwrap();
        assert_eq!(
            lucky,
            draw_shares(Fen::new(10_000), 50, Split::Lucky, 7).unwrap()
        );
        assert_ne!(
            lucky,
            draw_shares(Fen::new(10_000), 50, Split::Lucky, 8).unwrap()
        );
        assert_eq!(lucky.iter().map(|f| f.as_u64()).sum::<u64>(), 10_000);
        let even = draw_shares(Fen::new(10), 3, Split::Even, 0).unwrap();
        assert_eq!(even, vec![Fen::new(4), Fen::new(3), Fen::new(3)]);
        assert_eq!(
            draw_shares(Fen::new(5), 5, Split::Lucky, 1).unwrap(),
            vec![Fen::new(1); 5]
        );
        assert_eq!(
            draw_shares(Fen::new(4), 5, Split::Lucky, 1),
            Err(PacketError::InvalidShares)
        );
        assert_eq!(
            draw_shares(Fen::new(4), 0, Split::Even, 1),
            Err(PacketError::InvalidShares)
        );
    }

    #[test]
    fn a_c2c_packet_waits_for_payment_then_gives_one_share_per_uid() {
        // Given a paid packet of 3 shares, the same uid gets the same share again, the fourth
        // claimer finds it empty.
        let p = run(
            &Packet::default(),
            PacketCommand::Create(spec(300, 3, Split::Even)),
            0,
        )
        .unwrap()
        .0;
        assert_eq!(
            run(&p, PacketCommand::Claim { uid: id("a") }, 1).unwrap_err(),
            PacketError::NotPaid
        );
        let mut p = run(
            &p,
            PacketCommand::MarkPaid {
                payment_id: id("pay"),
            },
            1,
        )
        .unwrap()
        .0;
        let (next, reply) = run(&p, PacketCommand::Claim { uid: id("a") }, 2).unwrap();
        assert_eq!(
            reply,
            PacketReply::Claimed {
                amount: Fen::new(100),
                remaining_count: 2,
                replayed: false
            }
        );
        p = next;
        assert_eq!(
            run(&p, PacketCommand::Claim { uid: id("a") }, 3).unwrap().1,
            PacketReply::Claimed {
                amount: Fen::new(100),
                remaining_count: 2,
                replayed: true
            }
        );
        p = run(&p, PacketCommand::Claim { uid: id("b") }, 3).unwrap().0;
        p = run(&p, PacketCommand::Claim { uid: id("c") }, 3).unwrap().0;
        assert_eq!(p.state, Some(PacketState::Exhausted));
        assert_eq!(
            run(&p, PacketCommand::Claim { uid: id("a") }, 4).unwrap().1,
            PacketReply::Claimed {
                amount: Fen::new(100),
                remaining_count: 2,
                replayed: true
            },
            "the first answer again, not the count left now (found by `hongbao simulate`)"
        );
        assert_eq!(
            run(&p, PacketCommand::Claim { uid: id("d") }, 4).unwrap_err(),
            PacketError::Empty
        );
    }

    #[test]
    fn a_repeated_creation_or_payment_answers_as_the_first_time_whatever_became_of_the_packet() {
        // Goal: idempotency by id: once the packet is emptied or expired, creating or paying it
        // again answers what the first request answered (found by `hongbao simulate`: the
        // repeat answered "exhausted" / "expired" where the creation said "pending_payment").
        let state = |reply: PacketReply| match reply {
            PacketReply::State { state, .. } => state,
            other => panic!("not a state: {other:?}"),
        };
        let c2c = spec(200, 2, Split::Even);
        let mut p = run(&Packet::default(), PacketCommand::Create(c2c.clone()), 0)
            .unwrap()
            .0;
        let paid = PacketCommand::MarkPaid {
            payment_id: id("pay"),
        };
        p = run(&p, paid, 1).unwrap().0;
        for uid in ["a", "b"] {
            p = run(&p, PacketCommand::Claim { uid: id(uid) }, 2).unwrap().0;
        }
        assert_eq!(p.state, Some(PacketState::Exhausted));
        let again = run(&p, PacketCommand::Create(c2c), 3).unwrap().1;
        assert_eq!(state(again), PacketState::PendingPayment);
        let again = run(&p, PacketCommand::AcceptPayment, 3).unwrap().1;
        assert_eq!(state(again), PacketState::Active);

        // A B2C packet: active once paid by its subsidy, expired since.
        let b2c = PacketSpec {
            mode: Mode::B2c,
            ..spec(300, 3, Split::Even)
        };
        let created = run(&Packet::default(), PacketCommand::Create(b2c.clone()), 0).unwrap();
        assert_eq!(state(created.1), PacketState::PendingPayment);
        let unfunded_repeat = run(&created.0, PacketCommand::Create(b2c.clone()), 1).unwrap();
        assert_eq!(
            state(unfunded_repeat.1),
            PacketState::PendingPayment,
            "not funded yet: the repeat lets the flow resume the funding"
        );
        let p = run(
            &created.0,
            PacketCommand::MarkPaid {
                payment_id: id("subsidy"),
            },
            1,
        )
        .unwrap()
        .0;
        let p = run(&p, PacketCommand::Expire, 10_000).unwrap().0;
        assert_eq!(p.state, Some(PacketState::Expired));
        let again = run(&p, PacketCommand::Create(b2c), 10_001).unwrap().1;
        assert_eq!(state(again), PacketState::Active);
    }

    #[test]
    fn audience_expiry_and_refund_rules() {
        // Goal: only the audience may claim; after the deadline claims are refused, the packet
        // expires once with its remainder and is refunded once.
        let mut with_audience = spec(300, 3, Split::Even);
        with_audience.audience = Some([id("friend")].into_iter().collect());
        let p = run(&Packet::default(), PacketCommand::Create(with_audience), 0)
            .unwrap()
            .0;
        let p = run(
            &p,
            PacketCommand::MarkPaid {
                payment_id: id("pay"),
            },
            1,
        )
        .unwrap()
        .0;
        assert_eq!(
            run(
                &p,
                PacketCommand::Claim {
                    uid: id("stranger")
                },
                2
            )
            .unwrap_err(),
            PacketError::NotInAudience
        );
        let p = run(&p, PacketCommand::Claim { uid: id("friend") }, 2)
            .unwrap()
            .0;
        assert_eq!(
            run(&p, PacketCommand::Expire, 9_999).unwrap_err(),
            PacketError::WrongState(PacketState::Active)
        );
        assert_eq!(
            run(&p, PacketCommand::Claim { uid: id("friend2") }, 10_000).unwrap_err(),
            PacketError::Expired
        );
        let (p, reply) = run(&p, PacketCommand::Expire, 10_000).unwrap();
        assert_eq!(
            reply,
            PacketReply::State {
                state: PacketState::Expired,
                remaining_count: 2,
                remaining_amount: Fen::new(200)
            }
        );
        assert_eq!(
            run(&p, PacketCommand::Expire, 10_001).unwrap().0,
            p,
            "expires once"
        );
        let (p, _) = run(&p, PacketCommand::MarkRefunded, 10_001).unwrap();
        assert_eq!(p.refunded, Some(Fen::new(200)));
        assert_eq!(
            run(&p, PacketCommand::MarkRefunded, 10_002).unwrap().0,
            p,
            "refunded once"
        );
        // A claim that came before still answers its share.
        assert!(matches!(
            run(&p, PacketCommand::Claim { uid: id("friend") }, 10_003),
            Ok((_, PacketReply::Claimed { replayed: true, .. }))
        ));
    }

    #[test]
    fn creation_is_idempotent_and_another_payload_conflicts() {
        // Goal: a retried creation (even with a new seed) replays; another total conflicts.
        let p = run(
            &Packet::default(),
            PacketCommand::Create(spec(300, 3, Split::Lucky)),
            0,
        )
        .unwrap()
        .0;
        let retry = PacketSpec {
            seed: 99,
            ..spec(300, 3, Split::Lucky)
        };
        assert!(matches!(
            p.decide(&PacketCommand::Create(retry), &Ctx { now_ms: 1 }),
            Ok(Decision::Reply(_))
        ));
        assert_eq!(
            p.decide(
                &PacketCommand::Create(spec(301, 3, Split::Lucky)),
                &Ctx { now_ms: 1 }
            ),
            Err(PacketError::IdempotencyConflict)
        );
    }

    proptest! {
        #[test]
        fn any_claim_order_gives_claimed_plus_refunded_equal_total(
            total in 1u64..100_000,
            count in 1u32..60,
            seed in any::<u64>(),
            lucky in any::<bool>(),
            claimers in proptest::collection::vec(0u8..80, 0..150),
            expire_after in 0usize..150,
        ) {
            // Goal: for any packet and claim order (with repeats), shares >= 1 fen, no uid twice,
            // claimed + refunded = total, and replay equals the live state.
            prop_assume!(total >= count as u64);
            let split = if lucky { Split::Lucky } else { Split::Even };
            let mut log = Vec::new();
            let mut p = Packet::default();
            let mut step = |p: &mut Packet, command: PacketCommand, now_ms: Millis| {
                if let Ok(Decision::Emit(events, _)) = p.decide(&command, &Ctx { now_ms }) {
                    for e in events {
                        p.evolve(&e);
                        log.push(e);
                    }
                }
            };
            step(&mut p, PacketCommand::Create(PacketSpec { seed, ..spec(total, count, split) }), 0);
            step(&mut p, PacketCommand::MarkPaid { payment_id: id("pay") }, 1);
            for (i, c) in claimers.iter().enumerate() {
                let now = if i >= expire_after { 10_000 } else { 2 };
                step(&mut p, PacketCommand::Claim { uid: id(&format!("u{c}")) }, now);
            }
            step(&mut p, PacketCommand::Expire, 10_000);
            step(&mut p, PacketCommand::MarkRefunded, 10_001);
            prop_assert!(p.shares.iter().all(|s| s.as_u64() >= 1));
            let claimed: u64 = p.claims.iter().map(|c| c.amount.as_u64()).sum();
            let refunded = p.refunded.map(|f| f.as_u64()).unwrap_or(0);
            prop_assert_eq!(claimed + refunded, total);
            let uids: BTreeSet<&Id> = p.claims.iter().map(|c| &c.uid).collect();
            prop_assert_eq!(uids.len(), p.claims.len());
            prop_assert_eq!(replay(Packet::default(), &log), p);
        }

        #[test]
        fn claims_merged_into_one_command_decide_and_replay_as_single_claims(
            total in 1u64..100_000,
            count in 1u32..40,
            seed in any::<u64>(),
            lucky in any::<bool>(),
            audience in proptest::option::of(proptest::collection::btree_set(0u8..30, 1..20)),
            paid in prop::sample::select(vec![true, true, true, false]),
            already in proptest::collection::vec(0u8..30, 0..20),
            lots in proptest::collection::vec(proptest::collection::vec(0u8..30, 0..25), 1..6),
            expired in prop::sample::select(vec![false, false, false, true]),
        ) {
            // Goal: a packet (paid or not, with an audience or not, partly claimed, expired or
            // not) given lots of claims (repeats within and across lots) answers every uid of a
            // `ClaimMany` exactly as the same `Claim`s one after the other would, and its merged
            // events replay to the same packet as their single `ShareClaimed`s.
            prop_assume!(total >= count as u64);
            let split = if lucky { Split::Lucky } else { Split::Even };
            let uid = |c: &u8| id(&format!("u{c}"));
            let audience = audience.map(|a| a.iter().map(uid).collect::<BTreeSet<_>>());
            let mut p = run(
                &Packet::default(),
                PacketCommand::Create(PacketSpec { seed, audience, ..spec(total, count, split) }),
                0,
            ).unwrap().0;
            if paid {
                p = run(&p, PacketCommand::MarkPaid { payment_id: id("pay") }, 1).unwrap().0;
            }
            for c in &already {
                if let Ok((next, _)) = run(&p, PacketCommand::Claim { uid: uid(c) }, 2) {
                    p = next;
                }
            }
            let now = if expired { 10_000 } else { 3 };
            let before = p.clone();
            let (mut single, mut merged) = (p.clone(), p);
            let (mut single_log, mut merged_log) = (Vec::new(), Vec::new());
            for lot in &lots {
                let mut one_by_one = Vec::new();
                for c in lot {
                    match single.decide(&PacketCommand::Claim { uid: uid(c) }, &Ctx { now_ms: now }) {
                        Ok(Decision::Emit(events, reply)) => {
                            for e in events {
                                single.evolve(&e);
                                single_log.push(e);
                            }
                            one_by_one.push(Ok(reply));
                        }
                        Ok(Decision::Reply(reply)) => one_by_one.push(Ok(reply)),
                        Err(e) => one_by_one.push(Err(e)),
                    }
                }
                let command = PacketCommand::ClaimMany { uids: lot.iter().map(uid).collect() };
                let (events, reply) = match merged.decide(&command, &Ctx { now_ms: now }).unwrap() {
                    Decision::Emit(events, reply) => (events, reply),
                    Decision::Reply(reply) => (Vec::new(), reply),
                };
                prop_assert!(events.len() <= 1, "one event per lot: {:?}", events);
                for e in events {
                    merged.evolve(&e);
                    merged_log.push(e);
                }
                prop_assert_eq!(reply, PacketReply::Many(one_by_one));
            }
            prop_assert_eq!(&merged, &single);
            prop_assert!(merged_log.len() <= single_log.len());
            prop_assert_eq!(replay(before.clone(), &merged_log), replay(before, &single_log));
        }
    }
}
