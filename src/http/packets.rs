//! Red packet endpoints (gateway): create (C2C or B2C), pay, claim with admission control,
//! details from the projection.

use super::auth::{Caller, Role};
use super::error::ApiError;
use super::{parse_id, read_view, view_error, AppState, ErrorBody};
use crate::clock::rfc3339;
use crate::domain::activity::RewardKind;
use crate::domain::packet::{
    Mode, PacketError, PacketReply, PacketSpec, PacketState, Split, Subsidy, AUDIENCE_MAX,
    LIFETIME_DEFAULT_MS, SHARES_MAX,
};
use crate::flows::packets::PacketFlowError;
use crate::ids::Id;
use crate::money::Fen;
use crate::projections::packets as view;
use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use utoipa::ToSchema;

/// Longest lifetime a packet may be given: a week.
const LIFETIME_S_MAX: u64 = 7 * 24 * 3600;
/// What a client waits before polling again when a hot packet is busy.
const BUSY_RETRY_AFTER_MS: u64 = 100;
/// Claims listed in a packet's details at most.
const CLAIMS_LISTED_MAX: usize = SHARES_MAX as usize;
/// Packets the admission gate tracks before it forgets the idle ones.
const GATES_MAX: usize = 100_000;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Audience {
    pub uids: Vec<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePacket {
    pub packet_id: String,
    pub sender_uid: String,
    /// b2c | c2c
    pub mode: String,
    /// Fen, at least 1 per share.
    pub total: i64,
    /// Shares, 1 to 10,000.
    pub count: u32,
    /// lucky (double-mean random) | even
    pub split: String,
    /// Only these users may claim.
    pub audience: Option<Audience>,
    /// Default 86,400 (24 h), at most a week.
    pub expires_in_s: Option<u64>,
    /// B2C: a subsidy reward token of the sender, for exactly `total`.
    pub subsidy_token: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PacketStateBody {
    pub packet_id: String,
    /// pending_payment | active | exhausted | expired
    pub state: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PayPacket {
    pub payment_id: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    pub uid: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClaimBody {
    pub packet_id: String,
    pub uid: String,
    pub amount: u64,
    pub remaining_count: u32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClaimItem {
    pub uid: String,
    pub amount: u64,
    pub at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PacketDetails {
    pub packet_id: String,
    pub mode: String,
    pub sender_uid: String,
    pub state: String,
    pub total: u64,
    pub count: u32,
    pub remaining_count: u32,
    pub remaining_amount: u64,
    pub claims: Vec<ClaimItem>,
    pub best_luck_uid: Option<String>,
    pub expires_at: String,
    /// What went back to the sender (or the campaign budget) at expiry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refunded: Option<u64>,
}

/// Admission control for hot packets (P5): at most `remaining x 1.5` claims in flight per
/// packet; the rest are answered 429 at once instead of queueing behind the actor. The gate
/// applies from a packet's first request: that request looks the packet's remaining shares up
/// (the others wait for it), and every answer keeps the figure current.
#[derive(Default)]
pub struct ClaimGate {
    packets: DashMap<String, Arc<GateEntry>>,
    /// Most claims ever admitted in flight at once on one packet.
    peak: AtomicU32,
}

#[derive(Default)]
struct GateEntry {
    in_flight: AtomicU32,
    /// Shares left as of the lookup or the last answer.
    remaining: AtomicU32,
    /// Set once `remaining` is known for an active packet.
    known: tokio::sync::OnceCell<()>,
}

/// A claim admitted through the gate; leaving releases its slot.
struct Admitted(Arc<GateEntry>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Claims a packet with `remaining` shares left may have in flight: `ceil(remaining x 1.5)`.
/// An empty packet answers fast without writing (and must still answer a winner's repeat with
/// its share): no limit; so does an unpaid or unknown one.
fn in_flight_max(remaining: u32) -> u32 {
    if remaining == 0 {
        u32::MAX
    } else {
        (remaining as u64 * 3).div_ceil(2).min(u32::MAX as u64) as u32
    }
}

impl ClaimGate {
    async fn admit(&self, state: &AppState, packet_id: &Id) -> Option<Admitted> {
        if self.packets.len() > GATES_MAX {
            self.packets
                .retain(|_, e| e.in_flight.load(Ordering::Acquire) > 0);
        }
        let entry = self
            .packets
            .entry(packet_id.to_string())
            .or_default()
            .clone();
        // The first request of an active packet looks up its shares; the others wait for it.
        // A packet not active yet is looked up again next time (it may be paid meanwhile).
        let known = entry
            .known
            .get_or_try_init(|| async {
                let remaining = match state.packets.packet(packet_id).await {
                    Ok(Some(packet)) if packet.state == Some(PacketState::Active) => {
                        packet.remaining_count()
                    }
                    _ => return Err(()),
                };
                entry.remaining.store(remaining, Ordering::Release);
                Ok(())
            })
            .await
            .is_ok();
        let remaining = entry.remaining.load(Ordering::Acquire);
        let limit = if known {
            in_flight_max(remaining)
        } else {
            u32::MAX
        };
        let before = entry.in_flight.fetch_add(1, Ordering::AcqRel);
        let admitted = Admitted(entry);
        if before >= limit {
            return None;
        }
        // The peak while shares may be left (an empty packet's answers are cheap and unlimited).
        if !known || remaining > 0 {
            let peak = self
                .peak
                .fetch_max(before + 1, Ordering::AcqRel)
                .max(before + 1);
            state
                .metrics
                .packet_claims_in_flight_peak
                .set(i64::from(peak));
        }
        Some(admitted)
    }

    fn observe(admitted: &Admitted, remaining_count: u32) {
        admitted
            .0
            .remaining
            .store(remaining_count, Ordering::Release);
    }
}

fn unprocessable(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
}

impl From<PacketError> for ApiError {
    fn from(e: PacketError) -> ApiError {
        let message = e.to_string();
        match e {
            PacketError::IdempotencyConflict => {
                ApiError::new(StatusCode::CONFLICT, "idempotency_conflict", message)
            }
            PacketError::Unknown => ApiError::new(StatusCode::NOT_FOUND, "unknown_packet", message),
            PacketError::InvalidShares => unprocessable("invalid_shares", message),
            PacketError::InvalidAudience => unprocessable("invalid_audience", message),
            PacketError::NotPaid => ApiError::new(StatusCode::CONFLICT, "not_paid", message),
            PacketError::Empty => ApiError::new(StatusCode::GONE, "packet_empty", message),
            PacketError::Expired => ApiError::new(StatusCode::GONE, "packet_expired", message),
            PacketError::NotInAudience => {
                ApiError::new(StatusCode::FORBIDDEN, "not_in_audience", message)
            }
            PacketError::WrongState(_) => {
                ApiError::new(StatusCode::CONFLICT, "wrong_state", message)
            }
        }
    }
}

impl From<PacketFlowError> for ApiError {
    fn from(e: PacketFlowError) -> ApiError {
        let message = e.to_string();
        match e {
            PacketFlowError::Packet(e) => e.into(),
            PacketFlowError::InsufficientBalance(account) => {
                ApiError::new(StatusCode::CONFLICT, "insufficient_balance", message)
                    .with("account", account)
            }
            PacketFlowError::SubsidyUsed => {
                ApiError::new(StatusCode::CONFLICT, "subsidy_used", message)
            }
            PacketFlowError::SubsidyConflict => {
                ApiError::new(StatusCode::CONFLICT, "idempotency_conflict", message)
            }
            PacketFlowError::WrongMode => {
                ApiError::new(StatusCode::CONFLICT, "wrong_mode", message)
            }
            PacketFlowError::Unavailable(why) => {
                crate::warn_limited!(why, "packet step unconfirmed");
                ApiError::unavailable(
                    "unavailable",
                    "the step could not be confirmed; retry with the same ids",
                )
            }
            PacketFlowError::Overloaded => ApiError::unavailable("overloaded", "retry shortly"),
        }
    }
}

fn state_body(packet_id: &Id, reply: &PacketReply) -> PacketStateBody {
    let state = match reply {
        PacketReply::State { state, .. } => *state,
        PacketReply::Claimed { .. } | PacketReply::Many(_) => PacketState::Active,
    };
    PacketStateBody {
        packet_id: packet_id.to_string(),
        state: state.as_str().into(),
    }
}

/// Creates a red packet (P1, P2). C2C waits for payment; B2C is paid by its subsidy and active at
/// once.
#[utoipa::path(
    post, path = "/v1/packets", tag = "packets", request_body = CreatePacket,
    responses(
        (status = 201, body = PacketStateBody),
        (status = 401, description = "invalid_token (B2C subsidy token)", body = ErrorBody),
        (status = 403, description = "token_uid_mismatch", body = ErrorBody),
        (status = 409, description = "subsidy_used / idempotency_conflict", body = ErrorBody),
        (status = 422, description = "invalid_shares / invalid_audience / total_mismatch / not_a_subsidy / subsidy_token_required", body = ErrorBody),
        (status = 503, description = "c2c_send_off: C2C sending is switched off", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    caller: Caller,
    state: web::Data<AppState>,
    body: web::Json<CreatePacket>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[Role::Gateway])?;
    let body = body.into_inner();
    let packet_id = parse_id("packet_id", &body.packet_id)?;
    let sender_uid = parse_id("sender_uid", &body.sender_uid)?;
    let mode = match body.mode.as_str() {
        "b2c" => Mode::B2c,
        "c2c" => Mode::C2c,
        _ => return Err(unprocessable("invalid_mode", "mode must be b2c or c2c")),
    };
    let split = match body.split.as_str() {
        "lucky" => Split::Lucky,
        "even" => Split::Even,
        _ => {
            return Err(unprocessable(
                "invalid_split",
                "split must be lucky or even",
            ))
        }
    };
    let total = Fen::parse_amount(body.total, state.config.limits.amount_fen_max)
        .map_err(|e| ApiError::invalid_amount("total", e))?;
    if body.count == 0 || body.count > SHARES_MAX || total.as_u64() < body.count as u64 {
        return Err(unprocessable(
            "invalid_shares",
            format!("1 to {SHARES_MAX} shares, at least 1 fen each"),
        ));
    }
    let lifetime_s = body
        .expires_in_s
        .unwrap_or((LIFETIME_DEFAULT_MS / 1000) as u64);
    if lifetime_s == 0 || lifetime_s > LIFETIME_S_MAX {
        return Err(unprocessable(
            "invalid_expiry",
            format!("expires_in_s is 1 to {LIFETIME_S_MAX}"),
        ));
    }
    let audience = match body.audience {
        None => None,
        Some(a) => {
            if a.uids.is_empty() || a.uids.len() > AUDIENCE_MAX {
                return Err(unprocessable(
                    "invalid_audience",
                    format!("an audience lists 1 to {AUDIENCE_MAX} uids"),
                ));
            }
            Some(
                a.uids
                    .iter()
                    .map(|u| parse_id("audience.uids", u))
                    .collect::<Result<BTreeSet<Id>, _>>()?,
            )
        }
    };
    let now = state.packets.packets.runtime().clock.now_ms();
    let mut spec = PacketSpec {
        sender_uid: sender_uid.clone(),
        mode,
        total,
        count: body.count,
        split,
        audience,
        expires_at_ms: now + lifetime_s as i64 * 1000,
        seed: rand::random(),
        subsidy: None,
    };
    // A retried creation keeps the original deadline (the packet replays its first answer).
    if let Some(existing) = state.packets.packet(&packet_id).await?.and_then(|p| p.spec) {
        spec.expires_at_ms = existing.expires_at_ms;
    }
    let reply = match mode {
        Mode::C2c => {
            if body.subsidy_token.is_some() {
                return Err(unprocessable(
                    "unexpected_subsidy_token",
                    "C2C packets are paid from the sender's change, not a subsidy",
                ));
            }
            if !state.switches.with(|s| s.is_on("c2c_send")) {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "c2c_send_off",
                    "Sending red packets to friends is paused for a moment. Please try again a little later.",
                )
                .with("retry_after_ms", 60_000u64));
            }
            state.packets.create_c2c(&packet_id, spec).await?
        }
        Mode::B2c => {
            let Some(token) = body.subsidy_token.as_deref() else {
                return Err(unprocessable(
                    "subsidy_token_required",
                    "a B2C packet is paid by a subsidy token",
                ));
            };
            let claims = super::rewards::verify_tokens(&state, &sender_uid, &[token.to_owned()])?;
            let claim = &claims[0];
            if claim.kind != RewardKind::Subsidy {
                return Err(unprocessable(
                    "not_a_subsidy",
                    format!("the token is a {} reward, not a subsidy", claim.kind),
                ));
            }
            if claim.amount != total {
                return Err(unprocessable(
                    "total_mismatch",
                    format!(
                        "the subsidy is {}, the packet's total {}",
                        claim.amount, total
                    ),
                ));
            }
            spec.subsidy = Some(Subsidy {
                activity_id: claim.activity_id.clone(),
                order_id: claim.order_id.clone(),
            });
            state.packets.create_b2c(&packet_id, spec, claim).await?
        }
    };
    Ok(HttpResponse::Created().json(state_body(&packet_id, &reply)))
}

/// Pays a C2C packet from the sender's change balance (P2).
#[utoipa::path(
    post, path = "/v1/packets/{packet_id}/pay", tag = "packets",
    params(("packet_id" = String, Path)), request_body = PayPacket,
    responses(
        (status = 200, body = PacketStateBody),
        (status = 404, description = "unknown_packet", body = ErrorBody),
        (status = 409, description = "insufficient_balance (nothing moved) / wrong_mode / packet_expired (the deadline passed: nothing moved)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn pay(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<PayPacket>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[Role::Gateway])?;
    let packet_id = parse_id("packet_id", &path)?;
    let payment_id = parse_id("payment_id", &body.payment_id)?;
    let reply = match state.packets.pay_c2c(&packet_id, &payment_id).await {
        Ok(reply) => reply,
        // For a payment, an expired packet is a conflict with the request, not a gone share.
        Err(PacketFlowError::Packet(PacketError::Expired)) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "packet_expired",
                "the packet's deadline has passed; nothing was debited",
            ))
        }
        Err(e) => return Err(e.into()),
    };
    Ok(HttpResponse::Ok().json(state_body(&packet_id, &reply)))
}

/// Claims a share (P3, P5): one per uid, the same answer on every repeat; busy packets answer
/// 429 with `retry_after_ms` (clients poll at most 10 times).
#[utoipa::path(
    post, path = "/v1/packets/{packet_id}/claims", tag = "packets",
    params(("packet_id" = String, Path)), request_body = ClaimRequest,
    responses(
        (status = 200, body = ClaimBody),
        (status = 403, description = "not_in_audience", body = ErrorBody),
        (status = 404, description = "unknown_packet", body = ErrorBody),
        (status = 409, description = "not_paid", body = ErrorBody),
        (status = 410, description = "packet_empty / packet_expired", body = ErrorBody),
        (status = 429, description = "busy, with retry_after_ms", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn claim(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<ClaimRequest>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[Role::Gateway])?;
    let packet_id = parse_id("packet_id", &path)?;
    let uid = parse_id("uid", &body.uid)?;
    let metrics = &state.metrics.packet_claims_total;
    let Some(admitted) = state.claim_gate.admit(&state, &packet_id).await else {
        metrics.with_label_values(&["busy"]).inc();
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "busy",
            "many people are opening this packet; try again in a moment",
        )
        .with("retry_after_ms", BUSY_RETRY_AFTER_MS));
    };
    match state.packets.claim(&packet_id, &uid).await {
        Ok(PacketReply::Claimed {
            amount,
            remaining_count,
            replayed,
        }) => {
            // A repeat answers the count its first claim left, not what is left now: only a
            // new claim tells the gate.
            if !replayed {
                ClaimGate::observe(&admitted, remaining_count);
            }
            metrics
                .with_label_values(&[if replayed { "repeated" } else { "claimed" }])
                .inc();
            Ok(HttpResponse::Ok().json(ClaimBody {
                packet_id: packet_id.to_string(),
                uid: uid.to_string(),
                amount: amount.as_u64(),
                remaining_count,
            }))
        }
        Ok(other) => {
            crate::error_limited!(reply = ?other, "unexpected packet reply to a claim");
            Err(ApiError::unavailable("unavailable", "retry"))
        }
        Err(e) => {
            let error = ApiError::from(e);
            if error.code == "packet_empty" {
                ClaimGate::observe(&admitted, 0);
            }
            let outcome = match error.code {
                "packet_empty" => "empty",
                "packet_expired" => "expired",
                _ => "refused",
            };
            metrics.with_label_values(&[outcome]).inc();
            Err(error)
        }
    }
}

/// A packet's details (P3, P8), from the projection.
#[utoipa::path(
    get, path = "/v1/packets/{packet_id}", tag = "packets",
    params(("packet_id" = String, Path)),
    responses((status = 200, body = PacketDetails), (status = 404, description = "unknown_packet", body = ErrorBody)),
    security(("bearer" = []))
)]
pub async fn details(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[Role::Gateway])?;
    let packet_id = parse_id("packet_id", &path)?;
    let tree = read_view(&state, view::NAME).await?;
    let Some(summary) = view::summary(tree, packet_id.as_str()).map_err(view_error)? else {
        return Err(PacketError::Unknown.into());
    };
    let claims = view::claims(tree, packet_id.as_str(), CLAIMS_LISTED_MAX).map_err(view_error)?;
    Ok(HttpResponse::Ok().json(PacketDetails {
        packet_id: packet_id.to_string(),
        mode: match summary.mode {
            Mode::B2c => "b2c",
            Mode::C2c => "c2c",
        }
        .into(),
        sender_uid: summary.sender_uid,
        state: summary.state.as_str().into(),
        total: summary.total.as_u64(),
        count: summary.count,
        remaining_count: summary.count - summary.claimed_count,
        remaining_amount: summary
            .total
            .checked_sub(summary.claimed_amount)
            .unwrap_or(Fen::ZERO)
            .as_u64(),
        claims: claims
            .into_iter()
            .map(|c| ClaimItem {
                uid: c.uid,
                amount: c.amount.as_u64(),
                at: rfc3339(c.at_ms),
            })
            .collect(),
        best_luck_uid: summary.best.map(|(uid, _)| uid),
        expires_at: rfc3339(summary.expires_at_ms),
        refunded: summary.refunded.map(Fen::as_u64),
    }))
}
