//! Partition ownership and routing against a real nats-server (issue 13): the deployment
//! agreement, fair shares among live nodes, hand-over when a node dies, joins or leaves, a
//! node cut off from the lease bucket giving its partitions up before anyone could take them,
//! a restarted node taking its own leases back, and requests reaching only the holder.
//!
//! The "nodes" here are lease keepers in one process with recording hosts; a dropped keeper
//! stops renewing without releasing anything, as a killed process would.

use super::{nats, runtime};
use async_nats::jetstream;
use futures::future::BoxFuture;
use hongbao::clock::ManualClock;
use hongbao::cluster::membership::{
    check_deployment, Close, ClusterError, Keeper, Lease, PartitionHost, Settings,
};
use hongbao::cluster::partition::{Partition, Partitions};
use hongbao::cluster::router::{RouteError, Router};
use hongbao::cluster::NodeId;
use hongbao::events::jetstream::{connect, Durability};
use hongbao::events::jetstream_store::{JetStreamConfig, JetStreamStore};
use hongbao::events::{AppendError, EventStore, ExpectedVersion, JournalCondition, GENESIS_HASH};
use hongbao::metrics::Metrics;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TTL: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum What {
    Open(u64),
    Close(Close),
    /// A close that took time ended (`SlowToClose`).
    Closed,
}

#[derive(Debug, Clone)]
struct Record {
    node: String,
    partition: Partition,
    what: What,
    at: Instant,
}

/// A host that only records what it was told, in one log shared by every node of a test.
#[derive(Clone)]
struct Recorder {
    node: String,
    log: Arc<Mutex<Vec<Record>>>,
}

impl Recorder {
    fn push(&self, partition: Partition, what: What) {
        self.log.lock().unwrap().push(Record {
            node: self.node.clone(),
            partition,
            what,
            at: Instant::now(),
        });
    }
}

impl PartitionHost for Recorder {
    fn open(&self, partition: Partition, lease: Lease) -> BoxFuture<'static, Result<(), String>> {
        self.push(partition, What::Open(lease.epoch()));
        Box::pin(async { Ok(()) })
    }

    fn close(&self, partition: Partition, why: Close) -> BoxFuture<'static, ()> {
        self.push(partition, What::Close(why));
        Box::pin(async {})
    }
}

fn settings(node: &str, partitions: u32) -> Settings {
    Settings {
        lease_ttl: TTL,
        replicas: 1,
        coupon_intake_shards: Some(4),
        ..Settings::new(
            NodeId::parse(node).unwrap(),
            Partitions::new(partitions).unwrap(),
        )
    }
}

async fn context(url: &str) -> jetstream::Context {
    let (client, _) = connect(url).await.expect("nats-server accepted");
    jetstream::new(client)
}

async fn keeper(
    url: &str,
    settings: Settings,
    log: &Arc<Mutex<Vec<Record>>>,
) -> Result<Keeper, ClusterError> {
    let host = Arc::new(Recorder {
        node: settings.node.to_string(),
        log: log.clone(),
    });
    keeper_on(url, settings, host).await
}

async fn keeper_on(
    url: &str,
    settings: Settings,
    host: Arc<dyn PartitionHost>,
) -> Result<Keeper, ClusterError> {
    let js = context(url).await;
    let buckets = check_deployment(&js, &settings).await?;
    Keeper::start(settings, buckets, host).await
}

/// Starts n1 as the only node and waits until it holds all `partitions`.
async fn sole_holder(url: &str, partitions: u16, log: &Arc<Mutex<Vec<Record>>>) -> Keeper {
    let k1 = keeper(url, settings("n1", u32::from(partitions)), log)
        .await
        .unwrap();
    until("n1 holds everything", TTL * 4, &[&k1], || {
        all_held(&[&k1], partitions)
    })
    .await;
    k1
}

/// Waits until `done` holds, checking after each poll that no partition is held (with a
/// valid lease) by two keepers at once.
async fn until(what: &str, within: Duration, keepers: &[&Keeper], mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    loop {
        let mut seen: BTreeMap<Partition, usize> = BTreeMap::new();
        for (i, k) in keepers.iter().enumerate() {
            for p in k.held() {
                if let Some(other) = seen.insert(p, i) {
                    panic!("{p} held by keepers {other} and {i} at once");
                }
            }
        }
        if done() {
            return;
        }
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn counts(keepers: &[&Keeper]) -> Vec<usize> {
    keepers.iter().map(|k| k.held().len()).collect()
}

fn all_held(keepers: &[&Keeper], partitions: u16) -> bool {
    let held: BTreeSet<Partition> = keepers.iter().flat_map(|k| k.held()).collect();
    held.len() == usize::from(partitions)
}

#[test]
fn every_node_must_agree_on_the_partitions_the_lease_ttl_and_the_intake_shards() {
    // Goal: the first node writes the deployment; a node with another P, TTL or coupon intake
    // shard count is refused before it touches a lease, naming both values.
    let Some(binary) = nats::binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = nats::single_synced(&binary, dir.path());
    runtime().block_on(async {
        let js = context(&server.url()).await;
        check_deployment(&js, &settings("n1", 16))
            .await
            .expect("first");
        check_deployment(&js, &settings("n2", 16))
            .await
            .expect("same");
        match check_deployment(&js, &settings("n3", 64)).await {
            Err(
                e @ ClusterError::PartitionsDisagree {
                    deployed: 16,
                    asked: 64,
                },
            ) => {
                assert!(e.to_string().contains("every node must agree"), "{e}");
            }
            other => panic!("expected a refusal, got {:?}", other.err()),
        }
        let longer = Settings {
            lease_ttl: Duration::from_secs(9),
            ..settings("n4", 16)
        };
        assert!(matches!(
            check_deployment(&js, &longer).await,
            Err(ClusterError::LeaseTtlDisagree {
                deployed_ms: 2000,
                asked_ms: 9000
            })
        ));
        // Another shard count would send a seq_no to another intake than the other nodes do.
        let sharded = Settings {
            coupon_intake_shards: Some(8),
            ..settings("n6", 16)
        };
        match check_deployment(&js, &sharded).await {
            Err(
                e @ ClusterError::IntakeShardsDisagree {
                    deployed: 4,
                    asked: 8,
                },
            ) => {
                assert!(e.to_string().contains("every node must agree"), "{e}");
            }
            other => panic!("expected a refusal, got {:?}", other.err()),
        }
        let short = Settings {
            lease_ttl: Duration::from_millis(300),
            ..settings("n5", 16)
        };
        assert!(matches!(
            check_deployment(&js, &short).await,
            Err(ClusterError::BadLeaseTtl(_))
        ));
    });
}

#[test]
fn live_nodes_share_the_partitions_and_a_dead_nodes_move_only_after_its_lease() {
    // Goal: three nodes reach fair shares (4/4/4 of 12) with one holder per partition; when
    // one dies (stops renewing, releases nothing), the two others take its partitions, each
    // only after the dead node's own validity of that lease had ended, within a few TTLs.
    let Some(binary) = nats::binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = nats::single_synced(&binary, dir.path());
    let log = Arc::new(Mutex::new(Vec::new()));
    runtime().block_on(async {
        let url = server.url();
        let k1 = keeper(&url, settings("n1", 12), &log).await.unwrap();
        let k2 = keeper(&url, settings("n2", 12), &log).await.unwrap();
        let k3 = keeper(&url, settings("n3", 12), &log).await.unwrap();
        until("fair shares", TTL * 8, &[&k1, &k2, &k3], || {
            counts(&[&k1, &k2, &k3]) == vec![4, 4, 4]
        })
        .await;
        let mut view = k1.view();
        view.wait_for(|v| {
            v.as_ref()
                .is_some_and(|v| v.nodes.len() == 3 && v.held.len() == 4)
        })
        .await
        .unwrap();

        let doomed: Vec<(Partition, Instant)> = k3
            .held()
            .into_iter()
            .map(|p| (p, k3.held_until(p).unwrap().1))
            .collect();
        let killed = Instant::now();
        drop(k3);
        until(
            "the dead node's partitions taken",
            TTL * 4,
            &[&k1, &k2],
            || all_held(&[&k1, &k2], 12),
        )
        .await;
        assert_eq!(counts(&[&k1, &k2]), vec![6, 6]);
        let log = log.lock().unwrap().clone();
        let mut handover = Duration::ZERO;
        for (partition, valid_until) in doomed {
            let opened = log
                .iter()
                .find(|r| {
                    r.partition == partition
                        && r.node != "n3"
                        && r.at > killed
                        && matches!(r.what, What::Open(_))
                })
                .unwrap_or_else(|| panic!("{partition} not reopened"));
            assert!(
                opened.at > valid_until,
                "{partition} opened by {} while n3 still counted on its lease",
                opened.node
            );
            handover = handover.max(opened.at - killed);
        }
        eprintln!("hand-over after a kill: {handover:?} (lease TTL {TTL:?})");
    });
}

#[test]
fn a_joining_node_gets_its_share_after_a_drain_and_a_leaving_one_hands_over_at_once() {
    // Goal: n1 alone holds all 8; n2 joins: n1 closes 4 (a drain, Close::Rebalance) before n2
    // opens each of them. n2 leaves: it releases its leases, so n1 holds all 8 again well
    // before a lease could have expired.
    let Some(binary) = nats::binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = nats::single_synced(&binary, dir.path());
    let log = Arc::new(Mutex::new(Vec::new()));
    runtime().block_on(async {
        let url = server.url();
        let k1 = sole_holder(&url, 8, &log).await;
        let k2 = keeper(&url, settings("n2", 8), &log).await.unwrap();
        until("halves", TTL * 4, &[&k1, &k2], || {
            counts(&[&k1, &k2]) == vec![4, 4]
        })
        .await;
        let records = log.lock().unwrap().clone();
        for p in k2.held() {
            let closed = records.iter().position(|r| {
                r.node == "n1" && r.partition == p && r.what == What::Close(Close::Rebalance)
            });
            let opened = records.iter().position(|r| {
                r.node == "n2" && r.partition == p && matches!(r.what, What::Open(_))
            });
            assert!(
                matches!((closed, opened), (Some(c), Some(o)) if c < o),
                "{p}: n1 closed at {closed:?}, n2 opened at {opened:?}"
            );
        }
        let left = Instant::now();
        k2.leave().await;
        until("n1 holds everything again", TTL * 4, &[&k1], || {
            all_held(&[&k1], 8)
        })
        .await;
        assert!(
            left.elapsed() < TTL,
            "took {:?}: the leases were not released",
            left.elapsed()
        );
        let records = log.lock().unwrap().clone();
        assert_eq!(
            records
                .iter()
                .filter(|r| r.node == "n2" && r.what == What::Close(Close::Leaving))
                .count(),
            4
        );
    });
}

#[test]
fn a_node_cut_off_from_the_bucket_stops_before_its_lease_could_expire_and_comes_back() {
    // Goal: with the server gone, the node stops counting on every lease (Close::Lost) within
    // the lease TTL of its last renewal, so no other node could have taken one yet; when the
    // server is back it holds them again.
    let Some(binary) = nats::binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = nats::single_synced(&binary, dir.path());
    let log = Arc::new(Mutex::new(Vec::new()));
    runtime().block_on(async {
        let url = server.url();
        let k1 = sole_holder(&url, 4, &log).await;
        let stopped = server.stop();
        let cut = Instant::now();
        // `held()` is empty the moment validity ends; the host hears of it an instant later
        // (the watchdog's close), so wait for the closes themselves, then check when they came.
        let lost = || -> Vec<Instant> {
            log.lock()
                .unwrap()
                .iter()
                .filter(|r| r.what == What::Close(Close::Lost))
                .map(|r| r.at)
                .collect()
        };
        until(
            "every lease given up and closed as lost",
            TTL * 2,
            &[&k1],
            || k1.held().is_empty() && lost().len() >= 4,
        )
        .await;
        let lost_at = lost();
        assert_eq!(lost_at.len(), 4, "each partition closed as lost, once");
        for at in lost_at {
            assert!(at - cut < TTL, "closed {:?} after the cut", at - cut);
        }
        let server = stopped.restart();
        until("held again", TTL * 10, &[&k1], || all_held(&[&k1], 4)).await;
        drop(server);
    });
}

#[test]
fn a_node_id_in_use_is_refused_and_a_restarted_node_takes_its_leases_back() {
    // Goal: a second process with a live node's id is refused; after that node dies, a new
    // incarnation with its id waits for the old registration to expire, then holds its
    // partitions again under new epochs.
    let Some(binary) = nats::binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = nats::single_synced(&binary, dir.path());
    let log = Arc::new(Mutex::new(Vec::new()));
    runtime().block_on(async {
        let url = server.url();
        let first = sole_holder(&url, 4, &log).await;
        let epochs: Vec<u64> = first
            .held()
            .iter()
            .map(|p| first.holds(*p).unwrap())
            .collect();
        match keeper(&url, settings("n1", 4), &log).await {
            Err(ClusterError::NodeIdInUse { node, .. }) => assert_eq!(node.as_str(), "n1"),
            other => panic!("expected NodeIdInUse, got {:?}", other.err()),
        }
        drop(first);
        let second = keeper(&url, settings("n1", 4), &log).await.unwrap();
        until(
            "the new incarnation holds everything",
            TTL * 4,
            &[&second],
            || all_held(&[&second], 4),
        )
        .await;
        for (p, old) in second.held().iter().zip(epochs) {
            assert!(second.holds(*p).unwrap() > old, "{p}: a new epoch");
        }
    });
}

#[test]
fn a_request_reaches_only_the_partitions_holder_and_nobody_answers_for_a_free_one() {
    // Goal: the holder of p003 answers requests sent from another connection; a request for
    // a partition nobody serves fails at once as NoOwner (503 upstream); after the holder
    // stops serving, p003 is NoOwner too, and no request taken was left unanswered.
    let Some(binary) = nats::binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = nats::single_synced(&binary, dir.path());
    runtime().block_on(async {
        let (holder, _) = connect(&server.url()).await.unwrap();
        let (caller, _) = connect(&server.url()).await.unwrap();
        let holder = Router::new(holder, Duration::from_secs(2));
        let caller = Router::new(caller, Duration::from_secs(2));
        // Tells the test each time the holder has taken a request.
        let (taken_tx, mut taken) = tokio::sync::mpsc::unbounded_channel::<()>();
        let serving = holder
            .serve(
                Partition(3),
                7,
                Arc::new(move |request: Vec<u8>| {
                    let _ = taken_tx.send(());
                    Box::pin(async move {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        [b"p003 holder: ".as_slice(), &request].concat()
                    }) as BoxFuture<'static, Vec<u8>>
                }),
            )
            .await
            .unwrap();
        let answer = caller
            .request(Partition(3), 7, b"hello".to_vec())
            .await
            .unwrap();
        assert_eq!(answer, b"p003 holder: hello");
        // Requests are addressed to the lease's epoch: another epoch's holder never gets them.
        assert!(matches!(
            caller.request(Partition(3), 8, b"hello".to_vec()).await,
            Err(RouteError::NoOwner(Partition(3)))
        ));
        let started = Instant::now();
        assert!(matches!(
            caller.request(Partition(4), 7, b"hello".to_vec()).await,
            Err(RouteError::NoOwner(Partition(4)))
        ));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "no responders is immediate"
        );
        // A request in flight when the holder stops is still answered.
        let in_flight = tokio::spawn({
            let caller = caller.clone();
            async move { caller.request(Partition(3), 7, b"late".to_vec()).await }
        });
        taken.recv().await.unwrap(); // "hello"
        taken.recv().await.unwrap(); // "late", now being answered
        serving.stop().await;
        assert_eq!(in_flight.await.unwrap().unwrap(), b"p003 holder: late");
        assert!(matches!(
            caller.request(Partition(3), 7, b"again".to_vec()).await,
            Err(RouteError::NoOwner(_))
        ));
    });
}

/// A host that opens the partition's JetStream log for real (one synced server, one
/// replica), with or without the lease's write guard.
struct LogHost {
    url: String,
    dir: std::path::PathBuf,
    guarded: bool,
    logs: Arc<Mutex<BTreeMap<Partition, Arc<JetStreamStore>>>>,
}

impl PartitionHost for LogHost {
    fn open(&self, partition: Partition, lease: Lease) -> BoxFuture<'static, Result<(), String>> {
        let mut config = JetStreamConfig::new(
            &self.url,
            &partition.stream_name(),
            self.dir.join(partition.key()),
        );
        config.subject_prefix = partition.subject_prefix();
        config.durability = Durability {
            replicas: 1,
            single_replica_synced: true,
        };
        config.write_guard = self.guarded.then(|| lease.write_guard());
        let logs = self.logs.clone();
        Box::pin(async move {
            let store = tokio::task::spawn_blocking(move || {
                JetStreamStore::open(
                    config,
                    Arc::new(ManualClock::new(1_000)),
                    Arc::new(Metrics::new()),
                )
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
            logs.lock().unwrap().insert(partition, store);
            Ok(())
        })
    }

    fn close(&self, partition: Partition, _why: Close) -> BoxFuture<'static, ()> {
        self.logs.lock().unwrap().remove(&partition);
        Box::pin(async {})
    }
}

async fn append_to(
    store: &Arc<JetStreamStore>,
    writer: u64,
    stream: &str,
    expected: u64,
) -> Result<u64, AppendError> {
    let ack = store.append(
        writer,
        stream.into(),
        ExpectedVersion::Exact(expected),
        vec![super::event(expected + 1)],
    )?;
    ack.await.map(|a| a.last_version)
}

/// Starts a keeper of one partition whose host opens the partition's log.
async fn log_node(
    url: &str,
    node: &str,
    dir: &std::path::Path,
    guarded: bool,
) -> (Keeper, Arc<Mutex<BTreeMap<Partition, Arc<JetStreamStore>>>>) {
    let settings = settings(node, 1);
    let buckets = check_deployment(&context(url).await, &settings)
        .await
        .unwrap();
    let logs = Arc::new(Mutex::new(BTreeMap::new()));
    let host = Arc::new(LogHost {
        url: url.to_owned(),
        dir: dir.join(node),
        guarded,
        logs: logs.clone(),
    });
    let keeper = Keeper::start(settings, buckets, host).await.unwrap();
    (keeper, logs)
}

async fn opened(
    logs: &Arc<Mutex<BTreeMap<Partition, Arc<JetStreamStore>>>>,
) -> Arc<JetStreamStore> {
    let deadline = Instant::now() + TTL * 6;
    loop {
        if let Some(store) = logs.lock().unwrap().get(&Partition(0)) {
            return store.clone();
        }
        assert!(Instant::now() < deadline, "p000 never opened");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[test]
fn a_holder_paused_past_its_lease_cannot_write_once_another_node_took_the_partition() {
    // Goal (CLUSTER.md's one rule): n1 writes p000, then "pauses" (its keeper stops renewing,
    // its log writer stays alive and is never told). n2 takes p000 after the lease expires and
    // writes. n1 wakes and appends: refused, and nothing of it enters the log. With the
    // lease's write guard, refused before publishing (the lease ran out); without it, by the
    // log itself (its expected last sequence is stale and the records past it are not its
    // own). Either way one writer at a time, the chain linear, n2 goes on.
    let Some(binary) = nats::binary() else { return };
    for guarded in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let server = nats::single_synced(&binary, dir.path());
        let url = server.url();
        runtime().block_on(async {
            let (k1, logs1) = log_node(&url, "n1", dir.path(), guarded).await;
            let paused = opened(&logs1).await;
            for v in 0..3 {
                assert_eq!(append_to(&paused, 1, "wallet:u1", v).await, Ok(v + 1));
            }
            drop(k1);
            let (k2, logs2) = log_node(&url, "n2", dir.path(), guarded).await;
            let taker = opened(&logs2).await;
            assert_eq!(k2.held(), vec![Partition(0)]);
            assert_eq!(append_to(&taker, 2, "wallet:u2", 0).await, Ok(1));

            let refused = append_to(&paused, 1, "wallet:u1", 3).await;
            match &refused {
                Err(AppendError::Unavailable(why)) if guarded => {
                    assert!(why.contains("lease"), "{why}")
                }
                Err(AppendError::Unavailable(_)) => {}
                other => panic!("guarded {guarded}: the paused writer got {other:?}"),
            }
            assert_eq!(paused.condition(), JournalCondition::Failed);
            assert!(
                append_to(&paused, 1, "wallet:u1", 3).await.is_err(),
                "and stays stopped"
            );
            assert_eq!(append_to(&taker, 2, "wallet:u2", 1).await, Ok(2));
            let log = taker.read_all(1, usize::MAX).unwrap();
            let streams: Vec<(&str, u64)> =
                log.iter().map(|e| (e.stream.as_str(), e.version)).collect();
            assert_eq!(
                streams,
                vec![
                    ("wallet:u1", 1),
                    ("wallet:u1", 2),
                    ("wallet:u1", 3),
                    ("wallet:u2", 1),
                    ("wallet:u2", 2)
                ],
                "guarded {guarded}"
            );
            let mut prev = GENESIS_HASH;
            for e in &log {
                assert_eq!(e.prev_hash, prev, "seq {} links", e.seq);
                prev = e.hash;
            }
            let stream = taker.jetstream_stream().get_info().await.unwrap();
            assert_eq!(stream.config.name, "HB_P000");
            assert!(stream
                .config
                .subjects
                .iter()
                .any(|s| s.starts_with("hb.p000")));
        });
    }
}

#[test]
fn a_fleet_limit_holds_across_nodes_whatever_their_number() {
    // Goal: three "nodes" (each its own connection and limiter) spend one fleet-wide limit of
    // 200/s as fast as they can for 2 s: every 500 ms window of the fleet's spending stays
    // within the rate plus three batches (the bound limits.rs proves), the whole run within
    // 2 s of the rate plus that, and the fleet is not starved (over half the rate is spent).
    // One node alone at the same limit spends about what three do.
    use hongbao::cluster::limits::FleetLimits;
    use hongbao::flows::Pacer;
    let Some(binary) = nats::binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = nats::single_synced(&binary, dir.path());
    const RATE: u32 = 200;
    const RUN: Duration = Duration::from_secs(2);
    // A batch is 100 ms of the rate: 20 tokens.
    const SLACK: usize = 3 * 20;
    let spend = |nodes: usize, limit: &'static str| {
        runtime().block_on(async {
            let mut limiters = Vec::new();
            for _ in 0..nodes {
                let js = context(&server.url()).await;
                let limits = FleetLimits::open(
                    &js,
                    "hb_limits",
                    1,
                    Arc::new(hongbao::clock::SystemClock),
                    tokio::runtime::Handle::current(),
                    &prometheus::Registry::new(),
                )
                .await
                .unwrap();
                limiters.push((Arc::new(limits.limiter(limit, RATE)), limits));
            }
            let started = Instant::now();
            let spent = Arc::new(Mutex::new(Vec::new()));
            let mut tasks = Vec::new();
            for (limiter, _) in &limiters {
                for _ in 0..4 {
                    let (limiter, spent) = (limiter.clone(), spent.clone());
                    tasks.push(tokio::spawn(async move {
                        while started.elapsed() < RUN {
                            match Pacer::check(limiter.as_ref()) {
                                Ok(()) => spent.lock().unwrap().push(started.elapsed()),
                                Err(wait) => tokio::time::sleep(wait).await,
                            }
                        }
                    }));
                }
            }
            for task in tasks {
                task.await.unwrap();
            }
            let mut spent = spent.lock().unwrap().clone();
            spent.sort();
            spent
        })
    };
    let check = |spent: &[Duration], nodes: usize| {
        let total = spent.len();
        let rate = RATE as usize;
        assert!(
            total <= rate * 2 + SLACK,
            "{nodes} nodes spent {total} in 2 s"
        );
        assert!(total >= rate, "{nodes} nodes starved: {total} in 2 s");
        let window = Duration::from_millis(500);
        for (i, start) in spent.iter().enumerate() {
            let within = spent[i..]
                .iter()
                .take_while(|t| **t < *start + window)
                .count();
            assert!(
                within <= rate / 2 + SLACK,
                "{nodes} nodes spent {within} in the 500 ms from {start:?}"
            );
        }
        total
    };
    let three = check(&spend(3, "payout.bank"), 3);
    let one = check(&spend(1, "payout.alipay"), 1);
    eprintln!("fleet limit {RATE}/s over 2 s: three nodes spent {three}, one node {one}");
}

#[test]
fn a_fleets_channel_book_pays_an_order_once_whichever_node_calls() {
    // Goal: the simulated channels' books are the fleet's. Two "nodes" (each its own
    // connection and simulator over the same buckets) call for the same orders at once, with
    // refusals mixed in: one line per order, every call counted, paid exactly when a call was
    // answered paid, and once paid never refused. Settings changed through one node are in
    // force on the other. The statement is in order id order for ids a key-value key could not
    // hold as they are (`:`), pages from a cursor, and the audit's local copy has every line.
    use hongbao::channels::{
        ChannelSettings, PayOutcome, PaymentChannel, RecordStatus, SimulatedChannels, Simulator,
    };
    use hongbao::domain::withdrawal::Channel;
    use hongbao::ids::Id;
    use hongbao::money::Fen;
    let Some(binary) = nats::binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = nats::single_synced(&binary, dir.path());
    runtime().block_on(async {
        let mut nodes = Vec::new();
        for _ in 0..2 {
            let js = context(&server.url()).await;
            let sim = SimulatedChannels::open_shared(
                &js,
                "hb",
                Some(1),
                Arc::new(hongbao::clock::SystemClock),
                tokio::runtime::Handle::current(),
            )
            .await
            .unwrap();
            nodes.push(sim);
        }
        let settings = ChannelSettings {
            latency_ms: 0,
            fail_rate: 0.5,
            ..Default::default()
        };
        nodes[0].configure(Channel::Bank, settings).await.unwrap();
        assert_eq!(
            nodes[1].current_settings(Channel::Bank).await.unwrap(),
            settings,
            "a setting made through one node is the other's"
        );
        let orders: Vec<Id> = (0..20)
            .map(|i| Id::parse(&format!("w:{i:02}")).unwrap())
            .collect();
        let mut calls = Vec::new();
        for order in &orders {
            for round in 0..6 {
                let sim = Simulator(nodes[round % 2].clone());
                let order = order.clone();
                calls.push(tokio::spawn(async move {
                    let outcome = sim.pay(Channel::Bank, &order, Fen::new(7), "acct").await;
                    (order, outcome)
                }));
            }
        }
        let mut answered_paid = BTreeSet::new();
        for call in calls {
            let (order, outcome) = call.await.unwrap();
            assert!(
                !matches!(&outcome, PayOutcome::Failed(why) if why.contains("busy")),
                "{order}: {outcome:?}"
            );
            if outcome == PayOutcome::Succeeded {
                answered_paid.insert(order.to_string());
            }
        }
        let statement = nodes[1].statement(Channel::Bank, 100).await.unwrap();
        let ids: Vec<&str> = statement.iter().map(|l| l.order_id.as_str()).collect();
        let expected: Vec<&str> = orders.iter().map(|o| o.as_str()).collect();
        assert_eq!(ids, expected, "one line per order, in order id order");
        for line in &statement {
            assert_eq!(line.calls, 6, "every call counted: {line:?}");
            assert_eq!(
                line.status == RecordStatus::Succeeded,
                answered_paid.contains(&line.order_id),
                "paid exactly when a call was answered paid: {line:?}"
            );
        }
        assert!(
            !answered_paid.is_empty(),
            "some orders paid at fail rate 0.5"
        );
        let page = nodes[0]
            .statement_after(Channel::Bank, Some("w:09"), 5)
            .await
            .unwrap();
        let page: Vec<&str> = page.iter().map(|l| l.order_id.as_str()).collect();
        assert_eq!(page, ["w:10", "w:11", "w:12", "w:13", "w:14"]);
        let copy_dir = tempfile::tempdir().unwrap();
        let copy = nodes[0].copy_into(copy_dir.path(), |_| {}).await.unwrap();
        let copied: Vec<_> = copy.lines(Channel::Bank).map(|l| l.unwrap()).collect();
        assert_eq!(copied, statement, "the audit's copy is the statement");
        assert_eq!(copy.settings(Channel::Bank), settings);
    });
}

/// A recording host whose close of one partition takes `delay` (requests in flight on a log
/// whose leader is being elected).
struct SlowToClose {
    recorder: Recorder,
    partition: Partition,
    delay: Duration,
}

impl PartitionHost for SlowToClose {
    fn open(&self, partition: Partition, lease: Lease) -> BoxFuture<'static, Result<(), String>> {
        self.recorder.open(partition, lease)
    }

    fn close(&self, partition: Partition, why: Close) -> BoxFuture<'static, ()> {
        self.recorder.push(partition, What::Close(why));
        if partition != self.partition {
            return Box::pin(async {});
        }
        let (delay, recorder) = (self.delay, self.recorder.clone());
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            recorder.push(partition, What::Closed);
        })
    }
}

#[test]
fn a_slow_close_of_one_lost_partition_does_not_cost_the_node_its_other_leases() {
    // Goal: one lease is taken from its holder (another value put at its key) and the host
    // takes three TTLs to close that partition. Meanwhile the node goes on renewing its three
    // other leases: it holds them the whole time and never closes them (they ran out one
    // after the other when the renewals waited for the close). The lost partition, taken back,
    // opens only once its close has ended.
    let Some(binary) = nats::binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = nats::single_synced(&binary, dir.path());
    let log = Arc::new(Mutex::new(Vec::new()));
    runtime().block_on(async {
        let url = server.url();
        let settings = settings("n1", 4);
        let slow = settings.partitions.all().next().unwrap();
        let others: Vec<Partition> = settings.partitions.all().filter(|p| *p != slow).collect();
        let host = Arc::new(SlowToClose {
            recorder: Recorder {
                node: "n1".into(),
                log: log.clone(),
            },
            partition: slow,
            delay: TTL * 3,
        });
        let k1 = keeper_on(&url, settings, host).await.unwrap();
        until("n1 holds everything", TTL * 4, &[&k1], || {
            all_held(&[&k1], 4)
        })
        .await;

        // Another holder's value at a new revision: the next renewal finds the lease taken.
        let leases = context(&url)
            .await
            .get_key_value("hb_leases")
            .await
            .unwrap();
        let ghost = br#"{"node":"n9","incarnation":"ghost","epoch":null}"#;
        leases.put(slow.key(), ghost.to_vec().into()).await.unwrap();
        let closing = || {
            log.lock()
                .unwrap()
                .iter()
                .any(|r| r.partition == slow && r.what == What::Close(Close::Lost))
        };
        until("the taken lease closed", TTL * 2, &[&k1], closing).await;
        let slow_close_ends = Instant::now() + TTL * 3;
        while Instant::now() < slow_close_ends + TTL {
            let held = k1.held();
            for p in &others {
                assert!(
                    held.contains(p),
                    "{p} not held while {slow} closes: {held:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let lost_others: Vec<Record> = log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| others.contains(&r.partition) && matches!(r.what, What::Close(_)))
            .cloned()
            .collect();
        assert!(lost_others.is_empty(), "{lost_others:?}");
        // The partition is taken back as soon as the ghost's lease is free (an orphan), and
        // opened only once its close has ended: the host never opens what it is closing.
        let log = log.lock().unwrap().clone();
        let closed = log
            .iter()
            .find(|r| r.partition == slow && r.what == What::Closed)
            .expect("the slow close ended");
        let reopened = log
            .iter()
            .filter(|r| r.partition == slow && matches!(r.what, What::Open(_)))
            .nth(1)
            .expect("the partition taken back");
        assert!(
            reopened.at >= closed.at,
            "{slow} opened {:?} before its close ended",
            closed.at - reopened.at
        );
    });
}
