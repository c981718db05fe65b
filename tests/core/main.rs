//! Core tests without HTTP: the event store, the actor runtime, the projections.
//! One binary (faster to build and link than one per file).

mod actors;
mod audit;
mod audit_mutations;
mod campaign;
mod cluster;
mod compensation;
mod fixtures;
mod fuzz;
mod jetstream;
mod loadgen;
#[path = "../support/nats.rs"]
mod nats;
mod packets;
mod projections;
mod reconciliation;
mod simulate;
#[path = "../support/sled_log.rs"]
mod sled_log;
mod slices;
mod store;
mod store_contract;

use hongbao::clock::ManualClock;
use hongbao::events::sled_store::{JournalConfig, SledStore};
use hongbao::events::NewEvent;
use hongbao::metrics::Metrics;
use std::path::Path;
use std::sync::Arc;

pub fn open(dir: &Path) -> Arc<SledStore> {
    SledStore::open(
        dir,
        JournalConfig::default(),
        Arc::new(ManualClock::new(1_000)),
        Arc::new(Metrics::new()),
    )
    .expect("open store")
}

/// A wallet event usable as generic payload in store tests.
pub fn event(n: u64) -> NewEvent {
    hongbao::loadgen::journal::sample_event(n)
}

/// The actors' runtime of a single node on `store`, with the default actor settings.
pub fn actor_runtime<S: hongbao::events::EventStore>(
    store: &Arc<S>,
    clock: Arc<dyn hongbao::clock::Clock>,
    metrics: Arc<Metrics>,
) -> Arc<hongbao::actors::Runtime> {
    Arc::new(hongbao::actors::Runtime {
        store: store.clone(),
        clock,
        metrics,
        config: hongbao::actors::ActorConfig::default(),
        placement: None,
        registries: Default::default(),
        pacing: None,
    })
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}
