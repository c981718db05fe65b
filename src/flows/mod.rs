//! Time- and log-driven processes. Each follows the global log from a checkpoint of its own,
//! applies effects through actors (whose commands are idempotent, so at-least-once consumption
//! gives exactly-once effect) and paces itself with rate limiters.
//!
//! - [`reward_lanes`]: credit accepted rewards to wallets, per kind, rate-limited, cash first.
//! - [`packets`]: red packet payment, share transfers, expiry and refunds.
//! - [`withdrawals`]: the withdrawal request flow, payout lanes, compensation, reconciliation.

pub mod packets;
pub mod reward_lanes;
pub mod withdrawals;

use crate::events::StoreError;

/// The sled tree holding every flow's checkpoint.
pub const CHECKPOINT_TREE: &str = "flows";

/// A flow's stored checkpoint (the last sequence it has fully handled), 0 if none.
pub fn load_checkpoint(tree: &sled::Tree, flow: &str) -> Result<u64, StoreError> {
    match tree.get(flow).map_err(|e| StoreError::Io(e.to_string()))? {
        None => Ok(0),
        Some(v) => {
            Ok(u64::from_be_bytes(v.as_ref().try_into().map_err(|_| {
                StoreError::Corrupt(format!("checkpoint of {flow}"))
            })?))
        }
    }
}

/// Stores a flow's checkpoint. Not flushed here: the journal's flushes (and sled's own) make it
/// durable soon, and a checkpoint that falls back after a crash only causes idempotent repeats.
pub fn save_checkpoint(tree: &sled::Tree, flow: &str, seq: u64) -> Result<(), StoreError> {
    tree.insert(flow, &seq.to_be_bytes())
        .map_err(|e| StoreError::Io(e.to_string()))?;
    Ok(())
}
