//! Load-test traffic (D7, seed 002): a request carrying `X-Hongbao-Load-Test: 1` is served by
//! the same routes and handlers, but against a second engine of its own: its own log (a sled
//! log in `<data_dir>/load-test`, or the JetStream stream `<stream>_LOAD_TEST`), its own views,
//! actors, flows and continuous audit, its own simulated payment channels, and metrics that
//! carry `traffic="load_test"`. Real balances, budgets, statements, views and the real audit
//! cannot see it: nothing of the load-test engine is reachable from the real one, and the
//! other way round.
//!
//! The marking is strict: the header's value is `1` (a load test) or `0` (real traffic, as if
//! absent); anything else is refused 400 `invalid_load_test_header`, so that a misspelt marker
//! never turns a rehearsal into real money. A node without a load-test engine (disabled by
//! `load_test.enabled = false`, or a cluster node) refuses marked requests 403
//! `load_test_unavailable`: a marked request is never served as real traffic.

use super::error::ApiError;
use super::AppState;
use crate::config::Keys;
use crate::metrics::Metrics;
use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{Extensions, ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::middleware::Next;
use actix_web::{web, ResponseError};
use std::rc::Rc;

/// The header that marks a request as a load test.
pub const HEADER: &str = "x-hongbao-load-test";

/// The second engine, serving marked requests.
pub struct LoadTestEngine {
    pub state: web::Data<AppState>,
    pub metrics: web::Data<Metrics>,
}

/// What a request's marking says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Traffic {
    Real,
    LoadTest,
}

/// The request's traffic by its header (`None`: a value that is neither `1` nor `0`, or the
/// header given more than once).
pub fn traffic(headers: &actix_web::http::header::HeaderMap) -> Option<Traffic> {
    if headers.get_all(HEADER).nth(1).is_some() {
        return None;
    }
    match headers.get(HEADER).map(|v| v.as_bytes()) {
        None | Some(b"0") => Some(Traffic::Real),
        Some(b"1") => Some(Traffic::LoadTest),
        Some(_) => None,
    }
}

/// The metrics a request is counted in: the load-test engine's for a marked request.
pub fn metrics_of(req: &ServiceRequest) -> Option<web::Data<Metrics>> {
    if traffic(req.headers()) == Some(Traffic::LoadTest) {
        if let Some(engine) = req.app_data::<web::Data<LoadTestEngine>>() {
            return Some(engine.metrics.clone());
        }
    }
    req.app_data::<web::Data<Metrics>>().cloned()
}

/// The Prometheus text of the real registry with the load-test engine's series beside it
/// (one family per name; theirs carry `traffic="load_test"`).
pub fn render_metrics(real: &Metrics, engine: Option<&LoadTestEngine>) -> String {
    // (A marked scrape's state is the engine's own: its series once.)
    let Some(engine) = engine.filter(|e| !std::ptr::eq(real, e.metrics.as_ref())) else {
        return real.render();
    };
    real.render_beside(&engine.metrics)
}

/// The middleware: a marked request sees the load-test engine's state, metrics and keys in
/// place of the real ones (its data container is searched first); an unmarked one passes.
pub(crate) async fn route(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let refusal = match traffic(req.headers()) {
        Some(Traffic::Real) => return Ok(next.call(req).await?.map_into_boxed_body()),
        None => ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_load_test_header",
            "X-Hongbao-Load-Test is given once, 1 (a load test) or 0 (real traffic)",
        ),
        Some(Traffic::LoadTest) => match req.app_data::<web::Data<LoadTestEngine>>().cloned() {
            Some(engine) => {
                let mut data = Extensions::new();
                data.insert(engine.state.clone());
                data.insert(engine.metrics.clone());
                data.insert(web::Data::new(engine.state.keys.clone()) as web::Data<Keys>);
                req.add_data_container(Rc::new(data));
                return Ok(next.call(req).await?.map_into_boxed_body());
            }
            None => ApiError::new(
                StatusCode::FORBIDDEN,
                "load_test_unavailable",
                "this node serves no load tests (load_test.enabled is false, or it is a \
                     cluster node); the request was not processed",
            ),
        },
    };
    Ok(req.into_response(refusal.error_response()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};

    fn headers(value: Option<&'static str>) -> HeaderMap {
        let mut map = HeaderMap::new();
        if let Some(value) = value {
            map.insert(
                HeaderName::from_static(HEADER),
                HeaderValue::from_static(value),
            );
        }
        map
    }

    #[test]
    fn only_one_and_zero_are_markings() {
        // Goal: a misspelt marker is refused, never taken for real traffic.
        assert_eq!(traffic(&headers(None)), Some(Traffic::Real));
        assert_eq!(traffic(&headers(Some("0"))), Some(Traffic::Real));
        assert_eq!(traffic(&headers(Some("1"))), Some(Traffic::LoadTest));
        for wrong in ["true", "yes", "", "01", " 1"] {
            assert_eq!(traffic(&headers(Some(wrong))), None, "{wrong:?}");
        }
        // Twice, whatever the values: which one a proxy keeps is not ours to guess.
        let mut twice = headers(Some("0"));
        twice.append(
            HeaderName::from_static(HEADER),
            HeaderValue::from_static("1"),
        );
        assert_eq!(traffic(&twice), None);
    }
}
