//! Time- and log-driven processes. Each follows the global log from a checkpoint of its own,
//! applies effects through actors (whose commands are idempotent, so at-least-once consumption
//! gives exactly-once effect) and paces itself with rate limiters.
//!
//! - [`reward_lanes`]: credit accepted rewards to wallets, per kind, rate-limited, cash first.
//! - [`coupons`]: coupon intake batchers, the two issuance layers, the green channel.
//! - [`packet_claims`]: a packet's claims merged into lots, one event per lot (P3, issue 14).
//! - [`order_claims`]: reward intake's order-id claims, merged per registry shard (R4).
//! - [`slices`]: reward intake through budget slices on intake shards (a cluster's hot activities).
//! - [`packets`]: red packet payment, share transfers, expiry and refunds.
//! - [`withdrawals`]: the withdrawal request flow, payout lanes, compensation, reconciliation.

pub mod coupons;
pub mod order_claims;
pub mod packet_claims;
pub mod packets;
pub mod reward_lanes;
pub mod slices;
pub mod withdrawals;

use crate::actors::Runtime;
use crate::events::StoreError;
use std::future::Future;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, watch};

/// What paces a lane: a token for one unit of work, or how long until the next may be there.
pub trait Pacer: Send + Sync {
    fn check(&self) -> Result<(), Duration>;
}

/// Where a cluster node's lanes get their pacers: the fleet's limits by name
/// (`cluster::limits`), so a rate is the whole fleet's, not each partition's.
pub trait FleetPacing: Send + Sync {
    fn pacer(&self, name: &str, rate_per_s: u32) -> Arc<dyn Pacer>;
}

/// This process's own token bucket (governor), for one node.
struct LocalPacer(governor::DefaultDirectRateLimiter);

impl Pacer for LocalPacer {
    fn check(&self) -> Result<(), Duration> {
        use governor::clock::Clock as _;
        self.0.check().map_err(|not_until| {
            not_until.wait_time_from(governor::clock::DefaultClock::default().now())
        })
    }
}

/// The pacer of the limit `name` (`payout.bank`, `credit.cash`) at `rate_per_s` for lanes on
/// `runtime`: the fleet's on a cluster node, this process's otherwise; none for a rate of 0
/// (unlimited).
pub fn pacer(runtime: &Runtime, name: &str, rate_per_s: u32) -> Option<Arc<dyn Pacer>> {
    let rate = NonZeroU32::new(rate_per_s)?;
    Some(match &runtime.pacing {
        Some(fleet) => fleet.pacer(name, rate.get()),
        None => Arc::new(LocalPacer(governor::DefaultDirectRateLimiter::direct(
            governor::Quota::per_second(rate),
        ))),
    })
}

/// Background tasks on an actix arbiter of their own, stopped together: [`FlowGroup::stop`]
/// signals every task, waits until each has finished (they drain and save their checkpoints)
/// and stops the arbiter.
pub struct FlowGroup {
    stop: watch::Sender<bool>,
    done: std::sync::Mutex<Vec<oneshot::Receiver<()>>>,
    arbiter: actix_rt::ArbiterHandle,
}

impl FlowGroup {
    /// A group on a new arbiter (started now). Must be called within an actix system.
    pub fn start() -> FlowGroup {
        FlowGroup {
            stop: watch::channel(false).0,
            done: std::sync::Mutex::new(Vec::new()),
            arbiter: actix_rt::Arbiter::new().handle(),
        }
    }

    /// Runs a task on the group's arbiter; it is given the stop signal to watch.
    pub fn spawn<F, Fut>(&mut self, task: F)
    where
        F: FnOnce(watch::Receiver<bool>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (done_tx, done) = oneshot::channel();
        if let Ok(list) = self.done.get_mut() {
            list.push(done);
        }
        let stop = self.stop.subscribe();
        self.arbiter.spawn(async move {
            task(stop).await;
            let _ = done_tx.send(());
        });
    }

    /// Signals every task to stop and waits until each has finished.
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        let done = self
            .done
            .lock()
            .map(|mut d| std::mem::take(&mut *d))
            .unwrap_or_default();
        for rx in done {
            let _ = rx.await;
        }
        self.arbiter.stop();
    }
}

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
    crate::faults::injected("flow-checkpoint").map_err(|e| StoreError::Io(e.to_string()))?;
    tree.insert(flow, &seq.to_be_bytes())
        .map_err(|e| StoreError::Io(e.to_string()))?;
    Ok(())
}
