//! Reconciliation with teeth (W11): each side of the books corrupted in turn (the channel's
//! statement, the wallet's movements, the order's own history), and both the near-real-time
//! reconciler (its metric) and `hongbao audit` (the order named) must see it.

use super::fixtures::examples;
use super::open;
use hongbao::actors::Registry;
use hongbao::audit::audit;
use hongbao::channels::{
    ChannelSettings, RecordStatus, SimulatedChannels, Simulator, StatementLine,
};
use hongbao::clock::SystemClock;
use hongbao::domain::wallet::{Entry, Line, Wallet, WalletCommand, WalletEvent};
use hongbao::domain::withdrawal::{
    method_id, Channel, OrderState, PayoutMethod, WithdrawalCommand, WithdrawalEvent,
    WithdrawalOrder, WithdrawalRequest,
};
use hongbao::domain::Event;
use hongbao::events::sled_store::SledStore;
use hongbao::events::{EventStore, ExpectedVersion, NewEvent};
use hongbao::flows::withdrawals::{WithdrawalConfig, WithdrawalFlows, Withdrawals};
use hongbao::ids::Id;
use hongbao::metrics::Metrics;
use hongbao::money::Fen;
use hongbao::projections::{withdrawals::WithdrawalsView, Projections};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn id(s: &str) -> Id {
    Id::parse(s).unwrap()
}

fn request(uid: &str, amount: u64) -> WithdrawalRequest {
    WithdrawalRequest {
        uid: id(uid),
        amount: Fen::new(amount),
        method: PayoutMethod {
            method_id: method_id(Channel::Bank, "acct"),
            channel: Channel::Bank,
            account: "acct".into(),
        },
    }
}

/// Appends events as they are, bypassing every domain rule: the corruption under test.
async fn append(store: &Arc<SledStore>, stream: &str, events: Vec<Event>) {
    let events = events
        .into_iter()
        .map(|event| NewEvent {
            event,
            correlation_id: "corruption".into(),
        })
        .collect();
    store
        .append(0, stream.into(), ExpectedVersion::Any, events)
        .unwrap()
        .await
        .unwrap();
}

fn movement(debit: bool, entry: Entry, order: &str, amount: u64, after: u64) -> Event {
    let line = Line {
        entry,
        order_id: id(order),
        amount: Fen::new(amount),
        balance_after: Fen::new(after),
        // Credits here are activity income (a reward of activity `act`).
        source: (!debit).then(|| id("act")),
    };
    Event::Wallet(if debit {
        WalletEvent::Debited(line)
    } else {
        WalletEvent::Credited(line)
    })
}

fn requested(uid: &str, amount: u64) -> Vec<Event> {
    vec![Event::Withdrawal(WithdrawalEvent::Requested {
        request: request(uid, amount),
        at_ms: 1,
    })]
}

/// An order's history after its request and debit, written by hand, ending as `last` says.
fn order_history(last: &[&str]) -> Vec<Event> {
    let mut events = vec![
        WithdrawalEvent::Debited { at_ms: 2 },
        WithdrawalEvent::PayoutStarted {
            attempt: 1,
            at_ms: 3,
        },
    ];
    for step in last {
        events.push(match *step {
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
        });
    }
    events.into_iter().map(Event::Withdrawal).collect()
}

fn paid_line(order: &str, amount: u64) -> StatementLine {
    StatementLine {
        order_id: order.into(),
        amount: Fen::new(amount),
        status: RecordStatus::Succeeded,
        at_ms: 0,
        calls: 1,
    }
}

async fn wait_state(withdrawals: &Withdrawals, order: &str, state: OrderState) -> WithdrawalOrder {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(current) = withdrawals.order(&id(order)).await.unwrap() {
            if current.state == Some(state) {
                return current;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{order} never {state:?}: {:?}",
            withdrawals.order(&id(order)).await
        );
        actix_rt::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls until `read()` reaches `at_least`.
async fn wait_count(what: &str, at_least: u64, read: impl Fn() -> u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while read() < at_least {
        assert!(Instant::now() < deadline, "{what}: {} < {at_least}", read());
        actix_rt::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn each_side_corrupted_raises_the_reconciler_metric_and_the_audit_names_the_order() {
    // Goal: W11 both ways, amounts and not only counts. A clean order reconciles clean; then a
    // statement line with another amount, a debit of another amount, an extra debit, a missing
    // refund, and a paid line with no order: the reconciler's mismatch counter rises for each
    // one it can see (at the order's state changes) and the audit names every order.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    actix_rt::System::new().block_on(async {
        let metrics = Arc::new(Metrics::new());
        let clock = Arc::new(SystemClock);
        let runtime = super::actor_runtime(&store, clock.clone(), metrics.clone());
        let wallets: Arc<Registry<Wallet>> = Registry::new(runtime.clone());
        let channels = SimulatedChannels::open(dir.path(), clock.clone()).unwrap();
        channels
            .configure(
                Channel::Bank,
                ChannelSettings {
                    latency_ms: 0,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let config = WithdrawalConfig {
            retry_backoff: vec![Duration::from_millis(10)],
            ..WithdrawalConfig::default()
        };
        let withdrawals = Withdrawals::new(
            Registry::new(runtime.clone()),
            wallets.clone(),
            Arc::new(Simulator(channels.clone())),
            config,
        );
        let views = Projections::start(
            store.clone(),
            store.state_db(),
            vec![Arc::new(WithdrawalsView)],
            metrics.clone(),
        )
        .unwrap();
        let flows = WithdrawalFlows::start(
            withdrawals.clone(),
            store.state_db(),
            views.tree("withdrawals").unwrap().clone(),
        )
        .unwrap();
        let mismatches = |check: &str| {
            metrics
                .reconciliation_mismatches_total
                .with_label_values(&[check])
                .get()
        };
        let finals = || {
            ["succeeded", "refunded", "failed"]
                .iter()
                .map(|s| metrics.withdrawals_total.with_label_values(&[s]).get())
                .sum::<u64>()
        };
        for uid in ["clean", "amt"] {
            wallets
                .execute(
                    uid,
                    WalletCommand::Credit {
                        entry: Entry::Reward,
                        order_id: id(&format!("fund-{uid}")),
                        amount: Fen::new(2_000),
                        source: Some(id("act")),
                    },
                )
                .await
                .unwrap();
        }

        // A clean order, and a clean one whose line is rewritten later (for the audit).
        for order in ["ok-1", "ok-2"] {
            withdrawals
                .request(&id(order), request("clean", 500))
                .await
                .unwrap();
            wait_state(&withdrawals, order, OrderState::Succeeded).await;
        }
        wait_count("reconciled final", 2, finals).await;
        let checked = metrics.reconciliation_checks_total.get();
        assert!(checked >= 8, "each state change of both orders: {checked}");
        for check in ["debit", "refund", "channel"] {
            assert_eq!(
                mismatches(check),
                0,
                "{check}: clean orders reconcile clean"
            );
        }
        channels
            .record_line(Channel::Bank, &paid_line("ok-2", 499))
            .await
            .unwrap();

        // 1. The channel's line for an order says another amount: the channel refuses to pay
        //    the order's amount, the order fails and is refunded; the line says paid.
        channels
            .record_line(Channel::Bank, &paid_line("amt-1", 499))
            .await
            .unwrap();
        withdrawals
            .request(&id("amt-1"), request("amt", 500))
            .await
            .unwrap();
        wait_state(&withdrawals, "amt-1", OrderState::Refunded).await;
        wait_count("channel mismatch for amt-1", 1, || mismatches("channel")).await;

        // 2. A debit of another amount than the order's (wallet side), counts all fine.
        append(&store, "withdrawal:short-1", requested("short", 500)).await;
        append(
            &store,
            "wallet:short",
            vec![
                movement(false, Entry::Reward, "fund-short", 1_000, 1_000),
                movement(true, Entry::Withdrawal, "short-1", 400, 600),
            ],
        )
        .await;
        channels
            .record_line(Channel::Bank, &paid_line("short-1", 500))
            .await
            .unwrap();
        append(&store, "withdrawal:short-1", order_history(&["succeeded"])).await;
        wait_count("debit mismatch for short-1", 1, || mismatches("debit")).await;
        assert_eq!(mismatches("refund"), 0, "nothing else seen wrong yet");

        // 3. An extra payment: the wallet debited the order twice (after its request, as a
        //    real debit comes; the request flow then resumes and records the debit).
        let debit_before = mismatches("debit");
        withdrawals
            .orders
            .execute("xtra-1", WithdrawalCommand::Request(request("xtra", 500)))
            .await
            .unwrap();
        append(
            &store,
            "wallet:xtra",
            vec![
                movement(false, Entry::Reward, "fund-xtra", 1_000, 1_000),
                movement(true, Entry::Withdrawal, "xtra-1", 500, 500),
                movement(true, Entry::Withdrawal, "xtra-1", 500, 0),
            ],
        )
        .await;
        withdrawals
            .request(&id("xtra-1"), request("xtra", 500))
            .await
            .unwrap();
        wait_state(&withdrawals, "xtra-1", OrderState::Succeeded).await;
        wait_count("debit mismatch for xtra-1", debit_before + 1, || {
            mismatches("debit")
        })
        .await;
        // An extra debit once an order is final: reported as it arrives.
        wait_count("xtra-1 reconciled final", 4, finals).await;
        let debit_before = mismatches("debit");
        append(
            &store,
            "wallet:clean",
            vec![movement(true, Entry::Withdrawal, "ok-1", 500, 500)],
        )
        .await;
        wait_count("a debit after ok-1 was final", debit_before + 1, || {
            mismatches("debit")
        })
        .await;

        // 4. A missing refund: the order says refunded, the wallet never gave it back.
        append(&store, "withdrawal:nr-1", requested("nr", 500)).await;
        append(
            &store,
            "wallet:nr",
            vec![
                movement(false, Entry::Reward, "fund-nr", 1_000, 1_000),
                movement(true, Entry::Withdrawal, "nr-1", 500, 500),
            ],
        )
        .await;
        append(
            &store,
            "withdrawal:nr-1",
            order_history(&["parked", "refunded"]),
        )
        .await;
        wait_count("refund mismatch for nr-1", 1, || mismatches("refund")).await;

        // 5. A payment on the channel's statement with no order at all.
        channels
            .record_line(Channel::Bank, &paid_line("ghost-1", 300))
            .await
            .unwrap();

        flows.stop().await;
        views.stop().await;

        let report = audit(store.as_ref(), Some(&channels), |_, _| ()).unwrap();
        let statements = examples(&report, "channel_statements");
        for order in ["ok-2", "amt-1", "ghost-1"] {
            assert!(
                statements.contains(order),
                "{order} not named: {statements}"
            );
        }
        assert!(!statements.contains("ok-1"), "{statements}");
        let orders = examples(&report, "withdrawals");
        for order in ["short-1", "xtra-1", "nr-1", "ok-1"] {
            assert!(orders.contains(order), "{order} not named: {orders}");
        }
        assert!(
            !orders.contains("ok-2"),
            "its wallet side is clean: {orders}"
        );
    });
}
