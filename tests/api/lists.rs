//! Lists against the real server: spent subsidies listed as used (P7), and every list paged
//! with `?limit=N&after=CURSOR` and `Link: rel="next"` (API.md conventions), never cut.

use super::{spawn_app, TestApp, GATEWAY};
use serde_json::{json, Value};

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
