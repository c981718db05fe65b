//! Builders shared by the tests that write logs by hand (audit, mutations, reconciliation,
//! packets): events as they are, appended with no domain rule in the way.

use super::runtime;
use hongbao::audit::AuditReport;
use hongbao::domain::activity::{ActivityEvent, Reward, RewardKind};
use hongbao::domain::wallet::{Entry, Line, WalletEvent};
use hongbao::domain::withdrawal::{
    method_id, Channel, PayoutMethod, WithdrawalEvent, WithdrawalRequest,
};
use hongbao::domain::Event;
use hongbao::events::sled_store::SledStore;
use hongbao::events::{
    AppendAck, AppendError, Envelope, EventStore, ExpectedVersion, LiveBatch, NewEvent, StoreError,
};
use hongbao::ids::Id;
use hongbao::money::Fen;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

pub fn id(s: &str) -> Id {
    Id::parse(s).unwrap()
}

/// Appends events to a stream as they are, with no domain rule in the way.
pub fn append(store: &SledStore, stream: &str, events: Vec<Event>) {
    let events = events
        .into_iter()
        .map(|event| NewEvent {
            event,
            correlation_id: "test".into(),
        })
        .collect();
    runtime()
        .block_on(
            store
                .append(0, stream.into(), ExpectedVersion::Any, events)
                .unwrap(),
        )
        .unwrap();
}

pub fn line(entry: Entry, order: &str, amount: u64, after: u64, source: Option<&str>) -> Line {
    Line {
        entry,
        order_id: id(order),
        amount: Fen::new(amount),
        balance_after: Fen::new(after),
        source: source.map(id),
    }
}

pub fn credit(entry: Entry, order: &str, amount: u64, after: u64, source: Option<&str>) -> Event {
    Event::Wallet(WalletEvent::Credited(line(
        entry, order, amount, after, source,
    )))
}

pub fn debit(entry: Entry, order: &str, amount: u64, after: u64) -> Event {
    Event::Wallet(WalletEvent::Debited(line(
        entry, order, amount, after, None,
    )))
}

/// A cash reward of `amount` for `uid` (scene `rain`).
pub fn cash_reward(order: &str, uid: &str, amount: u64) -> Reward {
    Reward {
        order_id: id(order),
        uid: id(uid),
        scene: id("rain"),
        kind: RewardKind::Cash,
        amount: Fen::new(amount),
        device_id: None,
        app_id: None,
        batch_id: None,
        ext: BTreeMap::new(),
    }
}

pub fn accepted(order: &str, uid: &str, amount: u64) -> Event {
    Event::Activity(ActivityEvent::RewardAccepted(cash_reward(
        order, uid, amount,
    )))
}

/// A withdrawal of `amount` by u1 to the bank, through the named steps.
pub fn withdrawal(steps: &[&str], amount: u64) -> Vec<Event> {
    steps
        .iter()
        .map(|step| {
            Event::Withdrawal(match *step {
                "requested" => WithdrawalEvent::Requested {
                    request: WithdrawalRequest {
                        uid: id("u1"),
                        amount: Fen::new(amount),
                        method: PayoutMethod {
                            method_id: method_id(Channel::Bank, "a"),
                            channel: Channel::Bank,
                            account: "a".into(),
                        },
                    },
                    at_ms: 1,
                },
                "debited" => WithdrawalEvent::Debited { at_ms: 2 },
                "started" => WithdrawalEvent::PayoutStarted {
                    attempt: 1,
                    at_ms: 3,
                },
                "succeeded" => WithdrawalEvent::PayoutSucceeded {
                    attempt: 1,
                    at_ms: 4,
                },
                "parked" => WithdrawalEvent::PayoutParked {
                    attempts: 1,
                    reason: "declined".into(),
                    at_ms: 4,
                },
                "refunded" => WithdrawalEvent::Refunded { at_ms: 5 },
                other => panic!("unknown step {other}"),
            })
        })
        .collect()
}

/// The names of the checks that failed.
pub fn failing(report: &AuditReport) -> Vec<&'static str> {
    report
        .checks
        .iter()
        .filter(|c| !c.ok())
        .map(|c| c.name)
        .collect()
}

/// A check's listed violations, joined.
pub fn examples(report: &AuditReport, check: &str) -> String {
    report
        .checks
        .iter()
        .find(|c| c.name == check)
        .unwrap()
        .examples
        .join(" | ")
}

/// The log on sled, except that the next `failures` reads of a stream whose id starts with
/// `prefix` fail: a read timing out or a partition moving while an actor activates. Counts the
/// reads of those streams.
pub struct FlakyReads {
    inner: Arc<SledStore>,
    prefix: &'static str,
    pub failures: AtomicU32,
    pub reads: AtomicU32,
}

impl FlakyReads {
    pub fn new(inner: Arc<SledStore>, prefix: &'static str) -> FlakyReads {
        FlakyReads {
            inner,
            prefix,
            failures: AtomicU32::new(0),
            reads: AtomicU32::new(0),
        }
    }
}

impl EventStore for FlakyReads {
    fn append(
        &self,
        writer: u64,
        stream: String,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendAck, AppendError> {
        self.inner.append(writer, stream, expected, events)
    }
    fn read_stream(&self, stream: &str, from_version: u64) -> Result<Vec<Envelope>, StoreError> {
        if stream.starts_with(self.prefix) {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let fail = self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if fail {
                return Err(StoreError::Io("a log read timed out (injected)".into()));
            }
        }
        self.inner.read_stream(stream, from_version)
    }
    fn read_all(&self, from_seq: u64, limit: usize) -> Result<Vec<Arc<Envelope>>, StoreError> {
        self.inner.read_all(from_seq, limit)
    }
    fn head(&self) -> u64 {
        self.inner.head()
    }
    fn live(&self) -> tokio::sync::broadcast::Receiver<LiveBatch> {
        self.inner.live()
    }
    fn save_snapshot(&self, stream: &str, version: u64, state: &[u8]) -> Result<(), StoreError> {
        self.inner.save_snapshot(stream, version, state)
    }
    fn load_snapshot(&self, stream: &str) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        self.inner.load_snapshot(stream)
    }
    fn healthy(&self) -> bool {
        self.inner.healthy()
    }
    fn close(&self) -> futures::future::BoxFuture<'static, Result<(), StoreError>> {
        self.inner.close()
    }
    fn in_order_fail_stop(&self) -> bool {
        self.inner.in_order_fail_stop()
    }
}
