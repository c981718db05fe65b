//! Money: integer fen in a checked newtype.
//!
//! Every amount in hongbao is a [`Fen`] (1 yuan = 100 fen). There is no floating point anywhere
//! near money, and no unchecked arithmetic: `checked_add`/`checked_sub` return a typed
//! [`MoneyError`] instead of wrapping or panicking, so an overflow is a refused command, not a
//! corrupted balance. Amounts are unsigned: a balance can never be negative by construction.

use serde::{Deserialize, Serialize};
use std::fmt;

/// An amount of money in fen. Never negative; arithmetic is checked.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Fen(u64);

/// Why an arithmetic operation on money was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("amount overflow")]
    Overflow,
    #[error("insufficient funds")]
    Insufficient,
}

/// Why an amount given by a client is not acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("amount must be a positive integer number of fen")]
    NotPositive,
    #[error("amount exceeds the per-command maximum of {max} fen")]
    TooLarge { max: u64 },
}

impl Fen {
    pub const ZERO: Fen = Fen(0);

    pub const fn new(fen: u64) -> Fen {
        Fen(fen)
    }

    pub const fn as_u64(self) -> u64 {
        self.0
    }

    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    pub fn checked_add(self, other: Fen) -> Result<Fen, MoneyError> {
        self.0
            .checked_add(other.0)
            .map(Fen)
            .ok_or(MoneyError::Overflow)
    }

    pub fn checked_sub(self, other: Fen) -> Result<Fen, MoneyError> {
        self.0
            .checked_sub(other.0)
            .map(Fen)
            .ok_or(MoneyError::Insufficient)
    }

    /// Validates an amount a client sent: strictly positive and at most `max_fen`.
    /// The input is signed so that a negative JSON number reaches this check (and gets a 422)
    /// instead of failing deserialisation with a less helpful message.
    pub fn parse_amount(raw: i64, max_fen: u64) -> Result<Fen, AmountError> {
        if raw <= 0 {
            return Err(AmountError::NotPositive);
        }
        let fen = raw as u64; // raw > 0, so the cast is exact
        if fen > max_fen {
            return Err(AmountError::TooLarge { max: max_fen });
        }
        Ok(Fen(fen))
    }

    /// Sums amounts, failing on overflow.
    pub fn sum<I: IntoIterator<Item = Fen>>(items: I) -> Result<Fen, MoneyError> {
        items.into_iter().try_fold(Fen::ZERO, Fen::checked_add)
    }
}

impl fmt::Display for Fen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} fen", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_arithmetic_refuses_overflow_and_underflow() {
        // Goal: no amount can wrap around.
        assert_eq!(
            Fen::new(u64::MAX).checked_add(Fen::new(1)),
            Err(MoneyError::Overflow)
        );
        assert_eq!(
            Fen::new(1).checked_sub(Fen::new(2)),
            Err(MoneyError::Insufficient)
        );
        assert_eq!(Fen::new(5).checked_sub(Fen::new(5)), Ok(Fen::ZERO));
        assert_eq!(Fen::new(2).checked_add(Fen::new(3)), Ok(Fen::new(5)));
    }

    #[test]
    fn client_amounts_must_be_positive_and_bounded() {
        // Goal: zero, negative and huge amounts never become money.
        assert_eq!(Fen::parse_amount(0, 100), Err(AmountError::NotPositive));
        assert_eq!(Fen::parse_amount(-5, 100), Err(AmountError::NotPositive));
        assert_eq!(
            Fen::parse_amount(101, 100),
            Err(AmountError::TooLarge { max: 100 })
        );
        assert_eq!(Fen::parse_amount(100, 100), Ok(Fen::new(100)));
    }

    #[test]
    fn sum_fails_on_overflow() {
        // Goal: totals are checked too.
        assert_eq!(Fen::sum([Fen::new(1), Fen::new(2)]), Ok(Fen::new(3)));
        assert_eq!(
            Fen::sum([Fen::new(u64::MAX), Fen::new(1)]),
            Err(MoneyError::Overflow)
        );
    }
}
