//! `hongbao loadgen campaign` (issue 16, P12): a short campaign against an in-process server
//! drives every step of the night's chain, answers nothing unexpected, keeps the money right
//! (every packet claimed to exactly its total, its details = its claimers' answers), reports
//! each endpoint over time and in total, and draws its plot.

use clap::Parser;
use hongbao::loadgen::campaign::{self, Endpoint};
use hongbao::loadgen::LoadgenArgs;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: LoadgenArgs,
}

fn args(line: &str) -> LoadgenArgs {
    let argv = std::iter::once("loadgen").chain(line.split_whitespace());
    Cli::try_parse_from(argv).expect("arguments").args
}

#[test]
fn a_short_campaign_drives_the_whole_chain_keeps_the_money_right_and_plots_it() {
    // Goal: 3 s, 4 users, packets of 5 shares claimed by 8 claimers each (more claimers than
    // shares, so the hot packets' admission shapes some of them): every endpoint of the chain
    // has traffic in the totals and in the interval rows, no unexpected error, every packet
    // sent was claimed to exactly its total, and the SVG has both panels' series and labels.
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("campaign.svg");
    let data = dir.path().join("data");
    let line = format!(
        "campaign --duration-s 3 --interval-s 1 --vus 4 --claimers 8 --packet-shares 5 --pool 16 --no-baseline --plot {} --data-dir {}",
        plot.display(),
        data.display()
    );
    let report = campaign::campaign(&args(&line)).expect("the campaign runs");
    assert!(report.load_test, "load-test traffic unless --real-traffic");
    // The whole campaign went into the load-test books; the real log holds nothing of it.
    assert_eq!(super::sled_log::sled_head(&data), 0, "the real log");
    assert!(
        super::sled_log::sled_head(&data.join("load-test")) > 1_000,
        "the load-test log"
    );

    assert_eq!(report.unexpected_errors(), 0, "{:?}", report.error_examples);
    assert!(
        report.money_failures.is_empty(),
        "{:?}",
        report.money_failures
    );
    report.verdict().expect("the verdict agrees");
    for endpoint in Endpoint::ALL {
        let figures = report.figures(endpoint);
        assert!(figures.ok > 0, "{}: {figures:?}", endpoint.route());
        assert!(figures.per_second > 0.0 && figures.p99_ms >= figures.p50_ms);
        assert!(figures.p50_ms > 0.0, "{}: {figures:?}", endpoint.route());
        // Except the one-off binding of a method, every step shows in some interval's row.
        if endpoint != Endpoint::PayoutMethod {
            assert!(
                report
                    .intervals
                    .iter()
                    .any(|r| r.endpoint == Some(endpoint) && r.requests > 0),
                "no interval row for {}",
                endpoint.route()
            );
        }
    }
    // More than one interval of a second, and a row of all endpoints in each.
    let all_rows = report.intervals.iter().filter(|r| r.endpoint.is_none());
    assert!(all_rows.count() >= 3, "{:?}", report.intervals);
    let total: u64 = report.totals.iter().map(|f| f.requests).sum();
    assert_eq!(report.all.requests, total);

    // The chain: a packet per subsidy, each claimed to its last share, every fen of it.
    let subsidies = report.figures(Endpoint::SubsidyReward).ok;
    assert!(report.packets_sent > 0 && report.packets_sent <= subsidies);
    assert_eq!(report.packets_exhausted, report.packets_sent);
    assert_eq!(report.claimed_fen, report.packet_fen);
    let claims = report.figures(Endpoint::PacketClaim);
    assert_eq!(claims.ok, report.packets_sent * 5, "{claims:?}");
    // Each of a packet's 8 claimers stops at its 410 packet_empty: counted apart, not an error.
    assert_eq!(claims.empty, report.packets_sent * 8, "{claims:?}");
    assert_eq!(claims.errors, 0);
    assert_eq!(
        report.withdrawals,
        report.figures(Endpoint::Withdrawal).ok,
        "every withdrawal accepted"
    );
    assert!(report.withdrawn_fen >= report.withdrawals * 100);

    // Per second: the seconds of the run, the last one partial.
    assert!(report.seconds.len() >= 3, "{:?}", report.seconds.len());
    let per_second: u64 = report.seconds.iter().map(|s| s.all_requests).sum();
    assert_eq!(per_second, total, "every request in some second");

    let svg = std::fs::read_to_string(&plot).expect("the plot is written");
    assert!(
        svg.starts_with("<svg") || svg.starts_with("<?xml"),
        "{}",
        &svg[..svg.len().min(200)]
    );
    assert!(svg.trim_end().ends_with("</svg>"));
    // Two panels of 9 series each (all, and 8 endpoints), as polylines.
    let lines = svg.matches("<polyline").count();
    assert!(lines >= 18, "{lines} polylines");
    for label in [
        "throughput per second",
        "p99 latency per second",
        "seconds since start",
        "requests/s",
        "p99 latency, ms",
        "load-test traffic",
        "claims",
        "subsidy list",
        "withdrawals",
        "coupons",
    ] {
        assert!(svg.contains(label), "the plot lacks {label:?}");
    }
}

#[test]
fn campaign_arguments_are_checked_and_the_header_is_on_by_default() {
    // Goal: nonsense populations are refused before anything starts, with the flag named;
    // the load-test header is the default and --real-traffic is the only way to drop it.
    let error = campaign::campaign(&args("campaign --vus 0")).unwrap_err();
    assert!(error.to_string().contains("--vus"), "{error}");
    let error = campaign::campaign(&args("campaign --packet-shares 0")).unwrap_err();
    assert!(error.to_string().contains("--packet-shares"), "{error}");
    assert!(!args("campaign").campaign.real_traffic);
    assert!(args("campaign --real-traffic").campaign.real_traffic);
    assert_eq!(
        args("campaign").campaign.plot,
        std::path::PathBuf::from("loadgen-campaign.svg")
    );
}
