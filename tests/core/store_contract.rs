//! The `EventStore` contract, run against both backends from one set of tests: sled, and
//! JetStream on a real nats-server with `sync_interval: always` (skipped without
//! `HONGBAO_NATS_SERVER`, mandatory with `HONGBAO_JETSTREAM=1`). Conflicts, one global order
//! with contiguous sequences, the hash chain, per-stream reads, restarts, subscriptions that
//! deliver every event once in order; and, on JetStream, a second writer fenced by the log.

use super::{event, nats, runtime};
use hongbao::clock::ManualClock;
use hongbao::events::jetstream::Durability;
use hongbao::events::jetstream_store::{
    subject_of, JetStreamConfig, JetStreamStore, WRITER_HEADER,
};
use hongbao::events::sled_store::{JournalConfig, SledStore};
use hongbao::events::{
    chain_hash, seal, AppendError, Envelope, EventStore, ExpectedVersion, JournalCondition,
    Subscription, GENESIS_HASH,
};
use hongbao::metrics::Metrics;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Backend {
    Sled,
    /// JetStream, every journal batch published as one atomic batch (ADR-50).
    JetStream,
    /// JetStream, every journal batch published as pipelined messages.
    JetStreamPipelined,
}

/// A place for one log: a directory, and for JetStream a server of its own.
struct Place {
    backend: Backend,
    dir: tempfile::TempDir,
    server: Option<nats::NatsServer>,
}

impl Place {
    /// `None` when the backend cannot run here (no nats-server, and not required).
    fn new(backend: Backend) -> Option<Place> {
        let dir = tempfile::tempdir().unwrap();
        let server = match backend {
            Backend::Sled => None,
            Backend::JetStream | Backend::JetStreamPipelined => {
                Some(nats::single_synced(&nats::binary()?, dir.path()))
            }
        };
        Some(Place {
            backend,
            dir,
            server,
        })
    }

    fn open(&self) -> Arc<dyn EventStore> {
        self.open_node("node")
    }

    /// For JetStream, `node` names the process's local directory (its snapshots): two nodes
    /// on one log each have their own.
    fn open_node(&self, node: &str) -> Arc<dyn EventStore> {
        match &self.server {
            None => SledStore::open(
                self.dir.path(),
                JournalConfig::default(),
                Arc::new(ManualClock::new(1_000)),
                Arc::new(Metrics::new()),
            )
            .expect("open sled"),
            Some(_) => self.open_jetstream(node),
        }
    }

    fn open_jetstream(&self, node: &str) -> Arc<JetStreamStore> {
        let server = self.server.as_ref().expect("a JetStream place");
        let mut config = JetStreamConfig::new(&server.url(), "HB_LOG", self.dir.path().join(node));
        config.durability = Durability {
            replicas: 1,
            single_replica_synced: true,
        };
        config.atomic_batch_min = match self.backend {
            Backend::JetStreamPipelined => usize::MAX,
            _ => 1,
        };
        JetStreamStore::open(
            config,
            Arc::new(ManualClock::new(1_000)),
            Arc::new(Metrics::new()),
        )
        .expect("open JetStream")
    }
}

fn each_backend(test: impl Fn(&Place)) {
    for backend in [
        Backend::Sled,
        Backend::JetStream,
        Backend::JetStreamPipelined,
    ] {
        match Place::new(backend) {
            Some(place) => test(&place),
            None => eprintln!("{backend:?}: skipped"),
        }
    }
}

fn append(
    store: &Arc<dyn EventStore>,
    writer: u64,
    stream: &str,
    expected: ExpectedVersion,
    n: u64,
) -> Result<u64, AppendError> {
    let events = (0..n).map(event).collect();
    let ack = store.append(writer, stream.into(), expected, events)?;
    runtime().block_on(ack).map(|a| a.last_version)
}

/// The whole log: contiguous from 1, each record linked to the one before, its hash covering
/// its bytes.
fn assert_chain(store: &Arc<dyn EventStore>, backend: Backend) -> Vec<Arc<Envelope>> {
    let all = store.read_all(1, usize::MAX).unwrap();
    let mut prev = GENESIS_HASH;
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1, "{backend:?}: sequence contiguous");
        assert_eq!(e.prev_hash, prev, "{backend:?}: seq {} links", e.seq);
        let record = e.encode_record().unwrap();
        assert_eq!(
            chain_hash(&prev, &record),
            e.hash,
            "{backend:?}: seq {}",
            e.seq
        );
        prev = e.hash;
    }
    assert_eq!(all.len() as u64, store.head(), "{backend:?}: head");
    all
}

#[test]
fn conflicts_order_chain_and_stream_reads_hold_on_both_backends() {
    // Goal: expected versions are enforced with a typed conflict; a refused writer stays
    // fenced on that stream; the log is one order with a hash chain; a stream reads back its
    // own events from any version.
    each_backend(|place| {
        let backend = place.backend;
        let store = place.open();
        assert_eq!(
            append(&store, 1, "wallet:a", ExpectedVersion::Exact(0), 3),
            Ok(3)
        );
        assert_eq!(
            append(&store, 2, "wallet:b.c", ExpectedVersion::Exact(0), 2),
            Ok(2)
        );
        assert_eq!(
            append(&store, 1, "wallet:a", ExpectedVersion::Exact(3), 1),
            Ok(4)
        );
        assert_eq!(
            append(&store, 3, "wallet:a", ExpectedVersion::Exact(2), 1),
            Err(AppendError::Conflict {
                stream: "wallet:a".into(),
                expected: 2,
                actual: 4
            }),
            "{backend:?}"
        );
        assert!(
            matches!(
                append(&store, 3, "wallet:a", ExpectedVersion::Exact(4), 1),
                Err(AppendError::Conflict { .. })
            ),
            "{backend:?}: a refused writer stays fenced"
        );
        assert_eq!(
            append(&store, 4, "wallet:b.c", ExpectedVersion::Any, 1),
            Ok(3)
        );
        let all = assert_chain(&store, backend);
        assert_eq!(all.len(), 7);
        let a: Vec<u64> = store
            .read_stream("wallet:a", 1)
            .unwrap()
            .iter()
            .map(|e| e.version)
            .collect();
        assert_eq!(a, vec![1, 2, 3, 4], "{backend:?}");
        let b: Vec<(String, u64)> = store
            .read_stream("wallet:b.c", 2)
            .unwrap()
            .iter()
            .map(|e| (e.stream.clone(), e.version))
            .collect();
        assert_eq!(
            b,
            vec![("wallet:b.c".into(), 2), ("wallet:b.c".into(), 3)],
            "{backend:?}"
        );
        assert!(store.read_stream("wallet:nobody", 1).unwrap().is_empty());
        runtime().block_on(store.close()).unwrap();
    });
}

#[test]
fn reading_a_stream_from_a_version_returns_exactly_its_tail() {
    // Goal: an actor activated from a snapshot reads only the events after it: from any
    // version, a stream's read returns exactly its events from that version on, in order,
    // with other streams' records interleaved in the log (JetStream finds where the tail
    // starts by searching the sequences).
    each_backend(|place| {
        let backend = place.backend;
        let store = place.open();
        for i in 0..150u64 {
            append(&store, 0, "wallet:long", ExpectedVersion::Exact(i), 1).unwrap();
            if i % 3 == 0 {
                append(&store, 0, "wallet:other", ExpectedVersion::Any, 2).unwrap();
            }
        }
        for from in [0, 1, 2, 64, 65, 100, 149, 150] {
            let versions: Vec<u64> = store
                .read_stream("wallet:long", from)
                .unwrap()
                .iter()
                .map(|e| e.version)
                .collect();
            assert_eq!(
                versions,
                (from.max(1)..=150).collect::<Vec<u64>>(),
                "{backend:?}: from {from}"
            );
        }
        assert!(store.read_stream("wallet:long", 151).unwrap().is_empty());
        runtime().block_on(store.close()).unwrap();
    });
}

#[test]
fn a_restart_keeps_the_log_and_the_chain_goes_on() {
    // Goal: after close and reopen the head, the records and the versions are what was
    // acknowledged, and the next append continues the sequence and the chain.
    each_backend(|place| {
        let backend = place.backend;
        let store = place.open();
        append(&store, 1, "packet:p", ExpectedVersion::Exact(0), 5).unwrap();
        append(&store, 2, "wallet:w", ExpectedVersion::Exact(0), 2).unwrap();
        let before = assert_chain(&store, backend);
        runtime().block_on(store.close()).unwrap();
        drop(store);
        let store = place.open();
        assert_eq!(store.head(), 7, "{backend:?}");
        let after = store.read_all(1, usize::MAX).unwrap();
        assert_eq!(
            before.iter().map(|e| e.hash).collect::<Vec<_>>(),
            after.iter().map(|e| e.hash).collect::<Vec<_>>(),
            "{backend:?}"
        );
        assert!(matches!(
            append(&store, 3, "packet:p", ExpectedVersion::Exact(4), 1),
            Err(AppendError::Conflict { actual: 5, .. })
        ));
        assert_eq!(
            append(&store, 4, "packet:p", ExpectedVersion::Exact(5), 1),
            Ok(6)
        );
        assert_eq!(assert_chain(&store, backend).len(), 8);
        runtime().block_on(store.close()).unwrap();
    });
}

#[test]
fn a_subscription_delivers_every_event_once_in_order_while_appends_go_on() {
    // Goal: a consumer that starts mid-way catches up from the store, follows the live tail
    // and sees every sequence exactly once, in order.
    each_backend(|place| {
        let backend = place.backend;
        let store = place.open();
        append(&store, 1, "wallet:s0", ExpectedVersion::Any, 10).unwrap();
        let mut subscription = Subscription::new(store.clone(), 1, 64);
        let writer = {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..30 {
                    append(
                        &store,
                        0,
                        &format!("wallet:s{}", i % 4),
                        ExpectedVersion::Any,
                        3,
                    )
                    .unwrap();
                }
            })
        };
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        runtime().block_on(async {
            while seen.len() < 100 {
                assert!(
                    Instant::now() < deadline,
                    "{backend:?}: {} of 100",
                    seen.len()
                );
                let next = tokio::time::timeout(Duration::from_secs(5), subscription.next()).await;
                if let Ok(events) = next {
                    seen.extend(events.unwrap().iter().map(|e| e.seq));
                }
            }
        });
        writer.join().unwrap();
        assert_eq!(seen, (1..=100).collect::<Vec<u64>>(), "{backend:?}");
        runtime().block_on(store.close()).unwrap();
    });
}

#[test]
fn a_second_writer_on_the_same_jetstream_log_is_fenced() {
    // Goal (D6): two processes opened on one log; the first appends; the second, whose view
    // of the log is stale, cannot interleave: its append fails, it stops (unhealthy), and the
    // chain stays linear with the first writer going on.
    // Both ways of publishing a batch: atomic, and pipelined.
    for backend in [Backend::JetStream, Backend::JetStreamPipelined] {
        a_second_writer_on_the_same_jetstream_log_is_fenced_on(backend);
    }
}

fn a_second_writer_on_the_same_jetstream_log_is_fenced_on(backend: Backend) {
    let Some(place) = Place::new(backend) else {
        return;
    };
    let first = place.open_node("first");
    let second = place.open_node("second");
    append(&first, 1, "wallet:f", ExpectedVersion::Exact(0), 2).unwrap();
    let refused = append(&second, 2, "wallet:g", ExpectedVersion::Exact(0), 1);
    assert!(
        matches!(refused, Err(AppendError::Unavailable(_))),
        "{refused:?}"
    );
    assert!(!second.healthy(), "the loser fails stop");
    assert!(matches!(
        append(&second, 2, "wallet:g", ExpectedVersion::Exact(0), 1),
        Err(AppendError::Unavailable(_))
    ));
    assert_eq!(
        append(&first, 1, "wallet:f", ExpectedVersion::Exact(2), 1),
        Ok(3)
    );
    let all = assert_chain(&first, backend);
    assert!(
        all.iter().all(|e| e.stream == "wallet:f"),
        "nothing of the loser"
    );
    runtime().block_on(first.close()).unwrap();
}

/// Publishes to the log at `url`, behind the store's back, the record that would follow the
/// head (the next version of `stream`, chained to the head's hash), carrying `writer` in the
/// writer header: a late-landing publish of that writer.
fn publish_late_record(url: &str, store: &JetStreamStore, stream: &str, writer: &str) {
    let log = store.read_all(1, usize::MAX).unwrap();
    let last = log.last().expect("a record to follow");
    let envelope = Envelope {
        seq: last.seq + 1,
        stream: stream.into(),
        version: log.iter().filter(|e| e.stream == stream).count() as u64 + 1,
        event_id: 7,
        correlation_id: "late".into(),
        recorded_at_ms: 1_000,
        schema_version: 1,
        event: event(99).event,
        prev_hash: last.hash,
        hash: GENESIS_HASH,
    };
    let (_, stored) = seal(&last.hash, &envelope.encode_record().unwrap());
    let (url, subject, writer, expected) = (
        url.to_owned(),
        subject_of("hb", stream),
        writer.to_owned(),
        last.seq,
    );
    runtime().block_on(async move {
        let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
        let message = async_nats::jetstream::message::PublishMessage::build()
            .payload(stored.into())
            .header(WRITER_HEADER, writer.as_str())
            .expected_last_sequence(expected);
        let ack = js.send_publish(subject, message).await.unwrap();
        assert_eq!(ack.await.unwrap().sequence, expected + 1);
    });
}

#[test]
fn the_writers_own_late_publish_is_adopted_and_anyone_elses_record_fences_it() {
    // Goal: after an outage the NATS client resends what it buffered, so a record of a batch
    // answered Unavailable can land after the writer re-read the head. That record carries the
    // writer's own incarnation: the writer's next batch meets it, adopts it (one 503, then
    // appends go on, the chain linear), and does not fence itself. The same record from
    // another incarnation is a second writer: the journal fails stop.
    // Both ways of publishing a batch: atomic, and pipelined.
    for backend in [Backend::JetStream, Backend::JetStreamPipelined] {
        the_writers_own_late_publish_is_adopted_and_anyone_elses_record_fences_it_on(backend);
    }
}

fn the_writers_own_late_publish_is_adopted_and_anyone_elses_record_fences_it_on(backend: Backend) {
    let Some(place) = Place::new(backend) else {
        return;
    };
    let url = place.server.as_ref().unwrap().url();
    let store = place.open_jetstream("node");
    let dyn_store: Arc<dyn EventStore> = store.clone();
    append(&dyn_store, 1, "wallet:f", ExpectedVersion::Exact(0), 2).unwrap();
    publish_late_record(&url, &store, "wallet:f", store.incarnation());
    let answered = append(&dyn_store, 2, "wallet:g", ExpectedVersion::Exact(0), 1);
    assert!(
        matches!(answered, Err(AppendError::Unavailable(_))),
        "the batch that met the late record is not acknowledged: {answered:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dyn_store.healthy() {
        assert!(Instant::now() < deadline, "the writer resynced");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        append(&dyn_store, 3, "wallet:g", ExpectedVersion::Exact(0), 1),
        Ok(1),
        "appends go on after the head with the late record"
    );
    assert_eq!(dyn_store.read_stream("wallet:f", 1).unwrap().len(), 3);
    let all = assert_chain(&dyn_store, backend);
    assert_eq!(all.len(), 4);

    publish_late_record(&url, &store, "wallet:f", "another-incarnation");
    let refused = append(&dyn_store, 4, "wallet:g", ExpectedVersion::Exact(1), 1);
    assert!(
        matches!(refused, Err(AppendError::Unavailable(_))),
        "{refused:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while dyn_store.condition() != JournalCondition::Failed {
        assert!(
            Instant::now() < deadline,
            "a foreign record fences the journal: {:?}",
            dyn_store.condition()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(matches!(
        append(&dyn_store, 5, "wallet:h", ExpectedVersion::Exact(0), 1),
        Err(AppendError::Unavailable(_))
    ));
    runtime().block_on(dyn_store.close()).unwrap();
}

#[test]
fn a_node_on_an_empty_data_directory_finds_the_latest_snapshot_in_the_bucket() {
    // Goal: snapshots reach the log's key-value bucket, so another node (a restart elsewhere,
    // a failover) activates from them instead of replaying the whole stream; between its own
    // older local snapshot and the bucket's, a node takes the later one.
    let Some(place) = Place::new(Backend::JetStream) else {
        return;
    };
    let first = place.open_node("first");
    let second = place.open_node("second");
    second.save_snapshot("wallet:s", 3, b"old state").unwrap();
    first.save_snapshot("wallet:s", 7, b"state at 7").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = second.load_snapshot("wallet:s").unwrap();
        if found == Some((7, b"state at 7".to_vec())) {
            break;
        }
        assert!(Instant::now() < deadline, "the bucket's copy: {found:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let third = place.open_node("third");
    assert_eq!(
        third.load_snapshot("wallet:s").unwrap(),
        Some((7, b"state at 7".to_vec())),
        "an empty data directory"
    );
    assert_eq!(third.load_snapshot("wallet:none").unwrap(), None);
    // A snapshot saved locally (passivation's, frequent) stays on its node: no replicated
    // write per passivation. Saved before a shared one that the bucket shows.
    first
        .save_snapshot_locally("wallet:l", 5, b"local")
        .unwrap();
    first.save_snapshot("wallet:m", 2, b"shared").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while third.load_snapshot("wallet:m").unwrap().is_none() {
        assert!(Instant::now() < deadline, "the bucket's copy of wallet:m");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(third.load_snapshot("wallet:l").unwrap(), None);
    assert_eq!(
        first.load_snapshot("wallet:l").unwrap(),
        Some((5, b"local".to_vec()))
    );
}

#[derive(Debug, Clone)]
pub enum Op {
    /// Append `n` events to stream `s`, with the right expected version or a stale one.
    Append { s: u8, n: u8, stale: bool },
    /// Close the store and open it again.
    Restart,
}

pub fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u8..4, 1u8..4, proptest::bool::weighted(0.2)).prop_map(|(s, n, stale)| Op::Append { s, n, stale }),
        1 => Just(Op::Restart),
    ]
}

/// The model test's run: `ops` against the store `open` gives (reopened at each `Restart`)
/// and against an in-memory model; they must agree after every step and at the end (order,
/// versions, per-stream reads, chain). Returns the store, still open.
pub fn model_run(
    open: &dyn Fn() -> Arc<dyn EventStore>,
    ops: Vec<Op>,
) -> Result<Arc<dyn EventStore>, TestCaseError> {
    let rt = runtime();
    let mut store = open();
    let mut model: Vec<(String, u64)> = Vec::new(); // (stream, version) by seq - 1
    let mut versions: BTreeMap<String, u64> = BTreeMap::new();
    let mut n = 0u64;
    for op in ops {
        match op {
            Op::Append { s, n: count, stale } => {
                let stream = format!("m:{s}");
                let current = *versions.get(&stream).unwrap_or(&0);
                let expected = if stale { current + 1 } else { current };
                let events: Vec<_> = (0..count)
                    .map(|_| {
                        n += 1;
                        event(n)
                    })
                    .collect();
                let result = rt.block_on(
                    store
                        .append(0, stream.clone(), ExpectedVersion::Exact(expected), events)
                        .unwrap(),
                );
                if stale {
                    prop_assert!(
                        matches!(result, Err(AppendError::Conflict { .. })),
                        "stale append accepted"
                    );
                } else {
                    let appended = result.unwrap();
                    prop_assert_eq!(appended.last_version, current + count as u64);
                    for v in 1..=count as u64 {
                        model.push((stream.clone(), current + v));
                    }
                    versions.insert(stream, current + count as u64);
                }
            }
            Op::Restart => {
                rt.block_on(store.close()).unwrap();
                drop(store);
                store = open();
            }
        }
        prop_assert_eq!(store.head(), model.len() as u64);
    }
    let all = store.read_all(1, usize::MAX).unwrap();
    let got: Vec<(String, u64)> = all.iter().map(|e| (e.stream.clone(), e.version)).collect();
    prop_assert_eq!(&got, &model);
    for (stream, version) in &versions {
        let events = store.read_stream(stream, 1).unwrap();
        prop_assert_eq!(events.len() as u64, *version);
    }
    let mut prev = GENESIS_HASH;
    for e in &all {
        prop_assert_eq!(e.prev_hash, prev);
        prop_assert_eq!(chain_hash(&prev, &e.encode_record().unwrap()), e.hash);
        prev = e.hash;
    }
    Ok(store)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

    #[test]
    fn the_jetstream_store_behaves_like_an_in_memory_log_across_restarts(ops in proptest::collection::vec(op(), 1..30)) {
        // Goal: the sled model test (tests/core/store.rs), on JetStream: appends, stale
        // writers and restarts; the stream holds exactly what the model accepted.
        let Some(place) = Place::new(Backend::JetStream) else { return Ok(()) };
        let reopen = || place.open();
        let store = model_run(&reopen, ops)?;
        runtime().block_on(store.close()).unwrap();
    }
}
