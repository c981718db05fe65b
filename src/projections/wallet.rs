//! The wallet view: balances, pending rewards (R6) and the ledger (every movement with the
//! balance after it), latest first and paged by sequence.
//!
//! Keys in `view:wallets`:
//! - `b` + uid -> [`BalanceRecord`]: the balances and a version bumped on every change;
//! - `p` + uid + `0x00` + activity + `0x00` + order id -> [`PendingReward`];
//! - `l` + uid + `0x00` + seq (u64 BE) -> [`LedgerEntry`];
//! - `u` + uid + `0x00` + subsidy order id -> the packet id it paid (a `PacketSubsidy` debit):
//!   a point lookup for "is this subsidy spent?" (P7), whatever page the debit is on.
//!
//! A credit removes its pending key and changes the balance in one atomic batch. A reader
//! ([`record`]) reads the balance record, scans the pending keys, and reads the balance record
//! again; if its version moved, a credit committed in between and it reads again. So a reward
//! is seen either pending or credited, never both or neither, and accepting a reward costs a
//! single small write (no read-modify-write of the user's record).

use super::{decode_view, Projection, ViewTx};
use crate::domain::activity::{activity_of_stream, ActivityEvent, RewardKind};
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

/// What `b` + uid holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceRecord {
    pub balances: Balances,
    /// Bumped on every change, so a reader can tell that a credit committed under it.
    pub version: u64,
}

/// A consistent read of a wallet: balances and pending rewards as of one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalletRecord {
    pub balances: Balances,
    /// By activity and order id.
    pub pending: Vec<PendingReward>,
}

/// Attempts at a consistent read before answering with the last one (a wallet credited
/// continuously); each attempt is two point reads and one short scan.
const CONSISTENT_READ_ATTEMPTS_MAX: usize = 16;

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

fn pending_prefix(uid: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(uid.len() + 2);
    key.push(b'p');
    key.extend_from_slice(uid.as_bytes());
    key.push(0);
    key
}

fn pending_key(uid: &str, activity: &str, order_id: &str) -> Vec<u8> {
    let mut key = pending_prefix(uid);
    key.extend_from_slice(activity.as_bytes());
    key.push(0);
    key.extend_from_slice(order_id.as_bytes());
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

fn used_subsidy_key(uid: &str, order_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(uid.len() + order_id.len() + 2);
    key.push(b'u');
    key.extend_from_slice(uid.as_bytes());
    key.push(0);
    key.extend_from_slice(order_id.as_bytes());
    key
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
        let (line, direction) = match event {
            WalletEvent::Credited(line) => (line, Direction::Credit),
            WalletEvent::Debited(line) => (line, Direction::Debit),
            // Nothing moved: no balance change, no ledger line.
            WalletEvent::DebitBarred(_) => return Ok(()),
            // A reward accepted in another partition (a cluster's), pending here until its
            // credit removes the key in the credit's own batch.
            WalletEvent::PendingNoted(note) => {
                let pending = PendingReward {
                    activity_id: note.activity_id.to_string(),
                    order_id: note.order_id.to_string(),
                    kind: note.kind,
                    amount: note.amount,
                };
                tx.insert(
                    pending_key(uid, note.activity_id.as_str(), note.order_id.as_str()),
                    codec::encode(&pending)?,
                );
                return Ok(());
            }
            // Its activity (in another partition) settled it without a credit.
            WalletEvent::NoteSettled {
                activity_id,
                order_id,
            } => {
                tx.remove(pending_key(uid, activity_id.as_str(), order_id.as_str()));
                return Ok(());
            }
        };
        let key = record_key(uid);
        let mut record: BalanceRecord = match tx.get(&key)? {
            Some(bytes) => decode_view(&bytes)?,
            None => BalanceRecord::default(),
        };
        match line.entry.account() {
            Account::Activity => record.balances.activity = line.balance_after,
            Account::Change => record.balances.change = line.balance_after,
            Account::Subsidy => record.balances.subsidy = line.balance_after,
        }
        record.version += 1;
        tx.insert(key, codec::encode(&record)?);
        // A reward credit settles its pending line in the same batch as the balance.
        if let (Entry::Reward | Entry::SubsidyReward, Some(source)) = (line.entry, &line.source) {
            tx.remove(pending_key(uid, source.as_str(), line.order_id.as_str()));
        }
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
        // A subsidy spent on a B2C packet (order: the subsidy's order id, source: the packet).
        if line.entry == Entry::PacketSubsidy {
            let packet = line
                .source
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default();
            tx.insert(
                used_subsidy_key(uid, line.order_id.as_str()),
                packet.into_bytes(),
            );
        }
        Ok(())
    }
}

impl Projection for WalletView {
    fn name(&self) -> &'static str {
        NAME
    }

    fn version(&self) -> u32 {
        // 5: `u` keys for spent subsidies.
        5
    }

    fn apply(&self, tx: &mut ViewTx<'_>, envelope: &Envelope) -> Result<(), StoreError> {
        match &envelope.event {
            Event::Wallet(event) => self.apply_wallet(tx, envelope, event),
            Event::Activity(event) => {
                // An intake shard's rewards are its activity's (`activity:cny@3` is `cny`).
                let activity = activity_of_stream(&envelope.stream)
                    .map(|(activity, _shard)| activity.to_string())
                    .unwrap_or_default();
                let activity = activity.as_str();
                match event {
                    ActivityEvent::RewardAccepted(reward) => {
                        let pending = PendingReward {
                            activity_id: activity.to_owned(),
                            order_id: reward.order_id.to_string(),
                            kind: reward.kind,
                            amount: reward.amount,
                        };
                        let key =
                            pending_key(reward.uid.as_str(), activity, reward.order_id.as_str());
                        tx.insert(key, codec::encode(&pending)?);
                        Ok(())
                    }
                    ActivityEvent::RewardDelivered { order_id, uid }
                    | ActivityEvent::RewardVoided { order_id, uid, .. }
                    | ActivityEvent::RewardFailed { order_id, uid, .. } => {
                        // No balance moves: a reader may see it pending or not, both true.
                        tx.remove(pending_key(uid.as_str(), activity, order_id.as_str()));
                        Ok(())
                    }
                    ActivityEvent::BudgetSet(_)
                    | ActivityEvent::BudgetReturned { .. }
                    | ActivityEvent::SliceGranted { .. }
                    | ActivityEvent::SliceReceived { .. }
                    | ActivityEvent::SliceReleased { .. }
                    | ActivityEvent::SliceTakenBack { .. } => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }
}

fn io(e: sled::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

fn balance_record(tree: &sled::Tree, uid: &str) -> Result<BalanceRecord, StoreError> {
    match tree.get(record_key(uid)).map_err(io)? {
        Some(bytes) => decode_view(&bytes),
        None => Ok(BalanceRecord::default()),
    }
}

/// A wallet's balances and pending rewards (empty for a wallet never seen), consistent with
/// each other: the balance record is read before and after the pending scan and the read is
/// repeated if a credit committed in between.
pub fn record(tree: &sled::Tree, uid: &str) -> Result<WalletRecord, StoreError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let before = balance_record(tree, uid)?;
        let pending = tree
            .scan_prefix(pending_prefix(uid))
            .map(|item| decode_view(&item.map_err(io)?.1))
            .collect::<Result<Vec<PendingReward>, _>>()?;
        let after = balance_record(tree, uid)?;
        if before == after || attempt >= CONSISTENT_READ_ATTEMPTS_MAX {
            return Ok(WalletRecord {
                balances: after.balances,
                pending,
            });
        }
    }
}

/// A wallet's balances (zero for a wallet never seen).
pub fn balances(tree: &sled::Tree, uid: &str) -> Result<Balances, StoreError> {
    Ok(balance_record(tree, uid)?.balances)
}

/// A user's pending rewards by (activity, order id): at most `limit`, after the position
/// `after` (from the first without), read with a range scan from there. Each comes with its
/// position (activity, `0x00`, order id), the cursor of the next read.
pub fn pending_after(
    tree: &sled::Tree,
    uid: &str,
    after: Option<&[u8]>,
    limit: usize,
) -> Result<Vec<(Vec<u8>, PendingReward)>, StoreError> {
    use std::ops::Bound;
    let prefix = pending_prefix(uid);
    let start = match after {
        Some(position) => Bound::Excluded([prefix.as_slice(), position].concat()),
        None => Bound::Included(prefix.clone()),
    };
    let mut pending = Vec::new();
    for item in tree.range((start, Bound::Unbounded)) {
        let (key, value) = item.map_err(io)?;
        if !key.starts_with(&prefix) || pending.len() >= limit {
            break;
        }
        pending.push((key[prefix.len()..].to_vec(), decode_view(&value)?));
    }
    Ok(pending)
}

/// The packet a subsidy paid, if the user spent it (`None`: not spent).
pub fn subsidy_used_by(
    tree: &sled::Tree,
    uid: &str,
    order_id: &str,
) -> Result<Option<String>, StoreError> {
    Ok(tree
        .get(used_subsidy_key(uid, order_id))
        .map_err(io)?
        .map(|packet| String::from_utf8_lossy(&packet).into_owned()))
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
