//! A sled log in a data directory, opened and closed as `hongbao serve` leaves it (created
//! when absent), for tests that look at a directory from the outside.

/// Opens the sled log in `dir` (creating an empty one), closes it, and returns its head.
pub fn sled_head(dir: &std::path::Path) -> u64 {
    use hongbao::events::EventStore;
    let store = hongbao::events::sled_store::SledStore::open(
        dir,
        Default::default(),
        std::sync::Arc::new(hongbao::clock::SystemClock),
        std::sync::Arc::new(hongbao::metrics::Metrics::new()),
    )
    .unwrap();
    let head = store.head();
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(store.close())
        .unwrap();
    head
}
