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

/// Activity `hot` with a cash budget of 1,000 fen, its registry on `store`, and a slice intake
/// of `SHARDS` shards asking for slices of 300 fen.
async fn hot_activity(
    store: &Arc<hongbao::events::sled_store::SledStore>,
) -> (Arc<Registry<Activity>>, SlicedIntake, Id) {
    let metrics = Arc::new(Metrics::new());
    let runtime = super::actor_runtime(store, Arc::new(ManualClock::new(1_000)), metrics.clone());
    let activities: Arc<Registry<Activity>> = Registry::new(runtime);
    let budget = Budgets {
        cash: Fen::new(1_000),
        subsidy: Fen::ZERO,
    };
    activities
        .execute("hot", ActivityCommand::SetBudget(budget))
        .await
        .unwrap();
    let intake = SlicedIntake::new(SHARDS, Fen::new(300), metrics);
    (activities, intake, id("hot"))
}

/// The first cash slice `hot` grants `shard` (asked for 10 fen, wanting 300): its total.
async fn first_grant(activities: &Arc<Registry<Activity>>, shard: u32) -> Fen {
    let grant = ActivityCommand::Grant {
        shard,
        shards: SHARDS,
        kind: RewardKind::Cash,
        received: Fen::ZERO,
        need: Fen::new(10),
        want: Fen::new(300),
        require_budget: true,
    };
    match activities.execute("hot", grant).await.unwrap() {
        ActivityReply::Granted { total } => total,
        other => panic!("no grant: {other:?}"),
    }
}

/// Rewards of 10 fen through `intake` for `orders` until one is refused budget_exhausted:
/// the fen accepted.
async fn spend(
    activities: &Arc<Registry<Activity>>,
    intake: &SlicedIntake,
    hot: &Id,
    orders: impl Iterator<Item = Id>,
) -> u64 {
    let mut accepted = 0u64;
    for order in orders.take(200) {
        match intake
            .accept(activities, hot, reward(&order, 10), true)
            .await
        {
            Ok(_) => accepted += 10,
            Err(ExecError::Rejected(ActivityError::BudgetExhausted { .. })) => break,
            Err(e) => panic!("{order}: {e:?}"),
        }
    }
    accepted
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
        let (activities, intake, hot) = hot_activity(&store).await;
        // The intake of shard 2's node asked for a slice and died before recording it.
        let stranded = 2;
        let in_transit = first_grant(&activities, stranded).await;
        assert!(in_transit > Fen::ZERO);
        // Rewards of 10 fen on the other shards until one is refused.
        let accepted = spend(&activities, &intake, &hot, orders_avoiding(stranded)).await;
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

#[test]
fn a_release_whose_take_back_was_lost_is_spent_by_the_next_recall() {
    // Goal: a recall released shard 1's slice but its take-back never reached the activity
    // (the activity's partition changing hands: that client got 503). The next recall finds
    // shard 1 already released (nothing more to release) and sends the take-back again, which
    // frees the slice in the activity: the reward that asked must then be granted from it,
    // not refused budget_exhausted because this recall released nothing itself. Every reward
    // goes to shard 0, so the other shards hold nothing to bring back.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    actix_rt::System::new().block_on(async {
        let (activities, intake, hot) = hot_activity(&store).await;
        // Shard 1 got a slice and released it; the take-back was lost.
        let total = first_grant(&activities, 1).await;
        let shard1 = shard_entity(&hot, 1);
        let receive = ActivityCommand::Receive {
            kind: RewardKind::Cash,
            total,
        };
        activities.execute(&shard1, receive).await.unwrap();
        let release = ActivityCommand::Release {
            kind: RewardKind::Cash,
        };
        match activities.execute(&shard1, release).await.unwrap() {
            ActivityReply::Released { now, .. } => assert_eq!(now, total),
            other => panic!("{other:?}"),
        }
        let orders = (0..)
            .map(|n| id(&format!("o-{n}")))
            .filter(|o| intake_shard_of(o, SHARDS) == 0);
        let accepted = spend(&activities, &intake, &hot, orders).await;
        assert_eq!(
            accepted, 1_000,
            "the budget was not spent to the last fen ({total} released by shard 1, its take-back lost)"
        );
    });
}

#[test]
fn an_expired_b2c_packets_remainder_goes_back_to_the_intake_shard_that_accepted_its_subsidy() {
    // Goal: with sharded reward intake (a cluster) the activity itself accepts no reward: a
    // subsidy of 3,000 fen is accepted by its intake shard. The B2C packet it pays expires
    // with 2,000 fen unclaimed: they go back to that shard's books (its slice can spend them
    // again), so the activity over all its shards counts 1,000 accepted. Returned to the
    // activity itself they were lost: its accepted total cannot go below zero.
    use hongbao::domain::activity::RewardClaim;
    use hongbao::domain::packet::{Mode, PacketReply, PacketSpec, Split, Subsidy};
    use hongbao::flows::packets::{PacketConfig, Packets};
    const START: i64 = 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    actix_rt::System::new().block_on(async {
        let metrics = Arc::new(Metrics::new());
        let clock = ManualClock::new(START);
        let runtime = super::actor_runtime(&store, Arc::new(clock.clone()), metrics.clone());
        let activities: Arc<Registry<Activity>> = Registry::new(runtime.clone());
        let packets = Packets::new(
            Registry::new(runtime.clone()),
            Registry::new(runtime),
            activities.clone(),
            PacketConfig {
                reward_intake_shards: SHARDS,
                ..PacketConfig::default()
            },
        );
        let intake = SlicedIntake::new(SHARDS, Fen::new(300), metrics);
        let cny = id("cny");
        let budget = Budgets {
            cash: Fen::ZERO,
            subsidy: Fen::new(10_000),
        };
        activities
            .execute("cny", ActivityCommand::SetBudget(budget))
            .await
            .unwrap();
        let mut subsidy = super::fixtures::cash_reward("sub-1", "brand", 3_000);
        subsidy.kind = RewardKind::Subsidy;
        intake
            .accept(&activities, &cny, subsidy.clone(), true)
            .await
            .unwrap();
        let spec = PacketSpec {
            sender_uid: id("brand"),
            mode: Mode::B2c,
            total: Fen::new(3_000),
            count: 3,
            split: Split::Even,
            audience: None,
            expires_at_ms: START + 60_000,
            seed: 7,
            subsidy: Some(Subsidy {
                activity_id: cny.clone(),
                order_id: id("sub-1"),
            }),
        };
        let claim = RewardClaim::of(&cny, &subsidy);
        packets.create_b2c(&id("b-1"), spec, &claim).await.unwrap();
        match packets.claim(&id("b-1"), &id("shopper")).await.unwrap() {
            PacketReply::Claimed { amount, .. } => assert_eq!(amount, Fen::new(1_000)),
            other => panic!("{other:?}"),
        }
        clock.advance_ms(60_001);
        packets.expire(&id("b-1")).await.unwrap();
        let books = intake.books(&activities, &cny).await.unwrap();
        assert_eq!(
            books.accepted.subsidy,
            Fen::new(1_000),
            "the 2,000 fen remainder did not come back to the budget"
        );
    });
}
