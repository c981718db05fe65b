//! The wallet view: balances, pending rewards (R6) and the ledger (every movement with the
//! balance after it), latest first and paged by sequence.
//!
//! Keys in `view:wallets`:
//! - `b` + uid -> [`WalletRecord`]: balances and pending rewards in one value, so that a read
//!   of the wallet page sees a reward either pending or credited, never both or neither;
//! - `l` + uid + `0x00` + seq (u64 BE) -> [`LedgerEntry`].

use super::{decode_view, Projection, ViewTx};
use crate::domain::activity::{ActivityEvent, RewardKind};
use crate::domain::wallet::{Account, Entry, WalletEvent};
use crate::domain::Event;
use crate::events::{codec, Envelope, StoreError};
use crate::money::Fen;
use serde::{Deserialize, Serialize};

pub const NAME: &str = "wallets";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balances {
    pub activity: Fen,
    pub change: Fen,
    pub subsidy: Fen,
}

/// A reward accepted for the user and not yet credited, delivered or voided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingReward {
    pub activity_id: String,
    pub order_id: String,
    pub kind: RewardKind,
    pub amount: Fen,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalletRecord {
    pub balances: Balances,
    /// In acceptance order.
    pub pending: Vec<PendingReward>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Credit,
    Debit,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub seq: u64,
    pub at_ms: i64,
    pub entry: Entry,
    pub account: Account,
    pub direction: Direction,
    pub amount: Fen,
    pub order_id: String,
    pub balance_after: Fen,
    /// The activity a reward came from.
    pub source: Option<String>,
}

fn record_key(uid: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(uid.len() + 1);
    key.push(b'b');
    key.extend_from_slice(uid.as_bytes());
    key
}

fn ledger_prefix(uid: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(uid.len() + 10);
    key.push(b'l');
    key.extend_from_slice(uid.as_bytes());
    key.push(0);
    key
}

fn ledger_key(uid: &str, seq: u64) -> Vec<u8> {
    let mut key = ledger_prefix(uid);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn load(tx: &ViewTx<'_>, uid: &str) -> Result<WalletRecord, StoreError> {
    match tx.get(&record_key(uid))? {
        Some(bytes) => decode_view(&bytes),
        None => Ok(WalletRecord::default()),
    }
}

fn store(tx: &mut ViewTx<'_>, uid: &str, record: &WalletRecord) -> Result<(), StoreError> {
    tx.insert(record_key(uid), codec::encode(record)?);
    Ok(())
}

fn settle(
    tx: &mut ViewTx<'_>,
    uid: &str,
    activity: &str,
    order_id: &str,
) -> Result<(), StoreError> {
    let mut record = load(tx, uid)?;
    let before = record.pending.len();
    record
        .pending
        .retain(|p| !(p.order_id == order_id && p.activity_id == activity));
    if record.pending.len() != before {
        store(tx, uid, &record)?;
    }
    Ok(())
}

/// The wallet projection.
pub struct WalletView;

impl WalletView {
    fn apply_wallet(
        &self,
        tx: &mut ViewTx<'_>,
        envelope: &Envelope,
        event: &WalletEvent,
    ) -> Result<(), StoreError> {
        let uid = envelope.stream.strip_prefix("wallet:").ok_or_else(|| {
            StoreError::Corrupt(format!("wallet event on stream {}", envelope.stream))
        })?;
        let line = event.line();
        let direction = match event {
            WalletEvent::Credited(_) => Direction::Credit,
            WalletEvent::Debited(_) => Direction::Debit,
        };
        let mut record = load(tx, uid)?;
        match line.entry.account() {
            Account::Activity => record.balances.activity = line.balance_after,
            Account::Change => record.balances.change = line.balance_after,
            Account::Subsidy => record.balances.subsidy = line.balance_after,
        }
        // A reward credit settles its pending line in the same write as the balance.
        if let (Entry::Reward | Entry::SubsidyReward, Some(source)) = (line.entry, &line.source) {
            record.pending.retain(|p| {
                !(p.order_id == line.order_id.as_str() && p.activity_id == source.as_str())
            });
        }
        store(tx, uid, &record)?;
        let entry = LedgerEntry {
            seq: envelope.seq,
            at_ms: envelope.recorded_at_ms,
            entry: line.entry,
            account: line.entry.account(),
            direction,
            amount: line.amount,
            order_id: line.order_id.to_string(),
            balance_after: line.balance_after,
            source: line.source.as_ref().map(|s| s.to_string()),
        };
        tx.insert(ledger_key(uid, envelope.seq), codec::encode(&entry)?);
        Ok(())
    }
}

impl Projection for WalletView {
    fn name(&self) -> &'static str {
        NAME
    }

    fn version(&self) -> u32 {
        3
    }

    fn apply(&self, tx: &mut ViewTx<'_>, envelope: &Envelope) -> Result<(), StoreError> {
        match &envelope.event {
            Event::Wallet(event) => self.apply_wallet(tx, envelope, event),
            Event::Activity(event) => {
                let activity = envelope
                    .stream
                    .strip_prefix("activity:")
                    .unwrap_or_default();
                match event {
                    ActivityEvent::RewardAccepted(reward) => {
                        let uid = reward.uid.as_str();
                        let mut record = load(tx, uid)?;
                        record.pending.push(PendingReward {
                            activity_id: activity.to_owned(),
                            order_id: reward.order_id.to_string(),
                            kind: reward.kind,
                            amount: reward.amount,
                        });
                        store(tx, uid, &record)
                    }
                    ActivityEvent::RewardDelivered { order_id, uid }
                    | ActivityEvent::RewardVoided { order_id, uid, .. } => {
                        settle(tx, uid.as_str(), activity, order_id.as_str())
                    }
                    ActivityEvent::BudgetSet(_) => Ok(()),
                }
            }
        }
    }
}

fn io(e: sled::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

/// A wallet's balances and pending rewards (empty for a wallet never seen): one consistent read.
pub fn record(tree: &sled::Tree, uid: &str) -> Result<WalletRecord, StoreError> {
    match tree.get(record_key(uid)).map_err(io)? {
        Some(bytes) => decode_view(&bytes),
        None => Ok(WalletRecord::default()),
    }
}

/// A wallet's balances (zero for a wallet never seen).
pub fn balances(tree: &sled::Tree, uid: &str) -> Result<Balances, StoreError> {
    Ok(record(tree, uid)?.balances)
}

/// Up to `limit` ledger entries with `seq < before` (all if `before` is `None`), latest first.
pub fn ledger(
    tree: &sled::Tree,
    uid: &str,
    before: Option<u64>,
    limit: usize,
) -> Result<Vec<LedgerEntry>, StoreError> {
    let start = ledger_prefix(uid);
    let end = ledger_key(uid, before.unwrap_or(u64::MAX));
    tree.range(start..end)
        .rev()
        .take(limit)
        .map(|item| decode_view(&item.map_err(io)?.1))
        .collect()
}
