//! Wallet endpoints: deposits (admin), the wallet page and its ledger (gateway).

use super::auth::{Caller, Role};
use super::error::ApiError;
use super::paging;
use super::{parse_id, read_view, view_error, AppState, ErrorBody};
use crate::clock::rfc3339;
use crate::domain::wallet::{Entry, WalletCommand};
use crate::money::Fen;
use crate::projections::wallet::{self as view, Direction, LedgerEntry};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Ledger entries shown on the wallet page.
const WALLET_PAGE_LEDGER_ITEMS: usize = 20;
/// Default page size of the ledger listing.
const LEDGER_PAGE_ITEMS_DEFAULT: usize = 50;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DepositRequest {
    /// Idempotency key of the top-up.
    #[schema(example = "topup-20261122-0001")]
    pub order_id: String,
    /// Fen, positive.
    #[schema(example = 10000, minimum = 1)]
    pub amount: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DepositResponse {
    pub order_id: String,
    /// Always `change`.
    pub account: String,
    pub amount: u64,
    /// The change balance right after this deposit (the same on every retry).
    pub balance_after: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BalancesBody {
    /// Campaign income (cash rewards), withdrawable.
    pub activity: u64,
    /// The in-app purse (top-ups, C2C packets).
    pub change: u64,
    /// Subsidies (B2C packets), not withdrawable.
    pub subsidy: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PendingBody {
    pub order_id: String,
    pub activity_id: String,
    pub kind: String,
    pub amount: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LedgerLine {
    /// Global log sequence of the movement; pass it as `before` to page.
    pub seq: u64,
    /// RFC 3339 time the movement was recorded.
    pub at: String,
    /// Why the money moved: deposit, reward, withdrawal, withdrawal_refund.
    pub entry: String,
    /// activity or change.
    pub account: String,
    /// credit or debit.
    pub direction: String,
    pub amount: u64,
    pub order_id: String,
    /// Balance of `account` after the movement.
    pub balance_after: u64,
    /// For rewards: the activity whose budget paid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activity_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WalletResponse {
    pub uid: String,
    pub balances: BalancesBody,
    /// Accepted rewards not yet credited (R6): the first 100; every one, paged:
    /// `GET /v1/wallets/{uid}/rewards?status=accepted`.
    pub pending: Vec<PendingBody>,
    /// Latest movements first.
    pub ledger: Vec<LedgerLine>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LedgerPage {
    pub uid: String,
    pub ledger: Vec<LedgerLine>,
    /// Pass as `before` for the next (older) page; absent on the last page.
    pub next_before: Option<u64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LedgerQuery {
    /// Only entries with a smaller sequence (the cursor of this list: the `Link` header
    /// carries it).
    pub before: Option<u64>,
    /// Page size (at most `limits.page_items_max`, 500 unless configured).
    #[param(value_type = Option<u32>, default = 50, minimum = 1, maximum = 500)]
    pub limit: Option<String>,
}

fn line(entry: LedgerEntry) -> LedgerLine {
    LedgerLine {
        seq: entry.seq,
        at: rfc3339(entry.at_ms),
        entry: entry.entry.as_str().to_owned(),
        account: entry.account.as_str().to_owned(),
        direction: match entry.direction {
            Direction::Credit => "credit",
            Direction::Debit => "debit",
        }
        .to_owned(),
        amount: entry.amount.as_u64(),
        order_id: entry.order_id,
        balance_after: entry.balance_after.as_u64(),
        activity_id: entry.source,
    }
}

/// Tops up a user's change balance (stands in for a real cashier top-up).
#[utoipa::path(
    post,
    path = "/v1/wallets/{uid}/change/deposits",
    tag = "wallet",
    params(("uid" = String, Path, description = "User id")),
    request_body = DepositRequest,
    responses(
        (status = 201, description = "Durable; a retry with the same order id gets the same body", body = DepositResponse),
        (status = 400, description = "Malformed body or id", body = ErrorBody),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 409, description = "idempotency_conflict: order id used with another amount", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "invalid_amount / amount_too_large / balance_overflow", body = ErrorBody),
        (status = 503, description = "Outcome unknown or overloaded: retry with the same order id", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn deposit(
    caller: Caller,
    state: web::Data<AppState>,
    uid: web::Path<String>,
    body: web::Json<DepositRequest>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[])?;
    let uid = parse_id("uid", &uid)?;
    let order_id = parse_id("order_id", &body.order_id)?;
    let amount = Fen::parse_amount(body.amount, state.config.limits.amount_fen_max)
        .map_err(|e| ApiError::invalid_amount("amount", e))?;
    let command = WalletCommand::Credit {
        entry: Entry::Deposit,
        order_id,
        amount,
        source: None,
    };
    let movement = state.wallets.execute(uid.as_str(), command).await?;
    Ok(HttpResponse::Created().json(DepositResponse {
        order_id: movement.line.order_id.to_string(),
        account: movement.account.as_str().to_owned(),
        amount: movement.line.amount.as_u64(),
        balance_after: movement.line.balance_after.as_u64(),
    }))
}

/// The wallet page: balances, pending rewards and the latest ledger entries.
#[utoipa::path(
    get,
    path = "/v1/wallets/{uid}",
    tag = "wallet",
    params(("uid" = String, Path, description = "User id")),
    responses(
        (status = 200, description = "Balances (zero for an unknown uid), pending, latest ledger entries", body = WalletResponse),
        (status = 400, description = "Invalid uid", body = ErrorBody),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "Issuer keys may not read wallets", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_wallet(
    caller: Caller,
    state: web::Data<AppState>,
    uid: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[Role::Gateway])?;
    let uid = parse_id("uid", &uid)?;
    let tree = read_view(&state, view::NAME).await?;
    // Balances and pending rewards (R6) come from one value: a reward is either pending or
    // credited in it, never both or neither.
    let view::WalletRecord { balances, pending } =
        view::record(tree, uid.as_str()).map_err(view_error)?;
    let ledger =
        view::ledger(tree, uid.as_str(), None, WALLET_PAGE_LEDGER_ITEMS).map_err(view_error)?;
    Ok(HttpResponse::Ok().json(WalletResponse {
        uid: uid.to_string(),
        balances: BalancesBody {
            activity: balances.activity.as_u64(),
            change: balances.change.as_u64(),
            subsidy: balances.subsidy.as_u64(),
        },
        pending: pending
            .into_iter()
            .take(super::rewards::REWARD_LIST_ITEMS_MAX)
            .map(|p| PendingBody {
                order_id: p.order_id,
                activity_id: p.activity_id,
                kind: p.kind.as_str().into(),
                amount: p.amount.as_u64(),
            })
            .collect(),
        ledger: ledger.into_iter().map(line).collect(),
    }))
}

/// The ledger, latest first, paged by sequence.
#[utoipa::path(
    get,
    path = "/v1/wallets/{uid}/ledger",
    tag = "wallet",
    params(("uid" = String, Path, description = "User id"), LedgerQuery),
    responses(
        (status = 200, description = "One page of the ledger", body = LedgerPage,
            headers(("Link" = String, description = "RFC 8288 `<path?...&limit=N&before=SEQ>; rel=\"next\"`, present only when older entries follow"))),
        (status = 400, description = "Invalid uid or query (invalid_limit)", body = ErrorBody),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "Issuer keys may not read wallets", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_ledger(
    caller: Caller,
    state: web::Data<AppState>,
    req: HttpRequest,
    uid: web::Path<String>,
    query: web::Query<LedgerQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[Role::Gateway])?;
    let uid = parse_id("uid", &uid)?;
    let limits = paging::Limits {
        default: LEDGER_PAGE_ITEMS_DEFAULT.min(state.config.limits.page_items_max),
        max: state.config.limits.page_items_max,
    };
    let limit = paging::limit(query.limit.as_deref(), limits)?;
    let tree = read_view(&state, view::NAME).await?;
    // One extra entry tells whether an older page exists.
    let mut entries =
        view::ledger(tree, uid.as_str(), query.before, limit + 1).map_err(view_error)?;
    let more = entries.len() > limit;
    entries.truncate(limit);
    let next_before = if more {
        entries.last().map(|e| e.seq)
    } else {
        None
    };
    let mut response = HttpResponse::Ok();
    if let Some(before) = next_before {
        // The ledger's cursor is a sequence (`before`), kept as it was; the Link carries it.
        let link = paging::next_link(
            &req,
            &[("limit", limit.to_string()), ("before", before.to_string())],
        );
        response.insert_header((actix_web::http::header::LINK, link));
    }
    Ok(response.json(LedgerPage {
        uid: uid.to_string(),
        ledger: entries.into_iter().map(line).collect(),
        next_before,
    }))
}
