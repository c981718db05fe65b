//! The statuses every operation can answer whatever its own rules, added to the OpenAPI
//! document in one place rather than in forty annotations (a public OpenAPI fuzzer reports any
//! status an operation answers that its document does not declare).
//!
//! From what the document already says about an operation:
//! - a path or query parameter or a request body: `400` (a malformed id, query or body: the
//!   extractors' and `parse_id`'s refusals);
//! - a request body: `413` (above `request_body_bytes_max`);
//! - security: `401` (no key or an unknown one: the `Caller` extractor runs first), `403` (a
//!   role not allowed) unless every role may call it ([`OPEN_TO_EVERY_ROLE`]), `429` (a
//!   configured per-key or per-user limit, `http::limits`), and `503` with
//!   `Retry-After` (the journal or a view unavailable or overloaded) unless it reads only
//!   in-memory state ([`MEMORY_ONLY`]).
//!
//! An operation's own description of a status is kept; only missing ones are added. Every
//! `503` and `429` gets the `Retry-After` header. `tests/api/ops.rs` calls every operation
//! without a key, with each role's key, with a malformed and an oversized body and a malformed
//! id, and fails on any answer the document does not declare.

use utoipa::openapi::header::Header;
use utoipa::openapi::path::Operation;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{ObjectBuilder, Ref, Type};
use utoipa::openapi::{Content, OpenApi, RefOr};

/// Operations every role may call (admin always may): they never answer 403.
const OPEN_TO_EVERY_ROLE: &[&str] = &["get_batch", "get_request", "reward_status"];
/// Secured operations that read only in-memory state (boards, channel settings): they never
/// reach the journal or a view, so never answer 503.
const MEMORY_ONLY: &[&str] = &["get_policy", "list_switches", "get_channel"];

/// Operations a cluster node (`serve --node-id`) serves (every one today); an operation added
/// without its cluster placement answers `501 not_in_cluster` there, and is documented so
/// (`docs/ARCHITECTURE.md`, "Cluster").
pub const CLUSTER_SERVED: &[&str] = &[
    "deposit",
    "get_wallet",
    "get_ledger",
    "cluster_view",
    "create",
    "pay",
    "claim",
    "details",
    "set_switch",
    "list_switches",
    "set_policy",
    "get_policy",
    "send_reward",
    "rain",
    "fireworks",
    "cards",
    "reward_status",
    "set_budget",
    "get_activity",
    "force_credit",
    "list_rewards",
    "bind_method",
    "list_methods",
    "withdraw",
    "get_withdrawal",
    "set_channel",
    "get_channel",
    "statement",
    "parked",
    "create_batch",
    "get_batch",
    "issue",
    "get_request",
    "wallet_coupons",
];

/// The modifier: see the module documentation.
pub struct CommonStatuses;

impl utoipa::Modify for CommonStatuses {
    fn modify(&self, openapi: &mut OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            let path_parameters = item.parameters.as_ref().is_some_and(|p| !p.is_empty());
            let business = path.starts_with("/v1/");
            for operation in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                add_common(operation, path_parameters, business);
            }
        }
    }
}

fn add_common(operation: &mut Operation, path_parameters: bool, business: bool) {
    let id = operation.operation_id.clone().unwrap_or_default();
    let secured = operation.security.as_ref().is_some_and(|s| !s.is_empty());
    let body = operation.request_body.is_some();
    let parameters =
        path_parameters || operation.parameters.as_ref().is_some_and(|p| !p.is_empty());
    let mut add = |status: &str, description: &str| {
        operation
            .responses
            .responses
            .entry(status.to_owned())
            .or_insert_with(|| RefOr::T(error_response(description)));
    };
    if parameters || body {
        add(
            "400",
            "Malformed request: an invalid id, query parameter or JSON body (`malformed`, `invalid_id`, ...)",
        );
    }
    if body {
        add(
            "413",
            "payload_too_large: the body is above `request_body_bytes_max`",
        );
    }
    if secured {
        add(
            "401",
            "unauthorized: missing or unknown key (`Authorization: Bearer <key>`)",
        );
        if !OPEN_TO_EVERY_ROLE.contains(&id.as_str()) {
            add("403", "forbidden: this key's role may not do this");
        }
        add(
            "429",
            "rate_limited: this API key or this user's wallet is over its configured limit \
             (`[server] per_key_per_s`, `per_uid_per_s`; off by default); retry after `Retry-After`",
        );
        if !MEMORY_ONLY.contains(&id.as_str()) {
            add(
                "503",
                "unavailable / overloaded / timeout: the journal or a view cannot answer now; \
                 on a cluster node also partition_moving (the partition is changing hands) or \
                 partition_unreachable (its holder did not answer); retry after `Retry-After` \
                 (a command with the same id)",
            );
        }
    }
    if business && !CLUSTER_SERVED.contains(&id.as_str()) {
        add(
            "501",
            "not_in_cluster: a cluster node (`serve --node-id`) does not serve this endpoint \
             yet (its work crosses partitions); a single node does",
        );
    }
    for status in ["429", "503"] {
        if let Some(RefOr::T(response)) = operation.responses.responses.get_mut(status) {
            response
                .headers
                .entry("Retry-After".to_owned())
                .or_insert_with(retry_after);
        }
    }
}

fn error_response(description: &str) -> Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            Content::new(Some(Ref::from_schema_name("ErrorBody"))),
        )
        .build()
}

fn retry_after() -> Header {
    let mut header = Header::new(ObjectBuilder::new().schema_type(Type::Integer).build());
    header.description =
        Some("Seconds to wait before retrying (also `retry_after_ms` in the body)".into());
    header
}

#[cfg(test)]
mod tests {
    use super::*;
    use utoipa::OpenApi as _;

    #[test]
    fn secured_operations_with_a_body_declare_the_common_statuses() {
        // Goal: deposits (secured, path id, body) gain nothing they had and declare 400, 401,
        // 403, 413 and 503 with Retry-After; healthz (open, no input) gains nothing.
        let doc = crate::http::ApiDoc::openapi();
        let deposit = doc.paths.paths["/v1/wallets/{uid}/change/deposits"]
            .post
            .as_ref()
            .unwrap();
        for status in ["400", "401", "403", "413", "503"] {
            assert!(deposit.responses.responses.contains_key(status), "{status}");
        }
        let Some(RefOr::T(unavailable)) = deposit.responses.responses.get("503") else {
            panic!("503 inline");
        };
        assert!(unavailable.headers.contains_key("Retry-After"));
        let health = doc.paths.paths["/healthz"].get.as_ref().unwrap();
        assert_eq!(
            health.responses.responses.keys().collect::<Vec<_>>(),
            vec!["200"]
        );
    }
}
