//! `loadgen packets`: one hot red packet of `--shares` shares claimed by `--clients` concurrent
//! clients, each with its own uid, through a pool of `--pool` connections, against:
//!
//! - `hongbao`: the real server over HTTP (in-process on a temporary data directory, or
//!   `--target`): `POST /v1/packets/{id}/claims`, polling on 429 `busy` as clients do;
//! - `postgres`: the textbook design: a row per packet, and per claim one transaction of
//!   `SELECT ... FOR UPDATE`, a check for an earlier claim, a double-mean draw, a decrement and
//!   an `INSERT` of the claim (durable with the server's `synchronous_commit`);
//! - `redis`: the textbook design: shares pre-split into a list, one Lua script per claim
//!   (`HEXISTS`, `RPOP`, `HSET`), durable only as far as the server's AOF settings say;
//! - `redis-always`: the same with `appendonly yes` and `appendfsync always` set for the run
//!   (and the previous settings restored after), the durable variant.
//!
//! Every backend is driven by the same client tasks through the same kind of pool
//! (`deadpool::unmanaged`, one connection per slot). A round ends when every client has been
//! told the packet is empty; it checks that exactly `--shares` claims won and that they sum to
//! the total, so a fast but wrong backend cannot pass unnoticed.

use super::client::post_json;
use super::LoadgenError;
use crate::domain::packet::double_mean_share;
use deadpool::unmanaged::{Object, Pool};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use rand::SeedableRng;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Average share in fen: the packet's total is `shares * SHARE_MEAN_FEN`.
pub const SHARE_MEAN_FEN: u64 = 100;
/// A client polls a busy packet at most this many times (P5).
const POLLS_MAX: u32 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// hongbao over HTTP.
    Hongbao,
    /// Textbook PostgreSQL: row per packet, SELECT ... FOR UPDATE, decrement, insert claim.
    Postgres,
    /// Textbook Redis: pre-split list, Lua script with HEXISTS/RPOP/HSET, server's AOF settings.
    Redis,
    /// Textbook Redis with appendonly yes and appendfsync always for the run.
    RedisAlways,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Hongbao => "hongbao",
            Backend::Postgres => "postgres",
            Backend::Redis => "redis",
            Backend::RedisAlways => "redis-always",
        }
    }
}

/// What one claim attempt got.
#[derive(Debug)]
pub enum Claimed {
    Won(u64),
    Empty,
    Busy(Duration),
    Failed(String),
}

/// One round's outcome.
#[derive(Debug)]
pub struct Round {
    pub wins: u64,
    pub won_fen: u64,
    pub empties: u64,
    pub busy: u64,
    pub gave_up: u64,
    pub failures: u64,
    pub first_failure: Option<String>,
    /// From the first request to the last winning answer.
    pub claiming: Duration,
    /// Winning claims, first attempt to answer (polling included), in microseconds.
    pub latency_us: Histogram<u64>,
}

impl Round {
    pub fn claims_per_second(&self) -> f64 {
        self.wins as f64 / self.claiming.as_secs_f64().max(1e-9)
    }

    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }
}

/// A connection to hongbao: one keep-alive HTTP/1.1 connection.
pub struct HttpConn {
    sender: SendRequest<Full<Bytes>>,
}

async fn http_connect(addr: SocketAddr) -> Result<HttpConn, String> {
    Ok(HttpConn {
        sender: http1_connect(addr).await?,
    })
}

/// One keep-alive HTTP/1.1 connection to `addr` (no Nagle), its driver spawned.
pub(super) async fn http1_connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake with {addr}: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

/// A PostgreSQL connection with the claim's statements prepared.
pub struct PgConn {
    client: tokio_postgres::Client,
    lock: tokio_postgres::Statement,
    earlier: tokio_postgres::Statement,
    decrement: tokio_postgres::Statement,
    insert: tokio_postgres::Statement,
}

const PG_SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS lg_packets (
        id text PRIMARY KEY,
        remaining_count bigint NOT NULL,
        remaining_amount bigint NOT NULL);
    CREATE TABLE IF NOT EXISTS lg_claims (
        packet_id text NOT NULL,
        uid text NOT NULL,
        amount bigint NOT NULL,
        claimed_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (packet_id, uid));";

/// A PostgreSQL client at `url` (its connection driven by a task) with `schema` created.
pub(super) async fn pg_client(url: &str, schema: &str) -> Result<tokio_postgres::Client, String> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("connecting to PostgreSQL ({url}): {e}"))?;
    tokio::spawn(conn);
    client
        .batch_execute(schema)
        .await
        .map_err(|e| format!("creating the baseline tables: {e}"))?;
    Ok(client)
}

/// A pool of `size` multiplexed connections to the Redis at `url`.
pub(super) async fn redis_pool(url: &str, size: usize) -> Result<Pool<RedisConn>, String> {
    let client = redis::Client::open(url).map_err(|e| format!("Redis URL {url}: {e}"))?;
    let pool = Pool::new(size);
    for _ in 0..size {
        let conn = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| format!("connecting to Redis ({url}): {e}"))?;
        pool.add(conn).await.map_err(|(_, e)| e.to_string())?;
    }
    Ok(pool)
}

async fn pg_connect(url: &str) -> Result<PgConn, String> {
    let client = pg_client(url, PG_SCHEMA).await?;
    let prepare = |sql: &'static str| {
        let client = &client;
        async move {
            client
                .prepare(sql)
                .await
                .map_err(|e| format!("preparing {sql}: {e}"))
        }
    };
    Ok(PgConn {
        lock: prepare(
            "SELECT remaining_count, remaining_amount FROM lg_packets WHERE id = $1 FOR UPDATE",
        )
        .await?,
        earlier: prepare("SELECT amount FROM lg_claims WHERE packet_id = $1 AND uid = $2").await?,
        decrement: prepare(
            "UPDATE lg_packets SET remaining_count = remaining_count - 1, \
             remaining_amount = remaining_amount - $2 WHERE id = $1",
        )
        .await?,
        insert: prepare("INSERT INTO lg_claims (packet_id, uid, amount) VALUES ($1, $2, $3)")
            .await?,
        client,
    })
}

/// The textbook claim: everything under the packet row's lock, one transaction.
async fn pg_claim(conn: &mut PgConn, packet: &str, uid: &str) -> Result<Claimed, String> {
    let PgConn {
        client,
        lock,
        earlier,
        decrement,
        insert,
    } = conn;
    let tx = client.transaction().await.map_err(|e| e.to_string())?;
    let row = tx
        .query_opt(&*lock, &[&packet])
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("packet {packet} missing"))?;
    let (count, left): (i64, i64) = (row.get(0), row.get(1));
    if let Some(row) = tx
        .query_opt(&*earlier, &[&packet, &uid])
        .await
        .map_err(|e| e.to_string())?
    {
        return Ok(Claimed::Won(row.get::<_, i64>(0) as u64));
    }
    if count == 0 {
        return Ok(Claimed::Empty);
    }
    let share = double_mean_share(left as u64, count as u64, &mut rand::rng()) as i64;
    tx.execute(&*decrement, &[&packet, &share])
        .await
        .map_err(|e| e.to_string())?;
    tx.execute(&*insert, &[&packet, &uid, &share])
        .await
        .map_err(|e| e.to_string())?;
    tx.commit().await.map_err(|e| e.to_string())?;
    Ok(Claimed::Won(share as u64))
}

const REDIS_CLAIM: &str = r"
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
    return tonumber(redis.call('HGET', KEYS[2], ARGV[1]))
end
local share = redis.call('RPOP', KEYS[1])
if not share then
    return -1
end
redis.call('HSET', KEYS[2], ARGV[1], share)
return tonumber(share)";

pub(super) type RedisConn = redis::aio::MultiplexedConnection;

/// Where the clients claim.
pub enum Claimer {
    Http {
        addr: SocketAddr,
        key: String,
        pool: Pool<HttpConn>,
    },
    Postgres {
        pool: Pool<PgConn>,
    },
    Redis {
        script: redis::Script,
        pool: Pool<RedisConn>,
    },
}

impl Claimer {
    pub async fn http(addr: SocketAddr, key: String, size: usize) -> Result<Claimer, String> {
        let pool = Pool::new(size);
        for _ in 0..size {
            pool.add(http_connect(addr).await?)
                .await
                .map_err(|(_, e)| e.to_string())?;
        }
        Ok(Claimer::Http { addr, key, pool })
    }

    pub async fn postgres(url: &str, size: usize) -> Result<Claimer, String> {
        let pool = Pool::new(size);
        for _ in 0..size {
            pool.add(pg_connect(url).await?)
                .await
                .map_err(|(_, e)| e.to_string())?;
        }
        Ok(Claimer::Postgres { pool })
    }

    pub async fn redis(url: &str, size: usize) -> Result<Claimer, String> {
        let pool = redis_pool(url, size).await?;
        Ok(Claimer::Redis {
            script: redis::Script::new(REDIS_CLAIM),
            pool,
        })
    }

    /// One claim attempt.
    pub async fn claim(&self, packet: &str, uid: &str) -> Claimed {
        match self {
            Claimer::Http { addr, key, pool } => {
                let Ok(mut conn) = pool.get().await else {
                    return Claimed::Failed("pool closed".into());
                };
                if conn.sender.ready().await.is_err() {
                    // Closed while idle in the pool (the server ends keep-alive connections
                    // idle past its timeout, as between rounds): nothing was sent, so a fresh
                    // connection takes its place and the claim goes on it, not counted as an
                    // error.
                    drop(Object::take(conn));
                    match http_connect(*addr).await {
                        Ok(fresh) => {
                            let _ = pool.add(fresh).await;
                        }
                        Err(e) => return Claimed::Failed(e),
                    }
                    conn = match pool.get().await {
                        Ok(conn) => conn,
                        Err(_) => return Claimed::Failed("pool closed".into()),
                    };
                }
                let request = post_json(
                    *addr,
                    &format!("/v1/packets/{packet}/claims"),
                    Some(key),
                    format!(r#"{{"uid":"{uid}"}}"#),
                );
                match http_claim(&mut conn, request).await {
                    Ok(claimed) => claimed,
                    Err(e) => {
                        // A broken connection leaves the pool; a fresh one takes its slot.
                        drop(Object::take(conn));
                        if let Ok(fresh) = http_connect(*addr).await {
                            let _ = pool.add(fresh).await;
                        }
                        Claimed::Failed(e)
                    }
                }
            }
            Claimer::Postgres { pool } => {
                let Ok(mut conn) = pool.get().await else {
                    return Claimed::Failed("pool closed".into());
                };
                pg_claim(&mut conn, packet, uid)
                    .await
                    .unwrap_or_else(Claimed::Failed)
            }
            Claimer::Redis { script, pool } => {
                let Ok(mut conn) = pool.get().await else {
                    return Claimed::Failed("pool closed".into());
                };
                let result: redis::RedisResult<i64> = script
                    .key(format!("lg:packet:{packet}:shares"))
                    .key(format!("lg:packet:{packet}:claims"))
                    .arg(uid)
                    .invoke_async(&mut *conn)
                    .await;
                match result {
                    Ok(-1) => Claimed::Empty,
                    Ok(share) => Claimed::Won(share as u64),
                    Err(e) => Claimed::Failed(e.to_string()),
                }
            }
        }
    }
}

async fn http_claim(
    conn: &mut HttpConn,
    request: hyper::Request<Full<Bytes>>,
) -> Result<Claimed, String> {
    conn.sender.ready().await.map_err(|e| e.to_string())?;
    let response = conn
        .sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    Ok(match status {
        200 => match json["amount"].as_u64() {
            Some(amount) => Claimed::Won(amount),
            None => Claimed::Failed(format!("200 without an amount: {json}")),
        },
        410 if json["code"] == "packet_empty" => Claimed::Empty,
        429 => Claimed::Busy(Duration::from_millis(
            json["retry_after_ms"].as_u64().unwrap_or(50),
        )),
        _ => Claimed::Failed(format!("{status} {json}")),
    })
}

/// Creates the packet of `shares` shares (total `shares * SHARE_MEAN_FEN`) on a textbook backend.
pub async fn prepare_baseline(
    claimer: &Claimer,
    packet: &str,
    shares: u32,
    seed: u64,
) -> Result<(), String> {
    let total = u64::from(shares) * SHARE_MEAN_FEN;
    match claimer {
        Claimer::Http { .. } => Ok(()),
        Claimer::Postgres { pool } => {
            let conn = pool.get().await.map_err(|e| e.to_string())?;
            conn.client
                .execute(
                    "INSERT INTO lg_packets (id, remaining_count, remaining_amount) VALUES ($1, $2, $3)",
                    &[&packet, &i64::from(shares), &(total as i64)],
                )
                .await
                .map_err(|e| format!("creating the packet row: {e}"))?;
            Ok(())
        }
        Claimer::Redis { pool, .. } => {
            // Pre-split at creation, as the textbook design does: the list holds every share.
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut left = total;
            let mut list = Vec::with_capacity(shares as usize);
            for k in (1..=u64::from(shares)).rev() {
                let share = double_mean_share(left, k, &mut rng);
                list.push(share);
                left -= share;
            }
            let mut conn = pool.get().await.map_err(|e| e.to_string())?;
            let key = format!("lg:packet:{packet}:shares");
            for chunk in list.chunks(1_000) {
                redis::cmd("RPUSH")
                    .arg(&key)
                    .arg(chunk)
                    .query_async::<()>(&mut *conn)
                    .await
                    .map_err(|e| format!("pre-splitting the packet: {e}"))?;
            }
            Ok(())
        }
    }
}

/// Removes what earlier runs left in a textbook backend.
pub async fn reset_baseline(claimer: &Claimer) -> Result<(), String> {
    match claimer {
        Claimer::Postgres { pool } => {
            let conn = pool.get().await.map_err(|e| e.to_string())?;
            conn.client
                .batch_execute("DELETE FROM lg_claims; DELETE FROM lg_packets;")
                .await
                .map_err(|e| format!("emptying the baseline tables: {e}"))
        }
        Claimer::Redis { pool, .. } => {
            let mut conn = pool.get().await.map_err(|e| e.to_string())?;
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("lg:packet:*")
                .query_async(&mut *conn)
                .await
                .map_err(|e| e.to_string())?;
            if !keys.is_empty() {
                redis::cmd("DEL")
                    .arg(keys)
                    .query_async::<()>(&mut *conn)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        }
        Claimer::Http { .. } => Ok(()),
    }
}

/// Reads a Redis config value on `conn`.
pub(super) async fn config_get(conn: &mut RedisConn, name: &str) -> Result<String, String> {
    let pair: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg(name)
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())?;
    Ok(pair.get(1).cloned().unwrap_or_default())
}

/// Sets a Redis config value on `conn`.
pub(super) async fn config_set(
    conn: &mut RedisConn,
    name: &str,
    value: &str,
) -> Result<(), String> {
    redis::cmd("CONFIG")
        .arg("SET")
        .arg(name)
        .arg(value)
        .query_async::<()>(conn)
        .await
        .map_err(|e| format!("CONFIG SET {name} {value}: {e}"))
}

/// Reads a Redis config value.
pub async fn redis_config(claimer: &Claimer, name: &str) -> Result<String, String> {
    let Claimer::Redis { pool, .. } = claimer else {
        return Err("not Redis".into());
    };
    let mut conn = pool.get().await.map_err(|e| e.to_string())?;
    config_get(&mut conn, name).await
}

/// Sets a Redis config value.
pub async fn redis_set_config(claimer: &Claimer, name: &str, value: &str) -> Result<(), String> {
    let Claimer::Redis { pool, .. } = claimer else {
        return Err("not Redis".into());
    };
    let mut conn = pool.get().await.map_err(|e| e.to_string())?;
    config_set(&mut conn, name, value).await
}

/// Reads a PostgreSQL setting.
pub async fn pg_setting(claimer: &Claimer, name: &str) -> Result<String, String> {
    let Claimer::Postgres { pool } = claimer else {
        return Err("not PostgreSQL".into());
    };
    let conn = pool.get().await.map_err(|e| e.to_string())?;
    let row = conn
        .client
        .query_one(&format!("SHOW {name}"), &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

#[derive(Default)]
struct ClientTally {
    wins: u64,
    won_fen: u64,
    empties: u64,
    busy: u64,
    gave_up: u64,
    failures: u64,
    first_failure: Option<String>,
    last_win: Option<Instant>,
}

/// Runs one round: `clients` tasks claim with fresh uids until each is told the packet is empty.
pub async fn round(claimer: Arc<Claimer>, packet: &str, clients: usize) -> Round {
    let started = Instant::now();
    let next_uid = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (claimer, next_uid, packet) =
                (claimer.clone(), next_uid.clone(), packet.to_owned());
            tokio::spawn(async move {
                let mut tally = ClientTally::default();
                // Raw latencies: a histogram per client would zero megabytes per round.
                let mut latency = Vec::new();
                'uids: loop {
                    let uid = format!("fan{}", next_uid.fetch_add(1, Ordering::Relaxed));
                    let first_attempt = Instant::now();
                    for _ in 0..POLLS_MAX {
                        match claimer.claim(&packet, &uid).await {
                            Claimed::Won(amount) => {
                                tally.wins += 1;
                                tally.won_fen += amount;
                                tally.last_win = Some(Instant::now());
                                latency.push(first_attempt.elapsed().as_micros() as u64);
                                continue 'uids;
                            }
                            Claimed::Empty => {
                                tally.empties += 1;
                                break 'uids;
                            }
                            Claimed::Busy(wait) => {
                                tally.busy += 1;
                                tokio::time::sleep(wait).await;
                            }
                            Claimed::Failed(e) => {
                                tally.failures += 1;
                                tally.first_failure.get_or_insert(e);
                                // Failures do not end a client, but a backend that only fails
                                // must not spin forever.
                                if tally.failures > 1_000 {
                                    break 'uids;
                                }
                                continue 'uids;
                            }
                        }
                    }
                    tally.gave_up += 1;
                }
                (tally, latency)
            })
        })
        .collect();
    let mut total = Round {
        wins: 0,
        won_fen: 0,
        empties: 0,
        busy: 0,
        gave_up: 0,
        failures: 0,
        first_failure: None,
        claiming: Duration::ZERO,
        latency_us: histogram(),
    };
    let mut last_win = started;
    for task in tasks {
        let Ok((tally, latency)) = task.await else {
            total.failures += 1;
            continue;
        };
        total.wins += tally.wins;
        total.won_fen += tally.won_fen;
        total.empties += tally.empties;
        total.busy += tally.busy;
        total.gave_up += tally.gave_up;
        total.failures += tally.failures;
        if total.first_failure.is_none() {
            total.first_failure = tally.first_failure;
        }
        last_win = last_win.max(tally.last_win.unwrap_or(started));
        for us in latency {
            let _ = total.latency_us.record(us.clamp(1, LATENCY_US_MAX));
        }
    }
    total.claiming = last_win - started;
    total
}

const LATENCY_US_MAX: u64 = 60_000_000;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("static histogram bounds")
}

impl From<String> for LoadgenError {
    fn from(message: String) -> LoadgenError {
        LoadgenError::Usage(message)
    }
}
