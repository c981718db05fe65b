//! `hongbao audit` on logs built by hand: a clean one, and broken ones that the audit must
//! name (double credit, missing refund, over-issued budget, tampered record).

use super::fixtures::*;
use super::{open, runtime};
use hongbao::audit::{audit, audit_logs, AuditReport};
use hongbao::domain::activity::{ActivityEvent, Budgets, Reward, RewardKind, VoidReason};
use hongbao::domain::wallet::Entry;
use hongbao::domain::Event;
use hongbao::events::sled_store::SledStore;
use hongbao::money::Fen;
use std::collections::BTreeMap;
use std::sync::Arc;

fn run_audit(store: &Arc<SledStore>) -> AuditReport {
    audit(store.as_ref(), None, |_, _| ()).unwrap()
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

/// The clean history split the way a cluster splits it: the wallets in one partition's log,
/// the activity and the withdrawal orders in another's.
fn split_history(wallets: &Arc<SledStore>, business: &Arc<SledStore>) {
    append(
        wallets,
        "wallet:u1",
        vec![
            credit(Entry::Reward, "r1", 600, 600, Some("cny")),
            credit(Entry::Deposit, "d1", 50, 50, None),
            debit(Entry::Withdrawal, "w1", 200, 400),
        ],
    );
    append(
        business,
        "activity:cny",
        vec![
            Event::Activity(ActivityEvent::BudgetSet(Budgets {
                cash: Fen::new(1_000),
                subsidy: Fen::ZERO,
            })),
            accepted("r1", "u1", 600),
        ],
    );
    append(
        business,
        "withdrawal:w1",
        withdrawal(&["requested", "debited", "started", "succeeded"], 200),
    );
}

/// Audits `logs` together, the wallets filed in `wallets` and everything else in the other
/// log (the map of `split_history`).
/// Two fresh logs holding `split_history` (kept as long as the directories are).
fn split_logs() -> ([tempfile::TempDir; 2], Arc<SledStore>, Arc<SledStore>) {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (wallets, business) = (open(dirs[0].path()), open(dirs[1].path()));
    split_history(&wallets, &business);
    (dirs, wallets, business)
}

fn run_audit_logs(logs: &[&Arc<SledStore>], wallets: &Arc<SledStore>) -> AuditReport {
    audit_two_logs(logs, wallets, |stream| stream.starts_with("wallet:"))
}

/// Audits two logs together, the streams `filed_in_first` picks filed in `first` and every other
/// in the other log.
fn audit_two_logs(
    logs: &[&Arc<SledStore>],
    first: &Arc<SledStore>,
    filed_in_first: impl Fn(&str) -> bool,
) -> AuditReport {
    let named: Vec<(String, &dyn hongbao::events::Log)> = logs
        .iter()
        .enumerate()
        .map(|(n, log)| {
            (
                format!("p{n:03}"),
                log.as_ref() as &dyn hongbao::events::Log,
            )
        })
        .collect();
    let first_at = logs.iter().position(|l| Arc::ptr_eq(l, first)).unwrap();
    let home = |stream: &str| {
        if filed_in_first(stream) {
            first_at
        } else {
            1 - first_at
        }
    };
    audit_logs(&named, home, None, |_, _| ()).unwrap()
}

#[test]
fn partitions_audited_together_balance_where_each_alone_cannot() {
    // Goal: money that crosses partitions (a reward accepted in one, credited in another) is
    // proven as one set of books; alone, the wallets' partition shows a credit never accepted
    // (the check that would catch a forged credit), and the order in which the logs are given
    // changes nothing.
    let (_dirs, wallets, business) = split_logs();
    assert!(failing(&run_audit(&wallets)).contains(&"reward_credits"));
    for logs in [[&wallets, &business], [&business, &wallets]] {
        let report = run_audit_logs(&logs, &wallets);
        assert!(report.ok(), "{:#?}", report.checks);
        assert_eq!(report.events, 9);
        let chain = report
            .checks
            .iter()
            .find(|c| c.name == "hash_chain")
            .unwrap();
        assert_eq!(chain.checked, 9, "each record's link checked once");
    }
}

/// A hot activity on a cluster: its budget and grants in one partition, intake shard `cny@1`
/// (which received a slice, accepted r1 and released the rest) and the wallet in another.
fn sliced_history(activity: &Arc<SledStore>, shard: &Arc<SledStore>) {
    let cash = |amount| Fen::new(amount);
    append(
        activity,
        "activity:cny",
        vec![
            Event::Activity(ActivityEvent::BudgetSet(Budgets {
                cash: cash(1_000),
                subsidy: Fen::ZERO,
            })),
            Event::Activity(ActivityEvent::SliceGranted {
                shard: 1,
                kind: RewardKind::Cash,
                amount: cash(700),
            }),
        ],
    );
    append(
        shard,
        "activity:cny@1",
        vec![
            Event::Activity(ActivityEvent::SliceReceived {
                kind: RewardKind::Cash,
                amount: cash(700),
            }),
            accepted("r1", "u1", 600),
            Event::Activity(ActivityEvent::SliceReleased {
                kind: RewardKind::Cash,
                amount: cash(100),
            }),
        ],
    );
    append(
        shard,
        "wallet:u1",
        vec![credit(Entry::Reward, "r1", 600, 600, Some("cny"))],
    );
    append(
        activity,
        "activity:cny",
        vec![Event::Activity(ActivityEvent::SliceTakenBack {
            shard: 1,
            kind: RewardKind::Cash,
            amount: cash(100),
        })],
    );
}

fn audit_sliced(logs: [&Arc<SledStore>; 2], shard: &Arc<SledStore>) -> AuditReport {
    audit_two_logs(&logs, shard, |stream| {
        stream.starts_with("activity:cny@") || stream.starts_with("wallet:")
    })
}

#[test]
fn budget_slices_across_partitions_audit_clean_whichever_partition_is_read_first() {
    // Goal: a reward accepted by an intake shard is its activity's (the credit names `cny`),
    // the slice books match across the two partitions, and the order the logs are read in
    // changes nothing.
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (activity, shard) = (open(dirs[0].path()), open(dirs[1].path()));
    sliced_history(&activity, &shard);
    for logs in [[&activity, &shard], [&shard, &activity]] {
        let report = audit_sliced(logs, &shard);
        assert!(report.ok(), "{:#?}", report.checks);
    }
}

#[test]
fn a_shard_accepting_beyond_its_slice_or_receiving_what_was_not_granted_is_named() {
    // Goal: each bound of the slice protocol is checked where it can break: a shard that
    // accepts more than it holds, a receipt above the grants, a take-back above the releases,
    // and the activity's total over all its shards above the budget.
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (activity, shard) = (open(dirs[0].path()), open(dirs[1].path()));
    sliced_history(&activity, &shard);
    append(&shard, "activity:cny@1", vec![accepted("r2", "u2", 50)]);
    append(
        &shard,
        "activity:cny@2",
        vec![
            Event::Activity(ActivityEvent::SliceReceived {
                kind: RewardKind::Cash,
                amount: Fen::new(900),
            }),
            accepted("r3", "u3", 900),
        ],
    );
    append(
        &activity,
        "activity:cny",
        vec![Event::Activity(ActivityEvent::SliceTakenBack {
            shard: 1,
            kind: RewardKind::Cash,
            amount: Fen::new(5),
        })],
    );
    let report = audit_sliced([&activity, &shard], &shard);
    assert_eq!(failing(&report), ["budgets"]);
    let found = examples(&report, "budgets");
    for expected in [
        "intake shard cny@1 accepted cash 650 / subsidy 0 holding slices of 600 / 0",
        "intake shard cny@2 received 900 of cash, its activity granted 0",
        "activity cny took back 105 of cash from shard 1, which released 100",
        "activity cny and its intake shards accepted cash 1550 / subsidy 0 against a budget of 1000 / 0",
    ] {
        assert!(found.contains(expected), "{expected:?} not in {found}");
    }
}

#[test]
fn a_budget_return_to_an_activity_that_did_not_accept_the_money_is_named() {
    // Goal: an expired B2C packet's remainder goes back to the books that accepted its
    // subsidy: on a cluster its intake shard. Returned to the activity itself, which accepted
    // none of its shards' rewards, it would be lost against nothing (the activity's accepted
    // total cannot go below zero): the audit names such a return, and not the same return to
    // the shard.
    let budget_findings = |to_shard: bool| {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let (activity, shard) = (open(dirs[0].path()), open(dirs[1].path()));
        sliced_history(&activity, &shard);
        let (log, stream) = if to_shard {
            (&shard, "activity:cny@1")
        } else {
            (&activity, "activity:cny")
        };
        append(
            log,
            stream,
            vec![Event::Activity(ActivityEvent::BudgetReturned {
                order_id: id("bp1"),
                kind: RewardKind::Cash,
                amount: Fen::new(50),
            })],
        );
        examples(&audit_sliced([&activity, &shard], &shard), "budgets")
    };
    let found = budget_findings(false);
    let expected = "cny took back 50 fen of cash for packet bp1, more than the 0 it had accepted";
    assert!(found.contains(expected), "{expected:?} not in {found}");
    let found = budget_findings(true);
    assert!(!found.contains("took back"), "{found}");
}

#[test]
fn a_credit_of_a_reward_voided_in_another_partition_is_named() {
    // Goal: the merged replay compares a movement with the decision in the other log: the
    // credit of a reward that the activity (in another partition) voided is named, whichever
    // log recorded its fact first.
    let (_dirs, wallets, business) = split_logs();
    append(
        &business,
        "activity:cny",
        vec![
            accepted("r2", "u2", 100),
            Event::Activity(ActivityEvent::RewardVoided {
                order_id: id("r2"),
                uid: id("u2"),
                kind: RewardKind::Cash,
                amount: Fen::new(100),
                reason: VoidReason::DuplicateOrderId,
            }),
        ],
    );
    append(
        &wallets,
        "wallet:u2",
        vec![credit(Entry::Reward, "r2", 100, 100, Some("cny"))],
    );
    let report = run_audit_logs(&[&wallets, &business], &wallets);
    assert_eq!(failing(&report), ["reward_credits"]);
    assert!(examples(&report, "reward_credits").contains("cny/r2 was voided"));
}

#[test]
fn a_stream_filed_in_the_wrong_partition_is_named() {
    // Goal: a record in a partition the deployment's map does not give its stream (the nodes
    // would never read it there) fails the placement check, named with where it belongs.
    let (_dirs, wallets, business) = split_logs();
    append(
        &business,
        "wallet:u9",
        vec![credit(Entry::Deposit, "d9", 10, 10, None)],
    );
    let report = run_audit_logs(&[&wallets, &business], &wallets);
    assert_eq!(failing(&report), ["placement"]);
    assert!(
        examples(&report, "placement").contains("p001 seq 7: wallet:u9 belongs in p000"),
        "{}",
        examples(&report, "placement")
    );
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
fn an_order_id_accepted_in_two_activities_is_named() {
    // Goal (R4): the audit keys rewards by order id alone: the same order id accepted again in
    // another activity (another uid, another amount) is a violation naming the order id and
    // both activities, even though neither reward was credited twice.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    clean_history(&store);
    append(&store, "activity:other", vec![accepted("r2", "u9", 50)]);
    let report = run_audit(&store);
    assert_eq!(failing(&report), ["reward_credits"]);
    let named = examples(&report, "reward_credits");
    assert!(
        named.contains("order id r2") && named.contains("cny") && named.contains("other"),
        "{named}"
    );
}

#[test]
fn an_acceptance_outside_its_order_id_claim_and_a_second_claim_are_named() {
    // Goal (R4): the registry's claims are audited against the acceptances: a claim and its
    // acceptance in the same activity are clean (a claim never accepted too: a refused
    // request); an acceptance in another activity than the claim's, and a second claim of one
    // order id, are named.
    use hongbao::domain::order_ids::{OrderClaim, OrderIdEvent};
    let claim = |order: &str, activity: &str| OrderClaim {
        order_id: id(order),
        activity_id: id(activity),
        fingerprint: 7,
    };
    let claimed = |claims: Vec<OrderClaim>| Event::OrderIds(OrderIdEvent::Claimed { claims });
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    clean_history(&store);
    append(
        &store,
        "order-ids:0",
        vec![claimed(vec![claim("r5", "cny"), claim("refused", "cny")])],
    );
    append(&store, "activity:cny", vec![accepted("r5", "u5", 10)]);
    let report = run_audit(&store);
    assert!(report.ok(), "{:#?}", report.checks);

    append(
        &store,
        "order-ids:1",
        vec![claimed(vec![claim("r6", "cny")])],
    );
    append(&store, "activity:other", vec![accepted("r6", "u6", 10)]);
    append(
        &store,
        "order-ids:2",
        vec![claimed(vec![claim("r5", "other")])],
    );
    let report = run_audit(&store);
    assert_eq!(failing(&report), ["reward_credits"]);
    let named = examples(&report, "reward_credits");
    assert!(
        named.contains("order id r6 accepted by activity other but claimed for activity cny"),
        "{named}"
    );
    assert!(
        named.contains("order id r5 claimed for activity cny and again for activity other"),
        "{named}"
    );
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

#[test]
fn money_created_by_one_event_is_named_at_that_event() {
    // Goal: conservation holds after every event; a deposit of 10 that raises the balance by
    // 4,950 (from 50 to 5,000) is named with its seq, not only as a wrong total at the end.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    clean_history(&store);
    append(
        &store,
        "wallet:u1",
        vec![credit(Entry::Deposit, "d9", 10, 5_000, None)],
    );
    let report = run_audit(&store);
    assert_eq!(failing(&report), ["wallet_balances", "money_conserved"]);
    let found = examples(&report, "money_conserved");
    assert!(
        found.contains(
            "seq 18: wallet u1 deposit d9: balances change by 4940 fen more than the movement"
        ),
        "{found}"
    );
}

#[test]
fn the_continuous_audit_counts_and_logs_a_violation_as_it_is_appended() {
    // Goal (D3): the server's follower sees a double credit appended after a clean history and
    // raises hongbao_audit_violations_total{check="reward_credits"}; a clean history raises
    // nothing.
    use hongbao::audit::LiveAudit;
    use hongbao::events::EventStore;
    use hongbao::metrics::Metrics;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    clean_history(&store);
    let metrics = Arc::new(Metrics::new());
    let violations = |check: &str| {
        metrics
            .audit_violations_total
            .with_label_values(&[check])
            .get()
    };
    let live = LiveAudit::start(
        store.clone() as Arc<dyn EventStore>,
        metrics.clone(),
        Duration::from_millis(50),
    )
    .unwrap();
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for("the clean history", &|| {
        metrics.audit_checked_seq.get() == 17
    });
    std::thread::sleep(Duration::from_millis(200));
    for check in [
        "reward_credits",
        "wallet_balances",
        "money_conserved",
        "hash_chain",
    ] {
        assert_eq!(violations(check), 0, "{check}");
    }
    append(
        &store,
        "wallet:u1",
        vec![credit(Entry::Reward, "r1", 600, 1_000, Some("cny"))],
    );
    wait_for("the double credit", &|| violations("reward_credits") == 1);
    assert_eq!(violations("wallet_balances"), 1);
    runtime().block_on(live.stop());
}

mod coupons {
    use super::*;
    use hongbao::domain::coupon::{
        BatchEvent, BatchSpec, Grant, GroupEvent, IntakeEvent, IssueRequest, Refusal, Refused,
        Verdict,
    };

    fn request(seq: &str, uid: &str, batch: &str) -> IssueRequest {
        IssueRequest {
            seq_no: id(seq),
            uid: id(uid),
            batch_id: id(batch),
        }
    }

    fn spec(stock: u64, limit: u32, group: Option<&str>) -> Event {
        Event::CouponBatch(BatchEvent::Created {
            spec: BatchSpec {
                group_id: group.map(id),
                stock,
                per_user_limit: limit,
                value: Fen::new(100),
                starts_at_ms: None,
                ends_at_ms: None,
            },
            at_ms: 0,
        })
    }

    fn deducted(grants: &[(&str, &str, u64)], refusals: &[(&str, &str, Refusal)]) -> Event {
        Event::CouponBatch(BatchEvent::Deducted {
            grants: grants
                .iter()
                .map(|(seq, uid, n)| Grant {
                    seq_no: id(seq),
                    uid: id(uid),
                    coupon_no: *n,
                })
                .collect(),
            refusals: refusals
                .iter()
                .map(|(seq, uid, reason)| Refused {
                    seq_no: id(seq),
                    uid: id(uid),
                    reason: *reason,
                })
                .collect(),
            at_ms: 0,
        })
    }

    fn accept(store: &Arc<SledStore>, requests: &[(&str, &str, &str)]) {
        let requests = requests.iter().map(|(s, u, b)| request(s, u, b)).collect();
        append(
            store,
            "coupon-intake:0",
            vec![Event::CouponIntake(IntakeEvent::Accepted {
                requests,
                at_ms: 0,
            })],
        );
    }

    /// Batch `a` (stock 2, limit 1, group g) and `b` (group g): s1, s2 granted on a; s3 sold
    /// out; s4 (u1 on b) refused by the group; s5 accepted and still pending.
    fn clean(store: &Arc<SledStore>) {
        append(store, "coupon-batch:a", vec![spec(2, 1, Some("g"))]);
        append(store, "coupon-batch:b", vec![spec(5, 1, Some("g"))]);
        accept(
            store,
            &[
                ("s1", "u1", "a"),
                ("s2", "u2", "a"),
                ("s3", "u3", "a"),
                ("s4", "u1", "b"),
                ("s5", "u5", "b"),
            ],
        );
        append(
            store,
            "coupon-group:g",
            vec![Event::CouponGroup(GroupEvent::Reserved {
                held: vec![request("s1", "u1", "a"), request("s2", "u2", "a")],
                refused: vec![request("s4", "u1", "b")],
                at_ms: 0,
            })],
        );
        append(
            store,
            "coupon-intake:0",
            vec![Event::CouponIntake(IntakeEvent::Recorded {
                verdicts: vec![(
                    request("s4", "u1", "b"),
                    Verdict::Rejected(Refusal::GroupExclusive),
                )],
                at_ms: 0,
            })],
        );
        append(
            store,
            "coupon-batch:a",
            vec![deducted(
                &[("s1", "u1", 1), ("s2", "u2", 2)],
                &[("s3", "u3", Refusal::SoldOut)],
            )],
        );
    }

    fn coupons_note(report: &AuditReport) -> String {
        report
            .checks
            .iter()
            .find(|c| c.name == "coupons")
            .unwrap()
            .notes
            .join("\n")
    }

    #[test]
    fn a_clean_coupon_history_audits_clean_and_counts_pending() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        clean(&store);
        let report = run_audit(&store);
        assert!(report.ok(), "{:#?}", report.checks);
        let note = coupons_note(&report);
        assert!(
            note.contains("5 accepted = 2 issued (2 coupons) + 2 refused"),
            "{note}"
        );
        assert!(note.contains("1 pending"), "{note}");
    }

    /// A cluster's coupons: the intake in one partition, the batch in another, the outcomes
    /// noted on the intake (s1 issued coupon 1, s2 sold out).
    fn cluster_coupons(intakes: &Arc<SledStore>, batches: &Arc<SledStore>) {
        let (s1, s2) = (request("s1", "u1", "a"), request("s2", "u2", "a"));
        append(batches, "coupon-batch:a", vec![spec(1, 1, None)]);
        accept(intakes, &[("s1", "u1", "a"), ("s2", "u2", "a")]);
        let recorded = |verdicts| Event::CouponIntake(IntakeEvent::Recorded { verdicts, at_ms: 0 });
        append(
            intakes,
            "coupon-intake:0",
            vec![recorded(vec![
                (s1.clone(), Verdict::Passed),
                (s2.clone(), Verdict::Passed),
            ])],
        );
        append(
            batches,
            "coupon-batch:a",
            vec![deducted(
                &[("s1", "u1", 1)],
                &[("s2", "u2", Refusal::SoldOut)],
            )],
        );
        append(
            intakes,
            "coupon-intake:0",
            vec![recorded(vec![
                (s1, Verdict::Issued(1)),
                (s2, Verdict::Rejected(Refusal::SoldOut)),
            ])],
        );
    }

    fn audit_partitions(logs: [&Arc<SledStore>; 2], intakes: &Arc<SledStore>) -> AuditReport {
        audit_two_logs(&logs, intakes, |stream| {
            stream.starts_with("coupon-intake:")
        })
    }

    #[test]
    fn a_clusters_coupons_audit_clean_whichever_partition_is_read_first() {
        // Goal: on a cluster a grant (the batch's partition) may be read before its acceptance
        // (the intake's): the cross-stream checks wait for the end, so both orders are clean,
        // and the outcomes noted on the intake agree with the grants.
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let (intakes, batches) = (open(dirs[0].path()), open(dirs[1].path()));
        cluster_coupons(&intakes, &batches);
        for logs in [[&intakes, &batches], [&batches, &intakes]] {
            let report = audit_partitions(logs, &intakes);
            assert!(report.ok(), "{:#?}", report.checks);
            let note = coupons_note(&report);
            assert!(
                note.contains("2 accepted = 1 issued (1 coupons) + 1 refused"),
                "{note}"
            );
        }
    }

    #[test]
    fn an_intake_noting_a_coupon_its_batch_did_not_grant_is_named() {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let (intakes, batches) = (open(dirs[0].path()), open(dirs[1].path()));
        cluster_coupons(&intakes, &batches);
        // s3 noted issued without a grant; s1 noted with another number than its grant's.
        accept(&intakes, &[("s3", "u3", "a")]);
        append(
            &intakes,
            "coupon-intake:0",
            vec![Event::CouponIntake(IntakeEvent::Recorded {
                verdicts: vec![
                    (request("s3", "u3", "a"), Verdict::Issued(2)),
                    (request("s1", "u1", "a"), Verdict::Issued(2)),
                ],
                at_ms: 0,
            })],
        );
        let report = audit_partitions([&batches, &intakes], &intakes);
        assert_eq!(failing(&report), ["coupons"]);
        let found = examples(&report, "coupons");
        assert!(
            found.contains("request s3: its intake says coupon 2 was issued, no batch granted it"),
            "{found}"
        );
        assert!(
            found.contains("request s1: its intake says coupon a-2, its batch granted a-1"),
            "{found}"
        );
    }

    fn coupon_reward(order: &str, uid: &str, batch: &str) -> Event {
        Event::Activity(ActivityEvent::RewardAccepted(Reward {
            order_id: id(order),
            uid: id(uid),
            scene: id("s"),
            kind: RewardKind::Coupon,
            amount: Fen::new(1),
            device_id: None,
            app_id: None,
            batch_id: Some(id(batch)),
            ext: BTreeMap::new(),
        }))
    }

    #[test]
    fn a_coupon_reward_settled_against_its_request_outcome_is_named() {
        // Goal (R1): a coupon reward marked delivered must have had its request issued; one
        // whose request the batch never granted is named (reward_credits, with its ids).
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        clean(&store);
        append(
            &store,
            "activity:camp",
            vec![
                coupon_reward("cr1", "u7", "a"),
                coupon_reward("cr2", "u8", "b"),
                Event::Activity(ActivityEvent::RewardDelivered {
                    order_id: id("cr1"),
                    uid: id("u7"),
                }),
            ],
        );
        // cr2 is granted and delivered; cr1 was marked delivered without a coupon.
        append(
            &store,
            "coupon-batch:b",
            vec![deducted(&[("reward:camp:cr2", "u8", 1)], &[])],
        );
        append(
            &store,
            "activity:camp",
            vec![Event::Activity(ActivityEvent::RewardDelivered {
                order_id: id("cr2"),
                uid: id("u8"),
            })],
        );
        let report = run_audit(&store);
        assert_eq!(failing(&report), ["reward_credits"]);
        let named = examples(&report, "reward_credits");
        assert!(
            named.contains("camp/cr1") && !named.contains("cr2"),
            "{named}"
        );
    }

    #[test]
    fn an_oversold_batch_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        clean(&store);
        accept(&store, &[("s6", "u6", "a")]);
        append(
            &store,
            "coupon-batch:a",
            vec![deducted(&[("s6", "u6", 3)], &[])],
        );
        let report = run_audit(&store);
        assert_eq!(failing(&report), ["coupons"]);
        let found = examples(&report, "coupons");
        assert!(found.contains("coupon number 3 outside 1..=2"), "{found}");
        assert!(found.contains("3 issued, stock 2"), "{found}");
    }

    #[test]
    fn a_limit_breach_a_group_breach_and_a_double_grant_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        clean(&store);
        // u1 gets a second coupon of a (limit 1) and one of b (same group); s1 granted again.
        accept(&store, &[("s7", "u1", "a"), ("s8", "u1", "b")]);
        append(
            &store,
            "coupon-batch:a",
            vec![deducted(&[("s7", "u1", 2)], &[])],
        );
        append(
            &store,
            "coupon-batch:b",
            vec![deducted(&[("s8", "u1", 1), ("s1", "u1", 2)], &[])],
        );
        let report = run_audit(&store);
        assert_eq!(failing(&report), ["coupons"]);
        let found = examples(&report, "coupons");
        assert!(
            found.contains("batch a: u1 holds more than the limit of 1"),
            "{found}"
        );
        assert!(found.contains("coupon 2 granted to s2 and s7"), "{found}");
        assert!(found.contains("request s1: granted twice"), "{found}");
        assert!(
            found.contains("request s1: accepted for u1/a, granted to u1/b"),
            "{found}"
        );
        assert!(
            found.contains("group g: u1 holds coupons of batches"),
            "{found}"
        );
    }

    #[test]
    fn a_grant_after_a_final_refusal_or_without_acceptance_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        clean(&store);
        append(
            &store,
            "coupon-batch:b",
            vec![deducted(&[("s4", "u1", 1), ("ghost", "u9", 2)], &[])],
        );
        let report = run_audit(&store);
        let found = examples(&report, "coupons");
        assert!(
            found.contains(
                "request s4: granted coupon b-1 despite its final refusal (group_exclusive)"
            ),
            "{found}"
        );
        assert!(
            found.contains("request ghost: granted coupon b-2 but never accepted"),
            "{found}"
        );
    }
}

#[test]
fn a_reward_noted_pending_that_its_activity_did_not_accept_is_named() {
    // Goal: on a cluster a wallet notes rewards accepted in other partitions as pending; a
    // note the activity never accepted (or accepted for another amount) would show the user
    // money that is not coming, and is named; the notes of accepted rewards pass.
    use hongbao::domain::activity::RewardKind;
    use hongbao::domain::wallet::{PendingNote, WalletEvent};
    let (_dirs, wallets, business) = split_logs();
    let noted = |order: &str, amount: u64| {
        Event::Wallet(WalletEvent::PendingNoted(PendingNote {
            activity_id: id("cny"),
            order_id: id(order),
            kind: RewardKind::Cash,
            amount: Fen::new(amount),
        }))
    };
    // r2 accepted and not credited yet: noted pending, as the cluster does.
    append(&business, "activity:cny", vec![accepted("r2", "u1", 300)]);
    append(&wallets, "wallet:u1", vec![noted("r2", 300)]);
    let report = run_audit_logs(&[&wallets, &business], &wallets);
    assert!(report.ok(), "{:#?}", report.checks);
    append(
        &wallets,
        "wallet:u1",
        vec![noted("r7", 5), noted("r2", 301)],
    );
    let report = run_audit_logs(&[&wallets, &business], &wallets);
    assert_eq!(failing(&report), ["reward_credits"]);
    let named = examples(&report, "reward_credits");
    assert!(
        named.contains("notes reward cny/r7 (cash 5 fen) pending"),
        "{named}"
    );
    assert!(
        named.contains("notes reward cny/r2 (cash 301 fen) pending"),
        "{named}"
    );
}

#[test]
fn a_reward_noted_pending_after_its_credit_is_named() {
    // Goal: a wallet records no note of a reward it has credited (the user would see a reward
    // still coming, for good, that was paid); a log where a note follows the credit is named,
    // though the activity accepted that very reward.
    use hongbao::domain::activity::RewardKind;
    use hongbao::domain::wallet::{PendingNote, WalletEvent};
    let (_dirs, wallets, business) = split_logs();
    let report = run_audit_logs(&[&wallets, &business], &wallets);
    assert!(report.ok(), "{:#?}", report.checks);
    let noted = Event::Wallet(WalletEvent::PendingNoted(PendingNote {
        activity_id: id("cny"),
        order_id: id("r1"),
        kind: RewardKind::Cash,
        amount: Fen::new(600),
    }));
    append(&wallets, "wallet:u1", vec![noted]);
    let report = run_audit_logs(&[&wallets, &business], &wallets);
    assert_eq!(failing(&report), ["reward_credits"]);
    let named = examples(&report, "reward_credits");
    assert!(
        named.contains(
            "seq 4: wallet u1 notes reward cny/r1 (cash 600 fen) pending after crediting it"
        ),
        "{named}"
    );
}

#[test]
fn a_note_settled_before_its_activity_settled_the_reward_is_named() {
    // Goal: on a cluster a coupon or item reward's note is settled on the wallet once its
    // activity delivered, failed or voided it; a settling the activity never made (the user
    // no longer sees a reward still coming) is named, whichever log is read first; once the
    // activity's delivery is in its log, the same settling passes.
    use hongbao::domain::activity::{Reward, RewardKind};
    use hongbao::domain::wallet::WalletEvent;
    let (_dirs, wallets, business) = split_logs();
    let item = Reward {
        kind: RewardKind::Item,
        amount: Fen::new(1),
        ..match accepted("i1", "u1", 1) {
            Event::Activity(ActivityEvent::RewardAccepted(reward)) => reward,
            _ => unreachable!(),
        }
    };
    append(
        &business,
        "activity:cny",
        vec![Event::Activity(ActivityEvent::RewardAccepted(item))],
    );
    let settled = |order: &str| {
        Event::Wallet(WalletEvent::NoteSettled {
            activity_id: id("cny"),
            order_id: id(order),
        })
    };
    append(&wallets, "wallet:u1", vec![settled("i1"), settled("i9")]);
    let report = run_audit_logs(&[&wallets, &business], &wallets);
    assert_eq!(failing(&report), ["reward_credits"]);
    let named = examples(&report, "reward_credits");
    for order in ["i1", "i9"] {
        assert!(
            named.contains(&format!(
                "settles its note of reward cny/{order}, which its activity did not deliver"
            )),
            "{named}"
        );
    }
    append(
        &business,
        "activity:cny",
        vec![Event::Activity(ActivityEvent::RewardDelivered {
            order_id: id("i1"),
            uid: id("u1"),
        })],
    );
    let report = run_audit_logs(&[&business, &wallets], &wallets);
    let named = examples(&report, "reward_credits");
    assert!(!named.contains("cny/i1"), "{named}");
    assert!(named.contains("cny/i9"), "{named}");
}
