//! The rewards view: each accepted reward by order id (for `GET /v1/rewards/{order_id}`),
//! voided rewards, and totals per activity (budget, accepted) and per kind (pending depth).
//!
//! One write per accepted reward: whether it is still pending is read from the wallet view
//! (which settles pending rewards atomically with the credit), so a credit costs this view no
//! write at all. Totals are aggregated in memory per batch and written once per batch.
//!
//! Keys in `view:rewards`:
//! - `r` + order id + `0x00` + activity -> [`RewardRecord`]
//! - `v` + order id + `0x00` + activity -> voided-at (epoch ms, i64 BE)
//! - `f` + order id + `0x00` + activity -> [`Failure`] (a coupon or item reward that failed)
//! - `d` + order id + `0x00` + activity -> delivered-at (epoch ms, i64 BE: a coupon or item
//!   reward delivered; a cluster node's status reads it, as its wallet view cannot say)
//! - `a` + activity -> [`ActivityTotals`]
//! - `k` + kind -> [`KindTotals`]
//! - `c` + order id -> the activity its order-id claim names (from the registry's
//!   `order_ids.claimed`: on a cluster the claim's partition is found from the order id alone,
//!   the reward's from its activity, so `GET /v1/rewards/{order_id}` asks this first)

use super::{decode_view, Projection, ViewTx};
use crate::domain::activity::{activity_of_stream, ActivityEvent, FailReason, Reward, RewardKind};
use crate::domain::order_ids::OrderIdEvent;
use crate::domain::wallet::{Entry, WalletEvent};
use crate::domain::Event;
use crate::events::{codec, Envelope, StoreError};
use crate::metrics::Metrics;
use crate::money::Fen;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

pub const NAME: &str = "rewards";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RewardRecord {
    pub activity_id: String,
    pub reward: Reward,
    pub accepted_seq: u64,
    pub accepted_at_ms: i64,
}

/// A reward that failed: when, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub at_ms: i64,
    pub reason: FailReason,
}

/// A reward recorded under an order id, with how it ended when that is not read elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewardRow {
    pub record: RewardRecord,
    pub voided_at: Option<i64>,
    pub failed: Option<Failure>,
    pub delivered_at: Option<i64>,
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

fn voided_key(order_id: &str, activity: &str) -> Vec<u8> {
    key(b'v', &[order_id.as_bytes(), activity.as_bytes()])
}

fn delivered_key(order_id: &str, activity: &str) -> Vec<u8> {
    key(b'd', &[order_id.as_bytes(), activity.as_bytes()])
}

fn failed_key(order_id: &str, activity: &str) -> Vec<u8> {
    key(b'f', &[order_id.as_bytes(), activity.as_bytes()])
}

fn claim_key(order_id: &str) -> Vec<u8> {
    key(b'c', &[order_id.as_bytes()])
}

fn kind_key(kind: RewardKind) -> Vec<u8> {
    key(b'k', &[kind.as_str().as_bytes()])
}

fn activity_key(activity: &str) -> Vec<u8> {
    key(b'a', &[activity.as_bytes()])
}

fn get<T: serde::de::DeserializeOwned>(
    tx: &ViewTx<'_>,
    key: &[u8],
) -> Result<Option<T>, StoreError> {
    tx.get(key)?.map(|bytes| decode_view(&bytes)).transpose()
}

/// The rewards projection; it also keeps the pending and budget gauges current.
pub struct RewardsView {
    pub metrics: Arc<Metrics>,
}

/// Totals touched by one batch, loaded once and written once.
#[derive(Default)]
struct BatchTotals {
    activities: HashMap<String, ActivityTotals>,
    kinds: HashMap<RewardKind, KindTotals>,
}

impl BatchTotals {
    fn activity(
        &mut self,
        tx: &ViewTx<'_>,
        activity: &str,
    ) -> Result<&mut ActivityTotals, StoreError> {
        if !self.activities.contains_key(activity) {
            let totals = get(tx, &activity_key(activity))?.unwrap_or_default();
            self.activities.insert(activity.to_owned(), totals);
        }
        Ok(self.activities.get_mut(activity).expect("just inserted"))
    }

    fn kind(&mut self, tx: &ViewTx<'_>, kind: RewardKind) -> Result<&mut KindTotals, StoreError> {
        if let std::collections::hash_map::Entry::Vacant(slot) = self.kinds.entry(kind) {
            slot.insert(get(tx, &kind_key(kind))?.unwrap_or_default());
        }
        Ok(self.kinds.get_mut(&kind).expect("just inserted"))
    }
}

fn add(total: &mut Fen, kind: RewardKind, amount: Fen, target: RewardKind) {
    if kind == target {
        *total = total.checked_add(amount).unwrap_or(*total);
    }
}

fn sub(total: &mut Fen, kind: RewardKind, amount: Fen, target: RewardKind) {
    if kind == target {
        *total = total.checked_sub(amount).unwrap_or(Fen::ZERO);
    }
}

impl RewardsView {
    fn apply_one(
        &self,
        tx: &mut ViewTx<'_>,
        totals: &mut BatchTotals,
        envelope: &Envelope,
    ) -> Result<(), StoreError> {
        match &envelope.event {
            Event::Activity(event) => {
                // An intake shard's rewards are its activity's (`activity:cny@3` is `cny`).
                let (activity, _shard) = activity_of_stream(&envelope.stream).ok_or_else(|| {
                    StoreError::Corrupt(format!("activity event on stream {}", envelope.stream))
                })?;
                let activity = activity.as_str();
                match event {
                    ActivityEvent::BudgetSet(b) => {
                        totals.activity(tx, activity)?.budget = Some((b.cash, b.subsidy))
                    }
                    ActivityEvent::RewardAccepted(reward) => {
                        let record = RewardRecord {
                            activity_id: activity.to_owned(),
                            reward: reward.clone(),
                            accepted_seq: envelope.seq,
                            accepted_at_ms: envelope.recorded_at_ms,
                        };
                        tx.insert(
                            record_key(reward.order_id.as_str(), activity),
                            codec::encode(&record)?,
                        );
                        totals.kind(tx, reward.kind)?.accepted += 1;
                        let t = totals.activity(tx, activity)?;
                        t.rewards += 1;
                        add(
                            &mut t.accepted_cash,
                            reward.kind,
                            reward.amount,
                            RewardKind::Cash,
                        );
                        add(
                            &mut t.accepted_subsidy,
                            reward.kind,
                            reward.amount,
                            RewardKind::Subsidy,
                        );
                    }
                    ActivityEvent::RewardDelivered { order_id, .. } => {
                        tx.insert(
                            delivered_key(order_id.as_str(), activity),
                            envelope.recorded_at_ms.to_be_bytes().to_vec(),
                        );
                        // Items and coupons are delivered; the event does not carry the kind
                        // (it predates coupon deliveries), the reward's record does.
                        let kind =
                            get::<RewardRecord>(tx, &record_key(order_id.as_str(), activity))?
                                .map_or(RewardKind::Item, |r| r.reward.kind);
                        totals.kind(tx, kind)?.settled += 1
                    }
                    ActivityEvent::RewardFailed {
                        order_id,
                        kind,
                        amount,
                        reason,
                        ..
                    } => {
                        let failure = Failure {
                            at_ms: envelope.recorded_at_ms,
                            reason: *reason,
                        };
                        tx.insert(
                            failed_key(order_id.as_str(), activity),
                            codec::encode(&failure)?,
                        );
                        totals.kind(tx, *kind)?.settled += 1;
                        let t = totals.activity(tx, activity)?;
                        sub(&mut t.accepted_cash, *kind, *amount, RewardKind::Cash);
                        sub(&mut t.accepted_subsidy, *kind, *amount, RewardKind::Subsidy);
                    }
                    ActivityEvent::BudgetReturned { kind, amount, .. } => {
                        let t = totals.activity(tx, activity)?;
                        sub(&mut t.accepted_cash, *kind, *amount, RewardKind::Cash);
                        sub(&mut t.accepted_subsidy, *kind, *amount, RewardKind::Subsidy);
                    }
                    ActivityEvent::RewardVoided {
                        order_id,
                        kind,
                        amount,
                        ..
                    } => {
                        tx.insert(
                            voided_key(order_id.as_str(), activity),
                            envelope.recorded_at_ms.to_be_bytes().to_vec(),
                        );
                        totals.kind(tx, *kind)?.settled += 1;
                        let t = totals.activity(tx, activity)?;
                        sub(&mut t.accepted_cash, *kind, *amount, RewardKind::Cash);
                        sub(&mut t.accepted_subsidy, *kind, *amount, RewardKind::Subsidy);
                    }
                    // Slices move budget between an activity and its intake shards: no reward.
                    ActivityEvent::SliceGranted { .. }
                    | ActivityEvent::SliceReceived { .. }
                    | ActivityEvent::SliceReleased { .. }
                    | ActivityEvent::SliceTakenBack { .. } => {}
                }
            }
            Event::OrderIds(OrderIdEvent::Claimed { claims }) => {
                for claim in claims {
                    tx.insert(
                        claim_key(claim.order_id.as_str()),
                        claim.activity_id.as_str().as_bytes().to_vec(),
                    );
                }
            }
            Event::Wallet(WalletEvent::Credited(line)) if line.source.is_some() => {
                let kind = match line.entry {
                    Entry::Reward => RewardKind::Cash,
                    Entry::SubsidyReward => RewardKind::Subsidy,
                    _ => return Ok(()),
                };
                totals.kind(tx, kind)?.settled += 1;
            }
            _ => {}
        }
        Ok(())
    }
}

impl RewardsView {
    fn publish_kind(&self, kind: RewardKind, t: &KindTotals) {
        self.metrics
            .reward_pending
            .with_label_values(&[kind.as_str()])
            // Signed, not saturated: on a cluster a reward is accepted in its activity's
            // partition and settled in its wallet's, so a partition's own difference may be
            // negative, and only the sum over the partitions is the fleet's pending.
            .set(count(t.accepted).saturating_sub(count(t.settled)));
    }

    fn publish_activity(&self, activity: &str, t: &ActivityTotals) {
        let Some((cash, subsidy)) = t.budget else {
            return;
        };
        let left = |budget: Fen, accepted: Fen| {
            budget.checked_sub(accepted).unwrap_or(Fen::ZERO).as_u64() as i64
        };
        let gauge = &self.metrics.budget_remaining_fen;
        gauge
            .with_label_values(&[activity, "cash"])
            .set(left(cash, t.accepted_cash));
        gauge
            .with_label_values(&[activity, "subsidy"])
            .set(left(subsidy, t.accepted_subsidy));
    }
}

/// A count as a gauge's value.
fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Projection for RewardsView {
    fn name(&self) -> &'static str {
        NAME
    }

    fn version(&self) -> u32 {
        3
    }

    fn apply(&self, tx: &mut ViewTx<'_>, envelope: &Envelope) -> Result<(), StoreError> {
        self.apply_batch(tx, &[envelope])
    }

    fn opened(&self, tree: &sled::Tree) -> Result<(), StoreError> {
        for kind in RewardKind::ALL {
            if let Some(bytes) = tree.get(kind_key(kind)).map_err(io)? {
                self.publish_kind(kind, &decode_view(&bytes)?);
            }
        }
        for item in tree.scan_prefix([b'a']) {
            let (key, bytes) = item.map_err(io)?;
            let activity = String::from_utf8_lossy(&key[1..]).into_owned();
            self.publish_activity(&activity, &decode_view(&bytes)?);
        }
        Ok(())
    }

    fn apply_batch(&self, tx: &mut ViewTx<'_>, events: &[&Envelope]) -> Result<(), StoreError> {
        let mut totals = BatchTotals::default();
        for envelope in events {
            self.apply_one(tx, &mut totals, envelope)?;
        }
        for (kind, t) in totals.kinds {
            self.publish_kind(kind, &t);
            tx.insert(kind_key(kind), codec::encode(&t)?);
        }
        for (activity, t) in totals.activities {
            self.publish_activity(&activity, &t);
            tx.insert(activity_key(&activity), codec::encode(&t)?);
        }
        Ok(())
    }
}

fn io(e: sled::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

/// The rewards recorded under an order id (one, unless an order id was reused across
/// activities before the order-id registry refused reuses), each with whether it was voided
/// or failed.
pub fn by_order(tree: &sled::Tree, order_id: &str) -> Result<Vec<RewardRow>, StoreError> {
    let mut prefix = vec![b'r'];
    prefix.extend_from_slice(order_id.as_bytes());
    prefix.push(0);
    tree.scan_prefix(prefix)
        .map(|item| {
            let record: RewardRecord = decode_view(&item.map_err(io)?.1)?;
            let at = |key: Vec<u8>| -> Result<Option<i64>, StoreError> {
                Ok(tree
                    .get(key)
                    .map_err(io)?
                    .and_then(|v| v.as_ref().try_into().ok().map(i64::from_be_bytes)))
            };
            let voided_at = at(voided_key(order_id, &record.activity_id))?;
            let delivered_at = at(delivered_key(order_id, &record.activity_id))?;
            let failed = tree
                .get(failed_key(order_id, &record.activity_id))
                .map_err(io)?
                .map(|v| decode_view(&v))
                .transpose()?;
            Ok(RewardRow {
                record,
                voided_at,
                failed,
                delivered_at,
            })
        })
        .collect()
}

/// The activity an order id was claimed for, if the registry's shard kept in this view
/// claimed it (a claim is made before its activity accepts: the reward itself may have been
/// refused).
pub fn claimed_by(tree: &sled::Tree, order_id: &str) -> Result<Option<String>, StoreError> {
    Ok(tree
        .get(claim_key(order_id))
        .map_err(io)?
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned()))
}

/// An activity's budget and accepted totals, if it was ever seen.
pub fn activity(
    tree: &sled::Tree,
    activity_id: &str,
) -> Result<Option<ActivityTotals>, StoreError> {
    tree.get(activity_key(activity_id))
        .map_err(io)?
        .map(|bytes| decode_view(&bytes))
        .transpose()
}
