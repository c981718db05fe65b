//! `hongbao loadgen packets` and `coupons` give right answers, so a fast but wrong backend
//! cannot make the figures in docs/BENCHMARKS.md worthless: each packet round checks that
//! exactly the shares were won and that they sum to the total, and each coupon run that every
//! accepted request was issued; both fail otherwise.
//!
//! The journal scenario gives its figures on sled and, when a nats-server 2.12.3+ is at hand
//! (gated like tests/core/jetstream.rs), on one synced JetStream server beside raw publishing.
//!
//! The textbook baselines need the PostgreSQL and Redis of this machine: that test runs when
//! `HONGBAO_SERVICES=1` (which `.ci/run` sets) and then fails loudly if they are missing.

use super::nats;
use clap::Parser;
use hongbao::loadgen::{run, LoadgenArgs};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: LoadgenArgs,
}

fn loadgen(line: &str) -> Result<(), String> {
    let argv = std::iter::once("loadgen").chain(line.split_whitespace());
    let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
    run(cli.args).map_err(|e| e.to_string())
}

#[test]
fn the_hot_packet_scenario_checks_hongbao_claims_add_up() {
    // Goal: 300 shares, 80 clients through 8 connections: every share won once, sum = total.
    loadgen(
        "packets --backends hongbao --shares 300 --clients 80 --pool 8 --rounds 1 --no-baseline",
    )
    .expect("hongbao round");
}

#[test]
fn the_textbook_baselines_give_exactly_the_shares() {
    // Goal: the PostgreSQL and Redis designs each hand out exactly the shares and the total.
    if std::env::var("HONGBAO_SERVICES").as_deref() != Ok("1") {
        eprintln!("skipped: set HONGBAO_SERVICES=1 to run against PostgreSQL and Redis");
        return;
    }
    loadgen(
        "packets --backends postgres,redis,redis-always --shares 300 --clients 80 --pool 8 --rounds 2 --no-baseline",
    )
    .expect("PostgreSQL (127.0.0.1:5432, database test) and Redis (127.0.0.1:6379) must be running");
}

#[test]
fn bad_packet_arguments_are_refused_with_a_reason() {
    let error = loadgen("packets --shares 0 --backends hongbao").unwrap_err();
    assert!(error.contains("--shares must be 1 to 10000"), "{error}");
    let error = loadgen("packets --pool 0 --backends hongbao").unwrap_err();
    assert!(error.contains("must be positive"), "{error}");
}

#[test]
fn the_coupon_scenario_drains_every_accepted_request_both_ways() {
    // Goal: in-process and over HTTP, at N = 1 and N = 64, every accepted request is issued
    // (the scenario fails if one is left behind after the drain).
    loadgen(
        "coupons --modes in-process,http --merge-max 1,64 --in-flight 16 --duration-s 1 --no-baseline",
    )
    .expect("coupons scenario");
}

#[test]
fn bad_coupon_arguments_are_refused_with_a_reason() {
    let error = loadgen("coupons --merge-max 0").unwrap_err();
    assert!(
        error.contains("--merge-max values must be positive"),
        "{error}"
    );
    let error = loadgen(
        "coupons --modes in-process --target http://127.0.0.1:1 --admin-key a --issuer-key i",
    )
    .unwrap_err();
    assert!(
        error.contains("in-process needs the in-process server"),
        "{error}"
    );
}

fn journal_rows(line: &str) -> Vec<hongbao::loadgen::JournalRow> {
    let argv = std::iter::once("loadgen").chain(line.split_whitespace());
    let cli = Cli::try_parse_from(argv).expect("arguments");
    hongbao::loadgen::journal_table(&cli.args).expect("journal scenario")
}

#[test]
fn the_journal_scenario_on_sled_measures_durable_appends_beside_raw_sled() {
    // Goal: one second of durable appends at 4 in flight gives events, a batch size and a
    // record size, and the raw sled figure beside them.
    let rows = journal_rows("journal --in-flight 4 --duration-s 1 --warmup-s 0");
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert!(row.journal.events > 0, "{row:?}");
    assert!(row.journal.mean_batch >= 1.0, "{row:?}");
    assert!(
        row.journal.record_bytes > 64,
        "hash header and a body: {row:?}"
    );
    assert!(row.raw_per_second > 0.0, "{row:?}");
}

#[test]
fn the_journal_scenario_on_jetstream_measures_the_writer_beside_raw_publishing() {
    // Goal (issue 12): on one synced nats-server, the journal's durable appends through the
    // JetStream writer and raw JetStream publishing at the same in-flight both move; the
    // batch comparisons (fenced and atomic) run; the load generator's streams are gone after.
    let Some(binary) = nats::binary() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = nats::single_synced(&binary, dir.path());
    let rows = journal_rows(&format!(
        "journal --store {} --replicas 1 --single-replica-synced --in-flight 4 --duration-s 1 --warmup-s 0 --batch-depth 1",
        server.url()
    ));
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert!(row.journal.events > 0, "{row:?}");
    assert!(
        row.journal.record_bytes > 64,
        "hash header and a body: {row:?}"
    );
    assert!(row.raw_per_second > 0.0, "{row:?}");
    let streams = super::runtime().block_on(async {
        let client = async_nats::connect(server.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut names = js.stream_names();
        let mut out = Vec::new();
        while let Some(name) = futures::StreamExt::next(&mut names).await {
            out.push(name.unwrap());
        }
        out
    });
    assert!(streams.is_empty(), "left behind: {streams:?}");
}

#[test]
fn bad_store_arguments_are_refused_with_a_reason() {
    let error = loadgen("journal --replicas 3").unwrap_err();
    assert!(error.contains("need --store nats://"), "{error}");
    let error = loadgen("journal --store postgres://x").unwrap_err();
    assert!(error.contains("--store is sled or nats://"), "{error}");
    let error = loadgen("journal --store nats://127.0.0.1:1 --replicas 1").unwrap_err();
    assert!(error.contains("--single-replica-synced"), "{error}");
    let error = loadgen("deposits --store nats://127.0.0.1:1 --replicas 1").unwrap_err();
    assert!(error.contains("--single-replica-synced"), "{error}");
}

#[test]
fn the_handover_scenario_never_reports_a_partition_taken_before_its_lease_expired() {
    // Goal: the figure is a hand-over that waited for the lease: a dead keeper's partitions
    // held again no sooner than 3/4 of the TTL after the kill (its last renewal was at most
    // TTL/4 earlier), and no bucket of the load generator's is left behind. Bad arguments are
    // refused with a reason.
    let err = loadgen("handover").unwrap_err();
    assert!(err.contains("--store nats://"), "{err}");
    let Some(binary) = nats::binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = nats::single_synced(&binary, dir.path());
    let url = server.url();
    let err = loadgen(&format!(
        "handover --store {url} --replicas 1 --single-replica-synced --nodes 1"
    ))
    .unwrap_err();
    assert!(err.contains("--nodes 2"), "{err}");
    let ttl = std::time::Duration::from_millis(1_000);
    let partitions = hongbao::cluster::partition::Partitions::new(8).unwrap();
    let measured = hongbao::loadgen::handover::run(&url, partitions, ttl, 1, 2, 2).unwrap();
    assert_eq!(measured.after_kill.len(), 2);
    assert_eq!(measured.after_join.len(), 2);
    for took in &measured.after_kill {
        assert!(
            *took >= ttl * 3 / 4,
            "taken over after {took:?}: before the lease expired"
        );
    }
    super::runtime().block_on(async {
        let (client, _) = hongbao::events::jetstream::connect(&url).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut names = js.stream_names();
        use futures::StreamExt;
        while let Some(name) = names.next().await {
            let name = name.unwrap();
            assert!(!name.starts_with("KV_hblg_"), "{name} left behind");
        }
    });
}

fn audit_rows(line: &str) -> Result<Vec<hongbao::loadgen::audit::AuditRow>, String> {
    let argv = std::iter::once("loadgen").chain(line.split_whitespace());
    let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
    hongbao::loadgen::audit::table(&cli.args).map_err(|e| e.to_string())
}

/// The kinds of the streams in the sled log in `dir` (what comes before the first `:`).
fn stream_kinds(dir: &std::path::Path) -> std::collections::BTreeSet<String> {
    let config = hongbao::config::Config {
        data_dir: dir.to_path_buf(),
        ..Default::default()
    };
    let log = hongbao::events::open_log(
        &config,
        false,
        std::sync::Arc::new(hongbao::clock::SystemClock),
        std::sync::Arc::new(hongbao::metrics::Metrics::new()),
    )
    .expect("the built log");
    let mut kinds = std::collections::BTreeSet::new();
    let mut from = 1;
    loop {
        let page = log.read_all(from, 10_000).expect("read the log");
        let Some(last) = page.last() else { break };
        from = last.seq + 1;
        for envelope in &page {
            let kind = envelope.stream.split(':').next().unwrap_or_default();
            kinds.insert(kind.to_owned());
        }
    }
    kinds
}

#[test]
fn the_audit_scenario_builds_a_mixed_log_once_and_replays_all_of_it_each_run() {
    // Goal: on an empty directory the scenario builds a log of every kind of aggregate, then
    // each run replays every event of it and passes every check; a second invocation on the
    // same directory replays the same log without adding to it.
    let dir = tempfile::tempdir().unwrap();
    let line = format!(
        "audit --data-dir {} --duration-s 1 --warmup-s 0 --rounds 2 --no-baseline \
         --users 100 --shares 300 --clients 80 --pool 8",
        dir.path().display()
    );
    let rows = audit_rows(&line).expect("audit scenario");
    assert_eq!(rows.len(), 2);
    let head = rows[0].head;
    assert!(head > 1_000, "a mixed log of a few seconds: {rows:?}");
    assert!(
        dir.path().join("loadgen-audit-built").exists(),
        "a finished build is marked"
    );
    let kinds = stream_kinds(dir.path());
    for kind in ["wallet", "activity", "packet", "withdrawal", "coupon-batch"] {
        assert!(kinds.contains(kind), "no {kind} stream in {kinds:?}");
    }
    for row in &rows {
        assert_eq!(row.events, head, "every event replayed: {row:?}");
        assert!(row.ok, "{row:?}");
    }
    let again = audit_rows(&line.replace("--rounds 2", "--rounds 1")).expect("second invocation");
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].head, head, "the log was not built again");
    assert_eq!(again[0].events, head);
}

#[test]
fn the_audit_scenario_refuses_what_it_cannot_replay() {
    let error = audit_rows("audit --store nats://127.0.0.1:1").unwrap_err();
    assert!(error.contains("replays a sled log"), "{error}");
    let error = audit_rows("audit --rounds 0").unwrap_err();
    assert!(error.contains("--rounds must be positive"), "{error}");
}
