//! The order-id registry: one order id gives one reward, whatever the activity, uid or kind
//! (R4).
//!
//! An activity checks idempotency among its own rewards only; an order id reused in another
//! activity would be accepted there too and take a second budget. So reward intake first
//! claims the order id here, then accepts the reward in its activity. The registry is
//! partitioned: the stream `order-ids:<shard>` owns the order ids whose [`order_key`] falls in
//! its shard ([`shard_of`], [`ORDER_ID_SHARDS`] shards), so no single actor sees every reward.
//!
//! Rules (all in [`OrderIds::decide`]):
//! - an order id is claimed once, for one activity and one payload (uid, scene, kind, amount,
//!   device, app, batch, ext: [`Reward::fingerprint`]);
//! - the same activity and payload again is a replay ([`ClaimOutcome::Replayed`]): that is how
//!   an intake that crashed between the claim and the acceptance, or whose acceptance was
//!   refused for budget, succeeds on retry;
//! - anything else is [`ClaimOutcome::Conflict`] (409 `idempotency_conflict`). A claim is never
//!   released: a refused request keeps its order id bound to its payload, as the contract's
//!   "same id, other payload" rule says; releasing would race with a retry that was accepted.
//!
//! One command (and one event) carries many claims, so that a batcher can merge the claims of
//! concurrent requests into one journal record. Memory: a 128-bit key and a 64-bit binding per
//! order id (about 40 bytes with the map's overhead), as in the activity's idempotency memory.

use super::activity::{digest, order_key, Reward};
use super::{Aggregate, Ctx, Decision, Event};
use crate::ids::Id;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Shards of the registry. Fixed per deployment: an order id's shard is derived from it, so
/// changing the number would look order ids up where they were never claimed. A new
/// deployment may pick another value; a running one keeps it.
pub const ORDER_ID_SHARDS: u32 = 16;

/// Claims one command may carry at most.
pub const CLAIMS_PER_COMMAND_MAX: usize = 1_024;

/// The shard (stream `order-ids:<shard>`) that owns `order_id`.
pub fn shard_of(order_id: &Id) -> u32 {
    (order_key(order_id) % u128::from(ORDER_ID_SHARDS)) as u32
}

/// An order id claimed for a reward of an activity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderClaim {
    pub order_id: Id,
    pub activity_id: Id,
    /// [`Reward::fingerprint`] of the request.
    pub fingerprint: u64,
}

impl OrderClaim {
    pub fn of(activity_id: &Id, reward: &Reward) -> OrderClaim {
        OrderClaim {
            order_id: reward.order_id.clone(),
            activity_id: activity_id.clone(),
            fingerprint: reward.fingerprint(),
        }
    }

    /// What the registry remembers of a claim: 64 bits of the activity and the payload.
    fn binding(&self) -> u64 {
        let d = digest(&[
            self.activity_id.as_str().as_bytes(),
            &self.fingerprint.to_be_bytes(),
        ]);
        u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderIdCommand {
    /// Claims each order id for its activity and payload (1 to [`CLAIMS_PER_COMMAND_MAX`]).
    Claim { claims: Vec<OrderClaim> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderIdEvent {
    /// Order ids claimed for the first time, in the order decided.
    Claimed { claims: Vec<OrderClaim> },
}

impl OrderIdEvent {
    pub fn type_name(&self) -> &'static str {
        match self {
            OrderIdEvent::Claimed { .. } => "order_ids.claimed",
        }
    }
}

/// What a claim got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClaimOutcome {
    /// First use of the order id: it is now bound to this activity and payload.
    Claimed,
    /// Claimed before by the same activity with the same payload.
    Replayed,
    /// Claimed before by another activity or with another payload.
    Conflict,
}

/// One outcome per claim, in the command's order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimReply(pub Vec<ClaimOutcome>);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum OrderIdError {
    #[error("a claim command carries 1 to {CLAIMS_PER_COMMAND_MAX} claims, not {0}")]
    BadSize(usize),
}

/// One shard of the registry: order key -> binding of activity and payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderIds {
    pub bindings: HashMap<u128, u64>,
}

impl Aggregate for OrderIds {
    type Command = OrderIdCommand;
    type Event = OrderIdEvent;
    type Reply = ClaimReply;
    type Error = OrderIdError;

    const STREAM_PREFIX: &'static str = "order-ids";

    fn decide(
        &self,
        command: &OrderIdCommand,
        _ctx: &Ctx,
    ) -> Result<Decision<OrderIdEvent, ClaimReply>, OrderIdError> {
        let OrderIdCommand::Claim { claims } = command;
        if claims.is_empty() || claims.len() > CLAIMS_PER_COMMAND_MAX {
            return Err(OrderIdError::BadSize(claims.len()));
        }
        // Claims of this command see each other: two requests merged into one command with the
        // same order id are decided as if one came after the other.
        let mut fresh: HashMap<u128, u64> = HashMap::new();
        let mut new_claims = Vec::new();
        let outcomes = claims
            .iter()
            .map(|claim| {
                let key = order_key(&claim.order_id);
                let binding = claim.binding();
                match self.bindings.get(&key).or_else(|| fresh.get(&key)) {
                    Some(b) if *b == binding => ClaimOutcome::Replayed,
                    Some(_) => ClaimOutcome::Conflict,
                    None => {
                        fresh.insert(key, binding);
                        new_claims.push(claim.clone());
                        ClaimOutcome::Claimed
                    }
                }
            })
            .collect();
        let reply = ClaimReply(outcomes);
        if new_claims.is_empty() {
            return Ok(Decision::Reply(reply));
        }
        Ok(Decision::Emit(
            vec![OrderIdEvent::Claimed { claims: new_claims }],
            reply,
        ))
    }

    fn evolve(&mut self, event: &OrderIdEvent) {
        let OrderIdEvent::Claimed { claims } = event;
        for claim in claims {
            // The first binding stands (decide never emits a second one).
            self.bindings
                .entry(order_key(&claim.order_id))
                .or_insert_with(|| claim.binding());
        }
    }

    fn correlation_id(command: &OrderIdCommand) -> String {
        let OrderIdCommand::Claim { claims } = command;
        match claims.as_slice() {
            [one] => one.order_id.to_string(),
            _ => "order-ids".into(),
        }
    }

    fn wrap(event: OrderIdEvent) -> Event {
        Event::OrderIds(event)
    }

    fn unwrap(event: &Event) -> Option<&OrderIdEvent> {
        match event {
            Event::OrderIds(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::activity::RewardKind;
    use crate::domain::replay;
    use crate::money::Fen;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const CTX: Ctx = Ctx { now_ms: 0 };

    fn id(s: &str) -> Id {
        Id::parse(s).unwrap()
    }

    fn reward(order: &str, uid: &str, kind: RewardKind, amount: u64) -> Reward {
        Reward {
            order_id: id(order),
            uid: id(uid),
            scene: id("rain"),
            kind,
            amount: Fen::new(amount),
            device_id: None,
            app_id: None,
            batch_id: None,
            ext: BTreeMap::new(),
        }
    }

    fn claim(activity: &str, r: &Reward) -> OrderClaim {
        OrderClaim::of(&id(activity), r)
    }

    fn outcomes(state: &OrderIds, claims: Vec<OrderClaim>) -> (Vec<ClaimOutcome>, OrderIds) {
        match state
            .decide(&OrderIdCommand::Claim { claims }, &CTX)
            .unwrap()
        {
            Decision::Emit(events, ClaimReply(o)) => (o, replay(state.clone(), &events)),
            Decision::Reply(ClaimReply(o)) => (o, state.clone()),
        }
    }

    #[test]
    fn an_order_id_is_bound_to_its_first_activity_and_payload() {
        // Given o1 claimed by act1 for u1 cash 100: the same claim replays (a retry after a
        // crash or a budget refusal); another activity, uid, kind or amount conflicts.
        let first = reward("o1", "u1", RewardKind::Cash, 100);
        let (o, state) = outcomes(&OrderIds::default(), vec![claim("act1", &first)]);
        assert_eq!(o, [ClaimOutcome::Claimed]);
        let (o, after) = outcomes(&state, vec![claim("act1", &first)]);
        assert_eq!((o, &after), (vec![ClaimOutcome::Replayed], &state));
        for (activity, other) in [
            ("act2", first.clone()),
            ("act2", reward("o1", "u2", RewardKind::Subsidy, 100)),
            ("act1", reward("o1", "u2", RewardKind::Cash, 100)),
            ("act1", reward("o1", "u1", RewardKind::Item, 100)),
            ("act1", reward("o1", "u1", RewardKind::Cash, 99)),
        ] {
            let (o, _) = outcomes(&state, vec![claim(activity, &other)]);
            assert_eq!(o, [ClaimOutcome::Conflict], "{activity} {other:?}");
        }
        assert!(matches!(
            state.decide(&OrderIdCommand::Claim { claims: vec![] }, &CTX),
            Err(OrderIdError::BadSize(0))
        ));
    }

    #[test]
    fn claims_merged_in_one_command_see_each_other_and_emit_one_event() {
        // Given one command with o1 (act1), o1 again (act1, same payload), o1 (act2) and o2:
        // one event with the two new claims; the duplicate replays, the other activity
        // conflicts.
        let r1 = reward("o1", "u1", RewardKind::Cash, 1);
        let r2 = reward("o2", "u1", RewardKind::Cash, 1);
        let claims = vec![
            claim("act1", &r1),
            claim("act1", &r1),
            claim("act2", &r1),
            claim("act1", &r2),
        ];
        let decision = OrderIds::default()
            .decide(&OrderIdCommand::Claim { claims }, &CTX)
            .unwrap();
        let Decision::Emit(events, ClaimReply(o)) = decision else {
            panic!("nothing claimed")
        };
        assert_eq!(
            o,
            [
                ClaimOutcome::Claimed,
                ClaimOutcome::Replayed,
                ClaimOutcome::Conflict,
                ClaimOutcome::Claimed
            ]
        );
        assert_eq!(
            events,
            vec![OrderIdEvent::Claimed {
                claims: vec![claim("act1", &r1), claim("act1", &r2)]
            }]
        );
    }

    #[test]
    fn the_new_events_survive_the_export_round_trip() {
        // Goal: `hongbao export` writes events as JSON and `verify` rebuilds the bincode from
        // it: the registry's event and the activity's RewardFailed come back identical.
        use crate::domain::activity::{ActivityEvent, FailReason};
        use crate::domain::coupon::Refusal;
        let events = [
            Event::OrderIds(OrderIdEvent::Claimed {
                claims: vec![OrderClaim {
                    fingerprint: u64::MAX - 7,
                    ..claim("act1", &reward("o1", "u1", RewardKind::Cash, 5))
                }],
            }),
            Event::Activity(ActivityEvent::RewardFailed {
                order_id: id("c1"),
                uid: id("u1"),
                kind: RewardKind::Coupon,
                amount: Fen::new(1),
                reason: FailReason::CouponRefused(Refusal::GroupExclusive),
            }),
        ];
        for event in events {
            let json = serde_json::to_value(&event).unwrap();
            let back: Event = serde_json::from_value(json).unwrap();
            assert_eq!(back, event);
            let bytes = crate::events::codec::encode(&event).unwrap();
            assert_eq!(
                crate::events::codec::decode::<Event>(&bytes).unwrap(),
                event
            );
        }
    }

    proptest! {
        #[test]
        fn whatever_the_order_of_claims_each_order_id_has_one_owner_and_replay_matches(
            ops in proptest::collection::vec((0u8..12, 0u8..3, 0u8..2, 1usize..4), 1..80)
        ) {
            // Goal: across commands of any size, an order id is Claimed once, by its first
            // claimant; every later claim replays exactly when it is identical to that one;
            // replaying the log gives the live state.
            let mut live = OrderIds::default();
            let mut log = Vec::new();
            let mut owner: HashMap<u8, OrderClaim> = HashMap::new();
            for chunk in ops.chunks(3) {
                let claims: Vec<OrderClaim> = chunk
                    .iter()
                    .map(|(o, a, u, _)| claim(&format!("act{a}"), &reward(&format!("o{o}"), &format!("u{u}"), RewardKind::Cash, 5)))
                    .collect();
                let Ok(decision) = live.decide(&OrderIdCommand::Claim { claims: claims.clone() }, &CTX) else {
                    panic!("refused")
                };
                let (events, ClaimReply(outcomes)) = match decision {
                    Decision::Emit(e, r) => (e, r),
                    Decision::Reply(r) => (vec![], r),
                };
                for ((o, ..), (c, outcome)) in chunk.iter().zip(claims.iter().zip(outcomes)) {
                    let expected = match owner.get(o) {
                        None => {
                            owner.insert(*o, c.clone());
                            ClaimOutcome::Claimed
                        }
                        Some(first) if first == c => ClaimOutcome::Replayed,
                        Some(_) => ClaimOutcome::Conflict,
                    };
                    prop_assert_eq!(outcome, expected);
                }
                for e in events {
                    live.evolve(&e);
                    log.push(e);
                }
            }
            prop_assert_eq!(live.bindings.len(), owner.len());
            prop_assert_eq!(replay(OrderIds::default(), &log), live);
        }
    }
}
