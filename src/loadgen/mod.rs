//! `hongbao loadgen`: the project's own load generator.
//!
//! Scenarios:
//! - `hello`: an in-process actix-web hello-world endpoint, the HTTP ceiling of this machine;
//! - `deposits`: `POST /v1/wallets/{uid}/change/deposits` end to end (in-process server on a
//!   temporary data directory, or `--target`), each followed by the hello baseline and the same
//!   server's `/healthz` at the same concurrency so the ratios come from one run;
//! - `rewards`: `POST /v1/rewards` for one hot activity and 200,000 users: acceptance rate and
//!   latency beside hello-world, the lanes' crediting rate during the run, the backlog left,
//!   and how long the lanes take to drain it;
//! - `withdrawals`: seeds users with a balance and a bank method (W13), then withdraws:
//!   intake rate and latency beside hello-world, and how long the payout lanes (bank paced at
//!   its configured rate) take to make every order final;
//! - `journal`: durable appends through the journal without HTTP, beside raw sled
//!   `apply_batch` + `flush()` at the journal's observed batch size and at 1/16/256/1024; with
//!   `--store nats://...`, through the JetStream writer beside raw JetStream publishing at the
//!   same in-flight and the writer's batch patterns without hongbao (see [`jetstream`]);
//! - `packets`: one hot red packet claimed by many clients, hongbao beside the textbook
//!   PostgreSQL and Redis designs (see [`packets`]);
//! - `coupons`: one hot coupon batch, in-process and over HTTP, per merged deduction size:
//!   acceptance and issuance rates and the acceptance-to-issued latency (see [`coupons`]);
//! - `audit`: the audit's replay of a mixed log, timed over --rounds runs beside hello-world
//!   (see [`audit`]);
//! - `campaign`: the night's full chain (P12) by virtual users, load-test traffic by default,
//!   a report per endpoint over time and an SVG plot (see [`campaign`]).
//!
//! `--store nats://...` puts the in-process server's log (deposits, rewards, ...) on JetStream,
//! in a stream of the load generator's own that is deleted afterwards.
//!
//! Every run prints requests/s and p50/p99/p99.9 latency from an hdrhistogram.

pub mod audit;
pub mod campaign;
pub mod client;
pub mod coupons;
pub mod handover;
pub mod hello;
pub mod jetstream;
pub mod journal;
pub mod ledger;
pub mod packets;
mod soak;

use crate::clock::SystemClock;
use crate::config::{AuthConfig, Config};
use crate::events::jetstream::{Durability, REPLICAS_DEFAULT};
use crate::http::RunningServer;
use client::{post_json, RequestFactory, RunResult};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// actix-web hello world: the HTTP ceiling of this machine.
    Hello,
    /// Admin deposits over HTTP, end to end, beside the hello baseline and the same server's /healthz.
    Deposits,
    /// Reward intake over HTTP (one hot activity, many users) and the crediting lanes behind it.
    Rewards,
    /// Seeds users with balances and bound methods (W13), then withdraws: intake rate and how
    /// fast the payout lanes make every order final.
    Withdrawals,
    /// Durable appends through the journal (no HTTP), beside raw sled batch+flush; with
    /// --store nats://..., through the JetStream writer beside raw JetStream publishing.
    Journal,
    /// One hot red packet claimed by --clients clients: hongbao beside textbook PostgreSQL
    /// and Redis designs (--backends), through pools of --pool connections.
    Packets,
    /// One hot coupon batch: durable acceptance, then issuance through the two layers, for
    /// each --merge-max, in-process and over HTTP (--modes).
    Coupons,
    /// Partition lease hand-over (--store nats://... only): --nodes lease keepers share
    /// --partitions; one is killed --kills times; time until its partitions are held again,
    /// and until a new node has its fair share.
    Handover,
    /// The audit's replay of the sled log in --data-dir, --rounds times, beside hello-world;
    /// without a log there (or without --data-dir), a mixed one is built first by the other
    /// scenarios (about 1.5 million events at the default --duration-s 5).
    Audit,
    /// The night's mix (deposits, cash rewards, wallet reads, coupon requests, withdrawals)
    /// paced at --rate, or at half of the capacity measured first, for --soak-s seconds
    /// through the largest --in-flight connections; a row every --duration-s: rate, p50/p99,
    /// resident memory, disk, the lanes' and layers' backlogs, the views' and the continuous
    /// audit's lag, audit violations. Fails on any violation or error.
    Soak,
    /// The night's full chain (P12) for --duration-s by --vus virtual users through at most
    /// --pool connections: subsidy reward -> subsidy list -> B2C packet -> --claimers
    /// concurrent claims -> details; cash reward -> withdrawal; coupon request. Every request
    /// carries X-Hongbao-Load-Test: 1 (unless --real-traffic). Rate and p50/p99 per endpoint
    /// every --interval-s and in total, errors by status and code, 429s apart; writes --plot
    /// (SVG). Fails on any unexpected error or money check.
    Campaign,
}

#[derive(Debug, Clone, clap::Args)]
pub struct LoadgenArgs {
    /// What to drive.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Requests (or appends) in flight; a comma-separated list runs each in turn.
    #[arg(long, value_delimiter = ',', default_value = "1,16,256,1024")]
    pub in_flight: Vec<usize>,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 5)]
    pub duration_s: u64,
    /// Seconds of warm-up before measuring, per run.
    #[arg(long, default_value_t = 1)]
    pub warmup_s: u64,
    /// Drive an already running server (http://HOST:PORT) instead of an in-process one.
    #[arg(long, value_name = "URL")]
    pub target: Option<String>,
    /// packets, rewards, withdrawals and coupons with --target on a cluster node: the other
    /// nodes (http://HOST:PORT,...), whose /metrics count the transfers, credits, payouts and
    /// coupons their partitions make (the load generator waits for them, wherever the
    /// partition is served).
    #[arg(long, value_name = "URL", value_delimiter = ',')]
    pub fleet: Vec<String>,
    /// Admin key for --target.
    #[arg(long, env = "HONGBAO_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Issuer key for --target (rewards).
    #[arg(long, env = "HONGBAO_ISSUER_KEY", hide_env_values = true)]
    pub issuer_key: Option<String>,
    /// Gateway key for --target (withdrawals).
    #[arg(long, env = "HONGBAO_GATEWAY_KEY", hide_env_values = true)]
    pub gateway_key: Option<String>,
    /// Config file for the in-process server (its data directory and keys are overridden).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory for the in-process server or journal (default: a fresh temporary one).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The log of the in-process server or journal: `sled` (default) or
    /// `nats://HOST:PORT[,HOST:PORT...]` (JetStream 2.12.3+). On JetStream every stream is the
    /// load generator's own (HBLG_*), created per run and deleted after it; the in-process
    /// server's takes the subjects `hb.>`, so no other stream on the server may hold them.
    /// journal: raw JetStream publishing is measured beside it, on the same server.
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// With --store nats://...: replicas of the streams (the log's and the raw ones) [default: 3].
    #[arg(long, value_name = "N")]
    pub replicas: Option<usize>,
    /// With --store nats://...: state that the server fsyncs every write (`sync_interval:
    /// always`); needed for --replicas 1.
    #[arg(long)]
    pub single_replica_synced: bool,
    /// journal with --store nats://...: batches outstanding in the raw batch comparisons
    /// (1 is the writer's way: every ack of a batch before the next).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub batch_depth: Vec<usize>,
    /// rewards: pause the crediting lanes (switch reward_lanes) during each run, then resume
    /// them and measure the drain: intake and crediting capacities measured apart.
    #[arg(long)]
    pub pause_lanes: bool,
    /// withdrawals: users to seed (each funded and given a bank method).
    #[arg(long, default_value_t = 2_000)]
    pub users: usize,
    /// deposits: spread the deposits over this many wallets (`lgw0`...), each request to a
    /// pseudo-random one, as a campaign touches each of many wallets a few times. 0 (the
    /// default): one wallet per connection, a few hot wallets.
    #[arg(long, default_value_t = 0)]
    pub wallets: u64,
    /// deposits: run at the first --in-flight until this many deposits (one event each) are
    /// in the log, printing a row every --duration-s seconds: the rate, p99, the process's
    /// resident memory and the data directory's size (in-process server), so that a decay
    /// over a long night shows. Unless --no-baseline, each interval is followed by as long a
    /// run of the same server's /healthz and of the same deposit on each other --backends
    /// (postgres, redis, redis-always: their tables grow with the run as the log does), and
    /// hello-world runs at the start and the end.
    #[arg(long, value_name = "EVENTS")]
    pub sustain: Option<u64>,
    /// Skip the hello-world baseline runs.
    #[arg(long)]
    pub no_baseline: bool,
    /// Client threads.
    #[arg(long, default_value_t = 1)]
    pub client_threads: usize,
    /// Server HTTP workers for in-process servers (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub server_workers: usize,
    /// packets: shares in the hot packet (its total is 100 fen a share on average).
    #[arg(long, default_value_t = 10_000)]
    pub shares: u32,
    /// packets: concurrent clients, each claiming with fresh uids until the packet is empty.
    #[arg(long, default_value_t = 1_000)]
    pub clients: usize,
    /// packets: connections in each backend's pool, shared by the clients; campaign: the
    /// connections every virtual user and claimer shares (the requests in flight at most).
    #[arg(long, default_value_t = 64)]
    pub pool: usize,
    /// packets: backends to compare, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "hongbao,postgres,redis,redis-always"
    )]
    pub backends: Vec<packets::Backend>,
    /// packets: packets claimed per backend (one row each); audit: replays of the log.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// packets: PostgreSQL for the textbook baseline (tables lg_packets and lg_claims).
    #[arg(
        long,
        env = "HONGBAO_POSTGRES_URL",
        default_value = "host=127.0.0.1 port=5432 user=postgres dbname=test"
    )]
    pub postgres_url: String,
    /// packets: Redis for the textbook baseline (keys lg:packet:*).
    #[arg(
        long,
        env = "HONGBAO_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// coupons: N, the requests one merged stock deduction takes at most; a server per value.
    #[arg(long, value_delimiter = ',', default_value = "1,64,512")]
    pub merge_max: Vec<usize>,
    /// coupons: how to submit, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "in-process,http"
    )]
    pub modes: Vec<coupons::Mode>,
    /// coupons in-process: offer this many requests per second (open loop) instead of
    /// --in-flight closed-loop submitters; for latency below capacity. soak: the pace of the
    /// mix [default: half of the capacity measured first].
    #[arg(long, value_name = "PER_S")]
    pub rate: Option<u64>,
    /// soak: how long to run, in seconds.
    #[arg(long, default_value_t = 1_800)]
    pub soak_s: u64,
    /// handover: lease keepers (nodes) sharing the partitions.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// handover: partitions of the deployment.
    #[arg(long, default_value_t = crate::cluster::partition::PARTITIONS_DEFAULT)]
    pub partitions: u16,
    /// handover: lease TTL in milliseconds (renewed every TTL/4).
    #[arg(long, default_value_t = 4_000)]
    pub lease_ttl_ms: u64,
    /// handover: keepers killed, one after the other (a new one joins after each).
    #[arg(long, default_value_t = 10)]
    pub kills: usize,
    #[command(flatten)]
    pub campaign: campaign::CampaignArgs,
}

impl LoadgenArgs {
    /// `--store nats://...` with its durability, checked; `None` for sled.
    fn nats(&self) -> Result<Option<(String, Durability)>, LoadgenError> {
        match self.store.as_deref() {
            None | Some("sled") => {
                if self.replicas.is_some() || self.single_replica_synced {
                    return Err(LoadgenError::Usage(
                        "--replicas and --single-replica-synced need --store nats://...".into(),
                    ));
                }
                Ok(None)
            }
            Some(url) if url.starts_with("nats://") => {
                let durability = Durability {
                    replicas: self.replicas.unwrap_or(REPLICAS_DEFAULT),
                    single_replica_synced: self.single_replica_synced,
                }
                .check()
                .map_err(|e| LoadgenError::Usage(e.to_string()))?;
                Ok(Some((url.to_owned(), durability)))
            }
            Some(other) => Err(LoadgenError::Usage(format!(
                "--store is sled or nats://HOST:PORT[,HOST:PORT...], not {other:?}"
            ))),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("cannot start the server: {0}")]
    Serve(#[from] crate::http::ServeError),
    #[error("the log: {0}")]
    Store(#[from] crate::events::StoreError),
    #[error("{0}")]
    Usage(String),
}

fn workers(n: usize) -> usize {
    if n == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    } else {
        n
    }
}

fn header() {
    println!(
        "{:<10} {:>9} {:>10} {:>10} {:>8} {:>11} {:>9} {:>9} {:>9} {:>12} {:>7}",
        "scenario",
        "in_flight",
        "requests",
        "ok",
        "errors",
        "req/s",
        "p50_ms",
        "p99_ms",
        "p999_ms",
        "hello_req/s",
        "ratio"
    );
}

fn row(name: &str, r: &RunResult, baseline: Option<&RunResult>) {
    let (hello, ratio) = match baseline {
        Some(b) => (
            format!("{:.0}", b.per_second()),
            format!("{:.2}", r.per_second() / b.per_second().max(1e-9)),
        ),
        None => ("-".into(), "-".into()),
    };
    println!(
        "{:<10} {:>9} {:>10} {:>10} {:>8} {:>11.0} {:>9.2} {:>9.2} {:>9.2} {:>12} {:>7}",
        name,
        r.in_flight,
        r.requests,
        r.ok(),
        r.requests - r.ok(),
        r.per_second(),
        r.quantile_ms(0.5),
        r.quantile_ms(0.99),
        r.quantile_ms(0.999),
        hello,
        ratio
    );
    let errors: Vec<String> = r
        .statuses
        .iter()
        .filter(|(s, _)| !(200..300).contains(*s))
        .map(|(s, n)| {
            format!(
                "{}x{}",
                n,
                if *s == 0 {
                    "transport".into()
                } else {
                    s.to_string()
                }
            )
        })
        .collect();
    if !errors.is_empty() {
        println!("{:<10} non-2xx: {}", "", errors.join(", "));
    }
}

/// One measured run of `make`'s requests at `in_flight`, with the run's warm-up, duration and
/// client threads.
fn drive(
    args: &LoadgenArgs,
    addr: SocketAddr,
    in_flight: usize,
    make: RequestFactory,
) -> Result<RunResult, LoadgenError> {
    Ok(client::drive(
        addr,
        in_flight,
        Duration::from_secs(args.warmup_s),
        Duration::from_secs(args.duration_s),
        args.client_threads,
        make,
    )?)
}

fn hello_run(args: &LoadgenArgs, in_flight: usize) -> Result<RunResult, LoadgenError> {
    let server = hello::HelloServer::start(workers(args.server_workers))?;
    let addr = server.addr;
    let make: RequestFactory = Arc::new(move |c, n| {
        post_json(
            addr,
            "/hello",
            None,
            format!("{{\"order_id\":\"h-{c}-{n}\",\"amount\":100}}"),
        )
    });
    drive(args, addr, in_flight, make)
}

/// Reads a counter-like sample (`name value`) from a Prometheus exposition.
/// The sum of the series of `query` in a Prometheus text: `name` alone (every series of the
/// family) or `name{a="x",b="y"}` (the series carrying at least those labels: a cluster node
/// adds `partition="p007"` to the series of each partition).
fn metric_value(text: &str, query: &str) -> f64 {
    let (name, wanted) = match query.split_once('{') {
        Some((name, labels)) => (name, labels.trim_end_matches('}')),
        None => (query, ""),
    };
    let wanted: Vec<&str> = wanted.split(',').filter(|l| !l.is_empty()).collect();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (family, labels) = match series.split_once('{') {
                Some((family, labels)) => (family, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            let matches =
                family == name && wanted.iter().all(|w| labels.split(',').any(|l| l == *w));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// One blocking HTTP/1.1 request on a fresh connection; returns the status and the body.
fn http_once(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return (0, String::new());
    };
    let auth = key
        .map(|k| format!("authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let _ = write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A set-up request (a budget, a switch, a seeded reward, a batch...): idempotent by its ids,
/// so it is sent again while the answer says "retry" (a connection refused, 408, 429, 503: a
/// cluster's partition changing hands) for up to [`SETUP_RETRY_MAX`], honouring the
/// answer's `retry_after_ms`. The load it sets up is measured, not the set-up.
fn http_setup(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> (u16, String) {
    let deadline = Instant::now() + SETUP_RETRY_MAX;
    loop {
        let (status, answer) = http_once(addr, method, path, key, body);
        if !matches!(status, 0 | 408 | 429 | 503) || Instant::now() >= deadline {
            return (status, answer);
        }
        let wait_ms = serde_json::from_str::<serde_json::Value>(&answer)
            .ok()
            .and_then(|v| v["retry_after_ms"].as_u64())
            .unwrap_or(250)
            .clamp(50, 1_000);
        std::thread::sleep(Duration::from_millis(wait_ms));
    }
}

/// How long a set-up request is retried.
const SETUP_RETRY_MAX: Duration = Duration::from_secs(30);

fn scrape(addr: SocketAddr) -> String {
    http_once(addr, "GET", "/metrics", None, "").1
}

/// The server a scenario drives: in-process on a temporary data directory, or `--target`.
struct Target {
    server: Option<RunningServer>,
    /// The load generator's own log stream on JetStream (URL, name), deleted at `stop`.
    nats_stream: Option<(String, String)>,
    addr: SocketAddr,
    admin_key: String,
    issuer_key: String,
    gateway_key: String,
    /// The in-process server's data directory (None with --target).
    data_dir: Option<PathBuf>,
    _temp: tempfile::TempDir,
}

impl Target {
    fn new(args: &LoadgenArgs) -> Result<Target, LoadgenError> {
        Target::with(args, |_| {})
    }

    /// As `new`, with a change to the in-process server's config (ignored with --target).
    fn with(args: &LoadgenArgs, tweak: impl FnOnce(&mut Config)) -> Result<Target, LoadgenError> {
        let temp = tempfile::tempdir()?;
        if let Some(url) = &args.target {
            let hostport = url.trim_start_matches("http://").trim_end_matches('/');
            let addr: SocketAddr = hostport.parse().map_err(|_| {
                LoadgenError::Usage(format!("--target must be http://IP:PORT, got {url}"))
            })?;
            // Each scenario checks for the keys it needs (`Target::require`).
            return Ok(Target {
                server: None,
                nats_stream: None,
                addr,
                admin_key: args.admin_key.clone().unwrap_or_default(),
                issuer_key: args.issuer_key.clone().unwrap_or_default(),
                gateway_key: args.gateway_key.clone().unwrap_or_default(),
                data_dir: None,
                _temp: temp,
            });
        }
        let mut config = match &args.config {
            Some(path) => {
                Config::from_file(path).map_err(|e| LoadgenError::Usage(e.to_string()))?
            }
            None => Config::default(),
        };
        config.data_dir = args
            .data_dir
            .clone()
            .unwrap_or_else(|| temp.path().to_path_buf());
        config.server.addr = "127.0.0.1:0".into();
        config.server.workers = args.server_workers;
        let nats_stream = match args.nats()? {
            Some((url, durability)) => {
                config.store.url = url.clone();
                config.store.replicas = durability.replicas;
                config.store.single_replica_synced = durability.single_replica_synced;
                // Fresh names and subjects; the load-test engine's stream follows them
                // (`<stream>_LOAD_TEST` on `<prefix>lt.>`) and is deleted with the run's.
                let (stream, prefix) = jetstream::fresh_names("SERVER");
                config.store.stream = stream;
                config.store.subject_prefix = prefix;
                jetstream::wait_ready(&url, durability.replicas)?;
                Some((url, config.store.stream.clone()))
            }
            None => None,
        };
        tweak(&mut config);
        let key = |role: &str| format!("loadgen-{role}-{}", hex::encode(rand::random::<[u8; 8]>()));
        let (admin_key, issuer_key, gateway_key) = (key("admin"), key("issuer"), key("gateway"));
        config.auth = AuthConfig {
            admin_key: Some(admin_key.clone()),
            issuer_key: Some(issuer_key.clone()),
            gateway_key: Some(gateway_key.clone()),
            token_secret: Some(key("secret")),
        };
        let data_dir = Some(config.data_dir.clone());
        let server = match RunningServer::start(config, Arc::new(SystemClock)) {
            Ok(server) => server,
            Err(e) => {
                if let Some((url, name)) = &nats_stream {
                    let _ = jetstream::delete_stream(url, name);
                    let _ = jetstream::delete_stream(url, &format!("{name}_LOAD_TEST"));
                }
                return Err(e.into());
            }
        };
        let addr: SocketAddr = ([127, 0, 0, 1], server.port).into();
        Ok(Target {
            server: Some(server),
            nats_stream,
            addr,
            admin_key,
            issuer_key,
            gateway_key,
            data_dir,
            _temp: temp,
        })
    }

    /// Fails with a clear message if a key a scenario needs was not given for --target.
    fn require(&self, admin: bool, issuer: bool, gateway: bool) -> Result<(), LoadgenError> {
        let missing: Vec<&str> = [
            (
                admin && self.admin_key.is_empty(),
                "--admin-key (or HONGBAO_ADMIN_KEY)",
            ),
            (
                issuer && self.issuer_key.is_empty(),
                "--issuer-key (or HONGBAO_ISSUER_KEY)",
            ),
            (
                gateway && self.gateway_key.is_empty(),
                "--gateway-key (or HONGBAO_GATEWAY_KEY)",
            ),
        ]
        .into_iter()
        .filter_map(|(missing, flag)| missing.then_some(flag))
        .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(LoadgenError::Usage(format!(
                "--target needs {}",
                missing.join(", ")
            )))
        }
    }

    fn stop(self) -> Result<(), LoadgenError> {
        if let Some(server) = self.server {
            server.stop().map_err(LoadgenError::Usage)?;
        }
        if let Some((url, name)) = &self.nats_stream {
            jetstream::delete_stream(url, name)?;
            // Absent when the load-test engine is off or did not start.
            let _ = jetstream::delete_stream(url, &format!("{name}_LOAD_TEST"));
        }
        Ok(())
    }
}

/// Prints the journal's batching between two scrapes of /metrics.
fn journal_line(before: &str, after: &str, seconds: f64) {
    let delta = |name: &str| metric_value(after, name) - metric_value(before, name);
    let batches = delta("hongbao_journal_batch_events_count");
    if batches > 0.0 {
        println!(
            "{:<10} journal: {:.1} events/flush, mean flush {:.3} ms, {:.0} flushes/s, {:.0} events/s",
            "",
            delta("hongbao_journal_batch_events_sum") / batches,
            delta("hongbao_journal_flush_seconds_sum") * 1000.0 / batches,
            batches / seconds,
            delta("hongbao_journal_batch_events_sum") / seconds,
        );
    }
}

/// The wallet the `n`th deposit of connection `c` in interval `part` goes to: the connection's
/// own (`lg<c>`), or with `wallets` > 0 a pseudo-random one of that many (`lgw<i>`), the same
/// for the same (part, c, n) in every run. Each interval of a long run (`--sustain`) counts its
/// requests from 0 again, so the interval is part of the mix: without it every interval went
/// to the same wallets (a 1.5-million-deposit run over "a million wallets" touched 205,000).
fn deposit_wallet(wallets: u64, part: usize, c: usize, n: u64) -> String {
    if wallets == 0 {
        return format!("lg{c}");
    }
    let mixed = (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ n.wrapping_add(1).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ (part as u64)
            .wrapping_add(1)
            .wrapping_mul(0x1656_67B1_9E37_79F9);
    let mixed = mixed ^ (mixed >> 29);
    let mixed = mixed.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    format!("lgw{}", (mixed ^ (mixed >> 32)) % wallets)
}

/// Deposits of 1.00 yuan, each a new order id (`lg-<run>-<part>-<c>-<n>`), to
/// [`deposit_wallet`].
fn deposit_requests(
    addr: SocketAddr,
    key: String,
    wallets: u64,
    run_id: u32,
    part: usize,
) -> RequestFactory {
    Arc::new(move |c, n| {
        post_json(
            addr,
            &format!(
                "/v1/wallets/{}/change/deposits",
                deposit_wallet(wallets, part, c, n)
            ),
            Some(&key),
            format!("{{\"order_id\":\"lg-{run_id}-{part}-{c}-{n}\",\"amount\":100}}"),
        )
    })
}

fn deposits(args: &LoadgenArgs) -> Result<(), LoadgenError> {
    let target = Target::new(args)?;
    target.require(true, false, false)?;
    let (addr, key) = (target.addr, target.admin_key.clone());
    let run_id: u32 = rand::random();
    if let Some(events) = args.sustain {
        sustain(args, &target, events, run_id)?;
        return target.stop();
    }
    header();
    for &in_flight in &args.in_flight {
        let make = deposit_requests(addr, key.clone(), args.wallets, run_id, 0);
        let before = scrape(addr);
        let result = drive(args, addr, in_flight, make)?;
        let after = scrape(addr);
        let baseline = if args.no_baseline {
            None
        } else {
            Some(hello_run(args, in_flight)?)
        };
        row("deposits", &result, baseline.as_ref());
        journal_line(&before, &after, (args.duration_s + args.warmup_s) as f64);
        if !args.no_baseline {
            healthz_line(args, addr, in_flight, &result)?;
        }
    }
    target.stop()
}

/// The same server's `/healthz` at the same concurrency through the same client (its own HTTP
/// stack, routing and middleware, no store), and the deposits' share of it.
fn healthz_line(
    args: &LoadgenArgs,
    addr: SocketAddr,
    in_flight: usize,
    deposits: &RunResult,
) -> Result<(), LoadgenError> {
    let make: RequestFactory = Arc::new(move |_, _| client::get(addr, "/healthz"));
    let healthz = drive(args, addr, in_flight, make)?;
    println!(
        "{:<10} healthz on the same server: {:.0} req/s, p99 {:.2} ms; deposits/healthz {:.2}",
        "",
        healthz.per_second(),
        healthz.quantile_ms(0.99),
        deposits.per_second() / healthz.per_second().max(1e-9)
    );
    Ok(())
}

/// `deposits --sustain`: intervals of --duration-s at the first --in-flight until `events`
/// deposits are accepted; a row per interval, and the baselines' rows after it.
fn sustain(
    args: &LoadgenArgs,
    target: &Target,
    events: u64,
    run_id: u32,
) -> Result<(), LoadgenError> {
    let in_flight = args.in_flight.first().copied().unwrap_or(256);
    let interval = Duration::from_secs(args.duration_s.max(1));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()?;
    let mut ledgers = Vec::new();
    if !args.no_baseline {
        for &backend in &args.backends {
            let opened = runtime.block_on(ledger::Ledger::open(
                backend,
                &args.postgres_url,
                &args.redis_url,
                args.pool,
                run_id,
            ));
            match opened {
                Ok(Some(ledger)) => ledgers.push((backend, Arc::new(ledger))),
                Ok(None) => {}
                Err(e) => {
                    return Err(LoadgenError::Usage(format!(
                    "the {} baseline: {e} (--no-baseline or --backends hongbao to run without it)",
                    backend.name()
                )))
                }
            }
        }
        let hello = hello_run(args, in_flight)?;
        println!(
            "baseline hello world at {in_flight} in flight: {:.0} req/s, p99 {:.2} ms (start)",
            hello.per_second(),
            hello.quantile_ms(0.99)
        );
    }
    println!(
        "{:<14} {:>7} {:>11} {:>10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}",
        "sustain",
        "t_s",
        "events",
        "per_s",
        "p50_ms",
        "p99_ms",
        "errors",
        "rss_mb",
        "disk_mb",
        "B/event"
    );
    let baseline_row = |name: &str, elapsed: Duration, rows: String, result: &RunResult| {
        println!(
            "{:<14} {:>7.0} {:>11} {:>10.0} {:>8.2} {:>8.2} {:>8} {:>8} {:>9} {:>9}",
            name,
            elapsed.as_secs_f64(),
            rows,
            result.per_second(),
            result.quantile_ms(0.50),
            result.quantile_ms(0.99),
            result.requests - result.ok(),
            "-",
            "-",
            "-"
        );
    };
    let started = Instant::now();
    let (mut accepted, mut part) = (0u64, 0usize);
    let wallets = args.wallets;
    while accepted < events {
        part += 1;
        let make = deposit_requests(
            target.addr,
            target.admin_key.clone(),
            args.wallets,
            run_id,
            part,
        );
        let warmup = if part == 1 {
            Duration::from_secs(args.warmup_s)
        } else {
            Duration::ZERO
        };
        let result = client::drive(
            target.addr,
            in_flight,
            warmup,
            interval,
            args.client_threads,
            make,
        )?;
        accepted += result.ok();
        let disk = target.data_dir.as_deref().map(dir_bytes);
        let mb = megabytes;
        println!(
            "{:<14} {:>7.0} {:>11} {:>10.0} {:>8.2} {:>8.2} {:>8} {:>8} {:>9} {:>9}",
            "sustain",
            started.elapsed().as_secs_f64(),
            accepted,
            result.per_second(),
            result.quantile_ms(0.50),
            result.quantile_ms(0.99),
            result.requests - result.ok(),
            mb(target.server.as_ref().and_then(|_| resident_bytes())),
            mb(disk),
            disk.map_or("-".into(), |b| format!(
                "{:.0}",
                b as f64 / accepted.max(1) as f64
            )),
        );
        if args.no_baseline {
            continue;
        }
        let addr = target.addr;
        let make: RequestFactory = Arc::new(move |_, _| client::get(addr, "/healthz"));
        let healthz = client::drive(
            addr,
            in_flight,
            Duration::ZERO,
            interval,
            args.client_threads,
            make,
        )?;
        baseline_row("  healthz", started.elapsed(), "-".into(), &healthz);
        for (backend, ledger) in &ledgers {
            let wallet: Arc<dyn Fn(usize, u64) -> String + Send + Sync> =
                Arc::new(move |c, n| deposit_wallet(wallets, part, c, n));
            let tag = format!("lg-{run_id}-{part}");
            let run = ledger::interval(ledger.clone(), in_flight, interval, tag, wallet);
            let result = runtime
                .block_on(ledger.durably(run))
                .map_err(|e| LoadgenError::Usage(format!("{}: {e}", backend.name())))?;
            let lines = runtime
                .block_on(ledger.lines())
                .map_or("-".into(), |n| n.to_string());
            baseline_row(
                &format!("  {}", backend.name()),
                started.elapsed(),
                lines,
                &result,
            );
        }
    }
    if !args.no_baseline {
        let hello = hello_run(args, in_flight)?;
        println!(
            "baseline hello world at {in_flight} in flight: {:.0} req/s, p99 {:.2} ms (end)",
            hello.per_second(),
            hello.quantile_ms(0.99)
        );
    }
    for (backend, ledger) in &ledgers {
        if let Err(e) = runtime.block_on(ledger.clean()) {
            eprintln!("cleaning the {} baseline's keys: {e}", backend.name());
        }
    }
    Ok(())
}

/// Bytes as whole megabytes for a table column, `-` when unknown.
fn megabytes(bytes: Option<u64>) -> String {
    bytes.map_or("-".into(), |b| format!("{:.0}", b as f64 / 1e6))
}

/// This process's resident memory (Linux), the in-process server's and the load generator's.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

/// Bytes of the files under `dir` (what the data directory takes on disk, allocated or not).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_bytes(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

/// One row of the journal table: the journal at one in-flight and the raw figure beside it
/// (raw sled at the journal's batch size, or raw JetStream publishing at the same in-flight).
#[derive(Debug, Clone)]
pub struct JournalRow {
    pub journal: journal::JournalRun,
    pub raw_per_second: f64,
}

/// The journal scenario: prints its tables and returns its rows.
pub fn journal_table(args: &LoadgenArgs) -> Result<Vec<JournalRow>, LoadgenError> {
    let base = match &args.data_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            tempfile::tempdir_in(dir)?
        }
        None => tempfile::tempdir()?,
    };
    if let Some((url, durability)) = args.nats()? {
        return journal_jetstream(args, base.path(), &url, durability);
    }
    let warmup = Duration::from_secs(args.warmup_s);
    let duration = Duration::from_secs(args.duration_s);
    println!(
        "{:<10} {:>9} {:>10} {:>10} {:>8} {:>8} {:>7} {:>8} {:>14} {:>7} {:>14} {:>7}",
        "scenario",
        "in_flight",
        "events",
        "durable/s",
        "p50_ms",
        "p99_ms",
        "batch",
        "flush_ms",
        "raw@batch",
        "vs_raw",
        "raw+idx@batch",
        "vs_idx"
    );
    let mut rows = Vec::new();
    for &in_flight in &args.in_flight {
        let dir = base.path().join(format!("journal-{in_flight}"));
        let run = journal::journal_run(&dir, in_flight, warmup, duration)?;
        let batch = (run.mean_batch.round() as usize).max(1);
        let raw_dir = base.path().join(format!("raw-{in_flight}"));
        let raw = journal::raw_sled(&raw_dir, batch, run.record_bytes, false, duration)?;
        let idx_dir = base.path().join(format!("raw-index-{in_flight}"));
        let indexed = journal::raw_sled(&idx_dir, batch, run.record_bytes, true, duration)?;
        println!(
            "{:<10} {:>9} {:>10} {:>10.0} {:>8.3} {:>8.3} {:>7.1} {:>8.3} {:>14} {:>7.2} {:>14} {:>7.2}",
            "journal",
            in_flight,
            run.events,
            run.per_second,
            run.p50_ms,
            run.p99_ms,
            run.mean_batch,
            run.mean_flush_ms,
            format!("{:.0}@{}", raw.records_per_second, batch),
            run.per_second / raw.records_per_second.max(1e-9),
            format!("{:.0}@{}", indexed.records_per_second, batch),
            run.per_second / indexed.records_per_second.max(1e-9),
        );
        rows.push(JournalRow {
            journal: run,
            raw_per_second: raw.records_per_second,
        });
    }
    println!();
    println!(
        "{:<10} {:>9} {:>14} {:>14}",
        "raw sled", "batch", "records/s", "flush_p50_ms"
    );
    for batch in [1usize, 16, 256, 1024] {
        let raw = journal::raw_sled(
            &base.path().join(format!("raw-fixed-{batch}")),
            batch,
            170,
            false,
            duration,
        )?;
        println!(
            "{:<10} {:>9} {:>14.0} {:>14.3}",
            "raw", batch, raw.records_per_second, raw.flush_p50_ms
        );
    }
    Ok(rows)
}

/// The journal on JetStream beside raw JetStream publishing at the same in-flight, then the
/// writer's batch patterns without hongbao at the journal's observed batch size.
fn journal_jetstream(
    args: &LoadgenArgs,
    base: &std::path::Path,
    url: &str,
    durability: Durability,
) -> Result<Vec<JournalRow>, LoadgenError> {
    if args.batch_depth.contains(&0) {
        return Err(LoadgenError::Usage(
            "--batch-depth values must be positive".into(),
        ));
    }
    let warmup = Duration::from_secs(args.warmup_s);
    let duration = Duration::from_secs(args.duration_s);
    let version = jetstream::wait_ready(url, durability.replicas)?;
    println!(
        "journal on JetStream at {url}: nats-server {version}, {}",
        durability.describe()
    );
    println!(
        "{:<10} {:>9} {:>9} {:>10} {:>8} {:>8} {:>7} {:>8} {:>6} {:>6} {:>9} {:>8} {:>8} {:>6} {:>7}",
        "scenario",
        "in_flight",
        "events",
        "durable/s",
        "p50_ms",
        "p99_ms",
        "batch",
        "flush_ms",
        "bytes",
        "failed",
        "raw/s",
        "raw_p50",
        "raw_p99",
        "errors",
        "vs_raw"
    );
    let mut rows = Vec::new();
    for &in_flight in &args.in_flight {
        let dir = base.join(format!("journal-{in_flight}"));
        let run = jetstream::journal_run(url, durability, &dir, in_flight, warmup, duration)?;
        let raw = jetstream::raw_publish(
            url,
            durability.replicas,
            in_flight,
            run.record_bytes,
            warmup,
            duration,
        )?;
        println!(
            "{:<10} {:>9} {:>9} {:>10.0} {:>8.3} {:>8.3} {:>7.1} {:>8.3} {:>6} {:>6} {:>9.0} {:>8.3} {:>8.3} {:>6} {:>7.2}",
            "journal",
            in_flight,
            run.events,
            run.per_second,
            run.p50_ms,
            run.p99_ms,
            run.mean_batch,
            run.mean_flush_ms,
            run.record_bytes,
            run.failed,
            raw.per_second,
            raw.p50_ms,
            raw.p99_ms,
            raw.errors,
            run.per_second / raw.per_second.max(1e-9),
        );
        rows.push(JournalRow {
            journal: run,
            raw_per_second: raw.per_second,
        });
    }
    if args.batch_depth.is_empty() {
        return Ok(rows);
    }
    println!();
    println!(
        "raw batches at the journal's mean batch (no hongbao logic); latency of a whole batch"
    );
    println!(
        "{:<10} {:>9} {:>7} {:>6} {:>10} {:>8} {:>8} {:>10} {:>8} {:>8}",
        "raw",
        "in_flight",
        "batch",
        "depth",
        "fenced/s",
        "p50_ms",
        "p99_ms",
        "atomic/s",
        "p50_ms",
        "p99_ms"
    );
    for row in &rows {
        let batch = (row.journal.mean_batch.round() as usize).max(1);
        for &depth in &args.batch_depth {
            let bytes = row.journal.record_bytes;
            // A failed figure (no ack in time on a busy disk) is reported, not fatal.
            let figure = |mode| {
                let r = durability.replicas;
                match jetstream::raw_batches(url, r, mode, batch, depth, bytes, duration) {
                    Ok(f) => (
                        format!("{:.0}", f.per_second),
                        format!("{:.3}", f.p50_ms),
                        format!("{:.3}", f.p99_ms),
                    ),
                    Err(e) => {
                        println!("{:<10} {mode:?} batches failed: {e}", "");
                        ("failed".into(), "-".into(), "-".into())
                    }
                }
            };
            let fenced = figure(jetstream::BatchMode::Fenced);
            let atomic = figure(jetstream::BatchMode::Atomic);
            println!(
                "{:<10} {:>9} {:>7} {:>6} {:>10} {:>8} {:>8} {:>10} {:>8} {:>8}",
                "raw",
                row.journal.in_flight,
                batch,
                depth,
                fenced.0,
                fenced.1,
                fenced.2,
                atomic.0,
                atomic.1,
                atomic.2,
            );
        }
    }
    Ok(rows)
}

fn rewards(args: &LoadgenArgs) -> Result<(), LoadgenError> {
    let target = Target::new(args)?;
    target.require(true, true, false)?;
    let addr = target.addr;
    let activity = format!("lg{}", rand::random::<u32>());
    // A budget far above what a run can accept: the budget check runs on every reward.
    let (status, body) = http_setup(
        addr,
        "PUT",
        &format!("/v1/admin/activities/{activity}/budget"),
        Some(&target.admin_key),
        r#"{"cash":1000000000000000,"subsidy":0}"#,
    );
    if status != 200 {
        return Err(LoadgenError::Usage(format!(
            "setting the budget failed: {status} {body}"
        )));
    }
    println!(
        "{:<8} {:>9} {:>9} {:>10} {:>8} {:>8} {:>8} {:>10} {:>6} {:>11} {:>9} {:>9} {:>11}",
        "rewards",
        "in_flight",
        "accepted",
        "accepted/s",
        "p50_ms",
        "p99_ms",
        "p999_ms",
        "hello/s",
        "ratio",
        "credited/s",
        "backlog",
        "drain_s",
        "drain/s"
    );
    // Credits counted on the target and, on a cluster, on every node of --fleet (the lanes run
    // on the holder of the activity's partition).
    let counted = counted_addrs(addr, args)?;
    let fleet_sum = |name: &str| fleet_metric(&counted, name);
    let credited_now = || fleet_sum("hongbao_rewards_credited_total{kind=\"cash\",path=\"lane\"}");
    let accepted_now = || fleet_sum("hongbao_rewards_accepted_total{kind=\"cash\"}");
    let run_id: u32 = rand::random();
    for &in_flight in &args.in_flight {
        let key = target.issuer_key.clone();
        let activity = activity.clone();
        // Each reward for a different user, as in a red-packet rain: 200,000 users.
        let make: RequestFactory = Arc::new(move |c, n| {
            let user = (c as u64 * 1_000_003 + n) % 200_000;
            post_json(
                addr,
                "/v1/rewards",
                Some(&key),
                format!(
                    r#"{{"order_id":"lg-{run_id}-{in_flight}-{c}-{n}","uid":"u{user}","activity_id":"{activity}","scene":"rain","kind":"cash","amount":{}}}"#,
                    n % 500 + 1
                ),
            )
        });
        let set_lanes = |on: bool| {
            let body = format!(r#"{{"on":{on}}}"#);
            http_setup(
                addr,
                "PUT",
                "/v1/admin/switches/reward_lanes",
                Some(&target.admin_key),
                &body,
            )
        };
        if args.pause_lanes {
            set_lanes(false);
        }
        let before = scrape(addr);
        let (credited_before, accepted_before) = (credited_now(), accepted_now());
        let started = std::time::Instant::now();
        let result = drive(args, addr, in_flight, make)?;
        let run_s = started.elapsed().as_secs_f64();
        let after = scrape(addr);
        let credited_in_run = credited_now() - credited_before;
        // Every reward accepted since the run began, the warm-up's too.
        let accepted = accepted_now() - accepted_before;
        let backlog = (accepted - credited_in_run).max(0.0);
        // Let the lanes drain the backlog before the next run (and measure how long it takes):
        // until every reward accepted in the run is credited.
        if args.pause_lanes {
            set_lanes(true);
        }
        let drain_started = std::time::Instant::now();
        let mut credited_total = credited_in_run;
        while credited_total < accepted && drain_started.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(50));
            credited_total = credited_now() - credited_before;
        }
        let drain_s = drain_started.elapsed().as_secs_f64();
        // Rewards counted in `credited_in_run` were credited before the drain began.
        let baseline = if args.no_baseline {
            None
        } else {
            Some(hello_run(args, in_flight)?)
        };
        let (hello, ratio) = match &baseline {
            Some(b) => (
                format!("{:.0}", b.per_second()),
                format!("{:.2}", result.per_second() / b.per_second().max(1e-9)),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<8} {:>9} {:>9} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>10} {:>6} {:>11.0} {:>9.0} {:>9.2} {:>11.0}",
            "rewards",
            in_flight,
            result.ok(),
            result.per_second(),
            result.quantile_ms(0.5),
            result.quantile_ms(0.99),
            result.quantile_ms(0.999),
            hello,
            ratio,
            credited_in_run / run_s,
            backlog,
            drain_s,
            // Crediting alone, intake stopped: the lanes' capacity with no limit binding.
            (credited_total - credited_in_run) / drain_s.max(1e-9)
        );
        journal_line(&before, &after, run_s);
        let errors: Vec<String> = result
            .statuses
            .iter()
            .filter(|(s, _)| !(200..300).contains(*s))
            .map(|(s, n)| format!("{n}x{s}"))
            .collect();
        if !errors.is_empty() {
            println!("{:<8} non-2xx: {}", "", errors.join(", "));
        }
    }
    target.stop()
}

/// Seeds `users` users with a funded activity balance and a bound bank method (W13), in
/// parallel over a few threads. Returns the method ids by user index.
fn seed_users(
    target: &Target,
    counted: &[SocketAddr],
    users: usize,
    funding_fen: u64,
) -> Result<Vec<String>, LoadgenError> {
    let threads = 8.min(users.max(1));
    let addr = target.addr;
    let (issuer, gateway) = (target.issuer_key.clone(), target.gateway_key.clone());
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (issuer, gateway) = (issuer.clone(), gateway.clone());
            std::thread::spawn(move || -> Result<Vec<(usize, String)>, String> {
                let mut methods = Vec::new();
                for u in (t..users).step_by(threads) {
                    let reward = format!(
                        r#"{{"order_id":"seed-{u}","uid":"lw{u}","activity_id":"loadgen-seed","scene":"seed","kind":"cash","amount":{funding_fen}}}"#
                    );
                    let (status, body) = http_setup(addr, "POST", "/v1/rewards", Some(&issuer), &reward);
                    if status != 202 {
                        return Err(format!("seeding reward for lw{u}: {status} {body}"));
                    }
                    let bind = format!(r#"{{"kind":"bank","account":"6222-{u}"}}"#);
                    let (status, body) = http_setup(addr, "POST", &format!("/v1/wallets/lw{u}/payout-methods"), Some(&gateway), &bind);
                    let method = serde_json::from_str::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v["method_id"].as_str().map(str::to_owned))
                        .filter(|_| matches!(status, 200 | 201))
                        .ok_or_else(|| format!("binding a method for lw{u}: {status} {body}"))?;
                    methods.push((u, method));
                }
                Ok(methods)
            })
        })
        .collect();
    let mut methods = vec![String::new(); users];
    for handle in handles {
        let seeded = handle
            .join()
            .map_err(|_| LoadgenError::Usage("seeding thread panicked".into()))?;
        for (u, method) in seeded.map_err(LoadgenError::Usage)? {
            methods[u] = method;
        }
    }
    // Wait until the crediting lanes have credited every seed reward.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while fleet_metric(counted, "hongbao_reward_pending{kind=\"cash\"}") > 0.0 {
        if std::time::Instant::now() > deadline {
            return Err(LoadgenError::Usage(
                "seed rewards not credited within 2 minutes".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(methods)
}

fn withdrawals(args: &LoadgenArgs) -> Result<(), LoadgenError> {
    let target = Target::new(args)?;
    target.require(false, true, true)?;
    let addr = target.addr;
    let users = args.users.max(1);
    let seeding = std::time::Instant::now();
    // Enough for every run to withdraw 100 fen per request without running dry.
    // Orders are counted on the target and, on a cluster, on every node of --fleet (an order's
    // lane runs on the holder of its partition).
    let counted = counted_addrs(addr, args)?;
    let methods = Arc::new(seed_users(&target, &counted, users, 10_000_000)?);
    println!(
        "seeded {users} users (balance + bank method) in {:.1} s",
        seeding.elapsed().as_secs_f64()
    );
    println!(
        "{:<11} {:>9} {:>9} {:>10} {:>8} {:>8} {:>8} {:>10} {:>6} {:>9} {:>9}",
        "withdrawals",
        "in_flight",
        "accepted",
        "accepted/s",
        "p50_ms",
        "p99_ms",
        "p999_ms",
        "hello/s",
        "ratio",
        "drain_s",
        "paid/s"
    );
    let succeeded = || fleet_metric(&counted, "hongbao_withdrawals_total{state=\"succeeded\"}");
    let requested = || fleet_metric(&counted, "hongbao_withdrawals_total{state=\"requested\"}");
    let run_id: u32 = rand::random();
    for &in_flight in &args.in_flight {
        let (key, methods) = (target.gateway_key.clone(), methods.clone());
        let make: RequestFactory = Arc::new(move |c, n| {
            let u = (c * 7919 + n as usize) % methods.len();
            post_json(
                addr,
                &format!("/v1/wallets/lw{u}/withdrawals"),
                Some(&key),
                format!(
                    r#"{{"order_id":"lw-{run_id}-{in_flight}-{c}-{n}","amount":100,"method_id":"{}"}}"#,
                    methods[u]
                ),
            )
        });
        let (succeeded_before, requested_before) = (succeeded(), requested());
        let run_started = std::time::Instant::now();
        let result = drive(args, addr, in_flight, make)?;
        let run_s = run_started.elapsed().as_secs_f64();
        // Every order accepted in the run (warm-up included) must end final.
        let started = std::time::Instant::now();
        let accepted_all = requested() - requested_before;
        let mut paid = succeeded() - succeeded_before;
        while paid < accepted_all && started.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(50));
            paid = succeeded() - succeeded_before;
        }
        let final_s = started.elapsed().as_secs_f64();
        let baseline = if args.no_baseline {
            None
        } else {
            Some(hello_run(args, in_flight)?)
        };
        let (hello, ratio) = match &baseline {
            Some(b) => (
                format!("{:.0}", b.per_second()),
                format!("{:.2}", result.per_second() / b.per_second().max(1e-9)),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<11} {:>9} {:>9} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>10} {:>6} {:>9.2} {:>9.0}",
            "withdrawals",
            in_flight,
            result.ok(),
            result.per_second(),
            result.quantile_ms(0.5),
            result.quantile_ms(0.99),
            result.quantile_ms(0.999),
            hello,
            ratio,
            final_s,
            // Payouts made during the run and the drain, over that whole time.
            paid / (run_s + final_s),
        );
        if paid < accepted_all {
            println!(
                "{:<11} {} of {} orders not succeeded after the drain",
                "",
                accepted_all - paid,
                accepted_all
            );
        }
    }
    target.stop()
}

/// Where a scenario's flows are counted: the target, and on a cluster every node of --fleet
/// (a flow runs on the holder of its entity's partition, wherever that is).
fn counted_addrs(target: SocketAddr, args: &LoadgenArgs) -> Result<Vec<SocketAddr>, LoadgenError> {
    std::iter::once(Ok(target))
        .chain(args.fleet.iter().map(|url| fleet_addr(url)))
        .collect()
}

/// A metric summed over `addrs` (see [`metric_value`] for the series it sums).
fn fleet_metric(addrs: &[SocketAddr], name: &str) -> f64 {
    addrs.iter().map(|a| metric_value(&scrape(*a), name)).sum()
}

/// The address of a `--fleet` node (`http://IP:PORT`).
fn fleet_addr(url: &str) -> Result<SocketAddr, LoadgenError> {
    url.strip_prefix("http://")
        .unwrap_or(url)
        .trim_end_matches('/')
        .parse()
        .map_err(|_| LoadgenError::Usage(format!("--fleet takes http://IP:PORT, got {url}")))
}

/// Creates and pays a C2C packet of `shares` lucky shares on hongbao.
fn hongbao_packet(target: &Target, packet: &str, shares: u32) -> Result<(), LoadgenError> {
    let total = u64::from(shares) * packets::SHARE_MEAN_FEN;
    let steps = [
        (
            "/v1/wallets/lg-sender/change/deposits".to_string(),
            target.admin_key.as_str(),
            format!(r#"{{"order_id":"fund-{packet}","amount":{total}}}"#),
            201,
        ),
        (
            "/v1/packets".to_string(),
            target.gateway_key.as_str(),
            format!(
                r#"{{"packet_id":"{packet}","sender_uid":"lg-sender","mode":"c2c","total":{total},"count":{shares},"split":"lucky"}}"#
            ),
            201,
        ),
        (
            format!("/v1/packets/{packet}/pay"),
            target.gateway_key.as_str(),
            format!(r#"{{"payment_id":"pay-{packet}"}}"#),
            200,
        ),
    ];
    for (path, key, body, expected) in steps {
        let (status, answer) = http_setup(target.addr, "POST", &path, Some(key), &body);
        if status != expected {
            return Err(LoadgenError::Usage(format!(
                "POST {path}: {status} {answer}"
            )));
        }
    }
    Ok(())
}

/// Says how durable an acknowledged claim is on a backend.
fn durability(
    runtime: &tokio::runtime::Runtime,
    backend: packets::Backend,
    claimer: &packets::Claimer,
) -> String {
    use packets::Backend;
    match backend {
        Backend::Hongbao => "yes: journal flushed before the answer".into(),
        Backend::Postgres => {
            let sync = runtime.block_on(packets::pg_setting(claimer, "synchronous_commit"));
            let fsync = runtime.block_on(packets::pg_setting(claimer, "fsync"));
            match (sync, fsync) {
                (Ok(s), Ok(f)) if s == "on" && f == "on" => {
                    "yes: synchronous_commit=on, fsync=on".into()
                }
                (s, f) => format!("NO: synchronous_commit={s:?}, fsync={f:?}"),
            }
        }
        Backend::Redis | Backend::RedisAlways => {
            let aof = runtime
                .block_on(packets::redis_config(claimer, "appendonly"))
                .unwrap_or_default();
            let fsync = runtime
                .block_on(packets::redis_config(claimer, "appendfsync"))
                .unwrap_or_default();
            match (aof.as_str(), fsync.as_str()) {
                ("yes", "always") => "yes: appendonly yes, appendfsync always".into(),
                ("yes", other) => format!("NO: appendonly yes, appendfsync {other}"),
                _ => "NO: appendonly no (memory only)".into(),
            }
        }
    }
}

/// The hot-packet comparison: hongbao and the textbook designs, one table.
fn hot_packet(args: &LoadgenArgs) -> Result<(), LoadgenError> {
    use packets::{Backend, Claimer};
    if args.shares == 0 || args.shares > crate::domain::packet::SHARES_MAX {
        return Err(LoadgenError::Usage(format!(
            "--shares must be 1 to {}",
            crate::domain::packet::SHARES_MAX
        )));
    }
    if args.pool == 0 || args.clients == 0 || args.rounds == 0 {
        return Err(LoadgenError::Usage(
            "--pool, --clients and --rounds must be positive".into(),
        ));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()?;
    let total = u64::from(args.shares) * packets::SHARE_MEAN_FEN;
    println!(
        "one hot packet of {} shares ({} fen), {} clients, pools of {} connections",
        args.shares, total, args.clients, args.pool
    );
    println!(
        "{:<13} {:>5} {:>7} {:>9} {:>8} {:>8} {:>8} {:>6} {:>8} {:>10}  durable",
        "backend",
        "round",
        "claims",
        "claims/s",
        "p50_ms",
        "p99_ms",
        "p999_ms",
        "busy",
        "errors",
        "transfer_s"
    );
    let run_id: u32 = rand::random();
    let mut failed = Vec::new();
    for &backend in &args.backends {
        let target = match backend {
            Backend::Hongbao => {
                let target = Target::new(args)?;
                target.require(true, false, true)?;
                Some(target)
            }
            _ => None,
        };
        let claimer = runtime.block_on(async {
            match (backend, &target) {
                (Backend::Hongbao, Some(t)) => {
                    Claimer::http(t.addr, t.gateway_key.clone(), args.pool).await
                }
                (Backend::Postgres, _) => Claimer::postgres(&args.postgres_url, args.pool).await,
                _ => Claimer::redis(&args.redis_url, args.pool).await,
            }
        })?;
        let claimer = Arc::new(claimer);
        runtime.block_on(packets::reset_baseline(&claimer))?;
        // redis-always: durable settings for the run, the server's own restored after.
        let restore = if backend == Backend::RedisAlways {
            let before = (
                runtime.block_on(packets::redis_config(&claimer, "appendonly"))?,
                runtime.block_on(packets::redis_config(&claimer, "appendfsync"))?,
            );
            runtime.block_on(packets::redis_set_config(&claimer, "appendonly", "yes"))?;
            runtime.block_on(packets::redis_set_config(&claimer, "appendfsync", "always"))?;
            Some(before)
        } else {
            None
        };
        let durable = durability(&runtime, backend, &claimer);
        // Where packet transfers are counted: the target, and on a cluster every other node.
        let counted = match &target {
            Some(t) => counted_addrs(t.addr, args)?,
            None => Vec::new(),
        };
        let transfers = || fleet_metric(&counted, "hongbao_packet_transfers_total");
        for r in 0..args.rounds {
            let packet = format!("lg-{run_id}-{}-{r}", backend.name());
            let transfers_before = target.as_ref().map(|t| (scrape(t.addr), transfers()));
            match &target {
                Some(t) => hongbao_packet(t, &packet, args.shares)?,
                None => runtime.block_on(packets::prepare_baseline(
                    &claimer,
                    &packet,
                    args.shares,
                    u64::from(run_id) + u64::from(r),
                ))?,
            }
            let result = runtime.block_on(packets::round(claimer.clone(), &packet, args.clients));
            // hongbao moves each share from escrow to its winner after the answer: how long
            // until every transfer of the round is done.
            let transfer_s = match &transfers_before {
                Some((_, before)) => {
                    let started = std::time::Instant::now();
                    let goal = before + f64::from(args.shares);
                    while transfers() < goal && started.elapsed() < Duration::from_secs(120) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    format!(
                        "{:.2}",
                        result.claiming.as_secs_f64() + started.elapsed().as_secs_f64()
                    )
                }
                _ => "-".into(),
            };
            println!(
                "{:<13} {:>5} {:>7} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>6} {:>8} {:>10}  {}",
                backend.name(),
                r + 1,
                result.wins,
                result.claims_per_second(),
                result.quantile_ms(0.5),
                result.quantile_ms(0.99),
                result.quantile_ms(0.999),
                result.busy,
                result.failures + result.gave_up,
                transfer_s,
                durable
            );
            if result.wins != u64::from(args.shares) || result.won_fen != total {
                failed.push(format!(
                    "{} round {}: {} claims won {} fen, expected {} claims and {total} fen",
                    backend.name(),
                    r + 1,
                    result.wins,
                    result.won_fen,
                    args.shares
                ));
            }
            if let (Some(t), Some((before, _))) = (&target, &transfers_before) {
                journal_line(before, &scrape(t.addr), result.claiming.as_secs_f64());
            }
            if let Some(e) = &result.first_failure {
                println!("{:<13} first error: {e}", "");
            }
        }
        if let Some((aof, fsync)) = restore {
            runtime.block_on(packets::redis_set_config(&claimer, "appendfsync", &fsync))?;
            runtime.block_on(packets::redis_set_config(&claimer, "appendonly", &aof))?;
        }
        if let Some(target) = target {
            target.stop()?;
        }
    }
    if !args.no_baseline {
        let hello = hello_run(args, args.pool)?;
        println!(
            "{:<13} hello world at {} connections: {:.0} req/s, p99 {:.2} ms",
            "baseline",
            args.pool,
            hello.per_second(),
            hello.quantile_ms(0.99)
        );
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(LoadgenError::Usage(format!(
            "wrong outcomes:\n{}",
            failed.join("\n")
        )))
    }
}

/// Runs a scenario and prints its table.
pub fn run(args: LoadgenArgs) -> Result<(), LoadgenError> {
    if args.in_flight.contains(&0) {
        return Err(LoadgenError::Usage(
            "--in-flight values must be positive".into(),
        ));
    }
    match args.scenario {
        Scenario::Hello => {
            header();
            for &in_flight in &args.in_flight {
                row("hello", &hello_run(&args, in_flight)?, None);
            }
            Ok(())
        }
        Scenario::Deposits => deposits(&args),
        Scenario::Rewards => rewards(&args),
        Scenario::Withdrawals => withdrawals(&args),
        Scenario::Journal => journal_table(&args).map(|_| ()),
        Scenario::Packets => hot_packet(&args),
        Scenario::Coupons => coupons::run(&args),
        Scenario::Handover => handover_table(&args),
        Scenario::Audit => audit::table(&args).map(|_| ()),
        Scenario::Soak => soak::soak(&args),
        Scenario::Campaign => campaign::campaign(&args)?.verdict(),
    }
}

fn handover_table(args: &LoadgenArgs) -> Result<(), LoadgenError> {
    let Some((url, durability)) = args.nats()? else {
        return Err(LoadgenError::Usage(
            "handover measures leases on JetStream: pass --store nats://...".into(),
        ));
    };
    let partitions = crate::cluster::partition::Partitions::new(u32::from(args.partitions))
        .map_err(|e| LoadgenError::Usage(e.to_string()))?;
    let ttl = Duration::from_millis(args.lease_ttl_ms);
    let measured = handover::run(
        &url,
        partitions,
        ttl,
        durability.replicas,
        args.nodes,
        args.kills,
    )?;
    let (kill_p50, kill_max) = handover::p50_max(&measured.after_kill);
    let (join_p50, join_max) = handover::p50_max(&measured.after_join);
    println!(
        "handover: {} nodes, {} partitions, lease TTL {} ms, {} replicas, {} kills",
        args.nodes,
        partitions.count(),
        args.lease_ttl_ms,
        durability.replicas,
        measured.after_kill.len()
    );
    println!("{:<28} {:>10} {:>10}", "", "p50 ms", "max ms");
    println!(
        "{:<28} {:>10.0} {:>10.0}",
        "kill -> partitions held", kill_p50, kill_max
    );
    println!(
        "{:<28} {:>10.0} {:>10.0}",
        "join -> fair shares", join_p50, join_max
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{deposit_wallet, metric_value};

    #[test]
    fn spread_deposits_touch_many_wallets_a_few_times_each_and_the_default_one_per_connection() {
        // Goal: `deposits --wallets N` reaches nearly every one of N wallets, none much more
        // than the others, the same wallet for the same request in every run; without it each
        // connection keeps its own wallet.
        assert_eq!(deposit_wallet(0, 2, 7, 123), "lg7");
        assert_eq!(
            deposit_wallet(1_000, 2, 3, 9),
            deposit_wallet(1_000, 2, 3, 9)
        );
        let mut counts = std::collections::HashMap::new();
        for c in 0..256 {
            for n in 0..40 {
                *counts.entry(deposit_wallet(1_000, 0, c, n)).or_insert(0u32) += 1;
            }
        }
        // 10,240 deposits over 1,000 wallets: about 10 each.
        assert!(counts.len() > 990, "{} wallets touched", counts.len());
        assert!(counts.keys().all(|w| w.starts_with("lgw")));
        assert!(
            counts.values().all(|&n| n <= 30),
            "{:?}",
            counts.values().max()
        );
    }

    #[test]
    fn the_intervals_of_a_long_run_spread_over_the_wallets_not_the_same_ones_again() {
        // Goal: `--sustain` counts each interval's requests from 0 again; its deposits must still
        // reach the whole of `--wallets`, as a campaign's night does, not repeat the first
        // interval's wallets (which touched a fifth of them).
        let mut touched = std::collections::HashSet::new();
        for part in 0..10 {
            for c in 0..256 {
                for n in 0..4 {
                    touched.insert(deposit_wallet(1_000, part, c, n));
                }
            }
        }
        // 10,240 deposits over 1,000 wallets: nearly all reached (1,024 per interval reach
        // about 640 each time, so the same 640 again would fail).
        assert!(touched.len() > 990, "{} wallets touched", touched.len());
    }

    #[test]
    fn a_metric_query_sums_every_series_carrying_its_labels() {
        // One node's series, and a cluster node's, labelled with their partitions.
        let text = "# TYPE hongbao_x counter\n\
                    hongbao_x{kind=\"cash\",path=\"lane\"} 3\n\
                    hongbao_x{kind=\"cash\",partition=\"p001\",path=\"lane\"} 4\n\
                    hongbao_x{kind=\"item\",partition=\"p002\",path=\"lane\"} 5\n\
                    hongbao_xy 7\n\
                    hongbao_y 2\n";
        assert_eq!(
            metric_value(text, "hongbao_x{kind=\"cash\",path=\"lane\"}"),
            7.0
        );
        assert_eq!(metric_value(text, "hongbao_x"), 12.0);
        assert_eq!(metric_value(text, "hongbao_y"), 2.0);
        assert_eq!(metric_value(text, "hongbao_z"), 0.0);
    }
}
