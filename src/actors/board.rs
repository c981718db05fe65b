//! A board: the current state of a singleton aggregate (switches, the withdrawal policy),
//! readable without a message and watchable by flows. Changes go through the aggregate's actor,
//! so they are events in the log first; the board publishes the new state once durable.

use super::registry::{ExecError, Registry};
use crate::domain::Aggregate;
use std::sync::Arc;
use tokio::sync::watch;

/// The one stream of a singleton aggregate (`switches:global`, `policy:global`).
const STREAM_ID: &str = "global";

pub struct Board<A: Aggregate + Sync> {
    registry: Arc<Registry<A>>,
    current: watch::Sender<A>,
}

impl<A: Aggregate + Sync> Board<A> {
    /// Loads the state from the log. Must be called within an actix system.
    pub async fn load(registry: Arc<Registry<A>>) -> Result<Board<A>, ExecError<A::Error>> {
        let (state, _) = registry.state(STREAM_ID).await?;
        let (current, _) = watch::channel(state);
        Ok(Board { registry, current })
    }

    /// The current state.
    pub fn get(&self) -> A {
        self.current.borrow().clone()
    }

    /// Reads the current state without cloning it.
    pub fn with<R>(&self, read: impl FnOnce(&A) -> R) -> R {
        read(&self.current.borrow())
    }

    pub fn subscribe(&self) -> watch::Receiver<A> {
        self.current.subscribe()
    }

    /// Runs a command (durably) and publishes the new state.
    pub async fn execute(&self, command: A::Command) -> Result<A::Reply, ExecError<A::Error>> {
        let reply = self.registry.execute(STREAM_ID, command).await?;
        let (state, _) = self.registry.state(STREAM_ID).await?;
        self.current.send_replace(state);
        Ok(reply)
    }
}
