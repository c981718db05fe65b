//! Builders shared by the tests that write logs by hand (audit, mutations, reconciliation,
//! packets): events as they are, appended with no domain rule in the way.

use super::runtime;
use hongbao::audit::AuditReport;
use hongbao::domain::activity::{ActivityEvent, Reward, RewardKind};
use hongbao::domain::wallet::{Entry, Line, WalletEvent};
use hongbao::domain::withdrawal::{
    method_id, Channel, PayoutMethod, WithdrawalEvent, WithdrawalRequest,
};
use hongbao::domain::Event;
use hongbao::events::sled_store::SledStore;
use hongbao::events::{EventStore, ExpectedVersion, NewEvent};
use hongbao::ids::Id;
use hongbao::money::Fen;
use std::collections::BTreeMap;

pub fn id(s: &str) -> Id {
    Id::parse(s).unwrap()
}

/// Appends events to a stream as they are, with no domain rule in the way.
pub fn append(store: &SledStore, stream: &str, events: Vec<Event>) {
    let events = events
        .into_iter()
        .map(|event| NewEvent {
            event,
            correlation_id: "test".into(),
        })
        .collect();
    runtime()
        .block_on(
            store
                .append(0, stream.into(), ExpectedVersion::Any, events)
                .unwrap(),
        )
        .unwrap();
}

pub fn line(entry: Entry, order: &str, amount: u64, after: u64, source: Option<&str>) -> Line {
    Line {
        entry,
        order_id: id(order),
        amount: Fen::new(amount),
        balance_after: Fen::new(after),
        source: source.map(id),
    }
}

pub fn credit(entry: Entry, order: &str, amount: u64, after: u64, source: Option<&str>) -> Event {
    Event::Wallet(WalletEvent::Credited(line(
        entry, order, amount, after, source,
    )))
}

pub fn debit(entry: Entry, order: &str, amount: u64, after: u64) -> Event {
    Event::Wallet(WalletEvent::Debited(line(
        entry, order, amount, after, None,
    )))
}

/// A cash reward of `amount` for `uid` (scene `rain`).
pub fn cash_reward(order: &str, uid: &str, amount: u64) -> Reward {
    Reward {
        order_id: id(order),
        uid: id(uid),
        scene: id("rain"),
        kind: RewardKind::Cash,
        amount: Fen::new(amount),
        device_id: None,
        app_id: None,
        batch_id: None,
        ext: BTreeMap::new(),
    }
}

pub fn accepted(order: &str, uid: &str, amount: u64) -> Event {
    Event::Activity(ActivityEvent::RewardAccepted(cash_reward(
        order, uid, amount,
    )))
}

/// A withdrawal of `amount` by u1 to the bank, through the named steps.
pub fn withdrawal(steps: &[&str], amount: u64) -> Vec<Event> {
    steps
        .iter()
        .map(|step| {
            Event::Withdrawal(match *step {
                "requested" => WithdrawalEvent::Requested {
                    request: WithdrawalRequest {
                        uid: id("u1"),
                        amount: Fen::new(amount),
                        method: PayoutMethod {
                            method_id: method_id(Channel::Bank, "a"),
                            channel: Channel::Bank,
                            account: "a".into(),
                        },
                    },
                    at_ms: 1,
                },
                "debited" => WithdrawalEvent::Debited { at_ms: 2 },
                "started" => WithdrawalEvent::PayoutStarted {
                    attempt: 1,
                    at_ms: 3,
                },
                "succeeded" => WithdrawalEvent::PayoutSucceeded {
                    attempt: 1,
                    at_ms: 4,
                },
                "parked" => WithdrawalEvent::PayoutParked {
                    attempts: 1,
                    reason: "declined".into(),
                    at_ms: 4,
                },
                "refunded" => WithdrawalEvent::Refunded { at_ms: 5 },
                other => panic!("unknown step {other}"),
            })
        })
        .collect()
}

/// The names of the checks that failed.
pub fn failing(report: &AuditReport) -> Vec<&'static str> {
    report
        .checks
        .iter()
        .filter(|c| !c.ok())
        .map(|c| c.name)
        .collect()
}

/// A check's listed violations, joined.
pub fn examples(report: &AuditReport, check: &str) -> String {
    report
        .checks
        .iter()
        .find(|c| c.name == check)
        .unwrap()
        .examples
        .join(" | ")
}
