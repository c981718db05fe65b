//! API keys and roles. `Authorization: Bearer <key>` names one of three roles:
//! `admin` (configuration, deposits, rebuilds; may also act as the others), `issuer` (game
//! servers: rewards, coupon issuance) and `gateway` (the user-facing gateway acting for the uid
//! in the path).

use super::error::ApiError;
use crate::config::Keys;
use crate::domain::ChangedBy;
use actix_web::{dev::Payload, http::header, web, FromRequest, HttpRequest};
use std::future::{ready, Ready};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Issuer,
    Gateway,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Issuer => "issuer",
            Role::Gateway => "gateway",
        }
    }
}

/// Equality that takes the same time wherever the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The role a key grants, if any.
pub fn role_of(keys: &Keys, key: &str) -> Option<Role> {
    let key = key.as_bytes();
    // Check all three so the time does not tell which role a wrong key came close to.
    let admin = constant_time_eq(key, keys.admin.as_bytes());
    let issuer = constant_time_eq(key, keys.issuer.as_bytes());
    let gateway = constant_time_eq(key, keys.gateway.as_bytes());
    if admin {
        Some(Role::Admin)
    } else if issuer {
        Some(Role::Issuer)
    } else if gateway {
        Some(Role::Gateway)
    } else {
        None
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone, Copy)]
pub struct Caller(pub Role);

impl Caller {
    /// Admin may do anything; other roles only what `allowed` lists.
    pub fn require(self, allowed: &[Role]) -> Result<Caller, ApiError> {
        if self.0 == Role::Admin || allowed.contains(&self.0) {
            Ok(self)
        } else {
            let names: Vec<&str> = allowed.iter().map(|r| r.as_str()).collect();
            Err(ApiError::forbidden(format!(
                "role {} may not do this (needs {})",
                self.0.as_str(),
                if names.is_empty() {
                    "admin".to_string()
                } else {
                    format!("admin or {}", names.join(" or "))
                }
            )))
        }
    }
}

/// The key an `Authorization: Bearer <key>` header names (trimmed), if any.
pub(crate) fn bearer_key(headers: &actix_web::http::header::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// The key of a request and the role it grants.
fn authenticate(req: &HttpRequest) -> Result<(Role, &str), ApiError> {
    let keys = req
        .app_data::<web::Data<Keys>>()
        .ok_or_else(ApiError::unauthorized)?;
    let key = bearer_key(req.headers()).ok_or_else(ApiError::unauthorized)?;
    let role = role_of(keys, key).ok_or_else(ApiError::unauthorized)?;
    Ok((role, key))
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Ready<Result<Caller, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(authenticate(req).map(|(role, _)| Caller(role)))
    }
}

/// A short id of a key: the first 8 hex digits of its SHA-256. It tells the keys apart in the
/// log without revealing anything usable.
pub fn key_id(key: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(key.as_bytes())[..4])
}

/// The caller of a change that records who made it (the withdrawal policy, switches).
#[derive(Debug, Clone)]
pub struct Operator {
    pub caller: Caller,
    pub key_id: String,
}

impl Operator {
    pub fn changed_by(&self) -> ChangedBy {
        ChangedBy {
            role: self.caller.0.as_str().into(),
            key_id: self.key_id.clone(),
        }
    }
}

impl FromRequest for Operator {
    type Error = ApiError;
    type Future = Ready<Result<Operator, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(authenticate(req).map(|(role, key)| Operator {
            caller: Caller(role),
            key_id: key_id(key),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_grants_its_role_and_nothing_else() {
        // Goal: keys map to roles exactly; near misses are refused.
        let keys = Keys {
            admin: "admin-key-0000000".into(),
            issuer: "issuer-key-000000".into(),
            gateway: "gateway-key-00000".into(),
            token_secret: "secret-0000000000".into(),
        };
        assert_eq!(role_of(&keys, "admin-key-0000000"), Some(Role::Admin));
        assert_eq!(role_of(&keys, "issuer-key-000000"), Some(Role::Issuer));
        assert_eq!(role_of(&keys, "gateway-key-00000"), Some(Role::Gateway));
        assert_eq!(role_of(&keys, "admin-key-0000001"), None);
        assert_eq!(role_of(&keys, ""), None);
        assert!(Caller(Role::Gateway).require(&[Role::Issuer]).is_err());
        assert!(Caller(Role::Admin).require(&[Role::Issuer]).is_ok());
        assert!(Caller(Role::Issuer).require(&[Role::Issuer]).is_ok());
        assert_eq!(key_id("admin-key-0000000").len(), 8);
        assert_ne!(key_id("admin-key-0000000"), key_id("admin-key-0000001"));
    }
}
