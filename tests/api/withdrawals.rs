//! Withdrawals against the real server with the channel simulator: policy gates, the overdraft
//! race, failing and timing-out channels, idempotent retries.

use super::{metric, spawn_app, spawn_app_clocked, spawn_app_with, ADMIN, GATEWAY};
use futures::future::join_all;
use hongbao::clock::{parse_rfc3339, rfc3339, ManualClock};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

/// Fast retries for tests: the three retries within 150 ms instead of 10 s.
fn fast_retries(c: &mut hongbao::config::Config) {
    c.withdrawals.retry_backoff_ms = vec![50];
}

async fn set_channel(app: &super::TestApp, channel: &str, settings: Value) {
    let (status, body) = app
        .put(
            &format!("/v1/admin/channels/{channel}"),
            Some(ADMIN),
            &settings.to_string(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

async fn statement(app: &super::TestApp, channel: &str) -> HashMap<String, Value> {
    let (status, lines) = app
        .get(
            &format!("/v1/admin/channels/{channel}/statement"),
            Some(ADMIN),
        )
        .await;
    assert_eq!(status, 200);
    lines
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["order_id"].as_str().unwrap().to_owned(), l.clone()))
        .collect()
}

async fn ledger_entries(app: &super::TestApp, uid: &str) -> Vec<Value> {
    let (_, page) = app
        .get(
            &format!("/v1/wallets/{uid}/ledger?limit=500"),
            Some(GATEWAY),
        )
        .await;
    page["ledger"].as_array().unwrap().clone()
}

#[tokio::test]
async fn a_withdrawal_is_debited_at_once_paid_asynchronously_and_retries_answer_the_same() {
    // Goal: 202 processing right after the debit; the order reaches succeeded; the channel paid
    // it once; a retry returns the same answer; another payload with the id is a 409.
    let app = spawn_app();
    app.fund("w-u1", 1_000).await;
    let method = app.bind("w-u1", "alipay", "u1@example.com").await;
    assert_eq!(
        app.bind("w-u1", "alipay", "u1@example.com").await,
        method,
        "binding is idempotent"
    );
    let first = app.withdraw("w-u1", "wd-1", 600, &method).await;
    assert_eq!(first.0, 202, "{}", first.1);
    assert_eq!(first.1["status"], "processing");
    assert_eq!(
        app.wallet("w-u1").await["balances"]["activity"],
        400,
        "debited before the answer"
    );
    let done = app.wait_final("wd-1").await;
    assert_eq!(done["state"], "succeeded");
    assert_eq!(done["attempts"], 1);
    assert_eq!(
        app.withdraw("w-u1", "wd-1", 600, &method).await,
        first,
        "a retry gets the same answer"
    );
    let (status, error) = app.withdraw("w-u1", "wd-1", 601, &method).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (409, Some("idempotency_conflict"))
    );
    let paid = statement(&app, "alipay").await;
    assert_eq!(paid["wd-1"]["status"], "succeeded");
    assert_eq!(paid["wd-1"]["amount"], 600);
    let (_, methods) = app
        .get("/v1/wallets/w-u1/payout-methods", Some(GATEWAY))
        .await;
    assert_eq!(methods.as_array().unwrap().len(), 1);
    let (status, error) = app
        .withdraw("w-u1", "wd-2", 100, "m-0000000000000000")
        .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (404, Some("unknown_method"))
    );
}

#[tokio::test]
async fn policy_gates_refuse_below_minimum_closed_windows_and_unopened_buckets() {
    // Goal: W3-W5 at the edge, on a manual clock: 422 below_minimum, 403 window_closed with
    // opens_at, 403 not_yet_open_for_user with opens_at, and the same user admitted once its
    // bucket opens; nothing is debited by a refusal.
    let start = parse_rfc3339("2026-01-31T18:00:00Z").unwrap();
    let clock = ManualClock::new(start);
    let app = spawn_app_clocked(Arc::new(clock.clone()), |_| {});
    for uid in ["10", "15"] {
        app.fund(uid, 10_000).await;
    }
    let method_10 = app.bind("10", "bank", "6222-10").await;
    let method_15 = app.bind("15", "bank", "6222-15").await;
    let (status, error) = app.withdraw("10", "g-1", 99, &method_10).await;
    assert_eq!(
        (status, error["code"].as_str(), error["min_amount"].as_i64()),
        (422, Some("below_minimum"), Some(100))
    );

    let policy = serde_json::json!({
        "min_amount": 100,
        "closed_windows": [{"from": "2026-01-31T19:00:00Z", "to": "2026-02-01T01:00:00Z"}],
        "staged_opening": {"modulo": 10, "schedule": [
            {"at": "2026-02-01T01:00:00Z", "open_below": 3},
            {"at": "2026-02-01T01:10:00Z", "open_below": 10}
        ]}
    });
    let (status, stored) = app
        .put(
            "/v1/admin/withdrawal-policy",
            Some(ADMIN),
            &policy.to_string(),
        )
        .await;
    assert_eq!(status, 200, "{stored}");
    let (_, current) = app.get("/v1/admin/withdrawal-policy", Some(ADMIN)).await;
    assert_eq!(current["staged_opening"]["modulo"], 10);

    clock.set_ms(parse_rfc3339("2026-01-31T20:00:00Z").unwrap());
    let (status, error) = app.withdraw("10", "g-2", 500, &method_10).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (403, Some("window_closed"))
    );
    assert_eq!(
        error["opens_at"],
        rfc3339(parse_rfc3339("2026-02-01T01:00:00Z").unwrap())
    );

    clock.set_ms(parse_rfc3339("2026-02-01T01:05:00Z").unwrap());
    let (status, error) = app.withdraw("15", "g-3", 500, &method_15).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (403, Some("not_yet_open_for_user")),
        "bucket 5 opens at 01:10"
    );
    assert_eq!(
        error["opens_at"],
        rfc3339(parse_rfc3339("2026-02-01T01:10:00Z").unwrap())
    );
    assert_eq!(
        app.withdraw("10", "g-4", 500, &method_10).await.0,
        202,
        "bucket 0 is open"
    );

    clock.set_ms(parse_rfc3339("2026-02-01T01:10:00Z").unwrap());
    assert_eq!(
        app.withdraw("15", "g-3", 500, &method_15).await.0,
        202,
        "bucket 5 is open now"
    );
    assert_eq!(
        app.wallet("15").await["balances"]["activity"],
        9_500,
        "only the admitted withdrawal debited"
    );
    let (status, _) = app
        .put(
            "/v1/admin/withdrawal-policy",
            Some(ADMIN),
            r#"{"min_amount":0}"#,
        )
        .await;
    assert_eq!(status, 422);
    let (status, _) = app
        .put(
            "/v1/admin/withdrawal-policy",
            Some(GATEWAY),
            &policy.to_string(),
        )
        .await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn concurrent_withdrawals_never_overdraw() {
    // Goal: 20 concurrent withdrawals of 100 against a balance of 1,000: exactly 10 are debited
    // (202), 10 refused with insufficient_balance, the balance ends at 0, and retries of the
    // refused ones are refused the same way.
    let app = spawn_app();
    app.fund("racer", 1_000).await;
    let method = app.bind("racer", "change", "racer").await;
    let replies = join_all((0..20).map(|i| {
        let (app, method) = (&app, &method);
        async move { app.withdraw("racer", &format!("od-{i}"), 100, method).await }
    }))
    .await;
    let accepted = replies.iter().filter(|(s, _)| *s == 202).count();
    let refused: Vec<_> = replies
        .iter()
        .enumerate()
        .filter(|(_, (s, _))| *s == 409)
        .collect();
    assert_eq!(accepted, 10);
    assert_eq!(refused.len(), 10);
    assert!(refused
        .iter()
        .all(|(_, (_, e))| e["code"] == "insufficient_balance"));
    assert_eq!(app.wallet("racer").await["balances"]["activity"], 0);
    let (i, _) = refused[0];
    let (status, error) = app
        .withdraw("racer", &format!("od-{i}"), 100, &method)
        .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (409, Some("insufficient_balance")),
        "same answer on retry"
    );
    let debits = ledger_entries(&app, "racer")
        .await
        .iter()
        .filter(|e| e["entry"] == "withdrawal")
        .count();
    assert_eq!(debits, 10);
}

#[tokio::test]
async fn an_always_failing_channel_parks_the_payout_and_refunds_exactly_once() {
    // Goal: with the bank refusing everything, each order is tried 1 + 3 times, parked, failed
    // and refunded once; the balance comes back; the channel paid nothing.
    let app = spawn_app_with(fast_retries);
    set_channel(&app, "bank", serde_json::json!({"rate_per_s": 1000, "latency_ms": 1, "fail_rate": 1.0, "timeout_rate": 0.0})).await;
    app.fund("unlucky", 3_000).await;
    let method = app.bind("unlucky", "bank", "6222-unlucky").await;
    for i in 0..3 {
        assert_eq!(
            app.withdraw("unlucky", &format!("fail-{i}"), 1_000, &method)
                .await
                .0,
            202
        );
    }
    for i in 0..3 {
        let order = app.wait_final(&format!("fail-{i}")).await;
        assert_eq!(order["state"], "refunded", "{order}");
        assert_eq!(order["attempts"], 4);
        assert_eq!(order["parked"], true);
    }
    assert_eq!(app.wallet("unlucky").await["balances"]["activity"], 3_000);
    let refunds = ledger_entries(&app, "unlucky")
        .await
        .iter()
        .filter(|e| e["entry"] == "withdrawal_refund")
        .count();
    assert_eq!(refunds, 3, "one refund per failed order");
    let lines = statement(&app, "bank").await;
    assert!(lines.values().all(|l| l["status"] == "failed"));
    let metrics = app.metrics_text().await;
    assert_eq!(
        metric(&metrics, "hongbao_payouts_parked_total{channel=\"bank\"}"),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "hongbao_payout_attempts_total{channel=\"bank\",outcome=\"failed\"}"
        ),
        Some(12.0)
    );
    // Settled dead letters leave the parked listing.
    let (_, parked) = app.get("/v1/admin/withdrawals/parked", Some(ADMIN)).await;
    assert_eq!(parked, serde_json::json!([]));
}

#[tokio::test]
async fn timeouts_are_resolved_by_query_never_by_paying_twice() {
    // Goal: with every call timing out (half of them did pay), each order ends succeeded iff
    // the channel's record says paid, refunded otherwise; nobody is paid twice and the
    // reconciler finds no mismatch.
    let app = spawn_app_with(fast_retries);
    set_channel(&app, "alipay", serde_json::json!({"rate_per_s": 1000, "latency_ms": 1, "fail_rate": 0.0, "timeout_rate": 1.0})).await;
    app.fund("tmo", 30 * 200).await;
    let method = app.bind("tmo", "alipay", "tmo@example.com").await;
    for i in 0..30 {
        assert_eq!(
            app.withdraw("tmo", &format!("tmo-{i}"), 200, &method)
                .await
                .0,
            202
        );
    }
    let mut succeeded = 0;
    let lines_before = join_all((0..30).map(|i| {
        let app = &app;
        async move { app.wait_final(&format!("tmo-{i}")).await }
    }))
    .await;
    let lines = statement(&app, "alipay").await;
    for order in &lines_before {
        let id = order["order_id"].as_str().unwrap();
        let paid = lines.get(id).is_some_and(|l| l["status"] == "succeeded");
        match order["state"].as_str().unwrap() {
            "succeeded" => {
                assert!(paid, "{id} succeeded but the channel did not pay");
                succeeded += 1;
            }
            "refunded" => assert!(!paid, "{id} refunded although the channel paid"),
            other => panic!("{id} ended {other}"),
        }
    }
    assert!(
        succeeded > 0,
        "with half the timeouts paying, some orders must succeed"
    );
    let wallet = app.wallet("tmo").await;
    assert_eq!(
        wallet["balances"]["activity"],
        30 * 200 - succeeded * 200,
        "debit - refund = paid"
    );
    let metrics = app.metrics_text().await;
    assert!(
        metric(
            &metrics,
            "hongbao_payout_attempts_total{channel=\"alipay\",outcome=\"timeout\"}"
        )
        .is_some_and(|n| n >= 30.0),
        "{metrics}"
    );
    // The reconciler checks each order at every state change and counts it final last; poll
    // until it has seen all 30 final, then nothing may disagree.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let metrics = loop {
        let metrics = app.metrics_text().await;
        let finals = ["succeeded", "refunded"]
            .iter()
            .filter_map(|s| {
                metric(
                    &metrics,
                    &format!("hongbao_withdrawals_total{{state=\"{s}\"}}"),
                )
            })
            .sum::<f64>();
        if finals >= 30.0 {
            break metrics;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the reconciler never saw the 30 orders final: {metrics}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    };
    for check in ["debit", "refund", "channel"] {
        assert_eq!(
            metric(
                &metrics,
                &format!("hongbao_reconciliation_mismatches_total{{check=\"{check}\"}}")
            ),
            Some(0.0),
            "{check} exposed at zero: {metrics}"
        );
    }
    assert!(
        metric(&metrics, "hongbao_reconciliation_checks_total")
            .is_some_and(|n| n >= 30.0 * 4.0),
        "each order checked at every state change (requested, debited, paying, final...): {metrics}"
    );
    assert_eq!(
        metric(&metrics, "hongbao_withdrawals_total{state=\"succeeded\"}"),
        Some(succeeded as f64)
    );
}

#[tokio::test]
async fn one_policy_set_days_ahead_runs_the_whole_night() {
    // Goal: W4 + W5 in one policy set two days ahead, on a manual clock: open by day (every
    // bucket, staged opening not begun), closed 19:00-01:00 with each user's own opens_at, then
    // bucket k admitted from 01:00 + k x 10 min (the interval form of the schedule).
    let at = |t: &str| parse_rfc3339(t).unwrap();
    let clock = ManualClock::new(at("2026-01-29T12:00:00Z"));
    let app = spawn_app_clocked(Arc::new(clock.clone()), |_| {});
    let policy = serde_json::json!({
        "min_amount": 100,
        "closed_windows": [{"from": "2026-01-31T19:00:00Z", "to": "2026-02-01T01:00:00Z"}],
        "staged_opening": {"modulo": 4, "starts_at": "2026-02-01T01:00:00Z", "interval_s": 600}
    });
    let (status, stored) = app
        .put(
            "/v1/admin/withdrawal-policy",
            Some(ADMIN),
            &policy.to_string(),
        )
        .await;
    assert_eq!(status, 200, "{stored}");
    let schedule = stored["staged_opening"]["schedule"].as_array().unwrap();
    assert_eq!(schedule.len(), 4, "{stored}");
    assert_eq!(schedule[3]["at"], rfc3339(at("2026-02-01T01:30:00Z")));
    assert_eq!(schedule[3]["open_below"], 4);
    let mut methods = HashMap::new();
    for uid in ["40", "41", "43"] {
        app.fund(uid, 10_000).await;
        methods.insert(uid, app.bind(uid, "change", &format!("acct-{uid}")).await);
    }
    let withdraw = |uid: &'static str, order: &str| {
        let (app, method) = (&app, methods[uid].clone());
        let order = order.to_owned();
        async move { app.withdraw(uid, &order, 100, &method).await }
    };

    // By day: everyone, whatever the bucket.
    clock.set_ms(at("2026-01-31T12:00:00Z"));
    for uid in ["40", "41", "43"] {
        let (status, body) = withdraw(uid, &format!("day-{uid}")).await;
        assert_eq!(status, 202, "{uid} by day: {body}");
    }

    // In the evening window: closed, and each user is told their own opening.
    clock.set_ms(at("2026-01-31T20:00:00Z"));
    for (uid, opens) in [
        ("40", "2026-02-01T01:00:00Z"),
        ("41", "2026-02-01T01:10:00Z"),
        ("43", "2026-02-01T01:30:00Z"),
    ] {
        let (status, error) = withdraw(uid, &format!("eve-{uid}")).await;
        assert_eq!(
            (status, error["code"].as_str()),
            (403, Some("window_closed")),
            "{uid}"
        );
        assert_eq!(error["opens_at"], rfc3339(at(opens)), "{uid}");
    }

    // From 01:00, by bucket.
    clock.set_ms(at("2026-02-01T01:05:00Z"));
    assert_eq!(withdraw("40", "n-40").await.0, 202, "bucket 0 is open");
    let (status, error) = withdraw("41", "n-41").await;
    assert_eq!(
        (status, error["code"].as_str(), error["opens_at"].as_str()),
        (
            403,
            Some("not_yet_open_for_user"),
            Some(rfc3339(at("2026-02-01T01:10:00Z")).as_str())
        )
    );
    clock.set_ms(at("2026-02-01T01:10:00Z"));
    assert_eq!(withdraw("41", "n-41").await.0, 202, "bucket 1 at its stage");
    assert_eq!(withdraw("43", "n-43").await.0, 403, "bucket 3 still waits");
    clock.set_ms(at("2026-02-01T01:30:00Z"));
    assert_eq!(withdraw("43", "n-43").await.0, 202, "bucket 3 at its stage");
    assert_eq!(
        app.wallet("43").await["balances"]["activity"],
        10_000 - 200,
        "only the admitted withdrawals debited"
    );

    let (status, error) = app
        .put(
            "/v1/admin/withdrawal-policy",
            Some(ADMIN),
            r#"{"min_amount":100,"staged_opening":{"modulo":4,"starts_at":"2026-02-01T01:00:00Z"}}"#,
        )
        .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (422, Some("invalid_policy")),
        "half of the interval form"
    );
}

#[tokio::test]
async fn policy_and_switch_changes_record_which_key_made_them() {
    // Goal: a policy or switch change names the role and a short non-secret id of the key that
    // made it (8 hex digits of the key's SHA-256), shown by the GETs.
    use sha2::Digest;
    let key_id = hex::encode(&sha2::Sha256::digest(ADMIN.as_bytes())[..4]);
    let app = spawn_app();
    let (_, before) = app.get("/v1/admin/withdrawal-policy", Some(ADMIN)).await;
    assert_eq!(before["changed_by"], Value::Null, "the default: nobody");
    let (status, body) = app
        .put(
            "/v1/admin/withdrawal-policy",
            Some(ADMIN),
            r#"{"min_amount":150}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, policy) = app.get("/v1/admin/withdrawal-policy", Some(ADMIN)).await;
    assert_eq!(policy["min_amount"], 150);
    assert_eq!(policy["changed_by"]["role"], "admin", "{policy}");
    assert_eq!(policy["changed_by"]["key_id"], key_id.as_str());
    assert!(policy["changed_by"]["at"].is_string(), "{policy}");
    assert!(!policy.to_string().contains(ADMIN), "never the key itself");

    let (status, _) = app
        .put(
            "/v1/admin/switches/token_merge",
            Some(ADMIN),
            r#"{"on":false}"#,
        )
        .await;
    assert_eq!(status, 200);
    let (_, switches) = app.get("/v1/admin/switches", Some(ADMIN)).await;
    assert_eq!(switches["token_merge"], false, "{switches}");
    let change = &switches["changed_by"]["token_merge"];
    assert_eq!(
        (change["role"].as_str(), change["key_id"].as_str()),
        (Some("admin"), Some(key_id.as_str())),
        "{switches}"
    );
    assert_eq!(
        switches["changed_by"]["reward_lanes"],
        Value::Null,
        "never changed"
    );
}
