//! Budget slices on the actors (issue 13, `flows/slices.rs`): what the intake does when a
//! shard is short, recalls, and what a recall must bring back.

use super::open;
use hongbao::actors::{ExecError, Registry};
use hongbao::clock::ManualClock;
use hongbao::domain::activity::{
    intake_shard_of, shard_entity, Activity, ActivityCommand, ActivityError, ActivityReply,
    Budgets, Reward, RewardKind,
};
use hongbao::flows::slices::SlicedIntake;
use hongbao::ids::Id;
use hongbao::metrics::Metrics;
use hongbao::money::Fen;
use std::sync::Arc;

const SHARDS: u32 = 4;

fn id(s: &str) -> Id {
    Id::parse(s).unwrap()
}

fn reward(order_id: &Id, amount: u64) -> Reward {
    super::fixtures::cash_reward(order_id.as_str(), "u1", amount)
}

/// The order ids `o-0`, `o-1`... that land on any shard but `except`.
fn orders_avoiding(except: u32) -> impl Iterator<Item = Id> {
    (0..)
        .map(|n| id(&format!("o-{n}")))
        .filter(move |o| intake_shard_of(o, SHARDS) != except)
}

#[test]
fn a_recall_brings_back_a_grant_left_in_transit_by_a_dead_intake() {
    // Goal: a node that died between the activity's grant and the shard's receipt leaves the
    // slice "in transit": the activity counts it as the shard's, the shard never recorded it.
    // When the rest of the budget is spent, the recall must fetch it into the shard and take
    // it back, so that rewards on the other shards spend the budget to the last fen; a reward
    // is refused budget_exhausted only when the budget, whatever any shard held or was sent,
    // cannot cover it.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    actix_rt::System::new().block_on(async {
        let metrics = Arc::new(Metrics::new());
        let runtime = super::actor_runtime(
            &store,
            Arc::new(ManualClock::new(1_000)),
            metrics.clone(),
        );
        let activities: Arc<Registry<Activity>> = Registry::new(runtime);
        let intake = SlicedIntake::new(SHARDS, Fen::new(300), metrics);
        let hot = id("hot");
        let budget = Budgets {
            cash: Fen::new(1_000),
            subsidy: Fen::ZERO,
        };
        activities
            .execute("hot", ActivityCommand::SetBudget(budget))
            .await
            .unwrap();
        // The intake of shard 2's node asked for a slice and died before recording it.
        let stranded = 2;
        let grant = ActivityCommand::Grant {
            shard: stranded,
            shards: SHARDS,
            kind: RewardKind::Cash,
            received: Fen::ZERO,
            need: Fen::new(10),
            want: Fen::new(300),
            require_budget: true,
        };
        let in_transit = match activities.execute("hot", grant).await.unwrap() {
            ActivityReply::Granted { total } => total,
            other => panic!("{other:?}"),
        };
        assert!(in_transit > Fen::ZERO);
        // Rewards of 10 fen on the other shards until one is refused.
        let mut accepted = 0u64;
        for order in orders_avoiding(stranded).take(200) {
            match intake.accept(&activities, &hot, reward(&order, 10), true).await {
                Ok(_) => accepted += 10,
                Err(ExecError::Rejected(ActivityError::BudgetExhausted { .. })) => break,
                Err(e) => panic!("{order}: {e:?}"),
            }
        }
        assert_eq!(
            accepted, 1_000,
            "the budget was not spent to the last fen ({in_transit} were in transit to shard {stranded})"
        );
        // The shard now holds nothing: what it was sent went back to the activity.
        let entity = shard_entity(&hot, stranded);
        let receive = ActivityCommand::Receive {
            kind: RewardKind::Cash,
            total: Fen::ZERO,
        };
        match activities.execute(&entity, receive).await.unwrap() {
            ActivityReply::Received { available, .. } => assert_eq!(available, Fen::ZERO),
            other => panic!("{other:?}"),
        }
    });
}
