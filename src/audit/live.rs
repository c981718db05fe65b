//! The continuous audit (D3): the same replay and checks as `hongbao audit`, run in the server
//! as a follower of the log. Each event is fed to the auditor as it becomes durable (the hash
//! link and the stream version are checked on the way); every `every` (or ten times as long
//! as the last conclusion took, if more) the end-of-log checks run over the replay state
//! (read, not copied). A check whose violations grew increments
//! `hongbao_audit_violations_total{check}` and logs each new violation with its ids.
//!
//! Channel statements are left to the offline audit: live, a payout may be on the channel's
//! statement a moment before its outcome is in the log. Views are compared with a rebuild
//! offline too (`hongbao audit`).

use super::Auditor;
use super::HashMap;
use crate::events::{chain_hash, Envelope, EventStore, Hash, Subscription, GENESIS_HASH};
use crate::metrics::Metrics;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Events read from the log per batch.
const READ_BATCH: usize = 4096;

/// The running continuous audit.
pub struct LiveAudit {
    stop: watch::Sender<bool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl LiveAudit {
    /// Starts the follower thread (background priority), replaying from the first event.
    pub fn start(
        store: Arc<dyn EventStore>,
        metrics: Arc<Metrics>,
        every: Duration,
    ) -> std::io::Result<LiveAudit> {
        let (stop, stopped) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("hongbao-audit".into())
            .spawn(move || run(store, metrics, stopped, every))?;
        Ok(LiveAudit {
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// The replay state and where the chain stands.
struct Follower {
    auditor: Auditor,
    prev_hash: Hash,
    last_seq: u64,
    /// The chain broke: nothing after it is trusted, so nothing after it is replayed.
    broken: bool,
    /// Violations already reported, by check.
    reported: HashMap<&'static str, u64>,
}

impl Follower {
    fn observe(&mut self, envelope: &Envelope) {
        if self.broken {
            return;
        }
        let chain = &mut self.auditor.chain;
        chain.checked += 1;
        if envelope.seq != self.last_seq + 1 {
            chain.violation(format!(
                "sequence gap: expected seq {}, found {}",
                self.last_seq + 1,
                envelope.seq
            ));
            self.broken = true;
            return;
        }
        let linked = envelope.prev_hash == self.prev_hash
            && envelope
                .encode_record()
                .is_ok_and(|record| chain_hash(&envelope.prev_hash, &record) == envelope.hash);
        if !linked {
            chain.violation(format!(
                "seq {}: the record does not link to its predecessor or its hash does not match",
                envelope.seq
            ));
            self.broken = true;
            return;
        }
        self.auditor.check_version(envelope);
        self.prev_hash = envelope.hash;
        self.last_seq = envelope.seq;
        self.auditor.observe(envelope);
    }

    /// Runs the end-of-log checks (reading the replay state, not copying it) and reports what
    /// is new.
    fn conclude(&mut self, metrics: &Metrics) {
        for check in self.auditor.finish(None) {
            let seen = self.reported.entry(check.name).or_insert(0);
            if check.violations <= *seen {
                continue;
            }
            metrics
                .audit_violations_total
                .with_label_values(&[check.name])
                .inc_by(check.violations - *seen);
            for example in check.examples.iter().skip(*seen as usize) {
                tracing::error!(
                    check = check.name,
                    at_seq = self.last_seq,
                    "audit violation: {example}"
                );
            }
            *seen = check.violations;
        }
    }
}

fn run(
    store: Arc<dyn EventStore>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
    every: Duration,
) {
    let Some(runtime) = crate::background_runtime("audit") else {
        return;
    };
    runtime.block_on(async move {
        let mut follower = Follower {
            auditor: Auditor::new(),
            prev_hash: GENESIS_HASH,
            last_seq: 0,
            broken: false,
            reported: HashMap::default(),
        };
        let mut subscription = Subscription::new(store, 1, READ_BATCH);
        let mut due = tokio::time::Instant::now() + every;
        let mut dirty = false;
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                events = subscription.next() => match events {
                    Ok(events) => {
                        for envelope in &events {
                            follower.observe(envelope);
                        }
                        metrics.audit_checked_seq.set(follower.last_seq as i64);
                        dirty = true;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the continuous audit cannot read the log; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                },
                _ = tokio::time::sleep_until(due), if dirty => {}
            }
            if dirty && tokio::time::Instant::now() >= due {
                let started = tokio::time::Instant::now();
                follower.conclude(&metrics);
                dirty = false;
                // The conclusion walks the whole replay state: on a long log it is spaced so
                // that it takes at most a tenth of this thread's time.
                due = tokio::time::Instant::now() + every.max(started.elapsed() * 10);
            }
        }
    });
}
