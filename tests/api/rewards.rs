//! Rewards against the real server: budgets under concurrency, pending + credited during a
//! burst, force-credit racing the lanes, tokens, shortcuts, order ids reused across activities,
//! coupon rewards settling.

use super::{metric, spawn_app, spawn_app_with, TestApp, ADMIN, GATEWAY, ISSUER};
use futures::future::join_all;
use serde_json::Value;
use std::collections::{HashMap, HashSet};

fn sum(values: &[Value], field: &str) -> i64 {
    values.iter().map(|v| v[field].as_i64().unwrap()).sum()
}

#[tokio::test]
async fn a_budget_hit_by_many_more_concurrent_rewards_accepts_exactly_up_to_it() {
    // Goal: 400 concurrent rewards of 100 fen against a 10,000 fen budget: exactly 100 are
    // accepted, 300 get budget_exhausted with what remains, and the lanes credit exactly 10,000.
    let app = spawn_app();
    assert_eq!(app.set_budget("cny", 10_000, 0).await.0, 200);
    let replies = join_all((0..400).map(|i| {
        let app = &app;
        async move {
            app.reward("cny", &format!("b{i}"), &format!("u{}", i % 20), 100)
                .await
        }
    }))
    .await;
    let accepted = replies.iter().filter(|(s, _)| *s == 202).count();
    let exhausted: Vec<&Value> = replies
        .iter()
        .filter(|(s, _)| *s == 409)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(accepted, 100);
    assert_eq!(exhausted.len(), 300);
    for error in exhausted {
        assert_eq!(error["code"], "budget_exhausted");
        assert!(error["remaining"].as_i64().unwrap() < error["requested"].as_i64().unwrap());
    }
    let (status, activity) = app.get("/v1/admin/activities/cny", Some(ADMIN)).await;
    assert_eq!(status, 200);
    assert_eq!(activity["accepted"]["cash"], 10_000);
    assert_eq!(activity["remaining"]["cash"], 0);
    let mut credited = 0;
    for u in 0..20 {
        let wallet = app
            .wait_wallet(&format!("u{u}"), "credits", |w| {
                w["pending"].as_array().unwrap().is_empty()
            })
            .await;
        credited += wallet["balances"]["activity"].as_i64().unwrap();
    }
    assert_eq!(credited, 10_000);
    // Raising is allowed; lowering below what is accepted is not.
    let (status, error) = app.set_budget("cny", 9_999, 0).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (409, Some("budget_below_accepted"))
    );
    assert_eq!(app.set_budget("cny", 10_100, 0).await.0, 200);
    assert_eq!(app.reward("cny", "after-raise", "u0", 100).await.0, 202);
}

#[tokio::test]
async fn during_a_burst_every_reward_is_pending_or_credited_exactly_once_then_all_credited() {
    // Goal: with the cash lane throttled to build a backlog, each wallet read during a burst of
    // 2,000 rewards accounts for every reward exactly once (R6): balance + pending lies between
    // what was acknowledged before the read and what was sent by its end, every acknowledged
    // order is pending or in the ledger, and no order is pending twice. In the end all is
    // credited.
    // Reads wait for the wallet view to apply what was durable when they began (R6 is a
    // property of the views, not of a deadline): on a loaded machine the view of a 2,000-reward
    // burst can lag past the 1 s default, after which a read answers as the view stands.
    let app = spawn_app_with(|c| {
        c.rewards.cash_per_s = 400;
        c.server.read_wait_ms = 15_000;
    });
    let users = 25;
    type Orders = HashMap<String, HashMap<String, i64>>;
    let sent: std::sync::Mutex<Orders> = Default::default();
    let acked: std::sync::Mutex<Orders> = Default::default();
    let burst = join_all((0..2000).map(|i| {
        let (app, sent, acked) = (&app, &sent, &acked);
        async move {
            let uid = format!("bu{}", i % users);
            let order = format!("burst-{i}");
            let amount = (i % 7 + 1) as i64;
            sent.lock()
                .unwrap()
                .entry(uid.clone())
                .or_default()
                .insert(order.clone(), amount);
            let (status, body) = app.reward("cny", &order, &uid, amount).await;
            assert_eq!(status, 202, "{body}");
            acked
                .lock()
                .unwrap()
                .entry(uid)
                .or_default()
                .insert(order, amount);
        }
    }));
    let sampler = async {
        let mut samples_with_backlog = 0;
        for round in 0..30 {
            let uid = format!("bu{}", round % users);
            let acked_before: HashMap<String, i64> =
                acked.lock().unwrap().get(&uid).cloned().unwrap_or_default();
            let wallet = app.wallet(&uid).await;
            let sent_by_now: i64 = sent
                .lock()
                .unwrap()
                .get(&uid)
                .map(|o| o.values().sum())
                .unwrap_or(0);
            let (_, ledger) = app
                .get(
                    &format!("/v1/wallets/{uid}/ledger?limit=500"),
                    Some(GATEWAY),
                )
                .await;
            let pending = wallet["pending"].as_array().unwrap();
            let pending_ids: HashSet<&str> = pending
                .iter()
                .map(|p| p["order_id"].as_str().unwrap())
                .collect();
            assert_eq!(
                pending_ids.len(),
                pending.len(),
                "an order is pending twice: {wallet}"
            );
            let credited_ids: HashSet<&str> = ledger["ledger"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["order_id"].as_str().unwrap())
                .collect();
            for order in acked_before.keys() {
                assert!(
                    pending_ids.contains(order.as_str()) || credited_ids.contains(order.as_str()),
                    "acknowledged {order} is neither pending nor credited"
                );
            }
            let accounted =
                wallet["balances"]["activity"].as_i64().unwrap() + sum(pending, "amount");
            assert!(
                accounted >= acked_before.values().sum::<i64>(),
                "{uid}: {accounted} < acknowledged"
            );
            assert!(
                accounted <= sent_by_now,
                "{uid}: {accounted} > sent {sent_by_now}: counted twice"
            );
            samples_with_backlog += usize::from(!pending.is_empty());
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        samples_with_backlog
    };
    let (_, samples_with_backlog) = tokio::join!(burst, sampler);
    assert!(
        samples_with_backlog > 0,
        "the throttled lane never had a backlog: the test proved nothing"
    );
    let acked = acked.into_inner().unwrap();
    for (uid, orders) in &acked {
        let total: i64 = orders.values().sum();
        app.wait_wallet(uid, "all credited", |w| {
            w["pending"].as_array().unwrap().is_empty() && w["balances"]["activity"] == total
        })
        .await;
    }
}

async fn tokens_of(app: &TestApp, uid: &str) -> Vec<String> {
    let (status, list) = app
        .get(&format!("/v1/wallets/{uid}/rewards"), Some(GATEWAY))
        .await;
    assert_eq!(status, 200);
    list.as_array()
        .unwrap()
        .iter()
        .map(|r| r["token"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn force_credit_racing_the_lane_credits_each_reward_once() {
    // Goal: the user force-credits every token while the (slow) lane credits the same rewards:
    // each order is credited exactly once, by one path or the other, and the balance is exact.
    let app = spawn_app_with(|c| c.rewards.cash_per_s = 20);
    let rewards = 200;
    let mut tokens = Vec::new();
    for i in 0..rewards {
        let (status, body) = app.reward("race", &format!("race-{i}"), "racer", 10).await;
        assert_eq!(status, 202);
        tokens.push(body["token"].as_str().unwrap().to_owned());
    }
    // Chunks of 20 keep each body under the test server's 4 KiB limit.
    let calls = tokens.chunks(20).map(|chunk| {
        let body = serde_json::json!({ "tokens": chunk }).to_string();
        let app = &app;
        async move {
            app.post("/v1/wallets/racer/force-credit", Some(GATEWAY), &body)
                .await
        }
    });
    let mut by_force = HashSet::new();
    for (status, body) in join_all(calls).await {
        assert_eq!(status, 200, "{body}");
        assert!(body["refused"].as_array().unwrap().is_empty());
        for id in body["credited"].as_array().unwrap() {
            assert!(
                by_force.insert(id.as_str().unwrap().to_owned()),
                "credited twice by force"
            );
        }
    }
    let wallet = app
        .wait_wallet("racer", "settled", |w| {
            w["pending"].as_array().unwrap().is_empty()
        })
        .await;
    assert_eq!(wallet["balances"]["activity"], rewards * 10);
    // A second force-credit of everything credits nothing.
    let body = serde_json::json!({ "tokens": &tokens[..20] }).to_string();
    let (_, again) = app
        .post("/v1/wallets/racer/force-credit", Some(GATEWAY), &body)
        .await;
    assert!(again["credited"].as_array().unwrap().is_empty());
    assert_eq!(again["already"].as_array().unwrap().len(), 20);
    let (_, ledger) = app
        .get("/v1/wallets/racer/ledger?limit=500", Some(GATEWAY))
        .await;
    let orders: Vec<&str> = ledger["ledger"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["order_id"].as_str().unwrap())
        .collect();
    assert_eq!(orders.len(), rewards as usize);
    assert_eq!(
        orders.iter().collect::<HashSet<_>>().len(),
        rewards as usize
    );
    assert!(
        !by_force.is_empty() && by_force.len() < rewards as usize,
        "the race had one winner only: {}",
        by_force.len()
    );
    assert_eq!(tokens_of(&app, "racer").await.len(), 100);
}

#[tokio::test]
async fn forged_altered_and_foreign_tokens_credit_nothing_and_are_counted() {
    // Goal: a bad token fails the whole call (401), another user's token is 403, and metrics
    // count both; nothing is credited.
    let app = spawn_app_with(|c| c.rewards.cash_per_s = 1);
    app.reward("t", "warmup", "owner", 1).await; // takes the lane's only token for a second
    let (_, body) = app.reward("t", "t1", "owner", 500).await;
    let token = body["token"].as_str().unwrap().to_owned();
    let forged = format!("{}x", &token[..token.len() - 1]);
    let call = |tokens: Vec<String>, uid: &str| {
        let body = serde_json::json!({ "tokens": tokens }).to_string();
        let path = format!("/v1/wallets/{uid}/force-credit");
        let app = &app;
        async move { app.post(&path, Some(GATEWAY), &body).await }
    };
    let (status, error) = call(vec![token.clone(), forged], "owner").await;
    assert_eq!(
        (status, error["code"].as_str()),
        (401, Some("invalid_token"))
    );
    let (status, error) = call(vec!["hb1.bm90.aGk".into()], "owner").await;
    assert_eq!(
        (status, error["code"].as_str()),
        (401, Some("invalid_token"))
    );
    let (status, error) = call(vec![token.clone()], "thief").await;
    assert_eq!(
        (status, error["code"].as_str()),
        (403, Some("token_uid_mismatch"))
    );
    assert_eq!(call(vec![], "owner").await.0, 422);
    let wallet = app.wallet("thief").await;
    assert_eq!(wallet["balances"]["activity"], 0);
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let refused = |reason: &str| -> u64 {
        let name = format!("hongbao_reward_tokens_refused_total{{reason=\"{reason}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&name))
            .map(|v| v.parse().unwrap())
            .unwrap_or(0)
    };
    assert_eq!(
        refused("bad_signature") + refused("malformed"),
        2,
        "{metrics}"
    );
    assert_eq!(refused("other_uid"), 1);
    // The genuine token credits at once.
    let (status, ok) = call(vec![token], "owner").await;
    assert_eq!(status, 200);
    assert_eq!(ok["credited"], serde_json::json!(["t1"]));
}

#[tokio::test]
async fn retries_return_the_same_token_and_other_payloads_conflict() {
    // Goal: idempotent intake: same order and payload -> same 202 body; another payload -> 409.
    let app = spawn_app();
    let first = app.reward("idem", "o-1", "u1", 88).await;
    assert_eq!(first.0, 202);
    assert_eq!(app.reward("idem", "o-1", "u1", 88).await, first);
    let (status, error) = app.reward("idem", "o-1", "u1", 89).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (409, Some("idempotency_conflict"))
    );
    let (status, error) = app.reward("idem", "o-1", "u2", 88).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (409, Some("idempotency_conflict"))
    );
    // Validation.
    assert_eq!(
        app.reward_of("idem", "o-2", "u1", "gold", 1).await.1["code"],
        "invalid_kind"
    );
    assert_eq!(
        app.reward_of("idem", "o-2", "u1", "coupon", 1).await.1["code"],
        "batch_id_required"
    );
    assert_eq!(
        app.reward("idem", "o-2", "u1", 0).await.1["code"],
        "invalid_amount"
    );
    assert_eq!(
        app.reward("idem", "bad id", "u1", 1).await.1["code"],
        "invalid_id"
    );
    let (status, _) = app.post("/v1/rewards", Some(GATEWAY), &serde_json::json!({"order_id":"x","uid":"u","activity_id":"a","scene":"s","kind":"cash","amount":1}).to_string()).await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn scenario_shortcuts_derive_their_order_ids() {
    // Goal: rain is once per user per round, fireworks and cards once per user (R7).
    let app = spawn_app();
    let rain = |round: &'static str| {
        let app = &app;
        async move {
            app.post(
                &format!("/v1/activities/cny/rain/{round}/rewards"),
                Some(ISSUER),
                r#"{"uid":"u7","amount":66}"#,
            )
            .await
        }
    };
    let (status, body) = rain("1").await;
    assert_eq!(
        (status, body["order_id"].as_str()),
        (202, Some("rain:cny:1:u7"))
    );
    assert_eq!(rain("1").await, (status, body));
    assert_eq!(rain("2").await.1["order_id"], "rain:cny:2:u7");
    let (status, body) = app
        .post(
            "/v1/activities/cny/fireworks/rewards",
            Some(ISSUER),
            r#"{"uid":"u7","amount":5,"kind":"subsidy"}"#,
        )
        .await;
    assert_eq!(
        (status, body["order_id"].as_str()),
        (202, Some("fireworks:cny:u7"))
    );
    let (status, body) = app
        .post(
            "/v1/activities/cny/cards/rewards",
            Some(ISSUER),
            r#"{"uid":"u7","amount":1,"kind":"item"}"#,
        )
        .await;
    assert_eq!(
        (status, body["order_id"].as_str()),
        (202, Some("cards:cny:u7"))
    );
    let wallet = app
        .wait_wallet("u7", "credits", |w| {
            w["pending"].as_array().unwrap().is_empty() && w["balances"]["subsidy"] == 5
        })
        .await;
    assert_eq!(wallet["balances"]["activity"], 132);
    let (status, item) = app.get("/v1/rewards/cards:cny:u7", Some(ISSUER)).await;
    // An item is delivered, not credited: no balance moves.
    assert_eq!((status, item["status"].as_str()), (200, Some("delivered")));
    assert_eq!(app.get("/v1/rewards/nope", Some(ISSUER)).await.0, 404);
}

#[tokio::test]
async fn budgets_can_be_required_and_unknown_activities_are_404() {
    // Goal: --require-budgets refuses rewards for activities without a budget.
    let app = spawn_app_with(|c| c.rewards.require_budgets = true);
    let (status, error) = app.reward("unbudgeted", "o", "u", 1).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (409, Some("budget_not_set"))
    );
    app.set_budget("budgeted", 10, 0).await;
    // Order ids are global (R4): "o" stays bound to the unbudgeted activity's request.
    assert_eq!(app.reward("budgeted", "o2", "u", 10).await.0, 202);
    let (status, error) = app.reward_of("budgeted", "s", "u", "subsidy", 1).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (409, Some("budget_exhausted"))
    );
    assert_eq!(
        app.get("/v1/admin/activities/never-seen", Some(ADMIN))
            .await
            .0,
        404
    );
}

#[tokio::test]
async fn pausing_the_lanes_keeps_rewards_pending_until_they_resume() {
    // Goal: the reward_lanes switch pauses crediting (peak shaving by hand) without refusing
    // intake; turning it back on credits the backlog. Unknown switches are 404.
    let app = spawn_app();
    let (status, all) = app
        .put(
            "/v1/admin/switches/reward_lanes",
            Some(ADMIN),
            r#"{"on":false}"#,
        )
        .await;
    assert_eq!((status, all["reward_lanes"].as_bool()), (200, Some(false)));
    for i in 0..20 {
        assert_eq!(
            app.reward("pause", &format!("p{i}"), "paused-user", 5)
                .await
                .0,
            202
        );
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let wallet = app.wallet("paused-user").await;
    assert_eq!(wallet["pending"].as_array().unwrap().len(), 20);
    assert_eq!(wallet["balances"]["activity"], 0);
    let (_, listed) = app.get("/v1/admin/switches", Some(ADMIN)).await;
    assert_eq!(listed["reward_lanes"], false);
    assert_eq!(
        app.put(
            "/v1/admin/switches/reward_lanes",
            Some(GATEWAY),
            r#"{"on":true}"#
        )
        .await
        .0,
        403
    );
    assert_eq!(
        app.put("/v1/admin/switches/no_such", Some(ADMIN), r#"{"on":true}"#)
            .await
            .1["code"],
        "unknown_switch"
    );
    assert_eq!(
        app.put(
            "/v1/admin/switches/reward_lanes",
            Some(ADMIN),
            r#"{"on":true}"#
        )
        .await
        .0,
        200
    );
    app.wait_wallet("paused-user", "credits after resume", |w| {
        w["balances"]["activity"] == 100
    })
    .await;
}

/// Polls `GET /v1/rewards/{order}` until its status is no longer `accepted`, at most 30 s.
async fn wait_reward_settled(app: &TestApp, order: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (status, reward) = app.get(&format!("/v1/rewards/{order}"), Some(ISSUER)).await;
        assert_eq!(status, 200, "{reward}");
        if reward["status"] != "accepted" {
            return reward;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "reward {order} still pending: {reward}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_coupon_reward_ends_delivered_when_issued_and_failed_when_refused() {
    // Goal (R1, R6): a coupon reward does not stay pending: the one its batch issues ends
    // delivered, the one refused (sold out) ends failed; neither stays a pending line in the
    // wallet, and the coupon pending gauge falls back to 0.
    let app = spawn_app();
    let batch =
        serde_json::json!({"batch_id": "cr", "stock": 1, "per_user_limit": 1, "value": 500});
    let (status, body) = app
        .post("/v1/coupon-batches", Some(ADMIN), &batch.to_string())
        .await;
    assert_eq!(status, 201, "{body}");
    let coupon = |order: &str, uid: &str| {
        serde_json::json!({"order_id": order, "uid": uid, "activity_id": "camp", "scene": "s",
               "kind": "coupon", "amount": 1, "batch_id": "cr"})
        .to_string()
    };
    let (status, body) = app
        .post("/v1/rewards", Some(ISSUER), &coupon("cr-1", "cra"))
        .await;
    assert_eq!(status, 202, "{body}");
    let issued = wait_reward_settled(&app, "cr-1").await;
    assert_eq!(issued["status"], "delivered", "{issued}");
    // The stock is gone: the next one is refused.
    let (status, body) = app
        .post("/v1/rewards", Some(ISSUER), &coupon("cr-2", "crb"))
        .await;
    assert_eq!(status, 202, "{body}");
    let refused = wait_reward_settled(&app, "cr-2").await;
    assert_eq!(refused["status"], "failed", "{refused}");
    assert_eq!(refused["reason"], "sold_out", "{refused}");
    for uid in ["cra", "crb"] {
        let wallet = app.wallet(uid).await;
        assert!(
            wallet["pending"].as_array().unwrap().is_empty(),
            "{uid}: {wallet}"
        );
    }
    let (_, coupons) = app.get("/v1/wallets/cra/coupons", Some(GATEWAY)).await;
    assert_eq!(coupons.as_array().unwrap().len(), 1, "{coupons}");
    assert_eq!(
        metric(
            &app.metrics_text().await,
            "hongbao_reward_pending{kind=\"coupon\"}"
        ),
        Some(0.0)
    );
}

#[tokio::test]
async fn an_order_id_used_in_one_activity_is_refused_in_every_other() {
    // Goal (R4): one order id, one reward, whatever the activity, uid or kind: a reuse is
    // refused at intake (409 idempotency_conflict) and takes no second budget; the original
    // request still replays, and a shortcut's derived order id is covered too.
    let app = spawn_app();
    app.set_budget("first", 1_000, 1_000).await;
    app.set_budget("second", 1_000, 1_000).await;
    let original = app.reward("first", "dup", "u5", 300).await;
    assert_eq!(original.0, 202, "{}", original.1);
    for (activity, uid, kind) in [
        ("second", "u5", "cash"),
        ("second", "u6", "cash"),
        ("second", "u6", "subsidy"),
        ("second", "u5", "item"),
    ] {
        let (status, error) = app.reward_of(activity, "dup", uid, kind, 300).await;
        assert_eq!(
            (status, error["code"].as_str()),
            (409, Some("idempotency_conflict")),
            "{activity}/{uid}/{kind}: {error}"
        );
    }
    assert_eq!(app.reward("first", "dup", "u5", 300).await, original);
    let (status, body) = app
        .post(
            "/v1/activities/first/rain/1/rewards",
            Some(ISSUER),
            r#"{"uid":"u7","amount":5}"#,
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let (status, error) = app.reward("second", "rain:first:1:u7", "u7", 5).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (409, Some("idempotency_conflict")),
        "{error}"
    );
    let (_, second) = app.get("/v1/admin/activities/second", Some(ADMIN)).await;
    assert_eq!(
        second["accepted"],
        serde_json::json!({"cash": 0, "subsidy": 0})
    );
    let wallet = app
        .wait_wallet("u5", "the one credit", |w| {
            w["pending"].as_array().unwrap().is_empty() && w["balances"]["activity"] == 300
        })
        .await;
    assert_eq!(wallet["balances"]["subsidy"], 0);
    assert!(app.wallet("u6").await["pending"]
        .as_array()
        .unwrap()
        .is_empty());
    let (_, status) = app.get("/v1/rewards/dup", Some(ISSUER)).await;
    assert_eq!(
        (status["activity_id"].as_str(), status["status"].as_str()),
        (Some("first"), Some("credited"))
    );
}

#[tokio::test]
async fn a_reward_refused_for_budget_passes_on_retry_after_a_raise() {
    // Goal: a refusal records nothing that blocks the same request later: 409
    // budget_exhausted, the budget is raised, the identical retry is accepted (the order id's
    // claim is kept and replays); another payload under that order id stays a conflict.
    let app = spawn_app();
    app.set_budget("tight", 100, 0).await;
    let (status, error) = app.reward("tight", "big", "u1", 150).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (409, Some("budget_exhausted"))
    );
    assert_eq!(app.set_budget("tight", 200, 0).await.0, 200);
    let (status, body) = app.reward("tight", "big", "u1", 150).await;
    assert_eq!(status, 202, "{body}");
    let (status, error) = app.reward("tight", "big", "u1", 50).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (409, Some("idempotency_conflict"))
    );
}

#[tokio::test]
async fn one_order_id_raced_from_many_activities_is_accepted_exactly_once() {
    // Goal (R4) under concurrency: 40 requests with one order id, each for its own activity
    // and uid, race (and are merged into shared claim commands): exactly one is accepted, the
    // 39 others get 409 idempotency_conflict, and one activity alone holds the reward; 40
    // distinct order ids sent alongside are all accepted.
    let app = spawn_app();
    let replies = join_all((0..40).map(|i| {
        let app = &app;
        async move {
            let raced = app
                .reward(&format!("race{i}"), "raced", &format!("ru{i}"), 10)
                .await;
            let own = app
                .reward(
                    &format!("race{i}"),
                    &format!("own-{i}"),
                    &format!("ru{i}"),
                    10,
                )
                .await;
            (raced, own)
        }
    }))
    .await;
    let raced: Vec<u16> = replies.iter().map(|((s, _), _)| *s).collect();
    assert_eq!(raced.iter().filter(|s| **s == 202).count(), 1, "{raced:?}");
    assert_eq!(raced.iter().filter(|s| **s == 409).count(), 39, "{raced:?}");
    for ((status, body), (own, _)) in &replies {
        if *status == 409 {
            assert_eq!(body["code"], "idempotency_conflict");
        }
        assert_eq!(*own, 202);
    }
    let (status, reward) = app.get("/v1/rewards/raced", Some(ISSUER)).await;
    assert_eq!(status, 200, "{reward}");
    assert!(reward.get("also_in").is_none(), "{reward}");
}
