//! `hongbao preflight`: the seeds' pre-night checklist (D8), run against the node that will
//! serve the night (its config file, its data directory, its HTTP API). Each item is a
//! [`Check`] that passes or says what is not ready; the command exits non-zero when any fails.
//!
//! The plan comes from the config's `[preflight]` section: the night's activities (each must
//! have a budget), the expected request volume (disk space), the planned state of every
//! degradation switch, each payment channel's limit at the bank, and the night's withdrawal
//! policy. An item the plan leaves out fails with what to state: a checklist that is silent
//! about something is not a green light.
//!
//! The rules are pure functions of what was read ([`Observed`] and the plan), unit tested; the
//! reading is [`observe`].

use crate::config::{Config, PreflightSection};
use crate::http::withdrawals::PolicyBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;

/// One item of the checklist.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

fn check(name: &str, ok: bool, detail: impl Into<String>) -> Check {
    Check {
        name: name.to_owned(),
        ok,
        detail: detail.into(),
    }
}

/// Whether the node runs on keys generated on first start.
#[derive(Debug, Clone, Default)]
pub struct KeySources {
    /// The keys of `<data_dir>/keys.toml` (generated on first start) that the node accepts:
    /// each was tried against the node (an unknown key is answered 401).
    pub generated: Vec<&'static str>,
    /// The token secret is neither in the environment nor in the config while keys.toml
    /// holds a generated one (it cannot be tried from outside).
    pub token_secret_generated: bool,
}

/// What preflight read from the node and its machine.
#[derive(Debug, Clone)]
pub struct Observed {
    /// `/readyz`: status and body, or why it could not be read.
    pub ready: Result<(u16, Value), String>,
    /// Per activity: `GET /v1/admin/activities/{id}` (status, body).
    pub activities: BTreeMap<String, Result<(u16, Value), String>>,
    /// Per channel: `GET /v1/admin/channels/{channel}`.
    pub channels: BTreeMap<String, Result<(u16, Value), String>>,
    /// `GET /v1/admin/switches`.
    pub switches: Result<(u16, Value), String>,
    /// `GET /v1/admin/withdrawal-policy`.
    pub policy: Result<(u16, Value), String>,
    /// The server's clock minus this machine's, from its `Date` header (ms).
    pub clock_skew_ms: Option<i64>,
    /// This machine's clock (ms since the epoch).
    pub now_ms: i64,
    pub keys: Result<KeySources, String>,
    /// The node's payout rate per channel (`[withdrawals] <channel>_per_s`, 0 = unlimited).
    pub payout_rates: BTreeMap<String, u32>,
    /// Free bytes where the data directory is.
    pub disk_free_bytes: Result<u64, String>,
}

/// The channels a night pays through.
pub const CHANNELS: [&str; 3] = ["bank", "alipay", "change"];

/// The checklist's verdicts on what was observed.
pub fn evaluate(plan: &PreflightSection, seen: &Observed) -> Vec<Check> {
    let mut checks = vec![
        server(seen),
        keys(seen),
        budgets(plan, seen),
        channels(plan, seen),
        policy(plan, seen),
        disk(plan, seen),
        clock(plan, seen),
        switches(plan, seen),
    ];
    checks.retain(|c| !c.name.is_empty());
    checks
}

fn read_error(what: &str, answer: &Result<(u16, Value), String>) -> Option<String> {
    match answer {
        Err(e) => Some(format!("{what}: {e}")),
        Ok((status, body)) if *status != 200 => Some(format!("{what}: {status} {body}")),
        Ok(_) => None,
    }
}

fn server(seen: &Observed) -> Check {
    match read_error("/readyz", &seen.ready) {
        Some(why) => check("server ready", false, why),
        None => check("server ready", true, "/readyz answers 200"),
    }
}

fn keys(seen: &Observed) -> Check {
    const NAME: &str = "keys provisioned";
    let keys = match &seen.keys {
        Err(e) => return check(NAME, false, format!("cannot tell: {e}")),
        Ok(keys) => keys,
    };
    let mut problems: Vec<String> = keys
        .generated
        .iter()
        .map(|role| format!("the node accepts the {role} key generated on first start"))
        .collect();
    if keys.token_secret_generated {
        problems.push(
            "the token secret is the one generated on first start (neither HONGBAO_TOKEN_SECRET \
             nor [auth] token_secret is set)"
                .into(),
        );
    }
    match problems.is_empty() {
        true => check(
            NAME,
            true,
            "the node accepts none of the generated keys, and the token secret is provisioned",
        ),
        false => check(
            NAME,
            false,
            format!(
                "{}: provision them (HONGBAO_* variables or [auth]) and restart",
                problems.join("; ")
            ),
        ),
    }
}

fn budgets(plan: &PreflightSection, seen: &Observed) -> Check {
    if plan.activities.is_empty() {
        return check(
            "budgets set",
            false,
            "no activities planned: list the night's activities in [preflight] activities",
        );
    }
    let mut missing = Vec::new();
    for activity in &plan.activities {
        let answer = seen
            .activities
            .get(activity)
            .cloned()
            .unwrap_or_else(|| Err("not read".into()));
        match answer {
            Ok((200, body)) => {
                let remaining = &body["remaining"];
                if body["budget"].is_null() {
                    missing.push(format!("{activity}: no budget set"));
                } else if remaining["cash"].as_u64().unwrap_or(0) == 0
                    && remaining["subsidy"].as_u64().unwrap_or(0) == 0
                {
                    missing.push(format!("{activity}: budget spent (nothing remaining)"));
                }
            }
            Ok((404, _)) => missing.push(format!("{activity}: no budget set")),
            other => missing.push(
                read_error(activity, &other).unwrap_or_else(|| format!("{activity}: unreadable")),
            ),
        }
    }
    match missing.is_empty() {
        true => check(
            "budgets set",
            true,
            format!("{} activities have budget remaining", plan.activities.len()),
        ),
        false => check("budgets set", false, missing.join("; ")),
    }
}

fn channels(plan: &PreflightSection, seen: &Observed) -> Check {
    let mut problems = Vec::new();
    for limited in plan.channel_limits.keys() {
        if !CHANNELS.contains(&limited.as_str()) {
            problems.push(format!("{limited}: no such channel (bank, alipay, change)"));
        }
    }
    for channel in CHANNELS {
        let answer = seen
            .channels
            .get(channel)
            .cloned()
            .unwrap_or_else(|| Err("not read".into()));
        if let Some(why) = read_error(channel, &answer) {
            problems.push(why);
            continue;
        }
        let body = answer.map(|(_, b)| b).unwrap_or_default();
        let failing = body["fail_rate"].as_f64().unwrap_or(1.0)
            + body["timeout_rate"].as_f64().unwrap_or(1.0);
        if failing > plan.channel_failure_rate_max {
            problems.push(format!(
                "{channel}: fails or times out {:.0}% of payments (at most {:.0}% planned)",
                failing * 100.0,
                plan.channel_failure_rate_max * 100.0
            ));
        }
        // The rate the node pays at (its payout lanes), not the simulated channel's own.
        let rate = seen.payout_rates.get(channel).copied().unwrap_or(0);
        match plan.channel_limits.get(channel) {
            Some(&limit) if rate == 0 => problems.push(format!(
                "{channel}: payouts unlimited ([withdrawals] {channel}_per_s = 0), the bank's \
                 limit is {limit}/s"
            )),
            Some(&limit) if rate > limit => problems.push(format!(
                "{channel}: paying at {rate}/s ([withdrawals] {channel}_per_s), over the bank's \
                 limit of {limit}/s"
            )),
            Some(_) => {}
            None if channel != "change" => problems.push(format!(
                "{channel}: no limit planned: state the bank's limit in [preflight.channel_limits]"
            )),
            None => {}
        }
    }
    match problems.is_empty() {
        true => check(
            "channels healthy",
            true,
            "bank, alipay and change within their limits and failure rates",
        ),
        false => check("channels healthy", false, problems.join("; ")),
    }
}

/// A policy's times as milliseconds, so that `+08:00` and `Z` spellings of one instant agree.
fn canonical(policy: &PolicyBody) -> Result<Value, String> {
    let at = |t: &str| {
        crate::clock::parse_rfc3339(t).ok_or_else(|| format!("{t:?} is not an RFC 3339 time"))
    };
    let windows = policy
        .closed_windows
        .iter()
        .map(|w| Ok(serde_json::json!([at(&w.from)?, at(&w.to)?])))
        .collect::<Result<Vec<_>, String>>()?;
    let staged = match &policy.staged_opening {
        None => Value::Null,
        Some(s) => serde_json::json!({
            "modulo": s.modulo,
            "schedule": s.schedule.as_ref().map(|stages| stages
                .iter()
                .map(|st| Ok(serde_json::json!([at(&st.at)?, st.open_below])))
                .collect::<Result<Vec<_>, String>>()).transpose()?,
            "starts_at": s.starts_at.as_deref().map(at).transpose()?,
            "interval_s": s.interval_s,
        }),
    };
    Ok(serde_json::json!({
        "min_amount": policy.min_amount,
        "closed_windows": windows,
        "staged_opening": staged,
    }))
}

fn policy(plan: &PreflightSection, seen: &Observed) -> Check {
    const NAME: &str = "withdrawal policy";
    let Some(planned) = &plan.withdrawal_policy else {
        return check(
            NAME,
            false,
            "no policy planned: state the night's windows and stages in \
             [preflight.withdrawal_policy] (the body of PUT /v1/admin/withdrawal-policy)",
        );
    };
    if let Some(why) = read_error("/v1/admin/withdrawal-policy", &seen.policy) {
        return check(NAME, false, why);
    }
    let current = seen
        .policy
        .as_ref()
        .map(|(_, b)| b.clone())
        .unwrap_or_default();
    let in_force = serde_json::from_value::<PolicyBody>(serde_json::json!({
        "min_amount": current["min_amount"],
        "closed_windows": current["closed_windows"],
        "staged_opening": current["staged_opening"],
    }));
    let planned = planned
        .clone()
        .try_into::<PolicyBody>()
        .map_err(|e| format!("[preflight.withdrawal_policy] is not a policy: {e}"));
    match (planned.and_then(|p| canonical(&p)), in_force) {
        (Err(e), _) => check(NAME, false, e),
        (_, Err(e)) => check(
            NAME,
            false,
            format!("the policy in force is unreadable: {e}"),
        ),
        (Ok(planned), Ok(in_force)) => match canonical(&in_force) {
            Ok(in_force) if in_force == planned => check(
                NAME,
                true,
                format!(
                    "in force as planned: {} closed windows, staged opening {}",
                    current["closed_windows"].as_array().map_or(0, |w| w.len()),
                    if current["staged_opening"].is_null() {
                        "none"
                    } else {
                        "set"
                    }
                ),
            ),
            _ => check(
                NAME,
                false,
                format!(
                    "the policy in force differs from the plan: in force {}; set it with PUT \
                     /v1/admin/withdrawal-policy",
                    serde_json::json!({
                        "min_amount": current["min_amount"],
                        "closed_windows": current["closed_windows"],
                        "staged_opening": current["staged_opening"],
                    })
                ),
            ),
        },
    }
}

fn disk(plan: &PreflightSection, seen: &Observed) -> Check {
    const NAME: &str = "disk space";
    if plan.expected_requests == 0 {
        return check(
            NAME,
            false,
            "no volume planned: state the night's expected requests in [preflight] \
             expected_requests",
        );
    }
    let needed = plan
        .expected_requests
        .saturating_mul(plan.disk_bytes_per_request)
        .saturating_mul(2);
    match &seen.disk_free_bytes {
        Err(e) => check(NAME, false, format!("free space unknown: {e}")),
        Ok(free) if *free >= needed => check(
            NAME,
            true,
            format!(
                "{} free, {} needed (2 x {} requests x {} bytes)",
                gib(*free),
                gib(needed),
                plan.expected_requests,
                plan.disk_bytes_per_request
            ),
        ),
        Ok(free) => check(
            NAME,
            false,
            format!(
                "{} free, {} needed (2 x {} requests x {} bytes): free or add space",
                gib(*free),
                gib(needed),
                plan.expected_requests,
                plan.disk_bytes_per_request
            ),
        ),
    }
}

fn gib(bytes: u64) -> String {
    format!(
        "{}.{:02} GiB",
        bytes >> 30,
        ((bytes & ((1 << 30) - 1)) * 100) >> 30
    )
}

/// 2020-01-01T00:00:00Z: a clock before it is not set.
const CLOCK_FLOOR_MS: i64 = 1_577_836_800_000;

fn clock(plan: &PreflightSection, seen: &Observed) -> Check {
    const NAME: &str = "clock sane";
    if seen.now_ms < CLOCK_FLOOR_MS {
        return check(
            NAME,
            false,
            format!(
                "this machine's clock reads {}",
                crate::clock::rfc3339(seen.now_ms)
            ),
        );
    }
    match seen.clock_skew_ms {
        None => check(NAME, false, "the server's Date header could not be read"),
        Some(skew) if skew.unsigned_abs() > plan.clock_skew_ms_max => check(
            NAME,
            false,
            format!(
                "the server's clock is {skew} ms from this machine's (at most {} ms): windows \
                 and stages open by the server's clock",
                plan.clock_skew_ms_max
            ),
        ),
        Some(skew) => check(
            NAME,
            true,
            format!(
                "{} here; the server within {} ms (Date header, 1 s resolution)",
                crate::clock::rfc3339(seen.now_ms),
                skew.abs()
            ),
        ),
    }
}

fn switches(plan: &PreflightSection, seen: &Observed) -> Check {
    const NAME: &str = "switches as planned";
    if let Some(why) = read_error("/v1/admin/switches", &seen.switches) {
        return check(NAME, false, why);
    }
    let current = seen
        .switches
        .as_ref()
        .map(|(_, b)| b.clone())
        .unwrap_or_default();
    let known: Vec<String> = current
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(_, v)| v.is_boolean())
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default();
    let mut problems = Vec::new();
    for name in &known {
        match plan.switches.get(name) {
            None => problems.push(format!(
                "{name}: no planned state (state it in [preflight.switches])"
            )),
            Some(&planned) if current[name].as_bool() != Some(planned) => problems.push(format!(
                "{name} is {} (planned {})",
                on_off(current[name].as_bool().unwrap_or(false)),
                on_off(planned)
            )),
            Some(_) => {}
        }
    }
    for name in plan.switches.keys() {
        if !known.contains(name) {
            problems.push(format!("{name}: no such switch on the server"));
        }
    }
    match problems.is_empty() {
        true => check(
            NAME,
            true,
            format!("{} switches in their planned state", known.len()),
        ),
        false => check(NAME, false, problems.join("; ")),
    }
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

/// The generated keys by role, and whether the token secret is the generated one.
pub type GeneratedKeys = (Vec<(&'static str, String)>, bool);

/// The keys `<data_dir>/keys.toml` holds (generated on first start), to be tried against the
/// node, and whether the token secret is the generated one: neither the environment nor the
/// config gives it while the file holds one.
pub fn generated_keys(
    config: &Config,
    env: impl Fn(&str) -> Option<String>,
) -> Result<GeneratedKeys, String> {
    if !config.data_dir.join("state").exists() {
        return Err(format!(
            "{} is not a node's data directory (no state in it)",
            config.data_dir.display()
        ));
    }
    let path = config.data_dir.join("keys.toml");
    let stored: crate::config::AuthConfig = match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let token_secret_given = env("HONGBAO_TOKEN_SECRET").is_some_and(|v| !v.is_empty())
        || config.auth.token_secret.is_some();
    let keys = [
        ("admin", stored.admin_key),
        ("issuer", stored.issuer_key),
        ("gateway", stored.gateway_key),
    ]
    .into_iter()
    .filter_map(|(role, key)| Some((role, key?)))
    .collect();
    Ok((keys, stored.token_secret.is_some() && !token_secret_given))
}

/// The server's base address: `[preflight] url`, else `server.addr`.
fn authority(config: &Config) -> String {
    let url = config
        .preflight
        .url
        .clone()
        .unwrap_or_else(|| config.server.addr.clone());
    let url = url.strip_prefix("http://").unwrap_or(&url);
    url.trim_end_matches('/').to_owned()
}

/// How long preflight waits for one answer: a node that accepts but never answers fails.
const ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// One GET: status, body as JSON, the `Date` header; at most [`ANSWER_WAIT`].
async fn get(
    authority: &str,
    path: &str,
    key: &str,
) -> Result<(u16, Value, Option<String>), String> {
    tokio::time::timeout(ANSWER_WAIT, get_once(authority, path, key))
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "GET {path}: no answer from {authority} within {} s",
                ANSWER_WAIT.as_secs()
            ))
        })
}

async fn get_once(
    authority: &str,
    path: &str,
    key: &str,
) -> Result<(u16, Value, Option<String>), String> {
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| format!("cannot reach {authority}: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP with {authority}: {e}"))?;
    tokio::spawn(conn);
    let request = Request::get(path)
        .header("host", authority)
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    let status = response.status().as_u16();
    let date = response
        .headers()
        .get("date")
        .and_then(|d| d.to_str().ok())
        .map(str::to_owned);
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("GET {path}: {e}"))?
        .to_bytes();
    let body = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    Ok((status, body, date))
}

/// Reads everything the checklist judges: the node's API (with `admin_key`), its data
/// directory's disk, this machine's clock.
pub async fn observe(
    config: &Config,
    admin_key: &str,
    generated: Result<GeneratedKeys, String>,
) -> Observed {
    let at = authority(config);
    let read = |path: String| {
        let at = at.clone();
        async move { get(&at, &path, admin_key).await }
    };
    let strip = |r: Result<(u16, Value, Option<String>), String>| r.map(|(s, b, _)| (s, b));
    let now_ms = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
    let ready = read("/readyz".into()).await;
    let clock_skew_ms = ready
        .as_ref()
        .ok()
        .and_then(|(_, _, date)| httpdate::parse_http_date(date.as_deref()?).ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX) - now_ms);
    let mut activities = BTreeMap::new();
    for activity in &config.preflight.activities {
        let answer = match crate::ids::Id::parse(activity) {
            Ok(id) => strip(read(format!("/v1/admin/activities/{id}")).await),
            Err(e) => Err(format!("{activity:?}: {e}")),
        };
        activities.insert(activity.clone(), answer);
    }
    let mut channels = BTreeMap::new();
    for channel in CHANNELS {
        let answer = strip(read(format!("/v1/admin/channels/{channel}")).await);
        channels.insert(channel.to_owned(), answer);
    }
    // The node's own directory: preflight creates nothing (a wrong path must not pass on
    // whatever disk it would land on).
    let disk_free_bytes = match config.data_dir.join("state").exists() {
        true => fs2::available_space(&config.data_dir)
            .map_err(|e| format!("{}: {e}", config.data_dir.display())),
        false => Err(format!(
            "{} is not a node's data directory (no state in it): give the node's --data-dir \
             or data_dir",
            config.data_dir.display()
        )),
    };
    // Each generated key tried on an endpoint every role may read: 401 means the node does
    // not know it.
    let mut keys = generated.map(|(keys, token_secret_generated)| {
        (
            keys,
            KeySources {
                generated: Vec::new(),
                token_secret_generated,
            },
        )
    });
    if let Ok((candidates, sources)) = &mut keys {
        for (role, key) in candidates.iter() {
            match get(&at, "/v1/rewards/preflight-key-probe", key).await {
                Ok((401, _, _)) => {}
                Ok(_) => sources.generated.push(role),
                Err(e) => {
                    keys = Err(e);
                    break;
                }
            }
        }
    }
    let keys = keys.map(|(_, sources)| sources);
    let w = &config.withdrawals;
    let payout_rates = BTreeMap::from([
        ("bank".to_owned(), w.bank_per_s),
        ("alipay".to_owned(), w.alipay_per_s),
        ("change".to_owned(), w.change_per_s),
    ]);
    Observed {
        ready: strip(ready),
        activities,
        channels,
        switches: strip(read("/v1/admin/switches".into()).await),
        policy: strip(read("/v1/admin/withdrawal-policy".into()).await),
        clock_skew_ms,
        now_ms,
        keys,
        payout_rates,
        disk_free_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn healthy_channel(rate: u64) -> Result<(u16, Value), String> {
        Ok((
            200,
            json!({"rate_per_s": rate, "latency_ms": 20, "fail_rate": 0.0, "timeout_rate": 0.0}),
        ))
    }

    fn plan() -> PreflightSection {
        let policy: toml::Value = toml::from_str(
            r#"
            min_amount = 100
            closed_windows = [{ from = "2027-02-16T19:00:00+08:00", to = "2027-02-17T01:00:00+08:00" }]
            "#,
        )
        .unwrap();
        PreflightSection {
            activities: vec!["cny".into()],
            expected_requests: 1_000_000,
            switches: BTreeMap::from([("rain_degraded".to_owned(), false)]),
            channel_limits: BTreeMap::from([("bank".to_owned(), 500), ("alipay".to_owned(), 800)]),
            withdrawal_policy: Some(policy),
            ..PreflightSection::default()
        }
    }

    fn ready_node() -> Observed {
        Observed {
            ready: Ok((200, json!({"status": "ready"}))),
            activities: BTreeMap::from([(
                "cny".to_owned(),
                Ok((
                    200,
                    json!({"budget": {"cash": 10, "subsidy": 0}, "remaining": {"cash": 10, "subsidy": 0}}),
                )),
            )]),
            channels: BTreeMap::from([
                ("bank".to_owned(), healthy_channel(500)),
                ("alipay".to_owned(), healthy_channel(800)),
                ("change".to_owned(), healthy_channel(100_000)),
            ]),
            switches: Ok((200, json!({"rain_degraded": false, "changed_by": {}}))),
            // The same instants as planned, spelt in UTC.
            policy: Ok((
                200,
                json!({"min_amount": 100, "closed_windows": [{"from": "2027-02-16T11:00:00Z", "to": "2027-02-16T17:00:00Z"}], "staged_opening": null, "changed_by": null}),
            )),
            clock_skew_ms: Some(300),
            now_ms: 1_800_000_000_000,
            keys: Ok(KeySources::default()),
            payout_rates: BTreeMap::from([
                ("bank".to_owned(), 500),
                ("alipay".to_owned(), 800),
                ("change".to_owned(), 0),
            ]),
            disk_free_bytes: Ok(100 << 30),
        }
    }

    fn failed(checks: &[Check]) -> Vec<&str> {
        checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.name.as_str())
            .collect()
    }

    #[test]
    fn a_node_as_planned_passes_every_item() {
        let checks = evaluate(&plan(), &ready_node());
        assert_eq!(failed(&checks), Vec::<&str>::new(), "{checks:#?}");
        assert_eq!(checks.len(), 8);
    }

    #[test]
    fn each_unready_item_fails_with_its_reason() {
        // Goal: every item of the checklist can fail, and says why.
        type Spoil = Box<dyn Fn(&mut Observed)>;
        let cases: Vec<(&str, Spoil, &str)> = vec![
            (
                "server ready",
                Box::new(|o| o.ready = Err("connection refused".into())),
                "refused",
            ),
            (
                "keys provisioned",
                Box::new(|o| {
                    o.keys = Ok(KeySources {
                        generated: vec!["gateway"],
                        token_secret_generated: false,
                    })
                }),
                "gateway key generated",
            ),
            (
                "keys provisioned",
                Box::new(|o| {
                    o.keys = Ok(KeySources {
                        generated: vec![],
                        token_secret_generated: true,
                    })
                }),
                "token secret",
            ),
            (
                "keys provisioned",
                Box::new(|o| o.keys = Err("timed out".into())),
                "cannot tell",
            ),
            (
                "budgets set",
                Box::new(|o| {
                    o.activities.insert("cny".into(), Ok((404, json!({}))));
                }),
                "no budget",
            ),
            (
                "budgets set",
                Box::new(|o| {
                    o.activities.insert("cny".into(), Ok((200, json!({"budget": {"cash": 10, "subsidy": 0}, "remaining": {"cash": 0, "subsidy": 0}}))));
                }),
                "spent",
            ),
            (
                "channels healthy",
                Box::new(|o| {
                    o.payout_rates.insert("bank".into(), 900);
                }),
                "over the bank's limit",
            ),
            (
                "channels healthy",
                Box::new(|o| {
                    o.payout_rates.insert("alipay".into(), 0);
                }),
                "unlimited",
            ),
            (
                "channels healthy",
                Box::new(|o| {
                    o.channels.insert(
                        "alipay".into(),
                        Ok((
                            200,
                            json!({"rate_per_s": 10, "fail_rate": 0.2, "timeout_rate": 0.1}),
                        )),
                    );
                }),
                "30%",
            ),
            (
                "withdrawal policy",
                Box::new(|o| {
                    o.policy = Ok((
                        200,
                        json!({"min_amount": 100, "closed_windows": [], "staged_opening": null}),
                    ))
                }),
                "differs",
            ),
            (
                "disk space",
                Box::new(|o| o.disk_free_bytes = Ok(1 << 30)),
                "needed",
            ),
            (
                "clock sane",
                Box::new(|o| o.clock_skew_ms = Some(-5_000)),
                "-5000 ms",
            ),
            ("clock sane", Box::new(|o| o.now_ms = 0), "1970"),
            (
                "switches as planned",
                Box::new(|o| o.switches = Ok((200, json!({"rain_degraded": true})))),
                "is on (planned off)",
            ),
            (
                "switches as planned",
                Box::new(|o| {
                    o.switches = Ok((
                        200,
                        json!({"rain_degraded": false, "coupons_sync_off": false}),
                    ))
                }),
                "coupons_sync_off: no planned state",
            ),
        ];
        for (item, spoil, reason) in cases {
            let mut seen = ready_node();
            spoil(&mut seen);
            let checks = evaluate(&plan(), &seen);
            assert_eq!(failed(&checks), vec![item], "{checks:#?}");
            let detail = &checks.iter().find(|c| c.name == item).unwrap().detail;
            assert!(detail.contains(reason), "{item}: {detail}");
        }
    }

    #[test]
    fn a_plan_that_is_silent_fails_the_items_it_does_not_state() {
        let checks = evaluate(&PreflightSection::default(), &ready_node());
        let mut failed = failed(&checks);
        failed.sort();
        assert_eq!(
            failed,
            vec![
                "budgets set",
                "channels healthy",
                "disk space",
                "switches as planned",
                "withdrawal policy"
            ]
        );
    }

    #[test]
    fn generated_keys_are_read_from_the_data_directory_and_the_secret_judged_by_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        let none = |_: &str| None;
        assert!(
            generated_keys(&config, none).is_err(),
            "not a node's directory"
        );
        std::fs::create_dir(dir.path().join("state")).unwrap();
        assert_eq!(generated_keys(&config, none).unwrap(), (vec![], false));
        std::fs::write(
            dir.path().join("keys.toml"),
            "admin_key = \"a-generated-key-0001\"\ntoken_secret = \"generated-secret-0001\"\n",
        )
        .unwrap();
        let (keys, secret_generated) = generated_keys(&config, none).unwrap();
        assert_eq!(keys, vec![("admin", "a-generated-key-0001".to_owned())]);
        assert!(secret_generated);
        let env = |var: &str| (var == "HONGBAO_TOKEN_SECRET").then(|| "s".repeat(20));
        assert!(!generated_keys(&config, env).unwrap().1);
        config.auth.token_secret = Some("t".repeat(20));
        assert!(!generated_keys(&config, none).unwrap().1);
    }
}
