//! Order-id claims for reward intake (R4), merged per registry shard.
//!
//! Every reward claims its order id in the order-id registry (`domain::order_ids`) before its
//! activity accepts it: one more durable step on the hottest path. One batcher per shard takes
//! whatever claims are waiting (up to `CLAIMS_PER_COMMAND_MAX`) and sends them as one `Claim`
//! command, one event for the lot, so the registry costs the journal a few records per flush
//! instead of one per reward. A few commands are in flight per shard (the shard's actor
//! pipelines them), so the next lot gathers while one is flushed; under light load a lot is a
//! single claim and nothing waits for company.
//!
//! Each caller gets its own claim's outcome with a future for when it is durable: on a store
//! that keeps submission order and stops at its first failure (sled) as soon as the command is
//! submitted, elsewhere once it is durable (see [`OrderClaims::accept`], which answers only
//! once the claim is durable either way). An unknown outcome (`Unavailable`, `Timeout`) is reported to every caller
//! of the lot: each retries with the same order id and gets the recorded answer.

use super::slices::SlicedIntake;
use super::FlowGroup;
use crate::actors::{Durable, ExecError, Registry};
use crate::domain::activity::{Activity, ActivityCommand, ActivityError, ActivityReply, Reward};
use crate::domain::order_ids::{
    shard_of, ClaimOutcome, OrderClaim, OrderIdCommand, OrderIdError, OrderIds,
    CLAIMS_PER_COMMAND_MAX, ORDER_ID_SHARDS,
};
use crate::ids::Id;
use futures::future::{FutureExt, Shared};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

/// `Claim` commands in flight per shard.
const CLAIMS_IN_FLIGHT_PER_SHARD: usize = 4;
/// Claims waiting per shard before `claim` waits (backpressure on intake).
const CLAIMS_QUEUED_PER_SHARD_MAX: usize = 16_384;

/// Resolves once the claim is durable (shared by every claim of its lot).
type ClaimDurable = Shared<Durable<OrderIdError>>;

type ClaimResult = Result<(ClaimOutcome, ClaimDurable), ExecError<OrderIdError>>;

struct PendingClaim {
    claim: OrderClaim,
    reply: oneshot::Sender<ClaimResult>,
}

/// The claim batchers, one per registry shard.
pub struct OrderClaims {
    shards: Vec<mpsc::Sender<PendingClaim>>,
    flows: FlowGroup,
}

impl OrderClaims {
    /// Starts one batcher per shard on an arbiter of their own (shard actors live there).
    /// Must be called within an actix system.
    pub fn start(registry: Arc<Registry<OrderIds>>) -> OrderClaims {
        let mut flows = FlowGroup::start();
        let shards = (0..ORDER_ID_SHARDS)
            .map(|shard| {
                let (tx, rx) = mpsc::channel(CLAIMS_QUEUED_PER_SHARD_MAX);
                let registry = registry.clone();
                flows.spawn(move |stop| batcher(registry, shard, rx, stop));
                tx
            })
            .collect();
        OrderClaims { shards, flows }
    }

    /// Claims the reward's order id for its activity and payload; answers once the claim is
    /// decided and submitted to the journal, with a future for when it is durable (already
    /// resolved where the store does not keep submission order: see [`OrderClaims::accept`]).
    pub async fn claim(&self, activity_id: &Id, reward: &Reward) -> ClaimResult {
        let claim = OrderClaim::of(activity_id, reward);
        let shard = shard_of(&claim.order_id) as usize;
        let (reply, answer) = oneshot::channel();
        let stopped = || ExecError::Unavailable("order-id claims stopped".into());
        self.shards[shard]
            .send(PendingClaim { claim, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Reward intake (R1, R4, R10), the one way a reward enters: claims the order id
    /// (durable), then accepts the reward in its activity (budget, idempotency). A crash
    /// between the two leaves a claim without a reward: the identical retry replays the claim
    /// and is accepted; any other payload under that order id is a conflict, in any activity.
    /// `Ok(replayed)`: accepted and durable (`replayed` for the original outcome of an
    /// identical earlier request).
    /// With `slices` (a cluster's intake shards), the reward is accepted by its intake shard
    /// against a budget slice instead of by the activity itself.
    pub async fn accept(
        &self,
        activities: &Arc<Registry<Activity>>,
        slices: Option<&SlicedIntake>,
        activity_id: &Id,
        reward: Reward,
        require_budget: bool,
    ) -> Result<bool, ExecError<ActivityError>> {
        let conflict = || {
            ExecError::Rejected(ActivityError::IdempotencyConflict {
                order_id: reward.order_id.clone(),
            })
        };
        // The claim answers once durable (`Registry::execute_chained`: its overlap with the
        // acceptance's flush is withdrawn, see there), so the acceptance, sent after it,
        // cannot be durable unless the claim is.
        let durable = match self.claim(activity_id, &reward).await {
            Ok((ClaimOutcome::Claimed | ClaimOutcome::Replayed, durable)) => durable,
            Ok((ClaimOutcome::Conflict, durable)) => {
                claim_durable(durable).await?;
                return Err(conflict());
            }
            Err(ExecError::Rejected(e)) => {
                // Only a claim command of the wrong size: a bug in this module.
                crate::error_limited!(error = %e, "order-id registry refused a claim command");
                return Err(ExecError::Unavailable(e.to_string()));
            }
            Err(ExecError::Unavailable(why)) => return Err(ExecError::Unavailable(why)),
            Err(ExecError::Overloaded) => return Err(ExecError::Overloaded),
            Err(ExecError::Timeout) => return Err(ExecError::Timeout),
        };
        let accepted = match slices {
            Some(slices) => {
                slices
                    .accept(activities, activity_id, reward, require_budget)
                    .await
            }
            None => {
                let command = ActivityCommand::Accept {
                    reward,
                    require_budget,
                };
                match activities.execute(activity_id.as_str(), command).await {
                    Ok(ActivityReply::Accepted { replayed }) => Ok(replayed),
                    Ok(other) => Err(ExecError::Unavailable(format!(
                        "unexpected activity reply to Accept: {other:?}"
                    ))),
                    Err(e) => Err(e),
                }
            }
        };
        claim_durable(durable).await?;
        accepted
    }

    /// Stops the batchers once the lots in flight are answered (after the HTTP server has
    /// finished its requests).
    pub async fn stop(&self) {
        self.flows.stop().await;
    }
}

/// Waits for a claim to be durable; a claim that never becomes durable leaves the request's
/// outcome unknown (the client retries with the same order id).
async fn claim_durable(durable: ClaimDurable) -> Result<(), ExecError<ActivityError>> {
    durable.await.map_err(|e| match e {
        ExecError::Overloaded => ExecError::Overloaded,
        ExecError::Timeout => ExecError::Timeout,
        other => ExecError::Unavailable(format!("order-id claim not durable: {other}")),
    })
}

async fn batcher(
    registry: Arc<Registry<OrderIds>>,
    shard: u32,
    mut rx: mpsc::Receiver<PendingClaim>,
    mut stop: watch::Receiver<bool>,
) {
    let in_flight = Arc::new(Semaphore::new(CLAIMS_IN_FLIGHT_PER_SHARD));
    let shard_id = shard.to_string();
    loop {
        let first = tokio::select! {
            biased;
            changed = stop.changed() => if changed.is_err() || *stop.borrow() { break } else { continue },
            first = rx.recv() => match first { Some(p) => p, None => break },
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let mut lot = vec![first];
        while lot.len() < CLAIMS_PER_COMMAND_MAX {
            match rx.try_recv() {
                Ok(p) => lot.push(p),
                Err(_) => break,
            }
        }
        let (registry, shard_id) = (registry.clone(), shard_id.clone());
        // On the arbiter's local set: the shard's actor is started on this arbiter.
        actix_rt::spawn(async move {
            let claims = lot.iter().map(|p| p.claim.clone()).collect();
            let command = OrderIdCommand::Claim { claims };
            let reply = registry.execute_chained(&shard_id, command).await;
            match reply {
                Ok((outcomes, durable)) if outcomes.0.len() == lot.len() => {
                    let durable = durable.shared();
                    for (pending, outcome) in lot.into_iter().zip(outcomes.0) {
                        let _ = pending.reply.send(Ok((outcome, durable.clone())));
                    }
                }
                Ok((other, _)) => {
                    tracing::error!(reply = ?other, "order-id registry answered another number of claims");
                    for pending in lot {
                        let _ = pending.reply.send(Err(ExecError::Unavailable(
                            "unexpected order-id registry reply".into(),
                        )));
                    }
                }
                Err(e) => {
                    for pending in lot {
                        let _ = pending.reply.send(Err(e.clone()));
                    }
                }
            }
            drop(permit);
        });
    }
    // Lots in flight finish; anything still queued is answered "unavailable" (its caller
    // retries with the same order id after the restart).
    let _ = in_flight
        .acquire_many(CLAIMS_IN_FLIGHT_PER_SHARD as u32)
        .await;
    rx.close();
    while let Ok(pending) = rx.try_recv() {
        let _ = pending.reply.send(Err(ExecError::Unavailable(
            "order-id claims stopping".into(),
        )));
    }
}
