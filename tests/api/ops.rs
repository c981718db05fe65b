//! Operations endpoints and the contract: health, readiness, metrics, OpenAPI, unknown routes.

use super::{spawn_app, ADMIN, GATEWAY};

#[tokio::test]
async fn health_readiness_and_metrics_answer_without_a_key() {
    // Goal: probes and scraping need no key; metrics name the journal, actors and HTTP routes.
    let app = spawn_app();
    assert_eq!(app.get("/healthz", None).await.0, 200);
    let (status, ready) = app.get("/readyz", None).await;
    assert_eq!(status, 200);
    assert_eq!(ready["status"], "ready");
    assert_eq!(app.deposit("m1", "d1", 10).await.0, 201);
    let (_, ready) = app.get("/readyz", None).await;
    assert_eq!(ready["log_head"], 1);
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "hongbao_http_request_duration_seconds_bucket{method=\"POST\",route=\"/v1/wallets/{uid}/change/deposits\",status=\"201\"",
        "hongbao_journal_batch_events_count 1",
        "hongbao_journal_flush_seconds_count 1",
        "hongbao_events_appended_total{kind=\"wallet\"} 1",
        "hongbao_actors_active{kind=\"wallet\"} 1",
        "hongbao_actor_activations_total{kind=\"wallet\"} 1",
    ] {
        assert!(metrics.contains(name), "missing {name} in\n{metrics}");
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    // Goal: even the router's refusals follow the error model.
    let app = spawn_app();
    let (status, error) = app.get("/v1/nothing-here", Some(ADMIN)).await;
    assert_eq!((status, error["code"].as_str()), (404, Some("no_route")));
    let response = app
        .client
        .delete(app.url("/v1/wallets/u1"))
        .bearer_auth(GATEWAY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 405);
    let error: serde_json::Value = response.json().await.unwrap();
    assert_eq!(error["code"], "method_not_allowed");
}

#[tokio::test]
async fn every_documented_operation_is_served() {
    // Goal: the OpenAPI document matches the server: each documented path and method is routed
    // (no `no_route` / `method_not_allowed`), and the wallet, packet and coupon paths of API.md are documented.
    let app = spawn_app();
    let (status, doc) = app.get("/openapi.json", None).await;
    assert_eq!(status, 200);
    let paths = doc["paths"].as_object().expect("paths");
    for required in [
        "/v1/wallets/{uid}",
        "/v1/wallets/{uid}/ledger",
        "/v1/wallets/{uid}/change/deposits",
        "/v1/packets",
        "/v1/packets/{packet_id}",
        "/v1/packets/{packet_id}/pay",
        "/v1/packets/{packet_id}/claims",
        "/v1/coupon-batches",
        "/v1/coupon-batches/{batch_id}",
        "/v1/coupons/issue",
        "/v1/coupons/requests/{seq_no}",
        "/v1/wallets/{uid}/coupons",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(paths.contains_key(required), "{required} not documented");
    }
    for (path, operations) in paths {
        let concrete = path.replace("{uid}", "doc-user");
        for method in operations.as_object().unwrap().keys() {
            let request = match method.as_str() {
                "get" => app.client.get(app.url(&concrete)),
                "post" => app.client.post(app.url(&concrete)).body("{}"),
                "put" => app.client.put(app.url(&concrete)).body("{}"),
                other => panic!("undocumented method {other}"),
            };
            let response = request.bearer_auth(ADMIN).send().await.unwrap();
            let status = response.status().as_u16();
            let body = response.text().await.unwrap();
            assert!(
                !body.contains("no_route") && !body.contains("method_not_allowed"),
                "{method} {path}: {status} {body}"
            );
            assert!(status < 500, "{method} {path}: {status} {body}");
        }
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}
