//! `hongbao loadgen audit`: the audit's replay of a mixed log (every kind of aggregate), timed
//! over several runs beside hello-world measured in the same run.
//!
//! The log is the one in `--data-dir` (sled); when that holds no log (or no `--data-dir` is
//! given) a mixed one is built there first by the other scenarios, as docs/BENCHMARKS.md's
//! audit sections did by hand: hot-wallet deposits, rewards, one hot packet, withdrawals and
//! coupons over HTTP, each against an in-process server on that directory.

use super::{coupons, hello_run, packets, LoadgenArgs, LoadgenError, Scenario};
use crate::channels::SimulatedChannels;
use crate::clock::SystemClock;
use crate::config::Config;
use crate::events::{open_log, Log};
use crate::metrics::Metrics;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Written into the data directory once a mixed log is built, so that a log left by an
/// interrupted build is told apart from a finished one.
const BUILT_MARKER: &str = "loadgen-audit-built";

/// One replay of the log by the audit.
#[derive(Debug, Clone)]
pub struct AuditRow {
    /// Events the audit replayed.
    pub events: u64,
    /// The log's head when it started (every event must have been replayed).
    pub head: u64,
    pub seconds: f64,
    /// Every check of the audit passed.
    pub ok: bool,
}

impl AuditRow {
    pub fn per_second(&self) -> f64 {
        self.events as f64 / self.seconds.max(1e-9)
    }
}

/// Runs the scenario and prints its table; the rows for tests.
pub fn table(args: &LoadgenArgs) -> Result<Vec<AuditRow>, LoadgenError> {
    if args.nats()?.is_some() || args.target.is_some() {
        return Err(LoadgenError::Usage(
            "audit replays a sled log in --data-dir: --store and --target do not apply".into(),
        ));
    }
    if args.rounds == 0 {
        return Err(LoadgenError::Usage("--rounds must be positive".into()));
    }
    let temp = tempfile::tempdir()?;
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let store = open(&dir, true)?;
    let empty = store.head() == 0;
    // Each run opens the log afresh, as `hongbao audit` does; the build's servers open it too.
    close(&runtime, store)?;
    let marker = dir.join(BUILT_MARKER);
    if empty {
        println!("no log in {}: building a mixed one first", dir.display());
        build(args, &dir)?;
        std::fs::write(&marker, b"built by hongbao loadgen audit\n")?;
    } else if !marker.exists() {
        println!(
            "note: the log in {} was not built by `loadgen audit` (or its build was interrupted): replaying it as it is",
            dir.display()
        );
    }
    let channels = if dir.join("channels").exists() {
        Some(SimulatedChannels::open(&dir, Arc::new(SystemClock))?)
    } else {
        None
    };
    // Hello-world at 256 in flight, as the other rows, unless one --in-flight is given.
    let hello_in_flight = match args.in_flight.as_slice() {
        [one] => *one,
        _ => 256,
    };
    let before = if args.no_baseline {
        None
    } else {
        Some(hello_run(args, hello_in_flight)?)
    };
    println!(
        "{:<10} {:>5} {:>12} {:>9} {:>12} {:>6}",
        "scenario", "run", "events", "seconds", "events/s", "checks"
    );
    let mut rows = Vec::with_capacity(args.rounds as usize);
    for run in 1..=args.rounds {
        let store = open(&dir, false)?;
        let row = replay(store.as_ref(), channels.as_deref())?;
        close(&runtime, store)?;
        println!(
            "{:<10} {:>5} {:>12} {:>9.2} {:>12.0} {:>6}",
            "audit",
            run,
            row.events,
            row.seconds,
            row.per_second(),
            if row.ok { "ok" } else { "FAILED" }
        );
        rows.push(row);
    }
    if let Some(before) = before {
        let after = hello_run(args, hello_in_flight)?;
        println!(
            "{:<10} hello world at {hello_in_flight} in flight: {:.0} req/s before, {:.0} after",
            "baseline",
            before.per_second(),
            after.per_second()
        );
    }
    let failed: Vec<String> = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.ok || r.events != r.head)
        .map(|(i, r)| {
            format!(
                "run {}: {} of {} events replayed, checks {}",
                i + 1,
                r.events,
                r.head,
                if r.ok { "ok" } else { "failed" }
            )
        })
        .collect();
    if failed.is_empty() {
        Ok(rows)
    } else {
        Err(LoadgenError::Usage(format!(
            "the audit of {} did not pass (`hongbao audit --data-dir {}` lists the violations):\n{}",
            dir.display(),
            dir.display(),
            failed.join("\n")
        )))
    }
}

fn config(dir: &Path) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    }
}

fn open(dir: &Path, create: bool) -> Result<Arc<dyn Log>, LoadgenError> {
    Ok(open_log(
        &config(dir),
        create,
        Arc::new(SystemClock),
        Arc::new(Metrics::new()),
    )?)
}

fn close(runtime: &tokio::runtime::Runtime, store: Arc<dyn Log>) -> Result<(), LoadgenError> {
    Ok(runtime.block_on(store.close())?)
}

/// One audit of the log, as `hongbao audit` runs it (without the views' rebuilds).
fn replay(store: &dyn Log, channels: Option<&SimulatedChannels>) -> Result<AuditRow, LoadgenError> {
    let head = store.head();
    let started = Instant::now();
    let report = crate::audit::audit(store, channels, |_, _| {})?;
    Ok(AuditRow {
        events: report.events,
        head,
        seconds: started.elapsed().as_secs_f64(),
        ok: report.ok(),
    })
}

/// A mixed log in `dir`: each scenario against its own in-process server there, in turn,
/// without baselines. --duration-s scales it (5, the default: about 1.5 million events on
/// this project's two-core machine).
fn build(args: &LoadgenArgs, dir: &Path) -> Result<(), LoadgenError> {
    let d = args.duration_s.max(1);
    let step = |scenario: Scenario, change: &dyn Fn(&mut LoadgenArgs)| {
        let mut a = args.clone();
        a.scenario = scenario;
        a.data_dir = Some(dir.to_path_buf());
        a.no_baseline = true;
        a.sustain = None;
        a.wallets = 0;
        a.in_flight = vec![256];
        a.duration_s = d;
        change(&mut a);
        println!("building: {scenario:?}");
        super::run(a)
    };
    step(Scenario::Deposits, &|a| a.duration_s = 6 * d)?;
    step(Scenario::Rewards, &|a| a.duration_s = 5 * d)?;
    step(Scenario::Packets, &|a| {
        a.backends = vec![packets::Backend::Hongbao];
        a.rounds = 1;
    })?;
    step(Scenario::Withdrawals, &|a| a.in_flight = vec![64])?;
    step(Scenario::Coupons, &|a| {
        a.modes = vec![coupons::Mode::Http];
        a.merge_max = vec![512];
    })?;
    Ok(())
}
