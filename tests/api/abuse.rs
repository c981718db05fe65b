//! HTTP abuse (issue 15): a caller flooding with one API key or one user's wallet is answered
//! 429 with `Retry-After` while other callers are served; a client that holds a connection
//! without finishing its request is cut off; thousands of idle connections do not keep a
//! request from being served. (Bodies over the limit: `wallets.rs`, 413.)

use super::{spawn_app_with, ADMIN, GATEWAY, ISSUER};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Statuses (and codes) of `n` requests from `workers` concurrent loops.
async fn flood(
    client: &reqwest::Client,
    requests: Vec<reqwest::RequestBuilder>,
    workers: usize,
) -> BTreeMap<String, usize> {
    let _ = client;
    let queue = Arc::new(Mutex::new(requests));
    let seen: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (queue, seen) = (queue.clone(), seen.clone());
            tokio::spawn(async move {
                loop {
                    let Some(request) = queue.lock().unwrap().pop() else {
                        return;
                    };
                    let response = request.send().await.expect("an answer");
                    let status = response.status().as_u16();
                    let retry_after = response.headers().contains_key("retry-after");
                    let body: Value = response.json().await.unwrap_or(Value::Null);
                    let key = match body["code"].as_str() {
                        Some(code) => format!("{status} {code} retry-after={retry_after}"),
                        None => status.to_string(),
                    };
                    *seen.lock().unwrap().entry(key).or_default() += 1;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    seen
}

fn deposit(
    client: &reqwest::Client,
    base: &str,
    uid: &str,
    order: &str,
) -> reqwest::RequestBuilder {
    client
        .post(format!("{base}/v1/wallets/{uid}/change/deposits"))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({"order_id": order, "amount": 1}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_flooding_their_wallet_is_limited_while_every_other_user_is_served() {
    // Goal: with per_uid_per_s = 20 (burst 20), 400 deposits at once to one wallet get no
    // more than the burst and the rate over their time, the rest 429 rate_limited with
    // Retry-After; 200 deposits to 200 other wallets at the same time are all accepted.
    let app = spawn_app_with(|c| {
        c.server.per_uid_per_s = 20;
        c.server.per_uid_burst = 20;
    });
    // Half of it spelled with a percent-escape (`%66looder` is routed as `flooder`): the same
    // user, the same budget. And an outsider with an unknown key flooding the same wallet
    // first spends none of it (401s, not charged).
    let outsider: Vec<_> = (0..100)
        .map(|n| {
            app.client
                .post(app.url("/v1/wallets/flooder/change/deposits"))
                .bearer_auth("not-a-key-of-this-service")
                .json(&serde_json::json!({"order_id": format!("out-{n}"), "amount": 1}))
        })
        .collect();
    let refused = flood(&app.client, outsider, 8).await;
    assert_eq!(
        refused.keys().collect::<Vec<_>>(),
        vec!["401 unauthorized retry-after=false"]
    );
    let flooding: Vec<_> = (0..400)
        .map(|n| {
            let spelling = if n % 2 == 0 { "flooder" } else { "%66looder" };
            deposit(&app.client, &app.base, spelling, &format!("fl-{n}"))
        })
        .collect();
    let polite: Vec<_> = (0..200)
        .map(|n| {
            deposit(
                &app.client,
                &app.base,
                &format!("polite{n}"),
                &format!("po-{n}"),
            )
        })
        .collect();
    let started = Instant::now();
    let (flooded, served) = tokio::join!(
        flood(&app.client, flooding, 32),
        flood(&app.client, polite, 4)
    );
    assert_eq!(
        served,
        BTreeMap::from([("201".to_owned(), 200)]),
        "{flooded:?}"
    );
    // The flooder got its burst and the rate over the flood's time, no more.
    let seconds = started.elapsed().as_secs_f64();
    let accepted = flooded.get("201").copied().unwrap_or(0);
    assert!(
        accepted as f64 <= 20.0 + 20.0 * seconds + 1.0,
        "{accepted} accepted in {seconds:.1} s: {flooded:?}"
    );
    assert!(
        flooded.contains_key("429 rate_limited retry-after=true"),
        "{flooded:?}"
    );
    assert_eq!(
        flooded.values().sum::<usize>(),
        400,
        "every request answered: {flooded:?}"
    );
    // The accepted ones are in the wallet, once each: the limit refused before anything ran.
    let (_, wallet) = app.get("/v1/wallets/flooder", Some(GATEWAY)).await;
    let accepted = flooded.get("201").copied().unwrap_or(0) as i64;
    assert_eq!(
        wallet["balances"]["change"].as_i64(),
        Some(accepted),
        "{wallet}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_api_key_flooding_is_limited_while_another_key_is_served() {
    // Goal: with per_key_per_s = 50 (burst 50), the issuer key's 600 requests at once are
    // mostly 429; the admin key's 40 requests meanwhile (within its own burst) are all
    // answered as usual: each key has its own limit.
    let app = spawn_app_with(|c| {
        c.server.per_key_per_s = 50;
        c.server.per_key_burst = 50;
    });
    let flooding: Vec<_> = (0..600)
        .map(|n| {
            app.client
                .get(app.url(&format!("/v1/rewards/none-{n}")))
                .bearer_auth(ISSUER)
        })
        .collect();
    let other: Vec<_> = (0..40)
        .map(|n| deposit(&app.client, &app.base, &format!("k{n}"), &format!("k-{n}")))
        .collect();
    let started = Instant::now();
    let (flooded, served) = tokio::join!(
        flood(&app.client, flooding, 32),
        flood(&app.client, other, 4)
    );
    assert_eq!(
        served,
        BTreeMap::from([("201".to_owned(), 40)]),
        "{flooded:?}"
    );
    let seconds = started.elapsed().as_secs_f64();
    let answered = flooded
        .get("404 unknown_order retry-after=false")
        .copied()
        .unwrap_or(0);
    assert!(
        answered as f64 <= 50.0 + 50.0 * seconds + 1.0,
        "{answered} answered in {seconds:.1} s: {flooded:?}"
    );
    assert!(
        flooded.contains_key("429 rate_limited retry-after=true"),
        "{flooded:?}"
    );
    let (_, metrics) = app.get("/metrics", None).await;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("hongbao_http_errors_total") && l.contains("rate_limited")),
        "429s counted by their code"
    );
}

/// The open-file limit of this process (`/proc/self/limits`), if it can be read.
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_holding_a_half_sent_request_is_cut_off_and_idle_connections_starve_nobody() {
    // Goal: a connection that sends half a request head and waits is answered 408 (or closed)
    // after request_head_timeout_ms; while it and up to 2,000 idle connections are open, a
    // normal request is served.
    let app = spawn_app_with(|c| c.server.request_head_timeout_ms = 500);
    let addr = app.base.trim_start_matches("http://").to_owned();
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    slow.write_all(b"POST /v1/wallets/s1/change/deposits HTTP/1.1\r\nHost: x\r\nContent-")
        .unwrap();
    // Idle connections, as many as this process's file limit comfortably allows.
    let idle_max = open_files_limit().map_or(2_000, |l| (l.saturating_sub(256) / 2).min(2_000));
    let idle: Vec<std::net::TcpStream> = (0..idle_max)
        .filter_map(|_| std::net::TcpStream::connect(&addr).ok())
        .collect();
    assert!(
        idle.len() >= idle_max * 9 / 10,
        "{} of {idle_max} connected",
        idle.len()
    );
    let started = Instant::now();
    let (status, body) = app
        .post(
            "/v1/wallets/s2/change/deposits",
            Some(ADMIN),
            r#"{"order_id":"s2-1","amount":5}"#,
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "served only after {:?}",
        started.elapsed()
    );
    // The slow client: cut off (408, or the connection closed) within a few seconds.
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = Vec::new();
    let ended = slow.read_to_end(&mut answer);
    assert!(
        ended.is_ok(),
        "the slow client was never cut off: {ended:?}"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    drop(idle);
}
