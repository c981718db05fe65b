//! Fair shares: how many partitions each live node should hold, and what one node does next to
//! get there. Pure functions over what the node last read from the lease bucket; the lease
//! keeper (`membership`) applies them with compare-and-set, so a plan made on a stale view can
//! lose a race but never takes a partition from its holder.
//!
//! The live nodes, sorted by id, share P partitions as evenly as they can: node `i` of `n` aims
//! at `P / n`, plus one if `i < P mod n`. Every node computes the same shares from the same
//! membership, so the targets add up to exactly P: no node waits for a partition another node
//! thinks is its own. A node over its share releases its surplus (highest partitions first,
//! after draining them); a node under it takes free partitions (ones no lease names). A
//! partition held by a node that died stays taken until its lease expires; nobody steals.

use super::partition::{Partition, Partitions};
use super::NodeId;
use std::collections::{BTreeMap, BTreeSet};

/// The share of partitions node `me` aims at among `live` (which should include `me`; a node
/// that is not among them aims at none).
pub fn share(partitions: Partitions, live: &BTreeSet<NodeId>, me: &NodeId) -> usize {
    let Some(index) = live.iter().position(|node| node == me) else {
        return 0;
    };
    let (total, nodes) = (usize::from(partitions.count()), live.len());
    total / nodes + usize::from(index < total % nodes)
}

/// What one node does next.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Free partitions to try to take (each with a create-if-absent on its lease key).
    pub acquire: Vec<Partition>,
    /// Own partitions to give up (drain, then delete the lease at its revision).
    pub release: Vec<Partition>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.acquire.is_empty() && self.release.is_empty()
    }
}

/// The next step for `me`, given the live nodes and every lease it read (`owners`: partition to
/// holder; a partition absent from it is free).
///
/// Free partitions are taken starting from an offset derived from the node's place among the
/// live nodes, so that nodes starting together mostly try different keys instead of racing
/// for the same ones (a lost race is harmless, only slower).
pub fn plan(
    partitions: Partitions,
    live: &BTreeSet<NodeId>,
    owners: &BTreeMap<Partition, NodeId>,
    me: &NodeId,
) -> Plan {
    let target = share(partitions, live, me);
    let mine: Vec<Partition> = owners
        .iter()
        .filter(|(_, node)| *node == me)
        .map(|(p, _)| *p)
        .collect();
    if mine.len() > target {
        let surplus = mine.len() - target;
        return Plan {
            acquire: Vec::new(),
            release: mine.iter().rev().take(surplus).copied().collect(),
        };
    }
    let wanted = target - mine.len();
    let count = partitions.count();
    let start = match live.iter().position(|node| node == me) {
        Some(index) => {
            let index = u32::try_from(index).unwrap_or(0);
            let nodes = u32::try_from(live.len()).unwrap_or(1).max(1);
            u16::try_from(u32::from(count) * index / nodes).unwrap_or(0)
        }
        None => 0,
    };
    let acquire = (0..count)
        .map(|i| Partition((start + i) % count))
        .filter(|p| !owners.contains_key(p))
        .take(wanted)
        .collect();
    Plan {
        acquire,
        release: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(name: &str) -> NodeId {
        NodeId::parse(name).unwrap()
    }

    fn nodes(names: &[&str]) -> BTreeSet<NodeId> {
        names.iter().map(|n| node(n)).collect()
    }

    #[test]
    fn shares_add_up_to_every_partition() {
        let p = Partitions::new(64).unwrap();
        let live = nodes(&["n1", "n2", "n3"]);
        let shares: Vec<usize> = live.iter().map(|n| share(p, &live, n)).collect();
        assert_eq!(shares, vec![22, 21, 21]);
        assert_eq!(share(p, &live, &node("n4")), 0, "not live, no share");
        let few = Partitions::new(2).unwrap();
        let shares: Vec<usize> = live.iter().map(|n| share(few, &live, n)).collect();
        assert_eq!(shares, vec![1, 1, 0]);
    }

    #[test]
    fn a_node_over_its_share_releases_its_highest_partitions() {
        let p = Partitions::new(4).unwrap();
        let owners: BTreeMap<Partition, NodeId> =
            (0..4).map(|i| (Partition(i), node("n1"))).collect();
        let plan = plan(p, &nodes(&["n1", "n2"]), &owners, &node("n1"));
        assert_eq!(plan.release, vec![Partition(3), Partition(2)]);
        assert!(plan.acquire.is_empty());
    }

    #[test]
    fn a_dead_holders_partitions_wait_for_its_lease_to_expire() {
        // n2 died: it is no longer live, but its leases still name it until they expire.
        let p = Partitions::new(4).unwrap();
        let owners: BTreeMap<Partition, NodeId> = [(0, "n1"), (1, "n1"), (2, "n2"), (3, "n2")]
            .iter()
            .map(|(i, n)| (Partition(*i), node(n)))
            .collect();
        let live = nodes(&["n1"]);
        assert!(plan(p, &live, &owners, &node("n1")).is_empty());
        let expired: BTreeMap<Partition, NodeId> = owners
            .into_iter()
            .filter(|(_, n)| *n == node("n1"))
            .collect();
        let next = plan(p, &live, &expired, &node("n1"));
        assert_eq!(next.acquire, vec![Partition(2), Partition(3)]);
    }

    /// Applies each live node's plan in turn, as the keepers would with compare-and-set on a
    /// shared bucket (a create of a taken key fails).
    fn round(
        p: Partitions,
        live: &BTreeSet<NodeId>,
        owners: &mut BTreeMap<Partition, NodeId>,
    ) -> bool {
        let mut changed = false;
        for me in live {
            let step = plan(p, live, owners, me);
            for partition in step.release {
                assert_eq!(owners.remove(&partition).as_ref(), Some(me));
                changed = true;
            }
            for partition in step.acquire {
                if let std::collections::btree_map::Entry::Vacant(free) = owners.entry(partition) {
                    free.insert(me.clone());
                    changed = true;
                }
            }
        }
        changed
    }

    proptest! {
        #[test]
        fn any_start_converges_to_fair_shares_with_one_holder_each(
            count in 1u32..=200,
            live_count in 1usize..=7,
            dead_count in 0usize..=3,
            start in proptest::collection::vec(0usize..12, 0..200),
        ) {
            // Goal: from any leases (held by live nodes or by dead ones whose leases then
            // expire), the live nodes reach exactly their shares within a few rounds and stay.
            let p = Partitions::new(count).unwrap();
            let live: BTreeSet<NodeId> =
                (0..live_count).map(|i| node(&format!("n{i}"))).collect();
            let dead: Vec<NodeId> = (0..dead_count).map(|i| node(&format!("d{i}"))).collect();
            let everyone: Vec<NodeId> = live.iter().cloned().chain(dead.iter().cloned()).collect();
            let mut owners: BTreeMap<Partition, NodeId> = BTreeMap::new();
            for (i, who) in start.iter().enumerate().take(usize::from(p.count())) {
                if let Some(holder) = everyone.get(*who) {
                    owners.insert(Partition(u16::try_from(i).unwrap()), holder.clone());
                }
            }
            round(p, &live, &mut owners);
            // The dead nodes' leases expire.
            owners.retain(|_, holder| live.contains(holder));
            let mut rounds = 0;
            while round(p, &live, &mut owners) {
                rounds += 1;
                prop_assert!(rounds <= 3, "no convergence after 3 rounds");
            }
            prop_assert_eq!(owners.len(), usize::from(p.count()));
            for me in &live {
                let held = owners.values().filter(|n| *n == me).count();
                prop_assert_eq!(held, share(p, &live, me));
                prop_assert!(plan(p, &live, &owners, me).is_empty());
            }
        }

        #[test]
        fn a_node_joining_moves_only_what_it_must(count in 1u32..=200, before in 1usize..=6) {
            // Goal: when a node joins a balanced fleet, partitions move only to it (no
            // reshuffle among the others), and it ends with exactly its share.
            let p = Partitions::new(count).unwrap();
            let mut live: BTreeSet<NodeId> =
                (0..before).map(|i| node(&format!("n{i}"))).collect();
            let mut owners = BTreeMap::new();
            while round(p, &live, &mut owners) {}
            let snapshot = owners.clone();
            let joiner = node("z-new");
            live.insert(joiner.clone());
            while round(p, &live, &mut owners) {}
            for (partition, holder) in &owners {
                let was = snapshot.get(partition);
                prop_assert!(was == Some(holder) || *holder == joiner, "{partition} moved");
            }
            prop_assert_eq!(
                owners.values().filter(|n| **n == joiner).count(),
                share(p, &live, &joiner)
            );
        }
    }
}
