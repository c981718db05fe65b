//! Red packet payment racing expiry (P2, P4), deterministically on a manual clock: the steps of
//! the pay flow and of the expiry flow are run in every order that matters, and after each the
//! money is where the packet says it is and the audit holds.

use super::fixtures::FlakyReads;
use super::open;
use hongbao::actors::{ExecError, Registry};
use hongbao::audit::{audit, AuditReport};
use hongbao::clock::ManualClock;
use hongbao::domain::activity::Activity;
use hongbao::domain::packet::{
    Mode, Packet, PacketCommand, PacketError, PacketEvent, PacketReply, PacketSpec, PacketState,
    Split,
};
use hongbao::domain::wallet::{Entry, Wallet, WalletCommand, WalletError};
use hongbao::domain::{Aggregate, Event};
use hongbao::events::EventStore;
use hongbao::flows::packets::{PacketConfig, PacketFlowError, PacketFlows, Packets};
use hongbao::flows::{save_checkpoint, CHECKPOINT_TREE};
use hongbao::ids::Id;
use hongbao::metrics::Metrics;
use hongbao::money::Fen;
use std::sync::atomic::Ordering;
use std::sync::Arc;

const START_MS: i64 = 1_000_000;
const LIFETIME_MS: i64 = 60_000;

fn id(s: &str) -> Id {
    Id::parse(s).unwrap()
}

struct World {
    clock: ManualClock,
    packets: Arc<Packets>,
    wallets: Arc<Registry<Wallet>>,
}

fn world<S: EventStore>(store: &Arc<S>) -> World {
    let clock = ManualClock::new(START_MS);
    let runtime = super::actor_runtime(store, Arc::new(clock.clone()), Arc::new(Metrics::new()));
    let wallets: Arc<Registry<Wallet>> = Registry::new(runtime.clone());
    let packets = Packets::new(
        Registry::new(runtime.clone()),
        wallets.clone(),
        Registry::<Activity>::new(runtime),
        PacketConfig::default(),
    );
    World {
        clock,
        packets,
        wallets,
    }
}

/// A sender with 500 fen of change and an unpaid C2C packet of 300 fen, due in a minute.
async fn unpaid_packet(w: &World, packet: &str) {
    w.wallets
        .execute(
            "sender",
            WalletCommand::Credit {
                entry: Entry::Deposit,
                order_id: id(&format!("top-{packet}")),
                amount: Fen::new(500),
                source: None,
            },
        )
        .await
        .unwrap();
    let spec = PacketSpec {
        sender_uid: id("sender"),
        mode: Mode::C2c,
        total: Fen::new(300),
        count: 3,
        split: Split::Even,
        audience: None,
        expires_at_ms: START_MS + LIFETIME_MS,
        seed: 7,
        subsidy: None,
    };
    w.packets.create_c2c(&id(packet), spec).await.unwrap();
}

/// The pay flow's debit, as it leaves for the wallet.
fn escrow_debit(packet: &str) -> WalletCommand {
    WalletCommand::Debit {
        entry: Entry::PacketPayment,
        order_id: id(packet),
        amount: Fen::new(300),
        source: None,
    }
}

async fn change(w: &World) -> Fen {
    w.wallets.state("sender").await.unwrap().0.change
}

fn clean(report: &AuditReport) {
    let failed: Vec<String> = report
        .checks
        .iter()
        .filter(|c| !c.ok())
        .map(|c| format!("{}: {}", c.name, c.examples.join(" | ")))
        .collect();
    assert!(failed.is_empty(), "audit failed: {failed:?}");
}

#[test]
fn a_debit_that_arrives_after_the_packet_expired_is_refused() {
    // Goal: the pay flow passed its deadline check, then its debit was delayed past the deadline
    // and the expiry flow ran first: the late debit must not land (it would be escrow nobody
    // owns, refunded never); the sender keeps every fen and the audit holds.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    actix_rt::System::new().block_on(async {
        let w = world(&store);
        unpaid_packet(&w, "late").await;
        w.clock.advance_ms(LIFETIME_MS + 1);
        assert!(w.packets.expire(&id("late")).await.unwrap());
        let late = w.wallets.execute("sender", escrow_debit("late")).await;
        assert!(
            matches!(
                late,
                Err(ExecError::Rejected(WalletError::DebitBarred { .. }))
            ),
            "the late debit landed: {late:?}"
        );
        assert_eq!(change(&w).await, Fen::new(500), "nothing left the sender");
        let packet = w.packets.packet(&id("late")).await.unwrap().unwrap();
        assert_eq!(packet.state, Some(PacketState::Expired));
    });
    clean(&audit(store.as_ref(), None, |_, _| ()).unwrap());
}

#[test]
fn a_debit_that_landed_before_the_expiry_is_refunded_in_full() {
    // Goal: the other order: the debit reached the wallet, the packet was not marked paid yet
    // (the pay flow is between its two steps) and the deadline passes: expiry must see the
    // payment, mark the packet paid and refund all of it; the pay flow's own step then replays.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    actix_rt::System::new().block_on(async {
        let w = world(&store);
        unpaid_packet(&w, "early").await;
        w.wallets
            .execute("sender", escrow_debit("early"))
            .await
            .unwrap();
        assert_eq!(change(&w).await, Fen::new(200));
        w.clock.advance_ms(LIFETIME_MS + 1);
        assert!(w.packets.expire(&id("early")).await.unwrap());
        assert_eq!(change(&w).await, Fen::new(500), "refunded in full");
        let packet = w.packets.packet(&id("early")).await.unwrap().unwrap();
        assert_eq!(
            (packet.state, packet.refunded),
            (Some(PacketState::Expired), Some(Fen::new(300)))
        );
        let marked = w
            .packets
            .packets
            .execute(
                "early",
                PacketCommand::MarkPaid {
                    payment_id: id("early"),
                },
            )
            .await;
        assert!(marked.is_ok(), "the pay flow's second step: {marked:?}");
    });
    clean(&audit(store.as_ref(), None, |_, _| ()).unwrap());
}

#[test]
fn paying_after_the_deadline_is_refused_before_any_debit() {
    // Goal: a pay request that arrives after the deadline (the expiry flow has not run yet) is
    // refused as expired and moves no money; after expiry it is refused the same way.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    actix_rt::System::new().block_on(async {
        let w = world(&store);
        unpaid_packet(&w, "overdue").await;
        w.clock.advance_ms(LIFETIME_MS);
        let paid = w.packets.pay_c2c(&id("overdue"), &id("pay-1")).await;
        assert_eq!(
            paid.unwrap_err(),
            PacketFlowError::Packet(PacketError::Expired)
        );
        assert_eq!(change(&w).await, Fen::new(500), "no debit");
        assert!(w.packets.expire(&id("overdue")).await.unwrap());
        let paid = w.packets.pay_c2c(&id("overdue"), &id("pay-1")).await;
        assert_eq!(
            paid.unwrap_err(),
            PacketFlowError::Packet(PacketError::Expired)
        );
        assert_eq!(change(&w).await, Fen::new(500));
    });
    clean(&audit(store.as_ref(), None, |_, _| ()).unwrap());
}

#[test]
fn a_payment_before_the_deadline_is_kept_and_refunded_at_expiry() {
    // Goal: the ordinary case still works: paid in time, nobody claims, the whole total comes
    // back once; paying again answers the original outcome.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    actix_rt::System::new().block_on(async {
        let w = world(&store);
        unpaid_packet(&w, "kept").await;
        w.clock.advance_ms(LIFETIME_MS - 1);
        w.packets.pay_c2c(&id("kept"), &id("pay-1")).await.unwrap();
        assert_eq!(change(&w).await, Fen::new(200));
        w.clock.advance_ms(1);
        assert!(w.packets.expire(&id("kept")).await.unwrap());
        assert!(w.packets.expire(&id("kept")).await.unwrap(), "once");
        assert_eq!(change(&w).await, Fen::new(500));
        assert!(w.packets.pay_c2c(&id("kept"), &id("pay-1")).await.is_ok());
        assert_eq!(change(&w).await, Fen::new(500));
    });
    clean(&audit(store.as_ref(), None, |_, _| ()).unwrap());
}

#[test]
fn a_hot_packets_claims_are_merged_into_lots_that_replay_to_the_same_packet() {
    // Goal: 90 claims of one packet of 50 shares at once, ten uids twice: the claims are
    // decided in lots (at least one `packet.shares_claimed` event, fewer claim events than
    // shares), each uid gets one share and the same share when it asks again, exactly 50
    // shares go out summing to the total, the rest find the packet empty, the log replays to
    // the packet the actor holds, and the audit holds.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    actix_rt::System::new().block_on(async {
        let w = world(&store);
        let top_up = WalletCommand::Credit {
            entry: Entry::Deposit,
            order_id: id("top-hot"),
            amount: Fen::new(5_000),
            source: None,
        };
        w.wallets.execute("sender", top_up).await.unwrap();
        let spec = PacketSpec {
            sender_uid: id("sender"),
            mode: Mode::C2c,
            total: Fen::new(5_000),
            count: 50,
            split: Split::Lucky,
            audience: None,
            expires_at_ms: START_MS + LIFETIME_MS,
            seed: 11,
            subsidy: None,
        };
        w.packets.create_c2c(&id("hot"), spec).await.unwrap();
        w.packets.pay_c2c(&id("hot"), &id("pay-hot")).await.unwrap();
        let uids: Vec<String> = (0..80)
            .map(|i| format!("fan{i}"))
            .chain((0..10).map(|i| format!("fan{i}")))
            .collect();
        let answers = futures::future::join_all(
            uids.iter()
                .map(|uid| async { (uid.clone(), w.packets.claim(&id("hot"), &id(uid)).await) }),
        )
        .await;
        let mut shares = std::collections::HashMap::new();
        let mut empty = 0;
        for (uid, answer) in answers {
            match answer {
                Ok(PacketReply::Claimed { amount, .. }) => {
                    let first = *shares.entry(uid.clone()).or_insert(amount);
                    assert_eq!(first, amount, "{uid} got two different shares");
                }
                Err(ExecError::Rejected(PacketError::Empty)) => empty += 1,
                other => panic!("{uid}: {other:?}"),
            }
        }
        assert_eq!(shares.len(), 50, "one share per winner, 50 winners");
        assert_eq!(
            Fen::sum(shares.values().copied()),
            Ok(Fen::new(5_000)),
            "the shares sum to the total"
        );
        assert!(empty >= 30, "the rest find it empty ({empty})");
        let log = store.read_stream("packet:hot", 1).unwrap();
        let claim_events: Vec<&PacketEvent> = log
            .iter()
            .filter_map(|e| match &e.event {
                Event::Packet(
                    p @ (PacketEvent::ShareClaimed { .. } | PacketEvent::SharesClaimed { .. }),
                ) => Some(p),
                _ => None,
            })
            .collect();
        assert!(
            claim_events
                .iter()
                .any(|e| matches!(e, PacketEvent::SharesClaimed { claims } if claims.len() > 1)),
            "no lot was merged: {claim_events:?}"
        );
        assert!(
            claim_events.len() < 50,
            "{} claim events",
            claim_events.len()
        );
        let mut replayed = Packet::default();
        for envelope in &log {
            if let Event::Packet(event) = &envelope.event {
                replayed.evolve(event);
            }
        }
        let held = w.packets.packet(&id("hot")).await.unwrap().unwrap();
        assert_eq!(
            replayed, held,
            "the log replays to the packet the actor holds"
        );
        assert_eq!(held.state, Some(PacketState::Exhausted));
    });
    clean(&audit(store.as_ref(), None, |_, _| ()).unwrap());
}

#[test]
fn a_share_is_transferred_even_when_the_first_read_of_its_packet_fails() {
    // Goal: the transfer task starts from a checkpoint past the packet's creation (a restart),
    // so it must read the packet to learn its mode, and that first read fails. The share is
    // still transferred (the read is tried again), not dropped as the claim of an unknown
    // packet and left in escrow for good; the audit holds.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let flaky = Arc::new(FlakyReads::new(store.clone(), "packet:"));
    let checkpoints = store.state_db().open_tree(CHECKPOINT_TREE).unwrap();
    let view = store.state_db().open_tree("test-packets-view").unwrap();
    actix_rt::System::new().block_on(async {
        let before = world(&store);
        unpaid_packet(&before, "p").await;
        before
            .packets
            .pay_c2c(&id("p"), &id("pay-p"))
            .await
            .unwrap();
        save_checkpoint(&checkpoints, hongbao::flows::packets::FLOW, store.head()).unwrap();
        let claimed = before.packets.claim(&id("p"), &id("fan")).await.unwrap();
        let PacketReply::Claimed { amount, .. } = claimed else {
            panic!("{claimed:?}");
        };

        // The restarted node: no actor active yet, and the packet's next reads fail (more
        // than one call's delivery attempts: a JetStream read times out for as long as its
        // stream has no leader).
        flaky.failures.store(8, Ordering::SeqCst);
        let after = world(&flaky);
        let flows = PacketFlows::start(after.packets.clone(), store.state_db(), view).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let transferred = loop {
            let (fan, _) = after.wallets.state("fan").await.unwrap();
            if let Some(recorded) = fan.entries.get(&(Entry::ClaimTransfer, id("p"))) {
                break recorded.clone();
            }
            if std::time::Instant::now() > deadline {
                flows.stop().await;
                panic!("the share was never transferred");
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        flows.stop().await;
        assert_eq!(
            flaky.failures.load(Ordering::SeqCst),
            0,
            "every injected failure was met"
        );
        assert_eq!(transferred.amount, amount);
    });
    clean(&audit(store.as_ref(), None, |_, _| ()).unwrap());
}

mod audit_of_packets {
    //! The `packets` check can fail: logs written through the store, bypassing the domain,
    //! each breaking one rule of P11.

    use super::super::fixtures::append as append_raw;
    use super::super::open;
    use hongbao::audit::{audit, AuditReport};
    use hongbao::domain::packet::{Mode, PacketEvent, PacketSpec, Split};
    use hongbao::domain::wallet::{Entry, Line, WalletEvent};
    use hongbao::domain::Event;
    use hongbao::events::sled_store::SledStore;
    use hongbao::ids::Id;
    use hongbao::money::Fen;
    use std::sync::Arc;

    fn id(s: &str) -> Id {
        Id::parse(s).unwrap()
    }

    fn wallet(credit: bool, entry: Entry, order: &str, amount: u64, after: u64) -> Event {
        let line = Line {
            entry,
            order_id: id(order),
            amount: Fen::new(amount),
            balance_after: Fen::new(after),
            source: None,
        };
        Event::Wallet(if credit {
            WalletEvent::Credited(line)
        } else {
            WalletEvent::Debited(line)
        })
    }

    fn packet(events: &[PacketEvent]) -> Vec<Event> {
        events.iter().cloned().map(Event::Packet).collect()
    }

    /// A sender who deposited 300 and a C2C packet pk of 300 in three even shares; `paid`
    /// debits the sender into escrow and marks the packet paid.
    fn created(store: &Arc<SledStore>, paid: bool) {
        append_raw(
            store,
            "wallet:sender",
            vec![wallet(true, Entry::Deposit, "top", 300, 300)],
        );
        let spec = PacketSpec {
            sender_uid: id("sender"),
            mode: Mode::C2c,
            total: Fen::new(300),
            count: 3,
            split: Split::Even,
            audience: None,
            expires_at_ms: 10,
            seed: 1,
            subsidy: None,
        };
        let mut events = vec![PacketEvent::Created {
            spec,
            shares: vec![Fen::new(100); 3],
            at_ms: 1,
        }];
        if paid {
            append_raw(
                store,
                "wallet:sender",
                vec![wallet(false, Entry::PacketPayment, "pk", 300, 0)],
            );
            events.push(PacketEvent::Paid {
                payment_id: id("pk"),
                at_ms: 2,
            });
        }
        append_raw(store, "packet:pk", packet(&events));
    }

    fn claim(store: &Arc<SledStore>, uid: &str, index: u32) {
        append_raw(
            store,
            "packet:pk",
            packet(&[PacketEvent::ShareClaimed {
                uid: id(uid),
                index,
                amount: Fen::new(100),
                at_ms: 3,
            }]),
        );
    }

    fn transfer(store: &Arc<SledStore>, uid: &str, amount: u64) {
        append_raw(
            store,
            &format!("wallet:{uid}"),
            vec![wallet(true, Entry::ClaimTransfer, "pk", amount, amount)],
        );
    }

    /// pk expires with `count` shares and `amount` fen left, and records that amount refunded.
    fn expire_and_refund(store: &Arc<SledStore>, count: u32, amount: u64) {
        append_raw(
            store,
            "packet:pk",
            packet(&[
                PacketEvent::Expired {
                    remaining_count: count,
                    remaining_amount: Fen::new(amount),
                    at_ms: 11,
                },
                PacketEvent::Refunded {
                    amount: Fen::new(amount),
                    at_ms: 12,
                },
            ]),
        );
    }

    fn failing(report: &AuditReport) -> Vec<(&'static str, String)> {
        report
            .checks
            .iter()
            .filter(|c| !c.ok())
            .map(|c| (c.name, c.examples.join(" | ")))
            .collect()
    }

    fn run(store: &Arc<SledStore>) -> Vec<(&'static str, String)> {
        failing(&audit(store.as_ref(), None, |_, _| ()).unwrap())
    }

    #[test]
    fn a_finished_packet_audits_clean() {
        // Goal: the baseline the others break: paid, two claims transferred, expired, the
        // remainder refunded: every check holds.
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        created(&store, true);
        claim(&store, "a", 0);
        claim(&store, "b", 1);
        transfer(&store, "a", 100);
        transfer(&store, "b", 100);
        expire_and_refund(&store, 1, 100);
        append_raw(
            &store,
            "wallet:sender",
            vec![wallet(true, Entry::PacketRefund, "pk", 100, 100)],
        );
        assert_eq!(run(&store), vec![]);
    }

    #[test]
    fn a_paid_packet_long_past_its_deadline_is_reported_not_failed() {
        // Goal: escrow still held after the deadline is not a violation (the server may have
        // been down: the next start refunds it) but the audit says which packets hold it.
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        created(&store, true);
        // The log's clock is 1,000 ms (the test store's); move pk's deadline far behind it.
        let overdue = packet(&[
            PacketEvent::Created {
                spec: PacketSpec {
                    sender_uid: id("sender"),
                    mode: Mode::C2c,
                    total: Fen::new(1),
                    count: 1,
                    split: Split::Even,
                    audience: None,
                    expires_at_ms: -100_000,
                    seed: 1,
                    subsidy: None,
                },
                shares: vec![Fen::new(1)],
                at_ms: -200_000,
            },
            PacketEvent::Paid {
                payment_id: id("old"),
                at_ms: -200_000,
            },
        ]);
        append_raw(
            &store,
            "wallet:sender",
            vec![wallet(true, Entry::Deposit, "top-old", 1, 1)],
        );
        append_raw(
            &store,
            "wallet:sender",
            vec![wallet(false, Entry::PacketPayment, "old", 1, 0)],
        );
        append_raw(&store, "packet:old", overdue);
        let report = audit(store.as_ref(), None, |_, _| ()).unwrap();
        assert_eq!(failing(&report), vec![]);
        let notes = report
            .checks
            .iter()
            .find(|c| c.name == "packets")
            .unwrap()
            .notes
            .join(" | ");
        assert!(
            notes.contains("1 packets past their deadline") && notes.contains(": old"),
            "{notes}"
        );
    }

    #[test]
    fn money_stuck_in_the_escrow_of_an_unpaid_expired_packet_is_named() {
        // Goal: issue 11 item 1's loss: the sender's payment reached escrow, the packet expired
        // as unpaid with nothing to refund. Escrow is no longer a remainder, so both the packet
        // rule and the conservation line fail.
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        created(&store, false);
        append_raw(
            &store,
            "wallet:sender",
            vec![wallet(false, Entry::PacketPayment, "pk", 300, 0)],
        );
        expire_and_refund(&store, 0, 0);
        let failed = run(&store);
        let names: Vec<_> = failed.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, vec!["money_conserved", "packets"], "{failed:?}");
        assert!(failed[1].1.contains("reached escrow"), "{failed:?}");
    }

    #[test]
    fn a_transfer_of_another_amount_than_the_share_is_named() {
        // Goal: transfers are compared with the drawn share, not counted: 101 fen for a
        // 100-fen share fails the packet (and conservation: the escrow by the packet's records
        // no longer matches the money).
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        created(&store, true);
        claim(&store, "a", 0);
        transfer(&store, "a", 101);
        let failed = run(&store);
        let names: Vec<_> = failed.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, vec!["money_conserved", "packets"], "{failed:?}");
        assert!(failed[1].1.contains("a drew 100 fen"), "{failed:?}");
    }

    #[test]
    fn a_transfer_to_someone_who_claimed_nothing_is_named() {
        // Goal: money out of escrow only to claimers.
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        created(&store, true);
        claim(&store, "a", 0);
        transfer(&store, "a", 100);
        transfer(&store, "mallory", 100);
        let failed = run(&store);
        assert!(
            failed
                .iter()
                .any(|(n, e)| *n == "packets" && e.contains("mallory, who claimed no share")),
            "{failed:?}"
        );
    }

    #[test]
    fn a_refund_that_differs_from_the_packets_record_is_named() {
        // Goal: what went back equals what the packet recorded; here 150 went back for a
        // recorded remainder of 100.
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        created(&store, true);
        claim(&store, "a", 0);
        claim(&store, "b", 1);
        transfer(&store, "a", 100);
        transfer(&store, "b", 100);
        expire_and_refund(&store, 1, 100);
        append_raw(
            &store,
            "wallet:sender",
            vec![wallet(true, Entry::PacketRefund, "pk", 150, 150)],
        );
        let failed = run(&store);
        assert!(
            failed
                .iter()
                .any(|(n, e)| *n == "packets" && e.contains("pays out 350")),
            "escrow overdrawn at the refund event: {failed:?}"
        );
        assert!(
            failed
                .iter()
                .any(|(n, e)| *n == "packets" && e.contains("refunded 100 on the packet, 150")),
            "{failed:?}"
        );
    }
}
