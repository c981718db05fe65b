//! The switchboard: the current value of every degradation switch, readable without a message
//! (`is_on`) and watchable (`subscribe`) by flows. Changes go through the switches actor, so
//! they are events in the log first; the board publishes them once durable.

use super::registry::{ExecError, Registry};
use crate::domain::switches::{SetSwitch, SwitchError, Switches};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;

/// The one switches stream.
const STREAM_ID: &str = "global";

pub struct SwitchBoard {
    registry: Arc<Registry<Switches>>,
    current: watch::Sender<BTreeMap<String, bool>>,
}

impl SwitchBoard {
    /// Loads the switches from the log. Must be called within an actix system.
    pub async fn load(
        registry: Arc<Registry<Switches>>,
    ) -> Result<SwitchBoard, ExecError<SwitchError>> {
        let (switches, _) = registry.state(STREAM_ID).await?;
        let (current, _) = watch::channel(switches.all());
        Ok(SwitchBoard { registry, current })
    }

    pub fn is_on(&self, name: &str) -> bool {
        self.current.borrow().get(name).copied().unwrap_or(false)
    }

    pub fn all(&self) -> BTreeMap<String, bool> {
        self.current.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<BTreeMap<String, bool>> {
        self.current.subscribe()
    }

    /// Sets a switch (durably) and publishes the new values.
    pub async fn set(
        &self,
        name: &str,
        on: bool,
    ) -> Result<BTreeMap<String, bool>, ExecError<SwitchError>> {
        let all = self
            .registry
            .execute(
                STREAM_ID,
                SetSwitch {
                    name: name.to_owned(),
                    on,
                },
            )
            .await?;
        self.current.send_replace(all.clone());
        Ok(all)
    }
}
