//! A chaos loop of the real binary (issue 15): `kill -9` at random moments under mixed load
//! (deposits to a few wallets, cash rewards credited by the lanes, claims on one hot packet),
//! cycle after cycle on the same data
//! directory. Every request whose answer was lost is resolved afterwards by retrying it with
//! the same id, as a client must; then, from the client's side only: every acknowledged
//! deposit and claim is there exactly once with what its answer said, the packet's claims are
//! exactly the answered ones, every winner holds its share, and money is conserved. Then
//! `verify` and `audit` pass on the directory.
//!
//! `HONGBAO_CHAOS_CYCLES` (default 5, what CI runs) sets the kills; `HONGBAO_CHAOS_SEED` the
//! seed of the moments (printed, so a failing run can be replayed). The full run:
//! `HONGBAO_CHAOS_CYCLES=100 cargo test --release --test api chaos -- --nocapture`
//! (docs/BENCHMARKS.md gives its figures).

use super::crash::{call, command, ledger, packet_claims, start_with, wallet};
use super::{ADMIN, GATEWAY, ISSUER};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WALLETS: usize = 8;
const WORKERS: usize = 12;
const FUND: i64 = 10_000_000;
const PACKET_TOTAL: i64 = 2_000_000;
const PACKET_SHARES: i64 = 10_000;

/// What a client knows of one request.
#[derive(Debug, Clone, PartialEq)]
enum Known {
    /// Acknowledged, with the amount its answer named (deposit: its amount; claim: the share).
    Acked(i64),
    /// Refused with a code (a claim on an empty packet).
    Refused(String),
    /// No answer (the server died): to be retried with the same id.
    Lost,
}

#[derive(Default)]
struct Book {
    /// order id -> (uid, amount, what is known)
    deposits: BTreeMap<String, (String, i64, Known)>,
    /// claimant uid -> what is known
    claims: BTreeMap<String, Known>,
    /// reward order id -> (uid, amount, what is known)
    rewards: BTreeMap<String, (String, i64, Known)>,
}

fn reward_body(order: &str, uid: &str, amount: i64) -> Value {
    serde_json::json!({"order_id": order, "uid": uid, "activity_id": "chaos", "scene": "rain",
        "kind": "cash", "amount": amount})
}

fn deposit_body(order: &str, amount: i64) -> Value {
    serde_json::json!({"order_id": order, "amount": amount})
}

async fn send(
    client: &reqwest::Client,
    url: String,
    key: &str,
    body: &Value,
) -> Option<(u16, Value)> {
    let response = client
        .post(url)
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    let body = response.json().await.ok()?;
    Some((status, body))
}

/// One firing loop: deposits and claims alternately until `stop`.
async fn fire(
    client: reqwest::Client,
    base: String,
    book: Arc<Mutex<Book>>,
    tag: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    for n in 0u64.. {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if n % 3 == 2 {
            let (uid, order, amount) = (
                format!("rc{}", n as usize % WALLETS),
                format!("{tag}-r{n}"),
                (n % 13 + 1) as i64,
            );
            book.lock()
                .unwrap()
                .rewards
                .insert(order.clone(), (uid.clone(), amount, Known::Lost));
            let url = format!("{base}/v1/rewards");
            match send(&client, url, ISSUER, &reward_body(&order, &uid, amount)).await {
                Some((202, _)) => {
                    book.lock().unwrap().rewards.get_mut(&order).unwrap().2 = Known::Acked(amount)
                }
                Some((503, _)) | None => return,
                Some(other) => panic!("reward {order}: {other:?}"),
            }
        } else if n % 3 == 0 {
            let (uid, order, amount) = (
                format!("ch{}", n as usize % WALLETS),
                format!("{tag}-d{n}"),
                (n % 97 + 1) as i64,
            );
            book.lock()
                .unwrap()
                .deposits
                .insert(order.clone(), (uid.clone(), amount, Known::Lost));
            let url = format!("{base}/v1/wallets/{uid}/change/deposits");
            match send(&client, url, ADMIN, &deposit_body(&order, amount)).await {
                Some((201, _)) => {
                    book.lock().unwrap().deposits.get_mut(&order).unwrap().2 = Known::Acked(amount)
                }
                Some((503, _)) | None => return, // the server is going: this one stays Lost
                Some(other) => panic!("deposit {order}: {other:?}"),
            }
        } else {
            let uid = format!("{tag}-c{n}");
            book.lock().unwrap().claims.insert(uid.clone(), Known::Lost);
            let url = format!("{base}/v1/packets/chaos/claims");
            match send(&client, url, GATEWAY, &serde_json::json!({ "uid": uid })).await {
                Some((200, share)) => {
                    let amount = share["amount"].as_i64().expect("a share");
                    book.lock()
                        .unwrap()
                        .claims
                        .insert(uid, Known::Acked(amount));
                }
                Some((410, body)) => {
                    let code = body["code"].as_str().unwrap_or_default().to_owned();
                    book.lock()
                        .unwrap()
                        .claims
                        .insert(uid, Known::Refused(code));
                }
                // Busy: refused before it was decided; nothing to resolve.
                Some((429, _)) => {
                    book.lock().unwrap().claims.remove(&uid);
                }
                Some((503, _)) | None => return,
                Some(other) => panic!("claim {uid}: {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_under_mixed_load_loses_nothing_and_pays_nothing_twice() {
    let cycles: usize = std::env::var("HONGBAO_CHAOS_CYCLES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(5);
    let seed: u64 = std::env::var("HONGBAO_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("chaos: {cycles} cycles, HONGBAO_CHAOS_SEED={seed}");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();

    // The sender's money and the hot packet, before the first kill.
    let server = start_with(dir.path(), &[]);
    let base = server.base();
    let post = |url: String, key: &'static str, body: Value| {
        call(&client, reqwest::Method::POST, url, key, Some(body))
    };
    let (status, _) = post(
        format!("{base}/v1/wallets/sender/change/deposits"),
        ADMIN,
        deposit_body("fund", FUND),
    )
    .await;
    assert_eq!(status, 201);
    let create = serde_json::json!({"packet_id": "chaos", "sender_uid": "sender", "mode": "c2c",
        "total": PACKET_TOTAL, "count": PACKET_SHARES, "split": "lucky", "expires_in_s": 86_400});
    assert_eq!(
        post(format!("{base}/v1/packets"), GATEWAY, create).await.0,
        201
    );
    let (status, paid) = post(
        format!("{base}/v1/packets/chaos/pay"),
        GATEWAY,
        serde_json::json!({"payment_id": "pay-chaos"}),
    )
    .await;
    assert_eq!((status, paid["state"].as_str()), (200, Some("active")));
    let mut server = Some(server);

    let book = Arc::new(Mutex::new(Book::default()));
    let started = Instant::now();
    for cycle in 0..cycles {
        let running = match server.take() {
            Some(s) => s,
            None => start_with(dir.path(), &[]),
        };
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks: Vec<_> = (0..WORKERS)
            .map(|w| {
                tokio::spawn(fire(
                    client.clone(),
                    running.base(),
                    book.clone(),
                    format!("k{cycle}w{w}"),
                    stop.clone(),
                ))
            })
            .collect();
        // A random moment: anywhere from just after the start to a second and a half in.
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..1_500))).await;
        running.kill9();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for task in tasks {
            task.await.unwrap();
        }
    }

    // Every lost answer resolved by a retry with the same id.
    let server = start_with(dir.path(), &[]);
    let base = server.base();
    let (lost_deposits, lost_claims) = {
        let book = book.lock().unwrap();
        let deposits: Vec<(String, String, i64)> = book
            .deposits
            .iter()
            .filter(|(_, (_, _, k))| *k == Known::Lost)
            .map(|(o, (u, a, _))| (o.clone(), u.clone(), *a))
            .collect();
        let claims: Vec<String> = book
            .claims
            .iter()
            .filter(|(_, k)| **k == Known::Lost)
            .map(|(u, _)| u.clone())
            .collect();
        (deposits, claims)
    };
    for (order, uid, amount) in &lost_deposits {
        let (status, body) = post(
            format!("{base}/v1/wallets/{uid}/change/deposits"),
            ADMIN,
            deposit_body(order, *amount),
        )
        .await;
        assert!(
            matches!(status, 200 | 201),
            "retry of {order}: {status} {body}"
        );
        book.lock().unwrap().deposits.get_mut(order).unwrap().2 = Known::Acked(*amount);
    }
    for uid in &lost_claims {
        let (status, body) = post(
            format!("{base}/v1/packets/chaos/claims"),
            GATEWAY,
            serde_json::json!({ "uid": uid }),
        )
        .await;
        let known = match status {
            200 => Known::Acked(body["amount"].as_i64().unwrap()),
            410 => Known::Refused(body["code"].as_str().unwrap_or_default().to_owned()),
            other => panic!("retry of claim {uid}: {other} {body}"),
        };
        book.lock().unwrap().claims.insert(uid.clone(), known);
    }
    let lost_rewards: Vec<(String, String, i64)> = book
        .lock()
        .unwrap()
        .rewards
        .iter()
        .filter(|(_, (_, _, k))| *k == Known::Lost)
        .map(|(o, (u, a, _))| (o.clone(), u.clone(), *a))
        .collect();
    for (order, uid, amount) in &lost_rewards {
        let (status, body) = post(
            format!("{base}/v1/rewards"),
            ISSUER,
            reward_body(order, uid, *amount),
        )
        .await;
        assert!(
            matches!(status, 200 | 202),
            "retry of {order}: {status} {body}"
        );
        book.lock().unwrap().rewards.get_mut(order).unwrap().2 = Known::Acked(*amount);
    }
    let book = Arc::try_unwrap(book).ok().unwrap().into_inner().unwrap();

    // Rewards: every accepted one credited to its user's activity balance, once.
    for uid in (0..WALLETS).map(|i| format!("rc{i}")) {
        let expected: i64 = book
            .rewards
            .values()
            .filter(|(owner, _, _)| *owner == uid)
            .map(|(_, amount, _)| amount)
            .sum();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let wallet = wallet(&client, &base, &uid).await;
            let credited = wallet["balances"]["activity"].as_i64().unwrap_or(0);
            if credited == expected {
                break;
            }
            assert!(
                credited < expected,
                "{uid}: {credited} credited, more than the {expected} accepted"
            );
            assert!(
                Instant::now() < deadline,
                "{uid}: {credited} of {expected} credited"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (_, entries) = ledger(&client, &base, &uid).await;
        let mut orders = BTreeSet::new();
        for entry in &entries {
            let order = entry["order_id"].as_str().unwrap().to_owned();
            assert!(
                orders.insert(order.clone()),
                "reward {order} credited twice"
            );
            let (owner, amount, _) = book
                .rewards
                .get(&order)
                .unwrap_or_else(|| panic!("{order} credited to {uid} was never sent"));
            assert_eq!((owner, entry["amount"].as_i64().unwrap()), (&uid, *amount));
        }
    }

    // Deposits: each once, with its amount; balances are their ledgers' sums.
    let mut deposited = 0;
    for uid in (0..WALLETS).map(|i| format!("ch{i}")) {
        let (balance, entries) = ledger(&client, &base, &uid).await;
        let mut orders = BTreeSet::new();
        for entry in &entries {
            let order = entry["order_id"].as_str().unwrap().to_owned();
            assert!(
                orders.insert(order.clone()),
                "{order} twice in {uid}'s ledger"
            );
            let (owner, amount, _) = book
                .deposits
                .get(&order)
                .unwrap_or_else(|| panic!("{order} in {uid}'s ledger was never sent"));
            assert_eq!((owner, entry["amount"].as_i64().unwrap()), (&uid, *amount));
        }
        for (order, (owner, _, _)) in &book.deposits {
            if *owner == uid {
                assert!(orders.contains(order), "acknowledged deposit {order} lost");
            }
        }
        assert_eq!(
            balance,
            entries
                .iter()
                .map(|e| e["amount"].as_i64().unwrap())
                .sum::<i64>()
        );
        deposited += balance;
    }

    // Claims: the packet's are exactly the acknowledged ones; every winner holds its share.
    let (_, packet) = call(
        &client,
        reqwest::Method::GET,
        format!("{base}/v1/packets/chaos"),
        GATEWAY,
        None,
    )
    .await;
    let recorded = packet_claims(&packet);
    let acked: BTreeMap<String, i64> = book
        .claims
        .iter()
        .filter_map(|(u, k)| match k {
            Known::Acked(a) => Some((u.clone(), *a)),
            _ => None,
        })
        .collect();
    assert_eq!(
        recorded, acked,
        "the packet's claims are the acknowledged ones"
    );
    let claimed: i64 = recorded.values().sum();
    assert_eq!(
        packet["remaining_amount"].as_i64(),
        Some(PACKET_TOTAL - claimed)
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut paid_out = 0;
    for (uid, amount) in &acked {
        loop {
            let wallet = wallet(&client, &base, uid).await;
            if wallet["balances"]["change"].as_i64() == Some(*amount) {
                paid_out += wallet["balances"]["change"].as_i64().unwrap();
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{uid} never got {amount}: {wallet}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // Conservation, from the server's own figures: what came in (the fund and every deposit
    // sent) is in the sender's wallet, the deposit wallets, the winners' wallets and the
    // packet's remainder, and nowhere twice.
    let (sender, _) = ledger(&client, &base, "sender").await;
    let remaining = packet["remaining_amount"].as_i64().unwrap();
    assert_eq!(
        sender,
        FUND - PACKET_TOTAL,
        "the sender paid the packet once"
    );
    let sent: i64 = book.deposits.values().map(|(_, a, _)| a).sum();
    assert_eq!(deposited, sent, "every deposit sent is in, once");
    assert_eq!(
        FUND + sent,
        sender + deposited + paid_out + remaining,
        "money conserved"
    );
    eprintln!(
        "chaos: {cycles} kills in {:.0} s, {} deposits, {} rewards and {} claims ({} shares won, \
         {} refused), {} deposits, {} rewards and {} claims resolved by a retry after a lost \
         answer; lost: 0, paid twice: 0",
        started.elapsed().as_secs_f64(),
        book.deposits.len(),
        book.rewards.len(),
        book.claims.len(),
        acked.len(),
        book.claims.len() - acked.len(),
        lost_deposits.len(),
        lost_rewards.len(),
        lost_claims.len(),
    );
    assert!(server.terminate().success());
    let data = dir.path().to_str().unwrap();
    for check in [
        ["verify", "--data-dir", data],
        ["audit", "--data-dir", data],
    ] {
        let (ok, out) = command(&check);
        assert!(ok && out.contains("result: OK"), "{check:?}:\n{out}");
    }
}
