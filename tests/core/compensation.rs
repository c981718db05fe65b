//! The compensation sweeper (W9) on a manual clock, with a channel that never answers.

use super::open;
use futures::future::BoxFuture;
use hongbao::actors::Registry;
use hongbao::channels::{PayOutcome, PaymentChannel, QueryOutcome};
use hongbao::clock::ManualClock;
use hongbao::domain::wallet::{Entry, Wallet, WalletCommand};
use hongbao::domain::withdrawal::{
    method_id, Channel, OrderState, PayoutMethod, WithdrawalCommand, WithdrawalOrder,
    WithdrawalRequest,
};
use hongbao::flows::withdrawals::{WithdrawalConfig, WithdrawalFlows, Withdrawals};
use hongbao::ids::Id;
use hongbao::metrics::Metrics;
use hongbao::money::Fen;
use hongbao::projections::{withdrawals::WithdrawalsView, Projections};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A channel that records a payment and then never answers until released; queries tell the
/// truth.
struct HangingChannel {
    paid: Arc<Mutex<HashMap<String, Fen>>>,
    release: Arc<tokio::sync::Notify>,
}

impl PaymentChannel for HangingChannel {
    fn pay(
        &self,
        _: Channel,
        order_id: &Id,
        amount: Fen,
        _: &str,
    ) -> BoxFuture<'static, PayOutcome> {
        self.paid
            .lock()
            .unwrap()
            .insert(order_id.to_string(), amount);
        let release = self.release.clone();
        Box::pin(async move {
            release.notified().await;
            PayOutcome::Succeeded
        })
    }

    fn query(&self, _: Channel, order_id: &Id) -> BoxFuture<'static, QueryOutcome> {
        let paid = self.paid.lock().unwrap().get(order_id.as_str()).copied();
        Box::pin(async move {
            match paid {
                Some(amount) => QueryOutcome::Succeeded { amount },
                None => QueryOutcome::NoRecord,
            }
        })
    }
}

fn id(s: &str) -> Id {
    Id::parse(s).unwrap()
}

fn request(uid: &str) -> WithdrawalRequest {
    WithdrawalRequest {
        uid: id(uid),
        amount: Fen::new(300),
        method: PayoutMethod {
            method_id: method_id(Channel::Bank, "acct"),
            channel: Channel::Bank,
            account: "acct".into(),
        },
    }
}

async fn wait_state(withdrawals: &Withdrawals, order: &str, state: OrderState) -> WithdrawalOrder {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let current = withdrawals.order(&id(order)).await.unwrap().unwrap();
        if current.state == Some(state) {
            return current;
        }
        assert!(
            Instant::now() < deadline,
            "{order} stuck in {:?}",
            current.state
        );
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn stuck_orders_are_compensated_per_state_after_the_age() {
    // Goal: after 4 h on the injected clock the sweeper drives each stuck order: paying ->
    // query the channel and adopt its answer; pending_debit without a debit -> failed;
    // pending_debit whose debit did happen -> failed, then refunded once.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let clock = ManualClock::new(1_000_000);
    actix_rt::System::new().block_on(async {
        let metrics = Arc::new(Metrics::new());
        let runtime = super::actor_runtime(&store, Arc::new(clock.clone()), metrics.clone());
        let wallets: Arc<Registry<Wallet>> = Registry::new(runtime.clone());
        let channel = Arc::new(HangingChannel {
            paid: Default::default(),
            release: Default::default(),
        });
        let config = WithdrawalConfig {
            sweep_interval: Duration::from_millis(50),
            // The payment that never answers is given up after this and resolved by query.
            channel_call_timeout: Duration::from_millis(400),
            ..WithdrawalConfig::default()
        };
        let withdrawals = Withdrawals::new(
            Registry::new(runtime.clone()),
            wallets.clone(),
            channel.clone(),
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
        let credit = |uid: &str| WalletCommand::Credit {
            entry: Entry::Reward,
            order_id: id(&format!("fund-{uid}")),
            amount: Fen::new(1_000),
            source: Some(id("act")),
        };
        for uid in ["payer", "clean", "half"] {
            wallets.execute(uid, credit(uid)).await.unwrap();
        }

        // 1. An order whose payout never answers: it stays paying.
        withdrawals
            .request(&id("stuck-paying"), request("payer"))
            .await
            .unwrap();
        wait_state(&withdrawals, "stuck-paying", OrderState::Paying).await;
        // 2. An order created and never debited.
        withdrawals
            .orders
            .execute("stuck-debit", WithdrawalCommand::Request(request("clean")))
            .await
            .unwrap();
        // 3. An order whose debit happened but was never recorded on the order.
        withdrawals
            .orders
            .execute("half-done", WithdrawalCommand::Request(request("half")))
            .await
            .unwrap();
        wallets
            .execute(
                "half",
                WalletCommand::Debit {
                    entry: Entry::Withdrawal,
                    order_id: id("half-done"),
                    amount: Fen::new(300),
                    source: None,
                },
            )
            .await
            .unwrap();

        // Young orders are left alone.
        actix_rt::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            withdrawals
                .order(&id("stuck-debit"))
                .await
                .unwrap()
                .unwrap()
                .state,
            Some(OrderState::PendingDebit)
        );

        clock.advance_ms(4 * 3_600_000 + 1);
        let paid = wait_state(&withdrawals, "stuck-paying", OrderState::Succeeded).await;
        assert_eq!(
            paid.attempts, 1,
            "the unanswered call was resolved by query, not paid again"
        );
        let clean = wait_state(&withdrawals, "stuck-debit", OrderState::Failed).await;
        assert!(!clean.debited && clean.is_final());
        let half = wait_state(&withdrawals, "half-done", OrderState::Refunded).await;
        assert!(half.debited && half.refunded);
        let (wallet, _) = wallets.state("half").await.unwrap();
        assert_eq!(wallet.activity, Fen::new(1_000), "the debit came back");
        let (wallet, _) = wallets.state("clean").await.unwrap();
        assert_eq!(wallet.activity, Fen::new(1_000), "nothing moved");
        // (The paying order needs no compensation: its driver gave the unanswered call up after
        // channel_call_timeout and resolved it by query itself.)
        assert!(
            metrics
                .compensations_total
                .with_label_values(&["abandon_debit"])
                .get()
                >= 1
        );

        // The hung call finally answers: a replay, nothing changes.
        channel.release.notify_waiters();
        actix_rt::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            withdrawals
                .order(&id("stuck-paying"))
                .await
                .unwrap()
                .unwrap()
                .state,
            Some(OrderState::Succeeded)
        );
        flows.stop().await;
        views.stop().await;
    });
}

/// A channel that refuses the first call at once, then holds every later call until released
/// (counting them); a query says paid only once a held call has been let through.
struct GatedChannel {
    refused_first: std::sync::atomic::AtomicBool,
    held_calls: Arc<std::sync::atomic::AtomicU32>,
    paid: Arc<Mutex<HashMap<String, Fen>>>,
    release: Arc<tokio::sync::Semaphore>,
}

impl Default for GatedChannel {
    fn default() -> Self {
        GatedChannel {
            refused_first: Default::default(),
            held_calls: Default::default(),
            paid: Default::default(),
            release: Arc::new(tokio::sync::Semaphore::new(0)),
        }
    }
}

impl PaymentChannel for GatedChannel {
    fn pay(
        &self,
        _: Channel,
        order_id: &Id,
        amount: Fen,
        _: &str,
    ) -> BoxFuture<'static, PayOutcome> {
        use std::sync::atomic::Ordering;
        if !self.refused_first.swap(true, Ordering::SeqCst) {
            return Box::pin(async { PayOutcome::Failed("declined".into()) });
        }
        self.held_calls.fetch_add(1, Ordering::SeqCst);
        let (release, paid, order) = (
            self.release.clone(),
            self.paid.clone(),
            order_id.to_string(),
        );
        Box::pin(async move {
            release.acquire().await.unwrap().forget();
            paid.lock().unwrap().insert(order, amount);
            PayOutcome::Succeeded
        })
    }

    fn query(&self, _: Channel, order_id: &Id) -> BoxFuture<'static, QueryOutcome> {
        let paid = self.paid.lock().unwrap().get(order_id.as_str()).copied();
        Box::pin(async move {
            match paid {
                Some(amount) => QueryOutcome::Succeeded { amount },
                None => QueryOutcome::NoRecord,
            }
        })
    }
}

#[test]
fn a_payout_lane_and_the_sweeper_never_drive_one_order_at_once() {
    // Goal: W9/W10: an order waiting for its retry when it turns 4 h old is due for both its
    // payout lane and the sweeper; only one of them may run the attempt, so the channel gets
    // one call (today the second driver finds it paying, no record yet, and sends it again).
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let clock = ManualClock::new(1_000_000);
    actix_rt::System::new().block_on(async {
        let metrics = Arc::new(Metrics::new());
        let runtime = super::actor_runtime(&store, Arc::new(clock.clone()), metrics.clone());
        let wallets: Arc<Registry<Wallet>> = Registry::new(runtime.clone());
        let channel = Arc::new(GatedChannel::default());
        let config = WithdrawalConfig {
            sweep_interval: Duration::from_millis(50),
            ..WithdrawalConfig::default()
        };
        let withdrawals = Withdrawals::new(
            Registry::new(runtime.clone()),
            wallets.clone(),
            channel.clone(),
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
        wallets
            .execute(
                "racer",
                WalletCommand::Credit {
                    entry: Entry::Reward,
                    order_id: id("fund-racer"),
                    amount: Fen::new(1_000),
                    source: Some(id("act")),
                },
            )
            .await
            .unwrap();
        withdrawals
            .request(&id("raced"), request("racer"))
            .await
            .unwrap();
        // The first attempt is refused; the retry waits for the (manual) clock.
        let waiting = wait_state(&withdrawals, "raced", OrderState::PendingPayout).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut waiting = waiting;
        while waiting.attempts < 1 {
            assert!(Instant::now() < deadline, "first attempt never recorded");
            actix_rt::time::sleep(Duration::from_millis(20)).await;
            waiting = withdrawals.order(&id("raced")).await.unwrap().unwrap();
        }

        clock.advance_ms(4 * 3_600_000 + 1);
        // Both drivers are due now; give the second one time to send it again.
        let held = channel.held_calls.clone();
        let deadline = Instant::now() + Duration::from_secs(3);
        while held.load(std::sync::atomic::Ordering::SeqCst) < 2 && Instant::now() < deadline {
            actix_rt::time::sleep(Duration::from_millis(20)).await;
        }
        // The held call outlives what used to be the driver's lease (10 min on the injected
        // clock): the sweeper must still not take the order over while that call may pay.
        clock.advance_ms(11 * 60_000);
        let deadline = Instant::now() + Duration::from_millis(500);
        while held.load(std::sync::atomic::Ordering::SeqCst) < 2 && Instant::now() < deadline {
            actix_rt::time::sleep(Duration::from_millis(20)).await;
        }
        channel.release.add_permits(2);
        let done = wait_state(&withdrawals, "raced", OrderState::Succeeded).await;
        assert_eq!(
            held.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one payment call after the refusal, not one per driver"
        );
        assert_eq!(done.attempts, 2);
        flows.stop().await;
        views.stop().await;
    });
}

#[test]
fn a_debit_still_on_its_way_when_the_sweeper_abandons_the_order_never_lands() {
    // Goal: W9 with W10: the sweeper abandons an order stuck in pending_debit (4 h old) while
    // the request flow's debit is still on its way to the wallet; that debit must be refused,
    // or the money would leave for an order that is failed, final and never refunded.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let clock = ManualClock::new(1_000_000);
    actix_rt::System::new().block_on(async {
        let runtime =
            super::actor_runtime(&store, Arc::new(clock.clone()), Arc::new(Metrics::new()));
        let wallets: Arc<Registry<Wallet>> = Registry::new(runtime.clone());
        let withdrawals = Withdrawals::new(
            Registry::new(runtime.clone()),
            wallets.clone(),
            Arc::new(GatedChannel::default()),
            WithdrawalConfig::default(),
        );
        let funding = WalletCommand::Credit {
            entry: Entry::Reward,
            order_id: id("fund-slow"),
            amount: Fen::new(1_000),
            source: Some(id("act")),
        };
        wallets.execute("slow", funding).await.unwrap();
        withdrawals
            .orders
            .execute("slow-order", WithdrawalCommand::Request(request("slow")))
            .await
            .unwrap();
        clock.advance_ms(4 * 3_600_000 + 1);
        withdrawals.compensate(&id("slow-order")).await.unwrap();
        let order = withdrawals.order(&id("slow-order")).await.unwrap().unwrap();
        assert!(order.state == Some(OrderState::Failed) && !order.debited && order.is_final());
        let late = wallets
            .execute(
                "slow",
                WalletCommand::Debit {
                    entry: Entry::Withdrawal,
                    order_id: id("slow-order"),
                    amount: Fen::new(300),
                    source: None,
                },
            )
            .await;
        assert!(late.is_err(), "the late debit landed: {late:?}");
        let (wallet, _) = wallets.state("slow").await.unwrap();
        assert_eq!(wallet.activity, Fen::new(1_000), "nothing left the user");
    });
}

/// A withdrawal's runtime on `store`, with a channel that never answers (nothing here pays).
fn intake(store: &Arc<hongbao::events::sled_store::SledStore>) -> Arc<Withdrawals> {
    let runtime = super::actor_runtime(
        store,
        Arc::new(ManualClock::new(1_000_000)),
        Arc::new(Metrics::new()),
    );
    let channel = Arc::new(HangingChannel {
        paid: Default::default(),
        release: Default::default(),
    });
    Withdrawals::new(
        Registry::new(runtime.clone()),
        Registry::new(runtime),
        channel,
        WithdrawalConfig::default(),
    )
}

#[test]
fn a_withdrawal_is_answered_once_its_three_steps_are_durable_and_a_failed_flush_debits_once() {
    // Goal: on sled the request's three steps (order, debit, record) are submitted without
    // waiting for each other's flush, yet the answer waits for all of them: while a flush is
    // held the request is not answered, and once released the log holds all three. A flush
    // that fails answers "outcome unknown", never success; after a restart the retry with the
    // same order id finishes the order with exactly one debit.
    use hongbao::actors::ExecError;
    use hongbao::domain::wallet::WalletEvent;
    use hongbao::domain::Event;
    use hongbao::events::EventStore;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    actix_rt::System::new().block_on(async {
        let withdrawals = intake(&store);
        let fund = WalletCommand::Credit {
            entry: Entry::Reward,
            order_id: id("fund"),
            amount: Fen::new(1_000),
            source: Some(id("act")),
        };
        withdrawals.wallets.execute("u1", fund).await.unwrap();
        let head = store.head();
        let hold = store.hold_next_flush();
        let w1 = id("w1");
        let mut answer = Box::pin(withdrawals.request(&w1, request("u1")));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !hold.wait_reached(Duration::from_millis(1)) {
            assert!(
                futures::poll!(&mut answer).is_pending(),
                "answered before any flush"
            );
            assert!(Instant::now() < deadline, "the flush was never reached");
            actix_rt::time::sleep(Duration::from_millis(1)).await;
        }
        for _ in 0..20 {
            assert!(
                futures::poll!(&mut answer).is_pending(),
                "answered while a flush was held"
            );
            actix_rt::time::sleep(Duration::from_millis(5)).await;
        }
        hold.release();
        let order = answer.await.unwrap();
        assert_eq!(order.state, Some(OrderState::PendingPayout));
        assert_eq!(
            store.head(),
            head + 3,
            "order, debit and record, all durable"
        );

        store.fail_next_flush();
        let failed = withdrawals.request(&id("w2"), request("u1")).await;
        assert!(
            matches!(failed, Err(ExecError::Unavailable(_))),
            "a failed flush answered {failed:?}"
        );
    });
    drop(store);
    let store = open(dir.path());
    actix_rt::System::new().block_on(async {
        let withdrawals = intake(&store);
        let order = withdrawals.request(&id("w2"), request("u1")).await.unwrap();
        assert_eq!(order.state, Some(OrderState::PendingPayout));
        let (wallet, _) = withdrawals.wallets.state("u1").await.unwrap();
        let debits = store
            .read_stream("wallet:u1", 1)
            .unwrap()
            .iter()
            .filter(|e| {
                matches!(&e.event, Event::Wallet(WalletEvent::Debited(line))
                    if line.order_id.as_str() == "w2")
            })
            .count();
        assert_eq!(debits, 1, "w2 debited once");
        assert_eq!(wallet.activity, Fen::new(400), "1000 - 300 - 300");
    });
}
