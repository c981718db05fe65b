//! The actor runtime with the wallet aggregate: pipelined persistence under concurrency,
//! idempotent retries, passivation and reactivation by replay, snapshots.

use super::open;
use futures::future::join_all;
use hongbao::actors::{ActorConfig, ExecError, Registry, Runtime};
use hongbao::clock::ManualClock;
use hongbao::domain::wallet::{Entry, Recorded, Wallet, WalletCommand, WalletError};
use hongbao::events::EventStore;
use hongbao::ids::Id;
use hongbao::metrics::Metrics;
use hongbao::money::Fen;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn registry(
    store: Arc<dyn EventStore>,
    config: ActorConfig,
) -> (Arc<Registry<Wallet>>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let runtime = Arc::new(Runtime {
        store,
        clock: Arc::new(ManualClock::new(0)),
        metrics: metrics.clone(),
        config,
        placement: None,
        registries: Default::default(),
        pacing: None,
    });
    (Registry::new(runtime), metrics)
}

fn deposit(order: &str, amount: u64) -> WalletCommand {
    WalletCommand::Credit {
        entry: Entry::Deposit,
        order_id: Id::parse(order).unwrap(),
        amount: Fen::new(amount),
        source: None,
    }
}

async fn poll_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn concurrent_commands_on_one_actor_are_pipelined_and_all_counted() {
    // Goal: 300 concurrent distinct deposits on one wallet give the exact balance, each reply
    // after its flush, and the stream holds exactly 300 events.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    actix_rt::System::new().block_on(async {
        let (wallets, _) = registry(store.clone(), ActorConfig::default());
        let replies =
            join_all((0..300u64).map(|i| wallets.execute("u1", deposit(&format!("d{i}"), i + 1))))
                .await;
        assert!(replies.iter().all(|r| r.is_ok()));
        let (state, version) = wallets.state("u1").await.unwrap();
        assert_eq!(state.change, Fen::new((1..=300).sum()));
        assert_eq!(version, 300);
    });
    assert_eq!(store.read_stream("wallet:u1", 1).unwrap().len(), 300);
}

#[test]
fn identical_concurrent_commands_have_one_effect_and_the_same_answer() {
    // Goal: 50 identical deposits in flight at once: one event, 50 equal replies.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    actix_rt::System::new().block_on(async {
        let (wallets, _) = registry(store.clone(), ActorConfig::default());
        let replies = join_all((0..50).map(|_| wallets.execute("u2", deposit("same", 70)))).await;
        let replies: Vec<_> = replies.into_iter().map(|r| r.unwrap()).collect();
        assert!(replies
            .iter()
            .all(|m| m.line.balance_after == Fen::new(70) && m.line.amount == Fen::new(70)));
        assert_eq!(replies.iter().filter(|m| !m.replayed).count(), 1);
        let conflict = wallets.execute("u2", deposit("same", 71)).await;
        assert!(matches!(
            conflict,
            Err(ExecError::Rejected(WalletError::IdempotencyConflict { .. }))
        ));
    });
    assert_eq!(store.read_stream("wallet:u2", 1).unwrap().len(), 1);
}

#[test]
fn an_idle_actor_passivates_and_a_new_one_replays_the_same_state() {
    // Goal: after the idle time the actor leaves; the next command activates a new incarnation
    // from the log (activation counter 2) with the balance intact and idempotency remembered.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    actix_rt::System::new().block_on(async {
        let config = ActorConfig {
            idle_passivate: Duration::from_millis(150),
            ..ActorConfig::default()
        };
        let (wallets, metrics) = registry(store.clone(), config);
        for i in 0..5 {
            wallets
                .execute("u3", deposit(&format!("d{i}"), 10))
                .await
                .unwrap();
        }
        assert_eq!(wallets.active(), 1);
        poll_until("passivation", || wallets.active() == 0).await;
        let again = wallets.execute("u3", deposit("d4", 10)).await.unwrap();
        assert!(again.replayed, "idempotency must survive passivation");
        assert_eq!(again.line.balance_after, Fen::new(50));
        let next = wallets.execute("u3", deposit("d5", 10)).await.unwrap();
        assert_eq!(next.line.balance_after, Fen::new(60));
        assert_eq!(
            metrics
                .actor_activations_total
                .with_label_values(&["wallet"])
                .get(),
            2
        );
        assert!(
            metrics
                .actor_passivations_total
                .with_label_values(&["wallet"])
                .get()
                >= 1
        );
    });
}

#[test]
fn snapshots_are_taken_and_activation_from_them_equals_full_replay() {
    // Goal: with a snapshot every 5 events, a reactivated actor (snapshot + tail) has exactly
    // the state a full replay gives.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    actix_rt::System::new().block_on(async {
        let config = ActorConfig {
            idle_passivate: Duration::from_millis(150),
            snapshot_every_events: 5,
            ..ActorConfig::default()
        };
        let (wallets, _) = registry(store.clone(), config);
        for i in 0..12u64 {
            wallets
                .execute("u4", deposit(&format!("d{i}"), i + 1))
                .await
                .unwrap();
        }
        let (live, _) = wallets.state("u4").await.unwrap();
        let (snapshot_version, _) = store
            .load_snapshot("wallet:u4")
            .unwrap()
            .expect("a snapshot");
        assert!(
            (5..=12).contains(&snapshot_version),
            "snapshot at {snapshot_version}"
        );
        poll_until("passivation", || wallets.active() == 0).await;
        let (reloaded, version) = wallets.state("u4").await.unwrap();
        assert_eq!(version, 12);
        assert_eq!(reloaded, live);
        assert_eq!(full_replay(&*store, "wallet:u4"), live);
    });
}

/// The wallet a replay of its whole stream gives, no snapshot involved.
fn full_replay(store: &dyn EventStore, stream: &str) -> Wallet {
    let events = store.read_stream(stream, 1).unwrap();
    hongbao::domain::replay(
        Wallet::default(),
        events
            .iter()
            .filter_map(|e| <Wallet as hongbao::domain::Aggregate>::unwrap(&e.event)),
    )
}

/// Deposits `orders` to `user`, then waits until the registry has passivated every actor.
async fn touch_then_passivate(wallets: &Arc<Registry<Wallet>>, user: &str, orders: &[&str]) {
    for order in orders {
        wallets.execute(user, deposit(order, 10)).await.unwrap();
    }
    poll_until("passivation", || wallets.active() == 0).await;
}

#[test]
fn a_passivating_actor_snapshots_once_enough_events_were_replayed_or_appended_since_the_last() {
    // Goal: a stream touched a few events at a time and passivated in between (a campaign's
    // wallets) gets snapshots, so that its activations stop reading a stream that grows all
    // night. Below the threshold nothing is stored; the events replayed at activation count,
    // so the second incarnation (2 replayed + 1 appended) stores one as it passivates; the
    // next activation starts from it and ends in the state a full replay gives.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    actix_rt::System::new().block_on(async {
        let config = ActorConfig {
            idle_passivate: Duration::from_millis(150),
            snapshot_on_passivate_events: 3,
            ..ActorConfig::default()
        };
        let (wallets, _) = registry(store.clone(), config);
        let snapshot = || store.load_snapshot("wallet:u6").unwrap().map(|(v, _)| v);
        touch_then_passivate(&wallets, "u6", &["d0", "d1"]).await;
        assert_eq!(snapshot(), None, "2 events since none: below the threshold");
        touch_then_passivate(&wallets, "u6", &["d2"]).await;
        assert_eq!(snapshot(), Some(3), "2 replayed + 1 appended");
        touch_then_passivate(&wallets, "u6", &["d3"]).await;
        assert_eq!(snapshot(), Some(3), "1 event since the snapshot");
        let (reloaded, version) = wallets.state("u6").await.unwrap();
        assert_eq!(version, 4);
        assert_eq!(reloaded, full_replay(&*store, "wallet:u6"));
    });
}

#[test]
fn events_replayed_at_activation_count_towards_the_periodic_snapshot() {
    // Goal: `snapshot_every_events` counts the stream's events since its last snapshot, not
    // only one incarnation's appends: a stream that passivates between every few events
    // (snapshots on passivation off here) reaches it all the same. Counted per incarnation,
    // such a stream was never snapshotted however long it grew.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    actix_rt::System::new().block_on(async {
        let config = ActorConfig {
            idle_passivate: Duration::from_millis(150),
            snapshot_every_events: 3,
            snapshot_on_passivate_events: 0,
            ..ActorConfig::default()
        };
        let (wallets, _) = registry(store.clone(), config);
        touch_then_passivate(&wallets, "u7", &["d0", "d1"]).await;
        assert_eq!(store.load_snapshot("wallet:u7").unwrap(), None);
        wallets.execute("u7", deposit("d2", 10)).await.unwrap();
        let (version, _) = store
            .load_snapshot("wallet:u7")
            .unwrap()
            .expect("a snapshot once 2 replayed + 1 appended reach 3");
        assert_eq!(version, 3);
    });
}

#[test]
fn under_pressure_idle_actors_are_passivated_sooner() {
    // Goal: with more live actors than the soft maximum, actors idle for the short pressure
    // threshold are passivated, so a campaign touching many wallets once does not keep them all.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    actix_rt::System::new().block_on(async {
        let config = ActorConfig {
            idle_passivate: Duration::from_secs(300),
            active_soft_max: 10,
            idle_under_pressure: Duration::from_millis(100),
            ..ActorConfig::default()
        };
        let (wallets, _) = registry(store.clone(), config);
        for i in 0..50 {
            wallets
                .execute(&format!("p{i}"), deposit("d", 1))
                .await
                .unwrap();
        }
        assert!(wallets.active() > 10);
        poll_until("pressure passivation", || wallets.active() <= 10).await;
        // Below the soft maximum the long idle time applies again: a fresh actor stays.
        wallets.execute("p-new", deposit("d", 1)).await.unwrap();
        actix_rt::time::sleep(Duration::from_millis(400)).await;
        assert!(wallets.active() >= 1);
    });
}

#[test]
fn a_command_answered_once_submitted_says_when_it_is_durable_and_when_it_never_will_be() {
    // Goal: `execute_submitted` answers with the decision while the journal's flush is still
    // held, and its durable future resolves only once the flush returns; a flush that fails
    // makes the future an error, never a success (its caller then answers "outcome unknown").
    // The reward intake relied on both to overlap the order-id claim's flush with the
    // acceptance's (withdrawn: see `Registry::execute_chained`); it stays for that overlap.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert!(store.in_order_fail_stop());
    actix_rt::System::new().block_on(async {
        let (wallets, _) = registry(store.clone(), ActorConfig::default());
        let hold = store.hold_next_flush();
        let (movement, durable) = wallets
            .execute_submitted("u1", deposit("d1", 5))
            .await
            .unwrap();
        assert!(!movement.replayed);
        assert_eq!(movement.line.balance_after, Fen::new(5));
        assert!(hold.wait_reached(Duration::from_secs(10)));
        let mut durable = durable;
        actix_rt::time::sleep(Duration::from_millis(100)).await;
        assert!(
            futures::poll!(&mut durable).is_pending(),
            "durable before the flush"
        );
        assert_eq!(store.head(), 0);
        hold.release();
        durable.await.unwrap();
        assert_eq!(store.head(), 1);
        store.fail_next_flush();
        let (_, durable) = wallets
            .execute_submitted("u1", deposit("d2", 7))
            .await
            .unwrap();
        assert!(durable.await.is_err(), "a failed flush resolved as durable");
    });
}

#[test]
fn an_actor_that_cannot_read_its_log_is_answered_at_once_and_the_next_call_reads_afresh() {
    // Goal: the read that activates a wallet fails (on JetStream: a read timing out after 3 s
    // while its stream has no leader). The command and a state read are each answered
    // Unavailable with that reason after one read of the log, not offered to fresh
    // incarnations that wait for the same read again (three reads: 9 s holding a closing
    // partition's requests); once the log reads again, the next call activates afresh.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let flaky = Arc::new(super::fixtures::FlakyReads::new(store.clone(), "wallet:"));
    actix_rt::System::new().block_on(async {
        let (wallets, _) = registry(flaky.clone(), ActorConfig::default());
        let credit = WalletCommand::Credit {
            entry: Entry::Deposit,
            order_id: Id::parse("d1").unwrap(),
            amount: Fen::new(100),
            source: None,
        };
        // Unavailable for the read that timed out, after `reads` reads in all.
        let check = |what: &str, answer: Result<(), ExecError<WalletError>>, reads: u32| {
            assert!(
                matches!(&answer, Err(ExecError::Unavailable(why)) if why.contains("timed out")),
                "{what}: {answer:?}"
            );
            assert_eq!(
                flaky.reads.load(Ordering::SeqCst),
                reads,
                "{what}: one read"
            );
        };
        flaky.failures.store(100, Ordering::SeqCst);
        let refused = wallets.execute("u1", credit.clone()).await;
        check("the command", refused.map(|_| ()), 1);
        let unread = wallets.state("u1").await;
        check("the state", unread.map(|_| ()), 2);

        flaky.failures.store(0, Ordering::SeqCst);
        let moved = wallets.execute("u1", credit).await.unwrap();
        assert_eq!(moved.line.amount, Fen::new(100));
        assert_eq!(wallets.state("u1").await.unwrap().0.change, Fen::new(100));
    });
}

/// NATS's default largest message (1 MiB), which a node's answer to another must fit in.
const MAX_PAYLOAD: usize = 1024 * 1024;

/// Another node's runtime, reached the way a cluster node reaches one: every call and answer
/// encoded, and an answer larger than NATS's largest message refused as the server would. Keeps
/// the size of the last answer it carried.
struct OtherNode(Arc<Runtime>, Arc<std::sync::atomic::AtomicUsize>);

impl hongbao::actors::Placement for OtherNode {
    fn is_local(&self, _: &str) -> bool {
        false
    }

    fn call(
        &self,
        _stream: &str,
        call: hongbao::actors::RemoteCall,
    ) -> futures::future::BoxFuture<'static, Result<hongbao::actors::RemoteAnswer, String>> {
        let (serving, carried) = (self.0.registries.serve(call), self.1.clone());
        Box::pin(async move {
            let answer = serving.await;
            if let Ok(bytes) = &answer {
                carried.store(bytes.len(), Ordering::SeqCst);
            }
            match &answer {
                Ok(bytes) if bytes.len() > MAX_PAYLOAD => {
                    Err(format!("maximum payload exceeded: {} bytes", bytes.len()))
                }
                _ => Ok(answer),
            }
        })
    }
}

#[test]
fn a_question_to_a_wallet_on_another_node_is_answered_where_its_whole_state_would_not_fit() {
    // Goal: a wallet with 40,000 movements (order ids of 34 characters) lives on another
    // node. Its whole state no longer fits in a message between nodes (the reward status of a
    // cluster read it so, and failed);
    // asked whether it recorded one movement, it answers with that record, and with none for
    // a movement it never made.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for thousand in 0..40u64 {
        let events = (thousand * 1_000 + 1..=(thousand + 1) * 1_000)
            .map(|n| {
                super::fixtures::credit(Entry::Deposit, &format!("deposit-{n:026}"), 1, n, None)
            })
            .collect();
        super::fixtures::append(&store, "wallet:big", events);
    }
    let carried = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    actix_rt::System::new().block_on(async {
        let (home, _) = registry(store.clone(), ActorConfig::default());
        let other = Arc::new(Runtime {
            store: open(&dir.path().join("other")),
            clock: Arc::new(ManualClock::new(0)),
            metrics: Arc::new(Metrics::new()),
            config: ActorConfig::default(),
            placement: Some(Arc::new(OtherNode(home.runtime().clone(), carried.clone()))),
            registries: Default::default(),
            pacing: None,
        });
        let away: Arc<Registry<Wallet>> = Registry::new(other);

        let whole = away.state("big").await;
        assert!(
            matches!(&whole, Err(ExecError::Unavailable(why)) if why.contains("maximum payload")),
            "the whole wallet fits in a message after all: {:?}",
            whole.map(|(w, v)| (w.change, v))
        );
        let ask = |order: &str| {
            let question = hongbao::domain::wallet::EntryQuestion {
                entry: Entry::Deposit,
                order_id: Id::parse(order).unwrap(),
            };
            let (away, carried) = (away.clone(), carried.clone());
            async move {
                let answer: Option<Recorded> = away.ask("big", &question).await.unwrap();
                let bytes = carried.load(Ordering::SeqCst);
                assert!(bytes < 100, "{bytes} bytes");
                answer
            }
        };
        let recorded = ask(&format!("deposit-{:026}", 39_999))
            .await
            .expect("recorded");
        assert_eq!(
            (recorded.amount, recorded.balance_after),
            (Fen::new(1), Fen::new(39_999))
        );
        assert_eq!(ask(&format!("deposit-{:026}", 40_001)).await, None);
    });
}
