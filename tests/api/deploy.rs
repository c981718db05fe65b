//! Operating the night (D8, issue 16): what `deploy/` ships, proved against the real server.
//!
//! Without services: a fresh server exposes `hongbao_ready` and, at 0, every labelled counter an
//! alert fires on (audit violations by the audit's own check names, parked payouts by channel,
//! reconciliation mismatches by check), so that an alert on an increase sees the first one.
//!
//! With `HONGBAO_SERVICES=1` (as `.ci/run` sets; it installs Debian's `prometheus`, which
//! brings `promtool`): `promtool` checks the rules and the configuration and runs the rules'
//! unit tests; then a real Prometheus (never on port 9090) scrapes a real server driven
//! through a short night (rewards, budgets, lanes, a hot packet with 429s, coupons,
//! withdrawals, deposits, load-test traffic), and every target of every panel of the Grafana
//! dashboard must return series, every alert rule must evaluate without error and select real
//! traffic only, and none may fire on this healthy server. Also with it (root mounts a small
//! tmpfs): once a full disk has stopped the journal, `hongbao_ready` reads 0.

use super::{heavy, metric, scrape, spawn_app_with, TestApp, ADMIN, GATEWAY, ISSUER};
use futures::future::join_all;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DASHBOARD: &str = "deploy/grafana/hongbao-night.json";
const ALERTS: &str = "deploy/prometheus/alerts.yml";
const ALERT_TESTS: &str = "deploy/prometheus/alerts.test.yml";
const PROMETHEUS_CONFIG: &str = "deploy/prometheus/prometheus.yml";

/// What the dashboard's variables stand for in a query sent straight to Prometheus: the
/// "All" value of `$instance` and a rate window that holds several 1 s scrapes.
const SUBSTITUTIONS: [(&str, &str); 3] = [
    ("$__rate_interval", "1m"),
    ("$__interval", "15s"),
    ("$instance", ".*"),
];

/// The selector of the load-test engine's series; real traffic's is `traffic!="load_test"`.
const LOAD_TEST: &str = r#"traffic="load_test""#;
const REAL: &str = r#"traffic!="load_test""#;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[tokio::test]
async fn a_fresh_server_exposes_readiness_and_every_alerted_counter_at_zero() {
    // Goal: on a healthy server that has done nothing, `hongbao_ready` is 1 and the counters
    // the alerts watch for an increase already exist at 0, under the label values their
    // producers use (the audit's check names are read from a real audit, not copied).
    let app = spawn_app_with(|_| {});
    let text = app.metrics_text().await;
    assert_eq!(metric(&text, "hongbao_ready"), Some(1.0), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let store = hongbao::events::sled_store::SledStore::open(
        dir.path(),
        hongbao::events::sled_store::JournalConfig::default(),
        std::sync::Arc::new(hongbao::clock::SystemClock),
        std::sync::Arc::new(hongbao::metrics::Metrics::new()),
    )
    .unwrap();
    let report = hongbao::audit::audit(store.as_ref(), None, |_, _| ()).unwrap();
    let audited: Vec<&str> = report.checks.iter().map(|c| c.name).collect();
    assert_eq!(
        audited,
        hongbao::metrics::AUDIT_CHECKS.to_vec(),
        "metrics::AUDIT_CHECKS must name the audit's checks"
    );
    let mut expected: Vec<String> = audited
        .iter()
        .map(|check| format!("hongbao_audit_violations_total{{check=\"{check}\"}}"))
        .collect();
    for channel in ["bank", "alipay", "change"] {
        expected.push(format!(
            "hongbao_payouts_parked_total{{channel=\"{channel}\"}}"
        ));
    }
    for check in hongbao::metrics::RECONCILIATION_CHECKS {
        expected.push(format!(
            "hongbao_reconciliation_mismatches_total{{check=\"{check}\"}}"
        ));
    }
    for series in expected {
        assert_eq!(metric(&text, &series), Some(0.0), "{series} in\n{text}");
    }
}

/// A small tmpfs mounted for a test, unmounted when dropped.
struct SmallFs(PathBuf);

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reads_0_in_the_metrics_once_the_journal_has_stopped() {
    // Goal: `hongbao_ready` is judged as `/readyz` judges: once the disk is full and the
    // journal has stopped (fail-stop), a scrape says 0 while `/readyz` answers 503, and the
    // HongbaoNotReady alert's selector picks the series. Needs a small tmpfs (root), so it
    // runs with HONGBAO_SERVICES=1 (as `.ci/run` sets) and fails there without one.
    if std::env::var("HONGBAO_SERVICES").as_deref() != Ok("1") {
        eprintln!("skipped: set HONGBAO_SERVICES=1 (and run as root) to fill a small disk");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let at = dir.path().join("small");
    std::fs::create_dir_all(&at).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(&at)
        .output()
        .expect("mount runs");
    assert!(
        mounted.status.success(),
        "cannot mount a small tmpfs, needed with HONGBAO_SERVICES=1 (run as root): {}",
        String::from_utf8_lossy(&mounted.stderr)
    );
    let fs = SmallFs(at);
    let app = spawn_app_with(|c| c.data_dir = fs.0.join("data"));
    assert_eq!(
        metric(&app.metrics_text().await, "hongbao_ready"),
        Some(1.0)
    );

    // Whatever room is left goes to a ballast file; deposits then find the disk full.
    {
        use std::io::Write;
        let mut ballast = std::fs::File::create(fs.0.join("ballast")).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while ballast.write_all(&chunk).is_ok() {}
    }
    let mut stopped = false;
    for n in 0..5_000 {
        let (status, body) = app.deposit("full", &format!("full-{n}"), 1).await;
        match status {
            201 => continue,
            503 => {
                stopped = true;
                break;
            }
            other => panic!("deposit {n}: {other} {body}"),
        }
    }
    assert!(stopped, "the journal never stopped on a full disk");
    let (status, ready) = app.get("/readyz", None).await;
    assert_eq!(status, 503, "{ready}");
    let text = app.metrics_text().await;
    assert_eq!(metric(&text, "hongbao_ready"), Some(0.0), "{ready}");
    // The status page turns red and says why.
    let (status, figures) = app.get("/status.json", None).await;
    assert_eq!(status, 200, "{figures}");
    assert_eq!(
        (&figures["ready"], &figures["level"]),
        (&serde_json::json!(false), &serde_json::json!("alert")),
        "{figures}"
    );
    assert_eq!(figures["readiness"], "journal_failed", "{figures}");
    assert!(
        figures["problems"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["figure"] == "ready"
                && p["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("journal_failed"))),
        "{figures}"
    );
    let alerts = std::fs::read_to_string(repo(ALERTS)).unwrap();
    assert!(
        alerts.contains(r#"expr: hongbao_ready{traffic!="load_test"} == 0"#),
        "HongbaoNotReady reads hongbao_ready"
    );
    drop(app);
}

/// A binary the operations test needs: on the PATH, or a loud failure saying how to get it.
fn tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "{name} is missing, needed with HONGBAO_SERVICES=1: install Debian's prometheus \
             package (it brings promtool): apt-get install -y --no-install-recommends prometheus \
             (.ci/run does)"
        )
    })
}

/// Runs `promtool` with `args` in the repository; fails with its output unless it succeeds.
fn promtool(args: &[&str]) -> String {
    let out = Command::new(tool("promtool"))
        .args(args)
        .current_dir(repo(""))
        .output()
        .expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// A Prometheus process, killed when dropped (a failing test leaves none behind).
struct Prometheus {
    child: Child,
    base: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    // 9090 is the port of the Debian package's own service: never that one.
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        if port != 9090 {
            return port;
        }
    }
}

/// The shipped configuration, pointed at `target` (`127.0.0.1:PORT`), scraping and evaluating
/// every second, with the shipped rules by their absolute path. Every edit must apply: the
/// configuration Prometheus runs is the shipped one but for these.
fn derived_config(target: &str) -> String {
    let shipped = std::fs::read_to_string(repo(PROMETHEUS_CONFIG)).unwrap();
    let alerts = repo(ALERTS);
    let edits = [
        ("scrape_interval: 5s", "scrape_interval: 1s".to_owned()),
        (
            "evaluation_interval: 5s",
            "evaluation_interval: 1s".to_owned(),
        ),
        ("scrape_timeout: 4s", "scrape_timeout: 1s".to_owned()),
        ("- alerts.yml", format!("- {}", alerts.display())),
        ("127.0.0.1:8080", target.to_owned()),
    ];
    let mut config = shipped.clone();
    for (from, to) in edits {
        assert!(
            config.contains(from),
            "{PROMETHEUS_CONFIG} no longer has `{from}`:\n{shipped}"
        );
        config = config.replace(from, &to);
    }
    config
}

impl Prometheus {
    /// Starts Prometheus on a free port with `config`, and waits until it is ready.
    async fn start(client: &reqwest::Client, config: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.path().join("prometheus.log");
        let port = free_port();
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
            .spawn()
            .expect("prometheus starts");
        let mut prometheus = Prometheus {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = client
                .get(format!("{}/-/ready", prometheus.base))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return prometheus;
            }
            if let Ok(Some(status)) = prometheus.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", prometheus.logs());
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready in 30 s:\n{}",
                prometheus.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn logs(&self) -> String {
        let stderr = self.log.with_file_name("stderr.log");
        format!(
            "{}{}",
            std::fs::read_to_string(&self.log).unwrap_or_default(),
            std::fs::read_to_string(stderr).unwrap_or_default()
        )
    }

    /// `GET /api/v1/<path>` with `query`; the whole answer.
    async fn api(&self, client: &reqwest::Client, path: &str, query: &[(&str, &str)]) -> Value {
        client
            .get(format!("{}/api/v1/{path}", self.base))
            .query(query)
            .send()
            .await
            .expect("prometheus answers")
            .json()
            .await
            .expect("prometheus answers JSON")
    }

    /// An instant query: its status and result.
    async fn query(&self, client: &reqwest::Client, expr: &str) -> Value {
        self.api(client, "query", &[("query", expr)]).await
    }

    /// The single value of a query that returns one series (0 when it returns none).
    async fn value(&self, client: &reqwest::Client, expr: &str) -> f64 {
        let answer = self.query(client, expr).await;
        answer["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

/// Every metric selector of a PromQL expression: each name (`hongbao_...` or `up`) with its
/// matchers (the text between braces, quotes respected: a route may hold braces), or `None`
/// when it has no braces.
fn selectors(expr: &str) -> Vec<(String, Option<String>)> {
    let chars: Vec<char> = expr.chars().collect();
    let mut found = Vec::new();
    let (mut i, mut quoted) = (0, false);
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            quoted = !quoted;
            i += 1;
            continue;
        }
        if quoted || !(c.is_ascii_alphabetic() || c == '_') {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
            i += 1;
        }
        let name: String = chars[start..i].iter().collect();
        if !(name.starts_with("hongbao_") || name == "up") {
            continue;
        }
        let mut j = i;
        while j < chars.len() && chars[j] == ' ' {
            j += 1;
        }
        if j < chars.len() && chars[j] == '{' {
            let open = j;
            let mut inner_quoted = false;
            j += 1;
            while j < chars.len() && (inner_quoted || chars[j] != '}') {
                if chars[j] == '"' {
                    inner_quoted = !inner_quoted;
                }
                j += 1;
            }
            found.push((name, Some(chars[open + 1..j].iter().collect())));
            i = j + 1;
        } else {
            found.push((name, None));
        }
    }
    found
}

/// Problems with the traffic selection of `expr`: each hongbao series must say `wanted`
/// (`up` is Prometheus's own and carries no traffic).
fn traffic_problems(expr: &str, wanted: &str) -> Vec<String> {
    selectors(expr)
        .into_iter()
        .filter(|(name, _)| name != "up")
        .filter(|(_, matchers)| !matchers.as_deref().is_some_and(|m| m.contains(wanted)))
        .map(|(name, matchers)| {
            format!("{name}{{{}}} lacks {wanted}", matchers.unwrap_or_default())
        })
        .collect()
}

#[test]
fn selectors_are_read_with_their_quoted_braces() {
    // Goal: the parser the dashboard check relies on finds every series and keeps a route's
    // braces inside its matchers.
    let expr = r#"sum by (code) (rate(hongbao_http_errors_total{route="/v1/packets/{packet_id}/claims", traffic!="load_test"}[1m])) / up{job="hongbao"} - hongbao_log_head_seq"#;
    assert_eq!(
        selectors(expr),
        vec![
            (
                "hongbao_http_errors_total".to_owned(),
                Some(r#"route="/v1/packets/{packet_id}/claims", traffic!="load_test""#.to_owned())
            ),
            ("up".to_owned(), Some(r#"job="hongbao""#.to_owned())),
            ("hongbao_log_head_seq".to_owned(), None),
        ]
    );
    assert_eq!(
        traffic_problems(expr, REAL),
        vec!["hongbao_log_head_seq{} lacks traffic!=\"load_test\"".to_owned()]
    );
}

/// One query target of the dashboard: the row and panel it belongs to, and its expression.
struct Target {
    row: String,
    panel: String,
    expr: String,
}

/// Every target of every panel of the dashboard (rows' nested panels included), checked for
/// shape on the way: each panel names the templated data source and has targets.
fn dashboard_targets() -> Vec<Target> {
    let text = std::fs::read_to_string(repo(DASHBOARD)).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating variables")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(
        variables.contains(&"datasource") && variables.contains(&"instance"),
        "{variables:?}"
    );
    let datasource = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "datasource")
        .unwrap();
    assert_eq!(
        (datasource["type"].as_str(), datasource["query"].as_str()),
        (Some("datasource"), Some("prometheus"))
    );
    let mut flat = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        flat.push(panel.clone());
        if let Some(nested) = panel["panels"].as_array() {
            flat.extend(nested.iter().cloned());
        }
    }
    let mut row = String::new();
    let mut targets = Vec::new();
    for panel in flat {
        let title = panel["title"].as_str().unwrap_or("?").to_owned();
        if panel["type"] == "row" {
            row = title;
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {title}: the templated data source"
        );
        let exprs = panel["targets"].as_array().cloned().unwrap_or_default();
        assert!(!exprs.is_empty(), "panel {title} has no query");
        for target in exprs {
            let expr = target["expr"].as_str().unwrap_or_default().to_owned();
            assert!(!expr.is_empty(), "panel {title}: a target without expr");
            targets.push(Target {
                row: row.clone(),
                panel: title.clone(),
                expr,
            });
        }
    }
    targets
}

/// `expr` with the dashboard's variables replaced by values Prometheus takes.
fn concrete(expr: &str) -> String {
    let mut out = expr.to_owned();
    for (variable, value) in SUBSTITUTIONS {
        out = out.replace(variable, value);
    }
    assert!(!out.contains('$'), "an unknown variable in {expr}");
    out
}

/// A marked client: its requests are the load-test engine's.
fn load_test_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("x-hongbao-load-test", "1".parse().unwrap());
    reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// Polls `GET path` until `done(body)`, at most 30 s.
async fn wait_for(app: &TestApp, path: &str, key: &str, what: &str, done: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = app.get(path, Some(key)).await;
        if status == 200 && done(&body) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A short night through the real server, enough for every panel's series to exist.
async fn drive_a_night(app: &mut TestApp) {
    // Rewards of every lane's kind against a budget; a tiny budget refuses; the throttled cash
    // lane builds a backlog and a lag; one reward is force-credited.
    assert_eq!(app.set_budget("night", 1_000_000, 100_000).await.0, 200);
    assert_eq!(app.set_budget("tiny", 100, 0).await.0, 200);
    let mut orders = Vec::new();
    for i in 0..24 {
        let kind = ["cash", "cash", "subsidy", "item"][i % 4];
        let order = format!("night-{i}");
        let (status, body) = app
            .reward_of("night", &order, &format!("u{}", i % 6), kind, 100)
            .await;
        assert_eq!(status, 202, "{order}: {body}");
        orders.push(order);
    }
    let (status, body) = app
        .post(
            "/v1/activities/night/rain/1/rewards",
            Some(ISSUER),
            r#"{"uid":"u1","amount":88}"#,
        )
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(app.reward("tiny", "tiny-1", "u1", 80).await.0, 202);
    let (status, body) = app.reward("tiny", "tiny-2", "u2", 80).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("budget_exhausted")),
        "{body}"
    );
    app.fund("u0", 10_000).await;
    app.fund("u1", 10_000).await;

    // Deposits, and a hot packet of 10 shares opened by 300 users at once: claims, 410s when
    // it is empty and 429s from its gate.
    for i in 0..5 {
        assert_eq!(
            app.deposit(&format!("d{i}"), &format!("dep-{i}"), 500)
                .await
                .0,
            201
        );
    }
    assert_eq!(app.deposit("sender", "top-hot", 1_000).await.0, 201);
    let (status, body) = app
        .post(
            "/v1/packets",
            Some(GATEWAY),
            &json!({"packet_id": "hot", "sender_uid": "sender", "mode": "c2c", "total": 1_000,
                    "count": 10, "split": "lucky"})
            .to_string(),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = app
        .post(
            "/v1/packets/hot/pay",
            Some(GATEWAY),
            r#"{"payment_id":"pay-hot"}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let answers = join_all((0..300).map(|i| {
        let app = &*app;
        async move {
            app.post(
                "/v1/packets/hot/claims",
                Some(GATEWAY),
                &json!({ "uid": format!("c{i}") }).to_string(),
            )
            .await
            .0
        }
    }))
    .await;
    let count = |s: u16| answers.iter().filter(|&&a| a == s).count();
    assert_eq!(count(200), 10, "the packet's shares: {answers:?}");
    assert!(count(429) + count(410) > 0, "{answers:?}");

    // Coupons: asynchronous requests through both layers, and one on the green channel.
    let (status, body) = app
        .post(
            "/v1/coupon-batches",
            Some(ADMIN),
            r#"{"batch_id":"spring","stock":100,"per_user_limit":2,"value":500}"#,
        )
        .await;
    assert_eq!(status, 201, "{body}");
    for i in 0..12 {
        let body =
            json!({"seq_no": format!("s-{i}"), "uid": format!("u{i}"), "batch_id": "spring"});
        let (status, answer) = app
            .post("/v1/coupons/issue", Some(ISSUER), &body.to_string())
            .await;
        assert_eq!(status, 202, "{answer}");
    }
    let green = json!({"seq_no": "s-green", "uid": "u0", "batch_id": "spring", "sync": true});
    let (status, answer) = app
        .post("/v1/coupons/issue", Some(ISSUER), &green.to_string())
        .await;
    assert_eq!(status, 200, "{answer}");

    // Withdrawals paid by the simulated channels.
    let bank = app.bind("u0", "bank", "6222-0000-0000-0000").await;
    let alipay = app.bind("u1", "alipay", "u1@example.com").await;
    for (uid, method, order) in [
        ("u0", &bank, "wd-0"),
        ("u1", &alipay, "wd-1"),
        ("u0", &bank, "wd-2"),
    ] {
        let (status, body) = app.withdraw(uid, order, 200, method).await;
        assert_eq!(status, 202, "{order}: {body}");
    }
    for order in ["wd-0", "wd-1", "wd-2"] {
        assert_eq!(app.wait_final(order).await["state"], "succeeded", "{order}");
    }

    // Everything settles: the lanes credit every reward, the layers issue every coupon.
    for order in &orders {
        wait_for(
            app,
            &format!("/v1/rewards/{order}"),
            ISSUER,
            "a reward settled",
            |r| r["status"] != "accepted",
        )
        .await;
    }
    for i in 0..12 {
        wait_for(
            app,
            &format!("/v1/coupons/requests/s-{i}"),
            ISSUER,
            "a coupon request final",
            |r| r["status"] != "accepted",
        )
        .await;
    }

    // Load-test traffic: a budget, a reward credited by the load-test engine's lane, a deposit.
    let real = std::mem::replace(&mut app.client, load_test_client());
    assert_eq!(app.set_budget("rehearsal", 10_000, 0).await.0, 200);
    let (status, body) = app.reward("rehearsal", "lt-1", "lt-u1", 100).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(app.deposit("lt-u1", "lt-dep-1", 100).await.0, 201);
    wait_for(
        app,
        "/v1/rewards/lt-1",
        ISSUER,
        "the load-test reward credited",
        |r| r["status"] != "accepted",
    )
    .await;
    app.client = real;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_alerts_work_against_a_real_prometheus_scraping_a_real_server() {
    if std::env::var("HONGBAO_SERVICES").as_deref() != Ok("1") {
        eprintln!(
            "skipped: set HONGBAO_SERVICES=1 to check deploy/ with promtool and a real Prometheus \
             (Debian's prometheus package)"
        );
        return;
    }
    // The shipped files, as an operator would check them.
    promtool(&["check", "rules", ALERTS]);
    promtool(&["check", "config", PROMETHEUS_CONFIG]);
    let tests = promtool(&["test", "rules", ALERT_TESTS]);
    assert!(tests.contains("SUCCESS"), "{tests}");

    let _heavy = heavy().await;
    // A throttled cash lane (5 a second) so that its backlog, lag and throttling are real.
    let mut app = spawn_app_with(|c| {
        c.rewards.cash_per_s = 5;
        c.withdrawals.retry_backoff_ms = vec![50];
    });
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let target = app.base.trim_start_matches("http://").to_owned();
    let prometheus = Prometheus::start(&client, &derived_config(&target)).await;

    drive_a_night(&mut app).await;

    // A few scrapes after the night, so that every rate has samples on both sides.
    let scrapes = r#"count_over_time(up{job="hongbao"}[10m])"#;
    let before = prometheus.value(&client, scrapes).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while prometheus.value(&client, scrapes).await < before + 4.0 {
        assert!(
            Instant::now() < deadline,
            "prometheus did not scrape {target} 4 times in 30 s:\n{}",
            prometheus.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        prometheus.value(&client, r#"up{job="hongbao"}"#).await,
        1.0,
        "the server is scraped"
    );

    // Every panel's every target returns series, and selects its traffic.
    let targets = dashboard_targets();
    assert!(targets.len() >= 30, "{} targets", targets.len());
    let mut failures = Vec::new();
    for target in &targets {
        let wanted = if target.row.contains("load_test") {
            LOAD_TEST
        } else {
            REAL
        };
        for problem in traffic_problems(&target.expr, wanted) {
            failures.push(format!("{} / {}: {problem}", target.row, target.panel));
        }
        let answer = prometheus.query(&client, &concrete(&target.expr)).await;
        let series = answer["data"]["result"].as_array().map_or(0, Vec::len);
        if answer["status"] != "success" || series == 0 {
            failures.push(format!(
                "{} / {}: {} returned {series} series: {answer}",
                target.row, target.panel, target.expr
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} dashboard targets failed:\n{}",
        failures.len(),
        targets.len(),
        failures.join("\n")
    );

    // Every alert rule is loaded, evaluates without error, selects real traffic only and
    // names metrics the server exposes; none fires on this healthy server.
    let exposed = scrape(&app.client, &app.base).await;
    let runbook_text = std::fs::read_to_string(repo("docs/RUNBOOK.md")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let rules = loop {
        let answer = prometheus.api(&client, "rules", &[]).await;
        let rules: Vec<Value> = answer["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        if !rules.is_empty()
            && rules
                .iter()
                .all(|r| r["lastEvaluation"] != "0001-01-01T00:00:00Z")
        {
            break rules;
        }
        assert!(Instant::now() < deadline, "rules never evaluated: {answer}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let shipped = std::fs::read_to_string(repo(ALERTS)).unwrap();
    let named = shipped.matches("- alert: ").count();
    assert_eq!(rules.len(), named, "every rule of {ALERTS} is loaded");
    let mut failures = Vec::new();
    for rule in &rules {
        let name = rule["name"].as_str().unwrap_or("?");
        let expr = rule["query"].as_str().unwrap_or_default();
        if rule["health"] != "ok" {
            failures.push(format!(
                "{name}: health {} {}",
                rule["health"], rule["lastError"]
            ));
        }
        let answer = prometheus.query(&client, expr).await;
        if answer["status"] != "success" {
            failures.push(format!("{name}: {answer}"));
        }
        for problem in traffic_problems(expr, REAL) {
            failures.push(format!("{name}: {problem}"));
        }
        for (metric, _) in selectors(expr) {
            // `up` is Prometheus's; hongbao_partition_served only a cluster node's.
            let elsewhere = ["up", "hongbao_partition_served"].contains(&metric.as_ref());
            if !elsewhere && !exposed.contains(&format!("\n{metric}")) {
                failures.push(format!("{name}: the server exposes no {metric}"));
            }
        }
        let annotations = &rule["annotations"];
        let runbook = format!("docs/RUNBOOK.md#{}", name.to_lowercase());
        if annotations["runbook"] != runbook.as_str()
            || annotations["summary"].as_str().is_none_or(str::is_empty)
            || annotations["description"]
                .as_str()
                .is_none_or(str::is_empty)
        {
            failures.push(format!(
                "{name}: annotations {annotations} (runbook {runbook})"
            ));
        }
        // Not even pending: most rules wait minutes (`for:`) before firing, longer than
        // this test runs, so a true expression shows as pending here.
        if rule["state"] != "inactive" {
            failures.push(format!(
                "{name} is {} on a healthy server: {}",
                rule["state"], rule["alerts"]
            ));
        }
        if !runbook_text.contains(&format!("\n#### {name}\n")) {
            failures.push(format!("{name}: no entry in docs/RUNBOOK.md"));
        }
    }
    assert!(failures.is_empty(), "alert rules:\n{}", failures.join("\n"));
    drop(prometheus);
}
