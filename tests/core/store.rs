//! The event store: optimistic concurrency, global order, hash chain, durability across
//! restarts (model test), snapshots, subscriptions, fencing.

use super::{event, open, runtime};
use hongbao::events::sled_store::SledStore;
use hongbao::events::{AppendError, EventStore, ExpectedVersion, Subscription};
use hongbao::verify::verify_log;
use proptest::prelude::*;
use std::sync::Arc;

#[test]
fn expected_version_mismatch_is_a_typed_conflict_and_writes_nothing() {
    // Goal: a stale writer gets Conflict { expected, actual } and the log is unchanged.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let rt = runtime();
    rt.block_on(async {
        let first = store
            .append(
                0,
                "s:a".into(),
                ExpectedVersion::Exact(0),
                vec![event(1), event(2)],
            )
            .unwrap()
            .await
            .unwrap();
        assert_eq!(first.last_version, 2);
        let stale = store
            .append(0, "s:a".into(), ExpectedVersion::Exact(1), vec![event(3)])
            .unwrap()
            .await;
        assert_eq!(
            stale.unwrap_err(),
            AppendError::Conflict {
                stream: "s:a".into(),
                expected: 1,
                actual: 2
            }
        );
        let fresh = store
            .append(0, "s:b".into(), ExpectedVersion::Exact(1), vec![event(3)])
            .unwrap()
            .await;
        assert_eq!(
            fresh.unwrap_err(),
            AppendError::Conflict {
                stream: "s:b".into(),
                expected: 1,
                actual: 0
            }
        );
    });
    assert_eq!(store.head(), 2);
    assert_eq!(store.read_stream("s:a", 1).unwrap().len(), 2);
    assert!(store.read_stream("s:b", 1).unwrap().is_empty());
}

#[test]
fn a_refused_writer_is_fenced_on_that_stream() {
    // Goal: after one refusal, later appends of the same writer to the stream are refused even
    // if their expected version happens to match (they were decided on an undurable state).
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    runtime().block_on(async {
        store
            .append(7, "s:f".into(), ExpectedVersion::Exact(0), vec![event(1)])
            .unwrap()
            .await
            .unwrap();
        // Writer 7 believes the stream is at 5: refused, and fenced.
        assert!(store
            .append(7, "s:f".into(), ExpectedVersion::Exact(5), vec![event(2)])
            .unwrap()
            .await
            .is_err());
        // Its next append matches the real version but must still be refused.
        let fenced = store
            .append(7, "s:f".into(), ExpectedVersion::Exact(1), vec![event(3)])
            .unwrap()
            .await;
        assert!(matches!(fenced, Err(AppendError::Conflict { .. })));
        // Another writer (a fresh incarnation) is not affected.
        let other = store
            .append(8, "s:f".into(), ExpectedVersion::Exact(1), vec![event(4)])
            .unwrap()
            .await;
        assert_eq!(other.unwrap().last_version, 2);
    });
}

#[test]
fn concurrent_appends_get_a_contiguous_global_order_and_per_stream_order() {
    // Goal: many concurrent appenders; seqs are 1..=N without gaps and each stream's versions
    // follow its append order.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let rt = runtime();
    let appenders = 64;
    let per_appender = 50u64;
    rt.block_on(async {
        let tasks: Vec<_> = (0..appenders)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let stream = format!("s:{i}");
                    for v in 0..per_appender {
                        let acked = store
                            .append(
                                i + 1,
                                stream.clone(),
                                ExpectedVersion::Exact(v),
                                vec![event(v)],
                            )
                            .unwrap()
                            .await
                            .unwrap();
                        assert_eq!(acked.last_version, v + 1);
                        assert_eq!(
                            acked.envelopes[0].correlation_id,
                            format!("bench-order-{v}")
                        );
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    let total = appenders * per_appender;
    assert_eq!(store.head(), total);
    let all = store.read_all(1, usize::MAX).unwrap();
    assert_eq!(
        all.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>()
    );
    for i in 0..appenders {
        let stream = store.read_stream(&format!("s:{i}"), 1).unwrap();
        assert_eq!(
            stream.iter().map(|e| e.version).collect::<Vec<_>>(),
            (1..=per_appender).collect::<Vec<_>>()
        );
        assert!(stream.windows(2).all(|w| w[0].seq < w[1].seq));
        assert_eq!(store.read_stream(&format!("s:{i}"), 41).unwrap().len(), 10);
    }
    let report = verify_log(store.as_ref(), |_, _| {}).unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.records, total);
    assert_eq!(report.streams, appenders);
}

#[test]
fn the_hash_chain_links_every_record_and_a_tampered_byte_is_named() {
    // Goal: verify passes on a clean log and names the first tampered sequence.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    runtime().block_on(async {
        for i in 0..20u64 {
            store
                .append(
                    0,
                    format!("s:{}", i % 3),
                    ExpectedVersion::Any,
                    vec![event(i)],
                )
                .unwrap()
                .await
                .unwrap();
        }
    });
    let all = store.read_all(1, 100).unwrap();
    assert_eq!(all[0].prev_hash, hongbao::events::GENESIS_HASH);
    for pair in all.windows(2) {
        assert_eq!(pair[1].prev_hash, pair[0].hash);
    }
    assert!(verify_log(store.as_ref(), |_, _| {}).unwrap().ok());

    // Flip one byte of record 13's body, directly in sled.
    let journal = store.log_db().open_tree("journal").unwrap();
    let mut key = vec![b'L'];
    key.extend_from_slice(&13u64.to_be_bytes());
    let mut value = journal.get(&key).unwrap().unwrap().to_vec();
    let last = value.len() - 1;
    value[last] ^= 0x01;
    journal.insert(&key, value).unwrap();
    let report = verify_log(store.as_ref(), |_, _| {}).unwrap();
    let violation = report.violation.expect("tampering must be detected");
    assert!(violation.contains("seq 13"), "{violation}");
}

#[test]
fn snapshots_round_trip_and_the_latest_wins() {
    // Goal: save/load returns the latest snapshot with its version.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert_eq!(store.load_snapshot("s:x").unwrap(), None);
    store.save_snapshot("s:x", 3, b"three").unwrap();
    store.save_snapshot("s:x", 7, b"seven").unwrap();
    assert_eq!(
        store.load_snapshot("s:x").unwrap(),
        Some((7, b"seven".to_vec()))
    );
}

#[test]
fn a_subscription_delivers_every_event_once_in_order_across_catch_up_and_live() {
    // Goal: a consumer that starts behind, catches up and then follows the live tail sees each
    // sequence exactly once.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    runtime().block_on(async {
        for i in 0..30u64 {
            store
                .append(0, "s:sub".into(), ExpectedVersion::Any, vec![event(i)])
                .unwrap()
                .await
                .unwrap();
        }
        let dyn_store: Arc<dyn EventStore> = store.clone();
        let mut subscription = Subscription::new(dyn_store, 5, 7);
        let writer = {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 30..200u64 {
                    store
                        .append(
                            0,
                            format!("s:{}", i % 5),
                            ExpectedVersion::Any,
                            vec![event(i)],
                        )
                        .unwrap()
                        .await
                        .unwrap();
                }
            })
        };
        let mut seen = Vec::new();
        while seen.len() < 196 {
            let batch =
                tokio::time::timeout(std::time::Duration::from_secs(10), subscription.next())
                    .await
                    .unwrap()
                    .unwrap();
            seen.extend(batch.iter().map(|e| e.seq));
        }
        writer.await.unwrap();
        assert_eq!(seen, (5..=200).collect::<Vec<_>>());
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn the_store_behaves_like_an_in_memory_log_across_restarts(ops in proptest::collection::vec(super::store_contract::op(), 1..40)) {
        // Goal: model test (the contract's, on sled): after any sequence of appends (some
        // stale) and restarts, the store holds exactly what an in-memory model accepted, in
        // the same order, chain intact; and sled's own index agrees (`verify`).
        let dir = tempfile::tempdir().unwrap();
        let reopen = || -> Arc<dyn EventStore> { open(dir.path()) };
        let store = super::store_contract::model_run(&reopen, ops)?;
        runtime().block_on(store.close()).unwrap();
        drop(store);
        let report = verify_log(open(dir.path()).as_ref(), |_, _| ()).unwrap();
        prop_assert!(report.ok(), "verify failed: {:?}", report);
    }
}

#[test]
fn a_hot_stream_gets_one_index_entry_per_batch_and_reads_back_in_order() {
    // Goal: many pipelined appends to one stream, interleaved with other streams, share index
    // entries (runs of seqs) and still read back in version order from any version.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    runtime().block_on(async {
        let mut acks = Vec::new();
        for v in 0..200u64 {
            acks.push(
                store
                    .append(1, "s:hot".into(), ExpectedVersion::Exact(v), vec![event(v)])
                    .unwrap(),
            );
            acks.push(
                store
                    .append(
                        0,
                        format!("s:cold{v}"),
                        ExpectedVersion::Exact(0),
                        vec![event(v)],
                    )
                    .unwrap(),
            );
        }
        for ack in acks {
            ack.await.unwrap();
        }
    });
    let hot = store.read_stream("s:hot", 1).unwrap();
    assert_eq!(
        hot.iter().map(|e| e.version).collect::<Vec<_>>(),
        (1..=200).collect::<Vec<_>>()
    );
    assert!(hot.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(
        store
            .read_stream("s:hot", 150)
            .unwrap()
            .first()
            .map(|e| e.version),
        Some(150)
    );
    let hot_entries = store
        .index_entries()
        .unwrap()
        .filter(|e| e.as_ref().unwrap().0 == "s:hot")
        .count();
    assert!(
        hot_entries < 200,
        "{hot_entries} index entries for 200 appends: not merged"
    );
    assert!(
        store
            .index_entries()
            .unwrap()
            .any(|e| e.unwrap().1.runs.len() > 1),
        "no interleaved runs exercised"
    );
    assert!(verify_log(store.as_ref(), |_, _| ()).unwrap().ok());
}

/// Appends `rounds` events to `s:hot` (from version `from`) interleaved with one event each to
/// `s:<prefix><i>` streams, all pipelined, and waits for every acknowledgement.
fn pipelined(store: &Arc<SledStore>, from: u64, rounds: u64, prefix: &str) {
    runtime().block_on(async {
        let mut acks = Vec::new();
        for v in from..from + rounds {
            acks.push(
                store
                    .append(1, "s:hot".into(), ExpectedVersion::Exact(v), vec![event(v)])
                    .unwrap(),
            );
            acks.push(
                store
                    .append(
                        0,
                        format!("s:{prefix}{v}"),
                        ExpectedVersion::Any,
                        vec![event(v)],
                    )
                    .unwrap(),
            );
        }
        for ack in acks {
            ack.await.unwrap();
        }
    });
}

/// Waits until the indexer has written every durable event's entries.
fn indexed(store: &SledStore) {
    assert!(
        store.wait_indexed(std::time::Duration::from_secs(10)),
        "the indexer did not catch up with the log"
    );
}

/// Versions of `stream` read back from version 1.
fn versions(store: &SledStore, stream: &str) -> Vec<u64> {
    store
        .read_stream(stream, 1)
        .unwrap()
        .iter()
        .map(|e| e.version)
        .collect()
}

#[test]
fn reads_find_the_events_whose_index_entries_the_indexer_has_not_written() {
    // Goal (issue 14): the stream index is written off the journal thread. Until the indexer
    // has written a durable batch's entries, reads (and the writer's version checks) find the
    // events through the entries it has not written yet; once it has, through the tree, with a
    // hot stream's entries of many journal batches merged.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    pipelined(&store, 0, 50, "a");
    indexed(&store);
    store.pause_indexer(true);
    pipelined(&store, 50, 150, "b");
    let index = store.index_db().open_tree("index").unwrap();
    let in_tree = |stream: &str| {
        let mut prefix = vec![b'S'];
        prefix.extend_from_slice(stream.as_bytes());
        prefix.push(0);
        index.scan_prefix(prefix).count()
    };
    assert_eq!(in_tree("s:b60"), 0, "the indexer was paused, yet wrote");
    assert_eq!(versions(&store, "s:hot"), (1..=200).collect::<Vec<_>>());
    assert_eq!(versions(&store, "s:b60"), vec![1]);
    assert_eq!(
        store
            .read_stream("s:hot", 120)
            .unwrap()
            .first()
            .map(|e| e.version),
        Some(120)
    );
    assert_eq!(store.stream_version("s:hot").unwrap(), 200);
    // The writer checks versions against the same view: a stale expectation is refused.
    let stale = runtime().block_on(
        store
            .append(
                2,
                "s:hot".into(),
                ExpectedVersion::Exact(150),
                vec![event(0)],
            )
            .unwrap(),
    );
    assert!(
        matches!(stale, Err(AppendError::Conflict { .. })),
        "{stale:?}"
    );

    store.pause_indexer(false);
    indexed(&store);
    assert_eq!(in_tree("s:b60"), 1);
    assert_eq!(versions(&store, "s:hot"), (1..=200).collect::<Vec<_>>());
    assert!(
        in_tree("s:hot") < 100,
        "{} index entries for 200 appends: the indexer did not merge",
        in_tree("s:hot")
    );
    assert!(verify_log(store.as_ref(), |_, _| ()).unwrap().ok());
}

#[test]
fn an_index_that_lost_what_it_had_not_flushed_is_completed_from_the_log_on_open() {
    // Goal (issue 14): the index is flushed in the background, so a crash can leave it behind
    // the log (at an earlier checkpoint of its own) or without it. Opening the store indexes
    // the records after the index's checkpoint; reads and `verify` find every event.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    pipelined(&store, 0, 40, "a");
    indexed(&store);
    let checkpoint = store.head();
    pipelined(&store, 40, 60, "b");
    indexed(&store);
    let head = store.head();
    runtime().block_on(store.close()).unwrap();
    drop(store);

    // The index as it stood after its write of the first round: the later entries gone, the
    // checkpoint back (what sled may recover of a database it had not flushed).
    {
        let db = open_sled(&dir.path().join("index"));
        let index = db.open_tree("index").unwrap();
        let later: Vec<_> = index
            .scan_prefix([b'S'])
            .map(|e| e.unwrap())
            .filter(|(_, value)| u64::from_be_bytes(value[..8].try_into().unwrap()) > checkpoint)
            .map(|(key, _)| key)
            .collect();
        assert!(later.len() >= 60, "only {} later entries", later.len());
        for key in later {
            index.remove(key).unwrap();
        }
        index.insert(b"C", &checkpoint.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    let store = open(dir.path());
    assert_eq!(store.head(), head);
    assert_eq!(versions(&store, "s:hot"), (1..=100).collect::<Vec<_>>());
    assert_eq!(versions(&store, "s:b70"), vec![1]);
    assert_eq!(versions(&store, "s:a10"), vec![1]);
    let report = verify_log(store.as_ref(), |_, _| ()).unwrap();
    assert!(report.ok(), "{:?}", report.violation);
    runtime().block_on(store.close()).unwrap();
    drop(store);

    // No index at all (lost, or a directory from before the index had a database of its own).
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let store = open(dir.path());
    assert_eq!(versions(&store, "s:hot"), (1..=100).collect::<Vec<_>>());
    assert_eq!(versions(&store, "s:b99"), vec![1]);
    let report = verify_log(store.as_ref(), |_, _| ()).unwrap();
    assert!(report.ok(), "{:?}", report.violation);
    assert_eq!(report.records, head);
}

#[test]
fn the_writer_forgets_versions_only_between_batches_and_a_miss_finds_the_tail() {
    // Goal (review of the indexer): the writer's version cache is cleared when full. Cleared in
    // the middle of a batch, a stream written earlier in that batch was re-read from an index
    // that does not hold the batch before its flush: a false conflict (fails before the fix:
    // "expected 2, actual 1"). A miss between batches, the indexer behind, reads the tail.
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(
        dir.path(),
        hongbao::events::sled_store::JournalConfig {
            version_cache_streams_max: 2,
            ..Default::default()
        },
        Arc::new(hongbao::clock::ManualClock::new(1_000)),
        Arc::new(hongbao::metrics::Metrics::new()),
    )
    .unwrap();
    store.pause_indexer(true);
    let append = |writer, stream: &str, expected| {
        store
            .append(writer, stream.into(), expected, vec![event(0)])
            .unwrap()
    };
    runtime().block_on(async {
        append(1, "s:h", ExpectedVersion::Exact(0)).await.unwrap();
        // One batch of h, n1, n2, h: queued while the flush before it is held.
        let hold = store.hold_next_flush();
        let first = append(0, "s:x", ExpectedVersion::Any);
        assert!(hold.wait_reached(std::time::Duration::from_secs(5)));
        let batch = [
            append(1, "s:h", ExpectedVersion::Exact(1)),
            append(0, "s:n1", ExpectedVersion::Exact(0)),
            append(0, "s:n2", ExpectedVersion::Exact(0)),
            append(1, "s:h", ExpectedVersion::Exact(2)),
        ];
        hold.release();
        first.await.unwrap();
        for ack in batch {
            ack.await.unwrap();
        }
        // The cache, full, is cleared before the next batch: h's version comes from the tail.
        append(1, "s:h", ExpectedVersion::Exact(3)).await.unwrap();
        append(0, "s:y", ExpectedVersion::Any).await.unwrap();
        append(0, "s:z", ExpectedVersion::Any).await.unwrap();
        let stale = append(2, "s:h", ExpectedVersion::Exact(3)).await;
        assert!(
            matches!(stale, Err(AppendError::Conflict { actual: 4, .. })),
            "{stale:?}"
        );
    });
    store.pause_indexer(false);
    assert_eq!(versions(&store, "s:h"), vec![1, 2, 3, 4]);
    assert!(verify_log(store.as_ref(), |_, _| ()).unwrap().ok());
}

#[test]
fn an_indexer_that_cannot_write_stops_the_journal_and_a_restart_indexes_what_it_missed() {
    // Goal (review of the indexer): an indexer that stopped would leave the tail growing for
    // good behind a journal that goes on acknowledging. The journal stops with it (fail-stop,
    // unhealthy); what was acknowledged is read back after a restart.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let append = |store: &SledStore, expected| {
        store
            .append(
                1,
                "s:w".into(),
                ExpectedVersion::Exact(expected),
                vec![event(0)],
            )
            .unwrap()
    };
    runtime().block_on(append(&store, 0)).unwrap();
    indexed(&store);
    store.fail_next_index_write();
    runtime().block_on(append(&store, 1)).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while store.healthy() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(
        !store.healthy(),
        "the store stayed healthy without its indexer"
    );
    let refused = match store.append(1, "s:w".into(), ExpectedVersion::Exact(2), vec![event(0)]) {
        Ok(ack) => runtime().block_on(ack),
        Err(e) => Err(e),
    };
    assert!(
        matches!(refused, Err(AppendError::Unavailable(_))),
        "{refused:?}"
    );
    assert_eq!(versions(&store, "s:w"), vec![1, 2]);
    runtime().block_on(store.close()).unwrap();
    drop(store);
    let store = open(dir.path());
    assert_eq!(versions(&store, "s:w"), vec![1, 2]);
    assert!(verify_log(store.as_ref(), |_, _| ()).unwrap().ok());
}

/// Opens a sled database this process has just closed (sled's I/O pool may hold its lock for
/// a moment).
fn open_sled(path: &std::path::Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match sled::open(path) {
            Ok(db) => return db,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("cannot open {}: {e}", path.display()),
        }
    }
}

#[test]
fn readers_never_see_a_batch_before_its_flush_returns() {
    // Goal (issue 11 item 7): while the journal's flush is held, the batch is already in sled's
    // tree, yet read_all, read_stream (actor activation), raw_records (verify, export) and a
    // subscription stop at the durable head; after the flush they see it.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let rt = runtime();
    rt.block_on(async {
        store
            .append(
                0,
                "s:d".into(),
                ExpectedVersion::Exact(0),
                vec![event(1), event(2)],
            )
            .unwrap()
            .await
            .unwrap();
    });
    let mut subscription = Subscription::new(store.clone(), 1, 100);
    let hold = store.hold_next_flush();
    let ack = store
        .append(
            0,
            "s:d".into(),
            ExpectedVersion::Exact(2),
            vec![event(3), event(4)],
        )
        .unwrap();
    assert!(
        hold.wait_reached(std::time::Duration::from_secs(10)),
        "the writer never reached the held flush"
    );
    assert_eq!(store.head(), 2);
    let seqs = |events: &[Arc<hongbao::events::Envelope>]| -> Vec<u64> {
        events.iter().map(|e| e.seq).collect()
    };
    assert_eq!(seqs(&store.read_all(1, 100).unwrap()), vec![1, 2]);
    assert_eq!(
        store
            .read_stream("s:d", 1)
            .unwrap()
            .iter()
            .map(|e| e.version)
            .collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert!(store.read_stream("s:d", 3).unwrap().is_empty());
    assert_eq!(store.raw_records(1).count(), 2);
    assert_eq!(seqs(&subscription.try_next().unwrap()), vec![1, 2]);
    assert!(subscription.try_next().unwrap().is_empty());

    hold.release();
    let appended = rt.block_on(ack).unwrap();
    assert_eq!(appended.last_version, 4);
    assert_eq!(store.head(), 4);
    assert_eq!(seqs(&subscription.try_next().unwrap()), vec![3, 4]);
    assert_eq!(store.read_stream("s:d", 3).unwrap().len(), 2);
}

#[test]
fn after_a_failed_flush_nothing_beyond_the_head_is_visible_and_a_restart_reuses_the_seqs() {
    // Goal (issue 11 item 7): a flush that fails (a full disk) stops the journal; the refused
    // batch, although applied to sled's tree, is never visible to any reader, and after a
    // restart the next appends take its sequence numbers and continue a valid chain.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let rt = runtime();
    rt.block_on(async {
        store
            .append(
                0,
                "s:f".into(),
                ExpectedVersion::Exact(0),
                vec![event(1), event(2)],
            )
            .unwrap()
            .await
            .unwrap();
    });
    let mut subscription = Subscription::new(store.clone(), 1, 100);
    store.fail_next_flush();
    let refused = rt.block_on(
        store
            .append(
                0,
                "s:f".into(),
                ExpectedVersion::Exact(2),
                vec![event(3), event(4), event(5)],
            )
            .unwrap(),
    );
    assert!(
        matches!(refused, Err(AppendError::Unavailable(_))),
        "{refused:?}"
    );
    assert!(!store.healthy());
    assert_eq!(store.head(), 2);
    assert_eq!(store.read_all(1, 100).unwrap().len(), 2);
    assert_eq!(store.read_all(3, 100).unwrap().len(), 0);
    assert_eq!(store.read_stream("s:f", 1).unwrap().len(), 2);
    assert_eq!(store.raw_records(1).count(), 2);
    assert_eq!(subscription.try_next().unwrap().len(), 2);
    assert!(subscription.try_next().unwrap().is_empty());
    let second_hash = store.read_all(2, 1).unwrap()[0].hash;

    rt.block_on(store.close()).unwrap();
    drop(subscription);
    drop(store);
    let store = open(dir.path());
    assert_eq!(
        store.head(),
        2,
        "the refused batch reached the reopened log"
    );
    let appended = rt
        .block_on(
            store
                .append(0, "s:f".into(), ExpectedVersion::Exact(2), vec![event(6)])
                .unwrap(),
        )
        .unwrap();
    assert_eq!(appended.envelopes[0].seq, 3);
    assert_eq!(appended.envelopes[0].prev_hash, second_hash);
    let report = verify_log(store.as_ref(), |_, _| ()).unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.records, 3);
}

#[test]
fn views_started_while_a_flush_is_held_stop_at_the_durable_head() {
    // Goal (issue 11 item 7, the /readyz report): projections that start (or catch up) while
    // a batch is applied but not flushed apply the durable events only, then the batch once
    // its flush returns; a view is never ahead of the log.
    use hongbao::metrics::Metrics;
    use hongbao::projections::{self, Projections};
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let rt = runtime();
    rt.block_on(async {
        store
            .append(
                0,
                "wallet:v".into(),
                ExpectedVersion::Exact(0),
                vec![event(1), event(2)],
            )
            .unwrap()
            .await
            .unwrap();
    });
    let hold = store.hold_next_flush();
    let ack = store
        .append(
            0,
            "wallet:v".into(),
            ExpectedVersion::Exact(2),
            vec![event(3), event(4)],
        )
        .unwrap();
    assert!(hold.wait_reached(Duration::from_secs(10)));
    let metrics = Arc::new(Metrics::new());
    let views = Projections::start(
        store.clone(),
        store.state_db(),
        projections::all(metrics.clone()),
        metrics,
    )
    .unwrap();
    rt.block_on(async {
        assert!(views.wait_for("wallets", 2, Duration::from_secs(10)).await);
    });
    assert_eq!(
        views.checkpoint("wallets"),
        2,
        "the view passed the durable head"
    );
    hold.release();
    rt.block_on(async {
        ack.await.unwrap();
        assert!(views.wait_for("wallets", 4, Duration::from_secs(10)).await);
        views.stop().await;
    });
}
