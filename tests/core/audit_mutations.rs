//! The audit's mutation suite (issue 11 item 12): for every check `hongbao audit` prints, a log
//! that breaks exactly that invariant, written through the store (no domain rule in the way),
//! and the assertion that the audit fails naming exactly that check.
//!
//! Every test starts from one clean history touching every check (wallets, rewards and a
//! budget, withdrawals with the channel's statement, a red packet, coupons, built views), adds
//! one mutation and compares the failing checks with the expected list. To cover a new check:
//! write one `fn mutate_...(&Fixture)` and add one line to `mutations!` below; the test
//! `every_check_the_audit_prints_has_a_mutation` fails until a new check has its line.

use super::fixtures::*;
use super::{open, runtime};
use hongbao::audit::{audit, views_check, CheckResult};
use hongbao::channels::{PayOutcome, PaymentChannel, SimulatedChannels, Simulator};
use hongbao::clock::ManualClock;
use hongbao::domain::activity::{ActivityEvent, Budgets};
use hongbao::domain::coupon::{BatchEvent, BatchSpec, Grant, IntakeEvent, IssueRequest};
use hongbao::domain::packet::{ClaimRecord, Mode, PacketEvent, PacketSpec, Split};
use hongbao::domain::wallet::Entry;
use hongbao::domain::withdrawal::Channel;
use hongbao::domain::Event;
use hongbao::events::sled_store::SledStore;
use hongbao::events::EventStore;
use hongbao::metrics::Metrics;
use hongbao::money::Fen;
use hongbao::projections;
use std::sync::Arc;

/// A data directory with a log, the channels' statements and built views.
struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<SledStore>,
    channels: Arc<SimulatedChannels>,
}

fn coupon_request(seq: &str, uid: &str) -> IssueRequest {
    IssueRequest {
        seq_no: id(seq),
        uid: id(uid),
        batch_id: id("a"),
    }
}

fn coupon_granted(store: &SledStore, seq: &str, uid: &str, coupon_no: u64) {
    append(
        store,
        "coupon-intake:0",
        vec![Event::CouponIntake(IntakeEvent::Accepted {
            requests: vec![coupon_request(seq, uid)],
            at_ms: 0,
        })],
    );
    append(
        store,
        "coupon-batch:a",
        vec![Event::CouponBatch(BatchEvent::Deducted {
            grants: vec![Grant {
                seq_no: id(seq),
                uid: id(uid),
                coupon_no,
            }],
            refusals: Vec::new(),
            at_ms: 0,
        })],
    );
}

/// The clean history every mutation starts from:
/// - activity cny with a cash budget of 1,000: r1 (u1, 600) accepted and credited, r2 (u2, 100)
///   accepted and pending;
/// - u1: reward 600, withdrawal w1 (200) paid by the bank (on its statement), w2 (100) parked
///   and refunded: 400 in the activity account; deposit 50 in change;
/// - alice deposits 1,000 and pays packet pk (C2C, 3 x 100); carol claims one share and gets
///   its transfer: 200 stay in escrow;
/// - coupon batch a (stock 1, limit 1): s1 accepted for u1 and granted coupon 1;
/// - every view built up to the head.
fn clean() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let channels = SimulatedChannels::open(dir.path(), Arc::new(ManualClock::new(1_000))).unwrap();
    append(
        &store,
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
        &store,
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
        &store,
        "withdrawal:w1",
        withdrawal(&["requested", "debited", "started", "succeeded"], 200),
    );
    append(
        &store,
        "withdrawal:w2",
        withdrawal(
            &["requested", "debited", "started", "parked", "refunded"],
            100,
        ),
    );
    let paid = runtime().block_on(Simulator(channels.clone()).pay(
        Channel::Bank,
        &id("w1"),
        Fen::new(200),
        "a",
    ));
    assert!(matches!(paid, PayOutcome::Succeeded), "{paid:?}");

    append(
        &store,
        "wallet:alice",
        vec![
            credit(Entry::Deposit, "d2", 1_000, 1_000, None),
            debit(Entry::PacketPayment, "pk", 300, 700),
        ],
    );
    append(
        &store,
        "packet:pk",
        vec![
            Event::Packet(PacketEvent::Created {
                spec: PacketSpec {
                    sender_uid: id("alice"),
                    mode: Mode::C2c,
                    total: Fen::new(300),
                    count: 3,
                    split: Split::Even,
                    audience: None,
                    expires_at_ms: 1_000_000,
                    seed: 1,
                    subsidy: None,
                },
                shares: vec![Fen::new(100); 3],
                at_ms: 0,
            }),
            Event::Packet(PacketEvent::Paid {
                payment_id: id("p1"),
                at_ms: 0,
            }),
            Event::Packet(PacketEvent::ShareClaimed {
                uid: id("carol"),
                index: 0,
                amount: Fen::new(100),
                at_ms: 0,
            }),
        ],
    );
    append(
        &store,
        "wallet:carol",
        vec![credit(Entry::ClaimTransfer, "pk", 100, 100, None)],
    );

    append(
        &store,
        "coupon-batch:a",
        vec![Event::CouponBatch(BatchEvent::Created {
            spec: BatchSpec {
                group_id: None,
                stock: 1,
                per_user_limit: 1,
                value: Fen::new(100),
                starts_at_ms: None,
                ends_at_ms: None,
            },
            at_ms: 0,
        })],
    );
    coupon_granted(&store, "s1", "u1", 1);

    for projection in all_views() {
        projections::rebuild(
            store.as_ref(),
            store.state_db(),
            projection.as_ref(),
            |_, _| (),
        )
        .unwrap();
    }
    Fixture {
        _dir: dir,
        store,
        channels,
    }
}

fn all_views() -> Vec<Arc<dyn projections::Projection>> {
    projections::all(Arc::new(Metrics::new()))
}

/// Every check `hongbao audit` prints, as it prints them: the replay's, then the views'.
fn audit_checks(fixture: &Fixture) -> Vec<CheckResult> {
    let mut checks = audit(fixture.store.as_ref(), Some(&fixture.channels), |_, _| ())
        .unwrap()
        .checks;
    checks.push(views_check(fixture.store.as_ref(), &all_views(), |_, _| ()).unwrap());
    checks
}

fn failing(checks: &[CheckResult]) -> Vec<&'static str> {
    checks.iter().filter(|c| !c.ok()).map(|c| c.name).collect()
}

/// Builds the clean history, applies `mutate`, and asserts that exactly `expected` fail, each
/// with at least one named violation.
fn assert_breaks(mutate: fn(&Fixture), expected: &[&str]) {
    let fixture = clean();
    mutate(&fixture);
    let checks = audit_checks(&fixture);
    assert_eq!(failing(&checks), expected, "{checks:#?}");
    for check in checks.iter().filter(|c| !c.ok()) {
        assert!(!check.examples.is_empty(), "{check:#?}");
    }
}

// One mutation per check. Each says which invariant it breaks and why nothing else moves.

/// A record altered on disk: the replay stops at it. It is the last record and a deposit into
/// a wallet of its own, so losing it from the replay breaks nothing else.
fn mutate_hash_chain(f: &Fixture) {
    append(
        &f.store,
        "wallet:zed",
        vec![credit(Entry::Deposit, "dz", 5, 5, None)],
    );
    let journal = f.store.log_db().open_tree("journal").unwrap();
    let mut key = vec![b'L'];
    key.extend_from_slice(&f.store.head().to_be_bytes());
    let mut value = journal.get(&key).unwrap().unwrap().to_vec();
    let last = value.len() - 1;
    value[last] ^= 0x01;
    journal.insert(key, value).unwrap();
}

/// The last record of the clean history (a coupon grant the views applied) cut short on
/// disk. One corruption, two checks, necessarily: `hash_chain` names the record, and the views
/// that applied it can no longer be rebuilt from the log (`projections`). Losing the grant
/// from the replay leaves s1 accepted and pending, which the coupon check allows.
fn mutate_hash_chain_under_the_views(f: &Fixture) {
    let journal = f.store.log_db().open_tree("journal").unwrap();
    let mut key = vec![b'L'];
    key.extend_from_slice(&f.store.head().to_be_bytes());
    let mut value = journal.get(&key).unwrap().unwrap().to_vec();
    value.pop();
    journal.insert(key, value).unwrap();
}

/// A deposit recorded twice, each time with a consistent balance: the money is accounted for,
/// but an (entry, order) appears twice.
fn mutate_wallet_balances(f: &Fixture) {
    append(
        &f.store,
        "wallet:u1",
        vec![credit(Entry::Deposit, "d1", 50, 100, None)],
    );
}

/// A refund of 60 for a debit of 100: each wallet line adds up and the order has one debit
/// and one refund, but 40 fen left the wallets and are neither paid out nor in transit.
/// Two checks, necessarily: `withdrawals` reconciles amounts (a refund is the debit), and
/// conservation is a second, independent account of the same money. We found no single
/// corruption that breaks `money_conserved` alone any more: each way we tried for money to
/// appear or vanish (a wallet line that does not add up, a withdrawal or refund of the wrong
/// amount, a packet transfer that is not the drawn share) is also named by its kind's check.
fn mutate_money_conserved(f: &Fixture) {
    append(
        &f.store,
        "wallet:u1",
        vec![
            debit(Entry::Withdrawal, "w4", 100, 300),
            credit(Entry::WithdrawalRefund, "w4", 60, 360, None),
        ],
    );
    append(
        &f.store,
        "withdrawal:w4",
        withdrawal(
            &["requested", "debited", "started", "parked", "refunded"],
            100,
        ),
    );
}

/// A reward credit for an order the activity never accepted (within no budget: budgets count
/// acceptances).
fn mutate_reward_credits(f: &Fixture) {
    append(
        &f.store,
        "wallet:u2",
        vec![credit(Entry::Reward, "r9", 10, 10, Some("cny"))],
    );
}

/// Order id r1, accepted by activity cny, accepted again by activity spring (R4: one order id,
/// one reward). Spring has no budget and nothing is credited, so only the rewards break.
fn mutate_reward_order_id_reused(f: &Fixture) {
    append(&f.store, "activity:spring", vec![accepted("r1", "u1", 600)]);
}

/// An acceptance that takes the activity to 1,001 of its 1,000 cash budget (left pending, so
/// no money moves).
fn mutate_budgets(f: &Fixture) {
    append(&f.store, "activity:cny", vec![accepted("r3", "u3", 301)]);
}

/// A withdrawal debit for an order that was never requested (counted in transit, so the money
/// still balances).
fn mutate_withdrawals(f: &Fixture) {
    append(
        &f.store,
        "wallet:u1",
        vec![debit(Entry::Withdrawal, "w9", 50, 350)],
    );
}

/// An order the log says the bank paid, absent from the bank's statement.
fn mutate_channel_statements(f: &Fixture) {
    append(
        &f.store,
        "wallet:u1",
        vec![debit(Entry::Withdrawal, "w3", 50, 350)],
    );
    append(
        &f.store,
        "withdrawal:w3",
        withdrawal(&["requested", "debited", "started", "succeeded"], 50),
    );
}

/// The bank's statement pays an order the log never heard of (the statement is the other
/// side of the books: the mutation is on that side).
fn mutate_channel_statement_line(f: &Fixture) {
    let paid = runtime().block_on(Simulator(f.channels.clone()).pay(
        Channel::Bank,
        &id("w7"),
        Fen::new(70),
        "a",
    ));
    assert!(matches!(paid, PayOutcome::Succeeded), "{paid:?}");
}

/// Four claims recorded on packet pk, which has three shares of 100: 400 claimed of 300.
/// No money moves (the new claims wait for their transfers), so conservation, which counts
/// the packet's escrow from its own records, still holds.
fn mutate_packets(f: &Fixture) {
    let claims = [("dave", 1), ("erin", 2), ("frank", 3)]
        .into_iter()
        .map(|(uid, index)| {
            Event::Packet(PacketEvent::ShareClaimed {
                uid: id(uid),
                index,
                amount: Fen::new(100),
                at_ms: 0,
            })
        })
        .collect();
    append(&f.store, "packet:pk", claims);
}

/// Dave claims a share of 100 of packet pk and is transferred 90. Two checks, necessarily:
/// `packets` names the transfer that is not the drawn share, and `money_conserved` sees 10 fen
/// vanish (it counts the escrow from the packet's own records, independently of the money).
fn mutate_packet_transfer_amount(f: &Fixture) {
    append(
        &f.store,
        "packet:pk",
        vec![Event::Packet(PacketEvent::ShareClaimed {
            uid: id("dave"),
            index: 1,
            amount: Fen::new(100),
            at_ms: 0,
        })],
    );
    append(
        &f.store,
        "wallet:dave",
        vec![credit(Entry::ClaimTransfer, "pk", 90, 90, None)],
    );
}

/// Dave's claim of packet pk records 150 fen for share 1, drawn at 100: no money moves yet
/// (the transfer is to come), so only the packet's own records disagree.
fn mutate_packet_claim_amount(f: &Fixture) {
    append(
        &f.store,
        "packet:pk",
        vec![Event::Packet(PacketEvent::ShareClaimed {
            uid: id("dave"),
            index: 1,
            amount: Fen::new(150),
            at_ms: 0,
        })],
    );
}

/// A merged claim of packet pk: dave takes share 1 as drawn, erin's record in the same event
/// skips to share 3 (no money moves yet): the audit names the merged event's second record.
fn mutate_packet_merged_claims(f: &Fixture) {
    let claim = |uid: &str, index| ClaimRecord {
        uid: id(uid),
        index,
        amount: Fen::new(100),
        at_ms: 0,
    };
    append(
        &f.store,
        "packet:pk",
        vec![Event::Packet(PacketEvent::SharesClaimed {
            claims: vec![claim("dave", 1), claim("erin", 3)],
        })],
    );
}

/// A second coupon granted from batch a, whose stock is 1 (to another user, accepted: only
/// the stock is broken).
fn mutate_coupons(f: &Fixture) {
    coupon_granted(&f.store, "s2", "u2", 2);
}

/// A row of the wallets view changed behind the log's back.
fn mutate_projections(f: &Fixture) {
    let tree = projections::view_tree(f.store.state_db(), "wallets").unwrap();
    let (key, value) = tree
        .iter()
        .map(Result::unwrap)
        .find(|(k, _)| k.first() != Some(&0))
        .expect("a wallets row");
    let mut value = value.to_vec();
    let last = value.len() - 1;
    value[last] ^= 0x01;
    tree.insert(key, value).unwrap();
}

/// The table: one test per check, `name: mutation => [checks that must fail]`.
macro_rules! mutations {
    ($($test:ident: $mutate:ident => [$($check:literal),+];)*) => {
        $(
            #[test]
            fn $test() {
                // Goal: this mutation fails exactly the listed checks.
                assert_breaks($mutate, &[$($check),+]);
            }
        )*

        /// The checks that have a mutation.
        const COVERED: &[&str] = &[$($($check),+),*];
    };
}

mutations! {
    hash_chain: mutate_hash_chain => ["hash_chain"];
    hash_chain_under_the_views: mutate_hash_chain_under_the_views => ["hash_chain", "projections"];
    wallet_balances: mutate_wallet_balances => ["wallet_balances"];
    money_conserved: mutate_money_conserved => ["money_conserved", "withdrawals"];
    reward_credits: mutate_reward_credits => ["reward_credits"];
    reward_order_id_reused: mutate_reward_order_id_reused => ["reward_credits"];
    budgets: mutate_budgets => ["budgets"];
    withdrawals: mutate_withdrawals => ["withdrawals"];
    channel_statements: mutate_channel_statements => ["channel_statements"];
    channel_statement_line: mutate_channel_statement_line => ["channel_statements"];
    packets: mutate_packets => ["packets"];
    packet_transfer_amount: mutate_packet_transfer_amount => ["money_conserved", "packets"];
    packet_claim_amount: mutate_packet_claim_amount => ["packets"];
    packet_merged_claims: mutate_packet_merged_claims => ["packets"];
    coupons: mutate_coupons => ["coupons"];
    projections: mutate_projections => ["projections"];
}

#[test]
fn the_clean_history_passes_every_check() {
    // Goal: the base of every mutation is clean, and it exercises each check.
    let checks = audit_checks(&clean());
    assert_eq!(failing(&checks), Vec::<&str>::new(), "{checks:#?}");
    for check in &checks {
        assert!(
            check.checked > 0 || check.name == "projections",
            "{check:#?}"
        );
    }
}

#[test]
fn every_check_the_audit_prints_has_a_mutation() {
    // Goal: a check added to the audit without a mutation here fails this test.
    let checks = audit_checks(&clean());
    let missing: Vec<_> = checks
        .iter()
        .map(|c| c.name)
        .filter(|name| !COVERED.contains(name))
        .collect();
    assert!(missing.is_empty(), "checks without a mutation: {missing:?}");
}
