//! Lists against the real server: spent subsidies listed as used (P7), and every list paged
//! with `?limit=N&after=CURSOR` and `Link: rel="next"` (API.md conventions), never cut.

use super::{spawn_app, test_config, TestApp, ADMIN, GATEWAY, ISSUER};
use hongbao::channels::{RecordStatus, StatementLine};
use hongbao::clock::SystemClock;
use hongbao::http::RunningServer;
use hongbao::money::Fen;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::Arc;

async fn subsidy(app: &TestApp, order: &str, uid: &str, amount: i64) -> String {
    let (status, body) = app
        .reward_of("campaign", order, uid, "subsidy", amount)
        .await;
    assert_eq!(status, 202, "{body}");
    body["token"].as_str().unwrap().to_owned()
}

async fn force_credit(app: &TestApp, uid: &str, token: &str) {
    let (status, body) = app
        .post(
            &format!("/v1/wallets/{uid}/force-credit"),
            Some(GATEWAY),
            &json!({ "tokens": [token] }).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

fn statuses(list: &Value) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = list
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|r| {
            (
                r["order_id"].as_str().unwrap().to_owned(),
                r["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    pairs.sort();
    pairs
}

#[tokio::test]
async fn a_subsidy_spent_on_a_b2c_packet_is_listed_as_used() {
    // Goal: P7: once a subsidy paid a B2C packet, the subsidy list shows it `used` (with the
    // packet), not `credited` as if it could still be spent; an unspent one stays `credited`.
    let app = spawn_app();
    app.set_budget("campaign", 0, 10_000).await;
    let spent = subsidy(&app, "sub-spent", "brand", 600).await;
    let kept = subsidy(&app, "sub-kept", "brand", 400).await;
    force_credit(&app, "brand", &kept).await;
    let (status, created) = app
        .post(
            "/v1/packets",
            Some(GATEWAY),
            &json!({"packet_id": "pk-used", "sender_uid": "brand", "mode": "b2c", "total": 600,
                "count": 2, "split": "even", "subsidy_token": spent})
            .to_string(),
        )
        .await;
    assert_eq!(
        (status, created["state"].as_str()),
        (201, Some("active")),
        "{created}"
    );
    let (status, list) = app
        .get("/v1/wallets/brand/rewards?kind=subsidy", Some(GATEWAY))
        .await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(
        statuses(&list),
        vec![
            ("sub-kept".to_string(), "credited".to_string()),
            ("sub-spent".to_string(), "used".to_string()),
        ],
        "{list}"
    );
    let used = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["order_id"] == "sub-spent")
        .unwrap();
    assert_eq!(used["packet_id"], "pk-used", "{used}");
    // Paged one by one, the answer is the same: the point lookup does not depend on the page
    // holding the packet's debit.
    let (status, first) = app
        .get(
            "/v1/wallets/brand/rewards?kind=subsidy&limit=1",
            Some(GATEWAY),
        )
        .await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first.as_array().unwrap().len(), 1, "{first}");
}

/// Pages fetched for one list at most: a server that links in a loop fails the test.
const WALK_PAGES_MAX: usize = 1_000;

/// The `rel="next"` target of a `Link` header (RFC 8288), if any.
fn next_link(response: &reqwest::Response) -> Option<String> {
    let link = response.headers().get("link")?.to_str().ok()?;
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        params
            .split(';')
            .any(|p| p.trim() == "rel=\"next\"")
            .then(|| target.to_owned())
    })
}

/// Follows `Link: rel="next"` from `path` to the last page; returns every page's body. Each
/// page but the last carries a link; every page is a JSON array (or, for the ledger, an object
/// whose `ledger` is the array).
async fn walk(app: &TestApp, path: &str, key: &str) -> Vec<Vec<Value>> {
    let mut pages = Vec::new();
    let mut next = Some(path.to_owned());
    while let Some(target) = next {
        assert!(
            pages.len() < WALK_PAGES_MAX,
            "more than {WALK_PAGES_MAX} pages"
        );
        // A relative reference resolves against the server (RFC 3986).
        let url = if target.starts_with('/') {
            app.url(&target)
        } else {
            target.clone()
        };
        let response = app.client.get(&url).bearer_auth(key).send().await.unwrap();
        let status = response.status().as_u16();
        next = next_link(&response);
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, 200, "{target}: {body}");
        let items = match &body {
            Value::Array(items) => items.clone(),
            Value::Object(page) => page["ledger"].as_array().unwrap().clone(),
            other => panic!("{target}: not a list: {other}"),
        };
        assert!(
            next.is_none() || !items.is_empty(),
            "{target}: an empty page links to another"
        );
        pages.push(items);
    }
    pages
}

/// Every item of every page, checking that `id` is never seen twice.
fn each_once<'a>(pages: &'a [Vec<Value>], id: &str) -> Vec<&'a Value> {
    let mut seen = HashSet::new();
    let items: Vec<&Value> = pages.iter().flatten().collect();
    for item in &items {
        let key = item[id].to_string();
        assert!(seen.insert(key.clone()), "{id} {key} listed twice");
    }
    items
}

fn amounts(items: &[&Value], field: &str) -> u64 {
    items.iter().map(|i| i[field].as_u64().unwrap()).sum()
}

async fn error_code(app: &TestApp, path: &str, key: &str) -> (u16, String) {
    let (status, body) = app.get(path, Some(key)).await;
    (status, body["code"].as_str().unwrap_or_default().to_owned())
}

/// Lines written straight into the simulated bank's statement before the server starts (the
/// simulator pays one order per flush; a night's worth that way would take minutes).
const SEEDED_STATEMENT_LINES: u64 = 26_760;

fn seed_bank_statement(dir: &std::path::Path) -> u64 {
    let db = sled::Config::new()
        .path(dir.join("channels"))
        .flush_every_ms(None)
        .open()
        .unwrap();
    let tree = db.open_tree("statement:bank").unwrap();
    let mut batch = sled::Batch::default();
    let mut total = 0;
    for i in 0..SEEDED_STATEMENT_LINES {
        let amount = 50 + i % 90;
        total += amount;
        let line = StatementLine {
            order_id: format!("night-{i:06}"),
            amount: Fen::new(amount),
            status: RecordStatus::Succeeded,
            at_ms: 1_700_000_000_000 + i as i64,
            calls: 1,
        };
        batch.insert(
            line.order_id.as_bytes(),
            hongbao::events::codec::encode(&line).unwrap(),
        );
    }
    tree.apply_batch(batch).unwrap();
    db.flush().unwrap();
    total
}

#[tokio::test]
async fn the_channel_statement_pages_every_line_once_and_streams_whole_as_json_lines() {
    // Goal: item 13: after a night of 26,760 payouts (plus three real ones) the statement is
    // never cut: walking `Link: rel="next"` finds every line exactly once and the sum is the
    // total paid; `Accept: application/x-ndjson` streams every line; a bad limit or cursor
    // is a 400.
    let dir = tempfile::tempdir().unwrap();
    let seeded = seed_bank_statement(dir.path());
    let mut config = test_config(dir.path());
    config.withdrawals.retry_backoff_ms = vec![50];
    let server = RunningServer::start(config, Arc::new(SystemClock)).expect("server starts");
    let app = TestApp {
        base: server.base_url(),
        server,
        client: reqwest::Client::new(),
        _dir: dir,
    };
    app.fund("payee", 3_000).await;
    let method = app.bind("payee", "bank", "6222-payee").await;
    for i in 0..3 {
        let (status, body) = app
            .withdraw("payee", &format!("real-{i}"), 700, &method)
            .await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(
            app.wait_final(&format!("real-{i}")).await["state"],
            "succeeded"
        );
    }
    let lines = SEEDED_STATEMENT_LINES as usize + 3;
    let total = seeded + 3 * 700;

    for path in [
        "/v1/admin/channels/bank/statement",
        "/v1/admin/channels/bank/statement?limit=10000",
    ] {
        let pages = walk(&app, path, ADMIN).await;
        let items = each_once(&pages, "order_id");
        assert_eq!(items.len(), lines, "{path}: every line, once");
        assert_eq!(amounts(&items, "amount"), total, "{path}: nothing missing");
        assert!(pages.len() > 1, "{path}: more lines than one page");
    }
    let pages = walk(&app, "/v1/admin/channels/bank/statement?limit=10000", ADMIN).await;
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![10_000, 10_000, lines - 20_000]
    );
    // A cut download resumes from a page's cursor: JSON lines from there on.
    let first = app
        .client
        .get(app.url("/v1/admin/channels/bank/statement?limit=500"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    let resume = next_link(&first).expect("more than 500 lines");
    let resumed = app
        .client
        .get(app.url(&resume))
        .bearer_auth(ADMIN)
        .header("accept", "application/x-ndjson")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(resumed.lines().count(), lines - 500);

    // The whole statement as JSON lines, for finance.
    let response = app
        .client
        .get(app.url("/v1/admin/channels/bank/statement"))
        .bearer_auth(ADMIN)
        .header("accept", "application/x-ndjson")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/x-ndjson"),
        "{:?}",
        response.headers()
    );
    assert!(response.headers().get("link").is_none());
    assert!(
        response.headers().get("content-length").is_none(),
        "streamed, not buffered whole: {:?}",
        response.headers()
    );
    let text = response.text().await.unwrap();
    let parsed: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let items: Vec<&Value> = parsed.iter().collect();
    let distinct: HashSet<&str> = items
        .iter()
        .map(|i| i["order_id"].as_str().unwrap())
        .collect();
    assert_eq!((items.len(), distinct.len()), (lines, lines));
    assert_eq!(amounts(&items, "amount"), total);

    // Bad input is a clear 400.
    for (path, code) in [
        ("/v1/admin/channels/bank/statement?limit=0", "invalid_limit"),
        (
            "/v1/admin/channels/bank/statement?limit=10001",
            "invalid_limit",
        ),
        (
            "/v1/admin/channels/bank/statement?limit=ten",
            "invalid_limit",
        ),
        (
            "/v1/admin/channels/bank/statement?after=not*a*cursor",
            "invalid_cursor",
        ),
        (
            "/v1/admin/channels/bank/statement?after=AAAA",
            "invalid_cursor",
        ),
    ] {
        assert_eq!(
            error_code(&app, path, ADMIN).await,
            (400, code.to_owned()),
            "{path}"
        );
    }
}

async fn pause_lanes(app: &TestApp) {
    let (status, body) = app
        .put(
            "/v1/admin/switches/reward_lanes",
            Some(ADMIN),
            r#"{"on":false}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn the_reward_list_pages_through_pending_then_credited_rewards() {
    // Goal: item 13: the reward list (pending first, then credited from the ledger) pages with
    // a cursor that knows which part it is in: every reward once, the filter kept in the
    // links; a cursor of another list or a bad one is a 400.
    let app = spawn_app();
    pause_lanes(&app).await;
    let mut total = 0;
    let mut tokens = Vec::new();
    for i in 0..7 {
        let amount = 10 + i;
        total += amount as u64;
        let (status, body) = app
            .reward("listing", &format!("r-{i}"), "lister", amount)
            .await;
        assert_eq!(status, 202, "{body}");
        tokens.push(body["token"].as_str().unwrap().to_owned());
    }
    // Four credited, three still pending behind the paused lanes; a subsidy on the side.
    for token in &tokens[..4] {
        force_credit(&app, "lister", token).await;
    }
    let (status, body) = app
        .reward_of("listing", "s-1", "lister", "subsidy", 99)
        .await;
    assert_eq!(status, 202, "{body}");

    let pages = walk(
        &app,
        "/v1/wallets/lister/rewards?kind=cash&limit=2",
        GATEWAY,
    )
    .await;
    let items = each_once(&pages, "order_id");
    assert_eq!(pages.len(), 4, "7 rewards by 2");
    assert_eq!(items.len(), 7);
    assert_eq!(amounts(&items, "amount"), total);
    let pending = items.iter().filter(|i| i["status"] == "accepted").count();
    let credited = items.iter().filter(|i| i["status"] == "credited").count();
    assert_eq!((pending, credited), (3, 4));
    assert!(
        items.iter().all(|i| i["kind"] == "cash"),
        "the filter is kept"
    );
    // Unfiltered, the subsidy is there too, still each once.
    let pages = walk(&app, "/v1/wallets/lister/rewards?limit=3", GATEWAY).await;
    assert_eq!(each_once(&pages, "order_id").len(), 8);
    let pages = walk(
        &app,
        "/v1/wallets/lister/rewards?status=accepted&limit=1",
        GATEWAY,
    )
    .await;
    assert_eq!(each_once(&pages, "order_id").len(), 4, "pending only");

    for (path, code) in [
        ("/v1/wallets/lister/rewards?limit=101", "invalid_limit"),
        ("/v1/wallets/lister/rewards?after=%25%25", "invalid_cursor"),
        ("/v1/wallets/lister/rewards?after=AAAA", "invalid_cursor"),
        // A statement cursor means nothing here.
        (
            "/v1/wallets/lister/rewards?after=c25pZ2h0LTAwMDAwMQ",
            "invalid_cursor",
        ),
    ] {
        assert_eq!(
            error_code(&app, path, GATEWAY).await,
            (400, code.to_owned()),
            "{path}"
        );
    }
}

#[tokio::test]
async fn wallet_coupons_and_the_ledger_page_with_links() {
    // Goal: item 13: a user's coupons and ledger page with `Link: rel="next"`; each coupon and
    // each movement once; the ledger keeps its `before` cursor.
    let app = spawn_app();
    let (status, body) = app
        .post(
            "/v1/coupon-batches",
            Some(ADMIN),
            &json!({"batch_id": "pager", "stock": 100, "per_user_limit": 10, "value": 30})
                .to_string(),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    for i in 0..5 {
        let (status, body) = app
            .post(
                "/v1/coupons/issue",
                Some(ISSUER),
                &json!({"seq_no": format!("pg-{i}"), "uid": "holder", "batch_id": "pager", "sync": true})
                    .to_string(),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let pages = walk(&app, "/v1/wallets/holder/coupons?limit=2", GATEWAY).await;
    let coupons = each_once(&pages, "coupon_id");
    assert_eq!((pages.len(), coupons.len()), (3, 5));
    assert_eq!(amounts(&coupons, "value"), 150);
    assert_eq!(
        error_code(&app, "/v1/wallets/holder/coupons?after=zz", GATEWAY).await,
        (400, "invalid_cursor".to_owned())
    );

    for i in 0..5 {
        assert_eq!(
            app.deposit("saver", &format!("dep-{i}"), 100 + i).await.0,
            201
        );
    }
    let pages = walk(&app, "/v1/wallets/saver/ledger?limit=2", GATEWAY).await;
    let movements = each_once(&pages, "seq");
    assert_eq!((pages.len(), movements.len()), (3, 5));
    assert_eq!(amounts(&movements, "amount"), 510);
}

#[tokio::test]
async fn the_parked_listing_refuses_bad_paging_input() {
    // Goal: item 13: the parked listing takes the same limit and cursor as every list (its
    // paging over many rows is tested on the view, where rows can be parked at will).
    let app = spawn_app();
    let (status, parked) = app
        .get("/v1/admin/withdrawals/parked?limit=5", Some(ADMIN))
        .await;
    assert_eq!((status, parked), (200, json!([])));
    for (path, code) in [
        ("/v1/admin/withdrawals/parked?limit=0", "invalid_limit"),
        ("/v1/admin/withdrawals/parked?limit=1001", "invalid_limit"),
        ("/v1/admin/withdrawals/parked?after=@", "invalid_cursor"),
    ] {
        assert_eq!(
            error_code(&app, path, ADMIN).await,
            (400, code.to_owned()),
            "{path}"
        );
    }
}
