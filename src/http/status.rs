//! The night's status page: `GET /status` answers one self-contained HTML page (inline style
//! and script, nothing fetched from anywhere but this server), whose script reads
//! `GET /status.json` every 2 s and renders it. Like `/metrics`, neither needs a key, and
//! `/status.json` shows the same numbers: the log head and readiness (as `/readyz`), the
//! counters the page turns into rates per second, the crediting and payout lanes' backlogs,
//! the views' lag behind the head, the budgets left, the switches, the continuous audit and
//! the reconciliation. It is computed from the engine that serves it (its `AppState` and
//! metrics registry): a load test's engine has a registry of its own and never shows here.
//!
//! Money is integer fen, sent both as the integer and as yuan with two decimals formatted with
//! integer arithmetic (`"9997.12"`); the page only inserts thousands separators.
//!
//! The page turns amber when payouts are parked (or red packet work is stuck) and red when the
//! journal is not ready, the continuous audit found a violation, the reconciliation a mismatch,
//! or the server stopped answering; `problems` in the JSON says why.

use super::AppState;
use crate::domain::activity::RewardKind;
use crate::domain::switches::KNOWN as KNOWN_SWITCHES;
use crate::domain::withdrawal::Channel;
use crate::events::JournalCondition;
use crate::projections;
use actix_web::http::header;
use actix_web::{web, HttpResponse};
use prometheus::proto::{LabelPair, MetricFamily, MetricType};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// The views whose lag behind the head the page shows, in the runner's order.
const VIEWS: [&str; 5] = [
    projections::wallet::NAME,
    projections::rewards::NAME,
    projections::withdrawals::NAME,
    projections::packets::NAME,
    projections::coupons::NAME,
];

/// Parked orders counted at most (the view is read on every refresh).
const PARKED_COUNT_MAX: usize = 1000;

/// Milestones and outcomes always listed, zero until they happen (labels of
/// `hongbao_withdrawals_total`, `hongbao_payout_attempts_total`, `hongbao_packet_claims_total`).
const WITHDRAWAL_STATES: [&str; 4] = ["requested", "succeeded", "refunded", "failed"];
const PAYOUT_OUTCOMES: [&str; 4] = ["succeeded", "failed", "throttled", "timeout"];
const CLAIM_OUTCOMES: [&str; 6] = ["claimed", "repeated", "empty", "expired", "busy", "refused"];

/// Everything `/status.json` answers.
#[derive(Debug, Serialize)]
pub struct StatusBody {
    /// Whose figures: `real`, or `load_test` for a request marked `X-Hongbao-Load-Test: 1`
    /// (the load-test engine's books; the page asks for them with `?load_test=1`).
    pub traffic: &'static str,
    /// When these figures were read (RFC 3339, and milliseconds since the epoch: the page's
    /// rates divide by the difference of two samples' `generated_at_ms`).
    pub generated_at: String,
    pub generated_at_ms: i64,
    /// `ok`, `warn` (amber) or `alert` (red): the worst of `problems`.
    pub level: &'static str,
    pub problems: Vec<Problem>,
    /// As `/readyz`: `ready` is true when `readiness` is `ready`.
    pub ready: bool,
    pub readiness: &'static str,
    pub store: String,
    pub log_head: u64,
    pub counters: Counters,
    pub rewards: RewardLanes,
    pub projections: Vec<ViewLag>,
    pub payouts: Payouts,
    pub budgets: Vec<Budget>,
    pub switches: Vec<SwitchState>,
    pub audit: AuditState,
    pub reconciliation: Reconciliation,
}

/// Something the operator should look at.
#[derive(Debug, Serialize)]
pub struct Problem {
    /// `warn` or `alert`.
    pub level: &'static str,
    /// The page figure it concerns (its `data-figure`).
    pub figure: String,
    pub message: String,
}

/// Monotonic counters since the server started: the page shows each as a rate per second.
#[derive(Debug, Serialize)]
pub struct Counters {
    pub events_appended: u64,
    pub http_requests: u64,
    pub http_5xx: u64,
    /// By kind (cash, subsidy, coupon, item).
    pub rewards_accepted: BTreeMap<String, u64>,
    /// By kind, by the lanes and by force-credit together.
    pub rewards_credited: BTreeMap<String, u64>,
    pub rewards_refused: u64,
    /// By outcome (claimed, repeated, empty, expired, busy, refused).
    pub packet_claims: BTreeMap<String, u64>,
    pub coupons_issued: u64,
    /// By milestone (requested, succeeded, refunded, failed).
    pub withdrawals: BTreeMap<String, u64>,
    /// By answer of the channel (succeeded, failed, throttled, timeout).
    pub payout_attempts: BTreeMap<String, u64>,
}

/// The crediting lanes, by reward kind.
#[derive(Debug, Serialize)]
pub struct RewardLanes {
    /// Rewards queued or in flight.
    pub lane_backlog: BTreeMap<String, i64>,
    /// Age of the oldest reward waiting.
    pub lane_lag_seconds: BTreeMap<String, f64>,
    /// Accepted and not yet settled.
    pub pending: BTreeMap<String, i64>,
}

/// A view's checkpoint and how far it is behind the log head.
#[derive(Debug, Serialize)]
pub struct ViewLag {
    pub name: &'static str,
    pub checkpoint: u64,
    pub lag: u64,
}

#[derive(Debug, Serialize)]
pub struct Payouts {
    /// Orders ready for a payout, by channel.
    pub lane_backlog: BTreeMap<String, i64>,
    /// Orders parked in the dead-letter set and not settled (counted up to 1000).
    pub parked: u64,
    /// More than `parked` are parked.
    pub parked_more: bool,
    /// Payouts ever parked since the start, by channel.
    pub parked_total: BTreeMap<String, u64>,
}

/// An amount of money: integer fen, and yuan with two decimals.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Money {
    pub fen: i64,
    pub yuan: String,
}

impl Money {
    pub fn of(fen: i64) -> Money {
        Money {
            fen,
            yuan: yuan(fen),
        }
    }
}

/// What is left of an activity's budget (`hongbao_budget_remaining_fen`).
#[derive(Debug, Serialize)]
pub struct Budget {
    pub activity: String,
    pub cash: Option<Money>,
    pub subsidy: Option<Money>,
}

#[derive(Debug, Serialize)]
pub struct SwitchState {
    pub name: String,
    pub on: bool,
    /// Its value when never changed.
    pub default: bool,
    /// Who last changed it, and when, if known.
    pub changed_by: Option<ChangedBy>,
}

/// The role that last changed a switch, and when (not its key id: the page needs no key).
#[derive(Debug, Serialize)]
pub struct ChangedBy {
    pub role: String,
    pub at: String,
}

/// The continuous audit.
#[derive(Debug, Serialize)]
pub struct AuditState {
    /// `running`, or `off` (`audit.continuous_every_ms` = 0).
    pub status: &'static str,
    /// The last sequence it replayed, and how far that is behind the head (when running).
    pub checked_seq: Option<u64>,
    pub behind: Option<u64>,
    pub violations: u64,
    pub violations_by_check: BTreeMap<String, u64>,
}

/// The near-real-time reconciliation of withdrawals.
#[derive(Debug, Serialize)]
pub struct Reconciliation {
    pub checks: u64,
    pub mismatches: u64,
    pub mismatches_by_check: BTreeMap<String, u64>,
}

/// Yuan with two decimals, from fen, by integer arithmetic: `-1234` is `"-12.34"`.
pub fn yuan(fen: i64) -> String {
    let sign = if fen < 0 { "-" } else { "" };
    let abs = fen.unsigned_abs();
    format!("{sign}{}.{:02}", abs / 100, abs % 100)
}

/// One series' labels and value (a histogram's value is its sample count). Each engine's
/// registry is its own: the real engine's holds no load-test series, and the load-test
/// engine's (every series labelled `traffic="load_test"`) only its own.
fn series<'a>(
    families: &'a [MetricFamily],
    name: &'a str,
) -> impl Iterator<Item = (&'a [LabelPair], f64)> + 'a {
    families
        .iter()
        .filter(move |f| f.name() == name)
        .flat_map(|f| {
            let kind = f.get_field_type();
            f.get_metric().iter().map(move |m| {
                let value = match kind {
                    MetricType::COUNTER => m.get_counter().get_value(),
                    MetricType::GAUGE => m.get_gauge().get_value(),
                    MetricType::HISTOGRAM => m.get_histogram().get_sample_count() as f64,
                    _ => 0.0,
                };
                (m.get_label(), value)
            })
        })
}

fn label<'a>(labels: &'a [LabelPair], name: &str) -> Option<&'a str> {
    labels.iter().find(|l| l.name() == name).map(|l| l.value())
}

/// The family `name`'s largest value by the value of `by` (an age: the oldest of several
/// cells' is the figure, not their sum).
fn max_by(families: &[MetricFamily], name: &str, by: &str) -> BTreeMap<String, f64> {
    let mut maxima: BTreeMap<String, f64> = BTreeMap::new();
    for (labels, value) in series(families, name) {
        if let Some(key) = label(labels, by) {
            let max = maxima.entry(key.to_owned()).or_insert(value);
            *max = max.max(value);
        }
    }
    maxima
}

/// The family `name` summed by the value of `by` (series without that label left out).
fn sum_by(families: &[MetricFamily], name: &str, by: &str) -> BTreeMap<String, f64> {
    let mut sums = BTreeMap::new();
    for (labels, value) in series(families, name) {
        if let Some(key) = label(labels, by) {
            *sums.entry(key.to_owned()).or_insert(0.0) += value;
        }
    }
    sums
}

/// The family `name` summed over every series matching `keep`.
fn sum_where(families: &[MetricFamily], name: &str, keep: impl Fn(&[LabelPair]) -> bool) -> f64 {
    series(families, name)
        .filter(|(labels, _)| keep(labels))
        .map(|(_, v)| v)
        .sum()
}

fn total(families: &[MetricFamily], name: &str) -> u64 {
    count(sum_where(families, name, |_| true))
}

/// A counter's value as an integer (counters hold whole numbers).
fn count(value: f64) -> u64 {
    if value.is_finite() && value > 0.0 {
        value.round() as u64
    } else {
        0
    }
}

/// Counts by label, every one of `always` present (zero until it happens).
fn counts(
    families: &[MetricFamily],
    name: &str,
    by: &str,
    always: &[&str],
) -> BTreeMap<String, u64> {
    let mut out: BTreeMap<String, u64> = always.iter().map(|k| (k.to_string(), 0)).collect();
    for (key, value) in sum_by(families, name, by) {
        out.insert(key, count(value));
    }
    out
}

fn gauges(
    families: &[MetricFamily],
    name: &str,
    by: &str,
    always: &[&str],
) -> BTreeMap<String, i64> {
    let mut out: BTreeMap<String, i64> = always.iter().map(|k| (k.to_string(), 0)).collect();
    for (key, value) in sum_by(families, name, by) {
        out.insert(key, value.round() as i64);
    }
    out
}

/// Orders parked and not settled, from the withdrawals view as it stands (no wait).
fn parked(state: &AppState) -> (u64, bool) {
    let Some(tree) = state.projections.tree(projections::withdrawals::NAME) else {
        return (0, false);
    };
    match projections::withdrawals::parked(tree, None, PARKED_COUNT_MAX + 1) {
        Ok(orders) => (
            orders.len().min(PARKED_COUNT_MAX) as u64,
            orders.len() > PARKED_COUNT_MAX,
        ),
        Err(e) => {
            crate::warn_limited!(error = %e, "status: parked orders unreadable");
            (0, false)
        }
    }
}

/// The budgets left, read as integers from each cell's gauge (its label values name the
/// activities). Right for a single node; a cluster node's page leaves budgets out (an
/// activity's gauge there counts only the acceptances of its own partition, not those of its
/// intake shards).
fn budgets(cells: &[&AppState]) -> Vec<Budget> {
    let mut activities: BTreeMap<String, Budget> = BTreeMap::new();
    for state in cells {
        let families = state.metrics.registry.gather();
        for (labels, _) in series(&families, "hongbao_budget_remaining_fen") {
            let (Some(activity), Some(kind)) = (label(labels, "activity"), label(labels, "kind"))
            else {
                continue;
            };
            let fen = state
                .metrics
                .budget_remaining_fen
                .with_label_values(&[activity, kind])
                .get();
            let budget = activities
                .entry(activity.to_owned())
                .or_insert_with(|| Budget {
                    activity: activity.to_owned(),
                    cash: None,
                    subsidy: None,
                });
            let slot = match kind {
                "cash" => &mut budget.cash,
                "subsidy" => &mut budget.subsidy,
                _ => continue,
            };
            let sum = slot.as_ref().map_or(0, |m| m.fen).saturating_add(fen);
            *slot = Some(Money::of(sum));
        }
    }
    activities.into_values().collect()
}

fn switches(state: &AppState) -> Vec<SwitchState> {
    state.switches.with(|switches| {
        switches
            .all()
            .into_iter()
            .map(|(name, on)| SwitchState {
                default: KNOWN_SWITCHES
                    .iter()
                    .find(|(n, _, _)| *n == name)
                    .is_none_or(|(_, default, _)| *default),
                changed_by: switches.changed_by.get(&name).map(|(by, at_ms)| ChangedBy {
                    role: by.role.clone(),
                    at: crate::clock::rfc3339(*at_ms),
                }),
                name,
                on,
            })
            .collect()
    })
}

/// The figures of a single node, read now.
pub fn figures(state: &AppState) -> StatusBody {
    let condition = state.store.condition();
    compose(
        &[state],
        Vec::new(),
        Readiness {
            ready: condition == JournalCondition::Ready,
            status: condition.as_str(),
        },
        state.store_guarantee.clone(),
    )
}

/// How `/readyz` answers, in the figures.
pub struct Readiness {
    pub ready: bool,
    /// `ready`, or why not (`journal_failed`, `log_unreachable`; on a cluster node `joining`,
    /// `partition_failed`).
    pub status: &'static str,
}

/// The figures of `cells`, the logs a node serves (one on a single node; on a cluster node its
/// partitions, each labelled `partition`): counters and gauges summed over them with the
/// node's own series (`node`, the HTTP requests on a cluster node), lane lags the oldest of
/// them, heads and view lags summed, budgets of every cell (a cluster node drops them). The
/// continuous audit runs on a single node only.
pub fn compose(
    cells: &[&AppState],
    node: Vec<MetricFamily>,
    readiness: Readiness,
    store: String,
) -> StatusBody {
    use crate::clock::Clock;
    let now_ms = crate::clock::SystemClock.now_ms();
    let mut families = node;
    for cell in cells {
        families.extend(cell.metrics.registry.gather());
    }
    let f = families.as_slice();
    // Each cell's head read once: a view's lag is measured against the same head.
    let heads: Vec<u64> = cells.iter().map(|c| c.store.head()).collect();
    let head: u64 = heads.iter().sum();
    let kinds: Vec<&str> = RewardKind::ALL.iter().map(|k| k.as_str()).collect();
    let channels: Vec<&str> = Channel::ALL.iter().map(|c| c.as_str()).collect();

    let counters = Counters {
        events_appended: total(f, "hongbao_events_appended_total"),
        http_requests: total(f, "hongbao_http_request_duration_seconds"),
        http_5xx: count(sum_where(f, "hongbao_http_request_duration_seconds", |l| {
            label(l, "status").is_some_and(|s| s.starts_with('5'))
        })),
        rewards_accepted: counts(f, "hongbao_rewards_accepted_total", "kind", &kinds),
        rewards_credited: counts(f, "hongbao_rewards_credited_total", "kind", &kinds),
        rewards_refused: total(f, "hongbao_rewards_refused_total"),
        packet_claims: counts(f, "hongbao_packet_claims_total", "outcome", &CLAIM_OUTCOMES),
        coupons_issued: total(f, "hongbao_coupons_issued_total"),
        withdrawals: counts(f, "hongbao_withdrawals_total", "state", &WITHDRAWAL_STATES),
        payout_attempts: counts(
            f,
            "hongbao_payout_attempts_total",
            "outcome",
            &PAYOUT_OUTCOMES,
        ),
    };
    let mut lane_lag_seconds: BTreeMap<String, f64> =
        kinds.iter().map(|k| (k.to_string(), 0.0)).collect();
    lane_lag_seconds.extend(max_by(f, "hongbao_reward_lane_lag_seconds", "kind"));
    let rewards = RewardLanes {
        lane_backlog: gauges(f, "hongbao_reward_lane_backlog", "kind", &kinds),
        lane_lag_seconds,
        pending: gauges(f, "hongbao_reward_pending", "kind", &kinds),
    };
    let views = VIEWS
        .iter()
        .filter(|name| cells.iter().any(|c| c.projections.tree(name).is_some()))
        .map(|name| {
            let running = cells
                .iter()
                .zip(&heads)
                .filter(|(c, _)| c.projections.tree(name).is_some());
            let (checkpoint, lag) = running.fold((0u64, 0u64), |(sum, lag), (c, head)| {
                let at = c.projections.checkpoint(name);
                (sum + at, lag + head.saturating_sub(at))
            });
            ViewLag {
                name,
                checkpoint,
                lag,
            }
        })
        .collect();
    let (parked_now, parked_more) = cells
        .iter()
        .map(|c| parked(c))
        .fold((0, false), |(count, more), (n, m)| (count + n, more || m));
    let payouts = Payouts {
        lane_backlog: gauges(f, "hongbao_payout_lane_backlog", "channel", &channels),
        parked: parked_now,
        parked_more,
        parked_total: counts(f, "hongbao_payouts_parked_total", "channel", &channels),
    };
    let violations_by_check = counts(f, "hongbao_audit_violations_total", "check", &[]);
    let violations = violations_by_check.values().sum();
    let live_audit = match cells {
        [single] => single.live_audit.as_ref().map(|_| single),
        _ => None,
    };
    let audit = match live_audit {
        Some(state) => {
            let checked = state.metrics.audit_checked_seq.get().max(0) as u64;
            AuditState {
                status: "running",
                checked_seq: Some(checked),
                behind: Some(head.saturating_sub(checked)),
                violations,
                violations_by_check,
            }
        }
        None => AuditState {
            status: "off",
            checked_seq: None,
            behind: None,
            violations,
            violations_by_check,
        },
    };
    let mismatches_by_check = counts(f, "hongbao_reconciliation_mismatches_total", "check", &[]);
    let reconciliation = Reconciliation {
        checks: cells
            .iter()
            .map(|c| c.metrics.reconciliation_checks_total.get())
            .sum(),
        mismatches: mismatches_by_check.values().sum(),
        mismatches_by_check,
    };
    let stuck = total(f, "hongbao_packets_stuck");

    let mut problems = Vec::new();
    let mut problem = |level, figure: &str, message: String| {
        problems.push(Problem {
            level,
            figure: figure.to_owned(),
            message,
        })
    };
    let ready = readiness.ready;
    if !ready {
        problem(
            "alert",
            "ready",
            format!("not ready: {} (see /readyz)", readiness.status),
        );
    }
    if audit.violations > 0 {
        problem(
            "alert",
            "audit_violations",
            format!(
                "the continuous audit found {} violation(s); the server log names them",
                audit.violations
            ),
        );
    }
    if reconciliation.mismatches > 0 {
        problem(
            "alert",
            "reconciliation_mismatches",
            format!(
                "{} withdrawal reconciliation mismatch(es)",
                reconciliation.mismatches
            ),
        );
    }
    if payouts.parked > 0 {
        problem(
            "warn",
            "parked",
            format!(
                "{}{} payout(s) parked: GET /v1/admin/withdrawals/parked",
                payouts.parked,
                if payouts.parked_more { "+" } else { "" }
            ),
        );
    }
    if stuck > 0 {
        problem(
            "warn",
            "packets_stuck",
            format!("{stuck} red packet transfer(s) or refund(s) stuck past their threshold"),
        );
    }
    let level = if problems.iter().any(|p| p.level == "alert") {
        "alert"
    } else if problems.is_empty() {
        "ok"
    } else {
        "warn"
    };

    StatusBody {
        traffic: "real",
        generated_at: crate::clock::rfc3339(now_ms),
        generated_at_ms: now_ms,
        level,
        problems,
        ready,
        readiness: readiness.status,
        store,
        log_head: head,
        counters,
        rewards,
        projections: views,
        payouts,
        budgets: budgets(cells),
        // One node's switches are the same in every cell (the fleet's singletons).
        switches: cells.first().map(|c| switches(c)).unwrap_or_default(),
        audit,
        reconciliation,
    }
}

/// The night's live figures, as the status page shows them.
#[utoipa::path(get, path = "/status.json", tag = "operations",
    responses((status = 200, description = "The status page's figures (always 200; `ready` and \
        `level` say whether all is well): `traffic` (`real`, or `load_test` for a request marked \
        `X-Hongbao-Load-Test: 1`: the load-test engine's figures), `generated_at`, `level` (ok / warn / alert) and \
        `problems`, `ready`, `readiness`, `store`, `log_head`, `counters` (monotonic, for rates), \
        `rewards` (lane backlog, lag seconds, pending by kind), `projections` (checkpoint and lag \
        behind the head), `payouts` (lane backlog, parked), `budgets` (remaining per activity, \
        each as `{fen, yuan}`), `switches`, `audit` (running or off, checked seq, violations), \
        `reconciliation`", body = Object)))]
pub async fn status_json(req: actix_web::HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let mut body = figures(&state);
    // The load-test route middleware gave a marked request the load-test engine's state.
    if super::load_test::traffic(req.headers()) == Some(super::load_test::Traffic::LoadTest) {
        body.traffic = "load_test";
    }
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(body)
}

/// A status page for the night: live figures, refreshed every 2 s from `/status.json`.
#[utoipa::path(get, path = "/status", tag = "operations",
    responses((status = 200, description = "An HTML page with no external assets (inline style \
        and script under a strict Content-Security-Policy) that shows `/status.json` live",
        content_type = "text/html")))]
pub async fn status_page() -> HttpResponse {
    let page = page();
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CONTENT_SECURITY_POLICY, page.policy.as_str()))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(page.html.as_str())
}

struct Page {
    html: String,
    /// Only this page's own inline style and script (by their hashes), and requests to this
    /// server.
    policy: String,
}

fn page() -> &'static Page {
    static PAGE: OnceLock<Page> = OnceLock::new();
    PAGE.get_or_init(|| {
        let hash = |text: &str| {
            use base64::Engine;
            use sha2::Digest;
            let digest = sha2::Sha256::digest(text.as_bytes());
            format!(
                "'sha256-{}'",
                base64::engine::general_purpose::STANDARD.encode(digest)
            )
        };
        let policy = format!(
            "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; \
             img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            hash(SCRIPT),
            hash(STYLE)
        );
        let html = HTML
            .replace("/*STYLE*/", &format!("<style>{STYLE}</style>"))
            .replace("/*SCRIPT*/", &format!("<script>{SCRIPT}</script>"));
        Page { html, policy }
    })
}

const HTML: &str = r##"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>hongbao · status</title>
/*STYLE*/
</head>
<body data-level="loading">
<header>
  <div class="title"><span class="mark" aria-hidden="true"></span>hongbao <span class="sub" data-figure="traffic">the night</span></div>
  <div class="state"><span class="pill" data-figure="level">loading</span></div>
  <div class="fresh">updated <span data-figure="refreshed">never</span>
    <span class="ago" data-figure="refreshed_ago"></span></div>
</header>
<ul id="problems" data-figure="problems"></ul>
<main>
  <section class="card wide">
    <h2>Journal and traffic</h2>
    <div class="tiles">
      <div class="tile"><div class="k">Readiness</div><div class="v" data-figure="ready">–</div>
        <div class="s" data-figure="store"></div></div>
      <div class="tile"><div class="k">Log head</div><div class="v" data-figure="log_head">–</div>
        <div class="s"><span data-figure="rate:events_appended">–</span> events/s</div></div>
      <div class="tile"><div class="k">HTTP requests</div><div class="v" data-figure="rate:http_requests">–</div>
        <div class="s">per s · <span data-figure="http_requests">–</span> in all</div></div>
      <div class="tile"><div class="k">HTTP 5xx</div><div class="v" data-figure="rate:http_5xx">–</div>
        <div class="s">per s · <span data-figure="http_5xx">–</span> in all</div></div>
      <div class="tile"><div class="k">Continuous audit</div><div class="v" data-figure="audit_status">–</div>
        <div class="s">checked <span data-figure="audit_checked_seq">–</span> · behind <span data-figure="audit_behind">–</span></div></div>
      <div class="tile"><div class="k">Audit violations</div><div class="v" data-figure="audit_violations">–</div>
        <div class="s">reconciliation mismatches <span data-figure="reconciliation_mismatches">–</span> of <span data-figure="reconciliation_checks">–</span> checks</div></div>
    </div>
  </section>
  <section class="card span2">
    <h2>Rewards</h2>
    <table>
      <thead><tr><th>kind</th><th>accepted/s</th><th>credited/s</th><th>accepted</th><th>credited</th><th>backlog</th><th>lag s</th><th>pending</th></tr></thead>
      <tbody id="rewards"></tbody>
    </table>
    <p class="note">refused in all: <span data-figure="rewards_refused">–</span></p>
  </section>
  <section class="card">
    <h2>Budgets remaining <span class="unit">yuan</span></h2>
    <table>
      <thead><tr><th>activity</th><th>cash</th><th>subsidy</th></tr></thead>
      <tbody id="budgets"></tbody>
    </table>
  </section>
  <section class="card">
    <h2>Switches</h2>
    <table>
      <thead><tr><th>switch</th><th>state</th><th>last changed</th></tr></thead>
      <tbody id="switches"></tbody>
    </table>
  </section>
  <section class="card">
    <h2>Withdrawals and payouts</h2>
    <table>
      <thead><tr><th>milestone</th><th>per s</th><th>in all</th></tr></thead>
      <tbody id="withdrawals"></tbody>
    </table>
    <table>
      <thead><tr><th>channel answer</th><th>per s</th><th>in all</th></tr></thead>
      <tbody id="payouts"></tbody>
    </table>
    <table>
      <thead><tr><th>channel</th><th>lane backlog</th><th>parked ever</th></tr></thead>
      <tbody id="channels"></tbody>
    </table>
    <p class="note">parked now: <b data-figure="parked">–</b></p>
  </section>
  <section class="card">
    <h2>Red packets and coupons</h2>
    <table>
      <thead><tr><th>claim outcome</th><th>per s</th><th>in all</th></tr></thead>
      <tbody id="claims"></tbody>
    </table>
    <p class="note">coupons issued: <b data-figure="rate:coupons_issued">–</b>/s ·
      <span data-figure="coupons_issued">–</span> in all</p>
  </section>
  <section class="card">
    <h2>Views behind the head</h2>
    <table>
      <thead><tr><th>view</th><th>checkpoint</th><th>lag (events)</th></tr></thead>
      <tbody id="views"></tbody>
    </table>
  </section>
</main>
<footer>Figures from <code>/status.json</code> every 2 s (the same numbers as <code>/metrics</code>); rates are per second between two refreshes.</footer>
/*SCRIPT*/
</body>
</html>
"##;

const STYLE: &str = r#"
:root { --ok:#1f7a3a; --warn:#b26a00; --alert:#b3261e; --ink:#1d1d1f; --muted:#6b6b70;
  --line:#e3e3e8; --card:#ffffff; --bg:#f4f4f7; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color:var(--ink); background:var(--bg); }
body[data-level="warn"] { background:#fff4dc; }
body[data-level="alert"], body[data-level="stale"] { background:#fde4e1; }
header { display:flex; align-items:center; gap:24px; padding:14px 24px; color:#fff;
  background:#555; }
body[data-level="ok"] header { background:var(--ok); }
body[data-level="warn"] header { background:var(--warn); }
body[data-level="alert"] header, body[data-level="stale"] header { background:var(--alert); }
.title { font-size:20px; font-weight:600; }
.mark { display:inline-block; position:relative; width:22px; height:28px; margin-right:10px;
  vertical-align:-6px; background:#d0021b; border-radius:4px; box-shadow:0 0 0 2px rgba(255,255,255,.6); }
.mark::after { content:""; position:absolute; left:6px; top:9px; width:10px; height:10px;
  border-radius:50%; background:#ffd24a; }
.sub { font-weight:400; opacity:.8; margin-left:6px; }
.pill { display:inline-block; padding:3px 12px; border-radius:999px; background:rgba(255,255,255,.2);
  font-weight:700; letter-spacing:.05em; text-transform:uppercase; }
.fresh { margin-left:auto; font-variant-numeric:tabular-nums; }
.ago { opacity:.8; }
#problems { margin:0; padding:0; list-style:none; }
#problems li { padding:8px 24px; font-weight:600; border-bottom:1px solid rgba(0,0,0,.08); }
#problems li.alert { background:#f9d0cc; color:#7a1610; }
#problems li.warn { background:#ffe6b3; color:#6b4000; }
main { display:grid; grid-template-columns:repeat(auto-fill, minmax(280px, 1fr)); gap:16px;
  padding:16px 24px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:12px 16px; }
.card.wide { grid-column:1 / -1; }
.card.span2 { grid-column:span 2; }
h2 { font-size:13px; text-transform:uppercase; letter-spacing:.06em; color:var(--muted); margin:0 0 8px; }
.unit { text-transform:none; font-weight:400; }
.tiles { display:grid; grid-template-columns:repeat(auto-fit, minmax(170px, 1fr)); gap:12px; }
.tile .k { color:var(--muted); font-size:12px; }
.tile .v { font-size:26px; font-weight:600; font-variant-numeric:tabular-nums; }
.tile .s { color:var(--muted); font-size:12px; font-variant-numeric:tabular-nums; }
table { width:100%; border-collapse:collapse; margin-bottom:8px; font-variant-numeric:tabular-nums; }
th { text-align:right; font-weight:500; color:var(--muted); font-size:12px; border-bottom:1px solid var(--line); padding:3px 6px; }
td { text-align:right; padding:3px 6px; border-bottom:1px solid #f0f0f3; }
th:first-child, td:first-child { text-align:left; }
.note { margin:4px 0 0; color:var(--muted); }
.bad { color:var(--alert); font-weight:700; }
.amber { color:var(--warn); font-weight:700; }
.good { color:var(--ok); font-weight:600; }
.on { color:var(--ok); font-weight:700; }
.off { color:var(--alert); font-weight:700; }
.dim { color:var(--muted); }
code { font-size:12px; }
footer { color:var(--muted); padding:0 24px 16px; font-size:12px; }
"#;

const SCRIPT: &str = r#"
"use strict";
(function () {
  var EVERY_MS = 2000;
  var previous = null;
  var lastOk = null;
  var lastSample = null;

  function q(figure) { return document.querySelector('[data-figure="' + figure + '"]'); }
  function group(digits) { return digits.replace(/\B(?=(\d{3})+(?!\d))/g, ","); }
  function int(n) { return n === null || n === undefined ? "–" : group(String(n)); }
  function money(m) {
    if (!m) { return "–"; }
    var neg = m.yuan.charAt(0) === "-";
    var parts = (neg ? m.yuan.slice(1) : m.yuan).split(".");
    return (neg ? "-" : "") + group(parts[0]) + "." + parts[1];
  }
  function set(figure, text, cls) {
    var el = q(figure);
    if (!el) { return null; }
    el.textContent = text;
    el.className = el.className.replace(/\b(bad|amber|good|on|off|dim)\b/g, "").trim();
    if (cls) { el.classList.add(cls); }
    return el;
  }
  /* Every counter, flattened: "http_requests", "rewards_accepted:cash", ... */
  function flatten(counters) {
    var out = {};
    Object.keys(counters).forEach(function (name) {
      var v = counters[name];
      if (typeof v === "number") { out[name] = v; return; }
      Object.keys(v).forEach(function (k) { out[name + ":" + k] = v[k]; });
    });
    return out;
  }
  function rate(key, now) {
    if (!previous) { return "–"; }
    var dt = (now.at - previous.at) / 1000;
    if (!(dt > 0) || previous.values[key] === undefined) { return "–"; }
    var r = Math.max(0, now.values[key] - previous.values[key]) / dt;
    return r >= 100 ? group(String(Math.round(r))) : r.toFixed(1);
  }
  /* The keys of `map`, those of `first` first in that order, then the others. */
  function order(map, first) {
    var keys = Object.keys(map);
    return first.filter(function (k) { return keys.indexOf(k) >= 0; })
      .concat(keys.filter(function (k) { return first.indexOf(k) < 0; }));
  }
  function clock(d) {
    function two(n) { return (n < 10 ? "0" : "") + n; }
    return two(d.getHours()) + ":" + two(d.getMinutes()) + ":" + two(d.getSeconds());
  }
  function cell(row, text, figure, cls) {
    var td = document.createElement("td");
    td.textContent = text;
    if (figure) { td.setAttribute("data-figure", figure); }
    if (cls) { td.className = cls; }
    row.appendChild(td);
    return td;
  }
  function rows(id, items, fill) {
    var body = document.getElementById(id);
    var fresh = document.createDocumentFragment();
    items.forEach(function (item) {
      var tr = document.createElement("tr");
      fill(tr, item);
      fresh.appendChild(tr);
    });
    body.replaceChildren(fresh);
  }

  function render(s) {
    var now = { at: s.generated_at_ms, values: flatten(s.counters) };
    var c = s.counters;
    document.body.setAttribute("data-level", s.level);
    set("level", s.level === "ok" ? "all well" : s.level === "warn" ? "attention" : "alert");
    set("traffic", s.traffic === "load_test" ? "load-test traffic (not real money)" : "the night");
    var problems = document.getElementById("problems");
    var list = document.createDocumentFragment();
    s.problems.forEach(function (p) {
      var li = document.createElement("li");
      li.className = p.level;
      li.setAttribute("data-problem", p.figure);
      li.textContent = p.message;
      list.appendChild(li);
    });
    problems.replaceChildren(list);

    set("ready", s.readiness, s.ready ? "good" : "bad");
    set("store", s.store);
    set("log_head", int(s.log_head));
    set("rate:events_appended", rate("events_appended", now));
    set("rate:http_requests", rate("http_requests", now));
    set("http_requests", int(c.http_requests));
    set("rate:http_5xx", rate("http_5xx", now), c.http_5xx > 0 ? "amber" : null);
    set("http_5xx", int(c.http_5xx));
    set("audit_status", s.audit.status, s.audit.status === "off" ? "dim" : "good");
    set("audit_checked_seq", int(s.audit.checked_seq));
    set("audit_behind", int(s.audit.behind));
    set("audit_violations", int(s.audit.violations), s.audit.violations > 0 ? "bad" : "good");
    set("reconciliation_mismatches", int(s.reconciliation.mismatches),
        s.reconciliation.mismatches > 0 ? "bad" : null);
    set("reconciliation_checks", int(s.reconciliation.checks));
    set("rewards_refused", int(c.rewards_refused));
    set("parked", int(s.payouts.parked) + (s.payouts.parked_more ? "+" : ""),
        s.payouts.parked > 0 ? "amber" : "good");
    set("rate:coupons_issued", rate("coupons_issued", now));
    set("coupons_issued", int(c.coupons_issued));

    rows("rewards", order(c.rewards_accepted, ["cash", "subsidy", "coupon", "item"]), function (tr, kind) {
      cell(tr, kind);
      cell(tr, rate("rewards_accepted:" + kind, now), "rate:rewards_accepted:" + kind);
      cell(tr, rate("rewards_credited:" + kind, now), "rate:rewards_credited:" + kind);
      cell(tr, int(c.rewards_accepted[kind]), "rewards_accepted:" + kind);
      cell(tr, int(c.rewards_credited[kind]), "rewards_credited:" + kind);
      cell(tr, int(s.rewards.lane_backlog[kind]), "lane_backlog:" + kind);
      var lag = s.rewards.lane_lag_seconds[kind] || 0;
      cell(tr, lag.toFixed(1), "lane_lag:" + kind, lag >= 5 ? "amber" : null);
      cell(tr, int(s.rewards.pending[kind]), "pending:" + kind);
    });
    rows("budgets", s.budgets, function (tr, b) {
      cell(tr, b.activity);
      [["cash", b.cash], ["subsidy", b.subsidy]].forEach(function (pair) {
        var td = cell(tr, money(pair[1]), "budget:" + b.activity + ":" + pair[0],
                      pair[1] && pair[1].fen <= 0 ? "amber" : null);
        if (pair[1]) { td.setAttribute("data-fen", String(pair[1].fen)); }
      });
    });
    if (!s.budgets.length) {
      rows("budgets", [1], function (tr) { cell(tr, "no budget set yet", null, "dim"); });
    }
    rows("withdrawals", order(c.withdrawals, ["requested", "succeeded", "refunded", "failed"]), function (tr, m) {
      cell(tr, m);
      cell(tr, rate("withdrawals:" + m, now), "rate:withdrawals:" + m);
      cell(tr, int(c.withdrawals[m]), "withdrawals:" + m);
    });
    rows("payouts", order(c.payout_attempts, ["succeeded", "failed", "timeout", "throttled"]), function (tr, o) {
      cell(tr, o);
      cell(tr, rate("payout_attempts:" + o, now), "rate:payout_attempts:" + o);
      cell(tr, int(c.payout_attempts[o]), "payout_attempts:" + o);
    });
    rows("channels", Object.keys(s.payouts.lane_backlog), function (tr, ch) {
      cell(tr, ch);
      cell(tr, int(s.payouts.lane_backlog[ch]), "payout_backlog:" + ch);
      cell(tr, int(s.payouts.parked_total[ch] || 0), "parked_total:" + ch);
    });
    rows("claims", order(c.packet_claims, ["claimed", "repeated", "empty", "busy", "expired", "refused"]), function (tr, o) {
      cell(tr, o);
      cell(tr, rate("packet_claims:" + o, now), "rate:packet_claims:" + o);
      cell(tr, int(c.packet_claims[o]), "packet_claims:" + o);
    });
    rows("views", s.projections, function (tr, v) {
      cell(tr, v.name);
      cell(tr, int(v.checkpoint), "projection_checkpoint:" + v.name);
      cell(tr, int(v.lag), "projection_lag:" + v.name, v.lag > 1000 ? "amber" : null);
    });
    rows("switches", s.switches, function (tr, sw) {
      cell(tr, sw.name);
      cell(tr, sw.on ? "on" : "off", "switch:" + sw.name, sw.on ? "on" : "off");
      var by = sw.changed_by;
      var when = cell(tr, by ? clock(new Date(by.at)) + " by " + by.role : "never", null, "dim");
      if (by) { when.title = by.at + " by " + by.role; }
    });

    previous = now;
    lastOk = new Date();
    lastSample = s;
    set("refreshed", clock(lastOk));
    tick();
  }

  function tick() {
    if (!lastOk) { return; }
    var ago = Math.round((Date.now() - lastOk.getTime()) / 1000);
    set("refreshed_ago", "(" + ago + " s ago)");
    if (ago * 1000 > EVERY_MS * 3) {
      document.body.setAttribute("data-level", "stale");
      set("level", "no answer");
    }
  }

  /* ?load_test=1: the load-test engine's books (the marked request's), never the real ones. */
  var LOAD_TEST = /(^|[?&])load_test=1(&|$)/.test(location.search);
  function refresh() {
    var headers = { "Accept": "application/json" };
    if (LOAD_TEST) { headers["X-Hongbao-Load-Test"] = "1"; }
    fetch("/status.json", { cache: "no-store", headers: headers })
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.json();
      })
      .then(render)
      .catch(function (e) {
        var problems = document.getElementById("problems");
        var li = document.createElement("li");
        li.className = "alert";
        li.setAttribute("data-problem", "unreachable");
        li.textContent = "no answer from the server: " + e.message +
          (lastOk ? " (last figures from " + clock(lastOk) + ")" : "");
        problems.replaceChildren(li);
        document.body.setAttribute("data-level", "stale");
        set("level", "no answer");
      })
      .then(function () { setTimeout(refresh, EVERY_MS); });
  }

  setInterval(tick, 1000);
  refresh();
})();
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yuan_is_fen_with_two_decimals_by_integer_arithmetic() {
        assert_eq!(yuan(0), "0.00");
        assert_eq!(yuan(5), "0.05");
        assert_eq!(yuan(150), "1.50");
        assert_eq!(yuan(999_712), "9997.12");
        assert_eq!(yuan(-1234), "-12.34");
        // Beyond what an f64 holds exactly.
        assert_eq!(yuan(9_007_199_254_740_993), "90071992547409.93");
        assert_eq!(yuan(i64::MIN), "-92233720368547758.08");
    }

    #[test]
    fn the_page_names_its_own_inline_script_and_style_and_nothing_else() {
        let page = page();
        assert!(page.html.contains(SCRIPT) && page.html.contains(STYLE));
        assert!(!page.html.contains("/*SCRIPT*/") && !page.html.contains("/*STYLE*/"));
        assert!(page.policy.starts_with("default-src 'none';"));
        assert!(page.policy.contains("connect-src 'self'"));
        assert_eq!(page.policy.matches("'sha256-").count(), 2);
        assert!(!page.policy.contains("unsafe"));
    }
}
