//! The `hongbao` command line. It only parses arguments and calls the library.

use anyhow::{bail, Context};

/// mimalloc: glibc malloc serialises the journal thread and the HTTP workers on its arena lock
/// when memory allocated on one thread is freed on another (measured: a third of the journal
/// thread's time in futex waits).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{Parser, Subcommand};
use hongbao::clock::SystemClock;
use hongbao::config::Config;
use hongbao::events::{open_log, Log};
use hongbao::http::Application;
use hongbao::metrics::Metrics;
use hongbao::projections::{self, Projection};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

/// `println!` that returns the write's error instead of panicking, so that a closed pipe
/// (`hongbao projections list | head`) ends the command quietly (see `main`).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

#[derive(Parser)]
#[command(
    name = "hongbao",
    version,
    about = "Event-sourced money engine for peak-traffic campaigns",
    long_about = "hongbao keeps every movement of money as an event in an append-only, \
                  hash-chained log: sled in the data directory (the default), or NATS \
                  JetStream (--store nats://...). `serve` runs the HTTP API; the other \
                  commands read the log for operators and auditors. A sled log is locked \
                  while the server runs: stop it first. A JetStream log can be read beside \
                  running nodes, from a data directory of its own (--data-dir)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as text (for a terminal) or as JSON objects, one per line (for log
    /// shippers: timestamp, level, message and every field).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

/// The format every command logs in (`--log-format`), set once at start.
static LOG_FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

#[derive(clap::Args, Clone)]
struct Common {
    /// TOML config file; every field has a built-in default.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory holding the log, the views and generated keys [default: data/].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

/// Where the log lives.
#[derive(clap::Args, Clone)]
struct StoreArgs {
    /// The log: `sled` (embedded, in the data directory) or `nats://HOST:PORT[,HOST:PORT...]`
    /// (NATS JetStream 2.12.3 or later; older servers are refused with the reason)
    /// [default: sled, or [store] url].
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// Replicas of the log's JetStream stream [default: 3].
    #[arg(long, value_name = "N")]
    replicas: Option<usize>,
    /// State that the JetStream server fsyncs every write (`sync_interval: always`): needed to
    /// run on one replica, which could otherwise lose acknowledged writes.
    #[arg(long)]
    single_replica_synced: bool,
}

impl StoreArgs {
    fn apply(self, config: &mut Config) {
        if let Some(url) = self.store {
            config.store.url = url;
        }
        if let Some(replicas) = self.replicas {
            config.store.replicas = replicas;
        }
        config.store.single_replica_synced |= self.single_replica_synced;
    }
}

/// Many nodes on one JetStream deployment (needs --store nats://...).
#[derive(clap::Args)]
struct ClusterArgs {
    /// Join the cluster as this node (1 to 64 of A-Z a-z 0-9 _ -, unique among live nodes):
    /// the node holds a fair share of the partitions and forwards every other request to
    /// the partition's holder. The nodes must share their API keys (HONGBAO_ADMIN_KEY,
    /// HONGBAO_ISSUER_KEY, HONGBAO_GATEWAY_KEY, HONGBAO_TOKEN_SECRET). A cluster node serves
    /// every endpoint a single node serves.
    #[arg(long, value_name = "ID")]
    node_id: Option<String>,
    /// Partitions of the deployment, 1 to 1000, the same on every node (checked at start).
    #[arg(long, value_name = "P", default_value_t = 64, requires = "node_id")]
    partitions: u32,
    /// Lease time-to-live in milliseconds (at least 1000), the same on every node: a dead
    /// node's partitions move after about this long.
    #[arg(long, value_name = "MS", default_value_t = 4000, requires = "node_id")]
    lease_ttl_ms: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP API until SIGINT/SIGTERM (graceful: in-flight requests finish, log flushed).
    Serve {
        #[command(flatten)]
        common: Common,
        /// Listen address [default: 127.0.0.1:8080].
        #[arg(long, value_name = "HOST:PORT")]
        addr: Option<String>,
        /// Refuse rewards for activities that have no budget (409 budget_not_set).
        #[arg(long)]
        require_budgets: bool,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Replay the whole log and prove every invariant, then compare each view with a rebuild
    /// (exit 0 only if all hold; --json for machines).
    Audit {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        store: StoreArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Audit every partition log of the cluster deployment on --store nats://... (the
        /// partition count is read from the deployment) as one set of books: each log's chain
        /// and views checked on their own, every invariant over all of them (money moves
        /// between partitions); a partition without a log fails the audit.
        #[arg(long)]
        cluster: bool,
        /// Audit the load-test traffic's log (`X-Hongbao-Load-Test: 1`) instead: kept apart
        /// in <data-dir>/load-test (or the JetStream stream <stream>_LOAD_TEST), never part of
        /// the real books.
        #[arg(long, conflicts_with = "cluster")]
        load_test: bool,
    },
    /// Check the whole log: hash chain, sequence contiguity, per-stream versions, stream index,
    /// the data directory's signed checkpoints against the log, and print its head (last seq,
    /// last hash, record count).
    ///
    /// With --export FILE, check an export file standalone instead (no data directory needed):
    /// the chain proves no line was altered, removed or reordered; --expect-head proves it was
    /// not cut short or rewritten up to its end; --checkpoints with --public-key proves, with
    /// the server's signed checkpoints, that no suffix was rewritten and re-hashed.
    #[command(after_help = "Examples:\n  hongbao verify --data-dir data\n  \
                      hongbao verify --export log.jsonl --expect-head 3f2a...\n  \
                      hongbao verify --export log.jsonl --checkpoints checkpoints.jsonl \
                      --public-key $(hongbao checkpoints public-key)")]
    Verify {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        store: StoreArgs,
        /// An export (`hongbao export`) to re-check on its own; names the first line that does
        /// not hold.
        #[arg(long, value_name = "FILE")]
        export: Option<PathBuf>,
        /// With --export: fail unless the file ends at this hash (hex), the head `hongbao
        /// export` printed when it wrote the file. Catches a truncated or rewritten file.
        #[arg(long, value_name = "HASH", requires = "export")]
        expect_head: Option<String>,
        /// With --export: signed checkpoints (`checkpoints.jsonl` of the server's data
        /// directory, kept off the server's machine); each must carry a valid signature and
        /// agree with the export.
        #[arg(long, value_name = "FILE", requires_all = ["export", "public_key"])]
        checkpoints: Option<PathBuf>,
        /// The checkpoint public key (hex), as `hongbao checkpoints public-key` printed it.
        #[arg(long, value_name = "HEX", requires = "checkpoints")]
        public_key: Option<String>,
        /// Verify every partition log of the cluster deployment on --store nats://... (the
        /// partition count is read from the deployment), each on its own: chain, sequence,
        /// stream versions, every record's subject; a partition without a log fails.
        #[arg(long, conflicts_with = "export")]
        cluster: bool,
    },
    /// Write the log as JSON lines (seq, stream, version, type, payload, prev_hash, hash...)
    /// that `hongbao verify --export` re-checks with nothing but the file.
    ///
    /// Prints the head the file ends at (last seq, last hash, record count) on standard error:
    /// keep it, and `hongbao verify --export FILE --expect-head HASH` proves a copy of the file
    /// was neither cut short nor rewritten.
    Export {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        store: StoreArgs,
        /// Output file [default: standard output].
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
        /// First sequence number to export [default: 1, the whole log].
        #[arg(long, value_name = "SEQ", default_value_t = 1)]
        from: u64,
        /// Export every partition log of the cluster deployment on --store nats://... into
        /// the directory --output, one file per partition (`p007.jsonl`), each with its head.
        #[arg(long, requires = "output")]
        cluster: bool,
    },
    /// Time travel: a stream's state as of a point in the log (support and disputes).
    Replay {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        store: StoreArgs,
        /// The stream, e.g. wallet:u42, packet:pk-1, withdrawal:w-9, coupon-batch:spring.
        #[arg(long, value_name = "ID")]
        stream: String,
        /// Apply only events at or below this global sequence number (with --cluster: of the
        /// stream's partition log).
        #[arg(long, value_name = "SEQ", conflicts_with = "at")]
        until: Option<u64>,
        /// Apply only events recorded at or before this time (RFC 3339).
        #[arg(long, value_name = "RFC3339")]
        at: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// The stream lives in a cluster deployment on --store nats://...: read it from its
        /// partition's log (found from the stream id and the deployment's partition count).
        #[arg(long)]
        cluster: bool,
    },
    /// Signed checkpoints of the log's head (Ed25519), for auditors.
    Checkpoints {
        #[command(subcommand)]
        command: CheckpointsCommand,
    },
    /// Operate on projections (query views).
    Projections {
        #[command(subcommand)]
        command: ProjectionsCommand,
    },
    /// Load generator: drive a scenario and print throughput and latency percentiles.
    Loadgen(Box<hongbao::loadgen::LoadgenArgs>),
    /// The pre-night checklist, against the node that will serve the night: its API
    /// (`[preflight] url`, default `server.addr`), its data directory's disk and this
    /// machine's clock, judged by the plan in the config's `[preflight]` section (the
    /// night's activities, expected requests, switch states, the bank's limits per channel,
    /// the withdrawal policy). Prints each item with what is not ready; exits 0 only when
    /// every item passes. See docs/RUNBOOK.md, "Before the night".
    #[command(after_help = "Example:\n  hongbao preflight --config night.toml\n\n\
                      Exit status: 0 ready, 1 something is not ready (listed), 2 the \
                      checklist could not run (bad config).")]
    Preflight {
        #[command(flatten)]
        common: Common,
        /// Print the checklist as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a seeded campaign in process on a manual clock, with faults drawn from the seed,
    /// and prove after every crash and at the end that the audit holds and every
    /// acknowledged effect is there once (exit 1 on the first seed that fails, printing its
    /// plan).
    ///
    /// The seed decides the whole plan: every request (budgets, cash and subsidy rewards with
    /// retries and force-credit, deposits, withdrawals through channels that fail, time out and
    /// throttle, C2C and B2C packets with expiry, coupon batches with groups and limits) and,
    /// with --faults, the fault after each step (crash, crash between a journal write and its
    /// flush, failed flush then crash, lost answer, duplicated request, clock jump). Each run
    /// uses a temporary directory of its own.
    #[command(after_help = "Examples:\n  hongbao simulate --seed 7 --faults\n  \
                      hongbao simulate --seed 1 --seeds 1000 --steps 300 --faults")]
    Simulate {
        /// The seed (of the first run, with --seeds).
        #[arg(long, value_name = "S")]
        seed: u64,
        /// Steps (requests) of each run.
        #[arg(long, value_name = "N", default_value_t = 400,
              value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        steps: u64,
        /// Draw faults from the seed too.
        #[arg(long)]
        faults: bool,
        /// Run this many seeds, S, S+1, ... (the long mode).
        #[arg(long, value_name = "COUNT", default_value_t = 1,
              value_parser = clap::value_parser!(u64).range(1..))]
        seeds: u64,
    },
}

#[derive(Subcommand)]
enum CheckpointsCommand {
    /// Print the public key (hex) that verifies the server's checkpoints.
    ///
    /// Publish it, and copy `checkpoints.jsonl` off the machine regularly: the private key
    /// lives beside the log, so only checkpoints kept elsewhere bind its history. Works while
    /// the server runs (it reads `checkpoint.key`, not the log).
    PublicKey {
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Subcommand)]
enum ProjectionsCommand {
    /// Rebuild a view (or all) from zero by replaying the log.
    Rebuild {
        /// Projection name (`wallets`); all when omitted.
        name: Option<String>,
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List projections with their checkpoints.
    List {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        store: StoreArgs,
    },
}

fn load_config(common: &Common) -> anyhow::Result<Config> {
    let mut config = match &common.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(dir) = &common.data_dir {
        config.data_dir = dir.clone();
    }
    Ok(config)
}

fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr);
    let _ = match LOG_FORMAT.get().copied().unwrap_or(LogFormat::Text) {
        // One JSON object per line, the event's fields flattened beside its message.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        // Colour codes only for a terminal: a log file or a collector gets plain text.
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}

/// `hongbao preflight`: the checklist, one line per item (or JSON), exit 1 when not ready.
fn preflight(common: Common, json: bool) -> anyhow::Result<ExitCode> {
    init_logging("warn");
    let config = load_config(&common)?;
    config.validate()?;
    let env = |var: &str| std::env::var(var).ok();
    let generated = hongbao::preflight::generated_keys(&config, env);
    // The admin key to read the node with: provisioned, else the generated one on disk.
    let admin_key = match env("HONGBAO_ADMIN_KEY").or_else(|| config.auth.admin_key.clone()) {
        Some(key) => key,
        None => {
            let path = config.data_dir.join("keys.toml");
            let text = std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "no admin key: set HONGBAO_ADMIN_KEY, [auth] admin_key, or run beside {}",
                    path.display()
                )
            })?;
            let stored: hongbao::config::AuthConfig =
                toml::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
            stored
                .admin_key
                .with_context(|| format!("no admin_key in {}", path.display()))?
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let seen = runtime.block_on(hongbao::preflight::observe(&config, &admin_key, generated));
    let checks = hongbao::preflight::evaluate(&config.preflight, &seen);
    let ready = checks.iter().all(|c| c.ok);
    if json {
        out!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"ready": ready, "checks": checks}))?
        )?;
    } else {
        for check in &checks {
            let mark = if check.ok { "ok  " } else { "FAIL" };
            out!("{mark} {:<22} {}", check.name, check.detail)?;
        }
        let failed = checks.iter().filter(|c| !c.ok).count();
        match failed {
            0 => out!("ready: every item of the checklist passes")?,
            n => out!(
                "NOT READY: {n} of {} items fail (listed above)",
                checks.len()
            )?,
        }
    }
    Ok(if ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn all_projections() -> Vec<Arc<dyn Projection>> {
    projections::all(Arc::new(Metrics::new()))
}

/// The config of a command that reads the log: the file, then the command line's --store.
fn log_config(common: &Common, store: StoreArgs) -> anyhow::Result<Config> {
    let mut config = load_config(common)?;
    store.apply(&mut config);
    config.validate()?;
    Ok(config)
}

/// Opens the log to read it (sled in the data directory, or JetStream), never creating one.
fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Log>> {
    let at = match config.store.url.as_str() {
        "sled" => config.data_dir.display().to_string(),
        url => format!("{url} (stream {})", config.store.stream),
    };
    open_log(
        config,
        false,
        Arc::new(SystemClock),
        Arc::new(Metrics::new()),
    )
    .with_context(|| format!("opening the log in {at}"))
}

fn progress_bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{what} [{{bar:40}}] {{pos}}/{{len}} events ({{per_sec}}, eta {{eta}})"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// `hongbao simulate`: one line per seed, or, for many, a progress bar and a summary.
fn simulate(first: u64, steps: usize, faults: bool, seeds: u64) -> anyhow::Result<ExitCode> {
    // The engine's own lines would report the faults injected on purpose (a failed flush
    // logs its fail-stop): off unless RUST_LOG asks for them.
    init_logging("off");
    let bar = ProgressBar::new(seeds);
    bar.set_style(
        ProgressStyle::with_template(
            "simulating [{bar:40}] {pos}/{len} seeds ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let terminal = std::io::stderr().is_terminal();
    if seeds == 1 || !terminal {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let started = std::time::Instant::now();
    let mut total = hongbao::simulate::SimReport::default();
    for seed in (first..).take(seeds as usize) {
        let config = hongbao::simulate::SimConfig {
            seed,
            steps,
            faults,
        };
        match hongbao::simulate::run(&config) {
            Ok(report) => {
                if seeds == 1 {
                    out!("{report}")?;
                }
                total.calls += report.calls;
                total.crashes += report.crashes;
                total.lost_answers += report.lost_answers;
                total.audits += report.audits;
                bar.inc(1);
                // Without a terminal (a log file), a line every hundred seeds instead.
                let done = seed - first + 1;
                if !terminal && seeds > 1 && done.is_multiple_of(100) {
                    eprintln!(
                        "{done} of {seeds} seeds held ({:.0} s)",
                        started.elapsed().as_secs_f64()
                    );
                }
            }
            Err(failure) => {
                bar.finish_and_clear();
                eprintln!("{failure}");
                return Ok(ExitCode::from(1));
            }
        }
    }
    bar.finish_and_clear();
    if seeds > 1 {
        out!(
            "{seeds} seeds from {first} ({steps} steps each{}) held in {:.0} s: {} calls, {} \
             crashes, {} lost answers resolved, {} audits clean",
            if faults { ", with faults" } else { "" },
            started.elapsed().as_secs_f64(),
            total.calls,
            total.crashes,
            total.lost_answers,
            total.audits
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Logging on, and the configuration `serve` runs with (file, then the options).
fn serve_config(
    common: Common,
    addr: Option<String>,
    require_budgets: bool,
    store: StoreArgs,
) -> anyhow::Result<Config> {
    init_logging("info");
    let mut config = load_config(&common)?;
    store.apply(&mut config);
    if let Some(addr) = addr {
        config.server.addr = addr;
    }
    config.rewards.require_budgets |= require_budgets;
    Ok(config)
}

fn serve(
    common: Common,
    addr: Option<String>,
    require_budgets: bool,
    store: StoreArgs,
) -> anyhow::Result<ExitCode> {
    let config = serve_config(common, addr, require_budgets, store)?;
    actix_web::rt::System::new().block_on(async move {
        let app = Application::build(config.clone(), Arc::new(SystemClock)).await?;
        if let Some(path) = app.generated_keys_file() {
            tracing::info!(path = %path.display(), "generated API keys (admin, issuer, gateway) and the token secret");
        }
        tracing::info!(
            addr = %config.server.addr,
            port = app.port(),
            data_dir = %config.data_dir.display(),
            "hongbao listening; keys in {}",
            config.data_dir.join(hongbao::config::KEYS_FILE).display()
        );
        app.run_until_stopped().await?;
        tracing::info!("stopped cleanly");
        Ok(ExitCode::SUCCESS)
    })
}

fn serve_node(
    common: Common,
    addr: Option<String>,
    require_budgets: bool,
    store: StoreArgs,
    node: String,
    cluster: ClusterArgs,
) -> anyhow::Result<ExitCode> {
    use hongbao::cluster::{membership::Settings, partition::Partitions, NodeId};
    let config = serve_config(common, addr, require_budgets, store)?;
    let node = NodeId::parse(&node).map_err(|e| anyhow::anyhow!("--node-id: {e}"))?;
    let partitions =
        Partitions::new(cluster.partitions).map_err(|e| anyhow::anyhow!("--partitions: {e}"))?;
    let mut settings = Settings::new(node.clone(), partitions);
    settings.lease_ttl = std::time::Duration::from_millis(cluster.lease_ttl_ms);
    actix_web::rt::System::new().block_on(async move {
        let started =
            hongbao::cluster::node::Node::start(config.clone(), settings, Arc::new(SystemClock))
                .await?;
        tracing::info!(
            node = %node,
            partitions = partitions.count(),
            port = started.port(),
            store = %config.store.url,
            "hongbao node listening"
        );
        started.run_until_stopped().await?;
        tracing::info!("left the cluster cleanly");
        Ok(ExitCode::SUCCESS)
    })
}

fn verify(common: Common, store: StoreArgs) -> anyhow::Result<ExitCode> {
    let config = log_config(&common, store)?;
    let store = open_store(&config)?;
    let bar = progress_bar(store.head(), "verifying");
    let report = hongbao::verify::verify_log(store.as_ref(), |done, _| bar.set_position(done))?;
    bar.finish_and_clear();
    out!("records checked:        {}", report.records)?;
    out!("streams:                {}", report.streams)?;
    out!("stream index entries:   {}", report.index_entries)?;
    out!(
        "head:                   {}",
        head_text(
            report.last_hash.map(|_| report.records),
            report.last_hash,
            report.records
        )
    )?;
    out!(
        "hash chain:             {}",
        if report.ok() { "ok" } else { "see below" }
    )?;
    let signed = hongbao::checkpoints::check_local(&config.data_dir, store.as_ref())?;
    match &signed {
        None => out!("signed checkpoints:     none in this data directory")?,
        Some(c) if c.violation.is_none() => out!(
            "signed checkpoints:     {} confirmed by the log",
            c.confirmed
        )?,
        Some(_) => out!("signed checkpoints:     see below")?,
    }
    let checkpoint_violation = signed.and_then(|c| c.violation).map(|(line, why)| {
        format!(
            "{} line {line}: {why}",
            hongbao::checkpoints::CHECKPOINTS_FILE
        )
    });
    match report.violation.or(checkpoint_violation) {
        None => {
            out!("result: OK (chain intact, sequence contiguous from 1, stream versions continuous, index complete, signed checkpoints confirmed)")?;
            Ok(ExitCode::SUCCESS)
        }
        Some(violation) => {
            out!("result: FAILED: {violation}")?;
            Ok(ExitCode::from(1))
        }
    }
}

/// `verify --cluster`: every partition's log verified on its own, one line each.
fn verify_cluster(common: Common, store: StoreArgs) -> anyhow::Result<ExitCode> {
    use hongbao::cluster::partition::Partition;
    let config = log_config(&common, store)?;
    let partitions = deployed_partitions(&config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut failed, mut records) = (0usize, 0u64);
    for n in 0..partitions.count() {
        let partition = Partition(n);
        let verified = open_partition(&config, partition).and_then(|log| {
            let bar = progress_bar(log.head(), &format!("verifying {partition}"));
            let report =
                hongbao::verify::verify_log(log.as_ref(), |done, _| bar.set_position(done));
            bar.finish_and_clear();
            let _ = runtime.block_on(hongbao::events::EventStore::close(log.as_ref()));
            Ok(report?)
        });
        match verified {
            Ok(report) => {
                records += report.records;
                let head = head_text(
                    report.last_hash.map(|_| report.records),
                    report.last_hash,
                    report.records,
                );
                match report.violation {
                    None => out!("{}  ok      {head}", partition.key())?,
                    Some(why) => {
                        failed += 1;
                        out!("{}  FAILED  {head}: {why}", partition.key())?
                    }
                }
            }
            Err(e) => {
                failed += 1;
                out!("{}  FAILED  no readable log: {e:#}", partition.key())?
            }
        }
    }
    if failed == 0 {
        out!(
            "result: OK ({} partitions, {records} records: each chain intact, sequence contiguous from 1, stream versions continuous, every record under its subject)",
            partitions.count()
        )?;
        Ok(ExitCode::SUCCESS)
    } else {
        out!(
            "result: FAILED ({failed} of {} partitions)",
            partitions.count()
        )?;
        Ok(ExitCode::from(1))
    }
}

/// `export --cluster`: one file per partition in the directory `output`.
fn export_cluster(
    common: Common,
    store: StoreArgs,
    output: PathBuf,
    from: u64,
) -> anyhow::Result<ExitCode> {
    let config = log_config(&common, store)?;
    let partitions = deployed_partitions(&config)?;
    std::fs::create_dir_all(&output).with_context(|| format!("creating {}", output.display()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let bar = ProgressBar::new(u64::from(partitions.count()));
    bar.set_style(
        ProgressStyle::with_template("exporting partitions [{bar:40}] {pos}/{len} ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut records = 0;
    for n in 0..partitions.count() {
        let partition = hongbao::cluster::partition::Partition(n);
        let store = open_partition(&config, partition)?;
        let path = output.join(format!("{}.jsonl", partition.key()));
        let mut out = std::io::BufWriter::new(
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?,
        );
        let summary = hongbao::export::export(store.as_ref(), from, &mut out, |_| {})?;
        std::io::Write::flush(&mut out).with_context(|| format!("writing {}", path.display()))?;
        let _ = runtime.block_on(hongbao::events::EventStore::close(store.as_ref()));
        records += summary.records;
        bar.suspend(|| {
            eprintln!(
                "{}: {}",
                path.display(),
                head_text(summary.last_seq, summary.last_hash, summary.records)
            )
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    eprintln!(
        "exported {records} records of {} partitions to {} (check each file with `hongbao \
         verify --export FILE --expect-head HASH`)",
        partitions.count(),
        output.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn export(
    common: Common,
    store: StoreArgs,
    output: Option<PathBuf>,
    from: u64,
) -> anyhow::Result<ExitCode> {
    let config = log_config(&common, store)?;
    let store = open_store(&config)?;
    let head = store.head();
    let bar = progress_bar(head.saturating_sub(from.max(1)) + 1, "exporting");
    let mut out: Box<dyn std::io::Write> = match &output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            Box::new(std::io::BufWriter::new(std::io::stdout().lock()))
        }
    };
    let summary = hongbao::export::export(store.as_ref(), from, &mut out, |n| bar.set_position(n))?;
    drop(out);
    bar.finish_and_clear();
    // On standard error, so that it never mixes with an export written to standard output.
    let destination = match &output {
        Some(path) => path.display().to_string(),
        None => "standard output".into(),
    };
    eprintln!(
        "exported {} records (seq {} to {head}) to {destination}",
        summary.records,
        from.max(1),
    );
    eprintln!(
        "head: {} (check a copy with `hongbao verify --export FILE --expect-head HASH`)",
        head_text(summary.last_seq, summary.last_hash, summary.records)
    );
    Ok(ExitCode::SUCCESS)
}

fn replay(
    common: Common,
    store: StoreArgs,
    stream: String,
    until: Option<u64>,
    at: Option<String>,
    json: bool,
    cluster: bool,
) -> anyhow::Result<ExitCode> {
    use hongbao::replay::Until;
    let point = match (until, at.as_deref()) {
        (Some(seq), _) => Until::Seq(seq),
        (None, Some(text)) => Until::At(
            hongbao::clock::parse_rfc3339(text)
                .with_context(|| format!("--at {text:?} is not an RFC 3339 time"))?,
        ),
        (None, None) => Until::End,
    };
    let config = log_config(&common, store)?;
    let store: Arc<dyn Log> = if cluster {
        let partition = deployed_partitions(&config)?.of(&stream);
        if !json {
            out!("{stream} is in partition {partition}")?;
        }
        open_partition(&config, partition)?
    } else {
        open_store(&config)?
    };
    let replayed = hongbao::replay::replay(store.as_ref(), &stream, point)?;
    if json {
        out!("{}", serde_json::to_string_pretty(&replayed)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    out!(
        "{} at version {} ({} events applied, {} later not applied)",
        replayed.stream,
        replayed.version,
        replayed.applied.len(),
        replayed.later_events
    )?;
    for e in &replayed.applied {
        out!(
            "  seq {:>10}  v{:<6} {}  {:<28} {}",
            e.seq,
            e.version,
            hongbao::clock::rfc3339(e.recorded_at_ms),
            e.type_name,
            e.correlation_id
        )?;
    }
    match &replayed.state {
        serde_json::Value::String(debug) => out!("state:\n{debug}")?,
        state => out!("state:\n{}", serde_json::to_string_pretty(state)?)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `seq N, hash H, C records`, or `empty (0 records)`.
fn head_text(seq: Option<u64>, hash: Option<hongbao::events::Hash>, records: u64) -> String {
    match (seq, hash) {
        (Some(seq), Some(hash)) => {
            format!("seq {seq}, hash {}, {records} records", hex::encode(hash))
        }
        _ => format!("empty ({records} records)"),
    }
}

fn verify_export(
    file: PathBuf,
    expect_head: Option<String>,
    checkpoints: Option<(PathBuf, String)>,
) -> anyhow::Result<ExitCode> {
    use hongbao::checkpoints as cp;
    // Bad input is refused before the file is read.
    let expect_head = expect_head
        .map(|text| cp::parse_hash("--expect-head", &text))
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let checkpoints = match checkpoints {
        None => None,
        Some((path, public_key)) => {
            let key = cp::parse_public_key(&public_key)
                .map_err(|e| anyhow::anyhow!("--public-key: {e}"))?;
            let lines = cp::read_checkpoints(&path)?;
            if lines.is_empty() {
                bail!("{} holds no checkpoint", path.display());
            }
            Some((lines, key))
        }
    };
    let seqs = checkpoints
        .iter()
        .flat_map(|(lines, _)| lines.iter().map(|(_, c)| c.seq))
        .collect();
    let handle =
        std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?;
    let size = handle.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = ProgressBar::new(size);
    let mut input = std::io::BufReader::new(bar.wrap_read(handle));
    let report = hongbao::export::verify_export_at(&mut input, &seqs, |_| {})?;
    bar.finish_and_clear();
    out!("lines checked:          {}", report.lines)?;
    if let (Some(first), Some(last)) = (report.first_seq, report.last_seq) {
        out!("sequence:               {first} to {last}")?;
    }
    out!(
        "head:                   {}",
        head_text(report.last_seq, report.last_hash, report.lines)
    )?;
    if let Some((line, why)) = report.violation {
        out!("result: FAILED at line {line}: {why}")?;
        return Ok(ExitCode::from(1));
    }
    if let Some(expected) = expect_head {
        if report.last_hash != Some(expected) {
            out!(
                "result: FAILED: the export does not end at the expected head {} (it was cut \
                 short, extended or rewritten)",
                hex::encode(expected)
            )?;
            return Ok(ExitCode::from(1));
        }
        out!("expected head:          matches")?;
    }
    if let Some((lines, key)) = checkpoints {
        let found = cp::check_against_export(
            &lines,
            &key,
            &report.hashes_at,
            report.first_seq,
            report.last_seq,
        );
        if let Some((line, why)) = found.violation {
            out!("result: FAILED at checkpoint line {line}: {why}")?;
            return Ok(ExitCode::from(1));
        }
        out!(
            "signed checkpoints:     {} confirmed, {} before the export's first seq",
            found.confirmed,
            found.not_covered
        )?;
    }
    out!("result: OK (every line's hash covers its contents and links to the line before; sequence contiguous; stream versions continuous)")?;
    Ok(ExitCode::SUCCESS)
}

fn public_key(common: Common) -> anyhow::Result<ExitCode> {
    let config = load_config(&common)?;
    let key = hongbao::checkpoints::load_key(&config.data_dir).with_context(|| {
        format!(
            "no checkpoint key in {} (`hongbao serve` generates it on first start)",
            config.data_dir.display()
        )
    })?;
    out!("{}", hongbao::checkpoints::public_key_hex(&key))?;
    Ok(ExitCode::SUCCESS)
}

fn audit(
    common: Common,
    store: StoreArgs,
    json: bool,
    load_test: bool,
) -> anyhow::Result<ExitCode> {
    let real = log_config(&common, store)?;
    let config = match load_test {
        true => real.for_load_test(),
        false => real.clone(),
    };
    // The other books, reported apart: the real audit names the load-test log it left out.
    let apart = (!load_test && real.for_load_test().data_dir.join("state").exists())
        .then(|| real.for_load_test().data_dir);
    let store = open_store(&config)?;
    let channels = if config.data_dir.join("channels").exists() {
        Some(hongbao::channels::SimulatedChannels::open(
            &config.data_dir,
            Arc::new(SystemClock),
        )?)
    } else {
        None
    };
    let bar = progress_bar(store.head(), "auditing");
    if json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let started = std::time::Instant::now();
    let mut report = hongbao::audit::audit(store.as_ref(), channels.as_deref(), |done, _| {
        bar.set_position(done)
    })?;
    let replay_s = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    // Every view against a rebuild from the log (one more replay per view).
    let projections = all_projections();
    let bar = progress_bar(store.head() * projections.len() as u64, "rebuilding views");
    if json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let started = std::time::Instant::now();
    let views = hongbao::audit::views_check(store.as_ref(), &projections, |done, _| {
        bar.set_position(done)
    })?;
    let views_s = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    report.checks.push(views);
    if json {
        out!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"ok": report.ok(), "events": report.events, "replay_s": replay_s,
                    "views_s": views_s, "checks": report.checks, "load_test": load_test,
                    "load_test_log_apart": apart})
            )?
        )?;
    } else {
        out!(
            "audited {} events: replay and checks {replay_s:.2} s ({:.0} events/s), views rebuilt and compared {views_s:.2} s",
            report.events,
            report.events as f64 / replay_s.max(1e-9)
        )?;
        if load_test {
            out!(
                "books: load-test traffic only ({}), never part of the real books",
                config.data_dir.display()
            )?;
        }
        print_checks(&report)?;
        if let Some(dir) = apart {
            out!(
                "load-test traffic is kept apart in {} and is not in these books; audit it with \
                 `hongbao audit --load-test`",
                dir.display()
            )?;
        }
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// An audit's checks, one line each with its notes and first violations, and the verdict.
fn print_checks(report: &hongbao::audit::AuditReport) -> anyhow::Result<()> {
    for check in &report.checks {
        let verdict = if check.ok() { "ok" } else { "FAILED" };
        out!(
            "{:<20} {:<7} {:>10} checked  {}",
            check.name,
            verdict,
            check.checked,
            check.description
        )?;
        for note in &check.notes {
            out!("{:<20}         {note}", "")?;
        }
        for example in &check.examples {
            out!("{:<20}   ! {example}", "")?;
        }
        if check.violations as usize > check.examples.len() {
            out!("{:<20}   ! ... {} violations in all", "", check.violations)?;
        }
    }
    out!(
        "result: {}",
        if report.ok() {
            "OK, every invariant holds"
        } else {
            "FAILED"
        }
    )?;
    Ok(())
}

/// The partition count of the cluster deployment on the configured JetStream servers.
fn deployed_partitions(config: &Config) -> anyhow::Result<hongbao::cluster::partition::Partitions> {
    use hongbao::cluster::membership;
    let url = config.store.url.clone();
    if !url.starts_with("nats://") {
        bail!("--cluster reads a cluster deployment: give its --store nats://...");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime
        .block_on(async {
            let (client, _) = hongbao::events::jetstream::connect(&url).await?;
            let js = async_nats::jetstream::new(client);
            anyhow::Ok(membership::deployed_partitions(&js, membership::NAMESPACE_DEFAULT).await?)
        })
        .with_context(|| format!("reading the cluster deployment on {url}"))?
        .ok_or_else(|| {
            anyhow::anyhow!("no cluster deployment on {url} (no node was started with --node-id)")
        })
}

/// The fleet's channel statements (their shared books), copied into `dir` for the audit to
/// read line by line; none when no node ever opened them.
async fn fleet_channels(
    config: &Config,
    dir: &std::path::Path,
) -> anyhow::Result<Option<Arc<hongbao::channels::SimulatedChannels>>> {
    use hongbao::cluster::membership;
    let (client, _) = hongbao::events::jetstream::connect(&config.store.url).await?;
    let js = async_nats::jetstream::new(client);
    let shared = match hongbao::channels::SimulatedChannels::open_shared(
        &js,
        membership::NAMESPACE_DEFAULT,
        None,
        Arc::new(SystemClock),
        tokio::runtime::Handle::current(),
    )
    .await
    {
        Ok(shared) => shared,
        Err(e) => {
            tracing::warn!(error = %e, "no channel books to audit");
            return Ok(None);
        }
    };
    let bar = progress_bar(0, "copying the channels' statements");
    let copy = shared.copy_into(dir, |n| bar.set_position(n)).await?;
    bar.finish_and_clear();
    Ok(Some(copy))
}

/// Opens a cluster partition's log to read it (never creating it).
fn open_partition(
    config: &Config,
    partition: hongbao::cluster::partition::Partition,
) -> anyhow::Result<Arc<dyn Log>> {
    let (js, _) = hongbao::cluster::node::partition_log(config, partition)?;
    let store = hongbao::events::jetstream_store::JetStreamStore::open(
        js,
        Arc::new(SystemClock),
        Arc::new(Metrics::new()),
    )
    .with_context(|| format!("opening {partition}'s log"))?;
    Ok(store)
}

/// `audit --cluster`: the partitions' logs audited as one set of books (money moves between
/// partitions: a packet's escrow in one, its sender's wallet in another), each log's chain and
/// views checked on their own.
fn audit_cluster(common: Common, store: StoreArgs, json: bool) -> anyhow::Result<ExitCode> {
    use hongbao::cluster::partition::Partition;
    let config = log_config(&common, store)?;
    let partitions = deployed_partitions(&config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = std::time::Instant::now();
    let mut logs = Vec::with_capacity(usize::from(partitions.count()));
    for n in 0..partitions.count() {
        let partition = Partition(n);
        logs.push((partition.key(), open_partition(&config, partition)?));
    }
    let borrowed: Vec<(String, &dyn hongbao::events::Log)> = logs
        .iter()
        .map(|(name, log)| (name.clone(), log.as_ref()))
        .collect();
    let total: u64 = logs.iter().map(|(_, log)| log.head()).sum();
    let bar = progress_bar(total * 2, "auditing the partitions");
    if json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    // The map files stream `s` in partition `partitions.of(s)`: the index of its log here.
    let home = |stream: &str| usize::from(partitions.of(stream).0);
    let copy_dir = tempfile::tempdir()?;
    let channels = runtime.block_on(fleet_channels(&config, copy_dir.path()))?;
    let mut report =
        hongbao::audit::audit_logs(&borrowed, home, channels.as_deref(), |done, _| {
            bar.set_position(done)
        })?;
    bar.finish_and_clear();
    let replay_s = started.elapsed().as_secs_f64();
    // Each partition's views against a rebuild from its own log.
    let started = std::time::Instant::now();
    let bar = progress_bar(total * all_projections().len() as u64, "rebuilding views");
    if json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut views: Option<hongbao::audit::CheckResult> = None;
    let mut rows = Vec::new();
    let mut done = 0;
    for (name, log) in &logs {
        let check = hongbao::audit::views_check(log.as_ref(), &all_projections(), |n, _| {
            bar.set_position(done + n)
        })?;
        done += log.head() * all_projections().len() as u64;
        rows.push(serde_json::json!({"partition": name, "events": log.head(),
            "views_ok": check.ok()}));
        let merged = views.get_or_insert_with(|| hongbao::audit::CheckResult {
            checked: 0,
            violations: 0,
            examples: Vec::new(),
            notes: Vec::new(),
            ..check.clone()
        });
        merged.checked += check.checked;
        merged.violations += check.violations;
        merged
            .examples
            .extend(check.examples.iter().map(|e| format!("{name}: {e}")));
        let _ = runtime.block_on(hongbao::events::EventStore::close(log.as_ref()));
    }
    bar.finish_and_clear();
    let views_s = started.elapsed().as_secs_f64();
    report.checks.extend(views);
    if json {
        out!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"ok": report.ok(),
                "events": report.events, "replay_s": replay_s, "views_s": views_s,
                "checks": report.checks, "partitions": rows}))?
        )?;
    } else {
        out!(
            "audited {} partitions, {} events in all: replay and checks {replay_s:.2} s, views rebuilt and compared {views_s:.2} s",
            logs.len(),
            report.events,
        )?;
        print_checks(&report)?;
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn rebuild(name: Option<String>, common: Common, store: StoreArgs) -> anyhow::Result<ExitCode> {
    let config = log_config(&common, store)?;
    let chosen: Vec<_> = all_projections()
        .into_iter()
        .filter(|p| name.as_deref().is_none_or(|n| n == p.name()))
        .collect();
    if chosen.is_empty() {
        let names: Vec<_> = all_projections().iter().map(|p| p.name()).collect();
        bail!(
            "unknown projection {:?}; known: {}",
            name.unwrap_or_default(),
            names.join(", ")
        );
    }
    let store = open_store(&config)?;
    for projection in chosen {
        let bar = progress_bar(store.head(), projection.name());
        let started = std::time::Instant::now();
        let at = projections::rebuild(
            store.as_ref(),
            store.state_db(),
            projection.as_ref(),
            |done, _| bar.set_position(done),
        )?;
        bar.finish_and_clear();
        let secs = started.elapsed().as_secs_f64();
        out!(
            "rebuilt {}: {} events in {:.2} s ({:.0} events/s)",
            projection.name(),
            at,
            secs,
            at as f64 / secs.max(1e-9)
        )?;
    }
    store
        .state_db()
        .flush()
        .context("flushing the rebuilt views")?;
    Ok(ExitCode::SUCCESS)
}

fn list(common: Common, store: StoreArgs) -> anyhow::Result<ExitCode> {
    let config = log_config(&common, store)?;
    let store = open_store(&config)?;
    out!("log head: {}", store.head())?;
    for projection in all_projections() {
        let tree = projections::view_tree(store.state_db(), projection.name())?;
        out!(
            "{:<12} checkpoint {}",
            projection.name(),
            projections::checkpoint(&tree)?
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    // Injected disk faults for the fault tests; nothing without the `failpoints` feature.
    #[allow(clippy::let_unit_value)]
    let _faults = hongbao::faults::setup();
    let cli = Cli::parse();
    let _ = LOG_FORMAT.set(cli.log_format);
    let result = match cli.command {
        Command::Serve {
            common,
            addr,
            require_budgets,
            store,
            cluster,
        } => match cluster.node_id.clone() {
            None => serve(common, addr, require_budgets, store),
            Some(node) => serve_node(common, addr, require_budgets, store, node, cluster),
        },
        Command::Verify {
            export: Some(file),
            expect_head,
            checkpoints,
            public_key,
            ..
        } => verify_export(file, expect_head, checkpoints.zip(public_key)),
        Command::Verify {
            common,
            store,
            cluster: true,
            ..
        } => verify_cluster(common, store),
        Command::Verify { common, store, .. } => verify(common, store),
        Command::Export {
            common,
            store,
            output: Some(output),
            from,
            cluster: true,
        } => export_cluster(common, store, output, from),
        Command::Export {
            common,
            store,
            output,
            from,
            ..
        } => export(common, store, output, from),
        Command::Replay {
            common,
            store,
            stream,
            until,
            at,
            cluster,
            json,
        } => replay(common, store, stream, until, at, json, cluster),
        Command::Audit {
            common,
            store,
            json,
            cluster: false,
            load_test,
        } => audit(common, store, json, load_test),
        Command::Audit {
            common,
            store,
            json,
            cluster: true,
            ..
        } => audit_cluster(common, store, json),
        Command::Checkpoints {
            command: CheckpointsCommand::PublicKey { common },
        } => public_key(common),
        Command::Projections {
            command:
                ProjectionsCommand::Rebuild {
                    name,
                    common,
                    store,
                },
        } => rebuild(name, common, store),
        Command::Projections {
            command: ProjectionsCommand::List { common, store },
        } => list(common, store),
        Command::Simulate {
            seed,
            steps,
            faults,
            seeds,
        } => simulate(seed, steps as usize, faults, seeds),
        Command::Preflight { common, json } => preflight(common, json),
        Command::Loadgen(args) => {
            init_logging("warn");
            hongbao::loadgen::run(*args)
                .map(|_| ExitCode::SUCCESS)
                .map_err(anyhow::Error::from)
        }
    };
    match result {
        Ok(code) => code,
        // The reader of standard output went away (`| head`): it has what it wanted.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
