//! Wallet endpoints: auth, bad input, concurrency, idempotency, ledger paging.

use super::{spawn_app, ADMIN, GATEWAY, ISSUER};
use futures::future::join_all;
use serde_json::Value;

#[tokio::test]
async fn deposits_need_the_admin_key_and_wallet_reads_the_gateway_key() {
    // Goal: each role gets exactly its rights; errors carry the JSON error model.
    let app = spawn_app();
    let body = r#"{"order_id":"a1","amount":5}"#;
    let path = "/v1/wallets/u1/change/deposits";
    let (status, error) = app.post(path, None, body).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (401, Some("unauthorized"))
    );
    assert_eq!(
        app.post(path, Some("not-a-key-at-all-000000"), body)
            .await
            .0,
        401
    );
    let (status, error) = app.post(path, Some(GATEWAY), body).await;
    assert_eq!((status, error["code"].as_str()), (403, Some("forbidden")));
    assert_eq!(app.post(path, Some(ISSUER), body).await.0, 403);
    assert_eq!(app.post(path, Some(ADMIN), body).await.0, 201);

    assert_eq!(app.get("/v1/wallets/u1", None).await.0, 401);
    assert_eq!(app.get("/v1/wallets/u1", Some(ISSUER)).await.0, 403);
    let (status, wallet) = app.get("/v1/wallets/u1", Some(GATEWAY)).await;
    assert_eq!(status, 200);
    assert_eq!(wallet["balances"]["change"], 5);
    assert_eq!(app.get("/v1/wallets/u1", Some(ADMIN)).await.0, 200);
}

#[tokio::test]
async fn bad_input_is_answered_4xx_with_a_code_and_never_5xx() {
    // Goal: negative, zero, huge, non-numeric, missing, empty, malformed, oversized and
    // invalid ids are all refused with the documented status and a JSON code.
    let app = spawn_app();
    let path = "/v1/wallets/u1/change/deposits";
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "negative",
            r#"{"order_id":"o","amount":-5}"#.into(),
            422,
            "invalid_amount",
        ),
        (
            "zero",
            r#"{"order_id":"o","amount":0}"#.into(),
            422,
            "invalid_amount",
        ),
        (
            "above max",
            r#"{"order_id":"o","amount":100000000001}"#.into(),
            422,
            "amount_too_large",
        ),
        (
            "beyond i64",
            r#"{"order_id":"o","amount":1e30}"#.into(),
            400,
            "malformed",
        ),
        (
            "huge integer",
            r#"{"order_id":"o","amount":99999999999999999999999}"#.into(),
            400,
            "malformed",
        ),
        (
            "fraction",
            r#"{"order_id":"o","amount":1.5}"#.into(),
            400,
            "malformed",
        ),
        (
            "string",
            r#"{"order_id":"o","amount":"100"}"#.into(),
            400,
            "malformed",
        ),
        (
            "null",
            r#"{"order_id":"o","amount":null}"#.into(),
            400,
            "malformed",
        ),
        (
            "missing amount",
            r#"{"order_id":"o"}"#.into(),
            400,
            "malformed",
        ),
        ("missing order", r#"{"amount":5}"#.into(), 400, "malformed"),
        (
            "unknown field",
            r#"{"order_id":"o","amount":5,"x":1}"#.into(),
            400,
            "malformed",
        ),
        ("empty body", "".into(), 400, "malformed"),
        ("not json", "amount=5".into(), 400, "malformed"),
        ("array", "[1,2]".into(), 400, "malformed"),
        (
            "bad order id",
            r#"{"order_id":"a b","amount":5}"#.into(),
            400,
            "invalid_id",
        ),
        (
            "empty order id",
            r#"{"order_id":"","amount":5}"#.into(),
            400,
            "invalid_id",
        ),
        (
            "long order id",
            format!(r#"{{"order_id":"{}","amount":5}}"#, "x".repeat(129)),
            400,
            "invalid_id",
        ),
        (
            "oversized",
            format!(
                r#"{{"order_id":"o","amount":5,"pad":"{}"}}"#,
                "x".repeat(8000)
            ),
            413,
            "payload_too_large",
        ),
    ];
    for (name, body, status, code) in cases {
        let (got, error) = app.post(path, Some(ADMIN), &body).await;
        assert_eq!(got, status, "{name}: {error}");
        assert_eq!(error["code"].as_str(), Some(code), "{name}: {error}");
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}"
        );
    }
    let (status, error) = app
        .post(
            "/v1/wallets/bad%20uid/change/deposits",
            Some(ADMIN),
            r#"{"order_id":"o","amount":5}"#,
        )
        .await;
    assert_eq!((status, error["code"].as_str()), (400, Some("invalid_id")));
    let (status, _) = app
        .get("/v1/wallets/u1/ledger?limit=0", Some(GATEWAY))
        .await;
    assert_eq!(status, 400);
    let (status, _) = app
        .get("/v1/wallets/u1/ledger?limit=abc", Some(GATEWAY))
        .await;
    assert_eq!(status, 400);
    // Nothing of the above moved money.
    let (_, wallet) = app.get("/v1/wallets/u1", Some(GATEWAY)).await;
    assert_eq!(wallet["balances"]["change"], 0);
    assert_eq!(wallet["ledger"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn three_hundred_concurrent_distinct_deposits_give_the_exact_balance() {
    // Goal: no lost update under concurrency; every 201 is visible right after (read-your-writes).
    let app = spawn_app();
    let replies = join_all((1..=300i64).map(|i| {
        let app = &app;
        async move { app.deposit("hot", &format!("d{i}"), i).await }
    }))
    .await;
    assert!(
        replies.iter().all(|(s, _)| *s == 201),
        "{:?}",
        replies.iter().find(|(s, _)| *s != 201)
    );
    let (status, wallet) = app.get("/v1/wallets/hot", Some(GATEWAY)).await;
    assert_eq!(status, 200);
    assert_eq!(wallet["balances"]["change"], (1..=300).sum::<i64>());
    assert_eq!(wallet["balances"]["activity"], 0);
    // The ledger holds 300 entries whose balance_after values are each a prefix sum.
    let mut seen = Vec::new();
    let mut before: Option<u64> = None;
    loop {
        let path = match before {
            Some(b) => format!("/v1/wallets/hot/ledger?limit=100&before={b}"),
            None => "/v1/wallets/hot/ledger?limit=100".to_string(),
        };
        let (status, page) = app.get(&path, Some(GATEWAY)).await;
        assert_eq!(status, 200);
        seen.extend(page["ledger"].as_array().unwrap().iter().cloned());
        match page["next_before"].as_u64() {
            Some(b) => before = Some(b),
            None => break,
        }
    }
    assert_eq!(seen.len(), 300);
    let mut running = 0i64;
    for entry in seen.iter().rev() {
        running += entry["amount"].as_i64().unwrap();
        assert_eq!(entry["balance_after"].as_i64().unwrap(), running);
        assert_eq!(entry["entry"], "deposit");
        assert_eq!(entry["direction"], "credit");
    }
}

#[tokio::test]
async fn fifty_concurrent_identical_deposits_have_one_effect_and_identical_answers() {
    // Goal: idempotency under a retry storm: one movement, 50 byte-identical 201 bodies, and a
    // different payload with the same id is a 409.
    let app = spawn_app();
    let replies = join_all((0..50).map(|_| app.deposit("u9", "same-order", 250))).await;
    let first = &replies[0];
    assert_eq!(first.0, 201);
    assert!(replies.iter().all(|r| r == first), "answers differ");
    assert_eq!(first.1["balance_after"], 250);
    let (status, error) = app.deposit("u9", "same-order", 251).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (409, Some("idempotency_conflict"))
    );
    let (_, wallet) = app.get("/v1/wallets/u9", Some(GATEWAY)).await;
    assert_eq!(wallet["balances"]["change"], 250);
    assert_eq!(wallet["ledger"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn an_unknown_wallet_reads_as_empty() {
    // Goal: every uid has a wallet; an unseen one is zero with an empty ledger and no pending.
    let app = spawn_app();
    let (status, wallet) = app.get("/v1/wallets/nobody", Some(GATEWAY)).await;
    assert_eq!(status, 200);
    assert_eq!(
        wallet["balances"],
        serde_json::json!({"activity": 0, "change": 0, "subsidy": 0})
    );
    assert_eq!(wallet["pending"], Value::Array(vec![]));
    assert_eq!(wallet["ledger"], Value::Array(vec![]));
}
