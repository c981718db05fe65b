//! `loadgen coupons`: one hot batch (stock far above what a run can issue, a limit of one per
//! user, every request for a new user), driven two ways against a fresh server per `--merge-max`
//! value:
//!
//! - `in-process`: `--in-flight` tasks call the coupon engine's `submit` directly (durable
//!   acceptance, no HTTP), or with `--rate` an open loop offers that many requests per second;
//! - `http`: `POST /v1/coupons/issue` over keep-alive connections, `--in-flight` of them.
//!
//! Each run submits for `--duration-s`, then waits until every accepted request is issued. It
//! reports the acceptance rate and latency (hdrhistogram), the issuance rate during the run and
//! over run + drain, the mean merged deduction size, and the acceptance-to-issued latency from
//! the server's `hongbao_coupon_issue_seconds` histogram (bucket bounds: p50 and p99 are "at
//! most"; the share within the 0.5 s goal is exact, 0.5 s being a bucket edge). It fails if a
//! request is lost: issued must equal accepted once drained.

use super::client::{self, post_json, RequestFactory};
use super::{hello_run, metric_value, scrape, LoadgenArgs, LoadgenError, Target};
use crate::domain::coupon::IssueRequest;
use crate::flows::coupons::Coupons;
use crate::ids::Id;
use hdrhistogram::Histogram;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BATCH: &str = "hot";
const ISSUED: &str = "hongbao_coupons_issued_total";
const DRAIN_MAX: Duration = Duration::from_secs(180);
const HELLO_IN_FLIGHT: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The coupon engine called directly, no HTTP.
    InProcess,
    /// POST /v1/coupons/issue over HTTP.
    Http,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::InProcess => "in-process",
            Mode::Http => "http",
        }
    }
}

/// What one run measured.
struct Run {
    accepted: u64,
    refused: u64,
    submit_s: f64,
    accept_us: Histogram<u64>,
}

/// The acceptance-to-issued histogram between two scrapes: (upper bound, cumulative count).
fn issue_buckets(before: &str, after: &str) -> Vec<(f64, f64)> {
    let family = "hongbao_coupon_issue_seconds_bucket{";
    // One series per partition on a cluster node (and per node of a fleet), its labels in any
    // order: each bound once, its count summed over them all.
    let mut seen = std::collections::HashSet::new();
    after
        .lines()
        .filter_map(|l| {
            l.strip_prefix(family)?
                .split_once('}')
                .map(|(labels, _)| labels)
        })
        .filter_map(|labels| {
            let le = labels
                .split(',')
                .find_map(|l| l.strip_prefix("le=\""))?
                .trim_end_matches('"');
            if !seen.insert(le.to_owned()) {
                return None;
            }
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let key = format!("{family}le=\"{le}\"}}");
            Some((
                bound,
                metric_value(after, &key) - metric_value(before, &key),
            ))
        })
        .collect()
}

/// The smallest bucket bound holding quantile `q`, in ms.
fn bucket_quantile_ms(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    buckets
        .iter()
        .find(|(_, count)| *count >= q * total)
        .map(|(bound, _)| bound * 1000.0)
        .unwrap_or(f64::NAN)
}

fn within_ms(buckets: &[(f64, f64)], bound_s: f64) -> f64 {
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    let within = buckets
        .iter()
        .find(|(b, _)| (*b - bound_s).abs() < 1e-9)
        .map(|b| b.1)
        .unwrap_or(f64::NAN);
    100.0 * within / total.max(1.0)
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds")
}

/// What the in-process submitters share.
struct Shared {
    hist: Mutex<Histogram<u64>>,
    accepted: AtomicU64,
    refused: AtomicU64,
    coupons: Arc<Coupons>,
    batch: Id,
}

/// Closed loop: `in_flight` tasks each submit their next request once the last is accepted.
/// Open loop (`rate`): requests offered at that rate whatever the answers.
async fn drive_in_process(
    coupons: Arc<Coupons>,
    run: u64,
    in_flight: usize,
    rate: Option<u64>,
    duration: Duration,
) -> Run {
    let shared = Arc::new(Shared {
        hist: Mutex::new(histogram()),
        accepted: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        coupons,
        batch: Id::parse(BATCH).expect("valid id"),
    });
    let started = Instant::now();
    let deadline = started + duration;
    let submit = {
        let shared = shared.clone();
        move |n: u64| {
            let shared = shared.clone();
            async move {
                let request = IssueRequest {
                    seq_no: Id::parse(&format!("lg{run}-{n}")).expect("valid id"),
                    uid: Id::parse(&format!("u{run}-{n}")).expect("valid id"),
                    batch_id: shared.batch.clone(),
                };
                let sent = Instant::now();
                match shared.coupons.submit(request).await {
                    Ok(crate::domain::coupon::Acceptance::New) => {
                        shared.accepted.fetch_add(1, Ordering::Relaxed);
                        let us = sent.elapsed().as_micros() as u64;
                        let _ = shared.hist.lock().expect("not poisoned").record(us.max(1));
                    }
                    _ => {
                        shared.refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    };
    match rate {
        Some(rate) => {
            let mut tasks = tokio::task::JoinSet::new();
            let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
            let mut n = 0u64;
            while Instant::now() < deadline {
                let due = started + interval.mul_f64(n as f64);
                tokio::time::sleep_until(due.into()).await;
                tasks.spawn(submit(n));
                n += 1;
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        }
        None => {
            let next = Arc::new(AtomicU64::new(0));
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..in_flight.max(1) {
                let (next, submit) = (next.clone(), submit.clone());
                tasks.spawn(async move {
                    while Instant::now() < deadline {
                        submit(next.fetch_add(1, Ordering::Relaxed)).await;
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
        }
    }
    let accept_us = shared.hist.lock().expect("not poisoned").clone();
    Run {
        accepted: shared.accepted.load(Ordering::Relaxed),
        refused: shared.refused.load(Ordering::Relaxed),
        submit_s: started.elapsed().as_secs_f64(),
        accept_us,
    }
}

fn drive_http(
    args: &LoadgenArgs,
    target: &Target,
    run: u64,
    in_flight: usize,
) -> Result<Run, LoadgenError> {
    let addr: SocketAddr = target.addr;
    let key = target.issuer_key.clone();
    let make: RequestFactory = Arc::new(move |c, n| {
        post_json(
            addr,
            "/v1/coupons/issue",
            Some(&key),
            format!(
                r#"{{"seq_no":"lg{run}-{c}-{n}","uid":"u{run}-{c}-{n}","batch_id":"{BATCH}"}}"#
            ),
        )
    });
    let started = Instant::now();
    let result = client::drive(
        addr,
        in_flight,
        Duration::ZERO,
        Duration::from_secs(args.duration_s),
        args.client_threads,
        make,
    )?;
    let accepted = result.statuses.get(&202).copied().unwrap_or(0);
    Ok(Run {
        accepted,
        refused: result.requests - accepted,
        submit_s: started.elapsed().as_secs_f64(),
        accept_us: result.latency_us.clone(),
    })
}

fn header() {
    println!(
        "{:<10} {:>5} {:>9} {:>9} {:>10} {:>8} {:>8} {:>10} {:>10} {:>8} {:>7} {:>9} {:>9} {:>7} {:>8}",
        "mode",
        "merge",
        "in_flight",
        "accepted",
        "accepted/s",
        "acc_p50",
        "acc_p99",
        "issued/s*",
        "issued/s",
        "drain_s",
        "merged",
        "iss_p50≤",
        "iss_p99≤",
        "≤0.5s%",
        "hello/s"
    );
}

pub fn run(args: &LoadgenArgs) -> Result<(), LoadgenError> {
    if args.merge_max.contains(&0) {
        return Err(LoadgenError::Usage(
            "--merge-max values must be positive".into(),
        ));
    }
    if args.target.is_some() && args.modes.contains(&Mode::InProcess) {
        return Err(LoadgenError::Usage(
            "--modes in-process needs the in-process server (no --target); use --modes http".into(),
        ));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()?;
    println!(
        "one hot batch, a new user per request; {} s of submission per run, then drained",
        args.duration_s
    );
    println!("issued/s* = during submission; issued/s = over submission + drain; iss_* = acceptance to issued, from the server's histogram (bucket bounds, ms)");
    if !args.no_baseline {
        // The machine's HTTP ceiling now, to compare runs from different days.
        let hello = hello_run(args, HELLO_IN_FLIGHT)?;
        println!(
            "hello-world baseline: {:.0} req/s at {HELLO_IN_FLIGHT} in flight",
            hello.per_second()
        );
    }
    header();
    let mut lost = Vec::new();
    for &merge in &args.merge_max {
        let target = Target::with(args, |c| c.coupons.merge_max = merge)?;
        target.require(true, true, false)?;
        // Requests are issued by the layers of their intake's partition: on a cluster, on
        // whichever node holds it, so the counts are every node's of --fleet with the target's.
        let counted = super::counted_addrs(target.addr, args)?;
        let scrape_fleet = || -> String {
            counted
                .iter()
                .map(|a| scrape(*a))
                .collect::<Vec<_>>()
                .join("\n")
        };
        if args.target.is_some() && args.merge_max.len() > 1 {
            println!(
                "(--target: the server's own merge_max applies; the column shows the request)"
            );
        }
        let (status, body) = super::http_setup(
            target.addr,
            "POST",
            "/v1/coupon-batches",
            Some(&target.admin_key),
            &format!(
                r#"{{"batch_id":"{BATCH}","stock":1000000000,"per_user_limit":1,"value":100}}"#
            ),
        );
        if status != 201 {
            return Err(LoadgenError::Usage(format!(
                "creating the batch failed: {status} {body}"
            )));
        }
        for &mode in &args.modes {
            for &in_flight in &args.in_flight {
                let run_id: u64 = rand::random::<u32>().into();
                let before = scrape_fleet();
                let started = Instant::now();
                let result = match (mode, &target.server) {
                    (Mode::InProcess, Some(server)) => runtime.block_on(drive_in_process(
                        server.coupons.clone(),
                        run_id,
                        in_flight,
                        args.rate,
                        Duration::from_secs(args.duration_s),
                    )),
                    _ => drive_http(args, &target, run_id, in_flight)?,
                };
                let at_end = scrape_fleet();
                let issued_in_run = metric_value(&at_end, ISSUED) - metric_value(&before, ISSUED);
                // Drain: every accepted request issued.
                let goal = metric_value(&before, ISSUED) + result.accepted as f64;
                let mut now = at_end;
                let mut done = false;
                while started.elapsed() < Duration::from_secs(args.duration_s) + DRAIN_MAX {
                    if metric_value(&now, ISSUED) >= goal {
                        done = true;
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                    now = scrape_fleet();
                }
                let total_s = started.elapsed().as_secs_f64();
                let issued = metric_value(&now, ISSUED) - metric_value(&before, ISSUED);
                if !done {
                    lost.push(format!(
                        "{} merge {merge}: {issued} of {} accepted issued after {total_s:.0} s",
                        mode.name(),
                        result.accepted
                    ));
                }
                let merges = metric_value(&now, "hongbao_coupon_merge_size_count")
                    - metric_value(&before, "hongbao_coupon_merge_size_count");
                let merged = (metric_value(&now, "hongbao_coupon_merge_size_sum")
                    - metric_value(&before, "hongbao_coupon_merge_size_sum"))
                    / merges.max(1.0);
                let buckets = issue_buckets(&before, &now);
                let hello = if args.no_baseline || mode == Mode::InProcess {
                    "-".to_string()
                } else {
                    format!("{:.0}", hello_run(args, in_flight)?.per_second())
                };
                println!(
                    "{:<10} {:>5} {:>9} {:>9} {:>10.0} {:>8.2} {:>8.2} {:>10.0} {:>10.0} {:>8.2} {:>7.1} {:>9.1} {:>9.1} {:>7.2} {:>8}",
                    mode.name(),
                    merge,
                    if mode == Mode::InProcess && args.rate.is_some() {
                        format!("{}/s", args.rate.unwrap_or(0))
                    } else {
                        in_flight.to_string()
                    },
                    result.accepted,
                    result.accepted as f64 / result.submit_s.max(1e-9),
                    result.accept_us.value_at_quantile(0.5) as f64 / 1000.0,
                    result.accept_us.value_at_quantile(0.99) as f64 / 1000.0,
                    issued_in_run / result.submit_s.max(1e-9),
                    issued / total_s.max(1e-9),
                    total_s - result.submit_s,
                    merged,
                    bucket_quantile_ms(&buckets, 0.5),
                    bucket_quantile_ms(&buckets, 0.99),
                    within_ms(&buckets, crate::metrics::COUPON_ISSUE_GOAL_S),
                    hello
                );
                if result.refused > 0 {
                    println!(
                        "{:<10} {} requests not accepted (overload or errors)",
                        "", result.refused
                    );
                }
            }
        }
        target.stop()?;
    }
    if lost.is_empty() {
        Ok(())
    } else {
        Err(LoadgenError::Usage(format!(
            "accepted requests not issued: {}",
            lost.join("; ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issue_histogram_is_summed_over_partitions_whatever_the_label_order() {
        // Goal: a cluster node exposes one series per partition (labels in any order); each
        // bound counts once, with every partition's observations.
        let before = "hongbao_coupon_issue_seconds_bucket{le=\"0.1\",partition=\"p001\"} 1\n\
                      hongbao_coupon_issue_seconds_bucket{le=\"+Inf\",partition=\"p001\"} 1\n";
        let after = "# TYPE hongbao_coupon_issue_seconds histogram\n\
                     hongbao_coupon_issue_seconds_bucket{le=\"0.1\",partition=\"p001\"} 3\n\
                     hongbao_coupon_issue_seconds_bucket{le=\"+Inf\",partition=\"p001\"} 4\n\
                     hongbao_coupon_issue_seconds_bucket{partition=\"p002\",le=\"0.1\"} 5\n\
                     hongbao_coupon_issue_seconds_bucket{partition=\"p002\",le=\"+Inf\"} 8\n";
        let buckets = issue_buckets(before, after);
        assert_eq!(buckets, vec![(0.1, 7.0), (f64::INFINITY, 11.0)]);
        assert_eq!(bucket_quantile_ms(&buckets, 0.5), 100.0);
    }
}
