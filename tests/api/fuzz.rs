//! Fuzzed JSON bodies (issue 15): every operation of the OpenAPI document that takes a body
//! gets bodies shaped by its schema with fuzzed contents (edge numbers, empty, overlong and
//! refused ids, wrong types, fields left out or added), JSON of any shape, and bytes that are
//! not JSON at all. Each answer is a typed
//! one: a 2xx, or a 4xx whose body carries a `code`; never a 5xx, never a dropped connection,
//! and the server is ready after all of it.

use super::ops::concrete;
use super::{spawn_app, ADMIN};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

/// Cases per operation (each one JSON body and one raw body).
const CASES: u32 = 96;

/// Any JSON value, biased towards the fields the API's bodies use.
fn json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("order_id".to_owned()),
        Just("uid".to_owned()),
        Just("amount".to_owned()),
        Just("kind".to_owned()),
        Just("activity_id".to_owned()),
        Just("total".to_owned()),
        Just("shares".to_owned()),
        Just("channel".to_owned()),
        Just("method_id".to_owned()),
        Just("batch_id".to_owned()),
        Just("token".to_owned()),
        "[a-z_]{1,12}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        Just(Value::from(u64::MAX)),
        Just(Value::from(-1)),
        Just(Value::from(0)),
        ".{0,40}".prop_map(Value::String),
        "[a-z0-9:_-]{0,140}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 8, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(key.clone(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A body for `schema` (the OpenAPI document's), mostly well-formed, with fuzzed contents:
/// each field of the right type most of the time, its value drawn from the edges (zero,
/// negative, the largest integers, empty and overlong ids, characters ids refuse), fields
/// left out or unknown ones added now and then.
fn body_for(schema: &Value, doc: &Value, rng: &mut ChaCha8Rng, depth: u32) -> Value {
    let schema = resolve(schema, doc);
    if depth > 5 || rng.random_range(0..20) == 0 {
        return wild(rng);
    }
    for alternatives in ["oneOf", "anyOf"] {
        if let Some(branches) = schema[alternatives].as_array().filter(|b| !b.is_empty()) {
            let branch = &branches[rng.random_range(0..branches.len())];
            return body_for(branch, doc, rng, depth + 1);
        }
    }
    if let Some(all) = schema["allOf"].as_array().filter(|b| !b.is_empty()) {
        let mut merged = serde_json::Map::new();
        for part in all {
            if let Value::Object(fields) = body_for(part, doc, rng, depth + 1) {
                merged.extend(fields);
            }
        }
        return Value::Object(merged);
    }
    if let Some(values) = schema["enum"].as_array().filter(|v| !v.is_empty()) {
        if rng.random_range(0..8) != 0 {
            return values[rng.random_range(0..values.len())].clone();
        }
        return Value::String(pick(rng, &["", "CASH", "unknown", "cash "]).to_owned());
    }
    let kind = match &schema["type"] {
        Value::String(t) => t.clone(),
        Value::Array(types) => {
            let named: Vec<&str> = types.iter().filter_map(Value::as_str).collect();
            let non_null: Vec<&str> = named.iter().copied().filter(|t| *t != "null").collect();
            if non_null.is_empty() || rng.random_range(0..6) == 0 {
                "null".to_owned()
            } else {
                non_null[rng.random_range(0..non_null.len())].to_owned()
            }
        }
        _ if schema["properties"].is_object() => "object".to_owned(),
        _ => return wild(rng),
    };
    match kind.as_str() {
        "null" => Value::Null,
        "boolean" => Value::Bool(rng.random()),
        "integer" | "number" => {
            let edges: [Value; 9] = [
                0.into(),
                1.into(),
                100.into(),
                (-1).into(),
                i64::MAX.into(),
                u64::MAX.into(),
                rng.random_range(0..1_000_000u64).into(),
                rng.random_range(1..10_000u64).into(),
                serde_json::json!(1.5),
            ];
            edges[rng.random_range(0..edges.len())].clone()
        }
        "string" => {
            let long = "x".repeat(129);
            let options = [
                "fz-1",
                "u42",
                "",
                "a b",
                long.as_str(),
                "bank",
                "cash",
                "subsidy",
                "2026-12-05T00:00:00Z",
                "\u{4f60}\u{597d}",
                "../etc",
            ];
            Value::String(options[rng.random_range(0..options.len())].to_owned())
        }
        "array" => {
            let n = rng.random_range(0..4);
            Value::Array(
                (0..n)
                    .map(|_| body_for(&schema["items"], doc, rng, depth + 1))
                    .collect(),
            )
        }
        "object" => {
            let mut fields = serde_json::Map::new();
            let required: Vec<&str> = schema["required"]
                .as_array()
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if let Some(properties) = schema["properties"].as_object() {
                for (name, property) in properties {
                    let keep = if required.contains(&name.as_str()) {
                        14
                    } else {
                        8
                    };
                    if rng.random_range(0..16) < keep {
                        fields.insert(name.clone(), body_for(property, doc, rng, depth + 1));
                    }
                }
            }
            if rng.random_range(0..10) == 0 {
                fields.insert("unexpected".into(), wild(rng));
            }
            Value::Object(fields)
        }
        _ => wild(rng),
    }
}

/// The schema a `$ref` names (`#/components/schemas/X`), or the schema itself.
fn resolve<'a>(schema: &'a Value, doc: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(reference) => {
            let name = reference.rsplit('/').next().unwrap_or_default();
            resolve(&doc["components"]["schemas"][name], doc)
        }
        None => schema,
    }
}

/// A value of any type, for a field that should have another.
fn wild(rng: &mut ChaCha8Rng) -> Value {
    let options = [
        Value::Null,
        Value::Bool(true),
        serde_json::json!(-7),
        serde_json::json!("?"),
        serde_json::json!([1, "a"]),
        serde_json::json!({"nested": {"deep": [null]}}),
        serde_json::json!(1e300),
    ];
    options[rng.random_range(0..options.len())].clone()
}

fn pick<'a>(rng: &mut ChaCha8Rng, options: &[&'a str]) -> &'a str {
    options[rng.random_range(0..options.len())]
}

#[test]
fn every_body_taking_operation_answers_generated_json_with_a_typed_answer() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = spawn_app();
    let (_, doc) = runtime.block_on(app.get("/openapi.json", None));
    let mut operations = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().unwrap() {
            if operation.get("requestBody").is_some() {
                let schema =
                    operation["requestBody"]["content"]["application/json"]["schema"].clone();
                operations.push((method.to_uppercase(), concrete(path, "fz-1"), schema));
            }
        }
    }
    assert!(
        operations.len() >= 10,
        "operations with a body: {operations:?}"
    );
    let codes = std::sync::Mutex::new(std::collections::BTreeMap::<String, usize>::new());
    for (method, path, schema) in &operations {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut runner = TestRunner::new(Config {
            cases: CASES,
            failure_persistence: None,
            ..Config::default()
        });
        let raw = proptest::collection::vec(any::<u8>(), 0..200);
        let result = runner.run(&(any::<u64>(), json(), raw), |(seed, wild, raw)| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let shaped = body_for(schema, &doc, &mut rng, 0);
            for payload in [
                shaped.to_string().into_bytes(),
                wild.to_string().into_bytes(),
                raw,
            ] {
                let answer = runtime.block_on(async {
                    app.client
                        .request(method.clone(), app.url(path))
                        .bearer_auth(ADMIN)
                        .header("content-type", "application/json")
                        .body(payload.clone())
                        .send()
                        .await
                });
                let response =
                    answer.map_err(|e| TestCaseError::fail(format!("no answer: {e}")))?;
                let status = response.status().as_u16();
                let text = runtime.block_on(response.text()).unwrap_or_default();
                let sent = String::from_utf8_lossy(&payload).into_owned();
                let code = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|b| b["code"].as_str().map(str::to_owned));
                *codes
                    .lock()
                    .unwrap()
                    .entry(format!("{status} {}", code.unwrap_or_default()))
                    .or_default() += 1;
                prop_assert!(status < 500, "{method} {path}: {status} {text} for {sent}");
                if status >= 400 {
                    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    prop_assert!(
                        body["code"].is_string(),
                        "{method} {path}: {status} without a code: {text} for {sent}"
                    );
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    }
    // The bodies reached the handlers: refused for what they hold, not for who sent them.
    let codes = codes.into_inner().unwrap();
    eprintln!("{} operations, answers: {codes:?}", operations.len());
    assert!(
        !codes
            .keys()
            .any(|c| c == "401 unauthorized" || c == "403 forbidden"),
        "{codes:?}"
    );
    // And reached them deep enough to be refused for many different reasons, or accepted.
    assert!(codes.len() >= 8, "{codes:?}");
    assert!(codes.keys().any(|c| c.starts_with('2')), "{codes:?}");
    let (status, body) = runtime.block_on(app.get("/readyz", None));
    assert_eq!(status, 200, "{body}");
}
