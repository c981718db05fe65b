//! Reward tokens: HMAC-SHA256-signed, URL-safe strings that bind a reward's activity, order
//! id, uid, kind and amount. A client presents them to force-credit (R5); a forged or altered
//! token fails the signature check and credits nothing.
//!
//! Format: `hb1.<payload>.<mac>` where `payload` is base64url (no padding) of
//! `activity|order|uid|kind|amount` (ids cannot contain `|`) and `mac` is base64url of
//! HMAC-SHA256(secret, "hb1." + payload). The payload is readable by anyone; only the holder of
//! the secret can produce a valid mac. Verification is constant-time.

use crate::domain::activity::{RewardClaim, RewardKind};
use crate::ids::Id;
use crate::money::Fen;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

const PREFIX: &str = "hb1.";
/// Longest token accepted (a token of maximal ids is about 900 characters).
pub const TOKEN_CHARS_MAX: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a hongbao reward token")]
    Malformed,
    #[error("the token's signature does not match its content")]
    BadSignature,
}

impl TokenError {
    /// Metric label.
    pub fn reason(self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed",
            TokenError::BadSignature => "bad_signature",
        }
    }
}

/// Signs and verifies tokens with one secret.
#[derive(Clone)]
pub struct TokenSigner {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSigner { .. }")
    }
}

impl TokenSigner {
    pub fn new(secret: &str) -> TokenSigner {
        TokenSigner {
            mac: Hmac::<Sha256>::new_from_slice(secret.as_bytes())
                .expect("HMAC takes keys of any length"),
        }
    }

    fn tag(&self, signed: &str) -> Hmac<Sha256> {
        let mut mac = self.mac.clone();
        mac.update(signed.as_bytes());
        mac
    }

    pub fn sign(&self, claim: &RewardClaim) -> String {
        let payload = format!(
            "{}|{}|{}|{}|{}",
            claim.activity_id,
            claim.order_id,
            claim.uid,
            claim.kind.as_str(),
            claim.amount.as_u64()
        );
        let mut token = String::with_capacity(256);
        token.push_str(PREFIX);
        token.push_str(&URL_SAFE_NO_PAD.encode(payload));
        let mac = self.tag(&token).finalize().into_bytes();
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(mac));
        token
    }

    pub fn verify(&self, token: &str) -> Result<RewardClaim, TokenError> {
        if token.len() > TOKEN_CHARS_MAX || !token.starts_with(PREFIX) {
            return Err(TokenError::Malformed);
        }
        let (signed, mac) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let mac = URL_SAFE_NO_PAD
            .decode(mac)
            .map_err(|_| TokenError::Malformed)?;
        self.tag(signed)
            .verify_slice(&mac)
            .map_err(|_| TokenError::BadSignature)?;
        // Signed by us: the payload is one we wrote, but parse it strictly all the same.
        let payload = URL_SAFE_NO_PAD
            .decode(&signed[PREFIX.len()..])
            .map_err(|_| TokenError::Malformed)?;
        let payload = String::from_utf8(payload).map_err(|_| TokenError::Malformed)?;
        let fields: Vec<&str> = payload.split('|').collect();
        let [activity, order, uid, kind, amount] = fields[..] else {
            return Err(TokenError::Malformed);
        };
        Ok(RewardClaim {
            activity_id: Id::parse(activity).map_err(|_| TokenError::Malformed)?,
            order_id: Id::parse(order).map_err(|_| TokenError::Malformed)?,
            uid: Id::parse(uid).map_err(|_| TokenError::Malformed)?,
            kind: RewardKind::parse(kind).ok_or(TokenError::Malformed)?,
            amount: Fen::new(amount.parse().map_err(|_| TokenError::Malformed)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim() -> RewardClaim {
        RewardClaim {
            activity_id: Id::parse("cny2026").unwrap(),
            order_id: Id::parse("rain:cny2026:3:u42").unwrap(),
            uid: Id::parse("u42").unwrap(),
            kind: RewardKind::Cash,
            amount: Fen::new(288),
        }
    }

    #[test]
    fn a_signed_token_verifies_to_its_claim_and_is_url_safe() {
        // Goal: round trip, and nothing in the token needs escaping in a URL.
        let signer = TokenSigner::new("secret-for-tests-000");
        let token = signer.sign(&claim());
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
            "{token}"
        );
        assert_eq!(signer.verify(&token), Ok(claim()));
    }

    #[test]
    fn altered_forged_or_foreign_tokens_are_refused() {
        // Goal: any change to the payload or mac, or another secret, fails verification.
        let signer = TokenSigner::new("secret-for-tests-000");
        let token = signer.sign(&claim());
        let mut richer = claim();
        richer.amount = Fen::new(28_800);
        let forged_payload = format!(
            "{}{}",
            PREFIX,
            URL_SAFE_NO_PAD.encode("cny2026|rain:cny2026:3:u42|u42|cash|28800")
        );
        let (_, mac) = token.rsplit_once('.').unwrap();
        assert_eq!(
            signer.verify(&format!("{forged_payload}.{mac}")),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            TokenSigner::new("another-secret-0000").verify(&token),
            Err(TokenError::BadSignature)
        );
        for i in PREFIX.len()..token.len() {
            let mut bytes = token.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let altered = String::from_utf8(bytes).unwrap();
            if altered != token {
                assert!(
                    signer.verify(&altered).is_err(),
                    "altered at {i} still verifies"
                );
            }
        }
        assert_eq!(signer.verify("garbage"), Err(TokenError::Malformed));
        assert_eq!(signer.verify(""), Err(TokenError::Malformed));
        assert_eq!(
            signer.verify(&"hb1.".repeat(400)),
            Err(TokenError::Malformed)
        );
        assert_ne!(signer.sign(&richer), token);
    }
}
