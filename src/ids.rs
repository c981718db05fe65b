//! Identifiers that clients send: order ids, uids, activity ids, packet ids, ...
//!
//! The contract (API.md) allows 1-128 characters from `[A-Za-z0-9_.:-]`. [`Id`] can only be
//! built through [`Id::parse`], so every id that reaches the domain is valid. Stream ids are
//! built from a kind prefix and an id (`wallet:u42`), which keeps them valid and unambiguous.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest id a client may send, in bytes.
pub const ID_BYTES_MAX: usize = 128;

/// A validated identifier.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Id(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ids are 1-{ID_BYTES_MAX} characters from [A-Za-z0-9_.:-]")]
pub struct IdError;

impl Id {
    pub fn parse(raw: &str) -> Result<Id, IdError> {
        let valid = !raw.is_empty()
            && raw.len() <= ID_BYTES_MAX
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
        if valid {
            Ok(Id(raw.to_owned()))
        } else {
            Err(IdError)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Id {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Stream id of a user's wallet.
pub fn wallet_stream(uid: &Id) -> String {
    format!("wallet:{uid}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_contract_alphabet_and_refuses_the_rest() {
        // Goal: only ids the contract allows can be built.
        assert!(Id::parse("u-42_a.b:c").is_ok());
        assert!(Id::parse(&"x".repeat(128)).is_ok());
        assert!(Id::parse(&"x".repeat(129)).is_err());
        assert!(Id::parse("").is_err());
        assert!(Id::parse("a b").is_err());
        assert!(Id::parse("a/b").is_err());
        assert!(Id::parse("ü").is_err());
    }
}
