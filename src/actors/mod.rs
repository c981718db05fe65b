//! The actor runtime: one actor per aggregate instance (wallet, and later red packet, coupon
//! batch, withdrawal order), found through a [`Registry`] keyed by stream id.
//!
//! # Guarantees
//! - **One live incarnation per stream** in a process: the registry creates the actor on the
//!   first message for its stream and hands the same address to every caller until the actor
//!   passivates or breaks; only then can a new incarnation start, and it starts from the log.
//! - **Ordering**: an actor handles one message at a time, in mailbox order (FIFO per sender).
//!   Its appends reach the journal in the order it decided them, and the journal keeps that
//!   order, so the stream's versions follow the order of decisions.
//! - **What a reply means**: `Ok` means the command's events are durable (flushed) - or, for an
//!   idempotent retry, that the state it was answered from is durable. A refusal
//!   (`ExecError::Rejected`) wrote nothing. `Unavailable`/`Overloaded`/`Timeout` mean the
//!   outcome is unknown to the caller; every command is idempotent by its business id, so the
//!   caller retries with the same id and gets the original outcome if it did happen.
//! - **Pipelined persistence**: an actor decides, applies the events to its in-memory state,
//!   submits them to the journal and takes its next message at once; it holds each reply until
//!   the journal acknowledges that command. If an append fails, the actor stops taking commands,
//!   leaves the registry and answers every held reply `Unavailable`; the journal fences its
//!   later queued appends (see `EventStore::append`), and the next message activates a fresh
//!   incarnation from exactly what is durable.
//! - **Activation** loads the latest snapshot and replays the rest of the stream in `started`,
//!   before the first message is handled.
//! - **Passivation**: the registry's sweeper asks actors idle for `idle_passivate` (or, while
//!   more than `active_soft_max` are live, for `idle_under_pressure`) to stop; an actor with an
//!   append in flight refuses. It leaves the registry first; messages that raced with it are
//!   re-sent to a new incarnation by the registry, safe because nothing of them was processed.
//! - **Snapshots**: every `snapshot_every_events` events, when nothing is in flight (so the
//!   snapshot holds only durable events), the actor stores its encoded state; and when it
//!   passivates with at least `max(snapshot_on_passivate_events, version / 4)` events since
//!   its last snapshot (replayed at activation or appended since), on this node only, so that
//!   its next activation reads one snapshot instead of a stream that grows all night (a
//!   wallet touched again and again).
//! - **Bounded mailbox**: `mailbox_capacity` messages; senders beyond it wait (backpressure), and
//!   a command that is not answered within `command_timeout` is reported as `Timeout`.
//! - **Shutdown**: the HTTP server stops accepting and finishes in-flight requests, whose replies
//!   wait for their flush; then the journal is closed. Actor state needs no saving: it is the log.

mod aggregate;
pub mod board;
mod registry;

pub use aggregate::{AggregateActor, Durable};
pub use board::Board;
pub use registry::{
    typed_answer, ExecError, Placement, Registries, Registry, RemoteAnswer, RemoteCall, RemoteOp,
    Runtime,
};

use std::time::Duration;

/// Actor tuning, from the `[actors]` config section.
#[derive(Debug, Clone, Copy)]
pub struct ActorConfig {
    pub idle_passivate: Duration,
    /// Live actors per registry beyond which `idle_under_pressure` applies.
    pub active_soft_max: usize,
    pub idle_under_pressure: Duration,
    pub mailbox_capacity: usize,
    pub snapshot_every_events: u64,
    /// A passivating actor stores a snapshot if at least this many events were replayed or
    /// appended since its last one (0: never on passivation).
    pub snapshot_on_passivate_events: u64,
    pub command_timeout: Duration,
}

impl Default for ActorConfig {
    fn default() -> Self {
        ActorConfig {
            idle_passivate: Duration::from_secs(300),
            active_soft_max: 100_000,
            idle_under_pressure: Duration::from_secs(5),
            mailbox_capacity: 1024,
            snapshot_every_events: 1000,
            snapshot_on_passivate_events: 4,
            command_timeout: Duration::from_secs(10),
        }
    }
}
