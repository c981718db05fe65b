//! Journal benchmarks without HTTP: durable appends through the group-commit journal at a given
//! number of appends in flight, and raw sled `apply_batch` + `flush()` at a given batch size
//! (the ceiling the journal is compared with), measured in the same run.

use crate::clock::SystemClock;
use crate::domain::wallet::{Entry, Line, WalletEvent};
use crate::domain::Event;
use crate::events::sled_store::{JournalConfig, SledStore};
use crate::events::{AppendError, EventStore, ExpectedVersion, NewEvent};
use crate::ids::Id;
use crate::metrics::Metrics;
use crate::money::Fen;
use hdrhistogram::Histogram;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct JournalRun {
    pub in_flight: usize,
    pub events: u64,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Mean events per flush over the run.
    pub mean_batch: f64,
    /// Mean flush duration over the run.
    pub mean_flush_ms: f64,
    /// Mean size of a stored record (hash header + format byte + body).
    pub record_bytes: usize,
    /// Appends refused or failed after the warm-up (a full queue excepted): the store was
    /// unavailable, or stopped.
    pub failed: u64,
}

#[derive(Debug, Clone)]
pub struct RawRun {
    pub batch: usize,
    pub records_per_second: f64,
    pub flush_p50_ms: f64,
}

/// A typical small event (a deposit with a realistic order id), as benchmarks and tests append.
pub fn sample_event(n: u64) -> NewEvent {
    let order_id = format!("bench-order-{n}");
    NewEvent {
        event: Event::Wallet(WalletEvent::Credited(Line {
            entry: Entry::Deposit,
            order_id: Id::parse(&order_id).expect("valid id"),
            amount: Fen::new(100),
            balance_after: Fen::new(100 * (n + 1)),
            source: None,
        })),
        correlation_id: order_id,
    }
}

/// Appends one event per request from `in_flight` concurrent appenders (distinct streams, each
/// with optimistic concurrency, as actors do) for `warmup + duration`.
pub fn journal_run(
    dir: &Path,
    in_flight: usize,
    warmup: Duration,
    duration: Duration,
) -> std::io::Result<JournalRun> {
    let metrics = Arc::new(Metrics::new());
    let store = SledStore::open(
        dir,
        JournalConfig::default(),
        Arc::new(SystemClock),
        metrics.clone(),
    )
    .map_err(std::io::Error::other)?;
    let run = drive_appends(store.clone(), &metrics, in_flight, warmup, duration)?;
    let sample: Vec<usize> = store
        .raw_records(1)
        .take(1000)
        .filter_map(|r| r.ok())
        .map(|(_, v)| v.len())
        .collect();
    let record_bytes = sample.iter().sum::<usize>() / sample.len().max(1);
    Ok(JournalRun {
        record_bytes,
        ..run
    })
}

/// The appenders of [`journal_run`] on any store (sled, JetStream): `in_flight` concurrent
/// appenders, one event per append, each on its own stream at its exact version, for
/// `warmup + duration`; only appends started after the warm-up count. The batching figures come
/// from `metrics` (the store's); `record_bytes` is left 0 for the caller. Closes the store.
pub fn drive_appends<S: EventStore>(
    store: Arc<S>,
    metrics: &Metrics,
    in_flight: usize,
    warmup: Duration,
    duration: Duration,
) -> std::io::Result<JournalRun> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (batches_before, events_before, flush_before) = (
        metrics.journal_batch_events.get_sample_count(),
        metrics.journal_batch_events.get_sample_sum(),
        metrics.journal_flush_seconds.get_sample_sum(),
    );
    let (events, failed, latency) = runtime.block_on(async {
        let measure_from = Instant::now() + warmup;
        let until = measure_from + duration;
        let tasks: Vec<_> = (0..in_flight)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let stream = format!("bench:{i}");
                    let mut version = 0;
                    let mut latency =
                        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
                    let (mut events, mut failed) = (0u64, 0u64);
                    while Instant::now() < until {
                        let started = Instant::now();
                        let event = sample_event(version);
                        let ack = match store.append(
                            i as u64 + 1,
                            stream.clone(),
                            ExpectedVersion::Exact(version),
                            vec![event],
                        ) {
                            Ok(ack) => ack,
                            Err(AppendError::Overloaded) => {
                                tokio::task::yield_now().await;
                                continue;
                            }
                            Err(_) => {
                                failed += u64::from(started >= measure_from);
                                tokio::time::sleep(Duration::from_millis(1)).await;
                                continue;
                            }
                        };
                        match ack.await {
                            Ok(appended) => {
                                version = appended.last_version;
                                if started >= measure_from {
                                    events += 1;
                                    let _ = latency
                                        .record((started.elapsed().as_micros() as u64).max(1));
                                }
                            }
                            Err(_) => {
                                // The outcome may be unknown: the stream's version says.
                                failed += u64::from(started >= measure_from);
                                version = store
                                    .read_stream(&stream, 1)
                                    .map_or(version, |e| e.last().map_or(0, |e| e.version));
                            }
                        }
                    }
                    (events, failed, latency)
                })
            })
            .collect();
        let (mut events, mut failed) = (0, 0);
        let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
        for task in tasks {
            if let Ok((n, f, h)) = task.await {
                events += n;
                failed += f;
                let _ = latency.add(&h);
            }
        }
        (events, failed, latency)
    });
    let batches = (metrics.journal_batch_events.get_sample_count() - batches_before).max(1) as f64;
    let mean_batch = (metrics.journal_batch_events.get_sample_sum() - events_before) / batches;
    let mean_flush_ms =
        (metrics.journal_flush_seconds.get_sample_sum() - flush_before) * 1000.0 / batches;
    runtime
        .block_on(store.close())
        .map_err(std::io::Error::other)?;
    Ok(JournalRun {
        in_flight,
        events,
        per_second: events as f64 / duration.as_secs_f64(),
        p50_ms: latency.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: latency.value_at_quantile(0.99) as f64 / 1000.0,
        mean_batch,
        mean_flush_ms,
        record_bytes: 0,
        failed,
    })
}

/// Raw sled: batches of `batch` inserts of `value_bytes` each, `apply_batch` then `flush()`,
/// for `duration`. The ceiling for a journal writing the same records at the same batch size.
/// With `with_index`, each record also gets a 12-byte entry under a stream-like key, as the
/// journal's stream index does: the ceiling for the journal's actual write pattern.
pub fn raw_sled(
    dir: &Path,
    batch: usize,
    value_bytes: usize,
    with_index: bool,
    duration: Duration,
) -> std::io::Result<RawRun> {
    let db = sled::Config::new()
        .path(dir)
        .mode(sled::Mode::HighThroughput)
        .open()
        .map_err(std::io::Error::other)?;
    let tree = db.open_tree("raw").map_err(std::io::Error::other)?;
    let value = vec![0x5au8; value_bytes];
    let mut flushes = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let mut key = 0u64;
    let started = Instant::now();
    while started.elapsed() < duration {
        let mut b = sled::Batch::default();
        for _ in 0..batch {
            key += 1;
            let mut record_key = vec![b'L'];
            record_key.extend_from_slice(&key.to_be_bytes());
            b.insert(record_key, value.as_slice());
            if with_index {
                // Spread like wallet ids: a multiplicative hash over 100k streams.
                let stream = format!("wallet:lg{}", key.wrapping_mul(2_654_435_761) % 100_000);
                let mut index_key = vec![b'S'];
                index_key.extend_from_slice(stream.as_bytes());
                index_key.push(0);
                index_key.extend_from_slice(&(key / 100_000 + 1).to_be_bytes());
                b.insert(index_key, &[0u8; 12][..]);
            }
        }
        tree.apply_batch(b).map_err(std::io::Error::other)?;
        let flush_started = Instant::now();
        db.flush().map_err(std::io::Error::other)?;
        let _ = flushes.record((flush_started.elapsed().as_micros() as u64).max(1));
    }
    Ok(RawRun {
        batch,
        records_per_second: key as f64 / started.elapsed().as_secs_f64(),
        flush_p50_ms: flushes.value_at_quantile(0.5) as f64 / 1000.0,
    })
}
