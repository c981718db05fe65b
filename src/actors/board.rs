//! A board: the current state of a singleton aggregate (switches, the withdrawal policy),
//! readable without a message and watchable by flows. Changes go through the aggregate's actor,
//! so they are events in the log first; the board publishes the new state once durable.
//!
//! On a cluster node every cell's board shares one [`Current`] per singleton: the node keeps it
//! up to date from the singleton's home partition (wherever its holder is), and a change made
//! through any cell's board is published to all of them at once.

use super::registry::{ExecError, Registry};
use crate::domain::Aggregate;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

/// The one stream of a singleton aggregate (`switches:global`, `policy:global`).
pub const STREAM_ID: &str = "global";

/// The latest state of a singleton known here, and the stream version it was read at: a state
/// is only ever replaced by one read at a later version.
pub struct Current<A> {
    state: watch::Sender<A>,
    version: AtomicU64,
    /// Whether a state was ever read from the log (until then: the defaults).
    loaded: AtomicBool,
}

impl<A: Aggregate + Sync> Current<A> {
    /// The defaults, not yet read from the log.
    pub fn unloaded() -> Arc<Current<A>> {
        let (state, _) = watch::channel(A::default());
        Arc::new(Current {
            state,
            version: AtomicU64::new(0),
            loaded: AtomicBool::new(false),
        })
    }

    /// Publishes `state`, read at `version`, unless a later one is already known. Returns
    /// whether the state changed.
    pub fn offer(&self, state: A, version: u64) -> bool {
        self.loaded.store(true, Ordering::Release);
        self.state.send_if_modified(|current| {
            // Under the watch's lock: two offers never interleave here.
            if version <= self.version.load(Ordering::Acquire) {
                return false;
            }
            self.version.store(version, Ordering::Release);
            *current = state;
            true
        })
    }

    pub fn loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }
}

pub struct Board<A: Aggregate + Sync> {
    registry: Arc<Registry<A>>,
    current: Arc<Current<A>>,
}

impl<A: Aggregate + Sync> Board<A> {
    /// Loads the state from the log. Must be called within an actix system.
    pub async fn load(registry: Arc<Registry<A>>) -> Result<Board<A>, ExecError<A::Error>> {
        let board = Board::following(registry, Current::unloaded());
        board.refresh().await?;
        Ok(board)
    }

    /// A board over a state kept up to date elsewhere (a cluster node's), without reading.
    pub fn following(registry: Arc<Registry<A>>, current: Arc<Current<A>>) -> Board<A> {
        Board { registry, current }
    }

    /// Reads the state from the log (through the registry, wherever the stream is served) and
    /// publishes it.
    pub async fn refresh(&self) -> Result<(), ExecError<A::Error>> {
        let (state, version) = self.registry.state(STREAM_ID).await?;
        self.current.offer(state, version);
        // A stream never written has version 0: the defaults are the state read.
        self.current.loaded.store(true, Ordering::Release);
        Ok(())
    }

    /// The current state.
    pub fn get(&self) -> A {
        self.current.state.borrow().clone()
    }

    /// Reads the current state without cloning it.
    pub fn with<R>(&self, read: impl FnOnce(&A) -> R) -> R {
        read(&self.current.state.borrow())
    }

    pub fn subscribe(&self) -> watch::Receiver<A> {
        self.current.state.subscribe()
    }

    /// Runs a command (durably) and publishes the new state.
    pub async fn execute(&self, command: A::Command) -> Result<A::Reply, ExecError<A::Error>> {
        let reply = self.registry.execute(STREAM_ID, command).await?;
        self.refresh().await?;
        Ok(reply)
    }
}
