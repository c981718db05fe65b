//! The pure domain: one state machine per aggregate, no I/O, no clock, no randomness.
//!
//! Each aggregate implements [`Aggregate`]: `decide(&state, &command, &ctx)` holds every
//! business rule and returns the events a command produces (or a refusal), and
//! `evolve(&mut state, &event)` applies a fact without judging it. Replaying a stream's events
//! through `evolve` rebuilds the state exactly; that is what actor activation, snapshots and the
//! audit rely on, and what the property tests check.
//!
//! [`Event`] is the union of every aggregate's events: the payload type of the global log.
//! Variants are only ever appended (the codec encodes the variant index), and an event whose
//! shape must change gets a new variant or a new schema version with an upcaster, never an edit.

pub mod activity;
pub mod coupon;
pub mod order_ids;
pub mod packet;
pub mod switches;
pub mod wallet;
pub mod withdrawal;

use crate::clock::Millis;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Who made an operator change (the withdrawal policy, a switch): the role of the key and a
/// short id of the key (the first 8 hex digits of its SHA-256: enough to tell the keys apart,
/// useless to an attacker), so the log says which key changed what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedBy {
    pub role: String,
    pub key_id: String,
}

/// What a command may know besides the state: the time, injected by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ctx {
    pub now_ms: Millis,
}

/// The outcome of `decide` when the command is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<E, R> {
    /// New facts: persist the events, then answer with the reply.
    Emit(Vec<E>, R),
    /// Nothing new (an idempotent retry): answer with the reply once the state it was read from
    /// is durable.
    Reply(R),
}

/// A pure, event-sourced state machine.
pub trait Aggregate:
    Default + Clone + Send + Unpin + Serialize + DeserializeOwned + 'static
{
    /// Commands, replies and refusals are serde types: a cluster node sends a command for an
    /// entity of another partition to that partition's holder and gets the answer back.
    type Command: Clone + Send + std::fmt::Debug + Serialize + DeserializeOwned + 'static;
    type Event: Clone + Send + std::fmt::Debug + 'static;
    type Reply: Clone + Send + std::fmt::Debug + Serialize + DeserializeOwned + 'static;
    type Error: Clone + Send + std::fmt::Debug + Serialize + DeserializeOwned + 'static;

    /// Prefix of this aggregate's stream ids (`wallet` gives `wallet:<id>`).
    const STREAM_PREFIX: &'static str;

    /// All business rules. Must not mutate anything.
    fn decide(
        &self,
        command: &Self::Command,
        ctx: &Ctx,
    ) -> Result<Decision<Self::Event, Self::Reply>, Self::Error>;

    /// Applies a fact. No rules, no refusals: the event already happened.
    fn evolve(&mut self, event: &Self::Event);

    /// The business order id a command carries, recorded as the events' correlation id. Empty
    /// when the stream id is the order id (the runtime then uses the stream's id).
    fn correlation_id(command: &Self::Command) -> String;

    fn wrap(event: Self::Event) -> Event;
    fn unwrap(event: &Event) -> Option<&Self::Event>;

    /// Answers a question about the state, both encoded, where the entity lives
    /// (`actors::Registry::ask`): on a cluster a whole state can outgrow a message between
    /// nodes (a wallet's idempotency memory grows with every movement), the answer to one
    /// question does not. `None`: not a question this aggregate answers.
    fn answer(&self, _question: &[u8]) -> Option<Vec<u8>> {
        None
    }
}

/// Every event of every aggregate: the payload of the global log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    Wallet(wallet::WalletEvent),
    Activity(activity::ActivityEvent),
    Switches(switches::SwitchEvent),
    Withdrawal(withdrawal::WithdrawalEvent),
    Policy(withdrawal::PolicyEvent),
    Payee(withdrawal::PayeeEvent),
    Packet(packet::PacketEvent),
    CouponIntake(coupon::IntakeEvent),
    CouponBatch(coupon::BatchEvent),
    CouponGroup(coupon::GroupEvent),
    /// Appended in issue 11: the order-id registry (R4).
    OrderIds(order_ids::OrderIdEvent),
}

impl Event {
    /// Stable name of the event type, as exported and shown to auditors.
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::Wallet(e) => e.type_name(),
            Event::Activity(e) => e.type_name(),
            Event::Switches(e) => e.type_name(),
            Event::Withdrawal(e) => e.type_name(),
            Event::Policy(e) => e.type_name(),
            Event::Payee(_) => "payee.method_bound",
            Event::Packet(e) => e.type_name(),
            Event::CouponIntake(e) => e.type_name(),
            Event::CouponBatch(e) => e.type_name(),
            Event::CouponGroup(e) => e.type_name(),
            Event::OrderIds(e) => e.type_name(),
        }
    }

    /// Schema version of the payload's shape. Bumped (with an upcaster in the codec) when a
    /// variant's fields change; every type starts at 1.
    pub fn schema_version(&self) -> u16 {
        1
    }
}

/// Replays events through `evolve`: the state an actor would have after activation.
pub fn replay<'a, A: Aggregate>(mut state: A, events: impl IntoIterator<Item = &'a A::Event>) -> A {
    for event in events {
        state.evolve(event);
    }
    state
}
