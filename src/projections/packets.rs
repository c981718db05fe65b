//! The red packets view (P3, P8): each packet's summary (remaining count and amount, best
//! luck), its claims, and the live packets by deadline (for the expiry flow).
//!
//! Keys in `view:packets`:
//! - `p` + packet id -> [`PacketSummary`]
//! - `c` + packet id + `0x00` + claim index (u32 BE) -> [`ClaimLine`]
//! - `x` + deadline (i64, sign bit flipped, BE) + packet id -> () while the packet is neither
//!   exhausted nor refunded

use super::{decode_view, Projection, ViewTx};
use crate::clock::Millis;
use crate::domain::packet::{Mode, PacketEvent, PacketState};
use crate::domain::Event;
use crate::events::{codec, Envelope, StoreError};
use crate::ids::Id;
use crate::money::Fen;
use serde::{Deserialize, Serialize};

pub const NAME: &str = "packets";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PacketSummary {
    pub mode: Mode,
    pub sender_uid: String,
    pub state: PacketState,
    pub total: Fen,
    pub count: u32,
    pub claimed_count: u32,
    pub claimed_amount: Fen,
    /// The best luck so far: (uid, amount); the earliest claim wins a tie.
    pub best: Option<(String, Fen)>,
    pub expires_at_ms: Millis,
    pub refunded: Option<Fen>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimLine {
    pub uid: String,
    pub amount: Fen,
    pub at_ms: Millis,
}

fn summary_key(packet_id: &str) -> Vec<u8> {
    let mut key = vec![b'p'];
    key.extend_from_slice(packet_id.as_bytes());
    key
}

fn claims_prefix(packet_id: &str) -> Vec<u8> {
    let mut key = vec![b'c'];
    key.extend_from_slice(packet_id.as_bytes());
    key.push(0);
    key
}

fn deadline_key(expires_at_ms: Millis, packet_id: &str) -> Vec<u8> {
    let mut key = vec![b'x'];
    key.extend_from_slice(&((expires_at_ms as u64) ^ (1 << 63)).to_be_bytes());
    key.extend_from_slice(packet_id.as_bytes());
    key
}

pub struct PacketsView;

impl Projection for PacketsView {
    fn name(&self) -> &'static str {
        NAME
    }

    fn version(&self) -> u32 {
        1
    }

    fn apply(&self, tx: &mut ViewTx<'_>, envelope: &Envelope) -> Result<(), StoreError> {
        let Event::Packet(event) = &envelope.event else {
            return Ok(());
        };
        let packet_id = envelope.stream.strip_prefix("packet:").ok_or_else(|| {
            StoreError::Corrupt(format!("packet event on stream {}", envelope.stream))
        })?;
        let key = summary_key(packet_id);
        let mut summary = match (event, tx.get(&key)?) {
            (PacketEvent::Created { spec, .. }, _) => {
                tx.insert(deadline_key(spec.expires_at_ms, packet_id), Vec::new());
                PacketSummary {
                    mode: spec.mode,
                    sender_uid: spec.sender_uid.to_string(),
                    state: PacketState::PendingPayment,
                    total: spec.total,
                    count: spec.count,
                    claimed_count: 0,
                    claimed_amount: Fen::ZERO,
                    best: None,
                    expires_at_ms: spec.expires_at_ms,
                    refunded: None,
                }
            }
            (_, Some(bytes)) => decode_view(&bytes)?,
            (_, None) => {
                return Err(StoreError::Corrupt(format!(
                    "packet {packet_id} has events before its creation"
                )))
            }
        };
        match event {
            PacketEvent::Created { .. } => {}
            PacketEvent::Paid { .. } => summary.state = PacketState::Active,
            PacketEvent::ShareClaimed {
                uid,
                index,
                amount,
                at_ms,
            } => claimed(tx, packet_id, &mut summary, uid, *index, *amount, *at_ms)?,
            PacketEvent::SharesClaimed { claims } => {
                for c in claims {
                    claimed(
                        tx,
                        packet_id,
                        &mut summary,
                        &c.uid,
                        c.index,
                        c.amount,
                        c.at_ms,
                    )?;
                }
            }
            PacketEvent::Expired { .. } => summary.state = PacketState::Expired,
            PacketEvent::Refunded { amount, .. } => {
                summary.refunded = Some(*amount);
                tx.remove(deadline_key(summary.expires_at_ms, packet_id));
            }
        }
        tx.insert(key, codec::encode(&summary)?);
        Ok(())
    }
}

/// One claim in the packet's summary and claim list.
#[allow(clippy::too_many_arguments)]
fn claimed(
    tx: &mut ViewTx<'_>,
    packet_id: &str,
    summary: &mut PacketSummary,
    uid: &Id,
    index: u32,
    amount: Fen,
    at_ms: Millis,
) -> Result<(), StoreError> {
    summary.claimed_count += 1;
    summary.claimed_amount = summary
        .claimed_amount
        .checked_add(amount)
        .unwrap_or(summary.claimed_amount);
    if summary.best.as_ref().is_none_or(|(_, best)| amount > *best) {
        summary.best = Some((uid.to_string(), amount));
    }
    let mut claim_key = claims_prefix(packet_id);
    claim_key.extend_from_slice(&index.to_be_bytes());
    tx.insert(
        claim_key,
        codec::encode(&ClaimLine {
            uid: uid.to_string(),
            amount,
            at_ms,
        })?,
    );
    if summary.claimed_count == summary.count {
        summary.state = PacketState::Exhausted;
        tx.remove(deadline_key(summary.expires_at_ms, packet_id));
    }
    Ok(())
}

fn io(e: sled::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

pub fn summary(tree: &sled::Tree, packet_id: &str) -> Result<Option<PacketSummary>, StoreError> {
    tree.get(summary_key(packet_id))
        .map_err(io)?
        .map(|b| decode_view(&b))
        .transpose()
}

/// A packet's claims in claim order (at most `limit`).
pub fn claims(
    tree: &sled::Tree,
    packet_id: &str,
    limit: usize,
) -> Result<Vec<ClaimLine>, StoreError> {
    tree.scan_prefix(claims_prefix(packet_id))
        .take(limit)
        .map(|item| decode_view(&item.map_err(io)?.1))
        .collect()
}

/// Live packets whose deadline is at or before `now_ms`, earliest first (at most `limit`).
pub fn due(
    tree: &sled::Tree,
    now_ms: Millis,
    limit: usize,
) -> Result<Vec<(Id, Millis)>, StoreError> {
    let start = vec![b'x'];
    let end = deadline_key(now_ms.saturating_add(1), "");
    tree.range(start..end)
        .take(limit)
        .map(|item| {
            let (key, _) = item.map_err(io)?;
            let at =
                (u64::from_be_bytes(key[1..9].try_into().expect("8 bytes")) ^ (1 << 63)) as i64;
            let id = std::str::from_utf8(&key[9..])
                .map_err(|_| StoreError::Corrupt("packet id".into()))?;
            Ok((
                Id::parse(id).map_err(|_| StoreError::Corrupt(format!("packet id {id}")))?,
                at,
            ))
        })
        .collect()
}
