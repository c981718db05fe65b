//! hongbao: an actor-based, event-sourced money engine for peak-traffic campaigns.
//!
//! # Layout
//! Arrows point down only: a module may use the ones below it, never the ones above.
//!
//! - `main.rs`: the command line (`serve`, `verify`, `projections`, `loadgen`); it only parses
//!   arguments and calls the library.
//! - [`http`]: actix-web handlers. Parse, authorise, call an actor or read a projection, map
//!   errors (all in `http::error`). No business rule and no store access lives here.
//! - [`projections`]: read models fed by the global log, each with a checkpoint written
//!   atomically with its view, rebuildable from zero.
//! - [`actors`]: the actor runtime (activation by replay, pipelined persistence, passivation)
//!   and the registries of wallet (and later packet, batch, order) actors.
//! - [`domain`]: pure state machines, `decide`/`evolve` per aggregate. No I/O, no clock.
//! - [`events`]: envelope, codec, hash chain, the `EventStore` trait and the sled store with its
//!   group-commit journal.
//! - [`money`], [`ids`], [`clock`], [`config`], [`metrics`]: the small shared vocabulary.
//! - [`verify`]: the offline log checker behind `hongbao verify`; [`audit`]: the replay that
//!   proves every money invariant, behind `hongbao audit`.
//! - [`flows`]: log consumers with checkpoints: crediting lanes, payout lanes, compensation,
//!   reconciliation. [`channels`]: the payment channel trait and its simulator.
//! - [`logs`]: repeated log lines rate-limited per call site, with a count.
//! - [`faults`]: injected disk faults for the fault tests (cargo feature `failpoints`).
//! - [`tokens`]: HMAC-signed reward tokens. [`checkpoints`]: Ed25519-signed log heads (D4).
//! - [`loadgen`]: the project's own load generator and its hello-world baseline.
//! - [`cluster`]: many nodes on JetStream (issue 13, in progress): partitions, leases,
//!   routing. It stands beside the HTTP layer and uses only [`events`] below it.

#![forbid(unsafe_code)]

pub mod actors;
pub mod audit;
pub mod channels;
pub mod checkpoints;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod domain;
pub mod events;
pub mod export;
pub mod faults;
pub mod flows;
pub mod http;
pub mod ids;
pub mod loadgen;
pub mod logs;
pub mod metrics;
pub mod money;
pub mod preflight;
pub mod projections;
pub mod replay;
pub mod simulate;
pub mod tokens;
pub mod verify;

/// Lowers the calling thread's scheduling priority (nice 19 on Linux). Used by threads whose
/// work may lag during a burst (projections, crediting lanes) so that intake keeps the CPU:
/// the log is the source of truth, and they catch up when the burst ends.
pub fn background_priority(what: &str) {
    if let Err(e) =
        thread_priority::set_current_thread_priority(thread_priority::ThreadPriority::Min)
    {
        tracing::debug!(thread = what, error = ?e, "cannot lower thread priority");
    }
}

/// A current-thread runtime for a follower thread at background priority (projections, the
/// continuous audit); `None`, logged, if it cannot be built.
pub fn background_runtime(what: &str) -> Option<tokio::runtime::Runtime> {
    background_priority(what);
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => Some(runtime),
        Err(e) => {
            tracing::error!(thread = what, error = %e, "background thread cannot start");
            None
        }
    }
}
