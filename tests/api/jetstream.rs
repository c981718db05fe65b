//! The real server with its log on JetStream (issue 12): the money paths answer as on sled,
//! and a second server started on a fresh data directory against the same log rebuilds the
//! same balances from JetStream alone. Needs `HONGBAO_NATS_SERVER` (skipped otherwise,
//! mandatory with `HONGBAO_JETSTREAM=1`).

use super::{nats, spawn_app_with, TestApp, ADMIN, GATEWAY, ISSUER};
use serde_json::{json, Value};

fn on_jetstream(url: String) -> impl FnOnce(&mut hongbao::config::Config) {
    move |c| {
        c.store.url = url;
        c.store.replicas = 1;
        c.store.single_replica_synced = true;
        c.withdrawals.retry_backoff_ms = vec![50];
    }
}

async fn balances(app: &TestApp, uid: &str) -> Value {
    app.wallet(uid).await["balances"].clone()
}

#[tokio::test]
async fn the_money_paths_run_on_jetstream_and_a_fresh_node_rebuilds_them_from_the_log() {
    // Goal: deposits, a budgeted reward credited, a withdrawal paid, a hot packet and a green
    // coupon give the answers they give on sled; /readyz names the guarantee; a second server
    // with an empty data directory on the same log shows the same balances.
    let Some(binary) = nats::binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = nats::single_synced(&binary, dir.path());
    let app = spawn_app_with(on_jetstream(server.url()));
    let (status, ready) = app.get("/readyz", None).await;
    assert_eq!(status, 200, "{ready}");
    assert!(
        ready["store"].as_str().unwrap().starts_with("JetStream"),
        "{ready}"
    );

    assert_eq!(app.deposit("js-a", "dep-1", 1_000).await.0, 201);
    assert_eq!(
        app.deposit("js-a", "dep-1", 1_000).await.0,
        201,
        "a retry replays"
    );
    assert_eq!(app.set_budget("js-camp", 500, 0).await.0, 200);
    let (status, reward) = app.reward("js-camp", "js-r1", "js-a", 300).await;
    assert_eq!(status, 202, "{reward}");
    let (status, over) = app.reward("js-camp", "js-r2", "js-a", 300).await;
    assert_eq!(
        (status, over["code"].as_str()),
        (409, Some("budget_exhausted"))
    );
    app.wait_wallet("js-a", "the reward credited", |w| {
        w["balances"]["activity"] == 300
    })
    .await;
    let method = app.bind("js-a", "bank", "6222-js").await;
    assert_eq!(app.withdraw("js-a", "js-w1", 200, &method).await.0, 202);
    assert_eq!(app.wait_final("js-w1").await["state"], "succeeded");

    let packet = json!({"packet_id": "js-p", "sender_uid": "js-a", "mode": "c2c",
        "total": 100, "count": 4, "split": "lucky"});
    let (status, _) = app
        .post("/v1/packets", Some(GATEWAY), &packet.to_string())
        .await;
    assert_eq!(status, 201);
    let (status, paid) = app
        .post(
            "/v1/packets/js-p/pay",
            Some(GATEWAY),
            r#"{"payment_id":"p"}"#,
        )
        .await;
    assert_eq!(status, 200, "{paid}");
    let mut won = 0;
    for i in 0..6 {
        let body = json!({ "uid": format!("js-c{i}") }).to_string();
        let (status, claim) = app
            .post("/v1/packets/js-p/claims", Some(GATEWAY), &body)
            .await;
        match status {
            200 => won += claim["amount"].as_i64().unwrap(),
            410 => {}
            other => panic!("claim {i}: {other} {claim}"),
        }
    }
    assert_eq!(won, 100, "four winners share the total");

    let batch = json!({"batch_id": "js-b", "stock": 1, "per_user_limit": 1, "value": 500});
    assert_eq!(
        app.post("/v1/coupon-batches", Some(ADMIN), &batch.to_string())
            .await
            .0,
        201
    );
    let issue = json!({"seq_no": "js-s1", "uid": "js-a", "batch_id": "js-b", "sync": true});
    let (status, issued) = app
        .post("/v1/coupons/issue", Some(ISSUER), &issue.to_string())
        .await;
    assert_eq!((status, issued["status"].as_str()), (200, Some("issued")));

    let before = balances(&app, "js-a").await;
    assert_eq!(
        before["change"], 900,
        "1,000 deposited, 100 into the packet"
    );
    assert_eq!(before["activity"], 100, "300 credited, 200 withdrawn");
    drop(app);

    // A fresh node: nothing local, the same log.
    let again = spawn_app_with(on_jetstream(server.url()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if balances(&again, "js-a").await == before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the fresh node did not rebuild {before}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (status, order) = again.get("/v1/withdrawals/js-w1", Some(GATEWAY)).await;
    assert_eq!((status, order["state"].as_str()), (200, Some("succeeded")));
}
