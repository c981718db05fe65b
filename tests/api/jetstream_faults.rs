//! The real binary with its log on JetStream under faults (issue 12): `kill -9` of hongbao
//! mid-burst, one of three nats-servers killed mid-burst, the single server down and back, and
//! a second hongbao process started on the same log. Each test fires deposits from many
//! clients, retries a 503 or a lost connection with the same order id as a client must, then
//! settles every deposit left unacknowledged and proves through the ledger that each one is in
//! the log exactly once, with the balance its acknowledgement stated.
//!
//! Needs `HONGBAO_NATS_SERVER` (skipped otherwise, mandatory with `HONGBAO_JETSTREAM=1`).

use super::crash::{command, ledger, start_with, Server};
use super::{nats, ADMIN};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Wallets the deposits spread over (`fw0`..`fw7`): few, so that actors and batches are shared.
const WALLETS: usize = 8;
/// Longest wait for anything a test polls for (a loaded 2-core machine, a leader election).
const PATIENCE: Duration = Duration::from_secs(30);
/// Longest wait for a probe's answer (see [`probe_client`]).
const PROBE_ANSWER_MAX: Duration = Duration::from_secs(5);
/// Lines of a hongbao process's log printed when a test fails.
const LOG_TAIL_LINES: usize = 150;
/// The log's JetStream stream (the `[store] stream` default).
const LOG_STREAM: &str = "HONGBAO_LOG";

/// `hongbao serve` arguments for a log on `url` with `replicas` replicas.
fn on_jetstream(url: &str, replicas: usize) -> Vec<String> {
    let mut args = vec![
        "--store".to_owned(),
        url.to_owned(),
        "--replicas".to_owned(),
        replicas.to_string(),
    ];
    if replicas == 1 {
        args.push("--single-replica-synced".to_owned());
    }
    args
}

/// A hongbao process that is killed if the test ends without stopping it (a failed assertion
/// must not leave it running).
struct Node(Option<Server>);

impl Node {
    /// Starts `hongbao serve` on `data` (off the async workers: it blocks until it listens).
    async fn start(data: &Path, args: &[String]) -> Node {
        let (data, args) = (data.to_path_buf(), args.to_vec());
        let server = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            start_with(&data, &args)
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        Node(Some(server))
    }

    fn server(&self) -> &Server {
        self.0.as_ref().expect("running")
    }

    fn base(&self) -> String {
        self.server().base()
    }

    /// The process's log so far.
    fn log(&self) -> Vec<String> {
        self.server().log.lock().unwrap().clone()
    }

    /// Whether the process has exited by itself.
    fn exited(&mut self) -> bool {
        let server = self.0.as_mut().expect("running");
        server.child.try_wait().ok().flatten().is_some()
    }

    fn kill9(mut self) {
        self.0.take().expect("running").kill9();
    }

    /// SIGTERM, and the exit status (after at most 30 s).
    async fn terminate(mut self) -> std::process::ExitStatus {
        let server = self.0.take().expect("running");
        tokio::task::spawn_blocking(move || server.terminate())
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut server) = self.0.take() {
            if std::thread::panicking() {
                // The test failed: what the process said is the evidence.
                let log = server.log.lock().unwrap().clone();
                let tail = &log[log.len().saturating_sub(LOG_TAIL_LINES)..];
                eprintln!(
                    "--- hongbao on port {} (last {} lines) ---\n{}",
                    server.port,
                    tail.len(),
                    tail.join("\n")
                );
            }
            let _ = server.child.kill();
            let _ = server.child.wait();
        }
    }
}

/// One deposit a client sent, and its acknowledgement if it got one.
#[derive(Debug, Clone)]
struct Deposit {
    uid: String,
    amount: i64,
    /// The balance the 201 stated (`None`: not acknowledged, the outcome unknown).
    balance_after: Option<i64>,
}

/// What the clients of one burst sent and saw.
#[derive(Default)]
struct Burst {
    /// Every deposit sent, by order id.
    deposits: Mutex<BTreeMap<String, Deposit>>,
    acked: AtomicUsize,
    /// 503 answers, and those among them without a `Retry-After` header.
    unavailable: AtomicUsize,
    unavailable_without_retry_after: AtomicUsize,
    /// Any other answer (the order is retried all the same): none is expected.
    unexpected: Mutex<Vec<String>>,
    stop: AtomicBool,
}

impl Burst {
    /// A deposit sent outside the burst's clients whose outcome is unknown: [`settle`]
    /// retries it and the ledger check counts it.
    fn unsettled(&self, order: &str, uid: &str, amount: i64) {
        self.deposits.lock().unwrap().insert(
            order.to_owned(),
            Deposit {
                uid: uid.to_owned(),
                amount,
                balance_after: None,
            },
        );
    }

    fn acked(&self) -> usize {
        self.acked.load(Ordering::Relaxed)
    }

    fn unavailable(&self) -> usize {
        self.unavailable.load(Ordering::Relaxed)
    }

    /// Waits until `count` deposits are acknowledged in all, at most `PATIENCE`.
    async fn wait_acked(&self, count: usize, what: &str) {
        let deadline = Instant::now() + PATIENCE;
        while self.acked() < count {
            assert!(
                Instant::now() < deadline,
                "{what}: {} of {count} deposits acknowledged, {} answered 503, unexpected: {:?}",
                self.acked(),
                self.unavailable(),
                self.unexpected.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// No client saw anything but 201 or 503, and every 503 said when to retry.
    fn assert_answers_were_201_or_503_with_retry_after(&self) {
        let unexpected = self.unexpected.lock().unwrap();
        assert!(unexpected.is_empty(), "unexpected answers: {unexpected:?}");
        assert_eq!(
            self.unavailable_without_retry_after.load(Ordering::Relaxed),
            0,
            "a 503 without Retry-After"
        );
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(PATIENCE)
        .pool_max_idle_per_host(64)
        .build()
        .unwrap()
}

/// A client for probes that must be answered promptly: readiness (an orchestrator gives up on
/// a probe after a second or so) and a command while the log is unreachable (a 503 is only
/// useful if it comes before the caller's own timeout). Generous for a loaded machine.
fn probe_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(PROBE_ANSWER_MAX)
        .build()
        .unwrap()
}

/// Deposits `order` on `uid`; the answer's status, its `Retry-After` in seconds if it had one,
/// and its body (`None` when the connection failed or timed out).
pub(crate) async fn deposit(
    client: &reqwest::Client,
    base: &str,
    uid: &str,
    order: &str,
    amount: i64,
) -> Option<(u16, Option<u64>, Value)> {
    let response = client
        .post(format!("{base}/v1/wallets/{uid}/change/deposits"))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({"order_id": order, "amount": amount}))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().ok().and_then(|v| v.parse().ok()).unwrap_or(0));
    let text = response.text().await.ok()?;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Some((status, retry_after, body))
}

/// Clients depositing until stopped; see [`fire`].
struct Firing {
    burst: Arc<Burst>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Firing {
    /// Stops every client at once: a request in flight is abandoned, its deposit stays
    /// unacknowledged (and [`settle`] retries it).
    async fn stop(self) {
        self.burst.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
    }
}

/// Fires deposits from `workers` clients at `base` until stopped: client `w`'s `n`-th deposit is
/// order `{tag}-w{w}-n{n}` of `n % 97 + 1` fen on wallet `fw{w % 8}`. A 503 or a failed
/// connection leaves the outcome unknown, so the client retries the same order (after the
/// `Retry-After` it was given, or 50 ms) until it is acknowledged: each client has at most one
/// deposit unacknowledged at any time.
fn fire(base: &str, tag: &str, workers: usize, burst: Arc<Burst>) -> Firing {
    let client = client();
    let tasks = (0..workers)
        .map(|w| {
            let (client, base, burst) = (client.clone(), base.to_owned(), burst.clone());
            let tag = tag.to_owned();
            tokio::spawn(async move {
                for n in 0u64.. {
                    let (uid, order, amount) = (
                        format!("fw{}", w % WALLETS),
                        format!("{tag}-w{w}-n{n}"),
                        (n % 97 + 1) as i64,
                    );
                    burst.deposits.lock().unwrap().insert(
                        order.clone(),
                        Deposit {
                            uid: uid.clone(),
                            amount,
                            balance_after: None,
                        },
                    );
                    loop {
                        if burst.stop.load(Ordering::Relaxed) {
                            return;
                        }
                        match deposit(&client, &base, &uid, &order, amount).await {
                            Some((201, _, body)) => {
                                let balance = body["balance_after"].as_i64();
                                assert!(balance.is_some(), "{body}");
                                if let Some(d) = burst.deposits.lock().unwrap().get_mut(&order) {
                                    d.balance_after = balance;
                                }
                                burst.acked.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                            Some((503, retry_after, _)) => {
                                burst.unavailable.fetch_add(1, Ordering::Relaxed);
                                match retry_after {
                                    Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
                                    None => {
                                        burst
                                            .unavailable_without_retry_after
                                            .fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                            }
                            // Recorded (the test fails on it later), then retried: the burst
                            // goes on so that the rest of the story is still told.
                            Some((status, _, body)) => {
                                burst
                                    .unexpected
                                    .lock()
                                    .unwrap()
                                    .push(format!("{order}: {status} {body}"));
                            }
                            None => {}
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            })
        })
        .collect();
    Firing { burst, tasks }
}

/// Retries every deposit of `burst` left unacknowledged (in flight when its client stopped or
/// the process died) with its order id, until acknowledged: whether or not it had landed,
/// it must now be in the log exactly once.
async fn settle(base: &str, burst: &Burst) {
    let client = client();
    let open: Vec<(String, Deposit)> = burst
        .deposits
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, d)| d.balance_after.is_none())
        .map(|(o, d)| (o.clone(), d.clone()))
        .collect();
    let deadline = Instant::now() + PATIENCE;
    for (order, d) in open {
        let balance = loop {
            match deposit(&client, base, &d.uid, &order, d.amount).await {
                Some((201, _, body)) => break body["balance_after"].as_i64(),
                Some((503, _, _)) | None => {}
                Some((status, _, body)) => panic!("retry of {order}: {status} {body}"),
            }
            assert!(
                Instant::now() < deadline,
                "retry of {order} never acknowledged"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(balance.is_some(), "retry of {order}");
        burst
            .deposits
            .lock()
            .unwrap()
            .get_mut(&order)
            .unwrap()
            .balance_after = balance;
    }
}

/// `/readyz`: its status and body, `None` if the process does not answer.
async fn readyz(client: &reqwest::Client, base: &str) -> Option<(u16, Value)> {
    let response = client.get(format!("{base}/readyz")).send().await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.json().await.ok()?))
}

/// Waits until the node is ready and its wallet view has applied its whole log (a fresh or
/// restarted node rebuilds it first), so that its ledger reads are complete.
async fn wait_caught_up(base: &str) {
    let client = client();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let ready = readyz(&client, base).await;
        if let Some((200, body)) = &ready {
            let head = body["log_head"].as_u64().unwrap();
            if body["projections"]["wallets"].as_u64() >= Some(head) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the wallet view never caught up: {ready:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every deposit of `bursts` (all acknowledged by now) is in its wallet's ledger exactly once,
/// with its amount and the balance its acknowledgement stated; the ledgers hold nothing else;
/// each balance is the sum of its deposits. Returns how many deposits were checked.
async fn check_exactly_once(base: &str, bursts: &[&Burst]) -> usize {
    let mut expected: HashMap<String, BTreeMap<String, Deposit>> = HashMap::new();
    for burst in bursts {
        for (order, d) in burst.deposits.lock().unwrap().iter() {
            assert!(d.balance_after.is_some(), "{order} not settled");
            expected
                .entry(d.uid.clone())
                .or_default()
                .insert(order.clone(), d.clone());
        }
    }
    let client = client();
    let mut checked = 0;
    for uid in (0..WALLETS).map(|i| format!("fw{i}")) {
        let wanted = expected.remove(&uid).unwrap_or_default();
        let (balance, entries) = ledger(&client, base, &uid).await;
        let mut seen: BTreeMap<&str, &Value> = BTreeMap::new();
        for entry in &entries {
            let order = entry["order_id"].as_str().unwrap();
            assert!(
                seen.insert(order, entry).is_none(),
                "{uid}: {order} twice in the ledger"
            );
            let d = wanted
                .get(order)
                .unwrap_or_else(|| panic!("{uid}: {order} in the ledger was never sent: {entry}"));
            assert_eq!(
                (entry["entry"].as_str(), entry["amount"].as_i64()),
                (Some("deposit"), Some(d.amount)),
                "{uid}: {entry}"
            );
            assert_eq!(
                entry["balance_after"].as_i64(),
                d.balance_after,
                "{uid}: {order}'s acknowledgement stated another balance: {entry}"
            );
        }
        for order in wanted.keys() {
            assert!(
                seen.contains_key(order.as_str()),
                "{uid}: acknowledged {order} lost"
            );
        }
        assert_eq!(
            balance,
            wanted.values().map(|d| d.amount).sum::<i64>(),
            "{uid}: the balance is not the sum of its deposits"
        );
        checked += wanted.len();
    }
    checked
}

/// Where a writer stands in the two-writer test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// `/readyz` 200.
    Ready,
    /// Failed stop: `/readyz` 503 `journal_failed`, or the process exited.
    Stopped,
    /// Neither yet: no answer within 5 s, or `log_unreachable` for a moment.
    Undecided,
}

async fn standing(probe: &reqwest::Client, node: &mut Node) -> Standing {
    if node.exited() {
        return Standing::Stopped;
    }
    match readyz(probe, &node.base()).await {
        Some((200, _)) => Standing::Ready,
        Some((503, body)) if body["status"] == "journal_failed" => Standing::Stopped,
        _ => Standing::Undecided,
    }
}

/// The end of every test: the node catches up with the log, every burst's deposits are in it
/// exactly once (see [`check_exactly_once`]), the node stops cleanly (SIGTERM, exit 0), and
/// verify and audit on the log are clean. The deposits checked.
async fn check_and_stop(node: Node, data: &Path, store: &[String], bursts: &[&Burst]) -> usize {
    wait_caught_up(&node.base()).await;
    let checked = check_exactly_once(&node.base(), bursts).await;
    let log = node.log();
    let status = node.terminate().await;
    assert!(status.success(), "exit {status:?}:\n{}", log.join("\n"));
    audit_and_verify(data, store).await;
    checked
}

/// `hongbao verify` (hash chain, contiguous sequences, per-stream versions, the data
/// directory's signed checkpoints against the log) and `hongbao audit` (every invariant
/// replayed from the log, each view against a rebuild) on the JetStream log, with the data
/// directory of a stopped node: both exit 0 and say OK.
async fn audit_and_verify(data: &Path, store: &[String]) {
    let (data, store) = (data.to_path_buf(), store.to_vec());
    tokio::task::spawn_blocking(move || {
        for subcommand in ["verify", "audit"] {
            let mut args = vec![subcommand, "--data-dir", data.to_str().unwrap()];
            args.extend(store.iter().map(String::as_str));
            let (ok, out) = command(&args);
            assert!(
                ok && out.contains("result: OK"),
                "{subcommand} on {}:\n{out}",
                data.display()
            );
        }
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
}

/// A fresh data directory under `dir`.
fn data_dir(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_hongbao_mid_burst_on_jetstream_loses_no_acknowledged_deposit() {
    // Goal: SIGKILL of hongbao while 32 clients deposit on one synced JetStream server; after a
    // restart on the same log and data directory every 201 is in the ledger exactly once with
    // the balance it stated, each in-flight deposit retried lands once, balances are the sums;
    // `hongbao verify` and `hongbao audit` on the log (--store) exit 0.
    let Some(binary) = nats::binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = nats::single_synced(&binary, dir.path());
    let args = on_jetstream(&server.url(), 1);
    let data = data_dir(dir.path(), "data");
    let node = Node::start(&data, &args).await;
    let burst = Arc::new(Burst::default());
    let firing = fire(&node.base(), "k", 32, burst.clone());
    burst.wait_acked(500, "before the kill").await;
    node.kill9();
    firing.stop().await;
    burst.assert_answers_were_201_or_503_with_retry_after();
    let acked_before_kill = burst.acked();

    let node = Node::start(&data, &args).await;
    wait_caught_up(&node.base()).await;
    settle(&node.base(), &burst).await;
    let checked = check_and_stop(node, &data, &args, &[&burst]).await;
    eprintln!("{acked_before_kill} acknowledged before the kill, {checked} after settling");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_streams_leader_of_three_nats_servers_mid_burst_loses_nothing() {
    let _heavy = super::heavy().await;
    // Goal: three nats-servers, the log on three replicas, hongbao given all three addresses;
    // the stream's leader (found with the NATS client; hongbao may or may not be connected to
    // it) is killed with SIGKILL while 16 clients deposit: after at most a short run of 503s
    // (each with Retry-After) deposits are acknowledged again without restarting anything,
    // and every 201 is in the ledger exactly once with the balance it stated; verify and audit
    // on the log exit 0.
    let Some(binary) = nats::binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut servers = nats::cluster_of_three(&binary, dir.path());
    let url = format!(
        "nats://{}",
        servers
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    );
    wait_for_jetstream(&servers[0].url()).await;
    let args = on_jetstream(&url, 3);
    let data = data_dir(dir.path(), "data");
    let node = Node::start(&data, &args).await;
    let burst = Arc::new(Burst::default());
    let firing = fire(&node.base(), "l", 16, burst.clone());
    burst.wait_acked(300, "before the kill").await;

    let leader = stream_leader(&servers[0].url()).await;
    let index = servers
        .iter()
        .position(|s| s.name() == leader)
        .unwrap_or_else(|| panic!("leader {leader} is none of the three"));
    servers.remove(index).kill();
    let acked_at_kill = burst.acked();
    burst
        .wait_acked(acked_at_kill + 300, "after the leader was killed")
        .await;
    firing.stop().await;
    burst.assert_answers_were_201_or_503_with_retry_after();
    eprintln!(
        "killed leader {leader}; {} acknowledged, {} answers 503",
        burst.acked(),
        burst.unavailable()
    );

    settle(&node.base(), &burst).await;
    check_and_stop(node, &data, &args, &[&burst]).await;
}

/// Waits until the cluster's JetStream answers (a fresh cluster elects its meta leader first).
async fn wait_for_jetstream(url: &str) {
    let client = async_nats::connect(url).await.expect("NATS reachable");
    let js = async_nats::jetstream::new(client);
    let deadline = Instant::now() + PATIENCE;
    loop {
        match js.query_account().await {
            Ok(_) => return,
            Err(e) => assert!(Instant::now() < deadline, "JetStream not up: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The name of the server leading the log's stream.
async fn stream_leader(url: &str) -> String {
    let client = async_nats::connect(url).await.expect("NATS reachable");
    let js = async_nats::jetstream::new(client);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let leader = match js.get_stream(LOG_STREAM).await {
            Ok(stream) => stream
                .get_info()
                .await
                .ok()
                .and_then(|info| info.cluster)
                .and_then(|cluster| cluster.leader),
            Err(_) => None,
        };
        if let Some(leader) = leader {
            return leader;
        }
        assert!(Instant::now() < deadline, "the log's stream has no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_single_server_down_answers_503_and_hongbao_recovers_when_it_is_back() {
    // Goal: the one synced nats-server is killed (SIGKILL) while 16 clients deposit: commands
    // answer 503 with Retry-After and /readyz is not 200 while it is down; started again on the
    // same port and store directory, deposits are acknowledged again within 30 s without
    // restarting hongbao, and every deposit, acknowledged or retried, is in the log once;
    // verify and audit on the log exit 0.
    let Some(binary) = nats::binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = nats::single_synced(&binary, dir.path());
    let args = on_jetstream(&server.url(), 1);
    let data = data_dir(dir.path(), "data");
    let node = Node::start(&data, &args).await;
    let base = node.base();
    let burst = Arc::new(Burst::default());
    let firing = fire(&base, "s", 16, burst.clone());
    burst.wait_acked(200, "before the outage").await;

    let stopped = server.kill();
    let http = client();
    let probe = probe_client();
    let deadline = Instant::now() + PATIENCE;
    let mut probes = Vec::new();
    let down = loop {
        let started = Instant::now();
        let ready = readyz(&probe, &base).await;
        probes.push(format!(
            "{:?} in {} ms",
            ready.as_ref().map(|r| r.0),
            started.elapsed().as_millis()
        ));
        match ready {
            Some((200, _)) | None => {}
            Some((status, body)) => break (status, body),
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never answered anything but 200 with NATS down (probes: {probes:?}); \
             {} acknowledged, {} answers 503; hongbao:\n{}",
            burst.acked(),
            burst.unavailable(),
            node.log().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(down.0, 503, "{}", down.1);
    assert_eq!(down.1["status"], "log_unreachable", "{}", down.1);
    // A command while it is down: 503 with Retry-After, at once, on a wallet the clients use.
    let (status, retry_after, body) = deposit(&probe, &base, "fw0", "probe-down", 1)
        .await
        .expect("no answer to a deposit within 5 s while NATS is down");
    assert_eq!(status, 503, "{body}");
    assert!(retry_after.is_some(), "503 without Retry-After");
    let deadline = Instant::now() + PATIENCE;
    while burst.unavailable() == 0 {
        assert!(Instant::now() < deadline, "no client saw a 503");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, again) = readyz(&probe, &base)
        .await
        .expect("/readyz unanswered within 5 s while NATS is down");
    assert_eq!(status, 503, "still down: {again}");

    let _server = stopped.restart();
    let acked_in_outage = burst.acked();
    burst
        .wait_acked(acked_in_outage + 200, "after NATS came back")
        .await;
    let (status, ready) = readyz(&http, &base).await.expect("answers");
    assert_eq!(status, 200, "{ready}");
    firing.stop().await;
    burst.assert_answers_were_201_or_503_with_retry_after();
    eprintln!(
        "{} acknowledged, {} answers 503",
        burst.acked(),
        burst.unavailable()
    );

    // The probe's outcome was unknown: retried, it lands once (it is in the ledger check).
    burst.unsettled("probe-down", "fw0", 1);
    settle(&base, &burst).await;
    check_and_stop(node, &data, &args, &[&burst]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_hongbao_on_the_same_log_is_fenced_and_no_deposit_is_lost() {
    // Goal: hongbao A takes deposits from 16 clients; B, with its own data directory and port,
    // starts on the same log and takes deposits on the same wallets. Exactly one of them fails
    // stop within 30 s (/readyz 503 journal_failed and its commands answer 503, or it exits;
    // its log names the fence) and the other goes on acknowledging; after settling through
    // the survivor, a fresh third process reading the log alone finds every deposit of both
    // exactly once, the chain is linear (verify) and the audit clean, and each writer's signed
    // checkpoints agree with the log.
    let Some(binary) = nats::binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = nats::single_synced(&binary, dir.path());
    let args = on_jetstream(&server.url(), 1);
    let mut a = Node::start(&data_dir(dir.path(), "a"), &args).await;
    let burst_a = Arc::new(Burst::default());
    let firing_a = fire(&a.base(), "a", 16, burst_a.clone());
    burst_a.wait_acked(200, "A before B").await;

    let mut b = Node::start(&data_dir(dir.path(), "b"), &args).await;
    let burst_b = Arc::new(Burst::default());
    let firing_b = fire(&b.base(), "b", 16, burst_b.clone());
    let probe = probe_client();
    let deadline = Instant::now() + PATIENCE;
    let a_fenced = loop {
        let (standing_a, standing_b) = (
            standing(&probe, &mut a).await,
            standing(&probe, &mut b).await,
        );
        use Standing::{Ready, Stopped};
        match (standing_a, standing_b) {
            (Stopped, Stopped) => panic!(
                "both processes stopped: A acknowledged {}, B {}",
                burst_a.acked(),
                burst_b.acked()
            ),
            (Ready, Stopped) => break false,
            (Stopped, Ready) => break true,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "no process failed stop within 30 s: A {standing_a:?} acknowledged {}, B \
             {standing_b:?} acknowledged {} ({} answers 503 in all)",
            burst_a.acked(),
            burst_b.acked(),
            burst_a.unavailable() + burst_b.unavailable()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (mut fenced, survivor, survivor_burst) = if a_fenced {
        (a, b, &burst_b)
    } else {
        (b, a, &burst_a)
    };
    let fence = "this journal stops (fencing)";
    assert!(
        fenced.log().iter().any(|l| l.contains(fence)),
        "the stopped process does not name the fence"
    );
    assert!(!survivor.log().iter().any(|l| l.contains(fence)));
    // Still running (it may have exited instead): its commands answer 503 with Retry-After.
    if !fenced.exited() {
        let (status, retry_after, body) = deposit(&probe, &fenced.base(), "fw0", "probe-fenced", 1)
            .await
            .expect("the fenced process answers within 5 s");
        assert_eq!(status, 503, "{body}");
        assert!(retry_after.is_some(), "503 without Retry-After");
    }
    let acked = survivor_burst.acked();
    survivor_burst
        .wait_acked(acked + 200, "the survivor after the fence")
        .await;
    assert_eq!(
        standing(&probe, &mut fenced).await,
        Standing::Stopped,
        "a fence is final"
    );
    firing_a.stop().await;
    firing_b.stop().await;
    for burst in [&burst_a, &burst_b] {
        burst.assert_answers_were_201_or_503_with_retry_after();
    }
    eprintln!(
        "A acknowledged {}, B {}; {} was fenced",
        burst_a.acked(),
        burst_b.acked(),
        if a_fenced { "A" } else { "B" }
    );

    // The probe and the deposits the fenced process left open are retried at the survivor.
    burst_b.deposits.lock().unwrap().insert(
        "probe-fenced".into(),
        Deposit {
            uid: "fw0".into(),
            amount: 1,
            balance_after: None,
        },
    );
    let survivor_base = survivor.base();
    settle(&survivor_base, &burst_a).await;
    settle(&survivor_base, &burst_b).await;
    let survivor_log = survivor.log();
    let status = survivor.terminate().await;
    assert!(
        status.success(),
        "survivor exit {status:?}:\n{}",
        survivor_log.join("\n")
    );
    // The fenced one's exit status is not part of the promise, only that it stops.
    if !fenced.exited() {
        fenced.terminate().await;
    }

    // A fresh process with an empty data directory: what it reads is the log's alone.
    let reader_data = data_dir(dir.path(), "c");
    let reader = Node::start(&reader_data, &args).await;
    check_and_stop(reader, &reader_data, &args, &[&burst_a, &burst_b]).await;
    // The two writers' own data directories: their signed checkpoints agree with the log.
    for node in ["a", "b"] {
        let data = data_dir(dir.path(), node);
        let (data, args) = (data.to_str().unwrap().to_owned(), args.clone());
        let (ok, out) = tokio::task::spawn_blocking(move || {
            let mut verify = vec!["verify", "--data-dir", &data];
            verify.extend(args.iter().map(String::as_str));
            command(&verify)
        })
        .await
        .unwrap();
        assert!(ok && out.contains("result: OK"), "verify of {node}:\n{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_jetstream_store_answers_503_with_few_log_lines_and_recovers_once_it_has_room() {
    // Goal: issue 15's full disk on the JetStream backend: the nats-server's store reaches its
    // limit (`max_file_store`, the server's own bound on its disk) while 16 clients deposit.
    // Every deposit after that is a 503 with Retry-After (thousands of them), hongbao's log
    // takes a few lines for all of them, never a panic; once the server has room again
    // (restarted with a larger limit) deposits are acknowledged again without restarting
    // hongbao, and every deposit, acknowledged or retried, is in the log once; verify and
    // audit on the log exit 0.
    let Some(binary) = nats::binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = nats::single_synced_with(&binary, dir.path(), "  max_file_store: 2MB\n");
    let args = on_jetstream(&server.url(), 1);
    let data = data_dir(dir.path(), "data");
    let node = Node::start(&data, &args).await;
    let base = node.base();
    let burst = Arc::new(Burst::default());
    let firing = fire(&base, "full", 16, burst.clone());
    // Until the store is full: the clients see 503s and nothing more is acknowledged.
    let deadline = Instant::now() + Duration::from_secs(120);
    while burst.unavailable() == 0 {
        assert!(
            Instant::now() < deadline,
            "the store never filled: {} acknowledged; hongbao:\n{}",
            burst.acked(),
            node.log().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (acked_full, lines_full) = (burst.acked(), node.log().len());
    // A while at the full store, then 2,000 more refusals from a second set of clients.
    let refused = Arc::new(AtomicUsize::new(0));
    let http = client();
    let started = Instant::now();
    let tasks: Vec<_> = (0..16)
        .map(|w| {
            let (http, base, refused) = (http.clone(), base.clone(), refused.clone());
            tokio::spawn(async move {
                for n in 0..125 {
                    let order = format!("late-{w}-{n}");
                    let answer = deposit(&http, &base, "fw0", &order, 1).await;
                    let (status, retry_after, body) = answer.expect("an answer");
                    assert_eq!(status, 503, "{order}: {body}");
                    assert!(retry_after.is_some(), "{order}: 503 without Retry-After");
                    refused.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(refused.load(Ordering::Relaxed), 2_000);
    assert!(
        burst.acked() <= acked_full + 16,
        "acknowledged while the store was full: {} after {acked_full}",
        burst.acked()
    );
    let log = node.log();
    let seconds = started.elapsed().as_secs() as usize + 1;
    let lines = &log[lines_full..];
    // Each limited site its burst and then one a second (a few sites), and slack.
    let lines_max = 6 * (hongbao::logs::BURST as usize + seconds) + 40;
    assert!(
        lines.len() <= lines_max,
        "{} log lines for 2,000 refused deposits in {seconds} s (at most {lines_max}):\n{}",
        lines.len(),
        lines[..60.min(lines.len())].join("\n")
    );
    assert!(
        !log.iter().any(|l| l.contains("panicked")),
        "{}",
        log.join("\n")
    );

    // Room again: a larger limit. hongbao goes on without a restart.
    let _server = server
        .stop()
        .restart_edited(|config| config.replace("max_file_store: 2MB", "max_file_store: 1GB"));
    burst
        .wait_acked(acked_full + 200, "after the store had room")
        .await;
    firing.stop().await;
    burst.assert_answers_were_201_or_503_with_retry_after();
    eprintln!(
        "{acked_full} acknowledged before the store filled, {} in all; {} answers 503 to the \
         clients, 2,000 more refused; {} log lines while full",
        burst.acked(),
        burst.unavailable(),
        lines.len()
    );
    // The late deposits were refused: their outcome was a 503, so a retry lands them once.
    for w in 0..16 {
        for n in 0..125 {
            burst.unsettled(&format!("late-{w}-{n}"), "fw0", 1);
        }
    }
    settle(&base, &burst).await;
    check_and_stop(node, &data, &args, &[&burst]).await;
}
