//! `loadgen soak` (issue 15): the night's mix at about half of capacity for a long time, a row
//! every --duration-s: the rate, p50/p99/p999 of that interval, the resident memory of the process
//! (an in-process server: the server's and the load generator's)
//! and data directory, the queues behind the intake (reward and payout lanes, the coupon
//! layers, the views' and the continuous audit's distance to the log's head) and the audit's
//! violations. What must hold: p99 flat, memory bounded, no queue growing, no violation, no
//! error.

use super::client::{self, Pace, RequestFactory, RunResult};
use super::{
    counted_addrs, dir_bytes, http_setup, megabytes, metric_value, resident_bytes, scrape,
    seed_users, LoadgenArgs, LoadgenError, Target,
};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::Request;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Wallets the deposits and reads spread over, users the rewards and coupons spread over.
const WALLETS: u64 = 100_000;
const USERS: u64 = 200_000;

/// The mix, per 20 requests: 7 deposits, 6 cash rewards, 3 wallet reads, 2 coupon requests
/// (asynchronous issuance), 2 withdrawals by seeded users.
/// Each interval's requests carry its `generation` in their ids (a connection's `n` starts
/// again at 0 in every interval): every request is new work, never a replay of an earlier one.
fn mix(
    addr: SocketAddr,
    target: &Target,
    run: u32,
    generation: Arc<AtomicU64>,
    methods: Arc<Vec<String>>,
) -> RequestFactory {
    let (admin, issuer, gateway) = (
        target.admin_key.clone(),
        target.issuer_key.clone(),
        target.gateway_key.clone(),
    );
    Arc::new(move |c, n| {
        let spread = (c as u64)
            .wrapping_mul(1_000_003)
            .wrapping_add(n.wrapping_mul(7_919));
        let id = format!(
            "sk{run}-{}-{c}-{n}",
            generation.load(std::sync::atomic::Ordering::Relaxed)
        );
        match spread % 20 {
            0..=6 => client::post_json(
                addr,
                &format!("/v1/wallets/skw{}/change/deposits", spread % WALLETS),
                Some(&admin),
                format!(r#"{{"order_id":"{id}","amount":{}}}"#, n % 97 + 1),
            ),
            7..=12 => client::post_json(
                addr,
                "/v1/rewards",
                Some(&issuer),
                format!(
                    r#"{{"order_id":"{id}","uid":"sku{}","activity_id":"soak{run}","scene":"rain","kind":"cash","amount":{}}}"#,
                    spread % USERS,
                    n % 500 + 1
                ),
            ),
            13..=15 => Request::get(format!("/v1/wallets/skw{}", spread % WALLETS))
                .header("host", addr.to_string())
                .header("authorization", format!("Bearer {gateway}"))
                .body(Full::new(Bytes::new()))
                .expect("static request parts"),
            16..=17 => client::post_json(
                addr,
                "/v1/coupons/issue",
                Some(&issuer),
                format!(
                    r#"{{"seq_no":"{id}","uid":"sku{}","batch_id":"soak{run}"}}"#,
                    spread % USERS
                ),
            ),
            _ => {
                let u = (spread % methods.len().max(1) as u64) as usize;
                client::post_json(
                    addr,
                    &format!("/v1/wallets/lw{u}/withdrawals"),
                    Some(&gateway),
                    format!(
                        r#"{{"order_id":"{id}","amount":100,"method_id":"{}"}}"#,
                        methods.get(u).map_or("", String::as_str)
                    ),
                )
            }
        }
    })
}

/// The queues behind the intake and the audit's state, read from the server's metrics.
struct Queues {
    reward_backlog: f64,
    payout_backlog: f64,
    coupon_backlog: f64,
    view_lag: f64,
    audit_lag: f64,
    violations: f64,
}

fn queues(addr: SocketAddr) -> Queues {
    let text = scrape(addr);
    let head = metric_value(&text, "hongbao_log_head_seq");
    let slowest_view = text
        .lines()
        .filter(|l| l.starts_with("hongbao_projection_checkpoint_seq{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .fold(f64::INFINITY, f64::min);
    Queues {
        reward_backlog: metric_value(&text, "hongbao_reward_lane_backlog"),
        payout_backlog: metric_value(&text, "hongbao_payout_lane_backlog"),
        coupon_backlog: metric_value(&text, "hongbao_coupon_layer_backlog"),
        view_lag: if slowest_view.is_finite() {
            (head - slowest_view).max(0.0)
        } else {
            f64::NAN
        },
        // No continuous audit on the target (its gauge never moved): not a pass, unknown.
        audit_lag: match metric_value(&text, "hongbao_audit_checked_seq") {
            0.0 if head > 0.0 => f64::NAN,
            checked => (head - checked).max(0.0),
        },
        // A family by check, absent while there is none (the sum of nothing is -0).
        violations: metric_value(&text, "hongbao_audit_violations_total") + 0.0,
    }
}

/// Requests that failed: no answer, or a 5xx. (A 4xx is the engine refusing on its rules.)
fn errors(result: &RunResult) -> u64 {
    result
        .statuses
        .iter()
        .filter(|(s, _)| **s == 0 || **s >= 500)
        .map(|(_, n)| n)
        .sum()
}

fn refusals(result: &RunResult) -> u64 {
    result
        .statuses
        .iter()
        .filter(|(s, _)| (400..500).contains(*s))
        .map(|(_, n)| n)
        .sum()
}

pub(super) fn soak(args: &LoadgenArgs) -> Result<(), LoadgenError> {
    let target = Target::new(args)?;
    target.require(true, true, true)?;
    let addr = target.addr;
    let run: u32 = rand::random();
    let setups = [
        (
            "PUT".to_string(),
            format!("/v1/admin/activities/soak{run}/budget"),
            r#"{"cash":1000000000000000,"subsidy":0}"#.to_string(),
        ),
        (
            "POST".to_string(),
            "/v1/coupon-batches".to_string(),
            format!(
                r#"{{"batch_id":"soak{run}","stock":1000000000,"per_user_limit":1000,"value":100}}"#
            ),
        ),
    ];
    for (method, path, body) in &setups {
        let (status, answer) = http_setup(addr, method, path, Some(&target.admin_key), body);
        if !(200..300).contains(&status) {
            return Err(LoadgenError::Usage(format!(
                "{method} {path}: {status} {answer}"
            )));
        }
    }
    let counted = counted_addrs(addr, args)?;
    let methods = Arc::new(seed_users(
        &target,
        &counted,
        args.users.max(1),
        100_000_000,
    )?);
    let generation = Arc::new(AtomicU64::new(0));
    let make = mix(addr, &target, run, generation.clone(), methods);
    let in_flight = args.in_flight.iter().copied().max().unwrap_or(256);
    let interval = Duration::from_secs(args.duration_s.max(1));
    let rate = match args.rate {
        Some(rate) => rate,
        None => {
            let capacity = client::drive(
                addr,
                in_flight,
                Duration::from_secs(args.warmup_s),
                interval,
                args.client_threads,
                make.clone(),
            )?;
            println!(
                "capacity of the mix at {in_flight} in flight: {:.0} req/s (p99 {:.2} ms); the soak offers half",
                capacity.per_second(),
                capacity.quantile_ms(0.99)
            );
            (capacity.per_second() / 2.0) as u64
        }
    };
    let per_s = NonZeroU32::new(rate.clamp(1, u32::MAX as u64) as u32).unwrap_or(NonZeroU32::MIN);
    // A burst of a tenth of a second at most: the pace is smooth, not a second's worth at once.
    let burst = NonZeroU32::new((per_s.get() / 10).max(1)).unwrap_or(NonZeroU32::MIN);
    let pace: Pace = Arc::new(governor::RateLimiter::direct(
        governor::Quota::per_second(per_s).allow_burst(burst),
    ));
    println!(
        "soak: {rate} req/s offered for {} s through {in_flight} connections, a row every {} s",
        args.soak_s,
        interval.as_secs()
    );
    println!(
        "{:>6} {:>9} {:>8} {:>8} {:>9} {:>7} {:>8} {:>7} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>6}",
        "t_s",
        "per_s",
        "p50_ms",
        "p99_ms",
        "p999_ms",
        "errors",
        "refused",
        "rss_mb",
        "disk_mb",
        "rewards",
        "payouts",
        "coupons",
        "view_lag",
        "audit_lag",
        "viol"
    );
    let started = Instant::now();
    let total = Duration::from_secs(args.soak_s.max(1));
    let mut rows: Vec<(f64, RunResult, Option<u64>, Queues)> = Vec::new();
    while started.elapsed() < total {
        generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let result = client::drive_paced(
            addr,
            in_flight,
            Duration::ZERO,
            interval,
            args.client_threads,
            make.clone(),
            Some(pace.clone()),
        )?;
        let q = queues(addr);
        let rss = target.server.as_ref().and_then(|_| resident_bytes());
        let mb = megabytes;
        println!(
            "{:>6.0} {:>9.0} {:>8.2} {:>8.2} {:>9.2} {:>7} {:>8} {:>7} {:>8} {:>8.0} {:>8.0} {:>8.0} {:>9.0} {:>9.0} {:>6.0}",
            started.elapsed().as_secs_f64(),
            result.per_second(),
            result.quantile_ms(0.50),
            result.quantile_ms(0.99),
            result.quantile_ms(0.999),
            errors(&result),
            refusals(&result),
            mb(rss),
            mb(target.data_dir.as_deref().map(dir_bytes)),
            q.reward_backlog,
            q.payout_backlog,
            q.coupon_backlog,
            q.view_lag,
            q.audit_lag,
            q.violations
        );
        rows.push((started.elapsed().as_secs_f64(), result, rss, q));
    }
    summary(&rows, rate);
    // The verdict on the whole log: the continuous audit must have replayed every event the
    // soak wrote (a dead or absent audit is a failure, not a pass).
    let deadline = Instant::now() + Duration::from_secs(120);
    let audited = loop {
        let q = queues(addr);
        if q.audit_lag == 0.0 || Instant::now() > deadline {
            break q;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    println!(
        "the continuous audit: {} events behind the head after the load, {} violations",
        audited.audit_lag, audited.violations
    );
    let failed_errors: u64 = rows.iter().map(|(_, r, _, _)| errors(r)).sum();
    let failed_refusals: u64 = rows.iter().map(|(_, r, _, _)| refusals(r)).sum();
    let violations = rows.last().map_or(0.0, |(_, _, _, q)| q.violations);
    target.stop()?;
    // A refusal (4xx) is the engine's rule, but the mix is built to be accepted: 429s
    // (throttled) or refusals of the seeded withdrawals mean the load was not what it claims.
    if violations > 0.0 || failed_errors > 0 || failed_refusals > 0 {
        return Err(LoadgenError::Usage(format!(
            "the soak failed: {violations} audit violations, {failed_errors} errors, {failed_refusals} refusals"
        )));
    }
    Ok(())
}

/// The soak's verdict lines: p99 of the first and last fifth, memory, queues at the end.
fn summary(rows: &[(f64, RunResult, Option<u64>, Queues)], rate: u64) {
    if rows.is_empty() {
        return;
    }
    let fifth = rows.len().div_ceil(5);
    let p99_of = |part: &[(f64, RunResult, Option<u64>, Queues)]| {
        let mut merged = part[0].1.latency_us.clone();
        for (_, r, _, _) in &part[1..] {
            let _ = merged.add(&r.latency_us);
        }
        merged.value_at_quantile(0.99) as f64 / 1000.0
    };
    let (first, last) = (&rows[..fifth], &rows[rows.len() - fifth..]);
    let rss: Vec<f64> = rows
        .iter()
        .filter_map(|(_, _, b, _)| b.map(|b| b as f64 / 1e6))
        .collect();
    let requests: u64 = rows.iter().map(|(_, r, _, _)| r.requests).sum();
    // An interval that did not reach the pace: the server (or the client) fell behind, and
    // its latencies understate the wait (a turn missed is not a request late).
    let short = rows
        .iter()
        .filter(|(_, r, _, _)| r.per_second() < rate as f64 * 0.95)
        .count();
    let worst_p99 = rows
        .iter()
        .map(|(_, r, _, _)| r.quantile_ms(0.99))
        .fold(0.0, f64::max);
    println!(
        "soak summary: {requests} requests at {rate} req/s offered ({short} of {} intervals below 95% of it); p99 {:.2} ms in the first fifth, {:.2} ms in the last (worst interval {worst_p99:.2} ms)",
        rows.len(),
        p99_of(first),
        p99_of(last)
    );
    if let (Some(first), Some(last)) = (rss.first(), rss.last()) {
        let peak = rss.iter().copied().fold(0.0, f64::max);
        println!("resident memory: {first:.0} MB after the first interval, {last:.0} MB at the end, {peak:.0} MB at most");
    }
    if let Some((_, _, _, q)) = rows.last() {
        println!(
            "at the end: reward lane backlog {:.0}, payout lane backlog {:.0}, coupon layer backlog {:.0}, slowest view {:.0} events behind, continuous audit {:.0} behind, {:.0} violations",
            q.reward_backlog, q.payout_backlog, q.coupon_backlog, q.view_lag, q.audit_lag, q.violations
        );
    }
}
