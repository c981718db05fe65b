//! Core tests without HTTP: the event store, the actor runtime, the projections.
//! One binary (faster to build and link than one per file).

mod actors;
mod projections;
mod store;

use hongbao::clock::ManualClock;
use hongbao::domain::wallet::{Entry, WalletEvent};
use hongbao::domain::Event;
use hongbao::events::sled_store::{JournalConfig, SledStore};
use hongbao::events::NewEvent;
use hongbao::ids::Id;
use hongbao::metrics::Metrics;
use hongbao::money::Fen;
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
    NewEvent {
        event: Event::Wallet(WalletEvent::Credited {
            entry: Entry::Deposit,
            order_id: Id::parse(&format!("o{n}")).unwrap(),
            amount: Fen::new(n + 1),
            balance_after: Fen::new(n + 1),
        }),
        correlation_id: format!("o{n}"),
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}
