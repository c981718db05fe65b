//! `hongbao simulate`: a seeded campaign, in process, on the manual clock, with faults drawn
//! from the seed (issue 15).
//!
//! The seed alone decides the run's plan: every request of the whole campaign (budgets, cash
//! and subsidy rewards with retries and force-credit, deposits, withdrawals through channels
//! that fail, time out and throttle, C2C and B2C packets with expiry, coupon batches with
//! groups and limits) and, with `--faults`, the fault after each step: a crash (the engine
//! dropped where it stands and the directory reopened), a crash between a journal write and
//! its flush, a failed flush then a crash, a lost answer, a request sent twice at once, a jump
//! of the clock. A failing seed runs the same plan again and prints it.
//!
//! What must hold, checked by the simulated clients from their side and by the audit:
//! - every time the engine opens the directory (after each crash and at the end): the audit's
//!   every invariant over the whole log and every view equal to its rebuild ([`engine`]);
//! - after each crash, every request whose answer was lost is retried with the same id and
//!   gets an answer (never a 5xx);
//! - every acknowledged deposit, credited reward, withdrawal, packet claim and coupon is there
//!   exactly once with what its answer said, and nothing refused took effect;
//! - at the end, every acknowledged request sent again gives the same status and body.

pub mod engine;

use crate::clock::{ManualClock, Millis};
use crate::config::{AuthConfig, Config};
use engine::{Answer, Call, Ending, Incarnation, Role};
use rand::{Rng, RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The campaign starts at 2026-01-29 12:00 UTC, in the default withdrawal window.
const START_MS: Millis = 1_769_688_000_000;
/// Users of the campaign, `u0`... (the brand that sends B2C packets is `brand`).
const USERS: usize = 12;
const ACTIVITY: &str = "sim";

/// What to run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub steps: usize,
    /// Draw faults (crashes, lost answers, duplicates, clock jumps) from the seed too.
    pub faults: bool,
}

/// What a run did, for the report line.
#[derive(Debug, Default, Clone)]
pub struct SimReport {
    pub seed: u64,
    pub steps: usize,
    pub calls: u64,
    pub crashes: u32,
    pub crashes_before_flush: u32,
    pub failed_flushes: u32,
    pub lost_answers: u32,
    pub duplicates: u32,
    pub clock_jumps: u32,
    /// Acknowledged requests by kind.
    pub acked: BTreeMap<&'static str, u64>,
    /// Refused requests (4xx) by their code.
    pub refused: BTreeMap<String, u64>,
    /// Times the engine opened the directory and the audit held.
    pub audits: u32,
    /// Events in the log at the end.
    pub events: u64,
}

impl fmt::Display for SimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let acked: Vec<String> = self.acked.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let refused: Vec<String> = self
            .refused
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        write!(
            f,
            "seed {}: {} steps, {} calls (acknowledged: {}; refused: {}), {} crashes ({} before a \
             flush, {} after a failed flush), {} lost answers resolved, {} duplicates, {} clock \
             jumps; the audit held at all {} openings ({} events at the end), every \
             acknowledged effect present once",
            self.seed,
            self.steps,
            self.calls,
            acked.join(", "),
            refused.join(", "),
            self.crashes,
            self.crashes_before_flush,
            self.failed_flushes,
            self.lost_answers,
            self.duplicates,
            self.clock_jumps,
            self.audits,
            self.events
        )
    }
}

/// A failed run: the seed, where it failed, what did not hold, and the plan to replay.
#[derive(Debug)]
pub struct SimFailure {
    pub seed: u64,
    /// The step being run (or checked after) when it failed; `None` at the end.
    pub step: Option<usize>,
    pub what: String,
    pub plan: Vec<String>,
}

impl fmt::Display for SimFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = self
            .step
            .map_or("the end".to_string(), |s| format!("step {s}"));
        writeln!(f, "seed {} failed at {at}: {}", self.seed, self.what)?;
        writeln!(
            f,
            "the plan (`hongbao simulate --seed {}` runs it again):",
            self.seed
        )?;
        for (i, line) in self.plan.iter().enumerate() {
            let mark = if Some(i) == self.step { ">>" } else { "  " };
            writeln!(f, "{mark} {i:>5} {line}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SimFailure {}

#[derive(Debug, Clone)]
enum Op {
    Budget {
        cash: u64,
        subsidy: u64,
    },
    Deposit {
        uid: String,
        order: String,
        amount: u64,
    },
    Reward {
        uid: String,
        order: String,
        kind: &'static str,
        amount: u64,
    },
    ForceCredit {
        uid: String,
        orders: Vec<String>,
    },
    Bind {
        uid: String,
        kind: &'static str,
    },
    Withdraw {
        uid: String,
        order: String,
        amount: u64,
        kind: &'static str,
    },
    Channel {
        name: &'static str,
        rate_per_s: u32,
        latency_ms: u64,
        fail_rate: f64,
        timeout_rate: f64,
    },
    C2c {
        packet: String,
        sender: String,
        total: u64,
        count: u64,
        split: &'static str,
        expires_in_s: u64,
    },
    Pay {
        packet: String,
    },
    B2c {
        packet: String,
        subsidy_order: String,
        count: u64,
        split: &'static str,
        expires_in_s: u64,
    },
    Claim {
        packet: String,
        uid: String,
    },
    Batch {
        batch: String,
        group: Option<String>,
        stock: u64,
        per_user_limit: u64,
        value: u64,
    },
    Issue {
        seq_no: String,
        uid: String,
        batch: String,
        sync: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    LostAnswer,
    Duplicate,
    Crash,
    CrashBeforeFlush,
    FlushFailsThenCrash,
    ClockJump(i64),
}

#[derive(Debug, Clone)]
struct Step {
    op: Op,
    /// Time that passes before the step.
    tick_ms: i64,
    fault: Option<Fault>,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "+{}ms {:?}", self.tick_ms, self.op)?;
        if let Some(fault) = self.fault {
            write!(f, "  FAULT {fault:?}")?;
        }
        Ok(())
    }
}

/// One of `choices`, evenly.
fn pick<T: Copy, const N: usize>(rng: &mut ChaCha8Rng, choices: [T; N]) -> T {
    choices[rng.random_range(0..N)]
}

fn user(rng: &mut impl Rng) -> String {
    format!("u{}", rng.random_range(0..USERS))
}

/// The whole run, from the seed alone.
fn plan(config: &SimConfig) -> Vec<Step> {
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut steps = Vec::with_capacity(config.steps + 8);
    let push = |steps: &mut Vec<Step>, op| {
        steps.push(Step {
            op,
            tick_ms: 0,
            fault: None,
        })
    };
    // The night's set-up: a budget, the channels as the bank gives them, a first batch.
    push(
        &mut steps,
        Op::Budget {
            cash: 40_000,
            subsidy: 30_000,
        },
    );
    push(
        &mut steps,
        Op::Batch {
            batch: "b0".into(),
            group: Some("g0".into()),
            stock: 20,
            per_user_limit: 2,
            value: 500,
        },
    );
    let (mut cash_orders, mut subsidy_orders): (Vec<(String, String)>, Vec<String>) =
        (Vec::new(), Vec::new());
    let (mut packets, mut batches) = (Vec::<String>::new(), vec!["b0".to_string()]);
    let mut unpaid = Vec::<String>::new();
    let mut pay_next: Option<String> = None;
    let mut bound = std::collections::BTreeSet::new();
    let (mut budget_cash, mut budget_subsidy) = (40_000u64, 30_000u64);
    let mut n = 0u64;
    let mut next = |prefix: &str| {
        n += 1;
        format!("{prefix}-{n}")
    };
    while steps.len() < config.steps {
        let roll = rng.random_range(0..100);
        let op = match roll {
            _ if pay_next.is_some() => Op::Pay {
                packet: pay_next.take().unwrap_or_default(),
            },
            0..=13 => Op::Deposit {
                uid: user(&mut rng),
                order: next("dep"),
                amount: rng.random_range(100..5_000),
            },
            14..=31 => {
                let uid = user(&mut rng);
                let order = next("rw");
                cash_orders.push((uid.clone(), order.clone()));
                Op::Reward {
                    uid,
                    order,
                    kind: "cash",
                    amount: rng.random_range(1..800),
                }
            }
            32..=35 => {
                let order = next("sub");
                subsidy_orders.push(order.clone());
                Op::Reward {
                    uid: "brand".into(),
                    order,
                    kind: "subsidy",
                    amount: rng.random_range(100..3_000),
                }
            }
            36..=40 if !cash_orders.is_empty() => {
                // A retry of an earlier reward, as a game server does when it lost the answer.
                let (uid, order) = cash_orders[rng.random_range(0..cash_orders.len())].clone();
                let uid_orders: Vec<String> = cash_orders
                    .iter()
                    .filter(|(u, _)| *u == uid)
                    .map(|(_, o)| o.clone())
                    .collect();
                if rng.random_bool(0.5) {
                    Op::ForceCredit {
                        uid,
                        orders: uid_orders.into_iter().rev().take(3).collect(),
                    }
                } else {
                    Op::ForceCredit {
                        uid,
                        orders: vec![order],
                    }
                }
            }
            41..=43 => {
                // Binding again is idempotent: the same method.
                let (uid, kind) = (user(&mut rng), pick(&mut rng, ["bank", "alipay"]));
                bound.insert((uid.clone(), kind));
                Op::Bind { uid, kind }
            }
            // Withdrawals go through the methods users bound (an unbound one binds first).
            44..=52 => {
                let uid = user(&mut rng);
                let kind = pick(&mut rng, ["bank", "alipay"]);
                if bound.insert((uid.clone(), kind)) {
                    Op::Bind { uid, kind }
                } else {
                    Op::Withdraw {
                        uid,
                        order: next("wd"),
                        amount: rng.random_range(50..1_500),
                        kind,
                    }
                }
            }
            53..=55 => Op::Channel {
                name: pick(&mut rng, ["bank", "alipay"]),
                // Rates within what a channel accepts, and now and then one it refuses.
                rate_per_s: pick(&mut rng, [0u32, 5, 50, 1_000, 1_000]),
                latency_ms: rng.random_range(0..20),
                fail_rate: pick(&mut rng, [0.0, 0.1, 0.3, 0.9]),
                timeout_rate: pick(&mut rng, [0.0, 0.1]),
            },
            56..=60 => {
                let packet = next("c2c");
                packets.push(packet.clone());
                let total = rng.random_range(10..3_000);
                // Most senders pay at once (the next step); the others later, or never.
                if rng.random_bool(0.7) {
                    pay_next = Some(packet.clone());
                } else {
                    unpaid.push(packet.clone());
                }
                Op::C2c {
                    packet,
                    sender: user(&mut rng),
                    total,
                    count: rng.random_range(1..10u64).min(total),
                    split: pick(&mut rng, ["lucky", "even"]),
                    expires_in_s: rng.random_range(30..1_800),
                }
            }
            61..=64 if !unpaid.is_empty() => Op::Pay {
                packet: unpaid.swap_remove(rng.random_range(0..unpaid.len())),
            },
            65..=67 if !subsidy_orders.is_empty() => {
                let packet = next("b2c");
                packets.push(packet.clone());
                Op::B2c {
                    packet,
                    subsidy_order: subsidy_orders[rng.random_range(0..subsidy_orders.len())]
                        .clone(),
                    count: rng.random_range(1..12),
                    split: pick(&mut rng, ["lucky", "even"]),
                    expires_in_s: rng.random_range(30..1_800),
                }
            }
            68..=83 if !packets.is_empty() => {
                // Claims go mostly to the latest packets, where the crowd is.
                let back = rng.random_range(0..packets.len().min(4));
                Op::Claim {
                    packet: packets[packets.len() - 1 - back].clone(),
                    uid: user(&mut rng),
                }
            }
            84..=85 => {
                let batch = next("b");
                batches.push(batch.clone());
                let group = match rng.random_range(0..3) {
                    0 => None,
                    1 => Some("g0".into()),
                    _ => Some("g1".into()),
                };
                Op::Batch {
                    batch,
                    group,
                    stock: rng.random_range(1..40),
                    per_user_limit: rng.random_range(1..4),
                    value: rng.random_range(50..1_000),
                }
            }
            86..=96 => Op::Issue {
                seq_no: next("cs"),
                uid: user(&mut rng),
                batch: batches[rng.random_range(0..batches.len())].clone(),
                sync: rng.random_bool(0.6),
            },
            97..=99 => {
                budget_cash += rng.random_range(0..20_000);
                budget_subsidy += rng.random_range(0..10_000);
                Op::Budget {
                    cash: budget_cash,
                    subsidy: budget_subsidy,
                }
            }
            _ => continue,
        };
        let fault = if config.faults {
            match rng.random_range(0..1000) {
                0..=11 => Some(Fault::Crash),
                12..=17 => Some(Fault::CrashBeforeFlush),
                18..=20 => Some(Fault::FlushFailsThenCrash),
                21..=80 => Some(Fault::LostAnswer),
                81..=130 => Some(Fault::Duplicate),
                131..=145 => Some(Fault::ClockJump(rng.random_range(60_000..3_600_000))),
                _ => None,
            }
        } else {
            None
        };
        steps.push(Step {
            op,
            tick_ms: rng.random_range(0..2_000),
            fault,
        });
    }
    steps
}

/// The effect a request has when acknowledged, as the clients check it.
#[derive(Debug, Clone)]
enum Effect {
    Deposit {
        uid: String,
        order: String,
        amount: u64,
    },
    Reward {
        uid: String,
        order: String,
        amount: u64,
        kind: &'static str,
    },
    Withdrawal {
        uid: String,
        order: String,
        amount: u64,
    },
    Claim {
        packet: String,
        uid: String,
    },
    Issue {
        seq_no: String,
        uid: String,
        sync: bool,
    },
    Packet,
    /// A C2C packet's payment from its sender's change.
    Pay {
        uid: String,
        packet: String,
        total: u64,
    },
    /// Budgets, channel settings, payout methods, batches, force-credits: idempotent, and
    /// checked through the effects above.
    Setting,
}

impl Effect {
    fn name(&self) -> &'static str {
        match self {
            Effect::Deposit { .. } => "deposits",
            Effect::Reward { kind: "cash", .. } => "cash rewards",
            Effect::Reward { .. } => "subsidies",
            Effect::Withdrawal { .. } => "withdrawals",
            Effect::Claim { .. } => "claims",
            Effect::Issue { .. } => "coupon requests",
            Effect::Packet => "packet creations",
            Effect::Pay { .. } => "packet payments",
            Effect::Setting => "settings",
        }
    }

    /// Whether sending it again must answer exactly as the first time.
    fn replays(&self) -> bool {
        !matches!(self, Effect::Setting)
    }
}

/// A request the clients sent, and what they know of it.
struct Sent {
    step: usize,
    call: Call,
    effect: Effect,
    /// `None` while its answer is lost (to be retried with the same id).
    answer: Option<Answer>,
}

struct Sim {
    config: Config,
    clock: ManualClock,
    engine: Option<Incarnation>,
    sent: Vec<Sent>,
    /// Reward order -> (token, amount), from the answers.
    tokens: BTreeMap<String, (String, u64)>,
    /// (uid, kind) -> payout method id, from the answers.
    methods: BTreeMap<(String, &'static str), String>,
    /// C2C packet -> (sender, total), from the plan.
    c2c: BTreeMap<String, (String, u64)>,
    report: SimReport,
}

fn call(method: actix_web::http::Method, path: String, role: Role, body: Value) -> Call {
    Call {
        method,
        path,
        role,
        body: Some(body),
    }
}

fn get(path: String, role: Role) -> Call {
    Call {
        method: actix_web::http::Method::GET,
        path,
        role,
        body: None,
    }
}

/// The engine's configuration for a simulation in `dir`: fixed keys, the continuous audit and
/// checkpoints off (every opening audits), fast flows.
fn engine_config(dir: &Path) -> Config {
    let mut config = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    config.auth = AuthConfig {
        admin_key: Some("simulated-admin-key".into()),
        issuer_key: Some("simulated-issuer-key".into()),
        gateway_key: Some("simulated-gateway-key".into()),
        token_secret: Some("simulated-token-secret-0123456789".into()),
    };
    config.audit.continuous_every_ms = 0;
    config.audit.checkpoint_every_ms = 0;
    config.packets.expiry_check_ms = 20;
    config.withdrawals.retry_backoff_ms = vec![5, 10];
    config.withdrawals.sweep_interval_ms = 50;
    config.withdrawals.channel_call_timeout_ms = 200;
    config
}

impl Sim {
    fn open(dir: &Path, seed: u64) -> Result<Sim, String> {
        let mut sim = Sim {
            config: engine_config(dir),
            clock: ManualClock::new(START_MS),
            engine: None,
            sent: Vec::new(),
            tokens: BTreeMap::new(),
            methods: BTreeMap::new(),
            c2c: BTreeMap::new(),
            report: SimReport {
                seed,
                ..SimReport::default()
            },
        };
        sim.reopen()?;
        Ok(sim)
    }

    fn engine(&self) -> Result<&Incarnation, String> {
        self.engine
            .as_ref()
            .ok_or_else(|| "the engine is not open".into())
    }

    /// Opens the directory; the audit of what it holds must hold.
    fn reopen(&mut self) -> Result<(), String> {
        let (engine, opened) =
            Incarnation::open(self.config.clone(), Arc::new(self.clock.clone()))?;
        self.engine = Some(engine);
        if !opened.report.ok() {
            let failed: Vec<String> = opened
                .report
                .checks
                .iter()
                .filter(|c| !c.ok())
                .map(|c| format!("{}: {}", c.name, c.examples.join(" | ")))
                .collect();
            return Err(format!(
                "the audit on opening the directory (head {}) failed: {}",
                opened.head,
                failed.join("; ")
            ));
        }
        self.report.audits += 1;
        self.report.events = opened.head;
        Ok(())
    }

    /// Ends the incarnation (with `calls` sent into it for the crashes that take them) and
    /// opens the directory again.
    fn restart(&mut self, ending: Ending, calls: Vec<Call>) -> Result<Vec<Option<Answer>>, String> {
        let engine = self.engine.take().ok_or("the engine is not open")?;
        let answers = engine.end(ending, calls)?;
        self.reopen()?;
        Ok(answers)
    }

    /// The request of a step, and its effect; `None` when it needs what the clients do not
    /// know (a token or payout method whose answer was lost or refused).
    fn request(&self, op: &Op) -> Option<(Call, Effect)> {
        use actix_web::http::Method;
        Some(match op {
            Op::Budget { cash, subsidy } => (
                call(
                    Method::PUT,
                    format!("/v1/admin/activities/{ACTIVITY}/budget"),
                    Role::Admin,
                    json!({"cash": cash, "subsidy": subsidy}),
                ),
                Effect::Setting,
            ),
            Op::Deposit { uid, order, amount } => (
                call(
                    Method::POST,
                    format!("/v1/wallets/{uid}/change/deposits"),
                    Role::Admin,
                    json!({"order_id": order, "amount": amount}),
                ),
                Effect::Deposit {
                    uid: uid.clone(),
                    order: order.clone(),
                    amount: *amount,
                },
            ),
            Op::Reward {
                uid,
                order,
                kind,
                amount,
            } => (
                call(
                    Method::POST,
                    "/v1/rewards".into(),
                    Role::Issuer,
                    json!({"order_id": order, "uid": uid, "activity_id": ACTIVITY, "scene": "rain", "kind": kind, "amount": amount}),
                ),
                Effect::Reward {
                    uid: uid.clone(),
                    order: order.clone(),
                    amount: *amount,
                    kind,
                },
            ),
            Op::ForceCredit { uid, orders } => {
                let tokens: Vec<&String> = orders
                    .iter()
                    .filter_map(|o| self.tokens.get(o).map(|(t, _)| t))
                    .collect();
                if tokens.is_empty() {
                    return None;
                }
                (
                    call(
                        Method::POST,
                        format!("/v1/wallets/{uid}/force-credit"),
                        Role::Gateway,
                        json!({"tokens": tokens}),
                    ),
                    Effect::Setting,
                )
            }
            Op::Bind { uid, kind } => (
                call(
                    Method::POST,
                    format!("/v1/wallets/{uid}/payout-methods"),
                    Role::Gateway,
                    json!({"kind": kind, "account": format!("{uid}-{kind}")}),
                ),
                Effect::Setting,
            ),
            Op::Withdraw {
                uid,
                order,
                amount,
                kind,
            } => {
                let method = self.methods.get(&(uid.clone(), *kind))?;
                (
                    call(
                        Method::POST,
                        format!("/v1/wallets/{uid}/withdrawals"),
                        Role::Gateway,
                        json!({"order_id": order, "amount": amount, "method_id": method}),
                    ),
                    Effect::Withdrawal {
                        uid: uid.clone(),
                        order: order.clone(),
                        amount: *amount,
                    },
                )
            }
            Op::Channel {
                name,
                rate_per_s,
                latency_ms,
                fail_rate,
                timeout_rate,
            } => (
                call(
                    Method::PUT,
                    format!("/v1/admin/channels/{name}"),
                    Role::Admin,
                    json!({"rate_per_s": rate_per_s, "latency_ms": latency_ms, "fail_rate": fail_rate, "timeout_rate": timeout_rate}),
                ),
                Effect::Setting,
            ),
            Op::C2c {
                packet,
                sender,
                total,
                count,
                split,
                expires_in_s,
            } => (
                call(
                    Method::POST,
                    "/v1/packets".into(),
                    Role::Gateway,
                    json!({"packet_id": packet, "sender_uid": sender, "mode": "c2c", "total": total, "count": count, "split": split, "expires_in_s": expires_in_s}),
                ),
                Effect::Packet,
            ),
            Op::Pay { packet } => {
                let (sender, total) = self.c2c.get(packet)?.clone();
                (
                    call(
                        Method::POST,
                        format!("/v1/packets/{packet}/pay"),
                        Role::Gateway,
                        json!({"payment_id": format!("pay-{packet}")}),
                    ),
                    Effect::Pay {
                        uid: sender,
                        packet: packet.clone(),
                        total,
                    },
                )
            }
            Op::B2c {
                packet,
                subsidy_order,
                count,
                split,
                expires_in_s,
            } => {
                let (token, total) = self.tokens.get(subsidy_order)?;
                (
                    call(
                        Method::POST,
                        "/v1/packets".into(),
                        Role::Gateway,
                        json!({"packet_id": packet, "sender_uid": "brand", "mode": "b2c", "total": total, "count": count.min(total), "split": split, "expires_in_s": expires_in_s, "subsidy_token": token}),
                    ),
                    Effect::Packet,
                )
            }
            Op::Claim { packet, uid } => (
                call(
                    Method::POST,
                    format!("/v1/packets/{packet}/claims"),
                    Role::Gateway,
                    json!({"uid": uid}),
                ),
                Effect::Claim {
                    packet: packet.clone(),
                    uid: uid.clone(),
                },
            ),
            Op::Batch {
                batch,
                group,
                stock,
                per_user_limit,
                value,
            } => {
                let mut body = json!({"batch_id": batch, "stock": stock, "per_user_limit": per_user_limit, "value": value});
                if let Some(group) = group {
                    body["group_id"] = json!(group);
                }
                (
                    call(Method::POST, "/v1/coupon-batches".into(), Role::Admin, body),
                    Effect::Setting,
                )
            }
            Op::Issue {
                seq_no,
                uid,
                batch,
                sync,
            } => (
                call(
                    Method::POST,
                    "/v1/coupons/issue".into(),
                    Role::Issuer,
                    json!({"seq_no": seq_no, "uid": uid, "batch_id": batch, "sync": sync}),
                ),
                Effect::Issue {
                    seq_no: seq_no.clone(),
                    uid: uid.clone(),
                    sync: *sync,
                },
            ),
        })
    }

    /// Takes in an answer: what later steps need from it, and the tally. A 5xx is a failure
    /// unless `may_be_unavailable` (the journal failed on purpose): then the answer is lost.
    fn learn(
        &mut self,
        index: usize,
        answer: Option<Answer>,
        may_be_unavailable: bool,
    ) -> Result<(), String> {
        let Some((status, body)) = answer else {
            return Ok(());
        };
        let sent = &self.sent[index];
        if status >= 500 {
            if may_be_unavailable && status == 503 {
                return Ok(());
            }
            return Err(format!(
                "{} {} answered {status}: {body}",
                sent.call.method, sent.call.path
            ));
        }
        match (&sent.effect, status) {
            (Effect::Reward { order, amount, .. }, 202) => {
                if let Some(token) = body["token"].as_str() {
                    self.tokens
                        .insert(order.clone(), (token.to_string(), *amount));
                }
            }
            (Effect::Setting, 201) if sent.call.path.ends_with("/payout-methods") => {
                let uid = sent
                    .call
                    .path
                    .split('/')
                    .nth(3)
                    .unwrap_or_default()
                    .to_string();
                let bound_kind = sent.call.body.as_ref().map(|b| b["kind"].clone());
                let kind = if bound_kind == Some(json!("bank")) {
                    "bank"
                } else {
                    "alipay"
                };
                if let Some(method) = body["method_id"].as_str() {
                    self.methods.insert((uid, kind), method.to_string());
                }
            }
            _ => {}
        }
        if status < 300 {
            *self.report.acked.entry(sent.effect.name()).or_default() += 1;
        } else {
            let code = body["code"].as_str().unwrap_or("?").to_string();
            *self.report.refused.entry(code).or_default() += 1;
        }
        self.sent[index].answer = Some((status, body));
        Ok(())
    }

    fn step(&mut self, index: usize, step: &Step) -> Result<(), String> {
        self.clock.advance_ms(step.tick_ms);
        if let Some(Fault::ClockJump(ms)) = step.fault {
            self.clock.advance_ms(ms);
            self.report.clock_jumps += 1;
        }
        if let Op::C2c {
            packet,
            sender,
            total,
            ..
        } = &step.op
        {
            self.c2c.insert(packet.clone(), (sender.clone(), *total));
        }
        let Some((call, effect)) = self.request(&step.op) else {
            return Ok(());
        };
        self.sent.push(Sent {
            step: index,
            call: call.clone(),
            effect,
            answer: None,
        });
        let at = self.sent.len() - 1;
        self.report.calls += 1;
        match step.fault {
            None | Some(Fault::ClockJump(_)) => {
                let answer = self.engine()?.call(call).ok_or("no answer")?;
                self.learn(at, Some(answer), false)
            }
            Some(Fault::LostAnswer) => {
                // Sent and answered, but the answer never reached the client (a 5xx is a
                // failure all the same).
                let (status, body) = self.engine()?.call(call).ok_or("no answer")?;
                if status >= 500 {
                    return Err(format!("answered {status}: {body}"));
                }
                self.report.lost_answers += 1;
                Ok(())
            }
            Some(Fault::Duplicate) => {
                self.report.calls += 1;
                self.report.duplicates += 1;
                let answers = self.engine()?.call_all(vec![call.clone(), call]);
                let (a, b) = (
                    answers[0].clone().ok_or("no answer")?,
                    answers[1].clone().ok_or("no answer")?,
                );
                // Two copies at once: one does it, the other gets the same answer or is asked
                // to come back (429); never two different outcomes. A setting without a
                // request id (a force-credit) says what each copy did: the same status, the
                // body may differ (one credited the reward, the other found it `already`).
                let same = if self.sent[at].effect.replays() {
                    a == b
                } else {
                    a.0 == b.0
                };
                if !same && a.0 != 429 && b.0 != 429 {
                    return Err(format!(
                        "the same request sent twice at once got two answers: {a:?} and {b:?}"
                    ));
                }
                let answer = if a.0 == 429 { b } else { a };
                if answer.0 == 429 {
                    self.report.lost_answers += 1;
                    return Ok(());
                }
                self.learn(at, Some(answer), false)
            }
            Some(Fault::Crash) => {
                let answer = self.engine()?.call(call).ok_or("no answer")?;
                self.learn(at, Some(answer), false)?;
                self.report.crashes += 1;
                self.restart(Ending::Crash, Vec::new())?;
                self.after_crash()
            }
            Some(fault @ (Fault::CrashBeforeFlush | Fault::FlushFailsThenCrash)) => {
                let ending = if fault == Fault::CrashBeforeFlush {
                    self.report.crashes_before_flush += 1;
                    Ending::CrashBeforeFlush
                } else {
                    self.report.failed_flushes += 1;
                    Ending::FlushFailsThenCrash
                };
                self.report.crashes += 1;
                let answers = self.restart(ending, vec![call])?;
                let answer = answers.into_iter().next().flatten();
                if answer.as_ref().is_none_or(|(status, _)| *status == 503) {
                    self.report.lost_answers += 1;
                }
                // Only a failed flush may answer 503 (the journal stopped on purpose).
                self.learn(at, answer, fault == Fault::FlushFailsThenCrash)?;
                self.after_crash()
            }
        }
    }

    /// After a crash: every lost answer retried with the same id, then every effect checked.
    fn after_crash(&mut self) -> Result<(), String> {
        self.resolve_lost()?;
        self.check_effects()
    }

    /// Retries every request whose answer was lost, as its client must, until it is answered
    /// (a 429 or 503 is waited out a little: the engine has just opened).
    fn resolve_lost(&mut self) -> Result<(), String> {
        for index in 0..self.sent.len() {
            if self.sent[index].answer.is_some() {
                continue;
            }
            let mut tries = 0;
            loop {
                let answer = self
                    .engine()?
                    .call(self.sent[index].call.clone())
                    .ok_or("no answer")?;
                if matches!(answer.0, 429 | 503) && tries < 100 {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                self.report.calls += 1;
                self.learn(index, Some(answer), false)?;
                break;
            }
        }
        Ok(())
    }

    fn read(&self, path: String, role: Role) -> Result<Value, String> {
        let (status, body) = self
            .engine()?
            .call(get(path.clone(), role))
            .ok_or("no answer")?;
        if status != 200 {
            return Err(format!("GET {path} answered {status}: {body}"));
        }
        Ok(body)
    }

    /// A wallet's whole ledger: order id -> its lines as `entry:amount`, sorted.
    fn ledger(&self, uid: &str) -> Result<BTreeMap<String, Vec<String>>, String> {
        let mut lines: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut before: Option<u64> = None;
        loop {
            let path = match before {
                Some(b) => format!("/v1/wallets/{uid}/ledger?limit=500&before={b}"),
                None => format!("/v1/wallets/{uid}/ledger?limit=500"),
            };
            let page = self.read(path, Role::Gateway)?;
            for line in page["ledger"].as_array().into_iter().flatten() {
                let order = line["order_id"].as_str().unwrap_or_default().to_string();
                let entry = line["entry"].as_str().unwrap_or("?");
                let amount = line["amount"].as_u64().unwrap_or(0);
                lines
                    .entry(order)
                    .or_default()
                    .push(format!("{entry}:{amount}"));
            }
            match page["next_before"].as_u64() {
                Some(b) => before = Some(b),
                None => {
                    lines.values_mut().for_each(|l| l.sort());
                    return Ok(lines);
                }
            }
        }
    }

    /// Every acknowledged effect is there exactly once with what its answer said, and nothing
    /// refused took effect.
    fn check_effects(&self) -> Result<(), String> {
        // Rewards and withdrawals move on while this reads (lanes credit, payouts settle):
        // their states are read before the ledgers, so a ledger may be ahead of its state,
        // never behind it.
        let mut states: BTreeMap<String, (u16, Value)> = BTreeMap::new();
        for sent in &self.sent {
            let path = match &sent.effect {
                Effect::Reward { order, .. } => format!("/v1/rewards/{order}"),
                Effect::Withdrawal { order, .. } => format!("/v1/withdrawals/{order}"),
                _ => continue,
            };
            let found = self
                .engine()?
                .call(get(path.clone(), Role::Gateway))
                .ok_or("no answer")?;
            states.insert(path, found);
        }
        let mut ledgers: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
        for uid in (0..USERS)
            .map(|i| format!("u{i}"))
            .chain(["brand".to_string()])
        {
            let ledger = self.ledger(&uid)?;
            ledgers.insert(uid, ledger);
        }
        let lines = |uid: &str, order: &str| -> Vec<String> {
            ledgers
                .get(uid)
                .and_then(|l| l.get(order))
                .cloned()
                .unwrap_or_default()
        };
        // (packet, uid) -> the amounts acknowledged to the claimant.
        let mut claims: BTreeMap<(String, String), Vec<u64>> = BTreeMap::new();
        let mut refused_claims: Vec<(String, String)> = Vec::new();
        for sent in &self.sent {
            let Some((status, body)) = &sent.answer else {
                return Err(format!("step {}: an answer is still lost", sent.step));
            };
            let acked = *status < 300;
            let at = format!(
                "step {} ({} {} -> {status} {body})",
                sent.step, sent.call.method, sent.call.path
            );
            match &sent.effect {
                Effect::Deposit { uid, order, amount } => {
                    let want = if acked {
                        vec![format!("deposit:{amount}")]
                    } else {
                        vec![]
                    };
                    if lines(uid, order) != want {
                        return Err(format!(
                            "{at}: deposit {order} has ledger lines {:?}, expected {want:?}",
                            lines(uid, order)
                        ));
                    }
                }
                Effect::Reward {
                    uid,
                    order,
                    amount,
                    kind,
                } => {
                    let (status_now, found) = &states[&format!("/v1/rewards/{order}")];
                    let status_now = *status_now;
                    if !acked {
                        if status_now != 404 {
                            return Err(format!(
                                "{at}: a refused reward is known: {status_now} {found}"
                            ));
                        }
                        continue;
                    }
                    if status_now != 200 || found["amount"].as_u64() != Some(*amount) {
                        return Err(format!(
                            "{at}: acknowledged reward {order} reads {status_now} {found}"
                        ));
                    }
                    if *kind == "cash" {
                        let credited = found["status"] == "credited";
                        let line = vec![format!("reward:{amount}")];
                        let want = if credited { line.clone() } else { vec![] };
                        // Accepted when read, and credited by the lanes since: one line too.
                        let ahead = !credited && lines(uid, order) == line;
                        if lines(uid, order) != want && !ahead {
                            return Err(format!("{at}: reward {order} ({}) has ledger lines {:?}, expected {want:?}", found["status"], lines(uid, order)));
                        }
                    }
                }
                Effect::Withdrawal { uid, order, amount } => {
                    let (status_now, found) = &states[&format!("/v1/withdrawals/{order}")];
                    let status_now = *status_now;
                    if !acked {
                        // Unknown, or recorded as failed before any debit (the refusal of an
                        // order the withdrawal actor took in).
                        let moved = !lines(uid, order).is_empty();
                        if moved || !(status_now == 404 || found["state"] == "failed") {
                            return Err(format!(
                                "{at}: a refused withdrawal took effect: {status_now} {found}"
                            ));
                        }
                        continue;
                    }
                    if status_now != 200
                        || found["amount"].as_u64() != Some(*amount)
                        || found["uid"] != json!(uid)
                    {
                        return Err(format!(
                            "{at}: acknowledged withdrawal {order} reads {status_now} {found}"
                        ));
                    }
                    // The lines each state allows: its own, and those of the states it may
                    // have reached since it was read.
                    let debited = vec![format!("withdrawal:{amount}")];
                    let refunded = vec![
                        format!("withdrawal:{amount}"),
                        format!("withdrawal_refund:{amount}"),
                    ];
                    let none = vec![];
                    let allowed: Vec<&Vec<String>> = match found["state"].as_str() {
                        Some("pending_debit") => vec![&none, &debited, &refunded],
                        // Failed before a debit (refused), or parked after one and waiting
                        // for its refund (which may have come since).
                        Some("failed") if found["parked"] == true => vec![&debited, &refunded],
                        Some("failed") => vec![&none],
                        Some("succeeded") => vec![&debited],
                        Some("refunded") => vec![&refunded],
                        _ => vec![&debited, &refunded],
                    };
                    let want = allowed.clone();
                    if !allowed.contains(&&lines(uid, order)) {
                        return Err(format!("{at}: withdrawal {order} ({}) has ledger lines {:?}, expected {want:?}", found["state"], lines(uid, order)));
                    }
                }
                Effect::Claim { packet, uid } => {
                    if acked {
                        let amount = body["amount"]
                            .as_u64()
                            .ok_or_else(|| format!("{at}: a claim without its amount"))?;
                        claims
                            .entry((packet.clone(), uid.clone()))
                            .or_default()
                            .push(amount);
                    } else {
                        refused_claims.push((packet.clone(), uid.clone()));
                    }
                }
                Effect::Issue { seq_no, uid, sync } => {
                    if !acked {
                        // Refused: unknown, or on record as rejected; never issued.
                        let path = format!("/v1/coupons/requests/{seq_no}");
                        let (status_now, found) = self
                            .engine()?
                            .call(get(path, Role::Issuer))
                            .ok_or("no answer")?;
                        if status_now != 404 && found["status"] != "rejected" {
                            return Err(format!(
                                "{at}: a refused coupon request reads {status_now} {found}"
                            ));
                        }
                        continue;
                    }
                    let request =
                        self.read(format!("/v1/coupons/requests/{seq_no}"), Role::Issuer)?;
                    // The coupon: named by the answer (sync) or, once issued, by the request.
                    let coupon = if *sync {
                        let named = body["coupon_id"].as_str();
                        if request["status"] != "issued" || request["coupon_id"].as_str() != named {
                            return Err(format!("{at}: its request reads {request}"));
                        }
                        named
                    } else {
                        match request["status"].as_str() {
                            Some("issued") => request["coupon_id"].as_str(),
                            Some("accepted" | "rejected") => continue,
                            _ => return Err(format!("{at}: its request reads {request}")),
                        }
                    };
                    let coupon =
                        coupon.ok_or_else(|| format!("{at}: issued without a coupon id"))?;
                    let coupons = self.read(
                        format!("/v1/wallets/{uid}/coupons?limit=500"),
                        Role::Gateway,
                    )?;
                    let held = coupons
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|c| c["coupon_id"] == coupon)
                        .count();
                    if held != 1 {
                        return Err(format!("{at}: coupon {coupon} held {held} times by {uid}"));
                    }
                }
                Effect::Pay { uid, packet, total } => {
                    // Paid once from the sender's change when acknowledged, never when refused
                    // (the packet's refund at expiry is a line of its own).
                    let payment = format!("packet_payment:{total}");
                    let paid = lines(uid, packet).iter().filter(|l| **l == payment).count();
                    if paid != usize::from(acked) {
                        return Err(format!(
                            "{at}: {packet} paid {paid} times from {uid}: {:?}",
                            lines(uid, packet)
                        ));
                    }
                }
                Effect::Packet | Effect::Setting => {}
            }
        }
        let mut packets: BTreeMap<String, Value> = BTreeMap::new();
        for (packet, _) in claims.keys().chain(refused_claims.iter()) {
            if !packets.contains_key(packet) {
                // A claim refused on a packet never created (its creation refused) finds none.
                let path = format!("/v1/packets/{packet}");
                let (status, details) = self
                    .engine()?
                    .call(get(path.clone(), Role::Gateway))
                    .ok_or("no answer")?;
                if !matches!(status, 200 | 404) {
                    return Err(format!("GET {path} answered {status}: {details}"));
                }
                packets.insert(packet.clone(), details);
            }
        }
        let claimed = |packet: &str, uid: &str| -> Vec<u64> {
            packets[packet]["claims"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| c["uid"] == uid)
                .filter_map(|c| c["amount"].as_u64())
                .collect()
        };
        for ((packet, uid), amounts) in &claims {
            let found = claimed(packet, uid);
            if found.len() != 1 || amounts.iter().any(|a| *a != found[0]) {
                return Err(format!(
                    "packet {packet}: {uid} was answered {amounts:?}, the packet holds {found:?}"
                ));
            }
        }
        // The activity's accepted cash is exactly the acknowledged cash rewards: nothing
        // refused charged the budget, nothing acknowledged escaped it.
        let cash: u64 = self
            .sent
            .iter()
            .filter(|s| s.answer.as_ref().is_some_and(|(st, _)| *st < 300))
            .filter_map(|s| match &s.effect {
                Effect::Reward {
                    amount,
                    kind: "cash",
                    ..
                } => Some(*amount),
                _ => None,
            })
            .sum();
        let activity = self.read(format!("/v1/admin/activities/{ACTIVITY}"), Role::Admin)?;
        if activity["accepted"]["cash"].as_u64() != Some(cash) {
            return Err(format!(
                "the acknowledged cash rewards sum to {cash}, the activity accepted {}",
                activity["accepted"]
            ));
        }
        for (packet, uid) in &refused_claims {
            if !claims.contains_key(&(packet.clone(), uid.clone()))
                && !claimed(packet, uid).is_empty()
            {
                return Err(format!(
                    "packet {packet}: {uid} was refused, yet the packet holds a claim of theirs"
                ));
            }
        }
        Ok(())
    }

    /// Every acknowledged request sent again answers exactly as the first time.
    fn check_replays(&mut self) -> Result<(), String> {
        for index in 0..self.sent.len() {
            let sent = &self.sent[index];
            let Some(first) = sent.answer.clone().filter(|(s, _)| *s < 300) else {
                continue;
            };
            if !sent.effect.replays() {
                continue;
            }
            let again = self.engine()?.call(sent.call.clone()).ok_or("no answer")?;
            self.report.calls += 1;
            if again != first {
                return Err(format!(
                    "step {}: {} {} answered {first:?} and, sent again, {again:?}",
                    sent.step, sent.call.method, sent.call.path
                ));
            }
        }
        Ok(())
    }

    /// Waits (in real time, the clock moving on) until every acknowledged cash reward is
    /// credited and every coupon request decided, so that the end checks a settled campaign.
    fn settle(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let orders: Vec<String> = self
            .sent
            .iter()
            .filter(|s| s.answer.as_ref().is_some_and(|(st, _)| *st == 202))
            .filter_map(|s| match &s.effect {
                Effect::Reward {
                    order,
                    kind: "cash",
                    ..
                } => Some(order.clone()),
                _ => None,
            })
            .collect();
        let requests = self
            .sent
            .iter()
            .filter_map(|s| match (&s.effect, &s.answer) {
                (Effect::Issue { seq_no, .. }, Some((202, _))) => Some((
                    format!("/v1/coupons/requests/{seq_no}"),
                    "status",
                    "accepted",
                )),
                _ => None,
            });
        let rewards = orders
            .into_iter()
            .map(|order| (format!("/v1/rewards/{order}"), "status", "accepted"));
        let pending: Vec<_> = rewards.chain(requests).collect();
        for (path, field, unsettled) in pending {
            let unsettled: &str = unsettled;
            loop {
                let found = self.read(path.clone(), Role::Issuer)?;
                if found[field] != unsettled {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "{path} still {unsettled} 30 s after the last step: {found}"
                    ));
                }
                self.clock.advance_ms(1_000);
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    /// The end: lost answers resolved, the campaign settled, a graceful stop, the directory
    /// opened (and audited) once more, every effect and every replay checked.
    fn finish(mut self) -> Result<SimReport, String> {
        self.resolve_lost()?;
        self.settle()?;
        self.restart(Ending::Graceful, Vec::new())?;
        self.check_effects()?;
        self.check_replays()?;
        // The replays took no effect a second time: the log proven once more, every effect
        // still there once. (The log's head may have moved: the payout lanes and the expiry
        // flows go on beside them.)
        self.restart(Ending::Graceful, Vec::new())?;
        self.check_effects()?;
        let engine = self.engine.take().ok_or("the engine is not open")?;
        engine.end(Ending::Graceful, Vec::new())?;
        Ok(self.report)
    }
}

/// Panics anywhere in the process since it started counting them: a panic in an engine
/// thread (an actor, a flow) is a failure even when the request it served was answered.
static PANICS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn count_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            previous(info);
        }));
    });
}

fn panics() -> u64 {
    PANICS.load(std::sync::atomic::Ordering::SeqCst)
}

/// Runs one seed in `dir` (an empty directory, or one to create).
pub fn run_in(config: &SimConfig, dir: &Path) -> Result<SimReport, SimFailure> {
    count_panics();
    let panicked_before = panics();
    let steps = plan(config);
    let fail = |step: Option<usize>, what: String| SimFailure {
        seed: config.seed,
        step,
        what,
        plan: steps.iter().map(|s| s.to_string()).collect(),
    };
    let mut sim = Sim::open(dir, config.seed).map_err(|e| fail(Some(0), e))?;
    sim.report.steps = steps.len();
    let panicked = |what: Option<usize>| match panics() - panicked_before {
        0 => Ok(()),
        n => Err(fail(
            what,
            format!("{n} panics in the engine (printed above)"),
        )),
    };
    for (index, step) in steps.iter().enumerate() {
        sim.step(index, step).map_err(|e| fail(Some(index), e))?;
        panicked(Some(index))?;
    }
    let report = sim.finish().map_err(|e| fail(None, e))?;
    panicked(None)?;
    Ok(report)
}

/// Runs one seed in a temporary directory (removed afterwards).
pub fn run(config: &SimConfig) -> Result<SimReport, SimFailure> {
    let dir = tempfile::tempdir().map_err(|e| SimFailure {
        seed: config.seed,
        step: None,
        what: format!("cannot make a temporary directory: {e}"),
        plan: Vec::new(),
    })?;
    run_in(config, dir.path())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_plan_and_another_seed_another() {
        let config = |seed| SimConfig {
            seed,
            steps: 300,
            faults: true,
        };
        let text = |seed| {
            plan(&config(seed))
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(text(7), text(7));
        assert_ne!(text(7), text(8));
        assert_eq!(plan(&config(7)).len(), 300);
        let faults = plan(&config(7))
            .iter()
            .filter(|s| s.fault.is_some())
            .count();
        assert!(
            faults > 10,
            "a 300-step plan with faults draws some: {faults}"
        );
        let calm = SimConfig {
            faults: false,
            ..config(7)
        };
        assert!(plan(&calm).iter().all(|s| s.fault.is_none()));
    }
}
