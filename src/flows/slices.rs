//! Reward intake through budget slices (a cluster's hot activities; docs/ARCHITECTURE.md,
//! "Budget slices").
//!
//! With `rewards.intake_shards` K > 1, a reward of activity `cny` is accepted by intake shard
//! `cny@k` (k from the order id, so a retry finds the same shard), an `Activity` of its own in
//! whatever partition its stream hashes to: one activity's intake is K actors on up to K
//! nodes, not one. A shard accepts against the slices of the budget it holds; short of slice,
//! the intake asks the activity for more (`Grant`) and tries again with what it got, recorded in
//! the same decision as the acceptance (so another reward cannot take it first). When the activity has less left unallocated than the reward needs, the intake
//! recalls the unused slices of the other shards (`Release` there, `TakeBack` in the
//! activity) and asks once more, so the budget is used to the last fen before a reward is
//! refused `budget_exhausted`.
//!
//! Every step carries cumulative totals (see `domain::activity`): an answer lost between two
//! partitions (a node killed, a hand-over) is delivered by the next ask, never counted twice.
//! One refill per shard and kind runs at a time on a node (the others wait for it and find the
//! slice refilled); a recall that found nothing is not repeated for [`RECALL_QUIET`].

use crate::actors::{ExecError, Registry};
use crate::domain::activity::{
    intake_shard_of, shard_entity, Activity, ActivityCommand, ActivityError, ActivityReply,
    Budgets, Reward, RewardKind,
};
use crate::ids::Id;
use crate::metrics::Metrics;
use crate::money::Fen;
use dashmap::DashMap;
use futures::future::join_all;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Accept attempts per reward (each after a refill) before the intake gives up for now.
const ATTEMPTS_MAX: usize = 8;
/// After a recall that brought nothing back, refusals skip recalling for this long (a flood
/// of rewards after the budget is spent costs one grant ask each, not a recall of every shard).
pub const RECALL_QUIET: Duration = Duration::from_millis(250);

type Outcome<T> = Result<T, ExecError<ActivityError>>;

/// The slice intake of one cell (see the module documentation).
pub struct SlicedIntake {
    metrics: Arc<Metrics>,
    shards: u32,
    /// The slice a shard asks for (the activity gives less when the budget runs low).
    slice: Fen,
    refills: DashMap<(String, RewardKind), Arc<tokio::sync::Mutex<()>>>,
    quiet_until: DashMap<(Id, RewardKind), Instant>,
}

/// An activity's books over its intake shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlicedBooks {
    pub budget: Option<Budgets>,
    /// Accepted by the activity itself and all its shards, net of voids and returns.
    pub accepted: Budgets,
    pub rewards: u64,
}

/// A slice sum or difference out of range: the books disagree with what was read; retry.
fn arithmetic(_: crate::money::MoneyError) -> ExecError<ActivityError> {
    ExecError::Unavailable("slice arithmetic out of range".into())
}

fn unexpected<T>(what: &str, reply: ActivityReply) -> Outcome<T> {
    Err(ExecError::Unavailable(format!(
        "unexpected activity reply to {what}: {reply:?}"
    )))
}

impl SlicedIntake {
    pub fn new(shards: u32, slice: Fen, metrics: Arc<Metrics>) -> SlicedIntake {
        SlicedIntake {
            metrics,
            shards: shards.max(1),
            slice,
            refills: DashMap::new(),
            quiet_until: DashMap::new(),
        }
    }

    fn step(&self, step: &str) {
        self.metrics
            .reward_slices_total
            .with_label_values(&[step])
            .inc();
    }

    /// Accepts `reward` in its intake shard; `Ok(replayed)` as `OrderClaims::accept`. The
    /// order id must be claimed already.
    pub async fn accept(
        &self,
        activities: &Arc<Registry<Activity>>,
        activity: &Id,
        reward: Reward,
        require_budget: bool,
    ) -> Outcome<bool> {
        let shard = intake_shard_of(&reward.order_id, self.shards);
        let entity = shard_entity(activity, shard);
        let (kind, amount) = (reward.kind, reward.amount);
        // What the last refill got, recorded with the acceptance in one decision: the reward
        // that asked for a slice is accepted from it before another reward can take it.
        let mut received = Fen::ZERO;
        for _ in 0..ATTEMPTS_MAX {
            let command = ActivityCommand::AcceptInSlice {
                reward: reward.clone(),
                received,
            };
            match activities.execute(&entity, command).await {
                Ok(ActivityReply::Accepted { replayed }) => return Ok(replayed),
                Ok(other) => return unexpected("AcceptInSlice", other),
                Err(ExecError::Rejected(ActivityError::SliceShort { .. })) => {}
                Err(e) => return Err(e),
            }
            received = self
                .refill(
                    activities,
                    activity,
                    shard,
                    &entity,
                    kind,
                    amount,
                    require_budget,
                )
                .await?;
        }
        Err(ExecError::Unavailable(
            "the intake shard's slice was taken by other rewards while refilling; retry".into(),
        ))
    }

    /// Gets shard `shard` at least `amount` of `kind` to spend, or refuses `budget_exhausted`:
    /// answers the granted total for the shard to record with the reward (zero when the
    /// shard already holds enough).
    #[allow(clippy::too_many_arguments)]
    async fn refill(
        &self,
        activities: &Arc<Registry<Activity>>,
        activity: &Id,
        shard: u32,
        entity: &str,
        kind: RewardKind,
        amount: Fen,
        require_budget: bool,
    ) -> Outcome<Fen> {
        let lock = self
            .refills
            .entry((entity.to_owned(), kind))
            .or_default()
            .clone();
        let _refilling = lock.lock().await;
        // Another reward may have refilled the shard while this one waited.
        let (mut received, mut available) = receive(activities, entity, kind, Fen::ZERO).await?;
        let mut rounds = 0;
        let (unallocated, grant) = loop {
            if available >= amount {
                return Ok(Fen::ZERO);
            }
            let need = amount.checked_sub(available).map_err(arithmetic)?;
            let grant = ActivityCommand::Grant {
                shard,
                shards: self.shards,
                kind,
                received,
                need,
                want: self.slice,
                require_budget,
            };
            match activities.execute(activity.as_str(), grant.clone()).await? {
                ActivityReply::Granted { total } => {
                    self.step("granted");
                    // The budget is not spent: the next shortage recalls again.
                    self.quiet_until.remove(&(activity.clone(), kind));
                    let part = total.checked_sub(received).map_err(arithmetic)?;
                    if available.checked_add(part).is_ok_and(|a| a >= amount) {
                        return Ok(total);
                    }
                    // A grant in transit too small for this reward (others spent what the
                    // shard held since it was asked for): recorded on its own, so that the
                    // activity's next answer is a new slice rather than the same total again.
                    rounds += 1;
                    if rounds > ATTEMPTS_MAX {
                        return Err(ExecError::Unavailable(
                            "the intake shard's slices were spent by other rewards while refilling; retry"
                                .into(),
                        ));
                    }
                    (received, available) = receive(activities, entity, kind, total).await?;
                }
                ActivityReply::Short { unallocated, .. } => break (unallocated, grant),
                other => return unexpected("Grant", other),
            }
        };
        self.step("short");
        let quiet = self
            .quiet_until
            .get(&(activity.clone(), kind))
            .is_some_and(|until| Instant::now() < *until);
        if quiet {
            self.step("quiet");
        } else {
            // A shard that cannot be reached may hold what this reward needs: the answer is
            // then "retry" (503), never a refusal the budget does not justify.
            self.step("recall");
            let recalled = self.recall(activities, activity, shard, kind).await?;
            // The grant that was short is asked again, whatever this recall released itself:
            // its take-backs may also have freed what an earlier recall released and could
            // not take back (its answer lost), or another node's recall may have.
            match activities.execute(activity.as_str(), grant).await? {
                ActivityReply::Granted { total } => {
                    self.step("granted");
                    return Ok(total);
                }
                ActivityReply::Short { unallocated, .. } => {
                    if recalled.is_zero() {
                        self.quiet_until
                            .insert((activity.clone(), kind), Instant::now() + RECALL_QUIET);
                    }
                    return Err(exhausted(kind, available, unallocated, amount));
                }
                other => return unexpected("Grant", other),
            }
        }
        Err(exhausted(kind, available, unallocated, amount))
    }

    /// Takes the unused `kind` slices of every shard but `except` back into the activity's
    /// budget; answers how much came back, or why a shard's part is not known (a shard in
    /// hand-over keeps its slice: still its activity's budget, recalled by a later call).
    ///
    /// A grant left in transit (the intake that asked for it died before the shard recorded
    /// it) is the shard's in the activity's books and in nobody's hands: each shard first
    /// records what the activity has granted it (read from the activity's durable state), so
    /// that its release brings that back too.
    async fn recall(
        &self,
        activities: &Arc<Registry<Activity>>,
        activity: &Id,
        except: u32,
        kind: RewardKind,
    ) -> Outcome<Fen> {
        let (books, _) = activities.state(activity.as_str()).await?;
        let returns = (0..self.shards).filter(|s| *s != except).map(|shard| {
            let activities = activities.clone();
            let granted = books
                .slices
                .get(&(shard, kind))
                .map_or(Fen::ZERO, |b| b.granted);
            async move {
                let entity = shard_entity(activity, shard);
                if !granted.is_zero() {
                    receive(&activities, &entity, kind, granted).await?;
                }
                let (total, now) = match activities
                    .execute(&entity, ActivityCommand::Release { kind })
                    .await?
                {
                    ActivityReply::Released { total, now } => (total, now),
                    other => return unexpected("Release", other),
                };
                // Always the cumulative total: a take-back lost earlier is recorded now.
                match activities
                    .execute(
                        activity.as_str(),
                        ActivityCommand::TakeBack { shard, kind, total },
                    )
                    .await?
                {
                    ActivityReply::TakenBack => Ok(now),
                    other => unexpected("TakeBack", other),
                }
            }
        });
        let mut recalled = Fen::ZERO;
        for answer in join_all(returns).await {
            recalled = recalled
                .checked_add(answer?)
                .map_err(|_| ExecError::Unavailable("recalled total overflows".into()))?;
        }
        Ok(recalled)
    }

    /// The activity's budget and what it and all its shards accepted (for the admin view).
    pub async fn books(
        &self,
        activities: &Arc<Registry<Activity>>,
        activity: &Id,
    ) -> Outcome<SlicedBooks> {
        let entities = std::iter::once(activity.to_string())
            .chain((0..self.shards).map(|shard| shard_entity(activity, shard)));
        let answers = join_all(entities.map(|entity| {
            let activities = activities.clone();
            async move { books_of(&activities, &entity).await }
        }))
        .await;
        let mut books = SlicedBooks {
            budget: None,
            accepted: Budgets::default(),
            rewards: 0,
        };
        for (i, answer) in answers.into_iter().enumerate() {
            let (budget, accepted, rewards) = answer?;
            if i == 0 {
                books.budget = budget;
            }
            let add = |a: Fen, b: Fen| {
                a.checked_add(b)
                    .map_err(|_| ExecError::Unavailable("accepted total overflows".into()))
            };
            books.accepted.cash = add(books.accepted.cash, accepted.cash)?;
            books.accepted.subsidy = add(books.accepted.subsidy, accepted.subsidy)?;
            books.rewards += rewards;
        }
        Ok(books)
    }
}

async fn books_of(
    activities: &Arc<Registry<Activity>>,
    entity: &str,
) -> Outcome<(Option<Budgets>, Budgets, u64)> {
    match activities.execute(entity, ActivityCommand::Books).await? {
        ActivityReply::Books {
            budget,
            accepted,
            rewards,
        } => Ok((budget, accepted, rewards)),
        other => unexpected("Books", other),
    }
}

/// Records the granted `total` in the shard (zero: reads it); its (received, available).
async fn receive(
    activities: &Arc<Registry<Activity>>,
    entity: &str,
    kind: RewardKind,
    total: Fen,
) -> Outcome<(Fen, Fen)> {
    match activities
        .execute(entity, ActivityCommand::Receive { kind, total })
        .await?
    {
        ActivityReply::Received {
            received,
            available,
        } => Ok((received, available)),
        other => unexpected("Receive", other),
    }
}

fn exhausted(
    kind: RewardKind,
    available: Fen,
    unallocated: Fen,
    requested: Fen,
) -> ExecError<ActivityError> {
    ExecError::Rejected(ActivityError::BudgetExhausted {
        kind,
        remaining: available.checked_add(unallocated).unwrap_or(available),
        requested,
    })
}
