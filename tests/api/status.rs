//! The status page (`/status`) and its figures (`/status.json`): a self-contained HTML page
//! whose figures are what the test did over HTTP, read from the JSON and, with
//! `HONGBAO_SERVICES=1` (as `.ci/run` sets), from the DOM a headless Chromium rendered after
//! the page's script fetched the figures.

use super::{spawn_app, TestApp, ADMIN};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CHROMIUM: &str = "/usr/bin/chromium";

/// A budget, rewards against it, a deposit and a switch turned off; returns the log head
/// before all this.
async fn night(app: &TestApp) -> u64 {
    let (_, before) = app.get("/status.json", None).await;
    let head = before["log_head"].as_u64().expect("log_head");
    let (status, body) = app.set_budget("cny2026", 1_000_000, 50_000).await;
    assert_eq!(status, 200, "{body}");
    for (order, uid, amount) in [
        ("st-1", "u1", 288),
        ("st-2", "u2", 100),
        ("st-3", "u3", 500),
    ] {
        let (status, body) = app.reward("cny2026", order, uid, amount).await;
        assert_eq!(status, 202, "{body}");
    }
    let (status, body) = app.reward_of("cny2026", "st-4", "u4", "subsidy", 200).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(app.deposit("u9", "st-d1", 150).await.0, 201);
    let (status, body) = app
        .put(
            "/v1/admin/switches/c2c_send",
            Some(ADMIN),
            r#"{"on":false}"#,
        )
        .await;
    assert_eq!((status, &body["c2c_send"]), (200, &Value::Bool(false)));
    head
}

/// Cash left: 1,000,000 - 288 - 100 - 500 fen; subsidy: 50,000 - 200.
const CASH_LEFT: i64 = 999_112;
const SUBSIDY_LEFT: i64 = 49_800;

/// `/status.json` once the views have caught up with the head (the budget gauge is the
/// rewards view's), at most 15 s.
async fn settled(app: &TestApp) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, s) = app.get("/status.json", None).await;
        assert_eq!(status, 200, "{s}");
        let caught_up = s["projections"]
            .as_array()
            .is_some_and(|v| !v.is_empty() && v.iter().all(|v| v["lag"] == 0));
        let credited = s["counters"]["rewards_credited"]["cash"] == 3;
        if caught_up && credited && s["budgets"].as_array().is_some_and(|b| !b.is_empty()) {
            return s;
        }
        assert!(Instant::now() < deadline, "figures never settled: {s:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn switch(s: &Value, name: &str) -> Value {
    s["switches"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == name)
        .unwrap_or_else(|| panic!("no switch {name} in {s:#}"))
        .clone()
}

/// Every `src=` and `href=` value of `html` (quoted with " or ').
fn references(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    for attribute in ["src=", "href=", "SRC=", "HREF="] {
        for (at, _) in html.match_indices(attribute) {
            let rest = &html[at + attribute.len()..];
            let Some(quote) = rest.chars().next().filter(|c| *c == '"' || *c == '\'') else {
                out.push(rest.chars().take(40).collect());
                continue;
            };
            let value: String = rest[1..].chars().take_while(|c| *c != quote).collect();
            out.push(value);
        }
    }
    out
}

/// A reference to another origin (or one the browser would resolve to one).
fn external(reference: &str) -> bool {
    let r = reference.trim().to_ascii_lowercase();
    r.starts_with("//") || r.contains("://") || r.starts_with("http") || r.starts_with("data:")
}

#[tokio::test]
async fn the_status_page_is_self_contained_and_its_figures_are_what_happened() {
    // Goal: /status is HTML under a strict CSP that loads nothing from anywhere else, and
    // /status.json says what the test did: the budgets left after the rewards (fen and yuan),
    // the rewards accepted and credited by kind, the switch turned off then on again, the log
    // head grown, all views caught up, ready with nothing to worry about.
    let app = spawn_app();
    let response = app.client.get(app.url("/status")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    let policy = headers["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    for directive in [
        "default-src 'none'",
        "connect-src 'self'",
        "img-src 'none'",
        "script-src 'sha256-",
        "style-src 'sha256-",
    ] {
        assert!(policy.contains(directive), "{directive} not in {policy}");
    }
    assert!(!policy.contains("unsafe"), "{policy}");
    let html = response.text().await.unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"), "{html}");
    for figure in ["log_head", "parked", "audit_violations", "ready", "level"] {
        assert!(
            html.contains(&format!("data-figure=\"{figure}\"")),
            "{figure} missing"
        );
    }
    assert!(html.contains("fetch(\"/status.json\""));
    let external: Vec<String> = references(&html)
        .into_iter()
        .filter(|r| external(r))
        .collect();
    assert!(external.is_empty(), "external references: {external:?}");
    let lowered = html.to_ascii_lowercase();
    for forbidden in [
        "@import", "url(", "<link", "<iframe", "<img", "fonts.", "cdn",
    ] {
        assert!(!lowered.contains(forbidden), "the page has {forbidden}");
    }

    let (status, before) = app.get("/status.json", None).await;
    assert_eq!(status, 200);
    assert_eq!(before["ready"], true, "{before:#}");
    assert_eq!(before["readiness"], "ready");
    assert_eq!(before["budgets"], serde_json::json!([]));
    assert_eq!(switch(&before, "c2c_send")["on"], true);

    let head = night(&app).await;
    let s = settled(&app).await;
    let (_, ready) = app.get("/readyz", None).await;
    assert!(s["log_head"].as_u64().unwrap() > head, "{s:#}");
    assert!(s["log_head"].as_u64() <= ready["log_head"].as_u64());
    assert_eq!(
        s["budgets"],
        serde_json::json!([{
            "activity": "cny2026",
            "cash": {"fen": CASH_LEFT, "yuan": "9991.12"},
            "subsidy": {"fen": SUBSIDY_LEFT, "yuan": "498.00"},
        }]),
        "{s:#}"
    );
    let counters = &s["counters"];
    assert_eq!(counters["rewards_accepted"]["cash"], 3, "{s:#}");
    assert_eq!(counters["rewards_accepted"]["subsidy"], 1);
    assert_eq!(counters["rewards_accepted"]["coupon"], 0);
    assert_eq!(counters["rewards_credited"]["subsidy"], 1);
    assert_eq!(counters["withdrawals"]["requested"], 0);
    assert!(counters["http_requests"].as_u64().unwrap() >= 9, "{s:#}");
    assert_eq!(counters["http_5xx"], 0);
    assert!(
        counters["events_appended"].as_u64().unwrap() >= s["log_head"].as_u64().unwrap() - head
    );
    assert_eq!(s["rewards"]["lane_backlog"]["cash"], 0);
    assert_eq!(s["rewards"]["pending"]["cash"], 0);
    let off = switch(&s, "c2c_send");
    assert_eq!(
        (&off["on"], &off["default"]),
        (&Value::Bool(false), &Value::Bool(true))
    );
    assert_eq!(off["changed_by"]["role"], "admin", "{off}");
    assert_eq!(switch(&s, "reward_lanes")["on"], true);
    assert_eq!(s["payouts"]["parked"], 0);
    assert_eq!(s["audit"]["status"], "running");
    assert_eq!(s["audit"]["violations"], 0);
    assert_eq!(s["reconciliation"]["mismatches"], 0);
    assert_eq!(
        (&s["level"], &s["problems"]),
        (&Value::from("ok"), &serde_json::json!([])),
        "{s:#}"
    );
    let views: Vec<&str> = s["projections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        views,
        ["wallets", "rewards", "withdrawals", "packets", "coupons"]
    );

    // On again: shown on.
    let (status, _) = app
        .put("/v1/admin/switches/c2c_send", Some(ADMIN), r#"{"on":true}"#)
        .await;
    assert_eq!(status, 200);
    let (_, s) = app.get("/status.json", None).await;
    assert_eq!(switch(&s, "c2c_send")["on"], true, "{s:#}");
    // An unknown kind of money never appears: only integers and two-decimal strings.
    assert!(s["budgets"][0]["cash"]["fen"].is_i64());
}

/// A headless Chromium with a fresh profile; killed (with its process group) and its profile
/// deleted when dropped, whatever happened.
struct Browser {
    child: Child,
    dir: tempfile::TempDir,
}

impl Browser {
    /// Loads `url`, lets the page run for `budget_ms` of virtual time and writes the DOM to
    /// `dom.html` in its directory.
    fn dump_dom(url: &str, budget_ms: u64) -> Browser {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let profile = dir.path().join("profile");
        let out = std::fs::File::create(dir.path().join("dom.html")).unwrap();
        let err = std::fs::File::create(dir.path().join("stderr.txt")).unwrap();
        let child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(format!("--virtual-time-budget={budget_ms}"))
            .arg("--dump-dom")
            .arg(url)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMIUM}: {e}"));
        Browser { child, dir }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// Waits for the browser to exit (at most `limit`); its DOM.
    async fn dom(&mut self, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let dom = std::fs::read_to_string(self.path("dom.html")).unwrap();
                let stderr = std::fs::read_to_string(self.path("stderr.txt")).unwrap_or_default();
                assert!(
                    status.success() && !dom.is_empty(),
                    "chromium exited {status} with an empty DOM; stderr:\n{stderr}"
                );
                return dom;
            }
            assert!(
                Instant::now() < deadline,
                "chromium still running after {limit:?}; stderr:\n{}",
                std::fs::read_to_string(self.path("stderr.txt")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: the browser and its renderer, GPU and utility processes.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every element carrying `data-figure`: its name, the rest of its opening tag's attributes
/// and its text (the figures are leaves).
fn figures(dom: &str) -> BTreeMap<String, (String, String)> {
    let mut out = BTreeMap::new();
    for (at, _) in dom.match_indices("data-figure=\"") {
        let rest = &dom[at + "data-figure=\"".len()..];
        let name_end = rest.find('"').unwrap();
        let name = rest[..name_end].to_owned();
        let tag_end = rest.find('>').unwrap();
        let start = dom[..at].rfind('<').unwrap();
        let attributes = format!("{} {}", &dom[start..at], &rest[name_end + 1..tag_end]);
        let text_rest = &rest[tag_end + 1..];
        let text = text_rest[..text_rest.find('<').unwrap_or(text_rest.len())].to_owned();
        out.insert(name, (attributes, text.replace("&amp;", "&")));
    }
    out
}

fn figure<'a>(figures: &'a BTreeMap<String, (String, String)>, name: &str) -> &'a str {
    &figures
        .get(name)
        .unwrap_or_else(|| panic!("no data-figure=\"{name}\" in the DOM: {figures:#?}"))
        .1
}

fn chromium_required() -> bool {
    if std::env::var("HONGBAO_SERVICES").as_deref() != Ok("1") {
        eprintln!(
            "skipped: set HONGBAO_SERVICES=1 to render /status in headless Chromium ({CHROMIUM})"
        );
        return false;
    }
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing, needed with HONGBAO_SERVICES=1: \
         apt-get install -y --no-install-recommends chromium"
    );
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_renders_the_figures_the_page_fetched() {
    // Goal: in a real browser, under its own Content-Security-Policy, the page's script fetches
    // /status.json and renders it: the budget left after the rewards (yuan and fen), the
    // switch turned off, the log head between what it was before and after, ready, no
    // violation, nothing parked, the page green and no problem listed.
    if !chromium_required() {
        return;
    }
    let app = spawn_app();
    let head = night(&app).await;
    let s = settled(&app).await;
    let at_least = s["log_head"].as_u64().unwrap();
    let mut browser = Browser::dump_dom(&app.url("/status"), 5_000);
    let dom = browser.dom(Duration::from_secs(90)).await;
    drop(browser);
    let (_, after) = app.get("/status.json", None).await;
    let at_most = after["log_head"].as_u64().unwrap();

    let f = figures(&dom);
    assert_ne!(
        figure(&f, "refreshed"),
        "never",
        "the script never fetched:\n{dom}"
    );
    let (attributes, cash) = &f["budget:cny2026:cash"];
    assert_eq!(cash, "9,991.12");
    assert!(
        attributes.contains(&format!("data-fen=\"{CASH_LEFT}\"")),
        "{attributes}"
    );
    assert_eq!(figure(&f, "budget:cny2026:subsidy"), "498.00");
    assert_eq!(figure(&f, "switch:c2c_send"), "off");
    assert_eq!(figure(&f, "switch:reward_lanes"), "on");
    assert_eq!(figure(&f, "rewards_accepted:cash"), "3");
    assert_eq!(figure(&f, "rewards_accepted:subsidy"), "1");
    let shown: u64 = figure(&f, "log_head").replace(',', "").parse().unwrap();
    assert!(
        shown > head && (at_least..=at_most).contains(&shown),
        "log head {shown}: before {head}, then {at_least}..={at_most}"
    );
    assert_eq!(figure(&f, "ready"), "ready");
    assert_eq!(figure(&f, "audit_violations"), "0");
    assert_eq!(figure(&f, "audit_status"), "running");
    assert_eq!(figure(&f, "parked"), "0");
    assert_eq!(figure(&f, "level"), "all well");
    assert!(dom.contains("<body data-level=\"ok\""), "{dom}");
    assert!(
        !dom.contains("data-problem="),
        "a problem is listed:\n{dom}"
    );
}
