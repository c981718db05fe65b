//! The `coupons` check: replays intake, batch and group events independently of the domain's
//! own `evolve` and proves C9-C11 from the log alone.
//!
//! What each stream says of itself (a batch's numbering, limits and refusals, a group's
//! places) is checked as it is read; what one stream says of another (a grant against its
//! acceptance and the intake's verdicts, a released place against the grants) is checked at
//! the end, whatever order the streams were read in: on a cluster they are in different
//! partitions' logs, read one after the other.

use super::CheckResult;
use super::{HashMap, HashSet};
use crate::domain::coupon::{
    BatchEvent, BatchSpec, GroupEvent, IntakeEvent, IssueRequest, Refusal, Verdict,
};
use std::collections::BTreeMap;

#[derive(Default)]
struct BatchReplay {
    spec: Option<BatchSpec>,
    /// Coupon numbers granted, each with its seq_no.
    coupons: HashMap<u64, String>,
    per_user: HashMap<String, u32>,
}

/// What the audit accumulates of coupons.
pub(super) struct CouponAudit {
    pub(super) check: CheckResult,
    /// Accepted requests: seq_no -> (uid, batch).
    accepted: HashMap<String, (String, String)>,
    /// Requests refused before their batch was asked (final).
    rejected_early: HashMap<String, Refusal>,
    batches: HashMap<String, BatchReplay>,
    /// seq_no -> (batch, coupon number, uid) of its grant.
    granted: HashMap<String, (String, u64, String)>,
    refused: HashMap<String, Refusal>,
    /// Outcomes noted on the intake (a cluster): seq_no -> coupon number.
    noted_issued: HashMap<String, u64>,
    /// Group places currently held, by (group, seq_no).
    places: HashSet<(String, String)>,
    /// Group places ever released, by (group, seq_no).
    released: HashSet<(String, String)>,
}

impl CouponAudit {
    pub(super) fn new() -> CouponAudit {
        CouponAudit {
            check: CheckResult::new(
                "coupons",
                "issued <= stock with distinct coupon numbers 1..n, no user above a batch's limit or in two batches of a group, each accepted request granted at most once and only as accepted, never after a final refusal",
            ),
            accepted: HashMap::default(),
            rejected_early: HashMap::default(),
            batches: HashMap::default(),
            granted: HashMap::default(),
            refused: HashMap::default(),
            noted_issued: HashMap::default(),
            places: HashSet::default(),
            released: HashSet::default(),
        }
    }

    /// A coupon reward accepted by an activity: a request under its reserved seq_no.
    pub(super) fn reward(&mut self, r: &IssueRequest) {
        self.accepted
            .entry(r.seq_no.to_string())
            .or_insert((r.uid.to_string(), r.batch_id.to_string()));
    }

    pub(super) fn intake(&mut self, event: &IntakeEvent) {
        match event {
            IntakeEvent::Accepted { requests, .. } => {
                for r in requests {
                    let first = self
                        .accepted
                        .entry(r.seq_no.to_string())
                        .or_insert((r.uid.to_string(), r.batch_id.to_string()));
                    if first.0 != r.uid.as_str() || first.1 != r.batch_id.as_str() {
                        self.check.violation(format!(
                            "request {}: accepted for {}/{} and again for {}/{}",
                            r.seq_no, first.0, first.1, r.uid, r.batch_id
                        ));
                    }
                }
            }
            IntakeEvent::Recorded { verdicts, .. } => {
                for (r, verdict) in verdicts {
                    let seq = r.seq_no.to_string();
                    match verdict {
                        Verdict::Rejected(reason) => {
                            self.rejected_early.insert(seq, *reason);
                        }
                        Verdict::Issued(n) => {
                            self.noted_issued.insert(seq, *n);
                        }
                        Verdict::Pending | Verdict::Passed => {}
                    }
                }
            }
        }
    }

    pub(super) fn batch(&mut self, batch_id: &str, event: &BatchEvent) {
        let replay = self.batches.entry(batch_id.to_owned()).or_default();
        match event {
            BatchEvent::Created { spec, .. } => {
                if replay.spec.is_some() {
                    self.check
                        .violation(format!("batch {batch_id}: created twice"));
                }
                replay.spec = Some(spec.clone());
            }
            BatchEvent::Deducted {
                grants, refusals, ..
            } => {
                let Some(spec) = replay.spec.clone() else {
                    self.check
                        .violation(format!("batch {batch_id}: deducted before it was created"));
                    return;
                };
                for grant in grants {
                    let seq = grant.seq_no.to_string();
                    let uid = grant.uid.to_string();
                    let n = grant.coupon_no;
                    if n == 0 || n > spec.stock {
                        self.check.violation(format!(
                            "batch {batch_id}: coupon number {n} outside 1..={}",
                            spec.stock
                        ));
                    }
                    if let Some(other) = replay.coupons.insert(n, seq.clone()) {
                        self.check.violation(format!(
                            "batch {batch_id}: coupon {n} granted to {other} and {seq}"
                        ));
                    }
                    let held = replay.per_user.entry(uid.clone()).or_default();
                    *held += 1;
                    if *held == spec.per_user_limit + 1 {
                        self.check.violation(format!(
                            "batch {batch_id}: {uid} holds more than the limit of {}",
                            spec.per_user_limit
                        ));
                    }
                    if let Some(reason) = self.refused.get(&seq) {
                        self.check.violation(format!(
                            "request {seq}: granted after the batch refused it ({})",
                            reason.as_str()
                        ));
                    }
                    if let Some((b, m, _)) = self
                        .granted
                        .insert(seq.clone(), (batch_id.into(), n, uid.clone()))
                    {
                        self.check.violation(format!(
                            "request {seq}: granted twice ({b}-{m} and {batch_id}-{n})"
                        ));
                    }
                }
                for refused in refusals {
                    let seq = refused.seq_no.to_string();
                    if let Some((b, n, _)) = self.granted.get(&seq) {
                        self.check.violation(format!(
                            "request {seq}: refused ({}) after coupon {b}-{n} was granted",
                            refused.reason.as_str()
                        ));
                    }
                    self.refused.insert(seq, refused.reason);
                }
            }
        }
    }

    pub(super) fn group(&mut self, group_id: &str, event: &GroupEvent) {
        match event {
            GroupEvent::Reserved { held, .. } => {
                for r in held {
                    self.places
                        .insert((group_id.to_owned(), r.seq_no.to_string()));
                }
            }
            GroupEvent::Released { released, .. } => {
                for r in released {
                    let place = (group_id.to_owned(), r.seq_no.to_string());
                    if !self.places.remove(&place) {
                        self.check.violation(format!(
                            "group {group_id}: place of request {} released but not held",
                            r.seq_no
                        ));
                    }
                    self.released.insert(place);
                }
            }
        }
    }

    /// How the request `seq_no` ended: issued (`Ok`), refused for good (`Err`), or not yet.
    pub(super) fn outcome(&self, seq_no: &str) -> Option<Result<(), Refusal>> {
        if self.granted.contains_key(seq_no) {
            return Some(Ok(()));
        }
        self.rejected_early
            .get(seq_no)
            .or_else(|| self.refused.get(seq_no))
            .map(|r| Err(*r))
    }

    pub(super) fn finish(&self) -> CheckResult {
        let mut check = self.check.clone();
        check.checked = self.accepted.len() as u64;
        // Each grant against what the other streams say of its request.
        let mut grants: Vec<_> = self.granted.iter().collect();
        grants.sort();
        for (seq, (batch_id, n, uid)) in grants {
            match self.accepted.get(seq) {
                None => check.violation(format!(
                    "request {seq}: granted coupon {batch_id}-{n} but never accepted"
                )),
                Some((u, b)) if u != uid || b != batch_id => check.violation(format!(
                    "request {seq}: accepted for {u}/{b}, granted to {uid}/{batch_id}"
                )),
                Some(_) => {}
            }
            if let Some(reason) = self.rejected_early.get(seq) {
                check.violation(format!(
                    "request {seq}: granted coupon {batch_id}-{n} despite its final refusal ({})",
                    reason.as_str()
                ));
            }
            if let Some(noted) = self.noted_issued.get(seq).filter(|m| *m != n) {
                check.violation(format!(
                    "request {seq}: its intake says coupon {batch_id}-{noted}, its batch granted {batch_id}-{n}"
                ));
            }
        }
        let mut noted: Vec<_> = self
            .noted_issued
            .iter()
            .filter(|(seq, _)| !self.granted.contains_key(*seq))
            .collect();
        noted.sort();
        for (seq, n) in noted {
            check.violation(format!(
                "request {seq}: its intake says coupon {n} was issued, no batch granted it"
            ));
        }
        let mut released: Vec<_> = self
            .released
            .iter()
            .filter(|(_, seq)| self.granted.contains_key(seq))
            .collect();
        released.sort();
        for (group_id, seq) in released {
            check.violation(format!(
                "group {group_id}: place of request {seq} released though it was granted"
            ));
        }
        // Stock and group exclusion, per batch.
        let mut holders: HashMap<(String, String), HashSet<&str>> = HashMap::default();
        let mut issued_total = 0u64;
        for (batch_id, replay) in &self.batches {
            let Some(spec) = &replay.spec else { continue };
            let issued = replay.coupons.len() as u64;
            issued_total += issued;
            if issued > spec.stock {
                check.violation(format!(
                    "batch {batch_id}: {issued} issued, stock {}",
                    spec.stock
                ));
            }
            if let Some(max) = replay.coupons.keys().max() {
                if *max != issued {
                    check.violation(format!(
                        "batch {batch_id}: coupon numbers up to {max} but {issued} issued (a gap)"
                    ));
                }
            }
            if let Some(group) = &spec.group_id {
                for uid in replay.per_user.keys() {
                    holders
                        .entry((group.to_string(), uid.clone()))
                        .or_default()
                        .insert(batch_id.as_str());
                }
            }
        }
        for ((group, uid), batches) in &holders {
            if batches.len() > 1 {
                let mut batches: Vec<_> = batches.iter().collect();
                batches.sort();
                check.violation(format!(
                    "group {group}: {uid} holds coupons of batches {batches:?}"
                ));
            }
        }
        // Where every accepted request stands.
        let mut reasons: BTreeMap<&str, u64> = BTreeMap::new();
        let mut pending = 0u64;
        for seq in self.accepted.keys() {
            if self.granted.contains_key(seq) {
                continue;
            }
            match self
                .rejected_early
                .get(seq)
                .or_else(|| self.refused.get(seq))
            {
                Some(reason) => *reasons.entry(reason.as_str()).or_default() += 1,
                None => pending += 1,
            }
        }
        let refused: u64 = reasons.values().sum();
        check.notes.push(format!(
            "{} batches; requests: {} accepted = {} issued ({issued_total} coupons) + {refused} refused {reasons:?} + {pending} pending in the layers",
            self.batches.len(),
            self.accepted.len(),
            self.granted.len(),
        ));
        let stranded = self
            .places
            .iter()
            .filter(|(_, seq)| !self.granted.contains_key(seq.as_str()))
            .count();
        if stranded > 0 {
            check.notes.push(format!(
                "{stranded} group places held for requests without a coupon (released when their requests resume)"
            ));
        }
        check
    }
}
