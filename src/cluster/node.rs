//! A cluster node: `hongbao serve --store nats://... --node-id n1`. It holds some of the
//! deployment's partitions (the [`Keeper`] decides which) and serves each held partition as a
//! *cell*: the partition's own log (a [`JetStreamStore`] on its stream, fenced and guarded by
//! the lease) with the single node's views, actors and flows over it ([`AppState::build`]).
//!
//! Any node accepts any request. The request's home entity (`wallet:u42` for
//! `/v1/wallets/u42/...`) names its partition; a request whose partition this node holds runs
//! on that cell's state; any other is forwarded over NATS request-reply to the holder (the
//! [`Router`]), which runs it through its own HTTP stack and sends the answer back. While
//! nobody serves the partition (a hand-over), the answer is 503 with `Retry-After`, never a
//! guess. A request forwarded once is never forwarded again: a holder that has just let the
//! partition go answers 503 too.
//!
//! A cell's registries run a command for an entity of another partition on that partition's
//! holder ([`CellPlacement`], the same subject as forwarded HTTP requests), so flows and
//! handlers move money between partitions unchanged (red packets, rewards and
//! withdrawals are served this way; a reward is accepted by its activity's intake shard against
//! a budget slice (`flows::slices`) and noted pending on its wallet's partition until its
//! credit, delivery or failure settles the note; its status by order id is asked of the
//! registry shard's partition, then of the intake shard's ([`Place::RewardStatus`]);
//! the payment channels' books are the fleet's, in key-value buckets; a coupon request is
//! served by its intake shard's partition, whose layers reach batches and groups through
//! their holders). The switches and the withdrawal policy are the fleet's: they live in
//! `p000`, and every node keeps their current state for its cells, read from there every
//! [`SINGLETONS_POLL`]. A `/v1` path the node does not place answers 501 `not_in_cluster`
//! rather than a wrong answer (docs/ARCHITECTURE.md, "Cluster").

use super::membership::{
    check_deployment, Close, ClusterView, Keeper, Lease, PartitionHost, Settings,
};
use super::partition::Partition;
use super::router::{Handler, RouteError, Router, Serving};
use crate::actors::board::{self, Current};
use crate::actors::{typed_answer, Placement, RemoteAnswer, RemoteCall, RemoteOp};
use crate::clock::Clock;
use crate::config::{Config, Keys};
use crate::domain::activity::{intake_shard_of, shard_entity};
use crate::domain::coupon::{intake_shard, CouponIntake};
use crate::domain::order_ids::{shard_of, OrderIds};
use crate::domain::switches::Switches;
use crate::domain::withdrawal::PolicyState;
use crate::domain::Aggregate;
use crate::events::codec;
use crate::events::jetstream_store::{JetStreamConfig, JetStreamStore};
use crate::http::error::ApiError;
use crate::http::rewards::CLAIMED_BY_HEADER;
use crate::http::{AppState, CellContext, ServeError};
use crate::ids::Id;
use crate::metrics::Metrics;
use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{Extensions, Server, ServerHandle, ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::middleware::Next;
use actix_web::{web, HttpResponse};
use dashmap::DashMap;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Carried by a request one node forwarded to another: the partition the sender meant. The
/// receiver serves it only if it holds that partition (never forwards it again).
pub const PARTITION_HEADER: &str = "x-hongbao-partition";
/// On every answer a partition's cell gave: `node/partition/epoch` (`n2/p007/12`).
pub const SERVED_BY_HEADER: &str = "x-hongbao-served-by";
/// How long a client is asked to wait while a partition changes hands (`Retry-After: 1`).
const RETRY_AFTER_MS: u64 = 1_000;
/// Longest wait, when a partition is opened, for its views to catch up with its log.
const VIEW_CATCH_UP_MAX: Duration = Duration::from_secs(30);
/// Longest wait for the holder's answer to a forwarded request.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a stopping node tries to leave cleanly (close its partitions, release its leases).
const LEAVE_MAX: Duration = Duration::from_secs(30);
/// How often a node reads the fleet's singletons (switches, withdrawal policy) from their
/// home partitions: a change made through another node is in force here within about this.
const SINGLETONS_POLL: Duration = Duration::from_millis(250);

/// Where a request is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// By the node itself (health, metrics, the cluster view, an unknown path).
    Node,
    /// By the holder of this entity's partition.
    Entity(String),
    /// By the holder of the partition of the entity `prefix:<id>` whose id is the JSON body's
    /// string `field` (a creation whose id is not in the path).
    BodyField {
        prefix: &'static str,
        field: &'static str,
    },
    /// By every partition's holder, each for its own entities, the pages merged into one
    /// (a list over the whole fleet, such as the parked withdrawals). A request marked with
    /// a partition (`x-hongbao-partition`) is that partition's part.
    EveryPartition(crate::http::paging::Merge),
    /// By the holder of the partition of a coupon request's intake shard (the deployment's
    /// shard count, which every node agrees on, and the seq_no): the path's seq_no, or the
    /// JSON body's `seq_no` when `None`.
    CouponIntake(Option<String>),
    /// By the holder of the partition of a reward's intake shard (`activity:cny@3`, from the
    /// JSON body's `activity_id` and `order_id` and the deployment's shard count), or of its
    /// activity when the deployment has one intake shard.
    RewardIntake,
    /// `GET /v1/rewards/{order_id}`: by the holder of the partition of the reward's intake
    /// shard when the query names the activity; else first by that of the order id's
    /// registry shard, which knows the activity (see `reward_status`).
    RewardStatus(String),
    /// Not by a cluster node yet.
    NotInCluster,
}

/// The home entity of a request (by its path): what decides which partition serves it.
pub fn place(path: &str) -> Place {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    match segments.as_slice() {
        ["v1", "wallets", uid] | ["v1", "wallets", uid, "ledger"] => {
            Place::Entity(format!("wallet:{uid}"))
        }
        ["v1", "wallets", uid, "change", "deposits"] => Place::Entity(format!("wallet:{uid}")),
        ["v1", "rewards"] => Place::RewardIntake,
        ["v1", "rewards", order_id] => Place::RewardStatus((*order_id).to_owned()),
        ["v1", "activities", id, ..] | ["v1", "admin", "activities", id] => {
            Place::Entity(format!("activity:{id}"))
        }
        ["v1", "admin", "activities", id, "budget"] => Place::Entity(format!("activity:{id}")),
        ["v1", "wallets", uid, "force-credit" | "rewards"] => {
            Place::Entity(format!("wallet:{uid}"))
        }
        ["v1", "packets"] => Place::BodyField {
            prefix: "packet",
            field: "packet_id",
        },
        ["v1", "packets", id] | ["v1", "packets", id, "pay" | "claims"] => {
            Place::Entity(format!("packet:{id}"))
        }
        ["v1", "wallets", uid, "payout-methods"] => Place::Entity(format!("payee:{uid}")),
        ["v1", "wallets", _, "withdrawals"] => Place::BodyField {
            prefix: "withdrawal",
            field: "order_id",
        },
        ["v1", "withdrawals", id] => Place::Entity(format!("withdrawal:{id}")),
        ["v1", "admin", "withdrawals", "parked"] => {
            Place::EveryPartition(crate::http::withdrawals::PARKED_MERGE)
        }
        ["v1", "coupon-batches"] => Place::BodyField {
            prefix: "coupon-batch",
            field: "batch_id",
        },
        ["v1", "coupon-batches", id] => Place::Entity(format!("coupon-batch:{id}")),
        ["v1", "coupons", "issue"] => Place::CouponIntake(None),
        ["v1", "coupons", "requests", seq_no] => Place::CouponIntake(Some((*seq_no).to_owned())),
        // Written by the batches' partitions: gathered from every one.
        ["v1", "wallets", _, "coupons"] => {
            Place::EveryPartition(crate::http::coupons::WALLET_COUPONS_MERGE)
        }
        ["v1", "admin", "cluster"] => Place::Node,
        ["v1", "admin", "switches"] | ["v1", "admin", "switches", _] => {
            Place::Entity(format!("{}:{}", Switches::STREAM_PREFIX, board::STREAM_ID))
        }
        // The policy's home; the channels' books are the fleet's (key-value buckets every
        // cell shares), so any cell serves them: the singletons' home is one every node names.
        ["v1", "admin", "withdrawal-policy"]
        | ["v1", "admin", "channels", _]
        | ["v1", "admin", "channels", _, "statement"] => Place::Entity(format!(
            "{}:{}",
            PolicyState::STREAM_PREFIX,
            board::STREAM_ID
        )),
        ["v1", ..] => Place::NotInCluster,
        _ => Place::Node,
    }
}

/// What travels on a partition's request subject.
#[derive(Debug, Serialize, Deserialize)]
enum Routed {
    /// An HTTP request for one of its entities; answered with an [`HttpAnswer`].
    Http(HttpCall),
    /// A command (or state read) for one of its entities from a flow or handler of another
    /// partition; answered with a [`RemoteAnswer`].
    Registry(RemoteCall),
}

/// A request forwarded to a partition's holder.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct HttpCall {
    method: String,
    /// Path and query.
    path: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

/// The holder's answer.
#[derive(Debug, Serialize, Deserialize)]
struct HttpAnswer {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

/// One held partition.
struct Cell {
    state: web::Data<AppState>,
    epoch: u64,
    serving: tokio::sync::Mutex<Option<Serving>>,
}

/// The node's own series (in the node's registry, beside the cells' shared ones).
struct ClusterMetrics {
    /// 1 for each partition this node serves (series removed when it stops serving it).
    served: prometheus::IntGaugeVec,
    /// The epoch of this node's lease on each partition it serves.
    epoch: prometheus::IntGaugeVec,
    /// Each served partition's durable log head.
    head: prometheus::IntGaugeVec,
    /// Records of each served partition not yet in its wallet view.
    view_lag: prometheus::IntGaugeVec,
    /// Live nodes as this node last read them.
    nodes: prometheus::IntGauge,
    /// Requests forwarded to another node, by outcome.
    forwarded: prometheus::IntCounterVec,
    /// Commands and state reads this node's cells sent to another partition's holder.
    commands: prometheus::IntCounterVec,
}

/// The outcomes `hongbao_cluster_forwarded_total` counts, each exposed from the start.
const FORWARD_OUTCOMES: [&str; 4] = ["answered", "no_owner", "unreachable", "bad_answer"];
/// The outcomes `hongbao_cluster_commands_sent_total` counts (`local`: another partition this
/// node serves, answered without NATS).
const COMMAND_OUTCOMES: [&str; 4] = ["local", "answered", "no_owner", "unreachable"];

impl ClusterMetrics {
    fn register(registry: &prometheus::Registry) -> Result<ClusterMetrics, prometheus::Error> {
        use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts};
        let by_partition =
            |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["partition"]);
        let metrics = ClusterMetrics {
            served: by_partition(
                "hongbao_partition_served",
                "1 for each partition this node serves (holds the lease, log open)",
            )?,
            epoch: by_partition(
                "hongbao_partition_epoch",
                "Epoch of this node's lease on each partition it serves",
            )?,
            head: by_partition(
                "hongbao_partition_log_head_seq",
                "Durable head of each partition log this node serves",
            )?,
            view_lag: by_partition(
                "hongbao_partition_view_lag_records",
                "Records of each served partition not yet applied to its wallet view",
            )?,
            nodes: IntGauge::new("hongbao_cluster_nodes_live", "Live nodes as last read")?,
            forwarded: IntCounterVec::new(
                Opts::new(
                    "hongbao_cluster_forwarded_total",
                    "Requests forwarded to the holder of their partition, by outcome",
                ),
                &["outcome"],
            )?,
            commands: IntCounterVec::new(
                Opts::new(
                    "hongbao_cluster_commands_sent_total",
                    "Commands and state reads sent to the holder of another partition (a flow \
                     or handler reaching an entity it does not serve), by outcome",
                ),
                &["outcome"],
            )?,
        };
        registry.register(Box::new(metrics.served.clone()))?;
        registry.register(Box::new(metrics.epoch.clone()))?;
        registry.register(Box::new(metrics.head.clone()))?;
        registry.register(Box::new(metrics.view_lag.clone()))?;
        registry.register(Box::new(metrics.nodes.clone()))?;
        registry.register(Box::new(metrics.forwarded.clone()))?;
        registry.register(Box::new(metrics.commands.clone()))?;
        for outcome in FORWARD_OUTCOMES {
            metrics.forwarded.with_label_values(&[outcome]);
        }
        for outcome in COMMAND_OUTCOMES {
            metrics.commands.with_label_values(&[outcome]);
        }
        Ok(metrics)
    }

    /// Sets the per-partition series from the cells served now (before each scrape).
    fn refresh(&self, shared: &NodeShared) {
        for family in [&self.served, &self.epoch, &self.head, &self.view_lag] {
            family.reset();
        }
        for cell in shared.cells.iter() {
            let key = cell.key().key();
            let head = cell.state.store.head();
            self.served.with_label_values(&[&key]).set(1);
            self.epoch
                .with_label_values(&[&key])
                .set(i64::try_from(cell.epoch).unwrap_or(i64::MAX));
            self.head
                .with_label_values(&[&key])
                .set(i64::try_from(head).unwrap_or(i64::MAX));
            self.view_lag
                .with_label_values(&[&key])
                .set(i64::try_from(cell.view_lag()).unwrap_or(i64::MAX));
        }
        if let Some(view) = shared.view.borrow().as_ref() {
            self.nodes
                .set(i64::try_from(view.nodes.len()).unwrap_or(i64::MAX));
        }
    }
}

impl Cell {
    /// Records durable in the partition's log but not yet in its wallet view.
    fn view_lag(&self) -> u64 {
        let applied = self
            .state
            .projections
            .checkpoint(crate::projections::wallet::NAME);
        self.state.store.head().saturating_sub(applied)
    }
}

/// What the HTTP workers, the keeper's host and the router's handlers share.
pub struct NodeShared {
    cluster_metrics: ClusterMetrics,
    settings: Settings,
    config: Config,
    keys: Keys,
    clock: Arc<dyn Clock>,
    router: Router,
    cells: DashMap<Partition, Arc<Cell>>,
    /// One lock per partition, held through each open and each close: a partition is never
    /// opened again while its previous cell is still stopping (they share its directory).
    transitions: DashMap<Partition, Arc<tokio::sync::Mutex<()>>>,
    /// The actix arbiter the cells' actors and flows run on.
    arbiter: actix_rt::ArbiterHandle,
    /// The cluster runtime (keeper, router, NATS client).
    cluster: tokio::runtime::Handle,
    /// This node's HTTP port: a forwarded request is served through it.
    port: AtomicU16,
    loopback: Loopback,
    view: tokio::sync::watch::Receiver<Option<Arc<ClusterView>>>,
    /// The fleet's switches and withdrawal policy as this node last read them, shared by its
    /// cells' boards.
    switches: Arc<Current<Switches>>,
    policy: Arc<Current<PolicyState>>,
    /// The deployment's buckets, to find a partition's holder between two planning rounds.
    buckets: super::membership::Buckets,
    /// The fleet's rate limits, which every cell's lanes spend.
    limits: Arc<super::limits::FleetLimits>,
    /// The payment channels (their books in the fleet's buckets), shared by every cell.
    channels: Arc<crate::channels::SimulatedChannels>,
}

/// The cluster runtime while a node starts: a start that fails on the way (returning its error
/// from within the actix system) shuts it down in the background; dropping a runtime there
/// panics and hid the error.
struct RuntimeGuard(Option<tokio::runtime::Runtime>);

impl RuntimeGuard {
    fn into_inner(mut self) -> Option<tokio::runtime::Runtime> {
        self.0.take()
    }
}

impl std::ops::Deref for RuntimeGuard {
    type Target = tokio::runtime::Runtime;
    fn deref(&self) -> &tokio::runtime::Runtime {
        self.0
            .as_ref()
            .expect("the runtime until the node is built")
    }
}

impl Drop for RuntimeGuard {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// A running cluster node.
pub struct Node {
    shared: Arc<NodeShared>,
    keeper: Option<Keeper>,
    server: Server,
    port: u16,
    runtime: Option<tokio::runtime::Runtime>,
    _arbiter: actix_rt::Arbiter,
}

/// Why a node cannot start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error(transparent)]
    Cluster(#[from] super::membership::ClusterError),
    #[error(
        "cluster nodes must share their API keys: set HONGBAO_ADMIN_KEY, HONGBAO_ISSUER_KEY, \
         HONGBAO_GATEWAY_KEY and HONGBAO_TOKEN_SECRET (or the [auth] section) to the same \
         values on every node"
    )]
    KeysNotShared,
    #[error("cluster mode needs a JetStream store (--store nats://...)")]
    NotJetStream,
    #[error("{0}")]
    Other(String),
}

impl Node {
    /// Joins the deployment (refused if it disagrees on P or the lease TTL), binds the HTTP
    /// listener and starts holding partitions. Must run inside an actix system.
    pub async fn start(
        config: Config,
        settings: Settings,
        clock: Arc<dyn Clock>,
    ) -> Result<Node, NodeError> {
        config.validate().map_err(ServeError::from)?;
        let durability = config
            .store
            .jetstream()
            .map_err(|e| NodeError::Other(e.to_string()))?
            .ok_or(NodeError::NotJetStream)?;
        // Keys must not be generated per node: a key valid on one node would be refused by
        // the holder a request is forwarded to.
        let (keys, generated) =
            Keys::resolve(&config.auth, &config.data_dir, |v| std::env::var(v).ok())
                .map_err(ServeError::from)?;
        if let Some(path) = generated {
            let _ = std::fs::remove_file(path);
            return Err(NodeError::KeysNotShared);
        }
        let metrics = Arc::new(Metrics::new());
        let runtime = RuntimeGuard(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("hongbao-cluster")
                .enable_all()
                .build()
                .map_err(|e| NodeError::Other(format!("cannot start the cluster runtime: {e}")))?,
        ));
        let url = config.store.url.clone();
        let replicas = durability.replicas;
        let mut settings = settings;
        settings.coupon_intake_shards = Some(config.coupons.intake_shards.max(1));
        settings.reward_intake_shards = Some(config.rewards.intake_shards.max(1));
        settings.replicas = replicas;
        let joined = {
            let settings = settings.clone();
            let (clock, registry) = (clock.clone(), metrics.registry.clone());
            let clock_for_channels = clock.clone();
            runtime
                .spawn(async move {
                    let (client, _) = crate::events::jetstream::connect(&url)
                        .await
                        .map_err(|e| NodeError::Other(e.to_string()))?;
                    let js = async_nats::jetstream::new(client.clone());
                    let buckets = check_deployment(&js, &settings).await?;
                    let limits = super::limits::FleetLimits::open(
                        &js,
                        &settings.limits_bucket(),
                        settings.replicas,
                        clock,
                        tokio::runtime::Handle::current(),
                        &registry,
                    )
                    .await
                    .map_err(NodeError::Other)?;
                    let channels = crate::channels::SimulatedChannels::open_shared(
                        &js,
                        &settings.namespace,
                        Some(settings.replicas),
                        clock_for_channels,
                        tokio::runtime::Handle::current(),
                    )
                    .await
                    .map_err(|e| {
                        NodeError::Other(format!("cannot open the channels' books: {e}"))
                    })?;
                    Ok::<_, NodeError>((client, buckets, limits, channels))
                })
                .await
                .map_err(|e| NodeError::Other(e.to_string()))??
        };
        let (client, buckets, limits, channels) = joined;
        let arbiter = actix_rt::Arbiter::new();
        let (view_tx, view) = tokio::sync::watch::channel(None);
        let cluster_metrics = ClusterMetrics::register(&metrics.registry)
            .map_err(|e| NodeError::Other(format!("cannot register the cluster metrics: {e}")))?;
        let shared = Arc::new(NodeShared {
            cluster_metrics,
            settings: settings.clone(),
            config: config.clone(),
            keys: keys.clone(),
            clock,
            router: Router::new(client, FORWARD_TIMEOUT),
            cells: DashMap::new(),
            transitions: DashMap::new(),
            arbiter: arbiter.handle(),
            cluster: runtime.handle().clone(),
            port: AtomicU16::new(0),
            loopback: Loopback::default(),
            view,
            switches: Current::unloaded(),
            policy: Current::unloaded(),
            buckets: buckets.clone(),
            limits: Arc::new(limits),
            channels,
        });
        let app_shared = web::Data::from(shared.clone());
        let app_metrics = web::Data::from(metrics);
        let app_keys = web::Data::new(keys);
        let (server, port) =
            crate::http::serve_http(&config, true, move |cfg: &mut web::ServiceConfig| {
                cfg.app_data(app_shared.clone())
                    .app_data(app_metrics.clone())
                    .app_data(app_keys.clone());
                routes(cfg);
            })?;
        shared.port.store(port, Ordering::Release);
        let host: Arc<dyn PartitionHost> = Arc::new(Host(shared.clone()));
        let keeper = runtime
            .spawn(Keeper::start(settings, buckets, host))
            .await
            .map_err(|e| NodeError::Other(e.to_string()))??;
        // The fleet's singletons, read from their home partitions for as long as the node runs.
        let poller = Arc::downgrade(&shared);
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(SINGLETONS_POLL).await;
                let Some(shared) = poller.upgrade() else {
                    return;
                };
                shared.read_singleton::<Switches>(&shared.switches).await;
                shared.read_singleton::<PolicyState>(&shared.policy).await;
            }
        });
        // The keeper's view, mirrored for the HTTP workers.
        let mut keeper_view = keeper.view();
        runtime.spawn(async move {
            loop {
                let current = keeper_view.borrow_and_update().clone();
                if view_tx.send(current).is_err() || keeper_view.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Node {
            shared,
            keeper: Some(keeper),
            server,
            port,
            runtime: runtime.into_inner(),
            _arbiter: arbiter,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until SIGINT/SIGTERM or the handle stops it, then leaves the cluster: stops
    /// accepting, finishes in-flight requests, closes every partition (drained, flushed) and
    /// releases its leases so that the others take over at once.
    pub async fn run_until_stopped(self) -> Result<(), NodeError> {
        let Node {
            shared: _shared,
            keeper,
            server,
            runtime,
            ..
        } = self;
        let handle = server.handle();
        let signals = actix_web::rt::spawn(async move {
            crate::http::wait_for_signal().await;
            tracing::info!("signal received; finishing in-flight requests, then leaving");
            handle.stop(true).await;
        });
        let served = server.await;
        signals.abort();
        if let (Some(keeper), Some(runtime)) = (keeper, runtime.as_ref()) {
            // Bounded: with the servers unreachable a clean leave never ends. Going without it
            // is a crash as far as the fleet can tell (the leases expire), and loses nothing
            // acknowledged (acknowledged means durable).
            match tokio::time::timeout(LEAVE_MAX, runtime.spawn(keeper.leave())).await {
                Ok(_) => {}
                Err(_) => tracing::error!(
                    after_s = LEAVE_MAX.as_secs(),
                    "could not leave the cluster cleanly (JetStream unreachable?); exiting, the leases expire by themselves"
                ),
            }
        }
        if let Some(runtime) = runtime {
            runtime.shutdown_background();
        }
        served.map_err(|e| NodeError::Serve(ServeError::Server(e)))
    }
}

/// Opens and closes cells as the keeper takes and gives up leases.
struct Host(Arc<NodeShared>);

impl NodeShared {
    /// Reads the singleton `A` (`switches:global`) from its home partition's holder and
    /// publishes it to the cells if it is newer than what they have. A failure (a hand-over)
    /// keeps the last state; the next poll tries again.
    async fn read_singleton<A: Aggregate + Sync>(&self, current: &Current<A>) {
        let stream = format!("{}:{}", A::STREAM_PREFIX, board::STREAM_ID);
        let call = RemoteCall {
            prefix: A::STREAM_PREFIX.to_owned(),
            id: board::STREAM_ID.to_owned(),
            op: RemoteOp::State,
        };
        // Not counted as a command: every node reads these four times a second.
        let sent = self
            .send_registry_call(self.settings.partitions.of(&stream), call, false)
            .await;
        match typed_answer::<(A, u64), A::Error>(&stream, sent) {
            Ok((state, version)) => {
                if current.offer(state, version) {
                    tracing::info!(stream, version, "fleet singleton changed");
                }
            }
            Err(e) => tracing::debug!(stream, error = %e, "fleet singleton not read"),
        }
    }

    /// Sends a registry call to `partition`'s holder: the one of the lease epoch this node last
    /// read or, if that is unknown or gone, the one the lease bucket names now (a node's first
    /// opens wait for the fleet's singletons before its keeper's round is over). `counted`:
    /// in `hongbao_cluster_commands_sent_total`.
    async fn send_registry_call(
        &self,
        partition: Partition,
        call: RemoteCall,
        counted: bool,
    ) -> Result<RemoteAnswer, String> {
        let encoded = codec::encode(&Routed::Registry(call)).map_err(|e| e.to_string())?;
        let router = self.router.clone();
        let first = self.holder_epoch(partition);
        let buckets = self.buckets.clone();
        // On the cluster runtime, where the NATS client lives.
        let sent = self
            .cluster
            .spawn(async move {
                let sent = match first {
                    Some(epoch) => router.request(partition, epoch, encoded.clone()).await,
                    None => Err(RouteError::NoOwner(partition)),
                };
                if !matches!(sent, Err(RouteError::NoOwner(_))) {
                    return sent;
                }
                match buckets.holder_epoch(partition).await {
                    Some(epoch) if Some(epoch) != first => {
                        router.request(partition, epoch, encoded).await
                    }
                    _ => sent,
                }
            })
            .await
            .map_err(|e| e.to_string())?;
        let outcome = match &sent {
            Ok(_) => "answered",
            Err(RouteError::NoOwner(_)) => "no_owner",
            Err(_) => "unreachable",
        };
        if counted {
            self.cluster_metrics
                .commands
                .with_label_values(&[outcome])
                .inc();
        }
        let bytes = sent.map_err(|e| e.to_string())?;
        codec::decode::<RemoteAnswer>(&bytes)
            .map_err(|e| format!("{partition}'s holder answered something unreadable: {e}"))
    }

    /// The epoch of `partition`'s holder as this node last read the leases (every TTL/8).
    fn holder_epoch(&self, partition: Partition) -> Option<u64> {
        self.view.borrow().as_ref().and_then(|view| {
            view.leases
                .get(usize::from(partition.0))
                .and_then(|lease| lease.epoch)
        })
    }

    fn transition(&self, partition: Partition) -> Arc<tokio::sync::Mutex<()>> {
        self.transitions.entry(partition).or_default().clone()
    }
}

impl PartitionHost for Host {
    fn open(&self, partition: Partition, lease: Lease) -> BoxFuture<'static, Result<(), String>> {
        let shared = self.0.clone();
        Box::pin(async move {
            let _transition = shared.transition(partition).lock_owned().await;
            // The keeper opens a partition only once its close has ended; should a cell be
            // there all the same, it is stopped, never left running beside the new one.
            if let Some((_, stale)) = shared.cells.remove(&partition) {
                tracing::error!(%partition, "a partition opened while its cell still ran; that cell is stopped first");
                if let Some(serving) = stale.serving.lock().await.take() {
                    serving.stop().await;
                }
                stop_cell(&shared, stale).await;
            }
            let started = std::time::Instant::now();
            let cell = open_cell(&shared, partition, lease).await?;
            shared.cells.insert(partition, cell.clone());
            let handler = forwarded_handler(shared.clone(), partition);
            match shared.router.serve(partition, cell.epoch, handler).await {
                Ok(serving) => *cell.serving.lock().await = Some(serving),
                Err(e) => {
                    shared.cells.remove(&partition);
                    stop_cell(&shared, cell).await;
                    return Err(e.to_string());
                }
            }
            tracing::info!(
                partition = %partition,
                epoch = cell.epoch,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "serving partition"
            );
            Ok(())
        })
    }

    fn close(&self, partition: Partition, why: Close) -> BoxFuture<'static, ()> {
        let shared = self.0.clone();
        // A task of its own: the close runs to its end even if the caller stops waiting.
        let closing = self.0.cluster.spawn(async move {
            let _transition = shared.transition(partition).lock_owned().await;
            let Some((_, cell)) = shared.cells.remove(&partition) else {
                return;
            };
            let started = std::time::Instant::now();
            if let Some(serving) = cell.serving.lock().await.take() {
                serving.stop().await;
            }
            let answered_ms = started.elapsed().as_millis() as u64;
            stop_cell(&shared, cell).await;
            tracing::info!(
                partition = %partition,
                why = ?why,
                answered_ms,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "partition closed"
            );
        });
        Box::pin(async move {
            let _ = closing.await;
        })
    }
}

/// How `partition`'s log is opened from `config` (its JetStream servers and durability), with
/// its local state under `<data_dir>/partitions/p007`: by a node serving it, and by the
/// offline tools reading it.
pub fn partition_log(
    config: &Config,
    partition: Partition,
) -> Result<(JetStreamConfig, std::path::PathBuf), NodeError> {
    let dir = config.data_dir.join("partitions").join(partition.key());
    let mut js = JetStreamConfig::new(&config.store.url, &partition.stream_name(), dir.clone());
    js.subject_prefix = partition.subject_prefix();
    js.durability = config
        .store
        .jetstream()
        .map_err(|e| NodeError::Other(e.to_string()))?
        .ok_or(NodeError::NotJetStream)?;
    js.create_stream = false;
    Ok((js, dir))
}

/// The partition's log (guarded by the lease) with the single node's state over it.
async fn open_cell(
    shared: &Arc<NodeShared>,
    partition: Partition,
    lease: Lease,
) -> Result<Arc<Cell>, String> {
    let (mut js, dir) = partition_log(&shared.config, partition).map_err(|e| e.to_string())?;
    js.create_stream = true;
    js.write_guard = Some(lease.write_guard());
    // The partition's own series (labelled with it), exposed by the node beside the others'.
    let cell_metrics = Arc::new(Metrics::for_partition(&partition.key()));
    let (clock, metrics) = (shared.clock.clone(), cell_metrics.clone());
    let log = tokio::task::spawn_blocking(move || JetStreamStore::open(js, clock, metrics))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot open {partition}'s log: {e}"))?;
    let mut config = shared.config.clone();
    config.data_dir = dir;
    let (keys, clock, metrics) = (shared.keys.clone(), shared.clock.clone(), cell_metrics);
    let cell = CellContext {
        placement: Arc::new(CellPlacement {
            partition,
            partitions: shared.settings.partitions,
            shared: Arc::downgrade(shared),
        }),
        switches: shared.switches.clone(),
        policy: shared.policy.clone(),
        pacing: shared.limits.clone(),
        channels: shared.channels.clone(),
    };
    let built = on_arbiter(shared, move || async move {
        AppState::build(config, keys, log, clock, metrics, Some(cell))
            .await
            .map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))
    })
    .await;
    let state = web::Data::new(built.ok_or("the cells' arbiter stopped")??);
    let cell = Arc::new(Cell {
        state,
        epoch: lease.epoch(),
        serving: tokio::sync::Mutex::new(None),
    });
    if let Err(e) = singletons_in_force(shared, partition, &cell.state).await {
        stop_cell(shared, cell).await;
        return Err(e);
    }
    let state = &cell.state;
    // Served only once its views have caught up with the log as it was found: a partition
    // that moved here answers from views as fresh as its last holder's, not from an old
    // checkpoint (a partition new to this node replays its whole log first).
    let head = state.store.head();
    if !state.projections.wait_all(head, VIEW_CATCH_UP_MAX).await {
        tracing::warn!(
            partition = %partition,
            head,
            "views still catching up; serving (reads wait up to read_wait_ms each)"
        );
    }
    Ok(cell)
}

/// Makes sure a cell starts under the fleet's switches and withdrawal policy, never under
/// defaults the fleet has changed: the home partition of a singleton reads it from its own log;
/// any other waits until the node has read it from its home (a hand-over of the home delays
/// the open, and the keeper tries again).
async fn singletons_in_force(
    shared: &Arc<NodeShared>,
    partition: Partition,
    state: &web::Data<AppState>,
) -> Result<(), String> {
    // Both live in the same home partition (`Partitions::of`), which reads them from its own
    // log and waits for nothing.
    let home = shared
        .settings
        .partitions
        .of(super::partition::FLEET_SINGLETONS[0]);
    if home == partition {
        refresh_on_arbiter(shared, state.clone(), false).await?;
        refresh_on_arbiter(shared, state.clone(), true).await?;
    }
    let started = std::time::Instant::now();
    while !(shared.switches.loaded() && shared.policy.loaded()) {
        if started.elapsed() > VIEW_CATCH_UP_MAX {
            return Err(format!(
                "the fleet's switches and withdrawal policy were not readable within \
                 {VIEW_CATCH_UP_MAX:?} (their home partition {home} is not served)"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Refreshes a board of a cell's state on the cells' arbiter (where its actors live).
async fn refresh_on_arbiter(
    shared: &Arc<NodeShared>,
    state: web::Data<AppState>,
    policy: bool,
) -> Result<(), String> {
    on_arbiter(shared, move || async move {
        if policy {
            state.policy.refresh().await.map_err(|e| e.to_string())
        } else {
            state.switches.refresh().await.map_err(|e| e.to_string())
        }
    })
    .await
    .unwrap_or_else(|| Err("the cells' arbiter stopped".into()))
}

/// Runs `work` on the cells' arbiter (actors start on the arbiter they are created from: the
/// cells' all run on the node's) and returns its outcome; `None` if the arbiter has stopped.
async fn on_arbiter<T, F>(
    shared: &NodeShared,
    work: impl FnOnce() -> F + Send + 'static,
) -> Option<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = T> + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    shared.arbiter.spawn_fn(move || {
        actix_rt::spawn(async move {
            let _ = tx.send(work().await);
        });
    });
    rx.await.ok()
}

/// Stops a cell's flows and views and closes its log (on the arbiter its actors run on).
async fn stop_cell(shared: &Arc<NodeShared>, cell: Arc<Cell>) {
    let state = cell.state.clone();
    match on_arbiter(shared, move || async move { state.stop().await }).await {
        Some(Ok(())) => {}
        Some(Err(e)) => tracing::warn!(error = %e, "a partition's log did not close cleanly"),
        None => tracing::warn!("the cells' arbiter stopped before a partition closed"),
    }
}

/// Answers what is sent to `partition`'s subject: HTTP requests run through this node's own
/// HTTP stack, registry calls on the cell's registries (on the cells' arbiter).
fn forwarded_handler(shared: Arc<NodeShared>, partition: Partition) -> Handler {
    Arc::new(move |request: Vec<u8>| {
        let shared = shared.clone();
        Box::pin(async move {
            match codec::decode::<Routed>(&request) {
                Ok(Routed::Http(call)) => {
                    let answer = shared
                        .loopback
                        .send(shared.port.load(Ordering::Acquire), partition, call)
                        .await
                        .unwrap_or_else(|e| {
                            error_answer(StatusCode::SERVICE_UNAVAILABLE, "forward_failed", &e)
                        });
                    codec::encode(&answer).unwrap_or_default()
                }
                Ok(Routed::Registry(call)) => {
                    let answer = serve_registry_call(&shared, partition, call).await;
                    codec::encode(&answer).unwrap_or_default()
                }
                Err(e) => codec::encode(&error_answer(
                    StatusCode::BAD_REQUEST,
                    "malformed_forward",
                    &format!("not a routed request: {e}"),
                ))
                .unwrap_or_default(),
            }
        })
    })
}

/// Runs a registry call on `partition`'s cell, if this node still serves it.
async fn serve_registry_call(
    shared: &Arc<NodeShared>,
    partition: Partition,
    call: RemoteCall,
) -> RemoteAnswer {
    let stream = format!("{}:{}", call.prefix, call.id);
    if shared.settings.partitions.of(&stream) != partition {
        // Never run here: it would write the entity into another partition's log.
        return Err(format!("{stream} is not an entity of {partition}"));
    }
    let Some(cell) = shared.cells.get(&partition).map(|c| c.clone()) else {
        return Err(format!("{partition} is changing hands; retry"));
    };
    on_arbiter(shared, move || {
        cell.state.wallets.runtime().registries.serve(call)
    })
    .await
    .unwrap_or_else(|| Err("the cells' arbiter stopped".into()))
}

/// Where a cell's runtime finds the streams of other partitions: on their holders, through the
/// router, addressed by the epoch of the holder's lease as this node last read it.
struct CellPlacement {
    partition: Partition,
    /// The deployment's map (fixed): whether a stream is this cell's never depends on the node
    /// still running.
    partitions: super::partition::Partitions,
    shared: std::sync::Weak<NodeShared>,
}

impl Placement for CellPlacement {
    fn is_local(&self, stream: &str) -> bool {
        self.partitions.of(stream) == self.partition
    }

    fn call(
        &self,
        stream: &str,
        call: RemoteCall,
    ) -> BoxFuture<'static, Result<RemoteAnswer, String>> {
        let shared = self.shared.upgrade();
        let stream = stream.to_owned();
        Box::pin(async move {
            let shared = shared.ok_or("the node is stopping")?;
            let partition = shared.settings.partitions.of(&stream);
            // A partition this node serves too: its cell answers here, without NATS.
            if shared.cells.contains_key(&partition) {
                shared
                    .cluster_metrics
                    .commands
                    .with_label_values(&["local"])
                    .inc();
                return Ok(serve_registry_call(&shared, partition, call).await);
            }
            shared.send_registry_call(partition, call, true).await
        })
    }
}

fn error_answer(status: StatusCode, code: &str, message: &str) -> HttpAnswer {
    HttpAnswer {
        status: status.as_u16(),
        headers: vec![("content-type".into(), b"application/json".to_vec())],
        body: serde_json::to_vec(&serde_json::json!({"code": code, "message": message}))
            .unwrap_or_default(),
    }
}

/// Keep-alive HTTP/1.1 connections to this node's own listener, for forwarded requests.
#[derive(Default)]
struct Loopback {
    idle: std::sync::Mutex<Vec<LoopbackSender>>,
}

type LoopbackSender =
    hyper::client::conn::http1::SendRequest<http_body_util::Full<hyper::body::Bytes>>;

/// Idle loopback connections kept (one per request in flight at most, beyond it they close).
const LOOPBACK_IDLE_MAX: usize = 64;

impl Loopback {
    /// An idle connection that is still open, or a new one.
    async fn connection(&self, port: u16) -> Result<LoopbackSender, String> {
        loop {
            let idle = self
                .idle
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .pop();
            match idle {
                Some(mut sender) => {
                    if sender.ready().await.is_ok() {
                        return Ok(sender);
                    }
                }
                None => break,
            }
        }
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("cannot reach this node's listener: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        Ok(sender)
    }

    /// Sends `call` to this node's own listener, marked with the partition it was meant for.
    async fn send(
        &self,
        port: u16,
        partition: Partition,
        call: HttpCall,
    ) -> Result<HttpAnswer, String> {
        use http_body_util::{BodyExt, Full};
        use hyper::body::Bytes;
        let mut sender = self.connection(port).await?;
        let mut request = hyper::Request::builder()
            .method(call.method.as_str())
            .uri(call.path.as_str());
        for (name, value) in &call.headers {
            request = request.header(name.as_str(), value.as_slice());
        }
        let request = request
            .header("host", format!("127.0.0.1:{port}"))
            .header(PARTITION_HEADER, partition.key())
            .body(Full::new(Bytes::from(call.body)))
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let headers = forwardable(
            response
                .headers()
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_bytes())),
        );
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes()
            .to_vec();
        // The whole answer was read: the connection can carry the next request.
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if idle.len() < LOOPBACK_IDLE_MAX {
            idle.push(sender);
        }
        Ok(HttpAnswer {
            status,
            headers,
            body,
        })
    }
}

/// End-to-end headers (RFC 9110 §7.6.1): the hop-by-hop ones and those the next hop sets
/// itself are left out.
fn forwardable<'a>(headers: impl Iterator<Item = (&'a str, &'a [u8])>) -> Vec<(String, Vec<u8>)> {
    const HOP: [&str; 9] = [
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "host",
        "content-length",
        "date",
    ];
    headers
        .filter(|(name, _)| !HOP.contains(name) && *name != PARTITION_HEADER)
        .map(|(name, value)| (name.to_owned(), value.to_vec()))
        .collect()
}

/// A holder's answer as this node gives it; an error answer keeps its code for the metrics
/// (`hongbao_http_errors_total`), as if this node had answered it.
fn answered(answer: HttpAnswer) -> HttpResponse {
    let mut response =
        HttpResponse::build(StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY));
    for (name, value) in answer.headers {
        response.append_header((name, value));
    }
    let code = (answer.status >= 400)
        .then(|| serde_json::from_slice::<serde_json::Value>(&answer.body).ok())
        .flatten()
        .and_then(|json| json.get("code")?.as_str().map(str::to_owned));
    let mut response = response.body(answer.body);
    if let Some(code) = code {
        response
            .extensions_mut()
            .insert(crate::http::error::ErrorCode(code));
    }
    response
}

fn respond(error: ApiError) -> HttpResponse {
    actix_web::ResponseError::error_response(&error)
}

fn moving(partition: Partition, why: &str) -> HttpResponse {
    respond(
        ApiError::unavailable(
            "partition_moving",
            format!("{partition} is changing hands ({why}); retry with the same business id"),
        )
        .with("retry_after_ms", RETRY_AFTER_MS),
    )
}

/// The request as it travels to a partition's holder.
async fn http_call(req: &mut ServiceRequest) -> Result<HttpCall, actix_web::Error> {
    let body = req.extract::<web::Bytes>().await?;
    Ok(HttpCall {
        method: req.method().as_str().to_owned(),
        path: req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| req.path().to_owned()),
        headers: forwardable(
            req.headers()
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_bytes())),
        ),
        body: body.to_vec(),
    })
}

/// Why a partition could not be asked (Send, unlike a response).
enum Unasked {
    Moving(Partition, &'static str),
    Unreachable(Partition, String),
}

impl Unasked {
    fn response(self) -> HttpResponse {
        match self {
            Unasked::Moving(partition, why) => moving(partition, why),
            Unasked::Unreachable(partition, e) => respond(
                ApiError::unavailable("partition_unreachable", format!("{partition}: {e}"))
                    .with("retry_after_ms", RETRY_AFTER_MS),
            ),
        }
    }
}

/// Asks `partition` with `call`, marked with it: on this node through its own listener when
/// it holds the partition, elsewhere through the partition's holder. Runs on the cluster's
/// runtime (the router's client lives there).
async fn ask_partition(
    shared: &Arc<NodeShared>,
    partition: Partition,
    call: HttpCall,
) -> Result<HttpAnswer, Unasked> {
    let answer = if shared.cells.contains_key(&partition) {
        shared
            .loopback
            .send(shared.port.load(Ordering::Acquire), partition, call)
            .await
    } else {
        let Some(epoch) = shared.holder_epoch(partition) else {
            return Err(Unasked::Moving(partition, "no node holds it right now"));
        };
        let mut marked = call;
        marked
            .headers
            .push((PARTITION_HEADER.to_owned(), partition.key().into_bytes()));
        let encoded = codec::encode(&Routed::Http(marked))
            .map_err(|e| Unasked::Unreachable(partition, e.to_string()))?;
        match shared.router.request(partition, epoch, encoded).await {
            Ok(bytes) => codec::decode::<HttpAnswer>(&bytes).map_err(|e| e.to_string()),
            Err(RouteError::NoOwner(_)) => {
                return Err(Unasked::Moving(partition, "no node serves it right now"))
            }
            Err(e) => Err(e.to_string()),
        }
    };
    answer.map_err(|e| Unasked::Unreachable(partition, e))
}

/// `GET /v1/rewards/{order_id}` without `activity_id` on a cluster: the partition of the
/// order id's registry shard names the activity that claimed it, then the partition of the
/// reward's intake shard answers (`http::rewards::cluster_status`). Any other answer of the
/// first step (404 unknown_order, 503) is the answer.
async fn reward_status(
    shared: &Arc<NodeShared>,
    req: &mut ServiceRequest,
    order_id: &Id,
) -> Result<HttpResponse, actix_web::Error> {
    let call = http_call(req).await?;
    let registry = shared.settings.partitions.of(&format!(
        "{}:{}",
        OrderIds::STREAM_PREFIX,
        shard_of(order_id)
    ));
    let (shared, order_id) = (shared.clone(), order_id.clone());
    let asked = shared
        .cluster
        .clone()
        .spawn(async move {
            let claimed = ask_partition(&shared, registry, call.clone()).await?;
            let activity = claimed
                .headers
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(CLAIMED_BY_HEADER))
                .and_then(|(_, value)| Id::parse(std::str::from_utf8(value).ok()?).ok());
            let Some(activity) = activity.filter(|_| claimed.status == 200) else {
                return Ok(claimed);
            };
            let shards = shared.config.rewards.intake_shards;
            let intake = shared.settings.partitions.of(&format!(
                "activity:{}",
                intake_entity(&activity, &order_id, shards)
            ));
            let path = match call.path.split_once('?') {
                Some((path, query)) => format!("{path}?{query}&activity_id={activity}"),
                None => format!("{}?activity_id={activity}", call.path),
            };
            ask_partition(&shared, intake, HttpCall { path, ..call }).await
        })
        .await
        .map_err(actix_web::error::ErrorInternalServerError)?;
    Ok(match asked {
        Ok(answer) => answered(answer),
        Err(unasked) => unasked.response(),
    })
}

/// The entity whose partition takes (and keeps) `order_id`'s reward in `activity`: its intake
/// shard (`cny@3`) when the deployment shards intake, else the activity.
fn intake_entity(activity: &Id, order_id: &Id, shards: u32) -> String {
    if shards > 1 {
        shard_entity(activity, intake_shard_of(order_id, shards))
    } else {
        activity.to_string()
    }
}

/// A list over the whole fleet: the same page asked of every partition (marked with it: on
/// this node through its own listener, elsewhere through the partition's holder), merged.
/// Any part that cannot answer makes the whole answer its error, never a short page that
/// looks whole.
async fn every_partition(
    shared: &Arc<NodeShared>,
    req: &mut ServiceRequest,
    merge: crate::http::paging::Merge,
) -> Result<HttpResponse, actix_web::Error> {
    let raw_limit =
        web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
            .ok()
            .and_then(|q| q.get("limit").cloned());
    let limit = match crate::http::paging::limit(raw_limit.as_deref(), merge.limits) {
        Ok(limit) => limit,
        Err(e) => return Ok(respond(e)),
    };
    let call = http_call(req).await?;
    /// Why a partition gave no page (Send, unlike a response).
    enum Failed {
        Unasked(Unasked),
        Answered(HttpAnswer),
        NotAList(Partition, String),
    }
    let asks = (0..shared.settings.partitions.count()).map(|n| {
        let partition = Partition(n);
        let (shared, call) = (shared.clone(), call.clone());
        async move {
            let answer = ask_partition(&shared, partition, call)
                .await
                .map_err(Failed::Unasked)?;
            if answer.status != 200 {
                return Err(Failed::Answered(answer));
            }
            let more = answer
                .headers
                .iter()
                .any(|(name, _)| name.eq_ignore_ascii_case("link"));
            let items: Vec<serde_json::Value> = serde_json::from_slice(&answer.body)
                .map_err(|e| Failed::NotAList(partition, e.to_string()))?;
            Ok((items, more))
        }
    });
    let asked = shared
        .cluster
        .spawn(futures::future::join_all(asks))
        .await
        .map_err(actix_web::error::ErrorInternalServerError)?;
    let mut parts = Vec::with_capacity(asked.len());
    for part in asked {
        let failed = match part {
            Ok(part) => {
                parts.push(part);
                continue;
            }
            Err(failed) => failed,
        };
        return Ok(match failed {
            Failed::Unasked(unasked) => unasked.response(),
            Failed::Answered(answer) => answered(answer),
            Failed::NotAList(partition, e) => respond(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "bad_forward_answer",
                format!("{partition} answered a page that is not a list: {e}"),
            )),
        });
    }
    let (items, next) = merge.merge(parts, limit);
    Ok(crate::http::paging::respond(
        req.request(),
        &items,
        limit,
        next,
    ))
}

/// The JSON body's string `field` (empty when absent: the request goes where the empty id
/// hashes to, and the handler there refuses it as a single node would); the body stays in the
/// request for the handler.
async fn body_field(req: &mut ServiceRequest, field: &str) -> Result<String, actix_web::Error> {
    let [id] = body_fields(req, [field]).await?;
    Ok(id)
}

/// The JSON body's string `fields` (empty where absent), the body left for the handler.
async fn body_fields<const N: usize>(
    req: &mut ServiceRequest,
    fields: [&str; N],
) -> Result<[String; N], actix_web::Error> {
    let body = req.extract::<web::Bytes>().await?;
    let json = serde_json::from_slice::<serde_json::Value>(&body).ok();
    let values = fields.map(|field| {
        json.as_ref()
            .and_then(|json| json.get(field)?.as_str().map(str::to_owned))
            .unwrap_or_default()
    });
    req.set_payload(actix_web::dev::Payload::from(body));
    Ok(values)
}

/// The partition a request was sent to by the node that asked it (one step of a lookup or of a
/// fleet-wide list), if it says.
fn asked_partition(req: &ServiceRequest) -> Option<Partition> {
    let value = req.headers().get(PARTITION_HEADER)?;
    Partition::from_key(value.to_str().ok()?)
}

/// Sends each request to the cell of its home partition, here or on its holder.
pub(crate) async fn dispatch(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let Some(shared) = req.app_data::<web::Data<NodeShared>>().cloned() else {
        return Ok(next.call(req).await?.map_into_boxed_body());
    };
    let partition = match place(req.path()) {
        Place::Node => return Ok(next.call(req).await?.map_into_boxed_body()),
        Place::NotInCluster => {
            let response: HttpResponse = respond(ApiError::new(
                StatusCode::NOT_IMPLEMENTED,
                "not_in_cluster",
                "this endpoint is not served by a cluster node yet (its work crosses \
                 partitions); a single node serves it",
            ));
            return Ok(req.into_response(response));
        }
        Place::EveryPartition(merge) => {
            let part = asked_partition(&req);
            match part {
                Some(partition) => partition,
                None => {
                    let response = every_partition(&shared, &mut req, merge).await?;
                    return Ok(req.into_response(response));
                }
            }
        }
        Place::Entity(entity) => shared.settings.partitions.of(&entity),
        Place::BodyField { prefix, field } => {
            let id = body_field(&mut req, field).await?;
            shared.settings.partitions.of(&format!("{prefix}:{id}"))
        }
        Place::RewardIntake => {
            let [activity, order_id] = body_fields(&mut req, ["activity_id", "order_id"]).await?;
            let shards = shared.config.rewards.intake_shards;
            // With intake shards, the order id's shard (where its slice intake runs); a bad
            // id goes to the activity's partition, whose handler refuses it.
            let entity = match (Id::parse(&activity), Id::parse(&order_id)) {
                (Ok(activity), Ok(order_id)) => intake_entity(&activity, &order_id, shards),
                _ => activity,
            };
            shared.settings.partitions.of(&format!("activity:{entity}"))
        }
        Place::RewardStatus(order_id) => {
            let asked = asked_partition(&req);
            let activity = web::Query::<std::collections::HashMap<String, String>>::from_query(
                req.query_string(),
            )
            .ok()
            .and_then(|q| q.get("activity_id").cloned());
            match (asked, Id::parse(&order_id), activity.map(|a| Id::parse(&a))) {
                // One step of a lookup a node makes: the partition it asked.
                (Some(partition), _, _) => partition,
                (None, Ok(order_id), Some(Ok(activity))) => {
                    let shards = shared.config.rewards.intake_shards;
                    let entity = intake_entity(&activity, &order_id, shards);
                    shared.settings.partitions.of(&format!("activity:{entity}"))
                }
                (None, Ok(order_id), None) => {
                    let response = reward_status(&shared, &mut req, &order_id).await?;
                    return Ok(req.into_response(response));
                }
                // A bad id: any partition's handler refuses it, as a single node would.
                _ => Partition(0),
            }
        }
        Place::CouponIntake(seq_no) => {
            let seq_no = match seq_no {
                Some(seq_no) => seq_no,
                None => body_field(&mut req, "seq_no").await?,
            };
            // A bad seq_no goes where shard 0 lives: the handler there refuses it.
            let shard = crate::ids::Id::parse(&seq_no)
                .map(|id| intake_shard(&id, shared.config.coupons.intake_shards))
                .unwrap_or(0);
            shared
                .settings
                .partitions
                .of(&format!("{}:{shard}", CouponIntake::STREAM_PREFIX))
        }
    };
    if let Some(cell) = shared.cells.get(&partition).map(|c| c.clone()) {
        let mut data = Extensions::new();
        data.insert(cell.state.clone());
        req.add_data_container(Rc::new(data));
        let mut response = next.call(req).await?.map_into_boxed_body();
        // Which node, partition and lease answered (forwarded back as it is).
        if let Ok(value) = actix_web::http::header::HeaderValue::from_str(&format!(
            "{}/{}/{}",
            shared.settings.node,
            partition.key(),
            cell.epoch
        )) {
            response.headers_mut().insert(
                actix_web::http::header::HeaderName::from_static(SERVED_BY_HEADER),
                value,
            );
        }
        return Ok(response);
    }
    if req.headers().contains_key(PARTITION_HEADER) {
        return Ok(req.into_response(moving(partition, "forwarded here after it left")));
    }
    // The holder as this node last read the leases (every TTL/8): addressed by its epoch, so
    // that a holder paused past its lease, still subscribed, is never asked.
    let Some(epoch) = shared.holder_epoch(partition) else {
        return Ok(req.into_response(moving(partition, "no node holds it right now")));
    };
    let call = http_call(&mut req).await?;
    let encoded =
        codec::encode(&Routed::Http(call)).map_err(actix_web::error::ErrorInternalServerError)?;
    let router = shared.router.clone();
    let sent = shared
        .cluster
        .spawn(async move { router.request(partition, epoch, encoded).await })
        .await
        .map_err(actix_web::error::ErrorInternalServerError)?;
    let (outcome, response) = match sent {
        Ok(bytes) => match codec::decode::<HttpAnswer>(&bytes) {
            Ok(answer) => ("answered", answered(answer)),
            Err(e) => (
                "bad_answer",
                respond(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "bad_forward_answer",
                    format!("the holder of {partition} answered something unreadable: {e}"),
                )),
            ),
        },
        Err(RouteError::NoOwner(_)) => {
            ("no_owner", moving(partition, "no node serves it right now"))
        }
        Err(e) => (
            "unreachable",
            respond(
                ApiError::unavailable(
                    "partition_unreachable",
                    format!("{e}; the outcome is unknown: retry with the same business id"),
                )
                .with("retry_after_ms", RETRY_AFTER_MS),
            ),
        ),
    };
    shared
        .cluster_metrics
        .forwarded
        .with_label_values(&[outcome])
        .inc();
    Ok(req.into_response(response))
}

/// One partition as `GET /v1/admin/cluster` shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PartitionBody {
    /// `p007`.
    pub partition: String,
    /// The lease holder; absent while the partition is free (a hand-over).
    pub node: Option<String>,
    /// The revision at which the holder took the lease: it grows with every hand-over.
    pub epoch: Option<u64>,
    /// For the partitions this node serves: its log's durable head.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head: Option<u64>,
    /// For the partitions this node serves: records durable but not yet in the wallet view.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub view_lag: Option<u64>,
}

/// The cluster as one node last read it (every lease TTL/8).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ClusterBody {
    /// The node that answers.
    pub node: String,
    /// P, fixed for the deployment.
    pub partitions_total: u16,
    pub lease_ttl_ms: u64,
    /// Live nodes, sorted.
    pub nodes: Vec<String>,
    /// The partitions this node holds a valid lease on.
    pub held: Vec<String>,
    /// How many of them it serves now (log open, answering).
    pub serving: usize,
    /// Every partition in order, with its holder and epoch.
    pub partitions: Vec<PartitionBody>,
}

/// The cluster as this node sees it: live nodes, every partition's holder and epoch, and
/// for the partitions this node serves, their log heads and view lag.
#[utoipa::path(
    get,
    path = "/v1/admin/cluster",
    tag = "operations",
    responses(
        (status = 200, description = "Nodes, partitions, holders, epochs; heads and view lag of the partitions this node serves", body = ClusterBody),
        (status = 404, description = "not_clustered: this node serves one log (started without --node-id)", body = crate::http::ErrorBody),
        (status = 503, description = "cluster_joining: the node has not read the cluster yet", body = crate::http::ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn cluster_view(
    caller: crate::http::auth::Caller,
    shared: Option<web::Data<NodeShared>>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[])?;
    let Some(shared) = shared else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_clustered",
            "this node serves one log; start nodes with --node-id to form a cluster",
        ));
    };
    let Some(view) = shared.view.borrow().clone() else {
        return Err(ApiError::unavailable(
            "cluster_joining",
            "this node has not read the cluster yet; retry",
        ));
    };
    let partitions: Vec<PartitionBody> = view
        .leases
        .iter()
        .map(|lease| {
            let served = Partition::from_key(&lease.partition)
                .and_then(|p| shared.cells.get(&p).map(|c| c.clone()));
            let head = served.as_ref().map(|c| c.state.store.head());
            let view_lag = served.as_ref().map(|c| c.view_lag());
            PartitionBody {
                partition: lease.partition.clone(),
                node: lease.node.as_ref().map(|n| n.to_string()),
                epoch: lease.epoch,
                head,
                view_lag,
            }
        })
        .collect();
    Ok(HttpResponse::Ok().json(ClusterBody {
        node: view.node.to_string(),
        partitions_total: view.partitions,
        lease_ttl_ms: view.lease_ttl_ms,
        nodes: view.nodes.iter().map(|n| n.to_string()).collect(),
        held: view.held.clone(),
        serving: shared.cells.len(),
        partitions,
    }))
}

/// Ready once the node has read the cluster and every partition it holds is being served
/// with a healthy log.
/// The node's partitions whose journal is not ready, and whether it has joined the cluster.
fn readiness(shared: &NodeShared) -> (bool, Vec<String>) {
    let joined = shared.view.borrow().is_some();
    let failed: Vec<String> = shared
        .cells
        .iter()
        .filter(|c| c.state.store.condition() != crate::events::JournalCondition::Ready)
        .map(|c| c.key().key())
        .collect();
    (joined, failed)
}

async fn readyz(shared: web::Data<NodeShared>) -> HttpResponse {
    let (joined, failed) = readiness(&shared);
    let view = joined.then_some(());
    let body = serde_json::json!({
        "status": if view.is_none() { "joining" } else if failed.is_empty() { "ready" } else { "partition_failed" },
        "node": shared.settings.node.to_string(),
        "serving": shared.cells.len(),
        "failed_partitions": failed,
    });
    if view.is_some() && failed.is_empty() {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn metrics(metrics: web::Data<Metrics>, shared: web::Data<NodeShared>) -> HttpResponse {
    shared.cluster_metrics.refresh(&shared);
    // `hongbao_ready`, as /readyz would answer (the node's own series, not a partition's).
    let (joined, failed) = readiness(&shared);
    metrics.set_ready(joined && failed.is_empty());
    let cells: Vec<Arc<Cell>> = shared.cells.iter().map(|c| c.value().clone()).collect();
    let parts: Vec<&Metrics> = cells.iter().map(|c| c.state.metrics.as_ref()).collect();
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(metrics.render_with(&parts))
}

/// The status page's figures over every partition this node serves (`/status.json`); the page
/// itself is the single node's.
async fn status_json(shared: web::Data<NodeShared>, metrics: web::Data<Metrics>) -> HttpResponse {
    let (joined, failed) = readiness(&shared);
    let cells: Vec<Arc<Cell>> = shared.cells.iter().map(|c| c.value().clone()).collect();
    let states: Vec<&crate::http::AppState> = cells.iter().map(|c| c.state.get_ref()).collect();
    let status = match (joined, failed.is_empty()) {
        (false, _) => "joining",
        (true, false) => "partition_failed",
        (true, true) => "ready",
    };
    let store = states
        .first()
        .map(|s| format!("{} partitions: {}", states.len(), s.store_guarantee))
        .unwrap_or_else(|| "no partition served yet".into());
    let mut figures = crate::http::status::compose(
        &states,
        metrics.registry.gather(),
        crate::http::status::Readiness {
            ready: joined && failed.is_empty(),
            status,
        },
        store,
    );
    // An activity's budget gauge counts only its own partition's acceptances, not its intake
    // shards': no figure rather than an overstated one (GET /v1/admin/activities/{id} answers
    // the budget over every shard).
    figures.budgets.clear();
    HttpResponse::Ok()
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-store"))
        .json(figures)
}

async fn openapi() -> HttpResponse {
    use utoipa::OpenApi;
    HttpResponse::Ok()
        .content_type("application/json")
        .body(crate::http::ApiDoc::openapi().to_json().unwrap_or_default())
}

fn routes(cfg: &mut web::ServiceConfig) {
    let node: crate::http::Routes = vec![
        ("/v1/admin/cluster", vec![web::get().to(cluster_view)]),
        ("/healthz", vec![web::get().to(crate::http::ops::healthz)]),
        ("/readyz", vec![web::get().to(readyz)]),
        ("/metrics", vec![web::get().to(metrics)]),
        ("/openapi.json", vec![web::get().to(openapi)]),
        (
            "/status",
            vec![web::get().to(crate::http::status::status_page)],
        ),
        ("/status.json", vec![web::get().to(status_json)]),
    ];
    crate::http::register(cfg, node.into_iter().chain(crate::http::api_routes()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use utoipa::OpenApi;

    #[test]
    fn a_wallet_request_belongs_to_the_wallets_partition() {
        assert_eq!(place("/v1/wallets/u42"), Place::Entity("wallet:u42".into()));
        assert_eq!(
            place("/v1/wallets/u42/"),
            Place::Entity("wallet:u42".into())
        );
        assert_eq!(
            place("/v1/wallets/u42/ledger"),
            Place::Entity("wallet:u42".into())
        );
        assert_eq!(
            place("/v1/wallets/u42/change/deposits"),
            Place::Entity("wallet:u42".into())
        );
        assert!(matches!(
            place("/v1/wallets/u42/coupons"),
            Place::EveryPartition(_)
        ));
        assert_eq!(place("/v1/packets/p1"), Place::Entity("packet:p1".into()));
        assert_eq!(
            place("/v1/packets/p1/claims"),
            Place::Entity("packet:p1".into())
        );
        assert_eq!(
            place("/v1/packets"),
            Place::BodyField {
                prefix: "packet",
                field: "packet_id"
            }
        );
        // Coupons: a request by its intake shard, a batch by its id.
        assert_eq!(place("/v1/coupons/issue"), Place::CouponIntake(None));
        assert_eq!(
            place("/v1/coupons/requests/s1"),
            Place::CouponIntake(Some("s1".into()))
        );
        assert_eq!(
            place("/v1/coupon-batches"),
            Place::BodyField {
                prefix: "coupon-batch",
                field: "batch_id"
            }
        );
        assert_eq!(
            place("/v1/coupon-batches/spring"),
            Place::Entity("coupon-batch:spring".into())
        );
        // Rewards: by the order id's intake shard, the shortcuts and budgets by the activity,
        // the wallet page's lists by the wallet; a reward's status by order id alone is not
        // served yet.
        assert_eq!(place("/v1/rewards"), Place::RewardIntake);
        assert_eq!(
            place("/v1/activities/cny/rain/3/rewards"),
            Place::Entity("activity:cny".into())
        );
        assert_eq!(
            place("/v1/admin/activities/cny/budget"),
            Place::Entity("activity:cny".into())
        );
        assert_eq!(
            place("/v1/wallets/u1/rewards"),
            Place::Entity("wallet:u1".into())
        );
        assert_eq!(place("/v1/rewards/o1"), Place::RewardStatus("o1".into()));
        assert_eq!(
            place("/v1/wallets/u1/withdrawals"),
            Place::BodyField {
                prefix: "withdrawal",
                field: "order_id"
            }
        );
        assert_eq!(
            place("/v1/withdrawals/w1"),
            Place::Entity("withdrawal:w1".into())
        );
        assert_eq!(
            place("/v1/wallets/u1/payout-methods"),
            Place::Entity("payee:u1".into())
        );
        assert_eq!(
            place("/v1/admin/channels/bank/statement"),
            Place::Entity("policy:global".into())
        );
        assert!(matches!(
            place("/v1/admin/withdrawals/parked"),
            Place::EveryPartition(_)
        ));
        // The fleet's singletons are served by their home partition.
        assert_eq!(
            place("/v1/admin/switches/c2c_send"),
            Place::Entity("switches:global".into())
        );
        assert_eq!(
            place("/v1/admin/withdrawal-policy"),
            Place::Entity("policy:global".into())
        );
        assert_eq!(place("/v1/admin/cluster"), Place::Node);
        assert_eq!(place("/healthz"), Place::Node);
    }

    #[test]
    fn the_document_says_which_operations_a_cluster_node_serves() {
        // Goal: every /v1 operation of the OpenAPI document is served by a cluster node
        // exactly when the document says so (no 501 listed), so the two cannot drift.
        let doc = crate::http::ApiDoc::openapi();
        let mut checked = 0;
        for (path, item) in &doc.paths.paths {
            if !path.starts_with("/v1/") {
                continue;
            }
            let concrete: String = path
                .split('/')
                .map(|s| if s.starts_with('{') { "x1" } else { s })
                .collect::<Vec<_>>()
                .join("/");
            for operation in [&item.get, &item.put, &item.post].into_iter().flatten() {
                let id = operation.operation_id.clone().unwrap_or_default();
                let served = place(&concrete) != Place::NotInCluster;
                assert_eq!(
                    served,
                    crate::http::openapi::CLUSTER_SERVED.contains(&id.as_str()),
                    "{id} ({path})"
                );
                assert_eq!(
                    operation.responses.responses.contains_key("501"),
                    !served,
                    "{id} ({path})"
                );
                checked += 1;
            }
        }
        assert!(checked > 30, "only {checked} operations");
    }
}
