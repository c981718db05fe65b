//! Coupons against the real server: exact stock exhaustion, per-user limits and group
//! exclusion under concurrency, the green channel's answers, risk rules, coupon rewards.

use super::{spawn_app, spawn_app_with, TestApp, ADMIN, GATEWAY, ISSUER};
use futures::future::join_all;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

async fn create_batch(app: &TestApp, body: Value) -> (u16, Value) {
    app.post("/v1/coupon-batches", Some(ADMIN), &body.to_string())
        .await
}

async fn batch(app: &TestApp, id: &str, stock: u64, limit: u32, group: Option<&str>) {
    let mut body = json!({"batch_id": id, "stock": stock, "per_user_limit": limit, "value": 500});
    if let Some(group) = group {
        body["group_id"] = json!(group);
    }
    let (status, created) = create_batch(app, body).await;
    assert_eq!(status, 201, "{created}");
}

async fn issue(app: &TestApp, seq: &str, uid: &str, batch: &str, sync: bool) -> (u16, Value) {
    let body = json!({"seq_no": seq, "uid": uid, "batch_id": batch, "sync": sync});
    app.post("/v1/coupons/issue", Some(ISSUER), &body.to_string())
        .await
}

async fn request(app: &TestApp, seq: &str) -> (u16, Value) {
    app.get(&format!("/v1/coupons/requests/{seq}"), Some(ISSUER))
        .await
}

/// Polls until every request is final (issued or rejected), at most 60 s; returns them.
async fn wait_final(app: &TestApp, seqs: &[String]) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut done = HashMap::new();
    while done.len() < seqs.len() {
        for seq in seqs {
            if done.contains_key(seq) {
                continue;
            }
            let (status, line) = request(app, seq).await;
            if status == 200 && line["status"] != "accepted" {
                done.insert(seq.clone(), line);
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} requests final",
            done.len(),
            seqs.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    seqs.iter().map(|s| done.remove(s).unwrap()).collect()
}

async fn coupons_of(app: &TestApp, uid: &str) -> Vec<Value> {
    let (status, body) = app
        .get(&format!("/v1/wallets/{uid}/coupons"), Some(GATEWAY))
        .await;
    assert_eq!(status, 200, "{body}");
    body.as_array().unwrap().clone()
}

/// Polls the wallet projection until it lists `n` coupons.
async fn wait_coupons(app: &TestApp, uid: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let coupons = coupons_of(app, uid).await;
        if coupons.len() >= n {
            return coupons;
        }
        assert!(Instant::now() < deadline, "{uid} has {coupons:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn count(lines: &[Value], status: &str, reason: Option<&str>) -> usize {
    lines
        .iter()
        .filter(|l| l["status"] == status && reason.is_none_or(|r| l["reason"] == r))
        .count()
}

#[actix_rt::test]
async fn stock_runs_out_exactly_under_concurrent_requests() {
    let app = spawn_app();
    batch(&app, "hot", 60, 1, None).await;
    // 300 users race for 60 coupons, a fifth of them through the green channel.
    let answers = join_all((0..300).map(|i| {
        let app = &app;
        async move {
            let seq = format!("s-{i}");
            let answer = issue(app, &seq, &format!("u{i}"), "hot", i % 5 == 0).await;
            (seq, answer)
        }
    }))
    .await;
    let mut seqs = Vec::new();
    for (seq, (status, body)) in &answers {
        assert!([202, 200, 410].contains(status), "{seq}: {status} {body}");
        if *status == 410 {
            assert_eq!(body["code"], "sold_out", "{body}");
        }
        seqs.push(seq.clone());
    }
    let lines = wait_final(&app, &seqs).await;
    assert_eq!(count(&lines, "issued", None), 60, "{lines:?}");
    assert_eq!(count(&lines, "rejected", Some("sold_out")), 240);
    let coupon_ids: HashSet<_> = lines
        .iter()
        .filter_map(|l| l["coupon_id"].as_str())
        .collect();
    assert_eq!(coupon_ids.len(), 60, "every coupon id is distinct");
    // A green-channel answer is the request's final outcome.
    for ((seq, (status, body)), line) in answers.iter().zip(&lines) {
        match status {
            200 => assert_eq!(
                (line["status"].as_str(), &line["coupon_id"]),
                (Some("issued"), &body["coupon_id"]),
                "{seq}"
            ),
            410 => assert_eq!(line["reason"], "sold_out", "{seq}"),
            _ => {}
        }
    }
    let (status, hot) = app.get("/v1/coupon-batches/hot", Some(ADMIN)).await;
    assert_eq!(status, 200);
    assert_eq!(
        (hot["issued"].as_u64(), hot["remaining"].as_u64()),
        (Some(60), Some(0))
    );
    assert_eq!(hot["stock"], 60);
    // Later requests are refused at once, also through the green channel.
    let (status, body) = issue(&app, "late", "late-user", "hot", true).await;
    assert_eq!((status, body["code"].as_str()), (410, Some("sold_out")));
}

#[actix_rt::test]
async fn per_user_limit_holds_under_concurrent_requests() {
    let app = spawn_app();
    batch(&app, "lim", 1_000, 3, None).await;
    let answers = join_all((0..40).map(|i| {
        let app = &app;
        async move {
            let seq = format!("l-{i}");
            (
                seq.clone(),
                issue(app, &seq, "greedy", "lim", i % 2 == 0).await,
            )
        }
    }))
    .await;
    for (seq, (status, body)) in &answers {
        assert!([200, 202, 409].contains(status), "{seq}: {status} {body}");
        if *status == 409 {
            assert_eq!(body["code"], "user_limit", "{body}");
        }
    }
    let seqs: Vec<String> = answers.iter().map(|(s, _)| s.clone()).collect();
    let lines = wait_final(&app, &seqs).await;
    assert_eq!(count(&lines, "issued", None), 3, "{lines:?}");
    assert_eq!(count(&lines, "rejected", Some("user_limit")), 37);
    let coupons = wait_coupons(&app, "greedy", 3).await;
    assert_eq!(coupons.len(), 3, "{coupons:?}");
    assert!(coupons
        .iter()
        .all(|c| c["batch_id"] == "lim" && c["value"] == 500));
    // Another user is not affected by greedy's limit.
    let (status, body) = issue(&app, "other", "other", "lim", true).await;
    assert_eq!(status, 200, "{body}");
}

#[actix_rt::test]
async fn a_user_holds_coupons_of_one_batch_of_a_group_only() {
    let app = spawn_app();
    batch(&app, "g-a", 1_000, 2, Some("grp")).await;
    batch(&app, "g-b", 1_000, 2, Some("grp")).await;
    batch(&app, "free", 1_000, 2, None).await;
    // Eight users each race requests on both batches of the group.
    let mut requests = Vec::new();
    for u in 0..8 {
        for i in 0..6 {
            let target = if i % 2 == 0 { "g-a" } else { "g-b" };
            requests.push((format!("g-{u}-{i}"), format!("gu{u}"), target, i % 3 == 0));
        }
    }
    let answers = join_all(requests.iter().map(|(seq, uid, target, sync)| {
        let app = &app;
        async move { issue(app, seq, uid, target, *sync).await }
    }))
    .await;
    for (status, body) in &answers {
        assert!([200, 202, 409].contains(status), "{status} {body}");
        if *status == 409 {
            assert!(
                ["user_limit", "group_exclusive"].contains(&body["code"].as_str().unwrap()),
                "{body}"
            );
        }
    }
    let seqs: Vec<String> = requests.iter().map(|r| r.0.clone()).collect();
    let lines = wait_final(&app, &seqs).await;
    for u in 0..8 {
        let uid = format!("gu{u}");
        let mine: Vec<&Value> = lines.iter().filter(|l| l["uid"] == uid.as_str()).collect();
        let batches: HashSet<&str> = mine
            .iter()
            .filter(|l| l["status"] == "issued")
            .map(|l| l["batch_id"].as_str().unwrap())
            .collect();
        assert_eq!(batches.len(), 1, "{uid} got {batches:?}: {mine:?}");
        assert_eq!(
            mine.iter().filter(|l| l["status"] == "issued").count(),
            2,
            "{uid} gets the batch's limit: {mine:?}"
        );
        assert!(mine
            .iter()
            .filter(|l| l["status"] == "rejected")
            .all(|l| l["reason"] == "group_exclusive" || l["reason"] == "user_limit"));
        // A batch outside the group is not excluded.
        let (status, body) = issue(&app, &format!("free-{u}"), &uid, "free", true).await;
        assert_eq!(status, 200, "{body}");
        let coupons = wait_coupons(&app, &uid, 3).await;
        assert_eq!(coupons.len(), 3, "{coupons:?}");
    }
}

#[actix_rt::test]
async fn the_green_channel_answers_and_a_retry_gets_the_same_answer() {
    let app = spawn_app();
    batch(&app, "one", 1, 1, None).await;
    let (status, first) = issue(&app, "g1", "alice", "one", true).await;
    assert_eq!(
        (status, first["status"].as_str()),
        (200, Some("issued")),
        "{first}"
    );
    let coupon = first["coupon_id"].as_str().unwrap().to_owned();
    let (status, again) = issue(&app, "g1", "alice", "one", true).await;
    assert_eq!(
        (status, again["coupon_id"].as_str()),
        (200, Some(coupon.as_str()))
    );
    // An asynchronous retry of the same seq_no is accepted and stays issued.
    let (status, _) = issue(&app, "g1", "alice", "one", false).await;
    assert_eq!(status, 202);
    let (status, line) = request(&app, "g1").await;
    assert_eq!(status, 200);
    assert_eq!(
        (line["status"].as_str(), line["coupon_id"].as_str()),
        (Some("issued"), Some(coupon.as_str()))
    );
    // Sold out, and the same answer on retry.
    for _ in 0..2 {
        let (status, body) = issue(&app, "g2", "bob", "one", true).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (410, Some("sold_out")),
            "{body}"
        );
    }
    let (status, line) = request(&app, "g2").await;
    assert_eq!((status, line["reason"].as_str()), (200, Some("sold_out")));
    // The same seq_no for another user or batch is a conflict, sync or not.
    for sync in [true, false] {
        let (status, body) = issue(&app, "g1", "mallory", "one", sync).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (409, Some("idempotency_conflict"))
        );
    }
    // Unknown batch, closed batch, reserved seq_no, bad input.
    let (status, body) = issue(&app, "g3", "alice", "nope", true).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("unknown_batch")),
        "{body}"
    );
    let (status, body) = issue(&app, "g3b", "alice", "nope", false).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("unknown_batch")),
        "{body}"
    );
    let (status, created) = create_batch(
        &app,
        json!({"batch_id": "over", "stock": 5, "per_user_limit": 1, "value": 100,
               "ends_at": "2020-01-01T00:00:00Z"}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let (status, body) = issue(&app, "g4", "alice", "over", true).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (410, Some("batch_closed")),
        "{body}"
    );
    let (status, body) = issue(&app, "reward:x:y", "alice", "one", false).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("reserved_seq_no"))
    );
    let (status, _) = app
        .post(
            "/v1/coupons/issue",
            Some(ISSUER),
            r#"{"seq_no":"x","uid":"u"}"#,
        )
        .await;
    assert!(status == 400 || status == 422, "{status}");
    let (status, _) = app
        .post(
            "/v1/coupons/issue",
            Some(GATEWAY),
            &json!({"seq_no":"x","uid":"u","batch_id":"one"}).to_string(),
        )
        .await;
    assert_eq!(status, 403, "issuance is the issuer's");
    let (status, body) = request(&app, "never").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("unknown_request"))
    );
}

#[actix_rt::test]
async fn batches_are_validated_and_created_once() {
    let app = spawn_app();
    let good =
        json!({"batch_id": "b", "stock": 10, "per_user_limit": 2, "value": 300, "group_id": "g"});
    assert_eq!(create_batch(&app, good.clone()).await.0, 201);
    let (status, again) = create_batch(&app, good).await;
    assert_eq!((status, again["stock"].as_u64()), (201, Some(10)));
    let (status, body) = create_batch(
        &app,
        json!({"batch_id": "b", "stock": 11, "per_user_limit": 2, "value": 300, "group_id": "g"}),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("idempotency_conflict"))
    );
    for (bad, code) in [
        (
            json!({"batch_id": "c", "stock": 0, "per_user_limit": 1, "value": 1}),
            "invalid_stock",
        ),
        (
            json!({"batch_id": "c", "stock": 1, "per_user_limit": 0, "value": 1}),
            "invalid_limit",
        ),
        (
            json!({"batch_id": "c", "stock": 1, "per_user_limit": 1, "value": 0}),
            "invalid_amount",
        ),
        (
            json!({"batch_id": "c", "stock": 1, "per_user_limit": 1, "value": 1, "starts_at": "yesterday"}),
            "invalid_time",
        ),
        (
            json!({"batch_id": "c", "stock": 1, "per_user_limit": 1, "value": 1,
                "starts_at": "2030-01-01T00:00:00Z", "ends_at": "2029-01-01T00:00:00Z"}),
            "invalid_window",
        ),
    ] {
        let (status, body) = create_batch(&app, bad.clone()).await;
        assert_eq!((status, body["code"].as_str()), (422, Some(code)), "{bad}");
    }
    let (status, _) = app
        .post(
            "/v1/coupon-batches",
            Some(ISSUER),
            &json!({"batch_id": "d", "stock": 1, "per_user_limit": 1, "value": 1}).to_string(),
        )
        .await;
    assert_eq!(status, 403, "batches are the admin's");
    let (status, body) = app.get("/v1/coupon-batches/b", Some(GATEWAY)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (
            body["group_id"].as_str(),
            body["remaining"].as_u64(),
            body["per_user_limit"].as_u64()
        ),
        (Some("g"), Some(10), Some(2))
    );
    let (status, body) = app.get("/v1/coupon-batches/zz", Some(GATEWAY)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("unknown_batch"))
    );
}

#[actix_rt::test]
async fn risk_rules_from_config_refuse() {
    let app = spawn_app_with(|c| {
        c.coupons.risk_blocklist = vec!["fraud".into()];
        c.coupons.risk_velocity_max = 2;
        c.coupons.risk_velocity_window_s = 3_600;
    });
    batch(&app, "r", 100, 10, None).await;
    let (status, body) = issue(&app, "r1", "fraud", "r", true).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("risk_rejected")),
        "{body}"
    );
    let (status, _) = issue(&app, "r2", "fraud", "r", false).await;
    assert_eq!(status, 202);
    // Velocity: the third request of one user within the window is refused.
    for (i, expected) in [(3, 200), (4, 200), (5, 403)] {
        let (status, body) = issue(&app, &format!("r{i}"), "fast", "r", true).await;
        assert_eq!(status, expected, "request {i}: {body}");
    }
    let lines = wait_final(&app, &["r2".into()]).await;
    assert_eq!(
        (lines[0]["status"].as_str(), lines[0]["reason"].as_str()),
        (Some("rejected"), Some("risk_rejected"))
    );
    assert!(coupons_of(&app, "fraud").await.is_empty());
}

#[actix_rt::test]
async fn coupon_rewards_issue_through_the_same_path() {
    let app = spawn_app();
    batch(&app, "rw", 2, 1, None).await;
    let reward = |order: &str, uid: &str| {
        json!({"order_id": order, "uid": uid, "activity_id": "camp", "scene": "s",
               "kind": "coupon", "amount": 1, "batch_id": "rw"})
        .to_string()
    };
    for (order, uid) in [("o1", "ra"), ("o2", "rb"), ("o3", "rc")] {
        let (status, body) = app
            .post("/v1/rewards", Some(ISSUER), &reward(order, uid))
            .await;
        assert_eq!(status, 202, "{body}");
    }
    let lines = wait_final(
        &app,
        &[
            "reward:camp:o1".into(),
            "reward:camp:o2".into(),
            "reward:camp:o3".into(),
        ],
    )
    .await;
    assert_eq!(count(&lines, "issued", None), 2, "{lines:?}");
    assert_eq!(count(&lines, "rejected", Some("sold_out")), 1);
    let holders: usize = join_all(["ra", "rb", "rc"].map(|u| coupons_of(&app, u)))
        .await
        .iter()
        .map(Vec::len)
        .sum();
    assert_eq!(holders, 2);
}
