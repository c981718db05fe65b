//! The deposit of `deposits --sustain` on the textbook stores, beside hongbao over a long run
//! (issue 14): the same request (a wallet's balance raised and a ledger line written, once
//! per order id, durable before the answer) on PostgreSQL (`synchronous_commit` as the server
//! has it: on by default) and on Redis (a Lua script; `redis-always` with `appendonly yes` and
//! `appendfsync always` for its intervals, the server's own settings restored after), through
//! pools of `--pool` connections shared by `--in-flight` tasks, as the packets' baselines are.
//! Their tables grow with the run like hongbao's log, so a decay of theirs shows beside ours.

use super::client::RunResult;
use super::packets::{config_get, config_set, pg_client, redis_pool, Backend, RedisConn};
use deadpool::unmanaged::Pool;
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PG_SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS lg_wallets (
        uid text PRIMARY KEY,
        balance bigint NOT NULL);
    CREATE TABLE IF NOT EXISTS lg_ledger (
        order_id text PRIMARY KEY,
        uid text NOT NULL,
        amount bigint NOT NULL,
        balance_after bigint NOT NULL,
        at timestamptz NOT NULL DEFAULT now());";

/// A PostgreSQL connection with the deposit's statements prepared.
pub struct PgLedger {
    client: tokio_postgres::Client,
    credit: tokio_postgres::Statement,
    line: tokio_postgres::Statement,
}

async fn pg_connect(url: &str) -> Result<PgLedger, String> {
    let client = pg_client(url, PG_SCHEMA).await?;
    let credit = client
        .prepare(
            "INSERT INTO lg_wallets (uid, balance) VALUES ($1, $2) ON CONFLICT (uid) \
             DO UPDATE SET balance = lg_wallets.balance + $2 RETURNING balance",
        )
        .await
        .map_err(|e| e.to_string())?;
    let line = client
        .prepare(
            "INSERT INTO lg_ledger (order_id, uid, amount, balance_after) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (order_id) DO NOTHING",
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(PgLedger {
        client,
        credit,
        line,
    })
}

/// Idempotent by order id: the line first (a repeated order id changes nothing), then the
/// balance, in one transaction.
const REDIS_DEPOSIT: &str = r"
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
    return -1
end
local balance = redis.call('HINCRBY', KEYS[2], ARGV[2], ARGV[3])
redis.call('RPUSH', KEYS[3], ARGV[1] .. ':' .. ARGV[3] .. ':' .. balance)
return balance";

/// Where the baseline deposits go.
pub enum Ledger {
    Postgres {
        pool: Pool<PgLedger>,
    },
    Redis {
        durable: bool,
        prefix: String,
        script: redis::Script,
        pool: Pool<RedisConn>,
    },
}

impl Ledger {
    /// `backend`'s ledger (`postgres`, `redis` or `redis-always`), emptied; `None` for hongbao.
    pub async fn open(
        backend: Backend,
        postgres_url: &str,
        redis_url: &str,
        size: usize,
        run_id: u32,
    ) -> Result<Option<Ledger>, String> {
        let size = size.max(1);
        match backend {
            Backend::Hongbao => Ok(None),
            Backend::Postgres => {
                let pool = Pool::new(size);
                for _ in 0..size {
                    pool.add(pg_connect(postgres_url).await?)
                        .await
                        .map_err(|(_, e)| e.to_string())?;
                }
                let conn = pool.get().await.map_err(|e| e.to_string())?;
                conn.client
                    .batch_execute("TRUNCATE lg_wallets, lg_ledger")
                    .await
                    .map_err(|e| format!("emptying the ledger baseline tables: {e}"))?;
                drop(conn);
                Ok(Some(Ledger::Postgres { pool }))
            }
            Backend::Redis | Backend::RedisAlways => {
                let pool = redis_pool(redis_url, size).await?;
                Ok(Some(Ledger::Redis {
                    durable: backend == Backend::RedisAlways,
                    prefix: format!("lgd:{run_id}:{}", backend.name()),
                    script: redis::Script::new(REDIS_DEPOSIT),
                    pool,
                }))
            }
        }
    }

    /// One deposit of `amount` fen to `uid`, durable when answered.
    pub async fn deposit(&self, uid: &str, order_id: &str, amount: i64) -> Result<(), String> {
        match self {
            Ledger::Postgres { pool } => {
                let mut conn = pool.get().await.map_err(|e| e.to_string())?;
                let PgLedger {
                    client,
                    credit,
                    line,
                } = &mut *conn;
                let tx = client.transaction().await.map_err(|e| e.to_string())?;
                let balance: i64 = tx
                    .query_one(&*credit, &[&uid, &amount])
                    .await
                    .map_err(|e| e.to_string())?
                    .get(0);
                let written = tx
                    .execute(&*line, &[&order_id, &uid, &amount, &balance])
                    .await
                    .map_err(|e| e.to_string())?;
                if written == 0 {
                    // A repeated order id: nothing changes.
                    tx.rollback().await.map_err(|e| e.to_string())?;
                } else {
                    tx.commit().await.map_err(|e| e.to_string())?;
                }
                Ok(())
            }
            Ledger::Redis {
                prefix,
                script,
                pool,
                ..
            } => {
                let mut conn = pool.get().await.map_err(|e| e.to_string())?;
                let _: i64 = script
                    .key(format!("{prefix}:orders"))
                    .key(format!("{prefix}:balances"))
                    .key(format!("{prefix}:lines:{uid}"))
                    .arg(order_id)
                    .arg(uid)
                    .arg(amount)
                    .invoke_async(&mut *conn)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(())
            }
        }
    }

    /// Ledger lines written so far.
    pub async fn lines(&self) -> Result<u64, String> {
        match self {
            Ledger::Postgres { pool } => {
                let conn = pool.get().await.map_err(|e| e.to_string())?;
                let row = conn
                    .client
                    .query_one("SELECT count(*) FROM lg_ledger", &[])
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(row.get::<_, i64>(0) as u64)
            }
            Ledger::Redis { prefix, pool, .. } => {
                let mut conn = pool.get().await.map_err(|e| e.to_string())?;
                let n: u64 = redis::cmd("HLEN")
                    .arg(format!("{prefix}:orders"))
                    .query_async(&mut *conn)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(n)
            }
        }
    }

    /// Runs `work` with Redis durable (`appendonly yes`, `appendfsync always`) when this is
    /// `redis-always`, the server's own settings restored after, whatever `work` answered.
    pub async fn durably<T>(
        &self,
        work: impl std::future::Future<Output = T>,
    ) -> Result<T, String> {
        let Ledger::Redis {
            durable: true,
            pool,
            ..
        } = self
        else {
            return Ok(work.await);
        };
        let mut conn = pool.get().await.map_err(|e| e.to_string())?;
        let mut before = Vec::new();
        for name in ["appendonly", "appendfsync"] {
            before.push((name, config_get(&mut conn, name).await?));
        }
        for (name, value) in [("appendonly", "yes"), ("appendfsync", "always")] {
            config_set(&mut conn, name, value).await?;
        }
        let out = work.await;
        for (name, value) in before.into_iter().rev() {
            config_set(&mut conn, name, &value).await?;
        }
        Ok(out)
    }

    /// Removes what a Redis ledger wrote (its keys carry the run's prefix); PostgreSQL's tables
    /// stay until the next run empties them.
    pub async fn clean(&self) -> Result<(), String> {
        let Ledger::Redis { prefix, pool, .. } = self else {
            return Ok(());
        };
        let mut conn = pool.get().await.map_err(|e| e.to_string())?;
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}:*"))
                .arg("COUNT")
                .arg(10_000)
                .query_async(&mut *conn)
                .await
                .map_err(|e| e.to_string())?;
            if !keys.is_empty() {
                let _: u64 = redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async(&mut *conn)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}

/// `in_flight` tasks depositing 100 fen each into `wallet(task, n)` for `duration`, order ids
/// unique to (`tag`, task, n): the rate, latency and errors as a [`RunResult`] (status 200 for
/// a deposit made, 0 for an error).
pub async fn interval(
    ledger: Arc<Ledger>,
    in_flight: usize,
    duration: Duration,
    tag: String,
    wallet: Arc<dyn Fn(usize, u64) -> String + Send + Sync>,
) -> RunResult {
    let deadline = Instant::now() + duration;
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..in_flight.max(1))
        .map(|task| {
            let (ledger, tag, wallet, errors) =
                (ledger.clone(), tag.clone(), wallet.clone(), errors.clone());
            tokio::spawn(async move {
                let mut latency =
                    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let order = format!("{tag}-{task}-{n}");
                    let began = Instant::now();
                    match ledger.deposit(&wallet(task, n), &order, 100).await {
                        Ok(()) => {
                            let _ = latency.record(began.elapsed().as_micros().max(1) as u64);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    n += 1;
                }
                latency
            })
        })
        .collect();
    let mut latency_us =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    for task in tasks {
        if let Ok(h) = task.await {
            let _ = latency_us.add(&h);
        }
    }
    let ok = latency_us.len();
    let errors = errors.load(Ordering::Relaxed);
    let mut statuses = BTreeMap::new();
    statuses.insert(200, ok);
    if errors > 0 {
        statuses.insert(0, errors);
    }
    RunResult {
        in_flight,
        measured: started.elapsed(),
        requests: ok + errors,
        statuses,
        latency_us,
    }
}
