//! The one place that turns records and states into bytes and back.
//!
//! Every stored value starts with a format byte. Today there is one format,
//! [`FORMAT_BINCODE2`]: bincode 2.0.1 (pinned with `=` in Cargo.toml) in its standard
//! configuration (little endian, variable-length integers) over serde. bincode is unmaintained
//! upstream (RUSTSEC-2025-0141); when it is replaced, the new encoder gets a new format byte
//! and the decoder for byte 1 stays here, so old logs are read as they are, never rewritten.
//! Hashes are computed over the stored bytes, so the hash chain never depends on re-encoding.

use crate::domain::Event;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// bincode 2.0.1, standard configuration, serde data model.
pub const FORMAT_BINCODE2: u8 = 1;
/// The format new records are written in.
pub const FORMAT_CURRENT: u8 = FORMAT_BINCODE2;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("empty value")]
    Empty,
    #[error("unknown format byte {0}")]
    UnknownFormat(u8),
    #[error("cannot decode: {0}")]
    Decode(String),
    #[error("cannot encode: {0}")]
    Encode(String),
    #[error("{0} trailing bytes after the value")]
    Trailing(usize),
}

/// The part of a log record that is encoded; the hashes are stored around it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordBody {
    pub seq: u64,
    pub stream: String,
    pub version: u64,
    pub event_id: u128,
    pub correlation_id: String,
    pub recorded_at_ms: i64,
    pub schema_version: u16,
    pub event: Event,
}

/// Borrowing twin of [`RecordBody`] for encoding without clones. Same fields in the same order,
/// hence the same bytes.
#[derive(Serialize)]
pub struct RecordBodyRef<'a> {
    pub seq: u64,
    pub stream: &'a str,
    pub version: u64,
    pub event_id: u128,
    pub correlation_id: &'a str,
    pub recorded_at_ms: i64,
    pub schema_version: u16,
    pub event: &'a Event,
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Bytes a decoding may claim for what it builds, in all. A damaged record's length prefix
/// could otherwise ask for exabytes, and a failed allocation aborts the process (seen: the
/// fuzzed decoder asked for 7.4 EB): `verify`, `export` or an actor's activation would die on
/// one bad record instead of naming it. Far above anything valid (a snapshot is at most
/// 64 MiB encoded).
const DECODE_CLAIM_BYTES_MAX: usize = 1 << 30;

/// [`config`] with the claim limit; the encoding is the same bytes (the limit is checked only
/// while decoding).
fn decode_config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<DECODE_CLAIM_BYTES_MAX>,
> {
    config().with_limit::<DECODE_CLAIM_BYTES_MAX>()
}

/// Encodes any value as `[format byte][bytes]`.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(128);
    out.push(FORMAT_CURRENT);
    bincode::serde::encode_into_std_write(value, &mut out, config())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    Ok(out)
}

/// Encodes like [`encode`] unless the encoding would exceed `max` bytes: then `None`, having
/// written (and spent) no more than `max` bytes, however large the value.
pub fn encode_capped<T: Serialize + ?Sized>(
    value: &T,
    max: usize,
) -> Result<Option<Vec<u8>>, CodecError> {
    struct Capped {
        out: Vec<u8>,
        max: usize,
        over: bool,
    }
    impl std::io::Write for Capped {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            if self.out.len() + bytes.len() > self.max {
                self.over = true;
                return Err(std::io::Error::other("over the cap"));
            }
            self.out.extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut capped = Capped {
        out: Vec::with_capacity(128),
        max,
        over: false,
    };
    capped.out.push(FORMAT_CURRENT);
    match bincode::serde::encode_into_std_write(value, &mut capped, config()) {
        Ok(_) => Ok(Some(capped.out)),
        Err(_) if capped.over => Ok(None),
        Err(e) => Err(CodecError::Encode(e.to_string())),
    }
}

/// Decodes a value written by [`encode`] in any format this build knows.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (&format, rest) = bytes.split_first().ok_or(CodecError::Empty)?;
    match format {
        FORMAT_BINCODE2 => {
            let (value, used) = bincode::serde::decode_from_slice(rest, decode_config())
                .map_err(|e| CodecError::Decode(e.to_string()))?;
            if used != rest.len() {
                return Err(CodecError::Trailing(rest.len() - used));
            }
            Ok(value)
        }
        other => Err(CodecError::UnknownFormat(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_length_prefix_asking_for_exabytes_is_an_error_not_an_abort() {
        // Goal: a damaged length prefix (varint marker 0xFD: a u64 follows) is refused; the
        // process aborted on the allocation before the claim limit.
        let mut bytes = vec![FORMAT_CURRENT, 0xFD];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode::<String>(&bytes).is_err());
        assert!(decode::<Vec<u8>>(&bytes).is_err());
        assert!(decode::<Vec<u64>>(&bytes).is_err());
    }
    use crate::domain::wallet::{Entry, Line, WalletEvent};
    use crate::ids::Id;
    use crate::money::Fen;

    fn body() -> RecordBody {
        RecordBody {
            seq: 7,
            stream: "wallet:u1".into(),
            version: 3,
            event_id: 42,
            correlation_id: "d1".into(),
            recorded_at_ms: 1_700_000_000_000,
            schema_version: 1,
            event: Event::Wallet(WalletEvent::Credited(Line {
                entry: Entry::Deposit,
                order_id: Id::parse("d1").unwrap(),
                amount: Fen::new(5),
                balance_after: Fen::new(5),
                source: None,
            })),
        }
    }

    #[test]
    fn a_capped_encoding_is_the_encoding_below_the_cap_and_none_above_it() {
        // Goal: snapshots of huge states are refused without encoding them whole.
        let b = body();
        let full = encode(&b).unwrap();
        assert_eq!(encode_capped(&b, full.len()).unwrap(), Some(full.clone()));
        assert_eq!(encode_capped(&b, full.len() - 1).unwrap(), None);
        let huge = vec![7u8; 1 << 20];
        assert_eq!(encode_capped(&huge, 4096).unwrap(), None);
    }

    #[test]
    fn borrowed_and_owned_bodies_encode_identically_and_round_trip() {
        // Goal: the encoder that avoids clones writes exactly what the decoder reads.
        let b = body();
        let by_ref = RecordBodyRef {
            seq: b.seq,
            stream: &b.stream,
            version: b.version,
            event_id: b.event_id,
            correlation_id: &b.correlation_id,
            recorded_at_ms: b.recorded_at_ms,
            schema_version: b.schema_version,
            event: &b.event,
        };
        let bytes = encode(&by_ref).unwrap();
        assert_eq!(bytes, encode(&b).unwrap());
        assert_eq!(bytes[0], FORMAT_BINCODE2);
        assert_eq!(decode::<RecordBody>(&bytes).unwrap(), b);
    }

    #[test]
    fn unknown_format_and_garbage_are_typed_errors() {
        // Goal: a value from a future or broken writer is refused, not misread.
        let mut bytes = encode(&body()).unwrap();
        bytes[0] = 9;
        assert_eq!(
            decode::<RecordBody>(&bytes),
            Err(CodecError::UnknownFormat(9))
        );
        assert_eq!(decode::<RecordBody>(&[]), Err(CodecError::Empty));
        assert!(matches!(
            decode::<RecordBody>(&[1, 255, 255]),
            Err(CodecError::Decode(_))
        ));
        let mut long = encode(&body()).unwrap();
        long.push(0);
        assert_eq!(decode::<RecordBody>(&long), Err(CodecError::Trailing(1)));
    }
}
