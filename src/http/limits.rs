//! Per-caller request limits (issue 15): one caller flooding the service must not starve the
//! others. Two keyed limits (`governor`), each off unless configured (`[server]`):
//! - per API key (`per_key_per_s`, `per_key_burst`): the key of the request once it is known
//!   to be one of the service's keys (a missing or unknown key is answered 401 by the handlers
//!   and charges nothing: an outsider can neither spend a user's budget nor grow the
//!   limiters' maps with invented keys);
//! - per user (`per_uid_per_s`, `per_uid_burst`): the uid of a wallet path
//!   (`/v1/wallets/{uid}/...`, the path as routed, percent-decoded, and a valid id), so that
//!   one user hammering their wallet is slowed while every other user is served.
//!
//! A cluster node (`serve --node-id`) refuses to start with a limit configured: requests it
//! forwards or fans out to its peers come back through their own listeners with the caller's
//! key, so each would be charged again at every hop.
//!
//! Only the API's paths (`/v1/...`) are limited: health, readiness, `/metrics` and the OpenAPI
//! document never are. A refused request is answered `429 rate_limited` with `retry_after_ms` and `Retry-After`
//! before it reaches routing, so it costs no actor, no store and no log line; `/metrics`
//! counts it under its code like any other error answer.

use super::auth::{bearer_key, role_of};
use super::error::ApiError;
use crate::config::Keys;
use crate::config::ServerConfig;
use crate::ids::Id;
use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::middleware::Next;
use actix_web::{web, ResponseError};
use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

/// Checks between two sweeps of the keys not seen lately (the limiters' memory is bounded by
/// the callers of the last moments, not by every caller ever seen).
const SWEEP_EVERY_CHECKS: u64 = 1 << 16;

/// The limits charged to load-test traffic (`X-Hongbao-Load-Test: 1`): the same
/// configuration, buckets of their own.
pub struct LoadTestLimits(pub Option<CallerLimits>);

pub struct CallerLimits {
    per_key: Option<DefaultKeyedRateLimiter<String>>,
    per_uid: Option<DefaultKeyedRateLimiter<String>>,
    checks: AtomicU64,
}

fn limiter(per_s: u32, burst: u32) -> Option<DefaultKeyedRateLimiter<String>> {
    let per_s = NonZeroU32::new(per_s)?;
    let burst = NonZeroU32::new(burst).unwrap_or(per_s);
    Some(DefaultKeyedRateLimiter::keyed(
        Quota::per_second(per_s).allow_burst(burst),
    ))
}

impl CallerLimits {
    /// The limits `[server]` configures; `None` when none is.
    pub fn from_config(server: &ServerConfig) -> Option<CallerLimits> {
        let limits = CallerLimits {
            per_key: limiter(server.per_key_per_s, server.per_key_burst),
            per_uid: limiter(server.per_uid_per_s, server.per_uid_burst),
            checks: AtomicU64::new(0),
        };
        (limits.per_key.is_some() || limits.per_uid.is_some()).then_some(limits)
    }

    /// `Err(ms)`: refused, retry after `ms`.
    fn check(&self, key: Option<&str>, uid: Option<&str>) -> Result<(), (&'static str, u64)> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY_CHECKS
            == SWEEP_EVERY_CHECKS - 1
        {
            for limiter in [&self.per_key, &self.per_uid].into_iter().flatten() {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
        }
        let wait = |not_until: governor::NotUntil<_>| {
            let ms = not_until
                .wait_time_from(DefaultClock::default().now())
                .as_millis();
            u64::try_from(ms).unwrap_or(u64::MAX).max(1)
        };
        if let (Some(limiter), Some(key)) = (&self.per_key, key) {
            limiter
                .check_key(&key.to_owned())
                .map_err(|n| ("this API key", wait(n)))?;
        }
        if let (Some(limiter), Some(uid)) = (&self.per_uid, uid) {
            limiter
                .check_key(&uid.to_owned())
                .map_err(|n| ("this user", wait(n)))?;
        }
        Ok(())
    }
}

/// The uid of a wallet path (`/v1/wallets/{uid}/...`).
fn wallet_uid(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v1/wallets/")?;
    let uid = rest.split('/').next()?;
    (!uid.is_empty()).then_some(uid)
}

/// The middleware: refuses a request over its caller's limit with 429.
pub(crate) async fn limit(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let load_test =
        super::load_test::traffic(req.headers()) == Some(super::load_test::Traffic::LoadTest);
    let configured = req.app_data::<web::Data<Option<CallerLimits>>>().cloned();
    let configured_load_test = req.app_data::<web::Data<LoadTestLimits>>().cloned();
    let limits = match load_test {
        true => configured_load_test.as_ref().and_then(|d| d.0.as_ref()),
        false => configured.as_ref().and_then(|d| d.as_ref().as_ref()),
    };
    // The API's own paths; health, readiness, metrics and the document are never limited.
    let Some(limits) = limits.filter(|_| req.match_info().as_str().starts_with("/v1/")) else {
        return Ok(next.call(req).await?.map_into_boxed_body());
    };
    // Only a caller the service knows is charged: its role names the key.
    let keys = req.app_data::<web::Data<Keys>>();
    let role = keys.and_then(|keys| role_of(keys, bearer_key(req.headers())?));
    let Some(role) = role else {
        return Ok(next.call(req).await?.map_into_boxed_body());
    };
    let uid = wallet_uid(req.match_info().as_str()).filter(|uid| Id::parse(uid).is_ok());
    if let Err((who, ms)) = limits.check(Some(role.as_str()), uid) {
        let refusal = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many requests from {who}; retry after retry_after_ms"),
        )
        .with("retry_after_ms", ms);
        return Ok(req.into_response(refusal.error_response()));
    }
    Ok(next.call(req).await?.map_into_boxed_body())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wallet_paths_uid_is_found_and_other_paths_have_none() {
        assert_eq!(wallet_uid("/v1/wallets/u42/change/deposits"), Some("u42"));
        assert_eq!(wallet_uid("/v1/wallets/u42"), Some("u42"));
        assert_eq!(wallet_uid("/v1/wallets/"), None);
        assert_eq!(wallet_uid("/v1/rewards"), None);
    }

    #[test]
    fn a_caller_over_its_burst_is_refused_while_another_is_served() {
        // Goal: one key's burst spent, that key is refused with a wait; another key and a
        // request without one are still admitted.
        let server = ServerConfig {
            per_key_per_s: 1,
            per_key_burst: 3,
            ..ServerConfig::default()
        };
        let limits = CallerLimits::from_config(&server).expect("configured");
        for _ in 0..3 {
            assert!(limits.check(Some("a"), None).is_ok());
        }
        let (who, ms) = limits.check(Some("a"), None).unwrap_err();
        assert_eq!(who, "this API key");
        assert!((1..=1_000).contains(&ms), "{ms}");
        assert!(limits.check(Some("b"), None).is_ok());
        assert!(limits.check(None, Some("u1")).is_ok());
        assert!(CallerLimits::from_config(&ServerConfig::default()).is_none());
    }
}
