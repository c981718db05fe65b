//! The HTTP load driver: a fixed number of keep-alive HTTP/1.1 connections (hyper), each
//! sending its next request as soon as the previous answer is read, so "in flight" equals the
//! number of connections. Latencies go into an hdrhistogram per connection, merged at the end.

use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1;
use hyper::Request;
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Builds request number `n` of connection `connection`.
pub type RequestFactory = Arc<dyn Fn(usize, u64) -> Request<Full<Bytes>> + Send + Sync>;

/// Latency range recorded: 1 us to 60 s, 3 significant digits.
const LATENCY_US_MAX: u64 = 60_000_000;

#[derive(Debug, Clone)]
pub struct RunResult {
    pub in_flight: usize,
    pub measured: Duration,
    pub requests: u64,
    /// Count by HTTP status (0: transport error).
    pub statuses: BTreeMap<u16, u64>,
    pub latency_us: Histogram<u64>,
}

impl RunResult {
    pub fn per_second(&self) -> f64 {
        self.requests as f64 / self.measured.as_secs_f64().max(1e-9)
    }

    pub fn ok(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, n)| n)
            .sum()
    }

    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("static histogram bounds")
}

struct ConnectionResult {
    requests: u64,
    statuses: BTreeMap<u16, u64>,
    latency_us: Histogram<u64>,
}

/// A pace shared by the connections of a paced run: each request waits for its turn.
pub type Pace = Arc<governor::DefaultDirectRateLimiter>;

async fn connection(
    addr: SocketAddr,
    id: usize,
    make: RequestFactory,
    measure_from: Instant,
    until: Instant,
    pace: Option<Pace>,
) -> ConnectionResult {
    let mut result = ConnectionResult {
        requests: 0,
        statuses: BTreeMap::new(),
        latency_us: histogram(),
    };
    let mut n = 0u64;
    'reconnect: while Instant::now() < until {
        let Ok(stream) = TcpStream::connect(addr).await else {
            *result.statuses.entry(0).or_default() += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Ok((mut sender, conn)) = http1::handshake(TokioIo::new(stream)).await else {
            continue;
        };
        tokio::spawn(conn);
        while Instant::now() < until {
            if let Some(pace) = &pace {
                // Latency runs from the turn, not from the wait for it: with connections to
                // spare the turn is the send (more in flight than the pace needs).
                if tokio::time::timeout_at(until.into(), pace.until_ready())
                    .await
                    .is_err()
                {
                    break;
                }
            }
            let request = make(id, n);
            n += 1;
            let started = Instant::now();
            if sender.ready().await.is_err() {
                continue 'reconnect;
            }
            let status = match sender.send_request(request).await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    match response.into_body().collect().await {
                        Ok(_) => status,
                        Err(_) => 0,
                    }
                }
                Err(_) => 0,
            };
            if started >= measure_from {
                result.requests += 1;
                *result.statuses.entry(status).or_default() += 1;
                let us = (started.elapsed().as_micros() as u64).clamp(1, LATENCY_US_MAX);
                let _ = result.latency_us.record(us);
            }
            if status == 0 {
                continue 'reconnect;
            }
        }
    }
    result
}

/// Drives `in_flight` connections for `warmup + duration`, measuring only after the warm-up.
pub fn drive(
    addr: SocketAddr,
    in_flight: usize,
    warmup: Duration,
    duration: Duration,
    client_threads: usize,
    make: RequestFactory,
) -> std::io::Result<RunResult> {
    drive_paced(
        addr,
        in_flight,
        warmup,
        duration,
        client_threads,
        make,
        None,
    )
}

/// As [`drive`], the connections sending together at most at `pace` (requests per second)
/// when one is given: a load below capacity.
pub fn drive_paced(
    addr: SocketAddr,
    in_flight: usize,
    warmup: Duration,
    duration: Duration,
    client_threads: usize,
    make: RequestFactory,
    pace: Option<Pace>,
) -> std::io::Result<RunResult> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(client_threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let measure_from = Instant::now() + warmup;
        let until = measure_from + duration;
        let tasks: Vec<_> = (0..in_flight)
            .map(|id| {
                tokio::spawn(connection(
                    addr,
                    id,
                    make.clone(),
                    measure_from,
                    until,
                    pace.clone(),
                ))
            })
            .collect();
        let mut total = RunResult {
            in_flight,
            measured: duration,
            requests: 0,
            statuses: BTreeMap::new(),
            latency_us: histogram(),
        };
        for task in tasks {
            if let Ok(r) = task.await {
                total.requests += r.requests;
                for (s, n) in r.statuses {
                    *total.statuses.entry(s).or_default() += n;
                }
                let _ = total.latency_us.add(&r.latency_us);
            }
        }
        // Wall time actually measured (connections stop at `until`, give or take one request).
        total.measured = duration;
        Ok(total)
    })
}

/// A GET without a body or key (`/healthz`: the server's own HTTP ceiling).
pub fn get(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .expect("static request parts")
}

/// A JSON POST with an optional bearer key.
pub fn post_json(
    addr: SocketAddr,
    path: &str,
    key: Option<&str>,
    body: String,
) -> Request<Full<Bytes>> {
    let mut builder = Request::post(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json");
    if let Some(key) = key {
        builder = builder.header("authorization", format!("Bearer {key}"));
    }
    builder
        .body(Full::new(Bytes::from(body)))
        .expect("static request parts")
}
