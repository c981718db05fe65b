//! Operations endpoints: liveness, readiness, metrics, the OpenAPI document. No key needed.

use super::auth::{Caller, Operator};
use super::error::ApiError;
use super::{AppState, ErrorBody};
use crate::actors::ExecError;
use crate::domain::switches::{SetSwitch, SwitchError};
use crate::events::JournalCondition;
use crate::projections::wallet as wallet_view;
use actix_web::{web, HttpResponse};
use serde_json::json;

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process is up")))]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// Readiness: the journal is healthy (it stops after a failed write).
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready: journal healthy; includes log head, the store's durability guarantee and projection checkpoints"),
        (status = 503, description = "Not ready: `status` is `log_unreachable` while the JetStream log is unreachable or electing a leader (the node recovers by itself), or `journal_failed` once the journal stopped (a failed write, or fenced by another writer on the same log)"),
    ))]
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let head = state.store.head();
    let (ready, condition) = readiness(&state);
    let body = json!({
        "status": condition.as_str(),
        "log_head": head,
        "store": state.store_guarantee,
        "projections": { wallet_view::NAME: state.projections.checkpoint(wallet_view::NAME) },
    });
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// The readiness check of `/readyz` and `hongbao_ready`: ready while the journal is healthy.
pub(crate) fn readiness(state: &AppState) -> (bool, JournalCondition) {
    let condition = state.store.condition();
    (condition == JournalCondition::Ready, condition)
}

/// Prometheus text exposition; `hongbao_ready` is judged at each scrape as `/readyz` judges.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(
    state: web::Data<AppState>,
    load_test: Option<web::Data<super::load_test::LoadTestEngine>>,
) -> HttpResponse {
    state.metrics.set_ready(readiness(&state).0);
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(super::load_test::render_metrics(
            &state.metrics,
            load_test.as_ref().map(|engine| engine.get_ref()),
        ))
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document of this server")))]
pub async fn openapi(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(state.openapi.clone())
}

#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SwitchRequest {
    pub on: bool,
}

/// Turns a degradation switch on or off (recorded as an event). Known switches:
/// `reward_lanes` (off pauses crediting; rewards keep being accepted, pending).
#[utoipa::path(put, path = "/v1/admin/switches/{name}", tag = "operations",
    params(("name" = String, Path)), request_body = SwitchRequest,
    responses(
        (status = 200, description = "Every switch with its value, after the change", body = Object),
        (status = 404, description = "unknown_switch", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn set_switch(
    operator: Operator,
    state: web::Data<AppState>,
    name: web::Path<String>,
    body: web::Json<SwitchRequest>,
) -> Result<HttpResponse, ApiError> {
    operator.caller.require(&[])?;
    let command = SetSwitch {
        name: name.to_string(),
        on: body.on,
        by: operator.changed_by(),
    };
    let all = state.switches.execute(command).await.map_err(|e| match e {
        ExecError::Rejected(SwitchError::Unknown(name)) => ApiError::new(
            actix_web::http::StatusCode::NOT_FOUND,
            "unknown_switch",
            format!("no switch named {name}; see GET /v1/admin/switches"),
        ),
        ExecError::Unavailable(why) => {
            crate::warn_limited!(why, "switch change unconfirmed");
            ApiError::unavailable("unavailable", "the change could not be confirmed; retry")
        }
        ExecError::Overloaded => ApiError::unavailable("overloaded", "retry shortly"),
        ExecError::Timeout => {
            ApiError::unavailable("timeout", "the change was not confirmed in time; retry")
        }
    })?;
    tracing::info!(switch = %name, on = body.on, key_id = %operator.key_id, "switch set");
    Ok(HttpResponse::Ok().json(all))
}

/// Every degradation switch with its current value, and `changed_by`: for each switch changed
/// since changes named their key, the role and key id that last changed it, and when.
#[utoipa::path(get, path = "/v1/admin/switches", tag = "operations",
    responses((status = 200, description = "name -> on, and changed_by: name -> {role, key_id, at}", body = Object)),
    security(("bearer" = [])))]
pub async fn list_switches(
    caller: Caller,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    caller.require(&[])?;
    let body = state.switches.with(|switches| {
        let mut body = serde_json::Map::new();
        for (name, on) in switches.all() {
            body.insert(name, json!(on));
        }
        let changed_by: serde_json::Map<String, serde_json::Value> = switches
            .changed_by
            .iter()
            .map(|(name, (by, at_ms))| {
                let change = json!({"role": by.role, "key_id": by.key_id, "at": crate::clock::rfc3339(*at_ms)});
                (name.clone(), change)
            })
            .collect();
        // Not a switch name (`KNOWN` has none such), so the flat name -> on shape stays.
        body.insert("changed_by".into(), serde_json::Value::Object(changed_by));
        body
    });
    Ok(HttpResponse::Ok().json(body))
}
