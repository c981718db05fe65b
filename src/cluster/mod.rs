//! Many nodes, one service (D6, issue 13): partitions, ownership by leases, and routing, on
//! NATS JetStream. `../shared/CLUSTER.md` is the worked design; `docs/ARCHITECTURE.md`
//! ("Cluster") says what is built and where it departs from it.
//!
//! - [`partition`]: the stable map from an entity's stream id to one of P partitions, and the
//!   names of a partition's stream, subjects, lease key and request subject.
//! - [`plan`]: fair shares of partitions among live nodes (pure, property-tested).
//! - [`membership`]: the deployment check (every node agrees on P), the live-node registry
//!   and the lease keeper: leases in a JetStream key-value bucket (TTL, compare-and-set on the
//!   key's revision), renewed every TTL/4, given up before they could expire, spread fairly.
//! - [`router`]: requests for a partition sent over NATS request-reply to its holder, which
//!   alone listens on the subject of the partition's current lease epoch.
//! - [`limits`]: fleet-wide rate limits: token buckets in a key-value bucket, taken in
//!   batches by each node and spent locally.
//! - [`node`]: `serve --node-id`: the HTTP server, the keeper, a cell (the single node's
//!   state over the partition's log) per held partition, and the forwarding of every other
//!   request to its partition's holder.
//!
//! Ownership is an optimisation: what keeps the books right when two nodes both believe they
//! hold a partition (one paused past its lease) is the log's fencing, built in issue 12 (a
//! batch is accepted only at the sequence its writer expects).

pub mod limits;
pub mod membership;
pub mod node;
pub mod partition;
pub mod plan;
pub mod router;

use serde::{Deserialize, Serialize};
use std::fmt;

/// A node's name in the cluster (`--node-id`): 1 to 64 of `[A-Za-z0-9_-]`, so that it can be
/// a key-value key and a subject token as it is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

/// A node id that cannot be one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a node id is 1 to 64 of A-Z a-z 0-9 _ -, not {0:?}")]
pub struct BadNodeId(pub String);

impl NodeId {
    pub fn parse(raw: &str) -> Result<NodeId, BadNodeId> {
        let ok = (1..=64).contains(&raw.len())
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(NodeId(raw.to_owned()))
        } else {
            Err(BadNodeId(raw.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NodeId {
    type Error = BadNodeId;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        NodeId::parse(&raw)
    }
}

impl From<NodeId> for String {
    fn from(node: NodeId) -> String {
        node.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_safe_keys_and_subject_tokens() {
        for good in ["n1", "node_A-7", &"x".repeat(64)] {
            assert_eq!(
                NodeId::parse(good).map(|n| n.to_string()),
                Ok(good.to_owned())
            );
        }
        for bad in ["", "n.1", "n 1", "n*", "n>", "é", &"x".repeat(65)] {
            assert_eq!(NodeId::parse(bad), Err(BadNodeId(bad.to_owned())), "{bad}");
        }
        let json = serde_json::to_string(&NodeId::parse("n1").unwrap()).unwrap();
        assert_eq!(json, "\"n1\"");
        assert!(serde_json::from_str::<NodeId>("\"n.1\"").is_err());
    }
}
