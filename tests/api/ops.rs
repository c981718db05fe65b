//! Operations endpoints and the contract: health, readiness, metrics, OpenAPI, unknown routes.

use super::{metric, spawn_app, TestApp, ADMIN, GATEWAY, ISSUER};
use serde_json::Value;

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

/// A documented path with its parameters filled: `bank` for a channel (so the statement is
/// really read), `doc-1` for every id.
pub(crate) fn concrete(path: &str, id: &str) -> String {
    let mut out = String::new();
    let mut rest = path;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}').expect("closed parameter") + open;
        out.push_str(if &rest[open..=close] == "{channel}" && id == "doc-1" {
            "bank"
        } else {
            id
        });
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}

/// One request of the status check: what it tries, the path, the key, the body, and the
/// status it must get when that is known.
type Probe<'a> = (
    &'a str,
    String,
    Option<&'a str>,
    Option<String>,
    Option<u16>,
);

/// Sends one request; returns the status and the body's text.
async fn call(
    app: &TestApp,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<String>,
) -> (u16, String) {
    let mut request = match method {
        "get" => app.client.get(app.url(path)),
        "post" => app.client.post(app.url(path)),
        "put" => app.client.put(app.url(path)),
        other => panic!("undocumented method {other}"),
    };
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body);
    }
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

#[tokio::test]
async fn every_documented_operation_is_served_and_answers_only_documented_statuses() {
    // Goal: the OpenAPI document matches the server: each documented path and method is routed
    // (no `no_route` / `method_not_allowed`), the wallet, packet and coupon paths of API.md are
    // documented, and whatever an operation answers (without a key, with each role's key, with
    // a malformed or oversized body, with a malformed path id) is a status its document
    // declares, as a public OpenAPI fuzzer checks; never a 5xx for bad input.
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
    let mut undeclared = Vec::new();
    for (path, operations) in paths {
        for (method, operation) in operations.as_object().unwrap() {
            let declared = |status: u16| {
                operation["responses"]
                    .as_object()
                    .is_some_and(|r| r.contains_key(&status.to_string()))
            };
            let secured = operation["security"]
                .as_array()
                .is_some_and(|s| !s.is_empty());
            let has_body = operation.get("requestBody").is_some();
            let has_params = path.contains('{')
                || operation["parameters"]
                    .as_array()
                    .is_some_and(|p| !p.is_empty());
            let empty = has_body.then(|| "{}".to_string());
            let valid = concrete(path, "doc-1");
            let mut tries: Vec<Probe> = vec![
                (
                    "no key",
                    valid.clone(),
                    None,
                    empty.clone(),
                    secured.then_some(401),
                ),
                ("issuer", valid.clone(), Some(ISSUER), empty.clone(), None),
                ("gateway", valid.clone(), Some(GATEWAY), empty.clone(), None),
                ("admin", valid.clone(), Some(ADMIN), empty.clone(), None),
            ];
            if has_body {
                tries.push((
                    "malformed body",
                    valid.clone(),
                    Some(ADMIN),
                    Some("{\"".into()),
                    Some(400),
                ));
                tries.push((
                    "oversized body",
                    valid.clone(),
                    Some(ADMIN),
                    Some(format!("{{\"x\":\"{}\"}}", "a".repeat(5_000))),
                    Some(413),
                ));
            }
            if path.contains('{') {
                tries.push((
                    "malformed path",
                    concrete(path, "bad%20id"),
                    Some(ADMIN),
                    empty.clone(),
                    None,
                ));
            }
            for (what, target, key, body, expected) in tries {
                let (status, text) = call(&app, method, &target, key, body).await;
                assert!(
                    !text.contains("no_route") && !text.contains("method_not_allowed"),
                    "{method} {path} ({what}): {status} {text}"
                );
                assert!(status < 500, "{method} {path} ({what}): {status} {text}");
                if let Some(expected) = expected {
                    assert_eq!(status, expected, "{method} {path} ({what}): {text}");
                }
                if !declared(status) {
                    undeclared.push(format!("{method} {path} ({what}): {status} {text}"));
                }
            }
            // Every status a client must handle whatever the input is declared too.
            let mut must = Vec::new();
            if secured {
                must.push(401);
            }
            if has_params || has_body {
                must.push(400);
            }
            if has_body {
                // A body is a command for an actor: the journal may be unavailable.
                must.extend([413, 503]);
            }
            for status in must {
                if !declared(status) {
                    undeclared.push(format!("{method} {path}: {status} not declared"));
                }
            }
        }
    }
    assert!(
        undeclared.is_empty(),
        "undeclared statuses:\n{}",
        undeclared.join("\n")
    );
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

#[tokio::test]
async fn every_list_documents_its_paging_and_means_it() {
    // Goal: item 13: each paged list documents `limit` (default and maximum), its cursor
    // parameter and the `Link` header; the documented maximum is accepted and one more is a 400.
    let app = spawn_app();
    let (_, doc) = app.get("/openapi.json", None).await;
    for (path, cursor) in [
        ("/v1/admin/channels/{channel}/statement", "after"),
        ("/v1/admin/withdrawals/parked", "after"),
        ("/v1/wallets/{uid}/coupons", "after"),
        ("/v1/wallets/{uid}/rewards", "after"),
        ("/v1/wallets/{uid}/ledger", "before"),
    ] {
        let operation = &doc["paths"][path]["get"];
        let parameters = operation["parameters"]
            .as_array()
            .unwrap_or_else(|| panic!("{path}"));
        let parameter = |name: &str| -> Value {
            parameters
                .iter()
                .find(|p| p["name"] == name && p["in"] == "query")
                .cloned()
                .unwrap_or_else(|| panic!("{path}: no {name} parameter"))
        };
        let limit = parameter("limit");
        let default = limit["schema"]["default"].as_u64();
        let maximum = limit["schema"]["maximum"].as_u64();
        let (Some(default), Some(maximum)) = (default, maximum) else {
            panic!("{path}: limit without default and maximum: {limit}");
        };
        assert!(default >= 1 && default <= maximum, "{path}: {limit}");
        parameter(cursor);
        assert!(
            operation["responses"]["200"]["headers"]["Link"].is_object(),
            "{path}: no Link header documented"
        );
        let target = concrete(path, "doc-1");
        let (status, body) = app
            .get(&format!("{target}?limit={maximum}"), Some(ADMIN))
            .await;
        assert_eq!(
            status, 200,
            "{path}: the documented maximum is refused: {body}"
        );
        let (status, body) = app
            .get(&format!("{target}?limit={}", maximum + 1), Some(ADMIN))
            .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (400, Some("invalid_limit")),
            "{path}: above the documented maximum: {body}"
        );
    }
}

#[tokio::test]
async fn every_error_answer_is_counted_by_its_code() {
    // Goal: an operator tells which 409 or 503 the service answered, not only how many:
    // `hongbao_http_errors_total{code,route,status}` counts each error answer by its body's
    // code (two different 409s stay apart), and a success counts nothing.
    let app = spawn_app();
    let path = "/v1/wallets/ec-u1/change/deposits";
    let (status, _) = app
        .post(path, Some(ADMIN), r#"{"order_id":"ec-1","amount":100}"#)
        .await;
    assert_eq!(status, 201);
    for _ in 0..2 {
        let (status, body) = app
            .post(path, Some(ADMIN), r#"{"order_id":"ec-1","amount":101}"#)
            .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (409, Some("idempotency_conflict"))
        );
    }
    let (status, body) = app
        .post(path, Some(ADMIN), r#"{"order_id":"ec-2","amount":0}"#)
        .await;
    assert_eq!(status, 422, "{body}");
    let code = body["code"].as_str().unwrap().to_owned();
    let text = app.metrics_text().await;
    let route = "/v1/wallets/{uid}/change/deposits";
    assert_eq!(
        metric(
            &text,
            &format!(
                "hongbao_http_errors_total{{code=\"idempotency_conflict\",route=\"{route}\",status=\"409\"}}"
            )
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &text,
            &format!(
                "hongbao_http_errors_total{{code=\"{code}\",route=\"{route}\",status=\"422\"}}"
            )
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "hongbao_http_errors_total"),
        Some(3.0),
        "only the error answers"
    );
}
