//! The JSON error model and every mapping from internal errors to HTTP, in one place.
//!
//! Body: `{"code": "snake_case_reason", "message": "human text", ...extra}`. Statuses follow
//! API.md: 400 malformed, 401 bad key, 403 not allowed, 404 unknown, 409 conflict, 410 gone,
//! 413 too large, 422 semantically invalid, 429 throttled, 503 degraded. Bad input never
//! becomes a 500: extractor failures are mapped here too.

use crate::actors::ExecError;
use crate::domain::activity::ActivityError;
use crate::domain::wallet::WalletError;
use crate::ids::IdError;
use crate::money::AmountError;
use actix_web::http::{header, StatusCode};
use actix_web::{error::JsonPayloadError, HttpResponse, ResponseError};
use serde_json::{json, Map, Value};
use std::fmt;

/// Suggested wait before retrying after a transient failure.
const RETRY_AFTER_MS_DEFAULT: u64 = 1000;

/// The `code` of an error answer, kept with the response for the metrics
/// (`hongbao_http_errors_total`).
#[derive(Debug, Clone)]
pub struct ErrorCode(pub String);

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub extra: Map<String, Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            extra: Map::new(),
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> ApiError {
        self.extra.insert(key.to_owned(), value.into());
        self
    }

    pub fn malformed(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "malformed", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or unknown API key (Authorization: Bearer <key>)",
        )
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// A transient failure the client should retry after `retry_after_ms`.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
            .with("retry_after_ms", RETRY_AFTER_MS_DEFAULT)
    }

    pub fn invalid_id(field: &str, _: IdError) -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_id",
            format!("{field}: ids are 1-128 characters from [A-Za-z0-9_.:-]"),
        )
        .with("field", field)
    }

    pub fn invalid_amount(field: &str, e: AmountError) -> ApiError {
        let code = match e {
            AmountError::NotPositive => "invalid_amount",
            AmountError::TooLarge { .. } => "amount_too_large",
        };
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            code,
            format!("{field}: {e}"),
        )
        .with("field", field)
    }

    pub fn body(&self) -> Value {
        let mut body = Map::new();
        body.insert("code".into(), json!(self.code));
        body.insert("message".into(), json!(self.message));
        for (k, v) in &self.extra {
            body.insert(k.clone(), v.clone());
        }
        Value::Object(body)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if let Some(ms) = self.extra.get("retry_after_ms").and_then(Value::as_u64) {
            response.insert_header((header::RETRY_AFTER, ms.div_ceil(1000).max(1).to_string()));
        }
        let mut response = response.json(self.body());
        response
            .extensions_mut()
            .insert(ErrorCode(self.code.to_owned()));
        response
    }
}

impl From<WalletError> for ApiError {
    fn from(e: WalletError) -> ApiError {
        let message = e.to_string();
        match e {
            WalletError::IdempotencyConflict { order_id } => {
                ApiError::new(StatusCode::CONFLICT, "idempotency_conflict", message)
                    .with("order_id", order_id.to_string())
            }
            WalletError::InsufficientBalance {
                account,
                balance,
                requested,
            } => ApiError::new(StatusCode::CONFLICT, "insufficient_balance", message)
                .with("account", account.as_str())
                .with("balance", balance.as_u64())
                .with("requested", requested.as_u64()),
            WalletError::Overflow => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "balance_overflow",
                message,
            ),
            WalletError::ZeroAmount => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_amount", message)
            }
            WalletError::DebitBarred { order_id } => {
                ApiError::new(StatusCode::CONFLICT, "debit_barred", message)
                    .with("order_id", order_id.to_string())
            }
            WalletError::NoSuchDebit { order_id } => {
                ApiError::new(StatusCode::CONFLICT, "no_such_debit", message)
                    .with("order_id", order_id.to_string())
            }
            WalletError::WrongEntry { .. } => {
                crate::error_limited!(error = %message, "a handler sent a misdirected wallet command");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                )
            }
        }
    }
}

impl From<ActivityError> for ApiError {
    fn from(e: ActivityError) -> ApiError {
        let message = e.to_string();
        match e {
            ActivityError::IdempotencyConflict { order_id } => {
                ApiError::new(StatusCode::CONFLICT, "idempotency_conflict", message)
                    .with("order_id", order_id.to_string())
            }
            ActivityError::BudgetExhausted {
                kind,
                remaining,
                requested,
            } => ApiError::new(StatusCode::CONFLICT, "budget_exhausted", message)
                .with("kind", kind.as_str())
                .with("remaining", remaining.as_u64())
                .with("requested", requested.as_u64()),
            ActivityError::BudgetNotSet => {
                ApiError::new(StatusCode::CONFLICT, "budget_not_set", message)
            }
            ActivityError::BudgetBelowAccepted {
                kind,
                accepted,
                requested,
            } => ApiError::new(StatusCode::CONFLICT, "budget_below_accepted", message)
                .with("kind", kind.as_str())
                .with("accepted", accepted.as_u64())
                .with("requested", requested.as_u64()),
            ActivityError::UnknownOrder { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_order", message)
            }
            ActivityError::WrongState { .. } => {
                ApiError::new(StatusCode::CONFLICT, "wrong_state", message)
            }
            ActivityError::Overflow => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "amount_overflow", message)
            }
            ActivityError::ZeroAmount => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_amount", message)
            }
            // Slice protocol answers never reach a client as such: the intake turns a short
            // slice into a refill or `budget_exhausted`. Should one escape, it is a retry.
            ActivityError::SliceShort { .. } | ActivityError::SliceMismatch { .. } => {
                crate::error_limited!(error = %message, "a slice answer reached the HTTP layer");
                ApiError::unavailable("unavailable", message)
            }
            ActivityError::NotMoney { .. } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_kind", message)
            }
        }
    }
}

impl<E: Into<ApiError>> From<ExecError<E>> for ApiError {
    fn from(e: ExecError<E>) -> ApiError {
        match e {
            ExecError::Rejected(e) => e.into(),
            ExecError::Unavailable(why) => {
                crate::warn_limited!(why, "command outcome unknown");
                ApiError::unavailable(
                    "unavailable",
                    "the command could not be confirmed; retry with the same id",
                )
            }
            ExecError::Overloaded => {
                ApiError::unavailable("overloaded", "the journal is saturated; retry shortly")
            }
            ExecError::Timeout => ApiError::unavailable(
                "timeout",
                "the command was not confirmed in time; retry with the same id",
            ),
        }
    }
}

/// Maps JSON extractor failures: 413 for an oversized body, 400 for everything else.
pub fn json_error(e: JsonPayloadError) -> ApiError {
    match e {
        JsonPayloadError::Overflow { limit }
        | JsonPayloadError::OverflowKnownLength { limit, .. } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request bodies are limited to {limit} bytes"),
        )
        .with("limit_bytes", limit as u64),
        JsonPayloadError::Deserialize(e) => ApiError::malformed(format!("invalid JSON body: {e}")),
        JsonPayloadError::ContentType => {
            ApiError::malformed("the body must be JSON (Content-Type: application/json)")
        }
        other => ApiError::malformed(format!("unreadable body: {other}")),
    }
}
