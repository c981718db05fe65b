//! `hongbao simulate` (issue 15): seeded campaigns with faults, run in process. CI runs
//! `HONGBAO_SIMULATE_SEEDS` seeds (default 8) from `HONGBAO_SIMULATE_SEED` (default 1); the
//! long mode is the command line's `--seeds` (docs/BENCHMARKS.md gives its figures).

use super::fixtures::{append, credit};
use hongbao::domain::wallet::Entry;
use hongbao::domain::Event;
use hongbao::simulate::{run, run_in, SimConfig};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn seeded_campaigns_with_crashes_lost_answers_and_duplicates_keep_every_promise() {
    // Goal: issue 15's simulation: after every crash and at the end, the audit holds, every
    // acknowledged effect is there once and every repeat answers as the first time. The
    // totals show the faults were injected: a run whose faults silently stopped would pass
    // its checks and fail here.
    let (first, count) = (
        env("HONGBAO_SIMULATE_SEED", 1),
        env("HONGBAO_SIMULATE_SEEDS", 8),
    );
    let (mut crashes, mut before_flush, mut failed_flushes, mut lost, mut duplicates) =
        (0, 0, 0, 0, 0);
    let mut openings = 0;
    for seed in first..first + count {
        let report = run(&SimConfig {
            seed,
            steps: 300,
            faults: true,
        })
        .unwrap_or_else(|failure| panic!("{failure}"));
        println!("{report}");
        assert_eq!(
            report.audits,
            report.crashes + 3,
            "the audit ran at the first opening, after each crash, and twice at the end (before \
             and after every acknowledged request was sent again)"
        );
        assert!(report.acked.get("deposits").is_some_and(|n| *n > 0));
        assert!(report.acked.get("claims").is_some_and(|n| *n > 0));
        assert!(report.acked.get("cash rewards").is_some_and(|n| *n > 0));
        crashes += report.crashes;
        before_flush += report.crashes_before_flush;
        failed_flushes += report.failed_flushes;
        lost += report.lost_answers;
        duplicates += report.duplicates;
        openings += report.audits;
    }
    if count >= 8 {
        assert!(
            crashes >= 8 && before_flush >= 2 && failed_flushes >= 1,
            "crashes {crashes}, before a flush {before_flush}, after a failed flush {failed_flushes}"
        );
        assert!(
            lost >= 20 && duplicates >= 20,
            "lost {lost}, duplicates {duplicates}"
        );
    }
    println!("{count} seeds: {crashes} crashes, {lost} lost answers, {openings} audits clean");
}

/// A data directory whose log holds `streams`' events as they are, closed.
fn written(streams: Vec<(String, Vec<Event>)>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let store = super::open(dir.path());
    for (stream, events) in streams {
        append(&store, &stream, events);
    }
    super::runtime()
        .block_on(hongbao::events::EventStore::close(store.as_ref()))
        .unwrap();
    dir
}

#[test]
fn a_forged_credit_in_the_directory_fails_the_run_and_prints_the_plan_to_replay() {
    // Goal: the simulation's checks can fail: a wallet credited from nowhere (no reward
    // behind it) is caught by the audit of the first opening, and the failure names the seed
    // and prints the plan.
    let dir = written(vec![(
        "wallet:u1".into(),
        vec![credit(Entry::Reward, "forged", 600, 600, Some("sim"))],
    )]);
    let failure = run_in(
        &SimConfig {
            seed: 42,
            steps: 20,
            faults: true,
        },
        dir.path(),
    )
    .expect_err("a forged credit must fail the run");
    let text = failure.to_string();
    assert_eq!(failure.seed, 42);
    assert!(text.contains("audit on opening"), "{text}");
    assert!(text.contains("hongbao simulate --seed 42"), "{text}");
    assert_eq!(failure.plan.len(), 20, "{text}");
}

#[test]
fn a_deposit_the_clients_never_made_under_their_order_id_fails_the_client_side_checks() {
    // Goal: the checks from the clients' side can fail where the audit cannot: every wallet
    // already holds deposits `dep-1`..`dep-40` of 1 fen (money from outside, which the audit
    // accepts). The campaign's first deposit reuses such an id with its own amount: refused
    // (409), yet its wallet holds a line under that id, which the client-side check names.
    let dir = written(
        (0..12)
            .map(|u| {
                let deposits = (1..=40)
                    .map(|n| credit(Entry::Deposit, &format!("dep-{n}"), 1, n, None))
                    .collect();
                (format!("wallet:u{u}"), deposits)
            })
            .collect(),
    );
    let failure = run_in(
        &SimConfig {
            seed: 42,
            steps: 40,
            faults: false,
        },
        dir.path(),
    )
    .expect_err("a deposit the clients did not make must fail the run");
    let text = failure.to_string();
    assert!(
        !text.contains("audit on opening"),
        "the audit holds: {text}"
    );
    assert!(
        text.contains("has ledger lines [\"deposit:1\"], expected []"),
        "{text}"
    );
}
