//! The wallet view: balances and the ledger (every movement with the balance after it),
//! latest first and paged by sequence.
//!
//! Keys in `view:wallets`:
//! - `b` + uid -> [`Balances`]
//! - `l` + uid + `0x00` + seq (u64 BE) -> [`LedgerEntry`]

use super::{decode_view, Projection, ViewTx};
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

fn balances_key(uid: &str) -> Vec<u8> {
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

/// The wallet projection.
pub struct WalletView;

impl Projection for WalletView {
    fn name(&self) -> &'static str {
        NAME
    }

    fn version(&self) -> u32 {
        2
    }

    fn apply(&self, tx: &mut ViewTx<'_>, envelope: &Envelope) -> Result<(), StoreError> {
        let Event::Wallet(event) = &envelope.event else {
            return Ok(());
        };
        let uid = envelope.stream.strip_prefix("wallet:").ok_or_else(|| {
            StoreError::Corrupt(format!("wallet event on stream {}", envelope.stream))
        })?;
        let line = event.line();
        let direction = match event {
            WalletEvent::Credited(_) => Direction::Credit,
            WalletEvent::Debited(_) => Direction::Debit,
        };
        let key = balances_key(uid);
        let mut balances: Balances = match tx.get(&key)? {
            Some(bytes) => decode_view(&bytes)?,
            None => Balances::default(),
        };
        match line.entry.account() {
            Account::Activity => balances.activity = line.balance_after,
            Account::Change => balances.change = line.balance_after,
            Account::Subsidy => balances.subsidy = line.balance_after,
        }
        tx.insert(key, codec::encode(&balances)?);
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

/// A wallet's balances (zero for a wallet never seen).
pub fn balances(tree: &sled::Tree, uid: &str) -> Result<Balances, StoreError> {
    match tree
        .get(balances_key(uid))
        .map_err(|e| StoreError::Io(e.to_string()))?
    {
        Some(bytes) => decode_view(&bytes),
        None => Ok(Balances::default()),
    }
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
        .map(|item| {
            let (_, value) = item.map_err(|e| StoreError::Io(e.to_string()))?;
            decode_view(&value)
        })
        .collect()
}
