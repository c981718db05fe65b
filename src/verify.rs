//! `hongbao verify`: walks the whole log and checks what the journal promises.
//!
//! - the hash chain: every record's `prev_hash` is its predecessor's hash and its `hash` is
//!   SHA-256 over `prev_hash` and its record bytes;
//! - the global sequence: keys and records agree, start at 1, no gaps;
//! - per-stream versions: each stream's events are numbered 1, 2, 3, ... in log order;
//! - the stream index: on sled, every entry points at records of its stream with its versions,
//!   entries of a stream are contiguous, and they cover exactly the events the log holds; on
//!   JetStream, every record is filed under its stream's subject and each subject's last
//!   record is its stream's last version (the reads an actor's activation relies on).
//!
//! Reports the first break by sequence number and stops there: everything after a broken link
//! is unproven.

use crate::events::{check_link, Envelope, Log, RawRecord, StoreError, GENESIS_HASH};
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
    store: &dyn Log,
    mut progress: impl FnMut(u64, u64),
) -> Result<VerifyReport, StoreError> {
    let head = store.head();
    let mut report = VerifyReport::default();
    let mut prev_hash = GENESIS_HASH;
    let mut versions: HashMap<String, u64> = HashMap::new();

    for (expected_seq, record) in (1u64..).zip(store.stored_records(1)) {
        let RawRecord {
            seq,
            stored,
            subject,
        } = record?;
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
        if let Some(subject) = subject {
            let wanted = store.subject_of(&envelope.stream);
            if wanted.as_deref() != Some(subject.as_str()) {
                report.violation = Some(format!(
                    "seq {seq} of {} is filed under subject {subject}, not {}: reading its stream would miss it",
                    envelope.stream,
                    wanted.unwrap_or_default()
                ));
                return Ok(report);
            }
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

    let index = store.check_index(&versions)?;
    report.index_entries = index.entries;
    report.violation = index.violation;
    Ok(report)
}
