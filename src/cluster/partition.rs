//! Partitions: which log an entity's events belong to, and the names each partition goes by.
//!
//! `partition = SHA-256(stream id)[..8] as big-endian u64 mod P`. SHA-256 is specified once and
//! for all, so the map is the same on every platform and in every future version (Rust's
//! `DefaultHasher` promises neither); its output is uniform, so the partitions share the
//! entities evenly. P is fixed per deployment: changing it would move almost every entity to
//! another log, so every node checks at start that it agrees with the deployment
//! (`membership::check_deployment`).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// Partitions of a deployment unless configured otherwise.
pub const PARTITIONS_DEFAULT: u16 = 64;
/// The most partitions a deployment may have: their names carry three digits.
pub const PARTITIONS_MAX: u16 = 1000;

/// One partition: a log of its own (one JetStream stream) with one writer at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Partition(pub u16);

impl Partition {
    /// `p007`: the lease key, and the subject token of everything about this partition.
    pub fn key(self) -> String {
        format!("p{:03}", self.0)
    }

    /// `HB_P007`: the JetStream stream holding the partition's log.
    pub fn stream_name(self) -> String {
        format!("HB_P{:03}", self.0)
    }

    /// `hb.p007`: the first tokens of the partition's record subjects
    /// (`hb.p007.wallet.u42`).
    pub fn subject_prefix(self) -> String {
        format!("hb.p{:03}", self.0)
    }

    /// `hb.rpc.p007.12`: where requests for the partition's entities are sent while the
    /// lease taken at epoch 12 lasts; only that lease's holder listens. A holder paused past
    /// its lease still has its subscription until the server drops the connection, but it is
    /// an earlier epoch's: requests addressed to the current epoch never reach it.
    pub fn rpc_subject(self, epoch: u64) -> String {
        format!("hb.rpc.p{:03}.{epoch}", self.0)
    }

    /// The partition named by a lease key (`p007`), if it is one.
    pub fn from_key(key: &str) -> Option<Partition> {
        let digits = key.strip_prefix('p')?;
        if digits.len() != 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok().map(Partition)
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p{:03}", self.0)
    }
}

/// A partition count outside 1 to [`PARTITIONS_MAX`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a deployment needs 1 to {PARTITIONS_MAX} partitions, not {0}")]
pub struct BadPartitionCount(pub u32);

/// The streams of which a deployment has one for the whole fleet: the switches and the
/// withdrawal policy.
pub const FLEET_SINGLETONS: [&str; 2] = ["switches:global", "policy:global"];

/// The partition map of a deployment: P partitions, fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partitions(u16);

impl Partitions {
    pub fn new(count: u32) -> Result<Partitions, BadPartitionCount> {
        match u16::try_from(count) {
            Ok(n) if (1..=PARTITIONS_MAX).contains(&n) => Ok(Partitions(n)),
            _ => Err(BadPartitionCount(count)),
        }
    }

    pub fn count(self) -> u16 {
        self.0
    }

    /// The partition of an entity's stream (`wallet:u42`). The fleet's singletons
    /// ([`FLEET_SINGLETONS`]) live together in `p000`: a partition that opens waits until its
    /// node has read them, so their home must not wait for anything itself.
    pub fn of(self, stream_id: &str) -> Partition {
        if FLEET_SINGLETONS.contains(&stream_id) {
            return Partition(0);
        }
        let digest = Sha256::digest(stream_id.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        // `count` is at least 1 (checked by `new`), so the remainder is below it and fits u16.
        let index = u64::from_be_bytes(first) % u64::from(self.0);
        Partition(u16::try_from(index).unwrap_or(0))
    }

    /// Every partition, in order.
    pub fn all(self) -> impl Iterator<Item = Partition> {
        (0..self.0).map(Partition)
    }
}

impl Default for Partitions {
    fn default() -> Self {
        Partitions(PARTITIONS_DEFAULT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_fleet_singletons_share_the_first_partition() {
        for count in [1, 2, 7, 64, 1000] {
            let partitions = Partitions::new(count).unwrap();
            for stream in FLEET_SINGLETONS {
                assert_eq!(partitions.of(stream), Partition(0), "{stream} of {count}");
            }
        }
    }

    #[test]
    fn the_map_is_pinned() {
        // Goal: the map never changes across versions or platforms. These values were computed
        // once from SHA-256; a change here moves entities to another log, which must never
        // happen to a deployment that has data.
        let p = Partitions::default();
        assert_eq!(p.of("wallet:u42"), Partition(17));
        assert_eq!(p.of("activity:spring"), Partition(45));
        assert_eq!(p.of("packet:p1"), Partition(14));
        // The digest of the empty string is e3b0c442...: 0xe3b0c44298fc1c14 mod 64 = 20.
        assert_eq!(p.of(""), Partition(20));
        let thousand = Partitions::new(1000).unwrap();
        assert_eq!(thousand.of("wallet:u42"), Partition(681));
        assert_eq!(thousand.of("activity:spring"), Partition(13));
        assert_eq!(Partitions::new(1).unwrap().of("wallet:u42"), Partition(0));
    }

    #[test]
    fn names_and_counts() {
        let p = Partition(7);
        assert_eq!(p.key(), "p007");
        assert_eq!(p.stream_name(), "HB_P007");
        assert_eq!(p.subject_prefix(), "hb.p007");
        assert_eq!(p.rpc_subject(12), "hb.rpc.p007.12");
        assert_eq!(p.to_string(), "p007");
        assert_eq!(Partition::from_key("p007"), Some(p));
        assert_eq!(Partition::from_key("p999"), Some(Partition(999)));
        for bad in ["p7", "p0070", "q007", "p00x", "", "p"] {
            assert_eq!(Partition::from_key(bad), None, "{bad}");
        }
        assert_eq!(Partitions::new(0), Err(BadPartitionCount(0)));
        assert_eq!(Partitions::new(1001), Err(BadPartitionCount(1001)));
        assert_eq!(Partitions::new(70_000), Err(BadPartitionCount(70_000)));
        assert_eq!(Partitions::new(1000).map(|p| p.count()), Ok(1000));
        assert_eq!(Partitions::new(3).unwrap().all().count(), 3);
    }

    proptest! {
        #[test]
        fn every_entity_lands_in_one_partition_of_the_deployment(
            id in ".{0,40}",
            count in 1u32..=1000,
        ) {
            let p = Partitions::new(count).unwrap();
            let partition = p.of(&id);
            prop_assert!(partition.0 < p.count());
            prop_assert_eq!(partition, p.of(&id));
        }
    }

    #[test]
    fn partitions_share_the_entities_evenly() {
        // Goal: 64,000 wallets over 64 partitions give each about 1,000 (binomial standard
        // deviation ~31); a skewed hash would load one log beyond its share.
        let p = Partitions::default();
        let mut counts = [0u32; 64];
        for i in 0..64_000 {
            counts[usize::from(p.of(&format!("wallet:u{i}")).0)] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*min > 850 && *max < 1150, "min {min} max {max}");
    }
}
