//! Claims of one packet merged into lots (P3, P5; issue 14): under load a hot packet records
//! one event for many claims instead of one per claim.
//!
//! A claim joins its packet's queue. While fewer than `LOTS_IN_FLIGHT_PER_PACKET` commands
//! are in flight for the packet, it is sent at once as a lot of one (`Claim`: light load waits
//! for no company and writes what it always did). Otherwise it waits; when a command of the
//! packet is answered, whatever waits (up to `CLAIMS_PER_LOT_MAX`) goes as one `ClaimMany`,
//! which the packet decides exactly as the same claims one after the other (a property test in
//! `domain::packet` holds it to that) and records as one `SharesClaimed`. So the lot size
//! follows the load: about the claims that arrive during one journal flush.
//!
//! Each caller gets its own uid's outcome, once the lot is durable (`Registry::execute`). An
//! unknown outcome (`Unavailable`, `Timeout`) reaches every caller of the lot: each retries
//! with the same uid and gets the recorded share. No task outlives its lot: the caller that
//! finds room drives lots of its packet until none waits.

use crate::actors::{ExecError, Registry};
use crate::domain::packet::{Packet, PacketCommand, PacketError, PacketReply};
use crate::ids::Id;
use dashmap::DashMap;
use prometheus::Histogram;
use std::sync::Arc;
use tokio::sync::oneshot;

/// Claim commands in flight per packet: the next lot gathers while one is flushed.
const LOTS_IN_FLIGHT_PER_PACKET: usize = 2;
/// Claims one `ClaimMany` takes at most.
pub const CLAIMS_PER_LOT_MAX: usize = 256;

type ClaimResult = Result<PacketReply, ExecError<PacketError>>;

struct Waiting {
    uid: Id,
    reply: oneshot::Sender<ClaimResult>,
}

#[derive(Default)]
struct Lots {
    in_flight: usize,
    waiting: Vec<Waiting>,
}

impl Lots {
    /// The next lot: at most `CLAIMS_PER_LOT_MAX` of the waiting claims, oldest first.
    fn take(&mut self) -> Vec<Waiting> {
        let n = self.waiting.len().min(CLAIMS_PER_LOT_MAX);
        self.waiting.drain(..n).collect()
    }
}

/// The packets' claim queues.
pub struct PacketClaims {
    packets: Arc<Registry<Packet>>,
    lots: Arc<DashMap<Id, Lots>>,
    lot_size: Histogram,
}

impl PacketClaims {
    pub fn new(packets: Arc<Registry<Packet>>) -> PacketClaims {
        let lot_size = packets.runtime().metrics.packet_claim_lot_size.clone();
        PacketClaims {
            packets,
            lots: Arc::new(DashMap::new()),
            lot_size,
        }
    }

    /// Whether `packet_id` is hot: every claim command it may have in flight is, and claims
    /// may be queueing behind them. Its transfers can wait (P6): they would take journal
    /// flushes from the claims.
    pub fn is_hot(&self, packet_id: &Id) -> bool {
        self.lots
            .get(packet_id)
            .is_some_and(|lots| lots.in_flight >= LOTS_IN_FLIGHT_PER_PACKET)
    }

    /// Claims a share of `packet_id` for `uid`: its outcome once durable.
    pub async fn claim(&self, packet_id: &Id, uid: &Id) -> ClaimResult {
        let (reply, answer) = oneshot::channel();
        let lot = {
            let mut lots = self.lots.entry(packet_id.clone()).or_default();
            lots.waiting.push(Waiting {
                uid: uid.clone(),
                reply,
            });
            if lots.in_flight < LOTS_IN_FLIGHT_PER_PACKET {
                lots.in_flight += 1;
                Some(lots.take())
            } else {
                None
            }
        };
        if let Some(lot) = lot {
            // A task of its own: it goes on with the lots that gather behind this one, while
            // this caller is answered as soon as its own lot is.
            let driver = Driver {
                packets: self.packets.clone(),
                lots: self.lots.clone(),
                lot_size: self.lot_size.clone(),
                packet_id: packet_id.clone(),
            };
            actix_rt::spawn(driver.run(lot));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(ExecError::Unavailable("packet claim dropped".into())))
    }
}

struct Driver {
    packets: Arc<Registry<Packet>>,
    lots: Arc<DashMap<Id, Lots>>,
    lot_size: Histogram,
    packet_id: Id,
}

impl Driver {
    async fn run(self, mut lot: Vec<Waiting>) {
        loop {
            self.send(lot).await;
            let next = match self.lots.get_mut(&self.packet_id) {
                Some(mut lots) if !lots.waiting.is_empty() => Some(lots.take()),
                Some(mut lots) => {
                    lots.in_flight -= 1;
                    None
                }
                None => None,
            };
            match next {
                Some(more) => lot = more,
                None => {
                    self.lots.remove_if(&self.packet_id, |_, lots| {
                        lots.in_flight == 0 && lots.waiting.is_empty()
                    });
                    return;
                }
            }
        }
    }

    /// Sends one lot and answers each of its callers.
    async fn send(&self, mut lot: Vec<Waiting>) {
        self.lot_size.observe(lot.len() as f64);
        let id = self.packet_id.as_str();
        if lot.len() == 1 {
            let one = lot.remove(0);
            let command = PacketCommand::Claim { uid: one.uid };
            let _ = one.reply.send(self.packets.execute(id, command).await);
            return;
        }
        let uids = lot.iter().map(|w| w.uid.clone()).collect();
        match self
            .packets
            .execute(id, PacketCommand::ClaimMany { uids })
            .await
        {
            Ok(PacketReply::Many(outcomes)) if outcomes.len() == lot.len() => {
                for (waiting, outcome) in lot.into_iter().zip(outcomes) {
                    let _ = waiting.reply.send(outcome.map_err(ExecError::Rejected));
                }
            }
            Ok(other) => {
                tracing::error!(reply = ?other, "a packet answered a lot of claims with another number of outcomes");
                for waiting in lot {
                    let _ = waiting.reply.send(Err(ExecError::Unavailable(
                        "unexpected packet reply to a lot of claims".into(),
                    )));
                }
            }
            Err(e) => {
                for waiting in lot {
                    let _ = waiting.reply.send(Err(e.clone()));
                }
            }
        }
    }
}
