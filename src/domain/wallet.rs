//! The wallet aggregate: a user's `activity` balance (campaign income, withdrawable) and
//! `change` balance (the in-app purse), and the entries that moved them.
//!
//! Rules (all in [`Wallet::decide`]):
//! - every movement is keyed by `(entry, order_id)`: the same key with the same amount is the
//!   original outcome again (nothing new happens); with another amount it is
//!   [`WalletError::IdempotencyConflict`];
//! - a debit never takes a balance below zero ([`WalletError::InsufficientBalance`]) and a
//!   credit never overflows ([`WalletError::Overflow`]);
//! - a refund reverses one earlier debit of the same order, once, for exactly its amount;
//! - a debit that has not happened can be barred ([`WalletCommand::BarDebit`]): a later debit
//!   with the same entry, order id and source is refused ([`WalletError::DebitBarred`]). A
//!   process that gives up on a payment (the expiry of an unpaid red packet) bars it first, so
//!   a debit still on its way can never land after the decision ("cancel before try").
//!
//! Refusals produce no event, so a retried refusal is judged again against the current state
//! (a withdrawal refused for lack of balance may succeed after a credit). Every accepted
//! movement names its [`Entry`], which fixes the account it touches and the counterparty the
//! money came from or went to, so the audit can prove conservation across all accounts.

use super::{Aggregate, Ctx, Decision, Event};
use crate::ids::Id;
use crate::money::{Fen, MoneyError};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

/// The balances of a wallet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Account {
    /// Campaign income: rewards land here; withdrawals leave from here.
    Activity,
    /// The in-app purse: top-ups, C2C packets.
    Change,
    /// Campaign subsidies: spendable on B2C packets, not withdrawable.
    Subsidy,
}

impl Account {
    pub fn as_str(self) -> &'static str {
        match self {
            Account::Activity => "activity",
            Account::Change => "change",
            Account::Subsidy => "subsidy",
        }
    }
}

/// Why money moved. Fixes the account and the counterparty (for the conservation audit).
/// New entries are appended at the end only (the codec stores the variant index).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Entry {
    /// External cashier top-up into `change` (admin deposit).
    Deposit,
    /// A cash or subsidy reward credited from a campaign budget into `activity`.
    Reward,
    /// A withdrawal debited from `activity` into payout-in-transit.
    Withdrawal,
    /// A failed withdrawal's money back from payout-in-transit into `activity`.
    WithdrawalRefund,
    /// A subsidy reward credited from a campaign budget into `subsidy`.
    SubsidyReward,
    /// A C2C red packet paid from `change` into the packet's escrow (order: the packet id).
    PacketPayment,
    /// A B2C red packet paid from `subsidy` into escrow (order: the subsidy's order id, so one
    /// subsidy pays one packet; source: the packet id).
    PacketSubsidy,
    /// A C2C share moved from escrow into the claimer's `change` (order: the packet id).
    ClaimTransfer,
    /// A B2C share moved from escrow into the claimer's `activity`, withdrawable (order: the
    /// packet id).
    ClaimTransferActivity,
    /// An expired C2C packet's remainder back from escrow into the sender's `change`.
    PacketRefund,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Credit,
    Debit,
}

impl Entry {
    pub fn account(self) -> Account {
        match self {
            Entry::Deposit | Entry::PacketPayment | Entry::ClaimTransfer | Entry::PacketRefund => {
                Account::Change
            }
            Entry::Reward
            | Entry::Withdrawal
            | Entry::WithdrawalRefund
            | Entry::ClaimTransferActivity => Account::Activity,
            Entry::SubsidyReward | Entry::PacketSubsidy => Account::Subsidy,
        }
    }

    fn direction(self) -> Direction {
        match self {
            Entry::Deposit
            | Entry::Reward
            | Entry::WithdrawalRefund
            | Entry::SubsidyReward
            | Entry::ClaimTransfer
            | Entry::ClaimTransferActivity
            | Entry::PacketRefund => Direction::Credit,
            Entry::Withdrawal | Entry::PacketPayment | Entry::PacketSubsidy => Direction::Debit,
        }
    }

    /// For a refund entry, the debit entry it reverses.
    pub fn refund_of(self) -> Option<Entry> {
        match self {
            Entry::WithdrawalRefund => Some(Entry::Withdrawal),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Entry::Deposit => "deposit",
            Entry::Reward => "reward",
            Entry::Withdrawal => "withdrawal",
            Entry::WithdrawalRefund => "withdrawal_refund",
            Entry::SubsidyReward => "subsidy_reward",
            Entry::PacketPayment => "packet_payment",
            Entry::PacketSubsidy => "packet_subsidy",
            Entry::ClaimTransfer => "claim_transfer",
            Entry::ClaimTransferActivity => "claim_transfer_activity",
            Entry::PacketRefund => "packet_refund",
        }
    }
}

/// Commands a wallet accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WalletCommand {
    /// Adds money to the entry's account (deposit, reward). `source` names where the money
    /// comes from when an order id alone does not (a reward's activity); it is part of the
    /// payload for idempotency.
    Credit {
        entry: Entry,
        order_id: Id,
        amount: Fen,
        source: Option<Id>,
    },
    /// Takes money from the entry's account (withdrawal, packet payment); never below zero.
    /// `source` says what the money paid for when the order id alone does not (the packet a
    /// subsidy paid); part of the payload for idempotency.
    Debit {
        entry: Entry,
        order_id: Id,
        amount: Fen,
        source: Option<Id>,
    },
    /// Reverses the debit of `order_id` that `entry.refund_of()` names, once, in full.
    Refund { entry: Entry, order_id: Id },
    /// Answers the debit `(entry, order_id)` for `source` if it happened; otherwise makes sure
    /// it never will: the bar is recorded and every later such debit is refused. The reply's
    /// [`Movement::barred`] says which.
    BarDebit {
        entry: Entry,
        order_id: Id,
        source: Option<Id>,
    },
    /// On a cluster: records on the wallet a money reward its activity (in another partition)
    /// accepted and has not credited yet, so that the wallet's own partition shows it pending
    /// until the credit settles it (R6). Moves no money; nothing is recorded if the reward is
    /// already credited or noted. The reply moves nothing (amount 0).
    NotePending(PendingNote),
    /// On a cluster: a reward noted pending here that its activity settled without a credit
    /// (a coupon or item delivered or failed, a reward voided) is no longer pending. Recorded
    /// once, noted or not, so that a note arriving after it records nothing. Moves no money;
    /// the reply moves nothing (amount 0).
    SettleNote { activity_id: Id, order_id: Id },
}

/// A reward accepted by an activity, noted on the wallet of its user (a money reward is
/// credited to it; a coupon or item reward is delivered to the user).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PendingNote {
    pub activity_id: Id,
    pub order_id: Id,
    pub kind: super::activity::RewardKind,
    pub amount: Fen,
}

impl WalletCommand {
    pub fn order_id(&self) -> &Id {
        match self {
            WalletCommand::Credit { order_id, .. }
            | WalletCommand::Debit { order_id, .. }
            | WalletCommand::Refund { order_id, .. }
            | WalletCommand::BarDebit { order_id, .. } => order_id,
            WalletCommand::NotePending(note) => &note.order_id,
            WalletCommand::SettleNote { order_id, .. } => order_id,
        }
    }
}

/// One movement as recorded. `balance_after` is the entry account's balance after it, so the
/// ledger view and the audit can check every step without recomputing from zero.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub entry: Entry,
    pub order_id: Id,
    pub amount: Fen,
    pub balance_after: Fen,
    /// Where the money came from when the order id alone does not say (a reward's activity).
    pub source: Option<Id>,
}

/// A debit that must never happen (see [`WalletCommand::BarDebit`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BarredDebit {
    pub entry: Entry,
    pub order_id: Id,
    pub source: Option<Id>,
}

/// Facts about a wallet. New variants are appended at the end only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WalletEvent {
    Credited(Line),
    Debited(Line),
    /// No money moved: the debit named will be refused from now on.
    DebitBarred(BarredDebit),
    /// Appended in issue 13. No money moved: a reward accepted elsewhere, to be credited here
    /// (or, a coupon or item reward, delivered to this user).
    PendingNoted(PendingNote),
    /// Appended in issue 13. No money moved: a reward noted here was settled by its activity
    /// without a credit (delivered, failed or voided).
    NoteSettled {
        activity_id: Id,
        order_id: Id,
    },
}

impl WalletEvent {
    pub fn type_name(&self) -> &'static str {
        match self {
            WalletEvent::Credited(_) => "wallet.credited",
            WalletEvent::Debited(_) => "wallet.debited",
            WalletEvent::DebitBarred(_) => "wallet.debit_barred",
            WalletEvent::PendingNoted(_) => "wallet.pending_noted",
            WalletEvent::NoteSettled { .. } => "wallet.note_settled",
        }
    }

    /// The movement of money, if the event moved any.
    pub fn line(&self) -> Option<&Line> {
        match self {
            WalletEvent::Credited(line) | WalletEvent::Debited(line) => Some(line),
            WalletEvent::DebitBarred(_)
            | WalletEvent::PendingNoted(_)
            | WalletEvent::NoteSettled { .. } => None,
        }
    }
}

/// The answer to an accepted command (new or replayed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Movement {
    pub line: Line,
    pub account: Account,
    /// True when this is the original outcome of an earlier identical command.
    pub replayed: bool,
    /// `BarDebit` only: the debit did not happen and never will (the line moves nothing).
    pub barred: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum WalletError {
    #[error("order {order_id} was already used with a different payload")]
    IdempotencyConflict { order_id: Id },
    #[error("insufficient {account:?} balance: {balance} available, {requested} requested")]
    InsufficientBalance {
        account: Account,
        balance: Fen,
        requested: Fen,
    },
    #[error("the balance would overflow")]
    Overflow,
    #[error("amount must be positive")]
    ZeroAmount,
    #[error("no debit of order {order_id} to refund")]
    NoSuchDebit { order_id: Id },
    #[error("entry {entry:?} cannot be used with this command")]
    WrongEntry { entry: Entry },
    #[error("the debit of order {order_id} was called off and can no longer happen")]
    DebitBarred { order_id: Id },
}

/// What the wallet remembers of an accepted movement: enough to answer a retry identically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    pub amount: Fen,
    pub balance_after: Fen,
    pub source: Option<Id>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wallet {
    pub activity: Fen,
    pub change: Fen,
    pub subsidy: Fen,
    /// Every accepted movement by `(entry, order_id)`: the idempotency memory.
    pub entries: HashMap<(Entry, Id), Recorded>,
    /// Debits that must never happen.
    pub barred: HashSet<BarredDebit>,
    /// Rewards noted pending and not credited yet, by (activity, order id).
    pub noted: HashSet<(Id, Id)>,
    /// Rewards their activity settled without a credit, by (activity, order id): a note of
    /// one records nothing. Appended in issue 13 (an older snapshot no longer decodes and is
    /// replaced by replaying the log).
    pub settled: HashSet<(Id, Id)>,
}

impl Wallet {
    pub fn balance(&self, account: Account) -> Fen {
        match account {
            Account::Activity => self.activity,
            Account::Change => self.change,
            Account::Subsidy => self.subsidy,
        }
    }

    fn balance_mut(&mut self, account: Account) -> &mut Fen {
        match account {
            Account::Activity => &mut self.activity,
            Account::Change => &mut self.change,
            Account::Subsidy => &mut self.subsidy,
        }
    }

    fn movement(line: Line, replayed: bool) -> Movement {
        Movement {
            account: line.entry.account(),
            line,
            replayed,
            barred: false,
        }
    }

    fn emit(line: Line, event: fn(Line) -> WalletEvent) -> Decision<WalletEvent, Movement> {
        let reply = Self::movement(line.clone(), false);
        Decision::Emit(vec![event(line)], reply)
    }

    /// The answer to a note (or its settling): nothing moves; `replayed` until recorded.
    fn note_reply(&self, entry: Entry, activity_id: &Id, order_id: &Id) -> Movement {
        Movement {
            account: entry.account(),
            line: Line {
                entry,
                order_id: order_id.clone(),
                amount: Fen::ZERO,
                balance_after: self.balance(entry.account()),
                source: Some(activity_id.clone()),
            },
            replayed: true,
            barred: false,
        }
    }

    /// The answer to a `BarDebit` that found no debit: nothing moved.
    fn barred_reply(&self, bar: &BarredDebit) -> Movement {
        Movement {
            account: bar.entry.account(),
            line: Line {
                entry: bar.entry,
                order_id: bar.order_id.clone(),
                amount: Fen::ZERO,
                balance_after: self.balance(bar.entry.account()),
                source: bar.source.clone(),
            },
            replayed: false,
            barred: true,
        }
    }

    /// The original outcome of `(entry, order_id)` if it was recorded with the same payload
    /// (`amount` and `source`, when given), a conflict if with another, `None` if the key is new.
    fn recall(
        &self,
        entry: Entry,
        order_id: &Id,
        payload: Option<(Fen, &Option<Id>)>,
    ) -> Option<Result<Decision<WalletEvent, Movement>, WalletError>> {
        let recorded = self.entries.get(&(entry, order_id.clone()))?;
        Some(match payload {
            Some((amount, source)) if amount != recorded.amount || *source != recorded.source => {
                Err(WalletError::IdempotencyConflict {
                    order_id: order_id.clone(),
                })
            }
            _ => Ok(Decision::Reply(Self::movement(
                Line {
                    entry,
                    order_id: order_id.clone(),
                    amount: recorded.amount,
                    balance_after: recorded.balance_after,
                    source: recorded.source.clone(),
                },
                true,
            ))),
        })
    }
}

impl Aggregate for Wallet {
    type Command = WalletCommand;
    type Event = WalletEvent;
    type Reply = Movement;
    type Error = WalletError;

    const STREAM_PREFIX: &'static str = "wallet";

    fn decide(
        &self,
        command: &WalletCommand,
        _ctx: &Ctx,
    ) -> Result<Decision<WalletEvent, Movement>, WalletError> {
        match command {
            WalletCommand::Credit {
                entry,
                order_id,
                amount,
                source,
            } => {
                if entry.direction() != Direction::Credit || entry.refund_of().is_some() {
                    return Err(WalletError::WrongEntry { entry: *entry });
                }
                if amount.is_zero() {
                    return Err(WalletError::ZeroAmount);
                }
                if let Some(outcome) = self.recall(*entry, order_id, Some((*amount, source))) {
                    return outcome;
                }
                let balance_after = self
                    .balance(entry.account())
                    .checked_add(*amount)
                    .map_err(|_| WalletError::Overflow)?;
                Ok(Self::emit(
                    Line {
                        entry: *entry,
                        order_id: order_id.clone(),
                        amount: *amount,
                        balance_after,
                        source: source.clone(),
                    },
                    WalletEvent::Credited,
                ))
            }
            WalletCommand::Debit {
                entry,
                order_id,
                amount,
                source,
            } => {
                if entry.direction() != Direction::Debit {
                    return Err(WalletError::WrongEntry { entry: *entry });
                }
                if amount.is_zero() {
                    return Err(WalletError::ZeroAmount);
                }
                if let Some(outcome) = self.recall(*entry, order_id, Some((*amount, source))) {
                    return outcome;
                }
                let bar = BarredDebit {
                    entry: *entry,
                    order_id: order_id.clone(),
                    source: source.clone(),
                };
                if self.barred.contains(&bar) {
                    return Err(WalletError::DebitBarred {
                        order_id: order_id.clone(),
                    });
                }
                let account = entry.account();
                let balance = self.balance(account);
                let balance_after = balance.checked_sub(*amount).map_err(|e| match e {
                    MoneyError::Insufficient => WalletError::InsufficientBalance {
                        account,
                        balance,
                        requested: *amount,
                    },
                    MoneyError::Overflow => WalletError::Overflow,
                })?;
                Ok(Self::emit(
                    Line {
                        entry: *entry,
                        order_id: order_id.clone(),
                        amount: *amount,
                        balance_after,
                        source: source.clone(),
                    },
                    WalletEvent::Debited,
                ))
            }
            WalletCommand::Refund { entry, order_id } => {
                let Some(debit_entry) = entry.refund_of() else {
                    return Err(WalletError::WrongEntry { entry: *entry });
                };
                if let Some(outcome) = self.recall(*entry, order_id, None) {
                    return outcome;
                }
                let Some(debit) = self.entries.get(&(debit_entry, order_id.clone())) else {
                    return Err(WalletError::NoSuchDebit {
                        order_id: order_id.clone(),
                    });
                };
                let balance_after = self
                    .balance(entry.account())
                    .checked_add(debit.amount)
                    .map_err(|_| WalletError::Overflow)?;
                Ok(Self::emit(
                    Line {
                        entry: *entry,
                        order_id: order_id.clone(),
                        amount: debit.amount,
                        balance_after,
                        source: None,
                    },
                    WalletEvent::Credited,
                ))
            }
            WalletCommand::NotePending(note) => {
                // A coupon or item reward moves no money; its reply names the reward entry.
                let money = note.kind.wallet_entry();
                let reply = self.note_reply(
                    money.unwrap_or(Entry::Reward),
                    &note.activity_id,
                    &note.order_id,
                );
                let key = (note.activity_id.clone(), note.order_id.clone());
                // Credited already (the credit settled it), settled otherwise, or noted:
                // nothing to record.
                let credited =
                    money.is_some_and(|e| self.entries.contains_key(&(e, note.order_id.clone())));
                if credited || self.settled.contains(&key) || self.noted.contains(&key) {
                    return Ok(Decision::Reply(reply));
                }
                Ok(Decision::Emit(
                    vec![WalletEvent::PendingNoted(note.clone())],
                    Movement {
                        replayed: false,
                        ..reply
                    },
                ))
            }
            WalletCommand::SettleNote {
                activity_id,
                order_id,
            } => {
                let reply = self.note_reply(Entry::Reward, activity_id, order_id);
                if self
                    .settled
                    .contains(&(activity_id.clone(), order_id.clone()))
                {
                    return Ok(Decision::Reply(reply));
                }
                let settled = WalletEvent::NoteSettled {
                    activity_id: activity_id.clone(),
                    order_id: order_id.clone(),
                };
                Ok(Decision::Emit(
                    vec![settled],
                    Movement {
                        replayed: false,
                        ..reply
                    },
                ))
            }
            WalletCommand::BarDebit {
                entry,
                order_id,
                source,
            } => {
                if entry.direction() != Direction::Debit {
                    return Err(WalletError::WrongEntry { entry: *entry });
                }
                let bar = BarredDebit {
                    entry: *entry,
                    order_id: order_id.clone(),
                    source: source.clone(),
                };
                match self.entries.get(&(*entry, order_id.clone())) {
                    // It happened, for this source: the original debit answers.
                    Some(recorded) if recorded.source == *source => {
                        Ok(self.recall(*entry, order_id, None).expect("recorded")?)
                    }
                    // The key paid for another source: this source's debit would be a
                    // conflict anyway, so it can never happen; nothing to record.
                    Some(_) => Ok(Decision::Reply(self.barred_reply(&bar))),
                    None if self.barred.contains(&bar) => {
                        Ok(Decision::Reply(self.barred_reply(&bar)))
                    }
                    None => {
                        let reply = self.barred_reply(&bar);
                        Ok(Decision::Emit(vec![WalletEvent::DebitBarred(bar)], reply))
                    }
                }
            }
        }
    }

    fn evolve(&mut self, event: &WalletEvent) {
        let line = match event {
            WalletEvent::Credited(line) | WalletEvent::Debited(line) => line,
            WalletEvent::DebitBarred(bar) => {
                self.barred.insert(bar.clone());
                return;
            }
            WalletEvent::PendingNoted(note) => {
                self.noted
                    .insert((note.activity_id.clone(), note.order_id.clone()));
                return;
            }
            WalletEvent::NoteSettled {
                activity_id,
                order_id,
            } => {
                let key = (activity_id.clone(), order_id.clone());
                self.noted.remove(&key);
                self.settled.insert(key);
                return;
            }
        };
        // A reward credit settles its note (a single node never notes: nothing to look up).
        if !self.noted.is_empty() {
            if let (Entry::Reward | Entry::SubsidyReward, Some(source)) = (line.entry, &line.source)
            {
                self.noted.remove(&(source.clone(), line.order_id.clone()));
            }
        }
        let account = line.entry.account();
        // The event carries the resulting balance; it is the fact. Pair assertion: in debug
        // builds, check that it agrees with the arithmetic the decision made.
        debug_assert_eq!(
            match event {
                WalletEvent::Debited(_) => self.balance(account).checked_sub(line.amount),
                _ => self.balance(account).checked_add(line.amount),
            },
            Ok(line.balance_after),
            "wallet event disagrees with the state it applies to"
        );
        *self.balance_mut(account) = line.balance_after;
        self.entries.insert(
            (line.entry, line.order_id.clone()),
            Recorded {
                amount: line.amount,
                balance_after: line.balance_after,
                source: line.source.clone(),
            },
        );
    }

    fn correlation_id(command: &WalletCommand) -> String {
        command.order_id().to_string()
    }

    fn wrap(event: WalletEvent) -> Event {
        Event::Wallet(event)
    }

    fn unwrap(event: &Event) -> Option<&WalletEvent> {
        match event {
            Event::Wallet(e) => Some(e),
            _ => None,
        }
    }

    /// An encoded [`EntryQuestion`]: the wallet's record of that movement, encoded
    /// `Option<Recorded>`.
    fn answer(&self, question: &[u8]) -> Option<Vec<u8>> {
        let EntryQuestion { entry, order_id } = crate::events::codec::decode(question).ok()?;
        crate::events::codec::encode(&self.entries.get(&(entry, order_id))).ok()
    }
}

/// "Did this wallet record the movement `(entry, order_id)`?", asked where the wallet lives
/// (see [`Aggregate::answer`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryQuestion {
    pub entry: Entry,
    pub order_id: Id,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::replay;
    use proptest::prelude::*;

    const CTX: Ctx = Ctx { now_ms: 0 };

    fn id(s: &str) -> Id {
        Id::parse(s).unwrap()
    }

    fn deposit(order: &str, amount: u64) -> WalletCommand {
        WalletCommand::Credit {
            entry: Entry::Deposit,
            order_id: id(order),
            amount: Fen::new(amount),
            source: None,
        }
    }

    fn withdraw(order: &str, amount: u64) -> WalletCommand {
        WalletCommand::Debit {
            entry: Entry::Withdrawal,
            order_id: id(order),
            amount: Fen::new(amount),
            source: None,
        }
    }

    fn reward(order: &str, amount: u64) -> WalletCommand {
        WalletCommand::Credit {
            entry: Entry::Reward,
            order_id: id(order),
            amount: Fen::new(amount),
            source: Some(id("act1")),
        }
    }

    fn refund(order: &str) -> WalletCommand {
        WalletCommand::Refund {
            entry: Entry::WithdrawalRefund,
            order_id: id(order),
        }
    }

    /// given(events).when(command): the decision.
    fn given(events: &[WalletEvent]) -> Wallet {
        replay(Wallet::default(), events)
    }

    fn credited(entry: Entry, order: &str, amount: u64, after: u64) -> WalletEvent {
        WalletEvent::Credited(Line {
            entry,
            order_id: id(order),
            amount: Fen::new(amount),
            balance_after: Fen::new(after),
            source: (entry == Entry::Reward).then(|| id("act1")),
        })
    }

    fn events_of(decision: Decision<WalletEvent, Movement>) -> Vec<WalletEvent> {
        match decision {
            Decision::Emit(events, _) => events,
            Decision::Reply(_) => vec![],
        }
    }

    #[test]
    fn deposit_credits_change_with_balance_after() {
        // Goal: a deposit is one Credited event on `change` carrying the new balance.
        let wallet = given(&[credited(Entry::Deposit, "d1", 100, 100)]);
        let decision = wallet.decide(&deposit("d2", 50), &CTX).unwrap();
        assert_eq!(
            events_of(decision),
            vec![credited(Entry::Deposit, "d2", 50, 150)]
        );
    }

    #[test]
    fn same_order_same_amount_replays_the_original_outcome() {
        // Goal: a retry emits nothing and answers what the first attempt answered.
        let wallet = given(&[
            credited(Entry::Deposit, "d1", 100, 100),
            credited(Entry::Deposit, "d2", 7, 107),
        ]);
        match wallet.decide(&deposit("d1", 100), &CTX).unwrap() {
            Decision::Reply(m) => {
                assert!(m.replayed);
                assert_eq!(m.line.balance_after, Fen::new(100));
                assert_eq!(m.line.amount, Fen::new(100));
            }
            other => panic!("expected a replay, got {other:?}"),
        }
    }

    #[test]
    fn same_order_other_amount_is_a_conflict() {
        // Goal: an order id cannot be reused with another payload.
        let wallet = given(&[credited(Entry::Deposit, "d1", 100, 100)]);
        assert_eq!(
            wallet.decide(&deposit("d1", 101), &CTX),
            Err(WalletError::IdempotencyConflict { order_id: id("d1") })
        );
    }

    #[test]
    fn a_reward_from_another_source_under_the_same_order_is_a_conflict() {
        // Goal: the same order id credited from two activities is refused, not replayed, so a
        // second activity's reward is never mistaken for the first one's credit.
        let wallet = given(&[credited(Entry::Reward, "r1", 100, 100)]);
        let other = WalletCommand::Credit {
            entry: Entry::Reward,
            order_id: id("r1"),
            amount: Fen::new(100),
            source: Some(id("act2")),
        };
        assert_eq!(
            wallet.decide(&other, &CTX),
            Err(WalletError::IdempotencyConflict { order_id: id("r1") })
        );
        assert!(
            matches!(wallet.decide(&reward("r1", 100), &CTX), Ok(Decision::Reply(m)) if m.replayed)
        );
    }

    #[test]
    fn subsidy_rewards_land_in_their_own_account() {
        // Goal: subsidies are kept apart from withdrawable activity income.
        let wallet = Wallet::default();
        let cmd = WalletCommand::Credit {
            entry: Entry::SubsidyReward,
            order_id: id("s1"),
            amount: Fen::new(30),
            source: Some(id("act1")),
        };
        let Ok(Decision::Emit(events, reply)) = wallet.decide(&cmd, &CTX) else {
            panic!()
        };
        assert_eq!(reply.account, Account::Subsidy);
        let wallet = replay(wallet, &events);
        assert_eq!((wallet.subsidy, wallet.activity), (Fen::new(30), Fen::ZERO));
    }

    #[test]
    fn debit_never_overdraws() {
        // Goal: a withdrawal larger than the activity balance is refused and changes nothing.
        let wallet = given(&[credited(Entry::Reward, "r1", 100, 100)]);
        assert_eq!(
            wallet.decide(&withdraw("w1", 101), &CTX),
            Err(WalletError::InsufficientBalance {
                account: Account::Activity,
                balance: Fen::new(100),
                requested: Fen::new(101)
            })
        );
        let events = events_of(wallet.decide(&withdraw("w1", 100), &CTX).unwrap());
        assert_eq!(
            events,
            vec![WalletEvent::Debited(Line {
                entry: Entry::Withdrawal,
                order_id: id("w1"),
                amount: Fen::new(100),
                balance_after: Fen::ZERO,
                source: None,
            })]
        );
    }

    #[test]
    fn change_money_cannot_be_withdrawn_from_activity() {
        // Goal: the two balances are separate accounts.
        let wallet = given(&[credited(Entry::Deposit, "d1", 100, 100)]);
        assert!(matches!(
            wallet.decide(&withdraw("w1", 1), &CTX),
            Err(WalletError::InsufficientBalance {
                account: Account::Activity,
                ..
            })
        ));
    }

    #[test]
    fn refund_reverses_a_debit_exactly_once() {
        // Goal: one refund per debit, for the debited amount; a second one is a replay.
        let mut wallet = given(&[credited(Entry::Reward, "r1", 300, 300)]);
        for e in events_of(wallet.decide(&withdraw("w1", 200), &CTX).unwrap()) {
            wallet.evolve(&e);
        }
        let first = wallet.decide(&refund("w1"), &CTX).unwrap();
        let events = events_of(first);
        assert_eq!(
            events,
            vec![credited(Entry::WithdrawalRefund, "w1", 200, 300)]
        );
        for e in &events {
            wallet.evolve(e);
        }
        assert!(matches!(wallet.decide(&refund("w1"), &CTX), Ok(Decision::Reply(m)) if m.replayed));
        assert_eq!(wallet.activity, Fen::new(300));
    }

    #[test]
    fn refund_without_debit_is_refused() {
        // Goal: money cannot be created by refunding something never paid.
        let wallet = Wallet::default();
        assert_eq!(
            wallet.decide(&refund("nope"), &CTX),
            Err(WalletError::NoSuchDebit {
                order_id: id("nope")
            })
        );
    }

    #[test]
    fn overflow_is_refused() {
        // Goal: a credit that would overflow the balance is an error, not a wrap.
        let wallet = given(&[credited(Entry::Deposit, "d1", u64::MAX, u64::MAX)]);
        assert_eq!(
            wallet.decide(&deposit("d2", 1), &CTX),
            Err(WalletError::Overflow)
        );
    }

    fn escrow(order: &str, source: Option<&str>) -> (WalletCommand, WalletCommand) {
        let entry = match source {
            None => Entry::PacketPayment,
            Some(_) => Entry::PacketSubsidy,
        };
        (
            WalletCommand::Debit {
                entry,
                order_id: id(order),
                amount: Fen::new(30),
                source: source.map(id),
            },
            WalletCommand::BarDebit {
                entry,
                order_id: id(order),
                source: source.map(id),
            },
        )
    }

    fn note(order: &str, amount: u64) -> WalletCommand {
        WalletCommand::NotePending(PendingNote {
            activity_id: id("act1"),
            order_id: id(order),
            kind: crate::domain::activity::RewardKind::Cash,
            amount: Fen::new(amount),
        })
    }

    #[test]
    fn a_noted_reward_is_settled_by_its_credit_and_never_noted_after_it() {
        // Goal: a note records once and moves no money; the reward's credit settles it; a
        // note for a reward already credited records nothing.
        let mut w = Wallet::default();
        assert!(matches!(
            w.decide(&note("r1", 50), &CTX),
            Ok(Decision::Emit(ref e, ref m)) if e.len() == 1 && !m.replayed && m.line.amount.is_zero()
        ));
        run(&mut w, &note("r1", 50)).unwrap();
        assert!(w.noted.contains(&(id("act1"), id("r1"))));
        assert!(matches!(w.decide(&note("r1", 50), &CTX), Ok(Decision::Reply(m)) if m.replayed));
        assert_eq!(w.balance(Account::Activity), Fen::ZERO);
        run(&mut w, &reward("r1", 50)).unwrap();
        assert!(w.noted.is_empty());
        assert_eq!(w.balance(Account::Activity), Fen::new(50));
        assert!(matches!(
            w.decide(&note("r1", 50), &CTX),
            Ok(Decision::Reply(_))
        ));
    }

    #[test]
    fn an_item_reward_noted_is_settled_once_and_never_noted_after_it() {
        // Goal: a coupon or item reward (no money) is noted like a money one; settling it
        // removes the note, records once, moves nothing; a note arriving after the settling
        // (an intake retried late) records nothing, so it is never pending again.
        let mut w = Wallet::default();
        let item = |order: &str| {
            WalletCommand::NotePending(PendingNote {
                kind: crate::domain::activity::RewardKind::Item,
                ..match note(order, 1) {
                    WalletCommand::NotePending(n) => n,
                    _ => unreachable!(),
                }
            })
        };
        let settle = |order: &str| WalletCommand::SettleNote {
            activity_id: id("act1"),
            order_id: id(order),
        };
        assert!(!run(&mut w, &item("i1")).unwrap().replayed);
        assert!(w.noted.contains(&(id("act1"), id("i1"))));
        let settled = run(&mut w, &settle("i1")).unwrap();
        assert!(!settled.replayed && settled.line.amount.is_zero());
        assert!(w.noted.is_empty());
        assert!(matches!(w.decide(&settle("i1"), &CTX), Ok(Decision::Reply(m)) if m.replayed));
        assert!(matches!(w.decide(&item("i1"), &CTX), Ok(Decision::Reply(m)) if m.replayed));
        // Settled before it was ever noted: the late note records nothing either.
        run(&mut w, &settle("i2")).unwrap();
        assert!(matches!(
            w.decide(&item("i2"), &CTX),
            Ok(Decision::Reply(_))
        ));
        assert!(w.noted.is_empty());
        assert_eq!(w.balance(Account::Activity), Fen::ZERO);
    }

    fn run(wallet: &mut Wallet, command: &WalletCommand) -> Result<Movement, WalletError> {
        match wallet.decide(command, &CTX)? {
            Decision::Emit(events, reply) => {
                for e in &events {
                    wallet.evolve(e);
                }
                Ok(reply)
            }
            Decision::Reply(reply) => Ok(reply),
        }
    }

    #[test]
    fn a_barred_debit_is_refused_forever_and_a_done_one_is_answered() {
        // Goal: BarDebit is the "cancel before try": after it, the debit it names is refused
        // (on replay too); before it, the debit that happened is what it answers; a bar moves
        // no money and is idempotent.
        let mut wallet = given(&[credited(Entry::Deposit, "d1", 100, 100)]);
        let (debit, bar) = escrow("pk-1", None);
        let barred = run(&mut wallet, &bar).unwrap();
        assert!(barred.barred && barred.line.amount.is_zero());
        assert!(matches!(wallet.decide(&bar, &CTX), Ok(Decision::Reply(m)) if m.barred));
        assert_eq!(
            wallet.decide(&debit, &CTX),
            Err(WalletError::DebitBarred {
                order_id: id("pk-1")
            })
        );
        assert_eq!(wallet.change, Fen::new(100), "a bar moves nothing");

        let (debit, bar) = escrow("pk-2", None);
        run(&mut wallet, &debit).unwrap();
        let answered = run(&mut wallet, &bar).unwrap();
        assert!(!answered.barred && answered.replayed);
        assert_eq!(answered.line.amount, Fen::new(30));
        assert!(matches!(wallet.decide(&debit, &CTX), Ok(Decision::Reply(m)) if m.replayed));
    }

    #[test]
    fn a_subsidy_bar_is_per_packet() {
        // Goal: barring a subsidy's payment of one packet leaves the subsidy free to pay
        // another; a subsidy spent on another packet answers barred without recording.
        let mut wallet = given(&[credited(Entry::SubsidyReward, "s1", 30, 30)]);
        let (_, bar_a) = escrow("s1", Some("pk-a"));
        let (debit_b, bar_b) = escrow("s1", Some("pk-b"));
        assert!(run(&mut wallet, &bar_a).unwrap().barred);
        run(&mut wallet, &debit_b).unwrap();
        assert!(!run(&mut wallet, &bar_b).unwrap().barred);
        assert!(matches!(wallet.decide(&bar_a, &CTX), Ok(Decision::Reply(m)) if m.barred));
    }

    #[test]
    fn zero_and_misdirected_commands_are_refused() {
        // Goal: the command shape is checked in the domain too, not only at the edge.
        let wallet = Wallet::default();
        assert_eq!(
            wallet.decide(&deposit("d", 0), &CTX),
            Err(WalletError::ZeroAmount)
        );
        let wrong = WalletCommand::Debit {
            entry: Entry::Deposit,
            order_id: id("x"),
            amount: Fen::new(1),
            source: None,
        };
        assert_eq!(
            wallet.decide(&wrong, &CTX),
            Err(WalletError::WrongEntry {
                entry: Entry::Deposit
            })
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Deposit(u8, u64),
        Reward(u8, u64),
        Withdraw(u8, u64),
        Refund(u8),
        Note(u8, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Small order-id space so retries and conflicts happen often; amounts near u64::MAX so
        // overflow is reachable.
        let amount = prop_oneof![1u64..1_000, Just(u64::MAX / 2), Just(u64::MAX)];
        prop_oneof![
            (0u8..8, amount.clone()).prop_map(|(o, a)| Op::Deposit(o, a)),
            (0u8..8, amount.clone()).prop_map(|(o, a)| Op::Reward(o, a)),
            (0u8..8, amount).prop_map(|(o, a)| Op::Withdraw(o, a)),
            (0u8..8).prop_map(Op::Refund),
            (0u8..8, 1u64..1_000).prop_map(|(o, a)| Op::Note(o, a)),
        ]
    }

    fn command(op: &Op) -> WalletCommand {
        match op {
            Op::Deposit(o, a) => deposit(&format!("o{o}"), *a),
            Op::Reward(o, a) => reward(&format!("o{o}"), *a),
            Op::Withdraw(o, a) => withdraw(&format!("o{o}"), *a),
            Op::Refund(o) => refund(&format!("o{o}")),
            Op::Note(o, a) => note(&format!("o{o}"), *a),
        }
    }

    proptest! {
        #[test]
        fn replay_equals_live_state_and_money_adds_up(ops in proptest::collection::vec(op(), 0..60)) {
            // Goal: for any command sequence, replaying the emitted events gives the live state,
            // balances equal credits minus debits per account, and retries change nothing.
            let mut live = Wallet::default();
            let mut log = Vec::new();
            for op in &ops {
                let cmd = command(op);
                if let Ok(Decision::Emit(events, _)) = live.decide(&cmd, &CTX) {
                    for e in events {
                        live.evolve(&e);
                        log.push(e);
                    }
                    // Retrying the same command right away is a pure replay.
                    let retry = live.decide(&cmd, &CTX).unwrap();
                    prop_assert!(matches!(retry, Decision::Reply(ref m) if m.replayed));
                }
            }
            let rebuilt = replay(Wallet::default(), &log);
            prop_assert_eq!(&rebuilt, &live);
            // A reward is noted pending or credited, never both.
            for (activity, order) in &live.noted {
                prop_assert!(!(activity.as_str() == "act1"
                    && live.entries.contains_key(&(Entry::Reward, order.clone()))));
            }
            // Conservation per account, computed with wide integers so nothing can overflow.
            for account in [Account::Activity, Account::Change, Account::Subsidy] {
                let mut sum: i128 = 0;
                for e in &log {
                    match e {
                        WalletEvent::Credited(l) if l.entry.account() == account => sum += l.amount.as_u64() as i128,
                        WalletEvent::Debited(l) if l.entry.account() == account => sum -= l.amount.as_u64() as i128,
                        _ => {}
                    }
                    prop_assert!(sum >= 0);
                }
                prop_assert_eq!(sum, live.balance(account).as_u64() as i128);
            }
            // At most one refund per withdrawal, never more than debited.
            for (key, rec) in &live.entries {
                if key.0 == Entry::WithdrawalRefund {
                    let debit = live.entries.get(&(Entry::Withdrawal, key.1.clone()));
                    prop_assert_eq!(debit.map(|d| d.amount), Some(rec.amount));
                }
            }
        }
    }
}
