//! The event log: envelope, record format, hash chain, the [`EventStore`] trait and live
//! subscriptions. The sled implementation with its group-commit journal is in [`sled_store`].
//!
//! A record on disk is `[prev_hash: 32][hash: 32][format: 1][body]` where
//! `hash = SHA-256(prev_hash || format || body)` and `body` is the codec's encoding of the
//! envelope without its hashes. The first record's `prev_hash` is all zeroes. Anyone holding the
//! log (or an export that carries the record bytes) can re-check every link without trusting the
//! decoder, and any edit to any record breaks every hash after it.
//!
//! Positions are portable notions: a stream's *version* counts its events from 1 (0 means "no
//! event yet"), and the global *sequence* orders every event of one log from 1 with no gaps.

pub mod codec;
pub mod jetstream;
pub mod jetstream_store;
mod sled_index;
pub mod sled_store;

use crate::domain::Event;
use codec::{CodecError, RecordBody, RecordBodyRef};
use futures::future::BoxFuture;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use tokio::sync::broadcast;

/// SHA-256 digest linking a record to its predecessor.
pub type Hash = [u8; 32];

/// `prev_hash` of the first record.
pub const GENESIS_HASH: Hash = [0; 32];

/// Bytes of the hash header in front of every stored record.
pub const CHAIN_HEADER_BYTES: usize = 64;

/// One event as recorded in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Position in the global log, from 1, without gaps.
    pub seq: u64,
    /// The stream (aggregate instance) the event belongs to, e.g. `wallet:u42`.
    pub stream: String,
    /// Position within the stream, from 1, without gaps.
    pub version: u64,
    /// Unique id of this event (random), for deduplication by other backends.
    pub event_id: u128,
    /// The business order id that caused the event.
    pub correlation_id: String,
    /// When the journal recorded the event (epoch milliseconds, from the injected clock).
    pub recorded_at_ms: i64,
    /// Schema version of the payload's type.
    pub schema_version: u16,
    pub event: Event,
    pub prev_hash: Hash,
    pub hash: Hash,
}

impl Envelope {
    fn body_ref(&self) -> RecordBodyRef<'_> {
        RecordBodyRef {
            seq: self.seq,
            stream: &self.stream,
            version: self.version,
            event_id: self.event_id,
            correlation_id: &self.correlation_id,
            recorded_at_ms: self.recorded_at_ms,
            schema_version: self.schema_version,
            event: &self.event,
        }
    }

    /// Encodes `[format][body]`: the bytes the hash covers.
    pub fn encode_record(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode(&self.body_ref())
    }

    /// Decodes a stored record (`[prev_hash][hash][format][body]`). Does not check the hash;
    /// see [`check_link`].
    pub fn decode_stored(stored: &[u8]) -> Result<Envelope, CodecError> {
        let (prev_hash, hash, record) = split_stored(stored)?;
        let body: RecordBody = codec::decode(record)?;
        Ok(Envelope {
            seq: body.seq,
            stream: body.stream,
            version: body.version,
            event_id: body.event_id,
            correlation_id: body.correlation_id,
            recorded_at_ms: body.recorded_at_ms,
            schema_version: body.schema_version,
            event: body.event,
            prev_hash,
            hash,
        })
    }
}

/// Splits a stored record into its previous hash, its hash and the hashed record bytes.
pub fn split_stored(stored: &[u8]) -> Result<(Hash, Hash, &[u8]), CodecError> {
    if stored.len() <= CHAIN_HEADER_BYTES {
        return Err(CodecError::Decode(format!(
            "record of {} bytes is too short",
            stored.len()
        )));
    }
    let mut prev = [0u8; 32];
    let mut hash = [0u8; 32];
    prev.copy_from_slice(&stored[..32]);
    hash.copy_from_slice(&stored[32..64]);
    Ok((prev, hash, &stored[CHAIN_HEADER_BYTES..]))
}

/// `SHA-256(prev_hash || record)`.
pub fn chain_hash(prev_hash: &Hash, record: &[u8]) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update(prev_hash);
    hasher.update(record);
    hasher.finalize().into()
}

/// Builds the stored form of a record and returns it with its hash.
pub fn seal(prev_hash: &Hash, record: &[u8]) -> (Hash, Vec<u8>) {
    let hash = chain_hash(prev_hash, record);
    let mut stored = Vec::with_capacity(CHAIN_HEADER_BYTES + record.len());
    stored.extend_from_slice(prev_hash);
    stored.extend_from_slice(&hash);
    stored.extend_from_slice(record);
    (hash, stored)
}

/// Checks one stored record against the hash of the record before it. Returns its hash.
pub fn check_link(expected_prev: &Hash, stored: &[u8]) -> Result<Hash, LinkError> {
    let (prev, hash, record) = split_stored(stored).map_err(|_| LinkError::Truncated)?;
    if &prev != expected_prev {
        return Err(LinkError::PrevMismatch);
    }
    if chain_hash(&prev, record) != hash {
        return Err(LinkError::HashMismatch);
    }
    Ok(hash)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("record too short to hold its hashes")]
    Truncated,
    #[error("prev_hash does not equal the previous record's hash")]
    PrevMismatch,
    #[error("hash does not match the record's bytes")]
    HashMismatch,
}

/// An event to append, with the business order id that caused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub event: Event,
    pub correlation_id: String,
}

/// Optimistic concurrency: what the appender believes the stream's version to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Append whatever the version is (for streams with a single writer by construction).
    Any,
    /// The stream must be exactly at this version (0: no event yet).
    Exact(u64),
}

/// What an acknowledged append wrote. Returned only after the events are on disk.
#[derive(Debug, Clone)]
pub struct Appended {
    /// The stream's version after the append.
    pub last_version: u64,
    pub envelopes: Vec<Arc<Envelope>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    /// Somebody else appended first (or the appender's view is stale). Nothing was written.
    #[error("stream {stream} is at version {actual}, not {expected}")]
    Conflict {
        stream: String,
        expected: u64,
        actual: u64,
    },
    /// The append was not (or not provably) written; nothing was acknowledged.
    #[error("event store unavailable: {0}")]
    Unavailable(String),
    /// The journal's queue is full; nothing was written. Retry later.
    #[error("the journal is overloaded")]
    Overloaded,
    #[error("an append carries at most {max} events")]
    TooLarge { max: usize },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Io(String),
    #[error("corrupt record: {0}")]
    Corrupt(String),
    #[error("the event store is closed")]
    Closed,
    #[error("the data directory {0} is in use by another hongbao process")]
    Locked(String),
}

impl From<CodecError> for StoreError {
    fn from(e: CodecError) -> Self {
        StoreError::Corrupt(e.to_string())
    }
}

/// Whether the journal accepts appends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalCondition {
    Ready,
    /// The log is unreachable or electing a leader; the journal re-reads the head and goes on
    /// by itself when it answers again.
    Recovering,
    /// The journal stopped (a failed write, or fenced by another writer) and stays stopped.
    Failed,
}

impl JournalCondition {
    /// As `/readyz` says it.
    pub fn as_str(self) -> &'static str {
        match self {
            JournalCondition::Ready => "ready",
            JournalCondition::Recovering => "log_unreachable",
            JournalCondition::Failed => "journal_failed",
        }
    }
}

/// Resolves when an append is durable (or refused by the journal).
pub type AppendAck = BoxFuture<'static, Result<Appended, AppendError>>;

/// Events the journal made durable together, as published to live subscribers.
pub type LiveBatch = Arc<Vec<Arc<Envelope>>>;

/// The log, as actors, projections, flows and the audit see it. Implementations must make an
/// append durable before its future resolves, keep each stream's appends in submission order,
/// and assign global sequences without gaps.
pub trait EventStore: Send + Sync + 'static {
    /// Submits events for a stream that must be at `expected`. Submission is synchronous, so
    /// appends reach the journal in call order; a full queue (`Overloaded`) or a closed journal
    /// is known at once. The returned future resolves when the events are durable (or refused).
    ///
    /// `writer` identifies the appender's incarnation (0: none). Once an append of a writer to
    /// a stream is refused, every later append of that writer to that stream is refused too:
    /// a pipelining actor's queued appends were decided on a state that never became durable.
    fn append(
        &self,
        writer: u64,
        stream: String,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendAck, AppendError>;

    /// A stream's events with `version >= from_version`, in order, never beyond [`head`]
    /// (a batch being flushed is not there yet). May block briefly.
    ///
    /// [`head`]: EventStore::head
    fn read_stream(&self, stream: &str, from_version: u64) -> Result<Vec<Envelope>, StoreError>;

    /// Up to `limit` events of the global log with `from_seq <= seq <= head()`, in order: derived
    /// state is never ahead of the disk. May block briefly.
    fn read_all(&self, from_seq: u64, limit: usize) -> Result<Vec<Arc<Envelope>>, StoreError>;

    /// Sequence of the last durable event (0 for an empty log).
    fn head(&self) -> u64;

    /// Batches made durable from now on.
    fn live(&self) -> broadcast::Receiver<LiveBatch>;

    /// Stores a state snapshot taken at `version` (best effort: a lost snapshot costs replay).
    fn save_snapshot(&self, stream: &str, version: u64, state: &[u8]) -> Result<(), StoreError>;

    /// Stores a snapshot for this node's own activations only: where snapshots are also
    /// shared with other nodes (JetStream's bucket, a replicated write), not there. For the
    /// frequent snapshots of passivation, which serve the node that passivates.
    fn save_snapshot_locally(
        &self,
        stream: &str,
        version: u64,
        state: &[u8],
    ) -> Result<(), StoreError> {
        self.save_snapshot(stream, version, state)
    }

    /// The latest snapshot of a stream, if any.
    fn load_snapshot(&self, stream: &str) -> Result<Option<(u64, Vec<u8>)>, StoreError>;

    /// False once the journal has failed (it stops rather than guess what is on disk), or
    /// while it cannot accept appends (see [`EventStore::condition`]).
    fn healthy(&self) -> bool;

    /// Why the journal is or is not accepting appends, for `/readyz`.
    fn condition(&self) -> JournalCondition {
        if self.healthy() {
            JournalCondition::Ready
        } else {
            JournalCondition::Failed
        }
    }

    /// Finishes every append already submitted, flushes, and stops the journal.
    fn close(&self) -> BoxFuture<'static, Result<(), StoreError>>;

    /// True when appends become durable in submission order and a failed write stops the
    /// journal for good (sled's single writer): an append submitted after another is then
    /// durable only if that other is. A caller may act on a decision once its append is
    /// submitted, and still answer only once everything it relies on is durable. False (the
    /// default) where a batch can fail and a later one succeed (JetStream re-reads its head
    /// and goes on).
    fn in_order_fail_stop(&self) -> bool {
        false
    }
}

/// A record as the log stores it, for checks that must not trust the decoder (`verify`,
/// `export`, the audit).
#[derive(Debug, Clone)]
pub struct RawRecord {
    /// Its global sequence, as the backend files it (sled key, JetStream stream sequence).
    pub seq: u64,
    /// `[prev_hash][hash][format][body]`.
    pub stored: Vec<u8>,
    /// The subject it is filed under (JetStream), which per-stream reads rely on.
    pub subject: Option<String>,
}

/// What a backend's per-stream index (sled's index entries, JetStream's subjects) says
/// about the log, checked against the streams' versions found by a scan of the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexCheck {
    /// Index entries examined.
    pub entries: u64,
    /// The first disagreement, if any.
    pub violation: Option<String>,
}

/// A log the offline commands (`verify`, `audit`, `export`, `replay`, `projections`) can read
/// whole: an [`EventStore`] with its raw records and the local state database beside it.
pub trait Log: EventStore {
    /// Stored records from `from_seq` on, in order, up to the durable head (no decoding).
    fn stored_records(
        &self,
        from_seq: u64,
    ) -> Box<dyn Iterator<Item = Result<RawRecord, StoreError>> + '_>;

    /// The stored record at `seq`, if the log holds it (at or below the durable head).
    fn stored_record(&self, seq: u64) -> Result<Option<RawRecord>, StoreError> {
        Ok(self
            .stored_records(seq)
            .next()
            .transpose()?
            .filter(|record| record.seq == seq))
    }

    /// The subject a stream's records must be filed under, where the backend files by
    /// subject (None for sled).
    fn subject_of(&self, _stream: &str) -> Option<String> {
        None
    }

    /// Checks the backend's own per-stream index against `versions` (stream -> last version
    /// in the log).
    fn check_index(
        &self,
        versions: &std::collections::HashMap<String, u64>,
    ) -> Result<IndexCheck, StoreError>;

    /// The local database of derived state: views, flow checkpoints, snapshots.
    fn state_db(&self) -> &sled::Db;

    /// Where the log lives and what makes an acknowledgement durable, for people.
    fn describe(&self) -> String;
}

/// Opens the configured log: sled in the data directory, or JetStream (`[store] url`), with
/// the local state database in the data directory either way. `create` lets a JetStream log
/// be created (`serve`); the offline commands only open a log that exists.
pub fn open_log(
    config: &crate::config::Config,
    create: bool,
    clock: Arc<dyn crate::clock::Clock>,
    metrics: Arc<crate::metrics::Metrics>,
) -> Result<Arc<dyn Log>, StoreError> {
    let durability = config
        .store
        .jetstream()
        .map_err(|e| StoreError::Io(e.to_string()))?;
    match durability {
        None => {
            if !create && !config.data_dir.join("log").exists() {
                return Err(StoreError::Io(format!(
                    "no log in {} (start `hongbao serve` first, or pass --data-dir)",
                    config.data_dir.display()
                )));
            }
            let store =
                sled_store::SledStore::open(&config.data_dir, config.journal(), clock, metrics)?;
            Ok(store)
        }
        Some(durability) => {
            let mut js = jetstream_store::JetStreamConfig::new(
                &config.store.url,
                &config.store.stream,
                config.data_dir.clone(),
            );
            js.durability = durability;
            js.subject_prefix = config.store.subject_prefix.clone();
            js.create_stream = create;
            let store = jetstream_store::JetStreamStore::open(js, clock, metrics)?;
            Ok(store)
        }
    }
}

/// Writers whose append to a stream was refused, kept to refuse their later appends to it
/// (see [`EventStore::append`]). Bounded: refusals are rare, and forgetting all of them at the
/// bound only lets a broken incarnation be refused by its version instead.
#[derive(Default)]
pub(crate) struct Fences(std::collections::HashSet<(String, u64)>);

/// Fenced (stream, writer) pairs kept before the set is cleared.
const FENCED_WRITERS_MAX: usize = 100_000;

impl Fences {
    /// The journal's admission rule, the same on every backend: an append goes in when it
    /// expects the stream's `current` version and its writer was never refused on that stream;
    /// otherwise it is a typed conflict, and its writer (if any) is fenced on that stream.
    pub(crate) fn admit(
        &mut self,
        writer: u64,
        stream: &str,
        expected: ExpectedVersion,
        current: u64,
    ) -> Result<(), AppendError> {
        let expected = match expected {
            ExpectedVersion::Exact(expected) => expected,
            ExpectedVersion::Any => current,
        };
        let key = (stream.to_owned(), writer);
        if expected == current && (writer == 0 || !self.0.contains(&key)) {
            return Ok(());
        }
        if writer != 0 {
            if self.0.len() >= FENCED_WRITERS_MAX {
                self.0.clear();
            }
            self.0.insert(key);
        }
        Err(AppendError::Conflict {
            stream: stream.to_owned(),
            expected,
            actual: current,
        })
    }
}

/// The records of one admitted append, chained: each envelope with its stored bytes.
pub(crate) type Sealed = Vec<(Arc<Envelope>, Vec<u8>)>;

/// Builds the records of an admitted append (sequences from `first_seq`, versions after
/// `current`), encodes every one before chaining any (so a refusal leaves the chain
/// untouched), then chains them to `last_hash`, which ends at the last record's hash.
pub(crate) fn seal_append(
    stream: &str,
    events: Vec<NewEvent>,
    first_seq: u64,
    current: u64,
    now_ms: i64,
    last_hash: &mut Hash,
) -> Result<Sealed, CodecError> {
    let envelopes: Vec<Envelope> = events
        .into_iter()
        .enumerate()
        .map(|(i, new)| Envelope {
            seq: first_seq + i as u64,
            stream: stream.to_owned(),
            version: current + 1 + i as u64,
            event_id: rand::random(),
            correlation_id: new.correlation_id,
            recorded_at_ms: now_ms,
            schema_version: new.event.schema_version(),
            event: new.event,
            prev_hash: GENESIS_HASH,
            hash: GENESIS_HASH,
        })
        .collect();
    let records = envelopes
        .iter()
        .map(Envelope::encode_record)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(envelopes
        .into_iter()
        .zip(records)
        .map(|(mut envelope, record)| {
            let (hash, stored) = seal(last_hash, &record);
            envelope.prev_hash = *last_hash;
            envelope.hash = hash;
            *last_hash = hash;
            (Arc::new(envelope), stored)
        })
        .collect())
}

/// Stores a snapshot in a local sled tree (`stream -> version (u64 BE) + encoded state`): both
/// stores keep snapshots locally, as derived state (a lost one only costs replay).
pub fn save_local_snapshot(
    tree: &sled::Tree,
    stream: &str,
    version: u64,
    state: &[u8],
) -> Result<(), StoreError> {
    crate::faults::injected("snapshot-write").map_err(|e| StoreError::Io(e.to_string()))?;
    let mut value = Vec::with_capacity(8 + state.len());
    value.extend_from_slice(&version.to_be_bytes());
    value.extend_from_slice(state);
    tree.insert(stream.as_bytes(), value)
        .map_err(|e| StoreError::Io(e.to_string()))?;
    Ok(())
}

/// The latest snapshot of a stream in a local sled tree, if any (see [`save_local_snapshot`]).
pub fn load_local_snapshot(
    tree: &sled::Tree,
    stream: &str,
) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
    match tree
        .get(stream.as_bytes())
        .map_err(|e| StoreError::Io(e.to_string()))?
    {
        None => Ok(None),
        Some(value) if value.len() > 8 => {
            let version = u64::from_be_bytes(value[..8].try_into().expect("8 bytes"));
            Ok(Some((version, value[8..].to_vec())))
        }
        Some(_) => Err(StoreError::Corrupt(format!(
            "snapshot of {stream} is too short"
        ))),
    }
}

/// A consumer's cursor over the global log: catches up from the store, then follows the live
/// tail, falling back to the store whenever it lags. Delivers every event exactly once, in order.
pub struct Subscription {
    store: Arc<dyn EventStore>,
    next_seq: u64,
    live: broadcast::Receiver<LiveBatch>,
    batch_max: usize,
}

impl Subscription {
    /// Starts at `from_seq` (1 for the whole log).
    pub fn new(store: Arc<dyn EventStore>, from_seq: u64, batch_max: usize) -> Subscription {
        // Subscribe to the live tail before looking at the head, so that no batch falls between.
        let live = store.live();
        Subscription {
            store,
            next_seq: from_seq.max(1),
            live,
            batch_max: batch_max.max(1),
        }
    }

    /// The sequence the next delivered event will have.
    pub fn position(&self) -> u64 {
        self.next_seq
    }

    /// The next durable events without waiting: empty when the consumer is at the head.
    pub fn try_next(&mut self) -> Result<Vec<Arc<Envelope>>, StoreError> {
        if self.next_seq > self.store.head() {
            return Ok(Vec::new());
        }
        let events = self.store.read_all(self.next_seq, self.batch_max)?;
        if let Some(last) = events.last() {
            self.next_seq = last.seq + 1;
        }
        Ok(events)
    }

    /// The next events, waiting for them if the consumer is at the head.
    pub async fn next(&mut self) -> Result<Vec<Arc<Envelope>>, StoreError> {
        loop {
            if self.next_seq <= self.store.head() {
                let events = self.store.read_all(self.next_seq, self.batch_max)?;
                if let Some(last) = events.last() {
                    self.next_seq = last.seq + 1;
                    return Ok(events);
                }
            }
            match self.live.recv().await {
                Ok(batch) => {
                    let first = batch.first().map(|e| e.seq).unwrap_or(u64::MAX);
                    if first > self.next_seq {
                        continue; // a gap: the store has it
                    }
                    let events: Vec<_> = batch
                        .iter()
                        .filter(|e| e.seq >= self.next_seq)
                        .cloned()
                        .collect();
                    if let Some(last) = events.last() {
                        self.next_seq = last.seq + 1;
                        return Ok(events);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return Err(StoreError::Closed),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_record_checks_and_any_edit_breaks_it() {
        // Goal: the chain detects a changed byte anywhere in a record or a wrong predecessor.
        let record = b"\x01some record bytes".to_vec();
        let (hash, stored) = seal(&GENESIS_HASH, &record);
        assert_eq!(check_link(&GENESIS_HASH, &stored), Ok(hash));
        for i in 0..stored.len() {
            let mut tampered = stored.clone();
            tampered[i] ^= 1;
            assert!(check_link(&GENESIS_HASH, &tampered).is_err(), "byte {i}");
        }
        assert_eq!(check_link(&hash, &stored), Err(LinkError::PrevMismatch));
        assert_eq!(
            check_link(&GENESIS_HASH, &stored[..10]),
            Err(LinkError::Truncated)
        );
    }
}
