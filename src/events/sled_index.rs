//! The sled store's stream index, written off the journal thread (issue 14).
//!
//! The journal writer used to write each batch's index entries (one per stream per batch) in
//! the same `apply_batch` and flush as its records. For events spread over many streams those
//! entries land on pages all over a growing tree, and each flush rewrote them: half of the
//! journal's write budget, and most of the disk per event. Now:
//!
//! - the index lives in a database of its own (`<data>/index`, tree `index`): `S` + stream +
//!   `0x00` + first version (u64 BE) -> runs of (first seq u64 BE, count u32 BE), and the
//!   checkpoint `C` -> the last seq whose entries are all in the tree, written in the same
//!   atomic `apply_batch` as the entries it covers. sled flushes it in the background: the index
//!   is derived data, rebuilt from the log;
//! - the journal writer hands each durable batch's entries to the indexer thread and keeps them
//!   in the [`Tail`] (memory) until the indexer has written them; the writer adds them *before*
//!   it advances the durable head, so a reader that saw the head finds every entry up to it in
//!   the tail or in the tree;
//! - the indexer merges what has queued (a hot stream's entries of many journal batches become
//!   one entry) and writes it with its checkpoint, then drops those entries from the tail;
//! - a reader takes the tail's entries *before* it reads the tree: an entry it missed in the
//!   tail was dropped after the indexer wrote it, so the tree read that follows finds it;
//! - on open, the records after the checkpoint (what the indexer had not written, or sled not
//!   flushed, at a crash) are indexed from the log before the journal starts.

use super::{Envelope, StoreError};
use crate::metrics::Metrics;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const INDEX_PREFIX: u8 = b'S';
/// The checkpoint's key: not `S`-prefixed, so no stream's entry can collide with it.
const CHECKPOINT_KEY: &[u8] = b"C";
/// Entries one indexer write takes from the queue (whole journal batches, so it may go over by
/// one): sled's `apply_batch` holds a process-wide lock that the journal's own writes wait for,
/// so writes stay as small as the views' (docs/ARCHITECTURE.md, "View commits are bounded").
const INDEXER_ENTRIES_MAX: usize = 2_048;
/// Records indexed per write when the index catches up with the log on open.
const CATCH_UP_CHUNK: usize = 65_536;
/// Durable events the indexer may lag behind before the journal waits for it: bounds the
/// tail's memory (an entry is held twice, in the tail and in the indexer's queue: some 300-400
/// bytes per event of a spread load, so about 100 MB) should the indexer fall behind for good.
const INDEX_LAG_MAX: u64 = 250_000;
/// Longest the test seam holds the indexer (a test that fails while holding it must not leave
/// the thread, and the index's lock, behind for good).
const PAUSE_MAX: Duration = Duration::from_secs(60);

fn index_prefix(stream: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(stream.len() + 10);
    key.push(INDEX_PREFIX);
    key.extend_from_slice(stream.as_bytes());
    key.push(0);
    key
}

fn index_key(stream: &str, first_version: u64) -> Vec<u8> {
    let mut key = index_prefix(stream);
    key.extend_from_slice(&first_version.to_be_bytes());
    key
}

/// End (exclusive) of a stream's index range: the prefix with its 0x00 separator bumped.
fn index_end(stream: &str) -> Vec<u8> {
    let mut key = index_prefix(stream);
    *key.last_mut().expect("prefix is never empty") = 1;
    key
}

pub(super) fn be_u64(bytes: &[u8]) -> Result<u64, StoreError> {
    let array: [u8; 8] = bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("integer of wrong width".into()))?;
    Ok(u64::from_be_bytes(array))
}

pub(super) fn io(e: sled::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

/// Bytes of one run in an index value: first seq (u64 BE) + count (u32 BE).
const INDEX_RUN_BYTES: usize = 12;

/// An index entry: events of one stream with consecutive versions from `first_version`; their
/// sequences form `runs` of consecutive seqs (several when other streams' events were
/// interleaved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub first_version: u64,
    /// (first seq, count) per run, in version order.
    pub runs: Vec<(u64, u64)>,
}

impl IndexEntry {
    pub fn count(&self) -> u64 {
        self.runs.iter().map(|(_, n)| n).sum()
    }

    pub fn last_version(&self) -> u64 {
        self.first_version + self.count() - 1
    }

    /// (seq, version) of every event of the entry, in order.
    pub fn positions(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs
            .iter()
            .flat_map(|&(seq, n)| seq..seq + n)
            .zip(self.first_version..)
    }

    /// Appends `count` events from `first_seq` (the versions right after this entry's).
    pub(super) fn push_run(&mut self, first_seq: u64, count: u64) {
        match self.runs.last_mut() {
            Some((seq, n)) if *seq + *n == first_seq => *n += count,
            _ => self.runs.push((first_seq, count)),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut value = Vec::with_capacity(self.runs.len() * INDEX_RUN_BYTES);
        for &(seq, n) in &self.runs {
            value.extend_from_slice(&seq.to_be_bytes());
            value.extend_from_slice(&(n as u32).to_be_bytes());
        }
        value
    }
}

fn decode_index(key: &[u8], value: &[u8]) -> Result<IndexEntry, StoreError> {
    if key.len() < 9 || value.is_empty() || !value.len().is_multiple_of(INDEX_RUN_BYTES) {
        return Err(StoreError::Corrupt("malformed stream index entry".into()));
    }
    let first_version = be_u64(&key[key.len() - 8..])?;
    let runs = value
        .chunks_exact(INDEX_RUN_BYTES)
        .map(|run| {
            let seq = be_u64(&run[..8])?;
            let n = u32::from_be_bytes(run[8..12].try_into().expect("4 bytes")) as u64;
            if n == 0 {
                return Err(StoreError::Corrupt(
                    "empty run in stream index entry".into(),
                ));
            }
            Ok((seq, n))
        })
        .collect::<Result<_, _>>()?;
    Ok(IndexEntry {
        first_version,
        runs,
    })
}

/// Appends `entry` to a stream's entries, merged into the last one when it continues it.
fn merge_into(entries: &mut Vec<IndexEntry>, entry: IndexEntry) {
    match entries.last_mut() {
        Some(last) if last.last_version() + 1 == entry.first_version => {
            for (seq, n) in entry.runs {
                last.push_run(seq, n);
            }
        }
        _ => entries.push(entry),
    }
}

/// One durable journal batch's entries, handed from the writer to the indexer.
pub(super) struct IndexBatch {
    /// The batch's last seq: once written, the checkpoint.
    pub last_seq: u64,
    pub entries: Vec<(String, IndexEntry)>,
}

/// Entries of durable batches that the indexer has not written to the tree yet.
#[derive(Default)]
pub(super) struct Tail {
    streams: Mutex<HashMap<String, Vec<IndexEntry>>>,
}

impl Tail {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<IndexEntry>>> {
        // A panic under this lock leaves plain data, consistent between statements.
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by the writer for each durable batch, before it advances the head.
    pub(super) fn add(&self, entries: &[(String, IndexEntry)]) {
        let mut streams = self.lock();
        for (stream, entry) in entries {
            streams
                .entry(stream.clone())
                .or_default()
                .push(entry.clone());
        }
    }

    fn of(&self, stream: &str) -> Vec<IndexEntry> {
        self.lock().get(stream).cloned().unwrap_or_default()
    }

    fn last_version(&self, stream: &str) -> Option<u64> {
        self.lock()
            .get(stream)
            .and_then(|entries| entries.last())
            .map(IndexEntry::last_version)
    }

    /// Drops what the tree now holds: each stream's entries up to the last version written.
    fn written(&self, merged: &HashMap<String, Vec<IndexEntry>>) {
        let mut streams = self.lock();
        for (stream, written) in merged {
            let Some(upto) = written.last().map(IndexEntry::last_version) else {
                continue;
            };
            if let Some(entries) = streams.get_mut(stream) {
                entries.retain(|e| e.last_version() > upto);
                if entries.is_empty() {
                    streams.remove(stream);
                }
            }
        }
    }
}

/// The stream index: the tree, the tail the indexer has not written yet, and how far the tree
/// goes.
pub(super) struct StreamIndex {
    db: sled::Db,
    tree: sled::Tree,
    pub tail: Arc<Tail>,
    /// Every entry of the events up to this seq is in the tree.
    indexed: Arc<AtomicU64>,
    /// Test seam: while set, the indexer writes nothing (entries stay in the tail).
    paused: Arc<AtomicBool>,
    /// The indexer thread runs (cleared when it ends, whatever ended it).
    alive: Arc<AtomicBool>,
    /// Test seam: the indexer's next write fails.
    fail_next: Arc<AtomicBool>,
    /// Why the indexer stopped, when a failure stopped it (for the journal's fail-stop line).
    stopped_because: Arc<std::sync::Mutex<Option<String>>>,
}

impl StreamIndex {
    /// Opens the index in `db` and indexes the records after its checkpoint (`records` yields
    /// the log's records from a given seq on, up to the log's last, `last_seq`).
    pub(super) fn open<I>(
        db: sled::Db,
        last_seq: u64,
        records: impl Fn(u64) -> I,
    ) -> Result<StreamIndex, StoreError>
    where
        I: Iterator<Item = Result<(u64, sled::IVec), StoreError>>,
    {
        let mut tree = db.open_tree("index").map_err(io)?;
        let mut checkpoint = match tree.get(CHECKPOINT_KEY).map_err(io)? {
            Some(value) => be_u64(&value)?,
            None => 0,
        };
        if checkpoint > last_seq {
            // The log is the record; an index that claims more than it holds is rebuilt.
            tracing::warn!(
                checkpoint,
                last_seq,
                "the stream index is ahead of the log; rebuilding it"
            );
            // Dropped whole, not cleared key by key: a crash in the middle of a clear would leave
            // no checkpoint beside entries that the catch-up below does not overwrite.
            db.drop_tree("index").map_err(io)?;
            tree = db.open_tree("index").map_err(io)?;
            checkpoint = 0;
        }
        if checkpoint < last_seq {
            let started = Instant::now();
            tracing::info!(
                from = checkpoint + 1,
                to = last_seq,
                "indexing the log's records the stream index does not hold yet"
            );
            let mut pending: HashMap<String, Vec<IndexEntry>> = HashMap::new();
            let mut in_chunk = 0;
            let mut last = checkpoint;
            for record in records(checkpoint + 1) {
                let (seq, stored) = record?;
                if seq > last_seq {
                    break;
                }
                let envelope = Envelope::decode_stored(&stored)?;
                merge_into(
                    pending.entry(envelope.stream).or_default(),
                    IndexEntry {
                        first_version: envelope.version,
                        runs: vec![(seq, 1)],
                    },
                );
                last = seq;
                in_chunk += 1;
                if in_chunk == CATCH_UP_CHUNK {
                    write(&tree, &pending, last)?;
                    pending.clear();
                    in_chunk = 0;
                }
            }
            write(&tree, &pending, last)?;
            if last != last_seq {
                return Err(StoreError::Corrupt(format!(
                    "the log ends at seq {last}, its last record says {last_seq}"
                )));
            }
            tracing::info!(
                records = last_seq - checkpoint,
                seconds = started.elapsed().as_secs_f64(),
                "stream index caught up with the log"
            );
        }
        Ok(StreamIndex {
            db,
            tree,
            tail: Arc::new(Tail::default()),
            indexed: Arc::new(AtomicU64::new(last_seq)),
            paused: Arc::new(AtomicBool::new(false)),
            alive: Arc::new(AtomicBool::new(false)),
            stopped_because: Arc::default(),
            fail_next: Arc::new(AtomicBool::new(false)),
        })
    }

    /// (seq, version) of each event of `stream` from `from_version` on, in version order:
    /// the tree's entries joined with the tail's (see [`join`]).
    pub(super) fn positions_from(
        &self,
        stream: &str,
        from_version: u64,
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        // The tail first: an entry missing from it was dropped after the indexer wrote it, so
        // the tree reads below find it.
        let tail = self.tail.of(stream);
        let start = index_key(stream, from_version);
        let mut entries: Vec<IndexEntry> = Vec::new();
        // The entry that may cover `from_version` starts at or before it (from version 1, the
        // range below starts with it: no second iterator, sled's cost per read).
        let covering = if from_version > 1 {
            self.tree
                .range(index_prefix(stream)..=start.clone())
                .next_back()
        } else {
            None
        };
        if let Some(entry) = covering {
            let (key, value) = entry.map_err(io)?;
            entries.push(decode_index(&key, &value)?);
        }
        for entry in self.tree.range(start..index_end(stream)) {
            let (key, value) = entry.map_err(io)?;
            entries.push(decode_index(&key, &value)?);
        }
        join(stream, entries, tail, from_version)
    }

    /// The last version of a stream (0 if it has none).
    pub(super) fn version(&self, stream: &str) -> Result<u64, StoreError> {
        let in_tail = self.tail.last_version(stream);
        let in_tree = match self
            .tree
            .range(index_prefix(stream)..index_end(stream))
            .next_back()
        {
            None => 0,
            Some(entry) => {
                let (key, value) = entry.map_err(io)?;
                decode_index(&key, &value)?.last_version()
            }
        };
        Ok(in_tail.unwrap_or(0).max(in_tree))
    }

    /// Called by the journal writer before each batch: shows the indexer's lag, and waits
    /// while it lags more than `INDEX_LAG_MAX` events behind `head`. False if the indexer has
    /// stopped (the journal must then stop too: nothing would ever empty the tail).
    pub(super) fn throttle(&self, head: u64, metrics: &Metrics) -> bool {
        loop {
            if !self.alive.load(Ordering::Acquire) {
                return false;
            }
            let lag = head.saturating_sub(self.indexed.load(Ordering::Acquire));
            metrics.index_lag_events.set(lag as i64);
            if lag <= INDEX_LAG_MAX {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Why the indexer stopped (its failed write), or that it ended without one (a panic).
    pub(super) fn stop_reason(&self) -> String {
        self.stopped_because
            .lock()
            .ok()
            .and_then(|why| why.clone())
            .unwrap_or_else(|| "the indexer thread ended without an error (a panic?)".into())
    }

    /// Waits until the tree holds every entry up to `seq`. False on timeout.
    pub(super) fn wait_indexed(&self, seq: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.indexed.load(Ordering::Acquire) < seq {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// Every entry in the tree, with its stream.
    pub(super) fn tree_entries(
        &self,
    ) -> impl Iterator<Item = Result<(String, IndexEntry), StoreError>> + '_ {
        self.tree.scan_prefix([INDEX_PREFIX]).map(|entry| {
            let (key, value) = entry.map_err(io)?;
            let decoded = decode_index(&key, &value)?;
            let stream = String::from_utf8(key[1..key.len() - 9].to_vec())
                .map_err(|_| StoreError::Corrupt("stream id is not UTF-8".into()))?;
            Ok((stream, decoded))
        })
    }

    pub(super) fn fail_next_write(&self) {
        self.fail_next.store(true, Ordering::Release);
    }

    pub(super) fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::Release);
    }

    pub(super) fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Starts the indexer thread: it writes what the writer hands over until the writer drops
    /// its sender, then flushes the index and ends.
    pub(super) fn spawn_indexer(
        &self,
        receiver: std::sync::mpsc::Receiver<IndexBatch>,
        head: Arc<AtomicU64>,
        healthy: Arc<AtomicBool>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let indexer = Indexer {
            db: self.db.clone(),
            tree: self.tree.clone(),
            tail: self.tail.clone(),
            indexed: self.indexed.clone(),
            paused: self.paused.clone(),
            fail_next: self.fail_next.clone(),
            stopped_because: self.stopped_because.clone(),
            receiver,
            head,
            healthy,
            metrics,
        };
        self.alive.store(true, Ordering::Release);
        let alive = Alive(self.alive.clone());
        std::thread::Builder::new()
            .name("hongbao-indexer".into())
            .spawn(move || {
                let _alive = alive;
                indexer.run()
            })
    }
}

/// Writes merged entries and the checkpoint in one atomic batch.
fn write(
    tree: &sled::Tree,
    merged: &HashMap<String, Vec<IndexEntry>>,
    checkpoint: u64,
) -> Result<(), StoreError> {
    let mut batch = sled::Batch::default();
    for (stream, entries) in merged {
        for entry in entries {
            batch.insert(index_key(stream, entry.first_version), entry.encode());
        }
    }
    batch.insert(CHECKPOINT_KEY, &checkpoint.to_be_bytes());
    tree.apply_batch(batch).map_err(io)
}

/// Clears the indexer's `alive` flag when its thread ends, a panic included.
struct Alive(Arc<AtomicBool>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Joins a stream's entries read from the tree with those copied from the tail *before* the
/// tree was read, into the (seq, version) of each event from `from_version` on.
///
/// The two reads are not one snapshot: between them the indexer may write entries (and drop
/// them from the tail), and a tree read spanning sled leaves is not atomic either. But every
/// entry of the events up to the reader's head was in the tail copy or already in the tree
/// (which only grows), so their union holds them all; tree entries are whole tail entries
/// merged, so they overlap the tail's exactly. Versions are taken once each, in order; an
/// entry that starts beyond the next version wanted is a hole in the index (`Corrupt`).
fn join(
    stream: &str,
    mut entries: Vec<IndexEntry>,
    tail: Vec<IndexEntry>,
    from_version: u64,
) -> Result<Vec<(u64, u64)>, StoreError> {
    entries.extend(tail);
    entries.sort_by_key(|e| e.first_version);
    let mut next = from_version.max(1);
    let mut positions = Vec::new();
    for entry in &entries {
        if entry.last_version() < next {
            continue;
        }
        if entry.first_version > next {
            return Err(StoreError::Corrupt(format!(
                "stream index of {stream} has no entry for version {next} (the next starts at {})",
                entry.first_version
            )));
        }
        positions.extend(entry.positions().filter(|&(_, version)| version >= next));
        next = entry.last_version() + 1;
    }
    Ok(positions)
}

struct Indexer {
    db: sled::Db,
    tree: sled::Tree,
    tail: Arc<Tail>,
    indexed: Arc<AtomicU64>,
    paused: Arc<AtomicBool>,
    fail_next: Arc<AtomicBool>,
    stopped_because: Arc<std::sync::Mutex<Option<String>>>,
    receiver: std::sync::mpsc::Receiver<IndexBatch>,
    head: Arc<AtomicU64>,
    healthy: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl Indexer {
    fn run(self) {
        while let Ok(first) = self.receiver.recv() {
            let paused_at = Instant::now();
            while self.paused.load(Ordering::Acquire) && paused_at.elapsed() < PAUSE_MAX {
                std::thread::sleep(Duration::from_millis(2));
            }
            let mut merged: HashMap<String, Vec<IndexEntry>> = HashMap::new();
            let mut last_seq = 0;
            let mut taken = 0;
            for batch in
                std::iter::once(first).chain(std::iter::from_fn(|| self.receiver.try_recv().ok()))
            {
                last_seq = batch.last_seq;
                taken += batch.entries.len();
                for (stream, entry) in batch.entries {
                    merge_into(merged.entry(stream).or_default(), entry);
                }
                if taken >= INDEXER_ENTRIES_MAX {
                    break;
                }
            }
            let written = if self.fail_next.swap(false, Ordering::AcqRel) {
                Err(StoreError::Io(
                    "injected index write failure (test seam)".into(),
                ))
            } else {
                write(&self.tree, &merged, last_seq)
            };
            if let Err(e) = written {
                // The journal stops when it sees the indexer gone (the tail would grow without
                // bound); reads stay whole meanwhile (the entries stay in the tail), and a
                // restart indexes from the checkpoint.
                tracing::error!(error = %e, "cannot write the stream index; the indexer stops");
                if let Ok(mut why) = self.stopped_because.lock() {
                    *why = Some(format!("cannot write the stream index: {e}"));
                }
                self.healthy.store(false, Ordering::Release);
                return;
            }
            self.indexed.store(last_seq, Ordering::Release);
            self.tail.written(&merged);
            let head = self.head.load(Ordering::Acquire);
            self.metrics
                .index_lag_events
                .set(head.saturating_sub(last_seq) as i64);
        }
        if let Err(e) = self.db.flush() {
            tracing::warn!(error = %e, "cannot flush the stream index on close (rebuilt on open)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{join, IndexEntry};

    fn entry(first_version: u64, runs: &[(u64, u64)]) -> IndexEntry {
        IndexEntry {
            first_version,
            runs: runs.to_vec(),
        }
    }

    #[test]
    fn a_tree_read_that_missed_an_entry_the_indexer_wrote_meanwhile_is_completed_by_the_tail() {
        // Goal (review of the indexer): the tail was copied holding 5..6 and 7..9; the indexer
        // then wrote both, and the tree read (from version 6) saw 1..4 and 7..9 but not the entry
        // keyed 5, which sorts before its start. Versions 5..9 are all read, each once.
        let tree = vec![entry(1, &[(10, 4)]), entry(7, &[(40, 3)])];
        let tail = vec![entry(5, &[(20, 2)]), entry(7, &[(40, 3)])];
        let positions = join("s", tree, tail, 6).unwrap();
        assert_eq!(positions, vec![(21, 6), (40, 7), (41, 8), (42, 9)]);
    }

    #[test]
    fn merged_tree_entries_and_the_tail_entries_they_hold_give_each_version_once() {
        let tree = vec![entry(1, &[(1, 2), (5, 3)])];
        let tail = vec![
            entry(1, &[(1, 2)]),
            entry(3, &[(5, 3)]),
            entry(6, &[(9, 1)]),
        ];
        let versions: Vec<u64> = join("s", tree, tail, 1)
            .unwrap()
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        assert_eq!(versions, vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn a_hole_in_the_index_is_corrupt_and_a_short_stream_is_not() {
        let holed = join(
            "s",
            vec![entry(1, &[(1, 2)]), entry(5, &[(9, 1)])],
            vec![],
            1,
        );
        assert!(
            matches!(&holed, Err(e) if e.to_string().contains("version 3")),
            "{holed:?}"
        );
        assert_eq!(
            join("s", vec![entry(1, &[(1, 2)])], vec![], 4).unwrap(),
            vec![]
        );
    }
}
