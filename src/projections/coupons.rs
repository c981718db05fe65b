//! The coupons view (C1, C13, C14): batches with their issued count, each request's status,
//! and each user's coupons.
//!
//! Keys in `view:coupons`:
//! - `b` + batch id -> [`BatchSummary`]
//! - `q` + seq_no -> [`RequestLine`]: accepted, or rejected (with the reason); on a cluster
//!   also issued (the outcome settled on the intake, see `next_step`'s `settle`)
//! - `w` + uid + `0x00` + coupon id -> [`WalletCoupon`], with the seq_no it was issued for
//!
//! A grant writes only the wallet row: a request whose line says accepted is issued when its
//! user's wallet holds a coupon for its seq_no (a user holds few coupons; the scan is short).
//! One row per request and one per coupon, not three: at peak this view's sled writes are what
//! the two cores spend most on (docs/BENCHMARKS.md, coupons). On a cluster the intake and the
//! batch are in different partitions, each with its own view: the intake's partition answers a
//! request's status from the outcome the layers note on the intake, and a user's coupons are
//! gathered from every partition (the batches').

use super::{decode_view, Projection, ViewTx};
use crate::clock::Millis;
use crate::domain::activity::{ActivityEvent, RewardKind};
use crate::domain::coupon::{
    coupon_id, reward_request, BatchEvent, IntakeEvent, IssueRequest, Refusal, Verdict,
};
use crate::domain::Event;
use crate::events::{codec, Envelope, StoreError};
use crate::ids::Id;
use crate::money::Fen;
use serde::{Deserialize, Serialize};

pub const NAME: &str = "coupons";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchSummary {
    pub group_id: Option<String>,
    pub stock: u64,
    pub issued: u64,
    pub per_user_limit: u32,
    pub value: Fen,
    pub starts_at_ms: Option<Millis>,
    pub ends_at_ms: Option<Millis>,
    pub created_at_ms: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestStatus {
    Accepted,
    Issued,
    Rejected,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestLine {
    pub uid: String,
    pub batch_id: String,
    pub status: RequestStatus,
    /// Why it was rejected.
    pub reason: Option<String>,
    pub coupon_id: Option<String>,
    pub at_ms: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalletCoupon {
    pub coupon_id: String,
    /// The request it was issued for.
    pub seq_no: String,
    pub batch_id: String,
    pub value: Fen,
    pub issued_at_ms: Millis,
}

fn key(prefix: u8, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + id.len());
    key.push(prefix);
    key.extend_from_slice(id.as_bytes());
    key
}

fn wallet_prefix(uid: &str) -> Vec<u8> {
    let mut key = key(b'w', uid);
    key.push(0);
    key
}

pub struct CouponsView;

impl CouponsView {
    fn put(tx: &mut ViewTx<'_>, seq_no: &Id, line: &RequestLine) -> Result<(), StoreError> {
        tx.insert(key(b'q', seq_no.as_str()), codec::encode(line)?);
        Ok(())
    }

    fn accepted(
        tx: &mut ViewTx<'_>,
        request: &IssueRequest,
        at_ms: Millis,
    ) -> Result<(), StoreError> {
        Self::put(
            tx,
            &request.seq_no,
            &RequestLine::new(
                &request.uid,
                request.batch_id.as_str(),
                RequestStatus::Accepted,
                at_ms,
            ),
        )
    }
}

impl RequestLine {
    fn new(uid: &Id, batch_id: &str, status: RequestStatus, at_ms: Millis) -> RequestLine {
        RequestLine {
            uid: uid.to_string(),
            batch_id: batch_id.to_owned(),
            status,
            reason: None,
            coupon_id: None,
            at_ms,
        }
    }

    fn rejected(mut self, reason: Refusal) -> RequestLine {
        self.reason = Some(reason.as_str().to_owned());
        self
    }
}

impl Projection for CouponsView {
    fn name(&self) -> &'static str {
        NAME
    }

    fn version(&self) -> u32 {
        2
    }

    fn apply(&self, tx: &mut ViewTx<'_>, envelope: &Envelope) -> Result<(), StoreError> {
        let at_ms = envelope.recorded_at_ms;
        match &envelope.event {
            Event::CouponIntake(IntakeEvent::Accepted { requests, .. }) => {
                for request in requests {
                    Self::accepted(tx, request, at_ms)?;
                }
            }
            Event::CouponIntake(IntakeEvent::Recorded { verdicts, .. }) => {
                for (request, verdict) in verdicts {
                    let line = |status| {
                        RequestLine::new(&request.uid, request.batch_id.as_str(), status, at_ms)
                    };
                    match verdict {
                        Verdict::Rejected(reason) => {
                            let line = line(RequestStatus::Rejected).rejected(*reason);
                            Self::put(tx, &request.seq_no, &line)?;
                        }
                        // Settled on the intake (a cluster, where the grant is in the batch's
                        // partition): the line says it all.
                        Verdict::Issued(n) => {
                            let mut line = line(RequestStatus::Issued);
                            line.coupon_id = Some(coupon_id(&request.batch_id, *n));
                            Self::put(tx, &request.seq_no, &line)?;
                        }
                        Verdict::Pending | Verdict::Passed => {}
                    }
                }
            }
            Event::Activity(ActivityEvent::RewardAccepted(reward))
                if reward.kind == RewardKind::Coupon =>
            {
                let Some((_, request)) = reward_request(&envelope.stream, reward) else {
                    return Ok(());
                };
                Self::accepted(tx, &request, at_ms)?;
            }
            Event::CouponBatch(event) => {
                let batch_id = envelope
                    .stream
                    .strip_prefix("coupon-batch:")
                    .ok_or_else(|| {
                        StoreError::Corrupt(format!("batch event on stream {}", envelope.stream))
                    })?;
                let summary_key = key(b'b', batch_id);
                match event {
                    BatchEvent::Created { spec, .. } => {
                        let summary = BatchSummary {
                            group_id: spec.group_id.as_ref().map(Id::to_string),
                            stock: spec.stock,
                            issued: 0,
                            per_user_limit: spec.per_user_limit,
                            value: spec.value,
                            starts_at_ms: spec.starts_at_ms,
                            ends_at_ms: spec.ends_at_ms,
                            created_at_ms: at_ms,
                        };
                        tx.insert(summary_key, codec::encode(&summary)?);
                    }
                    BatchEvent::Deducted {
                        grants, refusals, ..
                    } => {
                        let mut summary: BatchSummary = match tx.get(&summary_key)? {
                            Some(bytes) => decode_view(&bytes)?,
                            None => {
                                return Err(StoreError::Corrupt(format!(
                                    "batch {batch_id} deducted before its creation"
                                )))
                            }
                        };
                        let batch = Id::parse(batch_id)
                            .map_err(|_| StoreError::Corrupt(format!("batch id {batch_id}")))?;
                        for grant in grants {
                            summary.issued = summary.issued.max(grant.coupon_no);
                            let coupon = coupon_id(&batch, grant.coupon_no);
                            let mut wallet_key = wallet_prefix(grant.uid.as_str());
                            wallet_key.extend_from_slice(coupon.as_bytes());
                            tx.insert(
                                wallet_key,
                                codec::encode(&WalletCoupon {
                                    coupon_id: coupon,
                                    seq_no: grant.seq_no.to_string(),
                                    batch_id: batch_id.to_owned(),
                                    value: summary.value,
                                    issued_at_ms: at_ms,
                                })?,
                            );
                        }
                        for refused in refusals {
                            let line = RequestLine::new(
                                &refused.uid,
                                batch_id,
                                RequestStatus::Rejected,
                                at_ms,
                            )
                            .rejected(refused.reason);
                            Self::put(tx, &refused.seq_no, &line)?;
                        }
                        tx.insert(summary_key, codec::encode(&summary)?);
                    }
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

pub fn batch(tree: &sled::Tree, batch_id: &str) -> Result<Option<BatchSummary>, StoreError> {
    tree.get(key(b'b', batch_id))
        .map_err(io)?
        .map(|b| decode_view(&b))
        .transpose()
}

/// A request's line; an accepted one is issued if its user's wallet holds its coupon.
pub fn request(tree: &sled::Tree, seq_no: &str) -> Result<Option<RequestLine>, StoreError> {
    let Some(mut line) = tree
        .get(key(b'q', seq_no))
        .map_err(io)?
        .map(|b| decode_view::<RequestLine>(&b))
        .transpose()?
    else {
        return Ok(None);
    };
    if line.status == RequestStatus::Accepted {
        for item in tree.scan_prefix(wallet_prefix(&line.uid)) {
            let coupon: WalletCoupon = decode_view(&item.map_err(io)?.1)?;
            if coupon.seq_no == seq_no {
                line.status = RequestStatus::Issued;
                line.coupon_id = Some(coupon.coupon_id);
                line.at_ms = coupon.issued_at_ms;
                break;
            }
        }
    }
    Ok(Some(line))
}

/// A user's coupons by coupon id: at most `limit`, after the coupon id `after` (from the first
/// without), read with a range scan from there.
pub fn wallet(
    tree: &sled::Tree,
    uid: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<WalletCoupon>, StoreError> {
    use std::ops::Bound;
    let prefix = wallet_prefix(uid);
    let start = match after {
        Some(coupon_id) => {
            let mut key = prefix.clone();
            key.extend_from_slice(coupon_id.as_bytes());
            Bound::Excluded(key)
        }
        None => Bound::Included(prefix.clone()),
    };
    tree.range((start, Bound::Unbounded))
        .take_while(|item| match item {
            Ok((key, _)) => key.starts_with(&prefix),
            Err(_) => true,
        })
        .take(limit)
        .map(|item| decode_view(&item.map_err(io)?.1))
        .collect()
}
