//! Reward endpoints: intake (issuer), scenario shortcuts (R7), status, budgets (admin),
//! force-credit and the user's reward list (gateway).

use super::auth::{Caller, Role};
use super::error::ApiError;
use super::{parse_id, read_view, view_error, AppState, ErrorBody};
use crate::clock::rfc3339;
use crate::domain::activity::{
    ActivityCommand, ActivityReply, Budgets, Reward, RewardClaim, RewardKind, EXT_FIELDS_MAX,
    EXT_KEY_CHARS_MAX, EXT_VALUE_CHARS_MAX,
};
use crate::domain::wallet::{Entry, EntryQuestion, PendingNote, Recorded, WalletCommand};
use crate::ids::Id;
use crate::money::Fen;
use crate::projections::rewards as view;
use crate::projections::wallet as wallet_view;
use actix_web::{web, HttpResponse};
use futures::future::join_all;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

/// Tokens one force-credit call may present.
pub const FORCE_CREDIT_TOKENS_MAX: usize = 100;
/// Pending rewards shown on the wallet page, and rewards listed per call.
pub const REWARD_LIST_ITEMS_MAX: usize = 100;
/// Rewards per page of the reward list (`ListQuery`).
pub const REWARD_LIST_PAGE: super::paging::Limits = super::paging::Limits {
    default: REWARD_LIST_ITEMS_MAX,
    max: REWARD_LIST_ITEMS_MAX,
};
/// Cursor tags of the reward list, which is pending rewards then credited ones: a position in
/// the pending part (activity, `0x00`, order id) or in the credited part (the ledger sequence,
/// 8 bytes big-endian).
const REWARDS_PENDING_CURSOR: u8 = b'p';
const REWARDS_CREDITED_CURSOR: u8 = b'l';

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RewardRequest {
    /// Globally unique; the idempotency key.
    #[schema(example = "rain:cny2026:3:u42")]
    pub order_id: String,
    pub uid: String,
    pub activity_id: String,
    pub scene: String,
    /// cash | subsidy | coupon | item
    #[schema(example = "cash")]
    pub kind: String,
    /// Fen for cash and subsidy; a count for coupon and item.
    pub amount: i64,
    pub device_id: Option<String>,
    pub app_id: Option<String>,
    /// Required for coupon rewards.
    pub batch_id: Option<String>,
    /// Free-form fields kept with the reward (at most 16).
    pub ext: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShortcutRequest {
    pub uid: String,
    pub amount: i64,
    /// Default cash.
    pub kind: Option<String>,
    pub device_id: Option<String>,
    pub app_id: Option<String>,
    pub ext: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RewardAccepted {
    pub order_id: String,
    /// Present it to force-credit the reward (URL-safe).
    pub token: String,
    /// Always `accepted`.
    pub status: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RewardStatusBody {
    pub order_id: String,
    pub activity_id: String,
    pub uid: String,
    pub kind: String,
    pub amount: u64,
    /// accepted (pending) | credited (cash, subsidy) | delivered (coupon, item) | failed
    /// (coupon refused: see `reason`) | voided
    #[schema(example = "delivered")]
    pub status: String,
    pub accepted_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub voided_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_at: Option<String>,
    /// Why a failed reward failed: sold_out, user_limit, group_exclusive, risk_rejected,
    /// batch_closed or unknown_batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Other activities that accepted the same order id (a contract violation by the caller).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub also_in: Vec<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetRequest {
    /// Total cash budget in fen.
    pub cash: u64,
    /// Total subsidy budget in fen.
    pub subsidy: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MoneyPair {
    pub cash: u64,
    pub subsidy: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ActivityBody {
    pub activity_id: String,
    /// Null while no budget is set (unlimited unless budgets are required).
    pub budget: Option<MoneyPair>,
    pub accepted: MoneyPair,
    pub remaining: Option<MoneyPair>,
    /// Rewards accepted (all kinds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewards: Option<u64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForceCreditRequest {
    /// Reward tokens (1-100) as returned at acceptance.
    pub tokens: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Refusal {
    pub order_id: String,
    pub code: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ForceCreditResponse {
    /// Credited by this call.
    pub credited: Vec<String>,
    /// Credited before (by the lane or an earlier call).
    pub already: Vec<String>,
    /// Coupon and item tokens: nothing to credit to a balance.
    pub skipped: Vec<String>,
    /// Not credited: the order id was credited from another activity.
    pub refused: Vec<Refusal>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserReward {
    pub order_id: String,
    pub activity_id: String,
    pub kind: String,
    pub amount: u64,
    /// accepted (pending) | credited | used (a subsidy that paid a B2C packet: not spendable)
    pub status: String,
    pub token: String,
    /// For a used subsidy: the packet it paid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packet_id: Option<String>,
}

/// On a cluster node, the activity that claimed an order id, as the order-id registry's
/// partition answers the first step of `GET /v1/rewards/{order_id}` (see `cluster_status`).
pub const CLAIMED_BY_HEADER: &str = "x-hongbao-claimed-by";

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct StatusQuery {
    /// Pick the activity when an order id was reused across activities.
    pub activity_id: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// accepted (pending only) or all (default: pending, then credited money rewards).
    pub status: Option<String>,
    /// Only this kind (cash, subsidy, coupon, item): `kind=subsidy` is the subsidy list (P7).
    pub kind: Option<String>,
    /// Rewards per page.
    #[param(value_type = Option<u32>, default = 100, minimum = 1, maximum = 100)]
    pub limit: Option<String>,
    /// Cursor from the previous page's `Link` header.
    pub after: Option<String>,
}

fn optional_id(field: &str, raw: &Option<String>) -> Result<Option<Id>, ApiError> {
    raw.as_deref().map(|r| parse_id(field, r)).transpose()
}

fn parse_kind(raw: &str) -> Result<RewardKind, ApiError> {
    RewardKind::parse(raw).ok_or_else(|| {
        ApiError::new(
            actix_web::http::StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_kind",
            "kind must be cash, subsidy, coupon or item",
        )
    })
}

fn check_ext(ext: Option<BTreeMap<String, String>>) -> Result<BTreeMap<String, String>, ApiError> {
    let ext = ext.unwrap_or_default();
    let too_large = ext.len() > EXT_FIELDS_MAX
        || ext.iter().any(|(k, v)| {
            k.is_empty()
                || k.chars().count() > EXT_KEY_CHARS_MAX
                || v.chars().count() > EXT_VALUE_CHARS_MAX
        });
    if too_large {
        return Err(ApiError::new(
            actix_web::http::StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_ext",
            format!("ext holds at most {EXT_FIELDS_MAX} fields, keys of 1-{EXT_KEY_CHARS_MAX} and values of at most {EXT_VALUE_CHARS_MAX} characters"),
        ));
    }
    Ok(ext)
}

/// Accepts a validated reward through the intake flow (order id claimed, then accepted in the
/// activity) and answers 202 with its token.
async fn accept(
    state: &AppState,
    activity_id: Id,
    reward: Reward,
) -> Result<HttpResponse, ApiError> {
    let kind = reward.kind;
    // A cluster node notes the reward on the wallet (in its own partition) as pending, so the
    // wallet page keeps R6 there: its credit settles a money reward's note, the lane or the
    // coupon flow a coupon or item reward's (`WalletCommand::SettleNote`).
    let cluster = state.wallets.runtime().placement.is_some();
    let claim = RewardClaim::of(&activity_id, &reward);
    let accepted = state
        .order_claims
        .accept(
            &state.activities,
            state.slices.as_ref(),
            &activity_id,
            reward,
            state.config.rewards.require_budgets,
        )
        .await;
    match accepted {
        Ok(replayed) => {
            // Counted once, when first accepted: before the note, whose failure answers 503
            // and whose retry finds the reward accepted already (replayed).
            if !replayed {
                state
                    .metrics
                    .rewards_accepted_total
                    .with_label_values(&[kind.as_str()])
                    .inc();
            }
            if cluster {
                let note = WalletCommand::NotePending(PendingNote {
                    activity_id: claim.activity_id.clone(),
                    order_id: claim.order_id.clone(),
                    kind,
                    amount: claim.amount,
                });
                if let Err(e) = state.wallets.execute(claim.uid.as_str(), note).await {
                    return Err(ApiError::unavailable(
                        "pending_unconfirmed",
                        format!(
                            "the reward is accepted but not yet shown on the wallet ({e}); retry with the same order id"
                        ),
                    )
                    .with("retry_after_ms", 1_000u64));
                }
            }
            Ok(HttpResponse::Accepted().json(RewardAccepted {
                order_id: claim.order_id.to_string(),
                token: state.signer.sign(&claim),
                status: "accepted".into(),
            }))
        }
        Err(e) => {
            let error = ApiError::from(e);
            state
                .metrics
                .rewards_refused_total
                .with_label_values(&[error.code])
                .inc();
            Err(error)
        }
    }
}

/// Sends a reward: durable before the answer; the token binds order, uid, kind and amount.
#[utoipa::path(
    post, path = "/v1/rewards", tag = "rewards", request_body = RewardRequest,
    responses(
        (status = 202, description = "Accepted and durable; the same request again gets the same body", body = RewardAccepted),
        (status = 400, description = "Malformed body or id", body = ErrorBody),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "Not an issuer key", body = ErrorBody),
        (status = 409, description = "idempotency_conflict (the order id is already used, in any activity, with another payload) / budget_exhausted (with remaining) / budget_not_set", body = ErrorBody),
        (status = 422, description = "invalid_amount / amount_too_large / invalid_kind / batch_id_required / invalid_ext", body = ErrorBody),
        (status = 503, description = "Outcome unknown, or pending_unconfirmed on a cluster node (accepted, not yet on the wallet), or on a cluster an intake shard that may hold the budget this reward needs is changing hands: retry with the same order id", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn send_reward(
    caller: Caller,
    state: web::Data<AppState>,
    body: web::Json<RewardRequest>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[Role::Issuer])?;
    let body = body.into_inner();
    let activity_id = parse_id("activity_id", &body.activity_id)?;
    let kind = parse_kind(&body.kind)?;
    let batch_id = optional_id("batch_id", &body.batch_id)?;
    if kind == RewardKind::Coupon && batch_id.is_none() {
        return Err(ApiError::new(
            actix_web::http::StatusCode::UNPROCESSABLE_ENTITY,
            "batch_id_required",
            "a coupon reward names its batch_id",
        ));
    }
    let reward = Reward {
        order_id: parse_id("order_id", &body.order_id)?,
        uid: parse_id("uid", &body.uid)?,
        scene: parse_id("scene", &body.scene)?,
        kind,
        amount: Fen::parse_amount(body.amount, state.config.limits.amount_fen_max)
            .map_err(|e| ApiError::invalid_amount("amount", e))?,
        device_id: optional_id("device_id", &body.device_id)?,
        app_id: optional_id("app_id", &body.app_id)?,
        batch_id,
        ext: check_ext(body.ext)?,
    };
    accept(&state, activity_id, reward).await
}

/// Builds and accepts a scenario reward whose order id is derived (R7).
async fn shortcut(
    state: &AppState,
    activity: &str,
    scene: &str,
    order_id: String,
    body: ShortcutRequest,
) -> Result<HttpResponse, ApiError> {
    let activity_id = parse_id("activity_id", activity)?;
    let kind = match &body.kind {
        Some(k) => parse_kind(k)?,
        None => RewardKind::Cash,
    };
    if kind == RewardKind::Coupon {
        return Err(ApiError::new(
            actix_web::http::StatusCode::UNPROCESSABLE_ENTITY,
            "batch_id_required",
            "coupon rewards go through POST /v1/rewards with a batch_id",
        ));
    }
    let reward = Reward {
        order_id: parse_id("order_id (derived)", &order_id)?,
        uid: parse_id("uid", &body.uid)?,
        scene: parse_id("scene", scene)?,
        kind,
        amount: Fen::parse_amount(body.amount, state.config.limits.amount_fen_max)
            .map_err(|e| ApiError::invalid_amount("amount", e))?,
        device_id: optional_id("device_id", &body.device_id)?,
        app_id: optional_id("app_id", &body.app_id)?,
        batch_id: None,
        ext: check_ext(body.ext)?,
    };
    accept(state, activity_id, reward).await
}

/// Red-packet rain: one reward per user per round; order id `rain:<activity>:<round>:<uid>`.
#[utoipa::path(
    post, path = "/v1/activities/{activity_id}/rain/{round}/rewards", tag = "rewards",
    params(("activity_id" = String, Path), ("round" = String, Path)), request_body = ShortcutRequest,
    responses((status = 202, body = RewardAccepted), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn rain(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    body: web::Json<ShortcutRequest>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[Role::Issuer])?;
    let (activity, round) = path.into_inner();
    parse_id("round", &round)?;
    let order_id = format!("rain:{activity}:{round}:{}", body.uid);
    shortcut(&state, &activity, "rain", order_id, body.into_inner()).await
}

/// Fireworks show: one reward per user; order id `fireworks:<activity>:<uid>`.
#[utoipa::path(
    post, path = "/v1/activities/{activity_id}/fireworks/rewards", tag = "rewards",
    params(("activity_id" = String, Path)), request_body = ShortcutRequest,
    responses((status = 202, body = RewardAccepted), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn fireworks(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<ShortcutRequest>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[Role::Issuer])?;
    let activity = path.into_inner();
    let order_id = format!("fireworks:{activity}:{}", body.uid);
    shortcut(&state, &activity, "fireworks", order_id, body.into_inner()).await
}

/// Card collection draw: one reward per user; order id `cards:<activity>:<uid>`.
#[utoipa::path(
    post, path = "/v1/activities/{activity_id}/cards/rewards", tag = "rewards",
    params(("activity_id" = String, Path)), request_body = ShortcutRequest,
    responses((status = 202, body = RewardAccepted), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn cards(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<ShortcutRequest>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[Role::Issuer])?;
    let activity = path.into_inner();
    let order_id = format!("cards:{activity}:{}", body.uid);
    shortcut(&state, &activity, "cards", order_id, body.into_inner()).await
}

/// A reward's status: accepted while pending; then credited (cash, subsidy), delivered (a
/// coupon issued, an item handed over) or failed (a coupon refused, with its reason); or voided.
#[utoipa::path(
    get, path = "/v1/rewards/{order_id}", tag = "rewards",
    params(("order_id" = String, Path), StatusQuery),
    responses(
        (status = 200, description = "status: accepted | credited | delivered | failed | voided", body = RewardStatusBody),
        (status = 404, description = "unknown_order", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn reward_status(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<StatusQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[Role::Issuer, Role::Gateway])?;
    let order_id = parse_id("order_id", &path)?;
    if state.wallets.runtime().placement.is_some() {
        let activity = query
            .activity_id
            .as_deref()
            .map(|a| parse_id("activity_id", a))
            .transpose()?;
        return cluster_status(&state, order_id, activity).await;
    }
    let tree = read_view(&state, view::NAME).await?;
    let wallets = read_view(&state, wallet_view::NAME).await?;
    let mut records = view::by_order(tree, order_id.as_str()).map_err(view_error)?;
    records.sort_by_key(|row| row.record.accepted_seq);
    let chosen = match &query.activity_id {
        Some(a) => records.iter().position(|row| &row.record.activity_id == a),
        None => (!records.is_empty()).then_some(0),
    };
    let Some(index) = chosen else {
        return Err(unknown_order(&order_id));
    };
    let view::RewardRow {
        record,
        voided_at,
        failed,
        ..
    } = records.remove(index);
    // Pending lives in the wallet view, which settles it atomically with the credit.
    let pending = wallet_view::record(wallets, record.reward.uid.as_str())
        .map_err(view_error)?
        .pending
        .iter()
        .any(|p| p.order_id == order_id.as_str() && p.activity_id == record.activity_id);
    // Not pending means settled; how (failed, voided) is in the rewards view, which commits
    // apart from the wallet view and may be a batch behind it. Let it reach what the wallet view
    // showed, then read the row again: a failure is never reported as a delivery.
    let (voided_at, failed) = if !pending && voided_at.is_none() && failed.is_none() {
        let seen = crate::projections::checkpoint(wallets).map_err(view_error)?;
        let wait = std::time::Duration::from_millis(state.config.server.read_wait_ms);
        state.projections.wait_for(view::NAME, seen, wait).await;
        view::by_order(tree, order_id.as_str())
            .map_err(view_error)?
            .into_iter()
            .find(|row| row.record.activity_id == record.activity_id)
            .map_or((voided_at, failed), |row| (row.voided_at, row.failed))
    } else {
        (voided_at, failed)
    };
    let status = match (voided_at, failed, pending) {
        (Some(_), _, _) => "voided",
        (None, Some(_), _) => "failed",
        (None, None, true) => "accepted",
        // Settled without a failure: money is credited, coupons and items are delivered.
        (None, None, false) if record.reward.kind.wallet_entry().is_some() => "credited",
        (None, None, false) => "delivered",
    };
    let also_in = records.into_iter().map(|row| row.record.activity_id);
    Ok(status_body(
        record,
        status,
        voided_at,
        failed,
        also_in.collect(),
    ))
}

fn unknown_order(order_id: &Id) -> ApiError {
    ApiError::new(
        actix_web::http::StatusCode::NOT_FOUND,
        "unknown_order",
        format!("no reward with order id {order_id}"),
    )
}

/// On a cluster node, `GET /v1/rewards/{order_id}` is answered in the two steps its
/// dispatcher makes (`cluster::node`, `Place::RewardStatus`). Without `activity_id`: in the
/// partition of the order id's registry shard, which activity claimed it (header
/// [`CLAIMED_BY_HEADER`]; the dispatcher then asks again with it). With it: in the partition
/// of the reward's intake shard, from its rewards view, and whether it is credited from the
/// wallet itself (the wallet's actor, in the wallet's partition: its record of the credit is
/// the fact, where a pending note may never have been made).
async fn cluster_status(
    state: &AppState,
    order_id: Id,
    activity: Option<Id>,
) -> Result<HttpResponse, ApiError> {
    let tree = read_view(state, view::NAME).await?;
    let Some(activity) = activity else {
        let claimed = view::claimed_by(tree, order_id.as_str()).map_err(view_error)?;
        let activity = claimed.ok_or_else(|| unknown_order(&order_id))?;
        return Ok(HttpResponse::Ok()
            .insert_header((CLAIMED_BY_HEADER, activity.clone()))
            .json(serde_json::json!({ "activity_id": activity })));
    };
    let view::RewardRow {
        record,
        voided_at,
        failed,
        delivered_at,
    } = view::by_order(tree, order_id.as_str())
        .map_err(view_error)?
        .into_iter()
        .find(|row| row.record.activity_id == activity.as_str())
        .ok_or_else(|| unknown_order(&order_id))?;
    let status = match (voided_at, failed, record.reward.kind.wallet_entry()) {
        (Some(_), _, _) => "voided",
        (None, Some(_), _) => "failed",
        (None, None, Some(entry)) => {
            // Asked of the wallet where it lives: its whole state can outgrow a message
            // between nodes (its idempotency memory grows with every movement).
            let question = EntryQuestion {
                entry,
                order_id: order_id.clone(),
            };
            let recorded: Option<Recorded> = state
                .wallets
                .ask(record.reward.uid.as_str(), &question)
                .await
                .map_err(ApiError::from)?;
            if recorded.is_some() {
                "credited"
            } else {
                "accepted"
            }
        }
        // A coupon or item reward: delivered as its activity recorded it.
        (None, None, None) if delivered_at.is_some() => "delivered",
        (None, None, None) => "accepted",
    };
    Ok(status_body(record, status, voided_at, failed, Vec::new()))
}

fn status_body(
    record: view::RewardRecord,
    status: &str,
    voided_at: Option<i64>,
    failed: Option<view::Failure>,
    also_in: Vec<String>,
) -> HttpResponse {
    HttpResponse::Ok().json(RewardStatusBody {
        order_id: record.reward.order_id.to_string(),
        activity_id: record.activity_id.clone(),
        uid: record.reward.uid.to_string(),
        kind: record.reward.kind.as_str().into(),
        amount: record.reward.amount.as_u64(),
        status: status.into(),
        accepted_at: rfc3339(record.accepted_at_ms),
        voided_at: voided_at.map(rfc3339),
        failed_at: failed.map(|f| rfc3339(f.at_ms)),
        reason: failed.map(|f| f.reason.as_str().to_owned()),
        also_in,
    })
}

fn pair(b: Budgets) -> MoneyPair {
    MoneyPair {
        cash: b.cash.as_u64(),
        subsidy: b.subsidy.as_u64(),
    }
}

fn remaining(budget: Budgets, accepted: Budgets) -> MoneyPair {
    MoneyPair {
        cash: budget
            .cash
            .checked_sub(accepted.cash)
            .unwrap_or(Fen::ZERO)
            .as_u64(),
        subsidy: budget
            .subsidy
            .checked_sub(accepted.subsidy)
            .unwrap_or(Fen::ZERO)
            .as_u64(),
    }
}

/// Sets an activity's budget totals; raising is allowed, lowering below what is accepted is 409.
#[utoipa::path(
    put, path = "/v1/admin/activities/{activity_id}/budget", tag = "rewards",
    params(("activity_id" = String, Path)), request_body = BudgetRequest,
    responses((status = 200, body = ActivityBody), (status = 409, description = "budget_below_accepted", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn set_budget(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<BudgetRequest>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[])?;
    let activity_id = parse_id("activity_id", &path)?;
    if body.cash > i64::MAX as u64 || body.subsidy > i64::MAX as u64 {
        return Err(ApiError::malformed(
            "budgets must fit in a signed 64-bit integer",
        ));
    }
    let budget = Budgets {
        cash: Fen::new(body.cash),
        subsidy: Fen::new(body.subsidy),
    };
    match state
        .activities
        .execute(activity_id.as_str(), ActivityCommand::SetBudget(budget))
        .await?
    {
        ActivityReply::Budget {
            budget: Some(budget),
            accepted,
        } => Ok(HttpResponse::Ok().json(ActivityBody {
            activity_id: activity_id.to_string(),
            budget: Some(pair(budget)),
            accepted: pair(accepted),
            remaining: Some(remaining(budget, accepted)),
            rewards: None,
        })),
        other => {
            crate::error_limited!(reply = ?other, "unexpected activity reply to SetBudget");
            Err(ApiError::unavailable(
                "unavailable",
                "unexpected reply; retry",
            ))
        }
    }
}

/// An activity's budget, accepted totals and remaining budget.
#[utoipa::path(
    get, path = "/v1/admin/activities/{activity_id}", tag = "rewards",
    params(("activity_id" = String, Path)),
    responses((status = 200, body = ActivityBody), (status = 404, description = "unknown_activity", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn get_activity(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[])?;
    let activity_id = parse_id("activity_id", &path)?;
    if let Some(slices) = &state.slices {
        // A cluster's activity is its own books and its intake shards' (in other
        // partitions): each answers from its actor, the sum is the activity's.
        let books = slices.books(&state.activities, &activity_id).await?;
        if books.budget.is_none() && books.rewards == 0 {
            return Err(ApiError::new(
                actix_web::http::StatusCode::NOT_FOUND,
                "unknown_activity",
                format!("no budget or reward for activity {activity_id}"),
            ));
        }
        return Ok(HttpResponse::Ok().json(ActivityBody {
            activity_id: activity_id.to_string(),
            budget: books.budget.map(pair),
            accepted: pair(books.accepted),
            remaining: books.budget.map(|b| remaining(b, books.accepted)),
            rewards: Some(books.rewards),
        }));
    }
    let tree = read_view(&state, view::NAME).await?;
    let Some(totals) = view::activity(tree, activity_id.as_str()).map_err(view_error)? else {
        return Err(ApiError::new(
            actix_web::http::StatusCode::NOT_FOUND,
            "unknown_activity",
            format!("no budget or reward for activity {activity_id}"),
        ));
    };
    let accepted = Budgets {
        cash: totals.accepted_cash,
        subsidy: totals.accepted_subsidy,
    };
    let budget = totals
        .budget
        .map(|(cash, subsidy)| Budgets { cash, subsidy });
    Ok(HttpResponse::Ok().json(ActivityBody {
        activity_id: activity_id.to_string(),
        budget: budget.map(pair),
        accepted: pair(accepted),
        remaining: budget.map(|b| remaining(b, accepted)),
        rewards: Some(totals.rewards),
    }))
}

/// Credits presented tokens at once (R5), idempotently with the crediting lanes.
#[utoipa::path(
    post, path = "/v1/wallets/{uid}/force-credit", tag = "wallet",
    params(("uid" = String, Path)), request_body = ForceCreditRequest,
    responses(
        (status = 200, body = ForceCreditResponse),
        (status = 401, description = "invalid_token: a token is forged, altered or malformed; nothing was credited", body = ErrorBody),
        (status = 403, description = "token_uid_mismatch: a token belongs to another user; nothing was credited", body = ErrorBody),
        (status = 422, description = "invalid_tokens: present 1 to 100 tokens", body = ErrorBody),
        (status = 503, description = "Some credits unconfirmed: retry the call (idempotent)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn force_credit(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<ForceCreditRequest>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[Role::Gateway])?;
    let uid = parse_id("uid", &path)?;
    Ok(HttpResponse::Ok().json(credit_tokens(&state, &uid, &body.tokens).await?))
}

/// Force-credits presented tokens (R5): verifies every one first (one bad token fails the
/// whole call, nothing credited), then credits them through the same wallet command the lanes
/// send. Also the first step of a withdrawal that presents tokens (W6).
pub async fn credit_tokens(
    state: &AppState,
    uid: &Id,
    tokens: &[String],
) -> Result<ForceCreditResponse, ApiError> {
    let claims = verify_tokens(state, uid, tokens)?;
    let mut response = ForceCreditResponse {
        credited: vec![],
        already: vec![],
        skipped: vec![],
        refused: vec![],
    };
    let credits = claims.iter().filter_map(|claim| {
        let command = claim.credit_command()?;
        let (wallets, uid) = (state.wallets.clone(), uid.clone());
        Some(async move { (claim, wallets.execute(uid.as_str(), command).await) })
    });
    for claim in claims.iter().filter(|c| c.credit_command().is_none()) {
        response.skipped.push(claim.order_id.to_string());
    }
    for (claim, result) in join_all(credits).await {
        let order_id = claim.order_id.to_string();
        match result {
            Ok(movement) if movement.replayed => response.already.push(order_id),
            Ok(_) => {
                state
                    .metrics
                    .rewards_credited_total
                    .with_label_values(&[claim.kind.as_str(), "force"])
                    .inc();
                response.credited.push(order_id)
            }
            Err(crate::actors::ExecError::Rejected(
                crate::domain::wallet::WalletError::IdempotencyConflict { .. },
            )) => response.refused.push(Refusal {
                order_id,
                code: "duplicate_order_id".into(),
            }),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(response)
}

/// Verifies every token before anything is credited: one bad token fails the whole call.
pub fn verify_tokens(
    state: &AppState,
    uid: &Id,
    tokens: &[String],
) -> Result<Vec<RewardClaim>, ApiError> {
    if tokens.is_empty() || tokens.len() > FORCE_CREDIT_TOKENS_MAX {
        return Err(ApiError::new(
            actix_web::http::StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_tokens",
            format!("present 1 to {FORCE_CREDIT_TOKENS_MAX} tokens"),
        ));
    }
    let mut claims = Vec::with_capacity(tokens.len());
    for (i, token) in tokens.iter().enumerate() {
        let claim = state.signer.verify(token).map_err(|e| {
            state
                .metrics
                .reward_tokens_refused_total
                .with_label_values(&[e.reason()])
                .inc();
            ApiError::new(
                actix_web::http::StatusCode::UNAUTHORIZED,
                "invalid_token",
                format!("token {i}: {e}"),
            )
            .with("index", i as u64)
        })?;
        if &claim.uid != uid {
            state
                .metrics
                .reward_tokens_refused_total
                .with_label_values(&["other_uid"])
                .inc();
            return Err(ApiError::new(
                actix_web::http::StatusCode::FORBIDDEN,
                "token_uid_mismatch",
                format!("token {i} belongs to another user"),
            )
            .with("index", i as u64));
        }
        claims.push(claim);
    }
    Ok(claims)
}

/// The user's rewards with their tokens (R2): pending ones (by activity and order id), then
/// credited money rewards (latest first), paged; a spent subsidy is `used` (P7).
#[utoipa::path(
    get, path = "/v1/wallets/{uid}/rewards", tag = "wallet",
    params(("uid" = String, Path), ListQuery),
    responses(
        (status = 200, body = [UserReward],
            headers(("Link" = String, description = "RFC 8288 `<path?...&limit=N&after=CURSOR>; rel=\"next\"`, present only when more rewards follow"))),
        (status = 400, description = "invalid_id / malformed (status) / invalid_limit / invalid_cursor", body = ErrorBody),
        (status = 422, description = "invalid_kind", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_rewards(
    caller: Caller,
    state: web::Data<AppState>,
    req: actix_web::HttpRequest,
    path: web::Path<String>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    use super::paging::{self, Cursor};
    caller.require(&[Role::Gateway])?;
    let uid = parse_id("uid", &path)?;
    let limit = paging::limit(query.limit.as_deref(), REWARD_LIST_PAGE)?;
    let after = paging::after(
        query.after.as_deref(),
        &[REWARDS_PENDING_CURSOR, REWARDS_CREDITED_CURSOR],
    )?;
    // A cursor in the credited part: the ledger sequence of the last reward sent.
    let credited_before = match &after {
        Some(c) if c.tag == REWARDS_CREDITED_CURSOR => Some(u64::from_be_bytes(
            c.position
                .as_slice()
                .try_into()
                .map_err(|_| paging::invalid_cursor())?,
        )),
        _ => None,
    };
    let only_pending = match query.status.as_deref() {
        None | Some("all") => false,
        Some("accepted") => true,
        Some(_) => return Err(ApiError::malformed("status must be accepted or all")),
    };
    let kind_filter = query.kind.as_deref().map(parse_kind).transpose()?;
    let wallets = read_view(&state, wallet_view::NAME).await?;
    let token = |activity: &str,
                 order: &str,
                 kind: RewardKind,
                 amount: Fen,
                 status: &str|
     -> Option<UserReward> {
        let claim = RewardClaim {
            activity_id: Id::parse(activity).ok()?,
            order_id: Id::parse(order).ok()?,
            uid: uid.clone(),
            kind,
            amount,
        };
        Some(UserReward {
            token: state.signer.sign(&claim),
            order_id: order.to_owned(),
            activity_id: activity.to_owned(),
            kind: kind.as_str().into(),
            amount: amount.as_u64(),
            status: status.into(),
            packet_id: None,
        })
    };
    // Pending rewards first, then credited money rewards from the ledger: both from the wallet
    // view. The pending part is read before the credited part, so a reward credited meanwhile
    // shows in one or both, never in neither.
    // With the `token_merge` switch off (the token source degraded, P7/P9), only what is
    // credited is listed.
    let merge = state.switches.with(|s| s.is_on("token_merge"));
    let wanted = |kind: RewardKind| kind_filter.is_none_or(|k| k == kind);
    let read_items_max = state.config.limits.page_items_max.max(1);
    // One reward more than the page tells whether another page follows.
    let mut items: Vec<(Cursor, UserReward)> = Vec::new();
    if merge && credited_before.is_none() {
        let mut from = after.map(|c| c.position);
        'pending: loop {
            let batch =
                wallet_view::pending_after(wallets, uid.as_str(), from.as_deref(), read_items_max)
                    .map_err(view_error)?;
            let exhausted = batch.len() < read_items_max;
            for (position, p) in batch {
                from = Some(position.clone());
                if !wanted(p.kind) {
                    continue;
                }
                if let Some(reward) =
                    token(&p.activity_id, &p.order_id, p.kind, p.amount, "accepted")
                {
                    items.push((Cursor::new(REWARDS_PENDING_CURSOR, position), reward));
                    if items.len() > limit {
                        break 'pending;
                    }
                }
            }
            if exhausted {
                break;
            }
        }
    }
    if !only_pending && items.len() <= limit {
        let mut before = credited_before;
        'pages: loop {
            let page = wallet_view::ledger(wallets, uid.as_str(), before, read_items_max)
                .map_err(view_error)?;
            let Some(last) = page.last() else { break };
            before = Some(last.seq);
            for line in page {
                let kind = match line.entry {
                    Entry::Reward => RewardKind::Cash,
                    Entry::SubsidyReward => RewardKind::Subsidy,
                    _ => continue,
                };
                if !wanted(kind) {
                    continue;
                }
                let Some(activity) = &line.source else {
                    continue;
                };
                // A subsidy that paid a B2C packet is spent (P7): a point lookup, since the
                // debit may be far from the credit in the ledger.
                let used_by = match kind {
                    RewardKind::Subsidy => {
                        wallet_view::subsidy_used_by(wallets, uid.as_str(), &line.order_id)
                            .map_err(view_error)?
                    }
                    _ => None,
                };
                let status = if used_by.is_some() {
                    "used"
                } else {
                    "credited"
                };
                if let Some(mut reward) = token(activity, &line.order_id, kind, line.amount, status)
                {
                    reward.packet_id = used_by;
                    let position = line.seq.to_be_bytes();
                    items.push((Cursor::new(REWARDS_CREDITED_CURSOR, position), reward));
                    if items.len() > limit {
                        break 'pages;
                    }
                }
            }
        }
    }
    let (list, next) = paging::cut(items, limit);
    Ok(paging::respond(&req, &list, limit, next))
}
