//! The lease hand-over benchmark (issue 13): `--nodes` lease keepers share `--partitions`
//! partitions on a JetStream server; one keeper is killed (it stops renewing and releases
//! nothing, as a killed process) `--kills` times, and each time the load generator measures
//! how long until every partition it held is held again by a survivor, then starts a new
//! keeper and measures how long until the shares are fair again (a join).
//!
//! The keepers run in this process with hosts that open nothing, so the figure is the lease
//! protocol's alone (lease TTL, renewal and planning periods); a real node adds the time to
//! open a partition (read its log's tail). The buckets are the load generator's own
//! (`hblg_<random>_*`), deleted afterwards.

use super::LoadgenError;
use crate::cluster::membership::{check_deployment, Close, Keeper, Lease, PartitionHost, Settings};
use crate::cluster::partition::{Partition, Partitions};
use crate::cluster::NodeId;
use crate::events::jetstream::connect;
use futures::future::BoxFuture;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A host that opens nothing.
struct Idle;

impl PartitionHost for Idle {
    fn open(&self, _: Partition, _: Lease) -> BoxFuture<'static, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    fn close(&self, _: Partition, _: Close) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Handover {
    /// From a kill until every partition of the killed keeper was held again.
    pub after_kill: Vec<Duration>,
    /// From a new keeper's start until the shares were fair again.
    pub after_join: Vec<Duration>,
}

fn other(e: impl std::fmt::Display) -> LoadgenError {
    LoadgenError::Io(std::io::Error::other(e.to_string()))
}

/// Runs the benchmark; `settings` gives the partitions, TTL and replicas (its node id and
/// namespace are replaced).
pub fn run(
    url: &str,
    partitions: Partitions,
    lease_ttl: Duration,
    replicas: usize,
    nodes: usize,
    kills: usize,
) -> Result<Handover, LoadgenError> {
    if nodes < 2 {
        return Err(LoadgenError::Usage(
            "handover needs --nodes 2 or more: a survivor".into(),
        ));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (client, _) = connect(url).await.map_err(other)?;
        let js = async_nats::jetstream::new(client);
        let namespace = format!("hblg_{:08x}", rand::random::<u32>());
        let settings = |n: usize| Settings {
            lease_ttl,
            replicas,
            namespace: namespace.clone(),
            ..Settings::new(
                NodeId::parse(&format!("lg{n}")).unwrap_or_else(|_| unreachable!()),
                partitions,
            )
        };
        let outcome = measure(&js, &settings, partitions, lease_ttl, nodes, kills).await;
        let probe = settings(0);
        for bucket in [
            probe.deployment_bucket(),
            probe.nodes_bucket(),
            probe.leases_bucket(),
        ] {
            let _ = js.delete_key_value(bucket).await;
        }
        outcome
    })
}

async fn start(
    js: &async_nats::jetstream::Context,
    settings: Settings,
) -> Result<Keeper, LoadgenError> {
    let buckets = check_deployment(js, &settings).await.map_err(other)?;
    Keeper::start(settings, buckets, Arc::new(Idle))
        .await
        .map_err(other)
}

/// Waits until the keepers hold every partition with fair shares (each within one of the
/// others), at most `within`.
async fn balanced(keepers: &[Keeper], partitions: Partitions, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let counts: Vec<usize> = keepers.iter().map(|k| k.held().len()).collect();
        let held: BTreeSet<Partition> = keepers.iter().flat_map(|k| k.held()).collect();
        let (min, max) = (counts.iter().min(), counts.iter().max());
        if held.len() == usize::from(partitions.count())
            && matches!((min, max), (Some(a), Some(b)) if b - a <= 1)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

async fn measure(
    js: &async_nats::jetstream::Context,
    settings: &dyn Fn(usize) -> Settings,
    partitions: Partitions,
    ttl: Duration,
    nodes: usize,
    kills: usize,
) -> Result<Handover, LoadgenError> {
    let mut keepers = Vec::new();
    for n in 0..nodes {
        keepers.push(start(js, settings(n)).await?);
    }
    let patience = ttl * 10;
    if !balanced(&keepers, partitions, patience).await {
        return Err(other("the keepers never reached fair shares"));
    }
    let progress = indicatif::ProgressBar::new(kills as u64).with_message("kills");
    let mut result = Handover {
        after_kill: Vec::new(),
        after_join: Vec::new(),
    };
    for kill in 0..kills {
        let victim = keepers.remove(0);
        let orphaned = victim.held();
        let killed = Instant::now();
        drop(victim);
        loop {
            let held: BTreeSet<Partition> = keepers.iter().flat_map(|k| k.held()).collect();
            if orphaned.iter().all(|p| held.contains(p)) {
                break;
            }
            if killed.elapsed() > patience {
                return Err(other(format!("kill {kill}: partitions not taken over")));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        result.after_kill.push(killed.elapsed());
        let joined = Instant::now();
        keepers.push(start(js, settings(nodes + kill)).await?);
        if !balanced(&keepers, partitions, patience).await {
            return Err(other(format!("kill {kill}: no fair shares after the join")));
        }
        result.after_join.push(joined.elapsed());
        progress.inc(1);
    }
    progress.finish_and_clear();
    for keeper in keepers {
        keeper.leave().await;
    }
    Ok(result)
}

/// p50 and max of durations, in milliseconds.
pub fn p50_max(durations: &[Duration]) -> (f64, f64) {
    let mut ms: Vec<f64> = durations.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let p50 = ms
        .get(ms.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or(0.0);
    (p50, ms.last().copied().unwrap_or(0.0))
}
