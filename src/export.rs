//! `hongbao export` and `hongbao verify --export` (D3): the log as JSON lines that an auditor
//! can re-check with nothing but the file.
//!
//! Each line holds one record: `seq`, `stream`, `version`, `type`, `payload` (the event as
//! JSON), the record's other fields (`event_id`, `correlation_id`, `recorded_at_ms`,
//! `schema_version`) and its `prev_hash` and `hash` in hex. The hash is SHA-256 over the
//! previous hash and the record's canonical bytes; the verifier rebuilds those bytes from the
//! line, so a change to any field of any line (or a line removed, inserted or reordered) breaks
//! the chain at that line, and the verifier names it.

use crate::domain::Event;
use crate::events::{chain_hash, Envelope, Hash, Log, StoreError, GENESIS_HASH};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, Write};

/// One exported record.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportLine {
    pub seq: u64,
    pub stream: String,
    pub version: u64,
    #[serde(rename = "type")]
    pub type_name: String,
    pub payload: Event,
    /// Decimal (a u128 does not fit every JSON reader's numbers).
    pub event_id: String,
    pub correlation_id: String,
    pub recorded_at_ms: i64,
    pub schema_version: u16,
    pub prev_hash: String,
    pub hash: String,
}

impl ExportLine {
    pub fn from_envelope(e: Envelope) -> ExportLine {
        ExportLine {
            seq: e.seq,
            stream: e.stream,
            version: e.version,
            type_name: e.event.type_name().to_owned(),
            payload: e.event,
            event_id: e.event_id.to_string(),
            correlation_id: e.correlation_id,
            recorded_at_ms: e.recorded_at_ms,
            schema_version: e.schema_version,
            prev_hash: hex::encode(e.prev_hash),
            hash: hex::encode(e.hash),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing the export: {0}")]
    Io(#[from] std::io::Error),
    #[error("encoding seq {0}: {1}")]
    Encode(u64, String),
}

/// What an export wrote: its records and the head it ends at (D4: an auditor keeps the head
/// and checks a copy of the file against it with `verify --export FILE --expect-head HASH`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportSummary {
    pub records: u64,
    pub last_seq: Option<u64>,
    pub last_hash: Option<Hash>,
}

/// Writes records from `from` (1 = the whole log) as JSON lines.
pub fn export(
    store: &dyn Log,
    from: u64,
    out: &mut dyn Write,
    mut progress: impl FnMut(u64),
) -> Result<ExportSummary, ExportError> {
    let mut written = 0u64;
    let mut summary = ExportSummary::default();
    for record in store.stored_records(from.max(1)) {
        let record = record?;
        let (seq, stored) = (record.seq, record.stored);
        let envelope = Envelope::decode_stored(&stored)
            .map_err(|e| ExportError::Store(StoreError::Corrupt(format!("seq {seq}: {e}"))))?;
        summary.last_seq = Some(seq);
        summary.last_hash = Some(envelope.hash);
        let line = ExportLine::from_envelope(envelope);
        serde_json::to_writer(&mut *out, &line)
            .map_err(|e| ExportError::Encode(seq, e.to_string()))?;
        out.write_all(b"\n")?;
        written += 1;
        if written.is_multiple_of(65_536) {
            progress(written);
        }
    }
    out.flush()?;
    progress(written);
    summary.records = written;
    Ok(summary)
}

/// What `verify --export` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportReport {
    pub lines: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Hash of the last line that holds: the head the file ends at.
    pub last_hash: Option<Hash>,
    /// The hashes at the sequences asked for (`verify_export_at`), for signed checkpoints.
    pub hashes_at: HashMap<u64, Hash>,
    /// The first line that does not hold: its line number (from 1) and why.
    pub violation: Option<(u64, String)>,
}

impl ExportReport {
    pub fn ok(&self) -> bool {
        self.violation.is_none()
    }
}

fn parse_hash(field: &str, text: &str) -> Result<Hash, String> {
    // Exactly as exported (lower-case hex): one hash, one spelling.
    if text.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!("{field} is not lower-case hex"));
    }
    let bytes = hex::decode(text).map_err(|_| format!("{field} is not hex"))?;
    bytes
        .try_into()
        .map_err(|_| format!("{field} is not 32 bytes"))
}

/// Checks one line against the previous line's hash; returns its hash.
fn check_line(line: &str, prev: Option<&Hash>) -> Result<(ExportLine, Hash), String> {
    // Parsed straight into the line's type, which refuses a key given twice (a JSON value
    // would keep the last one silently, and a reader taking the first would see another
    // record), then as a value for the comparison below.
    let parsed: ExportLine =
        serde_json::from_str(line).map_err(|e| format!("not an export line: {e}"))?;
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not an export line: {e}"))?;
    let prev_hash = parse_hash("prev_hash", &parsed.prev_hash)?;
    let hash = parse_hash("hash", &parsed.hash)?;
    match prev {
        Some(expected) if *expected != prev_hash => {
            return Err("prev_hash is not the previous line's hash (a line removed, inserted or reordered before it)".into())
        }
        None if parsed.seq == 1 && prev_hash != GENESIS_HASH => {
            return Err("the first record's prev_hash is not the genesis hash".into())
        }
        _ => {}
    }
    if parsed.type_name != parsed.payload.type_name() {
        return Err(format!(
            "type {} does not match the payload ({})",
            parsed.type_name,
            parsed.payload.type_name()
        ));
    }
    let envelope = Envelope {
        seq: parsed.seq,
        stream: parsed.stream.clone(),
        version: parsed.version,
        event_id: parsed
            .event_id
            .parse()
            .ok()
            // Exactly as exported: no sign, no leading zero.
            .filter(|id: &u128| id.to_string() == parsed.event_id)
            .ok_or_else(|| "event_id is not a number as exported".to_string())?,
        correlation_id: parsed.correlation_id.clone(),
        recorded_at_ms: parsed.recorded_at_ms,
        schema_version: parsed.schema_version,
        event: parsed.payload.clone(),
        prev_hash,
        hash,
    };
    let record = envelope
        .encode_record()
        .map_err(|e| format!("cannot encode: {e}"))?;
    if chain_hash(&prev_hash, &record) != hash {
        return Err("hash does not match the line's contents (the record was altered)".into());
    }
    // Nothing in the line beside its record: a field added (which the hash does not cover
    // and a reader might take for part of the record) or one left out (a null read back as
    // the default) is an edit. Key order, whitespace and escapes are the JSON's own: a file
    // passed through `jq -c` still verifies.
    match serde_json::to_value(&parsed) {
        Ok(exported) if exported == value => {}
        _ => {
            return Err(
                "the line holds fields its record does not, or lacks some (edited; its record is intact)"
                    .into(),
            )
        }
    }
    Ok((parsed, hash))
}

/// Re-checks an export with nothing but the file: every line parses, its hash covers its
/// contents, it links to the line before, sequences are contiguous and each stream's versions
/// continue by one. A file from `--from 1` must start at the genesis hash; a later start is
/// taken as the anchor. Stops at the first line that does not hold.
pub fn verify_export(
    input: &mut dyn BufRead,
    progress: impl FnMut(u64),
) -> Result<ExportReport, std::io::Error> {
    verify_export_at(input, &HashSet::new(), progress)
}

/// As [`verify_export`], also keeping the hash at each of `seqs` (in `hashes_at`).
pub fn verify_export_at(
    input: &mut dyn BufRead,
    seqs: &HashSet<u64>,
    mut progress: impl FnMut(u64),
) -> Result<ExportReport, std::io::Error> {
    let mut report = ExportReport::default();
    let mut prev: Option<Hash> = None;
    let mut versions: HashMap<String, u64> = HashMap::new();
    let mut text = String::new();
    loop {
        text.clear();
        if input.read_line(&mut text)? == 0 {
            break;
        }
        let n = report.lines + 1;
        let line = text.trim_end_matches(['\n', '\r']);
        let (parsed, hash) = match check_line(line, prev.as_ref()) {
            Ok(ok) => ok,
            Err(why) => {
                report.violation = Some((n, why));
                return Ok(report);
            }
        };
        if let Some(last) = report.last_seq {
            if parsed.seq != last + 1 {
                report.violation =
                    Some((n, format!("seq {} follows seq {last} (a gap)", parsed.seq)));
                return Ok(report);
            }
        }
        let first_from_genesis = report.first_seq.unwrap_or(parsed.seq) == 1;
        match versions.get(&parsed.stream) {
            Some(v) if parsed.version != v + 1 => {
                report.violation = Some((
                    n,
                    format!(
                        "stream {} jumps from version {v} to {}",
                        parsed.stream, parsed.version
                    ),
                ));
                return Ok(report);
            }
            None if first_from_genesis && parsed.version != 1 => {
                report.violation = Some((
                    n,
                    format!(
                        "stream {} starts at version {}",
                        parsed.stream, parsed.version
                    ),
                ));
                return Ok(report);
            }
            _ => {}
        }
        versions.insert(parsed.stream, parsed.version);
        report.first_seq.get_or_insert(parsed.seq);
        report.last_seq = Some(parsed.seq);
        report.last_hash = Some(hash);
        if seqs.contains(&parsed.seq) {
            report.hashes_at.insert(parsed.seq, hash);
        }
        report.lines = n;
        prev = Some(hash);
        if n.is_multiple_of(65_536) {
            progress(n);
        }
    }
    progress(report.lines);
    Ok(report)
}
