//! Coupon endpoints: batches (admin), issuance (issuer), request status and a user's coupons
//! (gateway), all reads from the coupons view.

use super::auth::{Caller, Role};
use super::error::ApiError;
use super::paging::{self, Cursor, Limits};
use super::{parse_id, read_view, view_error, AppState, ErrorBody};
use crate::clock::{parse_rfc3339, rfc3339};
use crate::domain::coupon::{BatchError, BatchSpec, IssueRequest, Outcome, Refusal};
use crate::flows::coupons::IssueError;
use crate::money::Fen;
use crate::projections::coupons::{self as view, RequestStatus};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// A user's coupons per page (`WalletCouponsQuery`).
pub const WALLET_COUPONS_PAGE: Limits = Limits {
    default: 100,
    max: 1_000,
};
/// Cursor tag of a user's coupons (position: the last coupon id sent).
const WALLET_COUPONS_CURSOR: u8 = b'w';

/// How a cluster node merges a user's coupons from every partition (each batch's partition
/// keeps the coupons it granted) into one page.
pub const WALLET_COUPONS_MERGE: paging::Merge = paging::Merge {
    key: "coupon_id",
    limits: WALLET_COUPONS_PAGE,
    cursor: WALLET_COUPONS_CURSOR,
};

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct WalletCouponsQuery {
    /// Coupons per page.
    #[param(value_type = Option<u32>, default = 100, minimum = 1, maximum = 1000)]
    pub limit: Option<String>,
    /// Cursor from the previous page's `Link` header.
    pub after: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBatch {
    pub batch_id: String,
    /// Batches of one group are mutually exclusive per user (C10).
    pub group_id: Option<String>,
    /// Coupons to issue, 1 to 1,000,000,000.
    pub stock: u64,
    /// Coupons one user may get from this batch, 1 to 1,000.
    pub per_user_limit: u32,
    /// Face value in fen.
    pub value: i64,
    /// RFC 3339; issuance before it is refused (batch_closed).
    pub starts_at: Option<String>,
    /// RFC 3339; issuance at or after it is refused (batch_closed).
    pub ends_at: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BatchBody {
    pub batch_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    pub stock: u64,
    pub issued: u64,
    pub remaining: u64,
    pub per_user_limit: u32,
    pub value: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub starts_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ends_at: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IssueCoupon {
    /// The request's sequence number: one request per seq_no, a retry gets the same answer.
    pub seq_no: String,
    pub uid: String,
    pub batch_id: String,
    /// Green channel: issue now and answer the outcome.
    pub sync: Option<bool>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct IssueBody {
    pub seq_no: String,
    /// accepted | issued
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coupon_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RequestBody {
    pub seq_no: String,
    pub uid: String,
    pub batch_id: String,
    /// accepted | issued | rejected
    pub status: String,
    /// Why it was rejected: sold_out, user_limit, group_exclusive, risk_rejected, batch_closed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coupon_id: Option<String>,
    pub updated_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CouponItem {
    pub coupon_id: String,
    pub batch_id: String,
    pub value: u64,
    pub issued_at: String,
}

fn unprocessable(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
}

impl From<BatchError> for ApiError {
    fn from(e: BatchError) -> ApiError {
        let message = e.to_string();
        match e {
            BatchError::IdempotencyConflict => {
                ApiError::new(StatusCode::CONFLICT, "idempotency_conflict", message)
            }
            BatchError::Unknown => ApiError::new(StatusCode::NOT_FOUND, "unknown_batch", message),
            BatchError::InvalidStock => unprocessable("invalid_stock", message),
            BatchError::InvalidLimit => unprocessable("invalid_limit", message),
            BatchError::InvalidValue => unprocessable("invalid_amount", message),
            BatchError::InvalidWindow => unprocessable("invalid_window", message),
        }
    }
}

impl From<IssueError> for ApiError {
    fn from(e: IssueError) -> ApiError {
        let message = e.to_string();
        match e {
            IssueError::Conflict => {
                ApiError::new(StatusCode::CONFLICT, "idempotency_conflict", message)
            }
            IssueError::UnknownBatch => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_batch", message)
            }
            IssueError::Overloaded(_) => ApiError::unavailable("overloaded", "retry shortly"),
            IssueError::Unavailable(why) => {
                crate::warn_limited!(why, "coupon request unconfirmed");
                ApiError::unavailable(
                    "unavailable",
                    "the request could not be confirmed; retry with the same seq_no",
                )
            }
        }
    }
}

/// The error a refused green-channel request answers.
fn refusal(reason: Refusal) -> ApiError {
    let (status, message) = match reason {
        Refusal::SoldOut => (StatusCode::GONE, "the batch is sold out"),
        Refusal::UserLimit => (
            StatusCode::CONFLICT,
            "this user has reached the batch's limit",
        ),
        Refusal::GroupExclusive => (
            StatusCode::CONFLICT,
            "this user holds a coupon of another batch of the group",
        ),
        Refusal::RiskRejected => (StatusCode::FORBIDDEN, "refused by risk control"),
        Refusal::BatchClosed => (StatusCode::GONE, "the batch is not open for issuance"),
        Refusal::UnknownBatch => (StatusCode::NOT_FOUND, "no such coupon batch"),
    };
    ApiError::new(status, reason.as_str(), message)
}

fn time(field: &str, raw: &Option<String>) -> Result<Option<i64>, ApiError> {
    raw.as_deref()
        .map(|t| {
            parse_rfc3339(t).ok_or_else(|| {
                unprocessable(
                    "invalid_time",
                    format!("{field}: {t:?} is not an RFC 3339 time"),
                )
            })
        })
        .transpose()
}

fn batch_body(batch_id: String, summary: view::BatchSummary) -> BatchBody {
    BatchBody {
        batch_id,
        group_id: summary.group_id,
        stock: summary.stock,
        issued: summary.issued,
        remaining: summary.stock.saturating_sub(summary.issued),
        per_user_limit: summary.per_user_limit,
        value: summary.value.as_u64(),
        starts_at: summary.starts_at_ms.map(rfc3339),
        ends_at: summary.ends_at_ms.map(rfc3339),
    }
}

/// Creates a coupon batch (idempotent with the same spec).
#[utoipa::path(
    post, path = "/v1/coupon-batches", tag = "coupons", request_body = CreateBatch,
    responses(
        (status = 201, body = BatchBody),
        (status = 409, description = "idempotency_conflict: the batch id exists with another spec", body = ErrorBody),
        (status = 422, description = "invalid_stock / invalid_limit / invalid_amount / invalid_window / invalid_time", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create_batch(
    caller: Caller,
    state: web::Data<AppState>,
    body: web::Json<CreateBatch>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[Role::Admin])?;
    let body = body.into_inner();
    let batch_id = parse_id("batch_id", &body.batch_id)?;
    let group_id = body
        .group_id
        .as_deref()
        .map(|g| parse_id("group_id", g))
        .transpose()?;
    let value = Fen::parse_amount(body.value, state.config.limits.amount_fen_max)
        .map_err(|e| ApiError::invalid_amount("value", e))?;
    let spec = BatchSpec {
        group_id,
        stock: body.stock,
        per_user_limit: body.per_user_limit,
        value,
        starts_at_ms: time("starts_at", &body.starts_at)?,
        ends_at_ms: time("ends_at", &body.ends_at)?,
    };
    let info = state.coupons.create_batch(&batch_id, spec).await?;
    Ok(HttpResponse::Created().json(BatchBody {
        batch_id: batch_id.to_string(),
        group_id: info.spec.group_id.as_ref().map(|g| g.to_string()),
        stock: info.spec.stock,
        issued: info.issued,
        remaining: info.spec.stock.saturating_sub(info.issued),
        per_user_limit: info.spec.per_user_limit,
        value: info.spec.value.as_u64(),
        starts_at: info.spec.starts_at_ms.map(rfc3339),
        ends_at: info.spec.ends_at_ms.map(rfc3339),
    }))
}

/// A batch with its issued count, from the coupons view.
#[utoipa::path(
    get, path = "/v1/coupon-batches/{batch_id}", tag = "coupons",
    params(("batch_id" = String, Path)),
    responses((status = 200, body = BatchBody), (status = 404, description = "unknown_batch", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn get_batch(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[Role::Admin, Role::Issuer, Role::Gateway])?;
    let batch_id = parse_id("batch_id", &path)?;
    let tree = read_view(&state, view::NAME).await?;
    let summary = view::batch(tree, batch_id.as_str())
        .map_err(view_error)?
        .ok_or(BatchError::Unknown)?;
    Ok(HttpResponse::Ok().json(batch_body(batch_id.to_string(), summary)))
}

/// Issues a coupon (C1, C7, C8): `202 accepted` once the request is durable (issuance
/// follows through the layers); with `sync: true` (green channel) the coupon is issued at once
/// and the outcome answered. The same seq_no always gets the same answer.
#[utoipa::path(
    post, path = "/v1/coupons/issue", tag = "coupons", request_body = IssueCoupon,
    responses(
        (status = 202, description = "accepted: durable, issuance follows", body = IssueBody),
        (status = 200, description = "sync: issued", body = IssueBody),
        (status = 403, description = "sync: risk_rejected", body = ErrorBody),
        (status = 404, description = "unknown_batch", body = ErrorBody),
        (status = 409, description = "sync: user_limit / group_exclusive; idempotency_conflict: the seq_no was used with another uid or batch", body = ErrorBody),
        (status = 410, description = "sync: sold_out / batch_closed", body = ErrorBody),
        (status = 422, description = "reserved_seq_no: seq_nos starting with reward: are the coupon rewards'", body = ErrorBody),
        (status = 503, description = "unavailable / overloaded: retry with the same seq_no", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn issue(
    caller: Caller,
    state: web::Data<AppState>,
    body: web::Json<IssueCoupon>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[Role::Issuer])?;
    let body = body.into_inner();
    let request = IssueRequest {
        seq_no: parse_id("seq_no", &body.seq_no)?,
        uid: parse_id("uid", &body.uid)?,
        batch_id: parse_id("batch_id", &body.batch_id)?,
    };
    if request.seq_no.as_str().starts_with("reward:") {
        return Err(unprocessable(
            "reserved_seq_no",
            "seq_nos starting with reward: are reserved for coupon rewards",
        ));
    }
    let seq_no = request.seq_no.to_string();
    if body.sync == Some(true) {
        return match state.coupons.issue_now(request.clone()).await? {
            Outcome::Issued(n) => Ok(HttpResponse::Ok().json(IssueBody {
                seq_no,
                status: "issued".into(),
                coupon_id: Some(crate::domain::coupon::coupon_id(&request.batch_id, n)),
            })),
            Outcome::Rejected(reason) => Err(refusal(reason)),
        };
    }
    match state.coupons.submit(request).await? {
        crate::domain::coupon::Acceptance::Conflict => Err(IssueError::Conflict.into()),
        _ => Ok(HttpResponse::Accepted().json(IssueBody {
            seq_no,
            status: "accepted".into(),
            coupon_id: None,
        })),
    }
}

/// A request's status, from the coupons view.
#[utoipa::path(
    get, path = "/v1/coupons/requests/{seq_no}", tag = "coupons",
    params(("seq_no" = String, Path)),
    responses((status = 200, body = RequestBody), (status = 404, description = "unknown_request", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn get_request(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[Role::Issuer, Role::Gateway, Role::Admin])?;
    let seq_no = parse_id("seq_no", &path)?;
    let tree = read_view(&state, view::NAME).await?;
    let line = view::request(tree, seq_no.as_str())
        .map_err(view_error)?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_request",
                "no coupon request with this seq_no",
            )
        })?;
    Ok(HttpResponse::Ok().json(RequestBody {
        seq_no: seq_no.to_string(),
        uid: line.uid,
        batch_id: line.batch_id,
        status: match line.status {
            RequestStatus::Accepted => "accepted",
            RequestStatus::Issued => "issued",
            RequestStatus::Rejected => "rejected",
        }
        .into(),
        reason: line.reason,
        coupon_id: line.coupon_id,
        updated_at: rfc3339(line.at_ms),
    }))
}

/// A user's coupons by coupon id, paged, from the coupons view.
#[utoipa::path(
    get, path = "/v1/wallets/{uid}/coupons", tag = "coupons",
    params(("uid" = String, Path), WalletCouponsQuery),
    responses(
        (status = 200, body = [CouponItem],
            headers(("Link" = String, description = "RFC 8288 `<path?...&limit=N&after=CURSOR>; rel=\"next\"`, present only when more coupons follow"))),
        (status = 400, description = "invalid_id / invalid_limit / invalid_cursor", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn wallet_coupons(
    caller: Caller,
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<WalletCouponsQuery>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[Role::Gateway, Role::Admin])?;
    let uid = parse_id("uid", &path)?;
    let limit = paging::limit(query.limit.as_deref(), WALLET_COUPONS_PAGE)?;
    let after = paging::after(query.after.as_deref(), &[WALLET_COUPONS_CURSOR])?;
    let after = after.as_ref().map(Cursor::position_str).transpose()?;
    let tree = read_view(&state, view::NAME).await?;
    let coupons = view::wallet(tree, uid.as_str(), after, limit + 1)
        .map_err(view_error)?
        .into_iter()
        .map(|c| {
            (
                Cursor::new(WALLET_COUPONS_CURSOR, c.coupon_id.as_bytes()),
                c,
            )
        })
        .collect();
    let (coupons, next) = paging::cut(coupons, limit);
    let items: Vec<CouponItem> = coupons
        .into_iter()
        .map(|c| CouponItem {
            coupon_id: c.coupon_id,
            batch_id: c.batch_id,
            value: c.value.as_u64(),
            issued_at: rfc3339(c.issued_at_ms),
        })
        .collect();
    Ok(paging::respond(&req, &items, limit, next))
}
