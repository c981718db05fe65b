//! The registry: stream id -> live actor, activation on demand, retries across incarnations.

use super::aggregate::{
    ActivityClock, AggregateActor, Durable, Execute, ExecuteSubmitted, GetState, Passivate,
};
use super::ActorConfig;
use crate::clock::Clock;
use crate::domain::Aggregate;
use crate::events::EventStore;
use crate::metrics::Metrics;
use actix::{Actor, Addr, MailboxError};
use dashmap::DashMap;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// Times a command is offered to an incarnation before the caller gets the last error: covers
/// an actor that passivated or broke while the message was on its way.
const DELIVERY_ATTEMPTS_MAX: usize = 3;
/// How long a failed activation's reason is kept for the messages that were queued to it.
const ACTIVATION_FAILURES_KEPT: Duration = Duration::from_secs(10);

/// Unique ids of actor incarnations, used as journal writer ids (never 0).
static INCARNATIONS: AtomicU64 = AtomicU64::new(1);

/// What every actor needs from the outside world.
pub struct Runtime {
    pub store: Arc<dyn EventStore>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    pub config: ActorConfig,
    /// On a cluster node: where the streams of other partitions live. `None` on a single node
    /// (every stream is served here).
    pub placement: Option<Arc<dyn Placement>>,
    /// This runtime's registries by stream prefix, which answer the commands other nodes send.
    pub registries: Registries,
    /// On a cluster node: the fleet-wide rate limits the lanes spend. `None`: this process's.
    pub pacing: Option<Arc<dyn crate::flows::FleetPacing>>,
}

/// Where streams are served, for a runtime that serves only some of them (a cluster partition).
pub trait Placement: Send + Sync {
    /// Whether `stream` (`wallet:u42`) is served by this runtime.
    fn is_local(&self, stream: &str) -> bool;
    /// Sends `call` to the runtime that serves `stream` and returns its answer; `Err` when it
    /// could not be asked or did not answer (the outcome is unknown).
    fn call(
        &self,
        stream: &str,
        call: RemoteCall,
    ) -> BoxFuture<'static, Result<RemoteAnswer, String>>;
}

/// A registry operation sent to the runtime that serves the stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoteCall {
    /// The aggregate's stream prefix (`wallet`): which registry answers.
    pub prefix: String,
    /// The aggregate instance (`u42`).
    pub id: String,
    pub op: RemoteOp,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RemoteOp {
    /// An encoded command; the answer is an encoded `Result<Reply, ExecError<Error>>`.
    Execute(Vec<u8>),
    /// The answer is an encoded `Result<(state, version), ExecError<Error>>`.
    State,
    /// An encoded question for `Aggregate::answer`; the answer is an encoded
    /// `Result<Vec<u8>, ExecError<Error>>`. Appended last: older nodes decode the others.
    Ask(Vec<u8>),
}

/// The answer to a [`RemoteCall`]: the typed result, encoded, or why the serving side could not
/// run it at all (no such registry there, a bad encoding).
pub type RemoteAnswer = Result<Vec<u8>, String>;

/// The typed result of a call on `stream` from what came back: a transport failure, a refusal
/// to run it and an unreadable answer are all `Unavailable` (the outcome is unknown).
pub fn typed_answer<T: serde::de::DeserializeOwned, E: serde::de::DeserializeOwned>(
    stream: &str,
    sent: Result<RemoteAnswer, String>,
) -> Result<T, ExecError<E>> {
    let answer = sent
        .map_err(ExecError::Unavailable)?
        .map_err(|why| ExecError::Unavailable(format!("{stream}: {why}")))?;
    crate::events::codec::decode::<Result<T, ExecError<E>>>(&answer)
        .map_err(|e| ExecError::Unavailable(format!("{stream}: unreadable answer: {e}")))?
}

/// The registries of one runtime by stream prefix (held weakly: a registry ends with its owner).
#[derive(Default)]
pub struct Registries {
    by_prefix: DashMap<&'static str, Weak<dyn Serve>>,
}

/// A registry as the serving side of [`RemoteCall`]s sees it.
trait Serve: Send + Sync {
    fn serve(self: Arc<Self>, id: String, op: RemoteOp) -> BoxFuture<'static, RemoteAnswer>;
}

impl Registries {
    /// Runs a call sent from another node on this runtime's registry for its prefix. Must be
    /// called from within the actix arbiter this runtime's actors run on.
    pub fn serve(&self, call: RemoteCall) -> BoxFuture<'static, RemoteAnswer> {
        let registry = self
            .by_prefix
            .get(call.prefix.as_str())
            .and_then(|weak| weak.upgrade());
        match registry {
            Some(registry) => registry.serve(call.id, call.op),
            None => Box::pin(futures::future::ready(Err(format!(
                "no {} registry is running here",
                call.prefix
            )))),
        }
    }
}

fn encode<T: Serialize>(value: &T) -> RemoteAnswer {
    crate::events::codec::encode(value).map_err(|e| format!("answer not encodable: {e}"))
}

impl<A: Aggregate> Serve for Registry<A> {
    fn serve(self: Arc<Self>, id: String, op: RemoteOp) -> BoxFuture<'static, RemoteAnswer> {
        Box::pin(async move {
            match op {
                RemoteOp::Execute(bytes) => {
                    let command: A::Command = crate::events::codec::decode(&bytes)
                        .map_err(|e| format!("not a {} command: {e}", A::STREAM_PREFIX))?;
                    encode(&self.execute_here(&id, command).await)
                }
                RemoteOp::State => encode(&self.state_here(&id).await),
                RemoteOp::Ask(question) => encode(&self.ask_here(&id, &question).await),
            }
        })
    }
}

/// A message sent to an actor: its answer, or why the mailbox gave none.
type Sent<T, E> = BoxFuture<'static, Result<Result<T, ExecError<E>>, MailboxError>>;

/// Why a command got no domain answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
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

impl<E> ExecError<E> {
    /// The same unknown outcome for a caller of another aggregate; a refusal becomes
    /// `Unavailable` naming it (for errors that can only be unknown outcomes, such as a
    /// [`Durable`]'s).
    pub fn unknown<F>(self) -> ExecError<F>
    where
        E: std::fmt::Debug,
    {
        match self {
            ExecError::Rejected(e) => ExecError::Unavailable(format!("refused: {e:?}")),
            ExecError::Unavailable(why) => ExecError::Unavailable(why),
            ExecError::Overloaded => ExecError::Overloaded,
            ExecError::Timeout => ExecError::Timeout,
        }
    }
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
    /// Incarnations whose activation failed, why and when (forgotten after
    /// `ACTIVATION_FAILURES_KEPT`): the commands and reads queued to one are answered with
    /// that reason instead of being offered to a fresh incarnation that reads the log again.
    failed_activations: DashMap<u64, (String, Instant)>,
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
            failed_activations: DashMap::new(),
        });
        let serving: Arc<dyn Serve> = registry.clone();
        registry
            .runtime
            .registries
            .by_prefix
            .insert(A::STREAM_PREFIX, Arc::downgrade(&serving));
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
        self.failed_activations
            .retain(|_, (_, at)| at.elapsed() < ACTIVATION_FAILURES_KEPT);
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
    /// from within an actix system (actors are started on the caller's arbiter). On a cluster
    /// node, an aggregate of another partition runs on that partition's holder, the answer
    /// the same (a transport failure is `Unavailable`: retry with the same business id).
    pub async fn execute(
        self: &Arc<Self>,
        id: &str,
        command: A::Command,
    ) -> Result<A::Reply, ExecError<A::Error>> {
        match self.elsewhere(id) {
            None => self.execute_here(id, command).await,
            Some((placement, stream)) => {
                let bytes = crate::events::codec::encode(&command)
                    .map_err(|e| ExecError::Unavailable(format!("command not encodable: {e}")))?;
                Self::remote(placement, stream, id, RemoteOp::Execute(bytes)).await
            }
        }
    }

    /// The placement to use if `id`'s stream is served by another runtime.
    fn elsewhere(&self, id: &str) -> Option<(Arc<dyn Placement>, String)> {
        let placement = self.runtime.placement.as_ref()?;
        let stream = Self::stream_id(id);
        (!placement.is_local(&stream)).then(|| (placement.clone(), stream))
    }

    /// Runs `op` on the runtime that serves `stream`.
    async fn remote<T: serde::de::DeserializeOwned>(
        placement: Arc<dyn Placement>,
        stream: String,
        id: &str,
        op: RemoteOp,
    ) -> Result<T, ExecError<A::Error>> {
        let call = RemoteCall {
            prefix: A::STREAM_PREFIX.to_owned(),
            id: id.to_owned(),
            op,
        };
        typed_answer(&stream, placement.call(&stream, call).await)
    }

    /// [`execute`](Self::execute) on this runtime's own actor.
    async fn execute_here(
        self: &Arc<Self>,
        id: &str,
        command: A::Command,
    ) -> Result<A::Reply, ExecError<A::Error>> {
        let timeout = self.runtime.config.command_timeout;
        self.deliver(id, move |addr| {
            let command = command.clone();
            Box::pin(addr.send(Execute { command }).timeout(timeout))
        })
        .await
    }

    /// Runs a command and answers once its events are submitted to the journal, with a
    /// future for when they are durable ([`ExecuteSubmitted`]). On a cluster node, an
    /// aggregate of another partition answers once durable (its log is another one: nothing
    /// orders it with the caller's next command), its future already resolved.
    pub async fn execute_submitted(
        self: &Arc<Self>,
        id: &str,
        command: A::Command,
    ) -> Result<(A::Reply, Durable<A::Error>), ExecError<A::Error>> {
        if self.elsewhere(id).is_some() {
            let reply = self.execute(id, command).await?;
            return Ok((reply, Box::pin(futures::future::ready(Ok(())))));
        }
        let timeout = self.runtime.config.command_timeout;
        let (decided, durable) = self
            .deliver(id, move |addr| {
                let command = command.clone();
                Box::pin(addr.send(ExecuteSubmitted { command }).timeout(timeout))
            })
            .await?;
        match decided {
            Ok(reply) => Ok((reply, durable)),
            // A refusal rests on the state it was decided on: answered once that is durable.
            Err(refusal) => {
                durable.await?;
                Err(ExecError::Rejected(refusal))
            }
        }
    }

    /// For a caller chaining commands (each step's command sent once the previous one is
    /// answered) and waiting for all of them before it answers: the reply once durable, the
    /// wait resolved.
    ///
    /// It used to answer once *submitted* on sled ([`Registry::execute_submitted`]), so that
    /// the next step's flush overlapped this one's, on the argument that the journal writes
    /// in submission order and stops at its first failure. That holds for a failed write or
    /// flush, not for an append the journal refuses on its own and goes on (a version
    /// conflict, which a stale actor incarnation can cause after an overload; an event that
    /// does not encode): the next step could then be durable without this one, e.g. a
    /// withdrawal order recording a debit its wallet never wrote (a review found it, issue
    /// 14). The overlap needs the journal to write an append only if the one it depends on
    /// was written (a dependency carried with the append); until then each step waits.
    pub async fn execute_chained(
        self: &Arc<Self>,
        id: &str,
        command: A::Command,
    ) -> Result<(A::Reply, Durable<A::Error>), ExecError<A::Error>> {
        let reply = self.execute(id, command).await?;
        Ok((reply, Box::pin(futures::future::ready(Ok(())))))
    }

    /// Sends a message to `id`'s actor on this runtime (`send` sends it to an address); a
    /// broken or passivating incarnation is replaced and the message offered again (commands
    /// are idempotent by business id).
    async fn deliver<T>(
        self: &Arc<Self>,
        id: &str,
        mut send: impl FnMut(Addr<AggregateActor<A>>) -> Sent<T, A::Error> + Send,
    ) -> Result<T, ExecError<A::Error>> {
        let stream = Self::stream_id(id);
        let mut last = ExecError::Unavailable("actor unreachable".into());
        for _ in 0..DELIVERY_ATTEMPTS_MAX {
            let (addr, incarnation) = self.actor(&stream);
            let sent = send(addr).await;
            match sent {
                Ok(Ok(reply)) => return Ok(reply),
                // The incarnation broke or was passivating: a fresh one replays the log, and the
                // command is idempotent, so offering it again is safe. Not when it could not
                // read the log: a fresh one would wait for the same read again.
                Ok(Err(ExecError::Unavailable(why))) => {
                    self.forget(&stream, incarnation);
                    self.activation_failure(incarnation)?;
                    last = ExecError::Unavailable(why);
                }
                Ok(Err(other)) => return Err(other),
                Err(MailboxError::Closed) => {
                    self.forget(&stream, incarnation);
                    self.activation_failure(incarnation)?;
                }
                Err(MailboxError::Timeout) => return Err(ExecError::Timeout),
            }
        }
        Err(last)
    }

    /// A copy of the aggregate's durable state and its version (for reads that must see the
    /// actor's own view, and for tests).
    pub async fn state(self: &Arc<Self>, id: &str) -> Result<(A, u64), ExecError<A::Error>> {
        match self.elsewhere(id) {
            None => self.state_here(id).await,
            Some((placement, stream)) => Self::remote(placement, stream, id, RemoteOp::State).await,
        }
    }

    /// Asks the aggregate `question` where it lives (`Aggregate::answer`, which takes and
    /// gives them encoded): on a cluster a few bytes cross between nodes where
    /// [`state`](Self::state) sends the whole state. `R` is the type the aggregate answers that
    /// question with. Answered once the state it was read from is durable.
    pub async fn ask<Q: Serialize, R: serde::de::DeserializeOwned>(
        self: &Arc<Self>,
        id: &str,
        question: &Q,
    ) -> Result<R, ExecError<A::Error>> {
        let question = crate::events::codec::encode(question)
            .map_err(|e| ExecError::Unavailable(format!("question not encodable: {e}")))?;
        let answer: Vec<u8> = match self.elsewhere(id) {
            None => self.ask_here(id, &question).await?,
            Some((placement, stream)) => {
                Self::remote(placement, stream, id, RemoteOp::Ask(question)).await?
            }
        };
        crate::events::codec::decode(&answer)
            .map_err(|e| ExecError::Unavailable(format!("unreadable answer: {e}")))
    }

    async fn ask_here(
        self: &Arc<Self>,
        id: &str,
        question: &[u8],
    ) -> Result<Vec<u8>, ExecError<A::Error>> {
        let (state, _) = self.state_here(id).await?;
        state.answer(question).ok_or_else(|| {
            ExecError::Unavailable(format!("not a question a {} answers", A::STREAM_PREFIX))
        })
    }

    async fn state_here(self: &Arc<Self>, id: &str) -> Result<(A, u64), ExecError<A::Error>> {
        let stream = Self::stream_id(id);
        for _ in 0..DELIVERY_ATTEMPTS_MAX {
            let (addr, incarnation) = self.actor(&stream);
            match addr
                .send(GetState(std::marker::PhantomData))
                .timeout(self.runtime.config.command_timeout)
                .await
            {
                Ok(Ok(state)) => return Ok(state),
                Ok(Err(_)) | Err(MailboxError::Closed) => {
                    self.forget(&stream, incarnation);
                    self.activation_failure(incarnation)?;
                }
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

    /// Records that `incarnation` could not read its log (see `failed_activations`).
    pub(super) fn activation_failed(&self, incarnation: u64, why: String) {
        self.failed_activations
            .insert(incarnation, (why, Instant::now()));
    }

    /// `Err` with the reason when `incarnation`'s activation failed.
    fn activation_failure(&self, incarnation: u64) -> Result<(), ExecError<A::Error>> {
        match self.failed_activations.get(&incarnation) {
            Some(failed) => Err(ExecError::Unavailable(failed.0.clone())),
            None => Ok(()),
        }
    }

    /// Removes the entry of `stream` if it still belongs to `incarnation`.
    pub(super) fn forget(&self, stream: &str, incarnation: u64) {
        self.actors
            .remove_if(stream, |_, handle| handle.incarnation == incarnation);
    }
}
