//! Operations endpoints: liveness, readiness, metrics, the OpenAPI document. No key needed.

use super::AppState;
use crate::events::EventStore;
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
        (status = 200, description = "Ready: journal healthy; includes log head and projection checkpoints"),
        (status = 503, description = "The journal has stopped after a write failure"),
    ))]
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let head = state.store.head();
    let body = json!({
        "status": if state.store.healthy() { "ready" } else { "journal_failed" },
        "log_head": head,
        "projections": { wallet_view::NAME: state.projections.checkpoint(wallet_view::NAME) },
    });
    if state.store.healthy() {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document of this server")))]
pub async fn openapi(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(state.openapi.clone())
}
