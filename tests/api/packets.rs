//! Red packets against the real server: a hot packet, audience, expiry refund, B2C subsidy
//! used once, switches, payment refused with nothing moved.

use super::{metric, spawn_app, spawn_app_clocked, spawn_app_with, TestApp, ADMIN, GATEWAY};
use futures::future::join_all;
use hongbao::clock::ManualClock;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn create(app: &TestApp, body: Value) -> (u16, Value) {
    app.post("/v1/packets", Some(GATEWAY), &body.to_string())
        .await
}

async fn claim(app: &TestApp, packet: &str, uid: &str) -> (u16, Value) {
    app.post(
        &format!("/v1/packets/{packet}/claims"),
        Some(GATEWAY),
        &json!({ "uid": uid }).to_string(),
    )
    .await
}

/// Claims like a client: on 429 waits `retry_after_ms` and tries again, at most 10 times.
async fn claim_polling(app: &TestApp, packet: &str, uid: &str) -> (u16, Value) {
    let mut last = (0, Value::Null);
    for _ in 0..10 {
        last = claim(app, packet, uid).await;
        if last.0 != 429 {
            return last;
        }
        let wait = last.1["retry_after_ms"].as_u64().unwrap_or(100);
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
    last
}

async fn details(app: &TestApp, packet: &str) -> Value {
    let (status, body) = app
        .get(&format!("/v1/packets/{packet}"), Some(GATEWAY))
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn c2c_paid(app: &TestApp, packet: &str, sender: &str, total: i64, count: u32, extra: Value) {
    app.deposit(sender, &format!("top-{packet}"), total).await;
    let mut body = json!({"packet_id": packet, "sender_uid": sender, "mode": "c2c", "total": total, "count": count, "split": "lucky"});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (status, created) = create(app, body).await;
    assert_eq!(
        (status, created["state"].as_str()),
        (201, Some("pending_payment")),
        "{created}"
    );
    let (status, paid) = app
        .post(
            &format!("/v1/packets/{packet}/pay"),
            Some(GATEWAY),
            r#"{"payment_id":"pay-1"}"#,
        )
        .await;
    assert_eq!(
        (status, paid["state"].as_str()),
        (200, Some("active")),
        "{paid}"
    );
}

#[tokio::test]
async fn a_hot_packet_of_50_shares_has_exactly_50_winners_summing_to_the_total() {
    // Goal: 300 concurrent claimers (polling on 429 as clients do): exactly 50 get a share,
    // the rest learn it is empty; shares sum to the total; each winner is credited its share.
    let app = spawn_app();
    c2c_paid(&app, "hot", "boss", 10_000, 50, json!({})).await;
    let replies = join_all((0..300).map(|i| {
        let app = &app;
        async move {
            (
                format!("fan{i}"),
                claim_polling(app, "hot", &format!("fan{i}")).await,
            )
        }
    }))
    .await;
    let winners: Vec<(&String, i64)> = replies
        .iter()
        .filter(|(_, (s, _))| *s == 200)
        .map(|(u, (_, b))| (u, b["amount"].as_i64().unwrap()))
        .collect();
    assert_eq!(winners.len(), 50);
    assert_eq!(winners.iter().map(|(_, a)| a).sum::<i64>(), 10_000);
    assert!(winners.iter().all(|(_, a)| *a >= 1));
    for (_, (status, body)) in replies.iter().filter(|(_, (s, _))| *s != 200) {
        assert_eq!(
            (*status, body["code"].as_str()),
            (410, Some("packet_empty")),
            "{body}"
        );
    }
    let packet = details(&app, "hot").await;
    assert_eq!(packet["state"], "exhausted");
    assert_eq!(
        (
            packet["remaining_count"].as_i64(),
            packet["remaining_amount"].as_i64()
        ),
        (Some(0), Some(0))
    );
    assert_eq!(packet["claims"].as_array().unwrap().len(), 50);
    let best = packet["best_luck_uid"].as_str().unwrap();
    let top = winners.iter().map(|(_, a)| *a).max().unwrap();
    assert!(winners.iter().any(|(u, a)| u.as_str() == best && *a == top));
    // Transfers are asynchronous: each winner's change balance ends at its share (claims
    // recorded in merged lots are transferred one by one, like single ones).
    for (uid, amount) in &winners {
        app.wait_wallet(uid, "share transferred", |w| {
            w["balances"]["change"] == *amount
        })
        .await;
    }
    // A winner asking again gets the same share.
    let (uid, amount) = winners[0];
    assert_eq!(
        claim(&app, "hot", uid).await.1["amount"].as_i64(),
        Some(amount)
    );
}

#[tokio::test]
async fn a_hot_packets_transfers_wait_while_its_claims_queue_and_land_while_it_stays_busy() {
    // Goal (issue 14): while a packet's claims queue (every claim command it may have in
    // flight is), its winners' transfers are held back, so the journal's flushes go to the
    // claims; P6 still holds: every winner is credited while the packet stays busy (the
    // bound, `HOT_DEFERRAL_MAX`, is unit-tested in `flows::packets`). 16 clients claim again and again (each won once, then gets
    // its share again: a command all the same) while 100 others win a share each.
    let app = Arc::new(spawn_app());
    c2c_paid(&app, "busy", "boss", 100_000, 1_000, json!({})).await;
    let hammering = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let hammers: Vec<_> = (0..16)
        .map(|i| {
            let (app, hammering) = (app.clone(), hammering.clone());
            tokio::spawn(async move {
                let uid = format!("ham{i}");
                let mut claims = 0u64;
                while hammering.load(std::sync::atomic::Ordering::SeqCst) {
                    let (status, body) = claim_polling(&app, "busy", &uid).await;
                    assert_eq!(status, 200, "{uid}: {body}");
                    claims += 1;
                }
                claims
            })
        })
        .collect();
    let winners = join_all((0..100).map(|i| {
        let app = &app;
        async move {
            let uid = format!("fan{i}");
            let (status, body) = claim_polling(app, "busy", &uid).await;
            assert_eq!(status, 200, "{uid}: {body}");
            (uid, body["amount"].as_i64().unwrap())
        }
    }))
    .await;
    // Every winner credited while the claims go on.
    let started = Instant::now();
    for (uid, amount) in &winners {
        app.wait_wallet(uid, "share transferred while the packet is hot", |w| {
            w["balances"]["change"] == *amount
        })
        .await;
    }
    let waited = started.elapsed();
    let deferred = metric(
        &app.metrics_text().await,
        "hongbao_packet_transfers_deferred_total",
    );
    hammering.store(false, std::sync::atomic::Ordering::SeqCst);
    let mut repeats = 0;
    for hammer in hammers {
        repeats += hammer.await.unwrap();
    }
    assert!(
        deferred.is_some_and(|d| d > 0.0),
        "no transfer was held back while {repeats} claims kept the packet hot: {deferred:?}"
    );
    assert!(
        repeats > 16,
        "the hammers did not keep claiming ({repeats})"
    );
    eprintln!("hot packet: {deferred:?} transfers held back, every winner credited {waited:?} after the last win, {repeats} repeated claims");
}

#[tokio::test]
async fn only_the_audience_may_claim_and_unpaid_packets_give_nothing() {
    // Goal: 403 not_in_audience for others; 409 not_paid before payment; a payment refused for
    // lack of balance moves nothing and leaves the packet waiting.
    let app = spawn_app();
    let (status, _) = create(
        &app,
        json!({"packet_id": "aud", "sender_uid": "poor", "mode": "c2c", "total": 500, "count": 2,
        "split": "even", "audience": {"uids": ["friend1", "friend2"]}}),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(claim(&app, "aud", "friend1").await.1["code"], "not_paid");
    let (status, error) = app
        .post(
            "/v1/packets/aud/pay",
            Some(GATEWAY),
            r#"{"payment_id":"p"}"#,
        )
        .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (409, Some("insufficient_balance"))
    );
    assert_eq!(details(&app, "aud").await["state"], "pending_payment");
    assert_eq!(app.wallet("poor").await["balances"]["change"], 0);
    app.deposit("poor", "top", 500).await;
    assert_eq!(
        app.post(
            "/v1/packets/aud/pay",
            Some(GATEWAY),
            r#"{"payment_id":"p"}"#
        )
        .await
        .0,
        200
    );
    assert_eq!(
        app.wallet("poor").await["balances"]["change"],
        0,
        "debited into escrow"
    );
    let (status, error) = claim(&app, "aud", "stranger").await;
    assert_eq!(
        (status, error["code"].as_str()),
        (403, Some("not_in_audience"))
    );
    let (status, share) = claim(&app, "aud", "friend2").await;
    assert_eq!((status, share["amount"].as_i64()), (200, Some(250)));
    // Bad input.
    let (status, error) = create(&app, json!({"packet_id": "bad", "sender_uid": "x", "mode": "c2c", "total": 2, "count": 3, "split": "lucky"})).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (422, Some("invalid_shares"))
    );
    let (status, _) = create(&app, json!({"packet_id": "bad", "sender_uid": "x", "mode": "c3c", "total": 2, "count": 1, "split": "lucky"})).await;
    assert_eq!(status, 422);
    assert_eq!(app.get("/v1/packets/nope", Some(GATEWAY)).await.0, 404);
}

#[tokio::test]
async fn an_expired_packet_refunds_its_remainder_once_within_about_a_second() {
    // Goal: P4: at the deadline the unclaimed remainder goes back to the sender's change once;
    // the state reads expired; later claims are 410 packet_expired.
    let app = spawn_app();
    c2c_paid(
        &app,
        "short",
        "sender",
        1_000,
        4,
        json!({"expires_in_s": 1}),
    )
    .await;
    let (_, first) = claim(&app, "short", "quick").await;
    let claimed = first["amount"].as_i64().unwrap();
    let created = Instant::now();
    let wallet = app
        .wait_wallet("sender", "refund", |w| {
            w["balances"]["change"] == 1_000 - claimed
        })
        .await;
    assert!(
        created.elapsed() < Duration::from_secs(3),
        "refund took {:?}",
        created.elapsed()
    );
    let refunds: Vec<&Value> = wallet["ledger"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["entry"] == "packet_refund")
        .collect();
    assert_eq!(refunds.len(), 1);
    assert_eq!(refunds[0]["amount"].as_i64(), Some(1_000 - claimed));
    let packet = details(&app, "short").await;
    assert_eq!(
        (packet["state"].as_str(), packet["refunded"].as_i64()),
        (Some("expired"), Some(1_000 - claimed))
    );
    let (status, error) = claim(&app, "short", "late").await;
    assert_eq!(
        (status, error["code"].as_str()),
        (410, Some("packet_expired"))
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        app.wallet("sender").await["balances"]["change"],
        1_000 - claimed,
        "refunded once"
    );
}

async fn subsidy_token(app: &TestApp, order: &str, uid: &str, amount: i64) -> String {
    let (status, body) = app
        .reward_of("campaign", order, uid, "subsidy", amount)
        .await;
    assert_eq!(status, 202, "{body}");
    body["token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_b2c_subsidy_pays_one_packet_once_and_its_remainder_returns_to_the_budget() {
    // Goal: P1: the subsidy is credited and consumed exactly once (a second packet is a 409),
    // the packet is active at once, claims land in activity balances (withdrawable), and at
    // expiry the remainder returns to the campaign's subsidy budget.
    let app = spawn_app();
    app.set_budget("campaign", 1_000, 10_000).await;
    let token = subsidy_token(&app, "sub-1", "brand", 3_000).await;
    let b2c = |packet: &str, token: &str, total: i64| {
        json!({"packet_id": packet, "sender_uid": "brand", "mode": "b2c", "total": total, "count": 3, "split": "even",
            "subsidy_token": token, "expires_in_s": 1})
    };
    let (status, error) = create(&app, b2c("b-x", &token, 2_999)).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (422, Some("total_mismatch"))
    );
    let (status, created) = create(&app, b2c("b-1", &token, 3_000)).await;
    assert_eq!((status, created["state"].as_str()), (201, Some("active")));
    assert_eq!(
        create(&app, b2c("b-1", &token, 3_000)).await.0,
        201,
        "a retry replays"
    );
    let (status, error) = create(&app, b2c("b-2", &token, 3_000)).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (409, Some("subsidy_used"))
    );
    let (status, share) = claim(&app, "b-1", "shopper").await;
    assert_eq!((status, share["amount"].as_i64()), (200, Some(1_000)));
    app.wait_wallet("shopper", "B2C share in activity", |w| {
        w["balances"]["activity"] == 1_000
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, activity) = app.get("/v1/admin/activities/campaign", Some(ADMIN)).await;
        if activity["accepted"]["subsidy"] == 1_000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "remainder never returned to the budget: {activity}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        app.wallet("brand").await["balances"]["subsidy"],
        0,
        "the subsidy went into the packet"
    );
    // Tokens of other users or of cash rewards cannot pay a B2C packet.
    let other = subsidy_token(&app, "sub-2", "someone-else", 300).await;
    let (status, error) = create(&app, b2c("b-3", &other, 300)).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (403, Some("token_uid_mismatch"))
    );
    let (status, cash) = app.reward("campaign", "cash-1", "brand", 300).await;
    assert_eq!(status, 202, "{cash}");
    let (status, error) = create(&app, b2c("b-4", cash["token"].as_str().unwrap(), 300)).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (422, Some("not_a_subsidy"))
    );
}

#[tokio::test]
async fn subsidy_issuance_is_idempotent_by_order_number_even_with_another_uid() {
    // Goal: P1: a retry of a subsidy with the same external order number but another uid does
    // not issue a second subsidy (409), the first stands.
    let app = spawn_app();
    let first = app
        .reward_of("campaign", "ext-77", "user-a", "subsidy", 500)
        .await;
    assert_eq!(first.0, 202);
    let (status, error) = app
        .reward_of("campaign", "ext-77", "user-b", "subsidy", 500)
        .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (409, Some("idempotency_conflict"))
    );
    app.wait_wallet("user-a", "subsidy credited", |w| {
        w["balances"]["subsidy"] == 500
    })
    .await;
    assert_eq!(app.wallet("user-b").await["balances"]["subsidy"], 0);
}

#[tokio::test]
async fn switches_turn_off_c2c_sending_and_token_merging() {
    // Goal: P9: c2c_send off gives a friendly 503 (B2C unaffected); token_merge off drops
    // pending tokens from listings, credited ones remain.
    let app = spawn_app_with(|c| c.rewards.cash_per_s = 1);
    app.put(
        "/v1/admin/switches/c2c_send",
        Some(ADMIN),
        r#"{"on":false}"#,
    )
    .await;
    let (status, error) = create(&app, json!({"packet_id": "off", "sender_uid": "s", "mode": "c2c", "total": 10, "count": 1, "split": "even"})).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (503, Some("c2c_send_off"))
    );
    assert!(error["message"].as_str().unwrap().contains("try again"));
    app.put("/v1/admin/switches/c2c_send", Some(ADMIN), r#"{"on":true}"#)
        .await;
    let (status, _) = create(&app, json!({"packet_id": "on", "sender_uid": "s", "mode": "c2c", "total": 10, "count": 1, "split": "even"})).await;
    assert_eq!(status, 201);

    // One cash reward credited, one still pending behind the 1/s lane.
    app.reward("merge", "m-1", "lister", 5).await;
    app.reward("merge", "m-2", "lister", 6).await;
    app.wait_wallet("lister", "first credit", |w| w["balances"]["activity"] == 5)
        .await;
    let merged = listed(&app).await;
    assert!(
        merged.contains(&("m-2".into(), "accepted".into())),
        "{merged:?}"
    );
    app.put(
        "/v1/admin/switches/token_merge",
        Some(ADMIN),
        r#"{"on":false}"#,
    )
    .await;
    let degraded = listed(&app).await;
    assert_eq!(
        degraded,
        HashSet::from([("m-1".to_string(), "credited".to_string())])
    );
}

async fn listed(app: &TestApp) -> HashSet<(String, String)> {
    let (_, list) = app.get("/v1/wallets/lister/rewards", Some(GATEWAY)).await;
    list.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["order_id"].as_str().unwrap().to_owned(),
                r["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Polls a packet's details until it is expired with its refund recorded, at most 10 s.
async fn wait_refunded(app: &TestApp, packet: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body = details(app, packet).await;
        if body["state"] == "expired" && body.get("refunded").is_some() {
            return body;
        }
        assert!(Instant::now() < deadline, "{packet} never refunded: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn paying_after_the_deadline_is_409_packet_expired_and_moves_nothing() {
    // Goal: P2 with P4: on the manual clock, a pay request that arrives at the deadline is
    // refused before any debit, before and after the expiry flow has run.
    let clock = ManualClock::new(1_800_000_000_000);
    let app = spawn_app_clocked(Arc::new(clock.clone()), |_| {});
    app.deposit("late-sender", "top-late", 1_000).await;
    let body = json!({"packet_id": "late", "sender_uid": "late-sender", "mode": "c2c",
        "total": 300, "count": 3, "split": "even", "expires_in_s": 60});
    assert_eq!(create(&app, body).await.0, 201);
    clock.advance_ms(60_000);
    for _ in 0..2 {
        let (status, error) = app
            .post(
                "/v1/packets/late/pay",
                Some(GATEWAY),
                r#"{"payment_id":"p"}"#,
            )
            .await;
        assert_eq!(
            (status, error["code"].as_str()),
            (409, Some("packet_expired")),
            "{error}"
        );
        assert_eq!(app.wallet("late-sender").await["balances"]["change"], 1_000);
        wait_refunded(&app, "late").await;
    }
}

#[tokio::test]
async fn payments_racing_the_deadline_end_paid_and_refunded_or_never_debited() {
    // Goal: P2/P4 under a real race: 30 packets are paid concurrently while the clock jumps
    // past their deadline. Whatever each answer was, once expiry has run the sender has every
    // fen back (nobody claimed), each 200 was refunded in full and each 409 debited nothing.
    let clock = ManualClock::new(1_800_000_000_000);
    let app = spawn_app_clocked(Arc::new(clock.clone()), |_| {});
    let n = 30;
    app.deposit("racer", "top-racer", 50 * n).await;
    for i in 0..n {
        let body = json!({"packet_id": format!("race-{i}"), "sender_uid": "racer", "mode": "c2c",
            "total": 50, "count": 5, "split": "lucky", "expires_in_s": 60});
        assert_eq!(create(&app, body).await.0, 201);
    }
    clock.advance_ms(59_990);
    let pays = join_all((0..n).map(|i| {
        let app = &app;
        async move {
            app.post(
                &format!("/v1/packets/race-{i}/pay"),
                Some(GATEWAY),
                r#"{"payment_id":"p"}"#,
            )
            .await
        }
    }));
    let jump = async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        clock.advance_ms(20);
    };
    let (answers, ()) = futures::join!(pays, jump);
    let mut paid = 0;
    for (i, (status, body)) in answers.iter().enumerate() {
        let refunded = wait_refunded(&app, &format!("race-{i}")).await["refunded"].as_i64();
        match (status, body["code"].as_str()) {
            (200, _) => {
                paid += 1;
                assert_eq!(refunded, Some(50), "race-{i} was paid: refunded in full");
            }
            (409, Some("packet_expired")) => assert_eq!(refunded, Some(0), "race-{i}"),
            other => panic!("race-{i}: unexpected answer {other:?}: {body}"),
        }
    }
    let wallet = app.wallet("racer").await;
    assert_eq!(
        wallet["balances"]["change"],
        50 * n,
        "every fen back: {wallet}"
    );
    let (_, page) = app
        .get("/v1/wallets/racer/ledger?limit=200", Some(GATEWAY))
        .await;
    let count = |entry: &str| {
        page["ledger"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["entry"] == entry)
            .count()
    };
    assert_eq!(count("packet_payment"), count("packet_refund"), "{page}");
    assert!(count("packet_payment") >= paid, "{page}");
}

#[tokio::test]
async fn a_flooded_small_packet_admits_at_most_remaining_times_1_5_from_the_first_claim() {
    // Goal: P5 from the first request: 300 users open a fresh packet of 10 shares at once;
    // at most ceil(10 x 1.5) = 15 claims are ever in flight, the rest get 429 busy at once;
    // exactly 10 win.
    let app = spawn_app();
    c2c_paid(&app, "flood", "flood-sender", 1_000, 10, json!({})).await;
    let answers = join_all((0..300).map(|i| {
        let app = &app;
        async move { claim(app, "flood", &format!("f{i}")).await }
    }))
    .await;
    let status = |s: u16| answers.iter().filter(|(st, _)| *st == s).count();
    assert_eq!(status(200), 10, "exactly the shares are won");
    assert!(status(429) > 0, "the first burst must meet the gate");
    assert_eq!(status(200) + status(410) + status(429), 300);
    let peak = metric(
        &app.metrics_text().await,
        "hongbao_packet_claims_in_flight_peak",
    )
    .expect("the peak gauge is exported");
    assert!(
        (1.0..=15.0).contains(&peak),
        "most claims ever in flight on one packet: {peak}, the rule allows 15"
    );
}
