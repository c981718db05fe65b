//! Load-test traffic (D7, issue 16): requests marked `X-Hongbao-Load-Test: 1` run through the
//! same routes into books of their own; real balances, budgets, statements, views, metrics and
//! the real audit never see them.

use super::{metric, scrape, spawn_app_with, TestApp, ADMIN, GATEWAY};
use std::process::Command;

/// A client whose every request carries the marking (or none).
fn client(load_test: bool) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if load_test {
        headers.insert("x-hongbao-load-test", "1".parse().unwrap());
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .unwrap()
}

/// From now on the app's requests are marked (or not).
fn mark(app: &mut TestApp, load_test: bool) {
    app.client = client(load_test);
}

fn balance(wallet: &serde_json::Value, account: &str) -> i64 {
    wallet["balances"][account]
        .as_i64()
        .unwrap_or_else(|| panic!("no {account} balance in {wallet}"))
}

#[tokio::test]
async fn load_test_traffic_runs_the_same_code_into_books_of_its_own() {
    // Goal: a marked campaign (budget, reward, deposit, withdrawal paid by the channel) is
    // served whole, and nothing of it reaches the real books: wallets, rewards, budgets, the
    // channel's statement, the metrics' real series; the same order id is a new order there.
    let mut app = spawn_app_with(|c| c.withdrawals.retry_backoff_ms = vec![50]);
    mark(&mut app, true);
    assert_eq!(app.set_budget("night", 10_000, 0).await.0, 200);
    let (status, body) = app.reward("night", "lt-r1", "u1", 500).await;
    assert_eq!(status, 202, "{body}");
    let (status, body) = app.deposit("u1", "dep-1", 150).await;
    assert_eq!((status, body["balance_after"].as_i64()), (201, Some(150)));
    app.fund("u1", 1_000).await;
    let method = app.bind("u1", "alipay", "u1@example.com").await;
    let (status, body) = app.withdraw("u1", "lt-wd-1", 300, &method).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(app.wait_final("lt-wd-1").await["state"], "succeeded");
    // 500 (the reward, credited by the lanes) + 1,000 (funded) - 300 (withdrawn).
    let marked = app
        .wait_wallet("u1", "the reward credited", |w| {
            w["balances"]["activity"] == 1_200
        })
        .await;
    assert_eq!(balance(&marked, "change"), 150);
    let (_, statement) = app
        .get("/v1/admin/channels/alipay/statement", Some(ADMIN))
        .await;
    assert!(
        statement.to_string().contains("lt-wd-1"),
        "the load-test simulator paid it: {statement}"
    );
    let (status, activity) = app.get("/v1/admin/activities/night", Some(ADMIN)).await;
    assert_eq!(status, 200, "{activity}");

    mark(&mut app, false);
    let real = app.wallet("u1").await;
    assert_eq!(
        (balance(&real, "change"), balance(&real, "activity")),
        (0, 0),
        "{real}"
    );
    assert_eq!(app.get("/v1/rewards/lt-r1", Some(GATEWAY)).await.0, 404);
    assert_eq!(
        app.get("/v1/withdrawals/lt-wd-1", Some(GATEWAY)).await.0,
        404
    );
    let (status, activity) = app.get("/v1/admin/activities/night", Some(ADMIN)).await;
    assert!(
        status == 404 || activity["budget"].is_null(),
        "the real books have no such budget: {status} {activity}"
    );
    let (status, statement) = app
        .get("/v1/admin/channels/alipay/statement", Some(ADMIN))
        .await;
    assert_eq!(status, 200);
    assert!(!statement.to_string().contains("lt-wd-1"), "{statement}");
    // The same order id with another amount: a new real order, not a conflict with the test's.
    let (status, body) = app.deposit("u1", "dep-1", 70).await;
    assert_eq!((status, body["balance_after"].as_i64()), (201, Some(70)));
    mark(&mut app, true);
    assert_eq!(
        balance(&app.wallet("u1").await, "change"),
        150,
        "the real deposit is not in the load test's books"
    );
    mark(&mut app, false);

    // Metrics: the load test's series carry traffic="load_test"; the real ones saw none of it.
    let text = scrape(&app.client, &app.base).await;
    assert_eq!(
        metric(
            &text,
            r#"hongbao_budget_remaining_fen{activity="night",kind="cash",traffic="load_test"}"#
        ),
        Some(9_500.0),
        "the load test's budget is reported apart"
    );
    assert_eq!(
        metric(
            &text,
            r#"hongbao_budget_remaining_fen{activity="night",kind="cash"}"#
        ),
        None,
        "no real budget for the load test's activity"
    );
    assert_eq!(
        metric(
            &text,
            r#"hongbao_withdrawals_total{state="requested",traffic="load_test"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, r#"hongbao_withdrawals_total{state="requested"}"#).unwrap_or(0.0),
        0.0,
        "the real engine counted no withdrawal"
    );
    assert_eq!(
        metric(&text, r#"hongbao_rewards_accepted_total{kind="cash"}"#).unwrap_or(0.0),
        0.0,
        "the real engine accepted no reward"
    );
    let load_test_requests = text
        .lines()
        .filter(|l| l.starts_with("hongbao_http_request_duration_seconds_count{"))
        .filter(|l| l.contains(r#"traffic="load_test""#))
        .count();
    assert!(load_test_requests > 0, "load-test requests counted apart");
    // The status page's figures: the real ones, or the load test's for a marked request.
    let budget_of = |status: &serde_json::Value| {
        status["budgets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["activity"] == "night")
            .map(|b| b["cash"]["fen"].clone())
    };
    let (_, real_status) = app.get("/status.json", None).await;
    assert_eq!(real_status["traffic"], "real");
    assert_eq!(budget_of(&real_status), None, "{real_status}");
    mark(&mut app, true);
    let (_, marked_status) = app.get("/status.json", None).await;
    mark(&mut app, false);
    assert_eq!(marked_status["traffic"], "load_test");
    assert_eq!(budget_of(&marked_status), Some(serde_json::json!(9_500)));
    assert!(
        marked_status["counters"]["withdrawals"]["requested"].as_u64() == Some(1),
        "the load test's own counters: {}",
        marked_status["counters"]
    );
    app.server.stop().unwrap();

    // The offline audit: the real books hold the real deposit only and name the load-test
    // log they leave out; the load-test books audit clean on their own.
    let dir = app._dir.path();
    let audit = |extra: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_hongbao"))
            .args(["audit", "--json", "--data-dir"])
            .arg(dir)
            .args(extra)
            .output()
            .unwrap();
        let report: serde_json::Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stderr)));
        (output.status.success(), report)
    };
    let (ok, real) = audit(&[]);
    assert!(ok, "{real}");
    assert!(real["load_test_log_apart"].is_string(), "{real}");
    let (ok, load_test) = audit(&["--load-test"]);
    assert!(ok, "{load_test}");
    assert!(
        load_test["events"].as_u64().unwrap() > real["events"].as_u64().unwrap(),
        "the campaign's events are in the load-test books: {} vs {}",
        load_test["events"],
        real["events"]
    );
}

#[tokio::test]
async fn a_misspelt_marking_is_refused_and_changes_nothing() {
    // Goal: a marker that is neither 1 nor 0 is a 400, never taken for real traffic.
    let app = spawn_app_with(|_| {});
    for value in ["true", "yes", "2"] {
        let response = app
            .client
            .post(app.url("/v1/wallets/u2/change/deposits"))
            .bearer_auth(ADMIN)
            .header("x-hongbao-load-test", value)
            .body(r#"{"order_id":"d-1","amount":100}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 400, "{value}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["code"], "invalid_load_test_header");
    }
    assert_eq!(balance(&app.wallet("u2").await, "change"), 0);
    // 0 is real traffic.
    let response = app
        .client
        .post(app.url("/v1/wallets/u2/change/deposits"))
        .bearer_auth(ADMIN)
        .header("x-hongbao-load-test", "0")
        .body(r#"{"order_id":"d-1","amount":100}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    assert_eq!(balance(&app.wallet("u2").await, "change"), 100);
}

#[tokio::test]
async fn a_node_without_a_load_test_engine_refuses_marked_requests() {
    // Goal: with load tests disabled a marked request is refused 403, not served as real.
    let mut app = spawn_app_with(|c| c.load_test.enabled = false);
    mark(&mut app, true);
    let (status, body) = app.deposit("u3", "d-1", 100).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "load_test_unavailable");
    mark(&mut app, false);
    assert_eq!(balance(&app.wallet("u3").await, "change"), 0);
    assert!(!app._dir.path().join("load-test").exists());
}

#[tokio::test]
async fn load_test_traffic_spends_limits_of_its_own() {
    // Goal: a rehearsal that exhausts its key's per-caller limit leaves the real callers with
    // the same key their whole budget.
    let mut app = spawn_app_with(|c| {
        c.server.per_key_per_s = 1;
        c.server.per_key_burst = 3;
    });
    mark(&mut app, true);
    let mut statuses = Vec::new();
    for n in 0..5 {
        statuses.push(app.deposit("u4", &format!("lt-{n}"), 10).await.0);
    }
    assert_eq!(&statuses[..3], &[201, 201, 201], "{statuses:?}");
    assert!(statuses[3..].contains(&429), "{statuses:?}");
    mark(&mut app, false);
    for n in 0..3 {
        let (status, body) = app.deposit("u4", &format!("real-{n}"), 10).await;
        assert_eq!(status, 201, "real deposit {n}: {body}");
    }
}
