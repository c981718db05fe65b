//! The sled event store and its group-commit journal.
//!
//! One thread, the journal writer, owns every write to the log. Appenders (actors, flows) send
//! requests into a bounded queue and await a oneshot acknowledgement. The writer takes the first
//! waiting request, drains whatever else is queued (up to `batch_events_max` events), checks
//! each request's expected version, encodes and hash-chains the accepted events, writes them all
//! with one atomic `apply_batch`, calls `flush()` once, and only then acknowledges every request
//! of the batch and publishes the batch to live subscribers. Throughput therefore grows with
//! concurrency (one flush serves the whole batch) instead of being capped by the flush rate.
//!
//! Layout: the `journal` tree holds the records only, `L` + seq (u64 big endian) -> stored
//! record (`[prev_hash][hash][format][body]`). The stream index (stream + first version -> runs
//! of seqs) is written off the journal thread, into a database of its own, by the indexer of
//! `sled_index.rs`, which says why that keeps every read whole. (A directory written before
//! issue 14 also holds `S`-prefixed index entries in the `journal` tree; nothing reads them.)
//!
//! The log has a sled database of its own (`<data>/log`), so that each journal flush writes the
//! journal and nothing else. Derived state lives in others, flushed by sled in the background
//! and on close: the stream index (`<data>/index`) and the state (`<data>/state`: snapshots,
//! projection views and flow checkpoints).
//!
//! Snapshots live in the `snapshots` tree (`stream -> version (u64 BE) + encoded state`) and are
//! written without a flush: a snapshot lost in a crash only costs a longer replay.
//!
//! Failure policy (fail-stop): if a write or flush fails, the writer cannot know what reached
//! the disk, so it answers every request of that batch and every later one with
//! `Unavailable`, marks the store unhealthy (`/readyz` turns red) and stops. A restart recovers
//! from what sled made durable; nothing unacknowledged was promised.
//!
//! Readers never run ahead of the disk: `apply_batch` makes a batch visible in the tree before
//! `flush()` returns (and a failed flush leaves it visible without ever making it durable), so
//! every read (`read_all`, `read_stream`, `raw_records`) is bounded by `head`, which the writer
//! advances only after the flush succeeded. After a failed flush the writer also removes the
//! batch from the tree (best effort), so that nothing sled flushes later (on drop) can carry a
//! record that was refused: a restart continues the chain from the durable head.

pub use super::sled_index::IndexEntry;
use super::sled_index::{be_u64, io, IndexBatch, StreamIndex};
use super::{
    AppendAck, AppendError, Appended, Envelope, EventStore, ExpectedVersion, Hash, LiveBatch,
    NewEvent, StoreError, GENESIS_HASH,
};
use crate::clock::Clock;
use crate::metrics::{stream_kind, Metrics};
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{broadcast, mpsc, oneshot};

const LOG_PREFIX: u8 = b'L';
/// How long `open` waits for a directory this process just closed to be released by sled's
/// background work before calling it locked.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// Background flush interval of the state database (views, snapshots, checkpoints).
const STATE_FLUSH_INTERVAL_MS: u64 = 2_000;
/// Background flush interval of the stream index (what it had not flushed at a crash is
/// indexed again from the log on open).
const INDEX_FLUSH_INTERVAL_MS: u64 = 1_000;
/// How long `verify` and the tests wait for the indexer to write what the journal made durable.
const INDEX_SETTLE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
/// Batches a live subscriber may fall behind before it reads from the store instead.
const LIVE_BATCHES_MAX: usize = 1024;

/// Journal tuning, from the `[journal]` config section.
#[derive(Debug, Clone, Copy)]
pub struct JournalConfig {
    /// Most events written with one flush.
    pub batch_events_max: usize,
    /// Most append requests waiting for the writer; appenders wait beyond that (backpressure).
    pub queue_requests_max: usize,
    /// Most events one append may carry.
    pub append_events_max: usize,
    /// sled page cache size.
    pub cache_bytes: u64,
    /// Streams whose versions the writer keeps in memory before it forgets them all, between
    /// two batches (they are re-read from the index on demand): bounds the writer's memory on
    /// campaigns with many users. Not in the config file; small in tests.
    pub version_cache_streams_max: usize,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            batch_events_max: 4096,
            queue_requests_max: 65_536,
            append_events_max: 1024,
            cache_bytes: 256 * 1024 * 1024,
            version_cache_streams_max: 1_000_000,
        }
    }
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

/// The sled-backed [`EventStore`].
pub struct SledStore {
    db: sled::Db,
    state: sled::Db,
    journal: sled::Tree,
    index: Arc<StreamIndex>,
    snapshots: sled::Tree,
    queue: mpsc::Sender<JournalMsg>,
    head: Arc<AtomicU64>,
    healthy: Arc<AtomicBool>,
    live: broadcast::Sender<LiveBatch>,
    metrics: Arc<Metrics>,
    config: JournalConfig,
    /// The journal writer's thread, then the indexer's (which ends once the writer has).
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    fault: Arc<FlushFault>,
}

/// Test seam: what the journal writer does at its next flush, armed by
/// [`SledStore::hold_next_flush`] or [`SledStore::fail_next_flush`]. Unarmed it costs one
/// relaxed atomic load per batch. Issue 15 replaces it with failpoints behind a feature.
#[derive(Default)]
struct FlushFault {
    armed: AtomicBool,
    mode: Mutex<Option<FaultMode>>,
}

enum FaultMode {
    /// Signal `reached` once the batch is applied (visible in the tree, not flushed), then wait
    /// for `release` before flushing.
    Hold {
        reached: std::sync::mpsc::Sender<()>,
        release: std::sync::mpsc::Receiver<()>,
    },
    /// Report the flush as failed (the batch is applied, never flushed).
    Fail,
}

impl FlushFault {
    fn take(&self) -> Option<FaultMode> {
        if !self.armed.load(Ordering::Relaxed) {
            return None;
        }
        self.armed.store(false, Ordering::Relaxed);
        self.mode.lock().ok()?.take()
    }

    fn arm(&self, mode: FaultMode) {
        if let Ok(mut slot) = self.mode.lock() {
            *slot = Some(mode);
        }
        self.armed.store(true, Ordering::Relaxed);
    }
}

/// A flush held by [`SledStore::hold_next_flush`]: the writer has applied (or will apply) the
/// next batch and waits for [`FlushHold::release`] (or the drop of this value) to flush it.
pub struct FlushHold {
    reached: std::sync::mpsc::Receiver<()>,
    release: Option<std::sync::mpsc::Sender<()>>,
}

impl FlushHold {
    /// Waits until the writer holds a batch that is applied but not flushed. False on timeout.
    pub fn wait_reached(&self, timeout: std::time::Duration) -> bool {
        self.reached.recv_timeout(timeout).is_ok()
    }

    /// Lets the writer flush.
    pub fn release(mut self) {
        self.release.take();
    }
}

impl Drop for FlushHold {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            let _ = release.send(());
        }
    }
}

fn log_key(seq: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = LOG_PREFIX;
    key[1..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// Opens a sled database of this node (`dir` names it in a refusal). sled runs I/O on a
/// process-wide thread pool: right after this process closed the same database, work queued
/// there may still hold it (and its file lock) for a moment under load. That is waited out,
/// `LOCK_WAIT` at most; another process holding the directory is still refused, only that
/// much later.
pub(crate) fn open_waiting_for_lock(
    config: &sled::Config,
    dir: &Path,
) -> Result<sled::Db, StoreError> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match config.open() {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(ref e))
                if e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("lock") =>
            {
                if Instant::now() >= deadline {
                    return Err(StoreError::Locked(dir.display().to_string()));
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(other) => return Err(io(other)),
        }
    }
}

impl SledStore {
    /// Opens (or creates) the log in `dir` and starts the journal writer.
    pub fn open(
        dir: &Path,
        config: JournalConfig,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<SledStore>, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Io(e.to_string()))?;
        let open = |name: &str, cache_bytes: u64, flush_every_ms: Option<u64>| {
            open_waiting_for_lock(
                &sled::Config::new()
                    .path(dir.join(name))
                    .cache_capacity(cache_bytes)
                    .mode(sled::Mode::HighThroughput)
                    .flush_every_ms(flush_every_ms),
                dir,
            )
        };
        // The log is flushed by the journal itself, batch by batch: no background flusher.
        // It shares the configured cache with the stream index (the log's reads are mostly
        // sequential; activations read the index, then a few records).
        let db = open("log", config.cache_bytes / 2, None)?;
        let index_db = open(
            "index",
            config.cache_bytes / 2,
            Some(INDEX_FLUSH_INTERVAL_MS),
        )?;
        // Derived state: flushed in the background, seldom (a crash costs replay, not data).
        let state = open("state", config.cache_bytes, Some(STATE_FLUSH_INTERVAL_MS))?;
        let journal = db.open_tree("journal").map_err(io)?;
        let snapshots = state.open_tree("snapshots").map_err(io)?;

        // Recover the tail of the chain: the last record's sequence and hash.
        let (last_seq, last_hash) = match journal.range(log_key(0)..=log_key(u64::MAX)).next_back()
        {
            None => (0, GENESIS_HASH),
            Some(entry) => {
                let (key, value) = entry.map_err(io)?;
                let envelope = Envelope::decode_stored(&value)?;
                if be_u64(&key[1..])? != envelope.seq {
                    return Err(StoreError::Corrupt(format!(
                        "record under key {} says seq {}",
                        be_u64(&key[1..])?,
                        envelope.seq
                    )));
                }
                (envelope.seq, envelope.hash)
            }
        };

        // What the index had not written (or sled not flushed) before a crash, from the log.
        let index = Arc::new(StreamIndex::open(index_db, last_seq, |from| {
            journal
                .range(log_key(from)..=log_key(u64::MAX))
                .map(|entry| {
                    let (key, value) = entry.map_err(io)?;
                    Ok((be_u64(&key[1..])?, value))
                })
        })?);

        let (queue, receiver) = mpsc::channel(config.queue_requests_max);
        let head = Arc::new(AtomicU64::new(last_seq));
        let healthy = Arc::new(AtomicBool::new(true));
        let (live, _) = broadcast::channel(LIVE_BATCHES_MAX);
        let fault = Arc::new(FlushFault::default());
        metrics.log_head_seq.set(last_seq as i64);
        metrics.index_lag_events.set(0);

        let (to_indexer, indexer_queue) = std::sync::mpsc::channel();
        let indexer = index
            .spawn_indexer(
                indexer_queue,
                head.clone(),
                healthy.clone(),
                metrics.clone(),
            )
            .map_err(|e| StoreError::Io(e.to_string()))?;
        let writer = Writer {
            db: db.clone(),
            journal: journal.clone(),
            index: index.clone(),
            to_indexer,
            receiver,
            next_seq: last_seq + 1,
            last_hash,
            versions: HashMap::new(),
            fenced: super::Fences::default(),
            head: head.clone(),
            healthy: healthy.clone(),
            live: live.clone(),
            clock,
            metrics: metrics.clone(),
            config,
            fault: fault.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("hongbao-journal".into())
            .spawn(move || writer.run())
            .map_err(|e| StoreError::Io(e.to_string()))?;

        Ok(Arc::new(SledStore {
            db,
            state,
            journal,
            index,
            snapshots,
            queue,
            head,
            healthy,
            live,
            metrics,
            config,
            threads: Mutex::new(vec![handle, indexer]),
            fault,
        }))
    }

    /// Test seam: the writer's next flush waits, after the batch is applied to the tree, until
    /// the returned hold is released or dropped. For tests of readers against the durable head.
    #[doc(hidden)]
    pub fn hold_next_flush(&self) -> FlushHold {
        let (reached_tx, reached) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel();
        self.fault.arm(FaultMode::Hold {
            reached: reached_tx,
            release: release_rx,
        });
        FlushHold {
            reached,
            release: Some(release),
        }
    }

    /// Test seam: the writer's next flush fails (after the batch is applied to the tree), as
    /// on a full disk; the journal stops (fail-stop).
    #[doc(hidden)]
    pub fn fail_next_flush(&self) {
        self.fault.arm(FaultMode::Fail);
    }

    /// The log's database (journal only): flushed by every journal batch.
    pub fn log_db(&self) -> &sled::Db {
        &self.db
    }

    /// The state database beside the log: snapshots, projection views, flow checkpoints.
    /// Derived data, so it is not flushed with the journal (each journal flush writes only the
    /// log); sled flushes it in the background and on close.
    pub fn state_db(&self) -> &sled::Db {
        &self.state
    }

    /// A stream's last durable version according to the index (its tree and its tail).
    pub fn stream_version(&self, stream: &str) -> Result<u64, StoreError> {
        self.index.version(stream)
    }

    /// The stream index's database (derived from the log, flushed in the background).
    pub fn index_db(&self) -> &sled::Db {
        self.index.db()
    }

    /// Waits until the indexer has written the entries of every event durable now. False if
    /// it has not within `timeout` (it stopped, or lags that far).
    pub fn wait_indexed(&self, timeout: std::time::Duration) -> bool {
        use super::EventStore;
        self.index.wait_indexed(self.head(), timeout)
    }

    /// Test seam: while paused, the indexer writes nothing and reads are served from the
    /// entries it has not written (the tail).
    #[doc(hidden)]
    pub fn pause_indexer(&self, paused: bool) {
        self.index.pause(paused);
    }

    /// Test seam: the indexer's next write fails, as on a full disk; the indexer stops, and
    /// the journal with it (fail-stop).
    #[doc(hidden)]
    pub fn fail_next_index_write(&self) {
        self.index.fail_next_write();
    }

    /// Every index entry of every stream, with its stream, once the indexer has written every
    /// durable event's; for `hongbao verify`. An error if it has not within a minute.
    pub fn index_entries(
        &self,
    ) -> Result<impl Iterator<Item = Result<(String, IndexEntry), StoreError>> + '_, StoreError>
    {
        if !self.wait_indexed(INDEX_SETTLE_WAIT) {
            return Err(StoreError::Io(format!(
                "the stream indexer has not caught up with the log within {} s",
                INDEX_SETTLE_WAIT.as_secs()
            )));
        }
        Ok(self.index.tree_entries())
    }

    /// Raw stored records from `from_seq` on, for verification and export (no decoding).
    /// Bounded by the durable head, like every read.
    pub fn raw_records(
        &self,
        from_seq: u64,
    ) -> impl Iterator<Item = Result<(u64, sled::IVec), StoreError>> + '_ {
        use super::EventStore;
        let head = self.head();
        self.journal
            .range(log_key(from_seq)..=log_key(u64::MAX))
            .map(|entry| {
                let (key, value) = entry.map_err(io)?;
                Ok((be_u64(&key[1..])?, value))
            })
            .take_while(move |record| !matches!(record, Ok((seq, _)) if *seq > head))
    }
}

impl super::Log for SledStore {
    fn stored_records(
        &self,
        from_seq: u64,
    ) -> Box<dyn Iterator<Item = Result<super::RawRecord, StoreError>> + '_> {
        Box::new(self.raw_records(from_seq).map(|record| {
            record.map(|(seq, stored)| super::RawRecord {
                seq,
                stored: stored.to_vec(),
                subject: None,
            })
        }))
    }

    /// The stream index: contiguous per stream, pointing at the right records, covering all
    /// of them.
    fn check_index(
        &self,
        versions: &HashMap<String, u64>,
    ) -> Result<super::IndexCheck, StoreError> {
        let mut check = super::IndexCheck::default();
        let mut indexed: HashMap<String, u64> = HashMap::new();
        for entry in self.index_entries()? {
            let (stream, entry) = entry?;
            check.entries += 1;
            let covered = indexed.entry(stream.clone()).or_insert(0);
            if entry.first_version != *covered + 1 {
                check.violation = Some(format!(
                    "index of {stream} jumps from version {covered} to {}",
                    entry.first_version
                ));
                return Ok(check);
            }
            for (seq, version) in entry.positions() {
                let stored = self.raw_records(seq).next().transpose()?;
                let holds = match &stored {
                    Some((at, bytes)) if *at == seq => Envelope::decode_stored(bytes)
                        .map(|e| e.stream == stream && e.version == version)
                        .unwrap_or(false),
                    _ => false,
                };
                if !holds {
                    check.violation = Some(format!(
                        "index says {stream}@{version} is at seq {seq}, the log disagrees"
                    ));
                    return Ok(check);
                }
            }
            *covered = entry.last_version();
        }
        if &indexed != versions {
            let missing = versions
                .iter()
                .find(|(s, v)| indexed.get(*s) != Some(v))
                .map(|(s, v)| {
                    format!(
                        "{s} has {v} events in the log, {} indexed",
                        indexed.get(s).copied().unwrap_or(0)
                    )
                })
                .unwrap_or_else(|| "the index names streams the log does not hold".into());
            check.violation = Some(format!("index incomplete: {missing}"));
        }
        Ok(check)
    }

    fn state_db(&self) -> &sled::Db {
        &self.state
    }

    fn describe(&self) -> String {
        "sled: each batch flushed before it is acknowledged".into()
    }
}

impl EventStore for SledStore {
    /// One writer, batches in submission order, fail-stop on any failed write or flush.
    fn in_order_fail_stop(&self) -> bool {
        true
    }

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
        let started = Instant::now();
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
        let latency = self.metrics.journal_append_seconds.clone();
        Ok(Box::pin(async move {
            let result = ack
                .await
                .map_err(|_| AppendError::Unavailable("the journal stopped".into()))?;
            latency.observe(started.elapsed().as_secs_f64());
            result
        }))
    }

    fn read_stream(&self, stream: &str, from_version: u64) -> Result<Vec<Envelope>, StoreError> {
        // Bounded by the durable head (see `read_all`): an actor activated while a batch of its
        // stream is being flushed must not start from a state that may never become durable.
        let head = self.head();
        let from_version = from_version.max(1);
        let positions = self.index.positions_from(stream, from_version)?;
        let mut out = Vec::with_capacity(positions.len());
        // Point reads, not a range: sled's range iterator clones each leaf it enters, which
        // made activations (a stream's few records) a fifth of all CPU under spread load.
        for (seq, version) in positions {
            if seq > head {
                break;
            }
            let stored = self.journal.get(log_key(seq)).map_err(io)?.ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "index says {stream}@{version} at seq {seq}, the log has no such record"
                ))
            })?;
            let envelope = Envelope::decode_stored(&stored)?;
            // Pair assertion: the index and the record agree.
            if envelope.seq != seq || envelope.stream != stream || envelope.version != version {
                return Err(StoreError::Corrupt(format!(
                    "index says {stream}@{version} at seq {seq}, record {} says {}@{}",
                    envelope.seq, envelope.stream, envelope.version
                )));
            }
            out.push(envelope);
        }
        Ok(out)
    }

    fn read_all(&self, from_seq: u64, limit: usize) -> Result<Vec<Arc<Envelope>>, StoreError> {
        // Bounded by the durable head: the tree may hold a batch whose flush has not returned.
        let head = self.head();
        let from_seq = from_seq.max(1);
        if from_seq > head {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(limit.min(4096));
        for record in self
            .journal
            .range(log_key(from_seq)..=log_key(head))
            .take(limit)
        {
            let (_, value) = record.map_err(io)?;
            out.push(Arc::new(Envelope::decode_stored(&value)?));
        }
        Ok(out)
    }

    fn head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    fn live(&self) -> broadcast::Receiver<LiveBatch> {
        self.live.subscribe()
    }

    fn save_snapshot(&self, stream: &str, version: u64, state: &[u8]) -> Result<(), StoreError> {
        super::save_local_snapshot(&self.snapshots, stream, version, state)
    }

    fn load_snapshot(&self, stream: &str) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        super::load_local_snapshot(&self.snapshots, stream)
    }

    fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    fn close(&self) -> BoxFuture<'static, Result<(), StoreError>> {
        let queue = self.queue.clone();
        let threads = self
            .threads
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        let state = self.state.clone();
        Box::pin(async move {
            let (done, closed) = oneshot::channel();
            if queue.send(JournalMsg::Close(done)).await.is_ok() {
                let _ = closed.await;
            }
            // The writer, then the indexer (which writes what the writer handed over, flushes
            // the index and ends once the writer's sender is gone).
            for handle in threads {
                let _ = tokio::task::spawn_blocking(move || handle.join()).await;
            }
            // Snapshots, views and checkpoints written since sled's last background flush. Not
            // `flush_async`: sled 0.34's can deadlock when several run at once (sled#1308).
            tokio::task::spawn_blocking(move || state.flush())
                .await
                .map_err(|e| StoreError::Io(e.to_string()))?
                .map(|_| ())
                .map_err(io)
        })
    }
}

/// The journal writer: the only code that writes the log.
struct Writer {
    db: sled::Db,
    journal: sled::Tree,
    /// Read on a version cache miss; its tail takes each durable batch's entries.
    index: Arc<StreamIndex>,
    /// Each durable batch's index entries, for the indexer thread.
    to_indexer: std::sync::mpsc::Sender<IndexBatch>,
    receiver: mpsc::Receiver<JournalMsg>,
    next_seq: u64,
    last_hash: Hash,
    /// Last version of recently written streams; authoritative for streams it holds because
    /// this thread is the only writer.
    versions: HashMap<String, u64>,
    /// Writers one of whose appends to a stream was refused: their later appends to it are too.
    fenced: super::Fences,
    head: Arc<AtomicU64>,
    healthy: Arc<AtomicBool>,
    live: broadcast::Sender<LiveBatch>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    config: JournalConfig,
    fault: Arc<FlushFault>,
}

/// A request of the current batch whose events were accepted, waiting for the flush.
struct Pending {
    reply: oneshot::Sender<Result<Appended, AppendError>>,
    appended: Appended,
}

impl Writer {
    fn run(mut self) {
        let mut batch = Vec::new();
        let mut close = None;
        while close.is_none() {
            let Some(first) = self.receiver.blocking_recv() else {
                break;
            };
            let mut events = 0;
            for msg in
                std::iter::once(first).chain(std::iter::from_fn(|| self.receiver.try_recv().ok()))
            {
                match msg {
                    JournalMsg::Append(request) => {
                        events += request.events.len();
                        batch.push(request);
                        if events >= self.config.batch_events_max {
                            break;
                        }
                    }
                    JournalMsg::Close(done) => {
                        close = Some(done);
                        break;
                    }
                }
            }
            // The indexer gone (a failed write, a panic) would leave the tail to grow without
            // bound: the journal stops as on a failed flush (fail-stop; a restart indexes from
            // the index's checkpoint).
            if !self.index.throttle(self.next_seq - 1, &self.metrics) {
                let why = self.index.stop_reason();
                tracing::error!(%why, "the stream indexer has stopped; stopping the journal (fail-stop)");
                for request in std::mem::take(&mut batch) {
                    let _ = request.reply.send(Err(AppendError::Unavailable(format!(
                        "the stream indexer has stopped: {why}"
                    ))));
                }
                self.fail_remaining();
                break;
            }
            if !self.write(std::mem::take(&mut batch)) {
                self.fail_remaining();
                break;
            }
        }
        let _ = self.db.flush();
        drop(self.db);
        if let Some(done) = close {
            let _ = done.send(());
        }
    }

    /// The version of `stream` as the writer knows it.
    /// The version of a stream this batch has written is in the cache: it is forgotten only
    /// between batches (`write`), since the index learns of a batch only after its flush.
    fn version_of(&mut self, stream: &str) -> Result<u64, StoreError> {
        if let Some(&version) = self.versions.get(stream) {
            return Ok(version);
        }
        let version = self.index.version(stream)?;
        self.versions.insert(stream.to_owned(), version);
        Ok(version)
    }

    /// Writes one batch. Returns false if the store must stop (fail-stop).
    fn write(&mut self, requests: Vec<AppendRequest>) -> bool {
        // Forgotten here, never in the middle of a batch: a stream written earlier in this batch
        // would be re-read from an index that does not hold the batch yet (a false conflict for
        // `Exact`, a version given twice for `Any`).
        if self.versions.len() >= self.config.version_cache_streams_max {
            self.versions.clear();
        }
        let now_ms = self.clock.now_ms();
        let mut batch = sled::Batch::default();
        // Removes what `batch` inserts: applied if the flush fails (see `write`'s end).
        let mut undo = sled::Batch::default();
        let mut pending: Vec<Pending> = Vec::with_capacity(requests.len());
        let mut published: Vec<Arc<Envelope>> = Vec::new();
        let mut index: HashMap<String, IndexEntry> = HashMap::new();
        for request in requests {
            let current = match self.version_of(&request.stream) {
                Ok(v) => v,
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
            if request.events.is_empty() {
                let appended = Appended {
                    last_version: current,
                    envelopes: Vec::new(),
                };
                pending.push(Pending {
                    reply: request.reply,
                    appended,
                });
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
            let envelopes: Vec<Arc<Envelope>> = match sealed {
                Ok(sealed) => sealed
                    .into_iter()
                    .map(|(envelope, stored)| {
                        batch.insert(&log_key(envelope.seq), stored);
                        undo.remove(&log_key(envelope.seq));
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
            // One index entry per stream per batch: a hot stream's many appends in one batch
            // cost one index write, not one each.
            index
                .entry(request.stream.clone())
                .or_insert_with(|| IndexEntry {
                    first_version: current + 1,
                    runs: Vec::new(),
                })
                .push_run(first_seq, count);
            self.next_seq += count;
            self.versions
                .insert(request.stream.clone(), current + count);
            self.metrics
                .events_appended_total
                .with_label_values(&[stream_kind(&request.stream)])
                .inc_by(count);
            published.extend(envelopes.iter().cloned());
            let appended = Appended {
                last_version: current + count,
                envelopes,
            };
            pending.push(Pending {
                reply: request.reply,
                appended,
            });
        }
        if published.is_empty() {
            for p in pending {
                let _ = p.reply.send(Ok(p.appended));
            }
            return true;
        }

        let flush_started = Instant::now();
        let written = crate::faults::injected("journal-write")
            .map_err(sled::Error::Io)
            .and_then(|_| self.journal.apply_batch(batch))
            .and_then(|_| {
                match self.fault.take() {
                    None => {}
                    Some(FaultMode::Hold { reached, release }) => {
                        let _ = reached.send(());
                        let _ = release.recv();
                    }
                    Some(FaultMode::Fail) => {
                        return Err(sled::Error::Io(std::io::Error::other(
                            "injected flush failure (test seam)",
                        )))
                    }
                }
                crate::faults::injected("journal-flush").map_err(sled::Error::Io)?;
                self.db.flush()
            });
        if let Err(e) = written {
            tracing::error!(error = %e, "journal write failed; stopping the journal (fail-stop)");
            // Unhealthy before anyone hears of the failure: a client told `Unavailable` finds
            // `/readyz` red already.
            self.healthy.store(false, Ordering::Release);
            // Take the refused batch back out of the tree (best effort): readers are bounded by
            // the head anyway, but sled may still flush the tree later (on drop), and a record
            // nobody was promised must not reach the disk after its flush was reported failed.
            // Every key of the batch is new (fresh seqs).
            if let Err(undo_error) = self.journal.apply_batch(undo) {
                tracing::error!(error = %undo_error, "cannot take the refused batch back");
            }
            for p in pending {
                let _ = p
                    .reply
                    .send(Err(AppendError::Unavailable(format!("write failed: {e}"))));
            }
            return false;
        }
        self.metrics
            .journal_flush_seconds
            .observe(flush_started.elapsed().as_secs_f64());
        self.metrics
            .journal_batch_events
            .observe(published.len() as f64);
        let head = self.next_seq - 1;
        // The index entries into the tail before the head moves: a reader that sees the head
        // finds every entry up to it (in the tail, or in the tree once the indexer wrote it).
        let entries: Vec<(String, IndexEntry)> = index.into_iter().collect();
        self.index.tail.add(&entries);
        self.head.store(head, Ordering::Release);
        self.metrics.log_head_seq.set(head as i64);
        // The indexer gone (it stopped on a failed write: `/readyz` is red) leaves the entries
        // in the tail, where reads still find them.
        let _ = self.to_indexer.send(IndexBatch {
            last_seq: head,
            entries,
        });
        let _ = self.live.send(Arc::new(published));
        for p in pending {
            let _ = p.reply.send(Ok(p.appended));
        }
        true
    }

    /// After a failure: refuse everything still queued, mark the store unhealthy.
    fn fail_remaining(&mut self) {
        self.healthy.store(false, Ordering::Release);
        self.receiver.close();
        while let Ok(msg) = self.receiver.try_recv() {
            match msg {
                JournalMsg::Append(request) => {
                    let _ = request.reply.send(Err(AppendError::Unavailable(
                        "the journal has stopped".into(),
                    )));
                }
                JournalMsg::Close(done) => {
                    let _ = done.send(());
                }
            }
        }
    }
}
