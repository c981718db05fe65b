//! The rewards view: every reward's status, each user's pending rewards (R6) and reward list
//! (R2), and per-activity budget totals.
//!
//! Keys in `view:rewards`:
//! - `r` + order id + `0x00` + activity -> [`RewardRecord`]
//! - `u` + uid + `0x00` + seq (u64 BE) -> (activity, order id): the user's rewards in order
//! - `a` + activity -> [`ActivityTotals`]
//! - `k` + kind -> [`KindTotals`] (for the pending-depth metric)

use super::{decode_view, Projection, ViewTx};
use crate::domain::activity::{ActivityEvent, Reward, RewardKind};
use crate::domain::wallet::{Entry, WalletEvent};
use crate::domain::Event;
use crate::events::{codec, Envelope, StoreError};
use crate::metrics::Metrics;
use crate::money::Fen;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub const NAME: &str = "rewards";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardStatus {
    Accepted,
    Credited,
    Voided,
}

impl RewardStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RewardStatus::Accepted => "accepted",
            RewardStatus::Credited => "credited",
            RewardStatus::Voided => "voided",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RewardRecord {
    pub activity_id: String,
    pub reward: Reward,
    pub status: RewardStatus,
    pub accepted_seq: u64,
    pub accepted_at_ms: i64,
    pub settled_at_ms: Option<i64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityTotals {
    pub budget: Option<(Fen, Fen)>,
    pub accepted_cash: Fen,
    pub accepted_subsidy: Fen,
    pub rewards: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindTotals {
    pub accepted: u64,
    pub settled: u64,
}

fn key(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut key = vec![tag];
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            key.push(0);
        }
        key.extend_from_slice(part);
    }
    key
}

fn record_key(order_id: &str, activity: &str) -> Vec<u8> {
    key(b'r', &[order_id.as_bytes(), activity.as_bytes()])
}

fn kind_key(kind: RewardKind) -> Vec<u8> {
    key(b'k', &[kind.as_str().as_bytes()])
}

/// The rewards projection; it also keeps the pending and budget gauges current.
pub struct RewardsView {
    pub metrics: Arc<Metrics>,
}

fn get<T: serde::de::DeserializeOwned>(
    tx: &ViewTx<'_>,
    key: &[u8],
) -> Result<Option<T>, StoreError> {
    tx.get(key)?.map(|bytes| decode_view(&bytes)).transpose()
}

impl RewardsView {
    fn bump_kind(
        &self,
        tx: &mut ViewTx<'_>,
        kind: RewardKind,
        accepted: u64,
        settled: u64,
    ) -> Result<(), StoreError> {
        let k = kind_key(kind);
        let mut totals: KindTotals = get(tx, &k)?.unwrap_or_default();
        totals.accepted += accepted;
        totals.settled += settled;
        self.metrics
            .reward_pending
            .with_label_values(&[kind.as_str()])
            .set(totals.accepted.saturating_sub(totals.settled) as i64);
        tx.insert(k, codec::encode(&totals)?);
        Ok(())
    }

    fn update_activity(
        &self,
        tx: &mut ViewTx<'_>,
        activity: &str,
        change: impl FnOnce(&mut ActivityTotals),
    ) -> Result<(), StoreError> {
        let k = key(b'a', &[activity.as_bytes()]);
        let mut totals: ActivityTotals = get(tx, &k)?.unwrap_or_default();
        change(&mut totals);
        if let Some((cash, subsidy)) = totals.budget {
            let remaining = |budget: Fen, accepted: Fen| {
                budget.checked_sub(accepted).unwrap_or(Fen::ZERO).as_u64() as i64
            };
            self.metrics
                .budget_remaining_fen
                .with_label_values(&[activity, "cash"])
                .set(remaining(cash, totals.accepted_cash));
            self.metrics
                .budget_remaining_fen
                .with_label_values(&[activity, "subsidy"])
                .set(remaining(subsidy, totals.accepted_subsidy));
        }
        tx.insert(k, codec::encode(&totals)?);
        Ok(())
    }

    /// Marks a reward settled (credited, delivered or voided) and drops it from pending.
    fn settle(
        &self,
        tx: &mut ViewTx<'_>,
        order_id: &str,
        activity: &str,
        status: RewardStatus,
        at_ms: i64,
    ) -> Result<Option<RewardRecord>, StoreError> {
        let k = record_key(order_id, activity);
        let Some(mut record) = get::<RewardRecord>(tx, &k)? else {
            return Ok(None);
        };
        if record.status != RewardStatus::Accepted {
            return Ok(None);
        }
        record.status = status;
        record.settled_at_ms = Some(at_ms);
        tx.insert(k, codec::encode(&record)?);
        self.bump_kind(tx, record.reward.kind, 0, 1)?;
        Ok(Some(record))
    }
}

impl Projection for RewardsView {
    fn name(&self) -> &'static str {
        NAME
    }

    fn version(&self) -> u32 {
        1
    }

    fn apply(&self, tx: &mut ViewTx<'_>, envelope: &Envelope) -> Result<(), StoreError> {
        match &envelope.event {
            Event::Activity(event) => {
                let activity = envelope.stream.strip_prefix("activity:").ok_or_else(|| {
                    StoreError::Corrupt(format!("activity event on stream {}", envelope.stream))
                })?;
                match event {
                    ActivityEvent::BudgetSet(b) => self
                        .update_activity(tx, activity, |t| t.budget = Some((b.cash, b.subsidy)))?,
                    ActivityEvent::RewardAccepted(reward) => {
                        let order_id = reward.order_id.as_str();
                        let uid = reward.uid.as_str();
                        let record = RewardRecord {
                            activity_id: activity.to_owned(),
                            reward: reward.clone(),
                            status: RewardStatus::Accepted,
                            accepted_seq: envelope.seq,
                            accepted_at_ms: envelope.recorded_at_ms,
                            settled_at_ms: None,
                        };
                        tx.insert(record_key(order_id, activity), codec::encode(&record)?);
                        tx.insert(
                            key(b'u', &[uid.as_bytes(), &envelope.seq.to_be_bytes()]),
                            codec::encode(&(activity, order_id))?,
                        );
                        self.bump_kind(tx, reward.kind, 1, 0)?;
                        let (kind, amount) = (reward.kind, reward.amount);
                        self.update_activity(tx, activity, |t| {
                            t.rewards += 1;
                            match kind {
                                RewardKind::Cash => {
                                    t.accepted_cash = t
                                        .accepted_cash
                                        .checked_add(amount)
                                        .unwrap_or(t.accepted_cash)
                                }
                                RewardKind::Subsidy => {
                                    t.accepted_subsidy = t
                                        .accepted_subsidy
                                        .checked_add(amount)
                                        .unwrap_or(t.accepted_subsidy)
                                }
                                RewardKind::Coupon | RewardKind::Item => {}
                            }
                        })?;
                    }
                    ActivityEvent::RewardDelivered { order_id, .. } => {
                        self.settle(
                            tx,
                            order_id.as_str(),
                            activity,
                            RewardStatus::Credited,
                            envelope.recorded_at_ms,
                        )?;
                    }
                    ActivityEvent::RewardVoided {
                        order_id,
                        kind,
                        amount,
                        ..
                    } => {
                        self.settle(
                            tx,
                            order_id.as_str(),
                            activity,
                            RewardStatus::Voided,
                            envelope.recorded_at_ms,
                        )?;
                        let (kind, amount) = (*kind, *amount);
                        self.update_activity(tx, activity, |t| match kind {
                            RewardKind::Cash => {
                                t.accepted_cash =
                                    t.accepted_cash.checked_sub(amount).unwrap_or(Fen::ZERO)
                            }
                            RewardKind::Subsidy => {
                                t.accepted_subsidy =
                                    t.accepted_subsidy.checked_sub(amount).unwrap_or(Fen::ZERO)
                            }
                            RewardKind::Coupon | RewardKind::Item => {}
                        })?;
                    }
                }
            }
            Event::Wallet(WalletEvent::Credited(line)) => {
                if let (Entry::Reward | Entry::SubsidyReward, Some(activity)) =
                    (line.entry, &line.source)
                {
                    self.settle(
                        tx,
                        line.order_id.as_str(),
                        activity.as_str(),
                        RewardStatus::Credited,
                        envelope.recorded_at_ms,
                    )?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

fn io(e: sled::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

/// The rewards recorded under an order id (one, unless an order id was reused across
/// activities).
pub fn by_order(tree: &sled::Tree, order_id: &str) -> Result<Vec<RewardRecord>, StoreError> {
    let mut prefix = vec![b'r'];
    prefix.extend_from_slice(order_id.as_bytes());
    prefix.push(0);
    tree.scan_prefix(prefix)
        .map(|item| decode_view(&item.map_err(io)?.1))
        .collect()
}

/// A user's rewards, latest first (at most `limit`), with their current status.
pub fn of_user(
    tree: &sled::Tree,
    uid: &str,
    limit: usize,
) -> Result<Vec<RewardRecord>, StoreError> {
    let mut prefix = vec![b'u'];
    prefix.extend_from_slice(uid.as_bytes());
    prefix.push(0);
    let mut out = Vec::new();
    for item in tree.scan_prefix(prefix).rev().take(limit) {
        let (activity, order_id): (String, String) = decode_view(&item.map_err(io)?.1)?;
        if let Some(bytes) = tree.get(record_key(&order_id, &activity)).map_err(io)? {
            out.push(decode_view(&bytes)?);
        }
    }
    Ok(out)
}

/// An activity's budget and accepted totals, if it was ever seen.
pub fn activity(
    tree: &sled::Tree,
    activity_id: &str,
) -> Result<Option<ActivityTotals>, StoreError> {
    tree.get(key(b'a', &[activity_id.as_bytes()]))
        .map_err(io)?
        .map(|bytes| decode_view(&bytes))
        .transpose()
}
