//! The journal benchmark on NATS JetStream (issue 12): durable appends through the
//! [`JetStreamStore`] writer, beside raw JetStream publishing measured by the same load
//! generator in the same run, with no hongbao logic:
//!
//! - `raw`: a plain publish loop that keeps `in_flight` publishes outstanding, each awaited for
//!   its PubAck (the figure the journal is compared with, at the same in-flight);
//! - `raw-batch`: the writer's pattern without hongbao: `batch` publishes pipelined, each with the
//!   stream's expected last sequence, then every ack awaited before the next batch (`depth` 1),
//!   or up to `depth` batches outstanding (pipelined across batches);
//! - `raw-atomic`: JetStream atomic batch publish (ADR-50, server 2.12+, stream `allow_atomic`):
//!   `batch` messages, the first with the expected last sequence, the last with
//!   `Nats-Batch-Commit: 1`, up to `depth` batches outstanding.
//!
//! Every stream here is the load generator's own (`HBLG_*`, subjects `hblg*.>`), created fresh
//! per run and deleted afterwards: a log on the same server is never touched. `async_nats` is
//! otherwise used only under `src/events/`; a raw publish loop needs it directly.

use super::journal::{drive_appends, JournalRun};
use crate::clock::SystemClock;
use crate::events::jetstream::{connect, Durability};
use crate::events::jetstream_store::{JetStreamConfig, JetStreamStore};
use crate::metrics::Metrics;
use async_nats::jetstream::{self, message::PublishMessage, stream};
use async_nats::HeaderMap;
use futures::stream::{FuturesOrdered, StreamExt};
use hdrhistogram::Histogram;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a fresh cluster may take to elect the leaders a stream needs.
const READY_WAIT: Duration = Duration::from_secs(30);

/// One raw publishing figure.
#[derive(Debug, Clone)]
pub struct RawPublish {
    pub messages: u64,
    pub per_second: f64,
    /// Latency of one publish (raw) or of one whole batch (raw-batch, raw-atomic).
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Publishes that failed (no ack in time, an error) after the warm-up.
    pub errors: u64,
}

/// A fresh name for the load generator's streams: `HBLG_<tag>_<random>` and `hblg<random>`.
pub fn fresh_names(tag: &str) -> (String, String) {
    let id = hex::encode(rand::random::<[u8; 4]>());
    (format!("HBLG_{tag}_{id}"), format!("hblg{id}"))
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

fn other(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("JetStream: {e}"))
}

async fn context(url: &str) -> std::io::Result<jetstream::Context> {
    let (client, _) = connect(url).await.map_err(other)?;
    Ok(jetstream::new(client))
}

/// Creates `name` (subjects `prefix.>`, file storage, `replicas`), retrying while a fresh
/// cluster elects its leaders, and waits until it really has its replicas.
async fn create_stream(
    js: &jetstream::Context,
    name: &str,
    prefix: &str,
    replicas: usize,
    atomic: bool,
) -> std::io::Result<stream::Stream> {
    let deadline = Instant::now() + READY_WAIT;
    loop {
        let config = stream::Config {
            name: name.to_owned(),
            subjects: vec![format!("{prefix}.>")],
            num_replicas: replicas,
            storage: stream::StorageType::File,
            allow_direct: true,
            allow_atomic_publish: atomic,
            ..Default::default()
        };
        let attempt = async {
            let stream = js.get_or_create_stream(config).await.map_err(other)?;
            let info = stream.get_info().await.map_err(other)?;
            let copies = info
                .cluster
                .as_ref()
                .filter(|c| c.leader.is_some())
                .map_or(1, |c| c.replicas.len() + 1);
            if copies < replicas {
                return Err(other(format!("{copies} of {replicas} replicas so far")));
            }
            Ok(stream)
        };
        match attempt.await {
            Ok(stream) => return Ok(stream),
            Err(e) if Instant::now() >= deadline => {
                return Err(other(format!("no stream {name} after 30 s: {e}")))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Deletes one of the load generator's streams (only `HBLG_*` names), and the snapshot bucket
/// a log on it has beside it, if any.
pub fn delete_stream(url: &str, name: &str) -> std::io::Result<()> {
    assert!(
        name.starts_with("HBLG_"),
        "only the load generator's streams"
    );
    runtime()?.block_on(async {
        let js = context(url).await?;
        js.delete_stream(name).await.map_err(other)?;
        // Absent when nothing opened the stream as a log.
        let _ = js.delete_key_value(format!("{name}_SNAPSHOTS")).await;
        Ok(())
    })
}

/// Waits until the server (or cluster) can hold a stream of `replicas`: a probe stream is
/// created and deleted. Returns the server's version.
pub fn wait_ready(url: &str, replicas: usize) -> std::io::Result<String> {
    runtime()?.block_on(async {
        let (client, version) = connect(url).await.map_err(other)?;
        let js = jetstream::new(client);
        let (name, prefix) = fresh_names("PROBE");
        create_stream(&js, &name, &prefix, replicas, false).await?;
        js.delete_stream(&name).await.map_err(other)?;
        Ok(version.to_string())
    })
}

/// The journal scenario on a fresh log stream of its own: [`drive_appends`] through the
/// [`JetStreamStore`] writer, then the mean stored record size read back; the stream is
/// deleted afterwards.
pub fn journal_run(
    url: &str,
    durability: Durability,
    local_dir: &Path,
    in_flight: usize,
    warmup: Duration,
    duration: Duration,
) -> std::io::Result<JournalRun> {
    let (name, prefix) = fresh_names("JOURNAL");
    let mut config = JetStreamConfig::new(url, &name, local_dir.to_path_buf());
    config.subject_prefix = prefix;
    config.durability = durability;
    let metrics = Arc::new(Metrics::new());
    // A fresh cluster may need a moment before a new stream has a leader and its replicas.
    let deadline = Instant::now() + READY_WAIT;
    let store = loop {
        match JetStreamStore::open(config.clone(), Arc::new(SystemClock), metrics.clone()) {
            Ok(store) => break store,
            Err(e) if Instant::now() >= deadline => return Err(other(e)),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let run = drive_appends(store, &metrics, in_flight, warmup, duration);
    let record_bytes = runtime()?.block_on(async {
        let js = context(url).await?;
        let stream = js.get_stream(&name).await.map_err(other)?;
        let last = stream.get_info().await.map_err(other)?.state.last_sequence;
        let mut total = 0;
        let sample = last.min(200);
        for seq in 1..=sample {
            total += stream
                .get_raw_message(seq)
                .await
                .map_err(other)?
                .payload
                .len();
        }
        js.delete_stream(&name).await.map_err(other)?;
        let _ = js.delete_key_value(format!("{name}_SNAPSHOTS")).await;
        Ok::<_, std::io::Error>(total / sample.max(1) as usize)
    });
    let run = run?;
    Ok(JournalRun {
        record_bytes: record_bytes?,
        ..run
    })
}

fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds")
}

fn micros(since: Instant) -> u64 {
    (since.elapsed().as_micros() as u64).max(1)
}

fn figure(messages: u64, errors: u64, latency: &Histogram<u64>, duration: Duration) -> RawPublish {
    RawPublish {
        messages,
        errors,
        per_second: messages as f64 / duration.as_secs_f64(),
        p50_ms: latency.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: latency.value_at_quantile(0.99) as f64 / 1000.0,
    }
}

/// Raw JetStream: `in_flight` publishers on one connection, each publishing `payload_bytes`
/// to its own subject and awaiting the PubAck before its next publish, for `warmup +
/// duration`; only publishes started after the warm-up count.
pub fn raw_publish(
    url: &str,
    replicas: usize,
    in_flight: usize,
    payload_bytes: usize,
    warmup: Duration,
    duration: Duration,
) -> std::io::Result<RawPublish> {
    let (name, prefix) = fresh_names("RAW");
    let result = runtime()?.block_on(async {
        let js = context(url).await?;
        create_stream(&js, &name, &prefix, replicas, false).await?;
        let payload = vec![0x5au8; payload_bytes];
        let measure_from = Instant::now() + warmup;
        let until = measure_from + duration;
        let tasks: Vec<_> = (0..in_flight)
            .map(|i| {
                let (js, payload) = (js.clone(), payload.clone());
                let subject = format!("{prefix}.bench.{i}");
                tokio::spawn(async move {
                    let mut latency = histogram();
                    let (mut messages, mut errors) = (0u64, 0u64);
                    while Instant::now() < until {
                        let started = Instant::now();
                        let message = PublishMessage::build().payload(payload.clone().into());
                        let acked = match js.send_publish(subject.clone(), message).await {
                            Ok(ack) => ack.await.map(|_| ()).map_err(other),
                            Err(e) => Err(other(e)),
                        };
                        match acked {
                            Ok(()) if started >= measure_from => {
                                messages += 1;
                                let _ = latency.record(micros(started));
                            }
                            Ok(()) => {}
                            Err(_) => {
                                errors += u64::from(started >= measure_from);
                                tokio::time::sleep(Duration::from_millis(1)).await;
                            }
                        }
                    }
                    Ok::<_, std::io::Error>((messages, errors, latency))
                })
            })
            .collect();
        let (mut messages, mut errors, mut latency) = (0, 0, histogram());
        for task in tasks {
            let (n, e, h) = task.await.map_err(other)??;
            messages += n;
            errors += e;
            let _ = latency.add(&h);
        }
        js.delete_stream(&name).await.map_err(other)?;
        Ok(figure(messages, errors, &latency, duration))
    });
    if result.is_err() {
        let _ = delete_stream(url, &name);
    }
    result
}

/// How a batch of records is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchMode {
    /// Pipelined publishes, each with the expected last sequence (the journal writer's way).
    Fenced,
    /// One JetStream atomic batch (ADR-50), the first message with the expected last sequence.
    Atomic,
}

/// Raw batches: `batch` records of `payload_bytes` at a time, published as `mode` says, with up
/// to `depth` batches outstanding (1: every ack of a batch awaited before the next, as the
/// journal writer does), for `duration` (no warm-up: the first batch is as any other). The
/// latency is a whole batch's, from its first publish to its last ack.
pub fn raw_batches(
    url: &str,
    replicas: usize,
    mode: BatchMode,
    batch: usize,
    depth: usize,
    payload_bytes: usize,
    duration: Duration,
) -> std::io::Result<RawPublish> {
    let (name, prefix) = fresh_names(match mode {
        BatchMode::Fenced => "BATCH",
        BatchMode::Atomic => "ATOMIC",
    });
    let batch = batch.clamp(1, 1000);
    let depth = depth.max(1);
    let result = runtime()?.block_on(async {
        let js = context(url).await?;
        create_stream(&js, &name, &prefix, replicas, mode == BatchMode::Atomic).await?;
        let client = js.client();
        let payload = vec![0x5au8; payload_bytes];
        let mut latency = histogram();
        let mut outstanding = FuturesOrdered::new();
        let (mut next_seq, mut committed, mut batch_no) = (1u64, 0u64, 0u64);
        let started = Instant::now();
        loop {
            let running = started.elapsed() < duration;
            if !running || outstanding.len() >= depth {
                match outstanding.next().await {
                    Some(done) => {
                        let (n, at): (u64, Instant) = done?;
                        committed += n;
                        let _ = latency.record(micros(at));
                        continue;
                    }
                    None => break,
                }
            }
            let at = Instant::now();
            let subject = |k: u64| format!("{prefix}.bench.{}", k % 256);
            batch_no += 1;
            let mut acks = Vec::with_capacity(batch);
            match mode {
                BatchMode::Fenced => {
                    for k in 0..batch as u64 {
                        let seq = next_seq + k;
                        let message = PublishMessage::build()
                            .payload(payload.clone().into())
                            .expected_last_sequence(seq - 1);
                        acks.push(
                            js.send_publish(subject(seq), message)
                                .await
                                .map_err(other)?,
                        );
                    }
                }
                BatchMode::Atomic => {
                    let id = format!("hblg-{batch_no}");
                    for k in 1..=batch as u64 {
                        let mut headers = HeaderMap::new();
                        headers.insert("Nats-Batch-Id", id.as_str());
                        headers.insert("Nats-Batch-Sequence", k.to_string());
                        if k == 1 {
                            headers
                                .insert("Nats-Expected-Last-Sequence", (next_seq - 1).to_string());
                        }
                        let to = subject(next_seq + k - 1);
                        if k == batch as u64 {
                            headers.insert("Nats-Batch-Commit", "1");
                            let message = PublishMessage::build()
                                .payload(payload.clone().into())
                                .headers(headers);
                            acks.push(js.send_publish(to, message).await.map_err(other)?);
                        } else {
                            client
                                .publish_with_headers(to, headers, payload.clone().into())
                                .await
                                .map_err(other)?;
                        }
                    }
                }
            }
            let last = next_seq + batch as u64 - 1;
            next_seq = last + 1;
            outstanding.push_back(async move {
                for ack in acks {
                    let ack = ack.await.map_err(other)?;
                    if ack.sequence > last {
                        return Err(other(format!(
                            "stored at {} beyond the batch's last {last}",
                            ack.sequence
                        )));
                    }
                }
                Ok::<_, std::io::Error>((batch as u64, at))
            });
        }
        let elapsed = started.elapsed();
        js.delete_stream(&name).await.map_err(other)?;
        Ok(figure(committed, 0, &latency, elapsed))
    });
    if result.is_err() {
        let _ = delete_stream(url, &name);
    }
    result
}
