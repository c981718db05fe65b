//! `hongbao audit` on logs built by hand: a clean one, and broken ones that the audit must
//! name (double credit, missing refund, over-issued budget, tampered record).

use super::{open, runtime};
use hongbao::audit::{audit, AuditReport};
use hongbao::domain::activity::{ActivityEvent, Budgets, Reward, RewardKind, VoidReason};
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
use std::sync::Arc;

fn id(s: &str) -> Id {
    Id::parse(s).unwrap()
}

/// Appends events to a stream as they are, with no domain rule in the way.
fn append(store: &Arc<SledStore>, stream: &str, events: Vec<Event>) {
    let events = events
        .into_iter()
        .map(|event| NewEvent {
            event,
            correlation_id: "audit-test".into(),
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

fn credit(entry: Entry, order: &str, amount: u64, after: u64, source: Option<&str>) -> Event {
    Event::Wallet(WalletEvent::Credited(Line {
        entry,
        order_id: id(order),
        amount: Fen::new(amount),
        balance_after: Fen::new(after),
        source: source.map(id),
    }))
}

fn debit(entry: Entry, order: &str, amount: u64, after: u64) -> Event {
    Event::Wallet(WalletEvent::Debited(Line {
        entry,
        order_id: id(order),
        amount: Fen::new(amount),
        balance_after: Fen::new(after),
        source: None,
    }))
}

fn accepted(order: &str, uid: &str, amount: u64) -> Event {
    Event::Activity(ActivityEvent::RewardAccepted(Reward {
        order_id: id(order),
        uid: id(uid),
        scene: id("rain"),
        kind: RewardKind::Cash,
        amount: Fen::new(amount),
        device_id: None,
        app_id: None,
        batch_id: None,
        ext: BTreeMap::new(),
    }))
}

fn withdrawal(events: &[&str], amount: u64) -> Vec<Event> {
    events
        .iter()
        .map(|e| {
            Event::Withdrawal(match *e {
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
                other => panic!("{other}"),
            })
        })
        .collect()
}

fn run_audit(store: &Arc<SledStore>) -> AuditReport {
    audit(store, None, |_, _| ()).unwrap()
}

fn failing(report: &AuditReport) -> Vec<&'static str> {
    report
        .checks
        .iter()
        .filter(|c| !c.ok())
        .map(|c| c.name)
        .collect()
}

fn examples(report: &AuditReport, check: &str) -> String {
    report
        .checks
        .iter()
        .find(|c| c.name == check)
        .unwrap()
        .examples
        .join(" | ")
}

/// A clean mixed history: budget, two rewards (one credited, one pending), a deposit, a paid
/// withdrawal and a refunded one.
fn clean_history(store: &Arc<SledStore>) {
    append(
        store,
        "activity:cny",
        vec![
            Event::Activity(ActivityEvent::BudgetSet(Budgets {
                cash: Fen::new(1_000),
                subsidy: Fen::ZERO,
            })),
            accepted("r1", "u1", 600),
            accepted("r2", "u2", 100),
        ],
    );
    append(
        store,
        "wallet:u1",
        vec![
            credit(Entry::Reward, "r1", 600, 600, Some("cny")),
            credit(Entry::Deposit, "d1", 50, 50, None),
            debit(Entry::Withdrawal, "w1", 200, 400),
            debit(Entry::Withdrawal, "w2", 100, 300),
            credit(Entry::WithdrawalRefund, "w2", 100, 400, None),
        ],
    );
    append(
        store,
        "withdrawal:w1",
        withdrawal(&["requested", "debited", "started", "succeeded"], 200),
    );
    append(
        store,
        "withdrawal:w2",
        withdrawal(
            &["requested", "debited", "started", "parked", "refunded"],
            100,
        ),
    );
}

#[test]
fn a_clean_mixed_history_audits_clean() {
    // Goal: every check passes and the conservation note adds up.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    clean_history(&store);
    let report = run_audit(&store);
    assert!(report.ok(), "{:#?}", report.checks);
    assert_eq!(report.events, 17);
    let notes = report
        .checks
        .iter()
        .flat_map(|c| c.notes.clone())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        notes.contains("1 accepted rewards still pending"),
        "{notes}"
    );
    assert!(notes.contains("200 fen paid out"), "{notes}");
}

#[test]
fn a_double_credit_is_named() {
    // Goal: a reward credited twice shows in wallet_balances and reward_credits, with its ids.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    clean_history(&store);
    append(
        &store,
        "wallet:u1",
        vec![credit(Entry::Reward, "r1", 600, 1_000, Some("cny"))],
    );
    let report = run_audit(&store);
    assert_eq!(failing(&report), ["wallet_balances", "reward_credits"]);
    assert!(examples(&report, "reward_credits").contains("cny/r1 is credited 2 times"));
    assert!(examples(&report, "wallet_balances").contains("records reward r1 twice"));
}

#[test]
fn a_missing_refund_is_named() {
    // Goal: an order marked refunded whose wallet never got the money back fails the audit.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    clean_history(&store);
    append(
        &store,
        "wallet:u1",
        vec![debit(Entry::Withdrawal, "w3", 100, 300)],
    );
    append(
        &store,
        "withdrawal:w3",
        withdrawal(
            &["requested", "debited", "started", "parked", "refunded"],
            100,
        ),
    );
    let report = run_audit(&store);
    assert!(
        failing(&report).contains(&"withdrawals"),
        "{:?}",
        failing(&report)
    );
    assert!(examples(&report, "withdrawals")
        .contains("order w3 is refunded with 1 debits and 0 refunds"));
    assert!(
        failing(&report).contains(&"money_conserved"),
        "the 100 fen vanished"
    );
}

#[test]
fn an_over_issued_budget_is_named() {
    // Goal: accepting beyond the budget is caught at the event where it happened.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    clean_history(&store);
    append(&store, "activity:cny", vec![accepted("r3", "u3", 301)]);
    let report = run_audit(&store);
    assert_eq!(failing(&report), ["budgets"]);
    assert!(examples(&report, "budgets").contains("activity cny accepted cash 1001"));
    // A void returns the budget: the same history with r3 voided is clean again.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    clean_history(&store);
    append(
        &store,
        "activity:cny",
        vec![
            Event::Activity(ActivityEvent::BudgetSet(Budgets {
                cash: Fen::new(2_000),
                subsidy: Fen::ZERO,
            })),
            accepted("r3", "u3", 301),
            Event::Activity(ActivityEvent::RewardVoided {
                order_id: id("r3"),
                uid: id("u3"),
                kind: RewardKind::Cash,
                amount: Fen::new(301),
                reason: VoidReason::DuplicateOrderId,
            }),
        ],
    );
    assert!(run_audit(&store).ok());
}

#[test]
fn a_tampered_record_stops_the_replay_and_is_named() {
    // Goal: one flipped byte breaks the chain at that record; the audit fails there.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    clean_history(&store);
    let journal = store.log_db().open_tree("journal").unwrap();
    let mut key = vec![b'L'];
    key.extend_from_slice(&6u64.to_be_bytes());
    let mut value = journal.get(&key).unwrap().unwrap().to_vec();
    let last = value.len() - 2;
    value[last] ^= 0x40;
    journal.insert(&key, value).unwrap();
    let report = run_audit(&store);
    assert!(failing(&report).contains(&"hash_chain"));
    assert!(
        examples(&report, "hash_chain").contains("seq 6"),
        "{}",
        examples(&report, "hash_chain")
    );
    assert_eq!(report.events, 5, "nothing after the broken link is trusted");
}
