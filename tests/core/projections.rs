//! Projections: the incremental wallet view equals a rebuild from zero, checkpoints advance.

use super::{open, runtime};
use hongbao::domain::wallet::{Entry, Line, WalletEvent};
use hongbao::domain::Event;
use hongbao::events::{EventStore, ExpectedVersion, NewEvent};
use hongbao::ids::Id;
use hongbao::metrics::Metrics;
use hongbao::money::Fen;
use hongbao::projections::{self, wallet as view, Projection, Projections};
use std::sync::Arc;
use std::time::Duration;

fn movement(n: u64, debit: bool, after: u64) -> NewEvent {
    let order_id = Id::parse(&format!("o{n}")).unwrap();
    let event = if debit {
        WalletEvent::Debited(Line {
            entry: Entry::Withdrawal,
            order_id,
            amount: Fen::new(1),
            balance_after: Fen::new(after),
            source: None,
        })
    } else {
        WalletEvent::Credited(Line {
            entry: Entry::Reward,
            order_id,
            amount: Fen::new(1),
            balance_after: Fen::new(after),
            source: Some(Id::parse("act1").unwrap()),
        })
    };
    NewEvent {
        event: Event::Wallet(event),
        correlation_id: format!("o{n}"),
    }
}

fn dump(tree: &sled::Tree) -> Vec<(Vec<u8>, Vec<u8>)> {
    tree.iter()
        .map(|r| r.unwrap())
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect()
}

#[test]
fn the_incremental_view_equals_a_rebuild_and_pages_latest_first() {
    // Goal: the view built live from the subscription is byte-for-byte the view a rebuild
    // from zero produces; the ledger pages latest first by sequence.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let rt = runtime();
    let live = Projections::start(
        store.clone(),
        store.state_db(),
        vec![Arc::new(view::WalletView)],
        Arc::new(Metrics::new()),
    )
    .unwrap();
    rt.block_on(async {
        let mut balances = [0u64; 3];
        for n in 0..90u64 {
            let w = (n % 3) as usize;
            let debit = balances[w] > 0 && n % 4 == 0;
            balances[w] = if debit {
                balances[w] - 1
            } else {
                balances[w] + 1
            };
            store
                .append(
                    0,
                    format!("wallet:u{w}"),
                    ExpectedVersion::Any,
                    vec![movement(n, debit, balances[w])],
                )
                .unwrap()
                .await
                .unwrap();
        }
        assert!(live.wait_for(view::NAME, 90, Duration::from_secs(10)).await);
        live.stop().await;
        let tree = live.tree(view::NAME).unwrap();
        for (w, expected) in balances.iter().enumerate() {
            assert_eq!(
                view::balances(tree, &format!("u{w}")).unwrap().activity,
                Fen::new(*expected)
            );
        }
        let page = view::ledger(tree, "u0", None, 5).unwrap();
        assert_eq!(page.len(), 5);
        assert!(page.windows(2).all(|p| p[0].seq > p[1].seq));
        let older = view::ledger(tree, "u0", Some(page[4].seq), 100).unwrap();
        assert_eq!(page.len() + older.len(), 30);
        assert!(older.iter().all(|e| e.seq < page[4].seq));

        let incremental = dump(tree);
        let rebuilt_at = projections::rebuild(
            store.as_ref(),
            store.state_db(),
            &view::WalletView,
            |_, _| {},
        )
        .unwrap();
        assert_eq!(rebuilt_at, 90);
        let rebuilt =
            dump(&projections::view_tree(store.state_db(), view::WalletView.name()).unwrap());
        assert_eq!(rebuilt, incremental);
    });
}
