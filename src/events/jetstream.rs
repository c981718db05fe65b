//! NATS JetStream as a home for the log (D6, issue 12): what a server must be before the engine
//! trusts it with money, and the client connection that checks it.
//!
//! This is the first part of the JetStream backend: the safety gates every later part stands
//! on. The `EventStore` on JetStream (one stream per log, a subject per entity, group commit
//! fenced by the stream's expected last sequence) builds on [`connect`]; `async_nats` is used
//! nowhere above `src/events/`.
//!
//! Why the gates (../shared/NOTES.md, D6):
//! - a server older than 2.9.21 does not serialise per-subject optimistic concurrency in a
//!   cluster (nats-server#4320): two writers with the same expected sequence can both win;
//! - before 2.10.23, acknowledged writes could be lost when the server process crashed;
//! - the 2025 Jepsen analysis of 2.12.1 found acknowledged writes lost with the default lazy
//!   fsync and under membership changes with partitions; the fixes are in 2.12.3.
//!
//! So servers older than 2.12.3 are refused, with the reason. And since a client cannot see
//! whether a server fsyncs every write, one replica is refused unless the operator states that
//! the server runs with `sync_interval: always` (`--single-replica-synced`).

use std::fmt;

/// The oldest server accepted.
pub const SERVER_VERSION_MIN: Version = Version(2, 12, 3);
/// Replicas of a log stream unless configured otherwise.
pub const REPLICAS_DEFAULT: usize = 3;
/// The most replicas a JetStream stream may have.
pub const REPLICAS_MAX: usize = 5;

/// A server version, major.minor.patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u64, pub u64, pub u64);

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

impl Version {
    /// Parses `2.15.1`, `v2.15.1` or `2.11.0-beta.2` (the pre-release tag is dropped here;
    /// [`check_server_version`] holds a pre-release of the minimum below it).
    pub fn parse(text: &str) -> Option<Version> {
        let core = text.trim().trim_start_matches('v');
        let core = core.split(['-', '+', ' ']).next()?;
        let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
        let version = Version(
            parts.next()??,
            parts.next()??,
            parts.next().unwrap_or(Some(0))?,
        );
        parts.next().is_none().then_some(version)
    }
}

/// Why a server, or a durability setting, is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("nats-server {found} is refused: {why} (hongbao needs {SERVER_VERSION_MIN} or later)")]
    ServerTooOld { found: String, why: &'static str },
    #[error("nats-server reported an unreadable version {0:?}; refusing to guess its guarantees")]
    UnreadableVersion(String),
    #[error("a log stream needs 1 to {REPLICAS_MAX} replicas, not {0}")]
    BadReplicas(usize),
    #[error(
        "one replica could lose acknowledged writes unless the server fsyncs every write, which \
         a client cannot see: pass --single-replica-synced to state that the server runs with \
         `jetstream {{ sync_interval: always }}`, or use --replicas 3"
    )]
    SingleReplicaNotSynced,
}

/// The gate on the server's version, with the most specific reason for a refusal.
pub fn check_server_version(reported: &str) -> Result<Version, Refusal> {
    let Some(version) = Version::parse(reported) else {
        return Err(Refusal::UnreadableVersion(reported.to_owned()));
    };
    // A pre-release of the minimum is not the release that has the fixes.
    let prerelease = reported.trim().contains('-');
    let why = if version < Version(2, 9, 21) {
        "clustered per-subject optimistic concurrency is not serialised before 2.9.21 \
         (nats-server#4320): two writers with the same expected sequence can both be accepted"
    } else if version < Version(2, 10, 23) {
        "acknowledged writes could be lost when the server process crashed before 2.10.23"
    } else if version < SERVER_VERSION_MIN || (prerelease && version == SERVER_VERSION_MIN) {
        "the 2025 Jepsen analysis of 2.12.1 found acknowledged writes lost (lazy fsync, \
         membership changes under partitions); the fixes are in 2.12.3"
    } else {
        return Ok(version);
    };
    Err(Refusal::ServerTooOld {
        found: version.to_string(),
        why,
    })
}

/// What the operator says about durability: `replicas` of each log stream, and whether a single
/// replica runs on a server that fsyncs every write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durability {
    pub replicas: usize,
    pub single_replica_synced: bool,
}

impl Default for Durability {
    fn default() -> Self {
        Durability {
            replicas: REPLICAS_DEFAULT,
            single_replica_synced: false,
        }
    }
}

impl Durability {
    /// Every acknowledged write durable: three (or more) replicas, or one replica that the
    /// operator states is synced on every write.
    pub fn check(self) -> Result<Durability, Refusal> {
        match self.replicas {
            0 => Err(Refusal::BadReplicas(0)),
            n if n > REPLICAS_MAX => Err(Refusal::BadReplicas(n)),
            1 if !self.single_replica_synced => Err(Refusal::SingleReplicaNotSynced),
            _ => Ok(self),
        }
    }

    /// The guarantee in force, as `/readyz` will say it.
    pub fn describe(self) -> String {
        match self.replicas {
            1 => "1 replica on a server stated to fsync every write (sync_interval: always)".into(),
            n => format!("{n} replicas: a write is acknowledged once a majority has it"),
        }
    }
}

/// Why connecting failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot reach NATS at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error(transparent)]
    Refused(#[from] Refusal),
}

/// Connects to `url` (`nats://host:port[,host:port...]`) and refuses a server that cannot hold
/// a money log (see [`check_server_version`]).
pub async fn connect(url: &str) -> Result<(async_nats::Client, Version), ConnectError> {
    let (client, version, _) = connect_watched(url).await?;
    Ok((client, version))
}

/// Counts the times a client lost its connection. Among several servers the client reconnects
/// to another within milliseconds, too fast for its connection state to be seen changing, while
/// the acknowledgements it was waiting for will never come (their server is gone).
pub type Disconnects = tokio::sync::watch::Receiver<u64>;

/// [`connect`], with the count of the client's disconnections.
pub async fn connect_watched(
    url: &str,
) -> Result<(async_nats::Client, Version, Disconnects), ConnectError> {
    let addresses = url.trim_start_matches("nats://");
    let servers: Vec<String> = addresses
        .split(',')
        .filter(|a| !a.trim().is_empty())
        .map(|a| format!("nats://{}", a.trim()))
        .collect();
    let unreachable = |message: String| ConnectError::Unreachable {
        url: url.to_owned(),
        message,
    };
    let (count, disconnects) = tokio::sync::watch::channel(0u64);
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(std::time::Duration::from_secs(5))
        // (async-nats logs every event itself.)
        .event_callback(move |event| {
            if matches!(event, async_nats::Event::Disconnected) {
                count.send_modify(|n| *n += 1);
            }
            async {}
        })
        .connect(servers.as_slice())
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let version = check_server_version(&client.server_info().version)?;
    Ok((client, version, disconnects))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_older_than_2_12_3_are_refused_with_their_reason() {
        // Goal: each known defect names itself; the machine's Debian 2.9.10 is refused.
        let reason = |v: &str| match check_server_version(v) {
            Err(Refusal::ServerTooOld { why, .. }) => why,
            other => panic!("{v}: {other:?}"),
        };
        assert!(reason("2.9.10").contains("#4320"));
        assert!(reason("v2.9.20").contains("#4320"));
        assert!(reason("2.10.22").contains("crashed"));
        assert!(reason("2.12.1").contains("Jepsen"));
        assert!(
            reason("2.12.3-beta.1").contains("Jepsen"),
            "not the release"
        );
        assert_eq!(check_server_version("2.12.3"), Ok(Version(2, 12, 3)));
        assert_eq!(check_server_version("v2.15.1"), Ok(Version(2, 15, 1)));
        assert_eq!(check_server_version("3.0"), Ok(Version(3, 0, 0)));
        for garbage in ["", "two", "2.x.1", "2.12.3.4"] {
            assert!(
                matches!(
                    check_server_version(garbage),
                    Err(Refusal::UnreadableVersion(_))
                ),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn one_replica_only_when_stated_synced() {
        // Goal: the default is 3 replicas; 1 is refused unless the operator states fsync on
        // every write; 0 and more than 5 are refused.
        assert_eq!(Durability::default().check().map(|d| d.replicas), Ok(3));
        let one = Durability {
            replicas: 1,
            single_replica_synced: false,
        };
        assert_eq!(one.check(), Err(Refusal::SingleReplicaNotSynced));
        let stated = Durability {
            single_replica_synced: true,
            ..one
        };
        assert!(stated.check().is_ok());
        assert!(stated.describe().contains("sync_interval: always"));
        for bad in [0, 6] {
            let d = Durability {
                replicas: bad,
                single_replica_synced: true,
            };
            assert_eq!(d.check(), Err(Refusal::BadReplicas(bad)));
        }
    }
}
