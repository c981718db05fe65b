//! The withdrawals view: every order's state (rebuilt with the aggregate's own `evolve`), the
//! open orders by creation time (for the compensation sweeper) and the parked payouts (the
//! dead-letter listing).
//!
//! Keys in `view:withdrawals`:
//! - `o` + order id -> the [`WithdrawalOrder`]
//! - `n` + created-at (i64 BE, offset) + order id -> () while the order is not final
//! - `d` + order id -> () while the order is parked and not yet final

use super::{decode_view, Projection, ViewTx};
use crate::domain::withdrawal::WithdrawalOrder;
use crate::domain::{Aggregate, Event};
use crate::events::{codec, Envelope, StoreError};
use crate::ids::Id;

pub const NAME: &str = "withdrawals";

fn order_key(order_id: &str) -> Vec<u8> {
    let mut key = vec![b'o'];
    key.extend_from_slice(order_id.as_bytes());
    key
}

/// Creation times sort as unsigned big-endian after flipping the sign bit.
fn open_key(created_at_ms: i64, order_id: &str) -> Vec<u8> {
    let mut key = vec![b'n'];
    key.extend_from_slice(&((created_at_ms as u64) ^ (1 << 63)).to_be_bytes());
    key.extend_from_slice(order_id.as_bytes());
    key
}

fn parked_key(order_id: &str) -> Vec<u8> {
    let mut key = vec![b'd'];
    key.extend_from_slice(order_id.as_bytes());
    key
}

pub struct WithdrawalsView;

impl Projection for WithdrawalsView {
    fn name(&self) -> &'static str {
        NAME
    }

    fn version(&self) -> u32 {
        1
    }

    fn apply(&self, tx: &mut ViewTx<'_>, envelope: &Envelope) -> Result<(), StoreError> {
        let Event::Withdrawal(event) = &envelope.event else {
            return Ok(());
        };
        let order_id = envelope.stream.strip_prefix("withdrawal:").ok_or_else(|| {
            StoreError::Corrupt(format!("withdrawal event on stream {}", envelope.stream))
        })?;
        let key = order_key(order_id);
        let mut order: WithdrawalOrder = match tx.get(&key)? {
            Some(bytes) => decode_view(&bytes)?,
            None => WithdrawalOrder::default(),
        };
        order.evolve(event);
        let open = open_key(order.created_at_ms, order_id);
        if order.is_final() {
            tx.remove(open);
            tx.remove(parked_key(order_id));
        } else {
            tx.insert(open, Vec::new());
            if order.parked {
                tx.insert(parked_key(order_id), Vec::new());
            }
        }
        tx.insert(key, codec::encode(&order)?);
        Ok(())
    }
}

fn io(e: sled::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

/// Open (not final) orders created before `cutoff_ms`, oldest first, at most `limit`.
pub fn open_before(tree: &sled::Tree, cutoff_ms: i64, limit: usize) -> Result<Vec<Id>, StoreError> {
    let start = vec![b'n'];
    let end = open_key(cutoff_ms, "");
    tree.range(start..end)
        .take(limit)
        .map(|item| {
            let (key, _) = item.map_err(io)?;
            let id = std::str::from_utf8(&key[9..])
                .map_err(|_| StoreError::Corrupt("order id".into()))?;
            Id::parse(id).map_err(|_| StoreError::Corrupt(format!("order id {id}")))
        })
        .collect()
}

/// Parked payouts (dead letters) not yet settled, with their orders: at most `limit`, by
/// order id, after `after` (from the first without), read with a range scan from there.
pub fn parked(
    tree: &sled::Tree,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<(String, WithdrawalOrder)>, StoreError> {
    use std::ops::Bound;
    let start = match after {
        Some(order_id) => Bound::Excluded(parked_key(order_id)),
        None => Bound::Included(vec![b'd']),
    };
    tree.range((start, Bound::Excluded(vec![b'd' + 1])))
        .take(limit)
        .map(|item| {
            let (key, _) = item.map_err(io)?;
            let order_id = String::from_utf8_lossy(&key[1..]).into_owned();
            let order = match tree.get(order_key(&order_id)).map_err(io)? {
                Some(bytes) => decode_view(&bytes)?,
                None => WithdrawalOrder::default(),
            };
            Ok((order_id, order))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parked_orders_page_by_order_id_from_the_cursor() {
        // Goal: item 13: pages of the parked listing start after the cursor, cover every
        // parked order once and nothing else (open orders, other keys).
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let tree = db.open_tree("view:withdrawals").unwrap();
        for i in 0..7 {
            tree.insert(parked_key(&format!("p-{i}")), Vec::new())
                .unwrap();
        }
        tree.insert(open_key(5, "p-0"), Vec::new()).unwrap();
        tree.insert(b"e-after-d", Vec::new()).unwrap();
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = parked(&tree, after.as_deref(), 3).unwrap();
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            seen.extend(page.into_iter().map(|(id, _)| id));
        }
        let expected: Vec<String> = (0..7).map(|i| format!("p-{i}")).collect();
        assert_eq!(seen, expected);
    }
}
