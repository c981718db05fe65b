//! The compensation sweeper (W9) on a manual clock, with a channel that never answers.

use super::open;
use futures::future::BoxFuture;
use hongbao::actors::{ActorConfig, Registry, Runtime};
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
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A channel that records a payment and then never answers until released; queries tell the
/// truth.
struct HangingChannel {
    paid: Arc<Mutex<HashSet<String>>>,
    release: Arc<tokio::sync::Notify>,
}

impl PaymentChannel for HangingChannel {
    fn pay(&self, _: Channel, order_id: &Id, _: Fen, _: &str) -> BoxFuture<'static, PayOutcome> {
        self.paid.lock().unwrap().insert(order_id.to_string());
        let release = self.release.clone();
        Box::pin(async move {
            release.notified().await;
            PayOutcome::Succeeded
        })
    }

    fn query(&self, _: Channel, order_id: &Id) -> BoxFuture<'static, QueryOutcome> {
        let paid = self.paid.lock().unwrap().contains(order_id.as_str());
        Box::pin(async move {
            if paid {
                QueryOutcome::Succeeded
            } else {
                QueryOutcome::NoRecord
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
        let runtime = Arc::new(Runtime {
            store: store.clone(),
            clock: Arc::new(clock.clone()),
            metrics: metrics.clone(),
            config: ActorConfig::default(),
        });
        let wallets: Arc<Registry<Wallet>> = Registry::new(runtime.clone());
        let channel = Arc::new(HangingChannel {
            paid: Default::default(),
            release: Default::default(),
        });
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
        assert_eq!(paid.attempts, 1, "resolved by query, not paid again");
        let clean = wait_state(&withdrawals, "stuck-debit", OrderState::Failed).await;
        assert!(!clean.debited && clean.is_final());
        let half = wait_state(&withdrawals, "half-done", OrderState::Refunded).await;
        assert!(half.debited && half.refunded);
        let (wallet, _) = wallets.state("half").await.unwrap();
        assert_eq!(wallet.activity, Fen::new(1_000), "the debit came back");
        let (wallet, _) = wallets.state("clean").await.unwrap();
        assert_eq!(wallet.activity, Fen::new(1_000), "nothing moved");
        for action in ["query_channel", "abandon_debit"] {
            assert!(
                metrics
                    .compensations_total
                    .with_label_values(&[action])
                    .get()
                    >= 1,
                "{action}"
            );
        }

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
