//! `hongbao loadgen packets` and `coupons` give right answers, so a fast but wrong backend
//! cannot make the figures in docs/BENCHMARKS.md worthless: each packet round checks that
//! exactly the shares were won and that they sum to the total, and each coupon run that every
//! accepted request was issued; both fail otherwise.
//!
//! The textbook baselines need the PostgreSQL and Redis of this machine: that test runs when
//! `HONGBAO_SERVICES=1` (which `.ci/run` sets) and then fails loudly if they are missing.

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
