//! Injected disk faults on the real binary (issue 15; cargo feature `failpoints`, which
//! `.ci/run` turns on for these tests: `cargo test --features failpoints --test api disk_faults`).
//!
//! A flush that fails as a full disk does stops the journal (fail-stop): `/readyz` answers 503,
//! every command 503 with `Retry-After`, nothing is acknowledged after the failure, the log
//! holds a few lines about it and not one per refused request, and a restart holds every
//! acknowledged deposit exactly once.

use super::crash::{get_json, ledger, spawn_binary_env, start_with};
use super::jetstream_faults::deposit;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// Wallets the deposits go to.
const WALLETS: usize = 4;
/// Requests fired at the stopped journal, from [`WORKERS`] concurrent clients.
const REFUSED: usize = 2_000;
const WORKERS: usize = 16;
/// Limited log sites a refused deposit can reach (the actor's breakdown, the handler's
/// unknown outcome, with and without the journal's reason) and lines beside them (the lanes'
/// checkpoints, the fail-stop itself): one line per request would be thousands.
const LIMITED_SITES: usize = 4;
const LINES_SLACK: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_the_journal_with_503s_few_log_lines_and_loses_no_acknowledged_deposit() {
    // The first 25 flushes pass; every later one fails as a full disk does.
    journal_fault("journal-flush=25*off->return(enospc)").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_journal_write_stops_the_journal_with_503s_few_log_lines_and_loses_nothing() {
    // The batch's write into the log's tree fails before anything of it is applied.
    journal_fault("journal-write=25*off->return(eio)").await;
}

/// The journal fails at the point `failpoints` arms: fail-stop, 503s with `Retry-After`, a
/// bounded log, and after a restart every acknowledged deposit once.
async fn journal_fault(failpoints: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let server = spawn_binary_env(
        &["serve", "--data-dir", data, "--addr", "127.0.0.1:0"],
        "hongbao listening",
        &[("FAILPOINTS", failpoints)],
    );
    let base = server.base();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    // One deposit at a time until the disk is full: each either acknowledged or refused.
    let mut acked: Vec<(String, String, i64)> = Vec::new();
    let mut failed_order = None;
    for n in 0..200usize {
        let (uid, order, amount) = (
            format!("df{}", n % WALLETS),
            format!("df-{n}"),
            n as i64 + 1,
        );
        let (status, _, body) = deposit(&client, &base, &uid, &order, amount)
            .await
            .expect("the server answers");
        match status {
            201 => acked.push((uid, order, amount)),
            503 => {
                failed_order = Some(order);
                break;
            }
            other => panic!("deposit {order}: {other} {body}"),
        }
    }
    let failed_order = failed_order.expect("the injected full disk refused a deposit");
    assert!(!acked.is_empty(), "some deposits before the disk filled");
    let ready = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503, "/readyz after the failure");

    // Thousands of requests at the stopped journal: each 503 with Retry-After, and the log
    // takes a few lines for all of them.
    let lines_before = server.log.lock().unwrap().len();
    let started = std::time::Instant::now();
    let statuses = Arc::new(std::sync::Mutex::new(HashMap::<String, usize>::new()));
    let tasks: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (client, base, statuses) = (client.clone(), base.clone(), statuses.clone());
            tokio::spawn(async move {
                for n in 0..REFUSED / WORKERS {
                    let (uid, order) = (format!("df{}", n % WALLETS), format!("late-{w}-{n}"));
                    let (status, retry_after, _) = deposit(&client, &base, &uid, &order, 7)
                        .await
                        .expect("the server answers");
                    let retry_after = retry_after.is_some();
                    let key = format!("{status} retry-after={retry_after}");
                    *statuses.lock().unwrap().entry(key).or_default() += 1;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let statuses = statuses.lock().unwrap().clone();
    assert_eq!(
        statuses,
        HashMap::from([("503 retry-after=true".to_owned(), REFUSED)]),
        "every request after the failure: 503 with Retry-After"
    );
    // The limited lines pass at one per second: give the count line a chance to come.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let _ = deposit(&client, &base, "df0", "late-last", 7).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lines: Vec<String> = server.log.lock().unwrap()[lines_before..].to_vec();
    // Each limited site: its burst, then one a second (a loaded machine takes longer).
    let seconds = started.elapsed().as_secs() as usize + 1;
    let lines_max = LIMITED_SITES * (hongbao::logs::BURST as usize + seconds) + LINES_SLACK;
    assert!(
        lines.len() <= lines_max,
        "{} log lines for {REFUSED} refused requests in {seconds} s (at most {lines_max}); the first 40:\n{}",
        lines.len(),
        lines[..40.min(lines.len())].join("\n")
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("suppressed=") && !l.contains("suppressed=0")),
        "no line counts the warnings held back:\n{}",
        lines.join("\n")
    );
    assert!(
        !lines.iter().any(|l| l.contains("panicked")),
        "{}",
        lines.join("\n")
    );

    // A restart on a disk with room: every acknowledged deposit once, nothing refused after
    // the failure, the one refused by the failed flush at most once (its outcome was unknown).
    server.kill9();
    let server = start_with(dir.path(), &[]);
    let base = server.base();
    let acked_orders: BTreeSet<&str> = acked.iter().map(|(_, o, _)| o.as_str()).collect();
    let mut seen = BTreeSet::new();
    for uid in (0..WALLETS).map(|i| format!("df{i}")) {
        let (balance, entries) = ledger(&client, &base, &uid).await;
        let mut sum = 0;
        for entry in &entries {
            let order = entry["order_id"].as_str().unwrap().to_owned();
            sum += entry["amount"].as_i64().unwrap();
            assert!(
                acked_orders.contains(order.as_str()) || order == failed_order,
                "{uid}: {order} is in the ledger but was never acknowledged: {entries:?}"
            );
            assert!(seen.insert(order.clone()), "{order} twice");
        }
        assert_eq!(balance, sum, "{uid}: balance != ledger");
    }
    for order in &acked_orders {
        assert!(seen.contains(*order), "acknowledged {order} lost");
    }
    let ready = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200, "/readyz after the restart");
    server.terminate();
}

/// The samples of `name` in a Prometheus text, by their whole label set.
fn samples(metrics: &str, name: &str) -> Vec<(String, f64)> {
    metrics
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_view_write_leaves_the_view_whole_and_it_catches_up_from_the_log() {
    // Goal: one view commit fails (a disk error in the derived-state database); the journal
    // goes on acknowledging, the view that failed stays at its checkpoint, is brought up to
    // the log from there without the server restarting, and equals a rebuild afterwards.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let server = spawn_binary_env(
        &["serve", "--data-dir", data, "--addr", "127.0.0.1:0"],
        "hongbao listening",
        &[("FAILPOINTS", "view-commit=20*off->1*return(eio)->off")],
    );
    let base = server.base();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let failed = || {
        server
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("projection cannot apply events"))
    };
    // Deposits until the injected failure has happened (the views apply after the
    // acknowledgement, in batches that grow when they lag, so how many deposits make 21 view
    // commits depends on the machine), then 40 more while a view is stalled.
    let (mut total, mut sent, mut after_failure) = (0, 0i64, None);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while after_failure.is_none_or(|first| sent < first + 40) {
        let order = format!("vf-{sent}");
        let answer = deposit(&client, &base, "vf0", &order, sent + 1).await;
        assert_eq!(
            answer.map(|(status, _, _)| status),
            Some(201),
            "{order}: the journal is not affected"
        );
        total += sent + 1;
        sent += 1;
        if after_failure.is_none() && failed() {
            after_failure = Some(sent);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the injected view failure did not happen in {sent} deposits:\n{}",
            server.log.lock().unwrap().join("\n")
        );
    }

    // Every view back at the log's head, from the log, within a few retries.
    let views =
        hongbao::projections::all(std::sync::Arc::new(hongbao::metrics::Metrics::new())).len();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (head, checkpoints) = loop {
        let metrics = super::scrape(&client, &base).await;
        let head = samples(&metrics, "hongbao_log_head_seq")[0].1;
        let checkpoints = samples(&metrics, "hongbao_projection_checkpoint_seq");
        if checkpoints.len() == views && checkpoints.iter().all(|(_, at)| *at == head) {
            break (head, checkpoints);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "views not back at the head {head}: {checkpoints:?}\n{}",
            server.log.lock().unwrap().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(head >= sent as f64, "{head} {checkpoints:?}");
    assert!(
        server
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("stalled view caught up from the log")),
        "the view came back without the retry?"
    );
    let (balance, entries) = ledger(&client, &base, "vf0").await;
    assert_eq!(balance, total);
    assert_eq!(entries.len() as i64, sent);
    server.terminate();

    // Every view equals a rebuild from the log up to its checkpoint.
    let (ok, out) = super::crash::command(&["audit", "--data-dir", data]);
    assert!(ok, "audit failed:\n{out}");
    assert!(out.contains("result: OK"), "{out}");
    assert!(!out.contains("no view built yet"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_flow_checkpoints_that_cannot_be_written_cost_a_replay_never_money() {
    // Goal: every actor snapshot and every flow checkpoint fails to write (a disk error in the
    // derived-state database): the journal goes on, the lanes credit every reward, and after a
    // kill -9 (the flows resume from checkpoints that never moved, the actors replay from
    // zero) every deposit and every reward is in its wallet exactly once.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let config = dir.path().join("often.toml");
    std::fs::write(
        &config,
        "[actors]\nsnapshot_every_events = 2\n[rewards]\nlane_checkpoint_interval_ms = 20\n",
    )
    .unwrap();
    let args = [
        "serve",
        "--data-dir",
        data,
        "--addr",
        "127.0.0.1:0",
        "--config",
        config.to_str().unwrap(),
    ];
    let server = spawn_binary_env(
        &args,
        "hongbao listening",
        &[(
            "FAILPOINTS",
            "snapshot-write=return(eio);flow-checkpoint=return(eio)",
        )],
    );
    let base = server.base();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut expected: HashMap<String, Vec<(String, i64)>> = HashMap::new();
    for n in 0..60i64 {
        let (uid, order) = (format!("sn{}", n % 3), format!("sn-d{n}"));
        let answer = deposit(&client, &base, &uid, &order, n + 1).await;
        assert_eq!(answer.map(|a| a.0), Some(201), "{order}");
        expected.entry(uid).or_default().push((order, n + 1));
    }
    let mut rewards = Vec::new();
    for n in 0..40i64 {
        let (uid, order) = (format!("sn{}", n % 4), format!("sn-r{n}"));
        let body = serde_json::json!({"order_id": order, "uid": uid, "activity_id": "snap",
            "scene": "rain", "kind": "cash", "amount": n + 100});
        let answer = client
            .post(format!("{base}/v1/rewards"))
            .bearer_auth(super::ISSUER)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status().as_u16(), 202, "{order}");
        expected
            .entry(uid)
            .or_default()
            .push((order.clone(), n + 100));
        rewards.push(order);
    }
    // Every reward credited by the lanes while no checkpoint can be saved.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for order in &rewards {
        loop {
            let url = format!("{base}/v1/rewards/{order}");
            let found = get_json(&client, url, super::ISSUER).await;
            if found["status"] == "credited" {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{order}: {found}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let ready = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200, "the journal is not affected");
    let seen = |what: &str| server.log.lock().unwrap().iter().any(|l| l.contains(what));
    assert!(seen("snapshot not saved"), "the snapshot fault never fired");
    assert!(
        seen("checkpoint not saved"),
        "the checkpoint fault never fired"
    );
    server.kill9();

    // Without the faults: the actors replay, the lanes start from the checkpoint they never
    // moved and meet every reward again: each credited once.
    let server = start_with(dir.path(), &[]);
    let base = server.base();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (uid, orders) in &expected {
        let (_, entries) = ledger(&client, &base, uid).await;
        let mut found: Vec<(String, i64)> = entries
            .iter()
            .map(|e| {
                (
                    e["order_id"].as_str().unwrap().to_owned(),
                    e["amount"].as_i64().unwrap(),
                )
            })
            .collect();
        let mut want = orders.clone();
        found.sort();
        want.sort();
        assert_eq!(found, want, "{uid}: every deposit and reward once");
    }
    server.terminate();
    let (ok, out) = super::crash::command(&["audit", "--data-dir", data]);
    assert!(ok && out.contains("result: OK"), "audit failed:\n{out}");
}
