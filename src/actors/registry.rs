//! The registry: stream id -> live actor, activation on demand, retries across incarnations.

use super::aggregate::{ActivityClock, AggregateActor, Execute, GetState, Passivate};
use super::ActorConfig;
use crate::clock::Clock;
use crate::domain::Aggregate;
use crate::events::EventStore;
use crate::metrics::Metrics;
use actix::{Actor, Addr, MailboxError};
use dashmap::DashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Times a command is offered to an incarnation before the caller gets the last error: covers
/// an actor that passivated or broke while the message was on its way.
const DELIVERY_ATTEMPTS_MAX: usize = 3;

/// Unique ids of actor incarnations, used as journal writer ids (never 0).
static INCARNATIONS: AtomicU64 = AtomicU64::new(1);

/// What every actor needs from the outside world.
pub struct Runtime {
    pub store: Arc<dyn EventStore>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    pub config: ActorConfig,
}

/// Why a command got no domain answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecError<E> {
    /// The domain refused the command; nothing was written.
    #[error("rejected: {0:?}")]
    Rejected(E),
    /// The store failed or the actor could not be reached; the outcome is unknown. Retry with
    /// the same business id.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The journal's queue is full; nothing was written. Retry later.
    #[error("overloaded")]
    Overloaded,
    /// No answer within the command timeout; the outcome is unknown. Retry with the same id.
    #[error("timed out")]
    Timeout,
}

struct Handle<A: Aggregate> {
    addr: Addr<AggregateActor<A>>,
    incarnation: u64,
    last_active: Arc<ActivityClock>,
}

/// Longest pause of the sweeper between two looks at the registry.
const SWEEP_INTERVAL_MAX: Duration = Duration::from_secs(1);

/// Live actors of one aggregate type, by stream id.
pub struct Registry<A: Aggregate> {
    runtime: Arc<Runtime>,
    actors: DashMap<String, Handle<A>>,
}

impl<A: Aggregate> Registry<A> {
    /// Creates the registry and its sweeper thread, which passivates idle actors: those idle
    /// for `idle_passivate`, or, while more than `active_soft_max` actors are live, those idle
    /// for `idle_under_pressure` (a campaign touches millions of wallets once each; keeping
    /// them all for minutes would cost gigabytes). The thread ends with the registry.
    pub fn new(runtime: Arc<Runtime>) -> Arc<Registry<A>> {
        let registry = Arc::new(Registry {
            runtime,
            actors: DashMap::new(),
        });
        let weak = Arc::downgrade(&registry);
        let config = registry.runtime.config;
        let interval = (config.idle_under_pressure.min(config.idle_passivate) / 2)
            .clamp(Duration::from_millis(10), SWEEP_INTERVAL_MAX);
        let spawned = std::thread::Builder::new()
            .name(format!("hongbao-sweep-{}", A::STREAM_PREFIX))
            .spawn(move || loop {
                std::thread::sleep(interval);
                let Some(registry) = weak.upgrade() else {
                    return;
                };
                registry.sweep();
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the actor sweeper; idle actors stay active");
        }
        registry
    }

    /// Asks idle actors to passivate.
    fn sweep(&self) {
        let config = self.runtime.config;
        let idle_for = if self.actors.len() > config.active_soft_max {
            config.idle_under_pressure.min(config.idle_passivate)
        } else {
            config.idle_passivate
        };
        for handle in self.actors.iter() {
            if handle.last_active.idle() >= idle_for {
                handle.addr.do_send(Passivate { idle_for });
            }
        }
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// The stream id of the aggregate instance `id` (`wallet:u42`).
    pub fn stream_id(id: &str) -> String {
        format!("{}:{}", A::STREAM_PREFIX, id)
    }

    /// Number of live actors.
    pub fn active(&self) -> usize {
        self.actors.len()
    }

    /// Runs a command on the aggregate `id`, activating its actor if needed. Must be called
    /// from within an actix system (actors are started on the caller's arbiter).
    pub async fn execute(
        self: &Arc<Self>,
        id: &str,
        command: A::Command,
    ) -> Result<A::Reply, ExecError<A::Error>> {
        let stream = Self::stream_id(id);
        let mut last = ExecError::Unavailable("actor unreachable".into());
        for _ in 0..DELIVERY_ATTEMPTS_MAX {
            let (addr, incarnation) = self.actor(&stream);
            let sent = addr
                .send(Execute {
                    command: command.clone(),
                })
                .timeout(self.runtime.config.command_timeout)
                .await;
            match sent {
                Ok(Ok(reply)) => return Ok(reply),
                // The incarnation broke or was passivating: a fresh one replays the log, and the
                // command is idempotent, so offering it again is safe.
                Ok(Err(ExecError::Unavailable(why))) => {
                    self.forget(&stream, incarnation);
                    last = ExecError::Unavailable(why);
                }
                Ok(Err(other)) => return Err(other),
                Err(MailboxError::Closed) => self.forget(&stream, incarnation),
                Err(MailboxError::Timeout) => return Err(ExecError::Timeout),
            }
        }
        Err(last)
    }

    /// A copy of the aggregate's durable state and its version (for reads that must see the
    /// actor's own view, and for tests).
    pub async fn state(self: &Arc<Self>, id: &str) -> Result<(A, u64), ExecError<A::Error>> {
        let stream = Self::stream_id(id);
        for _ in 0..DELIVERY_ATTEMPTS_MAX {
            let (addr, incarnation) = self.actor(&stream);
            match addr
                .send(GetState(std::marker::PhantomData))
                .timeout(self.runtime.config.command_timeout)
                .await
            {
                Ok(Ok(state)) => return Ok(state),
                Ok(Err(_)) | Err(MailboxError::Closed) => self.forget(&stream, incarnation),
                Err(MailboxError::Timeout) => return Err(ExecError::Timeout),
            }
        }
        Err(ExecError::Unavailable("actor unreachable".into()))
    }

    fn actor(self: &Arc<Self>, stream: &str) -> (Addr<AggregateActor<A>>, u64) {
        if let Some(handle) = self.actors.get(stream) {
            return (handle.addr.clone(), handle.incarnation);
        }
        let handle = self.actors.entry(stream.to_owned()).or_insert_with(|| {
            let incarnation = INCARNATIONS.fetch_add(1, Ordering::Relaxed);
            let last_active = Arc::new(ActivityClock::new());
            let addr = AggregateActor::<A>::new(
                stream.to_owned(),
                incarnation,
                Arc::downgrade(self),
                self.runtime.clone(),
                last_active.clone(),
            )
            .start();
            Handle {
                addr,
                incarnation,
                last_active,
            }
        });
        (handle.addr.clone(), handle.incarnation)
    }

    /// Removes the entry of `stream` if it still belongs to `incarnation`.
    pub(super) fn forget(&self, stream: &str, incarnation: u64) {
        self.actors
            .remove_if(stream, |_, handle| handle.incarnation == incarnation);
    }
}
