//! The [`EventStore`] on NATS JetStream (D6, issue 12): the same promises as the sled store,
//! with the log held by a replicated JetStream stream.
//!
//! Mapping:
//! - one JetStream stream per log (`stream`, subjects `<prefix>.>`); its stream sequence *is*
//!   the global sequence (only this log's writer publishes to it, so sequences are contiguous
//!   from 1);
//! - each record is one message on the subject of its entity, `<prefix>.<kind>.<id>` (`wallet:u42`
//!   -> `hb.wallet.u42`; characters outside `[A-Za-z0-9_-]` of the id escaped as `~XX`), so one
//!   entity's history is read with a subject filter, never by scanning the log;
//! - the payload is the stored record, byte for byte as on sled:
//!   `[prev_hash][hash][format][body]`, so the hash chain, `verify` and `export` are the same;
//! - snapshots are derived state: kept in a local sled database beside the node, and copied to
//!   a JetStream key-value bucket (`<stream>_SNAPSHOTS`, same replicas) so that a node with an
//!   empty data directory (a restart elsewhere, a failover) activates an entity from its latest
//!   snapshot instead of replaying its whole history.
//!
//! Group commit: one writer task drains the queued appends (up to `batch_events_max` events),
//! checks each against its stream's version (cache, or the subject's last record), chains
//! and encodes, publishes every record of the batch pipelined, each with the stream's expected
//! last sequence, and acknowledges the appends only after JetStream acknowledged every record.
//! The expected last sequence is the fence: a second writer (a stale process, another node)
//! cannot interleave records; the one that loses gets `WrongLastSequence` and fails stop. Any
//! other failure (the server unreachable, a leader election) leaves the outcome of the batch
//! unknown: its appends are answered `Unavailable` (every command is idempotent by its business
//! id), the writer re-reads the log's head and hash from the stream, and goes on when the
//! server answers again.
//!
//! Reads stop at the durable head (the last sequence acknowledged to this writer).

use super::jetstream::{connect_watched, ConnectError, Disconnects, Durability};
use super::{
    split_stored, AppendAck, AppendError, Appended, Envelope, EventStore, ExpectedVersion, Hash,
    JournalCondition, LiveBatch, NewEvent, RawRecord, StoreError, GENESIS_HASH,
};
use crate::clock::Clock;
use crate::metrics::{stream_kind, Metrics};
use async_nats::jetstream::{self, consumer, context::PublishErrorKind, kv, stream};
use futures::future::BoxFuture;
use futures::StreamExt;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc, oneshot};

/// Batches a live subscriber may fall behind before it reads from the store instead.
const LIVE_BATCHES_MAX: usize = 1024;
/// Pause between attempts to re-read the head after a failed batch.
const RESYNC_RETRY: Duration = Duration::from_millis(200);
/// Longest wait for one read of the log (an ordered consumer's next message).
const READ_WAIT: Duration = Duration::from_secs(10);
/// How long a request to JetStream (an append's acknowledgement, a read) may take before its
/// outcome counts as unknown. Long enough for a loaded server that fsyncs every write, short
/// enough that a client's retry still finds the command's first outcome meaningful.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the log's stream remembers message ids (a resent record within it is dropped).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(10);
/// Messages in one JetStream atomic batch (the server's limit).
const ATOMIC_BATCH_MAX: usize = 1000;

/// A committed atomic batch, as the server acknowledges it.
#[derive(Debug, serde::Deserialize)]
struct BatchAck {
    seq: u64,
    batch: String,
    count: u64,
}

/// Longest a read on behalf of a request may take (see `JetStreamStore::read`).
const READ_TIMEOUT: Duration = Duration::from_secs(3);
/// The header naming the writer incarnation that published a record.
pub const WRITER_HEADER: &str = "Hb-Writer";
/// Records past the expected last sequence that may still be this writer's own late publishes
/// (a few batches at most); beyond this, the stream was written by someone else.
const OWN_LATE_RECORDS_MAX: u64 = 100_000;

/// Where and how the log lives on JetStream.
#[derive(Debug, Clone)]
pub struct JetStreamConfig {
    /// `nats://host:port[,host:port...]`.
    pub url: String,
    /// The JetStream stream holding the log.
    pub stream: String,
    /// The subjects' first token.
    pub subject_prefix: String,
    pub durability: Durability,
    /// Local directory for derived state (snapshots).
    pub local_dir: PathBuf,
    pub batch_events_max: usize,
    pub queue_requests_max: usize,
    pub append_events_max: usize,
    /// Records from which a journal batch is published as one JetStream atomic batch rather
    /// than as pipelined messages (1: always atomic; `usize::MAX`: never).
    pub atomic_batch_min: usize,
    /// Create the log's stream when it does not exist (`serve`); the offline commands only
    /// read a log that exists.
    pub create_stream: bool,
    /// Asked before every batch is published: `false` means this node no longer holds the
    /// right to write the log (a cluster partition whose lease ran out), and the journal fails
    /// stop without publishing. `None`: the only writer by configuration (one node).
    pub write_guard: Option<WriteGuard>,
}

/// Whether this writer may still write (see [`JetStreamConfig::write_guard`]).
#[derive(Clone)]
pub struct WriteGuard(pub Arc<dyn Fn() -> bool + Send + Sync>);

impl WriteGuard {
    pub fn allows(&self) -> bool {
        (self.0)()
    }
}

impl std::fmt::Debug for WriteGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WriteGuard(allows: {})", self.allows())
    }
}

impl JetStreamConfig {
    pub fn new(url: &str, stream: &str, local_dir: PathBuf) -> JetStreamConfig {
        JetStreamConfig {
            url: url.to_owned(),
            stream: stream.to_owned(),
            subject_prefix: "hb".into(),
            durability: Durability::default(),
            local_dir,
            batch_events_max: 1000,
            queue_requests_max: 65_536,
            append_events_max: 1000,
            atomic_batch_min: 24,
            create_stream: true,
            write_guard: None,
        }
    }
}

/// The subject of an entity's records: `<prefix>.<kind>.<escaped id>`.
pub fn subject_of(prefix: &str, stream_id: &str) -> String {
    let (kind, id) = stream_id.split_once(':').unwrap_or(("_", stream_id));
    let mut subject = String::with_capacity(prefix.len() + stream_id.len() + 8);
    subject.push_str(prefix);
    subject.push('.');
    escape_into(&mut subject, kind);
    subject.push('.');
    escape_into(&mut subject, id);
    subject
}

fn escape_into(out: &mut String, token: &str) {
    if token.is_empty() {
        out.push('_');
    }
    for byte in token.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("~{byte:02X}"));
        }
    }
}

/// The key-value bucket for the snapshots of the log `stream`, created with the log's
/// replicas if missing.
async fn snapshot_bucket(
    js: &jetstream::Context,
    stream: &str,
    replicas: usize,
) -> Result<kv::Store, StoreError> {
    let bucket = format!("{stream}_SNAPSHOTS");
    if let Ok(store) = js.get_key_value(&bucket).await {
        return Ok(store);
    }
    js.create_key_value(kv::Config {
        bucket: bucket.clone(),
        description: format!("snapshots of the entities of the log {stream} (derived state)"),
        history: 1,
        num_replicas: replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| StoreError::Io(format!("JetStream: snapshot bucket {bucket}: {e}")))
}

/// Puts a snapshot taken at `version` unless the bucket already holds a later one (a slower
/// node's, or an earlier put that was overtaken), with compare-and-set on the key's revision.
async fn put_if_later(
    bucket: &kv::Store,
    key: &str,
    version: u64,
    value: Vec<u8>,
) -> Result<(), String> {
    for _ in 0..5 {
        let outcome = match bucket.entry(key).await.map_err(|e| e.to_string())? {
            Some(entry) if entry.operation == kv::Operation::Put => {
                let held = entry
                    .value
                    .get(..8)
                    .map_or(0, |v| u64::from_be_bytes(v.try_into().expect("8 bytes")));
                if held >= version {
                    return Ok(());
                }
                bucket
                    .update(key, value.clone().into(), entry.revision)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            _ => bucket
                .create(key, value.clone().into())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        };
        if outcome.is_ok() {
            return Ok(());
        }
    }
    Err("the key kept changing".into())
}

/// A snapshot's key: the stream id made a valid key (`[A-Za-z0-9_-]` kept, the rest `=XX`;
/// the kind and the id joined by a dot), e.g. `wallet:u42` -> `wallet.u42`.
pub fn snapshot_key(stream_id: &str) -> String {
    let (kind, id) = stream_id.split_once(':').unwrap_or(("_", stream_id));
    let escape = |token: &str| -> String {
        if token.is_empty() {
            return "_".into();
        }
        token
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
                    (b as char).to_string()
                } else {
                    format!("={b:02X}")
                }
            })
            .collect()
    };
    format!("{}.{}", escape(kind), escape(id))
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!("JetStream: {e}"))
}

enum JournalMsg {
    Append(AppendRequest),
    Close(oneshot::Sender<()>),
}

struct AppendRequest {
    writer: u64,
    stream: String,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
    reply: oneshot::Sender<Result<Appended, AppendError>>,
}

/// The JetStream-backed [`EventStore`].
pub struct JetStreamStore {
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    stream: stream::Stream,
    prefix: String,
    queue: mpsc::Sender<JournalMsg>,
    head: Arc<AtomicU64>,
    healthy: Arc<AtomicBool>,
    /// Set (before `healthy` is cleared for good) when the journal failed stop.
    stopped: Arc<AtomicBool>,
    live: broadcast::Sender<LiveBatch>,
    state: sled::Db,
    snapshots: sled::Tree,
    client: async_nats::Client,
    /// The snapshot bucket (None for the offline commands, which only read the log).
    shared_snapshots: Option<kv::Store>,
    config: JetStreamConfig,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    incarnation: String,
}

/// The log's head as the stream holds it: last sequence and its record's hash.
async fn read_head(stream: &stream::Stream) -> Result<(u64, Hash), StoreError> {
    let info = stream.get_info().await.map_err(unavailable)?;
    let last = info.state.last_sequence;
    if info.state.messages != last || (last > 0 && info.state.first_sequence != 1) {
        return Err(StoreError::Corrupt(format!(
            "stream {} holds {} messages from seq {} to {last}: a log has no gaps",
            info.config.name, info.state.messages, info.state.first_sequence
        )));
    }
    if last == 0 {
        return Ok((0, GENESIS_HASH));
    }
    let message = stream.get_raw_message(last).await.map_err(unavailable)?;
    let (_, hash, _) = split_stored(&message.payload)?;
    Ok((last, hash))
}

/// The stream really has the replicas the durability rests on: a single unclustered server
/// accepts a stream of three replicas and keeps one copy, and a stream created earlier keeps
/// the replicas it was created with.
async fn check_replicas(stream: &stream::Stream, wanted: usize) -> Result<(), StoreError> {
    let info = stream.get_info().await.map_err(unavailable)?;
    let copies = info
        .cluster
        .as_ref()
        .filter(|c| c.leader.is_some())
        .map_or(1, |c| c.replicas.len() + 1);
    if info.config.num_replicas.max(1) != wanted || copies < wanted {
        let copies_text = if copies == 1 {
            "1 copy".to_owned()
        } else {
            format!("{copies} copies")
        };
        return Err(StoreError::Io(format!(
            "the log's stream {} keeps {copies_text} (created with {} replicas), not the {wanted} the durability rests on: run a cluster of at least {wanted} servers, or state a single synced server with --replicas 1 --single-replica-synced",
            info.config.name, info.config.num_replicas
        )));
    }
    Ok(())
}

impl JetStreamStore {
    /// Connects (refusing unsafe servers and durability), creates the log's stream if it does
    /// not exist (with the configured replicas), recovers the head and starts the writer.
    pub fn open(
        config: JetStreamConfig,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<JetStreamStore>, StoreError> {
        let durability = config
            .durability
            .check()
            .map_err(|e| StoreError::Io(e.to_string()))?;
        std::fs::create_dir_all(&config.local_dir).map_err(|e| StoreError::Io(e.to_string()))?;
        let state = sled::Config::new()
            .path(config.local_dir.join("state"))
            .flush_every_ms(Some(2_000))
            .open()
            .map_err(|e| StoreError::Io(e.to_string()))?;
        let snapshots = state
            .open_tree("snapshots")
            .map_err(|e| StoreError::Io(e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("hongbao-jetstream")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Io(e.to_string()))?;
        let handle = runtime.handle().clone();
        let (url, name, prefix, create) = (
            config.url.clone(),
            config.stream.clone(),
            config.subject_prefix.clone(),
            config.create_stream,
        );
        let opened = run_blocking(&handle, async move {
            let (client, _, disconnects) = connect_watched(&url).await.map_err(|e| match e {
                ConnectError::Refused(refusal) => StoreError::Io(refusal.to_string()),
                other => StoreError::Io(other.to_string()),
            })?;
            let js = jetstream::ContextBuilder::new()
                .timeout(REQUEST_TIMEOUT)
                .build(client);
            let stream = if create {
                let mut stream = js
                    .get_or_create_stream(stream::Config {
                        name: name.clone(),
                        subjects: vec![format!("{prefix}.>")],
                        num_replicas: durability.replicas,
                        storage: stream::StorageType::File,
                        allow_direct: true,
                        allow_atomic_publish: true,
                        // Pipelined records carry their hash as message id (see `publish`);
                        // the server remembers ids this long to drop a resent duplicate.
                        duplicate_window: DUPLICATE_WINDOW,
                        deny_delete: true,
                        deny_purge: true,
                        ..Default::default()
                    })
                    .await
                    .map_err(unavailable)?;
                let info = stream.get_info().await.map_err(unavailable)?;
                if !info.config.allow_atomic_publish {
                    // A log created before atomic batches: allow them (nothing else changes).
                    let mut config = info.config.clone();
                    config.allow_atomic_publish = true;
                    js.update_stream(config).await.map_err(unavailable)?;
                    stream = js.get_stream(&name).await.map_err(unavailable)?;
                }
                stream
            } else {
                js.get_stream(&name).await.map_err(|e| {
                    if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(_)) {
                        StoreError::Io(format!(
                            "no log stream {name} on {url} ({e}): nothing was served there, or [store] stream names another"
                        ))
                    } else {
                        unavailable(e)
                    }
                })?
            };
            check_replicas(&stream, durability.replicas).await?;
            let (last_seq, last_hash) = read_head(&stream).await?;
            let snapshots = if create {
                Some(snapshot_bucket(&js, &name, durability.replicas).await?)
            } else {
                None
            };
            Ok::<_, StoreError>((js, disconnects, stream, snapshots, last_seq, last_hash))
        });
        let (js, disconnects, stream, shared_snapshots, last_seq, last_hash) = match opened {
            Ok(Ok(opened)) => opened,
            Ok(Err(e)) | Err(e) => {
                // Not dropped in place: `open` may run inside another runtime (the server's).
                runtime.shutdown_background();
                return Err(e);
            }
        };
        let client = js.client();
        let (queue, receiver) = mpsc::channel(config.queue_requests_max);
        let head = Arc::new(AtomicU64::new(last_seq));
        let healthy = Arc::new(AtomicBool::new(true));
        let stopped = Arc::new(AtomicBool::new(false));
        let (live, _) = broadcast::channel(LIVE_BATCHES_MAX);
        metrics.log_head_seq.set(last_seq as i64);
        let incarnation = format!("{:032x}", rand::random::<u128>());
        let writer = Writer {
            incarnation: incarnation.clone(),
            js,
            disconnects,
            stream: stream.clone(),
            prefix: config.subject_prefix.clone(),
            receiver,
            next_seq: last_seq + 1,
            last_hash,
            versions: HashMap::new(),
            fenced: super::Fences::default(),
            head: head.clone(),
            healthy: healthy.clone(),
            stopped: stopped.clone(),
            live: live.clone(),
            clock,
            metrics,
            batch_events_max: config.batch_events_max,
            atomic_batch_min: config.atomic_batch_min.max(1),
            write_guard: config.write_guard.clone(),
        };
        let task = handle.spawn(writer.run());
        Ok(Arc::new(JetStreamStore {
            runtime: Mutex::new(Some(runtime)),
            handle,
            stream,
            prefix: config.subject_prefix.clone(),
            queue,
            head,
            healthy,
            stopped,
            live,
            state,
            snapshots,
            shared_snapshots,
            client,
            config,
            writer: Mutex::new(Some(task)),
            incarnation,
        }))
    }

    /// The local database for derived state (views, flow checkpoints, snapshots).
    pub fn state_db(&self) -> &sled::Db {
        &self.state
    }

    fn block<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T, StoreError> {
        run_blocking(&self.handle, work)
    }

    /// A read on behalf of a request (an activation, a projection's catch-up): refused at once
    /// while the log is unreachable, and given up after [`READ_TIMEOUT`], so that a caller on
    /// an HTTP worker thread answers 503 instead of holding the thread.
    fn read<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        if self.condition() == JournalCondition::Recovering {
            return Err(unavailable("the log is unreachable"));
        }
        self.block(async move {
            tokio::time::timeout(READ_TIMEOUT, work)
                .await
                .unwrap_or_else(|_| Err(unavailable("a log read timed out")))
        })?
    }

    /// Records `from_seq..=to_seq` of the log, read with an ordered consumer.
    fn read_range(
        &self,
        filter: Option<String>,
        from_seq: u64,
        to_seq: u64,
    ) -> Result<Vec<Envelope>, StoreError> {
        let stream = self.stream.clone();
        self.read(async move {
            let mut out = Vec::new();
            scan(&stream, filter, from_seq, to_seq, |_, message| {
                out.push(Envelope::decode_stored(&message.payload)?);
                Ok(())
            })
            .await?;
            Ok(out)
        })
    }

    /// The stored records `from_seq..=to_seq` with their subjects, for `verify` and `export`.
    fn raw_range(&self, from_seq: u64, to_seq: u64) -> Result<Vec<RawRecord>, StoreError> {
        let stream = self.stream.clone();
        self.block(async move {
            let mut out = Vec::new();
            scan(&stream, None, from_seq, to_seq, |seq, message| {
                out.push(RawRecord {
                    seq,
                    stored: message.payload.to_vec(),
                    subject: Some(message.subject.to_string()),
                });
                Ok(())
            })
            .await?;
            Ok(out)
        })?
    }

    /// This store's writer incarnation, as its records' `Hb-Writer` header carries it.
    #[doc(hidden)]
    pub fn incarnation(&self) -> &str {
        &self.incarnation
    }

    /// The JetStream stream holding the log (for tests that play a second writer).
    #[doc(hidden)]
    pub fn jetstream_stream(&self) -> &stream::Stream {
        &self.stream
    }
}

/// Versions from which reading a stream's tail first searches where it starts (below, reading
/// the whole history costs less than the search's round trips).
const TAIL_SEARCH_FROM_VERSION: u64 = 64;

/// The smallest stream sequence from which the next record on `subject` has at least
/// `version`, by binary search over sequences with direct gets (log2 of the log's length in
/// round trips). `last_seq` holds a record of `subject` with at least `version`.
async fn first_seq_at_version(
    stream: &stream::Stream,
    subject: &str,
    version: u64,
    last_seq: u64,
) -> Result<u64, StoreError> {
    let (mut low, mut high) = (1, last_seq);
    while low < high {
        let middle = low + (high - low) / 2;
        let next = stream
            .direct_get_next_for_subject(subject, Some(middle))
            .await
            .map_err(unavailable)?;
        if Envelope::decode_stored(&next.payload)?.version >= version {
            high = middle;
        } else {
            low = next.sequence + 1;
        }
    }
    Ok(low)
}

/// Resolves once the client has lost its connection since `disconnects` was last marked seen
/// (or is not connected now), so that a writer waiting for acknowledgements answers 503 at
/// once rather than after the request timeout: the server that was to acknowledge may be gone,
/// though the client is already connected to another (among several servers it reconnects
/// within milliseconds).
async fn disconnected(client: &async_nats::Client, disconnects: &mut Disconnects) {
    let not_connected = async {
        while client.connection_state() == async_nats::connection::State::Connected {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        // An error: the client is gone, nothing more will be acknowledged.
        _ = disconnects.changed() => {}
        () = not_connected => {}
    }
}

/// Visits the messages `from_seq..=to_seq` (of `filter`'s subject, if any) in order, with an
/// ordered consumer, stopping at `to_seq` or at the stream's end.
async fn scan(
    stream: &stream::Stream,
    filter: Option<String>,
    from_seq: u64,
    to_seq: u64,
    mut visit: impl FnMut(u64, &jetstream::Message) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    if from_seq > to_seq {
        return Ok(());
    }
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter.clone().unwrap_or_default(),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from_seq,
            },
            ..Default::default()
        })
        .await
        .map_err(unavailable)?;
    // Ephemeral, but the server keeps it for 30 s after its last use and caps a stream's
    // consumers (1,000 by default): deleted as soon as the read is done.
    let name = consumer.cached_info().name.clone();
    let whole_log = filter.is_none();
    let read = async {
        let mut messages = consumer.messages().await.map_err(unavailable)?;
        let mut next_seq = from_seq;
        loop {
            let next = tokio::time::timeout(READ_WAIT, messages.next())
                .await
                .map_err(|_| unavailable("a log read timed out"))?;
            let Some(message) = next else { break };
            let message = message.map_err(unavailable)?;
            let seq = message.info().map_err(unavailable)?.stream_sequence;
            if seq < next_seq {
                // Redelivered (an ordered consumer that reset itself can start over): seen.
                continue;
            }
            if whole_log && seq != next_seq {
                return Err(unavailable(format!(
                    "a log read skipped from seq {next_seq} to {seq}"
                )));
            }
            if seq > to_seq {
                break;
            }
            next_seq = seq + 1;
            visit(seq, &message)?;
            if seq == to_seq {
                break;
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = stream.delete_consumer(&name).await {
        tracing::debug!(error = %e, consumer = name, "read consumer not deleted; it expires");
    }
    read
}

/// Runs `work` on the store's runtime and waits for it from any thread (an actor's, a test's),
/// like a sled read: the caller blocks briefly, the runtime's threads do the I/O.
fn run_blocking<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = std::sync::mpsc::channel();
    handle.spawn(async move {
        let _ = tx.send(work.await);
    });
    rx.recv().map_err(|_| StoreError::Closed)
}

impl EventStore for JetStreamStore {
    fn append(
        &self,
        writer: u64,
        stream: String,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendAck, AppendError> {
        if events.len() > self.config.append_events_max {
            return Err(AppendError::TooLarge {
                max: self.config.append_events_max,
            });
        }
        match self.condition() {
            JournalCondition::Ready => {}
            JournalCondition::Recovering => {
                return Err(AppendError::Unavailable(
                    "the JetStream log is unreachable; the journal reconnects by itself".into(),
                ))
            }
            JournalCondition::Failed => {
                return Err(AppendError::Unavailable(
                    "the JetStream journal has stopped (fenced by another writer)".into(),
                ))
            }
        }
        let (reply, ack) = oneshot::channel();
        let request = AppendRequest {
            writer,
            stream,
            expected,
            events,
            reply,
        };
        match self.queue.try_send(JournalMsg::Append(request)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => return Err(AppendError::Overloaded),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(AppendError::Unavailable("the journal is closed".into()))
            }
        }
        Ok(Box::pin(async move {
            ack.await
                .map_err(|_| AppendError::Unavailable("the journal stopped".into()))?
        }))
    }

    fn read_stream(&self, stream_id: &str, from_version: u64) -> Result<Vec<Envelope>, StoreError> {
        let head = self.head();
        if head == 0 {
            return Ok(Vec::new());
        }
        let from_version = from_version.max(1);
        let subject = subject_of(&self.prefix, stream_id);
        let stream = self.stream.clone();
        let probe_subject = subject.clone();
        // The subject's last record, then (for a tail after a snapshot) the first sequence
        // from which its records have the version asked for: activation reads only the tail.
        let start = self.read(async move {
            let last = match stream.get_last_raw_message_by_subject(&probe_subject).await {
                Ok(message) => message,
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                    return Ok(None)
                }
                Err(e) => return Err(unavailable(e)),
            };
            let last_version = Envelope::decode_stored(&last.payload)?.version;
            if last_version < from_version {
                return Ok(None);
            }
            let first = if from_version > TAIL_SEARCH_FROM_VERSION {
                first_seq_at_version(&stream, &probe_subject, from_version, last.sequence).await?
            } else {
                1
            };
            Ok(Some((first, last.sequence)))
        })?;
        let Some((first, last)) = start else {
            return Ok(Vec::new());
        };
        let mut events = self.read_range(Some(subject), first, last.min(head))?;
        events.retain(|e| e.stream == stream_id && e.version >= from_version);
        Ok(events)
    }

    fn read_all(&self, from_seq: u64, limit: usize) -> Result<Vec<Arc<Envelope>>, StoreError> {
        let from = from_seq.max(1);
        let to = self
            .head()
            .min(from.saturating_add(limit as u64).saturating_sub(1));
        Ok(self
            .read_range(None, from, to)?
            .into_iter()
            .map(Arc::new)
            .collect())
    }

    fn head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    fn live(&self) -> broadcast::Receiver<LiveBatch> {
        self.live.subscribe()
    }

    /// Locally at once; to the bucket in the background (best effort: the actor does not
    /// wait, and a lost copy only costs another node a replay).
    fn save_snapshot(&self, stream: &str, version: u64, state: &[u8]) -> Result<(), StoreError> {
        super::save_local_snapshot(&self.snapshots, stream, version, state)?;
        if let Some(bucket) = self.shared_snapshots.clone() {
            let key = snapshot_key(stream);
            let mut value = Vec::with_capacity(8 + state.len());
            value.extend_from_slice(&version.to_be_bytes());
            value.extend_from_slice(state);
            self.handle.spawn(async move {
                if let Err(e) = put_if_later(&bucket, &key, version, value).await {
                    tracing::debug!(error = %e, key, "snapshot not copied to the bucket");
                }
            });
        }
        Ok(())
    }

    fn save_snapshot_locally(
        &self,
        stream: &str,
        version: u64,
        state: &[u8],
    ) -> Result<(), StoreError> {
        super::save_local_snapshot(&self.snapshots, stream, version, state)
    }

    /// The later of the local snapshot and the bucket's copy.
    fn load_snapshot(&self, stream: &str) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let local = super::load_local_snapshot(&self.snapshots, stream)?;
        let Some(bucket) = self.shared_snapshots.clone() else {
            return Ok(local);
        };
        let key = snapshot_key(stream);
        let fetched = self.read(async move { bucket.get(key).await.map_err(unavailable) });
        let shared = match fetched {
            Ok(Some(value)) if value.len() > 8 => Some((
                u64::from_be_bytes(value[..8].try_into().expect("8 bytes")),
                value[8..].to_vec(),
            )),
            Ok(_) => None,
            Err(e) => {
                // Derived state: without it, activation replays the stream.
                tracing::debug!(error = %e, stream, "snapshot bucket unreadable");
                None
            }
        };
        Ok(match (local, shared) {
            (Some(l), Some(s)) if s.0 > l.0 => Some(s),
            (None, s) => s,
            (l, _) => l,
        })
    }

    fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    fn condition(&self) -> JournalCondition {
        let connected = self.client.connection_state() == async_nats::connection::State::Connected;
        if self.healthy() && connected {
            JournalCondition::Ready
        } else if self.stopped.load(Ordering::Acquire) {
            JournalCondition::Failed
        } else {
            JournalCondition::Recovering
        }
    }

    fn close(&self) -> BoxFuture<'static, Result<(), StoreError>> {
        let queue = self.queue.clone();
        let task = self.writer.lock().map(|mut t| t.take()).unwrap_or(None);
        let state = self.state.clone();
        let handle = self.handle.clone();
        Box::pin(async move {
            let (done, closed) = oneshot::channel();
            if queue.send(JournalMsg::Close(done)).await.is_ok() {
                let _ = closed.await;
            }
            if let Some(task) = task {
                let _ = run_blocking(&handle, async move {
                    let _ = task.await;
                });
            }
            tokio::task::spawn_blocking(move || state.flush())
                .await
                .map_err(|e| StoreError::Io(e.to_string()))?
                .map(|_| ())
                .map_err(|e| StoreError::Io(e.to_string()))
        })
    }
}

/// Records an offline scan (`verify`, `export`, the audit) reads with one ordered consumer.
const SCAN_CHUNK: u64 = 10_000;

impl super::Log for JetStreamStore {
    fn stored_records(
        &self,
        from_seq: u64,
    ) -> Box<dyn Iterator<Item = Result<RawRecord, StoreError>> + '_> {
        let head = self.head();
        let mut next = from_seq.max(1);
        let mut chunk = std::collections::VecDeque::new();
        Box::new(std::iter::from_fn(move || {
            if chunk.is_empty() && next <= head {
                let to = head.min(next.saturating_add(SCAN_CHUNK - 1));
                match self.raw_range(next, to) {
                    Ok(records) if records.is_empty() => {
                        let missing = next;
                        next = head + 1;
                        return Some(Err(StoreError::Corrupt(format!(
                            "the stream holds no record at seq {missing}, below its head {head}"
                        ))));
                    }
                    Ok(records) => {
                        next = records.last().map_or(to, |r| r.seq) + 1;
                        chunk.extend(records);
                    }
                    Err(e) => {
                        next = head + 1;
                        return Some(Err(e));
                    }
                }
            }
            chunk.pop_front().map(Ok)
        }))
    }

    fn stored_record(&self, seq: u64) -> Result<Option<RawRecord>, StoreError> {
        if seq == 0 || seq > self.head() {
            return Ok(None);
        }
        let stream = self.stream.clone();
        self.block(async move {
            let message = stream.get_raw_message(seq).await.map_err(unavailable)?;
            Ok(Some(RawRecord {
                seq: message.sequence,
                stored: message.payload.to_vec(),
                subject: Some(message.subject.to_string()),
            }))
        })?
    }

    fn subject_of(&self, stream: &str) -> Option<String> {
        Some(subject_of(&self.prefix, stream))
    }

    /// JetStream's index is the subjects: each stream's last record by subject (the read
    /// that activation relies on) must be that stream's last version. Every record's subject
    /// itself is checked by the scan (see [`super::Log::subject_of`]).
    fn check_index(
        &self,
        versions: &HashMap<String, u64>,
    ) -> Result<super::IndexCheck, StoreError> {
        let stream = self.stream.clone();
        let wanted: Vec<(String, String, u64)> = versions
            .iter()
            .map(|(id, version)| (id.clone(), subject_of(&self.prefix, id), *version))
            .collect();
        self.block(async move {
            let mut check = super::IndexCheck::default();
            for (id, subject, version) in wanted {
                check.entries += 1;
                let found = match stream.get_last_raw_message_by_subject(&subject).await {
                    Ok(message) => Envelope::decode_stored(&message.payload)
                        .map(|e| (e.stream, e.version))
                        .ok(),
                    Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => None,
                    Err(e) => return Err(unavailable(e)),
                };
                if found.as_ref() != Some(&(id.clone(), version)) {
                    check.violation = Some(format!(
                        "the last record on subject {subject} is {found:?}, not {id}@{version}"
                    ));
                    break;
                }
            }
            Ok(check)
        })?
    }

    fn state_db(&self) -> &sled::Db {
        &self.state
    }

    fn describe(&self) -> String {
        format!("JetStream: {}", self.config.durability.describe())
    }
}

impl Drop for JetStreamStore {
    fn drop(&mut self) {
        // Not from inside the runtime: let its threads finish in the background.
        if let Some(runtime) = self.runtime.lock().ok().and_then(|mut r| r.take()) {
            runtime.shutdown_background();
        }
    }
}

/// The writer: the only code that publishes to the log's stream.
struct Writer {
    /// Carried by every record this writer publishes (header [`WRITER_HEADER`]).
    incarnation: String,
    js: jetstream::Context,
    /// The client's disconnections: a batch published before one has lost its acknowledgement.
    disconnects: Disconnects,
    stream: stream::Stream,
    prefix: String,
    receiver: mpsc::Receiver<JournalMsg>,
    next_seq: u64,
    last_hash: Hash,
    versions: HashMap<String, u64>,
    fenced: super::Fences,
    head: Arc<AtomicU64>,
    healthy: Arc<AtomicBool>,
    stopped: Arc<AtomicBool>,
    live: broadcast::Sender<LiveBatch>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    batch_events_max: usize,
    atomic_batch_min: usize,
    write_guard: Option<WriteGuard>,
}

/// How a batch ended.
enum Written {
    Ok,
    /// Outcome unknown (server unreachable, a leader election): re-read the head, go on.
    Unknown(String),
    /// The stream's last sequence was not the expected one: another writer appended (this
    /// one must stop), unless the records past `expected_last` are this writer's own late
    /// publishes from a batch whose outcome was unknown.
    Diverged {
        expected_last: u64,
        why: String,
    },
    /// Another writer appended: this one must stop (fencing).
    Fenced(String),
}

impl Writer {
    async fn run(mut self) {
        let mut close = None;
        while close.is_none() {
            let Some(first) = self.receiver.recv().await else {
                break;
            };
            let mut batch = Vec::new();
            let mut events = 0;
            for msg in
                std::iter::once(first).chain(std::iter::from_fn(|| self.receiver.try_recv().ok()))
            {
                match msg {
                    JournalMsg::Append(request) => {
                        events += request.events.len();
                        batch.push(request);
                        if events >= self.batch_events_max {
                            break;
                        }
                    }
                    JournalMsg::Close(done) => {
                        close = Some(done);
                        break;
                    }
                }
            }
            let written = match &self.write_guard {
                Some(guard) if !guard.allows() => {
                    // Nothing of the batch goes out: the lease it was decided under is gone.
                    let why = "this node's lease on the log ran out; it no longer writes it";
                    let replies = batch.into_iter().map(|r| r.reply);
                    // Stopped for good before the first refusal is heard.
                    self.stopped.store(true, Ordering::Release);
                    self.abandon(self.next_seq, self.last_hash, replies, why);
                    Written::Fenced(why.into())
                }
                _ => self.write(batch).await,
            };
            match written {
                Written::Ok | Written::Diverged { .. } => {}
                Written::Unknown(why) => {
                    // Limited: a full store refuses every batch, one line each was a storm.
                    crate::warn_limited!(why, "JetStream batch not confirmed; re-reading the head");
                    self.resync().await;
                }
                Written::Fenced(why) => {
                    tracing::error!(
                        why,
                        "another writer appended to the log; this journal stops (fencing)"
                    );
                    self.stopped.store(true, Ordering::Release);
                    self.healthy.store(false, Ordering::Release);
                    self.receiver.close();
                    while let Ok(msg) = self.receiver.try_recv() {
                        match msg {
                            JournalMsg::Append(r) => {
                                let _ = r.reply.send(Err(AppendError::Unavailable(
                                    "fenced by another writer".into(),
                                )));
                            }
                            JournalMsg::Close(done) => close = Some(done),
                        }
                    }
                    break;
                }
            }
        }
        if let Some(done) = close {
            let _ = done.send(());
        }
    }

    /// Decides what a diverged batch means before any of its appends hears the answer: the
    /// writer's own late publishes (re-read the head, go on) or another writer's records
    /// (fenced: stopped for good, so that a client told 503 already sees `journal_failed`).
    async fn settle(&self, outcome: Written) -> Written {
        let outcome = match outcome {
            Written::Diverged { expected_last, why } => {
                match self.own_records_after(expected_last).await {
                    Ok(true) => Written::Unknown(format!(
                        "{why}: the records after seq {expected_last} are this writer's own late publishes"
                    )),
                    Ok(false) => Written::Fenced(why),
                    Err(e) => {
                        Written::Unknown(format!("{why}; cannot read who wrote past it: {e}"))
                    }
                }
            }
            other => other,
        };
        if matches!(outcome, Written::Fenced(_)) {
            self.healthy.store(false, Ordering::Release);
            self.stopped.store(true, Ordering::Release);
        }
        outcome
    }

    /// After an unconfirmed batch: the stream is the truth. Retries until it answers.
    async fn resync(&mut self) {
        self.healthy.store(false, Ordering::Release);
        loop {
            match read_head(&self.stream).await {
                Ok((last, hash)) => {
                    self.next_seq = last + 1;
                    self.last_hash = hash;
                    self.versions.clear();
                    self.head.store(last, Ordering::Release);
                    self.metrics.log_head_seq.set(last as i64);
                    self.healthy.store(true, Ordering::Release);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "JetStream unreachable; retrying");
                    tokio::time::sleep(RESYNC_RETRY).await;
                }
            }
        }
    }

    /// Whether every record after `expected_last` carries this writer's incarnation: its own
    /// publishes of a batch answered `Unavailable`, which landed after the head was re-read
    /// (the client resends what it buffered once the server is back). Then the chain is still
    /// this writer's and linear (each of those records was fenced by its expected last
    /// sequence), and a resync adopts them; anyone else's record means a second writer.
    async fn own_records_after(&self, expected_last: u64) -> Result<bool, StoreError> {
        let info = self.stream.get_info().await.map_err(unavailable)?;
        let last = info.state.last_sequence;
        if last <= expected_last || last - expected_last > OWN_LATE_RECORDS_MAX {
            return Ok(false);
        }
        let mut own = true;
        scan(&self.stream, None, expected_last + 1, last, |_, message| {
            own &= message
                .headers
                .as_ref()
                .and_then(|h| h.get(WRITER_HEADER))
                .is_some_and(|v| v.as_str() == self.incarnation);
            Ok(())
        })
        .await?;
        Ok(own)
    }

    /// A stream's version: cached, or from its subject's last record. `Ok(None)` when that
    /// record lies beyond `head`, the last sequence this writer knows durable: somebody else
    /// (or a late publish of this writer's own) wrote since.
    async fn version_of(&mut self, stream_id: &str, head: u64) -> Result<Option<u64>, StoreError> {
        if let Some(&version) = self.versions.get(stream_id) {
            return Ok(Some(version));
        }
        let subject = subject_of(&self.prefix, stream_id);
        let version = match self.stream.get_last_raw_message_by_subject(&subject).await {
            Ok(message) if message.sequence > head => return Ok(None),
            Ok(message) => Envelope::decode_stored(&message.payload)?.version,
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => 0,
            Err(e) => return Err(unavailable(e)),
        };
        self.versions.insert(stream_id.to_owned(), version);
        Ok(Some(version))
    }

    async fn write(&mut self, requests: Vec<AppendRequest>) -> Written {
        let now_ms = self.clock.now_ms();
        let mut pending: Vec<(oneshot::Sender<Result<Appended, AppendError>>, Appended)> =
            Vec::new();
        let mut records: Vec<(String, u64, Vec<u8>)> = Vec::new();
        let mut published: Vec<Arc<Envelope>> = Vec::new();
        let (start_seq, start_hash) = (self.next_seq, self.last_hash);
        let mut requests = requests.into_iter();
        while let Some(request) = requests.next() {
            let current = match self.version_of(&request.stream, start_seq - 1).await {
                Ok(Some(v)) => v,
                Ok(None) => {
                    // The log moved past this writer's head: nothing of this batch goes out.
                    let why = format!(
                        "{} has a record past seq {}, this writer's head",
                        request.stream,
                        start_seq - 1
                    );
                    let outcome = self
                        .settle(Written::Diverged {
                            expected_last: start_seq - 1,
                            why: why.clone(),
                        })
                        .await;
                    let replies = std::iter::once(request.reply)
                        .chain(requests.map(|r| r.reply))
                        .chain(pending.into_iter().map(|(reply, _)| reply));
                    self.abandon(start_seq, start_hash, replies, &why);
                    return outcome;
                }
                Err(e) => {
                    let _ = request
                        .reply
                        .send(Err(AppendError::Unavailable(e.to_string())));
                    continue;
                }
            };
            if let Err(conflict) =
                self.fenced
                    .admit(request.writer, &request.stream, request.expected, current)
            {
                self.metrics.journal_conflicts_total.inc();
                let _ = request.reply.send(Err(conflict));
                continue;
            }
            let first_seq = self.next_seq;
            let count = request.events.len() as u64;
            let sealed = super::seal_append(
                &request.stream,
                request.events,
                first_seq,
                current,
                now_ms,
                &mut self.last_hash,
            );
            let subject = subject_of(&self.prefix, &request.stream);
            let envelopes: Vec<Arc<Envelope>> = match sealed {
                Ok(sealed) => sealed
                    .into_iter()
                    .map(|(envelope, stored)| {
                        records.push((subject.clone(), envelope.seq, stored));
                        envelope
                    })
                    .collect(),
                Err(e) => {
                    tracing::error!(error = %e, stream = %request.stream, "cannot encode event");
                    let _ = request
                        .reply
                        .send(Err(AppendError::Unavailable(e.to_string())));
                    continue;
                }
            };
            self.next_seq += count;
            self.versions
                .insert(request.stream.clone(), current + count);
            self.metrics
                .events_appended_total
                .with_label_values(&[stream_kind(&request.stream)])
                .inc_by(count);
            published.extend(envelopes.iter().cloned());
            pending.push((
                request.reply,
                Appended {
                    last_version: current + count,
                    envelopes,
                },
            ));
        }
        if records.is_empty() {
            for (reply, appended) in pending {
                let _ = reply.send(Ok(appended));
            }
            return Written::Ok;
        }
        let started = Instant::now();
        // An atomic batch's commit costs about as much as a couple of dozen separately synced
        // messages, whatever its size (measured: docs/BENCHMARKS.md): small batches go
        // pipelined, large ones atomic.
        let outcome = if records.len() >= self.atomic_batch_min {
            self.publish_atomic(records).await
        } else {
            self.publish(records).await
        };
        match outcome {
            Written::Ok => {}
            failed => {
                // Nothing of this batch is acknowledged; the stream says what landed.
                let outcome = self.settle(failed).await;
                let why = match &outcome {
                    Written::Unknown(why) | Written::Fenced(why) => why.clone(),
                    Written::Ok | Written::Diverged { .. } => String::new(),
                };
                let replies = pending.into_iter().map(|(reply, _)| reply);
                self.abandon(start_seq, start_hash, replies, &why);
                return outcome;
            }
        }
        self.metrics
            .journal_flush_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .journal_batch_events
            .observe(published.len() as f64);
        let head = self.next_seq - 1;
        self.head.store(head, Ordering::Release);
        self.metrics.log_head_seq.set(head as i64);
        let _ = self.live.send(Arc::new(published));
        for (reply, appended) in pending {
            let _ = reply.send(Ok(appended));
        }
        Written::Ok
    }

    /// Gives a batch up: the writer's position goes back to where the batch started, its
    /// cached versions are dropped, and the journal is unhealthy before any of the batch's
    /// appends hears `Unavailable` (a resync makes it healthy again; a fence never does).
    fn abandon(
        &mut self,
        start_seq: u64,
        start_hash: Hash,
        replies: impl Iterator<Item = oneshot::Sender<Result<Appended, AppendError>>>,
        why: &str,
    ) {
        self.next_seq = start_seq;
        self.last_hash = start_hash;
        self.versions.clear();
        self.healthy.store(false, Ordering::Release);
        for reply in replies {
            let _ = reply.send(Err(AppendError::Unavailable(why.to_owned())));
        }
    }

    /// Publishes the batch's records as JetStream atomic batches (ADR-50) of at most
    /// [`ATOMIC_BATCH_MAX`] messages, one after the other: all of a batch's records are stored
    /// or none, the server makes them durable together (one write, one fsync on a server that
    /// syncs every write, one replication round in a cluster), and the batch's first message
    /// carries the expected last sequence that fences it.
    async fn publish_atomic(&self, records: Vec<(String, u64, Vec<u8>)>) -> Written {
        let client = self.js.client();
        let mut disconnects = self.disconnects.clone();
        let mut records = records.into_iter().peekable();
        while records.peek().is_some() {
            // Each atomic batch from here: a disconnection during an earlier one (whose commit
            // was answered) does not make this one's outcome unknown.
            disconnects.borrow_and_update();
            let chunk: Vec<_> = records.by_ref().take(ATOMIC_BATCH_MAX).collect();
            let batch_id = format!("{:032x}", rand::random::<u128>());
            let (count, first_seq) = (chunk.len(), chunk[0].1);
            let last_seq = first_seq + count as u64 - 1;
            let mut commit = None;
            for (i, (subject, seq, stored)) in chunk.into_iter().enumerate() {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(WRITER_HEADER, self.incarnation.as_str());
                headers.insert("Nats-Batch-Id", batch_id.as_str());
                headers.insert("Nats-Batch-Sequence", (i + 1).to_string());
                if i == 0 {
                    headers.insert("Nats-Expected-Last-Sequence", (seq - 1).to_string());
                }
                if i + 1 < count {
                    if let Err(e) = client
                        .publish_with_headers(subject, headers, stored.into())
                        .await
                    {
                        return Written::Unknown(format!("publish of seq {seq}: {e}"));
                    }
                } else {
                    headers.insert("Nats-Batch-Commit", "1");
                    commit = Some(tokio::time::timeout(
                        REQUEST_TIMEOUT,
                        client.request_with_headers(subject, headers, stored.into()),
                    ));
                }
            }
            let commit = commit.expect("a batch has a last record");
            let reply = match tokio::select! {
                reply = commit => reply,
                () = disconnected(&client, &mut disconnects) => {
                    return Written::Unknown(format!(
                        "the connection dropped before the commit of seq {last_seq}"
                    ))
                }
            } {
                Err(_) => return Written::Unknown(format!("commit of seq {last_seq}: timed out")),
                Ok(Err(e)) => return Written::Unknown(format!("commit of seq {last_seq}: {e}")),
                Ok(Ok(reply)) => reply,
            };
            let answer: Result<jetstream::response::Response<BatchAck>, _> =
                serde_json::from_slice(&reply.payload);
            match answer {
                Ok(jetstream::response::Response::Ok(ack))
                    if ack.seq == last_seq
                        && ack.batch == batch_id
                        && ack.count == count as u64 => {}
                Ok(jetstream::response::Response::Ok(ack)) => {
                    return Written::Fenced(format!(
                        "the batch of seq {first_seq}..={last_seq} was stored as {ack:?}"
                    ))
                }
                Ok(jetstream::response::Response::Err { error })
                    if error.error_code() == jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE =>
                {
                    return Written::Diverged {
                        expected_last: first_seq - 1,
                        why: format!(
                            "seq {first_seq}: the stream's last sequence is not {}",
                            first_seq - 1
                        ),
                    }
                }
                Ok(jetstream::response::Response::Err { error }) => {
                    return Written::Unknown(format!(
                        "batch of seq {first_seq}..={last_seq}: {error}"
                    ))
                }
                Err(e) => {
                    return Written::Unknown(format!(
                        "batch of seq {first_seq}..={last_seq}: unreadable answer: {e}"
                    ))
                }
            }
        }
        Written::Ok
    }

    /// Publishes the batch's records pipelined, each fenced by the expected last sequence,
    /// and waits for every acknowledgement.
    ///
    /// The expected last sequence alone would not keep the batch whole: if another writer's
    /// record takes this batch's first sequence, the next record (expecting that sequence as
    /// the last) would be accepted after it and break the chain. So each record is also named
    /// by its hash (`Nats-Msg-Id`) and, after the first, expects the previous record's hash as
    /// the stream's last message id: once one record is refused, every later one is too.
    async fn publish(&self, records: Vec<(String, u64, Vec<u8>)>) -> Written {
        let mut disconnects = self.disconnects.clone();
        disconnects.borrow_and_update();
        let mut acks = Vec::with_capacity(records.len());
        for (i, (subject, seq, stored)) in records.into_iter().enumerate() {
            let (prev_hash, hash) = match split_stored(&stored) {
                Ok((prev, hash, _)) => (prev, hash),
                Err(e) => return Written::Unknown(format!("seq {seq}: {e}")),
            };
            let mut message = jetstream::message::PublishMessage::build()
                .payload(stored.into())
                .header(WRITER_HEADER, self.incarnation.as_str())
                .message_id(hex::encode(hash))
                .expected_last_sequence(seq - 1);
            if i > 0 {
                message = message.expected_last_message_id(hex::encode(prev_hash));
            }
            match self.js.send_publish(subject, message).await {
                Ok(ack) => acks.push((seq, ack)),
                Err(e) => return Written::Unknown(format!("publish of seq {seq}: {e}")),
            }
        }
        let client = self.js.client();
        for (seq, ack) in acks {
            let ack = tokio::select! {
                ack = ack => ack,
                () = disconnected(&client, &mut disconnects) => {
                    return Written::Unknown(format!("the connection dropped before seq {seq}'s ack"))
                }
            };
            match ack {
                Ok(ack) if ack.sequence == seq => {}
                Ok(ack) => {
                    return Written::Fenced(format!(
                        "seq {seq} was stored at stream sequence {}",
                        ack.sequence
                    ))
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        PublishErrorKind::WrongLastSequence | PublishErrorKind::WrongLastMessageId
                    ) =>
                {
                    return Written::Diverged {
                        expected_last: seq - 1,
                        why: format!("seq {seq}: the stream's last sequence is not {}", seq - 1),
                    }
                }
                Err(e) => return Written::Unknown(format!("ack of seq {seq}: {e}")),
            }
        }
        Written::Ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_per_entity_and_ids_made_safe() {
        // Goal: one subject per stream id; dots, colons and wildcards in ids cannot split or
        // widen a subject; distinct ids stay distinct.
        assert_eq!(subject_of("hb", "wallet:u42"), "hb.wallet.u42");
        assert_eq!(subject_of("hb", "coupon-intake:3"), "hb.coupon-intake.3");
        assert_eq!(subject_of("hb", "packet:a.b:c"), "hb.packet.a~2Eb~3Ac");
        assert_eq!(subject_of("hb", "wallet:*>"), "hb.wallet.~2A~3E");
        assert_ne!(
            subject_of("hb", "wallet:a.b"),
            subject_of("hb", "wallet:a~2Eb")
        );
        assert_eq!(subject_of("hb", "plain"), "hb._.plain");
    }

    #[test]
    fn snapshot_keys_are_valid_and_distinct() {
        // Goal: any stream id gives a key of the characters a bucket accepts
        // (`[-/_=.A-Za-z0-9]`), and distinct ids give distinct keys.
        for (id, key) in [
            ("wallet:u42", "wallet.u42"),
            ("packet:a.b:c", "packet.a=2Eb=3Ac"),
            ("wallet:a=2E", "wallet.a=3D2E"),
            ("plain", "_.plain"),
        ] {
            assert_eq!(snapshot_key(id), key);
            assert!(key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b)));
        }
        assert_ne!(snapshot_key("wallet:a.b"), snapshot_key("wallet:a=2Eb"));
    }
}
