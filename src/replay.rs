//! `hongbao replay --stream ID [--until SEQ | --at RFC3339]` (D4): a stream's state as of a
//! point in the log, for support and disputes. The stream's events up to that point are folded
//! through the aggregate's own `evolve`, exactly as an actor would on activation.

use crate::clock::Millis;
use crate::domain::activity::Activity;
use crate::domain::coupon::{CouponBatch, CouponGroup, CouponIntake};
use crate::domain::packet::Packet;
use crate::domain::switches::Switches;
use crate::domain::wallet::Wallet;
use crate::domain::withdrawal::{Payee, PolicyState, WithdrawalOrder};
use crate::domain::Aggregate;
use crate::events::{Envelope, EventStore, StoreError};
use serde::Serialize;

/// Where to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// Every event of the stream.
    End,
    /// Events at or below this global sequence number.
    Seq(u64),
    /// Events recorded at or before this time.
    At(Millis),
}

impl Until {
    fn admits(self, e: &Envelope) -> bool {
        match self {
            Until::End => true,
            Until::Seq(seq) => e.seq <= seq,
            Until::At(ms) => e.recorded_at_ms <= ms,
        }
    }
}

/// One event applied.
#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    pub seq: u64,
    pub version: u64,
    pub recorded_at_ms: Millis,
    #[serde(rename = "type")]
    pub type_name: &'static str,
    pub correlation_id: String,
}

/// The state of a stream as of a point.
#[derive(Debug, Clone, Serialize)]
pub struct Replayed {
    pub stream: String,
    /// The stream's version at that point (0: no event yet).
    pub version: u64,
    /// Events of the stream after that point (not applied).
    pub later_events: usize,
    pub applied: Vec<Applied>,
    /// The aggregate's state as JSON, or as Rust debug text where its maps have tuple keys.
    pub state: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no events for stream {0:?} (streams look like wallet:u42, packet:pk-1)")]
    UnknownStream(String),
    #[error("unknown stream kind {0:?}; known: {1}")]
    UnknownKind(String, String),
    #[error("stream {stream}: event {seq} does not belong to a {kind} stream")]
    Mismatch {
        stream: String,
        seq: u64,
        kind: &'static str,
    },
}

fn fold<A: Aggregate + std::fmt::Debug>(
    stream: &str,
    events: &[Envelope],
) -> Result<serde_json::Value, ReplayError> {
    let mut state = A::default();
    for e in events {
        let event = A::unwrap(&e.event).ok_or(ReplayError::Mismatch {
            stream: stream.to_owned(),
            seq: e.seq,
            kind: A::STREAM_PREFIX,
        })?;
        state.evolve(event);
    }
    // Some states key maps by tuples, which JSON cannot: those are shown as Rust debug text.
    Ok(serde_json::to_value(&state)
        .unwrap_or_else(|_| serde_json::Value::String(format!("{state:#?}"))))
}

const KINDS: &[&str] = &[
    "wallet",
    "activity",
    "withdrawal",
    "policy",
    "payee",
    "packet",
    "coupon-intake",
    "coupon-batch",
    "coupon-group",
    "switches",
    "order-ids",
];

/// Replays `stream` up to `until`.
pub fn replay(store: &dyn EventStore, stream: &str, until: Until) -> Result<Replayed, ReplayError> {
    let all = store.read_stream(stream, 1)?;
    if all.is_empty() {
        return Err(ReplayError::UnknownStream(stream.to_owned()));
    }
    let kind = stream.split(':').next().unwrap_or_default();
    let cut = all.iter().take_while(|e| until.admits(e)).count();
    let events = &all[..cut];
    let state = match kind {
        "wallet" => fold::<Wallet>(stream, events)?,
        "activity" => fold::<Activity>(stream, events)?,
        "withdrawal" => fold::<WithdrawalOrder>(stream, events)?,
        "policy" => fold::<PolicyState>(stream, events)?,
        "payee" => fold::<Payee>(stream, events)?,
        "packet" => fold::<Packet>(stream, events)?,
        "coupon-intake" => fold::<CouponIntake>(stream, events)?,
        "coupon-batch" => fold::<CouponBatch>(stream, events)?,
        "coupon-group" => fold::<CouponGroup>(stream, events)?,
        "switches" => fold::<Switches>(stream, events)?,
        "order-ids" => fold::<crate::domain::order_ids::OrderIds>(stream, events)?,
        other => return Err(ReplayError::UnknownKind(other.to_owned(), KINDS.join(", "))),
    };
    Ok(Replayed {
        stream: stream.to_owned(),
        version: events.last().map_or(0, |e| e.version),
        later_events: all.len() - cut,
        applied: events
            .iter()
            .map(|e| Applied {
                seq: e.seq,
                version: e.version,
                recorded_at_ms: e.recorded_at_ms,
                type_name: e.event.type_name(),
                correlation_id: e.correlation_id.clone(),
            })
            .collect(),
        state,
    })
}
