//! Withdrawal endpoints: payout methods and withdrawals (gateway), the withdrawal policy, the
//! payment channels and the dead-letter listing (admin).

use super::auth::{Caller, Operator, Role};
use super::error::ApiError;
use super::paging::{self, Cursor, Limits};
use super::{parse_id, read_view, view_error, AppState, ErrorBody};
use crate::channels::{ChannelSettings, RecordStatus};
use crate::clock::{parse_rfc3339, rfc3339};
use crate::domain::withdrawal::{
    BindMethod, Channel, Gate, OrderState, PayeeError, PolicyError, SetPolicy, Stage,
    StagedOpening, Window, WithdrawalError, WithdrawalOrder, WithdrawalPolicy, WithdrawalRequest,
};
use crate::ids::Id;
use crate::money::Fen;
use crate::projections::withdrawals as view;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Statement lines per page (`limit`): a default and a maximum (also in the OpenAPI
/// document, `StatementQuery`). The whole statement is one `Accept: application/x-ndjson`
/// request away.
pub const STATEMENT_PAGE: Limits = Limits {
    default: 1_000,
    max: 10_000,
};
/// Statement lines read and sent per chunk of the JSON-lines stream: memory stays one chunk
/// whatever the statement's size.
const STATEMENT_STREAM_CHUNK_LINES: usize = 1_000;
/// Cursor tag of the statement (position: the last order id sent).
const STATEMENT_CURSOR: u8 = b's';
/// Parked payouts per page (`ParkedQuery`).
pub const PARKED_PAGE: Limits = Limits {
    default: 100,
    max: 1_000,
};
/// Cursor tag of the parked listing (position: the last order id sent).
pub const PARKED_CURSOR: u8 = b'd';
/// The media type of the whole statement as JSON lines.
const NDJSON: &str = "application/x-ndjson";

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MethodRequest {
    /// bank | alipay | change
    pub kind: String,
    /// Card number, Alipay login, ... (1-64 characters).
    pub account: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MethodBody {
    pub method_id: String,
    pub kind: String,
    pub account: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WithdrawalBody {
    /// Idempotency key.
    pub order_id: String,
    /// Fen, at least the policy's minimum (default 100).
    pub amount: i64,
    pub method_id: String,
    /// Reward tokens credited first (W6); a bad token fails the withdrawal.
    pub tokens: Option<Vec<String>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WithdrawalAccepted {
    pub order_id: String,
    /// Always `processing`: the payout is asynchronous.
    pub status: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryItem {
    pub state: String,
    pub at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WithdrawalStatus {
    pub order_id: String,
    pub uid: String,
    pub amount: u64,
    pub method_id: String,
    pub channel: String,
    /// pending_debit | pending_payout | paying | succeeded | failed | refunded
    pub state: String,
    pub attempts: u32,
    pub history: Vec<HistoryItem>,
    /// The last failure, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// Parked in the dead-letter set after the last attempt.
    pub parked: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WindowBody {
    /// RFC 3339.
    pub from: String,
    pub to: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StageBody {
    /// RFC 3339: from this time, users whose bucket is below `open_below` may withdraw.
    pub at: String,
    pub open_below: u64,
}

/// A staged opening, in one of two forms: an explicit `schedule`, or `starts_at` and
/// `interval_s` (bucket k opens at `starts_at + k x interval_s`; expanded into a schedule).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StagedBody {
    /// Users are bucketed by `uid mod modulo` (numeric uids) or a stable hash.
    pub modulo: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Vec<StageBody>>,
    /// RFC 3339: when bucket 0 opens (with `interval_s`, instead of `schedule`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starts_at: Option<String>,
    /// Seconds between one bucket's opening and the next's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_s: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyBody {
    pub min_amount: u64,
    #[serde(default)]
    pub closed_windows: Vec<WindowBody>,
    pub staged_opening: Option<StagedBody>,
}

/// Who set a policy (or a switch): the key's role and a short id of the key.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChangedByBody {
    /// admin | issuer | gateway
    pub role: String,
    /// The first 8 hex digits of the key's SHA-256.
    pub key_id: String,
    pub at: String,
}

/// The policy in force and who set it (`null`: the default, or set before changes were
/// attributed).
#[derive(Debug, Serialize, ToSchema)]
pub struct PolicyView {
    #[serde(flatten)]
    pub policy: PolicyBody,
    pub changed_by: Option<ChangedByBody>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChannelBody {
    pub rate_per_s: u32,
    pub latency_ms: u64,
    /// Fraction 0..1.
    pub fail_rate: f64,
    /// Fraction 0..1 (half of the timeouts did pay: resolve by query).
    pub timeout_rate: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StatementItem {
    pub order_id: String,
    pub amount: u64,
    /// succeeded | failed
    pub status: String,
    pub at: String,
    /// Payment calls received for the order (idempotent repeats included).
    pub calls: u32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ParkedItem {
    pub order_id: String,
    pub uid: String,
    pub amount: u64,
    pub channel: String,
    pub state: String,
    pub attempts: u32,
    pub failure: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct StatementQuery {
    /// Lines per page (JSON; the JSON-lines form sends every line and ignores it).
    #[param(value_type = Option<u32>, default = 1000, minimum = 1, maximum = 10000)]
    pub limit: Option<String>,
    /// Cursor from the previous page's `Link` header (also resumes a JSON-lines download).
    pub after: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ParkedQuery {
    /// Orders per page.
    #[param(value_type = Option<u32>, default = 100, minimum = 1, maximum = 1000)]
    pub limit: Option<String>,
    /// Cursor from the previous page's `Link` header.
    pub after: Option<String>,
}

fn unprocessable(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
}

fn parse_channel(field: &str, raw: &str) -> Result<Channel, ApiError> {
    Channel::parse(raw).ok_or_else(|| {
        unprocessable(
            "invalid_kind",
            format!("{field} must be bank, alipay or change"),
        )
    })
}

fn channel_path(raw: &str) -> Result<Channel, ApiError> {
    Channel::parse(raw).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_channel",
            format!("no channel {raw}; channels are bank, alipay, change"),
        )
    })
}

impl From<WithdrawalError> for ApiError {
    fn from(e: WithdrawalError) -> ApiError {
        match e {
            WithdrawalError::IdempotencyConflict => ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_conflict",
                "order id already used with another payload",
            ),
            WithdrawalError::Unknown => ApiError::not_found("no withdrawal with this order id"),
            other => ApiError::new(StatusCode::CONFLICT, "wrong_state", other.to_string()),
        }
    }
}

impl From<PayeeError> for ApiError {
    fn from(e: PayeeError) -> ApiError {
        match e {
            PayeeError::InvalidAccount => unprocessable("invalid_account", e.to_string()),
            PayeeError::TooMany => {
                ApiError::new(StatusCode::CONFLICT, "too_many_methods", e.to_string())
            }
        }
    }
}

impl From<PolicyError> for ApiError {
    fn from(e: PolicyError) -> ApiError {
        unprocessable("invalid_policy", e.0)
    }
}

fn method_body(method: &crate::domain::withdrawal::PayoutMethod) -> MethodBody {
    MethodBody {
        method_id: method.method_id.to_string(),
        kind: method.channel.as_str().into(),
        account: method.account.clone(),
    }
}

/// Binds a payout method (W2); binding the same account again returns the same method.
#[utoipa::path(
    post, path = "/v1/wallets/{uid}/payout-methods", tag = "withdrawals",
    params(("uid" = String, Path)), request_body = MethodRequest,
    responses((status = 201, body = MethodBody), (status = 409, description = "too_many_methods", body = ErrorBody), (status = 422, description = "invalid_kind / invalid_account", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn bind_method(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<MethodRequest>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[Role::Gateway])?;
    let uid = parse_id("uid", &path)?;
    let channel = parse_channel("kind", &body.kind)?;
    let method = state
        .payees
        .execute(
            uid.as_str(),
            BindMethod {
                channel,
                account: body.account.clone(),
            },
        )
        .await?;
    Ok(HttpResponse::Created().json(method_body(&method)))
}

/// The user's payout methods.
#[utoipa::path(
    get, path = "/v1/wallets/{uid}/payout-methods", tag = "withdrawals",
    params(("uid" = String, Path)),
    responses((status = 200, body = [MethodBody])),
    security(("bearer" = []))
)]
pub async fn list_methods(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[Role::Gateway])?;
    let uid = parse_id("uid", &path)?;
    let (payee, _) = state
        .payees
        .state(uid.as_str())
        .await
        .map_err(ApiError::from)?;
    Ok(HttpResponse::Ok().json(payee.methods.iter().map(method_body).collect::<Vec<_>>()))
}

/// The answer an order gives, the first time and on every retry.
fn answer(order_id: &Id, order: &WithdrawalOrder) -> Result<HttpResponse, ApiError> {
    match order.state {
        Some(OrderState::PendingDebit) | None => Err(ApiError::unavailable(
            "unavailable",
            "the debit is not confirmed yet; retry with the same order id",
        )),
        Some(OrderState::Failed) if !order.debited => {
            let reason = order.failure.clone().unwrap_or_default();
            Err(if reason == "insufficient_balance" {
                ApiError::new(
                    StatusCode::CONFLICT,
                    "insufficient_balance",
                    "the activity balance is lower than the amount",
                )
            } else {
                ApiError::new(StatusCode::CONFLICT, "debit_refused", reason)
            })
        }
        Some(_) => Ok(HttpResponse::Accepted().json(WithdrawalAccepted {
            order_id: order_id.to_string(),
            status: "processing".into(),
        })),
    }
}

fn gate_error(gate: Gate) -> ApiError {
    match gate {
        Gate::BelowMinimum { min } => {
            unprocessable("below_minimum", format!("the minimum withdrawal is {min}"))
                .with("min_amount", min.as_u64())
        }
        Gate::WindowClosed { opens_at_ms } => ApiError::new(
            StatusCode::FORBIDDEN,
            "window_closed",
            "withdrawals are closed now",
        )
        .with("opens_at", opens_at_ms.map(rfc3339)),
        Gate::NotYetOpenForUser { opens_at_ms } => ApiError::new(
            StatusCode::FORBIDDEN,
            "not_yet_open_for_user",
            "withdrawals are opening by batches of users; this user's batch is not open yet",
        )
        .with("opens_at", opens_at_ms.map(rfc3339)),
    }
}

/// Withdraws from the activity balance (W2-W7): tokens credited first, then the policy gates,
/// then the debit; answered `processing` at once, paid asynchronously.
#[utoipa::path(
    post, path = "/v1/wallets/{uid}/withdrawals", tag = "withdrawals",
    params(("uid" = String, Path)), request_body = WithdrawalBody,
    responses(
        (status = 202, description = "Debited; the payout follows. A retry gets the same answer.", body = WithdrawalAccepted),
        (status = 401, description = "invalid_token", body = ErrorBody),
        (status = 403, description = "window_closed / not_yet_open_for_user (with opens_at) / token_uid_mismatch", body = ErrorBody),
        (status = 404, description = "unknown_method", body = ErrorBody),
        (status = 409, description = "insufficient_balance / idempotency_conflict", body = ErrorBody),
        (status = 422, description = "below_minimum / invalid_amount", body = ErrorBody),
        (status = 503, description = "Outcome unknown: retry with the same order id", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn withdraw(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<WithdrawalBody>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[Role::Gateway])?;
    let uid = parse_id("uid", &path)?;
    let order_id = parse_id("order_id", &body.order_id)?;
    let method_id = parse_id("method_id", &body.method_id)?;
    let amount = Fen::parse_amount(body.amount, state.config.limits.amount_fen_max)
        .map_err(|e| ApiError::invalid_amount("amount", e))?;
    let flows = &state.withdrawals;
    let unavailable = |e: crate::flows::withdrawals::Transient| {
        ApiError::unavailable("unavailable", e.to_string())
    };
    // A retry gets the original answer, whatever the gates say now.
    if let Some(order) = flows.order(&order_id).await.map_err(unavailable)? {
        let request = order
            .request
            .as_ref()
            .expect("existing orders have a request");
        if request.uid != uid || request.amount != amount || request.method.method_id != method_id {
            return Err(WithdrawalError::IdempotencyConflict.into());
        }
        if order.state != Some(OrderState::PendingDebit) {
            return answer(&order_id, &order);
        }
    }
    if let Some(tokens) = body.tokens.as_deref().filter(|t| !t.is_empty()) {
        super::rewards::credit_tokens(&state, &uid, tokens).await?;
    }
    let now = flows.orders.runtime().clock.now_ms();
    state
        .policy
        .with(|p| p.policy.check(&uid, amount, now))
        .map_err(gate_error)?;
    let (payee, _) = state
        .payees
        .state(uid.as_str())
        .await
        .map_err(ApiError::from)?;
    let Some(method) = payee.method(&method_id).cloned() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_method",
            format!("no payout method {method_id} for {uid}"),
        ));
    };
    let order = flows
        .request(
            &order_id,
            WithdrawalRequest {
                uid,
                amount,
                method,
            },
        )
        .await?;
    answer(&order_id, &order)
}

/// A withdrawal's state and history.
#[utoipa::path(
    get, path = "/v1/withdrawals/{order_id}", tag = "withdrawals",
    params(("order_id" = String, Path)),
    responses((status = 200, body = WithdrawalStatus), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn get_withdrawal(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[Role::Gateway])?;
    let order_id = parse_id("order_id", &path)?;
    let order = state
        .withdrawals
        .order(&order_id)
        .await
        .map_err(|e| ApiError::unavailable("unavailable", e.to_string()))?
        .ok_or_else(|| ApiError::not_found(format!("no withdrawal {order_id}")))?;
    let request = order.request.as_ref().expect("requested");
    Ok(HttpResponse::Ok().json(WithdrawalStatus {
        order_id: order_id.to_string(),
        uid: request.uid.to_string(),
        amount: request.amount.as_u64(),
        method_id: request.method.method_id.to_string(),
        channel: request.method.channel.as_str().into(),
        state: order.state.map(|s| s.as_str()).unwrap_or("unknown").into(),
        attempts: order.attempts,
        history: order
            .history
            .iter()
            .map(|(s, at)| HistoryItem {
                state: s.as_str().into(),
                at: rfc3339(*at),
            })
            .collect(),
        failure: order.failure.clone(),
        parked: order.parked,
    }))
}

fn policy_body(policy: &WithdrawalPolicy) -> PolicyBody {
    PolicyBody {
        min_amount: policy.min_amount.as_u64(),
        closed_windows: policy
            .closed_windows
            .iter()
            .map(|w| WindowBody {
                from: rfc3339(w.from_ms),
                to: rfc3339(w.to_ms),
            })
            .collect(),
        staged_opening: policy.staged_opening.as_ref().map(|s| StagedBody {
            modulo: s.modulo,
            schedule: Some(
                s.schedule
                    .iter()
                    .map(|st| StageBody {
                        at: rfc3339(st.at_ms),
                        open_below: st.open_below,
                    })
                    .collect(),
            ),
            starts_at: None,
            interval_s: None,
        }),
    }
}

fn time(field: &str, raw: &str) -> Result<i64, ApiError> {
    parse_rfc3339(raw).ok_or_else(|| {
        unprocessable(
            "invalid_time",
            format!("{field}: {raw:?} is not an RFC 3339 time"),
        )
    })
}

/// The staged opening of a PUT body, from either form.
fn staged(body: &StagedBody) -> Result<StagedOpening, ApiError> {
    match (&body.schedule, &body.starts_at, body.interval_s) {
        (Some(schedule), None, None) => Ok(StagedOpening {
            modulo: body.modulo,
            schedule: schedule
                .iter()
                .map(|st| {
                    Ok(Stage {
                        at_ms: time("at", &st.at)?,
                        open_below: st.open_below,
                    })
                })
                .collect::<Result<Vec<_>, ApiError>>()?,
        }),
        (None, Some(starts_at), Some(interval_s)) => {
            let interval_ms = i64::try_from(interval_s)
                .ok()
                .and_then(|s| s.checked_mul(1_000))
                .ok_or_else(|| unprocessable("invalid_policy", "interval_s is too large"))?;
            Ok(StagedOpening::every(
                body.modulo,
                time("starts_at", starts_at)?,
                interval_ms,
            )?)
        }
        _ => Err(unprocessable(
            "invalid_policy",
            "staged_opening takes either schedule or both starts_at and interval_s",
        )),
    }
}

/// Replaces the withdrawal policy (W3-W5), recorded as an event.
#[utoipa::path(
    put, path = "/v1/admin/withdrawal-policy", tag = "withdrawals", request_body = PolicyBody,
    responses((status = 200, body = PolicyBody), (status = 422, description = "invalid_policy / invalid_time", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn set_policy(
    operator: Operator,
    state: web::Data<AppState>,
    body: web::Json<PolicyBody>,
) -> Result<HttpResponse, ApiError> {
    operator.caller.require(&[])?;
    if body.min_amount == 0 || body.min_amount > state.config.limits.amount_fen_max {
        return Err(unprocessable(
            "invalid_policy",
            "min_amount must be positive and at most the amount limit",
        ));
    }
    let closed_windows = body
        .closed_windows
        .iter()
        .map(|w| {
            Ok(Window {
                from_ms: time("from", &w.from)?,
                to_ms: time("to", &w.to)?,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let staged_opening = body.staged_opening.as_ref().map(staged).transpose()?;
    let policy = WithdrawalPolicy {
        min_amount: Fen::new(body.min_amount),
        closed_windows,
        staged_opening,
    };
    let policy = state
        .policy
        .execute(SetPolicy {
            policy,
            by: operator.changed_by(),
        })
        .await?;
    tracing::info!(key_id = %operator.key_id, "withdrawal policy set");
    Ok(HttpResponse::Ok().json(policy_body(&policy)))
}

/// The withdrawal policy in force, and who set it.
#[utoipa::path(get, path = "/v1/admin/withdrawal-policy", tag = "withdrawals", responses((status = 200, body = PolicyView)), security(("bearer" = [])))]
pub async fn get_policy(
    caller: Caller,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[])?;
    Ok(HttpResponse::Ok().json(state.policy.with(|p| PolicyView {
        policy: policy_body(&p.policy),
        changed_by: p.changed_by.as_ref().map(|(by, at_ms)| ChangedByBody {
            role: by.role.clone(),
            key_id: by.key_id.clone(),
            at: rfc3339(*at_ms),
        }),
    })))
}

fn channel_body(s: ChannelSettings) -> ChannelBody {
    ChannelBody {
        rate_per_s: s.rate_per_s,
        latency_ms: s.latency_ms,
        fail_rate: s.fail_rate,
        timeout_rate: s.timeout_rate,
    }
}

/// Tunes the simulated payment channel (W12) at run time.
#[utoipa::path(
    put, path = "/v1/admin/channels/{channel}", tag = "withdrawals",
    params(("channel" = String, Path, description = "bank | alipay | change")), request_body = ChannelBody,
    responses((status = 200, body = ChannelBody), (status = 404, description = "unknown_channel", body = ErrorBody), (status = 422, description = "invalid_settings", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn set_channel(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<ChannelBody>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[])?;
    let channel = channel_path(&path)?;
    let settings = ChannelSettings {
        rate_per_s: body.rate_per_s,
        latency_ms: body.latency_ms,
        fail_rate: body.fail_rate,
        timeout_rate: body.timeout_rate,
    };
    settings
        .validate()
        .map_err(|e| unprocessable("invalid_settings", e))?;
    state
        .channels
        .configure(channel, settings)
        .await
        .map_err(view_error)?;
    tracing::info!(channel = %channel, ?settings, "payment channel reconfigured");
    Ok(HttpResponse::Ok().json(channel_body(settings)))
}

/// The simulated channel's settings.
#[utoipa::path(get, path = "/v1/admin/channels/{channel}", tag = "withdrawals", params(("channel" = String, Path)),
    responses((status = 200, body = ChannelBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn get_channel(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[])?;
    let channel = channel_path(&path)?;
    let settings = state
        .channels
        .current_settings(channel)
        .await
        .map_err(view_error)?;
    Ok(HttpResponse::Ok().json(channel_body(settings)))
}

fn statement_item(line: crate::channels::StatementLine) -> StatementItem {
    StatementItem {
        order_id: line.order_id,
        amount: line.amount.as_u64(),
        status: match line.status {
            RecordStatus::Succeeded => "succeeded",
            RecordStatus::Failed => "failed",
        }
        .into(),
        at: rfc3339(line.at_ms),
        calls: line.calls,
    }
}

/// Whether the client asked for JSON lines (`Accept: application/x-ndjson`).
fn wants_ndjson(req: &HttpRequest) -> bool {
    req.headers()
        .get_all(actix_web::http::header::ACCEPT)
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|range| {
            range
                .split(';')
                .next()
                .is_some_and(|media| media.trim().eq_ignore_ascii_case(NDJSON))
        })
}

/// The channel's own record: the other side of reconciliation (W11), by order id, paged; or,
/// with `Accept: application/x-ndjson`, every line as JSON lines.
#[utoipa::path(get, path = "/v1/admin/channels/{channel}/statement", tag = "withdrawals",
    params(("channel" = String, Path), StatementQuery),
    responses(
        (status = 200, description = "A page of lines by order id (JSON array); with `Accept: application/x-ndjson`, every line from the cursor on, one JSON object per line, streamed",
            headers(("Link" = String, description = "RFC 8288 `<path?...&limit=N&after=CURSOR>; rel=\"next\"`, present only when more lines follow")),
            content(([StatementItem] = "application/json"), (StatementItem = "application/x-ndjson"))),
        (status = 400, description = "invalid_limit / invalid_cursor", body = ErrorBody),
        (status = 404, description = "unknown_channel", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn statement(
    caller: Caller,
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<StatementQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[])?;
    let channel = channel_path(&path)?;
    let limit = paging::limit(query.limit.as_deref(), STATEMENT_PAGE)?;
    let after = match paging::after(query.after.as_deref(), &[STATEMENT_CURSOR])? {
        Some(cursor) => Some(
            parse_id("after", cursor.position_str()?)
                .map_err(|_| paging::invalid_cursor())?
                .to_string(),
        ),
        None => None,
    };
    if wants_ndjson(&req) {
        return Ok(HttpResponse::Ok()
            .content_type(NDJSON)
            .streaming(statement_lines(state.channels.clone(), channel, after)));
    }
    // One line more than the page tells whether another page follows.
    let lines = state
        .channels
        .statement_after(channel, after.as_deref(), limit + 1)
        .await
        .map_err(view_error)?
        .into_iter()
        .map(|line| {
            (
                Cursor::new(STATEMENT_CURSOR, line.order_id.as_bytes()),
                line,
            )
        })
        .collect();
    let (lines, next) = paging::cut(lines, limit);
    let items: Vec<StatementItem> = lines.into_iter().map(statement_item).collect();
    Ok(paging::respond(&req, &items, limit, next))
}

/// Every statement line after `after` as JSON lines, read and sent a chunk at a time (a range
/// scan from the last order id sent), so memory stays one chunk. A read failure mid-stream
/// aborts the response: the client sees a cut transfer, never a short statement that looks
/// whole.
fn statement_lines(
    channels: std::sync::Arc<crate::channels::SimulatedChannels>,
    channel: Channel,
    after: Option<String>,
) -> impl futures::Stream<Item = Result<web::Bytes, actix_web::Error>> {
    // State: Some(cursor) while lines may remain, None once a short chunk was sent.
    futures::stream::try_unfold(Some(after), move |cursor| {
        let channels = channels.clone();
        async move {
            let Some(after) = cursor else {
                return Ok(None);
            };
            let lines = channels
                .statement_after(channel, after.as_deref(), STATEMENT_STREAM_CHUNK_LINES)
                .await
                .map_err(|e| {
                    crate::error_limited!(error = %e, %channel, "statement stream cut by a read failure");
                    actix_web::error::ErrorServiceUnavailable("statement read failed")
                })?;
            if lines.is_empty() {
                return Ok(None);
            }
            let next = (lines.len() == STATEMENT_STREAM_CHUNK_LINES)
                .then(|| lines.last().map(|l| l.order_id.clone()));
            let mut chunk = Vec::with_capacity(lines.len() * 128);
            for line in lines {
                serde_json::to_writer(&mut chunk, &statement_item(line))
                    .map_err(actix_web::error::ErrorInternalServerError)?;
                chunk.push(b'\n');
            }
            Ok(Some((web::Bytes::from(chunk), next)))
        }
    })
}

/// How a cluster node merges the parked orders of every partition into one page.
pub const PARKED_MERGE: crate::http::paging::Merge = crate::http::paging::Merge {
    key: "order_id",
    limits: PARKED_PAGE,
    cursor: PARKED_CURSOR,
};

/// Payouts parked in the dead-letter set and not settled yet, by order id, paged.
#[utoipa::path(get, path = "/v1/admin/withdrawals/parked", tag = "withdrawals", params(ParkedQuery),
    responses(
        (status = 200, body = [ParkedItem],
            headers(("Link" = String, description = "RFC 8288 `<path?...&limit=N&after=CURSOR>; rel=\"next\"`, present only when more orders follow"))),
        (status = 400, description = "invalid_limit / invalid_cursor", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn parked(
    caller: Caller,
    state: web::Data<AppState>,
    req: HttpRequest,
    query: web::Query<ParkedQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[])?;
    let limit = paging::limit(query.limit.as_deref(), PARKED_PAGE)?;
    let after = paging::after(query.after.as_deref(), &[PARKED_CURSOR])?;
    let after = after.as_ref().map(Cursor::position_str).transpose()?;
    let tree = read_view(&state, view::NAME).await?;
    let orders = view::parked(tree, after, limit + 1)
        .map_err(view_error)?
        .into_iter()
        .map(|(order_id, order)| {
            (
                Cursor::new(PARKED_CURSOR, order_id.as_bytes()),
                (order_id, order),
            )
        })
        .collect();
    let (orders, next) = paging::cut(orders, limit);
    let items: Vec<ParkedItem> = orders
        .into_iter()
        .filter_map(|(order_id, order)| {
            let request = order.request.as_ref()?;
            Some(ParkedItem {
                order_id,
                uid: request.uid.to_string(),
                amount: request.amount.as_u64(),
                channel: request.method.channel.as_str().into(),
                state: order.state.map(|s| s.as_str()).unwrap_or("unknown").into(),
                attempts: order.attempts,
                failure: order.failure.clone(),
            })
        })
        .collect();
    Ok(paging::respond(&req, &items, limit, next))
}
