//! Criterion benchmarks of the event store: raw sled `apply_batch` + `flush()` at batch sizes
//! 1/16/256/1024 (the ceiling), and durable appends through the group-commit journal at the
//! same numbers of appends in flight. Throughput is reported per event.
//!
//! `cargo bench --bench store` (release build, a few minutes). The figures in
//! docs/BENCHMARKS.md come from this and from `hongbao loadgen journal`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hongbao::clock::SystemClock;
use hongbao::events::sled_store::{JournalConfig, SledStore};
use hongbao::events::{EventStore, ExpectedVersion};
use hongbao::loadgen::journal::sample_event;
use hongbao::metrics::Metrics;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Size of a typical stored record (hash header + format byte + body), measured by loadgen.
const RECORD_BYTES: usize = 170;

fn raw_sled(c: &mut Criterion) {
    let mut group = c.benchmark_group("raw_sled_batch_flush");
    group.measurement_time(Duration::from_secs(5));
    for batch in [1usize, 16, 256, 1024] {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path())
            .mode(sled::Mode::HighThroughput)
            .open()
            .unwrap();
        let tree = db.open_tree("raw").unwrap();
        let value = vec![0x5au8; RECORD_BYTES];
        let mut key = 0u64;
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(BenchmarkId::from_parameter(batch), |b| {
            b.iter(|| {
                let mut writes = sled::Batch::default();
                for _ in 0..batch {
                    key += 1;
                    writes.insert(&key.to_be_bytes(), value.as_slice());
                }
                tree.apply_batch(writes).unwrap();
                db.flush().unwrap();
            })
        });
    }
    group.finish();
}

fn journal(c: &mut Criterion) {
    let mut group = c.benchmark_group("journal_durable_append");
    group.measurement_time(Duration::from_secs(5));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for in_flight in [1usize, 16, 256, 1024] {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(
            dir.path(),
            JournalConfig::default(),
            Arc::new(SystemClock),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        group.throughput(Throughput::Elements(1));
        group.bench_function(BenchmarkId::from_parameter(in_flight), |b| {
            b.iter_custom(|iters| {
                // `iters` appends spread over `in_flight` concurrent appenders.
                runtime.block_on(async {
                    let started = Instant::now();
                    let tasks: Vec<_> = (0..in_flight)
                        .map(|i| {
                            let store = store.clone();
                            let share = iters / in_flight as u64
                                + u64::from((i as u64) < iters % in_flight as u64);
                            tokio::spawn(async move {
                                let stream = format!("bench:{i}");
                                for n in 0..share {
                                    let ack = store
                                        .append(
                                            0,
                                            stream.clone(),
                                            ExpectedVersion::Any,
                                            vec![sample_event(n)],
                                        )
                                        .unwrap();
                                    ack.await.unwrap();
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                    started.elapsed()
                })
            })
        });
        runtime.block_on(store.close()).unwrap();
    }
    group.finish();
}

criterion_group!(benches, raw_sled, journal);
criterion_main!(benches);
