//! Who is in the cluster and who holds which partition: three JetStream key-value buckets.
//!
//! - `hb_cluster`, key `deployment`: the partition count and lease TTL every node must agree
//!   on, written once by the first node (create-if-absent) and compared by every later one.
//! - `hb_nodes`, key `<node id>`: one entry per live node, renewed by its keeper. The bucket's
//!   `max_age` is the lease TTL: a node that stops renewing (killed, paused, cut off)
//!   disappears from it by itself.
//! - `hb_leases`, key `p007`: the partition's holder (node and incarnation). Same `max_age`.
//!   Taken with `create` (only if absent), renewed with `update` at the revision last seen
//!   (compare-and-set), given up with a delete at that revision. The revision at which the
//!   lease was taken is its epoch.
//!
//! The [`Keeper`] runs three tasks. The renewal task renews the node's registration and every
//! lease it holds each TTL/4, all leases at once (a round unanswered within TTL/4 is
//! abandoned). The watchdog tells the host the moment a lease's validity ends. A lease is
//! *valid* for this node until
//! 2/3 TTL after the last renewal was sent; the server keeps it at least a full TTL after it
//! received that renewal, so a node stops believing it holds a partition at least TTL/3
//! before any other node could take it, whatever happened to its renewals (a paused
//! process, an unreachable bucket, a slow disk). Validity is checked before anything else
//! when the task wakes, so a node that was paused past its lease gives the partition up
//! before it sends anything. The planning task reads the live nodes and every lease each
//! TTL/8 and applies [`plan::plan`]: it releases its surplus (the host drains first) and
//! takes free partitions up to its share.
//!
//! The host (what serves a partition: its log writer, actors, flows and request subject)
//! hears about each change through [`PartitionHost`], and asks [`Keeper::holds`] before it
//! writes. Leases only keep two writers from fighting: the log's fencing keeps the books right
//! even when a paused node wakes up believing it still holds its partitions.

use super::partition::{Partition, Partitions};
use super::{plan, NodeId};
use async_nats::jetstream::{self, kv};
use futures::future::{join_all, BoxFuture, FutureExt};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The first part of the buckets' names (`hb_cluster`, `hb_nodes`, `hb_leases`) unless
/// configured otherwise (the load generator uses a namespace of its own).
pub const NAMESPACE_DEFAULT: &str = "hb";
/// How long a lease lasts without renewal unless configured otherwise.
pub const LEASE_TTL_DEFAULT: Duration = Duration::from_secs(4);
/// The shortest lease accepted: renewals every TTL/4 must fit in it comfortably.
pub const LEASE_TTL_MIN: Duration = Duration::from_secs(1);
const DEPLOYMENT_KEY: &str = "deployment";

/// One node's cluster settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node: NodeId,
    pub partitions: Partitions,
    pub lease_ttl: Duration,
    /// Replicas of the three buckets (as the log's streams).
    pub replicas: usize,
    /// The buckets are `<namespace>_cluster`, `<namespace>_nodes` and `<namespace>_leases`.
    pub namespace: String,
    /// The coupon intake shard count: a seq_no's shard (its intake entity, so its partition)
    /// must be the same whichever node computes it. `None`: not checked.
    pub coupon_intake_shards: Option<u32>,
    /// The reward intake shard count per activity: an order id's shard must be the same
    /// whichever node computes it, or a retry could be accepted by a second shard.
    pub reward_intake_shards: Option<u32>,
}

impl Settings {
    pub fn new(node: NodeId, partitions: Partitions) -> Settings {
        Settings {
            node,
            partitions,
            lease_ttl: LEASE_TTL_DEFAULT,
            replicas: crate::events::jetstream::REPLICAS_DEFAULT,
            namespace: NAMESPACE_DEFAULT.into(),
            coupon_intake_shards: None,
            reward_intake_shards: None,
        }
    }

    /// The bucket of what every node must agree on.
    pub fn deployment_bucket(&self) -> String {
        format!("{}_cluster", self.namespace)
    }

    /// The bucket of live nodes.
    pub fn nodes_bucket(&self) -> String {
        format!("{}_nodes", self.namespace)
    }

    /// The bucket of partition leases.
    pub fn leases_bucket(&self) -> String {
        format!("{}_leases", self.namespace)
    }

    /// The bucket of fleet-wide rate limits.
    pub fn limits_bucket(&self) -> String {
        format!("{}_limits", self.namespace)
    }

    fn renew_every(&self) -> Duration {
        self.lease_ttl / 4
    }

    fn plan_every(&self) -> Duration {
        self.lease_ttl / 8
    }

    /// How long after a renewal was sent this node still counts on the lease.
    fn valid_for(&self) -> Duration {
        self.lease_ttl * 2 / 3
    }
}

/// Why the cluster cannot be joined.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "this node says {asked} partitions but the deployment has {deployed}: every node must \
         agree (P is fixed per deployment; changing it would move entities to other logs)"
    )]
    PartitionsDisagree { deployed: u16, asked: u16 },
    #[error(
        "this node says leases last {asked_ms} ms but the deployment's last {deployed_ms} ms: \
         every node must agree"
    )]
    LeaseTtlDisagree { deployed_ms: u64, asked_ms: u64 },
    #[error(
        "this node says {asked} coupon intake shards but the deployment has {deployed}: every \
         node must agree (a seq_no's shard decides which intake accepts it)"
    )]
    IntakeShardsDisagree { deployed: u32, asked: u32 },
    #[error(
        "this node says {asked} reward intake shards per activity but the deployment has {deployed}: \
         every node must agree (an order id's shard decides which intake accepts it)"
    )]
    RewardIntakeShardsDisagree { deployed: u32, asked: u32 },
    #[error(
        "node id {node} is in use by a live node (its registration was renewed for {waited:?})"
    )]
    NodeIdInUse { node: NodeId, waited: Duration },
    #[error("a lease TTL must be at least {LEASE_TTL_MIN:?}, not {0:?}")]
    BadLeaseTtl(Duration),
    #[error("JetStream: {0}")]
    Unavailable(String),
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Unavailable(format!("{what}: {e}"))
}

/// What every node must agree on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Deployment {
    partitions: u16,
    lease_ttl_ms: u64,
    /// Absent in a deployment recorded before it was agreed on: not checked there.
    #[serde(default)]
    coupon_intake_shards: Option<u32>,
    #[serde(default)]
    reward_intake_shards: Option<u32>,
}

/// What a lease key holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct LeaseValue {
    node: NodeId,
    incarnation: String,
    /// The revision at which the lease was taken (absent in the create itself).
    #[serde(default)]
    epoch: Option<u64>,
}

/// What a node key holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct NodeValue {
    node: NodeId,
    incarnation: String,
}

/// The three buckets of a deployment, checked.
#[derive(Clone)]
pub struct Buckets {
    nodes: kv::Store,
    leases: kv::Store,
}

impl Buckets {
    /// The epoch of `partition`'s lease as the bucket has it now (`None`: free, or unreadable):
    /// for a caller that cannot wait for the next planning round's view.
    pub async fn holder_epoch(&self, partition: Partition) -> Option<u64> {
        let entry = self.leases.entry(partition.key()).await.ok()??;
        if entry.operation != kv::Operation::Put {
            return None;
        }
        let value: LeaseValue = serde_json::from_slice(&entry.value).ok()?;
        Some(value.epoch.unwrap_or(entry.revision))
    }
}

async fn bucket(
    js: &jetstream::Context,
    name: &str,
    description: &str,
    max_age: Duration,
    replicas: usize,
) -> Result<kv::Store, ClusterError> {
    if let Ok(store) = js.get_key_value(name).await {
        return Ok(store);
    }
    let created = js
        .create_key_value(kv::Config {
            bucket: name.to_owned(),
            description: description.to_owned(),
            history: 1,
            max_age,
            num_replicas: replicas,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await;
    match created {
        Ok(store) => Ok(store),
        // Another node created it at the same moment.
        Err(e) => js
            .get_key_value(name)
            .await
            .map_err(|_| unavailable(&format!("bucket {name}"), e)),
    }
}

/// How long a starting node keeps asking for the deployment's agreement while the servers
/// cannot answer (a cluster of fresh servers electing the bucket's leader, seen to take more
/// than 10 s on a loaded machine).
const AGREEMENT_PATIENCE: Duration = Duration::from_secs(60);

/// Writes `ours` as the deployment's agreement unless one is recorded; `Ok(None)`: ours is now
/// the agreement, `Ok(Some(stored))`: the one recorded before. The write is a publish that
/// expects no earlier value (the bucket's compare-and-set), the read asks the stream's leader
/// (a replica's direct read, as `kv::Store::create` makes, answered "no stream found" for
/// seconds on fresh servers). Asked again while the servers cannot answer, up to
/// [`AGREEMENT_PATIENCE`].
async fn agree(agreement: &kv::Store, ours: Vec<u8>) -> Result<Option<Vec<u8>>, ClusterError> {
    let deadline = Instant::now() + AGREEMENT_PATIENCE;
    let subject = format!("{}{DEPLOYMENT_KEY}", agreement.prefix);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let why = match agreement
            .update(DEPLOYMENT_KEY, ours.clone().into(), 0)
            .await
        {
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                match agreement
                    .stream
                    .get_last_raw_message_by_subject(&subject)
                    .await
                {
                    Ok(message) => return Ok(Some(message.payload.to_vec())),
                    Err(e) => format!("reading the agreement: {e}"),
                }
            }
            Err(e) => format!("writing the agreement: {e}"),
        };
        if Instant::now() >= deadline {
            return Err(unavailable("deployment", why));
        }
        if attempt % 4 == 1 {
            tracing::warn!(attempt, why = %why, "the deployment's agreement cannot be read yet; asking again");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Joins the deployment's agreement: the first node writes its partition count and lease TTL,
/// every later node must say the same (a node that disagrees is refused before it touches a
/// lease). Creates the buckets when they do not exist.
pub async fn check_deployment(
    js: &jetstream::Context,
    settings: &Settings,
) -> Result<Buckets, ClusterError> {
    if settings.lease_ttl < LEASE_TTL_MIN {
        return Err(ClusterError::BadLeaseTtl(settings.lease_ttl));
    }
    let ours = Deployment {
        partitions: settings.partitions.count(),
        lease_ttl_ms: u64::try_from(settings.lease_ttl.as_millis()).unwrap_or(u64::MAX),
        coupon_intake_shards: settings.coupon_intake_shards,
        reward_intake_shards: settings.reward_intake_shards,
    };
    let agreement = bucket(
        js,
        &settings.deployment_bucket(),
        "what every hongbao node of this deployment agrees on",
        Duration::ZERO,
        settings.replicas,
    )
    .await?;
    let encoded = serde_json::to_vec(&ours).map_err(|e| unavailable("deployment", e))?;
    let stored = agree(&agreement, encoded).await?;
    if let Some(stored) = stored {
        let deployed: Deployment =
            serde_json::from_slice(&stored).map_err(|e| unavailable("deployment", e))?;
        if deployed.partitions != ours.partitions {
            return Err(ClusterError::PartitionsDisagree {
                deployed: deployed.partitions,
                asked: ours.partitions,
            });
        }
        if deployed.lease_ttl_ms != ours.lease_ttl_ms {
            return Err(ClusterError::LeaseTtlDisagree {
                deployed_ms: deployed.lease_ttl_ms,
                asked_ms: ours.lease_ttl_ms,
            });
        }
        if let (Some(deployed), Some(asked)) =
            (deployed.coupon_intake_shards, ours.coupon_intake_shards)
        {
            if deployed != asked {
                return Err(ClusterError::IntakeShardsDisagree { deployed, asked });
            }
        }
        if let (Some(deployed), Some(asked)) =
            (deployed.reward_intake_shards, ours.reward_intake_shards)
        {
            if deployed != asked {
                return Err(ClusterError::RewardIntakeShardsDisagree { deployed, asked });
            }
        }
    }
    let ttl = settings.lease_ttl;
    let nodes = bucket(
        js,
        &settings.nodes_bucket(),
        "live hongbao nodes",
        ttl,
        settings.replicas,
    )
    .await?;
    let leases = bucket(
        js,
        &settings.leases_bucket(),
        "partition leases: holder and epoch",
        ttl,
        settings.replicas,
    )
    .await?;
    Ok(Buckets { nodes, leases })
}

/// The partition count the deployment in `namespace` agreed on, read without joining it (for
/// the offline tools); `None` when no node ever started there.
pub async fn deployed_partitions(
    js: &jetstream::Context,
    namespace: &str,
) -> Result<Option<Partitions>, ClusterError> {
    let Ok(agreement) = js.get_key_value(format!("{namespace}_cluster")).await else {
        return Ok(None);
    };
    let Some(stored) = agreement
        .get(DEPLOYMENT_KEY)
        .await
        .map_err(|e| unavailable("deployment", e))?
    else {
        return Ok(None);
    };
    let deployed: Deployment =
        serde_json::from_slice(&stored).map_err(|e| unavailable("deployment", e))?;
    Partitions::new(u32::from(deployed.partitions))
        .map(Some)
        .map_err(|e| unavailable("deployment", e))
}

/// Why a host stops serving a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// The node is over its fair share: drain in-flight work, then the lease is released.
    Rebalance,
    /// The lease is no longer valid (renewals failed or it was taken): stop writing at once.
    Lost,
    /// The node is leaving the cluster: drain, then the lease is released.
    Leaving,
}

/// What serves partitions on this node, told by the keeper when it must start or stop.
pub trait PartitionHost: Send + Sync + 'static {
    /// The lease on `partition` was taken: read the partition's tail, resume its flows,
    /// start answering; write only while `lease.is_valid()` (its [`Lease::write_guard`] asks
    /// before every batch). An error gives the lease back.
    fn open(&self, partition: Partition, lease: Lease) -> BoxFuture<'static, Result<(), String>>;
    /// Stop serving `partition`; for a release, the lease is deleted once this returns.
    fn close(&self, partition: Partition, why: Close) -> BoxFuture<'static, ()>;
}

/// A lease this node holds.
#[derive(Debug, Clone, Copy)]
struct Held {
    epoch: u64,
    revision: u64,
    valid_until: Instant,
}

type HeldMap = Arc<Mutex<BTreeMap<Partition, Held>>>;

/// One lease as its host sees it: the epoch it was taken at, and whether this node may still
/// count on it (held, same epoch, validity not run out).
#[derive(Clone)]
pub struct Lease {
    partition: Partition,
    epoch: u64,
    held: HeldMap,
}

impl Lease {
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn is_valid(&self) -> bool {
        lock(&self.held)
            .get(&self.partition)
            .is_some_and(|h| h.epoch == self.epoch && h.valid_until > Instant::now())
    }

    /// For the partition's log writer: it publishes nothing once this lease is not valid.
    pub fn write_guard(&self) -> crate::events::jetstream_store::WriteGuard {
        let lease = self.clone();
        crate::events::jetstream_store::WriteGuard(Arc::new(move || lease.is_valid()))
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lease({} epoch {})", self.partition, self.epoch)
    }
}

/// One partition's lease as the cluster view shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaseView {
    pub partition: String,
    /// The holder, or `None` while the partition is free.
    pub node: Option<NodeId>,
    pub epoch: Option<u64>,
}

/// What this node last read of the cluster (for `/v1/admin/cluster`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterView {
    pub node: NodeId,
    pub partitions: u16,
    pub lease_ttl_ms: u64,
    /// Live nodes (registrations not expired), sorted.
    pub nodes: Vec<NodeId>,
    /// Every partition in order.
    pub leases: Vec<LeaseView>,
    /// Partitions this node holds with a valid lease.
    pub held: Vec<String>,
}

struct Shared {
    settings: Settings,
    incarnation: String,
    buckets: Buckets,
    host: Arc<dyn PartitionHost>,
    held: HeldMap,
    /// Taken around every change of what is held together with the host's call, so that the
    /// host hears of each partition's opens and closes in the order they happened.
    gate: tokio::sync::Mutex<()>,
    /// The closes of lost partitions, which run on their own (see [`lose`]): a partition taken
    /// again opens only once its close has ended, and leaving waits for them.
    closing: Mutex<BTreeMap<Partition, Closing>>,
    node_revision: Mutex<u64>,
    view: watch::Sender<Option<Arc<ClusterView>>>,
}

type Closing = futures::future::Shared<BoxFuture<'static, ()>>;

/// Holds this node's registration and leases. Dropping it stops its tasks without releasing
/// anything (as a crash would: the leases expire); [`Keeper::leave`] hands everything over.
pub struct Keeper {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Keeper {
    /// Registers the node (waiting up to one lease TTL for a previous incarnation's
    /// registration to expire) and starts renewing and planning. `buckets` comes from
    /// [`check_deployment`].
    pub async fn start(
        settings: Settings,
        buckets: Buckets,
        host: Arc<dyn PartitionHost>,
    ) -> Result<Keeper, ClusterError> {
        let incarnation = format!("{:032x}", rand::random::<u128>());
        let value = NodeValue {
            node: settings.node.clone(),
            incarnation: incarnation.clone(),
        };
        let encoded = serde_json::to_vec(&value).map_err(|e| unavailable("node", e))?;
        let started = Instant::now();
        let wait = settings.lease_ttl + settings.lease_ttl / 2;
        let revision = loop {
            match buckets
                .nodes
                .create(settings.node.as_str(), encoded.clone().into())
                .await
            {
                Ok(revision) => break revision,
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    if started.elapsed() > wait {
                        return Err(ClusterError::NodeIdInUse {
                            node: settings.node.clone(),
                            waited: started.elapsed(),
                        });
                    }
                    tracing::info!(
                        node = %settings.node,
                        "node id registered by an earlier incarnation; waiting for it to expire"
                    );
                    tokio::time::sleep(settings.lease_ttl / 8).await;
                }
                Err(e) => return Err(unavailable("node registration", e)),
            }
        };
        let (view, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            settings,
            incarnation,
            buckets,
            host,
            held: Arc::new(Mutex::new(BTreeMap::new())),
            gate: tokio::sync::Mutex::new(()),
            closing: Mutex::new(BTreeMap::new()),
            node_revision: Mutex::new(revision),
            view,
        });
        let (stop, stopped) = watch::channel(false);
        let renewing = tokio::spawn(renew_loop(shared.clone(), stopped.clone()));
        let watching = tokio::spawn(watchdog_loop(shared.clone(), stopped.clone()));
        let planning = tokio::spawn(plan_loop(shared.clone(), stopped));
        Ok(Keeper {
            shared,
            stop,
            tasks: vec![renewing, watching, planning],
        })
    }

    /// The epoch of this node's lease on `partition` if it holds it and the lease is valid.
    /// The host asks before it writes.
    pub fn holds(&self, partition: Partition) -> Option<u64> {
        self.held_until(partition)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(epoch, _)| epoch)
    }

    /// The epoch and end of validity of this node's lease on `partition`, valid or not.
    pub fn held_until(&self, partition: Partition) -> Option<(u64, Instant)> {
        lock(&self.shared.held)
            .get(&partition)
            .map(|held| (held.epoch, held.valid_until))
    }

    /// Partitions held with a valid lease.
    pub fn held(&self) -> Vec<Partition> {
        let now = Instant::now();
        lock(&self.shared.held)
            .iter()
            .filter(|(_, held)| held.valid_until > now)
            .map(|(p, _)| *p)
            .collect()
    }

    pub fn incarnation(&self) -> &str {
        &self.shared.incarnation
    }

    /// What the planning task last read of the cluster (`None` before its first read).
    pub fn view(&self) -> watch::Receiver<Option<Arc<ClusterView>>> {
        self.shared.view.subscribe()
    }

    /// Leaves the cluster: stops renewing and planning, closes every partition (the host
    /// drains), releases each lease and the registration, so that other nodes take over
    /// at once instead of after a TTL.
    pub async fn leave(mut self) {
        let _ = self.stop.send(true);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        let held: Vec<(Partition, Held)> = {
            let _gate = self.shared.gate.lock().await;
            // The closes of partitions lost before: ended before the node says it has left.
            let closing: Vec<Closing> = std::mem::take(&mut *lock(&self.shared.closing))
                .into_values()
                .collect();
            join_all(closing).await;
            let held: Vec<(Partition, Held)> = std::mem::take(&mut *lock(&self.shared.held))
                .into_iter()
                .collect();
            for (partition, _) in &held {
                self.shared.host.close(*partition, Close::Leaving).await;
            }
            held
        };
        for (partition, lease) in held {
            release(&self.shared, partition, lease.revision).await;
        }
        let revision = *lock(&self.shared.node_revision);
        if let Err(e) = self
            .shared
            .buckets
            .nodes
            .delete_expect_revision(self.shared.settings.node.as_str(), Some(revision))
            .await
        {
            tracing::warn!(error = %e, "node registration not deleted; it expires by itself");
        }
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn sleep_or_stop(stopped: &mut watch::Receiver<bool>, period: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(period) => *stopped.borrow(),
        _ = stopped.changed() => true,
    }
}

fn lease_value(shared: &Shared, epoch: Option<u64>) -> Vec<u8> {
    serde_json::to_vec(&LeaseValue {
        node: shared.settings.node.clone(),
        incarnation: shared.incarnation.clone(),
        epoch,
    })
    .unwrap_or_default()
}

/// Forgets the leases that ran out or were taken (`lost`: partition and the revision found
/// so; `taken`: another writer moved its revision, else its validity ran out) and tells the
/// host to stop serving them. A lease renewed or re-taken meanwhile is left alone.
///
/// The closes run to their end on their own, not awaited here: a close waits for the requests
/// in flight, seconds on a log whose leader is being elected, and the renewals of every other
/// lease must not wait behind it (they ran out one after the other, and leases just won were
/// lost as soon as they were opened). Writing has stopped already: each write guard asks for
/// the lease's validity, which ran out (or, taken, ran out before any other node could take
/// it). A partition taken again opens once its close has ended ([`take_all`]), so the host
/// never opens a partition it is still closing.
async fn lose(shared: &Shared, lost: Vec<(Partition, u64)>, taken: bool) {
    if lost.is_empty() {
        return;
    }
    let gate = shared.gate.lock().await;
    let mut closing = Vec::new();
    for (partition, revision) in lost {
        let removed = {
            let mut held = lock(&shared.held);
            match held.get(&partition) {
                Some(lease)
                    if lease.revision == revision
                        && (taken || lease.valid_until <= Instant::now()) =>
                {
                    held.remove(&partition)
                }
                _ => None,
            }
        };
        if removed.is_some() {
            tracing::warn!(%partition, "lease lost: this node stops writing the partition");
            let close = shared.host.close(partition, Close::Lost).shared();
            lock(&shared.closing).insert(partition, close.clone());
            closing.push(close);
        }
    }
    drop(gate);
    // Closed together: a woken node has every lease to give up at once.
    if !closing.is_empty() {
        tokio::spawn(join_all(closing));
    }
}

/// [`lose`] on a task of its own, for the renewals, which must not wait for the gate (held
/// while partitions open).
fn lose_aside(shared: &Arc<Shared>, lost: Vec<(Partition, u64)>, taken: bool) {
    if lost.is_empty() {
        return;
    }
    let shared = shared.clone();
    tokio::spawn(async move { lose(&shared, lost, taken).await });
}

async fn renew_loop(shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    let every = shared.settings.renew_every();
    loop {
        if sleep_or_stop(&mut stopped, every).await {
            return;
        }
        // First what ran out while this task was not running (a paused process wakes up
        // here), then the renewals, abandoned if they take longer than a period (the server
        // is unreachable): validity counts from renewals that were answered, so an abandoned
        // one only costs validity, and the next period tries again. What they find lost is
        // given up aside: the next renewal never waits for it.
        lose_aside(&shared, expired(&shared), false);
        match tokio::time::timeout(every, renew_once(&shared)).await {
            Ok(lost) => lose_aside(&shared, lost, true),
            Err(_) => tracing::warn!("lease renewals unanswered for {every:?}"),
        }
    }
}

/// Tells the host the moment a lease's validity ends, whatever the renewals are doing.
async fn watchdog_loop(shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    let every = shared.settings.renew_every();
    loop {
        let now = Instant::now();
        let earliest = lock(&shared.held)
            .values()
            .map(|lease| lease.valid_until)
            .min()
            .unwrap_or(now + every)
            .min(now + every);
        if sleep_or_stop(&mut stopped, earliest.saturating_duration_since(now)).await {
            return;
        }
        expire(&shared).await;
    }
}

async fn expire(shared: &Shared) {
    lose(shared, expired(shared), false).await;
}

/// The leases held whose validity ran out.
fn expired(shared: &Shared) -> Vec<(Partition, u64)> {
    let now = Instant::now();
    lock(&shared.held)
        .iter()
        .filter(|(_, lease)| lease.valid_until <= now)
        .map(|(p, lease)| (*p, lease.revision))
        .collect()
}

/// Renews the registration and every lease; returns the leases found taken by another node.
async fn renew_once(shared: &Arc<Shared>) -> Vec<(Partition, u64)> {
    let node = shared.settings.node.as_str();
    let registration = serde_json::to_vec(&NodeValue {
        node: shared.settings.node.clone(),
        incarnation: shared.incarnation.clone(),
    })
    .unwrap_or_default();
    let revision = *lock(&shared.node_revision);
    match shared
        .buckets
        .nodes
        .update(node, registration.clone().into(), revision)
        .await
    {
        Ok(next) => *lock(&shared.node_revision) = next,
        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
            // The registration expired (this node was paused or cut off past its TTL).
            match shared.buckets.nodes.create(node, registration.into()).await {
                Ok(next) => *lock(&shared.node_revision) = next,
                Err(e) => tracing::error!(error = %e, "node registration cannot be renewed"),
            }
        }
        Err(e) => tracing::warn!(error = %e, "node registration not renewed"),
    }

    let leases: Vec<(Partition, Held)> = lock(&shared.held).iter().map(|(p, h)| (*p, *h)).collect();
    let renewals = leases.into_iter().map(|(partition, lease)| {
        let value = lease_value(shared, Some(lease.epoch));
        async move {
            let sent = Instant::now();
            let result = shared
                .buckets
                .leases
                .update(partition.key(), value.into(), lease.revision)
                .await;
            (partition, lease, sent, result)
        }
    });
    let mut lost = Vec::new();
    let now = Instant::now();
    for (partition, lease, sent, result) in join_all(renewals).await {
        let mut held = lock(&shared.held);
        // Skip a lease released or re-taken while the renewal was in flight.
        let Some(current) = held.get_mut(&partition) else {
            continue;
        };
        if current.revision != lease.revision {
            continue;
        }
        match result {
            // A renewal that lands after the lease ran out does not revive it: the host was
            // told (or is about to be told) to stop; planning takes it back properly.
            Ok(revision) if current.valid_until > now => {
                current.revision = revision;
                current.valid_until = sent + shared.settings.valid_for();
            }
            Ok(_) => {}
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                lost.push((partition, lease.revision));
            }
            Err(e) => tracing::warn!(%partition, error = %e, "lease not renewed"),
        }
    }
    lost
}

async fn release(shared: &Shared, partition: Partition, revision: u64) {
    let leases = &shared.buckets.leases;
    let mut revision = revision;
    for _ in 0..2 {
        match leases
            .delete_expect_revision(partition.key(), Some(revision))
            .await
        {
            Ok(()) => return,
            Err(e) => {
                // A renewal may have landed meanwhile: delete at its revision if the lease
                // is still this incarnation's.
                match leases.entry(partition.key()).await {
                    Ok(Some(entry))
                        if entry.operation == kv::Operation::Put
                            && serde_json::from_slice::<LeaseValue>(&entry.value)
                                .is_ok_and(|v| v.incarnation == shared.incarnation) =>
                    {
                        revision = entry.revision;
                    }
                    _ => {
                        tracing::debug!(%partition, error = %e, "lease not released");
                        return;
                    }
                }
            }
        }
    }
    tracing::warn!(%partition, "lease not released; it expires by itself");
}

async fn plan_loop(shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    // Nodes starting together see each other before the first of them takes everything.
    if sleep_or_stop(&mut stopped, shared.settings.renew_every()).await {
        return;
    }
    loop {
        if let Err(e) = plan_once(&shared).await {
            tracing::warn!(error = %e, "cluster not read; planning again shortly");
        }
        if sleep_or_stop(&mut stopped, shared.settings.plan_every()).await {
            return;
        }
    }
}

/// A lease as read from the bucket.
struct Read {
    value: LeaseValue,
    revision: u64,
}

async fn read_leases(shared: &Shared) -> Result<BTreeMap<Partition, Read>, ClusterError> {
    let leases = &shared.buckets.leases;
    let keys: Vec<String> = match leases.keys().await {
        Ok(keys) => keys.filter_map(|k| async move { k.ok() }).collect().await,
        Err(e) => return Err(unavailable("leases", e)),
    };
    let reads = keys
        .into_iter()
        .filter_map(|key| Partition::from_key(&key).map(|p| (p, key)))
        .filter(|(p, _)| p.0 < shared.settings.partitions.count())
        .map(|(partition, key)| async move { (partition, leases.entry(key).await) });
    let mut out = BTreeMap::new();
    for (partition, entry) in join_all(reads).await {
        let entry = entry.map_err(|e| unavailable("lease", e))?;
        let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
            continue;
        };
        match serde_json::from_slice::<LeaseValue>(&entry.value) {
            Ok(value) => {
                out.insert(
                    partition,
                    Read {
                        value,
                        revision: entry.revision,
                    },
                );
            }
            Err(e) => tracing::error!(%partition, error = %e, "unreadable lease; left alone"),
        }
    }
    Ok(out)
}

async fn plan_once(shared: &Arc<Shared>) -> Result<(), ClusterError> {
    let settings = &shared.settings;
    let me = &settings.node;
    let mut live: BTreeSet<NodeId> = match shared.buckets.nodes.keys().await {
        Ok(keys) => {
            keys.filter_map(|k| async move { k.ok().and_then(|k| NodeId::parse(&k).ok()) })
                .collect()
                .await
        }
        Err(e) => return Err(unavailable("nodes", e)),
    };
    live.insert(me.clone());
    let read = read_leases(shared).await?;

    // Leases naming this node that it does not hold: an earlier incarnation's (dead: this one
    // registered only after its registration expired), or this incarnation's after its
    // validity ran out while the bucket was unreachable (it stopped writing then). Either way
    // nobody else took them since: take them back at the revision read.
    let orphans: Vec<(Partition, u64, u64)> = {
        let held = lock(&shared.held);
        read.iter()
            .filter(|(p, r)| r.value.node == *me && !held.contains_key(p))
            .map(|(p, r)| (*p, r.value.epoch.unwrap_or(r.revision), r.revision))
            .collect()
    };
    for (partition, epoch, revision) in orphans {
        let same_life = read[&partition].value.incarnation == shared.incarnation;
        let epoch = if same_life { Some(epoch) } else { None };
        let sent = Instant::now();
        if let Ok(next) = shared
            .buckets
            .leases
            .update(partition.key(), lease_value(shared, epoch).into(), revision)
            .await
        {
            take(shared, partition, epoch.unwrap_or(next), next, sent).await;
        }
    }

    let owners: BTreeMap<Partition, NodeId> = {
        let held = lock(&shared.held);
        read.iter()
            .filter(|(p, r)| r.value.node != *me || held.contains_key(p))
            .map(|(p, r)| (*p, r.value.node.clone()))
            .collect()
    };
    let step = plan::plan(settings.partitions, &live, &owners, me);
    for partition in step.release {
        let lease = {
            let _gate = shared.gate.lock().await;
            let lease = lock(&shared.held).remove(&partition);
            if lease.is_some() {
                shared.host.close(partition, Close::Rebalance).await;
            }
            lease
        };
        if let Some(lease) = lease {
            release(shared, partition, lease.revision).await;
            tracing::info!(%partition, "lease released to rebalance");
        }
    }
    let mut won = Vec::new();
    for partition in step.acquire {
        let sent = Instant::now();
        match shared
            .buckets
            .leases
            .create(partition.key(), lease_value(shared, None).into())
            .await
        {
            Ok(revision) => won.push((partition, revision, revision, sent)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            // A race lost to another node can also surface as a failed read of the key
            // (seen on three replicas); the next planning round reads again.
            Err(e) => tracing::debug!(%partition, error = %e, "lease not taken"),
        }
    }
    // The holders read, published before the opens (which may wait for a partition another
    // node holds, found through this view), and again with what was won.
    publish_view(shared, &live, &read);
    // Opened together: a node taking over a dead node's share opens many partitions.
    take_all(shared, won).await;
    publish_view(shared, &live, &read);
    Ok(())
}

/// Holds a lease just won and opens the partition; gives it back if the host cannot open it.
async fn take(
    shared: &Arc<Shared>,
    partition: Partition,
    epoch: u64,
    revision: u64,
    sent: Instant,
) {
    take_all(shared, vec![(partition, epoch, revision, sent)]).await;
}

/// Holds leases just won, `(partition, epoch, revision, sent)`, and opens their partitions
/// concurrently; gives back those the host cannot open.
async fn take_all(shared: &Arc<Shared>, won: Vec<(Partition, u64, u64, Instant)>) {
    if won.is_empty() {
        return;
    }
    let gate = shared.gate.lock().await;
    let opens: Vec<_> = won
        .into_iter()
        .map(|(partition, epoch, revision, sent)| {
            lock(&shared.held).insert(
                partition,
                Held {
                    epoch,
                    revision,
                    valid_until: sent + shared.settings.valid_for(),
                },
            );
            tracing::info!(%partition, epoch, "lease taken");
            let lease = Lease {
                partition,
                epoch,
                held: shared.held.clone(),
            };
            let (host, closing) = (
                shared.host.clone(),
                lock(&shared.closing).remove(&partition),
            );
            async move {
                if let Some(closing) = closing {
                    closing.await;
                }
                (partition, host.open(partition, lease).await)
            }
        })
        .collect();
    let mut failed = Vec::new();
    for (partition, opened) in join_all(opens).await {
        if let Err(e) = opened {
            tracing::error!(%partition, error = %e, "partition cannot be opened; lease given back");
            if let Some(lease) = lock(&shared.held).remove(&partition) {
                failed.push((partition, lease.revision));
            }
        }
    }
    drop(gate);
    for (partition, revision) in failed {
        release(shared, partition, revision).await;
    }
}

fn publish_view(shared: &Shared, live: &BTreeSet<NodeId>, read: &BTreeMap<Partition, Read>) {
    let settings = &shared.settings;
    let now = Instant::now();
    let held = lock(&shared.held);
    let leases = settings
        .partitions
        .all()
        .map(|p| {
            // What this node holds is known better than what it read a moment ago.
            let (node, epoch) = match (held.get(&p), read.get(&p)) {
                (Some(lease), _) => (Some(settings.node.clone()), Some(lease.epoch)),
                (None, Some(r)) => (
                    Some(r.value.node.clone()),
                    Some(r.value.epoch.unwrap_or(r.revision)),
                ),
                (None, None) => (None, None),
            };
            LeaseView {
                partition: p.key(),
                node,
                epoch,
            }
        })
        .collect();
    let view = ClusterView {
        node: settings.node.clone(),
        partitions: settings.partitions.count(),
        lease_ttl_ms: u64::try_from(settings.lease_ttl.as_millis()).unwrap_or(u64::MAX),
        nodes: live.iter().cloned().collect(),
        leases,
        held: held
            .iter()
            .filter(|(_, lease)| lease.valid_until > now)
            .map(|(p, _)| p.key())
            .collect(),
    };
    shared.view.send_replace(Some(Arc::new(view)));
}
