//! The generic aggregate actor: activation by replay, pipelined persistence, passivation.
//! It routes and persists; every rule is in the aggregate's `decide`.

use super::registry::{ExecError, Registry, Runtime};
use crate::domain::{Aggregate, Ctx, Decision};
use crate::events::{codec, EventStore, ExpectedVersion, NewEvent, StoreError};
use crate::metrics::stream_kind;
use actix::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Largest encoded state stored as a snapshot; a larger state (an activity with millions of
/// orders) is rebuilt by replay instead of rewriting a huge value again and again.
const SNAPSHOT_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Runs one command. Answered once the outcome is durable.
pub struct Execute<A: Aggregate> {
    pub command: A::Command,
}

impl<A: Aggregate> Message for Execute<A> {
    type Result = Result<A::Reply, ExecError<A::Error>>;
}

/// Resolves once the events a reply rests on are durable; an error if they never will be (the
/// actor broke down and will replay the log).
pub type Durable<E> = futures::future::BoxFuture<'static, Result<(), ExecError<E>>>;

/// Runs one command. Answered once its events (if any) are submitted to the journal, with
/// [`Durable`] for when they are on disk: for a caller whose next command, submitted after
/// it to a store that is [`in_order_fail_stop`](crate::events::EventStore::in_order_fail_stop),
/// cannot become durable before it, and who waits for both before answering its client. A
/// refusal comes with the wait for the state it was decided on (`Registry::execute_submitted`
/// answers it only once that is durable, as [`Execute`] does). Answered in the handler itself,
/// before the actor sees the append's acknowledgement: a write that fails at once is the
/// [`Durable`]'s error, not a lost answer.
pub struct ExecuteSubmitted<A: Aggregate> {
    pub command: A::Command,
}

/// What [`ExecuteSubmitted`] answers: the decision, and when what it rests on is durable.
pub type SubmittedReply<A> = (
    Result<<A as Aggregate>::Reply, <A as Aggregate>::Error>,
    Durable<<A as Aggregate>::Error>,
);

impl<A: Aggregate> Message for ExecuteSubmitted<A> {
    type Result = Result<SubmittedReply<A>, ExecError<A::Error>>;
}

/// Sent by the registry's sweeper to an actor idle for longer than `idle_for`.
pub struct Passivate {
    pub idle_for: Duration,
}

impl Message for Passivate {
    type Result = ();
}

impl<A: Aggregate> Handler<Passivate> for AggregateActor<A> {
    type Result = ();

    fn handle(&mut self, msg: Passivate, ctx: &mut Context<Self>) {
        // Re-checked here: a message may have arrived since the sweeper looked.
        if self.in_flight == 0 && !self.passivating && self.idle() >= msg.idle_for {
            // Before leaving the registry: no later incarnation can have stored a newer one.
            if self.snapshot_due(self.runtime.config.snapshot_on_passivate_events) && !self.broken {
                self.snapshot(false);
            }
            self.passivating = true;
            self.leave_registry();
            self.runtime
                .metrics
                .actor_passivations_total
                .with_label_values(&[&self.kind])
                .inc();
            ctx.stop();
        }
    }
}

/// Returns a copy of the state and its version, once durable.
pub struct GetState<A>(pub std::marker::PhantomData<A>);

impl<A: Aggregate> Message for GetState<A> {
    type Result = Result<(A, u64), ExecError<A::Error>>;
}

impl<A: Aggregate> Handler<GetState<A>> for AggregateActor<A> {
    type Result = ResponseActFuture<Self, Result<(A, u64), ExecError<A::Error>>>;

    fn handle(&mut self, _: GetState<A>, _: &mut Context<Self>) -> Self::Result {
        if let Err(e) = self.usable() {
            return Box::pin(fut::ready(Err(e)));
        }
        let snapshot = (self.state.clone(), self.version);
        self.when_durable(self.version, Ok(snapshot))
    }
}

/// One aggregate instance.
pub struct AggregateActor<A: Aggregate> {
    stream: String,
    kind: String,
    incarnation: u64,
    registry: Weak<Registry<A>>,
    runtime: Arc<Runtime>,
    state: A,
    /// Version including events handed to the journal but not yet acknowledged.
    version: u64,
    /// Highest version the journal has acknowledged.
    durable: watch::Sender<u64>,
    in_flight: usize,
    /// Set when activation or an append failed: the in-memory state is not to be trusted.
    broken: bool,
    passivating: bool,
    /// Last time a command arrived, shared with the registry's sweeper.
    last_active: Arc<ActivityClock>,
    events_since_snapshot: u64,
}

/// A coarse "last active" timestamp readable from the sweeper thread without a message.
#[derive(Debug)]
pub struct ActivityClock {
    origin: Instant,
    last_ms: AtomicU64,
}

impl ActivityClock {
    pub fn new() -> ActivityClock {
        ActivityClock {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    pub fn touch(&self) {
        self.last_ms
            .store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn idle(&self) -> Duration {
        let now = self.origin.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

impl Default for ActivityClock {
    fn default() -> Self {
        ActivityClock::new()
    }
}

impl<A: Aggregate> AggregateActor<A> {
    pub(super) fn new(
        stream: String,
        incarnation: u64,
        registry: Weak<Registry<A>>,
        runtime: Arc<Runtime>,
        last_active: Arc<ActivityClock>,
    ) -> Self {
        let kind = stream_kind(&stream).to_owned();
        AggregateActor {
            stream,
            kind,
            incarnation,
            registry,
            runtime,
            state: A::default(),
            version: 0,
            durable: watch::channel(0).0,
            in_flight: 0,
            broken: false,
            passivating: false,
            last_active,
            events_since_snapshot: 0,
        }
    }

    fn idle(&self) -> Duration {
        self.last_active.idle()
    }

    fn usable(&self) -> Result<(), ExecError<A::Error>> {
        if self.broken {
            Err(ExecError::Unavailable(format!(
                "{} is restarting",
                self.stream
            )))
        } else if self.passivating {
            Err(ExecError::Unavailable(format!(
                "{} is passivating",
                self.stream
            )))
        } else {
            Ok(())
        }
    }

    /// Leaves the registry and stops; held replies are answered `Unavailable`.
    fn break_down(&mut self, ctx: &mut Context<Self>, why: &str) {
        if !self.broken {
            crate::warn_limited!(stream = %self.stream, why, "actor stops; the next message replays the log");
        }
        self.broken = true;
        self.leave_registry();
        ctx.stop();
    }

    fn leave_registry(&self) {
        if let Some(registry) = self.registry.upgrade() {
            registry.forget(&self.stream, self.incarnation);
        }
    }

    /// Answers `result` once everything up to `version` is durable.
    fn when_durable<T: 'static>(
        &self,
        version: u64,
        result: Result<T, ExecError<A::Error>>,
    ) -> ResponseActFuture<Self, Result<T, ExecError<A::Error>>> {
        if *self.durable.borrow() >= version {
            return Box::pin(fut::ready(result));
        }
        let durable = self.durable_at(version);
        Box::pin(async move { durable.await.and(result) }.into_actor(self))
    }

    fn maybe_snapshot(&mut self) {
        if self.in_flight == 0 && self.snapshot_due(self.runtime.config.snapshot_every_events) {
            self.snapshot(true);
        }
    }

    /// Whether a snapshot rule with this threshold (0: off) is due. Geometric spacing (at
    /// least a quarter of the stream since the last) keeps the total cost of snapshotting a
    /// growing state linear in its size.
    fn snapshot_due(&self, threshold: u64) -> bool {
        threshold > 0 && self.events_since_snapshot >= threshold.max(self.version / 4)
    }

    /// Stores the state as a snapshot. Only with nothing in flight: the in-memory state is
    /// then exactly the durable state.
    /// `shared`: also where other nodes find it (see `EventStore::save_snapshot_locally`).
    /// A state over `SNAPSHOT_BYTES_MAX` is not encoded past it: the events replayed at
    /// activation count towards the next snapshot, so a huge state meets this at every
    /// activation.
    fn snapshot(&mut self, shared: bool) {
        debug_assert_eq!(self.in_flight, 0);
        match codec::encode_capped(&self.state, SNAPSHOT_BYTES_MAX) {
            Ok(None) => {
                tracing::info!(stream = %self.stream, bytes_max = SNAPSHOT_BYTES_MAX, "state too large to snapshot; activation will replay");
                self.events_since_snapshot = 0;
            }
            Ok(Some(bytes)) => {
                let store = &self.runtime.store;
                let saved = if shared {
                    store.save_snapshot(&self.stream, self.version, &bytes)
                } else {
                    store.save_snapshot_locally(&self.stream, self.version, &bytes)
                };
                if let Err(e) = saved {
                    crate::warn_limited!(stream = %self.stream, error = %e, "snapshot not saved");
                }
                self.events_since_snapshot = 0;
            }
            Err(e) => {
                crate::warn_limited!(stream = %self.stream, error = %e, "snapshot not encoded")
            }
        }
    }
}

/// Loads the latest snapshot and replays the rest of the stream: the state, its version, and
/// how many events were replayed after the snapshot. Blocking.
fn load<A: Aggregate>(store: &dyn EventStore, stream: &str) -> Result<(A, u64, u64), StoreError> {
    let (mut state, mut version) = match store.load_snapshot(stream)? {
        Some((version, bytes)) => match codec::decode::<A>(&bytes) {
            Ok(state) => (state, version),
            Err(e) => {
                // A snapshot is an optimisation; replaying from zero is always correct.
                crate::warn_limited!(stream, error = %e, "ignoring undecodable snapshot");
                (A::default(), 0)
            }
        },
        None => (A::default(), 0),
    };
    let mut replayed = 0u64;
    for envelope in store.read_stream(stream, version + 1)? {
        let event = A::unwrap(&envelope.event).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "{stream}@{} holds a {} event",
                envelope.version,
                envelope.event.type_name()
            ))
        })?;
        state.evolve(event);
        version = envelope.version;
        replayed += 1;
    }
    Ok((state, version, replayed))
}

impl<A: Aggregate> Actor for AggregateActor<A> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.runtime.config.mailbox_capacity);
        self.runtime
            .metrics
            .actors_active
            .with_label_values(&[&self.kind])
            .inc();
        self.runtime
            .metrics
            .actor_activations_total
            .with_label_values(&[&self.kind])
            .inc();

        // Replay before the first message. Inline: sled reads are microseconds for the usual
        // stream, and a hop to the blocking pool would cost more than the read itself.
        match load::<A>(&*self.runtime.store, &self.stream) {
            Ok((state, version, replayed)) => {
                self.state = state;
                self.version = version;
                self.events_since_snapshot = replayed;
                self.durable.send_replace(version);
            }
            Err(e) => {
                let why = format!("activation failed: {e}");
                if let Some(registry) = self.registry.upgrade() {
                    registry.activation_failed(self.incarnation, why.clone());
                }
                self.break_down(ctx, &why);
            }
        }
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.runtime
            .metrics
            .actors_active
            .with_label_values(&[&self.kind])
            .dec();
        self.leave_registry();
    }
}

/// A decided command: its reply, and its append's acknowledgement if it emitted events.
enum Submitted<A: Aggregate> {
    /// Nothing to write: the reply rests on the state up to this version.
    Reply(A::Reply, u64),
    /// Applied in memory and submitted; durable once `ack` resolves (handled by [`acked`]).
    Appended(A::Reply, crate::events::AppendAck, u64),
}

impl<A: Aggregate> AggregateActor<A> {
    /// Decides `command`, applies and submits its events (pipelined persistence: applied now,
    /// durable later).
    fn submit(
        &mut self,
        command: &A::Command,
        ctx: &mut Context<Self>,
    ) -> Result<Submitted<A>, ExecRefusal<A>> {
        self.last_active.touch();
        self.usable().map_err(ExecRefusal::Now)?;
        let now = Ctx {
            now_ms: self.runtime.clock.now_ms(),
        };
        let (events, reply) = match self.state.decide(command, &now) {
            Ok(Decision::Emit(events, reply)) if !events.is_empty() => (events, reply),
            Ok(Decision::Emit(_, reply)) | Ok(Decision::Reply(reply)) => {
                return Ok(Submitted::Reply(reply, self.version))
            }
            Err(refusal) => return Err(ExecRefusal::Decided(refusal, self.version)),
        };
        let expected = self.version;
        for event in &events {
            self.state.evolve(event);
        }
        let count = events.len() as u64;
        self.version += count;
        let mut correlation_id = A::correlation_id(command);
        if correlation_id.is_empty() {
            correlation_id = self
                .stream
                .split_once(':')
                .map(|(_, id)| id)
                .unwrap_or_default()
                .to_owned();
        }
        let new_events = events
            .into_iter()
            .map(|e| NewEvent {
                event: A::wrap(e),
                correlation_id: correlation_id.clone(),
            })
            .collect();
        let ack = match self.runtime.store.append(
            self.incarnation,
            self.stream.clone(),
            ExpectedVersion::Exact(expected),
            new_events,
        ) {
            Ok(ack) => ack,
            Err(e) => {
                // Not submitted: the in-memory state is ahead of the log. Start over from it.
                self.break_down(ctx, &format!("append not submitted: {e}"));
                return Err(ExecRefusal::Now(match e {
                    crate::events::AppendError::Overloaded => ExecError::Overloaded,
                    other => ExecError::Unavailable(other.to_string()),
                }));
            }
        };
        self.in_flight += 1;
        Ok(Submitted::Appended(reply, ack, count))
    }

    /// What the actor does when an append of `count` events is acknowledged (or refused).
    fn acked(
        &mut self,
        appended: Result<crate::events::Appended, crate::events::AppendError>,
        count: u64,
        ctx: &mut Context<Self>,
    ) -> Result<(), ExecError<A::Error>> {
        self.in_flight -= 1;
        match appended {
            Ok(appended) => {
                self.durable.send_if_modified(|d| {
                    let advanced = appended.last_version > *d;
                    *d = (*d).max(appended.last_version);
                    advanced
                });
                self.events_since_snapshot += count;
                self.maybe_snapshot();
                Ok(())
            }
            Err(e) => {
                self.break_down(ctx, &format!("append failed: {e}"));
                Err(ExecError::Unavailable(e.to_string()))
            }
        }
    }

    /// Resolves once everything up to `version` is durable (an error if the actor stops first).
    fn durable_at(&self, version: u64) -> Durable<A::Error> {
        let mut durable = self.durable.subscribe();
        let stream = self.stream.clone();
        Box::pin(async move {
            match durable.wait_for(|d| *d >= version).await {
                Ok(_) => Ok(()),
                Err(_) => Err(ExecError::Unavailable(format!("{stream} stopped"))),
            }
        })
    }
}

/// Why a command got no reply: at once, or a refusal to answer once its state is durable.
enum ExecRefusal<A: Aggregate> {
    Now(ExecError<A::Error>),
    Decided(A::Error, u64),
}

impl<A: Aggregate> Handler<Execute<A>> for AggregateActor<A> {
    type Result = ResponseActFuture<Self, Result<A::Reply, ExecError<A::Error>>>;

    fn handle(&mut self, msg: Execute<A>, ctx: &mut Context<Self>) -> Self::Result {
        match self.submit(&msg.command, ctx) {
            Err(ExecRefusal::Now(e)) => Box::pin(fut::ready(Err(e))),
            Err(ExecRefusal::Decided(refusal, version)) => {
                self.when_durable(version, Err(ExecError::Rejected(refusal)))
            }
            Ok(Submitted::Reply(reply, version)) => self.when_durable(version, Ok(reply)),
            // Held until the journal acknowledges.
            Ok(Submitted::Appended(reply, ack, count)) => Box::pin(
                ack.into_actor(self)
                    .map(move |appended, act, ctx| act.acked(appended, count, ctx).map(|()| reply)),
            ),
        }
    }
}

impl<A: Aggregate> Handler<ExecuteSubmitted<A>> for AggregateActor<A> {
    type Result = Result<SubmittedReply<A>, ExecError<A::Error>>;

    fn handle(&mut self, msg: ExecuteSubmitted<A>, ctx: &mut Context<Self>) -> Self::Result {
        match self.submit(&msg.command, ctx) {
            Err(ExecRefusal::Now(e)) => Err(e),
            Err(ExecRefusal::Decided(refusal, version)) => {
                Ok((Err(refusal), self.durable_at(version)))
            }
            Ok(Submitted::Reply(reply, version)) => Ok((Ok(reply), self.durable_at(version))),
            Ok(Submitted::Appended(reply, ack, count)) => {
                let durable = self.durable_at(self.version);
                // The acknowledgement is the actor's business as for any append; the caller
                // waits on the durable version instead.
                ctx.spawn(ack.into_actor(self).map(move |appended, act, ctx| {
                    let _ = act.acked(appended, count, ctx);
                }));
                Ok((Ok(reply), durable))
            }
        }
    }
}
