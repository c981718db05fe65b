//! The HTTP layer (actix-web): parse, authorise, call an actor or read a projection, map
//! errors. [`Application::build`] opens the store, starts the projections and binds the
//! listener (port 0 in tests); [`Application::run_until_stopped`] serves until SIGINT/SIGTERM
//! or a [`ServerHandle`] stop, then shuts down in order: stop accepting, finish in-flight
//! requests (their replies wait for their flush), let the projections catch up, close the
//! journal (flush), return.

pub mod auth;
pub mod coupons;
pub mod error;
pub mod limits;
pub mod load_test;
pub mod openapi;
pub mod ops;
pub mod packets;
pub mod paging;
pub mod rewards;
pub mod status;
pub mod wallets;
pub mod withdrawals;

use crate::actors::{Board, Registry, Runtime};
use crate::channels::{SimulatedChannels, Simulator};
use crate::clock::Clock;
use crate::config::{Config, ConfigError, Keys};
use crate::domain::activity::Activity;
use crate::domain::switches::Switches;
use crate::domain::wallet::Wallet;
use crate::domain::withdrawal::{Payee, PolicyState};
use crate::events::{EventStore, StoreError};
use crate::flows::coupons::{CouponFlows, Coupons};
use crate::flows::packets::{PacketFlows, Packets};
use crate::flows::reward_lanes::RewardLanes;
use crate::flows::withdrawals::{WithdrawalFlows, Withdrawals};
use crate::ids::Id;
use crate::metrics::Metrics;
use crate::projections::Projections;
use crate::tokens::TokenSigner;
use actix_web::body::MessageBody;
use actix_web::dev::{Server, ServerHandle, ServiceRequest, ServiceResponse};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, HttpMessage, HttpResponse, HttpServer};
use error::{json_error, ApiError};
use openapi::CommonStatuses;
use serde::Serialize;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use utoipa::{OpenApi, ToSchema};

/// The error body every 4xx/5xx carries (plus code-specific fields).
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Machine-readable reason, snake_case.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "hongbao",
        description = "Event-sourced money engine for peak-traffic campaigns. Money is integer fen. \
                       Every command is idempotent by its business id. \
                       Load tests: any request may carry `X-Hongbao-Load-Test: 1`; it is then \
                       served by the same routes against books of its own (a separate log, \
                       views, simulated payment channels, metrics labelled \
                       `traffic=\"load_test\"`, `hongbao audit --load-test`), never the real \
                       ones. `0` (or no header) is real traffic; any other value is refused 400 \
                       `invalid_load_test_header`; a node serving no load tests (config \
                       `load_test.enabled = false`, or a cluster node) refuses marked requests \
                       403 `load_test_unavailable`.",
    ),
    paths(
        wallets::deposit,
        wallets::get_wallet,
        wallets::get_ledger,
        rewards::send_reward,
        rewards::rain,
        rewards::fireworks,
        rewards::cards,
        rewards::reward_status,
        rewards::set_budget,
        rewards::get_activity,
        rewards::force_credit,
        rewards::list_rewards,
        withdrawals::bind_method,
        withdrawals::list_methods,
        withdrawals::withdraw,
        withdrawals::get_withdrawal,
        withdrawals::set_policy,
        withdrawals::get_policy,
        withdrawals::set_channel,
        withdrawals::get_channel,
        withdrawals::statement,
                withdrawals::parked,
        packets::create,
        packets::pay,
        packets::claim,
        packets::details,
        coupons::create_batch,
        coupons::get_batch,
        coupons::issue,
        coupons::get_request,
        coupons::wallet_coupons,
        ops::healthz,
        ops::readyz,
        ops::metrics,
        status::status_page,
        status::status_json,
                ops::openapi,
        ops::set_switch,
        ops::list_switches,
        crate::cluster::node::cluster_view,
    ),
    components(schemas(
                ErrorBody,
        ops::SwitchRequest,
        wallets::DepositRequest,
        wallets::DepositResponse,
        wallets::WalletResponse,
        wallets::BalancesBody,
        wallets::PendingBody,
        wallets::LedgerLine,
        wallets::LedgerPage,
        rewards::RewardRequest,
        rewards::ShortcutRequest,
        rewards::RewardAccepted,
        rewards::RewardStatusBody,
        rewards::BudgetRequest,
        rewards::MoneyPair,
        rewards::ActivityBody,
        rewards::ForceCreditRequest,
        rewards::ForceCreditResponse,
        rewards::Refusal,
        rewards::UserReward,
        withdrawals::MethodRequest,
        withdrawals::MethodBody,
        withdrawals::WithdrawalBody,
        withdrawals::WithdrawalAccepted,
        withdrawals::WithdrawalStatus,
        withdrawals::HistoryItem,
        withdrawals::PolicyBody,
        withdrawals::PolicyView,
        withdrawals::ChangedByBody,
        withdrawals::WindowBody,
        withdrawals::StagedBody,
        withdrawals::StageBody,
        withdrawals::ChannelBody,
        withdrawals::StatementItem,
                withdrawals::ParkedItem,
        packets::Audience,
        packets::CreatePacket,
        packets::PacketStateBody,
        packets::PayPacket,
        packets::ClaimRequest,
        packets::ClaimBody,
        packets::ClaimItem,
        packets::PacketDetails,
        coupons::CreateBatch,
        coupons::BatchBody,
        coupons::IssueCoupon,
        coupons::IssueBody,
        coupons::RequestBody,
        coupons::CouponItem,
        crate::cluster::node::ClusterBody,
        crate::cluster::node::PartitionBody,
    )),
    modifiers(&BearerAuth, &CommonStatuses),
    tags(
        (name = "wallet", description = "Balances, ledger, deposits, force-credit, reward list"),
        (name = "rewards", description = "Reward intake, scenario shortcuts, status, budgets"),
                (name = "withdrawals", description = "Payout methods, withdrawals, policy, payment channels"),
        (name = "packets", description = "Red packets: B2C and C2C, claims, details"),
        (name = "coupons", description = "Coupon batches, asynchronous and green-channel issuance, request status, a user's coupons"),
        (name = "operations", description = "Health, readiness, metrics, this document"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// What a cluster node gives each partition's state (`AppState::build`).
pub struct CellContext {
    /// Where the streams of the other partitions are served.
    pub placement: Arc<dyn crate::actors::Placement>,
    /// The node's switches and withdrawal policy, shared by its cells.
    pub switches: Arc<crate::actors::board::Current<Switches>>,
    pub policy: Arc<crate::actors::board::Current<PolicyState>>,
    /// The fleet's rate limits, which the cell's lanes spend.
    pub pacing: Arc<dyn crate::flows::FleetPacing>,
    /// The payment channels, their books shared by the fleet (a partition that moves finds
    /// every payment its previous holder made).
    pub channels: Arc<SimulatedChannels>,
}

/// Everything a handler may use.
pub struct AppState {
    pub config: Config,
    pub keys: Keys,
    pub store: Arc<dyn EventStore>,
    /// What the log's durability rests on, as `/readyz` says it.
    pub store_guarantee: String,
    pub wallets: Arc<Registry<Wallet>>,
    pub activities: Arc<Registry<Activity>>,
    /// Reward intake claims each order id in the order-id registry first (R4).
    pub order_claims: crate::flows::order_claims::OrderClaims,
    /// On a cluster node with `rewards.intake_shards` > 1: rewards are accepted by the
    /// activity's intake shards against budget slices (docs/ARCHITECTURE.md, "Budget slices").
    pub slices: Option<crate::flows::slices::SlicedIntake>,
    pub switches: Board<Switches>,
    pub policy: Board<PolicyState>,
    pub payees: Arc<Registry<Payee>>,
    pub withdrawals: Arc<Withdrawals>,
    pub withdrawal_flows: WithdrawalFlows,
    pub channels: Arc<SimulatedChannels>,
    pub packets: Arc<Packets>,
    pub packet_flows: PacketFlows,
    pub claim_gate: packets::ClaimGate,
    pub coupons: Arc<Coupons>,
    pub coupon_flows: CouponFlows,
    pub signer: TokenSigner,
    pub lanes: RewardLanes,
    pub projections: Arc<Projections>,
    /// The continuous audit (None when `audit.continuous_every_ms` is 0).
    pub live_audit: Option<Arc<crate::audit::LiveAudit>>,
    pub metrics: Arc<Metrics>,
    pub openapi: String,
}

/// A projection's tree, once the projection has applied everything durable when the read
/// began (waiting at most `read_wait_ms`): a client sees its own acknowledged writes. On a
/// timeout the view is answered as it is, and the lag is logged.
pub async fn read_view<'a>(state: &'a AppState, name: &str) -> Result<&'a sled::Tree, ApiError> {
    let head = state.store.head();
    let wait = std::time::Duration::from_millis(state.config.server.read_wait_ms);
    if !state.projections.wait_for(name, head, wait).await {
        crate::warn_limited!(
            head,
            projection = name,
            "view lagging; answering from its last checkpoint"
        );
    }
    state.projections.tree(name).ok_or_else(|| {
        ApiError::unavailable(
            "projection_missing",
            format!("the {name} view is not running"),
        )
    })
}

/// A failed view read: logged, answered 503.
pub fn view_error(e: StoreError) -> ApiError {
    crate::error_limited!(error = %e, "view read failed");
    ApiError::unavailable("view_unavailable", "a view cannot be read right now; retry")
}

/// Parses an id from a path or body field, or answers 400 `invalid_id`.
pub fn parse_id(field: &str, raw: &str) -> Result<Id, ApiError> {
    Id::parse(raw).map_err(|e| ApiError::invalid_id(field, e))
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// (The cause follows as the error's source, printed once by the command line.)
    #[error("cannot open the event log")]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("server error: {0}")]
    Server(std::io::Error),
}

/// A built, bound, not yet running server.
pub struct Application {
    port: u16,
    server: Server,
    state: web::Data<AppState>,
    /// The engine serving load-test traffic (None when `load_test.enabled` is false).
    load_test: Option<web::Data<load_test::LoadTestEngine>>,
    keys_file: Option<PathBuf>,
    checkpoints: crate::checkpoints::Checkpointer,
}

impl AppState {
    /// Everything that serves one log: its views, actors and flows. A cluster partition gives
    /// its `cell` context (where the other partitions' streams are, the node's singletons) and
    /// has no continuous audit (the audit of a cluster replays every partition offline).
    pub async fn build(
        config: Config,
        keys: Keys,
        log: Arc<dyn crate::events::Log>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        cell: Option<CellContext>,
    ) -> Result<AppState, ServeError> {
        let continuous_audit = cell.is_none();
        let placement = cell.as_ref().map(|c| c.placement.clone());
        let (state_db, store_guarantee) = (log.state_db().clone(), log.describe());
        let dyn_store: Arc<dyn EventStore> = log;
        let store = dyn_store.clone();
        let views = crate::projections::all(metrics.clone());
        let projections = Arc::new(Projections::start(
            dyn_store.clone(),
            &state_db,
            views,
            metrics.clone(),
        )?);
        let live_audit = match config.audit.continuous_every_ms {
            ms if ms > 0 && continuous_audit => Some(Arc::new(
                crate::audit::LiveAudit::start(
                    dyn_store.clone(),
                    metrics.clone(),
                    std::time::Duration::from_millis(ms),
                )
                .map_err(ServeError::Server)?,
            )),
            _ => None,
        };
        let runtime = Arc::new(Runtime {
            store: dyn_store.clone(),
            clock: clock.clone(),
            metrics: metrics.clone(),
            config: config.actors(),
            placement,
            registries: Default::default(),
            pacing: cell.as_ref().map(|c| c.pacing.clone()),
        });
        let wallets = Registry::new(runtime.clone());
        let activities = Registry::new(runtime.clone());
        let order_claims =
            crate::flows::order_claims::OrderClaims::start(Registry::new(runtime.clone()));
        let slices = (cell.is_some() && config.rewards.intake_shards > 1).then(|| {
            crate::flows::slices::SlicedIntake::new(
                config.rewards.intake_shards,
                crate::money::Fen::new(config.rewards.slice_fen),
                metrics.clone(),
            )
        });
        // On a cluster node the boards follow the node's singletons (read from their home
        // partitions) and change them there; on one node they load from this log.
        let (switches, policy) = match &cell {
            Some(cell) => (
                Board::following(Registry::new(runtime.clone()), cell.switches.clone()),
                Board::following(Registry::new(runtime.clone()), cell.policy.clone()),
            ),
            None => (
                Board::load(Registry::new(runtime.clone()))
                    .await
                    .map_err(|e| {
                        ServeError::Store(StoreError::Io(format!("cannot load switches: {e}")))
                    })?,
                Board::load(Registry::new(runtime.clone()))
                    .await
                    .map_err(|e| {
                        ServeError::Store(StoreError::Io(format!(
                            "cannot load the withdrawal policy: {e}"
                        )))
                    })?,
            ),
        };
        let payees = Registry::new(runtime.clone());
        let channels = match &cell {
            Some(cell) => cell.channels.clone(),
            None => SimulatedChannels::open(&config.data_dir, runtime.clock.clone())?,
        };
        let withdrawals = Withdrawals::new(
            Registry::new(runtime.clone()),
            wallets.clone(),
            Arc::new(Simulator(channels.clone())),
            config.withdrawals(),
        );
        let withdrawal_view = projections
            .tree(crate::projections::withdrawals::NAME)
            .cloned()
            .ok_or_else(|| {
                ServeError::Store(StoreError::Io("the withdrawals view is not running".into()))
            })?;
        let withdrawal_flows =
            WithdrawalFlows::start(withdrawals.clone(), &state_db, withdrawal_view)?;
        // On a cluster with sharded reward intake, a B2C packet's unclaimed subsidy goes back
        // to the intake shard that accepted it.
        let mut packet_config = config.packets();
        if slices.is_some() {
            packet_config.reward_intake_shards = config.rewards.intake_shards;
        }
        let packets = Packets::new(
            Registry::new(runtime.clone()),
            wallets.clone(),
            activities.clone(),
            packet_config,
        );
        let packet_view = projections
            .tree(crate::projections::packets::NAME)
            .cloned()
            .ok_or_else(|| {
                ServeError::Store(StoreError::Io("the packets view is not running".into()))
            })?;
        let packet_flows = PacketFlows::start(packets.clone(), &state_db, packet_view)?;
        let (coupons, coupon_flows) = Coupons::start(
            Registry::new(runtime.clone()),
            Registry::new(runtime.clone()),
            Registry::new(runtime.clone()),
            activities.clone(),
            wallets.clone(),
            &state_db,
            config.coupons(),
        )?;
        let lanes = RewardLanes::start(
            &state_db,
            wallets.clone(),
            activities.clone(),
            config.lanes(),
            switches.subscribe(),
        )?;
        let openapi = ApiDoc::openapi().to_json().unwrap_or_else(|_| "{}".into());
        Ok(AppState {
            signer: TokenSigner::new(&keys.token_secret),
            keys,
            store,
            store_guarantee,
            wallets,
            activities,
            order_claims,
            slices,
            switches,
            policy,
            payees,
            withdrawals,
            withdrawal_flows,
            channels,
            packets,
            packet_flows,
            claim_gate: packets::ClaimGate::default(),
            coupons,
            coupon_flows,
            lanes,
            projections,
            live_audit,
            metrics,
            openapi,
            config,
        })
    }

    /// Stops the flows, lets the views catch up and closes the log (flushed).
    pub async fn stop(&self) -> Result<(), StoreError> {
        // The flows stop together: none waits for another's drain.
        futures::join!(
            self.lanes.stop(),
            self.withdrawal_flows.stop(),
            self.packet_flows.stop(),
            self.coupon_flows.stop(),
            self.order_claims.stop(),
        );
        self.projections.stop().await;
        if let Some(audit) = &self.live_audit {
            audit.stop().await;
        }
        self.store.close().await
    }
}

/// Binds `config.server.addr` and builds the server around `app` (the routes and their data).
/// A cluster node (`cluster`) first sends each request to the cell of its home partition.
pub(crate) fn serve_http<F>(
    config: &Config,
    cluster: bool,
    app: F,
) -> Result<(Server, u16), ServeError>
where
    F: Fn(&mut web::ServiceConfig) + Send + Clone + 'static,
{
    let listener = TcpListener::bind(&config.server.addr).map_err(|source| ServeError::Bind {
        addr: config.server.addr.clone(),
        source,
    })?;
    let port = listener.local_addr().map_err(ServeError::Server)?.port();
    let workers = match config.server.workers {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2),
        n => n,
    };
    let body_max = config.server.request_body_bytes_max;
    let caller_limits = limits::CallerLimits::from_config(&config.server);
    if cluster && caller_limits.is_some() {
        return Err(ServeError::Config(crate::config::ConfigError::Invalid(
            "server.per_key_per_s and server.per_uid_per_s are not supported on a cluster node \
             yet (a forwarded request would be charged at every node it passes): set them to 0"
                .into(),
        )));
    }
    // Load-test traffic is charged to limiters of its own: a rehearsal with the gateway's key
    // must not spend the real callers' budget.
    let load_test_limits = web::Data::new(limits::LoadTestLimits(
        limits::CallerLimits::from_config(&config.server),
    ));
    let caller_limits = web::Data::new(caller_limits);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(caller_limits.clone())
            .app_data(load_test_limits.clone())
            .configure(|cfg| extractors(cfg, body_max))
            .wrap(actix_web::middleware::Condition::new(
                cluster,
                from_fn(crate::cluster::node::dispatch),
            ))
            .wrap(from_fn(load_test::route))
            .wrap(from_fn(limits::limit))
            .wrap(from_fn(observe))
            .configure(app.clone())
    })
    .workers(workers)
    .client_request_timeout(std::time::Duration::from_millis(
        config.server.request_head_timeout_ms,
    ))
    .shutdown_timeout(config.server.shutdown_timeout_s)
    .disable_signals()
    .listen(listener)
    .map_err(|source| ServeError::Bind {
        addr: config.server.addr.clone(),
        source,
    })?
    .run();
    Ok((server, port))
}

impl Application {
    /// Opens the store in the configured data directory, resolves keys (generating them on
    /// first start), starts the projections and binds `config.server.addr`.
    pub async fn build(config: Config, clock: Arc<dyn Clock>) -> Result<Application, ServeError> {
        config.validate()?;
        let metrics = Arc::new(Metrics::new());
        let (keys, keys_file) =
            Keys::resolve(&config.auth, &config.data_dir, |v| std::env::var(v).ok())?;
        // The log: sled in the data directory, or JetStream; derived state (views, flow
        // checkpoints, snapshots) stays in a local sled database either way.
        let log = crate::events::open_log(&config, true, clock.clone(), metrics.clone())?;
        let checkpoints = start_checkpoints(&config, log.clone(), clock.clone())?;
        let state = web::Data::new(
            AppState::build(
                config.clone(),
                keys.clone(),
                log,
                clock.clone(),
                metrics.clone(),
                None,
            )
            .await?,
        );
        // A load-test engine that cannot start (its JetStream stream refused, its directory
        // unwritable) must not keep the real node from serving: marked requests are then
        // refused 403, as on a node without one.
        let load_test = match config.load_test.enabled {
            true => match start_load_test(&config, keys, clock).await {
                Ok(engine) => Some(web::Data::new(engine)),
                Err(e) => {
                    tracing::error!(
                        error = %e,
                        cause = ?std::error::Error::source(&e).map(|c| c.to_string()),
                        "the load-test engine did not start: marked requests are refused"
                    );
                    None
                }
            },
            false => None,
        };
        let app_state = state.clone();
        let metrics = web::Data::from(metrics);
        let engine = load_test.clone();
        let (server, port) = serve_http(&config, false, move |cfg: &mut web::ServiceConfig| {
            if let Some(engine) = &engine {
                cfg.app_data(engine.clone());
            }
            configure_node(cfg, app_state.clone(), metrics.clone())
        })?;
        Ok(Application {
            port,
            server,
            state,
            load_test,
            keys_file,
            checkpoints,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Path of the keys file written on this start, if keys were generated.
    pub fn generated_keys_file(&self) -> Option<&PathBuf> {
        self.keys_file.as_ref()
    }

    pub fn keys(&self) -> &Keys {
        &self.state.keys
    }

    /// A handle to stop the server (gracefully with `stop(true)`).
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// The coupon engine, for in-process load generation (it is usable from any thread).
    pub fn coupons(&self) -> Arc<Coupons> {
        self.state.coupons.clone()
    }

    /// Serves until stopped by SIGINT/SIGTERM or the handle, then shuts down in order.
    pub async fn run_until_stopped(self) -> Result<(), ServeError> {
        let handle = self.server.handle();
        let signals = actix_web::rt::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received; finishing in-flight requests");
            handle.stop(true).await;
        });
        let served = self.server.await;
        signals.abort();
        let started = Instant::now();
        let (closed, load_test_closed) = match &self.load_test {
            Some(engine) => futures::join!(self.state.stop(), engine.state.stop()),
            None => (self.state.stop().await, Ok(())),
        };
        if let Err(e) = &load_test_closed {
            tracing::error!(error = %e, "the load-test log did not close cleanly");
        }
        // After the close: the last checkpoint signs the log's final head.
        self.checkpoints.finish().await;
        tracing::info!(
            head = self.state.store.head(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "journal flushed and closed"
        );
        served.map_err(ServeError::Server)?;
        closed?;
        Ok(())
    }
}

/// The load-test engine (D7): the same engine on a log, views and channels of its own
/// (`Config::for_load_test`), its metrics labelled `traffic="load_test"`, the same keys. No
/// signed checkpoints: its log is for rehearsals, not for auditors.
async fn start_load_test(
    config: &Config,
    keys: Keys,
    clock: Arc<dyn Clock>,
) -> Result<load_test::LoadTestEngine, ServeError> {
    let config = config.for_load_test();
    std::fs::create_dir_all(&config.data_dir).map_err(ServeError::Server)?;
    let metrics = Arc::new(Metrics::for_load_test());
    let log = crate::events::open_log(&config, true, clock.clone(), metrics.clone())?;
    tracing::info!(
        log = %log.describe(),
        dir = %config.data_dir.display(),
        "load-test traffic (X-Hongbao-Load-Test: 1) is served apart"
    );
    let state = AppState::build(config, keys, log, clock, metrics.clone(), None).await?;
    Ok(load_test::LoadTestEngine {
        state: web::Data::new(state),
        metrics: web::Data::from(metrics),
    })
}

/// Loads (or generates) the checkpoint key and starts signing the log's head (D4).
fn start_checkpoints(
    config: &Config,
    store: Arc<dyn EventStore>,
    clock: Arc<dyn Clock>,
) -> Result<crate::checkpoints::Checkpointer, ServeError> {
    let (key, generated) = crate::checkpoints::load_or_generate_key(&config.data_dir)
        .map_err(|e| ServeError::Server(std::io::Error::other(e.to_string())))?;
    if let Some(path) = generated {
        tracing::info!(path = %path.display(), "generated the checkpoint signing key");
    }
    tracing::info!(
        public_key = %crate::checkpoints::public_key_hex(&key),
        "signing log checkpoints into {}",
        config.data_dir.join(crate::checkpoints::CHECKPOINTS_FILE).display()
    );
    let every = match config.audit.checkpoint_every_ms {
        0 => None,
        ms => Some(std::time::Duration::from_millis(ms)),
    };
    crate::checkpoints::Checkpointer::start(store, key, &config.data_dir, every, clock)
        .map_err(ServeError::Server)
}

#[cfg(unix)]
pub(crate) async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

#[cfg(not(unix))]
pub(crate) async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

/// How bodies, paths and queries are parsed, and their refusals: 413 beyond `body_max`, 400
/// with a code for the rest.
pub(crate) fn extractors(cfg: &mut web::ServiceConfig, body_max: usize) {
    cfg.app_data(
        web::JsonConfig::default()
            .limit(body_max)
            .content_type_required(false)
            .error_handler(|e, _| json_error(e).into()),
    )
    .app_data(
        web::PathConfig::default()
            .error_handler(|e, _| ApiError::malformed(format!("invalid path: {e}")).into()),
    )
    .app_data(
        web::QueryConfig::default()
            .error_handler(|e, _| ApiError::malformed(format!("invalid query: {e}")).into()),
    );
}

/// A single node's routes and what its handlers take from the app (its state, metrics and
/// keys): `serve`, and the simulation's engine.
pub(crate) fn configure_node(
    cfg: &mut web::ServiceConfig,
    state: web::Data<AppState>,
    metrics: web::Data<Metrics>,
) {
    let keys = web::Data::new(state.keys.clone());
    cfg.app_data(state).app_data(metrics).app_data(keys);
    routes(cfg);
}

/// Every route of a single node.
fn routes(cfg: &mut web::ServiceConfig) {
    let ops: Routes = vec![
        ("/healthz", vec![web::get().to(ops::healthz)]),
        ("/readyz", vec![web::get().to(ops::readyz)]),
        ("/metrics", vec![web::get().to(ops::metrics)]),
        ("/status", vec![web::get().to(status::status_page)]),
        ("/status.json", vec![web::get().to(status::status_json)]),
        ("/openapi.json", vec![web::get().to(ops::openapi)]),
        (
            "/v1/admin/cluster",
            vec![web::get().to(crate::cluster::node::cluster_view)],
        ),
    ];
    register(cfg, api_routes().into_iter().chain(ops));
}

/// Resources by path, each with its methods.
pub(crate) type Routes = Vec<(&'static str, Vec<actix_web::Route>)>;

/// Adds `routes` (a method not listed answers 405, an unknown path 404).
pub(crate) fn register(
    cfg: &mut web::ServiceConfig,
    routes: impl IntoIterator<Item = (&'static str, Vec<actix_web::Route>)>,
) {
    for (path, methods) in routes {
        let resource = methods
            .into_iter()
            .fold(web::resource(path), |r, route| r.route(route))
            .default_service(web::to(method_not_allowed))
            // The pattern for `observe`'s labels, known here without matching the path again.
            .wrap_fn(move |req, service| {
                req.extensions_mut().insert(RoutePattern(path));
                actix_web::dev::Service::call(service, req)
            });
        cfg.service(resource);
    }
    cfg.default_service(web::to(no_route));
}

/// The route pattern a request matched, left in its extensions by its resource once routed
/// and read by [`observe`]. `HttpRequest::match_pattern` matches the path against every
/// resource's regular expression again: about a tenth of the CPU of a deposit, whose resource
/// comes eleventh. It remains the fallback for what no local resource served (a request a
/// cluster node forwarded to its holder, an unknown path).
#[derive(Clone, Copy)]
struct RoutePattern(&'static str);

/// Every business endpoint. actix-router tries resources in this order (regular
/// expressions for parameterised paths), so the peak-traffic endpoints come first.
pub(crate) fn api_routes() -> Routes {
    vec![
        // Peak traffic first: actix tries resources in order, one pattern match each.
        ("/v1/rewards", vec![web::post().to(rewards::send_reward)]),
        (
            "/v1/packets/{packet_id}/claims",
            vec![web::post().to(packets::claim)],
        ),
        ("/v1/coupons/issue", vec![web::post().to(coupons::issue)]),
        (
            "/v1/activities/{activity_id}/rain/{round}/rewards",
            vec![web::post().to(rewards::rain)],
        ),
        (
            "/v1/activities/{activity_id}/fireworks/rewards",
            vec![web::post().to(rewards::fireworks)],
        ),
        (
            "/v1/activities/{activity_id}/cards/rewards",
            vec![web::post().to(rewards::cards)],
        ),
        // Wallet.
        (
            "/v1/wallets/{uid}",
            vec![web::get().to(wallets::get_wallet)],
        ),
        (
            "/v1/wallets/{uid}/ledger",
            vec![web::get().to(wallets::get_ledger)],
        ),
        (
            "/v1/wallets/{uid}/force-credit",
            vec![web::post().to(rewards::force_credit)],
        ),
        (
            "/v1/wallets/{uid}/rewards",
            vec![web::get().to(rewards::list_rewards)],
        ),
        (
            "/v1/wallets/{uid}/change/deposits",
            vec![web::post().to(wallets::deposit)],
        ),
        (
            "/v1/rewards/{order_id}",
            vec![web::get().to(rewards::reward_status)],
        ),
        // Withdrawals.
        (
            "/v1/wallets/{uid}/withdrawals",
            vec![web::post().to(withdrawals::withdraw)],
        ),
        (
            "/v1/wallets/{uid}/payout-methods",
            vec![
                web::post().to(withdrawals::bind_method),
                web::get().to(withdrawals::list_methods),
            ],
        ),
        (
            "/v1/withdrawals/{order_id}",
            vec![web::get().to(withdrawals::get_withdrawal)],
        ),
        // Red packets.
        ("/v1/packets", vec![web::post().to(packets::create)]),
        (
            "/v1/packets/{packet_id}",
            vec![web::get().to(packets::details)],
        ),
        (
            "/v1/packets/{packet_id}/pay",
            vec![web::post().to(packets::pay)],
        ),
        // Coupons.
        (
            "/v1/coupon-batches",
            vec![web::post().to(coupons::create_batch)],
        ),
        (
            "/v1/coupon-batches/{batch_id}",
            vec![web::get().to(coupons::get_batch)],
        ),
        (
            "/v1/coupons/requests/{seq_no}",
            vec![web::get().to(coupons::get_request)],
        ),
        (
            "/v1/wallets/{uid}/coupons",
            vec![web::get().to(coupons::wallet_coupons)],
        ),
        // Administration.
        (
            "/v1/admin/activities/{activity_id}/budget",
            vec![web::put().to(rewards::set_budget)],
        ),
        (
            "/v1/admin/activities/{activity_id}",
            vec![web::get().to(rewards::get_activity)],
        ),
        (
            "/v1/admin/switches/{name}",
            vec![web::put().to(ops::set_switch)],
        ),
        (
            "/v1/admin/switches",
            vec![web::get().to(ops::list_switches)],
        ),
        (
            "/v1/admin/withdrawal-policy",
            vec![
                web::put().to(withdrawals::set_policy),
                web::get().to(withdrawals::get_policy),
            ],
        ),
        (
            "/v1/admin/channels/{channel}",
            vec![
                web::put().to(withdrawals::set_channel),
                web::get().to(withdrawals::get_channel),
            ],
        ),
        (
            "/v1/admin/channels/{channel}/statement",
            vec![web::get().to(withdrawals::statement)],
        ),
        (
            "/v1/admin/withdrawals/parked",
            vec![web::get().to(withdrawals::parked)],
        ),
    ]
}

async fn no_route() -> Result<HttpResponse, ApiError> {
    Err(ApiError::new(
        actix_web::http::StatusCode::NOT_FOUND,
        "no_route",
        "no such endpoint; see /openapi.json",
    ))
}

async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::new(
        actix_web::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not accept that method; see /openapi.json",
    ))
}

/// Records every request's latency by route pattern, method and status, and every error
/// answer by its code (on a cluster, an answer forwarded from the holder carries its code too:
/// counted by the node the client asked and by the holder that answered).
async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let method = req.method().as_str().to_owned();
    let metrics = load_test::metrics_of(&req);
    // No copy of the request may be held across `next.call`: routing needs the only one.
    let response = next.call(req).await;
    let route: std::borrow::Cow<'static, str> = match &response {
        Ok(r) => {
            let routed = r.request().extensions().get::<RoutePattern>().map(|p| p.0);
            match routed {
                Some(pattern) => pattern.into(),
                None => r
                    .request()
                    .match_pattern()
                    .map_or("unmatched".into(), Into::into),
            }
        }
        // A middleware's own error (a cluster node's dispatcher refusing a body it cannot
        // place): the request is gone with it.
        Err(_) => "unmatched".into(),
    };
    if let Some(metrics) = metrics {
        let (status, code) = match &response {
            Ok(r) => (
                r.status().as_u16(),
                r.response()
                    .extensions()
                    .get::<error::ErrorCode>()
                    .map(|c| c.0.clone()),
            ),
            Err(e) => (
                e.as_response_error().status_code().as_u16(),
                e.as_error::<ApiError>().map(|a| a.code.to_owned()),
            ),
        };
        let status = status.to_string();
        metrics
            .http_request_duration_seconds
            .with_label_values(&[route.as_ref(), &method, &status])
            .observe(started.elapsed().as_secs_f64());
        if let Some(code) = code {
            metrics
                .http_errors_total
                .with_label_values(&[route.as_ref(), &status, &code])
                .inc();
        }
    }
    response
}

/// A server running on its own thread (own actix system): for tests, the load generator and
/// embedding. Stopped gracefully by [`RunningServer::stop`] or on drop.
pub struct RunningServer {
    pub port: u16,
    pub keys: Keys,
    /// The coupon engine, driven directly by `loadgen coupons` in-process.
    pub coupons: Arc<Coupons>,
    handle: ServerHandle,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl RunningServer {
    pub fn start(config: Config, clock: Arc<dyn Clock>) -> Result<RunningServer, ServeError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("hongbao-server".into())
            .spawn(move || {
                actix_web::rt::System::new().block_on(async move {
                    match Application::build(config, clock).await {
                        Ok(app) => {
                            let _ = tx.send(Ok((
                                app.port(),
                                app.keys().clone(),
                                app.handle(),
                                app.coupons(),
                            )));
                            app.run_until_stopped().await.map_err(|e| e.to_string())
                        }
                        Err(e) => {
                            let message = e.to_string();
                            let _ = tx.send(Err(e));
                            Err(message)
                        }
                    }
                })
            })
            .map_err(ServeError::Server)?;
        let (port, keys, handle, coupons) = rx
            .recv()
            .map_err(|_| ServeError::Server(std::io::Error::other("server thread died")))??;
        Ok(RunningServer {
            port,
            keys,
            coupons,
            handle,
            thread: Some(thread),
        })
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops gracefully (in-flight requests finish, journal flushed) and waits.
    pub fn stop(mut self) -> Result<(), String> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), String> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let handle = self.handle.clone();
        let _ = std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(handle.stop(true));
        })
        .join();
        thread
            .join()
            .map_err(|_| "server thread panicked".to_string())?
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}
