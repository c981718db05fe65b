//! HTTP tests against the real server: in-process on port 0 with a fresh data directory
//! (`spawn_app`), and the real binary for crash and shutdown tests. One binary.

mod abuse;
mod chaos;
mod cli;
mod cluster;
mod coupons;
mod crash;
mod deploy;
#[cfg(feature = "failpoints")]
mod disk_faults;
mod full_disk;
mod fuzz;
mod jetstream;
mod jetstream_faults;
mod lists;
mod load_test;
// Shared with the core tests (it allows its own dead code).
#[path = "../support/nats.rs"]
mod nats;
mod ops;
mod packets;
mod preflight;
mod rewards;
#[path = "../support/sled_log.rs"]
mod sled_log;
mod status;
mod wallets;
mod withdrawals;

use hongbao::clock::SystemClock;
use hongbao::config::{AuthConfig, Config};
use hongbao::http::RunningServer;
use serde_json::Value;
use std::sync::Arc;

pub const ADMIN: &str = "test-admin-key-0000000001";
pub const ISSUER: &str = "test-issuer-key-000000001";
pub const GATEWAY: &str = "test-gateway-key-00000001";
pub const SECRET: &str = "test-token-secret-0000001";

/// Held by the tests that start several server processes (three JetStream servers, a fleet of
/// nodes): on two cores, two of them at once starve each other's elections and leases.
pub async fn heavy() -> tokio::sync::MutexGuard<'static, ()> {
    static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    HEAVY.lock().await
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

pub struct TestApp {
    pub server: RunningServer,
    pub base: String,
    pub client: reqwest::Client,
    _dir: tempfile::TempDir,
}

pub fn test_config(dir: &std::path::Path) -> Config {
    let mut config = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    config.server.addr = "127.0.0.1:0".into();
    config.server.workers = 2;
    config.server.request_body_bytes_max = 4096;
    config.auth = AuthConfig {
        admin_key: Some(ADMIN.into()),
        issuer_key: Some(ISSUER.into()),
        gateway_key: Some(GATEWAY.into()),
        token_secret: Some(SECRET.into()),
    };
    config
}

pub fn spawn_app() -> TestApp {
    spawn_app_with(|_| {})
}

/// A server with a configuration tweak (lane rates, required budgets, ...).
pub fn spawn_app_with(tweak: impl FnOnce(&mut Config)) -> TestApp {
    spawn_app_clocked(Arc::new(SystemClock), tweak)
}

/// A server on a given clock (a `ManualClock` for windows and compensation ages).
pub fn spawn_app_clocked(
    clock: Arc<dyn hongbao::clock::Clock>,
    tweak: impl FnOnce(&mut Config),
) -> TestApp {
    if std::env::var("TEST_LOG").is_ok() {
        let _ = tracing_subscriber::fmt().with_env_filter("info").try_init();
    }
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    tweak(&mut config);
    let server = RunningServer::start(config, clock).expect("server starts");
    let base = server.base_url();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        // A hung server fails the test instead of hanging the run.
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .unwrap();
    TestApp {
        server,
        base,
        client,
        _dir: dir,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Sends a request with an optional JSON body and bearer key; returns status and body
    /// (parsed JSON, or the raw text as a JSON string).
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        body: Option<&str>,
    ) -> (u16, Value) {
        let mut request = self.client.request(method, self.url(path));
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_owned());
        }
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.expect("request sent");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn post(&self, path: &str, key: Option<&str>, body: &str) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, key, Some(body))
            .await
    }

    pub async fn put(&self, path: &str, key: Option<&str>, body: &str) -> (u16, Value) {
        self.send(reqwest::Method::PUT, path, key, Some(body)).await
    }

    /// Sends a cash reward.
    pub async fn reward(
        &self,
        activity: &str,
        order: &str,
        uid: &str,
        amount: i64,
    ) -> (u16, Value) {
        self.reward_of(activity, order, uid, "cash", amount).await
    }

    pub async fn reward_of(
        &self,
        activity: &str,
        order: &str,
        uid: &str,
        kind: &str,
        amount: i64,
    ) -> (u16, Value) {
        let body = serde_json::json!({
            "order_id": order, "uid": uid, "activity_id": activity, "scene": "test",
            "kind": kind, "amount": amount,
        });
        self.post("/v1/rewards", Some(ISSUER), &body.to_string())
            .await
    }

    pub async fn set_budget(&self, activity: &str, cash: u64, subsidy: u64) -> (u16, Value) {
        self.put(
            &format!("/v1/admin/activities/{activity}/budget"),
            Some(ADMIN),
            &format!(r#"{{"cash":{cash},"subsidy":{subsidy}}}"#),
        )
        .await
    }

    pub async fn wallet(&self, uid: &str) -> Value {
        let (status, wallet) = self.get(&format!("/v1/wallets/{uid}"), Some(GATEWAY)).await;
        assert_eq!(status, 200, "{wallet}");
        wallet
    }

    /// Polls until `done(wallet)` holds for the user, at most 30 s.
    pub async fn wait_wallet(&self, uid: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let wallet = self.wallet(uid).await;
            if done(&wallet) {
                return wallet;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}: {wallet}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics_text(&self) -> String {
        scrape(&self.client, &self.url("")).await
    }

    pub async fn get(&self, path: &str, key: Option<&str>) -> (u16, Value) {
        self.send(reqwest::Method::GET, path, key, None).await
    }

    /// Gives `uid` an activity balance of `amount` (a reward, force-credited at once).
    pub async fn fund(&self, uid: &str, amount: i64) {
        let order = format!("fund-{uid}-{amount}-{}", rand_suffix());
        let (status, body) = self.reward("funding", &order, uid, amount).await;
        assert_eq!(status, 202, "{body}");
        let tokens = serde_json::json!({ "tokens": [body["token"]] }).to_string();
        let (status, body) = self
            .post(
                &format!("/v1/wallets/{uid}/force-credit"),
                Some(GATEWAY),
                &tokens,
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    /// Binds a payout method and returns its id.
    pub async fn bind(&self, uid: &str, kind: &str, account: &str) -> String {
        let body = serde_json::json!({ "kind": kind, "account": account }).to_string();
        let (status, method) = self
            .post(
                &format!("/v1/wallets/{uid}/payout-methods"),
                Some(GATEWAY),
                &body,
            )
            .await;
        assert_eq!(status, 201, "{method}");
        method["method_id"].as_str().unwrap().to_owned()
    }

    pub async fn withdraw(
        &self,
        uid: &str,
        order: &str,
        amount: i64,
        method_id: &str,
    ) -> (u16, Value) {
        let body =
            serde_json::json!({ "order_id": order, "amount": amount, "method_id": method_id })
                .to_string();
        self.post(
            &format!("/v1/wallets/{uid}/withdrawals"),
            Some(GATEWAY),
            &body,
        )
        .await
    }

    /// Polls a withdrawal until it is final (succeeded, refunded, or failed without a debit).
    pub async fn wait_final(&self, order: &str) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let (status, w) = self
                .get(&format!("/v1/withdrawals/{order}"), Some(GATEWAY))
                .await;
            assert_eq!(status, 200, "{w}");
            let state = w["state"].as_str().unwrap();
            if state == "succeeded"
                || state == "refunded"
                || (state == "failed"
                    && !w["history"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|h| h["state"] == "pending_payout"))
            {
                return w;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{order} never final: {w}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    }

    pub async fn deposit(&self, uid: &str, order: &str, amount: i64) -> (u16, Value) {
        self.post(
            &format!("/v1/wallets/{uid}/change/deposits"),
            Some(ADMIN),
            &format!(r#"{{"order_id":"{order}","amount":{amount}}}"#),
        )
        .await
    }
}

/// The sum of the series `name` (a metric name, which matches every label set, or a name with
/// its labels, which matches that series) in Prometheus text; `None` when no such series is
/// exposed, so that a metric missing because something is broken never reads as a healthy 0.
/// The Prometheus text of the server at `base` (`http://127.0.0.1:PORT`).
pub async fn scrape(client: &reqwest::Client, base: &str) -> String {
    client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

pub fn metric(text: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter_map(|l| l.strip_prefix(name))
        .filter(|rest| rest.starts_with(' ') || (!name.contains('{') && rest.starts_with('{')))
        .filter_map(|rest| rest.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}
