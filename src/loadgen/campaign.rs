//! `loadgen campaign` (issue 16, P12): the night's full chain, driven by virtual users against
//! an in-process server (a fresh temporary data directory) or a running one (`--target`).
//!
//! Each virtual user repeats, until `--duration-s` has passed (an iteration begun finishes):
//!
//! 1. a subsidy reward (`POST /v1/rewards`, kind subsidy), then the subsidy list
//!    (`GET /v1/wallets/{uid}/rewards?kind=subsidy`), where it picks the subsidy's token (the
//!    reward's own answer when the list has not shown it yet: the list is a projection);
//! 2. a B2C packet paid by that subsidy (`POST /v1/packets`), claimed by `--claimers`
//!    concurrent users with fresh uids until it is empty (`POST /v1/packets/{id}/claims`,
//!    polling on `429 busy` as P5's clients do), then its details (`GET /v1/packets/{id}`);
//! 3. a cash reward, withdrawn at once with its token to a payout method bound first
//!    (`POST /v1/wallets/{uid}/payout-methods`, `.../withdrawals`);
//! 4. a coupon request (`POST /v1/coupons/issue`, asynchronous).
//!
//! Every request, the set-up's budget and coupon batch included, carries
//! `X-Hongbao-Load-Test: 1` unless `--real-traffic` is given: a rehearsal on a production
//! server is processed by its load-test engine and never touches real money (D7). The
//! campaign therefore sets its own budgets and batch rather than relying on the server's.
//!
//! The report: a row per endpoint (route pattern) every `--interval-s` with the rate and
//! p50/p99 of that interval, a total per endpoint at the end (hdrhistogram), errors by
//! status and code, and 429s (admission control of a hot packet, or a throttle) counted
//! apart from errors: they are traffic shaping, honoured by waiting `retry_after_ms`. The
//! money checks: the claims of a packet never sum above its total and, once it is empty,
//! sum to exactly its total over exactly its shares; its details list exactly what the
//! claimers were answered. A plot (SVG, `--plot`) shows requests per second (all and per
//! endpoint) and p99 per second. Any unexpected error or failed check fails the run.

use super::packets::http1_connect as connect;
use super::{hello_run, LoadgenArgs, LoadgenError, Target};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// The header that marks a request as load-test traffic (API.md, D7).
use crate::http::load_test::HEADER as LOAD_TEST_HEADER;

/// The campaign's own options (the others, `--duration-s`, `--pool`, `--target` and its
/// keys, `--client-threads`, `--no-baseline`, are the load generator's).
#[derive(Debug, Clone, clap::Args)]
pub struct CampaignArgs {
    /// campaign: virtual users, each running the chain over and over.
    #[arg(long, default_value_t = 16)]
    pub vus: usize,
    /// campaign: concurrent claimers per packet, each claiming with fresh uids until the
    /// packet is empty.
    #[arg(long, default_value_t = 16)]
    pub claimers: usize,
    /// campaign: shares of each B2C packet (its total is about 100 fen a share).
    #[arg(long, default_value_t = 10)]
    pub packet_shares: u32,
    /// campaign: a report row per endpoint every this many seconds.
    #[arg(long, default_value_t = 5)]
    pub interval_s: u64,
    /// campaign: where to write the plot (SVG: requests/s and p99 per second; a relative path
    /// is from the current directory).
    #[arg(long, value_name = "FILE", default_value = "loadgen-campaign.svg")]
    pub plot: PathBuf,
    /// campaign: send real traffic, without the `X-Hongbao-Load-Test: 1` header every
    /// request carries by default. Only for a sandbox server: on production the campaign's
    /// rewards, packets and withdrawals would then be real money.
    #[arg(long)]
    pub real_traffic: bool,
}

/// A client polls a busy packet (or retries a throttled step) at most this many times (P5).
const POLLS_MAX: u32 = 10;
/// Average share in fen.
const SHARE_MEAN_FEN: u64 = 100;
/// How long a packet's claimers may take before the packet counts as stuck.
const PACKET_CLAIMING_MAX: Duration = Duration::from_secs(60);
/// How long the checks after the load wait for the packets' details to catch up.
const DETAILS_CATCH_UP_MAX: Duration = Duration::from_secs(30);
/// How long a set-up request (budget, batch) is retried while the answer says "retry".
const SETUP_RETRY_MAX: Duration = Duration::from_secs(30);
/// Latency range recorded: 1 us to 60 s.
const LATENCY_US_MAX: u64 = 60_000_000;
/// Budgets of the campaign's activity (fen): far above what a run can accept.
const BUDGET_FEN: u64 = 1_000_000_000_000_000;
/// Error examples kept for the report.
const ERROR_EXAMPLES_MAX: usize = 10;

/// The chain's endpoints, by route pattern (rewards by kind: two steps of the chain).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Endpoint {
    SubsidyReward,
    SubsidyList,
    PacketSend,
    PacketClaim,
    PacketDetails,
    PayoutMethod,
    CashReward,
    Withdrawal,
    CouponIssue,
}

impl Endpoint {
    pub const ALL: [Endpoint; 9] = [
        Endpoint::SubsidyReward,
        Endpoint::SubsidyList,
        Endpoint::PacketSend,
        Endpoint::PacketClaim,
        Endpoint::PacketDetails,
        Endpoint::PayoutMethod,
        Endpoint::CashReward,
        Endpoint::Withdrawal,
        Endpoint::CouponIssue,
    ];

    /// The method and route pattern (with the reward kind where two steps share a route).
    pub fn route(self) -> &'static str {
        match self {
            Endpoint::SubsidyReward => "POST /v1/rewards (subsidy)",
            Endpoint::SubsidyList => "GET /v1/wallets/{uid}/rewards",
            Endpoint::PacketSend => "POST /v1/packets",
            Endpoint::PacketClaim => "POST /v1/packets/{packet_id}/claims",
            Endpoint::PacketDetails => "GET /v1/packets/{packet_id}",
            Endpoint::PayoutMethod => "POST /v1/wallets/{uid}/payout-methods",
            Endpoint::CashReward => "POST /v1/rewards (cash)",
            Endpoint::Withdrawal => "POST /v1/wallets/{uid}/withdrawals",
            Endpoint::CouponIssue => "POST /v1/coupons/issue",
        }
    }

    /// The plot's legend.
    fn short(self) -> &'static str {
        match self {
            Endpoint::SubsidyReward => "subsidy reward",
            Endpoint::SubsidyList => "subsidy list",
            Endpoint::PacketSend => "B2C send",
            Endpoint::PacketClaim => "claims",
            Endpoint::PacketDetails => "details",
            Endpoint::PayoutMethod => "bind method",
            Endpoint::CashReward => "cash reward",
            Endpoint::Withdrawal => "withdrawals",
            Endpoint::CouponIssue => "coupons",
        }
    }

    /// Plotted: every step but the one-off binding of a method.
    fn plotted(self) -> bool {
        self != Endpoint::PayoutMethod
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What an answer was, for the report.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// The answer the step expects.
    Ok,
    /// 429: admission control of a hot packet, or a throttle; retried after its hint.
    Throttled,
    /// 410 `packet_empty` to a claim: how a claimer learns the packet is done.
    Empty,
    /// Anything else (0: no answer).
    Error { status: u16, code: String },
}

/// An endpoint's figures (or all endpoints') over the whole run.
#[derive(Debug, Clone)]
pub struct EndpointFigures {
    /// None: every endpoint together.
    pub endpoint: Option<Endpoint>,
    pub route: &'static str,
    /// Requests sent: every answer (whatever its status), and those that got none.
    pub requests: u64,
    pub ok: u64,
    pub throttled: u64,
    pub empty: u64,
    pub errors: u64,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// An endpoint's figures (or all endpoints') over one interval.
#[derive(Debug, Clone)]
pub struct IntervalRow {
    /// Seconds since the start at the interval's end.
    pub t_s: f64,
    /// None: every endpoint together.
    pub endpoint: Option<Endpoint>,
    pub requests: u64,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    pub throttled: u64,
}

/// One second of the run: requests answered in it and their p99, per endpoint and in all.
#[derive(Debug, Clone)]
pub struct SecondRow {
    pub t_s: u64,
    /// How much of the second the run covered (less than 1 for the last one).
    pub span_s: f64,
    /// By [`Endpoint::ALL`] order.
    pub requests: Vec<u64>,
    pub p99_ms: Vec<Option<f64>>,
    pub all_requests: u64,
    pub all_p99_ms: Option<f64>,
}

/// Unexpected answers of one kind.
#[derive(Debug, Clone)]
pub struct ErrorCount {
    pub endpoint: Endpoint,
    /// 0: no answer (connection failed).
    pub status: u16,
    pub code: String,
    pub count: u64,
}

/// What the campaign measured and checked.
#[derive(Debug, Clone)]
pub struct Report {
    pub load_test: bool,
    pub elapsed_s: f64,
    /// By [`Endpoint::ALL`] order.
    pub totals: Vec<EndpointFigures>,
    pub all: EndpointFigures,
    pub intervals: Vec<IntervalRow>,
    pub seconds: Vec<SecondRow>,
    pub errors: Vec<ErrorCount>,
    pub error_examples: Vec<String>,
    pub money_failures: Vec<String>,
    pub packets_sent: u64,
    pub packets_exhausted: u64,
    pub packet_fen: u64,
    pub claimed_fen: u64,
    pub subsidies_listed_late: u64,
    pub withdrawals: u64,
    pub withdrawn_fen: u64,
    pub coupons: u64,
    /// Hello-world at `--pool` connections after the campaign (req/s, p99 ms).
    pub hello: Option<(f64, f64)>,
    pub plot: PathBuf,
}

impl Report {
    pub fn figures(&self, endpoint: Endpoint) -> &EndpointFigures {
        &self.totals[endpoint.index()]
    }

    pub fn unexpected_errors(&self) -> u64 {
        self.errors.iter().map(|e| e.count).sum()
    }

    /// Ok when nothing unexpected was answered and every money check held.
    pub fn verdict(&self) -> Result<(), LoadgenError> {
        let errors = self.unexpected_errors();
        if errors == 0 && self.money_failures.is_empty() {
            return Ok(());
        }
        let mut lines = vec![format!(
            "the campaign failed: {errors} unexpected errors, {} failed money checks",
            self.money_failures.len()
        )];
        lines.extend(self.money_failures.iter().take(20).cloned());
        lines.extend(self.error_examples.iter().cloned());
        Err(LoadgenError::Usage(lines.join("\n")))
    }
}

fn histogram(significant: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, significant).expect("static histogram bounds")
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// The lane of every endpoint together, after the endpoints' own.
const ALL_LANE: usize = Endpoint::ALL.len();

/// One endpoint's counters (or all endpoints'): the whole run, the open interval, the open
/// second.
struct Lane {
    total: Histogram<u64>,
    interval: Histogram<u64>,
    second: Histogram<u64>,
    requests: u64,
    ok: u64,
    throttled: u64,
    empty: u64,
    errors: u64,
    interval_requests: u64,
    interval_errors: u64,
    interval_throttled: u64,
    second_requests: u64,
}

impl Lane {
    fn new() -> Lane {
        Lane {
            total: histogram(3),
            // Two digits are enough for a second's or an interval's quantiles.
            interval: histogram(2),
            second: histogram(2),
            requests: 0,
            ok: 0,
            throttled: 0,
            empty: 0,
            errors: 0,
            interval_requests: 0,
            interval_errors: 0,
            interval_throttled: 0,
            second_requests: 0,
        }
    }

    fn record(&mut self, us: Option<u64>, outcome: &Outcome) {
        self.requests += 1;
        self.interval_requests += 1;
        self.second_requests += 1;
        // Latency of every answer on the route (a refusal is an answer too); a request that
        // got none has no latency to speak of.
        if let Some(us) = us {
            let _ = self.total.record(us);
            let _ = self.interval.record(us);
            let _ = self.second.record(us);
        }
        match outcome {
            Outcome::Ok => self.ok += 1,
            Outcome::Throttled => {
                self.throttled += 1;
                self.interval_throttled += 1;
            }
            Outcome::Empty => self.empty += 1,
            Outcome::Error { .. } => {
                self.errors += 1;
                self.interval_errors += 1;
            }
        }
    }

    fn figures(&self, endpoint: Option<Endpoint>, elapsed_s: f64) -> EndpointFigures {
        EndpointFigures {
            endpoint,
            route: endpoint.map_or("all", Endpoint::route),
            requests: self.requests,
            ok: self.ok,
            throttled: self.throttled,
            empty: self.empty,
            errors: self.errors,
            per_second: self.requests as f64 / elapsed_s.max(1e-9),
            p50_ms: ms(&self.total, 0.5),
            p99_ms: ms(&self.total, 0.99),
            p999_ms: ms(&self.total, 0.999),
            max_ms: self.total.max() as f64 / 1000.0,
        }
    }
}

fn endpoint_of(lane: usize) -> Option<Endpoint> {
    Endpoint::ALL.get(lane).copied()
}

struct Tally {
    open_second: u64,
    /// The endpoints' in [`Endpoint::ALL`] order, then all of them ([`ALL_LANE`]).
    lanes: Vec<Lane>,
    seconds: Vec<SecondRow>,
    errors: BTreeMap<(Endpoint, u16, String), u64>,
    error_examples: Vec<String>,
    interval_started: f64,
    intervals: Vec<IntervalRow>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            open_second: 0,
            lanes: (0..=ALL_LANE).map(|_| Lane::new()).collect(),
            seconds: Vec::new(),
            errors: BTreeMap::new(),
            error_examples: Vec::new(),
            interval_started: 0.0,
            intervals: Vec::new(),
        }
    }

    /// Closes every second before `second`.
    fn advance(&mut self, second: u64) {
        while self.open_second < second {
            let p99 = |l: &Lane| (!l.second.is_empty()).then(|| ms(&l.second, 0.99));
            let (endpoints, all) = self.lanes.split_at(ALL_LANE);
            let row = SecondRow {
                t_s: self.open_second,
                span_s: 1.0,
                requests: endpoints.iter().map(|l| l.second_requests).collect(),
                p99_ms: endpoints.iter().map(p99).collect(),
                all_requests: all[0].second_requests,
                all_p99_ms: p99(&all[0]),
            };
            self.seconds.push(row);
            for lane in &mut self.lanes {
                lane.second.reset();
                lane.second_requests = 0;
            }
            self.open_second += 1;
        }
    }

    /// Closes the last second, partly covered by a run of `elapsed`.
    fn finish(&mut self, elapsed: Duration) {
        let fraction = elapsed.as_secs_f64() - elapsed.as_secs() as f64;
        if fraction > 0.0 {
            self.advance(elapsed.as_secs() + 1);
            if let Some(last) = self.seconds.last_mut() {
                last.span_s = fraction;
            }
        } else {
            self.advance(elapsed.as_secs());
        }
    }

    /// Closes the open interval at `t_s`: its rows (the endpoints with requests, then all).
    fn close_interval(&mut self, t_s: f64) -> Vec<IntervalRow> {
        let span = (t_s - self.interval_started).max(1e-9);
        let mut rows = Vec::new();
        for (k, lane) in self.lanes.iter_mut().enumerate() {
            if lane.interval_requests > 0 {
                rows.push(IntervalRow {
                    t_s,
                    endpoint: endpoint_of(k),
                    requests: lane.interval_requests,
                    per_second: lane.interval_requests as f64 / span,
                    p50_ms: ms(&lane.interval, 0.5),
                    p99_ms: ms(&lane.interval, 0.99),
                    errors: lane.interval_errors,
                    throttled: lane.interval_throttled,
                });
            }
            lane.interval.reset();
            lane.interval_requests = 0;
            lane.interval_errors = 0;
            lane.interval_throttled = 0;
        }
        self.interval_started = t_s;
        self.intervals.extend(rows.iter().cloned());
        rows
    }
}

/// Where every answer is counted.
struct Recorder {
    started: Instant,
    tally: Mutex<Tally>,
}

impl Recorder {
    fn new() -> Recorder {
        Recorder {
            started: Instant::now(),
            tally: Mutex::new(Tally::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, endpoint: Endpoint, latency: Duration, outcome: Outcome, detail: &str) {
        let second = self.started.elapsed().as_secs();
        let answered = !matches!(outcome, Outcome::Error { status: 0, .. });
        let us = answered.then(|| (latency.as_micros() as u64).clamp(1, LATENCY_US_MAX));
        let mut tally = self.lock();
        tally.advance(second);
        tally.lanes[endpoint.index()].record(us, &outcome);
        tally.lanes[ALL_LANE].record(us, &outcome);
        if let Outcome::Error { status, code } = outcome {
            if tally.error_examples.len() < ERROR_EXAMPLES_MAX {
                tally
                    .error_examples
                    .push(format!("{}: {status} {detail}", endpoint.route()));
            }
            *tally.errors.entry((endpoint, status, code)).or_default() += 1;
        }
    }
}

/// An answer: status (0: none), JSON body (Null if none or not JSON), latency.
struct Answer {
    status: u16,
    json: Value,
    latency: Duration,
    text: String,
}

impl Answer {
    fn code(&self) -> String {
        self.json["code"].as_str().unwrap_or("-").to_owned()
    }

    fn retry_after(&self) -> Duration {
        Duration::from_millis(
            self.json["retry_after_ms"]
                .as_u64()
                .unwrap_or(50)
                .clamp(5, 1_000),
        )
    }
}

/// Keep-alive HTTP/1.1 connections shared by every task, at most `size` in use at once (the
/// requests in flight), opened when needed and replaced when broken.
struct Http {
    addr: SocketAddr,
    load_test: bool,
    permits: tokio::sync::Semaphore,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
    recorder: Arc<Recorder>,
}

impl Http {
    fn new(addr: SocketAddr, load_test: bool, connections: usize, recorder: Arc<Recorder>) -> Http {
        Http {
            addr,
            load_test,
            permits: tokio::sync::Semaphore::new(connections),
            idle: Mutex::new(Vec::new()),
            recorder,
        }
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        key: &str,
        body: Option<&str>,
    ) -> Request<Full<Bytes>> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string())
            .header("authorization", format!("Bearer {key}"));
        if body.is_some() {
            builder = builder.header("content-type", "application/json");
        }
        if self.load_test {
            builder = builder.header(LOAD_TEST_HEADER, "1");
        }
        builder
            .body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))
            .expect("static request parts")
    }

    /// One request, not recorded.
    async fn send(&self, method: Method, path: &str, key: &str, body: Option<&str>) -> Answer {
        let failed = |text: String| Answer {
            status: 0,
            json: Value::Null,
            latency: Duration::ZERO,
            text,
        };
        let Ok(_permit) = self.permits.acquire().await else {
            return failed("connections closed".into());
        };
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut sender = match idle {
            Some(sender) => sender,
            None => match connect(self.addr).await {
                Ok(sender) => sender,
                Err(e) => return failed(e),
            },
        };
        if sender.ready().await.is_err() {
            // Closed while idle (the server ends keep-alive connections idle past its
            // timeout): nothing was sent, so a fresh connection takes its place.
            sender = match connect(self.addr).await {
                Ok(sender) => sender,
                Err(e) => return failed(e),
            };
            if let Err(e) = sender.ready().await {
                return failed(e.to_string());
            }
        }
        let request = self.request(method, path, key, body);
        let started = Instant::now();
        let response = match sender.send_request(request).await {
            Ok(response) => response,
            Err(e) => return failed(e.to_string()),
        };
        let status = response.status().as_u16();
        let bytes = match response.into_body().collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) => return failed(e.to_string()),
        };
        let latency = started.elapsed();
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(sender);
        Answer {
            status,
            json: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            latency,
            text: String::from_utf8_lossy(&bytes).chars().take(300).collect(),
        }
    }

    /// A step of the chain: sent until it is not throttled (at most [`POLLS_MAX`] times),
    /// every attempt recorded; the body when the answer is the `expected` status.
    async fn step(
        &self,
        endpoint: Endpoint,
        method: Method,
        path: &str,
        key: &str,
        body: Option<&str>,
        expected: u16,
    ) -> Option<Value> {
        for attempt in 1..=POLLS_MAX {
            let answer = self.send(method.clone(), path, key, body).await;
            match answer.status {
                s if s == expected => {
                    self.recorder
                        .record(endpoint, answer.latency, Outcome::Ok, "");
                    return Some(answer.json);
                }
                // Throttled every time: the step is given up, which is an error of the run.
                429 if attempt < POLLS_MAX => {
                    self.recorder
                        .record(endpoint, answer.latency, Outcome::Throttled, "");
                    tokio::time::sleep(answer.retry_after()).await;
                }
                status => {
                    let code = answer.code();
                    self.recorder.record(
                        endpoint,
                        answer.latency,
                        Outcome::Error { status, code },
                        &answer.text,
                    );
                    return None;
                }
            }
        }
        None
    }

    /// A set-up request, retried while the answer says "retry" (no answer, 408, 429, 503).
    async fn setup(
        &self,
        method: Method,
        path: &str,
        key: &str,
        body: &str,
    ) -> Result<Value, LoadgenError> {
        let deadline = Instant::now() + SETUP_RETRY_MAX;
        loop {
            let answer = self.send(method.clone(), path, key, Some(body)).await;
            if (200..300).contains(&answer.status) {
                return Ok(answer.json);
            }
            if !matches!(answer.status, 0 | 408 | 429 | 503) || Instant::now() >= deadline {
                return Err(LoadgenError::Usage(format!(
                    "{method} {path}: {} {}",
                    answer.status, answer.text
                )));
            }
            tokio::time::sleep(answer.retry_after().max(Duration::from_millis(100))).await;
        }
    }
}

/// Money and chain counters (fen are integers).
#[derive(Default)]
struct Money {
    packets_sent: u64,
    packets_exhausted: u64,
    packet_fen: u64,
    claimed_fen: u64,
    subsidies_listed_late: u64,
    withdrawals: u64,
    withdrawn_fen: u64,
    coupons: u64,
    failures: Vec<String>,
}

/// A packet whose details had not caught up when read: checked again after the load.
struct Unsettled {
    packet_id: String,
    total: u64,
    count: u32,
    wins: HashMap<String, u64>,
}

struct Ctx {
    http: Http,
    run: String,
    activity: String,
    batch: String,
    issuer: String,
    gateway: String,
    shares: u32,
    claimers: usize,
    deadline: Instant,
    money: Mutex<Money>,
    unsettled: Mutex<Vec<Unsettled>>,
}

impl Ctx {
    /// A reward of the campaign's activity (`SubsidyReward`: subsidy, `CashReward`: cash),
    /// accepted 202: its answer.
    async fn reward(
        &self,
        endpoint: Endpoint,
        order_id: &str,
        uid: &str,
        scene: &str,
        amount: u64,
    ) -> Option<Value> {
        let kind = match endpoint {
            Endpoint::SubsidyReward => "subsidy",
            _ => "cash",
        };
        let body = serde_json::json!({
            "order_id": order_id, "uid": uid, "activity_id": self.activity, "scene": scene,
            "kind": kind, "amount": amount,
        })
        .to_string();
        self.http
            .step(
                endpoint,
                Method::POST,
                "/v1/rewards",
                &self.issuer,
                Some(&body),
                202,
            )
            .await
    }
}

impl Ctx {
    fn money(&self) -> std::sync::MutexGuard<'_, Money> {
        self.money.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail(&self, failure: String) {
        self.money().failures.push(failure);
    }
}

/// What one claimer got from a packet.
#[derive(Default)]
struct Claimed {
    wins: Vec<(String, u64)>,
    saw_empty: bool,
    failures: u64,
}

async fn claimer(ctx: Arc<Ctx>, packet_id: Arc<str>, next_uid: Arc<AtomicU64>) -> Claimed {
    let mut claimed = Claimed::default();
    let path = format!("/v1/packets/{packet_id}/claims");
    let started = Instant::now();
    'uids: while started.elapsed() < PACKET_CLAIMING_MAX {
        let uid = format!("{packet_id}-u{}", next_uid.fetch_add(1, Ordering::Relaxed));
        let body = format!(r#"{{"uid":"{uid}"}}"#);
        for _ in 0..POLLS_MAX {
            let answer = ctx
                .http
                .send(Method::POST, &path, &ctx.gateway, Some(&body))
                .await;
            let recorder = &ctx.http.recorder;
            match answer.status {
                200 => {
                    recorder.record(Endpoint::PacketClaim, answer.latency, Outcome::Ok, "");
                    match answer.json["amount"].as_u64() {
                        Some(amount) if amount > 0 => claimed.wins.push((uid, amount)),
                        _ => ctx.fail(format!(
                            "packet {packet_id}: a claim answered without a positive amount: {}",
                            answer.text
                        )),
                    }
                    continue 'uids;
                }
                410 if answer.json["code"] == "packet_empty" => {
                    recorder.record(Endpoint::PacketClaim, answer.latency, Outcome::Empty, "");
                    claimed.saw_empty = true;
                    break 'uids;
                }
                429 => {
                    recorder.record(
                        Endpoint::PacketClaim,
                        answer.latency,
                        Outcome::Throttled,
                        "",
                    );
                    tokio::time::sleep(answer.retry_after()).await;
                }
                status => {
                    let code = answer.code();
                    recorder.record(
                        Endpoint::PacketClaim,
                        answer.latency,
                        Outcome::Error { status, code },
                        &answer.text,
                    );
                    claimed.failures += 1;
                    // A packet that only fails must not be claimed forever.
                    if claimed.failures > u64::from(POLLS_MAX) {
                        break 'uids;
                    }
                    continue 'uids;
                }
            }
        }
        // Polled POLLS_MAX times without a turn: this user gives up, the next one tries.
    }
    claimed
}

/// Subsidy -> list -> B2C packet -> concurrent claims -> details, with the money checks.
async fn subsidy_chain(ctx: &Arc<Ctx>, uid: &str, v: usize, i: u64) {
    let run = &ctx.run;
    let shares = ctx.shares;
    // About 100 fen a share, varied so that packets differ; at least a fen a share.
    let total = u64::from(shares) * SHARE_MEAN_FEN + (v as u64 * 31 + i * 7) % 97;
    let order_id = format!("cs{run}-{v}-{i}");
    let http = &ctx.http;
    let Some(accepted) = ctx
        .reward(Endpoint::SubsidyReward, &order_id, uid, "packet", total)
        .await
    else {
        return;
    };
    let Some(listed) = http
        .step(
            Endpoint::SubsidyList,
            Method::GET,
            &format!("/v1/wallets/{uid}/rewards?kind=subsidy&limit=20"),
            &ctx.gateway,
            None,
            200,
        )
        .await
    else {
        return;
    };
    // The user picks the subsidy from the list; the list is a view of the log and may not
    // show a reward accepted a moment ago: then the token the reward was answered with.
    let from_list = listed.as_array().and_then(|items| {
        items
            .iter()
            .find(|r| r["order_id"] == order_id.as_str())
            .and_then(|r| r["token"].as_str().map(str::to_owned))
    });
    let token = match from_list {
        Some(token) => token,
        None => {
            ctx.money().subsidies_listed_late += 1;
            match accepted["token"].as_str() {
                Some(token) => token.to_owned(),
                None => {
                    ctx.fail(format!("subsidy {order_id}: accepted without a token"));
                    return;
                }
            }
        }
    };
    let packet_id = format!("cp{run}-{v}-{i}");
    let send = format!(
        r#"{{"packet_id":"{packet_id}","sender_uid":"{uid}","mode":"b2c","total":{total},"count":{shares},"split":"lucky","subsidy_token":"{token}"}}"#
    );
    let Some(created) = http
        .step(
            Endpoint::PacketSend,
            Method::POST,
            "/v1/packets",
            &ctx.gateway,
            Some(&send),
            201,
        )
        .await
    else {
        return;
    };
    if created["state"] != "active" {
        ctx.fail(format!(
            "packet {packet_id}: a B2C packet paid by its subsidy is {}, not active",
            created["state"]
        ));
        return;
    }
    {
        let mut money = ctx.money();
        money.packets_sent += 1;
        money.packet_fen += total;
    }
    let packet: Arc<str> = Arc::from(packet_id.as_str());
    let next_uid = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..ctx.claimers)
        .map(|_| tokio::spawn(claimer(ctx.clone(), packet.clone(), next_uid.clone())))
        .collect();
    let mut wins: HashMap<String, u64> = HashMap::new();
    let mut every_claimer_saw_empty = true;
    for task in tasks {
        match task.await {
            Ok(claimed) => {
                every_claimer_saw_empty &= claimed.saw_empty;
                for (claimer_uid, amount) in claimed.wins {
                    if wins.insert(claimer_uid.clone(), amount).is_some() {
                        ctx.fail(format!("packet {packet_id}: {claimer_uid} won twice"));
                    }
                }
            }
            Err(e) => {
                every_claimer_saw_empty = false;
                ctx.fail(format!("packet {packet_id}: a claimer panicked: {e}"));
            }
        }
    }
    let claimed: u64 = wins.values().sum();
    ctx.money().claimed_fen += claimed;
    if claimed > total {
        ctx.fail(format!(
            "packet {packet_id}: claims sum to {claimed} fen, above its total of {total}"
        ));
    }
    if wins.len() > shares as usize {
        ctx.fail(format!(
            "packet {packet_id}: {} claims won, more than its {shares} shares",
            wins.len()
        ));
    }
    if every_claimer_saw_empty {
        ctx.money().packets_exhausted += 1;
        if claimed != total || wins.len() != shares as usize {
            ctx.fail(format!(
                "packet {packet_id}: empty after {} claims summing to {claimed} fen; expected {shares} claims and {total} fen",
                wins.len()
            ));
        }
    } else {
        ctx.fail(format!(
            "packet {packet_id}: claiming ended before the packet was empty ({} of {shares} shares, {claimed} of {total} fen)",
            wins.len()
        ));
    }
    let Some(details) = http
        .step(
            Endpoint::PacketDetails,
            Method::GET,
            &format!("/v1/packets/{packet_id}"),
            &ctx.gateway,
            None,
            200,
        )
        .await
    else {
        return;
    };
    match check_details(&packet_id, total, shares, &wins, &details) {
        Check::Settled => {}
        Check::Behind => ctx
            .unsettled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Unsettled {
                packet_id,
                total,
                count: shares,
                wins,
            }),
        Check::Wrong(failure) => ctx.fail(failure),
    }
}

enum Check {
    /// Exhausted, and exactly the claims the claimers were answered.
    Settled,
    /// Consistent so far, but the view has not applied every claim yet.
    Behind,
    Wrong(String),
}

/// A packet's details against what its claimers were answered.
fn check_details(
    packet_id: &str,
    total: u64,
    count: u32,
    wins: &HashMap<String, u64>,
    details: &Value,
) -> Check {
    if details["total"].as_u64() != Some(total)
        || details["count"].as_u64() != Some(u64::from(count))
        || details["mode"] != "b2c"
    {
        return Check::Wrong(format!(
            "packet {packet_id}: details say total {}, count {}, mode {}; sent {total} fen in {count} shares, b2c",
            details["total"], details["count"], details["mode"]
        ));
    }
    let listed = details["claims"].as_array().cloned().unwrap_or_default();
    let mut listed_fen = 0u64;
    for claim in &listed {
        let (uid, amount) = (
            claim["uid"].as_str().unwrap_or(""),
            claim["amount"].as_u64(),
        );
        if amount.is_none() || wins.get(uid).copied() != amount {
            return Check::Wrong(format!(
                "packet {packet_id}: details list {uid} with {:?} fen; its claimer was answered {:?}",
                amount,
                wins.get(uid)
            ));
        }
        listed_fen += amount.unwrap_or(0);
    }
    if listed_fen > total {
        return Check::Wrong(format!(
            "packet {packet_id}: details list claims of {listed_fen} fen, above its total of {total}"
        ));
    }
    if details["state"] != "exhausted" {
        return Check::Behind;
    }
    let remaining = details["remaining_amount"].as_u64();
    if listed.len() != wins.len() || listed_fen != total || remaining != Some(0) {
        return Check::Wrong(format!(
            "packet {packet_id}: exhausted with {} claims listed summing to {listed_fen} fen and {:?} remaining; its total is {total}, {} claims won",
            listed.len(),
            remaining,
            wins.len()
        ));
    }
    Check::Settled
}

/// Cash reward -> withdrawal with its token (credited at once, W6).
async fn cash_chain(ctx: &Ctx, uid: &str, method_id: &str, v: usize, i: u64) {
    let run = &ctx.run;
    // 1.00 to 2.99 yuan: at least the minimum withdrawal.
    let amount = 100 + (v as u64 * 13 + i * 29) % 200;
    let http = &ctx.http;
    let Some(accepted) = ctx
        .reward(
            Endpoint::CashReward,
            &format!("kc{run}-{v}-{i}"),
            uid,
            "rain",
            amount,
        )
        .await
    else {
        return;
    };
    let Some(token) = accepted["token"].as_str() else {
        ctx.fail(format!(
            "cash reward kc{run}-{v}-{i}: accepted without a token"
        ));
        return;
    };
    let withdrawal = format!(
        r#"{{"order_id":"cw{run}-{v}-{i}","amount":{amount},"method_id":"{method_id}","tokens":["{token}"]}}"#
    );
    if http
        .step(
            Endpoint::Withdrawal,
            Method::POST,
            &format!("/v1/wallets/{uid}/withdrawals"),
            &ctx.gateway,
            Some(&withdrawal),
            202,
        )
        .await
        .is_some()
    {
        let mut money = ctx.money();
        money.withdrawals += 1;
        money.withdrawn_fen += amount;
    }
}

async fn coupon(ctx: &Ctx, v: usize, i: u64) {
    let run = &ctx.run;
    // A user per request: the batch's per-user limit is not what is measured.
    let body = format!(
        r#"{{"seq_no":"cq{run}-{v}-{i}","uid":"cu{run}-{v}-{i}","batch_id":"{}"}}"#,
        ctx.batch
    );
    if ctx
        .http
        .step(
            Endpoint::CouponIssue,
            Method::POST,
            "/v1/coupons/issue",
            &ctx.issuer,
            Some(&body),
            202,
        )
        .await
        .is_some()
    {
        ctx.money().coupons += 1;
    }
}

async fn virtual_user(ctx: Arc<Ctx>, v: usize) {
    let uid = format!("cv{}-{v}", ctx.run);
    let mut method_id: Option<String> = None;
    let mut i = 0u64;
    while Instant::now() < ctx.deadline {
        subsidy_chain(&ctx, &uid, v, i).await;
        if method_id.is_none() {
            let bind = format!(r#"{{"kind":"alipay","account":"{uid}@example.com"}}"#);
            method_id = ctx
                .http
                .step(
                    Endpoint::PayoutMethod,
                    Method::POST,
                    &format!("/v1/wallets/{uid}/payout-methods"),
                    &ctx.gateway,
                    Some(&bind),
                    201,
                )
                .await
                .and_then(|b| b["method_id"].as_str().map(str::to_owned));
        }
        if let Some(method_id) = &method_id {
            cash_chain(&ctx, &uid, method_id, v, i).await;
        }
        coupon(&ctx, v, i).await;
        i += 1;
    }
}

/// Polls the details of the packets whose view was behind until each is exhausted with
/// exactly the claims won (not recorded: the load is over).
async fn settle(ctx: &Ctx) {
    let mut pending = std::mem::take(&mut *ctx.unsettled.lock().unwrap_or_else(|e| e.into_inner()));
    let deadline = Instant::now() + DETAILS_CATCH_UP_MAX;
    while !pending.is_empty() {
        let mut behind = Vec::new();
        for packet in pending {
            let answer = ctx
                .http
                .send(
                    Method::GET,
                    &format!("/v1/packets/{}", packet.packet_id),
                    &ctx.gateway,
                    None,
                )
                .await;
            if answer.status != 200 {
                behind.push(packet);
                continue;
            }
            match check_details(
                &packet.packet_id,
                packet.total,
                packet.count,
                &packet.wins,
                &answer.json,
            ) {
                Check::Settled => {}
                Check::Behind => behind.push(packet),
                Check::Wrong(failure) => ctx.fail(failure),
            }
        }
        pending = behind;
        if Instant::now() >= deadline {
            for packet in &pending {
                ctx.fail(format!(
                    "packet {}: details not exhausted {} s after the load",
                    packet.packet_id,
                    DETAILS_CATCH_UP_MAX.as_secs()
                ));
            }
            break;
        }
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn print_interval_header() {
    println!(
        "{:>6} {:<38} {:>8} {:>9} {:>8} {:>8} {:>7} {:>6}",
        "t_s", "endpoint", "requests", "req/s", "p50_ms", "p99_ms", "errors", "429"
    );
}

fn print_interval(rows: &[IntervalRow]) {
    for r in rows {
        println!(
            "{:>6.1} {:<38} {:>8} {:>9.0} {:>8.2} {:>8.2} {:>7} {:>6}",
            r.t_s,
            r.endpoint.map_or("all", Endpoint::route),
            r.requests,
            r.per_second,
            r.p50_ms,
            r.p99_ms,
            r.errors,
            r.throttled
        );
    }
}

/// Runs the campaign, prints its report, writes the plot; the report says whether it passed
/// ([`Report::verdict`]). An error here is one of the set-up (server, keys, budget, batch).
pub fn campaign(args: &LoadgenArgs) -> Result<Report, LoadgenError> {
    let c = &args.campaign;
    if c.vus == 0 || c.claimers == 0 || args.pool == 0 || c.interval_s == 0 {
        return Err(LoadgenError::Usage(
            "--vus, --claimers, --pool and --interval-s must be positive".into(),
        ));
    }
    if c.packet_shares == 0 || c.packet_shares > crate::domain::packet::SHARES_MAX {
        return Err(LoadgenError::Usage(format!(
            "--packet-shares must be 1 to {}",
            crate::domain::packet::SHARES_MAX
        )));
    }
    let target = Target::new(args)?;
    target.require(true, true, true)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()?;
    let load_test = !c.real_traffic;
    let run = format!("{:08x}", rand::random::<u32>());
    println!(
        "campaign: {} virtual users, each: subsidy -> list -> B2C packet of {} shares -> {} concurrent claimers -> details; cash reward -> withdrawal; coupon request",
        c.vus, c.packet_shares, c.claimers
    );
    println!(
        "{} s through at most {} connections ({} client threads) to {} ({}); run {run}",
        args.duration_s,
        args.pool,
        args.client_threads.max(1),
        target.addr,
        if target.server.is_some() {
            "in-process server, fresh data directory"
        } else {
            "--target"
        }
    );
    println!(
        "traffic: {}",
        if load_test {
            "load test (every request carries X-Hongbao-Load-Test: 1)"
        } else {
            "REAL (--real-traffic: no X-Hongbao-Load-Test header)"
        }
    );
    // The campaign's own budget and batch, set with the same header as its traffic (not
    // counted: the clock starts with the load).
    let setup = Http::new(target.addr, load_test, 4, Arc::new(Recorder::new()));
    runtime.block_on(async {
        let admin = &target.admin_key;
        setup
            .setup(
                Method::PUT,
                &format!("/v1/admin/activities/camp{run}/budget"),
                admin,
                &format!(r#"{{"cash":{BUDGET_FEN},"subsidy":{BUDGET_FEN}}}"#),
            )
            .await?;
        setup
            .setup(
                Method::POST,
                "/v1/coupon-batches",
                admin,
                &format!(
                    r#"{{"batch_id":"camp{run}","stock":{},"per_user_limit":1,"value":100}}"#,
                    crate::domain::coupon::STOCK_MAX
                ),
            )
            .await?;
        Ok::<(), LoadgenError>(())
    })?;
    drop(setup);
    let recorder = Arc::new(Recorder::new());
    let ctx = Arc::new(Ctx {
        http: Http::new(target.addr, load_test, args.pool, recorder.clone()),
        activity: format!("camp{run}"),
        batch: format!("camp{run}"),
        run,
        issuer: target.issuer_key.clone(),
        gateway: target.gateway_key.clone(),
        shares: c.packet_shares,
        claimers: c.claimers,
        deadline: recorder.started + Duration::from_secs(args.duration_s),
        money: Mutex::new(Money::default()),
        unsettled: Mutex::new(Vec::new()),
    });
    print_interval_header();
    let interval = Duration::from_secs(c.interval_s);
    let started = recorder.started;
    runtime.block_on(async {
        let ticker = {
            let recorder = ctx.http.recorder.clone();
            tokio::spawn(async move {
                let mut k = 1u32;
                loop {
                    tokio::time::sleep_until((started + interval * k).into()).await;
                    let t = started.elapsed();
                    let rows = {
                        let mut tally = recorder.lock();
                        tally.advance(t.as_secs());
                        tally.close_interval(t.as_secs_f64())
                    };
                    print_interval(&rows);
                    k += 1;
                }
            })
        };
        let users: Vec<_> = (0..c.vus)
            .map(|v| tokio::spawn(virtual_user(ctx.clone(), v)))
            .collect();
        for user in users {
            if let Err(e) = user.await {
                ctx.fail(format!("a virtual user panicked: {e}"));
            }
        }
        ticker.abort();
    });
    let elapsed = started.elapsed();
    let elapsed_s = elapsed.as_secs_f64();
    let (intervals, seconds, totals, all, errors, error_examples) = {
        let mut tally = ctx.http.recorder.lock();
        // The last, partial interval and second.
        let rows = tally.close_interval(elapsed_s);
        print_interval(&rows);
        tally.finish(elapsed);
        let totals: Vec<EndpointFigures> = Endpoint::ALL
            .iter()
            .map(|e| tally.lanes[e.index()].figures(Some(*e), elapsed_s))
            .collect();
        (
            std::mem::take(&mut tally.intervals),
            std::mem::take(&mut tally.seconds),
            totals,
            tally.lanes[ALL_LANE].figures(None, elapsed_s),
            std::mem::take(&mut tally.errors),
            std::mem::take(&mut tally.error_examples),
        )
    };
    runtime.block_on(settle(&ctx));
    drop(runtime);
    target.stop()?;
    let hello = if args.no_baseline {
        None
    } else {
        let mut short = args.clone();
        short.duration_s = args.duration_s.clamp(1, 5);
        let hello = hello_run(&short, args.pool)?;
        Some((hello.per_second(), hello.quantile_ms(0.99)))
    };
    let money = std::mem::take(&mut *ctx.money());
    let report = Report {
        load_test,
        elapsed_s,
        totals,
        all,
        intervals,
        seconds,
        errors: errors
            .into_iter()
            .map(|((endpoint, status, code), count)| ErrorCount {
                endpoint,
                status,
                code,
                count,
            })
            .collect(),
        error_examples,
        money_failures: money.failures,
        packets_sent: money.packets_sent,
        packets_exhausted: money.packets_exhausted,
        packet_fen: money.packet_fen,
        claimed_fen: money.claimed_fen,
        subsidies_listed_late: money.subsidies_listed_late,
        withdrawals: money.withdrawals,
        withdrawn_fen: money.withdrawn_fen,
        coupons: money.coupons,
        hello,
        plot: c.plot.clone(),
    };
    print_totals(&report, args.pool);
    plot(&report, &c.plot)?;
    println!("plot: {}", c.plot.display());
    Ok(report)
}

fn print_totals(report: &Report, pool: usize) {
    println!();
    println!(
        "totals over {:.1} s ({})",
        report.elapsed_s,
        if report.load_test {
            "load-test traffic"
        } else {
            "real traffic"
        }
    );
    println!(
        "{:<38} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7} {:>7}",
        "endpoint",
        "requests",
        "req/s",
        "p50_ms",
        "p99_ms",
        "p999_ms",
        "max_ms",
        "errors",
        "429",
        "410"
    );
    for f in report.totals.iter().chain([&report.all]) {
        println!(
            "{:<38} {:>9} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7} {:>7} {:>7}",
            f.route,
            f.requests,
            f.per_second,
            f.p50_ms,
            f.p99_ms,
            f.p999_ms,
            f.max_ms,
            f.errors,
            f.throttled,
            f.empty
        );
    }
    if report.errors.is_empty() {
        println!("errors: none");
    } else {
        println!("errors by status and code:");
        for e in &report.errors {
            let status = if e.status == 0 {
                "no answer".to_string()
            } else {
                e.status.to_string()
            };
            println!(
                "  {:<38} {status} {} x{}",
                e.endpoint.route(),
                e.code,
                e.count
            );
        }
        for example in &report.error_examples {
            println!("  e.g. {example}");
        }
    }
    let throttled = report.all.throttled;
    let claims = report.figures(Endpoint::PacketClaim);
    println!(
        "traffic shaping (not errors): {throttled} x 429 ({} on claims: a hot packet's admission, polled again after retry_after_ms); {} x 410 packet_empty (how each claimer learns its packet is done)",
        claims.throttled, claims.empty
    );
    println!(
        "money: {} B2C packets sent ({} fen of subsidies), {} claimed to the last share; claims {} fen; {} subsidies picked before the list showed them",
        report.packets_sent, report.packet_fen, report.packets_exhausted, report.claimed_fen, report.subsidies_listed_late
    );
    println!(
        "       {} withdrawals accepted ({} fen), {} coupon requests accepted",
        report.withdrawals, report.withdrawn_fen, report.coupons
    );
    if report.money_failures.is_empty() {
        println!("money checks: passed (no packet claimed above its total; every empty packet claimed to exactly its total; details = the claimers' answers)");
    } else {
        println!("money checks: {} FAILED", report.money_failures.len());
        for failure in report.money_failures.iter().take(20) {
            println!("  {failure}");
        }
    }
    if let Some((per_s, p99)) = report.hello {
        println!("baseline hello world at {pool} connections: {per_s:.0} req/s, p99 {p99:.2} ms");
    }
}

/// Distinct colours for the series (all first, then the endpoints).
const COLOURS: [(u8, u8, u8); 9] = [
    (0, 0, 0),
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (23, 190, 207),
];

type Chart<'a, 'b> = plotters::chart::ChartContext<
    'a,
    plotters::backend::SVGBackend<'b>,
    plotters::coord::cartesian::Cartesian2d<
        plotters::coord::types::RangedCoordf64,
        plotters::coord::combinators::LogCoord<f64>,
    >,
>;

fn colour(k: usize) -> plotters::style::RGBColor {
    let (r, g, b) = COLOURS[k % COLOURS.len()];
    plotters::style::RGBColor(r, g, b)
}

/// Width of the legend beside each panel, in pixels: the lines are never hidden behind it.
const LEGEND_PX: u32 = 170;

/// A panel over `area`: title, axes with their descriptions, the lines (series 0, all,
/// thicker; points at zero or below left out: the scale is logarithmic, so that the claims'
/// hundreds per second and a step's tens show on one chart), and the legend to the right.
fn panel(
    area: &plotters::drawing::DrawingArea<
        plotters::backend::SVGBackend<'_>,
        plotters::coord::Shift,
    >,
    title: &str,
    y_desc: &str,
    x_max: f64,
    lines: Vec<(String, Vec<(f64, f64)>)>,
) -> Result<(), String> {
    use plotters::prelude::*;
    let lines: Vec<(String, Vec<(f64, f64)>)> = lines
        .into_iter()
        .map(|(label, values)| {
            (
                label,
                values.into_iter().filter(|(_, y)| *y > 0.0).collect(),
            )
        })
        .collect();
    let ys = || lines.iter().flat_map(|(_, v)| v.iter().map(|(_, y)| *y));
    let y_max = ys().fold(1.0f64, f64::max) * 1.5;
    // From just below a power of ten: the axis labels its powers of ten from the first one
    // in range, and its steps between them.
    let y_min = 10f64.powf(ys().fold(y_max, f64::min).log10().floor()) * 0.999;
    let (width, _) = area.dim_in_pixel();
    let (plot_area, legend_area) = area.split_horizontally(width.saturating_sub(LEGEND_PX));
    let mut chart: Chart<'_, '_> = ChartBuilder::on(&plot_area)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(75)
        .build_cartesian_2d(0f64..x_max, (y_min..y_max).log_scale())
        .map_err(|e| e.to_string())?;
    let y_label = |y: &f64| {
        if *y >= 10.0 {
            format!("{y:.0}")
        } else if *y >= 1.0 {
            format!("{y:.1}")
        } else {
            format!("{y:.2}")
        }
    };
    let x_label = |x: &f64| {
        if (x - x.round()).abs() < 1e-6 {
            format!("{x:.0}")
        } else {
            format!("{x:.1}")
        }
    };
    chart
        .configure_mesh()
        .x_desc("seconds since start")
        .y_desc(y_desc)
        .y_label_formatter(&y_label)
        .x_label_formatter(&x_label)
        // The logarithmic axis's fine lines crowd into bands: the labelled lines are enough.
        .light_line_style(TRANSPARENT)
        .draw()
        .map_err(|e| e.to_string())?;
    for (k, (label, values)) in lines.into_iter().enumerate() {
        let width = if k == 0 { 3 } else { 2 };
        chart
            .draw_series(LineSeries::new(values, colour(k).stroke_width(width)))
            .map_err(|e| e.to_string())?;
        let y = 60 + 22 * k as i32;
        legend_area
            .draw(&PathElement::new(
                vec![(5, y), (35, y)],
                colour(k).stroke_width(width),
            ))
            .map_err(|e| e.to_string())?;
        legend_area
            .draw(&Text::new(label, (42, y - 7), ("sans-serif", 14)))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Two panels: requests per second (all and per endpoint), p99 per second (ms), each point
/// at the middle of its second; the last, partial second's rate over the part it covered.
pub fn plot(report: &Report, path: &Path) -> Result<(), LoadgenError> {
    use plotters::prelude::*;
    let failed =
        |e: String| LoadgenError::Usage(format!("writing the plot {}: {e}", path.display()));
    let seconds = &report.seconds;
    let x_max = seconds
        .last()
        .map_or(1.0, |s| s.t_s as f64 + s.span_s)
        .max(1.0);
    let mid = |s: &SecondRow| s.t_s as f64 + s.span_s / 2.0;
    let rate = |s: &SecondRow, n: u64| n as f64 / s.span_s.max(1e-3);
    let plotted: Vec<Endpoint> = Endpoint::ALL.into_iter().filter(|e| e.plotted()).collect();
    let traffic = if report.load_test {
        "load-test traffic"
    } else {
        "real traffic"
    };
    let mut rates = vec![(
        "all".to_string(),
        seconds
            .iter()
            .map(|s| (mid(s), rate(s, s.all_requests)))
            .collect::<Vec<_>>(),
    )];
    let mut p99s = vec![(
        "all".to_string(),
        seconds
            .iter()
            .filter_map(|s| s.all_p99_ms.map(|p| (mid(s), p)))
            .collect::<Vec<_>>(),
    )];
    for endpoint in &plotted {
        let i = endpoint.index();
        rates.push((
            endpoint.short().into(),
            seconds
                .iter()
                .map(|s| (mid(s), rate(s, s.requests[i])))
                .collect(),
        ));
        p99s.push((
            endpoint.short().into(),
            seconds
                .iter()
                .filter_map(|s| s.p99_ms[i].map(|p| (mid(s), p)))
                .collect(),
        ));
    }
    let root = SVGBackend::new(path, (1200, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| failed(e.to_string()))?;
    let (upper, lower) = root.split_vertically(500);
    panel(
        &upper,
        &format!("hongbao loadgen campaign: throughput per second ({traffic})"),
        "requests/s (log scale)",
        x_max,
        rates,
    )
    .map_err(failed)?;
    panel(
        &lower,
        "p99 latency per second, by endpoint",
        "p99 latency, ms (log scale)",
        x_max,
        p99s,
    )
    .map_err(failed)?;
    root.present().map_err(|e| failed(e.to_string()))?;
    Ok(())
}
