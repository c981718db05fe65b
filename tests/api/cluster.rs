//! Three hongbao nodes (real processes) on one JetStream server (issue 13): every node
//! answers every request as the holder of its partition does; a node killed with `kill -9`,
//! paused past its lease with SIGSTOP, or restarted in turn under load loses no acknowledged
//! deposit and writes none twice. Gated like the JetStream tests (`HONGBAO_JETSTREAM=1` in CI).

use super::crash::{call, spawn_binary, Server};
use super::nats::{self, NatsServer};
use super::{metric, scrape, ADMIN, GATEWAY, ISSUER};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PARTITIONS: u32 = 8;
const LEASE_TTL_MS: u64 = 2_000;
/// Users the load spreads over (over every partition of 8: checked by `users_span_partitions`).
const USERS: usize = 32;
/// The configuration file every node of a fleet starts with, if the test wrote one.
const FLEET_CONFIG: &str = "hongbao.toml";

struct Fleet {
    /// One synced server, or three (then every stream and bucket has three replicas).
    js: Vec<Option<NatsServer>>,
    url: String,
    dir: tempfile::TempDir,
    nodes: Vec<Option<Server>>,
}

/// Starts node `id` (on `port`, or a free one) on the servers at `url` (three replicas when
/// it lists several).
fn start_node(dir: &Path, url: &str, id: &str, port: u16) -> Server {
    let data = dir.join(id).to_str().unwrap().to_owned();
    let addr = format!("127.0.0.1:{port}");
    let partitions = PARTITIONS.to_string();
    let ttl = LEASE_TTL_MS.to_string();
    let mut args = vec![
        "serve",
        "--data-dir",
        &data,
        "--addr",
        &addr,
        "--store",
        url,
        "--node-id",
        id,
        "--partitions",
        &partitions,
        "--lease-ttl-ms",
        &ttl,
    ];
    if url.contains(',') {
        args.extend(["--replicas", "3"]);
    } else {
        args.extend(["--replicas", "1", "--single-replica-synced"]);
    }
    // A fleet given a configuration (`Fleet::configure`) starts every node with it.
    let config = dir.join(FLEET_CONFIG);
    let config = config.to_str().unwrap().to_owned();
    if Path::new(&config).exists() {
        args.extend(["--config", &config]);
    }
    spawn_binary(&args, "hongbao node listening")
}

impl Fleet {
    /// A synced JetStream server and three nodes, once every partition is served.
    async fn start() -> Option<Fleet> {
        let binary = nats::binary()?;
        let dir = tempfile::tempdir().unwrap();
        let js = nats::single_synced(&binary, dir.path());
        Some(Fleet::on(vec![js], dir).await)
    }

    /// A synced JetStream server and three nodes started with the configuration `toml`.
    async fn start_configured(toml: &str) -> Option<Fleet> {
        let binary = nats::binary()?;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FLEET_CONFIG), toml).unwrap();
        let js = nats::single_synced(&binary, dir.path());
        Some(Fleet::on(vec![js], dir).await)
    }

    /// Three JetStream servers (three replicas of everything) and three nodes.
    async fn start_on_three() -> Option<Fleet> {
        let binary = nats::binary()?;
        let dir = tempfile::tempdir().unwrap();
        let servers = nats::cluster_of_three(&binary, dir.path());
        Some(Fleet::on(servers, dir).await)
    }

    async fn on(servers: Vec<NatsServer>, dir: tempfile::TempDir) -> Fleet {
        let url = format!(
            "nats://{}",
            servers
                .iter()
                .map(|s| format!("127.0.0.1:{}", s.port))
                .collect::<Vec<_>>()
                .join(",")
        );
        let nodes = ["n1", "n2", "n3"]
            .iter()
            .map(|id| Some(start_node(dir.path(), &url, id, 0)))
            .collect();
        let fleet = Fleet {
            js: servers.into_iter().map(Some).collect(),
            url,
            dir,
            nodes,
        };
        fleet.wait_balanced(3).await;
        fleet
    }

    fn base(&self, i: usize) -> String {
        self.nodes[i].as_ref().expect("node running").base()
    }

    fn bases(&self) -> Vec<String> {
        self.nodes.iter().flatten().map(Server::base).collect()
    }

    /// Starts node `i` again on the port it had (the clients keep their address list).
    fn restart(&mut self, i: usize, port: u16) {
        let id = format!("n{}", i + 1);
        self.nodes[i] = Some(start_node(self.dir.path(), &self.url, &id, port));
    }

    fn logs(&self) -> String {
        self.nodes
            .iter()
            .flatten()
            .map(|n| n.log.lock().unwrap().join("\n"))
            .collect::<Vec<_>>()
            .join("\n----\n")
    }

    /// Waits (40 s at most) until the running nodes agree that `live` nodes hold every
    /// partition with fair shares, and each serves what it holds.
    async fn wait_balanced(&self, live: usize) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let mut served = Vec::new();
            let mut ok = true;
            for base in self.bases() {
                match cluster_view(&client, &base).await {
                    Some(view) => {
                        let held = view["held"].as_array().unwrap().len();
                        // Its own leases served, and every partition's holder known to it
                        // (it forwards by what it last read).
                        ok &= view["serving"].as_u64() == Some(held as u64)
                            && view["nodes"].as_array().unwrap().len() == live
                            && view["partitions"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .all(|p| p["node"].is_string());
                        served.push(held);
                    }
                    None => ok = false,
                }
            }
            let fair = PARTITIONS as usize / live;
            if ok
                && served.iter().sum::<usize>() == PARTITIONS as usize
                && served.iter().all(|&n| n == fair || n == fair + 1)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "never balanced over {live} nodes (served {served:?}):\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Fleet {
    /// The options that open the fleet's logs from the command line.
    fn store_args(&self) -> Vec<&str> {
        let mut args = vec!["--store", self.url.as_str()];
        if self.url.contains(',') {
            args.extend(["--replicas", "3"]);
        } else {
            args.extend(["--replicas", "1", "--single-replica-synced"]);
        }
        args
    }

    /// `hongbao replay --cluster --stream STREAM --json`, from a data directory of its own.
    fn replay(&self, stream: &str) -> Value {
        let dir = tempfile::tempdir().unwrap();
        let output = Command::new(env!("CARGO_BIN_EXE_hongbao"))
            .args(["replay", "--cluster", "--json", "--stream", stream])
            .args(self.store_args())
            .args(["--data-dir", dir.path().to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    }

    /// The sum of the partitions' heads as the nodes serving them say.
    async fn heads(&self) -> u64 {
        let client = reqwest::Client::new();
        let mut heads = 0;
        for base in self.bases() {
            let view = cluster_view(&client, &base).await.expect("cluster view");
            heads += view["partitions"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|p| p["head"].as_u64())
                .sum::<u64>();
        }
        heads
    }

    /// Checks that a whole-fleet reader (`audit`, `verify`, `export`) read every record: at
    /// least the heads the nodes served before it started, at most those after it ended. A
    /// fleet at rest still appends now and then (a lane's late record, a slice's settlement),
    /// so an exact count against the heads before was a race (seen in CI: 2,400 read, 2,396
    /// before).
    async fn read_every_record(&self, before: u64, read: u64, what: &str) {
        let after = self.heads().await;
        assert!(
            before <= read && read <= after,
            "{what} read {read} records; the nodes served {before} before it and {after} after"
        );
    }

    /// `hongbao export --cluster`: one file per partition, each verified standalone against
    /// the head the export printed for it, all of them holding every record.
    async fn export_and_verify(&self) {
        let heads = self.heads().await;
        let dir = tempfile::tempdir().unwrap();
        let files = dir.path().join("export");
        let output = Command::new(env!("CARGO_BIN_EXE_hongbao"))
            .args(["export", "--cluster", "--output", files.to_str().unwrap()])
            .args(self.store_args())
            .args(["--data-dir", dir.path().join("reader").to_str().unwrap()])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "{said}");
        let mut records = 0;
        for n in 0..PARTITIONS {
            let file = files.join(format!("p{n:03}.jsonl"));
            let line = said
                .lines()
                .find(|l| l.starts_with(file.to_str().unwrap()))
                .unwrap_or_else(|| panic!("no head printed for {}:\n{said}", file.display()));
            let hash = line
                .split("hash ")
                .nth(1)
                .unwrap()
                .split(',')
                .next()
                .unwrap();
            records += line
                .rsplit(", ")
                .next()
                .and_then(|r| r.strip_suffix(" records"))
                .unwrap()
                .parse::<u64>()
                .unwrap();
            let verified = Command::new(env!("CARGO_BIN_EXE_hongbao"))
                .args([
                    "verify",
                    "--export",
                    file.to_str().unwrap(),
                    "--expect-head",
                    hash,
                ])
                .output()
                .unwrap();
            assert!(
                verified.status.success(),
                "{}: {}",
                file.display(),
                String::from_utf8_lossy(&verified.stdout)
            );
        }
        self.read_every_record(heads, records, "the export").await;
    }

    /// `hongbao verify --cluster` from a data directory of its own: every partition's chain
    /// holds, and the records it checked are every record the nodes serve.
    async fn verify(&self) {
        let heads = self.heads().await;
        let verifier = tempfile::tempdir().unwrap();
        let output = Command::new(env!("CARGO_BIN_EXE_hongbao"))
            .args(["verify", "--cluster"])
            .args(self.store_args())
            .args(["--data-dir", verifier.path().to_str().unwrap()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{text}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with('p')).collect();
        assert_eq!(lines.len(), PARTITIONS as usize, "{text}");
        assert!(lines.iter().all(|l| l.contains("  ok  ")), "{text}");
        let records = text
            .split(&format!("{PARTITIONS} partitions, "))
            .nth(1)
            .and_then(|rest| rest.split(" records").next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("verify printed no record count:\n{text}"));
        self.read_every_record(heads, records, "verify").await;
    }

    /// `hongbao audit --cluster` from a data directory of its own: every partition's log
    /// passes, and it read every record the nodes serve (the sum of their partitions' heads).
    /// `hongbao audit --cluster --json`, which must pass; its report.
    async fn audit(&self) -> Value {
        let heads = self.heads().await;
        let auditor = tempfile::tempdir().unwrap();
        let output = Command::new(env!("CARGO_BIN_EXE_hongbao"))
            .args(["audit", "--cluster", "--json"])
            .args(self.store_args())
            .args(["--data-dir", auditor.path().to_str().unwrap()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        let report: Value = serde_json::from_str(&text).unwrap_or_else(|_| {
            panic!(
                "audit printed no report:\n{text}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
        assert!(output.status.success() && report["ok"] == true, "{report}");
        assert_eq!(
            report["partitions"].as_array().unwrap().len(),
            PARTITIONS as usize
        );
        assert!(heads > 0);
        let events = report["events"].as_u64().expect("the audit's event count");
        self.read_every_record(heads, events, "the audit").await;
        report
    }
}

impl Drop for Fleet {
    /// A failed test leaves no node running.
    fn drop(&mut self) {
        for node in self.nodes.iter_mut().flatten() {
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
    }
}

async fn cluster_view(client: &reqwest::Client, base: &str) -> Option<Value> {
    let response = client
        .get(format!("{base}/v1/admin/cluster"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .ok()?;
    if response.status() != 200 {
        return None;
    }
    response.json().await.ok()
}

fn uid(n: usize) -> String {
    format!("k{n}")
}

/// The users spread over every partition of 8 (else the tests would not reach every node).
#[test]
fn users_span_partitions() {
    use hongbao::cluster::partition::Partitions;
    let partitions = Partitions::new(PARTITIONS).unwrap();
    let spanned: HashSet<u16> = (0..USERS)
        .map(|n| partitions.of(&format!("wallet:{}", uid(n))).0)
        .collect();
    assert_eq!(spanned.len(), PARTITIONS as usize, "{spanned:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_gives_the_same_answer_to_the_same_request() {
    let _heavy = super::heavy().await;
    let Some(fleet) = Fleet::start().await else {
        return;
    };
    let client = reqwest::Client::new();
    let bases = fleet.bases();
    // Deposits through the nodes in turn; each user's partition is held by one of them.
    let mut first = BTreeMap::new();
    for n in 0..USERS {
        let base = &bases[n % 3];
        let body = serde_json::json!({"order_id": format!("same-{n}"), "amount": 100 + n});
        let (status, answer) = call(
            &client,
            reqwest::Method::POST,
            format!("{base}/v1/wallets/{}/change/deposits", uid(n)),
            ADMIN,
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, 201, "{answer}\n{}", fleet.logs());
        first.insert(n, (body, answer));
    }
    // A cluster node serves no load tests: a marked deposit is refused, not taken as real
    // (the balances checked below would be off by its amount).
    let marked = client
        .post(format!(
            "{}/v1/wallets/{}/change/deposits",
            bases[1],
            uid(0)
        ))
        .bearer_auth(ADMIN)
        .header("x-hongbao-load-test", "1")
        .json(&serde_json::json!({"order_id": "load-test-1", "amount": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(marked.status().as_u16(), 403);
    let refusal: Value = marked.json().await.unwrap();
    assert_eq!(refusal["code"], "load_test_unavailable", "{refusal}");
    // Each node says it is ready to Prometheus as /readyz does (the alert rules read it).
    for base in &bases {
        let text = scrape(&client, base).await;
        assert_eq!(metric(&text, "hongbao_ready"), Some(1.0), "{base}");
    }
    // Each node's status figures cover the partitions it serves: their heads together are the
    // fleet's (between the heads the nodes report before and after: a fleet at rest still
    // appends now and then).
    let before = fleet.heads().await;
    let mut heads = 0;
    let mut appended = 0;
    for base in &bases {
        let (status, figures) = call(
            &client,
            reqwest::Method::GET,
            format!("{base}/status.json"),
            ADMIN,
            None,
        )
        .await;
        assert_eq!(status, 200, "{figures}");
        assert_eq!(
            (&figures["ready"], &figures["traffic"]),
            (&serde_json::json!(true), &serde_json::json!("real")),
            "{figures}"
        );
        heads += figures["log_head"].as_u64().unwrap();
        appended += figures["counters"]["events_appended"].as_u64().unwrap();
        let page = client.get(format!("{base}/status")).send().await.unwrap();
        assert_eq!(page.status().as_u16(), 200);
    }
    let after = fleet.heads().await;
    assert!(
        before <= heads && heads <= after && heads >= USERS as u64,
        "{before} <= {heads} <= {after}"
    );
    assert!(appended >= USERS as u64, "{appended} events appended");
    for (n, (body, answer)) in &first {
        for base in &bases {
            // A retry through any node replays the original answer.
            let (status, again) = call(
                &client,
                reqwest::Method::POST,
                format!("{base}/v1/wallets/{}/change/deposits", uid(*n)),
                ADMIN,
                Some(body.clone()),
            )
            .await;
            assert_eq!((status, &again), (201, answer), "retry through {base}");
            // The same order id with another amount is refused the same way everywhere.
            let (status, refused) = call(
                &client,
                reqwest::Method::POST,
                format!("{base}/v1/wallets/{}/change/deposits", uid(*n)),
                ADMIN,
                Some(serde_json::json!({"order_id": format!("same-{n}"), "amount": 1})),
            )
            .await;
            assert_eq!(status, 409, "{refused}");
            assert_eq!(refused["code"], "idempotency_conflict");
        }
    }
    // Every node counted the refusals it answered by their code, the forwarded ones too (the
    // holder's answer keeps its code), so an operator sees which 409 it was on the node the
    // client asked: each of the 3 x USERS refusals once where it was asked, and the two thirds
    // that were forwarded once more by their holder (through its own listener).
    let mut counted = 0.0;
    for base in &bases {
        let text = scrape(&client, base).await;
        counted += metric(
            &text,
            "hongbao_http_errors_total{code=\"idempotency_conflict\",route=\"/v1/wallets/{uid}/change/deposits\",status=\"409\"}",
        )
        .unwrap_or(0.0);
    }
    assert_eq!(counted, (5 * USERS) as f64, "refusals counted by code");
    for (n, (_, _)) in &first {
        let mut pages = Vec::new();
        for base in &bases {
            let (status, wallet) = call(
                &client,
                reqwest::Method::GET,
                format!("{base}/v1/wallets/{}", uid(*n)),
                GATEWAY,
                None,
            )
            .await;
            assert_eq!(status, 200, "{wallet}");
            assert_eq!(wallet["balances"]["change"], 100 + *n as u64, "{wallet}");
            let (status, page) = call(
                &client,
                reqwest::Method::GET,
                format!("{base}/v1/wallets/{}/ledger?limit=1", uid(*n)),
                GATEWAY,
                None,
            )
            .await;
            assert_eq!(status, 200, "{page}");
            pages.push((wallet, page));
        }
        assert!(
            pages.windows(2).all(|w| w[0] == w[1]),
            "nodes disagree on {}: {pages:?}",
            uid(*n)
        );
    }
    let mut forwarded = 0.0;
    for base in &bases {
        // An order id nobody sent and a coupon batch nobody created are unknown through
        // every node (their partitions' views).
        for (path, expected) in [
            ("/v1/rewards/o1", (404, Some("unknown_order"))),
            ("/v1/coupon-batches/b1", (404, Some("unknown_batch"))),
        ] {
            let (status, body) = call(
                &client,
                reqwest::Method::GET,
                format!("{base}{path}"),
                GATEWAY,
                None,
            )
            .await;
            assert_eq!((status, body["code"].as_str()), expected, "{path}: {body}");
        }
        let (status, _) = call(
            &client,
            reqwest::Method::GET,
            format!("{base}/v1/nope"),
            ADMIN,
            None,
        )
        .await;
        assert_eq!(status, 501);
        let (status, body) = call(
            &client,
            reqwest::Method::GET,
            format!("{base}/nope"),
            ADMIN,
            None,
        )
        .await;
        assert_eq!((status, body["code"].as_str()), (404, Some("no_route")));
        // The cluster view is for operators.
        let (status, _) = call(
            &client,
            reqwest::Method::GET,
            format!("{base}/v1/admin/cluster"),
            GATEWAY,
            None,
        )
        .await;
        assert_eq!(status, 403);
        let view = cluster_view(&client, base).await.unwrap();
        let owners: Vec<&str> = view["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["node"].as_str().unwrap())
            .collect();
        assert_eq!(owners.len(), PARTITIONS as usize, "{view}");
        let (status, ready) = call(
            &client,
            reqwest::Method::GET,
            format!("{base}/readyz"),
            ADMIN,
            None,
        )
        .await;
        assert_eq!(status, 200, "{ready}");
        // Per-partition series: one per partition this node serves.
        let text = scrape(&client, base).await;
        assert_eq!(
            metric(&text, "hongbao_partition_served"),
            Some(view["held"].as_array().unwrap().len() as f64),
            "{base}"
        );
        // Each served partition's own series, labelled with it: its log head as the
        // cluster view says; and no unlabelled copy of a per-log series on a node.
        for p in view["partitions"].as_array().unwrap() {
            if let Some(head) = p["head"].as_u64() {
                let key = p["partition"].as_str().unwrap();
                assert_eq!(
                    metric(
                        &text,
                        &format!("hongbao_log_head_seq{{partition=\"{key}\"}}")
                    ),
                    Some(head as f64),
                    "{base} {key}"
                );
            }
        }
        assert!(
            !text.lines().any(|l| l.starts_with("hongbao_log_head_seq ")),
            "{base}: an unlabelled log head on a cluster node"
        );
        forwarded += metric(
            &text,
            "hongbao_cluster_forwarded_total{outcome=\"answered\"}",
        )
        .expect("the forwarded series is exposed");
    }
    // Most requests above reached a node that does not hold the user's partition.
    assert!(forwarded >= USERS as f64, "forwarded only {forwarded}");
}

/// One acknowledged deposit.
#[derive(Debug, Clone)]
struct Acked {
    uid: String,
    order: String,
    amount: i64,
}

/// Clients sending deposits through every node. A 503 (a partition changing hands) or a
/// broken connection (a node killed) leaves the outcome unknown: the client retries the same
/// order id through the next node until it is acknowledged, as a client of a fleet would.
struct Load {
    acked: Arc<Mutex<Vec<Acked>>>,
    /// 503s seen, each with its Retry-After.
    moving: Arc<Mutex<Vec<Option<String>>>>,
    /// The first client that gave up, with the last answers it had.
    failed: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(bases: Vec<String>, workers: usize) -> Load {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let moving = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        // A stopped node holds a request until the client gives up on it.
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .unwrap();
        let tasks = (0..workers)
            .map(|w| {
                let (client, bases, acked, moving, failed, stop) = (
                    client.clone(),
                    bases.clone(),
                    acked.clone(),
                    moving.clone(),
                    failed.clone(),
                    stop.clone(),
                );
                tokio::spawn(async move {
                    let mut next = w;
                    for n in 0.. {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let uid = uid((w * 5 + n) % USERS);
                        let order = format!("load-w{w}-n{n}");
                        let amount = (n % 89 + 1) as i64;
                        let body = serde_json::json!({"order_id": order, "amount": amount});
                        // Long enough for a JetStream server's streams to elect new leaders
                        // on a loaded machine (a client retries through every node meanwhile);
                        // what is checked is that nothing acknowledged is lost.
                        let deadline = Instant::now() + Duration::from_secs(60);
                        // What the last attempts got, for the report if none is acknowledged.
                        let mut answers = std::collections::VecDeque::new();
                        loop {
                            if Instant::now() >= deadline {
                                let said = format!(
                                    "{order} never acknowledged in 60 s; the last answers: \
                                     {answers:?}"
                                );
                                failed.lock().unwrap().get_or_insert(said);
                                return;
                            }
                            next += 1;
                            let base = &bases[next % bases.len()];
                            let sent = client
                                .post(format!("{base}/v1/wallets/{uid}/change/deposits"))
                                .bearer_auth(ADMIN)
                                .json(&body)
                                .send()
                                .await;
                            if answers.len() == 8 {
                                answers.pop_front();
                            }
                            let response = match sent {
                                Ok(response) => {
                                    answers.push_back(format!(
                                        "{:?} {base}: {}",
                                        Instant::now(),
                                        response.status()
                                    ));
                                    response
                                }
                                Err(e) => {
                                    answers.push_back(format!("{:?} {base}: {e}", Instant::now()));
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                    continue;
                                }
                            };
                            match response.status().as_u16() {
                                201 => {
                                    let answer: Value = response.json().await.unwrap();
                                    assert_eq!(answer["amount"], amount);
                                    acked.lock().unwrap().push(Acked {
                                        uid: uid.clone(),
                                        order: order.clone(),
                                        amount,
                                    });
                                    break;
                                }
                                // 408: a node that was stopped timed the request out before
                                // reading it (nothing was done); retry like a 503.
                                408 => tokio::time::sleep(Duration::from_millis(50)).await,
                                503 => {
                                    moving.lock().unwrap().push(
                                        response
                                            .headers()
                                            .get("retry-after")
                                            .map(|v| v.to_str().unwrap().to_owned()),
                                    );
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                }
                                other => {
                                    let text = response.text().await.unwrap_or_default();
                                    panic!("{order} through {base}: {other} {text}");
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            acked,
            moving,
            failed,
            stop,
            tasks,
        }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Fails the test with the nodes' logs if a client gave up.
    fn check(&self, fleet: &Fleet, what: &str) {
        if let Some(failed) = self.failed.lock().unwrap().clone() {
            panic!("{what}: {failed}\n{}", fleet.logs());
        }
    }

    /// Waits (30 s at most) for `more` further acknowledgements.
    async fn progress(&self, fleet: &Fleet, more: usize, what: &str) {
        self.progress_within(fleet, more, Duration::from_secs(30), what)
            .await
    }

    /// Waits (`within` at most) for `more` further acknowledgements.
    async fn progress_within(&self, fleet: &Fleet, more: usize, within: Duration, what: &str) {
        let target = self.acked() + more;
        let deadline = Instant::now() + within;
        while self.acked() < target {
            self.check(fleet, what);
            assert!(
                Instant::now() < deadline,
                "load stalled: {what}\n{}",
                fleet.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the clients (each finishes its deposit in hand) and returns what was acknowledged.
    async fn finish(mut self, fleet: &Fleet) -> (Vec<Acked>, Vec<Option<String>>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in std::mem::take(&mut self.tasks) {
            task.await.expect("a client failed");
        }
        self.check(fleet, "finishing the load");
        let acked = self.acked.lock().unwrap().clone();
        let moving = self.moving.lock().unwrap().clone();
        (acked, moving)
    }
}

/// GET `path` as the gateway, retrying a 503 (a partition changing hands) for up to 15 s.
async fn get_settled(client: &reqwest::Client, base: &str, path: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let response = client
            .get(format!("{base}{path}"))
            .bearer_auth(GATEWAY)
            .send()
            .await
            .expect("request sent");
        let status = response.status().as_u16();
        let served_by = response
            .headers()
            .get("x-hongbao-served-by")
            .map(|v| v.to_str().unwrap().to_owned());
        let mut body: Value = response.json().await.unwrap_or(Value::Null);
        match status {
            200 => {
                // A list answer has no room for it.
                if let Some(object) = body.as_object_mut() {
                    object.insert("served_by".into(), served_by.into());
                }
                return body;
            }
            503 if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            _ => panic!("GET {base}{path}: {status} {body}"),
        }
    }
}

/// A user's change balance and whole ledger through one node. The wallet page's balance must
/// be the balance after its latest ledger line (one consistent read).
async fn ledger(client: &reqwest::Client, base: &str, uid: &str) -> (i64, Vec<Value>) {
    let wallet = get_settled(client, base, &format!("/v1/wallets/{uid}")).await;
    let balance = wallet["balances"]["change"].as_i64().unwrap();
    let latest = wallet["ledger"].as_array().unwrap().first().cloned();
    assert_eq!(
        latest
            .as_ref()
            .map_or(0, |l| l["balance_after"].as_i64().unwrap()),
        balance,
        "{uid} through {base}: the page's balance is not its latest line's: {wallet}"
    );
    let mut entries = Vec::new();
    let mut before: Option<u64> = None;
    loop {
        let path = match before {
            Some(b) => format!("/v1/wallets/{uid}/ledger?limit=500&before={b}"),
            None => format!("/v1/wallets/{uid}/ledger?limit=500"),
        };
        let page = get_settled(client, base, &path).await;
        entries.extend(page["ledger"].as_array().unwrap().iter().cloned());
        match page["next_before"].as_u64() {
            Some(b) => before = Some(b),
            None => break,
        }
    }
    (balance, entries)
}

/// Every acknowledged deposit is in its user's ledger exactly once, through every node, and
/// the balance is the ledger's sum.
async fn check_exactly_once(bases: &[String], acked: &[Acked]) {
    let client = reqwest::Client::new();
    // Views catch up in the background (on a busy machine a read may wait its full
    // read_wait_ms and answer from the last checkpoint, as on one node): read once every
    // node's wallet views have applied their logs.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut lag = 0;
        for base in bases {
            let view = cluster_view(&client, base).await.expect("cluster view");
            lag += view["partitions"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|p| p["view_lag"].as_u64())
                .sum::<u64>();
        }
        if lag == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "views still {lag} records behind"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut by_uid: HashMap<String, Vec<&Acked>> = HashMap::new();
    for a in acked {
        by_uid.entry(a.uid.clone()).or_default().push(a);
    }
    for n in 0..USERS {
        let uid = uid(n);
        let mut seen = Vec::new();
        for base in bases {
            let (balance, entries) = ledger(&client, base, &uid).await;
            let orders: Vec<&str> = entries
                .iter()
                .map(|e| e["order_id"].as_str().unwrap())
                .collect();
            let unique: HashSet<&str> = orders.iter().copied().collect();
            assert_eq!(unique.len(), orders.len(), "{uid}: an order written twice");
            let sum: i64 = entries.iter().map(|e| e["amount"].as_i64().unwrap()).sum();
            if balance != sum {
                let mut report = String::new();
                for other in bases {
                    let (b, e) = ledger(&client, other, &uid).await;
                    let seqs: Vec<u64> = e.iter().map(|x| x["seq"].as_u64().unwrap()).collect();
                    report.push_str(&format!(
                        "{other}: balance {b}, {} entries, sum {}, seqs {seqs:?}, first {}\n",
                        e.len(),
                        e.iter().map(|x| x["amount"].as_i64().unwrap()).sum::<i64>(),
                        e.first().cloned().unwrap_or_default()
                    ));
                }
                for other in bases {
                    report.push_str(&format!("{:?}\n", cluster_view(&client, other).await));
                }
                panic!("{uid}: balance {balance} is not the ledger's sum {sum}:\n{report}");
            }
            let amounts: HashMap<&str, i64> = entries
                .iter()
                .map(|e| {
                    (
                        e["order_id"].as_str().unwrap(),
                        e["amount"].as_i64().unwrap(),
                    )
                })
                .collect();
            for a in by_uid.get(&uid).map(Vec::as_slice).unwrap_or(&[]) {
                assert_eq!(
                    amounts.get(a.order.as_str()),
                    Some(&a.amount),
                    "acknowledged {} lost or changed",
                    a.order
                );
            }
            seen.push((balance, orders.len()));
        }
        assert!(
            seen.windows(2).all(|w| w[0] == w[1]),
            "{uid}: nodes disagree: {seen:?}"
        );
    }
}

fn signal(server: &Server, signal: &str) {
    assert!(Command::new("kill")
        .args([signal, &server.child.id().to_string()])
        .status()
        .unwrap()
        .success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_one_node_mid_load_loses_no_acknowledged_deposit() {
    let _heavy = super::heavy().await;
    let Some(mut fleet) = Fleet::start().await else {
        return;
    };
    let load = Load::start(fleet.bases(), 12);
    load.progress(&fleet, 200, "before the kill").await;
    let killed_at = Instant::now();
    let killed = fleet.nodes[1].take().unwrap();
    let port = killed.port;
    killed.kill9();
    // The survivors take the dead node's partitions (after its leases expire) and the load
    // goes on through them; requests to the dead node fail and are retried elsewhere.
    fleet.wait_balanced(2).await;
    let moved_in = killed_at.elapsed();
    load.progress(&fleet, 300, "after the kill").await;
    let (acked, moving) = load.finish(&fleet).await;
    assert!(
        moving.iter().all(|r| r.as_deref() == Some("1")),
        "a 503 without Retry-After: {moving:?}"
    );
    check_exactly_once(&fleet.bases(), &acked).await;
    eprintln!(
        "kill -9: partitions served again {} ms after the kill; {} acknowledged, {} 503s",
        moved_in.as_millis(),
        acked.len(),
        moving.len()
    );
    // The restarted node rejoins, takes its share back, and sees the same books.
    fleet.restart(1, port);
    fleet.wait_balanced(3).await;
    check_exactly_once(&fleet.bases(), &acked).await;
    fleet.audit().await;
    // `replay --cluster` finds a wallet's partition by itself: one event per deposit.
    let (_, entries) = ledger(&reqwest::Client::new(), &fleet.base(0), &uid(0)).await;
    let replayed = fleet.replay(&format!("wallet:{}", uid(0)));
    assert_eq!(replayed["version"], entries.len() as u64, "{replayed}");
    fleet.export_and_verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_paused_past_its_lease_writes_nothing_when_it_wakes() {
    let _heavy = super::heavy().await;
    let Some(fleet) = Fleet::start().await else {
        return;
    };
    let load = Load::start(fleet.bases(), 12);
    load.progress(&fleet, 200, "before the pause").await;
    let paused = fleet.nodes[1].as_ref().unwrap();
    signal(paused, "-STOP");
    // Past its leases: the others take its partitions; requests it holds in flight wait.
    tokio::time::sleep(Duration::from_millis(LEASE_TTL_MS * 2)).await;
    let client = reqwest::Client::new();
    let others = [fleet.base(0), fleet.base(2)];
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let mut held = 0;
        for base in &others {
            held += cluster_view(&client, base)
                .await
                .map_or(0, |v| v["held"].as_array().unwrap().len());
        }
        if held == PARTITIONS as usize {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "partitions of the paused node never moved"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    load.progress(&fleet, 100, "while one node is paused").await;
    signal(paused, "-CONT");
    // Woken, it finds its leases gone: it closes them as lost and its stale writes are
    // refused (by its lease guard, or by the log's fencing); the clients retry elsewhere.
    fleet.wait_balanced(3).await;
    load.progress(&fleet, 200, "after the wake-up").await;
    let (acked, _) = load.finish(&fleet).await;
    check_exactly_once(&fleet.bases(), &acked).await;
    let woke = paused.log.lock().unwrap().join("\n");
    eprintln!(
        "paused node: {} appends refused by its lease after waking",
        woke.matches("no longer writes it").count()
    );
    assert!(
        woke.contains("why=Lost"),
        "the paused node did not give its partitions up as lost:\n{woke}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_loses_nothing() {
    let _heavy = super::heavy().await;
    let Some(mut fleet) = Fleet::start().await else {
        return;
    };
    let load = Load::start(fleet.bases(), 12);
    load.progress(&fleet, 150, "before the restarts").await;
    for i in 0..3 {
        let node = fleet.nodes[i].take().unwrap();
        let port = node.port;
        let status = tokio::task::spawn_blocking(move || node.terminate())
            .await
            .unwrap();
        assert!(status.success(), "node {} did not leave cleanly", i + 1);
        fleet.wait_balanced(2).await;
        load.progress(&fleet, 100, "with one node down").await;
        // While it is down its address refuses connections and the clients retry elsewhere.
        fleet.restart(i, port);
        fleet.wait_balanced(3).await;
        load.progress(&fleet, 100, "after a restart").await;
    }
    let (acked, _) = load.finish(&fleet).await;
    check_exactly_once(&fleet.bases(), &acked).await;
}

/// Runs `hongbao serve` with `args` and no keys in the environment; returns its exit status
/// and what it printed (it must refuse before listening).
fn refused_start(args: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_hongbao"))
        .args(["serve", "--data-dir", dir.path().to_str().unwrap()])
        .args(["--addr", "127.0.0.1:0"])
        .args(args)
        .env_remove("HONGBAO_ADMIN_KEY")
        .env_remove("HONGBAO_ISSUER_KEY")
        .env_remove("HONGBAO_GATEWAY_KEY")
        .env_remove("HONGBAO_TOKEN_SECRET")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    // Nothing generated and left behind for the next start to pick up.
    assert!(
        !dir.path().join("keys.toml").exists(),
        "a refused node left generated keys behind"
    );
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_cluster_script_starts_three_servers_and_three_nodes_that_answer_alike() {
    // Goal: `scripts/cluster.sh` (the README's way to try a cluster) starts three JetStream
    // servers and three nodes from nothing, they share the partitions, and a deposit through
    // one node reads back through the two others; everything it started is stopped. Its first
    // runs failed here: a node starting on fresh servers read a just-created bucket before
    // its stream had a leader ("no responders") and exited.
    let _heavy = super::heavy().await;
    let Some(binary) = nats::binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh"))
        .env("SMOKE", "1")
        .env("DIR", dir.path())
        .env("PARTITIONS", PARTITIONS.to_string())
        .env("LEASE_TTL_MS", LEASE_TTL_MS.to_string())
        .env("HONGBAO", env!("CARGO_BIN_EXE_hongbao"))
        .env("HONGBAO_NATS_SERVER", &binary)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    let logs: String = ["n1", "n2", "n3"]
        .iter()
        .map(|n| std::fs::read_to_string(dir.path().join(format!("{n}.log"))).unwrap_or_default())
        .collect();
    assert!(
        output.status.success() && text.contains("smoke: ok"),
        "{text}\n{logs}"
    );
    // Nothing left running on the script's data directory.
    let ps = Command::new("pgrep")
        .args(["-f", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&ps.stdout).trim().is_empty(),
        "left running: {}",
        String::from_utf8_lossy(&ps.stdout)
    );
}

#[test]
fn a_node_is_refused_plainly_when_it_cannot_form_a_cluster() {
    // Goal: each mistake an operator can make starting a node is refused before anything
    // starts, with the reason and what to do (no NATS is needed to be refused).
    let (ok, text) = refused_start(&["--node-id", "n1", "--store", "nats://127.0.0.1:1"]);
    assert!(!ok && text.contains("HONGBAO_ADMIN_KEY"), "{text}");
    let (ok, text) = refused_start(&["--node-id", "n1"]);
    assert!(!ok && text.contains("--store nats://"), "{text}");
    let (ok, text) = refused_start(&["--node-id", "n 1", "--store", "nats://127.0.0.1:1"]);
    assert!(!ok && text.contains("--node-id"), "{text}");
    let (ok, text) = refused_start(&[
        "--node-id",
        "n1",
        "--partitions",
        "0",
        "--store",
        "nats://127.0.0.1:1",
    ]);
    assert!(!ok && text.contains("--partitions"), "{text}");
    // Cluster options without a node id are a usage error, not silently ignored.
    let (ok, text) = refused_start(&["--partitions", "8"]);
    assert!(!ok && text.contains("--node-id"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_one_jetstream_server_of_three_under_load_loses_nothing() {
    let _heavy = super::heavy().await;
    // Goal: with every partition log and lease bucket on three replicas, killing one of the
    // three JetStream servers mid-load leaves the service answering (the nodes connected to
    // it reconnect to the others; its streams elect new leaders), and every acknowledged
    // deposit is there exactly once.
    let Some(mut fleet) = Fleet::start_on_three().await else {
        return;
    };
    let load = Load::start(fleet.bases(), 12);
    load.progress(&fleet, 150, "before the server is killed")
        .await;
    let killed_at = Instant::now();
    let killed = fleet.js[0].take().unwrap().kill();
    // Within 60 s, not 30: the streams and buckets led by the dead server elect new leaders
    // (the lease bucket's took 5-11 s here), every lease runs out meanwhile (2 s TTL), and the
    // partitions close and open again; 16 s in most runs on an idle machine, and a loaded CI
    // host stalled past 30 s.
    load.progress_within(
        &fleet,
        300,
        Duration::from_secs(60),
        "with one JetStream server down",
    )
    .await;
    eprintln!(
        "300 deposits acknowledged {:?} after the JetStream server was killed",
        killed_at.elapsed()
    );
    let (acked, _) = load.finish(&fleet).await;
    fleet.wait_balanced(3).await;
    check_exactly_once(&fleet.bases(), &acked).await;
    drop(killed);
}

/// Sends a request through the nodes in turn until one answers with something other than
/// "try again" (a refused connection, 503 with Retry-After, 429, 408): the client's side of a
/// node dying, always with the same business ids. Gives up after 60 s.
async fn send_retrying(
    client: &reqwest::Client,
    bases: &[String],
    first: usize,
    method: reqwest::Method,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last;
    for attempt in 0.. {
        let base = &bases[(first + attempt) % bases.len()];
        let mut request = client
            .request(method.clone(), format!("{base}{path}"))
            .bearer_auth(key)
            .timeout(Duration::from_secs(15));
        if let Some(body) = &body {
            request = request.json(body);
        }
        let answered = match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let retry = matches!(status, 408 | 429 | 503);
                let body = response.json().await.unwrap_or(Value::Null);
                last = format!("{status} {body} from {base}");
                (!retry).then_some((status, body))
            }
            Err(e) => {
                last = format!("{e} from {base}");
                None
            }
        };
        if let Some(answer) = answered {
            return answer;
        }
        assert!(
            Instant::now() < deadline,
            "{method} {path}: no answer in 60 s (the last: {last})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn red_packets_move_money_between_partitions_exactly_once_through_a_kill() {
    // Goal: a packet's escrow lives in its own partition, its sender's and claimers' wallets
    // in others (commands cross partitions through the holders). Packets are created, paid,
    // claimed and expired through every node while one node is killed with kill -9: every
    // claim answered is credited to its claimer exactly once, every expired packet's
    // remainder goes back to its sender once, no money is created or lost (from the
    // client's side and by the cluster audit), and every node tells the same packet.
    let _heavy = super::heavy().await;
    let Some(mut fleet) = Fleet::start().await else {
        return;
    };
    let client = reqwest::Client::new();
    let bases = fleet.bases();
    const SENDERS: usize = 4;
    const DEPOSIT: i64 = 10_000;
    const PACKETS: usize = 12;
    const TOTAL: i64 = 1_000;
    const SHARES: usize = 5;
    let post = reqwest::Method::POST;
    for s in 0..SENDERS {
        let (status, body) = send_retrying(
            &client,
            &bases,
            s,
            post.clone(),
            &format!("/v1/wallets/{}/change/deposits", uid(s)),
            ADMIN,
            Some(serde_json::json!({"order_id": format!("fund-{s}"), "amount": DEPOSIT})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }
    // Every third packet expires soon after its claims; the others are claimed out.
    let expiring = |k: usize| k.is_multiple_of(3);
    let mut partitions = HashSet::new();
    for k in 0..PACKETS {
        let id = format!("pk-{k}");
        partitions.insert(packet_partition(&id));
        let spec = serde_json::json!({"sender_uid": uid(k % SENDERS), "total": TOTAL,
            "count": SHARES, "split": "lucky", "expires_in_s": if expiring(k) { 3 } else { 600 }});
        c2c_packet(&client, &bases, k, &id, spec, &format!("pay-{k}")).await;
    }
    assert!(partitions.len() > 3, "the packets span few partitions");
    // Claims through every node; one node is killed half-way and the clients go on.
    let mut claimed: BTreeMap<String, i64> = BTreeMap::new();
    let mut per_packet = [0i64; PACKETS];
    let mut order: Vec<(usize, usize)> = Vec::new();
    for k in (0..PACKETS).filter(|k| expiring(*k)) {
        order.extend((0..2).map(|c| (k, c)));
    }
    for k in (0..PACKETS).filter(|k| !expiring(*k)) {
        order.extend((0..SHARES).map(|c| (k, c)));
    }
    let kill_at = order.len() / 2;
    let (mut killed, mut answered) = (None, 0);
    for (i, (k, c)) in order.iter().copied().enumerate() {
        if i == kill_at {
            let node = fleet.nodes[1].take().unwrap();
            killed = Some(node.port);
            node.kill9();
        }
        let claimer = uid(SENDERS + (k * 7 + c) % (USERS - SENDERS));
        let path = format!("/v1/packets/pk-{k}/claims");
        let body = serde_json::json!({"uid": claimer});
        let (status, answer) = send_retrying(
            &client,
            &bases,
            i,
            post.clone(),
            &path,
            GATEWAY,
            Some(body.clone()),
        )
        .await;
        match status {
            200 => {
                let amount = answer["amount"].as_i64().unwrap();
                *claimed.entry(claimer.clone()).or_default() += amount;
                per_packet[k] += amount;
                answered += 1;
                // The same claim again, through another node: the same answer.
                let (again_status, again) = send_retrying(
                    &client,
                    &bases,
                    i + 1,
                    post.clone(),
                    &path,
                    GATEWAY,
                    Some(body),
                )
                .await;
                assert_eq!(
                    (again_status, &again),
                    (200, &answer),
                    "claim {k}/{claimer}"
                );
            }
            // An expiring packet's claims may come after its deadline (a slow hand-over).
            410 if expiring(k) => {}
            _ => panic!("claim {k}/{claimer}: {status} {answer}"),
        }
    }
    fleet.wait_balanced(2).await;
    let bases = fleet.bases();
    // What each user must hold once every transfer and refund has landed.
    let mut expected: BTreeMap<String, i64> = claimed.clone();
    for s in 0..SENDERS {
        let mut balance = DEPOSIT;
        for k in (0..PACKETS).filter(|k| k % SENDERS == s) {
            balance -= TOTAL;
            if expiring(k) {
                balance += TOTAL - per_packet[k];
            }
        }
        *expected.entry(uid(s)).or_default() += balance;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut held = BTreeMap::new();
        for user in expected.keys() {
            let wallet = get_settled(&client, &bases[0], &format!("/v1/wallets/{user}")).await;
            held.insert(user.clone(), wallet["balances"]["change"].as_i64().unwrap());
        }
        if held == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "balances never settled:\nheld     {held:?}\nexpected {expected:?}\n{}",
            fleet.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // No money created or lost, from the client's side: the wallets hold the deposits.
    assert_eq!(expected.values().sum::<i64>(), DEPOSIT * SENDERS as i64);
    // Each claim is one ledger line of its claimer, read through every node.
    for (user, amount) in &claimed {
        for base in &bases {
            let (balance, entries) = ledger(&client, base, user).await;
            assert_eq!(balance, *amount, "{user} through {base}");
            let transfers: i64 = entries
                .iter()
                .filter(|e| e["entry"] == "claim_transfer")
                .map(|e| e["amount"].as_i64().unwrap())
                .sum();
            assert_eq!(transfers, *amount, "{user} through {base}: {entries:?}");
        }
    }
    // Every node tells the same packet, and the expired ones are refunded.
    for k in 0..PACKETS {
        let mut seen = Vec::new();
        for base in &bases {
            let mut packet = get_settled(&client, base, &format!("/v1/packets/pk-{k}")).await;
            packet["served_by"] = Value::Null;
            seen.push(packet);
        }
        assert!(seen.windows(2).all(|w| w[0] == w[1]), "{seen:?}");
        let state = seen[0]["state"].as_str().unwrap();
        assert_eq!(
            state,
            if expiring(k) { "expired" } else { "exhausted" },
            "{}",
            seen[0]
        );
    }
    // The transfers were commands to the claimers' wallet partitions: on another node through
    // NATS, or on the same node's cell directly.
    let (mut sent, mut local) = (0.0, 0.0);
    for base in &bases {
        let text = scrape(&client, base).await;
        let outcome = |o: &str| {
            metric(
                &text,
                &format!("hongbao_cluster_commands_sent_total{{outcome=\"{o}\"}}"),
            )
            .expect("the commands series is exposed")
        };
        sent += outcome("answered");
        local += outcome("local");
    }
    assert!(sent > 0.0, "no command crossed to another node");
    eprintln!("commands to other partitions: {sent} through NATS, {local} on the same node");
    eprintln!(
        "packets: {PACKETS} over {} partitions, {answered} claims answered ({} claimers, {} fen), node n2 killed after {kill_at} claims",
        partitions.len(),
        claimed.len(),
        claimed.values().sum::<i64>()
    );
    fleet.restart(1, killed.unwrap());
    fleet.wait_balanced(3).await;
    fleet.audit().await;
    fleet.verify().await;
}

/// The partition of a packet (the deployment's map, as the nodes compute it).
fn packet_partition(id: &str) -> u16 {
    hongbao::cluster::partition::Partitions::new(PARTITIONS)
        .unwrap()
        .of(&format!("packet:{id}"))
        .0
}

/// Tries a C2C packet creation through `base` for a sender without money: `201` when C2C
/// sending is on, `503 c2c_send_off` when the fleet switched it off.
async fn c2c_create_status(client: &reqwest::Client, base: &str, id: &str) -> (u16, Value) {
    call(
        client,
        reqwest::Method::POST,
        format!("{base}/v1/packets"),
        GATEWAY,
        Some(
            serde_json::json!({"packet_id": id, "sender_uid": "nobody", "mode": "c2c",
            "total": 100, "count": 1, "split": "even"}),
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_changed_through_one_node_is_in_force_on_every_node_and_survives_its_home() {
    // Goal: the switches are one stream for the fleet (in partition p000): turned off through
    // one node, C2C sending is refused by every node for packets of every partition within a
    // moment; every node lists the same switches, naming who changed them; the holder of
    // their home killed with kill -9, the switch stays off on the survivors and on the node
    // that takes the home; turned on again, every node creates packets again.
    let _heavy = super::heavy().await;
    let Some(mut fleet) = Fleet::start().await else {
        return;
    };
    let client = reqwest::Client::new();
    let switch = |on: bool| serde_json::json!({ "on": on });
    let (status, body) = call(
        &client,
        reqwest::Method::PUT,
        format!("{}/v1/admin/switches/c2c_send", fleet.base(2)),
        ADMIN,
        Some(switch(false)),
    )
    .await;
    assert_eq!(
        (status, &body["c2c_send"]),
        (200, &Value::Bool(false)),
        "{body}"
    );
    // Every node, packets of many partitions: refused once each node has read the change.
    let refused_everywhere = |fleet: &Fleet, round: &'static str| {
        let (client, bases) = (client.clone(), fleet.bases());
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            for (i, base) in bases.iter().enumerate() {
                for k in 0..8 {
                    let id = format!("sw-{round}-{i}-{k}");
                    loop {
                        let (status, body) = c2c_create_status(&client, base, &id).await;
                        if status == 503 && body["code"] == "c2c_send_off" {
                            break;
                        }
                        assert!(Instant::now() < deadline, "{base} {id}: {status} {body}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    };
    refused_everywhere(&fleet, "off").await;
    let mut lists = Vec::new();
    for base in fleet.bases() {
        let (status, list) = call(
            &client,
            reqwest::Method::GET,
            format!("{base}/v1/admin/switches"),
            ADMIN,
            None,
        )
        .await;
        assert_eq!(status, 200, "{list}");
        assert_eq!(list["c2c_send"], false, "{list}");
        assert_eq!(list["changed_by"]["c2c_send"]["role"], "admin", "{list}");
        lists.push(list);
    }
    assert!(lists.windows(2).all(|w| w[0] == w[1]), "{lists:?}");
    // Kill the node serving p000 (the switches' home); the switch stays off.
    let view = cluster_view(&client, &fleet.base(0)).await.unwrap();
    let home = view["partitions"][0]["node"].as_str().unwrap().to_owned();
    let victim: usize = home.trim_start_matches('n').parse::<usize>().unwrap() - 1;
    let node = fleet.nodes[victim].take().unwrap();
    let port = node.port;
    node.kill9();
    fleet.wait_balanced(2).await;
    refused_everywhere(&fleet, "after-kill").await;
    fleet.restart(victim, port);
    fleet.wait_balanced(3).await;
    refused_everywhere(&fleet, "after-restart").await;
    // On again, through another node: every node creates packets again.
    let (status, body) = call(
        &client,
        reqwest::Method::PUT,
        format!(
            "{}/v1/admin/switches/c2c_send",
            fleet.base((victim + 1) % 3)
        ),
        ADMIN,
        Some(switch(true)),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(10);
    for (i, base) in fleet.bases().iter().enumerate() {
        for k in 0..8 {
            let id = format!("sw-on-{i}-{k}");
            loop {
                let (status, body) = c2c_create_status(&client, base, &id).await;
                if status == 201 {
                    break;
                }
                assert!(Instant::now() < deadline, "{base} {id}: {status} {body}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    fleet.audit().await;
}

/// Sets switch `name` through `base` and waits long enough for every node to read it (each
/// reads the fleet's switches every 250 ms).
async fn set_switch(client: &reqwest::Client, base: &str, name: &str, on: bool) {
    let (status, body) = call(
        client,
        reqwest::Method::PUT,
        format!("{base}/v1/admin/switches/{name}"),
        ADMIN,
        Some(serde_json::json!({ "on": on })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewards_stay_within_budget_and_are_pending_or_credited_on_every_node_through_a_kill() {
    // Goal: rewards of one activity (its budget in one partition) for users of every
    // partition, sent through every node while crediting is paused fleet-wide: accepted up
    // to the budget and not a fen beyond, each shown pending on its user's wallet page through
    // every node (noted on the wallet's own partition) and `accepted` by its order id
    // through every node (a refused or unknown order id: 404), the same answers again after one node
    // is killed with kill -9; crediting resumed, each accepted reward is credited once and no
    // longer pending and `credited` by its order id, the activity's page agrees, and the
    // cluster audit passes (budgets,
    // credits and notes checked across partitions).
    let _heavy = super::heavy().await;
    let Some(mut fleet) = Fleet::start().await else {
        return;
    };
    let client = reqwest::Client::new();
    const BUDGET: u64 = 10_000;
    const REWARDS: usize = 60;
    let (status, body) = call(
        &client,
        reqwest::Method::PUT,
        format!("{}/v1/admin/activities/cny/budget", fleet.base(2)),
        ADMIN,
        Some(serde_json::json!({"cash": BUDGET, "subsidy": 0})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    set_switch(&client, &fleet.base(0), "reward_lanes", false).await;
    let reward = |k: usize| {
        serde_json::json!({"order_id": format!("rw-{k}"), "uid": uid(k % USERS),
            "activity_id": "cny", "scene": "rain", "kind": "cash", "amount": 200 + k})
    };
    // Sent in order with growing amounts: accepted is the longest prefix within the budget.
    let mut expected_accepted = Vec::new();
    let mut sum = 0;
    for k in 0..REWARDS {
        if sum + 200 + k as u64 > BUDGET {
            break;
        }
        sum += 200 + k as u64;
        expected_accepted.push(k);
    }
    let send_all = |bases: Vec<String>| {
        let client = client.clone();
        async move {
            let mut accepted = Vec::new();
            for k in 0..REWARDS {
                let (status, body) = send_retrying(
                    &client,
                    &bases,
                    k,
                    reqwest::Method::POST,
                    "/v1/rewards",
                    ISSUER,
                    Some(reward(k)),
                )
                .await;
                match (status, body["code"].as_str()) {
                    (202, _) => accepted.push(k),
                    (409, Some("budget_exhausted")) => {}
                    _ => panic!("reward {k}: {status} {body}"),
                }
            }
            accepted
        }
    };
    assert_eq!(send_all(fleet.bases()).await, expected_accepted);
    let pending_on = |fleet: &Fleet, k: usize| {
        let (client, bases) = (client.clone(), fleet.bases());
        async move {
            let mut pages = Vec::new();
            for base in &bases {
                let wallet =
                    get_settled(&client, base, &format!("/v1/wallets/{}", uid(k % USERS))).await;
                let pending = wallet["pending"].as_array().unwrap().clone();
                pages.push((pending, wallet["balances"].clone()));
            }
            pages
        }
    };
    // Paused: every accepted reward is pending on its user's page, through every node.
    for &k in &expected_accepted {
        for (pending, balances) in pending_on(&fleet, k).await {
            assert!(
                pending.iter().any(|p| p["order_id"] == format!("rw-{k}")
                    && p["activity_id"] == "cny"
                    && p["amount"] == 200 + k as u64),
                "rw-{k} not pending for {}: {pending:?}",
                uid(k % USERS)
            );
            assert_eq!(balances["activity"], 0, "credited while paused");
        }
    }
    // Each reward's status by its order id alone, and with its activity, through every node
    // (asked of the order id's registry shard, then of its intake shard): accepted. A reward
    // refused for budget (its order id claimed all the same) and an order id never sent: 404.
    for &k in &expected_accepted {
        reward_status_everywhere(&client, &fleet.bases(), k, "accepted").await;
    }
    let refused = (0..REWARDS).find(|k| !expected_accepted.contains(k));
    for order_id in refused
        .map(|k| format!("rw-{k}"))
        .into_iter()
        .chain(["rw-none".into()])
    {
        for (path, status, body) in status_everywhere(&client, &fleet.bases(), &order_id).await {
            let answer = (status, body["code"].as_str());
            assert_eq!(answer, (404, Some("unknown_order")), "{path}: {body}");
        }
    }
    // The fleet's pending gauge, summed over every partition, is what is pending.
    assert_eq!(
        fleet_cash_pending(&client, &fleet.bases()).await,
        expected_accepted.len() as i64
    );
    // Kill a node; the same rewards again through the others: the same answers.
    let node = fleet.nodes[1].take().unwrap();
    let port = node.port;
    node.kill9();
    fleet.wait_balanced(2).await;
    assert_eq!(send_all(fleet.bases()).await, expected_accepted);
    set_switch(&client, &fleet.base(0), "reward_lanes", true).await;
    // Each user's activity balance is the sum of their accepted rewards, none pending.
    let mut owed: BTreeMap<String, u64> = BTreeMap::new();
    for &k in &expected_accepted {
        *owed.entry(uid(k % USERS)).or_default() += 200 + k as u64;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    'settle: loop {
        let mut settled = true;
        for (user, amount) in &owed {
            for base in fleet.bases() {
                let wallet = get_settled(&client, &base, &format!("/v1/wallets/{user}")).await;
                settled &= wallet["balances"]["activity"] == *amount
                    && wallet["pending"].as_array().unwrap().is_empty();
                assert!(
                    wallet["balances"]["activity"].as_u64().unwrap() <= *amount,
                    "{user} credited beyond what was accepted: {wallet}"
                );
            }
        }
        if settled {
            break 'settle;
        }
        assert!(
            Instant::now() < deadline,
            "credits never settled\n{}",
            fleet.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for &k in &expected_accepted {
        reward_status_everywhere(&client, &fleet.bases(), k, "credited").await;
    }
    // Every reward settled: nothing pending for the fleet. (Each partition saturating at zero,
    // as before, left the activity's partition pending for ever: its rewards were settled in
    // the wallets' partitions.)
    assert_eq!(fleet_cash_pending(&client, &fleet.bases()).await, 0);
    for base in fleet.bases() {
        let (status, activity) = call(
            &client,
            reqwest::Method::GET,
            format!("{base}/v1/admin/activities/cny"),
            ADMIN,
            None,
        )
        .await;
        assert_eq!(status, 200, "{activity}");
        assert_eq!(activity["accepted"]["cash"], sum, "{activity}");
        assert_eq!(activity["remaining"]["cash"], BUDGET - sum, "{activity}");
    }
    fleet.restart(1, port);
    fleet.wait_balanced(3).await;
    fleet.audit().await;
    eprintln!(
        "rewards: {} of {REWARDS} accepted for {sum} of a {BUDGET} fen budget, over {} users",
        expected_accepted.len(),
        owed.len()
    );
}

/// `GET /v1/rewards/{order_id}`, without and with `?activity_id=cny`, through every node:
/// each (path via node, status, body).
async fn status_everywhere(
    client: &reqwest::Client,
    bases: &[String],
    order_id: &str,
) -> Vec<(String, u16, Value)> {
    let mut answers = Vec::new();
    for base in bases {
        for query in ["", "?activity_id=cny"] {
            let path = format!("/v1/rewards/{order_id}{query}");
            let one = std::slice::from_ref(base);
            let (status, body) =
                send_retrying(client, one, 0, reqwest::Method::GET, &path, GATEWAY, None).await;
            answers.push((format!("{path} via {base}"), status, body));
        }
    }
    answers
}

/// `rw-{k}` of `rewards_stay_within_budget...` through every node, with and without its
/// activity: the reward as sent, in `status`.
async fn reward_status_everywhere(
    client: &reqwest::Client,
    bases: &[String],
    k: usize,
    status: &str,
) {
    for (path, code, body) in status_everywhere(client, bases, &format!("rw-{k}")).await {
        assert_eq!(code, 200, "{path}: {body}");
        let seen = (&body["status"], &body["activity_id"], &body["uid"]);
        let sent = (
            &Value::from(status),
            &Value::from("cny"),
            &Value::from(uid(k % USERS)),
        );
        assert_eq!(seen, sent, "{path}: {body}");
        let seen = (&body["amount"], &body["kind"]);
        assert_eq!(
            seen,
            (&Value::from(200 + k as u64), &Value::from("cash")),
            "{path}: {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coupon_and_item_rewards_are_delivered_once_and_noted_pending_until_then_on_every_node() {
    // Goal: coupon and item rewards, sent through every node, are noted pending on their
    // users' wallet pages (the wallets' own partitions) and `accepted` by order id through
    // every node while the lanes are paused; a node is killed with kill -9 and the lanes
    // resumed: each item reward is delivered, each coupon reward delivered (a coupon issued to
    // its user) while the batch's stock lasts and failed `sold_out` beyond it, exactly the
    // stock issued, no note left pending, the same through every node, and the audit proves
    // every note and its settling against the activities' books.
    let _heavy = super::heavy().await;
    let Some(mut fleet) = Fleet::start().await else {
        return;
    };
    let client = reqwest::Client::new();
    const STOCK: u64 = 5;
    create_coupon_batch(&client, &fleet.bases(), "cr1", STOCK, 1).await;
    set_switch(&client, &fleet.base(0), "reward_lanes", false).await;
    let reward = |k: usize| {
        let (kind, order) = if k.is_multiple_of(2) {
            ("item", "it")
        } else {
            ("coupon", "cp")
        };
        serde_json::json!({"order_id": format!("{order}-{k}"), "uid": uid(k),
            "activity_id": "gifts", "scene": "cards", "kind": kind, "amount": 1,
            "batch_id": (kind == "coupon").then_some("cr1")})
    };
    let order = |k: usize| reward(k)["order_id"].as_str().unwrap().to_owned();
    // One user per reward (a coupon per user at most: the batch's per-user limit).
    let rewards = 16;
    for k in 0..rewards {
        let (status, body) = send_retrying(
            &client,
            &fleet.bases(),
            k,
            reqwest::Method::POST,
            "/v1/rewards",
            ISSUER,
            Some(reward(k)),
        )
        .await;
        assert_eq!(status, 202, "{}: {body}", order(k));
    }
    // Paused: each item reward is pending on its user's page and `accepted` by its order id,
    // through every node.
    for k in (0..rewards).step_by(2) {
        for base in fleet.bases() {
            let wallet = get_settled(&client, &base, &format!("/v1/wallets/{}", uid(k))).await;
            assert!(
                wallet["pending"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["order_id"] == order(k) && p["kind"] == "item"),
                "{} not pending via {base}: {wallet}",
                order(k)
            );
            let status = get_settled(&client, &base, &format!("/v1/rewards/{}", order(k))).await;
            assert_eq!(
                (&status["status"], &status["kind"]),
                (&Value::from("accepted"), &Value::from("item")),
                "{status}"
            );
        }
    }
    let node = fleet.nodes[2].take().unwrap();
    let port = node.port;
    node.kill9();
    fleet.wait_balanced(2).await;
    set_switch(&client, &fleet.base(0), "reward_lanes", true).await;
    // Every reward settles: items delivered, coupons delivered up to the stock, then failed.
    let deadline = Instant::now() + Duration::from_secs(60);
    let outcomes = loop {
        let mut outcomes = BTreeMap::new();
        for k in 0..rewards {
            let status = get_settled(
                &client,
                &fleet.base(0),
                &format!("/v1/rewards/{}", order(k)),
            )
            .await;
            outcomes.insert(
                k,
                (
                    status["status"].as_str().unwrap().to_owned(),
                    status["reason"].clone(),
                ),
            );
        }
        if outcomes.values().all(|(s, _)| s != "accepted") {
            break outcomes;
        }
        assert!(
            Instant::now() < deadline,
            "rewards never settled: {outcomes:?}\n{}",
            fleet.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let mut delivered_coupons = Vec::new();
    for (k, (status, reason)) in &outcomes {
        match (k % 2, status.as_str()) {
            (0, "delivered") => {}
            (1, "delivered") => delivered_coupons.push(*k),
            (1, "failed") => assert_eq!(reason, "sold_out", "{}", order(*k)),
            _ => panic!("{}: {status} {reason}", order(*k)),
        }
    }
    assert_eq!(delivered_coupons.len() as u64, STOCK, "{outcomes:?}");
    // The same through every node; nothing pending on any page; each delivered coupon is its
    // user's, and nobody else holds one of the batch.
    for base in fleet.bases() {
        for (k, (status, _)) in &outcomes {
            let answer = get_settled(&client, &base, &format!("/v1/rewards/{}", order(*k))).await;
            assert_eq!(
                answer["status"],
                status.as_str(),
                "{} via {base}",
                order(*k)
            );
        }
        let mut holders = Vec::new();
        for user in 0..rewards {
            let wallet = get_settled(&client, &base, &format!("/v1/wallets/{}", uid(user))).await;
            assert!(
                wallet["pending"].as_array().unwrap().is_empty(),
                "pending via {base}: {wallet}"
            );
            let coupons = get_settled(
                &client,
                &base,
                &format!("/v1/wallets/{}/coupons", uid(user)),
            )
            .await;
            let held = coupons
                .as_array()
                .unwrap()
                .iter()
                .filter(|c| c["batch_id"] == "cr1")
                .count();
            holders.extend(std::iter::repeat_n(user, held));
        }
        let mut expected: Vec<usize> = delivered_coupons.clone();
        expected.sort();
        assert_eq!(holders, expected, "coupon holders via {base}");
        let batch = get_settled(&client, &base, "/v1/coupon-batches/cr1").await;
        assert_eq!(
            (batch["issued"].as_u64(), batch["remaining"].as_u64()),
            (Some(STOCK), Some(0)),
            "{batch}"
        );
    }
    fleet.restart(2, port);
    fleet.wait_balanced(3).await;
    fleet.audit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_activitys_intake_shards_on_every_node_spend_its_budget_to_the_last_fen_through_a_kill(
) {
    // Goal: one activity's rewards from concurrent clients through every node, accepted by its
    // 8 intake shards (spread over the partitions, so over the nodes) against slices of its
    // budget, small slices so that grants and recalls happen all along; a node holding shards
    // is killed with kill -9 mid-load. The demand exceeds the budget: exactly the budget is
    // accepted (every reward is 10 fen, so "to the last fen" is exact), every accepted
    // reward is credited once, the activity's page agrees through every node, the slices
    // were granted and recalled (the nodes' counters say so), and the audit proves the slice
    // books across partitions.
    let _heavy = super::heavy().await;
    let Some(mut fleet) =
        Fleet::start_configured("[rewards]\nintake_shards = 8\nslice_fen = 300\n").await
    else {
        return;
    };
    const BUDGET: u64 = 4_000;
    const AMOUNT: u64 = 10;
    const ASKS: usize = 520;
    const CLIENTS: usize = 8;
    let client = reqwest::Client::new();
    let bases = fleet.bases();
    let (status, body) = call(
        &client,
        reqwest::Method::PUT,
        format!("{}/v1/admin/activities/hot/budget", bases[0]),
        ADMIN,
        Some(serde_json::json!({"cash": BUDGET, "subsidy": 0})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let view = cluster_view(&client, &bases[0]).await.unwrap();
    let partitions = hongbao::cluster::partition::Partitions::new(PARTITIONS).unwrap();
    let holders: BTreeSet<String> = (0..8)
        .filter_map(|shard| {
            let partition = partitions.of(&format!("activity:hot@{shard}")).key();
            view["partitions"]
                .as_array()?
                .iter()
                .find(|p| p["partition"] == partition)?["node"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert!(
        holders.len() >= 2,
        "the shards' partitions on one node: {holders:?}"
    );
    // Reward hot-k through the nodes: accepted (true) or refused budget_exhausted (false).
    let send = |client: reqwest::Client, bases: Vec<String>, k: usize| async move {
        let reward = serde_json::json!({"order_id": format!("hot-{k}"), "uid": uid(k % USERS),
            "activity_id": "hot", "scene": "rain", "kind": "cash", "amount": AMOUNT});
        let path = "/v1/rewards";
        let post = reqwest::Method::POST;
        let (status, body) =
            send_retrying(&client, &bases, k, post, path, ISSUER, Some(reward)).await;
        match (status, body["code"].as_str()) {
            (202, _) => true,
            (409, Some("budget_exhausted")) => false,
            _ => panic!("reward hot-{k}: {status} {body}"),
        }
    };
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (client, bases, sent) = (client.clone(), bases.clone(), sent.clone());
            tokio::spawn(async move {
                let mut accepted = BTreeSet::new();
                for k in (c..ASKS).step_by(CLIENTS) {
                    if send(client.clone(), bases.clone(), k).await {
                        accepted.insert(k);
                    }
                    sent.fetch_add(1, Ordering::SeqCst);
                }
                accepted
            })
        })
        .collect();
    // The slice steps each node took before the kill (a killed node's counters die with it).
    wait_until_sent(&sent, ASKS / 3).await;
    let mut steps = BTreeMap::new();
    for (i, base) in bases.iter().enumerate() {
        let text = scrape(&client, base).await;
        // Every partition's series (each labelled with its partition).
        let granted: f64 = text
            .lines()
            .filter(|l| {
                l.starts_with("hongbao_reward_slices_total{") && l.contains("step=\"granted\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        steps.insert(format!("n{}", i + 1), granted);
    }
    let node = fleet.nodes[2].take().unwrap();
    let port = node.port;
    node.kill9();
    let mut accepted = BTreeSet::new();
    for c in clients {
        let answered = c.await;
        accepted.extend(answered.unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs())));
    }
    fleet.wait_balanced(2).await;
    let bases = fleet.bases();
    // A few more, one at a time, until one is refused: whatever slice a shard still held
    // after the concurrent load is recalled by then, so the budget is spent to the last fen.
    // (First past the recall's quiet time: a node whose recall found nothing during the
    // concurrent load, because another node's recall had just taken it, refuses at once for
    // that long, as designed; serially, a recall finds what any shard holds.)
    tokio::time::sleep(hongbao::flows::slices::RECALL_QUIET * 3).await;
    for k in ASKS..ASKS + 100 {
        if !send(client.clone(), bases.clone(), k).await {
            break;
        }
        accepted.insert(k);
    }
    let accepted_sum = accepted.len() as u64 * AMOUNT;
    assert_eq!(accepted_sum, BUDGET, "accepted {} rewards", accepted.len());
    for holder in &holders {
        assert!(
            steps.get(holder).is_some_and(|g| *g > 0.0),
            "{holder} holds an intake shard but took no slice: {steps:?}"
        );
    }
    // Every accepted reward credited once; the activity's page the same through every node.
    let mut owed: BTreeMap<String, u64> = BTreeMap::new();
    for k in &accepted {
        *owed.entry(uid(k % USERS)).or_default() += AMOUNT;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut wrong = Vec::new();
        for (user, amount) in &owed {
            let wallet = get_settled(&client, &bases[0], &format!("/v1/wallets/{user}")).await;
            let held = wallet["balances"]["activity"].as_u64().unwrap();
            assert!(
                held <= *amount,
                "{user} credited beyond its rewards: {wallet}"
            );
            if held != *amount {
                wrong.push(format!("{user}: {held} of {amount}"));
            }
        }
        if wrong.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "credits never settled: {wrong:?}\n{}",
            fleet.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for base in &bases {
        let (status, page) = call(
            &client,
            reqwest::Method::GET,
            format!("{base}/v1/admin/activities/hot"),
            ADMIN,
            None,
        )
        .await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["accepted"]["cash"], BUDGET, "{page}");
        assert_eq!(page["remaining"]["cash"], 0, "{page}");
        assert_eq!(page["rewards"], accepted.len(), "{page}");
    }
    fleet.restart(2, port);
    fleet.wait_balanced(3).await;
    // Rewards larger than a slice, concurrently, for an activity without a budget: each
    // grant covers one reward, and the reward that asked for it is accepted from it (no
    // reward can take another's refill until it gives up): every one accepted at the first
    // answer, none left "retry". (Found by the benchmark's seeding: 503s when a refill was
    // recorded apart from the acceptance.)
    // A client of its own: the first one's pooled connections to the killed node's port can
    // be taken up again after its restart and fail before an answer (seen in CI:
    // IncompleteMessage; `call` also sends a request that got no answer again).
    let client = reqwest::Client::new();
    let bases = fleet.bases();
    let answers = futures::future::join_all((0..CLIENTS).map(|c| {
        let (client, bases) = (client.clone(), bases.clone());
        async move {
            let mut answers = Vec::new();
            for k in 0..12usize {
                let body = serde_json::json!({"order_id": format!("free-{c}-{k}"),
                    "uid": uid(k % USERS), "activity_id": "free", "scene": "seed",
                    "kind": "cash", "amount": 1_000});
                let answer = call(
                    &client,
                    reqwest::Method::POST,
                    format!("{}/v1/rewards", bases[(c + k) % bases.len()]),
                    ISSUER,
                    Some(body),
                )
                .await;
                answers.push(answer);
            }
            answers
        }
    }))
    .await;
    let refused: Vec<_> = answers
        .iter()
        .flatten()
        .filter(|(s, _)| *s != 202)
        .collect();
    assert!(refused.is_empty(), "not accepted at once: {refused:?}");
    // Credited before the audit reads the heads (nothing pending over the fleet).
    let deadline = Instant::now() + Duration::from_secs(60);
    while fleet_cash_pending(&client, &bases).await != 0 {
        assert!(
            Instant::now() < deadline,
            "never credited\n{}",
            fleet.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let report = fleet.audit().await;
    // The slice books matched across partitions (one check per shard and kind at least).
    let budgets = audit_check(&report, "budgets");
    assert_eq!(budgets["violations"], 0, "{budgets}");
    assert!(
        budgets["checked"].as_u64().unwrap() > ASKS as u64,
        "{budgets}"
    );
    eprintln!(
        "hot activity: {} of {ASKS}+ rewards accepted for a {BUDGET} fen budget through 8 intake shards held by {holders:?}; slices granted before the kill by node {steps:?}",
        accepted.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_b2c_packets_remainder_goes_back_to_its_activitys_budget_on_a_cluster() {
    // Goal: a subsidy reward (accepted by one of its activity's intake shards, the activity
    // in another partition), a B2C packet paid by it through another node, one share claimed
    // through a third; at expiry the unclaimed remainder is back in the activity's budget,
    // as every node's page of the activity says, and the cluster audit's budget books agree.
    // (Returned to the activity itself, which accepts none of its shards' rewards, it was
    // lost: the page kept counting the whole subsidy accepted.)
    let _heavy = super::heavy().await;
    let Some(fleet) = Fleet::start().await else {
        return;
    };
    let client = reqwest::Client::new();
    let bases = fleet.bases();
    let (status, body) = call(
        &client,
        reqwest::Method::PUT,
        format!("{}/v1/admin/activities/camp/budget", bases[0]),
        ADMIN,
        Some(serde_json::json!({"cash": 0, "subsidy": 10_000})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let subsidy = serde_json::json!({"order_id": "sub-1", "uid": "brand", "activity_id": "camp",
        "scene": "launch", "kind": "subsidy", "amount": 3_000});
    let post = reqwest::Method::POST;
    let (status, reward) = send_retrying(
        &client,
        &bases,
        0,
        post.clone(),
        "/v1/rewards",
        ISSUER,
        Some(subsidy),
    )
    .await;
    assert_eq!(status, 202, "{reward}");
    let packet = serde_json::json!({"packet_id": "b-1", "sender_uid": "brand", "mode": "b2c",
        "total": 3_000, "count": 3, "split": "even", "expires_in_s": 1,
        "subsidy_token": reward["token"]});
    let (status, created) = send_retrying(
        &client,
        &bases,
        1,
        post.clone(),
        "/v1/packets",
        GATEWAY,
        Some(packet),
    )
    .await;
    assert_eq!(
        (status, created["state"].as_str()),
        (201, Some("active")),
        "{created}"
    );
    let claim = serde_json::json!({"uid": "shopper"});
    let path = "/v1/packets/b-1/claims";
    let (status, share) = send_retrying(&client, &bases, 2, post, path, GATEWAY, Some(claim)).await;
    assert_eq!(
        (status, share["amount"].as_i64()),
        (200, Some(1_000)),
        "{share}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    'nodes: for base in &bases {
        loop {
            let url = format!("{base}/v1/admin/activities/camp");
            let (status, page) = call(&client, reqwest::Method::GET, url, ADMIN, None).await;
            if status == 200 && page["accepted"]["subsidy"] == 1_000 {
                continue 'nodes;
            }
            assert!(
                Instant::now() < deadline,
                "the remainder never came back to the budget via {base}: {page}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let report = fleet.audit().await;
    let budgets = audit_check(&report, "budgets");
    assert_eq!(budgets["violations"], 0, "{budgets}");
}

/// Waits (60 s at most) until the clients have sent `n` requests.
async fn wait_until_sent(sent: &std::sync::atomic::AtomicUsize, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while sent.load(Ordering::SeqCst) < n {
        assert!(Instant::now() < deadline, "the load did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Cash rewards credited so far by the whole fleet (every node's lanes).
/// `hongbao_reward_pending{kind="cash"}` summed over every partition of every node.
async fn fleet_cash_pending(client: &reqwest::Client, bases: &[String]) -> i64 {
    let mut pending = 0;
    for base in bases {
        let text = scrape(client, base).await;
        pending += text
            .lines()
            .filter(|l| l.starts_with("hongbao_reward_pending{") && l.contains("kind=\"cash\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
            .sum::<i64>();
    }
    pending
}

async fn fleet_cash_credits(client: &reqwest::Client, bases: &[String]) -> f64 {
    let mut credited = 0.0;
    for base in bases {
        let text = scrape(client, base).await;
        // Every partition's series (each labelled with its partition).
        credited += text
            .lines()
            .filter(|l| {
                l.starts_with("hongbao_rewards_credited_total{")
                    && l.contains("kind=\"cash\"")
                    && l.contains("path=\"lane\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    credited
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crediting_rate_is_the_fleets_whatever_the_partitions_and_nodes() {
    // Goal: `[rewards] cash_per_s = 40` is a capacity of the whole fleet: 120 cash rewards of
    // twelve activities (their lanes in many partitions on every node) released at once are
    // credited at 40/s in all, every second within 40 plus three batches of 4 (and a margin
    // for the sampling); a token bucket per partition, as on one node, would credit them all
    // at once (each partition's bucket starts full).
    let _heavy = super::heavy().await;
    let Some(fleet) = Fleet::start_configured("[rewards]\ncash_per_s = 40\n").await else {
        return;
    };
    const RATE: f64 = 40.0;
    const REWARDS: usize = 120;
    let client = reqwest::Client::new();
    let bases = fleet.bases();
    set_switch(&client, &bases[0], "reward_lanes", false).await;
    let activities: HashSet<u16> = (0..12)
        .map(|a| {
            hongbao::cluster::partition::Partitions::new(PARTITIONS)
                .unwrap()
                .of(&format!("activity:act-{a}"))
                .0
        })
        .collect();
    assert!(activities.len() >= 4, "the activities span few partitions");
    for k in 0..REWARDS {
        let body = serde_json::json!({"order_id": format!("rate-{k}"), "uid": uid(k % USERS),
            "activity_id": format!("act-{}", k % 12), "scene": "rain", "kind": "cash",
            "amount": 100});
        let (status, answer) = send_retrying(
            &client,
            &bases,
            k,
            reqwest::Method::POST,
            "/v1/rewards",
            ISSUER,
            Some(body),
        )
        .await;
        assert_eq!(status, 202, "{answer}");
    }
    let before = fleet_cash_credits(&client, &bases).await;
    assert_eq!(before, 0.0, "credited while paused");
    // Crediting on, sampled from the moment it is switched on (nodes read it within 250 ms).
    let started = Instant::now();
    let (status, body) = call(
        &client,
        reqwest::Method::PUT,
        format!("{}/v1/admin/switches/reward_lanes", bases[0]),
        ADMIN,
        Some(serde_json::json!({ "on": true })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let mut samples = vec![(Duration::ZERO, fleet_cash_credits(&client, &bases).await)];
    while samples.last().unwrap().1 < REWARDS as f64 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "credits stalled: {samples:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        samples.push((started.elapsed(), fleet_cash_credits(&client, &bases).await));
    }
    for (i, (t1, c1)) in samples.iter().enumerate() {
        for (t2, c2) in &samples[i + 1..] {
            let window = (*t2 - *t1).as_secs_f64();
            if window > 1.0 {
                break;
            }
            assert!(
                c2 - c1 <= RATE * 1.25 + 12.0,
                "{} credits in {window:.2} s: {samples:?}",
                c2 - c1
            );
        }
    }
    let (elapsed, _) = *samples.last().unwrap();
    // 120 at 40/s, less what was in the buckets at the start: well over two seconds.
    assert!(
        elapsed >= Duration::from_secs(2),
        "120 credited in {elapsed:?}: faster than the fleet's rate: {samples:?}"
    );
    eprintln!(
        "fleet crediting at {RATE}/s: {REWARDS} rewards over {} partitions credited in {:.2} s",
        activities.len(),
        elapsed.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_load_through_every_node_survives_kill_9_exactly_once() {
    // Goal: the issue's mixed night on three nodes and three JetStream servers (three replicas
    // of every partition and bucket), at once and through every node: deposits
    // from six clients, rewards of an activity with a budget, C2C red packets paid, claimed
    // and transferred across partitions, withdrawals on a flaky bank, and coupons of a batch
    // asked for beyond its stock (some on the green channel); one node killed with kill -9 in
    // the middle of it all. Afterwards every acknowledged deposit is in its ledger once, every
    // accepted reward is credited once and the budget holds, every claim is in its claimer's
    // wallet once and the packets' senders paid exactly their packets, every withdrawal is
    // paid exactly when the bank says so or refunded once, the batch issued exactly its stock
    // (each request's status and each user's coupons the same through every node), and the
    // cluster audit and verify pass.
    let _heavy = super::heavy().await;
    let Some(mut fleet) = Fleet::start_on_three().await else {
        return;
    };
    let client = reqwest::Client::new();
    let bases = fleet.bases();
    const BUDGET: u64 = 6_000;
    const PACKETS: usize = 4;
    const SHARES: usize = 6;
    let post = reqwest::Method::POST;
    let (status, body) = call(
        &client,
        reqwest::Method::PUT,
        format!("{}/v1/admin/activities/mix/budget", bases[1]),
        ADMIN,
        Some(serde_json::json!({"cash": BUDGET, "subsidy": 0})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for s in 0..PACKETS {
        let (status, body) = send_retrying(
            &client,
            &bases,
            s,
            post.clone(),
            &format!("/v1/wallets/ms{s}/change/deposits"),
            ADMIN,
            Some(serde_json::json!({"order_id": format!("mix-fund-{s}"), "amount": 1_000})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }
    set_bank(
        &client,
        &bases,
        &serde_json::json!({"rate_per_s": 10_000, "latency_ms": 5, "fail_rate": 0.4,
            "timeout_rate": 0.2}),
    )
    .await;
    const WITHDRAWERS: usize = 4;
    const WITHDRAWER_FUNDING: i64 = 1_000;
    let methods = fund_and_bind(&client, &bases, "mw", WITHDRAWERS, WITHDRAWER_FUNDING).await;
    create_coupon_batch(&client, &bases, "mix-cb", COUPON_STOCK, COUPON_LIMIT).await;
    let load = Load::start(bases.clone(), 6);
    load.progress(&fleet, 50, "deposits before the mix").await;
    // Withdrawals in waves of four, spanning the kill.
    let withdrawals = {
        let (client, bases) = (client.clone(), bases.clone());
        tokio::spawn(async move {
            let mut orders = BTreeMap::new();
            for wave in 0..4 {
                let range = wave * 4..wave * 4 + 4;
                orders.extend(withdraw_all(&client, &bases, "mw", &methods, range).await);
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            orders
        })
    };
    // Rewards and packets run beside the deposits; the kill lands while all three are going.
    let rewards = {
        let (client, bases) = (client.clone(), bases.clone());
        tokio::spawn(async move {
            let mut accepted: BTreeMap<String, u64> = BTreeMap::new();
            let mut refused = 0;
            for k in 0..60usize {
                let (user, amount) = (format!("mr{}", k % 16), 100 + (k % 5) as u64);
                let body = serde_json::json!({"order_id": format!("mix-r{k}"), "uid": user,
                    "activity_id": "mix", "scene": "rain", "kind": "cash", "amount": amount});
                let (status, answer) = send_retrying(
                    &client,
                    &bases,
                    k,
                    reqwest::Method::POST,
                    "/v1/rewards",
                    ISSUER,
                    Some(body),
                )
                .await;
                match (status, answer["code"].as_str()) {
                    (202, _) => *accepted.entry(user).or_default() += amount,
                    (409, Some("budget_exhausted")) => refused += 1,
                    _ => panic!("reward mix-r{k}: {status} {answer}"),
                }
            }
            (accepted, refused)
        })
    };
    let coupons_sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let coupons = {
        let (client, bases, sent) = (client.clone(), bases.clone(), coupons_sent.clone());
        tokio::spawn(
            async move { ask_coupons(&client, &bases, "mix-cb", COUPON_ASKS, &sent).await },
        )
    };
    let packets = {
        let (client, bases) = (client.clone(), bases.clone());
        tokio::spawn(async move {
            let mut claimed: BTreeMap<String, i64> = BTreeMap::new();
            for p in 0..PACKETS {
                let id = format!("mix-pk-{p}");
                let spec = serde_json::json!({"sender_uid": format!("ms{p}"), "total": 600,
                    "count": SHARES, "split": "lucky"});
                c2c_packet(&client, &bases, p, &id, spec, &format!("mix-pay-{p}")).await;
                for c in 0..SHARES {
                    let user = format!("mp{}", (p * 5 + c) % 12);
                    let (status, body) = send_retrying(
                        &client,
                        &bases,
                        p + c,
                        reqwest::Method::POST,
                        &format!("/v1/packets/{id}/claims"),
                        GATEWAY,
                        Some(serde_json::json!({ "uid": user })),
                    )
                    .await;
                    assert_eq!(status, 200, "{body}");
                    *claimed.entry(user).or_default() += body["amount"].as_i64().unwrap();
                }
            }
            claimed
        })
    };
    load.progress(&fleet, 100, "with the mix going").await;
    // Some coupon requests in the layers of the node about to die, the rest during and after
    // the hand-over.
    let deadline = Instant::now() + Duration::from_secs(20);
    while coupons_sent.load(Ordering::SeqCst) < 8 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let node = fleet.nodes[1].take().unwrap();
    let port = node.port;
    let coupons_before_kill = coupons_sent.load(Ordering::SeqCst);
    node.kill9();
    fleet.wait_balanced(2).await;
    let (accepted, refused) = rewards.await.unwrap();
    let claimed = packets.await.unwrap();
    let withdrawn = withdrawals.await.unwrap();
    let asked = coupons.await.unwrap();
    load.progress(&fleet, 100, "after the kill").await;
    let (acked, _) = load.finish(&fleet).await;
    let bases = fleet.bases();
    check_exactly_once(&bases, &acked).await;
    // Rewards: within the budget and spent to within one reward (sent one at a time, each
    // refusal is exact: the intake shards' unused slices are recalled first), each user's
    // activity balance their accepted rewards.
    let accepted_sum: u64 = accepted.values().sum();
    assert!(
        accepted_sum <= BUDGET && accepted_sum + 104 > BUDGET && refused > 0,
        "{accepted_sum} accepted, {refused} refused"
    );
    // Packets: each claimer's change is their claims; each sender paid exactly 600.
    let mut owed: Vec<(String, &str, i64)> = accepted
        .iter()
        .map(|(u, a)| (u.clone(), "activity", *a as i64))
        .collect();
    owed.extend(claimed.iter().map(|(u, a)| (u.clone(), "change", *a)));
    owed.extend((0..PACKETS).map(|s| (format!("ms{s}"), "change", 400)));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut wrong = Vec::new();
        for (user, account, amount) in &owed {
            for base in &bases {
                let wallet = get_settled(&client, base, &format!("/v1/wallets/{user}")).await;
                let held = wallet["balances"][*account].as_i64().unwrap();
                if held != *amount || !wallet["pending"].as_array().unwrap().is_empty() {
                    wrong.push(format!(
                        "{user} {account} {held} (owed {amount}) via {base}"
                    ));
                }
            }
        }
        if wrong.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never settled: {wrong:?}\n{}",
            fleet.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (status, activity) = call(
        &client,
        reqwest::Method::GET,
        format!("{}/v1/admin/activities/mix", bases[0]),
        ADMIN,
        None,
    )
    .await;
    assert_eq!(
        (status, &activity["accepted"]["cash"]),
        (200, &Value::from(accepted_sum))
    );
    let (paid, refunded) = check_withdrawals(&fleet, &client, &withdrawn, WITHDRAWER_FUNDING).await;
    let coupon_refusals = check_coupons(
        &client,
        &bases,
        "mix-cb",
        &asked,
        (COUPON_STOCK, COUPON_LIMIT),
    )
    .await;
    fleet.restart(1, port);
    fleet.wait_balanced(3).await;
    let report = fleet.audit().await;
    let channels = audit_check(&report, "channel_statements");
    assert!(
        channels["checked"].as_u64().unwrap() >= withdrawn.len() as u64,
        "the audit read the fleet's statements: {channels}"
    );
    let coupon_check = audit_check(&report, "coupons");
    let note = format!(
        "{COUPON_ASKS} accepted = {COUPON_STOCK} issued ({COUPON_STOCK} coupons) + {} refused",
        COUPON_ASKS - COUPON_STOCK as usize
    );
    assert!(
        coupon_check["notes"].to_string().contains(&note),
        "the audit counted every coupon request: {coupon_check}"
    );
    fleet.verify().await;
    eprintln!(
        "mixed: {} deposits, {accepted_sum} fen of rewards to {} users ({refused} refused by the budget), {} claims, {} withdrawals ({paid} paid, {refunded} refunded), {COUPON_ASKS} coupon requests ({coupons_before_kill} answered before the kill; {COUPON_STOCK} issued, refused: {coupon_refusals:?})",
        acked.len(),
        accepted.len(),
        PACKETS * SHARES,
        withdrawn.len()
    );
}

/// The mixed night's coupons: a batch of this stock, at most this many per user, asked for by
/// more requests (from `COUPON_ASKS / 3` users) than it can grant.
const COUPON_STOCK: u64 = 24;
const COUPON_LIMIT: u32 = 2;
const COUPON_ASKS: usize = 60;

async fn create_coupon_batch(
    client: &reqwest::Client,
    bases: &[String],
    batch: &str,
    stock: u64,
    limit: u32,
) {
    let (status, body) = send_retrying(
        client,
        bases,
        2,
        reqwest::Method::POST,
        "/v1/coupon-batches",
        ADMIN,
        Some(serde_json::json!({"batch_id": batch, "stock": stock,
            "per_user_limit": limit, "value": 500})),
    )
    .await;
    assert_eq!(
        (status, body["remaining"].as_u64()),
        (201, Some(stock)),
        "{body}"
    );
}

/// What a coupon request was answered when it was sent: accepted (202), or on the green
/// channel (every fourth) its outcome: issued with its coupon, or refused with its code.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Asked {
    Accepted,
    Issued(String),
    Refused(String),
}

/// Sends `n` coupon requests for `batch` through every node in turn (`mc-<k>` for user
/// `mcu<k % (n/3)>`), paced to last a few seconds, retrying each with its seq_no as a client
/// does; counts the answered ones in `sent`; returns each answer.
async fn ask_coupons(
    client: &reqwest::Client,
    bases: &[String],
    batch: &str,
    n: usize,
    sent: &std::sync::atomic::AtomicUsize,
) -> BTreeMap<String, (String, Asked)> {
    let mut asked = BTreeMap::new();
    for k in 0..n {
        let (seq_no, uid, sync) = (format!("mc-{k}"), format!("mcu{}", k % (n / 3)), k % 4 == 0);
        let answer = ask_coupon(client, bases, k, &seq_no, &uid, batch, sync).await;
        asked.insert(seq_no, (uid, answer));
        sent.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    asked
}

/// One coupon request, through the nodes from `first` on, retried with its seq_no as a client
/// does until a node answers it.
async fn ask_coupon(
    client: &reqwest::Client,
    bases: &[String],
    first: usize,
    seq_no: &str,
    uid: &str,
    batch: &str,
    sync: bool,
) -> Asked {
    let (status, body) = send_retrying(
        client,
        bases,
        first,
        reqwest::Method::POST,
        "/v1/coupons/issue",
        ISSUER,
        Some(serde_json::json!({"seq_no": seq_no, "uid": uid, "batch_id": batch, "sync": sync})),
    )
    .await;
    match (sync, status) {
        (false, 202) => Asked::Accepted,
        (true, 200) => Asked::Issued(body["coupon_id"].as_str().unwrap().to_owned()),
        (true, 409 | 410) => Asked::Refused(body["code"].as_str().unwrap().to_owned()),
        _ => panic!("coupon request {seq_no} (sync {sync}): {status} {body}"),
    }
}

/// Waits until every request of `asked` is final, then checks through every node: each
/// request's status the same everywhere and as its green-channel answer said; the batch issued
/// exactly its stock, distinct coupons, nobody above the limit, only sold_out or user_limit
/// refusals; each user's coupons (gathered from every partition) exactly theirs. Returns the
/// refusals by reason.
async fn check_coupons(
    client: &reqwest::Client,
    bases: &[String],
    batch: &str,
    asked: &BTreeMap<String, (String, Asked)>,
    (stock, limit): (u64, u32),
) -> BTreeMap<String, usize> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut finals: BTreeMap<String, Value> = BTreeMap::new();
    for seq_no in asked.keys() {
        loop {
            let line =
                get_settled(client, &bases[0], &format!("/v1/coupons/requests/{seq_no}")).await;
            if line["status"] != "accepted" {
                finals.insert(seq_no.clone(), line);
                break;
            }
            assert!(Instant::now() < deadline, "{seq_no} never final: {line}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut refusals: BTreeMap<String, usize> = BTreeMap::new();
    let mut held: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut coupons = BTreeSet::new();
    for (seq_no, line) in &finals {
        let (uid, answer) = &asked[seq_no];
        for base in &bases[1..] {
            let there = get_settled(client, base, &format!("/v1/coupons/requests/{seq_no}")).await;
            assert_eq!(
                (&there["status"], &there["coupon_id"], &there["reason"]),
                (&line["status"], &line["coupon_id"], &line["reason"]),
                "{seq_no} via {base}"
            );
        }
        match line["status"].as_str() {
            Some("issued") => {
                let coupon = line["coupon_id"].as_str().unwrap().to_owned();
                assert!(coupons.insert(coupon.clone()), "{coupon} issued twice");
                assert!(
                    matches!(answer, Asked::Accepted) || *answer == Asked::Issued(coupon.clone()),
                    "{seq_no}: answered {answer:?}, now {line}"
                );
                held.entry(uid.clone()).or_default().insert(coupon);
            }
            Some("rejected") => {
                let reason = line["reason"].as_str().unwrap().to_owned();
                assert!(
                    matches!(reason.as_str(), "sold_out" | "user_limit"),
                    "{seq_no}: {line}"
                );
                assert!(
                    matches!(answer, Asked::Accepted) || *answer == Asked::Refused(reason.clone()),
                    "{seq_no}: answered {answer:?}, now {line}"
                );
                *refusals.entry(reason).or_default() += 1;
            }
            _ => panic!("{seq_no}: {line}"),
        }
    }
    assert_eq!(
        coupons.len() as u64,
        stock,
        "the batch issued exactly its stock"
    );
    for base in bases {
        let summary = get_settled(client, base, &format!("/v1/coupon-batches/{batch}")).await;
        assert_eq!(
            (summary["issued"].as_u64(), summary["remaining"].as_u64()),
            (Some(stock), Some(0)),
            "{summary} via {base}"
        );
    }
    let users: BTreeSet<&String> = asked.values().map(|(uid, _)| uid).collect();
    for uid in users {
        let theirs = held.get(uid).cloned().unwrap_or_default();
        assert!(theirs.len() <= limit as usize, "{uid} holds {theirs:?}");
        for base in bases {
            let page = get_settled(client, base, &format!("/v1/wallets/{uid}/coupons")).await;
            let listed: BTreeSet<String> = page
                .as_array()
                .unwrap_or_else(|| panic!("{uid}'s coupons via {base}: {page}"))
                .iter()
                .map(|c| c["coupon_id"].as_str().unwrap().to_owned())
                .collect();
            assert_eq!(listed, theirs, "{uid}'s coupons via {base}");
        }
    }
    refusals
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_coupon_batch_takes_merged_deductions_from_every_node_and_issues_its_stock_exactly() {
    // Goal: one batch asked for by concurrent clients through every node, its requests' intake
    // shards spread over the partitions (8 shards) and so over the nodes: the batch, one actor
    // in one partition, takes merged deductions from the layers of every node that holds an
    // intake shard; a node is killed with kill -9 mid-load and its shards' layers resume on
    // the survivors from their logs. Exactly the stock is issued, distinct, one per user;
    // every request final, the same through every node; the audit counts every request.
    let _heavy = super::heavy().await;
    let Some(mut fleet) = Fleet::start_configured("[coupons]\nintake_shards = 8\n").await else {
        return;
    };
    const STOCK: u64 = 120;
    const ASKS: usize = 360;
    const CLIENTS: usize = 12;
    let client = reqwest::Client::new();
    let bases = fleet.bases();
    create_coupon_batch(&client, &bases, "hot-cb", STOCK, 1).await;
    // Which node holds each intake shard's partition now, before the load.
    let view = cluster_view(&client, &bases[0]).await.unwrap();
    let holder = |partition: u16| {
        view["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["partition"] == format!("p{partition:03}"))
            .and_then(|p| p["node"].as_str())
            .unwrap()
            .to_owned()
    };
    let partitions = hongbao::cluster::partition::Partitions::new(PARTITIONS).unwrap();
    let intake_holders: BTreeSet<String> = (0..8)
        .map(|shard| holder(partitions.of(&format!("coupon-intake:{shard}")).0))
        .collect();
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (client, bases, sent) = (client.clone(), bases.clone(), sent.clone());
            tokio::spawn(async move {
                let mut asked = BTreeMap::new();
                for k in (c..ASKS).step_by(CLIENTS) {
                    let (seq_no, uid) = (format!("hc-{k}"), format!("hcu{k}"));
                    let answer =
                        ask_coupon(&client, &bases, k, &seq_no, &uid, "hot-cb", k % 5 == 0).await;
                    asked.insert(seq_no, (uid, answer));
                    sent.fetch_add(1, Ordering::SeqCst);
                }
                asked
            })
        })
        .collect();
    // Merged deductions sent by each node's layers, read before the kill (a killed node's
    // counters die with it).
    wait_until_sent(&sent, ASKS / 3).await;
    let mut deductions = BTreeMap::new();
    for (i, base) in bases.iter().enumerate() {
        let text = scrape(&client, base).await;
        let count = metric(&text, "hongbao_coupon_merge_size_count").unwrap_or(0.0);
        let sum = metric(&text, "hongbao_coupon_merge_size_sum").unwrap_or(0.0);
        deductions.insert(format!("n{}", i + 1), (count, sum));
    }
    let node = fleet.nodes[1].take().unwrap();
    let port = node.port;
    node.kill9();
    let mut asked = BTreeMap::new();
    for c in clients {
        asked.extend(c.await.unwrap());
    }
    fleet.wait_balanced(2).await;
    let bases = fleet.bases();
    for node in &intake_holders {
        let (count, _) = deductions[node];
        assert!(
            count > 0.0,
            "{node} holds an intake shard but sent no deduction: {deductions:?}"
        );
    }
    let refusals = check_coupons(&client, &bases, "hot-cb", &asked, (STOCK, 1)).await;
    assert_eq!(
        refusals.values().sum::<usize>(),
        ASKS - STOCK as usize,
        "{refusals:?}"
    );
    fleet.restart(1, port);
    fleet.wait_balanced(3).await;
    let report = fleet.audit().await;
    let note = format!(
        "{ASKS} accepted = {STOCK} issued ({STOCK} coupons) + {} refused",
        ASKS - STOCK as usize
    );
    let coupons = audit_check(&report, "coupons");
    assert!(coupons["notes"].to_string().contains(&note), "{coupons}");
    let (count, sum): (f64, f64) = deductions
        .values()
        .fold((0.0, 0.0), |(c, s), (count, sum)| (c + count, s + sum));
    eprintln!(
        "hot batch: {ASKS} requests from {CLIENTS} clients, {STOCK} issued; intake shards held by {intake_holders:?}; before the kill {count} deductions of {:.1} requests on average, by node {deductions:?}",
        sum / count.max(1.0)
    );
}

/// Creates C2C packet `id` (`spec`: its sender, total, shares...) and pays it with
/// `payment_id`, through the nodes from `first` on, retrying as a client of a fleet does.
async fn c2c_packet(
    client: &reqwest::Client,
    bases: &[String],
    first: usize,
    id: &str,
    spec: Value,
    payment_id: &str,
) {
    let mut create = spec;
    create["packet_id"] = id.into();
    create["mode"] = "c2c".into();
    let (status, body) = send_retrying(
        client,
        bases,
        first,
        reqwest::Method::POST,
        "/v1/packets",
        GATEWAY,
        Some(create),
    )
    .await;
    assert_eq!(
        (status, body["state"].as_str()),
        (201, Some("pending_payment")),
        "{body}"
    );
    let (status, body) = send_retrying(
        client,
        bases,
        first + 1,
        reqwest::Method::POST,
        &format!("/v1/packets/{id}/pay"),
        GATEWAY,
        Some(serde_json::json!({ "payment_id": payment_id })),
    )
    .await;
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("active")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_while_jetstream_is_unreachable_exits_within_bounds() {
    // Goal: SIGTERM to a node whose JetStream server is gone ends the process: it cannot leave
    // cleanly (close its partitions, release its leases), so after trying for 30 s it exits as
    // if it had crashed (its leases expire by themselves) instead of hanging for ever (it
    // did: over a minute, seen by hand).
    let _heavy = super::heavy().await;
    let Some(binary) = nats::binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = nats::single_synced(&binary, dir.path());
    let url = format!("nats://127.0.0.1:{}", server.port);
    let mut node = start_node(dir.path(), &url, "n1", 0);
    // Serving every partition, so that leaving has partitions to close and leases to release.
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster_view(&client, &node.base())
        .await
        .and_then(|v| v["serving"].as_u64())
        != Some(u64::from(PARTITIONS))
    {
        assert!(
            Instant::now() < deadline,
            "the node never served its partitions"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.kill();
    let stopping = Instant::now();
    let pid = node.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    while node.child.try_wait().unwrap().is_none() {
        assert!(
            stopping.elapsed() < Duration::from_secs(50),
            "still running 50 s after SIGTERM:\n{}",
            node.log.lock().unwrap().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = node.log.lock().unwrap().join("\n");
    assert!(
        log.contains("could not leave the cluster cleanly"),
        "no word of the unclean leave:\n{log}"
    );
    eprintln!("exited {:?} after SIGTERM", stopping.elapsed());
}

/// Samples, every 100 ms until `stop`, the payout attempts on `channel` the fleet made since
/// the start: each node's series per partition (a cell's counters start at zero when it
/// opens, vanish when it closes), summed over their increases, so a partition that moves or
/// a node that dies takes nothing back.
fn sample_payout_attempts(
    bases: Vec<String>,
    channel: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(Duration, f64)>> {
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let started = Instant::now();
        let (mut last, mut total, mut samples) = (HashMap::new(), 0.0, Vec::new());
        let prefix = format!("hongbao_payout_attempts_total{{channel=\"{channel}\"");
        while !stop.load(Ordering::Relaxed) {
            for base in &bases {
                let Ok(response) = client
                    .get(format!("{base}/metrics"))
                    .timeout(Duration::from_secs(1))
                    .send()
                    .await
                else {
                    continue;
                };
                let text = response.text().await.unwrap_or_default();
                for line in text.lines().filter(|l| l.starts_with(&prefix)) {
                    let Some((series, value)) = line.rsplit_once(' ') else {
                        continue;
                    };
                    let value: f64 = value.parse().unwrap_or(0.0);
                    let before = last.insert(format!("{base}{series}"), value).unwrap_or(0.0);
                    total += if value >= before {
                        value - before
                    } else {
                        value
                    };
                }
            }
            samples.push((started.elapsed(), total));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        samples
    })
}

/// One check of an audit report, by name.
fn audit_check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} check in {report}"))
}

/// Sets the fleet's simulated bank to `settings` through one node and checks that every node
/// reads the same.
async fn set_bank(client: &reqwest::Client, bases: &[String], settings: &Value) {
    let (status, body) = send_retrying(
        client,
        bases,
        0,
        reqwest::Method::PUT,
        "/v1/admin/channels/bank",
        ADMIN,
        Some(settings.clone()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for i in 0..bases.len() {
        let (status, body) = send_retrying(
            client,
            bases,
            i,
            reqwest::Method::GET,
            "/v1/admin/channels/bank",
            ADMIN,
            None,
        )
        .await;
        assert_eq!(
            (status, &body),
            (200, settings),
            "the fleet's bank, via node {i}"
        );
    }
}

/// Funds users `<prefix>0..` with `funding` fen each (a reward of the activity `<prefix>fund`,
/// credited at once with its token) and binds a bank account for each, through the nodes in
/// turn; their method ids.
async fn fund_and_bind(
    client: &reqwest::Client,
    bases: &[String],
    prefix: &str,
    users: usize,
    funding: i64,
) -> Vec<String> {
    let post = reqwest::Method::POST;
    let (status, body) = send_retrying(
        client,
        bases,
        1,
        reqwest::Method::PUT,
        &format!("/v1/admin/activities/{prefix}fund/budget"),
        ADMIN,
        Some(serde_json::json!({"cash": funding * users as i64, "subsidy": 0})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let mut methods = Vec::new();
    for u in 0..users {
        let user = format!("{prefix}{u}");
        let reward = serde_json::json!({"order_id": format!("{prefix}fund-{u}"), "uid": user,
            "activity_id": format!("{prefix}fund"), "scene": "test", "kind": "cash",
            "amount": funding});
        let (status, body) = send_retrying(
            client,
            bases,
            u,
            post.clone(),
            "/v1/rewards",
            ISSUER,
            Some(reward),
        )
        .await;
        assert_eq!(status, 202, "{body}");
        let tokens = serde_json::json!({ "tokens": [body["token"]] });
        let (status, body) = send_retrying(
            client,
            bases,
            u + 1,
            post.clone(),
            &format!("/v1/wallets/{user}/force-credit"),
            GATEWAY,
            Some(tokens),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let method = serde_json::json!({"kind": "bank", "account": format!("6222-{user}")});
        let (status, body) = send_retrying(
            client,
            bases,
            u + 2,
            post.clone(),
            &format!("/v1/wallets/{user}/payout-methods"),
            GATEWAY,
            Some(method),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        methods.push(body["method_id"].as_str().unwrap().to_owned());
    }
    methods
}

/// Withdrawal orders `<prefix>-wd-<k>` for k in `range` (user k mod the users, 100 to 160 fen),
/// sent all at once through the nodes in turn, each retried until answered; every one must be
/// accepted. The orders: order id -> (user, amount).
async fn withdraw_all(
    client: &reqwest::Client,
    bases: &[String],
    prefix: &str,
    methods: &[String],
    range: std::ops::Range<usize>,
) -> BTreeMap<String, (String, i64)> {
    let sent = range.map(|k| {
        let (client, bases) = (client.clone(), bases.to_vec());
        let (u, amount) = (k % methods.len(), 100 + (k % 7) as i64 * 10);
        let (user, order) = (format!("{prefix}{u}"), format!("{prefix}-wd-{k:02}"));
        let body = serde_json::json!({"order_id": order, "amount": amount,
            "method_id": methods[u]});
        async move {
            let path = format!("/v1/wallets/{user}/withdrawals");
            let (status, answer) = send_retrying(
                &client,
                &bases,
                k,
                reqwest::Method::POST,
                &path,
                GATEWAY,
                Some(body),
            )
            .await;
            assert_eq!(status, 202, "{order}: {answer}");
            (order, (user, amount))
        }
    });
    futures::future::join_all(sent).await.into_iter().collect()
}

/// Waits until every order is final (read through every node alike), then checks them against
/// the bank's statement: succeeded exactly when the bank's line says paid, for the order's
/// amount; no line for another order of these users; each user's activity balance is
/// `funding` less what was paid, through every node, with one refund per refunded order.
/// Returns (paid, refunded).
async fn check_withdrawals(
    fleet: &Fleet,
    client: &reqwest::Client,
    orders: &BTreeMap<String, (String, i64)>,
    funding: i64,
) -> (usize, usize) {
    let bases = fleet.bases();
    let get = reqwest::Method::GET;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut finals: BTreeMap<String, String> = BTreeMap::new();
    while finals.len() < orders.len() {
        for (k, order) in orders.keys().enumerate() {
            if finals.contains_key(order) {
                continue;
            }
            let (status, body) = send_retrying(
                client,
                &bases,
                k,
                get.clone(),
                &format!("/v1/withdrawals/{order}"),
                GATEWAY,
                None,
            )
            .await;
            assert_eq!(status, 200, "{order}: {body}");
            let state = body["state"].as_str().unwrap().to_owned();
            if state == "succeeded" || state == "refunded" {
                finals.insert(order.clone(), state);
            }
        }
        assert!(
            Instant::now() < deadline,
            "not final in 120 s: {} of {}\n{}",
            finals.len(),
            orders.len(),
            fleet.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (status, lines) = send_retrying(
        client,
        &bases,
        0,
        get.clone(),
        "/v1/admin/channels/bank/statement?limit=1000",
        ADMIN,
        None,
    )
    .await;
    assert_eq!(status, 200, "{lines}");
    let statement: HashMap<String, Value> = lines
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["order_id"].as_str().unwrap().to_owned(), l.clone()))
        .collect();
    let mut paid: BTreeMap<String, i64> = BTreeMap::new();
    let mut paid_count = 0;
    for (order, (user, amount)) in orders {
        let line = statement.get(order);
        let line_paid = line.is_some_and(|l| l["status"] == "succeeded");
        assert_eq!(
            finals[order] == "succeeded",
            line_paid,
            "{order} is {} but the bank's line is {line:?}",
            finals[order]
        );
        if line_paid {
            assert_eq!(line.unwrap()["amount"], *amount, "{order}");
            *paid.entry(user.clone()).or_default() += amount;
            paid_count += 1;
        }
    }
    let prefix = orders.keys().next().and_then(|o| o.split("-wd-").next());
    assert!(
        statement
            .keys()
            .filter(|o| prefix.is_some_and(|p| o.starts_with(&format!("{p}-wd-"))))
            .all(|o| orders.contains_key(o)),
        "a line for no order"
    );
    let users: HashSet<&String> = orders.values().map(|(u, _)| u).collect();
    for user in users {
        let owed = funding - paid.get(user).copied().unwrap_or(0);
        for base in &bases {
            let wallet = get_settled(client, base, &format!("/v1/wallets/{user}")).await;
            assert_eq!(wallet["balances"]["activity"], owed, "{user} via {base}");
        }
        let page = get_settled(
            client,
            &bases[0],
            &format!("/v1/wallets/{user}/ledger?limit=500"),
        )
        .await;
        let refunds = page["ledger"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["entry"] == "withdrawal_refund")
            .count();
        let user_refunded = orders
            .iter()
            .filter(|(o, (owner, _))| owner == user && finals[*o] == "refunded")
            .count();
        assert_eq!(
            refunds, user_refunded,
            "{user}: one refund per refunded order"
        );
    }
    (paid_count, orders.len() - paid_count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawals_on_a_flaky_channel_are_paid_once_within_the_fleets_limit_through_a_kill() {
    // Goal: withdrawals through every node, on a bank that refuses 60 % of the payments and
    // times out on 20 % (half of those did pay), with one node killed mid-run: every
    // accepted order ends paid exactly when the bank's statement says paid (for its amount) or
    // refunded once; every user's balance is their funding less what was paid; the bank is
    // never paid faster than `bank_per_s = 20` for the whole fleet; and the cluster audit
    // checks every order against the statement. Before the channels' books were the fleet's,
    // a moved partition found no record of its previous holder's payments.
    let _heavy = super::heavy().await;
    let Some(mut fleet) =
        Fleet::start_configured("[withdrawals]\nbank_per_s = 20\nretry_backoff_ms = [100]\n").await
    else {
        return;
    };
    const USERS_W: usize = 8;
    const ORDERS_PER_USER: usize = 8;
    const FUNDING: i64 = 2_000;
    const RATE: usize = 20;
    let client = reqwest::Client::new();
    let bases = fleet.bases();
    // An attempt pays with probability 0.3: about a quarter of the orders fail all four
    // attempts and are refunded.
    let flaky = serde_json::json!({"rate_per_s": 10_000, "latency_ms": 5, "fail_rate": 0.6,
        "timeout_rate": 0.2});
    set_bank(&client, &bases, &flaky).await;
    let methods = fund_and_bind(&client, &bases, "wu", USERS_W, FUNDING).await;
    // The orders, all at once through every node in turn (faster than the bank's pace), in
    // two waves; the kill lands between them, while the first wave is being paid.
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampler = sample_payout_attempts(bases.clone(), "bank", stop_sampling.clone());
    let all = USERS_W * ORDERS_PER_USER;
    let mut orders = withdraw_all(&client, &bases, "wu", &methods, 0..all / 3).await;
    let node = fleet.nodes[1].take().unwrap();
    let killed = node.port;
    node.kill9();
    orders.extend(withdraw_all(&client, &bases, "wu", &methods, all / 3..all).await);
    fleet.wait_balanced(2).await;
    let bases = fleet.bases();
    let (paid, refunded) = check_withdrawals(&fleet, &client, &orders, FUNDING).await;
    // The near-real-time reconciler looked at every order's changes and found nothing wrong.
    // (It used to match each order with the wallet movements of its own partition's log, where
    // they are not on a cluster: every order was a "debit" mismatch.)
    let (mut checks, mut mismatches) = (0.0, 0.0);
    for base in &bases {
        let text = scrape(&client, base).await;
        checks += metric(&text, "hongbao_reconciliation_checks_total").unwrap_or(0.0);
        mismatches += metric(&text, "hongbao_reconciliation_mismatches_total").unwrap();
    }
    assert!(checks >= orders.len() as f64, "{checks} reconciler checks");
    assert_eq!(mismatches, 0.0, "reconciliation mismatches on a clean run");
    stop_sampling.store(true, Ordering::Relaxed);
    let attempts = sampler.await.unwrap();
    assert!(
        refunded > 0 && paid > orders.len() / 3,
        "the bank is flaky: {refunded} refunded, {paid} paid"
    );
    // The fleet's pace: the bank's payment calls in any second at most the rate plus three
    // batches of 100 ms (2 tokens each), with a margin for the sampling; and all of them take
    // well over what they would at once.
    for (i, (t1, c1)) in attempts.iter().enumerate() {
        for (t2, c2) in &attempts[i + 1..] {
            let window = (*t2 - *t1).as_secs_f64();
            if window > 1.0 {
                break;
            }
            assert!(
                c2 - c1 <= RATE as f64 * 1.25 + 12.0,
                "{} payment calls in {window:.2} s: {attempts:?}",
                c2 - c1
            );
        }
    }
    let calls = attempts.last().unwrap().1;
    assert!(
        calls >= orders.len() as f64,
        "{calls} calls sampled for {} orders",
        orders.len()
    );
    // The parked listing is the fleet's (every partition asked, pages merged): all settled
    // now, so empty through every node; its paging input refused as on one node.
    for (i, base) in bases.iter().enumerate() {
        for (query, expected) in [("?limit=5", 200), ("?limit=0", 400), ("?after=@", 400)] {
            let (status, body) = call(
                &client,
                reqwest::Method::GET,
                format!("{base}/v1/admin/withdrawals/parked{query}"),
                ADMIN,
                None,
            )
            .await;
            assert_eq!(status, expected, "parked{query} via node {i}: {body}");
            if status == 200 {
                assert_eq!(body, serde_json::json!([]), "via node {i}");
            }
        }
    }
    fleet.restart(1, killed);
    fleet.wait_balanced(3).await;
    let report = fleet.audit().await;
    let channels = audit_check(&report, "channel_statements");
    assert!(
        channels["checked"].as_u64().unwrap() >= orders.len() as u64,
        "the audit read the fleet's statements: {channels}"
    );
    fleet.verify().await;
    eprintln!(
        "withdrawals: {} orders on a flaky bank through a kill: {paid} paid, {refunded} refunded; \
         {calls} payment calls in {:.2} s at {RATE}/s for the fleet",
        orders.len(),
        attempts.last().unwrap().0.as_secs_f64()
    );
}
