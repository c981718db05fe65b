//! `hongbao verify`: walks the whole log and checks what the journal promises.
//!
//! - the hash chain: every record's `prev_hash` is its predecessor's hash and its `hash` is
//!   SHA-256 over `prev_hash` and its record bytes;
//! - the global sequence: keys and records agree, start at 1, no gaps;
//! - per-stream versions: each stream's events are numbered 1, 2, 3, ... in log order;
//! - the stream index: every entry points at records of its stream with its versions, entries
//!   of a stream are contiguous, and they cover exactly the events the log holds.
//!
//! Reports the first break by sequence number and stops there: everything after a broken link
//! is unproven.

use crate::events::sled_store::SledStore;
use crate::events::{check_link, Envelope, StoreError, GENESIS_HASH};
use std::collections::HashMap;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub records: u64,
    pub streams: u64,
    pub index_entries: u64,
    /// The last record's hash (the head, with `records` its seq); None for an empty log.
    pub last_hash: Option<crate::events::Hash>,
    /// The first violation found, if any.
    pub violation: Option<String>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.violation.is_none()
    }
}

/// Verifies the log. `progress(done, total)` is called as records are checked.
pub fn verify_log(
    store: &SledStore,
    mut progress: impl FnMut(u64, u64),
) -> Result<VerifyReport, StoreError> {
    use crate::events::EventStore;
    let head = store.head();
    let mut report = VerifyReport::default();
    let mut prev_hash = GENESIS_HASH;
    let mut versions: HashMap<String, u64> = HashMap::new();

    for (expected_seq, record) in (1u64..).zip(store.raw_records(1)) {
        let (seq, stored) = record?;
        if seq != expected_seq {
            report.violation = Some(format!(
                "sequence gap: expected seq {expected_seq}, found {seq}"
            ));
            return Ok(report);
        }
        prev_hash = match check_link(&prev_hash, &stored) {
            Ok(hash) => hash,
            Err(e) => {
                report.violation = Some(format!("hash chain broken at seq {seq}: {e}"));
                return Ok(report);
            }
        };
        let envelope = match Envelope::decode_stored(&stored) {
            Ok(e) => e,
            Err(e) => {
                report.violation = Some(format!("seq {seq} does not decode: {e}"));
                return Ok(report);
            }
        };
        if envelope.seq != seq {
            report.violation = Some(format!("record under seq {seq} says seq {}", envelope.seq));
            return Ok(report);
        }
        let last = versions.entry(envelope.stream.clone()).or_insert(0);
        if envelope.version != *last + 1 {
            report.violation = Some(format!(
                "stream {} jumps from version {} to {} at seq {seq}",
                envelope.stream, last, envelope.version
            ));
            return Ok(report);
        }
        *last = envelope.version;
        report.records += 1;
        report.last_hash = Some(prev_hash);
        if report.records.is_multiple_of(65_536) {
            progress(report.records, head);
        }
    }
    progress(report.records, head);
    report.streams = versions.len() as u64;

    // The index: contiguous per stream, pointing at the right records, covering all of them.
    let mut indexed: HashMap<String, u64> = HashMap::new();
    for entry in store.index_entries() {
        let (stream, entry) = entry?;
        report.index_entries += 1;
        let covered = indexed.entry(stream.clone()).or_insert(0);
        if entry.first_version != *covered + 1 {
            report.violation = Some(format!(
                "index of {stream} jumps from version {covered} to {}",
                entry.first_version
            ));
            return Ok(report);
        }
        for (seq, version) in entry.positions() {
            let stored = store.raw_records(seq).next().transpose()?;
            let holds = match &stored {
                Some((at, bytes)) if *at == seq => Envelope::decode_stored(bytes)
                    .map(|e| e.stream == stream && e.version == version)
                    .unwrap_or(false),
                _ => false,
            };
            if !holds {
                report.violation = Some(format!(
                    "index says {stream}@{version} is at seq {seq}, the log disagrees"
                ));
                return Ok(report);
            }
        }
        *covered = entry.last_version();
    }
    if indexed != versions {
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
        report.violation = Some(format!("index incomplete: {missing}"));
    }
    Ok(report)
}
